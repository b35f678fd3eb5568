//! Crash tests with the real binary: `flowgate serve` is killed with SIGKILL in the middle of
//! a burst of inbound webhooks, and again in the middle of sending. After a restart on the
//! same database, every webhook that was answered 200 is processed exactly once, and the
//! fake Graph API received every reply exactly once.
//!
//! The fake here behaves like WhatsApp in the one way that matters for a crash: a send it
//! has received is accepted even if the connection drops before the response, and it posts
//! a signed `sent` status webhook (with the `biz_opaque_callback_data` it was given) back to
//! the server, retrying until the server is up again. That status is how a restarted
//! flowgate learns that a message it cannot remember sending did go out.
//!
//! `killed_repeatedly_under_load_with_statuses_flowing` is the production case: the fake
//! (`support::fake_graph`) posts `sent` and `delivered` a moment after each accepted send,
//! the server is killed again and again while customers keep writing, and in the end every
//! acknowledged message has exactly one reply: none lost, none sent twice.

use crate::support;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use support::fake_graph::{FakeAuth, FakeGraph, Reply, Script, StatusEcho};

const SECRET: &str = "crash-app-secret";
const PHONE: &str = "110000000000001";
const TOKEN: &str = "crash-token";

const FLOW: &str = r#"
flow: echo
triggers:
  - any: true
steps:
  reply:
    say: "got {{ message.text }}"
"#;

fn sign(body: &str) -> String {
    support::sign(SECRET, body.as_bytes())
}

/// The fake Graph API for a crash test: every accepted send's `sent` and `delivered`
/// statuses are posted back to `setup`'s webhook 200 ms later, as WhatsApp does, retried
/// while the server is down.
async fn fake_graph() -> FakeGraph {
    FakeGraph::start(FakeAuth::cloud_api(PHONE, TOKEN)).await
}

fn echo_statuses(fake: &FakeGraph, setup: &Setup) {
    fake.echo_statuses(StatusEcho {
        webhook: setup.webhook_url(),
        app_secret: SECRET.into(),
        phone_number_id: PHONE.into(),
        after: Duration::from_millis(200),
        retry_for: Duration::from_secs(90),
    });
}

/// Accepted sends per recipient.
pub(crate) fn counts(fake: &FakeGraph) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for sent in fake.accepted() {
        *counts.entry(sent.to.unwrap_or_default()).or_default() += 1;
    }
    counts
}

/// The real binary, serving; killed (SIGKILL) by [`Server::kill`] or when dropped.
pub(crate) struct Server {
    child: Child,
    pub(crate) log: PathBuf,
}

impl Server {
    pub(crate) fn kill(mut self) {
        // SIGKILL: no shutdown code runs.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Setup {
    dir: tempfile::TempDir,
    port: u16,
}

impl Setup {
    fn new(api_base: &str) -> Setup {
        Self::with_lease(api_base, "5s")
    }

    /// A project whose outbox leases last `lease`.
    fn with_lease(api_base: &str, lease: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("flows")).unwrap();
        std::fs::write(dir.path().join("flows/echo.yaml"), FLOW).unwrap();
        let port = support::free_port();
        let config = format!(
            "database: sqlite://{db}\nlisten: 127.0.0.1:{port}\nflows: flows\n\
             outbox:\n  lease: {lease}\n\
             channels:\n  - name: main\n    provider: cloud_api\n    phone_number_id: \"{PHONE}\"\n    \
             access_token: {TOKEN}\n    app_secret: {SECRET}\n    verify_token: crash-verify\n    \
             api_base: {api_base}\n    throughput_mps: 200\n",
            db = dir.path().join("flowgate.db").display()
        );
        std::fs::write(dir.path().join("flowgate.yaml"), config).unwrap();
        Setup { dir, port }
    }

    fn webhook_url(&self) -> String {
        format!("http://127.0.0.1:{}/webhook/main", self.port)
    }

    async fn start(&self, run: usize) -> Server {
        let log = self.dir.path().join(format!("server-{run}.log"));
        serve(&self.dir.path().join("flowgate.yaml"), self.port, log).await
    }
}

/// Starts `flowgate serve --config CONFIG` (listening on `port`), its log in `log`, and waits
/// (at most 20 s) until `/healthz` answers.
pub(crate) async fn serve(config: &Path, port: u16, log: PathBuf) -> Server {
    let child = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Owned by a `Server` at once, so a failed start still kills and reaps the process.
    let server = Server { child, log };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = client
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if up {
            return server;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not start: {}",
            read(&server.log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn inbound(customer: &str, wamid: &str, text: &str) -> String {
    json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": "100000000000001", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550001111", "phone_number_id": PHONE},
            "contacts": [{"profile": {"name": "Crash"}, "wa_id": customer}],
            "messages": [{"from": customer, "id": wamid, "timestamp": support::now_timestamp(),
                          "type": "text", "text": {"body": text}}],
        }}]}],
    })
    .to_string()
}

