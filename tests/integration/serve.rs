//! `flowgate serve` end to end: the real server on port 0 with a SQLite file, and a
//! conversation that outlives a restart on changed flow files.

use std::path::Path;
use std::sync::Arc;

use flowgate::app::{self, Application};

use crate::support;
use flowgate::clock::{SystemClock, VirtualClock};
use flowgate::domain::{Inbound, InboundContent};
use serde_json::{Value, json};

async fn post(client: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let response = client.post(url).json(&body).send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json body"))
}

#[tokio::test]
async fn serve_answers_sandbox_messages_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = app::load(None).expect("the shipped project loads");
    let db = format!("sqlite://{}", dir.path().join("flowgate.db").display());
    let server = support::Running::start(&loaded, &db, Arc::new(SystemClock)).await;
    let base = server.base.clone();
    let client = server.client.clone();

    let health = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(
        client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let (status, body) = post(
        &client,
        &format!("{base}/sandbox/messages"),
        json!({"from": "15550009999", "name": "Ana", "text": "menu"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let reply = &body["replies"][0];
    assert_eq!(reply["message"]["type"], "buttons");
    assert_eq!(
        reply["message"]["body"],
        "Hi Ana! 👋 How can we help you today?"
    );
    assert_eq!(reply["decision"]["decision"], "send");

    let (status, body) = post(
        &client,
        &format!("{base}/sandbox/messages"),
        json!({"from": "15550009999", "button": "orders"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        body["replies"][0]["message"]["body"],
        "What's your order number?"
    );

    // Bad input: a clear error with a stable code, nothing processed.
    let (status, body) = post(
        &client,
        &format!("{base}/sandbox/messages"),
        json!({"from": "15550009999"}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_body");
    let raw = client
        .post(format!("{base}/sandbox/messages"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);

    server.shutdown().await;

    // The conversation was stored: a new server on the same file continues it.
    let application = Application::build(&loaded, &db, "127.0.0.1:0", Arc::new(SystemClock))
        .await
        .unwrap();
    let runtime = application.runtime.clone();
    let c = runtime
        .db
        .load_conversation("sandbox", "15550009999")
        .await
        .unwrap();
    assert_eq!(
        c.session.expect("session survives a restart").step,
        "ask_order"
    );
}

/// The sandbox door takes a customer's file (base64 in the JSON body): a copy of
/// `examples/parcel` asks for a photo, gets `parcel.png`, stores it in its media directory
/// and goes on; a file that is not base64 or not a kind of file is refused, nothing stored.
#[tokio::test]
async fn the_sandbox_door_takes_a_customers_file() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/parcel");
    std::fs::create_dir(dir.path().join("flows")).unwrap();
    for file in ["flowgate.yaml", "flows/damaged_parcel.yaml"] {
        std::fs::copy(example.join(file), dir.path().join(file)).unwrap();
    }
    let loaded = app::load(Some(&dir.path().join("flowgate.yaml"))).expect("the example loads");
    let db = format!("sqlite://{}", dir.path().join("flowgate.db").display());
    let server = support::Running::start(&loaded, &db, Arc::new(SystemClock)).await;
    let url = format!("{}/sandbox/messages", server.base);
    let photo = std::fs::read(example.join("flows/parcel.png")).unwrap();
    let encoded = base64::engine::general_purpose::STANDARD.encode(&photo);
    let stored = || {
        let media = dir.path().join("data/media");
        std::fs::read_dir(&media).map_or(0, |d| d.flatten().count())
    };

    let (status, body) = post(
        &server.client,
        &url,
        json!({"from": "15550008888", "text": "my parcel is damaged"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["replies"][0]["message"]["body"]
            .as_str()
            .unwrap()
            .contains("Please send a photo"),
        "{body}"
    );
    for (file, problem) in [
        (
            json!({"kind": "image", "name": "parcel.png", "base64": "not base64!"}),
            "not base64",
        ),
        (
            json!({"kind": "gif", "name": "parcel.gif", "base64": encoded}),
            "not a kind of file",
        ),
    ] {
        let (status, body) = post(
            &server.client,
            &url,
            json!({"from": "15550008888", "file": file}),
        )
        .await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (400, &json!("invalid_file"))
        );
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(problem), "{message}");
    }
    assert_eq!(stored(), 0, "nothing is stored from a refused file");

    let (status, body) = post(
        &server.client,
        &url,
        json!({"from": "15550008888", "file": {
            "kind": "image", "name": "parcel.png", "base64": encoded, "caption": "crushed corner",
        }}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let said: Vec<&str> = body["replies"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["message"]["body"].as_str())
        .collect();
    assert_eq!(
        said,
        [format!(
            "Thanks! We have your photo ({} bytes) and will get back to you within a day.",
            photo.len()
        )],
        "{body}"
    );
    assert_eq!(stored(), 1, "the photo is in the media directory");
    let caption = support::text(&server.db, "SELECT caption FROM media").await;
    assert_eq!(caption, "crushed corner");
    server.shutdown().await;
}

/// A one-question survey; tests change `v1:` to make a new version.
pub(crate) const V1: &str = r#"
flow: survey
triggers:
  - keywords: [survey]
steps:
  ask_score:
    ask: "v1: how many stars?"
    save: score
    expect: number
    next: thanks
  thanks:
    say: "v1: thanks for {{score}} stars"
"#;

fn write_project(dir: &Path, flow: &str) {
    std::fs::create_dir_all(dir.join("flows")).unwrap();
    std::fs::write(dir.join("flows/survey.yaml"), flow).unwrap();
    std::fs::write(dir.join("flowgate.yaml"), "flows: flows\n").unwrap();
}

fn text(body: &str) -> Inbound {
    let now = VirtualClock::test_epoch();
    Inbound::sandbox(InboundContent::text(body), now, now)
}

#[tokio::test]
async fn a_session_outlives_a_restart_on_changed_flows() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("state.db").display());
    let config = dir.path().join("flowgate.yaml");
    let clock = Arc::new(VirtualClock::new(VirtualClock::test_epoch()));

    write_project(dir.path(), V1);
    let loaded = app::load(Some(&config)).unwrap();
    let runtime = loaded.runtime(&db, clock.clone()).await.unwrap();
    let report = runtime
        .inbound("sandbox", "1555", None, text("survey"))
        .await
        .unwrap();
    assert_eq!(report.sent[0].message.content.body(), "v1: how many stars?");
    runtime.db.close().await;
    drop(runtime);

    // The flow file changes while the customer thinks; the process restarts.
    write_project(dir.path(), &V1.replace("v1:", "v2:"));
    let loaded = app::load(Some(&config)).unwrap();
    let runtime = loaded.runtime(&db, clock.clone()).await.unwrap();
    let report = runtime
        .inbound("sandbox", "1555", None, text("5"))
        .await
        .unwrap();
    assert_eq!(
        report.sent[0].message.content.body(),
        "v1: thanks for 5 stars",
        "the session finishes on its version"
    );
    let report = runtime
        .inbound("sandbox", "1555", None, text("survey"))
        .await
        .unwrap();
    assert_eq!(
        report.sent[0].message.content.body(),
        "v2: how many stars?",
        "new sessions get the new version"
    );
}

#[tokio::test]
async fn a_replayed_message_is_processed_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("flowgate.yaml");
    write_project(dir.path(), V1);
    let loaded = app::load(Some(&config)).unwrap();
    let runtime = loaded
        .runtime(
            "sqlite::memory:",
            Arc::new(VirtualClock::new(VirtualClock::test_epoch())),
        )
        .await
        .unwrap();
    let message = text("survey");
    let first = runtime
        .inbound("sandbox", "1555", None, message.clone())
        .await
        .unwrap();
    assert_eq!(first.sent.len(), 1);
    let again = runtime
        .inbound("sandbox", "1555", None, message)
        .await
        .unwrap();
    assert_eq!(again.handled, flowgate::engine::Handled::Duplicate);
    assert!(again.sent.is_empty());
    assert_eq!(
        runtime
            .db
            .messages("sandbox", "1555", 10)
            .await
            .unwrap()
            .len(),
        2,
        "one in, one out"
    );
}

/// `/readyz` asks the database: ready, naming the backend, while it answers; 503 saying
/// why once it does not (here: its connections closed under the running server).
async fn readiness_follows_the_database(backend: support::Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(database) = support::TestDb::new(dir.path(), backend).await else {
        return;
    };
    let loaded = app::load(None).expect("the shipped project loads");
    let server = support::Running::start(&loaded, &database.url, Arc::new(SystemClock)).await;
    let readyz = || async {
        let response = server
            .client
            .get(format!("{}/readyz", server.base))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    };
    let name = server.db.backend();
    assert_eq!(readyz().await, (200, format!("ready: {name}")));
    server.db.close().await;
    let (status, body) = readyz().await;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with(&format!("{name}: ")), "{body}");
    database.clean_up().await;
}

#[tokio::test]
async fn readiness_follows_the_database_on_sqlite() {
    readiness_follows_the_database(support::Backend::Sqlite).await;
}

#[tokio::test]
async fn readiness_follows_the_database_on_postgres() {
    readiness_follows_the_database(support::Backend::Postgres).await;
}
