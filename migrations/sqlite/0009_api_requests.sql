-- The admin API's idempotency keys for requests that create messages (an agent's message):
-- a retried request with a key already here answers the message it created instead of
-- sending again. `subject` is what the key was used for (the channel and contact), so a
-- key reused for another contact is refused rather than answered with the wrong message.
CREATE TABLE api_requests (
    scope TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    subject TEXT NOT NULL,
    message_id INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (scope, idempotency_key)
);
