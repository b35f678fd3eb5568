//! The outbox sender: delivers the `pending` outbound messages of one WhatsApp channel.
//!
//! One [`Sender`] per `cloud_api` / `dialog360` channel. It claims rows with a lease
//! ([`Db::claim_outbox`]: the oldest undelivered message of each contact only, so a
//! contact's messages leave in order, one at a time, while different contacts go in
//! parallel), paces them, posts them with [`Client`], and records the outcome.
//!
//! **Pacing.** Per channel, a token bucket at `throughput_mps` with a burst of a tenth of a
//! second's worth; a `130429` cuts the rate to three quarters at most once a second, however
//! many arrive together, and it grows back by a quarter of `throughput_mps` per second of
//! accepted sends (`pace::ChannelPace`); the message is retried after WhatsApp's
//! `Retry-After` when the response had one (which also holds the whole channel), else after
//! [`retry_after`] (refusals of one round share its exponent). Per recipient, Meta's pair limit
//! ([`PairLimit`]: a burst of 20, then one message every 6 s); a message over it waits in the outbox (`next_attempt_at`) instead of being sent to
//! collect a `131056`, and a `131056` backs that recipient off 4^X s (X = its strikes)
//! while other recipients go on. Rate-limit waits are the channel's, not the message's:
//! they give the attempt back ([`Db::record_deferred`]), so only real failures count
//! towards the retry cap. The channel's bucket runs on tokio's monotonic clock (it decides
//! how long a send sleeps); the pair limit runs on the [`Clock`](crate::clock::Clock), like
//! the `next_attempt_at` its waits become, and so do leases and retry times.
//!
//! **Outcomes** go by [`GraphError::class`] (the error classes of `whatsapp::errors`): transient errors and transport
//! failures retry with jitter, up to [`crate::whatsapp::errors::TRANSIENT_MAX_ATTEMPTS`]
//! retries, then fail with the last error; permanent errors fail at once with the Graph code
//! and message; `131047` fails with [`REENGAGE_REASON`] (the policy layer will turn it into
//! a template; it is never retried as free-form); `131050` and `131049` fail with their
//! reason; account-level errors (`131048`, `368`, `131031`, `190`, …) **stop the channel**:
//! [`Db::stop_channel`], a loud `error!`, `flowgate_channel_stops_total` and the
//! `flowgate_channel_stopped` gauge, and the message goes back to `pending` to leave when an
//! operator resumes the channel ([`Db::resume_channel`]).
//!
//! **Mark-as-read.** Before the first reply to an inbound message the sender marks that
//! message read with the typing indicator. Best effort: bounded by
//! [`SenderOptions::mark_read_timeout`], sent at most once per inbound message by a process
//! (never retried), and its failure never holds back or fails the reply.
//!
//! **Crash safety and the at-least-once window.** The engine's state and its messages
//! commit in one transaction, so nothing the engine decided to send is lost, and a message
//! that WhatsApp refused is retried or failed with its reason, never dropped. Each row is
//! claimed with a lease; the wamid is recorded in the same statement that ends the lease,
//! right after the response ([`Db::record_sent_many`]: sends that finish together share one
//! statement, so under load a record waits for one write, not for a queue of them).
//!
//! Meta has no idempotent send, so delivery is **at least once**, and a duplicate is
//! possible in exactly two cases, both after WhatsApp accepted a message but before we
//! learned or recorded it:
//! 1. the process dies between the HTTP response and the commit of that statement: the row
//!    stays `sending`, its lease runs out, and the next claim sends it again;
//! 2. the response is lost (a timeout, a reset connection after the request went out): that
//!    is a transport error, which is retried.
//!
//! Every attempt of a row carries the same idempotency key in `biz_opaque_callback_data`,
//! which WhatsApp echoes in status webhooks. The inbox uses it (`Db::apply_status`): a
//! `sent` status for the first attempt that arrives before the retry settles the row with
//! the first wamid, and the retry never happens; a duplicate that did go out is recognisable
//! afterwards (two wamids, one key). The window is one HTTP round trip plus one local write
//! per message (case 1), or the request timeout (case 2). Rows that were claimed but still
//! waiting for a pacing token when the process died were never sent; they are claimed again
//! like case 1 (logged as possible duplicates, without a second typing indicator), which is
//! why a sender claims only about a second of sending ahead.
//!
//! **Shutdown.** [`SenderHandle::shutdown`] stops claiming, lets in-flight sends finish and
//! records them, gives rows still waiting for a pacing token back
//! ([`Db::release_leases`]), and returns.
//!
//! Files: this one has the [`Sender`], its background loop and a message's way out
//! (decide again, pace, post, record); `refusal` handles WhatsApp's refusals by class;
//! `pace` has the token buckets and the jitter.

mod lease;
mod pace;
mod refusal;

