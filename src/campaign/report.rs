//! A run's report, from the store's counts: how many recipients were planned, sent to,
//! delivered, read, replied; failed by error code; skipped and deferred by reason; and what
//! the sends cost, by category. A split campaign's run has the same measures per variant
//! too, with each variant's share of the recipients. Pure: the caller reads the counts ([`Db::run_counts`],
//! [`Db::run_replied`], [`Db::run_charges`]) and the prices from the config.
//!
//! What is charged (WhatsApp's pricing): a marketing or authentication template always; a
//! utility template only outside the customer's window (inside an open window it is free);
//! a free-form message (the campaign's `in_window`) never, since it can only be sent inside
//! the window. Only sends WhatsApp accepted count.
//!
//! [`Db::run_counts`]: crate::store::Db::run_counts
//! [`Db::run_replied`]: crate::store::Db::run_replied
//! [`Db::run_charges`]: crate::store::Db::run_charges

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::CampaignPrices;
use crate::store::{ChargeCount, RecipientCount, RecipientDecision};
use crate::templates::Category;

/// A run's report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Report {
    /// The run's measures (flattened: on the wire they are the report's own fields).
    #[serde(flatten)]
    pub measures: Measures,
    pub cost: Cost,
    /// A split campaign's recipients by variant (by name; empty without a split): the
    /// same measures for each, adding up to the run's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<VariantReport>,
}

/// What a run's recipients came to: the measures of a report and of each of its variants.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Measures {
    /// Recipients in the run's snapshot.
    pub planned: i64,
    /// Not decided yet (planned, or deferred until later).
    pub pending: i64,
    /// Handed to the outbox and not yet accepted by WhatsApp.
    pub outbox: i64,
    /// Accepted by WhatsApp (delivered and read included).
    pub sent: i64,
    /// Delivered to the phone (read included).
    pub delivered: i64,
    pub read: i64,
    /// Recipients who wrote after the campaign's message.
    pub replied: i64,
    pub failed: Breakdown,
    pub skipped: Breakdown,
    /// Waiting for a later time (quiet hours, a back-off, the messaging limit).
    pub deferred: Breakdown,
    pub cancelled: i64,
}

impl Measures {
    /// Recipients decided for good (neither pending nor in the outbox): a run's progress.
    pub fn decided(&self) -> i64 {
        (self.planned - self.pending - self.outbox).max(0)
    }
}

/// One variant's part of a run: the report's measures for the recipients it was given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VariantReport {
    /// The variant's name; `None` for recipients given none (the run started before the
    /// campaign had its split).
    pub variant: Option<String>,
    /// Its part of the run's recipients: `planned / the run's planned` (0 when none).
    pub share: f64,
    /// The variant's measures (flattened, as in the run's report).
    #[serde(flatten)]
    pub measures: Measures,
}

/// A total and its parts (by error code or by reason).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Breakdown {
    pub total: i64,
    pub by: BTreeMap<String, i64>,
}

impl Breakdown {
    fn add(&mut self, key: String, count: i64) {
        self.total += count;
        *self.by.entry(key).or_default() += count;
    }
}

/// The cost estimate: charged and free sends per category, priced when the config gives a
/// price.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Cost {
    /// The prices' currency; `None` when no prices are configured.
    pub currency: Option<String>,
    pub categories: Vec<CategoryCost>,
    /// The sum of the priced categories; `None` without prices.
    pub total: Option<f64>,
}

/// One category's part of the cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CategoryCost {
    /// `marketing`, `utility`, `authentication`, or `service` (free-form messages).
    pub category: String,
    pub charged: i64,
    pub free: i64,
    /// The price of one charged message, when configured.
    pub price: Option<f64>,
    /// `charged × price`, when priced.
    pub amount: Option<f64>,
}

/// What a report is made of.
pub struct Counts<'a> {
    pub counts: &'a [RecipientCount],
    /// Recipients who replied, by variant ([`Db::run_replied`]).
    ///
    /// [`Db::run_replied`]: crate::store::Db::run_replied
    pub replied: &'a [(Option<String>, i64)],
    pub charges: &'a [ChargeCount],
    /// The campaign's category (its template's).
    pub category: Category,
    pub prices: Option<&'a CampaignPrices>,
}

