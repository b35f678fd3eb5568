-- flowgate schema, version 8 (PostgreSQL): mirrors
-- migrations/sqlite/0008_campaign_run_requests.sql.

CREATE TABLE campaign_run_requests (
    campaign TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    run_id BIGINT NOT NULL REFERENCES campaign_runs (id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (campaign, idempotency_key)
);
