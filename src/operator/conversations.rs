//! Conversations: listed by window and handoff state; one read with its messages, each
//! with its decision and reason; an agent's message (through the policy, like every other
//! message); the end of a handoff. Both writes take an optional idempotency key: a request
//! retried with the key it was first sent with answers what the first one did instead of
//! doing it again.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::contacts::{WindowFilter, WindowView, page, unknown_contact};
use super::{OperatorError, Paging, contact_key, known_channel};
use crate::dispatch::Runtime;
use crate::domain::{Contact, OutboundContent, limits};
use crate::engine::{Handled, Waiting};
use crate::store::{ApiRequest, ContactFilter, SessionRow};

/// A contact's place in a flow.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionView {
    pub flow: String,
    pub version: String,
    pub step: String,
    /// `reply`, `timer`, `http` or `handoff`.
    pub waiting: Option<String>,
    pub updated_at: DateTime<Utc>,
}

impl SessionView {
    fn of(row: SessionRow) -> Self {
        let waiting = waiting(&row);
        Self {
            flow: row.flow_id,
            version: row.flow_version,
            step: row.step,
            waiting: waiting.map(|w| {
                match w {
                    Waiting::Reply => "reply",
                    Waiting::Timer { .. } => "timer",
                    Waiting::Http => "http",
                    Waiting::Handoff { .. } => "handoff",
                    Waiting::Media { .. } => "media",
                }
                .to_string()
            }),
            updated_at: row.updated_at,
        }
    }
}

/// What a stored session waits for (its state's `waiting`, as the engine writes it).
fn waiting(session: &SessionRow) -> Option<Waiting> {
    serde_json::from_value(session.state.get("waiting")?.clone()).ok()
}

/// The handoff queue of a session waiting for a person.
fn handoff(session: Option<&SessionRow>) -> Option<String> {
    match session.and_then(waiting) {
        Some(Waiting::Handoff { queue }) => Some(queue),
        _ => None,
    }
}

/// One conversation: who, their window, where they are in a flow and whether a person has
/// it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConversationItem {
    pub id: i64,
    pub channel: String,
    pub contact: String,
    pub name: Option<String>,
    pub window: WindowView,
    pub session: Option<SessionView>,
    /// The handoff queue, while the conversation is with a person.
    pub handoff: Option<String>,
    pub last_message_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConversationPage {
    pub conversations: Vec<ConversationItem>,
    /// Pass as `after` for the next page; null when there is none.
    pub next_cursor: Option<i64>,
}

/// Which conversations to list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConversationsQuery {
    /// The channel (default: the default channel).
    pub channel: Option<String>,
    /// Only conversations whose window is `open` or `closed`.
    #[param(inline)]
    pub window: Option<WindowFilter>,
    /// `true`: only conversations with a person; `false`: only those with the bot.
    pub handoff: Option<bool>,
    /// The previous page's `next_cursor`; none for the first page.
    pub after: Option<i64>,
    /// Contacts read per page, 1 to 500 (default 50).
    pub limit: Option<i64>,
}

/// Conversations (contacts with messages) by window and handoff state.
pub async fn list(
    runtime: &Runtime,
    q: ConversationsQuery,
) -> Result<ConversationPage, OperatorError> {
    let channel = known_channel(runtime, q.channel)?;
    let (after, limit) = Paging::new(q.after, q.limit).checked()?;
    let filter = ContactFilter {
        channel: channel.clone(),
        with_messages: true,
        after,
        limit,
        ..ContactFilter::default()
    };
    let (rows, next_cursor) = page(runtime, filter, q.window).await?;
    let now = runtime.clock.now();
    let conversations = rows
        .into_iter()
        .map(|s| {
            let window = runtime.policy.window(&s.contact, now);
            ConversationItem {
                id: s.id,
                channel: channel.clone(),
                contact: s.contact.wa_id.to_string(),
                name: s.contact.name.clone(),
                window: WindowView::of(&window, now),
                handoff: handoff(s.session.as_ref()),
                session: s.session.map(SessionView::of),
                last_message_at: s.last_message_at,
            }
        })
        .filter(|c| q.handoff.is_none_or(|wanted| c.handoff.is_some() == wanted))
        .collect();
    Ok(ConversationPage {
        conversations,
        next_cursor,
    })
}

