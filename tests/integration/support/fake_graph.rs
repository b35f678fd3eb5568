//! A fake WhatsApp Graph API on 127.0.0.1 for integration tests: a real HTTP server (axum,
//! port 0) that checks credentials like Meta or 360dialog, records every request, and
//! answers like the Cloud API — or as a test scripts it (errors, HTTP failures, delays).
//!
//! ```ignore
//! let fake = FakeGraph::start(FakeAuth::cloud_api("110000000000001", "token")).await;
//! fake.script(Script::next(2, Reply::graph_error(130429)));
//! // … point a channel's api_base at fake.cloud_api_base() …
//! let sends = fake.wait_for_sends(3, Duration::from_secs(5)).await;
//! ```
//!
//! Like WhatsApp, it can post delivery statuses back ([`FakeGraph::echo_statuses`]): a
//! signed `sent`, then `delivered`, webhook for every accepted send, carrying the send's
//! `biz_opaque_callback_data`, retried until the server answers 200. A send is accepted the
//! moment it arrives ([`FakeGraph::accepted`]), even if its sender dies before the answer.
//!
//! It also lists templates (`GET /{VERSION}/{waba_id}/message_templates`, Cloud API only) in
//! the pages a test gives [`FakeGraph::serve_templates`], linked by `paging.next` as Meta does
//! (with an `access_token` in the link, as Graph adds when a request carried one).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::StreamExt as _;
use serde_json::{Value, json};

/// The Graph API version in the fake's Cloud API paths.
pub const VERSION: &str = "v25.0";

/// Which provider the fake plays, with the credentials it accepts.
#[derive(Debug, Clone)]
pub enum FakeAuth {
    /// `POST /{VERSION}/{phone_number_id}/messages` with `Authorization: Bearer {token}`.
    CloudApi {
        phone_number_id: String,
        token: String,
    },
    /// `POST /messages` with `D360-API-KEY: {key}`.
    Dialog360 { key: String },
}

impl FakeAuth {
    pub fn cloud_api(phone_number_id: &str, token: &str) -> Self {
        Self::CloudApi {
            phone_number_id: phone_number_id.into(),
            token: token.into(),
        }
    }

    pub fn dialog360(key: &str) -> Self {
        Self::Dialog360 { key: key.into() }
    }
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The request path, e.g. `/v25.0/110000000000001/messages`.
    pub path: String,
    /// The query string (without `?`), empty when there is none.
    pub query: String,
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
    pub body: Value,
    /// What the fake answered: the HTTP status and, for an accepted send, the wamid.
    pub status: u16,
    pub wamid: Option<String>,
    /// When it arrived, for ordering and pacing checks.
    pub at: std::time::Instant,
}

impl Recorded {
    /// A mark-as-read (`"status": "read"`) rather than a message.
    pub fn is_mark_read(&self) -> bool {
        self.body.get("status").and_then(Value::as_str) == Some("read")
    }

