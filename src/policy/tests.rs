use chrono::Duration;

use super::*;
use crate::clock::VirtualClock;
use crate::domain::Origin;
use crate::templates::Template;

fn t(minutes: i64) -> DateTime<Utc> {
    VirtualClock::test_epoch() + Duration::minutes(minutes)
}

fn registry() -> Registry {
    let t = |name: &str, category, status, body: &str| Template {
        name: name.into(),
        language: "en_US".into(),
        category,
        status,
        header: None,
        body: body.into(),
        footer: None,
        buttons: vec![],
    };
    Registry {
        templates: vec![
            t(
                "order_shipped",
                Category::Utility,
                Status::Approved,
                "Order {{1}} shipped {{2}}",
            ),
            t("paused_one", Category::Utility, Status::Paused, "Hi {{1}}"),
            t("sale", Category::Marketing, Status::Approved, "Sale!"),
            t(
                "agent_note",
                Category::Utility,
                Status::Approved,
                "Hi {{1}}: {{2}}",
            ),
        ],
        written_at: None,
    }
}

fn text(body: &str) -> Outbound {
    Outbound::new(
        OutboundContent::text(body),
        Origin::Step {
            flow: "f".into(),
            step: "s".into(),
        },
    )
}

fn with_fallback(body: &str, name: &str, params: &[&str]) -> Outbound {
    let mut m = text(body);
    m.outside_window = Some(TemplateFallback {
        name: name.into(),
        language: "en_US".into(),
        params: params.iter().map(|p| p.to_string()).collect(),
    });
    m
}

fn contact_last_wrote(at: DateTime<Utc>) -> Contact {
    let mut c = Contact::new("15550001111");
    c.saw_customer_message(at);
    c
}

#[test]
fn the_window_is_open_until_24h_minus_the_margin() {
    let p = Policy::default();
    let c = contact_last_wrote(t(0));
    let at = |m| p.decide(&text("hi"), &c, &registry(), t(m));
    assert_eq!(at(23 * 60 + 57).name(), "send");
    // 24 h - 2 m is the edge: closed from there on.
    assert_eq!(at(23 * 60 + 58).name(), "queued");
    assert_eq!(at(24 * 60 + 1).name(), "queued");
    assert_eq!(
        at(23 * 60 + 59).reason(),
        "window closed 1m ago; no template fallback"
    );
}

#[test]
fn no_window_before_the_customer_ever_wrote() {
    let p = Policy::default();
    let c = Contact::new("1");
    let d = p.decide(&text("hi"), &c, &registry(), t(0));
    assert_eq!(d.name(), "queued");
    assert!(d.reason().contains("has not written"), "{}", d.reason());
}

#[test]
fn outside_the_window_a_fallback_rewrites_with_its_parameters() {
    let p = Policy::default();
    let c = contact_last_wrote(t(0));
    let m = with_fallback("Your order 42 shipped", "order_shipped", &["42", "today"]);
    let d = p.decide(&m, &c, &registry(), t(25 * 60 + 12));
    assert_eq!(
        d.explain(),
        "window closed 1h14m ago → rewritten to template order_shipped (en_US)"
    );
    let stored = Policy::apply(&d, &m);
    assert_eq!(
        stored.content,
        OutboundContent::Template {
            name: "order_shipped".into(),
            language: "en_US".into(),
            params: vec!["42".into(), "today".into()],
        }
    );
    assert_eq!(
        stored.requested(),
        &OutboundContent::text("Your order 42 shipped")
    );
    // Deciding again inside a new window sends the original.
    let c = contact_last_wrote(t(26 * 60));
    let again = p.decide(&stored, &c, &registry(), t(26 * 60 + 1));
    assert_eq!(Policy::apply(&again, &stored), m);
}

#[test]
fn a_paused_missing_or_mismatched_fallback_queues_with_the_reason() {
    let p = Policy::default();
    let c = contact_last_wrote(t(0));
    let late = t(30 * 60);
    for (m, why) in [
        (
            with_fallback("x", "paused_one", &["a"]),
            "is paused, not approved",
        ),
        (with_fallback("x", "nope", &[]), "is not in the registry"),
        (
            with_fallback("x", "order_shipped", &["1"]),
            "takes 2 parameters, got 1",
        ),
    ] {
        let d = p.decide(&m, &c, &registry(), late);
        assert_eq!(d.name(), "queued");
        assert!(d.reason().contains(why), "{} lacks {why}", d.reason());
    }
}

