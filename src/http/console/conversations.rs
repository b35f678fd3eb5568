//! Conversations and the queue in the console: who is talking (window with a live
//! countdown, flow and step, handoff), one conversation's messages with each decision and
//! its reason, an agent's reply shown as the policy decides it before it is sent (the pure
//! [`Runtime::preview_agent_message`]) and after, the end of a handoff; the messages the
//! queue holds with their age and expiry.
//!
//! The lists are the API's own answers (`operator::conversations::list` and `get`,
//! `operator::outbox::queue`), rendered.

use axum::extract::{Path, Query, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::Value;

use super::{
    Nav, Session, channel, channel_picker, csrf_field, error_page, page, refusal, segment, span,
    text, when_text,
};
use crate::dispatch::Runtime;
use crate::domain::Decision;
use crate::engine::Handled;
use crate::operator::conversations::{ConversationsQuery, text_content};
use crate::operator::outbox::QueueQuery;
use crate::operator::{self, OperatorError, contact_key, known_channel};
use crate::state::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/conversations", get(list))
        .route("/conversations/{contact}", get(show))
        .route("/conversations/{contact}/preview", get(preview))
        .route("/conversations/{contact}/reply", post(reply))
        .route("/conversations/{contact}/end-handoff", post(end_handoff))
        .route("/queue", get(queue))
}

async fn list(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    RawQuery(query): RawQuery,
) -> Response {
    let query = query.unwrap_or_default();
    let shown = channel(
        &state,
        serde_urlencoded::from_str::<Vec<(String, String)>>(&query)
            .unwrap_or_default()
            .into_iter()
            .find_map(|(k, v)| (k == "channel").then_some(v)),
    );
    let rows = match list_fragment(&state, &query).await {
        Ok(rows) => rows,
        Err((status, message)) => {
            return error_page(status, Nav::Conversations, &session, &message);
        }
    };
    let live = format!("/live/conversations?{query}");
    page(
        "Conversations",
        Nav::Conversations,
        &session,
        html! {
            form method="get" action="/conversations" class="filters" {
                (channel_picker(&state, &shown))
                label for="window" { "Window" }
                select id="window" name="window" {
                    option value="" { "any" }
                    option value="open" { "open" }
                    option value="closed" { "closed" }
                }
                label for="handoff" { "With" }
                select id="handoff" name="handoff" {
                    option value="" { "bot or person" }
                    option value="true" { "a person (handoff)" }
                    option value="false" { "the bot" }
                }
                button type="submit" { "Filter" }
            }
            section aria-label="Conversations" aria-live="polite" data-live=(live) id="conversations" {
                (rows)
            }
        },
    )
    .into_response()
}

/// The conversations table for a query string (`window`, `handoff`, `channel`, `after`,
/// `limit`, as the API takes them): the page's moving part.
pub async fn list_fragment(state: &AppState, query: &str) -> Result<Markup, (StatusCode, String)> {
    let mut cleaned: Vec<(String, String)> =
        serde_urlencoded::from_str::<Vec<(String, String)>>(query)
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .collect();
    if !cleaned.iter().any(|(k, _)| k == "channel") {
        cleaned.push(("channel".into(), channel(state, None)));
    }
    let runtime = &state.runtime;
    let q: ConversationsQuery =
        serde_urlencoded::from_str(&serde_urlencoded::to_string(&cleaned).unwrap_or_default())
            .map_err(|e| (StatusCode::BAD_REQUEST, format!("the filter is wrong: {e}")))?;
    let page = match operator::conversations::list(runtime, q).await {
        Ok(page) => serde_json::to_value(page).unwrap_or_default(),
        Err(refused) => return Err(refusal(refused).await),
    };
    let rows = page["conversations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    Ok(html! {
        @if rows.is_empty() {
            p class="empty" { "No conversations yet: they appear when a customer writes." }
        } @else {
            div class="table-wrap" {
                table {
                    thead { tr {
                        th scope="col" { "Contact" }
                        th scope="col" { "Window" }
                        th scope="col" { "Flow and step" }
                        th scope="col" { "Handoff" }
                        th scope="col" { "Last message" }
                    } }
                    tbody {
                        @for c in &rows {
                            tr {
                                td {
                                    a href={ "/conversations/" (segment(text(c, "contact"))) "?channel=" (segment(text(c, "channel"))) } {
                                        @if let Some(name) = c["name"].as_str() { (name) " · " }
                                        (text(c, "contact"))
                                    }
                                }
                                td { (window(&c["window"])) }
                                td { (session_cell(&c["session"])) }
                                td {
                                    @if let Some(queue) = c["handoff"].as_str() {
                                        span class="badge warn" { "with a person (" (queue) ")" }
                                    } @else { "bot" }
                                }
                                td { (when_text(&c["last_message_at"])) }
                            }
                        }
                    }
                }
            }
        }
    })
}

