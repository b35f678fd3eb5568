//! The conversation engine: `(contact, session, event, flows, now) -> (session, effects)`.
//!
//! Pure: no I/O, no clock reads, no database. It decides what the bot says, which timers to
//! set, which HTTP request a step wants and when a conversation is handed to a person; the
//! workers in `dispatch` carry that out and feed results back as new events. That makes every
//! rule here testable with plain values, and lets `chat`, `test` and `serve` share it.
//!
//! Routing of a customer message, in order: a session in handoff stays quiet; an `interrupt`
//! trigger takes over; the session's waiting `ask` or branch gets it; any trigger starts its
//! flow; the `fallback` flow; otherwise it is recorded unanswered.

use std::sync::Arc;

use chrono::{DateTime, Duration, NaiveDate, NaiveTime, TimeZone, Utc};
use rhai::{Dynamic, Map};
use serde::{Deserialize, Serialize};

use crate::domain::{
    Button, Contact, ContactCard, Inbound, InboundContent, ListRow, ListSection, MediaSource,
    Origin, Outbound, OutboundContent, SplitMark, SplitPass, SplitStage, TemplateFallback, limits,
};
use crate::flow::{
    Action, Ask, Body, Captures, Card, Cond, Expect, Flow, FlowSet, Form, Http, Location, Message,
    Route, Script, Step, Target, TemplateCall, Text, Wait, split_branch,
};
use crate::script::{self, Context, ScriptError, ScriptReply, Scripting, Vars};

/// What a session is waiting for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "for", rename_all = "snake_case")]
pub enum Waiting {
    /// The customer's answer to an `ask`, or a reply a branch tests.
    Reply,
    /// A `wait` to run out before the step's action runs.
    Timer { until: DateTime<Utc> },
    /// The result of the step's `http` request.
    Http,
    /// A person: the bot stays quiet until an agent or the API resumes the conversation.
    Handoff { queue: String },
    /// The download of the file the customer sent (`message`, its wamid) to an `ask`
    /// expecting one: [`Event::Media`] fills the variable and the flow goes on.
    Media { message: String },
}

/// One contact's running conversation, pinned to the flow version it started on.
#[derive(Debug, Clone)]
pub struct Session {
    pub flow_id: String,
    pub version: String,
    pub step: usize,
    pub waiting: Waiting,
    pub vars: Vars,
    /// Failed answers to the current `ask`.
    pub attempts: u32,
    /// Bumped at every new waiting point; a timer for an older epoch is stale.
    pub epoch: i64,
    pub last_activity: DateTime<Utc>,
    /// The A/B splits this session passed, so a reply, the flow's end or a handoff is
    /// counted for the branch the contact took.
    pub splits: Vec<SplitPass>,
}

/// The JSON form of a session's state, as stored.
#[derive(Debug, Serialize, Deserialize)]
struct StoredState {
    waiting: Waiting,
    vars: serde_json::Value,
    attempts: u32,
    epoch: i64,
    last_activity: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    splits: Vec<SplitPass>,
}

impl Session {
    /// The stored form: `(step id, state JSON)`.
    pub fn to_stored(&self, flow: &Flow) -> (String, serde_json::Value) {
        let state = StoredState {
            waiting: self.waiting.clone(),
            vars: script::vars_to_json(&self.vars),
            attempts: self.attempts,
            epoch: self.epoch,
            last_activity: self.last_activity,
            splits: self.splits.clone(),
        };
        (
            flow.steps[self.step].id.clone(),
            serde_json::to_value(state).expect("session state serializes"),
        )
    }

    /// Rebuilds a session from its stored form; `None` if the step no longer exists.
    pub fn from_stored(flow: &Flow, step: &str, state: &serde_json::Value) -> Option<Session> {
        let state: StoredState = serde_json::from_value(state.clone()).ok()?;
        Some(Session {
            flow_id: flow.id.clone(),
            version: flow.version.clone(),
            step: flow.step_index(step)?,
            waiting: state.waiting,
            vars: script::vars_from_json(&state.vars),
            attempts: state.attempts,
            epoch: state.epoch,
            last_activity: state.last_activity,
            splits: state.splits,
        })
    }
}

/// What a durable timer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TimerKind {
    /// A `wait` ran out.
    Wait { epoch: i64 },
    /// An `ask` got no answer within its `timeout`.
    AskTimeout { epoch: i64 },
    /// No person resumed a handoff within its `timeout`.
    HandoffTimeout { epoch: i64 },
}

/// The result of a step's HTTP request.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpOutcome {
    pub epoch: i64,
    /// `(status, body)`; a body that is not JSON arrives as a JSON string.
    pub result: Result<(u16, serde_json::Value), String>,
}

/// Something that happens to a conversation.
#[derive(Debug, Clone)]
pub enum Event {
    Message(Inbound),
    Timer(TimerKind),
    Http(HttpOutcome),
    /// Start a flow for this contact (the API, a conversation test's `trigger:`), at its start
    /// or at `step`; this also ends a handoff.
    Start {
        flow: String,
        step: Option<String>,
    },
    /// A customer's message that enters `flow` at its start, with `vars` as the session's
    /// first variables (a reply to a campaign enters its `on_reply` flow with `campaign`).
    Enter {
        message: Inbound,
        flow: String,
        vars: Vec<(String, serde_json::Value)>,
    },
    /// A person gives a handed-off conversation back to the bot: at `flow` (and `step`), or
    /// where the handoff step goes on (its `next`; none ends the session).
    Resume {
        flow: Option<String>,
        step: Option<String>,
    },
    /// The customer's file in `message` (a wamid) was downloaded or refused: `value` is the
    /// variable an `ask` waiting for it saves (`url`, `mime`, `size`, `caption`, `status`,
    /// `error`, …).
    Media {
        message: String,
        value: serde_json::Value,
    },
}

/// An HTTP request a step wants made.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRequest {
    pub epoch: i64,
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<serde_json::Value>,
    pub timeout: Duration,
}

/// What the engine wants done.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Boxed: a message is much larger than the other effects.
    Send(Box<Outbound>),
    Http(HttpRequest),
    Handoff {
        queue: String,
    },
    /// A stage of an A/B split reached, to record.
    Split(SplitMark),
}

/// How the event was handled, for logs, `chat` and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// The session's waiting step took the message, or a timer or HTTP result moved it on.
    Continued,
    /// A trigger (or the API) started this flow.
    Started(String),
    Fallback(String),
    /// Nothing answered: recorded, no reply.
    Unanswered,
    /// The contact is with a person.
    InHandoff,
    /// A resume for a conversation that is not with a person: nothing happened.
    NotInHandoff,
    /// A timer or HTTP result for a session that has moved on.
    Stale,
    /// A message already processed (providers deliver at least once): nothing happened.
    Duplicate,
}

impl std::fmt::Display for Handled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Continued => f.write_str("continued"),
            Self::Started(flow) => write!(f, "started {flow}"),
            Self::Fallback(flow) => write!(f, "fallback {flow}"),
            Self::Unanswered => f.write_str("unanswered"),
            Self::InHandoff => f.write_str("in handoff"),
            Self::NotInHandoff => f.write_str("not in handoff"),
            Self::Stale => f.write_str("stale"),
            Self::Duplicate => f.write_str("duplicate"),
        }
    }
}

/// Everything a turn produced.
#[derive(Debug)]
pub struct Outcome {
    pub session: Option<Session>,
    pub effects: Vec<Effect>,
    /// `Some` replaces the contact's timers (empty clears them); `None` keeps them.
    pub timers: Option<Vec<(DateTime<Utc>, TimerKind)>>,
    pub handled: Handled,
    /// Problems worth logging (a failing script with its location, shortened text).
    pub notes: Vec<String>,
    /// Whether the contact changed (tags, attributes, name, window).
    pub contact_changed: bool,
    /// Whether the turn reached its cap on messages and was stopped.
    pub message_capped: bool,
    /// Scripts and expressions stopped by the sandbox's time limit.
    pub script_timeouts: usize,
}

/// The apology a customer gets when a script or flow fails and the step has no `on_error`.
pub const APOLOGY: &str = "Sorry, something went wrong on our side. Please try again in a moment.";

/// The [`APOLOGY`] message, sent when `flow`'s `step` failed and has no `on_error`.
pub fn apology(flow: &str, step: &str) -> Outbound {
    Outbound::new(
        OutboundContent::text(APOLOGY),
        Origin::Error {
            flow: flow.to_string(),
            step: step.to_string(),
        },
    )
}

/// Steps one event may run before the engine decides the flow is looping.
const MAX_STEPS_PER_EVENT: usize = 100;

/// Messages one turn may send before the engine stops it as a loop (`limits.messages_per_turn`).
pub const DEFAULT_MESSAGES_PER_TURN: usize = 10;

/// Sessions waiting for a reply end after this long without activity unless the flow sets
/// `session_timeout`.
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::hours(24);

/// The engine: the shared script sandbox and the settings that are not per flow.
#[derive(Debug, Clone)]
pub struct Engine {
    pub scripting: Arc<Scripting>,
    pub fallback: Option<String>,
    /// The most messages one turn sends; the next one is replaced by the apology and the
    /// session ends (a `goto` loop that sends would otherwise send until the step limit).
    pub messages_per_turn: usize,
}

impl Engine {
    pub fn new(scripting: Arc<Scripting>, fallback: Option<String>) -> Self {
        Self {
            scripting,
            fallback,
            messages_per_turn: DEFAULT_MESSAGES_PER_TURN,
        }
    }

    pub fn with_messages_per_turn(self, messages_per_turn: usize) -> Self {
        Self {
            messages_per_turn,
            ..self
        }
    }

    /// Handles one event for one contact.
    pub fn handle(
        &self,
        flows: &FlowSet,
        contact: &mut Contact,
        session: Option<Session>,
        event: Event,
        now: DateTime<Utc>,
    ) -> Outcome {
        self.handle_after(flows, contact, session, event, now, 0)
    }

