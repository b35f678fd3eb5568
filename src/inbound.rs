//! The inbound worker: processes the webhook updates that `http::webhook` stored in the
//! inbox, after the webhook was acknowledged.
//!
//! Owns the row a webhook update is stored as ([`inbox_row`]: the `whatsapp::Update`
//! serialized, with its contact) and the loop that works through the rows ([`run`],
//! [`drain_once`]), on the [`AppState`] it shares with the HTTP handlers:
//!
//! * **Order per contact, parallel across contacts.** Claimed rows are grouped by contact
//!   (`channel` + `contact_key`); a group runs as one task that takes its rows in id order,
//!   one at a time; at most [`CONCURRENCY`] rows are processed at once. Rows that are not
//!   part of a conversation (statuses, errors, template and preference events…) each run on
//!   their own.
//! * **Pipelined.** A wake-up (the webhook's `Notify`) claims only rows above the last one
//!   seen and hands them to the running groups, so a new message does not wait for a whole
//!   batch to finish; a full claim every second picks up retries.
//! * **Exactly once.** A row is marked processed after its work committed. A crash in between
//!   leaves it to be processed again: a message whose turn already committed is recognised by
//!   its wamid (in the message log, and unique there: the runtime answers
//!   `Handled::Duplicate`), a status only ever moves a message forward, so nothing runs twice.
//! * **Retries.** A row that fails (a database error, a status for a send not recorded yet) is
//!   postponed with exponential backoff, and the rest of its contact's rows wait behind it;
//!   after [`MAX_ATTEMPTS`] ([`MAX_STATUS_ATTEMPTS`] for statuses) it is given up, processed
//!   with its error, and logged.
//!
//! What each kind does (one step each; `Worker::route` only picks the step):
//!
//! * a customer's message (`customer_message`) runs the flows (`Runtime::inbound`) on the
//!   contact its phone and BSUID name ([`crate::store::Db::resolve_contact`]);
//! * a status (`status`) moves the outbound message forward
//!   ([`crate::store::Db::apply_status`]); a `failed` one with `131047`, `131050` or `131049`
//!   goes to the policy (`message_failed`, `Runtime::message_failed`);
//! * a marketing preference (`preference`) changes the contact's consent;
//! * a system message (`identity_change`: a number or BSUID change) moves the contact to its
//!   new identity ([`crate::store::Db::change_identity`]);
//! * a template status update (`template_status`) changes the registry
//!   (`Runtime::template_status_changed`);
//! * `errors` (`whatsapp_errors`) are logged and counted by code; unknown and malformed
//!   updates are logged and skipped.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, Semaphore, watch};

use crate::dispatch::ownership::Ownership;
use crate::domain::Inbound;
use crate::engine::Handled;
use crate::metrics;
use crate::policy::{ConsentChange, Policy};
use crate::state::AppState;
use crate::store::{
    DeliveryStatus, INBOX_RETENTION, Identifiers, IdentityChanged, InboxRow, LeaseKey, NewInboxRow,
    ORDERED_KINDS, StatusChange, StatusOutcome, StoreError, status_rank,
};
use crate::whatsapp::{GraphError, Preference, StatusKind, Update};

/// Rows processed at the same time, across contacts.
pub const CONCURRENCY: usize = 64;
/// Rows per claim.
pub const BATCH: i64 = 1000;
/// Claimed rows held in memory at most; beyond this the worker claims again only as rows
/// finish.
pub const MAX_IN_FLIGHT: usize = 5000;
/// Attempts before a failing update is given up.
pub const MAX_ATTEMPTS: i64 = 20;
/// Attempts before a status whose message is unknown is given up (about 8.5 minutes).
pub const MAX_STATUS_ATTEMPTS: i64 = 10;
/// How often the worker looks for due retries without being woken.
const TICK: Duration = Duration::from_secs(1);
/// How often processed rows older than [`INBOX_RETENTION`] are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
const PRUNE_BATCH: i64 = 10_000;
/// How long shutdown waits for the rows in flight (turns with `http` steps included).
const SHUTDOWN_WAIT: Duration = Duration::from_secs(30);
/// How long [`drain_once`] waits for one round of rows.
const DRAIN_WAIT: Duration = Duration::from_secs(120);

/// The contact an update is about: the phone (wa_id) when known, else the BSUID. The inbox
/// groups updates by it (`group_key`).
pub fn contact_key(update: &Update) -> Option<&str> {
    fn pick<'a>(phone: &'a Option<String>, bsuid: &'a Option<String>) -> Option<&'a str> {
        phone
            .as_deref()
            .filter(|s| !s.is_empty())
            .or(bsuid.as_deref().filter(|s| !s.is_empty()))
    }
    match update {
        Update::Message { wa_id, user_id, .. } | Update::UserPreference { wa_id, user_id, .. } => {
            pick(wa_id, user_id)
        }
        // In the group of the customer's new identity: their next message, which may come
        // soon after, must find the change made.
        Update::System {
            previous_wa_id,
            previous_user_id,
            new_wa_id,
            new_user_id,
            ..
        } => pick(new_wa_id, new_user_id).or(pick(previous_wa_id, previous_user_id)),
        Update::Status {
            recipient_id,
            recipient_user_id,
            ..
        } => pick(recipient_id, recipient_user_id),
        Update::Error { .. }
        | Update::TemplateStatus { .. }
        | Update::Unknown { .. }
        | Update::Malformed { .. } => None,
    }
}

