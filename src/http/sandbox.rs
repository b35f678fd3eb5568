//! The sandbox channel's door: `POST /sandbox/messages` plays a customer. It takes
//! `{"from": "15550001234", "text": "menu"}` (or `"button"`/`"list"` with an id, `"form"`
//! with a form's answer as an object, or `"file"`: `{"kind": "image", "name": "parcel.png",
//! "base64": "…", "caption": "…"}`, put in the media store as a download would be) and
//! answers with what the bot sent, so a newcomer can try flows with curl before any WhatsApp
//! account exists. The body is JSON like every door's, so a file travels as base64 in it.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use base64::Engine as _;

use super::error;
use crate::domain::{Inbound, InboundContent};
use crate::media::local::{self, GivenFile, GivenFileError};
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
    /// A file the customer sends (`chat`'s `/image PATH`).
    #[serde(default)]
    file: Option<SandboxFile>,
}

/// What the customer sends: a message, or a file.
enum Said {
    Content(InboundContent),
    File(SandboxFile),
}

/// A customer's file, in the JSON body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SandboxFile {
    /// image, document, audio, video or sticker.
    kind: String,
    /// Its name: the MIME type is read from the extension.
    name: String,
    /// The bytes, base64 (standard alphabet).
    base64: String,
    #[serde(default)]
    caption: Option<String>,
}

/// The largest body the door takes: a file of `media.max_bytes` in base64 (4 bytes for 3)
/// and room for the rest of the message, so a file too large for the media store is refused
/// by the store's rule, with its reason, not by the body limit.
pub fn body_limit(max_bytes: u64) -> usize {
    usize::try_from(max_bytes.saturating_mul(4) / 3)
        .unwrap_or(usize::MAX)
        .saturating_add(64 * 1024)
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
    let said = match (
        message.text,
        message.button,
        message.list,
        message.form,
        message.file,
    ) {
        (Some(body), None, None, None, None) => Said::Content(InboundContent::Text { body }),
        (None, Some(id), None, None, None) => Said::Content(InboundContent::ButtonReply {
            title: id.clone(),
            id,
        }),
        (None, None, Some(id), None, None) => Said::Content(InboundContent::ListReply {
            title: id.clone(),
            id,
        }),
        (None, None, None, Some(response), None) => {
            Said::Content(InboundContent::FormReply { response })
        }
        (None, None, None, None, Some(file)) => Said::File(file),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                "give exactly one of text, button, list, form or file",
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
    let (channel, from, name) = (
        &runtime.default_channel,
        &message.from,
        message.name.as_deref(),
    );
    let reports = match said {
        Said::File(file) => {
            let bytes = match base64::engine::general_purpose::STANDARD.decode(file.base64.trim()) {
                Ok(bytes) => bytes,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid_file",
                        format!(
                            "`file.base64` is not base64 ({e}): encode the file's bytes, e.g. `base64 -w0 parcel.png`"
                        ),
                    );
                }
            };
            let given = GivenFile {
                kind: &file.kind,
                name: &file.name,
                bytes,
                caption: file.caption.as_deref(),
            };
            match local::receive(runtime, channel, from, name, given, now).await {
                Ok(reports) => Ok(Vec::from(reports)),
                Err(e @ GivenFileError::Kind(_)) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid_file",
                        format!("`file.kind`: {e}"),
                    );
                }
                Err(e) => Err(e.to_string()),
            }
        }
        Said::Content(content) => {
            let inbound = Inbound::sandbox(content, now, now);
            runtime
                .inbound(channel, from, name, inbound)
                .await
                .map(|report| vec![report])
                .map_err(|e| e.to_string())
        }
    };
    match reports {
        Ok(reports) => {
            let last = reports.last().map(|r| r.handled.to_string());
            Json(json!({
                "handled": last,
                "replies": reports.iter().flat_map(|r| &r.sent).map(|m| json!({
                    "id": m.id,
                    "message": m.message.content,
                    "decision": m.decision,
                })).collect::<Vec<_>>(),
            }))
            .into_response()
        }
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
