//! The campaign runner on a virtual clock and real SQLite: runs start on schedule (each
//! local time once across DST), a run missed while the server was down starts on restart
//! within its ttl or is recorded missed, a run is claimed once however many ticks race, and
//! a started run's audience (tags, `where`) is snapshotted into its ledger without the
//! contacts added after it began.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use flowgate::app::{self, Loaded};
use flowgate::campaign_runner::{CampaignRunner, Tick};
use flowgate::clock::{Clock, VirtualClock};
use flowgate::contacts_import::csv;
use flowgate::store::{RunStatus, RunTrigger};

pub(crate) const TEMPLATES: &str = r#"
templates:
  - name: spring_sale
    language: en_US
    category: marketing
    status: approved
    body: "Hi {{1}}! Our spring sale starts today."
"#;

/// A campaign file sending `spring_sale` with `extra` keys (its schedule, audience, ...).
fn campaign(name: &str, extra: &str) -> String {
    format!(
        "campaign: {name}\ncategory: marketing\n\
         template: {{ name: spring_sale, language: en_US, params: [\"{{{{contact.name}}}}\"] }}\n\
         {extra}"
    )
}

/// A project in `root` with two sandbox channels (`main` first) and these campaigns.
fn project(root: &Path, campaigns: &[(&str, String)]) -> Loaded {
    std::fs::create_dir_all(root.join("flows")).unwrap();
    std::fs::create_dir_all(root.join("campaigns")).unwrap();
    std::fs::write(
        root.join("flows/hello.yaml"),
        "flow: hello\ntriggers:\n  - keywords: [hi]\nsteps:\n  greet:\n    say: Hello!\n",
    )
    .unwrap();
    std::fs::write(root.join("templates.yaml"), TEMPLATES).unwrap();
    for (name, text) in campaigns {
        std::fs::write(root.join("campaigns").join(format!("{name}.yaml")), text).unwrap();
    }
    std::fs::write(
        root.join("flowgate.yaml"),
        "flows: flows\ntemplates: templates.yaml\ncampaigns: campaigns\nchannels:\n  \
         - name: main\n    provider: sandbox\n  - name: other\n    provider: sandbox\n",
    )
    .unwrap();
    app::load(Some(&root.join("flowgate.yaml"))).unwrap_or_else(|d| panic!("{d:?}"))
}

/// A project on a SQLite file in a temporary directory, with a virtual clock.
struct Fixture {
    dir: tempfile::TempDir,
    loaded: Loaded,
    url: String,
    clock: Arc<VirtualClock>,
}

impl Fixture {
    fn new(campaigns: &[(&str, String)], at: DateTime<Utc>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let loaded = project(dir.path(), campaigns);
        let url = format!("sqlite://{}", dir.path().join("flowgate.db").display());
        let clock = Arc::new(VirtualClock::new(at));
        Self {
            dir,
            loaded,
            url,
            clock,
        }
    }

    /// [`Fixture::new`] on a PostgreSQL schema of its own; `None` when PostgreSQL is not
    /// configured (see `support::TestDb`).
    async fn on_postgres(
        campaigns: &[(&str, String)],
        at: DateTime<Utc>,
    ) -> Option<(Self, super::support::TestDb)> {
        let mut fixture = Self::new(campaigns, at);
        let database =
            super::support::TestDb::new(fixture.dir.path(), super::support::Backend::Postgres)
                .await?;
        fixture.url = database.url.clone();
        Some((fixture, database))
    }

    /// A runtime and its campaign runner, synced (as `serve` does at start).
    async fn start(&self) -> CampaignRunner {
        let runtime = self.loaded.runtime(&self.url, self.clock.clone()).await;
        let runner =
            CampaignRunner::new(Arc::new(runtime.unwrap()), &self.loaded.project.campaigns);
        runner.sync().await.unwrap();
        runner
    }

    /// The project loaded again with these campaigns (the others' files stay).
    fn reload(&mut self, campaigns: &[(&str, String)]) {
        self.loaded = project(self.dir.path(), campaigns);
    }
}

/// Stops a runner as a stopped server would: its database closed.
async fn stop(runner: CampaignRunner) {
    runner.runtime().db.close().await;
}

/// A campaign to everyone, every day at 10:00 UTC, with `extra` keys.
fn daily(extra: &str) -> (&'static str, String) {
    let keys = format!("audience: {{ where: 'true' }}\nschedule: \"0 10 * * *\"\n{extra}");
    ("daily", campaign("daily", &keys))
}

