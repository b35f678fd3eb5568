//! Contacts from CSV: `flowgate contacts import` through the real binary, and
//! `POST /api/contacts/import` on the real server, including a file of 100,000 contacts.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate::app;
use flowgate::clock::SystemClock;
use serde_json::{Value, json};

use crate::support;

const TOKEN: &str = "import-token";

/// A project in `dir`: the repository's flows, a file database, two sandbox channels
/// (`first` is the default) and an admin token.
fn project(dir: &Path) -> PathBuf {
    let extra = format!(
        "database: sqlite://{}\nchannels:\n  - name: first\n    provider: sandbox\n  \
         - name: second\n    provider: sandbox\nadmin:\n  token: {TOKEN}\n",
        dir.join("flowgate.db").display()
    );
    crate::admin::project(dir, &extra)
}

/// Runs `flowgate --config CONFIG contacts import ARGS…`, at most 60 s.
async fn import_cli(config: &Path, args: &[&str]) -> Output {
    let args: Vec<&str> = ["contacts", "import"].iter().chain(args).copied().collect();
    support::run_flowgate(config, &args).await
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const CSV: &str = "wa_id,bsuid,name,tags,attr.city,timezone\n\
                   +4915123456789,DE.111,Ada,vip;customers,Berlin,Europe/Berlin\n\
                   4915123456780,,\"Lovelace, Ada\",customers,,\n\
                   0151 234,,Bad Number,,,\n\
                   ,DE.222,Bo,,,Mars/Olympus\n";

#[tokio::test]
async fn the_cli_imports_reports_skipped_lines_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let config = project(dir.path());
    let file = dir.path().join("contacts.csv");
    std::fs::write(&file, CSV).unwrap();
    let file = file.to_str().unwrap();

    let first = import_cli(&config, &[file]).await;
    let out = text(&first.stdout);
    assert!(first.status.success(), "{out}{}", text(&first.stderr));
    assert_eq!(
        out,
        "imported 2 new, 0 updated, 0 unchanged on channel first; 2 lines skipped\n  \
         line 4: wa_id `0151 234` is not a phone number: write 8-15 digits, country code \
         first, with no spaces or punctuation (an optional leading + is allowed), e.g. \
         4915123456789\n  \
         line 5: unknown time zone `Mars/Olympus`: use an IANA name such as Europe/Berlin or \
         America/New_York\n"
    );

    let again = import_cli(&config, &[file, "--channel", "first"]).await;
    assert!(again.status.success());
    assert!(
        text(&again.stdout).starts_with("imported 0 new, 0 updated, 2 unchanged on channel first"),
        "{}",
        text(&again.stdout)
    );

    // Another channel is another set of contacts.
    let other = import_cli(&config, &[file, "--channel", "second"]).await;
    assert!(text(&other.stdout).starts_with("imported 2 new"));
}

#[tokio::test]
async fn the_cli_refuses_a_file_it_cannot_import_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = project(dir.path());
    let missing = import_cli(&config, &["no-such-file.csv"]).await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        text(&missing.stderr).contains("cannot read no-such-file.csv"),
        "{}",
        text(&missing.stderr)
    );

    let file = dir.path().join("typo.csv");
    std::fs::write(&file, "wa_id,nmae\n4915123456789,Ada\n").unwrap();
    let typo = import_cli(&config, &[file.to_str().unwrap()]).await;
    assert_eq!(typo.status.code(), Some(1));
    assert!(
        text(&typo.stderr)
            .contains("unknown column `nmae` (column 2 of the header): did you mean `name`?"),
        "{}",
        text(&typo.stderr)
    );

    let file = dir.path().join("ok.csv");
    std::fs::write(&file, CSV).unwrap();
    let channel = import_cli(&config, &[file.to_str().unwrap(), "--channel", "thrid"]).await;
    assert_eq!(channel.status.code(), Some(1));
    assert!(
        text(&channel.stderr).contains("there is no channel `thrid`"),
        "{}",
        text(&channel.stderr)
    );
    // Nothing of the refused runs reached the database: the first real import creates all.
    let ok = import_cli(&config, &[file.to_str().unwrap()]).await;
    assert!(text(&ok.stdout).starts_with("imported 2 new, 0 updated"));
}

/// The server on port 0 with the project in `dir`.
async fn server(dir: &Path) -> support::Running {
    let config = project(dir);
    let loaded = app::load(Some(&config)).unwrap();
    let db = format!("sqlite://{}", dir.join("flowgate.db").display());
    support::Running::start(&loaded, &db, Arc::new(SystemClock)).await
}