#[test]
fn a_campaign_message_that_would_queue_is_skipped_instead() {
    let p = Policy::default();
    let c = contact_last_wrote(t(0));
    let late = t(30 * 60);
    let mut m = with_fallback("Our sale", "paused_one", &["a"]);
    m.origin = Origin::Campaign {
        campaign: "sale".into(),
        run: 1,
        category: "marketing".into(),
        on_reply: None,
    };
    let d = p.decide(&m, &c, &registry(), late);
    assert_eq!(d.name(), "skipped");
    assert!(
        d.reason().starts_with("not sendable now: ") && d.reason().contains("is paused"),
        "{}",
        d.reason()
    );
    // Inside the window it is sent as any message is.
    assert_eq!(p.decide(&m, &c, &registry(), t(60)).name(), "send");
}

#[test]
fn policy_level_mappings_match_origin_and_render_placeholders() {
    let p = Policy {
        fallbacks: vec![FallbackTemplate {
            flow: None,
            origin: Some("agent".into()),
            template: "agent_note".into(),
            language: "en_US".into(),
            params: vec!["{{contact.name}}".into(), "{{text}}".into()],
        }],
        ..Policy::default()
    };
    let mut c = contact_last_wrote(t(0));
    c.name = Some("Ada".into());
    let agent = Outbound::new(OutboundContent::text("parcel left"), Origin::Agent);
    let d = p.decide(&agent, &c, &registry(), t(48 * 60));
    let Decision::Rewritten { template, .. } = &d else {
        panic!("{d:?}")
    };
    assert_eq!(template.params, ["Ada", "parcel left"]);
    // A step's message does not match an `origin: agent` rule.
    assert_eq!(
        p.decide(&text("x"), &c, &registry(), t(48 * 60)).name(),
        "queued"
    );
}

#[test]
fn templates_go_outside_the_window_and_marketing_respects_consent() {
    let p = Policy::default();
    let mut c = contact_last_wrote(t(0));
    let sale = Outbound::new(
        OutboundContent::Template {
            name: "sale".into(),
            language: "en_US".into(),
            params: vec![],
        },
        Origin::Agent,
    );
    assert_eq!(p.decide(&sale, &c, &registry(), t(50 * 60)).name(), "send");
    Policy::set_consent(&mut c, ConsentChange::OptOut, "keyword STOP", t(1));
    let d = p.decide(&sale, &c, &registry(), t(50 * 60));
    assert_eq!(d.name(), "skipped");
    assert!(d.reason().contains("opted out"), "{}", d.reason());
    // Utility still flows.
    let utility = Outbound::new(
        OutboundContent::Template {
            name: "order_shipped".into(),
            language: "en_US".into(),
            params: vec!["1".into(), "2".into()],
        },
        Origin::Agent,
    );
    assert_eq!(
        p.decide(&utility, &c, &registry(), t(50 * 60)).name(),
        "send"
    );
    Policy::set_consent(&mut c, ConsentChange::OptIn, "keyword START", t(2));
    Policy::pause_marketing(&mut c, t(60));
    assert_eq!(p.decide(&sale, &c, &registry(), t(61)).name(), "skipped");
    assert_eq!(
        p.decide(&sale, &c, &registry(), t(60 + 24 * 60)).name(),
        "send"
    );
}

#[test]
fn whatsapp_closing_the_window_wins_until_the_customer_writes() {
    let p = Policy::default();
    let mut c = contact_last_wrote(t(0));
    // A refusal of a message sent before a newer customer message closes nothing.
    assert!(!Policy::close_window(&mut c.clone(), t(60), None));
    assert!(Policy::close_window(&mut c, t(60), Some(t(0))));
    let d = p.decide(&text("hi"), &c, &registry(), t(61));
    assert_eq!(d.name(), "queued");
    assert!(d.reason().contains("131047"), "{}", d.reason());
    // The message WhatsApp already knew does not reopen it, even seen again.
    c.saw_customer_message(t(0));
    assert_eq!(
        p.decide(&text("hi"), &c, &registry(), t(61)).name(),
        "queued"
    );
    c.saw_customer_message(t(70));
    assert_eq!(p.decide(&text("hi"), &c, &registry(), t(71)).name(), "send");
}