/// Monday 2026-01-05 at `h`:`mi` UTC.
fn monday(h: u32, mi: u32) -> DateTime<Utc> {
    utc(2026, 1, 5, h, mi)
}

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
}

/// Ticks every `step` until `until`, collecting what started and what was missed.
async fn tick_until(
    runner: &CampaignRunner,
    clock: &VirtualClock,
    step: Duration,
    until: DateTime<Utc>,
) -> Tick {
    let mut all = Tick::default();
    while clock.now() < until {
        clock.advance(step);
        let tick = runner.tick().await.unwrap();
        all.started.extend(tick.started);
        all.missed.extend(tick.missed);
    }
    all
}

fn started_at(tick: &Tick, campaign: &str) -> Vec<DateTime<Utc>> {
    tick.started
        .iter()
        .filter(|r| r.campaign == campaign)
        .map(|r| r.scheduled_for)
        .collect()
}

#[tokio::test]
async fn a_weekly_campaign_runs_once_a_week_across_the_spring_change() {
    let zone = "audience: { where: 'true' }\ntimezone: Europe/Berlin\n";
    let weekly = |name: &'static str, cron: &str| {
        (
            name,
            campaign(name, &format!("{zone}schedule: \"{cron}\"\n")),
        )
    };
    // 02:30 does not exist on 2026-03-29 in Berlin: it runs at 03:00 CEST, once.
    let f = Fixture::new(
        &[
            weekly("morning", "30 9 * * SUN"),
            weekly("night", "30 2 * * SUN"),
        ],
        utc(2026, 3, 20, 0, 0),
    );
    let runner = f.start().await;
    let tick = tick_until(
        &runner,
        &f.clock,
        Duration::minutes(30),
        utc(2026, 4, 6, 0, 0),
    )
    .await;
    assert_eq!(
        started_at(&tick, "morning"),
        vec![
            utc(2026, 3, 22, 8, 30), // CET, UTC+1
            utc(2026, 3, 29, 7, 30), // CEST, UTC+2: the change day, once
            utc(2026, 4, 5, 7, 30),
        ]
    );
    assert_eq!(
        started_at(&tick, "night"),
        vec![
            utc(2026, 3, 22, 1, 30),
            utc(2026, 3, 29, 1, 0), // the end of the gap: 03:00 CEST
            utc(2026, 4, 5, 0, 30),
        ]
    );
    assert!(tick.missed.is_empty(), "{:?}", tick.missed);
}

#[tokio::test]
async fn a_weekly_campaign_runs_once_on_the_fall_change() {
    let keys = "audience: { where: 'true' }\ntimezone: America/New_York\n\
                schedule: \"30 1 * * SUN\"\n";
    let f = Fixture::new(
        &[("night", campaign("night", keys))],
        utc(2026, 10, 28, 0, 0),
    );
    let runner = f.start().await;
    let tick = tick_until(
        &runner,
        &f.clock,
        Duration::minutes(15),
        utc(2026, 11, 9, 0, 0),
    )
    .await;
    // 01:30 happens twice on 2026-11-01 in New York: the first one (EDT) only.
    assert_eq!(
        started_at(&tick, "night"),
        vec![utc(2026, 11, 1, 5, 30), utc(2026, 11, 8, 6, 30)]
    );
    let runs = runs(&runner, "night").await;
    assert_eq!(runs.len(), 2);
    assert!(runs.iter().all(|r| r.status == RunStatus::Running));
}

async fn runs(runner: &CampaignRunner, name: &str) -> Vec<flowgate::store::RunRow> {
    runner.runtime().db.campaign_runs(name, 100).await.unwrap()
}

async fn next_run_at(runner: &CampaignRunner, name: &str) -> Option<DateTime<Utc>> {
    let stored = runner.runtime().db.campaign(name).await.unwrap();
    stored.and_then(|c| c.next_run_at)
}

