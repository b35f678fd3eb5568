//! Property tests for the policy layer (issue 4): random sequences of customer
//! messages (some arriving late), agent messages (free-form and templates), flow triggers,
//! template status changes and clock jumps (some to the minutes around the window's edge)
//! against a sandbox runtime on a virtual clock, checked after every operation against a
//! model of the window and the message log:
//!
//! - every outgoing message has exactly one recorded decision (with a reason), its status
//!   agrees with it, and the turn that decided it reported it;
//! - a free-form message is never sent while the window is closed;
//! - every message is accounted for (sent, rewritten, queued, skipped or expired: never
//!   gone); queued free-form messages are never overtaken by later free-form messages, leave
//!   in their order when the customer writes, and expire exactly at `queue_ttl`;
//! - a status never goes back: no message is both sent and expired.
//!
//! And, cheaply and many times, the same rules straight on [`Policy::decide`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use proptest::prelude::*;

use flowgate::app::{self, Loaded};
use flowgate::clock::{Clock, VirtualClock};
use flowgate::config::{FallbackTemplate, PolicyConfig};
use flowgate::dispatch::{Runtime, TurnReport};
use flowgate::domain::{
    Contact, Decision, Inbound, InboundContent, MediaSource, OptOut, Origin, Outbound,
    OutboundContent, TemplateFallback, WindowClosed,
};
use flowgate::policy::Policy;
use flowgate::templates::{Category, Registry, Status, Template};

const CHANNEL: &str = "sandbox";
const WA_ID: &str = "15550001111";
/// As in the project's `policy:` below.
const WINDOW_H: i64 = 24;
const MARGIN_M: i64 = 2;
const QUEUE_TTL_D: i64 = 3;

// ---------------------------------------------------------------------------------------
// The project
// ---------------------------------------------------------------------------------------

const CONFIG: &str = "\
flows: flows
scripts: scripts
templates: templates.yaml
channels:
  - name: sandbox
    provider: sandbox
policy:
  window: 24h
  safety_margin: 2m
  queue_ttl: 3d
  opt_out_keywords: [STOP]
  opt_in_keywords: [START]
  opt_out_reply: \"You will get no more offers.\"
";

const TEMPLATES: &str = "\
templates:
  - name: nudge
    language: en_US
    category: utility
    status: approved
    body: \"Hi {{1}}, we have news about your request.\"
  - name: promo
    language: en_US
    category: marketing
    status: approved
    body: \"Our spring sale starts today.\"
  - name: old_promo
    language: en_US
    category: marketing
    status: paused
    body: \"Last year's sale.\"
";

/// `ping` answers free-form at once; `later` answers, then speaks again after 20 h (free-form,
/// queued if the window closed) and after another 30 h (rewritten to `nudge` if closed).
const PING: &str = "\
flow: ping
triggers:
  - keywords: [ping]
steps:
  reply:
    say: \"pong\"
";

const LATER: &str = "\
flow: later
triggers:
  - keywords: [later]
steps:
  ack:
    say: \"Noted, I will check back.\"
    next: check
  check:
    wait: 20h
    say: \"Still there?\"
    next: nudge
  nudge:
    wait: 30h
    say: \"Any news?\"
    outside_window:
      template: nudge
      language: en_US
      params: [\"friend\"]
";

fn write_project(dir: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir.join("flows")).unwrap();
    std::fs::create_dir_all(dir.join("scripts")).unwrap();
    std::fs::write(dir.join("templates.yaml"), TEMPLATES).unwrap();
    std::fs::write(dir.join("flows/ping.yaml"), PING).unwrap();
    std::fs::write(dir.join("flows/later.yaml"), LATER).unwrap();
    let config = dir.join("flowgate.yaml");
    std::fs::write(&config, CONFIG).unwrap();
    config
}

fn load_project() -> (tempfile::TempDir, Loaded) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_project(dir.path());
    let loaded = match app::load(Some(&config)) {
        Ok(l) => l,
        Err(d) => panic!("the test project does not load: {d:?}"),
    };
    (dir, loaded)
}