    /// [`Engine::handle`] for an event that continues a turn which already sent `sent`
    /// messages (an `http` step's result): the cap counts the whole turn.
    pub fn handle_after(
        &self,
        flows: &FlowSet,
        contact: &mut Contact,
        session: Option<Session>,
        event: Event,
        now: DateTime<Utc>,
        sent: usize,
    ) -> Outcome {
        let before = contact.clone();
        let (message, message_id) = match &event {
            Event::Message(m) | Event::Enter { message: m, .. } => {
                (message_value(m).into_shared(), Some(m.id.clone()))
            }
            _ => (Dynamic::from_map(Map::new()), None),
        };
        let session = session.and_then(|s| {
            let flow = flows.version(&s.flow_id, &s.version)?.clone();
            Some((flow, s))
        });
        let mut run = Executor {
            engine: self,
            flows,
            contact_value: contact_value(contact),
            timezone: timezone_of(contact),
            contact,
            message,
            message_id,
            now,
            session: session.as_ref().map(|(_, s)| s.clone()),
            flow: session.as_ref().map(|(f, _)| f.clone()),
            effects: Vec::new(),
            timers: None,
            notes: Vec::new(),
            steps_run: 0,
            sent,
            capped: false,
            script_timeouts: 0,
            epoch_base: session.as_ref().map(|(_, s)| s.epoch).unwrap_or(0),
        };
        let handled = match event {
            Event::Message(m) => run.message(&m),
            Event::Timer(kind) => run.timer(kind),
            Event::Http(outcome) => run.http_result(outcome),
            Event::Start { flow, step } => run.start_by_api(&flow, step.as_deref()),
            Event::Resume { flow, step } => run.resume(flow.as_deref(), step.as_deref()),
            Event::Media { message, value } => run.media_result(&message, &value),
            Event::Enter {
                message,
                flow,
                vars,
            } => run.enter(&message, &flow, vars),
        };
        let contact_changed = *run.contact != before;
        Outcome {
            session: run.session,
            effects: run.effects,
            timers: run.timers,
            handled,
            notes: run.notes,
            contact_changed,
            message_capped: run.capped,
            script_timeouts: run.script_timeouts,
        }
    }
}

/// Runs a flow's steps for one event: the state of one event being handled, from the
/// event to the [`Outcome`] (the engine's part of a turn).
struct Executor<'a> {
    engine: &'a Engine,
    flows: &'a FlowSet,
    contact: &'a mut Contact,
    contact_value: Dynamic,
    /// The contact's timezone, parsed once (not at every evaluation).
    timezone: Option<chrono_tz::Tz>,
    message: Dynamic,
    /// The wamid of the customer's message this turn handles (what `react` and `quote`
    /// point at); `None` for timers, HTTP results and starts by the API.
    message_id: Option<String>,
    now: DateTime<Utc>,
    session: Option<Session>,
    flow: Option<Arc<Flow>>,
    effects: Vec<Effect>,
    timers: Option<Vec<(DateTime<Utc>, TimerKind)>>,
    notes: Vec<String>,
    steps_run: usize,
    /// Messages sent in this turn so far, for the cap.
    sent: usize,
    /// The turn reached its cap on messages: nothing more runs.
    capped: bool,
    script_timeouts: usize,
    epoch_base: i64,
}

/// What a step's action leaves to do.
enum Acted {
    /// Go on: a handoff, else the step a script's `goto` named, else the step's route.
    GoOn { goto: Option<usize> },
    /// The step waits (an `ask`, an `http` request) or failed (and `fail` went on).
    Stop,
}

/// Where execution goes after a step.
enum Next {
    Step(usize),
    Flow(String),
    Stop,
    End,
}

