//! Process metrics in Prometheus text format, for `GET /metrics`.
//!
//! A small registry of labelled counters and histograms behind one global, so any module can
//! count without threading a handle through every call. Gauges that live in the database
//! (outbox depth) are read at scrape time by the caller and passed to [`render`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};

/// Latency buckets in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

type Labels = Vec<(&'static str, String)>;

/// A gauge read at scrape time: `(name, help, labels, value)`.
pub type Gauge<'a> = (&'a str, &'a str, Labels, f64);

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

#[derive(Default)]
struct Registry {
    counters: BTreeMap<(&'static str, Labels), u64>,
    histograms: BTreeMap<(&'static str, Labels), Histogram>,
    help: BTreeMap<&'static str, &'static str>,
}

fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

/// The series `name{pairs}` of `map`, added if new. Found without building its key (no
/// allocation on the hot path): a name's series are adjacent in the map, from the one
/// with no labels.
fn series<'a, T: Default>(
    map: &'a mut BTreeMap<(&'static str, Labels), T>,
    name: &'static str,
    pairs: &[(&'static str, &str)],
) -> &'a mut T {
    let same = |l: &Labels| {
        l.len() == pairs.len()
            && l.iter()
                .zip(pairs)
                .all(|((k, v), (pk, pv))| k == pk && v == pv)
    };
    let from = (name, Labels::new());
    let known = map
        .range(&from..)
        .take_while(|((n, _), _)| *n == name)
        .any(|((_, l), _)| same(l));
    if !known {
        map.insert((name, labels(pairs)), T::default());
    }
    map.range_mut(&from..)
        .take_while(|((n, _), _)| *n == name)
        .find(|((_, l), _)| same(l))
        .map(|(_, value)| value)
        .expect("the series was just added")
}

/// Adds `by` to the counter `name{labels}`.
pub fn count(name: &'static str, help: &'static str, pairs: &[(&'static str, &str)], by: u64) {
    let mut r = registry().lock().expect("metrics lock");
    r.help.entry(name).or_insert(help);
    *series(&mut r.counters, name, pairs) += by;
}

/// Records one observation (in seconds) in the histogram `name{labels}`.
pub fn observe(
    name: &'static str,
    help: &'static str,
    pairs: &[(&'static str, &str)],
    seconds: f64,
) {
    let mut r = registry().lock().expect("metrics lock");
    r.help.entry(name).or_insert(help);
    let h = series(&mut r.histograms, name, pairs);
    for (i, le) in BUCKETS.iter().enumerate() {
        if seconds <= *le {
            h.counts[i] += 1;
        }
    }
    h.sum += seconds;
    h.count += 1;
}

/// Records how long one stage of a reply's path took (`flowgate_stage_seconds{stage}`):
/// `inbox_wait` (stored until a worker takes the row), `turn` (a customer message's row
/// processed: flows, policy, commit), `commit` (its one write), `outbox_claim` (a sender's
/// claim). The webhook's acknowledgement and the send have their own histograms
/// (`flowgate_webhook_ack_seconds`, `flowgate_send_seconds`).
pub fn observe_stage(stage: &'static str, seconds: f64) {
    observe(
        "flowgate_stage_seconds",
        "Time spent in each stage of a reply's path, by stage.",
        &[("stage", stage)],
        seconds,
    );
}

const CAMPAIGN_RECIPIENTS: &str = "flowgate_campaign_recipients_total";
const CAMPAIGN_RECIPIENTS_HELP: &str =
    "Campaign recipients decided, by campaign, decision and reason class.";
const CAMPAIGN_SENDS: &str = "flowgate_campaign_sends_total";
const CAMPAIGN_SENDS_HELP: &str = "Campaign messages handed to the outbox, by campaign.";

/// Counts one campaign recipient's decision as the ledger records it (`sent` also counts a
/// send of the campaign). The reason is reduced to its class
/// ([`crate::campaign::report::reason_class`]): a label must not carry a zone or a count.
/// A split campaign's recipients carry their `variant` too: the variants are the few the
/// campaign's file names, so the label multiplies a campaign's series by that few; a
/// campaign without a split has no `variant` label, as before splits.
pub fn count_campaign_recipient(
    campaign: &str,
    variant: Option<&str>,
    decision: &str,
    reason: Option<&str>,
) {
    let class = crate::campaign::report::reason_class(reason);
    let mut pairs = vec![
        ("campaign", campaign),
        ("decision", decision),
        ("reason", class),
    ];
    pairs.extend(variant.map(|v| ("variant", v)));
    count(CAMPAIGN_RECIPIENTS, CAMPAIGN_RECIPIENTS_HELP, &pairs, 1);
    if decision == "sent" {
        count(
            CAMPAIGN_SENDS,
            CAMPAIGN_SENDS_HELP,
            &[("campaign", campaign)],
            1,
        );
    }
}

/// The value of a counter, for tests.
pub fn counter_value(name: &str, pairs: &[(&'static str, &str)]) -> u64 {
    let r = registry().lock().expect("metrics lock");
    r.counters
        .iter()
        .find(|((n, l), _)| *n == name && *l == labels(pairs))
        .map(|(_, v)| *v)
        .unwrap_or(0)
}

fn label_text(labels: &Labels, extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

/// Everything in Prometheus text format; `gauges` are `(name, help, labels, value)` read by
/// the caller at scrape time.
pub fn render(gauges: &[Gauge<'_>]) -> String {
    let r = registry().lock().expect("metrics lock");
    let mut out = String::new();
    let mut last = "";
    for ((name, l), value) in &r.counters {
        if *name != last {
            let _ = writeln!(out, "# HELP {name} {}", r.help.get(name).unwrap_or(&""));
            let _ = writeln!(out, "# TYPE {name} counter");
            last = name;
        }
        let _ = writeln!(out, "{name}{} {value}", label_text(l, None));
    }
    last = "";
    for ((name, l), h) in &r.histograms {
        if *name != last {
            let _ = writeln!(out, "# HELP {name} {}", r.help.get(name).unwrap_or(&""));
            let _ = writeln!(out, "# TYPE {name} histogram");
            last = name;
        }
        for (i, le) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{} {}",
                label_text(l, Some(("le", le.to_string()))),
                h.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{} {}",
            label_text(l, Some(("le", "+Inf".into()))),
            h.count
        );
        let _ = writeln!(out, "{name}_sum{} {}", label_text(l, None), h.sum);
        let _ = writeln!(out, "{name}_count{} {}", label_text(l, None), h.count);
    }
    last = "";
    for (name, help, l, value) in gauges {
        if *name != last {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            last = name;
        }
        let _ = writeln!(out, "{name}{} {value}", label_text(l, None));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        count(
            "flowgate_test_total",
            "A test counter.",
            &[("type", "text")],
            2,
        );
        observe("flowgate_test_seconds", "A test histogram.", &[], 0.003);
        let text = render(&[(
            "flowgate_test_depth",
            "A gauge.",
            vec![("channel", "main".into())],
            7.0,
        )]);
        assert!(text.contains("# TYPE flowgate_test_total counter"));
        assert!(text.contains("flowgate_test_total{type=\"text\"} 2"));
        assert!(text.contains("flowgate_test_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("flowgate_test_seconds_count 1"));
        assert!(text.contains("flowgate_test_depth{channel=\"main\"} 7"));
        assert_eq!(counter_value("flowgate_test_total", &[("type", "text")]), 2);
    }

    #[test]
    fn series_of_one_name_are_kept_apart_and_rendered_in_order() {
        const NAME: &str = "flowgate_test_series_total";
        for kind in ["b", "a", "b", "b"] {
            count(NAME, "Series.", &[("kind", kind)], 1);
        }
        count(NAME, "Series.", &[], 5);
        count(NAME, "Series.", &[("kind", "a"), ("other", "x")], 1);
        assert_eq!(counter_value(NAME, &[("kind", "b")]), 3);
        assert_eq!(counter_value(NAME, &[("kind", "a")]), 1);
        assert_eq!(counter_value(NAME, &[]), 5);
        assert_eq!(counter_value(NAME, &[("kind", "a"), ("other", "x")]), 1);
        // A name that begins another's is another series.
        count(
            "flowgate_test_series_total_more",
            "More.",
            &[("kind", "b")],
            7,
        );
        assert_eq!(counter_value(NAME, &[("kind", "b")]), 3);
        let text = render(&[]);
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(NAME)).collect();
        assert_eq!(
            lines,
            [
                "flowgate_test_series_total 5",
                "flowgate_test_series_total{kind=\"a\"} 1",
                "flowgate_test_series_total{kind=\"a\",other=\"x\"} 1",
                "flowgate_test_series_total{kind=\"b\"} 3",
                "flowgate_test_series_total_more{kind=\"b\"} 7",
            ]
        );
    }

    #[test]
    fn a_campaign_recipient_counts_by_reason_class_and_a_send_by_campaign() {
        count_campaign_recipient(
            "metrics_test",
            None,
            "skipped",
            Some("opted out of marketing (STOP)"),
        );
        count_campaign_recipient("metrics_test", None, "sent", None);
        count_campaign_recipient("metrics_test", Some("long"), "sent", None);
        let long = [
            ("campaign", "metrics_test"),
            ("decision", "sent"),
            ("reason", "none"),
            ("variant", "long"),
        ];
        assert_eq!(counter_value(CAMPAIGN_RECIPIENTS, &long), 1);
        let skipped = [
            ("campaign", "metrics_test"),
            ("decision", "skipped"),
            ("reason", "opted_out"),
        ];
        assert_eq!(counter_value(CAMPAIGN_RECIPIENTS, &skipped), 1);
        assert_eq!(
            counter_value(CAMPAIGN_SENDS, &[("campaign", "metrics_test")]),
            2
        );
    }
}
