//! The campaign dispatcher: every recipient of a running run decided and, when sent, handed
//! to the outbox once, at the campaign's rate, behind conversational replies.
//!
//! On each tick, for every run whose status is `running` and whose campaign is not paused
//! (both read again each tick, so a pause or cancel through the store takes effect at the
//! next tick):
//!
//! 1. the campaign's template (every variant's, for a split) must be approved: otherwise
//!    the run pauses itself (status `paused`, the reason naming the template and its
//!    status) and its recipients stay pending; a run paused that way resumes on a later tick once the template is approved
//!    again (a status webhook, a reload);
//! 2. the run's token bucket (its `rate`, else the channel's `throughput_mps`; time from
//!    the clock) says how many sends it may start now, at most one second's worth, and
//!    fewer while the outbox still holds that many unsent campaign messages of the channel;
//! 3. each recipient due now (`Db::pending_recipients`), with its variant of a split
//!    campaign (`Campaign::variant_for`, the one its ledger row was snapshotted with),
//!    under its contact's lock: the campaign's rules (`campaign::recipient::gate`, with
//!    the contact's sends of the campaign's category in the cap's period), then the message through the one policy
//!    function (`Policy::decide`): the variant's `in_window` message with its template as its
//!    `outside_window`, so an open window sends the free-form message and a closed one the
//!    template; the channel's messaging limit for a template to a contact not yet counted;
//! 4. the outcome recorded in the ledger with its reason; a message and its `sent` row are
//!    one transaction (`Db::send_campaign_message`, idempotency key from run and contact);
//! 5. a run with nothing pending is `done`; a run past its ttl (`scheduled_for + ttl`)
//!    starts no more sends: its recipients still pending are skipped and it is `done`.
//!
//! With several instances on one PostgreSQL database, a run is dispatched by the instance
//! holding its channel's lease (`outbox::ChannelLeases`), the one that sends for the number:
//! the run's bucket (its `rate`) and the messaging limit counted within a tick are then the
//! number's, not an instance's. The rest is read from the store each tick (the backlog,
//! the messaging limit's recipients, caps, the ledger).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, Utc};

use super::{CampaignRunner, RunnerError};
use crate::campaign::recipient::{Gate, category_name, defer, gate};
use crate::campaign::{Campaign, Variant};
use crate::dispatch::{Runtime, count_decision};
use crate::domain::{Contact, Origin, Outbound, OutboundContent, TemplateFallback};
use crate::engine::{render_for_contact, render_message};
use crate::flow::TemplateCall;
use crate::metrics;
use crate::outbox::ChannelLeases;
use crate::policy::Policy;
use crate::script::ScriptError;
use crate::store::{
    CampaignSend, RecipientDecision, RecipientOutcome, RunRow, RunStatus, StoreError,
};
use crate::templates::{Registry, Status};

/// A run paused because of its template says so with this prefix; only such a pause is
/// lifted by the dispatcher (an operator's pause is the operator's to lift).
pub const TEMPLATE_PAUSE: &str = "template `";
/// Recipients decided per run and tick at most (skips and deferrals take no token).
const DECISIONS_PER_TICK: usize = 2_000;
/// The messaging limit's rolling period.
const LIMIT_PERIOD: Duration = Duration::hours(24);
/// How often a running run's bucket is looked at between the application's rounds: a
/// run's sends leave a few at a time, evenly, instead of in one burst per round (with
/// half-second bursts a 30 s run came out 1-2.5 % slow: the last burst waits up to a
/// round; at 50 ms, within 0.3 %).
const PACING_TICK: std::time::Duration = std::time::Duration::from_millis(50);

/// What one dispatcher tick did, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dispatched {
    pub sent: u64,
    pub skipped: u64,
    pub deferred: u64,
    /// Runs that paused themselves: (run, reason).
    pub paused: Vec<(i64, String)>,
    pub resumed: Vec<i64>,
    pub done: Vec<i64>,
}

/// A run's token bucket: at most one second of its rate.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: DateTime<Utc>,
}

/// The channel's messaging limit as one run's batch spends it.
#[derive(Debug, Clone, Copy)]
struct Limit {
    max: u64,
    used: u64,
    /// When the oldest counted recipient leaves the rolling period.
    frees_at: DateTime<Utc>,
}

/// The campaigns' dispatcher, driven by the application's loop beside the runner's tick.
pub struct Dispatcher {
    runner: Arc<CampaignRunner>,
    buckets: Mutex<HashMap<i64, Bucket>>,
    /// The channels' leases: a run is dispatched only by the instance that sends for its
    /// channel, so its bucket and the messaging limit's count are the number's. `None`:
    /// every run (one instance).
    leases: Option<Arc<ChannelLeases>>,
}