    /// Who a message went to: `to` (without the `+`), else `recipient`.
    pub fn to(&self) -> Option<String> {
        self.body
            .get("to")
            .and_then(Value::as_str)
            .map(|t| t.trim_start_matches('+').to_string())
            .or_else(|| {
                self.body
                    .get("recipient")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
    }

    /// The text of a text message, the body of an interactive one, or a template's name.
    pub fn text(&self) -> Option<&str> {
        let b = &self.body;
        b["text"]["body"]
            .as_str()
            .or_else(|| b["interactive"]["body"]["text"].as_str())
            .or_else(|| b["template"]["name"].as_str())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// How the fake answers a send.
#[derive(Debug, Clone)]
pub enum Reply {
    /// The Cloud API's success: `{"messaging_product", "contacts", "messages":[{"id"}]}`.
    Success,
    /// A Graph error envelope with this code (and Meta's title for it), at `http` status.
    GraphError { http: u16, code: i64 },
    /// Any status and raw body (a proxy's 502 page, an empty 500…).
    Http { status: u16, body: String },
    /// Waits, then answers (to exceed a client's timeout).
    Delay(Duration, Box<Reply>),
    /// The reply with a `Retry-After: {seconds}` header.
    RetryAfter(u64, Box<Reply>),
}

impl Reply {
    /// The error `code` at the HTTP status Meta's table gives it.
    pub fn graph_error(code: i64) -> Self {
        let http = match code {
            130429 => 429,
            131000 | 131016 | 131057 => 500,
            2 | 133004 => 503,
            131031 | 368 | 130497 => 403,
            132001 => 404,
            190 | 0 => 401,
            _ => 400,
        };
        Self::GraphError { http, code }
    }

    pub fn delayed(by: Duration, then: Reply) -> Self {
        Self::Delay(by, Box::new(then))
    }

    pub fn retry_after(seconds: u64, then: Reply) -> Self {
        Self::RetryAfter(seconds, Box::new(then))
    }
}

/// A scripted answer: for which sends, and how often.
#[derive(Debug, Clone)]
pub struct Script {
    /// Only sends to this recipient (`to` without `+`, or `recipient`); `None` for any.
    pub to: Option<String>,
    /// How many sends it answers; `None` for all of them.
    pub times: Option<usize>,
    /// `(k, n)`: of every `n` sends it sees, only the first `k` get this reply (the others
    /// go on to later scripts); `None` for all.
    pub share: Option<(usize, usize)>,
    pub reply: Reply,
}

impl Script {
    /// The next `n` sends.
    pub fn next(n: usize, reply: Reply) -> Self {
        Self {
            to: None,
            times: Some(n),
            share: None,
            reply,
        }
    }

    /// Every send from now on.
    pub fn always(reply: Reply) -> Self {
        Self {
            to: None,
            times: None,
            share: None,
            reply,
        }
    }

    /// `k` of every `n` sends from now on (the first `k` of each `n`), e.g. `(3, 10)` for
    /// 30 % of them.
    pub fn share(k: usize, n: usize, reply: Reply) -> Self {
        Self {
            to: None,
            times: None,
            share: Some((k, n.max(1))),
            reply,
        }
    }

    /// The next `n` sends to `to`.
    pub fn next_to(to: &str, n: usize, reply: Reply) -> Self {
        Self {
            to: Some(to.trim_start_matches('+').to_string()),
            times: Some(n),
            share: None,
            reply,
        }
    }
}

/// Where and when the fake posts statuses back, as WhatsApp does a moment after a send.
#[derive(Debug, Clone)]
pub struct StatusEcho {
    /// The server's webhook URL, e.g. `http://127.0.0.1:{port}/webhook/main`.
    pub webhook: String,
    /// The channel's `app_secret`, to sign with.
    pub app_secret: String,
    /// The business number the statuses are for.
    pub phone_number_id: String,
    /// From acceptance to the `sent` status, and from it to `delivered`.
    pub after: Duration,
    /// How long a status the server does not answer 200 is retried (every 100 ms).
    pub retry_for: Duration,
}

/// A send the fake accepted, recorded when it arrived.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// `to` without `+`, else `recipient`.
    pub to: Option<String>,
    /// Its `biz_opaque_callback_data`.
    pub key: Option<String>,
    pub wamid: String,
    /// The text of a text message (see [`Recorded::text`]).
    pub text: Option<String>,
    /// From acceptance until the server answered 200 to its `sent` status (once it has).
    pub status_latency: Option<Duration>,
}

#[derive(Default)]
struct FakeState {
    accepted: Vec<Accepted>,
    echo: Option<StatusEcho>,
    requests: Vec<Recorded>,
    /// Message sends seen, for [`Script::share`].
    seen: usize,
    scripts: Vec<Script>,
    mark_read_fails: bool,
    sent: u64,
    /// The WABA id and the pages of `data` its template list answers with.
    templates: Option<(String, Vec<Vec<Value>>)>,
    /// The tier the number's node answers as its messaging limit.
    messaging_limit: Option<String>,
    /// Media uploaded (`POST …/media`), and how uploads are answered.
    uploads: MediaUploads,
    /// Customers' files it serves, by media id ([`FakeGraph::serve_media`]).
    media: BTreeMap<String, FakeMedia>,
    /// Bytes of each file a chunked download produced ([`FakeGraph::bytes_streamed`]).
    streamed: BTreeMap<String, Arc<std::sync::atomic::AtomicU64>>,
}

#[derive(Clone)]
struct Shared {
    auth: FakeAuth,
    state: Arc<Mutex<FakeState>>,
    changed: Arc<tokio::sync::Notify>,
}

/// The running fake; it stops when dropped.
pub struct FakeGraph {
    /// `http://127.0.0.1:{port}`.
    pub url: String,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeGraph {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeGraph {
    pub async fn start(auth: FakeAuth) -> Self {
        let shared = Shared {
            auth,
            state: Arc::new(Mutex::new(FakeState::default())),
            changed: Arc::new(tokio::sync::Notify::new()),
        };
        let app = Router::new()
            .route("/{*path}", post(handle).get(graph_get))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake Graph API");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, shared, task }
    }

    /// The `api_base` of a `cloud_api` channel pointed at this fake (version included).
    pub fn cloud_api_base(&self) -> String {
        format!("{}/{VERSION}", self.url)
    }

    /// Adds a scripted answer. Scripts are tried in the order added; the first one that
    /// matches a send answers it (and is used up after its `times`).
    pub fn script(&self, script: Script) {
        self.shared.state.lock().unwrap().scripts.push(script);
    }

    /// Forgets every script: sends succeed again.
    pub fn clear_scripts(&self) {
        self.shared.state.lock().unwrap().scripts.clear();
    }

    /// Serves `pages` (each the `data` of one page) as the templates of `waba_id`.
    pub fn serve_templates(&self, waba_id: &str, pages: Vec<Vec<Value>>) {
        self.shared.state.lock().unwrap().templates = Some((waba_id.to_string(), pages));
    }

    /// Answers `GET /{phone_number_id}?fields=whatsapp_business_manager_messaging_limit` with
    /// `tier` (e.g. `TIER_250`).
    pub fn serve_messaging_limit(&self, tier: &str) {
        self.shared.state.lock().unwrap().messaging_limit = Some(tier.to_string());
    }

    /// Every media upload so far, in arrival order.
    pub fn uploads(&self) -> Vec<FakeUpload> {
        self.shared.state.lock().unwrap().uploads.uploads.clone()
    }

    /// Makes WhatsApp forget the uploaded media `id` (as if it expired): a send naming it
    /// is refused with `131053`.
    pub fn forget_media(&self, id: &str) {
        self.shared
            .state
            .lock()
            .unwrap()
            .uploads
            .forgotten
            .insert(id.to_string());
    }

    /// Makes every upload wait `delay` before it answers (to overlap two senders' uploads).
    pub fn delay_uploads(&self, delay: Duration) {
        self.shared.state.lock().unwrap().uploads.delay = delay;
    }

    /// The template-list requests so far, in arrival order.
    pub fn template_requests(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path.ends_with("/message_templates"))
            .collect()
    }

    /// Makes mark-as-read answer HTTP 500.
    pub fn fail_mark_reads(&self, fail: bool) {
        self.shared.state.lock().unwrap().mark_read_fails = fail;
    }

    /// Posts a `sent` and a `delivered` status for every send accepted from now on.
    pub fn echo_statuses(&self, echo: StatusEcho) {
        self.shared.state.lock().unwrap().echo = Some(echo);
    }

    /// Every send accepted so far (whether or not its answer reached the sender).
    pub fn accepted(&self) -> Vec<Accepted> {
        self.shared.state.lock().unwrap().accepted.clone()
    }

    /// How many recipients have an accepted send (without copying [`FakeGraph::accepted`],
    /// for a test that polls it while thousands arrive).
    pub fn accepted_recipients(&self) -> usize {
        let state = self.shared.state.lock().unwrap();
        let recipients: std::collections::HashSet<&str> = state
            .accepted
            .iter()
            .filter_map(|a| a.to.as_deref())
            .collect();
        recipients.len()
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.state.lock().unwrap().requests.clone()
    }

    /// The message sends so far (posts to `…/messages`, not mark-as-read), in arrival
    /// order.
    pub fn sends(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path.ends_with("/messages") && !r.is_mark_read())
            .collect()
    }

    /// The mark-as-read requests so far.
    pub fn mark_reads(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(Recorded::is_mark_read)
            .collect()
    }

    /// Waits until at least `n` sends arrived (and were answered), or panics after `timeout`.
    pub async fn wait_for_sends(&self, n: usize, timeout: Duration) -> Vec<Recorded> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.shared.changed.notified();
            let sends = self.sends();
            if sends.len() >= n {
                return sends;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!(
                    "waited {timeout:?} for {n} sends at the fake Graph API, got {}: {:#?}",
                    sends.len(),
                    sends.iter().map(|s| &s.body).collect::<Vec<_>>()
                );
            }
        }
    }
}

/// Meta's title for the error codes tests use.
fn title(code: i64) -> &'static str {
    match code {
        130429 => "Rate limit hit",
        131056 => "(Business Account, Consumer Account) pair rate limit hit",
        131047 => "Re-engagement message",
        131026 => "Message undeliverable",
        131000 => "Something went wrong",
        131048 => "Spam rate limit hit",
        368 => "Temporarily blocked for policies violations",
        131031 => "Account has been locked",
        190 => "Error validating access token: Session has expired",
        132001 => "Template name does not exist in the translation",
        131049 => "This message was not delivered to maintain healthy ecosystem engagement.",
        131050 => {
            "Unable to deliver the message. This recipient has chosen to stop receiving marketing messages on WhatsApp from your business"
        }
        _ => "Error",
    }
}

