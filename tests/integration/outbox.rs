//! The outbox sender against a fake Graph API on 127.0.0.1: real flows commit `pending`
//! rows to a SQLite file, the sender delivers them, and the fake checks the credentials,
//! records the exact requests and answers as each test scripts it (each error
//! class, timeouts, pacing). Retries wait on a virtual clock that the tests advance.

use crate::support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use flowgate::app;
use flowgate::clock::{SharedClock, SystemClock, VirtualClock};
use flowgate::config::ChannelConfig;
use flowgate::dispatch::Runtime;
use flowgate::domain::{Inbound, InboundContent};
use flowgate::outbox::{PairLimit, REENGAGE_REASON, Sender, SenderOptions, gauges};
use flowgate::store::{CampaignOrigin, NewCampaign, OutboxEntry};
use flowgate::whatsapp::client::{Client, Endpoint, http_client};
use flowgate::whatsapp::errors::TRANSIENT_MAX_ATTEMPTS;
use serde_json::{Value, json};
use support::fake_graph::{FakeAuth, FakeGraph, Recorded, Reply, Script};

const PHONE_NUMBER_ID: &str = "110000000000001";
const TOKEN: &str = "test-access-token";
const API_KEY: &str = "test-d360-key";
const ANA: &str = "15550000001";
const BEN: &str = "15550000002";
const CAL: &str = "15550000003";
const BSUID: &str = "US.20000000000000000123";

/// One flow per message shape, plus a flow that says three things in a row.
const FLOWS: &[(&str, &str)] = &[
    (
        "text.yaml",
        r#"
flow: text
triggers:
  - keywords: [text]
steps:
  reply:
    say: "Plain text reply."
"#,
    ),
    (
        "buttons.yaml",
        r#"
flow: buttons
triggers:
  - keywords: [buttons]
steps:
  pick:
    say: "Left or right?"
    buttons:
      - { id: left, title: "Left" }
      - { id: right, title: "Right" }
"#,
    ),
    (
        "list.yaml",
        r#"
flow: list
triggers:
  - keywords: [list]
steps:
  pick:
    say: "Pick a row."
    list:
      button: "Rows"
      sections:
        - title: "Odd"
          rows:
            - { id: one, title: "One", description: "The first row" }
            - { id: three, title: "Three" }
        - title: "Even"
          rows:
            - { id: two, title: "Two" }
"#,
    ),
    (
        "template.yaml",
        r#"
flow: template
triggers:
  - keywords: [template]
steps:
  shipped:
    template: { name: order_shipped, language: en_US, params: ["A-1", "Monday"] }
"#,
    ),
    (
        "fallback.yaml",
        r#"
flow: fallback
triggers:
  - keywords: [fallback]
steps:
  news:
    say: "Your order A-1 shipped on Monday."
    outside_window: { template: order_shipped, language: en_US, params: ["A-1", "Monday"] }
"#,
    ),
    (
        "three.yaml",
        r#"
flow: three
triggers:
  - keywords: [three]
steps:
  one:
    say: "one"
    next: two
  two:
    say: "two"
    next: three
  three:
    say: "three"
"#,
    ),
    (
        "rich.yaml",
        r#"
flow: rich
triggers:
  - keywords: [rich]
steps:
  thanks:
    react: "👍"
    quote: true
    say: "Yes, it shipped this morning."
    next: pin
  pin:
    location: { latitude: 37.758056, longitude: -122.425332, name: META HQ, address: "1 Hacker Way, Menlo Park, CA 94025" }
    next: card
  card:
    contacts:
      - { name: John Smith, phone: "+1 (650) 555-1234", email: test@whatsapp.com, org: WhatsApp, url: "https://www.whatsapp.com" }
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
"#;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Provider {
    CloudApi,
    Dialog360,
}

/// A project on disk, a runtime on a SQLite file (or PostgreSQL), a fake Graph API and a
/// sender.
struct Harness {
    database: super::support::TestDb,
    _dir: tempfile::TempDir,
    fake: FakeGraph,
    runtime: Arc<Runtime>,
    channel: ChannelConfig,
    clock: Option<Arc<VirtualClock>>,
    sender: Sender,
}

fn test_options() -> SenderOptions {
    SenderOptions {
        request_timeout: Duration::from_secs(5),
        mark_read_timeout: Duration::from_secs(2),
        idle_poll: Duration::from_millis(5),
        stopped_poll: Duration::from_millis(50),
        ..SenderOptions::default()
    }
}

struct Setup {
    provider: Provider,
    channel: &'static str,
    throughput_mps: u32,
    options: SenderOptions,
    /// The wall clock instead of a virtual one (pacing tests).
    system_clock: bool,
    backend: super::support::Backend,
}

impl Setup {
    fn new(channel: &'static str) -> Self {
        Self {
            provider: Provider::CloudApi,
            channel,
            throughput_mps: 80,
            options: test_options(),
            system_clock: false,
            backend: super::support::Backend::Sqlite,
        }
    }

    async fn start(self) -> Harness {
        self.try_start().await.expect("SQLite is always there")
    }

    /// On PostgreSQL: `None` when it is not configured (see `support::TestDb`).
    async fn on_postgres(mut self) -> Option<Harness> {
        self.backend = super::support::Backend::Postgres;
        self.try_start().await
    }

    async fn try_start(self) -> Option<Harness> {
        let auth = match self.provider {
            Provider::CloudApi => FakeAuth::cloud_api(PHONE_NUMBER_ID, TOKEN),
            Provider::Dialog360 => FakeAuth::dialog360(API_KEY),
        };
        let fake = FakeGraph::start(auth).await;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("flows")).unwrap();
        for (name, text) in FLOWS {
            std::fs::write(root.join("flows").join(name), text).unwrap();
        }
        std::fs::write(root.join("templates.yaml"), TEMPLATES).unwrap();
        let channel = match self.provider {
            Provider::CloudApi => format!(
                "  - name: {}\n    provider: cloud_api\n    phone_number_id: \"{PHONE_NUMBER_ID}\"\n    \
                 access_token: {TOKEN}\n    app_secret: test-secret\n    verify_token: test-verify\n    \
                 api_base: {}\n    throughput_mps: {}\n",
                self.channel,
                fake.cloud_api_base(),
                self.throughput_mps
            ),
            Provider::Dialog360 => format!(
                "  - name: {}\n    provider: dialog360\n    api_key: {API_KEY}\n    api_base: {}\n    \
                 throughput_mps: {}\n",
                self.channel, fake.url, self.throughput_mps
            ),
        };
        let config = format!("flows: flows\ntemplates: templates.yaml\nchannels:\n{channel}");
        std::fs::write(root.join("flowgate.yaml"), config).unwrap();
        let loaded = app::load(Some(&root.join("flowgate.yaml"))).expect("the test project loads");
        let (clock, shared): (Option<Arc<VirtualClock>>, SharedClock) = if self.system_clock {
            (None, Arc::new(SystemClock))
        } else {
            let clock = Arc::new(VirtualClock::new(VirtualClock::test_epoch()));
            (Some(clock.clone()), clock)
        };
        let database = super::support::TestDb::new(root, self.backend).await?;
        let runtime = Arc::new(loaded.runtime(&database.url, shared).await.unwrap());
        let channel = loaded.config.channels[0].clone();
        let sender =
            Sender::new(runtime.clone(), &channel, self.options).expect("a sender for the channel");
        Some(Harness {
            database,
            _dir: dir,
            fake,
            runtime,
            channel,
            clock,
            sender,
        })
    }
}