/// Builds a run's report from its counts.
pub fn report(input: &Counts<'_>) -> Report {
    let replied = input.replied.iter().map(|(_, n)| n).sum();
    let measures = tally(input.counts.iter(), replied);
    Report {
        variants: variants(input, measures.planned),
        cost: cost(input.charges, input.category, input.prices),
        measures,
    }
}

/// Each variant's measures, when any recipient has a variant.
fn variants(input: &Counts<'_>, planned: i64) -> Vec<VariantReport> {
    if input.counts.iter().all(|c| c.variant.is_none()) {
        return Vec::new();
    }
    let mut names: Vec<&Option<String>> = input.counts.iter().map(|c| &c.variant).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let rows = input.counts.iter().filter(|c| c.variant == *name);
            let replied = input
                .replied
                .iter()
                .filter(|(v, _)| v == name)
                .map(|(_, n)| n)
                .sum();
            let measures = tally(rows, replied);
            VariantReport {
                variant: name.clone(),
                share: if planned > 0 {
                    measures.planned as f64 / planned as f64
                } else {
                    0.0
                },
                measures,
            }
        })
        .collect()
}

/// The measures of `rows`.
fn tally<'a>(rows: impl Iterator<Item = &'a RecipientCount>, replied: i64) -> Measures {
    let mut r = Measures {
        replied,
        ..Measures::default()
    };
    for row in rows {
        let n = row.count;
        r.planned += n;
        let reason = || row.reason.clone().unwrap_or_else(|| "unknown".into());
        match row.decision {
            RecipientDecision::Planned => r.pending += n,
            RecipientDecision::Deferred => {
                r.pending += n;
                r.deferred.add(reason(), n);
            }
            RecipientDecision::Skipped => r.skipped.add(reason(), n),
            RecipientDecision::Cancelled => r.cancelled += n,
            RecipientDecision::Failed => r.failed.add(failure_key(row), n),
            RecipientDecision::Sent => match row.message_status.as_deref() {
                Some("read") => {
                    (r.sent, r.delivered, r.read) = (r.sent + n, r.delivered + n, r.read + n)
                }
                Some("delivered") => (r.sent, r.delivered) = (r.sent + n, r.delivered + n),
                Some("sent") => r.sent += n,
                Some("failed") => r.failed.add(failure_key(row), n),
                _ => r.outbox += n,
            },
        }
    }
    r
}

/// What a failure is counted under: WhatsApp's error code, else the reason.
fn failure_key(row: &RecipientCount) -> String {
    match (row.error_code, &row.reason) {
        (Some(code), _) => code.to_string(),
        (None, Some(reason)) => reason.clone(),
        (None, None) => "unknown".into(),
    }
}

/// The cost estimate of a run's accepted sends.
pub fn cost(charges: &[ChargeCount], category: Category, prices: Option<&CampaignPrices>) -> Cost {
    let name = category_name(category);
    let (mut template, mut service) = ((0, 0), (0, 0));
    for c in charges {
        let free = !c.template || (category == Category::Utility && c.window_open);
        let part = if c.template {
            &mut template
        } else {
            &mut service
        };
        if free {
            part.1 += c.count;
        } else {
            part.0 += c.count;
        }
    }
    let price = prices.and_then(|p| match category {
        Category::Marketing => p.marketing,
        Category::Utility => p.utility,
        Category::Authentication => p.authentication,
    });
    let mut categories = vec![CategoryCost {
        category: name.into(),
        charged: template.0,
        free: template.1,
        price,
        amount: price.map(|p| p * template.0 as f64),
    }];
    if service != (0, 0) {
        categories.push(CategoryCost {
            category: "service".into(),
            charged: 0,
            free: service.1,
            price: prices.map(|_| 0.0),
            amount: prices.map(|_| 0.0),
        });
    }
    let total = prices.map(|_| categories.iter().filter_map(|c| c.amount).sum());
    Cost {
        currency: prices.map(|p| p.currency.clone()),
        categories,
        total,
    }
}

fn category_name(category: Category) -> &'static str {
    match category {
        Category::Marketing => "marketing",
        Category::Utility => "utility",
        Category::Authentication => "authentication",
    }
}

