//! The engine's part of a turn: the stored session resumed in the flow version it is pinned
//! to, the pure engine run, the HTTP requests its steps ask for performed and their results
//! fed back as events, until the flow waits or ends; then the session as it is stored.
//!
//! The engine runs scripts and `if:` expressions, which are CPU work: each run goes to
//! tokio's blocking pool, at most one per core at a time, so a heavy script (stopped by the
//! sandbox's time limit) never holds an async worker, and webhooks, the outbox and other
//! customers' turns go on beside it.

use std::sync::{Arc, OnceLock};

use chrono::{DateTime, Utc};

use crate::domain::Contact;
use crate::engine::{
    Effect, Event, Handled, HttpOutcome, HttpRequest, Outcome, Session, TimerKind,
};
use crate::flow::load::compile_bundle;
use crate::flow::{Bundle, Flow, FlowSet};
use crate::metrics;
use crate::store::SessionRow;

use super::turn::{Ran, Turn};
use super::{DispatchError, Runtime};

/// HTTP round trips one event may trigger (a flow of chained `http` steps).
const MAX_HTTP_ROUNDS: usize = 16;

/// The engine's outcomes for one event, folded together as HTTP results come back.
struct Folded {
    /// The latest outcome's session.
    session: Option<Session>,
    /// The latest outcome's effects, not yet sorted into `effects` and a request.
    latest: Vec<Effect>,
    /// Messages and handoffs, in order.
    effects: Vec<Effect>,
    timers: Option<Vec<(DateTime<Utc>, TimerKind)>>,
    handled: Handled,
    notes: Vec<String>,
    /// HTTP requests performed so far.
    rounds: usize,
}

impl Runtime {
    /// Runs the engine for one event, performing the HTTP requests its steps ask for.
    pub(super) async fn run_engine(
        &self,
        turn: &mut Turn<'_>,
        event: Event,
    ) -> Result<Ran, DispatchError> {
        let mut notes = Vec::new();
        let session = self
            .resume(turn.conversation.session.as_ref(), &mut notes)
            .await?;
        let contact = &mut turn.conversation.contact;
        let first = self
            .engine_handle(contact, session, event, turn.now, 0)
            .await;
        let mut folded = Folded::new(notes, first);
        while let Some(request) = folded.next_request() {
            folded.rounds += 1;
            if folded.rounds > MAX_HTTP_ROUNDS {
                folded.stop_http_loop();
                break;
            }
            let result = self.http(&request).await;
            let event = Event::Http(HttpOutcome {
                epoch: request.epoch,
                result,
            });
            let session = folded.session.take();
            let sent = folded.sent();
            let outcome = self
                .engine_handle(contact, session, event, turn.now, sent)
                .await;
            folded.fold(outcome);
        }
        for note in &folded.notes {
            tracing::warn!(contact = %turn.wa_id, "{note}");
        }
        Ok(Ran {
            session: folded
                .session
                .as_ref()
                .map(|s| self.session_row(s, turn.now)),
            handled: folded.handled,
            effects: folded.effects,
            timers: folded.timers,
            notes: folded.notes,
        })
    }

    /// The stored session, in the flow version it is pinned to; `None` (with a note saying
    /// why) when there is none to resume.
    async fn resume(
        &self,
        stored: Option<&SessionRow>,
        notes: &mut Vec<String>,
    ) -> Result<Option<Session>, DispatchError> {
        let Some(row) = stored else {
            return Ok(None);
        };
        let Some(flow) = self.pinned_flow(row).await? else {
            notes.push(format!(
                "flow `{}` version {} is gone; the session ends",
                row.flow_id, row.flow_version
            ));
            return Ok(None);
        };
        let session = Session::from_stored(&flow, &row.step, &row.state);
        if session.is_none() {
            notes.push(format!(
                "the stored session in flow `{}` is unreadable; starting over",
                row.flow_id
            ));
        }
        Ok(session)
    }

