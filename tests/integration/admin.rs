//! The admin API basics: bearer-token auth on `/api`, `/metrics`, and the refusal to listen on
//! a public address without a token.

use std::path::Path;
use std::sync::Arc;

use flowgate::app::{self, Application};

use crate::support;
use flowgate::clock::SystemClock;

/// A project in `dir` on the repository's flows, with `admin` appended to its config (any keys).
pub(crate) fn project(dir: &Path, admin: &str) -> std::path::PathBuf {
    support::shipped_project(dir, admin)
}

/// A server on the shipped project in `dir`, with `admin` in its config.
async fn start(dir: &Path, admin: &str) -> support::Running {
    let config = project(dir, admin);
    let loaded = app::load(Some(&config)).unwrap();
    let db = format!("sqlite://{}", dir.join("db.sqlite").display());
    support::Running::start(&loaded, &db, Arc::new(SystemClock)).await
}

#[tokio::test]
async fn the_api_needs_the_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "admin:\n  token: s3cret-token\n").await;
    let base = server.base.clone();
    let client = server.client.clone();

    let missing = client
        .get(format!("{base}/api/flows"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 401);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "missing_token");

    let wrong = client
        .get(format!("{base}/api/flows"))
        .bearer_auth("s3cret-tokem")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);

    let ok = client
        .get(format!("{base}/api/flows"))
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let body: serde_json::Value = ok.json().await.unwrap();
    let ids: Vec<&str> = body["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"order_status"), "{body}");

    // A conversation through the sandbox door, then read through the API.
    let reply = client
        .post(format!("{base}/sandbox/messages"))
        .json(&serde_json::json!({"from": "15550007777", "text": "order"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    let conversation: serde_json::Value = client
        .get(format!("{base}/api/conversations/15550007777"))
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(conversation["session"]["flow"], "order_status");
    assert_eq!(
        conversation["messages"].as_array().unwrap().len(),
        2,
        "{conversation}"
    );
    let unknown = client
        .get(format!("{base}/api/conversations/15550000000"))
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    // Health and metrics need no token.
    let metrics = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    assert!(
        text.contains("# TYPE flowgate_flows_loaded gauge"),
        "{text}"
    );
    assert!(!text.contains("s3cret-token"));

    server.shutdown().await;
}

#[tokio::test]
async fn a_public_address_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("db.sqlite").display());
    let open = app::load(Some(&project(dir.path(), ""))).unwrap();
    let err = Application::build(&open, &db, "0.0.0.0:0", Arc::new(SystemClock))
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("without an admin token"), "{err}");
    let closed = app::load(Some(&project(dir.path(), "admin:\n  token: t0ken\n"))).unwrap();
    assert!(
        Application::build(&closed, &db, "0.0.0.0:0", Arc::new(SystemClock))
            .await
            .is_ok()
    );
}

/// `POST /sandbox/messages` with `text` from `from`: the texts of the bot's replies.
pub(crate) async fn sandbox_say(
    client: &reqwest::Client,
    base: &str,
    from: &str,
    text: &str,
) -> Vec<String> {
    let reply: serde_json::Value = client
        .post(format!("{base}/sandbox/messages"))
        .json(&serde_json::json!({"from": from, "text": text}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    reply["replies"]
        .as_array()
        .unwrap_or_else(|| panic!("{reply}"))
        .iter()
        .map(|r| {
            r["message"]["body"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

/// [`sandbox_say`] to `server`.
async fn say(server: &support::Running, from: &str, text: &str) -> Vec<String> {
    sandbox_say(&server.client, &server.base, from, text).await
}

/// `POST /api/conversations/{contact}/resume` with `body`: the status and the answer.
async fn resume(server: &support::Running, contact: &str, body: &str) -> (u16, serde_json::Value) {
    let response = server
        .client
        .post(format!(
            "{}/api/conversations/{contact}/resume",
            server.base
        ))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Three wrong order numbers hand `from` to a person (`order_status`'s `on_fail: handoff`).
async fn hand_off(server: &support::Running, from: &str) {
    say(server, from, "order").await;
    for wrong in ["abc", "1234567"] {
        say(server, from, wrong).await;
    }
    assert_eq!(
        say(server, from, "no idea").await,
        ["Connecting you to a person."]
    );
    assert!(
        say(server, from, "menu").await.is_empty(),
        "the bot stays quiet"
    );
}

#[tokio::test]
async fn the_api_gives_a_handed_off_conversation_back_to_the_bot() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "").await;

    // Not with a person: nothing to resume.
    say(&server, "15550008888", "order").await;
    let (status, body) = resume(&server, "15550008888", "").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "not_in_handoff");

    // Without a flow: the handoff step has no `next`, so the session ends and the next
    // message is the bot's again.
    hand_off(&server, "15550009999").await;
    let (status, body) = resume(&server, "15550009999", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["session"], serde_json::Value::Null, "{body}");
    let menu = say(&server, "15550009999", "hello").await;
    assert!(menu[0].contains("How can we help"), "{menu:?}");

    // An unknown flow or step is refused, and the conversation stays with the person.
    hand_off(&server, "15550009999").await;
    let (status, body) = resume(&server, "15550009999", r#"{"flow": "nope"}"#).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("order_status"),
        "{body}"
    );
    let (status, _) = resume(
        &server,
        "15550009999",
        r#"{"flow": "order_status", "step": "nope"}"#,
    )
    .await;
    assert_eq!(status, 422);
    assert!(say(&server, "15550009999", "hello").await.is_empty());

    // With a flow and a step: the bot goes on there.
    let (status, body) = resume(
        &server,
        "15550009999",
        r#"{"flow": "order_status", "step": "ask_order"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["session"]["step"], "ask_order", "{body}");
    assert_eq!(
        body["sent"][0]["message"]["content"]["body"], "What's your order number?",
        "{body}"
    );
    server.shutdown().await;
}
