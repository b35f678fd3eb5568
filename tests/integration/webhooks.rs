//! WhatsApp webhooks end to end: the real server on port 0 with a SQLite file, a `cloud_api`
//! and a `dialog360` channel, signed webhooks in (payloads from `tests/fixtures/whatsapp/`,
//! Meta's documented shapes), and the database checked until the inbound worker is done.
//! Loopback only; every wait polls with a deadline.

use crate::support;

use support::{eventually, sign};

use std::path::PathBuf;
use std::sync::Arc;

use flowgate::app::{self, Application};
use flowgate::clock::SystemClock;
use flowgate::inbound::{drain_once, inbox_row};
use flowgate::store::Db;
use flowgate::whatsapp::parse_webhook;
use serde_json::{Value, json};

const APP_SECRET: &str = "test-app-secret";
const VERIFY_TOKEN: &str = "test-verify-token";
const D360_SECRET: &str = "test-webhook-secret";
const PHONE_NUMBER_ID: &str = "110000000000001";
const WA_ID: &str = "15555550123";
const BSUID: &str = "US.20000000000000000123";
const REPLY: &str = "Hello from flowgate";

const CONFIG: &str = r#"
flows: flows
channels:
  - name: main
    provider: cloud_api
    phone_number_id: "110000000000001"
    access_token: test-access-token
    app_secret: test-app-secret
    verify_token: test-verify-token
    api_base: http://127.0.0.1:9
  - name: d360
    provider: dialog360
    api_key: test-api-key
    webhook_secret: test-webhook-secret
    api_base: http://127.0.0.1:9
"#;

const FLOW: &str = r#"
flow: hello
triggers:
  - keywords: [hi, hello, color]
steps:
  greet:
    say: "Hello from flowgate"
"#;

const SURVEY: &str = r#"
flow: survey
triggers:
  - keywords: [survey]
steps:
  ask_name:
    ask: "Your name?"
    save: name
    next: thanks
  thanks:
    say: "Thanks, {{name}}"
"#;

const BOOKING: &str = r#"
flow: booking
triggers:
  - keywords: [book]
steps:
  ask:
    form:
      flow_id: "1234567890"
      cta: "Book"
      body: "When do you come?"
      fields: { day: text, guests: number }
    save: booking
    next: done
  done:
    say: "Booked {{booking.guests}} on {{booking.day}} ({{booking.note}})"
"#;

/// A webhook fixture whose customer messages were written just now (the server runs on the
/// system clock; the fixtures' 2025 timestamps would leave every window closed).
fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/whatsapp")
        .join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let Ok(mut json) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return bytes;
    };
    let now = support::now_timestamp();
    for entry in json["entry"].as_array_mut().into_iter().flatten() {
        for change in entry["changes"].as_array_mut().into_iter().flatten() {
            for m in change["value"]["messages"]
                .as_array_mut()
                .into_iter()
                .flatten()
            {
                if m.get("timestamp").is_some() {
                    m["timestamp"] = serde_json::Value::String(now.clone());
                }
            }
        }
    }
    serde_json::to_vec(&json).expect("JSON serializes")
}

/// A `messages` webhook for the `main` number with `value` merged in.
fn envelope(value: Value) -> Vec<u8> {
    support::envelope(PHONE_NUMBER_ID, value)
}

fn status_webhook(wamid: &str, status: &str, errors: Option<Value>) -> Vec<u8> {
    let mut s = json!({
        "id": wamid, "status": status, "timestamp": "1760000500", "recipient_id": WA_ID
    });
    if let Some(errors) = errors {
        s["errors"] = errors;
    }
    envelope(json!({"statuses": [s]}))
}

struct Server {
    base: String,
    db: Db,
    client: reqwest::Client,
    running: support::Running,
    database: Option<support::TestDb>,
    _dir: tempfile::TempDir,
}

/// A project in a temp dir: the config above and one flow.
fn project() -> (tempfile::TempDir, app::Loaded, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("flows")).unwrap();
    std::fs::write(dir.path().join("flows/hello.yaml"), FLOW).unwrap();
    std::fs::write(dir.path().join("flows/survey.yaml"), SURVEY).unwrap();
    std::fs::write(dir.path().join("flows/booking.yaml"), BOOKING).unwrap();
    let config = dir.path().join("flowgate.yaml");
    std::fs::write(&config, CONFIG).unwrap();
    let loaded = app::load(Some(&config)).unwrap_or_else(|d| panic!("{d:?}"));
    let db = format!("sqlite://{}", dir.path().join("flowgate.db").display());
    (dir, loaded, db)
}

impl Server {
    async fn start() -> Self {
        Self::start_on(support::Backend::Sqlite)
            .await
            .expect("SQLite is always there")
    }

    /// The server on `backend`; `None` when PostgreSQL is asked for and not configured.
    async fn start_on(backend: support::Backend) -> Option<Self> {
        let (dir, loaded, _) = project();
        let database = support::TestDb::new(dir.path(), backend).await?;
        let running = support::Running::start(&loaded, &database.url, Arc::new(SystemClock)).await;
        let client = running.client.clone();
        Some(Self {
            base: running.base.clone(),
            db: running.db.clone(),
            client,
            running,
            database: Some(database),
            _dir: dir,
        })
    }

    async fn shutdown(self) {
        self.running.shutdown().await;
        if let Some(database) = self.database {
            database.clean_up().await;
        }
    }

