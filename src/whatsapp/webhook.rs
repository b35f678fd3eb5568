//! Webhook POST bodies -> [`Update`]s.
//!
//! Owns the envelope (`object`, `entry[]`, `changes[]`, `field`, `value`) and every shape
//! inside it that flowgate reads: inbound messages (into [`Inbound`]), `system` messages
//! (identity changes), statuses, out-of-band errors, `message_template_status_update` and
//! `user_preferences`. Every other field is an [`Update::Unknown`], never an error. Pure.
//!
//! Lenient by design: Meta batches up to 1,000 updates in one POST and there is no API to
//! fetch a webhook again, so only a body that is not a WhatsApp webhook at all is an error.
//! Optional fields that are missing stay `None`; a single item that cannot be read becomes an
//! [`Update::Malformed`] with the reason and its raw JSON, and the rest of the batch goes on.
//! Phone numbers (`wa_id`, `from`, `recipient_id`) are optional throughout: since 2026 users
//! with a username may arrive with only a business-scoped user id (BSUID).
//!
//! Every identifier that names a customer (a message's sender, a system message's old and
//! new ids, a preference's) is checked here by `domain`'s rules (an E.164 phone, a BSUID):
//! an update naming someone by anything else (`""`, `"order"`, 30 digits, a NUL) is an
//! [`Update::Malformed`] with the reason, so it never becomes a contact or a reply. Statuses
//! are not checked: they name messages we sent, and a bad `recipient_id` only groups them.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::errors::GraphError;
use crate::domain::{self, Inbound, InboundContent, InvalidIdentifier, MediaRef};

