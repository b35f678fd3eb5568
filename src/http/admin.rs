//! The admin API under `/api`: bearer-token auth; flows and their live reload
//! (`POST /api/flows/reload`); a conversation's state (with its window) and messages; an
//! agent's message (`POST /api/conversations/{contact}/messages`, which passes the policy
//! like every other message); the end of a handoff
//! (`POST /api/conversations/{contact}/resume`); one message with its decision
//! (`GET /api/messages/{id}`); the template registry; contacts from a CSV file
//! (`POST /api/contacts/import`).
//!
//! Auth: `Authorization: Bearer <admin.token>`, compared in constant time. Without a
//! configured token the API answers only on a loopback listener (the server refuses to start
//! on any other address without one, see `app::Application::build`).

use axum::Json;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::api::{ApiPath, ErrorBody};
use super::{Refused, error, refused};
use crate::commands::templates_sync::{self, SyncError};
use crate::contacts_import::{self, ImportError};
use crate::diagnostic::Diagnostic;
use crate::dispatch::Runtime;
use crate::domain::{OutboundContent, limits};
use crate::engine::Handled;
use crate::flow::load::load_project;
use crate::policy::Window;
use crate::reload::{self, ReloadError};
use crate::state::AppState;
use crate::store::{ApiRequest, Identifiers};

/// The routes of this module, each with its documentation (see [`super::api`]).
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(flows))
        .routes(routes!(reload_flows))
        .routes(routes!(conversation))
        .routes(routes!(agent_message))
        .routes(routes!(resume))
        .routes(routes!(message))
        .routes(routes!(templates))
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

/// One current flow with its validation state: the diagnostics `flowgate check` gives its
/// file now (the files as they are on disk, which may differ from the running version).
#[derive(Debug, serde::Serialize, ToSchema)]
pub(super) struct FlowItem {
    id: String,
    version: String,
    description: Option<String>,
    file: String,
    steps: Vec<String>,
    /// No errors in its file now: a reload would take it.
    valid: bool,
    diagnostics: Vec<DiagnosticItem>,
}

