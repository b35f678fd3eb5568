//! Flows: the YAML conversation language (the README's "A flow"), compiled once at load into the form
//! the engine runs.
//!
//! - [`raw`]: the file as written, with locations;
//! - [`compile`]: one flow file into a [`Flow`] (references resolved, regexes and Rhai
//!   compiled, WhatsApp limits checked), with diagnostics;
//! - [`load`]: the whole project (flows, scripts, templates) and the checks across flows.
//!   `check`, `serve`, `chat` and `test` all load through [`load::load_project`];
//! - [`lint`]: analyses of compiled flows that need every flow at once (the window lint).
//!
//! A compiled flow is immutable and carries a content hash, its `version`: a session records
//! the version it started on and keeps running it after a reload (see [`FlowSet`]).

pub mod compile;
pub mod lint;
pub mod load;
pub mod raw;
pub mod recover;

use std::collections::HashMap;
use std::sync::Arc;

use chrono::Duration;
use regex::Regex;
use rhai::{AST, Dynamic};
use serde::{Deserialize, Serialize};

use crate::diagnostic::Loc;
use crate::script::{Context, ScriptError, Scripting};

/// A compiled flow.
#[derive(Debug)]
pub struct Flow {
    pub id: String,
    /// A hash of the flow's file and the scripts it uses.
    pub version: String,
    pub description: Option<String>,
    pub file: String,
    pub triggers: Vec<Trigger>,
    pub start: usize,
    pub session_timeout: Option<Duration>,
    pub steps: Vec<Step>,
    /// What the flow was compiled from, so an old version can be compiled again.
    pub bundle: Bundle,
}

impl Flow {
    pub fn step_index(&self, id: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.id == id)
    }
}

/// The sources of one flow version: its file and every script file it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    pub file: String,
    pub text: String,
    /// (script name as written in the flow, file path, text)
    pub scripts: Vec<(String, String, String)>,
}

#[derive(Debug)]
pub struct Trigger {
    pub kind: TriggerKind,
    pub interrupt: bool,
    pub priority: i32,
    pub loc: Loc,
}

#[derive(Debug)]
pub enum TriggerKind {
    /// Whole-word keywords, anywhere in a text message (lowercased unless case-sensitive).
    /// Matched by a word search rather than a regex: a case-insensitive Unicode regex per
    /// trigger made loading 1,000 flows take a second.
    Keywords {
        words: Vec<String>,
        case_sensitive: bool,
    },
    /// Named groups become variables.
    Regex(Regex),
    Button(String),
    List(String),
    Any,
}

/// Named regex groups a trigger or answer captured: `(name, text)`.
pub type Captures = Vec<(String, String)>;

impl TriggerKind {
    /// Whether `message` fires this trigger; captured named groups go into `captures`.
    /// `lowercase` is the message text lowercased, computed once per message by the caller.
    pub fn matches(
        &self,
        message: &crate::domain::InboundContent,
        lowercase: &str,
        captures: &mut Captures,
    ) -> bool {
        match self {
            Self::Keywords {
                words,
                case_sensitive,
            } => {
                let text = if *case_sensitive {
                    message.as_text()
                } else {
                    lowercase
                };
                matches!(message, crate::domain::InboundContent::Text { .. })
                    && words.iter().any(|w| contains_word(text, w))
            }
            Self::Regex(re) => {
                if !matches!(message, crate::domain::InboundContent::Text { .. }) {
                    return false;
                }
                match re.captures(message.as_text()) {
                    Some(caps) => {
                        for name in re.capture_names().flatten() {
                            if let Some(m) = caps.name(name) {
                                captures.push((name.to_string(), m.as_str().to_string()));
                            }
                        }
                        true
                    }
                    None => false,
                }
            }
            Self::Button(id) => message.button_id() == Some(id.as_str()),
            Self::List(id) => message.list_id() == Some(id.as_str()),
            Self::Any => true,
        }
    }
}

