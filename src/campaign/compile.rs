//! One campaign file into a [`Campaign`], and the checks across campaigns. Problems become
//! diagnostics at the key or value involved; a campaign with errors is not returned.
//!
//! The template call, its parameters, the `in_window` message and the audience's `where`
//! go through the flows' compiler ([`Fragments`]), so interpolation, Rhai and WhatsApp's
//! limits are checked and reported exactly as in a flow. A `split:`'s variants each go
//! through the same template and `in_window` checks as `template:`. What is the campaign's
//! own: the template's status and category, the split's variants (two or more, unique
//! names, whole positive weights), the cron (`croner`, 5 fields), the time zone
//! (`chrono-tz`), times, rates, the frequency cap and `ttl`.

use std::sync::Arc;

use chrono::{LocalResult, NaiveDateTime, NaiveTime, TimeZone};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use serde_saphyr::Spanned;

use super::raw::{
    RawAudience, RawCampaign, RawFrequencyCap, RawInWindow, RawQuietHours, RawVariant,
};
use super::{
    Audience, Campaign, DEFAULT_MARKETING_CAP, DEFAULT_TTL, FrequencyCap, QuietHours, Rate,
    Variant, When,
};
use crate::config::ChannelConfig;
use crate::diagnostic::{Diagnostic, Diagnostics, Loc, did_you_mean};
use crate::flow::compile::{Fragments, valid_name};
use crate::flow::lint::Entry;
use crate::flow::raw::RawTemplateRef;
use crate::flow::{Message, TemplateCall, Text};
use crate::script::Scripting;
use crate::templates::{Category, Registry, Status};
use crate::yaml::{self, loc};

/// What a campaign is checked against besides its own file.
pub struct Env<'a> {
    pub scripting: &'a Scripting,
    pub templates: &'a Registry,
    /// The config's channels; the first is the default.
    pub channels: &'a [ChannelConfig],
}

/// What compiling one file produced.
#[derive(Debug, Default)]
pub struct Compiled {
    pub campaign: Option<Campaign>,
    /// The campaign's name and where it is, even when the campaign has errors.
    pub name: Option<(String, Loc)>,
    /// The `on_reply` flow and where it is named, checked once the flows are known.
    pub on_reply: Option<(String, Loc)>,
    pub diagnostics: Diagnostics,
}

/// Compiles every campaign in `sources` (`(file, text)`) and checks them together: unique
/// names, `on_reply` naming one of `flow_ids`.
pub fn compile_campaigns(
    sources: &[(String, String)],
    env: &Env<'_>,
    flow_ids: &[&str],
) -> (Vec<Arc<Campaign>>, Diagnostics) {
    let mut diags = Diagnostics::default();
    let mut campaigns = Vec::new();
    let mut names: Vec<(String, String, Loc)> = Vec::new();
    for (file, text) in sources {
        let mut compiled = compile_campaign(file, text, env);
        if let Some((name, at)) = compiled.name.take() {
            if let Some((_, first_file, first)) = names.iter().find(|(n, ..)| *n == name) {
                diags.push(
                    Diagnostic::error(file, Some(at), format!("two campaigns are named `{name}`"))
                        .with_label("second definition")
                        .with_help(format!(
                            "the first is at {first_file}:{}:{}; rename one",
                            first.line, first.col
                        )),
                );
            }
            names.push((name, file.clone(), at));
        }
        if let Some((flow, at)) = &compiled.on_reply
            && !flow_ids.contains(&flow.as_str())
        {
            let help = did_you_mean(flow, flow_ids.iter().copied());
            let mut d = Diagnostic::error(file, Some(*at), format!("there is no flow `{flow}`"))
                .with_label("unknown flow");
            d.help = help.or(Some(
                "`on_reply` names the flow that answers replies".into(),
            ));
            diags.push(d);
        }
        if let Some(campaign) = compiled.campaign.take() {
            campaigns.push(Arc::new(campaign));
        }
        diags.extend(compiled.diagnostics);
    }
    if diags.has_errors() {
        campaigns.clear();
    }
    (campaigns, diags)
}

/// The window lint's entries for the campaigns' `on_reply` flows. A recipient enters the
/// flow by replying, and the reply opens the window, so the flow starts with no delay; its
/// steps after a `wait` past the window are hazards like any other step's.
pub fn reply_entries(campaigns: &[Arc<Campaign>]) -> Vec<Entry> {
    campaigns
        .iter()
        .filter_map(|c| {
            Some(Entry {
                flow: c.on_reply.clone()?,
                after: chrono::Duration::zero(),
                via: format!("campaign `{}`'s `on_reply`", c.name),
            })
        })
        .collect()
}

