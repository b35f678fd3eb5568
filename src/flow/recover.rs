//! Reading a flow file past its unknown keys, so one typo does not hide the rest of the file.
//!
//! serde stops at the first unknown key (`sav:` for `save:`) and the whole flow would be
//! lost: its other errors unreported, its window warnings gone, and every reference to it an
//! error of its own. [`parse_past_unknown_keys`] reports the unknown key, then reads the
//! entry as the suggested key when that name fits in its place (`titel` as `title`), else
//! blanks it (the key and its value become spaces), so every other byte, line and column
//! stays where it was, and parses again, up to [`MAX_UNKNOWN_KEYS`] times, as long as what it meets is
//! another unknown key. The flow read that way is checked
//! and linted like any other, and never runs: the project has an error. [`flow_id`] reads
//! only the `flow:` id of a file that does not parse at all, so a reference to it can say
//! that the flow did not load instead of that it does not exist.

use serde::de::DeserializeOwned;
use serde_saphyr::Spanned;

use crate::diagnostic::{Diagnostic, Loc};
use crate::yaml;

/// How many unknown keys one file may have before the rest of it is not read.
pub const MAX_UNKNOWN_KEYS: usize = 32;

/// Parses `text` as `T`, blanking each unknown key in turn. Returns the value (read with the
/// unknown keys left out) or `None`, and every error found on the way, first to last.
pub fn parse_past_unknown_keys<T: DeserializeOwned>(
    file: &str,
    text: &str,
) -> (Option<T>, Vec<Diagnostic>) {
    let mut errors: Vec<Diagnostic> = Vec::new();
    let mut current = text.to_string();
    for _ in 0..=MAX_UNKNOWN_KEYS {
        let error = match yaml::parse::<T>(file, &current) {
            Ok(value) => return (Some(value), errors),
            Err(error) => *error,
        };
        let key = unknown_key(&error.message);
        if key.is_none() && !errors.is_empty() {
            // After a blanked key, another kind of error may be that key's doing ("missing
            // field `save`" for `sav`, an entry left empty): the unknown key is reported,
            // and the rest waits until it is fixed.
            return (None, errors);
        }
        let suggested = error.help.as_deref().and_then(suggestion);
        let blanked = key.zip(error.loc).and_then(|(key, loc)| {
            suggested
                .and_then(|s| rename_key(&current, loc, key, s))
                .or_else(|| blank_entry(&current, loc))
        });
        errors.push(error);
        match blanked {
            Some(next) if next != current => current = next,
            // Not an unknown key, or nothing changed (it was not where reported): parsing
            // again would only find the same error.
            _ => return (None, errors),
        }
    }
    (None, errors)
}

/// The key of serde's "unknown field `sav`, expected one of …".
fn unknown_key(message: &str) -> Option<&str> {
    message
        .strip_prefix("unknown field `")?
        .split_once('`')
        .map(|(key, _)| key)
}

/// The name in "did you mean `save`?".
fn suggestion(help: &str) -> Option<&str> {
    help.strip_prefix("did you mean `")?.strip_suffix("`?")
}

/// `text` with the key `key` at `at` renamed to the suggested `name` without moving anything
/// else: a shorter or equal name is padded before the colon (`savee:` reads as `save :`), a
/// longer one in flow style takes the spaces before it (`{ untl: x }` reads as
/// `{until: x }`). `None` when it does not fit (block style has indentation there).
fn rename_key(text: &str, at: Loc, key: &str, name: &str) -> Option<String> {
    let start = Loc::at(text, at.line, at.col, 1).offset;
    let end = start + key.len();
    if text.get(start..end) != Some(key) {
        return None;
    }
    let from = match name.len().checked_sub(key.len()) {
        None | Some(0) => start,
        Some(extra) => {
            let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
            let before = &text[line_start..start];
            let flow_style = !before.trim_start_matches([' ', '-']).is_empty();
            let spaces = before.len() - before.trim_end_matches(' ').len();
            if !flow_style || spaces < extra {
                return None;
            }
            start - extra
        }
    };
    let padded = format!("{name:<width$}", width = end - from);
    Some(format!("{}{padded}{}", &text[..from], &text[end..]))
}

