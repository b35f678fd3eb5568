//! The campaign dispatcher on a virtual clock and real SQLite: every recipient decided
//! through the campaign's rules and the one policy, recorded with its reason, sent once, at
//! the campaign's rate; a paused template pauses the run and its approval resumes it; the
//! messaging limit defers; a reply enters `on_reply`; campaign messages wait behind
//! conversational replies in the outbox.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::campaigns::TEMPLATES;
use chrono::{DateTime, Duration, TimeZone, Utc};
use flowgate::app::{self, Loaded};
use flowgate::campaign_runner::CampaignRunner;
use flowgate::campaign_runner::dispatch::{Dispatched, Dispatcher};
use flowgate::clock::{Clock, VirtualClock};
use flowgate::contacts_import::csv;
use flowgate::dispatch::Runtime;
use flowgate::domain::{Contact, Inbound, InboundContent, OutboundContent};
use flowgate::store::{
    CampaignSend, LedgerRow, RecipientDecision, RunStatus, campaign_message_key,
};

/// Monday 2026-01-05 at `h`:`m` UTC.
fn at(h: u32, m: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 5, h, m, 0).unwrap()
}

/// A campaign `sale` at 10:00 UTC on Monday to every contact, with `extra` keys.
fn sale(extra: &str) -> String {
    format!(
        "campaign: sale\ncategory: marketing\n\
         template: {{ name: spring_sale, language: en_US, params: [\"{{{{contact.name}}}}\"] }}\n\
         audience: {{ where: 'true' }}\nat: 2026-01-05T10:00:00\ntimezone: UTC\n{extra}"
    )
}

/// A second approved marketing template, for the split's other variant.
const LONG_TEMPLATE: &str = r#"  - name: spring_sale_long
    language: en_US
    category: marketing
    status: approved
    body: "Hello {{1}}, our spring sale starts today: 20% off everything until Sunday."
"#;

