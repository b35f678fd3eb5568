//! Contacts and conversations as lists through the admin API: contacts by tag, by name or
//! number and by window state (`GET /api/contacts`), one contact, its tags added and
//! removed; conversations by window and handoff state (`GET /api/conversations`). Lists
//! page by cursor (`after`, `limit`, the answer's `next_cursor`).
//!
//! The window is the policy's (`Policy::window`, which knows a window WhatsApp closed
//! early): the store narrows by the time the customer last wrote, the policy decides. A
//! page may therefore hold fewer than `limit` items while more follow: follow
//! `next_cursor` until it is null.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::admin::{contact_key, internal, known_channel};
use super::api::{
    Answer, ApiPath as Path, ApiQuery as Query, ErrorBody, Paging, next_cursor, ok, respond,
};
use super::{Refused, refused};
use crate::dispatch::Runtime;
use crate::engine::Waiting;
use crate::policy::Window;
use crate::state::AppState;
use crate::store::{ContactFilter, ContactSummary, SessionRow, TurnWrite};

/// The routes of this module, each with its documentation (see [`super::api`]).
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(contacts))
        .routes(routes!(contact))
        .routes(routes!(add_tags))
        .routes(routes!(remove_tag))
        .routes(routes!(conversations))
}

/// A contact's customer service window at the time of the answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct WindowView {
    /// `open`, `closed`, or `never` (the customer never wrote).
    pub state: String,
    /// When it closes (open) or closed (closed).
    pub at: Option<DateTime<Utc>>,
    /// Seconds until it closes, while open.
    pub closes_in_seconds: Option<i64>,
    /// The policy's sentence for it.
    pub describe: String,
}

impl WindowView {
    pub fn of(window: &Window, now: DateTime<Utc>) -> Self {
        let (state, at) = match window {
            Window::Never => ("never", None),
            Window::Open { closes_at } => ("open", Some(*closes_at)),
            Window::Closed { since, .. } => ("closed", Some(*since)),
        };
        Self {
            state: state.into(),
            at,
            closes_in_seconds: match window {
                Window::Open { closes_at } => Some((*closes_at - now).num_seconds().max(0)),
                _ => None,
            },
            describe: window.describe(now),
        }
    }
}

/// Which windows a list keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WindowFilter {
    /// Free-form messages may be sent now.
    Open,
    /// Closed, or the customer never wrote: only templates.
    Closed,
}

/// One contact.
#[derive(Debug, Serialize, ToSchema)]
pub struct ContactItem {
    id: i64,
    channel: String,
    /// Its phone number, else its BSUID: the identifier the other routes take.
    contact: String,
    name: Option<String>,
    tags: Vec<String>,
    #[schema(value_type = Object)]
    attrs: serde_json::Map<String, serde_json::Value>,
    timezone: Option<String>,
    window: WindowView,
    last_customer_message_at: Option<DateTime<Utc>>,
    last_message_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
}