/// Which of a split's branches (`(name, weight)`, weights positive) a contact takes: the
/// same every time for the same contact, flow and step (a SHA-256 of the three, so it
/// holds across restarts, versions and machines), spread over the branches in proportion
/// to their weights across contacts. Changing the weights moves only the contacts whose
/// point falls in a range that moved.
pub fn split_branch(contact: &str, flow: &str, step: &str, weights: &[f64]) -> usize {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{flow}\u{0}{step}\u{0}{contact}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // The top 53 bits make a uniform point in [0, 1) that an f64 holds exactly.
    let unit = (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64;
    let total: f64 = weights.iter().sum();
    let mut point = unit * total;
    for (i, w) in weights.iter().enumerate() {
        if point < *w {
            return i;
        }
        point -= w;
    }
    weights.len() - 1
}

/// Whether `word` occurs in `text` with no letter, digit or `_` right before or after it.
pub fn contains_word(text: &str, word: &str) -> bool {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    !word.is_empty()
        && text.match_indices(word).any(|(i, _)| {
            !text[..i].chars().next_back().is_some_and(is_word)
                && !text[i + word.len()..].chars().next().is_some_and(is_word)
        })
}

#[derive(Debug)]
pub struct Step {
    pub id: String,
    pub loc: Loc,
    /// Where the step's action is written (the value of `say:`, `ask:`, `script:`…; the step
    /// key when it has none), so a lint about what the step sends can point at it.
    pub action_loc: Loc,
    pub wait: Option<Wait>,
    pub set: Vec<(String, Text)>,
    pub tag: Vec<String>,
    pub untag: Vec<String>,
    pub action: Action,
    pub handoff: Option<Handoff>,
    pub route: Route,
    pub on_error: Option<usize>,
    pub outside_window: Option<TemplateCall>,
    /// `react`: an emoji put on the customer's message the step answers, before its action.
    pub react: Option<Text>,
    /// `quote: true`: the step's messages quote the customer's message they answer.
    pub quote: bool,
}

impl Step {
    /// Whether the step waits for the customer's reply after its action.
    pub fn awaits_reply(&self) -> bool {
        matches!(self.action, Action::Ask(_) | Action::Form(_))
            || matches!(&self.route, Route::Branches(b) if b.iter().any(|b| b.cond.tests_reply()))
    }
}

/// A `handoff`: the queue a person takes the conversation from; after `timeout` without a
/// `/resume`, the flow goes on at `on_timeout` (else as a resume does: the step's `next`).
#[derive(Debug, Clone, PartialEq)]
pub struct Handoff {
    pub queue: String,
    pub timeout: Option<Duration>,
    pub on_timeout: Option<usize>,
}

#[derive(Debug)]
pub enum Wait {
    For(Duration),
    /// A time of day (`09:00`, in the contact's timezone) or an RFC 3339 instant.
    Until(Text),
}

#[derive(Debug)]
pub enum Action {
    None,
    Say(Message),
    Ask(Box<Ask>),
    Template(TemplateCall),
    Script(Arc<Script>),
    Http(Box<Http>),
    /// `location`: a pin on the map.
    Location(Box<Location>),
    /// `contacts`: contact cards.
    Contacts(Vec<Card>),
    /// `form`: a WhatsApp Flow; the step waits for its answer.
    Form(Box<Form>),
}

/// A `form` step: the WhatsApp Flow to open, and the fields its answer must carry.
#[derive(Debug)]
pub struct Form {
    pub flow_id: String,
    pub cta: Text,
    pub body: Text,
    pub screen: Option<String>,
    pub data: Option<Body>,
    /// `(name, type)`, in the order written.
    pub fields: Vec<(String, FieldType)>,
    pub save: Option<String>,
}

/// The type a form's field must have in the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    Text,
    Number,
    Boolean,
    List,
    Any,
}

impl FieldType {
    pub const NAMES: [&'static str; 5] = ["text", "number", "boolean", "list", "any"];

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "text" => Self::Text,
            "number" => Self::Number,
            "boolean" => Self::Boolean,
            "list" => Self::List,
            "any" => Self::Any,
            _ => return None,
        })
    }

    /// Whether a JSON value of the answer has this type.
    pub fn accepts(self, value: &serde_json::Value) -> bool {
        match self {
            Self::Text => value.is_string(),
            Self::Number => value.is_number(),
            Self::Boolean => value.is_boolean(),
            Self::List => value.is_array(),
            Self::Any => !value.is_null(),
        }
    }

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

/// A `location` step's message; coordinates are text so they can be interpolated, and are
/// checked as numbers in range when rendered (and at load when literal).
#[derive(Debug)]
pub struct Location {
    pub latitude: Text,
    pub longitude: Text,
    pub name: Option<Text>,
    pub address: Option<Text>,
}

/// One card of a `contacts` step.
#[derive(Debug)]
pub struct Card {
    pub name: Text,
    pub phones: Vec<Text>,
    pub emails: Vec<Text>,
    pub org: Option<Text>,
    pub urls: Vec<Text>,
}

