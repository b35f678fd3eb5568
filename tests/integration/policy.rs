//! The policy layer through the real server: signed webhooks in, the admin API, the outbox
//! sender posting to a fake Graph API on 127.0.0.1, and a virtual clock that closes windows.
//!
//! - a `131047` answered synchronously turns the message into its step's template;
//! - a `131047` arriving as a `failed` status decides the message again as a new one: the
//!   template, or the queue (flushed when the customer writes again);
//! - a `message_template_status_update` pausing a template queues what would use it, with the
//!   reason, and an approval lets it go again;
//! - `user_preferences` stop skips marketing templates, utility ones still go;
//! - an agent's message outside the window is queued and leaves first when the customer
//!   writes.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use flowgate::app;
use flowgate::clock::{Clock, VirtualClock};
use serde_json::{Value, json};
use support::fake_graph::{FakeAuth, FakeGraph, Reply, Script};
use support::{envelope, eventually, sign};

const PHONE: &str = "110000000000001";
const TOKEN: &str = "test-access-token";
const SECRET: &str = "test-app-secret";
const ANA: &str = "15555550123";

const FLOWS: &[(&str, &str)] = &[
    (
        "order.yaml",
        r#"
flow: order
triggers:
  - keywords: [order]
steps:
  shipped:
    say: "Order A-1 shipped on Monday."
    outside_window: { template: order_shipped, language: en_US, params: ["A-1", "Monday"] }
"#,
    ),
    (
        "hello.yaml",
        r#"
flow: hello
triggers:
  - keywords: [hi]
steps:
  greet:
    say: "Hello!"
"#,
    ),
];

const TEMPLATES: &str = r#"
templates:
  - name: order_shipped
    language: en_US
    category: utility
    status: approved
    body: "Your order {{1}} shipped on {{2}}."
  - name: winback_offer
    language: en_US
    category: marketing
    status: approved
    body: "We miss you, {{1}}! 10% off this week."
"#;

