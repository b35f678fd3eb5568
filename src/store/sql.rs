//! SQL shared by the aggregates: the two macros that run a portable query on the backend a
//! [`Db`](super::Db) holds, `$n` placeholders and their binding on a raw SQLite handle, and
//! the conversions every aggregate reads and writes with. A leaf: it imports nothing of the
//! store but [`StoreError`].

use chrono::{DateTime, Utc};
use rusqlite::types::Value;

use super::error::StoreError;
use crate::domain::OutboundContent;

/// Runs `$body` with `$pool` bound to the reading pool of the backend `$db` holds.
///
/// The SQL of the operations that use it is portable (`$n` placeholders, `ON CONFLICT`,
/// `RETURNING`, times as unix milliseconds, JSON as text): a new backend adds its arm here
/// (making this a `match`, with `$body` written once for both pools) and every such
/// operation runs on it.
macro_rules! with_pool {
    ($db:expr, |$pool:ident| $body:expr) => {{
        let $crate::store::db::Backend::Sqlite(sqlite) = &$db.backend;
        let $pool = &sqlite.pool;
        $body
    }};
}
pub(super) use with_pool;

/// [`with_pool!`] for statements that write: on SQLite, a job on the writer connection.
///
/// The SQLite body runs on the writer's thread (see [`super::writer`]), so it owns what it
/// uses: list the borrowed values it reads in `own(…)`, and the body works on owned copies
/// (`ToOwned`: a `&str` becomes a `String`, a slice a `Vec`) under the same names. Values
/// already owned move in as they are. A backend with a pool of writers runs `$body` on it.
macro_rules! with_writer {
    ($db:expr, |$pool:ident| $body:expr) => {
        $crate::store::sql::with_writer!($db, own(), |$pool| $body)
    };
    ($db:expr, own($($owned:ident),*), |$pool:ident| $body:expr) => {{
        let $crate::store::db::Backend::Sqlite(sqlite) = &$db.backend;
        $(let $owned = ::std::borrow::ToOwned::to_owned(&*$owned);)*
        sqlite
            .writer
            .run(move |$pool| Box::pin(async move { Ok($body) }))
            .await?
    }};
}
pub(super) use with_writer;

/// The message-log `kind` of an outgoing message: its content variant.
pub(super) fn outbound_kind(content: &OutboundContent) -> &'static str {
    match content {
        OutboundContent::Text { .. } => "text",
        OutboundContent::Buttons { .. } => "buttons",
        OutboundContent::List { .. } => "list",
        OutboundContent::Media { .. } => "media",
        OutboundContent::Template { .. } => "template",
    }
}

/// `$first, $first+1, …` for `n` values.
pub(super) fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads a stored millisecond timestamp; `column` names it in the error.
pub(super) fn from_millis(ms: i64, column: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| StoreError::Corrupt(format!("{column} holds {ms}, which is not a time")))
}

/// Binds a statement's `$n` parameters to `args[n - 1]`. SQLite numbers named parameters
/// in the order they first appear, so `$n` is found by its name, not its position.
pub(super) fn bind_numbered(
    statement: &mut rusqlite::Statement<'_>,
    args: &[Value],
) -> Result<(), StoreError> {
    for index in 1..=statement.parameter_count() {
        let value = statement
            .parameter_name(index)
            .and_then(|name| name.strip_prefix('$'))
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|n| args.get(n.checked_sub(1)?))
            .ok_or_else(|| {
                rusqlite::Error::InvalidParameterName(
                    statement.parameter_name(index).unwrap_or("?").to_string(),
                )
            })?;
        statement.raw_bind_parameter(index, value)?;
    }
    Ok(())
}
