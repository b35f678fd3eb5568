//! The campaign compiler: a valid file into the expected model, and one test per diagnostic,
//! each checking where it points.

use chrono::{Duration, NaiveDate, NaiveTime};

use super::*;
use crate::campaign::{DEFAULT_MARKETING_CAP, DEFAULT_TTL};
use crate::config::ChannelConfig;
use crate::diagnostic::Severity;
use crate::flow::lint::{Window, window_hazards};
use crate::flow::load::load_sources;
use crate::templates::{Category, Status, Template};

fn template(name: &str, category: Category, status: Status, body: &str) -> Template {
    Template {
        name: name.into(),
        language: "en_US".into(),
        category,
        status,
        header: None,
        body: body.into(),
        footer: None,
        buttons: Vec::new(),
    }
}

fn registry() -> Registry {
    Registry {
        templates: vec![
            template(
                "spring_sale",
                Category::Marketing,
                Status::Approved,
                "Hi {{1}}!",
            ),
            template(
                "summer_sale",
                Category::Marketing,
                Status::Paused,
                "Hi {{1}}!",
            ),
            template(
                "old_sale",
                Category::Marketing,
                Status::Rejected,
                "Hi {{1}}!",
            ),
            template(
                "autumn_sale",
                Category::Marketing,
                Status::Approved,
                "Hello {{1}}, autumn is here.",
            ),
            template(
                "order_shipped",
                Category::Utility,
                Status::Approved,
                "Order {{1}}.",
            ),
        ],
        written_at: None,
    }
}

fn channels() -> Vec<ChannelConfig> {
    let mut main = ChannelConfig::sandbox("main");
    main.throughput_mps = 80;
    vec![main, ChannelConfig::sandbox("support")]
}

const VALID: &str = r#"campaign: spring_sale
channel: support
category: marketing
template: { name: spring_sale, language: en_US, params: ["{{contact.name}}"] }
in_window:
  say: "Hi {{contact.name}}! Our spring sale starts today"
  buttons:
    - { id: shop, title: "Shop now" }
audience: { tags: [customers, berlin], where: 'contact.attrs.city == "Berlin"' }
schedule: "0 10 * * MON"
timezone: Europe/Berlin
quiet_hours: { from: "21:00", to: "09:00" }
rate: 600/m
on_reply: sale_flow
frequency_cap: { max: 2, per: 7d }
ttl: 6h
"#;

