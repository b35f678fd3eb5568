//! The HTTP surface of `flowgate serve`, on axum: health and metrics, the sandbox door, the
//! WhatsApp webhooks, the admin API and the web console ([`console`], at `/`).
//!
//! Who may use the sandbox and `/metrics` is for [`doors`] to say; the admin API checks its
//! token with [`bearer`], the one bearer-token check every door shares.
//!
//! Every handler gets the [`AppState`] it shares with the inbound worker; errors are JSON
//! `{"error": {"code", "message"}}` with a stable `code` ([`api::ErrorBody`]). The `/api`
//! router and its OpenAPI document are built together from the handlers' annotations
//! ([`api::router`]). A handler's steps refuse with a
//! [`Refused`] answer, so the handler reads top to bottom.

pub mod admin;
pub mod api;
pub mod campaigns;
pub mod channels;
pub mod console;
pub mod contacts;
pub mod doors;
pub mod media;
pub mod outbox;
pub mod sandbox;
pub mod webhook;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::state::AppState;
use crate::yaml::Secret;
use doors::{Doors, guard};

/// The server's routes; the sandbox and `/metrics` behind their [`Doors`].
pub fn router(state: AppState, doors: Doors) -> Router {
    let door = |door| axum::middleware::from_fn_with_state(door, guard);
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics).route_layer(door(doors.metrics)))
        .route(
            "/sandbox/messages",
            post(sandbox::sandbox_message)
                .layer(axum::extract::DefaultBodyLimit::max(sandbox::body_limit(
                    state.config.media.max_bytes,
                )))
                .route_layer(door(doors.sandbox)),
        )
        .route("/webhook/{channel}", webhook::routes())
        .route("/media/{id}", get(media::serve))
        .nest("/api", api::router(state.clone()).0)
        .merge(console::router(&state))
        .with_state(state)
}

async fn ready(State(state): State<AppState>) -> Response {
    let db = &state.runtime.db;
    let backend = db.backend();
    // Draining after SIGTERM: a balancer that still asks stops sending here.
    if *state.closing.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    // A database that takes longer than this to answer is as good as down to a balancer.
    match tokio::time::timeout(std::time::Duration::from_secs(2), db.check_ready()).await {
        Ok(Ok(())) => (StatusCode::OK, format!("ready: {backend}")).into_response(),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{backend}: {e}")).into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{backend}: no answer within 2 s"),
        )
            .into_response(),
    }
}

/// Prometheus text: the process counters plus gauges read now.
async fn metrics(State(state): State<AppState>) -> Response {
    let flows = state
        .runtime
        .flows
        .read()
        .expect("flows lock")
        .current()
        .len();
    let mut gauges = vec![(
        "flowgate_flows_loaded",
        "Flows loaded (current versions).",
        Vec::new(),
        flows as f64,
    )];
    match crate::outbox::gauges(&state.runtime.db, &state.runtime.channels).await {
        Ok(g) => gauges.extend(g),
        Err(e) => tracing::warn!(error = %e, "reading the outbox gauges failed"),
    }
    match crate::campaign_runner::gauges(&state.runtime.db).await {
        Ok(g) => gauges.extend(g),
        Err(e) => tracing::warn!(error = %e, "reading the campaign gauges failed"),
    }
    match crate::splits::gauges(&state.runtime.db).await {
        Ok(g) => gauges.extend(g),
        Err(e) => tracing::warn!(error = %e, "reading the split gauges failed"),
    }
    match state.runtime.db.inbox_depth().await {
        Ok(depth) => gauges.push((
            "flowgate_inbox_depth",
            "Webhook updates stored and not yet processed.",
            Vec::new(),
            depth as f64,
        )),
        Err(e) => tracing::warn!(error = %e, "reading the inbox depth failed"),
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        crate::metrics::render(&gauges),
    )
        .into_response()
}

/// Whether `headers` carry `Authorization: Bearer <expected>` (compared in constant time,
/// its length hidden too: [`Secret::matches`]); `key` names the config key in the hint.
pub fn bearer(headers: &HeaderMap, expected: &Secret, key: &str) -> Result<(), Refused> {
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(token) if expected.matches(token) => Ok(()),
        Some(_) => Err(refused(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "the bearer token is wrong",
        )),
        None => Err(refused(
            StatusCode::UNAUTHORIZED,
            "missing_token",
            format!("send `Authorization: Bearer <{key}>`"),
        )),
    }
}

/// A JSON error with a stable `code`.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message.into()}})),
    )
        .into_response()
}

/// A handler step's refusal: the error answer to give instead of going on (boxed: a
/// `Response` is large to pass back through every step).
pub type Refused = Box<Response>;

/// [`error`], as a step's refusal.
pub fn refused(status: StatusCode, code: &str, message: impl Into<String>) -> Refused {
    Box::new(error(status, code, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::header::AUTHORIZATION,
            authorization.parse().unwrap(),
        );
        headers
    }

    #[test]
    fn only_the_whole_bearer_token_passes() {
        let secret = Secret::new("secret");
        let code = |headers: &HeaderMap| match bearer(headers, &secret, "admin.token") {
            Ok(()) => StatusCode::OK,
            Err(refused) => refused.status(),
        };
        assert_eq!(code(&with("Bearer secret")), StatusCode::OK);
        for wrong in [
            "Bearer secreT",
            "Bearer secret2",
            "Bearer secre",
            "Bearer ",
            "secret",
        ] {
            assert_eq!(code(&with(wrong)), StatusCode::UNAUTHORIZED, "{wrong}");
        }
        assert_eq!(code(&HeaderMap::new()), StatusCode::UNAUTHORIZED);
    }
}
