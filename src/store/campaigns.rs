//! Campaigns (`campaigns`), their runs (`campaign_runs`) and each run's ledger of
//! recipients (`campaign_recipients`).
//!
//! Two unique keys carry the guarantees: a run is claimed once per `(campaign,
//! scheduled_for)` ([`Db::claim_run`] answers whether this caller created it), and a
//! recipient has one ledger row per run (`(run_id, contact_id)`), which leaves the pending
//! set for good once decided ([`Db::record_recipient`]). A run's audience is snapshotted into
//! the ledger in chunks, insert-or-ignore ([`Db::snapshot_audience`]), so a snapshot
//! interrupted by a crash is finished by taking it again.
//!
//! Exactly-once sending: the outbound message and its ledger row's `sent` are one write
//! ([`Db::send_campaign_message`], one transaction), and the message's idempotency key comes
//! from `(run_id, contact_id)` ([`campaign_message_key`], unique in `messages`), so a
//! recipient decided again after a crash never gets a second message. The dispatcher's
//! other questions (a contact's sends of a category, the channel's template recipients, the
//! campaign backlog in the outbox) are answered here too.

use chrono::{DateTime, Utc};
use serde::Serialize;

use rusqlite::types::Value;

use super::db::{Backend, Db};
use super::db::{with_pool, with_writer};
use super::error::StoreError;
use super::sql::{
    bind_numbered, from_millis, json_elements, no_index, outbound_kind, placeholders,
};
use crate::domain::{Contact, Decision, Origin, Outbound, PolicyState};

/// Rows of a snapshot per statement (one parameter each).
const SNAPSHOT_ROWS_PER_STATEMENT: usize = 1_000;
/// Statements of a snapshot per writer job (one transaction): a million-row audience is 50
/// short transactions, so conversational writes queue behind none of them for long.
const SNAPSHOT_STATEMENTS_PER_JOB: usize = 20;

/// An enum stored as text: its variants, their stored names, `as_str` and a strict parse.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name {
            $($(#[$vmeta])* $variant),*
        }

        impl $name {
            /// The name it is stored and shown as.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),*
                }
            }

            fn parse(text: &str, column: &str) -> Result<Self, StoreError> {
                match text {
                    $($text => Ok(Self::$variant),)*
                    other => Err(StoreError::Corrupt(format!(
                        "{column} holds `{other}`, which is not a {}",
                        stringify!($name)
                    ))),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum! {
    /// Where a campaign's definition came from.
    CampaignOrigin {
        /// A file of `campaigns/`.
        File = "file",
        /// The API.
        Api = "api",
    }
}

text_enum! {
    /// A run's state. `Done`, `Missed` and `Cancelled` are final.
    RunStatus {
        /// Claimed; its audience is being snapshotted.
        Planned = "planned",
        Running = "running",
        /// Stopped until resumed (a paused template, an account error, an operator).
        Paused = "paused",
        Done = "done",
        /// Never started: its ttl ran out, or a later run superseded it.
        Missed = "missed",
        Cancelled = "cancelled",
    }
}

text_enum! {
    /// What made a run.
    RunTrigger {
        /// The campaign's `schedule` or `at`.
        Schedule = "schedule",
        /// Run-now from the CLI or the API.
        Manual = "manual",
    }
}

text_enum! {
    /// What became of one recipient of a run. `Planned` and `Deferred` are pending; the
    /// others are final.
    RecipientDecision {
        Planned = "planned",
        /// To be decided again at `not_before` (quiet hours, a back-off, the messaging limit).
        Deferred = "deferred",
        /// Handed to the outbox as `message_id`.
        Sent = "sent",
        Skipped = "skipped",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

impl RunStatus {
    /// Whether the run is over (its status never changes again).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Done | Self::Missed | Self::Cancelled)
    }
}

/// A campaign's definition to save.
#[derive(Debug, Clone, PartialEq)]
pub struct NewCampaign<'a> {
    pub name: &'a str,
    pub channel: &'a str,
    /// The YAML text, as written.
    pub source: &'a str,
    pub origin: CampaignOrigin,
    pub next_run_at: Option<DateTime<Utc>>,
}

/// A stored campaign.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CampaignRow {
    pub name: String,
    pub channel: String,
    pub source: String,
    pub origin: CampaignOrigin,
    pub paused: bool,
    pub pause_reason: Option<String>,
    pub next_run_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The answer to a claim: the run's id, and whether this caller created it (only that
/// caller starts it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub run_id: i64,
    pub created: bool,
}

/// A stored run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunRow {
    pub id: i64,
    pub campaign: String,
    pub scheduled_for: DateTime<Utc>,
    pub trigger: RunTrigger,
    pub status: RunStatus,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub report: Option<serde_json::Value>,
    pub updated_at: DateTime<Utc>,
}

/// One recipient of a run, as the ledger holds it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LedgerRow {
    pub run_id: i64,
    pub contact_id: i64,
    pub decision: RecipientDecision,
    pub reason: Option<String>,
    pub message_id: Option<i64>,
    pub not_before: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
    /// The split campaign's variant it was given; `None` without a split.
    pub variant: Option<String>,
}

/// What was decided for a recipient.
#[derive(Debug, Clone, PartialEq)]
pub struct RecipientOutcome<'a> {
    pub decision: RecipientDecision,
    /// The split campaign's variant decided for; `None` keeps the row's.
    pub variant: Option<&'a str>,
    pub reason: Option<&'a str>,
    /// The outbound message, for `Sent`.
    pub message_id: Option<i64>,
    /// For `Deferred`: when to take the recipient again.
    pub not_before: Option<DateTime<Utc>>,
}

/// How many of a run's recipients share a variant, decision, reason, and (for those sent)
/// their message's status and error code: the rows of a run's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecipientCount {
    /// The split campaign's variant; `None` without a split.
    pub variant: Option<String>,
    pub decision: RecipientDecision,
    pub reason: Option<String>,
    pub message_status: Option<String>,
    pub error_code: Option<i64>,
    pub count: i64,
}

