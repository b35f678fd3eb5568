//! The campaign's own rules for one recipient of a run, taken before the message is decided
//! by the policy (which still decides every message: the window, the template's status,
//! consent for marketing templates).
//!
//! In order, the first that applies wins:
//! 1. a marketing campaign to a contact who opted out of marketing → skipped (the policy
//!    would skip the template, but not the free-form `in_window` message: a campaign's
//!    marketing is marketing in either form);
//! 2. the frequency cap reached (the caller counts the contact's messages of the campaign's
//!    category in the cap's period) → skipped;
//! 3. a marketing campaign while WhatsApp's `131049` back-off holds for the contact →
//!    deferred to its end, not skipped;
//! 4. quiet hours by the recipient's clock (their zone, else the campaign's) → deferred to
//!    their end;
//!
//! and a deferral that would end at or after the run's ttl is a skip (the run starts no
//! sends after it), with the reason it was deferred.
//!
//! Pure: no I/O, time is an argument.

use chrono::{DateTime, Utc};

use super::Campaign;
use super::schedule::recipient_zone;
use crate::domain::Contact;
use crate::templates::Category;

/// What the campaign's rules say about one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Decide the message now, through the policy.
    Decide,
    /// Not now: take the recipient again at `until`.
    Defer {
        until: DateTime<Utc>,
        reason: String,
    },
    /// Not in this run.
    Skip { reason: String },
}

/// The campaign's rules for `contact` at `now`: `capped_sends` is how many messages of the
/// campaign's category the contact got in the frequency cap's period up to `now`, and
/// `run_ends` the run's `scheduled_for + ttl`.
pub fn gate(
    campaign: &Campaign,
    contact: &Contact,
    capped_sends: u32,
    run_ends: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Gate {
    let marketing = campaign.category == Category::Marketing;
    if let (true, Some(out)) = (marketing, &contact.policy.marketing_opt_out) {
        return Gate::Skip {
            reason: format!(
                "opted out of marketing ({}, {})",
                out.source,
                out.at.format("%Y-%m-%d %H:%M UTC")
            ),
        };
    }
    if let Some(cap) = campaign.frequency_cap.filter(|cap| capped_sends >= cap.max) {
        return Gate::Skip {
            reason: format!(
                "frequency cap: {capped_sends} {} message(s) in the last {} h (at most {})",
                category_name(campaign.category),
                cap.per.num_hours(),
                cap.max
            ),
        };
    }
    let paused = contact.policy.marketing_paused_until.filter(|u| now < *u);
    if let (true, Some(until)) = (marketing, paused) {
        let reason = "WhatsApp asked to wait after 131049".to_string();
        return defer(until, reason, run_ends);
    }
    let zone = recipient_zone(contact.timezone.as_deref(), campaign.timezone);
    let quiet_end = campaign
        .quiet_hours
        .as_ref()
        .and_then(|q| q.end_after(now, zone));
    if let Some(until) = quiet_end {
        return defer(until, format!("quiet hours in {zone}"), run_ends);
    }
    Gate::Decide
}

/// The category as campaign files write it (and campaign messages' origin records it).
pub fn category_name(category: Category) -> &'static str {
    match category {
        Category::Marketing => "marketing",
        Category::Utility => "utility",
        Category::Authentication => "authentication",
    }
}

