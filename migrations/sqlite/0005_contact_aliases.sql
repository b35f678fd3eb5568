-- The other identifiers a contact is known by (FACTS.md §10.10): its business-scoped user id
-- (BSUID) while it is keyed by its phone number, and BSUIDs it had before Meta changed them.
-- A contact's key (contacts.wa_id: the phone when known, else the BSUID) is never repeated
-- here; an identifier names at most one contact per channel. Phone numbers are not kept as
-- aliases: WhatsApp gives a number up to someone else, a BSUID never.
CREATE TABLE contact_aliases (
    channel TEXT NOT NULL,
    identifier TEXT NOT NULL,
    contact_id INTEGER NOT NULL REFERENCES contacts (id) ON DELETE CASCADE,
    PRIMARY KEY (channel, identifier)
) WITHOUT ROWID;

CREATE INDEX contact_aliases_by_contact ON contact_aliases (contact_id);