type CampaignRaw = (
    String,
    String,
    String,
    String,
    i64,
    Option<String>,
    Option<i64>,
    i64,
    i64,
);

type RunRaw = (
    i64,
    String,
    i64,
    String,
    String,
    Option<String>,
    i64,
    Option<i64>,
    Option<i64>,
    Option<String>,
    i64,
);

type LedgerRaw = (
    i64,
    i64,
    String,
    Option<String>,
    Option<i64>,
    i64,
    Option<i64>,
    Option<String>,
);

const CAMPAIGN_COLUMNS: &str = "name, channel, source, origin, paused, pause_reason, \
    next_run_at, created_at, updated_at";
const RUN_COLUMNS: &str = "id, campaign, scheduled_for, trigger, status, reason, created_at, \
    started_at, finished_at, report, updated_at";
const LEDGER_COLUMNS: &str =
    "run_id, contact_id, decision, reason, message_id, not_before, decided_at, variant";

/// [`Db::set_run_status`]'s statement.
const UPDATE_RUN_STATUS: &str = "UPDATE campaign_runs SET status = $2, reason = $3, \
        started_at = CASE WHEN $4 = 1 AND started_at IS NULL THEN $6 ELSE started_at END, \
        finished_at = CASE WHEN $5 = 1 THEN $6 ELSE finished_at END, updated_at = $6 \
    WHERE id = $1 AND status NOT IN ('done', 'missed', 'cancelled')";

/// Runs [`UPDATE_RUN_STATUS`] on `$conn` (a connection the caller holds, of either
/// backend): whether the run changed. A macro, so one text serves both connection types.
macro_rules! update_run_status {
    ($conn:expr, $run_id:expr, $status:expr, $reason:expr, $now:expr) => {{
        let status: RunStatus = $status;
        sqlx::query(UPDATE_RUN_STATUS)
            .bind($run_id)
            .bind(status.as_str())
            .bind($reason)
            .bind(i64::from(status == RunStatus::Running))
            .bind(i64::from(status.is_final()))
            .bind($now.timestamp_millis())
            .execute($conn)
            .await?
            .rows_affected()
            > 0
    }};
}

fn millis_opt(ms: Option<i64>, column: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
    ms.map(|ms| from_millis(ms, column)).transpose()
}

fn campaign_row(raw: CampaignRaw) -> Result<CampaignRow, StoreError> {
    let (name, channel, source, origin, paused, pause_reason, next, created, updated) = raw;
    Ok(CampaignRow {
        name,
        channel,
        source,
        origin: CampaignOrigin::parse(&origin, "campaigns.origin")?,
        paused: paused != 0,
        pause_reason,
        next_run_at: millis_opt(next, "campaigns.next_run_at")?,
        created_at: from_millis(created, "campaigns.created_at")?,
        updated_at: from_millis(updated, "campaigns.updated_at")?,
    })
}

fn run_row(raw: RunRaw) -> Result<RunRow, StoreError> {
    let (
        id,
        campaign,
        scheduled,
        trigger,
        status,
        reason,
        created,
        started,
        finished,
        report,
        updated,
    ) = raw;
    Ok(RunRow {
        id,
        campaign,
        scheduled_for: from_millis(scheduled, "campaign_runs.scheduled_for")?,
        trigger: RunTrigger::parse(&trigger, "campaign_runs.trigger")?,
        status: RunStatus::parse(&status, "campaign_runs.status")?,
        reason,
        created_at: from_millis(created, "campaign_runs.created_at")?,
        started_at: millis_opt(started, "campaign_runs.started_at")?,
        finished_at: millis_opt(finished, "campaign_runs.finished_at")?,
        report: report.map(|r| serde_json::from_str(&r)).transpose()?,
        updated_at: from_millis(updated, "campaign_runs.updated_at")?,
    })
}

fn ledger_row(raw: LedgerRaw) -> Result<LedgerRow, StoreError> {
    let (run_id, contact_id, decision, reason, message_id, not_before, decided_at, variant) = raw;
    Ok(LedgerRow {
        run_id,
        contact_id,
        decision: RecipientDecision::parse(&decision, "campaign_recipients.decision")?,
        reason,
        message_id,
        not_before: from_millis(not_before, "campaign_recipients.not_before")?,
        decided_at: millis_opt(decided_at, "campaign_recipients.decided_at")?,
        variant,
    })
}

// Definitions.
impl Db {
    /// Saves a campaign's definition, creating it or replacing its source, channel, origin
    /// and `next_run_at` (a paused campaign stays paused). Answers whether it was created.
    pub async fn save_campaign(
        &self,
        campaign: &NewCampaign<'_>,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        const EXISTS: &str = "SELECT COUNT(*) FROM campaigns WHERE name = $1";
        const SQL: &str = "INSERT INTO campaigns (name, channel, source, origin, next_run_at, \
                created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6) \
            ON CONFLICT (name) DO UPDATE SET channel = excluded.channel, \
                source = excluded.source, origin = excluded.origin, \
                next_run_at = excluded.next_run_at, updated_at = excluded.updated_at";
        let (name, channel, source) = (campaign.name, campaign.channel, campaign.source);
        let origin = campaign.origin.as_str();
        let next = campaign.next_run_at.map(|t| t.timestamp_millis());
        let now = now.timestamp_millis();
        let existed: i64 = with_writer!(self, own(name, channel, source), |pool| {
            let existed = sqlx::query_scalar(EXISTS)
                .bind(&name)
                .fetch_one(&mut *pool)
                .await?;
            sqlx::query(SQL)
                .bind(&name)
                .bind(&channel)
                .bind(&source)
                .bind(origin)
                .bind(next)
                .bind(now)
                .execute(&mut *pool)
                .await?;
            existed
        });
        Ok(existed == 0)
    }

