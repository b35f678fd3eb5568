//! The conversation worker: turns an event for one contact into a committed turn.
//!
//! [`Runtime`] holds what every turn shares (the store, the engine, the flows, the template
//! registry, the policy, the clock, the per-contact locks, the senders' bells) and the doors
//! other code comes in by. One turn's stages live in [`turn`], the engine's part of a turn
//! (HTTP performed and fed back, sessions pinned to their flow version) in [`run`], messages
//! decided again after their turn (at send time, after a refusal) in [`redecide`], what
//! falls due by the clock (timers, queue expiries) in [`due`], and a reply to a campaign
//! entering its `on_reply` flow in [`reply`].
//! Events for one contact are handled one at a time, in order; different contacts run in
//! parallel.

mod due;
pub mod ownership;
mod redecide;
mod reply;
mod run;
mod turn;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, Utc};

use crate::clock::SharedClock;
use crate::config::{ChannelConfig, Provider};
use crate::domain::{Contact, Decision, Inbound, Origin, Outbound, OutboundContent, WaId};
use crate::engine::{Engine, Event, Handled};
use crate::flow::{Flow, FlowSet};
use crate::metrics;
use crate::policy::Policy;
use crate::store::{
    Conversation, Db, OutboundRecord, StoreError, Superseded, TemplateStatusRow, TurnWrite,
};
use crate::templates::{Registry, Status};
use crate::whatsapp::MessagingLimit;

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored session state is unreadable: {0}")]
    Corrupt(String),
    /// Another instance sharing the database held the contact's lease all along.
    #[error("contact {0} is held by another instance; try again later")]
    ContactBusy(String),
}

/// How long a finished download waits for its contact's lease on a shared database: a
/// contact lease lasts 12 s unless renewed, and is given back once its rows are done.
pub const MEDIA_LEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

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

impl TurnReport {
    /// A turn that recorded one message and nothing else (an agent's message, an expiry).
    fn one_message(wa_id: WaId, sent: SentMessage) -> Self {
        Self {
            wa_id,
            handled: Handled::Continued,
            sent: vec![sent],
            handoff: None,
            notes: Vec::new(),
        }
    }

