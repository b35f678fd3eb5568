//! Live reload while `serve` runs: `POST /api/flows/reload`, `SIGHUP` and `serve --watch`.
//! New conversations get the new flow version, running ones stay on theirs, and a flow set
//! with an error is refused while the running one is kept.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate::app;
use flowgate::clock::SystemClock;
use serde_json::Value;

use crate::support;

use crate::serve::V1;

/// A misspelled key (`sav:`): `check` refuses the file.
fn broken() -> String {
    V1.replace("v1:", "v3:")
        .replace("save: score", "sav: score")
}

fn write_flow(dir: &Path, flow: &str) {
    std::fs::create_dir_all(dir.join("flows")).unwrap();
    // Written aside and renamed: a watcher never reads half a file.
    let tmp = dir.join("survey.yaml.tmp");
    std::fs::write(&tmp, flow).unwrap();
    std::fs::rename(&tmp, dir.join("flows/survey.yaml")).unwrap();
}

/// The text of the first reply to `text` from `from` through the sandbox door.
async fn first_reply(client: &reqwest::Client, base: &str, from: &str, text: &str) -> String {
    let replies = crate::admin::sandbox_say(client, base, from, text).await;
    replies.into_iter().next().unwrap_or_default()
}

#[tokio::test]
async fn the_api_reloads_changed_flows_and_refuses_a_broken_edit() {
    let dir = tempfile::tempdir().unwrap();
    write_flow(dir.path(), V1);
    std::fs::write(dir.path().join("flowgate.yaml"), "flows: flows\n").unwrap();
    let loaded = app::load(Some(&dir.path().join("flowgate.yaml"))).unwrap();
    let db = format!("sqlite://{}", dir.path().join("db.sqlite").display());
    let server = support::Running::start(&loaded, &db, Arc::new(SystemClock)).await;
    let (client, base) = (server.client.clone(), server.base.clone());
    let reload = || client.post(format!("{base}/api/flows/reload")).send();

    let asked = first_reply(&client, &base, "15550000001", "survey").await;
    assert_eq!(asked, "v1: how many stars?");

    write_flow(dir.path(), &V1.replace("v1:", "v2:"));
    let response = reload().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["flows"][0]["id"], "survey", "{body}");

    // The running session stays on v1; a new one starts on v2.
    let thanks = first_reply(&client, &base, "15550000001", "5").await;
    assert_eq!(thanks, "v1: thanks for 5 stars");
    let asked = first_reply(&client, &base, "15550000002", "survey").await;
    assert_eq!(asked, "v2: how many stars?");

    // A broken edit is refused with its diagnostics; v2 keeps running.
    write_flow(dir.path(), &broken());
    let response = reload().await.unwrap();
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_flows", "{body}");
    let diagnostics = body["error"]["diagnostics"].as_str().unwrap();
    assert!(diagnostics.contains("sav"), "{diagnostics}");
    let asked = first_reply(&client, &base, "15550000003", "survey").await;
    assert_eq!(asked, "v2: how many stars?");
    server.shutdown().await;
}

/// `flowgate serve` as a child process on a free port, killed when dropped.
struct Binary {
    child: std::process::Child,
    base: String,
    log: std::path::PathBuf,
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Binary {
    /// Starts `serve` (with `args`) on a project of the survey flow in `dir`.
    async fn start(dir: &Path, args: &[&str]) -> Binary {
        write_flow(dir, V1);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = format!(
            "database: sqlite://{}\nlisten: 127.0.0.1:{port}\nflows: flows\n",
            dir.join("flowgate.db").display()
        );
        std::fs::write(dir.join("flowgate.yaml"), config).unwrap();
        let log = dir.join("server.log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_flowgate"))
            .args(["serve", "--config"])
            .arg(dir.join("flowgate.yaml"))
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let server = Binary {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !client
            .get(format!("{}/healthz", server.base))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(Instant::now() < deadline, "no start: {}", server.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Asks new customers to start the survey until the question is `expected` (at most
    /// 20 s), while the process stays alive.
    async fn until_asked(&mut self, expected: &str) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        for n in 0.. {
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "the server ended: {}",
                self.log()
            );
            let from = format!("1555000{n:04}");
            if first_reply(&client, &self.base, &from, "survey").await == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "never asked {expected:?}: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(unix)]
#[tokio::test]
async fn sighup_reloads_the_flows_and_the_server_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Binary::start(dir.path(), &[]).await;
    server.until_asked("v1: how many stars?").await;

    write_flow(dir.path(), &V1.replace("v1:", "v2:"));
    let hup = |pid: u32| {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    hup(server.child.id());
    server.until_asked("v2: how many stars?").await;

    // A broken edit on SIGHUP: logged, refused, v2 still runs.
    write_flow(dir.path(), &broken());
    hup(server.child.id());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server.log().contains("the flows were not reloaded") {
        assert!(
            Instant::now() < deadline,
            "no refusal logged: {}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.until_asked("v2: how many stars?").await;
}

#[tokio::test]
async fn serve_watch_reloads_a_changed_flow() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Binary::start(dir.path(), &["--watch"]).await;
    server.until_asked("v1: how many stars?").await;
    write_flow(dir.path(), &V1.replace("v1:", "v2: now"));
    server.until_asked("v2: now how many stars?").await;
}
