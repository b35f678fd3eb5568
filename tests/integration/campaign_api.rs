//! The campaign API on the real server (port 0, real SQLite): definitions created, refused
//! with located diagnostics, replaced and deleted; a file campaign left to its file; pause
//! and resume; run-now once per `Idempotency-Key`; runs and a run's report with real
//! counts; the admin token required.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::Duration;
use flowgate::app;
use flowgate::clock::SystemClock;
use flowgate::store::{RecipientDecision, RecipientOutcome, RunTrigger};
use reqwest::Method;
use serde_json::{Value, json};

use crate::campaigns::TEMPLATES;
use crate::support;

pub(crate) const TOKEN: &str = "campaign-token";

/// An API campaign `name` to the `vip` contacts, Mondays at 10:00 in Berlin.
pub(crate) fn api_campaign(name: &str) -> String {
    format!(
        "campaign: {name}\ncategory: marketing\n\
         template: {{ name: spring_sale, language: en_US, params: [\"{{{{contact.name}}}}\"] }}\n\
         audience: {{ tags: [vip] }}\nschedule: \"0 10 * * MON\"\ntimezone: Europe/Berlin\n"
    )
}

/// The file campaign `file_sale`: [`api_campaign`] in UTC, inside quiet hours from an hour
/// ago to two hours from now, so a dispatcher defers its recipients while a test runs.
fn file_campaign() -> String {
    use chrono::Timelike;
    let hour = chrono::Utc::now().hour();
    let quiet = format!(
        "quiet_hours: {{ from: \"{:02}:00\", to: \"{:02}:00\" }}\n",
        (hour + 23) % 24,
        (hour + 2) % 24
    );
    api_campaign("file_sale").replace("Europe/Berlin", "UTC") + quiet.as_str()
}

/// A project in `dir`: a `hi` flow, the `spring_sale` template, a file campaign
/// `file_sale`, one sandbox channel `main`, a file database, the admin token and prices.
pub(crate) fn project(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir.join("flows")).unwrap();
    std::fs::create_dir_all(dir.join("campaigns")).unwrap();
    std::fs::write(
        dir.join("flows/hello.yaml"),
        "flow: hello\ntriggers:\n  - keywords: [hi]\nsteps:\n  greet:\n    say: Hello!\n",
    )
    .unwrap();
    std::fs::write(dir.join("templates.yaml"), TEMPLATES).unwrap();
    std::fs::write(dir.join("campaigns/file_sale.yaml"), file_campaign()).unwrap();
    let config = format!(
        "flows: flows\ntemplates: templates.yaml\ncampaigns: campaigns\n\
         database: sqlite://{}\nchannels:\n  - name: main\n    provider: sandbox\n\
         admin:\n  token: {TOKEN}\n\
         campaign_prices:\n  marketing: 0.05\n  currency: EUR\n",
        dir.join("flowgate.db").display()
    );
    std::fs::write(dir.join("flowgate.yaml"), config).unwrap();
    dir.join("flowgate.yaml")
}

pub(crate) async fn start(dir: &Path) -> support::Running {
    let config = project(dir);
    let loaded = app::load(Some(&config)).unwrap_or_else(|d| panic!("{}", d.render(false)));
    let db = loaded.config.database.clone();
    support::Running::start(&loaded, &db, Arc::new(SystemClock)).await
}

