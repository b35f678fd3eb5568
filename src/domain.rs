//! The vocabulary every other module speaks: who a contact is, what a customer sent, what the
//! bot wants to send and what the policy decided about it.
//!
//! Nothing here does I/O or knows WhatsApp's JSON; `whatsapp` translates Graph API payloads
//! into these types and back.

use std::collections::BTreeSet;
use std::fmt;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

/// A customer's WhatsApp id (their phone number in international form, without `+`).
pub type WaId = String;

/// Whether a WhatsApp identifier is a business-scoped user id (`US.1349…`: letters in it)
/// rather than a phone number (digits).
pub fn is_bsuid(identifier: &str) -> bool {
    identifier.chars().any(|c| c.is_ascii_alphabetic())
}

/// Why a text is not a WhatsApp identifier. The value is shown with control characters
/// escaped, so a reason is safe to log and store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidIdentifier {
    #[error("`{}` is a business-scoped user id, not a phone number", .0.escape_debug())]
    BsuidNotPhone(String),
    #[error(
        "`{}` is not a phone number: write 8-15 digits, country code first, with no spaces or \
         punctuation (an optional leading + is allowed), e.g. 4915123456789",
        .0.escape_debug()
    )]
    NotDigits(String),
    #[error(
        "`{}` has {} digits: a phone number in E.164 form has 8 to 15, country code first",
        .value.escape_debug(), .digits
    )]
    Length { value: String, digits: usize },
    #[error("`{}` starts with 0: write the country code first (49…, not 0…)", .0.escape_debug())]
    LeadingZero(String),
    #[error(
        "`{}` is not a business-scoped user id: two capital letters, a period, optionally \
         `ENT.`, then up to 128 letters or digits, e.g. US.13491208655302741918",
        .0.escape_debug()
    )]
    NotBsuid(String),
}

/// A phone number in E.164 form, returned without its `+`: an optional leading `+`, then 8
/// to 15 ASCII digits, the first not `0` (a country code never starts with 0). No spaces,
/// dashes or brackets, so a number has one spelling and matches the `wa_id` WhatsApp's
/// webhooks send. The one phone rule: webhooks, the CSV import and the outbox use it.
pub fn phone_number(text: &str) -> Result<String, InvalidIdentifier> {
    let digits = text.strip_prefix('+').unwrap_or(text);
    if is_bsuid(digits) && bsuid(text).is_ok() {
        return Err(InvalidIdentifier::BsuidNotPhone(text.to_string()));
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(InvalidIdentifier::NotDigits(text.to_string()));
    }
    if !(8..=15).contains(&digits.len()) {
        return Err(InvalidIdentifier::Length {
            value: text.to_string(),
            digits: digits.len(),
        });
    }
    if digits.starts_with('0') {
        return Err(InvalidIdentifier::LeadingZero(text.to_string()));
    }
    Ok(digits.to_string())
}

/// A business-scoped user id, returned as written: two capital letters (the country), a
/// period, optionally `ENT.` (a parent BSUID), then 1 to 128 ASCII letters or digits
/// (`US.13491208655302741918`). The one BSUID rule, like [`phone_number`].
pub fn bsuid(text: &str) -> Result<String, InvalidIdentifier> {
    let bad = || InvalidIdentifier::NotBsuid(text.to_string());
    let (country, rest) = text.split_once('.').ok_or_else(bad)?;
    let id = rest.strip_prefix("ENT.").unwrap_or(rest);
    let country_ok = country.len() == 2 && country.bytes().all(|b| b.is_ascii_uppercase());
    let id_ok = (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric());
    if country_ok && id_ok {
        Ok(text.to_string())
    } else {
        Err(bad())
    }
}

/// A recipient WhatsApp can be sent to: a BSUID when it has letters, else a phone number.
pub fn recipient(text: &str) -> Result<String, InvalidIdentifier> {
    if is_bsuid(text) {
        bsuid(text)
    } else {
        phone_number(text)
    }
}

