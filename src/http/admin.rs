//! The admin API under `/api`: bearer-token auth; flows with their validation state and
//! their live reload (`POST /api/flows/reload`); a conversation with its messages and their
//! decisions; an agent's message (`POST /api/conversations/{contact}/messages`, which
//! passes the policy like every other message); the end of a handoff
//! (`POST /api/conversations/{contact}/resume`); the template registry and its sync;
//! contacts from a CSV file (`POST /api/contacts/import`). The handlers are thin over
//! [`crate::operator`] (and [`crate::contacts_import`]), which the console calls too.
//!
//! Auth: `Authorization: Bearer <admin.token>`, compared in constant time. Without a
//! configured token the API answers only on a loopback listener (the server refuses to start
//! on any other address without one, see `app::Application::build`).

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::api::{
    ApiBody, ApiPath as Path, ApiQuery as Query, ErrorBody, answer, answer_ok, idempotency_key,
    internal, json_body, optional_json_body,
};
use super::{Refused, error, refused};
use crate::contacts_import::{self, ImportError};
use crate::operator::conversations::{
    self, AgentMessage, AgentReply, ConversationDetail, ResumeRequest, Resumed,
};
use crate::operator::flows::{self, FlowList, ReloadedFlows, SplitReport};
use crate::operator::templates::{self, Synced, TemplateList};
use crate::state::AppState;

/// The routes of this module, each with its documentation (see [`super::api`]).
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_flows))
        .routes(routes!(reload_flows))
        .routes(routes!(split_report))
        .routes(routes!(conversation))
        .routes(routes!(agent_message))
        .routes(routes!(end_handoff))
        .routes(routes!(list_templates))
        .routes(routes!(sync_templates))
        .routes(routes!(import_contacts))
}

/// Checks the bearer token when one is configured ([`super::bearer`], the check every door
/// shares).
pub(super) async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = state
        .config
        .admin
        .token
        .as_ref()
        .filter(|t| !t.expose().is_empty())
    else {
        return next.run(request).await;
    };
    match super::bearer(request.headers(), expected, "admin.token") {
        Ok(()) => next.run(request).await,
        Err(refused) => *refused,
    }
}

