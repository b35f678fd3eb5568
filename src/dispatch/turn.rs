//! One turn: an event for one contact, from the contact's lock to its [`TurnReport`].
//!
//! [`Runtime::handle`] reads as the turn's stages, top to bottom; each stage owns its part
//! and hands its result on, and none calls back into an earlier one:
//!
//! 1. lock the contact ([`Runtime::lock`]);
//! 2. load the conversation (`Db::load_conversation`);
//! 3. apply what the customer's message means to the contact: profile name, referral,
//!    window ([`Turn::apply_customer_message`]);
//! 4. a consent keyword, which the policy answers ([`Runtime::consent`]), or the engine,
//!    its HTTP requests performed and fed back ([`Runtime::run_engine`]);
//! 5. decide every outgoing message, the queue flushed first ([`Runtime::plan`]);
//! 6. commit one [`TurnWrite`] ([`Runtime::commit`]);
//! 7. ring the channel's sender ([`Runtime::ring`]);
//! 8. what the turn did ([`Planned::report`]).

use chrono::{DateTime, Utc};

use crate::domain::{Decision, Inbound, Origin, Outbound, OutboundContent, SplitMark};
use crate::engine::{Effect, Event, Handled, TimerKind};
use crate::metrics;
use crate::policy::{ConsentChange, Policy};
use crate::store::{
    CommittedTurn, Conversation, DequeuedRecord, NewTimer, OutboundRecord, SessionRow, TurnWrite,
};
use crate::templates::Registry;

use super::{DispatchError, Runtime, SentMessage, TurnReport, count_decision};

/// One turn's data as it passes through the stages.
pub(super) struct Turn<'a> {
    pub channel: &'a str,
    pub wa_id: &'a str,
    pub now: DateTime<Utc>,
    /// The customer's message that started the turn, if one did.
    pub inbound: Option<&'a Inbound>,
    /// The timer that started the turn, deleted with its commit.
    pub fired_timer: Option<i64>,
    /// As loaded; its contact is changed by the stages and committed as they leave it.
    pub conversation: Conversation,
}

/// What the consent keywords or the engine made of the event, before the policy and the
/// commit.
pub(super) struct Ran {
    pub handled: Handled,
    pub effects: Vec<Effect>,
    /// The session to store (`None` ends it).
    pub session: Option<SessionRow>,
    pub timers: Option<Vec<(DateTime<Utc>, TimerKind)>>,
    pub notes: Vec<String>,
}

/// Every outgoing message of a turn with its decision, ready to commit.
struct Planned {
    /// Queued messages decided again, in queue order.
    dequeued: Vec<DequeuedRecord>,
    /// The turn's own messages.
    records: Vec<OutboundRecord>,
    /// The queue a handoff step handed the conversation to.
    handoff: Option<String>,
    /// Stages of A/B splits the turn reached, recorded with it.
    splits: Vec<SplitMark>,
}

impl Runtime {
    /// Handles one event for one contact, end to end: the stages of a turn (see the module).
    pub(super) async fn handle(
        &self,
        channel: &str,
        wa_id: &str,
        event: Event,
        inbound: Option<&Inbound>,
        profile_name: Option<&str>,
        fired_timer: Option<i64>,
    ) -> Result<TurnReport, DispatchError> {
        let lock = self.lock(channel, wa_id);
        let _guard = lock.lock().await;
        let mut turn = Turn {
            channel,
            wa_id,
            now: self.clock.now(),
            inbound,
            fired_timer,
            conversation: self.db.load_conversation(channel, wa_id).await?,
        };
        let event = self.campaign_reply(&turn).await?.unwrap_or(event);
        turn.apply_customer_message(profile_name);
        let consent = turn
            .customer_wrote()
            .and_then(|m| Some((m, self.policy.consent_keyword(&m.content)?)));
        let ran = match consent {
            Some((message, change)) => self.consent(&mut turn, message, change),
            None => self.run_engine(&mut turn, event).await?,
        };
        let planned = self.plan(&mut turn, ran.effects).await?;
        let committed = self
            .commit(&turn, ran.session.as_ref(), ran.timers, &planned)
            .await?;
        let Some(committed) = committed else {
            return Ok(TurnReport::duplicate(wa_id));
        };
        self.ring(channel, planned.statuses());
        if inbound.is_some_and(|m| {
            matches!(
                m.content,
                crate::domain::InboundContent::Media { file: Some(_), .. }
            )
        }) {
            self.media_bell.notify_one();
        }
        Ok(planned.report(wa_id, committed, ran.handled, ran.notes))
    }

