//! Pruning the message history older than the `retention` setting.
//!
//! What goes: messages (both directions) written before the cutoff whose delivery is over,
//! that is every status but `pending`, `sending` and `queued` (the outbox's and the
//! queue's work is never pruned, however old), and the admin API's idempotency keys
//! (`api_requests`) of the same age. What stays: contacts, their sessions and variables,
//! timers, campaign definitions, runs and ledgers (a pruned campaign message leaves its
//! ledger row with `message_id` NULL), split assignments. The processed inbox has its own,
//! shorter pruning ([`super::INBOX_RETENTION`]).
//!
//! Every statement is O(log n) in the size of the history: message ids grow with time (the
//! log's order), so the last id written before the cutoff is found by a binary search over
//! the primary key ([`Db::history_boundary`]), and each batch deletes the lowest ids below
//! it. No index on `created_at` is needed, so the hot path writes none.
//!
//! Customers' files go with their messages: a `media` row below the same kind of boundary
//! (its own ids grow with time too) whose message was pruned and whose flow was told
//! ([`Db::prune_media`]; a download still pending, or a flow not yet told, stays). The
//! bytes are kept by content, so one file may serve several rows: the caller deletes a
//! file from the media store only when no row names it any more and no pending download
//! may be storing it ([`Db::media_file_in_use`]).

use chrono::{DateTime, Utc};

use super::db::{Db, with_pool, with_writer};
use super::error::StoreError;

/// The log's first and last ids (each subquery one step down the primary key).
const RANGE: &str = "SELECT (SELECT MIN(id) FROM messages), (SELECT MAX(id) FROM messages)";
/// The first message at or after an id (a step of the binary search).
const PROBE: &str = "SELECT id, created_at FROM messages WHERE id >= $1 ORDER BY id LIMIT 1";
/// One batch: settled messages below the boundary, lowest ids first. Messages still to be
/// delivered or decided (`pending`, `sending`, `queued`) are never pruned.
const PRUNE: &str = "DELETE FROM messages WHERE id IN (SELECT id FROM messages \
    WHERE id < $1 AND created_at < $2 AND status NOT IN ('pending', 'sending', 'queued') \
    ORDER BY id LIMIT $3)";

/// The media rows' first and last ids.
const MEDIA_RANGE: &str = "SELECT (SELECT MIN(id) FROM media), (SELECT MAX(id) FROM media)";
/// The first media row at or after an id.
const MEDIA_PROBE: &str = "SELECT id, created_at FROM media WHERE id >= $1 ORDER BY id LIMIT 1";
/// One batch of media rows below the boundary: told to their flow (`notified`), and whose
/// message is gone (found by the inbound wamid's unique index). Answers the deleted rows'
/// store keys.
const PRUNE_MEDIA: &str = "DELETE FROM media WHERE id IN (SELECT id FROM media \
    WHERE id < $1 AND created_at < $2 AND notified = 1 AND NOT EXISTS (SELECT 1 FROM messages \
        WHERE messages.direction = 'in' AND messages.channel = media.channel \
        AND messages.wamid = media.wamid) \
    ORDER BY id LIMIT $3) RETURNING store_key";
/// A row that still names a file.
const FILE_NAMED: &str = "SELECT id FROM media WHERE store_key = $1 LIMIT 1";
/// A download not yet over whose webhook gave this SHA-256 (base64, or hex): it may be
/// storing this very file now.
const FILE_COMING: &str = "SELECT id FROM media WHERE notified = 0 AND status = 'pending' AND sha256 IN ($1, $2, $3, $4) \
        LIMIT 1";

/// What one batch of [`Db::prune_media`] deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrunedMedia {
    pub rows: u64,
    /// The store keys the deleted rows named (a file may be named twice, or by rows that
    /// stay).
    pub store_keys: Vec<String>,
}

impl Db {
    /// The lowest message id written at or after `cutoff`, by binary search over ids (ids
    /// grow with `created_at`); every message below it was written before `cutoff`. `None`
    /// when the log is empty.
    pub async fn history_boundary(&self, cutoff: DateTime<Utc>) -> Result<Option<i64>, StoreError> {
        self.id_boundary(RANGE, PROBE, cutoff).await
    }

    /// [`Db::history_boundary`] for the `media` rows.
    pub async fn media_boundary(&self, cutoff: DateTime<Utc>) -> Result<Option<i64>, StoreError> {
        self.id_boundary(MEDIA_RANGE, MEDIA_PROBE, cutoff).await
    }

    /// The lowest id of a table written at or after `cutoff`, by binary search with `range`
    /// (its first and last ids) and `probe` (the first row at or after an id).
    async fn id_boundary(
        &self,
        range: &'static str,
        probe: &'static str,
        cutoff: DateTime<Utc>,
    ) -> Result<Option<i64>, StoreError> {
        let (min, max): (Option<i64>, Option<i64>) =
            with_pool!(self, |pool| sqlx::query_as(range).fetch_one(pool).await?);
        let (Some(mut low), Some(max)) = (min, max) else {
            return Ok(None);
        };
        let cutoff = cutoff.timestamp_millis();
        // Invariant: every message below `low` is older than the cutoff; the first message
        // at or after `high` is not (or there is none: `high` is past the end).
        let mut high = max + 1;
        while low < high {
            let middle = low + (high - low) / 2;
            let found: Option<(i64, i64)> = with_pool!(self, |pool| sqlx::query_as(probe)
                .bind(middle)
                .fetch_optional(pool)
                .await?);
            match found {
                Some((id, created_at)) if created_at < cutoff => low = id + 1,
                _ => high = middle,
            }
        }
        Ok(Some(low))
    }

