//! SQL helpers shared by the aggregates: `$n` placeholders and their binding on a raw SQLite
//! handle, and the conversions every aggregate reads and writes with. A leaf: it imports
//! nothing of the store but [`StoreError`].

use chrono::{DateTime, Utc};

use super::error::StoreError;
use crate::domain::OutboundContent;

/// The message-log `kind` of an outgoing message: its content variant.
pub(super) fn outbound_kind(content: &OutboundContent) -> &'static str {
    match content {
        OutboundContent::Text { .. } => "text",
        OutboundContent::Buttons { .. } => "buttons",
        OutboundContent::List { .. } => "list",
        OutboundContent::Media { .. } => "media",
        OutboundContent::Template { .. } => "template",
        OutboundContent::Location { .. } => "location",
        OutboundContent::Contacts { .. } => "contacts",
        OutboundContent::Reaction { .. } => "reaction",
        OutboundContent::Form { .. } => "form",
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
    args: &[impl rusqlite::ToSql],
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

/// Implements `sqlx::FromRow` for `$ty` on every backend's row type, with one body: `$row`
/// is the backend's row there, so `$row.try_get(i)` decodes as that backend does. For rows
/// wider than the tuples sqlx decodes.
macro_rules! from_row_on_every_backend {
    ($ty:ty, |$row:ident| $body:expr) => {
        impl<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> for $ty {
            fn from_row($row: &'r sqlx::sqlite::SqliteRow) -> Result<Self, sqlx::Error> {
                #[allow(unused_imports)]
                use sqlx::Row as _;
                $body
            }
        }
        impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for $ty {
            fn from_row($row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
                #[allow(unused_imports)]
                use sqlx::Row as _;
                $body
            }
        }
    };
}
pub(super) use from_row_on_every_backend;

/// The elements of the JSON array of text in `column`, as a table `t (value)` to select
/// from, in the backend's SQL (contacts' `tags`).
pub(super) fn json_elements(column: &str, postgres: bool) -> String {
    if postgres {
        format!("json_array_elements_text(CAST({column} AS json)) AS t (value)")
    } else {
        format!("json_each({column}) t")
    }
}

/// `column`, marked on SQLite (`+column`) so that its index is not used and the walk goes
/// in primary-key order; PostgreSQL picks that order by itself (and has no unary `+` on
/// text).
pub(super) fn no_index(column: &str, postgres: bool) -> String {
    if postgres {
        column.to_string()
    } else {
        format!("+{column}")
    }
}
