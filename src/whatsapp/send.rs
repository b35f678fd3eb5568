//! Outgoing requests to `POST /{phone-number-id}/messages` (360dialog: `POST /messages`,
//! same body) and reading what comes back.
//!
//! Owns the Cloud API body of every [`OutboundContent`], reactions and mark-as-read, and
//! [`parse_send_response`]: a wamid, or a [`GraphError`] from Meta's or 360dialog's error
//! envelope. Pure.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::errors::GraphError;
use crate::domain::{Button, ContactCard, ListSection, MediaSource, OutboundContent};

/// Who a message goes to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum Recipient {
    /// A phone number (a `wa_id`), sent as `to` with a leading `+`: without it Meta
    /// prepends the business number's country code to a number written without it.
    Phone(String),
    /// A business-scoped user id (`US.1234…`), sent as `recipient` (since February 2026 a
    /// BSUID never goes in `to`; with both, Meta uses `to`). Use it
    /// only when no phone is known; authentication templates need the phone.
    UserId(String),
}

/// The request body that sends `content` to `to`, quoting `reply_to` (a wamid) if given.
pub fn message_body(to: Recipient, content: &OutboundContent, reply_to: Option<&str>) -> Value {
    let (kind, payload) = match content {
        OutboundContent::Text { body, preview_url } => {
            ("text", json!({ "preview_url": preview_url, "body": body }))
        }
        OutboundContent::Buttons { body, buttons } => ("interactive", buttons_json(body, buttons)),
        OutboundContent::List {
            body,
            button,
            sections,
        } => ("interactive", list_json(body, button, sections)),
        OutboundContent::Media {
            kind,
            source,
            caption,
            filename,
        } => (
            kind.as_str(),
            media_json(kind, source, caption.as_deref(), filename.as_deref()),
        ),
        OutboundContent::Template {
            name,
            language,
            params,
        } => ("template", template_json(name, language, params)),
        OutboundContent::Location {
            latitude,
            longitude,
            name,
            address,
        } => {
            let mut location = json!({ "latitude": latitude, "longitude": longitude });
            if let Some(n) = name {
                location["name"] = json!(n);
            }
            if let Some(a) = address {
                location["address"] = json!(a);
            }
            ("location", location)
        }
        OutboundContent::Contacts { cards } => ("contacts", contacts_json(cards)),
        OutboundContent::Reaction { message_id, emoji } => (
            "reaction",
            json!({ "message_id": message_id, "emoji": emoji }),
        ),
        OutboundContent::Form {
            body,
            flow_id,
            cta,
            token,
            screen,
            data,
        } => (
            "interactive",
            form_json(body, flow_id, cta, token, screen.as_deref(), data.as_ref()),
        ),
    };
    let mut body = envelope(to, kind);
    if let Some(wamid) = reply_to {
        body.insert("context".into(), json!({ "message_id": wamid }));
    }
    body.insert(kind.to_string(), payload);
    Value::Object(body)
}

/// [`message_body`] for the outbox: carries `idempotency_key` as `biz_opaque_callback_data`,
/// which WhatsApp echoes in the message's status webhooks, so every attempt of one outbox
/// row can be recognised by the same key.
pub fn message_body_with_key(
    to: Recipient,
    content: &OutboundContent,
    reply_to: Option<&str>,
    idempotency_key: &str,
) -> Value {
    let mut body = message_body(to, content, reply_to);
    body["biz_opaque_callback_data"] = json!(idempotency_key);
    body
}

/// A reaction (`emoji`) to the message `message_id`; an empty emoji removes the reaction.
pub fn reaction_body(to: Recipient, message_id: &str, emoji: &str) -> Value {
    let reaction = OutboundContent::Reaction {
        message_id: message_id.into(),
        emoji: emoji.into(),
    };
    message_body(to, &reaction, None)
}

/// Marks an inbound message (and those before it) read; with `typing`, also shows "typing…"
/// until we answer or for 25 s, so only ask for it when an answer is coming.
pub fn mark_read_body(wamid: &str, typing: bool) -> Value {
    let mut body = json!({
        "messaging_product": "whatsapp",
        "status": "read",
        "message_id": wamid,
    });
    if typing {
        body["typing_indicator"] = json!({ "type": "text" });
    }
    body
}

fn envelope(to: Recipient, kind: &str) -> Map<String, Value> {
    let mut body = Map::new();
    body.insert("messaging_product".into(), json!("whatsapp"));
    body.insert("recipient_type".into(), json!("individual"));
    match to {
        Recipient::Phone(phone) => {
            let digits = phone.trim().trim_start_matches('+');
            body.insert("to".into(), json!(format!("+{digits}")));
        }
        Recipient::UserId(id) => {
            body.insert("recipient".into(), json!(id.trim()));
        }
    }
    body.insert("type".into(), json!(kind));
    body
}

