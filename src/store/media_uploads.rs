//! Project files uploaded to WhatsApp (`media_uploads`): per channel and file content
//! (SHA-256), the media id the upload got and when WhatsApp forgets it, or the lease of the
//! sender uploading it now. One row per channel and content, so several instances agree on
//! who uploads a file: the one whose claim wrote the row; the others wait for its id.

use chrono::{DateTime, Utc};

use super::db::{Db, with_pool, with_writer};
use super::error::StoreError;
use super::sql::from_millis;

/// An uploaded file's media id and its expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaUpload {
    pub media_id: String,
    pub expires_at: DateTime<Utc>,
}

/// A `media_uploads` row as read: media id, expiry, owner, lease.
type UploadRow = (Option<String>, Option<i64>, Option<String>, i64);

/// What the store holds for one file on one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaUploadState {
    /// Nothing yet, or an id that was dropped (expired, refused).
    Missing,
    /// Being uploaded by `owner` until `lease_until`.
    Uploading {
        owner: String,
        lease_until: DateTime<Utc>,
    },
    Uploaded(MediaUpload),
}

impl Db {
    /// The state of the file with content `sha256` on `channel`.
    pub async fn media_upload(
        &self,
        channel: &str,
        sha256: &str,
    ) -> Result<MediaUploadState, StoreError> {
        const SQL: &str = "SELECT media_id, expires_at, owner, lease_until FROM media_uploads \
            WHERE channel = $1 AND sha256 = $2";
        let row: Option<UploadRow> = with_pool!(self, |pool| {
            sqlx::query_as(SQL)
                .bind(channel)
                .bind(sha256)
                .fetch_optional(pool)
                .await?
        });
        Ok(match row {
            Some((Some(media_id), Some(expires_at), _, _)) => {
                MediaUploadState::Uploaded(MediaUpload {
                    media_id,
                    expires_at: from_millis(expires_at, "expires_at")?,
                })
            }
            Some((None, _, Some(owner), lease_until)) => MediaUploadState::Uploading {
                owner,
                lease_until: from_millis(lease_until, "lease_until")?,
            },
            _ => MediaUploadState::Missing,
        })
    }

    /// Claims the upload of `sha256` on `channel` for `owner` until `lease_until`: writes the
    /// row when there is none, or takes it over when its id expires before `stale_before`
    /// (or was dropped) and nobody holds a lease on it at `now`. `true` when the claim is
    /// `owner`'s: then it uploads and calls [`Db::record_media_upload`] (or
    /// [`Db::release_media_upload`] on failure); `false` when someone else's fresh id or
    /// lease is there.
    pub async fn claim_media_upload(
        &self,
        channel: &str,
        sha256: &str,
        owner: &str,
        now: DateTime<Utc>,
        stale_before: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "INSERT INTO media_uploads (channel, sha256, owner, lease_until) \
            VALUES ($1, $2, $3, $4) \
            ON CONFLICT (channel, sha256) DO UPDATE \
            SET owner = excluded.owner, lease_until = excluded.lease_until, \
                media_id = NULL, expires_at = NULL \
            WHERE media_uploads.lease_until <= $5 \
              AND (media_uploads.media_id IS NULL OR media_uploads.expires_at <= $6) \
            RETURNING owner";
        let (now, stale_before, lease_until) = (
            now.timestamp_millis(),
            stale_before.timestamp_millis(),
            lease_until.timestamp_millis(),
        );
        let claimed: Option<String> = with_writer!(self, own(channel, sha256, owner), |pool| {
            sqlx::query_scalar(SQL)
                .bind(&channel)
                .bind(&sha256)
                .bind(&owner)
                .bind(lease_until)
                .bind(now)
                .bind(stale_before)
                .fetch_optional(pool)
                .await?
        });
        Ok(claimed.is_some())
    }

    /// Records the id `owner`'s upload got and ends its lease; `false` when the claim was
    /// no longer `owner`'s (its lease ran out and another took it over).
    pub async fn record_media_upload(
        &self,
        channel: &str,
        sha256: &str,
        owner: &str,
        upload: &MediaUpload,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE media_uploads \
            SET media_id = $4, expires_at = $5, uploaded_at = $6, owner = NULL, lease_until = 0 \
            WHERE channel = $1 AND sha256 = $2 AND owner = $3";
        let media_id = upload.media_id.clone();
        let expires_at = upload.expires_at.timestamp_millis();
        let done = with_writer!(self, own(channel, sha256, owner, media_id), |pool| {
            sqlx::query(SQL)
                .bind(&channel)
                .bind(&sha256)
                .bind(&owner)
                .bind(&media_id)
                .bind(expires_at)
                .bind(now.timestamp_millis())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(done == 1)
    }

    /// Gives up `owner`'s claim after a failed upload, so the next send claims it again.
    pub async fn release_media_upload(
        &self,
        channel: &str,
        sha256: &str,
        owner: &str,
    ) -> Result<(), StoreError> {
        const SQL: &str = "UPDATE media_uploads SET owner = NULL, lease_until = 0 \
            WHERE channel = $1 AND sha256 = $2 AND owner = $3";
        with_writer!(self, own(channel, sha256, owner), |pool| {
            sqlx::query(SQL)
                .bind(&channel)
                .bind(&sha256)
                .bind(&owner)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Drops `media_id` (WhatsApp no longer knows it), unless the row already holds another
    /// id: a sender that met the refusal late does not throw away a fresh upload.
    pub async fn drop_media_id(
        &self,
        channel: &str,
        sha256: &str,
        media_id: &str,
    ) -> Result<(), StoreError> {
        const SQL: &str = "UPDATE media_uploads SET media_id = NULL, expires_at = NULL \
            WHERE channel = $1 AND sha256 = $2 AND media_id = $3";
        with_writer!(self, own(channel, sha256, media_id), |pool| {
            sqlx::query(SQL)
                .bind(&channel)
                .bind(&sha256)
                .bind(&media_id)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// How many uploads the store holds an id for on `channel` (tests, operators).
    pub async fn media_upload_count(&self, channel: &str) -> Result<i64, StoreError> {
        const SQL: &str =
            "SELECT COUNT(*) FROM media_uploads WHERE channel = $1 AND media_id IS NOT NULL";
        let n: i64 = with_pool!(self, |pool| {
            sqlx::query_scalar(SQL)
                .bind(channel)
                .fetch_one(pool)
                .await?
        });
        Ok(n)
    }
}
