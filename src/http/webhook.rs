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

use super::{Refused, error, refused};
use crate::config::{ChannelConfig, Provider};
use crate::inbound::{count_moved_statuses, inbox_row};
use crate::metrics;
use crate::state::AppState;
use crate::store::{MOVED_STATUSES, NewInboxRow, Stored};
use crate::whatsapp::signature::SIGNATURE_HEADER;
use crate::whatsapp::{
    SignatureError, Update, parse_webhook, verify_shared_secret, verify_signature,
};
use crate::yaml::Secret;

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
fn webhook_channel<'a>(state: &'a AppState, name: &str) -> Result<&'a ChannelConfig, Refused> {
    let message = match state.config.channels.iter().find(|c| c.name == name) {
        Some(c) if c.provider != Provider::Sandbox => return Ok(c),
        Some(_) => format!("channel `{name}` is a sandbox channel and takes no webhooks"),
        None => format!("no channel is named `{name}`"),
    };
    Err(refused(StatusCode::NOT_FOUND, "unknown_channel", message))
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
    let expected = configured(&channel.verify_token);
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
    match store_webhook(&state, &name, &headers, body).await {
        Ok(received) => {
            count_received(&received, started);
            let Stored {
                stored, duplicates, ..
            } = received.stored;
            tracing::debug!(channel = %name, stored, duplicates, "webhook stored");
            Json(json!({"stored": stored, "duplicates": duplicates})).into_response()
        }
        Err(response) => *response,
    }
}

/// What a stored webhook held: the updates by kind, and how many were new.
struct Received {
    kinds: BTreeMap<&'static str, u64>,
    stored: Stored,
}

/// The steps of [`receive`] up to the acknowledgement; `Err` is the refusal to answer.
async fn store_webhook(
    state: &AppState,
    name: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Received, Refused> {
    let channel = webhook_channel(state, name)?;
    let body = read_body(name, body)?;
    authenticate(channel, name, headers, &body)?;
    let updates = parse(name, &body)?;
    let (rows, kinds) = inbox_rows(channel, &state.config.channels, updates);
    let stored = store(state, name, &rows).await?;
    // Delivery statuses are applied by now: only the other updates wake the worker.
    if stored.pending > 0 {
        state.inbox.notify_one();
    }
    Ok(Received { kinds, stored })
}

/// The body, unless it was too large or could not be read.
fn read_body(name: &str, body: Result<Bytes, BytesRejection>) -> Result<Bytes, Refused> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            tracing::warn!(channel = %name, "webhook refused: body larger than {MAX_BODY} bytes");
            reject(
                "too_large",
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("webhook bodies are limited to {MAX_BODY} bytes"),
            )
        } else {
            refused(rejection.status(), "unreadable_body", rejection.body_text())
        }
    })
}

/// Checks the raw body came from the channel's provider: Meta's signature for `cloud_api`,
/// the shared secret header for `dialog360`.
fn authenticate(
    channel: &ChannelConfig,
    name: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), Refused> {
    let header_text = |name: &str| {
        headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("<not text>"))
    };
    let (key, checked) = match channel.provider {
        Provider::CloudApi => (
            "app_secret",
            verify_signature(
                configured(&channel.app_secret).as_bytes(),
                body,
                header_text(SIGNATURE_HEADER),
            ),
        ),
        Provider::Dialog360 => (
            "webhook_secret",
            verify_shared_secret(
                configured(&channel.webhook_secret),
                header_text(SECRET_HEADER),
            ),
        ),
        Provider::Sandbox => unreachable!("webhook_channel refuses sandbox channels"),
    };
    match checked {
        Ok(()) => Ok(()),
        Err(SignatureError::NoSecret) => {
            tracing::error!(channel = %name, "webhook refused: the channel has no `{key}` to check it with; set it in the config");
            Err(reject(
                "not_configured",
                StatusCode::INTERNAL_SERVER_ERROR,
                "webhook_not_configured",
                format!("channel `{name}` has no `{key}` to authenticate webhooks with"),
            ))
        }
        Err(e) => {
            tracing::warn!(channel = %name, bytes = body.len(), reason = %e, "webhook refused: not authenticated");
            Err(reject(
                "signature",
                StatusCode::UNAUTHORIZED,
                "invalid_signature",
                e.to_string(),
            ))
        }
    }
}

