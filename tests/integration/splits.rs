//! A/B splits on the real server: 10,000 simulated customers write to the sandbox door
//! (`POST /sandbox/messages`), a `split` step sends each down a weighted branch, and the
//! shares, the per-branch stages in the store and on `/metrics`, and the same branch for
//! the same customer on a second visit are checked.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use flowgate::app;
use flowgate::clock::SystemClock;
use serde_json::{Value, json};

use crate::support;

const FLOW: &str = r#"
flow: ab
triggers:
  - keywords: [hi]
steps:
  greet:
    split:
      - { name: short, weight: 50, goto: short }
      - { name: long, weight: 30, goto: long }
      - { weight: 20, goto: human }
  short:
    ask: "Short {{split.greet}}: anything to add?"
    save: answer
    next: bye
  bye:
    say: "Thanks"
  long:
    say: "Long {{split.greet}}"
  human:
    say: "A person will answer"
    handoff: support
"#;

const CONTACTS: usize = 10_000;
/// Customers who write a second time.
const AGAIN: usize = 600;

/// The branch a reply names.
fn branch_of(reply: &str) -> &'static str {
    if reply.starts_with("Short short") {
        "short"
    } else if reply.starts_with("Long long") {
        "long"
    } else if reply == "A person will answer" {
        "human"
    } else {
        panic!("no branch in {reply:?}")
    }
}

/// Each customer (`phone(i)` for `i` in `range`) writes `text`; the texts of the replies,
/// by customer, sent 16 at a time.
async fn write_all(
    server: &support::Running,
    range: std::ops::Range<usize>,
    text: &str,
) -> Vec<(usize, Vec<String>)> {
    let next = Arc::new(AtomicUsize::new(range.start));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (next, client, base, end) = (
            next.clone(),
            server.client.clone(),
            server.base.clone(),
            range.end,
        );
        let text = text.to_string();
        tasks.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    return out;
                }
                let answer: Value = client
                    .post(format!("{base}/sandbox/messages"))
                    .json(&json!({ "from": phone(i), "text": text }))
                    .send()
                    .await
                    .unwrap()
                    .error_for_status()
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let texts = answer["replies"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| {
                        r["message"]["body"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string()
                    })
                    .collect();
                out.push((i, texts));
            }
        });
    }
    let mut all = Vec::new();
    while let Some(part) = tasks.join_next().await {
        all.extend(part.unwrap());
    }
    all.sort();
    all
}

fn phone(i: usize) -> String {
    format!("1555{i:07}")
}

#[tokio::test]
async fn a_split_spreads_10000_contacts_by_its_weights_and_keeps_each_on_its_branch() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("flows")).unwrap();
    std::fs::write(dir.path().join("flows/ab.yaml"), FLOW).unwrap();
    std::fs::write(dir.path().join("flowgate.yaml"), "flows: flows\n").unwrap();
    let loaded = app::load(Some(&dir.path().join("flowgate.yaml"))).expect("the project loads");
    let db = format!("sqlite://{}", dir.path().join("flowgate.db").display());
    let server = support::Running::start(&loaded, &db, Arc::new(SystemClock)).await;

    // First visit: every customer is sent down one branch.
    let first = write_all(&server, 0..CONTACTS, "hi").await;
    assert_eq!(first.len(), CONTACTS);
    let mut branch: HashMap<usize, &str> = HashMap::new();
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for (i, replies) in &first {
        assert_eq!(replies.len(), 1, "customer {i}: {replies:?}");
        let b = branch_of(&replies[0]);
        branch.insert(*i, b);
        *counts.entry(b).or_default() += 1;
    }
    for (name, weight) in [("short", 0.5), ("long", 0.3), ("human", 0.2)] {
        let share = counts[name] as f64 / CONTACTS as f64;
        assert!(
            (share - weight).abs() <= 0.02,
            "branch {name}: {share:.4} of contacts, weight {weight} ({counts:?})"
        );
    }

    // Second visit: the same branch for each one who starts the flow again; a customer
    // waiting at `short`'s question answers it (replied, then finished); one handed to a
    // person gets no answer from the bot.
    let again = write_all(&server, 0..AGAIN, "hi").await;
    let mut expected_replied = 0;
    for (i, replies) in &again {
        match branch[i] {
            "long" => assert_eq!(replies, &["Long long"], "customer {i} keeps its branch"),
            "short" => {
                assert_eq!(replies, &["Thanks"], "customer {i} answers the question");
                expected_replied += 1;
            }
            _ => assert!(replies.is_empty(), "customer {i} is with a person"),
        }
    }
    let third = write_all(&server, 0..AGAIN, "hi").await;
    for (i, replies) in &third {
        if branch[i] == "short" {
            assert!(
                replies[0].starts_with("Short short"),
                "customer {i} keeps its branch: {replies:?}"
            );
        }
    }

    // The store counts each contact once per branch, with its stages.
    let report = flowgate::splits::report(&server.db, Some("ab"), Some("greet"))
        .await
        .unwrap();
    let row = |name: &str| {
        report
            .iter()
            .find(|r| r.counts.branch == name)
            .unwrap_or_else(|| panic!("branch {name} in {report:?}"))
    };
    let long_again = (0..AGAIN).filter(|i| branch[i] == "long").count() as i64;
    assert_eq!(report.len(), 3);
    assert_eq!(row("short").counts.reached, counts["short"]);
    assert_eq!(row("short").counts.replied, expected_replied);
    assert_eq!(row("short").counts.finished, expected_replied);
    assert_eq!(row("short").counts.handed_off, 0);
    assert_eq!(row("long").counts.reached, counts["long"]);
    // A `long` session ends at once: finished, and no reply counted in it (the next
    // message starts a new session).
    assert_eq!(row("long").counts.finished, counts["long"]);
    assert_eq!(row("long").counts.replied, 0, "{long_again} came back");
    assert_eq!(row("human").counts.reached, counts["human"]);
    assert_eq!(row("human").counts.handed_off, counts["human"]);
    // Those in handoff wrote again: a reply in the session.
    let human_again = (0..AGAIN).filter(|i| branch[i] == "human").count() as i64;
    assert_eq!(row("human").counts.replied, human_again);
    assert_eq!(row("human").counts.finished, 0);
    assert!(
        (row("human").handoff_rate - 1.0).abs() < f64::EPSILON,
        "{:?}",
        row("human")
    );

    // `/metrics` shows the same numbers.
    let metrics = server
        .client
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (name, stage, n) in [
        ("short", "reached", counts["short"]),
        ("short", "replied", expected_replied),
        ("human", "handed_off", counts["human"]),
        ("long", "finished", counts["long"]),
    ] {
        let line = format!(
            "flowgate_split_contacts{{flow=\"ab\",step=\"greet\",branch=\"{name}\",stage=\"{stage}\"}} {n}"
        );
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }
    server.shutdown().await;
}