/// The inbox row for one parsed update on `channel`.
pub fn inbox_row(channel: &str, update: Update) -> NewInboxRow {
    let dedupe_key = update.dedupe_key();
    let kind = update.kind().to_string();
    let contact_key = contact_key(&update).map(str::to_string);
    NewInboxRow {
        channel: channel.to_string(),
        dedupe_key,
        kind,
        contact_key,
        payload: serde_json::to_string(&update).expect("an update serializes"),
        delivery: delivery_status(&update),
    }
}

/// The status a webhook's write applies at once ([`NewInboxRow::delivery`]): `sent`,
/// `delivered`, `read` and `played` without errors. A `failed` one goes through the worker,
/// which hands it to the policy.
fn delivery_status(update: &Update) -> Option<DeliveryStatus> {
    let Update::Status {
        wamid,
        status,
        errors,
        biz_opaque_callback_data,
        ..
    } = update
    else {
        return None;
    };
    let moves_forward = matches!(
        status,
        StatusKind::Sent | StatusKind::Delivered | StatusKind::Read | StatusKind::Played
    );
    (moves_forward && errors.is_empty()).then(|| DeliveryStatus {
        wamid: wamid.clone(),
        status: status.as_str().to_owned(),
        idempotency_key: biz_opaque_callback_data.clone(),
    })
}

/// Counts delivery statuses that moved their message, wherever they were applied (the
/// webhook's write or the worker).
pub fn count_moved_statuses(status: &str, n: u64) {
    if n > 0 {
        metrics::count(
            "flowgate_message_statuses_total",
            "Delivery statuses applied to outbound messages, by status.",
            &[("status", label(status))],
            n,
        );
    }
}

/// Processes inbox rows until `shutdown` turns true (or its sender is dropped), woken by
/// `state.inbox` and every second. On shutdown it stops claiming, lets the rows it holds
/// finish and records them.
pub async fn run(state: AppState, mut shutdown: watch::Receiver<bool>) {
    let worker = Worker::new(state);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_prune: Option<tokio::time::Instant> = None;
    // Finished rows are recorded by a task of their own: a record waits for the database's
    // writer, and new webhooks must not wait behind it to be claimed.
    let recorder = tokio::spawn(record_finished(worker.clone(), shutdown.clone()));
    tracing::debug!("inbound worker started");
    loop {
        if *shutdown.borrow() {
            break;
        }
        let full = tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break;
                }
                continue;
            }
            _ = worker.state.inbox.notified() => false,
            _ = tick.tick() => true,
        };
        worker.pump_logged(full).await;
        if full {
            worker.flush().await;
            if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) && worker.prune().await {
                last_prune = Some(tokio::time::Instant::now());
            }
        }
    }
    let _ = recorder.await;
    worker.wait_idle(SHUTDOWN_WAIT).await;
    tracing::debug!("inbound worker stopped");
}

/// Records finished rows as they finish (each record takes every row finished by then);
/// when the last claim was cut short, rings for more.
async fn record_finished(worker: Arc<Worker>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            _ = worker.finished.notified() => {}
        }
        worker.flush().await;
        if worker.wants_more.swap(false, Ordering::Relaxed) {
            worker.state.inbox.notify_one();
        }
    }
}

/// Processes every inbox row due now (and those that become due while it runs, e.g. the
/// later rows of a contact), waiting for all of them; returns how many rows it processed or
/// gave up. Safe beside a running [`run`] (a row taken by both is handled once: see the
/// module docs), though tests normally use one or the other.
pub async fn drain_once(state: &AppState) -> usize {
    let worker = Worker::new(state.clone());
    loop {
        let before = worker.settled.load(Ordering::Relaxed);
        let dispatched = match worker.pump(true).await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "claiming inbox rows failed");
                0
            }
        };
        worker.wait_idle(DRAIN_WAIT).await;
        if dispatched == 0 || worker.settled.load(Ordering::Relaxed) == before {
            break;
        }
    }
    worker.handled.load(Ordering::Relaxed)
}

/// What processing one row came to.
#[derive(Debug)]
enum Outcome {
    Done,
    /// Try again after `delay`; the contact's later rows wait.
    Retry {
        delay: chrono::Duration,
        error: String,
    },
    /// Processed without success: recorded with the reason, never tried again.
    GiveUp(String),
}

struct Worker {
    state: AppState,
    /// On a shared database: the contact leases rows are claimed under (see
    /// [`crate::dispatch::ownership`]).
    ownership: Option<Arc<Ownership>>,
    /// Rows received before this worker started may have been processed by a previous
    /// process that crashed before recording it: those are checked against the message log.
    started_at: DateTime<Utc>,
    permits: Semaphore,
    inner: Mutex<Inner>,
    /// A row finished: flush, and maybe claim more.
    finished: Notify,
    /// A group ended or a flush happened (for [`Worker::wait_idle`]).
    progress: Notify,
    /// The last claim stopped at [`MAX_IN_FLIGHT`].
    wants_more: std::sync::atomic::AtomicBool,
    /// Held by a full claim and by a record of finished rows: a full claim reads every
    /// unprocessed row, and one it read just before their record committed must still be
    /// in flight when it dispatches, or it would run again.
    full_claim: tokio::sync::Mutex<()>,
    /// Rows processed or given up.
    handled: AtomicUsize,
    /// Rows processed, given up or postponed (progress, for [`drain_once`]).
    settled: AtomicUsize,
}