impl Executor<'_> {
    fn message(&mut self, inbound: &Inbound) -> Handled {
        if inbound.content.refreshes_window() {
            self.contact.saw_customer_message(inbound.timestamp);
            self.mark_splits(SplitStage::Replied);
        }
        if let (Some(session), Some(flow)) = (&self.session, &self.flow) {
            let timeout = flow.session_timeout.unwrap_or(DEFAULT_SESSION_TIMEOUT);
            if session.waiting == Waiting::Reply && self.now - session.last_activity > timeout {
                self.notes.push(format!(
                    "session in flow `{}` timed out after {}",
                    flow.id,
                    crate::domain::format_duration(timeout)
                ));
                self.end_session();
            }
        }
        if matches!(
            self.session.as_ref().map(|s| &s.waiting),
            Some(Waiting::Handoff { .. })
        ) {
            return Handled::InHandoff;
        }
        if self.session.is_some()
            && let Some((flow, vars)) = self.find_trigger(&inbound.content, true)
        {
            self.start(&flow, None, vars);
            return Handled::Started(flow);
        }
        if self.offer_reply(inbound) {
            return Handled::Continued;
        }
        if let Some((flow, vars)) = self.find_trigger(&inbound.content, false) {
            self.start(&flow, None, vars);
            return Handled::Started(flow);
        }
        if let Some(fallback) = self.engine.fallback.clone()
            && self.flows.get(&fallback).is_some()
        {
            self.start(&fallback, None, Vec::new());
            return Handled::Fallback(fallback);
        }
        Handled::Unanswered
    }

    /// The highest-priority trigger that fires (only `interrupt` ones when asked), first flow
    /// first on ties.
    fn find_trigger(
        &self,
        content: &crate::domain::InboundContent,
        interrupt_only: bool,
    ) -> Option<(String, Captures)> {
        let mut best: Option<(i32, String, Captures)> = None;
        let lowercase = content.as_text().to_lowercase();
        for flow in self.flows.current() {
            for t in &flow.triggers {
                if interrupt_only && !t.interrupt {
                    continue;
                }
                if best.as_ref().is_some_and(|(p, ..)| *p >= t.priority) {
                    continue;
                }
                let mut captures = Vec::new();
                if t.kind.matches(content, &lowercase, &mut captures) {
                    best = Some((t.priority, flow.id.clone(), captures));
                }
            }
        }
        best.map(|(_, flow, vars)| (flow, vars))
    }

    /// Gives the message to the session's waiting step; whether it took it.
    fn offer_reply(&mut self, inbound: &Inbound) -> bool {
        let (Some(session), Some(flow)) = (self.session.clone(), self.flow.clone()) else {
            return false;
        };
        if session.waiting != Waiting::Reply {
            return false;
        }
        let step = &flow.steps[session.step];
        if let Action::Ask(ask) = &step.action
            && let Expect::Media(kinds) = &ask.expect
        {
            match &inbound.content {
                InboundContent::Media { kind, caption, .. } if kinds.contains(kind) => {
                    self.await_media(ask, inbound, kind, caption.as_deref());
                }
                _ => self.failed_answer(&flow, step, ask),
            }
            return true;
        }
        if let Action::Ask(ask) = &step.action {
            match accept(ask, &inbound.content, self.context().timezone, self.now) {
                Some((value, extra)) => {
                    let s = self.session.as_mut().expect("session exists");
                    if let Some(name) = &ask.save {
                        s.vars.insert(name.as_str().into(), value);
                    }
                    for (k, v) in extra {
                        s.vars.insert(k.into(), Dynamic::from(v));
                    }
                    s.attempts = 0;
                    self.touch();
                    let next = self.route(&flow, step, true);
                    self.go(flow, next);
                }
                None => self.failed_answer(&flow, step, ask),
            }
            return true;
        }
        if let Action::Form(form) = &step.action {
            return match &inbound.content {
                InboundContent::FormReply { response } => {
                    self.form_answer(&flow, step, form, response)
                }
                _ => false,
            };
        }
        let Route::Branches(branches) = &step.route else {
            return false;
        };
        for b in branches {
            let hit = match &b.cond {
                Cond::Always => true,
                Cond::Button(id) => inbound.content.button_id() == Some(id.as_str()),
                Cond::List(id) => inbound.content.list_id() == Some(id.as_str()),
                Cond::Match(re) => re.is_match(inbound.content.as_text()),
                Cond::If(e) => match self.condition(&flow, step, &e.ast) {
                    Some(v) => v,
                    None => return true,
                },
                // A split never waits for a reply, so a waiting step has none.
                Cond::Split { .. } => false,
            };
            if hit {
                self.touch();
                let next = target(&b.target);
                self.go(flow, next);
                return true;
            }
        }
        false
    }

    /// The customer sent the file an `ask` expects: the session waits at the step for its
    /// download ([`Waiting::Media`]), the variable saying so meanwhile (`status: pending`),
    /// and the ask's timeout no longer applies.
    fn await_media(&mut self, ask: &Ask, inbound: &Inbound, kind: &str, caption: Option<&str>) {
        let step = self.session.as_ref().expect("session exists").step;
        self.wait_at(
            step,
            Waiting::Media {
                message: inbound.id.clone(),
            },
        );
        if let Some(name) = &ask.save {
            let pending =
                serde_json::json!({"status": "pending", "kind": kind, "caption": caption});
            self.session_mut()
                .vars
                .insert(name.as_str().into(), script::from_json(&pending));
        }
    }

    /// [`Event::Media`]: the file the session waits for is downloaded (or refused); the
    /// `ask` saves its variable and the flow goes on by the step's route, where a condition
    /// on `NAME.status` can tell `ok` from `failed`. Anything else is stale.
    fn media_result(&mut self, message: &str, value: &serde_json::Value) -> Handled {
        let (Some(session), Some(flow)) = (self.session.clone(), self.flow.clone()) else {
            return Handled::Stale;
        };
        if !matches!(&session.waiting, Waiting::Media { message: m } if m == message) {
            return Handled::Stale;
        }
        let step = &flow.steps[session.step];
        let Action::Ask(ask) = &step.action else {
            return Handled::Stale;
        };
        let s = self.session_mut();
        s.waiting = Waiting::Reply;
        s.attempts = 0;
        if let Some(name) = &ask.save {
            s.vars
                .insert(name.as_str().into(), script::from_json(value));
        }
        self.touch();
        let next = self.route(&flow, step, true);
        self.go(flow, next);
        Handled::Continued
    }

    fn failed_answer(&mut self, flow: &Arc<Flow>, step: &Step, ask: &Ask) {
        let s = self.session.as_mut().expect("session exists");
        s.attempts += 1;
        s.last_activity = self.now;
        if s.attempts >= ask.attempts {
            self.notes.push(format!(
                "`{}` in flow `{}` got no valid answer in {} attempts",
                step.id, flow.id, ask.attempts
            ));
            match ask.on_fail {
                Some(i) => self.go(flow.clone(), Next::Step(i)),
                None => self.go(flow.clone(), Next::End),
            }
            return;
        }
        // A retry keeps the prompt's buttons or list, so the customer can still tap one.
        let text = ask.retry.as_ref().unwrap_or(&ask.prompt.text);
        match self.render_message(text, &ask.prompt) {
            Ok(content) => {
                let origin = Origin::Step {
                    flow: flow.id.clone(),
                    step: step.id.clone(),
                };
                self.send(flow, step, content, origin);
            }
            Err(e) => self.fail(flow.clone(), step, &format!("text of `{}`", step.id), e),
        }
    }

    fn timer(&mut self, kind: TimerKind) -> Handled {
        let (Some(session), Some(flow)) = (self.session.clone(), self.flow.clone()) else {
            return Handled::Stale;
        };
        match kind {
            TimerKind::Wait { epoch }
                if epoch == session.epoch && matches!(session.waiting, Waiting::Timer { .. }) =>
            {
                self.timers = Some(Vec::new());
                self.touch();
                self.run_step(flow, session.step, true);
                Handled::Continued
            }
            TimerKind::AskTimeout { epoch }
                if epoch == session.epoch && session.waiting == Waiting::Reply =>
            {
                self.timers = Some(Vec::new());
                self.touch();
                let on_timeout = match &flow.steps[session.step].action {
                    Action::Ask(ask) => ask.on_timeout,
                    _ => None,
                };
                self.go(flow, on_timeout.map(Next::Step).unwrap_or(Next::End));
                Handled::Continued
            }
            TimerKind::HandoffTimeout { epoch }
                if epoch == session.epoch && matches!(session.waiting, Waiting::Handoff { .. }) =>
            {
                let step = &flow.steps[session.step];
                match step.handoff.as_ref().and_then(|h| h.on_timeout) {
                    Some(i) => {
                        self.timers = Some(Vec::new());
                        self.touch();
                        self.go(flow, Next::Step(i));
                    }
                    None => self.go_on_after_handoff(flow, session.step),
                }
                Handled::Continued
            }
            _ => Handled::Stale,
        }
    }

    fn http_result(&mut self, outcome: HttpOutcome) -> Handled {
        let (Some(session), Some(flow)) = (self.session.clone(), self.flow.clone()) else {
            return Handled::Stale;
        };
        if session.waiting != Waiting::Http || session.epoch != outcome.epoch {
            return Handled::Stale;
        }
        let step = &flow.steps[session.step];
        let Action::Http(http) = &step.action else {
            return Handled::Stale;
        };
        self.touch();
        match outcome.result {
            Ok((status, body)) if (200..300).contains(&status) => {
                if let Some(save) = &http.save {
                    let mut saved = Map::new();
                    saved.insert("status".into(), Dynamic::from(i64::from(status)));
                    saved.insert("body".into(), script::from_json(&body));
                    self.session_mut()
                        .vars
                        .insert(save.as_str().into(), Dynamic::from_map(saved));
                }
                let next = self.route(&flow, step, false);
                self.go(flow, next);
            }
            Ok((status, _)) => {
                let e = ScriptError::plain(format!(
                    "{} {} answered HTTP {status}",
                    http.method, http.url.raw
                ));
                self.fail(flow.clone(), step, &format!("http step `{}`", step.id), e);
            }
            Err(reason) => {
                let e = ScriptError::plain(format!(
                    "{} {} failed: {reason}",
                    http.method, http.url.raw
                ));
                self.fail(flow.clone(), step, &format!("http step `{}`", step.id), e);
            }
        }
        Handled::Continued
    }

    /// [`Event::Resume`]: only a session in handoff is resumed (anything else is
    /// [`Handled::NotInHandoff`]); at `flow`/`step` as a start by the API, else after the
    /// handoff step.
    fn resume(&mut self, flow: Option<&str>, step: Option<&str>) -> Handled {
        let in_handoff = matches!(
            self.session.as_ref().map(|s| &s.waiting),
            Some(Waiting::Handoff { .. })
        );
        match (in_handoff, flow, self.flow.clone()) {
            (false, ..) => Handled::NotInHandoff,
            (true, Some(flow), _) => self.start_by_api(flow, step),
            (true, None, Some(current)) => {
                let index = self.session.as_ref().map_or(0, |s| s.step);
                self.go_on_after_handoff(current, index);
                Handled::Continued
            }
            (true, None, None) => Handled::NotInHandoff,
        }
    }

    /// The bot takes a handed-off conversation back: the handoff step's way on (`next`,
    /// branches), or the end of the session when it has none.
    fn go_on_after_handoff(&mut self, flow: Arc<Flow>, index: usize) {
        self.timers = Some(Vec::new());
        self.touch();
        let step = &flow.steps[index];
        let next = self.route(&flow, step, false);
        self.go(flow, next);
    }

    fn start_by_api(&mut self, flow: &str, step: Option<&str>) -> Handled {
        let Some(f) = self.flows.get(flow).cloned() else {
            self.notes
                .push(format!("there is no flow `{flow}` to start"));
            return Handled::Unanswered;
        };
        let index = match step {
            Some(id) => match f.step_index(id) {
                Some(i) => Some(i),
                None => {
                    self.notes.push(format!("flow `{flow}` has no step `{id}`"));
                    return Handled::Unanswered;
                }
            },
            None => None,
        };
        self.start(flow, index, Vec::new());
        Handled::Started(flow.to_string())
    }

    /// A customer's message entering `flow` with `vars` (see [`Event::Enter`]).
    fn enter(
        &mut self,
        inbound: &Inbound,
        flow: &str,
        vars: Vec<(String, serde_json::Value)>,
    ) -> Handled {
        if inbound.content.refreshes_window() {
            self.contact.saw_customer_message(inbound.timestamp);
        }
        let Some(f) = self.flows.get(flow).cloned() else {
            self.notes
                .push(format!("there is no flow `{flow}` to enter"));
            return Handled::Unanswered;
        };
        let vars = vars
            .into_iter()
            .map(|(k, v)| (k.into(), script::from_json(&v)))
            .collect();
        self.begin(f, None, vars, Vec::new());
        Handled::Started(flow.to_string())
    }

    /// Starts `flow` (its current version) fresh, with trigger captures as variables.
    fn start(&mut self, flow: &str, step: Option<usize>, captures: Vec<(String, String)>) {
        let Some(f) = self.flows.get(flow).cloned() else {
            self.notes.push(format!("there is no flow `{flow}`"));
            self.end_session();
            return;
        };
        let mut vars = Vars::new();
        for (k, v) in captures {
            vars.insert(k.into(), Dynamic::from(v));
        }
        self.begin(f, step, vars, Vec::new());
    }

    /// A session of `flow` from `step` (else its start) with `vars`, and the `splits` a
    /// jump from another flow carries along.
    fn begin(&mut self, flow: Arc<Flow>, step: Option<usize>, vars: Vars, splits: Vec<SplitPass>) {
        self.epoch_base = self.epoch_base.max(self.now.timestamp_millis()) + 1;
        self.session = Some(Session {
            flow_id: flow.id.clone(),
            version: flow.version.clone(),
            step: step.unwrap_or(flow.start),
            waiting: Waiting::Reply,
            vars,
            attempts: 0,
            epoch: self.epoch_base,
            last_activity: self.now,
            splits,
        });
        self.flow = Some(flow.clone());
        self.timers = Some(Vec::new());
        self.run_step(flow.clone(), step.unwrap_or(flow.start), false);
    }

    fn end_session(&mut self) {
        self.session = None;
        self.flow = None;
        self.timers = Some(Vec::new());
    }

    fn touch(&mut self) {
        if let Some(s) = self.session.as_mut() {
            s.last_activity = self.now;
        }
    }

    fn session_mut(&mut self) -> &mut Session {
        self.session.as_mut().expect("a step runs inside a session")
    }

    /// Marks a new waiting point at `step`.
    fn wait_at(&mut self, step: usize, waiting: Waiting) -> i64 {
        self.epoch_base += 1;
        let epoch = self.epoch_base;
        let now = self.now;
        let s = self.session_mut();
        s.step = step;
        s.waiting = waiting;
        s.epoch = epoch;
        s.attempts = 0;
        s.last_activity = now;
        self.timers = Some(Vec::new());
        epoch
    }

    fn go(&mut self, flow: Arc<Flow>, next: Next) {
        match next {
            Next::Step(i) => self.run_step(flow, i, false),
            Next::Flow(id) => match self.flows.get(&id).cloned() {
                Some(f) => {
                    let (vars, splits) = self
                        .session
                        .as_ref()
                        .map(|s| (s.vars.clone(), s.splits.clone()))
                        .unwrap_or_default();
                    self.begin(f, None, vars, splits);
                }
                None => {
                    self.notes.push(format!(
                        "flow `{}` jumps to flow `{id}`, which no longer exists",
                        flow.id
                    ));
                    self.apology(&flow, None);
                    self.end_session();
                }
            },
            Next::Stop => {}
            Next::End => {
                self.mark_splits(SplitStage::Finished);
                self.end_session();
            }
        }
    }

    /// Records `stage` for every split the session passed.
    fn mark_splits(&mut self, stage: SplitStage) {
        let Some(session) = &self.session else {
            return;
        };
        for pass in &session.splits {
            self.effects.push(Effect::Split(SplitMark {
                pass: pass.clone(),
                stage,
            }));
        }
    }

    /// A `split`: the contact's branch (the same every time), recorded in the session (and
    /// in the variable `split.<step>`, for conditions and texts) and reported as reached.
    fn split(&mut self, flow: &Flow, step: &Step, branches: &[crate::flow::Branch]) -> Next {
        let weights: Vec<f64> = branches
            .iter()
            .map(|b| match &b.cond {
                Cond::Split { weight, .. } => *weight,
                _ => 0.0,
            })
            .collect();
        let chosen = &branches[split_branch(&self.contact.wa_id, &flow.id, &step.id, &weights)];
        let Cond::Split { name, .. } = &chosen.cond else {
            return Next::End;
        };
        let pass = SplitPass {
            flow: flow.id.clone(),
            step: step.id.clone(),
            branch: name.clone(),
        };
        let session = self.session_mut();
        session
            .splits
            .retain(|p| !(p.flow == pass.flow && p.step == pass.step));
        session.splits.push(pass.clone());
        let mut record = session
            .vars
            .get("split")
            .and_then(|v| v.read_lock::<Map>().map(|m| m.clone()))
            .unwrap_or_default();
        record.insert(step.id.as_str().into(), Dynamic::from(name.clone()));
        session
            .vars
            .insert("split".into(), Dynamic::from_map(record));
        self.effects.push(Effect::Split(SplitMark {
            pass,
            stage: SplitStage::Reached,
        }));
        target(&chosen.target)
    }

    /// Runs steps from `index` until the flow waits or ends: the step's `wait`, its `set`
    /// and tags, its action, then the way on.
    fn run_step(&mut self, flow: Arc<Flow>, index: usize, wait_done: bool) {
        if self.looping(&flow, index) {
            return;
        }
        let step = &flow.steps[index];
        if let Some(s) = self.session.as_mut() {
            s.step = index;
        }
        if !wait_done && self.waits(&flow, step, index) {
            return;
        }
        if !self.set_and_tag(&flow, step) {
            return;
        }
        if !self.react(&flow, step) {
            return;
        }
        let goto = match self.act(&flow, step, index) {
            Acted::GoOn { .. } if self.capped => return,
            Acted::GoOn { goto } => goto,
            Acted::Stop => return,
        };
        if self.hand_off(step, index) {
            return;
        }
        let next = match goto {
            Some(i) => Next::Step(i),
            None => self.route(&flow, step, false),
        };
        self.go(flow, next);
    }

    /// Counts a step run; past [`MAX_STEPS_PER_EVENT`] the flow is stopped as a loop (with
    /// the apology and the end of the session) and `true` is returned.
    fn looping(&mut self, flow: &Flow, index: usize) -> bool {
        self.steps_run += 1;
        if self.capped {
            return true;
        }
        if self.steps_run <= MAX_STEPS_PER_EVENT {
            return false;
        }
        self.notes.push(format!(
            "flow `{}` ran {MAX_STEPS_PER_EVENT} steps without waiting for the customer (a `goto` loop?); stopped at step `{}`",
            flow.id, flow.steps[index].id
        ));
        self.apology(flow, Some(&flow.steps[index]));
        self.end_session();
        true
    }

    /// The step's `wait`: whether the step now waits for its timer (or failed computing it).
    fn waits(&mut self, flow: &Arc<Flow>, step: &Step, index: usize) -> bool {
        let Some(wait) = &step.wait else {
            return false;
        };
        match self.wait_until(wait) {
            Ok(until) if until > self.now => {
                let epoch = self.wait_at(index, Waiting::Timer { until });
                self.timers = Some(vec![(until, TimerKind::Wait { epoch })]);
                true
            }
            Ok(_) => false,
            Err(e) => {
                self.fail(flow.clone(), step, &format!("`wait` of `{}`", step.id), e);
                true
            }
        }
    }

    /// The step's `set` variables and `tag`/`untag`; `false` when a `set` failed.
    fn set_and_tag(&mut self, flow: &Arc<Flow>, step: &Step) -> bool {
        for (name, text) in &step.set {
            match text.value(&self.engine.scripting, &self.context()) {
                Ok(v) => {
                    self.session_mut().vars.insert(name.as_str().into(), v);
                }
                Err(e) => {
                    self.fail(flow.clone(), step, &format!("`set` of `{name}`"), e);
                    return false;
                }
            }
        }
        for tag in &step.tag {
            self.contact.tags.insert(tag.clone());
        }
        for tag in &step.untag {
            self.contact.tags.remove(tag);
        }
        if !step.tag.is_empty() || !step.untag.is_empty() {
            self.refresh_contact();
        }
        true
    }

    /// The step's action, one function per kind.
    fn act(&mut self, flow: &Arc<Flow>, step: &Step, index: usize) -> Acted {
        match &step.action {
            Action::None => Acted::GoOn { goto: None },
            Action::Say(message) => self.say(flow, step, message),
            Action::Template(call) => self.send_template(flow, step, call),
            Action::Ask(ask) => self.ask(flow, step, index, ask),
            Action::Script(script) => self.run_script(flow, step, script),
            Action::Http(http) => self.request(flow, step, index, http),
            Action::Location(location) => {
                let rendered = render_location(&self.engine.scripting, &self.context(), location);
                self.send_rendered(flow, step, rendered)
            }
            Action::Contacts(cards) => {
                let rendered = render_cards(&self.engine.scripting, &self.context(), cards);
                self.send_rendered(flow, step, rendered)
            }
            Action::Form(form) => self.form(flow, step, index, form),
        }
    }

    /// `form`: the WhatsApp Flow, then the step waits for its answer (as an `ask` does).
    fn form(&mut self, flow: &Arc<Flow>, step: &Step, index: usize, form: &Form) -> Acted {
        let token = form_token(flow, step);
        match render_form(&self.engine.scripting, &self.context(), form, token) {
            Ok(content) => self.send(flow, step, content, step_origin(flow, step)),
            Err(e) => {
                self.fail(flow.clone(), step, &format!("form of `{}`", step.id), e);
                return Acted::Stop;
            }
        }
        if !self.capped {
            self.wait_at(index, Waiting::Reply);
        }
        Acted::Stop
    }

    /// A Flow's answer to the waiting `form` step: its fields checked against the step's
    /// and saved, then the way on. An answer to another form (its token differs) is not
    /// this step's; one missing a field, or with a field of the wrong type, fails the step.
    fn form_answer(
        &mut self,
        flow: &Arc<Flow>,
        step: &Step,
        form: &Form,
        response: &serde_json::Map<String, serde_json::Value>,
    ) -> bool {
        if let Some(token) = response.get("flow_token").and_then(|t| t.as_str())
            && token != form_token(flow, step)
        {
            return false;
        }
        let mut fields = response.clone();
        fields.remove("flow_token");
        for (name, kind) in &form.fields {
            let problem = match fields.get(name) {
                None | Some(serde_json::Value::Null) => format!("has no `{name}`"),
                Some(v) if !kind.accepts(v) => {
                    format!("has `{name}` = {v}, which is not a {}", kind.name())
                }
                Some(_) => continue,
            };
            let e = ScriptError::plain(format!("the form's answer {problem}"));
            self.fail(flow.clone(), step, &format!("form of `{}`", step.id), e);
            return true;
        }
        if let Some(name) = &form.save {
            let value = script::from_json(&serde_json::Value::Object(fields));
            self.session_mut().vars.insert(name.as_str().into(), value);
        }
        self.touch();
        let next = self.route(flow, step, true);
        self.go(flow.clone(), next);
        true
    }

    /// A step's message rendered by one of the renderers: sent, or the step fails.
    fn send_rendered(
        &mut self,
        flow: &Arc<Flow>,
        step: &Step,
        rendered: Result<OutboundContent, ScriptError>,
    ) -> Acted {
        match rendered {
            Ok(content) => {
                self.send(flow, step, content, step_origin(flow, step));
                Acted::GoOn { goto: None }
            }
            Err(e) => {
                self.fail(flow.clone(), step, &format!("message of `{}`", step.id), e);
                Acted::Stop
            }
        }
    }

    /// The step's `react`: its emoji on the customer's message this turn handles. A turn
    /// without one (a timer, an HTTP result, a start by the API) has nothing to react to:
    /// noted, and the step goes on. `false` when the emoji failed to render.
    fn react(&mut self, flow: &Arc<Flow>, step: &Step) -> bool {
        let Some(text) = &step.react else {
            return true;
        };
        let Some(message_id) = self.message_id.clone() else {
            self.notes.push(format!(
                "flow `{}` step `{}`: no customer message in this turn to react to; the reaction is left out",
                flow.id, step.id
            ));
            return true;
        };
        let emoji = match text.render(&self.engine.scripting, &self.context()) {
            Ok(e) => e.trim().to_string(),
            Err(e) => {
                self.fail(flow.clone(), step, &format!("`react` of `{}`", step.id), e);
                return false;
            }
        };
        if let Some(why) = crate::flow::compile::reaction_error(&emoji) {
            let e = ScriptError::plain(why);
            self.fail(flow.clone(), step, &format!("`react` of `{}`", step.id), e);
            return false;
        }
        let reaction = OutboundContent::Reaction { message_id, emoji };
        self.emit(flow, step, Outbound::new(reaction, step_origin(flow, step)));
        true
    }

    /// `say`: the message, rendered.
    fn say(&mut self, flow: &Arc<Flow>, step: &Step, message: &Message) -> Acted {
        match self.render_message(&message.text, message) {
            Ok(content) => {
                self.send(flow, step, content, step_origin(flow, step));
                Acted::GoOn { goto: None }
            }
            Err(e) => {
                self.fail(flow.clone(), step, &format!("text of `{}`", step.id), e);
                Acted::Stop
            }
        }
    }

    /// `template`: the template with its parameters rendered.
    fn send_template(&mut self, flow: &Arc<Flow>, step: &Step, call: &TemplateCall) -> Acted {
        match self.template_params(call) {
            Ok(params) => {
                let template = OutboundContent::Template {
                    name: call.name.clone(),
                    language: call.language.clone(),
                    params,
                };
                let outbound = Outbound {
                    quote: self.quote(step),
                    ..Outbound::new(template, step_origin(flow, step))
                };
                self.emit(flow, step, outbound);
                Acted::GoOn { goto: None }
            }
            Err(e) => {
                let what = format!("template parameters of `{}`", step.id);
                self.fail(flow.clone(), step, &what, e);
                Acted::Stop
            }
        }
    }

    /// `ask`: the question, then the step waits for the answer (and its timeout).
    fn ask(&mut self, flow: &Arc<Flow>, step: &Step, index: usize, ask: &Ask) -> Acted {
        match self.render_message(&ask.prompt.text, &ask.prompt) {
            Ok(content) => self.send(flow, step, content, step_origin(flow, step)),
            Err(e) => {
                self.fail(flow.clone(), step, &format!("question of `{}`", step.id), e);
                return Acted::Stop;
            }
        }
        if self.capped {
            return Acted::Stop;
        }
        let epoch = self.wait_at(index, Waiting::Reply);
        if let Some(timeout) = ask.timeout {
            self.timers = Some(vec![(self.now + timeout, TimerKind::AskTimeout { epoch })]);
        }
        Acted::Stop
    }

    /// `script`: its variables and contact changes kept, its replies sent, its `goto`
    /// followed.
    fn run_script(&mut self, flow: &Arc<Flow>, step: &Step, script: &Script) -> Acted {
        let run = match self.engine.scripting.run(&script.ast, &self.context()) {
            Ok(run) => run,
            Err(e) => {
                let at = script.locate(&e);
                self.fail(flow.clone(), step, &at, e);
                return Acted::Stop;
            }
        };
        self.session_mut().vars = run.vars;
        self.apply_script_contact(&run.contact, run.effects.tags);
        for reply in run.effects.replies {
            let origin = Origin::Script {
                flow: flow.id.clone(),
                step: step.id.clone(),
            };
            self.send(flow, step, script_reply(reply), origin);
        }
        let Some(target) = run.effects.goto else {
            return Acted::GoOn { goto: None };
        };
        match flow.step_index(&target) {
            Some(i) => Acted::GoOn { goto: Some(i) },
            None => {
                let e = ScriptError::plain(format!(
                    "goto(\"{target}\"): there is no step `{target}` in flow `{}`",
                    flow.id
                ));
                self.fail(flow.clone(), step, &script.name, e);
                Acted::Stop
            }
        }
    }

    /// The contact as a script left it, and the tags it added (`true`) or removed.
    fn apply_script_contact(&mut self, contact: &Dynamic, tags: Vec<(bool, String)>) {
        let mut changed = apply_contact(self.contact, contact);
        for (add, tag) in tags {
            changed |= if add {
                self.contact.tags.insert(tag)
            } else {
                self.contact.tags.remove(&tag)
            };
        }
        if changed {
            self.refresh_contact();
        }
    }

    /// `http`: the request, rendered, for the runtime to perform; the step waits for its
    /// result.
    fn request(&mut self, flow: &Arc<Flow>, step: &Step, index: usize, http: &Http) -> Acted {
        match self.render_request(http) {
            Ok(mut request) => {
                request.epoch = self.wait_at(index, Waiting::Http);
                self.effects.push(Effect::Http(request));
            }
            Err(e) => self.fail(flow.clone(), step, &format!("http step `{}`", step.id), e),
        }
        Acted::Stop
    }

    /// An `http` step's request with its URL, headers and body rendered (its epoch is set
    /// when the step waits).
    fn render_request(&self, http: &Http) -> Result<HttpRequest, ScriptError> {
        let ctx = self.context();
        let scripting = &self.engine.scripting;
        Ok(HttpRequest {
            epoch: 0,
            method: http.method.clone(),
            url: http.url.render(scripting, &ctx)?,
            headers: http
                .headers
                .iter()
                .map(|(k, v)| Ok((k.clone(), v.render(scripting, &ctx)?)))
                .collect::<Result<_, ScriptError>>()?,
            body: match &http.body {
                Some(b) => Some(render_body(b, scripting, &ctx)?),
                None => None,
            },
            timeout: http.timeout,
        })
    }

    /// A step with `handoff`: the conversation waits for a person; whether it does.
    fn hand_off(&mut self, step: &Step, index: usize) -> bool {
        let Some(handoff) = &step.handoff else {
            return false;
        };
        let queue = handoff.queue.clone();
        let epoch = self.wait_at(
            index,
            Waiting::Handoff {
                queue: queue.clone(),
            },
        );
        if let Some(timeout) = handoff.timeout {
            self.timers = Some(vec![(
                self.now + timeout,
                TimerKind::HandoffTimeout { epoch },
            )]);
        }
        self.mark_splits(SplitStage::HandedOff);
        self.effects.push(Effect::Handoff { queue });
        true
    }

    /// Where a step goes after its action. `answered`: the customer's reply is in `message`
    /// (reply branches are tested); otherwise a step with reply branches waits for one.
    fn route(&mut self, flow: &Arc<Flow>, step: &Step, answered: bool) -> Next {
        match &step.route {
            Route::End => Next::End,
            Route::Goto(t) => target(t),
            Route::Branches(branches) => {
                if !answered && step.awaits_reply() {
                    let index = flow.step_index(&step.id).expect("step of this flow");
                    self.wait_at(index, Waiting::Reply);
                    return Next::Stop;
                }
                if matches!(branches.first().map(|b| &b.cond), Some(Cond::Split { .. })) {
                    return self.split(flow, step, branches);
                }
                for b in branches {
                    let hit = match &b.cond {
                        Cond::Always => true,
                        Cond::If(e) => match self.condition(flow, step, &e.ast) {
                            Some(v) => v,
                            None => return Next::Stop,
                        },
                        Cond::Button(id) => answered && self.message_field("button") == *id,
                        Cond::List(id) => answered && self.message_field("list") == *id,
                        Cond::Match(re) => answered && re.is_match(&self.message_field("text")),
                        Cond::Split { .. } => false,
                    };
                    if hit {
                        return target(&b.target);
                    }
                }
                Next::End
            }
        }
    }

    fn message_field(&self, name: &str) -> String {
        self.message
            .read_lock::<Map>()
            .and_then(|m| m.get(name).map(|v| v.to_string()))
            .unwrap_or_default()
    }

    /// Evaluates an `if:`; on error the flow fails (and `None` is returned).
    fn condition(&mut self, flow: &Arc<Flow>, step: &Step, ast: &rhai::AST) -> Option<bool> {
        match self.engine.scripting.eval_condition(ast, &self.context()) {
            Ok(v) => Some(v),
            Err(e) => {
                self.fail(
                    flow.clone(),
                    step,
                    &format!("condition in `{}`", step.id),
                    e,
                );
                None
            }
        }
    }

    /// A step failed: note where, then `on_error` or the apology and the end of the session.
    fn fail(&mut self, flow: Arc<Flow>, step: &Step, what: &str, e: ScriptError) {
        if e.timed_out {
            self.script_timeouts += 1;
        }
        if self.capped {
            return;
        }
        let at = if e.line.is_some() && !what.contains(':') {
            format!("{what} at {}", e.where_())
        } else {
            what.to_string()
        };
        self.notes.push(format!(
            "flow `{}` step `{}` failed in {at}: {}",
            flow.id, step.id, e.message
        ));
        match step.on_error {
            Some(i) if self.steps_run <= MAX_STEPS_PER_EVENT => self.run_step(flow, i, false),
            _ => {
                self.apology(&flow, Some(step));
                self.end_session();
            }
        }
    }

    fn apology(&mut self, flow: &Flow, step: Option<&Step>) {
        let step = step.map(|s| s.id.as_str()).unwrap_or_default();
        self.effects
            .push(Effect::Send(Box::new(apology(&flow.id, step))));
    }

    fn send(&mut self, flow: &Flow, step: &Step, mut content: OutboundContent, origin: Origin) {
        for note in limits::fit(&mut content) {
            self.notes
                .push(format!("flow `{}` step `{}`: {note}", flow.id, step.id));
        }
        let outside_window = step.outside_window.as_ref().and_then(|t| {
            self.template_params(t).ok().map(|params| TemplateFallback {
                name: t.name.clone(),
                language: t.language.clone(),
                params,
            })
        });
        let outbound = Outbound {
            outside_window,
            quote: self.quote(step),
            ..Outbound::new(content, origin)
        };
        self.emit(flow, step, outbound);
    }

    /// The wamid a step's message quotes: the customer's message of this turn, with
    /// `quote: true` (a turn without one sends the message unquoted).
    fn quote(&self, step: &Step) -> Option<String> {
        step.quote.then(|| self.message_id.clone()).flatten()
    }

    /// A step's message, unless the turn has sent its cap: then the apology instead, and
    /// the session ends.
    fn emit(&mut self, flow: &Flow, step: &Step, outbound: Outbound) {
        if self.capped {
            return;
        }
        if self.sent >= self.engine.messages_per_turn {
            self.capped = true;
            self.notes.push(format!(
                "flow `{}` sent {} messages in one turn without waiting for the customer (a `goto` loop?); stopped at step `{}`",
                flow.id, self.sent, step.id
            ));
            self.apology(flow, Some(step));
            self.end_session();
            return;
        }
        self.sent += 1;
        self.effects.push(Effect::Send(Box::new(outbound)));
    }

    /// A template's parameters, rendered.
    fn template_params(&self, call: &TemplateCall) -> Result<Vec<String>, ScriptError> {
        let ctx = self.context();
        call.params
            .iter()
            .map(|p| p.render(&self.engine.scripting, &ctx))
            .collect()
    }

    fn render_message(
        &self,
        text: &Text,
        message: &Message,
    ) -> Result<OutboundContent, ScriptError> {
        render_message(&self.engine.scripting, &self.context(), text, message)
    }

    fn wait_until(&self, wait: &Wait) -> Result<DateTime<Utc>, ScriptError> {
        match wait {
            Wait::For(d) => Ok(self.now + *d),
            Wait::Until(text) => {
                let raw = text.render(&self.engine.scripting, &self.context())?;
                parse_until(raw.trim(), self.now, self.contact.timezone.as_deref()).ok_or(
                    ScriptError::plain(format!(
                        "`{raw}` is not a time: write HH:MM or an RFC 3339 date and time"
                    )),
                )
            }
        }
    }

    /// Rebuilds what expressions see of the contact after a step changed it.
    fn refresh_contact(&mut self) {
        self.contact_value = contact_value(self.contact);
        self.timezone = timezone_of(self.contact);
    }

    fn context(&self) -> Context<'_> {
        static EMPTY: std::sync::LazyLock<Vars> = std::sync::LazyLock::new(Vars::new);
        Context {
            vars: self.session.as_ref().map(|s| &s.vars).unwrap_or(&EMPTY),
            contact: &self.contact_value,
            message: &self.message,
            now: self.now,
            timezone: self.timezone,
        }
    }
}