/// The class of a recipient's reason, for metrics (a label must not carry a contact's
/// zone or a count): `opted_out`, `frequency_cap`, `quiet_hours`, `backoff`,
/// `messaging_limit`, `ttl`, `template`, `window`, `cancelled`, else `other`; `none`
/// without a reason.
pub fn reason_class(reason: Option<&str>) -> &'static str {
    let Some(reason) = reason else {
        return "none";
    };
    let reason = reason.to_ascii_lowercase();
    const CLASSES: [(&str, &str); 9] = [
        ("past the run's ttl", "ttl"),
        ("opted out", "opted_out"),
        ("frequency cap", "frequency_cap"),
        ("quiet hours", "quiet_hours"),
        ("131049", "backoff"),
        ("messaging limit", "messaging_limit"),
        ("template", "template"),
        ("window", "window"),
        ("cancel", "cancelled"),
    ];
    CLASSES
        .iter()
        .find(|(needle, _)| reason.contains(needle))
        .map_or("other", |(_, class)| class)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        decision: RecipientDecision,
        reason: Option<&str>,
        status: Option<&str>,
        code: Option<i64>,
        count: i64,
    ) -> RecipientCount {
        RecipientCount {
            variant: None,
            decision,
            reason: reason.map(String::from),
            message_status: status.map(String::from),
            error_code: code,
            count,
        }
    }

    fn charge(template: bool, window_open: bool, count: i64) -> ChargeCount {
        ChargeCount {
            template,
            window_open,
            count,
        }
    }

    fn prices() -> CampaignPrices {
        CampaignPrices {
            marketing: Some(0.05),
            utility: Some(0.02),
            authentication: None,
            currency: "EUR".into(),
        }
    }

    #[test]
    fn counts_add_up_by_decision_status_code_and_reason() {
        use RecipientDecision::*;
        let counts = [
            row(Planned, None, None, None, 4),
            row(
                Deferred,
                Some("quiet hours in Europe/Berlin"),
                None,
                None,
                2,
            ),
            row(Sent, None, Some("pending"), None, 1),
            row(Sent, None, Some("sent"), None, 3),
            row(Sent, None, Some("delivered"), None, 5),
            row(Sent, None, Some("read"), None, 7),
            row(Sent, Some("refused"), Some("failed"), Some(131026), 2),
            row(Failed, Some("no such number"), None, None, 1),
            row(Skipped, Some("opted out of marketing"), None, None, 6),
            row(Cancelled, Some("cancelled by an operator"), None, None, 9),
        ];
        let r = &report(&Counts {
            counts: &counts,
            replied: &[(None, 3)],
            charges: &[],
            category: Category::Marketing,
            prices: None,
        })
        .measures;
        assert_eq!(r.planned, 40);
        assert_eq!((r.pending, r.outbox), (6, 1));
        assert_eq!((r.sent, r.delivered, r.read, r.replied), (15, 12, 7, 3));
        assert_eq!(r.failed.total, 3);
        assert_eq!(r.failed.by["131026"], 2);
        assert_eq!(r.failed.by["no such number"], 1);
        assert_eq!(r.skipped.by["opted out of marketing"], 6);
        assert_eq!(r.deferred.total, 2);
        assert_eq!(r.cancelled, 9);
    }

    #[test]
    fn a_split_runs_report_has_each_variants_measures_adding_up_to_the_run() {
        use RecipientDecision::*;
        let of = |variant: &str, row: RecipientCount| RecipientCount {
            variant: Some(variant.into()),
            ..row
        };
        let counts = [
            of("long", row(Sent, None, Some("read"), None, 2)),
            of("long", row(Skipped, Some("opted out"), None, None, 1)),
            of("short", row(Planned, None, None, None, 1)),
            of("short", row(Sent, None, Some("delivered"), None, 4)),
            of("short", row(Sent, None, Some("failed"), Some(131026), 2)),
        ];
        let replied = [
            (Some("long".to_string()), 1),
            (Some("short".to_string()), 3),
        ];
        let r = report(&Counts {
            counts: &counts,
            replied: &replied,
            charges: &[],
            category: Category::Marketing,
            prices: None,
        });
        let run = &r.measures;
        assert_eq!(
            (run.planned, run.sent, run.replied, run.failed.total),
            (10, 6, 4, 2)
        );
        let names: Vec<_> = r.variants.iter().map(|v| v.variant.as_deref()).collect();
        assert_eq!(names, [Some("long"), Some("short")]);
        let (long, short) = (&r.variants[0], &r.variants[1]);
        assert!((long.share - 0.3).abs() < 1e-9 && (short.share - 0.7).abs() < 1e-9);
        let (long, short) = (&long.measures, &short.measures);
        assert_eq!(
            (long.planned, long.sent, long.read, long.replied),
            (3, 2, 2, 1)
        );
        assert_eq!(long.skipped.by["opted out"], 1);
        assert_eq!((short.planned, short.pending, short.sent), (7, 1, 4));
        assert_eq!((short.delivered, short.replied), (4, 3));
        assert_eq!(short.failed.by["131026"], 2);
        let sum = |f: fn(&Measures) -> i64| r.variants.iter().map(|v| f(&v.measures)).sum::<i64>();
        assert_eq!(sum(|m| m.planned), run.planned);
        assert_eq!(sum(|m| m.sent), run.sent);
        assert_eq!(sum(|m| m.replied), run.replied);
        // Without a split, no variant rows.
        let plain = report(&Counts {
            counts: &[row(Sent, None, Some("sent"), None, 1)],
            replied: &[],
            charges: &[],
            category: Category::Marketing,
            prices: None,
        });
        assert!(plain.variants.is_empty());
    }

    #[test]
    fn the_measures_are_the_reports_own_fields_on_the_wire() {
        let measures = |planned| Measures {
            planned,
            ..Measures::default()
        };
        let report = Report {
            measures: measures(2),
            variants: vec![VariantReport {
                variant: Some("short".into()),
                share: 0.5,
                measures: measures(1),
            }],
            ..Report::default()
        };
        let zero = r#""total":0,"by":{}"#;
        let rest = format!(
            r#""pending":0,"outbox":0,"sent":0,"delivered":0,"read":0,"replied":0,"failed":{{{zero}}},"skipped":{{{zero}}},"deferred":{{{zero}}},"cancelled":0"#
        );
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(
            json,
            format!(
                r#"{{"planned":2,{rest},"cost":{{"currency":null,"categories":[],"total":null}},"variants":[{{"variant":"short","share":0.5,"planned":1,{rest}}}]}}"#
            )
        );
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), report);
    }

    #[test]
    fn marketing_is_always_charged_and_in_window_messages_are_free() {
        let charges = [
            charge(true, false, 10),
            charge(true, true, 4),
            charge(false, true, 6),
        ];
        let priced = cost(&charges, Category::Marketing, Some(&prices()));
        assert_eq!(priced.currency.as_deref(), Some("EUR"));
        assert_eq!(priced.categories[0].category, "marketing");
        assert_eq!(
            (priced.categories[0].charged, priced.categories[0].free),
            (14, 0)
        );
        assert_eq!(priced.categories[1].category, "service");
        assert_eq!(
            (priced.categories[1].charged, priced.categories[1].free),
            (0, 6)
        );
        let total = priced.total.unwrap();
        assert!((total - 0.7).abs() < 1e-9, "{total}");

        let counted = cost(&charges, Category::Marketing, None);
        assert_eq!(counted.currency, None);
        assert_eq!(counted.total, None);
        assert_eq!(counted.categories[0].charged, 14);
        assert_eq!(counted.categories[0].amount, None);
    }

    #[test]
    fn utility_templates_inside_an_open_window_are_free() {
        let charges = [charge(true, false, 3), charge(true, true, 5)];
        let c = cost(&charges, Category::Utility, Some(&prices()));
        assert_eq!((c.categories[0].charged, c.categories[0].free), (3, 5));
        assert!((c.total.unwrap() - 0.06).abs() < 1e-9);
        assert_eq!(c.categories.len(), 1, "no free-form sends, no service row");
        // A category without a price is counted, not priced.
        let auth = cost(&charges, Category::Authentication, Some(&prices()));
        assert_eq!(auth.categories[0].charged, 8);
        assert_eq!(auth.categories[0].amount, None);
        assert_eq!(auth.total, Some(0.0));
    }

    #[test]
    fn reasons_fall_into_classes() {
        assert_eq!(
            reason_class(Some("opted out of marketing (STOP)")),
            "opted_out"
        );
        assert_eq!(
            reason_class(Some("quiet hours in Asia/Tokyo, past the run's ttl")),
            "ttl"
        );
        assert_eq!(
            reason_class(Some("WhatsApp asked to wait after 131049")),
            "backoff"
        );
        assert_eq!(reason_class(Some("something new")), "other");
        assert_eq!(reason_class(None), "none");
    }
}
