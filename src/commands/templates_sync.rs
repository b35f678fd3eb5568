//! `flowgate templates sync`: Meta's templates for a channel's WABA, merged into the registry
//! (`Registry::merge_synced`) and written atomically.
//!
//! Reads only the config and the registry, not the flows: a sync is how a project whose
//! flows name templates the file does not have yet gets fixed, so broken flows must not stop
//! it. A registry file with errors does stop it, since merging into a file that did not
//! parse would drop its entries.
//!
//! [`fetch`] does everything up to the merge; the caller prints [`Fetched::warnings`], then
//! [`Fetched::write`]s and prints [`Fetched::summary`].

use std::path::{Path, PathBuf};

use crate::clock::{Clock, SystemClock};
use crate::config::{ChannelConfig, Config, DEFAULT_CONFIG_FILE, Provider};
use crate::diagnostic::Diagnostics;
use crate::templates::{Merge, Registry, Status, Template, WriteError, sync_comment};
use crate::whatsapp::{Client, Endpoint, GraphError, TemplateList};

/// Why a sync did not happen; the registry file is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The config did not load: its diagnostics say why.
    #[error("the config has errors")]
    Config(Box<Diagnostics>),
    /// The registry file has errors (its diagnostics say which).
    #[error("{} has errors: fix them (or move the file away) before syncing into it", path.display())]
    Registry {
        path: PathBuf,
        diagnostics: Box<Diagnostics>,
    },
    #[error("there is no channel `{name}` in {config_file}")]
    NoSuchChannel { name: String, config_file: String },
    #[error(
        "{config_file} has no cloud_api channel: templates sync reads a WhatsApp Business Account's templates"
    )]
    NoCloudApiChannel { config_file: String },
    #[error(
        "channel `{channel}` is a dialog360 channel: templates sync supports cloud_api channels only (360dialog's template list is not read by flowgate); write its templates into {} by hand",
        templates.display()
    )]
    Dialog360 { channel: String, templates: PathBuf },
    #[error(
        "channel `{channel}` is a sandbox channel: it has no templates at Meta; templates sync needs a cloud_api channel"
    )]
    Sandbox { channel: String },
    #[error(
        "channel `{channel}` in {config_file} needs `waba_id` (its WhatsApp Business Account id) for templates sync"
    )]
    NoWabaId {
        channel: String,
        config_file: String,
    },
    /// The channel's endpoint is incomplete (what `Endpoint::for_channel` says).
    #[error("{0}")]
    Endpoint(String),
    /// The Graph API refused the list or did not answer.
    #[error(
        "templates sync from channel `{channel}` failed, {} is unchanged: {error}{}",
        templates.display(),
        refused_token_hint(error, channel, config_file)
    )]
    Fetch {
        channel: String,
        templates: PathBuf,
        config_file: String,
        error: Box<GraphError>,
    },
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// The templates Meta lists, merged into the registry as it is, not written yet.
#[derive(Debug)]
pub struct Fetched {
    channel: String,
    waba_id: String,
    path: PathBuf,
    skipped: usize,
    warnings: Vec<String>,
    merge: Merge,
}

/// Reads the channel's templates from the Graph API and merges them into the registry file's
/// entries; `channel` defaults to the first `cloud_api` channel.
pub async fn fetch(
    config_path: Option<&Path>,
    channel: Option<&str>,
) -> Result<Fetched, SyncError> {
    let config = Config::load(config_path).map_err(SyncError::Config)?;
    let config_file = config
        .file
        .as_ref()
        .map(|f| f.display().to_string())
        .unwrap_or_else(|| DEFAULT_CONFIG_FILE.to_string());
    let chosen = choose_channel(&config, channel, &config_file)?;
    let waba_id = waba_id(chosen, &config_file)?;
    let endpoint = Endpoint::for_channel(chosen).map_err(SyncError::Endpoint)?;
    let current = load_registry(&config.templates)?;
    let list = Client::new(endpoint)
        .list_templates(&waba_id)
        .await
        .map_err(|error| SyncError::Fetch {
            channel: chosen.name.clone(),
            templates: config.templates.clone(),
            config_file: config_file.clone(),
            error: Box::new(error),
        })?;
    Ok(Fetched::merge(
        chosen,
        waba_id,
        &config.templates,
        &current,
        list,
    ))
}

/// The channel named `channel`, else the first `cloud_api` one; only a `cloud_api` channel
/// can be synced.
fn choose_channel<'a>(
    config: &'a Config,
    channel: Option<&str>,
    config_file: &str,
) -> Result<&'a ChannelConfig, SyncError> {
    let chosen = match channel {
        Some(name) => config
            .channels
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| SyncError::NoSuchChannel {
                name: name.to_string(),
                config_file: config_file.to_string(),
            })?,
        None => config
            .channels
            .iter()
            .find(|c| c.provider == Provider::CloudApi)
            // A dialog360 channel only to say why it cannot be synced.
            .or_else(|| {
                config
                    .channels
                    .iter()
                    .find(|c| c.provider != Provider::Sandbox)
            })
            .ok_or_else(|| SyncError::NoCloudApiChannel {
                config_file: config_file.to_string(),
            })?,
    };
    match chosen.provider {
        Provider::CloudApi => Ok(chosen),
        Provider::Dialog360 => Err(SyncError::Dialog360 {
            channel: chosen.name.clone(),
            templates: config.templates.clone(),
        }),
        Provider::Sandbox => Err(SyncError::Sandbox {
            channel: chosen.name.clone(),
        }),
    }
}

