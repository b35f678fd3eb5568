//! The web console over plain HTTP on the real server (port 0, SQLite file, the shipped
//! flows, a `cloud_api` channel at the fake Graph API and a sandbox channel): sign-in,
//! the session cookie's flags, sign-out, CSRF refusals, the console off without a token,
//! every page rendering with its key content, an agent reply previewed and queued outside
//! the window, the sandbox chat, a campaign created from the form, live updates as
//! server-sent events. The browser tests (`console_browser`) drive the same fixture.

use std::sync::Arc;

use flowgate::app;
use flowgate::clock::SystemClock;
use serde_json::{Value, json};

use crate::support::fake_graph::{FakeAuth, FakeGraph};
use crate::support::{self, Running};

pub(crate) const TOKEN: &str = "console-admin-token";
pub(crate) const PHONE: &str = "110000000000077";
const ACCESS: &str = "console-access-token";
const SECRET: &str = "console-app-secret";

/// The server with the console, the fake Graph API behind its `main` channel.
pub(crate) struct Fixture {
    pub server: Running,
    pub fake: FakeGraph,
    _dir: tempfile::TempDir,
}

impl Fixture {
    pub(crate) async fn start() -> Self {
        Self::start_with(true).await
    }

    /// `with_token: false`: no `admin.token` (the console is off).
    pub(crate) async fn start_with(with_token: bool) -> Self {
        let fake = FakeGraph::start(FakeAuth::cloud_api(PHONE, ACCESS)).await;
        let dir = tempfile::tempdir().unwrap();
        let admin = if with_token {
            format!("admin:\n  token: {TOKEN}\n")
        } else {
            String::new()
        };
        let extra = format!(
            "database: sqlite://{db}\n{admin}channels:\n  - name: main\n    provider: cloud_api\n    \
             phone_number_id: \"{PHONE}\"\n    access_token: {ACCESS}\n    app_secret: {SECRET}\n    \
             verify_token: console-verify\n    api_base: {base}\n  - name: sandbox\n    provider: sandbox\n",
            db = dir.path().join("flowgate.db").display(),
            base = fake.cloud_api_base(),
        );
        let config = support::shipped_project(dir.path(), &extra);
        let loaded = app::load(Some(&config)).unwrap_or_else(|d| panic!("{}", d.render(false)));
        let db = loaded.config.database.clone();
        let server = Running::start(&loaded, &db, Arc::new(SystemClock)).await;
        Self {
            server,
            fake,
            _dir: dir,
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base)
    }