/// Deferred to `until`, or skipped when that is past the run's end (for the dispatcher's
/// own deferrals too: the messaging limit).
pub fn defer(until: DateTime<Utc>, reason: String, run_ends: DateTime<Utc>) -> Gate {
    if until >= run_ends {
        Gate::Skip {
            reason: format!("{reason}, past the run's ttl"),
        }
    } else {
        Gate::Defer { until, reason }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, TimeZone};

    use super::*;
    use crate::campaign::compile::{Env, compile_campaign};
    use crate::config::ChannelConfig;
    use crate::domain::OptOut;
    use crate::script::Scripting;
    use crate::templates::{Registry, Status, Template};

    fn campaign(category: &str, extra: &str) -> Campaign {
        let registry = Registry {
            templates: vec![Template {
                name: "offer".into(),
                language: "en_US".into(),
                category: if category == "marketing" {
                    Category::Marketing
                } else {
                    Category::Utility
                },
                status: Status::Approved,
                header: None,
                body: "Hi!".into(),
                footer: None,
                buttons: Vec::new(),
            }],
            written_at: None,
        };
        let text = format!(
            "campaign: c\ncategory: {category}\ntemplate: {{ name: offer, language: en_US }}\n\
             audience: {{ where: 'true' }}\nat: 2026-01-05T10:00:00\ntimezone: Europe/Berlin\n\
             quiet_hours: {{ from: \"21:00\", to: \"09:00\" }}\n{extra}"
        );
        let (scripting, channels) = (Scripting::default(), vec![ChannelConfig::sandbox("s")]);
        let env = Env {
            scripting: &scripting,
            templates: &registry,
            channels: &channels,
        };
        let compiled = compile_campaign("c.yaml", &text, &env);
        compiled
            .campaign
            .unwrap_or_else(|| panic!("{:?}", compiled.diagnostics))
    }

    fn utc(d: u32, h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, d, h, m, 0).unwrap()
    }

    const END: fn() -> DateTime<Utc> = || utc(6, 9, 0);

    #[test]
    fn quiet_hours_defer_to_their_end_by_the_recipients_clock_across_midnight() {
        let c = campaign("marketing", "");
        let mut tokyo = Contact::new("81");
        tokyo.timezone = Some("Asia/Tokyo".into());
        // 13:00 UTC is 22:00 in Tokyo (quiet until 09:00 JST, 00:00 UTC), 14:00 in Berlin.
        let at = utc(5, 13, 0);
        assert_eq!(
            gate(&c, &tokyo, 0, END(), at),
            Gate::Defer {
                until: utc(6, 0, 0),
                reason: "quiet hours in Asia/Tokyo".into()
            }
        );
        assert_eq!(gate(&c, &Contact::new("49"), 0, END(), at), Gate::Decide);
        // 22:30 Berlin (the campaign's zone, for a contact with none): until 09:00 CET.
        let late = gate(&c, &Contact::new("49"), 0, utc(7, 0, 0), utc(5, 21, 30));
        assert_eq!(
            late,
            Gate::Defer {
                until: utc(6, 8, 0),
                reason: "quiet hours in Europe/Berlin".into()
            }
        );
    }

    #[test]
    fn a_deferral_past_the_runs_ttl_is_a_skip() {
        let c = campaign("marketing", "");
        let gate = gate(&c, &Contact::new("49"), 0, utc(6, 7, 0), utc(5, 21, 30));
        assert_eq!(
            gate,
            Gate::Skip {
                reason: "quiet hours in Europe/Berlin, past the run's ttl".into()
            }
        );
    }

    #[test]
    fn the_frequency_cap_skips_and_only_when_reached() {
        let c = campaign("marketing", "frequency_cap: { max: 2, per: 24h }\n");
        let at = utc(5, 12, 0);
        assert_eq!(gate(&c, &Contact::new("49"), 1, END(), at), Gate::Decide);
        let Gate::Skip { reason } = gate(&c, &Contact::new("49"), 2, END(), at) else {
            panic!("not skipped")
        };
        assert!(reason.starts_with("frequency cap: 2 marketing"), "{reason}");
        // A utility campaign names no cap: none.
        let utility = campaign("utility", "");
        assert_eq!(
            gate(&utility, &Contact::new("49"), 50, END(), at),
            Gate::Decide
        );
    }

    #[test]
    fn a_131049_back_off_defers_marketing_past_it_and_an_opt_out_skips_it() {
        let c = campaign("marketing", "");
        let at = utc(5, 12, 0);
        let mut paused = Contact::new("49");
        paused.policy.marketing_paused_until = Some(at + Duration::hours(3));
        assert_eq!(
            gate(&c, &paused, 0, END(), at),
            Gate::Defer {
                until: at + Duration::hours(3),
                reason: "WhatsApp asked to wait after 131049".into()
            }
        );
        assert_eq!(
            gate(&c, &paused, 0, END(), at + Duration::hours(3)),
            Gate::Decide
        );
        let mut out = paused.clone();
        out.policy.marketing_opt_out = Some(OptOut {
            source: "STOP".into(),
            at,
        });
        let Gate::Skip { reason } = gate(&c, &out, 0, END(), at) else {
            panic!("not skipped")
        };
        assert!(
            reason.starts_with("opted out of marketing (STOP"),
            "{reason}"
        );
        // Neither holds back a utility campaign.
        assert_eq!(
            gate(&campaign("utility", ""), &out, 0, END(), at),
            Gate::Decide
        );
    }
}
