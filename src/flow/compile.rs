//! One flow file into a [`Flow`]: every reference resolved, every regex and Rhai snippet
//! compiled, WhatsApp's limits checked on literal text. Problems become diagnostics at the
//! key or value involved. A flow with errors is not returned to run; unless it has no steps
//! or no valid start, it is returned as [`Compiled::partial`] (a step with an error stands
//! in as one that does nothing), so `check` still lints it and other flows may name it.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::Duration;
use regex::Regex;
use serde_saphyr::Spanned;
use sha2::{Digest, Sha256};

use super::raw::{
    RawBranch, RawButton, RawContactCard, RawExpect, RawFlow, RawHandoff, RawList, RawLocation,
    RawMedia, RawNext, RawSplitBranch, RawStep, RawTemplateRef, ScalarOr,
};
use super::{
    Action, Ask, Body, Branch, Bundle, Card, Cond, EXPECT_KINDS, Expect, Expr, FieldType, Flow,
    Form, Handoff, Http, List, ListRow, Location, Media, MediaSource, Message, ProjectFile, Route,
    Script, Step, Target, TemplateCall, Text, Trigger, TriggerKind, Wait,
};
use crate::diagnostic::{Diagnostic, Diagnostics, Loc, did_you_mean};
use crate::domain::{HumanDuration, MEDIA_KINDS, limits};
use crate::script::{self, ScriptError, Scripting, Spot};
use crate::templates::{Registry, Status, Template};
use crate::yaml::loc;

/// Finds a script file by the name a flow gives it: `(path for messages, text)`.
pub type ScriptSource<'a> = &'a dyn Fn(&str) -> Result<(String, String), String>;

/// A reference to another flow, checked once every flow is loaded.
#[derive(Debug, Clone)]
pub struct FlowRef {
    pub flow: String,
    pub loc: Loc,
}

/// What compiling one file produced.
#[derive(Debug, Default)]
pub struct Compiled {
    pub flow: Option<Flow>,
    /// The flow read despite its errors (unknown keys left out), for the checks over all
    /// flows and the window lint; never run.
    pub partial: Option<Flow>,
    pub flow_refs: Vec<FlowRef>,
    /// The `flow:` id and its location, even when the flow has errors (for duplicate checks).
    pub id: Option<(String, Loc)>,
    /// Per trigger of the flow, where each of its keywords is written (empty for other
    /// kinds), so a trigger conflict can point at the word.
    pub keyword_locs: Vec<Vec<Loc>>,
    pub diagnostics: Diagnostics,
}

/// Compiles the flow in `text` (the contents of `file`).
pub fn compile_flow(
    file: &str,
    text: &str,
    scripting: &Scripting,
    templates: &Registry,
    scripts: ScriptSource<'_>,
) -> Compiled {
    let mut out = Compiled::default();
    out.diagnostics.add_source(file, Arc::from(text));
    let (raw, errors) = super::recover::parse_past_unknown_keys::<RawFlow>(file, text);
    for error in errors {
        out.diagnostics.push(error);
    }
    let Some(raw) = raw else {
        out.id = super::recover::flow_id(text);
        return out;
    };
    out.id = Some((raw.flow.value.clone(), loc(&raw.flow)));
    let mut c = Compiler {
        file,
        text,
        scripting,
        templates,
        scripts,
        diags: &mut out.diagnostics,
        step_ids: raw
            .steps
            .value
            .0
            .iter()
            .map(|(k, _)| k.value.clone())
            .collect(),
        flow_refs: Vec::new(),
        keyword_locs: Vec::new(),
        script_bundle: Vec::new(),
    };
    let flow = c.flow(&raw);
    out.flow_refs = std::mem::take(&mut c.flow_refs);
    out.keyword_locs = std::mem::take(&mut c.keyword_locs);
    if out.diagnostics.has_errors() {
        out.partial = flow;
    } else {
        out.flow = flow;
    }
    out
}

/// The stand-in for a step with an error: it sends nothing and ends the flow. Only in a
/// partial flow, which never runs.
fn placeholder(key: &Spanned<String>) -> Step {
    Step {
        id: key.value.clone(),
        loc: loc(key),
        action_loc: loc(key),
        wait: None,
        set: Vec::new(),
        tag: Vec::new(),
        untag: Vec::new(),
        action: Action::None,
        handoff: None,
        route: Route::End,
        on_error: None,
        outside_window: None,
        react: None,
        quote: false,
    }
}

struct Compiler<'a> {
    file: &'a str,
    text: &'a str,
    scripting: &'a Scripting,
    templates: &'a Registry,
    scripts: ScriptSource<'a>,
    diags: &'a mut Diagnostics,
    step_ids: Vec<String>,
    flow_refs: Vec<FlowRef>,
    keyword_locs: Vec<Vec<Loc>>,
    script_bundle: Vec<(String, String, String)>,
}

impl<'a> Compiler<'a> {
    fn error(&mut self, at: Loc, message: impl Into<String>) -> &mut Diagnostic {
        self.diags
            .push(Diagnostic::error(self.file, Some(at), message));
        self.diags.items.last_mut().expect("just pushed")
    }

    fn warning(&mut self, at: Loc, message: impl Into<String>) -> &mut Diagnostic {
        self.diags
            .push(Diagnostic::warning(self.file, Some(at), message));
        self.diags.items.last_mut().expect("just pushed")
    }

    fn flow(&mut self, raw: &RawFlow) -> Option<Flow> {
        let id = raw.flow.value.clone();
        if !valid_name(&id) {
            self.error(loc(&raw.flow), format!("`{id}` is not a valid flow id"))
                .help = Some("use letters, digits, `_` and `-`".into());
        }
        if self.step_ids.is_empty() {
            self.error(loc(&raw.steps), "a flow needs at least one step");
            return None;
        }
        let start = match &raw.start {
            Some(s) => self.step_ref(s)?,
            None => 0,
        };
        let session_timeout = raw.session_timeout.as_ref().and_then(|t| self.duration(t));
        let triggers = raw
            .triggers
            .iter()
            .filter_map(|t| self.trigger(t))
            .collect();
        let (mut steps, mut broken) = (Vec::new(), false);
        for (index, (key, step)) in raw.steps.value.0.iter().enumerate() {
            if !valid_name(&key.value) {
                self.error(loc(key), format!("`{}` is not a valid step id", key.value))
                    .help = Some("use letters, digits, `_` and `-`".into());
            }
            match self.step(index, key, step) {
                Some(step) => steps.push(step),
                None => {
                    broken = true;
                    steps.push(placeholder(key));
                }
            }
        }
        // A step with an error stands in as one that does nothing, so the rest of the flow
        // is still linted (as a partial flow); what only it reaches is not "unreachable".
        if !broken {
            self.unreachable(&raw.steps.value.0, &steps, start);
        }
        let mut hasher = Sha256::new();
        hasher.update(self.text.as_bytes());
        for (name, _, text) in &self.script_bundle {
            hasher.update(name.as_bytes());
            hasher.update(text.as_bytes());
        }
        let version = hex::encode(&hasher.finalize()[..8]);
        Some(Flow {
            id,
            version,
            description: raw.description.clone(),
            file: self.file.to_string(),
            triggers,
            start,
            session_timeout,
            steps,
            bundle: Bundle {
                file: self.file.to_string(),
                text: self.text.to_string(),
                scripts: std::mem::take(&mut self.script_bundle),
            },
        })
    }