/// Runs `f` with the test registry and channels.
fn with_env<T>(f: impl FnOnce(&Env<'_>) -> T) -> T {
    let scripting = Scripting::default();
    let templates = registry();
    let channels = channels();
    f(&Env {
        scripting: &scripting,
        templates: &templates,
        channels: &channels,
    })
}

/// Compiles `text` as `c.yaml`.
fn compile(text: &str) -> Compiled {
    with_env(|env| compile_campaign("c.yaml", text, env))
}

/// `VALID` with the line starting with `key:` replaced by `line` (or removed when empty).
fn with(key: &str, line: &str) -> String {
    let mut out = String::new();
    let mut replaced = false;
    for l in VALID.lines() {
        if l.starts_with(&format!("{key}:")) {
            replaced = true;
            if !line.is_empty() {
                out.push_str(line);
                out.push('\n');
            }
        } else {
            out.push_str(l);
            out.push('\n');
        }
    }
    if !replaced {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The one error of `text`: its `line:col` and the diagnostic.
fn one_error(text: &str) -> (String, Diagnostic) {
    let compiled = compile(text);
    let items = &compiled.diagnostics.items;
    assert_eq!(
        compiled.diagnostics.errors(),
        1,
        "{}",
        compiled.diagnostics.render(false)
    );
    assert!(compiled.campaign.is_none());
    let d = items.iter().find(|d| d.is_error()).unwrap().clone();
    let loc = d.loc.unwrap();
    (format!("{}:{}", loc.line, loc.col), d)
}

#[test]
fn a_valid_campaign_compiles_to_its_model() {
    let compiled = compile(VALID);
    assert!(
        compiled.diagnostics.items.is_empty(),
        "{}",
        compiled.diagnostics.render(false)
    );
    let c = compiled.campaign.expect("compiles");
    // The scheduler's view: Mondays 10:00 Berlin time (CEST after 29 March 2026).
    let sunday = chrono::DateTime::parse_from_rfc3339("2026-03-29T12:00:00Z").unwrap();
    assert_eq!(
        c.schedule()
            .next_after(sunday.to_utc())
            .map(|t| t.to_rfc3339()),
        Some("2026-03-30T08:00:00+00:00".to_string())
    );
    assert_eq!(c.name, "spring_sale");
    assert_eq!((c.file.as_str(), c.loc.line, c.loc.col), ("c.yaml", 1, 11));
    assert_eq!(c.channel, "support");
    assert_eq!(c.category, Category::Marketing);
    assert_eq!(c.variants.len(), 1, "one unnamed variant");
    let (variant, call) = (&c.variants[0], &c.variants[0].template);
    assert_eq!((variant.name.as_deref(), variant.weight), (None, 1));
    assert!(!c.is_split());
    assert_eq!(
        (call.name.as_str(), call.language.as_str()),
        ("spring_sale", "en_US")
    );
    assert_eq!(call.params.len(), 1);
    assert_eq!(call.params[0].raw, "{{contact.name}}");
    let in_window = c.in_window.expect("in_window");
    assert_eq!(
        in_window.text.raw,
        "Hi {{contact.name}}! Our spring sale starts today"
    );
    assert_eq!(in_window.buttons.len(), 1);
    assert_eq!(in_window.buttons[0].0, "shop");
    assert_eq!(c.audience.tags, ["customers", "berlin"]);
    assert_eq!(
        c.audience.filter.expect("where").source,
        r#"contact.attrs.city == "Berlin""#
    );
    match c.when {
        When::Cron { source, .. } => assert_eq!(source, "0 10 * * MON"),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.timezone, chrono_tz::Europe::Berlin);
    let hm = |h, m| NaiveTime::from_hms_opt(h, m, 0).unwrap();
    assert_eq!(
        c.quiet_hours,
        Some(QuietHours {
            from: hm(21, 0),
            to: hm(9, 0)
        })
    );
    let rate = c.rate.expect("rate");
    assert_eq!((rate.count, rate.per), (600, Duration::minutes(1)));
    assert!((rate.per_second() - 10.0).abs() < 1e-9);
    assert_eq!(c.on_reply.as_deref(), Some("sale_flow"));
    assert_eq!(
        c.frequency_cap,
        Some(FrequencyCap {
            max: 2,
            per: Duration::days(7)
        })
    );
    assert_eq!(c.ttl, Duration::hours(6));
}

#[test]
fn defaults_first_channel_utc_a_day_and_one_marketing_message_a_day() {
    let text = "campaign: once\ncategory: marketing\n\
                template: { name: spring_sale, language: en_US, params: [\"{{contact.name}}\"] }\n\
                audience: { where: 'true' }\nat: 2026-12-01T10:00:00\n";
    let compiled = compile(text);
    let c = compiled
        .campaign
        .unwrap_or_else(|| panic!("{}", compiled.diagnostics.render(false)));
    assert_eq!(c.channel, "main");
    assert_eq!(c.timezone, chrono_tz::Tz::UTC);
    assert_eq!(c.ttl, DEFAULT_TTL);
    assert_eq!(c.frequency_cap, Some(DEFAULT_MARKETING_CAP));
    assert_eq!(DEFAULT_MARKETING_CAP.max, 1);
    assert_eq!(DEFAULT_MARKETING_CAP.per, Duration::hours(24));
    assert!(c.rate.is_none() && c.quiet_hours.is_none() && c.in_window.is_none());
    let at = NaiveDate::from_ymd_opt(2026, 12, 1)
        .unwrap()
        .and_hms_opt(10, 0, 0)
        .unwrap();
    assert!(matches!(c.when, When::At(t) if t == at));
    // A utility campaign has no cap unless it names one.
    let utility = text
        .replace("category: marketing", "category: utility")
        .replace("name: spring_sale", "name: order_shipped");
    let c = compile(&utility).campaign.expect("compiles");
    assert_eq!(c.frequency_cap, None);
}

#[test]
fn unknown_key_points_at_it_and_suggests_the_right_one() {
    let (at, d) = one_error(&VALID.replace("schedule:", "schedul:"));
    assert_eq!(at, "10:1");
    assert!(
        d.message.contains("unknown field `schedul`"),
        "{}",
        d.message
    );
    assert_eq!(d.help.as_deref(), Some("did you mean `schedule`?"));
}

#[test]
fn unknown_template() {
    let (at, d) = one_error(&VALID.replace("name: spring_sale", "name: spring_sal"));
    assert_eq!(at, "4:19");
    assert!(
        d.message.contains("there is no template `spring_sal`"),
        "{}",
        d.message
    );
    assert_eq!(d.help.as_deref(), Some("did you mean `spring_sale`?"));
}

#[test]
fn a_paused_template_warns_and_still_compiles() {
    let compiled = compile(&VALID.replace("name: spring_sale", "name: summer_sale"));
    let items = &compiled.diagnostics.items;
    assert_eq!(items.len(), 1, "{}", compiled.diagnostics.render(false));
    assert_eq!(items[0].severity, Severity::Warning);
    assert_eq!(items[0].position(), "c.yaml:4:19");
    assert!(
        items[0].message.contains("is paused, not approved"),
        "{}",
        items[0].message
    );
    assert!(compiled.campaign.is_some());
}

#[test]
fn a_rejected_template_is_an_error() {
    let (at, d) = one_error(&VALID.replace("name: spring_sale", "name: old_sale"));
    assert_eq!(at, "4:19");
    assert!(
        d.message.contains("is rejected: it cannot be sent"),
        "{}",
        d.message
    );
}

#[test]
fn template_category_must_match_the_campaign() {
    let text = VALID.replace("category: marketing", "category: utility");
    let (at, d) = one_error(&text);
    assert_eq!(at, "4:19");
    assert!(
        d.message
            .contains("is a marketing template, and this campaign's `category` is utility"),
        "{}",
        d.message
    );
}

#[test]
fn wrong_parameter_count() {
    let text = VALID.replace(r#"params: ["{{contact.name}}"]"#, r#"params: ["a", "b"]"#);
    let (at, d) = one_error(&text);
    assert_eq!(at, "4:63", "at the surplus parameter");
    assert!(
        d.message.contains("takes 1 parameter, and 2 are given"),
        "{}",
        d.message
    );
}

#[test]
fn a_parameter_names_only_the_contact() {
    let text = VALID.replace(r#"["{{contact.name}}"]"#, r#"["{{order_id}}"]"#);
    let (at, d) = one_error(&text);
    assert_eq!(at, "4:59");
    assert!(
        d.message
            .contains("`{{order_id}}` means nothing in a campaign"),
        "{}",
        d.message
    );
}

#[test]
fn invalid_cron_says_why() {
    let (at, d) = one_error(&with("schedule", "schedule: \"0 25 * * MON\""));
    assert_eq!(at, "10:12");
    assert!(
        d.message.contains("`0 25 * * MON` is not a valid schedule"),
        "{}",
        d.message
    );
    let label = d.label.unwrap_or_default();
    assert!(!label.is_empty(), "croner's reason is the label");
}

#[test]
fn a_six_field_cron_is_refused() {
    let (_, d) = one_error(&with("schedule", "schedule: \"0 0 10 * * MON\""));
    assert!(
        d.message.contains("is not a valid schedule"),
        "{}",
        d.message
    );
    assert!(d.help.unwrap_or_default().contains("5 fields"));
}

#[test]
fn unknown_time_zone_suggests_one() {
    let (at, d) = one_error(&with("timezone", "timezone: Europe/Berln"));
    assert_eq!(at, "11:11");
    assert!(
        d.message.contains("`Europe/Berln` is not a time zone"),
        "{}",
        d.message
    );
    assert_eq!(d.help.as_deref(), Some("did you mean `Europe/Berlin`?"));
}

#[test]
fn unknown_channel() {
    let (at, d) = one_error(&with("channel", "channel: suport"));
    assert_eq!(at, "2:10");
    assert!(
        d.message.contains("there is no channel `suport`"),
        "{}",
        d.message
    );
    assert_eq!(d.help.as_deref(), Some("did you mean `support`?"));
}

#[test]
fn bad_rate() {
    let (at, d) = one_error(&with("rate", "rate: 20 per second"));
    assert_eq!(at, "13:7");
    assert!(
        d.message.contains("`20 per second` is not a rate"),
        "{}",
        d.message
    );
    for bad in ["0/s", "20/d", "x/s", "20"] {
        let (_, d) = one_error(&with("rate", &format!("rate: \"{bad}\"")));
        assert!(d.message.contains("is not a rate"), "{bad}: {}", d.message);
    }
}

#[test]
fn a_rate_above_the_channels_throughput_warns() {
    let text = with("channel", "channel: main").replace("rate: 600/m", "rate: 100/s");
    let compiled = compile(&text);
    let items = &compiled.diagnostics.items;
    assert_eq!(items.len(), 1, "{}", compiled.diagnostics.render(false));
    assert_eq!(items[0].severity, Severity::Warning);
    assert!(items[0].message.contains("at most 80 messages a second"));
    assert!(compiled.campaign.is_some());
}

#[test]
fn bad_quiet_hours() {
    let (at, d) = one_error(&with(
        "quiet_hours",
        "quiet_hours: { from: \"9pm\", to: \"09:00\" }",
    ));
    assert_eq!(at, "12:23");
    assert!(
        d.message.contains("`9pm` is not a time of day"),
        "{}",
        d.message
    );
    let (at, d) = one_error(&with(
        "quiet_hours",
        "quiet_hours: { from: \"09:00\", to: \"09:00\" }",
    ));
    assert_eq!(at, "12:14");
    assert!(d.message.contains("are empty"), "{}", d.message);
}

#[test]
fn bad_at() {
    let text = with("schedule", "at: 2026-13-01T10:00:00");
    let (at, d) = one_error(&text);
    assert_eq!(at, "10:5");
    assert!(
        d.message.contains("is not a local date-time"),
        "{}",
        d.message
    );
    let text = with("schedule", "at: 2026-12-01T10:00:00+01:00");
    let (_, d) = one_error(&text);
    assert!(d.help.unwrap_or_default().contains("without an offset"));
}

#[test]
fn an_at_the_clocks_skip_is_an_error() {
    // Berlin moves from 02:00 to 03:00 on 29 March 2026.
    let (at, d) = one_error(&with("schedule", "at: 2026-03-29T02:30:00"));
    assert_eq!(at, "10:5");
    assert!(
        d.message
            .contains("2026-03-29 02:30:00 does not exist in Europe/Berlin"),
        "{}",
        d.message
    );
}

#[test]
fn schedule_and_at_exclude_each_other() {
    let both = format!("{VALID}at: 2026-12-01T10:00:00\n");
    let (at, d) = one_error(&both);
    assert_eq!(at, "17:5");
    assert!(
        d.message.contains("`schedule` or `at`, not both"),
        "{}",
        d.message
    );
    let (at, d) = one_error(&with("schedule", ""));
    assert_eq!(at, "1:11");
    assert!(
        d.message.contains("neither `schedule` nor `at`"),
        "{}",
        d.message
    );
}

#[test]
fn an_audience_needs_tags_or_where() {
    let (at, d) = one_error(&with("audience", "audience: {}"));
    assert_eq!(at, "9:11");
    assert!(
        d.message.contains("needs `tags` or `where`"),
        "{}",
        d.message
    );
}

#[test]
fn a_where_that_does_not_compile() {
    let (at, d) = one_error(&with(
        "audience",
        "audience: { where: 'contact.attrs.city ==' }",
    ));
    assert_eq!(at, "9:42", "where Rhai finds the expression incomplete");
    assert!(
        d.message.contains("this condition does not compile"),
        "{}",
        d.message
    );
}

#[test]
fn in_window_gets_the_flows_message_checks() {
    let buttons = "    - { id: a, title: A }\n    - { id: b, title: B }\n    - { id: c, title: C }\n    - { id: d, title: D }\n";
    let text = VALID.replace("    - { id: shop, title: \"Shop now\" }\n", buttons);
    let (at, d) = one_error(&text);
    assert_eq!(at, "11:7");
    assert!(
        d.message.contains("at most 3 reply buttons"),
        "{}",
        d.message
    );
    let text = VALID.replace("Our spring sale", "{{ order.total }}");
    let (_, d) = one_error(&text);
    assert!(
        d.message.contains("means nothing in a campaign") || d.message.contains("does not compile")
    );
}

#[test]
fn frequency_cap_and_ttl_are_checked() {
    let (at, d) = one_error(&with(
        "frequency_cap",
        "frequency_cap: { max: 0, per: 24h }",
    ));
    assert_eq!(at, "15:23");
    assert!(
        d.message.contains("`max` must be at least 1"),
        "{}",
        d.message
    );
    let (at, d) = one_error(&with("ttl", "ttl: a day"));
    assert_eq!(at, "16:6");
    assert!(d.message.contains("is not a duration"), "{}", d.message);
}

#[test]
fn a_campaign_name_is_a_plain_name() {
    let (at, d) = one_error(&VALID.replace("campaign: spring_sale", "campaign: spring sale"));
    assert_eq!(at, "1:11");
    assert!(
        d.message.contains("not a valid campaign name"),
        "{}",
        d.message
    );
}

/// Compiles several campaigns together against the flow ids `flows`.
fn compile_all(sources: &[(&str, &str)], flows: &[&str]) -> (Vec<Arc<Campaign>>, Diagnostics) {
    let sources: Vec<(String, String)> = sources
        .iter()
        .map(|(f, t)| (f.to_string(), t.to_string()))
        .collect();
    with_env(|env| compile_campaigns(&sources, env, flows))
}

#[test]
fn on_reply_names_an_existing_flow() {
    let (campaigns, diags) = compile_all(&[("a.yaml", VALID)], &["sale_flow"]);
    assert_eq!((campaigns.len(), diags.items.len()), (1, 0));
    let (campaigns, diags) = compile_all(&[("a.yaml", VALID)], &["sales_flow", "menu"]);
    assert!(campaigns.is_empty());
    assert_eq!(diags.errors(), 1, "{}", diags.render(false));
    assert_eq!(diags.items[0].position(), "a.yaml:14:11");
    assert!(
        diags.items[0]
            .message
            .contains("there is no flow `sale_flow`")
    );
    assert_eq!(
        diags.items[0].help.as_deref(),
        Some("did you mean `sales_flow`?")
    );
}

#[test]
fn two_campaigns_with_one_name() {
    let (campaigns, diags) = compile_all(&[("a.yaml", VALID), ("b.yaml", VALID)], &["sale_flow"]);
    assert!(
        campaigns.is_empty(),
        "a project with an error has no campaigns"
    );
    assert_eq!(diags.errors(), 1, "{}", diags.render(false));
    assert_eq!(diags.items[0].position(), "b.yaml:1:11");
    assert!(
        diags.items[0]
            .message
            .contains("two campaigns are named `spring_sale`")
    );
    assert!(
        diags.items[0]
            .help
            .as_deref()
            .unwrap_or_default()
            .contains("a.yaml:1:11")
    );
}

#[test]
fn the_on_reply_flow_is_linted_from_the_reply() {
    let flow = "flow: sale_flow\nsteps:\n  thanks:\n    say: Thanks!\n    next: later\n  \
                later:\n    wait: 26h\n    say: Still interested?\n";
    let no_scripts = |name: &str| Err(format!("no script `{name}`"));
    let window = Window {
        length: Duration::hours(24),
        safety_margin: Duration::minutes(2),
        fallbacks: Vec::new(),
    };
    let project = load_sources(
        &[("f.yaml".into(), flow.into())],
        &Scripting::default(),
        registry(),
        &no_scripts,
        None,
        window.clone(),
    );
    let (campaigns, _) = compile_all(&[("a.yaml", VALID)], &["sale_flow"]);
    let entries = reply_entries(&campaigns);
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].flow, "sale_flow");
    assert_eq!(entries[0].after, Duration::zero());
    assert_eq!(entries[0].via, "campaign `spring_sale`'s `on_reply`");
    // The reply opens the window: `thanks` is safe, `later` is not.
    let warnings = window_hazards(&project.flows, window, &entries);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].position(), "f.yaml:8:10");
}

/// `VALID` with a 70/30 split instead of its template; the second variant has its own
/// `in_window` message.
fn split(variants: &str) -> String {
    with("template", &format!("split:\n{variants}"))
}

const VARIANTS: &str = r#"  - name: short
    weight: 70
    template: { name: spring_sale, language: en_US, params: ["{{contact.name}}"] }
  - name: long
    weight: 30
    template: { name: autumn_sale, language: en_US, params: ["{{contact.name}}"] }
    in_window: { say: "Hello {{contact.name}}, the long version" }"#;

#[test]
fn a_split_compiles_to_named_weighted_variants() {
    let compiled = compile(&split(VARIANTS));
    assert!(
        compiled.diagnostics.items.is_empty(),
        "{}",
        compiled.diagnostics.render(false)
    );
    let c = compiled.campaign.expect("compiles");
    assert!(c.is_split());
    let summary: Vec<_> = c
        .variants
        .iter()
        .map(|v| (v.name.as_deref(), v.weight, v.template.name.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            (Some("short"), 70, "spring_sale"),
            (Some("long"), 30, "autumn_sale")
        ]
    );
    let said = |i: usize| c.in_window_of(&c.variants[i]).map(|m| m.text.raw.clone());
    assert_eq!(
        said(0).as_deref(),
        Some("Hi {{contact.name}}! Our spring sale starts today"),
        "a variant without `in_window` sends the campaign's"
    );
    assert_eq!(
        said(1).as_deref(),
        Some("Hello {{contact.name}}, the long version")
    );
    assert_eq!(c.in_window_messages().count(), 2);
}

#[test]
fn a_split_sends_each_contact_one_variant_in_proportion_to_the_weights() {
    let c = compile(&split(VARIANTS)).campaign.expect("compiles");
    let renamed = split(VARIANTS).replace("campaign: spring_sale", "campaign: other_sale");
    let other = compile(&renamed).campaign.expect("compiles");
    let contacts: Vec<String> = (0..10_000).map(|i| format!("4915{i:08}")).collect();
    let mut short = 0;
    let mut differ = 0;
    for wa_id in &contacts {
        let variant = c.variant_for(wa_id).name.as_deref();
        for _ in 0..3 {
            assert_eq!(c.variant_for(wa_id).name.as_deref(), variant, "{wa_id}");
        }
        short += usize::from(variant == Some("short"));
        differ += usize::from(other.variant_for(wa_id).name.as_deref() != variant);
    }
    let share = short as f64 / contacts.len() as f64;
    assert!((share - 0.7).abs() < 0.02, "short got {share}");
    // Another campaign splits the same contacts independently: 70/30 twice agrees for
    // 0.7² + 0.3² = 58 % of contacts, so about 42 % differ.
    let differ = differ as f64 / contacts.len() as f64;
    assert!((differ - 0.42).abs() < 0.03, "{differ} differ");
}

#[test]
fn a_variants_weight_is_a_whole_number_above_zero() {
    for bad in ["0", "-5", "2.5"] {
        let text = split(&VARIANTS.replace("weight: 30", &format!("weight: {bad}")));
        let (at, d) = one_error(&text);
        assert_eq!(at, "9:13", "at the weight {bad}");
        assert!(
            d.message
                .contains("a variant's weight is a whole number above zero"),
            "{}",
            d.message
        );
    }
}

#[test]
fn two_variants_with_one_name() {
    let (at, d) = one_error(&split(&VARIANTS.replace("name: long", "name: short")));
    assert_eq!(at, "8:11", "at the second name");
    assert!(
        d.message
            .contains("two variants of this split are named `short`"),
        "{}",
        d.message
    );
    let (at, d) = one_error(&split(&VARIANTS.replace("name: long", "name: \"lo ng\"")));
    assert_eq!(at, "8:12", "inside the quotes");
    assert!(
        d.message.contains("not a valid variant name"),
        "{}",
        d.message
    );
}

#[test]
fn a_variants_template_is_checked_like_the_campaigns() {
    let (at, d) = one_error(&split(&VARIANTS.replace("autumn_sale", "autumn_sal")));
    assert_eq!(at, "10:23");
    assert!(
        d.message.contains("there is no template `autumn_sal`"),
        "{}",
        d.message
    );
    assert_eq!(d.help.as_deref(), Some("did you mean `autumn_sale`?"));
    let (at, d) = one_error(&split(&VARIANTS.replace("autumn_sale", "order_shipped")));
    assert_eq!(at, "10:23");
    assert!(d.message.contains("is a utility template"), "{}", d.message);
    let (at, d) = one_error(&split(&VARIANTS.replace(
        r#"autumn_sale, language: en_US, params: ["{{contact.name}}"]"#,
        r#"autumn_sale, language: en_US, params: ["{{name}}"]"#,
    )));
    assert_eq!(at, "10:63", "at the parameter's text");
    assert!(
        d.message.contains("means nothing in a campaign"),
        "{}",
        d.message
    );
}

#[test]
fn a_split_needs_two_variants() {
    let one: String = VARIANTS.lines().take(3).collect::<Vec<_>>().join("\n");
    let (at, d) = one_error(&split(&one));
    assert_eq!(at, "5:3");
    assert!(
        d.message
            .contains("a `split` needs at least two variants; this one has 1"),
        "{}",
        d.message
    );
}

#[test]
fn a_campaign_has_template_or_split() {
    let both = format!("{VALID}split:\n{VARIANTS}\n");
    let (at, d) = one_error(&both);
    assert!(at.starts_with("18:") || at.starts_with("19:"), "{at}");
    assert!(
        d.message.contains("`template` or `split`, not both"),
        "{}",
        d.message
    );
    let (at, d) = one_error(&with("template", ""));
    assert_eq!(at, "1:11", "at the campaign's name");
    assert!(
        d.message.contains("neither `template` nor `split`"),
        "{}",
        d.message
    );
}