/// Why a body is not a WhatsApp webhook at all. Anything smaller is an [`Update::Malformed`].
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("the webhook body is not valid JSON: {0}")]
    InvalidJson(#[from] serde_json::Error),
    #[error("the webhook body is JSON {found}, not an object")]
    NotAnObject { found: &'static str },
    #[error("the webhook is for {found}, not `whatsapp_business_account`")]
    WrongObject { found: String },
    #[error("the webhook has no `entry` array")]
    NoEntries,
}

/// One thing a webhook told us. Every variant keeps the raw JSON it was read from, for
/// storage and for reading it again when flowgate learns more.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "update", rename_all = "snake_case")]
pub enum Update {
    /// A message a customer sent (field `messages`, `value.messages[]`, any type but
    /// `system`).
    Message {
        /// The business number it was sent to: route on this.
        phone_number_id: String,
        /// The customer's phone (`from`, else the matching `contacts[].wa_id`); absent for
        /// users with a username whose phone may not be shared.
        wa_id: Option<String>,
        /// The customer's BSUID (`from_user_id`, else `contacts[].user_id`).
        user_id: Option<String>,
        /// The parent BSUID, for businesses enrolled in a parent BSUID account.
        parent_user_id: Option<String>,
        /// `contacts[].profile.name`.
        profile_name: Option<String>,
        /// `contacts[].profile.username` (e.g. `@ana_example`); never an identity key.
        username: Option<String>,
        inbound: Inbound,
        /// The Click-to-WhatsApp ad the customer came from.
        referral: Option<Box<Referral>>,
        /// `context.id`: the business message this one replies to (or whose button was
        /// tapped).
        context_id: Option<String>,
        /// The `messages[]` item.
        raw: Value,
    },
    /// A `type: system` message: the customer changed phone number or BSUID. Written by
    /// WhatsApp, not the customer, so it never opens or refreshes the service window.
    System {
        phone_number_id: String,
        wamid: String,
        timestamp: DateTime<Utc>,
        /// `system.type`: `user_changed_number`, `user_changed_user_id`…
        kind: String,
        body: Option<String>,
        /// The message's `from`: the phone the customer had.
        previous_wa_id: Option<String>,
        /// `system.wa_id`: the new phone, when it may be shared.
        new_wa_id: Option<String>,
        /// `system.previous_user_id`, else the message's `from_user_id`.
        previous_user_id: Option<String>,
        /// `system.user_id`: the new BSUID.
        new_user_id: Option<String>,
        previous_parent_user_id: Option<String>,
        new_parent_user_id: Option<String>,
        /// The `messages[]` item.
        raw: Value,
    },
    /// What happened to a message we sent (`value.statuses[]`).
    Status {
        phone_number_id: String,
        /// The id from the send response.
        wamid: String,
        status: StatusKind,
        timestamp: DateTime<Utc>,
        /// The phone we sent to; absent when we sent to a BSUID and the phone may not be
        /// shared.
        recipient_id: Option<String>,
        /// The recipient's BSUID; absent on `failed` statuses of messages sent to a phone.
        recipient_user_id: Option<String>,
        /// Why it failed (on `failed`).
        errors: Vec<GraphError>,
        /// `pricing.category`: `marketing`, `utility`, `service`, `referral_conversion`…
        pricing_category: Option<String>,
        /// `pricing.type`: `regular`, `free_customer_service` or `free_entry_point`.
        pricing_type: Option<String>,
        /// Echo of the `biz_opaque_callback_data` set on send.
        biz_opaque_callback_data: Option<String>,
        /// The `statuses[]` item.
        raw: Value,
    },
    /// An error not tied to one message (`value.errors[]`).
    Error {
        phone_number_id: Option<String>,
        errors: Vec<GraphError>,
        /// The change's `value`.
        raw: Value,
    },
    /// A template was approved, rejected, paused… (field `message_template_status_update`).
    TemplateStatus {
        /// `entry[].id`.
        waba_id: Option<String>,
        /// `entry[].time`.
        timestamp: Option<DateTime<Utc>>,
        /// `APPROVED`, `REJECTED`, `PAUSED`, `DISABLED`…
        event: String,
        name: Option<String>,
        language: Option<String>,
        template_id: Option<String>,
        /// `NONE`, `INVALID_FORMAT`…; `None` for a scheduled deletion.
        reason: Option<String>,
        /// `MARKETING`, `UTILITY` or `AUTHENTICATION`.
        category: Option<String>,
        /// The change's `value`.
        raw: Value,
    },
    /// A customer stopped or resumed marketing messages (field `user_preferences`). May come
    /// keyed only by BSUID.
    UserPreference {
        phone_number_id: Option<String>,
        wa_id: Option<String>,
        user_id: Option<String>,
        /// `marketing_messages`.
        category: Option<String>,
        value: Preference,
        detail: Option<String>,
        timestamp: Option<DateTime<Utc>>,
        /// The `user_preferences[]` item.
        raw: Value,
    },
    /// A field flowgate does not read (`account_update`, `history`…), or a `messages` value
    /// with none of `messages`, `statuses`, `errors`. Stored, never an error.
    Unknown {
        field: String,
        waba_id: Option<String>,
        /// `entry[].time`, when the entry has one.
        timestamp: Option<DateTime<Utc>>,
        /// The change's `value`: the raw JSON of this update.
        value: Value,
    },
    /// One item that could not be read; the rest of the batch is unaffected.
    Malformed {
        field: String,
        phone_number_id: Option<String>,
        /// What is wrong, e.g. "a `text` message without `text.body`".
        reason: String,
        raw: Value,
    },
}

/// The `status` of a [`Update::Status`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusKind {
    Sent,
    Delivered,
    Read,
    Failed,
    /// A voice message was first played.
    Played,
    Other(String),
}

impl StatusKind {
    pub fn parse(s: &str) -> Self {
        match s {
            "sent" => Self::Sent,
            "delivered" => Self::Delivered,
            "read" => Self::Read,
            "failed" => Self::Failed,
            "played" => Self::Played,
            other => Self::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Sent => "sent",
            Self::Delivered => "delivered",
            Self::Read => "read",
            Self::Failed => "failed",
            Self::Played => "played",
            Self::Other(s) => s,
        }
    }
}

/// The `value` of a [`Update::UserPreference`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preference {
    Stop,
    Resume,
    Other(String),
}

