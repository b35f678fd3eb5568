//! What an operator does to a running server, for the admin API and the web console alike:
//! lists and reads (contacts, conversations, the outbox and queue, channels, flows with
//! their validation state) and acts (tags, agents' messages with an idempotency key, the
//! end of a handoff, a queued message retried or cancelled, a channel resumed, templates
//! synced). Each is a function over the [`Runtime`] (or the [`AppState`]) returning a
//! value or an [`OperatorError`], never an HTTP answer: `http` maps them to JSON with
//! status codes, and any other front end calls the same functions.
//!

pub mod campaigns;
pub mod channels;
pub mod contacts;
pub mod conversations;
pub mod flows;
pub mod outbox;
pub mod templates;

use std::fmt::Display;

use chrono::{DateTime, Utc};

use crate::dispatch::Runtime;
use crate::store::Identifiers;

/// Why an operator's request was not done: refused (with a stable `code` and a sentence
/// saying what is wrong and what to do), or failed on our side.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("{message}")]
    Refused {
        kind: Refusal,
        /// Stable, for programs: `unknown_contact`, `invalid_limit`, `not_queued`, …
        code: &'static str,
        message: String,
    },
    /// Refused for the problems a project's files or a definition have (422):
    /// `diagnostics` shows them (the text `flowgate check` prints, or each with its place).
    #[error("{message}")]
    Diagnosed {
        code: &'static str,
        message: String,
        diagnostics: serde_json::Value,
    },
    /// A failure of ours (the database): `what` was being done; the detail is for the log.
    #[error("{what}: {detail}")]
    Failed { what: &'static str, detail: String },
}

/// The kinds of refusal (the API answers them 400, 422, 404 and 409).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The request is malformed (a query, a header).
    Invalid,
    /// The request is well formed but cannot be done as asked (an empty tag, a template
    /// that is not in the registry).
    Unprocessable,
    /// What it names does not exist.
    NotFound,
    /// It conflicts with the state (the message is not queued any more).
    Conflict,
    /// WhatsApp's Graph API refused or did not answer (the API answers 502).
    Upstream,
}

impl OperatorError {
    pub fn refused(kind: Refusal, code: &'static str, message: impl Into<String>) -> Self {
        Self::Refused {
            kind,
            code,
            message: message.into(),
        }
    }

    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::refused(Refusal::Invalid, code, message)
    }

    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::refused(Refusal::Unprocessable, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::refused(Refusal::NotFound, code, message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::refused(Refusal::Conflict, code, message)
    }

    /// A failure of ours while doing `what`.
    pub fn failed(what: &'static str, detail: impl Display) -> Self {
        Self::Failed {
            what,
            detail: detail.to_string(),
        }
    }

    /// `failed(what, _)` as a closure, for `map_err`.
    pub fn failing<E: Display>(what: &'static str) -> impl FnOnce(E) -> Self {
        move |e| Self::failed(what, e)
    }
}

/// The paging of every list: `after` (the previous page's `next_cursor`) and `limit`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Paging {
    pub after: Option<i64>,
    pub limit: Option<i64>,
}

/// A list's page size when none is asked for, and the largest taken.
pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 500;

impl Paging {
    pub fn new(after: Option<i64>, limit: Option<i64>) -> Self {
        Self { after, limit }
    }

    /// The cursor to start after and the page size, checked.
    pub fn checked(&self) -> Result<(i64, i64), OperatorError> {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(OperatorError::invalid(
                "invalid_limit",
                format!("`limit` must be 1 to {MAX_LIMIT}, got {limit}"),
            ));
        }
        Ok((self.after.unwrap_or(0).max(0), limit))
    }
}

/// The cursor after a page that read `read` rows of at most `limit`, the last with id
/// `last`: `None` when the page was not full (nothing more to read).
pub fn next_cursor(read: usize, limit: i64, last: Option<i64>) -> Option<i64> {
    (read as i64 >= limit).then_some(last).flatten()
}

/// The channel a request names (the default channel when it names none), if it exists.
pub fn known_channel(runtime: &Runtime, channel: Option<String>) -> Result<String, OperatorError> {
    let channel = channel.unwrap_or_else(|| runtime.default_channel.clone());
    if !runtime.channels.iter().any(|c| c.name == channel) {
        let names: Vec<&str> = runtime.channels.iter().map(|c| c.name.as_str()).collect();
        return Err(OperatorError::not_found(
            "unknown_channel",
            format!(
                "there is no channel `{channel}`; the channels are: {}",
                names.join(", ")
            ),
        ));
    }
    Ok(channel)
}

/// The key of the contact an operator names by phone or by BSUID (a current or an old
/// one); a contact never seen keeps the identifier given.
pub async fn contact_key(
    runtime: &Runtime,
    channel: &str,
    identifier: String,
) -> Result<String, OperatorError> {
    let ids = Identifiers::of(&identifier);
    let resolved = runtime
        .db
        .resolve_contact(channel, ids, runtime.clock.now())
        .await
        .map_err(OperatorError::failing("finding a contact failed"))?;
    Ok(resolved.map_or(identifier, |r| r.key))
}

/// An idempotency key as a request gives it: 1 to 255 visible ASCII characters.
pub fn checked_key(key: &str) -> Result<String, OperatorError> {
    let key = key.trim();
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(OperatorError::invalid(
            "invalid_idempotency_key",
            "`Idempotency-Key` must be 1 to 255 visible ASCII characters (a UUID is a good key)",
        ));
    }
    Ok(key.to_string())
}

/// Seconds from `now` to `at`, never below 0.
fn seconds_until(at: DateTime<Utc>, now: DateTime<Utc>) -> i64 {
    (at - now).num_seconds().max(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(e: OperatorError) -> &'static str {
        match e {
            OperatorError::Refused { code, .. } | OperatorError::Diagnosed { code, .. } => code,
            OperatorError::Failed { .. } => "failed",
        }
    }

    #[test]
    fn paging_defaults_and_refuses_a_limit_out_of_range() {
        assert_eq!(Paging::default().checked().unwrap(), (0, DEFAULT_LIMIT));
        assert_eq!(Paging::new(Some(-5), Some(1)).checked().unwrap(), (0, 1));
        assert_eq!(
            Paging::new(Some(7), Some(MAX_LIMIT)).checked().unwrap(),
            (7, MAX_LIMIT)
        );
        for limit in [0, -1, MAX_LIMIT + 1] {
            let refused = Paging::new(None, Some(limit)).checked().unwrap_err();
            assert_eq!(code(refused), "invalid_limit", "{limit}");
        }
    }

    #[test]
    fn a_cursor_follows_only_a_full_page() {
        assert_eq!(next_cursor(2, 2, Some(9)), Some(9));
        assert_eq!(next_cursor(1, 2, Some(9)), None);
        assert_eq!(next_cursor(0, 2, None), None);
    }

    #[test]
    fn an_idempotency_key_is_1_to_255_visible_ascii_characters() {
        assert_eq!(checked_key(" 0b6f-key ").unwrap(), "0b6f-key");
        assert!(checked_key(&"k".repeat(255)).is_ok());
        for bad in ["", "   ", "two words", "clé", &"k".repeat(256)] {
            let refused = checked_key(bad).unwrap_err();
            assert_eq!(code(refused), "invalid_idempotency_key", "{bad:?}");
        }
    }
}