static INBOUND: AtomicU64 = AtomicU64::new(0);

impl Harness {
    /// Closes the database and drops a PostgreSQL test's schema.
    async fn clean_up(self) {
        self.runtime.db.close().await;
        self.database.clean_up().await;
    }

    fn name(&self) -> &str {
        &self.channel.name
    }

    fn now(&self) -> DateTime<Utc> {
        self.runtime.clock.now()
    }

    fn clock(&self) -> &VirtualClock {
        self.clock.as_deref().expect("a virtual clock")
    }

    /// The customer `wa_id` writes `text`; returns the inbound wamid and the ids of the
    /// outbound rows the flow committed.
    async fn customer(&self, wa_id: &str, text: &str) -> (String, Vec<i64>) {
        let n = INBOUND.fetch_add(1, Ordering::Relaxed);
        let wamid = format!("wamid.in.{wa_id}.{n}");
        let inbound = Inbound {
            id: wamid.clone(),
            timestamp: self.now(),
            content: InboundContent::text(text),
            from_ad: false,
        };
        let report = self
            .runtime
            .inbound(&self.channel.name, wa_id, Some("Ana"), inbound)
            .await
            .unwrap();
        assert!(!report.sent.is_empty(), "`{text}` makes the flow answer");
        (wamid, report.sent.iter().map(|s| s.id).collect())
    }

    async fn entries(&self) -> Vec<OutboxEntry> {
        self.runtime
            .db
            .outbox_entries(&self.channel.name, 1000)
            .await
            .unwrap()
    }

    async fn entry(&self, id: i64) -> OutboxEntry {
        self.entries()
            .await
            .into_iter()
            .find(|e| e.id == id)
            .expect("the row exists")
    }

    async fn drain(&self) -> usize {
        tokio::time::timeout(Duration::from_secs(30), self.sender.drain())
            .await
            .expect("drain finishes")
            .unwrap()
    }

    /// Moves the virtual clock to when `id` may go next.
    async fn advance_to_retry(&self, id: i64) {
        let at = self.entry(id).await.next_attempt_at;
        self.clock().advance_to(at);
    }
}

/// Sends to `to`, in arrival order.
fn sends_to(fake: &FakeGraph, to: &str) -> Vec<Recorded> {
    fake.sends()
        .into_iter()
        .filter(|r| r.to().as_deref() == Some(to))
        .collect()
}

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/whatsapp")
        .join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// Every field of `ours` is a field Meta's example has at the same place, with the same JSON
/// type (our bodies leave out optional parts such as headers and footers, never invent any).
fn assert_shape_within(ours: &Value, meta: &Value, at: &str) {
    match (ours, meta) {
        (Value::Object(o), Value::Object(m)) => {
            for (k, v) in o {
                let mv = m
                    .get(k)
                    .unwrap_or_else(|| panic!("`{at}.{k}` is not in Meta's example {meta}"));
                assert_shape_within(v, mv, &format!("{at}.{k}"));
            }
        }
        (Value::Array(o), Value::Array(m)) => {
            for (i, v) in o.iter().enumerate() {
                // Meta's example lists one element per variant (e.g. body parameters of several
                // types): ours must fit one of them.
                let fits = m
                    .iter()
                    .any(|mv| std::panic::catch_unwind(|| assert_shape_within(v, mv, "")).is_ok());
                assert!(fits, "`{at}[{i}]` = {v} fits no element of Meta's {meta}");
            }
        }
        (o, m) => assert_eq!(
            std::mem::discriminant(o),
            std::mem::discriminant(m),
            "`{at}`: {o} vs Meta's {m}"
        ),
    }
}

/// The body without the callback data (which Meta's examples leave out), after checking it.
fn without_callback(sent: &Recorded, row: i64) -> Value {
    let mut body = sent.body.clone();
    let key = body
        .as_object_mut()
        .unwrap()
        .remove("biz_opaque_callback_data");
    assert_eq!(key, Some(json!(format!("fg-{row}"))), "{}", sent.body);
    body
}

fn expected_bodies(to: &str) -> [(&'static str, Value, &'static str); 4] {
    let to = format!("+{to}");
    [
        (
            "text",
            json!({
                "messaging_product": "whatsapp",
                "recipient_type": "individual",
                "to": to,
                "type": "text",
                "text": {"preview_url": false, "body": "Plain text reply."}
            }),
            "send_text.json",
        ),
        (
            "buttons",
            json!({
                "messaging_product": "whatsapp",
                "recipient_type": "individual",
                "to": to,
                "type": "interactive",
                "interactive": {
                    "type": "button",
                    "body": {"text": "Left or right?"},
                    "action": {"buttons": [
                        {"type": "reply", "reply": {"id": "left", "title": "Left"}},
                        {"type": "reply", "reply": {"id": "right", "title": "Right"}}
                    ]}
                }
            }),
            "send_interactive_button.json",
        ),
        (
            "list",
            json!({
                "messaging_product": "whatsapp",
                "recipient_type": "individual",
                "to": to,
                "type": "interactive",
                "interactive": {
                    "type": "list",
                    "body": {"text": "Pick a row."},
                    "action": {
                        "button": "Rows",
                        "sections": [
                            {"title": "Odd", "rows": [
                                {"id": "one", "title": "One", "description": "The first row"},
                                {"id": "three", "title": "Three"}
                            ]},
                            {"title": "Even", "rows": [{"id": "two", "title": "Two"}]}
                        ]
                    }
                }
            }),
            "send_interactive_list.json",
        ),
        (
            "template",
            json!({
                "messaging_product": "whatsapp",
                "recipient_type": "individual",
                "to": to,
                "type": "template",
                "template": {
                    "name": "order_shipped",
                    "language": {"code": "en_US"},
                    "components": [{"type": "body", "parameters": [
                        {"type": "text", "text": "A-1"},
                        {"type": "text", "text": "Monday"}
                    ]}]
                }
            }),
            "send_template.json",
        ),
    ]
}

