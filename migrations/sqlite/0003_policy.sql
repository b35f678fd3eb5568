-- flowgate schema, version 3 (SQLite): the policy layer.

-- The policy's memory of a contact besides the last message time (JSON, see
-- domain::PolicyState): WhatsApp's 131047, the free entry point, marketing consent.
ALTER TABLE contacts ADD COLUMN policy TEXT NOT NULL DEFAULT '{}';

-- A queued message expires at this time (queue_ttl after it was queued); NULL otherwise.
ALTER TABLE messages ADD COLUMN expires_at INTEGER;

-- A contact's queue, flushed in id order when the customer writes again.
CREATE INDEX messages_queued ON messages (contact_id, id) WHERE status = 'queued';
-- The expiry sweep.
CREATE INDEX messages_queue_expiry ON messages (expires_at) WHERE status = 'queued';

-- Template statuses WhatsApp reported (message_template_status_update) since the registry
-- file was written; they override the file's status until `flowgate templates sync`.
CREATE TABLE template_statuses (
    name TEXT NOT NULL,
    language TEXT NOT NULL,
    -- approved, pending, rejected, paused, disabled
    status TEXT NOT NULL,
    -- WhatsApp's event (APPROVED, PAUSED, …) and reason, for the record.
    event TEXT NOT NULL,
    reason TEXT,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (name, language)
);
