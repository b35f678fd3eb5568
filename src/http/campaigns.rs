//! The campaign API under `/api/campaigns` (behind the admin token, like all of `/api`):
//! list, create, read, replace and delete definitions; pause, resume, cancel and run now;
//! a campaign's runs and a run's report.
//!
//! A definition is sent as the campaign's YAML text (`Content-Type: application/yaml`, or
//! `text/yaml`), or as JSON `{"source": "<the YAML text>"}`; an invalid one is 422 with the
//! diagnostics `flowgate check` would print, located in the text sent. `run-now` takes an
//! `Idempotency-Key` header: the same key for the same campaign answers the run it started
//! (200) instead of starting another (201). Errors are `{"error": {"code", "message"}}`.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::api::{
    ApiPath, ApiPath as Path, ApiQuery as Query, ErrorBody, idempotency_key, internal,
};
use super::{Refused, error, refused};
use crate::campaign::Campaign;
use crate::campaign_runner::registry::{ChangeError, Write};
use crate::diagnostic::Diagnostics;
use crate::state::AppState;
use crate::store::{CampaignRow, RunRow};

/// The largest definition taken: a campaign file is a few hundred bytes.
const MAX_BODY: usize = 1024 * 1024;

/// The campaign routes, each with its documentation (see [`super::api`]).
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_campaigns, create_campaign))
        .routes(routes!(show_campaign, replace_campaign, delete_campaign))
        .routes(routes!(pause_campaign))
        .routes(routes!(resume_campaign))
        .routes(routes!(cancel_campaign))
        .routes(routes!(run_now))
        .routes(routes!(list_runs))
        .routes(routes!(run_report))
        .routes(routes!(latest_report))
}