struct Server {
    base: String,
    clock: Arc<VirtualClock>,
    fake: FakeGraph,
    http: reqwest::Client,
    running: support::Running,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start() -> Self {
        let fake = FakeGraph::start(FakeAuth::cloud_api(PHONE, TOKEN)).await;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("flows")).unwrap();
        for (name, text) in FLOWS {
            std::fs::write(root.join("flows").join(name), text).unwrap();
        }
        std::fs::write(root.join("templates.yaml"), TEMPLATES).unwrap();
        let config = format!(
            "flows: flows\ntemplates: templates.yaml\nchannels:\n  - name: main\n    \
             provider: cloud_api\n    phone_number_id: \"{PHONE}\"\n    access_token: {TOKEN}\n    \
             app_secret: {SECRET}\n    verify_token: verify\n    api_base: {}\n\
             outbox:\n  pace_recipients: false\n",
            fake.cloud_api_base()
        );
        std::fs::write(root.join("flowgate.yaml"), config).unwrap();
        let loaded =
            app::load(Some(&root.join("flowgate.yaml"))).unwrap_or_else(|d| panic!("{d:?}"));
        let db = format!("sqlite://{}", root.join("flowgate.db").display());
        let clock = Arc::new(VirtualClock::new(VirtualClock::test_epoch()));
        let running = support::Running::start(&loaded, &db, clock.clone()).await;
        Self {
            base: running.base.clone(),
            clock,
            fake,
            http: running.client.clone(),
            running,
            _dir: dir,
        }
    }

    async fn shutdown(self) {
        self.running.shutdown().await;
    }

    /// A signed webhook to the channel; it must be answered 200.
    async fn webhook(&self, body: &[u8]) {
        let response = self
            .http
            .post(format!("{}/webhook/main", self.base))
            .header("content-type", "application/json")
            .header("X-Hub-Signature-256", sign(SECRET, body))
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
    }

    /// The customer writes `text` now (by the virtual clock).
    async fn customer(&self, text: &str) {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.webhook(&envelope(
            PHONE,
            json!({
                "contacts": [{"profile": {"name": "Ana"}, "wa_id": ANA}],
                "messages": [{"from": ANA, "id": format!("wamid.in.{n}"),
                    "timestamp": self.clock.now().timestamp().to_string(),
                    "type": "text", "text": {"body": text}}],
            }),
        ))
        .await;
    }

    /// A `failed` status for one of our messages, with WhatsApp error `code`.
    async fn failed_status(&self, wamid: &str, code: i64) {
        self.webhook(&envelope(
            PHONE,
            json!({"statuses": [{"id": wamid, "status": "failed",
                "timestamp": self.clock.now().timestamp().to_string(), "recipient_id": ANA,
                "errors": [{"code": code, "title": "Re-engagement message",
                    "message": "Re-engagement message"}]}]}),
        ))
        .await;
    }

    async fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}/api{path}", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// An agent's message through the API; returns the answer (id, decision, reason…).
    async fn agent(&self, body: Value) -> Value {
        let (status, answer) = self
            .api(
                reqwest::Method::POST,
                &format!("/conversations/{ANA}/messages"),
                Some(body),
            )
            .await;
        assert_eq!(status, 201, "{answer}");
        answer
    }

    async fn message(&self, id: i64) -> Value {
        let (status, m) = self
            .api(reqwest::Method::GET, &format!("/messages/{id}"), None)
            .await;
        assert_eq!(status, 200, "{m}");
        m
    }

    /// The contact's outbound messages, oldest first.
    async fn outbound(&self) -> Vec<Value> {
        let (status, c) = self
            .api(reqwest::Method::GET, &format!("/conversations/{ANA}"), None)
            .await;
        assert_eq!(status, 200, "{c}");
        c["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["direction"] == "out")
            .cloned()
            .collect()
    }

    /// Waits until the contact has `n` outbound messages and none is waiting to be sent.
    async fn settled(&self, n: usize) -> Vec<Value> {
        eventually(&format!("{n} outbound messages settle"), || async {
            let out = self.outbound().await;
            out.len() >= n
                && out
                    .iter()
                    .all(|m| m["status"] != "pending" && m["status"] != "sending")
        })
        .await;
        self.outbound().await
    }

    /// Waits until the registry (`GET /api/templates`) shows `name` in `status`.
    async fn template_status(&self, name: &str, status: &str) {
        eventually(&format!("{name} is {status}"), || async {
            let (_, t) = self.api(reqwest::Method::GET, "/templates", None).await;
            t["templates"].as_array().is_some_and(|ts| {
                ts.iter()
                    .any(|t| t["name"] == name && t["status"] == status)
            })
        })
        .await;
    }

    /// Waits until the contact's marketing opt-out is `opted_out`.
    async fn opted_out(&self, opted_out: bool) {
        eventually("the marketing preference applies", || async {
            let (_, c) = self
                .api(reqwest::Method::GET, &format!("/conversations/{ANA}"), None)
                .await;
            c["id"].is_number()
                && c["contact"]["policy"]["marketing_opt_out"].is_object() == opted_out
        })
        .await;
    }

    fn advance_hours(&self, hours: i64) {
        self.clock.advance(chrono::Duration::hours(hours));
    }
}

