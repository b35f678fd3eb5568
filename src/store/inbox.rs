//! The inbox: webhook updates stored before the webhook is acknowledged, then processed
//! asynchronously by [`crate::inbound`]; and the status updates that land on outbound
//! messages.
//!
//! A webhook's updates are written in one transaction ([`Db::insert_updates`]); a second copy
//! of an update (Meta delivers at least once, for up to 7 days) hits `UNIQUE (channel,
//! dedupe_key)` and is counted as a duplicate. The worker takes due rows with
//! [`Db::claim_inbox`], marks them done with [`Db::finish_inbox`], or postpones them with
//! [`Db::retry_inbox`].
//!
//! Per-contact order: updates of the [`ORDERED_KINDS`] with the same `contact_key` are
//! processed one at a time in id order, so a claim never returns one while an earlier one of
//! the same contact waits for a retry. Statuses, errors and the rest carry no such order.

use chrono::{DateTime, Utc};
use rusqlite::types::Value;

use super::db::{Backend, Db};
use super::db::{with_pool, with_writer};
use super::error::StoreError;
use super::leases::inbox_lease_key;
use super::sql::{bind_numbered, from_millis, placeholders};
use super::writer::Writer;

/// Kinds that belong to a contact's conversation and are processed in order per contact.
pub const ORDERED_KINDS: [&str; 3] = ["message", "system", "user_preference"];

/// How long processed rows are kept: longer than Meta's 7 days of redelivery, so a late
/// copy of an update is still recognised.
pub const INBOX_RETENTION: chrono::Duration = chrono::Duration::days(14);

/// One update to store.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NewInboxRow {
    /// The channel the update is for (the webhook's channel, or the one its
    /// `phone_number_id` names).
    pub channel: String,
    /// What recognises a second copy: the wamid of a message, `wamid:status` of a status, a
    /// content hash otherwise.
    pub dedupe_key: String,
    /// `message`, `system`, `status`, `error`, `template_status`, `user_preference`,
    /// `unknown` or `malformed`.
    pub kind: String,
    /// The contact (wa_id, else BSUID), if the update is about one.
    pub contact_key: Option<String>,
    /// The parsed update with its raw JSON, as JSON text (stored as it is: no
    /// `serde_json::Value` in between).
    pub payload: String,
    /// A delivery status the webhook's own write applies at once ([`Db::insert_updates`]);
    /// `None` for every other update (and for `failed` statuses, which the policy handles).
    pub delivery: Option<DeliveryStatus>,
}

/// A `sent`, `delivered` or `read` (`played`) status: it only moves its message forward
/// and asks nothing of the flows or the policy, so it is applied in the transaction that
/// stores its webhook and its row is stored processed. One the store cannot place yet
/// (its send is not recorded) is stored unprocessed for the worker to retry, as before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryStatus {
    pub wamid: String,
    pub status: String,
    /// The status's `biz_opaque_callback_data` ([`StatusChange::idempotency_key`]).
    pub idempotency_key: Option<String>,
}

impl DeliveryStatus {
    fn change(&self) -> StatusChange<'_> {
        StatusChange {
            wamid: &self.wamid,
            status: &self.status,
            error_code: None,
            error: None,
            idempotency_key: self.idempotency_key.as_deref(),
        }
    }
}

/// A stored update, as the worker claims it.
#[derive(Debug, Clone, PartialEq)]
pub struct InboxRow {
    pub id: i64,
    pub channel: String,
    pub dedupe_key: String,
    pub kind: String,
    pub contact_key: Option<String>,
    pub payload: String,
    pub received_at: DateTime<Utc>,
    /// Failed or postponed attempts so far.
    pub attempts: i64,
    pub last_error: Option<String>,
}

/// What [`Db::insert_updates`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stored {
    /// New rows.
    pub stored: u64,
    /// Updates already stored (by an earlier delivery, or twice in this one).
    pub duplicates: u64,
    /// New rows left for the worker (the rest were delivery statuses applied at once).
    pub pending: u64,
    /// Delivery statuses that moved their message, by [`MOVED_STATUSES`].
    pub moved: [u64; 3],
}