/// A free-form message: text with optional buttons, list or media.
#[derive(Debug)]
pub struct Message {
    pub text: Text,
    pub buttons: Vec<(String, Text)>,
    pub list: Option<List>,
    pub media: Option<Media>,
}

/// A message's media: its kind (`image`, `document`, …), where it comes from, and the name
/// a document shows.
#[derive(Debug)]
pub struct Media {
    pub kind: String,
    pub source: MediaSource,
    pub filename: Option<Text>,
}

#[derive(Debug)]
pub enum MediaSource {
    /// A public link WhatsApp fetches.
    Link(Text),
    /// A file of the project, uploaded by the outbox sender and sent by its media id.
    File(ProjectFile),
}

/// A project file a message sends: its path relative to the project's directory, as
/// written, and where it is written (for `check`'s errors).
#[derive(Debug, Clone)]
pub struct ProjectFile {
    pub path: String,
    pub loc: Loc,
}

impl Message {
    /// The project file this message sends, with its media kind.
    pub fn project_file(&self) -> Option<(&str, &ProjectFile)> {
        match &self.media {
            Some(Media {
                kind,
                source: MediaSource::File(file),
                ..
            }) => Some((kind, file)),
            _ => None,
        }
    }
}

impl Flow {
    /// Every project file the flow's messages send, with its media kind.
    pub fn project_files(&self) -> Vec<(&str, &ProjectFile)> {
        self.steps
            .iter()
            .filter_map(|s| match &s.action {
                Action::Say(m) => m.project_file(),
                Action::Ask(a) => a.prompt.project_file(),
                _ => None,
            })
            .collect()
    }
}

#[derive(Debug)]
pub struct List {
    pub button: Text,
    pub sections: Vec<(Option<Text>, Vec<ListRow>)>,
}

#[derive(Debug)]
pub struct ListRow {
    pub id: String,
    pub title: Text,
    pub description: Option<Text>,
}

#[derive(Debug)]
pub struct Ask {
    pub prompt: Message,
    pub save: Option<String>,
    pub expect: Expect,
    pub retry: Option<Text>,
    pub attempts: u32,
    pub on_fail: Option<usize>,
    pub timeout: Option<Duration>,
    pub on_timeout: Option<usize>,
}

/// What an `ask` accepts.
#[derive(Debug)]
pub enum Expect {
    Any,
    Number,
    Email,
    Phone,
    /// A date: `2026-12-01`, `01.12.2026`, `1/12/2026` (day first), `today`, `tomorrow`.
    Date,
    /// A tap on one of the step's buttons or list rows.
    Button,
    Regex(Regex),
    /// A file of one of these kinds (`image`, `document`, `audio`, `video`, `sticker`):
    /// the step waits for its download and saves the file's variable.
    Media(Vec<String>),
}

pub const EXPECT_KINDS: [&str; 11] = [
    "any", "number", "email", "phone", "date", "button", "image", "document", "audio", "video",
    "sticker",
];

#[derive(Debug)]
pub struct TemplateCall {
    pub name: String,
    pub language: String,
    pub params: Vec<Text>,
    pub loc: Loc,
}

#[derive(Debug)]
pub struct Script {
    /// `scripts/order_lookup.rhai` or `flows/x.yaml (inline)`.
    pub name: String,
    pub ast: AST,
    /// Where line 1 of the script is, to report runtime errors at the right line.
    pub file: String,
    pub first_line: usize,
    pub first_col: usize,
    /// Steps the source names in a literal `goto("…")`: where the script can jump.
    pub jumps: Vec<usize>,
    /// Whether the source calls `reply` or `reply_buttons`, so the script can send.
    pub replies: bool,
}

impl Script {
    /// `file:line:col` of a script error.
    pub fn locate(&self, e: &ScriptError) -> String {
        match e.line {
            Some(line) => format!(
                "{}:{}:{}",
                self.file,
                self.first_line + line - 1,
                self.first_col - 1 + e.col.unwrap_or(1)
            ),
            None => self.file.clone(),
        }
    }
}

#[derive(Debug)]
pub struct Http {
    pub method: String,
    pub url: Text,
    pub headers: Vec<(String, Text)>,
    pub body: Option<Body>,
    pub save: Option<String>,
    pub timeout: Duration,
}

/// A JSON body whose strings are interpolated per call.
#[derive(Debug)]
pub enum Body {
    Text(Text),
    Value(serde_json::Value),
    Array(Vec<Body>),
    Object(Vec<(String, Body)>),
}

