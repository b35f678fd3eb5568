//! WhatsApp errors and what the sender does about them.
//!
//! Owns [`GraphError`] (one error, from a send response, a failed status or a `value.errors`
//! webhook), [`classify`] (an error code -> what the sender does: retry
//! later, fail the message, slow down, stop the channel, or decide it again) and [`retry_after`]
//! (the retry schedule per class). Pure: randomness comes in as a number from the caller.
//!
//! Branch on the code, never on the HTTP status or the message text: Meta's copies of the
//! table disagree on statuses, and titles inside `message` are being deprecated.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The code a [`GraphError`] carries when the body had none (not a Graph error at all).
pub const NO_CODE: i64 = -1;

/// Where an error came from, which decides how far its `code` can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorOrigin {
    /// Meta's Graph envelope (`{"error":{…}}`), a failed status or a `value.errors` webhook.
    Graph,
    /// 360dialog's own envelope (`{"meta":{"httpCode","developerMessage","success":false}}`);
    /// `code` is 0.
    Dialog360,
    /// An HTTP error whose body was neither (a proxy's HTML page, an empty body…); `code` is
    /// [`NO_CODE`].
    Http,
    /// The request never got an answer (connection refused, timeout); `code` is [`NO_CODE`].
    Transport,
}

/// One WhatsApp error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{}", self.describe())]
pub struct GraphError {
    /// Meta's error code (`131047`…); 0 for 360dialog's own errors, [`NO_CODE`] when absent.
    pub code: i64,
    /// The short title (`title` in webhooks; Graph responses only have `message`).
    pub title: Option<String>,
    pub message: String,
    /// `error_data.details`: the part Meta says to build logic on, with the code.
    pub details: Option<String>,
    /// For support tickets.
    pub fbtrace_id: Option<String>,
    /// The HTTP status of the response; `None` for errors that came in a webhook.
    pub http_status: Option<u16>,
    pub origin: ErrorOrigin,
    /// The response's `Retry-After` in seconds, when it had one: how long WhatsApp asks the
    /// sender to wait ([`GraphError::retry_after`]; seconds keep the error small).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u32>,
}

impl GraphError {
    /// Reads one Graph error object: the `error` of a response envelope, or an item of a
    /// status's or a webhook's `errors`. Lenient: absent fields stay empty.
    pub fn from_graph_json(error: &Value, http_status: Option<u16>) -> Self {
        let text = |key: &str| error.get(key).and_then(Value::as_str).map(str::to_string);
        let code = error
            .get("code")
            .and_then(|c| c.as_i64().or_else(|| c.as_str()?.trim().parse().ok()))
            .unwrap_or(NO_CODE);
        let title = text("title").or_else(|| text("error_user_title"));
        Self {
            code,
            message: text("message")
                .or_else(|| title.clone())
                .unwrap_or_default(),
            title,
            details: error
                .get("error_data")
                .and_then(|d| d.get("details"))
                .and_then(Value::as_str)
                .map(str::to_string),
            fbtrace_id: text("fbtrace_id"),
            http_status,
            origin: ErrorOrigin::Graph,
            retry_after_secs: None,
        }
    }

    /// 360dialog's own error (bad API key, disabled channel, blocked path…): code 0.
    pub fn dialog360(http_status: u16, message: impl Into<String>) -> Self {
        Self {
            code: 0,
            title: None,
            message: message.into(),
            details: None,
            fbtrace_id: None,
            http_status: Some(http_status),
            origin: ErrorOrigin::Dialog360,
            retry_after_secs: None,
        }
    }

    /// An HTTP answer that carried no error envelope we know.
    pub fn http(http_status: u16, message: impl Into<String>) -> Self {
        Self {
            code: NO_CODE,
            title: None,
            message: message.into(),
            details: None,
            fbtrace_id: None,
            http_status: Some(http_status),
            origin: ErrorOrigin::Http,
            retry_after_secs: None,
        }
    }

