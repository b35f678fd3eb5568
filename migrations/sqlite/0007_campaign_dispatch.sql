-- flowgate schema, version 7 (SQLite): campaign messages wait behind conversational replies,
-- and the channel's messaging limit is counted cheaply.

-- 0: a conversational message (a reply, an agent's, a timer's); 1: a campaign's. The
-- outbox claims by (priority, id), so a customer's reply never waits behind a campaign.
ALTER TABLE messages ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;

-- The claim's order over the unsent rows only.
CREATE INDEX messages_outbox_priority ON messages (channel, priority, id)
    WHERE direction = 'out' AND status IN ('pending', 'sending');

-- The messaging limit's question: which contacts got a template on a channel in the last
-- 24 hours.
CREATE INDEX messages_templates_sent ON messages (channel, created_at, contact_id)
    WHERE direction = 'out' AND kind = 'template';
