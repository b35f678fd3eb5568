//! Load benchmark: N simulated customers against the release binary, on SQLite or on N
//! instances sharing one PostgreSQL database.
//!
//! ```sh
//! cargo build --release --bin flowgate --examples
//! target/release/examples/loadtest --scenario reference --customers 200 --seconds 20
//! target/release/examples/loadtest --compare --database postgres://postgres@127.0.0.1:5432/bench
//! ```
//!
//! Each customer runs a closed loop through a conversation: send a signed webhook, wait until
//! the bot's reply arrives at a fake Graph API (started here, on 127.0.0.1), check its text
//! word for word, send the next message. The server is the real `flowgate serve` process,
//! spawned here, with a `cloud_api` channel pointed at the fake.
//!
//! Scenarios (`--scenario`):
//! - `reference` (the default): `examples/loadtest/flows/reference.yaml`, four exchanges: a
//!   greeting answered with reply buttons, a button tap, an `ask` with a regex `expect`, a
//!   Rhai step and interpolation, a final `ask` and a `say`;
//! - `survey`: three exchanges of plain text (name, rating, thanks).
//!
//! As WhatsApp does, the customers' webhooks carry the phone and the BSUID, the server marks
//! each customer message read (with the typing indicator) before replying, and the fake posts
//! `sent`, `delivered` and `read` statuses back for every message it accepted, as signed
//! webhooks (`--no-statuses` turns that off), so status processing is part of the cost.
//!
//! Printed per phase: replies per second, webhook-to-reply latency (p50, p90, p99), webhook
//! acknowledgement latency (p50, p99), the server's CPU time per reply (its
//! `/proc/PID/stat` utime + stime over the phase, divided by the replies), its RSS, the
//! messages stored, and the statuses posted.
//!
//! Growth: `--phases K` runs K phases of `--seconds` back to back with the same customers
//! (the database grows all along); `--seed-messages N` runs the phases on a fresh database,
//! stops the server, writes N more messages of past conversations straight into its SQLite
//! file (big transactions; about a minute for 10 million), starts it again and runs the
//! phases again, then prints grown / fresh.
//!
//! The channel's `throughput_mps` is set far above Meta's 80/1,000, and recipient pacing
//! (Meta's pair limit: a burst, then one message per 6 s) is off, so the benchmark measures
//! flowgate, not the pacing it applies on purpose: each simulated customer gets a reply to
//! every message as fast as the engine can produce it.
//!
//! `--campaign-recipients N` (survey or reference) measures replies idle and then while a
//! campaign sends to N other contacts at `--campaign-rate`.
//!
//! Several instances on PostgreSQL: `--database postgres://…` runs the server on a fresh
//! schema of that database (dropped at the end), `--instances N` starts N `flowgate serve`
//! processes on it. The customers' webhooks and the fake's status webhooks go to the
//! instances round robin (one webhook to the next instance), as a balancer would; the server
//! CPU and RSS are summed over the instances, and the CPU of the database's PostgreSQL
//! backends is printed beside them. The fake counts sends that repeat an idempotency key
//! (`duplicate sends`: a message sent twice).
//!
//! `--compare --database postgres://…` runs SQLite, then PostgreSQL with 1, 2 and 3
//! instances back to back (one phase each), and prints replies/s and p50/p99 for each in one
//! table.
//!
//! For profiling: `LOADTEST_SERVER_LOG` sets the server's `RUST_LOG` (e.g. `sqlx=debug` logs
//! every statement), and `LOADTEST_KEEP_DB=path` copies the database there at the end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::mpsc;

const APP_SECRET: &str = "loadtest-app-secret";
const PHONE_NUMBER_ID: &str = "110000000000001";
/// The profile name every customer's webhook carries (`{{contact.name}}`).
const PROFILE_NAME: &str = "Load";

const SURVEY: &str = r#"
flow: survey
triggers:
  - keywords: [hi]
    interrupt: true
steps:
  name:
    ask: "What's your name?"
    save: name
    next: rating
  rating:
    ask: "Hi {{name}}, how would you rate us from 1 to 5?"
    save: rating
    expect: number
    next:
      - if: 'rating >= 4'
        goto: happy
      - goto: sad
  happy:
    say: "Thanks {{name}}! 🎉"
  sad:
    say: "Sorry to hear that, {{name}}."
"#;

const REFERENCE: &str = include_str!("loadtest/flows/reference.yaml");

#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    Survey,
    Reference,
}

/// What a customer sends.
enum Say {
    Text(String),
    Button {
        id: &'static str,
        title: &'static str,
    },
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Survey => "survey",
            Scenario::Reference => "reference",
        }
    }

    fn flow(self) -> &'static str {
        match self {
            Scenario::Survey => SURVEY,
            Scenario::Reference => REFERENCE,
        }
    }

    fn exchanges(self) -> u64 {
        match self {
            Scenario::Survey => 3,
            Scenario::Reference => 4,
        }
    }

    /// Exchange `i` of conversation `round` of customer `c`: what they send and the exact
    /// text of the reply they expect. The reference's order number and rating vary, and its
    /// expected delivery estimate is computed here as the flow's script computes it.
    fn exchange(self, c: usize, round: u64, i: u64) -> (Say, String) {
        match (self, i) {
            (Scenario::Survey, 0) => (Say::Text("hi".into()), "What's your name?".into()),
            (Scenario::Survey, 1) => (
                Say::Text("Ana".into()),
                "Hi Ana, how would you rate us from 1 to 5?".into(),
            ),
            (Scenario::Survey, _) => (Say::Text("5".into()), "Thanks Ana! 🎉".into()),
            (Scenario::Reference, 0) => (
                Say::Text("hi".into()),
                format!("Hi {PROFILE_NAME}! How can we help you today?"),
            ),
            (Scenario::Reference, 1) => (
                Say::Button {
                    id: "order",
                    title: "My order",
                },
                "What's your order number?".into(),
            ),
            (Scenario::Reference, 2) => {
                let order = 100_000 + (c as u64 * 7_919 + round * 13) % 900_000;
                let days = order % 5 + 1;
                let eta = if days == 1 {
                    "1 day".to_string()
                } else {
                    format!("{days} days")
                };
                (
                    Say::Text(order.to_string()),
                    format!(
                        "Order {order} arrives in {eta}. How would you rate us from 1 to 5, \
                         {PROFILE_NAME}?"
                    ),
                )
            }
            (Scenario::Reference, _) => {
                let rating = 1 + (c as u64 + round) % 5;
                (
                    Say::Text(rating.to_string()),
                    format!("Thanks {PROFILE_NAME}, you rated us {rating}. See you soon!"),
                )
            }
        }
    }
}