fn texts(sends: &[support::fake_graph::Recorded]) -> Vec<String> {
    sends
        .iter()
        .map(|s| match s.body["type"].as_str() {
            Some("template") => {
                format!("template:{}", s.body["template"]["name"].as_str().unwrap())
            }
            _ => s.body["text"]["body"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        })
        .collect()
}

#[tokio::test]
async fn a_synchronous_131047_becomes_the_step_template() {
    let s = Server::start().await;
    s.fake.script(Script::next(1, Reply::graph_error(131047)));
    s.customer("order").await;
    let sends = s.fake.wait_for_sends(2, Duration::from_secs(20)).await;
    assert_eq!(
        texts(&sends),
        ["Order A-1 shipped on Monday.", "template:order_shipped"]
    );
    let t = &sends[1].body["template"];
    assert_eq!(t["language"]["code"], "en_US");
    assert_eq!(t["components"][0]["parameters"][0]["text"], "A-1");
    let out = s.settled(1).await;
    let m = s.message(out[0]["id"].as_i64().unwrap()).await;
    assert_eq!(
        (m["status"].as_str(), m["decision"].as_str()),
        (Some("sent"), Some("rewritten"))
    );
    assert!(m["reason"].as_str().unwrap().contains("131047"), "{m}");
    assert_eq!(
        m["body"]["original"]["body"],
        "Order A-1 shipped on Monday."
    );
    s.shutdown().await;
}

#[tokio::test]
async fn a_failed_131047_status_decides_the_message_again() {
    let s = Server::start().await;
    // With a template fallback: a new message, the template, goes out.
    s.customer("order").await;
    let sends = s.fake.wait_for_sends(1, Duration::from_secs(20)).await;
    let first = s.settled(1).await;
    s.failed_status(sends[0].wamid.as_deref().unwrap(), 131047)
        .await;
    let sends = s.fake.wait_for_sends(2, Duration::from_secs(20)).await;
    assert_eq!(texts(&sends)[1], "template:order_shipped");
    let out = s.settled(2).await;
    let original = s.message(first[0]["id"].as_i64().unwrap()).await;
    assert_eq!(original["status"], "failed");
    let reason = original["reason"].as_str().unwrap();
    assert!(
        reason.contains("131047") && reason.contains(&format!("message {}", out[1]["id"])),
        "{reason}"
    );
    assert_eq!(out[1]["decision"], "rewritten");

    // Without one: the message waits in the queue, and leaves first when the customer
    // writes again (a minute later: the window reopens with a message newer than the one
    // WhatsApp knew when it refused).
    s.clock.advance(chrono::Duration::minutes(1));
    s.customer("hi").await;
    let sends = s.fake.wait_for_sends(3, Duration::from_secs(20)).await;
    s.settled(3).await;
    s.failed_status(sends[2].wamid.as_deref().unwrap(), 131047)
        .await;
    eventually("the hello is queued again", || async {
        s.outbound()
            .await
            .last()
            .is_some_and(|m| m["status"] == "queued")
    })
    .await;
    let queued = s.outbound().await.last().cloned().unwrap();
    assert!(
        queued["reason"]
            .as_str()
            .unwrap()
            .contains("no template fallback"),
        "{queued}"
    );
    assert_eq!(s.fake.sends().len(), 3, "nothing is resent as free-form");
    s.advance_hours(1);
    s.customer("thanks").await;
    let sends = s.fake.wait_for_sends(4, Duration::from_secs(20)).await;
    assert_eq!(texts(&sends)[3], "Hello!");
    s.settled(4).await;
    let m = s.message(queued["id"].as_i64().unwrap()).await;
    assert_eq!(
        (m["status"].as_str(), m["decision"].as_str()),
        (Some("sent"), Some("send"))
    );
    s.shutdown().await;
}

#[tokio::test]
async fn a_paused_template_is_queued_with_the_reason_until_approved() {
    let s = Server::start().await;
    s.customer("hi").await;
    s.fake.wait_for_sends(1, Duration::from_secs(20)).await;
    let status = |event: &str| {
        serde_json::to_vec(&json!({
            "object": "whatsapp_business_account",
            "entry": [{"id": "100000000000001", "time": s.clock.now().timestamp(), "changes": [{
                "field": "message_template_status_update",
                "value": {"event": event, "message_template_id": 1700000000000003_i64,
                    "message_template_name": "winback_offer", "message_template_language": "en_US",
                    "reason": "NONE", "message_template_category": "MARKETING"}}]}]
        }))
        .unwrap()
    };
    s.webhook(&status("PAUSED")).await;
    let offer =
        json!({"template": {"name": "winback_offer", "language": "en_US", "params": ["Ana"]}});
    s.template_status("winback_offer", "paused").await;
    let answer = s.agent(offer.clone()).await;
    assert_eq!(answer["decision"], "queued", "{answer}");
    assert!(
        answer["reason"]
            .as_str()
            .unwrap()
            .contains("winback_offer (en_US) is paused"),
        "{answer}"
    );
    let m = s.message(answer["id"].as_i64().unwrap()).await;
    assert_eq!(
        (m["status"].as_str(), m["decision"].as_str()),
        (Some("queued"), Some("queued"))
    );

    s.webhook(&status("APPROVED")).await;
    s.template_status("winback_offer", "approved").await;
    assert_eq!(s.agent(offer.clone()).await["decision"], "send");
    let sends = s.fake.wait_for_sends(2, Duration::from_secs(20)).await;
    assert_eq!(texts(&sends)[1], "template:winback_offer");
    s.shutdown().await;
}

#[tokio::test]
async fn a_marketing_stop_skips_marketing_and_not_utility() {
    let s = Server::start().await;
    let preference = |value: &str| {
        support::webhook(
            "user_preferences",
            PHONE,
            json!({"contacts": [{"wa_id": ANA}], "user_preferences": [{"wa_id": ANA,
                "detail": "User requested to stop marketing messages",
                "category": "marketing_messages", "value": value,
                "timestamp": s.clock.now().timestamp()}]}),
        )
    };
    s.webhook(&preference("stop")).await;
    let offer =
        json!({"template": {"name": "winback_offer", "language": "en_US", "params": ["Ana"]}});
    s.opted_out(true).await;
    let answer = s.agent(offer.clone()).await;
    assert_eq!(answer["decision"], "skipped", "{answer}");
    assert!(
        answer["reason"]
            .as_str()
            .unwrap()
            .contains("user_preferences"),
        "{answer}"
    );
    let utility = s
        .agent(
            json!({"template": {"name": "order_shipped", "language": "en_US",
            "params": ["A-1", "Monday"]}}),
        )
        .await;
    assert_eq!(utility["decision"], "send");
    s.webhook(&preference("resume")).await;
    s.opted_out(false).await;
    assert_eq!(s.agent(offer.clone()).await["decision"], "send");
    let sends = s.fake.wait_for_sends(2, Duration::from_secs(20)).await;
    assert_eq!(
        texts(&sends),
        ["template:order_shipped", "template:winback_offer"]
    );
    s.shutdown().await;
}

#[tokio::test]
async fn an_agent_message_outside_the_window_waits_for_the_customer() {
    let s = Server::start().await;
    s.customer("hi").await;
    s.fake.wait_for_sends(1, Duration::from_secs(20)).await;
    s.advance_hours(25);
    let answer = s.agent(json!({"text": "Your parcel is on its way."})).await;
    assert_eq!(answer["decision"], "queued", "{answer}");
    assert_eq!(
        answer["explain"],
        "window closed 1h2m ago; no template fallback → queued until the customer writes"
    );
    // Bad requests say what is wrong.
    let (status, e) = s
        .api(
            reqwest::Method::POST,
            &format!("/conversations/{ANA}/messages"),
            Some(json!({"text": "a", "template": {"name": "x", "language": "en_US"}})),
        )
        .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (422, Some("invalid_body"))
    );
    let (status, e) = s
        .api(
            reqwest::Method::POST,
            &format!("/conversations/{ANA}/messages"),
            Some(json!({"template": {"name": "nope", "language": "en_US"}})),
        )
        .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (422, Some("unknown_template"))
    );
    let (status, e) = s.api(reqwest::Method::GET, "/messages/999999", None).await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (404, Some("unknown_message"))
    );

    s.customer("hi").await;
    let sends = s.fake.wait_for_sends(3, Duration::from_secs(20)).await;
    assert_eq!(
        texts(&sends),
        ["Hello!", "Your parcel is on its way.", "Hello!"]
    );
    let (_, c) = s
        .api(reqwest::Method::GET, &format!("/conversations/{ANA}"), None)
        .await;
    assert_eq!(c["window"]["state"], "open");
    s.shutdown().await;
}

