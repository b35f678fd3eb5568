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
use crate::domain::{Decision, Inbound, Origin, Outbound, OutboundContent, WaId};
use crate::engine::{Effect, Engine, Event, Handled, HttpOutcome, HttpRequest, Session, TimerKind};
use crate::flow::load::compile_bundle;
use crate::flow::{Bundle, Flow, FlowSet};
use crate::store::{Db, NewTimer, OutboundRecord, SessionRow, StoreError, Turn};
use crate::templates::Registry;

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

/// Held while one event of one contact is handled.
type ContactLock = Arc<tokio::sync::Mutex<()>>;

/// The worker state shared by every command that talks to flows.
pub struct Runtime {
    pub db: Db,
    pub engine: Engine,
    pub flows: RwLock<FlowSet>,
    pub templates: Registry,
    pub clock: SharedClock,
    pub channels: Vec<ChannelConfig>,
    /// The channel `chat`, `test` and the sandbox door talk on: the first sandbox channel,
    /// else the first channel.
    pub default_channel: String,
    http: reqwest::Client,
    /// One lock per (channel, contact): a contact's events run one at a time, in order.
    locks: Mutex<HashMap<(String, WaId), ContactLock>>,
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
        clock: SharedClock,
        channels: Vec<ChannelConfig>,
    ) -> Self {
        let default_channel = channels
            .iter()
            .find(|c| c.provider == Provider::Sandbox)
            .or(channels.first())
            .map(|c| c.name.clone())
            .unwrap_or_else(|| "sandbox".into());
        Self {
            db,
            engine,
            flows: RwLock::new(FlowSet::new(flows)),
            templates,
            clock,
            channels,
            default_channel,
            http: reqwest::Client::builder()
                .user_agent(concat!("flowgate/", env!("CARGO_PKG_VERSION")))
                .build()
                .expect("an HTTP client with default settings builds"),
            locks: Mutex::new(HashMap::new()),
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
        self.turn(channel, wa_id, event, Some(&inbound), profile_name, None)
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
        self.turn(channel, wa_id, event, None, None, None).await
    }

    /// An agent's free-text message to a contact.
    pub async fn agent_message(
        &self,
        channel: &str,
        wa_id: &str,
        text: &str,
    ) -> Result<TurnReport, DispatchError> {
        let lock = self.lock(channel, wa_id);
        let _guard = lock.lock().await;
        let conversation = self.db.load_conversation(channel, wa_id).await?;
        let record = OutboundRecord {
            message: Outbound {
                content: OutboundContent::text(text),
                origin: Origin::Agent,
                outside_window: None,
            },
            decision: Decision::Send,
            status: self.outbound_status(channel).to_string(),
            in_reply_to: None,
        };
        let records = [record];
        let session = conversation.session.clone();
        let committed = self
            .db
            .commit_turn(&Turn {
                channel,
                contact_id: conversation.contact_id,
                contact: &conversation.contact,
                session: session.as_ref(),
                inbound: None,
                outbound: &records,
                replace_timers: None,
                fired_timer: None,
                now: self.clock.now(),
            })
            .await?;
        let [record] = records;
        Ok(TurnReport {
            wa_id: wa_id.to_string(),
            handled: Handled::Continued,
            sent: vec![SentMessage {
                id: committed.outbound_ids[0],
                message: record.message,
                decision: record.decision,
            }],
            handoff: None,
            notes: Vec::new(),
        })
    }

    /// Fires every timer due by the clock's now, oldest first.
    pub async fn fire_due_timers(&self) -> Result<Vec<TurnReport>, DispatchError> {
        let mut reports = Vec::new();
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
                    .turn(
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

    pub async fn next_timer_at(&self) -> Result<Option<DateTime<Utc>>, DispatchError> {
        Ok(self.db.next_timer_at().await?)
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
        match compile_bundle(&bundle, &self.engine.scripting, &self.templates) {
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
    async fn turn(
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
        let mut notes = Vec::new();
        let mut session = None;
        if let Some(row) = &conversation.session {
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
            self.engine
                .handle(&flows, &mut contact, session, event, now)
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
                self.engine
                    .handle(&flows, &mut contact, session, event, now)
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
        let session_row = match &outcome.session {
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
        let mut handoff = None;
        let mut records = Vec::new();
        for effect in effects {
            match effect {
                Effect::Send(message) => records.push(OutboundRecord {
                    message,
                    decision: Decision::Send,
                    in_reply_to: inbound.map(|i| i.id.clone()),
                    status: self.outbound_status(channel).to_string(),
                }),
                Effect::Handoff { queue } => {
                    tracing::info!(contact = %wa_id, %queue, "conversation handed to a person");
                    handoff = Some(queue);
                }
                Effect::Http(_) => {}
            }
        }
        let new_timers: Option<Vec<NewTimer>> = timers.map(|ts| {
            ts.into_iter()
                .map(|(due_at, kind)| NewTimer {
                    due_at,
                    payload: serde_json::to_value(kind).expect("timer serializes"),
                })
                .collect()
        });
        let committed = self
            .db
            .commit_turn(&Turn {
                channel,
                contact_id: conversation.contact_id,
                contact: &contact,
                session: session_row.as_ref(),
                inbound,
                outbound: &records,
                replace_timers: new_timers.as_deref(),
                fired_timer,
                now,
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
        Ok(TurnReport {
            wa_id: wa_id.to_string(),
            handled,
            sent: records
                .into_iter()
                .zip(committed.outbound_ids)
                .map(|(r, id)| SentMessage {
                    id,
                    message: r.message,
                    decision: r.decision,
                })
                .collect(),
            handoff,
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
