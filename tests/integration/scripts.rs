//! One customer's turn cannot hurt the others: a script doing heavy work stops at its time
//! budget (`limits.script_timeout`) while other customers are answered and webhooks are
//! acknowledged, and a loop that sends stops at the turn's cap (`limits.messages_per_turn`).
//! The real server on 127.0.0.1:0 with a SQLite file; the sandbox door and signed webhooks.
//! No timed assertions: latencies are printed, correctness is asserted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use flowgate::app;
use flowgate::clock::SystemClock;
use flowgate::metrics;
use serde_json::json;

use crate::support::{self, Running, eventually, sign};

const APP_SECRET: &str = "test-app-secret";
const PHONE_NUMBER_ID: &str = "110000000000001";

/// Heavy string work in few operations (about 4 per round, far inside the 100,000-operation
/// budget): without a time limit it runs for seconds; with one it stops at its budget and
/// the step's `on_error` answers.
const HEAVY: &str = r#"
flow: heavy
triggers:
  - keywords: [heavy]
steps:
  burn:
    rhai: |
      let s = "";
      s.pad(60000, "x");
      let n = 0;
      for i in 0..20000 { n += s.sub_string(1, 59000).len(); }
    on_error: too_slow
    next: done
  too_slow:
    say: "That took too long."
  done:
    say: "Done."
"#;

const HELLO: &str = r#"
flow: hello
triggers:
  - keywords: [hello]
steps:
  greet:
    say: "Hello there."
"#;

/// Sends in a loop that leaves only by an `if:` (so `check` lets it through): the turn's cap
/// stops it.
const CHATTER: &str = r#"
flow: chatter
triggers:
  - keywords: [chatter]
steps:
  a:
    say: "a"
    next: b
  b:
    say: "b"
    next:
      - if: 'true'
        goto: a
"#;

/// A project with the three flows, a sandbox channel (the sandbox door's) and a `cloud_api`
/// channel for webhooks (its sends go nowhere: what the turns decided is in the database).
fn project(dir: &Path) -> PathBuf {
    let flows = dir.join("flows");
    std::fs::create_dir_all(&flows).unwrap();
    for (name, text) in [("heavy", HEAVY), ("hello", HELLO), ("chatter", CHATTER)] {
        std::fs::write(flows.join(format!("{name}.yaml")), text).unwrap();
    }
    let config = dir.join("flowgate.yaml");
    std::fs::write(
        &config,
        format!(
            "flows: flows\nscripts: scripts\ntemplates: templates.yaml\n\
             limits:\n  script_timeout: 200ms\n\
             channels:\n  - name: sandbox\n    provider: sandbox\n  - name: main\n    provider: cloud_api\n    \
             phone_number_id: \"{PHONE_NUMBER_ID}\"\n    access_token: test-access-token\n    \
             app_secret: {APP_SECRET}\n    verify_token: test-verify-token\n    api_base: http://127.0.0.1:9\n"
        ),
    )
    .unwrap();
    config
}

/// The texts the bot answered in a sandbox turn.
async fn sandbox(server: &Running, from: &str, text: &str) -> Vec<String> {
    crate::admin::sandbox_say(&server.client, &server.base, from, text).await
}

/// A signed webhook with one text message from `from`; its HTTP status.
async fn webhook(server: &Running, from: &str, text: &str) -> u16 {
    let body = support::envelope(
        PHONE_NUMBER_ID,
        json!({"messages": [{
            "from": from, "id": format!("wamid.{from}"), "timestamp": support::now_timestamp(),
            "type": "text", "text": {"body": text}
        }]}),
    );
    server
        .client
        .post(format!("{}/webhook/main", server.base))
        .header("content-type", "application/json")
        .header("X-Hub-Signature-256", sign(APP_SECRET, &body))
        .body(body)
        .send()
        .await
        .expect("the webhook answers")
        .status()
        .as_u16()
}

/// How many outgoing messages to `wa_id` on channel `main` contain `text`.
async fn answered(server: &Running, wa_id: &str, text: &str) -> i64 {
    let pool = server.db.sqlite_pool().expect("tests use SQLite");
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM messages m JOIN contacts c ON c.id = m.contact_id \
         WHERE c.channel = 'main' AND c.wa_id = ? AND m.direction = 'out' AND m.body LIKE ?",
    )
    .bind(wa_id)
    .bind(format!("%{text}%"))
    .fetch_one(pool)
    .await
    .unwrap()
}

/// What `GET /metrics` shows.
async fn scrape(server: &Running) -> String {
    let response = server.client.get(format!("{}/metrics", server.base)).send();
    response.await.unwrap().text().await.unwrap()
}

fn timeouts() -> u64 {
    metrics::counter_value("flowgate_script_timeouts_total", &[])
}

