//! Conversation tests under `cargo test`.
//!
//! - `tests/conversations/*.yaml` run against the shipped example flows (default config);
//! - `tests/fixtures/edge/` is a project of its own with flows for the edge cases;
//! - `tests/fixtures/policy/` is a project of its own with a conversation test for each rule
//!   of the policy layer (window, safety margin, rewrite, queue and flush, TTL, consent, free
//!   entry point), and `tests/fixtures/policy/defaults/` the same flows under the
//!   default-like policy (2-minute margin, no policy-level rewrites);
//! - `tests/fixtures/failing/` holds deliberately wrong tests, which must fail, and say why;
//! - `tests/fixtures/lead_capture_crm.yaml` runs through the real binary against a CRM
//!   served here on loopback, which checks what the `http` step posted;
//! - the binary's `flowgate test` with no arguments must pass from the crate root.
//!
//! Cargo runs integration tests with the crate root as working directory, which is where
//! `app::load(None)` finds the example flows, as `flowgate` does for a newcomer.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use flowgate::app::{self, Loaded};
use flowgate::conversation::{self, TEST_WA_ID};
use serde_json::{Value, json};

/// How long one run of the binary may take before the test gives up on it.
const BINARY_TIMEOUT: Duration = Duration::from_secs(120);

fn crate_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Loads a project (`None`: the default config in the working directory) or fails with its
/// diagnostics.
fn load(config: Option<&Path>) -> Loaded {
    match app::load(config) {
        Ok(loaded) => loaded,
        Err(diags) => panic!("the project does not load:\n{}", diags.render(false)),
    }
}

/// The conversation test files under `dir`; there must be some.
fn files_in(dir: &str) -> Vec<PathBuf> {
    let files = conversation::test_files(&[PathBuf::from(dir)])
        .unwrap_or_else(|e| panic!("cannot list {dir}: {e}"));
    assert!(!files.is_empty(), "no conversation tests in {dir}");
    files
}

/// Runs every test in `dir` against `loaded`: `(passed, failed, output)`.
async fn run_dir(loaded: &Loaded, dir: &str) -> (usize, usize, String) {
    let files = files_in(dir);
    let mut out = String::new();
    let (passed, failed) = conversation::run_all(loaded, &files, &mut out).await;
    assert_eq!(passed + failed, files.len(), "{out}");
    // Shown by the test harness when the test fails (or with --nocapture).
    println!("{out}");
    (passed, failed, out)
}

#[tokio::test]
async fn example_flow_conversations_pass() {
    let cwd = std::env::current_dir().and_then(std::fs::canonicalize);
    assert_eq!(
        cwd.expect("a working directory"),
        std::fs::canonicalize(crate_root()).expect("the crate root"),
        "integration tests run from the crate root, where the example flows are"
    );
    let loaded = load(None);
    let (passed, failed, out) = run_dir(&loaded, "tests/conversations").await;
    assert_eq!(failed, 0, "conversation tests failed:\n{out}");
    assert!(
        out.ends_with(&format!("{passed} passed, 0 failed\n")),
        "{out}"
    );
}

#[tokio::test]
async fn edge_case_conversations_pass() {
    let loaded = load(Some(Path::new("tests/fixtures/edge/flowgate.yaml")));
    assert_eq!(
        loaded.config.fallback.as_deref(),
        Some("help"),
        "the edge project routes unmatched messages to its `help` flow"
    );
    let (passed, failed, out) = run_dir(&loaded, "tests/fixtures/edge/conversations").await;
    assert_eq!(failed, 0, "edge-case conversation tests failed:\n{out}");
    assert!(
        out.ends_with(&format!("{passed} passed, 0 failed\n")),
        "{out}"
    );
}

/// An example project checks with no error and no warning, and its one conversation test
/// passes.
async fn example_checks_clean_and_its_test_passes(config: &str, test: &str) {
    let loaded = load(Some(Path::new(config)));
    let diags = &loaded.project.diagnostics;
    assert_eq!(
        (diags.errors(), diags.warnings()),
        (0, 0),
        "{}",
        diags.render(false)
    );
    let mut out = String::new();
    let (passed, failed) =
        flowgate::conversation::run_all(&loaded, &[PathBuf::from(test)], &mut out).await;
    assert_eq!((passed, failed), (1, 0), "{out}");
}

/// The example booking project (`examples/booking/`: a form, a split, a location, a
/// contact card) checks clean and its conversation test passes.
#[tokio::test]
async fn example_booking_project_checks_clean_and_its_test_passes() {
    example_checks_clean_and_its_test_passes(
        "examples/booking/flowgate.yaml",
        "examples/booking/flows/table_booking.test.yaml",
    )
    .await;
}

