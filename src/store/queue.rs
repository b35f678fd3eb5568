//! The queue: outbound rows of `messages` in status `queued`, which the policy held back
//! (outside the window, quiet hours). A turn flushes them ([`Db::queued_messages`], then
//! [`super::turn`] writes their new decision); the scheduler expires them
//! ([`Db::due_expiries`], [`Db::expire_message`]); the sender decides a claimed message
//! again at send time ([`Db::redecide_claimed`]), which may queue it.

use chrono::{DateTime, Utc};

use super::db::Db;
use super::db::{with_pool, with_writer};
use super::error::StoreError;
use super::sql::{from_millis, outbound_kind};
use super::turn::OutboundRecord;
use crate::domain::Outbound;

/// Queued messages one turn flushes at most.
pub const FLUSH_LIMIT: i64 = 1000;

/// A queued message, as the flush needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedMessage {
    pub id: i64,
    pub message: Outbound,
    /// When the message was first decided (its row's creation).
    pub queued_at: DateTime<Utc>,
    /// When it expires: `queue_ttl` after it was queued, which may be later than
    /// `queued_at` (a message queued at send time).
    pub expires_at: Option<DateTime<Utc>>,
}

/// A queued message whose time ran out.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpiringMessage {
    pub id: i64,
    pub channel: String,
    pub wa_id: String,
    pub contact_id: i64,
    pub message: Outbound,
    pub queued_at: DateTime<Utc>,
}

impl Db {
    /// The contact's queued messages, oldest first.
    ///
    /// At most [`FLUSH_LIMIT`] at a time, so one turn stays within SQLite's parameter limit;
    /// the rest leave with the customer's next message.
    pub async fn queued_messages(&self, contact_id: i64) -> Result<Vec<QueuedMessage>, StoreError> {
        const SQL: &str = "SELECT id, body, created_at, expires_at FROM messages \
            WHERE contact_id = $1 AND status = 'queued' ORDER BY id LIMIT $2";
        let rows: Vec<(i64, String, i64, Option<i64>)> = with_pool!(self, |pool| {
            sqlx::query_as(SQL)
                .bind(contact_id)
                .bind(FLUSH_LIMIT)
                .fetch_all(pool)
                .await?
        });
        rows.into_iter()
            .map(|(id, body, created, expires)| {
                Ok(QueuedMessage {
                    id,
                    message: serde_json::from_str(&body)?,
                    queued_at: from_millis(created, "messages.created_at")?,
                    expires_at: expires
                        .map(|t| from_millis(t, "messages.expires_at"))
                        .transpose()?,
                })
            })
            .collect()
    }