pub use lease::{ChannelLeases, LeaseOptions};

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::clock::SharedClock;
use crate::config::{ChannelConfig, Provider};
use crate::dispatch::{Runtime, count_decision};
use crate::domain::{Contact, InvalidIdentifier, MediaSource, Outbound, OutboundContent};
use crate::media::upload::{UploadError, UploadOptions, Uploaded, Uploads};
use crate::metrics;
use crate::policy::Policy;
use crate::store::{Db, OutboxRow, StoreError};
use crate::whatsapp::client::{Client, Endpoint, http_client};
use crate::whatsapp::errors::NO_CODE;
use crate::whatsapp::media_files::MEDIA_UPLOAD_ERROR;
use crate::whatsapp::{GraphError, Recipient, SendOk, message_body_with_key};
use pace::{ChannelPace, Gcra, PairState, clock_offset, random_fraction};
use refusal::Sent;

/// The reason a message that met `131047` fails with.
pub const REENGAGE_REASON: &str = "outside the 24-hour window: needs a template";

/// A gauge for [`metrics::render`]: name, help, labels, value.
pub type Gauge = (&'static str, &'static str, Vec<(&'static str, String)>, f64);

/// How a sender works; the defaults suit production.
#[derive(Debug, Clone)]
pub struct SenderOptions {
    /// Rows claimed at most at once.
    pub batch: usize,
    /// Messages being sent (or waiting for a pacing token) at most at once.
    pub max_in_flight: usize,
    /// How long a claim lasts (at least 1 s). After a crash, a message that was being sent
    /// waits this long for its `sent` status webhook before it is sent again. Keep it above
    /// the request and mark-as-read timeouts (plus a few seconds): a request that outlives
    /// the lease can be sent twice.
    pub lease: Duration,
    /// How often an idle sender looks for new rows.
    pub idle_poll: Duration,
    /// How often a stopped channel checks whether it was resumed.
    pub stopped_poll: Duration,
    /// Pacing per recipient ahead of Meta's pair limit; `None` sends as fast as the channel
    /// allows and only backs off when WhatsApp answers `131056`.
    pub pair_limit: Option<PairLimit>,
    /// How long mark-as-read may hold back the reply.
    pub mark_read_timeout: Duration,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Where project files are and how long their uploads last.
    pub media: UploadOptions,
}

impl Default for SenderOptions {
    fn default() -> Self {
        Self {
            batch: 256,
            max_in_flight: 256,
            lease: Duration::from_secs(60),
            idle_poll: Duration::from_millis(20),
            stopped_poll: Duration::from_secs(2),
            pair_limit: Some(PairLimit::default()),
            mark_read_timeout: crate::config::MARK_READ_TIMEOUT,
            connect_timeout: crate::whatsapp::client::CONNECT_TIMEOUT,
            request_timeout: crate::whatsapp::client::TIMEOUT,
            media: UploadOptions::default(),
        }
    }
}

/// Meta's pair limit as the sender paces it: `burst` messages to one recipient at once,
/// then one per `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairLimit {
    pub burst: u32,
    pub interval: Duration,
}

impl Default for PairLimit {
    /// 20 at once, then one per 6 s: under Meta's documented 1 per 6 s with bursts of up to
    /// 45 to one recipient, so the burst of a busy conversation is not refused.
    fn default() -> Self {
        Self {
            burst: 20,
            interval: Duration::from_secs(6),
        }
    }
}

/// Delivers one channel's outbox: [`Sender::spawn`] runs it in the background,
/// [`Sender::run_once`] and [`Sender::drain`] step it by hand (tests, one-shot tools).
pub struct Sender {
    inner: Arc<Inner>,
}

struct Inner {
    channel: String,
    /// The policy, the template registry and the contact locks (decisions at send time).
    runtime: Arc<Runtime>,
    db: Db,
    client: Client,
    clock: SharedClock,
    owner: String,
    /// Project files uploaded on this channel (messages that send a `file`).
    uploads: Uploads,
    options: SenderOptions,
    pace: Mutex<ChannelPace>,
    pairs: Mutex<HashMap<String, PairState>>,
    /// Inbound wamids already marked read by this process.
    marked: Mutex<HashSet<String>>,
    /// Set when an account-level error stopped the channel; cleared when the database says
    /// it was resumed.
    stopped: AtomicBool,
    wake: Arc<Notify>,
    /// Accepted sends waiting to be recorded, and the turn to write them (group commit, see
    /// `Inner::record_sent`).
    sent_queue: Mutex<Vec<SentRecord>>,
    sent_writer: tokio::sync::Mutex<()>,
    /// Never set: the stop signal of [`Sender::run_once`].
    never: watch::Sender<bool>,
    /// The channel's lease ([`ChannelLeases`]): the sender claims only while it reads
    /// `true`. `None`: always (one instance, or a test's sender).
    lease: Option<watch::Receiver<bool>>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("channel", &self.inner.channel)
            .field("owner", &self.inner.owner)
            .field("endpoint", self.inner.client.endpoint())
            .finish()
    }
}

impl Sender {
    /// A sender for a configured `cloud_api` or `dialog360` channel; `Err` says what is
    /// missing (or that the channel is a sandbox, which has nothing to send).
    pub fn new(
        runtime: Arc<Runtime>,
        channel: &ChannelConfig,
        options: SenderOptions,
    ) -> Result<Self, String> {
        let endpoint = Endpoint::for_channel(channel)?;
        let http = http_client(options.connect_timeout, options.request_timeout);
        Ok(Self::with_client(
            runtime,
            &channel.name,
            channel.throughput_mps,
            Client::with_http(http, endpoint),
            options,
        ))
    }

