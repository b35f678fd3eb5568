//! The conversation worker: turns an event for one contact into a committed turn.
//!
//! For each event it loads the contact and session, finds the flow version the session is
//! pinned to (compiling it again from the database when a reload or restart dropped it),
//! runs the pure engine, performs the HTTP requests steps ask for and feeds the results back,
//! then commits the new contact, session, message log and timers in one transaction.
//! Events for one contact are handled one at a time, in order; different contacts run in
//! parallel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, Utc};

use crate::clock::{SharedClock, VirtualClock};
use crate::config::{ChannelConfig, Provider};
use crate::domain::{Contact, Decision, Inbound, Origin, Outbound, OutboundContent, WaId};
use crate::engine::{Effect, Engine, Event, Handled, HttpOutcome, HttpRequest, Session, TimerKind};
use crate::flow::load::compile_bundle;
use crate::flow::{Bundle, Flow, FlowSet};
use crate::metrics;
use crate::policy::{ConsentChange, Policy};
use crate::store::{
    Conversation, Db, DequeuedRecord, NewTimer, OutboundRecord, OutboxRow, SessionRow, StoreError,
    Superseded, TemplateStatusRow, TurnWrite,
};
use crate::templates::{Registry, Status};

/// HTTP round trips one event may trigger (a flow of chained `http` steps).
const MAX_HTTP_ROUNDS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored session state is unreadable: {0}")]
    Corrupt(String),
}

/// One outgoing message as it was recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct SentMessage {
    pub id: i64,
    pub message: Outbound,
    pub decision: Decision,
}

/// What one event did, for `chat`, conversation tests and logs.
#[derive(Debug, Clone)]
pub struct TurnReport {
    pub wa_id: WaId,
    pub handled: Handled,
    pub sent: Vec<SentMessage>,
    pub handoff: Option<String>,
    pub notes: Vec<String>,
}

/// Counts a policy decision taken at `stage` (`plan`, `flush`, `expiry`, `send_time`, `131047`).
pub fn count_decision(decision: &Decision, stage: &str) {
    metrics::count(
        "flowgate_policy_decisions_total",
        "Policy decisions on outgoing messages, by decision and when they were taken.",
        &[("decision", decision.name()), ("stage", stage)],
        1,
    );
}

/// What running one event did, before the policy and the commit.
struct Ran {
    handled: Handled,
    effects: Vec<Effect>,
    /// The session to store (`None` ends it).
    session: Option<SessionRow>,
    timers: Option<Vec<(DateTime<Utc>, TimerKind)>>,
    notes: Vec<String>,
}

/// Held while one event of one contact is handled.
type ContactLock = Arc<tokio::sync::Mutex<()>>;

/// The worker state shared by every command that talks to flows.
pub struct Runtime {
    pub db: Db,
    pub engine: Engine,
    pub flows: RwLock<FlowSet>,
    /// The template registry; status webhooks change it while the server runs.
    templates: RwLock<Arc<Registry>>,
    pub policy: Policy,
    pub clock: SharedClock,
    pub channels: Vec<ChannelConfig>,
    /// The channel `chat`, `test` and the sandbox door talk on: the first sandbox channel,
    /// else the first channel.
    pub default_channel: String,
    http: reqwest::Client,
    /// One lock per (channel, contact): a contact's events run one at a time, in order.
    locks: Mutex<HashMap<(String, WaId), ContactLock>>,
    /// Per channel: rung when a commit leaves messages for the channel's sender, so it
    /// claims them now instead of at its next poll.
    outbox_ready: HashMap<String, Arc<tokio::sync::Notify>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("default_channel", &self.default_channel)
            .finish()
    }
}

