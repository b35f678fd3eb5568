//! Campaigns as an operator sees them: each with its paused state, next run and latest
//! run; one with its source; its runs; a run's report. The changes (create or replace,
//! delete, pause, resume, cancel, run now) are [`CampaignRunner`]'s; here they answer the
//! campaign as it is after the change, and their errors become [`OperatorError`]s.

use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::{OperatorError, Paging};
use crate::campaign::Campaign;
use crate::campaign::report::Report;
use crate::campaign_runner::registry::{ChangeError, RunNow, Write};
use crate::diagnostic::Diagnostics;
use crate::state::AppState;
use crate::store::{CampaignRow, RunRow};

/// Every stored campaign with its paused state, next run and latest run.
pub async fn list(state: &AppState) -> Result<Value, OperatorError> {
    let db = &state.runtime.db;
    let rows = db
        .campaigns()
        .await
        .map_err(OperatorError::failing("listing campaigns failed"))?;
    let mut list = Vec::new();
    for row in rows {
        let latest = db
            .campaign_runs(&row.name, 1)
            .await
            .map_err(OperatorError::failing("listing campaign runs failed"))?
            .pop();
        let mut item = view(state, &row);
        item["latest_run"] = latest.as_ref().map_or(Value::Null, run_json);
        list.push(item);
    }
    Ok(json!({ "campaigns": list }))
}

/// A stored campaign (without its source).
fn view(state: &AppState, row: &CampaignRow) -> Value {
    let listed = state.campaigns.listed(&row.name, row.origin);
    let mut item = json!({
        "name": row.name,
        "origin": row.origin,
        "channel": row.channel,
        "paused": row.paused,
        "pause_reason": row.pause_reason,
        "next_run_at": row.next_run_at,
        "loaded": listed.campaign.is_some(),
        "problem": listed.problem,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    });
    if let Some(c) = &listed.campaign {
        item["definition"] = definition_json(c);
    }
    item
}

/// What a compiled campaign does, briefly.
fn definition_json(c: &Campaign) -> Value {
    let when = match &c.when {
        crate::campaign::When::Cron { source, .. } => json!({ "schedule": source }),
        crate::campaign::When::At(at) => json!({ "at": at }),
    };
    let template =
        |call: &crate::flow::TemplateCall| json!({ "name": call.name, "language": call.language });
    let (single, split) = match c.variants.as_slice() {
        [one] if !c.is_split() => (template(&one.template), Value::Null),
        variants => (
            Value::Null,
            variants
                .iter()
                .map(|v| {
                    json!({
                        "name": v.name,
                        "weight": v.weight,
                        "template": template(&v.template),
                        "in_window": c.in_window_of(v).is_some(),
                    })
                })
                .collect(),
        ),
    };
    json!({
        "category": c.category,
        "template": single,
        "split": split,
        "in_window": c.in_window.is_some(),
        "audience": { "tags": c.audience.tags, "where": c.audience.filter.as_ref().map(|f| &f.source) },
        "when": when,
        "timezone": c.timezone.name(),
        "on_reply": c.on_reply,
        "ttl_seconds": c.ttl.num_seconds(),
    })
}

fn run_json(run: &RunRow) -> Value {
    json!({
        "id": run.id,
        "campaign": run.campaign,
        "status": run.status,
        "trigger": run.trigger,
        "reason": run.reason,
        "scheduled_for": run.scheduled_for,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
    })
}

/// The stored campaign `name`, or `unknown_campaign`.
async fn stored(state: &AppState, name: &str) -> Result<CampaignRow, OperatorError> {
    state
        .runtime
        .db
        .campaign(name)
        .await
        .map_err(OperatorError::failing("loading a campaign failed"))?
        .ok_or_else(|| change_error(ChangeError::Unknown(name.into())))
}

/// The campaign `name` with its source.
pub async fn get(state: &AppState, name: &str) -> Result<Value, OperatorError> {
    let row = stored(state, name).await?;
    let mut item = view(state, &row);
    item["source"] = json!(row.source);
    Ok(item)
}

/// Creates or replaces an API campaign from its YAML `source`: the campaign as saved, with
/// its warnings, and whether it was created.
pub async fn save(
    state: &AppState,
    source: &str,
    how: Write<'_>,
) -> Result<(bool, Value), OperatorError> {
    let saved = state
        .campaigns
        .create_or_replace(source, how)
        .await
        .map_err(change_error)?;
    let row = stored(state, &saved.campaign.name).await?;
    let mut item = view(state, &row);
    item["warnings"] = diagnostics_json(&saved.warnings);
    Ok((saved.created, item))
}

/// Deletes an API campaign; its runs not over are cancelled, its reports stay.
pub async fn delete(state: &AppState, name: &str) -> Result<(), OperatorError> {
    state.campaigns.delete(name).await.map_err(change_error)
}

/// Pauses `name`: the campaign as it is now.
pub async fn pause(state: &AppState, name: &str) -> Result<Value, OperatorError> {
    state.campaigns.pause(name).await.map_err(change_error)?;
    get_view(state, name).await
}

/// Resumes `name`: the campaign as it is now.
pub async fn resume(state: &AppState, name: &str) -> Result<Value, OperatorError> {
    state.campaigns.resume(name).await.map_err(change_error)?;
    get_view(state, name).await
}