    /// The campaign named `name`.
    pub async fn campaign(&self, name: &str) -> Result<Option<CampaignRow>, StoreError> {
        let sql = format!("SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE name = $1");
        let raw: Option<CampaignRaw> = with_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(name)
            .fetch_optional(pool)
            .await?);
        raw.map(campaign_row).transpose()
    }

    /// Every campaign, by name.
    pub async fn campaigns(&self) -> Result<Vec<CampaignRow>, StoreError> {
        let sql = format!("SELECT {CAMPAIGN_COLUMNS} FROM campaigns ORDER BY name");
        let raw: Vec<CampaignRaw> =
            with_pool!(self, |pool| sqlx::query_as(&sql).fetch_all(pool).await?);
        raw.into_iter().map(campaign_row).collect()
    }

    /// Deletes a campaign's definition; its runs and their ledgers stay (reports remain
    /// readable, and a campaign written again under the name never claims a run twice).
    /// Answers whether it existed.
    pub async fn delete_campaign(&self, name: &str) -> Result<bool, StoreError> {
        let deleted = with_writer!(self, own(name), |pool| {
            sqlx::query("DELETE FROM campaigns WHERE name = $1")
                .bind(&name)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(deleted > 0)
    }

    /// Pauses a campaign, saying why; a campaign already paused keeps its first reason.
    /// Answers whether the campaign exists.
    pub async fn pause_campaign(
        &self,
        name: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE campaigns SET paused = 1, \
                pause_reason = CASE WHEN paused = 1 THEN pause_reason ELSE $2 END, \
                updated_at = $3 WHERE name = $1";
        let now = now.timestamp_millis();
        let updated = with_writer!(self, own(name, reason), |pool| {
            sqlx::query(SQL)
                .bind(&name)
                .bind(&reason)
                .bind(now)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(updated > 0)
    }

    /// Resumes a paused campaign. Answers whether the campaign exists.
    pub async fn resume_campaign(
        &self,
        name: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE campaigns SET paused = 0, pause_reason = NULL, updated_at = $2 \
            WHERE name = $1";
        let now = now.timestamp_millis();
        let updated = with_writer!(self, own(name), |pool| {
            sqlx::query(SQL)
                .bind(&name)
                .bind(now)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(updated > 0)
    }

    /// Persists when a campaign runs next (`None`: nothing scheduled). Answers whether the
    /// campaign exists.
    pub async fn set_next_run_at(
        &self,
        name: &str,
        next_run_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE campaigns SET next_run_at = $2, updated_at = $3 \
            WHERE name = $1";
        let (next, now) = (
            next_run_at.map(|t| t.timestamp_millis()),
            now.timestamp_millis(),
        );
        let updated = with_writer!(self, own(name), |pool| {
            sqlx::query(SQL)
                .bind(&name)
                .bind(next)
                .bind(now)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(updated > 0)
    }

    /// Pauses every campaign on `channel` (an account-level error stopped the number),
    /// saying why. Answers how many were newly paused.
    pub async fn pause_channel_campaigns(
        &self,
        channel: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        const SQL: &str = "UPDATE campaigns SET paused = 1, pause_reason = $2, updated_at = $3 \
            WHERE channel = $1 AND paused = 0";
        let now = now.timestamp_millis();
        Ok(with_writer!(self, own(channel, reason), |pool| {
            sqlx::query(SQL)
                .bind(&channel)
                .bind(&reason)
                .bind(now)
                .execute(pool)
                .await?
                .rows_affected()
        }))
    }

    /// Campaigns not paused whose `next_run_at` is at or before `now`, the earliest first.
    pub async fn due_campaigns(&self, now: DateTime<Utc>) -> Result<Vec<CampaignRow>, StoreError> {
        let sql = due_sql();
        let raw: Vec<CampaignRaw> = with_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(now.timestamp_millis())
            .fetch_all(pool)
            .await?);
        raw.into_iter().map(campaign_row).collect()
    }
}

// Runs.
impl Db {
    /// Claims the run of `campaign` scheduled for `scheduled_for` (status `planned`): the
    /// first claim creates it, every later one gets the same id with `created: false`.
    pub async fn claim_run(
        &self,
        campaign: &str,
        scheduled_for: DateTime<Utc>,
        trigger: RunTrigger,
        now: DateTime<Utc>,
    ) -> Result<Claim, StoreError> {
        self.insert_run(
            campaign,
            scheduled_for,
            trigger,
            RunStatus::Planned,
            None,
            now,
        )
        .await
    }

    /// Records that the run scheduled for `scheduled_for` never started, and why. A run
    /// already claimed for that time is left as it is (`created: false`).
    pub async fn record_missed_run(
        &self,
        campaign: &str,
        scheduled_for: DateTime<Utc>,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Claim, StoreError> {
        let trigger = RunTrigger::Schedule;
        self.insert_run(
            campaign,
            scheduled_for,
            trigger,
            RunStatus::Missed,
            Some(reason),
            now,
        )
        .await
    }

    /// Inserts a run unless one exists for `(campaign, scheduled_for)`; either way answers
    /// its id. A run created final (missed) is finished at once.
    async fn insert_run(
        &self,
        campaign: &str,
        scheduled_for: DateTime<Utc>,
        trigger: RunTrigger,
        status: RunStatus,
        reason: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Claim, StoreError> {
        const INSERT: &str = "INSERT INTO campaign_runs (campaign, scheduled_for, trigger, \
                status, reason, created_at, finished_at, updated_at) \
            VALUES ($1, $2, $3, $4, $5, $6, $7, $6) \
            ON CONFLICT (campaign, scheduled_for) DO NOTHING RETURNING id";
        const EXISTING: &str =
            "SELECT id FROM campaign_runs WHERE campaign = $1 AND scheduled_for = $2";
        let scheduled = scheduled_for.timestamp_millis();
        let (trigger, status_text) = (trigger.as_str(), status.as_str());
        let reason = reason.map(str::to_string);
        let now = now.timestamp_millis();
        let finished = status.is_final().then_some(now);
        let (run_id, created) = with_writer!(self, own(campaign), |pool| {
            let inserted: Option<i64> = sqlx::query_scalar(INSERT)
                .bind(&campaign)
                .bind(scheduled)
                .bind(trigger)
                .bind(status_text)
                .bind(&reason)
                .bind(now)
                .bind(finished)
                .fetch_optional(&mut *pool)
                .await?;
            match inserted {
                Some(id) => (id, true),
                None => {
                    let id: i64 = sqlx::query_scalar(EXISTING)
                        .bind(&campaign)
                        .bind(scheduled)
                        .fetch_one(&mut *pool)
                        .await?;
                    (id, false)
                }
            }
        });
        Ok(Claim { run_id, created })
    }

    /// Moves a run to `status` with its reason (`None` clears it); `running` sets when it
    /// started (once), a final status when it finished. A final run never changes again:
    /// answers whether the run was changed.
    pub async fn set_run_status(
        &self,
        run_id: i64,
        status: RunStatus,
        reason: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let reason = reason.map(str::to_string);
        let changed = with_writer!(self, |pool| {
            update_run_status!(&mut *pool, run_id, status, reason.as_deref(), now)
        });
        Ok(changed)
    }

    /// Cancels a run, and with it every recipient it has not decided yet (`cancelled`, with
    /// the same reason), in one transaction. Answers whether the run was changed (a final
    /// run is not).
    pub async fn cancel_run(
        &self,
        run_id: i64,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let (status, decision) = (RunStatus::Cancelled, RecipientDecision::Cancelled);
        self.close_run(run_id, status, decision, reason, now).await
    }

    /// Ends a run whose ttl ran out: its recipients still pending are skipped with
    /// `reason`, and the run is `done` with it, in one transaction. Answers whether the run
    /// was still open.
    pub async fn end_run_at_ttl(
        &self,
        run_id: i64,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let (status, decision) = (RunStatus::Done, RecipientDecision::Skipped);
        self.close_run(run_id, status, decision, reason, now).await
    }

    /// Gives an open run its final `status` and its pending recipients `decision`, both
    /// with `reason`, in one transaction; answers whether the run was still open.
    async fn close_run(
        &self,
        run_id: i64,
        status: RunStatus,
        decision: RecipientDecision,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        const RECIPIENTS: &str = "UPDATE campaign_recipients SET decision = $4, \
                reason = $2, decided_at = $3 \
            WHERE run_id = $1 AND decision IN ('planned', 'deferred')";
        let decision = decision.as_str();
        let changed = with_writer!(self, own(reason), |pool| {
            let mut tx = sqlx::Connection::begin(&mut *pool).await?;
            let changed = update_run_status!(&mut *tx, run_id, status, Some(&reason), now);
            if changed {
                sqlx::query(RECIPIENTS)
                    .bind(run_id)
                    .bind(&reason)
                    .bind(now.timestamp_millis())
                    .bind(decision)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            changed
        });
        Ok(changed)
    }

    /// Stores a run's report (JSON the campaign's runner writes, e.g. its cost estimate).
    /// Answers whether the run exists.
    pub async fn set_run_report(
        &self,
        run_id: i64,
        report: &serde_json::Value,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE campaign_runs SET report = $2, updated_at = $3 WHERE id = $1";
        let report = serde_json::to_string(report)?;
        let now = now.timestamp_millis();
        let updated = with_writer!(self, |pool| {
            sqlx::query(SQL)
                .bind(run_id)
                .bind(&report)
                .bind(now)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(updated > 0)
    }

    /// The run with this id.
    pub async fn run(&self, run_id: i64) -> Result<Option<RunRow>, StoreError> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM campaign_runs WHERE id = $1");
        let raw: Option<RunRaw> = with_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(run_id)
            .fetch_optional(pool)
            .await?);
        raw.map(run_row).transpose()
    }

    /// A campaign's runs, the latest scheduled first, at most `limit`.
    pub async fn campaign_runs(
        &self,
        campaign: &str,
        limit: i64,
    ) -> Result<Vec<RunRow>, StoreError> {
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM campaign_runs WHERE campaign = $1 \
            ORDER BY scheduled_for DESC LIMIT $2"
        );
        let raw: Vec<RunRaw> = with_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(campaign)
            .bind(limit.max(0))
            .fetch_all(pool)
            .await?);
        raw.into_iter().map(run_row).collect()
    }

    /// Runs not over yet (planned, running, paused), oldest first: what a restart resumes.
    pub async fn active_runs(&self) -> Result<Vec<RunRow>, StoreError> {
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM campaign_runs \
            WHERE status IN ('planned', 'running', 'paused') ORDER BY id"
        );
        let raw: Vec<RunRaw> =
            with_pool!(self, |pool| sqlx::query_as(&sql).fetch_all(pool).await?);
        raw.into_iter().map(run_row).collect()
    }
}

/// [`Db::due_campaigns`]'s query: served by `campaigns_due`, which holds only the
/// campaigns with a run to come.
fn due_sql() -> String {
    format!(
        "SELECT {CAMPAIGN_COLUMNS} FROM campaigns \
        WHERE paused = 0 AND next_run_at IS NOT NULL AND next_run_at <= $1 \
        ORDER BY next_run_at, name"
    )
}

/// [`Db::pending_recipients`]'s query: served by `campaign_recipients_pending`, which holds
/// only undecided rows, so a run's last batch costs what its first did.
fn pending_sql() -> String {
    format!(
        "SELECT {LEDGER_COLUMNS} FROM campaign_recipients \
        WHERE run_id = $1 AND decision IN ('planned', 'deferred') AND not_before <= $2 \
        ORDER BY not_before, contact_id LIMIT $3"
    )
}

// The ledger.
impl Db {
    /// Snapshots a run's audience: one `planned` row per contact, due at `not_before`, given
    /// `variant` (a split campaign's; `None` without a split). Insert-or-ignore, so taking
    /// it again (after a crash mid-snapshot) adds only the rows still missing; contacts no
    /// longer in the database are left out. Written in transactions of 20,000 rows, 1,000
    /// per statement. Answers how many rows were added.
    pub async fn snapshot_audience(
        &self,
        run_id: i64,
        variant: Option<&str>,
        contact_ids: &[i64],
        not_before: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let (not_before, now) = (not_before.timestamp_millis(), now.timestamp_millis());
        let mut added = 0;
        for ids in contact_ids.chunks(SNAPSHOT_ROWS_PER_STATEMENT * SNAPSHOT_STATEMENTS_PER_JOB) {
            let variant = variant.map(str::to_string);
            added += with_writer!(self, own(ids), |pool| {
                let mut tx = sqlx::Connection::begin(&mut *pool).await?;
                let mut added = 0;
                for chunk in ids.chunks(SNAPSHOT_ROWS_PER_STATEMENT) {
                    let sql = format!(
                        "INSERT INTO campaign_recipients (run_id, contact_id, decision, \
                            not_before, created_at, variant) \
                        SELECT $1, id, 'planned', $2, $3, $4 FROM contacts WHERE id IN ({}) \
                        ON CONFLICT (run_id, contact_id) DO NOTHING",
                        placeholders(5, chunk.len())
                    );
                    let mut query = sqlx::query(&sql)
                        .bind(run_id)
                        .bind(not_before)
                        .bind(now)
                        .bind(&variant);
                    for id in chunk {
                        query = query.bind(*id);
                    }
                    added += query.execute(&mut *tx).await?.rows_affected();
                }
                tx.commit().await?;
                added
            });
        }
        Ok(added)
    }

    /// A run's recipients still to decide whose time has come (`not_before <= now`), due
    /// first (then by contact), at most `limit`.
    pub async fn pending_recipients(
        &self,
        run_id: i64,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<LedgerRow>, StoreError> {
        let sql = pending_sql();
        let raw: Vec<LedgerRaw> = with_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(run_id)
            .bind(now.timestamp_millis())
            .bind(limit.max(0))
            .fetch_all(pool)
            .await?);
        raw.into_iter().map(ledger_row).collect()
    }

    /// When the run's earliest undecided recipient falls due; `None` when every recipient is
    /// decided (the run has nothing left to send).
    pub async fn next_pending_at(&self, run_id: i64) -> Result<Option<DateTime<Utc>>, StoreError> {
        const SQL: &str = "SELECT MIN(not_before) FROM campaign_recipients \
            WHERE run_id = $1 AND decision IN ('planned', 'deferred')";
        let at: Option<i64> = with_pool!(self, |pool| sqlx::query_scalar(SQL)
            .bind(run_id)
            .fetch_one(pool)
            .await?);
        millis_opt(at, "campaign_recipients.not_before")
    }

    /// One recipient's ledger row.
    pub async fn ledger_row(
        &self,
        run_id: i64,
        contact_id: i64,
    ) -> Result<Option<LedgerRow>, StoreError> {
        let sql = format!(
            "SELECT {LEDGER_COLUMNS} FROM campaign_recipients WHERE run_id = $1 AND contact_id = $2"
        );
        let raw: Option<LedgerRaw> = with_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(run_id)
            .bind(contact_id)
            .fetch_optional(pool)
            .await?);
        raw.map(ledger_row).transpose()
    }

    /// Records what was decided for a recipient still pending (a `deferred` one stays
    /// pending until its `not_before`). A recipient already decided is left as it is, so
    /// recording twice never sends twice: answers whether the row changed.
    pub async fn record_recipient(
        &self,
        run_id: i64,
        contact_id: i64,
        outcome: &RecipientOutcome<'_>,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE campaign_recipients SET decision = $3, reason = $4, \
                message_id = $5, not_before = COALESCE($6, not_before), decided_at = $7, \
                variant = COALESCE($8, variant) \
            WHERE run_id = $1 AND contact_id = $2 AND decision IN ('planned', 'deferred')";
        let decision = outcome.decision.as_str();
        let variant = outcome.variant.map(str::to_string);
        let reason = outcome.reason.map(str::to_string);
        let message_id = outcome.message_id;
        let not_before = outcome.not_before.map(|t| t.timestamp_millis());
        let now = now.timestamp_millis();
        let updated = with_writer!(self, |pool| {
            sqlx::query(SQL)
                .bind(run_id)
                .bind(contact_id)
                .bind(decision)
                .bind(&reason)
                .bind(message_id)
                .bind(not_before)
                .bind(now)
                .bind(&variant)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(updated > 0)
    }

    /// A run's recipients counted by variant, decision and reason, and for those sent by
    /// their message's status and error code: what a report adds up.
    pub async fn run_counts(&self, run_id: i64) -> Result<Vec<RecipientCount>, StoreError> {
        const SQL: &str = "SELECT r.variant, r.decision, r.reason, m.status, m.error_code, \
                COUNT(*) \
            FROM campaign_recipients r LEFT JOIN messages m ON m.id = r.message_id \
            WHERE r.run_id = $1 \
            GROUP BY r.variant, r.decision, r.reason, m.status, m.error_code \
            ORDER BY r.variant, r.decision, r.reason, m.status, m.error_code";
        type Raw = (
            Option<String>,
            String,
            Option<String>,
            Option<String>,
            Option<i64>,
            i64,
        );
        let raw: Vec<Raw> = with_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(run_id)
            .fetch_all(pool)
            .await?);
        raw.into_iter()
            .map(
                |(variant, decision, reason, message_status, error_code, count)| {
                    Ok(RecipientCount {
                        variant,
                        decision: RecipientDecision::parse(
                            &decision,
                            "campaign_recipients.decision",
                        )?,
                        reason,
                        message_status,
                        error_code,
                        count,
                    })
                },
            )
            .collect()
    }
}

/// The idempotency key of run `run_id`'s message to contact `contact_id`: unique in
/// `messages`, so a second message for the same recipient of a run cannot be written.
pub fn campaign_message_key(run_id: i64, contact_id: i64) -> String {
    format!("fg-c{run_id}-{contact_id}")
}

/// A campaign's message to one recipient, and the ledger's reason for sending it.
#[derive(Debug, Clone)]
pub struct CampaignSend<'a> {
    pub run_id: i64,
    pub contact_id: i64,
    /// The split campaign's variant the message is; `None` without a split.
    pub variant: Option<&'a str>,
    pub channel: &'a str,
    /// As the policy decided it (`Policy::apply`).
    pub message: &'a Outbound,
    pub decision: &'a Decision,
    /// `pending`, or `sent` on the sandbox.
    pub status: &'a str,
    /// The contact's policy state after the send (a send may open the free entry point).
    pub policy: &'a PolicyState,
}

/// What [`Db::send_campaign_message`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CampaignSent {
    pub message_id: i64,
    /// `false`: the recipient's message already existed (its key), and none was written.
    pub created: bool,
}

/// The channel's business-initiated sends in a rolling period: how many contacts got a
/// template, and when the first of them leaves the period (its last template's time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TemplateRecipients {
    pub contacts: u64,
    pub oldest_last_send: Option<DateTime<Utc>>,
}

/// Outbound messages that went or are going to WhatsApp (not queued, skipped or failed).
const SENDING: &str = "decision IN ('send', 'rewritten') AND status <> 'failed'";

/// [`Db::campaign_backlog`]'s question, over the outbox's index of unsent rows.
const BACKLOG_SQL: &str = "SELECT COUNT(*) FROM messages WHERE channel = $1 \
    AND direction = 'out' AND status IN ('pending', 'sending') AND priority = 1";

/// [`Db::template_recipients`]'s question: one index range of the channel's templates.
fn template_recipients_sql() -> String {
    format!(
        "SELECT COUNT(*), MIN(last) FROM (SELECT MAX(created_at) AS last FROM messages \
            WHERE channel = $1 AND direction = 'out' AND kind = 'template' \
                AND created_at > $2 AND {SENDING} \
            GROUP BY contact_id) AS t"
    )
}

// Dispatching.
impl Db {
    /// Writes a campaign's message to one recipient and marks its ledger row `sent` with it,
    /// in one transaction, with the contact's policy state: a crash leaves both or neither.
    /// The message's idempotency key ([`campaign_message_key`]) is unique, so when the
    /// recipient's message already exists nothing new is written (the ledger row is pointed
    /// at the existing one) and `created` is false.
    pub async fn send_campaign_message(
        &self,
        send: &CampaignSend<'_>,
        now: DateTime<Utc>,
    ) -> Result<CampaignSent, StoreError> {
        const EXISTING: &str = "SELECT id FROM messages WHERE idempotency_key = $1";
        const INSERT: &str = "INSERT INTO messages (contact_id, channel, direction, kind, body, \
                decision, reason, status, created_at, updated_at, idempotency_key, priority) \
            VALUES ($1, $2, 'out', $3, $4, $5, $6, $7, $8, $8, $9, 1) RETURNING id";
        const POLICY: &str = "UPDATE contacts SET policy = $2 WHERE id = $1";
        const LEDGER: &str = "UPDATE campaign_recipients SET decision = 'sent', reason = $3, \
                message_id = $4, decided_at = $5, variant = $6 \
            WHERE run_id = $1 AND contact_id = $2 AND decision IN ('planned', 'deferred')";
        let (run_id, contact_id) = (send.run_id, send.contact_id);
        let key = Value::Text(campaign_message_key(run_id, contact_id));
        let reason = Value::Text(send.decision.reason().to_string());
        let now = Value::Integer(now.timestamp_millis());
        let insert = vec![
            Value::Integer(contact_id),
            Value::Text(send.channel.to_string()),
            Value::Text(outbound_kind(&send.message.content).to_string()),
            Value::Text(serde_json::to_string(send.message)?),
            Value::Text(send.decision.name().to_string()),
            reason.clone(),
            Value::Text(send.status.to_string()),
            now.clone(),
            key.clone(),
        ];
        let policy = Value::Text(serde_json::to_string(send.policy)?);
        let variant = send
            .variant
            .map_or(Value::Null, |v| Value::Text(v.to_string()));
        let sqlite = match &self.backend {
            Backend::Sqlite(sqlite) => sqlite,
            Backend::Postgres(postgres) => {
                let last = [policy, Value::Integer(run_id), variant];
                return send_campaign_postgres(&postgres.pool, insert, last).await;
            }
        };
        // A raw job (see `store::writer`): one per recipient, on the writer's own handle;
        // through sqlx its four statements cost four round trips to sqlx's worker thread.
        sqlite
            .writer
            .run_raw(move |db| {
                let run = |sql: &str, args: &[Value]| -> Result<Option<i64>, StoreError> {
                    let mut statement = db.prepare_cached(sql)?;
                    bind_numbered(&mut statement, args)?;
                    let mut rows = statement.raw_query();
                    Ok(match rows.next()? {
                        Some(row) => Some(row.get(0)?),
                        None => None,
                    })
                };
                let (message_id, created) = match run(EXISTING, std::slice::from_ref(&key))? {
                    Some(id) => (id, false),
                    None => {
                        let id = run(INSERT, &insert)?.ok_or_else(|| {
                            StoreError::Corrupt("INSERT … RETURNING id returned no row".into())
                        })?;
                        run(POLICY, &[Value::Integer(contact_id), policy.clone()])?;
                        (id, true)
                    }
                };
                let ledger = [
                    Value::Integer(run_id),
                    Value::Integer(contact_id),
                    reason.clone(),
                    Value::Integer(message_id),
                    now.clone(),
                    variant.clone(),
                ];
                run(LEDGER, &ledger)?;
                Ok(CampaignSent {
                    message_id,
                    created,
                })
            })
            .await
    }

    /// Whole contacts by id (tags, attributes, zone, window, policy), as a run's recipients
    /// are decided with.
    pub async fn campaign_contacts(&self, ids: &[i64]) -> Result<Vec<(i64, Contact)>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let sql = format!(
                "SELECT id, wa_id, name, tags, attrs, timezone, last_customer_message_at, \
                    policy FROM contacts WHERE id IN ({})",
                placeholders(1, chunk.len())
            );
            let raw: Vec<AudienceRaw> = with_pool!(self, |pool| {
                let mut q = sqlx::query_as(&sql);
                for id in chunk {
                    q = q.bind(*id);
                }
                q.fetch_all(pool).await?
            });
            for row in raw {
                out.push(audience_contact(row)?);
            }
        }
        Ok(out)
    }

    /// How many messages of `category` the contact was sent after `since`, for a frequency
    /// cap: campaign messages of that category (in either form), and templates named in
    /// `templates` (the registry's templates of that category) whatever sent them.
    pub async fn category_sends(
        &self,
        contact_id: i64,
        category: &str,
        templates: &[String],
        since: DateTime<Utc>,
    ) -> Result<u32, StoreError> {
        let by_name = if templates.is_empty() {
            String::new()
        } else {
            format!(
                " OR (kind = 'template' AND {} IN ({}))",
                self.json_text("body", &["content", "name"]),
                placeholders(4, templates.len())
            )
        };
        let sql = format!(
            "SELECT COUNT(*) FROM messages WHERE contact_id = $1 AND direction = 'out' \
                AND created_at > $2 AND {SENDING} \
                AND ({} = $3{by_name})",
            self.json_text("body", &["origin", "category"])
        );
        let count: i64 = with_pool!(self, |pool| {
            let mut q = sqlx::query_scalar(&sql)
                .bind(contact_id)
                .bind(since.timestamp_millis())
                .bind(category);
            for name in templates {
                q = q.bind(name);
            }
            q.fetch_one(pool).await?
        });
        Ok(u32::try_from(count).unwrap_or(u32::MAX))
    }

    /// The contacts of `channel` sent a template after `since` (the messaging limit's
    /// business-initiated recipients).
    pub async fn template_recipients(
        &self,
        channel: &str,
        since: DateTime<Utc>,
    ) -> Result<TemplateRecipients, StoreError> {
        let sql = template_recipients_sql();
        let (contacts, oldest): (i64, Option<i64>) = with_pool!(self, |pool| {
            sqlx::query_as(&sql)
                .bind(channel)
                .bind(since.timestamp_millis())
                .fetch_one(pool)
                .await?
        });
        Ok(TemplateRecipients {
            contacts: u64::try_from(contacts).unwrap_or(0),
            oldest_last_send: millis_opt(oldest, "messages.created_at")?,
        })
    }

    /// Whether the contact was sent a template after `since` (so another one takes no new
    /// room in the messaging limit).
    pub async fn got_template_since(
        &self,
        contact_id: i64,
        since: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM messages WHERE contact_id = $1 AND direction = 'out' \
                AND kind = 'template' AND created_at > $2 AND {SENDING})"
        );
        let found: bool = with_pool!(self, |pool| sqlx::query_scalar(&sql)
            .bind(contact_id)
            .bind(since.timestamp_millis())
            .fetch_one(pool)
            .await?);
        Ok(found)
    }

    /// The contact's latest outbound message when a campaign sent it and it went (or is
    /// going) to WhatsApp: its origin and when it was written. A reply to it may enter the
    /// campaign's `on_reply` flow.
    pub async fn last_campaign_message(
        &self,
        contact_id: i64,
    ) -> Result<Option<(Origin, DateTime<Utc>)>, StoreError> {
        let sql = format!(
            "SELECT body, created_at, CAST(CASE WHEN {SENDING} THEN 1 ELSE 0 END AS BIGINT) \
            FROM messages \
            WHERE contact_id = $1 AND direction = 'out' ORDER BY id DESC LIMIT 1"
        );
        let raw: Option<(String, i64, i64)> = with_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(contact_id)
            .fetch_optional(pool)
            .await?);
        let Some((body, created, 1)) = raw else {
            return Ok(None);
        };
        let message: Outbound = serde_json::from_str(&body)?;
        if !matches!(message.origin, Origin::Campaign { .. }) {
            return Ok(None);
        }
        Ok(Some((
            message.origin,
            from_millis(created, "messages.created_at")?,
        )))
    }

    /// Campaign messages of `channel` the outbox has not sent yet: how far the campaigns on
    /// it are ahead of the sender.
    pub async fn campaign_backlog(&self, channel: &str) -> Result<u64, StoreError> {
        let count: i64 = with_pool!(self, |pool| sqlx::query_scalar(BACKLOG_SQL)
            .bind(channel)
            .fetch_one(pool)
            .await?);
        Ok(u64::try_from(count).unwrap_or(0))
    }
}

