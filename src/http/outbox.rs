//! The outbox and the queue through the admin API: outbound messages with their decision,
//! reason, status and error (`GET /api/outbox`), the messages waiting for the customer's
//! window with their age and expiry (`GET /api/queue`), one message
//! (`GET /api/messages/{id}`), and an operator's retry (decide again now) or cancel of a
//! queued message. Thin over [`crate::operator::outbox`].

use axum::extract::State;
use axum::response::Response;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::api::{ApiPath as Path, ApiQuery as Query, ErrorBody, answer_ok};
use crate::operator::outbox::{
    self, Cancelled, MessageItem, OutboxPage, OutboxQuery, QueuePage, QueueQuery, Retried,
};
use crate::state::AppState;

/// The routes of this module, each with its documentation (see [`super::api`]).
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_outbox))
        .routes(routes!(message))
        .routes(routes!(list_queue))
        .routes(routes!(retry_queued))
        .routes(routes!(cancel_queued))
}

/// Outbound messages, oldest first, each with its decision, reason, status and error.
#[utoipa::path(get, path = "/outbox", tag = "outbox",
    params(OutboxQuery),
    responses(
        (status = 200, description = "A page of outbound messages", body = OutboxPage),
        (status = 400, description = "`invalid_query` or `invalid_limit`", body = ErrorBody),
        (status = 404, description = "`unknown_channel`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn list_outbox(State(state): State<AppState>, Query(q): Query<OutboxQuery>) -> Response {
    answer_ok(outbox::list(&state.runtime, q).await)
}

/// One message (inbound or outbound) with its policy decision, reason and delivery state.
#[utoipa::path(get, path = "/messages/{id}", tag = "outbox",
    params(("id" = i64, Path, description = "The message's id")),
    responses(
        (status = 200, description = "The message with its decision, reason and delivery state", body = MessageItem),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 404, description = "`unknown_message`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn message(State(state): State<AppState>, Path(id): Path<i64>) -> Response {
    answer_ok(outbox::message(&state.runtime, id).await)
}

/// The messages the policy holds until the customer writes again, oldest first, with
/// their age and expiry.
#[utoipa::path(get, path = "/queue", tag = "outbox",
    params(QueueQuery),
    responses(
        (status = 200, description = "A page of queued messages", body = QueuePage),
        (status = 400, description = "`invalid_query` or `invalid_limit`", body = ErrorBody),
        (status = 404, description = "`unknown_channel`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn list_queue(State(state): State<AppState>, Query(q): Query<QueueQuery>) -> Response {
    answer_ok(outbox::queue(&state.runtime, q).await)
}

/// Decides a queued message again now (the window may have opened, a template been
/// approved): sent, rewritten or skipped as the policy says; still queued leaves it as it
/// was.
#[utoipa::path(post, path = "/queue/{id}/retry", tag = "outbox",
    params(("id" = i64, Path, description = "The queued message's id")),
    responses(
        (status = 200, description = "The new decision", body = Retried),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 404, description = "`unknown_message`", body = ErrorBody),
        (status = 409, description = "`not_queued`: the message is not in the queue", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn retry_queued(State(state): State<AppState>, Path(id): Path<i64>) -> Response {
    answer_ok(outbox::retry(&state.runtime, id).await)
}

/// Takes a queued message out of the queue for good: it will not be sent.
#[utoipa::path(post, path = "/queue/{id}/cancel", tag = "outbox",
    params(("id" = i64, Path, description = "The queued message's id")),
    responses(
        (status = 200, description = "Cancelled", body = Cancelled),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 404, description = "`unknown_message`", body = ErrorBody),
        (status = 409, description = "`not_queued`: the message is not in the queue", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn cancel_queued(State(state): State<AppState>, Path(id): Path<i64>) -> Response {
    answer_ok(outbox::cancel(&state.runtime, id).await)
}