/// The running flows, each with the diagnostics `flowgate check` gives its file now.
#[utoipa::path(get, path = "/flows", tag = "flows",
    responses(
        (status = 200, description = "The current flows with their validation state", body = FlowList),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn list_flows(State(state): State<AppState>) -> Response {
    answer_ok(flows::list(&state).await)
}

/// Loads the flows, scripts, campaigns' files and templates again; new conversations get
/// the new versions, running ones keep theirs. A project with an error is refused with 422
/// and its diagnostics, and the running flows are kept.
#[utoipa::path(post, path = "/flows/reload", tag = "flows",
    responses(
        (status = 200, description = "The flows now current, with the project's warnings", body = ReloadedFlows),
        (status = 422, description = "The project has errors (`invalid_flows`, with `diagnostics`): nothing changed", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn reload_flows(State(state): State<AppState>) -> Response {
    answer_ok(flows::reload(&state).await)
}

/// An A/B split's report: per branch of the flow's `split` step, the contacts it reached
/// and how many of them replied, finished the flow or were handed to a person.
#[utoipa::path(get, path = "/flows/{flow}/splits/{step}", tag = "flows",
    params(
        ("flow" = String, Path, description = "The flow's id"),
        ("step" = String, Path, description = "The id of its `split` step"),
    ),
    responses(
        (status = 200, description = "Each branch with its counts and rates", body = SplitReport),
        (status = 404, description = "`unknown_flow` or `unknown_split`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn split_report(
    State(state): State<AppState>,
    Path((flow, step)): Path<(String, String)>,
) -> Response {
    answer_ok(flows::split_report(&state, &flow, &step).await)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ConversationQuery {
    /// The channel (default: the default channel).
    channel: Option<String>,
    /// The latest messages to include, 1 to 500 (default 50).
    limit: Option<i64>,
}

/// One conversation: the contact, its window, session and handoff, and its latest messages,
/// each with the policy's decision and reason.
#[utoipa::path(get, path = "/conversations/{contact}", tag = "conversations",
    params(("contact" = String, Path, description = "The contact's phone number or BSUID"), ConversationQuery),
    responses(
        (status = 200, description = "The conversation with its latest messages, oldest first", body = ConversationDetail),
        (status = 400, description = "`invalid_query` or `invalid_limit`", body = ErrorBody),
        (status = 404, description = "`unknown_contact` or `unknown_channel`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn conversation(
    State(state): State<AppState>,
    Path(contact): Path<String>,
    Query(q): Query<ConversationQuery>,
) -> Response {
    answer_ok(conversations::get(&state.runtime, q.channel, contact, q.limit).await)
}

/// An agent's message: it passes the policy (sent, rewritten, queued…) and the answer says
/// what was decided and why.
#[utoipa::path(post, path = "/conversations/{contact}/messages", tag = "conversations",
    params(
        ("contact" = String, Path, description = "The contact's phone number or BSUID"),
        ("Idempotency-Key" = Option<String>, Header, description = "A retried request with the same key answers the first one's message instead of sending again"),
    ),
    request_body(content = AgentMessage, description = "`text` or `template`"),
    responses(
        (status = 201, description = "The message and the policy's decision (sent, rewritten, queued, skipped)", body = AgentReply),
        (status = 200, description = "A retry: the message the same `Idempotency-Key` created (`replayed`)", body = AgentReply),
        (status = 400, description = "`invalid_body` or `invalid_idempotency_key`", body = ErrorBody),
        (status = 404, description = "`unknown_channel`", body = ErrorBody),
        (status = 409, description = "`idempotency_key_reused`: the key was used for another contact", body = ErrorBody),
        (status = 422, description = "`invalid_body`, `invalid_text`, `unknown_template`, `template_params`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn agent_message(
    State(state): State<AppState>,
    Path(contact): Path<String>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Response {
    let steps = async {
        let key = idempotency_key(&headers)?;
        let request: AgentMessage = json_body(
            &body,
            "{\"text\": …} or {\"template\": {\"name\", \"language\", \"params\"}}",
        )?;
        Ok::<_, Refused>(
            conversations::agent_message(&state.runtime, contact, request, key.as_deref()).await,
        )
    };
    match steps.await {
        Ok(Ok(reply)) if reply.replayed => answer(StatusCode::OK, Ok(reply)),
        Ok(result) => answer(StatusCode::CREATED, result),
        Err(refused) => *refused,
    }
}

/// Gives a handed-off conversation back to the bot: at the flow (and step) given, else
/// where the handoff step goes on (its `next`; none ends the session). 409 when the
/// conversation is not with a person.
#[utoipa::path(post, path = "/conversations/{contact}/resume", tag = "conversations",
    params(
        ("contact" = String, Path, description = "The contact's phone number or BSUID"),
        ("Idempotency-Key" = Option<String>, Header, description = "A retried request with the same key answers `replayed` instead of 409"),
    ),
    request_body(content = Option<ResumeRequest>, description = "Empty, or where to resume"),
    responses(
        (status = 200, description = "The handoff ended: the session and what was sent", body = Resumed),
        (status = 400, description = "`invalid_body` or `invalid_idempotency_key`", body = ErrorBody),
        (status = 404, description = "`unknown_channel`", body = ErrorBody),
        (status = 409, description = "`not_in_handoff`, or `idempotency_key_reused`", body = ErrorBody),
        (status = 422, description = "`unknown_target`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn end_handoff(
    State(state): State<AppState>,
    Path(contact): Path<String>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Response {
    let steps = async {
        let key = idempotency_key(&headers)?;
        let request: ResumeRequest =
            optional_json_body(&body, "empty or {\"flow\": …, \"step\": …, \"channel\": …}")?;
        Ok::<_, Refused>(
            conversations::end_handoff(&state.runtime, contact, request, key.as_deref()).await,
        )
    };
    match steps.await {
        Ok(result) => answer_ok(result),
        Err(refused) => *refused,
    }
}

/// The registry as the policy sees it now (status webhooks applied).
#[utoipa::path(get, path = "/templates", tag = "templates",
    responses(
        (status = 200, description = "The registry with each template's status", body = TemplateList),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn list_templates(State(state): State<AppState>) -> Response {
    Json(templates::list(&state)).into_response()
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct SyncQuery {
    /// The `cloud_api` channel whose WABA to read; default the first one.
    channel: Option<String>,
}

/// Runs `flowgate templates sync` (the same code): reads the channel's templates from the
/// Graph API, merges them into the registry file and writes it, then reloads so the server
/// uses them.
#[utoipa::path(post, path = "/templates/sync", tag = "templates",
    params(SyncQuery),
    responses(
        (status = 200, description = "The registry file was written; `reloaded` says whether the server took it", body = Synced),
        (status = 404, description = "`unknown_channel`", body = ErrorBody),
        (status = 422, description = "`not_syncable` (no cloud_api channel, no waba_id…) or `invalid_registry`", body = ErrorBody),
        (status = 502, description = "`graph_error`: the Graph API refused or did not answer; the file is unchanged", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn sync_templates(State(state): State<AppState>, Query(q): Query<SyncQuery>) -> Response {
    answer_ok(templates::sync(&state, q.channel.as_deref()).await)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ImportQuery {
    /// The channel (default: the first configured).
    channel: Option<String>,
}

/// `POST /api/contacts/import[?channel=NAME]`: the body is a CSV file
/// (`Content-Type: text/csv`); the answer is the import's report (new, updated, unchanged,
/// each skipped line with its number and reason). A file refused as a whole is 422 and
/// writes nothing.
#[utoipa::path(post, path = "/contacts/import", tag = "contacts",
    params(ImportQuery),
    request_body(content = String, content_type = "text/csv", description = "The CSV file"),
    responses(
        (status = 200, description = "The import's report: `channel`, `created`, `updated`, `unchanged`, `skipped` (`[{\"line\", \"reason\"}]`)", body = Object),
        (status = 404, description = "`unknown_channel`", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_csv`: nothing was written", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn import_contacts(
    State(state): State<AppState>,
    Query(q): Query<ImportQuery>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let csv = match csv_body(&headers, body).await {
        Ok(csv) => csv,
        Err(refused) => return *refused,
    };
    let runtime = &state.runtime;
    let report = match contacts_import::channel(&state.config.channels, q.channel.as_deref()) {
        Ok(channel) => {
            let channel = channel.to_string();
            contacts_import::import(&runtime.db, &channel, csv, runtime.clock.now()).await
        }
        Err(e) => Err(e),
    };
    match report {
        Ok(report) => Json(report).into_response(),
        Err(e @ ImportError::UnknownChannel { .. }) => {
            error(StatusCode::NOT_FOUND, "unknown_channel", e.to_string())
        }
        Err(e @ ImportError::File(_)) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_csv",
            e.to_string(),
        ),
        Err(e) => internal("importing contacts failed", e),
    }
}

/// The largest CSV file `POST /api/contacts/import` takes: about 400,000 contacts of a
/// name, a few tags and attributes. Larger files go through `flowgate contacts import`
/// (with the server stopped) or in parts.
pub const IMPORT_MAX_BODY: usize = 32 * 1024 * 1024;

/// The CSV body of an import: `text/csv`, at most [`IMPORT_MAX_BODY`] bytes (refused by its
/// `Content-Length` before any of it is read, when it gives one).
async fn csv_body(
    headers: &axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<axum::body::Bytes, Refused> {
    use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let csv = header(CONTENT_TYPE)
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/csv"));
    if !csv {
        return Err(refused(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the CSV file as the body with `Content-Type: text/csv`",
        ));
    }
    let too_big = || {
        refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!(
                "the largest file taken is {} MiB: split it, or use `flowgate contacts import`",
                IMPORT_MAX_BODY / (1024 * 1024)
            ),
        )
    };
    let announced = header(CONTENT_LENGTH).and_then(|v| v.trim().parse::<usize>().ok());
    if announced.is_some_and(|n| n > IMPORT_MAX_BODY) {
        return Err(too_big());
    }
    axum::body::to_bytes(body, IMPORT_MAX_BODY)
        .await
        .map_err(|_| too_big())
}