/// A window as the API gives it (`WindowView`): open with a live countdown, closed, never.
pub fn window(w: &Value) -> Markup {
    match text(w, "state") {
        "open" => html! {
            span class="window open" data-closes=(text(w, "at")) title=(text(w, "describe")) {
                "open · closes in " (span(w["closes_in_seconds"].as_i64().unwrap_or(0)))
            }
        },
        "closed" => html! {
            span class="window closed" title=(text(w, "describe")) { "closed" }
        },
        _ => html! { span class="window closed" title=(text(w, "describe")) { "never opened" } },
    }
}

fn session_cell(s: &Value) -> Markup {
    if s.is_null() {
        return html! { span class="muted" { "no flow" } };
    }
    html! {
        (text(s, "flow")) " › " (text(s, "step"))
        @if let Some(waiting) = s["waiting"].as_str() {
            " " span class="muted" { "(waits for " (waiting) ")" }
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct ShowQuery {
    #[serde(default)]
    channel: Option<String>,
    /// The message an agent just sent, to show what was decided.
    #[serde(default)]
    sent: Option<i64>,
    #[serde(default)]
    ended: Option<String>,
}

async fn show(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Path(contact): Path<String>,
    Query(q): Query<ShowQuery>,
) -> Response {
    let runtime = &state.runtime;
    let shown = channel(&state, q.channel.clone());
    let view = match conversation_view(runtime, Some(shown.clone()), contact.clone(), None).await {
        Ok(view) => view,
        Err(refused) => {
            let (status, message) = refusal(refused).await;
            return error_page(status, Nav::Conversations, &session, &message);
        }
    };
    let sent = match q.sent {
        Some(id) => runtime.db.message(id).await.ok().flatten(),
        None => None,
    };
    // The handoff queue, while a person has the conversation.
    let handoff = view["handoff"].is_string();
    let channel_q = format!("?channel={}", segment(&shown));
    let path = format!("/conversations/{}", segment(&contact));
    let name = view["contact"]["name"].as_str().unwrap_or("");
    let title = if name.is_empty() {
        contact.clone()
    } else {
        format!("{name} · {contact}")
    };
    page(
        &title,
        Nav::Conversations,
        &session,
        html! {
            p { a href="/conversations" { "← All conversations" } }
            dl class="facts" {
                dt { "Window" } dd { (window(&view["window"])) }
                dt { "Flow and step" } dd { (session_cell(&view["session"])) }
                dt { "Channel" } dd { (text(&view, "channel")) }
                dt { "Handoff" } dd {
                    @if handoff {
                        span class="badge warn" { "with a person" }
                        form method="post" action={ (path) "/end-handoff" (channel_q) } class="inline" {
                            (csrf_field(&session))
                            button type="submit" { "End handoff" }
                        }
                    } @else { "bot" }
                }
            }
            @if q.ended.is_some() {
                p class="notice" role="status" { "The handoff ended: the bot has the conversation again." }
            }
            @if let Some(m) = &sent {
                p class={ "notice decision-" (m.decision.as_deref().unwrap_or("")) } role="status" id="sent-result" {
                    "Your message: " strong { (m.decision.as_deref().unwrap_or("?")) }
                    " — " (m.reason.as_deref().unwrap_or(""))
                }
            }
            section aria-labelledby="messages-h" {
                h2 id="messages-h" { "Messages" }
                div id="messages" data-live={ "/live" (path) (channel_q) } aria-live="polite" {
                    (messages(&view["messages"]))
                }
            }
            section aria-labelledby="reply-h" {
                h2 id="reply-h" { "Reply as an agent" }
                form method="post" action={ (path) "/reply" (channel_q) } class="card reply"
                    data-preview={ (path) "/preview" (channel_q) } {
                    (csrf_field(&session))
                    label for="reply-text" { "Message" }
                    textarea id="reply-text" name="text" rows="3" required maxlength="4096" {}
                    div id="preview" aria-live="polite" {
                        p class="hint" { "What the policy decides shows here before you send." }
                    }
                    div class="buttons" {
                        button type="submit" name="action" value="preview" class="secondary" { "Preview" }
                        button type="submit" name="action" value="send" { "Send" }
                    }
                }
            }
        },
    )
    .into_response()
}

/// A conversation's messages, oldest first, each with its decision and reason.
pub fn messages(list: &Value) -> Markup {
    let list = list.as_array().cloned().unwrap_or_default();
    html! {
        @if list.is_empty() {
            p class="empty" { "No messages." }
        } @else {
            ol class="messages" {
                @for m in &list {
                    @let out = text(m, "direction") == "out";
                    li class={ "message " (if out { "out" } else { "in" }) } {
                        div class="bubble" { (summary(&m["body"])) }
                        @if m["media"].is_object() {
                            (media(&m["media"]))
                        }
                        div class="meta" {
                            (when_text(&m["created_at"])) " · "
                            @if out {
                                span class={ "decision decision-" (text(m, "decision")) } { (text(m, "decision")) }
                                " · " (text(m, "status"))
                                @if let Some(reason) = m["reason"].as_str() {
                                    div class="reason" { (reason) }
                                }
                            } @else { "customer" }
                        }
                    }
                }
            }
        }
    }
}

/// A customer's file: its kind, type and size, whether it was downloaded (or why not), and
/// a link to it while the link works.
fn media(m: &Value) -> Markup {
    let status = text(m, "status");
    html! {
        div class={ "media media-" (status) } {
            (text(m, "kind"))
            @if let Some(mime) = m["mime"].as_str() { " · " (mime) }
            @if let Some(size) = m["size"].as_i64() { " · " (size) " bytes" }
            " · " (status)
            @if let Some(error) = m["error"].as_str() { " (" (error) ")" }
            @if let Some(url) = m["url"].as_str() {
                " · " a href=(url) target="_blank" rel="noopener" { "open" }
            }
        }
    }
}

/// What a stored message says, in one line.
pub fn summary(body: &Value) -> String {
    let content = &body["content"];
    let get = |k: &str| content[k].as_str();
    match get("type") {
        Some("template") => {
            let params: Vec<&str> = content["params"]
                .as_array()
                .map(|p| p.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            format!(
                "template {} ({}) [{}]",
                get("name").unwrap_or("?"),
                get("language").unwrap_or("?"),
                params.join(", ")
            )
        }
        Some(kind) => get("body")
            .or(get("title"))
            .or(get("text"))
            .or(get("caption"))
            .or(get("emoji"))
            .map_or_else(|| format!("({kind})"), str::to_string),
        None => body.to_string(),
    }
}

#[derive(Debug, Deserialize)]
struct PreviewQuery {
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    text: String,
}

/// The policy's decision for a reply not yet sent, as a fragment for the reply box.
async fn preview(
    State(state): State<AppState>,
    Path(contact): Path<String>,
    Query(q): Query<PreviewQuery>,
) -> Response {
    let shown = channel(&state, q.channel);
    match decide_preview(&state.runtime, Some(shown), contact, q.text).await {
        Ok(decision) => decision_markup(&decision, false).into_response(),
        Err((status, message)) => {
            (status, html! { p class="error" role="alert" { (message) } }).into_response()
        }
    }
}

/// An agent's text as a message, and the channel and contact key it goes to (checked as
/// the API checks them), or the refusal for the page.
async fn agent_text(
    runtime: &Runtime,
    channel: Option<String>,
    contact: String,
    text: String,
) -> Result<(crate::domain::OutboundContent, String, String), (StatusCode, String)> {
    let checked = async {
        let content = text_content(text)?;
        let channel = known_channel(runtime, channel)?;
        let key = contact_key(runtime, &channel, contact).await?;
        Ok::<_, OperatorError>((content, channel, key))
    };
    match checked.await {
        Ok(checked) => Ok(checked),
        Err(refused) => Err(refusal(refused).await),
    }
}

async fn decide_preview(
    runtime: &Runtime,
    channel: Option<String>,
    contact: String,
    text: String,
) -> Result<Decision, (StatusCode, String)> {
    let (content, channel, key) = agent_text(runtime, channel, contact, text).await?;
    runtime
        .preview_agent_message(&channel, &key, content)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "previewing an agent message failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the preview failed; see the server log".to_string(),
            )
        })
}

/// What the policy decided (or would decide), in words.
fn decision_markup(decision: &Decision, sent: bool) -> Markup {
    let words = match decision {
        Decision::Send { .. } => "sent as it is",
        Decision::Rewritten { .. } => "rewritten to an approved template",
        Decision::Queued { .. } => "queued until the customer writes again",
        Decision::Skipped { .. } => "skipped",
        Decision::Expired { .. } => "expired",
        Decision::Failed { .. } => "failed",
    };
    html! {
        div class={ "decision-box decision-" (decision.name()) } id="preview-result" {
            p {
                @if sent { "Decided: " } @else { "If you send it now: " }
                strong { (decision.name()) }
                " — " (words)
            }
            p class="reason" { (decision.explain()) }
        }
    }
}

#[derive(Debug, Deserialize)]
struct Reply {
    text: String,
    #[serde(default)]
    action: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ChannelQuery {
    #[serde(default)]
    channel: Option<String>,
}

async fn reply(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Path(contact): Path<String>,
    Query(q): Query<ChannelQuery>,
    Form(form): Form<Reply>,
) -> Response {
    let runtime = &state.runtime;
    let shown = channel(&state, q.channel);
    if form.action.as_deref() == Some("preview") {
        let decided = decide_preview(
            runtime,
            Some(shown.clone()),
            contact.clone(),
            form.text.clone(),
        )
        .await;
        let body = match decided {
            Ok(decision) => decision_markup(&decision, false),
            Err((_, message)) => html! { p class="error" role="alert" { (message) } },
        };
        return page(
            "Reply preview",
            Nav::Conversations,
            &session,
            html! {
                p { a href={ "/conversations/" (segment(&contact)) "?channel=" (segment(&shown)) } { "← Back to the conversation" } }
                (body)
                blockquote { (form.text) }
            },
        )
        .into_response();
    }
    match send(runtime, Some(shown.clone()), contact.clone(), form.text).await {
        Ok(id) => Redirect::to(&format!(
            "/conversations/{}?sent={id}&channel={}",
            segment(&contact),
            segment(&shown)
        ))
        .into_response(),
        Err((status, message)) => error_page(status, Nav::Conversations, &session, &message),
    }
}

/// An agent's message through the runtime, as the API sends it; the new message's id.
async fn send(
    runtime: &Runtime,
    channel: Option<String>,
    contact: String,
    text: String,
) -> Result<i64, (StatusCode, String)> {
    let (content, channel, key) = agent_text(runtime, channel, contact, text).await?;
    let report = runtime
        .agent_message(&channel, &key, content)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "an agent message failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the message could not be stored; see the server log".to_string(),
            )
        })?;
    Ok(report.sent[0].id)
}

