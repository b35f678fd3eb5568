-- flowgate schema, version 7 (PostgreSQL): mirrors migrations/sqlite/0007_campaign_dispatch.sql.

-- 0: a conversational message; 1: a campaign's. The outbox claims by (priority, id).
ALTER TABLE messages ADD COLUMN priority BIGINT NOT NULL DEFAULT 0;

CREATE INDEX messages_outbox_priority ON messages (channel, priority, id)
    WHERE direction = 'out' AND status IN ('pending', 'sending');

CREATE INDEX messages_templates_sent ON messages (channel, created_at, contact_id)
    WHERE direction = 'out' AND kind = 'template';