    fn trigger(&mut self, raw: &Spanned<super::raw::RawTrigger>) -> Option<Trigger> {
        let t = &raw.value;
        let kinds = [
            t.keywords.is_some(),
            t.regex.is_some(),
            t.button.is_some(),
            t.list.is_some(),
            t.any.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            self.error(
                loc(raw),
                "a trigger needs exactly one of `keywords`, `regex`, `button`, `list` or `any`",
            );
            return None;
        }
        let kind = if let Some(words) = &t.keywords {
            if words.value.is_empty() {
                self.error(loc(words), "`keywords` is empty");
                return None;
            }
            let words: Vec<String> = words
                .value
                .iter()
                .map(|w| w.value.trim().to_string())
                .collect();
            let words = if t.case_sensitive {
                words
            } else {
                words.into_iter().map(|w| w.to_lowercase()).collect()
            };
            TriggerKind::Keywords {
                words,
                case_sensitive: t.case_sensitive,
            }
        } else if let Some(re) = &t.regex {
            let source = if t.case_sensitive {
                re.value.clone()
            } else {
                format!("(?i){}", re.value)
            };
            TriggerKind::Regex(self.regex(self.value_loc(re), &source)?)
        } else if let Some(b) = &t.button {
            TriggerKind::Button(b.value.clone())
        } else if let Some(l) = &t.list {
            TriggerKind::List(l.value.clone())
        } else {
            TriggerKind::Any
        };
        let words = t.keywords.iter().flat_map(|w| &w.value);
        let keyword_locs = words.map(|w| self.value_loc(w)).collect();
        self.keyword_locs.push(keyword_locs);
        Some(Trigger {
            kind,
            interrupt: t.interrupt,
            priority: t.priority,
            loc: loc(raw),
        })
    }

    fn regex(&mut self, at: Loc, source: &str) -> Option<Regex> {
        match Regex::new(source) {
            Ok(re) => Some(re),
            Err(e) => {
                let detail = e.to_string();
                let last = detail.lines().last().unwrap_or_default().trim().to_string();
                self.error(at, "this regex does not compile").label =
                    Some(last.trim_start_matches("error: ").to_string());
                None
            }
        }
    }

    /// The location of a scalar's content, skipping an opening quote.
    fn value_loc(&self, at: &Spanned<String>) -> Loc {
        let mut l = loc(at);
        if let Some(c) = self.text[l.offset.min(self.text.len())..].chars().next()
            && (c == '"' || c == '\'')
        {
            l.offset += 1;
            l.col += 1;
            l.len = l.len.saturating_sub(2);
        }
        l
    }

    /// The location of the scalar after `key:` in the mapping that starts at `map`, for
    /// values the raw shapes keep without a location of their own (`expect: { regex: … }`).
    /// An opening quote is skipped, like [`Self::value_loc`].
    fn value_after_key(&self, map: Loc, key: &str, value: &str) -> Option<Loc> {
        if !map.is_known() {
            return None;
        }
        let rest = self.text.get(map.offset..)?;
        let mut from = 0;
        while let Some(i) = rest[from..].find(key) {
            let after_key = &rest[from + i + key.len()..];
            let after_blanks = after_key.trim_start_matches([' ', '\t']);
            if let Some(after_colon) = after_blanks.strip_prefix(':') {
                let mut offset = map.offset + from + i + key.len() + 1;
                offset += after_key.len() - after_blanks.len();
                offset += after_colon.len() - after_colon.trim_start().len();
                if self.text[offset..].starts_with(['"', '\'']) {
                    offset += 1;
                }
                let line_start = self.text[..offset].rfind('\n').map_or(0, |n| n + 1);
                return Some(Loc {
                    line: self.text[..offset].matches('\n').count() + 1,
                    col: self.text[line_start..offset].chars().count() + 1,
                    offset,
                    len: value.len(),
                });
            }
            from += i + key.len();
        }
        None
    }

    fn duration(&mut self, at: &Spanned<String>) -> Option<Duration> {
        match at.value.parse::<HumanDuration>() {
            Ok(d) if d.0 > Duration::zero() => Some(d.0),
            Ok(_) => {
                self.error(loc(at), "a duration must be longer than zero");
                None
            }
            Err(e) => {
                self.error(loc(at), e.to_string());
                None
            }
        }
    }

    fn step_ref(&mut self, at: &Spanned<String>) -> Option<usize> {
        match self.step_ids.iter().position(|s| *s == at.value) {
            Some(i) => Some(i),
            None => {
                let help = did_you_mean(&at.value, self.step_ids.iter().map(String::as_str));
                let d = self.error(
                    self.value_loc(at),
                    format!("there is no step `{}` in this flow", at.value),
                );
                d.label = Some("unknown step".into());
                d.help = help;
                None
            }
        }
    }

    fn flow_ref(&mut self, at: &Spanned<String>) -> Target {
        self.flow_refs.push(FlowRef {
            flow: at.value.clone(),
            loc: self.value_loc(at),
        });
        Target::Flow(at.value.clone())
    }

    fn text(&mut self, at: &Spanned<String>) -> Option<Text> {
        match Text::compile(&at.value, self.scripting) {
            Ok(t) => Some(t),
            Err((offset, e)) => {
                let mut l = self.value_loc(at);
                if !at.value[..offset].contains('\n') && l.is_known() {
                    l.offset += offset;
                    l.col += at.value[..offset].chars().count();
                    l.len = 2;
                }
                self.error(
                    l,
                    format!(
                        "this `{{{{ … }}}}` expression does not compile: {}",
                        e.message
                    ),
                );
                None
            }
        }
    }

    fn expr(&mut self, at: &Spanned<String>) -> Option<Expr> {
        match self.scripting.compile_expression(&at.value) {
            Ok(ast) => Some(Expr {
                source: at.value.clone(),
                ast,
            }),
            Err(e) => {
                let mut l = self.value_loc(at);
                if let (Some(1), Some(col)) = (e.line, e.col) {
                    l.col += col - 1;
                    l.offset += at
                        .value
                        .char_indices()
                        .nth(col - 1)
                        .map(|(i, _)| i)
                        // Rhai reports "incomplete" one past the last character.
                        .unwrap_or(at.value.len());
                    l.len = 1;
                }
                self.error(l, format!("this condition does not compile: {}", e.message));
                None
            }
        }
    }

    /// One step: its shape checked (one action, one way on, only the keys its action
    /// takes), then each part compiled. `None` when any part had an error.
    fn step(
        &mut self,
        index: usize,
        key: &Spanned<String>,
        raw: &Spanned<RawStep>,
    ) -> Option<Step> {
        let s = &raw.value;
        let errors_before = self.diags.errors();
        let key_loc = loc(key);
        let action_loc = self.one_action(s);
        self.one_way_on(s);
        self.misplaced_keys(s);
        let wait = self.step_wait(s);
        let set = self.step_set(s);
        let action = self.action(index, s);
        let route = self.way_on(s);
        let on_error = s.on_error.as_ref().and_then(|e| self.step_ref(e));
        let outside_window = self.outside_window(s);
        let handoff = s.handoff.as_ref().and_then(|h| self.handoff(h));
        let react = s.react.as_ref().and_then(|r| self.reaction(r));
        if self.diags.errors() > errors_before {
            return None;
        }
        Some(Step {
            id: key.value.clone(),
            loc: key_loc,
            action_loc: action_loc.unwrap_or(key_loc),
            wait,
            set,
            tag: s
                .tag
                .as_ref()
                .map(|t| t.value.0.clone())
                .unwrap_or_default(),
            untag: s
                .untag
                .as_ref()
                .map(|t| t.value.0.clone())
                .unwrap_or_default(),
            action: action?,
            handoff,
            route: route?,
            on_error,
            outside_window,
            react,
            quote: s.quote.as_ref().is_some_and(|q| q.value),
        })
    }

    /// A step does one thing: an error for a second action. Returns where the first is.
    fn one_action(&mut self, s: &RawStep) -> Option<Loc> {
        let actions: Vec<(&str, Loc)> = [
            ("say", s.say.as_ref().map(loc)),
            ("ask", s.ask.as_ref().map(loc)),
            ("template", s.template.as_ref().map(loc)),
            ("script", s.script.as_ref().map(loc)),
            ("rhai", s.rhai.as_ref().map(loc)),
            ("http", s.http.as_ref().map(loc)),
            ("location", s.location.as_ref().map(loc)),
            ("contacts", s.contacts.as_ref().map(loc)),
            ("form", s.form.as_ref().map(loc)),
        ]
        .into_iter()
        .filter_map(|(name, l)| l.map(|l| (name, l)))
        .collect();
        if let [(first, _), (second, at), ..] = actions.as_slice() {
            let (first, second, at) = (*first, *second, *at);
            self.error(
                at,
                format!("a step does one thing: it has both `{first}` and `{second}`"),
            )
            .help = Some("split it into two steps joined by `next`".into());
        }
        actions.first().map(|&(_, at)| at)
    }