async fn end_handoff(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Path(contact): Path<String>,
    Query(q): Query<ChannelQuery>,
) -> Response {
    let runtime = &state.runtime;
    let channel = match known_channel(runtime, Some(channel(&state, q.channel))) {
        Ok(channel) => channel,
        Err(refused) => {
            let (status, message) = refusal(refused).await;
            return error_page(status, Nav::Conversations, &session, &message);
        }
    };
    let key = match contact_key(runtime, &channel, contact.clone()).await {
        Ok(key) => key,
        Err(refused) => {
            let (status, message) = refusal(refused).await;
            return error_page(status, Nav::Conversations, &session, &message);
        }
    };
    match runtime.end_handoff(&channel, &key, None, None).await {
        Ok(report) if report.handled == Handled::NotInHandoff => error_page(
            StatusCode::CONFLICT,
            Nav::Conversations,
            &session,
            "This conversation is not with a person: there is no handoff to end.",
        ),
        Ok(_) => Redirect::to(&format!(
            "/conversations/{}?ended=1&channel={}",
            segment(&contact),
            segment(&channel)
        ))
        .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "ending a handoff failed");
            error_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                Nav::Conversations,
                &session,
                "Ending the handoff failed; see the server log.",
            )
        }
    }
}

async fn queue(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    RawQuery(query): RawQuery,
) -> Response {
    let q: QueueQuery = match serde_urlencoded::from_str(&query.unwrap_or_default()) {
        Ok(q) => q,
        Err(e) => {
            let message = format!("the query is wrong: {e}");
            return error_page(StatusCode::BAD_REQUEST, Nav::Queue, &session, &message);
        }
    };
    let page_value = match operator::outbox::queue(&state.runtime, q).await {
        Ok(page) => serde_json::to_value(page).unwrap_or_default(),
        Err(refused) => {
            let (status, message) = refusal(refused).await;
            return error_page(status, Nav::Queue, &session, &message);
        }
    };
    let rows = page_value["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    page(
        "Queue",
        Nav::Queue,
        &session,
        html! {
            p class="hint" { "Messages the policy holds until the customer writes again (their window is closed and there is no template for them)." }
            @if rows.is_empty() {
                p class="empty" { "Nothing is waiting." }
            } @else {
                div class="table-wrap" {
                    table {
                        thead { tr {
                            th scope="col" { "Contact" }
                            th scope="col" { "Message" }
                            th scope="col" { "Why" }
                            th scope="col" { "Age" }
                            th scope="col" { "Expires" }
                        } }
                        tbody {
                            @for m in &rows {
                                tr {
                                    td { a href={ "/conversations/" (segment(text(m, "contact"))) "?channel=" (segment(text(m, "channel"))) } { (text(m, "contact")) } }
                                    td { (summary(&m["body"])) }
                                    td { (text(m, "reason")) }
                                    td { (span(m["age_seconds"].as_i64().unwrap_or(0))) }
                                    td {
                                        (when_text(&m["expires_at"]))
                                        @if let Some(s) = m["expires_in_seconds"].as_i64() {
                                            " (in " (span(s)) ")"
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
    .into_response()
}

/// One conversation as the API answers it (`operator::conversations::get`), as JSON for
/// the pages that render it.
pub(super) async fn conversation_view(
    runtime: &Runtime,
    channel: Option<String>,
    contact: String,
    limit: Option<i64>,
) -> Result<serde_json::Value, OperatorError> {
    let detail = operator::conversations::get(runtime, channel, contact, limit).await?;
    Ok(serde_json::to_value(detail).unwrap_or_default())
}