// ---------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AgentTemplate {
    /// Approved utility, one parameter: always sent.
    Nudge,
    /// Approved marketing, no parameters: sent unless the customer opted out.
    Promo,
    /// Paused: queued.
    OldPromo,
    /// Not in the registry: queued.
    Missing,
    /// `nudge` with the wrong parameter count: queued.
    NudgeNoParams,
}

impl AgentTemplate {
    fn content(self) -> OutboundContent {
        let t = |name: &str, params: &[&str]| OutboundContent::Template {
            name: name.into(),
            language: "en_US".into(),
            params: params.iter().map(|p| p.to_string()).collect(),
        };
        match self {
            Self::Nudge => t("nudge", &["Ana"]),
            Self::Promo => t("promo", &[]),
            Self::OldPromo => t("old_promo", &[]),
            Self::Missing => t("no_such_template", &[]),
            Self::NudgeNoParams => t("nudge", &[]),
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// The customer writes `text`, sent `ago_min` minutes before it arrives.
    Customer {
        text: &'static str,
        ago_min: i64,
    },
    /// An agent's free-form message.
    AgentText {
        n: u8,
    },
    AgentTemplate(AgentTemplate),
    /// The API starts a flow.
    Trigger(&'static str),
    /// The clock moves forward, firing timers and expiries on the way.
    Jump {
        minutes: i64,
    },
    /// The clock moves to `minutes` around the moment the window closes (if that is ahead).
    JumpToWindowEdge {
        minutes: i64,
    },
    /// WhatsApp reports `nudge` approved again or paused (a status webhook).
    NudgeStatus {
        approved: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let text = prop_oneof![
        4 => Just("ping"),
        3 => Just("later"),
        2 => Just("hello"),
        1 => Just("STOP"),
        1 => Just("START"),
    ];
    // Mostly on time; sometimes late, up to 30 h (past the window).
    let ago = prop_oneof![3 => Just(0i64), 2 => 1i64..=30 * 60];
    let template = prop_oneof![
        Just(AgentTemplate::Nudge),
        Just(AgentTemplate::Promo),
        Just(AgentTemplate::OldPromo),
        Just(AgentTemplate::Missing),
        Just(AgentTemplate::NudgeNoParams),
    ];
    let jump = prop_oneof![
        2 => 1i64..=120,                 // minutes
        3 => 60i64..=30 * 60,            // hours, past the window
        1 => 24 * 60i64..=4 * 24 * 60,   // days, past the queue's ttl
    ];
    prop_oneof![
        5 => (text, ago).prop_map(|(text, ago_min)| Op::Customer { text, ago_min }),
        4 => any::<u8>().prop_map(|n| Op::AgentText { n }),
        2 => template.prop_map(Op::AgentTemplate),
        1 => prop_oneof![Just("ping"), Just("later")].prop_map(Op::Trigger),
        4 => jump.prop_map(|minutes| Op::Jump { minutes }),
        1 => (-3i64..=3).prop_map(|minutes| Op::JumpToWindowEdge { minutes }),
        1 => any::<bool>().prop_map(|approved| Op::NudgeStatus { approved }),
    ]
}

// ---------------------------------------------------------------------------------------
// The model and the checks
// ---------------------------------------------------------------------------------------

/// What the test knows independently of the runtime.
#[derive(Debug, Default)]
struct Model {
    /// The latest customer message timestamp so far.
    last_customer: Option<DateTime<Utc>>,
    opted_out: bool,
    /// WhatsApp reported `nudge` paused (and not approved again since).
    nudge_paused: bool,
    /// Ids of the agent's messages, in the order they were created.
    agent_ids: Vec<i64>,
    /// Every outbound message seen, with its last status.
    status: BTreeMap<i64, String>,
    /// When each free-form message that was sent went out.
    free_form_sent_at: BTreeMap<i64, DateTime<Utc>>,
}

impl Model {
    /// The window: open at `t` iff `t < last customer message + window - safety margin`.
    fn window_open(&self, t: DateTime<Utc>) -> bool {
        self.last_customer
            .is_some_and(|last| t < last + Duration::hours(WINDOW_H) - Duration::minutes(MARGIN_M))
    }
}

fn status_for(decision: &str) -> Option<&'static str> {
    Some(match decision {
        // The sandbox channel: storing is sending.
        "send" | "rewritten" => "sent",
        "queued" => "queued",
        "skipped" => "skipped",
        "expired" => "expired",
        _ => return None,
    })
}

fn is_terminal(status: &str) -> bool {
    matches!(status, "sent" | "skipped" | "expired")
}

struct Harness {
    runtime: Runtime,
    clock: Arc<VirtualClock>,
    model: Model,
    registry: Arc<Registry>,
}

impl Harness {
    async fn new(loaded: &Loaded) -> Self {
        let clock = Arc::new(VirtualClock::new(VirtualClock::test_epoch()));
        let runtime = loaded
            .runtime("sqlite::memory:", clock.clone())
            .await
            .expect("runtime");
        let registry = runtime.templates();
        Self {
            runtime,
            clock,
            model: Model::default(),
            registry,
        }
    }

    async fn run(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let now = self.clock.now();
        let reports: Vec<TurnReport> = match op {
            Op::Customer { text, ago_min } => {
                let at = now - Duration::minutes(*ago_min);
                let inbound = Inbound::sandbox(InboundContent::text(*text), at, now);
                let report = self
                    .runtime
                    .inbound(CHANNEL, WA_ID, Some("Ana"), inbound)
                    .await
                    .map_err(|e| TestCaseError::fail(format!("inbound: {e}")))?;
                if self.model.last_customer.is_none_or(|t| at > t) {
                    self.model.last_customer = Some(at);
                }
                match *text {
                    "STOP" => self.model.opted_out = true,
                    "START" => self.model.opted_out = false,
                    _ => {}
                }
                vec![report]
            }
            Op::AgentText { n } => {
                let report = self
                    .runtime
                    .agent_message(
                        CHANNEL,
                        WA_ID,
                        OutboundContent::text(format!("agent note {n}")),
                    )
                    .await
                    .map_err(|e| TestCaseError::fail(format!("agent: {e}")))?;
                prop_assert_eq!(report.sent.len(), 1);
                let decision = report.sent[0].decision.name();
                // No policy-level rewrite for agents: open sends, closed queues.
                let expected = if self.model.window_open(now) {
                    "send"
                } else {
                    "queued"
                };
                prop_assert_eq!(decision, expected, "agent free-form at {}", now);
                self.model.agent_ids.push(report.sent[0].id);
                vec![report]
            }
            Op::AgentTemplate(t) => {
                let report = self
                    .runtime
                    .agent_message(CHANNEL, WA_ID, t.content())
                    .await
                    .map_err(|e| TestCaseError::fail(format!("agent template: {e}")))?;
                prop_assert_eq!(report.sent.len(), 1);
                let expected = match t {
                    AgentTemplate::Nudge if self.model.nudge_paused => "queued",
                    AgentTemplate::Nudge => "send",
                    AgentTemplate::Promo if self.model.opted_out => "skipped",
                    AgentTemplate::Promo => "send",
                    _ => "queued",
                };
                prop_assert_eq!(report.sent[0].decision.name(), expected, "{:?}", t);
                self.model.agent_ids.push(report.sent[0].id);
                vec![report]
            }
            Op::Trigger(flow) => {
                let report = self
                    .runtime
                    .start_flow(CHANNEL, WA_ID, flow, None)
                    .await
                    .map_err(|e| TestCaseError::fail(format!("start_flow: {e}")))?;
                vec![report]
            }
            Op::Jump { .. } | Op::JumpToWindowEdge { .. } => {
                let to = match *op {
                    Op::Jump { minutes } => now + Duration::minutes(minutes),
                    Op::JumpToWindowEdge { minutes } => self
                        .model
                        .last_customer
                        .map(|last| {
                            last + Duration::hours(WINDOW_H) - Duration::minutes(MARGIN_M)
                                + Duration::minutes(minutes)
                        })
                        .filter(|t| *t > now)
                        .unwrap_or(now),
                    _ => unreachable!(),
                };
                let reports = self
                    .runtime
                    .advance_clock(&self.clock, to)
                    .await
                    .map_err(|e| TestCaseError::fail(format!("advance_clock: {e}")))?;
                prop_assert_eq!(self.clock.now(), to);
                reports
            }
            Op::NudgeStatus { approved } => {
                let event = if *approved { "APPROVED" } else { "PAUSED" };
                self.runtime
                    .template_status_changed("nudge", "en_US", event, None)
                    .await
                    .map_err(|e| TestCaseError::fail(format!("template status: {e}")))?;
                self.model.nudge_paused = !approved;
                Vec::new()
            }
        };
        self.check(op, &reports).await
    }

    /// The properties, against the whole message log, after one operation.
    async fn check(&mut self, op: &Op, reports: &[TurnReport]) -> Result<(), TestCaseError> {
        let now = self.clock.now();
        let ttl = Duration::days(QUEUE_TTL_D);
        // A rewrite is checked against the registry as it is now (statuses change).
        self.registry = self.runtime.templates();
        let db = &self.runtime.db;
        let rows = db
            .messages(CHANNEL, WA_ID, 1_000_000)
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let outbound: Vec<_> = rows.iter().filter(|r| r.direction == "out").collect();
        let ids: BTreeSet<i64> = outbound.iter().map(|r| r.id).collect();

        // (c) Nothing vanishes: every message seen before, and every agent message, is here.
        for id in self.model.status.keys().chain(&self.model.agent_ids) {
            prop_assert!(ids.contains(id), "message {} vanished after {:?}", id, op);
        }

        // This operation's reports, ids ascending within a turn (the queue leaves first, in
        // order, then the new messages). One operation may decide a message twice only when
        // time passes in it: queued by a timer, then expired.
        let mut reported: BTreeMap<i64, Vec<&str>> = BTreeMap::new();
        for report in reports {
            let report_ids: Vec<i64> = report.sent.iter().map(|m| m.id).collect();
            prop_assert!(
                report_ids.windows(2).all(|w| w[0] < w[1]),
                "a turn reported messages out of order: {:?}",
                report_ids
            );
            for m in &report.sent {
                reported.entry(m.id).or_default().push(m.decision.name());
            }
        }
        for (id, chain) in &reported {
            prop_assert!(
                chain[..chain.len() - 1].iter().all(|d| *d == "queued")
                    && (chain.len() == 1
                        || matches!(op, Op::Jump { .. } | Op::JumpToWindowEdge { .. })),
                "message {} decided {:?} by one operation",
                id,
                chain
            );
        }

        let mut changed = BTreeSet::new();
        for row in &outbound {
            // (a) Exactly one decision, with a reason, and a status that agrees with it.
            let decision = row.decision.as_deref();
            prop_assert!(decision.is_some(), "message {} has no decision", row.id);
            let decision = decision.unwrap();
            prop_assert!(
                row.reason.as_deref().is_some_and(|r| !r.trim().is_empty()),
                "message {} ({}) has no reason",
                row.id,
                decision
            );
            let expected = status_for(decision);
            prop_assert_eq!(
                Some(row.status.as_str()),
                expected,
                "message {} decided {} is {}",
                row.id,
                decision,
                row.status
            );

            // (d) A final status never changes: nothing is both sent and expired.
            let before = self.model.status.get(&row.id).cloned();
            if let Some(before) = &before {
                prop_assert!(
                    !is_terminal(before) || *before == row.status,
                    "message {} went from {} to {}",
                    row.id,
                    before,
                    row.status
                );
            }
            let is_new_or_moved = before.as_deref() != Some(row.status.as_str());
            if is_new_or_moved {
                changed.insert(row.id);
                // ...and the operation that decided it reported it, with that decision.
                prop_assert_eq!(
                    reported.get(&row.id).and_then(|c| c.last()).copied(),
                    Some(decision),
                    "message {} became {} without a report",
                    row.id,
                    decision
                );
            }

            // A rewrite names a template approved when it was decided, with the right
            // parameter count.
            if decision == "rewritten" && is_new_or_moved {
                prop_assert_eq!(&row.kind, "template");
                let m: Outbound = serde_json::from_value(row.body.clone()).unwrap();
                let OutboundContent::Template {
                    name,
                    language,
                    params,
                } = &m.content
                else {
                    return Err(TestCaseError::fail("a rewritten message is not a template"));
                };
                let t = self.registry.find(name, language);
                prop_assert!(t.is_some_and(
                    |t| t.status == Status::Approved && t.param_count() == params.len()
                ));
                prop_assert!(m.original.as_ref().is_some_and(|o| o.is_free_form()));
            }

            // Queued messages never outlive queue_ttl.
            if row.status == "queued" {
                prop_assert!(
                    now < row.created_at + ttl,
                    "message {} queued at {} is still queued at {}",
                    row.id,
                    row.created_at,
                    now
                );
            }

            if is_new_or_moved && matches!(row.status.as_str(), "sent" | "expired") {
                let detail = db
                    .message(row.id)
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?
                    .expect("the row exists");
                let at = detail.updated_at.unwrap_or(detail.created_at);
                prop_assert!(at <= now && at >= row.created_at);
                if row.status == "expired" {
                    // Expired exactly when its time ran out, not later, not earlier.
                    prop_assert_eq!(at, row.created_at + ttl, "message {} expired", row.id);
                } else if row.kind != "template" {
                    // (b) Free-form only inside the window, at the time it actually left.
                    prop_assert!(
                        self.model.window_open(at),
                        "free-form message {} sent at {} with the window closed \
                         (last customer message {:?})",
                        row.id,
                        at,
                        self.model.last_customer
                    );
                    self.model.free_form_sent_at.insert(row.id, at);
                }
            }
        }
        // Every report names a message whose status this operation set.
        for id in reported.keys() {
            prop_assert!(
                changed.contains(id),
                "message {} was reported but did not change",
                id
            );
        }

        // (c) Queued free-form messages are never overtaken: free-form messages go out in
        // the order they were created.
        let sent: Vec<(&i64, &DateTime<Utc>)> = self.model.free_form_sent_at.iter().collect();
        for w in sent.windows(2) {
            prop_assert!(
                w[0].1 <= w[1].1,
                "free-form message {} went out at {}, after the later message {} at {}",
                w[0].0,
                w[0].1,
                w[1].0,
                w[1].1
            );
        }
        // When the customer just opened the window, no free-form message is left queued.
        if matches!(op, Op::Customer { .. }) && self.model.window_open(now) {
            for row in &outbound {
                prop_assert!(
                    !(row.status == "queued" && row.kind != "template"),
                    "free-form message {} still queued with the window open",
                    row.id
                );
            }
        }

        for row in &outbound {
            self.model.status.insert(row.id, row.status.clone());
        }
        Ok(())
    }
}

/// Runs `ops` on a fresh runtime, checking the properties after each; returns the outgoing
/// messages at the end as `(what, decision, status)`.
fn run_ops(loaded: &Loaded, ops: &[Op]) -> Result<Vec<(String, String, String)>, TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut h = Harness::new(loaded).await;
        for (i, op) in ops.iter().enumerate() {
            // A hang (a timer that never leaves, say) fails the case instead of the build.
            tokio::time::timeout(std::time::Duration::from_secs(20), h.run(op))
                .await
                .map_err(|_| TestCaseError::fail(format!("op {i} {op:?} did not finish")))?
                .map_err(|e| TestCaseError::fail(format!("after op {i} {op:?}: {e}")))?;
        }
        let rows = h
            .runtime
            .db
            .messages(CHANNEL, WA_ID, 1_000)
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        Ok(rows
            .into_iter()
            .filter(|r| r.direction == "out")
            .map(|r| {
                let m: Outbound = serde_json::from_value(r.body).unwrap();
                let what = match (&m.content, m.original.as_ref()) {
                    (OutboundContent::Template { name, .. }, Some(o)) => {
                        format!("{} as {name}", o.body())
                    }
                    (c, _) => c.body().to_string(),
                };
                (what, r.decision.unwrap_or_default(), r.status)
            })
            .collect())
    })
}

