//! The policy layer: the one function every outgoing message passes, whatever
//! produced it (a flow step, a script, a timer, an agent, a campaign), and the rules it
//! applies: the 24-hour customer service window, rewriting to approved templates, the queue
//! and its time-to-live, the free entry point and marketing consent.
//!
//! Pure: it takes the contact, the template registry and the time as values and returns a
//! [`Decision`]; `dispatch` records decisions at plan time, `outbox` decides again at send
//! time, and both store what was decided with the message.

use chrono::{DateTime, Duration, Utc};

use crate::config::{FallbackTemplate, PolicyConfig};
use crate::domain::{
    Contact, Decision, InboundContent, OptOut, Origin, Outbound, OutboundContent, TemplateFallback,
    WindowClosed, format_duration,
};
use crate::templates::{Category, Registry, Status};

/// The free entry point lasts this long from the business's answer: a customer who wrote
/// from a Click-to-WhatsApp ad and is answered within 24 h gets 72 h in which every message,
/// templates included, is free (the free-form rule is still the 24 h window).
pub const FREE_ENTRY_POINT: i64 = 72;
/// The business must answer an ad's message within this many hours to open it.
pub const FREE_ENTRY_ANSWER_WITHIN: i64 = 24;
/// How long marketing waits after a `131049` (Meta: "at least 24 hours").
pub const MARKETING_BACKOFF_HOURS: i64 = 24;

/// The policy settings, from `policy:` in `flowgate.yaml`.
#[derive(Debug, Clone)]
pub struct Policy {
    pub window: Duration,
    pub safety_margin: Duration,
    pub queue_ttl: Duration,
    opt_out_keywords: Vec<String>,
    opt_in_keywords: Vec<String>,
    pub opt_out_reply: Option<String>,
    pub opt_in_reply: Option<String>,
    /// Policy-level rewrites for messages whose step names no `outside_window`.
    pub fallbacks: Vec<FallbackTemplate>,
}

impl Default for Policy {
    fn default() -> Self {
        Self::new(&PolicyConfig::default())
    }
}

/// The customer service window of one contact at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The customer never wrote: only templates may be sent.
    Never,
    /// Free-form messages may be sent until `closes_at` (the end minus the safety margin).
    Open { closes_at: DateTime<Utc> },
    /// Closed since `since`; `by_whatsapp` when a `131047` closed it before our clock did.
    Closed {
        since: DateTime<Utc>,
        by_whatsapp: bool,
    },
}

impl Window {
    pub fn is_open(&self) -> bool {
        matches!(self, Self::Open { .. })
    }

    /// `window open, closes in 22h58m`, `window closed 1h12m ago`, …
    pub fn describe(&self, now: DateTime<Utc>) -> String {
        match self {
            Self::Never => "the customer has not written yet (no window)".into(),
            Self::Open { closes_at } => {
                format!(
                    "window open, closes in {}",
                    format_duration(*closes_at - now)
                )
            }
            Self::Closed {
                since,
                by_whatsapp: false,
            } => format!("window closed {} ago", format_duration(now - *since)),
            Self::Closed {
                since,
                by_whatsapp: true,
            } => format!(
                "WhatsApp answered 131047 (window closed) {} ago",
                format_duration(now - *since)
            ),
        }
    }
}

/// A consent keyword the customer sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentChange {
    OptOut,
    OptIn,
}

impl Policy {
    pub fn new(config: &PolicyConfig) -> Self {
        let upper = |words: &[String]| words.iter().map(|w| w.trim().to_uppercase()).collect();
        Self {
            window: config.window.as_duration(),
            safety_margin: config.safety_margin.as_duration(),
            queue_ttl: config.queue_ttl.as_duration(),
            opt_out_keywords: upper(&config.opt_out_keywords),
            opt_in_keywords: upper(&config.opt_in_keywords),
            opt_out_reply: config.opt_out_reply.clone(),
            opt_in_reply: config.opt_in_reply.clone(),
            fallbacks: config.outside_window.clone(),
        }
    }