/// The example parcel project (`examples/parcel/`: an `ask` for a photo passed to an
/// `http` step) checks clean and its conversation test, which sends a photo, passes.
#[tokio::test]
async fn example_parcel_project_checks_clean_and_its_test_passes() {
    example_checks_clean_and_its_test_passes(
        "examples/parcel/flowgate.yaml",
        "examples/parcel/flows/damaged_parcel.test.yaml",
    )
    .await;
}

/// The load test's reference flow (`examples/loadtest`) answers with the texts
/// `examples/loadtest.rs --scenario reference` checks.
#[tokio::test]
async fn loadtest_reference_conversation_passes() {
    let loaded = load(Some(Path::new("examples/loadtest/flowgate.yaml")));
    let file = PathBuf::from("examples/loadtest/flows/reference.test.yaml");
    let mut out = String::new();
    let (passed, failed) = conversation::run_all(&loaded, &[file], &mut out).await;
    assert_eq!((passed, failed), (1, 0), "{out}");
}

/// The policy project's conversation tests, one file per rule; each must run and pass.
const POLICY_TESTS: usize = 11;
/// The same flows under the default-like policy (`tests/fixtures/policy/defaults/`).
const POLICY_DEFAULTS_TESTS: usize = 3;

#[tokio::test]
async fn policy_conversations_pass() {
    let loaded = load(Some(Path::new("tests/fixtures/policy/flowgate.yaml")));
    let policy = &loaded.config.policy;
    assert_eq!(
        (policy.safety_margin.0, policy.queue_ttl.0),
        (chrono::Duration::zero(), chrono::Duration::days(2)),
        "the policy project runs without a safety margin and with a 2-day queue"
    );
    assert_eq!(policy.outside_window.len(), 3, "its policy-level rules");
    let (passed, failed, out) = run_dir(&loaded, "tests/fixtures/policy/conversations").await;
    assert_eq!(
        (passed, failed),
        (POLICY_TESTS, 0),
        "policy conversation tests:\n{out}"
    );
    assert!(
        out.ends_with(&format!("{POLICY_TESTS} passed, 0 failed\n")),
        "{out}"
    );
}

#[tokio::test]
async fn policy_defaults_conversations_pass() {
    let loaded = load(Some(Path::new(
        "tests/fixtures/policy/defaults/flowgate.yaml",
    )));
    let policy = &loaded.config.policy;
    assert_eq!(policy.safety_margin.0, chrono::Duration::minutes(2));
    assert!(
        policy.outside_window.is_empty(),
        "no policy-level rewrites here"
    );
    let (passed, failed, out) =
        run_dir(&loaded, "tests/fixtures/policy/defaults/conversations").await;
    assert_eq!(
        (passed, failed),
        (POLICY_DEFAULTS_TESTS, 0),
        "policy (defaults) conversation tests:\n{out}"
    );
    assert!(
        out.ends_with(&format!("{POLICY_DEFAULTS_TESTS} passed, 0 failed\n")),
        "{out}"
    );
}

/// Each deliberately wrong test, and what its failure must say.
const FAILING: &[(&str, &[&str])] = &[
    (
        "wrong_text.yaml",
        &[
            "step 2 (tests/fixtures/failing/wrong_text.yaml:5:5)",
            "expected text \"Hello there!\"",
            "actual   text \"Hi Test Customer! 👋 How can we help you today?\"",
            "(the text differs)",
        ],
    ),
    (
        "wrong_buttons.yaml",
        &[
            "expected buttons [orders, book]",
            "actual   text",
            "buttons [orders:\"My order\", book:\"Book a visit\", more:\"More options\"]",
            "(the button ids differ)",
        ],
    ),
    (
        "unasserted_at_end.yaml",
        &[
            "1 outgoing message was not asserted at the end of the test",
            "text \"Hi Test Customer! 👋",
        ],
    ),
    (
        "unasserted_before_next.yaml",
        &[
            "step 2 (",
            "1 outgoing message was not asserted before the next step",
            "text \"What's your order number?\"",
        ],
    ),
    (
        "none_but_sent.yaml",
        &["was not asserted (expected `bot: none`)"],
    ),
    (
        "nothing_sent.yaml",
        &["expected contains \"anything\"", "but the bot sent nothing"],
    ),
    (
        "none_but_queued.yaml",
        &[
            "step 5 (",
            "1 outgoing message was not asserted (expected `bot: none`)",
            "text \"Are you still there?\" [queued] (window closed 1h2m ago; no template fallback)",
        ],
    ),
    (
        "queued_asserted_as_sent.yaml",
        &[
            "expected text \"Are you still there?\"",
            "actual   text \"Are you still there?\" [queued]",
            "(the decision is `queued`, not sent (write `queued: true` to expect it))",
        ],
    ),
    (
        "wrong_reason.yaml",
        &[
            "expected buttons [orders, book, more], reason contains \"window closed\"",
            "[send] (window open, closes in 23h58m)",
            "(the decision's reason does not contain \"window closed\")",
        ],
    ),
];

