//! The campaign API under `/api/campaigns` (behind the admin token, like all of `/api`):
//! list, create, read, replace and delete definitions; pause, resume, cancel and run now;
//! a campaign's runs and a run's report.
//!
//! A definition is sent as the campaign's YAML text (`Content-Type: application/yaml`, or
//! `text/yaml`), or as JSON `{"source": "<the YAML text>"}`; an invalid one is 422 with the
//! diagnostics `flowgate check` would print, located in the text sent. `run-now` takes an
//! `Idempotency-Key` header: the same key for the same campaign answers the run it started
//! (200) instead of starting another (201). Errors are `{"error": {"code", "message"}}`.
//! The handlers are thin over [`crate::operator::campaigns`].

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::api::{
    ApiPath as Path, ApiQuery as Query, ErrorBody, answer, answer_ok, idempotency_key,
};
use super::{Refused, refused};
use crate::campaign_runner::registry::Write;
use crate::operator::campaigns;
use crate::state::AppState;

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
    answer_ok(campaigns::list(&state).await)
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
    answer_ok(campaigns::get(&state, &name).await)
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

/// A definition saved: 201 when it was created, 200 when it replaced one.
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
    match campaigns::save(state, &source, how).await {
        Ok((true, item)) => answer(StatusCode::CREATED, Ok(item)),
        result => answer_ok(result.map(|(_, item)| item)),
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
    match campaigns::delete(&state, &name).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => *Refused::from(e),
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
    answer_ok(campaigns::pause(&state, &name).await)
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
    answer_ok(campaigns::resume(&state, &name).await)
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
    answer_ok(campaigns::cancel(&state, &name).await)
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
    let run = campaigns::run_now(&state, &name, key.as_deref()).await;
    let status = match &run {
        Ok(run) if !run.started => StatusCode::OK,
        _ => StatusCode::CREATED,
    };
    answer(
        status,
        run.map(|run| {
            json!({
                "run": run.run_id,
                "started": run.started,
                "recipients": run.recipients,
            })
        }),
    )
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
    answer_ok(campaigns::runs(&state, &name, q.limit).await)
}

/// `GET /api/campaigns/{name}/runs/{id}`: the run and its report.
#[utoipa::path(get, path = "/campaigns/{name}/runs/{id}", tag = "campaigns",
    params(("name" = String, Path, description = "The campaign's name"), ("id" = i64, Path, description = "The run's id")),
    responses(
        (status = 200, description = "The run's report: sent, delivered, read, replied, failed by code, skipped by reason, cost; for a split campaign, `variants`: the same measures per variant with its `share` of the recipients", body = campaigns::RunReport),
        (status = 404, description = "`unknown_campaign` or `unknown_run`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn run_report(
    State(state): State<AppState>,
    Path((name, id)): Path<(String, i64)>,
) -> Response {
    answer_ok(campaigns::run_report(&state, &name, id).await)
}

/// `GET /api/campaigns/{name}/report`: the latest run and its report.
#[utoipa::path(get, path = "/campaigns/{name}/report", tag = "campaigns",
    params(("name" = String, Path, description = "The campaign's name")),
    responses(
        (status = 200, description = "The latest run's report: sent, delivered, read, replied, failed by code, skipped by reason, cost; for a split campaign, `variants`: the same measures per variant with its `share` of the recipients", body = campaigns::RunReport),
        (status = 404, description = "`unknown_campaign`, or `no_runs`: it has not run yet", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn latest_report(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    answer_ok(campaigns::latest_report(&state, &name).await)
}
