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

/// One branch of an A/B split with its contacts at each stage (see [`crate::splits`]).
#[derive(Debug, Serialize, ToSchema)]
pub struct SplitBranch {
    pub branch: String,
    /// The branch's weight in the current flow (`null`: a branch the flow no longer has).
    pub weight: Option<f64>,
    /// Contacts sent down the branch.
    pub reached: i64,
    /// Of them, those who wrote after it, finished the flow, or were handed to a person.
    pub replied: i64,
    pub finished: i64,
    pub handed_off: i64,
    /// `replied / reached`, `finished / reached`, `handed_off / reached` (0 when none).
    pub reply_rate: f64,
    pub finish_rate: f64,
    pub handoff_rate: f64,
}

/// A flow's `split` step and how each branch did.
#[derive(Debug, Serialize, ToSchema)]
pub struct SplitReport {
    pub flow: String,
    pub step: String,
    /// The current flow's branches in their order (none reached yet: zeros), then branches
    /// only earlier versions had.
    pub branches: Vec<SplitBranch>,
}

/// The report of the split at `step` of the current `flow` ([`crate::splits::report`]):
/// `unknown_flow` or `unknown_split` (a step that is not a split, with the flow's splits
/// named) when there is none.
pub async fn split_report(
    state: &AppState,
    flow: &str,
    step: &str,
) -> Result<SplitReport, OperatorError> {
    let weights: Vec<(String, f64)> = {
        let flows = state.runtime.flows.read().expect("flows lock");
        let Some(current) = flows.get(flow) else {
            return Err(OperatorError::not_found(
                "unknown_flow",
                format!("no flow `{flow}` is running"),
            ));
        };
        let split_of = |s: &crate::flow::Step| -> Option<Vec<(String, f64)>> {
            let crate::flow::Route::Branches(branches) = &s.route else {
                return None;
            };
            let split: Vec<(String, f64)> = branches
                .iter()
                .filter_map(|b| match &b.cond {
                    crate::flow::Cond::Split { name, weight } => Some((name.clone(), *weight)),
                    _ => None,
                })
                .collect();
            (!split.is_empty()).then_some(split)
        };
        match current
            .steps
            .iter()
            .find(|s| s.id == step)
            .and_then(split_of)
        {
            Some(split) => split,
            None => {
                let splits: Vec<&str> = current
                    .steps
                    .iter()
                    .filter(|s| split_of(s).is_some())
                    .map(|s| s.id.as_str())
                    .collect();
                return Err(OperatorError::not_found(
                    "unknown_split",
                    format!(
                        "flow `{flow}` has no split step `{step}`; its splits: {}",
                        if splits.is_empty() {
                            "none".to_string()
                        } else {
                            splits.join(", ")
                        }
                    ),
                ));
            }
        }
    };
    let mut found = crate::splits::report(&state.runtime.db, Some(flow), Some(step))
        .await
        .map_err(OperatorError::failing("reading the split's report failed"))?;
    let item = |r: crate::splits::BranchReport, weight| SplitBranch {
        branch: r.counts.branch,
        weight,
        reached: r.counts.reached,
        replied: r.counts.replied,
        finished: r.counts.finished,
        handed_off: r.counts.handed_off,
        reply_rate: r.reply_rate,
        finish_rate: r.finish_rate,
        handoff_rate: r.handoff_rate,
    };
    let mut branches = Vec::new();
    for (name, weight) in weights {
        let report = match found.iter().position(|r| r.counts.branch == name) {
            Some(i) => found.remove(i),
            None => crate::splits::BranchReport {
                counts: crate::store::SplitCount {
                    flow: flow.into(),
                    step: step.into(),
                    branch: name,
                    reached: 0,
                    replied: 0,
                    finished: 0,
                    handed_off: 0,
                },
                reply_rate: 0.0,
                finish_rate: 0.0,
                handoff_rate: 0.0,
            },
        };
        branches.push(item(report, Some(weight)));
    }
    branches.extend(found.into_iter().map(|r| item(r, None)));
    Ok(SplitReport {
        flow: flow.into(),
        step: step.into(),
        branches,
    })
}