/// `text` with the mapping entry whose key starts at `at` turned into spaces: in block style
/// the key's line and the more-indented lines under it, in flow style (`{ a: 1, b: 2 }`) the
/// entry and one comma beside it. `None` when `at` is not inside `text`.
pub fn blank_entry(text: &str, at: Loc) -> Option<String> {
    let start = Loc::at(text, at.line, at.col, 1).offset;
    if start >= text.len() {
        return None;
    }
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let before = &text[line_start..start];
    let block = before.trim_start_matches([' ', '-']).is_empty();
    let (from, to) = if block {
        (start, block_entry_end(text, start, before.chars().count()))
    } else {
        flow_entry(text, start)
    };
    let mut bytes = text.as_bytes().to_vec();
    for b in &mut bytes[from..to] {
        if *b != b'\n' {
            *b = b' ';
        }
    }
    String::from_utf8(bytes).ok()
}

/// Where a block-style entry starting at `start`, its key at column `indent` (0-based),
/// ends: before the first later line that is neither blank nor indented deeper.
fn block_entry_end(text: &str, start: usize, indent: usize) -> usize {
    let mut end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    while end < text.len() {
        let next = end + 1;
        let line_end = text[next..].find('\n').map_or(text.len(), |i| next + i);
        let line = &text[next..line_end];
        let deeper = line.len() - line.trim_start_matches(' ').len() > indent;
        let blank = line.trim().is_empty() || line.trim_start().starts_with('#');
        if !(deeper || blank) {
            break;
        }
        end = line_end;
    }
    end
}

/// The bytes of a flow-style entry starting at `start`, with the comma after it, or the one
/// before it when it is the last entry.
fn flow_entry(text: &str, start: usize) -> (usize, usize) {
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in text[start..].char_indices() {
        let at = start + i;
        if let Some(q) = quote {
            match c {
                '\\' if q == '"' && !escaped => escaped = true,
                c if c == q && !escaped => quote = None,
                _ => escaped = false,
            }
            continue;
        }
        match c {
            '"' | '\'' => quote = Some(c),
            '{' | '[' => depth += 1,
            '}' | ']' if depth > 0 => depth -= 1,
            ',' if depth == 0 => return (start, at + 1),
            '}' | ']' => {
                let from = text[..start]
                    .trim_end()
                    .strip_suffix(',')
                    .map_or(start, str::len);
                return (from, at);
            }
            _ => {}
        }
    }
    (start, text.len())
}