/// One recipient's decision, before it is recorded.
enum Outcome {
    Sent,
    Skip(String),
    Defer(DateTime<Utc>, String),
}

impl Dispatcher {
    pub fn new(runner: Arc<CampaignRunner>) -> Self {
        Self {
            runner,
            buckets: Mutex::new(HashMap::new()),
            leases: None,
        }
    }

    /// Dispatches only the runs of channels whose lease this instance holds.
    pub fn with_leases(mut self, leases: Arc<ChannelLeases>) -> Self {
        self.leases = Some(leases);
        self
    }

    /// Whether this instance dispatches `channel`'s runs now.
    fn sends_for(&self, channel: &str) -> bool {
        self.leases.as_ref().is_none_or(|l| l.holds(channel))
    }

    fn runtime(&self) -> &Arc<Runtime> {
        self.runner.runtime()
    }

    /// Dispatches every running run once (see the module), resumes the runs whose template
    /// is approved again, and finishes the runs with nothing pending.
    pub async fn tick(&self) -> Result<Dispatched, RunnerError> {
        let mut done = Dispatched::default();
        let runs: Vec<(RunRow, Arc<Campaign>)> = (self.runtime().db.active_runs().await?)
            .into_iter()
            .filter_map(|run| Some((self.runner.campaign(&run.campaign)?, run)))
            .filter(|(campaign, _)| self.sends_for(&campaign.channel))
            .map(|(campaign, run)| (run, campaign))
            .collect();
        self.buckets.lock().expect("buckets").retain(|id, _| {
            runs.iter()
                .any(|(r, _)| r.id == *id && r.status == RunStatus::Running)
        });
        for (run, campaign) in runs {
            match run.status {
                RunStatus::Running => self.dispatch_run(&run, &campaign, &mut done).await?,
                RunStatus::Paused => self.resume_if_approved(&run, &campaign, &mut done).await?,
                _ => {}
            }
        }
        Ok(done)
    }

    /// Waits `round` (the application loop's pause); while a run is running, ticks every
    /// [`PACING_TICK`] meanwhile. Steps are counted, not timed: no clock is read here.
    pub async fn pace_for(&self, round: std::time::Duration) {
        let steps = (round.as_millis() / PACING_TICK.as_millis()).max(1) as u32;
        for step in 1..=steps {
            if !self.pacing() {
                tokio::time::sleep(round.saturating_sub(PACING_TICK * (step - 1))).await;
                return;
            }
            tokio::time::sleep(PACING_TICK).await;
            if step < steps
                && let Err(e) = self.tick().await
            {
                tracing::error!(error = %e, "dispatching campaign runs failed");
            }
        }
    }

    /// Whether a run is running (its bucket kept since the last tick).
    fn pacing(&self) -> bool {
        !self.buckets.lock().expect("buckets").is_empty()
    }

    /// One running run's turn this tick.
    async fn dispatch_run(
        &self,
        run: &RunRow,
        campaign: &Arc<Campaign>,
        done: &mut Dispatched,
    ) -> Result<(), RunnerError> {
        let runtime = self.runtime();
        let (db, now) = (&runtime.db, runtime.clock.now());
        if db
            .campaign(&campaign.name)
            .await?
            .is_none_or(|row| row.paused)
        {
            return Ok(());
        }
        if db.next_pending_at(run.id).await?.is_none() {
            return self.finish(run, done).await;
        }
        let templates = runtime.templates();
        if let Some(reason) = template_problem(campaign, &templates) {
            if db
                .set_run_status(run.id, RunStatus::Paused, Some(&reason), now)
                .await?
            {
                tracing::warn!(campaign = %campaign.name, run = run.id, %reason, "campaign run paused");
                done.paused.push((run.id, reason));
            }
            return Ok(());
        }
        if now >= run.scheduled_for + campaign.ttl {
            return self.end_at_ttl(run, campaign, done).await;
        }
        let allowed = self.sends_allowed(run.id, campaign, now).await?;
        let mut sends = allowed;
        let mut limit = self.limit(&campaign.channel, now).await?;
        let mut decided = 0;
        while sends > 0 && decided < DECISIONS_PER_TICK {
            let batch = db
                .pending_recipients(run.id, now, i64::try_from(sends.min(500)).unwrap_or(500))
                .await?;
            if batch.is_empty() {
                break;
            }
            let ids: Vec<i64> = batch.iter().map(|r| r.contact_id).collect();
            let wa_ids: HashMap<i64, String> = db
                .campaign_contacts(&ids)
                .await?
                .into_iter()
                .map(|(id, c)| (id, c.wa_id))
                .collect();
            for row in batch {
                decided += 1;
                let (outcome, variant) = match wa_ids.get(&row.contact_id) {
                    Some(wa_id) => {
                        let variant = campaign.variant_for(wa_id);
                        let recipient = (row.contact_id, wa_id.as_str(), variant);
                        let outcome = self
                            .recipient(run, campaign, recipient, &templates, &mut limit)
                            .await?;
                        (outcome, variant.name.as_deref())
                    }
                    None => (
                        Outcome::Skip("the contact was deleted".into()),
                        row.variant.as_deref(),
                    ),
                };
                if matches!(outcome, Outcome::Sent) {
                    sends -= 1;
                }
                let recipient = (row.contact_id, variant);
                record(db, (run, campaign), recipient, outcome, done, now).await?;
            }
        }
        self.spend(run.id, allowed - sends);
        if db.next_pending_at(run.id).await?.is_none() {
            self.finish(run, done).await?;
        }
        if runtime.outbound_status(&campaign.channel) == "pending" {
            runtime.outbox_ready(&campaign.channel).notify_one();
        }
        Ok(())
    }

