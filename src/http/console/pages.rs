//! The console's other pages: contacts (search, tags, CSV import with the per-line
//! report), templates (the registry with statuses, sync), flows (each flow drawn as a graph
//! of its steps, with its check diagnostics) and the sandbox chat (a customer played in the
//! browser, through the same runtime entry as `POST /sandbox/messages`).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;

use axum::extract::{Path, Query, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::Value;

use super::conversations::conversation_view;
use super::conversations::{messages, window};
use super::{Nav, Session, csrf_field, error_page, page, raw, refusal, segment, text};
use crate::config::{Provider, SandboxAccess};
use crate::contacts_import::{self, ImportError};
use crate::domain::{Inbound, InboundContent};
use crate::flow::{Action, Cond, Flow, Route, Target};
use crate::http::sandbox::valid_from;
use crate::operator;
use crate::operator::contacts::ContactsQuery;
use crate::state::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/contacts", get(contacts))
        .route("/contacts/import", post(import))
        .route("/contacts/{contact}/tags", post(add_tag))
        .route("/templates", get(templates))
        .route("/templates/sync", post(sync))
        .route("/flows", get(flows))
        .route("/sandbox", get(sandbox))
        .route("/sandbox/chat", post(sandbox_chat))
}

async fn contacts(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    RawQuery(query): RawQuery,
) -> Response {
    let mut pairs: Vec<(String, String)> =
        serde_urlencoded::from_str::<Vec<(String, String)>>(&query.unwrap_or_default())
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .collect();
    let shown = super::channel(
        &state,
        pairs
            .iter()
            .find_map(|(k, v)| (k == "channel").then(|| v.clone())),
    );
    pairs.retain(|(k, _)| k != "channel");
    pairs.push(("channel".into(), shown.clone()));
    let search = pairs
        .iter()
        .find(|(k, _)| k == "search")
        .map_or("", |(_, v)| v.as_str())
        .to_string();
    let tag = pairs
        .iter()
        .find(|(k, _)| k == "tag")
        .map_or("", |(_, v)| v.as_str())
        .to_string();
    let q: ContactsQuery = match serde_urlencoded::from_str(
        &serde_urlencoded::to_string(&pairs).unwrap_or_default(),
    ) {
        Ok(q) => q,
        Err(e) => {
            let message = format!("the search is wrong: {e}");
            return error_page(StatusCode::BAD_REQUEST, Nav::Contacts, &session, &message);
        }
    };
    let list = match operator::contacts::list(&state.runtime, q).await {
        Ok(page) => serde_json::to_value(page).unwrap_or_default(),
        Err(refused) => {
            let (status, message) = refusal(refused).await;
            return error_page(status, Nav::Contacts, &session, &message);
        }
    };
    let rows = list["contacts"].as_array().cloned().unwrap_or_default();
    page(
        "Contacts",
        Nav::Contacts,
        &session,
        html! {
            form method="get" action="/contacts" class="filters" role="search" {
                (super::channel_picker(&state, &shown))
                label for="search" { "Name or number" }
                input id="search" name="search" type="search" value=(search);
                label for="tag" { "Tag" }
                input id="tag" name="tag" value=(tag);
                button type="submit" { "Search" }
            }
            @if rows.is_empty() {
                p class="empty" { "No contacts match." }
            } @else {
                div class="table-wrap" {
                    table {
                        thead { tr {
                            th scope="col" { "Contact" }
                            th scope="col" { "Tags" }
                            th scope="col" { "Window" }
                            th scope="col" { "Add a tag" }
                        } }
                        tbody {
                            @for c in &rows {
                                @let contact = text(c, "contact");
                                tr {
                                    td {
                                        a href={ "/conversations/" (segment(contact)) "?channel=" (segment(&shown)) } {
                                            @if let Some(name) = c["name"].as_str() { (name) " · " }
                                            (contact)
                                        }
                                    }
                                    td {
                                        @for t in c["tags"].as_array().into_iter().flatten() {
                                            span class="tag" { (t.as_str().unwrap_or("")) } " "
                                        }
                                    }
                                    td { (window(&c["window"])) }
                                    td {
                                        form method="post" action={ "/contacts/" (segment(contact)) "/tags" } class="inline" {
                                            (csrf_field(&session))
                                            input type="hidden" name="channel" value=(shown);
                                            label for={ "tag-" (contact) } class="visually-hidden" { "New tag for " (contact) }
                                            input id={ "tag-" (contact) } name="tag" required size="10";
                                            button type="submit" class="secondary" { "Add" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            section aria-labelledby="import-h" {
                h2 id="import-h" { "Import contacts (CSV)" }
                form method="post" action="/contacts/import" class="card" data-csv-form {
                    (csrf_field(&session))
                    label for="csv-file" { "CSV file" }
                    input id="csv-file" type="file" accept=".csv,text/csv" data-csv-file;
                    label for="csv" { "or paste it (columns: wa_id or phone, name, tags separated by ;, timezone, other columns become attributes)" }
                    textarea id="csv" name="csv" rows="6" required placeholder="wa_id,name,tags\n15550001234,Ada,vip;newsletter" {}
                    button type="submit" { "Import" }
                }
            }
        },
    )
    .into_response()
}

#[derive(Debug, Deserialize)]
struct TagForm {
    tag: String,
    #[serde(default)]
    channel: Option<String>,
}

async fn add_tag(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Path(contact): Path<String>,
    Form(form): Form<TagForm>,
) -> Response {
    let shown = super::channel(&state, form.channel);
    let tags = [form.tag];
    match operator::contacts::add_tags(&state.runtime, Some(shown.clone()), contact, &tags).await {
        Ok(_) => Redirect::to(&format!("/contacts?channel={}", segment(&shown))).into_response(),
        Err(refused) => {
            let (status, message) = refusal(refused).await;
            error_page(status, Nav::Contacts, &session, &message)
        }
    }
}

#[derive(Debug, Deserialize)]
struct ImportForm {
    csv: String,
}

async fn import(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Form(form): Form<ImportForm>,
) -> Response {
    let runtime = &state.runtime;
    let report = match contacts_import::channel(&state.config.channels, None) {
        Ok(channel) => {
            let channel = channel.to_string();
            contacts_import::import(
                &runtime.db,
                &channel,
                form.csv.into_bytes(),
                runtime.clock.now(),
            )
            .await
        }
        Err(e) => Err(e),
    };
    let report = match report {
        Ok(report) => report,
        Err(e @ (ImportError::UnknownChannel { .. } | ImportError::File(_))) => {
            let message = format!("Nothing was imported: {e}");
            return error_page(
                StatusCode::UNPROCESSABLE_ENTITY,
                Nav::Contacts,
                &session,
                &message,
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "importing contacts failed");
            return error_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                Nav::Contacts,
                &session,
                "Importing failed; see the server log.",
            );
        }
    };
    page(
        "Import report",
        Nav::Contacts,
        &session,
        html! {
            p role="status" id="import-summary" { (report.summary()) }
            dl class="facts" {
                dt { "New" } dd { (report.created) }
                dt { "Updated" } dd { (report.updated) }
                dt { "Unchanged" } dd { (report.unchanged) }
                dt { "Skipped" } dd { (report.skipped.len()) }
            }
            @if !report.skipped.is_empty() {
                h2 { "Lines skipped" }
                div class="table-wrap" {
                    table id="skipped-lines" {
                        thead { tr { th scope="col" { "Line" } th scope="col" { "Why" } } }
                        tbody {
                            @for s in &report.skipped {
                                tr { td { (s.line) } td { (s.reason) } }
                            }
                        }
                    }
                }
            }
            p { a href="/contacts" { "← Contacts" } }
        },
    )
    .into_response()
}

async fn templates(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
) -> Response {
    let registry = state.runtime.templates();
    let can_sync = state
        .config
        .channels
        .iter()
        .any(|c| c.provider == Provider::CloudApi);
    page(
        "Templates",
        Nav::Templates,
        &session,
        html! {
            @if can_sync {
                form method="post" action="/templates/sync" class="inline" {
                    (csrf_field(&session))
                    button type="submit" { "Sync from WhatsApp" }
                }
            } @else {
                p class="hint" { "Sync needs a cloud_api channel with a waba_id." }
            }
            @if registry.templates.is_empty() {
                p class="empty" { "The registry is empty." }
            } @else {
                div class="table-wrap" {
                    table {
                        thead { tr {
                            th scope="col" { "Name" }
                            th scope="col" { "Language" }
                            th scope="col" { "Category" }
                            th scope="col" { "Status" }
                            th scope="col" { "Parameters" }
                            th scope="col" { "Body" }
                        } }
                        tbody {
                            @for t in &registry.templates {
                                tr {
                                    td { (t.name) }
                                    td { (t.language) }
                                    td { (format!("{:?}", t.category).to_lowercase()) }
                                    td { span class={ "badge status-" (t.status.as_str()) } { (t.status.as_str()) } }
                                    td { (t.param_count()) }
                                    td { (t.body) }
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

async fn sync(State(state): State<AppState>, Extension(session): Extension<Session>) -> Response {
    match operator::templates::sync(&state, None).await {
        Ok(synced) => {
            let synced = serde_json::to_value(synced).unwrap_or_default();
            page(
                "Templates synced",
                Nav::Templates,
                &session,
                html! {
                    p role="status" { (text(&synced, "summary")) }
                    @for w in synced["warnings"].as_array().into_iter().flatten() {
                        p class="hint" { (w.as_str().unwrap_or("")) }
                    }
                    @if let Some(e) = synced["reload_error"].as_str() {
                        p class="error" { "The file was written, but the server keeps its registry: " pre { (e) } }
                    }
                    p { a href="/templates" { "← Templates" } }
                },
            )
            .into_response()
        }
        Err(e) => error_page(
            StatusCode::BAD_GATEWAY,
            Nav::Templates,
            &session,
            &format!("The templates were not synced: {e}"),
        ),
    }
}

async fn flows(State(state): State<AppState>, Extension(session): Extension<Session>) -> Response {
    let list = match operator::flows::list(&state).await {
        Ok(list) => serde_json::to_value(list).unwrap_or_default(),
        Err(e) => {
            tracing::error!(error = %e, "checking the flows failed");
            return error_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                Nav::Flows,
                &session,
                "Checking the flows failed; see the server log.",
            );
        }
    };
    let flows: Vec<std::sync::Arc<Flow>> = state
        .runtime
        .flows
        .read()
        .expect("flows lock")
        .current()
        .to_vec();
    let items = list["flows"].as_array().cloned().unwrap_or_default();
    page(
        "Flows",
        Nav::Flows,
        &session,
        html! {
            p {
                (list["errors"].as_u64().unwrap_or(0)) " errors, "
                (list["warnings"].as_u64().unwrap_or(0)) " warnings in the project's files now."
            }
            @for flow in &flows {
                @let item = items.iter().find(|i| text(i, "id") == flow.id);
                section class="flow card" aria-labelledby={ "flow-" (flow.id) } {
                    h2 id={ "flow-" (flow.id) } { (flow.id) }
                    @if let Some(d) = &flow.description { p { (d) } }
                    p class="hint" { (flow.file) " · version " (flow.version.chars().take(12).collect::<String>()) }
                    figure {
                        (raw(graph(flow)))
                        figcaption class="visually-hidden" { "The steps of flow " (flow.id) " and how they lead to each other." }
                    }
                    (diagnostics(item.map(|i| &i["diagnostics"])))
                }
            }
            @let other = list["other"].as_array().cloned().unwrap_or_default();
            @if !other.is_empty() {
                section class="card" {
                    h2 { "Other files" }
                    (diagnostics(Some(&Value::Array(other))))
                }
            }
        },
    )
    .into_response()
}

fn diagnostics(list: Option<&Value>) -> Markup {
    let list = list.and_then(Value::as_array).cloned().unwrap_or_default();
    html! {
        @if list.is_empty() {
            p class="ok" { "No problems." }
        } @else {
            ul class="diagnostics" {
                @for d in &list {
                    li class={ "diag " (text(d, "severity")) } {
                        strong { (text(d, "severity")) } " " code { (text(d, "position")) } ": " (text(d, "message"))
                        @if let Some(help) = d["help"].as_str() { div class="hint" { (help) } }
                    }
                }
            }
        }
    }
}

/// One arrow of a flow's graph: from a step to a step (or to another flow), labelled.
#[derive(Debug, Clone, PartialEq)]
pub struct Edge {
    pub from: usize,
    /// A step's index, or `None` for another flow (`to_flow`).
    pub to: Option<usize>,
    pub to_flow: Option<String>,
    pub label: String,
}

/// Every way on from each step: `next`, branches (conditions, buttons, list rows, a
/// pattern), the `ask`'s failure and timeout, the handoff's timeout, `on_error`.
pub fn edges(flow: &Flow) -> Vec<Edge> {
    let mut out = Vec::new();
    let mut push = |from: usize, target: &Target, label: String| {
        let (to, to_flow) = match target {
            Target::Step(i) => (Some(*i), None),
            Target::Flow(f) => (None, Some(f.clone())),
        };
        out.push(Edge {
            from,
            to,
            to_flow,
            label,
        });
    };
    for (i, step) in flow.steps.iter().enumerate() {
        match &step.route {
            Route::End => {}
            Route::Goto(target) => push(i, target, "next".into()),
            Route::Branches(branches) => {
                for b in branches {
                    let label = match &b.cond {
                        Cond::Always => "otherwise".to_string(),
                        Cond::If(e) => format!("if {}", e.source),
                        Cond::Button(id) => format!("button {id}"),
                        Cond::List(id) => format!("list {id}"),
                        Cond::Match(re) => format!("matches /{}/", re.as_str()),
                        Cond::Split { name, weight } => format!("split {name} ({weight})"),
                    };
                    push(i, &b.target, label);
                }
            }
        }
        if let Action::Ask(ask) = &step.action {
            if let Some(to) = ask.on_fail {
                push(i, &Target::Step(to), "on fail".into());
            }
            if let Some(to) = ask.on_timeout {
                push(i, &Target::Step(to), "timeout".into());
            }
        }
        if let Some(to) = step.handoff.as_ref().and_then(|h| h.on_timeout) {
            push(i, &Target::Step(to), "handoff timeout".into());
        }
        if let Some(to) = step.on_error {
            push(i, &Target::Step(to), "on error".into());
        }
    }
    out
}

/// Each step's layer: its distance from the start by the edges; steps not reached go one
/// layer below the deepest.
pub fn layers(flow: &Flow, edges: &[Edge]) -> Vec<usize> {
    let n = flow.steps.len();
    let mut layer = vec![usize::MAX; n];
    let mut queue = VecDeque::new();
    if flow.start < n {
        layer[flow.start] = 0;
        queue.push_back(flow.start);
    }
    while let Some(i) = queue.pop_front() {
        for e in edges.iter().filter(|e| e.from == i) {
            if let Some(to) = e.to
                && layer[to] == usize::MAX
            {
                layer[to] = layer[i] + 1;
                queue.push_back(to);
            }
        }
    }
    let deepest = layer.iter().filter(|l| **l != usize::MAX).max().copied();
    let unreached = deepest.map_or(0, |d| d + 1);
    layer
        .into_iter()
        .map(|l| if l == usize::MAX { unreached } else { l })
        .collect()
}

fn action_name(action: &Action) -> &'static str {
    match action {
        Action::None => "",
        Action::Say(_) => "say",
        Action::Ask(_) => "ask",
        Action::Template(_) => "template",
        Action::Script(_) => "script",
        Action::Http(_) => "http",
        Action::Location(_) => "location",
        Action::Contacts(_) => "contacts",
        Action::Form(_) => "form",
    }
}

fn escape(text: &str) -> String {
    html! { (text) }.into_string()
}

/// The flow as an SVG: steps as boxes in layers from the start down, ways on as labelled
/// arrows (to another flow: a rounded box of its own).
pub fn graph(flow: &Flow) -> String {
    const W: i64 = 170;
    const H: i64 = 46;
    const GAP_X: i64 = 40;
    const GAP_Y: i64 = 90;
    let edges = edges(flow);
    let layers = layers(flow, &edges);
    // Nodes: the steps, then one per flow jumped to.
    let mut rows: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, l) in layers.iter().enumerate() {
        rows.entry(*l).or_default().push(i);
    }
    let mut targets: Vec<String> = edges.iter().filter_map(|e| e.to_flow.clone()).collect();
    targets.sort();
    targets.dedup();
    let bottom = rows.keys().max().map_or(0, |l| l + 1);
    let widest = rows
        .values()
        .map(Vec::len)
        .max()
        .unwrap_or(1)
        .max(targets.len())
        .max(1) as i64;
    let width = widest * (W + GAP_X) + GAP_X;
    let layer_count = bottom as i64 + i64::from(!targets.is_empty());
    let height = layer_count * (H + GAP_Y) + 20;
    let place = |row: usize, index: usize, count: usize| -> (i64, i64) {
        let span = count as i64 * (W + GAP_X) - GAP_X;
        let left = (width - span) / 2;
        (
            left + index as i64 * (W + GAP_X),
            20 + row as i64 * (H + GAP_Y),
        )
    };
    let mut at = vec![(0, 0); flow.steps.len()];
    for (row, steps) in &rows {
        for (k, i) in steps.iter().enumerate() {
            at[*i] = place(*row, k, steps.len());
        }
    }
    let flow_at = |name: &str| {
        let k = targets.iter().position(|t| t == name).unwrap_or(0);
        place(bottom, k, targets.len())
    };
    let mut svg = format!(
        "<svg class=\"flow-graph\" role=\"img\" aria-label=\"Flow {} as a graph of {} steps\" \
         viewBox=\"0 0 {width} {height}\" width=\"{width}\" style=\"max-width:100%;height:auto\">\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" \
         markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M 0 0 L 10 5 L 0 10 z\"/></marker></defs>",
        escape(&flow.id),
        flow.steps.len()
    );
    for e in &edges {
        let (x1, y1) = (at[e.from].0 + W / 2, at[e.from].1 + H);
        let (x2, y2) = match (&e.to, &e.to_flow) {
            (Some(to), _) => (at[*to].0 + W / 2, at[*to].1),
            (None, Some(f)) => {
                let (x, y) = flow_at(f);
                (x + W / 2, y)
            }
            _ => continue,
        };
        let path = if y2 > y1 {
            format!("M {x1} {y1} L {x2} {y2}")
        } else {
            // Back or sideways: around the right of the boxes.
            let side = x1.max(x2) + W / 2 + 12;
            format!(
                "M {x1} {y1} C {side} {} {side} {} {x2} {y2}",
                y1 + 40,
                y2 - 40
            )
        };
        let (lx, ly) = ((x1 + x2) / 2 + 4, (y1 + y2) / 2);
        let _ = write!(
            svg,
            "<g class=\"edge\"><path d=\"{path}\" marker-end=\"url(#arrow)\"/>\
             <text x=\"{lx}\" y=\"{ly}\">{}</text></g>",
            escape(&e.label.chars().take(28).collect::<String>())
        );
    }
    for (i, step) in flow.steps.iter().enumerate() {
        let (x, y) = at[i];
        let class = if i == flow.start {
            "step start"
        } else {
            "step"
        };
        let kind = action_name(&step.action);
        let kind = match (&step.handoff, kind) {
            (Some(_), "") => "handoff".to_string(),
            (Some(_), k) => format!("{k} + handoff"),
            (None, k) => k.to_string(),
        };
        let _ = write!(
            svg,
            "<g class=\"{class}\" data-step=\"{id}\"><rect x=\"{x}\" y=\"{y}\" width=\"{W}\" height=\"{H}\" rx=\"6\"/>\
             <text x=\"{}\" y=\"{}\" class=\"name\">{id}</text>\
             <text x=\"{}\" y=\"{}\" class=\"kind\">{}</text></g>",
            x + W / 2,
            y + 20,
            x + W / 2,
            y + 37,
            escape(&kind),
            id = escape(&step.id.chars().take(22).collect::<String>()),
        );
    }
    for f in &targets {
        let (x, y) = flow_at(f);
        let _ = write!(
            svg,
            "<g class=\"other-flow\"><rect x=\"{x}\" y=\"{y}\" width=\"{W}\" height=\"{H}\" rx=\"22\"/>\
             <text x=\"{}\" y=\"{}\" class=\"name\">→ flow {}</text></g>",
            x + W / 2,
            y + 28,
            escape(f)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// The channel the sandbox chat plays on: the first `sandbox` channel.
fn sandbox_channel(state: &AppState) -> Option<String> {
    state
        .config
        .channels
        .iter()
        .find(|c| c.provider == Provider::Sandbox)
        .map(|c| c.name.clone())
}

#[derive(Debug, Default, Deserialize)]
struct SandboxQuery {
    #[serde(default)]
    from: Option<String>,
}

const SANDBOX_FROM: &str = "15550001234";

async fn sandbox(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Query(q): Query<SandboxQuery>,
) -> Response {
    let unavailable = sandbox_unavailable(&state);
    let from = q.from.unwrap_or_else(|| SANDBOX_FROM.to_string());
    let view = match (&unavailable, sandbox_channel(&state)) {
        (None, Some(channel)) => {
            conversation_view(&state.runtime, Some(channel), from.clone(), None)
                .await
                .ok()
        }
        _ => None,
    };
    let choices = view
        .as_ref()
        .and_then(|v| last_choices(&v["messages"]))
        .unwrap_or_default();
    page(
        "Sandbox",
        Nav::Sandbox,
        &session,
        html! {
            @if let Some(why) = &unavailable {
                p class="error" role="alert" { (why) }
            } @else {
                p class="hint" { "Play a customer: your messages go through the flows and the policy like a WhatsApp customer's, and nothing leaves this server." }
                section aria-labelledby="chat-h" class="chat" {
                    h2 id="chat-h" { "Chat as " (from) }
                    p { a href={ "/conversations/" (segment(&from)) "?channel=" (segment(&sandbox_channel(&state).unwrap_or_default())) } { "This conversation as an agent sees it" } }
                    div id="chat-log" {
                        @match &view {
                            Some(v) => (messages(&v["messages"])),
                            None => p class="empty" { "Say something to start, e.g. hi." },
                        }
                    }
                    form method="post" action="/sandbox/chat" class="card" {
                        (csrf_field(&session))
                        label for="sandbox-from" { "Customer's number" }
                        input id="sandbox-from" name="from" value=(from) inputmode="numeric" pattern="[0-9]+" required;
                        @if !choices.is_empty() {
                            div class="buttons" role="group" aria-label="Tap one of the bot's choices" {
                                @for (kind, id, title) in &choices {
                                    button type="submit" name=(kind) value=(id) class="secondary" formnovalidate { (title) }
                                }
                            }
                        }
                        label for="sandbox-text" { "Message" }
                        input id="sandbox-text" name="text" autocomplete="off" autofocus;
                        button type="submit" { "Send" }
                    }
                }
            }
        },
    )
    .into_response()
}

/// Why the sandbox chat cannot run here, if it cannot.
fn sandbox_unavailable(state: &AppState) -> Option<String> {
    if state.config.sandbox == SandboxAccess::Off {
        return Some("The sandbox is off (`sandbox: off` in flowgate.yaml).".into());
    }
    if sandbox_channel(state).is_none() {
        return Some(
            "There is no sandbox channel: add `- name: sandbox` with `provider: sandbox` under `channels:` in flowgate.yaml.".into(),
        );
    }
    None
}

/// What the customer can tap in the bot's latest message: its buttons (`button`, id,
/// title) or its list's rows (`list`, id, title).
fn last_choices(list: &Value) -> Option<Vec<(&'static str, String, String)>> {
    let last = list.as_array()?.last()?;
    if text(last, "direction") != "out" {
        return None;
    }
    let content = &last["body"]["content"];
    let pick = |kind: &'static str, items: &Value| -> Vec<(&'static str, String, String)> {
        items
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                (
                    kind,
                    text(b, "id").to_string(),
                    text(b, "title").to_string(),
                )
            })
            .collect()
    };
    let mut choices = pick("button", &content["buttons"]);
    for section in content["sections"].as_array().into_iter().flatten() {
        choices.extend(pick("list", &section["rows"]));
    }
    Some(choices)
}

#[derive(Debug, Deserialize)]
struct ChatForm {
    from: String,
    #[serde(default)]
    text: String,
    #[serde(default)]
    button: Option<String>,
    #[serde(default)]
    list: Option<String>,
}

async fn sandbox_chat(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Form(form): Form<ChatForm>,
) -> Response {
    if let Some(why) = sandbox_unavailable(&state) {
        return error_page(StatusCode::NOT_FOUND, Nav::Sandbox, &session, &why);
    }
    let channel = sandbox_channel(&state).expect("checked above");
    if !valid_from(&form.from) {
        return error_page(
            StatusCode::BAD_REQUEST,
            Nav::Sandbox,
            &session,
            "The customer's number is digits only, e.g. 15550001234.",
        );
    }
    let tapped = |choice: Option<String>| choice.filter(|c| !c.is_empty());
    let content = match (tapped(form.button), tapped(form.list)) {
        (Some(id), _) => InboundContent::ButtonReply {
            title: id.clone(),
            id,
        },
        (None, Some(id)) => InboundContent::ListReply {
            title: id.clone(),
            id,
        },
        (None, None) if !form.text.trim().is_empty() => InboundContent::Text { body: form.text },
        (None, None) => {
            return Redirect::to(&format!("/sandbox?from={}", form.from)).into_response();
        }
    };
    let runtime = &state.runtime;
    let now = runtime.clock.now();
    let inbound = Inbound::sandbox(content, now, now);
    match runtime.inbound(&channel, &form.from, None, inbound).await {
        Ok(_) => Redirect::to(&format!("/sandbox?from={}", form.from)).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "a sandbox message failed");
            error_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                Nav::Sandbox,
                &session,
                "The message could not be processed; see the server log.",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::compile::compile_flow;
    use crate::script::Scripting;
    use crate::templates::Registry;

    fn flow(text: &str) -> Flow {
        let no_scripts = |name: &str| Err(format!("no script {name}"));
        let compiled = compile_flow(
            "flows/t.yaml",
            text,
            &Scripting::default(),
            &Registry::default(),
            &no_scripts,
        );
        assert!(
            !compiled.diagnostics.has_errors(),
            "{}",
            compiled.diagnostics.render(false)
        );
        compiled.flow.unwrap()
    }

    const MENU: &str = r#"
flow: menu
steps:
  ask:
    say: "Pick one"
    buttons:
      - { id: a, title: "A" }
      - { id: b, title: "B" }
    next:
      - button: a
        goto: done
      - button: b
        flow: other
  done:
    say: "Done"
    next: ask
  orphan:
    say: "Never reached"
"#;

    #[test]
    fn buttons_next_and_other_flows_are_labelled_edges() {
        let f = flow(MENU);
        let edges = edges(&f);
        let labels: Vec<(&str, Option<&str>, &str)> = edges
            .iter()
            .map(|e| {
                let to = e.to.map(|i| f.steps[i].id.as_str());
                (f.steps[e.from].id.as_str(), to, e.label.as_str())
            })
            .collect();
        assert_eq!(
            labels,
            vec![
                ("ask", Some("done"), "button a"),
                ("ask", None, "button b"),
                ("done", Some("ask"), "next"),
            ]
        );
        assert_eq!(edges[1].to_flow.as_deref(), Some("other"));
    }

    #[test]
    fn layers_follow_the_distance_from_the_start() {
        let f = flow(MENU);
        let layers = layers(&f, &edges(&f));
        // ask 0, done 1, the unreached step below the deepest.
        assert_eq!(layers, vec![0, 1, 2]);
        let svg = graph(&f);
        assert_eq!(svg.matches("<g class=\"step").count(), 3);
        assert!(svg.contains("→ flow other"), "{svg}");
        assert!(svg.contains(">button a<"), "{svg}");
    }
}