/// Where a step's own message comes from.
fn step_origin(flow: &Flow, step: &Step) -> Origin {
    Origin::Step {
        flow: flow.id.clone(),
        step: step.id.clone(),
    }
}

/// A script's `reply` as a message.
fn script_reply(reply: ScriptReply) -> OutboundContent {
    match reply {
        ScriptReply::Text(text) => OutboundContent::text(text),
        ScriptReply::Buttons { text, buttons } => OutboundContent::Buttons {
            body: text,
            buttons: buttons
                .into_iter()
                .map(|(id, title)| Button { id, title })
                .collect(),
        },
    }
}

/// A message's text, buttons, list or media rendered with `ctx` (its `{{...}}`
/// interpolations): the one renderer, used by steps and by campaigns' `in_window` message.
pub fn render_message(
    s: &Scripting,
    ctx: &Context<'_>,
    text: &Text,
    message: &Message,
) -> Result<OutboundContent, ScriptError> {
    let body = text.render(s, ctx)?;
    if !message.buttons.is_empty() {
        return Ok(OutboundContent::Buttons {
            body,
            buttons: message
                .buttons
                .iter()
                .map(|(id, title)| {
                    Ok(Button {
                        id: id.clone(),
                        title: title.render(s, ctx)?,
                    })
                })
                .collect::<Result<_, ScriptError>>()?,
        });
    }
    if let Some(list) = &message.list {
        let mut sections = Vec::new();
        for (title, rows) in &list.sections {
            sections.push(ListSection {
                title: match title {
                    Some(t) => Some(t.render(s, ctx)?),
                    None => None,
                },
                rows: rows
                    .iter()
                    .map(|r| {
                        Ok(ListRow {
                            id: r.id.clone(),
                            title: r.title.render(s, ctx)?,
                            description: match &r.description {
                                Some(d) => Some(d.render(s, ctx)?),
                                None => None,
                            },
                        })
                    })
                    .collect::<Result<_, ScriptError>>()?,
            });
        }
        return Ok(OutboundContent::List {
            body,
            button: list.button.render(s, ctx)?,
            sections,
        });
    }
    if let Some(media) = &message.media {
        let source = match &media.source {
            crate::flow::MediaSource::Link(url) => MediaSource::Link {
                link: url.render(s, ctx)?,
            },
            crate::flow::MediaSource::File(file) => MediaSource::File {
                file: file.path.clone(),
            },
        };
        return Ok(OutboundContent::Media {
            kind: media.kind.clone(),
            source,
            caption: (!body.is_empty()).then_some(body),
            filename: match &media.filename {
                Some(f) => Some(f.render(s, ctx)?).filter(|f| !f.is_empty()),
                None => None,
            },
        });
    }
    Ok(OutboundContent::text(body))
}

