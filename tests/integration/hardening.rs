//! Hardening: the sandbox and `/metrics` on a public listener, `migrate` with a broken flow,
//! and log lines that a webhook cannot forge (the `flowgate` binary, its stderr read back).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate::app;
use flowgate::clock::SystemClock;
use serde_json::json;

use crate::support;

use support::shipped_project as project;

async fn status(request: reqwest::RequestBuilder) -> u16 {
    request.send().await.expect("request").status().as_u16()
}

#[tokio::test]
async fn a_public_listener_keeps_the_sandbox_and_metrics_behind_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("db.sqlite").display());
    let config = project(dir.path(), "admin:\n  token: adm1n\n");
    let loaded = app::load(Some(&config)).unwrap();
    let server = support::Running::start_on(&loaded, &db, "0.0.0.0:0", Arc::new(SystemClock)).await;
    let (base, client) = (server.base.clone(), server.client.clone());
    let message = json!({"from": "15550007777", "text": "menu"});
    let sandbox = || {
        client
            .post(format!("{base}/sandbox/messages"))
            .json(&message)
    };
    let metrics = || client.get(format!("{base}/metrics"));

    let refused = sandbox().send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "missing_token");
    assert_eq!(status(sandbox().bearer_auth("wrong")).await, 401);
    assert_eq!(status(sandbox().bearer_auth("adm1n")).await, 200);
    assert_eq!(status(metrics()).await, 401);
    assert_eq!(status(metrics().bearer_auth("adm1n")).await, 200);
    assert_eq!(status(client.get(format!("{base}/healthz"))).await, 200);
    server.shutdown().await;

    // Said explicitly: the sandbox is public, and metrics have a token of their own.
    let config = project(
        dir.path(),
        "admin:\n  token: adm1n\nsandbox: public\nmetrics:\n  token: scr4pe\n",
    );
    let loaded = app::load(Some(&config)).unwrap();
    let server = support::Running::start_on(&loaded, &db, "0.0.0.0:0", Arc::new(SystemClock)).await;
    let (base, client) = (server.base.clone(), server.client.clone());
    let sandbox = client
        .post(format!("{base}/sandbox/messages"))
        .json(&message);
    assert_eq!(status(sandbox).await, 200);
    let metrics = || client.get(format!("{base}/metrics"));
    assert_eq!(status(metrics()).await, 401);
    assert_eq!(status(metrics().bearer_auth("adm1n")).await, 401);
    assert_eq!(status(metrics().bearer_auth("scr4pe")).await, 200);
    server.shutdown().await;

    // `sandbox: off` closes it even on loopback.
    let config = project(dir.path(), "sandbox: off\n");
    let loaded = app::load(Some(&config)).unwrap();
    let server = support::Running::start(&loaded, &db, Arc::new(SystemClock)).await;
    let sandbox = server
        .client
        .post(format!("{}/sandbox/messages", server.base))
        .json(&message);
    assert_eq!(status(sandbox).await, 404);
    server.shutdown().await;
}