#[derive(Clone)]
struct Args {
    scenario: Scenario,
    customers: usize,
    seconds: u64,
    /// Phases of `seconds` run back to back (each printed).
    phases: usize,
    /// Messages written into the database between the fresh and the grown phases (0: none).
    seed_messages: u64,
    /// The fake posts sent/delivered/read statuses back.
    statuses: bool,
    binary: String,
    /// Contacts a campaign sends to while the customers chat (0: no campaign phase).
    campaign_recipients: usize,
    /// The campaign's `rate`, sends per second.
    campaign_rate: u32,
    /// `flowgate serve` processes on one database.
    instances: usize,
    /// A PostgreSQL URL (a fresh schema of it per run); `None`: a SQLite file.
    database: Option<String>,
    /// SQLite, then 1, 2 and 3 instances on `database`, in one table.
    compare: bool,
}

const USAGE: &str = "use --scenario survey|reference --customers N --seconds N --phases K \
    --seed-messages N --no-statuses --bin PATH --campaign-recipients N --campaign-rate R \
    --instances N --database postgres://… --compare";

fn args() -> Args {
    let mut args = Args {
        scenario: Scenario::Reference,
        customers: 200,
        seconds: 20,
        phases: 1,
        seed_messages: 0,
        statuses: true,
        binary: format!("{}/target/release/flowgate", env!("CARGO_MANIFEST_DIR")),
        campaign_recipients: 0,
        campaign_rate: 100,
        instances: 1,
        database: None,
        compare: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--no-statuses" {
            args.statuses = false;
            continue;
        }
        if a == "--compare" {
            args.compare = true;
            continue;
        }
        let value = it.next().unwrap_or_default();
        let number = |what: &str| -> u64 {
            value
                .replace('_', "")
                .parse()
                .unwrap_or_else(|_| panic!("{what} takes a number, not `{value}`; {USAGE}"))
        };
        match a.as_str() {
            "--scenario" => {
                args.scenario = match value.as_str() {
                    "survey" => Scenario::Survey,
                    "reference" => Scenario::Reference,
                    other => panic!("unknown scenario `{other}`: use survey or reference"),
                }
            }
            "--customers" => args.customers = number("--customers") as usize,
            "--seconds" => args.seconds = number("--seconds"),
            "--phases" => args.phases = number("--phases").max(1) as usize,
            "--seed-messages" => args.seed_messages = number("--seed-messages"),
            "--bin" => args.binary = value,
            "--campaign-recipients" => {
                args.campaign_recipients = number("--campaign-recipients") as usize
            }
            "--campaign-rate" => args.campaign_rate = number("--campaign-rate") as u32,
            "--instances" => args.instances = number("--instances").max(1) as usize,
            "--database" => {
                assert!(
                    value.starts_with("postgres://") || value.starts_with("postgresql://"),
                    "--database takes a postgres:// URL, not `{value}` (SQLite is the default)"
                );
                args.database = Some(value)
            }
            other => panic!("unknown argument {other}; {USAGE}"),
        }
    }
    assert!(
        args.instances == 1 || args.database.is_some(),
        "--instances {} needs --database postgres://… (SQLite serves one instance)",
        args.instances
    );
    assert!(
        !args.compare || args.database.is_some(),
        "--compare needs --database postgres://…"
    );
    assert!(
        args.seed_messages == 0 || args.database.is_none(),
        "--seed-messages writes into the SQLite file: leave out --database"
    );
    args
}

/// A reply the fake accepted: when, and its text.
type Reply = (Instant, String);
/// Who is waiting for a reply: the customer's number -> where to tell them.
type Waiters = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Reply>>>>;

#[derive(Clone)]
struct Fake {
    waiters: Waiters,
    sends: Arc<AtomicU64>,
    /// Sends to numbers no customer waits on: the campaign's.
    campaign_sends: Arc<AtomicU64>,
    mark_reads: Arc<AtomicU64>,
    /// Accepted messages whose statuses are to be posted back.
    statuses: Option<mpsc::UnboundedSender<Accepted>>,
    /// Statuses queued and statuses posted (answered 200).
    statuses_queued: Arc<AtomicU64>,
    statuses_posted: Arc<AtomicU64>,
    statuses_failed: Arc<AtomicU64>,
    /// Idempotency keys sent so far, and sends that repeated one.
    keys: Arc<Mutex<std::collections::HashSet<String>>>,
    duplicates: Arc<AtomicU64>,
}

/// A message the fake accepted: its wamid, recipient and `biz_opaque_callback_data`
/// (echoed in its statuses, as WhatsApp does).
struct Accepted {
    wamid: String,
    to: String,
    key: Option<String>,
}

/// The text a send shows the customer: a text's body, an interactive message's body, or a
/// template's name.
fn sent_text(json: &serde_json::Value) -> String {
    let text = json["text"]["body"]
        .as_str()
        .or_else(|| json["interactive"]["body"]["text"].as_str())
        .or_else(|| json["template"]["name"].as_str());
    text.unwrap_or_default().to_string()
}

async fn fake_send(State(fake): State<Fake>, body: Bytes) -> axum::response::Response {
    use axum::response::IntoResponse;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if json.get("status").and_then(|s| s.as_str()) == Some("read") {
        fake.mark_reads.fetch_add(1, Ordering::Relaxed);
        return axum::Json(serde_json::json!({"success": true})).into_response();
    }
    let to = json["to"]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches('+')
        .to_string();
    let n = fake.sends.fetch_add(1, Ordering::Relaxed);
    let wamid = format!("wamid.load.{n}");
    if let Some(key) = json["biz_opaque_callback_data"].as_str()
        && !fake.keys.lock().unwrap().insert(key.to_string())
    {
        fake.duplicates.fetch_add(1, Ordering::Relaxed);
    }
    match fake.waiters.lock().unwrap().get(&to) {
        Some(tx) => {
            let _ = tx.send((Instant::now(), sent_text(&json)));
        }
        None => {
            fake.campaign_sends.fetch_add(1, Ordering::Relaxed);
        }
    }
    if let Some(statuses) = &fake.statuses {
        fake.statuses_queued.fetch_add(3, Ordering::Relaxed);
        let key = json["biz_opaque_callback_data"]
            .as_str()
            .map(str::to_string);
        let accepted = Accepted {
            wamid: wamid.clone(),
            to: to.clone(),
            key,
        };
        let _ = statuses.send(accepted);
    }
    axum::Json(serde_json::json!({
        "messaging_product": "whatsapp",
        "contacts": [{"input": format!("+{to}"), "wa_id": to}],
        "messages": [{"id": wamid}],
    }))
    .into_response()
}

/// The number's messaging limit, which `serve` reads at start: unlimited.
async fn fake_limit() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({
        "whatsapp_business_manager_messaging_limit": "TIER_UNLIMITED", "id": PHONE_NUMBER_ID,
    }))
}