/// `contacts[{name{formatted_name, first_name}, phones[{phone}], emails[{email}],
/// org{company}, urls[{url}]}]`. WhatsApp wants a name part beside `formatted_name`, so the
/// card's name is its first name too.
fn contacts_json(cards: &[ContactCard]) -> Value {
    let cards: Vec<Value> = cards
        .iter()
        .map(|c| {
            let mut card = json!({
                "name": { "formatted_name": c.name, "first_name": c.name },
            });
            let list = |key: &str, values: &[String]| -> Value {
                values.iter().map(|v| json!({ key: v })).collect()
            };
            if !c.phones.is_empty() {
                card["phones"] = list("phone", &c.phones);
            }
            if !c.emails.is_empty() {
                card["emails"] = list("email", &c.emails);
            }
            if let Some(org) = &c.org {
                card["org"] = json!({ "company": org });
            }
            if !c.urls.is_empty() {
                card["urls"] = list("url", &c.urls);
            }
            card
        })
        .collect();
    Value::Array(cards)
}

/// `interactive{type: flow, body, action{name: flow, parameters{flow_message_version: "3",
/// flow_id, flow_cta, flow_token, flow_action: navigate, flow_action_payload{screen, data}}}}`;
/// without a screen the Flow opens at its first one (no payload).
fn form_json(
    body: &str,
    flow_id: &str,
    cta: &str,
    token: &str,
    screen: Option<&str>,
    data: Option<&Value>,
) -> Value {
    let mut parameters = json!({
        "flow_message_version": "3",
        "flow_id": flow_id,
        "flow_cta": cta,
        "flow_token": token,
        "flow_action": "navigate",
    });
    if let Some(screen) = screen {
        let mut payload = json!({ "screen": screen });
        if let Some(data) = data.filter(|d| d.as_object().is_some_and(|o| !o.is_empty())) {
            payload["data"] = data.clone();
        }
        parameters["flow_action_payload"] = payload;
    }
    json!({
        "type": "flow",
        "body": { "text": body },
        "action": { "name": "flow", "parameters": parameters },
    })
}

fn buttons_json(body: &str, buttons: &[Button]) -> Value {
    let buttons: Vec<Value> = buttons
        .iter()
        .map(|b| json!({ "type": "reply", "reply": { "id": b.id, "title": b.title } }))
        .collect();
    json!({
        "type": "button",
        "body": { "text": body },
        "action": { "buttons": buttons },
    })
}

fn list_json(body: &str, button: &str, sections: &[ListSection]) -> Value {
    let sections: Vec<Value> = sections
        .iter()
        .map(|s| {
            let rows: Vec<Value> = s
                .rows
                .iter()
                .map(|r| {
                    let mut row = json!({ "id": r.id, "title": r.title });
                    if let Some(d) = &r.description {
                        row["description"] = json!(d);
                    }
                    row
                })
                .collect();
            let mut section = json!({ "rows": rows });
            if let Some(t) = &s.title {
                section["title"] = json!(t);
            }
            section
        })
        .collect();
    json!({
        "type": "list",
        "body": { "text": body },
        "action": { "button": button, "sections": sections },
    })
}

/// Media by link or by the id of an upload. Audio and stickers take no caption, so none is
/// sent for them; a document shows `filename`, else the last segment of its URL or the
/// project file's name when that looks like a file name, so the customer does not see
/// "Untitled". A project file not uploaded yet ([`MediaSource::File`]) cannot be sent: the
/// outbox sender swaps in its [`MediaSource::Uploaded`] id first; here it goes as a link to
/// nothing, which WhatsApp refuses.
fn media_json(
    kind: &str,
    source: &MediaSource,
    caption: Option<&str>,
    filename: Option<&str>,
) -> Value {
    let (mut media, default_name) = match source {
        MediaSource::Link { link } => (json!({ "link": link }), file_name(link)),
        MediaSource::Uploaded { id } => (json!({ "id": id }), None),
        MediaSource::File { file } => (
            json!({ "link": "" }),
            file.rsplit(['/', '\\']).next().filter(|n| !n.is_empty()),
        ),
    };
    if let Some(c) = caption.filter(|_| !matches!(kind, "audio" | "sticker")) {
        media["caption"] = json!(c);
    }
    if kind == "document"
        && let Some(name) = filename.or(default_name)
    {
        media["filename"] = json!(name);
    }
    media
}

