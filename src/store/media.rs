//! Files customers send (`media`), and the server's generated secrets (`server_secrets`).
//!
//! A row's life: `pending` (written by [`Db::commit_turn`] with the customer's message) ->
//! claimed with a lease by the download worker ([`Db::claim_media`]) -> retried later
//! ([`Db::media_retry`]) or finished, `ok` with where the bytes are or `failed` with the
//! reason ([`Db::media_finished`]) -> `notified` once the contact's flow was told
//! ([`Db::media_notified`]). A claim whose lease ran out (its worker died) is claimed again,
//! so a crash repeats at most one attempt or one notification, which the flow ignores when
//! it has moved on.

use chrono::{DateTime, Utc};

use super::db::{Db, with_pool, with_writer};
use super::error::StoreError;

/// One customer file, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaRow {
    pub id: i64,
    pub contact_id: i64,
    pub channel: String,
    /// The contact's key, for the turn that tells its flow.
    pub wa_id: String,
    /// The customer's message.
    pub wamid: String,
    pub kind: String,
    /// WhatsApp's media id; `None` for a file given directly (a conversation test).
    pub provider_id: Option<String>,
    pub mime: Option<String>,
    /// As the webhook gave it.
    pub sha256: Option<String>,
    pub caption: Option<String>,
    pub filename: Option<String>,
    /// `pending`, `ok` or `failed`.
    pub status: String,
    pub error: Option<String>,
    pub size: Option<i64>,
    pub store_key: Option<String>,
    pub attempts: i64,
}

/// How a download ended.
#[derive(Debug, Clone, PartialEq)]
pub enum MediaFinish {
    /// Stored under `store_key`.
    Ok {
        size: i64,
        mime: Option<String>,
        store_key: String,
    },
    /// Refused or given up, with the reason (`sha256_mismatch`, `too_large`, …).
    Failed { error: String },
}

/// A file given directly, already in the media store (a conversation test's `user: {image}`).
#[derive(Debug, Clone)]
pub struct LocalMedia<'a> {
    pub channel: &'a str,
    pub wa_id: &'a str,
    pub wamid: &'a str,
    pub kind: &'a str,
    pub mime: &'a str,
    pub caption: Option<&'a str>,
    pub filename: Option<&'a str>,
    pub size: i64,
    pub store_key: &'a str,
    /// Why it is refused (`too_large`); `None` keeps it as `ok`.
    pub error: Option<&'a str>,
}

type MediaRaw = (
    i64,
    i64,
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
    Option<String>,
    Option<i64>,
    Option<String>,
    i64,
);

/// The columns of a [`MediaRaw`], the contact's key among them.
const COLUMNS: &str = "id, contact_id, channel, \
    (SELECT wa_id FROM contacts WHERE contacts.id = media.contact_id), wamid, kind, \
    provider_id, mime, sha256, caption, filename, status, error, size, store_key, attempts";

fn row(raw: MediaRaw) -> MediaRow {
    let (
        id,
        contact_id,
        channel,
        wa_id,
        wamid,
        kind,
        provider_id,
        mime,
        sha256,
        caption,
        filename,
        status,
        error,
        size,
        store_key,
        attempts,
    ) = raw;
    MediaRow {
        id,
        contact_id,
        channel,
        wa_id,
        wamid,
        kind,
        provider_id,
        mime,
        sha256,
        caption,
        filename,
        status,
        error,
        size,
        store_key,
        attempts,
    }
}

/// Rows the worker may claim at `$1`: not yet told to their flow, due, and not under
/// another worker's lease.
const CLAIMABLE: &str =
    "notified = 0 AND next_attempt_at <= $1 AND (lease_until IS NULL OR lease_until <= $1)";