#[test]
fn random_conversations_keep_the_policy_invariants() {
    let (_dir, loaded) = load_project();
    let config = ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(ops in prop::collection::vec(op(), 1..=40))| {
        run_ops(&loaded, &ops)?;
    });
}

/// Cases the generator found worth keeping: a timer's message queued the very minute the
/// window closes, then expired at the end of the same clock jump; and a paused fallback
/// template that is approved again before the queue is flushed.
#[test]
fn kept_cases() {
    let (_dir, loaded) = load_project();
    let cases: Vec<Vec<Op>> = vec![
        vec![
            Op::Customer {
                text: "later",
                ago_min: 238,
            },
            Op::Jump { minutes: 5520 },
        ],
        vec![
            Op::Customer {
                text: "later",
                ago_min: 0,
            },
            Op::NudgeStatus { approved: false },
            Op::JumpToWindowEdge { minutes: 0 },
            Op::Jump { minutes: 32 * 60 },
            Op::AgentTemplate(AgentTemplate::Nudge),
            Op::NudgeStatus { approved: true },
            Op::Customer {
                text: "hello",
                ago_min: 25 * 60,
            },
            Op::Customer {
                text: "ping",
                ago_min: 0,
            },
            Op::Jump {
                minutes: 4 * 24 * 60,
            },
        ],
    ];
    let mut logs = Vec::new();
    for ops in cases {
        match run_ops(&loaded, &ops) {
            Ok(log) => logs.push(log),
            Err(e) => panic!("{ops:?}: {e}"),
        }
    }
    let row = |what: &str, decision: &str, status: &str| {
        (what.to_string(), decision.to_string(), status.to_string())
    };
    assert_eq!(
        logs[0],
        [
            row("Noted, I will check back.", "send", "sent"),
            row("Still there?", "expired", "expired"),
            row("Any news? as nudge", "rewritten", "sent"),
        ]
    );
    assert_eq!(
        logs[1],
        [
            row("Noted, I will check back.", "send", "sent"),
            row("Still there?", "send", "sent"),
            row("Any news? as nudge", "rewritten", "sent"),
            row("nudge", "send", "sent"),
            row("pong", "send", "sent"),
        ]
    );
}

