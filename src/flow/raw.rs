//! The flow file exactly as written: serde shapes with locations, before any checking.
//!
//! Every field is optional here and `deny_unknown_fields` everywhere, so serde reports typos
//! with their location and `compile` reports everything else (missing or conflicting keys,
//! dangling references) with the location of the key involved.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

use crate::yaml::{EnvString, OneOrMany, OrderedMap};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFlow {
    pub flow: Spanned<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub triggers: Vec<Spanned<RawTrigger>>,
    #[serde(default)]
    pub start: Option<Spanned<String>>,
    #[serde(default)]
    pub session_timeout: Option<Spanned<String>>,
    pub steps: Spanned<OrderedMap<Spanned<RawStep>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrigger {
    #[serde(default)]
    pub keywords: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub regex: Option<Spanned<String>>,
    #[serde(default)]
    pub button: Option<Spanned<String>>,
    #[serde(default)]
    pub list: Option<Spanned<String>>,
    /// Matches any message: the catch-all of a flow.
    #[serde(default)]
    pub any: Option<Spanned<bool>>,
    #[serde(default)]
    pub interrupt: bool,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub case_sensitive: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStep {
    pub say: Option<Spanned<String>>,
    pub buttons: Option<Spanned<Vec<Spanned<RawButton>>>>,
    pub list: Option<Spanned<RawList>>,
    pub media: Option<Spanned<RawMedia>>,
    pub ask: Option<Spanned<String>>,
    pub save: Option<Spanned<String>>,
    pub expect: Option<Spanned<RawExpect>>,
    pub retry: Option<Spanned<String>>,
    pub attempts: Option<Spanned<u32>>,
    pub on_fail: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub on_timeout: Option<Spanned<String>>,
    pub template: Option<Spanned<RawTemplateRef>>,
    pub script: Option<Spanned<String>>,
    pub rhai: Option<Spanned<String>>,
    pub http: Option<Spanned<RawHttp>>,
    pub set: Option<Spanned<OrderedMap<Spanned<serde_json::Value>>>>,
    pub tag: Option<Spanned<OneOrMany>>,
    pub untag: Option<Spanned<OneOrMany>>,
    pub wait: Option<Spanned<RawWait>>,
    pub handoff: Option<Spanned<RawHandoff>>,
    pub goto: Option<Spanned<String>>,
    pub flow: Option<Spanned<String>>,
    pub end: Option<Spanned<bool>>,
    pub next: Option<Spanned<RawNext>>,
    pub on_error: Option<Spanned<String>>,
    pub outside_window: Option<Spanned<RawTemplateRef>>,
    pub location: Option<Spanned<RawLocation>>,
    pub contacts: Option<Spanned<Vec<Spanned<RawContactCard>>>>,
    /// An emoji reaction to the customer's message the step answers.
    pub react: Option<Spanned<String>>,
    /// The step's messages quote the customer's message they answer.
    pub quote: Option<Spanned<bool>>,
    /// An A/B split: weighted branches, one chosen per contact for good.
    pub split: Option<Spanned<Vec<Spanned<RawSplitBranch>>>>,
    /// A WhatsApp Flow (form) to send and wait for.
    pub form: Option<Spanned<RawForm>>,
}

/// `form: { flow_id, cta, body, screen, data, fields }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawForm {
    /// The Flow's id in WhatsApp Manager (digits).
    pub flow_id: Spanned<String>,
    /// The label of the button that opens the form.
    pub cta: Spanned<String>,
    /// The message's text above the button.
    pub body: Spanned<String>,
    #[serde(default)]
    pub screen: Option<Spanned<String>>,
    /// The first screen's data (a mapping; strings interpolated).
    #[serde(default)]
    pub data: Option<Spanned<serde_json::Value>>,
    /// The fields the answer must carry, with their type: text, number, boolean, list or
    /// any.
    #[serde(default)]
    pub fields: Option<Spanned<OrderedMap<Spanned<String>>>>,
}

/// One branch of a `split`: `{ name: a, weight: 50, goto: step }` (or `flow:`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSplitBranch {
    #[serde(default)]
    pub name: Option<Spanned<String>>,
    pub weight: Spanned<f64>,
    #[serde(default)]
    pub goto: Option<Spanned<String>>,
    #[serde(default)]
    pub flow: Option<Spanned<String>>,
}