/// `GET /api/campaigns`: every stored campaign with its paused state, next run and latest
/// run.
#[utoipa::path(get, path = "/campaigns", tag = "campaigns",
    responses(
        (status = 200, description = "Every campaign with its paused state, next run and latest run", body = Object),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn list_campaigns(State(state): State<AppState>) -> Response {
    let db = &state.runtime.db;
    let rows = match db.campaigns().await {
        Ok(rows) => rows,
        Err(e) => return internal("listing campaigns failed", e),
    };
    let mut list = Vec::new();
    for row in rows {
        let latest = match db.campaign_runs(&row.name, 1).await {
            Ok(mut runs) => runs.pop(),
            Err(e) => return internal("listing campaign runs failed", e),
        };
        let mut item = campaign_json(&state, &row);
        item["latest_run"] = latest.as_ref().map_or(Value::Null, run_json);
        list.push(item);
    }
    Json(json!({ "campaigns": list })).into_response()
}

/// A stored campaign as the API shows it (without its source).
fn campaign_json(state: &AppState, row: &CampaignRow) -> Value {
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
    json!({
        "category": c.category,
        "template": { "name": c.template.name, "language": c.template.language },
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

/// `GET /api/campaigns/{name}`: the campaign with its source.
#[utoipa::path(get, path = "/campaigns/{name}", tag = "campaigns",
    params(("name" = String, Path, description = "The campaign's name")),
    responses(
        (status = 200, description = "The campaign with its source", body = Object),
        (status = 404, description = "`unknown_campaign`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn show_campaign(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    match stored(&state, &name).await {
        Ok(row) => {
            let mut item = campaign_json(&state, &row);
            item["source"] = json!(row.source);
            Json(item).into_response()
        }
        Err(refused) => *refused,
    }
}

/// The stored campaign `name`, or 404.
async fn stored(state: &AppState, name: &str) -> Result<CampaignRow, Refused> {
    match state.runtime.db.campaign(name).await {
        Ok(Some(row)) => Ok(row),
        Ok(None) => Err(Box::new(change_error(ChangeError::Unknown(name.into())))),
        Err(e) => Err(Box::new(internal("loading a campaign failed", e))),
    }
}

/// `POST /api/campaigns`: a new campaign (201); 409 when the name exists.
#[utoipa::path(post, path = "/campaigns", tag = "campaigns",
    request_body(content = String, content_type = "application/yaml", description = "The campaign's YAML (or JSON `{\"source\": \"<YAML>\"}`)"),
    responses(
        (status = 201, description = "The campaign was created", body = Object),
        (status = 409, description = "`campaign_exists` or `file_campaign`", body = ErrorBody),
        (status = 422, description = "`invalid_campaign`, with the diagnostics", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn create_campaign(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    write(&state, &headers, body, Write::Create).await
}

/// `PUT /api/campaigns/{name}`: creates (201) or replaces (200) the API campaign `name`.
#[utoipa::path(put, path = "/campaigns/{name}", tag = "campaigns",
    params(("name" = String, Path, description = "The campaign's name")),
    request_body(content = String, content_type = "application/yaml", description = "The campaign's YAML (or JSON `{\"source\": \"<YAML>\"}`)"),
    responses(
        (status = 200, description = "The campaign was replaced (or created)", body = Object),
        (status = 409, description = "`file_campaign`: edit the file", body = ErrorBody),
        (status = 422, description = "`invalid_campaign`, with the diagnostics", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn replace_campaign(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    write(&state, &headers, body, Write::Put(&name)).await
}

async fn write(
    state: &AppState,
    headers: &HeaderMap,
    body: axum::body::Body,
    how: Write<'_>,
) -> Response {
    let source = match definition(headers, body).await {
        Ok(source) => source,
        Err(refused) => return *refused,
    };
    match state.campaigns.create_or_replace(&source, how).await {
        Ok(saved) => {
            let status = if saved.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let row = match stored(state, &saved.campaign.name).await {
                Ok(row) => row,
                Err(refused) => return *refused,
            };
            let mut item = campaign_json(state, &row);
            item["warnings"] = diagnostics_json(&saved.warnings);
            (status, Json(item)).into_response()
        }
        Err(e) => change_error(e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceBody {
    source: String,
}

/// A definition's text: a YAML body, or JSON `{"source": …}`.
async fn definition(headers: &HeaderMap, body: axum::body::Body) -> Result<String, Refused> {
    let kind = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let bytes = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("a campaign definition is at most {} KiB", MAX_BODY / 1024),
        )
    })?;
    let invalid = |what: String| refused(StatusCode::BAD_REQUEST, "invalid_body", what);
    if kind.starts_with("application/json") {
        let body: SourceBody = serde_json::from_slice(&bytes).map_err(|e| {
            invalid(format!(
                "the JSON body must be {{\"source\": \"<the campaign's YAML>\"}}: {e}"
            ))
        })?;
        return Ok(body.source);
    }
    let yaml = [
        "application/yaml",
        "application/x-yaml",
        "text/yaml",
        "text/x-yaml",
    ];
    if !yaml.iter().any(|t| kind.starts_with(t)) {
        return Err(refused(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the campaign's YAML with `Content-Type: application/yaml`, or JSON {\"source\": …} with `Content-Type: application/json`",
        ));
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| invalid("the YAML body is not UTF-8".into()))
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

/// A refused change as its answer.
fn change_error(e: ChangeError) -> Response {
    let message = e.to_string();
    let (status, code) = match &e {
        ChangeError::Invalid(diags) => {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"error": {
                    "code": "invalid_campaign",
                    "message": format!("{message}: fix the problems below (`flowgate check` shows the same for a file)"),
                    "diagnostics": diagnostics_json(diags),
                }})),
            )
                .into_response();
        }
        ChangeError::FileCampaign(_) => (StatusCode::CONFLICT, "file_campaign"),
        ChangeError::Unknown(_) => (StatusCode::NOT_FOUND, "unknown_campaign"),
        ChangeError::Exists(_) => (StatusCode::CONFLICT, "campaign_exists"),
        ChangeError::NameMismatch { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "name_mismatch"),
        ChangeError::Paused(_) => (StatusCode::CONFLICT, "campaign_paused"),
        ChangeError::Busy { .. } => (StatusCode::CONFLICT, "run_active"),
        ChangeError::NoActiveRun(_) => (StatusCode::CONFLICT, "no_active_run"),
        ChangeError::Broken { .. } => (StatusCode::CONFLICT, "campaign_broken"),
        ChangeError::Runner(e) => return internal("a campaign change failed", e),
    };
    error(status, code, message)
}

/// `DELETE /api/campaigns/{name}`: an API campaign; its runs not over are cancelled.
#[utoipa::path(delete, path = "/campaigns/{name}", tag = "campaigns",
    params(("name" = String, Path, description = "The campaign's name")),
    responses(
        (status = 200, description = "Deleted; its run not over was cancelled", body = Object),
        (status = 404, description = "`unknown_campaign`", body = ErrorBody),
        (status = 409, description = "`file_campaign`: delete the file", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn delete_campaign(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    match state.campaigns.delete(&name).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => change_error(e),
    }
}

/// `POST /api/campaigns/{name}/pause`.
#[utoipa::path(post, path = "/campaigns/{name}/pause", tag = "campaigns",
    params(("name" = String, Path, description = "The campaign's name")),
    responses(
        (status = 200, description = "Paused, with its run", body = Object),
        (status = 404, description = "`unknown_campaign`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn pause_campaign(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let done = state.campaigns.pause(&name).await;
    control(&state, &name, done.map(|()| Value::Null)).await
}

/// `POST /api/campaigns/{name}/resume`.
#[utoipa::path(post, path = "/campaigns/{name}/resume", tag = "campaigns",
    params(("name" = String, Path, description = "The campaign's name")),
    responses(
        (status = 200, description = "Resumed, with its run", body = Object),
        (status = 404, description = "`unknown_campaign`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn resume_campaign(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let done = state.campaigns.resume(&name).await;
    control(&state, &name, done.map(|()| Value::Null)).await
}

/// `POST /api/campaigns/{name}/cancel`: the run not over.
#[utoipa::path(post, path = "/campaigns/{name}/cancel", tag = "campaigns",
    params(("name" = String, Path, description = "The campaign's name")),
    responses(
        (status = 200, description = "Its run not over was cancelled", body = Object),
        (status = 404, description = "`unknown_campaign`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn cancel_campaign(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let done = state.campaigns.cancel(&name).await;
    control(&state, &name, done.map(|run| json!(run))).await
}

/// A control's answer: the campaign as it is now (with `cancelled_run` when one was).
async fn control(state: &AppState, name: &str, done: Result<Value, ChangeError>) -> Response {
    let cancelled = match done {
        Ok(run) => run,
        Err(e) => return change_error(e),
    };
    match stored(state, name).await {
        Ok(row) => {
            let mut item = campaign_json(state, &row);
            if !cancelled.is_null() {
                item["cancelled_run"] = cancelled;
            }
            Json(item).into_response()
        }
        Err(refused) => *refused,
    }
}

/// `POST /api/campaigns/{name}/run-now`: 201 with the new run, or 200 with the run a
/// repeated `Idempotency-Key` started.
#[utoipa::path(post, path = "/campaigns/{name}/run-now", tag = "campaigns",
    params(("name" = String, Path, description = "The campaign's name"),
        ("Idempotency-Key" = Option<String>, Header, description = "The same key for the same campaign answers the run it started")),
    responses(
        (status = 201, description = "A run started, with its recipients' count", body = Object),
        (status = 200, description = "A retry: the run the same key started", body = Object),
        (status = 404, description = "`unknown_campaign`", body = ErrorBody),
        (status = 409, description = "`run_active` or `campaign_paused`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn run_now(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let key = match idempotency_key(&headers) {
        Ok(key) => key,
        Err(refused) => return *refused,
    };
    match state.campaigns.run_now(&name, key.as_deref()).await {
        Ok(run) => {
            let status = if run.started {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let body = json!({
                "run": run.run_id,
                "started": run.started,
                "recipients": run.recipients,
            });
            (status, Json(body)).into_response()
        }
        Err(e) => change_error(e),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct RunsQuery {
    /// Runs to list, 1 to 500 (default 50).
    limit: Option<i64>,
}

/// `GET /api/campaigns/{name}/runs[?limit=N]`: the latest scheduled first (default 50).
#[utoipa::path(get, path = "/campaigns/{name}/runs", tag = "campaigns",
    params(("name" = String, Path, description = "The campaign's name"), RunsQuery),
    responses(
        (status = 200, description = "The campaign's runs, newest first", body = Object),
        (status = 400, description = "`invalid_query` or `invalid_limit`", body = ErrorBody),
        (status = 404, description = "`unknown_campaign`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn list_runs(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<RunsQuery>,
) -> Response {
    let limit = match crate::operator::Paging::new(None, q.limit).checked() {
        Ok((_, limit)) => limit,
        Err(e) => return *Refused::from(e),
    };
    match state.runtime.db.campaign_runs(&name, limit).await {
        Ok(runs) if runs.is_empty() => match stored(&state, &name).await {
            Ok(_) => Json(json!({ "runs": [] })).into_response(),
            Err(refused) => *refused,
        },
        Ok(runs) => {
            Json(json!({ "runs": runs.iter().map(run_json).collect::<Vec<_>>() })).into_response()
        }
        Err(e) => internal("listing campaign runs failed", e),
    }
}

/// `GET /api/campaigns/{name}/runs/{id}`: the run and its report.
#[utoipa::path(get, path = "/campaigns/{name}/runs/{id}", tag = "campaigns",
    params(("name" = String, Path, description = "The campaign's name"), ("id" = i64, Path, description = "The run's id")),
    responses(
        (status = 200, description = "The run's report: sent, delivered, read, replied, failed by code, skipped by reason, cost", body = Object),
        (status = 404, description = "`unknown_campaign` or `unknown_run`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn run_report(
    State(state): State<AppState>,
    ApiPath((name, id)): ApiPath<(String, i64)>,
) -> Response {
    let run = match state.runtime.db.run(id).await {
        Ok(Some(run)) if run.campaign == name => run,
        Ok(_) => {
            return error(
                StatusCode::NOT_FOUND,
                "unknown_run",
                format!(
                    "campaign `{name}` has no run {id}; `GET /api/campaigns/{name}/runs` lists them"
                ),
            );
        }
        Err(e) => return internal("loading a run failed", e),
    };
    report(&state, &run).await
}

/// `GET /api/campaigns/{name}/report`: the latest run and its report.
#[utoipa::path(get, path = "/campaigns/{name}/report", tag = "campaigns",
    params(("name" = String, Path, description = "The campaign's name")),
    responses(
        (status = 200, description = "The latest run's report: sent, delivered, read, replied, failed by code, skipped by reason, cost", body = Object),
        (status = 404, description = "`unknown_campaign`, or `no_runs`: it has not run yet", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn latest_report(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    if let Err(refused) = stored(&state, &name).await {
        return *refused;
    }
    match state.runtime.db.campaign_runs(&name, 1).await {
        Ok(mut runs) => match runs.pop() {
            Some(run) => report(&state, &run).await,
            None => error(
                StatusCode::NOT_FOUND,
                "no_runs",
                format!(
                    "campaign `{name}` has not run yet: `POST /api/campaigns/{name}/run-now` starts a run"
                ),
            ),
        },
        Err(e) => internal("listing campaign runs failed", e),
    }
}

/// A run and its report (the one `flowgate campaign report` prints).
async fn report(state: &AppState, run: &RunRow) -> Response {
    let window = state.config.policy.window.0;
    match state
        .campaigns
        .report(run, window, state.config.campaign_prices.as_ref())
        .await
    {
        Ok(report) => Json(json!({ "run": run_json(run), "report": report })).into_response(),
        Err(e) => internal("reading a run's report failed", e),
    }
}
