//! The `whatsapp` module against the payloads in `tests/fixtures/whatsapp/` (copies of
//! `shared/whatsapp/payloads/`: Meta's documented shapes with invented test values).

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use flowgate::domain::{
    Button, InboundContent, ListRow, ListSection, MediaSource, OutboundContent,
};
use flowgate::whatsapp::errors::NO_CODE;
use flowgate::whatsapp::{
    Client, Endpoint, ErrorClass, ErrorOrigin, GraphError, Preference, Recipient, SignatureError,
    StatusKind, Update, WebhookError, classify, mark_read_body, message_body,
    parse_mark_read_response, parse_send_response, parse_webhook, reaction_body,
    verify_shared_secret, verify_signature,
};
use serde_json::{Value, json};

const PHONE_NUMBER_ID: &str = "110000000000001";
const WA_ID: &str = "15555550123";
const BSUID: &str = "US.20000000000000000123";
const SENT_WAMID: &str = "wamid.HBgLMTU1NTU1NTAxMjMVAgARGBIxQTJCM0M0RDVFNkY3QTgwOTEA";

fn path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/whatsapp")
        .join(name)
}

fn bytes(name: &str) -> Vec<u8> {
    std::fs::read(path(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn fixture(name: &str) -> Value {
    serde_json::from_slice(&bytes(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn all_fixtures() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(path(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    names
}

fn webhook_fixtures() -> Vec<String> {
    all_fixtures()
        .into_iter()
        .filter(|n| fixture(n).get("object").is_some())
        .collect()
}

/// The one update a single-event fixture holds.
fn one(name: &str) -> Update {
    let mut updates = parse_webhook(&bytes(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(updates.len(), 1, "{name}: {updates:#?}");
    updates.remove(0)
}

fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap()
}

/// The first `messages[]` / `statuses[]` item of a fixture: what `raw` must hold.
fn first_item(name: &str, key: &str) -> Value {
    fixture(name)["entry"][0]["changes"][0]["value"][key][0].clone()
}

// ---------------------------------------------------------------------------------------
// Inbound messages

/// The parts of a `Message` update the inbound fixtures check.
struct Msg {
    wa_id: Option<String>,
    user_id: Option<String>,
    profile_name: Option<String>,
    username: Option<String>,
    id: String,
    timestamp: DateTime<Utc>,
    content: InboundContent,
    context_id: Option<String>,
    update: Update,
}

fn message(name: &str) -> Msg {
    let update = one(name);
    let Update::Message {
        phone_number_id,
        wa_id,
        user_id,
        profile_name,
        username,
        inbound,
        context_id,
        raw,
        ..
    } = &update
    else {
        panic!("{name}: not a message: {update:#?}")
    };
    assert_eq!(phone_number_id, PHONE_NUMBER_ID, "{name}");
    assert_eq!(
        raw,
        &first_item(name, "messages"),
        "{name}: raw is the item"
    );
    assert_eq!(update.dedupe_key(), inbound.id, "{name}: deduped by wamid");
    assert_eq!(update.phone_number_id(), Some(PHONE_NUMBER_ID));
    assert_eq!(update.kind(), "message");
    Msg {
        wa_id: wa_id.clone(),
        user_id: user_id.clone(),
        profile_name: profile_name.clone(),
        username: username.clone(),
        id: inbound.id.clone(),
        timestamp: inbound.timestamp,
        content: inbound.content.clone(),
        context_id: context_id.clone(),
        update: update.clone(),
    }
}

#[test]
fn text_message() {
    let m = message("inbound_text.json");
    assert_eq!(m.wa_id.as_deref(), Some(WA_ID));
    assert_eq!(m.user_id, None);
    assert_eq!(m.profile_name.as_deref(), Some("Ana Example"));
    assert_eq!(
        m.id,
        "wamid.HBgLMTU1NTU1NTAxMjMVAgASGBQzQTAwMDAwMDAwMDAwMDAwMDAwMQA="
    );
    assert_eq!(m.timestamp, at(1_760_000_000));
    assert_eq!(m.content, InboundContent::text("Hi, is my order shipped?"));
    assert_eq!(m.context_id, None);
    assert!(m.update.refreshes_window());
}

#[test]
fn interactive_button_reply() {
    let m = message("inbound_interactive_button_reply.json");
    assert_eq!(
        m.content,
        InboundContent::ButtonReply {
            id: "order_status".into(),
            title: "Order status".into()
        }
    );
    assert_eq!(m.context_id.as_deref(), Some(SENT_WAMID));
    assert_eq!(m.timestamp, at(1_760_000_060));
}

#[test]
fn interactive_list_reply() {
    let m = message("inbound_interactive_list_reply.json");
    assert_eq!(
        m.content,
        InboundContent::ListReply {
            id: "ship_express".into(),
            title: "Express".into()
        }
    );
    assert_eq!(m.context_id.as_deref(), Some(SENT_WAMID));
}

#[test]
fn template_quick_reply_button() {
    let m = message("inbound_button_quick_reply.json");
    assert_eq!(
        m.content,
        InboundContent::TemplateButton {
            payload: "STOP_PROMOTIONS".into(),
            text: "Stop promotions".into()
        }
    );
    assert_eq!(m.content.button_id(), Some("STOP_PROMOTIONS"));
    assert_eq!(m.context_id.as_deref(), Some(SENT_WAMID));
    assert!(m.update.refreshes_window());
}

#[test]
fn image_with_caption() {
    let m = message("inbound_image.json");
    assert_eq!(
        m.content,
        InboundContent::Media {
            kind: "image".into(),
            caption: Some("Damaged box".into()),
            file: Some(flowgate::domain::MediaRef {
                id: "1200000000000001".into(),
                mime_type: Some("image/jpeg".into()),
                sha256: Some("2d6YhK0Ej1nR0fXo5gW4k7w8T1sZc3e9Qm0aB6cD8eE=".into()),
                filename: None,
            }),
        }
    );
}

#[test]
fn location() {
    let m = message("inbound_location.json");
    assert_eq!(
        m.content,
        InboundContent::Location {
            latitude: 37.44221496582,
            longitude: -122.16165924072
        }
    );
}

#[test]
fn click_to_whatsapp_referral() {
    let update = one("inbound_text_ctwa_referral.json");
    let Update::Message {
        referral, inbound, ..
    } = &update
    else {
        panic!("{update:#?}")
    };
    assert_eq!(
        inbound.content,
        InboundContent::text("Hello! Can I get more info on this?")
    );
    let r = referral.as_deref().expect("referral");
    assert_eq!(r.source_url.as_deref(), Some("https://fb.me/EXAMPLE"));
    assert_eq!(r.source_id.as_deref(), Some("120000000000000001"));
    assert_eq!(r.source_type.as_deref(), Some("ad"));
    assert_eq!(r.body.as_deref(), Some("Spring sale on all plants"));
    assert_eq!(r.headline.as_deref(), Some("Chat with us"));
    assert_eq!(r.media_type.as_deref(), Some("image"));
    assert_eq!(
        r.image_url.as_deref(),
        Some("https://scontent.xx.fbcdn.net/v/example.jpg")
    );
    assert_eq!(
        r.ctwa_clid.as_deref(),
        Some("ARAkLkExampleClickIdOnlyForTests")
    );
    assert_eq!(
        r.welcome_message.as_deref(),
        Some("Hi there! Let us know how we can help!")
    );
    assert_eq!(r.video_url, None);
}

#[test]
fn reaction() {
    let m = message("inbound_reaction.json");
    assert_eq!(
        m.content,
        InboundContent::Reaction {
            emoji: "👍".into()
        }
    );
}

#[test]
fn unsupported_is_other_and_does_not_refresh_the_window() {
    let m = message("inbound_unsupported.json");
    assert_eq!(
        m.content,
        InboundContent::Other {
            kind: "unsupported".into()
        }
    );
    assert!(!m.update.refreshes_window());
}

#[test]
fn system_user_changed_number() {
    let update = one("inbound_system_user_changed_number.json");
    let Update::System {
        phone_number_id,
        wamid,
        timestamp,
        kind,
        body,
        previous_wa_id,
        new_wa_id,
        previous_user_id,
        new_user_id,
        raw,
        ..
    } = &update
    else {
        panic!("{update:#?}")
    };
    assert_eq!(phone_number_id, PHONE_NUMBER_ID);
    assert_eq!(wamid, "wamid.HBgLMTU1NTU1NTAxMjMVAgASGAoxMTgyMDg2MjY3AA==");
    assert_eq!(*timestamp, at(1_760_000_800));
    assert_eq!(kind, "user_changed_number");
    assert_eq!(
        body.as_deref(),
        Some("User Ana Example changed from 15555550123 to 15555550999")
    );
    assert_eq!(previous_wa_id.as_deref(), Some(WA_ID));
    assert_eq!(new_wa_id.as_deref(), Some("15555550999"));
    assert_eq!((previous_user_id, new_user_id), (&None, &None));
    assert_eq!(
        raw,
        &first_item("inbound_system_user_changed_number.json", "messages")
    );
    assert!(!update.refreshes_window(), "system messages never refresh");
    assert_eq!(update.dedupe_key(), *wamid);
}

#[test]
fn system_user_changed_user_id() {
    let update = one("inbound_system_user_changed_user_id.json");
    let Update::System {
        kind,
        previous_wa_id,
        new_wa_id,
        previous_user_id,
        new_user_id,
        ..
    } = &update
    else {
        panic!("{update:#?}")
    };
    assert_eq!(kind, "user_changed_user_id");
    assert_eq!((previous_wa_id, new_wa_id), (&None, &None));
    assert_eq!(previous_user_id.as_deref(), Some(BSUID));
    assert_eq!(new_user_id.as_deref(), Some("US.20000000000000000456"));
    assert!(!update.refreshes_window());
}

#[test]
fn bsuid_and_phone() {
    let m = message("inbound_text_bsuid.json");
    assert_eq!(m.wa_id.as_deref(), Some(WA_ID));
    assert_eq!(m.user_id.as_deref(), Some(BSUID));
    assert_eq!(m.profile_name.as_deref(), Some("Ana Example"));
    assert_eq!(m.username, None);
}

#[test]
fn username_only_user_has_no_phone() {
    let m = message("inbound_text_username_only.json");
    assert_eq!(m.wa_id, None);
    assert_eq!(m.user_id.as_deref(), Some(BSUID));
    assert_eq!(m.profile_name.as_deref(), Some("Ana Example"));
    assert_eq!(m.username.as_deref(), Some("@ana_example"));
    assert_eq!(
        m.content,
        InboundContent::text("Does it come in another color?")
    );
    assert!(m.update.refreshes_window());
}

#[test]
fn the_sender_is_joined_to_its_contact_by_bsuid_then_phone() {
    let body = json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": "1", "changes": [{ "field": "messages", "value": {
            "metadata": { "phone_number_id": PHONE_NUMBER_ID },
            "contacts": [
                { "profile": { "name": "Bo" }, "wa_id": "15550000111", "user_id": "US.1" },
                { "profile": { "name": "Cy", "username": "@cy" }, "user_id": "US.2" },
                { "profile": { "name": "Di" }, "wa_id": "15550000333" }
            ],
            "messages": [
                { "from_user_id": "US.2", "id": "w2", "timestamp": "1", "type": "text", "text": { "body": "b" } },
                { "from": "15550000333", "id": "w3", "timestamp": "1", "type": "text", "text": { "body": "c" } },
                { "from": "15550000111", "from_user_id": "US.1", "id": "w1", "timestamp": "1", "type": "text", "text": { "body": "a" } },
                { "from": "15550000444", "id": "w4", "timestamp": "1", "type": "text", "text": { "body": "d" } }
            ]
        }}]}]
    });
    let updates = parse_webhook(body.to_string().as_bytes()).unwrap();
    let seen: Vec<_> = updates
        .iter()
        .map(|u| match u {
            Update::Message {
                wa_id,
                user_id,
                profile_name,
                username,
                ..
            } => (
                wa_id.clone(),
                user_id.clone(),
                profile_name.clone(),
                username.clone(),
            ),
            other => panic!("{other:#?}"),
        })
        .collect();
    let s = |v: &str| Some(v.to_string());
    assert_eq!(
        seen,
        [
            (None, s("US.2"), s("Cy"), s("@cy")),
            (s("15550000333"), None, s("Di"), None),
            (s("15550000111"), s("US.1"), s("Bo"), None),
            // Nobody in `contacts` is 444: no profile rather than someone else's.
            (s("15550000444"), None, None, None),
        ]
    );
}

#[test]
fn other_message_types() {
    let body = json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": "1", "changes": [{ "field": "messages", "value": {
            "metadata": { "phone_number_id": PHONE_NUMBER_ID },
            "messages": [
                { "from": "15550000001", "id": "a", "timestamp": "1", "type": "video", "video": { "caption": "clip", "id": "9" } },
                { "from": "15550000001", "id": "b", "timestamp": "1", "type": "audio", "audio": { "id": "9", "voice": true } },
                { "from": "15550000001", "id": "c", "timestamp": "1", "type": "document", "document": { "filename": "x.pdf", "id": "9" } },
                { "from": "15550000001", "id": "d", "timestamp": "1", "type": "sticker", "sticker": { "id": "9", "animated": false } },
                { "from": "15550000001", "id": "e", "timestamp": "1", "type": "contacts", "contacts": [{ "name": { "formatted_name": "X" } }] },
                { "from": "15550000001", "id": "f", "timestamp": "1", "type": "order", "order": { "catalog_id": "1" } },
                { "from": "15550000001", "id": "g", "timestamp": "1", "type": "interactive", "interactive": { "type": "nfm_reply", "nfm_reply": {} } },
                { "from": "15550000001", "id": "h", "timestamp": "1", "type": "reaction", "reaction": { "message_id": "x" } },
                { "from": "15550000001", "id": "i", "timestamp": 2, "type": "brand_new_type", "brand_new_type": {} }
            ]
        }}]}]
    });
    let contents: Vec<InboundContent> = parse_webhook(body.to_string().as_bytes())
        .unwrap()
        .into_iter()
        .map(|u| match u {
            Update::Message { inbound, .. } => inbound.content,
            other => panic!("{other:#?}"),
        })
        .collect();
    let media = |kind: &str, caption: Option<&str>| InboundContent::Media {
        kind: kind.into(),
        caption: caption.map(Into::into),
        file: Some(flowgate::domain::MediaRef {
            id: "9".into(),
            mime_type: None,
            sha256: None,
            filename: (kind == "document").then(|| "x.pdf".into()),
        }),
    };
    let other = |kind: &str| InboundContent::Other { kind: kind.into() };
    assert_eq!(
        contents,
        [
            media("video", Some("clip")),
            media("audio", None),
            media("document", None),
            media("sticker", None),
            other("contacts"),
            other("order"),
            other("nfm_reply"),
            // A reaction without an emoji is a reaction being removed.
            InboundContent::Reaction {
                emoji: String::new()
            },
            other("brand_new_type"),
        ]
    );
}

