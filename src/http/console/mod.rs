//! The web console at `/`: server-rendered pages (maud) for marketers and agents, behind a
//! sign-in with the admin token. Every page reads and writes through the functions the
//! admin API's handlers use (the store, the runtime, the campaign runner), so the console
//! and the API never disagree.
//!
//! - [`session`]: the session cookie and the forms' CSRF token;
//! - [`conversations`]: who is talking, one conversation, the agent's reply (previewed by
//!   the policy before it is sent), the end of a handoff; the queue;
//! - [`campaigns`]: the list, the form (template, audience count, next runs), controls, a
//!   run's live progress and its report as a chart;
//! - [`pages`]: contacts (search, tags, CSV import), templates (sync), flows (a graph of
//!   each flow's steps with its diagnostics), the sandbox chat;
//! - [`live`]: server-sent events that re-render a page's moving part after each database
//!   write (no polling by the browser).
//!
//! Every request but the sign-in page and the two assets needs a session; every `POST`
//! needs the session's CSRF token in its `csrf` field, checked here before any handler runs.
//! Without an admin token the console is off and says so.

pub mod campaigns;
pub mod conversations;
pub mod live;
pub mod pages;
pub mod session;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::Deserialize;

use crate::clock::SharedClock;
use crate::state::AppState;
use session::{COOKIE, Sessions, cookie_value};

/// The largest form body taken (a pasted CSV file for the import).
const MAX_FORM: usize = 32 * 1024 * 1024;

/// What the console's handlers share besides the [`AppState`].
pub struct Console {
    /// `None`: no admin token, the console is off.
    pub sessions: Option<Sessions>,
    /// The runtime's clock: sessions expire by it.
    pub clock: SharedClock,
}

/// The signed-in session of a request, for the forms' hidden CSRF field.
#[derive(Clone)]
pub struct Session {
    pub cookie: String,
    pub csrf: String,
}

/// The console's routes, to merge at `/`.
pub fn router(state: &AppState) -> Router<AppState> {
    let console = Arc::new(Console {
        sessions: Sessions::new(state.config.admin.token.as_ref()),
        clock: state.runtime.clock.clone(),
    });
    Router::new()
        .route("/", get(|| async { Redirect::to("/conversations") }))
        .route("/sign-in", get(sign_in_page).post(sign_in))
        .route("/sign-out", post(sign_out))
        .route("/console/assets/console.css", get(css))
        .route("/console/assets/console.js", get(js))
        .merge(conversations::routes())
        .merge(campaigns::routes())
        .merge(pages::routes())
        .merge(live::routes())
        .route_layer(axum::middleware::from_fn_with_state(console.clone(), guard))
        .layer(Extension(console))
}

/// Paths open without a session.
fn public(path: &str) -> bool {
    path == "/sign-in" || path.starts_with("/console/assets/")
}

/// Lets a request through when the console is on, its session valid and, for a `POST`, its
/// `csrf` field the session's; otherwise answers with the sign-in page, a redirect to it, or
/// a refusal.
async fn guard(State(console): State<Arc<Console>>, request: Request, next: Next) -> Response {
    let Some(sessions) = &console.sessions else {
        return disabled();
    };
    if public(request.uri().path()) {
        return next.run(request).await;
    }
    let now = console.clock.now().timestamp();
    let cookie = request
        .headers()
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| cookie_value(h, COOKIE))
        .filter(|c| sessions.valid(c, now))
        .map(str::to_string);
    let Some(cookie) = cookie else {
        if request.method() == Method::GET {
            return Redirect::to("/sign-in").into_response();
        }
        return message_page(
            StatusCode::UNAUTHORIZED,
            "Signed out",
            "Your session ended: sign in again, then repeat what you did.",
        );
    };
    let session = Session {
        csrf: sessions.csrf(&cookie),
        cookie,
    };
    let mut request = if request.method() == Method::POST {
        match checked_form(sessions, &session, request).await {
            Ok(request) => request,
            Err(refused) => return refused,
        }
    } else {
        request
    };
    request.extensions_mut().insert(session);
    let mut response = next.run(request).await;
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The request again, if its form's `csrf` field is the session's token; else 403.
async fn checked_form(
    sessions: &Sessions,
    session: &Session,
    request: Request,
) -> Result<Request, Response> {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_FORM).await.map_err(|_| {
        message_page(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Too large",
            &format!(
                "A form takes at most {} MiB; import larger files with `flowgate contacts import`.",
                MAX_FORM / (1024 * 1024)
            ),
        )
    })?;
    let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes).unwrap_or_default();
    let given = fields
        .iter()
        .find(|(k, _)| k == "csrf")
        .map_or("", |(_, v)| v.as_str());
    if !sessions.csrf_matches(&session.cookie, given) {
        return Err(message_page(
            StatusCode::FORBIDDEN,
            "Form refused",
            "The form's security token is missing or wrong (it may come from another site or an old page): reload the page and send it again.",
        ));
    }
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