/// Cancels `name`'s run not over: the campaign as it is now, with `cancelled_run`.
pub async fn cancel(state: &AppState, name: &str) -> Result<Value, OperatorError> {
    let run = state.campaigns.cancel(name).await.map_err(change_error)?;
    let mut item = get_view(state, name).await?;
    item["cancelled_run"] = json!(run);
    Ok(item)
}

async fn get_view(state: &AppState, name: &str) -> Result<Value, OperatorError> {
    Ok(view(state, &stored(state, name).await?))
}

/// Starts a run of `name` now; the same `key` for the same campaign answers the run it
/// started (`started: false`) instead of starting another.
pub async fn run_now(
    state: &AppState,
    name: &str,
    key: Option<&str>,
) -> Result<RunNow, OperatorError> {
    state
        .campaigns
        .run_now(name, key)
        .await
        .map_err(change_error)
}

/// `name`'s runs, the latest scheduled first (`limit` 1 to 500, default 50).
pub async fn runs(
    state: &AppState,
    name: &str,
    limit: Option<i64>,
) -> Result<Value, OperatorError> {
    let (_, limit) = Paging::new(None, limit).checked()?;
    let runs = state
        .runtime
        .db
        .campaign_runs(name, limit)
        .await
        .map_err(OperatorError::failing("listing campaign runs failed"))?;
    if runs.is_empty() {
        stored(state, name).await?;
    }
    Ok(json!({ "runs": runs.iter().map(run_json).collect::<Vec<_>>() }))
}

/// Run `id` of `name` and its report.
pub async fn run_report(state: &AppState, name: &str, id: i64) -> Result<RunReport, OperatorError> {
    let run = state
        .runtime
        .db
        .run(id)
        .await
        .map_err(OperatorError::failing("loading a run failed"))?
        .filter(|run| run.campaign == name)
        .ok_or_else(|| {
            OperatorError::not_found(
                "unknown_run",
                format!(
                    "campaign `{name}` has no run {id}; `GET /api/campaigns/{name}/runs` lists them"
                ),
            )
        })?;
    report(state, &run).await
}

/// `name`'s latest run and its report; `no_runs` when it has not run yet.
pub async fn latest_report(state: &AppState, name: &str) -> Result<RunReport, OperatorError> {
    stored(state, name).await?;
    let run = state
        .runtime
        .db
        .campaign_runs(name, 1)
        .await
        .map_err(OperatorError::failing("listing campaign runs failed"))?
        .pop()
        .ok_or_else(|| {
            OperatorError::not_found(
                "no_runs",
                format!(
                    "campaign `{name}` has not run yet: `POST /api/campaigns/{name}/run-now` starts a run"
                ),
            )
        })?;
    report(state, &run).await
}

/// A run and its report, as the API answers them.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunReport {
    /// The run: id, campaign, status, trigger, reason and its times.
    #[schema(value_type = Object)]
    pub run: Value,
    pub report: Report,
}

/// A run and its report (the one `flowgate campaign report` prints).
async fn report(state: &AppState, run: &RunRow) -> Result<RunReport, OperatorError> {
    let window = state.config.policy.window.0;
    let report = state
        .campaigns
        .report(run, window, state.config.campaign_prices.as_ref())
        .await
        .map_err(OperatorError::failing("reading a run's report failed"))?;
    Ok(RunReport {
        run: run_json(run),
        report,
    })
}

/// Diagnostics as JSON: each with its place, and the text `check` prints.
fn diagnostics_json(diags: &Diagnostics) -> Value {
    let items: Vec<Value> = diags
        .sorted()
        .into_iter()
        .map(|d| {
            json!({
                "severity": if d.is_error() { "error" } else { "warning" },
                "message": d.message,
                "file": d.file,
                "line": d.loc.map(|l| l.line),
                "column": d.loc.map(|l| l.col),
                "position": d.position(),
                "help": d.help,
            })
        })
        .collect();
    json!({ "items": items, "rendered": diags.render(false) })
}

/// A refused change as the operator's error.
fn change_error(e: ChangeError) -> OperatorError {
    let message = e.to_string();
    let conflict = |code| OperatorError::conflict(code, message.clone());
    match &e {
        ChangeError::Invalid(diags) => OperatorError::Diagnosed {
            code: "invalid_campaign",
            message: format!(
                "{message}: fix the problems below (`flowgate check` shows the same for a file)"
            ),
            diagnostics: diagnostics_json(diags),
        },
        ChangeError::FileCampaign(_) => conflict("file_campaign"),
        ChangeError::Unknown(_) => OperatorError::not_found("unknown_campaign", message),
        ChangeError::Exists(_) => conflict("campaign_exists"),
        ChangeError::NameMismatch { .. } => OperatorError::unprocessable("name_mismatch", message),
        ChangeError::Paused(_) => conflict("campaign_paused"),
        ChangeError::Busy { .. } => conflict("run_active"),
        ChangeError::NoActiveRun(_) => conflict("no_active_run"),
        ChangeError::Broken { .. } => conflict("campaign_broken"),
        ChangeError::Runner(e) => OperatorError::failed("a campaign change failed", e),
    }
}