/// A contact as the engine sees it: identity, profile, segmentation and window state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Contact {
    pub wa_id: WaId,
    pub name: Option<String>,
    pub tags: BTreeSet<String>,
    pub attrs: serde_json::Map<String, serde_json::Value>,
    pub timezone: Option<String>,
    /// Time of the last customer-authored message (webhook `timestamp`); never moves backwards.
    pub last_customer_message_at: Option<DateTime<Utc>>,
    /// What the policy layer remembers about this contact besides the last message time.
    pub policy: PolicyState,
}

/// The policy layer's memory of one contact: WhatsApp's word on the window, the
/// free entry point, and marketing consent. Stored as one JSON column with the contact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PolicyState {
    /// WhatsApp refused a free-form message with `131047`: the window counts as closed until
    /// the customer writes again, whatever our own clock says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_closed: Option<WindowClosed>,
    /// The customer wrote from a Click-to-WhatsApp ad (a `referral`) at this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referral_at: Option<DateTime<Utc>>,
    /// The business answered that ad within 24 h: everything it sends until then is free
    /// (the free entry point). The free-form rule stays the 24-hour window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_entry_until: Option<DateTime<Utc>>,
    /// The customer stopped marketing messages; `None` while they accept them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marketing_opt_out: Option<OptOut>,
    /// WhatsApp answered `131049` (per-user marketing limit): no marketing before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marketing_paused_until: Option<DateTime<Utc>>,
}

/// WhatsApp's `131047`: when it came, and the customer's last message we knew of then (a
/// newer one reopens the window; comparing messages, not clocks, keeps a message in the same
/// second as the refusal from reopening it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowClosed {
    pub at: DateTime<Utc>,
    pub last_message_at: Option<DateTime<Utc>>,
}

/// When and how a customer stopped marketing messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OptOut {
    pub at: DateTime<Utc>,
    /// `keyword STOP`, `user_preferences`, `131050`, `api`.
    pub source: String,
}

impl Contact {
    pub fn new(wa_id: impl Into<WaId>) -> Self {
        Self {
            wa_id: wa_id.into(),
            ..Self::default()
        }
    }

    /// Records a customer-authored message at `at`, keeping the latest time.
    pub fn saw_customer_message(&mut self, at: DateTime<Utc>) {
        if self.last_customer_message_at.is_none_or(|t| at > t) {
            self.last_customer_message_at = Some(at);
        }
        // A message newer than the ones WhatsApp had seen when it closed the window opens it
        // again.
        if let Some(closed) = &self.policy.window_closed
            && closed.last_message_at < self.last_customer_message_at
        {
            self.policy.window_closed = None;
        }
    }
}

/// One message a customer sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inbound {
    /// The provider's message id (`wamid.…`); the sandbox makes its own.
    pub id: String,
    /// When the customer sent it (the webhook's `timestamp`, not the arrival time).
    pub timestamp: DateTime<Utc>,
    pub content: InboundContent,
    /// The customer came from a Click-to-WhatsApp ad (the message carries a `referral`):
    /// answering within 24 h opens the free entry point.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_ad: bool,
}

impl Inbound {
    /// A message typed on the sandbox channel (`chat`, `test`, `POST /sandbox/messages`),
    /// with an id unique across runs.
    pub fn sandbox(content: InboundContent, timestamp: DateTime<Utc>, now: DateTime<Utc>) -> Self {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            id: format!(
                "wamid.sandbox.{}.{seq}",
                now.timestamp_nanos_opt().unwrap_or_default()
            ),
            timestamp,
            content,
            from_ad: false,
        }
    }
}

/// What a customer sent, reduced to what flows can react to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InboundContent {
    Text {
        body: String,
    },
    /// A reply button tapped on an interactive message.
    ButtonReply {
        id: String,
        title: String,
    },
    /// A row picked from an interactive list.
    ListReply {
        id: String,
        title: String,
    },
    /// A quick-reply button on a template (`type: button`); `payload` is the id.
    TemplateButton {
        payload: String,
        text: String,
    },
    Media {
        kind: String,
        caption: Option<String>,
        /// What WhatsApp gives to fetch the file (none in the sandbox, nor in messages
        /// stored before flowgate downloaded media).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file: Option<MediaRef>,
    },
    Location {
        latitude: f64,
        longitude: f64,
    },
    Reaction {
        emoji: String,
    },
    /// A WhatsApp Flow's answer (`interactive.nfm_reply`): the fields the customer filled
    /// in, from `response_json` (with the `flow_token` the form was sent with).
    FormReply {
        response: serde_json::Map<String, serde_json::Value>,
    },
    /// A type flowgate does not interpret; stored, never answered by a trigger.
    Other {
        kind: String,
    },
}