// ---------------------------------------------------------------------------------------
// Statuses, errors, templates, preferences

struct St {
    status: StatusKind,
    timestamp: DateTime<Utc>,
    recipient_id: Option<String>,
    recipient_user_id: Option<String>,
    errors: Vec<GraphError>,
    pricing: (Option<String>, Option<String>),
}

fn status(name: &str) -> St {
    let update = one(name);
    let Update::Status {
        phone_number_id,
        wamid,
        status,
        timestamp,
        recipient_id,
        recipient_user_id,
        errors,
        pricing_category,
        pricing_type,
        raw,
        ..
    } = &update
    else {
        panic!("{name}: {update:#?}")
    };
    assert_eq!(phone_number_id, PHONE_NUMBER_ID);
    assert_eq!(wamid, SENT_WAMID);
    assert_eq!(raw, &first_item(name, "statuses"));
    assert_eq!(
        update.dedupe_key(),
        format!("{SENT_WAMID}:{}", status.as_str())
    );
    assert!(!update.refreshes_window());
    St {
        status: status.clone(),
        timestamp: *timestamp,
        recipient_id: recipient_id.clone(),
        recipient_user_id: recipient_user_id.clone(),
        errors: errors.clone(),
        pricing: (pricing_category.clone(), pricing_type.clone()),
    }
}

