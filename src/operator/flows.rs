//! Flows: the running ones with their validation state (the diagnostics `flowgate check`
//! gives their files now), and a live reload.

use serde::Serialize;
use utoipa::ToSchema;

use super::OperatorError;
use crate::diagnostic::Diagnostic;
use crate::flow::load::load_project;
use crate::reload::{self, ReloadError};
use crate::state::AppState;

/// One current flow with its validation state: the diagnostics `flowgate check` gives its
/// file now (the files as they are on disk, which may differ from the running version).
#[derive(Debug, Serialize, ToSchema)]
pub struct FlowItem {
    pub id: String,
    pub version: String,
    pub description: Option<String>,
    pub file: String,
    pub steps: Vec<String>,
    /// No errors in its file now: a reload would take it.
    pub valid: bool,
    pub diagnostics: Vec<DiagnosticItem>,
}

/// One problem `flowgate check` reports.
#[derive(Debug, Serialize, ToSchema)]
pub struct DiagnosticItem {
    /// `error` or `warning`.
    pub severity: String,
    /// `file:line:col`.
    pub position: String,
    pub message: String,
    pub help: Option<String>,
}

impl From<&Diagnostic> for DiagnosticItem {
    fn from(d: &Diagnostic) -> Self {
        Self {
            severity: if d.is_error() { "error" } else { "warning" }.into(),
            position: d.position(),
            message: d.message.clone(),
            help: d.help.clone(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FlowList {
    pub flows: Vec<FlowItem>,
    /// Diagnostics of the project's other files (templates, campaigns, flows that do not
    /// run), so an error that would refuse a reload is never hidden.
    pub other: Vec<DiagnosticItem>,
    pub errors: usize,
    pub warnings: usize,
}

/// The running flows, each with the diagnostics `flowgate check` gives its file now.
pub async fn list(state: &AppState) -> Result<FlowList, OperatorError> {
    let scripting = state.runtime.engine.scripting.clone();
    let config = state.config.clone();
    let diagnostics = tokio::task::spawn_blocking(move || load_project(&config, &scripting))
        .await
        .map_err(OperatorError::failing("checking the flows failed"))?
        .diagnostics;
    let sorted = diagnostics.sorted();
    let flows = state.runtime.flows.read().expect("flows lock");
    let list: Vec<FlowItem> = flows
        .current()
        .iter()
        .map(|f| {
            let found: Vec<&Diagnostic> = sorted
                .iter()
                .copied()
                .filter(|d| d.file == f.file)
                .collect();
            FlowItem {
                id: f.id.clone(),
                version: f.version.clone(),
                description: f.description.clone(),
                file: f.file.clone(),
                steps: f.steps.iter().map(|s| s.id.clone()).collect(),
                valid: !found.iter().any(|d| d.is_error()),
                diagnostics: found.into_iter().map(DiagnosticItem::from).collect(),
            }
        })
        .collect();
    let other = sorted
        .iter()
        .copied()
        .filter(|d| !flows.current().iter().any(|f| f.file == d.file))
        .map(DiagnosticItem::from)
        .collect();
    Ok(FlowList {
        flows: list,
        other,
        errors: diagnostics.errors(),
        warnings: diagnostics.warnings(),
    })
}

/// A flow now current.
#[derive(Debug, Serialize, ToSchema)]
pub struct FlowVersion {
    pub id: String,
    pub version: String,
}

/// What a reload did.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReloadedFlows {
    pub flows: Vec<FlowVersion>,
    /// How many warnings the project has.
    pub warnings: usize,
    /// The warnings as `flowgate check` prints them.
    pub diagnostics: String,
}

/// Loads the flows, scripts, campaigns' files and templates again ([`reload::reload`]):
/// new conversations get the new versions, running ones keep theirs. A project with an
/// error is refused (`invalid_flows`, with its diagnostics) and the running flows are kept.
pub async fn reload(state: &AppState) -> Result<ReloadedFlows, OperatorError> {
    match reload::reload(&state.runtime, &state.config, &state.campaigns).await {
        Ok(done) => Ok(ReloadedFlows {
            flows: done
                .flows
                .into_iter()
                .map(|(id, version)| FlowVersion { id, version })
                .collect(),
            warnings: done.warnings.warnings(),
            diagnostics: done.warnings.render(false),
        }),
        Err(ReloadError::Refused(diags)) => {
            tracing::error!(diagnostics = %diags.render(false), "the flows were not reloaded: they have errors; the running flows are kept");
            Err(OperatorError::Diagnosed {
                code: "invalid_flows",
                message: format!(
                    "the flows have {} error(s): nothing was reloaded, the running flows are kept; fix them (`flowgate check` shows the same) and reload again",
                    diags.errors()
                ),
                diagnostics: diags.render(false).into(),
            })
        }
        Err(e) => Err(OperatorError::failed("reloading the flows failed", e)),
    }
}
