//! Live reload of the flows, scripts, template registry and campaign files while `serve`
//! runs: on `SIGHUP`, on `POST /api/flows/reload`, and on a file change with `serve --watch`.
//!
//! A reload loads the project exactly as `check` does; a project with an error is refused
//! (logged, and the API answers 422 with the diagnostics) and the running flows are kept.
//! Conversations stay pinned to the flow version they started on (`flow::FlowSet`); new
//! ones get the new version. The campaign files replace the runner's file campaigns
//! ([`CampaignRunner::replace_files`]): a changed one is used from its next tick, a removed
//! one is forgotten (its runs not over cancelled). The config file itself (`flowgate.yaml`: channels, listen
//! address, policy) is read only at start: changing it needs a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::campaign_runner::{CampaignRunner, RunnerError};
use crate::config::Config;
use crate::diagnostic::Diagnostics;
use crate::dispatch::{DispatchError, Runtime};
use crate::flow::load::load_project;

/// A reload that took: the flows now current, and the warnings of the new project.
#[derive(Debug)]
pub struct Reloaded {
    /// `(flow id, version)` of every current flow.
    pub flows: Vec<(String, String)>,
    pub warnings: Diagnostics,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The files have errors: nothing changed.
    #[error("the flows were not reloaded: they have {} error(s); the running flows are kept", .0.errors())]
    Refused(Box<Diagnostics>),
    /// The files could not be loaded in the background (a panic in the loader).
    #[error("loading the flows failed: {0}")]
    Load(String),
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    #[error("saving the reloaded campaigns failed: {0}")]
    Campaigns(#[from] RunnerError),
}

/// Loads the project `config` names and makes it current (flows, templates, the campaign
/// files of `campaigns`), unless it has an error.
pub async fn reload(
    runtime: &Runtime,
    config: &Config,
    campaigns: &CampaignRunner,
) -> Result<Reloaded, ReloadError> {
    let _one_at_a_time = runtime.reloading.lock().await;
    let scripting = runtime.engine.scripting.clone();
    let config_for_load = config.clone();
    // Reading and compiling the files is blocking work: off the async workers.
    let project = tokio::task::spawn_blocking(move || load_project(&config_for_load, &scripting))
        .await
        .map_err(|e| ReloadError::Load(e.to_string()))?;
    if project.diagnostics.has_errors() {
        crate::metrics::count(RELOADS, RELOADS_HELP, &[("result", "refused")], 1);
        return Err(ReloadError::Refused(Box::new(project.diagnostics)));
    }
    let flows = project
        .flows
        .iter()
        .map(|f| (f.id.clone(), f.version.clone()))
        .collect();
    runtime
        .reload_project(project.flows, project.templates)
        .await?;
    campaigns.replace_files(&project.campaigns).await?;
    crate::metrics::count(RELOADS, RELOADS_HELP, &[("result", "ok")], 1);
    Ok(Reloaded {
        flows,
        warnings: project.diagnostics,
    })
}

const RELOADS: &str = "flowgate_flow_reloads_total";
const RELOADS_HELP: &str = "Live reloads of the flows, by result (ok, refused).";

/// [`reload`], with what happened in the log (`why`: what asked for it).
pub async fn reload_and_log(
    runtime: &Runtime,
    config: &Config,
    campaigns: &CampaignRunner,
    why: &str,
) {
    match reload(runtime, config, campaigns).await {
        Ok(done) => {
            let flows: Vec<String> = done
                .flows
                .iter()
                .map(|(id, version)| format!("{id}@{version}"))
                .collect();
            tracing::info!(trigger = why, flows = %flows.join(", "), warnings = done.warnings.warnings(), "flows reloaded");
        }
        Err(ReloadError::Refused(diags)) => {
            tracing::error!(trigger = why, diagnostics = %diags.render(false), "the flows were not reloaded: they have errors; the running flows are kept");
        }
        Err(e) => tracing::error!(trigger = why, error = %e, "the flows were not reloaded"),
    }
}

/// Reloads on every `SIGHUP` (instead of the default: the process ends), forever. The
/// handler is installed when this is called, not when the future first runs, so a `SIGHUP`
/// right after start cannot end the server.
#[cfg(unix)]
pub fn on_sighup(
    runtime: Arc<Runtime>,
    config: Arc<Config>,
    campaigns: Arc<CampaignRunner>,
) -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let hangups = signal(SignalKind::hangup());
    async move {
        let mut hangups = match hangups {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler: reload through the API instead");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            reload_and_log(&runtime, &config, &campaigns, "SIGHUP").await;
        }
    }
}

/// `serve --watch`: checks the flows, scripts and campaigns directories and the template
/// registry every `every`, and reloads when a file was added, removed or changed.
pub async fn watch(
    runtime: Arc<Runtime>,
    config: Arc<Config>,
    campaigns: Arc<CampaignRunner>,
    every: Duration,
) {
    let mut seen = fingerprint(&config);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let config_now = config.clone();
        let Ok(now) = tokio::task::spawn_blocking(move || fingerprint(&config_now)).await else {
            continue;
        };
        if now != seen {
            seen = now;
            reload_and_log(&runtime, &config, &campaigns, "a file changed").await;
        }
    }
}

/// Every file a reload reads, with its modification time and size.
type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64)>;

fn fingerprint(config: &Config) -> Fingerprint {
    let mut files = Vec::new();
    for dir in [&config.flows, &config.scripts, &config.campaigns] {
        walk(dir, &mut files);
    }
    files.push(config.templates.clone());
    let mut out: Fingerprint = files
        .into_iter()
        .map(|path| {
            let meta = std::fs::metadata(&path).ok();
            let modified = meta.as_ref().and_then(|m| m.modified().ok());
            (path, modified, meta.map_or(0, |m| m.len()))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The files under `dir`, at any depth (none when it cannot be read).
fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, files);
        } else {
            files.push(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_added_or_removed_file_changes_the_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            flows: dir.path().join("flows"),
            scripts: dir.path().join("scripts"),
            campaigns: dir.path().join("campaigns"),
            templates: dir.path().join("templates.yaml"),
            ..Config::default()
        };
        std::fs::create_dir_all(&config.flows).unwrap();
        let before = fingerprint(&config);
        std::fs::write(config.flows.join("a.yaml"), "x").unwrap();
        let added = fingerprint(&config);
        assert_ne!(before, added);
        std::fs::write(config.flows.join("a.yaml"), "xy").unwrap();
        let changed = fingerprint(&config);
        assert_ne!(added, changed, "a different size");
        std::fs::remove_file(config.flows.join("a.yaml")).unwrap();
        assert_eq!(before, fingerprint(&config));
    }
}