fn pricing(category: &str, kind: &str) -> (Option<String>, Option<String>) {
    (Some(category.into()), Some(kind.into()))
}

#[test]
fn status_sent_marketing() {
    let s = status("status_sent_marketing_v23.json");
    assert_eq!(s.status, StatusKind::Sent);
    assert_eq!(s.timestamp, at(1_760_000_500));
    assert_eq!(s.recipient_id.as_deref(), Some(WA_ID));
    assert_eq!(s.recipient_user_id, None);
    assert!(s.errors.is_empty());
    assert_eq!(s.pricing, pricing("marketing", "regular"));
}

#[test]
fn status_delivered_free_utility() {
    let s = status("status_delivered_utility_free_csw.json");
    assert_eq!(s.status, StatusKind::Delivered);
    assert_eq!(s.pricing, pricing("utility", "free_customer_service"));
}

#[test]
fn status_read_without_pricing() {
    let s = status("status_read_v24.json");
    assert_eq!(s.status, StatusKind::Read);
    assert_eq!(s.pricing, (None, None));
}

#[test]
fn status_sent_free_entry_point() {
    let s = status("status_sent_free_entry_point.json");
    assert_eq!(s.status, StatusKind::Sent);
    assert_eq!(
        s.pricing,
        pricing("referral_conversion", "free_entry_point")
    );
}

#[test]
fn failed_statuses_carry_their_errors() {
    for (name, code, class, details) in [
        (
            "status_failed_131047.json",
            131047,
            ErrorClass::Reengage,
            "Message failed to send because more than 24 hours have passed since the customer last replied to this number.",
        ),
        (
            "status_failed_131049.json",
            131049,
            ErrorClass::EcosystemBackoff,
            "In order to maintain a healthy ecosystem engagement, the message failed to be delivered.",
        ),
        (
            "status_failed_131050.json",
            131050,
            ErrorClass::MarketingOptOut,
            "Unable to deliver the message. This recipient has chosen to stop receiving marketing messages on WhatsApp from your business",
        ),
    ] {
        let s = status(name);
        assert_eq!(s.status, StatusKind::Failed, "{name}");
        assert_eq!(s.errors.len(), 1, "{name}");
        let e = &s.errors[0];
        assert_eq!(e.code, code, "{name}");
        assert_eq!(e.details.as_deref(), Some(details), "{name}");
        assert_eq!(e.title.as_deref(), Some(e.message.as_str()), "{name}");
        assert_eq!(e.http_status, None, "{name}: came in a webhook");
        assert_eq!(e.origin, ErrorOrigin::Graph);
        assert_eq!(e.class(), class, "{name}");
    }
}

#[test]
fn out_of_band_errors() {
    let update = one("webhook_errors_130429.json");
    let Update::Error {
        phone_number_id,
        errors,
        raw,
    } = &update
    else {
        panic!("{update:#?}")
    };
    assert_eq!(phone_number_id.as_deref(), Some(PHONE_NUMBER_ID));
    assert_eq!(
        raw,
        &fixture("webhook_errors_130429.json")["entry"][0]["changes"][0]["value"]
    );
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].code, 130429);
    assert_eq!(errors[0].message, "Rate limit hit");
    assert_eq!(errors[0].class(), ErrorClass::RateLimited);
    assert!(update.dedupe_key().starts_with("error:"));
    // The same webhook again is recognised; another number's error is not the same one.
    assert_eq!(
        update.dedupe_key(),
        one("webhook_errors_130429.json").dedupe_key()
    );
}

#[test]
fn template_status_updates() {
    for (name, event, template, language, id, reason, category) in [
        (
            "message_template_status_update_approved.json",
            "APPROVED",
            "order_update",
            "en_US",
            "1700000000000001",
            "NONE",
            "UTILITY",
        ),
        (
            "message_template_status_update_rejected.json",
            "REJECTED",
            "spring_promo",
            "en",
            "1700000000000002",
            "INVALID_FORMAT",
            "MARKETING",
        ),
        (
            "message_template_status_update_paused.json",
            "PAUSED",
            "winback_offer",
            "en_US",
            "1700000000000003",
            "NONE",
            "MARKETING",
        ),
    ] {
        let update = one(name);
        let Update::TemplateStatus {
            waba_id,
            timestamp,
            event: e,
            name: n,
            language: l,
            template_id,
            reason: r,
            category: c,
            raw,
        } = &update
        else {
            panic!("{name}: {update:#?}")
        };
        assert_eq!(waba_id.as_deref(), Some("100000000000001"), "{name}");
        assert_eq!(*timestamp, Some(at(1_760_000_600)), "{name}");
        assert_eq!(e, event, "{name}");
        assert_eq!(n.as_deref(), Some(template), "{name}");
        assert_eq!(l.as_deref(), Some(language), "{name}");
        assert_eq!(template_id.as_deref(), Some(id), "{name}");
        assert_eq!(r.as_deref(), Some(reason), "{name}");
        assert_eq!(c.as_deref(), Some(category), "{name}");
        assert_eq!(raw, &fixture(name)["entry"][0]["changes"][0]["value"]);
        assert_eq!(update.phone_number_id(), None);
        assert!(update.dedupe_key().starts_with("template_status:"));
    }
}

#[test]
fn a_template_status_at_another_time_is_another_update() {
    let mut later = fixture("message_template_status_update_approved.json");
    later["entry"][0]["time"] = json!(1_760_009_999);
    let later = parse_webhook(later.to_string().as_bytes()).unwrap();
    assert_ne!(
        later[0].dedupe_key(),
        one("message_template_status_update_approved.json").dedupe_key()
    );
}

#[test]
fn marketing_stop() {
    let update = one("user_preferences_stop.json");
    let Update::UserPreference {
        phone_number_id,
        wa_id,
        user_id,
        category,
        value,
        detail,
        timestamp,
        raw,
    } = &update
    else {
        panic!("{update:#?}")
    };
    assert_eq!(phone_number_id.as_deref(), Some(PHONE_NUMBER_ID));
    assert_eq!(wa_id.as_deref(), Some(WA_ID));
    assert_eq!(user_id, &None);
    assert_eq!(category.as_deref(), Some("marketing_messages"));
    assert_eq!(value, &Preference::Stop);
    assert_eq!(
        detail.as_deref(),
        Some("User requested to stop marketing messages")
    );
    assert_eq!(*timestamp, Some(at(1_760_000_700)), "an integer timestamp");
    assert_eq!(
        raw,
        &fixture("user_preferences_stop.json")["entry"][0]["changes"][0]["value"]["user_preferences"]
            [0]
    );
    assert!(update.dedupe_key().starts_with("user_preference:"));
}

