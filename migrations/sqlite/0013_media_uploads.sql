-- flowgate schema, version 13 (SQLite): project files uploaded to WhatsApp, by channel and
-- content.

-- One row per channel and file content (its SHA-256): the media id WhatsApp gave the upload
-- and when it expires, or the lease of the sender uploading it now. The row is the one
-- upload of that content on that channel, so several instances agree on who uploads it.
CREATE TABLE media_uploads (
    channel TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    media_id TEXT,
    expires_at INTEGER,
    owner TEXT,
    lease_until INTEGER NOT NULL DEFAULT 0,
    uploaded_at INTEGER,
    PRIMARY KEY (channel, sha256)
) WITHOUT ROWID;
