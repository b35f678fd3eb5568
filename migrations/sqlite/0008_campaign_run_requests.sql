-- flowgate schema, version 8 (SQLite): run-now requests by their idempotency key.

-- A run-now request that carried an `Idempotency-Key`: the run it started. The same key for
-- the same campaign answers that run again instead of starting a second one, however often a
-- client retries (after a timeout, after a restart of either side).
CREATE TABLE campaign_run_requests (
    campaign TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    run_id INTEGER NOT NULL REFERENCES campaign_runs (id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (campaign, idempotency_key)
) WITHOUT ROWID;
