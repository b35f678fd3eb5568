//! A customer's reply to a campaign message: it enters the campaign's `on_reply` flow, with
//! `campaign` (`name`, `run`) in the conversation's variables.
//!
//! The rule: the customer's message opens the window (not a reaction or a status), no
//! session of theirs is live (none waits for an answer, a timer or a person: an ongoing
//! conversation keeps its flow), and their latest outbound message is a campaign message
//! that went to WhatsApp, written after their previous message (so only the first message
//! after the campaign's enters; later ones go to the flow it started). Consent keywords
//! are answered by the policy first, as always; the reply wins over keyword triggers, since
//! it answers the campaign.

use crate::domain::Origin;
use crate::engine::Event;

use super::turn::Turn;
use super::{DispatchError, Runtime};

impl Runtime {
    /// The event that enters the campaign's `on_reply` flow for this turn's customer
    /// message, when the rule above holds (call it before the message is applied to the
    /// contact: it compares with their previous message).
    pub(super) async fn campaign_reply(
        &self,
        turn: &Turn<'_>,
    ) -> Result<Option<Event>, DispatchError> {
        let conversation = &turn.conversation;
        let (Some(message), Some(contact_id), None) = (
            turn.inbound.filter(|m| m.content.refreshes_window()),
            conversation.contact_id,
            conversation.session.as_ref(),
        ) else {
            return Ok(None);
        };
        let Some((origin, sent_at)) = self.db.last_campaign_message(contact_id).await? else {
            return Ok(None);
        };
        let Origin::Campaign {
            campaign,
            run,
            on_reply: Some(flow),
            ..
        } = origin
        else {
            return Ok(None);
        };
        let previous = conversation.contact.last_customer_message_at;
        if previous.is_some_and(|at| at >= sent_at) {
            return Ok(None);
        }
        let value = serde_json::json!({ "name": campaign, "run": run });
        Ok(Some(Event::Enter {
            message: message.clone(),
            flow,
            vars: vec![("campaign".to_string(), value)],
        }))
    }
}