fn disabled() -> Response {
    message_page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Console off",
        "The console needs an admin token: set `admin.token` in flowgate.yaml (for example `token: ${FLOWGATE_ADMIN_TOKEN}`) and restart flowgate serve.",
    )
}

#[derive(Debug, Deserialize)]
struct SignInQuery {
    #[serde(default)]
    failed: Option<String>,
}

async fn sign_in_page(
    axum::extract::Query(q): axum::extract::Query<SignInQuery>,
) -> impl IntoResponse {
    sign_in_markup(q.failed.is_some().then_some("That token is wrong."))
}

fn sign_in_markup(error: Option<&str>) -> Markup {
    bare(
        "Sign in",
        html! {
            main id="main" class="signin" {
                h1 { "flowgate console" }
                form method="post" action="/sign-in" class="card" {
                    @if let Some(error) = error {
                        p class="error" role="alert" id="signin-error" { (error) }
                    }
                    label for="token" { "Admin token" }
                    input id="token" name="token" type="password" autocomplete="current-password" required autofocus;
                    p class="hint" { "The " code { "admin.token" } " of flowgate.yaml." }
                    button type="submit" { "Sign in" }
                }
            }
        },
    )
}

#[derive(Debug, Deserialize)]
struct SignIn {
    token: String,
}

async fn sign_in(
    Extension(console): Extension<Arc<Console>>,
    State(state): State<AppState>,
    Form(form): Form<SignIn>,
) -> Response {
    let (Some(sessions), Some(expected)) = (&console.sessions, state.config.admin.token.as_ref())
    else {
        return disabled();
    };
    if !expected.matches(&form.token) {
        tracing::warn!("a console sign-in with a wrong token");
        return (
            StatusCode::UNAUTHORIZED,
            sign_in_markup(Some("That token is wrong.")),
        )
            .into_response();
    }
    let cookie = sessions.issue(console.clock.now().timestamp());
    (
        [(header::SET_COOKIE, session::set_cookie(&cookie))],
        Redirect::to("/conversations"),
    )
        .into_response()
}

async fn sign_out(
    Extension(console): Extension<Arc<Console>>,
    Extension(session): Extension<Session>,
) -> Response {
    if let Some(sessions) = &console.sessions {
        sessions.revoke(&session.cookie, console.clock.now().timestamp());
    }
    (
        [(header::SET_COOKIE, session::clear_cookie())],
        Redirect::to("/sign-in"),
    )
        .into_response()
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", include_str!("console.css"))
}

async fn js() -> Response {
    asset("text/javascript; charset=utf-8", include_str!("console.js"))
}

fn asset(kind: &'static str, text: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        text,
    )
        .into_response()
}

/// The console's sections, for the navigation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Conversations,
    Queue,
    Campaigns,
    Contacts,
    Templates,
    Flows,
    Sandbox,
}

const NAV: [(Nav, &str, &str); 7] = [
    (Nav::Conversations, "/conversations", "Conversations"),
    (Nav::Queue, "/queue", "Queue"),
    (Nav::Campaigns, "/campaigns", "Campaigns"),
    (Nav::Contacts, "/contacts", "Contacts"),
    (Nav::Templates, "/templates", "Templates"),
    (Nav::Flows, "/flows", "Flows"),
    (Nav::Sandbox, "/sandbox", "Sandbox"),
];

