//! The outbox and the queue through the admin API: outbound messages with their decision,
//! reason, status and error (`GET /api/outbox`), the messages waiting for the customer's
//! window with their age and expiry (`GET /api/queue`), and an operator's retry (decide
//! again now) or cancel of a queued message.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::admin::internal;
use super::api::{
    Answer, ApiPath as Path, ApiQuery as Query, ErrorBody, Paging, next_cursor, ok, respond,
};
use super::refused;
use crate::dispatch::Runtime;
use crate::domain::{Decision, Outbound};
use crate::policy::Policy;
use crate::state::AppState;
use crate::store::{MessageDetail, OutboundFilter, OutboundRecord};

/// The routes of this module, each with its documentation (see [`super::api`]).
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(outbox))
        .routes(routes!(queue))
        .routes(routes!(retry))
        .routes(routes!(cancel))
}

/// One outbound message as the outbox lists it.
#[derive(Debug, Serialize, ToSchema)]
pub struct OutboundItem {
    id: i64,
    channel: String,
    /// The contact's phone number or BSUID.
    contact: String,
    /// `text`, `buttons`, `list`, `media` or `template`.
    kind: String,
    /// The policy's decision: `send`, `rewritten`, `queued`, `skipped`, `expired`, `failed`.
    decision: Option<String>,
    reason: Option<String>,
    /// `pending`, `sending`, `sent`, `delivered`, `read`, `failed`, `queued`, …
    status: String,
    attempts: i64,
    /// WhatsApp's error code, when it refused the message.
    error_code: Option<i64>,
    error: Option<String>,
    wamid: Option<String>,
    /// The message as stored (its content and origin).
    #[schema(value_type = Object)]
    message: serde_json::Value,
    created_at: DateTime<Utc>,
    updated_at: Option<DateTime<Utc>>,
}

