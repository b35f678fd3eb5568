-- The other identifiers a contact is known by (FACTS.md §10.10): its business-scoped user id
-- (BSUID) while it is keyed by its phone number, and BSUIDs it had before Meta changed them.
-- A contact's key (contacts.wa_id: the phone when known, else the BSUID) is never repeated
-- here; an identifier names at most one contact per channel. Phone numbers are not kept as
-- aliases: WhatsApp gives a number up to someone else, a BSUID never.
CREATE TABLE contact_aliases (
    channel TEXT NOT NULL,
    identifier TEXT NOT NULL,
    contact_id INTEGER NOT NULL REFERENCES contacts (id) ON DELETE CASCADE,
    -- 1 for the BSUID the contact's phone (its key) is paired with now; 0 for BSUIDs from
    -- before a number change. A phone whose contact has a current BSUID, paired by Meta
    -- with another, has changed hands.
    current INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (channel, identifier)
) WITHOUT ROWID;

CREATE INDEX contact_aliases_by_contact ON contact_aliases (contact_id);
