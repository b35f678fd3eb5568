//! The campaign runner: the I/O side of campaigns, beside the outbox. It writes the loaded
//! campaign files to the store, and on each tick starts the runs that fell due (claimed
//! once, missed ones recorded with why) and snapshots each started run's audience into its
//! ledger ([`audience`]).
//!
//! What a campaign *is* and *when* it runs is `campaign` (pure); this module asks the
//! [`Clock`](crate::clock::Clock) for now, the store for what is due, and applies
//! [`Schedule::catch_up`](crate::campaign::Schedule::catch_up): of the runs due since the
//! persisted `next_run_at`, the latest starts if it is within the campaign's `ttl`, every
//! other is recorded missed, and the next run time is persisted. A run is started by the
//! tick that created its row ([`Db::claim_run`]'s unique key), so two ticks at once (two
//! loops, two processes on one database) start it once.
//!
//! `serve` ticks every half second from the application's loop; tests tick on a virtual
//! clock.
//!
//! The campaigns change at run time ([`registry`]): the files of `campaigns/` (replaced
//! whole by a live reload) and the campaigns written through the API (stored with origin
//! `api`, compiled again from their stored text at start). Everything that reads a
//! campaign's definition reads it through [`CampaignRunner::campaign`].

pub mod audience;
pub mod dispatch;
pub mod limits;
pub mod registry;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};

use crate::campaign::{Campaign, schedule_key};
use crate::dispatch::Runtime;
use crate::metrics::Gauge;
use crate::store::{CampaignOrigin, NewCampaign, RunStatus, RunTrigger, StoreError};
use registry::Registry;

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("evaluating a campaign's audience stopped unexpectedly: {0}")]
    Audience(String),
}

/// A run this process started: its audience is in the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedRun {
    pub campaign: String,
    pub run_id: i64,
    pub scheduled_for: DateTime<Utc>,
    /// Recipients snapshotted into the ledger.
    pub recipients: u64,
}

/// What one tick did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tick {
    pub started: Vec<StartedRun>,
    /// Runs recorded as missed: (campaign, scheduled for).
    pub missed: Vec<(String, DateTime<Utc>)>,
}

/// The campaigns at run time (files and API), run against the runtime's store and clock.
pub struct CampaignRunner {
    runtime: Arc<Runtime>,
    registry: RwLock<Registry>,
    /// One change (API write, reload) at a time: a change reads the store, compiles and
    /// writes, and two interleaved would lose one.
    changes: tokio::sync::Mutex<()>,
}

impl CampaignRunner {
    /// A runner for the loaded campaign files; [`CampaignRunner::sync`] adds the API's.
    pub fn new(runtime: Arc<Runtime>, campaigns: &[Arc<Campaign>]) -> Self {
        Self {
            runtime,
            registry: RwLock::new(Registry::with_files(campaigns)),
            changes: tokio::sync::Mutex::new(()),
        }
    }

    /// The runtime it runs on.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// The campaign named `name` as it is now (a file's, else the API's).
    pub fn campaign(&self, name: &str) -> Option<Arc<Campaign>> {
        self.registry.read().expect("campaigns lock").get(name)
    }

    /// The longest `frequency_cap` period of the campaigns now: retention keeps at least
    /// that much history, since a cap counts the messages sent within it.
    pub fn longest_frequency_cap(&self) -> Option<chrono::Duration> {
        self.registry
            .read()
            .expect("campaigns lock")
            .longest_frequency_cap()
    }

    /// At start: saves every loaded campaign file with its source, forgets file campaigns
    /// whose file is gone (their runs stay), compiles the API's campaigns from their stored
    /// text, and finishes the snapshots a stop interrupted.
    pub async fn sync(&self) -> Result<Vec<StartedRun>, RunnerError> {
        let _one = self.changes.lock().await;
        let files = self.registry.read().expect("campaigns lock").files();
        self.save_files(&files).await?;
        self.load_api_campaigns().await?;
        self.resume_planned().await
    }