/// A full page: the header with the navigation and sign-out, then `body` as the main
/// landmark.
pub fn page(title: &str, active: Nav, session: &Session, body: Markup) -> Markup {
    bare(
        title,
        html! {
            a class="skip" href="#main" { "Skip to content" }
            header class="top" {
                a class="brand" href="/conversations" { "flowgate" }
                nav aria-label="Console" {
                    ul {
                        @for (nav, href, label) in NAV {
                            li {
                                @if nav == active {
                                    a href=(href) aria-current="page" { (label) }
                                } @else {
                                    a href=(href) { (label) }
                                }
                            }
                        }
                    }
                }
                form method="post" action="/sign-out" class="signout" {
                    (csrf_field(session))
                    button type="submit" class="link" { "Sign out" }
                }
            }
            main id="main" tabindex="-1" {
                h1 { (title) }
                (body)
            }
        },
    )
}

/// The document around `body`.
fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · flowgate" }
                link rel="stylesheet" href="/console/assets/console.css";
                script src="/console/assets/console.js" defer {}
            }
            body { (body) }
        }
    }
}

/// The hidden field every form carries.
pub fn csrf_field(session: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(session.csrf); }
}

/// A page with one message (errors, the console being off), without the navigation.
pub fn message_page(status: StatusCode, title: &str, message: &str) -> Response {
    let body = bare(
        title,
        html! {
            main id="main" class="signin" {
                h1 { (title) }
                p class="card" role="alert" { (message) }
                p { a href="/conversations" { "Back to the console" } }
            }
        },
    );
    (status, body).into_response()
}

/// A console page saying what went wrong, keeping the navigation.
pub fn error_page(status: StatusCode, active: Nav, session: &Session, message: &str) -> Response {
    let title = if status.is_server_error() {
        "Something failed"
    } else {
        "Not possible"
    };
    let body = page(
        title,
        active,
        session,
        html! { p class="error" role="alert" { (message) } },
    );
    (status, body).into_response()
}

/// The status and message of an API refusal (`{"error": {"message"}}`), for a page.
pub async fn refusal(refused: impl Into<crate::http::Refused>) -> (StatusCode, String) {
    let refused: crate::http::Refused = refused.into();
    let status = refused.status();
    let bytes = axum::body::to_bytes(refused.into_body(), 1024 * 1024)
        .await
        .unwrap_or_default();
    let message = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| "the request failed; see the server log".to_string());
    (status, message)
}

/// An instant as people read it, in UTC, inside a `<time>`.
pub fn when(at: &DateTime<Utc>) -> Markup {
    html! { time datetime=(at.to_rfc3339()) { (at.format("%Y-%m-%d %H:%M UTC")) } }
}

/// [`when`] for an RFC 3339 string from an API answer.
pub fn when_text(value: &serde_json::Value) -> Markup {
    match value
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
    {
        Some(at) => when(&at.with_timezone(&Utc)),
        None => html! { "—" },
    }
}

/// A duration in seconds as `2d 3h`, `4h 10m`, `5m 3s`.
pub fn span(seconds: i64) -> String {
    let s = seconds.max(0);
    let (d, h, m, sec) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) => format!("{m}m {sec}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// A JSON string field, or empty.
pub fn text<'a>(value: &'a serde_json::Value, key: &str) -> &'a str {
    value[key].as_str().unwrap_or("")
}

/// A percent-encoded path segment (contacts, campaign names).
pub fn segment(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The channel a page shows: the one asked for, else the config's first (the channel
/// campaigns and imports default to; the API's default is the sandbox, for `chat`).
pub fn channel(state: &AppState, requested: Option<String>) -> String {
    requested
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| state.config.default_channel().name.clone())
}

/// A channel picker for a filter form, when there is more than one channel.
pub fn channel_picker(state: &AppState, current: &str) -> Markup {
    html! {
        @if state.config.channels.len() > 1 {
            label for="channel" { "Channel" }
            select id="channel" name="channel" {
                @for c in &state.config.channels {
                    option value=(c.name) selected[c.name == current] { (c.name) }
                }
            }
        }
    }
}

/// Markup that is already HTML (an SVG drawn here).
pub fn raw(html: String) -> Markup {
    PreEscaped(html)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_as_people_say_them() {
        assert_eq!(span(5), "5s");
        assert_eq!(span(125), "2m 5s");
        assert_eq!(span(3 * 3600 + 60), "3h 1m");
        assert_eq!(span(2 * 86_400 + 3600), "2d 1h");
        assert_eq!(span(-3), "0s");
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(segment("15550001234"), "15550001234");
        assert_eq!(segment("US.1/2 x"), "US.1%2F2%20x");
    }
}
