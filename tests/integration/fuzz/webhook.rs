//! The webhook envelope parser ([`parse_webhook`]): arbitrary bytes, arbitrary JSON inside a
//! valid envelope, and the real example payloads with one field changed, removed or given
//! another type. It never panics; a body that is still a WhatsApp envelope always parses,
//! every item in it comes back exactly once (read, or `Malformed` with a reason), and no
//! update carries an identifier that breaks the rules a contact or a send relies on.

use std::sync::LazyLock;

use proptest::prelude::*;
use serde_json::{Value, json};

use flowgate::domain;
use flowgate::whatsapp::{Update, parse_webhook};

use super::config;

/// The example payloads that are webhook bodies (the others are requests and responses).
static PAYLOADS: LazyLock<Vec<(String, Value)>> = LazyLock::new(|| {
    super::files("tests/fixtures/whatsapp", "json", |_| false)
        .into_iter()
        .map(|(name, text)| (name, serde_json::from_str::<Value>(&text).unwrap()))
        .filter(|(_, v)| v.get("object").is_some())
        .collect()
});

/// Every JSON pointer in `value` below the root, parents before children.
fn pointers(value: &Value, at: &str, out: &mut Vec<String>) {
    let children: Vec<(String, &Value)> = match value {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| (k.replace('~', "~0").replace('/', "~1"), v))
            .collect(),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v))
            .collect(),
        _ => return,
    };
    for (key, child) in children {
        let path = format!("{at}/{key}");
        out.push(path.clone());
        pointers(child, &path, out);
    }
}

/// Values that break what a field usually holds: other types, empty and huge ones, control
/// characters, identifiers that are not phone numbers.
fn odd_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        prop::sample::select(vec![
            "",
            " ",
            "0",
            "-1",
            "1e400",
            "9223372036854775808",
            "+15555550123",
            "15555550123",
            "\u{0}",
            "order",
            "123456789012345678901234567890",
            "US.13491208655302741918",
            "text",
            "interactive",
            "button_reply",
            "list_reply",
            "system",
            "location",
            "button",
            "reaction",
            "messages",
            "statuses",
            "whatsapp_business_account",
            "\n2026-01-01 ERROR forged",
            "\u{1b}[31m",
            "é😀",
        ])
        .prop_map(Value::from),
        ".{0,20}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[derive(Debug, Clone)]
enum Change {
    Set(Value),
    Remove,
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![3 => odd_value().prop_map(Change::Set), 1 => Just(Change::Remove)]
}

/// `payload` with `change` made at `pointer`.
fn mutate(payload: &Value, pointer: &str, change: &Change) -> Value {
    let mut out = payload.clone();
    match change {
        Change::Set(v) => *out.pointer_mut(pointer).unwrap() = v.clone(),
        Change::Remove => {
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            let key = key.replace("~1", "/").replace("~0", "~");
            match out.pointer_mut(parent).unwrap() {
                Value::Object(map) => {
                    map.remove(&key);
                }
                Value::Array(items) => {
                    items.remove(key.parse::<usize>().unwrap());
                }
                _ => unreachable!("a pointer's parent is a container"),
            }
        }
    }
    out
}

/// What every update must keep, however odd its input: a key to recognise a replay by, a
/// reason when it could not be read, valid identifiers on anything that becomes a contact.
fn check_update(update: &Update) {
    assert!(!update.dedupe_key().is_empty(), "no dedupe key: {update:?}");
    serde_json::to_string(update).expect("an update serialises");
    match update {
        Update::Malformed { reason, .. } => assert!(!reason.trim().is_empty()),
        Update::Message {
            wa_id,
            user_id,
            parent_user_id,
            inbound,
            ..
        } => {
            assert!(
                wa_id.is_some() || user_id.is_some(),
                "a message from nobody: {update:?}"
            );
            assert!(!inbound.id.is_empty());
            if let Some(id) = wa_id {
                assert_eq!(domain::phone_number(id).as_ref(), Ok(id), "{update:?}");
            }
            for id in user_id.iter().chain(parent_user_id) {
                assert_eq!(domain::bsuid(id).as_ref(), Ok(id), "{update:?}");
            }
        }
        Update::UserPreference { wa_id, user_id, .. } => {
            assert!(
                wa_id.is_some() || user_id.is_some(),
                "a preference of nobody: {update:?}"
            );
            if let Some(id) = wa_id {
                assert_eq!(domain::phone_number(id).as_ref(), Ok(id), "{update:?}");
            }
        }
        _ => {}
    }
}

/// Whether the body is still a WhatsApp envelope, which must parse.
fn is_envelope(body: &Value) -> bool {
    body.get("object") == Some(&json!("whatsapp_business_account"))
        && body.get("entry").is_some_and(Value::is_array)
}

/// The message or status item `pointer` lies inside, when it does and the item is still there.
fn item_of<'a>(body: &'a Value, pointer: &str) -> Option<&'a Value> {
    let parts: Vec<&str> = pointer.split('/').collect();
    let i = parts
        .iter()
        .position(|p| *p == "messages" || *p == "statuses")?;
    let item = parts.get(i + 1)?;
    let prefix = parts[..i].join("/");
    let in_messages_value = prefix.ends_with("/value") && item.parse::<usize>().is_ok();
    in_messages_value.then(|| body.pointer(&parts[..i + 2].join("/")))?
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Err(e) = parse_webhook(&body) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn any_entries_in_an_envelope_parse(entry in odd_value()) {
        let body = json!({"object": "whatsapp_business_account", "entry": [entry]});
        let updates = parse_webhook(body.to_string().as_bytes())
            .expect("a WhatsApp envelope always parses");
        updates.iter().for_each(check_update);
    }

    #[test]
    fn mutated_examples_parse_or_explain(
        which in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        change in change(),
    ) {
        let (name, payload) = which.get(&PAYLOADS);
        let mut all = Vec::new();
        pointers(payload, "", &mut all);
        let pointer = at.get(&all);
        let text = mutate(payload, pointer, &change).to_string();
        // The body as the parser reads it (a float may not come back bit for bit).
        let body: Value = serde_json::from_str(&text).unwrap();
        match parse_webhook(text.as_bytes()) {
            Ok(updates) => {
                updates.iter().for_each(check_update);
                if let Some(item) = item_of(&body, pointer) {
                    let n = updates.iter().filter(|u| u.raw() == item).count();
                    prop_assert_eq!(n, 1, "{} at {}: the changed item came back {} times", name, pointer, n);
                }
            }
            Err(e) => {
                prop_assert!(!is_envelope(&body), "{name} at {pointer}: a valid envelope was refused: {e}");
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }
}