impl InboundContent {
    pub fn text(body: impl Into<String>) -> Self {
        Self::Text { body: body.into() }
    }

    /// The text a flow sees: the body, a button's title, a caption.
    pub fn as_text(&self) -> &str {
        match self {
            Self::Text { body } => body,
            Self::ButtonReply { title, .. } | Self::ListReply { title, .. } => title,
            Self::TemplateButton { text, .. } => text,
            Self::Media { caption, .. } => caption.as_deref().unwrap_or(""),
            _ => "",
        }
    }

    /// The id of a tapped reply button or template quick reply.
    pub fn button_id(&self) -> Option<&str> {
        match self {
            Self::ButtonReply { id, .. } => Some(id),
            Self::TemplateButton { payload, .. } => Some(payload),
            _ => None,
        }
    }

    pub fn list_id(&self) -> Option<&str> {
        match self {
            Self::ListReply { id, .. } => Some(id),
            _ => None,
        }
    }

    /// The message type as flows see it in `message.type`.
    pub fn kind(&self) -> &str {
        match self {
            Self::Text { .. } => "text",
            Self::ButtonReply { .. } => "button_reply",
            Self::ListReply { .. } => "list_reply",
            Self::TemplateButton { .. } => "button",
            Self::Media { kind, .. } => kind,
            Self::Location { .. } => "location",
            Self::Reaction { .. } => "reaction",
            Self::FormReply { .. } => "form",
            Self::Other { kind } => kind,
        }
    }

    /// Whether this message opens or refreshes the customer service window (every
    /// message the customer sends does, except a kind WhatsApp does not support).
    pub fn refreshes_window(&self) -> bool {
        !matches!(self, Self::Other { .. })
    }
}

/// A customer's file as the webhook names it: the media id to fetch it by, and what the
/// file should be (its type, and the SHA-256 the downloaded bytes must have).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaRef {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
    /// As the webhook gives it: base64 of the raw digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// A document's file name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
}

/// The kinds of file a customer can send, as message types.
pub const MEDIA_KINDS: [&str; 5] = ["image", "document", "audio", "video", "sticker"];

/// A reply button.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Button {
    pub id: String,
    pub title: String,
}

/// One row of an interactive list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListRow {
    pub id: String,
    pub title: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A titled group of list rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    pub rows: Vec<ListRow>,
}

/// Where a media message's bytes are: stored as `link` or `file` beside the message's other
/// fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MediaSource {
    /// A public link WhatsApp fetches itself.
    Link { link: String },
    /// A file of the project (a path relative to its directory): the outbox sender uploads
    /// it once per channel and sends its media id.
    File { file: String },
    /// The media id an uploaded file got: what the sender puts in the request; never
    /// stored.
    Uploaded { id: String },
}

impl MediaSource {
    /// The link, the project file's path, or the upload's id: what a person reads.
    pub fn describe(&self) -> &str {
        match self {
            Self::Link { link } => link,
            Self::File { file } => file,
            Self::Uploaded { id } => id,
        }
    }
}