#[derive(Default)]
struct Inner {
    /// Claimed rows not yet recorded as processed or postponed.
    in_flight: HashSet<i64>,
    /// Rows waiting in each running group (a group runs while it has an entry here).
    queues: HashMap<String, VecDeque<InboxRow>>,
    /// Groups whose row was postponed, with the count of full claims begun before that: a
    /// claim begun earlier may hold their later rows, which must not run first.
    stopped: HashMap<String, u64>,
    full_claims: u64,
    /// The highest row id claimed so far.
    high_water: i64,
    /// Processed rows not yet recorded.
    done: Vec<i64>,
    /// On a shared database: the lease each row in flight is held under.
    leases: HashMap<i64, LeaseKey>,
}

impl Inner {
    /// A row is no longer in flight (recorded, let go, or given up): its lease, if any, is
    /// one use lighter.
    fn forget(&mut self, id: i64, ownership: Option<&Ownership>) {
        self.in_flight.remove(&id);
        if let Some(lease) = self.leases.remove(&id)
            && let Some(ownership) = ownership
        {
            ownership.unhold(&lease);
        }
    }
}

impl Worker {
    fn new(state: AppState) -> Arc<Self> {
        let started_at = state.runtime.clock.now();
        Arc::new(Self {
            ownership: state.runtime.ownership.clone(),
            state,
            started_at,
            permits: Semaphore::new(CONCURRENCY),
            inner: Mutex::new(Inner::default()),
            finished: Notify::new(),
            progress: Notify::new(),
            wants_more: Default::default(),
            full_claim: tokio::sync::Mutex::new(()),
            handled: AtomicUsize::new(0),
            settled: AtomicUsize::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("inbound worker lock")
    }

    async fn pump_logged(self: &Arc<Self>, full: bool) {
        if let Err(e) = self.pump(full).await {
            tracing::error!(error = %e, "claiming inbox rows failed; retrying in a second");
            metrics::count(
                "flowgate_inbound_worker_errors_total",
                "Inbound worker failures to claim or record inbox rows.",
                &[],
                1,
            );
        }
    }

    /// Claims due rows (all of them, or only those above the high-water mark) and hands them
    /// to their groups; returns how many it dispatched.
    async fn pump(self: &Arc<Self>, full: bool) -> Result<usize, StoreError> {
        // On a shared database every claim excludes a record: a record releases leases,
        // and none may be released while rows read under it are being dispatched.
        let _exclusive = match full || self.ownership.is_some() {
            true => Some(self.full_claim.lock().await),
            false => None,
        };
        let mut full = full;
        let _gate = match &self.ownership {
            Some(ownership) => {
                let gate = ownership.gate().await;
                // A contact new to this instance may have rows below the high-water mark.
                full |= ownership.take_inbox().await?;
                Some(gate)
            }
            None => None,
        };
        let Some((after, generation)) = self.begin_claim(full) else {
            return Ok(0);
        };
        let now = self.state.runtime.clock.now();
        let db = &self.state.runtime.db;
        let rows = match &self.ownership {
            Some(ownership) => {
                db.claim_owned_inbox(ownership.owner(), after, now, BATCH)
                    .await?
            }
            None => db.claim_inbox_after(after, now, BATCH).await?,
        };
        let claimed = rows.len();
        let (dispatched, started) = self.dispatch(rows, full, generation);
        for key in started {
            tokio::spawn(self.clone().run_group(key));
        }
        if claimed as i64 >= BATCH && !full {
            // More may be waiting above the new high-water mark.
            self.state.inbox.notify_one();
        }
        Ok(dispatched)
    }

    /// Where a claim starts (0 for a full claim, else the high-water mark) and the full
    /// claims begun so far, this one included; `None` when [`MAX_IN_FLIGHT`] rows are held
    /// already (the worker claims again as they finish).
    fn begin_claim(&self, full: bool) -> Option<(i64, u64)> {
        let mut inner = self.lock();
        if inner.in_flight.len() >= MAX_IN_FLIGHT {
            self.wants_more.store(true, Ordering::Relaxed);
            return None;
        }
        if full {
            inner.full_claims += 1;
            Some((0, inner.full_claims))
        } else {
            Some((inner.high_water, inner.full_claims))
        }
    }

    /// Queues claimed rows behind their groups, skipping rows already in flight and rows of
    /// a stopped group; returns how many it queued and the groups that must start.
    fn dispatch(&self, rows: Vec<InboxRow>, full: bool, generation: u64) -> (usize, Vec<String>) {
        let claimed = rows.len();
        let mut started = Vec::new();
        let mut dispatched = 0;
        let mut inner = self.lock();
        if full {
            // This claim saw every postponement recorded before it began.
            inner.stopped.retain(|_, g| *g >= generation);
        }
        for row in rows {
            inner.high_water = inner.high_water.max(row.id);
            if inner.in_flight.contains(&row.id) {
                continue;
            }
            let key = group_key(&row);
            if let Some(&g) = inner.stopped.get(&key)
                && (!full || g >= generation)
            {
                continue;
            }
            inner.in_flight.insert(row.id);
            if let Some(ownership) = &self.ownership {
                let lease = LeaseKey::of_inbox_row(&row);
                ownership.hold(lease.clone());
                inner.leases.insert(row.id, lease);
            }
            dispatched += 1;
            match inner.queues.get_mut(&key) {
                Some(queue) => queue.push_back(row),
                None => {
                    inner.queues.insert(key.clone(), VecDeque::from([row]));
                    started.push(key);
                }
            }
        }
        if claimed as i64 >= BATCH || inner.in_flight.len() >= MAX_IN_FLIGHT {
            self.wants_more.store(true, Ordering::Relaxed);
        }
        (dispatched, started)
    }

    /// Works through one group's rows in order until its queue is empty or a row is
    /// postponed.
    async fn run_group(self: Arc<Self>, key: String) {
        while let Some(row) = self.next_in_group(&key) {
            let outcome = {
                let _permit = self.permits.acquire().await.expect("never closed");
                self.process_timed(&row).await
            };
            if !self.settle(&row, outcome).await {
                self.stop_group(key, &row);
                return;
            }
        }
    }

    /// The group's next row; `None` ends the group (its queue is removed).
    fn next_in_group(&self, key: &str) -> Option<InboxRow> {
        let mut inner = self.lock();
        if let Some(row) = inner.queues.get_mut(key).and_then(VecDeque::pop_front) {
            return Some(row);
        }
        inner.queues.remove(key);
        drop(inner);
        self.progress.notify_waiters();
        None
    }

    /// Ends a group at a row that stays to do: its later rows are let go (a later claim
    /// takes them again, after the row), and the group is marked stopped until a full claim
    /// begun after now.
    fn stop_group(&self, key: String, row: &InboxRow) {
        let mut inner = self.lock();
        let ownership = self.ownership.as_deref();
        if let Some(rest) = inner.queues.remove(&key) {
            for r in rest {
                inner.forget(r.id, ownership);
            }
        }
        inner.forget(row.id, ownership);
        let generation = inner.full_claims;
        inner.stopped.insert(key, generation);
        drop(inner);
        self.progress.notify_waiters();
    }

    /// Records an outcome; `false` when the row stays to do (the group stops).
    async fn settle(&self, row: &InboxRow, outcome: Outcome) -> bool {
        match outcome {
            Outcome::Done => {
                self.lock().done.push(row.id);
                self.handled.fetch_add(1, Ordering::Relaxed);
                self.settled.fetch_add(1, Ordering::Relaxed);
                self.finished.notify_one();
                true
            }
            Outcome::GiveUp(reason) => self.give_up(row, &reason).await,
            Outcome::Retry { delay, error } => {
                self.postpone(row, delay, &error).await;
                false
            }
        }
    }

    /// Records a row as given up, with its reason; `false` when that could not be recorded
    /// (the row stays to do).
    async fn give_up(&self, row: &InboxRow, reason: &str) -> bool {
        let now = self.state.runtime.clock.now();
        tracing::error!(
            inbox = row.id, kind = %row.kind, channel = %row.channel,
            attempts = row.attempts + 1, error = %reason,
            "giving up on a webhook update"
        );
        metrics::count(
            "flowgate_inbox_abandoned_total",
            "Webhook updates given up after repeated failures, by kind.",
            &[("kind", label(&row.kind))],
            1,
        );
        // Like a record of finished rows: not beside a full claim.
        let _exclusive = self.full_claim.lock().await;
        match self
            .state
            .runtime
            .db
            .abandon_inbox(row.id, now, reason)
            .await
        {
            Ok(()) => {
                self.lock().forget(row.id, self.ownership.as_deref());
                self.handled.fetch_add(1, Ordering::Relaxed);
                self.settled.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::error!(inbox = row.id, error = %e, "could not record an abandoned update");
                false
            }
        }
    }

    /// Postpones a row by `delay`, with its error.
    async fn postpone(&self, row: &InboxRow, delay: chrono::Duration, error: &str) {
        let now = self.state.runtime.clock.now();
        tracing::warn!(
            inbox = row.id, kind = %row.kind, channel = %row.channel,
            attempt = row.attempts + 1, retry_in_s = delay.num_seconds(), error = %error,
            "webhook update postponed"
        );
        match self
            .state
            .runtime
            .db
            .retry_inbox(row.id, now + delay, error)
            .await
        {
            Ok(()) => {
                self.settled.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::error!(inbox = row.id, error = %e, "could not postpone an update");
            }
        }
    }

    /// Records processed rows in one statement; on a shared database, then gives back the leases of contacts with nothing left here.
    async fn flush(&self) {
        let _exclusive = self.full_claim.lock().await;
        self.record_done().await;
        if let Some(ownership) = &self.ownership {
            ownership.release_idle().await;
        }
    }

    /// [`Worker::flush`]'s record (hold `full_claim`).
    async fn record_done(&self) {
        let ids = std::mem::take(&mut self.lock().done);
        if ids.is_empty() {
            return;
        }
        let now = self.state.runtime.clock.now();
        match self.state.runtime.db.finish_inbox(&ids, now).await {
            Ok(()) => {
                let mut inner = self.lock();
                for id in &ids {
                    inner.forget(*id, self.ownership.as_deref());
                }
            }
            Err(e) => {
                tracing::error!(error = %e, rows = ids.len(), "could not mark inbox rows processed; will retry");
                self.lock().done.extend(ids);
            }
        }
        self.progress.notify_waiters();
    }

    /// Waits until every claimed row is processed and recorded, or `limit` passed (rows
    /// not recorded by then are processed again after a restart, and recognised).
    async fn wait_idle(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            self.flush().await;
            let notified = self.progress.notified();
            {
                let inner = self.lock();
                if inner.queues.is_empty() && inner.in_flight.is_empty() {
                    return;
                }
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!(
                        rows = inner.in_flight.len(),
                        "inbound worker stopped with rows still in flight; they run again on restart"
                    );
                    return;
                }
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        }
    }

    /// Deletes old processed rows; `true` when nothing more is left to delete.
    async fn prune(&self) -> bool {
        let before = self.state.runtime.clock.now() - INBOX_RETENTION;
        match self.state.runtime.db.prune_inbox(before, PRUNE_BATCH).await {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(rows = n, "pruned processed webhook updates");
                }
                (n as i64) < PRUNE_BATCH
            }
            Err(e) => {
                tracing::warn!(error = %e, "pruning the inbox failed");
                true
            }
        }
    }

    /// The key of the contact `ids` name (see [`Db::resolve_contact`]), warning when they
    /// name two contacts.
    async fn resolve(
        &self,
        channel: &str,
        ids: Identifiers<'_>,
    ) -> Result<Option<String>, StoreError> {
        let runtime = &self.state.runtime;
        let resolved = runtime
            .db
            .resolve_contact(channel, ids, runtime.clock.now())
            .await?;
        Ok(resolved.map(|resolved| {
            if let Some(conflict) = &resolved.conflict {
                tracing::warn!(channel, contact = %resolved.key, conflict = %conflict, "a customer has two contacts");
            }
            resolved.key
        }))
    }

    /// Does what one row asks; a payload that cannot be read is given up.
    /// [`Worker::process`], its wait in the inbox and a customer message's turn measured
    /// (`flowgate_stage_seconds`).
    async fn process_timed(&self, row: &InboxRow) -> Outcome {
        // A first attempt only: a retried row's wait is its back-off.
        if row.attempts == 0 {
            let waited = self.state.runtime.clock.now() - row.received_at;
            metrics::observe_stage(
                "inbox_wait",
                waited.to_std().unwrap_or_default().as_secs_f64(),
            );
        }
        if row.kind != "message" {
            return self.process(row).await;
        }
        let started = std::time::Instant::now();
        let outcome = self.process(row).await;
        metrics::observe_stage("turn", started.elapsed().as_secs_f64());
        outcome
    }

    async fn process(&self, row: &InboxRow) -> Outcome {
        match serde_json::from_str::<Update>(&row.payload) {
            Ok(update) => self.route(row, update).await,
            Err(e) => Outcome::GiveUp(format!("unreadable inbox payload: {e}")),
        }
    }

    /// Hands an update to the step for its kind.
    async fn route(&self, row: &InboxRow, update: Update) -> Outcome {
        match update {
            Update::Message {
                wa_id,
                user_id,
                profile_name,
                inbound,
                ..
            } => {
                let ids = Identifiers::new(wa_id.as_deref(), user_id.as_deref());
                self.customer_message(row, ids, profile_name.as_deref(), inbound)
                    .await
            }
            Update::System {
                kind,
                previous_wa_id,
                new_wa_id,
                previous_user_id,
                new_user_id,
                ..
            } => {
                let change = IdentityChange {
                    kind,
                    previous_wa_id,
                    new_wa_id,
                    previous_user_id,
                    new_user_id,
                };
                self.identity_change(row, change).await
            }
            Update::Status {
                wamid,
                status,
                errors,
                biz_opaque_callback_data,
                ..
            } => {
                self.status(
                    row,
                    &wamid,
                    status.as_str(),
                    errors.first(),
                    biz_opaque_callback_data.as_deref(),
                )
                .await
            }
            Update::Error { errors, .. } => whatsapp_errors(row, &errors),
            Update::TemplateStatus {
                event,
                name,
                language,
                reason,
                category,
                ..
            } => {
                let change = TemplateChange {
                    event,
                    name,
                    language,
                    reason,
                    category,
                };
                self.template_status(row, change).await
            }
            Update::UserPreference {
                value,
                category,
                timestamp,
                wa_id,
                user_id,
                ..
            } => {
                let ids = Identifiers::new(wa_id.as_deref(), user_id.as_deref());
                self.preference(row, ids, value, category.as_deref(), timestamp)
                    .await
            }
            Update::Unknown { field, .. } => unknown_field(row, &field),
            Update::Malformed { field, reason, .. } => malformed(row, &field, &reason),
        }
    }

    /// A customer's message: runs the flows (`Runtime::inbound`) on the contact its phone
    /// and BSUID name. One seen before (a retry, or a row an earlier process may have done)
    /// is looked up in the message log first.
    async fn customer_message(
        &self,
        row: &InboxRow,
        ids: Identifiers<'_>,
        profile_name: Option<&str>,
        inbound: Inbound,
    ) -> Outcome {
        let channel = row.channel.as_str();
        let runtime = &self.state.runtime;
        if !self.state.config.channels.iter().any(|c| c.name == channel) {
            return Outcome::GiveUp(format!(
                "channel `{channel}` is no longer configured; the message is not answered"
            ));
        }
        // On a shared database the row may be one another instance ran before it died (its
        // lease expired), whatever its age.
        if row.attempts > 0 || row.received_at <= self.started_at || self.ownership.is_some() {
            match runtime.db.inbound_seen(channel, &inbound.id).await {
                Ok(true) => return Outcome::Done,
                Ok(false) => {}
                Err(e) => return retry(row, e.to_string(), MAX_ATTEMPTS),
            }
        }
        let contact = match self.resolve(channel, ids).await {
            Ok(Some(contact)) => contact,
            Ok(None) => return Outcome::GiveUp("a message without a sender".into()),
            Err(e) => return retry(row, e.to_string(), MAX_ATTEMPTS),
        };
        let kind = inbound.content.kind().to_string();
        let report = match runtime
            .inbound(channel, &contact, profile_name, inbound)
            .await
        {
            Ok(report) => report,
            Err(e) => return retry(row, e.to_string(), MAX_ATTEMPTS),
        };
        if report.handled != Handled::Duplicate {
            metrics::count(
                "flowgate_inbound_messages_total",
                "Customer messages processed, by type.",
                &[("type", label(&kind))],
                1,
            );
        }
        tracing::debug!(
            channel, contact = %contact, handled = %report.handled,
            replies = report.sent.len(), "inbound message processed"
        );
        Outcome::Done
    }

    /// A system message: the customer changed phone number or BSUID, so the contact moves
    /// to its new identity ([`crate::store::Db::change_identity`]); a new identity that is
    /// another contact's is logged, not merged.
    async fn identity_change(&self, row: &InboxRow, change: IdentityChange) -> Outcome {
        let channel = row.channel.as_str();
        let runtime = &self.state.runtime;
        let previous = Identifiers::new(
            change.previous_wa_id.as_deref(),
            change.previous_user_id.as_deref(),
        );
        let new = Identifiers::new(change.new_wa_id.as_deref(), change.new_user_id.as_deref());
        let at = runtime.clock.now();
        let changed = match runtime.db.change_identity(channel, previous, new, at).await {
            Ok(changed) => changed,
            Err(e) => return retry(row, e.to_string(), MAX_ATTEMPTS),
        };
        let outcome = match &changed {
            IdentityChanged::Changed { key, .. } => format!("the contact is now {key}"),
            IdentityChanged::UnknownContact => "no contact has the previous identifiers".into(),
            IdentityChanged::NothingNew => "no new identifier given".into(),
            IdentityChanged::Conflict(why) => format!("not applied: {why}"),
        };
        tracing::info!(
            channel,
            r#type = %change.kind,
            previous_wa_id = change.previous_wa_id.as_deref().unwrap_or(""),
            new_wa_id = change.new_wa_id.as_deref().unwrap_or(""),
            previous_user_id = change.previous_user_id.as_deref().unwrap_or(""),
            new_user_id = change.new_user_id.as_deref().unwrap_or(""),
            outcome = %outcome,
            "a customer's WhatsApp identity changed"
        );
        if let IdentityChanged::Conflict(why) = &changed {
            tracing::warn!(channel, conflict = %why, "a customer's new identity is another contact's; the two are not merged");
        }
        metrics::count(
            "flowgate_system_messages_total",
            "System messages (identity changes), by type.",
            &[("type", label(&change.kind))],
            1,
        );
        Outcome::Done
    }

    /// A delivery status: moves the outbound message forward
    /// ([`crate::store::Db::apply_status`]); a `failed` one goes to the policy. A status for
    /// a send not recorded yet waits for it ([`MAX_STATUS_ATTEMPTS`]).
    async fn status(
        &self,
        row: &InboxRow,
        wamid: &str,
        status: &str,
        first_error: Option<&GraphError>,
        idempotency_key: Option<&str>,
    ) -> Outcome {
        let runtime = &self.state.runtime;
        let error_text = first_error.map(|e| match &e.title {
            Some(title) if !e.message.contains(title.as_str()) => format!("{title}: {e}"),
            _ => e.to_string(),
        });
        let change = StatusChange {
            wamid,
            status,
            error_code: first_error.map(|e| e.code),
            error: error_text.as_deref(),
            idempotency_key,
        };
        let applied = runtime
            .db
            .apply_status(&row.channel, &change, runtime.clock.now())
            .await;
        match applied {
            Ok(StatusOutcome::Updated { message_id }) => {
                count_moved_statuses(status, 1);
                match first_error.filter(|_| status == "failed") {
                    Some(e) => self.message_failed(row, message_id, e).await,
                    None => Outcome::Done,
                }
            }
            // A failed status seen again (a retry after a crash): make sure the policy acted
            // on it; `message_failed` does each thing once.
            Ok(StatusOutcome::Unchanged {
                message_id,
                current,
            }) if status == "failed" && current == "failed" => match first_error.map(|e| e.code) {
                Some(code) => match runtime.message_failed(message_id, code).await {
                    Ok(_) => Outcome::Done,
                    Err(err) => retry(row, err.to_string(), MAX_ATTEMPTS),
                },
                None => Outcome::Done,
            },
            Ok(StatusOutcome::Unchanged { .. }) => Outcome::Done,
            Ok(StatusOutcome::Unknown) if status_rank(status).is_none() => Outcome::Done,
            Ok(StatusOutcome::Unknown) => retry(
                row,
                format!("no outbound message has wamid {wamid} (yet)"),
                MAX_STATUS_ATTEMPTS,
            ),
            Err(e) => retry(row, e.to_string(), MAX_ATTEMPTS),
        }
    }

    /// A message WhatsApp reported failed: logged, counted by code and handed to the policy
    /// (`Runtime::message_failed`: 131047 decides the message again; 131050/131049 change
    /// consent).
    async fn message_failed(&self, row: &InboxRow, message_id: i64, e: &GraphError) -> Outcome {
        let channel = row.channel.as_str();
        tracing::warn!(channel, message = message_id, code = e.code, error = %e, "a message failed");
        metrics::count(
            "flowgate_message_failures_total",
            "Outbound messages that WhatsApp reported failed, by error code.",
            &[("code", &e.code.to_string())],
            1,
        );
        match self.state.runtime.message_failed(message_id, e.code).await {
            Ok(Some(again)) => {
                tracing::warn!(
                    channel,
                    message = message_id,
                    new_message = again.id,
                    "{}: {}",
                    e.code,
                    again.decision.explain()
                );
                Outcome::Done
            }
            Ok(None) => Outcome::Done,
            Err(err) => retry(row, err.to_string(), MAX_ATTEMPTS),
        }
    }

    /// A template was approved, rejected, paused…: the registry changes
    /// (`Runtime::template_status_changed`).
    async fn template_status(&self, row: &InboxRow, change: TemplateChange) -> Outcome {
        let channel = row.channel.as_str();
        let TemplateChange {
            event,
            name,
            language,
            reason,
            category,
        } = change;
        if let (Some(name), Some(language)) = (&name, &language) {
            match self
                .state
                .runtime
                .template_status_changed(name, language, &event, reason.as_deref())
                .await
            {
                Ok(Some(status)) => tracing::info!(
                    channel, template = %name, %language, status = status.as_str(),
                    "template status applied"
                ),
                Ok(None) => {}
                Err(e) => return retry(row, e.to_string(), MAX_ATTEMPTS),
            }
        }
        tracing::info!(
            channel,
            event = %event,
            template = name.as_deref().unwrap_or(""),
            language = language.as_deref().unwrap_or(""),
            category = category.as_deref().unwrap_or(""),
            reason = reason.as_deref().unwrap_or(""),
            "template status changed"
        );
        metrics::count(
            "flowgate_template_status_updates_total",
            "Template status updates from WhatsApp, by event.",
            &[("event", label(&event))],
            1,
        );
        Outcome::Done
    }

    /// A customer's marketing preference: `stop` and `resume` change the consent of the
    /// contact its phone and BSUID name; other values are only logged.
    async fn preference(
        &self,
        row: &InboxRow,
        ids: Identifiers<'_>,
        value: Preference,
        category: Option<&str>,
        at: Option<DateTime<Utc>>,
    ) -> Outcome {
        let channel = row.channel.as_str();
        let runtime = &self.state.runtime;
        let change = match &value {
            Preference::Stop => Some(ConsentChange::OptOut),
            Preference::Resume => Some(ConsentChange::OptIn),
            Preference::Other(_) => None,
        };
        if let Some(change) = change {
            let contact = match self.resolve(channel, ids).await {
                Ok(contact) => contact,
                Err(e) => return retry(row, e.to_string(), MAX_ATTEMPTS),
            };
            if let Some(contact) = contact.as_deref() {
                let at = at.unwrap_or_else(|| runtime.clock.now());
                if let Err(e) = runtime
                    .update_contact_policy(channel, contact, |c| {
                        Policy::set_consent(c, change, "user_preferences", at)
                    })
                    .await
                {
                    return retry(row, e.to_string(), MAX_ATTEMPTS);
                }
            }
        }
        let value = match value {
            Preference::Stop => "stop".to_string(),
            Preference::Resume => "resume".to_string(),
            Preference::Other(other) => other,
        };
        tracing::info!(
            channel,
            contact = row.contact_key.as_deref().unwrap_or(""),
            preference = %value,
            category = category.unwrap_or(""),
            "a customer changed their marketing preference"
        );
        metrics::count(
            "flowgate_user_preferences_total",
            "Marketing preference changes from customers, by value.",
            &[("value", label(&value))],
            1,
        );
        Outcome::Done
    }
}