impl Runtime {
    pub fn new(
        db: Db,
        engine: Engine,
        flows: Vec<Arc<Flow>>,
        templates: Registry,
        policy: Policy,
        clock: SharedClock,
        channels: Vec<ChannelConfig>,
    ) -> Self {
        let default_channel = channels
            .iter()
            .find(|c| c.provider == Provider::Sandbox)
            .or(channels.first())
            .map(|c| c.name.clone())
            .unwrap_or_else(|| "sandbox".into());
        let outbox_ready = channels
            .iter()
            .map(|c| (c.name.clone(), Arc::new(tokio::sync::Notify::new())))
            .collect();
        Self {
            db,
            engine,
            flows: RwLock::new(FlowSet::new(flows)),
            templates: RwLock::new(Arc::new(templates)),
            policy,
            clock,
            channels,
            default_channel,
            http: reqwest::Client::builder()
                .user_agent(concat!("flowgate/", env!("CARGO_PKG_VERSION")))
                .build()
                .expect("an HTTP client with default settings builds"),
            locks: Mutex::new(HashMap::new()),
            outbox_ready,
        }
    }

    /// The bell a channel's sender listens to for new messages.
    pub fn outbox_ready(&self, channel: &str) -> Arc<tokio::sync::Notify> {
        self.outbox_ready
            .get(channel)
            .cloned()
            .unwrap_or_else(|| Arc::new(tokio::sync::Notify::new()))
    }