/// Where a customer came from when they tapped a Click-to-WhatsApp ad (`messages[].referral`).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Referral {
    pub source_url: Option<String>,
    pub source_id: Option<String>,
    /// `ad` or `post`.
    pub source_type: Option<String>,
    pub body: Option<String>,
    pub headline: Option<String>,
    pub media_type: Option<String>,
    pub image_url: Option<String>,
    pub video_url: Option<String>,
    pub thumbnail_url: Option<String>,
    /// The click id, for conversion reporting.
    pub ctwa_clid: Option<String>,
    /// `welcome_message.text`.
    pub welcome_message: Option<String>,
}

impl Update {
    /// The update's kind, for logs and storage.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Message { .. } => "message",
            Self::System { .. } => "system",
            Self::Status { .. } => "status",
            Self::Error { .. } => "error",
            Self::TemplateStatus { .. } => "template_status",
            Self::UserPreference { .. } => "user_preference",
            Self::Unknown { .. } => "unknown",
            Self::Malformed { .. } => "malformed",
        }
    }

    /// The raw JSON this update was read from.
    pub fn raw(&self) -> &Value {
        match self {
            Self::Message { raw, .. }
            | Self::System { raw, .. }
            | Self::Status { raw, .. }
            | Self::Error { raw, .. }
            | Self::TemplateStatus { raw, .. }
            | Self::UserPreference { raw, .. }
            | Self::Malformed { raw, .. } => raw,
            Self::Unknown { value, .. } => value,
        }
    }

    /// The business number the update is about, when it is about one.
    pub fn phone_number_id(&self) -> Option<&str> {
        match self {
            Self::Message {
                phone_number_id, ..
            }
            | Self::System {
                phone_number_id, ..
            }
            | Self::Status {
                phone_number_id, ..
            } => Some(phone_number_id),
            Self::Error {
                phone_number_id, ..
            }
            | Self::UserPreference {
                phone_number_id, ..
            }
            | Self::Malformed {
                phone_number_id, ..
            } => phone_number_id.as_deref(),
            Self::TemplateStatus { .. } | Self::Unknown { .. } => None,
        }
    }

    /// Whether this update opens or refreshes the customer service window: customer-authored
    /// messages do (except types flowgate cannot read); system messages and statuses never.
    pub fn refreshes_window(&self) -> bool {
        matches!(self, Self::Message { inbound, .. } if inbound.content.refreshes_window())
    }

    /// The key a replayed webhook is recognised by (delivery is at-least-once): the wamid of
    /// a message, `wamid:status` of a status, and otherwise `kind:` + a SHA-256 of the update's
    /// content (keys sorted, so the same JSON in any key order gives the same key).
    pub fn dedupe_key(&self) -> String {
        match self {
            Self::Message { inbound, .. } => inbound.id.clone(),
            Self::System { wamid, .. } => wamid.clone(),
            Self::Status { wamid, status, .. } => format!("{wamid}:{}", status.as_str()),
            Self::Error {
                phone_number_id,
                raw,
                ..
            } => hashed(self.kind(), &[phone_number_id.as_deref()], None, raw),
            Self::TemplateStatus {
                waba_id,
                timestamp,
                raw,
                ..
            } => hashed(self.kind(), &[waba_id.as_deref()], *timestamp, raw),
            Self::UserPreference {
                phone_number_id,
                raw,
                ..
            } => hashed(self.kind(), &[phone_number_id.as_deref()], None, raw),
            Self::Unknown {
                field,
                waba_id,
                timestamp,
                value,
            } => hashed(
                self.kind(),
                &[Some(field), waba_id.as_deref()],
                *timestamp,
                value,
            ),
            Self::Malformed {
                field,
                phone_number_id,
                reason,
                raw,
            } => hashed(
                self.kind(),
                &[Some(field), phone_number_id.as_deref(), Some(reason)],
                None,
                raw,
            ),
        }
    }
}