fn graph_error_body(code: i64) -> Value {
    json!({
        "error": {
            "message": format!("(#{code}) {}", title(code)),
            "type": "OAuthException",
            "code": code,
            "error_data": {
                "messaging_product": "whatsapp",
                "details": format!("{} (fake)", title(code)),
            },
            "fbtrace_id": "AfakeTraceId",
        }
    })
}

async fn handle(
    State(shared): State<Shared>,
    Path(path): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Response {
    let path = format!("/{path}");
    if path.ends_with("/media") {
        return upload_media(&shared, path, &headers, &bytes).await;
    }
    let headers: BTreeMap<String, String> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                v.to_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let mut recorded = Recorded {
        path: path.clone(),
        query: String::new(),
        headers: headers.clone(),
        body: body.clone(),
        status: 0,
        wamid: None,
        at: std::time::Instant::now(),
    };

    // Where and how a real provider would refuse the request.
    let refusal = match &shared.auth {
        FakeAuth::CloudApi {
            phone_number_id,
            token,
        } => {
            if path != format!("/{VERSION}/{phone_number_id}/messages") {
                Some((
                    404,
                    json!({"error": {"message": format!("Unknown path {path}"), "type": "GraphMethodException", "code": 100}}),
                ))
            } else if headers.get("authorization") != Some(&format!("Bearer {token}")) {
                Some((401, graph_error_body(190)))
            } else {
                None
            }
        }
        FakeAuth::Dialog360 { key } => {
            if path != "/messages" {
                Some((
                    404,
                    json!({"meta": {"success": false, "httpCode": 404, "developerMessage": "Not found"}}),
                ))
            } else if headers.get("d360-api-key") != Some(key)
                || headers.contains_key("authorization")
            {
                Some((
                    401,
                    json!({"meta": {"success": false, "httpCode": 401, "developerMessage": "Invalid api key"}}),
                ))
            } else {
                None
            }
        }
    };
    if let Some((status, answer)) = refusal {
        return finish(&shared, recorded, status, answer.to_string());
    }

    if let Some(refused) = refuse_unknown_media(&shared, &recorded) {
        return refused;
    }

    if recorded.is_mark_read() {
        let fails = shared.state.lock().unwrap().mark_read_fails;
        return if fails {
            finish(&shared, recorded, 500, String::new())
        } else {
            finish(&shared, recorded, 200, json!({"success": true}).to_string())
        };
    }

    let mut reply = {
        let mut state = shared.state.lock().unwrap();
        let to = recorded.to();
        let seen = state.seen;
        state.seen += 1;
        let found = state.scripts.iter().position(|s| {
            (s.to.is_none() || s.to == to) && s.share.is_none_or(|(k, n)| seen % n < k)
        });
        match found {
            Some(i) => {
                let reply = state.scripts[i].reply.clone();
                if let Some(times) = &mut state.scripts[i].times {
                    *times -= 1;
                    if *times == 0 {
                        state.scripts.remove(i);
                    }
                }
                reply
            }
            None => Reply::Success,
        }
    };
    let mut wamid = final_reply(&reply)
        .is_success()
        .then(|| accept(&shared, &recorded));
    let mut retry_after = None;
    loop {
        match reply {
            Reply::Delay(by, then) => {
                tokio::time::sleep(by).await;
                reply = *then;
            }
            Reply::RetryAfter(seconds, then) => {
                retry_after = Some(seconds);
                reply = *then;
            }
            Reply::Success => {
                let wamid = wamid.take().expect("accepted on arrival");
                let contact = match (
                    body.get("to").and_then(Value::as_str),
                    body.get("recipient").and_then(Value::as_str),
                ) {
                    (Some(to), _) => json!({"input": to, "wa_id": to.trim_start_matches('+')}),
                    (None, Some(user)) => json!({"input": user, "user_id": user}),
                    (None, None) => json!({}),
                };
                recorded.wamid = Some(wamid.clone());
                let answer = json!({
                    "messaging_product": "whatsapp",
                    "contacts": [contact],
                    "messages": [{"id": wamid}],
                });
                return finish(&shared, recorded, 200, answer.to_string());
            }
            Reply::GraphError { http, code } => {
                let mut response =
                    finish(&shared, recorded, http, graph_error_body(code).to_string());
                if let Some(seconds) = retry_after {
                    response
                        .headers_mut()
                        .insert(axum::http::header::RETRY_AFTER, seconds.into());
                }
                return response;
            }
            Reply::Http { status, body } => return finish(&shared, recorded, status, body),
        }
    }
}

/// The answer a reply ends in, after its delays and headers.
fn final_reply(reply: &Reply) -> &Reply {
    match reply {
        Reply::Delay(_, then) | Reply::RetryAfter(_, then) => final_reply(then),
        other => other,
    }
}

impl Reply {
    fn is_success(&self) -> bool {
        matches!(self, Reply::Success)
    }
}

/// Accepts a send the moment it arrives, as WhatsApp does: a wamid, a record, and its
/// statuses on their way when the fake echoes them.
fn accept(shared: &Shared, recorded: &Recorded) -> String {
    let mut state = shared.state.lock().unwrap();
    state.sent += 1;
    let wamid = format!("wamid.fake.{}", state.sent);
    let key = recorded.body["biz_opaque_callback_data"]
        .as_str()
        .map(str::to_string);
    state.accepted.push(Accepted {
        to: recorded.to(),
        key: key.clone(),
        wamid: wamid.clone(),
        text: recorded.text().map(str::to_string),
        status_latency: None,
    });
    if let Some(echo) = state.echo.clone() {
        let (shared, wamid, to) = (shared.clone(), wamid.clone(), recorded.to());
        tokio::spawn(echo_statuses(shared, echo, wamid, to, key));
    }
    wamid
}

/// Posts `sent`, then `delivered`, for `wamid`, each `echo.after` apart and retried until the
/// server answers 200 (it may be down: WhatsApp retries too), at most `echo.retry_for`.
async fn echo_statuses(
    shared: Shared,
    echo: StatusEcho,
    wamid: String,
    to: Option<String>,
    key: Option<String>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let accepted_at = tokio::time::Instant::now();
    for status in ["sent", "delivered"] {
        tokio::time::sleep(echo.after).await;
        let mut item = json!({"id": wamid, "status": status,
            "timestamp": super::now_timestamp(), "biz_opaque_callback_data": key});
        match &to {
            Some(to) if !flowgate::domain::is_bsuid(to) => item["recipient_id"] = json!(to),
            Some(user) => item["recipient_user_id"] = json!(user),
            None => {}
        }
        let body = super::envelope(&echo.phone_number_id, json!({"statuses": [item]}));
        let signature = super::sign(&echo.app_secret, &body);
        let deadline = tokio::time::Instant::now() + echo.retry_for;
        loop {
            let answer = http
                .post(&echo.webhook)
                .header("content-type", "application/json")
                .header("x-hub-signature-256", &signature)
                .body(body.clone())
                .send()
                .await;
            if answer.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if status == "sent" {
            let mut state = shared.state.lock().unwrap();
            if let Some(a) = state.accepted.iter_mut().find(|a| a.wamid == wamid) {
                a.status_latency = Some(accepted_at.elapsed());
            }
        }
    }
}

/// `GET /{VERSION}/{waba_id}/message_templates`: the page the `after` cursor names
/// (`page-N`; none is the first), with `paging.next` while more pages follow.
async fn list_templates(
    State(shared): State<Shared>,
    Path(path): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let path = format!("/{path}");
    let query = query.unwrap_or_default();
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_string();
    let recorded = Recorded {
        path: path.clone(),
        query: query.clone(),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    v.to_str().unwrap_or_default().to_string(),
                )
            })
            .collect(),
        body: Value::Null,
        status: 0,
        wamid: None,
        at: std::time::Instant::now(),
    };
    let FakeAuth::CloudApi {
        token,
        phone_number_id,
    } = &shared.auth
    else {
        let answer =
            json!({"meta": {"success": false, "httpCode": 404, "developerMessage": "Not found"}});
        return finish(&shared, recorded, 404, answer.to_string());
    };
    let limit = shared.state.lock().unwrap().messaging_limit.clone();
    if let Some(tier) = limit.filter(|_| path == format!("/{VERSION}/{phone_number_id}")) {
        if recorded.header("authorization") != Some(&format!("Bearer {token}")) {
            return finish(&shared, recorded, 401, graph_error_body(190).to_string());
        }
        let answer =
            json!({"whatsapp_business_manager_messaging_limit": tier, "id": phone_number_id});
        return finish(&shared, recorded, 200, answer.to_string());
    }
    let templates = shared.state.lock().unwrap().templates.clone();
    let Some((waba_id, pages)) =
        templates.filter(|(waba, _)| path == format!("/{VERSION}/{waba}/message_templates"))
    else {
        let answer = json!({"error": {"message": format!("Unknown path {path}"), "type": "GraphMethodException", "code": 100}});
        return finish(&shared, recorded, 404, answer.to_string());
    };
    if recorded.header("authorization") != Some(&format!("Bearer {token}")) {
        return finish(&shared, recorded, 401, graph_error_body(190).to_string());
    }
    let page: usize = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("after=page-"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let data = pages.get(page).cloned().unwrap_or_default();
    let mut paging = json!({"cursors": {"before": format!("page-{page}"), "after": format!("page-{}", page + 1)}});
    if page + 1 < pages.len() {
        paging["next"] = json!(format!(
            "http://{host}/{VERSION}/{waba_id}/message_templates?access_token={token}&limit=100&after=page-{}",
            page + 1
        ));
    }
    let answer = json!({"data": data, "paging": paging});
    finish(&shared, recorded, 200, answer.to_string())
}

