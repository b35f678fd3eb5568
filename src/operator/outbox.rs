//! The outbox and the queue: outbound messages with their decision, reason, status and
//! error; the messages waiting for the customer's window with their age and expiry; one
//! message; an operator's retry (decide again now) or cancel of a queued message.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{OperatorError, Paging, known_channel, next_cursor, seconds_until};
use crate::dispatch::Runtime;
use crate::domain::{Decision, Outbound};
use crate::policy::Policy;
use crate::store::{MessageDetail, OutboundFilter, OutboundRecord};

/// One message with its decision, reason and delivery state.
#[derive(Debug, Serialize, ToSchema)]
pub struct MessageItem {
    pub id: i64,
    pub channel: String,
    /// The contact's phone number or BSUID.
    pub contact: String,
    /// `in` or `out`.
    pub direction: String,
    /// `text`, `buttons`, `list`, `media` or `template`.
    pub kind: String,
    /// The policy's decision: `send`, `rewritten`, `queued`, `skipped`, `expired`, `failed`.
    pub decision: Option<String>,
    pub reason: Option<String>,
    /// `pending`, `sending`, `sent`, `delivered`, `read`, `failed`, `queued`, …
    pub status: String,
    pub attempts: i64,
    /// WhatsApp's error code, when it refused the message.
    pub error_code: Option<i64>,
    pub error: Option<String>,
    pub wamid: Option<String>,
    /// The message as stored (its content and origin; a rewrite keeps the `original`).
    #[schema(value_type = Object)]
    pub body: serde_json::Value,
    /// When a queued message expires.
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: Option<DateTime<Utc>>,
}