// ---------------------------------------------------------------------------------------
// `Policy::decide` alone
// ---------------------------------------------------------------------------------------

const NAMES: [&str; 4] = ["nudge", "note", "promo", "ghost"];

/// A registry of `nudge` (1 parameter), `note` (2) and `promo` (0), with random statuses
/// and categories; `ghost` is never in it.
fn registry() -> impl Strategy<Value = Registry> {
    let status = prop_oneof![
        3 => Just(Status::Approved),
        1 => Just(Status::Pending),
        1 => Just(Status::Rejected),
        1 => Just(Status::Paused),
        1 => Just(Status::Disabled),
    ];
    let category = prop_oneof![
        Just(Category::Utility),
        Just(Category::Marketing),
        Just(Category::Authentication),
    ];
    prop::collection::vec((status, category), 3).prop_map(|specs| {
        let bodies = ["Hi {{1}}", "{{1}}: {{2}}", "Sale!"];
        Registry {
            templates: specs
                .into_iter()
                .zip(NAMES.iter().zip(bodies))
                .map(|((status, category), (name, body))| Template {
                    name: name.to_string(),
                    language: "en_US".into(),
                    category,
                    status,
                    header: None,
                    body: body.into(),
                    footer: None,
                    buttons: vec![],
                })
                .collect(),
            written_at: None,
        }
    })
}

