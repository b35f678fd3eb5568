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

impl Db {
    /// The lowest message id written at or after `cutoff`, by binary search over ids (ids
    /// grow with `created_at`); every message below it was written before `cutoff`. `None`
    /// when the log is empty.
    pub async fn history_boundary(&self, cutoff: DateTime<Utc>) -> Result<Option<i64>, StoreError> {
        let (min, max): (Option<i64>, Option<i64>) =
            with_pool!(self, |pool| sqlx::query_as(RANGE).fetch_one(pool).await?);
        let (Some(mut low), Some(max)) = (min, max) else {
            return Ok(None);
        };
        let cutoff = cutoff.timestamp_millis();
        // Invariant: every message below `low` is older than the cutoff; the first message
        // at or after `high` is not (or there is none: `high` is past the end).
        let mut high = max + 1;
        while low < high {
            let middle = low + (high - low) / 2;
            let probe: Option<(i64, i64)> = with_pool!(self, |pool| sqlx::query_as(PROBE)
                .bind(middle)
                .fetch_optional(pool)
                .await?);
            match probe {
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
    }
}