/// A `location` step's message: coordinates parsed and in range, name and address
/// rendered (an empty one is left out).
pub fn render_location(
    s: &Scripting,
    ctx: &Context<'_>,
    location: &Location,
) -> Result<OutboundContent, ScriptError> {
    let coordinate = |text: &Text, what: &str, max: f64| {
        let raw = text.render(s, ctx)?;
        crate::flow::compile::coordinate_value(&raw, what, max).map_err(ScriptError::plain)
    };
    let optional = |text: &Option<Text>| -> Result<Option<String>, ScriptError> {
        Ok(match text {
            Some(t) => Some(t.render(s, ctx)?).filter(|v| !v.trim().is_empty()),
            None => None,
        })
    };
    Ok(OutboundContent::Location {
        latitude: coordinate(&location.latitude, "latitude", 90.0)?,
        longitude: coordinate(&location.longitude, "longitude", 180.0)?,
        name: optional(&location.name)?,
        address: optional(&location.address)?,
    })
}

/// A `contacts` step's cards, rendered; values that render empty are left out, and a card
/// left with nothing to reach it by is an error.
pub fn render_cards(
    s: &Scripting,
    ctx: &Context<'_>,
    cards: &[Card],
) -> Result<OutboundContent, ScriptError> {
    let all = |texts: &[Text]| -> Result<Vec<String>, ScriptError> {
        let mut out = Vec::new();
        for t in texts {
            let v = t.render(s, ctx)?;
            if !v.trim().is_empty() {
                out.push(v.trim().to_string());
            }
        }
        Ok(out)
    };
    let mut out = Vec::new();
    for card in cards {
        let rendered = ContactCard {
            name: card.name.render(s, ctx)?.trim().to_string(),
            phones: all(&card.phones)?,
            emails: all(&card.emails)?,
            org: match &card.org {
                Some(o) => Some(o.render(s, ctx)?).filter(|v| !v.trim().is_empty()),
                None => None,
            },
            urls: all(&card.urls)?,
        };
        if rendered.name.is_empty() {
            return Err(ScriptError::plain(format!(
                "the contact card `{}` has an empty name",
                card.name.raw
            )));
        }
        if rendered.phones.is_empty() && rendered.emails.is_empty() && rendered.urls.is_empty() {
            return Err(ScriptError::plain(format!(
                "the contact card `{}` has no phone, email or url once rendered",
                rendered.name
            )));
        }
        out.push(rendered);
    }
    Ok(OutboundContent::Contacts { cards: out })
}