    /// Saves the file campaigns `files` (a changed schedule counts from now) and forgets the
    /// stored file campaigns not among them, cancelling their runs not over.
    async fn save_files(&self, files: &[Arc<Campaign>]) -> Result<(), RunnerError> {
        let now = self.runtime.clock.now();
        let db = &self.runtime.db;
        for campaign in files {
            let stored = db.campaign(&campaign.name).await?;
            db.save_campaign(
                &NewCampaign {
                    name: &campaign.name,
                    channel: &campaign.channel,
                    source: &campaign.source,
                    origin: CampaignOrigin::File,
                    next_run_at: next_run_at(campaign, stored.as_ref(), now),
                },
                now,
            )
            .await?;
        }
        for row in db.campaigns().await? {
            let listed = files.iter().any(|c| c.name == row.name);
            if row.origin == CampaignOrigin::File && !listed {
                self.forget(&row.name, "its file was removed").await?;
                tracing::info!(campaign = %row.name, "campaign file removed: campaign forgotten");
            }
        }
        Ok(())
    }

    /// Deletes a campaign's definition and cancels its runs not over (nothing could
    /// resume them); its runs and reports stay.
    async fn forget(&self, name: &str, why: &str) -> Result<(), RunnerError> {
        let db = &self.runtime.db;
        let now = self.runtime.clock.now();
        for run in db.active_runs().await? {
            if run.campaign == name {
                db.cancel_run(run.id, &format!("the campaign was deleted: {why}"), now)
                    .await?;
            }
        }
        db.delete_campaign(name).await?;
        Ok(())
    }

    /// The API's stored campaigns, compiled again (against today's templates and flows).
    /// One that no longer compiles is not run, and says why in the list.
    async fn load_api_campaigns(&self) -> Result<(), RunnerError> {
        for row in self.runtime.db.campaigns().await? {
            if row.origin != CampaignOrigin::Api {
                continue;
            }
            let compiled = self.compile(&registry::api_file(&row.name), &row.source);
            let mut registry = self.registry.write().expect("campaigns lock");
            match compiled {
                Ok((campaign, _)) if campaign.name == row.name => registry.put_api(campaign),
                Ok(_) => registry.broken(&row.name, "its stored text names another campaign"),
                Err(diags) => {
                    tracing::error!(campaign = %row.name, diagnostics = %diags.render(false), "a campaign written through the API no longer compiles: it does not run until it is written again");
                    registry.broken(&row.name, &diags.render(false));
                }
            }
        }
        Ok(())
    }

    /// Runs claimed but not yet running (a stop came mid-snapshot): their snapshot is taken
    /// again, which adds only the rows still missing.
    async fn resume_planned(&self) -> Result<Vec<StartedRun>, RunnerError> {
        let mut resumed = Vec::new();
        for run in self.runtime.db.active_runs().await? {
            if run.status != RunStatus::Planned {
                continue;
            }
            let Some(campaign) = self.campaign(&run.campaign) else {
                continue;
            };
            let recipients = self.start(&campaign, run.id, run.created_at).await?;
            resumed.push(StartedRun {
                campaign: run.campaign,
                run_id: run.id,
                scheduled_for: run.scheduled_for,
                recipients,
            });
        }
        Ok(resumed)
    }

    /// Starts the runs due by the clock's now, records the missed ones, and persists each
    /// campaign's next run time.
    pub async fn tick(&self) -> Result<Tick, RunnerError> {
        let now = self.runtime.clock.now();
        let db = &self.runtime.db;
        let mut tick = Tick::default();
        for row in db.due_campaigns(now).await? {
            let (Some(campaign), Some(due)) = (self.campaign(&row.name), row.next_run_at) else {
                continue;
            };
            let catch_up = campaign.schedule().catch_up(due, now, campaign.ttl);
            if catch_up.missed_truncated {
                tracing::warn!(campaign = %row.name, "more runs were missed than are recorded");
            }
            for missed in &catch_up.missed {
                let reason = missed.reason.describe();
                let claim = db
                    .record_missed_run(&row.name, missed.scheduled_for, reason, now)
                    .await?;
                if claim.created {
                    tracing::warn!(campaign = %row.name, at = %missed.scheduled_for, reason, "campaign run missed");
                    crate::metrics::count(RUNS_MISSED, RUNS_MISSED_HELP, &[], 1);
                    tick.missed.push((row.name.clone(), missed.scheduled_for));
                }
            }
            if let Some(at) = catch_up.start {
                let claim = db
                    .claim_run(&row.name, at, RunTrigger::Schedule, now)
                    .await?;
                if claim.created {
                    let recipients = self.start(&campaign, claim.run_id, now).await?;
                    tick.started.push(StartedRun {
                        campaign: row.name.clone(),
                        run_id: claim.run_id,
                        scheduled_for: at,
                        recipients,
                    });
                }
            }
            db.set_next_run_at(&row.name, catch_up.next_run_at, now)
                .await?;
        }
        Ok(tick)
    }