    /// A turn for a customer message handled before: it did nothing.
    fn duplicate(wa_id: &str) -> Self {
        Self {
            wa_id: wa_id.to_string(),
            handled: Handled::Duplicate,
            sent: Vec::new(),
            handoff: None,
            notes: Vec::new(),
        }
    }
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

/// Held while one event of one contact is handled.
pub(crate) type ContactLock = Arc<tokio::sync::Mutex<()>>;

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
    /// Held by a live reload from loading the files to swapping them in, so two reloads
    /// (a SIGHUP and the API at once) cannot swap in an older load last.
    pub reloading: tokio::sync::Mutex<()>,
    /// Per channel: the messaging limit WhatsApp last stated for the number (read by
    /// `serve` from the Graph API); absent until read.
    stated_limits: Mutex<HashMap<String, MessagingLimit>>,
    /// Customers' files: their store and links (`None` where nothing keeps files, as in
    /// runtimes built without [`Runtime::with_media`]).
    pub media: Option<Arc<crate::media::Media>>,
    /// Rung when a turn stored a customer's file to download, so the media worker starts
    /// at once instead of at its next poll.
    pub media_bell: Arc<tokio::sync::Notify>,
    /// On a database several instances share (PostgreSQL): this instance's contact leases,
    /// under which it runs a contact's inbox rows and timers ([`ownership`]); `None` on
    /// SQLite.
    pub ownership: Option<Arc<ownership::Ownership>>,
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
        // Leases on a pool of their own: a heartbeat waiting behind busy turns for a
        // connection would let the leases expire under the turns (a load test did).
        let ownership = db
            .side_pool(ownership::SIDE_POOL)
            .map(|side| Arc::new(ownership::Ownership::new(side, clock.clone())));
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
            reloading: tokio::sync::Mutex::new(()),
            stated_limits: Mutex::new(HashMap::new()),
            media: None,
            media_bell: Arc::new(tokio::sync::Notify::new()),
            ownership,
        }
    }

    /// This runtime with customers' files kept and linked by `media`.
    pub fn with_media(self, media: Arc<crate::media::Media>) -> Self {
        Self {
            media: Some(media),
            ..self
        }
    }

    /// The download of a customer's file ended (`row` is `ok` or `failed`): a turn for its
    /// contact, in the contact's order like any event, that hands an `ask` waiting for the
    /// file its variable ([`Event::Media`]); a session that moved on ignores it. On a shared
    /// database the turn runs under the contact's lease, like every other turn of the
    /// contact; while another instance holds it, this waits up to [`MEDIA_LEASE_WAIT`].
    pub async fn media_ready(
        &self,
        row: &crate::store::MediaRow,
    ) -> Result<TurnReport, DispatchError> {
        let now = self.clock.now();
        let value = match &self.media {
            Some(media) => media.value(row, now),
            None => serde_json::json!({"status": "failed", "error": "no media store"}),
        };
        let event = Event::Media {
            message: row.wamid.clone(),
            value,
        };
        let Some(ownership) = &self.ownership else {
            return self
                .handle(&row.channel, &row.wa_id, event, None, None, None)
                .await;
        };
        let lease = crate::store::LeaseKey::new(&row.channel, &row.wa_id);
        let deadline = tokio::time::Instant::now() + MEDIA_LEASE_WAIT;
        while !ownership.acquire(&lease).await? {
            if tokio::time::Instant::now() >= deadline {
                return Err(DispatchError::ContactBusy(row.wa_id.clone()));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let report = self
            .handle(&row.channel, &row.wa_id, event, None, None, None)
            .await;
        ownership.release(&lease).await;
        report
    }

    /// Remembers the messaging limit WhatsApp states for `channel`'s number.
    pub fn state_messaging_limit(&self, channel: &str, limit: MessagingLimit) {
        let mut stated = self.stated_limits.lock().expect("stated limits lock");
        stated.insert(channel.to_string(), limit);
    }

    /// The unique business-initiated recipients `channel` may reach in 24 h: the tighter of
    /// its `messaging_limit` key and what WhatsApp last stated; `None` for no limit.
    pub fn messaging_limit(&self, channel: &str) -> Option<u32> {
        let configured = self
            .channels
            .iter()
            .find(|c| c.name == channel)
            .and_then(|c| c.messaging_limit);
        let stated = self.stated_limits.lock().expect("stated limits lock");
        match stated.get(channel) {
            Some(limit) => limit.with_configured(configured),
            None => configured,
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

    /// Makes a freshly loaded project's flows and template registry current (a live
    /// reload); running sessions stay on their versions, and the template statuses WhatsApp
    /// reported since the registry file was written apply again.
    pub async fn reload_project(
        &self,
        flows: Vec<Arc<Flow>>,
        templates: Registry,
    ) -> Result<(), DispatchError> {
        *self.templates.write().expect("templates lock") = Arc::new(templates);
        self.load_template_statuses().await?;
        self.reload(flows).await
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

    /// Gives a handed-off conversation back to the bot (the API's
    /// `POST /api/conversations/{contact}/resume`, `chat`'s `/resume`): at `flow` (and
    /// `step`), else where the handoff step goes on. A conversation not in handoff is left
    /// as it is ([`Handled::NotInHandoff`]).
    pub async fn end_handoff(
        &self,
        channel: &str,
        wa_id: &str,
        flow: Option<&str>,
        step: Option<&str>,
    ) -> Result<TurnReport, DispatchError> {
        let event = Event::Resume {
            flow: flow.map(str::to_string),
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
        Ok(TurnReport::one_message(wa_id.to_string(), sent))
    }

    /// What the policy would decide now for an agent's message to a contact, without
    /// sending it: the console shows it before the agent sends. The same pure decision
    /// [`Runtime::agent_message`] takes, on the contact as stored.
    pub async fn preview_agent_message(
        &self,
        channel: &str,
        wa_id: &str,
        content: OutboundContent,
    ) -> Result<Decision, DispatchError> {
        let conversation = self.db.load_conversation(channel, wa_id).await?;
        let message = Outbound::new(content, Origin::Agent);
        let templates = self.templates();
        Ok(self.policy.decide(
            &message,
            &conversation.contact,
            &templates,
            self.clock.now(),
        ))
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

    /// The lock of one contact: held while one of its events is handled, and while anything
    /// else changes its policy state.
    pub(crate) fn lock(&self, channel: &str, wa_id: &str) -> ContactLock {
        let mut locks = self.locks.lock().expect("locks");
        if locks.len() > 10_000 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks
            .entry((channel.to_string(), wa_id.to_string()))
            .or_default()
            .clone()
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
}
