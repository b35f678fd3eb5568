//! Campaigns in the console: the list with pause, resume and run-now; the form that writes
//! a campaign (a template picked from the registry with its parameters, the audience by
//! tags with a live count, the schedule with its next five runs in the chosen zone); a
//! run's progress, live, and its report as a bar chart.
//!
//! The form becomes the campaign's YAML text and goes through the runner exactly as
//! `POST /api/campaigns` does ([`CampaignRunner::create_or_replace`]), so it is compiled and
//! checked as `flowgate check` would; the preview compiles the same text
//! ([`CampaignRunner::compile`]) and reads the next runs from its
//! [`crate::campaign::schedule::Schedule`] and the count from the audience walk a run's
//! snapshot takes ([`audience::count`]).

use std::fmt::Write as _;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use maud::{Markup, html};
use serde::Deserialize;

use super::{Nav, Session, csrf_field, error_page, page, raw, segment, when};
use crate::campaign::report::{Measures, Report};
use crate::campaign_runner::audience;
use crate::campaign_runner::registry::{ChangeError, Write};
use crate::state::AppState;
use crate::store::RunRow;

/// Template parameters the form offers at most.
const MAX_PARAMS: usize = 10;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/campaigns", get(list).post(create))
        .route("/campaigns/new", get(new_form))
        .route("/campaigns/preview", get(preview))
        .route("/campaigns/{name}", get(show))
        .route("/campaigns/{name}/pause", post(pause))
        .route("/campaigns/{name}/resume", post(resume))
        .route("/campaigns/{name}/run-now", post(run_now))
        .route("/campaigns/{name}/runs/{id}", get(run_page))
}

fn failed(session: &Session, what: &str, e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "{what}");
    error_page(
        StatusCode::INTERNAL_SERVER_ERROR,
        Nav::Campaigns,
        session,
        &format!("{what}; see the server log."),
    )
}

