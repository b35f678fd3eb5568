//! The campaign file exactly as written: serde shapes with locations, before any checking.
//!
//! `deny_unknown_fields` everywhere, so a misspelt key is an error at its location (with a
//! "did you mean"); `compile` checks everything else. The template call and the `in_window`
//! message's parts are the flows' own shapes, so they read exactly as in a flow.

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::flow::raw::{RawButton, RawList, RawMedia, RawStep, RawTemplateRef};
use crate::templates::Category;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCampaign {
    /// The campaign's name: unique in the project.
    pub campaign: Spanned<String>,
    #[serde(default)]
    pub channel: Option<Spanned<String>>,
    pub category: Spanned<Category>,
    /// The one template every recipient gets; a campaign has this or `split`.
    #[serde(default)]
    pub template: Option<Spanned<RawTemplateRef>>,
    /// An A/B split: each recipient gets one variant's template (and `in_window` message).
    #[serde(default)]
    pub split: Option<Spanned<Vec<Spanned<RawVariant>>>>,
    /// The free-form message for open windows; a variant's own `in_window` replaces it.
    #[serde(default)]
    pub in_window: Option<Spanned<RawInWindow>>,
    pub audience: Spanned<RawAudience>,
    /// A 5-field cron expression in `timezone`.
    #[serde(default)]
    pub schedule: Option<Spanned<String>>,
    /// A local date-time in `timezone`: `2026-12-01T10:00:00`.
    #[serde(default)]
    pub at: Option<Spanned<String>>,
    #[serde(default)]
    pub timezone: Option<Spanned<String>>,
    #[serde(default)]
    pub quiet_hours: Option<Spanned<RawQuietHours>>,
    /// `20/s`, `600/m`, `5000/h`.
    #[serde(default)]
    pub rate: Option<Spanned<String>>,
    #[serde(default)]
    pub on_reply: Option<Spanned<String>>,
    #[serde(default)]
    pub frequency_cap: Option<Spanned<RawFrequencyCap>>,
    #[serde(default)]
    pub ttl: Option<Spanned<String>>,
}

/// One variant of a campaign's `split`: `{ name: short, weight: 50, template: {…} }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVariant {
    /// Unique in the campaign: what the ledger and the report call it.
    pub name: Spanned<String>,
    /// A whole number above zero; recipients are spread in proportion to the weights.
    pub weight: Spanned<f64>,
    pub template: Spanned<RawTemplateRef>,
    #[serde(default)]
    pub in_window: Option<Spanned<RawInWindow>>,
}

/// The free-form message sent instead of the template when the recipient's window is open:
/// a `say` step's message keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInWindow {
    pub say: Spanned<String>,
    #[serde(default)]
    pub buttons: Option<Spanned<Vec<Spanned<RawButton>>>>,
    #[serde(default)]
    pub list: Option<Spanned<RawList>>,
    #[serde(default)]
    pub media: Option<Spanned<RawMedia>>,
}

impl RawInWindow {
    /// The message as a flow step, for the flows' message compiler.
    pub fn into_step(self) -> RawStep {
        RawStep {
            say: Some(self.say),
            buttons: self.buttons,
            list: self.list,
            media: self.media,
            ..RawStep::default()
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudience {
    #[serde(default)]
    pub tags: Vec<Spanned<String>>,
    /// A Rhai condition over `contact.*`.
    #[serde(default, rename = "where")]
    pub condition: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuietHours {
    pub from: Spanned<String>,
    pub to: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFrequencyCap {
    pub max: Spanned<u32>,
    pub per: Spanned<String>,
}