fn hashed(
    kind: &str,
    parts: &[Option<&str>],
    time: Option<DateTime<Utc>>,
    value: &Value,
) -> String {
    let mut text = String::new();
    for part in parts {
        text.push_str(part.unwrap_or(""));
        text.push('\u{0}');
    }
    if let Some(t) = time {
        text.push_str(&t.timestamp().to_string());
    }
    text.push('\u{0}');
    canonical_json(value, &mut text);
    format!("{kind}:{}", hex::encode(Sha256::digest(text.as_bytes())))
}

/// JSON with object keys sorted, whatever order they came in.
fn canonical_json(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                canonical_json(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Reads a webhook body into its updates, in the order they appear.
///
/// Errors only when the body is not a WhatsApp webhook: not JSON, not an object, an
/// `object` other than `whatsapp_business_account`, or no `entry` array.
pub fn parse_webhook(body: &[u8]) -> Result<Vec<Update>, WebhookError> {
    let json: Value = serde_json::from_slice(body)?;
    let Value::Object(envelope) = json else {
        return Err(WebhookError::NotAnObject {
            found: json_type(&json),
        });
    };
    match envelope.get("object") {
        Some(Value::String(s)) if s == "whatsapp_business_account" => {}
        Some(other) => {
            return Err(WebhookError::WrongObject {
                found: format!("`object: {other}`"),
            });
        }
        None => {
            return Err(WebhookError::WrongObject {
                found: "no `object`".into(),
            });
        }
    }
    let Some(Value::Array(entries)) = envelope.get("entry") else {
        return Err(WebhookError::NoEntries);
    };
    let mut updates = Vec::new();
    for entry in entries {
        read_entry(entry, &mut updates);
    }
    Ok(updates)
}

fn read_entry(entry: &Value, out: &mut Vec<Update>) {
    let Some(entry_obj) = entry.as_object() else {
        out.push(malformed(
            "",
            None,
            "an `entry` item is not an object",
            entry,
        ));
        return;
    };
    let waba_id = text(entry.get("id"));
    let time = timestamp(entry.get("time"));
    let changes = match entry_obj.get("changes") {
        Some(Value::Array(changes)) => changes,
        None => return,
        Some(other) => {
            out.push(malformed(
                "",
                None,
                "`entry.changes` is not an array",
                other,
            ));
            return;
        }
    };
    for change in changes {
        let field = text(change.get("field")).unwrap_or_default();
        let value = change.get("value").unwrap_or(&Value::Null);
        match field.as_str() {
            "messages" if value.is_object() => {
                read_messages_value(value, waba_id.as_deref(), time, out);
            }
            "message_template_status_update" if value.is_object() => {
                out.push(template_status(waba_id.clone(), time, value));
            }
            "user_preferences" if value.is_object() => read_preferences(value, out),
            "messages" | "message_template_status_update" | "user_preferences" => {
                out.push(malformed(
                    &field,
                    None,
                    &format!("the `{field}` change has no `value` object"),
                    change,
                ));
            }
            _ => out.push(Update::Unknown {
                field,
                waba_id: waba_id.clone(),
                timestamp: time,
                value: value.clone(),
            }),
        }
    }
}

/// The `value` of a `messages` change: messages, statuses and/or errors.
fn read_messages_value(
    value: &Value,
    waba_id: Option<&str>,
    time: Option<DateTime<Utc>>,
    out: &mut Vec<Update>,
) {
    const FIELD: &str = "messages";
    let phone_number_id = text(value.pointer("/metadata/phone_number_id"));
    let has = |key| value.get(key).is_some_and(|v| !v.is_null());
    if !has("messages") && !has("statuses") && !has("errors") {
        out.push(Update::Unknown {
            field: FIELD.into(),
            waba_id: waba_id.map(str::to_string),
            timestamp: time,
            value: value.clone(),
        });
        return;
    }
    if let Some(errors) = value.get("errors").filter(|e| !e.is_null()) {
        out.push(Update::Error {
            phone_number_id: phone_number_id.clone(),
            errors: graph_errors(Some(errors)),
            raw: value.clone(),
        });
    }
    let mut items = |key: &str| -> &[Value] {
        match value.get(key) {
            None | Some(Value::Null) => &[],
            Some(Value::Array(items)) => items,
            Some(other) => {
                let reason = format!("`value.{key}` is not an array");
                out.push(malformed(FIELD, phone_number_id.as_deref(), &reason, other));
                &[]
            }
        }
    };
    let messages = items("messages");
    let statuses = items("statuses");
    if messages.is_empty() && statuses.is_empty() {
        return;
    }
    let Some(phone_number_id) = phone_number_id else {
        for item in messages.iter().chain(statuses) {
            let reason = "the change has no `value.metadata.phone_number_id`";
            out.push(malformed(FIELD, None, reason, item));
        }
        return;
    };
    let contacts: &[Value] = value
        .get("contacts")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    for message in messages {
        let update = read_message(&phone_number_id, contacts, message)
            .unwrap_or_else(|reason| malformed(FIELD, Some(&phone_number_id), &reason, message));
        out.push(update);
    }
    for status in statuses {
        let update = read_status(&phone_number_id, status)
            .unwrap_or_else(|reason| malformed(FIELD, Some(&phone_number_id), &reason, status));
        out.push(update);
    }
}

fn read_message(
    phone_number_id: &str,
    contacts: &[Value],
    message: &Value,
) -> Result<Update, String> {
    let msg = message
        .as_object()
        .ok_or("a `messages` item is not an object")?;
    let id = required_text(msg, "id", "a message without `id`")?;
    let kind = required_text(msg, "type", "a message without `type`")?;
    let at = timestamp(msg.get("timestamp"))
        .ok_or_else(|| format!("a `{kind}` message without a valid `timestamp`"))?;
    let from = text(msg.get("from"));
    let from_user_id = text(msg.get("from_user_id"));

    if kind == "system" {
        return system_message(phone_number_id, id, at, msg, message);
    }

    let contact = find_contact(contacts, from.as_deref(), from_user_id.as_deref());
    let from_contact = |key: &str| contact.and_then(|c| text(c.get(key)));
    let wa_id = from.or_else(|| from_contact("wa_id"));
    let user_id = from_user_id.or_else(|| from_contact("user_id"));
    if wa_id.is_none() && user_id.is_none() {
        return Err(format!(
            "a `{kind}` message without a sender (`from` or `from_user_id`)"
        ));
    }
    let parent_user_id =
        text(msg.get("from_parent_user_id")).or_else(|| from_contact("parent_user_id"));
    let profile = contact.and_then(|c| c.get("profile"));
    let content = content(&kind, msg)?;
    let what = format!("a `{kind}` message");
    let wa_id = checked(&what, "from", wa_id, domain::phone_number)?;
    let user_id = checked(&what, "from_user_id", user_id, domain::bsuid)?;
    let parent_user_id = checked(&what, "from_parent_user_id", parent_user_id, domain::bsuid)?;
    Ok(Update::Message {
        phone_number_id: phone_number_id.to_string(),
        wa_id,
        user_id,
        parent_user_id,
        profile_name: profile.and_then(|p| text(p.get("name"))),
        username: profile.and_then(|p| text(p.get("username"))),
        inbound: Inbound {
            id,
            timestamp: at,
            content,
            from_ad: msg.get("referral").is_some_and(|r| r.is_object()),
        },
        referral: msg.get("referral").and_then(referral).map(Box::new),
        context_id: text(message.pointer("/context/id")),
        raw: message.clone(),
    })
}

/// A `type: system` message (an identity change), its identifiers checked.
fn system_message(
    phone_number_id: &str,
    wamid: String,
    at: DateTime<Utc>,
    msg: &Map<String, Value>,
    message: &Value,
) -> Result<Update, String> {
    const WHAT: &str = "a `system` message";
    let system = msg.get("system").and_then(Value::as_object);
    let sys = |key: &str| system.and_then(|s| text(s.get(key)));
    let bsuid = |key: &str, value| checked(WHAT, key, value, domain::bsuid);
    let phone = |key: &str, value| checked(WHAT, key, value, domain::phone_number);
    let previous_user_id = sys("previous_user_id").or_else(|| text(msg.get("from_user_id")));
    Ok(Update::System {
        phone_number_id: phone_number_id.to_string(),
        wamid,
        timestamp: at,
        kind: sys("type").unwrap_or_else(|| "unknown".into()),
        body: sys("body"),
        previous_wa_id: phone("from", text(msg.get("from")))?,
        new_wa_id: phone("system.wa_id", sys("wa_id"))?,
        previous_user_id: bsuid("system.previous_user_id", previous_user_id)?,
        new_user_id: bsuid("system.user_id", sys("user_id"))?,
        previous_parent_user_id: bsuid(
            "system.previous_parent_user_id",
            sys("previous_parent_user_id"),
        )?,
        new_parent_user_id: bsuid("system.parent_user_id", sys("parent_user_id"))?,
        raw: message.clone(),
    })
}

/// `value` (the `key` of `what`) checked by `rule`, one of `domain`'s identifier rules; the
/// reason when it breaks it.
fn checked(
    what: &str,
    key: &str,
    value: Option<String>,
    rule: fn(&str) -> Result<String, InvalidIdentifier>,
) -> Result<Option<String>, String> {
    value
        .map(|v| rule(&v).map_err(|e| format!("{what} whose `{key}` {e}")))
        .transpose()
}

/// The `contacts[]` item a message is from: by BSUID, else by phone, else the only one when
/// the message names nobody.
fn find_contact<'a>(
    contacts: &'a [Value],
    from: Option<&str>,
    from_user_id: Option<&str>,
) -> Option<&'a Value> {
    let by = |key: &str, want: &str| {
        contacts
            .iter()
            .find(|c| c.get(key).and_then(Value::as_str) == Some(want))
    };
    if let Some(found) = from_user_id.and_then(|u| by("user_id", u)) {
        return Some(found);
    }
    if let Some(found) = from.and_then(|f| by("wa_id", f)) {
        return Some(found);
    }
    match contacts {
        [only] if from.is_none() && from_user_id.is_none() => Some(only),
        _ => None,
    }
}

