//! Templates: the registry as the policy sees it now (status webhooks applied), and a sync
//! from the Graph API (the code of `flowgate templates sync`) followed by a reload.

use serde::Serialize;
use utoipa::ToSchema;

use super::OperatorError;
use crate::commands::templates_sync::{self, SyncError};
use crate::reload;
use crate::state::AppState;
use crate::templates::Category;

/// One template of the registry.
#[derive(Debug, Serialize, ToSchema)]
pub struct TemplateItem {
    pub name: String,
    pub language: String,
    /// `marketing`, `utility` or `authentication`.
    #[schema(value_type = String)]
    pub category: Category,
    /// `approved`, `pending`, `rejected`, `paused`, `disabled`, …
    pub status: String,
    /// How many `{{n}}` parameters its body takes.
    pub params: usize,
    pub body: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TemplateList {
    pub templates: Vec<TemplateItem>,
}

/// The registry with each template's status.
pub fn list(state: &AppState) -> TemplateList {
    let registry = state.runtime.templates();
    TemplateList {
        templates: registry
            .templates
            .iter()
            .map(|t| TemplateItem {
                name: t.name.clone(),
                language: t.language.clone(),
                category: t.category,
                status: t.status.as_str().to_string(),
                params: t.param_count(),
                body: t.body.clone(),
            })
            .collect(),
    }
}

/// What a sync did.
#[derive(Debug, Serialize, ToSchema)]
pub struct Synced {
    /// The line `flowgate templates sync` prints.
    pub summary: String,
    /// Templates skipped, duplicates, entries Meta does not list (kept).
    pub warnings: Vec<String>,
    /// Whether the running server took the new registry (a project with errors keeps the
    /// one it runs; the file is written either way, as the CLI does).
    pub reloaded: bool,
    /// Why it was not reloaded, when it was not.
    pub reload_error: Option<String>,
}

/// Reads `channel`'s templates (default: the first cloud_api channel) from the Graph API,
/// merges them into the registry file and writes it, then reloads so the server uses them.
pub async fn sync(state: &AppState, channel: Option<&str>) -> Result<Synced, OperatorError> {
    let fetched = templates_sync::fetch(state.config.file.as_deref(), channel)
        .await
        .map_err(sync_refused)?;
    fetched.write().map_err(sync_refused)?;
    let reload = reload::reload(&state.runtime, &state.config, &state.campaigns).await;
    let reload_error = reload.err().map(|e| match e {
        reload::ReloadError::Refused(ref diags) => format!("{e}:\n{}", diags.render(false)),
        e => e.to_string(),
    });
    Ok(Synced {
        summary: fetched.summary(),
        warnings: fetched.warnings().to_vec(),
        reloaded: reload_error.is_none(),
        reload_error,
    })
}

/// A sync that did not happen, as the operator's error.
fn sync_refused(e: SyncError) -> OperatorError {
    let message = match &e {
        SyncError::Config(d) | SyncError::Registry { diagnostics: d, .. } => {
            format!("{e}:\n{}", d.render(false))
        }
        _ => e.to_string(),
    };
    match &e {
        SyncError::NoSuchChannel { .. } => OperatorError::not_found("unknown_channel", message),
        SyncError::Config(_) | SyncError::Registry { .. } => {
            OperatorError::unprocessable("invalid_registry", message)
        }
        SyncError::Fetch { .. } => OperatorError::refused(
            super::Refusal::Upstream,
            "graph_error",
            format!("{message}; the registry file is unchanged"),
        ),
        SyncError::Write(_) => OperatorError::failed("writing the synced registry failed", e),
        _ => OperatorError::unprocessable("not_syncable", message),
    }
}