fn ms(d: std::time::Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Six heavy turns (three through the sandbox door, three through webhooks) run beside 50
/// other sandbox customers and 20 other webhooks. Every other customer is answered, every
/// webhook acknowledged, each heavy turn stops at its time budget (counted) and answers with
/// its `on_error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heavy_script_stops_at_its_budget_while_everyone_else_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("db.sqlite").display());
    let loaded = app::load(Some(&project(dir.path()))).unwrap();
    let server = Arc::new(Running::start(&loaded, &db, Arc::new(SystemClock)).await);
    let timeouts_before = timeouts();

    let mut heavy = Vec::new();
    for i in 0..3 {
        let s = server.clone();
        heavy.push(tokio::spawn(async move {
            let started = Instant::now();
            let replies = sandbox(&s, &format!("1555100000{i}"), "heavy").await;
            (replies, started.elapsed())
        }));
        let s = server.clone();
        heavy.push(tokio::spawn(async move {
            let replies = vec![
                webhook(&s, &format!("1555200000{i}"), "heavy")
                    .await
                    .to_string(),
            ];
            (replies, std::time::Duration::ZERO)
        }));
    }
    let mut light = Vec::new();
    for i in 0..50 {
        let s = server.clone();
        light.push(tokio::spawn(async move {
            let started = Instant::now();
            let replies = sandbox(&s, &format!("15553000{i:03}"), "hello").await;
            (replies, started.elapsed())
        }));
    }
    let mut hooks = Vec::new();
    for i in 0..20 {
        let s = server.clone();
        hooks.push(tokio::spawn(async move {
            let started = Instant::now();
            let status = webhook(&s, &format!("15554000{i:03}"), "hello").await;
            (status, started.elapsed())
        }));
    }

    let mut light_latencies = Vec::new();
    for task in light {
        let (replies, took) = task.await.unwrap();
        assert_eq!(
            replies,
            ["Hello there."],
            "every other customer is answered"
        );
        light_latencies.push(took);
    }
    let mut hook_latencies = Vec::new();
    for task in hooks {
        let (status, took) = task.await.unwrap();
        assert_eq!(status, 200, "every webhook is acknowledged");
        hook_latencies.push(took);
    }
    for task in heavy {
        let (replies, took) = task.await.unwrap();
        if replies == ["200"] {
            continue; // a webhook: acknowledged; its turn is checked below
        }
        assert_eq!(
            replies,
            ["That took too long."],
            "the heavy turn took its on_error"
        );
        println!("heavy sandbox turn: {}", ms(took));
    }
    light_latencies.sort();
    hook_latencies.sort();
    println!(
        "other customers' sandbox turns: median {}, max {}; webhook acks: median {}, max {}",
        ms(light_latencies[light_latencies.len() / 2]),
        ms(*light_latencies.last().unwrap()),
        ms(hook_latencies[hook_latencies.len() / 2]),
        ms(*hook_latencies.last().unwrap()),
    );

    for i in 0..20 {
        let wa_id = format!("15554000{i:03}");
        let s = server.clone();
        eventually("the webhook customers are answered", move || {
            let (s, wa_id) = (s.clone(), wa_id.clone());
            async move { answered(&s, &wa_id, "Hello there.").await == 1 }
        })
        .await;
    }
    for i in 0..3 {
        let wa_id = format!("1555200000{i}");
        let (s, id) = (server.clone(), wa_id.clone());
        eventually("the heavy webhook turns take their on_error", move || {
            let (s, wa_id) = (s.clone(), id.clone());
            async move { answered(&s, &wa_id, "That took too long.").await == 1 }
        })
        .await;
        assert_eq!(answered(&server, &wa_id, "Done.").await, 0);
    }
    let stopped = timeouts() - timeouts_before;
    assert!(
        stopped >= 6,
        "six heavy turns stopped by their time budget, counted {stopped}"
    );
    let scrape = scrape(&server).await;
    assert!(
        scrape.contains("flowgate_script_timeouts_total"),
        "{scrape}"
    );
    Arc::into_inner(server)
        .expect("every task is done")
        .shutdown()
        .await;
}

/// One "chatter" runs a loop that sends: ten messages, then the apology; the conversation
/// ends, the next message starts afresh, and `/metrics` counts each stopped turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_that_sends_stops_at_the_turns_cap() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("db.sqlite").display());
    let loaded = app::load(Some(&project(dir.path()))).unwrap();
    let server = Running::start(&loaded, &db, Arc::new(SystemClock)).await;
    let capped = || metrics::counter_value("flowgate_turn_message_cap_total", &[]);
    let before = capped();

    let replies = sandbox(&server, "15555000001", "chatter").await;
    let mut expected = ["a", "b"].repeat(5);
    expected.push(flowgate::engine::APOLOGY);
    assert_eq!(replies, expected);
    assert_eq!(
        sandbox(&server, "15555000001", "hello").await,
        ["Hello there."]
    );
    assert!(capped() > before, "the stopped turn is counted");
    let scrape = scrape(&server).await;
    assert!(
        scrape.contains("flowgate_turn_message_cap_total"),
        "{scrape}"
    );
    server.shutdown().await;
}