    /// A sender posting through `client`, at `throughput_mps` messages per second.
    pub fn with_client(
        runtime: Arc<Runtime>,
        channel: &str,
        throughput_mps: u32,
        client: Client,
        mut options: SenderOptions,
    ) -> Self {
        let db = runtime.db.clone();
        let clock: SharedClock = runtime.clock.clone();
        let wake = runtime.outbox_ready(channel);
        options.lease = options.lease.max(Duration::from_secs(1));
        options.batch = options.batch.max(1);
        options.max_in_flight = options.max_in_flight.max(1);
        let owner = format!(
            "{channel}-{}-{:08x}",
            std::process::id(),
            (random_fraction() * f64::from(u32::MAX)) as u32
        );
        let (never, _) = watch::channel(false);
        let uploads = Uploads::new(
            channel,
            &owner,
            db.clone(),
            clock.clone(),
            options.media.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                channel: channel.to_string(),
                runtime,
                db,
                client,
                clock,
                owner,
                uploads,
                pace: Mutex::new(ChannelPace::new(throughput_mps, Instant::now())),
                pairs: Mutex::new(HashMap::new()),
                marked: Mutex::new(HashSet::new()),
                stopped: AtomicBool::new(false),
                wake,
                sent_queue: Mutex::new(Vec::new()),
                sent_writer: tokio::sync::Mutex::new(()),
                never,
                options,
                lease: None,
            }),
        }
    }

    /// The sender claims only while `held` reads `true` (the channel's lease, from
    /// [`ChannelLeases::watch`]): one instance sends for the number at a time.
    pub fn with_lease(mut self, held: watch::Receiver<bool>) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("the lease is set before the sender runs")
            .lease = Some(held);
        self
    }

    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// The lease owner this sender claims rows as.
    pub fn owner(&self) -> &str {
        &self.inner.owner
    }

    /// The channel's send rate now, in messages a second (`throughput_mps`, less while
    /// WhatsApp's rate limit slows it down).
    pub fn rate_mps(&self) -> f64 {
        self.inner.pace.lock().expect("pace lock").rate()
    }

    /// Claims one batch, sends every claimed row (concurrently; one row per contact) and
    /// records the outcomes. Returns how many rows it claimed; 0 when nothing is due or the
    /// channel is stopped.
    pub async fn run_once(&self) -> Result<usize, StoreError> {
        let inner = &self.inner;
        if !inner.holds_lease() || inner.still_stopped().await? {
            return Ok(0);
        }
        let limit = inner.options.batch.min(inner.pace_budget());
        let rows = inner.claim(limit).await?;
        let claimed = rows.len();
        let mut tasks = JoinSet::new();
        for (row, contact) in rows {
            let inner = inner.clone();
            let stop = inner.never.subscribe();
            tasks.spawn(async move { inner.deliver(row, contact, stop).await });
        }
        while let Some(joined) = tasks.join_next().await {
            log_panic(&inner.channel, joined);
        }
        Ok(claimed)
    }

    /// [`Sender::run_once`] until nothing more is due now (by the clock); returns how many
    /// rows were claimed in all. For tests and one-shot tools.
    pub async fn drain(&self) -> Result<usize, StoreError> {
        let mut total = 0;
        for _ in 0..100_000 {
            let n = self.run_once().await?;
            if n == 0 {
                break;
            }
            total += n;
        }
        Ok(total)
    }

    /// Runs the sender in the background until [`SenderHandle::shutdown`].
    pub fn spawn(self) -> SenderHandle {
        let (stop, stopped) = watch::channel(false);
        let inner = self.inner.clone();
        let task = tokio::spawn(run(inner, stopped));
        SenderHandle {
            channel: self.inner.channel.clone(),
            wake: self.inner.wake.clone(),
            stop,
            task,
        }
    }
}

/// A running sender.
#[derive(Debug)]
pub struct SenderHandle {
    channel: String,
    wake: Arc<Notify>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl SenderHandle {
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Looks for new rows now instead of at the next poll (call after committing messages).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Stops claiming, finishes the sends in flight, releases what was claimed but not
    /// sent, and waits for all of that.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            tracing::error!(channel = %self.channel, error = %e, "the sender task failed");
        }
    }
}

/// Starts one sender per `cloud_api` / `dialog360` channel of `runtime` (a channel that
/// cannot send is logged and skipped), each sending while this instance holds the
/// channel's lease in `leases`.
pub fn spawn_senders(
    runtime: &Arc<Runtime>,
    options: &SenderOptions,
    leases: &ChannelLeases,
) -> Vec<SenderHandle> {
    runtime
        .channels
        .iter()
        .filter(|c| c.provider != Provider::Sandbox)
        .filter_map(|c| match Sender::new(runtime.clone(), c, options.clone()) {
            Ok(mut sender) => {
                if let Some(held) = leases.watch(&c.name) {
                    sender = sender.with_lease(held);
                }
                tracing::info!(channel = %c.name, owner = %sender.owner(), "outbox sender started");
                Some(sender.spawn())
            }
            Err(e) => {
                tracing::error!(channel = %c.name, error = %e, "cannot send on this channel");
                None
            }
        })
        .collect()
}

