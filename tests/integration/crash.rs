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

use crate::support;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use serde_json::{Value, json};

const SECRET: &str = "crash-app-secret";
const PHONE: &str = "110000000000001";

const FLOW: &str = r#"
flow: echo
triggers:
  - any: true
steps:
  reply:
    say: "got {{ message.text }}"
"#;

#[derive(Clone, Default)]
struct Fake {
    /// Every accepted send: (to, idempotency key, wamid).
    sends: Arc<Mutex<Vec<(String, String, String)>>>,
    next: Arc<AtomicU64>,
    delay_ms: Arc<AtomicU64>,
    webhook: Arc<Mutex<String>>,
    http: reqwest::Client,
}

fn sign(body: &str) -> String {
    support::sign(SECRET, body.as_bytes())
}

async fn fake_send(State(fake): State<Fake>, body: Bytes) -> axum::Json<Value> {
    let body: Value = serde_json::from_slice(&body).unwrap_or_default();
    if body.get("status").and_then(Value::as_str) == Some("read") {
        return axum::Json(json!({"success": true}));
    }
    let to = body["to"]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches('+')
        .to_string();
    let key = body["biz_opaque_callback_data"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let wamid = format!("wamid.crash.{}", fake.next.fetch_add(1, Ordering::SeqCst));
    // Accepted the moment it arrived, like WhatsApp: recorded, and its status will follow,
    // even if the sender dies before reading the response.
    fake.sends
        .lock()
        .unwrap()
        .push((to.clone(), key.clone(), wamid.clone()));
    let status = json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": "100000000000001", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550001111", "phone_number_id": PHONE},
            "statuses": [{"id": wamid, "status": "sent", "timestamp": "1760000000",
                          "recipient_id": to, "biz_opaque_callback_data": key}],
        }}]}],
    })
    .to_string();
    let poster = fake.clone();
    tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let url = poster.webhook.lock().unwrap().clone();
            let sent = poster
                .http
                .post(&url)
                .header("content-type", "application/json")
                .header("x-hub-signature-256", sign(&status))
                .body(status.clone())
                .send()
                .await;
            if sent.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let delay = fake.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    axum::Json(json!({
        "messaging_product": "whatsapp",
        "contacts": [{"input": format!("+{to}"), "wa_id": to}],
        "messages": [{"id": wamid}],
    }))
}

impl Fake {
    async fn start() -> (Fake, String) {
        let fake = Fake {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
            ..Fake::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/v23.0", listener.local_addr().unwrap());
        let app = Router::new()
            .route("/{*path}", post(fake_send))
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (fake, base)
    }

    /// Sends per recipient.
    fn counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for (to, ..) in self.sends.lock().unwrap().iter() {
            *counts.entry(to.clone()).or_default() += 1;
        }
        counts
    }
}

struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    fn kill(mut self) {
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
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("flows")).unwrap();
        std::fs::write(dir.path().join("flows/echo.yaml"), FLOW).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = format!(
            "database: sqlite://{db}\nlisten: 127.0.0.1:{port}\nflows: flows\n\
             outbox:\n  lease: 5s\n\
             channels:\n  - name: main\n    provider: cloud_api\n    phone_number_id: \"{PHONE}\"\n    \
             access_token: crash-token\n    app_secret: {SECRET}\n    verify_token: crash-verify\n    \
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
        let child = Command::new(env!("CARGO_BIN_EXE_flowgate"))
            .args(["serve", "--config"])
            .arg(self.dir.path().join("flowgate.yaml"))
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
                .get(format!("http://127.0.0.1:{}/healthz", self.port))
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
}

fn read(path: &Path) -> String {
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
    fake: &Fake,
    expected: &HashSet<String>,
    quiet: Duration,
    server: &Server,
) -> BTreeMap<String, usize> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let counts = fake.counts();
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
    fake.counts()
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
    let (fake, base) = Fake::start().await;
    let setup = Setup::new(&base);
    *fake.webhook.lock().unwrap() = setup.webhook_url();
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
    let (fake, base) = Fake::start().await;
    fake.delay_ms.store(400, Ordering::SeqCst);
    let setup = Setup::new(&base);
    *fake.webhook.lock().unwrap() = setup.webhook_url();
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
    while fake.sends.lock().unwrap().len() < 10 {
        assert!(
            Instant::now() < deadline,
            "nothing sent: {}",
            read(&server.log)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let log = server.log.clone();
    server.kill();
    let before_restart = fake.sends.lock().unwrap().len();
    assert!(
        before_restart < 60,
        "the kill came too late to test anything ({before_restart} sent)"
    );

    fake.delay_ms.store(0, Ordering::SeqCst);
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