    /// A request that got no answer at all.
    pub fn transport(message: impl Into<String>) -> Self {
        Self {
            code: NO_CODE,
            title: None,
            message: message.into(),
            details: None,
            fbtrace_id: None,
            http_status: None,
            origin: ErrorOrigin::Transport,
            retry_after_secs: None,
        }
    }

    /// This error with the response's `Retry-After`.
    pub fn with_retry_after(self, retry_after: Option<Duration>) -> Self {
        Self {
            retry_after_secs: retry_after.map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX)),
            ..self
        }
    }

    /// How long WhatsApp asked the sender to wait (`Retry-After`), if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after_secs.map(|s| Duration::from_secs(s.into()))
    }

    /// What the sender should do. Graph errors go by [`classify`]`(code)`; errors without a
    /// Graph code go by what there is: a transport failure or a 5xx/408 is transient, a 429
    /// is a rate limit, and any other 360dialog error is code 0 (stop and alert, e.g. a bad
    /// API key). Prefer this to `classify(code)` for errors from [`super::parse_send_response`].
    pub fn class(&self) -> ErrorClass {
        let status = self.http_status.unwrap_or(0);
        match self.origin {
            ErrorOrigin::Graph => classify(self.code),
            ErrorOrigin::Transport => ErrorClass::Transient,
            ErrorOrigin::Dialog360 | ErrorOrigin::Http if status == 429 => ErrorClass::RateLimited,
            ErrorOrigin::Dialog360 | ErrorOrigin::Http if status >= 500 || status == 408 => {
                ErrorClass::Transient
            }
            ErrorOrigin::Dialog360 => classify(self.code),
            ErrorOrigin::Http => ErrorClass::Permanent,
        }
    }

    fn describe(&self) -> String {
        let mut s = match self.origin {
            ErrorOrigin::Graph => format!("WhatsApp error {}", self.code),
            ErrorOrigin::Dialog360 => "360dialog error".to_string(),
            ErrorOrigin::Http => "unexpected WhatsApp API answer".to_string(),
            ErrorOrigin::Transport => "WhatsApp API unreachable".to_string(),
        };
        if let Some(status) = self.http_status {
            s.push_str(&format!(" (HTTP {status})"));
        }
        if !self.message.is_empty() {
            s.push_str(": ");
            s.push_str(&self.message);
        }
        if let Some(details) = self.details.as_deref().filter(|d| *d != self.message) {
            s.push_str(": ");
            s.push_str(details);
        }
        s
    }
}

/// What an error means for the sender: the handling Meta's error-code reference implies for
/// each code (see [`classify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// 131047: the 24 h window is closed. Becomes a template or is queued until the customer
    /// writes; never retried as free-form.
    Reengage,
    /// 130429, 4, 80007: the number's (or app's) rate limit. Slow the channel and retry.
    RateLimited,
    /// 131056: too many messages to this one recipient. Back off for this recipient only,
    /// 4^attempt seconds; others are unaffected.
    PairRateLimited,
    /// 131000, 1, 2, 131016, 133004, 131057: retry with jitter and a cap, then alert.
    Transient,
    /// 131050: the recipient stopped marketing messages. Record the opt-out; do not retry.
    MarketingOptOut,
    /// 131049: not delivered "to maintain healthy ecosystem engagement". Wait at least 24 h;
    /// retrying sooner blocks the user for longer.
    EcosystemBackoff,
    /// Do not retry; fix the cause (bad template, parameter, media, recipient…). Unknown codes
    /// land here too.
    Permanent,
    /// 131048, 368, 131031, 131042, 190, 0, 133010: the account or its credentials are
    /// blocked. Stop the channel's sender and alert.
    AccountStopped,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reengage => "reengage",
            Self::RateLimited => "rate_limited",
            Self::PairRateLimited => "pair_rate_limited",
            Self::Transient => "transient",
            Self::MarketingOptOut => "marketing_opt_out",
            Self::EcosystemBackoff => "ecosystem_backoff",
            Self::Permanent => "permanent",
            Self::AccountStopped => "account_stopped",
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The handling of a WhatsApp error code, by Meta's error-code reference. Codes not in the table are
/// [`ErrorClass::Permanent`]: retrying what we do not understand only repeats it.
pub fn classify(code: i64) -> ErrorClass {
    match code {
        131047 => ErrorClass::Reengage,
        130429 | 4 | 80007 => ErrorClass::RateLimited,
        131056 => ErrorClass::PairRateLimited,
        131000 | 1 | 2 | 131016 | 133004 | 131057 => ErrorClass::Transient,
        131050 => ErrorClass::MarketingOptOut,
        131049 => ErrorClass::EcosystemBackoff,
        131048 | 368 | 131031 | 131042 | 190 | 0 | 133010 => ErrorClass::AccountStopped,
        _ => ErrorClass::Permanent,
    }
}