    /// A customer's text message through the signed webhook, written `ago_hours` hours ago.
    pub(crate) async fn customer_writes(
        &self,
        wa_id: &str,
        name: &str,
        text: &str,
        ago_hours: i64,
    ) {
        let timestamp = (chrono::Utc::now() - chrono::Duration::hours(ago_hours))
            .timestamp()
            .to_string();
        let id = format!("wamid.console.{wa_id}.{timestamp}.{}", text.len());
        let body = support::envelope(
            PHONE,
            json!({
                "contacts": [{"profile": {"name": name}, "wa_id": wa_id}],
                "messages": [{"from": wa_id, "id": id, "timestamp": timestamp,
                              "type": "text", "text": {"body": text}}],
            }),
        );
        let response = self
            .server
            .client
            .post(self.url("/webhook/main"))
            .header("content-type", "application/json")
            .header("X-Hub-Signature-256", support::sign(SECRET, &body))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "the signed webhook is taken");
        let api = format!("/api/conversations/{wa_id}?channel=main");
        support::eventually("the webhook's message is processed", || async {
            let (status, v) = self.api_get(&api).await;
            status == 200
                && v["messages"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|m| m["direction"] == "in"))
        })
        .await;
    }

    pub(crate) async fn api_get(&self, path: &str) -> (u16, Value) {
        let response = self
            .server
            .client
            .get(self.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Imports Ada, Bo and Cy tagged `vip` and Di tagged `other` on `main`.
    pub(crate) async fn import_contacts(&self) {
        let csv = "wa_id,name,tags\n4915100000001,Ada,vip\n4915100000002,Bo,vip\n\
                   4915100000003,Cy,vip\n4915100000004,Di,other\n";
        let response = self
            .server
            .client
            .post(self.url("/api/contacts/import"))
            .bearer_auth(TOKEN)
            .header("content-type", "text/csv")
            .body(csv)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
}

/// A client of the console: no redirects followed, the session cookie kept by hand.
pub(crate) struct Agent {
    client: reqwest::Client,
    base: String,
    cookie: Option<String>,
}

pub(crate) struct Answer {
    pub status: u16,
    pub location: Option<String>,
    pub set_cookie: Vec<String>,
    pub body: String,
}

impl Agent {
    pub(crate) fn new(fixture: &Fixture) -> Self {
        Self {
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(std::time::Duration::from_secs(20))
                .build()
                .unwrap(),
            base: fixture.server.base.clone(),
            cookie: None,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let request = match &self.cookie {
            Some(cookie) => request.header("cookie", format!("flowgate_session={cookie}")),
            None => request,
        };
        let response = request.send().await.unwrap();
        let header = |name: &str| {
            response
                .headers()
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        let location = header("location").pop();
        let set_cookie = header("set-cookie");
        Answer {
            status: response.status().as_u16(),
            location,
            set_cookie,
            body: response.text().await.unwrap(),
        }
    }

    pub(crate) async fn get(&self, path: &str) -> Answer {
        self.send(self.client.get(format!("{}{path}", self.base)))
            .await
    }

    pub(crate) async fn post(&self, path: &str, form: &[(&str, &str)]) -> Answer {
        self.send(self.client.post(format!("{}{path}", self.base)).form(form))
            .await
    }

    /// Signs in with `token`; keeps the cookie when it worked.
    pub(crate) async fn sign_in(&mut self, token: &str) -> Answer {
        let answer = self.post("/sign-in", &[("token", token)]).await;
        if let Some(cookie) = answer
            .set_cookie
            .iter()
            .find_map(|c| c.strip_prefix("flowgate_session="))
        {
            self.cookie = Some(cookie.split(';').next().unwrap().to_string());
        }
        answer
    }

    /// The CSRF token in a page's forms.
    pub(crate) async fn csrf(&self, path: &str) -> String {
        let page = self.get(path).await;
        assert_eq!(page.status, 200, "{}", page.body);
        csrf_in(&page.body).expect("the page has a form with its CSRF token")
    }
}

pub(crate) fn csrf_in(html: &str) -> Option<String> {
    let at = html.find("name=\"csrf\" value=\"")? + "name=\"csrf\" value=\"".len();
    Some(html[at..].split('"').next()?.to_string())
}

#[tokio::test]
async fn sign_in_gives_a_strict_http_only_cookie_and_sign_out_ends_it() {
    let fixture = Fixture::start().await;
    let mut agent = Agent::new(&fixture);

    let anonymous = agent.get("/conversations").await;
    assert_eq!(anonymous.status, 303);
    assert_eq!(anonymous.location.as_deref(), Some("/sign-in"));
    let form = agent.get("/sign-in").await;
    assert_eq!(form.status, 200);
    assert!(form.body.contains("Admin token"), "{}", form.body);

    let wrong = agent.sign_in("not-the-token").await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.body.contains("That token is wrong"), "{}", wrong.body);
    assert!(wrong.set_cookie.is_empty(), "no cookie for a wrong token");
    assert!(agent.cookie.is_none());
    assert_eq!(agent.get("/conversations").await.status, 303);

    let right = agent.sign_in(TOKEN).await;
    assert_eq!(right.status, 303, "{}", right.body);
    let cookie = right.set_cookie.join("\n");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(flag), "{flag} in {cookie}");
    }
    assert!(
        !cookie.contains(TOKEN),
        "the cookie never carries the token"
    );
    let page = agent.get("/conversations").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("<main"), "{}", page.body);

    // The console's cookie is not a key to the API.
    let api = agent.get("/api/conversations").await;
    assert_eq!(api.status, 401);

    let csrf = agent.csrf("/conversations").await;
    let out = agent.post("/sign-out", &[("csrf", &csrf)]).await;
    assert_eq!(out.status, 303);
    assert!(out.set_cookie.join("").contains("Max-Age=0"));
    // The old cookie, replayed, is refused.
    let replayed = agent.get("/conversations").await;
    assert_eq!(replayed.status, 303, "a signed-out session is refused");
    fixture.server.shutdown().await;
}