/// Compiles the campaign in `text` (the contents of `file`).
pub fn compile_campaign(file: &str, text: &str, env: &Env<'_>) -> Compiled {
    let mut out = Compiled::default();
    out.diagnostics.add_source(file, Arc::from(text));
    let raw: RawCampaign = match yaml::parse(file, text) {
        Ok(raw) => raw,
        Err(d) => {
            out.diagnostics.push(*d);
            return out;
        }
    };
    out.name = Some((raw.campaign.value.clone(), loc(&raw.campaign)));
    let mut c = Compiler {
        f: Fragments::new(
            file,
            text,
            env.scripting,
            env.templates,
            &mut out.diagnostics,
        ),
        env,
    };
    out.on_reply = raw
        .on_reply
        .as_ref()
        .map(|r| (r.value.clone(), c.f.value_loc(r)));
    let campaign = c.campaign(file, text, raw);
    if !out.diagnostics.has_errors() {
        out.campaign = campaign;
    }
    out
}

struct Compiler<'a> {
    f: Fragments<'a>,
    env: &'a Env<'a>,
}

impl Compiler<'_> {
    /// Every part of the campaign compiled; `None` when a part failed (its error is
    /// reported).
    fn campaign(&mut self, file: &str, text: &str, raw: RawCampaign) -> Option<Campaign> {
        self.name(&raw.campaign);
        let channel = self.channel(raw.channel.as_ref());
        let category = raw.category.value;
        let variants = self.variants(&raw.campaign, raw.template, raw.split, category);
        let in_window = raw.in_window.map(|w| self.in_window(w.value));
        let audience = self.audience(&raw.audience);
        let timezone = self.timezone(raw.timezone.as_ref());
        let when = self.when(
            &raw.campaign,
            raw.schedule.as_ref(),
            raw.at.as_ref(),
            timezone,
        );
        let quiet_hours = raw.quiet_hours.as_ref().map(|q| self.quiet_hours(q));
        let rate = raw.rate.as_ref().map(|r| self.rate(r));
        let frequency_cap = match &raw.frequency_cap {
            Some(cap) => Some(self.frequency_cap(cap)?),
            None => (category == Category::Marketing).then_some(DEFAULT_MARKETING_CAP),
        };
        let ttl = match &raw.ttl {
            Some(ttl) => self.f.duration(ttl)?,
            None => DEFAULT_TTL,
        };
        let rate = optional(rate)?;
        if let (Some(rate), Some(channel)) = (rate, channel.as_deref()) {
            self.rate_within_throughput(rate, channel, raw.rate.as_ref()?);
        }
        Some(Campaign {
            name: raw.campaign.value.clone(),
            file: file.to_string(),
            loc: loc(&raw.campaign),
            source: Arc::from(text),
            channel: channel?,
            category,
            variants: variants?,
            in_window: optional(in_window)?,
            audience: audience?,
            when: when?,
            timezone: timezone?,
            quiet_hours: optional(quiet_hours)?,
            rate,
            on_reply: raw.on_reply.map(|r| r.value),
            frequency_cap,
            ttl,
        })
    }

    fn name(&mut self, name: &Spanned<String>) {
        if !valid_name(&name.value) {
            let at = self.f.value_loc(name);
            self.f
                .error(at, format!("`{}` is not a valid campaign name", name.value))
                .help = Some("use letters, digits, `_` and `-`".into());
        }
    }

    /// The channel named, or the config's first.
    fn channel(&mut self, named: Option<&Spanned<String>>) -> Option<String> {
        let channels = self.env.channels;
        let Some(named) = named else {
            return channels.first().map(|c| c.name.clone());
        };
        if channels.iter().any(|c| c.name == named.value) {
            return Some(named.value.clone());
        }
        let names: Vec<&str> = channels.iter().map(|c| c.name.as_str()).collect();
        let help = did_you_mean(&named.value, names.iter().copied());
        let at = self.f.value_loc(named);
        let d = self
            .f
            .error(at, format!("there is no channel `{}`", named.value));
        d.label = Some("unknown channel".into());
        d.help = help.or(Some(format!(
            "the config's channels are: {}",
            names.join(", ")
        )));
        None
    }

    /// What the campaign sends: exactly one of `template` (one unnamed variant) and
    /// `split` (named variants).
    fn variants(
        &mut self,
        name: &Spanned<String>,
        template: Option<Spanned<RawTemplateRef>>,
        split: Option<Spanned<Vec<Spanned<RawVariant>>>>,
        category: Category,
    ) -> Option<Vec<Variant>> {
        match (template, split) {
            (Some(template), None) => Some(vec![Variant {
                name: None,
                weight: 1,
                template: self.template(&template, category)?,
                in_window: None,
            }]),
            (None, Some(split)) => self.split(split, category),
            (Some(_), Some(split)) => {
                self.f
                    .error(
                        loc(&split),
                        "a campaign has `template` or `split`, not both",
                    )
                    .help = Some(
                    "with `split`, each variant names its own `template`: remove the campaign's"
                        .into(),
                );
                None
            }
            (None, None) => {
                self.f
                    .error(loc(name), "this campaign has neither `template` nor `split`")
                    .help = Some(
                    "add `template: { name: …, language: en_US }`, or `split:` with two or more variants"
                        .into(),
                );
                None
            }
        }
    }

    /// A split's variants: at least two, each named (unique, `a-z0-9_-`), weighted by a
    /// whole number above zero, its template checked like the campaign's `template`.
    fn split(
        &mut self,
        raw: Spanned<Vec<Spanned<RawVariant>>>,
        category: Category,
    ) -> Option<Vec<Variant>> {
        if raw.value.len() < 2 {
            self.f
                .error(
                    loc(&raw),
                    format!(
                        "a `split` needs at least two variants; this one has {}",
                        raw.value.len()
                    ),
                )
                .help = Some(
                "add `- { name: b, weight: 50, template: { name: …, language: en_US } }`, or write `template:` instead of `split:`"
                    .into(),
            );
            return None;
        }
        let mut variants = Vec::new();
        let mut names: Vec<String> = Vec::new();
        let mut ok = true;
        for raw in raw.value {
            let v = raw.value;
            let name = &v.name;
            if !valid_name(&name.value) {
                let at = self.f.value_loc(name);
                self.f
                    .error(at, format!("`{}` is not a valid variant name", name.value))
                    .help = Some("use letters, digits, `_` and `-`".into());
                ok = false;
            } else if names.contains(&name.value) {
                let at = self.f.value_loc(name);
                self.f
                    .error(
                        at,
                        format!("two variants of this split are named `{}`", name.value),
                    )
                    .help = Some(
                    "give each variant its own `name`: the report counts recipients by it".into(),
                );
                ok = false;
            }
            names.push(name.value.clone());
            let weight = self.weight(&v.weight);
            let template = self.template(&v.template, category);
            let in_window = v.in_window.map(|w| self.in_window(w.value));
            match (weight, template, optional(in_window)) {
                (Some(weight), Some(template), Some(in_window)) => variants.push(Variant {
                    name: Some(name.value.clone()),
                    weight,
                    template,
                    in_window,
                }),
                _ => ok = false,
            }
        }
        ok.then_some(variants)
    }

    /// A variant's weight: a whole number above zero.
    fn weight(&mut self, raw: &Spanned<f64>) -> Option<u32> {
        let w = raw.value;
        if w.fract() == 0.0 && w >= 1.0 && w <= f64::from(u32::MAX) {
            return Some(w as u32);
        }
        self.f
            .error(
                loc(raw),
                format!("a variant's weight is a whole number above zero, not {w}"),
            )
            .help = Some("weights are relative: 70 and 30 send 70 % and 30 % of recipients".into());
        None
    }

    /// The template: in the registry, approved (paused or pending only warn: a run waits for
    /// it), of the campaign's category, its parameters naming only the contact.
    fn template(
        &mut self,
        raw: &Spanned<RawTemplateRef>,
        category: Category,
    ) -> Option<TemplateCall> {
        let (call, found) = self.f.template(raw)?;
        for (param, at) in call.params.iter().zip(&raw.value.params) {
            self.contact_only(param, at);
        }
        let found = found?;
        let at = self.f.value_loc(&raw.value.name);
        let what = format!("template `{}` ({})", call.name, call.language);
        match found.status {
            Status::Approved => {}
            Status::Pending | Status::Paused => {
                self.f.warning(
                    at,
                    format!(
                        "{what} is {}, not approved: runs of this campaign wait until Meta approves it",
                        found.status.as_str()
                    ),
                );
            }
            Status::Rejected | Status::Disabled => {
                self.f
                    .error(
                        at,
                        format!("{what} is {}: it cannot be sent", found.status.as_str()),
                    )
                    .help = Some(
                    "name an approved template, or run `flowgate templates sync` if Meta has approved it since"
                        .into(),
                );
            }
        }
        if found.category != category {
            let (theirs, ours) = (category_name(found.category), category_name(category));
            self.f
                .error(
                    at,
                    format!(
                        "{what} is a {theirs} template, and this campaign's `category` is {ours}"
                    ),
                )
                .help = Some(format!(
                "name a {ours} template, or set `category: {theirs}` (Meta charges by the template's category)"
            ));
        }
        Some(call)
    }

    /// A campaign's texts are rendered for a contact, with no flow variables: only
    /// `contact.*` means something.
    fn contact_only(&mut self, text: &Text, at: &Spanned<String>) {
        let stray = text
            .paths()
            .find(|p| p[0] != "contact")
            .map(|p| p.join("."));
        if let Some(path) = stray {
            let at = self.f.value_loc(at);
            self.f
                .error(
                    at,
                    format!("`{{{{{path}}}}}` means nothing in a campaign: it has no variables"),
                )
                .help =
                Some("use {{contact.name}}, {{contact.wa_id}} or {{contact.attrs.KEY}}".into());
        }
    }

    /// The `in_window` message, compiled like a `say` step.
    fn in_window(&mut self, raw: RawInWindow) -> Option<Message> {
        let step = raw.into_step();
        let message = self.f.message(&step)?;
        let say = step.say.as_ref()?;
        self.contact_only(&message.text, say);
        let titles = step.buttons.iter().flat_map(|b| &b.value);
        for ((_, title), raw) in message.buttons.iter().zip(titles) {
            self.contact_only(title, &raw.value.title);
        }
        Some(message)
    }

    fn audience(&mut self, raw: &Spanned<RawAudience>) -> Option<Audience> {
        let a = &raw.value;
        if a.tags.is_empty() && a.condition.is_none() {
            self.f
                .error(loc(raw), "an audience needs `tags` or `where`")
                .help =
                Some("to send to every contact of the channel, write `where: 'true'`".into());
            return None;
        }
        for tag in a.tags.iter().filter(|t| t.value.trim().is_empty()) {
            self.f.error(loc(tag), "a tag cannot be empty");
        }
        let filter = match &a.condition {
            Some(condition) => Some(self.f.condition(condition)?),
            None => None,
        };
        Some(Audience {
            tags: a.tags.iter().map(|t| t.value.clone()).collect(),
            filter,
        })
    }

    /// The campaign's time zone: an IANA name, UTC when none is given.
    fn timezone(&mut self, named: Option<&Spanned<String>>) -> Option<Tz> {
        let Some(named) = named else {
            return Some(Tz::UTC);
        };
        if let Ok(tz) = named.value.parse::<Tz>() {
            return Some(tz);
        }
        let names = chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name());
        let help = did_you_mean(&named.value, names);
        let at = self.f.value_loc(named);
        self.f
            .error(at, format!("`{}` is not a time zone", named.value))
            .help = help.or(Some(
            "use an IANA name such as Europe/Berlin or America/New_York".into(),
        ));
        None
    }

    /// Exactly one of `schedule` (a 5-field cron) and `at` (a local date-time).
    fn when(
        &mut self,
        name: &Spanned<String>,
        schedule: Option<&Spanned<String>>,
        at: Option<&Spanned<String>>,
        timezone: Option<Tz>,
    ) -> Option<When> {
        match (schedule, at) {
            (Some(_), Some(at)) => {
                self.f
                    .error(loc(at), "a campaign has `schedule` or `at`, not both")
                    .help = Some("`schedule` repeats; `at` runs once".into());
                None
            }
            (None, None) => {
                self.f
                    .error(loc(name), "this campaign has neither `schedule` nor `at`")
                    .help = Some(
                    "add `schedule: \"0 10 * * MON\"` (5-field cron) or `at: 2026-12-01T10:00:00`"
                        .into(),
                );
                None
            }
            (Some(schedule), None) => self.cron(schedule),
            (None, Some(at)) => self.at(at, timezone),
        }
    }

    fn cron(&mut self, raw: &Spanned<String>) -> Option<When> {
        let parser = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build();
        match parser.parse(&raw.value) {
            Ok(cron) => Some(When::Cron {
                cron: Box::new(cron),
                source: raw.value.clone(),
            }),
            Err(e) => {
                let at = self.f.value_loc(raw);
                let d = self
                    .f
                    .error(at, format!("`{}` is not a valid schedule", raw.value));
                d.label = Some(e.to_string());
                d.help = Some(
                    "write 5 fields: minute hour day-of-month month day-of-week, e.g. \"0 10 * * MON\""
                        .into(),
                );
                None
            }
        }
    }

    /// A local date-time that exists in the campaign's time zone.
    fn at(&mut self, raw: &Spanned<String>, timezone: Option<Tz>) -> Option<When> {
        let formats = ["%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S"];
        let parsed = formats
            .iter()
            .find_map(|f| NaiveDateTime::parse_from_str(raw.value.trim(), f).ok());
        let at = self.f.value_loc(raw);
        let Some(local) = parsed else {
            self.f
                .error(at, format!("`{}` is not a local date-time", raw.value))
                .help = Some(
                "write it like 2026-12-01T10:00:00, without an offset: `timezone` says where"
                    .into(),
            );
            return None;
        };
        if let Some(tz) = timezone
            && let LocalResult::None = tz.from_local_datetime(&local)
        {
            self.f
                .error(at, format!("{local} does not exist in {tz}"))
                .help = Some("the clocks skip it (daylight saving time): pick another time".into());
            return None;
        }
        Some(When::At(local))
    }

    fn quiet_hours(&mut self, raw: &Spanned<RawQuietHours>) -> Option<QuietHours> {
        let from = self.time_of_day(&raw.value.from);
        let to = self.time_of_day(&raw.value.to);
        let (from, to) = (from?, to?);
        if from == to {
            self.f
                .error(
                    loc(raw),
                    "quiet hours that start and end at the same time are empty",
                )
                .help = Some("e.g. `quiet_hours: { from: \"21:00\", to: \"09:00\" }`".into());
            return None;
        }
        Some(QuietHours { from, to })
    }

    fn time_of_day(&mut self, raw: &Spanned<String>) -> Option<NaiveTime> {
        let parsed = NaiveTime::parse_from_str(raw.value.trim(), "%H:%M");
        if parsed.is_err() {
            let at = self.f.value_loc(raw);
            self.f
                .error(at, format!("`{}` is not a time of day", raw.value))
                .help = Some("write hours and minutes, 24-hour: \"21:00\", \"09:30\"".into());
        }
        parsed.ok()
    }

    /// `20/s`, `600/m`, `5000/h`.
    fn rate(&mut self, raw: &Spanned<String>) -> Option<Rate> {
        let parsed = raw.value.trim().split_once('/').and_then(|(count, unit)| {
            let count: u32 = count.trim().parse().ok().filter(|n| *n > 0)?;
            let per = match unit.trim() {
                "s" => chrono::Duration::seconds(1),
                "m" => chrono::Duration::minutes(1),
                "h" => chrono::Duration::hours(1),
                _ => return None,
            };
            Some(Rate { count, per })
        });
        if parsed.is_none() {
            let at = self.f.value_loc(raw);
            self.f
                .error(at, format!("`{}` is not a rate", raw.value))
                .help =
                Some("write a count per second, minute or hour: 20/s, 600/m or 5000/h".into());
        }
        parsed
    }

    /// A rate above the channel's throughput is paced down to it: worth knowing at `check`.
    fn rate_within_throughput(&mut self, rate: Rate, channel: &str, raw: &Spanned<String>) {
        let Some(c) = self.env.channels.iter().find(|c| c.name == channel) else {
            return;
        };
        if rate.per_second() > f64::from(c.throughput_mps) {
            let at = self.f.value_loc(raw);
            self.f.warning(
                at,
                format!(
                    "channel `{channel}` sends at most {} messages a second: this campaign will not go faster",
                    c.throughput_mps
                ),
            );
        }
    }

    fn frequency_cap(&mut self, raw: &Spanned<RawFrequencyCap>) -> Option<FrequencyCap> {
        let cap = &raw.value;
        if cap.max.value == 0 {
            self.f.error(loc(&cap.max), "`max` must be at least 1").help =
                Some("a cap of 0 sends nothing: remove the campaign instead".into());
        }
        let per = self.f.duration(&cap.per)?;
        (cap.max.value > 0).then_some(FrequencyCap {
            max: cap.max.value,
            per,
        })
    }
}

/// An optional key's compiled value: `None` when the key is given and failed (its error is
/// reported), `Some(None)` when it is absent.
fn optional<T>(compiled: Option<Option<T>>) -> Option<Option<T>> {
    compiled.map_or(Some(None), |value| value.map(Some))
}

fn category_name(category: Category) -> &'static str {
    match category {
        Category::Marketing => "marketing",
        Category::Utility => "utility",
        Category::Authentication => "authentication",
    }
}

#[cfg(test)]
mod tests;