/// Shuts every sender down (concurrently) and waits for them.
pub async fn shutdown_senders(senders: Vec<SenderHandle>) {
    let mut tasks = JoinSet::new();
    for s in senders {
        tasks.spawn(s.shutdown());
    }
    while tasks.join_next().await.is_some() {}
}

/// Gauges read at scrape time for `GET /metrics`: `flowgate_outbox_depth{channel}` (messages
/// not yet accepted by WhatsApp), `flowgate_queue_depth{channel}` (messages the policy
/// holds until the customer writes again) and `flowgate_channel_stopped{channel}` (1 while an
/// account-level error keeps the channel's sender stopped).
pub async fn gauges(db: &Db, channels: &[ChannelConfig]) -> Result<Vec<Gauge>, StoreError> {
    let mut gauges = Vec::new();
    for c in channels.iter().filter(|c| c.provider != Provider::Sandbox) {
        let depth = db.outbox_depth(&c.name).await?;
        gauges.push((
            "flowgate_outbox_depth",
            "Outbound messages not yet accepted by WhatsApp.",
            vec![("channel", c.name.clone())],
            depth as f64,
        ));
    }
    for c in channels {
        let depth = db.queue_depth(&c.name).await?;
        gauges.push((
            "flowgate_queue_depth",
            "Messages the policy queued until the customer writes again.",
            vec![("channel", c.name.clone())],
            depth as f64,
        ));
    }
    for c in channels.iter().filter(|c| c.provider != Provider::Sandbox) {
        let stopped = db.channel_stopped(&c.name).await?.is_some();
        gauges.push((
            "flowgate_channel_stopped",
            "1 while an account-level WhatsApp error keeps the channel's sender stopped.",
            vec![("channel", c.name.clone())],
            if stopped { 1.0 } else { 0.0 },
        ));
    }
    Ok(gauges)
}

