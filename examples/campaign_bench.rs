//! Campaign benchmark: how long a large audience takes to select and plan, and how much
//! memory that needs.
//!
//! ```sh
//! cargo run --release --example campaign_bench -- plan --contacts 1000000
//! ```
//!
//! `plan` builds a project in a temporary directory (one sandbox channel, the campaign
//! below, a SQLite file), imports `--contacts` contacts from a generated CSV through the
//! real import path (timed, in its own process), then, in a fresh process, claims a run and
//! snapshots its audience into the ledger exactly as `serve` does when a run starts: the
//! contacts with the tag, read in id-order pages, each page's `where` evaluated in the Rhai
//! sandbox on a blocking thread, the selected ids written into the ledger. Printed: the
//! time to select and plan, the recipients planned, and the planning process's peak
//! resident memory (`VmHWM`, read from `/proc/self/status`, so Linux only).
//!
//! The generated contacts: 90 % carry the tag `customers`, half of all live in Berlin
//! (`attr.city`), so the audience is 40 % of the contacts and every tagged contact's
//! `where` is evaluated.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use flowgate::app;
use flowgate::campaign_runner::audience;
use flowgate::clock::{Clock, SystemClock};
use flowgate::store::{RunStatus, RunTrigger};

const CAMPAIGN: &str = r#"
campaign: bench
channel: main
category: marketing
template: { name: spring_sale, language: en_US, params: ["{{contact.name}}"] }
audience:
  tags: [customers]
  where: 'contact.attrs.city == "Berlin"'
at: 2030-01-01T10:00:00
timezone: Europe/Berlin
rate: 50/s
ttl: 24h
"#;

pub(crate) const TEMPLATES: &str = r#"
templates:
  - name: spring_sale
    language: en_US
    category: marketing
    status: approved
    body: "Hi {{1}}! Our spring sale starts today."
"#;

pub(crate) const FLOW: &str =
    "flow: hello\ntriggers:\n  - keywords: [hi]\nsteps:\n  greet:\n    say: Hello!\n";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.first().map(String::as_str) {
        Some("plan") => plan(&args[1..]),
        Some("rate") => runtime.block_on(rate::run(&args[1..])),
        // The phases, each in its own process so each one's memory is its own.
        Some("__seed") => runtime.block_on(seed(Path::new(&args[1]), args[2].parse()?)),
        Some("__plan") => runtime.block_on(plan_only(Path::new(&args[1]))),
        _ => {
            eprintln!(
                "usage: campaign_bench plan [--contacts N]\n       \
                 campaign_bench rate [--rates 50,100] [--seconds S] [--bin PATH]"
            );
            std::process::exit(2)
        }
    }
}

/// The number after `--name`, else `default`.
pub(crate) fn flag(args: &[String], name: &str, default: u64) -> anyhow::Result<u64> {
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(args
            .get(i + 1)
            .ok_or_else(|| anyhow::anyhow!("{name} needs a number"))?
            .parse()?),
        None => Ok(default),
    }
}

fn plan(args: &[String]) -> anyhow::Result<()> {
    let contacts = flag(args, "--contacts", 1_000_000)?;
    let dir = tempfile::tempdir()?;
    write_project(dir.path())?;
    println!(
        "campaign_bench plan: {contacts} contacts in {}",
        dir.path().display()
    );
    run_phase("__seed", dir.path(), Some(contacts))?;
    run_phase("__plan", dir.path(), None)?;
    Ok(())
}

/// Runs this program again for one phase and fails when the phase does.
fn run_phase(phase: &str, dir: &Path, contacts: Option<u64>) -> anyhow::Result<()> {
    let mut command = Command::new(std::env::current_exe()?);
    command.arg(phase).arg(dir);
    if let Some(n) = contacts {
        command.arg(n.to_string());
    }
    let status = command.status()?;
    anyhow::ensure!(status.success(), "phase {phase} failed: {status}");
    Ok(())
}

fn write_project(root: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(root.join("flows"))?;
    std::fs::create_dir_all(root.join("campaigns"))?;
    std::fs::write(root.join("flows/hello.yaml"), FLOW)?;
    std::fs::write(root.join("templates.yaml"), TEMPLATES)?;
    std::fs::write(root.join("campaigns/bench.yaml"), CAMPAIGN)?;
    std::fs::write(
        root.join("flowgate.yaml"),
        "flows: flows\ntemplates: templates.yaml\ncampaigns: campaigns\nchannels:\n  \
         - name: main\n    provider: sandbox\n",
    )?;
    Ok(())
}

fn database_url(root: &Path) -> String {
    format!("sqlite://{}", root.join("flowgate.db").display())
}

fn config_path(root: &Path) -> PathBuf {
    root.join("flowgate.yaml")
}

