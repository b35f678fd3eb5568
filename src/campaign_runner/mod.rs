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

pub mod audience;
pub mod dispatch;

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::campaign::{Campaign, schedule_key};
use crate::dispatch::Runtime;
use crate::store::{CampaignOrigin, NewCampaign, RunStatus, RunTrigger, StoreError};

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

/// The campaigns of the loaded project, run against the runtime's store and clock.
pub struct CampaignRunner {
    runtime: Arc<Runtime>,
    campaigns: HashMap<String, Arc<Campaign>>,
}

impl CampaignRunner {
    pub fn new(runtime: Arc<Runtime>, campaigns: &[Arc<Campaign>]) -> Self {
        Self {
            runtime,
            campaigns: campaigns
                .iter()
                .map(|c| (c.name.clone(), c.clone()))
                .collect(),
        }
    }

    /// The runtime it runs on.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// The loaded campaign named `name`.
    pub fn campaign(&self, name: &str) -> Option<Arc<Campaign>> {
        self.campaigns.get(name).cloned()
    }

    /// At start: saves every loaded campaign with its source, forgets file campaigns whose
    /// file is gone (their runs stay), and finishes the snapshots a stop interrupted.
    pub async fn sync(&self) -> Result<Vec<StartedRun>, RunnerError> {
        let now = self.runtime.clock.now();
        let db = &self.runtime.db;
        for campaign in self.campaigns.values() {
            let stored = db.campaign(&campaign.name).await?;
            let next_run_at = match stored {
                Some(row) if same_schedule(&row.source, &campaign.source) => row.next_run_at,
                _ => campaign.schedule().next_after(now),
            };
            db.save_campaign(
                &NewCampaign {
                    name: &campaign.name,
                    channel: &campaign.channel,
                    source: &campaign.source,
                    origin: CampaignOrigin::File,
                    next_run_at,
                },
                now,
            )
            .await?;
        }
        for row in db.campaigns().await? {
            if row.origin == CampaignOrigin::File && !self.campaigns.contains_key(&row.name) {
                db.delete_campaign(&row.name).await?;
                tracing::info!(campaign = %row.name, "campaign file removed: campaign forgotten");
            }
        }
        self.resume_planned().await
    }

    /// Runs claimed but not yet running (a stop came mid-snapshot): their snapshot is taken
    /// again, which adds only the rows still missing.
    async fn resume_planned(&self) -> Result<Vec<StartedRun>, RunnerError> {
        let mut resumed = Vec::new();
        for run in self.runtime.db.active_runs().await? {
            if run.status != RunStatus::Planned {
                continue;
            }
            let Some(campaign) = self.campaigns.get(&run.campaign) else {
                continue;
            };
            let recipients = self.start(campaign, run.id, run.created_at).await?;
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
            let (Some(campaign), Some(due)) = (self.campaigns.get(&row.name), row.next_run_at)
            else {
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
                    tick.missed.push((row.name.clone(), missed.scheduled_for));
                }
            }
            if let Some(at) = catch_up.start {
                let claim = db
                    .claim_run(&row.name, at, RunTrigger::Schedule, now)
                    .await?;
                if claim.created {
                    let recipients = self.start(campaign, claim.run_id, now).await?;
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
        Ok(added)
    }
}

/// Whether two sources of a campaign have the same run times (a source that does not
/// parse counts as different).
fn same_schedule(stored: &str, loaded: &str) -> bool {
    matches!((schedule_key(stored), schedule_key(loaded)), (Some(a), Some(b)) if a == b)
}