/// The `flow_token` a form is sent with, which its answer carries back: which step asked.
fn form_token(flow: &Flow, step: &Step) -> String {
    format!("flowgate:{}:{}", flow.id, step.id)
}

/// A `form` step's message: its body, button and first screen's data rendered.
pub fn render_form(
    s: &Scripting,
    ctx: &Context<'_>,
    form: &Form,
    token: String,
) -> Result<OutboundContent, ScriptError> {
    Ok(OutboundContent::Form {
        body: form.body.render(s, ctx)?,
        flow_id: form.flow_id.clone(),
        cta: form.cta.render(s, ctx)?,
        token,
        screen: form.screen.clone(),
        data: match &form.data {
            Some(d) => Some(render_body(d, s, ctx)?),
            None => None,
        },
    })
}

/// The context a campaign's message and template parameters are rendered in: `contact.*`
/// and the contact's zone, no variables and no message.
pub fn render_for_contact<T>(
    scripting: &Scripting,
    contact: &Contact,
    now: DateTime<Utc>,
    render: impl FnOnce(&Scripting, &Context<'_>) -> Result<T, ScriptError>,
) -> Result<T, ScriptError> {
    let value = contact_value(contact);
    let ctx = Context {
        vars: &Vars::new(),
        contact: &value,
        message: &Dynamic::UNIT,
        now,
        timezone: timezone_of(contact),
    };
    render(scripting, &ctx)
}

fn timezone_of(contact: &Contact) -> Option<chrono_tz::Tz> {
    contact.timezone.as_deref().and_then(|tz| tz.parse().ok())
}

fn target(t: &Target) -> Next {
    match t {
        Target::Step(i) => Next::Step(*i),
        Target::Flow(f) => Next::Flow(f.clone()),
    }
}

/// Checks an answer against an `ask`'s `expect`: the value to save and extra variables.
fn accept(
    ask: &Ask,
    content: &crate::domain::InboundContent,
    timezone: Option<chrono_tz::Tz>,
    now: DateTime<Utc>,
) -> Option<(Dynamic, Vec<(String, String)>)> {
    let text = content.as_text().trim();
    let tapped = content.button_id().or(content.list_id());
    match &ask.expect {
        Expect::Any => Some((Dynamic::from(tapped.unwrap_or(text).to_string()), vec![])),
        Expect::Button => {
            let id = tapped?;
            let known = ask.prompt.buttons.iter().any(|(b, _)| b == id)
                || ask
                    .prompt
                    .list
                    .iter()
                    .flat_map(|l| l.sections.iter().flat_map(|(_, rows)| rows.iter()))
                    .any(|r| r.id == id);
            known.then(|| (Dynamic::from(id.to_string()), vec![]))
        }
        Expect::Number => {
            let n = parse_number(text)?;
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                Some((Dynamic::from(n as i64), vec![]))
            } else {
                Some((Dynamic::from(n), vec![]))
            }
        }
        Expect::Email => {
            let (user, domain) = text.split_once('@')?;
            (!user.is_empty() && domain.contains('.') && !text.contains(char::is_whitespace))
                .then(|| (Dynamic::from(text.to_lowercase()), vec![]))
        }
        Expect::Phone => {
            let digits: String = text.chars().filter(char::is_ascii_digit).collect();
            let allowed = text
                .chars()
                .all(|c| c.is_ascii_digit() || " +-().".contains(c));
            (allowed && (7..=15).contains(&digits.len()))
                .then(|| (Dynamic::from(format!("+{digits}")), vec![]))
        }
        Expect::Date => parse_date(text, script::local_date(now, timezone))
            .map(|d| (Dynamic::from(d.format("%Y-%m-%d").to_string()), vec![])),
        Expect::Regex(re) => {
            let caps = re.captures(text)?;
            let extra = re
                .capture_names()
                .flatten()
                .filter_map(|n| {
                    caps.name(n)
                        .map(|m| (n.to_string(), m.as_str().to_string()))
                })
                .collect();
            Some((Dynamic::from(text.to_string()), extra))
        }
        // A file is taken before this (the step waits for its download).
        Expect::Media(_) => None,
    }
}

