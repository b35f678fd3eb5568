-- flowgate schema, version 4 (SQLite): the sender's claim costs the same however long a
-- contact's history grows.

-- "An earlier message of this contact is still unsent" (one message at a time per contact):
-- only the unsent rows, not every message the contact ever exchanged.
CREATE INDEX messages_unsent_by_contact ON messages (contact_id, id)
    WHERE direction = 'out' AND status IN ('pending', 'sending');

-- "An earlier reply to the same customer message exists" (mark-as-read goes with the first
-- reply only).
CREATE INDEX messages_replies ON messages (in_reply_to, contact_id, id)
    WHERE direction = 'out' AND in_reply_to IS NOT NULL;
