//! Messages decided again after their turn: at send time, when the sender claims one
//! ([`Runtime::redecide_claimed`]), and when WhatsApp refuses one
//! ([`Runtime::message_failed`]). Both run under the contact's lock, as a turn does.

use chrono::{DateTime, Utc};

use crate::domain::{Decision, Outbound};
use crate::policy::{ConsentChange, Policy};
use crate::store::{MessageDetail, OutboundRecord, OutboxRow, Superseded};

use super::{DispatchError, Runtime, SentMessage};

impl Runtime {
    /// A claimed outbound message decided again at send time, under its contact's lock
    /// (a backlog or a retry can cross the window's end between plan and send). `window_refused` records a `131047` first, for the customer's last
    /// message as known when the message was sent. A decision that sends
    /// leaves the row with `then_status` (`sending` to send it now, `pending` to send it
    /// at the next claim); otherwise the row is queued or skipped. Returns the decision
    /// and the message to send, or `None` when the lease was lost.
    pub async fn redecide_claimed(
        &self,
        row: &OutboxRow,
        lease_owner: &str,
        window_refused: Option<Option<DateTime<Utc>>>,
        then_status: &str,
    ) -> Result<Option<(Decision, Outbound)>, DispatchError> {
        let lock = self.lock(&row.channel, &row.wa_id);
        let _guard = lock.lock().await;
        let now = self.clock.now();
        let conversation = self.db.load_conversation(&row.channel, &row.wa_id).await?;
        let mut contact = conversation.contact;
        if let Some(known) = window_refused
            && Policy::close_window(&mut contact, now, known)
            && let Some(id) = conversation.contact_id
        {
            self.db
                .save_contact_policy(id, &contact.policy, now)
                .await?;
        }
        let requested: Outbound = row
            .outbound()
            .map_err(|e| DispatchError::Corrupt(e.to_string()))?;
        let decision = self
            .policy
            .decide(&requested, &contact, &self.templates(), now);
        let record = OutboundRecord {
            message: Policy::apply(&decision, &requested),
            status: if decision.sends() {
                then_status
            } else {
                decision.status("pending")
            }
            .to_string(),
            expires_at: matches!(decision, Decision::Queued { .. })
                .then(|| self.policy.expires_at(now)),
            decision,
            in_reply_to: None,
        };
        let done = self
            .db
            .redecide_claimed(row.id, lease_owner, &record, now)
            .await?;
        tracing::info!(
            channel = %row.channel, message = row.id, decision = record.decision.name(),
            reason = record.decision.reason(), "decided again at send time"
        );
        Ok(done.then_some((record.decision, record.message)))
    }
    /// WhatsApp reported an outbound message `failed` with `code` (a status webhook): a
    /// `131047` closes the window and decides the message again as a new one (a template
    /// or the queue, never free-form again); `131050` records the marketing opt-out;
    /// `131049` pauses marketing to the contact for 24 h. Returns the new message, if any.
    pub async fn message_failed(
        &self,
        message_id: i64,
        code: i64,
    ) -> Result<Option<SentMessage>, DispatchError> {
        let Some(failed) = self.db.message(message_id).await? else {
            return Ok(None);
        };
        let now = self.clock.now();
        match code {
            131050 => {
                self.update_contact_policy(&failed.channel, &failed.wa_id, |c| {
                    Policy::set_consent(c, ConsentChange::OptOut, "131050", now)
                })
                .await?;
                Ok(None)
            }
            131049 => {
                self.update_contact_policy(&failed.channel, &failed.wa_id, |c| {
                    Policy::pause_marketing(c, now)
                })
                .await?;
                Ok(None)
            }
            131047 => self.refused_outside_window(&failed, now).await,
            _ => Ok(None),
        }
    }

    /// A `131047`: the message was sent outside the 24-hour window. The window closes and
    /// the message is decided again as a new one, which replaces it in one commit.
    async fn refused_outside_window(
        &self,
        failed: &MessageDetail,
        now: DateTime<Utc>,
    ) -> Result<Option<SentMessage>, DispatchError> {
        let Some(requested) = free_form_request(failed) else {
            return Ok(None);
        };
        let lock = self.lock(&failed.channel, &failed.wa_id);
        let _guard = lock.lock().await;
        // Read again under the lock: a message already decided again is done (a status
        // webhook processed twice).
        if self
            .db
            .message(failed.id)
            .await?
            .is_none_or(|m| m.decision.as_deref() == Some("failed"))
        {
            return Ok(None);
        }
        let conversation = self
            .db
            .load_conversation(&failed.channel, &failed.wa_id)
            .await?;
        let mut contact = conversation.contact.clone();
        // A customer message that arrived after this one was planned reopened the window:
        // then nothing is closed, and the message is decided in it.
        let wrote_since = match conversation.contact_id {
            Some(id) => self.db.inbound_after(id, failed.id).await?,
            None => false,
        };
        if !wrote_since {
            let known = contact.last_customer_message_at;
            Policy::close_window(&mut contact, now, known);
        }
        let record = self.decide(
            &failed.channel,
            requested,
            &mut contact,
            &self.templates(),
            None,
            now,
        );
        // The refused message says what became of it, in the same transaction as the new
        // one: a crash in between can neither lose it nor make it twice.
        let superseded = Superseded {
            id: failed.id,
            reason: format!(
                "WhatsApp refused it: outside the 24-hour window (131047); decided again ({}) \
                 as message ",
                record.decision.name()
            ),
        };
        let again = self
            .commit_message_superseding(
                &failed.channel,
                &conversation,
                &contact,
                record,
                Some(&superseded),
                now,
            )
            .await?;
        Ok(Some(again))
    }
}

/// The message a `131047` refused, as requested, when it can be decided again: only a
/// free-form message meets 131047 (a template that did would be rewritten to itself, again
/// and again).
fn free_form_request(failed: &MessageDetail) -> Option<Outbound> {
    match serde_json::from_value::<Outbound>(failed.body.clone()) {
        Ok(requested) => requested.content.is_free_form().then_some(requested),
        Err(e) => {
            tracing::error!(message = failed.id, error = %e, "a message WhatsApp refused with 131047 is unreadable; it cannot be decided again");
            None
        }
    }
}