/// A project in `root`: one sandbox channel `main` (with `channel_extra` keys), the
/// `followup` flow for replies, and the campaign.
fn project(root: &Path, campaign: &str, channel_extra: &str) -> Loaded {
    for dir in ["flows", "campaigns"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::write(
        root.join("flows/followup.yaml"),
        "flow: followup\nsteps:\n  thanks:\n    \
         say: \"Thanks for answering {{campaign.name}} (run {{campaign.run}})\"\n",
    )
    .unwrap();
    let templates = format!("{TEMPLATES}{LONG_TEMPLATE}");
    std::fs::write(root.join("templates.yaml"), templates).unwrap();
    std::fs::write(root.join("campaigns/sale.yaml"), campaign).unwrap();
    std::fs::write(
        root.join("flowgate.yaml"),
        format!(
            "flows: flows\ntemplates: templates.yaml\ncampaigns: campaigns\nchannels:\n  \
             - name: main\n    provider: sandbox\n{channel_extra}"
        ),
    )
    .unwrap();
    app::load(Some(&root.join("flowgate.yaml"))).unwrap_or_else(|d| panic!("{d:?}"))
}

/// A project, its runtime on a SQLite file, the runner and the dispatcher, on a virtual
/// clock at Monday 09:00.
struct Fixture {
    _dir: tempfile::TempDir,
    clock: Arc<VirtualClock>,
    runner: Arc<CampaignRunner>,
    dispatcher: Dispatcher,
}

impl Fixture {
    async fn new(campaign: &str, channel_extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let loaded = project(dir.path(), campaign, channel_extra);
        let url = format!("sqlite://{}", dir.path().join("flowgate.db").display());
        let clock = Arc::new(VirtualClock::new(at(9, 0)));
        let runtime = loaded.runtime(&url, clock.clone()).await.unwrap();
        let runner = Arc::new(CampaignRunner::new(
            Arc::new(runtime),
            &loaded.project.campaigns,
        ));
        runner.sync().await.unwrap();
        let dispatcher = Dispatcher::new(runner.clone());
        Self {
            _dir: dir,
            clock,
            runner,
            dispatcher,
        }
    }

    fn runtime(&self) -> &Arc<Runtime> {
        self.runner.runtime()
    }

    /// Imports contacts from CSV lines (`wa_id,name,timezone`).
    async fn contacts(&self, lines: &[&str]) {
        let text = format!("wa_id,name,timezone\n{}\n", lines.join("\n"));
        let parsed = csv::parse(text.as_bytes()).unwrap();
        assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
        let rt = self.runtime();
        rt.db
            .import_contacts("main", &parsed.rows, rt.clock.now())
            .await
            .unwrap();
    }

    /// A customer's message now (it opens their window).
    async fn customer_says(&self, wa_id: &str, text: &str) {
        let now = self.clock.now();
        let inbound = Inbound::sandbox(InboundContent::text(text), now, now);
        self.runtime()
            .inbound("main", wa_id, None, inbound)
            .await
            .unwrap();
    }

    /// An agent sends the contact the campaign's template now.
    async fn agent_template(&self, wa_id: &str, name: &str) {
        let template = OutboundContent::Template {
            name: "spring_sale".into(),
            language: "en_US".into(),
            params: vec![name.into()],
        };
        self.runtime()
            .agent_message("main", wa_id, template)
            .await
            .unwrap();
    }

    /// Changes a contact's policy state, as a webhook would.
    async fn policy(&self, wa_id: &str, change: impl FnOnce(&mut Contact)) {
        self.runtime()
            .update_contact_policy("main", wa_id, change)
            .await
            .unwrap();
    }

    /// Ticks the runner and the dispatcher every half second until `until`.
    async fn run_until(&self, until: DateTime<Utc>) -> Dispatched {
        let mut all = Dispatched::default();
        loop {
            self.runner.tick().await.unwrap();
            let d = self.dispatcher.tick().await.unwrap();
            all.sent += d.sent;
            all.skipped += d.skipped;
            all.deferred += d.deferred;
            all.paused.extend(d.paused);
            all.resumed.extend(d.resumed);
            all.done.extend(d.done);
            if self.clock.now() >= until {
                return all;
            }
            self.clock.advance(Duration::milliseconds(500));
        }
    }

    /// The campaign's one run.
    async fn run(&self) -> flowgate::store::RunRow {
        let runs = self.runtime().db.campaign_runs("sale", 10).await.unwrap();
        assert_eq!(runs.len(), 1, "{runs:?}");
        runs.into_iter().next().unwrap()
    }

    /// Every ledger row of the run, by the contact's wa_id.
    async fn ledger(&self) -> BTreeMap<String, LedgerRow> {
        let db = &self.runtime().db;
        let run = self.run().await;
        let far = Utc.with_ymd_and_hms(2100, 1, 1, 0, 0, 0).unwrap();
        let mut rows = BTreeMap::new();
        for (id, contact) in db.audience_page("main", &[], far, 0, 10_000).await.unwrap() {
            if let Some(row) = db.ledger_row(run.id, id).await.unwrap() {
                rows.insert(contact.wa_id, row);
            }
        }
        rows
    }

    /// The outbound messages of a contact, oldest first.
    async fn sent_to(&self, wa_id: &str) -> Vec<flowgate::store::MessageRow> {
        let all = self
            .runtime()
            .db
            .messages("main", wa_id, 100)
            .await
            .unwrap();
        all.into_iter().filter(|m| m.direction == "out").collect()
    }
}

fn decision(row: &LedgerRow) -> (RecipientDecision, String) {
    (row.decision, row.reason.clone().unwrap_or_default())
}

#[tokio::test]
async fn the_frequency_cap_skips_a_contact_who_already_got_marketing_today() {
    let f = Fixture::new(&sale("frequency_cap: { max: 1, per: 24h }\n"), "").await;
    f.contacts(&["4915100000001,Ana,", "4915100000002,Ben,"])
        .await;
    // Ben got a marketing template an hour before the run (by an agent).
    f.clock.advance_to(at(9, 0));
    f.agent_template("4915100000002", "Ben").await;
    f.run_until(at(10, 1)).await;
    let ledger = f.ledger().await;
    assert_eq!(ledger["4915100000001"].decision, RecipientDecision::Sent);
    let (ben, reason) = decision(&ledger["4915100000002"]);
    assert_eq!(ben, RecipientDecision::Skipped);
    assert!(reason.starts_with("frequency cap: 1 marketing"), "{reason}");
    assert_eq!(
        f.sent_to("4915100000002").await.len(),
        1,
        "only the agent's"
    );
    // `/metrics` counts both (other tests run campaigns named `sale` in this process too).
    let recipients = |decision: &str, reason: &str| {
        flowgate::metrics::counter_value(
            "flowgate_campaign_recipients_total",
            &[
                ("campaign", "sale"),
                ("decision", decision),
                ("reason", reason),
            ],
        )
    };
    assert!(recipients("skipped", "frequency_cap") >= 1);
    assert!(recipients("sent", "none") >= 1);
}

#[tokio::test]
async fn a_131049_back_off_defers_the_recipient_past_it_then_sends() {
    let f = Fixture::new(&sale(""), "").await;
    f.contacts(&["4915100000001,Ana,"]).await;
    let until = at(13, 0);
    f.policy("4915100000001", |c| {
        c.policy.marketing_paused_until = Some(until);
    })
    .await;
    f.run_until(at(10, 1)).await;
    let row = &f.ledger().await["4915100000001"];
    assert_eq!(row.decision, RecipientDecision::Deferred);
    assert_eq!(row.not_before, until);
    assert!(f.sent_to("4915100000001").await.is_empty());
    f.clock.advance_to(until - Duration::seconds(1));
    f.run_until(until + Duration::seconds(1)).await;
    assert_eq!(
        f.ledger().await["4915100000001"].decision,
        RecipientDecision::Sent
    );
    assert_eq!(f.sent_to("4915100000001").await.len(), 1);
}

#[tokio::test]
async fn opted_out_recipients_are_skipped_whether_by_stop_preferences_or_131050() {
    let f = Fixture::new(&sale(""), "").await;
    f.contacts(&[
        "4915100000001,Ana,",
        "4915100000002,Ben,",
        "4915100000003,Cem,",
        "4915100000004,Dora,",
    ])
    .await;
    f.customer_says("4915100000001", "STOP").await;
    for (wa_id, source) in [
        ("4915100000002", "user_preferences"),
        ("4915100000003", "131050"),
    ] {
        let now = f.clock.now();
        f.policy(wa_id, |c| {
            c.policy.marketing_opt_out = Some(flowgate::domain::OptOut {
                at: now,
                source: source.into(),
            });
        })
        .await;
    }
    f.run_until(at(10, 1)).await;
    let ledger = f.ledger().await;
    for (wa_id, source) in [
        ("4915100000001", "keyword STOP"),
        ("4915100000002", "user_preferences"),
        ("4915100000003", "131050"),
    ] {
        let (d, reason) = decision(&ledger[wa_id]);
        assert_eq!(d, RecipientDecision::Skipped, "{wa_id}");
        assert!(
            reason.starts_with(&format!("opted out of marketing ({source}")),
            "{wa_id}: {reason}"
        );
    }
    assert_eq!(ledger["4915100000004"].decision, RecipientDecision::Sent);
    // Ana got the opt-out confirmation at most, never the campaign.
    assert!(
        f.sent_to("4915100000001")
            .await
            .iter()
            .all(|m| m.kind != "template")
    );
}

#[tokio::test]
async fn quiet_hours_across_midnight_defer_to_their_end_in_the_recipients_zone() {
    let f = Fixture::new(
        &sale("quiet_hours: { from: \"21:00\", to: \"08:00\" }\n"),
        "",
    )
    .await;
    // 10:00 UTC is 19:00 in Tokyo (not quiet) and 21:00 in Kiritimati (UTC+14: quiet
    // until 08:00 there, 18:00 UTC), 11:00 in Berlin.
    f.contacts(&[
        "4915100000001,Ana,Pacific/Kiritimati",
        "4915100000002,Ben,Asia/Tokyo",
    ])
    .await;
    f.run_until(at(10, 1)).await;
    let ledger = f.ledger().await;
    let (d, reason) = decision(&ledger["4915100000001"]);
    assert_eq!(d, RecipientDecision::Deferred);
    assert_eq!(reason, "quiet hours in Pacific/Kiritimati");
    assert_eq!(ledger["4915100000001"].not_before, at(18, 0));
    assert_eq!(ledger["4915100000002"].decision, RecipientDecision::Sent);
    f.clock.advance_to(at(17, 59));
    f.run_until(at(18, 1)).await;
    assert_eq!(
        f.ledger().await["4915100000001"].decision,
        RecipientDecision::Sent
    );
}

#[tokio::test]
async fn a_paused_template_pauses_the_run_and_its_approval_resumes_it() {
    let f = Fixture::new(&sale(""), "").await;
    f.contacts(&["4915100000001,Ana,", "4915100000002,Ben,"])
        .await;
    let rt = f.runtime().clone();
    rt.template_status_changed("spring_sale", "en_US", "PAUSED", Some("low quality"))
        .await
        .unwrap();
    let d = f.run_until(at(10, 1)).await;
    let run = f.run().await;
    assert_eq!(run.status, RunStatus::Paused);
    let reason = run.reason.unwrap();
    assert!(
        reason.contains("`spring_sale` (en_US) is paused"),
        "{reason}"
    );
    assert_eq!(d.paused.len(), 1);
    assert!(
        f.ledger()
            .await
            .values()
            .all(|r| r.decision == RecipientDecision::Planned)
    );
    rt.template_status_changed("spring_sale", "en_US", "APPROVED", None)
        .await
        .unwrap();
    let d = f.run_until(at(10, 3)).await;
    assert_eq!(d.resumed, vec![run.id]);
    assert_eq!(d.sent, 2);
    let run = f.run().await;
    assert_eq!(run.status, RunStatus::Done);
}

#[tokio::test]
async fn the_messaging_limit_defers_the_rest_until_budget_frees_up() {
    let f = Fixture::new(
        &sale("frequency_cap: { max: 5, per: 24h }\nttl: 48h\n"),
        "    messaging_limit: 2\n",
    )
    .await;
    f.contacts(&[
        "4915100000001,Ana,",
        "4915100000002,Ben,",
        "4915100000003,Cem,",
    ])
    .await;
    // Ana got a template at 09:30: she is one of the two already.
    f.clock.advance_to(at(9, 30));
    f.agent_template("4915100000001", "Ana").await;
    f.run_until(at(10, 1)).await;
    let ledger = f.ledger().await;
    // Ana takes no new room; Ben takes the second; Cem waits for Ana's 09:30 to age out.
    assert_eq!(ledger["4915100000001"].decision, RecipientDecision::Sent);
    assert_eq!(ledger["4915100000002"].decision, RecipientDecision::Sent);
    let (d, reason) = decision(&ledger["4915100000003"]);
    assert_eq!(d, RecipientDecision::Deferred);
    assert!(
        reason.contains("messaging limit (2 business-initiated"),
        "{reason}"
    );
    let frees = at(10, 0) + Duration::hours(24) - Duration::minutes(0);
    // Ana's last template is now the campaign's (10:00), so room frees at 10:00 tomorrow.
    assert_eq!(ledger["4915100000003"].not_before, frees);
    f.clock.advance_to(frees - Duration::seconds(1));
    f.run_until(frees + Duration::seconds(1)).await;
    assert_eq!(
        f.ledger().await["4915100000003"].decision,
        RecipientDecision::Sent
    );
}

#[tokio::test]
async fn an_open_window_gets_the_in_window_message_and_a_closed_one_the_template() {
    let extra = "in_window:\n  say: \"Hi {{contact.name}}, 20% off today\"\n";
    let f = Fixture::new(&sale(extra), "").await;
    f.contacts(&["4915100000001,Ana,", "4915100000002,Ben,"])
        .await;
    f.customer_says("4915100000001", "what's new?").await;
    f.run_until(at(10, 1)).await;
    let ana = f.sent_to("4915100000001").await;
    let last = ana.last().unwrap();
    assert_eq!(last.kind, "text");
    assert_eq!(last.body["content"]["body"], "Hi Ana, 20% off today");
    assert_eq!(last.body["origin"]["kind"], "campaign");
    let ben = f.sent_to("4915100000002").await;
    assert_eq!(ben.len(), 1);
    assert_eq!(ben[0].kind, "template");
    assert_eq!(ben[0].body["content"]["params"][0], "Ben");
    assert_eq!(ben[0].decision.as_deref(), Some("rewritten"));
}

#[tokio::test]
async fn a_reply_enters_on_reply_with_the_campaign_in_the_variables() {
    let f = Fixture::new(&sale("on_reply: followup\n"), "").await;
    f.contacts(&["4915100000001,Ana,", "4915100000002,Ben,"])
        .await;
    // Ben wrote before the run and is answered by nothing; his later message is still the
    // first after the campaign's.
    f.run_until(at(10, 1)).await;
    let run = f.run().await;
    f.clock.advance(Duration::minutes(5));
    f.customer_says("4915100000001", "tell me more").await;
    let reply = f.sent_to("4915100000001").await;
    let last = reply.last().unwrap();
    assert_eq!(
        last.body["content"]["body"],
        format!("Thanks for answering sale (run {})", run.id)
    );
    // A second message is not a reply to the campaign any more: no second entry.
    f.customer_says("4915100000001", "hello?").await;
    assert_eq!(f.sent_to("4915100000001").await.len(), reply.len());
}

#[tokio::test]
async fn the_idempotency_key_refuses_a_second_message_for_the_same_recipient() {
    let f = Fixture::new(&sale(""), "").await;
    f.contacts(&["4915100000001,Ana,"]).await;
    f.run_until(at(10, 1)).await;
    let ledger = f.ledger().await;
    let row = &ledger["4915100000001"];
    let first = row.message_id.expect("sent with its message");
    let db = &f.runtime().db;
    // A dispatcher that crashed after writing would decide the recipient again: the store
    // gives back the message it has.
    let message = flowgate::domain::Outbound::new(
        OutboundContent::text("again"),
        flowgate::domain::Origin::Agent,
    );
    let decision = flowgate::domain::Decision::Send {
        reason: "test".into(),
    };
    let send = CampaignSend {
        run_id: row.run_id,
        contact_id: row.contact_id,
        variant: None,
        channel: "main",
        message: &message,
        decision: &decision,
        status: "sent",
        policy: &Default::default(),
    };
    let again = db
        .send_campaign_message(&send, f.clock.now())
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.message_id, first);
    assert_eq!(f.sent_to("4915100000001").await.len(), 1);
    let detail = db.message(first).await.unwrap().unwrap();
    assert_eq!(detail.kind, "template");
    assert_eq!(
        campaign_message_key(row.run_id, row.contact_id),
        format!("fg-c{}-{}", row.run_id, row.contact_id)
    );
}