#[tokio::test]
async fn failed_statuses_131050_and_131049_change_marketing_consent() {
    let s = Server::start().await;
    s.customer("hi").await;
    let sends = s.fake.wait_for_sends(1, Duration::from_secs(20)).await;
    s.settled(1).await;
    let offer =
        json!({"template": {"name": "winback_offer", "language": "en_US", "params": ["Ana"]}});

    // 131049: WhatsApp asks for 24 h without marketing; utility still goes.
    s.failed_status(sends[0].wamid.as_deref().unwrap(), 131049)
        .await;
    eventually("the marketing pause applies", || async {
        let (_, c) = s
            .api(reqwest::Method::GET, &format!("/conversations/{ANA}"), None)
            .await;
        c["contact"]["policy"]["marketing_paused_until"].is_string()
    })
    .await;
    let answer = s.agent(offer.clone()).await;
    assert_eq!(answer["decision"], "skipped", "{answer}");
    assert!(
        answer["reason"].as_str().unwrap().contains("131049"),
        "{answer}"
    );
    s.advance_hours(25);
    assert_eq!(s.agent(offer.clone()).await["decision"], "send");

    // 131050: the customer stopped marketing; recorded as an opt-out.
    let sends = s.fake.wait_for_sends(2, Duration::from_secs(20)).await;
    s.settled(3).await;
    s.failed_status(sends[1].wamid.as_deref().unwrap(), 131050)
        .await;
    s.opted_out(true).await;
    let answer = s.agent(offer).await;
    assert_eq!(answer["decision"], "skipped", "{answer}");
    assert!(
        answer["reason"].as_str().unwrap().contains("131050"),
        "{answer}"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn a_reported_template_status_survives_a_restart_until_the_file_is_newer() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("flows")).unwrap();
    std::fs::write(root.join("flows/hello.yaml"), FLOWS[1].1).unwrap();
    std::fs::write(root.join("templates.yaml"), TEMPLATES).unwrap();
    std::fs::write(
        root.join("flowgate.yaml"),
        "flows: flows\ntemplates: templates.yaml\n",
    )
    .unwrap();
    let db = format!("sqlite://{}", root.join("flowgate.db").display());
    let status = |runtime: &flowgate::dispatch::Runtime| {
        runtime
            .templates()
            .find("winback_offer", "en_US")
            .map(|t| t.status.as_str())
            .unwrap()
    };
    let clock = Arc::new(flowgate::clock::SystemClock);
    let loaded = app::load(Some(&root.join("flowgate.yaml"))).unwrap();
    let runtime = loaded.runtime(&db, clock.clone()).await.unwrap();
    runtime
        .template_status_changed("winback_offer", "en-US", "PAUSED", Some("NONE"))
        .await
        .unwrap();
    assert_eq!(status(&runtime), "paused");
    runtime.db.close().await;

    // A restart on the same file: the reported status still holds.
    let loaded = app::load(Some(&root.join("flowgate.yaml"))).unwrap();
    let runtime = loaded.runtime(&db, clock.clone()).await.unwrap();
    assert_eq!(status(&runtime), "paused");
    runtime.db.close().await;

    // The file written again afterwards (as `templates sync` does) wins.
    tokio::time::sleep(Duration::from_millis(20)).await;
    std::fs::write(root.join("templates.yaml"), TEMPLATES).unwrap();
    let loaded = app::load(Some(&root.join("flowgate.yaml"))).unwrap();
    let runtime = loaded.runtime(&db, clock).await.unwrap();
    assert_eq!(status(&runtime), "approved");
}

