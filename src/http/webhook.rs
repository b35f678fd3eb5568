//! `GET/POST /webhook/{channel}`: WhatsApp webhooks in. Persist, then acknowledge; the
//! inbound worker ([`crate::inbound`]) processes them afterwards.
//!
//! * `GET` is Meta's verification handshake: `hub.mode=subscribe` and `hub.verify_token`
//!   equal to the channel's `verify_token` (compared in constant time) answer 200 with
//!   `hub.challenge` as `text/plain`; anything else 403.
//! * `POST` authenticates the raw body before reading it:
//!   * `cloud_api`: `X-Hub-Signature-256: sha256=<HMAC-SHA256 of the body, keyed with the
//!     channel's app_secret>`;
//!   * `dialog360`: 360dialog sends Meta's envelope without Meta's signature, so the channel's
//!     `webhook_secret` must come in the header [`SECRET_HEADER`] (`X-Flowgate-Secret`).
//!     Register it with the webhook URL:
//!     `POST https://waba-v2.360dialog.io/v1/configs/webhook` with
//!     `{"url": "https://<host>/webhook/<channel>", "headers": {"X-Flowgate-Secret": "<webhook_secret>"}}`.
//!
//!   A bad or missing signature is 401 and nothing is stored. Then the body is parsed (400 on
//!   a body that is not a WhatsApp webhook), every update is stored in one transaction
//!   (a redelivered update is counted as a duplicate, not stored twice), and only then the
//!   answer is 200 `{"stored": n, "duplicates": m}`. Bodies above [`MAX_BODY`] are 413.
//!
//! Updates are stored on the channel whose `phone_number_id` they name (one Meta app has
//! one callback URL for all its numbers), else on the URL's channel.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use serde_json::json;

use super::error;
use crate::config::{ChannelConfig, Provider};
use crate::inbound::inbox_row;
use crate::metrics;
use crate::state::AppState;
use crate::whatsapp::signature::SIGNATURE_HEADER;
use crate::whatsapp::{SignatureError, parse_webhook, verify_shared_secret, verify_signature};

/// The header a `dialog360` channel's webhooks carry the channel's `webhook_secret` in.
pub const SECRET_HEADER: &str = "X-Flowgate-Secret";

/// The largest webhook body accepted: Meta sends up to 3 MB.
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// Both methods of `/webhook/{channel}`, with the body limit.
pub fn routes() -> MethodRouter<AppState> {
    get(verify)
        .post(receive)
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

/// The channel named in the URL, if it takes webhooks; else the 404 answer.
fn webhook_channel<'a>(
    state: &'a AppState,
    name: &str,
) -> Result<&'a ChannelConfig, Box<Response>> {
    let message = match state.config.channels.iter().find(|c| c.name == name) {
        Some(c) if c.provider != Provider::Sandbox => return Ok(c),
        Some(_) => format!("channel `{name}` is a sandbox channel and takes no webhooks"),
        None => format!("no channel is named `{name}`"),
    };
    Err(Box::new(error(
        StatusCode::NOT_FOUND,
        "unknown_channel",
        message,
    )))
}

/// The verification handshake.
pub async fn verify(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let channel = match webhook_channel(&state, &name) {
        Ok(c) => c,
        Err(response) => return *response,
    };
    let expected = channel
        .verify_token
        .as_ref()
        .map(|t| t.expose())
        .unwrap_or("");
    let mode_ok = query.get("hub.mode").map(String::as_str) == Some("subscribe");
    let token = verify_shared_secret(expected, query.get("hub.verify_token").map(String::as_str));
    match (mode_ok, token, query.get("hub.challenge")) {
        (true, Ok(()), Some(challenge)) => {
            tracing::info!(channel = %name, "webhook verified");
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                challenge.clone(),
            )
                .into_response()
        }
        (_, Err(SignatureError::NoSecret), _) => {
            tracing::warn!(channel = %name, "webhook verification refused: the channel has no verify_token");
            error(
                StatusCode::FORBIDDEN,
                "verification_failed",
                "the channel has no verify_token configured",
            )
        }
        _ => {
            tracing::warn!(channel = %name, "webhook verification refused: wrong mode, token or no challenge");
            error(
                StatusCode::FORBIDDEN,
                "verification_failed",
                "hub.mode must be subscribe and hub.verify_token must match the channel's verify_token",
            )
        }
    }
}