async fn post_webhook(client: &reqwest::Client, url: &str, body: String) -> bool {
    client
        .post(url)
        .header("content-type", "application/json")
        .header("x-hub-signature-256", sign(&body))
        .body(body)
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
}

/// Waits until every customer in `expected` got a reply, then a little longer so a late
/// duplicate would show; returns the sends per recipient.
async fn settle(
    fake: &FakeGraph,
    expected: &HashSet<String>,
    quiet: Duration,
    server: &Server,
) -> BTreeMap<String, usize> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let counts = counts(fake);
        if expected.iter().all(|c| counts.contains_key(c)) {
            break;
        }
        let missing: Vec<_> = expected
            .iter()
            .filter(|c| !counts.contains_key(*c))
            .take(5)
            .collect();
        assert!(
            Instant::now() < deadline,
            "no reply for {missing:?}…; server log:\n{}",
            read(&server.log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(quiet).await;
    counts(fake)
}

/// Inbound rows per wamid, read from the database after the server is gone.
async fn inbound_rows(setup: &Setup) -> BTreeMap<String, i64> {
    let url = format!(
        "sqlite://{}",
        setup.dir.path().join("flowgate.db").display()
    );
    let db = flowgate::store::Db::connect(&url).await.unwrap();
    let pool = db.sqlite_pool().expect("tests use SQLite");
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT wamid, COUNT(*) FROM messages WHERE direction = 'in' GROUP BY wamid",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_a_burst_of_webhooks() {
    let fake = fake_graph().await;
    let setup = Setup::new(&fake.cloud_api_base());
    echo_statuses(&fake, &setup);
    let server = setup.start(1).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    // 300 customers write at once; the server dies while it is answering them.
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let mut posts = Vec::new();
    for i in 0..300 {
        let (client, url, acked) = (client.clone(), setup.webhook_url(), acked.clone());
        posts.push(tokio::spawn(async move {
            let customer = format!("4917{i:08}");
            if post_webhook(
                &client,
                &url,
                inbound(&customer, &format!("wamid.burst.{i}"), "hello"),
            )
            .await
            {
                acked.lock().unwrap().insert(customer);
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.lock().unwrap().len() < 60 {
        assert!(
            Instant::now() < deadline,
            "no webhooks acknowledged: {}",
            read(&server.log)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let log = server.log.clone();
    server.kill();
    for p in posts {
        p.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 60, "{} acknowledged", acked.len());

    let server = setup.start(2).await;
    let counts = settle(&fake, &acked, Duration::from_secs(7), &server).await;
    drop(server);
    for customer in &acked {
        assert_eq!(
            counts.get(customer),
            Some(&1),
            "{customer} got {:?} replies; log:\n{}",
            counts.get(customer),
            read(&log)
        );
    }
    for (customer, n) in &counts {
        assert_eq!(*n, 1, "{customer} got {n} replies");
    }
    let rows = inbound_rows(&setup).await;
    for i in 0..300 {
        let customer = format!("4917{i:08}");
        let n = rows.get(&format!("wamid.burst.{i}")).copied().unwrap_or(0);
        if acked.contains(&customer) {
            assert_eq!(n, 1, "webhook {i} was answered 200 and processed {n} times");
        } else {
            assert!(n <= 1, "webhook {i} processed {n} times");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_in_the_middle_of_sending() {
    let fake = fake_graph().await;
    // Sends are answered slowly: some are accepted when the kill comes, their answers lost.
    fake.script(Script::always(Reply::delayed(
        Duration::from_millis(400),
        Reply::Success,
    )));
    let setup = Setup::new(&fake.cloud_api_base());
    echo_statuses(&fake, &setup);
    let server = setup.start(1).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    let mut customers = HashSet::new();
    for i in 0..60 {
        let customer = format!("4916{i:08}");
        assert!(
            post_webhook(
                &client,
                &setup.webhook_url(),
                inbound(&customer, &format!("wamid.send.{i}"), "hi")
            )
            .await
        );
        customers.insert(customer);
    }
    // Sends are slow at the fake: kill while some have arrived and others are in flight.
    let deadline = Instant::now() + Duration::from_secs(20);
    while fake.accepted().len() < 10 {
        assert!(
            Instant::now() < deadline,
            "nothing sent: {}",
            read(&server.log)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let log = server.log.clone();
    server.kill();
    let before_restart = fake.accepted().len();
    assert!(
        before_restart < 60,
        "the kill came too late to test anything ({before_restart} sent)"
    );

    fake.clear_scripts();
    let server = setup.start(2).await;
    let counts = settle(&fake, &customers, Duration::from_secs(7), &server).await;
    let log2 = server.log.clone();
    drop(server);
    for customer in &customers {
        assert_eq!(
            counts.get(customer),
            Some(&1),
            "{customer}: {:?} sends; first log:\n{}\nsecond log:\n{}",
            counts.get(customer),
            read(&log),
            read(&log2)
        );
    }
}

/// Sends per reply text (each inbound text is unique, so each reply is).
fn replies(fake: &FakeGraph) -> BTreeMap<String, usize> {
    let mut replies = BTreeMap::new();
    for sent in fake.accepted() {
        *replies.entry(sent.text.unwrap_or_default()).or_default() += 1;
    }
    replies
}

/// One round of load: every customer writes `r{round}c{i}` at once; returns the texts whose
/// webhooks were answered 200. Posts that fail (the server is being killed) are not retried.
async fn write_round(
    client: &reqwest::Client,
    url: &str,
    round: usize,
    customers: usize,
) -> Vec<String> {
    let mut posts = Vec::new();
    for i in 0..customers {
        let (client, url) = (client.clone(), url.to_string());
        posts.push(tokio::spawn(async move {
            let text = format!("r{round}c{i}");
            let body = inbound(&format!("4915{i:08}"), &format!("wamid.{text}"), &text);
            post_webhook(&client, &url, body).await.then_some(text)
        }));
    }
    let mut acked = Vec::new();
    for post in posts {
        acked.extend(post.await.unwrap());
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_repeatedly_under_load_with_statuses_flowing() {
    const KILLS: usize = 6;
    const CUSTOMERS: usize = 40;
    let fake = fake_graph().await;
    // Answers take a moment, so kills land between WhatsApp accepting a send and flowgate
    // recording it: the ambiguous rows only a status can settle.
    fake.script(Script::always(Reply::delayed(
        Duration::from_millis(150),
        Reply::Success,
    )));
    let setup = Setup::with_lease(&fake.cloud_api_base(), "10s");
    echo_statuses(&fake, &setup);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut acked: HashSet<String> = HashSet::new();
    let mut logs = Vec::new();
    for round in 0..KILLS {
        let server = setup.start(round).await;
        logs.push(server.log.clone());
        let before = fake.accepted().len();
        // The next round's messages arrive while this one's replies are going out.
        let load = tokio::spawn({
            let (client, url) = (client.clone(), setup.webhook_url());
            async move { write_round(&client, &url, round, CUSTOMERS).await }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while fake.accepted().len() < before + CUSTOMERS / 4 {
            assert!(
                Instant::now() < deadline,
                "round {round}: nothing sent; log:\n{}",
                read(&server.log)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        server.kill();
        acked.extend(load.await.unwrap());
    }
    let server = setup.start(KILLS).await;
    let expected: HashSet<String> = acked.iter().map(|t| format!("got {t}")).collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let sent = replies(&fake);
        let missing: Vec<_> = expected.iter().filter(|t| !sent.contains_key(*t)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} acknowledged messages unanswered, e.g. {:?}; last log:\n{}",
            missing.len(),
            missing.iter().take(5).collect::<Vec<_>>(),
            read(&server.log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Longer than a lease: a row settled by nothing would be sent again by now.
    tokio::time::sleep(Duration::from_secs(12)).await;
    drop(server);

    assert!(
        fake.accepted().iter().all(|a| a.key.is_some()),
        "every send carries its idempotency key"
    );
    let sent = replies(&fake);
    let twice: Vec<_> = sent.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");
    let lost: Vec<_> = expected.iter().filter(|t| !sent.contains_key(*t)).collect();
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert!(
        acked.len() >= KILLS * CUSTOMERS / 2,
        "the load was light: {} of {} messages acknowledged",
        acked.len(),
        KILLS * CUSTOMERS
    );
    let mut latencies: Vec<Duration> = fake
        .accepted()
        .iter()
        .filter_map(|a| a.status_latency)
        .collect();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    eprintln!(
        "{} accepted sends whose answer never reached a sender",
        fake.accepted().len() - fake.sends().len()
    );
    eprintln!(
        "{} sends, {} kills: from acceptance to the `sent` status answered 200: p50 {:?}, \
         p99 {:?}, max {:?}",
        latencies.len(),
        KILLS,
        at(0.5),
        at(0.99),
        at(1.0)
    );
}
