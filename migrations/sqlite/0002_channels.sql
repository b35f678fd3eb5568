-- flowgate schema, version 2 (SQLite): WhatsApp channels.
--
-- The inbox makes "persist, then acknowledge, then process" true: a webhook is answered 200
-- only after its updates are rows here. The outbox is the `messages` table itself: outbound
-- rows in status `pending` are what the sender still has to deliver.

-- Webhook updates (messages, statuses, errors, template and preference events), one row each.
CREATE TABLE inbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel TEXT NOT NULL,
    -- The wamid for a message, `wamid:status` for a status, a content hash otherwise.
    -- Meta delivers at least once, for up to 7 days: a second copy is ignored here.
    dedupe_key TEXT NOT NULL,
    -- message, system, status, error, template_status, user_preference, unknown
    kind TEXT NOT NULL,
    -- The contact the update belongs to (wa_id, else BSUID): updates of one contact are
    -- processed one at a time in id order; different contacts in parallel.
    contact_key TEXT,
    -- JSON: the parsed update with its raw webhook JSON.
    payload TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    -- Set once the update is processed (or skipped); NULL means still to do.
    processed_at INTEGER,
    -- Not before this time (a status that arrived before its send was recorded waits here).
    next_attempt_at INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    UNIQUE (channel, dedupe_key)
);

CREATE INDEX inbox_pending ON inbox (processed_at, next_attempt_at, id);

-- The outbox: delivery state of outbound messages.
ALTER TABLE messages ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
-- Not before this time (retries, rate limits, the pair limit).
ALTER TABLE messages ADD COLUMN next_attempt_at INTEGER NOT NULL DEFAULT 0;
-- A sender owns a `sending` row until this time; after a crash the lease runs out.
ALTER TABLE messages ADD COLUMN lease_until INTEGER;
ALTER TABLE messages ADD COLUMN lease_owner TEXT;
-- Sent as `biz_opaque_callback_data`, echoed in statuses: ties a send to its row even when
-- the response (and so the wamid) was lost in a crash.
ALTER TABLE messages ADD COLUMN idempotency_key TEXT;
-- The inbound message this one answers (mark-as-read and the typing indicator refer to it).
ALTER TABLE messages ADD COLUMN in_reply_to TEXT;
-- The last Graph error, if any.
ALTER TABLE messages ADD COLUMN error_code INTEGER;
ALTER TABLE messages ADD COLUMN error TEXT;
ALTER TABLE messages ADD COLUMN updated_at INTEGER;

CREATE INDEX messages_outbox ON messages (channel, status, next_attempt_at, id)
    WHERE direction = 'out';
CREATE UNIQUE INDEX messages_outbound_wamid ON messages (wamid)
    WHERE direction = 'out' AND wamid IS NOT NULL;
CREATE UNIQUE INDEX messages_idempotency_key ON messages (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- A channel's sender state: stopped on account-level errors until an operator resumes it.
CREATE TABLE channel_state (
    channel TEXT PRIMARY KEY,
    stopped_reason TEXT,
    stopped_code INTEGER,
    stopped_at INTEGER,
    updated_at INTEGER NOT NULL
);