#[derive(Debug)]
pub enum Route {
    End,
    Goto(Target),
    Branches(Vec<Branch>),
}

#[derive(Debug)]
pub struct Branch {
    pub cond: Cond,
    pub target: Target,
}

#[derive(Debug)]
pub enum Cond {
    Always,
    If(Expr),
    Button(String),
    List(String),
    Match(Regex),
    /// A branch of an A/B `split`: every branch of the route is one, and one is chosen per
    /// contact by [`split_branch`], in proportion to the weights.
    Split {
        name: String,
        weight: f64,
    },
}

impl Cond {
    /// Whether this branch looks at the customer's reply (so the step waits for one).
    pub fn tests_reply(&self) -> bool {
        matches!(self, Self::Button(_) | Self::List(_) | Self::Match(_))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Step(usize),
    Flow(String),
}

/// A compiled Rhai expression with its source, for messages.
#[derive(Debug)]
pub struct Expr {
    pub source: String,
    pub ast: AST,
}

/// Text with `{{ … }}` interpolation.
#[derive(Debug)]
pub struct Text {
    pub raw: String,
    parts: Vec<Part>,
}

#[derive(Debug)]
enum Part {
    Lit(String),
    /// A plain variable path such as `order_id` or `contact.name`: looked up without Rhai.
    Path(Vec<String>),
    Expr(Expr),
}

impl Text {
    pub fn literal(text: impl Into<String>) -> Self {
        let raw = text.into();
        Self {
            parts: vec![Part::Lit(raw.clone())],
            raw,
        }
    }

    /// Compiles `raw`; on error, the byte offset of the failing `{{` and the error.
    pub fn compile(raw: &str, scripting: &Scripting) -> Result<Self, (usize, ScriptError)> {
        let mut parts = Vec::new();
        let mut rest = raw;
        let mut consumed = 0;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Lit(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let Some(end) = after.find("}}") else {
                return Err((
                    consumed + start,
                    ScriptError::plain("`{{` without a closing `}}`"),
                ));
            };
            let source = after[..end].trim();
            if is_path(source) {
                parts.push(Part::Path(source.split('.').map(str::to_string).collect()));
            } else {
                let ast = scripting
                    .compile_expression(source)
                    .map_err(|e| (consumed + start, e))?;
                parts.push(Part::Expr(Expr {
                    source: source.to_string(),
                    ast,
                }));
            }
            consumed += start + 2 + end + 2;
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        Ok(Self {
            raw: raw.to_string(),
            parts,
        })
    }

    /// Whether the text has no `{{ … }}`, so its length is known at load time.
    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Lit(_)))
    }

    /// The text without its interpolations: a lower bound of its length.
    pub fn literal_len(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Lit(s) => s.chars().count(),
                _ => 0,
            })
            .sum()
    }

    /// Interpolates the text.
    pub fn render(&self, scripting: &Scripting, ctx: &Context<'_>) -> Result<String, ScriptError> {
        if let [Part::Lit(s)] = self.parts.as_slice() {
            return Ok(s.clone());
        }
        let mut out = String::with_capacity(self.raw.len());
        for part in &self.parts {
            match part {
                Part::Lit(s) => out.push_str(s),
                part => out.push_str(&display(&self.eval_part(part, scripting, ctx)?)),
            }
        }
        Ok(out)
    }

    /// Interpolates to a typed value: a text that is exactly one `{{ expr }}` keeps the
    /// expression's type (numbers stay numbers); YAML numbers and booleans are typed already.
    pub fn value(&self, scripting: &Scripting, ctx: &Context<'_>) -> Result<Dynamic, ScriptError> {
        match self.parts.as_slice() {
            [part @ (Part::Path(_) | Part::Expr(_))] => self.eval_part(part, scripting, ctx),
            _ => Ok(Dynamic::from(self.render(scripting, ctx)?)),
        }
    }

    fn eval_part(
        &self,
        part: &Part,
        scripting: &Scripting,
        ctx: &Context<'_>,
    ) -> Result<Dynamic, ScriptError> {
        match part {
            Part::Lit(s) => Ok(Dynamic::from(s.clone())),
            Part::Path(path) => Ok(lookup(path, ctx)),
            Part::Expr(e) => scripting.eval(&e.ast, ctx),
        }
    }

    /// Every plain variable path in the text, such as `["contact", "name"]` (for checks of
    /// what a text may name).
    pub fn paths(&self) -> impl Iterator<Item = &[String]> {
        self.parts.iter().filter_map(|p| match p {
            Part::Path(path) => Some(path.as_slice()),
            _ => None,
        })
    }

    /// Every expression in the text (for lints).
    pub fn expressions(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Expr(e) => Some(e.source.as_str()),
            _ => None,
        })
    }
}

