//! The flow file exactly as written: serde shapes with locations, before any checking.
//!
//! Every field is optional here and `deny_unknown_fields` everywhere, so serde reports typos
//! with their location and `compile` reports everything else (missing or conflicting keys,
//! dangling references) with the location of the key involved.

use std::fmt;

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
    pub handoff: Option<Spanned<String>>,
    pub goto: Option<Spanned<String>>,
    pub flow: Option<Spanned<String>>,
    pub end: Option<Spanned<bool>>,
    pub next: Option<Spanned<RawNext>>,
    pub on_error: Option<Spanned<String>>,
    pub outside_window: Option<Spanned<RawTemplateRef>>,
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
    pub url: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTemplateRef {
    /// `name:` in a `template` step, `template:` in `outside_window` (DESIGN §2.3).
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

/// `expect: number` or `expect: { regex: '…' }`.
#[derive(Debug)]
pub enum RawExpect {
    Kind(String),
    Regex(String),
}

impl<'de> Deserialize<'de> for RawExpect {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ExpectVisitor;
        impl<'de> Visitor<'de> for ExpectVisitor {
            type Value = RawExpect;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("one of any, number, email, phone, date, button, or { regex: '…' }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawExpect, E> {
                Ok(RawExpect::Kind(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawExpect, A::Error> {
                let mut regex = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "regex" {
                        return Err(de::Error::unknown_field(&key, &["regex"]));
                    }
                    regex = Some(map.next_value::<String>()?);
                }
                regex
                    .map(RawExpect::Regex)
                    .ok_or_else(|| de::Error::missing_field("regex"))
            }
        }
        deserializer.deserialize_any(ExpectVisitor)
    }
}

/// `wait: 26h` or `wait: { until: "09:00" }` (a time of day in the contact's timezone, or an
/// RFC 3339 instant; `{{ … }}` allowed).
#[derive(Debug)]
pub enum RawWait {
    For(String),
    Until(String),
}

impl<'de> Deserialize<'de> for RawWait {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct WaitVisitor;
        impl<'de> Visitor<'de> for WaitVisitor {
            type Value = RawWait;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as 26h, or { until: \"09:00\" }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawWait, E> {
                Ok(RawWait::For(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawWait, A::Error> {
                let mut until = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "until" {
                        return Err(de::Error::unknown_field(&key, &["until"]));
                    }
                    until = Some(map.next_value::<String>()?);
                }
                until
                    .map(RawWait::Until)
                    .ok_or_else(|| de::Error::missing_field("until"))
            }
        }
        deserializer.deserialize_any(WaitVisitor)
    }
}