    /// Rings the channel's sender when `statuses` hold a message for it to send.
    fn ring<'a>(&self, channel: &str, mut statuses: impl Iterator<Item = &'a str>) {
        if statuses.any(|s| s == "pending")
            && let Some(bell) = self.outbox_ready.get(channel)
        {
            bell.notify_one();
        }
    }

    /// The status outgoing messages are recorded with: `sent` on a sandbox channel, where
    /// storing is sending; `pending` where the outbox sender still has to deliver them.
    pub fn outbound_status(&self, channel: &str) -> &'static str {
        match self.channels.iter().find(|c| c.name == channel) {
            Some(c) if c.provider != Provider::Sandbox => "pending",
            _ => "sent",
        }
    }

    /// Stores the bundle of every current flow version, so sessions pinned to them survive a
    /// restart after the files change.
    pub async fn remember_flow_versions(&self) -> Result<(), DispatchError> {
        let bundles: Vec<(String, String, String)> = {
            let flows = self.flows.read().expect("flows lock");
            flows
                .current()
                .iter()
                .map(|f| {
                    let bundle = serde_json::to_string(&f.bundle).expect("bundle serializes");
                    (f.id.clone(), f.version.clone(), bundle)
                })
                .collect()
        };
        for (id, version, bundle) in bundles {
            self.db
                .save_flow_version(&id, &version, &bundle, self.clock.now())
                .await?;
        }
        Ok(())
    }

    /// Makes `flows` current; running sessions stay on their versions.
    pub async fn reload(&self, flows: Vec<Arc<Flow>>) -> Result<(), DispatchError> {
        self.flows.write().expect("flows lock").replace(flows);
        self.remember_flow_versions().await
    }

    /// A customer's message.
    pub async fn inbound(
        &self,
        channel: &str,
        wa_id: &str,
        profile_name: Option<&str>,
        inbound: Inbound,
    ) -> Result<TurnReport, DispatchError> {
        let event = Event::Message(inbound.clone());
        self.handle(channel, wa_id, event, Some(&inbound), profile_name, None)
            .await
    }

    /// Starts a flow for a contact, as the API and a test's `trigger:` do.
    pub async fn start_flow(
        &self,
        channel: &str,
        wa_id: &str,
        flow: &str,
        step: Option<&str>,
    ) -> Result<TurnReport, DispatchError> {
        let event = Event::Start {
            flow: flow.to_string(),
            step: step.map(str::to_string),
        };
        self.handle(channel, wa_id, event, None, None, None).await
    }

    /// An agent's message to a contact (the API's `POST /api/conversations/{wa_id}/messages`,
    /// a test's `agent:`): it passes the policy like every other message.
    pub async fn agent_message(
        &self,
        channel: &str,
        wa_id: &str,
        content: OutboundContent,
    ) -> Result<TurnReport, DispatchError> {
        let lock = self.lock(channel, wa_id);
        let _guard = lock.lock().await;
        let now = self.clock.now();
        let conversation = self.db.load_conversation(channel, wa_id).await?;
        let mut contact = conversation.contact.clone();
        let templates = self.templates();
        let record = self.decide(
            channel,
            Outbound::new(content, Origin::Agent),
            &mut contact,
            &templates,
            None,
            now,
        );
        let sent = self
            .commit_message(channel, &conversation, &contact, record, now)
            .await?;
        Ok(TurnReport {
            wa_id: wa_id.to_string(),
            handled: Handled::Continued,
            sent: vec![sent],
            handoff: None,
            notes: Vec::new(),
        })
    }

    /// Commits one outgoing message outside a turn (an agent's, one decided again): the
    /// contact as changed, the session as it was.
    async fn commit_message(
        &self,
        channel: &str,
        conversation: &Conversation,
        contact: &Contact,
        record: OutboundRecord,
        now: DateTime<Utc>,
    ) -> Result<SentMessage, DispatchError> {
        self.commit_message_superseding(channel, conversation, contact, record, None, now)
            .await
    }

    /// [`Runtime::commit_message`], marking the message it replaces `failed` in the same
    /// transaction.
    async fn commit_message_superseding(
        &self,
        channel: &str,
        conversation: &Conversation,
        contact: &Contact,
        record: OutboundRecord,
        superseded: Option<&Superseded>,
        now: DateTime<Utc>,
    ) -> Result<SentMessage, DispatchError> {
        let records = [record];
        let committed = self
            .db
            .commit_turn(&TurnWrite {
                session: conversation.session.as_ref(),
                outbound: &records,
                superseded,
                ..TurnWrite::new(channel, conversation.contact_id, contact, now)
            })
            .await?;
        let [record] = records;
        self.ring(channel, std::iter::once(record.status.as_str()));
        Ok(SentMessage {
            id: committed.outbound_ids[0],
            message: record.message,
            decision: record.decision,
        })
    }

    /// The template registry as it is now.
    pub fn templates(&self) -> Arc<Registry> {
        self.templates.read().expect("templates lock").clone()
    }

    /// Applies the template statuses WhatsApp reported after the registry file was written
    /// (they survive a restart; a newer file, e.g. from `templates sync`, wins).
    pub async fn load_template_statuses(&self) -> Result<(), DispatchError> {
        let rows = self.db.template_statuses().await?;
        let mut registry = (*self.templates()).clone();
        let mut changed = false;
        for row in rows {
            let newer = registry.written_at.is_none_or(|at| row.updated_at > at);
            if let (true, Some(status)) = (newer, Status::parse(&row.status)) {
                changed |= registry.set_status(&row.name, &row.language, status);
            }
        }
        if changed {
            *self.templates.write().expect("templates lock") = Arc::new(registry);
        }
        Ok(())
    }

    /// A `message_template_status_update`: the template's new status applies to every
    /// message decided from now on (pending ones are decided again when the sender takes
    /// them). Returns the new status, `None` when the event changes nothing sendable.
    pub async fn template_status_changed(
        &self,
        name: &str,
        language: &str,
        event: &str,
        reason: Option<&str>,
    ) -> Result<Option<Status>, DispatchError> {
        let Some(status) = Status::from_meta(event) else {
            return Ok(None);
        };
        let language = crate::templates::normalize_language(language);
        self.db
            .save_template_status(&TemplateStatusRow {
                name: name.to_string(),
                language: language.clone(),
                status: status.as_str().to_string(),
                event: event.to_string(),
                reason: reason.map(str::to_string),
                updated_at: self.clock.now(),
            })
            .await?;
        // Clone, change and store under one write lock: two updates at once both apply.
        let mut current = self.templates.write().expect("templates lock");
        let mut registry = (**current).clone();
        if !registry.set_status(name, &language, status) {
            tracing::warn!(template = name, %language, "a status update for a template the registry does not list");
        }
        *current = Arc::new(registry);
        Ok(Some(status))
    }

    /// Changes a contact's policy state outside a turn (consent from `user_preferences`, a
    /// `131049`/`131050` from WhatsApp), under the contact's lock. A contact never seen is
    /// created, so the change holds when they first write.
    pub async fn update_contact_policy(
        &self,
        channel: &str,
        wa_id: &str,
        change: impl FnOnce(&mut Contact),
    ) -> Result<(), DispatchError> {
        let lock = self.lock(channel, wa_id);
        let _guard = lock.lock().await;
        let now = self.clock.now();
        let conversation = self.db.load_conversation(channel, wa_id).await?;
        let mut contact = conversation.contact;
        change(&mut contact);
        match conversation.contact_id {
            Some(id) => {
                self.db
                    .save_contact_policy(id, &contact.policy, now)
                    .await?
            }
            None => {
                self.db
                    .commit_turn(&TurnWrite::new(channel, None, &contact, now))
                    .await?;
            }
        }
        Ok(())
    }

    /// A claimed outbound message decided again at send time, under its contact's lock
    /// (DESIGN §4.4). `window_refused` records a `131047` first, for the customer's last
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
            131047 => {
                let requested: Outbound = match serde_json::from_value(failed.body.clone()) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::error!(message = message_id, error = %e, "a message WhatsApp refused with 131047 is unreadable; it cannot be decided again");
                        return Ok(None);
                    }
                };
                // Only free-form messages meet 131047 (a template that did would be rewritten
                // to itself, again and again).
                if !requested.content.is_free_form() {
                    return Ok(None);
                }
                let lock = self.lock(&failed.channel, &failed.wa_id);
                let _guard = lock.lock().await;
                // Read again under the lock: a message already decided again is done (a
                // status webhook processed twice).
                if self
                    .db
                    .message(message_id)
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
                // A customer message that arrived after this one was planned reopened the
                // window: then nothing is closed, and the message is decided in it.
                let wrote_since = match conversation.contact_id {
                    Some(id) => self.db.inbound_after(id, message_id).await?,
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
                // The refused message says what became of it, in the same transaction as
                // the new one: a crash in between can neither lose it nor make it twice.
                let superseded = Superseded {
                    id: message_id,
                    reason: format!(
                        "WhatsApp refused it: outside the 24-hour window (131047); decided \
                         again ({}) as message ",
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
            _ => Ok(None),
        }
    }

    /// Expires every queued message whose `queue_ttl` ran out by the clock's now.
    pub async fn expire_queued(&self) -> Result<Vec<TurnReport>, DispatchError> {
        let now = self.clock.now();
        let mut reports = Vec::new();
        loop {
            let due = self.db.due_expiries(now, 100).await?;
            if due.is_empty() {
                return Ok(reports);
            }
            for m in due {
                let decision = self.policy.expired(m.queued_at, now);
                if self.db.expire_message(m.id, decision.reason(), now).await? {
                    count_decision(&decision, "expiry");
                    tracing::info!(channel = %m.channel, contact = %m.wa_id, message = m.id, "{}", decision.explain());
                    reports.push(TurnReport {
                        wa_id: m.wa_id,
                        handled: Handled::Continued,
                        sent: vec![SentMessage {
                            id: m.id,
                            message: m.message,
                            decision,
                        }],
                        handoff: None,
                        notes: Vec::new(),
                    });
                }
            }
        }
    }

    /// Fires every timer due by the clock's now, oldest first.
    pub async fn fire_due_timers(&self) -> Result<Vec<TurnReport>, DispatchError> {
        let mut reports = self.expire_queued().await?;
        loop {
            let due = self.db.due_timers(self.clock.now(), 100).await?;
            if due.is_empty() {
                return Ok(reports);
            }
            for timer in due {
                let kind: TimerKind = match serde_json::from_value(timer.payload.clone()) {
                    Ok(kind) => kind,
                    Err(e) => {
                        tracing::error!(timer = timer.id, error = %e, "unreadable timer; dropping it");
                        TimerKind::Wait { epoch: -1 }
                    }
                };
                let report = self
                    .handle(
                        &timer.channel,
                        &timer.wa_id,
                        Event::Timer(kind),
                        None,
                        None,
                        Some(timer.id),
                    )
                    .await?;
                reports.push(report);
            }
        }
    }

    /// Moves a virtual clock to `to`, firing every timer that falls due on the way at its
    /// own time, in time order (`/wait` in `chat`, `wait:` in conversation tests).
    pub async fn advance_clock(
        &self,
        clock: &VirtualClock,
        to: DateTime<Utc>,
    ) -> Result<Vec<TurnReport>, DispatchError> {
        let mut reports = Vec::new();
        while let Some(due) = self.next_timer_at().await? {
            if due > to {
                break;
            }
            clock.advance_to(due);
            reports.extend(self.fire_due_timers().await?);
        }
        clock.advance_to(to);
        Ok(reports)
    }

    /// The next time something is due: a timer or a queued message's expiry.
    pub async fn next_timer_at(&self) -> Result<Option<DateTime<Utc>>, DispatchError> {
        let timer = self.db.next_timer_at().await?;
        let expiry = self.db.next_expiry_at().await?;
        Ok(timer.into_iter().chain(expiry).min())
    }

    fn lock(&self, channel: &str, wa_id: &str) -> ContactLock {
        let mut locks = self.locks.lock().expect("locks");
        if locks.len() > 10_000 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks
            .entry((channel.to_string(), wa_id.to_string()))
            .or_default()
            .clone()
    }

    /// The flow a stored session is pinned to: in memory, or compiled again from the database.
    async fn pinned_flow(&self, row: &SessionRow) -> Result<Option<Arc<Flow>>, DispatchError> {
        if let Some(f) = self
            .flows
            .read()
            .expect("flows lock")
            .version(&row.flow_id, &row.flow_version)
        {
            return Ok(Some(f.clone()));
        }
        let Some(bundle) = self
            .db
            .flow_version(&row.flow_id, &row.flow_version)
            .await?
        else {
            return Ok(None);
        };
        let bundle: Bundle =
            serde_json::from_str(&bundle).map_err(|e| DispatchError::Corrupt(e.to_string()))?;
        match compile_bundle(&bundle, &self.engine.scripting, &self.templates()) {
            Ok(flow) => {
                let flow = Arc::new(flow);
                self.flows
                    .write()
                    .expect("flows lock")
                    .add_version(flow.clone());
                Ok(Some(flow))
            }
            Err(diags) => {
                tracing::error!(flow = %row.flow_id, version = %row.flow_version, errors = diags.errors(), "a stored flow version no longer compiles");
                Ok(None)
            }
        }
    }

    /// Handles one event for one contact, end to end.
    async fn handle(
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
        let now = self.clock.now();
        let conversation = self.db.load_conversation(channel, wa_id).await?;
        let mut contact = conversation.contact;
        // The WhatsApp profile name fills in an unknown name; a name the business set (a
        // flow, a script, the API, a CSV import) is not overwritten by it.
        if let (None, Some(name)) = (&contact.name, profile_name) {
            contact.name = Some(name.to_string());
        }
        let customer_wrote = inbound.filter(|m| m.content.refreshes_window());
        if let Some(m) = customer_wrote.filter(|m| m.from_ad)
            && contact.policy.referral_at.is_none_or(|t| m.timestamp > t)
        {
            contact.policy.referral_at = Some(m.timestamp);
        }
        let consent = customer_wrote.and_then(|m| self.policy.consent_keyword(&m.content));
        let ran = match consent {
            // Consent keywords are the policy's, not the flows': the session stays as it is.
            Some(change) => {
                let m = customer_wrote.expect("a keyword comes with a message");
                contact.saw_customer_message(m.timestamp);
                let source = format!("keyword {}", m.content.as_text().trim());
                Policy::set_consent(&mut contact, change, &source, now);
                let reply = match change {
                    ConsentChange::OptOut => self.policy.opt_out_reply.clone(),
                    ConsentChange::OptIn => self.policy.opt_in_reply.clone(),
                };
                Ran {
                    handled: Handled::Continued,
                    effects: reply
                        .map(|text| {
                            Effect::Send(Outbound::new(OutboundContent::text(text), Origin::System))
                        })
                        .into_iter()
                        .collect(),
                    session: conversation.session.clone(),
                    timers: None,
                    notes: vec![match change {
                        ConsentChange::OptOut => {
                            format!("the customer stopped marketing messages ({source})")
                        }
                        ConsentChange::OptIn => {
                            format!("the customer accepts marketing messages again ({source})")
                        }
                    }],
                }
            }
            None => {
                self.run_engine(
                    wa_id,
                    &mut contact,
                    conversation.session.as_ref(),
                    event,
                    now,
                )
                .await?
            }
        };

        let templates = self.templates();
        let in_reply_to = inbound.map(|i| i.id.clone());
        // The customer wrote: the queue goes first, in order, decided again with the window
        // their message opened.
        let mut dequeued = Vec::new();
        if let (Some(_), Some(contact_id), true) = (
            customer_wrote,
            conversation.contact_id,
            conversation.has_queued,
        ) {
            for q in self.db.queued_messages(contact_id).await? {
                let decision = match q.expires_at {
                    Some(at) if now >= at => self.policy.expired(q.queued_at, now),
                    _ => self.policy.decide(&q.message, &contact, &templates, now),
                };
                count_decision(&decision, "flush");
                if decision.sends() {
                    self.policy.record_sent(&mut contact, now);
                }
                dequeued.push(DequeuedRecord {
                    id: q.id,
                    message: Policy::apply(&decision, &q.message),
                    status: decision.status(self.outbound_status(channel)).to_string(),
                    decision,
                    in_reply_to: in_reply_to.clone(),
                });
            }
        }
        let mut handoff = None;
        let mut records = Vec::new();
        for effect in ran.effects {
            match effect {
                Effect::Send(message) => records.push(self.decide(
                    channel,
                    message,
                    &mut contact,
                    &templates,
                    in_reply_to.clone(),
                    now,
                )),
                Effect::Handoff { queue } => {
                    tracing::info!(contact = %wa_id, %queue, "conversation handed to a person");
                    handoff = Some(queue);
                }
                Effect::Http(_) => {}
            }
        }
        let new_timers: Option<Vec<NewTimer>> = ran.timers.map(|ts| {
            ts.into_iter()
                .map(|(due_at, kind)| NewTimer {
                    due_at,
                    payload: serde_json::to_value(kind).expect("timer serializes"),
                })
                .collect()
        });
        let committed = self
            .db
            .commit_turn(&TurnWrite {
                session: ran.session.as_ref(),
                inbound,
                outbound: &records,
                dequeued: &dequeued,
                // Clearing timers the contact does not have would be a wasted statement.
                replace_timers: new_timers
                    .as_deref()
                    .filter(|t| !t.is_empty() || conversation.has_timers),
                fired_timer,
                ..TurnWrite::new(channel, conversation.contact_id, &contact, now)
            })
            .await;
        let committed = match committed {
            Err(e) if e.is_duplicate() && inbound.is_some() => {
                // The same message again: the first delivery's turn stands, this one is dropped whole.
                return Ok(TurnReport {
                    wa_id: wa_id.to_string(),
                    handled: Handled::Duplicate,
                    sent: Vec::new(),
                    handoff: None,
                    notes: Vec::new(),
                });
            }
            other => other?,
        };
        self.ring(
            channel,
            dequeued
                .iter()
                .map(|d| d.status.as_str())
                .chain(records.iter().map(|r| r.status.as_str())),
        );
        // What left the queue (a message that stays queued is not news), then the new ones.
        let flushed = dequeued
            .into_iter()
            .filter(|d| committed.dequeued_ids.contains(&d.id))
            .filter(|d| !matches!(d.decision, Decision::Queued { .. }))
            .map(|d| SentMessage {
                id: d.id,
                message: d.message,
                decision: d.decision,
            });
        let new = records
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
        Ok(TurnReport {
            wa_id: wa_id.to_string(),
            handled: ran.handled,
            sent,
            handoff,
            notes: ran.notes,
        })
    }

    /// Decides one outgoing message for `contact` and builds its record (the one place
    /// decisions are made at plan time). A message that is sent may open the free entry
    /// point, so `contact` changes with it.
    fn decide(
        &self,
        channel: &str,
        message: Outbound,
        contact: &mut Contact,
        templates: &Registry,
        in_reply_to: Option<String>,
        now: DateTime<Utc>,
    ) -> OutboundRecord {
        let decision = self.policy.decide(&message, contact, templates, now);
        count_decision(&decision, "plan");
        if decision.sends() {
            self.policy.record_sent(contact, now);
        }
        OutboundRecord {
            message: Policy::apply(&decision, &message),
            status: decision.status(self.outbound_status(channel)).to_string(),
            expires_at: matches!(decision, Decision::Queued { .. })
                .then(|| self.policy.expires_at(now)),
            decision,
            in_reply_to,
        }
    }

    /// Runs the engine for one event, performing the HTTP requests its steps ask for.
    async fn run_engine(
        &self,
        wa_id: &str,
        contact: &mut Contact,
        stored: Option<&SessionRow>,
        event: Event,
        now: DateTime<Utc>,
    ) -> Result<Ran, DispatchError> {
        let mut notes = Vec::new();
        let mut session = None;
        if let Some(row) = stored {
            match self.pinned_flow(row).await? {
                Some(flow) => {
                    session = Session::from_stored(&flow, &row.step, &row.state);
                    if session.is_none() {
                        notes.push(format!(
                            "the stored session in flow `{}` is unreadable; starting over",
                            row.flow_id
                        ));
                    }
                }
                None => notes.push(format!(
                    "flow `{}` version {} is gone; the session ends",
                    row.flow_id, row.flow_version
                )),
            }
        }
        let mut outcome = {
            let flows = self.flows.read().expect("flows lock");
            self.engine.handle(&flows, contact, session, event, now)
        };
        let mut effects = Vec::new();
        let mut timers = outcome.timers.take();
        let mut handled = outcome.handled.clone();
        notes.append(&mut outcome.notes);
        let mut rounds = 0;
        loop {
            let mut request = None;
            for effect in std::mem::take(&mut outcome.effects) {
                match effect {
                    Effect::Http(r) => request = Some(r),
                    other => effects.push(other),
                }
            }
            let Some(request) = request else { break };
            rounds += 1;
            if rounds > MAX_HTTP_ROUNDS {
                // An `on_error` that loops back to its own `http` step: stop like the engine
                // stops a `goto` loop, with the apology and the end of the session.
                notes.push(format!(
                    "more than {MAX_HTTP_ROUNDS} http requests in one turn (an `on_error` loop?); the session ends"
                ));
                let flow = outcome.session.as_ref().map(|s| s.flow_id.as_str());
                effects.push(Effect::Send(crate::engine::apology(
                    flow.unwrap_or_default(),
                    "",
                )));
                outcome.session = None;
                timers = Some(Vec::new());
                break;
            }
            let result = self.http(&request).await;
            let event = Event::Http(HttpOutcome {
                epoch: request.epoch,
                result,
            });
            let session = outcome.session.take();
            outcome = {
                let flows = self.flows.read().expect("flows lock");
                self.engine.handle(&flows, contact, session, event, now)
            };
            if let Some(t) = outcome.timers.take() {
                timers = Some(t);
            }
            if !matches!(outcome.handled, Handled::Continued) {
                handled = outcome.handled.clone();
            }
            notes.append(&mut outcome.notes);
        }
        for note in &notes {
            tracing::warn!(contact = %wa_id, "{note}");
        }
        let session = match &outcome.session {
            Some(s) => {
                let flow = self
                    .flows
                    .read()
                    .expect("flows lock")
                    .version(&s.flow_id, &s.version)
                    .cloned()
                    .expect("the engine only keeps sessions of known flows");
                let (step, state) = s.to_stored(&flow);
                Some(SessionRow {
                    flow_id: s.flow_id.clone(),
                    flow_version: s.version.clone(),
                    step,
                    state,
                    updated_at: now,
                })
            }
            None => None,
        };
        Ok(Ran {
            handled,
            effects,
            session,
            timers,
            notes,
        })
    }

    /// Performs a step's HTTP request.
    async fn http(&self, request: &HttpRequest) -> Result<(u16, serde_json::Value), String> {
        let method =
            reqwest::Method::from_bytes(request.method.as_bytes()).map_err(|e| e.to_string())?;
        let mut builder = self.http.request(method, &request.url).timeout(
            request
                .timeout
                .to_std()
                .unwrap_or(std::time::Duration::from_secs(10)),
        );
        for (k, v) in &request.headers {
            builder = builder.header(k, v);
        }
        if let Some(body) = &request.body {
            builder = builder.json(body);
        }
        let response = builder
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|e| e.to_string())?;
        let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        Ok((status, body))
    }
}
