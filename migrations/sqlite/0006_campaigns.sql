-- flowgate schema, version 6 (SQLite): campaigns, their runs, and each run's ledger of
-- recipients.

-- A campaign's definition, as the YAML text it was written in (a file of `campaigns/` or a
-- body sent to the API). Names are global: the CLI and the API address a campaign by name.
CREATE TABLE campaigns (
    name TEXT PRIMARY KEY,
    -- The channel it sends on (from the YAML), so an account error on that number can pause
    -- every campaign on it.
    channel TEXT NOT NULL,
    source TEXT NOT NULL,
    origin TEXT NOT NULL CHECK (origin IN ('file', 'api')),
    paused INTEGER NOT NULL DEFAULT 0,
    pause_reason TEXT,
    -- The next scheduled run (unix ms); NULL when nothing is scheduled (a past `at`).
    next_run_at INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

-- The scheduler's question: which campaigns are due.
CREATE INDEX campaigns_due ON campaigns (next_run_at, name)
    WHERE paused = 0 AND next_run_at IS NOT NULL;

-- One row per run of a campaign. UNIQUE (campaign, scheduled_for) makes a claim happen once:
-- two schedulers, or one before and after a restart, claiming the same scheduled time get
-- the same row. Runs outlive their campaign's definition (reports stay; a campaign deleted
-- and written again under its name never claims a run it already had).
CREATE TABLE campaign_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    campaign TEXT NOT NULL,
    scheduled_for INTEGER NOT NULL,
    -- schedule (the cron or `at`) or manual (run-now)
    trigger TEXT NOT NULL CHECK (trigger IN ('schedule', 'manual')),
    status TEXT NOT NULL
        CHECK (status IN ('planned', 'running', 'paused', 'done', 'missed', 'cancelled')),
    -- Why it is paused, missed or cancelled.
    reason TEXT,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    -- JSON written by the campaign's runner (e.g. its cost estimate); NULL until then.
    report TEXT,
    updated_at INTEGER NOT NULL,
    UNIQUE (campaign, scheduled_for)
);

CREATE INDEX campaign_runs_active ON campaign_runs (status)
    WHERE status IN ('planned', 'running', 'paused');

-- The ledger: every recipient of a run, snapshotted when the run starts. The primary key
-- (run_id, contact_id) is what makes a duplicate impossible: a recipient has one row per
-- run, and once it is decided (sent, skipped...) it is never taken again, even after a
-- crash and restart.
CREATE TABLE campaign_recipients (
    run_id INTEGER NOT NULL REFERENCES campaign_runs (id) ON DELETE CASCADE,
    contact_id INTEGER NOT NULL REFERENCES contacts (id) ON DELETE CASCADE,
    -- planned (not decided yet), deferred (until not_before), sent, skipped, failed, cancelled
    decision TEXT NOT NULL
        CHECK (decision IN ('planned', 'deferred', 'sent', 'skipped', 'failed', 'cancelled')),
    reason TEXT,
    -- The outbound message it became (its delivery status is the message's).
    message_id INTEGER REFERENCES messages (id) ON DELETE SET NULL,
    -- Not to be taken before this time (unix ms): the run's start, or a deferral's end.
    not_before INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    decided_at INTEGER,
    PRIMARY KEY (run_id, contact_id)
) WITHOUT ROWID;

-- The dispatcher's question: a run's recipients still to decide, due first. Decided rows
-- leave the index, so a run's last batch costs what its first did.
CREATE INDEX campaign_recipients_pending ON campaign_recipients (run_id, not_before, contact_id)
    WHERE decision IN ('planned', 'deferred');
-- Contacts deleted cascade here; and "which runs did this contact get".
CREATE INDEX campaign_recipients_by_contact ON campaign_recipients (contact_id);
-- Message statuses join back to the ledger for reports.
CREATE INDEX campaign_recipients_by_message ON campaign_recipients (message_id)
    WHERE message_id IS NOT NULL;