fn is_path(source: &str) -> bool {
    !source.is_empty()
        && source.split('.').all(|seg| {
            let mut chars = seg.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        && !matches!(source, "true" | "false")
}

/// Looks a variable path up; an unknown name is empty, like an unset template variable.
fn lookup(path: &[String], ctx: &Context<'_>) -> Dynamic {
    let root = match path[0].as_str() {
        "contact" => ctx.contact,
        "message" => ctx.message,
        name => match ctx.vars.get(name) {
            Some(v) => v,
            None => return Dynamic::UNIT,
        },
    };
    descend(root, &path[1..])
}

/// Follows `rest` into nested maps, copying only the value found.
fn descend(value: &Dynamic, rest: &[String]) -> Dynamic {
    let Some((first, rest)) = rest.split_first() else {
        return value.flatten_clone();
    };
    match value.read_lock::<rhai::Map>() {
        Some(map) => match map.get(first.as_str()) {
            Some(v) => descend(v, rest),
            None => Dynamic::UNIT,
        },
        None => Dynamic::UNIT,
    }
}

/// How a value reads in a message: `()` is empty, strings without quotes.
pub fn display(value: &Dynamic) -> String {
    if value.is_unit() {
        String::new()
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::{contains_word, split_branch};

    #[test]
    fn a_split_follows_its_weights_and_keeps_each_contact_on_one_branch() {
        let weights = [70.0, 20.0, 7.5, 2.5];
        let mut counts = [0usize; 4];
        for i in 0..10_000 {
            let contact = format!("4915{i:08}");
            let branch = split_branch(&contact, "promo", "wording", &weights);
            assert_eq!(branch, split_branch(&contact, "promo", "wording", &weights));
            counts[branch] += 1;
        }
        for (n, w) in counts.iter().zip(weights) {
            let share = *n as f64 / 10_000.0;
            assert!((share - w / 100.0).abs() <= 0.02, "{counts:?}");
        }
        // Another split of the same contacts is drawn independently.
        let other = (0..1000)
            .filter(|i| {
                let c = format!("4915{i:08}");
                split_branch(&c, "promo", "wording", &[1.0, 1.0])
                    != split_branch(&c, "promo", "other", &[1.0, 1.0])
            })
            .count();
        assert!((400..600).contains(&other), "{other}");
    }

    #[test]
    fn keywords_match_whole_words_only() {
        assert!(contains_word("where is my order?", "order"));
        assert!(contains_word("order", "order"));
        assert!(contains_word("hi, where is my order", "where is my order"));
        assert!(!contains_word("reorder please", "order"));
        assert!(!contains_word("orders", "order"));
        assert!(contains_word("go #menu now", "#menu"));
        assert!(contains_word("menü bitte", "menü"));
        assert!(!contains_word("anything", ""));
    }
}

/// The flows a process knows: the current version of each flow (what triggers start) and
/// every version loaded since start (what running sessions are pinned to).
#[derive(Debug, Default)]
pub struct FlowSet {
    current: Vec<Arc<Flow>>,
    by_id: HashMap<String, usize>,
    versions: HashMap<(String, String), Arc<Flow>>,
}

impl FlowSet {
    pub fn new(flows: Vec<Arc<Flow>>) -> Self {
        let mut set = Self::default();
        set.replace(flows);
        set
    }

    /// Makes `flows` current; earlier versions stay reachable for their sessions.
    pub fn replace(&mut self, flows: Vec<Arc<Flow>>) {
        self.by_id = flows
            .iter()
            .enumerate()
            .map(|(i, f)| (f.id.clone(), i))
            .collect();
        for f in &flows {
            self.versions
                .insert((f.id.clone(), f.version.clone()), f.clone());
        }
        self.current = flows;
    }

    /// Adds an old version (compiled again from its stored bundle).
    pub fn add_version(&mut self, flow: Arc<Flow>) {
        self.versions
            .insert((flow.id.clone(), flow.version.clone()), flow);
    }

    pub fn current(&self) -> &[Arc<Flow>] {
        &self.current
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Flow>> {
        self.by_id.get(id).map(|&i| &self.current[i])
    }

    pub fn version(&self, id: &str, version: &str) -> Option<&Arc<Flow>> {
        self.versions.get(&(id.to_string(), version.to_string()))
    }
}