    /// The contact's window at `now` (WhatsApp's customer service window: free-form
    /// messages only for 24 h after the customer's last message): open while
    /// `now < last_customer_message_at + window - safety_margin`, unless WhatsApp closed it.
    pub fn window(&self, contact: &Contact, now: DateTime<Utc>) -> Window {
        let Some(last) = contact.last_customer_message_at else {
            return Window::Never;
        };
        if let Some(closed) = &contact.policy.window_closed
            && closed.last_message_at >= Some(last)
        {
            return Window::Closed {
                since: closed.at,
                by_whatsapp: true,
            };
        }
        let closes_at = last + self.window - self.safety_margin;
        if now < closes_at {
            Window::Open { closes_at }
        } else {
            Window::Closed {
                since: closes_at,
                by_whatsapp: false,
            }
        }
    }

    /// Decides what happens to `message` for `contact` at `now`. Always starts from what was
    /// requested ([`Outbound::requested`]), so deciding again after a rewrite is the same as
    /// deciding the first time.
    ///
    /// A campaign's message is never queued: held for the customer's next message, it would
    /// answer that message with an offer. What would queue it skips it instead, at planning
    /// and at send time alike (a template paused between the two).
    pub fn decide(
        &self,
        message: &Outbound,
        contact: &Contact,
        templates: &Registry,
        now: DateTime<Utc>,
    ) -> Decision {
        match self.decide_any(message, contact, templates, now) {
            Decision::Queued { reason } if matches!(message.origin, Origin::Campaign { .. }) => {
                Decision::Skipped {
                    reason: format!("not sendable now: {reason}"),
                }
            }
            decision => decision,
        }
    }

    /// [`Policy::decide`] for any origin.
    fn decide_any(
        &self,
        message: &Outbound,
        contact: &Contact,
        templates: &Registry,
        now: DateTime<Utc>,
    ) -> Decision {
        let window = self.window(contact, now);
        let free = self.free_entry_note(contact, now);
        match message.requested() {
            OutboundContent::Template {
                name,
                language,
                params,
            } => {
                match self.template_refusal(templates, contact, name, language, params.len(), now) {
                    None => Decision::Send {
                        reason: format!("template ({}){free}", window.describe(now)),
                    },
                    Some(Refusal::Skip(reason)) => Decision::Skipped { reason },
                    Some(Refusal::Queue(reason)) => Decision::Queued { reason },
                }
            }
            _ if window.is_open() => Decision::Send {
                reason: format!("{}{free}", window.describe(now)),
            },
            _ => {
                let closed = window.describe(now);
                let Some(fallback) = self.fallback_for(message, contact) else {
                    return Decision::Queued {
                        reason: format!("{closed}; no template fallback"),
                    };
                };
                match self.template_refusal(
                    templates,
                    contact,
                    &fallback.name,
                    &fallback.language,
                    fallback.params.len(),
                    now,
                ) {
                    None => Decision::Rewritten {
                        template: fallback,
                        reason: format!("{closed}{free}"),
                    },
                    Some(Refusal::Skip(why) | Refusal::Queue(why)) => Decision::Queued {
                        reason: format!("{closed}; cannot rewrite: {why}"),
                    },
                }
            }
        }
    }

    /// The message to store with a decision: the template it was rewritten to (keeping the
    /// original to decide again from), else the requested content.
    pub fn apply(decision: &Decision, message: &Outbound) -> Outbound {
        let mut out = message.clone();
        let requested = message.requested().clone();
        match decision {
            Decision::Rewritten { template, .. } => {
                out.content = OutboundContent::Template {
                    name: template.name.clone(),
                    language: template.language.clone(),
                    params: template.params.clone(),
                };
                out.original = Some(requested);
            }
            _ => {
                out.content = requested;
                out.original = None;
            }
        }
        out
    }