/// A message's content by its `type`; a type flowgate does not read is `Other`, never an error.
fn content(kind: &str, msg: &Map<String, Value>) -> Result<InboundContent, String> {
    let part = |key: &str| msg.get(key).and_then(Value::as_object);
    Ok(match kind {
        "text" => InboundContent::Text {
            body: part("text")
                .and_then(|t| text(t.get("body")))
                .ok_or("a `text` message without `text.body`")?,
        },
        "interactive" => interactive_content(part("interactive"))?,
        "button" => button_content(part("button"))?,
        "image" | "audio" | "video" | "document" | "sticker" => InboundContent::Media {
            kind: kind.to_string(),
            caption: part(kind).and_then(|m| text(m.get("caption"))),
            file: part(kind).and_then(media_ref),
        },
        "location" => location_content(part("location"))?,
        // An emoji that is absent or empty is a reaction being removed.
        "reaction" => InboundContent::Reaction {
            emoji: part("reaction")
                .and_then(|r| text(r.get("emoji")))
                .unwrap_or_default(),
        },
        // contacts, order, unsupported, and every type to come.
        other => InboundContent::Other {
            kind: other.to_string(),
        },
    })
}

/// A media message's file: its `id`, `mime_type`, `sha256` and a document's `filename`;
/// `None` without an id (nothing to fetch).
fn media_ref(media: &Map<String, Value>) -> Option<MediaRef> {
    Some(MediaRef {
        id: text(media.get("id"))?,
        mime_type: text(media.get("mime_type")),
        sha256: text(media.get("sha256")),
        filename: text(media.get("filename")),
    })
}