/// Every shape goes out exactly as the Cloud API documents it, after a mark-as-read with
/// the typing indicator, and each row records the wamid WhatsApp answered.
async fn shapes_for(provider: Provider, channel: &'static str) {
    let h = Setup {
        provider,
        ..Setup::new(channel)
    }
    .start()
    .await;
    // One customer per shape (so they go in parallel), numbered from 15550000101.
    let mut cases = Vec::new();
    for (i, (keyword, expected, meta)) in expected_bodies("0").into_iter().enumerate() {
        let wa_id = format!("155500001{i:02}");
        let (inbound, rows) = h.customer(&wa_id, keyword).await;
        let mut expected = expected;
        expected["to"] = json!(format!("+{wa_id}"));
        cases.push((wa_id, inbound, rows[0], expected, meta));
    }
    assert_eq!(h.drain().await, 4);

    let requests = h.fake.requests();
    assert_eq!(requests.len(), 8, "4 mark-as-read + 4 sends");
    for r in &requests {
        match provider {
            Provider::CloudApi => {
                assert_eq!(r.path, format!("/v25.0/{PHONE_NUMBER_ID}/messages"));
                assert_eq!(r.header("authorization"), Some(&*format!("Bearer {TOKEN}")));
                assert_eq!(r.header("d360-api-key"), None);
            }
            Provider::Dialog360 => {
                assert_eq!(r.path, "/messages");
                assert_eq!(r.header("d360-api-key"), Some(API_KEY));
                assert_eq!(r.header("authorization"), None);
            }
        }
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.status, 200);
    }
    for (wa_id, inbound, row, expected, meta) in cases {
        let to_them: Vec<&Recorded> = requests
            .iter()
            .filter(|r| r.to().as_deref() == Some(&wa_id) || r.body["message_id"] == inbound)
            .collect();
        assert_eq!(to_them.len(), 2, "{wa_id}: mark-as-read, then the reply");
        let mut read = fixture("mark_read_typing_indicator.json");
        read["message_id"] = json!(inbound);
        assert_eq!(
            to_them[0].body, read,
            "mark-as-read with typing comes first"
        );
        let body = without_callback(to_them[1], row);
        assert_eq!(body, expected);
        assert_shape_within(&body, &fixture(meta), meta);

        let entry = h.entry(row).await;
        assert_eq!(entry.status, "sent");
        assert_eq!(
            entry.wamid, to_them[1].wamid,
            "the answered wamid is stored"
        );
        assert_eq!(entry.attempts, 1);
        assert_eq!(entry.lease_owner, None);
        assert_eq!(entry.lease_until, None);
        assert_eq!(entry.idempotency_key, Some(format!("fg-{row}")));
        assert_eq!(entry.in_reply_to.as_deref(), Some(&*inbound));
    }
    assert_eq!(h.runtime.db.outbox_depth(h.name()).await.unwrap(), 0);
}

#[tokio::test]
async fn cloud_api_sends_every_shape_exactly() {
    shapes_for(Provider::CloudApi, "shapes_cloud").await;
}

#[tokio::test]
async fn dialog360_sends_the_same_bodies_with_its_key() {
    shapes_for(Provider::Dialog360, "shapes_d360").await;
}

#[tokio::test]
async fn a_bsuid_only_contact_is_sent_as_recipient() {
    let h = Setup::new("bsuid").start().await;
    let (_, rows) = h.customer(BSUID, "text").await;
    h.drain().await;
    let sent = &h.fake.sends()[0];
    let mut expected = fixture("send_text_recipient_bsuid.json");
    expected["text"]["body"] = json!("Plain text reply.");
    assert_eq!(without_callback(sent, rows[0]), expected);
    assert_eq!(h.entry(rows[0]).await.status, "sent");
}

#[tokio::test]
async fn a_contacts_messages_leave_in_order_one_at_a_time() {
    in_order(&Setup::new("order").start().await).await;
}

/// The same on PostgreSQL (skipped without `FLOWGATE_TEST_POSTGRES_URL`).
#[tokio::test]
async fn a_contacts_messages_leave_in_order_one_at_a_time_on_postgres() {
    if let Some(h) = Setup::new("order").on_postgres().await {
        in_order(&h).await;
        h.clean_up().await;
    }
}

async fn in_order(h: &Harness) {
    // Ana's sends are slow; Ben's are not.
    h.fake.script(Script::next_to(
        ANA,
        3,
        Reply::delayed(Duration::from_millis(150), Reply::Success),
    ));
    let (ana_in, ana_rows) = h.customer(ANA, "three").await;
    let (_, ben_rows) = h.customer(BEN, "three").await;
    assert_eq!((ana_rows.len(), ben_rows.len()), (3, 3));

    let handle = Sender::new(h.runtime.clone(), &h.channel, test_options())
        .unwrap()
        .spawn();
    h.fake.wait_for_sends(6, Duration::from_secs(10)).await;
    handle.shutdown().await;

    for wa_id in [ANA, BEN] {
        let texts: Vec<_> = sends_to(&h.fake, wa_id)
            .iter()
            .map(|r| r.text().unwrap().to_string())
            .collect();
        assert_eq!(texts, ["one", "two", "three"], "{wa_id}");
    }
    // Ana's next message went only after the previous one was answered.
    let ana = sends_to(&h.fake, ANA);
    for pair in ana.windows(2) {
        assert!(
            pair[1].at.duration_since(pair[0].at) >= Duration::from_millis(150),
            "a contact's sends do not overlap"
        );
    }
    // Ben did not wait for Ana.
    let ben = sends_to(&h.fake, BEN);
    assert!(ben[2].at < ana[2].at);
    // One mark-as-read per inbound message, before the first reply only.
    let reads: Vec<_> = h
        .fake
        .mark_reads()
        .iter()
        .map(|r| r.body["message_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(reads.len(), 2);
    assert!(reads.contains(&ana_in));
    for id in ana_rows.iter().chain(&ben_rows) {
        assert_eq!(h.entry(*id).await.status, "sent");
    }
}

/// A reaction, a quoted reply, a location and a contact card go out in order, as the
/// Cloud API documents them, pointing at the customer's message.
#[tokio::test]
async fn reactions_quotes_locations_and_contact_cards_go_out_as_documented() {
    let h = Setup::new("rich").start().await;
    let (inbound, rows) = h.customer(ANA, "rich").await;
    assert_eq!(rows.len(), 4);
    assert_eq!(h.drain().await, 4);
    let sent = sends_to(&h.fake, ANA);
    let bodies: Vec<Value> = sent
        .iter()
        .zip(&rows)
        .map(|(s, row)| without_callback(s, *row))
        .collect();
    let envelope = |kind: &str, payload: Value| {
        let mut body = json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": format!("+{ANA}"),
            "type": kind,
        });
        body[kind] = payload;
        body
    };
    let mut reaction = fixture("send_reaction.json");
    reaction["to"] = json!(format!("+{ANA}"));
    reaction["reaction"]["message_id"] = json!(inbound);
    assert_eq!(bodies[0], reaction);
    let mut quoted = fixture("send_text_reply_context.json");
    quoted["to"] = json!(format!("+{ANA}"));
    quoted["context"]["message_id"] = json!(inbound);
    assert_eq!(bodies[1], quoted);
    // The shapes of Meta's "Send Location Message" and "Send Contact Message" examples.
    assert_eq!(
        bodies[2],
        envelope(
            "location",
            json!({
                "latitude": 37.758056,
                "longitude": -122.425332,
                "name": "META HQ",
                "address": "1 Hacker Way, Menlo Park, CA 94025"
            })
        )
    );
    assert_eq!(
        bodies[3],
        envelope(
            "contacts",
            json!([{
                "name": { "formatted_name": "John Smith", "first_name": "John Smith" },
                "phones": [{ "phone": "+1 (650) 555-1234" }],
                "emails": [{ "email": "test@whatsapp.com" }],
                "org": { "company": "WhatsApp" },
                "urls": [{ "url": "https://www.whatsapp.com" }]
            }])
        )
    );
    for row in rows {
        assert_eq!(h.entry(row).await.status, "sent");
    }
}

#[tokio::test]
async fn a_failing_mark_as_read_does_not_hold_the_reply() {
    let h = Setup::new("markread").start().await;
    h.fake.fail_mark_reads(true);
    let (_, rows) = h.customer(ANA, "three").await;
    h.drain().await;
    assert_eq!(h.fake.mark_reads().len(), 1, "tried once, never retried");
    assert_eq!(h.fake.sends().len(), 3);
    for id in rows {
        assert_eq!(h.entry(id).await.status, "sent");
    }
}