#[tokio::test]
async fn wrong_conversation_tests_fail_and_say_why() {
    let loaded = load(None);
    let dir = "tests/fixtures/failing";
    let files = files_in(dir);
    assert_eq!(
        files.len(),
        FAILING.len(),
        "every file in {dir} needs its expected failure in FAILING"
    );
    for (name, fragments) in FAILING {
        let path = Path::new(dir).join(name);
        let result = conversation::run_file(&loaded, &path)
            .await
            .unwrap_or_else(|d| panic!("{name} does not parse:\n{}", d.render(false)));
        let Some(why) = result.failure else {
            panic!("{name} passed, but it is wrong on purpose and must fail");
        };
        for fragment in *fragments {
            assert!(
                why.contains(fragment),
                "the failure of {name} does not mention {fragment:?}:\n{why}"
            );
        }
    }
    // The whole directory through `run_all`: every test fails, each with a FAIL line, and
    // the summary line counts them.
    let (passed, failed, out) = run_dir(&loaded, dir).await;
    assert_eq!((passed, failed), (0, FAILING.len()), "{out}");
    assert_eq!(out.matches("\nFAIL ").count() + 1, FAILING.len(), "{out}");
    assert!(out.starts_with("FAIL "), "{out}");
    // The expected and the actual message on lines of their own, aligned.
    assert!(
        out.contains(": expected text \"Hello there!\"\n    actual   text \"Hi Test Customer!"),
        "{out}"
    );
    assert!(
        out.ends_with(&format!("0 passed, {} failed\n", FAILING.len())),
        "{out}"
    );
}

/// Runs the `flowgate` binary from the crate root with `args` and extra environment, and
/// kills it if it takes longer than [`BINARY_TIMEOUT`]. Blocking: call it from a thread.
fn run_flowgate(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_flowgate"));
    command
        .args(args)
        .current_dir(crate_root())
        // The default lead-capture test expects no CRM; only the CRM test names one.
        .env_remove("FLOWGATE_CRM_URL")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("the flowgate binary starts");
    // Drain both pipes on their own threads, so a chatty child never blocks on a full pipe.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + BINARY_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for flowgate") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`flowgate {}` did not finish within {BINARY_TIMEOUT:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn show(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The JSON bodies the fake CRM received.
type Leads = Arc<Mutex<Vec<Value>>>;

/// `POST /leads`: records the body and answers with the new lead's id, as a CRM would.
async fn record_lead(State(leads): State<Leads>, Json(body): Json<Value>) -> Json<Value> {
    leads.lock().expect("leads lock").push(body);
    Json(json!({ "id": "L-1" }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lead_capture_posts_the_lead_to_a_crm() {
    let leads = Leads::default();
    let crm = Router::new()
        .route("/leads", post(record_lead))
        .with_state(leads.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let url = format!(
        "http://{}/leads",
        listener.local_addr().expect("an address")
    );
    let server = tokio::spawn(async move { axum::serve(listener, crm).await });

    let output = tokio::task::spawn_blocking(move || {
        run_flowgate(
            &["test", "tests/fixtures/lead_capture_crm.yaml"],
            &[("FLOWGATE_CRM_URL", url.as_str())],
        )
    })
    .await
    .expect("the binary's runner thread");
    server.abort();

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", show(&output));
    assert!(stdout.contains("1 passed, 0 failed"), "{}", show(&output));
    let leads = leads.lock().expect("leads lock");
    assert_eq!(
        *leads,
        vec![json!({
            "name": "Ana",
            "email": "ana@example.com",
            "need": "A price for 20 chairs",
            "phone": TEST_WA_ID,
        })],
        "the CRM got other bodies than the one lead the test typed"
    );
}

#[tokio::test]
async fn flowgate_test_without_arguments_passes() {
    let output = tokio::task::spawn_blocking(|| run_flowgate(&["test"], &[]))
        .await
        .expect("the binary's runner thread");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", show(&output));
    // tests/conversations plus the `*.test.yaml` files beside the flows.
    let beside_flows = files_in("flows")
        .iter()
        .filter(|f| f.to_string_lossy().ends_with(".test.yaml"))
        .count();
    assert!(beside_flows > 0, "the examples keep a test beside a flow");
    let count = files_in("tests/conversations").len() + beside_flows;
    assert!(
        stdout.ends_with(&format!("{count} passed, 0 failed\n")),
        "{}",
        show(&output)
    );
}
