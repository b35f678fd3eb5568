-- flowgate schema, version 1 (SQLite).
--
-- Conventions, kept portable so the PostgreSQL migration can mirror this file column for column
-- and `src/store.rs` can run the same SQL on both:
--   * times are INTEGER unix milliseconds, UTC (BIGINT on PostgreSQL);
--   * JSON is TEXT that flowgate parses; no SQL looks inside it;
--   * ids are INTEGER PRIMARY KEY (BIGINT identity on PostgreSQL).
--
-- Applied migrations are checksummed: never edit this file once released, add 0002_….sql.

-- Who the bot talks to, one row per WhatsApp id per channel (business number or sandbox).
CREATE TABLE contacts (
    id INTEGER PRIMARY KEY,
    channel TEXT NOT NULL,
    wa_id TEXT NOT NULL,
    name TEXT,
    -- JSON array of strings, sorted (a BTreeSet).
    tags TEXT NOT NULL DEFAULT '[]',
    -- JSON object of flow-defined attributes.
    attrs TEXT NOT NULL DEFAULT '{}',
    -- IANA zone name, e.g. Europe/Berlin.
    timezone TEXT,
    -- When the customer last wrote (their timestamp): opens the 24h service window.
    last_customer_message_at INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    UNIQUE (channel, wa_id)
);

-- The flow a contact is in, at most one per contact. The version pins the flow bundle the
-- session started on (see flow_versions), so a reload does not move a running conversation.
CREATE TABLE sessions (
    contact_id INTEGER PRIMARY KEY REFERENCES contacts (id) ON DELETE CASCADE,
    flow_id TEXT NOT NULL,
    flow_version TEXT NOT NULL,
    step TEXT NOT NULL,
    -- JSON: the flow's variables.
    state TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);

-- The message log, both directions. AUTOINCREMENT keeps ids increasing even after deletes, so
-- "order by id" is the order things happened in.
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    contact_id INTEGER NOT NULL REFERENCES contacts (id) ON DELETE CASCADE,
    -- Copied from the contact so inbound ids can be deduplicated per channel.
    channel TEXT NOT NULL,
    direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
    -- The provider's message id; NULL for an outbound message until the provider accepts it.
    wamid TEXT,
    -- Inbound: the message type flows see; outbound: text, buttons, list, media or template.
    kind TEXT NOT NULL,
    -- JSON: the whole Inbound or Outbound.
    body TEXT NOT NULL,
    -- Outbound only: the policy decision (send, rewritten, queued, skipped, expired, failed)
    -- and its reason.
    decision TEXT,
    reason TEXT,
    -- Inbound: received; outbound: pending, sent, delivered, read, failed, …
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE INDEX messages_by_contact ON messages (contact_id, id);

-- WhatsApp redelivers webhooks; a second copy of an inbound message must not run the flow twice.
CREATE UNIQUE INDEX messages_inbound_wamid ON messages (channel, wamid)
    WHERE direction = 'in' AND wamid IS NOT NULL;

-- Durable timers (wait, reminders, timeouts). AUTOINCREMENT so a fired timer's id is never
-- reused by a timer created later: deleting "the timer that fired" can't hit a newer one.
CREATE TABLE timers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    contact_id INTEGER NOT NULL REFERENCES contacts (id) ON DELETE CASCADE,
    due_at INTEGER NOT NULL,
    -- JSON: what the engine does when the timer fires.
    payload TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE INDEX timers_by_due_at ON timers (due_at, id);
CREATE INDEX timers_by_contact ON timers (contact_id);

-- Every flow version sessions may be pinned to, as the opaque bundle it was compiled from.
CREATE TABLE flow_versions (
    flow_id TEXT NOT NULL,
    version TEXT NOT NULL,
    bundle TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (flow_id, version)
);