// ---------------------------------------------------------------------------------------
// Customers' files: `GET /{VERSION}/{media-id}` (360dialog: `GET /{media-id}`) describes a
// file with a download URL; `GET /whatsapp_business/attachments/?mid=…` (the path of Meta's
// download host) serves its bytes. Both need the channel's credentials. For 360dialog the
// URL names Meta's host, which is not reachable: the server must fetch it through the
// fake's own host, as it does through 360dialog's.

/// A file the fake serves, and how it misbehaves.
#[derive(Debug, Clone, Default)]
pub struct FakeMedia {
    pub bytes: Vec<u8>,
    pub mime: String,
    /// Bytes served instead of `bytes` (the description still names `bytes`' SHA-256).
    pub wrong_bytes: Option<Vec<u8>>,
    /// Whether the description carries `file_size` (off: only the download's length and
    /// bytes can tell the size).
    pub hide_size: bool,
    /// The next this many descriptions answer error 131052.
    pub errors_131052: usize,
    /// How the download sends the bytes.
    pub serving: Serving,
    /// The `file_size` the description states instead of the true one (a lie).
    pub stated_size: Option<u64>,
}

/// How a download's bytes go out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Serving {
    /// In one body with its `Content-Length`.
    #[default]
    Whole,
    /// Chunked, without `Content-Length`, in chunks of this many bytes, produced only as
    /// the client reads them: only reading tells the size.
    Chunked(usize),
    /// With a `Content-Length` of this many bytes, fewer than the body has.
    ShortLength(u64),
}

