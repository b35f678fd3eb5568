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
}

fn args() -> Args {
    let mut args = Args {
        customers: 200,
        seconds: 20,
        binary: format!("{}/target/release/flowgate", env!("CARGO_MANIFEST_DIR")),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let value = it.next().unwrap_or_default();
        match a.as_str() {
            "--customers" => args.customers = value.parse().expect("--customers N"),
            "--seconds" => args.seconds = value.parse().expect("--seconds N"),
            "--bin" => args.binary = value,
            other => panic!("unknown argument {other}; use --customers N --seconds N --bin PATH"),
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
    if let Some(tx) = fake.waiters.lock().unwrap().get(&to) {
        let _ = tx.send(Instant::now());
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

#[tokio::main]
async fn main() {
    let args = args();
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::create_dir_all(dir.path().join("flows")).unwrap();
    std::fs::write(dir.path().join("flows/survey.yaml"), FLOW).unwrap();

    let fake = Fake {
        waiters: Arc::new(Mutex::new(HashMap::new())),
        sends: Arc::new(AtomicU64::new(0)),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_addr: SocketAddr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/{*path}", post(fake_send))
        .with_state(fake.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let port = free_port();
    let config = format!(
        "database: sqlite://{db}\nlisten: 127.0.0.1:{port}\nflows: flows\noutbox:\n  pace_recipients: false\nchannels:\n  - name: main\n    provider: cloud_api\n    phone_number_id: \"{PHONE_NUMBER_ID}\"\n    access_token: load-token\n    app_secret: {APP_SECRET}\n    verify_token: load-verify\n    api_base: http://{fake_addr}/v23.0\n    throughput_mps: 100000\n",
        db = dir.path().join("flowgate.db").display()
    );
    let config_path = dir.path().join("flowgate.yaml");
    std::fs::write(&config_path, config).unwrap();
    let server = Guard(
        Command::new(&args.binary)
            .args(["serve", "--config"])
            .arg(&config_path)
            .env(
                "RUST_LOG",
                std::env::var("LOADTEST_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} (run `cargo build --release` first): {e}",
                    args.binary
                )
            }),
    );
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
    let start = Instant::now();
    let stop_at = start + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for c in 0..args.customers {
        let wa_id = format!("4915{:08}", c);
        let (tx, mut rx) = mpsc::unbounded_channel();
        fake.waiters.lock().unwrap().insert(wa_id.clone(), tx);
        let client = client.clone();
        let url = format!("{base}/webhook/main");
        tasks.push(tokio::spawn(async move {
            let mut replies = Vec::new();
            let mut acks = Vec::new();
            let mut errors = 0u64;
            let mut n = 0u64;
            while Instant::now() < stop_at {
                let text = SCRIPT[(n % 3) as usize];
                let body = webhook(&wa_id, &format!("wamid.in.{wa_id}.{n}"), text);
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
            (replies, acks, errors)
        }));
    }
    let mut replies = Vec::new();
    let mut acks = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (r, a, e) = t.await.unwrap();
        replies.extend(r);
        acks.extend(a);
        errors += e;
    }
    let elapsed = start.elapsed();
    drop(server);
    if let Ok(keep) = std::env::var("LOADTEST_KEEP_DB") {
        for suffix in ["", "-wal"] {
            let from = dir.path().join(format!("flowgate.db{suffix}"));
            if from.exists() {
                std::fs::copy(from, format!("{keep}{suffix}")).expect("copy the database");
            }
        }
    }
    replies.sort();
    acks.sort();
    println!(
        "replies:            {} in {:.1} s = {:.0} replies/s",
        replies.len(),
        elapsed.as_secs_f64(),
        replies.len() as f64 / elapsed.as_secs_f64()
    );
    println!(
        "webhook -> reply:   p50 {:.1} ms, p99 {:.1} ms",
        percentile(&replies, 0.5).as_secs_f64() * 1e3,
        percentile(&replies, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "webhook ack:        p50 {:.1} ms, p99 {:.1} ms",
        percentile(&acks, 0.5).as_secs_f64() * 1e3,
        percentile(&acks, 0.99).as_secs_f64() * 1e3
    );
    println!("errors/timeouts:    {errors}");
}