impl From<MessageDetail> for MessageItem {
    fn from(m: MessageDetail) -> Self {
        Self {
            id: m.id,
            channel: m.channel,
            contact: m.wa_id,
            direction: m.direction,
            kind: m.kind,
            decision: m.decision,
            reason: m.reason,
            status: m.status,
            attempts: m.attempts,
            error_code: m.error_code,
            error: m.error,
            wamid: m.wamid,
            body: m.body,
            expires_at: m.expires_at,
            created_at: m.created_at,
            updated_at: m.updated_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OutboxPage {
    pub messages: Vec<MessageItem>,
    /// Pass as `after` for the next page; null when there is none.
    pub next_cursor: Option<i64>,
}

/// Which outbound messages to list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct OutboxQuery {
    /// Only this channel's messages.
    pub channel: Option<String>,
    /// Only messages in this status (`pending`, `sent`, `failed`, `queued`, …).
    pub status: Option<String>,
    /// The previous page's `next_cursor`; none for the first page.
    pub after: Option<i64>,
    /// Messages per page, 1 to 500 (default 50).
    pub limit: Option<i64>,
}

/// Outbound messages, oldest first, each with its decision, reason, status and error.
pub async fn list(runtime: &Runtime, q: OutboxQuery) -> Result<OutboxPage, OperatorError> {
    let (rows, next_cursor) =
        outbound_rows(runtime, q.channel, q.status, Paging::new(q.after, q.limit)).await?;
    Ok(OutboxPage {
        messages: rows.into_iter().map(MessageItem::from).collect(),
        next_cursor,
    })
}

/// A page of outbound messages of `channel` (checked) in `status`, with the next cursor.
async fn outbound_rows(
    runtime: &Runtime,
    channel: Option<String>,
    status: Option<String>,
    paging: Paging,
) -> Result<(Vec<MessageDetail>, Option<i64>), OperatorError> {
    let (after, limit) = paging.checked()?;
    if let Some(channel) = &channel {
        known_channel(runtime, Some(channel.clone()))?;
    }
    let filter = OutboundFilter {
        channel,
        status,
        after,
        limit,
    };
    let rows = runtime
        .db
        .outbound_page(&filter)
        .await
        .map_err(OperatorError::failing("listing the outbox failed"))?;
    let next = next_cursor(rows.len(), limit, rows.last().map(|m| m.id));
    Ok((rows, next))
}

/// A message waiting in the queue for the customer to write.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueuedItem {
    #[serde(flatten)]
    pub message: MessageItem,
    /// Seconds since it was queued.
    pub age_seconds: i64,
    /// Seconds until it expires (0 when due; it is then marked `expired`).
    pub expires_in_seconds: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueuePage {
    pub messages: Vec<QueuedItem>,
    pub next_cursor: Option<i64>,
}

/// Which queued messages to list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct QueueQuery {
    /// Only this channel's messages.
    pub channel: Option<String>,
    /// The previous page's `next_cursor`; none for the first page.
    pub after: Option<i64>,
    /// Messages per page, 1 to 500 (default 50).
    pub limit: Option<i64>,
}

/// The messages the policy holds until the customer writes again, oldest first, with
/// their age and expiry.
pub async fn queue(runtime: &Runtime, q: QueueQuery) -> Result<QueuePage, OperatorError> {
    let queued = Some("queued".to_string());
    let (rows, next_cursor) =
        outbound_rows(runtime, q.channel, queued, Paging::new(q.after, q.limit)).await?;
    let now = runtime.clock.now();
    let messages = rows
        .into_iter()
        .map(|m| QueuedItem {
            age_seconds: (now - m.created_at).num_seconds().max(0),
            expires_in_seconds: m.expires_at.map(|at| seconds_until(at, now)),
            message: m.into(),
        })
        .collect();
    Ok(QueuePage {
        messages,
        next_cursor,
    })
}

/// Message `id`, inbound or outbound, with its decision, reason and delivery state.
pub async fn message(runtime: &Runtime, id: i64) -> Result<MessageItem, OperatorError> {
    Ok(find(runtime, id).await?.into())
}

async fn find(runtime: &Runtime, id: i64) -> Result<MessageDetail, OperatorError> {
    runtime
        .db
        .message(id)
        .await
        .map_err(OperatorError::failing("loading a message failed"))?
        .ok_or_else(|| {
            OperatorError::not_found("unknown_message", format!("there is no message {id}"))
        })
}

/// What a retry decided.
#[derive(Debug, Serialize, ToSchema)]
pub struct Retried {
    pub id: i64,
    /// The new decision: `send`/`rewritten` (it leaves now), `skipped`, or `queued` (still
    /// waiting: nothing changed).
    pub decision: String,
    pub reason: String,
    /// The message's status now.
    pub status: String,
}

/// Decides a queued message again now (the window may have opened, a template been
/// approved): sent, rewritten or skipped as the policy says; still queued leaves it as it
/// was. Under the contact's lock, like every decision.
pub async fn retry(runtime: &Runtime, id: i64) -> Result<Retried, OperatorError> {
    let m = queued(runtime, id).await?;
    let lock = runtime.lock(&m.channel, &m.wa_id);
    let _guard = lock.lock().await;
    let now = runtime.clock.now();
    let contact = runtime
        .db
        .load_conversation(&m.channel, &m.wa_id)
        .await
        .map_err(OperatorError::failing("loading a conversation failed"))?
        .contact;
    let requested: Outbound = serde_json::from_value(m.body.clone())
        .map_err(OperatorError::failing("a queued message does not read"))?;
    let decision = runtime
        .policy
        .decide(&requested, &contact, &runtime.templates(), now);
    if let Decision::Queued { .. } = decision {
        return Ok(Retried {
            id,
            decision: decision.name().into(),
            reason: decision.reason().into(),
            status: "queued".into(),
        });
    }
    let record = OutboundRecord {
        message: Policy::apply(&decision, &requested),
        status: decision
            .status(runtime.outbound_status(&m.channel))
            .to_string(),
        expires_at: None,
        decision,
        in_reply_to: None,
    };
    let changed =
        runtime
            .db
            .redecide_queued(id, &record, now)
            .await
            .map_err(OperatorError::failing(
                "deciding a queued message again failed",
            ))?;
    if !changed {
        return Err(not_queued(id, "no longer queued"));
    }
    if record.status == "pending" {
        runtime.outbox_ready(&m.channel).notify_one();
    }
    Ok(Retried {
        id,
        decision: record.decision.name().into(),
        reason: record.decision.reason().into(),
        status: record.status,
    })
}

/// What a cancel did.
#[derive(Debug, Serialize, ToSchema)]
pub struct Cancelled {
    pub id: i64,
    /// `cancelled`.
    pub status: String,
}

/// Takes a queued message out of the queue for good: it will not be sent (its reason
/// says an operator cancelled it).
pub async fn cancel(runtime: &Runtime, id: i64) -> Result<Cancelled, OperatorError> {
    queued(runtime, id).await?;
    let done = runtime
        .db
        .cancel_queued(id, "cancelled by an operator", runtime.clock.now())
        .await
        .map_err(OperatorError::failing("cancelling a queued message failed"))?;
    if !done {
        return Err(not_queued(id, "no longer queued"));
    }
    Ok(Cancelled {
        id,
        status: "cancelled".into(),
    })
}

/// Message `id`, if it exists and is queued.
async fn queued(runtime: &Runtime, id: i64) -> Result<MessageDetail, OperatorError> {
    let m = find(runtime, id).await?;
    if m.status != "queued" {
        return Err(not_queued(id, &m.status));
    }
    Ok(m)
}

fn not_queued(id: i64, status: &str) -> OperatorError {
    OperatorError::conflict(
        "not_queued",
        format!(
            "message {id} is not in the queue ({status}): only queued messages can be retried or cancelled; see the queue"
        ),
    )
}