fn fallback() -> impl Strategy<Value = TemplateFallback> {
    (prop::sample::select(&NAMES[..]), 0usize..3).prop_map(|(name, n)| TemplateFallback {
        name: name.into(),
        language: "en_US".into(),
        params: (0..n).map(|i| format!("p{i}")).collect(),
    })
}

fn message() -> impl Strategy<Value = Outbound> {
    let origin = prop_oneof![
        Just(Origin::Step {
            flow: "f".into(),
            step: "s".into()
        }),
        Just(Origin::Script {
            flow: "f".into(),
            step: "s".into()
        }),
        Just(Origin::Agent),
        Just(Origin::System),
    ];
    let free_form = prop_oneof![
        Just(OutboundContent::text("hello")),
        Just(OutboundContent::Media {
            kind: "image".into(),
            source: MediaSource::Link {
                link: "https://example.com/a.png".into(),
            },
            caption: None,
            filename: None,
        }),
    ];
    let template = (prop::sample::select(&NAMES[..]), 0usize..3).prop_map(|(name, n)| {
        OutboundContent::Template {
            name: name.into(),
            language: "en_US".into(),
            params: (0..n).map(|i| format!("v{i}")).collect(),
        }
    });
    prop_oneof![
        3 => (free_form, origin.clone(), prop::option::of(fallback())).prop_map(
            |(content, origin, fallback)| {
                let mut m = Outbound::new(content, origin);
                m.outside_window = fallback;
                m
            }
        ),
        2 => (template, origin).prop_map(|(content, origin)| Outbound::new(content, origin)),
    ]
}

