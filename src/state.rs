//! What the server's workers share: the runtime, the config and the inbox's wake-up. The
//! HTTP handlers ([`crate::http`]) and the inbound worker ([`crate::inbound`]) both take an
//! [`AppState`]; `app` builds it. It imports neither, so they need not import each other.

use std::sync::Arc;

use tokio::sync::Notify;

use crate::campaign_runner::CampaignRunner;
use crate::config::Config;
use crate::dispatch::Runtime;

/// What every HTTP handler and the inbound worker can reach.
#[derive(Clone)]
pub struct AppState {
    pub runtime: Arc<Runtime>,
    pub config: Arc<Config>,
    /// Wakes the inbound worker when a webhook stored new updates.
    pub inbox: Arc<Notify>,
    /// The campaigns at run time (the API changes them, a reload replaces the files').
    pub campaigns: Arc<CampaignRunner>,
    /// Turns true when the server starts to stop: long-lived answers (the console's live
    /// updates) end then, so the graceful shutdown does not wait for them.
    pub closing: tokio::sync::watch::Receiver<bool>,
}
