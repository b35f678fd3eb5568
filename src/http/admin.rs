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

use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{Refused, error, refused};
use crate::contacts_import::{self, ImportError};
use crate::dispatch::Runtime;
use crate::domain::{OutboundContent, limits};
use crate::engine::Handled;
use crate::policy::Window;
use crate::reload::{self, ReloadError};
use crate::state::AppState;
use crate::store::Identifiers;

pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/flows", get(flows))
        .route("/flows/reload", post(reload_flows))
        .route("/conversations/{contact}", get(conversation))
        .route("/conversations/{contact}/messages", post(agent_message))
        .route("/conversations/{contact}/resume", post(resume))
        .route("/messages/{id}", get(message))
        .route("/templates", get(templates))
        .route("/contacts/import", post(import_contacts))
        .merge(super::campaigns::routes())
        .layer(axum::middleware::from_fn_with_state(state, require_token))
}

/// Checks the bearer token when one is configured ([`super::bearer`], the check every door
/// shares).
async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
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

async fn flows(State(state): State<AppState>) -> Response {
    let flows = state.runtime.flows.read().expect("flows lock");
    let list: Vec<_> = flows
        .current()
        .iter()
        .map(|f| {
            json!({
                "id": f.id,
                "version": f.version,
                "description": f.description,
                "file": f.file,
                "steps": f.steps.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(json!({ "flows": list })).into_response()
}

/// `POST /api/flows/reload`: loads the flows, scripts and templates again; new
/// conversations get the new versions, running ones keep theirs. A project with an error
/// is refused with 422 and its diagnostics, and the running flows are kept.
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

#[derive(Debug, Deserialize)]
struct ChannelQuery {
    channel: Option<String>,
    limit: Option<i64>,
}

async fn conversation(
    State(state): State<AppState>,
    Path(contact): Path<String>,
    Query(q): Query<ChannelQuery>,
) -> Response {
    let runtime = &state.runtime;
    let channel = match known_channel(runtime, q.channel) {
        Ok(channel) => channel,
        Err(response) => return *response,
    };
    let contact = match contact_key(runtime, &channel, contact).await {
        Ok(key) => key,
        Err(response) => return *response,
    };
    let conversation = match runtime.db.load_conversation(&channel, &contact).await {
        Ok(c) => c,
        Err(e) => {
            return internal("loading a conversation failed", e);
        }
    };
    let Some(contact_id) = conversation.contact_id else {
        return error(
            StatusCode::NOT_FOUND,
            "unknown_contact",
            format!("no contact `{contact}` on channel `{channel}`"),
        );
    };
    let messages = match runtime
        .db
        .messages(&channel, &contact, q.limit.unwrap_or(50).clamp(1, 500))
        .await
    {
        Ok(m) => m,
        Err(e) => {
            return internal("loading messages failed", e);
        }
    };
    let now = runtime.clock.now();
    let window = runtime.policy.window(&conversation.contact, now);
    Json(json!({
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
    .into_response()
}

/// `GET /api/templates`: the registry as the policy sees it now (status webhooks applied).
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

#[derive(Debug, Deserialize)]
struct ImportQuery {
    channel: Option<String>,
}

/// `POST /api/contacts/import[?channel=NAME]`: the body is a CSV file
/// (`Content-Type: text/csv`); the answer is the import's report (new, updated, unchanged,
/// each skipped line with its reason). A file refused as a whole is 422 and writes nothing.
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
    let (state, at) = match window {
        Window::Never => ("never", None),
        Window::Open { closes_at } => ("open", Some(*closes_at)),
        Window::Closed { since, .. } => ("closed", Some(*since)),
    };
    json!({ "state": state, "at": at, "describe": window.describe(now) })
}

/// `POST /api/conversations/{contact}/messages`: `{"text": "…"}` or
/// `{"template": {"name": …, "language": …, "params": […]}}`, optionally `"channel"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentMessage {
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    template: Option<TemplateRequest>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateRequest {
    name: String,
    language: String,
    #[serde(default)]
    params: Vec<String>,
}

/// The channel an API call names (the default channel when it names none), if it exists.
fn known_channel(runtime: &Runtime, channel: Option<String>) -> Result<String, Refused> {
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
async fn contact_key(
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
async fn agent_message(
    State(state): State<AppState>,
    Path(contact): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    send_agent_message(&state.runtime, contact, &body)
        .await
        .unwrap_or_else(|refused| *refused)
}

/// The steps of [`agent_message`]; `Err` is the refusal to answer.
async fn send_agent_message(
    runtime: &Runtime,
    contact: String,
    body: &[u8],
) -> Result<Response, Refused> {
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
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": m.id,
            "decision": m.decision.name(),
            "reason": m.decision.reason(),
            "explain": m.decision.explain(),
            "message": m.message,
        })),
    )
        .into_response())
}

/// `POST /api/conversations/{contact}/resume`: an empty body, or `{"flow": …, "step": …,
/// "channel": …}` (each optional; `step` needs `flow`).
#[derive(Debug, Default, Deserialize)]
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
fn text_content(text: String) -> Result<OutboundContent, Refused> {
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
async fn message(State(state): State<AppState>, Path(id): Path<i64>) -> Response {
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