#[tokio::test]
async fn a_run_missed_while_down_starts_on_restart_within_its_ttl_else_is_recorded_missed() {
    let f = Fixture::new(&[daily("ttl: 6h\n")], monday(9, 0));
    stop(f.start().await).await;

    // Down from 09:00 to 13:00: the 10:00 run is 3 h old, within its 6 h ttl.
    f.clock.advance_to(monday(13, 0));
    let runner = f.start().await;
    let tick = runner.tick().await.unwrap();
    assert_eq!(started_at(&tick, "daily"), vec![monday(10, 0)]);
    assert!(tick.missed.is_empty());
    stop(runner).await;

    // Down until 17:00 the next day: that day's 10:00 run is past its ttl.
    f.clock.advance_to(utc(2026, 1, 6, 17, 0));
    let runner = f.start().await;
    let tick = runner.tick().await.unwrap();
    assert!(tick.started.is_empty(), "{:?}", tick.started);
    assert_eq!(tick.missed, vec![("daily".into(), utc(2026, 1, 6, 10, 0))]);
    let runs = runs(&runner, "daily").await;
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].status, RunStatus::Missed);
    let reason = runs[0].reason.as_deref().unwrap();
    assert!(reason.contains("ttl"), "{reason}");
    assert_eq!(runs[1].status, RunStatus::Running);
    assert_eq!(
        next_run_at(&runner, "daily").await,
        Some(utc(2026, 1, 7, 10, 0))
    );
    // A later tick at the same time does nothing more.
    assert_eq!(runner.tick().await.unwrap(), Tick::default());
}

#[tokio::test]
async fn ticks_racing_at_the_same_time_start_one_run() {
    let f = Fixture::new(&[daily("")], monday(9, 0));
    ticks_racing(&f).await;
}

/// Two instances' runners on one PostgreSQL database (two pools) claim one run.
#[tokio::test]
async fn ticks_racing_on_postgres_start_one_run() {
    let Some((f, database)) = Fixture::on_postgres(&[daily("")], monday(9, 0)).await else {
        return;
    };
    ticks_racing(&f).await;
    database.clean_up().await;
}

async fn ticks_racing(f: &Fixture) {
    // Two runners on one database, as two loops or two processes would be.
    let (first, second) = (f.start().await, f.start().await);
    f.clock.advance_to(monday(10, 0));
    let (a, b, c, d) = tokio::join!(first.tick(), second.tick(), first.tick(), second.tick());
    let started: usize = [a, b, c, d]
        .into_iter()
        .map(|t| t.unwrap().started.len())
        .sum();
    assert_eq!(started, 1);
    assert_eq!(runs(&first, "daily").await.len(), 1);
    stop(first).await;
    stop(second).await;
}

#[tokio::test]
async fn a_restart_keeps_next_run_at_unless_the_schedule_changed_and_forgets_removed_files() {
    let (name, text) = daily("");
    let weekly = campaign(
        "weekly",
        "audience: { where: 'true' }\nschedule: \"0 10 * * MON\"\n",
    );
    let mut f = Fixture::new(&[(name, text.clone()), ("weekly", weekly)], monday(9, 0));
    let runner = f.start().await;
    assert_eq!(next_run_at(&runner, "daily").await, Some(monday(10, 0)));
    stop(runner).await;

    // Down past 10:00; meanwhile `daily` got a new audience (same schedule) and `weekly`'s
    // file was removed.
    f.clock.advance_to(monday(12, 0));
    std::fs::remove_file(f.dir.path().join("campaigns/weekly.yaml")).unwrap();
    f.reload(&[(
        name,
        text.replace("where: 'true'", "where: 'contact.name != \"\"'"),
    )]);
    let runner = f.start().await;
    assert_eq!(
        next_run_at(&runner, "daily").await,
        Some(monday(10, 0)),
        "a changed audience keeps the due run"
    );
    assert_eq!(runner.runtime().db.campaign("weekly").await.unwrap(), None);
    let tick = runner.tick().await.unwrap();
    assert_eq!(started_at(&tick, "daily"), vec![monday(10, 0)]);
    stop(runner).await;

    f.reload(&[(name, text.replace("0 10 * * *", "0 18 * * *"))]);
    let runner = f.start().await;
    assert_eq!(
        next_run_at(&runner, "daily").await,
        Some(monday(18, 0)),
        "a new schedule counts from now"
    );
}

/// Imports contacts onto `channel` from CSV lines (`wa_id,name,tags,attr.city`).
async fn import(runner: &CampaignRunner, channel: &str, lines: &[&str]) {
    let text = format!("wa_id,name,tags,attr.city\n{}\n", lines.join("\n"));
    let parsed = csv::parse(text.as_bytes()).unwrap();
    assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
    let runtime = runner.runtime();
    runtime
        .db
        .import_contacts(channel, &parsed.rows, runtime.clock.now())
        .await
        .unwrap();
}

