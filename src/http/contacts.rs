//! Contacts and conversations as lists through the admin API: contacts by tag, by name or
//! number and by window state (`GET /api/contacts`), one contact, its tags added and
//! removed; conversations by window and handoff state (`GET /api/conversations`). The
//! handlers are thin over [`crate::operator::contacts`] and
//! [`crate::operator::conversations`].

use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::api::{ApiBody, ApiPath as Path, ApiQuery as Query, ErrorBody, answer_ok, json_body};
use crate::operator::contacts::{self, ContactItem, ContactPage, ContactsQuery};
use crate::operator::conversations::{self, ConversationPage, ConversationsQuery};
use crate::state::AppState;

/// The routes of this module, each with its documentation (see [`super::api`]).
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_contacts))
        .routes(routes!(contact))
        .routes(routes!(add_tags))
        .routes(routes!(remove_tag))
        .routes(routes!(list_conversations))
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
async fn list_contacts(State(state): State<AppState>, Query(q): Query<ContactsQuery>) -> Response {
    answer_ok(contacts::list(&state.runtime, q).await)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ChannelParam {
    /// The channel (default: the default channel).
    pub(super) channel: Option<String>,
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
    answer_ok(contacts::get(&state.runtime, q.channel, contact).await)
}

/// `POST /api/contacts/{contact}/tags`: the tags to add.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct AddTags {
    tags: Vec<String>,
    #[serde(default)]
    channel: Option<String>,
}

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
    ApiBody(body): ApiBody,
) -> Response {
    let request: AddTags = match json_body(&body, "{\"tags\": [\"…\"]}") {
        Ok(request) => request,
        Err(refused) => return *refused,
    };
    answer_ok(contacts::add_tags(&state.runtime, request.channel, contact, &request.tags).await)
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
    answer_ok(contacts::remove_tag(&state.runtime, q.channel, contact, &tag).await)
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
async fn list_conversations(
    State(state): State<AppState>,
    Query(q): Query<ConversationsQuery>,
) -> Response {
    answer_ok(conversations::list(&state.runtime, q).await)
}