    /// Deletes at most `limit` settled messages with an id below `boundary` (from
    /// [`Db::history_boundary`]) written before `cutoff`, lowest ids first; returns how many.
    pub async fn prune_messages(
        &self,
        boundary: i64,
        cutoff: DateTime<Utc>,
        limit: i64,
    ) -> Result<u64, StoreError> {
        Ok(with_writer!(self, |pool| {
            sqlx::query(PRUNE)
                .bind(boundary)
                .bind(cutoff.timestamp_millis())
                .bind(limit.max(0))
                .execute(pool)
                .await?
                .rows_affected()
        }))
    }

    /// Deletes at most `limit` media rows with an id below `boundary` (from
    /// [`Db::media_boundary`]) written before `cutoff` whose message is gone and whose flow
    /// was told, lowest ids first; the files stay for the caller to judge
    /// ([`Db::media_file_in_use`]).
    pub async fn prune_media(
        &self,
        boundary: i64,
        cutoff: DateTime<Utc>,
        limit: i64,
    ) -> Result<PrunedMedia, StoreError> {
        let keys: Vec<Option<String>> = with_writer!(self, |pool| {
            sqlx::query_scalar(PRUNE_MEDIA)
                .bind(boundary)
                .bind(cutoff.timestamp_millis())
                .bind(limit.max(0))
                .fetch_all(pool)
                .await?
        });
        let rows = keys.len() as u64;
        let mut store_keys: Vec<String> = keys.into_iter().flatten().collect();
        store_keys.sort();
        store_keys.dedup();
        Ok(PrunedMedia { rows, store_keys })
    }

    /// Whether the file `store_key` is still wanted: a row names it, or a pending download
    /// was announced with its SHA-256 (`sha256_forms`: the webhook's base64 and hex, each way written).
    pub async fn media_file_in_use(
        &self,
        store_key: &str,
        sha256_forms: [&str; 4],
    ) -> Result<bool, StoreError> {
        let named: Option<i64> = with_pool!(self, |pool| {
            sqlx::query_scalar(FILE_NAMED)
                .bind(store_key)
                .fetch_optional(pool)
                .await?
        });
        if named.is_some() {
            return Ok(true);
        }
        let [standard, url_safe, hex, upper] = sha256_forms;
        let coming: Option<i64> = with_pool!(self, |pool| {
            sqlx::query_scalar(FILE_COMING)
                .bind(standard)
                .bind(url_safe)
                .bind(hex)
                .bind(upper)
                .fetch_optional(pool)
                .await?
        });
        Ok(coming.is_some())
    }

    /// Deletes the admin API's idempotency keys recorded before `cutoff`; returns how many.
    pub async fn prune_api_requests(&self, cutoff: DateTime<Utc>) -> Result<u64, StoreError> {
        const SQL: &str = "DELETE FROM api_requests WHERE created_at < $1";
        Ok(with_writer!(self, |pool| {
            sqlx::query(SQL)
                .bind(cutoff.timestamp_millis())
                .execute(pool)
                .await?
                .rows_affected()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::outbox::tests::plan;

    /// Pruning costs the same with a year of history as with a day's: every statement
    /// reaches its rows through the primary key, never by scanning the log.
    #[tokio::test]
    async fn pruning_statements_use_the_primary_key() {
        let db = Db::connect("sqlite::memory:").await.unwrap();
        db.migrate().await.unwrap();
        for (name, sql) in [("range", RANGE), ("probe", PROBE), ("prune", PRUNE)] {
            let plan = plan(&db, sql).await;
            // `SCAN CONSTANT ROW` is the outer SELECT of two scalar subqueries, no table.
            assert!(
                !plan
                    .lines()
                    .any(|l| l.trim_start().starts_with("SCAN messages")),
                "{name} scans the log:\n{plan}"
            );
            assert!(plan.contains("SEARCH messages"), "{name}:\n{plan}");
        }
        // The files' rows: by the primary key, the inbound wamid's index, the store key's,
        // and the pending downloads' (`media_due`, the few rows not yet told).
        for (name, sql) in [
            ("media range", MEDIA_RANGE),
            ("media probe", MEDIA_PROBE),
            ("media prune", PRUNE_MEDIA),
            ("file named", FILE_NAMED),
            ("file coming", FILE_COMING),
        ] {
            let plan = plan(&db, sql).await;
            assert!(
                !plan.lines().any(|l| {
                    let l = l.trim_start();
                    l.starts_with("SCAN messages") || l == "SCAN media"
                }),
                "{name} scans a table:\n{plan}"
            );
        }
    }
}
