//! Conversation tests: a YAML script of customer messages, expected bot
//! messages and clock jumps, run against the real engine, store and timers on a virtual
//! clock and an in-memory database.
//!
//! Strict by design: every outgoing message must be asserted, in order, before the next
//! customer message, agent message, trigger or wait, and by the end of the test.
//!
//! Beyond `user:`, `bot:` (a text, buttons, a list or a template, or `none`), `wait:`,
//! `agent:`, `trigger:`, `set:` and `reload:`:
//! - `user: { text: …, from_ad: true }`: the message answers a Click-to-WhatsApp ad (the
//!   webhook carries a `referral`), so the business's first answer within 24 h opens the
//!   free entry point (72 h from that answer, in which every message is free).
//! - `user: { image: parcel.png, caption: … }` (or `document:`): the customer sends that
//!   file (relative to the test file); it is stored as a download would store it (refused
//!   as `too_large` over `media.max_bytes`) and the flow told, in the same step.
//! - `bot: { …, reason: "window closed 1h12m ago" }`: the policy decision's reason contains
//!   this text (the reason `chat` and the API show beside the decision).
//! - `bot:` without `queued`, `skipped` or `expired` expects a message that goes out (the
//!   decision is `send` or `rewritten`): a queued message must be asserted as queued.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::Duration;
use regex::Regex;
use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::app::Loaded;
use crate::clock::{Clock, VirtualClock};
use crate::config::Config;
use crate::diagnostic::{Diagnostic, Diagnostics};
use crate::dispatch::{Runtime, SentMessage, TurnReport};
use crate::domain::{HumanDuration, Inbound, InboundContent, OutboundContent};
use crate::flow::load::load_project;
use crate::yaml::{self, OneOrMany};