#[test]
fn marketing_resume_keyed_only_by_bsuid() {
    let mut body = fixture("user_preferences_stop.json");
    let value = &mut body["entry"][0]["changes"][0]["value"];
    value["contacts"] = json!([{ "user_id": BSUID, "profile": { "username": "@ana_example" } }]);
    value["user_preferences"] = json!([{
        "user_id": BSUID,
        "detail": "User requested to resume marketing messages",
        "category": "marketing_messages",
        "value": "resume",
        "timestamp": 1_760_000_900
    }]);
    let updates = parse_webhook(body.to_string().as_bytes()).unwrap();
    let [
        Update::UserPreference {
            wa_id,
            user_id,
            value,
            ..
        },
    ] = updates.as_slice()
    else {
        panic!("{updates:#?}")
    };
    assert_eq!(wa_id, &None);
    assert_eq!(user_id.as_deref(), Some(BSUID));
    assert_eq!(value, &Preference::Resume);
}

// ---------------------------------------------------------------------------------------
// Batches, leniency, errors

#[test]
fn a_batch_of_1000_messages_in_order() {
    let contacts: Vec<Value> = (0..1000)
        .map(|i| json!({ "profile": { "name": format!("User {i}") }, "wa_id": format!("1555000{i:04}") }))
        .collect();
    let messages: Vec<Value> = (0..1000)
        .map(|i| {
            json!({
                "from": format!("1555000{i:04}"),
                "id": format!("wamid.batch.{i}"),
                "timestamp": (1_760_000_000 + i).to_string(),
                "type": "text",
                "text": { "body": format!("message {i}") }
            })
        })
        .collect();
    let body = json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": "100000000000001", "changes": [{ "field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": { "display_phone_number": "15550001111", "phone_number_id": PHONE_NUMBER_ID },
            "contacts": contacts,
            "messages": messages
        }}]}]
    });
    let updates = parse_webhook(body.to_string().as_bytes()).unwrap();
    assert_eq!(updates.len(), 1000);
    for (i, update) in updates.iter().enumerate() {
        let Update::Message {
            wa_id,
            profile_name,
            inbound,
            ..
        } = update
        else {
            panic!("{i}: {update:#?}")
        };
        assert_eq!(wa_id.as_deref(), Some(format!("1555000{i:04}").as_str()));
        assert_eq!(profile_name.as_deref(), Some(format!("User {i}").as_str()));
        assert_eq!(inbound.id, format!("wamid.batch.{i}"));
        assert_eq!(inbound.timestamp, at(1_760_000_000 + i as i64));
        assert_eq!(inbound.content.as_text(), format!("message {i}"));
    }
    let keys: std::collections::HashSet<String> = updates.iter().map(Update::dedupe_key).collect();
    assert_eq!(keys.len(), 1000);
}

#[test]
fn many_entries_and_changes_in_one_post() {
    // Every webhook fixture's entries in one envelope, plus a change mixing messages and
    // statuses.
    let names = webhook_fixtures();
    let mut entries: Vec<Value> = names
        .iter()
        .flat_map(|n| fixture(n)["entry"].as_array().unwrap().clone())
        .collect();
    let mut mixed = fixture("inbound_text.json")["entry"][0].clone();
    mixed["changes"][0]["value"]["statuses"] =
        json!([first_item("status_read_v24.json", "statuses")]);
    entries.push(mixed);
    let body = json!({ "object": "whatsapp_business_account", "entry": entries });
    let updates = parse_webhook(body.to_string().as_bytes()).unwrap();
    assert_eq!(updates.len(), names.len() + 2);
    let separately: Vec<Update> = names.iter().map(|n| one(n)).collect();
    assert_eq!(&updates[..names.len()], separately.as_slice());
    assert_eq!(updates[names.len()].kind(), "message");
    assert_eq!(updates[names.len() + 1].kind(), "status");
}

#[test]
fn bodies_that_are_not_webhooks_are_errors_that_say_why() {
    let err = |body: &str| parse_webhook(body.as_bytes()).unwrap_err();
    assert!(matches!(err("{\"object\": "), WebhookError::InvalidJson(_)));
    assert!(matches!(err(""), WebhookError::InvalidJson(_)));
    assert!(
        err("not json at all")
            .to_string()
            .starts_with("the webhook body is not valid JSON")
    );
    assert!(matches!(
        err("[]"),
        WebhookError::NotAnObject { found: "an array" }
    ));
    let wrong = err(r#"{"object":"page","entry":[]}"#);
    assert!(matches!(wrong, WebhookError::WrongObject { .. }));
    assert_eq!(
        wrong.to_string(),
        "the webhook is for `object: \"page\"`, not `whatsapp_business_account`"
    );
    assert!(matches!(
        err(r#"{"entry":[]}"#),
        WebhookError::WrongObject { .. }
    ));
    assert!(matches!(
        err(r#"{"object":"whatsapp_business_account"}"#),
        WebhookError::NoEntries
    ));
    assert!(
        parse_webhook(br#"{"object":"whatsapp_business_account","entry":[]}"#)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn unknown_fields_are_ignored_and_unknown_changes_kept() {
    // Fields flowgate has never heard of, at every level, change nothing.
    let mut body = fixture("inbound_text_bsuid.json");
    body["future_envelope_field"] = json!(1);
    body["entry"][0]["future_entry_field"] = json!({ "a": [1, 2] });
    let value = &mut body["entry"][0]["changes"][0]["value"];
    value["future_value_field"] = json!("x");
    value["contacts"][0]["parent_user_id"] = json!("US.ENT.11815799212886844830");
    value["messages"][0]["from_parent_user_id"] = json!("US.ENT.11815799212886844830");
    value["messages"][0]["text"]["future_text_field"] = json!(true);
    let updates = parse_webhook(body.to_string().as_bytes()).unwrap();
    let [
        Update::Message {
            inbound,
            parent_user_id,
            ..
        },
    ] = updates.as_slice()
    else {
        panic!("{updates:#?}")
    };
    assert_eq!(
        inbound.content,
        InboundContent::text("Hi, is my order shipped?")
    );
    assert_eq!(
        parent_user_id.as_deref(),
        Some("US.ENT.11815799212886844830")
    );

    // Fields flowgate does not read, and a messages value it does not know, are `Unknown`.
    let body = json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": "100000000000001", "time": 1_760_000_000, "changes": [
            { "field": "account_update", "value": { "event": "VOLUME_BASED_PRICING_TIER_UPDATE" } },
            { "field": "history", "value": { "history": [] } },
            { "field": "user_id_update", "value": { "user_id_update": [{ "detail": "x" }] } },
            { "field": "messages", "value": { "metadata": { "phone_number_id": "1" }, "message_echoes": [] } },
            { "value": 42 }
        ]}]
    });
    let updates = parse_webhook(body.to_string().as_bytes()).unwrap();
    let fields: Vec<(&str, &Value)> = updates
        .iter()
        .map(|u| match u {
            Update::Unknown {
                field,
                value,
                waba_id,
                timestamp,
            } => {
                assert_eq!(waba_id.as_deref(), Some("100000000000001"));
                assert_eq!(*timestamp, Some(at(1_760_000_000)));
                assert!(u.dedupe_key().starts_with("unknown:"));
                assert_eq!(u.raw(), value);
                (field.as_str(), value)
            }
            other => panic!("{other:#?}"),
        })
        .collect();
    assert_eq!(
        fields,
        [
            (
                "account_update",
                &json!({ "event": "VOLUME_BASED_PRICING_TIER_UPDATE" })
            ),
            ("history", &json!({ "history": [] })),
            (
                "user_id_update",
                &json!({ "user_id_update": [{ "detail": "x" }] })
            ),
            (
                "messages",
                &json!({ "metadata": { "phone_number_id": "1" }, "message_echoes": [] })
            ),
            ("", &json!(42)),
        ]
    );
}

