//! The channels' messaging limits as WhatsApp states them, read from the Graph API when
//! `serve` starts and every [`REFRESH`] after, into the runtime, where the dispatcher takes
//! the tighter of it and the channel's `messaging_limit` key
//! ([`Runtime::messaging_limit`]).
//!
//! WhatsApp raises a portfolio's limit within hours when the business sends well, so a limit
//! read once at start would hold campaigns back for days; one read an hour is cheap. A read
//! that fails (no network, a bad token) is logged and the last stated limit kept: the
//! configured key still holds, and the next read tries again. Only `cloud_api` channels
//! are read.

use std::time::Duration;

use crate::config::Provider;
use crate::dispatch::Runtime;
use crate::whatsapp::{Client, Endpoint};

/// How often `serve` reads the limits again.
pub const REFRESH: Duration = Duration::from_secs(60 * 60);

/// Reads every `cloud_api` channel's stated limit into `runtime`; answers how many were
/// read.
pub async fn read_stated_limits(runtime: &Runtime) -> usize {
    let mut read = 0;
    for channel in &runtime.channels {
        if channel.provider != Provider::CloudApi {
            continue;
        }
        let Ok(endpoint) = Endpoint::for_channel(channel) else {
            continue;
        };
        match Client::new(endpoint).messaging_limit().await {
            Ok(limit) => {
                tracing::info!(channel = %channel.name, ?limit, "WhatsApp's messaging limit for the number");
                runtime.state_messaging_limit(&channel.name, limit);
                read += 1;
            }
            Err(e) => tracing::warn!(
                channel = %channel.name,
                error = %e,
                "could not read the number's messaging limit from WhatsApp; the configured \
                 `messaging_limit` (if any) holds until the next read"
            ),
        }
    }
    read
}