/// The statuses [`Stored::moved`] counts, in its order.
pub const MOVED_STATUSES: [&str; 3] = ["sent", "delivered", "read"];

/// A status webhook for an outbound message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange<'a> {
    /// The wamid from the send response.
    pub wamid: &'a str,
    /// `sent`, `delivered`, `read` or `failed` (a `played` voice message counts as `read`).
    pub status: &'a str,
    /// The first error of a `failed` status.
    pub error_code: Option<i64>,
    pub error: Option<&'a str>,
    /// The status's `biz_opaque_callback_data`: the message's `idempotency_key`, which finds
    /// the message when its wamid was never recorded (the sender crashed after sending).
    pub idempotency_key: Option<&'a str>,
}

/// What [`Db::apply_status`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusOutcome {
    /// The message moved forward to the new status.
    Updated { message_id: i64 },
    /// The message is already at or past this status (statuses arrive out of order), or
    /// `failed`, which is final.
    Unchanged { message_id: i64, current: String },
    /// No outbound message has this wamid (or idempotency key) yet: the status may have
    /// overtaken the send's response. Try again later.
    Unknown,
}

/// Rank of a delivery status: a status only ever moves to a higher rank. `failed` is final.
pub fn status_rank(status: &str) -> Option<i64> {
    match status {
        "sent" => Some(1),
        "delivered" => Some(2),
        "read" | "played" => Some(3),
        "failed" => Some(4),
        _ => None,
    }
}

/// The same ranking in SQL, for the current `status` column (anything else, e.g. `pending`
/// or `sending`, ranks 0).
const RANK_SQL: &str = "(CASE status WHEN 'sent' THEN 1 WHEN 'delivered' THEN 2 \
    WHEN 'read' THEN 3 WHEN 'failed' THEN 4 ELSE 0 END)";

type InboxRaw = (
    i64,
    String,
    String,
    String,
    Option<String>,
    String,
    i64,
    i64,
    Option<String>,
);

/// Rows per multi-row `INSERT` (5 parameters each, 5,001 in all: under SQLite's 32,766).
/// A webhook carries up to 1,000 updates, so it is one statement.
const INSERT_CHUNK: usize = 1000;
/// Ids per `IN (…)` list.
const ID_CHUNK: usize = 500;

impl Db {
    /// Stores a webhook's updates in one transaction: all of them or, on error, none. An
    /// update already stored (same channel and dedupe key) is skipped and counted.
    pub async fn insert_updates(
        &self,
        rows: &[NewInboxRow],
        now: DateTime<Utc>,
    ) -> Result<Stored, StoreError> {
        if rows.is_empty() {
            return Ok(Stored::default());
        }
        let count = rows.len() as u64;
        let mut stored = match &self.backend {
            Backend::Sqlite(sqlite) => insert_sqlite(&sqlite.writer, rows, now).await?,
            Backend::Postgres(postgres) => insert_postgres(&postgres.pool, rows, now).await?,
        };
        stored.duplicates = count - stored.stored;
        Ok(stored)
    }

