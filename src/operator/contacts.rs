//! Contacts: listed by tag, by name or number and by window state, one read, tags added and
//! removed. Lists page by cursor.
//!
//! The window is the policy's (`Policy::window`, which knows a window WhatsApp closed
//! early): the store narrows by the time the customer last wrote, the policy decides. A
//! page may therefore hold fewer than `limit` items while more follow: follow
//! `next_cursor` until it is null.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{OperatorError, Paging, contact_key, known_channel, next_cursor, seconds_until};
use crate::dispatch::Runtime;
use crate::policy::Window;
use crate::store::{ContactFilter, ContactSummary, TurnWrite};

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
                Window::Open { closes_at } => Some(seconds_until(*closes_at, now)),
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
    pub id: i64,
    pub channel: String,
    /// Its phone number, else its BSUID: the identifier the other routes take.
    pub contact: String,
    pub name: Option<String>,
    pub tags: Vec<String>,
    #[schema(value_type = Object)]
    pub attrs: serde_json::Map<String, serde_json::Value>,
    pub timezone: Option<String>,
    pub window: WindowView,
    pub last_customer_message_at: Option<DateTime<Utc>>,
    pub last_message_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
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
    pub contacts: Vec<ContactItem>,
    /// Pass as `after` for the next page; null when there is none.
    pub next_cursor: Option<i64>,
}

/// Which contacts to list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ContactsQuery {
    /// The channel (default: the default channel).
    pub channel: Option<String>,
    /// Only contacts with this tag.
    pub tag: Option<String>,
    /// Only contacts whose number or name contains this text.
    pub search: Option<String>,
    /// Only contacts whose window is `open` or `closed`.
    #[param(inline)]
    pub window: Option<WindowFilter>,
    /// The previous page's `next_cursor`; none for the first page.
    pub after: Option<i64>,
    /// Contacts read per page, 1 to 500 (default 50).
    pub limit: Option<i64>,
}

/// Contacts by tag, name or number and window state, in the order they were created.
pub async fn list(runtime: &Runtime, q: ContactsQuery) -> Result<ContactPage, OperatorError> {
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
    Ok(ContactPage {
        contacts: rows
            .into_iter()
            .map(|s| ContactItem::of(runtime, &channel, s, now))
            .collect(),
        next_cursor,
    })
}

/// A page by `filter`, kept to the contacts whose window is as `window` asks (the
/// policy's word), with the cursor after the rows read.
pub(super) async fn page(
    runtime: &Runtime,
    mut filter: ContactFilter,
    window: Option<WindowFilter>,
) -> Result<(Vec<ContactSummary>, Option<i64>), OperatorError> {
    let now = runtime.clock.now();
    if window == Some(WindowFilter::Open) {
        let open_for = runtime.policy.window - runtime.policy.safety_margin;
        filter.wrote_since = Some(now - open_for);
    }
    let rows = runtime
        .db
        .contact_page(&filter)
        .await
        .map_err(OperatorError::failing("listing contacts failed"))?;
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

/// One contact, by its phone number or BSUID (a current or an old one).
pub async fn get(
    runtime: &Runtime,
    channel: Option<String>,
    contact: String,
) -> Result<ContactItem, OperatorError> {
    let channel = known_channel(runtime, channel)?;
    let key = contact_key(runtime, &channel, contact).await?;
    let conversation = runtime
        .db
        .load_conversation(&channel, &key)
        .await
        .map_err(OperatorError::failing("loading a contact failed"))?;
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
    Ok(ContactItem::of(
        runtime,
        &channel,
        found,
        runtime.clock.now(),
    ))
}

pub(super) fn unknown_contact(contact: &str, channel: &str) -> OperatorError {
    OperatorError::not_found(
        "unknown_contact",
        format!(
            "no contact `{contact}` on channel `{channel}`: contacts are created when they write, by an import or an agent's message"
        ),
    )
}

/// The longest tag taken.
pub const MAX_TAG: usize = 64;

/// Adds `tags` to a contact (those it has stay); each is trimmed and checked first, so a
/// bad one changes nothing.
pub async fn add_tags(
    runtime: &Runtime,
    channel: Option<String>,
    contact: String,
    tags: &[String],
) -> Result<ContactItem, OperatorError> {
    let tags = tags
        .iter()
        .map(|t| checked_tag(t))
        .collect::<Result<Vec<_>, _>>()?;
    change_tags(runtime, channel, contact, |set| set.extend(tags)).await
}

/// Removes `tag` from a contact (a tag it does not have changes nothing).
pub async fn remove_tag(
    runtime: &Runtime,
    channel: Option<String>,
    contact: String,
    tag: &str,
) -> Result<ContactItem, OperatorError> {
    change_tags(runtime, channel, contact, |set| set.retain(|t| t != tag)).await
}

/// A tag as given, trimmed, if it is 1 to [`MAX_TAG`] characters without `;` (the CSV
/// import's separator).
fn checked_tag(tag: &str) -> Result<String, OperatorError> {
    let tag = tag.trim();
    if tag.is_empty() || tag.chars().count() > MAX_TAG || tag.contains(';') {
        return Err(OperatorError::unprocessable(
            "invalid_tag",
            format!("tag `{tag}` must be 1 to {MAX_TAG} characters, without `;`"),
        ));
    }
    Ok(tag.to_string())
}

/// Changes a known contact's tags under its lock (a turn writes the whole contact, so a
/// change beside one would be lost), keeping its session as it is.
async fn change_tags(
    runtime: &Runtime,
    channel: Option<String>,
    contact: String,
    change: impl FnOnce(&mut BTreeSet<String>),
) -> Result<ContactItem, OperatorError> {
    let channel = known_channel(runtime, channel)?;
    let key = contact_key(runtime, &channel, contact).await?;
    {
        let lock = runtime.lock(&channel, &key);
        let _guard = lock.lock().await;
        let failed = OperatorError::failing::<crate::store::StoreError>;
        let conversation = runtime
            .db
            .load_conversation(&channel, &key)
            .await
            .map_err(failed("changing tags failed"))?;
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
            runtime
                .db
                .commit_turn(&write)
                .await
                .map_err(failed("changing tags failed"))?;
        }
    }
    get(runtime, Some(channel), key).await
}
