//! Three instances of the real binary (`flowgate serve`) on one PostgreSQL schema, one
//! config each (only `listen` differs) at the fake Graph API, which posts `sent` and
//! `delivered` statuses back to one instance (the one never killed), retrying while it is
//! down. One instance is killed with SIGKILL in the middle of the load and started again.
//!
//! * **webhooks**: signed webhooks of hundreds of customers, three messages each, a
//!   customer's next message sent once the previous one was answered 200, spread round robin
//!   over the instances (a webhook refused or unanswered goes to the next instance, as a
//!   load balancer would send it); the flow calls a counting endpoint of the test (`http`
//!   step) and replies with what it answered. Asserted: every message in the message log
//!   once; every reply at the fake exactly once, each customer's in the order of their
//!   messages; the `http` step ran for every message, more than once only for messages
//!   whose turn the kill interrupted (a turn that ran its `http` step but had not
//!   committed is run again by the instance that takes the contact over: at least once,
//!   bounded by the turns in flight at the kill); no lease left held.
//! * **campaign**: 400 contacts imported, a marketing campaign started by `run-now`, an
//!   instance killed when 30 % of the recipients were reached, started again; every
//!   recipient gets exactly one message.
//!
//! They need PostgreSQL: without `FLOWGATE_TEST_POSTGRES_URL` they print `SKIPPED` and pass,
//! unless `FLOWGATE_REQUIRE_POSTGRES` is set (then they fail).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::campaigns::TEMPLATES;
use crate::crash::{Server, read, serve};
use crate::support::fake_graph::{FakeAuth, FakeGraph, Reply, Script, StatusEcho};
use crate::support::{self, Backend, TestDb};

const SECRET: &str = "instances-app-secret";
const PHONE: &str = "110000000000003";
const ACCESS: &str = "instances-token";
const ADMIN: &str = "instances-admin";
const INSTANCES: usize = 3;
/// The instance that is killed and started again.
const VICTIM: usize = 0;
/// The instance the fake posts statuses to (never killed).
const STATUSES_TO: usize = 2;

/// Three configs on one database, in one project directory.
struct Cluster {
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    db: TestDb,
}

impl Cluster {
    /// A project with `flow` (and `extra` files), its configs on a fresh PostgreSQL schema;
    /// `None` when PostgreSQL is not configured (after printing `SKIPPED`).
    async fn new(name: &str, api_base: &str, files: &[(&str, String)]) -> Option<Cluster> {
        let dir = tempfile::tempdir().unwrap();
        let Some(db) = TestDb::new(dir.path(), Backend::Postgres).await else {
            eprintln!("SKIPPED {name}: needs PostgreSQL (FLOWGATE_TEST_POSTGRES_URL)");
            return None;
        };
        for sub in ["flows", "campaigns"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        for (path, text) in files {
            std::fs::write(dir.path().join(path), text).unwrap();
        }
        std::fs::write(dir.path().join("templates.yaml"), TEMPLATES).unwrap();
        let ports: Vec<u16> = (0..INSTANCES).map(|_| support::free_port()).collect();
        for (i, port) in ports.iter().enumerate() {
            let config = format!(
                "database: \"{url}\"\nlisten: 127.0.0.1:{port}\nflows: flows\n\
                 templates: templates.yaml\ncampaigns: campaigns\n\
                 outbox:\n  lease: 30s\nadmin:\n  token: {ADMIN}\n\
                 channels:\n  - name: main\n    provider: cloud_api\n    phone_number_id: \"{PHONE}\"\n    \
                 access_token: {ACCESS}\n    app_secret: {SECRET}\n    verify_token: instances-verify\n    \
                 api_base: {api_base}\n    throughput_mps: 1000\n",
                url = db.url
            );
            std::fs::write(dir.path().join(format!("flowgate-{i}.yaml")), config).unwrap();
        }
        Some(Cluster { dir, ports, db })
    }

    /// Starts instance `i` (its `run`th start), waiting until it answers.
    async fn start(&self, i: usize, run: usize) -> Server {
        let log = self.dir.path().join(format!("server-{i}-{run}.log"));
        let config = self.dir.path().join(format!("flowgate-{i}.yaml"));
        serve(&config, self.ports[i], log).await
    }

    /// Starts every instance, one after another (the first migrates the schema).
    async fn start_all(&self) -> Vec<Option<Server>> {
        let mut servers = Vec::new();
        for i in 0..INSTANCES {
            servers.push(Some(self.start(i, 0).await));
        }
        servers
    }

    fn url(&self, i: usize, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports[i])
    }