    /// A step has one way on: an error for a second one.
    fn one_way_on(&mut self, s: &RawStep) {
        let routes: Vec<(&str, Loc)> = [
            ("next", s.next.as_ref().map(loc)),
            ("goto", s.goto.as_ref().map(loc)),
            ("flow", s.flow.as_ref().map(loc)),
            ("end", s.end.as_ref().map(loc)),
            ("split", s.split.as_ref().map(loc)),
        ]
        .into_iter()
        .filter_map(|(name, l)| l.map(|l| (name, l)))
        .collect();
        if let [(first, _), (second, at), ..] = routes.as_slice() {
            let (first, second, at) = (*first, *second, *at);
            self.error(
                at,
                format!("a step has one way on: it has both `{first}` and `{second}`"),
            );
        }
    }

    /// Keys the step's action does not take: an `ask`'s keys without an `ask` (but an
    /// `http` step's `save`), a message's parts without a message, buttons with a list,
    /// `on_timeout` without a `timeout`.
    fn misplaced_keys(&mut self, s: &RawStep) {
        if s.ask.is_none() {
            for (name, at) in [
                ("save", s.save.as_ref().map(loc)),
                ("expect", s.expect.as_ref().map(loc)),
                ("retry", s.retry.as_ref().map(loc)),
                ("attempts", s.attempts.as_ref().map(loc)),
                ("on_fail", s.on_fail.as_ref().map(loc)),
                ("timeout", s.timeout.as_ref().map(loc)),
                ("on_timeout", s.on_timeout.as_ref().map(loc)),
            ] {
                if let Some(at) = at
                    && ((s.http.is_none() && s.form.is_none()) || name != "save")
                {
                    self.error(
                        at,
                        format!("`{name}` belongs to an `ask` step, and this step has no `ask`"),
                    );
                }
            }
        }
        if s.say.is_none() && s.ask.is_none() {
            for (name, at) in [
                ("buttons", s.buttons.as_ref().map(loc)),
                ("list", s.list.as_ref().map(loc)),
                ("media", s.media.as_ref().map(loc)),
            ] {
                if let Some(at) = at {
                    self.error(
                        at,
                        format!("`{name}` needs a `say` or `ask` text to go with"),
                    );
                }
            }
        }
        if let Some(q) = &s.quote
            && q.value
            && s.say.is_none()
            && s.ask.is_none()
            && s.template.is_none()
            && s.location.is_none()
            && s.contacts.is_none()
            && s.form.is_none()
            && s.script.is_none()
            && s.rhai.is_none()
        {
            self.error(
                loc(q),
                "`quote` needs a message to quote with: a `say`, `ask`, `template`, `location`, `contacts` or a script that replies",
            );
        }
        if let (Some(_), Some(list)) = (&s.buttons, &s.list) {
            self.error(loc(list), "a message has buttons or a list, not both");
        }
        if let Some(on_timeout) = &s.on_timeout
            && s.timeout.is_none()
        {
            self.error(loc(on_timeout), "`on_timeout` needs a `timeout`");
        }
    }

    /// The step's `wait`: a duration, or a time to wait until.
    fn step_wait(&mut self, s: &RawStep) -> Option<Wait> {
        let w = s.wait.as_ref()?;
        match &w.value {
            ScalarOr::Scalar(d) => {
                let spanned = Spanned {
                    value: d.clone(),
                    referenced: w.referenced,
                    defined: w.defined,
                };
                self.duration(&spanned).map(Wait::For)
            }
            ScalarOr::Keyed(t, _) => {
                let spanned = Spanned {
                    value: t.clone(),
                    referenced: w.referenced,
                    defined: w.defined,
                };
                self.text(&spanned).map(Wait::Until)
            }
        }
    }

    /// The step's `handoff`: its queue, and the timeout with the step it goes on at.
    fn handoff(&mut self, h: &Spanned<RawHandoff>) -> Option<Handoff> {
        let at = |value: &str| Spanned {
            value: value.to_string(),
            referenced: h.referenced,
            defined: h.defined,
        };
        if h.value.queue.trim().is_empty() {
            self.error(loc(h), "a `handoff` needs the name of a queue");
            return None;
        }
        let timeout = match &h.value.timeout {
            Some(t) => Some(self.duration(&at(t))?),
            None => None,
        };
        let on_timeout = match &h.value.on_timeout {
            Some(_) if timeout.is_none() => {
                self.error(loc(h), "the handoff's `on_timeout` needs a `timeout`");
                return None;
            }
            Some(step) => Some(self.step_ref(&at(step))?),
            None => None,
        };
        Some(Handoff {
            queue: h.value.queue.clone(),
            timeout,
            on_timeout,
        })
    }

    /// The step's `set`: each variable with the text (or JSON value) it gets.
    fn step_set(&mut self, s: &RawStep) -> Vec<(String, Text)> {
        let mut set = Vec::new();
        let Some(vars) = &s.set else {
            return set;
        };
        for (name, value) in &vars.value.0 {
            if !valid_var(&name.value) {
                self.error(
                    loc(name),
                    format!("`{}` is not a valid variable name", name.value),
                );
                continue;
            }
            let text = match &value.value {
                serde_json::Value::String(text) => {
                    let spanned = Spanned {
                        value: text.clone(),
                        referenced: value.referenced,
                        defined: value.defined,
                    };
                    self.text(&spanned)
                }
                other => Text::compile(&format!("{{{{ {other} }}}}"), self.scripting).ok(),
            };
            if let Some(text) = text {
                set.push((name.value.clone(), text));
            }
        }
        set
    }

    /// The step's action (the first one it names).
    fn action(&mut self, index: usize, s: &RawStep) -> Option<Action> {
        if let Some(text) = &s.say {
            self.message(text, s).map(Action::Say)
        } else if let Some(text) = &s.ask {
            let prompt = self.message(text, s);
            let ask = self.ask(s, prompt);
            ask.map(|a| Action::Ask(Box::new(a)))
        } else if let Some(t) = &s.template {
            self.template(t).map(Action::Template)
        } else if let Some(name) = &s.script {
            self.script_file(index, name)
                .map(|s| Action::Script(Arc::new(s)))
        } else if let Some(source) = &s.rhai {
            self.script_inline(index, source)
                .map(|s| Action::Script(Arc::new(s)))
        } else if let Some(http) = &s.http {
            self.http(http, s.save.as_ref())
                .map(|h| Action::Http(Box::new(h)))
        } else if let Some(l) = &s.location {
            self.location(l).map(|l| Action::Location(Box::new(l)))
        } else if let Some(cards) = &s.contacts {
            self.contacts(cards).map(Action::Contacts)
        } else if let Some(form) = &s.form {
            let save = s.save.as_ref().and_then(|v| self.save_name(v));
            self.form(form, save).map(|f| Action::Form(Box::new(f)))
        } else {
            Some(Action::None)
        }
    }

    /// Where the step goes after its action (the end when it names nothing).
    fn way_on(&mut self, s: &RawStep) -> Option<Route> {
        if s.end.as_ref().is_some_and(|e| e.value) {
            Some(Route::End)
        } else if let Some(goto) = &s.goto {
            self.step_ref(goto).map(|i| Route::Goto(Target::Step(i)))
        } else if let Some(flow) = &s.flow {
            Some(Route::Goto(self.flow_ref(flow)))
        } else if let Some(next) = &s.next {
            self.route(next, s)
        } else if let Some(split) = &s.split {
            self.split(split)
        } else {
            Some(Route::End)
        }
    }

