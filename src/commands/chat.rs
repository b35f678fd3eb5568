//! `flowgate chat`: a customer on the sandbox channel talking to the flows in the terminal,
//! on a virtual clock and an in-memory database.
//!
//! [`Chat::input`] takes one line (a message, or a `/command`) and returns the text to print;
//! reading the terminal and printing is `main.rs`'s.

use std::fmt::Write as _;
use std::sync::Arc;

use crate::app::Loaded;
use crate::clock::{Clock, SystemClock, VirtualClock};
use crate::conversation::describe_content;
use crate::dispatch::{DispatchError, Runtime, TurnReport};
use crate::domain::{HumanDuration, Inbound, InboundContent, format_duration};
use crate::engine::Handled;
use crate::store::StoreError;

/// The largest file `/image` and its kin read: WhatsApp's largest (a 100 MiB document); a
/// smaller `media.max_bytes` still refuses it as a download would.
const MAX_CHAT_FILE: u64 = 100 * 1024 * 1024;
/// Why the chat cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The runtime did not start (the database, its migrations).
    #[error(transparent)]
    Start(#[from] anyhow::Error),
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    File(#[from] crate::media::local::GivenFileError),
}

/// `/help`: every command.
const HELP: &str = "  Type a message, or:
  /button ID            tap a reply button (its id)
  /list ID              pick a list row (its id)
  /form {\"field\": 1}    answer a WhatsApp Flow with a JSON object
  /image PATH [caption] send a file (also /document, /audio, /video, /sticker)
  /wait 25h             move the clock on, firing what falls due
  /state                the session, the contact and the policy now
  /resume [FLOW [STEP]] a person gives the conversation back to the bot
  /reset                forget the session and timers
  /help                 this list
  /quit                 leave
";

/// What to do after a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Print this (possibly nothing) and read the next line.
    Print(String),
    /// The customer left (`/quit`, `/exit`).
    Quit,
}

/// One line of the customer's, read.
#[derive(Debug, Clone, PartialEq)]
enum Input<'a> {
    Empty,
    Quit,
    Message(InboundContent),
    Wait(&'a str),
    State,
    Reset,
    /// `/resume [FLOW [STEP]]`: a person gives the conversation back to the bot.
    Resume(&'a str),
    /// `/image PATH [caption]` (or `/document`, `/audio`, `/video`, `/sticker`): the
    /// customer sends that file.
    File {
        kind: &'static str,
        arg: &'a str,
    },
    Help,
    Unknown(&'a str),
    /// `/form` with something that is not a JSON object.
    BadForm,
}

impl<'a> Input<'a> {
    fn parse(line: &'a str) -> Self {
        let input = line.trim();
        if input.is_empty() {
            return Self::Empty;
        }
        let (command, arg) = input
            .split_once(' ')
            .map(|(c, a)| (c, a.trim()))
            .unwrap_or((input, ""));
        match command {
            "/quit" | "/exit" => Self::Quit,
            "/button" => Self::Message(InboundContent::ButtonReply {
                id: arg.into(),
                title: arg.into(),
            }),
            "/list" => Self::Message(InboundContent::ListReply {
                id: arg.into(),
                title: arg.into(),
            }),
            "/form" => match serde_json::from_str(arg) {
                Ok(response) => Self::Message(InboundContent::FormReply { response }),
                Err(_) => Self::BadForm,
            },
            "/wait" => Self::Wait(arg),
            "/state" => Self::State,
            "/reset" => Self::Reset,
            "/resume" => Self::Resume(arg),
            "/help" => Self::Help,
            c if c.starts_with('/') => match crate::media::local::kinds().find(|k| c[1..] == **k) {
                Some(kind) => Self::File { kind, arg },
                None => Self::Unknown(c),
            },
            _ => Self::Message(InboundContent::text(input)),
        }
    }
}

/// A chat session: the runtime on its virtual clock, and who the customer is.
pub struct Chat {
    runtime: Runtime,
    clock: Arc<VirtualClock>,
    from: String,
    flows: Vec<String>,
}

impl Chat {
    /// Starts the runtime on an in-memory database, its clock at the system's time.
    pub async fn start(loaded: &Loaded, from: &str) -> Result<Self, ChatError> {
        Self::start_at(loaded, from, SystemClock.now()).await
    }

    /// [`Chat::start`] with the virtual clock at `at` (`chat --at`): a given weekday or
    /// hour to try, and a transcript that prints the same every time.
    pub async fn start_at(
        loaded: &Loaded,
        from: &str,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<Self, ChatError> {
        let clock = Arc::new(VirtualClock::new(at));
        let runtime = loaded.runtime("sqlite::memory:", clock.clone()).await?;
        // The customer's files live as long as the in-memory database.
        let runtime = runtime.with_media(Arc::new(loaded.memory_media()));
        Ok(Self {
            runtime,
            clock,
            from: from.to_string(),
            flows: loaded.project.flows.iter().map(|f| f.id.clone()).collect(),
        })
    }

    /// Who the customer is, the flows, and the commands.
    pub fn greeting(&self) -> String {
        format!(
            "flowgate chat: you are +{} on the sandbox channel. Flows: {}\n\
             Type a message, or /button ID, /list ID, /image PATH, /wait 25h, /state, /help, /quit.\n",
            self.from,
            self.flows.join(", ")
        )
    }

    /// Handles one line of the customer's.
    pub async fn input(&self, line: &str) -> Result<Reply, ChatError> {
        let text = match Input::parse(line) {
            Input::Empty => String::new(),
            Input::Quit => return Ok(Reply::Quit),
            Input::Message(content) => self.message(content).await?,
            Input::Wait(by) => self.wait(by).await?,
            Input::State => self.state().await?,
            Input::Resume(arg) => self.resume(arg).await?,
            Input::File { kind, arg } => self.file(kind, arg).await?,
            Input::Help => HELP.to_string(),
            Input::Reset => {
                self.runtime
                    .db
                    .reset_conversation(&self.runtime.default_channel, &self.from)
                    .await?;
                "  [reset] session and timers forgotten\n".to_string()
            }
            Input::BadForm => "  /form takes the form's answer as a JSON object: /form {\"day\": \"2026-12-24\", \"guests\": 2}\n".to_string(),
            Input::Unknown(c) => format!("  unknown command {c}: /help lists them\n"),
        };
        Ok(Reply::Print(text))
    }

    /// The customer's message, now: what the bot did with it.
    async fn message(&self, content: InboundContent) -> Result<String, ChatError> {
        let now = self.clock.now();
        let inbound = Inbound::sandbox(content, now, now);
        let report = self
            .runtime
            .inbound(
                &self.runtime.default_channel,
                &self.from,
                Some("You"),
                inbound,
            )
            .await?;
        Ok(render_report(&report))
    }

    /// `/image PATH [caption]` and its kin: the customer sends the file at PATH (relative
    /// to where `chat` runs), kept in memory as a download would be, and the flow told.
    async fn file(&self, kind: &'static str, arg: &str) -> Result<String, ChatError> {
        let (path, caption) = match arg.split_once(char::is_whitespace) {
            Some((path, caption)) => (path, Some(caption.trim()).filter(|c| !c.is_empty())),
            None => (arg, None),
        };
        if path.is_empty() {
            return Ok(format!(
                "  /{kind} takes a file's path (and a caption): /{kind} photo.jpg crushed corner\n"
            ));
        }
        // Its size first: a device or a huge file is not read into memory.
        match tokio::fs::metadata(path).await {
            Ok(m) if !m.is_file() => return Ok(format!("  {path} is not a file\n")),
            Ok(m) if m.len() > MAX_CHAT_FILE => {
                return Ok(format!(
                    "  {path} is larger than {} MiB: WhatsApp takes no file that large\n",
                    MAX_CHAT_FILE >> 20
                ));
            }
            Ok(_) => {}
            Err(e) => return Ok(format!("  cannot read {path}: {e}\n")),
        }
        let bytes = match tokio::fs::read(path).await {
            Ok(bytes) => bytes,
            Err(e) => return Ok(format!("  cannot read {path}: {e}\n")),
        };
        let file = crate::media::local::GivenFile {
            kind,
            name: path,
            bytes,
            caption,
        };
        let channel = &self.runtime.default_channel;
        let now = self.clock.now();
        let reports = crate::media::local::receive(
            &self.runtime,
            channel,
            &self.from,
            Some("You"),
            file,
            now,
        )
        .await?;
        Ok(reports.iter().map(render_report).collect())
    }

    /// `/resume [FLOW [STEP]]`: the agent hands the conversation back to the bot, at FLOW
    /// (and STEP), else where the handoff step goes on.
    async fn resume(&self, arg: &str) -> Result<String, ChatError> {
        let mut words = arg.split_whitespace();
        let (flow, step) = (words.next(), words.next());
        let report = self
            .runtime
            .end_handoff(&self.runtime.default_channel, &self.from, flow, step)
            .await?;
        if report.handled == Handled::NotInHandoff {
            return Ok(
                "  [resume] the conversation is not with a person: nothing to resume\n".into(),
            );
        }
        Ok(format!(
            "  [resume] the bot has the conversation again\n{}",
            render_report(&report)
        ))
    }

    /// `/wait 25h`: moves the clock, firing the timers due on the way.
    async fn wait(&self, by: &str) -> Result<String, ChatError> {
        let by: HumanDuration = match by.parse() {
            Ok(d) => d,
            Err(e) => return Ok(format!("  {e}\n")),
        };
        let clock = &self.clock;
        let mut out = String::new();
        for report in self
            .runtime
            .advance_clock(clock, clock.now() + by.0)
            .await?
        {
            out.push_str(&render_report(&report));
        }
        let _ = writeln!(
            out,
            "  [clock] {} later: {}",
            format_duration(by.0),
            clock.now().format("%Y-%m-%d %H:%M UTC")
        );
        Ok(out)
    }

    /// `/state`: the session, the contact and what the policy would allow now.
    async fn state(&self) -> Result<String, ChatError> {
        let runtime = &self.runtime;
        let now = self.clock.now();
        let c = runtime
            .db
            .load_conversation(&runtime.default_channel, &self.from)
            .await?;
        let mut out = String::new();
        let _ = match &c.session {
            Some(s) => writeln!(
                out,
                "  [state] flow {} (version {}) at step {}: {}",
                s.flow_id, s.flow_version, s.step, s.state
            ),
            None => writeln!(out, "  [state] no active session"),
        };
        let window = c
            .contact
            .last_customer_message_at
            .map(|t| format_duration(now - t) + " ago");
        let _ = writeln!(
            out,
            "  [contact] tags {:?}, attrs {:?}, last customer message {}",
            c.contact.tags,
            c.contact.attrs,
            window.unwrap_or_else(|| "never".into())
        );
        let p = &c.contact.policy;
        let _ = writeln!(
            out,
            "  [policy] {}; marketing {}{}",
            runtime.policy.window(&c.contact, now).describe(now),
            match &p.marketing_opt_out {
                Some(o) => format!("stopped ({})", o.source),
                None => "accepted".into(),
            },
            match p.free_entry_until {
                Some(t) if t > now => format!("; free entry point until {t}"),
                _ => String::new(),
            }
        );
        Ok(out)
    }
}

/// What the bot sent (with the policy's word on each), a handoff, and the engine's notes.
fn render_report(report: &TurnReport) -> String {
    let mut out = String::new();
    for m in &report.sent {
        let mut content = describe_content(&m.message.content);
        if m.message.quote.is_some() {
            content.push_str(" (quoting your message)");
        }
        let _ = if m.decision.sends() {
            writeln!(out, "bot> {content}")
        } else {
            writeln!(out, "bot [{}]> {content}", m.decision.name())
        };
        let _ = writeln!(out, "  [policy] {}", m.decision.explain());
    }
    if let Some(queue) = &report.handoff {
        let _ = writeln!(
            out,
            "  [handoff] the conversation is with a person now (queue {queue})"
        );
    }
    match report.handled {
        Handled::Unanswered if report.sent.is_empty() => {
            out.push_str("  [no flow answered this message]\n")
        }
        Handled::InHandoff => {
            out.push_str("  [handoff] a person has this conversation: the bot stays quiet\n")
        }
        _ => {}
    }
    for note in &report.notes {
        let _ = writeln!(out, "  [note] {note}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_messages_or_commands() {
        assert_eq!(Input::parse("  \n"), Input::Empty);
        assert_eq!(Input::parse("/exit\n"), Input::Quit);
        assert_eq!(Input::parse("/wait  25h\n"), Input::Wait("25h"));
        assert_eq!(Input::parse("/nope x"), Input::Unknown("/nope"));
        assert_eq!(Input::parse("/resume"), Input::Resume(""));
        assert_eq!(Input::parse("/resume menu ask"), Input::Resume("menu ask"));
        assert_eq!(
            Input::parse("/form {\"guests\": 2}"),
            Input::Message(InboundContent::FormReply {
                response: serde_json::from_str("{\"guests\": 2}").unwrap()
            })
        );
        assert_eq!(Input::parse("/form 2"), Input::BadForm);
        assert_eq!(Input::parse("/help"), Input::Help);
        assert_eq!(
            Input::parse("/image parcel.png crushed corner"),
            Input::File {
                kind: "image",
                arg: "parcel.png crushed corner"
            }
        );
        assert_eq!(
            Input::parse("/sticker smile.webp"),
            Input::File {
                kind: "sticker",
                arg: "smile.webp"
            }
        );
        assert_eq!(
            Input::parse("/button yes"),
            Input::Message(InboundContent::ButtonReply {
                id: "yes".into(),
                title: "yes".into()
            })
        );
        assert_eq!(
            Input::parse(" hi there \n"),
            Input::Message(InboundContent::text("hi there"))
        );
    }

    /// The text `line` printed.
    async fn said(chat: &Chat, line: &str) -> String {
        match chat.input(line).await.unwrap() {
            Reply::Print(text) => text,
            Reply::Quit => panic!("the chat ended at {line:?}"),
        }
    }

    #[tokio::test]
    async fn a_file_that_cannot_be_read_or_is_missing_is_explained() {
        let loaded = crate::app::load(None).expect("the shipped project loads");
        let chat = Chat::start(&loaded, "15550001234").await.unwrap();
        let missing = said(&chat, "/image no/such/photo.png").await;
        assert!(
            missing.contains("cannot read no/such/photo.png"),
            "{missing}"
        );
        let bare = said(&chat, "/document").await;
        assert!(bare.contains("/document takes a file's path"), "{bare}");
        assert!(said(&chat, "/help").await.contains("/image PATH [caption]"));
        assert!(said(&chat, "/nope").await.contains("/help lists them"));
    }

    #[tokio::test]
    async fn resume_gives_the_conversation_back_to_the_bot() {
        let loaded = crate::app::load(None).expect("the shipped project loads");
        let chat = Chat::start(&loaded, "15550001234").await.unwrap();
        assert!(said(&chat, "/resume").await.contains("not with a person"));
        for line in ["order", "abc", "1234567", "no idea"] {
            said(&chat, line).await;
        }
        assert!(said(&chat, "hello").await.contains("the bot stays quiet"));
        let resumed = said(&chat, "/resume order_status ask_order").await;
        assert!(
            resumed.contains("[resume] the bot has the conversation again"),
            "{resumed}"
        );
        assert!(resumed.contains("What's your order number?"), "{resumed}");
        assert!(said(&chat, "#123456").await.contains("Order 123456"));
    }
}
