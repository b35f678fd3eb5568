//! Channels through the admin API: each with its state and its outbox and queue depth
//! (`GET /api/channels`), and an operator's resume of a stopped channel
//! (`POST /api/channels/{name}/resume`). Thin over [`crate::operator::channels`].

use axum::extract::State;
use axum::response::Response;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::api::{ApiPath as Path, ErrorBody, answer_ok};
use crate::operator::channels::{self, ChannelItem, ChannelList};
use crate::state::AppState;

/// The routes of this module, each with its documentation (see [`super::api`]).
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_channels))
        .routes(routes!(resume_channel))
}

/// Every configured channel with its state and depths.
#[utoipa::path(get, path = "/channels", tag = "channels",
    responses(
        (status = 200, description = "The channels", body = ChannelList),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn list_channels(State(state): State<AppState>) -> Response {
    answer_ok(channels::list(&state.runtime).await)
}

/// Lets a channel an account-level error stopped send again (its campaigns stay paused).
#[utoipa::path(post, path = "/channels/{name}/resume", tag = "channels",
    params(("name" = String, Path, description = "The channel's name")),
    responses(
        (status = 200, description = "The channel, sending again", body = ChannelItem),
        (status = 404, description = "`unknown_channel`", body = ErrorBody),
        (status = 409, description = "`not_stopped`: the channel is sending", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn resume_channel(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    answer_ok(channels::resume(&state.runtime, name).await)
}