    /// Unprocessed updates due at `now`, in id order, at most `limit`. An update of the
    /// [`ORDERED_KINDS`] is left out while an earlier one of the same contact waits for a
    /// retry, so a contact's messages are never taken out of order.
    pub async fn claim_inbox(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<InboxRow>, StoreError> {
        self.claim_inbox_after(0, now, limit).await
    }

    /// [`Db::claim_inbox`], only rows with an id above `after` (the worker's high-water mark,
    /// so a wake-up reads only what arrived since the last claim).
    pub async fn claim_inbox_after(
        &self,
        after: i64,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<InboxRow>, StoreError> {
        let (now, limit) = (now.timestamp_millis(), limit.max(0));
        let rows: Vec<InboxRaw> = match &self.backend {
            Backend::Sqlite(sqlite) => {
                let sql = if after > 0 { CLAIM_NEW } else { CLAIM_AFTER };
                (sqlite.readers).query(sql, &[&now, &after, &limit], |row| {
                    Ok(InboxRaw::try_from(row)?)
                })?
            }
            Backend::Postgres(postgres) => {
                sqlx::query_as(CLAIM_AFTER)
                    .bind(now)
                    .bind(after)
                    .bind(limit)
                    .fetch_all(&postgres.pool)
                    .await?
            }
        };
        inbox_rows(rows)
    }

    /// [`Db::claim_inbox_after`] for an instance sharing the database: only rows of contacts
    /// whose lease `owner` holds (`contact_leases`, taken by [`Db::take_inbox_leases`]).
    pub async fn claim_owned_inbox(
        &self,
        owner: &str,
        after: i64,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<InboxRow>, StoreError> {
        const SQL: &str = CLAIM_OWNED_AFTER;
        let rows: Vec<InboxRaw> = with_pool!(self, |pool| {
            sqlx::query_as(SQL)
                .bind(now.timestamp_millis())
                .bind(after)
                .bind(limit.max(0))
                .bind(owner)
                .fetch_all(pool)
                .await?
        });
        inbox_rows(rows)
    }

    /// Marks updates processed.
    pub async fn finish_inbox(&self, ids: &[i64], now: DateTime<Utc>) -> Result<(), StoreError> {
        let now = now.timestamp_millis();
        match &self.backend {
            Backend::Sqlite(sqlite) => {
                for chunk in ids.chunks(ID_CHUNK) {
                    let sql = format!(
                        "UPDATE inbox SET processed_at = $1 WHERE id IN ({})",
                        placeholders(2, chunk.len())
                    );
                    let mut args = Vec::with_capacity(1 + chunk.len());
                    args.push(Value::Integer(now));
                    args.extend(chunk.iter().map(|id| Value::Integer(*id)));
                    sqlite.writer.query::<()>(sql, args).await?;
                }
            }
            Backend::Postgres(postgres) => {
                sqlx::query("UPDATE inbox SET processed_at = $1 WHERE id = ANY($2)")
                    .bind(now)
                    .bind(ids)
                    .execute(&postgres.pool)
                    .await?;
            }
        }
        Ok(())
    }

    /// Postpones an update to `not_before`, counting the attempt and keeping the error.
    pub async fn retry_inbox(
        &self,
        id: i64,
        not_before: DateTime<Utc>,
        error: &str,
    ) -> Result<(), StoreError> {
        const SQL: &str = "UPDATE inbox SET attempts = attempts + 1, next_attempt_at = $2, \
            last_error = $3 WHERE id = $1";
        with_writer!(self, own(error), |pool| {
            sqlx::query(SQL)
                .bind(id)
                .bind(not_before.timestamp_millis())
                .bind(error)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Gives up on an update: processed, with the reason it was not (kept for inspection).
    pub async fn abandon_inbox(
        &self,
        id: i64,
        now: DateTime<Utc>,
        error: &str,
    ) -> Result<(), StoreError> {
        const SQL: &str = "UPDATE inbox SET attempts = attempts + 1, processed_at = $2, \
            last_error = $3 WHERE id = $1";
        with_writer!(self, own(error), |pool| {
            sqlx::query(SQL)
                .bind(id)
                .bind(now.timestamp_millis())
                .bind(error)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Updates not yet processed (the inbox depth, for metrics and readiness).
    pub async fn inbox_depth(&self) -> Result<i64, StoreError> {
        const SQL: &str = "SELECT COUNT(*) FROM inbox WHERE processed_at IS NULL";
        Ok(with_pool!(self, |pool| sqlx::query_scalar(SQL)
            .fetch_one(pool)
            .await?))
    }

    /// Deletes processed updates older than `before`, at most `limit`; returns how many.
    /// Keep them at least [`INBOX_RETENTION`], or a late redelivery would run again.
    pub async fn prune_inbox(&self, before: DateTime<Utc>, limit: i64) -> Result<u64, StoreError> {
        const SQL: &str = "DELETE FROM inbox WHERE id IN (SELECT id FROM inbox \
            WHERE processed_at IS NOT NULL AND processed_at < $1 ORDER BY id LIMIT $2)";
        Ok(with_writer!(self, |pool| {
            sqlx::query(SQL)
                .bind(before.timestamp_millis())
                .bind(limit.max(0))
                .execute(pool)
                .await?
                .rows_affected()
        }))
    }

    /// Whether an inbound message with this wamid is already in the message log (its turn
    /// committed), so a redelivered update can be skipped without running the flow again.
    pub async fn inbound_seen(&self, channel: &str, wamid: &str) -> Result<bool, StoreError> {
        const SQL: &str =
            "SELECT COUNT(*) FROM messages WHERE channel = $1 AND direction = 'in' AND wamid = $2";
        let n: i64 = with_pool!(self, |pool| {
            sqlx::query_scalar(SQL)
                .bind(channel)
                .bind(wamid)
                .fetch_one(pool)
                .await?
        });
        Ok(n > 0)
    }

    /// Applies a status webhook to the outbound message with that wamid (else the one whose
    /// `idempotency_key` is the status's callback data, recording the wamid on it).
    ///
    /// Statuses arrive out of order and `delivered` may be skipped, so a message only moves
    /// forward: `sent` < `delivered` < `read`; `failed` is final and keeps its error. A
    /// status that is not a delivery status (`deleted`, …) changes nothing.
    pub async fn apply_status(
        &self,
        channel: &str,
        change: &StatusChange<'_>,
        now: DateTime<Utc>,
    ) -> Result<StatusOutcome, StoreError> {
        let job = StatusJob::new(channel, change, now);
        // One raw job on the writer: the status is one hand-off to the writer thread, and
        // none to sqlx's (three statuses per reply made this the most frequent write).
        match &self.backend {
            Backend::Sqlite(sqlite) => sqlite.writer.run_raw(move |conn| job.run(conn)).await,
            Backend::Postgres(postgres) => job.run_postgres(&postgres.pool).await,
        }
    }
}

/// Claimed rows as the worker takes them.
fn inbox_rows(rows: Vec<InboxRaw>) -> Result<Vec<InboxRow>, StoreError> {
    rows.into_iter()
        .map(
            |(
                id,
                channel,
                dedupe_key,
                kind,
                contact_key,
                payload,
                received_at,
                attempts,
                last_error,
            )| {
                Ok(InboxRow {
                    id,
                    channel,
                    dedupe_key,
                    kind,
                    contact_key,
                    payload,
                    received_at: from_millis(received_at, "inbox.received_at")?,
                    attempts,
                    last_error,
                })
            },
        )
        .collect()
}

/// [`Db::apply_status`]'s statements, in order: move the message with the wamid forward;
/// else find it as it stands; else record the wamid on the message with the idempotency key
/// and move that one. Run as one job, so it reads what it wrote.
struct StatusJob {
    channel: String,
    wamid: String,
    key: Option<String>,
    /// `None`: not a delivery status, nothing moves.
    update: Option<StatusUpdate>,
}

impl StatusJob {
    fn new(channel: &str, change: &StatusChange<'_>, now: DateTime<Utc>) -> Self {
        StatusJob {
            channel: channel.to_owned(),
            wamid: change.wamid.to_owned(),
            key: change
                .idempotency_key
                .filter(|k| !k.is_empty())
                .map(str::to_owned),
            update: status_rank(change.status).map(|rank| StatusUpdate::new(change, rank, now)),
        }
    }

    fn run(&self, conn: &rusqlite::Connection) -> Result<StatusOutcome, StoreError> {
        if let Some(update) = &self.update {
            if let Some(message_id) = self.update_status(conn, update)? {
                return Ok(StatusOutcome::Updated { message_id });
            }
            if let Some((message_id, current)) = self.find_outbound(conn)? {
                return Ok(StatusOutcome::Unchanged {
                    message_id,
                    current,
                });
            }
            let Some(key) = &self.key else {
                return Ok(StatusOutcome::Unknown);
            };
            if !self.adopt_wamid(conn, key)? {
                return Ok(StatusOutcome::Unknown);
            }
            if let Some(message_id) = self.update_status(conn, update)? {
                return Ok(StatusOutcome::Updated { message_id });
            }
        }
        Ok(match self.find_outbound(conn)? {
            Some((message_id, current)) => StatusOutcome::Unchanged {
                message_id,
                current,
            },
            None => StatusOutcome::Unknown,
        })
    }

    /// Moves the outbound message with the wamid forward to the update's status, unless it
    /// is already there or past it; returns its id if it moved.
    fn update_status(
        &self,
        conn: &rusqlite::Connection,
        update: &StatusUpdate,
    ) -> Result<Option<i64>, StoreError> {
        let args = [
            Value::Text(update.status.clone()),
            Value::Integer(update.now),
            update.code.into(),
            update.error.clone().into(),
            Value::Text(self.channel.clone()),
            Value::Text(self.wamid.clone()),
            Value::Integer(update.rank),
        ];
        let mut statement = conn.prepare_cached(&STATUS_UPDATE)?;
        bind_numbered(&mut statement, &args)?;
        let mut rows = statement.raw_query();
        Ok(match rows.next()? {
            Some(row) => Some(row.get(0)?),
            None => None,
        })
    }

    /// Records the wamid on the outbound message whose idempotency key is `key` and that
    /// has none yet (its send's response was lost); returns whether one did.
    fn adopt_wamid(&self, conn: &rusqlite::Connection, key: &str) -> Result<bool, StoreError> {
        let args = [
            Value::Text(self.wamid.clone()),
            Value::Text(self.channel.clone()),
            Value::Text(key.to_owned()),
        ];
        let mut statement = conn.prepare_cached(STATUS_ADOPT)?;
        bind_numbered(&mut statement, &args)?;
        Ok(statement.raw_execute()? > 0)
    }

    /// The id and status of the outbound message with the wamid.
    fn find_outbound(
        &self,
        conn: &rusqlite::Connection,
    ) -> Result<Option<(i64, String)>, StoreError> {
        let args = [
            Value::Text(self.channel.clone()),
            Value::Text(self.wamid.clone()),
        ];
        let mut statement = conn.prepare_cached(STATUS_FIND)?;
        bind_numbered(&mut statement, &args)?;
        let mut rows = statement.raw_query();
        Ok(match rows.next()? {
            Some(row) => Some((row.get(0)?, row.get(1)?)),
            None => None,
        })
    }
}

impl StatusJob {
    /// [`StatusJob::run`] on PostgreSQL: the same statements in the same order, in one
    /// transaction.
    async fn run_postgres(&self, pool: &sqlx::PgPool) -> Result<StatusOutcome, StoreError> {
        let mut tx = pool.begin().await?;
        let outcome = 'outcome: {
            if let Some(update) = &self.update {
                if let Some(message_id) = self.update_postgres(&mut tx, update).await? {
                    break 'outcome StatusOutcome::Updated { message_id };
                }
                if let Some((message_id, current)) = self.find_postgres(&mut tx).await? {
                    break 'outcome StatusOutcome::Unchanged {
                        message_id,
                        current,
                    };
                }
                let Some(key) = &self.key else {
                    break 'outcome StatusOutcome::Unknown;
                };
                let adopted = sqlx::query(STATUS_ADOPT)
                    .bind(&self.wamid)
                    .bind(&self.channel)
                    .bind(key)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if adopted == 0 {
                    break 'outcome StatusOutcome::Unknown;
                }
                if let Some(message_id) = self.update_postgres(&mut tx, update).await? {
                    break 'outcome StatusOutcome::Updated { message_id };
                }
            }
            match self.find_postgres(&mut tx).await? {
                Some((message_id, current)) => StatusOutcome::Unchanged {
                    message_id,
                    current,
                },
                None => StatusOutcome::Unknown,
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    /// [`StatusJob::update_status`] on PostgreSQL.
    async fn update_postgres(
        &self,
        tx: &mut sqlx::PgConnection,
        update: &StatusUpdate,
    ) -> Result<Option<i64>, sqlx::Error> {
        sqlx::query_scalar(&STATUS_UPDATE)
            .bind(&update.status)
            .bind(update.now)
            .bind(update.code)
            .bind(&update.error)
            .bind(&self.channel)
            .bind(&self.wamid)
            .bind(update.rank)
            .fetch_optional(tx)
            .await
    }

    /// [`StatusJob::find_outbound`] on PostgreSQL.
    async fn find_postgres(
        &self,
        tx: &mut sqlx::PgConnection,
    ) -> Result<Option<(i64, String)>, sqlx::Error> {
        sqlx::query_as(STATUS_FIND)
            .bind(&self.channel)
            .bind(&self.wamid)
            .fetch_optional(tx)
            .await
    }
}

/// Leaves out a row `i` of the [`ORDERED_KINDS`] while an earlier one of its contact waits
/// for a retry (parameter `$1` is now).
macro_rules! not_behind_a_retry {
    () => {
        "NOT (i.contact_key IS NOT NULL \
            AND i.kind IN ('message', 'system', 'user_preference') \
            AND EXISTS (SELECT 1 FROM inbox e \
              WHERE e.processed_at IS NULL AND e.next_attempt_at > $1 \
                AND e.channel = i.channel AND e.contact_key = i.contact_key \
                AND e.id < i.id \
                AND e.kind IN ('message', 'system', 'user_preference')))"
    };
}
pub(super) use not_behind_a_retry;

/// [`Db::claim_inbox_after`]'s query, with the term that finds unprocessed rows.
macro_rules! claim_after {
    ($unprocessed:literal) => {
        concat!(
            "SELECT i.id, i.channel, i.dedupe_key, i.kind, i.contact_key, \
                i.payload, i.received_at, i.attempts, i.last_error \
            FROM inbox i \
            WHERE ",
            $unprocessed,
            " AND i.next_attempt_at <= $1 AND i.id > $2 AND ",
            not_behind_a_retry!(),
            " ORDER BY i.id LIMIT $3"
        )
    };
}

/// [`Db::claim_inbox_after`]'s query: every unprocessed row due (through `inbox_pending`).
const CLAIM_AFTER: &str = claim_after!("i.processed_at IS NULL");

/// The same on SQLite for a claim above a high-water mark (a wake-up's): only the rows
/// above it, by id (`+` keeps SQLite off `inbox_pending`). Through `inbox_pending` it read
/// every unprocessed row due, the rows in flight included, to keep the few new ones: under
/// load, hundreds per claim (about 1 ms for a thousand, 0.06 ms by id).
const CLAIM_NEW: &str = claim_after!("+i.processed_at IS NULL");

/// [`CLAIM_AFTER`] for the rows of contacts whose lease `$4` holds
/// ([`Db::claim_owned_inbox`]).
const CLAIM_OWNED_AFTER: &str = concat!(
    "SELECT i.id, i.channel, i.dedupe_key, i.kind, i.contact_key, \
            i.payload, i.received_at, i.attempts, i.last_error \
        FROM inbox i JOIN contact_leases l \
          ON l.channel = i.channel AND l.contact_key = ",
    inbox_lease_key!(),
    " WHERE l.owner = $4 AND i.processed_at IS NULL AND i.next_attempt_at <= $1 \
          AND i.id > $2 AND ",
    not_behind_a_retry!(),
    " ORDER BY i.id LIMIT $3"
);

/// Records a status's wamid on the message with its idempotency key ([`StatusJob`]).
const STATUS_ADOPT: &str = "UPDATE messages SET wamid = $1 \
        WHERE channel = $2 AND direction = 'out' AND idempotency_key = $3 AND wamid IS NULL";

/// The message a status names, as it stands ([`StatusJob`]).
const STATUS_FIND: &str = "SELECT id, status FROM messages \
        WHERE channel = $1 AND direction = 'out' AND wamid = $2";

/// What a status webhook writes on its message.
struct StatusUpdate {
    status: String,
    rank: i64,
    /// The error, kept only for `failed`.
    code: Option<i64>,
    error: Option<String>,
    now: i64,
}

impl StatusUpdate {
    fn new(change: &StatusChange<'_>, rank: i64, now: DateTime<Utc>) -> Self {
        // `played` (a voice message) is `read` as far as delivery goes.
        let status = if change.status == "played" {
            "read"
        } else {
            change.status
        };
        let (code, error) = if status == "failed" {
            (change.error_code, change.error)
        } else {
            (None, None)
        };
        Self {
            status: status.to_owned(),
            rank,
            code,
            error: error.map(str::to_owned),
            now: now.timestamp_millis(),
        }
    }
}

/// Moves a message to a status of a higher rank ([`RANK_SQL`]); `failed` stays. A status
/// settles a `sending` row too (a process that died after WhatsApp accepted the send): its
/// lease ends with it, so the contact's next message is claimable at once instead of when
/// the dead process's lease runs out.
static STATUS_UPDATE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "UPDATE messages SET status = $1, updated_at = $2, \
            error_code = COALESCE($3, error_code), error = COALESCE($4, error), \
            lease_until = NULL, lease_owner = NULL \
        WHERE channel = $5 AND direction = 'out' AND wamid = $6 \
          AND status <> 'failed' AND {RANK_SQL} < $7 \
        RETURNING id"
    )
});

/// What the webhook's delivery statuses did, applied before their rows are stored: each
/// row's `processed_at` (the time for a status that found its message, else `None`), and
/// the statuses that moved counted in [`Stored::moved`].
struct Applied {
    processed_at: Vec<Option<i64>>,
    stored: Stored,
}

impl Applied {
    fn new(rows: usize) -> Self {
        Applied {
            processed_at: Vec::with_capacity(rows),
            stored: Stored::default(),
        }
    }

    /// Records one row's status outcome (`None`: not a delivery status).
    fn push(&mut self, job: Option<&StatusJob>, outcome: Option<StatusOutcome>, now: i64) {
        let settled = match outcome {
            Some(StatusOutcome::Updated { .. }) => {
                let rank = job.and_then(|j| j.update.as_ref()).map_or(0, |u| u.rank);
                if let Some(n) = usize::try_from(rank - 1)
                    .ok()
                    .and_then(|i| self.stored.moved.get_mut(i))
                {
                    *n += 1;
                }
                true
            }
            Some(StatusOutcome::Unchanged { .. }) => true,
            Some(StatusOutcome::Unknown) | None => false,
        };
        self.processed_at.push(settled.then_some(now));
    }

    /// The insert's answer: one `processed_at IS NULL` flag per new row.
    fn inserted(mut self, pending: impl Iterator<Item = bool>) -> Stored {
        for new_row_pending in pending {
            self.stored.stored += 1;
            self.stored.pending += u64::from(new_row_pending);
        }
        self.stored
    }
}

/// The delivery-status job of each row ([`NewInboxRow::delivery`]).
fn status_jobs(rows: &[NewInboxRow], now: DateTime<Utc>) -> Vec<Option<StatusJob>> {
    rows.iter()
        .map(|row| (row.delivery.as_ref()).map(|d| StatusJob::new(&row.channel, &d.change(), now)))
        .collect()
}

/// The webhook's delivery statuses applied, then its rows as multi-row `INSERT`s of
/// [`INSERT_CHUNK`] rows: one raw job on SQLite's writer, so all of it commits or none.
async fn insert_sqlite(
    writer: &Writer,
    rows: &[NewInboxRow],
    now: DateTime<Utc>,
) -> Result<Stored, StoreError> {
    let jobs = status_jobs(rows, now);
    let now = now.timestamp_millis();
    let rows = rows.to_vec();
    writer
        .run_raw(move |conn| {
            let mut applied = Applied::new(rows.len());
            for job in &jobs {
                let outcome = job.as_ref().map(|j| j.run(conn)).transpose()?;
                applied.push(job.as_ref(), outcome, now);
            }
            let mut pending = Vec::with_capacity(rows.len());
            for (chunk_index, chunk) in rows.chunks(INSERT_CHUNK).enumerate() {
                let offset = chunk_index * INSERT_CHUNK;
                let mut sql = String::from(
                    "INSERT INTO inbox (channel, dedupe_key, kind, contact_key, payload, \
                         processed_at, received_at) VALUES ",
                );
                let mut args = Vec::with_capacity(1 + chunk.len() * 6);
                args.push(Value::Integer(now));
                for (i, row) in chunk.iter().enumerate() {
                    if i > 0 {
                        sql.push(',');
                    }
                    let p = i * 6;
                    sql.push_str(&format!(
                        "(${}, ${}, ${}, ${}, ${}, ${}, $1)",
                        p + 2,
                        p + 3,
                        p + 4,
                        p + 5,
                        p + 6,
                        p + 7
                    ));
                    args.push(Value::Text(row.channel.clone()));
                    args.push(Value::Text(row.dedupe_key.clone()));
                    args.push(Value::Text(row.kind.clone()));
                    args.push(row.contact_key.clone().into());
                    args.push(Value::Text(row.payload.clone()));
                    args.push(applied.processed_at[offset + i].into());
                }
                sql.push_str(
                    " ON CONFLICT (channel, dedupe_key) DO NOTHING \
                     RETURNING processed_at IS NULL",
                );
                let mut statement = conn.prepare_cached(&sql)?;
                bind_numbered(&mut statement, &args)?;
                let mut inserted = statement.raw_query();
                while let Some(row) = inserted.next()? {
                    pending.push(row.get::<_, bool>(0)?);
                }
            }
            Ok(applied.inserted(pending.into_iter()))
        })
        .await
}

/// The webhook's delivery statuses applied (each in a transaction of its own: applying
/// one again changes nothing, so a webhook stored after a failure is safe), then its rows
/// in one statement (one round trip, one transaction): each column as one array
/// parameter, unnested back into rows in their order.
async fn insert_postgres(
    pool: &sqlx::PgPool,
    rows: &[NewInboxRow],
    now: DateTime<Utc>,
) -> Result<Stored, StoreError> {
    const SQL: &str = "INSERT INTO inbox (channel, dedupe_key, kind, contact_key, payload, \
            processed_at, received_at) \
        SELECT channel, dedupe_key, kind, contact_key, payload, processed_at, $1 \
        FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[]) \
            WITH ORDINALITY AS u (channel, dedupe_key, kind, contact_key, payload, \
                processed_at, n) \
        ORDER BY n \
        ON CONFLICT (channel, dedupe_key) DO NOTHING \
        RETURNING processed_at IS NULL";
    let jobs = status_jobs(rows, now);
    let now = now.timestamp_millis();
    let mut applied = Applied::new(rows.len());
    for job in &jobs {
        let outcome = match job {
            Some(job) => Some(job.run_postgres(pool).await?),
            None => None,
        };
        applied.push(job.as_ref(), outcome, now);
    }
    let payloads = rows.iter().map(|r| r.payload.as_str()).collect::<Vec<_>>();
    let column = |f: fn(&NewInboxRow) -> &str| rows.iter().map(f).collect::<Vec<_>>();
    let contact_keys: Vec<Option<&str>> = rows.iter().map(|r| r.contact_key.as_deref()).collect();
    let pending: Vec<bool> = sqlx::query_scalar(SQL)
        .bind(now)
        .bind(column(|r| &r.channel))
        .bind(column(|r| &r.dedupe_key))
        .bind(column(|r| &r.kind))
        .bind(contact_keys)
        .bind(payloads)
        .bind(&applied.processed_at)
        .fetch_all(pool)
        .await?;
    Ok(applied.inserted(pending.into_iter()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::outbox::tests::plan;

    /// A plan line reading a whole table or index (SQLite writes `SCAN t`, with `USING
    /// INDEX` when it walks an index end to end).
    fn full_scans(plan: &str) -> Vec<&str> {
        plan.lines()
            .filter(|l| l.trim_start().starts_with("SCAN"))
            .collect()
    }

    /// The statements every status webhook, every claim and every turn's load run find
    /// their rows through an index, so they cost the same with ten million stored messages
    /// as with none.
    #[tokio::test]
    async fn status_and_claim_statements_use_indexes() {
        let db = Db::connect("sqlite::memory:").await.unwrap();
        db.migrate().await.unwrap();
        for (name, sql, index) in [
            (
                "status update",
                STATUS_UPDATE.as_str(),
                "messages_outbound_wamid",
            ),
            ("status find", STATUS_FIND, "messages_outbound_wamid"),
            ("status adopt", STATUS_ADOPT, "messages_idempotency_key"),
            ("inbox claim", CLAIM_AFTER, "inbox"),
            (
                "inbox claim of new rows",
                CLAIM_NEW,
                "INTEGER PRIMARY KEY (rowid>?)",
            ),
            (
                "conversation load",
                crate::store::conversations::LOAD_CONVERSATION,
                "messages_queued",
            ),
        ] {
            let plan = plan(&db, sql).await;
            assert!(full_scans(&plan).is_empty(), "{name} scans:\n{plan}");
            assert!(plan.contains(index), "{name} does not use {index}:\n{plan}");
        }
    }
}