impl FakeMedia {
    pub fn new(bytes: impl Into<Vec<u8>>, mime: &str) -> Self {
        Self {
            bytes: bytes.into(),
            mime: mime.into(),
            ..Self::default()
        }
    }

    /// The SHA-256 a webhook gives for this file: base64 of the raw digest.
    pub fn sha256(&self) -> String {
        use base64::Engine as _;
        use sha2::Digest as _;
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(&self.bytes))
    }
}

impl FakeGraph {
    /// Serves `media` as the file `media_id`; returns the SHA-256 for the webhook.
    pub fn serve_media(&self, media_id: &str, media: FakeMedia) -> String {
        let sha = media.sha256();
        let mut state = self.shared.state.lock().unwrap();
        state.media.insert(media_id.to_string(), media);
        sha
    }

    /// How many bytes of the file `media_id` a [`Serving::Chunked`] download produced so
    /// far (what the client read, plus what the sockets' buffers took).
    pub fn bytes_streamed(&self, media_id: &str) -> u64 {
        let state = self.shared.state.lock().unwrap();
        state
            .streamed
            .get(media_id)
            .map_or(0, |n| n.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Requests for files so far (descriptions and downloads), in arrival order.
    pub fn media_requests(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.body == Value::String("media".into()))
            .collect()
    }
}

/// Every GET: a file's description or bytes, else the template list and the number's node.
async fn graph_get(
    State(shared): State<Shared>,
    Path(path): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let query_text = query.clone().unwrap_or_default();
    if path == "whatsapp_business/attachments/" || path == "whatsapp_business/attachments" {
        return media_download(&shared, &path, &query_text, &headers);
    }
    let media_id = match &shared.auth {
        FakeAuth::CloudApi { .. } => path.strip_prefix(&format!("{VERSION}/")),
        FakeAuth::Dialog360 { .. } => Some(path.as_str()),
    };
    let known = media_id.filter(|id| shared.state.lock().unwrap().media.contains_key(*id));
    match known {
        Some(id) => media_description(&shared, &path, id, &headers),
        None => list_templates(State(shared), Path(path), RawQuery(query), headers).await,
    }
}

/// A request for a file, recorded (its body `"media"` marks it).
fn media_recorded(path: &str, query: &str, headers: &HeaderMap) -> Recorded {
    Recorded {
        path: format!("/{path}"),
        query: query.to_string(),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    v.to_str().unwrap_or_default().to_string(),
                )
            })
            .collect(),
        body: Value::String("media".into()),
        status: 0,
        wamid: None,
        at: std::time::Instant::now(),
    }
}

