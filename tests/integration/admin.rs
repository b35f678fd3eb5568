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

#[tokio::test]
async fn the_api_needs_the_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let config = project(dir.path(), "admin:\n  token: s3cret-token\n");
    let loaded = app::load(Some(&config)).unwrap();
    let db = format!("sqlite://{}", dir.path().join("db.sqlite").display());
    let server = support::Running::start(&loaded, &db, Arc::new(SystemClock)).await;
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
