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

const TEMPLATES: &str = r#"
templates:
  - name: spring_sale
    language: en_US
    category: marketing
    status: approved
    body: "Hi {{1}}! Our spring sale starts today."
"#;

const FLOW: &str =
    "flow: hello\ntriggers:\n  - keywords: [hi]\nsteps:\n  greet:\n    say: Hello!\n";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.first().map(String::as_str) {
        Some("plan") => plan(&args[1..]),
        // The phases, each in its own process so each one's memory is its own.
        Some("__seed") => runtime.block_on(seed(Path::new(&args[1]), args[2].parse()?)),
        Some("__plan") => runtime.block_on(plan_only(Path::new(&args[1]))),
        _ => {
            eprintln!("usage: campaign_bench plan [--contacts N]");
            std::process::exit(2)
        }
    }
}

/// The number after `--name`, else `default`.
fn flag(args: &[String], name: &str, default: u64) -> anyhow::Result<u64> {
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
