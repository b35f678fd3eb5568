//! One inbound message through the pure engine, in memory: trigger matching over 20 flows,
//! the step(s) it runs (`{{ }}` interpolation, Rhai `if:` conditions, a Rhai script) and the
//! session update. No database, no HTTP, no clock reads.
//!
//! Run with `cargo bench --bench engine`. Target: under 10 µs per engine step.
//!
//! Every benchmark builds its inputs (session, contact, event) outside the timed loop and hands
//! the routine fresh clones through `iter_batched`: the clones are made in the setup closure
//! (not timed), the `Outcome` is dropped after the batch (not timed). What is timed is exactly
//! one `Engine::handle` call.

use std::hint::black_box;
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use flowgate::config::PolicyConfig;
use flowgate::domain::{Contact, Inbound, InboundContent, OutboundContent};
use flowgate::engine::{Effect, Engine, Event, Handled, Session, Waiting};
use flowgate::flow::FlowSet;
use flowgate::flow::lint::Window;
use flowgate::flow::load::load_sources;
use flowgate::script::Scripting;
use flowgate::templates::Registry;

/// Greets, routes on an `if:` and waits for a button: benchmarks `new_conversation` and
/// `button_branch`.
const WELCOME: &str = r#"
flow: welcome
description: The front door
triggers:
  - keywords: [hello, hi, hey, good morning]
start: route
steps:
  route:
    next:
      - if: '"vip" in contact.tags'
        goto: vip_welcome
      - goto: welcome
  vip_welcome:
    say: "Welcome back, {{ contact.name }}! ⭐ Your VIP line is open."
    next: ask_order
  welcome:
    say: "Hi {{ contact.name }}! 👋 You wrote \"{{ message.text }}\". How can we help?"
    buttons:
      - { id: orders, title: "My order" }
      - { id: buy, title: "Buy something" }
      - { id: human, title: "Talk to us" }
    next:
      - button: orders
        goto: ask_order
      - button: buy
        flow: shop
      - button: human
        goto: human
  ask_order:
    ask: "Sure, {{ contact.name }}. What's your order number?"
    save: order_id
    expect: { regex: '^#?\d{6}$' }
    flow: order_status
  human:
    say: "Connecting you to a person."
    handoff: support
"#;

/// An `ask` with `expect: number`, routed by `if:` on the answer: `answer_ask`.
const SHOP: &str = r#"
flow: shop
description: Buy coffee
triggers:
  - keywords: [buy, shop, coffee]
start: pick
steps:
  pick:
    set: { product: "coffee beans", price: 12 }
    ask: "How many bags of {{product}} would you like? ({{price}} € each)"
    save: qty
    expect: number
    retry: "Please write a number, like 2."
    next:
      - if: 'qty > 10'
        goto: bulk
      - if: 'qty < 1'
        goto: pick
      - goto: confirm
  bulk:
    say: "For {{qty}} bags please talk to our wholesale team."
    handoff: sales
  confirm:
    say: "{{qty}} × {{product}} = {{ qty * price }} €. Shall I place the order, {{ contact.name }}?"
    buttons:
      - { id: place, title: "Place order" }
      - { id: cancel, title: "Cancel" }
    next:
      - button: place
        goto: placed
      - button: cancel
        goto: cancelled
  placed:
    say: "Done! {{qty}} bags are on their way."
  cancelled:
    say: "No problem, nothing was ordered."
"#;

/// The order lookup of the example project (a Rhai map lookup): `script_step`.
const ORDER_STATUS: &str = r#"
flow: order_status
description: Customers look up an order
triggers:
  - keywords: [order, status, "where is my order"]
  - regex: '^#?(?P<order_id>\d{6})$'