#[tokio::test]
async fn a_run_is_done_when_nothing_is_pending() {
    let f = Fixture::new(&sale(""), "").await;
    f.contacts(&["4915100000001,Ana,", "4915100000002,Ben,"])
        .await;
    let until = at(11, 0);
    f.policy("4915100000002", |c| {
        c.policy.marketing_paused_until = Some(until)
    })
    .await;
    f.run_until(at(10, 1)).await;
    assert_eq!(f.run().await.status, RunStatus::Running, "Ben is deferred");
    f.clock.advance_to(until);
    let d = f.run_until(until + Duration::seconds(1)).await;
    let run = f.run().await;
    assert_eq!(run.status, RunStatus::Done);
    assert_eq!(run.finished_at, Some(until));
    assert_eq!(d.done, vec![run.id]);
}

#[tokio::test]
async fn a_run_past_its_ttl_skips_the_recipients_it_did_not_reach_and_is_done() {
    let f = Fixture::new(
        &sale(
            "ttl: 2s
rate: 1/s
",
        ),
        "",
    )
    .await;
    let lines: Vec<String> = (0..6).map(|i| format!("49151000{i:05},C{i},")).collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    f.contacts(&refs).await;
    f.clock.advance_to(at(10, 0) - Duration::milliseconds(500));
    let d = f.run_until(at(10, 0) + Duration::seconds(3)).await;
    let run = f.run().await;
    assert_eq!(run.status, RunStatus::Done);
    assert_eq!(d.done, vec![run.id]);
    // 10:00:00, 10:00:01: one a second, then the ttl (10:00:02) ends it.
    assert_eq!(d.sent, 2);
    let skipped: Vec<String> = f
        .ledger()
        .await
        .values()
        .filter(|r| r.decision == RecipientDecision::Skipped)
        .map(|r| r.reason.clone().unwrap())
        .collect();
    assert_eq!(skipped.len(), 4, "{skipped:?}");
    assert!(
        skipped
            .iter()
            .all(|r| r.starts_with("the run's ttl (2s) ran out")),
        "{skipped:?}"
    );
}