    async fn post(&self, path: &str, body: &[u8], headers: &[(&str, &str)]) -> (u16, Value) {
        let mut request = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_vec());
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// A webhook to `main`, signed with the app secret.
    async fn signed(&self, body: &[u8]) -> (u16, Value) {
        let signature = sign(APP_SECRET, body);
        self.post(
            "/webhook/main",
            body,
            &[("X-Hub-Signature-256", signature.as_str())],
        )
        .await
    }

    async fn get(&self, path_and_query: &str) -> (u16, String, String) {
        let response = self
            .client
            .get(format!("{}{path_and_query}", self.base))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        (status, content_type, response.text().await.unwrap())
    }

    async fn count(&self, sql: &str) -> i64 {
        count(&self.db, sql).await
    }

    /// Waits until every stored update is processed (and at least `stored` exist).
    async fn processed(&self, stored: i64) {
        let db = self.db.clone();
        eventually("the inbox is processed", || {
            let db = db.clone();
            async move {
                count(&db, "SELECT COUNT(*) FROM inbox").await >= stored
                    && count(&db, "SELECT COUNT(*) FROM inbox WHERE processed_at IS NULL").await
                        == 0
            }
        })
        .await;
    }
}

async fn count(db: &Db, sql: &str) -> i64 {
    support::count(db, sql).await
}

async fn exec(db: &Db, sql: &str) {
    support::exec(db, sql).await
}

async fn text_of(db: &Db, sql: &str) -> String {
    support::text(db, sql).await
}

/// (direction, text) of a contact's messages, oldest first.
async fn conversation(db: &Db, channel: &str, contact: &str) -> Vec<(String, String)> {
    db.messages(channel, contact, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|m| {
            let text = m.body["content"]["body"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            (m.direction, text)
        })
        .collect()
}

#[tokio::test]
async fn the_handshake_checks_mode_and_token() {
    let server = Server::start().await;
    let ok = "/webhook/main?hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=test-verify-token";
    let (status, content_type, body) = server.get(ok).await;
    assert_eq!((status, body.as_str()), (200, "1158201444"));
    assert!(content_type.starts_with("text/plain"), "{content_type}");

    for bad in [
        "/webhook/main?hub.mode=subscribe&hub.challenge=1&hub.verify_token=wrong",
        "/webhook/main?hub.mode=subscribe&hub.challenge=1&hub.verify_token=test-verify-tokenX",
        "/webhook/main?hub.mode=unsubscribe&hub.challenge=1&hub.verify_token=test-verify-token",
        "/webhook/main?hub.mode=subscribe&hub.challenge=1",
        "/webhook/main?hub.mode=subscribe&hub.verify_token=test-verify-token",
        "/webhook/main",
    ] {
        let (status, _, body) = server.get(bad).await;
        assert_eq!(status, 403, "{bad}: {body}");
        assert!(!body.contains(VERIFY_TOKEN), "{body}");
    }

    let (status, content_type, body) = server
        .get("/webhook/nope?hub.mode=subscribe&hub.challenge=1&hub.verify_token=x")
        .await;
    assert_eq!(status, 404);
    assert!(content_type.starts_with("application/json"));
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "unknown_channel");
    let (status, body) = server.post("/webhook/nope", b"{}", &[]).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &json!("unknown_channel"))
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_signed_message_is_stored_answered_and_processed_once() {
    signed_message_round_trip(Server::start().await).await;
}

/// The same round trip on PostgreSQL (skipped without `FLOWGATE_TEST_POSTGRES_URL`).
#[tokio::test]
async fn a_signed_message_is_stored_answered_and_processed_once_on_postgres() {
    if let Some(server) = Server::start_on(support::Backend::Postgres).await {
        signed_message_round_trip(server).await;
    }
}

