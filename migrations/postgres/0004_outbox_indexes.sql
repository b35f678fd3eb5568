-- flowgate schema, version 4 (PostgreSQL): mirrors migrations/sqlite/0004_outbox_indexes.sql.

CREATE INDEX messages_unsent_by_contact ON messages (contact_id, id)
    WHERE direction = 'out' AND status IN ('pending', 'sending');

CREATE INDEX messages_replies ON messages (in_reply_to, contact_id, id)
    WHERE direction = 'out' AND in_reply_to IS NOT NULL;
