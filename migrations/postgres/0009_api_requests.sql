-- flowgate schema, version 9 (PostgreSQL): mirrors migrations/sqlite/0009_api_requests.sql
-- (the admin API's idempotency keys for requests that create messages).
CREATE TABLE api_requests (
    scope TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    subject TEXT NOT NULL,
    message_id BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (scope, idempotency_key)
);