#[tokio::test]
async fn rate_limit_130429_is_retried_then_sent() {
    rate_limited(&Setup::new("rate_limited").start().await).await;
}

/// The same on PostgreSQL (skipped without `FLOWGATE_TEST_POSTGRES_URL`).
#[tokio::test]
async fn rate_limit_130429_is_retried_then_sent_on_postgres() {
    if let Some(h) = Setup::new("rate_limited").on_postgres().await {
        rate_limited(&h).await;
        h.clean_up().await;
    }
}

async fn rate_limited(h: &Harness) {
    h.fake.script(Script::next(2, Reply::graph_error(130429)));
    let (_, rows) = h.customer(ANA, "text").await;
    let id = rows[0];

    let mut waits = Vec::new();
    for round in 0..2 {
        let before = h.now();
        h.drain().await;
        let e = h.entry(id).await;
        assert_eq!(e.status, "pending", "round {round}");
        assert_eq!(e.error_code, Some(130429));
        assert!(
            e.error.as_deref().unwrap().contains("Rate limit hit"),
            "{e:?}"
        );
        assert_eq!(
            e.attempts, 0,
            "a rate limit is the channel's, not the message's"
        );
        assert!(e.next_attempt_at > before);
        waits.push((e.next_attempt_at - before).num_milliseconds());
        // Nothing goes before its time.
        h.drain().await;
        assert_eq!(h.fake.sends().len(), round + 1);
        h.advance_to_retry(id).await;
    }
    // 1 s then 2 s, ±20 %.
    assert!((800..=1200).contains(&waits[0]), "{waits:?}");
    assert!((1600..=2400).contains(&waits[1]), "{waits:?}");
    h.drain().await;
    let e = h.entry(id).await;
    assert_eq!(e.status, "sent");
    assert_eq!(e.error_code, None);
    assert_eq!(h.fake.sends().len(), 3);
    assert_eq!(h.fake.mark_reads().len(), 1);
    assert!(
        flowgate::metrics::counter_value("flowgate_send_errors_total", &[("code", "130429")]) >= 2
    );
}

#[tokio::test]
async fn retry_after_from_whatsapp_is_honoured() {
    let h = Setup::new("retry_after").start().await;
    h.fake.script(Script::next(
        1,
        Reply::retry_after(7, Reply::graph_error(130429)),
    ));
    let (_, rows) = h.customer(ANA, "text").await;
    let before = h.now();
    h.drain().await;
    let e = h.entry(rows[0]).await;
    assert_eq!(e.status, "pending");
    assert_eq!(e.error_code, Some(130429));
    assert_eq!(
        (e.next_attempt_at - before).num_milliseconds(),
        7_000,
        "WhatsApp's Retry-After, not our back-off"
    );
    h.advance_to_retry(rows[0]).await;
    h.drain().await;
    assert_eq!(h.entry(rows[0]).await.status, "sent");
}

#[tokio::test]
async fn a_third_of_sends_rate_limited_keeps_the_channel_near_its_rate() {
    const RATE: u32 = 50;
    const MESSAGES: usize = 120;
    let h = Setup {
        throughput_mps: RATE,
        ..Setup::new("rate_limited_burst")
    }
    .start()
    .await;
    h.fake
        .script(Script::share(3, 10, Reply::graph_error(130429)));
    for i in 0..MESSAGES {
        h.customer(&format!("1555200{i:04}"), "text").await;
    }
    let mut lowest = h.sender.rate_mps();
    for _ in 0..200 {
        let claimed = tokio::time::timeout(Duration::from_secs(30), h.sender.run_once())
            .await
            .expect("a batch finishes")
            .unwrap();
        lowest = lowest.min(h.sender.rate_mps());
        assert!(
            lowest >= f64::from(RATE) * 0.4,
            "the rate fell to {lowest} mps of {RATE} after {} sends",
            h.fake.sends().len()
        );
        if claimed == 0 {
            if h.entries().await.iter().all(|e| e.status == "sent") {
                break;
            }
            // Past every retry's back-off.
            h.clock().advance(chrono::Duration::minutes(2));
        }
    }
    let sends = h.fake.sends();
    let refused = sends.iter().filter(|s| s.status == 429).count();
    let accepted = sends.iter().filter(|s| s.status == 200).count();
    assert_eq!(accepted, MESSAGES, "every message went out");
    let share = refused as f64 / sends.len() as f64;
    assert!(
        (0.25..=0.35).contains(&share),
        "{refused} of {}",
        sends.len()
    );
    assert!(
        flowgate::metrics::counter_value(
            "flowgate_channel_slowdowns_total",
            &[("channel", "rate_limited_burst")]
        ) >= 1
    );
}

#[tokio::test]
async fn pair_limit_131056_backs_off_that_recipient_only() {
    let h = Setup::new("pair").start().await;
    h.fake
        .script(Script::next_to(ANA, 2, Reply::graph_error(131056)));
    let (_, ana) = h.customer(ANA, "text").await;
    let (_, ben) = h.customer(BEN, "text").await;

    let start = h.now();
    h.drain().await;
    assert_eq!(h.entry(ben[0]).await.status, "sent", "Ben is not held up");
    let e = h.entry(ana[0]).await;
    assert_eq!((e.status.as_str(), e.error_code), ("pending", Some(131056)));
    assert_eq!(
        e.next_attempt_at - start,
        chrono::Duration::seconds(1),
        "4^0 s"
    );

    h.advance_to_retry(ana[0]).await;
    let second = h.now();
    h.drain().await;
    let e = h.entry(ana[0]).await;
    assert_eq!(e.status, "pending");
    assert_eq!(
        e.next_attempt_at - second,
        chrono::Duration::seconds(4),
        "4^1 s"
    );

    h.advance_to_retry(ana[0]).await;
    h.drain().await;
    assert_eq!(h.entry(ana[0]).await.status, "sent");
    assert_eq!(sends_to(&h.fake, ANA).len(), 3);
    assert_eq!(sends_to(&h.fake, BEN).len(), 1);
}

#[tokio::test]
async fn the_pair_limit_paces_a_recipient_before_whatsapp_has_to() {
    let h = Setup {
        options: SenderOptions {
            pair_limit: Some(PairLimit {
                burst: 2,
                interval: Duration::from_secs(6),
            }),
            ..test_options()
        },
        ..Setup::new("pair_pace")
    }
    .start()
    .await;
    let (_, rows) = h.customer(ANA, "three").await;
    let start = h.now();
    h.drain().await;
    assert_eq!(h.fake.sends().len(), 2, "the burst");
    let third = h.entry(rows[2]).await;
    assert_eq!(third.status, "pending");
    assert_eq!(third.attempts, 0);
    assert_eq!(third.next_attempt_at - start, chrono::Duration::seconds(6));
    h.advance_to_retry(rows[2]).await;
    h.drain().await;
    assert_eq!(h.entry(rows[2]).await.status, "sent");
}

/// Drains, advancing the virtual clock to each retry, until `id` is settled; returns the
/// waits between attempts in milliseconds.
async fn retry_until_settled(h: &Harness, id: i64) -> Vec<i64> {
    let mut waits = Vec::new();
    for _ in 0..30 {
        let before = h.now();
        h.drain().await;
        let e = h.entry(id).await;
        if e.status != "pending" {
            return waits;
        }
        waits.push((e.next_attempt_at - before).num_milliseconds());
        h.advance_to_retry(id).await;
    }
    panic!("message {id} never settled");
}