/// The CSV of `n` contacts (see the module doc for their tags and cities).
fn csv(n: u64) -> String {
    let mut text = String::with_capacity(n as usize * 64);
    text.push_str("wa_id,name,tags,attr.city,timezone\n");
    for i in 0..n {
        let tags = if i % 10 == 0 {
            "prospects"
        } else {
            "customers"
        };
        let city = if i % 2 == 0 { "Berlin" } else { "Hamburg" };
        text.push_str(&format!(
            "{},Customer {i},{tags},{city},Europe/Berlin\n",
            4_915_100_000_000_u64 + i
        ));
    }
    text
}

async fn seed(root: &Path, contacts: u64) -> anyhow::Result<()> {
    let loaded = app::load(Some(&config_path(root))).map_err(|d| anyhow::anyhow!("{d:?}"))?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let runtime = loaded.runtime(&database_url(root), clock.clone()).await?;
    let started = Instant::now();
    let report =
        flowgate::contacts_import::import(&runtime.db, "main", csv(contacts), clock.now()).await?;
    println!(
        "  import: {} contacts created in {:.1} s ({} lines skipped)",
        report.created,
        started.elapsed().as_secs_f64(),
        report.skipped.len()
    );
    anyhow::ensure!(
        report.created as u64 == contacts,
        "not every contact was created"
    );
    runtime.db.close().await;
    Ok(())
}

async fn plan_only(root: &Path) -> anyhow::Result<()> {
    let loaded = app::load(Some(&config_path(root))).map_err(|d| anyhow::anyhow!("{d:?}"))?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let runtime = loaded.runtime(&database_url(root), clock.clone()).await?;
    let campaign = loaded
        .project
        .campaigns
        .iter()
        .find(|c| c.name == "bench")
        .expect("the bench campaign loads")
        .clone();
    let rss_before = peak_rss_kib();
    let started = Instant::now();
    let now = clock.now();
    let claim = runtime
        .db
        .claim_run("bench", now, RunTrigger::Manual, now)
        .await?;
    let planned = audience::snapshot(&runtime, &campaign, claim.run_id, now).await?;
    runtime
        .db
        .set_run_status(claim.run_id, RunStatus::Running, None, clock.now())
        .await?;
    let elapsed = started.elapsed();
    println!(
        "  select + plan: {planned} recipients planned in {:.2} s; peak RSS {} MiB (before \
         planning {} MiB)",
        elapsed.as_secs_f64(),
        peak_rss_kib() / 1024,
        rss_before / 1024
    );
    runtime.db.close().await;
    Ok(())
}

/// This process's peak resident set (`VmHWM`) in KiB; 0 where `/proc` has none.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The `rate` phase: the real `flowgate serve` sends a campaign to a fake Graph API, which
/// records when each send arrives.
mod rate {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::routing::post;

    use super::{FLOW, TEMPLATES, flag};

    const TOKEN: &str = "bench-admin-token";

    /// Arrival times of the sends the fake answered.
    type Arrivals = Arc<Mutex<Vec<Instant>>>;

    /// Stops the server when the phase ends, however it ends.
    struct Server(Child);
    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A send answered with a wamid, its arrival recorded.
    async fn fake_send(
        State(arrivals): State<Arrivals>,
        body: Bytes,
    ) -> axum::Json<serde_json::Value> {
        let at = Instant::now();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let to = json["to"].as_str().unwrap_or_default().to_string();
        let n = {
            let mut arrivals = arrivals.lock().unwrap();
            arrivals.push(at);
            arrivals.len()
        };
        axum::Json(serde_json::json!({
            "messaging_product": "whatsapp",
            "contacts": [{"input": to, "wa_id": to.trim_start_matches('+')}],
            "messages": [{"id": format!("wamid.bench.{n}")}],
        }))
    }

    /// `rate [--rates 50,100] [--seconds S] [--bin PATH]`: one run per rate, each with
    /// `rate × S` contacts.
    pub async fn run(args: &[String]) -> anyhow::Result<()> {
        let seconds = flag(args, "--seconds", 40)?;
        let rates: Vec<u64> = match args.iter().position(|a| a == "--rates") {
            Some(i) => args
                .get(i + 1)
                .ok_or_else(|| anyhow::anyhow!("--rates needs a list like 50,100"))?
                .split(',')
                .map(|r| r.trim().parse())
                .collect::<Result<_, _>>()?,
            None => vec![50, 100],
        };
        let binary = match args.iter().position(|a| a == "--bin") {
            Some(i) => args.get(i + 1).cloned().unwrap_or_default(),
            None => format!("{}/target/release/flowgate", env!("CARGO_MANIFEST_DIR")),
        };
        for rate in rates {
            one_rate(&binary, rate, rate * seconds).await?;
        }
        Ok(())
    }