async fn list(State(state): State<AppState>, Extension(session): Extension<Session>) -> Response {
    let db = &state.runtime.db;
    let rows = match db.campaigns().await {
        Ok(rows) => rows,
        Err(e) => return failed(&session, "Listing campaigns failed", e),
    };
    let mut items = Vec::new();
    for row in rows {
        let latest = match db.campaign_runs(&row.name, 1).await {
            Ok(mut runs) => runs.pop(),
            Err(e) => return failed(&session, "Listing runs failed", e),
        };
        items.push((row, latest));
    }
    page(
        "Campaigns",
        Nav::Campaigns,
        &session,
        html! {
            p { a class="button" href="/campaigns/new" { "New campaign" } }
            @if items.is_empty() {
                p class="empty" { "No campaigns yet." }
            } @else {
                div class="table-wrap" {
                    table {
                        thead { tr {
                            th scope="col" { "Campaign" }
                            th scope="col" { "From" }
                            th scope="col" { "State" }
                            th scope="col" { "Next run" }
                            th scope="col" { "Latest run" }
                        } }
                        tbody {
                            @for (row, latest) in &items {
                                tr {
                                    td { a href={ "/campaigns/" (segment(&row.name)) } { (row.name) } }
                                    td { (row.origin.as_str()) }
                                    td {
                                        @if row.paused { span class="badge warn" { "paused" } } @else { "active" }
                                    }
                                    td { @if let Some(at) = &row.next_run_at { (when(at)) } @else { "—" } }
                                    td {
                                        @if let Some(run) = latest {
                                            a href={ "/campaigns/" (segment(&row.name)) "/runs/" (run.id) } {
                                                "run " (run.id) " · " (run.status.as_str())
                                            }
                                        } @else { "—" }
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

/// What the form sends (and the preview reads from the query).
#[derive(Debug, Default, Clone, Deserialize)]
pub struct Draft {
    #[serde(default)]
    name: String,
    #[serde(default)]
    category: String,
    /// `name|language`.
    #[serde(default)]
    template: String,
    #[serde(default)]
    params: Vec<String>,
    /// Comma-separated.
    #[serde(default)]
    tags: String,
    /// `cron` or `at`.
    #[serde(default)]
    when: String,
    #[serde(default)]
    cron: String,
    /// `2026-01-05T10:00` (a `datetime-local` field).
    #[serde(default)]
    at: String,
    #[serde(default)]
    timezone: String,
}

impl Draft {
    /// The form's fields from a form body or a query string: `param1`…`paramN` become
    /// `params` (serde_urlencoded has no repeated keys).
    fn from_pairs(pairs: Vec<(String, String)>) -> Self {
        let mut draft = Draft::default();
        let mut params = vec![String::new(); MAX_PARAMS];
        for (key, value) in pairs {
            match key.as_str() {
                "name" => draft.name = value,
                "category" => draft.category = value,
                "template" => draft.template = value,
                "tags" => draft.tags = value,
                "when" => draft.when = value,
                "cron" => draft.cron = value,
                "at" => draft.at = value,
                "timezone" => draft.timezone = value,
                other => {
                    if let Some(i) = other
                        .strip_prefix("param")
                        .and_then(|n| n.parse::<usize>().ok())
                        .filter(|i| (1..=MAX_PARAMS).contains(i))
                    {
                        params[i - 1] = value;
                    }
                }
            }
        }
        draft.params = params;
        draft
    }

    fn tags(&self) -> Vec<String> {
        self.tags
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// The campaign's YAML, every value quoted (a JSON string is a YAML string). The
    /// template's parameters are as many as the registry says it takes.
    pub fn source(&self, param_count: usize) -> String {
        let q = |s: &str| serde_json::to_string(s).expect("a string serializes");
        let (template, language) = self
            .template
            .split_once('|')
            .unwrap_or((&self.template, ""));
        let params: Vec<String> = self.params.iter().take(param_count).map(|p| q(p)).collect();
        let mut yaml = format!(
            "campaign: {}\ncategory: {}\ntemplate: {{ name: {}, language: {}, params: [{}] }}\n",
            q(self.name.trim()),
            q(self.category.trim()),
            q(template),
            q(language),
            params.join(", ")
        );
        let tags = self.tags();
        if tags.is_empty() {
            yaml.push_str("audience: { where: 'true' }\n");
        } else {
            let tags: Vec<String> = tags.iter().map(|t| q(t)).collect();
            let _ = writeln!(yaml, "audience: {{ tags: [{}] }}", tags.join(", "));
        }
        if self.when == "at" {
            let at = if self.at.len() == 16 {
                format!("{}:00", self.at)
            } else {
                self.at.clone()
            };
            let _ = writeln!(yaml, "at: {}", q(at.trim()));
        } else {
            let _ = writeln!(yaml, "schedule: {}", q(self.cron.trim()));
        }
        let zone = if self.timezone.trim().is_empty() {
            "UTC"
        } else {
            self.timezone.trim()
        };
        let _ = writeln!(yaml, "timezone: {}", q(zone));
        yaml
    }
}

/// How many parameters the picked template takes (0 when the registry lacks it: the
/// compiler says so).
fn param_count(state: &AppState, draft: &Draft) -> usize {
    let (name, language) = draft.template.split_once('|').unwrap_or(("", ""));
    state
        .runtime
        .templates()
        .find(name, language)
        .map_or(0, |t| t.param_count())
}

async fn new_form(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
) -> Response {
    let draft = Draft {
        category: "marketing".into(),
        when: "cron".into(),
        cron: "0 10 * * MON".into(),
        timezone: "UTC".into(),
        ..Draft::default()
    };
    form_page(&state, &session, &draft, None).into_response()
}

fn form_page(state: &AppState, session: &Session, draft: &Draft, problems: Option<&str>) -> Markup {
    let registry = state.runtime.templates();
    let selected_count = param_count(state, draft);
    page(
        "New campaign",
        Nav::Campaigns,
        session,
        html! {
            @if let Some(problems) = problems {
                div class="error" role="alert" id="campaign-problems" {
                    p { "The campaign was not saved:" }
                    pre { (problems) }
                }
            }
            form method="post" action="/campaigns" class="card campaign-form" data-campaign-form {
                (csrf_field(session))
                fieldset {
                    legend { "Campaign" }
                    label for="c-name" { "Name" }
                    input id="c-name" name="name" required pattern="[a-z0-9_]+" value=(draft.name)
                        aria-describedby="c-name-hint";
                    p class="hint" id="c-name-hint" { "Lower-case letters, digits and _, e.g. spring_sale." }
                    label for="c-category" { "Category" }
                    select id="c-category" name="category" {
                        @for c in ["marketing", "utility", "authentication"] {
                            option value=(c) selected[draft.category == c] { (c) }
                        }
                    }
                }
                fieldset {
                    legend { "Template" }
                    label for="c-template" { "Approved template" }
                    select id="c-template" name="template" required {
                        option value="" { "Pick a template" }
                        @for t in &registry.templates {
                            @let value = format!("{}|{}", t.name, t.language);
                            option value=(value) data-params=(t.param_count()) data-body=(t.body)
                                selected[draft.template == value] {
                                (t.name) " (" (t.language) ") · " (t.status.as_str())
                            }
                        }
                    }
                    p class="hint" id="c-template-body" {}
                    div id="c-params" {
                        @for i in 1..=MAX_PARAMS {
                            @let hidden = i > selected_count;
                            div class="param" data-param=(i) hidden[hidden] {
                                label for={ "c-param" (i) } { "Parameter {{" (i) "}}" }
                                input id={ "c-param" (i) } name={ "param" (i) }
                                    value=(draft.params.get(i - 1).map_or("", String::as_str))
                                    placeholder="{{contact.name}}";
                            }
                        }
                    }
                }
                fieldset {
                    legend { "Audience" }
                    label for="c-tags" { "Tags (comma-separated; every one required)" }
                    input id="c-tags" name="tags" value=(draft.tags) placeholder="vip, newsletter";
                    p class="hint" { "No tags: every contact of the channel." }
                }
                fieldset {
                    legend { "Schedule" }
                    div class="choice" {
                        input type="radio" id="c-when-cron" name="when" value="cron" checked[draft.when != "at"];
                        label for="c-when-cron" { "Repeating (cron)" }
                        input type="radio" id="c-when-at" name="when" value="at" checked[draft.when == "at"];
                        label for="c-when-at" { "Once" }
                    }
                    label for="c-cron" { "Cron (minute hour day month weekday)" }
                    input id="c-cron" name="cron" value=(draft.cron) placeholder="0 10 * * MON";
                    label for="c-at" { "Once at (local time in the zone)" }
                    input id="c-at" name="at" type="datetime-local" value=(draft.at);
                    label for="c-timezone" { "Time zone" }
                    input id="c-timezone" name="timezone" list="zones" value=(draft.timezone);
                    datalist id="zones" {
                        @for tz in chrono_tz::TZ_VARIANTS { option value=(tz.name()) {} }
                    }
                }
                section id="campaign-preview" aria-live="polite" aria-label="Preview" {
                    (schedule_markup(state, draft))
                }
                div class="buttons" {
                    button type="submit" { "Create campaign" }
                }
            }
        },
    )
}

/// The form's first preview: the next runs (the script fetches the audience's count).
fn schedule_markup(state: &AppState, draft: &Draft) -> Markup {
    match compile_draft(state, draft) {
        Ok(campaign) => next_runs(state, &campaign),
        Err(problems) => html! { div class="hint" { pre { (problems) } } },
    }
}

fn next_runs(state: &AppState, campaign: &crate::campaign::Campaign) -> Markup {
    let zone = campaign.timezone;
    let upcoming = campaign.schedule().upcoming(state.runtime.clock.now(), 5);
    html! {
        h2 { "Next runs (" (zone.name()) ")" }
        @if upcoming.is_empty() {
            p { "None: the time has passed." }
        } @else {
            ol id="next-runs" {
                @for at in &upcoming {
                    li { time datetime=(at.to_rfc3339()) { (at.with_timezone(&zone).format("%a %Y-%m-%d %H:%M %Z")) } }
                }
            }
        }
    }
}

/// The draft compiled as `check` would, or the problems as `check` prints them.
fn compile_draft(
    state: &AppState,
    draft: &Draft,
) -> Result<std::sync::Arc<crate::campaign::Campaign>, String> {
    let mut draft = draft.clone();
    if draft.name.trim().is_empty() {
        draft.name = "preview".into();
    }
    let source = draft.source(param_count(state, &draft));
    state
        .campaigns
        .compile("console/form.yaml", &source)
        .map(|(campaign, _)| campaign)
        .map_err(|diags| diags.render(false))
}

/// `GET /campaigns/preview?…`: the next five runs and the audience's size for the form's
/// fields, as a fragment.
async fn preview(
    State(state): State<AppState>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(&query.unwrap_or_default()).unwrap_or_default();
    let draft = Draft::from_pairs(pairs);
    let campaign = match compile_draft(&state, &draft) {
        Ok(campaign) => campaign,
        Err(problems) => {
            return html! {
                p class="hint" { "Not a campaign yet:" }
                pre class="hint" { (problems) }
            }
            .into_response();
        }
    };
    let count = audience::count(&state.runtime, &campaign).await;
    html! {
        p id="audience-count" {
            @match count {
                Ok(n) => { strong { (n) } " contacts in the audience now" }
                Err(e) => { "The audience could not be counted: " (e.to_string()) }
            }
        }
        (next_runs(&state, &campaign))
    }
    .into_response()
}

async fn create(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    let draft = Draft::from_pairs(pairs);
    let source = draft.source(param_count(&state, &draft));
    match state
        .campaigns
        .create_or_replace(&source, Write::Create)
        .await
    {
        Ok(saved) => {
            Redirect::to(&format!("/campaigns/{}", segment(&saved.campaign.name))).into_response()
        }
        Err(ChangeError::Invalid(diags)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            form_page(&state, &session, &draft, Some(&diags.render(false))),
        )
            .into_response(),
        Err(ChangeError::Runner(e)) => failed(&session, "Saving the campaign failed", e),
        Err(e) => (
            StatusCode::CONFLICT,
            form_page(&state, &session, &draft, Some(&e.to_string())),
        )
            .into_response(),
    }
}

async fn show(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Path(name): Path<String>,
) -> Response {
    let db = &state.runtime.db;
    let row = match db.campaign(&name).await {
        Ok(Some(row)) => row,
        Ok(None) => {
            return error_page(
                StatusCode::NOT_FOUND,
                Nav::Campaigns,
                &session,
                &format!("There is no campaign `{name}`."),
            );
        }
        Err(e) => return failed(&session, "Loading the campaign failed", e),
    };
    let runs = match db.campaign_runs(&name, 20).await {
        Ok(runs) => runs,
        Err(e) => return failed(&session, "Listing runs failed", e),
    };
    let listed = state.campaigns.listed(&name, row.origin);
    let path = format!("/campaigns/{}", segment(&name));
    page(
        &format!("Campaign {name}"),
        Nav::Campaigns,
        &session,
        html! {
            p { a href="/campaigns" { "← All campaigns" } }
            dl class="facts" {
                dt { "From" } dd { (row.origin.as_str()) }
                dt { "Channel" } dd { (row.channel) }
                dt { "State" } dd {
                    @if row.paused {
                        span class="badge warn" id="campaign-state" { "paused" }
                        @if let Some(reason) = &row.pause_reason { " — " (reason) }
                    } @else { span id="campaign-state" { "active" } }
                }
                dt { "Next run" } dd { @if let Some(at) = &row.next_run_at { (when(at)) } @else { "—" } }
                @if let Some(problem) = &listed.problem {
                    dt { "Problem" } dd class="error" { (problem) }
                }
            }
            div class="buttons" {
                @if row.paused {
                    form method="post" action={ (path) "/resume" } class="inline" {
                        (csrf_field(&session)) button type="submit" { "Resume" }
                    }
                } @else {
                    form method="post" action={ (path) "/pause" } class="inline" {
                        (csrf_field(&session)) button type="submit" class="secondary" { "Pause" }
                    }
                }
                form method="post" action={ (path) "/run-now" } class="inline" {
                    (csrf_field(&session)) button type="submit" id="run-now" { "Run now" }
                }
            }
            @if let Some(campaign) = &listed.campaign {
                section { (next_runs(&state, campaign)) }
            }
            section aria-labelledby="runs-h" {
                h2 id="runs-h" { "Runs" }
                @if runs.is_empty() {
                    p class="empty" { "No runs yet." }
                } @else {
                    ul {
                        @for run in &runs {
                            li {
                                a href={ (path) "/runs/" (run.id) } { "Run " (run.id) }
                                " · " (run.status.as_str()) " · " (run.trigger.as_str()) " · " (when(&run.scheduled_for))
                            }
                        }
                    }
                }
            }
            details {
                summary { "Definition" }
                pre { (row.source) }
            }
        },
    )
    .into_response()
}

async fn control(
    session: &Session,
    name: &str,
    done: Result<Option<i64>, ChangeError>,
) -> Response {
    match done {
        Ok(Some(run)) => {
            Redirect::to(&format!("/campaigns/{}/runs/{run}", segment(name))).into_response()
        }
        Ok(None) => Redirect::to(&format!("/campaigns/{}", segment(name))).into_response(),
        Err(ChangeError::Runner(e)) => failed(session, "The change failed", e),
        Err(e) => {
            let status = match e {
                ChangeError::Unknown(_) => StatusCode::NOT_FOUND,
                _ => StatusCode::CONFLICT,
            };
            error_page(status, Nav::Campaigns, session, &e.to_string())
        }
    }
}

async fn pause(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Path(name): Path<String>,
) -> Response {
    let done = state.campaigns.pause(&name).await.map(|()| None);
    control(&session, &name, done).await
}

async fn resume(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Path(name): Path<String>,
) -> Response {
    let done = state.campaigns.resume(&name).await.map(|()| None);
    control(&session, &name, done).await
}

async fn run_now(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Path(name): Path<String>,
) -> Response {
    let done = state
        .campaigns
        .run_now(&name, None)
        .await
        .map(|run| Some(run.run_id));
    control(&session, &name, done).await
}

async fn run_page(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Path((name, id)): Path<(String, i64)>,
) -> Response {
    let fragment = match run_fragment(&state, &name, id).await {
        Ok(fragment) => fragment,
        Err((status, message)) => return error_page(status, Nav::Campaigns, &session, &message),
    };
    page(
        &format!("{name} · run {id}"),
        Nav::Campaigns,
        &session,
        html! {
            p { a href={ "/campaigns/" (segment(&name)) } { "← Campaign " (name) } }
            section id="run" data-live={ "/live/campaigns/" (segment(&name)) "/runs/" (id) } aria-live="polite" {
                (fragment)
            }
        },
    )
    .into_response()
}

/// A run's state, progress and report chart: the run page's moving part.
pub async fn run_fragment(
    state: &AppState,
    name: &str,
    id: i64,
) -> Result<Markup, (StatusCode, String)> {
    let internal = |e: &dyn std::fmt::Display| {
        tracing::error!(error = %e, "reading a run failed");
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "reading the run failed; see the server log".to_string(),
        )
    };
    let run = match state.runtime.db.run(id).await {
        Ok(Some(run)) if run.campaign == name => run,
        Ok(_) => {
            return Err((
                StatusCode::NOT_FOUND,
                format!("campaign `{name}` has no run {id}"),
            ));
        }
        Err(e) => return Err(internal(&e)),
    };
    let window = state.config.policy.window.0;
    let report = state
        .campaigns
        .report(&run, window, state.config.campaign_prices.as_ref())
        .await
        .map_err(|e| internal(&e))?;
    Ok(run_markup(&run, &report))
}

fn run_markup(run: &RunRow, report: &Report) -> Markup {
    let planned = report.measures.planned;
    let decided = report.measures.decided();
    let percent = if planned > 0 {
        decided * 100 / planned
    } else {
        100
    };
    html! {
        dl class="facts" {
            dt { "Status" } dd { span id="run-status" class={ "badge run-" (run.status.as_str()) } { (run.status.as_str()) } }
            dt { "Scheduled for" } dd { (when(&run.scheduled_for)) }
            @if let Some(reason) = &run.reason { dt { "Reason" } dd { (reason) } }
        }
        label for="run-progress" { "Progress: " (decided) " of " (planned) " recipients decided" }
        progress id="run-progress" max=(planned.max(1)) value=(decided) { (percent) "%" }
        h2 { "Report" }
        (chart(&report.measures))
        (variants_table(report))
        @if let Some(total) = report.cost.total {
            p { "Estimated cost: " (format!("{total:.2}")) " " (report.cost.currency.as_deref().unwrap_or("")) }
        }
    }
}

/// A split campaign's run by variant: a row each with its share and the report's measures
/// (nothing without a split).
fn variants_table(report: &Report) -> Markup {
    if report.variants.is_empty() {
        return html! {};
    }
    html! {
        h3 { "By variant" }
        div class="table-wrap" {
            table id="run-variants" {
                thead { tr {
                    @for column in ["Variant", "Share", "Planned", "Sent", "Delivered", "Read", "Replied", "Failed", "Skipped"] {
                        th scope="col" { (column) }
                    }
                } }
                tbody {
                    @for v in &report.variants {
                        tr data-variant=(v.variant.as_deref().unwrap_or("")) {
                            th scope="row" { (v.variant.as_deref().unwrap_or("(none)")) }
                            td { (format!("{:.1} %", v.share * 100.0)) }
                            @let m = &v.measures;
                            @for n in [m.planned, m.sent, m.delivered, m.read, m.replied, m.failed.total, m.skipped.total] {
                                td { (n) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A report's measures as horizontal bars (inline SVG): sent, delivered, read, replied, failed,
/// then skipped by reason.
pub fn chart(measures: &Measures) -> Markup {
    let mut bars: Vec<(String, i64, &str)> = vec![
        ("sent".into(), measures.sent, "sent"),
        ("delivered".into(), measures.delivered, "delivered"),
        ("read".into(), measures.read, "read"),
        ("replied".into(), measures.replied, "replied"),
        ("failed".into(), measures.failed.total, "failed"),
    ];
    for (reason, n) in &measures.skipped.by {
        bars.push((format!("skipped: {reason}"), *n, "skipped"));
    }
    if measures.skipped.by.is_empty() {
        bars.push(("skipped".into(), measures.skipped.total, "skipped"));
    }
    let max = bars.iter().map(|b| b.1).max().unwrap_or(0).max(1);
    let (row, label_w, bar_w) = (28, 230, 300);
    let height = bars.len() * row + 8;
    let mut svg = format!(
        "<svg class=\"chart\" role=\"img\" aria-labelledby=\"chart-title\" viewBox=\"0 0 {} {height}\" width=\"100%\">\
         <title id=\"chart-title\">Run report: {}</title>",
        label_w + bar_w + 70,
        bars.iter()
            .map(|(l, n, _)| format!("{l} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (i, (label, n, class)) in bars.iter().enumerate() {
        let y = i * row + 4;
        let w = (*n as f64 / max as f64 * bar_w as f64).round() as i64;
        let label = maud::html! { (label) }.into_string();
        let short: String = label.chars().take(34).collect();
        let _ = write!(
            svg,
            "<g class=\"bar {class}\" data-label=\"{label}\" data-value=\"{n}\">\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{short}</text>\
             <rect x=\"{}\" y=\"{y}\" width=\"{}\" height=\"{}\" rx=\"3\"></rect>\
             <text x=\"{}\" y=\"{}\" class=\"value\">{n}</text></g>",
            label_w - 8,
            y + 17,
            label_w,
            w.max(1),
            row - 8,
            label_w + w + 6,
            y + 17,
        );
    }
    svg.push_str("</svg>");
    raw(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_draft_becomes_quoted_yaml() {
        let draft = Draft::from_pairs(vec![
            ("name".into(), "spring".into()),
            ("category".into(), "marketing".into()),
            ("template".into(), "spring_sale|en_US".into()),
            ("param1".into(), "{{contact.name}}".into()),
            ("param2".into(), "not taken".into()),
            ("tags".into(), "vip, \"odd\" ,".into()),
            ("when".into(), "at".into()),
            ("at".into(), "2026-01-05T10:00".into()),
            ("timezone".into(), "Europe/Berlin".into()),
        ]);
        let yaml = draft.source(1);
        assert!(yaml.contains("params: [\"{{contact.name}}\"]"), "{yaml}");
        assert!(yaml.contains("tags: [\"vip\", \"\\\"odd\\\"\"]"), "{yaml}");
        assert!(yaml.contains("at: \"2026-01-05T10:00:00\""), "{yaml}");
        assert!(yaml.contains("timezone: \"Europe/Berlin\""), "{yaml}");
    }

    #[test]
    fn a_split_runs_report_shows_a_row_per_variant() {
        use crate::campaign::report::VariantReport;
        let report = Report {
            measures: Measures {
                planned: 4,
                ..Measures::default()
            },
            variants: vec![VariantReport {
                variant: Some("short".into()),
                share: 0.25,
                measures: Measures {
                    planned: 1,
                    replied: 1,
                    ..Measures::default()
                },
            }],
            ..Report::default()
        };
        let html = variants_table(&report).into_string();
        assert!(html.contains("data-variant=\"short\""), "{html}");
        assert!(html.contains("25.0 %"), "{html}");
        assert!(variants_table(&Report::default()).into_string().is_empty());
    }

    #[test]
    fn no_tags_is_everyone() {
        let draft = Draft::from_pairs(vec![("cron".into(), "0 10 * * *".into())]);
        let yaml = draft.source(0);
        assert!(yaml.contains("audience: { where: 'true' }"), "{yaml}");
        assert!(yaml.contains("schedule: \"0 10 * * *\""), "{yaml}");
        assert!(yaml.contains("timezone: \"UTC\""), "{yaml}");
    }
}