/// Posts `sent`, `delivered` and `read` for each accepted message, one after another, as
/// signed webhooks (a refused post is tried again, at most 5 times). Several of these run at
/// once, as WhatsApp's deliveries do.
async fn post_statuses(
    fake: Fake,
    rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Accepted>>>,
    client: reqwest::Client,
    urls: RoundRobin,
) {
    loop {
        let next = rx.lock().await.recv().await;
        let Some(accepted) = next else { return };
        for status in ["sent", "delivered", "read"] {
            let body = status_webhook(&accepted, status);
            let signature = sign(&body);
            let mut tries = 0;
            loop {
                let answer = client
                    .post(urls.next())
                    .header("content-type", "application/json")
                    .header("x-hub-signature-256", &signature)
                    .body(body.clone())
                    .send()
                    .await;
                if answer.is_ok_and(|r| r.status().is_success()) {
                    fake.statuses_posted.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                tries += 1;
                if tries == 5 {
                    fake.statuses_failed.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A status webhook as WhatsApp posts it for a message sent to a phone: the phone and the
/// BSUID, the send's `biz_opaque_callback_data`, and pricing on `sent` and `delivered`.
fn status_webhook(accepted: &Accepted, status: &str) -> String {
    let Accepted { wamid, to, key } = accepted;
    let mut item = serde_json::json!({
        "id": wamid, "status": status, "biz_opaque_callback_data": key,
        "timestamp": chrono::Utc::now().timestamp().to_string(),
        "recipient_id": to, "recipient_user_id": format!("US.{to}"),
    });
    if status != "read" {
        item["pricing"] = serde_json::json!({"billable": false, "pricing_model": "PMP",
            "type": "free_customer_service", "category": "service"});
    }
    envelope(serde_json::json!({"statuses": [item]}))
}

fn envelope(value: serde_json::Value) -> String {
    let mut v = serde_json::json!({
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550001111", "phone_number_id": PHONE_NUMBER_ID},
    });
    if let (Some(v), Some(extra)) = (v.as_object_mut(), value.as_object()) {
        v.extend(extra.clone());
    }
    serde_json::json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": "100000000000001", "changes": [{"field": "messages", "value": v}]}],
    })
    .to_string()
}

/// A customer's message as Meta sends it since April 2026: the phone and the business-scoped
/// user id (here `US.` and the phone) side by side.
fn webhook(wa_id: &str, wamid: &str, say: &Say) -> String {
    let user_id = format!("US.{wa_id}");
    let mut message = serde_json::json!({"from": wa_id, "from_user_id": user_id, "id": wamid,
        "timestamp": chrono::Utc::now().timestamp().to_string()});
    match say {
        Say::Text(text) => {
            message["type"] = "text".into();
            message["text"] = serde_json::json!({"body": text});
        }
        Say::Button { id, title } => {
            message["type"] = "interactive".into();
            message["interactive"] = serde_json::json!({"type": "button_reply",
                "button_reply": {"id": id, "title": title}});
        }
    }
    envelope(serde_json::json!({
        "contacts": [{"profile": {"name": PROFILE_NAME}, "wa_id": wa_id, "user_id": user_id}],
        "messages": [message],
    }))
}

fn sign(body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(APP_SECRET.as_bytes()).expect("any key length");
    mac.update(body.as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The server process; killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Server {
    /// CPU time the process used so far (user + system, all threads).
    fn cpu(&self) -> Duration {
        cpu_time(&format!("/proc/{}/stat", self.0.id()))
    }

    /// Resident memory now and its peak, in MiB, from `/proc/PID/status`.
    fn rss(&self) -> (f64, f64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap_or_default();
        let kb = |key: &str| -> f64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (kb("VmRSS:") / 1024.0, kb("VmHWM:") / 1024.0)
    }

    /// SIGTERM, then waits (at most 30 s) for the process to end; SIGKILL after that.
    /// Returns its exit status when it ended by itself.
    fn stop(mut self) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

/// The instances' webhook URLs, taken in turn (a balancer in front of them).
#[derive(Clone)]
struct RoundRobin {
    urls: Arc<Vec<String>>,
    next: Arc<AtomicU64>,
}

impl RoundRobin {
    fn new(urls: Vec<String>) -> Self {
        Self {
            urls: Arc::new(urls),
            next: Arc::new(AtomicU64::new(0)),
        }
    }

    fn next(&self) -> &str {
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        &self.urls[i % self.urls.len()]
    }
}

/// The instances of one run.
struct Servers(Vec<Server>);

impl Servers {
    /// CPU time all instances used so far.
    fn cpu(&self) -> Duration {
        self.0.iter().map(Server::cpu).sum()
    }

    /// Resident memory now and peak, summed over the instances.
    fn rss(&self) -> (f64, f64) {
        self.0
            .iter()
            .map(Server::rss)
            .fold((0.0, 0.0), |(a, b), (c, d)| (a + c, b + d))
    }

    /// SIGTERM to every instance, then waits for each; says how each ended (a clean
    /// drain exits 0).
    fn stop(self) {
        let started = Instant::now();
        let ended: Vec<String> = self
            .0
            .into_iter()
            .map(|server| match server.stop() {
                Some(status) => status.to_string(),
                None => "killed after 30 s".to_string(),
            })
            .collect();
        println!(
            "servers stopped:    SIGTERM -> {} in {:.1} s",
            ended.join(", "),
            started.elapsed().as_secs_f64()
        );
    }
}

/// Where the run's data is: a SQLite file, or a schema of its own on PostgreSQL.
enum Store {
    Sqlite(PathBuf),
    Postgres {
        /// The server's URL, as given.
        base: String,
        schema: String,
        /// The instances' `database:` URL (the schema as their search path).
        url: String,
    },
}

impl Store {
    async fn new(dir: &Path, database: Option<&str>) -> Store {
        let Some(base) = database else {
            return Store::Sqlite(dir.join("flowgate.db"));
        };
        let schema = flowgate::store::create_test_schema(base, "loadtest")
            .await
            .unwrap_or_else(|e| panic!("cannot create a schema on {base}: {e}"));
        let separator = if base.contains('?') { '&' } else { '?' };
        Store::Postgres {
            url: format!("{base}{separator}options[search_path]={schema}"),
            base: base.to_string(),
            schema,
        }
    }

    fn url(&self) -> String {
        match self {
            Store::Sqlite(path) => format!("sqlite://{}", path.display()),
            Store::Postgres { url, .. } => url.clone(),
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "SQLite",
            Store::Postgres { .. } => "PostgreSQL",
        }
    }

    /// The messages stored so far.
    async fn count_messages(&self) -> i64 {
        match self {
            Store::Sqlite(path) => count_messages(path),
            Store::Postgres { url, .. } => {
                let sql = "SELECT COALESCE(MAX(id), 0) FROM messages";
                match postgres(url).await {
                    Some(mut conn) => sqlx::query_scalar(sql)
                        .fetch_one(&mut conn)
                        .await
                        .unwrap_or(-1),
                    None => -1,
                }
            }
        }
    }

    /// The PostgreSQL server processes serving this database now (none on SQLite).
    async fn backends(&self) -> Vec<i32> {
        let Store::Postgres { url, .. } = self else {
            return Vec::new();
        };
        let Some(mut conn) = postgres(url).await else {
            return Vec::new();
        };
        sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap_or_default()
    }

    /// Drops the run's schema.
    async fn clean_up(self) {
        if let Store::Postgres { base, schema, .. } = self
            && let Some(mut conn) = postgres(&base).await
        {
            let drop = format!("DROP SCHEMA {schema} CASCADE");
            if let Err(e) = sqlx::query(&drop).execute(&mut conn).await {
                eprintln!("dropping the schema {schema} failed: {e}");
            }
        }
    }
}

/// A connection to PostgreSQL at `url` (flowgate's `max_connections` taken out).
async fn postgres(url: &str) -> Option<sqlx::PgConnection> {
    use sqlx::Connection as _;
    let url = url
        .split(['?', '&'])
        .filter(|p| !p.starts_with("max_connections="))
        .enumerate()
        .map(|(i, p)| match i {
            0 => p.to_string(),
            1 => format!("?{p}"),
            _ => format!("&{p}"),
        })
        .collect::<String>();
    sqlx::PgConnection::connect(&url).await.ok()
}

/// CPU time of the processes `pids` so far (0 for those gone).
fn cpu_of(pids: &[i32]) -> HashMap<i32, Duration> {
    pids.iter()
        .map(|pid| (*pid, cpu_time(&format!("/proc/{pid}/stat"))))
        .collect()
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux unless it says otherwise).
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100)
    })
}

/// The CPU time this process (the load generator and the fake) used so far.
fn own_cpu() -> Duration {
    cpu_time("/proc/self/stat")
}

/// User + system CPU time from a `/proc/…/stat` file: after the command's closing
/// parenthesis the state is field 3, utime field 14 and stime field 15, in clock ticks.
fn cpu_time(stat: &str) -> Duration {
    let stat = std::fs::read_to_string(stat).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> u64 { fields.get(i).and_then(|f| f.parse().ok()).unwrap_or(0) };
    Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / clock_ticks() as f64)
}

/// The campaign of the campaign phase: the template to every imported contact (tag
/// `campaign`) at `--campaign-rate`; scheduled far ahead, started by run-now.
fn campaign_yaml(rate: u32) -> String {
    format!(
        "campaign: loadtest\nchannel: main\ncategory: marketing\n\
         template: {{ name: spring_sale, language: en_US, params: [\"{{{{contact.name}}}}\"] }}\n\
         audience:\n  tags: [campaign]\nat: 2030-01-01T10:00:00\ntimezone: UTC\n\
         rate: {rate}/s\nttl: 24h\n"
    )
}

const TEMPLATES: &str = r#"
templates:
  - name: spring_sale
    language: en_US
    category: marketing
    status: approved
    body: "Hi {{1}}! Our spring sale starts today."
"#;

const ADMIN_TOKEN: &str = "loadtest-admin-token";
/// Statuses posted at once (each poster posts one message's three in turn): enough to keep
/// up with the replies, as WhatsApp's deliveries do.
const STATUS_POSTERS: usize = 256;

/// Writes the project (flow, and with a campaign its template and file) and the config.
fn write_project(
    dir: &Path,
    args: &Args,
    fake_addr: SocketAddr,
    (database, port, instance): (&str, u16, usize),
) -> PathBuf {
    std::fs::create_dir_all(dir.join("flows")).unwrap();
    let flow_file = format!("flows/{}.yaml", args.scenario.name());
    std::fs::write(dir.join(flow_file), args.scenario.flow()).unwrap();
    let mut config = format!(
        "database: \"{database}\"\nlisten: 127.0.0.1:{port}\nflows: flows\noutbox:\n  pace_recipients: false\nchannels:\n  - name: main\n    provider: cloud_api\n    phone_number_id: \"{PHONE_NUMBER_ID}\"\n    access_token: load-token\n    app_secret: {APP_SECRET}\n    verify_token: load-verify\n    api_base: http://{fake_addr}/v23.0\n    throughput_mps: 100000\n"
    );
    if args.campaign_recipients > 0 {
        std::fs::create_dir_all(dir.join("campaigns")).unwrap();
        std::fs::write(dir.join("templates.yaml"), TEMPLATES).unwrap();
        std::fs::write(
            dir.join("campaigns/loadtest.yaml"),
            campaign_yaml(args.campaign_rate),
        )
        .unwrap();
        config.push_str(&format!(
            "templates: templates.yaml\ncampaigns: campaigns\nadmin:\n  token: {ADMIN_TOKEN}\n"
        ));
    }
    let path = dir.join(format!("flowgate-{instance}.yaml"));
    std::fs::write(&path, config).unwrap();
    path
}

/// Starts `flowgate serve` and waits (at most 30 s) until it answers `/healthz`.
async fn start_server(binary: &str, config: &Path, client: &reqwest::Client, base: &str) -> Server {
    let server = Server(
        Command::new(binary)
            .args(["serve", "--config"])
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("LOADTEST_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {binary} (run `cargo build --release` first): {e}")
            }),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "the server did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server
}

/// Imports the campaign's `n` contacts through `POST /api/contacts/import`, in files of
/// 100,000 lines (the endpoint takes 32 MiB at most).
async fn import_campaign_contacts(client: &reqwest::Client, base: &str, n: usize) {
    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(100_000) {
        let mut csv = String::from("wa_id,name,tags\n");
        for i in chunk {
            csv.push_str(&format!("4917{i:08},Recipient {i},campaign\n"));
        }
        let response = client
            .post(format!("{base}/api/contacts/import"))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "text/csv")
            .body(csv)
            .send()
            .await
            .expect("the import request");
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert!(status.is_success(), "the import failed: {status} {text}");
    }
    println!(
        "campaign contacts:  {n} imported in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Starts the campaign now through the admin API and waits (at most 30 s) until its first
/// send reaches the fake.
async fn start_campaign(client: &reqwest::Client, base: &str, fake: &Fake) {
    let response = client
        .post(format!("{base}/api/campaigns/loadtest/run-now"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("the run-now request");
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    assert!(status.is_success(), "run-now failed: {status} {text}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while fake.campaign_sends.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "the campaign sent nothing in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One phase's measurements.
#[derive(Default)]
struct Phase {
    name: String,
    replies: Vec<Duration>,
    acks: Vec<Duration>,
    errors: u64,
    /// Replies whose text was not the one expected.
    wrong: u64,
    elapsed: Duration,
    server_cpu: Duration,
    own_cpu: Duration,
    rss_mib: f64,
    peak_rss_mib: f64,
    statuses_posted: u64,
    /// Statuses queued at the fake but not yet posted when the phase ended.
    statuses_behind: u64,
    /// Messages in the database when the phase ended.
    messages: i64,
    /// CPU time of the database's PostgreSQL backends over the phase.
    postgres_cpu: Duration,
    /// Sends that repeated an idempotency key during the phase.
    duplicates: u64,
    /// The first instance's stage histograms over the phase (`/metrics`).
    stages: Vec<(String, Histogram)>,
}

impl Phase {
    fn p(&self, q: f64) -> f64 {
        percentile(&self.replies, q).as_secs_f64() * 1e3
    }

    fn rate(&self) -> f64 {
        self.replies.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn cpu_per_reply_ms(&self) -> f64 {
        self.server_cpu.as_secs_f64() * 1e3 / self.replies.len().max(1) as f64
    }

    fn postgres_cpu_per_reply_ms(&self) -> f64 {
        self.postgres_cpu.as_secs_f64() * 1e3 / self.replies.len().max(1) as f64
    }

    fn print(&self) {
        let name = &self.name;
        let secs = self.elapsed.as_secs_f64();
        println!(
            "[{name}] replies:            {} in {secs:.1} s = {:.0} replies/s",
            self.replies.len(),
            self.rate()
        );
        println!(
            "[{name}] webhook -> reply:   p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms",
            self.p(0.5),
            self.p(0.9),
            self.p(0.99)
        );
        println!(
            "[{name}] webhook ack:        p50 {:.1} ms, p99 {:.1} ms",
            percentile(&self.acks, 0.5).as_secs_f64() * 1e3,
            percentile(&self.acks, 0.99).as_secs_f64() * 1e3
        );
        println!(
            "[{name}] server CPU:         {:.3} ms per reply ({:.1} s over the phase = {:.0} % of a core); load generator {:.1} s",
            self.cpu_per_reply_ms(),
            self.server_cpu.as_secs_f64(),
            self.server_cpu.as_secs_f64() / secs * 100.0,
            self.own_cpu.as_secs_f64()
        );
        if self.postgres_cpu > Duration::ZERO {
            println!(
                "[{name}] PostgreSQL CPU:     {:.3} ms per reply ({:.1} s over the phase = {:.0} % of a core), this database's backends",
                self.postgres_cpu_per_reply_ms(),
                self.postgres_cpu.as_secs_f64(),
                self.postgres_cpu.as_secs_f64() / secs * 100.0,
            );
        }
        println!(
            "[{name}] server RSS:         {:.0} MiB (peak {:.0} MiB)",
            self.rss_mib, self.peak_rss_mib
        );
        println!(
            "[{name}] statuses posted:    {} ({:.0}/s), {} queued at the end; messages stored: {}",
            self.statuses_posted,
            self.statuses_posted as f64 / secs,
            self.statuses_behind,
            self.messages
        );
        println!(
            "[{name}] errors/timeouts:    {}, wrong replies: {}, duplicate sends: {}",
            self.errors, self.wrong, self.duplicates
        );
        for (stage, h) in &self.stages {
            println!(
                "[{name}] stage {stage:<13} {:>8} times, mean {:.3} ms, p50 <= {} ms, p99 <= {} ms (instance 1)",
                h.count,
                h.sum / h.count.max(1) as f64 * 1e3,
                h.bound(0.5),
                h.bound(0.99)
            );
        }
    }
}

/// One histogram of the server's `/metrics` (seconds): cumulative bucket counts by upper
/// bound, their sum and count.
#[derive(Clone, Default)]
struct Histogram {
    buckets: Vec<(f64, u64)>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// What happened since `before` (the same series, read earlier).
    fn since(&self, before: Option<&Histogram>) -> Histogram {
        let Some(b) = before else {
            return self.clone();
        };
        Histogram {
            buckets: (self.buckets.iter())
                .map(|(le, n)| {
                    let earlier = b.buckets.iter().find(|(l, _)| l == le).map_or(0, |x| x.1);
                    (*le, n - earlier.min(*n))
                })
                .collect(),
            sum: self.sum - b.sum,
            count: self.count - b.count.min(self.count),
        }
    }

    /// The upper bound (ms) of the bucket holding quantile `q`, as text ("inf" past the last).
    fn bound(&self, q: f64) -> String {
        let rank = (self.count as f64 * q).ceil() as u64;
        (self.buckets.iter())
            .find(|(_, n)| *n >= rank.max(1))
            .map_or("inf".into(), |(le, _)| format!("{}", le * 1e3))
    }
}

/// The stage histograms a server exposes at `/metrics`: the webhook's acknowledgement,
/// each `flowgate_stage_seconds{stage}` and the send, in a reply's order.
async fn stage_histograms(client: &reqwest::Client, base: &str) -> Vec<(String, Histogram)> {
    let text = match client
        .get(format!("{base}/metrics"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
    {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => return Vec::new(),
    };
    let series = [
        ("webhook_ack", "flowgate_webhook_ack_seconds", ""),
        (
            "inbox_wait",
            "flowgate_stage_seconds",
            "stage=\"inbox_wait\"",
        ),
        ("turn", "flowgate_stage_seconds", "stage=\"turn\""),
        ("commit", "flowgate_stage_seconds", "stage=\"commit\""),
        (
            "outbox_claim",
            "flowgate_stage_seconds",
            "stage=\"outbox_claim\"",
        ),
        ("send", "flowgate_send_seconds", ""),
    ];
    let mut out = Vec::new();
    for (stage, name, label) in series {
        let mut h = Histogram::default();
        for line in text
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(label))
        {
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let value: f64 = value.parse().unwrap_or(0.0);
            if key.starts_with(&format!("{name}_bucket")) {
                let le = key
                    .split("le=\"")
                    .nth(1)
                    .and_then(|v| v.split('"').next())
                    .map_or(f64::INFINITY, |v| v.parse().unwrap_or(f64::INFINITY));
                // `send` is labelled by outcome: add its series up.
                match h.buckets.iter_mut().find(|(l, _)| *l == le) {
                    Some(b) => b.1 += value as u64,
                    None => h.buckets.push((le, value as u64)),
                }
            } else if key.starts_with(&format!("{name}_sum")) {
                h.sum += value;
            } else if key.starts_with(&format!("{name}_count")) {
                h.count += value as u64;
            }
        }
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        out.push((stage.to_string(), h));
    }
    out
}

/// A customer: their number, their reply inbox, and how many conversations they began.
struct Customer {
    index: usize,
    wa_id: String,
    rx: mpsc::UnboundedReceiver<Reply>,
    round: u64,
}

/// What one customer measured in a phase.
#[derive(Default)]
struct Tally {
    replies: Vec<Duration>,
    acks: Vec<Duration>,
    errors: u64,
    wrong: u64,
}

/// How many wrong replies are shown (the rest are counted).
static SHOWN_WRONG: AtomicU64 = AtomicU64::new(0);

/// One customer's closed loop until `stop_at`. Each phase starts a new conversation (`hi`
/// interrupts one in progress); an error or a wrong reply starts a new one too.
async fn customer(
    client: reqwest::Client,
    urls: RoundRobin,
    (scenario, phase): (Scenario, usize),
    mut me: Customer,
    stop_at: Instant,
) -> (Tally, Customer) {
    let mut tally = Tally::default();
    let mut i = 0u64;
    let mut n = 0u64;
    while Instant::now() < stop_at {
        if i == 0 {
            me.round += 1;
        }
        let (say, expected) = scenario.exchange(me.index, me.round, i);
        let body = webhook(
            &me.wa_id,
            &format!("wamid.in.{phase}.{}.{n}", me.wa_id),
            &say,
        );
        n += 1;
        let sent = Instant::now();
        let response = client
            .post(urls.next())
            .header("content-type", "application/json")
            .header("x-hub-signature-256", sign(&body))
            .body(body)
            .send()
            .await;
        match response {
            Ok(r) if r.status().is_success() => tally.acks.push(sent.elapsed()),
            _ => {
                tally.errors += 1;
                i = 0;
                continue;
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), me.rx.recv()).await {
            Ok(Some((at, text))) if text == expected => {
                tally.replies.push(at - sent);
                i = (i + 1) % scenario.exchanges();
            }
            Ok(Some((_, text))) => {
                tally.wrong += 1;
                if SHOWN_WRONG.fetch_add(1, Ordering::Relaxed) < 3 {
                    eprintln!(
                        "wrong reply to {}: {text:?}, expected {expected:?}",
                        me.wa_id
                    );
                }
                i = 0;
            }
            _ => {
                tally.errors += 1;
                i = 0;
            }
        }
        if i == 0 {
            // Whatever was late belongs to the conversation given up.
            while me.rx.try_recv().is_ok() {}
        }
    }
    (tally, me)
}

/// The load test's moving parts.
struct Bench {
    args: Args,
    client: reqwest::Client,
    /// The first instance (for the admin API).
    base: String,
    /// Every instance's webhook URL, in turn.
    webhooks: RoundRobin,
    fake: Fake,
    store: Store,
    phases_run: usize,
}

impl Bench {
    /// Runs every customer's closed loop for `--seconds`; the customers come back for the
    /// next phase. A reply still in flight from the previous phase is dropped first.
    async fn run_phase(
        &mut self,
        server: &Servers,
        customers: &mut Vec<Customer>,
        name: &str,
    ) -> Phase {
        self.phases_run += 1;
        let stages_before = stage_histograms(&self.client, &self.base).await;
        let cpu_before = server.cpu();
        let backends_before = cpu_of(&self.store.backends().await);
        let duplicates_before = self.fake.duplicates.load(Ordering::Relaxed);
        let own_before = own_cpu();
        let posted_before = self.fake.statuses_posted.load(Ordering::Relaxed);
        let start = Instant::now();
        let stop_at = start + Duration::from_secs(self.args.seconds);
        let mut tasks = Vec::new();
        for mut c in customers.drain(..) {
            while c.rx.try_recv().is_ok() {}
            let who = (self.args.scenario, self.phases_run);
            tasks.push(tokio::spawn(customer(
                self.client.clone(),
                self.webhooks.clone(),
                who,
                c,
                stop_at,
            )));
        }
        let mut out = Phase {
            name: name.to_string(),
            ..Phase::default()
        };
        for t in tasks {
            let (tally, c) = t.await.unwrap();
            out.replies.extend(tally.replies);
            out.acks.extend(tally.acks);
            out.errors += tally.errors;
            out.wrong += tally.wrong;
            customers.push(c);
        }
        out.elapsed = start.elapsed();
        out.server_cpu = server.cpu().saturating_sub(cpu_before);
        out.stages = (stage_histograms(&self.client, &self.base).await)
            .into_iter()
            .map(|(stage, h)| {
                let before = stages_before.iter().find(|(s, _)| *s == stage);
                let since = h.since(before.map(|(_, h)| h));
                (stage, since)
            })
            .collect();
        let backends_after = cpu_of(&self.store.backends().await);
        out.postgres_cpu = backends_after
            .iter()
            .map(|(pid, cpu)| {
                cpu.saturating_sub(backends_before.get(pid).copied().unwrap_or_default())
            })
            .sum();
        out.duplicates = self.fake.duplicates.load(Ordering::Relaxed) - duplicates_before;
        out.own_cpu = own_cpu().saturating_sub(own_before);
        (out.rss_mib, out.peak_rss_mib) = server.rss();
        let posted = self.fake.statuses_posted.load(Ordering::Relaxed);
        out.statuses_posted = posted - posted_before;
        out.statuses_behind = self.statuses_behind();
        out.messages = self.store.count_messages().await;
        out.replies.sort();
        out.acks.sort();
        out.print();
        self.drain_statuses().await;
        out
    }

    fn statuses_behind(&self) -> u64 {
        let f = &self.fake;
        f.statuses_queued.load(Ordering::Relaxed)
            - f.statuses_posted.load(Ordering::Relaxed)
            - f.statuses_failed.load(Ordering::Relaxed)
    }

    /// Waits (at most 60 s) until the fake posted every status it owes, so the next phase
    /// starts with none behind.
    async fn drain_statuses(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.statuses_behind() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The messages stored so far (read-only; the server's WAL shows its commits).
fn count_messages(db: &Path) -> i64 {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
    rusqlite::Connection::open_with_flags(db, flags)
        .and_then(|c| {
            c.query_row("SELECT COALESCE(MAX(id), 0) FROM messages", [], |r| {
                r.get(0)
            })
        })
        .unwrap_or(-1)
}

/// Writes `n` messages of past conversations into the (stopped) server's database, as a
/// year of traffic: copies of the customers' stored rows (their bodies, kinds, decisions),
/// 100 to a contact of their own, spread over the last 365 days, every outbound one `read`.
/// One transaction per 200,000 rows; keys are zero-padded so every index grows at its end.
/// Returns the contacts written.
fn seed_messages(db: &Path, n: u64) -> rusqlite::Result<u64> {
    use rusqlite::types::Value;
    let mut conn = rusqlite::Connection::open(db)?;
    conn.pragma_update(None, "synchronous", "OFF")?;
    let columns: Vec<String> = {
        let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('messages')")?;
        let names = stmt.query_map([], |r| r.get::<_, String>(0))?;
        names
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|c| c != "id")
            .collect()
    };
    let list = columns.join(", ");
    let models: Vec<Vec<Value>> = {
        let sql = format!(
            "SELECT {list} FROM messages WHERE contact_id = (SELECT MIN(contact_id) FROM messages) \
             ORDER BY id LIMIT 100"
        );
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map([], |r| {
            (0..columns.len())
                .map(|i| r.get::<_, Value>(i))
                .collect::<Result<Vec<_>, _>>()
        })?;
        rows.collect::<Result<_, _>>()?
    };
    assert!(
        !models.is_empty(),
        "no stored messages to copy: run a phase first"
    );
    let at = |name: &str| columns.iter().position(|c| c == name);
    let (contact, wamid, key, reply_to) = (
        at("contact_id").expect("messages.contact_id"),
        at("wamid").expect("messages.wamid"),
        at("idempotency_key"),
        at("in_reply_to"),
    );
    let direction = at("direction").expect("messages.direction");
    let status = at("status").expect("messages.status");
    let times: Vec<usize> = ["created_at", "updated_at"]
        .iter()
        .filter_map(|c| at(c))
        .collect();
    let leases: Vec<usize> = ["lease_until", "lease_owner", "expires_at"]
        .iter()
        .filter_map(|c| at(c))
        .collect();
    let now = chrono::Utc::now().timestamp_millis();
    let year = 365 * 24 * 3_600_000i64;
    let placeholders = vec!["?"; columns.len()].join(", ");
    let insert = format!("INSERT INTO messages ({list}) VALUES ({placeholders})");
    let per_contact = 100u64;
    let mut contacts = 0u64;
    let mut contact_id = 0i64;
    let mut last_inbound = Value::Null;
    let mut i = 0u64;
    while i < n {
        let tx = conn.transaction()?;
        {
            let mut add_contact = tx.prepare(
                "INSERT INTO contacts (channel, wa_id, name, created_at, updated_at) \
                 VALUES ('main', ?1, 'Seed', ?2, ?2)",
            )?;
            let mut add = tx.prepare(&insert)?;
            let end = (i + 200_000).min(n);
            while i < end {
                let t = now - year + (i as i128 * year as i128 / n as i128) as i64;
                if i.is_multiple_of(per_contact) {
                    add_contact.execute(rusqlite::params![format!("4930{contacts:09}"), t])?;
                    contact_id = tx.last_insert_rowid();
                    contacts += 1;
                }
                let mut row = models[(i % models.len() as u64) as usize].clone();
                row[contact] = Value::Integer(contact_id);
                let inbound = matches!(&row[direction], Value::Text(d) if d == "in");
                row[wamid] = Value::Text(format!("wamid.seed.{i:010}"));
                if inbound {
                    last_inbound = row[wamid].clone();
                } else {
                    row[status] = Value::Text("read".into());
                    if let Some(k) = key.filter(|&k| row[k] != Value::Null) {
                        row[k] = Value::Text(format!("seed-{i:010}"));
                    }
                    if let Some(r) = reply_to.filter(|&r| row[r] != Value::Null) {
                        row[r] = last_inbound.clone();
                    }
                }
                for &c in &times {
                    row[c] = Value::Integer(t);
                }
                for &c in &leases {
                    row[c] = Value::Null;
                }
                add.execute(rusqlite::params_from_iter(row))?;
                i += 1;
            }
        }
        tx.commit()?;
        eprint!("\rseeding:            {i} of {n} messages");
    }
    eprintln!();
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
    Ok(contacts)
}

#[tokio::main]
async fn main() {
    let args = args();
    if !args.compare {
        let (instances, database) = (args.instances, args.database.clone());
        run(args, instances, database).await;
        return;
    }
    // One phase per setup, back to back, then one table.
    let database = args.database.clone();
    let setups = [
        (1, None),
        (1, database.clone()),
        (2, database.clone()),
        (3, database),
    ];
    let mut rows = Vec::new();
    for (instances, database) in setups {
        let args = Args {
            phases: 1,
            ..args.clone()
        };
        let label = match &database {
            None => "SQLite, 1 instance".to_string(),
            Some(_) => format!("PostgreSQL, {instances} instance(s)"),
        };
        let phase = run(args, instances, database).await.remove(0);
        rows.push((label, phase, load_average()));
        println!();
    }
    println!(
        "comparison: scenario {}, {} customers, {} s each, statuses {}, {} CPUs",
        args.scenario.name(),
        args.customers,
        args.seconds,
        if args.statuses { "on" } else { "off" },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "| setup | replies/s | p50 ms | p99 ms | flowgate CPU ms/reply | PostgreSQL CPU ms/reply | errors | wrong | duplicate sends | load (1 min) |"
    );
    println!("| --- | --: | --: | --: | --: | --: | --: | --: | --: | --: |");
    for (label, p, load) in rows {
        println!(
            "| {label} | {:.0} | {:.1} | {:.1} | {:.3} | {:.3} | {} | {} | {} | {load} |",
            p.rate(),
            p.p(0.5),
            p.p(0.99),
            p.cpu_per_reply_ms(),
            p.postgres_cpu_per_reply_ms(),
            p.errors,
            p.wrong,
            p.duplicates
        );
    }
}

/// The machine's load average over the last minute (`/proc/loadavg`).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

/// One run: a fake Graph API, `instances` servers on a fresh database (a SQLite file, or a
/// schema of `database`), the phases; returns the phases (the fresh ones with
/// `--seed-messages`).
async fn run(args: Args, instances: usize, database: Option<String>) -> Vec<Phase> {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (status_tx, status_rx) = mpsc::unbounded_channel();
    let fake = Fake {
        waiters: Arc::new(Mutex::new(HashMap::new())),
        sends: Arc::new(AtomicU64::new(0)),
        campaign_sends: Arc::new(AtomicU64::new(0)),
        mark_reads: Arc::new(AtomicU64::new(0)),
        statuses: args.statuses.then_some(status_tx),
        statuses_queued: Arc::new(AtomicU64::new(0)),
        statuses_posted: Arc::new(AtomicU64::new(0)),
        statuses_failed: Arc::new(AtomicU64::new(0)),
        keys: Arc::new(Mutex::new(std::collections::HashSet::new())),
        duplicates: Arc::new(AtomicU64::new(0)),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_addr: SocketAddr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/{*path}", post(fake_send).get(fake_limit))
        .with_state(fake.clone());
    let fake_server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let store = Store::new(dir.path(), database.as_deref()).await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.customers + 64)
        .build()
        .unwrap();
    let mut configs = Vec::new();
    let mut bases = Vec::new();
    for i in 0..instances {
        let port = free_port();
        let url = store.url();
        configs.push(write_project(dir.path(), &args, fake_addr, (&url, port, i)));
        bases.push(format!("http://127.0.0.1:{port}"));
    }
    let mut servers = Vec::new();
    for (config, base) in configs.iter().zip(&bases) {
        servers.push(start_server(&args.binary, config, &client, base).await);
    }
    let mut servers = Servers(servers);
    let webhooks = RoundRobin::new(bases.iter().map(|b| format!("{b}/webhook/main")).collect());
    let status_rx = Arc::new(tokio::sync::Mutex::new(status_rx));
    let mut posters = Vec::new();
    for _ in 0..STATUS_POSTERS {
        let task = post_statuses(
            fake.clone(),
            status_rx.clone(),
            client.clone(),
            webhooks.clone(),
        );
        posters.push(tokio::spawn(task));
    }

    println!(
        "flowgate load test: scenario {}, {} customers, {} phase(s) of {} s, statuses {}, \
         release binary {}, {} with {instances} instance(s)",
        args.scenario.name(),
        args.customers,
        args.phases,
        args.seconds,
        if args.statuses { "on" } else { "off" },
        args.binary,
        store.label()
    );
    let mut customers = Vec::new();
    for c in 0..args.customers {
        let wa_id = format!("4915{:08}", c);
        let (tx, rx) = mpsc::unbounded_channel();
        fake.waiters.lock().unwrap().insert(wa_id.clone(), tx);
        customers.push(Customer {
            index: c,
            wa_id,
            rx,
            round: 0,
        });
    }
    let mut bench = Bench {
        store,
        args,
        client,
        base: bases[0].clone(),
        webhooks,
        fake,
        phases_run: 0,
    };
    if bench.args.campaign_recipients > 0 {
        let phases = campaign_phases(&mut bench, &servers, &mut customers).await;
        drop(servers);
        keep_db(dir.path());
        return finish(bench, posters, fake_server, phases).await;
    }
    let mut fresh = Vec::new();
    for k in 1..=bench.args.phases {
        let name = if bench.args.seed_messages > 0 {
            format!("fresh {k}")
        } else {
            format!("phase {k}")
        };
        fresh.push(bench.run_phase(&servers, &mut customers, &name).await);
    }
    if bench.args.seed_messages > 0 {
        servers.stop();
        let started = Instant::now();
        let Store::Sqlite(path) = &bench.store else {
            unreachable!("--seed-messages is refused with --database")
        };
        let (db, n) = (path.clone(), bench.args.seed_messages);
        let contacts = tokio::task::spawn_blocking(move || seed_messages(&db, n))
            .await
            .unwrap()
            .expect("seeding the database");
        println!(
            "seeded:             {n} messages of {contacts} contacts in {:.1} s; database {:.0} MiB",
            started.elapsed().as_secs_f64(),
            std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) as f64 / 1048576.0
        );
        let server =
            start_server(&bench.args.binary, &configs[0], &bench.client, &bench.base).await;
        servers = Servers(vec![server]);
        let mut grown = Vec::new();
        for k in 1..=bench.args.phases {
            let name = format!("grown {k}");
            grown.push(bench.run_phase(&servers, &mut customers, &name).await);
        }
        let mean = |phases: &[Phase], f: fn(&Phase) -> f64| {
            phases.iter().map(f).sum::<f64>() / phases.len() as f64
        };
        println!(
            "grown / fresh:      replies/s {:.3}x, CPU per reply {:.3}x, p99 {:.2}x",
            mean(&grown, Phase::rate) / mean(&fresh, Phase::rate),
            mean(&grown, Phase::cpu_per_reply_ms) / mean(&fresh, Phase::cpu_per_reply_ms),
            mean(&grown, |p| p.p(0.99)) / mean(&fresh, |p| p.p(0.99)),
        );
    }
    println!(
        "fake Graph API:     {} sends ({} repeating a key), {} mark-as-read",
        bench.fake.sends.load(Ordering::Relaxed),
        bench.fake.duplicates.load(Ordering::Relaxed),
        bench.fake.mark_reads.load(Ordering::Relaxed)
    );
    servers.stop();
    keep_db(dir.path());
    finish(bench, posters, fake_server, fresh).await
}

/// After the servers stopped: the status posters and the fake stopped, the schema dropped.
async fn finish(
    bench: Bench,
    posters: Vec<tokio::task::JoinHandle<()>>,
    fake_server: tokio::task::JoinHandle<()>,
    phases: Vec<Phase>,
) -> Vec<Phase> {
    for p in posters {
        p.abort();
    }
    fake_server.abort();
    bench.store.clean_up().await;
    phases
}

/// The campaign mode: the customers idle, then while the campaign sends; both phases and
/// their ratio printed.
async fn campaign_phases(
    bench: &mut Bench,
    server: &Servers,
    customers: &mut Vec<Customer>,
) -> Vec<Phase> {
    let args = &bench.args;
    let wanted = args.campaign_rate as usize * args.seconds as usize;
    if args.campaign_recipients < wanted {
        eprintln!(
            "warning: {} recipients at {}/s last less than the {} s phase; use at least {wanted}",
            args.campaign_recipients, args.campaign_rate, args.seconds
        );
    }
    let (client, base) = (bench.client.clone(), bench.base.clone());
    import_campaign_contacts(&client, &base, args.campaign_recipients).await;
    let idle = bench.run_phase(server, customers, "idle").await;
    start_campaign(&client, &base, &bench.fake).await;
    let before = bench.fake.campaign_sends.load(Ordering::Relaxed);
    let busy = bench.run_phase(server, customers, "campaign").await;
    let campaign_sent = bench.fake.campaign_sends.load(Ordering::Relaxed) - before;
    println!(
        "[campaign] campaign sends:    {campaign_sent} during the phase = {:.1}/s (rate {}/s)",
        campaign_sent as f64 / busy.elapsed.as_secs_f64(),
        bench.args.campaign_rate
    );
    println!(
        "campaign / idle:    p50 {:.2}x, p99 {:.2}x, replies/s {:.2}x",
        busy.p(0.5) / idle.p(0.5),
        busy.p(0.99) / idle.p(0.99),
        busy.rate() / idle.rate()
    );
    vec![idle, busy]
}

/// `LOADTEST_KEEP_DB=path`: the database copied there at the end.
fn keep_db(dir: &Path) {
    if let Ok(keep) = std::env::var("LOADTEST_KEEP_DB") {
        for suffix in ["", "-wal"] {
            let from = dir.join(format!("flowgate.db{suffix}"));
            if from.exists() {
                std::fs::copy(from, format!("{keep}{suffix}")).expect("copy the database");
            }
        }
    }
}