/// [`Db::send_campaign_message`] on PostgreSQL: one statement (one round trip, one
/// transaction). `insert` holds the message's columns as SQLite's statement binds them
/// (`$1` contact … `$9` key); `last` the policy (`$10`), the run (`$11`) and the variant
/// (`$12`). When another instance wrote the recipient's message at the same moment, the
/// insert finds its key taken and the statement returns nothing: it runs again, and finds
/// that message.
async fn send_campaign_postgres(
    pool: &sqlx::PgPool,
    insert: Vec<Value>,
    last: [Value; 3],
) -> Result<CampaignSent, StoreError> {
    const SQL: &str = "WITH existing AS (SELECT id FROM messages WHERE idempotency_key = $9), \
        inserted AS (INSERT INTO messages (contact_id, channel, direction, kind, body, \
                decision, reason, status, created_at, updated_at, idempotency_key, priority) \
            SELECT $1, $2, 'out', $3, $4, $5, $6, $7, $8, $8, $9, 1 \
            WHERE NOT EXISTS (SELECT 1 FROM existing) \
            ON CONFLICT DO NOTHING RETURNING id), \
        policy AS (UPDATE contacts SET policy = $10 \
            WHERE id = $1 AND EXISTS (SELECT 1 FROM inserted)), \
        message AS (SELECT id, TRUE AS created FROM inserted \
            UNION ALL SELECT id, FALSE FROM existing), \
        ledger AS (UPDATE campaign_recipients SET decision = 'sent', reason = $6, \
                message_id = (SELECT id FROM message), decided_at = $8, variant = $12 \
            WHERE run_id = $11 AND contact_id = $1 AND decision IN ('planned', 'deferred') \
                AND EXISTS (SELECT 1 FROM message)) \
        SELECT id, created FROM message";
    for _ in 0..2 {
        let mut query = sqlx::query_as::<_, (i64, bool)>(SQL);
        for value in insert.iter().chain(&last) {
            query = match value {
                Value::Integer(n) => query.bind(*n),
                Value::Text(text) => query.bind(text.as_str()),
                Value::Null => query.bind(None::<&str>),
                other => {
                    return Err(StoreError::Corrupt(format!(
                        "a campaign send has an unexpected value {other:?}"
                    )));
                }
            };
        }
        let row = query.fetch_optional(pool).await?;
        if let Some((message_id, created)) = row {
            return Ok(CampaignSent {
                message_id,
                created,
            });
        }
    }
    Err(StoreError::GroupFailed(
        "the campaign message's key was taken but its message is not visible".into(),
    ))
}