start: check_known
session_timeout: 24h
steps:
  check_known:
    next:
      - if: 'order_id != ()'
        goto: lookup
      - goto: ask_order
  ask_order:
    ask: "What's your order number?"
    save: order_id
    expect: { regex: '^#?\d{6}$' }
    retry: "Order numbers have 6 digits, like 123456. Try again?"
    attempts: 3
    on_fail: handoff
    timeout: 2h
    on_timeout: gave_up
    next: lookup
  lookup:
    script: order_lookup.rhai
    on_error: lookup_failed
    next:
      - if: 'status == "shipped"'
        goto: shipped
      - if: 'status == "processing"'
        goto: processing
      - goto: not_found
  shipped:
    say: "Order {{order_id}} shipped on {{ship_date}}."
    buttons:
      - { id: track, title: "Track it" }
      - { id: menu, title: "Main menu" }
    next:
      - button: track
        goto: track
  track:
    say: "Track your parcel here: {{tracking_url}}"
  processing:
    say: "Order {{order_id}} is being packed. We'll message you when it ships."
  not_found:
    say: "I couldn't find order {{order_id}}. Please check the number."
  lookup_failed:
    say: "Our order system is not answering right now. Please try again later."
  gave_up:
    say: "No worries, write \"order\" whenever you have the number at hand."
  handoff:
    say: "Connecting you to a person."
    handoff: support
"#;

/// The shipped example, `scripts/order_lookup.rhai`.
const ORDER_LOOKUP: &str = include_str!("../scripts/order_lookup.rhai");

/// Interrupt triggers every message is checked against while a session runs.
const MENU: &str = r#"
flow: menu
triggers:
  - keywords: [menu, start over]
    interrupt: true
  - button: menu
    interrupt: true
steps:
  menu:
    say: "Main menu, {{ contact.name }}:"
    buttons:
      - { id: orders, title: "My order" }
      - { id: buy, title: "Buy something" }
"#;

/// Sixteen ordinary flows with keyword triggers, every other one with a regex trigger too.
const TOPICS: [&str; 16] = [
    "refund",
    "shipping",
    "invoice",
    "returns",
    "warranty",
    "hours",
    "location",
    "careers",
    "newsletter",
    "feedback",
    "complaint",
    "gift card",
    "subscription",
    "password",
    "delivery",
    "payment",
];

const TOPIC_FLOW: &str = r#"
flow: FLOW_ID
description: Questions about TOPIC
triggers:
  - keywords: [TOPIC, TOPICs, about TOPIC]
REGEX_TRIGGER
start: intro
steps:
  intro:
    say: "Let's talk about TOPIC, {{ contact.name }}."
    next: ask_detail
  ask_detail:
    ask: "What exactly is your question about TOPIC?"
    save: detail
    next:
      - if: 'detail.len() > 100'
        goto: long
      - goto: thanks
  long:
    say: "That's a detailed one, a colleague will answer."
    handoff: support
  thanks:
    say: "Thanks, {{ contact.name }}, we noted: {{detail}}"
"#;

fn topic_flow(i: usize, topic: &str) -> String {
    let id = topic.replace(' ', "_");
    let regex = if i.is_multiple_of(2) {
        format!("  - regex: '^{id}\\s*#?(?P<reference>\\d{{4,8}})$'")
    } else {
        String::new()
    };
    TOPIC_FLOW
        .replace("REGEX_TRIGGER", &regex)
        .replace("FLOW_ID", &id)
        .replace("TOPIC", topic)
}

struct Fixture {
    engine: Engine,
    flows: FlowSet,
    contact: Contact,
    now: DateTime<Utc>,
}