#[tokio::test]
async fn a_run_dispatches_at_its_rate_per_virtual_second() {
    let f = Fixture::new(&sale("rate: 4/s\n"), "").await;
    let lines: Vec<String> = (0..40).map(|i| format!("49151000{i:05},C{i},")).collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    f.contacts(&refs).await;
    f.clock.advance_to(at(10, 0) - Duration::milliseconds(500));
    f.run_until(at(10, 0) + Duration::seconds(12)).await;
    let db = &f.runtime().db;
    let mut per_second: BTreeMap<i64, u32> = BTreeMap::new();
    for line in &lines {
        let wa_id = line.split(',').next().unwrap();
        for m in db.messages("main", wa_id, 10).await.unwrap() {
            *per_second.entry(m.created_at.timestamp()).or_default() += 1;
        }
    }
    assert_eq!(per_second.values().sum::<u32>(), 40, "{per_second:?}");
    let start = at(10, 0).timestamp();
    // The first second starts with one token; every later second sends its rate.
    for (second, count) in &per_second {
        assert!(*count <= 5, "second {}: {count}", second - start);
        if *second > start && *second < start + 9 {
            assert_eq!(*count, 4, "second {}: {per_second:?}", second - start);
        }
    }
}

#[tokio::test]
async fn a_run_hands_the_outbox_no_more_than_a_second_of_its_rate() {
    // A Cloud API channel whose sender is not running: what is handed over stays pending.
    let channel = "  - name: wa\n    provider: cloud_api\n    phone_number_id: \"1100\"\n    \
        access_token: token\n    app_secret: s\n    verify_token: v\n    \
        api_base: http://127.0.0.1:9\n";
    let f = Fixture::new(&sale("channel: wa\nrate: 3/s\n"), channel).await;
    let lines: Vec<String> = (0..20).map(|i| format!("49151000{i:05},C{i},")).collect();
    let text = format!("wa_id,name,timezone\n{}\n", lines.join("\n"));
    let parsed = csv::parse(text.as_bytes()).unwrap();
    let rt = f.runtime();
    rt.db
        .import_contacts("wa", &parsed.rows, rt.clock.now())
        .await
        .unwrap();
    f.clock.advance_to(at(10, 0));
    let d = f.run_until(at(10, 0) + Duration::seconds(10)).await;
    assert_eq!(
        d.sent, 3,
        "a second of the rate, then nothing while it waits"
    );
    assert_eq!(rt.db.campaign_backlog("wa").await.unwrap(), 3);
    assert_eq!(f.run().await.status, RunStatus::Running);
}

