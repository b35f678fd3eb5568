//! Campaigns: business-initiated sends to an audience of contacts, on a schedule, within
//! WhatsApp's rules. This module owns their definitions, compiled once at load into the form
//! the scheduler and the dispatcher use; it does no I/O.
//!
//! - [`raw`]: the campaign file as written, with locations;
//! - [`schedule`]: when a campaign runs (cron or `at` in its zone, each local time once
//!   across DST), quiet hours in the recipient's zone, and which due runs start or are
//!   missed;
//! - [`compile`]: one file into a [`Campaign`] (template checked against the registry and the
//!   campaign's category, parameters and `in_window` compiled by the flows' compiler, the
//!   audience's `where` by the Rhai sandbox, cron, time zone, times and rates parsed), and the
//!   checks across campaigns (names, channels, `on_reply` flows).
//!
//! Files live in the `campaigns/` directory beside the flows and load through the one loader
//! (`flow::load::load_project`), so `check` reports their problems and a project with an
//! error in a campaign does not start.

pub mod compile;
pub mod raw;
pub mod recipient;
pub mod report;
pub mod schedule;

pub use schedule::{QuietHours, Schedule};

use std::sync::Arc;

use chrono::{Duration, NaiveDateTime};
use chrono_tz::Tz;

use crate::diagnostic::Loc;
use crate::flow::{Expr, Message, TemplateCall, split_branch};
use crate::templates::Category;

/// How long a run keeps starting sends when the file names no `ttl`.
pub const DEFAULT_TTL: Duration = Duration::hours(24);

/// The frequency cap of a marketing campaign that names none: one marketing message per
/// contact per 24 hours (WhatsApp itself limits how many marketing messages a person gets
/// and answers 131049 past it; one a day keeps well clear).
pub const DEFAULT_MARKETING_CAP: FrequencyCap = FrequencyCap {
    max: 1,
    per: Duration::hours(24),
};

/// A compiled campaign.
#[derive(Debug)]
pub struct Campaign {
    pub name: String,
    /// The file it was written in, and where its name is.
    pub file: String,
    pub loc: Loc,
    /// The file's text, as the store keeps it with the campaign.
    pub source: Arc<str>,
    /// The channel it sends from (the config's first channel when the file names none).
    pub channel: String,
    /// What the business says the campaign is; its template has this category.
    pub category: Category,
    /// What recipients are sent: one unnamed variant (the file's `template:`), or a
    /// split's named variants (`split:`), one per recipient ([`Campaign::variant_for`]).
    pub variants: Vec<Variant>,
    /// The free-form message sent instead to recipients whose window is open, for the
    /// variants without one of their own.
    pub in_window: Option<Message>,
    pub audience: Audience,
    pub when: When,
    /// The zone of `when` and of `quiet_hours` for recipients whose own zone is unknown.
    pub timezone: Tz,
    pub quiet_hours: Option<QuietHours>,
    /// The campaign's own pace; `None` is the channel's throughput.
    pub rate: Option<Rate>,
    /// The flow that answers recipients who reply.
    pub on_reply: Option<String>,
    /// `None`: no cap (utility and authentication campaigns that name none).
    pub frequency_cap: Option<FrequencyCap>,
    /// How long after its start a run keeps starting sends.
    pub ttl: Duration,
}

/// One message a campaign sends: its template and, optionally, its own `in_window` message.
#[derive(Debug)]
pub struct Variant {
    /// The split's name for it; `None` for a campaign without `split:`.
    pub name: Option<String>,
    /// Its share of recipients, against the other variants' weights (1 when alone).
    pub weight: u32,
    /// The template sent to recipients whose window is closed; its parameters interpolate
    /// `{{contact.name}}`, `{{contact.wa_id}}` and `{{contact.attrs.KEY}}`.
    pub template: TemplateCall,
    /// This variant's own `in_window` message; `None`: the campaign's.
    pub in_window: Option<Message>,
}

impl Campaign {
    /// The variant contact `wa_id` gets: the same every run of this campaign, on every
    /// machine (the flows' split hash, [`split_branch`], keyed by the campaign's name), and
    /// independent of other campaigns' splits. A campaign without `split:` has one.
    pub fn variant_for(&self, wa_id: &str) -> &Variant {
        &self.variants[self.variant_index(wa_id)]
    }