/// The names of a run's pending recipients.
async fn ledger_names(runner: &CampaignRunner, run_id: i64) -> BTreeSet<String> {
    let db = &runner.runtime().db;
    let far = utc(2100, 1, 1, 0, 0);
    let pending = db.pending_recipients(run_id, far, 1_000).await.unwrap();
    let mut names = BTreeSet::new();
    for channel in ["main", "other"] {
        for (id, contact) in db.audience_page(channel, &[], far, 0, 1_000).await.unwrap() {
            if pending.iter().any(|r| r.contact_id == id) {
                names.insert(contact.name.unwrap_or_default());
            }
        }
    }
    names
}

/// The audience the snapshot tests use: Berlin VIP customers, daily at 10:00 UTC.
fn sale() -> (&'static str, String) {
    let keys = "audience:\n  tags: [customers, vip]\n  where: 'contact.attrs.city == \"Berlin\"'\n\
                schedule: \"0 10 * * *\"\n";
    ("sale", campaign("sale", keys))
}

/// The one run a tick started.
fn only_run(tick: &Tick) -> i64 {
    let [run] = tick.started.as_slice() else {
        panic!("{tick:?}")
    };
    run.run_id
}

#[tokio::test]
async fn a_started_run_snapshots_the_contacts_with_its_tags_for_whom_where_is_true() {
    let f = Fixture::new(&[sale()], monday(9, 0));
    let runner = f.start().await;
    import(
        &runner,
        "main",
        &[
            "+4915100000001,Ana,customers;vip,Berlin",
            "+4915100000002,Ben,customers;vip,Munich",
            "+4915100000003,Cem,customers,Berlin",
            "+4915100000004,Dora,vip;customers;press,Berlin",
            "+4915100000005,Emil,customers;vip,",
        ],
    )
    .await;
    import(
        &runner,
        "other",
        &["+4915100000006,Fay,customers;vip,Berlin"],
    )
    .await;
    f.clock.advance_to(monday(10, 0));
    let tick = runner.tick().await.unwrap();
    let run_id = only_run(&tick);
    assert_eq!(tick.started[0].recipients, 2);
    assert_eq!(
        ledger_names(&runner, run_id).await,
        BTreeSet::from(["Ana".to_string(), "Dora".to_string()])
    );

    // Added mid-run: not in the running run, even when its snapshot is taken again.
    f.clock.advance(Duration::minutes(1));
    import(
        &runner,
        "main",
        &["+4915100000007,Gus,customers;vip,Berlin"],
    )
    .await;
    assert!(runner.sync().await.unwrap().is_empty());
    assert_eq!(ledger_names(&runner, run_id).await.len(), 2);
}

#[tokio::test]
async fn a_snapshot_interrupted_by_a_stop_is_finished_at_start_with_the_same_contacts() {
    let f = Fixture::new(&[sale()], monday(9, 0));
    let runner = f.start().await;
    import(
        &runner,
        "main",
        &["+4915100000001,Ana,customers;vip,Berlin"],
    )
    .await;
    // A run claimed (planned) by a process that stopped before its snapshot.
    let db = &runner.runtime().db;
    let claim = db
        .claim_run("sale", monday(9, 0), RunTrigger::Manual, f.clock.now())
        .await
        .unwrap();
    f.clock.advance(Duration::minutes(5));
    import(
        &runner,
        "main",
        &["+4915100000002,Ben,customers;vip,Berlin"],
    )
    .await;
    stop(runner).await;

    let runner = f.start().await;
    let run = runner
        .runtime()
        .db
        .run(claim.run_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.status, RunStatus::Running);
    assert_eq!(
        ledger_names(&runner, claim.run_id).await,
        BTreeSet::from(["Ana".to_string()])
    );
}

#[tokio::test]
async fn a_where_that_fails_for_a_contact_leaves_only_that_contact_out() {
    let keys = "audience:\n  where: 'contact.attrs.city.len() > 3'\nschedule: \"0 10 * * *\"\n";
    let f = Fixture::new(&[("sale", campaign("sale", keys))], monday(9, 0));
    let runner = f.start().await;
    // Ben has no city: `().len()` is an error, for him only.
    let lines = ["+4915100000001,Ana,,Berlin", "+4915100000002,Ben,,"];
    import(&runner, "main", &lines).await;
    f.clock.advance_to(monday(10, 0));
    let run_id = only_run(&runner.tick().await.unwrap());
    assert_eq!(
        ledger_names(&runner, run_id).await,
        BTreeSet::from(["Ana".to_string()])
    );
}