/// One message of a conversation, with the policy's decision and its reason (outbound).
#[derive(Debug, Serialize, ToSchema)]
pub struct MessageView {
    pub id: i64,
    /// `in` or `out`.
    pub direction: String,
    pub wamid: Option<String>,
    pub kind: String,
    /// The message as stored (its content and, outbound, its origin).
    #[schema(value_type = Object)]
    pub body: Value,
    pub decision: Option<String>,
    pub reason: Option<String>,
    /// `received` for inbound messages; the delivery status for outbound ones.
    pub status: String,
    pub created_at: DateTime<Utc>,
    /// The file of a customer's image, document, audio, video or sticker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media: Option<MediaView>,
}

/// A customer's file: whether it was downloaded, and a link to it while it works.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MediaView {
    pub id: i64,
    pub kind: String,
    /// `pending` (being downloaded), `ok` or `failed`.
    pub status: String,
    /// Why it failed (`sha256_mismatch`, `too_large`, `download_failed: …`), or the last
    /// attempt's problem while it is retried.
    pub error: Option<String>,
    pub mime: Option<String>,
    pub size: Option<i64>,
    pub caption: Option<String>,
    pub filename: Option<String>,
    /// A signed link to the file that works for `media.url_ttl` (downloaded files only).
    pub url: Option<String>,
}

impl MediaView {
    fn of(row: crate::store::MediaRow, runtime: &Runtime, now: DateTime<Utc>) -> Self {
        let url = runtime
            .media
            .as_ref()
            .filter(|_| row.status == "ok")
            .map(|m| m.signer.url(row.id, now));
        Self {
            id: row.id,
            kind: row.kind,
            status: row.status,
            error: row.error,
            mime: row.mime,
            size: row.size,
            caption: row.caption,
            filename: row.filename,
            url,
        }
    }
}

/// One conversation with its latest messages.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConversationDetail {
    pub id: i64,
    pub channel: String,
    pub window: WindowView,
    #[schema(value_type = Object)]
    pub contact: Contact,
    pub session: Option<SessionView>,
    /// The handoff queue, while the conversation is with a person.
    pub handoff: Option<String>,
    /// The latest messages, oldest first.
    pub messages: Vec<MessageView>,
}

/// `contact`'s conversation on `channel` with its latest `limit` messages (1 to 500,
/// default 50).
pub async fn get(
    runtime: &Runtime,
    channel: Option<String>,
    contact: String,
    limit: Option<i64>,
) -> Result<ConversationDetail, OperatorError> {
    let channel = known_channel(runtime, channel)?;
    let (_, limit) = Paging::new(None, limit).checked()?;
    let contact = contact_key(runtime, &channel, contact).await?;
    let conversation = runtime
        .db
        .load_conversation(&channel, &contact)
        .await
        .map_err(OperatorError::failing("loading a conversation failed"))?;
    let Some(id) = conversation.contact_id else {
        return Err(unknown_contact(&contact, &channel));
    };
    let messages = runtime
        .db
        .messages(&channel, &contact, limit)
        .await
        .map_err(OperatorError::failing("loading messages failed"))?;
    let now = runtime.clock.now();
    let mut media: std::collections::HashMap<String, MediaView> = runtime
        .db
        .contact_media(id)
        .await
        .map_err(OperatorError::failing("loading media failed"))?
        .into_iter()
        .map(|row| (row.wamid.clone(), MediaView::of(row, runtime, now)))
        .collect();
    let window = runtime.policy.window(&conversation.contact, now);
    Ok(ConversationDetail {
        id,
        channel,
        window: WindowView::of(&window, now),
        contact: conversation.contact,
        handoff: handoff(conversation.session.as_ref()),
        session: conversation.session.map(SessionView::of),
        messages: messages
            .into_iter()
            .map(|m| MessageView {
                media: m
                    .wamid
                    .as_ref()
                    .filter(|_| m.direction == "in")
                    .and_then(|w| media.remove(w)),
                id: m.id,
                direction: m.direction,
                wamid: m.wamid,
                kind: m.kind,
                body: m.body,
                decision: m.decision,
                reason: m.reason,
                status: m.status,
                created_at: m.created_at,
            })
            .collect(),
    })
}