/// What a system message says changed about a customer's identity (as sent, for the log).
struct IdentityChange {
    /// `system.type`: `user_changed_number`, `user_changed_user_id`…
    kind: String,
    previous_wa_id: Option<String>,
    new_wa_id: Option<String>,
    previous_user_id: Option<String>,
    new_user_id: Option<String>,
}

/// What a template status update says.
struct TemplateChange {
    event: String,
    name: Option<String>,
    language: Option<String>,
    reason: Option<String>,
    category: Option<String>,
}

/// Errors WhatsApp reported, not tied to one message: logged and counted by code.
fn whatsapp_errors(row: &InboxRow, errors: &[GraphError]) -> Outcome {
    let channel = row.channel.as_str();
    for e in errors {
        tracing::warn!(
            channel,
            code = e.code,
            title = e.title.as_deref().unwrap_or(""),
            details = e.details.as_deref().unwrap_or(""),
            error = %e,
            "WhatsApp reported an error"
        );
        metrics::count(
            "flowgate_webhook_errors_total",
            "Errors WhatsApp reported in webhooks (value.errors), by code.",
            &[("code", &e.code.to_string())],
            1,
        );
    }
    Outcome::Done
}

/// A webhook field flowgate does not read: skipped, counted by field.
fn unknown_field(row: &InboxRow, field: &str) -> Outcome {
    let channel = row.channel.as_str();
    tracing::debug!(channel, field = %field, "webhook field not handled; skipped");
    metrics::count(
        "flowgate_webhook_unknown_total",
        "Webhook updates flowgate does not read, by field.",
        &[("field", label(field))],
        1,
    );
    Outcome::Done
}