/// The `flow:` id of a file that does not parse as a flow, and where it is written.
pub fn flow_id(text: &str) -> Option<(String, Loc)> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        flow: Spanned<String>,
    }
    let id: IdOnly = serde_saphyr::from_str(text).ok()?;
    Some((id.flow.value.clone(), yaml::loc(&id.flow)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blanked(text: &str, line: usize, col: usize) -> String {
        blank_entry(text, Loc::at(text, line, col, 1)).expect("inside the text")
    }

    #[test]
    fn a_block_entry_and_its_children_become_spaces() {
        let text = "a:\n  sav: x\n  nxt:\n    - b\n\n    - c\n  keep: 1\n";
        let out = blanked(text, 4 - 1, 3);
        assert_eq!(out, "a:\n  sav: x\n      \n       \n\n       \n  keep: 1\n");
        assert_eq!(out.len(), text.len());
        assert_eq!(
            blanked(text, 2, 3),
            "a:\n        \n  nxt:\n    - b\n\n    - c\n  keep: 1\n"
        );
    }

    #[test]
    fn a_flow_entry_goes_with_one_comma() {
        let text = "- { id: x, titel: \"X, Y\" }\n";
        assert_eq!(blanked(text, 1, 12), "- { id: x                }\n");
        let text = "- { titel: 'X', id: x }\n";
        assert_eq!(blanked(text, 1, 5), "- {             id: x }\n");
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Step {
        say: Option<String>,
        save: Option<String>,
    }

    #[test]
    fn every_unknown_key_is_reported_and_the_rest_is_read() {
        let text = "say: hi\nsav: name\nzzz: [1, 2]\n";
        let (step, errors) = parse_past_unknown_keys::<Step>("f.yaml", text);
        let step = step.expect("read without the unknown keys");
        assert_eq!(step.say.as_deref(), Some("hi"));
        assert_eq!(step.save, None);
        let found: Vec<(String, Option<String>)> = errors
            .iter()
            .map(|e| (e.position(), e.help.clone()))
            .collect();
        assert_eq!(
            found,
            [
                ("f.yaml:2:1".into(), Some("did you mean `save`?".into())),
                ("f.yaml:3:1".into(), None),
            ]
        );
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Named {
        name: String,
    }

    #[test]
    fn a_key_is_read_as_its_suggestion_when_it_fits() {
        let text = "say: hi\nsavee: name\n";
        let (step, errors) = parse_past_unknown_keys::<Step>("f.yaml", text);
        assert_eq!(step.expect("read as `save`").save.as_deref(), Some("name"));
        assert_eq!(errors[0].help.as_deref(), Some("did you mean `save`?"));
        let (step, _) = parse_past_unknown_keys::<Step>("f.yaml", "{ say: hi,  sve: x }");
        assert_eq!(
            step.expect("`{ say: hi, save: x }`").save.as_deref(),
            Some("x")
        );
        let (named, errors) = parse_past_unknown_keys::<Named>("f.yaml", "nmae: x\nnaem: y\n");
        assert!(named.is_none(), "two `name`s after renaming");
        assert_eq!(errors.len(), 2, "both typos are reported: {errors:?}");
    }

    #[test]
    fn a_misspelled_required_key_is_one_error() {
        let (named, errors) = parse_past_unknown_keys::<Named>("f.yaml", "nme: x\n");
        assert!(named.is_none());
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].help.as_deref(), Some("did you mean `name`?"));
    }

    /// Every key of the shipped flows misspelled in turn, two ways: reading never panics,
    /// each unknown key is reported where it is written, and the text keeps its length.
    #[test]
    fn every_key_of_the_shipped_flows_misspelled() {
        let flows = [
            include_str!("../../flows/order_status.yaml"),
            include_str!("../../flows/main_menu.yaml"),
            include_str!("../../flows/appointment.yaml"),
            include_str!("../../flows/lead_capture.yaml"),
        ];
        let mut tried = 0;
        for flow in flows {
            let lines: Vec<&str> = flow.lines().collect();
            for (n, line) in lines.iter().enumerate() {
                let Some(colon) = line.find(':') else {
                    continue;
                };
                let key = line[..colon].trim_start().trim_start_matches("- ");
                if key.is_empty() || !key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    continue;
                }
                let at = line.find(key).expect("the key is on its line");
                for typo in [format!("{key}x"), key[..key.len() - 1].to_string()] {
                    let mut changed = lines.clone();
                    let edited = format!("{}{typo}{}", &line[..at], &line[at + key.len()..]);
                    changed[n] = &edited;
                    let text = changed.join("\n");
                    let (_, errors) =
                        parse_past_unknown_keys::<super::super::raw::RawFlow>("f.yaml", &text);
                    tried += 1;
                    for e in &errors {
                        assert!(e.loc.is_some_and(|l| l.is_known()), "{e:?} in\n{text}");
                    }
                    if let Some(e) = errors
                        .iter()
                        .find(|e| unknown_key(&e.message) == Some(&typo))
                    {
                        assert_eq!(e.loc.map(|l| l.line), Some(n + 1), "{e:?}");
                    }
                }
            }
        }
        assert!(tried > 100, "{tried} keys tried");
    }

    #[test]
    fn the_id_of_a_file_that_does_not_parse() {
        let (id, loc) = flow_id("flow: orders\nsteps: [oops\n")
            .map_or((None, None), |(i, l)| (Some(i), Some(l)));
        // A syntax error hides even the id; a type error does not.
        assert_eq!(id, None);
        assert_eq!(loc, None);
        let (id, loc) = flow_id("flow: orders\nsteps: 3\n").expect("the id reads");
        assert_eq!((id.as_str(), loc.line, loc.col), ("orders", 1, 7));
    }
}