/// An agent's message: `{"text": "…"}` or `{"template": {"name", "language", "params"}}`,
/// optionally on a `channel`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentMessage {
    #[serde(default)]
    pub channel: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub template: Option<TemplateRequest>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateRequest {
    pub name: String,
    pub language: String,
    #[serde(default)]
    pub params: Vec<String>,
}

/// What became of an agent's message.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentReply {
    pub id: i64,
    /// `send`, `rewritten`, `queued` or `skipped`.
    pub decision: String,
    pub reason: String,
    /// The decision in a sentence, for people.
    pub explain: String,
    /// The message as decided (a rewrite's template).
    #[schema(value_type = Object)]
    pub message: Value,
    /// True when an `Idempotency-Key` seen before answered the message it created: nothing
    /// was sent again.
    pub replayed: bool,
}

/// Serializes the keyed writes (agents' messages, ends of handoffs): a retry racing its
/// first attempt waits for it and finds its key.
static KEYED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The scope of agents' messages' keys in `api_requests`.
const AGENT_MESSAGE_SCOPE: &str = "agent_message";
/// The scope of handoff ends' keys in `api_requests`.
const RESUME_SCOPE: &str = "resume";

/// The request seen before under `key` in `scope`, if any; refused when it was for
/// another subject than `subject`.
async fn seen(
    runtime: &Runtime,
    scope: &str,
    key: &str,
    subject: &str,
) -> Result<Option<ApiRequest>, OperatorError> {
    let seen = runtime
        .db
        .api_request(scope, key)
        .await
        .map_err(OperatorError::failing("reading an idempotency key failed"))?;
    match seen {
        Some(seen) if seen.subject != subject => Err(OperatorError::conflict(
            "idempotency_key_reused",
            format!(
                "`Idempotency-Key` {key} was used for {}: use a new key for each request",
                seen.subject
            ),
        )),
        seen => Ok(seen),
    }
}

async fn remember(
    runtime: &Runtime,
    scope: &str,
    key: &str,
    subject: String,
    message_id: i64,
) -> Result<(), OperatorError> {
    let request = ApiRequest {
        subject,
        message_id,
    };
    runtime
        .db
        .remember_api_request(scope, key, &request, runtime.clock.now())
        .await
        .map_err(OperatorError::failing(
            "remembering an idempotency key failed",
        ))
}