/// Four contacts on `main`, three of them tagged `vip`.
pub(crate) async fn import_contacts(server: &support::Running) {
    let csv = "wa_id,name,tags\n4915100000001,Ada,vip\n4915100000002,Bo,vip\n\
               4915100000003,Cy,vip\n4915100000004,Di,other\n";
    let response = server
        .client
        .post(format!("{}/api/contacts/import", server.base))
        .bearer_auth(TOKEN)
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// One API call with the token: the status and the JSON answer (`null` when empty).
async fn call(
    server: &support::Running,
    method: Method,
    path: &str,
    body: Option<(&str, String)>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut request = server
        .client
        .request(method, format!("{}/api{path}", server.base))
        .bearer_auth(TOKEN);
    if let Some((content_type, body)) = body {
        request = request.header("content-type", content_type).body(body);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
    };
    (status, value)
}

/// The names `GET /api/campaigns` lists.
async fn names(server: &support::Running) -> Vec<String> {
    let (_, list) = get(server, "/campaigns").await;
    let list = list["campaigns"].as_array().unwrap();
    list.iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

async fn get(server: &support::Running, path: &str) -> (u16, Value) {
    call(server, Method::GET, path, None, &[]).await
}

async fn post(server: &support::Running, path: &str) -> (u16, Value) {
    call(server, Method::POST, path, None, &[]).await
}

async fn delete(server: &support::Running, path: &str) -> (u16, Value) {
    call(server, Method::DELETE, path, None, &[]).await
}

/// A definition sent as YAML.
async fn send_yaml(
    server: &support::Running,
    method: Method,
    path: &str,
    text: String,
) -> (u16, Value) {
    call(server, method, path, yaml(text), &[]).await
}

fn yaml(text: String) -> Option<(&'static str, String)> {
    Some(("application/yaml", text))
}

#[tokio::test]
async fn campaigns_are_created_refused_replaced_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let post = |body| call(&server, Method::POST, "/campaigns", body, &[]);

    let (status, created) = post(yaml(api_campaign("api_sale"))).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["origin"], "api");
    assert_eq!(created["loaded"], true);
    assert_eq!(created["definition"]["audience"]["tags"], json!(["vip"]));
    assert!(created["next_run_at"].is_string(), "{created}");

    let (status, again) = post(yaml(api_campaign("api_sale"))).await;
    assert_eq!(
        (status, again["error"]["code"].as_str()),
        (409, Some("campaign_exists"))
    );

    // An unknown template: 422, located in the text sent, as `check` says it.
    let wrong = api_campaign("bad_sale").replace("spring_sale,", "sprnig_sale,");
    let (status, refused) = post(yaml(wrong)).await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["error"]["code"], "invalid_campaign");
    let item = &refused["error"]["diagnostics"]["items"][0];
    assert_eq!(item["severity"], "error");
    assert_eq!(
        (item["line"].as_u64(), item["file"].as_str()),
        (Some(3), Some("api/request.yaml"))
    );
    assert!(
        item["message"].as_str().unwrap().contains("sprnig_sale"),
        "{item}"
    );
    let (_, missing) = get(&server, "/campaigns/bad_sale").await;
    assert_eq!(
        missing["error"]["code"], "unknown_campaign",
        "nothing was saved"
    );

    // JSON {"source": …} is the same definition; PUT replaces it (200) and keeps the name.
    let retagged = api_campaign("api_sale").replace("[vip]", "[other]");
    let body = Some((
        "application/json",
        json!({ "source": retagged }).to_string(),
    ));
    let (status, replaced) = call(&server, Method::PUT, "/campaigns/api_sale", body, &[]).await;
    assert_eq!(status, 200, "{replaced}");
    assert_eq!(replaced["definition"]["audience"]["tags"], json!(["other"]));
    let (status, shown) = get(&server, "/campaigns/api_sale").await;
    assert_eq!(status, 200);
    assert!(shown["source"].as_str().unwrap().contains("[other]"));

    let (status, mismatch) = send_yaml(
        &server,
        Method::PUT,
        "/campaigns/other_name",
        api_campaign("api_sale"),
    )
    .await;
    assert_eq!(
        (status, mismatch["error"]["code"].as_str()),
        (422, Some("name_mismatch"))
    );

    let (status, _) = delete(&server, "/campaigns/api_sale").await;
    assert_eq!(status, 204);
    assert_eq!(names(&server).await, ["file_sale"]);
    let (status, _) = delete(&server, "/campaigns/api_sale").await;
    assert_eq!(status, 404);
    server.shutdown().await;
}

#[tokio::test]
async fn a_file_campaign_is_changed_only_in_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let (status, put) = send_yaml(
        &server,
        Method::PUT,
        "/campaigns/file_sale",
        api_campaign("file_sale"),
    )
    .await;
    assert_eq!(status, 409, "{put}");
    assert_eq!(put["error"]["code"], "file_campaign");
    assert!(
        put["error"]["message"]
            .as_str()
            .unwrap()
            .contains("edit the file"),
        "{put}"
    );
    let (status, post) = send_yaml(
        &server,
        Method::POST,
        "/campaigns",
        api_campaign("file_sale"),
    )
    .await;
    assert_eq!(
        (status, post["error"]["code"].as_str()),
        (409, Some("file_campaign"))
    );
    let (status, delete) = delete(&server, "/campaigns/file_sale").await;
    assert_eq!(
        (status, delete["error"]["code"].as_str()),
        (409, Some("file_campaign"))
    );
    let (_, shown) = get(&server, "/campaigns/file_sale").await;
    assert_eq!(shown["origin"], "file");
    server.shutdown().await;
}

