//! Conversations: what the engine loads to handle an event for a contact (its contact row
//! and session, [`Db::load_conversation`]), the message log as the API and `chat` read it
//! ([`Db::messages`], [`Db::message`]), `/reset`, and the flow versions sessions are
//! pinned to. Tables read: `contacts`, `sessions`, `messages`, `timers`; written:
//! `sessions`, `timers` (reset) and `flow_versions`. A turn's writes are [`super::turn`]'s.

use chrono::{DateTime, Utc};
use sqlx::Connection as _;

use super::db::{Backend, Db};
use super::db::{with_pool, with_writer};
use super::error::StoreError;
use super::sql::from_millis;
use crate::domain::Contact;

/// What the engine needs to handle one event for a contact.
#[derive(Debug, Clone)]
pub struct Conversation {
    /// `None` until the contact's first turn is committed.
    pub contact_id: Option<i64>,
    pub contact: Contact,
    pub session: Option<SessionRow>,
    /// Whether the contact has queued messages (to flush when the customer writes).
    pub has_queued: bool,
    /// Whether the contact has timers (a turn that sets none need not clear them).
    pub has_timers: bool,
}

/// A contact's place in a flow.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRow {
    pub flow_id: String,
    /// The flow version the session is pinned to (see [`Db::flow_version`]).
    pub flow_version: String,
    pub step: String,
    pub state: serde_json::Value,
    pub updated_at: DateTime<Utc>,
}

/// One entry of the message log.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageRow {
    pub id: i64,
    /// `in` or `out`.
    pub direction: String,
    pub wamid: Option<String>,
    pub kind: String,
    /// The [`Inbound`](crate::domain::Inbound) or [`Outbound`](crate::domain::Outbound), serialized.
    pub body: serde_json::Value,
    pub decision: Option<String>,
    pub reason: Option<String>,
    /// `received` for inbound messages; the delivery status for outbound ones.
    pub status: String,
    pub created_at: DateTime<Utc>,
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

// Rows as the database returns them.
type ConversationRaw = (
    i64,
    Option<String>,
    String,
    String,
    Option<String>,
    Option<i64>,
    String,
    bool,
    bool,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
);

type MessageRaw = (
    i64,
    String,
    Option<String>,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    i64,
);

/// [`Db::load_conversation`]'s query.
pub(super) const LOAD_CONVERSATION: &str = "SELECT c.id, c.name, c.tags, c.attrs, c.timezone, \
            c.last_customer_message_at, c.policy, \
            EXISTS (SELECT 1 FROM messages q WHERE q.contact_id = c.id \
                AND q.status = 'queued'), \
            EXISTS (SELECT 1 FROM timers t WHERE t.contact_id = c.id), \
            s.flow_id, s.flow_version, s.step, s.state, s.updated_at \
        FROM contacts c LEFT JOIN sessions s ON s.contact_id = c.id \
        WHERE c.channel = $1 AND c.wa_id = $2";

impl Db {
    /// Loads the contact and its session; a contact never seen gets `contact_id: None` and a
    /// fresh [`Contact`], so the engine handles first and later messages alike.
    pub async fn load_conversation(
        &self,
        channel: &str,
        wa_id: &str,
    ) -> Result<Conversation, StoreError> {
        const SQL: &str = LOAD_CONVERSATION;
        let row: Option<ConversationRaw> = match &self.backend {
            Backend::Sqlite(sqlite) => {
                sqlite
                    .readers
                    .query_optional(SQL, &[&channel, &wa_id], |row| {
                        Ok(ConversationRaw::try_from(row)?)
                    })?
            }
            Backend::Postgres(postgres) => {
                sqlx::query_as(SQL)
                    .bind(channel)
                    .bind(wa_id)
                    .fetch_optional(&postgres.pool)
                    .await?
            }
        };
        let Some((
            id,
            name,
            tags,
            attrs,
            timezone,
            last,
            policy,
            has_queued,
            has_timers,
            flow_id,
            version,
            step,
            state,
            at,
        )) = row
        else {
            return Ok(Conversation {
                contact_id: None,
                contact: Contact::new(wa_id),
                session: None,
                has_queued: false,
                has_timers: false,
            });
        };
        let contact = Contact {
            wa_id: wa_id.into(),
            name,
            tags: serde_json::from_str(&tags)?,
            attrs: serde_json::from_str(&attrs)?,
            timezone,
            last_customer_message_at: last
                .map(|ms| from_millis(ms, "contacts.last_customer_message_at"))
                .transpose()?,
            policy: serde_json::from_str(&policy)?,
        };
        let session = match (flow_id, version, step, state, at) {
            (Some(flow_id), Some(flow_version), Some(step), Some(state), Some(at)) => {
                Some(SessionRow {
                    flow_id,
                    flow_version,
                    step,
                    state: serde_json::from_str(&state)?,
                    updated_at: from_millis(at, "sessions.updated_at")?,
                })
            }
            _ => None,
        };
        Ok(Conversation {
            contact_id: Some(id),
            contact,
            session,
            has_queued,
            has_timers,
        })
    }