/// An update that could not be read: skipped, counted.
fn malformed(row: &InboxRow, field: &str, reason: &str) -> Outcome {
    let channel = row.channel.as_str();
    tracing::warn!(channel, field = %field, inbox = row.id, reason = %reason, "unreadable webhook update skipped");
    metrics::count(
        "flowgate_webhook_malformed_total",
        "Webhook updates that could not be read.",
        &[],
        1,
    );
    Outcome::Done
}

/// The group a row runs in: its contact for conversation updates, else the row alone.
fn group_key(row: &InboxRow) -> String {
    match &row.contact_key {
        Some(contact) if ORDERED_KINDS.contains(&row.kind.as_str()) => {
            format!("{}\u{0}{contact}", row.channel)
        }
        _ => format!("#{}", row.id),
    }
}

/// Postpones a failed row with exponential backoff (1 s, 2 s, 4 s… at most 5 minutes), or
/// gives up after `max_attempts`.
fn retry(row: &InboxRow, error: String, max_attempts: i64) -> Outcome {
    let attempt = row.attempts + 1;
    if attempt >= max_attempts {
        Outcome::GiveUp(error)
    } else {
        Outcome::Retry {
            delay: backoff(attempt),
            error,
        }
    }
}

fn backoff(attempt: i64) -> chrono::Duration {
    let seconds = 1i64 << (attempt - 1).clamp(0, 9);
    chrono::Duration::seconds(seconds.min(300))
}

