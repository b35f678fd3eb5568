//! A campaign run killed with SIGKILL, twice, and restarted: the real `flowgate serve` on a
//! SQLite file, a `cloud_api` channel pointed at the fake Graph API (which posts signed
//! `sent` and `delivered` statuses back, as WhatsApp does, retrying while the server is
//! down), 10,000 contacts imported through the API and a marketing campaign started by
//! `run-now`. The server dies while the fake has accepted part of the sends, comes back on
//! the same database, dies again, comes back again; in the end every recipient got exactly
//! one accepted send, the run is `done`, its report counts 10,000 sent and its ledger has
//! nobody pending.
//!
//! Why it holds: the ledger row and the message are one transaction, keyed per recipient
//! (`fg-c{run}-{contact}`), so a restarted dispatcher takes only the recipients still
//! pending; a message whose send went out but whose answer died with the server stays
//! `sending` under its lease until its `sent` status (carrying the key) settles it.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::campaigns::TEMPLATES;
use crate::crash::{Server, counts, read, serve};
use crate::support;
use crate::support::fake_graph::{FakeAuth, FakeGraph, Reply, Script, StatusEcho};

const SECRET: &str = "campaign-crash-secret";
const PHONE: &str = "110000000000002";
const ACCESS: &str = "campaign-crash-token";
const ADMIN: &str = "campaign-crash-admin";
const CAMPAIGN: &str = "crash_sale";

/// The campaign's rate and the channel's throughput (sends per second): high enough that
/// the run is over in seconds, low enough that the kills land in the middle of it.
const RATE: u32 = 1_000;

/// A marketing campaign to every contact of `main` at `RATE`, no quiet hours, scheduled
/// far ahead so only `run-now` starts it.
fn campaign() -> String {
    format!(
        "campaign: {CAMPAIGN}\nchannel: main\ncategory: marketing\n\
         template: {{ name: spring_sale, language: en_US, params: [\"{{{{contact.name}}}}\"] }}\n\
         audience: {{ where: 'true' }}\nat: 2099-01-01T09:00:00\ntimezone: UTC\n\
         rate: {RATE}/s\n"
    )
}

/// The recipient `i`'s number.
fn wa_id(i: usize) -> String {
    format!("4914{i:08}")
}

/// A project in a temporary directory: the campaign, its template, a `cloud_api` channel
/// at `api_base` fast enough for the rate, the admin token, outbox leases of 10 s.
struct Project {
    dir: tempfile::TempDir,
    port: u16,
}