impl From<MessageDetail> for OutboundItem {
    fn from(m: MessageDetail) -> Self {
        Self {
            id: m.id,
            channel: m.channel,
            contact: m.wa_id,
            kind: m.kind,
            decision: m.decision,
            reason: m.reason,
            status: m.status,
            attempts: m.attempts,
            error_code: m.error_code,
            error: m.error,
            wamid: m.wamid,
            message: m.body,
            created_at: m.created_at,
            updated_at: m.updated_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OutboxPage {
    messages: Vec<OutboundItem>,
    /// Pass as `after` for the next page; null when there is none.
    next_cursor: Option<i64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct OutboxQuery {
    /// Only this channel's messages.
    channel: Option<String>,
    /// Only messages in this status (`pending`, `sent`, `failed`, `queued`, …).
    status: Option<String>,
    /// The previous page's `next_cursor`; none for the first page.
    after: Option<i64>,
    /// Messages per page, 1 to 500 (default 50).
    limit: Option<i64>,
}

/// Outbound messages, oldest first, each with its decision, reason, status and error.
#[utoipa::path(get, path = "/outbox", tag = "outbox",
    params(OutboxQuery),
    responses(
        (status = 200, description = "A page of outbound messages", body = OutboxPage),
        (status = 400, description = "`invalid_limit`", body = ErrorBody),
        (status = 404, description = "`unknown_channel`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn outbox(State(state): State<AppState>, Query(q): Query<OutboxQuery>) -> Response {
    respond(outbox_page(&state.runtime, q).await)
}

async fn outbox_page(runtime: &Runtime, q: OutboxQuery) -> Answer<OutboxPage> {
    let (rows, next_cursor) =
        outbound_rows(runtime, q.channel, q.status, &Paging::new(q.after, q.limit)).await?;
    ok(OutboxPage {
        messages: rows.into_iter().map(OutboundItem::from).collect(),
        next_cursor,
    })
}

/// A page of outbound messages of `channel` (checked) in `status`, with the next cursor.
async fn outbound_rows(
    runtime: &Runtime,
    channel: Option<String>,
    status: Option<String>,
    paging: &Paging,
) -> Result<(Vec<MessageDetail>, Option<i64>), super::Refused> {
    let (after, limit) = paging.checked()?;
    if let Some(channel) = &channel {
        super::admin::known_channel(runtime, Some(channel.clone()))?;
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
        .map_err(|e| Box::new(internal("listing the outbox failed", e)))?;
    let next = next_cursor(rows.len(), limit, rows.last().map(|m| m.id));
    Ok((rows, next))
}

/// A message waiting in the queue for the customer to write.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueuedItem {
    #[serde(flatten)]
    message: OutboundItem,
    /// Seconds since it was queued.
    age_seconds: i64,
    /// When it expires (it is then dropped with the reason `expired`).
    expires_at: Option<DateTime<Utc>>,
    /// Seconds until then (0 when due).
    expires_in_seconds: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueuePage {
    messages: Vec<QueuedItem>,
    next_cursor: Option<i64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct QueueQuery {
    /// Only this channel's messages.
    channel: Option<String>,
    /// The previous page's `next_cursor`; none for the first page.
    after: Option<i64>,
    /// Messages per page, 1 to 500 (default 50).
    limit: Option<i64>,
}

/// The messages the policy holds until the customer writes again, oldest first, with
/// their age and expiry.
#[utoipa::path(get, path = "/queue", tag = "outbox",
    params(QueueQuery),
    responses(
        (status = 200, description = "A page of queued messages", body = QueuePage),
        (status = 400, description = "`invalid_limit`", body = ErrorBody),
        (status = 404, description = "`unknown_channel`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn queue(State(state): State<AppState>, Query(q): Query<QueueQuery>) -> Response {
    respond(queue_page(&state.runtime, q).await)
}

pub(super) async fn queue_page(runtime: &Runtime, q: QueueQuery) -> Answer<QueuePage> {
    let queued = Some("queued".to_string());
    let (rows, next_cursor) =
        outbound_rows(runtime, q.channel, queued, &Paging::new(q.after, q.limit)).await?;
    let now = runtime.clock.now();
    let messages = rows
        .into_iter()
        .map(|m| {
            let expires_at = m.expires_at;
            QueuedItem {
                age_seconds: (now - m.created_at).num_seconds().max(0),
                expires_at,
                expires_in_seconds: expires_at.map(|at| (at - now).num_seconds().max(0)),
                message: m.into(),
            }
        })
        .collect();
    ok(QueuePage {
        messages,
        next_cursor,
    })
}

/// What a retry decided.
#[derive(Debug, Serialize, ToSchema)]
pub struct Retried {
    id: i64,
    /// The new decision: `send`/`rewritten` (it leaves now), `skipped`, or `queued` (still
    /// waiting: nothing changed).
    decision: String,
    reason: String,
    /// The message's status now.
    status: String,
}

/// Decides a queued message again now (the window may have opened, a template been
/// approved): sent, rewritten or skipped as the policy says; still queued leaves it as it
/// was.
#[utoipa::path(post, path = "/queue/{id}/retry", tag = "outbox",
    params(("id" = i64, Path, description = "The queued message's id")),
    responses(
        (status = 200, description = "The new decision", body = Retried),
        (status = 404, description = "`unknown_message`", body = ErrorBody),
        (status = 409, description = "`not_queued`: the message is not in the queue", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn retry(State(state): State<AppState>, Path(id): Path<i64>) -> Response {
    respond(retry_queued(&state.runtime, id).await)
}

async fn retry_queued(runtime: &Runtime, id: i64) -> Answer<Retried> {
    let m = queued(runtime, id).await?;
    let lock = runtime.lock(&m.channel, &m.wa_id);
    let _guard = lock.lock().await;
    let now = runtime.clock.now();
    let contact = runtime
        .db
        .load_conversation(&m.channel, &m.wa_id)
        .await
        .map_err(|e| Box::new(internal("loading a conversation failed", e)))?
        .contact;
    let requested: Outbound = serde_json::from_value(m.body.clone())
        .map_err(|e| Box::new(internal("a queued message does not read", e)))?;
    let decision = runtime
        .policy
        .decide(&requested, &contact, &runtime.templates(), now);
    if let Decision::Queued { .. } = decision {
        return ok(Retried {
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
    if !runtime
        .db
        .redecide_queued(id, &record, now)
        .await
        .map_err(|e| Box::new(internal("deciding a queued message again failed", e)))?
    {
        return Err(not_queued(id));
    }
    if record.status == "pending" {
        runtime.outbox_ready(&m.channel).notify_one();
    }
    ok(Retried {
        id,
        decision: record.decision.name().into(),
        reason: record.decision.reason().into(),
        status: record.status,
    })
}

/// What a cancel did.
#[derive(Debug, Serialize, ToSchema)]
pub struct Cancelled {
    id: i64,
    /// `cancelled`.
    status: String,
}

/// Takes a queued message out of the queue for good: it will not be sent.
#[utoipa::path(post, path = "/queue/{id}/cancel", tag = "outbox",
    params(("id" = i64, Path, description = "The queued message's id")),
    responses(
        (status = 200, description = "Cancelled", body = Cancelled),
        (status = 404, description = "`unknown_message`", body = ErrorBody),
        (status = 409, description = "`not_queued`: the message is not in the queue", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn cancel(State(state): State<AppState>, Path(id): Path<i64>) -> Response {
    respond(cancel_queued(&state.runtime, id).await)
}

async fn cancel_queued(runtime: &Runtime, id: i64) -> Answer<Cancelled> {
    queued(runtime, id).await?;
    let done = runtime
        .db
        .cancel_queued(id, "cancelled by an operator", runtime.clock.now())
        .await
        .map_err(|e| Box::new(internal("cancelling a queued message failed", e)))?;
    if !done {
        return Err(not_queued(id));
    }
    ok(Cancelled {
        id,
        status: "cancelled".into(),
    })
}

/// Message `id`, if it exists and is queued.
async fn queued(runtime: &Runtime, id: i64) -> Result<MessageDetail, super::Refused> {
    let m = runtime
        .db
        .message(id)
        .await
        .map_err(|e| Box::new(internal("loading a message failed", e)))?
        .ok_or_else(|| {
            refused(
                StatusCode::NOT_FOUND,
                "unknown_message",
                format!("there is no message {id}"),
            )
        })?;
    if m.status != "queued" {
        return Err(not_queued_as(id, &m.status));
    }
    Ok(m)
}

fn not_queued(id: i64) -> super::Refused {
    not_queued_as(id, "no longer queued")
}

fn not_queued_as(id: i64, status: &str) -> super::Refused {
    refused(
        StatusCode::CONFLICT,
        "not_queued",
        format!(
            "message {id} is not in the queue ({status}): only queued messages can be retried or cancelled; see GET /api/queue"
        ),
    )
}