/// What a message says, in the shapes WhatsApp can carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutboundContent {
    Text {
        body: String,
        #[serde(default)]
        preview_url: bool,
    },
    Buttons {
        body: String,
        buttons: Vec<Button>,
    },
    List {
        body: String,
        /// The label of the button that opens the list.
        button: String,
        sections: Vec<ListSection>,
    },
    Media {
        /// image, video, audio, document or sticker.
        kind: String,
        #[serde(flatten)]
        source: MediaSource,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        caption: Option<String>,
        /// The name a document shows (else a link's last segment, a file's name).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        filename: Option<String>,
    },
    Template {
        name: String,
        language: String,
        params: Vec<String>,
    },
    /// A pin on the map, with an optional name and address under it.
    Location {
        latitude: f64,
        longitude: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        address: Option<String>,
    },
    /// Contact cards the customer can save or message.
    Contacts {
        cards: Vec<ContactCard>,
    },
    /// An emoji on one of the customer's messages (`message_id`, a wamid).
    Reaction {
        message_id: String,
        emoji: String,
    },
    /// A WhatsApp Flow (a form) behind a button labelled `cta`; its answer comes back as
    /// an `nfm_reply` carrying `token`.
    Form {
        body: String,
        flow_id: String,
        cta: String,
        token: String,
        /// The first screen, and the data it opens with.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        screen: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<serde_json::Value>,
    },
}

/// One contact card of a [`OutboundContent::Contacts`] message.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ContactCard {
    /// The name shown on the card.
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phones: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub emails: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
}

impl OutboundContent {
    pub fn text(body: impl Into<String>) -> Self {
        Self::Text {
            body: body.into(),
            preview_url: false,
        }
    }

    /// The main text, for logs, `chat` and test assertions.
    pub fn body(&self) -> &str {
        match self {
            Self::Text { body, .. } | Self::Buttons { body, .. } | Self::List { body, .. } => body,
            Self::Media { caption, .. } => caption.as_deref().unwrap_or(""),
            Self::Template { name, .. } => name,
            Self::Location { name, .. } => name.as_deref().unwrap_or(""),
            Self::Contacts { cards } => cards.first().map_or("", |c| c.name.as_str()),
            Self::Reaction { emoji, .. } => emoji,
            Self::Form { body, .. } => body,
        }
    }

    /// Whether this is a free-form (non-template) message, which needs an open window.
    pub fn is_free_form(&self) -> bool {
        !matches!(self, Self::Template { .. })
    }
}

/// A contact sent down one branch of an A/B `split` (a step of a flow).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitPass {
    pub flow: String,
    pub step: String,
    pub branch: String,
}

/// How far a contact got after a split: each stage is recorded once per contact and split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitStage {
    /// The split sent the contact down its branch.
    Reached,
    /// The contact wrote after that, in the same session.
    Replied,
    /// The session reached the end of a flow.
    Finished,
    /// The session was handed to a person.
    HandedOff,
}

impl SplitStage {
    pub const ALL: [SplitStage; 4] = [
        Self::Reached,
        Self::Replied,
        Self::Finished,
        Self::HandedOff,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reached => "reached",
            Self::Replied => "replied",
            Self::Finished => "finished",
            Self::HandedOff => "handed_off",
        }
    }
}

/// A stage reached after a split, for the store to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitMark {
    pub pass: SplitPass,
    pub stage: SplitStage,
}

/// The template a free-form message becomes outside the window (the step's `outside_window`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateFallback {
    pub name: String,
    pub language: String,
    pub params: Vec<String>,
}

/// Where an outgoing message came from, for the message log and the policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Origin {
    /// A flow step (a `say`, `ask`, `retry` or `template`).
    Step { flow: String, step: String },
    /// A script's `reply(…)`.
    Script { flow: String, step: String },
    /// The built-in apology after a failing script or flow.
    Error { flow: String, step: String },
    /// An agent's message through the API or a conversation test.
    Agent,
    /// A configured system reply (opt-in or opt-out confirmation).
    System,
    /// A campaign's message to one recipient of run `run`; `category` is the campaign's
    /// (`marketing`, `utility`, `authentication`), which its frequency cap counts by, and
    /// `on_reply` the flow a reply to it enters.
    Campaign {
        campaign: String,
        run: i64,
        category: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        on_reply: Option<String>,
    },
}

impl Origin {
    /// `step`, `script`, `error`, `agent`, `system`, `campaign`: what a policy-level
    /// template mapping matches on.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Step { .. } => "step",
            Self::Script { .. } => "script",
            Self::Error { .. } => "error",
            Self::Agent => "agent",
            Self::System => "system",
            Self::Campaign { .. } => "campaign",
        }
    }

    /// The flow that produced the message, if a flow did.
    pub fn flow(&self) -> Option<&str> {
        match self {
            Self::Step { flow, .. } | Self::Script { flow, .. } | Self::Error { flow, .. } => {
                Some(flow)
            }
            Self::Agent | Self::System | Self::Campaign { .. } => None,
        }
    }
}

