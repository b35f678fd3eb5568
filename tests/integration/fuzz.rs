//! Fuzz tests (issue 11 item 15), driven by proptest so they run in every `cargo test`: the
//! parsers that read what users and Meta send, fed arbitrary input and mutated versions of
//! the real thing, must never panic and must always answer with a value or a clear error.
//!
//! Each target runs a fixed number of cases (no time limits: the suite takes seconds in a
//! debug build) with no failure persistence: a failure prints its shrunk input, and each bug
//! found becomes a named unit test beside its fix. Run only these with
//! `cargo test --test integration fuzz::`; raise the case count for a longer hunt with
//! `PROPTEST_CASES=20000`.

mod conversation;
mod interpolation;
mod loaders;
mod webhook;

use proptest::prelude::*;
use proptest::test_runner::Config;

/// `cases` runs of a target, unless `PROPTEST_CASES` asks for more; failures are not written
/// to `proptest-regressions` files (each one found is kept as a named unit test instead).
pub fn config(cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Fragments that mean something to YAML, to `{{ … }}` and to flowgate's formats, so that
/// mutations reach past the first syntax error.
const TOKENS: &[&str] = &[
    ":",
    ": ",
    "- ",
    "\n",
    "\n  ",
    "\n    - ",
    "  ",
    "\t",
    "{",
    "}",
    "[",
    "]",
    "\"",
    "'",
    "&a ",
    "*a",
    "<<: *a",
    "!!str ",
    "!!binary ",
    "!tag ",
    "# ",
    "|",
    ">-",
    "? ",
    "---\n",
    "...\n",
    "%YAML 1.2\n",
    "~",
    "null",
    "true",
    "no",
    "0",
    "-1",
    "0x1F",
    ".inf",
    "1e400",
    "99999999999999999999",
    "9223372036854775807",
    "{{",
    "}}",
    "{{ contact.name }}",
    "{{ x }}",
    "{{ 1 + }}",
    "${HOME}",
    "${",
    "$${x}",
    "\u{0}",
    "\u{7}",
    "\u{feff}",
    "é",
    "😀",
    "\r\n",
    "\r",
    "\u{2028}",
    "say: ",
    "ask: ",
    "next: ",
    "goto: ",
    "steps:",
    "id: ",
    "if: ",
    "script: ",
    "buttons:",
    "wait: ",
    "timeout: ",
    "user: ",
    "bot: ",
    "text: ",
    "1h",
    "0s",
    "-1h",
    "25h",
    "9999999999999w",
    "99999999999999999999d",
    "1h1m1s",
];

/// One change to a text.
#[derive(Debug, Clone)]
pub enum Edit {
    /// Removes up to `len` bytes at `at` (positions wrap around the text's length).
    Delete { at: usize, len: usize },
    /// Inserts `text` at `at`.
    Insert { at: usize, text: String },
    /// Replaces up to `len` bytes at `at` with `text`.
    Replace { at: usize, len: usize, text: String },
    /// Writes line `line` twice.
    DuplicateLine { line: usize },
    /// Swaps two lines.
    SwapLines { a: usize, b: usize },
    /// Moves a line `by` spaces right (positive) or left.
    Indent { line: usize, by: i8 },
}

/// Text to insert: a meaningful token, any short string, or any character.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(TOKENS).prop_map(str::to_string),
        2 => ".{0,8}",
        1 => any::<char>().prop_map(String::from),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    let pos = any::<usize>();
    prop_oneof![
        (pos, 0usize..40).prop_map(|(at, len)| Edit::Delete { at, len }),
        (pos, fragment()).prop_map(|(at, text)| Edit::Insert { at, text }),
        (pos, 0usize..12, fragment()).prop_map(|(at, len, text)| Edit::Replace { at, len, text }),
        pos.prop_map(|line| Edit::DuplicateLine { line }),
        (pos, pos).prop_map(|(a, b)| Edit::SwapLines { a, b }),
        (pos, -4i8..=4).prop_map(|(line, by)| Edit::Indent { line, by }),
    ]
}

/// One to four edits.
pub fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec(edit(), 1..=4)
}

/// `text` with `edits` applied in order.
pub fn apply(text: &str, edits: &[Edit]) -> String {
    let mut text = text.to_string();
    for e in edits {
        text = apply_one(&text, e);
    }
    text
}