/// Numbers customers type: `42`, `-3.5`, `3,5` (decimal comma), `1,000` and `1.000,50`
/// (thousands separators). Not `nan` or `inf`, which Rust's float parser would take.
pub fn parse_number(text: &str) -> Option<f64> {
    let t: String = text
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '_')
        .collect();
    let body = t.strip_prefix(['-', '+']).unwrap_or(&t);
    if body.is_empty()
        || !body
            .chars()
            .all(|c| c.is_ascii_digit() || c == '.' || c == ',')
    {
        return None;
    }
    let normalized = match (t.rfind('.'), t.rfind(',')) {
        // Both: the last one is the decimal mark, the other groups thousands.
        (Some(dot), Some(comma)) if comma > dot => t.replace('.', "").replace(',', "."),
        (Some(_), Some(_)) => t.replace(',', ""),
        // Only commas: `1,000` and `1,000,000` group thousands, `3,5` is a decimal comma.
        (None, Some(_)) => {
            let groups: Vec<&str> = t.split(',').collect();
            if groups.len() > 2 || groups[1].len() == 3 {
                groups.concat()
            } else {
                t.replace(',', ".")
            }
        }
        _ => t,
    };
    normalized.parse::<f64>().ok().filter(|n| n.is_finite())
}

/// Dates customers type: ISO, day-first with `.`, `/` or `-`, `today`, `tomorrow` (relative
/// to `today`, the date where the contact lives).
pub fn parse_date(text: &str, today: NaiveDate) -> Option<NaiveDate> {
    let lower = text.to_lowercase();
    match lower.as_str() {
        "today" => return Some(today),
        "tomorrow" => return Some(today + Duration::days(1)),
        _ => {}
    }
    for format in [
        "%Y-%m-%d", "%d.%m.%Y", "%d/%m/%Y", "%d-%m-%Y", "%d.%m.%y", "%d/%m/%y",
    ] {
        if let Ok(d) = NaiveDate::parse_from_str(text, format) {
            return Some(d);
        }
    }
    None
}

/// `HH:MM` (the next such time in `tz`, or UTC), or an RFC 3339 instant.
fn parse_until(text: &str, now: DateTime<Utc>, tz: Option<&str>) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    let time = NaiveTime::parse_from_str(text, "%H:%M").ok()?;
    let tz: chrono_tz::Tz = tz.and_then(|t| t.parse().ok()).unwrap_or(chrono_tz::UTC);
    let local_now = now.with_timezone(&tz);
    for days in 0..=2 {
        let date = local_now.date_naive() + Duration::days(days);
        if let Some(at) = tz.from_local_datetime(&date.and_time(time)).earliest() {
            let at = at.with_timezone(&Utc);
            if at > now {
                return Some(at);
            }
        }
    }
    None
}

fn render_body(
    body: &Body,
    s: &Scripting,
    ctx: &Context<'_>,
) -> Result<serde_json::Value, ScriptError> {
    Ok(match body {
        Body::Value(v) => v.clone(),
        Body::Text(t) => script::to_json(&t.value(s, ctx)?),
        Body::Array(items) => serde_json::Value::Array(
            items
                .iter()
                .map(|b| render_body(b, s, ctx))
                .collect::<Result<_, _>>()?,
        ),
        Body::Object(fields) => serde_json::Value::Object(
            fields
                .iter()
                .map(|(k, b)| Ok((k.clone(), render_body(b, s, ctx)?)))
                .collect::<Result<_, ScriptError>>()?,
        ),
    })
}

/// `message` as flows see it: `text`, `type`, `button`, `list`.
fn message_value(m: &Inbound) -> Dynamic {
    let mut map = Map::new();
    map.insert(
        "text".into(),
        Dynamic::from(m.content.as_text().to_string()),
    );
    map.insert("type".into(), Dynamic::from(m.content.kind().to_string()));
    map.insert(
        "button".into(),
        Dynamic::from(m.content.button_id().unwrap_or_default().to_string()),
    );
    map.insert(
        "list".into(),
        Dynamic::from(m.content.list_id().unwrap_or_default().to_string()),
    );
    Dynamic::from_map(map)
}

/// `contact` as flows see it: `wa_id`, `name`, `tags`, `attrs`, `timezone`.
pub fn contact_value(c: &Contact) -> Dynamic {
    let mut map = Map::new();
    map.insert("wa_id".into(), Dynamic::from(c.wa_id.clone()));
    map.insert(
        "name".into(),
        c.name
            .clone()
            .map(Dynamic::from)
            .unwrap_or(Dynamic::from(String::new())),
    );
    map.insert(
        "tags".into(),
        Dynamic::from_array(c.tags.iter().cloned().map(Dynamic::from).collect()),
    );
    map.insert(
        "attrs".into(),
        script::from_json(&serde_json::Value::Object(c.attrs.clone())),
    );
    map.insert(
        "timezone".into(),
        Dynamic::from(c.timezone.clone().unwrap_or_default()),
    );
    Dynamic::from_map(map).into_shared()
}

/// Takes back what a script changed in `contact` (name, tags, attrs, timezone); whether
/// anything changed.
fn apply_contact(c: &mut Contact, value: &Dynamic) -> bool {
    let Some(map) = value.read_lock::<Map>() else {
        return false;
    };
    let mut changed = false;
    let text = |key: &str| {
        map.get(key)
            .and_then(|v| v.clone().into_string().ok())
            .map(|s| (!s.is_empty()).then_some(s))
    };
    if let Some(name) = text("name")
        && name != c.name
    {
        c.name = name;
        changed = true;
    }
    if let Some(tz) = text("timezone")
        && tz != c.timezone
    {
        c.timezone = tz;
        changed = true;
    }
    if let Some(tags) = map.get("tags").and_then(|v| v.read_lock::<rhai::Array>()) {
        let tags: std::collections::BTreeSet<String> = tags.iter().map(|t| t.to_string()).collect();
        if tags != c.tags {
            c.tags = tags;
            changed = true;
        }
    }
    if let Some(serde_json::Value::Object(attrs)) = map.get("attrs").map(script::to_json)
        && attrs != c.attrs
    {
        c.attrs = attrs;
        changed = true;
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::VirtualClock;
    use crate::config::PolicyConfig;
    use crate::domain::InboundContent;
    use crate::flow::lint::Window;
    use crate::flow::load::load_sources;
    use crate::templates::Registry;

    fn flows(sources: &[&str]) -> (Engine, FlowSet) {
        let scripting = Arc::new(Scripting::default());
        let sources: Vec<(String, String)> = sources
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("f{i}.yaml"), s.to_string()))
            .collect();
        let no_scripts = |name: &str| Err(format!("no script {name}"));
        let window = Window::from_policy(&PolicyConfig::default());
        let project = load_sources(
            &sources,
            &scripting,
            Registry::default(),
            &no_scripts,
            None,
            window,
        );
        assert!(
            !project.diagnostics.has_errors(),
            "{}",
            project.diagnostics.render(false)
        );
        (Engine::new(scripting, None), FlowSet::new(project.flows))
    }

    fn text(body: &str) -> Event {
        let now = VirtualClock::test_epoch();
        Event::Message(Inbound::sandbox(InboundContent::text(body), now, now))
    }

    fn said(outcome: &Outcome) -> Vec<String> {
        outcome
            .effects
            .iter()
            .filter_map(|e| match e {
                Effect::Send(m) => Some(m.content.body().to_string()),
                _ => None,
            })
            .collect()
    }

    const ASK: &str = r#"
flow: ask
triggers: [ { keywords: [age] } ]
steps:
  q:
    ask: "How old are you?"
    save: age
    expect: number
    retry: "A number, please."
    attempts: 2
    on_fail: bye
    timeout: 1h
    on_timeout: bye
    next:
      - if: 'age >= 18'
        goto: adult
      - goto: minor
  adult: { say: "Adult ({{age}})" }
  minor: { say: "Minor" }
  bye: { say: "Bye" }
"#;

    const MENU: &str = r#"
flow: menu
triggers: [ { keywords: [menu], interrupt: true, priority: 5 } ]
steps:
  m: { say: "Menu" }
"#;

    #[test]
    fn an_ask_saves_a_typed_answer_and_routes_by_condition() {
        let (engine, set) = flows(&[ASK]);
        let mut contact = Contact::new("1");
        let now = VirtualClock::test_epoch();
        let out = engine.handle(&set, &mut contact, None, text("age"), now);
        assert_eq!(said(&out), ["How old are you?"]);
        let timers = out.timers.clone().unwrap();
        assert!(
            matches!(timers[..], [(at, TimerKind::AskTimeout { .. })] if at == now + Duration::hours(1))
        );
        let out = engine.handle(&set, &mut contact, out.session, text("42"), now);
        assert_eq!(said(&out), ["Adult (42)"]);
        assert!(out.session.is_none(), "the flow ended");
        assert_eq!(out.timers, Some(vec![]), "the timeout is cleared");
    }

    const PHOTO: &str = r#"
flow: photo
triggers: [ { keywords: [damaged] } ]
steps:
  q:
    ask: "A photo, please."
    expect: [image, document]
    save: photo
    retry: "A photo or a document, please."
    timeout: 1h
    on_timeout: bye
    next:
      - if: 'photo.status == "ok"'
        goto: got
      - goto: failed
  got: { say: "Got {{photo.kind}} {{photo.size}} ({{photo.caption}})" }
  failed: { say: "Failed: {{photo.error}}" }
  bye: { say: "Bye" }
