//! The sandbox channel's door: `POST /sandbox/messages` plays a customer. It takes
//! `{"from": "15550001234", "text": "menu"}` (or `"button"`/`"list"` with an id, or `"form"`
//! with a form's answer as an object) and answers
//! with what the bot sent, so a newcomer can try flows with curl before any WhatsApp account
//! exists.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::error;
use crate::domain::{Inbound, InboundContent};
use crate::state::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SandboxMessage {
    from: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    button: Option<String>,
    #[serde(default)]
    list: Option<String>,
    /// A form's answer: the fields of a WhatsApp Flow's `response_json`, as a conversation
    /// test's `user: {form: …}` and `chat`'s `/form` give them.
    #[serde(default)]
    form: Option<serde_json::Map<String, serde_json::Value>>,
}

pub async fn sandbox_message(State(state): State<AppState>, body: axum::body::Bytes) -> Response {
    let runtime = &state.runtime;
    let message: SandboxMessage = match serde_json::from_slice(&body) {
        Ok(m) => m,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!("{e}: send {{\"from\": \"15550001234\", \"text\": \"hi\"}}"),
            );
        }
    };
    let content = match (message.text, message.button, message.list, message.form) {
        (Some(body), None, None, None) => InboundContent::Text { body },
        (None, Some(id), None, None) => InboundContent::ButtonReply {
            title: id.clone(),
            id,
        },
        (None, None, Some(id), None) => InboundContent::ListReply {
            title: id.clone(),
            id,
        },
        (None, None, None, Some(response)) => InboundContent::FormReply { response },
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                "give exactly one of text, button, list or form",
            );
        }
    };
    if !valid_from(&message.from) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_from",
            "`from` is a phone number in digits, e.g. 15550001234",
        );
    }
    let now = runtime.clock.now();
    let inbound = Inbound::sandbox(content, now, now);
    match runtime
        .inbound(
            &runtime.default_channel,
            &message.from,
            message.name.as_deref(),
            inbound,
        )
        .await
    {
        Ok(report) => Json(json!({
            "handled": report.handled.to_string(),
            "replies": report.sent.iter().map(|m| json!({
                "id": m.id,
                "message": m.message.content,
                "decision": m.decision,
            })).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "sandbox message failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the message could not be processed; see the server log",
            )
        }
    }
}

/// Whether a sandbox customer's `from` is a phone number in digits (the door's and the
/// console's sandbox chat's rule).
pub(super) fn valid_from(from: &str) -> bool {
    !from.is_empty() && from.chars().all(|c| c.is_ascii_digit())
}