#[tokio::test]
async fn pause_and_resume_change_the_campaigns_state() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let (status, paused) = post(&server, "/campaigns/file_sale/pause").await;
    assert_eq!(status, 200, "{paused}");
    assert_eq!(
        (paused["paused"].as_bool(), paused["pause_reason"].as_str()),
        (Some(true), Some("paused by an operator"))
    );
    let stored = server.db.campaign("file_sale").await.unwrap().unwrap();
    assert!(stored.paused);

    let (status, refused) = post(&server, "/campaigns/file_sale/run-now").await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (409, Some("campaign_paused"))
    );

    let (status, resumed) = post(&server, "/campaigns/file_sale/resume").await;
    assert_eq!((status, resumed["paused"].as_bool()), (200, Some(false)));
    assert!(
        !server
            .db
            .campaign("file_sale")
            .await
            .unwrap()
            .unwrap()
            .paused
    );

    let (status, unknown) = post(&server, "/campaigns/nope/pause").await;
    assert_eq!(
        (status, unknown["error"]["code"].as_str()),
        (404, Some("unknown_campaign"))
    );
    let (status, none) = post(&server, "/campaigns/file_sale/cancel").await;
    assert_eq!(
        (status, none["error"]["code"].as_str()),
        (409, Some("no_active_run"))
    );
    server.shutdown().await;
}

#[tokio::test]
async fn run_now_starts_one_run_per_idempotency_key_and_lists_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    import_contacts(&server).await;
    let key = [("idempotency-key", "retry-me-1")];
    let (status, first) = call(
        &server,
        Method::POST,
        "/campaigns/file_sale/run-now",
        None,
        &key,
    )
    .await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(
        (first["started"].as_bool(), first["recipients"].as_u64()),
        (Some(true), Some(3))
    );
    let run = first["run"].as_i64().unwrap();

    let (status, retried) = call(
        &server,
        Method::POST,
        "/campaigns/file_sale/run-now",
        None,
        &key,
    )
    .await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(
        (retried["run"].as_i64(), retried["started"].as_bool()),
        (Some(run), Some(false))
    );
    // Another request while the run is not over is refused, not a second run.
    let other = [("idempotency-key", "another")];
    let (status, busy) = call(
        &server,
        Method::POST,
        "/campaigns/file_sale/run-now",
        None,
        &other,
    )
    .await;
    assert_eq!(
        (status, busy["error"]["code"].as_str()),
        (409, Some("run_active"))
    );

    let (status, runs) = get(&server, "/campaigns/file_sale/runs").await;
    assert_eq!(status, 200);
    let runs = runs["runs"].as_array().unwrap().clone();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(
        (runs[0]["id"].as_i64(), runs[0]["trigger"].as_str()),
        (Some(run), Some("manual"))
    );
    let (_, list) = get(&server, "/campaigns").await;
    assert_eq!(list["campaigns"][0]["latest_run"]["id"].as_i64(), Some(run));

    let (_, report) = get(&server, &format!("/campaigns/file_sale/runs/{run}")).await;
    assert_eq!(report["report"]["planned"], 3, "{report}");

    let (status, cancelled) = post(&server, "/campaigns/file_sale/cancel").await;
    assert_eq!(
        (status, cancelled["cancelled_run"].as_i64()),
        (200, Some(run))
    );
    let (_, report) = get(&server, &format!("/campaigns/file_sale/runs/{run}")).await;
    assert_eq!(report["run"]["status"], "cancelled");
    let (status, _) = call(
        &server,
        Method::POST,
        "/campaigns/file_sale/run-now",
        None,
        &other,
    )
    .await;
    assert_eq!(status, 201, "the run is over: a new one may start");
    server.shutdown().await;
}

