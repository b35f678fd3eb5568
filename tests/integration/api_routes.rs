//! The admin API's routes on the real server (port 0, a SQLite file, the fake Graph API on
//! 127.0.0.1): contacts, conversations, the outbox and the queue, channels, templates sync,
//! flows with their diagnostics; paging, filters, error codes, the bearer token.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flowgate::app;
use flowgate::clock::SystemClock;
use flowgate::store::TurnWrite;
use serde_json::{Value, json};

use crate::support::fake_graph::{FakeAuth, FakeGraph, Reply, Script};
use crate::support::{self, Running};

pub(crate) const TOKEN: &str = "api-test-token";
const PHONE: &str = "110000000000001";
const WABA: &str = "100000000000001";

/// The server on the repository's flows and scripts, a copy of its templates (a sync writes
/// them), a sandbox channel `main` (the default) and a cloud_api channel `wa` on `fake`.
pub(crate) struct Api {
    pub(crate) server: Running,
    pub(crate) fake: FakeGraph,
    pub(crate) dir: tempfile::TempDir,
    /// The project the server runs (to build another server on it).
    pub(crate) loaded: app::Loaded,
}

impl Api {
    pub(crate) async fn start() -> Self {
        Self::start_with(false).await
    }

    /// [`Api::start`]; with `own_flows`, on a copy of the repository's flows in its
    /// directory (`dir/flows`), for a test to change.
    pub(crate) async fn start_with(own_flows: bool) -> Self {
        let fake = FakeGraph::start(FakeAuth::cloud_api(PHONE, "graph-token")).await;
        let dir = tempfile::tempdir().unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let flows = if own_flows {
            let flows = dir.path().join("flows");
            std::fs::create_dir(&flows).unwrap();
            for entry in std::fs::read_dir(root.join("flows")).unwrap() {
                let entry = entry.unwrap();
                std::fs::copy(entry.path(), flows.join(entry.file_name())).unwrap();
            }
            flows
        } else {
            root.join("flows")
        };
        std::fs::copy(
            root.join("templates.yaml"),
            dir.path().join("templates.yaml"),
        )
        .unwrap();
        let config = format!(
            "flows: {}\nscripts: {}\ntemplates: {}\nadmin:\n  token: {TOKEN}\n\
             channels:\n  - name: main\n    provider: sandbox\n  - name: wa\n    \
             provider: cloud_api\n    phone_number_id: \"{PHONE}\"\n    waba_id: \"{WABA}\"\n    \
             access_token: graph-token\n    app_secret: test-secret\n    \
             verify_token: test-verify\n    api_base: {}\n",
            flows.display(),
            root.join("scripts").display(),
            dir.path().join("templates.yaml").display(),
            fake.cloud_api_base(),
        );
        let path = dir.path().join("flowgate.yaml");
        std::fs::write(&path, config).unwrap();
        let loaded = app::load(Some(&path)).unwrap_or_else(|d| panic!("{d:?}"));
        let db = format!("sqlite://{}", dir.path().join("db.sqlite").display());
        let server = Running::start(&loaded, &db, Arc::new(SystemClock)).await;
        Self {
            server,
            fake,
            dir,
            loaded,
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}/api{path}", self.server.base)
    }

