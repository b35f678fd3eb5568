//! Diagnostics in rustc style: what is wrong, where (`file:line:col` and a caret), and what to
//! do. `check`, `serve`, `chat` and `test` all report load problems through this one type, so
//! a problem reads the same whichever command found it.

use std::fmt::Write as _;
use std::sync::Arc;

use miette::{GraphicalReportHandler, GraphicalTheme, LabeledSpan, MietteDiagnostic, NamedSource};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

/// A position in a source file: 1-based line and column (in characters) and the byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Loc {
    pub line: usize,
    pub col: usize,
    pub offset: usize,
    pub len: usize,
}

impl Loc {
    /// The location of a YAML node as serde-saphyr reports it.
    pub fn from_yaml(loc: &serde_saphyr::Location) -> Self {
        let span = loc.span();
        Self {
            line: loc.line() as usize,
            col: loc.column() as usize,
            offset: span.byte_offset().unwrap_or(span.offset()) as usize,
            len: span.byte_len().unwrap_or(span.len()) as usize,
        }
    }

    /// The location of `line:col` (1-based) in `source`, `len` bytes long.
    pub fn at(source: &str, line: usize, col: usize, len: usize) -> Self {
        let line_start: usize = source
            .split_inclusive('\n')
            .take(line.saturating_sub(1))
            .map(str::len)
            .sum();
        let offset = source[line_start.min(source.len())..]
            .char_indices()
            .nth(col.saturating_sub(1))
            .map(|(i, _)| line_start + i)
            .unwrap_or(source.len());
        Self {
            line,
            col,
            offset,
            len,
        }
    }

    pub fn is_known(&self) -> bool {
        self.line > 0
    }
}

/// One problem found while loading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub message: String,
    /// The file as the user named it (relative to where they run flowgate).
    pub file: String,
    pub loc: Option<Loc>,
    /// A short note under the caret.
    pub label: Option<String>,
    pub help: Option<String>,
    /// The position (`file:line:col`) of the error this one follows from, e.g. a reference
    /// to a flow that did not load: listed after the errors it follows from.
    pub follows_from: Option<String>,
}