/// A button or list reply; any other interactive type is stored, not interpreted.
fn interactive_content(interactive: Option<&Map<String, Value>>) -> Result<InboundContent, String> {
    let interactive = interactive.ok_or("an `interactive` message without `interactive`")?;
    let itype = text(interactive.get("type")).unwrap_or_default();
    Ok(match itype.as_str() {
        "button_reply" | "list_reply" => {
            let reply = interactive.get(itype.as_str());
            let id = reply.and_then(|r| text(r.get("id")));
            let title = reply.and_then(|r| text(r.get("title")));
            let (Some(id), Some(title)) = (id, title) else {
                return Err(format!(
                    "an `interactive` message without `{itype}.id` and `{itype}.title`"
                ));
            };
            if itype == "button_reply" {
                InboundContent::ButtonReply { id, title }
            } else {
                InboundContent::ListReply { id, title }
            }
        }
        // A Flow's answer: its fields, when `response_json` holds a JSON object (else it is
        // stored, not interpreted).
        "nfm_reply" => match form_response(interactive.get("nfm_reply")) {
            Some(response) => InboundContent::FormReply { response },
            None => InboundContent::Other { kind: itype },
        },
        // Whatever comes next: stored, not interpreted.
        "" => InboundContent::Other {
            kind: "interactive".into(),
        },
        _ => InboundContent::Other { kind: itype },
    })
}