    /// `GET /api{path}` with the token: status and JSON body.
    pub(crate) async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .server
            .client
            .get(self.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// `{method} /api{path}` with the token and a JSON body.
    pub(crate) async fn send(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self
            .server
            .client
            .request(method, self.url(path))
            .bearer_auth(TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let r = request.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// A customer's message through the sandbox door (opens their window on `main`).
    pub(crate) async fn customer_says(&self, from: &str, text: &str) {
        self.customer_sends(json!({"from": from, "text": text}))
            .await;
    }

    /// A customer's message (`{"from", "text" | "button" | "list"}`) through the sandbox door.
    pub(crate) async fn customer_sends(&self, message: Value) {
        let r = self
            .server
            .client
            .post(format!("{}/sandbox/messages", self.server.base))
            .json(&message)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }

    /// Contacts of `channel` from CSV lines (`wa_id,name,tags`), through the API.
    async fn import(&self, channel: &str, lines: &[&str]) {
        let csv = format!("wa_id,name,tags\n{}\n", lines.join("\n"));
        let r = self
            .server
            .client
            .post(self.url(&format!("/contacts/import?channel={channel}")))
            .bearer_auth(TOKEN)
            .header("content-type", "text/csv")
            .body(csv)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }

    /// Every item of a list, page by page (`limit` each), following `next_cursor`.
    async fn all_pages(&self, path: &str, key: &str, limit: usize) -> (Vec<Value>, usize) {
        let sep = if path.contains('?') { '&' } else { '?' };
        let (mut items, mut pages, mut after) = (Vec::new(), 0, None::<i64>);
        for _ in 0..100 {
            let cursor = after.map_or(String::new(), |a| format!("&after={a}"));
            let (status, body) = self.get(&format!("{path}{sep}limit={limit}{cursor}")).await;
            assert_eq!(status, 200, "{body}");
            let page = body[key].as_array().unwrap();
            assert!(page.len() <= limit, "{body}");
            items.extend(page.iter().cloned());
            pages += 1;
            match body["next_cursor"].as_i64() {
                Some(next) => after = Some(next),
                None => return (items, pages),
            }
        }
        panic!("the cursor never ended: {path}");
    }

    /// Opens `contact`'s window on `channel` as a customer's message would, without the
    /// turn that would also flush their queue.
    async fn open_window(&self, channel: &str, contact: &str) {
        let db = &self.server.db;
        let conversation = db.load_conversation(channel, contact).await.unwrap();
        let mut c = conversation.contact.clone();
        let now = chrono::Utc::now();
        c.last_customer_message_at = Some(now);
        let write = TurnWrite {
            session: conversation.session.as_ref(),
            ..TurnWrite::new(channel, conversation.contact_id, &c, now)
        };
        db.commit_turn(&write).await.unwrap();
    }
}

fn codes(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no code>")
}

fn contacts_of(items: &[Value]) -> Vec<&str> {
    items
        .iter()
        .map(|c| c["contact"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn contacts_list_by_tag_search_and_window_page_by_cursor() {
    let api = Api::start().await;
    api.import(
        "main",
        &[
            "15550000001,Ada Lovelace,vip;newsletter",
            "15550000002,Bob,newsletter",
            "15550000003,Cleo,vip",
            "15550000004,Dan_ 100%,",
            "15550000005,Eve,",
        ],
    )
    .await;
    api.customer_says("15550000002", "hello").await;

    // Every contact, two at a time: three pages, each contact once.
    let (all, pages) = api.all_pages("/contacts", "contacts", 2).await;
    assert_eq!(
        contacts_of(&all),
        [
            "15550000001",
            "15550000002",
            "15550000003",
            "15550000004",
            "15550000005"
        ]
    );
    assert_eq!(pages, 3);

    let (status, vip) = api.get("/contacts?tag=vip").await;
    assert_eq!(status, 200);
    assert_eq!(
        contacts_of(vip["contacts"].as_array().unwrap()),
        ["15550000001", "15550000003"]
    );
    // By name, case as SQLite's LIKE (ASCII case-insensitive), and by part of the number.
    let (_, by_name) = api.get("/contacts?search=lovelace").await;
    assert_eq!(
        contacts_of(by_name["contacts"].as_array().unwrap()),
        ["15550000001"]
    );
    let (_, by_number) = api.get("/contacts?search=0000005").await;
    assert_eq!(
        contacts_of(by_number["contacts"].as_array().unwrap()),
        ["15550000005"]
    );
    // `%` and `_` are matched as themselves.
    let (_, literal) = api.get("/contacts?search=_%20100%25").await;
    assert_eq!(
        contacts_of(literal["contacts"].as_array().unwrap()),
        ["15550000004"]
    );

    let (_, open) = api.get("/contacts?window=open").await;
    let open = open["contacts"].as_array().unwrap();
    assert_eq!(contacts_of(open), ["15550000002"]);
    assert_eq!(open[0]["window"]["state"], "open");
    assert!(open[0]["window"]["closes_in_seconds"].as_i64().unwrap() > 0);
    let (_, closed) = api.get("/contacts?window=closed").await;
    assert_eq!(closed["contacts"].as_array().unwrap().len(), 4);

    // Bad paging and filters are JSON errors that say which.
    let (status, body) = api.get("/contacts?limit=0").await;
    assert_eq!((status, codes(&body)), (400, "invalid_limit"), "{body}");
    let (status, body) = api.get("/contacts?window=ajar").await;
    assert_eq!((status, codes(&body)), (400, "invalid_query"), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("window")
    );
    let (status, body) = api.get("/contacts?channel=nope").await;
    assert_eq!((status, codes(&body)), (404, "unknown_channel"));
    api.server.shutdown().await;
}

#[tokio::test]
async fn a_contact_is_read_and_tagged_and_an_unknown_one_is_404() {
    let api = Api::start().await;
    api.import("main", &["15550000011,Ada,vip"]).await;

    let (status, ada) = api.get("/contacts/15550000011").await;
    assert_eq!(status, 200, "{ada}");
    assert_eq!(ada["name"], "Ada");
    assert_eq!(ada["tags"], json!(["vip"]));
    assert_eq!(ada["window"]["state"], "never");

    let (status, tagged) = api
        .send(
            "POST",
            "/contacts/15550000011/tags",
            Some(json!({"tags": ["gold", " beta "]})),
        )
        .await;
    assert_eq!(status, 200, "{tagged}");
    assert_eq!(tagged["tags"], json!(["beta", "gold", "vip"]));
    let (status, untagged) = api
        .send("DELETE", "/contacts/15550000011/tags/vip", None)
        .await;
    assert_eq!(status, 200, "{untagged}");
    assert_eq!(untagged["tags"], json!(["beta", "gold"]));
    // The change is stored: the tag filter sees it.
    let (_, gold) = api.get("/contacts?tag=gold").await;
    assert_eq!(
        contacts_of(gold["contacts"].as_array().unwrap()),
        ["15550000011"]
    );

    let (status, body) = api.get("/contacts/15559999999").await;
    assert_eq!((status, codes(&body)), (404, "unknown_contact"));
    let (status, body) = api
        .send("DELETE", "/contacts/15559999999/tags/vip", None)
        .await;
    assert_eq!((status, codes(&body)), (404, "unknown_contact"));
    let (status, body) = api
        .send(
            "DELETE",
            "/contacts/15550000011/tags/vip?channel=nope",
            None,
        )
        .await;
    assert_eq!((status, codes(&body)), (404, "unknown_channel"));
    let (status, body) = api
        .send(
            "POST",
            "/contacts/15559999999/tags",
            Some(json!({"tags": ["x"]})),
        )
        .await;
    assert_eq!((status, codes(&body)), (404, "unknown_contact"));
    let (status, body) = api
        .send(
            "POST",
            "/contacts/15550000011/tags",
            Some(json!({"tags": [""]})),
        )
        .await;
    assert_eq!((status, codes(&body)), (422, "invalid_tag"));
    let (status, body) = api
        .send(
            "POST",
            "/contacts/15550000011/tags",
            Some(json!({"tag": "x"})),
        )
        .await;
    assert_eq!((status, codes(&body)), (400, "invalid_body"));
    api.server.shutdown().await;
}

#[tokio::test]
async fn conversations_list_by_window_and_handoff() {
    let api = Api::start().await;
    api.import("main", &["15550000021,Quiet,"]).await;
    api.customer_says("15550000022", "hi").await;
    api.customer_says("15550000023", "hi").await;
    // More options, then "Talk to a person": a handoff.
    api.customer_sends(json!({"from": "15550000023", "button": "more"}))
        .await;
    api.customer_sends(json!({"from": "15550000023", "list": "human"}))
        .await;

    let (status, body) = api.get("/conversations").await;
    assert_eq!(status, 200, "{body}");
    let list = body["conversations"].as_array().unwrap();
    assert_eq!(
        contacts_of(list),
        ["15550000022", "15550000023"],
        "an imported contact without messages is no conversation"
    );
    assert_eq!(list[0]["session"]["flow"], "main_menu");
    assert_eq!(list[0]["handoff"], Value::Null);

    let (_, with_person) = api.get("/conversations?handoff=true").await;
    let with_person = with_person["conversations"].as_array().unwrap();
    assert_eq!(contacts_of(with_person), ["15550000023"], "{with_person:?}");
    assert_eq!(with_person[0]["handoff"], "support");
    assert_eq!(with_person[0]["session"]["waiting"], "handoff");
    let (_, with_bot) = api.get("/conversations?handoff=false").await;
    assert_eq!(
        contacts_of(with_bot["conversations"].as_array().unwrap()),
        ["15550000022"]
    );
    let (_, open) = api.get("/conversations?window=open").await;
    assert_eq!(open["conversations"].as_array().unwrap().len(), 2);
    let (_, closed) = api.get("/conversations?window=closed").await;
    assert_eq!(closed["conversations"].as_array().unwrap().len(), 0);
    let (pages, n) = api.all_pages("/conversations", "conversations", 1).await;
    assert_eq!(
        (pages.len(), n),
        (2, 3),
        "two full pages, then an empty one"
    );

    // The handoff ends through the API, and the list follows.
    let (status, body) = api
        .send("POST", "/conversations/15550000023/resume", None)
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, with_person) = api.get("/conversations?handoff=true").await;
    assert_eq!(with_person["conversations"], json!([]));
    api.server.shutdown().await;
}

#[tokio::test]
async fn an_agent_message_with_an_idempotency_key_is_sent_once() {
    let api = Api::start().await;
    api.customer_says("15550000031", "hi").await;
    let client = &api.server.client;
    let post = |key: Option<&'static str>, to: &'static str| {
        let mut r = client
            .post(api.url(&format!("/conversations/{to}/messages")))
            .bearer_auth(TOKEN)
            .json(&json!({"text": "An agent here."}));
        if let Some(key) = key {
            r = r.header("Idempotency-Key", key);
        }
        async move {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let outbound = || async {
        let (_, c) = api.get("/conversations/15550000031").await;
        c["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| {
                m["body"]["origin"]["kind"] == "agent"
                    || m["body"].to_string().contains("An agent here.")
            })
            .count()
    };

    let (first_status, first) = post(Some("key-1"), "15550000031").await;
    assert_eq!(first_status, 201, "{first}");
    assert_eq!(first["decision"], "send");
    let (again_status, again) = post(Some("key-1"), "15550000031").await;
    assert_eq!(again_status, 200, "{again}");
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["replayed"], true);
    assert_eq!(outbound().await, 1, "the retry sent nothing");

    // The same key for another contact is refused; no key sends every time.
    let (status, body) = post(Some("key-1"), "15550000032").await;
    assert_eq!((status, codes(&body)), (409, "idempotency_key_reused"));
    assert_eq!(post(None, "15550000031").await.0, 201);
    assert_eq!(post(None, "15550000031").await.0, 201);
    assert_eq!(outbound().await, 3);
    api.server.shutdown().await;
}

#[tokio::test]
async fn the_outbox_lists_decisions_by_status_and_channel() {
    let api = Api::start().await;
    api.customer_says("15550000041", "hi").await;
    // Outside any window, an agent's text waits in the queue.
    let (status, queued) = api
        .send(
            "POST",
            "/conversations/15550000042/messages",
            Some(json!({"text": "Are you there?"})),
        )
        .await;
    assert_eq!(status, 201, "{queued}");
    assert_eq!(queued["decision"], "queued");

    let (all, _) = api.all_pages("/outbox?channel=main", "messages", 1).await;
    assert!(all.len() >= 2, "{all:?}");
    assert!(all.iter().all(|m| m["channel"] == "main"));
    assert!(
        all.iter()
            .all(|m| m["decision"].is_string() && m["status"].is_string())
    );
    let (_, sent) = api.get("/outbox?status=sent").await;
    let sent = sent["messages"].as_array().unwrap();
    assert!(!sent.is_empty());
    assert!(
        sent.iter()
            .all(|m| m["status"] == "sent" && m["contact"] == "15550000041")
    );
    let (_, waiting) = api.get("/outbox?status=queued").await;
    let waiting = waiting["messages"].as_array().unwrap();
    assert_eq!(waiting.len(), 1);
    assert_eq!(waiting[0]["id"], queued["id"]);
    assert!(
        waiting[0]["reason"].as_str().unwrap().contains("window"),
        "{waiting:?}"
    );
    let (_, none) = api.get("/outbox?channel=wa").await;
    assert_eq!(none["messages"], json!([]));
    assert_eq!(none["next_cursor"], Value::Null);
    let (status, body) = api.get("/outbox?channel=nope").await;
    assert_eq!((status, codes(&body)), (404, "unknown_channel"));
    api.server.shutdown().await;
}

#[tokio::test]
async fn a_queued_message_is_retried_when_the_window_opens_or_cancelled() {
    let api = Api::start().await;
    let shared = &api;
    let agent = |to: &'static str, text: &'static str| async move {
        let path = format!("/conversations/{to}/messages");
        shared
            .send("POST", &path, Some(json!({"channel": "wa", "text": text})))
            .await
    };
    let (_, first) = agent("15550000051", "First").await;
    let (_, second) = agent("15550000052", "Second").await;
    assert_eq!(
        (first["decision"].as_str(), second["decision"].as_str()),
        (Some("queued"), Some("queued"))
    );

    let (status, queue) = api.get("/queue?channel=wa").await;
    assert_eq!(status, 200, "{queue}");
    let items = queue["messages"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{queue}");
    assert!(items[0]["age_seconds"].as_i64().unwrap() >= 0);
    assert!(items[0]["expires_in_seconds"].as_i64().unwrap() > 0);
    assert!(items[0]["expires_at"].is_string());

    // Still outside the window: the retry decides the same and changes nothing.
    let id = first["id"].as_i64().unwrap();
    let (status, still) = api.send("POST", &format!("/queue/{id}/retry"), None).await;
    assert_eq!(status, 200, "{still}");
    assert_eq!(
        (still["decision"].as_str(), still["status"].as_str()),
        (Some("queued"), Some("queued"))
    );
    assert!(api.fake.sends().is_empty());

    // The window opened: the retry sends it through the outbox to the Graph API.
    api.open_window("wa", "15550000051").await;
    let (status, retried) = api.send("POST", &format!("/queue/{id}/retry"), None).await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(
        (retried["decision"].as_str(), retried["status"].as_str()),
        (Some("send"), Some("pending"))
    );
    let sends = api.fake.wait_for_sends(1, Duration::from_secs(30)).await;
    assert_eq!(sends[0].text(), Some("First"));
    let (status, body) = api.send("POST", &format!("/queue/{id}/retry"), None).await;
    assert_eq!((status, codes(&body)), (409, "not_queued"));

    let other = second["id"].as_i64().unwrap();
    let (status, cancelled) = api
        .send("POST", &format!("/queue/{other}/cancel"), None)
        .await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    let (_, queue) = api.get("/queue").await;
    assert_eq!(queue["messages"], json!([]));
    let (_, message) = api.get(&format!("/messages/{other}")).await;
    assert_eq!(message["status"], "cancelled");
    assert_eq!(message["reason"], "cancelled by an operator");
    let (status, body) = api
        .send("POST", &format!("/queue/{other}/cancel"), None)
        .await;
    assert_eq!((status, codes(&body)), (409, "not_queued"));

    let (status, body) = api.send("POST", "/queue/999999/retry", None).await;
    assert_eq!((status, codes(&body)), (404, "unknown_message"));
    let (status, body) = api.send("POST", "/queue/abc/cancel", None).await;
    assert_eq!((status, codes(&body)), (400, "invalid_path"));
    assert_eq!(
        api.fake.sends().len(),
        1,
        "the cancelled message never left"
    );
    api.server.shutdown().await;
}

#[tokio::test]
async fn a_channel_stopped_by_131048_is_listed_and_resumed_by_an_operator() {
    let api = Api::start().await;
    api.fake.script(Script::next(1, Reply::graph_error(131048)));
    let template = json!({"channel": "wa", "template": {
        "name": "order_shipped", "language": "en_US", "params": ["A1", "today"]}});
    let (status, sent) = api
        .send(
            "POST",
            "/conversations/15550000061/messages",
            Some(template),
        )
        .await;
    assert_eq!(status, 201, "{sent}");
    support::eventually("the channel stops on 131048", || async {
        let (_, list) = api.get("/channels").await;
        list["channels"][1]["state"] == "stopped"
    })
    .await;
    let (_, list) = api.get("/channels").await;
    let wa = &list["channels"][1];
    assert_eq!(wa["name"], "wa");
    assert_eq!(wa["provider"], "cloud_api");
    assert_eq!(wa["stopped"]["code"], 131048);
    assert_eq!(wa["outbox_depth"], 1, "the message waits for the resume");
    assert_eq!(list["channels"][0]["state"], "sending");

    let (status, resumed) = api.send("POST", "/channels/wa/resume", None).await;
    assert_eq!(status, 200, "{resumed}");
    assert_eq!(resumed["state"], "sending");
    let sends = api.fake.wait_for_sends(2, Duration::from_secs(30)).await;
    assert_eq!(sends.len(), 2, "sent again after the resume");
    support::eventually("the outbox empties", || async {
        let (_, list) = api.get("/channels").await;
        list["channels"][1]["outbox_depth"] == 0
    })
    .await;

    let (status, body) = api.send("POST", "/channels/wa/resume", None).await;
    assert_eq!((status, codes(&body)), (409, "not_stopped"));
    let (status, body) = api.send("POST", "/channels/nope/resume", None).await;
    assert_eq!((status, codes(&body)), (404, "unknown_channel"));
    api.server.shutdown().await;
}

#[tokio::test]
async fn templates_sync_through_the_api_writes_the_registry_and_the_server_uses_it() {
    let api = Api::start().await;
    api.fake.serve_templates(
        WABA,
        vec![vec![json!({
            "name": "order_shipped", "language": "en_US", "status": "PAUSED",
            "category": "UTILITY", "id": "91",
            "components": [{"type": "BODY", "text": "Your order {{1}} shipped on {{2}}."}]
        })]],
    );
    let (status, body) = api.send("POST", "/templates/sync", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["summary"]
            .as_str()
            .unwrap()
            .starts_with("synced 1 template (1 paused) from channel wa"),
        "{body}"
    );
    assert_eq!(body["reloaded"], true, "{body}");
    let file = std::fs::read_to_string(api.dir.path().join("templates.yaml")).unwrap();
    assert!(file.contains("status: paused"), "{file}");
    let (_, list) = api.get("/templates").await;
    let shipped = list["templates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "order_shipped")
        .unwrap()
        .clone();
    assert_eq!(shipped["status"], "paused");

    let (status, body) = api.send("POST", "/templates/sync?channel=main", None).await;
    assert_eq!((status, codes(&body)), (422, "not_syncable"), "{body}");
    let (status, body) = api.send("POST", "/templates/sync?channel=nope", None).await;
    assert_eq!((status, codes(&body)), (404, "unknown_channel"));
    api.server.shutdown().await;
}

#[tokio::test]
async fn flows_carry_their_validation_state() {
    let api = Api::start().await;
    let (status, body) = api.get("/flows").await;
    assert_eq!(status, 200, "{body}");
    let flows = body["flows"].as_array().unwrap();
    assert!(flows.iter().any(|f| f["id"] == "main_menu"));
    assert!(flows.iter().all(|f| f["valid"] == true), "{body}");
    assert!(flows.iter().all(|f| f["diagnostics"].is_array()));
    assert_eq!(body["errors"], 0);
    api.server.shutdown().await;
}

#[tokio::test]
async fn a_conversation_shows_each_message_with_its_decision_and_reason() {
    let api = Api::start().await;
    api.customer_says("15550000071", "hi").await;
    let (status, c) = api.get("/conversations/15550000071").await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["channel"], "main");
    assert_eq!(c["window"]["state"], "open");
    assert_eq!(c["session"]["flow"], "main_menu");
    assert_eq!(c["handoff"], Value::Null);
    let messages = c["messages"].as_array().unwrap();
    let inbound: Vec<_> = messages.iter().filter(|m| m["direction"] == "in").collect();
    let outbound: Vec<_> = messages
        .iter()
        .filter(|m| m["direction"] == "out")
        .collect();
    assert_eq!(inbound.len(), 1, "{c:#}");
    assert_eq!(inbound[0]["decision"], Value::Null);
    assert!(!outbound.is_empty(), "{c}");
    for m in &outbound {
        assert_eq!(m["decision"], "send", "{m}");
        assert!(
            m["reason"].as_str().is_some_and(|r| r.contains("window")),
            "{m}"
        );
    }
    // Oldest first; `limit` keeps the latest.
    assert_eq!(messages[0]["direction"], "in");
    let (_, one) = api.get("/conversations/15550000071?limit=1").await;
    assert_eq!(one["messages"].as_array().unwrap().len(), 1);
    assert_eq!(one["messages"][0]["id"], messages[messages.len() - 1]["id"]);

    let (status, body) = api.get("/conversations/15550000071?limit=0").await;
    assert_eq!((status, codes(&body)), (400, "invalid_limit"), "{body}");
    let (status, body) = api.get("/conversations/15550000071?limit=many").await;
    assert_eq!((status, codes(&body)), (400, "invalid_query"), "{body}");
    let (status, body) = api.get("/conversations/15559999999").await;
    assert_eq!((status, codes(&body)), (404, "unknown_contact"), "{body}");
    let (status, body) = api.get("/conversations/15550000071?channel=nope").await;
    assert_eq!((status, codes(&body)), (404, "unknown_channel"), "{body}");
    let (status, body) = api.get("/conversations?handoff=maybe").await;
    assert_eq!((status, codes(&body)), (400, "invalid_query"), "{body}");
    api.server.shutdown().await;
}

#[tokio::test]
async fn one_message_is_read_by_its_id() {
    let api = Api::start().await;
    let (status, sent) = api
        .send(
            "POST",
            "/conversations/15550000081/messages",
            Some(json!({"text": "Hello from an agent."})),
        )
        .await;
    assert_eq!(status, 201, "{sent}");
    let id = sent["id"].as_i64().unwrap();
    let (status, m) = api.get(&format!("/messages/{id}")).await;
    assert_eq!(status, 200, "{m}");
    assert_eq!(
        (
            m["id"].as_i64(),
            m["contact"].as_str(),
            m["direction"].as_str()
        ),
        (Some(id), Some("15550000081"), Some("out"))
    );
    assert_eq!(m["decision"], "queued", "outside any window: {m}");
    assert_eq!(m["reason"], sent["reason"]);
    assert!(m["expires_at"].is_string(), "{m}");

    let (status, body) = api.get("/messages/999999").await;
    assert_eq!((status, codes(&body)), (404, "unknown_message"));
    let (status, body) = api.get("/messages/first").await;
    assert_eq!((status, codes(&body)), (400, "invalid_path"));
    let (status, body) = api.get("/queue?limit=lots").await;
    assert_eq!((status, codes(&body)), (400, "invalid_query"));
    let (status, body) = api.get("/outbox?limit=501").await;
    assert_eq!((status, codes(&body)), (400, "invalid_limit"));
    api.server.shutdown().await;
}

#[tokio::test]
async fn a_bad_agent_message_is_refused_and_sends_nothing() {
    let api = Api::start().await;
    api.customer_says("15550000091", "hi").await;
    let (_, before) = api.get("/outbox").await;
    let path = "/conversations/15550000091/messages";
    let raw = |body: &'static str, key: Option<&'static str>| {
        let mut r = api
            .server
            .client
            .post(api.url(path))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = key {
            r = r.header("Idempotency-Key", key);
        }
        async move {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = raw("{not json", None).await;
    assert_eq!((status, codes(&body)), (400, "invalid_body"), "{body}");
    let (status, body) = raw(r#"{"txt": "hi"}"#, None).await;
    assert_eq!((status, codes(&body)), (400, "invalid_body"), "{body}");
    let (status, body) = raw(
        r#"{"text": "a", "template": {"name": "x", "language": "en"}}"#,
        None,
    )
    .await;
    assert_eq!((status, codes(&body)), (422, "invalid_body"), "{body}");
    let (status, body) = raw(r#"{"text": "  "}"#, None).await;
    assert_eq!((status, codes(&body)), (422, "invalid_text"), "{body}");
    let (status, body) = raw(
        r#"{"template": {"name": "nope", "language": "en_US"}}"#,
        None,
    )
    .await;
    assert_eq!((status, codes(&body)), (422, "unknown_template"), "{body}");
    let (status, body) = raw(
        r#"{"template": {"name": "order_shipped", "language": "en_US", "params": ["1"]}}"#,
        None,
    )
    .await;
    assert_eq!((status, codes(&body)), (422, "template_params"), "{body}");
    let long: &'static str = Box::leak("k".repeat(256).into_boxed_str());
    let (status, body) = raw(r#"{"text": "hi"}"#, Some(long)).await;
    assert_eq!(
        (status, codes(&body)),
        (400, "invalid_idempotency_key"),
        "{body}"
    );
    let (status, body) = raw(r#"{"text": "hi", "channel": "nope"}"#, None).await;
    assert_eq!((status, codes(&body)), (404, "unknown_channel"), "{body}");

    let (_, after) = api.get("/outbox").await;
    assert_eq!(after["messages"], before["messages"], "nothing was stored");
    api.server.shutdown().await;
}

#[tokio::test]
async fn a_handoff_ended_with_an_idempotency_key_is_ended_once() {
    let api = Api::start().await;
    let contact = "15550000101";
    api.customer_says(contact, "hi").await;
    api.customer_sends(json!({"from": contact, "button": "more"}))
        .await;
    api.customer_sends(json!({"from": contact, "list": "human"}))
        .await;
    let resume = |key: &'static str, who: &'static str, body: &'static str| {
        let r = api
            .server
            .client
            .post(api.url(&format!("/conversations/{who}/resume")))
            .bearer_auth(TOKEN)
            .header("Idempotency-Key", key)
            .body(body);
        async move {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = resume("end-1", contact, "{bad").await;
    assert_eq!((status, codes(&body)), (400, "invalid_body"), "{body}");
    let (status, body) = resume("end-1", contact, r#"{"flow": "nope"}"#).await;
    assert_eq!((status, codes(&body)), (422, "unknown_target"), "{body}");

    let (status, first) = resume("end-1", contact, "").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["replayed"], false);
    let (status, again) = resume("end-1", contact, "").await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["replayed"], true, "{again}");
    assert_eq!(again["sent"], json!([]));
    let (_, list) = api.get("/conversations?handoff=true").await;
    assert_eq!(list["conversations"], json!([]));

    // Without the key, the same request finds nothing to end; the key for another
    // contact is refused.
    let r = api
        .server
        .client
        .post(api.url(&format!("/conversations/{contact}/resume")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let body: Value = r.json().await.unwrap();
    assert_eq!(codes(&body), "not_in_handoff");
    let (status, body) = resume("end-1", "15550000102", "").await;
    assert_eq!(
        (status, codes(&body)),
        (409, "idempotency_key_reused"),
        "{body}"
    );
    api.server.shutdown().await;
}

#[tokio::test]
async fn a_broken_flow_file_shows_invalid_and_its_reload_is_refused() {
    let api = Api::start_with(true).await;
    let file = api.dir.path().join("flows/order_status.yaml");
    let good = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, good.replace("start: check_known", "start: nowhere")).unwrap();

    let (status, body) = api.get("/flows").await;
    assert_eq!(status, 200, "{body}");
    let flows = body["flows"].as_array().unwrap();
    let order = flows.iter().find(|f| f["id"] == "order_status").unwrap();
    assert_eq!(order["valid"], false, "{order}");
    let diagnostic = &order["diagnostics"][0];
    assert_eq!(diagnostic["severity"], "error", "{order}");
    assert!(
        diagnostic["position"]
            .as_str()
            .unwrap()
            .contains("order_status.yaml"),
        "{diagnostic}"
    );
    assert!(body["errors"].as_u64().unwrap() >= 1);
    assert!(
        flows
            .iter()
            .any(|f| f["id"] != "order_status" && f["valid"] == true),
        "the other files are valid: {body}"
    );

    let (status, body) = api.send("POST", "/flows/reload", None).await;
    assert_eq!((status, codes(&body)), (422, "invalid_flows"), "{body}");
    assert!(
        body["error"]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("nowhere"),
        "{body}"
    );

    std::fs::write(&file, good).unwrap();
    let (status, body) = api.send("POST", "/flows/reload", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["flows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["id"] == "order_status" && f["version"].is_string()),
        "{body}"
    );
    let (_, body) = api.get("/flows").await;
    assert_eq!(body["errors"], 0, "{body}");
    api.server.shutdown().await;
}

#[tokio::test]
async fn the_template_registry_lists_each_status() {
    let api = Api::start().await;
    let (status, body) = api.get("/templates").await;
    assert_eq!(status, 200, "{body}");
    let templates = body["templates"].as_array().unwrap();
    assert!(!templates.is_empty());
    let shipped = templates
        .iter()
        .find(|t| t["name"] == "order_shipped")
        .unwrap();
    assert_eq!(
        (shipped["status"].as_str(), shipped["params"].as_u64()),
        (Some("approved"), Some(2)),
        "{shipped}"
    );
    assert!(shipped["category"].is_string() && shipped["body"].is_string());
    let r = api
        .server
        .client
        .get(api.url("/templates"))
        .bearer_auth("not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    api.server.shutdown().await;
}

#[tokio::test]
async fn a_body_too_large_is_a_json_413() {
    let api = Api::start().await;
    let text = "x".repeat(300 * 1024);
    let (status, body) = api
        .send(
            "POST",
            "/conversations/15550000111/messages",
            Some(json!({ "text": text })),
        )
        .await;
    assert_eq!((status, codes(&body)), (413, "body_too_large"), "{body}");
    let (_, outbox) = api.get("/outbox").await;
    assert_eq!(outbox["messages"], json!([]));
    api.server.shutdown().await;
}
