-- flowgate schema, version 5 (PostgreSQL): a contact's other identifiers; mirrors
-- migrations/sqlite/0005_contact_aliases.sql.
CREATE TABLE contact_aliases (
    channel TEXT NOT NULL,
    identifier TEXT NOT NULL,
    contact_id BIGINT NOT NULL REFERENCES contacts (id) ON DELETE CASCADE,
    -- 1 for the BSUID the contact's phone is paired with now; 0 for older BSUIDs.
    current BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (channel, identifier)
);

CREATE INDEX contact_aliases_by_contact ON contact_aliases (contact_id);
