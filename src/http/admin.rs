//! The admin API under `/api`: bearer-token auth, and the first read endpoints (flows, a
//! conversation's state and messages). Later issues add contacts, campaigns and templates
//! here.
//!
//! Auth: `Authorization: Bearer <admin.token>`, compared in constant time. Without a
//! configured token the API answers only on a loopback listener (the server refuses to start
//! on any other address without one, see `app::Application::build`).

use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{AppState, error};

pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/flows", get(flows))
        .route("/conversations/{contact}", get(conversation))
        .layer(axum::middleware::from_fn_with_state(state, require_token))
}

/// Checks the bearer token when one is configured.
async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(expected) = state
        .config
        .admin
        .token
        .as_ref()
        .map(|t| t.expose())
        .filter(|t| !t.is_empty())
    else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => {
            next.run(request).await
        }
        Some(_) => error(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "the bearer token is wrong",
        ),
        None => error(
            StatusCode::UNAUTHORIZED,
            "missing_token",
            "send `Authorization: Bearer <admin.token>`",
        ),
    }
}

/// Compares without an early exit, so the time taken does not tell how much matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

async fn flows(State(state): State<AppState>) -> Response {
    let flows = state.runtime.flows.read().expect("flows lock");
    let list: Vec<_> = flows
        .current()
        .iter()
        .map(|f| {
            json!({
                "id": f.id,
                "version": f.version,
                "description": f.description,
                "file": f.file,
                "steps": f.steps.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(json!({ "flows": list })).into_response()
}

#[derive(Debug, Deserialize)]
struct ChannelQuery {
    channel: Option<String>,
    limit: Option<i64>,
}

async fn conversation(
    State(state): State<AppState>,
    Path(contact): Path<String>,
    Query(q): Query<ChannelQuery>,
) -> Response {
    let runtime = &state.runtime;
    let channel = q.channel.unwrap_or_else(|| runtime.default_channel.clone());
    if !runtime.channels.iter().any(|c| c.name == channel) {
        return error(
            StatusCode::NOT_FOUND,
            "unknown_channel",
            format!("there is no channel `{channel}`"),
        );
    }
    let conversation = match runtime.db.load_conversation(&channel, &contact).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "loading a conversation failed");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the database failed; see the server log",
            );
        }
    };
    let Some(contact_id) = conversation.contact_id else {
        return error(
            StatusCode::NOT_FOUND,
            "unknown_contact",
            format!("no contact `{contact}` on channel `{channel}`"),
        );
    };
    let messages = match runtime
        .db
        .messages(&channel, &contact, q.limit.unwrap_or(50).clamp(1, 500))
        .await
    {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(error = %e, "loading messages failed");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the database failed; see the server log",
            );
        }
    };
    Json(json!({
        "id": contact_id,
        "channel": channel,
        "contact": conversation.contact,
        "session": conversation.session.map(|s| json!({
            "flow": s.flow_id, "version": s.flow_version, "step": s.step, "state": s.state,
        })),
        "messages": messages.iter().map(|m| json!({
            "id": m.id, "direction": m.direction, "wamid": m.wamid, "kind": m.kind, "body": m.body,
            "decision": m.decision, "reason": m.reason, "status": m.status, "created_at": m.created_at,
        })).collect::<Vec<_>>(),
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn compares_whole_values() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