impl Project {
    fn new(api_base: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for sub in ["flows", "campaigns"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        std::fs::write(
            root.join("flows/hello.yaml"),
            "flow: hello\ntriggers:\n  - keywords: [hi]\nsteps:\n  greet:\n    say: Hello!\n",
        )
        .unwrap();
        std::fs::write(root.join("templates.yaml"), TEMPLATES).unwrap();
        std::fs::write(root.join(format!("campaigns/{CAMPAIGN}.yaml")), campaign()).unwrap();
        let port = support::free_port();
        let config = format!(
            "database: sqlite://{db}\nlisten: 127.0.0.1:{port}\nflows: flows\n\
             templates: templates.yaml\ncampaigns: campaigns\n\
             outbox:\n  lease: 10s\nadmin:\n  token: {ADMIN}\n\
             channels:\n  - name: main\n    provider: cloud_api\n    phone_number_id: \"{PHONE}\"\n    \
             access_token: {ACCESS}\n    app_secret: {SECRET}\n    verify_token: crash-verify\n    \
             api_base: {api_base}\n    throughput_mps: {RATE}\n",
            db = root.join("flowgate.db").display()
        );
        std::fs::write(root.join("flowgate.yaml"), config).unwrap();
        Self { dir, port }
    }

    async fn start(&self, run: usize) -> Server {
        let log = self.dir.path().join(format!("server-{run}.log"));
        serve(&self.dir.path().join("flowgate.yaml"), self.port, log).await
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn database(&self) -> String {
        format!("sqlite://{}", self.dir.path().join("flowgate.db").display())
    }
}

/// Imports `n` contacts on `main` through `POST /api/contacts/import`.
async fn import(client: &reqwest::Client, project: &Project, n: usize) {
    let mut csv = String::from("wa_id,name\n");
    for i in 0..n {
        csv.push_str(&format!("{},Customer {i}\n", wa_id(i)));
    }
    let response = client
        .post(project.url("/api/contacts/import?channel=main"))
        .bearer_auth(ADMIN)
        .header("content-type", "text/csv")
        .body(csv)
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let report: Value = response.json().await.unwrap();
    assert_eq!(report["created"].as_u64(), Some(n as u64), "{report}");
}

/// Starts the campaign's run now; its id.
async fn run_now(client: &reqwest::Client, project: &Project, n: usize) -> i64 {
    let response = client
        .post(project.url(&format!("/api/campaigns/{CAMPAIGN}/run-now")))
        .bearer_auth(ADMIN)
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let started: Value = response.json().await.unwrap();
    assert_eq!(status, 201, "{started}");
    assert_eq!(started["recipients"].as_u64(), Some(n as u64), "{started}");
    started["run"].as_i64().expect("a run id")
}

/// The run's report (`{"run": …, "report": …}`), or `None` while the server does not answer.
async fn report(client: &reqwest::Client, project: &Project, run: i64) -> Option<Value> {
    let response = client
        .get(project.url(&format!("/api/campaigns/{CAMPAIGN}/runs/{run}")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .ok()?;
    assert_eq!(response.status(), 200);
    response.json().await.ok()
}

/// Waits (at most `within`) until the fake has accepted sends to `at_least` recipients.
async fn sent_to(fake: &FakeGraph, at_least: usize, within: Duration, server: &Server) {
    let deadline = Instant::now() + within;
    loop {
        let recipients = fake.accepted_recipients();
        if recipients >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sends to {recipients} of {at_least} recipients accepted; server log:\n{}",
            read(&server.log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls the run's report (at most 60 s) until the run is `done` and WhatsApp accepted
/// every one of its `n` messages (the `sent` statuses arrived); the last report.
async fn finished(
    client: &reqwest::Client,
    project: &Project,
    run: i64,
    n: usize,
    server: &Server,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = report(client, project, run).await;
        if let Some(r) = &last {
            let done = r["run"]["status"] == "done";
            if done && r["report"]["sent"].as_u64() == Some(n as u64) {
                return r.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the run did not finish: {last:?}; server log:\n{}",
            read(&server.log)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The ledger's rows still pending and the run's messages (rows, distinct contacts), read
/// from the database once the server is gone.
async fn ledger(project: &Project, run: i64) -> (i64, i64, i64) {
    let db = flowgate::store::Db::connect(&project.database())
        .await
        .unwrap();
    let pool = db.sqlite_pool().expect("tests use SQLite");
    let pending: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM campaign_recipients \
         WHERE run_id = $1 AND decision IN ('planned', 'deferred')",
    )
    .bind(run)
    .fetch_one(pool)
    .await
    .unwrap();
    let (messages, contacts): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COUNT(DISTINCT contact_id) FROM messages \
         WHERE direction = 'out' AND idempotency_key LIKE $1",
    )
    .bind(format!("fg-c{run}-%"))
    .fetch_one(pool)
    .await
    .unwrap();
    (pending, messages, contacts)
}

/// Runs a campaign to `n` recipients, killing the server when `kills` (fractions of `n`)
/// sends have been accepted, and checks that each recipient got exactly one.
async fn killed_mid_run(n: usize, kills: &[f64]) {
    let fake = FakeGraph::start(FakeAuth::cloud_api(PHONE, ACCESS)).await;
    // Answers take a moment, so a kill lands between WhatsApp accepting sends and flowgate
    // recording them: rows only their `sent` status settles.
    fake.script(Script::always(Reply::delayed(
        Duration::from_millis(150),
        Reply::Success,
    )));
    let project = Project::new(&fake.cloud_api_base());
    fake.echo_statuses(StatusEcho {
        webhook: project.url("/webhook/main"),
        app_secret: SECRET.into(),
        phone_number_id: PHONE.into(),
        after: Duration::from_millis(200),
        retry_for: Duration::from_secs(180),
    });
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let started = Instant::now();
    let mut server = project.start(0).await;
    let mut logs = vec![server.log.clone()];
    import(&client, &project, n).await;
    let run = run_now(&client, &project, n).await;
    for (i, at) in kills.iter().enumerate() {
        let at_least = (n as f64 * at) as usize;
        sent_to(&fake, at_least, Duration::from_secs(60), &server).await;
        server.kill();
        let sent = fake.accepted().len();
        let answered = fake.sends().len();
        eprintln!(
            "kill {}: {sent} sends accepted ({} answers lost), {:?}",
            i + 1,
            sent - answered,
            started.elapsed()
        );
        assert!(
            sent < n,
            "kill {}: too late to test anything ({sent} sent)",
            i + 1
        );
        server = project.start(i + 1).await;
        logs.push(server.log.clone());
    }
    // Every recipient reached first (cheap to watch), then the report (a query over the run).
    sent_to(&fake, n, Duration::from_secs(180), &server).await;
    let last = finished(&client, &project, run, n, &server).await;
    eprintln!("{n} recipients sent to in {:?}", started.elapsed());
    // A send re-claimed just as its status arrived would reach the fake a moment later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(server);
    let logs: String = logs.iter().map(|l| read(l)).collect();

    let per_recipient = counts(&fake);
    let twice: Vec<_> = per_recipient.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        twice.is_empty(),
        "{} recipients got more than one send, e.g. {:?}; logs:\n{logs}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );
    let expected: BTreeSet<String> = (0..n).map(wa_id).collect();
    let got: BTreeSet<String> = per_recipient.keys().cloned().collect();
    let missing: Vec<_> = expected.difference(&got).take(5).collect();
    assert!(
        missing.is_empty(),
        "never sent to {missing:?}…; logs:\n{logs}"
    );
    assert_eq!(got, expected, "sends only to the audience");
    let key = format!("fg-c{run}-");
    assert!(
        fake.accepted()
            .iter()
            .all(|a| a.key.as_deref().is_some_and(|k| k.starts_with(&key))
                && a.text.as_deref() == Some("spring_sale")),
        "every send is the campaign's template with the run's key"
    );

    let report = &last["report"];
    assert_eq!(report["planned"].as_u64(), Some(n as u64), "{report}");
    assert_eq!(report["pending"].as_u64(), Some(0), "{report}");
    assert_eq!(report["outbox"].as_u64(), Some(0), "{report}");
    assert_eq!(report["failed"]["total"].as_u64(), Some(0), "{report}");
    assert_eq!(report["skipped"]["total"].as_u64(), Some(0), "{report}");
    let (pending, messages, contacts) = ledger(&project, run).await;
    assert_eq!(pending, 0, "the ledger has nobody pending");
    assert_eq!(
        (messages, contacts),
        (n as i64, n as i64),
        "one message per recipient in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_twice_in_a_10_000_recipient_run_each_gets_exactly_one_message() {
    killed_mid_run(10_000, &[0.3, 0.65]).await;
}