/// The fields of a Flow's answer: `nfm_reply.response_json`, a JSON object in a string.
fn form_response(reply: Option<&Value>) -> Option<Map<String, Value>> {
    let json = reply?.get("response_json")?.as_str()?;
    match serde_json::from_str(json).ok()? {
        Value::Object(fields) => Some(fields),
        _ => None,
    }
}

/// A template's quick reply button: its payload and its label, each standing in for the other.
fn button_content(button: Option<&Map<String, Value>>) -> Result<InboundContent, String> {
    let payload = button.and_then(|b| text(b.get("payload")));
    let label = button.and_then(|b| text(b.get("text")));
    match (payload, label) {
        (None, None) => Err("a `button` message without `button.payload` or `button.text`".into()),
        (payload, label) => Ok(InboundContent::TemplateButton {
            payload: payload.clone().or(label.clone()).unwrap_or_default(),
            text: label.or(payload).unwrap_or_default(),
        }),
    }
}

fn location_content(location: Option<&Map<String, Value>>) -> Result<InboundContent, String> {
    let coordinate = |key: &str| location.and_then(|l| number(l.get(key)));
    let (Some(latitude), Some(longitude)) = (coordinate("latitude"), coordinate("longitude"))
    else {
        return Err("a `location` message without numeric `latitude` and `longitude`".into());
    };
    Ok(InboundContent::Location {
        latitude,
        longitude,
    })
}

fn referral(value: &Value) -> Option<Referral> {
    let field = |key: &str| text(value.get(key));
    value.is_object().then(|| Referral {
        source_url: field("source_url"),
        source_id: field("source_id"),
        source_type: field("source_type"),
        body: field("body"),
        headline: field("headline"),
        media_type: field("media_type"),
        image_url: field("image_url"),
        video_url: field("video_url"),
        thumbnail_url: field("thumbnail_url"),
        ctwa_clid: field("ctwa_clid"),
        welcome_message: text(value.pointer("/welcome_message/text")),
    })
}

fn read_status(phone_number_id: &str, status: &Value) -> Result<Update, String> {
    let st = status
        .as_object()
        .ok_or("a `statuses` item is not an object")?;
    let wamid = required_text(st, "id", "a status without `id`")?;
    let kind = required_text(st, "status", "a status without `status`")?;
    let at = timestamp(st.get("timestamp"))
        .ok_or_else(|| format!("a `{kind}` status without a valid `timestamp`"))?;
    Ok(Update::Status {
        phone_number_id: phone_number_id.to_string(),
        wamid,
        status: StatusKind::parse(&kind),
        timestamp: at,
        recipient_id: text(st.get("recipient_id")),
        recipient_user_id: text(st.get("recipient_user_id")),
        errors: graph_errors(st.get("errors")),
        pricing_category: text(status.pointer("/pricing/category")),
        pricing_type: text(status.pointer("/pricing/type")),
        biz_opaque_callback_data: text(st.get("biz_opaque_callback_data")),
        raw: status.clone(),
    })
}