/// `serve` dispatches with no extra command: the real server on a virtual clock, a Cloud
/// API channel on the fake Graph API, every recipient sent once with its run's key.
#[tokio::test]
async fn serve_dispatches_a_run_through_the_outbox_to_the_graph_api_once_each() {
    serve_dispatches(super::support::Backend::Sqlite).await;
}

/// The same on PostgreSQL (skipped without `FLOWGATE_TEST_POSTGRES_URL`).
#[tokio::test]
async fn serve_dispatches_a_run_once_each_on_postgres() {
    serve_dispatches(super::support::Backend::Postgres).await;
}

async fn serve_dispatches(backend: super::support::Backend) {
    use super::support::{self, fake_graph::FakeAuth, fake_graph::FakeGraph};
    let dir = tempfile::tempdir().unwrap();
    let Some(database) = support::TestDb::new(dir.path(), backend).await else {
        return;
    };
    let fake = FakeGraph::start(FakeAuth::cloud_api("110000000000001", "token")).await;
    let channel = format!(
        "    throughput_mps: 50\n  - name: wa\n    provider: cloud_api\n    \
         phone_number_id: \"110000000000001\"\n    access_token: token\n    \
         app_secret: test-secret\n    verify_token: test-verify\n    api_base: {}\n",
        fake.cloud_api_base()
    );
    let loaded = project(dir.path(), &sale("channel: wa\nrate: 5/s\n"), &channel);
    let url = database.url.clone();
    let clock = Arc::new(VirtualClock::new(at(9, 59)));
    let server = support::Running::start(&loaded, &url, clock.clone()).await;
    let lines: Vec<String> = (0..12).map(|i| format!("49151000{i:05},C{i},")).collect();
    let text = format!("wa_id,name,timezone\n{}\n", lines.join("\n"));
    let parsed = csv::parse(text.as_bytes()).unwrap();
    server
        .db
        .import_contacts("wa", &parsed.rows, clock.now())
        .await
        .unwrap();
    clock.advance_to(at(10, 0));
    // The loop ticks every half second of real time; the bucket fills by the virtual one.
    for _ in 0..600 {
        if fake.sends().len() >= 12 {
            break;
        }
        clock.advance(Duration::milliseconds(500));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let sends = fake
        .wait_for_sends(12, std::time::Duration::from_secs(30))
        .await;
    let run = server.db.campaign_runs("sale", 10).await.unwrap().remove(0);
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
    keys.dedup();
    assert_eq!(keys.len(), 12, "one message per recipient: {keys:?}");
    let prefix = format!("fg-c{}-", run.id);
    assert!(keys.iter().all(|k| k.starts_with(&prefix)), "{keys:?}");
    assert!(sends.iter().all(|s| s.text() == Some("spring_sale")));
    support::eventually("the run is done", || async {
        let run = server.db.run(run.id).await.unwrap().unwrap();
        run.status == RunStatus::Done
    })
    .await;
    server.shutdown().await;
    database.clean_up().await;
}

#[tokio::test]
async fn whatsapps_stated_messaging_limit_is_read_and_the_tighter_limit_holds() {
    use crate::support::fake_graph::{FakeAuth, FakeGraph};
    use flowgate::campaign_runner::limits::read_stated_limits;
    const PHONE: &str = "110000000000009";
    let fake = FakeGraph::start(FakeAuth::cloud_api(PHONE, "limit-token")).await;
    let wa = format!(
        "  - name: wa\n    provider: cloud_api\n    phone_number_id: \"{PHONE}\"\n    \
         access_token: limit-token\n    app_secret: s\n    verify_token: v\n    api_base: {}\n    \
         messaging_limit: 5000\n",
        fake.cloud_api_base()
    );
    let f = Fixture::new(&sale(""), &wa).await;
    let rt = f.runtime();
    // WhatsApp does not answer it yet: the configured key holds, the failure is no limit.
    assert_eq!(read_stated_limits(rt).await, 0);
    assert_eq!(rt.messaging_limit("wa"), Some(5000));
    assert_eq!(rt.messaging_limit("main"), None, "a sandbox has none");
    // WhatsApp states 2,000 for the number: tighter than the key, so it holds.
    fake.serve_messaging_limit("TIER_2K");
    assert_eq!(read_stated_limits(rt).await, 1);
    assert_eq!(rt.messaging_limit("wa"), Some(2000));
    let asked = fake.requests().into_iter().last().unwrap();
    assert!(asked.path.ends_with(&format!("/{PHONE}")), "{}", asked.path);
    assert!(
        asked
            .query
            .contains("fields=whatsapp_business_manager_messaging_limit")
    );
    // Raised to unlimited later: the key holds again.
    fake.serve_messaging_limit("TIER_UNLIMITED");
    read_stated_limits(rt).await;
    assert_eq!(rt.messaging_limit("wa"), Some(5000));
}

#[tokio::test]
async fn serve_sends_each_recipient_of_a_split_its_variants_template_and_reports_by_variant() {
    serve_splits(super::support::Backend::Sqlite).await;
}

/// The same on PostgreSQL (skipped without `FLOWGATE_TEST_POSTGRES_URL`).
#[tokio::test]
async fn serve_splits_a_campaign_on_postgres() {
    serve_splits(super::support::Backend::Postgres).await;
}

/// A 50/50 split of 24 recipients through the real server and the fake Graph API: each
/// recipient gets the template of the variant `Campaign::variant_for` gives it, the ledger
/// records that variant, and the API's report counts each variant's recipients, adding up
/// to the run's.
async fn serve_splits(backend: super::support::Backend) {
    use super::support::{self, fake_graph::FakeAuth, fake_graph::FakeGraph};
    const TOKEN: &str = "split-token";
    let dir = tempfile::tempdir().unwrap();
    let Some(database) = support::TestDb::new(dir.path(), backend).await else {
        return;
    };
    let fake = FakeGraph::start(FakeAuth::cloud_api("110000000000001", "token")).await;
    let config = format!(
        "    throughput_mps: 50\n  - name: wa\n    provider: cloud_api\n    \
         phone_number_id: \"110000000000001\"\n    access_token: token\n    \
         app_secret: test-secret\n    verify_token: test-verify\n    api_base: {}\n\
         admin:\n  token: {TOKEN}\n",
        fake.cloud_api_base()
    );
    let campaign = "campaign: sale\ncategory: marketing\nchannel: wa\nrate: 20/s\n\
        split:\n  \
          - { name: short, weight: 50, template: { name: spring_sale, language: en_US, params: [\"{{contact.name}}\"] } }\n  \
          - { name: long, weight: 50, template: { name: spring_sale_long, language: en_US, params: [\"{{contact.name}}\"] } }\n\
        audience: { where: 'true' }\nat: 2026-01-05T10:00:00\ntimezone: UTC\n";
    let loaded = project(dir.path(), campaign, &config);
    let compiled = loaded.project.campaigns[0].clone();
    let clock = Arc::new(VirtualClock::new(at(9, 59)));
    let server = support::Running::start(&loaded, &database.url, clock.clone()).await;
    let wa_ids: Vec<String> = (0..24).map(|i| format!("49152000{i:05}")).collect();
    let lines: Vec<String> = wa_ids.iter().map(|w| format!("{w},N{w},")).collect();
    let text = format!("wa_id,name,timezone\n{}\n", lines.join("\n"));
    let parsed = csv::parse(text.as_bytes()).unwrap();
    server
        .db
        .import_contacts("wa", &parsed.rows, clock.now())
        .await
        .unwrap();
    clock.advance_to(at(10, 0));
    for _ in 0..600 {
        if fake.sends().len() >= wa_ids.len() {
            break;
        }
        clock.advance(Duration::milliseconds(500));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let sends = fake
        .wait_for_sends(wa_ids.len(), std::time::Duration::from_secs(30))
        .await;
    let expected = |wa_id: &str| compiled.variant_for(wa_id);
    let mut per_template: BTreeMap<String, i64> = BTreeMap::new();
    for send in &sends {
        let to = send.to().expect("a recipient");
        let template = send.text().expect("a template").to_string();
        assert_eq!(
            template,
            expected(&to).template.name,
            "{to} got another variant"
        );
        *per_template.entry(template).or_default() += 1;
    }
    assert_eq!(sends.len(), wa_ids.len(), "one message each");
    assert_eq!(
        per_template.len(),
        2,
        "both variants sent: {per_template:?}"
    );
    let run = server.db.campaign_runs("sale", 10).await.unwrap().remove(0);
    support::eventually("the run is done", || async {
        let run = server.db.run(run.id).await.unwrap().unwrap();
        run.status == RunStatus::Done
    })
    .await;
    let far = Utc.with_ymd_and_hms(2100, 1, 1, 0, 0, 0).unwrap();
    for (id, contact) in server
        .db
        .audience_page("wa", &[], far, 0, 100)
        .await
        .unwrap()
    {
        let row = server.db.ledger_row(run.id, id).await.unwrap().unwrap();
        assert_eq!(
            row.variant,
            expected(&contact.wa_id).name,
            "{}",
            contact.wa_id
        );
    }
    // The report, as the API answers it: per variant, adding up to the run's.
    let answer: serde_json::Value = server
        .client
        .get(format!("{}/api/campaigns/sale/report", server.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let report = &answer["report"];
    let variants = report["variants"].as_array().expect("variants");
    let names: Vec<&str> = variants
        .iter()
        .map(|v| v["variant"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["long", "short"]);
    for (variant, template) in [("long", "spring_sale_long"), ("short", "spring_sale")] {
        let v = &variants[usize::from(variant == "short")];
        assert_eq!(v["planned"], per_template[template], "{variant}: {v}");
        assert_eq!(v["sent"], per_template[template], "{variant}: {v}");
        let share = v["share"].as_f64().unwrap();
        let expected = per_template[template] as f64 / wa_ids.len() as f64;
        assert!((share - expected).abs() < 1e-9, "{variant}: {share}");
    }
    for measure in ["planned", "sent", "delivered", "read", "replied", "pending"] {
        let sum: i64 = variants.iter().map(|v| v[measure].as_i64().unwrap()).sum();
        assert_eq!(sum, report[measure].as_i64().unwrap(), "{measure}");
    }
    assert_eq!(report["planned"], wa_ids.len() as i64);
    server.shutdown().await;
    database.clean_up().await;
}