impl ContactItem {
    fn of(runtime: &Runtime, channel: &str, s: ContactSummary, now: DateTime<Utc>) -> Self {
        let window = runtime.policy.window(&s.contact, now);
        let c = s.contact;
        Self {
            id: s.id,
            channel: channel.to_string(),
            contact: c.wa_id.to_string(),
            name: c.name,
            tags: c.tags.into_iter().collect(),
            attrs: c.attrs,
            timezone: c.timezone,
            window: WindowView::of(&window, now),
            last_customer_message_at: c.last_customer_message_at,
            last_message_at: s.last_message_at,
            created_at: s.created_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ContactPage {
    contacts: Vec<ContactItem>,
    /// Pass as `after` for the next page; null when there is none.
    next_cursor: Option<i64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ContactsQuery {
    /// The channel (default: the default channel).
    channel: Option<String>,
    /// Only contacts with this tag.
    tag: Option<String>,
    /// Only contacts whose number or name contains this text.
    search: Option<String>,
    /// Only contacts whose window is `open` or `closed`.
    #[param(inline)]
    window: Option<WindowFilter>,
    /// The previous page's `next_cursor`; none for the first page.
    after: Option<i64>,
    /// Contacts read per page, 1 to 500 (default 50).
    limit: Option<i64>,
}

/// Contacts by tag, name or number and window state, in the order they were created.
#[utoipa::path(get, path = "/contacts", tag = "contacts",
    params(ContactsQuery),
    responses(
        (status = 200, description = "A page of contacts", body = ContactPage),
        (status = 400, description = "`invalid_query` or `invalid_limit`", body = ErrorBody),
        (status = 404, description = "`unknown_channel`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn contacts(State(state): State<AppState>, Query(q): Query<ContactsQuery>) -> Response {
    respond(contact_list(&state.runtime, q).await)
}

pub(super) async fn contact_list(runtime: &Runtime, q: ContactsQuery) -> Answer<ContactPage> {
    let channel = known_channel(runtime, q.channel)?;
    let (after, limit) = Paging::new(q.after, q.limit).checked()?;
    let filter = ContactFilter {
        channel: channel.clone(),
        tag: q.tag,
        search: q.search.filter(|s| !s.trim().is_empty()),
        after,
        limit,
        ..ContactFilter::default()
    };
    let (rows, next_cursor) = page(runtime, filter, q.window).await?;
    let now = runtime.clock.now();
    ok(ContactPage {
        contacts: rows
            .into_iter()
            .map(|s| ContactItem::of(runtime, &channel, s, now))
            .collect(),
        next_cursor,
    })
}

/// A page by `filter`, kept to the contacts whose window is as `window` asks (the
/// policy's word), with the cursor after the rows read.
async fn page(
    runtime: &Runtime,
    mut filter: ContactFilter,
    window: Option<WindowFilter>,
) -> Result<(Vec<ContactSummary>, Option<i64>), Refused> {
    let now = runtime.clock.now();
    if window == Some(WindowFilter::Open) {
        let open_for = runtime.policy.window - runtime.policy.safety_margin;
        filter.wrote_since = Some(now - open_for);
    }
    let rows = runtime
        .db
        .contact_page(&filter)
        .await
        .map_err(|e| Box::new(internal("listing contacts failed", e)))?;
    let next = next_cursor(rows.len(), filter.limit, rows.last().map(|s| s.id));
    let kept = rows
        .into_iter()
        .filter(|s| match window {
            None => true,
            Some(wanted) => {
                let open = matches!(runtime.policy.window(&s.contact, now), Window::Open { .. });
                open == (wanted == WindowFilter::Open)
            }
        })
        .collect();
    Ok((kept, next))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ChannelParam {
    /// The channel (default: the default channel).
    channel: Option<String>,
}

/// One contact, by its phone number or BSUID (a current or an old one).
#[utoipa::path(get, path = "/contacts/{contact}", tag = "contacts",
    params(("contact" = String, Path, description = "The contact's phone number or BSUID"), ChannelParam),
    responses(
        (status = 200, description = "The contact", body = ContactItem),
        (status = 404, description = "`unknown_contact` or `unknown_channel`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn contact(
    State(state): State<AppState>,
    Path(contact): Path<String>,
    Query(q): Query<ChannelParam>,
) -> Response {
    respond(one_contact(&state.runtime, q.channel, contact).await)
}

async fn one_contact(
    runtime: &Runtime,
    channel: Option<String>,
    contact: String,
) -> Answer<ContactItem> {
    let channel = known_channel(runtime, channel)?;
    let key = contact_key(runtime, &channel, contact).await?;
    let conversation = runtime
        .db
        .load_conversation(&channel, &key)
        .await
        .map_err(|e| Box::new(internal("loading a contact failed", e)))?;
    let Some(id) = conversation.contact_id else {
        return Err(unknown_contact(&key, &channel));
    };
    let filter = ContactFilter {
        channel: channel.clone(),
        wa_id: Some(key.clone()),
        after: id - 1,
        limit: 1,
        ..ContactFilter::default()
    };
    let (mut rows, _) = page(runtime, filter, None).await?;
    let found = rows.pop().ok_or_else(|| unknown_contact(&key, &channel))?;
    ok(ContactItem::of(
        runtime,
        &channel,
        found,
        runtime.clock.now(),
    ))
}

fn unknown_contact(contact: &str, channel: &str) -> Refused {
    refused(
        StatusCode::NOT_FOUND,
        "unknown_contact",
        format!(
            "no contact `{contact}` on channel `{channel}`: contacts are created when they write, by an import or an agent's message"
        ),
    )
}

/// `POST /api/contacts/{contact}/tags`: the tags to add.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct AddTags {
    tags: Vec<String>,
    #[serde(default)]
    channel: Option<String>,
}

/// The longest tag taken.
const MAX_TAG: usize = 64;

/// Adds tags to a contact (those it has stay).
#[utoipa::path(post, path = "/contacts/{contact}/tags", tag = "contacts",
    params(("contact" = String, Path, description = "The contact's phone number or BSUID")),
    request_body(content = AddTags, description = "The tags to add"),
    responses(
        (status = 200, description = "The contact with its tags", body = ContactItem),
        (status = 400, description = "`invalid_body`", body = ErrorBody),
        (status = 404, description = "`unknown_contact` or `unknown_channel`", body = ErrorBody),
        (status = 422, description = "`invalid_tag`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn add_tags(
    State(state): State<AppState>,
    Path(contact): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    respond(add_contact_tags(&state.runtime, contact, &body).await)
}

pub(super) async fn add_contact_tags(
    runtime: &Runtime,
    contact: String,
    body: &[u8],
) -> Answer<ContactItem> {
    let request: AddTags = serde_json::from_slice(body).map_err(|e| {
        refused(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("the body must be {{\"tags\": [\"…\"]}}: {e}"),
        )
    })?;
    let tags = request
        .tags
        .iter()
        .map(|t| checked_tag(t))
        .collect::<Result<Vec<_>, _>>()?;
    change_tags(runtime, request.channel, contact, |set| set.extend(tags)).await
}

/// A tag as given, trimmed, if it is 1 to [`MAX_TAG`] characters without `;` (the CSV
/// import's separator).
fn checked_tag(tag: &str) -> Result<String, Refused> {
    let tag = tag.trim();
    if tag.is_empty() || tag.chars().count() > MAX_TAG || tag.contains(';') {
        return Err(refused(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_tag",
            format!("tag `{tag}` must be 1 to {MAX_TAG} characters, without `;`"),
        ));
    }
    Ok(tag.to_string())
}

/// Removes one tag from a contact (a tag it does not have changes nothing).
#[utoipa::path(delete, path = "/contacts/{contact}/tags/{tag}", tag = "contacts",
    params(
        ("contact" = String, Path, description = "The contact's phone number or BSUID"),
        ("tag" = String, Path, description = "The tag to remove"),
        ChannelParam,
    ),
    responses(
        (status = 200, description = "The contact with its tags", body = ContactItem),
        (status = 404, description = "`unknown_contact` or `unknown_channel`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn remove_tag(
    State(state): State<AppState>,
    Path((contact, tag)): Path<(String, String)>,
    Query(q): Query<ChannelParam>,
) -> Response {
    let runtime = &state.runtime;
    respond(change_tags(runtime, q.channel, contact, |set| set.retain(|t| *t != tag)).await)
}

/// Changes a known contact's tags under its lock (a turn writes the whole contact, so a
/// change beside one would be lost), keeping its session as it is.
async fn change_tags(
    runtime: &Runtime,
    channel: Option<String>,
    contact: String,
    change: impl FnOnce(&mut std::collections::BTreeSet<String>),
) -> Answer<ContactItem> {
    let channel = known_channel(runtime, channel)?;
    let key = contact_key(runtime, &channel, contact).await?;
    {
        let lock = runtime.lock(&channel, &key);
        let _guard = lock.lock().await;
        let failed = |e: crate::store::StoreError| Box::new(internal("changing tags failed", e));
        let conversation = runtime
            .db
            .load_conversation(&channel, &key)
            .await
            .map_err(failed)?;
        let Some(id) = conversation.contact_id else {
            return Err(unknown_contact(&key, &channel));
        };
        let mut contact = conversation.contact.clone();
        change(&mut contact.tags);
        if contact.tags != conversation.contact.tags {
            let write = TurnWrite {
                session: conversation.session.as_ref(),
                ..TurnWrite::new(&channel, Some(id), &contact, runtime.clock.now())
            };
            runtime.db.commit_turn(&write).await.map_err(failed)?;
        }
    }
    one_contact(runtime, Some(channel), key).await
}

/// A contact's place in a flow.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionView {
    flow: String,
    version: String,
    step: String,
    /// `reply`, `timer`, `http` or `handoff`.
    waiting: Option<String>,
    updated_at: DateTime<Utc>,
}

/// One conversation: who, their window, where they are in a flow and whether a person has
/// it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConversationItem {
    id: i64,
    channel: String,
    contact: String,
    name: Option<String>,
    window: WindowView,
    session: Option<SessionView>,
    /// The handoff queue, while the conversation is with a person.
    handoff: Option<String>,
    last_message_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConversationPage {
    conversations: Vec<ConversationItem>,
    next_cursor: Option<i64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ConversationsQuery {
    /// The channel (default: the default channel).
    channel: Option<String>,
    /// Only conversations whose window is `open` or `closed`.
    #[param(inline)]
    window: Option<WindowFilter>,
    /// `true`: only conversations with a person; `false`: only those with the bot.
    handoff: Option<bool>,
    /// The previous page's `next_cursor`; none for the first page.
    after: Option<i64>,
    /// Contacts read per page, 1 to 500 (default 50).
    limit: Option<i64>,
}

/// Conversations (contacts with messages) by window and handoff state.
#[utoipa::path(get, path = "/conversations", tag = "conversations",
    params(ConversationsQuery),
    responses(
        (status = 200, description = "A page of conversations", body = ConversationPage),
        (status = 400, description = "`invalid_query` or `invalid_limit`", body = ErrorBody),
        (status = 404, description = "`unknown_channel`", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn conversations(
    State(state): State<AppState>,
    Query(q): Query<ConversationsQuery>,
) -> Response {
    respond(conversation_list(&state.runtime, q).await)
}

pub(super) async fn conversation_list(
    runtime: &Runtime,
    q: ConversationsQuery,
) -> Answer<ConversationPage> {
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
            let waiting = s.session.as_ref().and_then(waiting);
            let handoff = match &waiting {
                Some(Waiting::Handoff { queue }) => Some(queue.clone()),
                _ => None,
            };
            ConversationItem {
                id: s.id,
                channel: channel.clone(),
                contact: s.contact.wa_id.to_string(),
                name: s.contact.name.clone(),
                window: WindowView::of(&window, now),
                session: s.session.map(|row| session_view(row, waiting.as_ref())),
                handoff,
                last_message_at: s.last_message_at,
            }
        })
        .filter(|c| q.handoff.is_none_or(|wanted| c.handoff.is_some() == wanted))
        .collect();
    ok(ConversationPage {
        conversations,
        next_cursor,
    })
}

/// What a stored session waits for (its state's `waiting`, as the engine writes it).
fn waiting(session: &SessionRow) -> Option<Waiting> {
    serde_json::from_value(session.state.get("waiting")?.clone()).ok()
}

fn session_view(row: SessionRow, waiting: Option<&Waiting>) -> SessionView {
    SessionView {
        flow: row.flow_id,
        version: row.flow_version,
        step: row.step,
        waiting: waiting.map(|w| {
            match w {
                Waiting::Reply => "reply",
                Waiting::Timer { .. } => "timer",
                Waiting::Http => "http",
                Waiting::Handoff { .. } => "handoff",
            }
            .to_string()
        }),
        updated_at: row.updated_at,
    }
}
