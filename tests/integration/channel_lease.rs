//! Limits for the number as a whole: two instances (two runtimes, each with its own `Db`
//! handle, on one PostgreSQL schema) and the channel's lease. Only the instance holding it
//! sends for the channel, so the pacing is the number's; another takes over when the holder
//! stops or its session ends; the campaign dispatcher runs a channel's runs only where its
//! lease is held. Each instance talks to a fake Graph API of its own, so every send shows
//! which instance made it. Skipped without `FLOWGATE_TEST_POSTGRES_URL`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use flowgate::app;
use flowgate::campaign_runner::CampaignRunner;
use flowgate::campaign_runner::dispatch::Dispatcher;
use flowgate::clock::{Clock, SharedClock, SystemClock, VirtualClock};
use flowgate::config::ChannelConfig;
use flowgate::contacts_import::csv;
use flowgate::dispatch::Runtime;
use flowgate::domain::{Inbound, InboundContent};
use flowgate::outbox::{ChannelLeases, LeaseOptions, Sender, SenderHandle, SenderOptions};
use flowgate::store::{RecipientDecision, RunStatus};

use super::support::fake_graph::{FakeAuth, FakeGraph, Recorded};
use super::support::{Backend, TestDb};

const PHONE_NUMBER_ID: &str = "110000000000001";
const TOKEN: &str = "lease-token";

/// Leases tried and checked every 50 ms, so takeovers are quick in a test.
const FAST: LeaseOptions = LeaseOptions {
    standby_poll: Duration::from_millis(50),
    check_every: Duration::from_millis(50),
};

/// One instance: its fake Graph API, its runtime on the shared database, its leases.
struct Instance {
    _dir: tempfile::TempDir,
    fake: FakeGraph,
    runtime: Arc<Runtime>,
    channel: ChannelConfig,
}

impl Instance {
    /// An instance of a project with one `cloud_api` channel `wa` at `throughput_mps`,
    /// pointed at a fake of its own, on `url`.
    async fn start(url: &str, throughput_mps: u32) -> Instance {
        let fake = FakeGraph::start(FakeAuth::cloud_api(PHONE_NUMBER_ID, TOKEN)).await;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("flows")).unwrap();
        std::fs::write(
            root.join("flows/text.yaml"),
            "flow: text\ntriggers:\n  - keywords: [text]\nsteps:\n  reply:\n    say: \"Plain text reply.\"\n",
        )
        .unwrap();
        std::fs::write(
            root.join("flowgate.yaml"),
            format!(
                "flows: flows\noutbox:\n  pace_recipients: false\nchannels:\n  - name: wa\n    \
                 provider: cloud_api\n    phone_number_id: \"{PHONE_NUMBER_ID}\"\n    \
                 access_token: {TOKEN}\n    app_secret: s\n    verify_token: v\n    \
                 api_base: {}\n    throughput_mps: {throughput_mps}\n",
                fake.cloud_api_base()
            ),
        )
        .unwrap();
        let loaded = app::load(Some(&root.join("flowgate.yaml"))).expect("the project loads");
        let clock: SharedClock = Arc::new(SystemClock);
        let runtime = Arc::new(loaded.runtime(url, clock).await.unwrap());
        let channel = loaded.config.channels[0].clone();
        Instance {
            _dir: dir,
            fake,
            runtime,
            channel,
        }
    }

    fn leases(&self, options: LeaseOptions) -> Arc<ChannelLeases> {
        ChannelLeases::start(&self.runtime.db, &["wa".to_string()], options)
    }

    /// The channel's sender, sending while `leases` holds the channel.
    fn sender(&self, leases: &ChannelLeases) -> SenderHandle {
        let options = SenderOptions {
            idle_poll: Duration::from_millis(5),
            request_timeout: Duration::from_secs(5),
            mark_read_timeout: Duration::from_secs(2),
            ..SenderOptions::default()
        };
        Sender::new(self.runtime.clone(), &self.channel, options)
            .unwrap()
            .with_lease(leases.watch("wa").expect("the channel is managed"))
            .spawn()
    }

    /// Customers `from..to` write `text`; each gets one reply in the outbox.
    async fn customers(&self, range: std::ops::Range<u32>) {
        for i in range {
            let wa_id = format!("1555200{i:04}");
            let now = self.runtime.clock.now();
            let inbound = Inbound {
                id: format!("wamid.in.{wa_id}"),
                timestamp: now,
                content: InboundContent::text("text"),
                from_ad: false,
            };
            let report = self
                .runtime
                .inbound("wa", &wa_id, Some("Ana"), inbound)
                .await
                .unwrap();
            assert_eq!(report.sent.len(), 1);
        }
    }
}