/// Whether a request carries the credentials the fake's provider wants.
fn media_authorized(shared: &Shared, recorded: &Recorded) -> bool {
    match &shared.auth {
        FakeAuth::CloudApi { token, .. } => {
            recorded.header("authorization") == Some(&format!("Bearer {token}"))
        }
        FakeAuth::Dialog360 { key } => recorded.header("d360-api-key") == Some(key.as_str()),
    }
}

/// `GET /{media-id}`: `{url, mime_type, sha256, file_size, id}`, or 131052 while scripted.
fn media_description(shared: &Shared, path: &str, id: &str, headers: &HeaderMap) -> Response {
    let recorded = media_recorded(path, "", headers);
    if !media_authorized(shared, &recorded) {
        return finish(shared, recorded, 401, graph_error_body(190).to_string());
    }
    let media = {
        let mut state = shared.state.lock().unwrap();
        let media = state.media.get_mut(id).expect("known media");
        if media.errors_131052 > 0 {
            media.errors_131052 -= 1;
            None
        } else {
            Some(media.clone())
        }
    };
    let Some(media) = media else {
        return finish(shared, recorded, 400, graph_error_body(131052).to_string());
    };
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    let url = match &shared.auth {
        FakeAuth::CloudApi { .. } => {
            format!("http://{host}/whatsapp_business/attachments/?mid={id}&ext=1")
        }
        // Meta's host: 360dialog's clients fetch it through 360dialog.
        FakeAuth::Dialog360 { .. } => {
            format!("https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid={id}&ext=1")
        }
    };
    let mut answer = json!({
        "messaging_product": "whatsapp",
        "url": url,
        "mime_type": media.mime,
        "sha256": media.sha256(),
        "id": id,
    });
    if !media.hide_size {
        let size = media.stated_size.unwrap_or(media.bytes.len() as u64);
        answer["file_size"] = json!(size.to_string());
    }
    finish(shared, recorded, 200, answer.to_string())
}