fn at(minutes: i64) -> DateTime<Utc> {
    VirtualClock::test_epoch() + Duration::minutes(minutes)
}

/// A contact at "now" = minute 0: last message, `131047`, referral, consent, back-off.
fn contact() -> impl Strategy<Value = Contact> {
    // Around the window's edge: 24 h - 2 m = 1438 minutes.
    let past = || -3000i64..=0;
    (
        prop::option::of(prop_oneof![past(), -1440i64..=-1436]),
        // A 131047: when, and the customer's last message WhatsApp knew of then.
        prop::option::of((past(), prop::option::of(past()))),
        prop::option::of(past()),
        any::<bool>(),
        prop::option::of(-1500i64..=1500),
    )
        .prop_map(|(last, closed, referral, opted_out, paused)| {
            let mut c = Contact::new(WA_ID);
            c.last_customer_message_at = last.map(at);
            c.policy.window_closed = closed.map(|(when, known)| WindowClosed {
                at: at(when),
                last_message_at: known.map(at),
            });
            c.policy.referral_at = referral.map(at);
            c.policy.marketing_opt_out = opted_out.then(|| OptOut {
                at: at(-10),
                source: "keyword STOP".into(),
            });
            c.policy.marketing_paused_until = paused.map(at);
            c
        })
}

