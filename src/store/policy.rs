//! What the policy layer keeps: the queue (outbound rows in status `queued`, flushed by
//! [`Db::commit_turn`] and expired here), a contact's policy state, decisions taken again at
//! send time, and template statuses WhatsApp reported.

use chrono::{DateTime, Utc};

use super::{Db, OutboundRecord, StoreError, from_millis, outbound_kind, placeholders};
use crate::domain::{Contact, Outbound, PolicyState};

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

/// One message with everything the API shows about it (`GET /api/messages/{id}`).
#[derive(Debug, Clone, PartialEq)]
pub struct MessageDetail {
    pub id: i64,
    pub channel: String,
    pub wa_id: String,
    pub contact_id: i64,
    pub direction: String,
    pub kind: String,
    pub body: serde_json::Value,
    pub decision: Option<String>,
    pub reason: Option<String>,
    pub status: String,
    pub wamid: Option<String>,
    pub attempts: i64,
    pub error_code: Option<i64>,
    pub error: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// A template status from a webhook, overriding the registry file's.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateStatusRow {
    pub name: String,
    pub language: String,
    pub status: String,
    pub event: String,
    pub reason: Option<String>,
    pub updated_at: DateTime<Utc>,
}

type PolicyContactRaw = (i64, String, Option<String>, String, Option<i64>, String);

type DetailRaw = (
    i64,
    String,
    String,
    i64,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    Option<String>,
    i64,
    Option<i64>,
    Option<String>,
    Option<i64>,
    i64,
);

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

    /// Writes a contact's policy state alone (consent and window changes that arrive outside
    /// a turn: statuses, preferences, send errors). Callers hold the contact's lock.
    pub async fn save_contact_policy(
        &self,
        contact_id: i64,
        policy: &PolicyState,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        const SQL: &str = "UPDATE contacts SET policy = $1, updated_at = $2 WHERE id = $3";
        let json = serde_json::to_string(policy)?;
        let n = with_writer!(self, |pool| {
            sqlx::query(SQL)
                .bind(json)
                .bind(now.timestamp_millis())
                .bind(contact_id)
                .execute(pool)
                .await?
                .rows_affected()
        });
        if n == 0 {
            return Err(StoreError::UnknownContact { id: contact_id });
        }
        Ok(())
    }

    /// The window and consent part of some contacts (what the sender decides again with),
    /// by contact id.
    pub async fn contacts_for_policy(
        &self,
        ids: &[i64],
    ) -> Result<Vec<(i64, Contact)>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let list = placeholders(1, chunk.len());
            let sql = format!(
                "SELECT id, wa_id, name, attrs, last_customer_message_at, policy FROM contacts \
                WHERE id IN ({list})"
            );
            let rows: Vec<PolicyContactRaw> = with_pool!(self, |pool| {
                let mut q = sqlx::query_as(&sql);
                for id in chunk {
                    q = q.bind(*id);
                }
                q.fetch_all(pool).await?
            });
            for (id, wa_id, name, attrs, last, policy) in rows {
                let mut contact = Contact::new(wa_id);
                contact.name = name;
                contact.attrs = serde_json::from_str(&attrs)?;
                contact.last_customer_message_at = last
                    .map(|ms| from_millis(ms, "contacts.last_customer_message_at"))
                    .transpose()?;
                contact.policy = serde_json::from_str(&policy)?;
                out.push((id, contact));
            }
        }
        Ok(out)
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

    /// One message, in full.
    pub async fn message(&self, id: i64) -> Result<Option<MessageDetail>, StoreError> {
        const SQL: &str = "SELECT m.id, m.channel, c.wa_id, m.contact_id, m.direction, m.kind, \
                m.body, m.decision, m.reason, m.status, m.wamid, m.attempts, m.error_code, \
                m.error, m.expires_at, m.created_at \
            FROM messages m JOIN contacts c ON c.id = m.contact_id WHERE m.id = $1";
        const UPDATED: &str = "SELECT updated_at FROM messages WHERE id = $1";
        let row: Option<DetailRaw> = with_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(id)
            .fetch_optional(pool)
            .await?);
        let Some(r) = row else { return Ok(None) };
        let updated: Option<i64> = with_pool!(self, |pool| {
            sqlx::query_scalar(UPDATED).bind(id).fetch_one(pool).await?
        });
        Ok(Some(MessageDetail {
            id: r.0,
            channel: r.1,
            wa_id: r.2,
            contact_id: r.3,
            direction: r.4,
            kind: r.5,
            body: serde_json::from_str(&r.6)?,
            decision: r.7,
            reason: r.8,
            status: r.9,
            wamid: r.10,
            attempts: r.11,
            error_code: r.12,
            error: r.13,
            expires_at: r
                .14
                .map(|t| from_millis(t, "messages.expires_at"))
                .transpose()?,
            created_at: from_millis(r.15, "messages.created_at")?,
            updated_at: updated
                .map(|t| from_millis(t, "messages.updated_at"))
                .transpose()?,
        }))
    }

    /// Records a template status WhatsApp reported.
    pub async fn save_template_status(&self, row: &TemplateStatusRow) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO template_statuses (name, language, status, event, reason, \
                updated_at) VALUES ($1, $2, $3, $4, $5, $6) \
            ON CONFLICT (name, language) DO UPDATE SET status = excluded.status, \
                event = excluded.event, reason = excluded.reason, updated_at = excluded.updated_at";
        with_writer!(self, own(row), |pool| {
            sqlx::query(SQL)
                .bind(&row.name)
                .bind(&row.language)
                .bind(&row.status)
                .bind(&row.event)
                .bind(row.reason.as_deref())
                .bind(row.updated_at.timestamp_millis())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Every template status WhatsApp reported, oldest first.
    pub async fn template_statuses(&self) -> Result<Vec<TemplateStatusRow>, StoreError> {
        const SQL: &str = "SELECT name, language, status, event, reason, updated_at \
            FROM template_statuses ORDER BY updated_at, name, language";
        let rows: Vec<(String, String, String, String, Option<String>, i64)> =
            with_pool!(self, |pool| sqlx::query_as(SQL).fetch_all(pool).await?);
        rows.into_iter()
            .map(|(name, language, status, event, reason, at)| {
                Ok(TemplateStatusRow {
                    name,
                    language,
                    status,
                    event,
                    reason,
                    updated_at: from_millis(at, "template_statuses.updated_at")?,
                })
            })
            .collect()
    }

    /// Forgets every reported template status (after `templates sync` wrote fresh ones).
    pub async fn clear_template_statuses(&self) -> Result<(), StoreError> {
        with_writer!(self, |pool| {
            sqlx::query("DELETE FROM template_statuses")
                .execute(pool)
                .await?;
        });
        Ok(())
    }
}