    /// A consent keyword (the policy's, not the flows'): the contact's consent changes, the
    /// policy's reply goes out, and the session stays as it is.
    fn consent(&self, turn: &mut Turn<'_>, message: &Inbound, change: ConsentChange) -> Ran {
        let source = format!("keyword {}", message.content.as_text().trim());
        Policy::set_consent(&mut turn.conversation.contact, change, &source, turn.now);
        let (reply, note) = match change {
            ConsentChange::OptOut => (
                self.policy.opt_out_reply.clone(),
                format!("the customer stopped marketing messages ({source})"),
            ),
            ConsentChange::OptIn => (
                self.policy.opt_in_reply.clone(),
                format!("the customer accepts marketing messages again ({source})"),
            ),
        };
        Ran {
            handled: Handled::Continued,
            effects: reply
                .map(|text| {
                    Effect::Send(Box::new(Outbound::new(
                        OutboundContent::text(text),
                        Origin::System,
                    )))
                })
                .into_iter()
                .collect(),
            session: turn.conversation.session.clone(),
            timers: None,
            notes: vec![note],
        }
    }

    /// Decides every outgoing message of the turn: the queue first, then the turn's own.
    async fn plan(
        &self,
        turn: &mut Turn<'_>,
        effects: Vec<Effect>,
    ) -> Result<Planned, DispatchError> {
        let templates = self.templates();
        let mut planned = Planned {
            dequeued: self.flush_queue(turn, &templates).await?,
            records: Vec::new(),
            handoff: None,
            splits: Vec::new(),
        };
        for effect in effects {
            match effect {
                Effect::Send(message) => {
                    let in_reply_to = turn.in_reply_to();
                    planned.records.push(self.decide(
                        turn.channel,
                        *message,
                        &mut turn.conversation.contact,
                        &templates,
                        in_reply_to,
                        turn.now,
                    ));
                }
                Effect::Handoff { queue } => {
                    tracing::info!(contact = %turn.wa_id, %queue, "conversation handed to a person");
                    planned.handoff = Some(queue);
                }
                Effect::Split(mark) => {
                    planned.splits.push(mark);
                }
                Effect::Http(_) => {}
            }
        }
        Ok(planned)
    }

    /// The customer wrote: the queue goes first, in order, decided again with the window
    /// their message opened (or expired, when its time ran out).
    async fn flush_queue(
        &self,
        turn: &mut Turn<'_>,
        templates: &Registry,
    ) -> Result<Vec<DequeuedRecord>, DispatchError> {
        let conversation = &turn.conversation;
        let (Some(_), Some(contact_id), true) = (
            turn.customer_wrote(),
            conversation.contact_id,
            conversation.has_queued,
        ) else {
            return Ok(Vec::new());
        };
        let mut dequeued = Vec::new();
        for q in self.db.queued_messages(contact_id).await? {
            let contact = &mut turn.conversation.contact;
            let decision = match q.expires_at {
                Some(at) if turn.now >= at => self.policy.expired(q.queued_at, turn.now),
                _ => self.policy.decide(&q.message, contact, templates, turn.now),
            };
            count_decision(&decision, "flush");
            if decision.sends() {
                self.policy.record_sent(contact, turn.now);
            }
            dequeued.push(DequeuedRecord {
                id: q.id,
                message: Policy::apply(&decision, &q.message),
                status: decision
                    .status(self.outbound_status(turn.channel))
                    .to_string(),
                decision,
                in_reply_to: turn.in_reply_to(),
            });
        }
        Ok(dequeued)
    }

