//! On the real server: an A/B split's report through the admin API
//! (`GET /api/flows/{flow}/splits/{step}`), and a form's answer through the sandbox door
//! (`POST /sandbox/messages` with `"form"`).

use std::sync::Arc;

use flowgate::app;
use flowgate::clock::SystemClock;
use serde_json::{Value, json};

use crate::support;

const TOKEN: &str = "split-api-token";

const FLOWS: &[(&str, &str)] = &[
    (
        "ab.yaml",
        r#"
flow: ab
triggers:
  - keywords: [hi]
steps:
  greet:
    split:
      - { name: short, weight: 60, goto: short }
      - { name: long, weight: 40, goto: long }
  short:
    say: "Short"
  long:
    say: "Long"
"#,
    ),
    (
        "booking.yaml",
        r#"
flow: booking
triggers:
  - keywords: [book]
steps:
  ask:
    form:
      flow_id: "1234567890123456"
      cta: "Book"
      body: "When?"
      fields: { day: text, guests: number }
    save: booking
    on_error: incomplete
    next: done
  done:
    say: "Booked {{booking.guests}} on {{booking.day}}"
  incomplete:
    say: "Incomplete"
"#,
    ),
];

async fn start(dir: &std::path::Path) -> support::Running {
    std::fs::create_dir_all(dir.join("flows")).unwrap();
    for (name, text) in FLOWS {
        std::fs::write(dir.join("flows").join(name), text).unwrap();
    }
    std::fs::write(
        dir.join("flowgate.yaml"),
        format!("flows: flows\nsandbox: public\nadmin:\n  token: {TOKEN}\n"),
    )
    .unwrap();
    let loaded = app::load(Some(&dir.join("flowgate.yaml"))).expect("the project loads");
    let db = format!("sqlite://{}", dir.join("flowgate.db").display());
    support::Running::start(&loaded, &db, Arc::new(SystemClock)).await
}

async fn say(server: &support::Running, body: Value) -> (u16, Value) {
    let answer = server
        .client
        .post(format!("{}/sandbox/messages", server.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    (
        answer.status().as_u16(),
        answer.json().await.unwrap_or(Value::Null),
    )
}

async fn get(server: &support::Running, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = server.client.get(format!("{}{path}", server.base));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let answer = request.send().await.unwrap();
    (
        answer.status().as_u16(),
        answer.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn a_splits_report_is_served_per_branch_with_its_weights() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut shown = std::collections::HashMap::<String, i64>::new();
    for i in 0..40 {
        let (status, answer) = say(
            &server,
            json!({"from": format!("1555000{i:04}"), "text": "hi"}),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        let body = answer["replies"][0]["message"]["body"]
            .as_str()
            .unwrap()
            .to_lowercase();
        *shown.entry(body).or_default() += 1;
    }

    let (status, report) = get(&server, "/api/flows/ab/splits/greet", Some(TOKEN)).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["flow"], "ab");
    assert_eq!(report["step"], "greet");
    let branches = report["branches"].as_array().unwrap();
    let names: Vec<&str> = branches
        .iter()
        .map(|b| b["branch"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["short", "long"], "the flow's order");
    assert_eq!(branches[0]["weight"], 60.0);
    for b in branches {
        let name = b["branch"].as_str().unwrap();
        assert_eq!(
            b["reached"],
            shown.get(name).copied().unwrap_or(0),
            "{report}"
        );
        // Each `say` ends the session at once: every contact reached finished the flow.
        assert_eq!(b["finished"], b["reached"]);
    }
    let stored = flowgate::splits::report(&server.db, Some("ab"), Some("greet"))
        .await
        .unwrap();
    assert_eq!(
        stored.iter().map(|r| r.counts.reached).sum::<i64>(),
        40,
        "{stored:?}"
    );

    let (status, answer) = get(&server, "/api/flows/ab/splits/short", Some(TOKEN)).await;
    assert_eq!(status, 404);
    assert_eq!(answer["error"]["code"], "unknown_split", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("its splits: greet"),
        "{answer}"
    );
    let (status, answer) = get(&server, "/api/flows/nope/splits/greet", Some(TOKEN)).await;
    assert_eq!(
        (status, answer["error"]["code"].clone()),
        (404, json!("unknown_flow"))
    );
    let (status, _) = get(&server, "/api/flows/ab/splits/greet", None).await;
    assert_eq!(status, 401, "the token is needed");
    server.shutdown().await;
}

#[tokio::test]
async fn the_sandbox_door_takes_a_forms_answer() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let from = "15550009001";
    let (_, answer) = say(&server, json!({"from": from, "text": "book"})).await;
    assert_eq!(answer["replies"][0]["message"]["type"], "form", "{answer}");

    let (status, answer) = say(
        &server,
        json!({"from": from, "form": {"day": "2026-12-24", "guests": 2}}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["replies"][0]["message"]["body"],
        "Booked 2 on 2026-12-24"
    );

    // A field of the wrong type: the step's on_error, as for a real answer.
    say(&server, json!({"from": from, "text": "book"})).await;
    let (_, answer) = say(
        &server,
        json!({"from": from, "form": {"day": "x", "guests": "many"}}),
    )
    .await;
    assert_eq!(
        answer["replies"][0]["message"]["body"], "Incomplete",
        "{answer}"
    );

    // Two kinds at once, or a form that is not an object, are refused with the reason.
    let (status, answer) = say(&server, json!({"from": from, "text": "hi", "form": {}})).await;
    assert_eq!(status, 400);
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("text, button, list, form or file"),
        "{answer}"
    );
    let (status, _) = say(&server, json!({"from": from, "form": [1, 2]})).await;
    assert_eq!(status, 400);
    server.shutdown().await;
}