#[test]
fn one_bad_item_does_not_sink_the_batch() {
    let good = first_item("inbound_text.json", "messages");
    let body = json!({
        "object": "whatsapp_business_account",
        "entry": [
            "not an entry",
            { "id": "1", "changes": [{ "field": "messages", "value": {
                "metadata": { "phone_number_id": PHONE_NUMBER_ID },
                "messages": [
                    good,
                    "not a message",
                    { "from": "15550000001", "id": "a", "type": "text", "text": { "body": "no time" } },
                    { "from": "15550000001", "id": "b", "timestamp": "yesterday", "type": "text", "text": { "body": "x" } },
                    { "from": "15550000001", "id": "c", "timestamp": "1", "type": "text" },
                    { "from": "15550000001", "id": "d", "timestamp": "1", "type": "text", "text": { "body": 5 } },
                    { "id": "e", "timestamp": "1", "type": "text", "text": { "body": "nobody" } },
                    { "from": "15550000001", "id": "f", "timestamp": "1", "type": "location", "location": { "latitude": "north" } },
                    { "from": "15550000001", "id": "g", "timestamp": "1", "type": "interactive", "interactive": { "type": "button_reply" } },
                    { "from": "15550000001", "timestamp": "1", "type": "text", "text": { "body": "no id" } },
                    { "from": "15550000001", "id": "h", "timestamp": "1", "type": "button", "button": {} }
                ],
                "statuses": [
                    { "id": "s1", "timestamp": "1" },
                    { "id": "s2", "status": "deleted", "timestamp": "1", "errors": "not a list" }
                ]
            }}]},
            { "id": "2", "changes": [
                { "field": "messages", "value": { "messages": [good] } },
                { "field": "message_template_status_update", "value": { "message_template_name": "x" } },
                { "field": "user_preferences", "value": { "user_preferences": [{ "wa_id": "1" }, { "value": "stop" }] } },
                { "field": "messages" }
            ]}
        ]
    });
    let updates = parse_webhook(body.to_string().as_bytes()).unwrap();
    let summary: Vec<String> = updates
        .iter()
        .map(|u| match u {
            Update::Malformed { reason, .. } => format!("malformed: {reason}"),
            Update::Message { inbound, .. } => format!("message {}", inbound.id),
            Update::Status { status, .. } => format!("status {}", status.as_str()),
            other => other.kind().to_string(),
        })
        .collect();
    assert_eq!(
        summary,
        [
            "malformed: an `entry` item is not an object",
            "message wamid.HBgLMTU1NTU1NTAxMjMVAgASGBQzQTAwMDAwMDAwMDAwMDAwMDAwMQA=",
            "malformed: a `messages` item is not an object",
            "malformed: a `text` message without a valid `timestamp`",
            "malformed: a `text` message without a valid `timestamp`",
            "malformed: a `text` message without `text.body`",
            // A number where text belongs is read as text.
            "message d",
            "malformed: a `text` message without a sender (`from` or `from_user_id`)",
            "malformed: a `location` message without numeric `latitude` and `longitude`",
            "malformed: an `interactive` message without `button_reply.id` and `button_reply.title`",
            "malformed: a message without `id`",
            "malformed: a `button` message without `button.payload` or `button.text`",
            "malformed: a status without `status`",
            "status deleted",
            "malformed: the change has no `value.metadata.phone_number_id`",
            "malformed: a template status update without `event`",
            "malformed: a user preference without `value`",
            "malformed: a user preference without `wa_id` or `user_id`",
            "malformed: the `messages` change has no `value` object",
        ]
    );
    // A malformed item keeps its JSON and the number it came to.
    let Update::Malformed {
        field,
        phone_number_id,
        raw,
        ..
    } = &updates[4]
    else {
        unreachable!()
    };
    assert_eq!(field, "messages");
    assert_eq!(phone_number_id.as_deref(), Some(PHONE_NUMBER_ID));
    assert_eq!(raw["id"], "b");
    assert!(updates[4].dedupe_key().starts_with("malformed:"));
    // `errors` that is not a list is ignored, not fatal.
    let Update::Status { errors, status, .. } = &updates[13] else {
        unreachable!()
    };
    assert!(errors.is_empty());
    assert_eq!(status, &StatusKind::Other("deleted".into()));
}

/// Every webhook fixture with each field removed in turn, and each value replaced by
/// `null`, a number, a string and an empty object: parsing never panics, and a body that is
/// still a webhook gives updates rather than an error.
#[test]
fn damaged_fixtures_never_panic() {
    fn paths(v: &Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        let children: Vec<(String, &Value)> = match v {
            Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), v)).collect(),
            Value::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, v)| (i.to_string(), v))
                .collect(),
            _ => vec![],
        };
        for (key, child) in children {
            at.push(key);
            out.push(at.clone());
            paths(child, at, out);
            at.pop();
        }
    }
    fn edit(v: &mut Value, path: &[String], replacement: Option<&Value>) {
        let (last, parents) = path.split_last().unwrap();
        let mut target = v;
        for p in parents {
            target = match target {
                Value::Object(m) => m.get_mut(p).unwrap(),
                Value::Array(a) => &mut a[p.parse::<usize>().unwrap()],
                _ => unreachable!(),
            };
        }
        match (target, replacement) {
            (Value::Object(m), None) => {
                m.remove(last);
            }
            (Value::Array(a), None) => {
                a.remove(last.parse::<usize>().unwrap());
            }
            (Value::Object(m), Some(r)) => {
                m.insert(last.clone(), r.clone());
            }
            (Value::Array(a), Some(r)) => a[last.parse::<usize>().unwrap()] = r.clone(),
            _ => unreachable!(),
        }
    }
    let replacements = [
        None,
        Some(Value::Null),
        Some(json!(7)),
        Some(json!("x")),
        Some(json!({})),
        Some(json!([])),
    ];
    let mut cases = 0;
    for name in webhook_fixtures() {
        let original = fixture(&name);
        let mut all = Vec::new();
        paths(&original, &mut Vec::new(), &mut all);
        for path in &all {
            for replacement in &replacements {
                let mut damaged = original.clone();
                edit(&mut damaged, path, replacement.as_ref());
                let result = parse_webhook(damaged.to_string().as_bytes());
                let envelope_broken =
                    matches!(path.as_slice(), [k] if k == "object" || k == "entry");
                if !envelope_broken {
                    let updates = result.unwrap_or_else(|e| panic!("{name} {path:?}: {e}"));
                    for u in &updates {
                        let _ = (u.dedupe_key(), u.raw(), u.refreshes_window());
                    }
                }
                cases += 1;
            }
        }
    }
    assert!(cases > 1000, "{cases}");
}

#[test]
fn dedupe_keys_do_not_depend_on_key_order() {
    let a = br#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"account_update","value":{"a":1,"b":{"c":2,"d":[3,{"e":4,"f":5}]}}}]}]}"#;
    let b = br#"{"entry":[{"changes":[{"value":{"b":{"d":[3,{"f":5,"e":4}],"c":2},"a":1},"field":"account_update"}],"id":"1"}],"object":"whatsapp_business_account"}"#;
    let c = br#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"account_update","value":{"a":1,"b":{"c":2,"d":[{"e":4,"f":5},3]}}}]}]}"#;
    let key = |body: &[u8]| parse_webhook(body).unwrap()[0].dedupe_key();
    assert_eq!(key(a), key(b));
    assert_ne!(key(a), key(c), "array order matters");
}

// ---------------------------------------------------------------------------------------
// Signatures

fn sig(hex: &str) -> String {
    format!("sha256={hex}")
}

