//! Reading Meta's template list (`GET /{waba_id}/message_templates`) into registry entries
//! ([`crate::templates::Template`]) for `flowgate templates sync`. Pure: bytes in, values out;
//! [`super::Client::list_templates`] does the requests and follows the pages.
//!
//! One page looks like `{"data":[{name, language, status, category, components:[…], id}…],
//! "paging":{"cursors":{"before","after"},"next"}}`. `next` is there only when another page
//! is; `cursors.after` is there on the last page too, so only `next` is followed.
//!
//! **A template that cannot be read is skipped with a warning that names it**, never the
//! whole page: one template in a shape flowgate does not know (a new category, no body…)
//! must not stop a business from syncing the other hundred.
//!
//! How Meta's fields become the registry's:
//!
//! - **Status** ([`Status::from_meta`]): `APPROVED`, `PENDING`, `REJECTED`, `PAUSED`, `DISABLED` map
//!   one to one. The other values Meta uses (`IN_APPEAL`, `LIMIT_EXCEEDED`, `FLAGGED`,
//!   `PENDING_DELETION`, `DELETED`, `ARCHIVED`, `LOCKED`) cannot be sent either, so each
//!   goes to the nearest status that is not sendable, chosen by what has to happen before
//!   it could be sent again: `IN_APPEAL` and `LIMIT_EXCEEDED` -> `rejected` (Meta said no, or
//!   never reviewed it; only a successful appeal or a new submission changes that);
//!   `FLAGGED` -> `paused` (a quality warning that Meta lifts or turns into a pause by
//!   itself); `PENDING_DELETION`, `DELETED`, `ARCHIVED`, `LOCKED` -> `disabled` (gone or
//!   frozen until a person acts). An unknown value also becomes `disabled`, with a warning:
//!   it is safer to not send a template than to guess that it is approved.
//! - **Category**: `MARKETING`, `UTILITY`, `AUTHENTICATION`; anything else skips the
//!   template (the category decides pricing and the policy layer's rules).
//! - **Header**: `format: TEXT` -> its text. A media or location header (`IMAGE`, `VIDEO`,
//!   `DOCUMENT`, `LOCATION`…) takes one parameter at send time, so it is written as the
//!   placeholder `{{IMAGE}}` (the format's name): [`crate::templates::Template::param_count`]
//!   then counts it, and since Meta's parameter names are lowercase it can never be mistaken
//!   for (and merged with) a body parameter.
//! - **Body, footer**: their text, placeholders (`{{1}}`, `{{order_id}}`) as Meta has them.
//! - **Buttons**: `QUICK_REPLY` -> `quick_reply: <text>`; `URL` -> `url: <url>`. The
//!   registry has no shape for the others (`PHONE_NUMBER`, `COPY_CODE`, `OTP`, `FLOW`…), and
//!   flowgate sends no button parameters, so they are left out.
//! - Components of another type (`CAROUSEL`, `LIMITED_TIME_OFFER`…) are left out with a
//!   warning, since their parameters are not counted.

use serde_json::Value;

use super::errors::GraphError;
use super::send::{read_answer, snippet};
use crate::templates::{Category, Status, Template, TemplateButton};

/// One page of the template list.
#[derive(Debug, Clone, Default)]
pub struct TemplatePage {
    /// The templates that could be read, in Meta's order.
    pub templates: Vec<Template>,
    /// Templates left out, each with the reason (named, for the user).
    pub skipped: Vec<String>,
    /// Things worth knowing about templates that were read (an unknown status, a component
    /// the registry cannot hold).
    pub warnings: Vec<String>,
    /// `paging.next`: the URL of the next page, absent on the last one.
    pub next: Option<String>,
}

/// Reads one answer to `GET …/message_templates`: the templates, or the error the answer
/// carries (Meta's envelope, 360dialog's, or an HTTP error), like a send's answer.
pub fn parse_templates_page(status: u16, body: &[u8]) -> Result<TemplatePage, GraphError> {
    let json = read_answer(status, body)?;
    let Some(data) = json.get("data").and_then(Value::as_array) else {
        return Err(GraphError::http(
            status,
            format!("the template list has no `data` array: {}", snippet(body)),
        ));
    };
    let mut page = TemplatePage {
        next: json
            .get("paging")
            .and_then(|p| p.get("next"))
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_string),
        ..TemplatePage::default()
    };
    for (i, item) in data.iter().enumerate() {
        match read_template(item) {
            Ok((template, warnings)) => {
                page.warnings.extend(warnings);
                page.templates.push(template);
            }
            Err(reason) => page
                .skipped
                .push(format!("skipped {}: {reason}", describe(item, i))),
        }
    }
    Ok(page)
}