    /// Snapshots a claimed run's audience (contacts that existed when it was claimed) and
    /// marks it running. Answers how many recipients the snapshot added.
    async fn start(
        &self,
        campaign: &Arc<Campaign>,
        run_id: i64,
        claimed_at: DateTime<Utc>,
    ) -> Result<u64, RunnerError> {
        let added = audience::snapshot(&self.runtime, campaign, run_id, claimed_at).await?;
        let now = self.runtime.clock.now();
        self.runtime
            .db
            .set_run_status(run_id, RunStatus::Running, None, now)
            .await?;
        tracing::info!(campaign = %campaign.name, run = run_id, recipients = added, "campaign run started");
        crate::metrics::count(RUNS_STARTED, RUNS_STARTED_HELP, &[], 1);
        crate::metrics::count(
            RECIPIENTS,
            RECIPIENTS_HELP,
            &[("campaign", &campaign.name)],
            added,
        );
        Ok(added)
    }
}

const RUNS_STARTED: &str = "flowgate_campaign_runs_started_total";
const RUNS_STARTED_HELP: &str = "Campaign runs started (scheduled and run-now).";
const RUNS_MISSED: &str = "flowgate_campaign_runs_missed_total";
const RUNS_MISSED_HELP: &str = "Campaign runs recorded as missed (past their ttl, or superseded).";
const RECIPIENTS: &str = "flowgate_campaign_recipients_planned_total";
const RECIPIENTS_HELP: &str = "Recipients snapshotted into campaign runs, by campaign.";

/// The campaigns' gauges for `/metrics`, read now: runs by status, and the recipients of
/// the runs not over by campaign, decision and reason class.
pub async fn gauges(db: &crate::store::Db) -> Result<Vec<Gauge<'static>>, StoreError> {
    let mut gauges: Vec<Gauge<'static>> = db
        .runs_by_status()
        .await?
        .into_iter()
        .map(|(status, n)| {
            let help = "Campaign runs, by status.";
            (
                "flowgate_campaign_runs",
                help,
                vec![("status", status)],
                n as f64,
            )
        })
        .collect();
    let mut recipients: BTreeMap<(String, String, &str), i64> = BTreeMap::new();
    for row in db.active_recipients().await? {
        let class = crate::campaign::report::reason_class(row.reason.as_deref());
        *recipients
            .entry((row.campaign, row.decision, class))
            .or_default() += row.count;
    }
    for ((campaign, decision, class), n) in recipients {
        gauges.push((
            "flowgate_campaign_active_recipients",
            "Recipients of the campaign runs not over, by campaign, decision and reason class.",
            vec![
                ("campaign", campaign),
                ("decision", decision),
                ("reason", class.to_string()),
            ],
            n as f64,
        ));
    }
    Ok(gauges)
}

/// A campaign's next run time when it is saved: the stored one while its schedule is the
/// same, else the first after now.
fn next_run_at(
    campaign: &Campaign,
    stored: Option<&crate::store::CampaignRow>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    match stored {
        Some(row) if same_schedule(&row.source, &campaign.source) => row.next_run_at,
        _ => campaign.schedule().next_after(now),
    }
}

/// Whether two sources of a campaign have the same run times (a source that does not
/// parse counts as different).
fn same_schedule(stored: &str, loaded: &str) -> bool {
    matches!((schedule_key(stored), schedule_key(loaded)), (Some(a), Some(b)) if a == b)
}