/// A message the engine wants sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outbound {
    pub content: OutboundContent,
    pub origin: Origin,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outside_window: Option<TemplateFallback>,
    /// The free-form message the policy replaced with the template in `content`; every new
    /// decision starts again from it (the window may have opened since).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<OutboundContent>,
    /// The customer's message (its wamid) this message quotes: WhatsApp shows it as a reply
    /// to that message (a step's `quote: true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quote: Option<String>,
}

impl Outbound {
    pub fn new(content: OutboundContent, origin: Origin) -> Self {
        Self {
            content,
            origin,
            outside_window: None,
            original: None,
            quote: None,
        }
    }

    /// What the flow, script or agent asked to send, before any rewrite.
    pub fn requested(&self) -> &OutboundContent {
        self.original.as_ref().unwrap_or(&self.content)
    }
}

/// The policy's verdict on one outgoing message, stored with it: what happens
/// to it and, always, why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// Sent as it is.
    Send { reason: String },
    /// Outside the window: sent as this approved template instead.
    Rewritten {
        template: TemplateFallback,
        reason: String,
    },
    /// Held until the customer writes again (or `queue_ttl` passes).
    Queued { reason: String },
    /// Not sent, on purpose (consent, a marketing back-off).
    Skipped { reason: String },
    /// Queued longer than `queue_ttl`.
    Expired { reason: String },
    /// WhatsApp refused it for good.
    Failed { reason: String },
}

impl Decision {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Send { .. } => "send",
            Self::Rewritten { .. } => "rewritten",
            Self::Queued { .. } => "queued",
            Self::Skipped { .. } => "skipped",
            Self::Expired { .. } => "expired",
            Self::Failed { .. } => "failed",
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Self::Send { reason }
            | Self::Rewritten { reason, .. }
            | Self::Queued { reason }
            | Self::Skipped { reason }
            | Self::Expired { reason }
            | Self::Failed { reason } => reason,
        }
    }

    /// Whether the message goes to WhatsApp (as it is or rewritten).
    pub fn sends(&self) -> bool {
        matches!(self, Self::Send { .. } | Self::Rewritten { .. })
    }

    /// The message status a row with this decision starts in; `sent_status` is the
    /// channel's status for a message handed to it (`pending`, or `sent` in the sandbox).
    pub fn status<'a>(&self, sent_status: &'a str) -> &'a str {
        match self {
            Self::Send { .. } | Self::Rewritten { .. } => sent_status,
            Self::Queued { .. } => "queued",
            Self::Skipped { .. } => "skipped",
            Self::Expired { .. } => "expired",
            Self::Failed { .. } => "failed",
        }
    }

    /// One line for `chat` and logs: `window closed 1h12m ago → rewritten to template
    /// order_shipped (en_US)`.
    pub fn explain(&self) -> String {
        let reason = self.reason();
        match self {
            Self::Send { .. } => format!("{reason} → sent"),
            Self::Rewritten { template, .. } => format!(
                "{reason} → rewritten to template {} ({})",
                template.name, template.language
            ),
            Self::Queued { .. } => format!("{reason} → queued until the customer writes"),
            Self::Skipped { .. } => format!("{reason} → skipped"),
            Self::Expired { .. } => format!("{reason} → expired"),
            Self::Failed { .. } => format!("{reason} → failed"),
        }
    }
}

/// A duration written the way flow authors write them: `90s`, `2m`, `24h`, `7d`, `1h30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn as_duration(self) -> Duration {
        self.0
    }
}

/// Why a duration did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{input}` is not a duration: {hint}")]
pub struct DurationError {
    pub input: String,
    pub hint: &'static str,
}

/// The longest duration flowgate reads, a hundred years: a moment plus any duration stays a
/// date (chrono's dates end in the year 262143, and adding past that panics), and anything
/// longer in a flow or a config is a typo.
pub const MAX_DURATION_DAYS: i64 = 36_500;

