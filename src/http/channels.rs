//! Channels through the admin API: each with its state (sending, or stopped by an
//! account-level WhatsApp error, with the code and reason) and its outbox and queue depth
//! (`GET /api/channels`), and an operator's resume of a stopped channel
//! (`POST /api/channels/{name}/resume`).
//!
//! A stop pauses the channel's campaigns too (`Db::stop_channel`); a resume does not
//! resume them: a marketer resumes each on purpose.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::admin::{internal, known_channel};
use super::api::{Answer, ApiPath as Path, ErrorBody, ok, respond};
use super::refused;
use crate::config::Provider;
use crate::dispatch::Runtime;
use crate::state::AppState;
use crate::store::StoreError;

/// The routes of this module, each with its documentation (see [`super::api`]).
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(channels))
        .routes(routes!(resume))
}

/// Why a channel is stopped.
#[derive(Debug, Serialize, ToSchema)]
pub struct StopView {
    /// The WhatsApp error code (e.g. 131048), if one stopped it.
    code: Option<i64>,
    reason: String,
    at: DateTime<Utc>,
}

/// One channel and its state.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChannelItem {
    name: String,
    /// `cloud_api`, `dialog360` or `sandbox`.
    provider: String,
    /// `sending`, or `stopped` (an account-level error: nothing leaves until an operator
    /// resumes it).
    state: String,
    stopped: Option<StopView>,
    /// Messages not yet accepted by WhatsApp.
    outbox_depth: i64,
    /// Messages waiting for the customer's window.
    queue_depth: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChannelList {
    channels: Vec<ChannelItem>,
}

/// Every configured channel with its state and depths.
#[utoipa::path(get, path = "/channels", tag = "channels",
    responses(
        (status = 200, description = "The channels", body = ChannelList),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn channels(State(state): State<AppState>) -> Response {
    respond(channel_list(&state.runtime).await)
}

async fn channel_list(runtime: &Runtime) -> Answer<ChannelList> {
    let mut channels = Vec::with_capacity(runtime.channels.len());
    for c in &runtime.channels {
        channels.push(
            channel_item(runtime, &c.name, c.provider)
                .await
                .map_err(|e| Box::new(internal("reading a channel's state failed", e)))?,
        );
    }
    ok(ChannelList { channels })
}

async fn channel_item(
    runtime: &Runtime,
    name: &str,
    provider: Provider,
) -> Result<ChannelItem, StoreError> {
    let stopped = runtime.db.channel_stopped(name).await?;
    Ok(ChannelItem {
        name: name.to_string(),
        provider: match provider {
            Provider::CloudApi => "cloud_api",
            Provider::Dialog360 => "dialog360",
            Provider::Sandbox => "sandbox",
        }
        .into(),
        state: if stopped.is_some() {
            "stopped"
        } else {
            "sending"
        }
        .into(),
        stopped: stopped.map(|s| StopView {
            code: s.code,
            reason: s.reason,
            at: s.at,
        }),
        outbox_depth: runtime.db.outbox_depth(name).await?,
        queue_depth: runtime.db.queue_depth(name).await?,
    })
}

/// Lets a channel an account-level error stopped send again (its campaigns stay paused).
#[utoipa::path(post, path = "/channels/{name}/resume", tag = "channels",
    params(("name" = String, Path, description = "The channel's name")),
    responses(
        (status = 200, description = "The channel, sending again", body = ChannelItem),
        (status = 404, description = "`unknown_channel`", body = ErrorBody),
        (status = 409, description = "`not_stopped`: the channel is sending", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn resume(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    respond(resume_channel(&state.runtime, name).await)
}

async fn resume_channel(runtime: &Runtime, name: String) -> Answer<ChannelItem> {
    let name = known_channel(runtime, Some(name))?;
    let failed = |e: StoreError| Box::new(internal("resuming a channel failed", e));
    let resumed = runtime
        .db
        .resume_channel(&name, runtime.clock.now())
        .await
        .map_err(failed)?;
    if !resumed {
        return Err(refused(
            StatusCode::CONFLICT,
            "not_stopped",
            format!("channel `{name}` is not stopped: there is nothing to resume"),
        ));
    }
    tracing::warn!(channel = %name, "an operator resumed the channel; its campaigns stay paused until resumed");
    runtime.outbox_ready(&name).notify_one();
    let provider = runtime
        .channels
        .iter()
        .find(|c| c.name == name)
        .map_or(Provider::Sandbox, |c| c.provider);
    let item = channel_item(runtime, &name, provider)
        .await
        .map_err(failed)?;
    ok(item)
}