/// An agent's message to `contact`: checked, then decided by the policy like every other
/// message (sent, rewritten, queued, skipped). With `key` (already checked by
/// [`checked_key`](super::checked_key)), a key seen before for the same contact answers the
/// message it created (`replayed`), and one seen for another contact is refused.
pub async fn agent_message(
    runtime: &Runtime,
    contact: String,
    request: AgentMessage,
    key: Option<&str>,
) -> Result<AgentReply, OperatorError> {
    let channel = known_channel(runtime, request.channel)?;
    let content = match (request.text, request.template) {
        (Some(text), None) => text_content(text)?,
        (None, Some(template)) => template_content(runtime, template)?,
        _ => {
            return Err(OperatorError::unprocessable(
                "invalid_body",
                "give exactly one of `text` and `template`",
            ));
        }
    };
    let contact = contact_key(runtime, &channel, contact).await?;
    let Some(key) = key else {
        return send_agent_message(runtime, &channel, &contact, content).await;
    };
    let _one = KEYED.lock().await;
    let subject = format!("a message to {channel}/{contact}");
    if let Some(seen) = seen(runtime, AGENT_MESSAGE_SCOPE, key, &subject).await? {
        let m = runtime
            .db
            .message(seen.message_id)
            .await
            .map_err(OperatorError::failing("loading a message failed"))?
            .ok_or_else(|| OperatorError::failed("a keyed message is gone", seen.message_id))?;
        return Ok(AgentReply {
            id: m.id,
            decision: m.decision.unwrap_or_default(),
            explain: m.reason.clone().unwrap_or_default(),
            reason: m.reason.unwrap_or_default(),
            message: m.body,
            replayed: true,
        });
    }
    let reply = send_agent_message(runtime, &channel, &contact, content).await?;
    remember(runtime, AGENT_MESSAGE_SCOPE, key, subject, reply.id).await?;
    Ok(reply)
}

async fn send_agent_message(
    runtime: &Runtime,
    channel: &str,
    contact: &str,
    content: OutboundContent,
) -> Result<AgentReply, OperatorError> {
    let report = runtime
        .agent_message(channel, contact, content)
        .await
        .map_err(OperatorError::failing("an agent message failed"))?;
    let m = &report.sent[0];
    Ok(AgentReply {
        id: m.id,
        decision: m.decision.name().into(),
        reason: m.decision.reason().into(),
        explain: m.decision.explain(),
        message: serde_json::to_value(&m.message).map_err(OperatorError::failing(
            "an agent message does not serialize",
        ))?,
        replayed: false,
    })
}

/// An agent's text, if it is not empty and fits a WhatsApp text message.
pub fn text_content(text: String) -> Result<OutboundContent, OperatorError> {
    if text.trim().is_empty() || text.chars().count() > limits::TEXT_BODY {
        return Err(OperatorError::unprocessable(
            "invalid_text",
            format!("`text` must be 1 to {} characters", limits::TEXT_BODY),
        ));
    }
    Ok(OutboundContent::text(text))
}

/// An agent's template, if the registry has it and it is given all its parameters.
fn template_content(
    runtime: &Runtime,
    t: TemplateRequest,
) -> Result<OutboundContent, OperatorError> {
    let registry = runtime.templates();
    let Some(found) = registry.find(&t.name, &t.language) else {
        return Err(OperatorError::unprocessable(
            "unknown_template",
            format!(
                "template `{}` ({}) is not in the registry; run `flowgate templates sync` or add it to the templates file",
                t.name, t.language
            ),
        ));
    };
    if found.param_count() != t.params.len() {
        return Err(OperatorError::unprocessable(
            "template_params",
            format!(
                "template `{}` ({}) takes {} parameters, {} given",
                t.name,
                t.language,
                found.param_count(),
                t.params.len()
            ),
        ));
    }
    Ok(OutboundContent::Template {
        name: t.name,
        language: t.language,
        params: t.params,
    })
}

/// Where a handed-off conversation goes on: each optional (`step` needs `flow`); none
/// goes on where the handoff step does.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumeRequest {
    #[serde(default)]
    pub channel: Option<String>,
    #[serde(default)]
    pub flow: Option<String>,
    #[serde(default)]
    pub step: Option<String>,
}

/// A message a resume sent.
#[derive(Debug, Serialize, ToSchema)]
pub struct SentView {
    pub id: i64,
    pub decision: String,
    #[schema(value_type = Object)]
    pub message: Value,
}

/// What the end of a handoff did.
#[derive(Debug, Serialize, ToSchema)]
pub struct Resumed {
    /// How the turn went (`continued`, `started …`).
    pub handled: String,
    /// Where the conversation is now.
    pub session: Option<SessionView>,
    pub sent: Vec<SentView>,
    pub notes: Vec<String>,
    /// True when an `Idempotency-Key` seen before answered: the handoff had already ended
    /// by that request, nothing was done again (`sent` is then empty).
    pub replayed: bool,
}