#[tokio::test]
async fn transient_131000_is_retried_with_a_cap_then_fails_with_the_reason() {
    let h = Setup::new("transient").start().await;
    h.fake.script(Script::always(Reply::graph_error(131000)));
    let (_, rows) = h.customer(ANA, "text").await;
    let waits = retry_until_settled(&h, rows[0]).await;

    let attempts = TRANSIENT_MAX_ATTEMPTS as usize + 1;
    assert_eq!(h.fake.sends().len(), attempts);
    assert_eq!(waits.len(), attempts - 1);
    // 1 s, 2 s, 4 s… each ±20 %.
    for (i, w) in waits.iter().enumerate() {
        let plain = (1000i64 << i).min(300_000);
        assert!(
            (plain * 8 / 10..=plain * 12 / 10).contains(w),
            "wait {i}: {w} ms, {waits:?}"
        );
    }
    let e = h.entry(rows[0]).await;
    assert_eq!(e.status, "failed");
    assert_eq!(e.error_code, Some(131000));
    assert_eq!(e.attempts, attempts as i64);
    let error = e.error.unwrap();
    assert!(
        error.starts_with(&format!(
            "gave up after {attempts} attempts: WhatsApp error 131000"
        )),
        "{error}"
    );
    assert!(error.contains("Something went wrong"), "{error}");
}

#[tokio::test]
async fn a_timeout_is_retried_and_the_next_attempt_goes() {
    let h = Setup {
        options: SenderOptions {
            request_timeout: Duration::from_millis(300),
            ..test_options()
        },
        ..Setup::new("timeout")
    }
    .start()
    .await;
    h.fake.script(Script::next(
        1,
        Reply::delayed(Duration::from_secs(2), Reply::Success),
    ));
    h.fake.script(Script::next(
        1,
        Reply::Http {
            status: 502,
            body: "<html>Bad gateway</html>".into(),
        },
    ));
    let (_, rows) = h.customer(ANA, "text").await;
    let id = rows[0];

    h.drain().await;
    let e = h.entry(id).await;
    assert_eq!(
        (e.status.as_str(), e.error_code, e.attempts),
        ("pending", None, 1)
    );
    assert!(
        e.error
            .as_deref()
            .unwrap()
            .starts_with("WhatsApp API unreachable"),
        "{e:?}"
    );

    h.advance_to_retry(id).await;
    h.drain().await;
    let e = h.entry(id).await;
    assert_eq!((e.status.as_str(), e.attempts), ("pending", 2));
    assert!(e.error.as_deref().unwrap().contains("HTTP 502"), "{e:?}");

    h.advance_to_retry(id).await;
    h.drain().await;
    let e = h.entry(id).await;
    assert_eq!((e.status.as_str(), e.attempts), ("sent", 3));
    let wamid = e.wamid.expect("the wamid is stored");
    assert!(
        h.fake
            .sends()
            .iter()
            .any(|s| s.wamid.as_ref() == Some(&wamid))
    );
}

#[tokio::test]
async fn transport_failures_are_capped_too() {
    let h = Setup::new("refused").start().await;
    let (_, rows) = h.customer(ANA, "text").await;
    // Nothing listens on this port.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let client = Client::with_http(
        http_client(Duration::from_secs(1), Duration::from_secs(2)),
        Endpoint::CloudApi {
            base_url: format!("http://{addr}"),
            version: String::new(),
            phone_number_id: PHONE_NUMBER_ID.into(),
            access_token: TOKEN.into(),
        },
    );
    let sender = Sender::with_client(h.runtime.clone(), h.name(), 80, client, test_options());
    for _ in 0..30 {
        sender.drain().await.unwrap();
        let e = h.entry(rows[0]).await;
        if e.status != "pending" {
            break;
        }
        h.advance_to_retry(rows[0]).await;
    }
    let e = h.entry(rows[0]).await;
    assert_eq!(e.status, "failed");
    assert_eq!(e.error_code, None);
    assert_eq!(e.attempts, i64::from(TRANSIENT_MAX_ATTEMPTS) + 1);
    let error = e.error.unwrap();
    assert!(
        error.starts_with("gave up after 11 attempts: WhatsApp API unreachable"),
        "{error}"
    );
}

#[tokio::test]
async fn permanent_errors_fail_at_once_with_the_reason() {
    let h = Setup::new("permanent").start().await;
    h.fake
        .script(Script::next_to(ANA, 1, Reply::graph_error(131026)));
    h.fake
        .script(Script::next_to(BEN, 1, Reply::graph_error(132001)));
    let (_, ana) = h.customer(ANA, "text").await;
    let (_, ben) = h.customer(BEN, "template").await;
    h.drain().await;

    let e = h.entry(ana[0]).await;
    assert_eq!((e.status.as_str(), e.error_code), ("failed", Some(131026)));
    assert_eq!(
        e.error.as_deref(),
        Some(
            "WhatsApp error 131026 (HTTP 400): (#131026) Message undeliverable: Message \
             undeliverable (fake)"
        )
    );
    let e = h.entry(ben[0]).await;
    assert_eq!((e.status.as_str(), e.error_code), ("failed", Some(132001)));
    assert!(
        e.error
            .as_deref()
            .unwrap()
            .contains("(HTTP 404): (#132001) Template name does not exist"),
        "{e:?}"
    );

    h.clock().advance(chrono::Duration::days(2));
    h.drain().await;
    assert_eq!(h.fake.sends().len(), 2, "never retried");
}

#[tokio::test]
async fn reengage_131047_queues_what_has_no_template_and_never_resends_free_form() {
    reengage(&Setup::new("reengage").start().await).await;
}

/// The same on PostgreSQL (skipped without `FLOWGATE_TEST_POSTGRES_URL`).
#[tokio::test]
async fn reengage_131047_queues_what_has_no_template_and_never_resends_free_form_on_postgres() {
    if let Some(h) = Setup::new("reengage").on_postgres().await {
        reengage(&h).await;
        h.clean_up().await;
    }
}

async fn reengage(h: &Harness) {
    h.fake.script(Script::next(1, Reply::graph_error(131047)));
    let (_, rows) = h.customer(ANA, "three").await;
    h.drain().await;
    // WhatsApp closed the window on the first message: it and the two behind it are decided
    // again as queued (no template fallback), at send time.
    assert_eq!(h.fake.sends().len(), 1);
    for id in &rows {
        let m = h.runtime.db.message(*id).await.unwrap().unwrap();
        assert_eq!(m.status, "queued", "message {id}");
        assert_eq!(m.decision.as_deref(), Some("queued"));
        let reason = m.reason.unwrap();
        assert!(reason.contains("131047"), "{reason}");
    }
    h.clock().advance(chrono::Duration::days(3));
    h.drain().await;
    assert_eq!(h.fake.sends().len(), 1, "never resent as free-form");

    // The customer writes again: the queue leaves first, in order, then the new reply.
    h.customer(ANA, "text").await;
    h.drain().await;
    let texts: Vec<String> = h
        .fake
        .sends()
        .iter()
        .skip(1)
        .map(|s| s.text().unwrap_or_default().to_string())
        .collect();
    assert_eq!(texts, ["one", "two", "three", "Plain text reply."]);
}