#[test]
fn signature_known_vectors() {
    // The classic HMAC-SHA256 example and RFC 4231 test case 2.
    let fox = b"The quick brown fox jumps over the lazy dog";
    let fox_sig = sig("f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8");
    assert_eq!(verify_signature(b"key", fox, Some(&fox_sig)), Ok(()));
    let jefe = sig("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    assert_eq!(
        verify_signature(b"Jefe", b"what do ya want for nothing?", Some(&jefe)),
        Ok(())
    );
    // A fixture's exact bytes, signed with Python's hmac module.
    let body = bytes("inbound_text.json");
    let good = sig("69ea2851db48e3fad570b3422c580026160ef6474bf8cc69b75fd9fd0f5bd53d");
    assert_eq!(verify_signature(b"app-secret", &body, Some(&good)), Ok(()));
    // Uppercase hex is the same digest.
    assert_eq!(
        verify_signature(
            b"app-secret",
            &body,
            Some(&good.to_uppercase().replace("SHA256=", "sha256="))
        ),
        Ok(())
    );
}

#[test]
fn signature_failures_are_distinct() {
    let body = bytes("inbound_text.json");
    let good = sig("69ea2851db48e3fad570b3422c580026160ef6474bf8cc69b75fd9fd0f5bd53d");
    let check =
        |secret: &[u8], body: &[u8], header: Option<&str>| verify_signature(secret, body, header);

    // Wrong: another secret, one changed byte, re-serialised JSON, another digest.
    assert_eq!(
        check(b"other", &body, Some(&good)),
        Err(SignatureError::Mismatch)
    );
    let mut tampered = body.clone();
    tampered[10] ^= 1;
    assert_eq!(
        check(b"app-secret", &tampered, Some(&good)),
        Err(SignatureError::Mismatch)
    );
    let reencoded = serde_json::to_vec(&fixture("inbound_text.json")).unwrap();
    assert_eq!(
        check(b"app-secret", &reencoded, Some(&good)),
        Err(SignatureError::Mismatch)
    );
    let zeros = sig(&"0".repeat(64));
    assert_eq!(
        check(b"app-secret", &body, Some(&zeros)),
        Err(SignatureError::Mismatch)
    );

    // Missing.
    assert_eq!(
        check(b"app-secret", &body, None),
        Err(SignatureError::Missing)
    );

    // Malformed: no prefix, another algorithm, not hex, wrong length, empty.
    let malformed = |header: &str| match check(b"app-secret", &body, Some(header)) {
        Err(SignatureError::Malformed(why)) => why,
        other => panic!("{header:?}: {other:?}"),
    };
    assert!(malformed(&good[7..]).contains("expected `sha256=<hex>`"));
    assert!(malformed(&good.replace("sha256=", "sha1=")).contains("expected `sha256=<hex>`"));
    assert!(malformed(&sig(&"zz".repeat(32))).contains("not hex"));
    assert_eq!(
        malformed(&good[..good.len() - 2]),
        "expected 64 hex digits after `sha256=`, got 62"
    );
    assert_eq!(
        malformed(&format!("{good}00")),
        "expected 64 hex digits after `sha256=`, got 66"
    );
    assert!(malformed("").contains("expected `sha256=<hex>`"));
    assert_eq!(
        SignatureError::Malformed("x".into()).to_string(),
        "the webhook signature header is malformed: x"
    );

    // No secret configured: never "valid".
    assert_eq!(
        check(b"", &body, Some(&good)),
        Err(SignatureError::NoSecret)
    );
}

#[test]
fn shared_secret_header() {
    assert_eq!(verify_shared_secret("s3cret", Some("s3cret")), Ok(()));
    assert_eq!(
        verify_shared_secret("s3cret", Some("s3cres")),
        Err(SignatureError::Mismatch)
    );
    assert_eq!(
        verify_shared_secret("s3cret", Some("s3cret-and-more")),
        Err(SignatureError::Mismatch)
    );
    assert_eq!(
        verify_shared_secret("s3cret", Some("")),
        Err(SignatureError::Mismatch)
    );
    assert_eq!(
        verify_shared_secret("s3cret", None),
        Err(SignatureError::Missing)
    );
    assert_eq!(
        verify_shared_secret("", Some("")),
        Err(SignatureError::NoSecret)
    );
}

// ---------------------------------------------------------------------------------------
// Send bodies

fn phone() -> Recipient {
    Recipient::Phone(WA_ID.into())
}

#[test]
fn send_text() {
    let content = OutboundContent::Text {
        body: "Your order has shipped: https://example.com/track/ABC123".into(),
        preview_url: true,
    };
    assert_eq!(
        message_body(phone(), &content, None),
        fixture("send_text.json")
    );
}

#[test]
fn send_text_as_a_reply() {
    let content = OutboundContent::text("Yes, it shipped this morning.");
    let quoted = "wamid.HBgLMTU1NTU1NTAxMjMVAgASGBQzQTAwMDAwMDAwMDAwMDAwMDAwMQA=";
    assert_eq!(
        message_body(phone(), &content, Some(quoted)),
        fixture("send_text_reply_context.json")
    );
}

#[test]
fn send_text_to_a_bsuid() {
    let content = OutboundContent::text("Yes, it also comes in blue and green.");
    let body = message_body(Recipient::UserId(BSUID.into()), &content, None);
    assert_eq!(body, fixture("send_text_recipient_bsuid.json"));
    assert!(body.get("to").is_none(), "never both `to` and `recipient`");
}

#[test]
fn send_reply_buttons() {
    let content = OutboundContent::Buttons {
        body: "What would you like to do?".into(),
        buttons: [
            ("order_status", "Order status"),
            ("talk_agent", "Talk to an agent"),
            ("cancel_order", "Cancel order"),
        ]
        .map(|(id, title)| Button {
            id: id.into(),
            title: title.into(),
        })
        .to_vec(),
    };
    // flowgate's button messages have no header or footer; the fixture has both.
    let mut expected = fixture("send_interactive_button.json");
    let interactive = expected["interactive"].as_object_mut().unwrap();
    interactive.remove("header");
    interactive.remove("footer");
    assert_eq!(message_body(phone(), &content, None), expected);
}

#[test]
fn send_list() {
    let row = |id: &str, title: &str, description: &str| ListRow {
        id: id.into(),
        title: title.into(),
        description: Some(description.into()),
    };
    let content = OutboundContent::List {
        body: "Which shipping option do you prefer?".into(),
        button: "Shipping options".into(),
        sections: vec![
            ListSection {
                title: Some("Fast".into()),
                rows: vec![
                    row("ship_express", "Express", "Next day delivery"),
                    row("ship_priority", "Priority", "1-3 days"),
                ],
            },
            ListSection {
                title: Some("Cheap".into()),
                rows: vec![row("ship_ground", "Ground", "2-5 days")],
            },
        ],
    };
    // flowgate's lists have no header or footer; the fixture has both.
    let mut expected = fixture("send_interactive_list.json");
    let interactive = expected["interactive"].as_object_mut().unwrap();
    interactive.remove("header");
    interactive.remove("footer");
    assert_eq!(message_body(phone(), &content, None), expected);

    // An untitled section and a row without description leave the keys out.
    let bare = OutboundContent::List {
        body: "b".into(),
        button: "Open".into(),
        sections: vec![ListSection {
            title: None,
            rows: vec![ListRow {
                id: "r".into(),
                title: "R".into(),
                description: None,
            }],
        }],
    };
    assert_eq!(
        message_body(phone(), &bare, None)["interactive"]["action"]["sections"],
        json!([{ "rows": [{ "id": "r", "title": "R" }] }])
    );
}