fn template_status(waba_id: Option<String>, time: Option<DateTime<Utc>>, value: &Value) -> Update {
    let field = |key: &str| text(value.get(key));
    let Some(event) = field("event") else {
        return malformed(
            "message_template_status_update",
            None,
            "a template status update without `event`",
            value,
        );
    };
    Update::TemplateStatus {
        waba_id,
        timestamp: time,
        event,
        name: field("message_template_name"),
        language: field("message_template_language"),
        template_id: field("message_template_id"),
        reason: field("reason"),
        category: field("message_template_category"),
        raw: value.clone(),
    }
}

fn read_preferences(value: &Value, out: &mut Vec<Update>) {
    const FIELD: &str = "user_preferences";
    let phone_number_id = text(value.pointer("/metadata/phone_number_id"));
    let items = match value.get("user_preferences") {
        Some(Value::Array(items)) => items,
        _ => {
            out.push(malformed(
                FIELD,
                phone_number_id.as_deref(),
                "a `user_preferences` change without a `user_preferences` array",
                value,
            ));
            return;
        }
    };
    for item in items {
        let field = |key: &str| text(item.get(key));
        let Some(choice) = field("value") else {
            out.push(malformed(
                FIELD,
                phone_number_id.as_deref(),
                "a user preference without `value`",
                item,
            ));
            continue;
        };
        let ids = preference_ids(field("wa_id"), field("user_id"));
        let (wa_id, user_id) = match ids {
            Ok(ids) => ids,
            Err(reason) => {
                out.push(malformed(FIELD, phone_number_id.as_deref(), &reason, item));
                continue;
            }
        };
        out.push(Update::UserPreference {
            phone_number_id: phone_number_id.clone(),
            wa_id,
            user_id,
            category: field("category"),
            value: match choice.as_str() {
                "stop" => Preference::Stop,
                "resume" => Preference::Resume,
                _ => Preference::Other(choice),
            },
            detail: field("detail"),
            timestamp: timestamp(item.get("timestamp")),
            raw: item.clone(),
        });
    }
}

/// A user preference's `wa_id` and `user_id`: one at least, each valid.
fn preference_ids(
    wa_id: Option<String>,
    user_id: Option<String>,
) -> Result<(Option<String>, Option<String>), String> {
    const WHAT: &str = "a user preference";
    if wa_id.is_none() && user_id.is_none() {
        return Err("a user preference without `wa_id` or `user_id`".into());
    }
    Ok((
        checked(WHAT, "wa_id", wa_id, domain::phone_number)?,
        checked(WHAT, "user_id", user_id, domain::bsuid)?,
    ))
}

fn graph_errors(errors: Option<&Value>) -> Vec<GraphError> {
    match errors {
        Some(Value::Array(items)) => items
            .iter()
            .filter(|e| e.is_object())
            .map(|e| GraphError::from_graph_json(e, None))
            .collect(),
        Some(one @ Value::Object(_)) => vec![GraphError::from_graph_json(one, None)],
        _ => vec![],
    }
}

fn malformed(field: &str, phone_number_id: Option<&str>, reason: &str, raw: &Value) -> Update {
    Update::Malformed {
        field: field.to_string(),
        phone_number_id: phone_number_id.map(str::to_string),
        reason: reason.to_string(),
        raw: raw.clone(),
    }
}

/// A string, or a number written as one (ids sometimes come as integers).
fn text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn required_text(obj: &Map<String, Value>, key: &str, missing: &str) -> Result<String, String> {
    text(obj.get(key))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| missing.to_string())
}

fn number(value: Option<&Value>) -> Option<f64> {
    match value? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|n: &f64| n.is_finite())
}

/// Unix seconds, as a string (`messages[]`, `statuses[]`) or an integer (`entry[].time`,
/// `user_preferences[]`).
fn timestamp(value: Option<&Value>) -> Option<DateTime<Utc>> {
    let secs = match value? {
        Value::Number(n) => n.as_i64()?,
        Value::String(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    DateTime::from_timestamp(secs, 0)
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
