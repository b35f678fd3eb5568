-- flowgate schema, version 12 (SQLite): files customers send, downloaded in the background.

-- One row per customer message carrying a file (image, document, audio, video, sticker),
-- written by the turn that stores the message (so a redelivered message adds none). The
-- download worker claims due rows with a lease (`lease_until`), as the outbox does, so a
-- crash or a restart retries a download and two instances do not both run one; once the
-- file is stored (`ok`) or refused (`failed`, with `error`), the contact's flow is told in a
-- turn of its own and `notified` set.
CREATE TABLE media (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    contact_id INTEGER NOT NULL REFERENCES contacts (id) ON DELETE CASCADE,
    channel TEXT NOT NULL,
    -- The customer's message (its wamid).
    wamid TEXT NOT NULL,
    -- image, document, audio, video or sticker.
    kind TEXT NOT NULL,
    -- WhatsApp's media id; NULL for a file given directly (a conversation test).
    provider_id TEXT,
    mime TEXT,
    -- As the webhook gave it (base64 of the raw digest).
    sha256 TEXT,
    caption TEXT,
    filename TEXT,
    -- pending, ok or failed.
    status TEXT NOT NULL,
    -- Why it failed (sha256_mismatch, too_large, download_failed: …); the last attempt's
    -- problem while it is retried.
    error TEXT,
    size INTEGER,
    -- Where the media store keeps the bytes.
    store_key TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    lease_until INTEGER,
    notified INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    UNIQUE (channel, wamid)
);

-- The worker's claim: rows not yet told to their flow, by when they are due.
CREATE INDEX media_due ON media (next_attempt_at) WHERE notified = 0;
-- A conversation's media, for its history.
CREATE INDEX media_by_contact ON media (contact_id, id);

-- Secrets the server generates once and every instance shares (the key that signs media
-- URLs when the config sets none).
CREATE TABLE server_secrets (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