impl Fixture {
    fn new() -> Self {
        // The flows a message is matched against, in file order: the flow that fires comes
        // after the 16 topic flows, so every trigger before it is tried.
        let mut sources: Vec<(String, String)> = TOPICS
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("flows/topic_{i}.yaml"), topic_flow(i, t)))
            .collect();
        for (name, text) in [
            ("menu", MENU),
            ("order_status", ORDER_STATUS),
            ("shop", SHOP),
            ("welcome", WELCOME),
        ] {
            sources.push((format!("flows/{name}.yaml"), text.to_string()));
        }
        assert_eq!(sources.len(), 20);
        let scripting = Arc::new(Scripting::default());
        let find_script = |name: &str| match name {
            "order_lookup.rhai" => Ok((
                "scripts/order_lookup.rhai".to_string(),
                ORDER_LOOKUP.to_string(),
            )),
            other => Err(format!("no script `{other}`")),
        };
        let project = load_sources(
            &sources,
            &scripting,
            Registry::default(),
            &find_script,
            None,
            Window::from_policy(&PolicyConfig::default()),
        );
        assert!(
            !project.diagnostics.has_errors(),
            "{}",
            project.diagnostics.render(false)
        );
        assert_eq!(project.flows.len(), 20);
        let mut contact = Contact::new("15550001111");
        contact.name = Some("Ana".into());
        contact.tags.insert("customer".into());
        contact
            .attrs
            .insert("city".into(), serde_json::json!("Lisbon"));
        Self {
            engine: Engine::new(scripting, None),
            flows: FlowSet::new(project.flows),
            contact,
            now: Utc.with_ymd_and_hms(2026, 1, 12, 9, 0, 0).unwrap(),
        }
    }

    fn message(&self, content: InboundContent) -> Event {
        Event::Message(Inbound {
            id: "wamid.bench".into(),
            timestamp: self.now,
            content,
            from_ad: false,
        })
    }

    /// A session as the engine leaves it after `event` (run once, outside any timing).
    fn session_after(&self, session: Option<Session>, event: Event) -> Session {
        let mut contact = self.contact.clone();
        let outcome = self
            .engine
            .handle(&self.flows, &mut contact, session, event, self.now);
        let session = outcome.session.expect("the flow waits");
        assert_eq!(session.waiting, Waiting::Reply);
        session
    }

    /// Times one `handle` of `event` for a contact with `session`, after checking once that
    /// it does what the benchmark claims.
    fn bench(
        &self,
        c: &mut Criterion,
        name: &str,
        session: Option<Session>,
        event: Event,
        check: impl Fn(&flowgate::engine::Outcome),
    ) {
        // The customer answers a minute after the bot's last message.
        let now = self.now + Duration::minutes(1);
        let mut contact = self.contact.clone();
        let outcome = self.engine.handle(
            &self.flows,
            &mut contact,
            session.clone(),
            event.clone(),
            now,
        );
        assert!(outcome.notes.is_empty(), "{:?}", outcome.notes);
        check(&outcome);
        c.bench_function(name, |b| {
            b.iter_batched(
                || (self.contact.clone(), session.clone(), event.clone()),
                |(mut contact, session, event)| {
                    self.engine.handle(
                        black_box(&self.flows),
                        &mut contact,
                        black_box(session),
                        black_box(event),
                        now,
                    )
                },
                BatchSize::SmallInput,
            )
        });
    }
}

fn sent(outcome: &flowgate::engine::Outcome) -> Vec<&OutboundContent> {
    outcome
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send(m) => Some(&m.content),
            _ => None,
        })
        .collect()
}

fn waits_at(outcome: &flowgate::engine::Outcome, flow: &str, step: &str, fx: &Fixture) {
    let session = outcome.session.as_ref().expect("a session waits");
    assert_eq!(session.flow_id, flow);
    assert_eq!(session.waiting, Waiting::Reply);
    let f = fx.flows.get(flow).unwrap();
    assert_eq!(f.steps[session.step].id, step);
}

fn engine_benches(c: &mut Criterion) {
    let fx = Fixture::new();

    // (a) "hello there" fires `welcome`'s keyword trigger (after trying every trigger of the
    // 19 flows before it); `route` tests an `if:`, `welcome` says an interpolated text with
    // three buttons and waits for a tap.
    fx.bench(
        c,
        "new_conversation",
        None,
        fx.message(InboundContent::text("hello there")),
        |o| {
            assert_eq!(o.handled, Handled::Started("welcome".into()));
            let sent = sent(o);
            assert_eq!(sent.len(), 1);
            assert!(matches!(sent[0], OutboundContent::Buttons { body, .. }
                if body == "Hi Ana! 👋 You wrote \"hello there\". How can we help?"));
            waits_at(o, "welcome", "welcome", &fx);
        },
    );

    // (b) A session waiting at `shop`'s `ask` (expect: number) gets "3": saved as `qty`,
    // routed by two `if:`s on it, `confirm` says a text with paths and a Rhai expression.
    let at_ask = fx.session_after(
        None,
        Event::Start {
            flow: "shop".into(),
            step: None,
        },
    );
    fx.bench(
        c,
        "answer_ask",
        Some(at_ask),
        fx.message(InboundContent::text("3")),
        |o| {
            assert_eq!(o.handled, Handled::Continued);
            let sent = sent(o);
            assert_eq!(sent.len(), 1);
            assert_eq!(
                sent[0].body(),
                "3 × coffee beans = 36 €. Shall I place the order, Ana?"
            );
            waits_at(o, "shop", "confirm", &fx);
        },
    );

    // (c) A session waiting at `welcome`'s buttons gets a tap on "My order": the button
    // branch goes to `ask_order`, which asks an interpolated question and waits.
    let at_buttons = fx.session_after(None, fx.message(InboundContent::text("hello there")));
    fx.bench(
        c,
        "button_branch",
        Some(at_buttons),
        fx.message(InboundContent::ButtonReply {
            id: "orders".into(),
            title: "My order".into(),
        }),
        |o| {
            assert_eq!(o.handled, Handled::Continued);
            assert_eq!(sent(o)[0].body(), "Sure, Ana. What's your order number?");
            waits_at(o, "welcome", "ask_order", &fx);
        },
    );

    // (d) A session waiting at `order_status`'s `ask_order` gets "123456": the regex answer is
    // saved, `lookup` runs the order-lookup script (a Rhai map lookup), two `if:`s route to
    // `shipped`, which says an interpolated text with buttons and waits.
    let at_order = fx.session_after(
        None,
        Event::Start {
            flow: "order_status".into(),
            step: Some("ask_order".into()),
        },
    );
    fx.bench(
        c,
        "script_step",
        Some(at_order),
        fx.message(InboundContent::text("123456")),
        |o| {
            assert_eq!(o.handled, Handled::Continued);
            assert_eq!(sent(o)[0].body(), "Order 123456 shipped on 2026-11-20.");
            waits_at(o, "order_status", "shipped", &fx);
        },
    );
}