/// The contact every conversation test talks as.
pub const TEST_WA_ID: &str = "15550001234";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestFile {
    pub test: String,
    #[serde(default)]
    pub flows: Option<Vec<String>>,
    pub steps: Vec<Spanned<TestStep>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestStep {
    pub user: Option<UserMessage>,
    pub bot: Option<BotExpectation>,
    pub wait: Option<String>,
    pub agent: Option<String>,
    pub trigger: Option<TriggerStep>,
    pub set: Option<SetStep>,
    /// Loads the flows in this directory (relative to the test file) as a new version.
    pub reload: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum UserMessage {
    Text(String),
    Rich(RichUser),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RichUser {
    pub text: Option<String>,
    pub button: Option<String>,
    pub list: Option<String>,
    /// A WhatsApp Flow's answer: the fields the customer filled in.
    pub form: Option<serde_json::Map<String, serde_json::Value>>,
    /// A photo: this file (relative to the test file), as if downloaded from WhatsApp.
    pub image: Option<String>,
    /// A document: this file (relative to the test file).
    pub document: Option<String>,
    /// The caption of an `image` or `document`.
    pub caption: Option<String>,
    /// The message was sent this long ago (a late webhook).
    pub ago: Option<String>,
    /// The message answers a Click-to-WhatsApp ad (its webhook carries a `referral`).
    #[serde(default)]
    pub from_ad: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum BotExpectation {
    /// `bot: none`
    Keyword(String),
    Expect(Box<Expected>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expected {
    pub text: Option<String>,
    pub contains: Option<String>,
    pub regex: Option<String>,
    pub buttons: Option<Vec<String>>,
    pub list: Option<Vec<String>>,
    pub template: Option<String>,
    pub params: Option<Vec<String>>,
    pub queued: Option<bool>,
    pub skipped: Option<bool>,
    pub expired: Option<bool>,
    /// Text the policy decision's reason contains.
    pub reason: Option<String>,
    /// A reaction with this emoji on the customer's latest message.
    pub reaction: Option<String>,
    /// A location at `[latitude, longitude]`.
    pub location: Option<Vec<f64>>,
    /// Contact cards with these names, in order.
    pub contacts: Option<Vec<String>>,
    /// `true`: the message quotes the customer's latest message; `false`: it quotes none.
    pub quote: Option<bool>,
    /// A form: the WhatsApp Flow with this id.
    pub form: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerStep {
    pub flow: String,
    pub step: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetStep {
    pub name: Option<String>,
    pub timezone: Option<String>,
    pub tags: Option<OneOrMany>,
    pub attrs: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The result of one test.
#[derive(Debug)]
pub struct TestResult {
    pub name: String,
    pub file: String,
    /// `None` when it passed.
    pub failure: Option<String>,
}

/// Collects test files: each PATH is a file or a directory searched recursively.
pub fn test_files(paths: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            files.extend(yaml::yaml_files(path)?);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

/// What `flowgate test` runs without arguments: `tests/conversations` (if it exists) and the
/// `*.test.yaml` files beside the flows.
pub fn default_test_files(config: &Config) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let dir = Path::new("tests/conversations");
    if dir.is_dir() {
        files.extend(yaml::yaml_files(dir)?);
    }
    if config.flows.is_dir() {
        files.extend(
            yaml::yaml_files(&config.flows)?
                .into_iter()
                .filter(|f| yaml::is_test_file(f)),
        );
    }
    Ok(files)
}

/// Runs one test file against the project in `loaded`.
pub async fn run_file(loaded: &Loaded, path: &Path) -> Result<TestResult, Box<Diagnostics>> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        let mut d = Diagnostics::default();
        d.push(Diagnostic::error(&file, None, format!("cannot read: {e}")));
        Box::new(d)
    })?;
    let test: TestFile = yaml::parse(&file, &text).map_err(|d| {
        let mut diags = Diagnostics::default();
        diags.add_source(&file, Arc::from(text.as_str()));
        diags.push(*d);
        Box::new(diags)
    })?;
    let name = test.test.clone();
    let failure = match Run::new(loaded, &test, path).await {
        Ok(mut run) => run.steps(&test, &file).await.err(),
        Err(e) => Some(e),
    };
    Ok(TestResult {
        name,
        file,
        failure,
    })
}

struct Run<'a> {
    loaded: &'a Loaded,
    runtime: Runtime,
    clock: Arc<VirtualClock>,
    pending: VecDeque<SentMessage>,
    /// The wamid of the customer's latest message, which reactions and quotes point at.
    last_user: Option<String>,
    base: PathBuf,
    flows_filter: Option<Vec<String>>,
}

impl<'a> Run<'a> {
    async fn new(loaded: &'a Loaded, test: &TestFile, path: &Path) -> Result<Run<'a>, String> {
        let clock = Arc::new(VirtualClock::new(VirtualClock::test_epoch()));
        let mut flows = loaded.project.flows.clone();
        if let Some(only) = &test.flows {
            for id in only {
                if !flows.iter().any(|f| f.id == *id) {
                    return Err(format!("`flows:` names `{id}`, which is not loaded"));
                }
            }
            flows.retain(|f| only.contains(&f.id));
        }
        let runtime = loaded
            .runtime("sqlite::memory:", clock.clone())
            .await
            .map_err(|e| format!("cannot start the runtime: {e:#}"))?;
        runtime.reload(flows).await.map_err(|e| e.to_string())?;
        // A test's files live as long as its in-memory database.
        let media = loaded.memory_media();
        let runtime = runtime.with_media(Arc::new(media));
        Ok(Run {
            loaded,
            runtime,
            clock,
            pending: VecDeque::new(),
            last_user: None,
            base: path.parent().unwrap_or(Path::new("")).to_path_buf(),
            flows_filter: test.flows.clone(),
        })
    }

    async fn steps(&mut self, test: &TestFile, file: &str) -> Result<(), String> {
        for (i, step) in test.steps.iter().enumerate() {
            let at = format!(
                "{file}:{}:{}",
                step.referenced.line(),
                step.referenced.column()
            );
            self.step(&step.value)
                .await
                .map_err(|e| format!("step {} ({at}): {e}", i + 1))?;
        }
        self.no_pending("at the end of the test")
    }

    fn no_pending(&self, when: &str) -> Result<(), String> {
        match self.pending.front() {
            None => Ok(()),
            Some(m) => Err(format!(
                "{} outgoing message{} not asserted {when}; the first is:\n    {}",
                self.pending.len(),
                if self.pending.len() == 1 {
                    " was"
                } else {
                    "s were"
                },
                describe(m)
            )),
        }
    }

    fn absorb(&mut self, report: TurnReport) {
        self.pending.extend(report.sent);
    }

    /// One test step: a `bot:` expectation is checked against what is pending; any other
    /// step first needs every outgoing message asserted, then runs.
    async fn step(&mut self, step: &TestStep) -> Result<(), String> {
        step.check_one_kind()?;
        if let Some(expected) = &step.bot {
            return self.bot(expected);
        }
        self.no_pending("before the next step")?;
        if let Some(user) = &step.user {
            self.user(user).await
        } else if let Some(wait) = &step.wait {
            self.wait(wait).await
        } else if let Some(text) = &step.agent {
            self.agent(text).await
        } else if let Some(trigger) = &step.trigger {
            self.trigger(trigger).await
        } else if let Some(set) = &step.set {
            self.set(set).await
        } else if let Some(dir) = &step.reload {
            self.reload(dir).await
        } else {
            Ok(())
        }
    }

    /// `user:`: the customer's message, from the test customer's profile; a file
    /// (`image:`, `document:`) is then stored and its flow told, as the media worker does
    /// after a download.
    async fn user(&mut self, user: &UserMessage) -> Result<(), String> {
        let file = match user {
            UserMessage::Rich(r) => r.file(),
            UserMessage::Text(_) => None,
        };
        let file = match file {
            Some((kind, name)) => Some((kind, name, self.read_file(name)?)),
            None => None,
        };
        let inbound = user.inbound(self.clock.now())?;
        self.last_user = Some(inbound.id.clone());
        let report = self
            .runtime
            .inbound(
                &self.runtime.default_channel,
                TEST_WA_ID,
                Some("Test Customer"),
                inbound,
            )
            .await
            .map_err(|e| e.to_string())?;
        self.absorb(report);
        if let Some((kind, name, bytes)) = file {
            let wamid = self.last_user.clone().unwrap_or_default();
            let report = self.deliver_file(&wamid, kind, name, bytes, user).await?;
            self.absorb(report);
        }
        Ok(())
    }

    /// A test's file, relative to the test file.
    fn read_file(&self, name: &str) -> Result<Vec<u8>, String> {
        let path = self.base.join(name);
        std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    }

    /// Stores a test's file for the customer's message `wamid` (refused as `too_large`
    /// over `media.max_bytes`, as a download is) and tells the flow.
    async fn deliver_file(
        &self,
        wamid: &str,
        kind: &str,
        name: &str,
        bytes: Vec<u8>,
        user: &UserMessage,
    ) -> Result<TurnReport, String> {
        let caption = match user {
            UserMessage::Rich(r) => r.caption.as_deref(),
            UserMessage::Text(_) => None,
        };
        let file = crate::media::local::GivenFile {
            kind,
            name,
            bytes,
            caption,
        };
        let channel = &self.runtime.default_channel;
        crate::media::local::deliver(&self.runtime, channel, TEST_WA_ID, wamid, file)
            .await
            .map_err(|e| e.to_string())
    }

    /// `wait:`: the clock moves on, firing what falls due on the way.
    async fn wait(&mut self, wait: &str) -> Result<(), String> {
        let target = self.clock.now() + parse_duration(wait)?;
        let reports = self
            .runtime
            .advance_clock(&self.clock, target)
            .await
            .map_err(|e| e.to_string())?;
        for report in reports {
            self.absorb(report);
        }
        Ok(())
    }

    /// `agent:`: an agent's text message.
    async fn agent(&mut self, text: &str) -> Result<(), String> {
        let report = self
            .runtime
            .agent_message(
                &self.runtime.default_channel,
                TEST_WA_ID,
                OutboundContent::text(text),
            )
            .await
            .map_err(|e| e.to_string())?;
        self.absorb(report);
        Ok(())
    }

    /// `trigger:`: a flow started as the API starts it; a flow or step that does not exist
    /// fails the test.
    async fn trigger(&mut self, trigger: &TriggerStep) -> Result<(), String> {
        let report = self
            .runtime
            .start_flow(
                &self.runtime.default_channel,
                TEST_WA_ID,
                &trigger.flow,
                trigger.step.as_deref(),
            )
            .await
            .map_err(|e| e.to_string())?;
        if report
            .notes
            .iter()
            .any(|n| n.starts_with("there is no flow") || n.contains("has no step"))
        {
            return Err(report.notes.join("; "));
        }
        self.absorb(report);
        Ok(())
    }

    /// `reload:`: the flows in `dir` (relative to the test file) become the current version.
    async fn reload(&mut self, dir: &str) -> Result<(), String> {
        let mut config: Config = self.loaded.config.clone();
        config.flows = self.base.join(dir);
        let project = load_project(&config, &self.loaded.scripting);
        if project.diagnostics.has_errors() {
            return Err(format!(
                "the reloaded flows have errors:\n{}",
                project.diagnostics.render(false)
            ));
        }
        let mut flows = project.flows;
        if let Some(only) = &self.flows_filter {
            flows.retain(|f| only.contains(&f.id));
        }
        self.runtime.reload(flows).await.map_err(|e| e.to_string())
    }

    async fn set(&mut self, set: &SetStep) -> Result<(), String> {
        let db = &self.runtime.db;
        let conversation = db
            .load_conversation(&self.runtime.default_channel, TEST_WA_ID)
            .await
            .map_err(|e| e.to_string())?;
        let mut contact = conversation.contact;
        if let Some(name) = &set.name {
            contact.name = Some(name.clone());
        }
        if let Some(tz) = &set.timezone {
            if tz.parse::<chrono_tz::Tz>().is_err() {
                return Err(format!("`{tz}` is not a timezone such as Europe/Berlin"));
            }
            contact.timezone = Some(tz.clone());
        }
        if let Some(tags) = &set.tags {
            contact.tags = tags.0.iter().cloned().collect();
        }
        if let Some(attrs) = &set.attrs {
            contact.attrs.extend(attrs.clone());
        }
        db.commit_turn(&crate::store::TurnWrite {
            session: conversation.session.as_ref(),
            ..crate::store::TurnWrite::new(
                &self.runtime.default_channel,
                conversation.contact_id,
                &contact,
                self.clock.now(),
            )
        })
        .await
        .map_err(|e| e.to_string())?;
        Ok(())
    }

    fn bot(&mut self, expected: &BotExpectation) -> Result<(), String> {
        match expected {
            BotExpectation::Keyword(k) if k == "none" => self.no_pending("(expected `bot: none`)"),
            BotExpectation::Keyword(k) => Err(format!(
                "`bot: {k}`: write `bot: none` or `bot: {{ text: … }}`"
            )),
            BotExpectation::Expect(e) => {
                let Some(actual) = self.pending.pop_front() else {
                    return Err(format!(
                        "expected {}\n    but the bot sent nothing",
                        expectation(e)
                    ));
                };
                match mismatch(e, &actual)
                    .or_else(|| reply_mismatch(e, &actual.message, self.last_user.as_deref()))
                {
                    None => Ok(()),
                    Some(why) => Err(format!(
                        "expected {}\n    actual   {}\n    ({why})",
                        expectation(e),
                        describe(&actual)
                    )),
                }
            }
        }
    }
}

impl TestStep {
    /// A test step does exactly one thing.
    fn check_one_kind(&self) -> Result<(), String> {
        let kinds = [
            self.user.is_some(),
            self.bot.is_some(),
            self.wait.is_some(),
            self.agent.is_some(),
            self.trigger.is_some(),
            self.set.is_some(),
            self.reload.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(
                "a test step has exactly one of user, bot, wait, agent, trigger, set, reload"
                    .into(),
            );
        }
        Ok(())
    }
}

impl RichUser {
    /// The file a message sends: its kind and name; `None` for anything else (both is an
    /// error the message's content reports).
    fn file(&self) -> Option<(&'static str, &str)> {
        match (&self.image, &self.document) {
            (Some(name), None) => Some(("image", name)),
            (None, Some(name)) => Some(("document", name)),
            _ => None,
        }
    }
}

impl UserMessage {
    /// The customer's message as the sandbox receives it at `now` (sent `ago` earlier).
    fn inbound(&self, now: chrono::DateTime<chrono::Utc>) -> Result<Inbound, String> {
        let (content, ago, from_ad) = match self {
            UserMessage::Text(t) => (InboundContent::text(t), None, false),
            UserMessage::Rich(r) => {
                let content = match (&r.text, &r.button, &r.list, &r.form) {
                    (None, None, None, None) if r.file().is_some() => InboundContent::Media {
                        kind: r.file().map(|(kind, _)| kind).unwrap_or_default().into(),
                        caption: r.caption.clone(),
                        file: None,
                    },
                    (Some(t), None, None, None) => InboundContent::text(t),
                    (None, Some(id), None, None) => InboundContent::ButtonReply {
                        id: id.clone(),
                        title: id.clone(),
                    },
                    (None, None, Some(id), None) => InboundContent::ListReply {
                        id: id.clone(),
                        title: id.clone(),
                    },
                    (None, None, None, Some(fields)) => InboundContent::FormReply {
                        response: fields.clone(),
                    },
                    _ => {
                        return Err(
                            "`user:` takes one of text, button, list, form, image or document"
                                .into(),
                        );
                    }
                };
                (content, r.ago.as_deref(), r.from_ad)
            }
        };
        let ago = match ago {
            Some(a) => parse_duration(a)?,
            None => Duration::zero(),
        };
        let mut inbound = Inbound::sandbox(content, now - ago, now);
        inbound.from_ad = from_ad;
        Ok(inbound)
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    text.parse::<HumanDuration>()
        .map(|d| d.0)
        .map_err(|e| e.to_string())
}

/// Why `actual` does not meet `e`, or `None`: its decision, then its text, its buttons or
/// list, its template.
fn mismatch(e: &Expected, actual: &SentMessage) -> Option<String> {
    let content = &actual.message.content;
    decision_mismatch(e, actual)
        .or_else(|| text_mismatch(e, content))
        .or_else(|| choices_mismatch(e, content))
        .or_else(|| template_mismatch(e, content))
}

/// The decision: the one a flag names, else one that sends; and its reason.
fn decision_mismatch(e: &Expected, actual: &SentMessage) -> Option<String> {
    let decision = actual.decision.name();
    let flags = [
        (e.queued, "queued"),
        (e.skipped, "skipped"),
        (e.expired, "expired"),
    ];
    for (flag, name) in flags {
        if flag == Some(true) && decision != name {
            return Some(format!("the decision is `{decision}`, not `{name}`"));
        }
    }
    // Without a flag the message must go out: a queued, skipped or expired one is asserted
    // as such, so a test cannot pass over a message the customer never gets.
    if flags.iter().all(|(flag, _)| *flag != Some(true)) && !actual.decision.sends() {
        return Some(format!(
            "the decision is `{decision}`, not sent (write `{decision}: true` to expect it)"
        ));
    }
    if let Some(part) = &e.reason
        && !actual.decision.reason().contains(part.as_str())
    {
        return Some(format!("the decision's reason does not contain {part:?}"));
    }
    None
}

/// The text: exactly, a part of it, or a regex.
fn text_mismatch(e: &Expected, content: &OutboundContent) -> Option<String> {
    let body = content.body();
    if let Some(text) = &e.text
        && (body != text || matches!(content, OutboundContent::Template { .. }))
    {
        return Some("the text differs".into());
    }
    if let Some(part) = &e.contains
        && !body.contains(part.as_str())
    {
        return Some(format!("the text does not contain {part:?}"));
    }
    if let Some(re) = &e.regex {
        match Regex::new(re) {
            Ok(re) if re.is_match(body) => {}
            Ok(_) => return Some("the text does not match the regex".into()),
            Err(err) => return Some(format!("the regex does not compile: {err}")),
        }
    }
    None
}

/// The button ids, or the list's row ids, in order.
fn choices_mismatch(e: &Expected, content: &OutboundContent) -> Option<String> {
    if let Some(ids) = &e.buttons {
        let actual_ids: Vec<&str> = match content {
            OutboundContent::Buttons { buttons, .. } => {
                buttons.iter().map(|b| b.id.as_str()).collect()
            }
            _ => return Some("it has no buttons".into()),
        };
        if actual_ids != ids.iter().map(String::as_str).collect::<Vec<_>>() {
            return Some("the button ids differ".into());
        }
    }
    if let Some(ids) = &e.list {
        let actual_ids: Vec<&str> = match content {
            OutboundContent::List { sections, .. } => sections
                .iter()
                .flat_map(|s| s.rows.iter().map(|r| r.id.as_str()))
                .collect(),
            _ => return Some("it is not a list".into()),
        };
        if actual_ids != ids.iter().map(String::as_str).collect::<Vec<_>>() {
            return Some("the list row ids differ".into());
        }
    }
    None
}

/// The reaction, location, contact cards, and which message it quotes.
fn reply_mismatch(
    e: &Expected,
    actual: &crate::domain::Outbound,
    last_user: Option<&str>,
) -> Option<String> {
    let content = &actual.content;
    if let Some(emoji) = &e.reaction {
        let OutboundContent::Reaction {
            emoji: actual_emoji,
            message_id,
        } = content
        else {
            return Some("it is not a reaction".into());
        };
        if actual_emoji != emoji {
            return Some("another emoji".into());
        }
        if Some(message_id.as_str()) != last_user {
            return Some("it reacts to another message than the customer's latest".into());
        }
    }
    if let Some(at) = &e.location {
        let OutboundContent::Location {
            latitude,
            longitude,
            ..
        } = content
        else {
            return Some("it is not a location".into());
        };
        if at.as_slice() != [*latitude, *longitude] {
            return Some("the coordinates differ".into());
        }
    }
    if let Some(names) = &e.contacts {
        let OutboundContent::Contacts { cards } = content else {
            return Some("it is not a contacts message".into());
        };
        if cards.iter().map(|c| &c.name).ne(names.iter()) {
            return Some("the contact cards' names differ".into());
        }
    }
    if let Some(id) = &e.form {
        let OutboundContent::Form { flow_id, .. } = content else {
            return Some("it is not a form".into());
        };
        if flow_id != id {
            return Some(format!("it opens the Flow {flow_id}"));
        }
    }
    match (e.quote, actual.quote.as_deref()) {
        (Some(true), None) => Some("it quotes no message".into()),
        (Some(true), Some(q)) if Some(q) != last_user => {
            Some("it quotes another message than the customer's latest".into())
        }
        (Some(false), Some(_)) => Some("it quotes a message".into()),
        _ => None,
    }
}

/// The template's name and parameters.
fn template_mismatch(e: &Expected, content: &OutboundContent) -> Option<String> {
    let name = e.template.as_ref()?;
    let OutboundContent::Template {
        name: n, params, ..
    } = content
    else {
        return Some("it is not a template".into());
    };
    if n != name {
        return Some("another template".into());
    }
    if let Some(expected) = &e.params
        && expected != params
    {
        return Some("the template parameters differ".into());
    }
    None
}

fn expectation(e: &Expected) -> String {
    let mut parts = Vec::new();
    if let Some(t) = &e.text {
        parts.push(format!("text {t:?}"));
    }
    if let Some(t) = &e.contains {
        parts.push(format!("contains {t:?}"));
    }
    if let Some(t) = &e.regex {
        parts.push(format!("regex {t:?}"));
    }
    if let Some(b) = &e.buttons {
        parts.push(format!("buttons [{}]", b.join(", ")));
    }
    if let Some(l) = &e.list {
        parts.push(format!("list [{}]", l.join(", ")));
    }
    if let Some(t) = &e.template {
        parts.push(format!("template {t}"));
    }
    if let Some(p) = &e.params {
        parts.push(format!("params {p:?}"));
    }
    for (flag, name) in [
        (e.queued, "queued"),
        (e.skipped, "skipped"),
        (e.expired, "expired"),
    ] {
        if flag == Some(true) {
            parts.push(name.to_string());
        }
    }
    if let Some(r) = &e.reason {
        parts.push(format!("reason contains {r:?}"));
    }
    if let Some(r) = &e.reaction {
        parts.push(format!("reaction {r}"));
    }
    if let Some(l) = &e.location {
        parts.push(format!("location {l:?}"));
    }
    if let Some(c) = &e.contacts {
        parts.push(format!("contacts {c:?}"));
    }
    if let Some(f) = &e.form {
        parts.push(format!("form {f}"));
    }
    match e.quote {
        Some(true) => parts.push("quoting the customer's message".into()),
        Some(false) => parts.push("quoting nothing".into()),
        None => {}
    }
    parts.join(", ")
}

/// One line for an outgoing message and its policy decision, as tests show it.
pub fn describe(m: &SentMessage) -> String {
    let mut out = describe_content(&m.message.content);
    if m.message.quote.is_some() {
        out.push_str(", quoting the customer's message");
    }
    let _ = write!(out, " [{}] ({})", m.decision.name(), m.decision.reason());
    out
}

/// One line for what a message says.
pub fn describe_content(content: &OutboundContent) -> String {
    let mut out = String::new();
    match content {
        OutboundContent::Text { body, .. } => {
            let _ = write!(out, "text {body:?}");
        }
        OutboundContent::Buttons { body, buttons } => {
            let ids: Vec<String> = buttons
                .iter()
                .map(|b| format!("{}:{:?}", b.id, b.title))
                .collect();
            let _ = write!(out, "text {body:?}, buttons [{}]", ids.join(", "));
        }
        OutboundContent::List { body, sections, .. } => {
            let ids: Vec<&str> = sections
                .iter()
                .flat_map(|s| s.rows.iter().map(|r| r.id.as_str()))
                .collect();
            let _ = write!(out, "text {body:?}, list [{}]", ids.join(", "));
        }
        OutboundContent::Media {
            kind,
            source,
            caption,
            ..
        } => {
            let _ = write!(out, "{kind} {}", source.describe());
            if let Some(c) = caption {
                let _ = write!(out, ", caption {c:?}");
            }
        }
        OutboundContent::Template {
            name,
            language,
            params,
        } => {
            let _ = write!(out, "template {name} ({language}), params {params:?}");
        }
        OutboundContent::Location {
            latitude,
            longitude,
            name,
            address,
        } => {
            let _ = write!(out, "location {latitude},{longitude}");
            for part in [name, address].into_iter().flatten() {
                let _ = write!(out, ", {part:?}");
            }
        }
        OutboundContent::Contacts { cards } => {
            let cards: Vec<String> = cards
                .iter()
                .map(|c| {
                    let reach: Vec<&str> = c
                        .phones
                        .iter()
                        .chain(&c.emails)
                        .chain(&c.urls)
                        .map(String::as_str)
                        .collect();
                    format!("{:?} {}", c.name, reach.join(" "))
                })
                .collect();
            let _ = write!(out, "contacts [{}]", cards.join(", "));
        }
        OutboundContent::Reaction { emoji, .. } => {
            let _ = write!(out, "reaction {emoji}");
        }
        OutboundContent::Form {
            body, flow_id, cta, ..
        } => {
            let _ = write!(out, "text {body:?}, form {flow_id} behind {cta:?}");
        }
    }
    out
}

/// Runs test files and prints results; returns `(passed, failed)`.
pub async fn run_all(loaded: &Loaded, files: &[PathBuf], out: &mut String) -> (usize, usize) {
    let (mut passed, mut failed) = (0, 0);
    for path in files {
        match run_file(loaded, path).await {
            Ok(result) => match result.failure {
                None => {
                    passed += 1;
                    let _ = writeln!(out, "ok   {} ({})", result.name, result.file);
                }
                Some(why) => {
                    failed += 1;
                    let _ = writeln!(out, "FAIL {} ({})\n  {why}", result.name, result.file);
                }
            },
            Err(diags) => {
                failed += 1;
                let _ = writeln!(out, "FAIL {}\n{}", path.display(), diags.render(false));
            }
        }
    }
    let _ = writeln!(out, "{passed} passed, {failed} failed");
    (passed, failed)
}
