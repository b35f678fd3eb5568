//! Reading YAML with locations: every file flowgate loads (config, flows, templates,
//! conversation tests) goes through [`parse`], so a syntax error or an unknown key is reported
//! the same way everywhere, and the small shapes the formats share live here once.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

use crate::diagnostic::{Diagnostic, Loc};

/// Parses `text` (the contents of `file`) into `T`, or a diagnostic pointing at the problem.
pub fn parse<T: de::DeserializeOwned>(file: &str, text: &str) -> Result<T, Box<Diagnostic>> {
    serde_saphyr::from_str::<T>(text).map_err(|e| {
        let loc = e.location().map(|l| error_loc(text, &l));
        let message = clean_message(&e.without_snippet().to_string());
        let help = misspelled_field(&message);
        let mut d = Diagnostic::error(file, loc, message);
        d.help = help;
        Box::new(d)
    })
}

/// Where an error points, in bytes of `text`. Errors of the scanner (a control character, a
/// bad escape) carry a span in characters only, which as a byte offset points before the
/// problem, or inside a character, when the text before it is not ASCII: those are found again
/// from their line and column.
fn error_loc(text: &str, l: &serde_saphyr::Location) -> Loc {
    let loc = Loc::from_yaml(l);
    if loc.len > 0 && l.span().byte_offset().is_some() {
        return loc;
    }
    let mut at = Loc::at(text, loc.line, loc.col, 0);
    at.len = text[at.offset..]
        .chars()
        .take(loc.len.max(1))
        .map(char::len_utf8)
        .sum::<usize>()
        .max(1);
    at
}

/// "did you mean …?" for serde's "unknown field `sya`, expected one of say, buttons, …".
fn misspelled_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let expected = rest.split_once("expected ")?.1;
    let expected = expected.strip_prefix("one of ").unwrap_or(expected);
    let names = expected
        .split(", ")
        .flat_map(|n| n.split(" or "))
        .map(|n| n.trim().trim_matches('`'));
    crate::diagnostic::did_you_mean(field, names)
}

/// serde-saphyr appends " at line N, column M"; the caret already says that.
fn clean_message(message: &str) -> String {
    let message = match message.rfind(" at line ") {
        Some(i) if message[i..].contains(", column ") => &message[..i],
        _ => message,
    };
    let message = message.replace(", set DuplicateKeyPolicy in Options if acceptable", "");
    message.trim().to_string()
}

/// Every `*.yaml`/`*.yml` file under `dir`, recursively, sorted.
pub fn yaml_files(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Conversation tests may sit beside the flows as `*.test.yaml`; the flow loader skips them.
pub fn is_test_file(path: &std::path::Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".test.yaml") || n.ends_with(".test.yml"))
}

/// The location of a spanned YAML value.
pub fn loc<T>(value: &Spanned<T>) -> Loc {
    Loc::from_yaml(&value.referenced)
}

/// A YAML mapping that keeps its order and the location of each key (serde maps lose both).
#[derive(Debug, Clone)]
pub struct OrderedMap<V>(pub Vec<(Spanned<String>, V)>);

impl<V> Default for OrderedMap<V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for MapVisitor<V> {
            type Value = OrderedMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<Spanned<String>>()? {
                    entries.push((key, map.next_value::<V>()?));
                }
                Ok(OrderedMap(entries))
            }
        }
        deserializer.deserialize_map(MapVisitor(PhantomData))
    }
}

/// `tag: vip` or `tag: [vip, berlin]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OneOrMany(pub Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OneOrManyVisitor;
        impl<'de> Visitor<'de> for OneOrManyVisitor {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a name or a list of names")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(OneOrMany(vec![v.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<String>()? {
                    items.push(item);
                }
                Ok(OneOrMany(items))
            }
        }
        deserializer.deserialize_any(OneOrManyVisitor)
    }
}

/// Expands `${VAR}` and `${VAR:-default}` from the environment.
pub fn expand_env(input: &str) -> Result<String, String> {
    expand_with(input, |name| std::env::var(name).ok())
}

/// [`expand_env`] with an explicit lookup, for tests.
pub fn expand_with(input: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!("`${{` without a closing `}}` in `{input}`"));
        };
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (inner, None),
        };
        match (lookup(name), default) {
            (Some(value), _) => out.push_str(&value),
            (None, Some(default)) => out.push_str(default),
            (None, None) => {
                return Err(format!(
                    "environment variable `{name}` is not set: export it, or write `${{{name}:-default}}`"
                ));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A string whose `${VAR}` references are expanded while parsing.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct EnvString(pub String);

impl fmt::Debug for EnvString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl<'de> Deserialize<'de> for EnvString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        expand_env(&raw).map(EnvString).map_err(de::Error::custom)
    }
}

/// A secret from the config: expanded like [`EnvString`], never printed.
#[derive(Clone, PartialEq, Eq, Default, serde::Deserialize)]
pub struct Secret(EnvString);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(EnvString(value.into()))
    }

    pub fn expose(&self) -> &str {
        &self.0.0
    }

    /// Whether `given` is this secret (a bearer token, a webhook's shared secret), compared
    /// by [`secrets_match`].
    pub fn matches(&self, given: &str) -> bool {
        secrets_match(self.expose(), given)
    }
}

/// Compares a secret with what a request presented, in constant time. Both sides are hashed
/// first, so neither the secret's bytes nor its length show in the timing.
pub fn secrets_match(expected: &str, given: &str) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    let a = Sha256::digest(expected.as_bytes());
    let b = Sha256::digest(given.as_bytes());
    bool::from(a.as_slice().ct_eq(b.as_slice()))
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the fuzz tests: the scanner's character offset was taken for a byte offset, so
    /// after `¡` (two bytes) the caret fell inside a character and before the NUL.
    #[test]
    fn nul_after_inverted_exclamation_points_at_the_nul() {
        let text = "¡\0";
        let d = parse::<serde_json::Value>("f.yaml", text).unwrap_err();
        let loc = d.loc.expect("a located error");
        assert_eq!(
            (loc.line, loc.col, loc.offset, loc.len),
            (1, 2, 2, 1),
            "{d:?}"
        );
        let text = "a: é\nb: \u{7f}";
        let d = parse::<serde_json::Value>("f.yaml", text).unwrap_err();
        let loc = d.loc.expect("a located error");
        assert_eq!(&text[loc.offset..loc.offset + loc.len], "\u{7f}", "{d:?}");
    }

    #[test]
    fn expands_variables_with_defaults() {
        let lookup = |name: &str| (name == "TOKEN").then(|| "abc".to_string());
        assert_eq!(
            expand_with("Bearer ${TOKEN}", lookup).unwrap(),
            "Bearer abc"
        );
        assert_eq!(
            expand_with("${URL:-http://x}/a", lookup).unwrap(),
            "http://x/a"
        );
        let err = expand_with("${MISSING}", lookup).unwrap_err();
        assert!(err.contains("`MISSING` is not set"), "{err}");
        assert!(expand_with("${OPEN", lookup).is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn parse_reports_unknown_keys_with_location() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct S {
            a: String,
        }
        let err = parse::<S>("f.yaml", "a: x\nzz: 1\n").unwrap_err();
        assert_eq!(err.position(), "f.yaml:2:1");
        assert!(
            err.message.starts_with("unknown field `zz`"),
            "{}",
            err.message
        );
        assert_eq!(err.help, None, "nothing is close to `zz`");
        let err = parse::<S>("f.yaml", "a: x\nab: y\n").unwrap_err();
        assert_eq!(err.help.as_deref(), Some("did you mean `a`?"), "{err:?}");
    }
}