/// Reads one item of `data`; `Err` says why it cannot be a registry entry. The `Ok` side
/// carries warnings about parts left out. Checks go in a fixed order (name, language, status,
/// category, then the components in Meta's order), so the first problem is the one named.
pub fn read_template(item: &Value) -> Result<(Template, Vec<String>), String> {
    if !item.is_object() {
        return Err("it is not a JSON object".into());
    }
    let name = text(item, "name").ok_or("it has no `name`")?;
    let language = text(item, "language").ok_or("it has no `language`")?;
    let who = format!("template `{name}` ({language})");
    let mut warnings = Vec::new();
    let status = read_status(item, &who, &mut warnings)?;
    let category = read_category(item)?;
    let parts = read_components(item, &who, &mut warnings)?;
    let body = parts.body.ok_or("it has no BODY component")?;
    Ok((
        Template {
            name,
            language,
            category,
            status,
            header: parts.header,
            body,
            footer: parts.footer,
            buttons: parts.buttons,
        },
        warnings,
    ))
}

/// A trimmed, non-empty string field of `v`.
fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// The registry status of Meta's `status` (an unknown one is `disabled`, with a warning).
fn read_status(item: &Value, who: &str, warnings: &mut Vec<String>) -> Result<Status, String> {
    let status_text = text(item, "status").ok_or("it has no `status`")?;
    Ok(Status::from_meta(&status_text).unwrap_or_else(|| {
        warnings.push(format!(
            "{who} has the status `{status_text}`, which flowgate does not know: recorded as disabled"
        ));
        Status::Disabled
    }))
}

fn read_category(item: &Value) -> Result<Category, String> {
    match text(item, "category").as_deref() {
        Some(c) => map_category(c).ok_or_else(|| format!("unknown category `{c}`")),
        None => Err("it has no `category`".into()),
    }
}

/// The parts of a template its `components` hold; the body is required by the caller.
#[derive(Default)]
struct Components {
    header: Option<String>,
    body: Option<String>,
    footer: Option<String>,
    buttons: Vec<TemplateButton>,
}

fn read_components(
    item: &Value,
    who: &str,
    warnings: &mut Vec<String>,
) -> Result<Components, String> {
    let components = match item.get("components") {
        Some(Value::Array(c)) => c.as_slice(),
        Some(_) => return Err("`components` is not a list".into()),
        None => &[],
    };
    let mut parts = Components::default();
    for component in components {
        let kind = text(component, "type").unwrap_or_default().to_uppercase();
        match kind.as_str() {
            "HEADER" => parts.header = Some(read_header(component)?),
            "BODY" => parts.body = Some(text(component, "text").ok_or("its body has no `text`")?),
            "FOOTER" => parts.footer = text(component, "text"),
            "BUTTONS" => parts.buttons.extend(read_buttons(component)?),
            other => warnings.push(format!(
                "{who}: its `{}` component is left out (the registry has no place for it, so its parameters are not counted)",
                if other.is_empty() { "untyped" } else { other }
            )),
        }
    }
    Ok(parts)
}

/// A text header's text, or a media header as the placeholder `{{FORMAT}}`.
fn read_header(component: &Value) -> Result<String, String> {
    let format = text(component, "format")
        .unwrap_or_else(|| "TEXT".into())
        .to_uppercase();
    if format == "TEXT" {
        Ok(text(component, "text").ok_or("its text header has no `text`")?)
    } else {
        Ok(format!("{{{{{format}}}}}"))
    }
}

/// The quick reply and URL buttons of a `BUTTONS` component, in order.
fn read_buttons(component: &Value) -> Result<Vec<TemplateButton>, String> {
    let list = component
        .get("buttons")
        .and_then(Value::as_array)
        .ok_or("its BUTTONS component has no `buttons` list")?;
    let mut buttons = Vec::new();
    for button in list {
        match text(button, "type")
            .unwrap_or_default()
            .to_uppercase()
            .as_str()
        {
            "QUICK_REPLY" => buttons.push(TemplateButton {
                quick_reply: Some(
                    text(button, "text").ok_or("a quick reply button has no `text`")?,
                ),
                payload: None,
                url: None,
            }),
            "URL" => buttons.push(TemplateButton {
                quick_reply: None,
                payload: None,
                url: Some(text(button, "url").ok_or("a URL button has no `url`")?),
            }),
            // PHONE_NUMBER, COPY_CODE, OTP, FLOW, CATALOG…: see the module docs.
            _ => {}
        }
    }
    Ok(buttons)
}

fn map_category(category: &str) -> Option<Category> {
    match category.trim().to_uppercase().as_str() {
        "MARKETING" => Some(Category::Marketing),
        "UTILITY" => Some(Category::Utility),
        "AUTHENTICATION" => Some(Category::Authentication),
        _ => None,
    }
}

