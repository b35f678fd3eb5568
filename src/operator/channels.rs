//! Channels: each with its state (sending, or stopped by an account-level WhatsApp error,
//! with the code and reason) and its outbox and queue depth; an operator's resume of a
//! stopped channel.
//!
//! A stop pauses the channel's campaigns too (`Db::stop_channel`); a resume does not
//! resume them: a marketer resumes each on purpose.

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::{OperatorError, known_channel};
use crate::config::Provider;
use crate::dispatch::Runtime;
use crate::store::StoreError;

/// Why a channel is stopped.
#[derive(Debug, Serialize, ToSchema)]
pub struct StopView {
    /// The WhatsApp error code (e.g. 131048), if one stopped it.
    pub code: Option<i64>,
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// One channel and its state.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChannelItem {
    pub name: String,
    /// `cloud_api`, `dialog360` or `sandbox`.
    pub provider: String,
    /// `sending`, or `stopped` (an account-level error: nothing leaves until an operator
    /// resumes it).
    pub state: String,
    pub stopped: Option<StopView>,
    /// Messages not yet accepted by WhatsApp.
    pub outbox_depth: i64,
    /// Messages waiting for the customer's window.
    pub queue_depth: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChannelList {
    pub channels: Vec<ChannelItem>,
}

/// Every configured channel with its state and depths.
pub async fn list(runtime: &Runtime) -> Result<ChannelList, OperatorError> {
    let mut channels = Vec::with_capacity(runtime.channels.len());
    for c in &runtime.channels {
        channels.push(
            item(runtime, &c.name, c.provider)
                .await
                .map_err(OperatorError::failing("reading a channel's state failed"))?,
        );
    }
    Ok(ChannelList { channels })
}

async fn item(
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
pub async fn resume(runtime: &Runtime, name: String) -> Result<ChannelItem, OperatorError> {
    let name = known_channel(runtime, Some(name))?;
    let failed = OperatorError::failing::<StoreError>;
    let resumed = runtime
        .db
        .resume_channel(&name, runtime.clock.now())
        .await
        .map_err(failed("resuming a channel failed"))?;
    if !resumed {
        return Err(OperatorError::conflict(
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
    item(runtime, &name, provider)
        .await
        .map_err(failed("reading a channel's state failed"))
}