    /// The index in `variants` of [`Campaign::variant_for`]'s variant.
    pub fn variant_index(&self, wa_id: &str) -> usize {
        if self.variants.len() == 1 {
            return 0;
        }
        let weights: Vec<f64> = self.variants.iter().map(|v| f64::from(v.weight)).collect();
        // `:` is in no flow id, so the key is never a flow split's.
        let key = format!("campaign:{}", self.name);
        split_branch(wa_id, &key, "split", &weights)
    }

    /// Whether the campaign splits its recipients between named variants.
    pub fn is_split(&self) -> bool {
        self.variants.iter().any(|v| v.name.is_some())
    }

    /// The free-form message `variant` sends while the window is open, if any.
    pub fn in_window_of<'a>(&'a self, variant: &'a Variant) -> Option<&'a Message> {
        variant.in_window.as_ref().or(self.in_window.as_ref())
    }

    /// Every free-form message the campaign may send (the project files they name are
    /// checked at load).
    pub fn in_window_messages(&self) -> impl Iterator<Item = &Message> {
        self.in_window
            .iter()
            .chain(self.variants.iter().filter_map(|v| v.in_window.as_ref()))
    }

    /// When it runs, as the scheduler computes it (each local time once across DST).
    pub fn schedule(&self) -> Schedule {
        match &self.when {
            When::Cron { cron, .. } => Schedule::cron((**cron).clone(), self.timezone),
            When::At(at) => Schedule::at(*at, self.timezone),
        }
    }
}

/// What in a campaign's text decides when it runs (`schedule`, `at`, `timezone`, as
/// written): two sources with the same key have the same run times, so a changed campaign
/// keeps its persisted `next_run_at` unless this changed. `None` when `source` does not parse.
pub fn schedule_key(source: &str) -> Option<String> {
    let raw: raw::RawCampaign = crate::yaml::parse("campaign", source).ok()?;
    let text = |v: &Option<serde_saphyr::Spanned<String>>| {
        v.as_ref()
            .map(|v| v.value.trim().to_string())
            .unwrap_or_default()
    };
    Some(format!(
        "schedule={}\nat={}\ntimezone={}",
        text(&raw.schedule),
        text(&raw.at),
        text(&raw.timezone)
    ))
}

/// Who a campaign is sent to: contacts with every one of `tags` for whom `filter` is true.
#[derive(Debug)]
pub struct Audience {
    pub tags: Vec<String>,
    /// The `where` condition, a Rhai expression over `contact.*`.
    pub filter: Option<Expr>,
}

/// When a campaign runs.
#[derive(Debug, Clone)]
pub enum When {
    /// Every time the cron expression matches, in the campaign's time zone. `source` is the
    /// expression as written.
    Cron {
        cron: Box<croner::Cron>,
        source: String,
    },
    /// Once, at this local date-time in the campaign's time zone.
    At(NaiveDateTime),
}

/// At most `count` sends per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    /// Sends per second, for comparison with a channel's throughput.
    pub fn per_second(&self) -> f64 {
        f64::from(self.count) / self.per.num_milliseconds() as f64 * 1000.0
    }
}

/// At most `max` messages of the campaign's category per contact in any `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrequencyCap {
    pub max: u32,
    pub per: Duration,
}

#[cfg(test)]
mod tests {
    use super::schedule_key;

    const BASE: &str = "campaign: sale\ncategory: marketing\n\
        template: { name: spring_sale, language: en_US }\naudience: { tags: [a] }\n";

    #[test]
    fn the_schedule_key_changes_with_the_schedule_only() {
        let weekly = format!("{BASE}schedule: \"0 10 * * MON\"\ntimezone: Europe/Berlin\n");
        let retagged = weekly.replace("tags: [a]", "tags: [b]");
        let moved = weekly.replace("0 10", "0 11");
        let rezoned = weekly.replace("Europe/Berlin", "Europe/Paris");
        let key = schedule_key(&weekly).unwrap();
        assert_eq!(schedule_key(&retagged).unwrap(), key);
        assert_ne!(schedule_key(&moved).unwrap(), key);
        assert_ne!(schedule_key(&rezoned).unwrap(), key);
        assert_eq!(schedule_key("campaign: [unclosed"), None);
    }
}