/// How a skipped item is named: `template `x` (en_US)` when it has those, else its position
/// and id, so the user can find it in WhatsApp Manager.
fn describe(item: &Value, index: usize) -> String {
    let field = |key: &str| item.get(key).and_then(Value::as_str).map(str::trim);
    match (field("name"), field("language"), field("id")) {
        (Some(name), Some(language), _) if !name.is_empty() => {
            format!("template `{name}` ({language})")
        }
        (Some(name), _, _) if !name.is_empty() => format!("template `{name}`"),
        (_, _, Some(id)) => format!("template #{} (id {id})", index + 1),
        _ => format!("template #{} of the page", index + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page as Meta sends it: positional and named parameters, a media header, a
    /// multi-language template, buttons of every kind, statuses beyond the five.
    const PAGE: &str = r#"{
      "data": [
        {
          "name": "order_shipped", "language": "en_US", "status": "APPROVED",
          "category": "UTILITY", "id": "1192339204654487",
          "components": [
            {"type": "HEADER", "format": "TEXT", "text": "Order {{1}}"},
            {"type": "BODY", "text": "Hi {{2}}, your order {{1}} shipped on {{3}}.",
             "example": {"body_text": [["Mark", "A-1", "May 1"]]}},
            {"type": "FOOTER", "text": "Reply STOP to opt out"},
            {"type": "BUTTONS", "buttons": [
              {"type": "QUICK_REPLY", "text": "Track it"},
              {"type": "URL", "text": "Open", "url": "https://shop.example/o/{{1}}"},
              {"type": "PHONE_NUMBER", "text": "Call us", "phone_number": "+15550001111"}
            ]}
          ]
        },
        {
          "name": "order_shipped", "language": "es", "status": "PAUSED",
          "category": "UTILITY", "id": "1192339204654488",
          "components": [
            {"type": "BODY", "text": "Hola {{2}}, tu pedido {{1}} salió el {{3}}."}
          ]
        },
        {
          "name": "order_ready", "language": "en_US", "status": "APPROVED",
          "category": "UTILITY", "parameter_format": "NAMED", "id": "99",
          "components": [
            {"type": "BODY", "text": "Order {{order_id}} is ready, {{first_name}}. Code {{order_id}}.",
             "example": {"body_text_named_params": [{"param_name": "order_id", "example": "A-1"}]}}
          ]
        },
        {
          "name": "spring_sale", "language": "en_US", "status": "IN_APPEAL",
          "category": "MARKETING", "id": "100",
          "components": [
            {"type": "HEADER", "format": "IMAGE", "example": {"header_handle": ["4::aW1n"]}},
            {"type": "BODY", "text": "Hi {{1}}, 20% off today."},
            {"type": "BUTTONS", "buttons": [{"type": "QUICK_REPLY", "text": "Stop promotions"}]}
          ]
        },
        {
          "name": "login_code", "language": "en_US", "status": "APPROVED",
          "category": "AUTHENTICATION", "id": "101",
          "components": [
            {"type": "BODY", "text": "*{{1}}* is your verification code.",
             "add_security_recommendation": true},
            {"type": "BUTTONS", "buttons": [{"type": "OTP", "otp_type": "COPY_CODE", "text": "Copy code"}]}
          ]
        }
      ],
      "paging": {
        "cursors": {"before": "MAZDZD", "after": "MjQZD"},
        "next": "https://graph.facebook.com/v25.0/100000000000001/message_templates?limit=5&after=MjQZD"
      }
    }"#;

    #[test]
    fn reads_a_page_of_templates() {
        let page = parse_templates_page(200, PAGE.as_bytes()).unwrap();
        assert!(page.skipped.is_empty(), "{:?}", page.skipped);
        assert!(page.warnings.is_empty(), "{:?}", page.warnings);
        assert_eq!(
            page.next.as_deref(),
            Some(
                "https://graph.facebook.com/v25.0/100000000000001/message_templates?limit=5&after=MjQZD"
            )
        );
        let t = &page.templates;
        assert_eq!(t.len(), 5);

        assert_eq!(
            (t[0].name.as_str(), t[0].language.as_str()),
            ("order_shipped", "en_US")
        );
        assert_eq!(t[0].category, Category::Utility);
        assert_eq!(t[0].status, Status::Approved);
        assert_eq!(t[0].header.as_deref(), Some("Order {{1}}"));
        assert_eq!(t[0].footer.as_deref(), Some("Reply STOP to opt out"));
        assert_eq!(t[0].param_count(), 3);
        assert_eq!(
            t[0].buttons.len(),
            2,
            "the phone button has no registry shape"
        );
        assert_eq!(t[0].buttons[0].quick_reply.as_deref(), Some("Track it"));
        assert_eq!(
            t[0].buttons[1].url.as_deref(),
            Some("https://shop.example/o/{{1}}")
        );

        // The same name in another language is its own entry.
        assert_eq!(
            (t[1].name.as_str(), t[1].language.as_str()),
            ("order_shipped", "es")
        );
        assert_eq!(t[1].status, Status::Paused);
        assert_eq!(t[1].param_count(), 3);

        // Named parameters count once per name.
        assert_eq!(t[2].param_count(), 2);
        assert_eq!(
            t[2].body,
            "Order {{order_id}} is ready, {{first_name}}. Code {{order_id}}."
        );

        // A media header is a parameter; an appeal is still a rejection.
        assert_eq!(t[3].header.as_deref(), Some("{{IMAGE}}"));
        assert_eq!(t[3].param_count(), 2);
        assert_eq!(t[3].status, Status::Rejected);
        assert_eq!(t[3].category, Category::Marketing);

        assert_eq!(t[4].category, Category::Authentication);
        assert!(t[4].buttons.is_empty());
        assert_eq!(t[4].param_count(), 1);
    }

    #[test]
    fn a_template_that_cannot_be_read_is_skipped_by_name() {
        let body = r#"{"data": [
            {"name": "good", "language": "en_US", "status": "APPROVED", "category": "UTILITY",
             "components": [{"type": "BODY", "text": "Hello"}]},
            {"name": "no_body", "language": "en_US", "status": "APPROVED", "category": "UTILITY",
             "components": [{"type": "HEADER", "format": "TEXT", "text": "Hi"}]},
            {"name": "odd_category", "language": "de", "status": "APPROVED", "category": "TRANSACTIONAL",
             "components": [{"type": "BODY", "text": "Hallo"}]},
            {"language": "en_US", "id": "555", "status": "APPROVED", "category": "UTILITY",
             "components": [{"type": "BODY", "text": "nameless"}]},
            "not even an object"
        ], "paging": {"cursors": {"before": "a", "after": "b"}}}"#;
        let page = parse_templates_page(200, body.as_bytes()).unwrap();
        assert_eq!(page.templates.len(), 1);
        assert_eq!(page.templates[0].name, "good");
        assert_eq!(page.next, None, "`after` alone is not a next page");
        assert_eq!(
            page.skipped,
            vec![
                "skipped template `no_body` (en_US): it has no BODY component",
                "skipped template `odd_category` (de): unknown category `TRANSACTIONAL`",
                "skipped template #4 (id 555): it has no `name`",
                "skipped template #5 of the page: it is not a JSON object",
            ]
        );
    }

    #[test]
    fn every_status_meta_uses_maps_to_one_that_is_not_sendable_unless_approved() {
        for s in [
            "PENDING",
            "REJECTED",
            "PAUSED",
            "DISABLED",
            "IN_APPEAL",
            "PENDING_DELETION",
            "DELETED",
            "ARCHIVED",
            "LIMIT_EXCEEDED",
            "LOCKED",
            "FLAGGED",
        ] {
            let mapped = Status::from_meta(s).unwrap_or_else(|| panic!("{s} is not mapped"));
            assert_ne!(mapped, Status::Approved, "{s}");
        }
        assert_eq!(Status::from_meta("approved"), Some(Status::Approved));
        assert_eq!(Status::from_meta("REINSTATED_SOMEHOW"), None);
    }

    #[test]
    fn an_unknown_status_is_disabled_with_a_warning() {
        let item = serde_json::json!({"name": "x", "language": "en_US", "status": "SHADOWED",
            "category": "MARKETING", "components": [{"type": "BODY", "text": "Hi"},
            {"type": "CAROUSEL", "cards": []}]});
        let (t, warnings) = read_template(&item).unwrap();
        assert_eq!(t.status, Status::Disabled);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("`SHADOWED`"), "{warnings:?}");
        assert!(warnings[1].contains("`CAROUSEL`"), "{warnings:?}");
    }

    #[test]
    fn errors_come_back_as_graph_errors() {
        let body = r#"{"error": {"message": "Error validating access token", "type": "OAuthException", "code": 190, "fbtrace_id": "Ab"}}"#;
        let e = parse_templates_page(401, body.as_bytes()).unwrap_err();
        assert_eq!(e.code, 190);
        assert_eq!(e.http_status, Some(401));

        let e = parse_templates_page(200, br#"{"templates": []}"#).unwrap_err();
        assert!(e.message.contains("no `data` array"), "{e}");
    }
}