    /// Queued messages whose `expires_at` is at or before `now`, oldest first.
    pub async fn due_expiries(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<ExpiringMessage>, StoreError> {
        const SQL: &str = "SELECT m.id, m.channel, c.wa_id, m.contact_id, m.body, m.created_at \
            FROM messages m JOIN contacts c ON c.id = m.contact_id \
            WHERE m.status = 'queued' AND m.expires_at <= $1 \
            ORDER BY m.expires_at, m.id LIMIT $2";
        let rows: Vec<(i64, String, String, i64, String, i64)> = with_pool!(self, |pool| {
            sqlx::query_as(SQL)
                .bind(now.timestamp_millis())
                .bind(limit.max(0))
                .fetch_all(pool)
                .await?
        });
        rows.into_iter()
            .map(|(id, channel, wa_id, contact_id, body, created)| {
                Ok(ExpiringMessage {
                    id,
                    channel,
                    wa_id,
                    contact_id,
                    message: serde_json::from_str(&body)?,
                    queued_at: from_millis(created, "messages.created_at")?,
                })
            })
            .collect()
    }

    /// Whether the contact wrote after message `id` was recorded (an inbound row with a
    /// higher id).
    pub async fn inbound_after(&self, contact_id: i64, id: i64) -> Result<bool, StoreError> {
        const SQL: &str = "SELECT EXISTS (SELECT 1 FROM messages \
            WHERE contact_id = $1 AND direction = 'in' AND id > $2)";
        Ok(with_pool!(self, |pool| {
            sqlx::query_scalar(SQL)
                .bind(contact_id)
                .bind(id)
                .fetch_one(pool)
                .await?
        }))
    }

    /// How many messages of `channel` wait in the queue.
    pub async fn queue_depth(&self, channel: &str) -> Result<i64, StoreError> {
        const SQL: &str = "SELECT COUNT(*) FROM messages WHERE channel = $1 AND status = 'queued'";
        Ok(with_pool!(self, |pool| {
            sqlx::query_scalar(SQL)
                .bind(channel)
                .fetch_one(pool)
                .await?
        }))
    }

    /// When the next queued message expires.
    pub async fn next_expiry_at(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        const SQL: &str = "SELECT MIN(expires_at) FROM messages WHERE status = 'queued'";
        let at: Option<i64> =
            with_pool!(self, |pool| sqlx::query_scalar(SQL).fetch_one(pool).await?);
        at.map(|ms| from_millis(ms, "messages.expires_at"))
            .transpose()
    }

    /// Marks a queued message `expired` with `reason`; `false` if it had left the queue.
    pub async fn expire_message(
        &self,
        id: i64,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE messages SET status = 'expired', decision = 'expired', \
                reason = $2, expires_at = NULL, updated_at = $3 \
            WHERE id = $1 AND status = 'queued'";
        let n = with_writer!(self, own(reason), |pool| {
            sqlx::query(SQL)
                .bind(id)
                .bind(reason)
                .bind(now.timestamp_millis())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(n > 0)
    }

    /// A claimed message decided again at send time: its new body, decision and status
    /// (`sending` to go on and send it, `pending` to send it at the next claim; `queued`,
    /// `skipped` give the claim up). Only the lease
    /// holder can do this; returns whether it did.
    pub async fn redecide_claimed(
        &self,
        id: i64,
        lease_owner: &str,
        record: &OutboundRecord,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let (message, decision) = (&record.message, &record.decision);
        const SQL: &str = "UPDATE messages SET kind = $1, body = $2, decision = $3, reason = $4, \
                status = $5, expires_at = $6, updated_at = $7, \
                lease_until = CASE WHEN $5 = 'sending' THEN lease_until END, \
                lease_owner = CASE WHEN $5 = 'sending' THEN lease_owner END \
            WHERE id = $8 AND status = 'sending' AND lease_owner = $9";
        let body = serde_json::to_string(message)?;
        let (kind, name, status) = (
            outbound_kind(&message.content),
            decision.name(),
            &*record.status,
        );
        let reason = decision.reason();
        let expires_at = record.expires_at.map(|t| t.timestamp_millis());
        let n = with_writer!(self, own(reason, status, lease_owner), |pool| {
            sqlx::query(SQL)
                .bind(kind)
                .bind(body)
                .bind(name)
                .bind(reason)
                .bind(status)
                .bind(expires_at)
                .bind(now.timestamp_millis())
                .bind(id)
                .bind(lease_owner)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(n > 0)
    }
}

// The operator's hand on the queue (the admin API's retry and cancel).
impl Db {
    /// A queued message decided again by an operator: its new body, decision, status and
    /// expiry, only if it is still queued; returns whether it was.
    pub async fn redecide_queued(
        &self,
        id: i64,
        record: &OutboundRecord,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE messages SET kind = $1, body = $2, decision = $3, reason = $4, \
                status = $5, expires_at = $6, next_attempt_at = $7, updated_at = $7 \
            WHERE id = $8 AND status = 'queued'";
        let body = serde_json::to_string(&record.message)?;
        let kind = outbound_kind(&record.message.content);
        let (name, reason) = (record.decision.name(), record.decision.reason());
        let status = &*record.status;
        let expires_at = record.expires_at.map(|t| t.timestamp_millis());
        let n = with_writer!(self, own(reason, status), |pool| {
            sqlx::query(SQL)
                .bind(kind)
                .bind(body)
                .bind(name)
                .bind(reason)
                .bind(status)
                .bind(expires_at)
                .bind(now.timestamp_millis())
                .bind(id)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(n > 0)
    }

    /// Takes a queued message out of the queue for good: status `cancelled`, decision
    /// `skipped` with `reason`; `false` if it had left the queue.
    pub async fn cancel_queued(
        &self,
        id: i64,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE messages SET status = 'cancelled', decision = 'skipped', \
                reason = $2, expires_at = NULL, updated_at = $3 \
            WHERE id = $1 AND status = 'queued'";
        let n = with_writer!(self, own(reason), |pool| {
            sqlx::query(SQL)
                .bind(id)
                .bind(reason)
                .bind(now.timestamp_millis())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(n > 0)
    }
}