    /// Commits the turn as one [`TurnWrite`]. `None`: the customer's message was handled
    /// before (a redelivery), so the first delivery's turn stands and this one is dropped
    /// whole.
    async fn commit(
        &self,
        turn: &Turn<'_>,
        session: Option<&SessionRow>,
        timers: Option<Vec<(DateTime<Utc>, TimerKind)>>,
        planned: &Planned,
    ) -> Result<Option<CommittedTurn>, DispatchError> {
        let new_timers: Option<Vec<NewTimer>> = timers.map(|ts| {
            ts.into_iter()
                .map(|(due_at, kind)| NewTimer {
                    due_at,
                    payload: serde_json::to_value(kind).expect("timer serializes"),
                })
                .collect()
        });
        let conversation = &turn.conversation;
        let started = std::time::Instant::now();
        let committed = self
            .db
            .commit_turn(&TurnWrite {
                session,
                inbound: turn.inbound,
                outbound: &planned.records,
                dequeued: &planned.dequeued,
                // Clearing timers the contact does not have would be a wasted statement.
                replace_timers: new_timers
                    .as_deref()
                    .filter(|t| !t.is_empty() || conversation.has_timers),
                fired_timer: turn.fired_timer,
                splits: &planned.splits,
                ..TurnWrite::new(
                    turn.channel,
                    conversation.contact_id,
                    &conversation.contact,
                    turn.now,
                )
            })
            .await;
        metrics::observe_stage("commit", started.elapsed().as_secs_f64());
        match committed {
            Ok(committed) => Ok(Some(committed)),
            Err(e) if e.is_duplicate() && turn.inbound.is_some() => Ok(None),
            // Another instance fired this timer (PostgreSQL): its turn is that one.
            Err(crate::store::StoreError::TimerAlreadyFired { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl<'a> Turn<'a> {
    /// The customer's message when it is one that opens the window (a message, not a
    /// reaction or a status).
    fn customer_wrote(&self) -> Option<&'a Inbound> {
        self.inbound.filter(|m| m.content.refreshes_window())
    }

    /// The wamid the turn's messages answer, for mark-as-read.
    fn in_reply_to(&self) -> Option<String> {
        self.inbound.map(|i| i.id.clone())
    }

    /// What the customer's message means to the contact, whatever answers it: the profile
    /// name, an ad's referral, the window it opens.
    fn apply_customer_message(&mut self, profile_name: Option<&str>) {
        let customer_wrote = self.customer_wrote();
        let contact = &mut self.conversation.contact;
        // The WhatsApp profile name fills in an unknown name; a name the business set (a
        // flow, a script, the API, a CSV import) is not overwritten by it.
        if let (None, Some(name)) = (&contact.name, profile_name) {
            contact.name = Some(name.to_string());
        }
        let Some(message) = customer_wrote else {
            return;
        };
        if message.from_ad
            && contact
                .policy
                .referral_at
                .is_none_or(|t| message.timestamp > t)
        {
            contact.policy.referral_at = Some(message.timestamp);
        }
        // The engine notes the window too (it is used without a runtime); twice is once.
        contact.saw_customer_message(message.timestamp);
    }
}

impl Planned {
    /// The status of every message the turn wrote (a `pending` one rings the sender).
    fn statuses(&self) -> impl Iterator<Item = &str> {
        self.dequeued
            .iter()
            .map(|d| d.status.as_str())
            .chain(self.records.iter().map(|r| r.status.as_str()))
    }

    /// What the turn did: what left the queue (a message that stays queued is not news),
    /// then the new messages.
    fn report(
        self,
        wa_id: &str,
        committed: CommittedTurn,
        handled: Handled,
        notes: Vec<String>,
    ) -> TurnReport {
        let flushed = self
            .dequeued
            .into_iter()
            .filter(|d| committed.dequeued_ids.contains(&d.id))
            .filter(|d| !matches!(d.decision, Decision::Queued { .. }))
            .map(|d| SentMessage {
                id: d.id,
                message: d.message,
                decision: d.decision,
            });
        let new = self
            .records
            .into_iter()
            .zip(committed.outbound_ids)
            .map(|(r, id)| SentMessage {
                id,
                message: r.message,
                decision: r.decision,
            });
        let sent: Vec<SentMessage> = flushed.chain(new).collect();
        for m in &sent {
            tracing::debug!(contact = %wa_id, message = m.id, "[policy] {}", m.decision.explain());
        }
        TurnReport {
            wa_id: wa_id.to_string(),
            handled,
            sent,
            handoff: self.handoff,
            notes,
        }
    }
}