    /// One run of the pure engine over the current flows, on the blocking pool; `sent`:
    /// messages the turn sent before this event (its cap counts the whole turn).
    async fn engine_handle(
        &self,
        contact: &mut Contact,
        session: Option<Session>,
        event: Event,
        now: DateTime<Utc>,
        sent: usize,
    ) -> Outcome {
        let flows = self.engine_flows(session.as_ref());
        let engine = self.engine.clone();
        let mut owned = contact.clone();
        let permit = cores()
            .acquire()
            .await
            .expect("the cores' semaphore is never closed");
        let ran = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let outcome = engine.handle_after(&flows, &mut owned, session, event, now, sent);
            (outcome, owned)
        })
        .await;
        let (outcome, owned) = ran.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        *contact = owned;
        count(&outcome);
        outcome
    }

    /// What the engine may reach in one event, owned so it can move to the blocking pool:
    /// the current flows (triggers, `flow:` jumps) and the version `session` is pinned to.
    fn engine_flows(&self, session: Option<&Session>) -> FlowSet {
        let flows = self.flows.read().expect("flows lock");
        let mut owned = FlowSet::new(flows.current().to_vec());
        if let Some(pinned) = session.and_then(|s| flows.version(&s.flow_id, &s.version)) {
            owned.add_version(pinned.clone());
        }
        owned
    }

    /// The session as it is stored, in the flow version it runs in.
    fn session_row(&self, session: &Session, now: DateTime<Utc>) -> SessionRow {
        let flow = self
            .flows
            .read()
            .expect("flows lock")
            .version(&session.flow_id, &session.version)
            .cloned()
            .expect("the engine only keeps sessions of known flows");
        let (step, state) = session.to_stored(&flow);
        SessionRow {
            flow_id: session.flow_id.clone(),
            flow_version: session.version.clone(),
            step,
            state,
            updated_at: now,
        }
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

/// One engine run at a time per core: scripts are CPU work, and more runs than cores would
/// only make each one slower.
fn cores() -> &'static tokio::sync::Semaphore {
    static CORES: OnceLock<tokio::sync::Semaphore> = OnceLock::new();
    CORES.get_or_init(|| {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        tokio::sync::Semaphore::new(n)
    })
}

/// The engine's stops that `/metrics` counts.
fn count(outcome: &Outcome) {
    if outcome.message_capped {
        metrics::count(
            "flowgate_turn_message_cap_total",
            "Turns stopped at their cap on messages (limits.messages_per_turn), a loop that sends.",
            &[],
            1,
        );
    }
    if outcome.script_timeouts > 0 {
        metrics::count(
            "flowgate_script_timeouts_total",
            "Scripts and expressions stopped by their time limit (limits.script_timeout).",
            &[],
            outcome.script_timeouts as u64,
        );
    }
}

impl Folded {
    fn new(notes: Vec<String>, first: Outcome) -> Self {
        let mut folded = Self {
            session: first.session,
            latest: first.effects,
            effects: Vec::new(),
            timers: first.timers,
            handled: first.handled,
            notes,
            rounds: 0,
        };
        folded.notes.extend(first.notes);
        folded
    }

    /// Messages the turn has sent so far.
    fn sent(&self) -> usize {
        self.effects
            .iter()
            .chain(&self.latest)
            .filter(|e| matches!(e, Effect::Send(_)))
            .count()
    }

    /// Sorts the latest outcome's effects: messages and handoffs are kept, the HTTP request
    /// (a step asks for one at most) is returned to be performed.
    fn next_request(&mut self) -> Option<HttpRequest> {
        let mut request = None;
        for effect in std::mem::take(&mut self.latest) {
            match effect {
                Effect::Http(r) => request = Some(r),
                other => self.effects.push(other),
            }
        }
        request
    }

    /// The outcome of an HTTP result fed back: its timers replace the earlier ones, and
    /// how the event was handled changes only when it says more than "continued".
    fn fold(&mut self, outcome: Outcome) {
        self.session = outcome.session;
        self.latest = outcome.effects;
        if let Some(timers) = outcome.timers {
            self.timers = Some(timers);
        }
        if !matches!(outcome.handled, Handled::Continued) {
            self.handled = outcome.handled;
        }
        self.notes.extend(outcome.notes);
    }

    /// An `on_error` that loops back to its own `http` step: stop like the engine stops a
    /// `goto` loop, with the apology and the end of the session.
    fn stop_http_loop(&mut self) {
        self.notes.push(format!(
            "more than {MAX_HTTP_ROUNDS} http requests in one turn (an `on_error` loop?); the session ends"
        ));
        let flow = self.session.as_ref().map(|s| s.flow_id.as_str());
        self.effects
            .push(Effect::Send(Box::new(crate::engine::apology(
                flow.unwrap_or_default(),
                "",
            ))));
        self.session = None;
        self.timers = Some(Vec::new());
    }
}
