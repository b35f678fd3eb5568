//! What the sender does when WhatsApp refuses a message (or never answers): one handler per
//! [`ErrorClass`], as the module docs of [`crate::outbox`] list them under **Outcomes**.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use super::pace::random_fraction;
use super::{Inner, Outcome, REENGAGE_REASON, chrono_duration};
use crate::dispatch::count_decision;
use crate::metrics;
use crate::policy::{ConsentChange, Policy};
use crate::store::OutboxRow;
use crate::whatsapp::errors::{ErrorOrigin, NO_CODE};
use crate::whatsapp::{ErrorClass, GraphError, retry_after};

/// What was sent, as far as a refusal's handling needs it.
pub(super) struct Sent {
    /// Free-form (not a template): only those meet 131047 for the window.
    pub(super) free_form: bool,
    /// The customer's last message as known when it was sent.
    pub(super) customer_last_wrote: Option<DateTime<Utc>>,
    /// When the request left (a rate limit's round is told by it).
    pub(super) at: Instant,
}

/// A refusal as its handlers record it: the Graph code (none for a transport or HTTP
/// failure), the error's text, and when it was handled.
struct Refusal {
    code: Option<i64>,
    text: String,
    now: DateTime<Utc>,
    /// WhatsApp's `Retry-After`, when it sent one.
    retry_after: Option<Duration>,
}

impl Inner {
    /// Counts the error, then hands the row to the handler of the error's class.
    pub(super) async fn failed_send(&self, row: &OutboxRow, e: GraphError, sent: Sent) {
        metrics::count(
            "flowgate_send_errors_total",
            "WhatsApp send errors by code (`transport` when there was no answer).",
            &[("code", &error_label(&e))],
            1,
        );
        let refusal = Refusal {
            code: (e.code != NO_CODE).then_some(e.code),
            text: e.to_string(),
            now: self.clock.now(),
            retry_after: e.retry_after(),
        };
        match e.class() {
            ErrorClass::RateLimited => self.slow_channel_down(row, &refusal, sent.at).await,
            ErrorClass::PairRateLimited => self.back_recipient_off(row, &refusal).await,
            ErrorClass::Transient => self.retry_or_give_up(row, &refusal).await,
            // A template refused with 131047 is not a window problem: deciding again would
            // send the same template again. It fails with the reason.
            ErrorClass::Reengage if !sent.free_form => {
                self.fail(row, Some(131047), REENGAGE_REASON).await
            }
            ErrorClass::Reengage => self.window_closed(row, sent.customer_last_wrote).await,
            ErrorClass::MarketingOptOut => self.marketing_opted_out(row, &refusal).await,
            ErrorClass::EcosystemBackoff => self.ecosystem_backoff(row, &refusal).await,
            ErrorClass::Permanent => self.fail(row, refusal.code, &refusal.text).await,
            ErrorClass::AccountStopped => {
                let Refusal {
                    code, text, now, ..
                } = &refusal;
                self.stop_channel(*code, text).await;
                self.defer(row, *now, Some((*code, text))).await;
            }
        }
    }

    /// `130429`: slows the channel down ([`super::pace::ChannelPace::rate_limited`]: one
    /// cut per window, however many refusals arrive in it) and retries the message after
    /// WhatsApp's `Retry-After` when it sent one, else after the back-off of its round.
    async fn slow_channel_down(&self, row: &OutboxRow, refusal: &Refusal, sent_at: Instant) {
        let (backoff, rate) = {
            let mut pace = self.pace.lock().expect("pace lock");
            let backoff = pace.rate_limited(sent_at, Instant::now(), refusal.retry_after);
            (backoff, pace.rate())
        };
        if backoff.cut {
            metrics::count(
                "flowgate_channel_slowdowns_total",
                "Cuts of a channel's send rate after WhatsApp's rate limit (at most one a second).",
                &[("channel", &self.channel)],
                1,
            );
        }
        let wait = refusal.retry_after.unwrap_or_else(|| {
            retry_after(ErrorClass::RateLimited, backoff.level, random_fraction())
                .unwrap_or(Duration::from_secs(60))
        });
        tracing::warn!(
            channel = %self.channel,
            message = row.id,
            rate_mps = rate,
            wait_ms = wait.as_millis() as u64,
            retry_after = refusal.retry_after.is_some(),
            error = %refusal.text,
            "rate limited: slowing the channel down"
        );
        self.defer_after(row, wait, refusal).await;
    }

