//! Load benchmark: N simulated customers against the release binary on SQLite.
//!
//! ```sh
//! cargo build --release
//! cargo run --release --example loadtest -- --customers 200 --seconds 20
//! ```
//!
//! Each customer runs a closed loop through a three-message conversation: send a signed
//! webhook, wait until the bot's reply arrives at a fake Graph API (started here, on
//! 127.0.0.1), send the next message. The server is the real `flowgate serve` process with a
//! `cloud_api` channel pointed at the fake. Printed: replies per second, webhook-to-reply
//! latency (p50, p99) and webhook acknowledgement latency (p50, p99).
//!
//! The channel's `throughput_mps` is set far above Meta's 80/1,000, and recipient pacing
//! (Meta's pair limit: a burst, then one message per 6 s) is off, so the benchmark measures
//! flowgate, not the pacing it applies on purpose: each simulated customer gets a reply to
//! every message as fast as the engine can produce it.
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

const FLOW: &str = r#"
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

const SCRIPT: [&str; 3] = ["hi", "Ana", "5"];

struct Args {
    customers: usize,
    seconds: u64,
    binary: String,
    /// Contacts a campaign sends to while the customers chat (0: no campaign phase).
    campaign_recipients: usize,
    /// The campaign's `rate`, sends per second.
    campaign_rate: u32,
}

fn args() -> Args {
    let mut args = Args {
        customers: 200,
        seconds: 20,
        binary: format!("{}/target/release/flowgate", env!("CARGO_MANIFEST_DIR")),
        campaign_recipients: 0,
        campaign_rate: 100,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let value = it.next().unwrap_or_default();
        match a.as_str() {
            "--customers" => args.customers = value.parse().expect("--customers N"),
            "--seconds" => args.seconds = value.parse().expect("--seconds N"),
            "--bin" => args.binary = value,
            "--campaign-recipients" => {
                args.campaign_recipients = value.parse().expect("--campaign-recipients N")
            }
            "--campaign-rate" => args.campaign_rate = value.parse().expect("--campaign-rate R"),
            other => panic!(
                "unknown argument {other}; use --customers N --seconds N --bin PATH \
                 --campaign-recipients N --campaign-rate R"
            ),
        }
    }
    args
}

/// Who is waiting for a reply: the customer's number -> where to tell them.
type Waiters = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Instant>>>>;

#[derive(Clone)]
struct Fake {
    waiters: Waiters,
    sends: Arc<AtomicU64>,
    /// Sends to numbers no customer waits on: the campaign's.
    campaign_sends: Arc<AtomicU64>,
}

async fn fake_send(State(fake): State<Fake>, body: Bytes) -> axum::response::Response {
    use axum::response::IntoResponse;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if json.get("status").and_then(|s| s.as_str()) == Some("read") {
        return axum::Json(serde_json::json!({"success": true})).into_response();
    }
    let to = json["to"]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches('+')
        .to_string();
    let n = fake.sends.fetch_add(1, Ordering::Relaxed);
    match fake.waiters.lock().unwrap().get(&to) {
        Some(tx) => {
            let _ = tx.send(Instant::now());
        }
        None => {
            fake.campaign_sends.fetch_add(1, Ordering::Relaxed);
        }
    }
    axum::Json(serde_json::json!({
        "messaging_product": "whatsapp",
        "contacts": [{"input": format!("+{to}"), "wa_id": to}],
        "messages": [{"id": format!("wamid.load.{n}")}],
    }))
    .into_response()
}

/// A customer's text as Meta sends it since April 2026: the phone and the business-scoped
/// user id (here `US.` and the phone) side by side.
fn webhook(wa_id: &str, wamid: &str, text: &str) -> String {
    let user_id = format!("US.{wa_id}");
    serde_json::json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": "100000000000001", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550001111", "phone_number_id": PHONE_NUMBER_ID},
            "contacts": [{"profile": {"name": "Load"}, "wa_id": wa_id, "user_id": user_id}],
            "messages": [{"from": wa_id, "from_user_id": user_id, "id": wamid,
                          "timestamp": chrono::Utc::now().timestamp().to_string(),
                          "type": "text", "text": {"body": text}}],
        }}]}],
    })
    .to_string()
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

struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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