fn file_name(link: &str) -> Option<&str> {
    let path = link.split(['?', '#']).next()?;
    let path = path.split_once("://").map_or(path, |(_, rest)| rest);
    let (_, name) = path.rsplit_once('/')?;
    (name.contains('.') && !name.starts_with('.') && !name.ends_with('.')).then_some(name)
}

/// `template{name, language{code}, components:[{type:body, parameters:[text…]}]}`; no
/// `components` when the template has no parameters.
fn template_json(name: &str, language: &str, params: &[String]) -> Value {
    let mut template = json!({ "name": name, "language": { "code": language } });
    if !params.is_empty() {
        let parameters: Vec<Value> = params
            .iter()
            .map(|p| json!({ "type": "text", "text": p }))
            .collect();
        template["components"] = json!([{ "type": "body", "parameters": parameters }]);
    }
    template
}

/// An accepted send: WhatsApp took the message (it is not delivered yet; statuses follow).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendOk {
    /// The message id statuses will carry.
    pub wamid: String,
    /// Only for paced templates: `accepted`, `held_for_quality_assessment` or `paused`.
    pub message_status: Option<String>,
    /// `contacts[0].wa_id`: present when sent to a phone (it may differ from the input).
    pub wa_id: Option<String>,
    /// `contacts[0].user_id`: present when sent to a BSUID.
    pub user_id: Option<String>,
}

/// Reads the answer to a send: the wamid, or the error from Meta's envelope
/// (`{"error":{code, message, error_data.details, fbtrace_id}}`), 360dialog's own
/// (`{"meta":{"httpCode","developerMessage","success":false}}`, code 0), or, for anything
/// else that is not a success, an error carrying the HTTP status and the start of the body.
pub fn parse_send_response(status: u16, body: &[u8]) -> Result<SendOk, GraphError> {
    let json = read_answer(status, body)?;
    let message = json
        .get("messages")
        .and_then(|m| m.get(0))
        .ok_or_else(|| no_message_id(status, body))?;
    let wamid = message
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty())
        .ok_or_else(|| no_message_id(status, body))?;
    let contact = json.get("contacts").and_then(|c| c.get(0));
    let contact_field = |key: &str| {
        contact
            .and_then(|c| c.get(key))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    Ok(SendOk {
        wamid: wamid.to_string(),
        message_status: message
            .get("message_status")
            .and_then(Value::as_str)
            .map(str::to_string),
        wa_id: contact_field("wa_id"),
        user_id: contact_field("user_id"),
    })
}

/// Reads the answer to a mark-as-read (`{"success": true}`).
pub fn parse_mark_read_response(status: u16, body: &[u8]) -> Result<(), GraphError> {
    let json = read_answer(status, body)?;
    if json.get("success").and_then(Value::as_bool) == Some(true) {
        Ok(())
    } else {
        Err(GraphError::http(
            status,
            format!(
                "mark-as-read answer has no `success: true`: {}",
                snippet(body)
            ),
        ))
    }
}

/// The JSON of a successful answer, or the error it carries (also for the template list).
pub(super) fn read_answer(status: u16, body: &[u8]) -> Result<Value, GraphError> {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    if let Some(error) = json.as_ref().and_then(|j| j.get("error")) {
        if error.is_object() {
            return Err(GraphError::from_graph_json(error, Some(status)));
        }
        // Some gateways put a string here.
        if let Some(message) = error.as_str() {
            return Err(GraphError::http(status, message));
        }
    }
    if let Some(meta) = json.as_ref().and_then(|j| j.get("meta"))
        && (meta.get("success").and_then(Value::as_bool) == Some(false)
            || !(200..300).contains(&status))
    {
        let message = meta
            .get("developerMessage")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| snippet(body));
        return Err(GraphError::dialog360(status, message));
    }
    match json {
        Some(json) if (200..300).contains(&status) => Ok(json),
        Some(_) => Err(GraphError::http(status, snippet(body))),
        None if (200..300).contains(&status) => Err(GraphError::http(
            status,
            format!("answer is not JSON: {}", snippet(body)),
        )),
        None => Err(GraphError::http(status, snippet(body))),
    }
}

fn no_message_id(status: u16, body: &[u8]) -> GraphError {
    GraphError::http(
        status,
        format!("answer has no `messages[0].id`: {}", snippet(body)),
    )
}