    /// `131056`: backs this recipient off 4^strikes s while others go on; fails the message
    /// when the strikes run out.
    async fn back_recipient_off(&self, row: &OutboxRow, refusal: &Refusal) {
        let wait = {
            let mut pairs = self.pairs.lock().expect("pairs lock");
            let pair = pairs
                .entry(row.wa_id.clone())
                .or_insert_with(|| self.new_pair());
            // The row's `next_attempt_at` holds the recipient back: it is the
            // contact's oldest undelivered message, so nothing of theirs goes before.
            let wait = retry_after(ErrorClass::PairRateLimited, pair.strikes, random_fraction());
            pair.strikes += 1;
            wait.map(|w| (w, pair.strikes))
        };
        match wait {
            Some((wait, strikes)) => {
                tracing::warn!(
                    channel = %self.channel,
                    message = row.id,
                    strikes,
                    wait_ms = wait.as_millis() as u64,
                    "pair rate limit: backing this recipient off"
                );
                self.defer_after(row, wait, refusal).await;
            }
            None => {
                let reason = format!("the pair rate limit did not let up: {}", refusal.text);
                self.fail(row, refusal.code, &reason).await;
            }
        }
    }

    /// A transient error or a transport failure: retried with jitter (the attempt counts),
    /// until the retry cap, then failed with the last error.
    async fn retry_or_give_up(&self, row: &OutboxRow, refusal: &Refusal) {
        let retry = u32::try_from(row.attempts.saturating_sub(1)).unwrap_or(u32::MAX);
        let Some(wait) = retry_after(ErrorClass::Transient, retry, random_fraction()) else {
            let reason = format!("gave up after {} attempts: {}", row.attempts, refusal.text);
            self.fail(row, refusal.code, &reason).await;
            return;
        };
        tracing::warn!(
            channel = %self.channel,
            message = row.id,
            attempt = row.attempts,
            wait_ms = wait.as_millis() as u64,
            error = %refusal.text,
            "send failed; retrying"
        );
        let Refusal {
            code, text, now, ..
        } = refusal;
        let not_before = *now + chrono_duration(wait);
        self.record_outcome(row, "record the retry", Outcome::Retry, || {
            self.db
                .record_retry(row.id, &self.owner, not_before, *code, text, *now)
        })
        .await;
    }

    /// `131047` for a free-form message: WhatsApp says the window is closed, whatever our
    /// clock says. Records that and decides again (a template, or the queue); never
    /// free-form again.
    async fn window_closed(&self, row: &OutboxRow, customer_last_wrote: Option<DateTime<Utc>>) {
        match self
            .runtime
            .redecide_claimed(row, &self.owner, Some(customer_last_wrote), "pending")
            .await
        {
            Ok(Some((decision, _))) => {
                tracing::warn!(
                    channel = %self.channel, message = row.id,
                    "131047: {}", decision.explain()
                );
                count_decision(&decision, "131047");
                self.wake.notify_one();
            }
            Ok(None) => self.lost_lease(row, Some(false)),
            Err(e) => {
                tracing::error!(channel = %self.channel, message = row.id, error = %e, "could not decide a 131047 message again");
                self.fail(row, Some(131047), REENGAGE_REASON).await;
            }
        }
    }

    /// `131050`: fails the message and records the contact's opt-out of marketing.
    async fn marketing_opted_out(&self, row: &OutboxRow, refusal: &Refusal) {
        let reason = format!("the recipient stopped marketing messages: {}", refusal.text);
        self.fail(row, refusal.code, &reason).await;
        let now = refusal.now;
        self.contact_policy(row, |c| {
            Policy::set_consent(c, ConsentChange::OptOut, "131050", now)
        })
        .await;
    }

    /// `131049`: fails the message and pauses marketing to the contact for Meta's 24 h.
    async fn ecosystem_backoff(&self, row: &OutboxRow, refusal: &Refusal) {
        let reason = format!(
            "not delivered to keep ecosystem engagement healthy; Meta says wait 24 h \
             before sending again: {}",
            refusal.text
        );
        self.fail(row, refusal.code, &reason).await;
        let now = refusal.now;
        self.contact_policy(row, |c| Policy::pause_marketing(c, now))
            .await;
    }

    /// A rate-limit wait: back to `pending` after `wait`, without counting the attempt.
    async fn defer_after(&self, row: &OutboxRow, wait: Duration, refusal: &Refusal) {
        let not_before = refusal.now + chrono_duration(wait);
        self.defer(row, not_before, Some((refusal.code, &refusal.text)))
            .await;
    }
}

/// The `code` label of `flowgate_send_errors_total`.
fn error_label(e: &GraphError) -> String {
    match (e.origin, e.http_status) {
        (ErrorOrigin::Transport, _) => "transport".into(),
        (ErrorOrigin::Http, Some(status)) => format!("http_{status}"),
        _ => e.code.to_string(),
    }
}