#[tokio::test]
async fn a_message_queued_at_send_time_keeps_its_full_queue_ttl() {
    let h = Setup::new("late_queue").start().await;
    let (_, rows) = h.customer(ANA, "text").await;
    // Nothing is sent for 8 days (a backlog, a stopped channel): the sender queues it then,
    // with queue_ttl (7 days) from that moment.
    h.clock().advance(chrono::Duration::days(8));
    h.drain().await;
    assert_eq!(h.entry(rows[0]).await.status, "queued");
    h.clock().advance(chrono::Duration::days(1));
    h.runtime.fire_due_timers().await.unwrap();
    // The customer writes on day 9: the message is flushed, not expired.
    h.customer(ANA, "text").await;
    h.drain().await;
    let m = h.runtime.db.message(rows[0]).await.unwrap().unwrap();
    assert_eq!(
        (m.status.as_str(), m.decision.as_deref()),
        ("sent", Some("send"))
    );
}

#[tokio::test]
async fn a_template_refused_with_131047_fails_and_is_not_sent_again() {
    let h = Setup::new("reengage_loop").start().await;
    h.fake.script(Script::always(Reply::graph_error(131047)));
    let (_, rows) = h.customer(ANA, "template").await;
    h.drain().await;
    h.clock().advance(chrono::Duration::minutes(5));
    h.drain().await;
    assert_eq!(
        h.fake.sends().len(),
        1,
        "the same template is not sent again"
    );
    let e = h.entry(rows[0]).await;
    assert_eq!((e.status.as_str(), e.error_code), ("failed", Some(131047)));
    assert_eq!(e.error.as_deref(), Some(REENGAGE_REASON));
}

#[tokio::test]
async fn reengage_131047_rewrites_to_the_step_template() {
    let h = Setup::new("reengage_template").start().await;
    h.fake.script(Script::next(1, Reply::graph_error(131047)));
    let (_, rows) = h.customer(ANA, "fallback").await;
    h.drain().await;
    let sends = h.fake.sends();
    assert_eq!(sends.len(), 2, "the free-form attempt, then the template");
    assert_eq!(sends[0].body["type"], "text");
    assert_eq!(sends[1].body["type"], "template");
    assert_eq!(sends[1].body["template"]["name"], "order_shipped");
    let m = h.runtime.db.message(rows[0]).await.unwrap().unwrap();
    assert_eq!(
        (m.status.as_str(), m.decision.as_deref()),
        ("sent", Some("rewritten"))
    );
    assert!(m.reason.unwrap().contains("131047"));
    // The record keeps what the flow asked for.
    assert_eq!(
        m.body["original"]["body"],
        "Your order A-1 shipped on Monday."
    );
}

#[tokio::test]
async fn a_message_planned_in_the_window_is_decided_again_when_sent_late() {
    let h = Setup::new("late_send").start().await;
    let (_, rows) = h.customer(ANA, "fallback").await;
    let (_, plain) = h.customer(BEN, "text").await;
    // A backlog: nothing is sent for 25 hours, and the window closes meanwhile.
    h.clock().advance(chrono::Duration::hours(25));
    h.drain().await;
    let sends = h.fake.sends();
    assert_eq!(sends.len(), 1, "only the template goes: {sends:?}");
    assert_eq!(sends[0].body["type"], "template");
    let m = h.runtime.db.message(rows[0]).await.unwrap().unwrap();
    assert_eq!(m.decision.as_deref(), Some("rewritten"));
    assert!(m.reason.unwrap().starts_with("window closed 1h2m ago"));
    let m = h.runtime.db.message(plain[0]).await.unwrap().unwrap();
    assert_eq!(
        (m.status.as_str(), m.decision.as_deref()),
        ("queued", Some("queued"))
    );
}

/// A reaction planned in the window but sent after it closed is skipped, never queued; the
/// location and card behind it, free-form messages without a template, are queued.
#[tokio::test]
async fn a_reaction_sent_late_is_skipped_and_the_rest_queued() {
    let h = Setup::new("late_reaction").start().await;
    let (_, rows) = h.customer(ANA, "rich").await;
    h.clock().advance(chrono::Duration::hours(25));
    h.drain().await;
    assert!(h.fake.sends().is_empty(), "{:?}", h.fake.sends());
    let decision = |m: &flowgate::store::MessageDetail| {
        (m.status.clone(), m.decision.clone().unwrap_or_default())
    };
    let reaction = h.runtime.db.message(rows[0]).await.unwrap().unwrap();
    assert_eq!(decision(&reaction), ("skipped".into(), "skipped".into()));
    assert!(
        reaction.reason.as_deref().unwrap().contains("reaction"),
        "{:?}",
        reaction.reason
    );
    for row in &rows[1..] {
        let m = h.runtime.db.message(*row).await.unwrap().unwrap();
        assert_eq!(decision(&m), ("queued".into(), "queued".into()), "{row}");
    }
}

#[tokio::test]
async fn marketing_opt_out_and_ecosystem_errors_fail_with_the_reason() {
    let h = Setup::new("policy_errors").start().await;
    h.fake
        .script(Script::next_to(ANA, 1, Reply::graph_error(131050)));
    h.fake
        .script(Script::next_to(BEN, 1, Reply::graph_error(131049)));
    let (_, ana) = h.customer(ANA, "template").await;
    let (_, ben) = h.customer(BEN, "template").await;
    h.drain().await;
    let e = h.entry(ana[0]).await;
    assert_eq!((e.status.as_str(), e.error_code), ("failed", Some(131050)));
    assert!(
        e.error
            .unwrap()
            .starts_with("the recipient stopped marketing messages")
    );
    let e = h.entry(ben[0]).await;
    assert_eq!((e.status.as_str(), e.error_code), ("failed", Some(131049)));
    assert!(e.error.unwrap().contains("wait 24 h"));
}

async fn account_error_stops_the_channel(code: i64, channel: &'static str) {
    let h = Setup {
        options: SenderOptions {
            batch: 1,
            ..test_options()
        },
        ..Setup::new(channel)
    }
    .start()
    .await;
    h.fake.script(Script::always(Reply::graph_error(code)));
    for (name, on) in [("sale_here", h.name()), ("sale_elsewhere", "another")] {
        let campaign = NewCampaign {
            name,
            channel: on,
            source: "campaign: sale",
            origin: CampaignOrigin::Api,
            next_run_at: None,
        };
        h.runtime
            .db
            .save_campaign(&campaign, h.now())
            .await
            .unwrap();
    }
    let mut rows = Vec::new();
    for wa_id in [ANA, BEN, CAL] {
        rows.extend(h.customer(wa_id, "text").await.1);
    }

    h.drain().await;
    assert_eq!(h.fake.sends().len(), 1, "nothing more after the stop");
    let stop = h
        .runtime
        .db
        .channel_stopped(h.name())
        .await
        .unwrap()
        .expect("the channel is stopped");
    assert_eq!(stop.code, Some(code));
    assert!(
        stop.reason.starts_with(&format!("WhatsApp error {code} ")),
        "{stop:?}"
    );
    for id in &rows {
        let e = h.entry(*id).await;
        assert_eq!(e.status, "pending", "kept for when the channel resumes");
        assert_eq!(e.attempts, 0);
        assert_eq!(e.lease_owner, None);
    }
    assert_eq!(h.entry(rows[0]).await.error_code, Some(code));
    // Every campaign on the number is paused with why; another number's goes on.
    let here = h.runtime.db.campaign("sale_here").await.unwrap().unwrap();
    assert!(here.paused);
    let why = here.pause_reason.unwrap();
    assert!(why.contains(&format!("WhatsApp error {code} ")), "{why}");
    let elsewhere = h
        .runtime
        .db
        .campaign("sale_elsewhere")
        .await
        .unwrap()
        .unwrap();
    assert!(!elsewhere.paused);
    assert_eq!(
        flowgate::metrics::counter_value("flowgate_channel_stops_total", &[("channel", channel)]),
        1
    );
    let g = gauges(&h.runtime.db, std::slice::from_ref(&h.channel))
        .await
        .unwrap();
    let value = |name: &str| g.iter().find(|x| x.0 == name).unwrap().3;
    assert_eq!(value("flowgate_channel_stopped"), 1.0);
    assert_eq!(value("flowgate_outbox_depth"), 3.0);

    // Later, still stopped: nothing goes, whatever the clock says.
    h.clock().advance(chrono::Duration::hours(1));
    h.drain().await;
    assert_eq!(h.fake.sends().len(), 1);

    // An operator fixes the account and resumes the channel: everything goes.
    h.fake.clear_scripts();
    assert!(
        h.runtime
            .db
            .resume_channel(h.name(), h.now())
            .await
            .unwrap()
    );
    h.drain().await;
    for id in &rows {
        assert_eq!(h.entry(*id).await.status, "sent");
    }
    assert_eq!(h.fake.sends().len(), 4);
    let g = gauges(&h.runtime.db, std::slice::from_ref(&h.channel))
        .await
        .unwrap();
    assert_eq!(
        g.iter()
            .find(|x| x.0 == "flowgate_channel_stopped")
            .unwrap()
            .3,
        0.0
    );
}