    /// Every instance's logs so far.
    fn logs(&self) -> String {
        let mut logs = String::new();
        let mut paths: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        paths.sort();
        for path in paths {
            logs.push_str(&format!("==> {}\n{}", path.display(), read(&path)));
        }
        logs
    }

    /// A connection to the test's schema, to look at the database.
    async fn database(&self) -> flowgate::store::Db {
        flowgate::store::Db::connect(&self.db.url).await.unwrap()
    }

    /// Stops the instances still running and drops the test's schema.
    async fn stop(self, servers: Vec<Option<Server>>) {
        drop(servers);
        self.db.clean_up().await;
    }
}

/// A cluster at work, as both tests start it: the fake Graph API (answering sends 50 ms
/// later, statuses posted back to instance [`STATUSES_TO`]), the cluster of test `name`'s
/// `files` at it, every instance started (in order; a test sets one to `None` while it is
/// down), and when they began starting. `None` when PostgreSQL is not configured (after
/// printing `SKIPPED`).
async fn start_cluster(
    name: &str,
    files: &[(&str, String)],
) -> Option<(FakeGraph, Cluster, Vec<Option<Server>>, Instant)> {
    let fake = fake_graph(Duration::from_millis(50)).await;
    let cluster = Cluster::new(name, &fake.cloud_api_base(), files).await?;
    echo_statuses(&fake, &cluster);
    let started = Instant::now();
    let servers = cluster.start_all().await;
    Some((fake, cluster, servers, started))
}

/// A client whose requests give up after `timeout`.
fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder().timeout(timeout).build().unwrap()
}

/// The fake Graph API, accepting every send and answering it `answer_after` later (a kill
/// meanwhile loses the answer: a send only its status settles).
async fn fake_graph(answer_after: Duration) -> FakeGraph {
    let fake = FakeGraph::start(FakeAuth::cloud_api(PHONE, ACCESS)).await;
    fake.script(Script::always(Reply::delayed(answer_after, Reply::Success)));
    fake
}

/// Statuses of accepted sends posted back to instance [`STATUSES_TO`], as WhatsApp does.
fn echo_statuses(fake: &FakeGraph, cluster: &Cluster) {
    fake.echo_statuses(StatusEcho {
        webhook: cluster.url(STATUSES_TO, "/webhook/main"),
        app_secret: SECRET.into(),
        phone_number_id: PHONE.into(),
        after: Duration::from_millis(200),
        retry_for: Duration::from_secs(120),
    });
}