/// The idempotency keys of `sends`, sorted, each once.
fn keys(sends: &[Recorded]) -> Vec<String> {
    let mut keys: Vec<String> = sends
        .iter()
        .map(|s| {
            s.body["biz_opaque_callback_data"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    keys.sort();
    keys
}

#[tokio::test]
async fn one_instance_sends_for_a_channel_and_another_takes_over_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let Some(database) = TestDb::new(dir.path(), Backend::Postgres).await else {
        return;
    };
    let a = Instance::start(&database.url, 1000).await;
    let b = Instance::start(&database.url, 1000).await;
    let leases_a = a.leases(FAST);
    assert!(leases_a.wait_for("wa", Duration::from_secs(20)).await);
    let leases_b = b.leases(FAST);
    assert!(
        !leases_b.wait_for("wa", Duration::from_millis(500)).await,
        "two instances never hold one channel's lease"
    );
    let holder = a.runtime.db.channel_lease_holder("wa").await.unwrap();
    assert!(holder.is_some(), "the server lists the holder's session");
    let (sender_a, sender_b) = (a.sender(&leases_a), b.sender(&leases_b));

    // Messages committed on either instance leave through the holder only.
    a.customers(0..5).await;
    b.customers(5..10).await;
    let sent = a.fake.wait_for_sends(10, Duration::from_secs(30)).await;
    assert_eq!(keys(&sent).len(), 10);
    assert!(
        b.fake.sends().is_empty(),
        "the instance without the lease sent"
    );

    // The holder stops: the other takes over and sends what comes next.
    sender_a.shutdown().await;
    leases_a.release().await;
    let stopped = Instant::now();
    assert!(leases_b.wait_for("wa", Duration::from_secs(20)).await);
    a.customers(10..20).await;
    let sent_b = b.fake.wait_for_sends(10, Duration::from_secs(30)).await;
    assert!(sent_b.iter().all(|s| s.at >= stopped));
    assert_eq!(
        a.fake.sends().len(),
        10,
        "the stopped instance sent no more"
    );

    // The holder's session ends as a crash or a lost network would end it: it notices and
    // stops; one instance (the first to take the lease again) sends what comes next.
    let leases_a = a.leases(FAST);
    let sender_a = a.sender(&leases_a);
    let pid = a
        .runtime
        .db
        .channel_lease_holder("wa")
        .await
        .unwrap()
        .expect("B holds the lease");
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(a.runtime.db.postgres_pool().unwrap())
        .await
        .unwrap();
    assert!(terminated);
    let mut held_b = leases_b.watch("wa").unwrap();
    tokio::time::timeout(Duration::from_secs(20), held_b.wait_for(|held| !*held))
        .await
        .expect("the instance whose session ended notices within its checks")
        .unwrap();
    super::support::eventually("an instance holds the lease again", || async {
        leases_a.holds("wa") || leases_b.holds("wa")
    })
    .await;
    assert!(!(leases_a.holds("wa") && leases_b.holds("wa")));
    let (before_a, before_b) = (a.fake.sends().len(), b.fake.sends().len());
    b.customers(20..30).await;
    super::support::eventually("the last ten are sent", || async {
        a.fake.sends().len() + b.fake.sends().len() >= 30
    })
    .await;
    let (new_a, new_b) = (
        a.fake.sends().len() - before_a,
        b.fake.sends().len() - before_b,
    );
    assert!(
        (new_a, new_b) == (10, 0) || (new_a, new_b) == (0, 10),
        "one instance sent the batch: {new_a} and {new_b}"
    );
    let mut all = a.fake.sends();
    all.extend(b.fake.sends());
    let mut unique = keys(&all);
    unique.dedup();
    assert_eq!(unique.len(), 30, "each message sent once");

    sender_a.shutdown().await;
    sender_b.shutdown().await;
    leases_a.release().await;
    leases_b.release().await;
    a.runtime.db.close().await;
    b.runtime.db.close().await;
    database.clean_up().await;
}

#[tokio::test]
async fn two_instances_send_at_the_numbers_throughput_together_on_postgres() {
    const RATE: u32 = 20;
    const MESSAGES: u32 = 80;
    let dir = tempfile::tempdir().unwrap();
    let Some(database) = TestDb::new(dir.path(), Backend::Postgres).await else {
        return;
    };
    let a = Instance::start(&database.url, RATE).await;
    let b = Instance::start(&database.url, RATE).await;
    // The backlog first, then both instances' senders at once.
    a.customers(0..MESSAGES / 2).await;
    b.customers(MESSAGES / 2..MESSAGES).await;
    let (leases_a, leases_b) = (a.leases(FAST), b.leases(FAST));
    let (sender_a, sender_b) = (a.sender(&leases_a), b.sender(&leases_b));
    super::support::eventually("every message is sent", || async {
        a.fake.sends().len() + b.fake.sends().len() >= MESSAGES as usize
    })
    .await;
    let mut sends = a.fake.sends();
    sends.extend(b.fake.sends());
    sends.sort_by_key(|s| s.at);
    let mut unique = keys(&sends);
    unique.dedup();
    assert_eq!(unique.len(), MESSAGES as usize, "each message sent once");
    assert!(
        a.fake.sends().is_empty() || b.fake.sends().is_empty(),
        "one instance sent them all"
    );
    // At RATE a second (a burst of a tenth of a second's worth), MESSAGES take at least
    // (MESSAGES - 1 - burst) / RATE seconds; both instances sending would take half that.
    // A loaded machine only slows sends down, so the bounds hold with a margin of a
    // quarter; windows of two seconds hold at most one and a half times the rate's share.
    let burst = (f64::from(RATE) / 10.0).ceil();
    let least = (f64::from(MESSAGES) - 1.0 - burst) / f64::from(RATE);
    let span = sends.last().unwrap().at - sends[0].at;
    assert!(
        span.as_secs_f64() >= least * 0.75,
        "{MESSAGES} sends at {RATE}/s took {span:?}, at least {least:.2} s expected"
    );
    let window = Duration::from_secs(2);
    let most = (2.0 * f64::from(RATE) * 1.5 + burst) as usize;
    for (i, s) in sends.iter().enumerate() {
        let within = sends[i..].iter().filter(|t| t.at - s.at < window).count();
        assert!(
            within <= most,
            "{within} sends within {window:?} of send {i}, at most {most} at {RATE}/s"
        );
    }
    sender_a.shutdown().await;
    sender_b.shutdown().await;
    leases_a.release().await;
    leases_b.release().await;
    a.runtime.db.close().await;
    b.runtime.db.close().await;
    database.clean_up().await;
}

/// The campaign `sale` at `rate: 5/s` on the sandbox channel `main`, to every contact.
fn campaign_project(root: &Path) -> app::Loaded {
    for dir in ["flows", "campaigns"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::write(root.join("templates.yaml"), super::campaigns::TEMPLATES).unwrap();
    std::fs::write(
        root.join("campaigns/sale.yaml"),
        "campaign: sale\ncategory: marketing\n\
         template: { name: spring_sale, language: en_US, params: [\"{{contact.name}}\"] }\n\
         audience: { where: 'true' }\nat: 2026-01-05T10:00:00\ntimezone: UTC\nrate: 5/s\n",
    )
    .unwrap();
    std::fs::write(
        root.join("flowgate.yaml"),
        "flows: flows\ntemplates: templates.yaml\ncampaigns: campaigns\nchannels:\n  \
         - name: main\n    provider: sandbox\n",
    )
    .unwrap();
    app::load(Some(&root.join("flowgate.yaml"))).unwrap_or_else(|d| panic!("{d:?}"))
}

#[tokio::test]
async fn a_channels_campaign_runs_are_dispatched_by_the_lease_holder_alone_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let Some(database) = TestDb::new(dir.path(), Backend::Postgres).await else {
        return;
    };
    let loaded = campaign_project(dir.path());
    let clock = Arc::new(VirtualClock::new(
        Utc.with_ymd_and_hms(2026, 1, 5, 9, 59, 0).unwrap(),
    ));
    let mut instances = Vec::new();
    for _ in 0..2 {
        let runtime = Arc::new(loaded.runtime(&database.url, clock.clone()).await.unwrap());
        let runner = Arc::new(CampaignRunner::new(runtime, &loaded.project.campaigns));
        runner.sync().await.unwrap();
        instances.push(runner);
    }
    let (runner_a, runner_b) = (instances[0].clone(), instances[1].clone());
    let rows: Vec<String> = (0..12).map(|i| format!("49151000{i:05},C{i},")).collect();
    let parsed =
        csv::parse(format!("wa_id,name,timezone\n{}\n", rows.join("\n")).as_bytes()).unwrap();
    let db = &runner_a.runtime().db;
    db.import_contacts("main", &parsed.rows, clock.now())
        .await
        .unwrap();
    let channels = ["main".to_string()];
    let leases_a = ChannelLeases::start(db, &channels, FAST);
    assert!(leases_a.wait_for("main", Duration::from_secs(20)).await);
    let leases_b = ChannelLeases::start(&runner_b.runtime().db, &channels, FAST);
    let dispatcher_a = Dispatcher::new(runner_a.clone()).with_leases(leases_a.clone());
    let dispatcher_b = Dispatcher::new(runner_b.clone()).with_leases(leases_b.clone());

    clock.advance(chrono::Duration::minutes(1));
    runner_a.tick().await.unwrap();
    runner_b.tick().await.unwrap();
    let (mut by_a, mut by_b) = (0, 0);
    // Two virtual seconds on A: at 5/s, at most 5 a second (its bucket holds one second).
    for _ in 0..2 {
        clock.advance(chrono::Duration::seconds(1));
        let b = dispatcher_b.tick().await.unwrap();
        assert_eq!(
            b.sent + b.skipped + b.deferred,
            0,
            "B does not hold the lease"
        );
        let a = dispatcher_a.tick().await.unwrap();
        assert!(a.sent <= 5, "{a:?}");
        by_a += a.sent;
    }
    assert!(
        by_a > 0 && by_a < 12,
        "A dispatched part of the run: {by_a}"
    );
    // A stops: B holds the lease and dispatches the rest at the same rate.
    leases_a.release().await;
    assert!(leases_b.wait_for("main", Duration::from_secs(20)).await);
    for _ in 0..20 {
        clock.advance(chrono::Duration::seconds(1));
        assert_eq!(dispatcher_a.tick().await.unwrap().sent, 0);
        let b = dispatcher_b.tick().await.unwrap();
        assert!(b.sent <= 5, "{b:?}");
        by_b += b.sent;
        if by_a + by_b == 12 {
            break;
        }
    }
    assert_eq!(by_a + by_b, 12, "every recipient once: A {by_a}, B {by_b}");
    let run = db.campaign_runs("sale", 10).await.unwrap().remove(0);
    let counts = db.run_counts(run.id).await.unwrap();
    let sent: i64 = counts
        .iter()
        .filter(|c| c.decision == RecipientDecision::Sent)
        .map(|c| c.count)
        .sum();
    assert_eq!(sent, 12, "{counts:?}");
    dispatcher_b.tick().await.unwrap();
    assert_eq!(
        db.run(run.id).await.unwrap().unwrap().status,
        RunStatus::Done
    );
    leases_b.release().await;
    runner_a.runtime().db.close().await;
    runner_b.runtime().db.close().await;
    database.clean_up().await;
}