/// One problem `flowgate check` reports.
#[derive(Debug, serde::Serialize, ToSchema)]
pub(super) struct DiagnosticItem {
    /// `error` or `warning`.
    severity: String,
    /// `file:line:col`.
    position: String,
    message: String,
    help: Option<String>,
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

#[derive(Debug, serde::Serialize, ToSchema)]
pub(super) struct FlowList {
    flows: Vec<FlowItem>,
    /// Diagnostics of the project's other files (templates, campaigns, flows that do not
    /// run), so an error that would refuse a reload is never hidden.
    other: Vec<DiagnosticItem>,
    errors: usize,
    warnings: usize,
}

/// The running flows, each with the diagnostics `flowgate check` gives its file now.
#[utoipa::path(get, path = "/flows", tag = "flows",
    responses(
        (status = 200, description = "The current flows with their validation state", body = FlowList),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn flows(State(state): State<AppState>) -> Response {
    match flow_list(&state).await {
        Ok(list) => Json(list).into_response(),
        Err(e) => internal("checking the flows failed", e),
    }
}

/// The running flows with the diagnostics `flowgate check` gives their files now (the API's
/// `GET /api/flows`, the console's flows page).
pub(super) async fn flow_list(state: &AppState) -> Result<FlowList, tokio::task::JoinError> {
    let scripting = state.runtime.engine.scripting.clone();
    let config = state.config.clone();
    let project = tokio::task::spawn_blocking(move || load_project(&config, &scripting)).await?;
    let diagnostics = project.diagnostics;
    let flows = state.runtime.flows.read().expect("flows lock");
    let of_file = |file: &str| -> Vec<&Diagnostic> {
        diagnostics
            .sorted()
            .into_iter()
            .filter(|d| d.file == file)
            .collect()
    };
    let list: Vec<FlowItem> = flows
        .current()
        .iter()
        .map(|f| {
            let found = of_file(&f.file);
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
    let other = diagnostics
        .sorted()
        .into_iter()
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

/// `POST /api/flows/reload`: loads the flows, scripts and templates again; new
/// conversations get the new versions, running ones keep theirs. A project with an error
/// is refused with 422 and its diagnostics, and the running flows are kept.
#[utoipa::path(post, path = "/flows/reload", tag = "flows",
    responses(
        (status = 200, description = "The flows now current, with the project's warnings", body = Object),
        (status = 422, description = "The project has errors (`invalid_flows`, with `diagnostics`): nothing changed", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn reload_flows(State(state): State<AppState>) -> Response {
    match reload::reload(&state.runtime, &state.config, &state.campaigns).await {
        Ok(done) => Json(json!({
            "flows": done.flows.iter().map(|(id, version)| json!({"id": id, "version": version})).collect::<Vec<_>>(),
            "warnings": done.warnings.warnings(),
            "diagnostics": done.warnings.render(false),
        }))
        .into_response(),
        Err(ReloadError::Refused(diags)) => {
            tracing::error!(diagnostics = %diags.render(false), "the flows were not reloaded: they have errors; the running flows are kept");
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"error": {
                    "code": "invalid_flows",
                    "message": format!("the flows have {} error(s): nothing was reloaded, the running flows are kept; fix them (`flowgate check` shows the same) and reload again", diags.errors()),
                    "diagnostics": diags.render(false),
                }})),
            )
                .into_response()
        }
        Err(e) => internal("reloading the flows failed", e),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ChannelQuery {
    channel: Option<String>,
    limit: Option<i64>,
}

#[utoipa::path(get, path = "/conversations/{contact}", tag = "conversations",
    params(("contact" = String, Path, description = "The contact's phone number or BSUID"), ChannelQuery),
    responses(
        (status = 200, description = "The contact, its window, session and latest messages with their decisions", body = Object),
        (status = 404, description = "`unknown_contact` or `unknown_channel`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn conversation(
    State(state): State<AppState>,
    Path(contact): Path<String>,
    Query(q): Query<ChannelQuery>,
) -> Response {
    match conversation_view(&state.runtime, q.channel, contact, q.limit).await {
        Ok(view) => Json(view).into_response(),
        Err(refused) => *refused,
    }
}

/// One conversation as the API answers it (and the console shows it): the contact, its
/// window, session and latest `limit` messages (default 50) with their decisions.
pub(super) async fn conversation_view(
    runtime: &Runtime,
    channel: Option<String>,
    contact: String,
    limit: Option<i64>,
) -> Result<serde_json::Value, Refused> {
    let channel = known_channel(runtime, channel)?;
    let contact = contact_key(runtime, &channel, contact).await?;
    let conversation = runtime
        .db
        .load_conversation(&channel, &contact)
        .await
        .map_err(|e| Box::new(internal("loading a conversation failed", e)))?;
    let Some(contact_id) = conversation.contact_id else {
        return Err(refused(
            StatusCode::NOT_FOUND,
            "unknown_contact",
            format!("no contact `{contact}` on channel `{channel}`"),
        ));
    };
    let messages = runtime
        .db
        .messages(&channel, &contact, limit.unwrap_or(50).clamp(1, 500))
        .await
        .map_err(|e| Box::new(internal("loading messages failed", e)))?;
    let now = runtime.clock.now();
    let window = runtime.policy.window(&conversation.contact, now);
    Ok(json!({
        "id": contact_id,
        "channel": channel,
        "window": window_json(&window, now),
        "contact": conversation.contact,
        "session": conversation.session.map(|s| json!({
            "flow": s.flow_id, "version": s.flow_version, "step": s.step, "state": s.state,
        })),
        "messages": messages.iter().map(|m| json!({
            "id": m.id, "direction": m.direction, "wamid": m.wamid, "kind": m.kind, "body": m.body,
            "decision": m.decision, "reason": m.reason, "status": m.status, "created_at": m.created_at,
        })).collect::<Vec<_>>(),
    }))
}

/// `GET /api/templates`: the registry as the policy sees it now (status webhooks applied).
#[utoipa::path(get, path = "/templates", tag = "templates",
    responses(
        (status = 200, description = "The registry with each template's status", body = Object),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn templates(State(state): State<AppState>) -> Response {
    let registry = state.runtime.templates();
    let list: Vec<_> = registry
        .templates
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "language": t.language,
                "category": t.category,
                "status": t.status.as_str(),
                "params": t.param_count(),
                "body": t.body,
            })
        })
        .collect();
    Json(json!({ "templates": list })).into_response()
}

/// The largest CSV file `POST /api/contacts/import` takes: about 400,000 contacts of a
/// name, a few tags and attributes. Larger files go through `flowgate contacts import`
/// (with the server stopped) or in parts.
pub const IMPORT_MAX_BODY: usize = 32 * 1024 * 1024;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ImportQuery {
    channel: Option<String>,
}

/// `POST /api/contacts/import[?channel=NAME]`: the body is a CSV file
/// (`Content-Type: text/csv`); the answer is the import's report (new, updated, unchanged,
/// each skipped line with its reason). A file refused as a whole is 422 and writes nothing.
#[utoipa::path(post, path = "/contacts/import", tag = "contacts",
    params(ImportQuery),
    request_body(content = String, content_type = "text/csv", description = "The CSV file"),
    responses(
        (status = 200, description = "The import's report (new, updated, unchanged, skipped lines with reasons)", body = Object),
        (status = 404, description = "`unknown_channel`", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_csv`: nothing was written", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn import_contacts(
    State(state): State<AppState>,
    Query(q): Query<ImportQuery>,
    headers: axum::http::HeaderMap,
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

/// A 500 for a failure of ours: the detail goes to the log, not to the caller.
pub(super) fn internal(what: &str, e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "{what}");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the database failed; see the server log",
    )
}

/// A contact's window for the API: its state, when it closes or closed, and the sentence the
/// policy gives as a reason.
fn window_json(window: &Window, now: chrono::DateTime<chrono::Utc>) -> serde_json::Value {
    json!(super::contacts::WindowView::of(window, now))
}

/// `POST /api/conversations/{contact}/messages`: `{"text": "…"}` or
/// `{"template": {"name": …, "language": …, "params": […]}}`, optionally `"channel"`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct AgentMessage {
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    template: Option<TemplateRequest>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct TemplateRequest {
    name: String,
    language: String,
    #[serde(default)]
    params: Vec<String>,
}

/// The channel an API call names (the default channel when it names none), if it exists.
pub(super) fn known_channel(runtime: &Runtime, channel: Option<String>) -> Result<String, Refused> {
    let channel = channel.unwrap_or_else(|| runtime.default_channel.clone());
    if !runtime.channels.iter().any(|c| c.name == channel) {
        return Err(refused(
            StatusCode::NOT_FOUND,
            "unknown_channel",
            format!("there is no channel `{channel}`"),
        ));
    }
    Ok(channel)
}

/// The key of the contact an operator names by phone or by BSUID (a current or an old
/// one); a contact never seen keeps the identifier given.
pub(super) async fn contact_key(
    runtime: &Runtime,
    channel: &str,
    identifier: String,
) -> Result<String, Refused> {
    let ids = Identifiers::of(&identifier);
    match runtime
        .db
        .resolve_contact(channel, ids, runtime.clock.now())
        .await
    {
        Ok(resolved) => Ok(resolved.map_or(identifier, |r| r.key)),
        Err(e) => Err(Box::new(internal("finding a contact failed", e))),
    }
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
        (status = 201, description = "The message and the policy's decision (sent, rewritten, queued, skipped)", body = Object),
        (status = 200, description = "A retry: the message the same `Idempotency-Key` created", body = Object),
        (status = 400, description = "`invalid_body`", body = ErrorBody),
        (status = 404, description = "`unknown_channel`", body = ErrorBody),
        (status = 409, description = "`idempotency_key_reused`: the key was used for another contact", body = ErrorBody),
        (status = 422, description = "`invalid_text`, `unknown_template`, `template_params`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn agent_message(
    State(state): State<AppState>,
    Path(contact): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let key = match idempotency_key(&headers) {
        Ok(key) => key,
        Err(refused) => return *refused,
    };
    let runtime = &state.runtime;
    let answer = match key {
        None => send_agent_message(runtime, contact, &body).await,
        Some(key) => {
            // One keyed message at a time: a retry racing its first attempt waits for it
            // and finds its key.
            let _one = KEYED_MESSAGES.lock().await;
            keyed_agent_message(runtime, contact, &body, &key).await
        }
    };
    answer.unwrap_or_else(|refused| *refused)
}

/// Serializes agent messages that carry an `Idempotency-Key` (see [`keyed_agent_message`]).
static KEYED_MESSAGES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The scope of agent messages' keys in `api_requests`.
const AGENT_MESSAGE_SCOPE: &str = "agent_message";

/// The request's `Idempotency-Key`, if it has one: 1 to 255 visible ASCII characters.
pub(super) fn idempotency_key(headers: &axum::http::HeaderMap) -> Result<Option<String>, Refused> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key) if !key.trim().is_empty() && key.len() <= 255 => Ok(Some(key.trim().to_string())),
        _ => Err(refused(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            "`Idempotency-Key` must be 1 to 255 visible ASCII characters (a UUID is a good key)",
        )),
    }
}

/// [`send_agent_message`] under an `Idempotency-Key`: a key seen before answers the message
/// it created (200) instead of sending again; a key used for another contact is refused.
async fn keyed_agent_message(
    runtime: &Runtime,
    contact: String,
    body: &[u8],
    key: &str,
) -> Result<Response, Refused> {
    let failed = |e: crate::store::StoreError| Box::new(internal("an idempotency key failed", e));
    let channel = serde_json::from_slice::<AgentMessage>(body)
        .ok()
        .and_then(|m| m.channel);
    let channel = known_channel(runtime, channel)?;
    let subject = format!(
        "{channel}/{}",
        contact_key(runtime, &channel, contact.clone()).await?
    );
    if let Some(seen) = runtime
        .db
        .api_request(AGENT_MESSAGE_SCOPE, key)
        .await
        .map_err(failed)?
    {
        if seen.subject != subject {
            return Err(refused(
                StatusCode::CONFLICT,
                "idempotency_key_reused",
                format!(
                    "`Idempotency-Key` {key} was used for a message to {}: use a new key for each message",
                    seen.subject
                ),
            ));
        }
        return replayed_message(runtime, seen.message_id).await;
    }
    let (response, message_id) = send_agent_message_with_id(runtime, contact, body).await?;
    let request = ApiRequest {
        subject,
        message_id,
    };
    runtime
        .db
        .remember_api_request(AGENT_MESSAGE_SCOPE, key, &request, runtime.clock.now())
        .await
        .map_err(failed)?;
    Ok(response)
}

/// The answer to a retried agent message: the message its key created, as it is now.
async fn replayed_message(runtime: &Runtime, id: i64) -> Result<Response, Refused> {
    let m = runtime
        .db
        .message(id)
        .await
        .map_err(|e| Box::new(internal("loading a message failed", e)))?
        .ok_or_else(|| Box::new(internal("a keyed message is gone", id)))?;
    Ok(Json(json!({
        "id": m.id,
        "decision": m.decision,
        "reason": m.reason,
        "message": m.body,
        "replayed": true,
    }))
    .into_response())
}

/// The steps of [`agent_message`]; `Err` is the refusal to answer.
async fn send_agent_message(
    runtime: &Runtime,
    contact: String,
    body: &[u8],
) -> Result<Response, Refused> {
    Ok(send_agent_message_with_id(runtime, contact, body).await?.0)
}

/// [`send_agent_message`], with the id of the message it created.
async fn send_agent_message_with_id(
    runtime: &Runtime,
    contact: String,
    body: &[u8],
) -> Result<(Response, i64), Refused> {
    let request: AgentMessage = serde_json::from_slice(body).map_err(|e| {
        refused(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("the body must be {{\"text\": …}} or {{\"template\": {{…}}}}: {e}"),
        )
    })?;
    let channel = known_channel(runtime, request.channel)?;
    let content = match (request.text, request.template) {
        (Some(text), None) => text_content(text)?,
        (None, Some(template)) => template_content(runtime, template)?,
        _ => {
            return Err(refused(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
                "give exactly one of `text` and `template`",
            ));
        }
    };
    let contact = contact_key(runtime, &channel, contact).await?;
    let report = runtime
        .agent_message(&channel, &contact, content)
        .await
        .map_err(|e| Box::new(internal("an agent message failed", e)))?;
    let m = &report.sent[0];
    let response = (
        StatusCode::CREATED,
        Json(json!({
            "id": m.id,
            "decision": m.decision.name(),
            "reason": m.decision.reason(),
            "explain": m.decision.explain(),
            "message": m.message,
        })),
    )
        .into_response();
    Ok((response, m.id))
}

/// `POST /api/conversations/{contact}/resume`: an empty body, or `{"flow": …, "step": …,
/// "channel": …}` (each optional; `step` needs `flow`).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ResumeRequest {
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    flow: Option<String>,
    #[serde(default)]
    step: Option<String>,
}

/// Gives a handed-off conversation back to the bot: at the flow (and step) given, else
/// where the handoff step goes on (its `next`; none ends the session). 409 when the
/// conversation is not with a person.
#[utoipa::path(post, path = "/conversations/{contact}/resume", tag = "conversations",
    params(("contact" = String, Path, description = "The contact's phone number or BSUID")),
    request_body(content = Option<ResumeRequest>, description = "Empty, or where to resume"),
    responses(
        (status = 200, description = "The handoff ended: the session and what was sent", body = Object),
        (status = 409, description = "`not_in_handoff`", body = ErrorBody),
        (status = 422, description = "`unknown_target`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn resume(
    State(state): State<AppState>,
    Path(contact): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    resume_conversation(&state.runtime, contact, &body)
        .await
        .unwrap_or_else(|refused| *refused)
}

/// The steps of [`resume`]; `Err` is the refusal to answer.
async fn resume_conversation(
    runtime: &Runtime,
    contact: String,
    body: &[u8],
) -> Result<Response, Refused> {
    let request: ResumeRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ResumeRequest::default()
    } else {
        serde_json::from_slice(body).map_err(|e| {
            refused(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!("the body must be empty or {{\"flow\": …, \"step\": …}}: {e}"),
            )
        })?
    };
    let channel = known_channel(runtime, request.channel)?;
    resume_target(runtime, request.flow.as_deref(), request.step.as_deref())?;
    let contact = contact_key(runtime, &channel, contact).await?;
    let report = runtime
        .end_handoff(
            &channel,
            &contact,
            request.flow.as_deref(),
            request.step.as_deref(),
        )
        .await
        .map_err(|e| Box::new(internal("resuming a conversation failed", e)))?;
    if report.handled == Handled::NotInHandoff {
        return Err(refused(
            StatusCode::CONFLICT,
            "not_in_handoff",
            format!(
                "the conversation with `{contact}` on `{channel}` is not with a person: there is nothing to resume"
            ),
        ));
    }
    let session = runtime
        .db
        .load_conversation(&channel, &contact)
        .await
        .map_err(|e| Box::new(internal("loading a conversation failed", e)))?
        .session;
    Ok(Json(json!({
        "handled": report.handled.to_string(),
        "session": session.map(|s| json!({ "flow": s.flow_id, "version": s.flow_version, "step": s.step })),
        "sent": report.sent.iter().map(|m| json!({
            "id": m.id, "decision": m.decision.name(), "message": m.message,
        })).collect::<Vec<_>>(),
        "notes": report.notes,
    }))
    .into_response())
}

/// A resume's flow and step, if the current flows have them (`step` needs `flow`).
fn resume_target(runtime: &Runtime, flow: Option<&str>, step: Option<&str>) -> Result<(), Refused> {
    let unknown =
        |message: String| refused(StatusCode::UNPROCESSABLE_ENTITY, "unknown_target", message);
    let flows = runtime.flows.read().expect("flows lock");
    match (flow, step) {
        (None, None) => Ok(()),
        (None, Some(_)) => Err(unknown("`step` needs the `flow` it is in".into())),
        (Some(flow), step) => {
            let Some(found) = flows.get(flow) else {
                let ids: Vec<&str> = flows.current().iter().map(|f| f.id.as_str()).collect();
                return Err(unknown(format!(
                    "there is no flow `{flow}`; the flows are: {}",
                    ids.join(", ")
                )));
            };
            match step {
                Some(step) if found.step_index(step).is_none() => {
                    Err(unknown(format!("flow `{flow}` has no step `{step}`")))
                }
                _ => Ok(()),
            }
        }
    }
}

/// An agent's text, if it is not empty and fits a WhatsApp text message.
pub(super) fn text_content(text: String) -> Result<OutboundContent, Refused> {
    if text.trim().is_empty() || text.chars().count() > limits::TEXT_BODY {
        return Err(refused(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_text",
            format!("`text` must be 1 to {} characters", limits::TEXT_BODY),
        ));
    }
    Ok(OutboundContent::text(text))
}

/// An agent's template, if the registry has it and it is given all its parameters.
fn template_content(runtime: &Runtime, t: TemplateRequest) -> Result<OutboundContent, Refused> {
    let registry = runtime.templates();
    let Some(found) = registry.find(&t.name, &t.language) else {
        return Err(refused(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_template",
            format!(
                "template `{}` ({}) is not in the registry; run `flowgate templates sync` or add it to the templates file",
                t.name, t.language
            ),
        ));
    };
    if found.param_count() != t.params.len() {
        return Err(refused(
            StatusCode::UNPROCESSABLE_ENTITY,
            "template_params",
            format!(
                "template `{}` ({}) takes {} parameters, {} given",
                t.name,
                t.language,
                found.param_count(),
                t.params.len()
            ),
        ));
    }
    Ok(OutboundContent::Template {
        name: t.name,
        language: t.language,
        params: t.params,
    })
}

/// `GET /api/messages/{id}`: one message with its policy decision, reason and delivery state.
#[utoipa::path(get, path = "/messages/{id}", tag = "outbox",
    params(("id" = i64, Path, description = "The message's id")),
    responses(
        (status = 200, description = "The message with its decision, reason and delivery state", body = Object),
        (status = 404, description = "`unknown_message`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn message(State(state): State<AppState>, ApiPath(id): ApiPath<i64>) -> Response {
    match state.runtime.db.message(id).await {
        Ok(Some(m)) => Json(json!({
            "id": m.id,
            "channel": m.channel,
            "contact": m.wa_id,
            "direction": m.direction,
            "kind": m.kind,
            "body": m.body,
            "decision": m.decision,
            "reason": m.reason,
            "status": m.status,
            "wamid": m.wamid,
            "attempts": m.attempts,
            "error_code": m.error_code,
            "error": m.error,
            "expires_at": m.expires_at,
            "created_at": m.created_at,
            "updated_at": m.updated_at,
        }))
        .into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "unknown_message",
            format!("there is no message {id}"),
        ),
        Err(e) => internal("loading a message failed", e),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct SyncQuery {
    /// The `cloud_api` channel whose WABA to read; default the first one.
    channel: Option<String>,
}

/// What `POST /api/templates/sync` did.
#[derive(Debug, serde::Serialize, ToSchema)]
pub(super) struct Synced {
    /// The line `flowgate templates sync` prints.
    summary: String,
    /// Templates skipped, duplicates, entries Meta does not list (kept).
    warnings: Vec<String>,
    /// Whether the running server took the new registry (a project with errors keeps the
    /// one it runs; the file is written either way, as the CLI does).
    reloaded: bool,
    /// Why it was not reloaded, when it was not.
    reload_error: Option<String>,
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
    match sync_registry(&state, q.channel.as_deref()).await {
        Ok(synced) => Json(synced).into_response(),
        Err(e) => sync_refused(e),
    }
}

/// `flowgate templates sync` for the running server (the API's and the console's): reads
/// the channel's templates from the Graph API, writes the registry file, reloads.
pub(super) async fn sync_registry(
    state: &AppState,
    channel: Option<&str>,
) -> Result<Synced, SyncError> {
    let fetched = templates_sync::fetch(state.config.file.as_deref(), channel).await?;
    fetched.write()?;
    let reload = reload::reload(&state.runtime, &state.config, &state.campaigns).await;
    let reload_error = reload.err().map(|e| match e {
        ReloadError::Refused(ref diags) => format!("{e}:\n{}", diags.render(false)),
        e => e.to_string(),
    });
    Ok(Synced {
        summary: fetched.summary(),
        warnings: fetched.warnings().to_vec(),
        reloaded: reload_error.is_none(),
        reload_error,
    })
}

/// A sync that did not happen, as the API's error.
fn sync_refused(e: SyncError) -> Response {
    let (status, code) = match &e {
        SyncError::NoSuchChannel { .. } => (StatusCode::NOT_FOUND, "unknown_channel"),
        SyncError::Config(_) | SyncError::Registry { .. } => {
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_registry")
        }
        SyncError::Fetch { .. } => (StatusCode::BAD_GATEWAY, "graph_error"),
        SyncError::Write(_) => return internal("writing the synced registry failed", e),
        _ => (StatusCode::UNPROCESSABLE_ENTITY, "not_syncable"),
    };
    let message = match &e {
        SyncError::Config(d) | SyncError::Registry { diagnostics: d, .. } => {
            format!("{e}:\n{}", d.render(false))
        }
        _ => e.to_string(),
    };
    error(status, code, message)
}