    /// The last `limit` messages of a contact, oldest first.
    pub async fn messages(
        &self,
        channel: &str,
        wa_id: &str,
        limit: i64,
    ) -> Result<Vec<MessageRow>, StoreError> {
        const SQL: &str = "SELECT m.id, m.direction, m.wamid, m.kind, m.body, m.decision, \
                m.reason, m.status, m.created_at \
            FROM messages m JOIN contacts c ON c.id = m.contact_id \
            WHERE c.channel = $1 AND c.wa_id = $2 \
            ORDER BY m.id DESC \
            LIMIT $3";
        let rows: Vec<MessageRaw> = with_pool!(self, |pool| {
            sqlx::query_as(SQL)
                .bind(channel)
                .bind(wa_id)
                .bind(limit.max(0))
                .fetch_all(pool)
                .await?
        });
        rows.into_iter()
            .rev()
            .map(
                |(id, direction, wamid, kind, body, decision, reason, status, created_at)| {
                    Ok(MessageRow {
                        id,
                        direction,
                        wamid,
                        kind,
                        body: serde_json::from_str(&body)?,
                        decision,
                        reason,
                        status,
                        created_at: from_millis(created_at, "messages.created_at")?,
                    })
                },
            )
            .collect()
    }

    /// One message, in full.
    pub async fn message(&self, id: i64) -> Result<Option<MessageDetail>, StoreError> {
        let sql = format!(
            "SELECT {DETAIL_COLUMNS} FROM messages m JOIN contacts c ON c.id = m.contact_id \
            WHERE m.id = $1"
        );
        let row: Option<DetailRow> = with_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(pool)
            .await?);
        row.map(DetailRow::detail).transpose()
    }

    /// Forgets the contact's session and timers (the `/reset` of `flowgate chat`); the contact
    /// and the message log stay, so the history still shows what happened.
    pub async fn reset_conversation(&self, channel: &str, wa_id: &str) -> Result<(), StoreError> {
        const CONTACT: &str = "(SELECT id FROM contacts WHERE channel = $1 AND wa_id = $2)";
        let delete_session = format!("DELETE FROM sessions WHERE contact_id IN {CONTACT}");
        let delete_timers = format!("DELETE FROM timers WHERE contact_id IN {CONTACT}");
        with_writer!(self, own(channel, wa_id), |pool| {
            let mut tx = pool.begin().await?;
            for sql in [&delete_session, &delete_timers] {
                sqlx::query(sql)
                    .bind(channel.to_string())
                    .bind(wa_id.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Stores the bundle a flow version was compiled from, so a session pinned to it survives
    /// a reload and a restart. A version is immutable: saving it again keeps the first bundle.
    pub async fn save_flow_version(
        &self,
        flow_id: &str,
        version: &str,
        bundle: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO flow_versions (flow_id, version, bundle, created_at) \
            VALUES ($1, $2, $3, $4) \
            ON CONFLICT (flow_id, version) DO NOTHING";
        with_writer!(self, own(flow_id, version, bundle), |pool| {
            sqlx::query(SQL)
                .bind(flow_id)
                .bind(version)
                .bind(bundle)
                .bind(now.timestamp_millis())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// The bundle of a flow version, if it was ever saved.
    pub async fn flow_version(
        &self,
        flow_id: &str,
        version: &str,
    ) -> Result<Option<String>, StoreError> {
        const SQL: &str = "SELECT bundle FROM flow_versions WHERE flow_id = $1 AND version = $2";
        Ok(with_pool!(self, |pool| {
            sqlx::query_scalar(SQL)
                .bind(flow_id)
                .bind(version)
                .fetch_optional(pool)
                .await?
        }))
    }
}

/// The columns of a [`MessageDetail`], for `SELECT … FROM messages m JOIN contacts c`.
pub(super) const DETAIL_COLUMNS: &str = "m.id, m.channel, c.wa_id, m.contact_id, m.direction, \
    m.kind, m.body, m.decision, m.reason, m.status, m.wamid, m.attempts, m.error_code, \
    m.error, m.expires_at, m.created_at, m.updated_at";

/// A row of [`DETAIL_COLUMNS`] (17 columns, more than a tuple decodes), read as it is
/// fetched; a row that does not read fails alone, at [`DetailRow::detail`].
#[derive(Debug)]
pub(super) struct DetailRow(Result<MessageDetail, StoreError>);

super::sql::from_row_on_every_backend!(DetailRow, |row| Ok(Self(detail_of(row))));

impl DetailRow {
    pub(super) fn detail(self) -> Result<MessageDetail, StoreError> {
        self.0
    }
}

fn detail_of<'r, R>(r: &'r R) -> Result<MessageDetail, StoreError>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    &'r str: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let time = |i: usize, column: &str| -> Result<Option<DateTime<Utc>>, StoreError> {
        r.try_get::<Option<i64>, _>(i)?
            .map(|t| from_millis(t, column))
            .transpose()
    };
    Ok(MessageDetail {
        id: r.try_get(0)?,
        channel: r.try_get(1)?,
        wa_id: r.try_get(2)?,
        contact_id: r.try_get(3)?,
        direction: r.try_get(4)?,
        kind: r.try_get(5)?,
        body: serde_json::from_str(r.try_get::<&str, _>(6)?)?,
        decision: r.try_get(7)?,
        reason: r.try_get(8)?,
        status: r.try_get(9)?,
        wamid: r.try_get(10)?,
        attempts: r.try_get(11)?,
        error_code: r.try_get(12)?,
        error: r.try_get(13)?,
        expires_at: time(14, "messages.expires_at")?,
        created_at: from_millis(r.try_get(15)?, "messages.created_at")?,
        updated_at: time(16, "messages.updated_at")?,
    })
}