#[tokio::test]
async fn a_form_without_its_csrf_token_is_refused() {
    let fixture = Fixture::start().await;
    fixture.customer_writes("15550009001", "Eve", "hi", 0).await;
    let mut agent = Agent::new(&fixture);
    agent.sign_in(TOKEN).await;
    let mut other = Agent::new(&fixture);
    other.sign_in(TOKEN).await;
    let foreign = other.csrf("/conversations").await;
    let count = || async {
        let (_, v) = fixture
            .api_get("/api/conversations/15550009001?channel=main")
            .await;
        v["messages"].as_array().map_or(0, Vec::len)
    };
    let before = count().await;

    let path = "/conversations/15550009001/reply";
    let none = agent
        .post(path, &[("text", "no token"), ("action", "send")])
        .await;
    assert_eq!(none.status, 403, "{}", none.body);
    assert!(none.body.contains("security token"), "{}", none.body);
    let wrong = agent
        .post(
            path,
            &[("text", "x"), ("action", "send"), ("csrf", &foreign)],
        )
        .await;
    assert_eq!(wrong.status, 403, "another session's token is refused");
    assert_eq!(count().await, before, "nothing was sent");

    let csrf = agent.csrf("/conversations/15550009001").await;
    let sent = agent
        .post(
            path,
            &[
                ("text", "Hello from an agent"),
                ("action", "send"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(sent.status, 303, "{}", sent.body);
    assert_eq!(count().await, before + 1);
    fixture.server.shutdown().await;
}

#[tokio::test]
async fn the_console_is_off_without_an_admin_token() {
    let fixture = Fixture::start_with(false).await;
    let agent = Agent::new(&fixture);
    for path in ["/sign-in", "/conversations", "/"] {
        let page = agent.get(path).await;
        assert_eq!(page.status, 503, "{path}");
        assert!(page.body.contains("admin.token"), "{}", page.body);
    }
    let post = agent.post("/sign-in", &[("token", "")]).await;
    assert_eq!(post.status, 503);
    fixture.server.shutdown().await;
}

#[tokio::test]
async fn an_agent_reply_outside_the_window_is_previewed_then_queued() {
    let fixture = Fixture::start().await;
    // Wrote two days ago: the window is closed.
    fixture
        .customer_writes("15550009002", "Olaf", "hi", 48)
        .await;
    let mut agent = Agent::new(&fixture);
    agent.sign_in(TOKEN).await;
    let page = agent.get("/conversations/15550009002").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("closed"), "{}", page.body);

    let queued = || async {
        let (_, queue) = fixture.api_get("/api/queue").await;
        queue["messages"].as_array().unwrap().len()
    };
    // The bot's own greeting is queued already (the window is closed).
    let before = queued().await;
    let preview = agent
        .get("/conversations/15550009002/preview?text=Are%20you%20there%3F")
        .await;
    assert_eq!(preview.status, 200);
    assert!(preview.body.contains("queued"), "{}", preview.body);
    assert!(
        preview.body.contains("If you send it now"),
        "{}",
        preview.body
    );
    assert_eq!(queued().await, before, "the preview sent nothing");

    let csrf = agent.csrf("/conversations/15550009002").await;
    let sent = agent
        .post(
            "/conversations/15550009002/reply",
            &[
                ("text", "Are you there?"),
                ("action", "send"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(sent.status, 303);
    let after = agent.get(sent.location.as_deref().unwrap()).await;
    assert!(after.body.contains("id=\"sent-result\""), "{}", after.body);
    assert!(
        after.body.contains("<strong>queued</strong>"),
        "{}",
        after.body
    );
    assert_eq!(queued().await, before + 1);
    let queue = agent.get("/queue").await;
    assert!(queue.body.contains("Are you there?"), "{}", queue.body);
    assert!(queue.body.contains("15550009002"), "{}", queue.body);

    // An open window: sent.
    fixture.customer_writes("15550009003", "Pia", "hi", 0).await;
    let preview = agent
        .get("/conversations/15550009003/preview?text=Hello")
        .await;
    assert!(
        preview.body.contains("<strong>send</strong>"),
        "{}",
        preview.body
    );
    // An empty reply is refused with the API's reason.
    let empty = agent
        .get("/conversations/15550009003/preview?text=%20")
        .await;
    assert_eq!(empty.status, 422);
    fixture.server.shutdown().await;
}

#[tokio::test]
async fn the_sandbox_chat_answers_with_the_flows() {
    let fixture = Fixture::start().await;
    let mut agent = Agent::new(&fixture);
    agent.sign_in(TOKEN).await;
    let csrf = agent.csrf("/sandbox").await;
    let sent = agent
        .post(
            "/sandbox/chat",
            &[("from", "15550001234"), ("text", "hi"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(sent.status, 303, "{}", sent.body);
    let chat = agent.get(sent.location.as_deref().unwrap()).await;
    assert!(chat.body.contains("How can we help"), "{}", chat.body);
    assert!(chat.body.contains("decision-send"), "{}", chat.body);
    assert!(
        chat.body.contains("My order"),
        "the bot's buttons: {}",
        chat.body
    );
    let bad = agent
        .post(
            "/sandbox/chat",
            &[("from", "abc"), ("text", "hi"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(bad.status, 400);
    fixture.server.shutdown().await;
}

#[tokio::test]
async fn a_campaign_from_the_form_previews_saves_and_refuses_mistakes() {
    let fixture = Fixture::start().await;
    fixture.import_contacts().await;
    let mut agent = Agent::new(&fixture);
    agent.sign_in(TOKEN).await;
    let form = agent.get("/campaigns/new").await;
    assert!(form.body.contains("spring_sale"), "{}", form.body);

    let preview = agent
        .get(
            "/campaigns/preview?name=x&category=marketing&template=spring_sale%7Cen_US\
             &param1=%7B%7Bcontact.name%7D%7D&tags=vip&when=cron&cron=0+10+*+*+MON\
             &timezone=Europe%2FBerlin",
        )
        .await;
    assert_eq!(preview.status, 200);
    assert!(
        preview.body.contains("<strong>3</strong> contacts"),
        "{}",
        preview.body
    );
    assert_eq!(preview.body.matches("<li>").count(), 5, "{}", preview.body);
    assert!(preview.body.contains("Mon"), "{}", preview.body);
    assert!(
        preview.body.contains("CET") || preview.body.contains("CEST"),
        "{}",
        preview.body
    );

    let csrf = agent.csrf("/campaigns/new").await;
    let fields = |name: &'static str, template: &'static str| {
        vec![
            ("csrf", csrf.clone()),
            ("name", name.to_string()),
            ("category", "marketing".into()),
            ("template", template.into()),
            ("param1", "{{contact.name}}".into()),
            ("tags", "vip".into()),
            ("when", "cron".into()),
            ("cron", "0 10 * * MON".into()),
            ("timezone", "Europe/Berlin".into()),
        ]
    };
    let post = |fields: Vec<(&'static str, String)>| {
        let agent = &agent;
        async move {
            let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
            agent.post("/campaigns", &pairs).await
        }
    };
    let refused = post(fields("broken", "nope|en_US")).await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert!(refused.body.contains("nope"), "{}", refused.body);
    let (_, none) = fixture.api_get("/api/campaigns/broken").await;
    assert_eq!(none["error"]["code"], "unknown_campaign", "nothing saved");

    let created = post(fields("form_sale", "spring_sale|en_US")).await;
    assert_eq!(created.status, 303, "{}", created.body);
    assert_eq!(created.location.as_deref(), Some("/campaigns/form_sale"));
    let (_, saved) = fixture.api_get("/api/campaigns/form_sale").await;
    assert_eq!(saved["origin"], "api");
    assert_eq!(saved["definition"]["audience"]["tags"], json!(["vip"]));
    assert_eq!(saved["definition"]["timezone"], "Europe/Berlin");

    let page = agent.get("/campaigns/form_sale").await;
    assert!(page.body.contains("Run now"), "{}", page.body);
    let csrf = csrf_in(&page.body).unwrap();
    let paused = agent
        .post("/campaigns/form_sale/pause", &[("csrf", &csrf)])
        .await;
    assert_eq!(paused.status, 303);
    let (_, saved) = fixture.api_get("/api/campaigns/form_sale").await;
    assert_eq!(saved["paused"], true);
    let resumed = agent
        .post("/campaigns/form_sale/resume", &[("csrf", &csrf)])
        .await;
    assert_eq!(resumed.status, 303);

    let run = agent
        .post("/campaigns/form_sale/run-now", &[("csrf", &csrf)])
        .await;
    assert_eq!(run.status, 303, "{}", run.body);
    let run_path = run.location.unwrap();
    fixture
        .fake
        .wait_for_sends(3, std::time::Duration::from_secs(60))
        .await;
    support::eventually("the report counts the three sends", || async {
        let page = agent.get(&run_path).await;
        page.body.contains("data-label=\"sent\" data-value=\"3\"")
    })
    .await;
    fixture.server.shutdown().await;
}

#[tokio::test]
async fn every_page_renders_with_its_content() {
    let fixture = Fixture::start().await;
    fixture.import_contacts().await;
    fixture
        .customer_writes("15550009004", "Quinn", "hi", 0)
        .await;
    let mut agent = Agent::new(&fixture);
    agent.sign_in(TOKEN).await;
    let pages: [(&str, &[&str]); 10] = [
        ("/conversations", &["Quinn", "data-closes", "main_menu"]),
        (
            "/conversations/15550009004",
            &["How can we help", "Reply as an agent", "decision-send"],
        ),
        ("/queue", &["Nothing is waiting"]),
        ("/campaigns", &["New campaign"]),
        (
            "/campaigns/new",
            &["spring_sale", "Time zone", "Europe/Berlin"],
        ),
        ("/contacts", &["Ada", "vip", "Import contacts"]),
        ("/contacts?tag=other", &["Di"]),
        (
            "/templates",
            &["spring_sale", "approved", "Sync from WhatsApp"],
        ),
        (
            "/flows",
            &[
                "flow-graph",
                "main_menu",
                "button orders",
                "→ flow order_status",
            ],
        ),
        ("/sandbox", &["Chat as 15550001234"]),
    ];
    for (path, needles) in pages {
        let page = agent.get(path).await;
        assert_eq!(page.status, 200, "{path}: {}", page.body);
        for needle in needles {
            assert!(
                page.body.contains(needle),
                "{path} shows {needle}: {}",
                page.body
            );
        }
        for landmark in ["<main", "<nav", "lang=\"en\"", "name=\"viewport\""] {
            assert!(page.body.contains(landmark), "{path} has {landmark}");
        }
    }
    let css = agent.get("/console/assets/console.css").await;
    assert!(css.body.contains(":focus-visible"));
    let js = agent.get("/console/assets/console.js").await;
    assert!(js.body.contains("EventSource"));
    let missing = agent.get("/conversations/15559999999").await;
    assert_eq!(missing.status, 404);
    assert!(missing.body.contains("no contact"), "{}", missing.body);

    // The CSV import reports each skipped line.
    let csrf = agent.csrf("/contacts").await;
    let report = agent
        .post(
            "/contacts/import",
            &[
                ("csrf", &csrf),
                ("csv", "wa_id,name\n4915100000009,Gus\nnot-a-number,Hal\n"),
            ],
        )
        .await;
    assert_eq!(report.status, 200, "{}", report.body);
    assert!(
        report.body.contains("id=\"skipped-lines\""),
        "{}",
        report.body
    );
    assert!(
        report.body.contains("<td>3</td>"),
        "line 3 skipped: {}",
        report.body
    );
    let tagged = agent
        .post(
            "/contacts/4915100000009/tags",
            &[("csrf", &csrf), ("tag", "fresh")],
        )
        .await;
    assert_eq!(tagged.status, 303);
    let (_, gus) = fixture
        .api_get("/api/contacts/4915100000009?channel=main")
        .await;
    assert_eq!(gus["tags"], json!(["fresh"]));
    fixture.server.shutdown().await;
}

#[tokio::test]
async fn live_updates_are_server_sent_events() {
    let fixture = Fixture::start().await;
    let mut agent = Agent::new(&fixture);
    agent.sign_in(TOKEN).await;
    let anonymous = Agent::new(&fixture).get("/live/conversations").await;
    assert_eq!(anonymous.status, 303, "the stream needs a session too");

    let cookie = agent.cookie.clone().unwrap();
    let mut stream = fixture
        .server
        .client
        .get(fixture.url("/live/conversations"))
        .header("cookie", format!("flowgate_session={cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        stream.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut seen = String::new();
    let mut next = async || {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(30), stream.chunk())
            .await
            .expect("an event within 30 s")
            .unwrap()
            .expect("the stream stays open");
        String::from_utf8_lossy(&chunk).to_string()
    };
    seen.push_str(&next().await);
    assert!(seen.contains("event: update"), "{seen}");
    assert!(seen.contains("No conversations yet"), "{seen}");
    // A customer writes: the table is sent again, with them.
    fixture
        .customer_writes("15550009005", "Rita", "hi", 0)
        .await;
    while !seen.contains("Rita") {
        seen.push_str(&next().await);
    }
    // An open stream does not hold the server up: it ends when the server stops.
    fixture.server.shutdown().await;
    let end = tokio::time::timeout(std::time::Duration::from_secs(5), stream.chunk()).await;
    assert!(
        matches!(end, Ok(Ok(None)) | Ok(Err(_))),
        "the stream ended with the server: {end:?}"
    );
}

#[tokio::test]
async fn an_agent_ends_a_handoff_from_the_conversation_page() {
    let fixture = Fixture::start().await;
    let mut agent = Agent::new(&fixture);
    agent.sign_in(TOKEN).await;
    let csrf = agent.csrf("/sandbox").await;
    // The sandbox customer asks for a person: hi, "More options", "Talk to a person".
    for (field, value) in [("text", "hi"), ("button", "more"), ("list", "human")] {
        let sent = agent
            .post(
                "/sandbox/chat",
                &[("from", "15550001234"), (field, value), ("csrf", &csrf)],
            )
            .await;
        assert_eq!(sent.status, 303, "{field}={value}: {}", sent.body);
    }
    let chat = agent.get("/sandbox?from=15550001234").await;
    assert!(
        chat.body.contains("Connecting you to a person"),
        "{}",
        chat.body
    );

    let path = "/conversations/15550001234?channel=sandbox";
    let page = agent.get(path).await;
    assert!(page.body.contains("with a person"), "{}", page.body);
    assert!(page.body.contains("End handoff"), "{}", page.body);
    let ended = agent
        .post(
            "/conversations/15550001234/end-handoff?channel=sandbox",
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(ended.status, 303, "{}", ended.body);
    let page = agent.get(ended.location.as_deref().unwrap()).await;
    assert!(page.body.contains("The handoff ended"), "{}", page.body);
    assert!(!page.body.contains("End handoff"), "{}", page.body);
    let again = agent
        .post(
            "/conversations/15550001234/end-handoff?channel=sandbox",
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(again.status, 409, "nothing to end twice");
    fixture.server.shutdown().await;
}