    /// A `split`: at least two branches, each with a positive weight, a unique name (the
    /// target step's id by default) and a target.
    fn split(&mut self, raw: &Spanned<Vec<Spanned<RawSplitBranch>>>) -> Option<Route> {
        if raw.value.len() < 2 {
            self.error(
                loc(raw),
                format!(
                    "a `split` needs at least two branches; this one has {}",
                    raw.value.len()
                ),
            )
            .help = Some("add `- { weight: 50, goto: other_step }`".into());
            return None;
        }
        let mut branches = Vec::new();
        let mut names: Vec<String> = Vec::new();
        let mut ok = true;
        for b in &raw.value {
            let v = &b.value;
            let weight = v.weight.value;
            if !(weight.is_finite() && weight > 0.0) {
                self.error(
                    loc(&v.weight),
                    format!("a split's weight is a number above zero, not {weight}"),
                );
                ok = false;
            }
            let target = match (&v.goto, &v.flow) {
                (Some(step), None) => self.step_ref(step).map(Target::Step),
                (None, Some(flow)) => Some(self.flow_ref(flow)),
                (Some(_), Some(flow)) => {
                    self.error(loc(flow), "a split branch has `goto` or `flow`, not both");
                    None
                }
                (None, None) => {
                    self.error(loc(b), "a split branch needs `goto: STEP` or `flow: FLOW`");
                    None
                }
            };
            let name = match (&v.name, &v.goto, &v.flow) {
                (Some(n), ..) => {
                    if !valid_name(&n.value) {
                        self.error(
                            self.value_loc(n),
                            format!(
                                "`{}` is not a valid branch name: use letters, digits, `_` and `-`",
                                n.value
                            ),
                        );
                        ok = false;
                    }
                    n.value.clone()
                }
                (None, Some(t), _) | (None, None, Some(t)) => t.value.clone(),
                (None, None, None) => String::new(),
            };
            if !name.is_empty() && names.contains(&name) {
                let at = v.name.as_ref().map(loc).unwrap_or(loc(b));
                self.error(at, format!("two branches of this split are named `{name}`"))
                    .help = Some("give each branch its own `name:`".into());
                ok = false;
            }
            names.push(name.clone());
            if let Some(target) = target {
                branches.push(Branch {
                    cond: Cond::Split { name, weight },
                    target,
                });
            } else {
                ok = false;
            }
        }
        ok.then_some(Route::Branches(branches))
    }

    /// The template a `say` or `ask` is sent as outside the window.
    fn outside_window(&mut self, s: &RawStep) -> Option<TemplateCall> {
        let outside_window = s.outside_window.as_ref().and_then(|t| self.template(t));
        if let Some(ow) = &s.outside_window
            && s.say.is_none()
            && s.ask.is_none()
            && s.location.is_none()
            && s.contacts.is_none()
            && s.form.is_none()
        {
            self.warning(
                loc(ow),
                "`outside_window` only applies to a `say`, `ask`, `location`, `contacts` or `form` message",
            );
        }
        outside_window
    }

    /// A `say` or `ask` message with its buttons, list or media, and WhatsApp's limits.
    fn message(&mut self, text_at: &Spanned<String>, s: &RawStep) -> Option<Message> {
        let text = self.text(text_at)?;
        let buttons = match &s.buttons {
            Some(raw) => self.buttons(raw)?,
            None => Vec::new(),
        };
        let list = match &s.list {
            Some(l) => Some(self.list(l)?),
            None => None,
        };
        let media = match &s.media {
            Some(m) => Some(self.media(m)?),
            None => None,
        };
        let max = if media.is_some() || !buttons.is_empty() {
            limits::CAPTION_OR_BUTTON_BODY
        } else {
            limits::TEXT_BODY
        };
        if text.literal_len() > max {
            self.error(
                loc(text_at),
                format!(
                    "this text is {} characters; WhatsApp allows {max} here",
                    text.literal_len()
                ),
            );
        }
        Some(Message {
            text,
            buttons,
            list,
            media,
        })
    }

    /// A message's reply buttons: how many, ids and titles within WhatsApp's limits and
    /// unique.
    fn buttons(&mut self, raw: &Spanned<Vec<Spanned<RawButton>>>) -> Option<Vec<(String, Text)>> {
        if raw.value.len() > limits::MAX_BUTTONS {
            self.error(
                loc(&raw.value[limits::MAX_BUTTONS]),
                format!(
                    "WhatsApp allows at most {} reply buttons; this is number {}",
                    limits::MAX_BUTTONS,
                    limits::MAX_BUTTONS + 1
                ),
            )
            .help = Some("use a `list` for up to 10 choices".into());
        }
        if raw.value.is_empty() {
            self.error(loc(raw), "`buttons` is empty");
        }
        let mut buttons: Vec<(String, Text)> = Vec::new();
        let mut titles: Vec<String> = Vec::new();
        for b in &raw.value {
            self.limit(&b.value.id, limits::BUTTON_ID, "a button id");
            let title = self.text(&b.value.title)?;
            if title.is_literal() {
                self.limit(&b.value.title, limits::BUTTON_TITLE, "a button title");
                if titles.contains(&title.raw) {
                    self.error(
                        self.value_loc(&b.value.title),
                        "two buttons have this title: WhatsApp needs them unique",
                    );
                }
                titles.push(title.raw.clone());
            }
            if buttons.iter().any(|(id, _)| *id == b.value.id.value) {
                self.error(
                    self.value_loc(&b.value.id),
                    format!("two buttons have the id `{}`", b.value.id.value),
                );
            }
            buttons.push((b.value.id.value.clone(), title));
        }
        Some(buttons)
    }

    /// A message's media: a kind WhatsApp knows, and a link (`url`) or a project file
    /// (`file`, a fixed path inside the project; `check` then reads it); `filename` for
    /// documents.
    fn media(&mut self, m: &Spanned<RawMedia>) -> Option<Media> {
        let raw = &m.value;
        let kinds = ["image", "video", "audio", "document", "sticker"];
        if !kinds.contains(&raw.kind.value.as_str()) {
            let help = did_you_mean(&raw.kind.value, kinds);
            self.error(
                self.value_loc(&raw.kind),
                format!("`{}` is not a media type", raw.kind.value),
            )
            .help = help.or(Some("use image, video, audio, document or sticker".into()));
        }
        let filename = match &raw.filename {
            Some(f) if raw.kind.value != "document" => {
                self.error(
                    loc(f),
                    format!("`filename` names documents; this is {}", raw.kind.value),
                );
                None
            }
            Some(f) => Some(self.text(f)?),
            None => None,
        };
        let source = match (&raw.url, &raw.file) {
            (Some(url), None) => MediaSource::Link(self.text(url)?),
            (None, Some(file)) => MediaSource::File(self.project_file(file)?),
            (Some(_), Some(file)) => {
                self.error(loc(file), "`media` has both `url` and `file`")
                    .help =
                    Some("send a link (`url`) or a file of the project (`file`), not both".into());
                return None;
            }
            (None, None) => {
                self.error(
                    loc(m),
                    "`media` needs `url` (a link) or `file` (a file of the project)",
                );
                return None;
            }
        };
        Some(Media {
            kind: raw.kind.value.clone(),
            source,
            filename,
        })
    }

    /// A `file:` path: fixed (no `{{ }}`), relative, inside the project.
    fn project_file(&mut self, file: &Spanned<String>) -> Option<ProjectFile> {
        let path = file.value.trim();
        let at = self.value_loc(file);
        let problem = if path.is_empty() {
            Some("`file` is empty")
        } else if path.contains("{{") {
            Some("a project file is a fixed path, not a template")
        } else if std::path::Path::new(path).is_absolute()
            || path.starts_with('/')
            || path.split(['/', '\\']).any(|part| part == "..")
        {
            Some("a project file is a path inside the project, relative to its directory")
        } else {
            None
        };
        if let Some(problem) = problem {
            self.error(at, problem).help =
                Some("write e.g. `file: media/menu.jpg`, or use `url:` for a link".into());
            return None;
        }
        Some(ProjectFile {
            path: path.to_string(),
            loc: at,
        })
    }

    /// A `location`: coordinates in range (when literal), name and address as text.
    fn location(&mut self, raw: &Spanned<RawLocation>) -> Option<Location> {
        let l = &raw.value;
        let latitude = self.coordinate(&l.latitude, "latitude", 90.0);
        let longitude = self.coordinate(&l.longitude, "longitude", 180.0);
        let name = match &l.name {
            Some(n) => Some(self.text(n)?),
            None => None,
        };
        let address = match &l.address {
            Some(a) => Some(self.text(a)?),
            None => None,
        };
        Some(Location {
            latitude: latitude?,
            longitude: longitude?,
            name,
            address,
        })
    }