fn apply_one(text: &str, edit: &Edit) -> String {
    let mut out = text.to_string();
    match edit {
        Edit::Delete { at, len } => {
            let (start, end) = span(text, *at, *len);
            out.replace_range(start..end, "");
        }
        Edit::Insert { at, text: new } => {
            let (start, _) = span(text, *at, 0);
            out.insert_str(start, new);
        }
        Edit::Replace { at, len, text: new } => {
            let (start, end) = span(text, *at, *len);
            out.replace_range(start..end, new);
        }
        Edit::DuplicateLine { line } => {
            out = edit_lines(text, |lines| {
                let i = line % lines.len();
                lines.insert(i, lines[i].clone());
            })
        }
        Edit::SwapLines { a, b } => {
            out = edit_lines(text, |lines| {
                let n = lines.len();
                lines.swap(a % n, b % n);
            })
        }
        Edit::Indent { line, by } => {
            out = edit_lines(text, |lines| {
                let i = line % lines.len();
                let l = &mut lines[i];
                if *by >= 0 {
                    l.insert_str(0, &" ".repeat(*by as usize));
                } else {
                    let spaces = l.len() - l.trim_start_matches(' ').len();
                    l.replace_range(..spaces.min(by.unsigned_abs() as usize), "");
                }
            })
        }
    }
    out
}

/// The byte range `[at, at + len)` with `at` wrapped into the text and both ends moved back
/// to character boundaries.
fn span(text: &str, at: usize, len: usize) -> (usize, usize) {
    let floor = |mut i: usize| {
        i = i.min(text.len());
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let start = floor(at % (text.len() + 1));
    (start, floor(start + len))
}

fn edit_lines(text: &str, f: impl FnOnce(&mut Vec<String>)) -> String {
    let mut lines: Vec<String> = text.split('\n').map(str::to_string).collect();
    f(&mut lines);
    lines.join("\n")
}

/// Arbitrary text for a YAML loader: any string, or a soup of meaningful fragments.
pub fn any_yaml() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,200}",
        prop::collection::vec(fragment(), 0..40).prop_map(|parts| parts.concat()),
        any::<String>(),
    ]
}

/// Every file with extension `ext` under `dir` (relative to the repository), with its text.
pub fn files(dir: &str, ext: &str, skip: impl Fn(&str) -> bool) -> Vec<(String, String)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out: Vec<(String, String)> = std::fs::read_dir(root.join(dir))
        .unwrap_or_else(|e| panic!("cannot read {dir}: {e}"))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .map(|p| format!("{dir}/{}", p.file_name().unwrap().to_string_lossy()))
        .filter(|name| !skip(name))
        .map(|name| {
            let text = std::fs::read_to_string(root.join(&name)).unwrap();
            (name, text)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no .{ext} files in {dir}");
    out
}

/// Checks that a diagnostic is located: it names `file` and, when it has a position, the
/// position lies inside `text` on a character boundary.
pub fn assert_located(d: &flowgate::diagnostic::Diagnostic, files: &[(String, String)]) {
    let Some((_, text)) = files.iter().find(|(f, _)| *f == d.file) else {
        panic!("diagnostic names `{}`, not a loaded file: {d:?}", d.file);
    };
    assert!(
        !d.message.trim().is_empty(),
        "a diagnostic without a message"
    );
    if let Some(loc) = d.loc.filter(|l| l.is_known()) {
        assert!(
            loc.offset <= text.len() && text.is_char_boundary(loc.offset),
            "diagnostic position {loc:?} is outside `{}` ({} bytes): {d:?}",
            d.file,
            text.len()
        );
    }
}

#[test]
fn edits_keep_text_valid_utf8_and_change_it() {
    let text = "id: é\nsteps:\n  a: {say: hi}\n";
    let out = apply(text, &[Edit::Delete { at: 4, len: 2 }]);
    assert_eq!(out, "id: \nsteps:\n  a: {say: hi}\n");
    let out = apply(
        text,
        &[
            Edit::SwapLines { a: 0, b: 1 },
            Edit::Indent { line: 0, by: 2 },
        ],
    );
    assert_eq!(out, "  steps:\nid: é\n  a: {say: hi}\n");
}