/// Policy-level rewrites: none, or one for agents and/or flow `f`.
fn policy() -> impl Strategy<Value = Policy> {
    prop::collection::vec(
        (
            prop::option::of(Just("f".to_string())),
            prop::option::of(prop::sample::select(vec!["agent", "step", "system"])),
            fallback(),
        ),
        0..=2,
    )
    .prop_map(|rules| {
        let config = PolicyConfig {
            outside_window: rules
                .into_iter()
                .map(|(flow, origin, t)| FallbackTemplate {
                    flow,
                    origin: origin.map(str::to_string),
                    template: t.name,
                    language: t.language,
                    params: t.params.iter().map(|_| "{{text}}".to_string()).collect(),
                })
                .collect(),
            ..PolicyConfig::default()
        };
        Policy::new(&config)
    })
}

/// Whether `name` with `params` may go out to `contact` now: the registry has it
/// approved with that many parameters, and a marketing one needs the contact's consent.
fn sendable(
    templates: &Registry,
    contact: &Contact,
    name: &str,
    language: &str,
    params: usize,
) -> bool {
    let now = at(0);
    templates.find(name, language).is_some_and(|t| {
        t.status == Status::Approved
            && t.param_count() == params
            && (t.category != Category::Marketing
                || (contact.policy.marketing_opt_out.is_none()
                    && contact
                        .policy
                        .marketing_paused_until
                        .is_none_or(|u| u <= now)))
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2048,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn decide_keeps_the_rules(
        policy in policy(),
        message in message(),
        contact in contact(),
        templates in registry(),
    ) {
        let now = at(0);
        let window = policy.window(&contact, now);
        // The window, written out again: open iff the customer wrote, WhatsApp did not
        // close it after that message (a 131047 holds until a newer message than the ones
        // it knew), and now < last + window - safety margin.
        let open = contact.last_customer_message_at.is_some_and(|last| {
            contact
                .policy
                .window_closed
                .as_ref()
                .is_none_or(|c| c.last_message_at < Some(last))
                && now < last + Duration::hours(WINDOW_H) - Duration::minutes(MARGIN_M)
        });
        prop_assert_eq!(window.is_open(), open, "{:?}", window);

        let decision = policy.decide(&message, &contact, &templates, now);
        prop_assert!(!decision.reason().is_empty());
        prop_assert!(
            matches!(
                decision,
                Decision::Send { .. } | Decision::Rewritten { .. } | Decision::Queued { .. }
                    | Decision::Skipped { .. }
            ),
            "decide never expires or fails a message: {:?}",
            decision
        );

        let out = Policy::apply(&decision, &message);
        match message.requested() {
            OutboundContent::Template { name, language, params } => {
                // A template is sent as it is, iff it may be.
                prop_assert!(
                    !matches!(decision, Decision::Rewritten { .. }),
                    "a template is never rewritten: {:?}", decision
                );
                prop_assert_eq!(
                    decision.sends(),
                    sendable(&templates, &contact, name, language, params.len()),
                    "{:?}", decision
                );
                // Marketing to an opted-out customer is never sent; it is skipped (not
                // queued) when only the consent stands in the way.
                let t = templates.find(name, language);
                if t.is_some_and(|t| t.category == Category::Marketing)
                    && contact.policy.marketing_opt_out.is_some()
                {
                    prop_assert!(!decision.sends());
                    if t.is_some_and(|t| t.status == Status::Approved
                        && t.param_count() == params.len())
                    {
                        prop_assert_eq!(decision.name(), "skipped");
                    }
                }
            }
            _ => {
                // Free-form: sent iff the window is open; never skipped.
                prop_assert_eq!(
                    matches!(decision, Decision::Send { .. }),
                    window.is_open(),
                    "{:?} with {:?}", decision, window
                );
                prop_assert!(
                    !matches!(decision, Decision::Skipped { .. }),
                    "free-form is never skipped: {:?}", decision
                );
                if let Decision::Rewritten { template, .. } = &decision {
                    prop_assert!(!window.is_open());
                    prop_assert!(
                        sendable(&templates, &contact, &template.name, &template.language,
                            template.params.len()),
                        "rewritten to a template that may not be sent: {:?}", template
                    );
                    prop_assert!(
                        matches!(&out.content, OutboundContent::Template { name, .. }
                            if *name == template.name),
                        "the stored message is the template: {:?}", out
                    );
                    prop_assert_eq!(out.original.as_ref(), Some(message.requested()));
                }
            }
        }
        // What goes out is free-form only inside the window.
        if decision.sends() && out.content.is_free_form() {
            prop_assert!(window.is_open());
        }
        if !decision.sends() {
            prop_assert_eq!(&out.content, message.requested());
        }
        // Deciding again from the stored message is deciding the first time.
        prop_assert_eq!(policy.decide(&out, &contact, &templates, now), decision);
    }
}