#[tokio::test]
async fn a_campaigns_report_is_its_latest_runs() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    import_contacts(&server).await;
    let (status, none) = get(&server, "/campaigns/file_sale/report").await;
    assert_eq!(
        (status, none["error"]["code"].as_str()),
        (404, Some("no_runs")),
        "{none}"
    );
    let (status, unknown) = get(&server, "/campaigns/nope/report").await;
    assert_eq!(
        (status, unknown["error"]["code"].as_str()),
        (404, Some("unknown_campaign"))
    );

    let (status, first) = post(&server, "/campaigns/file_sale/run-now").await;
    assert_eq!(status, 201, "{first}");
    let run = first["run"].as_i64().unwrap();
    let (status, latest) = get(&server, "/campaigns/file_sale/report").await;
    assert_eq!(status, 200, "{latest}");
    assert_eq!(latest["run"]["id"].as_i64(), Some(run));
    assert_eq!(latest["report"]["planned"], 3, "{latest}");
    let (_, by_id) = get(&server, &format!("/campaigns/file_sale/runs/{run}")).await;
    assert_eq!(by_id["run"]["id"], latest["run"]["id"]);

    let (status, bad) = get(&server, "/campaigns/file_sale/runs?limit=0").await;
    assert_eq!(
        (status, bad["error"]["code"].as_str()),
        (400, Some("invalid_limit"))
    );
    let (status, bad) = get(&server, "/campaigns/file_sale/runs/latest").await;
    assert_eq!(
        (status, bad["error"]["code"].as_str()),
        (400, Some("invalid_path"))
    );
    let (status, bad) = get(&server, &format!("/campaigns/nope/runs/{run}")).await;
    assert_eq!(
        (status, bad["error"]["code"].as_str()),
        (404, Some("unknown_run"))
    );
    server.shutdown().await;
}

/// The contact id of `wa_id` on `main` (as the conversation API shows it).
async fn contact_id(server: &support::Running, wa_id: &str) -> i64 {
    let (status, c) = call(
        server,
        Method::GET,
        &format!("/conversations/{wa_id}"),
        None,
        &[],
    )
    .await;
    assert_eq!(status, 200, "{c}");
    c["id"].as_i64().unwrap()
}

/// A customer's message through the sandbox; answers the id of the flow's reply.
async fn say_hi(server: &support::Running, wa_id: &str) -> i64 {
    let response = server
        .client
        .post(format!("{}/sandbox/messages", server.base))
        .json(&json!({"from": wa_id, "text": "hi"}))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    body["replies"][0]["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("{body}"))
}

#[tokio::test]
async fn a_runs_report_counts_its_ledger_replies_and_cost() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    import_contacts(&server).await;
    let db = &server.db;
    // A run claimed straight in the store stays `planned`: nothing but this test decides
    // its recipients.
    let now = chrono::Utc::now();
    let claim = db
        .claim_run("file_sale", now, RunTrigger::Manual, now)
        .await
        .unwrap();
    let (ada, bo, cy, di) = (
        contact_id(&server, "4915100000001").await,
        contact_id(&server, "4915100000002").await,
        contact_id(&server, "4915100000003").await,
        contact_id(&server, "4915100000004").await,
    );
    db.snapshot_audience(claim.run_id, None, &[ada, bo, cy, di], now, now)
        .await
        .unwrap();
    // Ada was sent the flow's reply as the campaign's message, inside her window, and
    // wrote again after it.
    let message = say_hi(&server, "4915100000001").await;
    let outcome = |decision, reason, message_id, not_before| RecipientOutcome {
        decision,
        variant: None,
        reason,
        message_id,
        not_before,
    };
    let record = |contact, o: RecipientOutcome<'static>| async move {
        assert!(
            db.record_recipient(claim.run_id, contact, &o, now)
                .await
                .unwrap()
        );
    };
    record(
        ada,
        outcome(RecipientDecision::Sent, None, Some(message), None),
    )
    .await;
    say_hi(&server, "4915100000001").await;
    record(
        bo,
        outcome(
            RecipientDecision::Skipped,
            Some("opted out of marketing (STOP)"),
            None,
            None,
        ),
    )
    .await;
    let later = Some(now + Duration::hours(8));
    record(
        cy,
        outcome(
            RecipientDecision::Deferred,
            Some("quiet hours in Europe/Berlin"),
            None,
            later,
        ),
    )
    .await;
    record(
        di,
        outcome(
            RecipientDecision::Failed,
            Some("no WhatsApp account"),
            None,
            None,
        ),
    )
    .await;

    let path = format!("/campaigns/file_sale/runs/{}", claim.run_id);
    let (status, body) = get(&server, &path).await;
    assert_eq!(status, 200, "{body}");
    let r = &body["report"];
    assert_eq!(body["run"]["status"], "planned");
    assert_eq!(
        (r["planned"].as_i64(), r["pending"].as_i64()),
        (Some(4), Some(1))
    );
    assert_eq!(
        (r["sent"].as_i64(), r["replied"].as_i64()),
        (Some(1), Some(1))
    );
    assert_eq!(
        r["skipped"],
        json!({"total": 1, "by": {"opted out of marketing (STOP)": 1}})
    );
    assert_eq!(
        r["deferred"],
        json!({"total": 1, "by": {"quiet hours in Europe/Berlin": 1}})
    );
    assert_eq!(
        r["failed"],
        json!({"total": 1, "by": {"no WhatsApp account": 1}})
    );
    // A free-form message inside the window is free; no template was sent.
    assert_eq!(r["cost"]["currency"], "EUR");
    assert_eq!(
        r["cost"]["categories"][0],
        json!({"category": "marketing", "charged": 0, "free": 0, "price": 0.05, "amount": 0.0})
    );
    assert_eq!(r["cost"]["categories"][1]["category"], "service");
    assert_eq!(r["cost"]["categories"][1]["free"], 1);
    assert_eq!(r["cost"]["total"], 0.0);

    let (status, other) = call(
        &server,
        Method::GET,
        &format!("/campaigns/nope/runs/{}", claim.run_id),
        None,
        &[],
    )
    .await;
    assert_eq!(
        (status, other["error"]["code"].as_str()),
        (404, Some("unknown_run"))
    );
    server.shutdown().await;
}