    /// The decision for a queued message whose time ran out (first decided at `queued_at`).
    pub fn expired(&self, queued_at: DateTime<Utc>, now: DateTime<Utc>) -> Decision {
        Decision::Expired {
            reason: format!(
                "queued {} ago, longer than queue_ttl {}: the customer did not write again",
                format_duration(now - queued_at),
                format_duration(self.queue_ttl)
            ),
        }
    }

    /// When a message queued at `queued_at` expires.
    pub fn expires_at(&self, queued_at: DateTime<Utc>) -> DateTime<Utc> {
        queued_at + self.queue_ttl
    }

    /// Whether a customer's message is an opt-out or opt-in keyword (the whole message,
    /// case-insensitive; a template quick reply by its text or payload).
    pub fn consent_keyword(&self, content: &InboundContent) -> Option<ConsentChange> {
        let candidates: Vec<&str> = match content {
            InboundContent::Text { body } => vec![body],
            InboundContent::TemplateButton { payload, text } => vec![payload, text],
            InboundContent::ButtonReply { id, title } => vec![id, title],
            _ => return None,
        };
        for candidate in candidates {
            let word = candidate.trim().to_uppercase();
            if self.opt_out_keywords.contains(&word) {
                return Some(ConsentChange::OptOut);
            }
            if self.opt_in_keywords.contains(&word) {
                return Some(ConsentChange::OptIn);
            }
        }
        None
    }

    /// Records a message sent to `contact` at `now`: answering an ad within 24 h opens the
    /// free entry point. Returns whether it opened.
    pub fn record_sent(&self, contact: &mut Contact, now: DateTime<Utc>) -> bool {
        match self.free_entry(contact, now) {
            FreeEntry::Opens { until } => {
                contact.policy.free_entry_until = Some(until);
                true
            }
            _ => false,
        }
    }

    /// The customer stopped (`OptOut`) or resumed marketing messages.
    pub fn set_consent(
        contact: &mut Contact,
        change: ConsentChange,
        source: &str,
        at: DateTime<Utc>,
    ) {
        match change {
            ConsentChange::OptOut => {
                if contact.policy.marketing_opt_out.is_none() {
                    contact.policy.marketing_opt_out = Some(OptOut {
                        at,
                        source: source.to_string(),
                    });
                }
            }
            // WhatsApp's 131049 back-off is not the customer's to lift: it stays.
            ConsentChange::OptIn => contact.policy.marketing_opt_out = None,
        }
    }

    /// WhatsApp answered `131049`: no marketing to this contact for 24 h.
    pub fn pause_marketing(contact: &mut Contact, now: DateTime<Utc>) {
        contact.policy.marketing_paused_until =
            Some(now + Duration::hours(MARKETING_BACKOFF_HOURS));
    }

    /// WhatsApp answered `131047`: the window is closed until the customer writes again.
    ///
    /// `known` is the customer's last message time as it was when the refused message was
    /// sent: if they have written since, that newer message reopened the window and nothing
    /// is closed (returns `false`).
    pub fn close_window(
        contact: &mut Contact,
        now: DateTime<Utc>,
        known: Option<DateTime<Utc>>,
    ) -> bool {
        if contact.last_customer_message_at > known {
            return false;
        }
        contact.policy.window_closed = Some(WindowClosed {
            at: now,
            last_message_at: contact.last_customer_message_at,
        });
        true
    }

    fn free_entry(&self, contact: &Contact, now: DateTime<Utc>) -> FreeEntry {
        let p = &contact.policy;
        if let Some(until) = p.free_entry_until.filter(|u| now < *u) {
            return FreeEntry::Open { until };
        }
        match p.referral_at {
            Some(ad)
                if now < ad + Duration::hours(FREE_ENTRY_ANSWER_WITHIN)
                // Each ad conversation opens one free entry point, with its first answer;
                // an entry point that ended by the time of the new ad message is over.
                && p.free_entry_until.is_none_or(|u| u <= ad) =>
            {
                FreeEntry::Opens {
                    until: now + Duration::hours(FREE_ENTRY_POINT),
                }
            }
            _ => FreeEntry::None,
        }
    }