    /// Marks a run with nothing pending `done`.
    async fn finish(&self, run: &RunRow, done: &mut Dispatched) -> Result<(), RunnerError> {
        let now = self.runtime().clock.now();
        let db = &self.runtime().db;
        if db
            .set_run_status(run.id, RunStatus::Done, None, now)
            .await?
        {
            tracing::info!(campaign = %run.campaign, run = run.id, "campaign run done");
            done.done.push(run.id);
        }
        Ok(())
    }

    /// Ends a run whose ttl ran out: the recipients it did not reach are skipped.
    async fn end_at_ttl(
        &self,
        run: &RunRow,
        campaign: &Campaign,
        done: &mut Dispatched,
    ) -> Result<(), RunnerError> {
        let reason = format!(
            "the run's ttl ({}) ran out before this recipient's turn",
            crate::domain::format_duration(campaign.ttl)
        );
        let now = self.runtime().clock.now();
        if self
            .runtime()
            .db
            .end_run_at_ttl(run.id, &reason, now)
            .await?
        {
            tracing::warn!(campaign = %run.campaign, run = run.id, "campaign run ended by its ttl with recipients not reached");
            done.done.push(run.id);
        }
        Ok(())
    }

    /// A run its template paused goes on once the template is approved again.
    async fn resume_if_approved(
        &self,
        run: &RunRow,
        campaign: &Campaign,
        done: &mut Dispatched,
    ) -> Result<(), RunnerError> {
        let by_template = run
            .reason
            .as_deref()
            .is_some_and(|r| r.starts_with(TEMPLATE_PAUSE));
        if !by_template || template_problem(campaign, &self.runtime().templates()).is_some() {
            return Ok(());
        }
        let now = self.runtime().clock.now();
        let db = &self.runtime().db;
        if db
            .set_run_status(run.id, RunStatus::Running, None, now)
            .await?
        {
            tracing::info!(campaign = %campaign.name, run = run.id, "campaign run resumed: its template is approved again");
            done.resumed.push(run.id);
        }
        Ok(())
    }

    /// How many sends the run may start now: its bucket's whole tokens, and no more than
    /// leaves about a second of its rate unsent in the channel's outbox.
    async fn sends_allowed(
        &self,
        run_id: i64,
        campaign: &Campaign,
        now: DateTime<Utc>,
    ) -> Result<usize, RunnerError> {
        let rate = self.rate(campaign);
        let second = rate.max(1.0);
        let tokens = {
            let mut buckets = self.buckets.lock().expect("buckets");
            let bucket = buckets.entry(run_id).or_insert(Bucket {
                tokens: 1.0_f64.min(second),
                at: now,
            });
            let elapsed = (now - bucket.at)
                .num_microseconds()
                .unwrap_or(i64::MAX)
                .max(0) as f64
                / 1e6;
            bucket.tokens = (bucket.tokens + elapsed * rate).min(second);
            bucket.at = now;
            bucket.tokens
        };
        let backlog = self
            .runtime()
            .db
            .campaign_backlog(&campaign.channel)
            .await? as f64;
        let room = (second.ceil() - backlog).max(0.0);
        Ok(tokens.min(room).floor() as usize)
    }