/// The background loop: claim while there is room, send each row in its own task, and on
/// stop finish the tasks and release what is left.
async fn run(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut lease = inner.lease.clone();
    loop {
        if *stop.borrow() {
            break;
        }
        while let Some(joined) = tasks.try_join_next() {
            log_panic(&inner.channel, joined);
        }
        if let Some(held) = lease.as_mut()
            && !*held.borrow_and_update()
        {
            // Another instance sends for the channel: stand by (sends in flight finish).
            tokio::select! {
                changed = held.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                _ = stop.changed() => {}
            }
            continue;
        }
        if wait_while_stopped(&inner, &mut stop).await {
            continue;
        }
        // In flight (sending or waiting for a token): at most about a second of sending.
        let room = inner
            .options
            .max_in_flight
            .min(inner.pace_budget())
            .saturating_sub(tasks.len());
        if room == 0 {
            tokio::select! {
                _ = tasks.join_next() => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let limit = room.min(inner.options.batch);
        claim_and_send(&inner, limit, &mut tasks, &mut stop).await;
    }
    finish(&inner, tasks).await;
}

/// While an account-level error keeps the channel stopped, waits one `stopped_poll` (or
/// for the stop) and says so; `false` when the channel may send.
async fn wait_while_stopped(inner: &Inner, stop: &mut watch::Receiver<bool>) -> bool {
    match inner.still_stopped().await {
        Ok(true) => {
            tokio::select! {
                _ = tokio::time::sleep(inner.options.stopped_poll) => {}
                _ = stop.changed() => {}
            }
            true
        }
        Ok(false) => false,
        Err(e) => {
            tracing::error!(channel = %inner.channel, error = %e, "reading the channel state failed");
            false
        }
    }
}

/// Claims up to `limit` rows and sends each in its own task; with nothing due, waits for new
/// rows, a finished send, the poll or the stop; after a failed claim, waits a second.
async fn claim_and_send(
    inner: &Arc<Inner>,
    limit: usize,
    tasks: &mut JoinSet<()>,
    stop: &mut watch::Receiver<bool>,
) {
    match inner.claim(limit).await {
        Ok(rows) if !rows.is_empty() => {
            for (row, contact) in rows {
                let inner = inner.clone();
                let stop = stop.clone();
                tasks.spawn(async move { inner.deliver(row, contact, stop).await });
            }
        }
        Ok(_) => {
            // Nothing due: wait for new rows, a finished send (its contact's next
            // message may be due), or the poll.
            tokio::select! {
                _ = tokio::time::sleep(inner.options.idle_poll) => {}
                _ = inner.wake.notified() => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = stop.changed() => {}
            }
        }
        Err(e) => {
            tracing::error!(channel = %inner.channel, error = %e, "claiming outbox rows failed");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

/// On stop: lets the sends in flight finish, then gives back the rows still claimed.
async fn finish(inner: &Inner, mut tasks: JoinSet<()>) {
    while let Some(joined) = tasks.join_next().await {
        log_panic(&inner.channel, joined);
    }
    match inner
        .db
        .release_leases(&inner.owner, inner.clock.now())
        .await
    {
        Ok(n) => {
            tracing::info!(channel = %inner.channel, released = n, "outbox sender stopped")
        }
        Err(e) => tracing::error!(
            channel = %inner.channel,
            error = %e,
            "releasing leases failed; the rows go out again when their leases run out"
        ),
    }
}

/// Logs a send task that panicked.
fn log_panic(channel: &str, joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        tracing::error!(channel = %channel, error = %e, "a send task panicked");
    }
}

/// An accepted send waiting for the group commit: id, wamid, and whether it was recorded.
type SentRecord = (i64, String, oneshot::Sender<Option<bool>>);

/// How a send ended, for `flowgate_outbound_total{status}`.
#[derive(Clone, Copy)]
enum Outcome {
    Sent,
    Retry,
    Deferred,
    Failed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Retry => "retry",
            Self::Deferred => "deferred",
            Self::Failed => "failed",
        }
    }
}

impl Inner {
    /// Claims up to `limit` rows, each with its contact's window and consent as they are
    /// now (the policy decides each message again before it is sent).
    async fn claim(&self, limit: usize) -> Result<Vec<(OutboxRow, Contact)>, StoreError> {
        let started = Instant::now();
        let rows = self
            .db
            .claim_outbox(
                &self.channel,
                self.clock.now(),
                i64::try_from(limit).unwrap_or(i64::MAX),
                &self.owner,
                self.options.lease,
            )
            .await?;
        for row in rows.iter().filter(|r| r.reclaimed) {
            tracing::warn!(
                channel = %self.channel,
                message = row.id,
                idempotency_key = %row.idempotency_key,
                attempt = row.attempts,
                "sending again a message whose lease ran out while it was being sent: the \
                 previous attempt may have reached WhatsApp, so the customer may get it twice"
            );
        }
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.contact_id).collect();
        let mut contacts: HashMap<i64, Contact> = self
            .db
            .contacts_for_policy(&ids)
            .await?
            .into_iter()
            .collect();
        // Claims that found work only: the idle polls would drown them.
        metrics::observe_stage("outbox_claim", started.elapsed().as_secs_f64());
        Ok(rows
            .into_iter()
            .map(|row| {
                let contact = contacts
                    .remove(&row.contact_id)
                    .unwrap_or_else(|| Contact::new(row.wa_id.clone()));
                (row, contact)
            })
            .collect())
    }

    /// The policy's verdict on a claimed message now: the message to send, or `None` when
    /// it is not sent now (decided again as queued or skipped, or the claim is gone).
    async fn decide_again(&self, row: &OutboxRow, contact: &Contact) -> Option<Outbound> {
        let outbound = match row.outbound() {
            Ok(o) => o,
            Err(e) => {
                let reason = format!("the stored message is unreadable: {e}");
                self.fail(row, None, &reason).await;
                return None;
            }
        };
        let runtime = &self.runtime;
        let now = self.clock.now();
        let decision = runtime
            .policy
            .decide(&outbound, contact, &runtime.templates(), now);
        if decision.sends() && Policy::apply(&decision, &outbound) == outbound {
            return Some(outbound);
        }
        // Something changed since the message was planned (the window closed, a template
        // was paused, consent changed): decide again under the contact's lock and record it.
        match runtime
            .redecide_claimed(row, &self.owner, None, "sending")
            .await
        {
            Ok(Some((decision, message))) => {
                count_decision(&decision, "send_time");
                decision.sends().then_some(message)
            }
            Ok(None) => {
                self.lost_lease(row, Some(false));
                None
            }
            Err(e) => {
                tracing::error!(channel = %self.channel, message = row.id, error = %e, "deciding a message again failed; retrying it later");
                self.defer(row, now + chrono::Duration::seconds(5), None)
                    .await;
                None
            }
        }
    }

    /// Whether this instance may send for the channel now (it holds the channel's lease).
    fn holds_lease(&self) -> bool {
        self.lease.as_ref().is_none_or(|held| *held.borrow())
    }

    /// Whether the channel is (still) stopped. Only asks the database once this process saw
    /// an account-level error; another process's stop shows as empty claims.
    async fn still_stopped(&self) -> Result<bool, StoreError> {
        if !self.stopped.load(Ordering::SeqCst) {
            return Ok(false);
        }
        if self.db.channel_stopped(&self.channel).await?.is_some() {
            return Ok(true);
        }
        self.stopped.store(false, Ordering::SeqCst);
        tracing::info!(channel = %self.channel, "channel resumed: sending again");
        Ok(false)
    }

    /// How much of its lease a row must have left to be sent: time for mark-as-read, the
    /// request and recording it, but at most half the lease (a lease shorter than that is
    /// the operator's choice; see [`SenderOptions::lease`]).
    /// Whether the row's claim could run out before a send started now is recorded.
    fn lease_too_short(&self, row: &OutboxRow) -> bool {
        self.clock.now() + chrono_duration(self.lease_margin()) > row.lease_until
    }

    /// The send's margin ([`crate::config::send_margin`]) with this sender's timeouts, at
    /// most half the lease.
    fn lease_margin(&self) -> Duration {
        let o = &self.options;
        crate::config::send_margin(o.request_timeout, o.mark_read_timeout).min(o.lease / 2)
    }

    /// Rows worth claiming at the current pace: about a second of sending, so a claimed row
    /// waits for its token briefly, well inside its lease (after a crash, rows claimed but
    /// not yet sent look like interrupted sends; this keeps them few).
    fn pace_budget(&self) -> usize {
        let rate = self.pace.lock().expect("pace lock").rate();
        (rate.ceil() as usize).max(1)
    }

    /// One claimed row's way out: decided again, paced (recipient, then channel), marked
    /// read if it is the first reply, posted, and its outcome recorded.
    async fn deliver(
        self: Arc<Self>,
        row: OutboxRow,
        contact: Contact,
        mut stop: watch::Receiver<bool>,
    ) {
        if self.stopped.load(Ordering::SeqCst) {
            self.defer(&row, self.clock.now(), None).await;
            return;
        }
        // The last guard: webhooks only make contacts of valid ids, but a row written by
        // other means (an import of old data, a hand edit) must never reach WhatsApp.
        let recipient = match recipient_for(&row.wa_id) {
            Ok(recipient) => recipient,
            Err(e) => {
                let reason = format!("not sent: the recipient {e}; fix the contact's wa_id");
                self.fail(&row, None, &reason).await;
                return;
            }
        };
        let Some(outbound) = self.decide_again(&row, &contact).await else {
            return;
        };

        // The pair limit: over it, the message waits in the outbox rather than here.
        if let Err(wait) = self.pair_try(&row.wa_id) {
            tracing::debug!(channel = %self.channel, message = row.id, wait_ms = wait.as_millis() as u64, "pair limit: deferred");
            self.defer(&row, self.clock.now() + chrono_duration(wait), None)
                .await;
            return;
        }
        // The channel's pace: wait for a token here (a stop gives the row back unsent).
        let at = self.pace.lock().expect("pace lock").reserve(Instant::now());
        if at > Instant::now() {
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        // Never send on a lease that could run out before the outcome is recorded.
        if self.lease_too_short(&row) {
            self.defer(&row, self.clock.now(), None).await;
            return;
        }

        if row.first_reply
            && !row.reclaimed
            && let Some(inbound) = &row.in_reply_to
        {
            self.mark_read(inbound).await;
        }

        let sent = |at| Sent {
            free_form: outbound.content.is_free_form(),
            customer_last_wrote: contact.last_customer_message_at,
            at,
        };
        let sent_at = Instant::now();
        let (outgoing, uploaded) = match self.with_media_id(&outbound).await {
            Ok(ready) => ready,
            Err(e) => return self.upload_failed(&row, e, sent(sent_at)).await,
        };
        // An upload (or a wait for another sender's) took time: the send must still fit.
        if uploaded.is_some() && self.lease_too_short(&row) {
            self.defer(&row, self.clock.now(), None).await;
            return;
        }
        let mut result = self.post(&row, recipient.clone(), &outgoing).await;
        // An id WhatsApp no longer knows: upload the file again, once.
        if let (Err(e), Some(refused)) = (&result, &uploaded)
            && e.code == MEDIA_UPLOAD_ERROR
        {
            tracing::warn!(channel = %self.channel, message = row.id, media_id = %refused.media_id, error = %e, "WhatsApp refused an uploaded file's id: uploading it again");
            if let Err(e) = self.uploads.refused(refused).await {
                tracing::error!(channel = %self.channel, error = %e, "forgetting a refused media id failed");
            }
            let outgoing = match self.with_media_id(&outbound).await {
                Ok((outgoing, _)) => outgoing,
                Err(e) => return self.upload_failed(&row, e, sent(sent_at)).await,
            };
            if self.lease_too_short(&row) {
                self.defer(&row, self.clock.now(), None).await;
                return;
            }
            result = self.post(&row, recipient, &outgoing).await;
        }
        match result {
            Ok(ok) => self.accepted(&row, &ok.wamid).await,
            Err(e) => self.failed_send(&row, e, sent(sent_at)).await,
        }
    }

    /// The message as it is posted: a project file's `file` swapped for the id of its
    /// upload on this channel (uploading it now if needed), with that upload.
    async fn with_media_id(
        &self,
        outbound: &Outbound,
    ) -> Result<(Outbound, Option<Uploaded>), UploadError> {
        let OutboundContent::Media {
            kind,
            source: MediaSource::File { file },
            caption,
            filename,
        } = &outbound.content
        else {
            return Ok((outbound.clone(), None));
        };
        let uploaded = self.uploads.media_id(&self.client, kind, file).await?;
        let mut outgoing = outbound.clone();
        outgoing.content = OutboundContent::Media {
            kind: kind.clone(),
            source: MediaSource::Uploaded {
                id: uploaded.media_id.clone(),
            },
            caption: caption.clone(),
            // A document shows its file's name unless the step named it.
            filename: filename.clone().or_else(|| {
                (kind == "document")
                    .then(|| file.rsplit(['/', '\\']).next().map(str::to_string))
                    .flatten()
            }),
        };
        Ok((outgoing, Some(uploaded)))
    }

    /// A project file that could not be uploaded: a missing or misfit file fails the
    /// message with the reason; WhatsApp's refusal of the upload is handled like a send's
    /// (by its class); a busy claim or the store's error tries again shortly.
    async fn upload_failed(&self, row: &OutboxRow, e: UploadError, sent: Sent) {
        match e {
            UploadError::Unreadable { .. } | UploadError::Misfit { .. } => {
                self.fail(row, None, &e.to_string()).await
            }
            UploadError::Upload { path, mut error } => {
                error.message = format!("uploading `{path}`: {}", error.message);
                self.failed_send(row, error, sent).await
            }
            UploadError::Busy { .. } | UploadError::Store(_) => {
                tracing::warn!(channel = %self.channel, message = row.id, error = %e, "the message's file is not uploaded yet; trying again shortly");
                self.defer(row, self.clock.now() + chrono::Duration::seconds(2), None)
                    .await
            }
        }
    }

    /// Posts the message with the row's idempotency key, timing the request.
    async fn post(
        &self,
        row: &OutboxRow,
        recipient: Recipient,
        outbound: &Outbound,
    ) -> Result<SendOk, GraphError> {
        let body = message_body_with_key(
            recipient,
            &outbound.content,
            outbound.quote.as_deref(),
            &row.idempotency_key,
        );
        let started = Instant::now();
        let result = self.client.send(&body).await;
        metrics::observe(
            "flowgate_send_seconds",
            "Latency of WhatsApp send requests.",
            &[("channel", &self.channel)],
            started.elapsed().as_secs_f64(),
        );
        result
    }

    /// WhatsApp accepted the message: records its wamid, and the channel's pace and the
    /// recipient's strikes recover.
    async fn accepted(&self, row: &OutboxRow, wamid: &str) {
        if self.record_sent(row.id, wamid).await.is_none() {
            tracing::error!(
                channel = %self.channel,
                message = row.id,
                wamid = %wamid,
                "WhatsApp accepted the message but recording it failed; it will be \
                 sent again when its lease runs out"
            );
        }
        self.pace
            .lock()
            .expect("pace lock")
            .accepted(Instant::now());
        if let Some(pair) = self.pairs.lock().expect("pairs lock").get_mut(&row.wa_id) {
            pair.strikes = 0;
        }
        self.count(Outcome::Sent);
        tracing::debug!(channel = %self.channel, message = row.id, wamid = %wamid, "sent");
    }

    /// Records an accepted send: `sent`, the wamid, the lease ended. Sends that finish
    /// together are written in one statement (group commit): each queues its record and
    /// waits for the writer's turn; whoever gets it writes everything queued by then. Under
    /// load that is one write for dozens of sends instead of dozens of writes queueing for
    /// the database; alone, it is one statement right after the response, as before.
    /// `None` if the database refused it.
    async fn record_sent(&self, id: i64, wamid: &str) -> Option<bool> {
        let (done, mut outcome) = oneshot::channel();
        self.sent_queue
            .lock()
            .expect("sent queue lock")
            .push((id, wamid.to_string(), done));
        let _turn = self.sent_writer.lock().await;
        if let Ok(recorded) = outcome.try_recv() {
            return recorded;
        }
        let batch = std::mem::take(&mut *self.sent_queue.lock().expect("sent queue lock"));
        let now = self.clock.now();
        let pairs: Vec<(i64, &str)> = batch.iter().map(|(id, w, _)| (*id, w.as_str())).collect();
        let written: Option<HashSet<i64>> = match self.db.record_sent_many(&pairs, now).await {
            Ok(ids) => Some(ids.into_iter().collect()),
            Err(e) => {
                tracing::warn!(channel = %self.channel, rows = pairs.len(), error = %e, "recording sends together failed; recording them one by one");
                None
            }
        };
        for (id, wamid, done) in batch {
            let recorded = match &written {
                Some(ids) => Some(ids.contains(&id)),
                None => {
                    retrying("record the send", id, || {
                        self.db.record_sent(id, &wamid, now)
                    })
                    .await
                }
            };
            let _ = done.send(recorded);
        }
        outcome.await.unwrap_or(None)
    }

    async fn stop_channel(&self, code: Option<i64>, reason: &str) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        let now = self.clock.now();
        if retrying("stop the channel", 0, || {
            self.db.stop_channel(&self.channel, code, reason, now)
        })
        .await
        .is_none()
        {
            tracing::error!(channel = %self.channel, "could not record the stop in the database");
        }
        metrics::count(
            "flowgate_channel_stops_total",
            "Times a channel's sender stopped on an account-level WhatsApp error.",
            &[("channel", &self.channel)],
            1,
        );
        tracing::error!(
            channel = %self.channel,
            code = code.unwrap_or(NO_CODE),
            reason,
            "CHANNEL STOPPED: WhatsApp refused this number's messages with an account-level \
             error (blocked, restricted, locked or bad credentials). Nothing more is sent on \
             this channel; its messages wait in the outbox. Fix the cause, then resume the \
             channel."
        );
    }

    async fn mark_read(&self, inbound: &str) {
        {
            let mut marked = self.marked.lock().expect("marked lock");
            if marked.len() >= 100_000 {
                marked.clear();
            }
            if !marked.insert(inbound.to_string()) {
                return;
            }
        }
        let outcome = tokio::time::timeout(
            self.options.mark_read_timeout,
            self.client.mark_read(inbound, true),
        )
        .await;
        let status = match outcome {
            Ok(Ok(())) => "ok",
            Ok(Err(e)) => {
                tracing::debug!(channel = %self.channel, wamid = inbound, error = %e, "mark-as-read failed");
                "error"
            }
            Err(_) => {
                tracing::debug!(channel = %self.channel, wamid = inbound, "mark-as-read timed out");
                "timeout"
            }
        };
        metrics::count(
            "flowgate_mark_read_total",
            "Mark-as-read requests (with the typing indicator) by outcome.",
            &[("channel", &self.channel), ("status", status)],
            1,
        );
    }

    /// Back to `pending` without counting the attempt.
    async fn defer(
        &self,
        row: &OutboxRow,
        not_before: DateTime<Utc>,
        error: Option<(Option<i64>, &str)>,
    ) {
        let now = self.clock.now();
        self.record_outcome(row, "defer", Outcome::Deferred, || {
            self.db
                .record_deferred(row.id, &self.owner, not_before, error, now)
        })
        .await;
    }

    async fn fail(&self, row: &OutboxRow, code: Option<i64>, reason: &str) {
        tracing::warn!(channel = %self.channel, message = row.id, code = code.unwrap_or(NO_CODE), reason, "message failed");
        let now = self.clock.now();
        self.record_outcome(row, "record the failure", Outcome::Failed, || {
            self.db
                .record_failed(row.id, &self.owner, code, reason, now)
        })
        .await;
    }

    /// Records a send's outcome with `write` (see [`retrying`]), says so when the row was no
    /// longer ours, and counts the outcome.
    async fn record_outcome<F, Fut>(&self, row: &OutboxRow, what: &str, outcome: Outcome, write: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<bool, StoreError>>,
    {
        let done = retrying(what, row.id, write).await;
        self.lost_lease(row, done);
        self.count(outcome);
    }

    /// Records a consent or back-off change WhatsApp's answer implies for the row's contact.
    async fn contact_policy(&self, row: &OutboxRow, change: impl FnOnce(&mut Contact)) {
        if let Err(e) = self
            .runtime
            .update_contact_policy(&row.channel, &row.wa_id, change)
            .await
        {
            tracing::error!(channel = %self.channel, message = row.id, error = %e, "could not record the contact's marketing state");
        }
    }

    /// Logs an outcome that could not be recorded because the row is no longer ours.
    fn lost_lease(&self, row: &OutboxRow, done: Option<bool>) {
        if done == Some(false) {
            tracing::warn!(
                channel = %self.channel,
                message = row.id,
                "the message changed while it was being sent (its lease ran out, or a status \
                 webhook settled it); this attempt's outcome is not recorded"
            );
        }
    }

    fn count(&self, outcome: Outcome) {
        metrics::count(
            "flowgate_outbound_total",
            "Outbound send outcomes by channel and status.",
            &[("channel", &self.channel), ("status", outcome.as_str())],
            1,
        );
    }

    fn new_pair(&self) -> PairState {
        // Without a pair limit the state only counts 131056 strikes.
        let limit = self.options.pair_limit.unwrap_or_default();
        PairState {
            pace: Gcra::new(limit.interval, limit.burst),
            strikes: 0,
        }
    }

    /// Takes a token of the recipient's pair limit, or says how long until one is free.
    fn pair_try(&self, recipient: &str) -> Result<(), Duration> {
        if self.options.pair_limit.is_none() {
            return Ok(());
        }
        let now = clock_offset(self.clock.now());
        let mut pairs = self.pairs.lock().expect("pairs lock");
        if pairs.len() >= 50_000 {
            // Forget recipients whose bucket is full again and who have no strikes.
            pairs.retain(|_, p| p.strikes > 0 || p.pace.busy_at(now));
        }
        pairs
            .entry(recipient.to_string())
            .or_insert_with(|| self.new_pair())
            .pace
            .try_reserve(now)
    }
}

/// Runs a database write up to three times (a busy database, a dropped connection), so an
/// outcome is not lost to a hiccup.
async fn retrying<T, F, Fut>(what: &str, id: i64, mut write: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    for attempt in 1..=3u32 {
        match write().await {
            Ok(v) => return Some(v),
            Err(e) => {
                tracing::error!(message = id, attempt, error = %e, "could not {what}");
                tokio::time::sleep(Duration::from_millis(100) * attempt).await;
            }
        }
    }
    None
}

/// A phone number goes `to`, a business-scoped user id (`US.1349…`, letters in it) goes as
/// `recipient` (the send API's field for a BSUID); anything else is no recipient at all.
pub fn recipient_for(wa_id: &str) -> Result<Recipient, InvalidIdentifier> {
    let checked = crate::domain::recipient(wa_id)?;
    Ok(if crate::domain::is_bsuid(&checked) {
        Recipient::UserId(checked)
    } else {
        Recipient::Phone(checked)
    })
}

fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipients_by_shape() {
        assert_eq!(
            recipient_for("15555550123"),
            Ok(Recipient::Phone("15555550123".into()))
        );
        assert_eq!(
            recipient_for("US.13491208655302741918"),
            Ok(Recipient::UserId("US.13491208655302741918".into()))
        );
        for bad in [
            "",
            "+\u{0}",
            "order",
            "123456789012345678901234567890",
            "US.",
        ] {
            assert!(recipient_for(bad).is_err(), "{bad:?} is no recipient");
        }
    }
}