/// The download URL: the file's bytes (or its wrong bytes), with the channel's credentials.
fn media_download(shared: &Shared, path: &str, query: &str, headers: &HeaderMap) -> Response {
    let mut recorded = media_recorded(path, query, headers);
    if !media_authorized(shared, &recorded) {
        return finish(shared, recorded, 401, graph_error_body(190).to_string());
    }
    let id = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("mid="))
        .unwrap_or_default();
    let media = shared.state.lock().unwrap().media.get(id).cloned();
    let Some(media) = media else {
        return finish(shared, recorded, 404, graph_error_body(100).to_string());
    };
    recorded.status = 200;
    let streamed = {
        let mut state = shared.state.lock().unwrap();
        state.requests.push(recorded);
        state.streamed.entry(id.to_string()).or_default().clone()
    };
    shared.changed.notify_waiters();
    let content_type = [(axum::http::header::CONTENT_TYPE, media.mime.clone())];
    let bytes = media.wrong_bytes.unwrap_or(media.bytes);
    match media.serving {
        Serving::Whole => (StatusCode::OK, content_type, bytes).into_response(),
        Serving::Chunked(size) => {
            // A stream of unknown length: hyper sends it chunked, each chunk made only when
            // the client reads on, and counted.
            let (bytes, size) = (Bytes::from(bytes), size.max(1));
            let chunks = (0..bytes.len().div_ceil(size))
                .map(move |i| bytes.slice(i * size..((i + 1) * size).min(bytes.len())));
            let body = futures_util::stream::iter(chunks).map(move |chunk| {
                streamed.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
                Ok::<_, std::convert::Infallible>(chunk)
            });
            (
                StatusCode::OK,
                content_type,
                axum::body::Body::from_stream(body),
            )
                .into_response()
        }
        Serving::ShortLength(length) => {
            let body =
                futures_util::stream::iter([Ok::<_, std::convert::Infallible>(Bytes::from(bytes))]);
            let mut response = (
                StatusCode::OK,
                content_type,
                axum::body::Body::from_stream(body),
            )
                .into_response();
            response.headers_mut().insert(
                axum::http::header::CONTENT_LENGTH,
                axum::http::HeaderValue::from(length),
            );
            response
        }
    }
}