/// Transient errors: 1 s, 2 s, 4 s… capped at this, then ±20 % jitter.
pub const TRANSIENT_CAP: Duration = Duration::from_secs(5 * 60);
/// Transient errors are retried this many times, then the message fails (and alerts).
pub const TRANSIENT_MAX_ATTEMPTS: u32 = 10;
/// Rate limits: 1 s, 2 s, 4 s… capped at this, then ±20 % jitter; retried while the message
/// lives.
pub const RATE_LIMIT_CAP: Duration = Duration::from_secs(60);
/// The pair rate limit waits 4^attempt s (1 s, 4 s, 16 s… 4096 s), for this many attempts.
pub const PAIR_MAX_ATTEMPTS: u32 = 7;
/// 131049: Meta says wait at least 24 hours before resending; we resend once.
pub const ECOSYSTEM_WAIT: Duration = Duration::from_secs(24 * 60 * 60);
pub const ECOSYSTEM_MAX_ATTEMPTS: u32 = 1;
/// How far jitter moves a delay either way.
pub const JITTER: f64 = 0.2;

/// How long to wait before retry number `attempt` (0 for the first retry) of a message that
/// failed with `class`, or `None` when it must not be retried (again).
///
/// `random` is a fraction in `[0, 1)` from the caller's random source (clamped), so this stays
/// pure: 0 gives -20 %, 0.5 the plain delay, 1 gives +20 %. Only the per-channel classes
/// (transient, rate limited) are jittered, after the cap so retries at the cap still spread;
/// the pair limit follows Meta's 4^X exactly and the ecosystem wait is a floor.
///
/// | class | delays | retries |
/// | --- | --- | --- |
/// | transient | 1 s, 2 s, 4 s… ≤ 5 min, ±20 % | 10 |
/// | rate limited | 1 s, 2 s, 4 s… ≤ 60 s, ±20 % | unbounded |
/// | pair rate limited | 4^attempt s | 7 (up to 4096 s) |
/// | ecosystem backoff | 24 h | 1 |
/// | others | none | 0 |
pub fn retry_after(class: ErrorClass, attempt: u32, random: f64) -> Option<Duration> {
    let doubling = |cap: Duration| {
        let secs = 1u64.checked_shl(attempt.min(63)).unwrap_or(u64::MAX);
        Duration::from_secs(secs).min(cap)
    };
    let jitter = |d: Duration| {
        let r = if random.is_nan() {
            0.5
        } else {
            random.clamp(0.0, 1.0)
        };
        d.mul_f64(1.0 - JITTER + 2.0 * JITTER * r)
    };
    match class {
        ErrorClass::Transient if attempt < TRANSIENT_MAX_ATTEMPTS => {
            Some(jitter(doubling(TRANSIENT_CAP)))
        }
        ErrorClass::RateLimited => Some(jitter(doubling(RATE_LIMIT_CAP))),
        ErrorClass::PairRateLimited if attempt < PAIR_MAX_ATTEMPTS => {
            Some(Duration::from_secs(4u64.pow(attempt)))
        }
        ErrorClass::EcosystemBackoff if attempt < ECOSYSTEM_MAX_ATTEMPTS => Some(ECOSYSTEM_WAIT),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_doubles_caps_and_jitters() {
        let at = |n| retry_after(ErrorClass::Transient, n, 0.5).unwrap();
        assert_eq!(at(0), Duration::from_secs(1));
        assert_eq!(at(1), Duration::from_secs(2));
        assert_eq!(at(2), Duration::from_secs(4));
        assert_eq!(at(8), Duration::from_secs(256));
        assert_eq!(at(9), TRANSIENT_CAP);
        assert_eq!(
            retry_after(ErrorClass::Transient, 9, 0.0),
            Some(Duration::from_secs(240))
        );
        assert_eq!(
            retry_after(ErrorClass::Transient, 9, 1.0),
            Some(Duration::from_secs(360))
        );
        assert_eq!(
            retry_after(ErrorClass::Transient, 2, 0.0),
            Some(Duration::from_millis(3200))
        );
        assert_eq!(retry_after(ErrorClass::Transient, 10, 0.5), None);
        // Out-of-range randomness is clamped, never negative or huge.
        assert_eq!(
            retry_after(ErrorClass::Transient, 0, 7.0),
            Some(Duration::from_millis(1200))
        );
        assert_eq!(
            retry_after(ErrorClass::Transient, 0, f64::NAN),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn rate_limits_cap_at_a_minute_and_never_give_up() {
        let at = |n| retry_after(ErrorClass::RateLimited, n, 0.5).unwrap();
        assert_eq!(at(0), Duration::from_secs(1));
        assert_eq!(at(5), Duration::from_secs(32));
        assert_eq!(at(6), Duration::from_secs(60));
        assert_eq!(at(1000), Duration::from_secs(60));
        assert_eq!(
            retry_after(ErrorClass::RateLimited, 1000, 1.0),
            Some(Duration::from_secs(72))
        );
    }

    #[test]
    fn pair_limit_is_four_to_the_attempt() {
        let delays: Vec<_> = (0..8)
            .map(|n| retry_after(ErrorClass::PairRateLimited, n, 0.9).map(|d| d.as_secs()))
            .collect();
        assert_eq!(
            delays,
            [
                Some(1),
                Some(4),
                Some(16),
                Some(64),
                Some(256),
                Some(1024),
                Some(4096),
                None
            ]
        );
    }

    #[test]
    fn ecosystem_waits_a_day_once_and_the_rest_never_retry() {
        assert_eq!(
            retry_after(ErrorClass::EcosystemBackoff, 0, 0.0),
            Some(Duration::from_secs(86_400))
        );
        assert_eq!(retry_after(ErrorClass::EcosystemBackoff, 1, 0.0), None);
        for class in [
            ErrorClass::Reengage,
            ErrorClass::MarketingOptOut,
            ErrorClass::Permanent,
            ErrorClass::AccountStopped,
        ] {
            assert_eq!(retry_after(class, 0, 0.5), None, "{class}");
        }
    }

    #[test]
    fn errors_without_a_graph_code_go_by_what_there_is() {
        assert_eq!(
            GraphError::transport("timed out").class(),
            ErrorClass::Transient
        );
        assert_eq!(
            GraphError::http(502, "<html>").class(),
            ErrorClass::Transient
        );
        assert_eq!(GraphError::http(429, "").class(), ErrorClass::RateLimited);
        assert_eq!(GraphError::http(400, "?").class(), ErrorClass::Permanent);
        assert_eq!(
            GraphError::dialog360(401, "Invalid api key").class(),
            ErrorClass::AccountStopped
        );
        assert_eq!(
            GraphError::dialog360(503, "down").class(),
            ErrorClass::Transient
        );
    }

    #[test]
    fn messages_say_what_is_wrong() {
        let e = GraphError::from_graph_json(
            &serde_json::json!({"code": 131047, "message": "Re-engagement message",
                "error_data": {"details": "More than 24 hours"}}),
            Some(400),
        );
        assert_eq!(
            e.to_string(),
            "WhatsApp error 131047 (HTTP 400): Re-engagement message: More than 24 hours"
        );
        assert_eq!(e.class(), ErrorClass::Reengage);
        let missing = GraphError::from_graph_json(&serde_json::json!({}), None);
        assert_eq!(missing.code, NO_CODE);
        assert_eq!(missing.class(), ErrorClass::Permanent);
    }
}
