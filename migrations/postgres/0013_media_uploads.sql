-- flowgate schema, version 13 (PostgreSQL): mirrors migrations/sqlite/0013_media_uploads.sql
-- (project files uploaded to WhatsApp: one row per channel and content, with the media id
-- and its expiry, or the lease of the sender uploading it now).

CREATE TABLE media_uploads (
    channel TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    media_id TEXT,
    expires_at BIGINT,
    owner TEXT,
    lease_until BIGINT NOT NULL DEFAULT 0,
    uploaded_at BIGINT,
    PRIMARY KEY (channel, sha256)
);
