//! Manual runs (run-now) and the idempotency keys of their requests
//! (`campaign_run_requests`).
//!
//! A run-now is refused while the campaign has a run not over yet (two runs at once would
//! reach the same recipients twice), and a request carrying an `Idempotency-Key` already
//! seen for the campaign answers the run it started. The check, the run's row and the key
//! are one writer job, so two requests racing cannot both start a run.

use chrono::{DateTime, Utc};

use super::db::{Db, with_writer};
use super::error::StoreError;

/// What a run-now request got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManualRun {
    /// A new run (status `planned`): the caller snapshots its audience and starts it.
    Started(i64),
    /// The request's key was seen before: the run it started then.
    Replayed(i64),
    /// The campaign already has this run not over yet; nothing was started.
    Busy(i64),
}

impl Db {
    /// Claims a manual run of `campaign` scheduled for `now`, unless `key` was seen before
    /// for it (the run it started) or the campaign has a run not over (that run).
    pub async fn claim_manual_run(
        &self,
        campaign: &str,
        key: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<ManualRun, StoreError> {
        const SEEN: &str = "SELECT run_id FROM campaign_run_requests \
            WHERE campaign = $1 AND idempotency_key = $2";
        const ACTIVE: &str = "SELECT id FROM campaign_runs WHERE campaign = $1 \
            AND status IN ('planned', 'running', 'paused') ORDER BY id DESC LIMIT 1";
        const INSERT: &str = "INSERT INTO campaign_runs (campaign, scheduled_for, trigger, \
                status, created_at, updated_at) VALUES ($1, $2, 'manual', 'planned', $2, $2) \
            ON CONFLICT (campaign, scheduled_for) DO NOTHING RETURNING id";
        const REMEMBER: &str = "INSERT INTO campaign_run_requests \
            (campaign, idempotency_key, run_id, created_at) VALUES ($1, $2, $3, $4)";
        let key = key.map(str::to_string);
        let now = now.timestamp_millis();
        let outcome = with_writer!(self, own(campaign), |pool| {
            let mut tx = sqlx::Connection::begin(&mut *pool).await?;
            let seen: Option<i64> = match &key {
                Some(key) => {
                    sqlx::query_scalar(SEEN)
                        .bind(&campaign)
                        .bind(key)
                        .fetch_optional(&mut *tx)
                        .await?
                }
                None => None,
            };
            let active: Option<i64> = sqlx::query_scalar(ACTIVE)
                .bind(&campaign)
                .fetch_optional(&mut *tx)
                .await?;
            let outcome = match (seen, active) {
                (Some(run), _) => ManualRun::Replayed(run),
                (None, Some(run)) => ManualRun::Busy(run),
                (None, None) => {
                    let inserted: Option<i64> = sqlx::query_scalar(INSERT)
                        .bind(&campaign)
                        .bind(now)
                        .fetch_optional(&mut *tx)
                        .await?;
                    match inserted {
                        Some(run) => {
                            if let Some(key) = &key {
                                sqlx::query(REMEMBER)
                                    .bind(&campaign)
                                    .bind(key)
                                    .bind(run)
                                    .bind(now)
                                    .execute(&mut *tx)
                                    .await?;
                            }
                            ManualRun::Started(run)
                        }
                        // A run for this very millisecond exists and is over already.
                        None => ManualRun::Busy(
                            sqlx::query_scalar(
                                "SELECT id FROM campaign_runs \
                                WHERE campaign = $1 AND scheduled_for = $2",
                            )
                            .bind(&campaign)
                            .bind(now)
                            .fetch_one(&mut *tx)
                            .await?,
                        ),
                    }
                }
            };
            tx.commit().await?;
            outcome
        });
        Ok(outcome)
    }
}