    async fn one_rate(binary: &str, rate: u64, contacts: u64) -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let arrivals: Arrivals = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let fake_addr = listener.local_addr()?;
        let app = Router::new()
            .route("/{*path}", post(fake_send))
            .with_state(arrivals.clone());
        let fake = tokio::spawn(async move { axum::serve(listener, app).await });
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        write_project(dir.path(), rate, fake_addr, port)?;
        let server = Server(
            Command::new(binary)
                .args(["serve", "--config"])
                .arg(dir.path().join("flowgate.yaml"))
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| {
                    anyhow::anyhow!("cannot start {binary} (run `cargo build --release`): {e}")
                })?,
        );
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        wait_healthy(&client, &base).await?;
        println!("campaign_bench rate: {rate}/s to {contacts} contacts, release binary {binary}");
        import(&client, &base, contacts).await?;
        let response = client
            .post(format!("{base}/api/campaigns/bench/run-now"))
            .bearer_auth(TOKEN)
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "run-now failed: {}",
            response.text().await?
        );
        wait_for_sends(&arrivals, contacts, rate).await;
        drop(server);
        fake.abort();
        let mut arrivals = arrivals.lock().unwrap().clone();
        arrivals.sort();
        report(&arrivals, rate, contacts);
        Ok(())
    }

    fn write_project(root: &Path, rate: u64, fake: SocketAddr, port: u16) -> anyhow::Result<()> {
        std::fs::create_dir_all(root.join("flows"))?;
        std::fs::create_dir_all(root.join("campaigns"))?;
        std::fs::write(root.join("flows/hello.yaml"), FLOW)?;
        std::fs::write(root.join("templates.yaml"), TEMPLATES)?;
        let campaign = super::CAMPAIGN
            .replace("rate: 50/s", &format!("rate: {rate}/s"))
            .replace("  where: 'contact.attrs.city == \"Berlin\"'\n", "");
        std::fs::write(root.join("campaigns/bench.yaml"), campaign)?;
        std::fs::write(
            root.join("flowgate.yaml"),
            format!(
                "database: sqlite://{db}\nlisten: 127.0.0.1:{port}\nflows: flows\n\
                 templates: templates.yaml\ncampaigns: campaigns\nadmin:\n  token: {TOKEN}\n\
                 channels:\n  - name: main\n    provider: cloud_api\n    \
                 phone_number_id: \"110000000000001\"\n    access_token: bench-token\n    \
                 app_secret: bench-secret\n    verify_token: bench-verify\n    \
                 api_base: http://{fake}/v23.0\n    throughput_mps: 1000\n",
                db = root.join("flowgate.db").display()
            ),
        )?;
        Ok(())
    }

    async fn wait_healthy(client: &reqwest::Client, base: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.get(format!("{base}/healthz")).send().await.is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the server did not come up in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// The contacts, all tagged `customers`, through `POST /api/contacts/import`.
    async fn import(client: &reqwest::Client, base: &str, n: u64) -> anyhow::Result<()> {
        let mut csv = String::from("wa_id,name,tags\n");
        for i in 0..n {
            csv.push_str(&format!(
                "{},Customer {i},customers\n",
                4_915_200_000_000_u64 + i
            ));
        }
        let response = client
            .post(format!("{base}/api/contacts/import"))
            .bearer_auth(TOKEN)
            .header("content-type", "text/csv")
            .body(csv)
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "the import failed: {}",
            response.text().await?
        );
        Ok(())
    }

    /// Waits until every contact got its send, or no send came for 30 s.
    async fn wait_for_sends(arrivals: &Arrivals, contacts: u64, rate: u64) {
        let deadline = Instant::now() + Duration::from_secs(contacts / rate.max(1) * 3 + 60);
        let (mut seen, mut last_change) = (0, Instant::now());
        while Instant::now() < deadline && last_change.elapsed() < Duration::from_secs(30) {
            let n = arrivals.lock().unwrap().len();
            if n as u64 >= contacts {
                return;
            }
            if n != seen {
                (seen, last_change) = (n, Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Achieved rate over the whole run and over its middle 80 %, and the error against
    /// the configured rate.
    fn report(arrivals: &[Instant], rate: u64, contacts: u64) {
        let n = arrivals.len();
        println!("  sends: {n} of {contacts}");
        if n < 10 {
            println!("  too few sends to measure a rate");
            return;
        }
        let per_second = |from: usize, to: usize| {
            (to - from) as f64 / (arrivals[to] - arrivals[from]).as_secs_f64()
        };
        let whole = per_second(0, n - 1);
        let middle = per_second(n / 10, n * 9 / 10);
        let error = |r: f64| (r - rate as f64) / rate as f64 * 100.0;
        println!(
            "  first to last: {:.1} s, {whole:.2}/s ({:+.2} % against {rate}/s)",
            (arrivals[n - 1] - arrivals[0]).as_secs_f64(),
            error(whole)
        );
        println!(
            "  middle 80 %:   {middle:.2}/s ({:+.2} % against {rate}/s)",
            error(middle)
        );
    }
}