#[tokio::test]
async fn spam_limit_131048_stops_the_channel() {
    account_error_stops_the_channel(131048, "stopped_131048").await;
}

#[tokio::test]
async fn policy_block_368_stops_the_channel() {
    account_error_stops_the_channel(368, "stopped_368").await;
}

#[tokio::test]
async fn expired_token_190_stops_the_channel() {
    account_error_stops_the_channel(190, "stopped_190").await;
}

#[tokio::test]
async fn a_wrong_api_key_stops_a_360dialog_channel() {
    let h = Setup {
        provider: Provider::Dialog360,
        ..Setup::new("d360_bad_key")
    }
    .start()
    .await;
    let (_, rows) = h.customer(ANA, "text").await;
    let mut channel = h.channel.clone();
    channel.api_key = Some(flowgate::yaml::Secret::new("wrong-key"));
    let sender = Sender::new(h.runtime.clone(), &channel, test_options()).unwrap();
    sender.drain().await.unwrap();
    let stop = h
        .runtime
        .db
        .channel_stopped(h.name())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stop.code, Some(0));
    assert!(stop.reason.contains("Invalid api key"), "{stop:?}");
    assert_eq!(h.entry(rows[0]).await.status, "pending");
    assert!(
        !format!("{sender:?}").contains("wrong-key"),
        "credentials never print"
    );
}

#[tokio::test]
async fn throughput_paces_the_channel() {
    let h = Setup {
        throughput_mps: 10,
        system_clock: true,
        ..Setup::new("paced")
    }
    .start()
    .await;
    for i in 0..30 {
        h.customer(&format!("1555100{i:04}"), "text").await;
    }
    let started = std::time::Instant::now();
    let mut sent = 0;
    while sent < 30 {
        sent += h.drain().await;
        assert!(started.elapsed() < Duration::from_secs(60));
    }
    let elapsed = started.elapsed();
    assert_eq!(h.fake.sends().len(), 30);
    assert!(
        elapsed >= Duration::from_secs(2),
        "30 messages at 10 per second took {elapsed:?}"
    );
    let sends = h.fake.sends();
    let spread = sends[29].at.duration_since(sends[0].at);
    assert!(spread >= Duration::from_secs(2), "{spread:?}");
}