#[tokio::test]
async fn the_campaign_api_needs_the_token_and_a_known_media_type() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let url = format!("{}/api/campaigns", server.base);
    let missing = server.client.get(&url).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    let wrong = server
        .client
        .post(&url)
        .bearer_auth("wrong")
        .body(api_campaign("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let (status, body) = call(
        &server,
        Method::POST,
        "/campaigns",
        Some(("text/plain", api_campaign("x"))),
        &[],
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (415, Some("unsupported_media_type"))
    );
    let bad_key = [("idempotency-key", "")];
    let (status, body) = call(
        &server,
        Method::POST,
        "/campaigns/file_sale/run-now",
        None,
        &bad_key,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_idempotency_key"))
    );
    server.shutdown().await;
}

#[tokio::test]
async fn metrics_count_runs_by_status_and_active_recipients() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    import_contacts(&server).await;
    let now = chrono::Utc::now();
    let claim = server
        .db
        .claim_run("file_sale", now, RunTrigger::Manual, now)
        .await
        .unwrap();
    let ada = contact_id(&server, "4915100000001").await;
    server
        .db
        .snapshot_audience(claim.run_id, None, &[ada], now, now)
        .await
        .unwrap();
    let text = server
        .client
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("flowgate_campaign_runs{status=\"planned\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("flowgate_campaign_active_recipients{campaign=\"file_sale\",decision=\"planned\",reason=\"none\"} 1"),
        "{text}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_live_reload_adds_and_forgets_campaign_files() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let campaigns = dir.path().join("campaigns");
    std::fs::write(campaigns.join("new_sale.yaml"), api_campaign("new_sale")).unwrap();
    std::fs::remove_file(campaigns.join("file_sale.yaml")).unwrap();
    let (status, body) = post(&server, "/flows/reload").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(names(&server).await, ["new_sale"]);
    let (_, shown) = get(&server, "/campaigns/new_sale").await;
    assert_eq!(
        (shown["origin"].as_str(), shown["loaded"].as_bool()),
        (Some("file"), Some(true))
    );
    server.shutdown().await;
}

#[tokio::test]
async fn an_api_campaign_is_compiled_again_from_the_store_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let (status, _) = send_yaml(&server, Method::POST, "/campaigns", api_campaign("kept")).await;
    assert_eq!(status, 201);
    server.shutdown().await;

    let server = start(dir.path()).await;
    let (status, shown) = get(&server, "/campaigns/kept").await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(
        (shown["origin"].as_str(), shown["loaded"].as_bool()),
        (Some("api"), Some(true))
    );
    import_contacts(&server).await;
    let (status, run) = post(&server, "/campaigns/kept/run-now").await;
    assert_eq!(
        (status, run["recipients"].as_u64()),
        (201, Some(3)),
        "{run}"
    );
    server.shutdown().await;
}
