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