#[tokio::test]
async fn shutdown_finishes_in_flight_sends_and_releases_the_rest() {
    // Three messages a second, one at a time: the sender claims all three, sends the first
    // (which takes 300 ms at the fake) and holds the others until their tokens are due.
    let h = Setup {
        throughput_mps: 3,
        ..Setup::new("shutdown")
    }
    .start()
    .await;
    h.fake.script(Script::always(Reply::delayed(
        Duration::from_millis(300),
        Reply::Success,
    )));
    let mut rows = Vec::new();
    for wa_id in [ANA, BEN, CAL] {
        rows.extend(h.customer(wa_id, "text").await.1);
    }
    let sender = Sender::new(h.runtime.clone(), &h.channel, test_options()).unwrap();
    let owner = sender.owner().to_string();
    let handle = sender.spawn();
    tokio::time::timeout(Duration::from_secs(5), async {
        while h.fake.mark_reads().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    let claimed = h.entries().await;
    assert!(
        claimed
            .iter()
            .all(|e| e.status == "sent" || e.lease_owner.as_deref() == Some(&*owner)),
        "all three are claimed: {claimed:?}"
    );

    tokio::time::timeout(Duration::from_secs(5), handle.shutdown())
        .await
        .expect("shutdown is prompt");
    let sends = h.fake.wait_for_sends(1, Duration::from_secs(1)).await;
    let entries = h.entries().await;
    let sent: Vec<_> = entries.iter().filter(|e| e.status == "sent").collect();
    assert_eq!(
        sent.len(),
        sends.len(),
        "every send that went out finished and was recorded: {entries:?}"
    );
    for e in &sent {
        assert!(sends.iter().any(|s| s.wamid == e.wamid), "{e:?}");
    }
    let released: Vec<_> = entries.iter().filter(|e| e.status != "sent").collect();
    assert!(!released.is_empty(), "the last token was still 600 ms away");
    for e in released {
        assert_eq!(e.status, "pending", "released: {e:?}");
        assert_eq!((e.lease_owner.as_deref(), e.lease_until), (None, None));
        assert_eq!(e.attempts, 0, "an unsent claim does not count");
    }
    assert_eq!(
        h.runtime.db.outbox_depth(h.name()).await.unwrap(),
        3 - sends.len() as i64
    );
}

#[tokio::test]
async fn release_leases_returns_claimed_rows_to_pending() {
    let h = Setup::new("release").start().await;
    let (_, rows) = h.customer(ANA, "three").await;
    let (_, ben) = h.customer(BEN, "text").await;
    let db = &h.runtime.db;
    let claimed = db
        .claim_outbox(h.name(), h.now(), 10, "worker-a", Duration::from_secs(60))
        .await
        .unwrap();
    // One per contact: Ana's first, Ben's only.
    assert_eq!(
        claimed.iter().map(|r| r.id).collect::<Vec<_>>(),
        [rows[0], ben[0]]
    );
    assert!(claimed.iter().all(|r| r.first_reply && !r.reclaimed));
    assert_eq!(claimed[0].wa_id, ANA);
    assert_eq!(claimed[0].outbound().unwrap().content.body(), "one");
    // Nothing else is claimable while they are out.
    assert!(
        db.claim_outbox(h.name(), h.now(), 10, "worker-b", Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(db.release_leases("worker-b", h.now()).await.unwrap(), 0);
    assert_eq!(db.release_leases("worker-a", h.now()).await.unwrap(), 2);
    for e in h.entries().await {
        assert_eq!((e.status.as_str(), e.attempts), ("pending", 0));
        assert_eq!(e.lease_owner, None);
    }
    let again = db
        .claim_outbox(h.name(), h.now(), 10, "worker-b", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(again.len(), 2);
    assert_eq!(again[0].idempotency_key, format!("fg-{}", rows[0]));
}

#[tokio::test]
async fn an_expired_lease_is_claimed_again_with_the_same_key() {
    expired_lease(&Setup::new("expired").start().await).await;
}

/// The same on PostgreSQL (skipped without `FLOWGATE_TEST_POSTGRES_URL`).
#[tokio::test]
async fn an_expired_lease_is_claimed_again_with_the_same_key_on_postgres() {
    if let Some(h) = Setup::new("expired").on_postgres().await {
        expired_lease(&h).await;
        h.clean_up().await;
    }
}

async fn expired_lease(h: &Harness) {
    let (_, rows) = h.customer(ANA, "three").await;
    let id = rows[0];
    // A sender claims Ana's first message and dies before recording anything.
    let dead = h
        .runtime
        .db
        .claim_outbox(
            h.name(),
            h.now(),
            10,
            "dead-sender",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);

    // Within the lease nothing of Ana's goes (her later messages wait their turn).
    h.clock().advance(chrono::Duration::seconds(20));
    assert_eq!(h.drain().await, 0);
    assert!(h.fake.requests().is_empty());

    h.clock().advance(chrono::Duration::seconds(11));
    h.drain().await;
    let sends = h.fake.sends();
    assert_eq!(
        sends.iter().map(|s| s.text().unwrap()).collect::<Vec<_>>(),
        ["one", "two", "three"]
    );
    assert_eq!(
        sends[0].body["biz_opaque_callback_data"],
        format!("fg-{id}"),
        "the same idempotency key as the lost attempt"
    );
    let e = h.entry(id).await;
    assert_eq!((e.status.as_str(), e.attempts), ("sent", 2));
    assert_eq!(e.wamid, sends[0].wamid);
    // The first attempt may have reached the customer: no second typing indicator.
    assert!(h.fake.mark_reads().is_empty());
}

#[tokio::test]
async fn a_stale_sender_cannot_overwrite_a_reclaimed_row() {
    let h = Setup::new("stale").start().await;
    let (_, rows) = h.customer(ANA, "text").await;
    let db = &h.runtime.db;
    let id = rows[0];
    db.claim_outbox(h.name(), h.now(), 1, "slow", Duration::from_secs(30))
        .await
        .unwrap();
    h.clock().advance(chrono::Duration::seconds(31));
    let again = db
        .claim_outbox(h.name(), h.now(), 1, "fresh", Duration::from_secs(30))
        .await
        .unwrap();
    assert!(again[0].reclaimed);
    assert_eq!(again[0].attempts, 2);
    // The slow sender's failure report no longer applies.
    assert!(
        !db.record_failed(id, "slow", Some(131026), "late", h.now())
            .await
            .unwrap()
    );
    assert!(
        !db.record_retry(id, "slow", h.now(), None, "late", h.now())
            .await
            .unwrap()
    );
    // But an accepted send is a fact, whoever reports it; the first wamid stays.
    assert!(db.record_sent(id, "wamid.first", h.now()).await.unwrap());
    assert!(db.record_sent(id, "wamid.second", h.now()).await.unwrap());
    let e = h.entry(id).await;
    assert_eq!(
        (e.status.as_str(), e.wamid.as_deref()),
        ("sent", Some("wamid.first"))
    );
}

#[tokio::test]
async fn a_recipient_that_is_no_phone_or_bsuid_fails_without_a_request() {
    let h = Setup::new("badid").start().await;
    let (_, ana) = h.customer(ANA, "text").await;
    let (_, ben) = h.customer(BEN, "text").await;
    let (_, cal) = h.customer(CAL, "text").await;
    // Rows written by other means than a webhook (old data, a hand edit): the last guard.
    let pool = h.runtime.db.sqlite_pool().expect("tests use SQLite");
    for (from, to) in [(ANA, ""), (BEN, "+\u{0}")] {
        sqlx::query("UPDATE contacts SET wa_id = $1 WHERE wa_id = $2")
            .bind(to)
            .bind(from)
            .execute(pool)
            .await
            .unwrap();
    }
    h.drain().await;
    let sends = h.fake.sends();
    assert_eq!(
        sends.iter().map(|s| s.to()).collect::<Vec<_>>(),
        [Some(CAL.to_string())],
        "only the valid recipient is posted"
    );
    // Nor marked as read: Ana's and Ben's messages never left the guard.
    assert!(h.fake.mark_reads().len() <= 1, "{:?}", h.fake.mark_reads());
    assert_eq!(
        h.fake.requests().len(),
        sends.len() + h.fake.mark_reads().len()
    );
    for (id, why) in [
        (ana[0], "not sent: the recipient `` has 0 digits"),
        (
            ben[0],
            "not sent: the recipient `+\\0` is not a phone number",
        ),
    ] {
        let e = h.entry(id).await;
        assert_eq!(e.status, "failed");
        let error = e.error.unwrap_or_default();
        assert!(error.starts_with(why), "{error}");
        assert!(error.ends_with("fix the contact's wa_id"), "{error}");
    }
    assert_eq!(h.entry(cal[0]).await.status, "sent");
}

#[tokio::test]
async fn a_sent_status_settles_an_ambiguous_row_and_the_next_reply_goes_at_once() {
    settle(&Setup::new("settle").start().await).await;
}

/// The same on PostgreSQL (skipped without `FLOWGATE_TEST_POSTGRES_URL`).
#[tokio::test]
async fn a_sent_status_settles_an_ambiguous_row_and_the_next_reply_goes_at_once_on_postgres() {
    if let Some(h) = Setup::new("settle").on_postgres().await {
        settle(&h).await;
        h.clean_up().await;
    }
}

async fn settle(h: &Harness) {
    let (_, rows) = h.customer(ANA, "three").await;
    let db = &h.runtime.db;
    // A process claimed Ana's first message, posted it and died before recording the
    // answer: the row is `sending` under a lease that has long to run.
    let lease = Duration::from_secs(600);
    let dead = db
        .claim_outbox(h.name(), h.now(), 10, "dead-process", lease)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        h.drain().await,
        0,
        "within the lease, Ana's later messages wait"
    );

    // WhatsApp's `sent` status for it arrives, echoing the idempotency key.
    let key = format!("fg-{}", rows[0]);
    let change = flowgate::store::StatusChange {
        wamid: "wamid.lost-response",
        status: "sent",
        error_code: None,
        error: None,
        idempotency_key: Some(&key),
    };
    let outcome = db.apply_status(h.name(), &change, h.now()).await.unwrap();
    assert_eq!(
        outcome,
        flowgate::store::StatusOutcome::Updated {
            message_id: rows[0]
        }
    );
    let first = h.entry(rows[0]).await;
    assert_eq!(
        (first.status.as_str(), first.wamid.as_deref()),
        ("sent", Some("wamid.lost-response"))
    );
    assert_eq!(
        (first.lease_until, first.lease_owner),
        (None, None),
        "the status ended the dead process's lease"
    );

    // No clock moved: the rest of Ana's messages go now, the first is not sent again.
    h.drain().await;
    let sends = h.fake.sends();
    assert_eq!(
        sends.iter().map(|s| s.text().unwrap()).collect::<Vec<_>>(),
        ["two", "three"]
    );
}