#[test]
fn send_image_and_document_by_link() {
    let image = OutboundContent::Media {
        kind: "image".into(),
        source: MediaSource::Link {
            link: "https://example.com/img/catalog.jpg".into(),
        },
        caption: Some("Our new catalog".into()),
        filename: None,
    };
    assert_eq!(
        message_body(phone(), &image, None),
        fixture("send_image_link.json")
    );
    // The document's `filename` comes from the last segment of its link.
    let document = OutboundContent::Media {
        kind: "document".into(),
        source: MediaSource::Link {
            link: "https://example.com/docs/invoice-ABC123.pdf".into(),
        },
        caption: Some("Your invoice".into()),
        filename: None,
    };
    assert_eq!(
        message_body(phone(), &document, None),
        fixture("send_document_link.json")
    );
}

#[test]
fn send_template_with_body_params() {
    let content = OutboundContent::Template {
        name: "order_update".into(),
        language: "en_US".into(),
        params: vec!["Ana".into()],
    };
    // flowgate's templates carry positional text parameters for the body only. The fixture
    // also has an image header, currency and date_time body parameters, and quick-reply and
    // URL button parameters: those are removed, the rest must match.
    let mut expected = fixture("send_template.json");
    let components = expected["template"]["components"].as_array_mut().unwrap();
    components.retain(|c| c["type"] == "body");
    components[0]["parameters"]
        .as_array_mut()
        .unwrap()
        .retain(|p| p["type"] == "text");
    assert_eq!(message_body(phone(), &content, None), expected);
}

#[test]
fn send_template_named_params_positionally() {
    let content = OutboundContent::Template {
        name: "order_confirmation".into(),
        language: "en_US".into(),
        params: vec!["Ana".into(), "ABC123".into()],
    };
    // flowgate does not send `parameter_name` (its params are positional); the rest matches.
    let mut expected = fixture("send_template_named_params.json");
    for p in expected["template"]["components"][0]["parameters"]
        .as_array_mut()
        .unwrap()
    {
        p.as_object_mut().unwrap().remove("parameter_name");
    }
    assert_eq!(message_body(phone(), &content, None), expected);
}

#[test]
fn send_reaction_and_mark_read() {
    let wamid = "wamid.HBgLMTU1NTU1NTAxMjMVAgASGBQzQTAwMDAwMDAwMDAwMDAwMDAwMQA=";
    assert_eq!(
        reaction_body(phone(), wamid, "👍"),
        fixture("send_reaction.json")
    );
    assert_eq!(mark_read_body(wamid, false), fixture("mark_read.json"));
    assert_eq!(
        mark_read_body(wamid, true),
        fixture("mark_read_typing_indicator.json")
    );
}

// ---------------------------------------------------------------------------------------
// Responses and error classes

#[test]
fn send_responses() {
    let ok = parse_send_response(200, &bytes("response_send_success.json")).unwrap();
    assert_eq!(ok.wamid, SENT_WAMID);
    assert_eq!(ok.message_status, None);
    assert_eq!(ok.wa_id.as_deref(), Some(WA_ID));
    assert_eq!(ok.user_id, None);

    let paced = parse_send_response(200, &bytes("response_send_template_paced.json")).unwrap();
    assert_eq!(paced.message_status.as_deref(), Some("accepted"));

    // Sent to a BSUID: Meta answers with `user_id`, no `wa_id`.
    let bsuid = json!({"messaging_product":"whatsapp",
        "contacts":[{"input":BSUID,"user_id":BSUID}],"messages":[{"id":"wamid.X"}]});
    let ok = parse_send_response(200, bsuid.to_string().as_bytes()).unwrap();
    assert_eq!((ok.wa_id, ok.user_id.as_deref()), (None, Some(BSUID)));

    assert_eq!(
        parse_mark_read_response(200, &bytes("response_mark_read_success.json")),
        Ok(())
    );
}

#[test]
fn error_responses() {
    for (name, status, code, class, fbtrace) in [
        (
            "error_response_131047.json",
            400,
            131047,
            ErrorClass::Reengage,
            "AbCdEfGhIjKlMnOpQrStUv1",
        ),
        (
            "error_response_130429.json",
            429,
            130429,
            ErrorClass::RateLimited,
            "Az8or2yhqkZfEZ-_4Qn_Bam",
        ),
        (
            "error_response_131056.json",
            400,
            131056,
            ErrorClass::PairRateLimited,
            "AbCdEfGhIjKlMnOpQrStUv2",
        ),
    ] {
        let raw = fixture(name);
        let e = parse_send_response(status, &bytes(name)).unwrap_err();
        assert_eq!(e.code, code, "{name}");
        assert_eq!(e.message, raw["error"]["message"], "{name}");
        assert_eq!(
            e.details.as_deref(),
            raw["error"]["error_data"]["details"].as_str(),
            "{name}"
        );
        assert_eq!(e.fbtrace_id.as_deref(), Some(fbtrace), "{name}");
        assert_eq!(e.http_status, Some(status), "{name}");
        assert_eq!(e.origin, ErrorOrigin::Graph, "{name}");
        assert_eq!(e.class(), class, "{name}");
        assert_eq!(classify(e.code), class, "{name}");
        // The same envelope on a mark-as-read is the same error.
        assert_eq!(parse_mark_read_response(status, &bytes(name)), Err(e));
    }
    let e = parse_send_response(400, &bytes("error_response_131047.json")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "WhatsApp error 131047 (HTTP 400): (#131047) Re-engagement message: Message failed to \
         send because more than 24 hours have passed since the customer last replied to this number."
    );
}

#[test]
fn dialog360_errors_are_code_zero() {
    let body = br#"{"meta":{"success":false,"http_code":401,"httpCode":401,"developerMessage":"Invalid api key"}}"#;
    let e = parse_send_response(401, body).unwrap_err();
    assert_eq!(e.code, 0);
    assert_eq!(e.message, "Invalid api key");
    assert_eq!(e.http_status, Some(401));
    assert_eq!(e.origin, ErrorOrigin::Dialog360);
    assert_eq!(e.class(), ErrorClass::AccountStopped);
    assert_eq!(e.to_string(), "360dialog error (HTTP 401): Invalid api key");
    let down =
        br#"{"meta":{"success":false,"httpCode":503,"developerMessage":"Service unavailable"}}"#;
    assert_eq!(
        parse_send_response(503, down).unwrap_err().class(),
        ErrorClass::Transient
    );
    // Meta's errors pass through 360dialog unchanged.
    let passed = parse_send_response(400, &bytes("error_response_131047.json")).unwrap_err();
    assert_eq!(passed.origin, ErrorOrigin::Graph);
    let e = parse_send_response(502, b"<html>bad gateway</html>").unwrap_err();
    assert_eq!((e.code, e.origin), (NO_CODE, ErrorOrigin::Http));
    assert_eq!(e.class(), ErrorClass::Transient);
}

#[test]
fn every_code_in_the_facts_table_is_classified() {
    use ErrorClass::*;
    let table: &[(i64, ErrorClass)] = &[
        (131047, Reengage),
        (131026, Permanent),
        (130429, RateLimited),
        (131056, PairRateLimited),
        (131048, AccountStopped),
        (131049, EcosystemBackoff),
        (131050, MarketingOptOut),
        (132000, Permanent),
        (132001, Permanent),
        (132005, Permanent),
        (132007, Permanent),
        (132012, Permanent),
        (132015, Permanent),
        (132016, Permanent),
        (131051, Permanent),
        (131052, Permanent),
        (131053, Permanent),
        (368, AccountStopped),
        (4, RateLimited),
        (80007, RateLimited),
        (131000, Transient),
        (1, Transient),
        (2, Transient),
        (131016, Transient),
        (133004, Transient),
        (131057, Transient),
        (131031, AccountStopped),
        (131042, AccountStopped),
        (190, AccountStopped),
        (0, AccountStopped),
        (130472, Permanent),
        (130497, Permanent),
        // "Also relevant" below the table, and §10.5.
        (131008, Permanent),
        (131009, Permanent),
        (100, Permanent),
        (33, Permanent),
        (131021, Permanent),
        (133010, AccountStopped),
        (132068, Permanent),
        (132069, Permanent),
        (131062, Permanent),
        // Unknown codes.
        (999_999, Permanent),
        (NO_CODE, Permanent),
    ];
    for &(code, class) in table {
        assert_eq!(classify(code), class, "code {code}");
    }
}

