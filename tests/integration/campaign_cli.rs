//! `flowgate campaign …` through the real binary against a real server on port 0: `list`,
//! `create -f`, `pause`, `run-now --detach`, `report`, and the error when no server answers.

use std::path::Path;

use crate::campaign_api::{api_campaign, import_contacts, start};
use crate::support;

/// Runs `flowgate --config CONFIG campaign --url URL ARGS…` (the token from the config).
async fn campaign(config: &Path, url: &str, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["campaign", "--url", url];
    all.extend_from_slice(args);
    let out = support::run_flowgate(config, &all).await;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[tokio::test]
async fn the_cli_lists_creates_pauses_runs_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    import_contacts(&server).await;
    let config = dir.path().join("flowgate.yaml");
    let url = server.base.clone();

    let file = dir.path().join("cli_sale.yaml");
    std::fs::write(&file, api_campaign("cli_sale")).unwrap();
    let (ok, out, err) = campaign(&config, &url, &["create", "-f", file.to_str().unwrap()]).await;
    assert!(ok, "{out}{err}");
    assert_eq!(out, "created campaign cli_sale\n");

    let (ok, out, err) = campaign(&config, &url, &["pause", "cli_sale"]).await;
    assert!(ok, "{out}{err}");
    let (ok, out, _) = campaign(&config, &url, &["list"]).await;
    assert!(ok);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{out}");
    let cli_sale = lines
        .iter()
        .find(|l| l.starts_with("cli_sale"))
        .expect(&out);
    assert!(
        cli_sale.contains(" api ") && cli_sale.contains(" paused "),
        "{out}"
    );
    let file_sale = lines
        .iter()
        .find(|l| l.starts_with("file_sale"))
        .expect(&out);
    assert!(
        file_sale.contains(" file ") && file_sale.contains(" active "),
        "{out}"
    );

    // A refusal is the server's message, and exit 1.
    let (ok, _, err) = campaign(&config, &url, &["run-now", "cli_sale", "--detach"]).await;
    assert!(!ok);
    assert!(
        err.contains("campaign `cli_sale` is paused: resume it first (campaign_paused)"),
        "{err}"
    );

    let (ok, out, err) = campaign(&config, &url, &["run-now", "file_sale", "--detach"]).await;
    assert!(ok, "{out}{err}");
    assert!(
        out.starts_with("started run ") && out.contains("of campaign file_sale: 3 recipients"),
        "{out}"
    );
    let (ok, out, err) = campaign(&config, &url, &["report", "file_sale"]).await;
    assert!(ok, "{out}{err}");
    assert!(out.starts_with("campaign file_sale, run "), "{out}");
    let planned = out
        .lines()
        .find(|l| l.trim_start().starts_with("planned"))
        .expect(&out);
    assert_eq!(
        planned.split_whitespace().collect::<Vec<_>>(),
        ["planned", "3"],
        "{out}"
    );
    assert!(out.contains("cost estimate (EUR)"), "{out}");
    server.shutdown().await;
}

#[tokio::test]
async fn the_cli_says_when_no_server_answers() {
    let dir = tempfile::tempdir().unwrap();
    let config = crate::campaign_api::project(dir.path());
    // Nothing listens on port 1 of loopback.
    let (ok, _, err) = campaign(&config, "http://127.0.0.1:1", &["list"]).await;
    assert!(!ok);
    assert!(
        err.contains(
            "no flowgate server at http://127.0.0.1:1: start `flowgate serve` or pass --url"
        ),
        "{err}"
    );
    let (ok, _, err) = campaign(
        &config,
        "http://127.0.0.1:1",
        &["report", "x", "--run", "abc"],
    )
    .await;
    assert!(!ok, "{err}");
}

#[tokio::test]
async fn run_now_follows_the_run_until_it_is_over_and_prints_its_report() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    import_contacts(&server).await;
    let config = dir.path().join("flowgate.yaml");
    let url = server.base.clone();
    // `file_sale` is in quiet hours: its run stays open until it is cancelled below.
    let follow =
        tokio::spawn(async move { campaign(&config, &url, &["run-now", "file_sale"]).await });
    let db = server.db.clone();
    support::eventually("the run-now's run is running", || {
        let db = db.clone();
        async move {
            let runs = db.campaign_runs("file_sale", 1).await.unwrap();
            runs.first()
                .is_some_and(|r| r.status == flowgate::store::RunStatus::Running)
        }
    })
    .await;
    let cancelled = server
        .client
        .post(format!("{}/api/campaigns/file_sale/cancel", server.base))
        .bearer_auth(crate::campaign_api::TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 200);
    let (ok, out, err) = follow.await.unwrap();
    assert!(ok, "{out}{err}");
    assert!(out.contains("of campaign file_sale: 3 recipients"), "{out}");
    assert!(out.contains("(manual, cancelled)"), "{out}");
    let cancelled = out
        .lines()
        .find(|l| l.trim_start().starts_with("cancelled"))
        .expect(&out);
    assert_eq!(
        cancelled.split_whitespace().collect::<Vec<_>>(),
        ["cancelled", "3"],
        "{out}"
    );
    server.shutdown().await;
}