/// The updates in an authenticated body; a body that is not a WhatsApp webhook is 400.
fn parse(name: &str, body: &[u8]) -> Result<Vec<Update>, Refused> {
    parse_webhook(body).map_err(|e| {
        tracing::warn!(channel = %name, bytes = body.len(), error = %e, "webhook refused: not a WhatsApp webhook");
        reject(
            "invalid_body",
            StatusCode::BAD_REQUEST,
            "invalid_webhook",
            e.to_string(),
        )
    })
}

/// The inbox rows for a webhook's updates, each on the channel its number names (else the
/// URL's, with a warning), and the count of updates by kind.
fn inbox_rows(
    channel: &ChannelConfig,
    channels: &[ChannelConfig],
    updates: Vec<Update>,
) -> (Vec<NewInboxRow>, BTreeMap<&'static str, u64>) {
    let mut kinds: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut strays = 0;
    let rows: Vec<_> = updates
        .into_iter()
        .map(|update| {
            *kinds.entry(update.kind()).or_default() += 1;
            let target = route(channel, channels, update.phone_number_id());
            if target.is_none() {
                strays += 1;
            }
            inbox_row(&target.unwrap_or(channel).name, update)
        })
        .collect();
    if strays > 0 {
        tracing::warn!(
            channel = %channel.name, updates = strays,
            "webhook updates for a phone_number_id no channel has; stored on this channel"
        );
    }
    (rows, kinds)
}

/// Stores the rows in one transaction; a failure is 503, so WhatsApp delivers again.
async fn store(state: &AppState, name: &str, rows: &[NewInboxRow]) -> Result<Stored, Refused> {
    let now = state.runtime.clock.now();
    state.runtime.db.insert_updates(rows, now).await.map_err(|e| {
        tracing::error!(channel = %name, updates = rows.len(), error = %e, "could not store a webhook; WhatsApp will deliver it again");
        reject(
            "storage",
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_failed",
            "the webhook could not be stored; deliver it again",
        )
    })
}

/// Counts a stored webhook's updates (by kind, duplicates apart) and the time it took to
/// acknowledge.
fn count_received(received: &Received, started: Instant) {
    for (kind, n) in &received.kinds {
        metrics::count(
            "flowgate_webhook_updates_total",
            "Webhook updates received, by type (duplicates included).",
            &[("type", kind)],
            *n,
        );
    }
    for (status, n) in MOVED_STATUSES.iter().zip(received.stored.moved) {
        count_moved_statuses(status, n);
    }
    if received.stored.duplicates > 0 {
        metrics::count(
            "flowgate_webhook_duplicates_total",
            "Webhook updates received again and ignored.",
            &[],
            received.stored.duplicates,
        );
    }
    metrics::observe(
        "flowgate_webhook_ack_seconds",
        "Time from receiving a webhook to acknowledging it (authenticated, parsed, stored).",
        &[],
        started.elapsed().as_secs_f64(),
    );
}

/// A configured secret's text; empty when none is set (the checks refuse an empty one).
fn configured(secret: &Option<Secret>) -> &str {
    secret.as_ref().map(Secret::expose).unwrap_or("")
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

/// A refused webhook (nothing stored): counted by `reason`, answered with `code`.
fn reject(
    reason: &'static str,
    status: StatusCode,
    code: &str,
    message: impl Into<String>,
) -> Refused {
    metrics::count(
        "flowgate_webhook_rejected_total",
        "Webhooks refused (nothing stored), by reason.",
        &[("reason", reason)],
        1,
    );
    refused(status, code, message)
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