    /// Takes the tokens of `used` sends from the run's bucket.
    fn spend(&self, run_id: i64, used: usize) {
        let mut buckets = self.buckets.lock().expect("buckets");
        if let Some(bucket) = buckets.get_mut(&run_id) {
            bucket.tokens = (bucket.tokens - used as f64).max(0.0);
        }
    }

    /// Sends per second: the campaign's rate, else its channel's throughput.
    fn rate(&self, campaign: &Campaign) -> f64 {
        campaign.rate.map(|r| r.per_second()).unwrap_or_else(|| {
            let channel = self
                .runtime()
                .channels
                .iter()
                .find(|c| c.name == campaign.channel);
            f64::from(channel.map_or(80, |c| c.throughput_mps))
        })
    }

    /// The channel's messaging limit as it stands, if it has one.
    async fn limit(&self, channel: &str, now: DateTime<Utc>) -> Result<Option<Limit>, RunnerError> {
        let Some(max) = self.runtime().messaging_limit(channel) else {
            return Ok(None);
        };
        let counted = self
            .runtime()
            .db
            .template_recipients(channel, now - LIMIT_PERIOD)
            .await?;
        Ok(Some(Limit {
            max: u64::from(max),
            used: counted.contacts,
            frees_at: counted.oldest_last_send.unwrap_or(now) + LIMIT_PERIOD,
        }))
    }

    /// Decides one recipient under its contact's lock (the contact read again under it) and,
    /// when it is sent, writes `variant`'s message with its ledger row.
    async fn recipient(
        &self,
        run: &RunRow,
        campaign: &Campaign,
        (contact_id, wa_id, variant): (i64, &str, &Variant),
        templates: &Registry,
        limit: &mut Option<Limit>,
    ) -> Result<Outcome, RunnerError> {
        let runtime = self.runtime();
        let db = &runtime.db;
        let lock = runtime.lock(&campaign.channel, wa_id);
        let _guard = lock.lock().await;
        let Some((_, mut contact)) = db.campaign_contacts(&[contact_id]).await?.pop() else {
            return Ok(Outcome::Skip("the contact was deleted".into()));
        };
        let now = runtime.clock.now();
        let run_ends = run.scheduled_for + campaign.ttl;
        let capped = self
            .capped_sends(campaign, contact_id, templates, now)
            .await?;
        match gate(campaign, &contact, capped, run_ends, now) {
            Gate::Skip { reason } => return Ok(Outcome::Skip(reason)),
            Gate::Defer { until, reason } => return Ok(Outcome::Defer(until, reason)),
            Gate::Decide => {}
        }
        let message = match self.message(run, (campaign, variant), &contact, now) {
            Ok(message) => message,
            Err(e) => return Ok(Outcome::Skip(format!("rendering the message failed: {e}"))),
        };
        let decision = runtime.policy.decide(&message, &contact, templates, now);
        count_decision(&decision, "campaign");
        if !decision.sends() {
            return Ok(Outcome::Skip(decision.reason().to_string()));
        }
        let message = Policy::apply(&decision, &message);
        if let Some(wait) = self
            .over_limit(limit, &message, contact_id, run_ends, now)
            .await?
        {
            return Ok(wait);
        }
        runtime.policy.record_sent(&mut contact, now);
        let send = CampaignSend {
            run_id: run.id,
            contact_id,
            variant: variant.name.as_deref(),
            channel: &campaign.channel,
            message: &message,
            decision: &decision,
            status: runtime.outbound_status(&campaign.channel),
            policy: &contact.policy,
        };
        db.send_campaign_message(&send, now).await?;
        Ok(Outcome::Sent)
    }

    /// The contact's messages of the campaign's category in its frequency cap's period (0
    /// when it has no cap).
    async fn capped_sends(
        &self,
        campaign: &Campaign,
        contact_id: i64,
        templates: &Registry,
        now: DateTime<Utc>,
    ) -> Result<u32, StoreError> {
        let Some(cap) = campaign.frequency_cap else {
            return Ok(0);
        };
        let names: Vec<String> = templates
            .templates
            .iter()
            .filter(|t| t.category == campaign.category)
            .map(|t| t.name.clone())
            .collect();
        let category = category_name(campaign.category);
        let db = &self.runtime().db;
        db.category_sends(contact_id, category, &names, now - cap.per)
            .await
    }