impl Db {
    /// Claims up to `limit` due media rows until `lease_until`, oldest due first. On
    /// PostgreSQL rows another instance is claiming are skipped (`SKIP LOCKED`).
    pub async fn claim_media(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<MediaRow>, StoreError> {
        let lock = if self.is_postgres() {
            " FOR UPDATE SKIP LOCKED"
        } else {
            ""
        };
        let sql = format!(
            "UPDATE media SET lease_until = $2 WHERE {CLAIMABLE} AND id IN \
                (SELECT id FROM media WHERE {CLAIMABLE} \
                ORDER BY next_attempt_at, id LIMIT $3{lock}) \
            RETURNING {COLUMNS}"
        );
        let (now, until) = (now.timestamp_millis(), lease_until.timestamp_millis());
        let rows: Vec<MediaRaw> = with_writer!(self, own(sql), |pool| {
            sqlx::query_as(&sql)
                .bind(now)
                .bind(until)
                .bind(limit.max(0))
                .fetch_all(pool)
                .await?
        });
        let mut rows: Vec<MediaRow> = rows.into_iter().map(row).collect();
        rows.sort_by_key(|r| r.id);
        Ok(rows)
    }

    /// An attempt failed and another follows at `next_attempt_at`: the lease ends, the
    /// attempt is counted and its problem kept.
    pub async fn media_retry(
        &self,
        id: i64,
        error: &str,
        next_attempt_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        const SQL: &str = "UPDATE media SET attempts = attempts + 1, error = $2, \
            next_attempt_at = $3, lease_until = NULL, updated_at = $4 WHERE id = $1";
        with_writer!(self, own(error), |pool| {
            sqlx::query(SQL)
                .bind(id)
                .bind(&error)
                .bind(next_attempt_at.timestamp_millis())
                .bind(now.timestamp_millis())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// The download is over (stored, or refused for good). The lease stays: the same
    /// worker tells the flow next, and after a crash the row is claimed again for that.
    pub async fn media_finished(
        &self,
        id: i64,
        finish: &MediaFinish,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        const SQL: &str = "UPDATE media SET status = $2, error = $3, size = $4, \
            mime = COALESCE($5, mime), store_key = $6, attempts = attempts + 1, \
            next_attempt_at = $7, updated_at = $7 WHERE id = $1";
        let (status, error, size, mime, key) = match finish.clone() {
            MediaFinish::Ok {
                size,
                mime,
                store_key,
            } => ("ok", None, Some(size), mime, Some(store_key)),
            MediaFinish::Failed { error } => ("failed", Some(error), None, None, None),
        };
        with_writer!(self, |pool| {
            sqlx::query(SQL)
                .bind(id)
                .bind(status)
                .bind(&error)
                .bind(size)
                .bind(&mime)
                .bind(&key)
                .bind(now.timestamp_millis())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// The contact's flow was told how the download ended: the row leaves the worker.
    pub async fn media_notified(&self, id: i64, now: DateTime<Utc>) -> Result<(), StoreError> {
        const SQL: &str =
            "UPDATE media SET notified = 1, lease_until = NULL, updated_at = $2 WHERE id = $1";
        with_writer!(self, |pool| {
            sqlx::query(SQL)
                .bind(id)
                .bind(now.timestamp_millis())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// One media row by id (what `GET /media/{id}` serves).
    pub async fn media(&self, id: i64) -> Result<Option<MediaRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM media WHERE id = $1");
        let raw: Option<MediaRaw> = with_pool!(self, |pool| {
            sqlx::query_as(&sql).bind(id).fetch_optional(pool).await?
        });
        Ok(raw.map(row))
    }

    /// A contact's media rows, oldest first (for the conversation history).
    pub async fn contact_media(&self, contact_id: i64) -> Result<Vec<MediaRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM media WHERE contact_id = $1 ORDER BY id");
        let raw: Vec<MediaRaw> = with_pool!(self, |pool| {
            sqlx::query_as(&sql)
                .bind(contact_id)
                .fetch_all(pool)
                .await?
        });
        Ok(raw.into_iter().map(row).collect())
    }

    /// Records a file given directly (already stored) for the contact's message, as `ok`
    /// and told (the caller tells the flow itself); returns its id. The message must be
    /// stored already.
    pub async fn insert_local_media(
        &self,
        media: &LocalMedia<'_>,
        now: DateTime<Utc>,
    ) -> Result<i64, StoreError> {
        const SQL: &str = "INSERT INTO media (contact_id, channel, wamid, kind, mime, caption, \
                filename, status, size, store_key, notified, next_attempt_at, created_at, \
                updated_at, error) \
            SELECT id, $1, $3, $4, $5, $6, $7, CASE WHEN $11 IS NULL THEN 'ok' ELSE 'failed' END, \
                $8, CASE WHEN $11 IS NULL THEN $9 END, 1, $10, $10, $10, $11 \
            FROM contacts WHERE channel = $1 AND wa_id = $2 \
            RETURNING id";
        let m = media;
        let (channel, wa_id, wamid, kind, mime, store_key) =
            (m.channel, m.wa_id, m.wamid, m.kind, m.mime, m.store_key);
        let (caption, filename) = (
            m.caption.map(str::to_string),
            m.filename.map(str::to_string),
        );
        let size = m.size;
        let error = m.error.map(str::to_string);
        let id: Option<i64> = with_writer!(
            self,
            own(channel, wa_id, wamid, kind, mime, store_key),
            |pool| {
                sqlx::query_scalar(SQL)
                    .bind(&channel)
                    .bind(&wa_id)
                    .bind(&wamid)
                    .bind(&kind)
                    .bind(&mime)
                    .bind(&caption)
                    .bind(&filename)
                    .bind(size)
                    .bind(&store_key)
                    .bind(now.timestamp_millis())
                    .bind(&error)
                    .fetch_optional(pool)
                    .await?
            }
        );
        id.ok_or_else(|| StoreError::Corrupt(format!("no contact {wa_id} on {channel}")))
    }

    /// The server secret `name`: the one stored, else `candidate`, stored now (the first
    /// instance to ask wins, and every instance reads the same value).
    pub async fn server_secret(
        &self,
        name: &str,
        candidate: &str,
        now: DateTime<Utc>,
    ) -> Result<String, StoreError> {
        const INSERT: &str = "INSERT INTO server_secrets (name, value, created_at) \
            VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING";
        const SELECT: &str = "SELECT value FROM server_secrets WHERE name = $1";
        let value: String = with_writer!(self, own(name, candidate), |pool| {
            sqlx::query(INSERT)
                .bind(&name)
                .bind(&candidate)
                .bind(now.timestamp_millis())
                .execute(&mut *pool)
                .await?;
            sqlx::query_scalar(SELECT)
                .bind(&name)
                .fetch_one(&mut *pool)
                .await?
        });
        Ok(value)
    }
}