/// `location: { latitude, longitude, name, address }`; the coordinates are numbers or
/// `{{ … }}` text.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLocation {
    pub latitude: Spanned<serde_json::Value>,
    pub longitude: Spanned<serde_json::Value>,
    #[serde(default)]
    pub name: Option<Spanned<String>>,
    #[serde(default)]
    pub address: Option<Spanned<String>>,
}

/// One card of `contacts: [...]`: a name and one or more phones, emails, urls.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawContactCard {
    pub name: Spanned<String>,
    #[serde(default)]
    pub phone: Option<Spanned<OneOrMany>>,
    #[serde(default)]
    pub email: Option<Spanned<OneOrMany>>,
    #[serde(default)]
    pub org: Option<Spanned<String>>,
    #[serde(default)]
    pub url: Option<Spanned<OneOrMany>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawButton {
    pub id: Spanned<String>,
    pub title: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawList {
    /// The label of the button that opens the list.
    pub button: Spanned<String>,
    #[serde(default)]
    pub sections: Vec<Spanned<RawSection>>,
    /// Shorthand for one untitled section.
    #[serde(default)]
    pub rows: Vec<Spanned<RawRow>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSection {
    #[serde(default)]
    pub title: Option<Spanned<String>>,
    pub rows: Vec<Spanned<RawRow>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRow {
    pub id: Spanned<String>,
    pub title: Spanned<String>,
    #[serde(default)]
    pub description: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMedia {
    #[serde(rename = "type")]
    pub kind: Spanned<String>,
    /// A public link WhatsApp fetches...
    #[serde(default)]
    pub url: Option<Spanned<String>>,
    /// ...or a file of the project (relative to its directory), uploaded by flowgate.
    #[serde(default)]
    pub file: Option<Spanned<String>>,
    /// The name a document shows.
    #[serde(default)]
    pub filename: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTemplateRef {
    /// `name:` in a `template` step, `template:` in `outside_window`
    /// (both spellings name the template).
    #[serde(alias = "template")]
    pub name: Spanned<String>,
    pub language: Spanned<String>,
    #[serde(default)]
    pub params: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    #[serde(default)]
    pub method: Option<Spanned<String>>,
    /// `${VAR}` is read from the environment when the flow loads; `{{ … }}` per call.
    pub url: Spanned<EnvString>,
    #[serde(default)]
    pub headers: OrderedMap<Spanned<EnvString>>,
    #[serde(default)]
    pub body: Option<Spanned<serde_json::Value>>,
    #[serde(default)]
    pub save: Option<Spanned<String>>,
    #[serde(default)]
    pub timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBranch {
    #[serde(rename = "if")]
    pub when: Option<Spanned<String>>,
    pub button: Option<Spanned<String>>,
    pub list: Option<Spanned<String>>,
    #[serde(rename = "match")]
    pub matches: Option<Spanned<String>>,
    pub goto: Option<Spanned<String>>,
    pub flow: Option<Spanned<String>>,
}

/// `next: step` or `next: [branches…]`.
#[derive(Debug)]
pub enum RawNext {
    Step(String),
    Branches(Vec<Spanned<RawBranch>>),
}

impl<'de> Deserialize<'de> for RawNext {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NextVisitor;
        impl<'de> Visitor<'de> for NextVisitor {
            type Value = RawNext;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a step id or a list of branches")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawNext, E> {
                Ok(RawNext::Step(v.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawNext, A::Error> {
                let mut branches = Vec::new();
                while let Some(b) = seq.next_element::<Spanned<RawBranch>>()? {
                    branches.push(b);
                }
                Ok(RawNext::Branches(branches))
            }
        }
        deserializer.deserialize_any(NextVisitor)
    }
}

/// A scalar, or a mapping with the one key `K::NAME`: `expect: number` or
/// `expect: { regex: '…' }`, `wait: 26h` or `wait: { until: "09:00" }`.
#[derive(Debug)]
pub enum ScalarOr<K> {
    Scalar(String),
    Keyed(String, PhantomData<K>),
}

/// The key of a [`ScalarOr`] mapping.
pub trait KeyName {
    const NAME: &'static str;
    const EXPECTING: &'static str;
}

#[derive(Debug)]
pub struct UntilKey;
impl KeyName for UntilKey {
    const NAME: &'static str = "until";
    const EXPECTING: &'static str = "a duration such as 26h, or { until: \"09:00\" }";
}

/// `expect: number`, `expect: [image, document]` (files of these kinds) or
/// `expect: { regex: '…' }`.
#[derive(Debug)]
pub enum RawExpect {
    Kind(String),
    Kinds(Vec<String>),
    Regex(String),
}

impl<'de> Deserialize<'de> for RawExpect {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ExpectVisitor;
        impl<'de> Visitor<'de> for ExpectVisitor {
            type Value = RawExpect;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "one of any, number, email, phone, date, button, image, document, audio, \
                     video, sticker, a list of file kinds, or { regex: '…' }",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(RawExpect::Kind(v.to_string()))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut kinds = Vec::new();
                while let Some(kind) = seq.next_element::<String>()? {
                    kinds.push(kind);
                }
                Ok(RawExpect::Kinds(kinds))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut value = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "regex" {
                        return Err(de::Error::unknown_field(&key, &["regex"]));
                    }
                    value = Some(map.next_value::<String>()?);
                }
                value
                    .map(RawExpect::Regex)
                    .ok_or_else(|| de::Error::missing_field("regex"))
            }
        }
        deserializer.deserialize_any(ExpectVisitor)
    }
}

/// `wait: 26h` or `wait: { until: "09:00" }` (a time of day in the contact's timezone, or an
/// RFC 3339 instant; `{{ … }}` allowed).
pub type RawWait = ScalarOr<UntilKey>;

impl<'de, K: KeyName> Deserialize<'de> for ScalarOr<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarOrVisitor<K>(PhantomData<K>);
        impl<'de, K: KeyName> Visitor<'de> for ScalarOrVisitor<K> {
            type Value = ScalarOr<K>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(K::EXPECTING)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ScalarOr::Scalar(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut value = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != K::NAME {
                        return Err(de::Error::unknown_field(&key, &[K::NAME]));
                    }
                    value = Some(map.next_value::<String>()?);
                }
                value
                    .map(|v| ScalarOr::Keyed(v, PhantomData))
                    .ok_or_else(|| de::Error::missing_field(K::NAME))
            }
        }
        deserializer.deserialize_any(ScalarOrVisitor(PhantomData))
    }
}

/// `handoff: support`, or `handoff: { queue: support, timeout: 2h, on_timeout: step }`: the
/// queue a person takes the conversation from, and how long the bot waits for them.
#[derive(Debug, Default)]
pub struct RawHandoff {
    pub queue: String,
    pub timeout: Option<String>,
    pub on_timeout: Option<String>,
}

impl<'de> Deserialize<'de> for RawHandoff {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HandoffVisitor;
        impl<'de> Visitor<'de> for HandoffVisitor {
            type Value = RawHandoff;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a queue such as support, or { queue: support, timeout: 2h, on_timeout: step }",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(RawHandoff {
                    queue: v.to_string(),
                    ..RawHandoff::default()
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                const KEYS: &[&str] = &["queue", "timeout", "on_timeout"];
                let (mut queue, mut handoff) = (None, RawHandoff::default());
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value::<String>()?;
                    match key.as_str() {
                        "queue" => queue = Some(value),
                        "timeout" => handoff.timeout = Some(value),
                        "on_timeout" => handoff.on_timeout = Some(value),
                        _ => return Err(de::Error::unknown_field(&key, KEYS)),
                    }
                }
                handoff.queue = queue.ok_or_else(|| de::Error::missing_field("queue"))?;
                Ok(handoff)
            }
        }
        deserializer.deserialize_any(HandoffVisitor)
    }
}