    fn free_entry_note(&self, contact: &Contact, now: DateTime<Utc>) -> String {
        let at = |t: DateTime<Utc>| t.format("%Y-%m-%d %H:%M UTC");
        match self.free_entry(contact, now) {
            FreeEntry::None => String::new(),
            FreeEntry::Open { until } => format!("; free entry point until {}", at(until)),
            FreeEntry::Opens { until } => {
                format!(
                    "; answers an ad: free entry point opens until {}",
                    at(until)
                )
            }
        }
    }

    /// The template a free-form message becomes outside the window: its step's
    /// `outside_window`, else the first matching `policy.outside_window` rule.
    fn fallback_for(&self, message: &Outbound, contact: &Contact) -> Option<TemplateFallback> {
        if let Some(t) = &message.outside_window {
            return Some(t.clone());
        }
        let rule = self.fallbacks.iter().find(|r| {
            r.flow
                .as_deref()
                .is_none_or(|f| message.origin.flow() == Some(f))
                && r.origin
                    .as_deref()
                    .is_none_or(|o| o == message.origin.kind())
        })?;
        let text = message.requested().body();
        Some(TemplateFallback {
            name: rule.template.clone(),
            language: rule.language.clone(),
            params: rule
                .params
                .iter()
                .map(|p| render_placeholders(p, text, contact))
                .collect(),
        })
    }

    /// Why `name` (`language`) with `params` parameters may not be sent now, if it may not.
    fn template_refusal(
        &self,
        templates: &Registry,
        contact: &Contact,
        name: &str,
        language: &str,
        params: usize,
        now: DateTime<Utc>,
    ) -> Option<Refusal> {
        let Some(t) = templates.find(name, language) else {
            return Some(Refusal::Queue(format!(
                "template {name} ({language}) is not in the registry"
            )));
        };
        if t.status != Status::Approved {
            return Some(Refusal::Queue(format!(
                "template {name} ({language}) is {}, not approved",
                t.status.as_str()
            )));
        }
        let wanted = t.param_count();
        if wanted != params {
            return Some(Refusal::Queue(format!(
                "template {name} ({language}) takes {wanted} parameters, got {params}"
            )));
        }
        if t.category == Category::Marketing {
            if let Some(out) = &contact.policy.marketing_opt_out {
                return Some(Refusal::Skip(format!(
                    "marketing template {name}: the customer opted out of marketing ({}, {})",
                    out.source,
                    out.at.format("%Y-%m-%d %H:%M UTC")
                )));
            }
            if let Some(until) = contact.policy.marketing_paused_until.filter(|u| now < *u) {
                return Some(Refusal::Skip(format!(
                    "marketing template {name}: WhatsApp asked to wait after 131049; no \
                     marketing to this customer until {}",
                    until.format("%Y-%m-%d %H:%M UTC")
                )));
            }
        }
        None
    }
}

enum Refusal {
    /// Never sent: consent or a back-off says no.
    Skip(String),
    /// Not now: the template is missing, not approved or mismatched.
    Queue(String),
}

enum FreeEntry {
    None,
    Open {
        until: DateTime<Utc>,
    },
    /// Sending now answers an ad within 24 h: the free entry point opens until then.
    Opens {
        until: DateTime<Utc>,
    },
}

/// Fills `{{text}}`, `{{contact.name}}`, `{{contact.wa_id}}` and `{{contact.attrs.KEY}}` in a
/// policy-level template parameter. Anything else is left as written (`check` refuses it).
pub fn render_placeholders(param: &str, text: &str, contact: &Contact) -> String {
    fill(param, |name| placeholder(name, text, contact))
}