    /// The campaign's message to `contact`, as `variant` words it: the `in_window` message
    /// (rendered like a step's) with the template as its `outside_window`, else the
    /// template; parameters interpolated with the contact.
    fn message(
        &self,
        run: &RunRow,
        (campaign, variant): (&Campaign, &Variant),
        contact: &Contact,
        now: DateTime<Utc>,
    ) -> Result<Outbound, ScriptError> {
        let scripting = &self.runtime().engine.scripting;
        let call = &variant.template;
        let params = render_for_contact(scripting, contact, now, |s, ctx| {
            call.params.iter().map(|p| p.render(s, ctx)).collect()
        })?;
        let origin = Origin::Campaign {
            campaign: campaign.name.clone(),
            run: run.id,
            category: category_name(campaign.category).to_string(),
            on_reply: campaign.on_reply.clone(),
        };
        let template = TemplateFallback {
            name: call.name.clone(),
            language: call.language.clone(),
            params,
        };
        let Some(in_window) = campaign.in_window_of(variant) else {
            let content = OutboundContent::Template {
                name: template.name,
                language: template.language,
                params: template.params,
            };
            return Ok(Outbound::new(content, origin));
        };
        let content = render_for_contact(scripting, contact, now, |s, ctx| {
            render_message(s, ctx, &in_window.text, in_window)
        })?;
        Ok(Outbound {
            outside_window: Some(template),
            ..Outbound::new(content, origin)
        })
    }

    /// The channel's messaging limit for a template to a contact not yet counted in it:
    /// when it is spent, the recipient waits until the oldest counted recipient leaves the
    /// rolling 24 hours (`None`: send).
    async fn over_limit(
        &self,
        limit: &mut Option<Limit>,
        message: &Outbound,
        contact_id: i64,
        run_ends: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Option<Outcome>, StoreError> {
        let Some(limit) = limit.as_mut() else {
            return Ok(None);
        };
        if message.content.is_free_form() {
            return Ok(None);
        }
        let db = &self.runtime().db;
        if db
            .got_template_since(contact_id, now - LIMIT_PERIOD)
            .await?
        {
            return Ok(None);
        }
        if limit.used < limit.max {
            limit.used += 1;
            return Ok(None);
        }
        let reason = format!(
            "the channel's messaging limit ({} business-initiated recipients in 24 h) is spent",
            limit.max
        );
        Ok(Some(match defer(limit.frees_at, reason, run_ends) {
            Gate::Defer { until, reason } => Outcome::Defer(until, reason),
            Gate::Skip { reason } => Outcome::Skip(reason),
            Gate::Decide => return Ok(None),
        }))
    }
}

/// What is wrong with the campaign's templates for sending, if anything: one missing from
/// the registry, or not approved (paused, disabled...). A split campaign waits for all of
/// its variants' templates, so no variant's recipients get another's message meanwhile.
fn template_problem(campaign: &Campaign, templates: &Registry) -> Option<String> {
    campaign
        .variants
        .iter()
        .find_map(|v| call_problem(&v.template, templates))
}

/// What is wrong with one template call for sending, if anything.
fn call_problem(call: &TemplateCall, templates: &Registry) -> Option<String> {
    let status = templates.find(&call.name, &call.language).map(|t| t.status);
    match status {
        Some(Status::Approved) => None,
        Some(status) => Some(format!(
            "{TEMPLATE_PAUSE}{}` ({}) is {}: the run waits until it is approved again",
            call.name,
            call.language,
            status.as_str()
        )),
        None => Some(format!(
            "{TEMPLATE_PAUSE}{}` ({}) is not in the template registry: add it or run \
             `flowgate templates sync`; the run waits until it is approved",
            call.name, call.language
        )),
    }
}

/// Records one recipient's outcome (a send was recorded with its message) and counts it,
/// in the run's tally and on `/metrics`.
async fn record(
    db: &crate::store::Db,
    (run, campaign): (&RunRow, &Campaign),
    (contact_id, variant): (i64, Option<&str>),
    outcome: Outcome,
    done: &mut Dispatched,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let (decision, reason, not_before) = match &outcome {
        Outcome::Sent => {
            done.sent += 1;
            metrics::count_campaign_recipient(&campaign.name, variant, "sent", None);
            return Ok(());
        }
        Outcome::Skip(reason) => {
            done.skipped += 1;
            (RecipientDecision::Skipped, reason, None)
        }
        Outcome::Defer(until, reason) => {
            done.deferred += 1;
            (RecipientDecision::Deferred, reason, Some(*until))
        }
    };
    metrics::count_campaign_recipient(&campaign.name, variant, decision.as_str(), Some(reason));
    let outcome = RecipientOutcome {
        decision,
        variant,
        reason: Some(reason),
        message_id: None,
        not_before,
    };
    db.record_recipient(run.id, contact_id, &outcome, now)
        .await?;
    Ok(())
}