/// The test's side-effect endpoint: counts each call by its body's `text` and answers it.
struct Effects {
    url: String,
    calls: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl Effects {
    async fn start() -> Effects {
        let calls: Arc<Mutex<BTreeMap<String, usize>>> = Default::default();
        let seen = calls.clone();
        let app = axum::Router::new().route(
            "/effects",
            axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
                let seen = seen.clone();
                async move {
                    let text = body["text"].as_str().unwrap_or_default().to_string();
                    *seen.lock().unwrap().entry(text.clone()).or_default() += 1;
                    axum::Json(json!({ "text": text }))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/effects", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Effects { url, calls }
    }
}

/// The flow: every message calls the effects endpoint, then replies with its answer.
fn effect_flow(url: &str) -> String {
    format!(
        "flow: effect\ntriggers:\n  - any: true\nsteps:\n  call:\n    http:\n      method: POST\n      \
         url: \"{url}\"\n      headers:\n        content-type: application/json\n      \
         body:\n        text: \"{{{{message.text}}}}\"\n      save: effect\n      timeout: 10s\n    \
         next: reply\n  reply:\n    say: \"got {{{{effect.body.text}}}}\"\n"
    )
}

fn customer(c: usize) -> String {
    format!("4915{c:08}")
}

fn text(c: usize, m: usize) -> String {
    format!("c{c} m{m}")
}

fn message_webhook(c: usize, m: usize) -> Vec<u8> {
    let from = customer(c);
    support::envelope(
        PHONE,
        json!({
            "contacts": [{"profile": {"name": format!("Customer {c}")}, "wa_id": from}],
            "messages": [{"from": from, "id": format!("wamid.inst.{c}.{m}"),
                          "timestamp": support::now_timestamp(),
                          "type": "text", "text": {"body": text(c, m)}}],
        }),
    )
}

/// Posts `body` to instance `first`, else the next ones, until one answers 200 (at most
/// 60 s); the instance that answered.
async fn deliver(client: &reqwest::Client, ports: &[u16], first: usize, body: Vec<u8>) -> usize {
    let signature = support::sign(SECRET, &body);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut target = first;
    loop {
        let answered = client
            .post(format!("http://127.0.0.1:{}/webhook/main", ports[target]))
            .header("content-type", "application/json")
            .header("x-hub-signature-256", &signature)
            .body(body.clone())
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if answered {
            return target;
        }
        assert!(
            Instant::now() < deadline,
            "no instance took a webhook for 60 s"
        );
        target = (target + 1) % ports.len();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_process_each_webhook_once_in_order_through_a_kill() {
    const CUSTOMERS: usize = 200;
    const MESSAGES: usize = 3;
    const TOTAL: usize = CUSTOMERS * MESSAGES;
    let effects = Effects::start().await;
    let Some((fake, cluster, mut servers, started)) = start_cluster(
        "three_instances_process_each_webhook_once_in_order_through_a_kill",
        &[("flows/effect.yaml", effect_flow(&effects.url))],
    )
    .await
    else {
        return;
    };
    let client = client(Duration::from_secs(10));

    // Customers write at once (a few dozen at a time), each one message after another.
    let answered = Arc::new(AtomicUsize::new(0));
    let next_instance = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(30));
    let mut writers = Vec::new();
    for c in 0..CUSTOMERS {
        let (client, ports) = (client.clone(), cluster.ports.clone());
        let (answered, next_instance, gate) =
            (answered.clone(), next_instance.clone(), gate.clone());
        writers.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            for m in 0..MESSAGES {
                let first = next_instance.fetch_add(1, Ordering::Relaxed) % INSTANCES;
                deliver(&client, &ports, first, message_webhook(c, m)).await;
                answered.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // Kill one instance a third of the way in, start it again two seconds later.
    let deadline = Instant::now() + Duration::from_secs(60);
    while answered.load(Ordering::Relaxed) < TOTAL / 3 {
        assert!(
            Instant::now() < deadline,
            "webhooks stalled:\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    servers[VICTIM].take().unwrap().kill();
    let at_kill = (answered.load(Ordering::Relaxed), fake.accepted().len());
    tokio::time::sleep(Duration::from_secs(2)).await;
    servers[VICTIM] = Some(cluster.start(VICTIM, 1).await);
    for writer in writers {
        writer.await.unwrap();
    }
    eprintln!(
        "killed instance {VICTIM} at {} webhooks answered, {} replies accepted; all {TOTAL} webhooks answered after {:?}",
        at_kill.0,
        at_kill.1,
        started.elapsed()
    );

    // Every reply, then a moment more so a late duplicate would show.
    let deadline = Instant::now() + Duration::from_secs(90);
    while fake.accepted().len() < TOTAL {
        assert!(
            Instant::now() < deadline,
            "{} of {TOTAL} replies after 90 s; logs:\n{}",
            fake.accepted().len(),
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    eprintln!("{TOTAL} replies accepted after {:?}", started.elapsed());

    // Each customer's replies: exactly one per message, in the order of the messages.
    let mut replies: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for sent in fake.accepted() {
        replies
            .entry(sent.to.unwrap_or_default())
            .or_default()
            .push(sent.text.unwrap_or_default());
    }
    let mut wrong = Vec::new();
    for c in 0..CUSTOMERS {
        let expected: Vec<String> = (0..MESSAGES)
            .map(|m| format!("got {}", text(c, m)))
            .collect();
        let got = replies.remove(&customer(c)).unwrap_or_default();
        if got != expected {
            wrong.push((customer(c), got));
        }
    }
    assert!(
        wrong.is_empty() && replies.is_empty(),
        "{} customers' replies are not one per message in order, e.g. {:?}; replies to strangers: {:?}; logs:\n{}",
        wrong.len(),
        &wrong[..wrong.len().min(5)],
        replies.keys().take(5).collect::<Vec<_>>(),
        cluster.logs()
    );

    // The `http` step ran for every message; more than once only for turns the kill cut.
    let calls = effects.calls.lock().unwrap().clone();
    let expected: BTreeSet<String> = (0..CUSTOMERS)
        .flat_map(|c| (0..MESSAGES).map(move |m| text(c, m)))
        .collect();
    let called: BTreeSet<String> = calls.keys().cloned().collect();
    assert_eq!(
        called, expected,
        "the http step ran for exactly these messages"
    );
    let again: Vec<(&String, &usize)> = calls.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "http step: {} calls for {TOTAL} messages; {} messages' step ran again after the kill",
        calls.values().sum::<usize>(),
        again.len()
    );
    assert!(
        again.iter().all(|(_, n)| **n == 2),
        "a step ran more than twice: {again:?}"
    );
    assert!(
        again.len() <= flowgate::inbound::CONCURRENCY,
        "more steps ran again ({}) than one instance runs turns at once",
        again.len()
    );

    // The message log holds each message once; every lease is given back.
    let db = cluster.database().await;
    let inbound = support::count(
        &db,
        "SELECT COUNT(*) FROM messages WHERE direction = 'in' AND wamid LIKE 'wamid.inst.%'",
    )
    .await;
    assert_eq!(inbound, TOTAL as i64, "every message in the log once");
    let outbound =
        support::count(&db, "SELECT COUNT(*) FROM messages WHERE direction = 'out'").await;
    assert_eq!(outbound, TOTAL as i64, "one reply per message in the log");
    let pending = support::count(
        &db,
        "SELECT COUNT(*) FROM inbox WHERE kind = 'message' AND processed_at IS NULL",
    )
    .await;
    assert_eq!(pending, 0, "every message's inbox row is processed");
    let now = chrono::Utc::now().timestamp_millis();
    let held = support::count(
        &db,
        &format!("SELECT COUNT(*) FROM contact_leases WHERE lease_until >= {now}"),
    )
    .await;
    assert_eq!(held, 0, "idle instances hold no contact's lease");
    db.close().await;
    cluster.stop(servers).await;
}

/// A marketing campaign to every contact of `main`, no quiet hours, scheduled far ahead so
/// only `run-now` starts it.
fn campaign(rate: u32) -> String {
    format!(
        "campaign: spread\nchannel: main\ncategory: marketing\n\
         template: {{ name: spring_sale, language: en_US, params: [\"{{{{contact.name}}}}\"] }}\n\
         audience: {{ where: 'true' }}\nat: 2099-01-01T09:00:00\ntimezone: UTC\n\
         rate: {rate}/s\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_send_a_campaign_once_per_recipient_through_a_kill() {
    const RECIPIENTS: usize = 400;
    let Some((fake, cluster, mut servers, started)) = start_cluster(
        "three_instances_send_a_campaign_once_per_recipient_through_a_kill",
        &[
            (
                "flows/hello.yaml",
                "flow: hello\ntriggers:\n  - keywords: [hi]\nsteps:\n  greet:\n    say: Hello!\n"
                    .to_string(),
            ),
            // Each instance dispatches the run at this rate (shared pacing is not built).
            ("campaigns/spread.yaml", campaign(40)),
        ],
    )
    .await
    else {
        return;
    };
    let client = client(Duration::from_secs(120));

    let mut csv = String::from("wa_id,name\n");
    for i in 0..RECIPIENTS {
        csv.push_str(&format!("{},Customer {i}\n", customer(i)));
    }
    let imported = client
        .post(cluster.url(1, "/api/contacts/import?channel=main"))
        .bearer_auth(ADMIN)
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap();
    assert_eq!(imported.status(), 200);
    let response = client
        .post(cluster.url(1, "/api/campaigns/spread/run-now"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let run: Value = response.json().await.unwrap();
    assert_eq!(status, 201, "{run}");
    assert_eq!(run["recipients"].as_u64(), Some(RECIPIENTS as u64), "{run}");
    let run = run["run"].as_i64().expect("a run id");

    let reached = |at_least: usize, within: Duration| {
        let fake = &fake;
        let cluster = &cluster;
        async move {
            let deadline = Instant::now() + within;
            while fake.accepted_recipients() < at_least {
                assert!(
                    Instant::now() < deadline,
                    "{} of {at_least} recipients reached; logs:\n{}",
                    fake.accepted_recipients(),
                    cluster.logs()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    reached(RECIPIENTS * 3 / 10, Duration::from_secs(60)).await;
    let kill_after = started.elapsed();
    servers[VICTIM].take().unwrap().kill();
    let at_kill = fake.accepted().len();
    assert!(
        at_kill < RECIPIENTS,
        "too late to test anything: {at_kill} sent"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    servers[VICTIM] = Some(cluster.start(VICTIM, 1).await);
    reached(RECIPIENTS, Duration::from_secs(100)).await;
    // A send claimed again just as its status arrived would reach the fake a moment later.
    tokio::time::sleep(Duration::from_secs(3)).await;
    eprintln!(
        "killed instance {VICTIM} at {at_kill} sends accepted ({kill_after:?}); {RECIPIENTS} recipients reached after {:?}",
        started.elapsed()
    );

    let mut per_recipient: BTreeMap<String, usize> = BTreeMap::new();
    for sent in fake.accepted() {
        *per_recipient
            .entry(sent.to.unwrap_or_default())
            .or_default() += 1;
    }
    let twice: Vec<_> = per_recipient.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{} recipients got more than one message, e.g. {:?}; logs:\n{}",
        twice.len(),
        &twice[..twice.len().min(5)],
        cluster.logs()
    );
    let expected: BTreeSet<String> = (0..RECIPIENTS).map(customer).collect();
    let got: BTreeSet<String> = per_recipient.keys().cloned().collect();
    assert_eq!(got, expected, "every recipient, and nobody else");
    let key = format!("fg-c{run}-");
    assert!(
        fake.accepted()
            .iter()
            .all(|a| a.key.as_deref().is_some_and(|k| k.starts_with(&key))),
        "every send carries the run's key"
    );
    let db = cluster.database().await;
    let messages = support::count(
        &db,
        &format!(
            "SELECT COUNT(*) FROM messages WHERE direction = 'out' AND idempotency_key LIKE '{key}%'"
        ),
    )
    .await;
    assert_eq!(
        messages, RECIPIENTS as i64,
        "one message per recipient in the log"
    );
    db.close().await;
    cluster.stop(servers).await;
}
