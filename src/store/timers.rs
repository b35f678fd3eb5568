//! Durable timers (`timers`): what the scheduler fires ([`Db::due_timers`]) and when it
//! wakes next ([`Db::next_timer_at`]). Timers are created, replaced and deleted by a turn
//! ([`super::turn`]), the one that fires a timer included.

use chrono::{DateTime, Utc};

use super::db::Db;
use super::db::with_pool;
use super::error::StoreError;
use super::sql::from_millis;

/// A timer to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTimer {
    pub due_at: DateTime<Utc>,
    pub payload: serde_json::Value,
}

/// A stored timer, with the contact it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct TimerRow {
    pub id: i64,
    pub channel: String,
    pub wa_id: String,
    pub contact_id: i64,
    pub due_at: DateTime<Utc>,
    pub payload: serde_json::Value,
}

// A row as the database returns it.
type TimerRaw = (i64, String, String, i64, i64, String);

impl Db {
    /// Timers due at or before `now`, oldest first (ties by id), at most `limit`.
    pub async fn due_timers(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<TimerRow>, StoreError> {
        const SQL: &str = "SELECT t.id, c.channel, c.wa_id, t.contact_id, t.due_at, t.payload \
            FROM timers t JOIN contacts c ON c.id = t.contact_id \
            WHERE t.due_at <= $1 \
            ORDER BY t.due_at, t.id \
            LIMIT $2";
        let rows: Vec<TimerRaw> = with_pool!(self, |pool| {
            sqlx::query_as(SQL)
                .bind(now.timestamp_millis())
                .bind(limit.max(0))
                .fetch_all(pool)
                .await?
        });
        rows.into_iter()
            .map(|(id, channel, wa_id, contact_id, due_at, payload)| {
                Ok(TimerRow {
                    id,
                    channel,
                    wa_id,
                    contact_id,
                    due_at: from_millis(due_at, "timers.due_at")?,
                    payload: serde_json::from_str(&payload)?,
                })
            })
            .collect()
    }

    /// The earliest pending timer's due time, so the scheduler can sleep until then.
    pub async fn next_timer_at(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        const SQL: &str = "SELECT MIN(due_at) FROM timers";
        let at: Option<i64> =
            with_pool!(self, |pool| sqlx::query_scalar(SQL).fetch_one(pool).await?);
        at.map(|ms| from_millis(ms, "timers.due_at")).transpose()
    }

    /// Whether the timer `id` is still pending (not fired, not replaced by a turn): checked
    /// under the contact's lease before its turn runs, so an instance that read it before
    /// another fired it does not run its flow again.
    pub async fn timer_pending(&self, id: i64) -> Result<bool, StoreError> {
        const SQL: &str = "SELECT COUNT(*) FROM timers WHERE id = $1";
        let n: i64 = with_pool!(self, |pool| sqlx::query_scalar(SQL)
            .bind(id)
            .fetch_one(pool)
            .await?);
        Ok(n > 0)
    }
}