impl std::str::FromStr for HumanDuration {
    type Err = DurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let error = |hint| DurationError {
            input: input.to_string(),
            hint,
        };
        let err = || error("write a number and a unit, e.g. 90s, 15m, 24h, 7d or 1h30m");
        let too_long = || error("it is longer than 100 years (36500d), the most flowgate reads");
        let s = input.trim();
        if s.is_empty() {
            return Err(err());
        }
        let mut total = Duration::zero();
        let mut digits = String::new();
        for c in s.chars() {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            if digits.is_empty() {
                return Err(err());
            }
            // All digits: a number that does not fit is too long.
            let n: i64 = digits.parse().map_err(|_| too_long())?;
            digits.clear();
            let part = match c {
                's' => Duration::try_seconds(n),
                'm' => Duration::try_minutes(n),
                'h' => Duration::try_hours(n),
                'd' => Duration::try_days(n),
                'w' => Duration::try_weeks(n),
                _ => return Err(err()),
            };
            total = part
                .and_then(|part| total.checked_add(&part))
                .filter(|t| *t <= Duration::days(MAX_DURATION_DAYS))
                .ok_or_else(too_long)?;
        }
        if !digits.is_empty() {
            return Err(err());
        }
        Ok(Self(total))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

/// Formats a duration compactly: `1d2h`, `25h` is `1d1h`, `90s` is `1m30s`.
pub fn format_duration(d: Duration) -> String {
    let mut secs = d.num_seconds();
    if secs == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    if secs < 0 {
        out.push('-');
        secs = -secs;
    }
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the fuzz tests: `99999999999999d` (in a `wait:`, a `timeout:` or the config)
    /// panicked in chrono instead of being refused.
    #[test]
    fn duration_99999999999999d_is_refused_not_a_panic() {
        for input in [
            "99999999999999d",
            "99999999999w",
            "36501d",
            "36500d1s",
            "9999999999999999999999s",
        ] {
            let e = input.parse::<HumanDuration>().unwrap_err();
            assert!(
                e.to_string().contains("longer than 100 years"),
                "{input}: {e}"
            );
        }
        assert_eq!(
            "36500d".parse::<HumanDuration>().unwrap(),
            HumanDuration(Duration::days(36_500))
        );
        for input in ["12x", "h", "1hh", "-1h"] {
            let e = input.parse::<HumanDuration>().unwrap_err();
            assert!(e.to_string().contains("e.g. 90s"), "{input}: {e}");
        }
    }

    #[test]
    fn identifiers_follow_one_rule() {
        assert_eq!(phone_number("+4915123456789").unwrap(), "4915123456789");
        assert_eq!(bsuid("US.ENT.abc123").unwrap(), "US.ENT.abc123");
        assert_eq!(recipient("US.1349").unwrap(), "US.1349");
        let thirty = "1".repeat(30);
        for bad in [
            "",
            "\u{0}",
            "+\u{0}",
            "order",
            &thirty,
            "0151234567",
            "1234567",
        ] {
            assert!(phone_number(bad).is_err(), "{bad:?}");
            assert!(recipient(bad).is_err(), "{bad:?}");
        }
        for bad in ["US.", "us.1", "USA.1", "US.a-b", "US.\u{0}", "order"] {
            assert!(bsuid(bad).is_err(), "{bad:?}");
        }
        // Reasons carry no control characters: they are logged and stored.
        let reason = phone_number("1\n2\u{0}").unwrap_err().to_string();
        assert!(!reason.chars().any(char::is_control), "{reason}");
    }

    #[test]
    fn durations_parse_and_print() {
        let d: HumanDuration = "1h30m".parse().unwrap();
        assert_eq!(d.0, Duration::minutes(90));
        assert_eq!("7d".parse::<HumanDuration>().unwrap().0, Duration::days(7));
        assert_eq!(format_duration(Duration::hours(25)), "1d1h");
        assert!("24".parse::<HumanDuration>().is_err());
        assert!("h".parse::<HumanDuration>().is_err());
        assert!("3y".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn window_time_never_moves_backwards() {
        let mut c = Contact::new("1555");
        let t = VirtualTime::at(10);
        c.saw_customer_message(t);
        c.saw_customer_message(VirtualTime::at(5));
        assert_eq!(c.last_customer_message_at, Some(t));
    }

    struct VirtualTime;
    impl VirtualTime {
        fn at(h: i64) -> DateTime<Utc> {
            crate::clock::VirtualClock::test_epoch() + Duration::hours(h)
        }
    }
}

/// WhatsApp's limits on messages (a text body, buttons, list rows and their titles;
/// WhatsApp refuses a message over any of them). `check` applies them to literal
/// text; [`limits::fit`] applies them at send time to interpolated text.
pub mod limits {
    use super::OutboundContent;

    pub const TEXT_BODY: usize = 4096;
    /// The body of a button message, and a media caption.
    pub const CAPTION_OR_BUTTON_BODY: usize = 1024;
    pub const MAX_BUTTONS: usize = 3;
    pub const BUTTON_TITLE: usize = 20;
    pub const BUTTON_ID: usize = 256;
    pub const LIST_BUTTON: usize = 20;
    pub const MAX_LIST_SECTIONS: usize = 10;
    pub const MAX_LIST_ROWS: usize = 10;
    pub const LIST_SECTION_TITLE: usize = 24;
    pub const LIST_ROW_ID: usize = 200;
    pub const LIST_ROW_TITLE: usize = 24;
    pub const LIST_ROW_DESCRIPTION: usize = 72;
    /// The button that opens a WhatsApp Flow (`flow_cta`).
    pub const FORM_CTA: usize = 30;

    /// Shortens text that interpolation made too long, so WhatsApp accepts the message
    /// instead of rejecting it; returns what was shortened, for the log.
    pub fn fit(content: &mut OutboundContent) -> Vec<String> {
        let mut notes = Vec::new();
        let mut cut = |text: &mut String, max: usize, what: &str| {
            if text.chars().count() > max {
                let mut s: String = text.chars().take(max - 1).collect();
                s.push('…');
                notes.push(format!("{what} shortened to {max} characters"));
                *text = s;
            }
        };
        match content {
            OutboundContent::Text { body, .. } => cut(body, TEXT_BODY, "text"),
            OutboundContent::Buttons { body, buttons } => {
                cut(body, CAPTION_OR_BUTTON_BODY, "button message body");
                for b in buttons {
                    cut(&mut b.title, BUTTON_TITLE, "button title");
                }
            }
            OutboundContent::List {
                body,
                button,
                sections,
            } => {
                cut(body, TEXT_BODY, "list body");
                cut(button, LIST_BUTTON, "list button");
                for s in sections {
                    if let Some(t) = &mut s.title {
                        cut(t, LIST_SECTION_TITLE, "section title");
                    }
                    for r in &mut s.rows {
                        cut(&mut r.title, LIST_ROW_TITLE, "row title");
                        if let Some(d) = &mut r.description {
                            cut(d, LIST_ROW_DESCRIPTION, "row description");
                        }
                    }
                }
            }
            OutboundContent::Media {
                caption: Some(c), ..
            } => cut(c, CAPTION_OR_BUTTON_BODY, "caption"),
            OutboundContent::Form { body, cta, .. } => {
                cut(body, CAPTION_OR_BUTTON_BODY, "form message body");
                cut(cta, FORM_CTA, "form button");
            }
            OutboundContent::Media { .. }
            | OutboundContent::Location { .. }
            | OutboundContent::Template { .. }
            | OutboundContent::Contacts { .. }
            | OutboundContent::Reaction { .. } => {}
        }
        notes
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::domain::Button;

        #[test]
        fn fit_shortens_interpolated_titles() {
            let mut c = OutboundContent::Buttons {
                body: "Pick".into(),
                buttons: vec![Button {
                    id: "a".into(),
                    title: "A very long button title indeed".into(),
                }],
            };
            let notes = fit(&mut c);
            assert_eq!(notes.len(), 1);
            let OutboundContent::Buttons { buttons, .. } = c else {
                unreachable!()
            };
            assert_eq!(buttons[0].title.chars().count(), 20);
        }
    }
}