/// [`Db::audience_page`]'s row: a contact as a `where` condition sees it.
pub(super) type AudienceRaw = (
    i64,
    String,
    Option<String>,
    String,
    String,
    Option<String>,
    Option<i64>,
    String,
);

// Audiences.
impl Db {
    /// One page of a campaign's audience before its `where`: the contacts of `channel` with
    /// every one of `tags` (none: all of them) created at or before `created_by`, with ids
    /// above `after_id`, in id order, at most `limit`, each as a whole [`Contact`] (its
    /// tags, attributes, zone and window) for the condition to read. Paging by id and
    /// bounding by creation time make the selection the same however often it is taken
    /// again (after a crash mid-snapshot), and leave out contacts added after the run began.
    pub async fn audience_page(
        &self,
        channel: &str,
        tags: &[String],
        created_by: DateTime<Utc>,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<(i64, Contact)>, StoreError> {
        let mut tags: Vec<&str> = tags.iter().map(String::as_str).collect();
        tags.sort_unstable();
        tags.dedup();
        let sql = audience_sql(tags.len(), self.is_postgres());
        let raw: Vec<AudienceRaw> = with_pool!(self, |pool| {
            let mut q = sqlx::query_as(&sql)
                .bind(channel)
                .bind(after_id)
                .bind(created_by.timestamp_millis())
                .bind(limit.max(0));
            for tag in &tags {
                q = q.bind(*tag);
            }
            q.fetch_all(pool).await?
        });
        raw.into_iter().map(audience_contact).collect()
    }
}

/// [`Db::audience_page`]'s query for `tag_count` tags (bound from `$5`).
///
/// `+channel` walks the table in id order from the page's `after_id`: with the (channel,
/// wa_id) index SQLite read every contact of the channel and sorted them for every page, and
/// a million-contact audience took minutes instead of seconds.
fn audience_sql(tag_count: usize, postgres: bool) -> String {
    let tags = json_elements("contacts.tags", postgres);
    let tag_clause = if tag_count == 0 {
        String::new()
    } else {
        format!(
            " AND (SELECT COUNT(DISTINCT t.value) FROM {tags} \
                WHERE t.value IN ({})) = {tag_count}",
            placeholders(5, tag_count),
        )
    };
    let channel = no_index("channel", postgres);
    format!(
        "SELECT id, wa_id, name, tags, attrs, timezone, last_customer_message_at, policy \
        FROM contacts WHERE {channel} = $1 AND id > $2 AND created_at <= $3{tag_clause} \
        ORDER BY id LIMIT $4"
    )
}

pub(super) fn audience_contact(raw: AudienceRaw) -> Result<(i64, Contact), StoreError> {
    let (id, wa_id, name, tags, attrs, timezone, last, policy) = raw;
    let mut contact = Contact::new(wa_id);
    contact.name = name;
    contact.tags = serde_json::from_str(&tags)?;
    contact.attrs = serde_json::from_str(&attrs)?;
    contact.timezone = timezone;
    contact.last_customer_message_at = millis_opt(last, "contacts.last_customer_message_at")?;
    contact.policy = serde_json::from_str(&policy)?;
    Ok((id, contact))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::memory_db;
    use crate::store::outbox::tests::plan;

    /// The dispatcher's batches and questions and the scheduler's question read their
    /// indexes, not the whole ledger, the whole message log or every campaign; an audience
    /// page walks contacts in id order from where the last page ended, never sorting the
    /// channel's contacts.
    #[tokio::test]
    async fn batches_and_due_campaigns_read_their_indexes() {
        let db = memory_db().await;
        let pending = plan(&db, &pending_sql()).await;
        assert!(
            pending.contains("campaign_recipients_pending (run_id=? AND not_before<?)"),
            "{pending}"
        );
        assert!(!pending.contains("TEMP B-TREE"), "{pending}");
        let audience = plan(&db, &audience_sql(2, false)).await;
        assert!(
            audience.contains("SEARCH contacts USING INTEGER PRIMARY KEY (rowid>?)"),
            "{audience}"
        );
        assert!(!audience.contains("TEMP B-TREE FOR ORDER BY"), "{audience}");
        let recipients = plan(&db, &template_recipients_sql()).await;
        assert!(
            recipients.contains("messages_templates_sent (channel=? AND created_at>?)"),
            "{recipients}"
        );
        let backlog = plan(&db, BACKLOG_SQL).await;
        assert!(
            backlog.contains("messages_outbox_priority (channel=? AND priority=?)"),
            "{backlog}"
        );
        let due = plan(&db, &due_sql()).await;
        assert!(due.contains("USING INDEX campaigns_due"), "{due}");
        assert!(!due.contains("TEMP B-TREE"), "{due}");
    }
}