#[test]
fn answering_an_ad_within_24h_opens_the_free_entry_point_once() {
    let p = Policy::default();
    let mut c = contact_last_wrote(t(0));
    c.policy.referral_at = Some(t(0));
    let d = p.decide(&text("hi"), &c, &registry(), t(5));
    assert!(
        d.reason().contains("free entry point opens"),
        "{}",
        d.reason()
    );
    assert!(p.record_sent(&mut c, t(5)));
    assert_eq!(c.policy.free_entry_until, Some(t(5) + Duration::hours(72)));
    assert!(!p.record_sent(&mut c, t(6)), "opens once");
    let d = p.decide(&text("hi"), &c, &registry(), t(10));
    assert!(
        d.reason().contains("free entry point until"),
        "{}",
        d.reason()
    );
    // Too late an answer opens nothing.
    let mut late = contact_last_wrote(t(0));
    late.policy.referral_at = Some(t(0));
    assert!(!p.record_sent(&mut late, t(25 * 60)));
}

#[test]
fn an_ad_message_when_the_free_entry_point_ends_opens_a_new_one() {
    let p = Policy::default();
    let mut c = contact_last_wrote(t(0));
    c.policy.referral_at = Some(t(0));
    assert!(p.record_sent(&mut c, t(0)));
    let end = t(72 * 60);
    assert_eq!(c.policy.free_entry_until, Some(end));
    // The customer comes from an ad again at the very minute the first one ends.
    c.saw_customer_message(end);
    c.policy.referral_at = Some(end);
    assert!(
        p.record_sent(&mut c, end),
        "a new ad conversation opens again"
    );
    assert_eq!(c.policy.free_entry_until, Some(end + Duration::hours(72)));
}

#[test]
fn queued_messages_expire_after_the_ttl() {
    let p = Policy::default();
    assert_eq!(p.expires_at(t(0)), t(7 * 24 * 60));
    let e = p.expired(t(0), t(7 * 24 * 60));
    assert_eq!(e.name(), "expired");
    assert!(e.reason().contains("queue_ttl 7d"), "{}", e.reason());
}

#[test]
fn consent_keywords_are_whole_messages_any_case() {
    let p = Policy::default();
    let kw = |s: &str| p.consent_keyword(&InboundContent::text(s));
    assert_eq!(kw(" stop "), Some(ConsentChange::OptOut));
    assert_eq!(kw("Unsubscribe"), Some(ConsentChange::OptOut));
    assert_eq!(kw("START"), Some(ConsentChange::OptIn));
    assert_eq!(kw("please stop the order"), None);
}

#[test]
fn placeholders_render_known_names_and_keep_others() {
    let mut c = Contact::new("1555");
    c.attrs.insert("city".into(), "Berlin".into());
    assert_eq!(
        render_placeholders("{{contact.attrs.city}}/{{ contact.wa_id }}/{{x}}", "t", &c),
        "Berlin/1555/{{x}}"
    );
    assert!(is_known_placeholder("contact.attrs.city"));
    assert!(!is_known_placeholder("contact.attrs."));
}

#[test]
fn check_names_every_problem_of_a_fallback_rule() {
    let rule = |template: &str, params: &[&str], origin: Option<&str>, flow: Option<&str>| {
        FallbackTemplate {
            flow: flow.map(str::to_string),
            origin: origin.map(str::to_string),
            template: template.into(),
            language: "en_US".into(),
            params: params.iter().map(|p| p.to_string()).collect(),
        }
    };
    let rules = [
        rule(
            "agent_note",
            &["{{contact.name}}", "{{text}}"],
            Some("agent"),
            None,
        ),
        rule("nope", &[], None, None),
        rule("order_shipped", &["{{x}}"], Some("bot"), Some("ghost")),
    ];
    let problems = check_fallbacks(&rules, &registry(), &["f"]);
    assert_eq!(problems.len(), 5, "{problems:#?}");
    let said = |i: usize, what: &str, error: bool| {
        assert!(problems[i].message.contains(what), "{:?}", problems[i]);
        assert_eq!(problems[i].error, error, "{:?}", problems[i]);
    };
    said(0, "no `nope` in en_US", false);
    said(1, "origin `bot`", true);
    said(2, "no flow `ghost`", true);
    said(3, "takes 2 parameters, 1 given", true);
    said(4, "`{{x}}` is not a placeholder", true);
}