/// A webhook: authenticate, parse, store, acknowledge.
pub async fn receive(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let channel = match webhook_channel(&state, &name) {
        Ok(c) => c,
        Err(response) => return *response,
    };
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            tracing::warn!(channel = %name, "webhook refused: body larger than {MAX_BODY} bytes");
            rejected("too_large");
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("webhook bodies are limited to {MAX_BODY} bytes"),
            );
        }
        Err(rejection) => {
            return error(rejection.status(), "unreadable_body", rejection.body_text());
        }
    };

    let header_text = |name: &str| {
        headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("<not text>"))
    };
    let checked = match channel.provider {
        Provider::CloudApi => {
            let secret = channel
                .app_secret
                .as_ref()
                .map(|s| s.expose())
                .unwrap_or("");
            verify_signature(secret.as_bytes(), &body, header_text(SIGNATURE_HEADER))
        }
        Provider::Dialog360 => {
            let secret = channel
                .webhook_secret
                .as_ref()
                .map(|s| s.expose())
                .unwrap_or("");
            verify_shared_secret(secret, header_text(SECRET_HEADER))
        }
        Provider::Sandbox => unreachable!("webhook_channel refuses sandbox channels"),
    };
    match checked {
        Ok(()) => {}
        Err(SignatureError::NoSecret) => {
            let key = match channel.provider {
                Provider::CloudApi => "app_secret",
                _ => "webhook_secret",
            };
            tracing::error!(channel = %name, "webhook refused: the channel has no `{key}` to check it with; set it in the config");
            rejected("not_configured");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "webhook_not_configured",
                format!("channel `{name}` has no `{key}` to authenticate webhooks with"),
            );
        }
        Err(e) => {
            tracing::warn!(channel = %name, bytes = body.len(), reason = %e, "webhook refused: not authenticated");
            rejected("signature");
            return error(StatusCode::UNAUTHORIZED, "invalid_signature", e.to_string());
        }
    }

    let updates = match parse_webhook(&body) {
        Ok(updates) => updates,
        Err(e) => {
            tracing::warn!(channel = %name, bytes = body.len(), error = %e, "webhook refused: not a WhatsApp webhook");
            rejected("invalid_body");
            return error(StatusCode::BAD_REQUEST, "invalid_webhook", e.to_string());
        }
    };

    let mut kinds: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut strays = 0;
    let rows: Vec<_> = updates
        .into_iter()
        .map(|update| {
            *kinds.entry(update.kind()).or_default() += 1;
            let target = route(channel, &state.config.channels, update.phone_number_id());
            if target.is_none() {
                strays += 1;
            }
            inbox_row(&target.unwrap_or(channel).name, update)
        })
        .collect();
    if strays > 0 {
        tracing::warn!(
            channel = %name, updates = strays,
            "webhook updates for a phone_number_id no channel has; stored on this channel"
        );
    }
    let now = state.runtime.clock.now();
    let stored = match state.runtime.db.insert_updates(&rows, now).await {
        Ok(stored) => stored,
        Err(e) => {
            tracing::error!(channel = %name, updates = rows.len(), error = %e, "could not store a webhook; WhatsApp will deliver it again");
            rejected("storage");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_failed",
                "the webhook could not be stored; deliver it again",
            );
        }
    };
    state.inbox.notify_one();

    for (kind, n) in kinds {
        metrics::count(
            "flowgate_webhook_updates_total",
            "Webhook updates received, by type (duplicates included).",
            &[("type", kind)],
            n,
        );
    }
    if stored.duplicates > 0 {
        metrics::count(
            "flowgate_webhook_duplicates_total",
            "Webhook updates received again and ignored.",
            &[],
            stored.duplicates,
        );
    }
    metrics::observe(
        "flowgate_webhook_ack_seconds",
        "Time from receiving a webhook to acknowledging it (authenticated, parsed, stored).",
        &[],
        started.elapsed().as_secs_f64(),
    );
    tracing::debug!(channel = %name, stored = stored.stored, duplicates = stored.duplicates, "webhook stored");
    Json(json!({"stored": stored.stored, "duplicates": stored.duplicates})).into_response()
}

/// The channel an update belongs to: the URL's channel when it has no `phone_number_id` or
/// the update's; else the channel of the same provider with the update's `phone_number_id`;
/// `None` when no channel has that number (the caller keeps the URL's channel).
fn route<'a>(
    url_channel: &'a ChannelConfig,
    channels: &'a [ChannelConfig],
    phone_number_id: Option<&str>,
) -> Option<&'a ChannelConfig> {
    let number = |c: &ChannelConfig| c.phone_number_id.as_ref().map(|p| p.0.clone());
    let Some(wanted) = phone_number_id else {
        return Some(url_channel);
    };
    match number(url_channel) {
        None => return Some(url_channel),
        Some(own) if own == wanted => return Some(url_channel),
        Some(_) => {}
    }
    channels
        .iter()
        .find(|c| c.provider == url_channel.provider && number(c).as_deref() == Some(wanted))
}

fn rejected(reason: &'static str) {
    metrics::count(
        "flowgate_webhook_rejected_total",
        "Webhooks refused (nothing stored), by reason.",
        &[("reason", reason)],
        1,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::EnvString;

    fn channel(name: &str, provider: Provider, number: Option<&str>) -> ChannelConfig {
        ChannelConfig {
            provider,
            phone_number_id: number.map(|n| EnvString(n.into())),
            ..ChannelConfig::sandbox(name)
        }
    }

    #[test]
    fn updates_go_to_the_channel_of_their_number() {
        let channels = [
            channel("a", Provider::CloudApi, Some("1")),
            channel("b", Provider::CloudApi, Some("2")),
            channel("d", Provider::Dialog360, None),
            channel("e", Provider::Dialog360, Some("3")),
        ];
        let name = |url: usize, number: Option<&str>| {
            route(&channels[url], &channels, number).map(|c| c.name.as_str())
        };
        assert_eq!(name(0, Some("1")), Some("a"));
        assert_eq!(name(0, Some("2")), Some("b"));
        assert_eq!(name(0, None), Some("a"));
        assert_eq!(name(0, Some("9")), None);
        // Only to a channel of the same provider.
        assert_eq!(name(0, Some("3")), None);
        // A channel without a number takes everything sent to its URL.
        assert_eq!(name(2, Some("3")), Some("d"));
        assert_eq!(name(3, Some("3")), Some("e"));
    }
}