/// The start of a body, for an error message.
pub(super) fn snippet(body: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "(empty body)".into();
    }
    let mut s: String = text.chars().take(MAX).collect();
    if text.chars().count() > MAX {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_come_from_the_link_path() {
        assert_eq!(
            file_name("https://example.com/docs/invoice-ABC123.pdf?x=1#p"),
            Some("invoice-ABC123.pdf")
        );
        assert_eq!(file_name("https://example.com/download"), None);
        assert_eq!(file_name("https://example.com"), None);
        assert_eq!(file_name("https://example.com/"), None);
    }

    #[test]
    fn phones_get_exactly_one_plus() {
        let text = OutboundContent::text("hi");
        for phone in ["15555550123", "+15555550123", " 15555550123 "] {
            let body = message_body(Recipient::Phone(phone.into()), &text, None);
            assert_eq!(body["to"], "+15555550123");
            assert!(body.get("recipient").is_none());
        }
    }

    #[test]
    fn the_idempotency_key_rides_in_biz_opaque_callback_data() {
        let text = OutboundContent::text("hi");
        let to = || Recipient::Phone("15555550123".into());
        let mut keyed = message_body_with_key(to(), &text, None, "key-1");
        assert_eq!(keyed["biz_opaque_callback_data"], "key-1");
        keyed
            .as_object_mut()
            .unwrap()
            .remove("biz_opaque_callback_data");
        assert_eq!(keyed, message_body(to(), &text, None));
    }

    #[test]
    fn audio_and_stickers_carry_no_caption() {
        let audio = OutboundContent::Media {
            kind: "audio".into(),
            source: MediaSource::Link {
                link: "https://example.com/a.ogg".into(),
            },
            caption: Some("ignored".into()),
            filename: None,
        };
        let body = message_body(Recipient::Phone("1".into()), &audio, None);
        assert_eq!(
            body["audio"],
            json!({ "link": "https://example.com/a.ogg" })
        );
        assert_eq!(body["type"], "audio");
    }

    #[test]
    fn uploaded_files_go_by_id_and_documents_keep_a_name() {
        let doc = |source, filename: Option<&str>| OutboundContent::Media {
            kind: "document".into(),
            source,
            caption: Some("Our menu".into()),
            filename: filename.map(str::to_string),
        };
        let to = || Recipient::Phone("1".into());
        let uploaded = MediaSource::Uploaded { id: "77".into() };
        let body = message_body(to(), &doc(uploaded.clone(), Some("Menu.pdf")), None);
        assert_eq!(
            body["document"],
            json!({ "id": "77", "caption": "Our menu", "filename": "Menu.pdf" })
        );
        let body = message_body(to(), &doc(uploaded, None), None);
        assert_eq!(
            body["document"],
            json!({ "id": "77", "caption": "Our menu" })
        );
        // The stored shape: `file` beside the other fields, read back the same.
        let stored = doc(
            MediaSource::File {
                file: "media/menu.pdf".into(),
            },
            None,
        );
        let json = serde_json::to_value(&stored).unwrap();
        assert_eq!(json["file"], "media/menu.pdf");
        assert_eq!(json["type"], "media");
        assert_eq!(
            serde_json::from_value::<OutboundContent>(json).unwrap(),
            stored
        );
        let old: OutboundContent = serde_json::from_value(
            json!({ "type": "media", "kind": "image", "link": "https://x/y.png" }),
        )
        .unwrap();
        assert!(matches!(
            old,
            OutboundContent::Media {
                source: MediaSource::Link { .. },
                ..
            }
        ));
    }

    #[test]
    fn templates_without_params_have_no_components() {
        let t = OutboundContent::Template {
            name: "hello_world".into(),
            language: "en_US".into(),
            params: vec![],
        };
        let body = message_body(Recipient::Phone("1".into()), &t, None);
        assert_eq!(
            body["template"],
            json!({ "name": "hello_world", "language": { "code": "en_US" } })
        );
    }

    #[test]
    fn unreadable_answers_are_errors_that_say_so() {
        let e = parse_send_response(502, b"<html>Bad gateway</html>").unwrap_err();
        assert_eq!(e.http_status, Some(502));
        assert!(e.to_string().contains("Bad gateway"), "{e}");
        let e = parse_send_response(200, b"").unwrap_err();
        assert!(e.to_string().contains("not JSON"), "{e}");
        let e = parse_send_response(200, br#"{"messages":[]}"#).unwrap_err();
        assert!(e.to_string().contains("messages[0].id"), "{e}");
        let e = parse_mark_read_response(200, br#"{"success":false}"#).unwrap_err();
        assert!(e.to_string().contains("success"), "{e}");
    }
}