/// The policy's decision for one message: (a) inside the window, (b) outside it, rewritten to
/// the step's template (registry lookup, status, parameter count), (c) outside it with a
/// policy-level rule that renders placeholders.
fn policy_benches(c: &mut Criterion) {
    use flowgate::config::{FallbackTemplate, PolicyConfig};
    use flowgate::domain::{Contact, Origin, Outbound, TemplateFallback};
    use flowgate::policy::Policy;
    use flowgate::templates::{Category, Registry, Status, Template};

    let now = flowgate::clock::VirtualClock::test_epoch();
    let template = |name: &str, body: &str| Template {
        name: name.into(),
        language: "en_US".into(),
        category: Category::Utility,
        status: Status::Approved,
        header: None,
        body: body.into(),
        footer: None,
        buttons: vec![],
    };
    let mut registry = Registry::default();
    for i in 0..50 {
        registry
            .templates
            .push(template(&format!("t{i}"), "Hi {{1}}"));
    }
    registry
        .templates
        .push(template("order_shipped", "Order {{1}} shipped on {{2}}."));
    registry
        .templates
        .push(template("agent_note", "Hi {{1}}: {{2}}"));
    let policy = Policy::new(&PolicyConfig {
        outside_window: vec![FallbackTemplate {
            flow: None,
            origin: Some("agent".into()),
            template: "agent_note".into(),
            language: "en_US".into(),
            params: vec!["{{contact.name}}".into(), "{{text}}".into()],
        }],
        ..PolicyConfig::default()
    });
    let mut contact = Contact::new("15550001234");
    contact.name = Some("Ada".into());
    contact.saw_customer_message(now - chrono::Duration::hours(2));
    let mut step = Outbound::new(
        OutboundContent::text("Your order 123456 shipped."),
        Origin::Step {
            flow: "order_status".into(),
            step: "shipped".into(),
        },
    );
    step.outside_window = Some(TemplateFallback {
        name: "order_shipped".into(),
        language: "en_US".into(),
        params: vec!["123456".into(), "2026-11-20".into()],
    });
    let agent = Outbound::new(OutboundContent::text("Your parcel left."), Origin::Agent);
    let late = now + chrono::Duration::hours(30);
    c.bench_function("policy_in_window", |b| {
        b.iter(|| policy.decide(std::hint::black_box(&step), &contact, &registry, now))
    });
    c.bench_function("policy_rewrite_step_template", |b| {
        b.iter(|| policy.decide(std::hint::black_box(&step), &contact, &registry, late))
    });
    c.bench_function("policy_rewrite_policy_rule", |b| {
        b.iter(|| policy.decide(std::hint::black_box(&agent), &contact, &registry, late))
    });
    assert_eq!(
        policy.decide(&step, &contact, &registry, late).name(),
        "rewritten"
    );
    assert_eq!(
        policy.decide(&agent, &contact, &registry, late).name(),
        "rewritten"
    );
}

criterion_group!(benches, engine_benches, policy_benches);
criterion_main!(benches);