fn waba_id(channel: &ChannelConfig, config_file: &str) -> Result<String, SyncError> {
    channel
        .waba_id
        .as_ref()
        .map(|w| w.0.trim().to_string())
        .filter(|w| !w.is_empty())
        .ok_or_else(|| SyncError::NoWabaId {
            channel: channel.name.clone(),
            config_file: config_file.to_string(),
        })
}

/// The registry file as it is (none is an empty registry); one with errors stops the sync.
fn load_registry(path: &Path) -> Result<Registry, SyncError> {
    let mut diagnostics = Diagnostics::default();
    let current = Registry::load(path, &mut diagnostics);
    if diagnostics.has_errors() {
        return Err(SyncError::Registry {
            path: path.to_path_buf(),
            diagnostics: Box::new(diagnostics),
        });
    }
    Ok(current)
}

/// What a refused token's error adds: which key to renew, and where.
fn refused_token_hint(error: &GraphError, channel: &str, config_file: &str) -> String {
    if error.code == 190 {
        format!(
            " (the access token of channel `{channel}` was refused: renew `access_token` in {config_file})"
        )
    } else {
        String::new()
    }
}

impl Fetched {
    fn merge(
        channel: &ChannelConfig,
        waba_id: String,
        path: &Path,
        current: &Registry,
        list: TemplateList,
    ) -> Self {
        let mut warnings: Vec<String> =
            list.skipped.iter().chain(&list.warnings).cloned().collect();
        let merge = current.merge_synced(list.templates);
        warnings.extend(merge.duplicates.iter().map(|duplicate| {
            format!("Meta listed template {duplicate} twice: the first one is used")
        }));
        warnings.extend(merge.kept.iter().map(|t| {
            format!(
                "Meta does not list template `{}` ({}) for channel `{}`: kept as it was ({})",
                t.name,
                t.language,
                channel.name,
                t.status.as_str()
            )
        }));
        Self {
            channel: channel.name.clone(),
            waba_id,
            path: path.to_path_buf(),
            skipped: list.skipped.len(),
            warnings,
            merge,
        }
    }

    /// What the user should know before the file is written: templates skipped, notes about
    /// those read, duplicates, and entries Meta does not list (kept).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Writes the merged registry atomically, headed by a comment naming the channel, the
    /// WABA and the time.
    pub fn write(&self) -> Result<(), SyncError> {
        let comment = sync_comment(&self.channel, &self.waba_id, SystemClock.now());
        self.merge.registry.write_atomic(&self.path, &comment)?;
        Ok(())
    }

    /// One line: how many templates were synced, by status, and how many were skipped and kept.
    pub fn summary(&self) -> String {
        let synced = self.synced();
        let mut summary = format!(
            "synced {} template{} ({}) from channel {} into {}",
            synced.len(),
            if synced.len() == 1 { "" } else { "s" },
            status_breakdown(&synced),
            self.channel,
            self.path.display()
        );
        if self.skipped > 0 {
            summary.push_str(&format!("; {} skipped", self.skipped));
        }
        summary.push_str(&format!(
            "; {} kept that Meta does not list",
            self.merge.kept.len()
        ));
        summary
    }

    /// The registry's entries that came from Meta (not kept from the file).
    fn synced(&self) -> Vec<&Template> {
        self.merge
            .registry
            .templates
            .iter()
            .filter(|t| {
                !self
                    .merge
                    .kept
                    .iter()
                    .any(|k| k.name == t.name && k.language == t.language)
            })
            .collect()
    }
}

/// `2 approved, 1 pending`, in the registry's order of statuses (one added later counts
/// too, after these); `none` for no templates.
fn status_breakdown(templates: &[&Template]) -> String {
    let order = [
        Status::Approved,
        Status::Pending,
        Status::Rejected,
        Status::Paused,
        Status::Disabled,
    ];
    let mut counts: Vec<(Status, usize)> = Vec::new();
    for t in templates {
        match counts.iter_mut().find(|(s, _)| *s == t.status) {
            Some((_, n)) => *n += 1,
            None => counts.push((t.status, 1)),
        }
    }
    counts.sort_by_key(|(s, _)| order.iter().position(|o| o == s).unwrap_or(order.len()));
    if counts.is_empty() {
        return "none".to_string();
    }
    counts
        .iter()
        .map(|(s, n)| format!("{n} {}", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}