async fn post_csv(server: &support::Running, query: &str, body: String) -> (u16, Value) {
    let response = server
        .client
        .post(format!("{}/api/contacts/import{query}", server.base))
        .bearer_auth(TOKEN)
        .header("content-type", "text/csv; charset=utf-8")
        .body(body)
        // 100,000 rows on a busy 2-core machine can take longer than the client's 20 s.
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn the_api_imports_a_csv_body_and_answers_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let base = server.base.clone();

    let (status, report) = post_csv(&server, "?channel=first", CSV.to_string()).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["channel"], "first");
    assert_eq!(
        (&report["created"], &report["updated"], &report["unchanged"]),
        (&json!(2), &json!(0), &json!(0))
    );
    let lines: Vec<&Value> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["line"])
        .collect();
    assert_eq!(lines, [&json!(4), &json!(5)], "{report}");

    // The contact is the one the conversation API finds, by its BSUID too (paired).
    let conversation: Value = server
        .client
        .get(format!("{base}/api/conversations/DE.111?channel=first"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let contact = &conversation["contact"];
    assert_eq!(contact["wa_id"], "4915123456789", "{conversation}");
    assert_eq!(contact["name"], "Ada");
    assert_eq!(contact["tags"], json!(["customers", "vip"]));
    assert_eq!(contact["attrs"], json!({"city": "Berlin"}));
    assert_eq!(contact["timezone"], "Europe/Berlin");

    let (_, again) = post_csv(&server, "", CSV.to_string()).await;
    assert_eq!(again["unchanged"], 2, "{again}");

    // Refusals: JSON errors with a code, nothing written.
    let no_token = server
        .client
        .post(format!("{base}/api/contacts/import"))
        .header("content-type", "text/csv")
        .body(CSV)
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), 401);
    let json_body = server
        .client
        .post(format!("{base}/api/contacts/import"))
        .bearer_auth(TOKEN)
        .json(&json!({"csv": CSV}))
        .send()
        .await
        .unwrap();
    assert_eq!(json_body.status(), 415);
    let body: Value = json_body.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unsupported_media_type");
    let (status, body) = post_csv(&server, "", "name\nAda\n".into()).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (422, &json!("invalid_csv"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("neither `wa_id` nor `bsuid`")
    );
    let (status, body) = post_csv(&server, "?channel=nope", CSV.into()).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &json!("unknown_channel"))
    );
    let answer = announce_too_big(&base).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");
    server.shutdown().await;
}

/// Announces a body one byte over the limit and sends none of it: the server answers from
/// the `Content-Length` alone (sending 32 MiB to a server that stopped reading would race
/// its close). The answer as text, read for at most 10 s.
async fn announce_too_big(base: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /api/contacts/import HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: text/csv\r\nContent-Length: {}\r\n\r\n",
        flowgate::http::admin::IMPORT_MAX_BODY + 1
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).contains("}}") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    };
    let answered = tokio::time::timeout(Duration::from_secs(10), read).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(answered.is_ok(), "no whole answer within 10 s: {answer:?}");
    answer
}

#[tokio::test]
async fn a_hundred_thousand_contacts_import_with_each_bad_line_reported() {
    const N: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let mut csv = String::from("wa_id,name,tags,attr.segment,timezone\n");
    let mut bad = Vec::new();
    for i in 0..N {
        let line = i + 2;
        match i % 9_973 {
            17 => {
                csv.push_str(&format!("49170{i:05}x,Bad {i},,,\n"));
                bad.push((line, "is not a phone number"));
            }
            42 => {
                csv.push_str(&format!("49170{i:07},Bad {i},,,Europe/Nowhere\n"));
                bad.push((line, "unknown time zone"));
            }
            _ => csv.push_str(&format!(
                "+49170{i:07},Customer {i},imported;batch{},{},Europe/Berlin\n",
                i % 10,
                i % 7
            )),
        }
    }
    let started = Instant::now();
    let (status, report) = post_csv(&server, "", csv).await;
    println!(
        "imported {N} lines ({} bad) in {:.2?}",
        bad.len(),
        started.elapsed()
    );
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["created"], N - bad.len());
    let skipped: Vec<(usize, String)> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["line"].as_u64().unwrap() as usize,
                s["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(skipped.len(), bad.len(), "{skipped:?}");
    for ((line, reason), (want_line, want)) in skipped.iter().zip(&bad) {
        assert_eq!(line, want_line);
        assert!(reason.contains(want), "line {line}: {reason}");
    }
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM contacts WHERE channel = 'first'")
        .fetch_one(server.db.sqlite_pool().unwrap())
        .await
        .unwrap();
    assert_eq!(count as usize, N - bad.len());
    server.shutdown().await;
}