    /// A latitude or longitude: a number within `±max`, or text with `{{ … }}` checked when
    /// the message is rendered.
    fn coordinate(
        &mut self,
        raw: &Spanned<serde_json::Value>,
        what: &str,
        max: f64,
    ) -> Option<Text> {
        let at = Spanned {
            value: match &raw.value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            },
            referenced: raw.referenced,
            defined: raw.defined,
        };
        let text = match &raw.value {
            serde_json::Value::Number(_) => Text::literal(at.value.clone()),
            serde_json::Value::String(_) => self.text(&at)?,
            _ => {
                self.error(
                    loc(raw),
                    format!("the {what} is a number such as 52.52, or `{{{{ … }}}}` text"),
                );
                return None;
            }
        };
        if text.is_literal()
            && let Err(e) = coordinate_value(&text.raw, what, max)
        {
            self.error(self.value_loc(&at), e);
            return None;
        }
        Some(text)
    }

    /// `contacts`: at least one card, each with a name and something to reach it by.
    fn contacts(&mut self, raw: &Spanned<Vec<Spanned<RawContactCard>>>) -> Option<Vec<Card>> {
        if raw.value.is_empty() {
            self.error(loc(raw), "`contacts` is empty: give at least one card");
            return None;
        }
        let mut cards = Vec::new();
        for card in &raw.value {
            let c = &card.value;
            if c.phone.is_none() && c.email.is_none() && c.url.is_none() {
                self.error(
                    loc(card),
                    format!(
                        "the card `{}` has no `phone`, `email` or `url`",
                        c.name.value
                    ),
                )
                .help = Some("add `phone: \"+15550001111\"` (or a list of them)".into());
            }
            if c.name.value.trim().is_empty() {
                self.error(loc(&c.name), "a contact card needs a name");
            }
            let name = self.text(&c.name);
            let phones = self.texts(c.phone.as_ref());
            let emails = self.texts(c.email.as_ref());
            let urls = self.texts(c.url.as_ref());
            let org = match &c.org {
                Some(o) => Some(self.text(o)?),
                None => None,
            };
            cards.push(Card {
                name: name?,
                phones: phones?,
                emails: emails?,
                org,
                urls: urls?,
            });
        }
        Some(cards)
    }

    /// Each value of a `OneOrMany` as text (they share the key's location).
    fn texts(&mut self, raw: Option<&Spanned<crate::yaml::OneOrMany>>) -> Option<Vec<Text>> {
        let Some(raw) = raw else {
            return Some(Vec::new());
        };
        raw.value
            .0
            .iter()
            .map(|v| {
                self.text(&Spanned {
                    value: v.clone(),
                    referenced: raw.referenced,
                    defined: raw.defined,
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .collect()
    }

    /// A `save:` variable name.
    fn save_name(&mut self, at: &Spanned<String>) -> Option<String> {
        if valid_var(&at.value) {
            Some(at.value.clone())
        } else {
            self.error(
                self.value_loc(at),
                format!("`{}` is not a valid variable name", at.value),
            );
            None
        }
    }

    /// A `form`: the Flow's id (digits), the button label and body within WhatsApp's
    /// limits, a `screen` when there is `data` (a mapping), and the declared fields' types.
    fn form(&mut self, raw: &Spanned<super::raw::RawForm>, save: Option<String>) -> Option<Form> {
        let f = &raw.value;
        let mut ok = true;
        if f.flow_id.value.is_empty() || !f.flow_id.value.chars().all(|c| c.is_ascii_digit()) {
            self.error(
                self.value_loc(&f.flow_id),
                format!(
                    "`{}` is not a Flow id: it is the number WhatsApp Manager shows for the Flow",
                    f.flow_id.value
                ),
            );
            ok = false;
        }
        let cta = self.text(&f.cta);
        if cta.as_ref().is_some_and(Text::is_literal) {
            self.limit(&f.cta, limits::FORM_CTA, "a form's `cta`");
        }
        let body = self.text(&f.body);
        if let Some(b) = &body
            && b.literal_len() > limits::CAPTION_OR_BUTTON_BODY
        {
            self.error(
                loc(&f.body),
                format!(
                    "this text is {} characters; WhatsApp allows {} here",
                    b.literal_len(),
                    limits::CAPTION_OR_BUTTON_BODY
                ),
            );
        }
        let data = match &f.data {
            Some(d) if !d.value.is_object() => {
                self.error(
                    loc(d),
                    "a form's `data` is a mapping of the first screen's fields",
                );
                ok = false;
                None
            }
            Some(d) if f.screen.is_none() => {
                self.error(loc(d), "a form's `data` needs the `screen` it is for")
                    .help = Some("add `screen: FIRST_SCREEN_ID`".into());
                ok = false;
                None
            }
            Some(d) => self.body(&d.value, d),
            None => None,
        };
        let mut fields = Vec::new();
        if let Some(declared) = &f.fields {
            for (name, kind) in &declared.value.0 {
                if name.value == "flow_token" || !valid_var(&name.value) {
                    self.error(
                        loc(name),
                        format!("`{}` cannot be a form field's name here", name.value),
                    );
                    ok = false;
                    continue;
                }
                match FieldType::parse(&kind.value) {
                    Some(t) => fields.push((name.value.clone(), t)),
                    None => {
                        let help = did_you_mean(&kind.value, FieldType::NAMES);
                        self.error(
                            self.value_loc(kind),
                            format!("`{}` is not a field type", kind.value),
                        )
                        .help = help.or(Some("use text, number, boolean, list or any".into()));
                        ok = false;
                    }
                }
            }
        }
        if !ok {
            return None;
        }
        Some(Form {
            flow_id: f.flow_id.value.clone(),
            cta: cta?,
            body: body?,
            screen: f.screen.as_ref().map(|s| s.value.clone()),
            data,
            fields,
            save,
        })
    }

    /// `react`: one emoji (literal, or `{{ … }}` text checked when sent).
    fn reaction(&mut self, raw: &Spanned<String>) -> Option<Text> {
        let text = self.text(raw)?;
        if text.is_literal() && reaction_error(&text.raw).is_some() {
            let e = reaction_error(&text.raw).unwrap_or_default();
            self.error(self.value_loc(raw), e).help =
                Some("write one emoji, such as \"👍\"".into());
            return None;
        }
        Some(text)
    }

    fn limit(&mut self, at: &Spanned<String>, max: usize, what: &str) {
        let len = at.value.chars().count();
        if len > max && !at.value.contains("{{") {
            self.error(
                self.value_loc(at),
                format!("{what} may have at most {max} characters; this one has {len}"),
            );
        }
    }

    fn list(&mut self, raw: &Spanned<RawList>) -> Option<List> {
        let l = &raw.value;
        self.limit(&l.button, limits::LIST_BUTTON, "the list button label");
        if !l.rows.is_empty() && !l.sections.is_empty() {
            self.error(loc(raw), "write `rows` or `sections`, not both");
            return None;
        }
        let raw_sections: Vec<RawSectionRef<'_>> = if l.sections.is_empty() {
            vec![(None, &l.rows)]
        } else {
            l.sections
                .iter()
                .map(|s| (s.value.title.as_ref(), &s.value.rows))
                .collect()
        };
        if l.sections.len() > limits::MAX_LIST_SECTIONS {
            self.error(
                loc(raw),
                format!(
                    "WhatsApp allows at most {} list sections",
                    limits::MAX_LIST_SECTIONS
                ),
            );
        }
        let mut total = 0;
        let mut ids: HashSet<String> = HashSet::new();
        let mut sections = Vec::new();
        for (title, rows) in raw_sections {
            if let Some(t) = title {
                self.limit(t, limits::LIST_SECTION_TITLE, "a section title");
            }
            let mut compiled = Vec::new();
            for row in rows {
                total += 1;
                if total == limits::MAX_LIST_ROWS + 1 {
                    self.error(
                        loc(row),
                        format!(
                            "WhatsApp allows at most {} list rows in all; this is number {}",
                            limits::MAX_LIST_ROWS,
                            total
                        ),
                    )
                    .help = Some("split the choices over two messages".into());
                }
                self.limit(&row.value.id, limits::LIST_ROW_ID, "a row id");
                self.limit(&row.value.title, limits::LIST_ROW_TITLE, "a row title");
                if let Some(d) = &row.value.description {
                    self.limit(d, limits::LIST_ROW_DESCRIPTION, "a row description");
                }
                if !ids.insert(row.value.id.value.clone()) {
                    self.error(
                        self.value_loc(&row.value.id),
                        format!("two rows have the id `{}`", row.value.id.value),
                    );
                }
                let description = match &row.value.description {
                    Some(d) => Some(self.text(d)?),
                    None => None,
                };
                compiled.push(ListRow {
                    id: row.value.id.value.clone(),
                    title: self.text(&row.value.title)?,
                    description,
                });
            }
            let title = match title {
                Some(t) => Some(self.text(t)?),
                None => None,
            };
            sections.push((title, compiled));
        }
        if total == 0 {
            self.error(loc(raw), "a list needs at least one row");
        }
        Some(List {
            button: self.text(&l.button)?,
            sections,
        })
    }

    /// An `ask`: its prompt, what it expects, where the answer is saved, its retries and
    /// timeout.
    fn ask(&mut self, s: &RawStep, prompt: Option<Message>) -> Option<Ask> {
        let prompt = prompt?;
        let expect = match &s.expect {
            None => Expect::Any,
            Some(e) => self.expect(e, &prompt)?,
        };
        if let Some(save) = &s.save
            && !valid_var(&save.value)
        {
            self.error(
                loc(save),
                format!("`{}` is not a valid variable name", save.value),
            );
        }
        let attempts = match &s.attempts {
            Some(a) if a.value == 0 => {
                self.error(loc(a), "`attempts` must be at least 1");
                1
            }
            Some(a) => a.value,
            None => 3,
        };
        let retry = match &s.retry {
            Some(r) => Some(self.text(r)?),
            None => None,
        };
        let timeout = s.timeout.as_ref().and_then(|t| self.duration(t));
        let on_fail = match &s.on_fail {
            Some(f) => Some(self.step_ref(f)?),
            None => None,
        };
        let on_timeout = match &s.on_timeout {
            Some(t) => Some(self.step_ref(t)?),
            None => None,
        };
        Some(Ask {
            prompt,
            save: s.save.as_ref().map(|s| s.value.clone()),
            expect,
            retry,
            attempts,
            on_fail,
            timeout,
            on_timeout,
        })
    }

    /// An `ask`'s `expect`: a kind of answer, a list of file kinds, or `{ regex: … }`.
    fn expect(&mut self, e: &Spanned<RawExpect>, prompt: &Message) -> Option<Expect> {
        let kind = match &e.value {
            RawExpect::Regex(source) => {
                // The raw shape keeps no location for the pattern itself: find it after
                // `regex:` inside the mapping, or point at the mapping.
                let at = self
                    .value_after_key(loc(e), "regex", source)
                    .unwrap_or_else(|| loc(e));
                return Some(Expect::Regex(self.regex(at, source)?));
            }
            RawExpect::Kinds(kinds) => return self.media_kinds(e, kinds),
            RawExpect::Kind(kind) => kind,
        };
        if MEDIA_KINDS.contains(&kind.as_str()) {
            return Some(Expect::Media(vec![kind.clone()]));
        }
        Some(match kind.as_str() {
            "any" => Expect::Any,
            "number" => Expect::Number,
            "email" => Expect::Email,
            "phone" => Expect::Phone,
            "date" => Expect::Date,
            "button" => {
                if prompt.buttons.is_empty() && prompt.list.is_none() {
                    self.error(
                        loc(e),
                        "`expect: button` needs `buttons` or a `list` on this step",
                    );
                }
                Expect::Button
            }
            other => {
                let help = did_you_mean(other, EXPECT_KINDS);
                self.error(
                    loc(e),
                    format!("`{other}` is not something an `ask` can expect"),
                )
                .help = help.or(Some(format!(
                    "use one of {}, or {{ regex: '…' }}",
                    EXPECT_KINDS.join(", ")
                )));
                return None;
            }
        })
    }

    /// `expect: [image, document]`: files of any of these kinds; each must be a file kind.
    fn media_kinds(&mut self, e: &Spanned<RawExpect>, kinds: &[String]) -> Option<Expect> {
        if kinds.is_empty() {
            self.error(loc(e), "`expect` lists no kind of file").help =
                Some(format!("list some of {}", MEDIA_KINDS.join(", ")));
            return None;
        }
        let mut ok = true;
        for kind in kinds {
            if !MEDIA_KINDS.contains(&kind.as_str()) {
                ok = false;
                let help = did_you_mean(kind, MEDIA_KINDS);
                self.error(
                    loc(e),
                    format!("`{kind}` is not a kind of file an `ask` can expect"),
                )
                .help = help.or(Some(format!(
                    "a list holds kinds of file: {}",
                    MEDIA_KINDS.join(", ")
                )));
            }
        }
        ok.then(|| Expect::Media(kinds.to_vec()))
    }

    /// A template call; a template that is not approved is a warning (the policy queues its
    /// messages until Meta approves it).
    fn template(&mut self, raw: &Spanned<RawTemplateRef>) -> Option<TemplateCall> {
        let (call, found) = self.template_call(raw)?;
        if let Some(found) = found
            && found.status != Status::Approved
        {
            let (name, language) = (&call.name, &call.language);
            self.warning(
                self.value_loc(&raw.value.name),
                format!("template `{name}` ({language}) is {}, not approved: the policy queues its messages until Meta approves it", found.status.as_str()),
            );
        }
        Some(call)
    }

    /// A template call checked against the registry (it exists in this language, with this
    /// many parameters), and the registry's entry when both hold.
    fn template_call(
        &mut self,
        raw: &Spanned<RawTemplateRef>,
    ) -> Option<(TemplateCall, Option<&'a Template>)> {
        let t = &raw.value;
        let params: Vec<Text> = t.params.iter().filter_map(|p| self.text(p)).collect();
        if params.len() != t.params.len() {
            return None;
        }
        let (name, language) = (&t.name.value, &t.language.value);
        let templates: &'a Registry = self.templates;
        let mut matching = None;
        match templates.find(name, language) {
            None => {
                let languages = self.templates.languages_of(name);
                if languages.is_empty() {
                    let help = did_you_mean(name, self.templates.names());
                    self.error(
                        self.value_loc(&t.name),
                        format!("there is no template `{name}` in the registry"),
                    )
                    .help = help.or(Some(
                        "add it to templates.yaml, or run `flowgate templates sync`".into(),
                    ));
                } else {
                    self.error(
                        self.value_loc(&t.language),
                        format!("template `{name}` has no `{language}` version"),
                    )
                    .help = Some(format!("it exists in: {}", languages.join(", ")));
                }
            }
            Some(found) => {
                if found.param_count() != params.len() {
                    let at = self.params_loc(t, found.param_count());
                    self.error(
                        at,
                        format!(
                            "template `{name}` ({language}) takes {} parameter{}, and {} {} given",
                            found.param_count(),
                            if found.param_count() == 1 { "" } else { "s" },
                            params.len(),
                            if params.len() == 1 { "is" } else { "are" }
                        ),
                    );
                } else {
                    matching = Some(found);
                }
            }
        }
        let call = TemplateCall {
            name: name.clone(),
            language: language.clone(),
            params,
            loc: loc(raw),
        };
        Some((call, matching))
    }

    /// Where a wrong parameter count shows: the first surplus parameter, or the parameters
    /// given when there are too few, or the template's name when there are none.
    fn params_loc(&self, t: &RawTemplateRef, expected: usize) -> Loc {
        let shown = t
            .params
            .get(expected..)
            .filter(|surplus| !surplus.is_empty());
        let shown = shown.unwrap_or(&t.params);
        match (shown.first(), shown.last()) {
            (Some(first), Some(last)) => self.span(first, last),
            _ => self.value_loc(&t.name),
        }
    }

    /// From the start of `first` to the end of `last` (two values in the same file).
    fn span(&self, first: &Spanned<String>, last: &Spanned<String>) -> Loc {
        let (start, end) = (loc(first), loc(last));
        Loc {
            len: (end.offset + end.len).saturating_sub(start.offset),
            ..start
        }
    }

    fn script_file(&mut self, index: usize, name: &Spanned<String>) -> Option<Script> {
        let (path, source) = match (self.scripts)(&name.value) {
            Ok(found) => found,
            Err(e) => {
                self.error(self.value_loc(name), e);
                return None;
            }
        };
        self.script_bundle
            .push((name.value.clone(), path.clone(), source.clone()));
        self.diags.add_source(&path, Arc::from(source.as_str()));
        let text = ScriptText::File(&path, &source);
        match self.scripting.compile_script(&source) {
            Ok(ast) => {
                let jumps = self.script_jumps(index, &source, &text);
                Some(Script {
                    name: path.clone(),
                    ast,
                    file: path,
                    first_line: 1,
                    first_col: 1,
                    jumps,
                    replies: calls_reply(&source),
                })
            }
            Err(e) => {
                self.does_not_compile(index, &text, &e);
                None
            }
        }
    }

    fn script_inline(&mut self, index: usize, source: &Spanned<String>) -> Option<Script> {
        let mut at = loc(source);
        // A block scalar (`rhai: |`) starts on a line of its own; a one-line script written
        // after the key may be quoted, and its first column is after the quote.
        let line_start = self.text[..at.offset.min(self.text.len())]
            .rfind('\n')
            .map_or(0, |n| n + 1);
        if !self.text[line_start..at.offset.min(self.text.len())]
            .trim()
            .is_empty()
        {
            at = self.value_loc(source);
        }
        let text = ScriptText::Inline(at);
        match self.scripting.compile_script(&source.value) {
            Ok(ast) => {
                let jumps = self.script_jumps(index, &source.value, &text);
                Some(Script {
                    name: format!("{} (inline script)", self.file),
                    ast,
                    file: self.file.to_string(),
                    first_line: at.line,
                    first_col: at.col,
                    jumps,
                    replies: calls_reply(&source.value),
                })
            }
            Err(e) => {
                self.does_not_compile(index, &text, &e);
                None
            }
        }
    }

    /// The steps a script names in `goto("…")`: they count as reachable from its step, and
    /// the lints follow them. What always fails when the script runs is an error here: a
    /// `goto` to a step the flow does not have, an `import` (the sandbox has no modules).
    fn script_jumps(&mut self, index: usize, source: &str, text: &ScriptText<'_>) -> Vec<usize> {
        let mut jumps = Vec::new();
        for (target, spot) in script::literal_gotos(source) {
            if let Some(i) = self.step_ids.iter().position(|s| *s == target) {
                jumps.push(i);
                continue;
            }
            let steps = self.step_ids.iter().map(String::as_str);
            let help = did_you_mean(&target, steps)
                .unwrap_or_else(|| format!("the steps are {}", self.step_ids.join(", ")));
            let message = format!("goto(\"{target}\"): there is no step `{target}` in this flow");
            self.script_error(index, text, spot, message, Some(help))
                .label = Some("unknown step".into());
        }
        for spot in script::imports(source) {
            let message = "`import` always fails: scripts run in a sandbox without modules";
            let help = "write the code into the script itself".to_string();
            self.script_error(index, text, spot, message, Some(help));
        }
        jumps
    }

    /// A script that does not compile, at the place Rhai names.
    fn does_not_compile(&mut self, index: usize, text: &ScriptText<'_>, e: &ScriptError) {
        let spot = Spot {
            line: e.line.unwrap_or(1),
            col: e.col.unwrap_or(1),
            len: 1,
        };
        let message = format!("the script does not compile: {}", e.message);
        self.script_error(index, text, spot, message, None);
    }

    /// An error at `spot` in the script of step `index`: in the script's own file (its help
    /// saying which step uses it), or in the flow where the inline script is written.
    fn script_error(
        &mut self,
        index: usize,
        text: &ScriptText<'_>,
        spot: Spot,
        message: impl Into<String>,
        help: Option<String>,
    ) -> &mut Diagnostic {
        match text {
            ScriptText::File(path, source) => {
                let l = Loc::at(source, spot.line, spot.col, spot.len);
                let used_by = format!("used by step `{}` in {}", self.step_ids[index], self.file);
                let help = match help {
                    Some(h) => format!("{h} (the script is {used_by})"),
                    None => used_by,
                };
                self.diags
                    .push(Diagnostic::error(*path, Some(l), message).with_help(help));
                self.diags.items.last_mut().expect("just pushed")
            }
            ScriptText::Inline(at) => {
                let line = at.line + spot.line - 1;
                let col = at.col + spot.col - 1;
                let d = self.error(Loc::at(self.text, line, col, spot.len), message);
                d.help = help;
                d
            }
        }
    }

    fn http(
        &mut self,
        raw: &Spanned<super::raw::RawHttp>,
        save: Option<&Spanned<String>>,
    ) -> Option<Http> {
        let h = &raw.value;
        let method = h
            .method
            .as_ref()
            .map(|m| m.value.to_uppercase())
            .unwrap_or_else(|| "POST".into());
        if !["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&method.as_str()) {
            self.error(
                loc(h.method.as_ref().expect("a bad method was written")),
                format!("`{method}` is not an HTTP method flowgate sends"),
            );
        }
        let url_at = Spanned {
            value: h.url.value.0.clone(),
            referenced: h.url.referenced,
            defined: h.url.defined,
        };
        let url = self.text(&url_at)?;
        if url.is_literal() && !(url.raw.starts_with("http://") || url.raw.starts_with("https://"))
        {
            self.error(
                loc(&h.url),
                format!("`{}` is not an http:// or https:// URL", url.raw),
            );
        }
        let mut headers = Vec::new();
        for (name, value) in &h.headers.0 {
            let at = Spanned {
                value: value.value.0.clone(),
                referenced: value.referenced,
                defined: value.defined,
            };
            headers.push((name.value.clone(), self.text(&at)?));
        }
        let body = match &h.body {
            Some(b) => Some(self.body(&b.value, b)?),
            None => None,
        };
        let save = h.save.as_ref().or(save);
        if let Some(s) = save
            && !valid_var(&s.value)
        {
            self.error(
                loc(s),
                format!("`{}` is not a valid variable name", s.value),
            );
        }
        let timeout = match &h.timeout {
            Some(t) => self.duration(t)?,
            None => Duration::seconds(10),
        };
        Some(Http {
            method,
            url,
            headers,
            body,
            save: save.map(|s| s.value.clone()),
            timeout,
        })
    }

    fn body(&mut self, value: &serde_json::Value, at: &Spanned<serde_json::Value>) -> Option<Body> {
        Some(match value {
            serde_json::Value::String(s) if s.contains("{{") => {
                let spanned = Spanned {
                    value: s.clone(),
                    referenced: at.referenced,
                    defined: at.defined,
                };
                Body::Text(self.text(&spanned)?)
            }
            serde_json::Value::Array(items) => Body::Array(
                items
                    .iter()
                    .map(|v| self.body(v, at))
                    .collect::<Option<Vec<_>>>()?,
            ),
            serde_json::Value::Object(map) => Body::Object(
                map.iter()
                    .map(|(k, v)| Some((k.clone(), self.body(v, at)?)))
                    .collect::<Option<Vec<_>>>()?,
            ),
            other => Body::Value(other.clone()),
        })
    }

    fn route(&mut self, next: &Spanned<RawNext>, s: &RawStep) -> Option<Route> {
        match &next.value {
            RawNext::Step(step) => {
                let spanned = Spanned {
                    value: step.clone(),
                    referenced: next.referenced,
                    defined: next.defined,
                };
                self.step_ref(&spanned)
                    .map(|i| Route::Goto(Target::Step(i)))
            }
            RawNext::Branches(raw) => {
                if raw.is_empty() {
                    self.error(loc(next), "`next` has no branches");
                    return None;
                }
                let mut branches = Vec::new();
                let mut default_seen: Option<Loc> = None;
                for b in raw {
                    if let Some(at) = default_seen {
                        self.warning(
                            loc(b),
                            "this branch never runs: the branch before it always matches",
                        )
                        .help = Some(format!(
                            "the default branch is at line {}; move it last",
                            at.line
                        ));
                    }
                    let branch = self.branch(b, s)?;
                    if matches!(branch.cond, Cond::Always) && default_seen.is_none() {
                        default_seen = Some(loc(b));
                    }
                    branches.push(branch);
                }
                Some(Route::Branches(branches))
            }
        }
    }

    fn branch(&mut self, raw: &Spanned<RawBranch>, s: &RawStep) -> Option<Branch> {
        let b = &raw.value;
        let conds = [
            b.when.is_some(),
            b.button.is_some(),
            b.list.is_some(),
            b.matches.is_some(),
        ];
        if conds.iter().filter(|c| **c).count() > 1 {
            self.error(
                loc(raw),
                "a branch tests one thing: `if`, `button`, `list` or `match`",
            );
            return None;
        }
        let cond = if let Some(e) = &b.when {
            Cond::If(self.expr(e)?)
        } else if let Some(id) = &b.button {
            if let Some(buttons) = &s.buttons
                && !buttons.value.iter().any(|x| x.value.id.value == id.value)
            {
                let help = did_you_mean(
                    &id.value,
                    buttons.value.iter().map(|x| x.value.id.value.as_str()),
                );
                self.warning(
                    self.value_loc(id),
                    format!("no button of this step has the id `{}`", id.value),
                )
                .help = help.or(Some(
                    "a template's quick-reply payload also works here".into(),
                ));
            }
            Cond::Button(id.value.clone())
        } else if let Some(id) = &b.list {
            if let Some(list) = &s.list {
                let rows: Vec<&str> = list
                    .value
                    .rows
                    .iter()
                    .chain(list.value.sections.iter().flat_map(|s| s.value.rows.iter()))
                    .map(|r| r.value.id.value.as_str())
                    .collect();
                if !rows.contains(&id.value.as_str()) {
                    let help = did_you_mean(&id.value, rows.iter().copied());
                    self.warning(
                        self.value_loc(id),
                        format!("no row of this step's list has the id `{}`", id.value),
                    )
                    .help = help;
                }
            }
            Cond::List(id.value.clone())
        } else if let Some(m) = &b.matches {
            Cond::Match(self.regex(self.value_loc(m), &format!("(?i){}", m.value))?)
        } else {
            Cond::Always
        };
        let target = match (&b.goto, &b.flow) {
            (Some(step), None) => Target::Step(self.step_ref(step)?),
            (None, Some(flow)) => self.flow_ref(flow),
            _ => {
                self.error(loc(raw), "a branch needs exactly one of `goto` or `flow`");
                return None;
            }
        };
        Some(Branch { cond, target })
    }

    fn unreachable(
        &mut self,
        keys: &[(Spanned<String>, Spanned<RawStep>)],
        steps: &[Step],
        start: usize,
    ) {
        let mut seen = vec![false; steps.len()];
        let mut todo = vec![start];
        while let Some(i) = todo.pop() {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            let step = &steps[i];
            let mut edges: Vec<usize> = Vec::new();
            match &step.route {
                Route::Goto(Target::Step(t)) => edges.push(*t),
                Route::Branches(bs) => edges.extend(bs.iter().filter_map(|b| match b.target {
                    Target::Step(t) => Some(t),
                    Target::Flow(_) => None,
                })),
                _ => {}
            }
            if let Action::Ask(ask) = &step.action {
                edges.extend(ask.on_fail);
                edges.extend(ask.on_timeout);
            }
            edges.extend(step.handoff.as_ref().and_then(|h| h.on_timeout));
            edges.extend(step.on_error);
            if let Action::Script(script) = &step.action {
                edges.extend(&script.jumps);
            }
            todo.extend(edges);
        }
        for (i, reached) in seen.iter().enumerate() {
            if !reached {
                self.warning(
                    loc(&keys[i].0),
                    format!("step `{}` is never reached", steps[i].id),
                )
                .help = Some(format!(
                    "no `next`, `goto`, `on_fail`, `on_timeout` or `on_error` leads here from `{}`",
                    steps[start].id
                ));
            }
        }
    }
}

/// Flow syntax that other files embed (a campaign's template call, its `in_window` message,
/// its audience condition), compiled by the flows' own compiler so it reads, interpolates
/// and is reported exactly as in a flow. Diagnostics go to the caller's list.
pub struct Fragments<'a> {
    compiler: Compiler<'a>,
}

impl<'a> Fragments<'a> {
    /// Fragments of `text` (the contents of `file`).
    pub fn new(
        file: &'a str,
        text: &'a str,
        scripting: &'a Scripting,
        templates: &'a Registry,
        diags: &'a mut Diagnostics,
    ) -> Self {
        fn no_scripts(name: &str) -> Result<(String, String), String> {
            Err(format!("script `{name}` cannot be used here"))
        }
        Self {
            compiler: Compiler {
                file,
                text,
                scripting,
                templates,
                scripts: &no_scripts,
                diags,
                step_ids: Vec::new(),
                flow_refs: Vec::new(),
                keyword_locs: Vec::new(),
                script_bundle: Vec::new(),
            },
        }
    }

    /// Text with `{{ … }}` interpolation, like a `say`.
    pub fn text(&mut self, at: &Spanned<String>) -> Option<Text> {
        self.compiler.text(at)
    }

    /// A Rhai condition, like a branch's `if`.
    pub fn condition(&mut self, at: &Spanned<String>) -> Option<Expr> {
        self.compiler.expr(at)
    }

    /// The free-form message of `step` (its `say` with `buttons`, `list` or `media`), with
    /// WhatsApp's limits; only the message's keys are read.
    pub fn message(&mut self, step: &RawStep) -> Option<Message> {
        let text = step.say.as_ref()?;
        self.compiler.misplaced_keys(step);
        self.compiler.message(text, step)
    }

    /// A template call checked against the registry, and the registry's entry when it
    /// exists in that language with that many parameters (its status is the caller's to
    /// judge).
    pub fn template(
        &mut self,
        raw: &Spanned<RawTemplateRef>,
    ) -> Option<(TemplateCall, Option<&'a Template>)> {
        self.compiler.template_call(raw)
    }

    /// Where a scalar's content starts, after an opening quote.
    pub fn value_loc(&self, at: &Spanned<String>) -> Loc {
        self.compiler.value_loc(at)
    }

    /// Reports an error at `at`; the caller may add a label or help.
    pub fn error(&mut self, at: Loc, message: impl Into<String>) -> &mut Diagnostic {
        self.compiler.error(at, message)
    }

    /// Reports a warning at `at`.
    pub fn warning(&mut self, at: Loc, message: impl Into<String>) -> &mut Diagnostic {
        self.compiler.warning(at, message)
    }

    /// A duration such as `24h`, longer than zero.
    pub fn duration(&mut self, at: &Spanned<String>) -> Option<Duration> {
        self.compiler.duration(at)
    }
}

/// A list section as written: its title and rows (the `rows:` shorthand has no title).
type RawSectionRef<'a> = (
    Option<&'a Spanned<String>>,
    &'a Vec<Spanned<super::raw::RawRow>>,
);