// ---------------------------------------------------------------------------------------
// The client, against a server on the loopback interface

async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

#[tokio::test]
async fn client_posts_to_the_cloud_api_and_360dialog() {
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;

    let success = fixture("response_send_success.json");
    let rate_limited = fixture("error_response_130429.json");
    let marked = fixture("response_mark_read_success.json");
    let router = axum::Router::new()
        .route(
            &format!("/v25.0/{PHONE_NUMBER_ID}/messages"),
            post(move |headers: HeaderMap, body: axum::Json<Value>| {
                let (success, rate_limited, marked) =
                    (success.clone(), rate_limited.clone(), marked.clone());
                async move {
                    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
                    if auth != Some("Bearer token-1") {
                        return (StatusCode::UNAUTHORIZED, axum::Json(json!({})));
                    }
                    if body.get("status").is_some() {
                        return (StatusCode::OK, axum::Json(marked));
                    }
                    if body["text"]["body"] == "too fast" {
                        return (StatusCode::TOO_MANY_REQUESTS, axum::Json(rate_limited));
                    }
                    (StatusCode::OK, axum::Json(success))
                }
            }),
        )
        .route(
            "/messages",
            post(|headers: HeaderMap| async move {
                if headers.get("d360-api-key").and_then(|v| v.to_str().ok()) == Some("key-1") {
                    (StatusCode::OK, axum::Json(json!({"messages":[{"id":"wamid.D"}]})))
                } else {
                    (
                        StatusCode::UNAUTHORIZED,
                        axum::Json(json!({"meta":{"success":false,"httpCode":401,"developerMessage":"Invalid api key"}})),
                    )
                }
            }),
        );
    let base = serve(router).await;
    let cloud = |token: &str| {
        Client::new(Endpoint::CloudApi {
            base_url: format!("{base}/"),
            version: "v25.0".into(),
            phone_number_id: PHONE_NUMBER_ID.into(),
            access_token: token.into(),
        })
    };
    let client = cloud("token-1");
    assert!(!format!("{:?}", client.endpoint()).contains("token-1"));
    let hi = message_body(phone(), &OutboundContent::text("hi"), None);
    assert_eq!(client.send(&hi).await.unwrap().wamid, SENT_WAMID);
    let fast = message_body(phone(), &OutboundContent::text("too fast"), None);
    let e = client.send(&fast).await.unwrap_err();
    assert_eq!((e.code, e.http_status), (130429, Some(429)));
    client.mark_read("wamid.in", true).await.unwrap();
    let e = cloud("wrong").send(&hi).await.unwrap_err();
    assert_eq!((e.origin, e.http_status), (ErrorOrigin::Http, Some(401)));

    let dialog = |key: &str| {
        Client::new(Endpoint::Dialog360 {
            base_url: base.clone(),
            api_key: key.into(),
        })
    };
    assert_eq!(dialog("key-1").send(&hi).await.unwrap().wamid, "wamid.D");
    let e = dialog("nope").send(&hi).await.unwrap_err();
    assert_eq!((e.code, e.origin), (0, ErrorOrigin::Dialog360));
    assert_eq!(e.class(), ErrorClass::AccountStopped);
}

#[tokio::test]
async fn client_transport_failures_are_transient() {
    // A port that was just free: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = Client::new(Endpoint::Dialog360 {
        base_url: format!("http://{addr}"),
        api_key: "k".into(),
    });
    let e = client
        .send(&message_body(phone(), &OutboundContent::text("hi"), None))
        .await
        .unwrap_err();
    assert_eq!(e.origin, ErrorOrigin::Transport);
    assert_eq!(e.class(), ErrorClass::Transient);
    assert!(
        e.to_string().starts_with("WhatsApp API unreachable: "),
        "{e}"
    );
}

#[test]
fn endpoints_build_their_urls() {
    assert_eq!(
        Endpoint::cloud_api("123", "t").messages_url(),
        "https://graph.facebook.com/v25.0/123/messages"
    );
    assert_eq!(
        Endpoint::dialog360("k").messages_url(),
        "https://waba-v2.360dialog.io/messages"
    );
}

#[test]
fn a_flows_answer_is_a_form_reply_with_its_fields() {
    let response = r#"{"flow_token":"flowgate:booking:ask","day":"2026-12-24","guests":2}"#;
    let body = json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": "1", "changes": [{ "field": "messages", "value": {
            "metadata": { "phone_number_id": PHONE_NUMBER_ID },
            "messages": [
                { "from": "15550000001", "id": "a", "timestamp": "1", "type": "interactive",
                  "interactive": { "type": "nfm_reply", "nfm_reply": {
                      "name": "flow", "body": "Sent", "response_json": response } } },
                { "from": "15550000001", "id": "b", "timestamp": "1", "type": "interactive",
                  "interactive": { "type": "nfm_reply", "nfm_reply": {
                      "name": "flow", "body": "Sent", "response_json": "[1, 2]" } } }
            ]
        }}]}]
    });
    let contents: Vec<InboundContent> = parse_webhook(body.to_string().as_bytes())
        .unwrap()
        .into_iter()
        .map(|u| match u {
            Update::Message { inbound, .. } => inbound.content,
            other => panic!("{other:#?}"),
        })
        .collect();
    let Value::Object(fields) = serde_json::from_str(response).unwrap() else {
        unreachable!()
    };
    assert_eq!(
        contents,
        [
            InboundContent::FormReply { response: fields },
            // An answer that is not an object is stored, not interpreted.
            InboundContent::Other {
                kind: "nfm_reply".into()
            },
        ]
    );
    assert_eq!(contents[0].kind(), "form");
    assert!(contents[0].refreshes_window());
}

#[test]
fn send_form() {
    let content = OutboundContent::Form {
        body: "When do you come?".into(),
        flow_id: "1234567890".into(),
        cta: "Book".into(),
        token: "flowgate:booking:ask".into(),
        screen: Some("BOOKING".into()),
        data: Some(json!({ "guest_name": "Ana" })),
    };
    // Meta's "Send Draft Flow by ID" example, published (no `mode`), without header and
    // footer.
    assert_eq!(
        message_body(phone(), &content, None),
        json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": format!("+{WA_ID}"),
            "type": "interactive",
            "interactive": {
                "type": "flow",
                "body": { "text": "When do you come?" },
                "action": { "name": "flow", "parameters": {
                    "flow_message_version": "3",
                    "flow_id": "1234567890",
                    "flow_cta": "Book",
                    "flow_token": "flowgate:booking:ask",
                    "flow_action": "navigate",
                    "flow_action_payload": { "screen": "BOOKING", "data": { "guest_name": "Ana" } }
                }}
            }
        })
    );
    // Without a screen the Flow opens at its first screen: no payload.
    let first = OutboundContent::Form {
        body: "When do you come?".into(),
        flow_id: "1234567890".into(),
        cta: "Book".into(),
        token: "flowgate:booking:ask".into(),
        screen: None,
        data: None,
    };
    let body = message_body(phone(), &first, None);
    assert!(
        body["interactive"]["action"]["parameters"]
            .get("flow_action_payload")
            .is_none()
    );
}