/// Gives a handed-off conversation back to the bot: at the flow (and step) given, else
/// where the handoff step goes on (its `next`; none ends the session). Refused
/// (`not_in_handoff`) when the conversation is not with a person. With `key`, a repeat of
/// the same request answers `replayed` instead of being refused.
pub async fn end_handoff(
    runtime: &Runtime,
    contact: String,
    request: ResumeRequest,
    key: Option<&str>,
) -> Result<Resumed, OperatorError> {
    let channel = known_channel(runtime, request.channel)?;
    resume_target(runtime, request.flow.as_deref(), request.step.as_deref())?;
    let contact = contact_key(runtime, &channel, contact).await?;
    let subject = format!("the end of the handoff of {channel}/{contact}");
    let _one = match key {
        Some(_) => Some(KEYED.lock().await),
        None => None,
    };
    if let Some(key) = key
        && seen(runtime, RESUME_SCOPE, key, &subject).await?.is_some()
    {
        return Ok(Resumed {
            handled: "replayed".into(),
            session: session_of(runtime, &channel, &contact).await?,
            sent: Vec::new(),
            notes: Vec::new(),
            replayed: true,
        });
    }
    let report = runtime
        .end_handoff(
            &channel,
            &contact,
            request.flow.as_deref(),
            request.step.as_deref(),
        )
        .await
        .map_err(OperatorError::failing("resuming a conversation failed"))?;
    if report.handled == Handled::NotInHandoff {
        return Err(OperatorError::conflict(
            "not_in_handoff",
            format!(
                "the conversation with `{contact}` on `{channel}` is not with a person: there is nothing to resume"
            ),
        ));
    }
    if let Some(key) = key {
        // The first message the resume sent, or 0 when it sent none: a replay answers
        // from the conversation as it is, not from this id.
        let first = report.sent.first().map_or(0, |m| m.id);
        remember(runtime, RESUME_SCOPE, key, subject, first).await?;
    }
    Ok(Resumed {
        handled: report.handled.to_string(),
        session: session_of(runtime, &channel, &contact).await?,
        sent: report
            .sent
            .iter()
            .map(|m| SentView {
                id: m.id,
                decision: m.decision.name().into(),
                message: serde_json::to_value(&m.message).unwrap_or(Value::Null),
            })
            .collect(),
        notes: report.notes,
        replayed: false,
    })
}

async fn session_of(
    runtime: &Runtime,
    channel: &str,
    contact: &str,
) -> Result<Option<SessionView>, OperatorError> {
    let conversation = runtime
        .db
        .load_conversation(channel, contact)
        .await
        .map_err(OperatorError::failing("loading a conversation failed"))?;
    Ok(conversation.session.map(SessionView::of))
}

/// A resume's flow and step, if the current flows have them (`step` needs `flow`).
fn resume_target(
    runtime: &Runtime,
    flow: Option<&str>,
    step: Option<&str>,
) -> Result<(), OperatorError> {
    let unknown = |message: String| OperatorError::unprocessable("unknown_target", message);
    let flows = runtime.flows.read().expect("flows lock");
    match (flow, step) {
        (None, None) => Ok(()),
        (None, Some(_)) => Err(unknown("`step` needs the `flow` it is in".into())),
        (Some(flow), step) => {
            let Some(found) = flows.get(flow) else {
                let ids: Vec<&str> = flows.current().iter().map(|f| f.id.as_str()).collect();
                return Err(unknown(format!(
                    "there is no flow `{flow}`; the flows are: {}",
                    ids.join(", ")
                )));
            };
            match step {
                Some(step) if found.step_index(step).is_none() => {
                    Err(unknown(format!("flow `{flow}` has no step `{step}`")))
                }
                _ => Ok(()),
            }
        }
    }
}