/// A metric label from webhook text: short identifiers pass, anything else is `other`.
fn label(value: &str) -> &str {
    let ok = !value.is_empty()
        && value.len() <= 48
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok { value } else { "other" }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::whatsapp::parse_webhook;

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        let s: Vec<i64> = (1..=11).map(|a| backoff(a).num_seconds()).collect();
        assert_eq!(s, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        // A status waits about 8.5 minutes for its send before it is given up.
        let waited: i64 = (1..MAX_STATUS_ATTEMPTS)
            .map(|a| backoff(a).num_seconds())
            .sum();
        assert_eq!(waited, 511);
    }

    #[test]
    fn labels_are_bounded() {
        assert_eq!(label("text"), "text");
        assert_eq!(label("user_changed_number"), "user_changed_number");
        assert_eq!(label("a b"), "other");
        assert_eq!(label(""), "other");
        assert_eq!(label(&"x".repeat(100)), "other");
    }

    fn rows(body: &str) -> Vec<NewInboxRow> {
        parse_webhook(body.as_bytes())
            .unwrap()
            .into_iter()
            .map(|u| inbox_row("main", u))
            .collect()
    }

    #[test]
    fn every_kind_round_trips_with_its_contact() {
        let body = r#"{"object":"whatsapp_business_account","entry":[{"id":"1","time":1760000000,"changes":[
          {"field":"messages","value":{"metadata":{"phone_number_id":"P"},
            "contacts":[{"profile":{"name":"Ana"},"user_id":"US.1"}],
            "messages":[
              {"from_user_id":"US.1","id":"wamid.a","timestamp":"1760000000","type":"text","text":{"body":"hi"}},
              {"from":"15550000155","id":"wamid.s","timestamp":"1760000000","type":"system","system":{"type":"user_changed_number","wa_id":"15550000166"}}],
            "statuses":[{"id":"wamid.o","status":"read","timestamp":"1760000000","recipient_id":"15550000155"}],
            "errors":[{"code":130429,"title":"Rate limit hit"}]}},
          {"field":"user_preferences","value":{"user_preferences":[{"user_id":"US.2","value":"stop","category":"marketing_messages"}]}},
          {"field":"message_template_status_update","value":{"event":"APPROVED","message_template_name":"t"}},
          {"field":"account_update","value":{"x":1}}]}]}"#;
        let rows = rows(body);
        let seen: Vec<(&str, Option<&str>)> = rows
            .iter()
            .map(|r| (r.kind.as_str(), r.contact_key.as_deref()))
            .collect();
        assert_eq!(
            seen,
            [
                ("error", None),
                ("message", Some("US.1")),
                ("system", Some("15550000166")),
                ("status", Some("15550000155")),
                ("user_preference", Some("US.2")),
                ("template_status", None),
                ("unknown", None),
            ]
        );
        assert_eq!(rows[1].dedupe_key, "wamid.a");
        assert_eq!(rows[3].dedupe_key, "wamid.o:read");
        for r in &rows {
            let back: Update = serde_json::from_str(&r.payload).unwrap();
            assert_eq!(
                serde_json::to_string(&back).unwrap(),
                r.payload,
                "{}",
                r.kind
            );
            assert_eq!(contact_key(&back), r.contact_key.as_deref());
        }
        let Update::Message {
            inbound,
            profile_name,
            ..
        } = serde_json::from_str(&rows[1].payload).unwrap()
        else {
            panic!("not a message")
        };
        assert_eq!(inbound.content.as_text(), "hi");
        assert_eq!(profile_name.as_deref(), Some("Ana"));
    }

    #[test]
    fn groups_keep_conversations_together_only() {
        let row = |id, kind: &str, contact: Option<&str>| InboxRow {
            id,
            channel: "main".into(),
            dedupe_key: String::new(),
            kind: kind.into(),
            contact_key: contact.map(str::to_string),
            payload: String::new(),
            received_at: DateTime::UNIX_EPOCH,
            attempts: 0,
            last_error: None,
        };
        assert_eq!(
            group_key(&row(1, "message", Some("155"))),
            group_key(&row(2, "system", Some("155")))
        );
        assert_ne!(
            group_key(&row(1, "message", Some("155"))),
            group_key(&row(2, "message", Some("166")))
        );
        assert_ne!(
            group_key(&row(1, "status", Some("155"))),
            group_key(&row(2, "status", Some("155")))
        );
        assert_eq!(group_key(&row(7, "unknown", None)), "#7");
    }
}