/// A flow, step or campaign name: letters, digits, `_` and `-`.
/// A coordinate as written, parsed and in `±max`; else what is wrong with it.
pub fn coordinate_value(text: &str, what: &str, max: f64) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v.abs() <= max => Ok(v),
        Ok(v) => Err(format!(
            "the {what} {v} is out of range: it lies within ±{max}"
        )),
        Err(_) => Err(format!("the {what} `{text}` is not a number")),
    }
}

/// What is wrong with a reaction's emoji, if anything: WhatsApp takes one emoji (an
/// empty one removes a reaction, which a flow has no reason to do).
pub fn reaction_error(emoji: &str) -> Option<String> {
    let emoji = emoji.trim();
    if emoji.is_empty() {
        return Some("the reaction is empty".into());
    }
    // One emoji may be several code points (skin tones, flags, joined sequences), but not
    // a word.
    if emoji.chars().count() > 10 || emoji.chars().any(char::is_alphabetic) || emoji.is_ascii() {
        return Some(format!("`{emoji}` is not an emoji"));
    }
    None
}

pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn valid_var(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !matches!(name, "contact" | "message")
}

/// Whether a script's source calls `reply(…)` or `reply_buttons(…)`: a textual test, enough
/// for the window lint to know the script can send (a reply in a comment counts too).
/// Where a script's text is, to place what `check` finds in it.
enum ScriptText<'s> {
    /// Its own file: the path and the source.
    File(&'s str, &'s str),
    /// Inline in the flow; line 1, column 1 of the script is here.
    Inline(Loc),
}

fn calls_reply(source: &str) -> bool {
    static REPLY: std::sync::LazyLock<Regex> =
        std::sync::LazyLock::new(|| Regex::new(r"\breply(_buttons)?\s*\(").expect("valid"));
    REPLY.is_match(source)
}
