//! Live updates by server-sent events: a page's moving part (the conversations table, a
//! conversation's messages, a run's progress and report) rendered again after database
//! writes and sent as an `update` event when it changed; the page's script puts the HTML in
//! place. Nothing polls: the stream waits on the store's write counter
//! ([`crate::store::Db::changes`]), renders at most every [`COALESCE`], and ends when the
//! server starts to stop.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, RawQuery, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::Stream;
use serde::Deserialize;

use super::conversations::conversation_view;
use super::{campaigns, conversations};
use crate::state::AppState;

/// Writes come in bursts (a campaign's sends, a turn's messages): one render per burst.
pub const COALESCE: Duration = Duration::from_millis(250);

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/live/conversations", get(conversations_list))
        .route("/live/conversations/{contact}", get(conversation))
        .route("/live/campaigns/{name}/runs/{id}", get(run))
}

async fn conversations_list(State(state): State<AppState>, RawQuery(q): RawQuery) -> Response {
    let query = q.unwrap_or_default();
    let shared = state.clone();
    updates(&state, move || {
        let (state, query) = (shared.clone(), query.clone());
        async move {
            conversations::list_fragment(&state, &query)
                .await
                .ok()
                .map(|m| m.into_string())
        }
    })
}

#[derive(Debug, Default, Deserialize)]
struct ChannelQuery {
    #[serde(default)]
    channel: Option<String>,
}

async fn conversation(
    State(state): State<AppState>,
    Path(contact): Path<String>,
    Query(q): Query<ChannelQuery>,
) -> Response {
    let runtime = state.runtime.clone();
    let channel = super::channel(&state, q.channel);
    updates(&state, move || {
        let (runtime, channel, contact) = (runtime.clone(), Some(channel.clone()), contact.clone());
        async move {
            let view = conversation_view(&runtime, channel, contact, None)
                .await
                .ok()?;
            Some(conversations::messages(&view["messages"]).into_string())
        }
    })
}

async fn run(State(state): State<AppState>, Path((name, id)): Path<(String, i64)>) -> Response {
    let shared = state.clone();
    updates(&state, move || {
        let (state, name) = (shared.clone(), name.clone());
        async move {
            campaigns::run_fragment(&state, &name, id)
                .await
                .ok()
                .map(|m| m.into_string())
        }
    })
}

/// The event stream of `render`'s HTML: once at once, then after each burst of writes
/// that changed it. A render that fails (`None`) sends nothing and waits for the next write.
fn updates<F, Fut>(state: &AppState, render: F) -> Response
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Option<String>> + Send + 'static,
{
    let stream = stream(state.runtime.db.changes(), state.closing.clone(), render);
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn stream<F, Fut>(
    changes: tokio::sync::watch::Receiver<u64>,
    closing: tokio::sync::watch::Receiver<bool>,
    render: F,
) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Option<String>> + Send + 'static,
{
    struct Live<F> {
        changes: tokio::sync::watch::Receiver<u64>,
        closing: tokio::sync::watch::Receiver<bool>,
        render: F,
        last: Option<String>,
        started: bool,
    }
    let live = Live {
        changes,
        closing,
        render,
        last: None,
        started: false,
    };
    futures_util::stream::unfold(live, |mut live| async move {
        loop {
            if *live.closing.borrow() {
                return None;
            }
            if live.started {
                tokio::select! {
                    changed = live.changes.changed() => changed.ok()?,
                    _ = live.closing.changed() => return None,
                }
                tokio::time::sleep(COALESCE).await;
            }
            live.started = true;
            live.changes.borrow_and_update();
            let Some(html) = (live.render)().await else {
                continue;
            };
            if live.last.as_ref() != Some(&html) {
                live.last = Some(html.clone());
                let event = Event::default().event("update").data(html);
                return Some((Ok(event), live));
            }
        }
    })
}