#[tokio::test]
async fn a_template_failed_with_131047_is_not_decided_again() {
    let s = Server::start().await;
    // A message written 25 hours ago arrives only now: the reply is rewritten to its
    // template, and WhatsApp refuses even that with 131047.
    let written = s.clock.now() - chrono::Duration::hours(25);
    s.webhook(&envelope(
        PHONE,
        json!({"contacts": [{"profile": {"name": "Ana"}, "wa_id": ANA}],
            "messages": [{"from": ANA, "id": "wamid.late",
                "timestamp": written.timestamp().to_string(),
                "type": "text", "text": {"body": "order"}}]}),
    ))
    .await;
    let sends = s.fake.wait_for_sends(1, Duration::from_secs(20)).await;
    assert_eq!(texts(&sends), ["template:order_shipped"]);
    let out = s.settled(1).await;
    assert_eq!(out[0]["decision"], "rewritten");
    s.failed_status(sends[0].wamid.as_deref().unwrap(), 131047)
        .await;
    let id = out[0]["id"].as_i64().unwrap();
    // The status is processed (the inbox is empty): the failure is recorded, and no new
    // message was made from it.
    eventually("the status is processed", || async {
        let metrics = s
            .http
            .get(format!("{}/metrics", s.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metrics.contains("flowgate_inbox_depth 0") && s.message(id).await["status"] == "failed"
    })
    .await;
    assert_eq!(
        s.outbound().await.len(),
        1,
        "the same template is not made again"
    );
    assert_eq!(s.fake.sends().len(), 1);
    s.shutdown().await;
}

#[tokio::test]
async fn a_late_131047_does_not_close_a_window_the_customer_reopened() {
    let s = Server::start().await;
    s.customer("hi").await;
    let sends = s.fake.wait_for_sends(1, Duration::from_secs(20)).await;
    s.settled(1).await;
    // The customer writes again before the refusal of the first reply arrives.
    s.clock.advance(chrono::Duration::minutes(1));
    s.customer("thanks").await;
    eventually("the second message is in", || async {
        let (_, c) = s
            .api(reqwest::Method::GET, &format!("/conversations/{ANA}"), None)
            .await;
        c["messages"].as_array().is_some_and(|m| m.len() >= 3)
    })
    .await;
    s.failed_status(sends[0].wamid.as_deref().unwrap(), 131047)
        .await;
    // Decided again in the window the newer message opened: sent as it was.
    let sends = s.fake.wait_for_sends(2, Duration::from_secs(20)).await;
    assert_eq!(texts(&sends), ["Hello!", "Hello!"]);
    let (_, c) = s
        .api(reqwest::Method::GET, &format!("/conversations/{ANA}"), None)
        .await;
    assert_eq!(c["window"]["state"], "open", "{c}");
    assert_eq!(
        s.agent(json!({"text": "Anything else?"})).await["decision"],
        "send"
    );
    s.shutdown().await;
}