async fn signed_message_round_trip(server: Server) {
    let body = fixture("inbound_text.json");
    let (status, ack) = server.signed(&body).await;
    assert_eq!(status, 200, "{ack}");
    assert_eq!(ack, json!({"stored": 1, "duplicates": 0}));
    server.processed(1).await;
    assert_eq!(
        conversation(&server.db, "main", WA_ID).await,
        [
            ("in".to_string(), "Hi, is my order shipped?".to_string()),
            ("out".to_string(), REPLY.to_string())
        ]
    );
    let out = server
        .db
        .messages("main", WA_ID, 10)
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(out.decision.as_deref(), Some("send"));
    // The profile name came along.
    let contact = server.db.load_conversation("main", WA_ID).await.unwrap();
    assert_eq!(contact.contact.name.as_deref(), Some("Ana Example"));

    // Meta delivers at least once: the same webhook again, and the same message in a
    // differently serialized body, are acknowledged and not processed again.
    let (status, ack) = server.signed(&body).await;
    assert_eq!((status, ack), (200, json!({"stored": 0, "duplicates": 1})));
    let reencoded =
        serde_json::to_vec_pretty(&serde_json::from_slice::<Value>(&body).unwrap()).unwrap();
    let (status, ack) = server.signed(&reencoded).await;
    assert_eq!((status, ack), (200, json!({"stored": 0, "duplicates": 1})));
    server.processed(1).await;
    assert_eq!(server.count("SELECT COUNT(*) FROM inbox").await, 1);
    assert_eq!(conversation(&server.db, "main", WA_ID).await.len(), 2);

    let metrics = flowgate::metrics::render(&[]);
    assert!(
        metrics.contains("flowgate_webhook_updates_total{type=\"message\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("flowgate_webhook_ack_seconds_count"));
    server.shutdown().await;
}

#[tokio::test]
async fn unauthenticated_or_malformed_webhooks_store_nothing() {
    let server = Server::start().await;
    let body = fixture("inbound_text.json");
    let wrong = sign("another-secret", &body);
    let other_body = sign(APP_SECRET, b"{}");
    for (what, headers) in [
        (
            "wrong secret",
            vec![("X-Hub-Signature-256", wrong.as_str())],
        ),
        (
            "signature of another body",
            vec![("X-Hub-Signature-256", other_body.as_str())],
        ),
        ("missing", vec![]),
        ("malformed", vec![("X-Hub-Signature-256", "sha1=abc")]),
        (
            "360dialog's header on a cloud_api channel",
            vec![("X-Flowgate-Secret", APP_SECRET)],
        ),
    ] {
        let (status, answer) = server.post("/webhook/main", &body, &headers).await;
        assert_eq!(status, 401, "{what}: {answer}");
        assert_eq!(answer["error"]["code"], "invalid_signature", "{what}");
        assert!(!answer.to_string().contains(APP_SECRET));
    }
    // A body changed after signing.
    let signature = sign(APP_SECRET, &body);
    let tampered = String::from_utf8(body.clone())
        .unwrap()
        .replace("shipped", "shopped")
        .into_bytes();
    assert_ne!(tampered, body);
    let (status, _) = server
        .post(
            "/webhook/main",
            &tampered,
            &[("X-Hub-Signature-256", signature.as_str())],
        )
        .await;
    assert_eq!(status, 401);

    // Signed, but not a WhatsApp webhook.
    for bad in [
        &b"{\"object\": \"whatsapp_business_account\", \"entry\": [ "[..],
        b"not json",
        b"[1, 2]",
        b"{\"object\": \"page\", \"entry\": []}",
        b"{\"object\": \"whatsapp_business_account\"}",
    ] {
        let (status, answer) = server.signed(bad).await;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["error"]["code"], "invalid_webhook");
        assert!(answer["error"]["message"].as_str().unwrap().len() > 10);
    }

    // Larger than 4 MB.
    let huge = vec![b' '; 4 * 1024 * 1024 + 1];
    let signature = sign(APP_SECRET, &huge);
    let (status, answer) = server
        .post(
            "/webhook/main",
            &huge,
            &[("X-Hub-Signature-256", signature.as_str())],
        )
        .await;
    assert_eq!(status, 413, "{answer}");

    assert_eq!(server.count("SELECT COUNT(*) FROM inbox").await, 0);
    assert_eq!(server.count("SELECT COUNT(*) FROM messages").await, 0);

    // A body of 3 MB (Meta's maximum) goes through.
    let padding = "x".repeat(3 * 1024 * 1024);
    let big = envelope(json!({"padding": padding, "messages": [{
        "from": WA_ID, "id": "wamid.big", "timestamp": support::now_timestamp(),
        "type": "text", "text": {"body": "hello"}
    }]}));
    let (status, answer) = server.signed(&big).await;
    assert_eq!(status, 200, "{answer}");
    server.processed(1).await;
    assert_eq!(conversation(&server.db, "main", WA_ID).await.len(), 2);
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_fields_are_stored_and_skipped() {
    let server = Server::start().await;
    let body = serde_json::to_vec(&json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": "100000000000001", "time": 1760000000, "changes": [
            {"field": "account_update", "value": {"event": "VERIFIED_ACCOUNT", "phone_number": "15550001111"}},
            {"field": "messages", "value": {"messaging_product": "whatsapp",
                "metadata": {"phone_number_id": PHONE_NUMBER_ID}, "something_new": [1]}},
            {"field": "messages", "value": {"messaging_product": "whatsapp",
                "metadata": {"phone_number_id": PHONE_NUMBER_ID},
                "messages": [{"from": WA_ID, "id": "wamid.weird", "timestamp": support::now_timestamp(), "type": "text"}]}}
        ]}]
    }))
    .unwrap();
    let (status, ack) = server.signed(&body).await;
    assert_eq!((status, ack), (200, json!({"stored": 3, "duplicates": 0})));
    server.processed(3).await;
    assert_eq!(
        server
            .count("SELECT COUNT(*) FROM inbox WHERE kind IN ('unknown', 'malformed') AND processed_at IS NOT NULL AND last_error IS NULL")
            .await,
        3
    );
    assert_eq!(server.count("SELECT COUNT(*) FROM messages").await, 0);

    // Every webhook fixture is accepted and processed, whatever it holds.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/whatsapp");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    let mut webhooks = 0;
    for name in names {
        let body = fixture(&name);
        let json: Value = serde_json::from_slice(&body).unwrap();
        if json.get("object").is_none() {
            continue;
        }
        webhooks += 1;
        let (status, ack) = server.signed(&body).await;
        assert_eq!(status, 200, "{name}: {ack}");
    }
    assert!(webhooks >= 15, "{webhooks}");
    // Statuses of messages flowgate never sent wait for them (their send may not be recorded
    // yet); everything else is done.
    let db = server.db.clone();
    eventually("every fixture is processed", || {
        let db = db.clone();
        async move {
            count(
                &db,
                "SELECT COUNT(*) FROM inbox WHERE processed_at IS NULL \
                 AND NOT (kind = 'status' AND attempts >= 1)",
            )
            .await
                == 0
        }
    })
    .await;
    // The status fixtures share one wamid: sent, delivered, read and failed, once each
    // (three failed fixtures and two sent ones are duplicates by wamid + status).
    assert_eq!(
        server
            .count("SELECT COUNT(*) FROM inbox WHERE kind = 'status'")
            .await,
        4
    );
    assert_eq!(
        server
            .count("SELECT COUNT(*) FROM inbox WHERE processed_at IS NOT NULL AND kind IN ('system', 'error', 'template_status', 'user_preference')")
            .await,
        server
            .count("SELECT COUNT(*) FROM inbox WHERE kind IN ('system', 'error', 'template_status', 'user_preference')")
            .await
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_thousand_customers_in_one_webhook_are_each_answered_once() {
    thousand_customers(Server::start().await).await;
}

/// The same on PostgreSQL (skipped without `FLOWGATE_TEST_POSTGRES_URL`).
#[tokio::test]
async fn a_thousand_customers_in_one_webhook_are_each_answered_once_on_postgres() {
    if let Some(server) = Server::start_on(support::Backend::Postgres).await {
        thousand_customers(server).await;
    }
}

async fn thousand_customers(server: Server) {
    let n = 1000;
    let wa = |i: usize| format!("1555{i:07}");
    let contacts: Vec<Value> = (0..n)
        .map(|i| json!({"profile": {"name": format!("Customer {i}")}, "wa_id": wa(i)}))
        .collect();
    let messages: Vec<Value> = (0..n)
        .map(|i| {
            json!({"from": wa(i), "id": format!("wamid.batch.{i}"), "timestamp": support::now_timestamp(),
                   "type": "text", "text": {"body": "hi"}})
        })
        .collect();
    let body = envelope(json!({"contacts": contacts, "messages": messages}));
    let (status, ack) = server.signed(&body).await;
    assert_eq!((status, ack), (200, json!({"stored": n, "duplicates": 0})));
    server.processed(n as i64).await;
    assert_eq!(
        server
            .count("SELECT COUNT(*) FROM messages WHERE direction = 'in'")
            .await,
        n as i64
    );
    assert_eq!(
        server
            .count("SELECT COUNT(*) FROM messages WHERE direction = 'out'")
            .await,
        n as i64
    );
    assert_eq!(
        server
            .count("SELECT COUNT(DISTINCT contact_id) FROM messages WHERE direction = 'out'")
            .await,
        n as i64
    );
    assert_eq!(
        conversation(&server.db, "main", &wa(n - 1)).await,
        [
            ("in".to_string(), "hi".to_string()),
            ("out".to_string(), REPLY.to_string())
        ]
    );
    // Replayed whole: all duplicates, nothing runs again.
    let (status, ack) = server.signed(&body).await;
    assert_eq!((status, ack), (200, json!({"stored": 0, "duplicates": n})));
    assert_eq!(
        server
            .count("SELECT COUNT(*) FROM messages WHERE direction = 'out'")
            .await,
        n as i64
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_customer_known_only_by_bsuid_is_answered() {
    let server = Server::start().await;
    let (status, ack) = server
        .signed(&fixture("inbound_text_username_only.json"))
        .await;
    assert_eq!((status, ack), (200, json!({"stored": 1, "duplicates": 0})));
    server.processed(1).await;
    assert_eq!(
        conversation(&server.db, "main", BSUID).await,
        [
            (
                "in".to_string(),
                "Does it come in another color?".to_string()
            ),
            ("out".to_string(), REPLY.to_string())
        ]
    );
    assert_eq!(
        server
            .count("SELECT COUNT(*) FROM inbox WHERE contact_key = 'US.20000000000000000123'")
            .await,
        1
    );
    server.shutdown().await;
}

/// A text from a customer who shows `phone`, `bsuid` or both, as Meta sends it (the
/// identifiers in `from`/`from_user_id` and in one `contacts[]` entry).
fn text_from(phone: Option<&str>, bsuid: Option<&str>, wamid: &str, body: &str) -> Vec<u8> {
    let mut contact = json!({"profile": {"name": "Ana"}});
    let mut message = json!({
        "id": wamid, "timestamp": support::now_timestamp(), "type": "text",
        "text": {"body": body}
    });
    if let Some(phone) = phone {
        contact["wa_id"] = json!(phone);
        message["from"] = json!(phone);
    }
    if let Some(bsuid) = bsuid {
        contact["user_id"] = json!(bsuid);
        message["from_user_id"] = json!(bsuid);
    }
    envelope(json!({"contacts": [contact], "messages": [message]}))
}

/// A WhatsApp Flow's answer (`interactive.nfm_reply`) as the webhook carries it:
/// `response_json` is a JSON object in a string.
fn form_reply(wamid: &str, response: Value) -> Vec<u8> {
    let message = json!({
        "context": {"from": "15550001111", "id": "wamid.form"},
        "from": WA_ID, "id": wamid, "timestamp": support::now_timestamp(),
        "type": "interactive",
        "interactive": {"type": "nfm_reply", "nfm_reply": {
            "name": "flow", "body": "Sent", "response_json": response.to_string()
        }}
    });
    envelope(json!({
        "contacts": [{"profile": {"name": "Ana"}, "wa_id": WA_ID}],
        "messages": [message]
    }))
}

#[tokio::test]
async fn a_form_answer_fills_the_flows_variables_and_a_wrong_one_is_refused() {
    let server = Server::start().await;
    server
        .signed(&text_from(Some(WA_ID), None, "wamid.book.1", "book"))
        .await;
    server.processed(1).await;
    let sent = server.db.messages("main", WA_ID, 10).await.unwrap();
    let form = &sent.last().unwrap().body["content"];
    assert_eq!(form["type"], "form", "{form}");
    assert_eq!(form["token"], "flowgate:booking:ask");

    // An answer to another form (another token) is not this step's: unanswered.
    let other = json!({"flow_token": "flowgate:other:step", "day": "x", "guests": 1});
    server.signed(&form_reply("wamid.form.0", other)).await;
    server.processed(2).await;
    assert_eq!(conversation(&server.db, "main", WA_ID).await.len(), 3);

    let answer = json!({
        "flow_token": "flowgate:booking:ask", "day": "2026-12-24", "guests": 2, "note": "window seat"
    });
    server.signed(&form_reply("wamid.form.1", answer)).await;
    server.processed(3).await;
    let (_, reply) = conversation(&server.db, "main", WA_ID).await.pop().unwrap();
    assert_eq!(reply, "Booked 2 on 2026-12-24 (window seat)");

    // Again, with `guests` as text: the step fails with the reason, and the apology goes.
    server
        .signed(&text_from(Some(WA_ID), None, "wamid.book.2", "book"))
        .await;
    server.processed(4).await;
    let wrong = json!({"flow_token": "flowgate:booking:ask", "day": "2026-12-24", "guests": "two"});
    server.signed(&form_reply("wamid.form.2", wrong)).await;
    server.processed(5).await;
    let (_, reply) = conversation(&server.db, "main", WA_ID).await.pop().unwrap();
    assert_eq!(reply, flowgate::engine::APOLOGY);
    let session = server.db.load_conversation("main", WA_ID).await.unwrap();
    assert!(
        session.session.is_none(),
        "the failed step ends the session"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_customer_is_one_contact_whatever_identifiers_webhooks_use() {
    const NEW_PHONE: &str = "15555550999";
    const NEW_BSUID: &str = "US.20000000000000000456";
    let server = Server::start().await;
    // Since August 2026 a number change names the new phone and the new BSUID (a number
    // change regenerates it), and the previous BSUID.
    let number_changed = envelope(json!({"messages": [{
        "from": WA_ID, "id": "wamid.identity.system", "timestamp": support::now_timestamp(),
        "type": "system",
        "system": {
            "body": format!("User Ana changed from {WA_ID} to {NEW_PHONE}"),
            "type": "user_changed_number", "wa_id": NEW_PHONE,
            "user_id": NEW_BSUID, "previous_user_id": BSUID
        }
    }]}));
    let webhooks = [
        text_from(Some(WA_ID), Some(BSUID), "wamid.identity.1", "survey"),
        // The customer took a username: the BSUID alone, answering the question.
        fixture("inbound_text_username_only.json"),
        number_changed,
        text_from(None, Some(NEW_BSUID), "wamid.identity.2", "hi"),
        // A late redelivery from before the change finds them, and changes nothing.
        text_from(Some(WA_ID), Some(BSUID), "wamid.identity.3", "hello"),
        text_from(
            Some(NEW_PHONE),
            Some(NEW_BSUID),
            "wamid.identity.4",
            "color",
        ),
    ];
    for (n, webhook) in webhooks.iter().enumerate() {
        let (status, _) = server.signed(webhook).await;
        assert_eq!(status, 200);
        server.processed(n as i64 + 1).await;
    }
    assert_eq!(server.count("SELECT COUNT(*) FROM contacts").await, 1);
    assert_eq!(
        text_of(&server.db, "SELECT wa_id FROM contacts").await,
        NEW_PHONE,
        "replies go to the new number"
    );
    assert_eq!(
        text_of(
            &server.db,
            "SELECT group_concat(identifier, ' ') FROM \
                (SELECT identifier FROM contact_aliases ORDER BY identifier)"
        )
        .await,
        format!("{BSUID} {NEW_BSUID}")
    );
    let said = |direction: &str, text: &str| (direction.to_string(), text.to_string());
    assert_eq!(
        conversation(&server.db, "main", NEW_PHONE).await,
        [
            said("in", "survey"),
            said("out", "Your name?"),
            said("in", "Does it come in another color?"),
            said("out", "Thanks, Does it come in another color?"),
            said("in", "hi"),
            said("out", REPLY),
            said("in", "hello"),
            said("out", REPLY),
            said("in", "color"),
            said("out", REPLY),
        ],
        "one conversation, in order, under the contact's current number"
    );
    // The API finds them by any of their identifiers, old BSUIDs too.
    for identifier in [NEW_PHONE, NEW_BSUID, BSUID] {
        let (status, _, body) = server
            .get(&format!("/api/conversations/{identifier}?channel=main"))
            .await;
        assert_eq!(status, 200, "{identifier}: {body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["contact"]["wa_id"], NEW_PHONE, "{identifier}");
        assert_eq!(
            body["messages"].as_array().unwrap().len(),
            10,
            "{identifier}"
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_number_change_that_hides_the_new_number_keys_the_contact_by_bsuid() {
    const NEW_BSUID: &str = "US.20000000000000000456";
    let server = Server::start().await;
    let webhooks = [
        text_from(Some(WA_ID), Some(BSUID), "wamid.hidden.1", "hi"),
        // `user_changed_user_id`: a new number that is not shared, only the new BSUID.
        fixture("inbound_system_user_changed_user_id.json"),
        text_from(None, Some(NEW_BSUID), "wamid.hidden.2", "hello"),
    ];
    for (n, webhook) in webhooks.iter().enumerate() {
        assert_eq!(server.signed(webhook).await.0, 200);
        server.processed(n as i64 + 1).await;
    }
    assert_eq!(server.count("SELECT COUNT(*) FROM contacts").await, 1);
    assert_eq!(
        text_of(&server.db, "SELECT wa_id FROM contacts").await,
        NEW_BSUID,
        "replies go to the new BSUID, not to the number the customer left"
    );
    assert_eq!(conversation(&server.db, "main", NEW_BSUID).await.len(), 4);
    server.shutdown().await;
}

#[tokio::test]
async fn statuses_in_any_order_end_in_the_right_status() {
    let server = Server::start().await;
    // A customer writes; four messages to them are then inserted as the sender leaves them
    // (so the running sender, which takes only `pending` rows and expired leases, leaves
    // them alone): three sent with a wamid, one still being sent under a lease.
    let body = envelope(json!({"messages": [{
        "from": WA_ID, "id": "wamid.in.0", "timestamp": support::now_timestamp(),
        "type": "text", "text": {"body": "hello"}
    }]}));
    assert_eq!(server.signed(&body).await.0, 200);
    server.processed(1).await;
    let pool = server.db.sqlite_pool().expect("tests use SQLite");
    let contact: i64 =
        sqlx::query_scalar("SELECT id FROM contacts WHERE channel = 'main' AND wa_id = $1")
            .bind(WA_ID)
            .fetch_one(pool)
            .await
            .unwrap();
    let mut ids = Vec::new();
    for i in 0..4 {
        let (wamid, status, lease) = if i < 3 {
            (Some(format!("wamid.out.{i}")), "sent", None)
        } else {
            (None, "sending", Some(i64::MAX))
        };
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO messages (contact_id, channel, direction, wamid, kind, body, decision, \
             status, created_at, lease_until, lease_owner, idempotency_key) \
             VALUES ($1, 'main', 'out', $2, 'text', '{}', 'send', $3, 0, $4, 'test', $5) \
             RETURNING id",
        )
        .bind(contact)
        .bind(wamid)
        .bind(status)
        .bind(lease)
        .bind(format!("test-{i}"))
        .fetch_one(pool)
        .await
        .unwrap();
        ids.push(id);
    }
    let status_of = |i: usize| {
        let db = server.db.clone();
        let id = ids[i];
        async move { text_of(&db, &format!("SELECT status FROM messages WHERE id = {id}")).await }
    };

    // 0: read arrives before delivered, then a late sent.
    for s in ["read", "delivered", "sent"] {
        assert_eq!(
            server
                .signed(&status_webhook("wamid.out.0", s, None))
                .await
                .0,
            200
        );
    }
    // 1: delivered is skipped; the same read twice is one update.
    for s in ["sent", "read", "read"] {
        server.signed(&status_webhook("wamid.out.1", s, None)).await;
    }
    // 2: failed, with its error; a later delivered does not undo it. All in one webhook.
    let failed = json!([{"code": 131047, "title": "Re-engagement message",
        "message": "Re-engagement message",
        "error_data": {"details": "Message failed to send because more than 24 hours have passed since the customer last replied to this number."}}]);
    let batch = envelope(json!({"statuses": [
        {"id": "wamid.out.2", "status": "sent", "timestamp": "1760000400", "recipient_id": WA_ID},
        {"id": "wamid.out.2", "status": "failed", "timestamp": "1760000500", "recipient_id": WA_ID, "errors": failed},
        {"id": "wamid.out.2", "status": "delivered", "timestamp": "1760000600", "recipient_id": WA_ID}
    ]}));
    assert_eq!(server.signed(&batch).await.0, 200);
    server.processed(1 + 3 + 2 + 3).await;

    assert_eq!(status_of(0).await, "read");
    assert_eq!(status_of(1).await, "read");
    assert_eq!(status_of(2).await, "failed");
    let (code, error): (Option<i64>, Option<String>) =
        sqlx::query_as("SELECT error_code, error FROM messages WHERE id = $1")
            .bind(ids[2])
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(code, Some(131047));
    assert!(error.unwrap().contains("Re-engagement message"));

    // 3: the status overtakes the send's response: it waits, and lands once the wamid is
    // recorded.
    server
        .signed(&status_webhook("wamid.out.3", "delivered", None))
        .await;
    let db = server.db.clone();
    eventually("the early status is postponed", || {
        let db = db.clone();
        async move {
            count(
                &db,
                "SELECT COUNT(*) FROM inbox WHERE dedupe_key = 'wamid.out.3:delivered' AND attempts >= 1 AND processed_at IS NULL",
            )
            .await
                == 1
        }
    })
    .await;
    assert_eq!(status_of(3).await, "sending");
    exec(
        &server.db,
        &format!(
            "UPDATE messages SET wamid = 'wamid.out.3', status = 'sent' WHERE id = {}",
            ids[3]
        ),
    )
    .await;
    let db = server.db.clone();
    let id = ids[3];
    eventually("the early status lands", || {
        let db = db.clone();
        async move {
            text_of(&db, &format!("SELECT status FROM messages WHERE id = {id}")).await
                == "delivered"
        }
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn dialog360_webhooks_need_the_secret_header() {
    let server = Server::start().await;
    let body = fixture("inbound_text.json");
    for (what, headers) in [
        ("wrong", vec![("X-Flowgate-Secret", "nope")]),
        ("missing", vec![]),
        (
            "Meta's signature instead",
            vec![("X-Hub-Signature-256", "sha256=00")],
        ),
    ] {
        let (status, answer) = server.post("/webhook/d360", &body, &headers).await;
        assert_eq!(status, 401, "{what}: {answer}");
    }
    assert_eq!(server.count("SELECT COUNT(*) FROM inbox").await, 0);

    let (status, ack) = server
        .post(
            "/webhook/d360",
            &body,
            &[("X-Flowgate-Secret", D360_SECRET)],
        )
        .await;
    assert_eq!((status, ack), (200, json!({"stored": 1, "duplicates": 0})));
    server.processed(1).await;
    assert_eq!(
        conversation(&server.db, "d360", WA_ID).await,
        [
            ("in".to_string(), "Hi, is my order shipped?".to_string()),
            ("out".to_string(), REPLY.to_string())
        ]
    );
    assert!(conversation(&server.db, "main", WA_ID).await.is_empty());
    server.shutdown().await;
}

/// No server: the worker's own entry point, and the crash window between a committed turn
/// and the inbox row being marked processed.
#[tokio::test]
async fn drain_once_processes_everything_exactly_once() {
    let (_dir, loaded, db) = project();
    let application = Application::build(&loaded, &db, "127.0.0.1:0", Arc::new(SystemClock))
        .await
        .unwrap();
    let state = application.state();
    let db = state.runtime.db.clone();
    let rows: Vec<_> = parse_webhook(&fixture("inbound_text.json"))
        .unwrap()
        .into_iter()
        .chain(parse_webhook(&status_webhook("wamid.unknown", "read", None)).unwrap())
        .map(|u| inbox_row("main", u))
        .collect();
    let now = state.runtime.clock.now();
    db.insert_updates(&rows, now).await.unwrap();

    // The message is processed; the status of an unknown message is postponed.
    assert_eq!(drain_once(&state).await, 1);
    assert_eq!(
        conversation(&db, "main", WA_ID).await,
        [
            ("in".to_string(), "Hi, is my order shipped?".to_string()),
            ("out".to_string(), REPLY.to_string())
        ]
    );
    let out = db.messages("main", WA_ID, 10).await.unwrap().pop().unwrap();
    assert_eq!(out.status, "pending");
    assert_eq!(drain_once(&state).await, 0);

    // A crash after the turn committed, before the row was marked: processed again, and
    // recognised.
    exec(
        &db,
        "UPDATE inbox SET processed_at = NULL WHERE kind = 'message'",
    )
    .await;
    assert_eq!(drain_once(&state).await, 1);
    assert_eq!(conversation(&db, "main", WA_ID).await.len(), 2);
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM inbox WHERE processed_at IS NULL").await,
        1
    );
}

#[tokio::test]
async fn a_contacts_messages_run_in_order_others_alongside() {
    contacts_in_order(Server::start().await).await;
}

/// The same on PostgreSQL (skipped without `FLOWGATE_TEST_POSTGRES_URL`).
#[tokio::test]
async fn a_contacts_messages_run_in_order_others_alongside_on_postgres() {
    if let Some(server) = Server::start_on(support::Backend::Postgres).await {
        contacts_in_order(server).await;
    }
}

async fn contacts_in_order(server: Server) {
    let message = |from: &str, i: usize, text: &str| {
        json!({"from": from, "id": format!("wamid.{from}.{i}"), "timestamp": support::now_timestamp(),
               "type": "text", "text": {"body": text}})
    };
    // Two customers' conversations interleaved in one webhook, and a third in the next.
    let first = envelope(json!({"messages": [
        message("1777000001", 0, "survey"),
        message("1777000002", 0, "survey"),
        message("1777000001", 1, "Ana"),
        message("1777000002", 1, "Bob"),
    ]}));
    let second = envelope(json!({"messages": [
        message("1777000003", 0, "survey"),
        message("1777000003", 1, "Cy"),
    ]}));
    assert_eq!(server.signed(&first).await.0, 200);
    assert_eq!(server.signed(&second).await.0, 200);
    server.processed(6).await;
    for (contact, name) in [
        ("1777000001", "Ana"),
        ("1777000002", "Bob"),
        ("1777000003", "Cy"),
    ] {
        let texts: Vec<String> = conversation(&server.db, "main", contact)
            .await
            .into_iter()
            .map(|(direction, text)| format!("{direction}: {text}"))
            .collect();
        assert_eq!(
            texts,
            [
                "in: survey".to_string(),
                "out: Your name?".to_string(),
                format!("in: {name}"),
                format!("out: Thanks, {name}"),
            ]
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn updates_stored_before_a_restart_are_processed_on_start() {
    let (dir, loaded, db_url) = project();
    // Stored by a server that stopped (or died) before processing them.
    {
        let runtime = loaded
            .runtime(&db_url, Arc::new(SystemClock))
            .await
            .unwrap();
        let rows: Vec<_> = parse_webhook(&fixture("inbound_text.json"))
            .unwrap()
            .into_iter()
            .map(|u| inbox_row("main", u))
            .collect();
        runtime
            .db
            .insert_updates(&rows, runtime.clock.now())
            .await
            .unwrap();
        runtime.db.close().await;
    }
    let running = support::Running::start(&loaded, &db_url, Arc::new(SystemClock)).await;
    let db = running.db.clone();
    let check = db.clone();
    eventually("the stored update is processed", || {
        let db = check.clone();
        async move { count(&db, "SELECT COUNT(*) FROM inbox WHERE processed_at IS NULL").await == 0 }
    })
    .await;
    assert_eq!(conversation(&db, "main", WA_ID).await.len(), 2);
    running.shutdown().await;
    drop(dir);
}

/// The reasons of the stored `malformed` updates, in inbox order.
async fn malformed_reasons(db: &Db) -> Vec<String> {
    let pool = db.sqlite_pool().expect("tests use SQLite");
    let payloads: Vec<String> =
        sqlx::query_scalar("SELECT payload FROM inbox WHERE kind = 'malformed' ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap();
    payloads
        .iter()
        .map(|p| {
            let update: Value = serde_json::from_str(p).unwrap();
            update["reason"].as_str().unwrap().to_string()
        })
        .collect()
}

#[tokio::test]
async fn invalid_identifiers_are_rejected_with_their_reason_never_a_contact_or_a_send() {
    let server = Server::start().await;
    let now = support::now_timestamp();
    let thirty_digits = "1".repeat(30);
    let bad_senders = ["\u{0}", "order", thirty_digits.as_str(), "", "+\u{0}"];
    for (i, from) in bad_senders.iter().enumerate() {
        let body = envelope(json!({
            "contacts": [{"profile": {"name": "Mallory"}, "wa_id": from}],
            "messages": [{"from": from, "id": format!("wamid.bad.{i}"), "timestamp": now,
                "type": "text", "text": {"body": "hello"}}]
        }));
        let (status, ack) = server.signed(&body).await;
        assert_eq!((status, ack), (200, json!({"stored": 1, "duplicates": 0})));
    }
    // A BSUID that is not one, a preference and an identity change naming nobody real.
    let other = [
        envelope(
            json!({"messages": [{"from_user_id": "US.no-such id", "id": "wamid.bad.u",
            "timestamp": now, "type": "text", "text": {"body": "hello"}}]}),
        ),
        envelope(
            json!({"messages": [{"from": WA_ID, "id": "wamid.bad.s", "timestamp": now,
            "type": "system", "system": {"type": "user_changed_number", "wa_id": "order"}}]}),
        ),
        support::webhook(
            "user_preferences",
            PHONE_NUMBER_ID,
            json!({"user_preferences": [{"wa_id": "order", "value": "stop",
                "category": "marketing_messages", "timestamp": 1760000000}]}),
        ),
    ];
    for body in &other {
        let (status, ack) = server.signed(body).await;
        assert_eq!((status, ack), (200, json!({"stored": 1, "duplicates": 0})));
    }
    server.processed(8).await;

    let reasons = malformed_reasons(&server.db).await;
    assert_eq!(
        reasons,
        [
            "a `text` message whose `from` `\\0` is not a phone number: write 8-15 digits, \
             country code first, with no spaces or punctuation (an optional leading + is \
             allowed), e.g. 4915123456789",
            "a `text` message whose `from` `order` is not a phone number: write 8-15 digits, \
             country code first, with no spaces or punctuation (an optional leading + is \
             allowed), e.g. 4915123456789",
            &format!(
                "a `text` message whose `from` `{thirty_digits}` has 30 digits: a phone number \
                 in E.164 form has 8 to 15, country code first"
            ),
            "a `text` message whose `from` `` has 0 digits: a phone number in E.164 form has \
             8 to 15, country code first",
            "a `text` message whose `from` `+\\0` is not a phone number: write 8-15 digits, \
             country code first, with no spaces or punctuation (an optional leading + is \
             allowed), e.g. 4915123456789",
            "a `text` message whose `from_user_id` `US.no-such id` is not a business-scoped \
             user id: two capital letters, a period, optionally `ENT.`, then up to 128 \
             letters or digits, e.g. US.13491208655302741918",
            "a `system` message whose `system.wa_id` `order` is not a phone number: write \
             8-15 digits, country code first, with no spaces or punctuation (an optional \
             leading + is allowed), e.g. 4915123456789",
            "a user preference whose `wa_id` `order` is not a phone number: write 8-15 \
             digits, country code first, with no spaces or punctuation (an optional leading \
             + is allowed), e.g. 4915123456789",
        ]
    );
    // Processed as unreadable, not retried, and nothing else came of them.
    assert_eq!(
        server
            .count("SELECT COUNT(*) FROM inbox WHERE kind = 'malformed' AND processed_at IS NOT NULL AND last_error IS NULL")
            .await,
        8
    );
    assert_eq!(server.count("SELECT COUNT(*) FROM contacts").await, 0);
    assert_eq!(
        server.count("SELECT COUNT(*) FROM contact_aliases").await,
        0
    );
    assert_eq!(server.count("SELECT COUNT(*) FROM messages").await, 0);
    let metrics = flowgate::metrics::render(&[]);
    assert!(
        metrics.contains("flowgate_webhook_malformed_total"),
        "{metrics}"
    );

    // The same sender with a real number is a customer, answered.
    let body = envelope(json!({"messages": [{"from": WA_ID, "id": "wamid.good",
        "timestamp": now, "type": "text", "text": {"body": "hello"}}]}));
    assert_eq!(server.signed(&body).await.0, 200);
    server.processed(9).await;
    assert_eq!(server.count("SELECT COUNT(*) FROM contacts").await, 1);
    assert_eq!(conversation(&server.db, "main", WA_ID).await.len(), 2);
    server.shutdown().await;
}
