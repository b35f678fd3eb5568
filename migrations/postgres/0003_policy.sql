-- flowgate schema, version 3 (PostgreSQL): the policy layer; mirrors
-- migrations/sqlite/0003_policy.sql.

ALTER TABLE contacts ADD COLUMN policy TEXT NOT NULL DEFAULT '{}';

ALTER TABLE messages ADD COLUMN expires_at BIGINT;

CREATE INDEX messages_queued ON messages (contact_id, id) WHERE status = 'queued';
CREATE INDEX messages_queue_expiry ON messages (expires_at) WHERE status = 'queued';

CREATE TABLE template_statuses (
    name TEXT NOT NULL,
    language TEXT NOT NULL,
    status TEXT NOT NULL,
    event TEXT NOT NULL,
    reason TEXT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (name, language)
);