"#;

    fn file(kind: &str) -> Inbound {
        let now = VirtualClock::test_epoch();
        let content = InboundContent::Media {
            kind: kind.into(),
            caption: Some("box".into()),
            file: None,
        };
        Inbound::sandbox(content, now, now)
    }

    #[test]
    fn an_ask_for_a_file_waits_for_its_download_and_routes_by_its_status() {
        let (engine, set) = flows(&[PHOTO]);
        let mut contact = Contact::new("1");
        let now = VirtualClock::test_epoch();
        let out = engine.handle(&set, &mut contact, None, text("damaged"), now);
        assert_eq!(said(&out), ["A photo, please."]);
        // Text, or a file of another kind, is a failed answer.
        let out = engine.handle(&set, &mut contact, out.session, text("soon"), now);
        assert_eq!(said(&out), ["A photo or a document, please."]);
        let video = Event::Message(file("video"));
        let out = engine.handle(&set, &mut contact, out.session, video, now);
        assert_eq!(said(&out), ["A photo or a document, please."]);
        let photo = file("image");
        let out = engine.handle(
            &set,
            &mut contact,
            out.session,
            Event::Message(photo.clone()),
            now,
        );
        assert!(said(&out).is_empty(), "nothing is said while it downloads");
        let session = out.session.clone().unwrap();
        assert_eq!(
            session.waiting,
            Waiting::Media {
                message: photo.id.clone()
            }
        );
        assert_eq!(
            out.timers,
            Some(vec![]),
            "the ask's timeout no longer applies"
        );
        let pending = script::vars_to_json(&session.vars);
        assert_eq!(pending["photo"]["status"], "pending");
        // A result for another message is stale; the one for this message goes on.
        let other = Event::Media {
            message: "wamid.other".into(),
            value: serde_json::json!({"status": "ok"}),
        };
        let out = engine.handle(&set, &mut contact, out.session, other, now);
        assert_eq!(out.handled, Handled::Stale);
        let done = Event::Media {
            message: photo.id.clone(),
            value: serde_json::json!({"status": "ok", "kind": "image", "size": 12, "caption": "box"}),
        };
        let out = engine.handle(&set, &mut contact, out.session, done, now);
        assert_eq!(said(&out), ["Got image 12 (box)"]);
        // A failed download takes the other branch, with its reason.
        let out = engine.handle(&set, &mut contact, None, text("damaged"), now);
        let photo = file("document");
        let out = engine.handle(
            &set,
            &mut contact,
            out.session,
            Event::Message(photo.clone()),
            now,
        );
        let failed = Event::Media {
            message: photo.id,
            value: serde_json::json!({"status": "failed", "error": "too_large"}),
        };
        let out = engine.handle(&set, &mut contact, out.session, failed, now);
        assert_eq!(said(&out), ["Failed: too_large"]);
    }

    #[test]
    fn failed_attempts_retry_then_go_to_on_fail() {
        let (engine, set) = flows(&[ASK]);
        let mut contact = Contact::new("1");
        let now = VirtualClock::test_epoch();
        let out = engine.handle(&set, &mut contact, None, text("age"), now);
        let out = engine.handle(&set, &mut contact, out.session, text("old"), now);
        assert_eq!(said(&out), ["A number, please."]);
        assert_eq!(out.timers, None, "a retry keeps the timeout");
        let out = engine.handle(&set, &mut contact, out.session, text("very"), now);
        assert_eq!(said(&out), ["Bye"]);
    }

    #[test]
    fn interrupts_win_and_stale_timers_do_nothing() {
        let (engine, set) = flows(&[ASK, MENU]);
        let mut contact = Contact::new("1");
        let now = VirtualClock::test_epoch();
        let out = engine.handle(&set, &mut contact, None, text("age"), now);
        let Some((_, TimerKind::AskTimeout { epoch })) =
            out.timers.clone().unwrap().first().copied()
        else {
            panic!("a timeout timer")
        };
        let out = engine.handle(&set, &mut contact, out.session, text("menu please"), now);
        assert_eq!(out.handled, Handled::Started("menu".into()));
        assert_eq!(said(&out), ["Menu"]);
        let late = engine.handle(
            &set,
            &mut contact,
            out.session,
            Event::Timer(TimerKind::AskTimeout { epoch }),
            now + Duration::hours(1),
        );
        assert_eq!(late.handled, Handled::Stale);
        assert!(late.effects.is_empty());
    }

    /// A loop that sends (behind an `if:`, which `check` cannot judge) stops at the turn's
    /// cap: ten messages, then the apology, and the session ends.
    #[test]
    fn a_loop_that_sends_stops_at_the_turns_cap() {
        let (engine, set) = flows(&[r#"
flow: chatter
triggers: [ { any: true } ]
steps:
  a: { say: "a", next: b }
  b:
    say: "b"
    next:
      - { if: "true", goto: a }
"#]);
        let mut contact = Contact::new("1");
        let now = VirtualClock::test_epoch();
        let out = engine.handle(&set, &mut contact, None, text("hi"), now);
        let mut expected = ["a", "b"].repeat(5);
        expected.push(APOLOGY);
        assert_eq!(said(&out), expected);
        assert!(out.message_capped);
        assert!(out.session.is_none());
        assert!(out.notes[0].contains("sent 10 messages"), "{:?}", out.notes);

        let engine = engine.with_messages_per_turn(3);
        let out = engine.handle_after(&set, &mut contact, None, text("hi"), now, 2);
        assert_eq!(said(&out), ["a", APOLOGY], "2 sent before, 1 left");
    }

    #[test]
    fn a_goto_loop_is_stopped_with_an_apology() {
        let (engine, set) = flows(&[r#"
flow: spin
triggers: [ { any: true } ]
steps:
  a: { goto: b }
  b: { goto: a }
"#]);
        let mut contact = Contact::new("1");
        let out = engine.handle(
            &set,
            &mut contact,
            None,
            text("x"),
            VirtualClock::test_epoch(),
        );
        assert_eq!(said(&out), [APOLOGY]);
        assert!(out.notes[0].contains("without waiting"), "{:?}", out.notes);
        assert!(out.session.is_none());
    }

    #[test]
    fn an_http_step_asks_the_runtime_and_continues_with_the_result() {
        let (engine, set) = flows(&[r#"
flow: crm
triggers: [ { keywords: [lead] } ]
steps:
  post:
    http: { url: "http://127.0.0.1:1/leads", body: { n: "{{ 1 + 1 }}" }, save: crm }
    on_error: oops
    next: done
  done: { say: "id {{crm.body.id}}, status {{crm.status}}" }
  oops: { say: "CRM down" }
"#]);
        let mut contact = Contact::new("1");
        let now = VirtualClock::test_epoch();
        let out = engine.handle(&set, &mut contact, None, text("lead"), now);
        let Some(Effect::Http(request)) = out.effects.first() else {
            panic!("an http effect")
        };
        assert_eq!(
            request.body,
            Some(serde_json::json!({"n": 2})),
            "typed interpolation"
        );
        let ok = HttpOutcome {
            epoch: request.epoch,
            result: Ok((201, serde_json::json!({"id": "L-7"}))),
        };
        let done = engine.handle(
            &set,
            &mut contact,
            out.session.clone(),
            Event::Http(ok),
            now,
        );
        assert_eq!(said(&done), ["id L-7, status 201"]);
        let failed = HttpOutcome {
            epoch: request.epoch,
            result: Ok((500, serde_json::Value::Null)),
        };
        let oops = engine.handle(&set, &mut contact, out.session, Event::Http(failed), now);
        assert_eq!(said(&oops), ["CRM down"]);
    }

    #[test]
    fn the_window_time_comes_from_the_message_timestamp() {
        let (engine, set) = flows(&[MENU]);
        let mut contact = Contact::new("1");
        let now = VirtualClock::test_epoch();
        let late = Inbound::sandbox(InboundContent::text("menu"), now - Duration::hours(3), now);
        let out = engine.handle(&set, &mut contact, None, Event::Message(late), now);
        assert!(out.contact_changed);
        assert_eq!(
            contact.last_customer_message_at,
            Some(now - Duration::hours(3))
        );
    }

    #[test]
    fn numbers_customers_type() {
        assert_eq!(parse_number("42"), Some(42.0));
        assert_eq!(parse_number("-3.5"), Some(-3.5));
        assert_eq!(parse_number("3,5"), Some(3.5));
        assert_eq!(parse_number("1,000"), Some(1000.0));
        assert_eq!(parse_number("1.000,50"), Some(1000.5));
        assert_eq!(parse_number("1,000,000"), Some(1_000_000.0));
        for bad in ["nan", "inf", "-infinity", "", "12a", "1e5"] {
            assert_eq!(parse_number(bad), None, "{bad}");
        }
    }

    #[test]
    fn dates_customers_type() {
        let now = VirtualClock::test_epoch();
        let today = now.date_naive();
        let new_york = script::local_date(
            now - Duration::hours(12),
            Some(chrono_tz::America::New_York),
        );
        assert_eq!(new_york, NaiveDate::from_ymd_opt(2026, 1, 4).unwrap());
        assert_eq!(
            parse_date("2026-01-12", today),
            NaiveDate::from_ymd_opt(2026, 1, 12)
        );
        assert_eq!(
            parse_date("12.01.2026", today),
            NaiveDate::from_ymd_opt(2026, 1, 12)
        );
        assert_eq!(
            parse_date("Tomorrow", today),
            NaiveDate::from_ymd_opt(2026, 1, 6)
        );
        assert_eq!(parse_date("soon", today), None);
        let nine = parse_until("09:00", now, Some("Europe/Berlin")).unwrap();
        assert_eq!(nine, Utc.with_ymd_and_hms(2026, 1, 6, 8, 0, 0).unwrap());
    }
}