fn finish(shared: &Shared, mut recorded: Recorded, status: u16, body: String) -> Response {
    recorded.status = status;
    shared.state.lock().unwrap().requests.push(recorded);
    shared.changed.notify_waiters();
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// The fake's media uploads: what arrived, the ids WhatsApp "forgot", how slow it answers.
#[derive(Default)]
struct MediaUploads {
    uploads: Vec<FakeUpload>,
    forgotten: std::collections::HashSet<String>,
    delay: Duration,
}

/// One upload as the fake received it.
#[derive(Debug, Clone)]
pub struct FakeUpload {
    /// The media id the fake answered.
    pub id: String,
    pub path: String,
    /// The multipart fields: `messaging_product`, `type`, and the file's name and bytes.
    pub messaging_product: String,
    pub mime: String,
    pub file_name: String,
    pub bytes: Vec<u8>,
}

/// `POST /{VERSION}/{phone_number_id}/media` (360dialog: `POST /media`): checks the
/// credentials and the multipart fields like WhatsApp, records the file, answers `{id}`.
async fn upload_media(
    shared: &Shared,
    path: String,
    headers: &HeaderMap,
    bytes: &[u8],
) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (expected, authorized) = match &shared.auth {
        FakeAuth::CloudApi {
            phone_number_id,
            token,
        } => (
            format!("/{VERSION}/{phone_number_id}/media"),
            header("authorization") == Some(&format!("Bearer {token}")),
        ),
        FakeAuth::Dialog360 { key } => (
            "/media".to_string(),
            header("d360-api-key") == Some(key.as_str()) && header("authorization").is_none(),
        ),
    };
    let answer = |status: u16, body: Value| {
        (
            StatusCode::from_u16(status).unwrap(),
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    };
    if path != expected {
        return answer(
            404,
            json!({"error": {"message": format!("Unknown path {path}"), "code": 100}}),
        );
    }
    if !authorized {
        return answer(401, graph_error_body(190));
    }
    let fields = header("content-type")
        .and_then(|t| t.split("boundary=").nth(1))
        .map(|b| multipart_fields(bytes, b.trim_matches('"')))
        .unwrap_or_default();
    let field = |name: &str| fields.iter().find(|f| f.0 == name);
    let (Some(product), Some(mime), Some(file)) =
        (field("messaging_product"), field("type"), field("file"))
    else {
        return answer(
            400,
            json!({"error": {"message": "(#100) The parameter file, type and messaging_product are required", "code": 100}}),
        );
    };
    let delay = shared.state.lock().unwrap().uploads.delay;
    tokio::time::sleep(delay).await;
    let upload = {
        let mut state = shared.state.lock().unwrap();
        let id = format!(
            "{}",
            900_000_000_000_000u64 + state.uploads.uploads.len() as u64 + 1
        );
        let upload = FakeUpload {
            id,
            path,
            messaging_product: String::from_utf8_lossy(&product.2).into_owned(),
            mime: String::from_utf8_lossy(&mime.2).into_owned(),
            file_name: file.1.clone().unwrap_or_default(),
            bytes: file.2.clone(),
        };
        state.uploads.uploads.push(upload.clone());
        upload
    };
    shared.changed.notify_waiters();
    answer(200, json!({"id": upload.id}))
}

/// A send naming a media id the fake never issued, or forgot, is refused like WhatsApp's
/// `131053`.
fn refuse_unknown_media(shared: &Shared, recorded: &Recorded) -> Option<Response> {
    let kind = recorded.body.get("type")?.as_str()?;
    let id = recorded.body.get(kind)?.get("id")?.as_str()?;
    let known = {
        let state = shared.state.lock().unwrap();
        state.uploads.uploads.iter().any(|u| u.id == id) && !state.uploads.forgotten.contains(id)
    };
    if known {
        return None;
    }
    Some(finish(
        shared,
        recorded.clone(),
        400,
        graph_error_body(131053).to_string(),
    ))
}

/// The fields of a `multipart/form-data` body: (name, file name, bytes).
fn multipart_fields(body: &[u8], boundary: &str) -> Vec<(String, Option<String>, Vec<u8>)> {
    let delimiter = format!("--{boundary}");
    let mut fields = Vec::new();
    for part in split_bytes(body, delimiter.as_bytes()) {
        let part = part.strip_prefix(b"\r\n").unwrap_or(part);
        let Some(end) = find(part, b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&part[..end]).into_owned();
        let content = &part[end + 4..];
        let content = content.strip_suffix(b"\r\n").unwrap_or(content);
        let param = |key: &str| {
            head.split(';')
                .map(str::trim)
                .find_map(|p| p.strip_prefix(&format!("{key}=\"")))
                .and_then(|v| v.split('"').next())
                .map(str::to_string)
        };
        if let Some(name) = param("name") {
            fields.push((name, param("filename"), content.to_vec()));
        }
    }
    fields
}

fn split_bytes<'a>(body: &'a [u8], delimiter: &[u8]) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    let mut rest = body;
    while let Some(at) = find(rest, delimiter) {
        parts.push(&rest[..at]);
        rest = &rest[at + delimiter.len()..];
    }
    parts.push(rest);
    parts
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