/// Runs the binary with `args` to the end (bounded), returning exit code, stdout, stderr.
fn flowgate(args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the flowgate binary starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`flowgate {}` did not finish", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn migrate_needs_only_the_database_not_loadable_flows() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("flows")).unwrap();
    std::fs::write(
        dir.path().join("flows/broken.yaml"),
        "flow: broken\nsteps:\n  a:\n    sav: hi\n",
    )
    .unwrap();
    let db = dir.path().join("flowgate.db");
    let config = dir.path().join("flowgate.yaml");
    std::fs::write(&config, format!("database: sqlite://{}\n", db.display())).unwrap();
    let config = config.to_str().unwrap();

    let (code, _, check) = flowgate(&["--config", config, "check"]);
    assert_eq!(code, Some(1), "the flow is broken: {check}");
    let (code, stdout, stderr) = flowgate(&["--config", config, "migrate"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("migrated sqlite://"), "{stdout}");
    assert!(db.exists());

    // A config that does not load still stops it, with the reason.
    std::fs::write(dir.path().join("flowgate.yaml"), "databse: x\n").unwrap();
    let (code, _, stderr) = flowgate(&["--config", config, "migrate"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("unknown field `databse`"), "{stderr}");
}

/// `flowgate migrate` from two instances at once on one PostgreSQL database: both succeed
/// (the migrator's advisory lock makes one wait), the schema is there once, and the
/// password in the URL is not printed.
#[tokio::test]
async fn two_migrates_at_once_on_postgres_both_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let Some(database) =
        crate::support::TestDb::new(dir.path(), crate::support::Backend::Postgres).await
    else {
        return;
    };
    // The test server trusts loopback, so the password is never asked for: it is only there
    // to be kept out of the output.
    let url = database
        .url
        .replacen("://postgres@", "://postgres:s3cret@", 1);
    let config = dir.path().join("flowgate.yaml");
    std::fs::write(&config, format!("database: \"{url}\"\n")).unwrap();
    let (a, b) = tokio::join!(
        crate::support::run_flowgate(&config, &["migrate"]),
        crate::support::run_flowgate(&config, &["migrate"])
    );
    for out in [a, b] {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(text.contains("migrated postgres://postgres:***@"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
    }
    let db = flowgate::store::Db::connect(&database.url).await.unwrap();
    let migrations = std::fs::read_dir("migrations/postgres").unwrap().count() as i64;
    assert_eq!(
        crate::support::count(&db, "SELECT COUNT(*) FROM _sqlx_migrations").await,
        migrations,
        "each migration applied once"
    );
    db.close().await;
    database.clean_up().await;
}

/// A `flowgate serve` child, killed when dropped.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const SECRET: &str = "log-app-secret";
const FORGED: &str = "Oops\n2026-12-03T00:00:00.000000Z ERROR flowgate: forged line\u{0}";

/// Serves a project with one cloud_api channel (`extra` config appended), posts a signed
/// webhook whose errors carry `FORGED`, and returns the server's stderr once it logged them.
async fn log_of_a_hostile_webhook(dir: &Path, extra: &str) -> String {
    let config = format!(
        "database: sqlite://{}\nlisten: 127.0.0.1:0\n{extra}channels:\n  - name: main\n    \
         provider: cloud_api\n    phone_number_id: \"110000000000001\"\n    access_token: t\n    \
         app_secret: {SECRET}\n    verify_token: v\n    api_base: http://127.0.0.1:9\n",
        dir.join("flowgate.db").display()
    );
    let path = project(dir, &config);
    let log = dir.join("server.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["serve", "--config"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let served = Served(child);
    // The banner names the port: "… on http://127.0.0.1:PORT". Stdout is read to its end,
    // so the server never writes into a closed pipe.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(port) = line.split("http://127.0.0.1:").nth(1) {
                let _ = tx.send(port.trim().to_string());
            }
        }
    });
    let port = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("the banner names the address");

    let errors = json!({"errors": [{"code": 131000, "title": FORGED, "message": FORGED,
        "error_data": {"details": FORGED}}]});
    let body = support::envelope("110000000000001", errors);
    let answer = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/webhook/main"))
        .header("x-hub-signature-256", support::sign(SECRET, &body))
        .header("content-type", "application/json")
        .body(body)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let mut text = String::new();
    support::eventually("the server logs the webhook's error", || {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        let logged = text.contains("WhatsApp reported an error");
        async move { logged }
    })
    .await;
    drop(served);
    text
}

#[tokio::test]
async fn a_webhook_cannot_forge_a_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = log_of_a_hostile_webhook(dir.path(), "").await;
    assert!(!text.contains('\0'), "{text:?}");
    assert!(
        !text.contains("\u{1b}["),
        "no colours into a file: {text:?}"
    );
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("forged line")).collect();
    assert_eq!(lines.len(), 1, "one line, the forged one inside it: {text}");
    assert!(lines[0].contains(" WARN "), "{}", lines[0]);
    assert!(
        lines[0].contains("Oops\\n2026-12-03T00:00:00.000000Z ERROR flowgate: forged line\\0"),
        "{}",
        lines[0]
    );
    assert!(!text.lines().any(|l| l.starts_with("2026-12-03T00:00:00")));

    let dir = tempfile::tempdir().unwrap();
    let text = log_of_a_hostile_webhook(dir.path(), "log:\n  format: json\n").await;
    // Diagnostics about the flows print before the log starts; every log line is JSON.
    let events: Vec<serde_json::Value> = text
        .lines()
        .skip_while(|l| !l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let event = events
        .iter()
        .find(|e| e["message"] == "WhatsApp reported an error")
        .expect("the error is logged");
    assert_eq!(event["level"], "WARN");
    assert_eq!(event["title"], FORGED);
    assert_eq!(event["details"], FORGED);
}