/// Replaces each `{{ name }}` in `param` with `value(name)`, leaving it as written when that
/// is `None`.
fn fill(param: &str, mut value: impl FnMut(&str) -> Option<String>) -> String {
    let mut out = String::new();
    let mut rest = param;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        match value(after[..end].trim()) {
            Some(v) => out.push_str(&v),
            None => out.push_str(&rest[start..start + 2 + end + 2]),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

/// The value of one placeholder name, `None` if it is not one.
fn placeholder(name: &str, text: &str, contact: &Contact) -> Option<String> {
    Some(match name {
        "text" => text.to_string(),
        "contact.name" => contact.name.clone().unwrap_or_default(),
        "contact.wa_id" => contact.wa_id.clone(),
        _ => {
            let key = name.strip_prefix("contact.attrs.")?;
            match contact.attrs.get(key) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Null) | None => String::new(),
                Some(v) => v.to_string(),
            }
        }
    })
}

/// Whether `name` is a placeholder [`render_placeholders`] knows, for `check`.
pub fn is_known_placeholder(name: &str) -> bool {
    matches!(name, "text" | "contact.name" | "contact.wa_id")
        || name
            .strip_prefix("contact.attrs.")
            .is_some_and(|k| !k.is_empty())
}

impl RuleProblem {
    fn error(message: String) -> Self {
        Self {
            error: true,
            message,
        }
    }
}

/// A problem `check` reports about the policy-level `outside_window` rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleProblem {
    /// Errors stop the project from loading; a warning says what will happen at run time.
    pub error: bool,
    pub message: String,
}

/// What is wrong with the policy-level `outside_window` rules, for `check`: an unknown
/// origin or flow, a wrong parameter count or a placeholder nobody fills are errors; a
/// template missing from the registry is a warning (messages the rule covers will be
/// queued until the template is added or synced). One sentence each, naming the rule.
pub fn check_fallbacks(
    rules: &[FallbackTemplate],
    templates: &Registry,
    flow_ids: &[&str],
) -> Vec<RuleProblem> {
    const ORIGINS: [&str; 6] = ["step", "script", "agent", "system", "error", "campaign"];
    let mut problems = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let at = format!("policy.outside_window[{i}] (template `{}`)", rule.template);
        if let Some(origin) = rule.origin.as_deref().filter(|o| !ORIGINS.contains(o)) {
            problems.push(RuleProblem::error(format!(
                "{at}: origin `{origin}` is not one of {}",
                ORIGINS.join(", ")
            )));
        }
        if let Some(flow) = rule.flow.as_deref().filter(|f| !flow_ids.contains(f)) {
            problems.push(RuleProblem::error(format!(
                "{at}: there is no flow `{flow}`"
            )));
        }
        match templates.find(&rule.template, &rule.language) {
            None => problems.push(RuleProblem {
                error: false,
                message: format!(
                    "{at}: the registry has no `{}` in {}, so the messages it covers will be \
                     queued; add it to the templates file or run `flowgate templates sync`",
                    rule.template, rule.language
                ),
            }),
            Some(t) if t.param_count() != rule.params.len() => {
                problems.push(RuleProblem::error(format!(
                    "{at}: the template takes {} parameters, {} given",
                    t.param_count(),
                    rule.params.len()
                )))
            }
            Some(_) => {}
        }
        for param in &rule.params {
            fill(param, |name| {
                if !is_known_placeholder(name) {
                    problems.push(RuleProblem::error(format!(
                        "{at}: `{{{{{name}}}}}` is not a placeholder; use {{{{text}}}}, \
                         {{{{contact.name}}}}, {{{{contact.wa_id}}}} or {{{{contact.attrs.KEY}}}}"
                    )));
                }
                None
            });
        }
    }
    problems
}

#[cfg(test)]
mod tests;
