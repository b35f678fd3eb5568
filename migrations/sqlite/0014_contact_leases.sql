-- flowgate schema, version 14: contact leases, which instance may run a contact's turns.
-- Used on PostgreSQL, where several instances share the database; on SQLite (one process
-- by design) the table exists, so the store's lease operations behave the same on both,
-- but `serve` does not use it.

CREATE TABLE contact_leases (
    channel TEXT NOT NULL,
    -- the inbox's contact_key (the phone, else the BSUID), or '#' and the inbox row's id
    -- for an update about no contact
    contact_key TEXT NOT NULL,
    -- the instance that holds the lease
    owner TEXT NOT NULL,
    -- unix milliseconds; after this any instance may take the lease
    lease_until INTEGER NOT NULL,
    PRIMARY KEY (channel, contact_key)
);

CREATE INDEX contact_leases_by_owner ON contact_leases (owner);