impl Diagnostic {
    pub fn error(file: impl Into<String>, loc: Option<Loc>, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            message: message.into(),
            file: file.into(),
            loc,
            label: None,
            help: None,
            follows_from: None,
        }
    }

    pub fn warning(file: impl Into<String>, loc: Option<Loc>, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::error(file, loc, message)
        }
    }

    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// Marks this as a consequence of the error at `position`.
    pub fn following(mut self, position: impl Into<String>) -> Self {
        self.follows_from = Some(position.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// `file:line:col`, or just the file when the position is unknown.
    pub fn position(&self) -> String {
        match self.loc {
            Some(loc) if loc.is_known() => format!("{}:{}:{}", self.file, loc.line, loc.col),
            _ => self.file.clone(),
        }
    }
}

/// Everything a load found, with the sources needed to draw carets.
#[derive(Debug, Default, Clone)]
pub struct Diagnostics {
    pub items: Vec<Diagnostic>,
    sources: Vec<(String, Arc<str>)>,
}

impl Diagnostics {
    pub fn push(&mut self, diagnostic: Diagnostic) {
        self.items.push(diagnostic);
    }

    /// Remembers a file's text so its diagnostics can quote it.
    pub fn add_source(&mut self, file: impl Into<String>, text: Arc<str>) {
        let file = file.into();
        if !self.sources.iter().any(|(f, _)| *f == file) {
            self.sources.push((file, text));
        }
    }

    pub fn extend(&mut self, other: Diagnostics) {
        for (file, text) in other.sources {
            self.add_source(file, text);
        }
        self.items.extend(other.items);
    }

    pub fn errors(&self) -> usize {
        self.items.iter().filter(|d| d.is_error()).count()
    }

    pub fn warnings(&self) -> usize {
        self.items.len() - self.errors()
    }

    pub fn has_errors(&self) -> bool {
        self.errors() > 0
    }

    /// Root causes first: sorted by file and position, errors and warnings interleaved as
    /// they occur in the file; then the diagnostics that follow from another error
    /// ([`Diagnostic::follows_from`]), in the same order.
    pub fn sorted(&self) -> Vec<&Diagnostic> {
        let mut items: Vec<&Diagnostic> = self.items.iter().collect();
        items.sort_by_key(|d| {
            (
                d.follows_from.is_some(),
                d.file.clone(),
                d.loc.map(|l| (l.line, l.col)).unwrap_or_default(),
                d.severity,
            )
        });
        items
    }

    /// Renders every diagnostic with miette, then a summary line.
    pub fn render(&self, color: bool) -> String {
        let theme = if color {
            GraphicalTheme::unicode()
        } else {
            GraphicalTheme::unicode_nocolor()
        };
        let handler = GraphicalReportHandler::new_themed(theme).with_width(100);
        let mut out = String::new();
        for d in self.sorted() {
            out.push_str(&self.render_one(&handler, d));
        }
        let _ = writeln!(
            out,
            "{} error{}, {} warning{}",
            self.errors(),
            if self.errors() == 1 { "" } else { "s" },
            self.warnings(),
            if self.warnings() == 1 { "" } else { "s" },
        );
        out
    }

    fn render_one(&self, handler: &GraphicalReportHandler, d: &Diagnostic) -> String {
        let severity = match d.severity {
            Severity::Error => miette::Severity::Error,
            Severity::Warning => miette::Severity::Warning,
        };
        let mut diag = MietteDiagnostic::new(d.message.clone()).with_severity(severity);
        if let Some(help) = &d.help {
            diag = diag.with_help(help.clone());
        }
        let source = self.sources.iter().find(|(f, _)| *f == d.file);
        let mut out = String::new();
        match (d.loc, source) {
            (Some(loc), Some((_, text))) if loc.is_known() => {
                let len = loc
                    .len
                    .max(1)
                    .min(text.len().saturating_sub(loc.offset).max(1));
                // A block scalar's span runs on to the next key's indentation: stop the
                // underline at the last visible character.
                let len = text
                    .get(loc.offset..loc.offset + len)
                    .map_or(len, |s| s.trim_end().len().max(1));
                diag = diag.with_label(LabeledSpan::new(d.label.clone(), loc.offset, len));
                let report = miette::Report::new(diag)
                    .with_source_code(NamedSource::new(d.file.clone(), text.to_string()));
                let _ = handler.render_report(&mut out, report.as_ref());
            }
            _ => {
                if d.help.is_none() {
                    diag = diag.with_help(format!("in {}", d.position()));
                } else {
                    diag.help = Some(format!(
                        "in {}: {}",
                        d.position(),
                        d.help.as_deref().unwrap_or_default()
                    ));
                }
                let report = miette::Report::new(diag);
                let _ = handler.render_report(&mut out, report.as_ref());
            }
        }
        out
    }
}

/// Suggests the closest candidate to a misspelled name ("did you mean …?"). Of two equally
/// close, the one sharing the longer beginning wins: a dropped last letter (`sav`) is a
/// likelier typo than a changed one, so `save` before `say`.
pub fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let mut best: Option<((usize, usize), &str)> = None;
    for candidate in candidates {
        let distance = edit_distance(name, candidate);
        let limit = (name.chars().count().max(candidate.chars().count()) / 3).max(1);
        let shared = name
            .chars()
            .zip(candidate.chars())
            .take_while(|(a, b)| a == b)
            .count();
        let rank = (distance, usize::MAX - shared);
        if distance <= limit && best.is_none_or(|(r, _)| rank < r) {
            best = Some((rank, candidate));
        }
    }
    best.map(|(_, c)| format!("did you mean `{c}`?"))
}

/// Optimal string alignment distance: insertions, deletions, substitutions, and swaps of two
/// neighbouring characters (the commonest typo, `emial`) each count 1.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(
            did_you_mean("lokup", ["lookup", "shipped"]).as_deref(),
            Some("did you mean `lookup`?")
        );
        assert_eq!(did_you_mean("zzz", ["lookup", "shipped"]), None);
        assert_eq!(
            did_you_mean("emial", ["any", "number", "email"]).as_deref(),
            Some("did you mean `email`?")
        );
        // Equally close: the longer shared beginning wins, whatever the order.
        for candidates in [["say", "save"], ["save", "say"]] {
            assert_eq!(
                did_you_mean("sav", candidates).as_deref(),
                Some("did you mean `save`?")
            );
        }
    }

    #[test]
    fn consequences_sort_after_root_causes() {
        let mut diags = Diagnostics::default();
        diags.push(
            Diagnostic::error("a.yaml", Some(Loc::at("x\n", 1, 1, 1)), "no flow `b`")
                .following("b.yaml:3:5"),
        );
        diags.push(Diagnostic::warning("c.yaml", None, "late"));
        diags.push(Diagnostic::error("b.yaml", None, "unknown field"));
        let order: Vec<&str> = diags.sorted().iter().map(|d| d.file.as_str()).collect();
        assert_eq!(order, ["b.yaml", "c.yaml", "a.yaml"]);
    }

    #[test]
    fn loc_at_finds_byte_offsets() {
        let src = "a: 1\nbé: 2\n";
        let loc = Loc::at(src, 2, 3, 1);
        assert_eq!(&src[loc.offset..loc.offset + 1], ":");
    }
}