/// Writes the project (flow, and with a campaign its template and file) and the config.
fn write_project(dir: &Path, args: &Args, fake_addr: SocketAddr, port: u16) -> PathBuf {
    std::fs::create_dir_all(dir.join("flows")).unwrap();
    std::fs::write(dir.join("flows/survey.yaml"), FLOW).unwrap();
    let mut config = format!(
        "database: sqlite://{db}\nlisten: 127.0.0.1:{port}\nflows: flows\noutbox:\n  pace_recipients: false\nchannels:\n  - name: main\n    provider: cloud_api\n    phone_number_id: \"{PHONE_NUMBER_ID}\"\n    access_token: load-token\n    app_secret: {APP_SECRET}\n    verify_token: load-verify\n    api_base: http://{fake_addr}/v23.0\n    throughput_mps: 100000\n",
        db = dir.join("flowgate.db").display()
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
    let path = dir.join("flowgate.yaml");
    std::fs::write(&path, config).unwrap();
    path
}

fn start_server(binary: &str, config: &Path) -> Guard {
    Guard(
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
    )
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
struct Phase {
    replies: Vec<Duration>,
    acks: Vec<Duration>,
    errors: u64,
    elapsed: Duration,
}

impl Phase {
    fn p(&self, q: f64) -> f64 {
        percentile(&self.replies, q).as_secs_f64() * 1e3
    }

    fn print(&self, name: &str) {
        let secs = self.elapsed.as_secs_f64();
        println!(
            "[{name}] replies:            {} in {secs:.1} s = {:.0} replies/s",
            self.replies.len(),
            self.replies.len() as f64 / secs
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
        println!("[{name}] errors/timeouts:    {}", self.errors);
    }
}

/// One customer's closed loop until `stop_at`: (reply latencies, ack latencies, errors).
async fn customer(
    client: reqwest::Client,
    url: String,
    (wa_id, phase): (String, &'static str),
    mut rx: mpsc::UnboundedReceiver<Instant>,
    stop_at: Instant,
) -> (
    Vec<Duration>,
    Vec<Duration>,
    u64,
    mpsc::UnboundedReceiver<Instant>,
) {
    let mut replies = Vec::new();
    let mut acks = Vec::new();
    let mut errors = 0u64;
    let mut n = 0u64;
    while Instant::now() < stop_at {
        let text = SCRIPT[(n % 3) as usize];
        let body = webhook(&wa_id, &format!("wamid.in.{phase}.{wa_id}.{n}"), text);
        n += 1;
        let sent = Instant::now();
        let response = client
            .post(&url)
            .header("content-type", "application/json")
            .header("x-hub-signature-256", sign(&body))
            .body(body)
            .send()
            .await;
        match response {
            Ok(r) if r.status().is_success() => acks.push(sent.elapsed()),
            _ => {
                errors += 1;
                continue;
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(at)) => replies.push(at - sent),
            _ => errors += 1,
        }
    }
    (replies, acks, errors, rx)
}

/// Runs every customer's closed loop for `seconds`; the receivers come back for the next
/// phase. A reply still in flight from the previous phase is dropped first.
async fn run_phase(
    client: &reqwest::Client,
    base: &str,
    receivers: &mut Vec<(String, mpsc::UnboundedReceiver<Instant>)>,
    phase: &'static str,
    seconds: u64,
) -> Phase {
    let start = Instant::now();
    let stop_at = start + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for (wa_id, mut rx) in receivers.drain(..) {
        while rx.try_recv().is_ok() {}
        let url = format!("{base}/webhook/main");
        let who = (wa_id.clone(), phase);
        let task = customer(client.clone(), url, who, rx, stop_at);
        tasks.push((wa_id, tokio::spawn(task)));
    }
    let mut out = Phase {
        replies: Vec::new(),
        acks: Vec::new(),
        errors: 0,
        elapsed: Duration::ZERO,
    };
    for (wa_id, t) in tasks {
        let (r, a, e, rx) = t.await.unwrap();
        out.replies.extend(r);
        out.acks.extend(a);
        out.errors += e;
        receivers.push((wa_id, rx));
    }
    out.elapsed = start.elapsed();
    out.replies.sort();
    out.acks.sort();
    out
}

#[tokio::main]
async fn main() {
    let args = args();
    let dir = tempfile::tempdir().expect("a temp dir");
    let fake = Fake {
        waiters: Arc::new(Mutex::new(HashMap::new())),
        sends: Arc::new(AtomicU64::new(0)),
        campaign_sends: Arc::new(AtomicU64::new(0)),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_addr: SocketAddr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/{*path}", post(fake_send))
        .with_state(fake.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let port = free_port();
    let config_path = write_project(dir.path(), &args, fake_addr, port);
    let server = start_server(&args.binary, &config_path);
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.customers)
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "the server did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    println!(
        "flowgate load test: {} customers, {} s, release binary {}, SQLite",
        args.customers, args.seconds, args.binary
    );
    let mut receivers = Vec::new();
    for c in 0..args.customers {
        let wa_id = format!("4915{:08}", c);
        let (tx, rx) = mpsc::unbounded_channel();
        fake.waiters.lock().unwrap().insert(wa_id.clone(), tx);
        receivers.push((wa_id, rx));
    }
    if args.campaign_recipients == 0 {
        let phase = run_phase(&client, &base, &mut receivers, "idle", args.seconds).await;
        drop(server);
        keep_db(dir.path());
        phase.print("idle");
        return;
    }
    campaign_phases(&args, (&client, &base), &fake, &mut receivers).await;
    drop(server);
    keep_db(dir.path());
}

/// The campaign mode: the customers idle, then while the campaign sends; both phases and
/// their ratio printed.
async fn campaign_phases(
    args: &Args,
    (client, base): (&reqwest::Client, &str),
    fake: &Fake,
    receivers: &mut Vec<(String, mpsc::UnboundedReceiver<Instant>)>,
) {
    let wanted = args.campaign_rate as usize * args.seconds as usize;
    if args.campaign_recipients < wanted {
        eprintln!(
            "warning: {} recipients at {}/s last less than the {} s phase; use at least {wanted}",
            args.campaign_recipients, args.campaign_rate, args.seconds
        );
    }
    import_campaign_contacts(client, base, args.campaign_recipients).await;
    let idle = run_phase(client, base, receivers, "idle", args.seconds).await;
    start_campaign(client, base, fake).await;
    let before = fake.campaign_sends.load(Ordering::Relaxed);
    let busy = run_phase(client, base, receivers, "campaign", args.seconds).await;
    let campaign_sent = fake.campaign_sends.load(Ordering::Relaxed) - before;
    idle.print("idle");
    busy.print("campaign");
    println!(
        "[campaign] campaign sends:    {campaign_sent} during the phase = {:.1}/s (rate {}/s)",
        campaign_sent as f64 / busy.elapsed.as_secs_f64(),
        args.campaign_rate
    );
    println!(
        "campaign / idle:    p50 {:.2}x, p99 {:.2}x, replies/s {:.2}x",
        busy.p(0.5) / idle.p(0.5),
        busy.p(0.99) / idle.p(0.99),
        (busy.replies.len() as f64 / busy.elapsed.as_secs_f64())
            / (idle.replies.len() as f64 / idle.elapsed.as_secs_f64())
    );
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
