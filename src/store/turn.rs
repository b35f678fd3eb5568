//! [`Db::commit_turn`]: everything one engine turn changes, in one transaction.
//!
//! The turn's statements (contact, session, the queue, the inbound and outbound messages,
//! timers) are written as one batch with absolutely numbered parameters (`$1`, `$2`, …
//! shared by every statement), run as one raw job on the writer's thread (see
//! [`super::writer`]): its statements cost no thread hand-off, and the writer connection is
//! the one place every turn waits for (see [`Db`]). Statements after the first find the
//! contact by `(channel, wa_id)`, so a contact created by this very turn needs no round trip
//! for its id.
//!
//! Rows come back tagged: `(0, contact id)`, `(1, outbound id)`, `(2, dequeued id)`.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use rusqlite::types::{ToSqlOutput, Value};

use super::conversations::SessionRow;
use super::db::{Backend, Db};
use super::error::StoreError;
use super::sql::{bind_numbered, outbound_kind};
use super::timers::NewTimer;
use super::writer::Writer;
use crate::domain::{
    Contact, Decision, Inbound, InboundContent, Outbound, SplitMark, SplitPass, SplitStage,
};

/// Everything one engine turn changes, written atomically by [`Db::commit_turn`].
pub struct TurnWrite<'a> {
    pub channel: &'a str,
    /// From [`Conversation::contact_id`](super::Conversation::contact_id); `None` creates the contact.
    pub contact_id: Option<i64>,
    pub contact: &'a Contact,
    /// The session after the turn; `None` ends it.
    pub session: Option<&'a SessionRow>,
    /// The customer's message that started the turn, if any (timers start turns too).
    pub inbound: Option<&'a Inbound>,
    pub outbound: &'a [OutboundRecord],
    /// Queued messages leaving the queue (flushed or expired), updated in place.
    pub dequeued: &'a [DequeuedRecord],
    /// `Some` replaces all of the contact's timers with these (`Some(&[])` clears them);
    /// `None` leaves them alone.
    pub replace_timers: Option<&'a [NewTimer]>,
    /// The timer that started this turn, deleted with the turn so it fires exactly once.
    pub fired_timer: Option<i64>,
    /// A message this turn's (single) outbound message replaces: marked `failed` with a
    /// reason that names the new message.
    pub superseded: Option<&'a Superseded>,
    /// Stages of A/B splits the turn reached (`split_assignments`).
    pub splits: &'a [SplitMark],
    pub now: DateTime<Utc>,
}

/// An outbound message replaced by a new one (a 131047 decided again).
#[derive(Debug, Clone)]
pub struct Superseded {
    pub id: i64,
    /// The start of its new reason; the new message's id is appended.
    pub reason: String,
}

impl<'a> TurnWrite<'a> {
    /// A turn that writes only the contact (`session: None` ends a session: set it to keep
    /// one); the other fields are set with struct update syntax.
    pub fn new(
        channel: &'a str,
        contact_id: Option<i64>,
        contact: &'a Contact,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            channel,
            contact_id,
            contact,
            session: None,
            inbound: None,
            outbound: &[],
            dequeued: &[],
            replace_timers: None,
            fired_timer: None,
            superseded: None,
            splits: &[],
            now,
        }
    }
}

/// An outgoing message with the policy's verdict, for the message log.
#[derive(Debug, Clone)]
pub struct OutboundRecord {
    pub message: Outbound,
    pub decision: Decision,
    /// Initial delivery status: e.g. `sent` in the sandbox, `pending` for real channels.
    pub status: String,
    /// The wamid of the inbound message this answers, if any (for mark-as-read).
    pub in_reply_to: Option<String>,
    /// For a queued message: when it expires.
    pub expires_at: Option<DateTime<Utc>>,
}

/// A queued message's new decision (it leaves the queue, or stays with a new reason).
#[derive(Debug, Clone)]
pub struct DequeuedRecord {
    pub id: i64,
    pub message: Outbound,
    pub decision: Decision,
    pub status: String,
    /// The wamid of the customer message that flushed it.
    pub in_reply_to: Option<String>,
}

/// What [`Db::commit_turn`] created.
#[derive(Debug, Clone, PartialEq)]
pub struct CommittedTurn {
    pub contact_id: i64,
    /// Ids of the outbound messages, in the order given; the sender updates their status.
    pub outbound_ids: Vec<i64>,
    /// Ids of the dequeued messages that were still queued (another path may have expired
    /// one in between).
    pub dequeued_ids: Vec<i64>,
}

/// Status of every stored inbound message.
const RECEIVED: &str = "received";

/// The contact the turn is about, for every statement after the upsert.
const CONTACT: &str = "(SELECT id FROM contacts WHERE channel = $1 AND wa_id = $2)";

/// The turn's time, a parameter of every batch (see [`build`]).
const NOW: &str = "$8";

/// What the stale-contact checks' errors say (see [`build`]): the guard's, and the
/// customer message's.
const GUARD_FAILS_ON: [&str; 2] = ["contacts.channel", "messages.contact_id"];

/// Runs a turn's batch as one raw job on the writer: in the writer's transaction, so its
/// statements commit together, and inside the savepoint the writer gives every raw job, so
/// a turn that fails half-way leaves nothing behind.
async fn run_batch(writer: &Writer, batch: Batch) -> Result<Vec<(i64, i64)>, StoreError> {
    writer.run_raw(move |conn| batch.run(conn)).await
}

/// Runs a turn's batch on PostgreSQL as one statement: each of its statements a
/// data-modifying `WITH` query (`s0`, `s1`, …), the tagged rows selected from those that
/// return them. One round trip, and one statement is one transaction: all or nothing.
/// Every part sees the database as it was before the statement, so parts that need a row
/// an earlier part wrote read it from that part's `RETURNING` (see [`Dialect`]).
async fn run_batch_postgres(
    pool: &sqlx::PgPool,
    batch: Batch,
) -> Result<Vec<(i64, i64)>, StoreError> {
    let mut sql = String::from("WITH ");
    let mut parts = Vec::with_capacity(batch.statements.len());
    for (i, (statement, returns)) in batch.statements.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        // Every part returns rows (those that return no tagged rows, tag -1), and the
        // statement reads the parts in order: PostgreSQL runs a part when it is read, so
        // the parts run in the batch's order (the customer's message gets its id before
        // the replies).
        let untagged = if *returns {
            ""
        } else {
            " RETURNING -1, CAST(0 AS BIGINT)"
        };
        let _ = write!(sql, "s{i} AS ({statement}{untagged})");
        parts.push(format!("SELECT * FROM s{i}"));
    }
    sql.push(' ');
    sql.push_str(&parts.join(" UNION ALL "));
    let mut query = sqlx::query_as::<_, (i32, i64)>(&sql);
    for arg in batch.args {
        query = match arg {
            Param::Int(value) => query.bind(value),
            Param::Text(value) => query.bind(value),
        };
    }
    let rows = query.fetch_all(pool).await?;
    Ok(rows
        .into_iter()
        .filter(|(tag, _)| *tag >= 0)
        .map(|(tag, id)| (i64::from(tag), id))
        .collect())
}

/// A batch's parameter, typed even when it is NULL (PostgreSQL types every parameter).
#[derive(Debug, Clone)]
enum Param {
    Int(Option<i64>),
    Text(Option<String>),
}

impl From<i64> for Param {
    fn from(value: i64) -> Self {
        Param::Int(Some(value))
    }
}

impl From<Option<i64>> for Param {
    fn from(value: Option<i64>) -> Self {
        Param::Int(value)
    }
}

impl From<String> for Param {
    fn from(value: String) -> Self {
        Param::Text(Some(value))
    }
}

impl From<Option<String>> for Param {
    fn from(value: Option<String>) -> Self {
        Param::Text(value)
    }
}

impl rusqlite::ToSql for Param {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Param::Int(Some(n)) => ToSqlOutput::from(*n),
            Param::Text(Some(text)) => ToSqlOutput::from(text.as_str()),
            Param::Int(None) | Param::Text(None) => ToSqlOutput::Owned(Value::Null),
        })
    }
}

/// What differs between the backends' batches: how a statement names the contact a turn
/// creates, and the message a superseding turn wrote. SQLite runs the statements one after
/// another, so a later one finds the new rows by a query; PostgreSQL runs them as parts of
/// one statement, which find them in the `RETURNING` of the part that wrote them.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Dialect {
    Sqlite,
    Postgres,
}

/// A growing SQL batch and its parameters.
struct Batch {
    /// The statements, each with absolutely numbered parameters (`$n` is `args[n - 1]`),
    /// and whether it returns tagged rows.
    statements: Vec<(String, bool)>,
    args: Vec<Param>,
}

impl Batch {
    fn new() -> Self {
        Self {
            statements: Vec::with_capacity(8),
            args: Vec::with_capacity(32),
        }
    }

    /// Adds a parameter and returns its placeholder (`$n`).
    fn param(&mut self, value: impl Into<Param>) -> Result<String, StoreError> {
        self.args.push(value.into());
        Ok(format!("${}", self.args.len()))
    }

    /// Adds a statement that returns no rows.
    fn statement(&mut self, sql: &str) {
        self.statements.push((sql.to_string(), false));
    }

    /// Adds a statement that returns tagged rows: `RETURNING tag, id`.
    fn returning(&mut self, sql: &str) {
        self.statements.push((sql.to_string(), true));
    }

    /// Runs the statements in order; returns the tagged rows.
    fn run(&self, conn: &rusqlite::Connection) -> Result<Vec<(i64, i64)>, StoreError> {
        let mut out = Vec::new();
        for (sql, returns) in &self.statements {
            let mut statement = conn.prepare_cached(sql)?;
            bind_numbered(&mut statement, &self.args)?;
            let mut rows = statement.raw_query();
            while let Some(row) = rows.next()? {
                if *returns {
                    out.push((row.get(0)?, row.get(1)?));
                }
            }
        }
        Ok(out)
    }
}

impl Db {
    /// Commits one engine turn in one transaction: the contact, the session, the inbound and
    /// outbound messages, the queue and the timers are all written or, on any error, none
    /// of them.
    pub async fn commit_turn(&self, turn: &TurnWrite<'_>) -> Result<CommittedTurn, StoreError> {
        let rows = match &self.backend {
            Backend::Sqlite(sqlite) => run_batch(&sqlite.writer, build(turn, Dialect::Sqlite)?)
                .await
                .map_err(|e| stale_contact(e, turn))?,
            Backend::Postgres(postgres) => {
                run_batch_postgres(&postgres.pool, build(turn, Dialect::Postgres)?)
                    .await
                    .map_err(|e| stale_contact(e, turn))?
            }
        };
        committed(rows, turn)
    }
}

/// The error of a batch stopped by a stale-contact check (see [`build`]), saying which:
/// any other error as it is.
fn stale_contact(error: StoreError, turn: &TurnWrite<'_>) -> StoreError {
    if let StoreError::Database(sqlx::Error::Database(e)) = &error
        && let Some(id) = turn.fired_timer
        && e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .is_some_and(|e| {
                e.code() == "23502" && e.table() == Some("contacts") && e.column() == Some("wa_id")
            })
    {
        return StoreError::TimerAlreadyFired { id };
    }
    let guard_failed = match &error {
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, Some(message))) => {
            e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_NOTNULL
                && GUARD_FAILS_ON.iter().any(|m| message.contains(m))
        }
        StoreError::Database(sqlx::Error::Database(e)) => e
            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .is_some_and(|e| {
                e.code() == "23502"
                    && GUARD_FAILS_ON.iter().any(|m| {
                        m.split_once('.')
                            == Some((e.table().unwrap_or(""), e.column().unwrap_or("")))
                    })
            }),
        _ => false,
    };
    match error {
        _ if guard_failed => {
            match turn.contact_id {
                // The contact id the caller loaded no longer names this contact.
                Some(id) => StoreError::UnknownContact { id },
                // The new contact's key is another contact's alias by now.
                None => StoreError::IdentifierTaken {
                    identifier: turn.contact.wa_id.to_string(),
                },
            }
        }
        other => other,
    }
}

/// What the batch's tagged rows say the turn created.
fn committed(rows: Vec<(i64, i64)>, turn: &TurnWrite<'_>) -> Result<CommittedTurn, StoreError> {
    let mut contact_id = None;
    let mut outbound_ids = Vec::with_capacity(turn.outbound.len());
    let mut dequeued_ids = Vec::new();
    for (tag, id) in rows {
        match tag {
            0 => contact_id = Some(id),
            1 => outbound_ids.push(id),
            _ => dequeued_ids.push(id),
        }
    }
    let contact_id = contact_id
        .or(turn.contact_id)
        .ok_or_else(|| StoreError::Corrupt("the contact upsert returned no id".into()))?;
    // One multi-row INSERT: RETURNING order is not promised, ids grow with the rows.
    outbound_ids.sort_unstable();
    Ok(CommittedTurn {
        contact_id,
        outbound_ids,
        dequeued_ids,
    })
}

/// The turn as one SQL batch: its statements in the order they must run.
fn build(turn: &TurnWrite<'_>, dialect: Dialect) -> Result<Batch, StoreError> {
    let mut b = Batch::new();
    contact_params(&mut b, turn)?;
    let (contact, inbound_written) = match turn.contact_id {
        Some(id) => {
            let contact = b.param(id)?;
            let written = update_known_contact(&mut b, turn, &contact)?;
            (contact, written)
        }
        None => {
            upsert_new_contact(&mut b);
            let contact = match dialect {
                Dialect::Sqlite => CONTACT.to_string(),
                // The upsert's part, the batch's last statement so far.
                Dialect::Postgres => format!("(SELECT id FROM s{})", b.statements.len() - 1),
            };
            (contact, false)
        }
    };
    write_session(&mut b, turn.session, &contact)?;
    // The queue first: flushed messages keep their (lower) ids, so they leave before this
    // turn's new messages.
    update_dequeued(&mut b, turn.dequeued, &contact)?;
    if let Some(m) = turn.inbound.filter(|_| !inbound_written) {
        insert_inbound(&mut b, m, &contact)?;
    }
    if let Some(m) = turn.inbound {
        insert_media_job(&mut b, m, &contact)?;
    }
    insert_outbound(&mut b, turn.outbound, &contact)?;
    if let Some(old) = turn.superseded {
        // The new message's id: the contact's latest outbound message, which on PostgreSQL
        // only the outbound part's `RETURNING` shows.
        let newest = match dialect {
            Dialect::Postgres if !turn.outbound.is_empty() => {
                format!("(SELECT MAX(id) FROM s{})", b.statements.len() - 1)
            }
            _ => format!(
                "(SELECT MAX(id) FROM messages WHERE contact_id = {contact} AND direction = 'out')"
            ),
        };
        mark_superseded(&mut b, old, &newest)?;
    }
    if let Some(id) = turn.fired_timer {
        let id = b.param(id)?;
        b.statement(&format!("DELETE FROM timers WHERE id = {id}"));
        if dialect == Dialect::Postgres {
            // Several instances read the same due timers: the turn that deletes the timer
            // fires it, and one that finds it gone (deleted by another's turn, which it
            // waited for) writes nothing: a NULL key fails the statement.
            let deleted = b.statements.len() - 1;
            b.statement(&format!(
                "INSERT INTO contacts (channel, wa_id, created_at, updated_at) \
                SELECT $1, NULL, 0, 0 WHERE NOT EXISTS (SELECT 1 FROM s{deleted})"
            ));
        }
    }
    if let Some(timers) = turn.replace_timers {
        replace_timers(&mut b, timers, &contact)?;
    }
    record_splits(&mut b, turn.splits, &contact)?;
    Ok(b)
}

/// `$1`..`$9`, used throughout: the channel, the contact's columns, and the turn's time
/// ([`NOW`]).
fn contact_params(b: &mut Batch, turn: &TurnWrite<'_>) -> Result<(), StoreError> {
    let c = turn.contact;
    b.param(turn.channel.to_string())?;
    b.param(c.wa_id.clone())?;
    b.param(c.name.clone())?;
    b.param(serde_json::to_string(&c.tags)?)?;
    b.param(serde_json::to_string(&c.attrs)?)?;
    b.param(c.timezone.clone())?;
    b.param(c.last_customer_message_at.map(|t| t.timestamp_millis()))?;
    b.param(turn.now.timestamp_millis())?;
    b.param(serde_json::to_string(&c.policy)?)?;
    Ok(())
}

/// A known contact, checked by the turn's first write, then updated; returns whether that
/// first write was the customer's message.
fn update_known_contact(
    b: &mut Batch,
    turn: &TurnWrite<'_>,
    contact: &str,
) -> Result<bool, StoreError> {
    let mut inbound_written = false;
    // With a customer message, the check is the message: a replay fails its unique wamid,
    // and a contact id that no longer names this contact (deleted, or its id reused by
    // another) gives it no contact, which fails NOT NULL.
    if let Some(m) = turn.inbound {
        let checked = format!(
            "(SELECT id FROM contacts WHERE id = {contact} AND channel = $1 AND wa_id = $2)"
        );
        insert_inbound(b, m, &checked)?;
        inbound_written = true;
    } else {
        // Without one, a guard: if the contact is gone it inserts a row without a
        // channel, whose NOT NULL failure stops the batch (SQLite has no RAISE outside
        // triggers).
        b.statement(&format!(
            "INSERT INTO contacts (channel, wa_id, created_at, updated_at) \
            SELECT NULL, NULL, 0, 0 WHERE NOT EXISTS (SELECT 1 FROM contacts \
                WHERE id = {contact} AND channel = $1 AND wa_id = $2)"
        ));
    }
    b.statement(&format!(
        "UPDATE contacts SET name = $3, tags = $4, attrs = $5, timezone = $6, \
            last_customer_message_at = $7, updated_at = $8, policy = $9 \
        WHERE id = {contact}"
    ));
    Ok(inbound_written)
}

/// A new contact is written first (or updated, if it appeared meanwhile), and later
/// statements find it by `(channel, wa_id)`; not under an identifier that names another
/// contact (an identity change since the turn resolved it): the same guard as a known
/// contact's stops the batch.
fn upsert_new_contact(b: &mut Batch) {
    b.statement(
        "INSERT INTO contacts (channel, wa_id, created_at, updated_at) \
        SELECT NULL, NULL, 0, 0 WHERE EXISTS (SELECT 1 FROM contact_aliases \
            WHERE channel = $1 AND identifier = $2)",
    );
    b.returning(
        "INSERT INTO contacts (channel, wa_id, name, tags, attrs, timezone, \
            last_customer_message_at, created_at, updated_at, policy) \
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9) \
        ON CONFLICT (channel, wa_id) DO UPDATE SET name = excluded.name, \
            tags = excluded.tags, attrs = excluded.attrs, timezone = excluded.timezone, \
            last_customer_message_at = excluded.last_customer_message_at, \
            updated_at = excluded.updated_at, policy = excluded.policy \
        RETURNING 0, id",
    );
}

/// A customer's file to download: a `pending` row for the media worker, written with the
/// message so a redelivered message (which fails the batch) adds none.
fn insert_media_job(b: &mut Batch, m: &Inbound, contact: &str) -> Result<(), StoreError> {
    let InboundContent::Media {
        kind,
        caption,
        file: Some(file),
    } = &m.content
    else {
        return Ok(());
    };
    let wamid = b.param(m.id.clone())?;
    let kind = b.param(kind.clone())?;
    let provider_id = b.param(file.id.clone())?;
    let mime = b.param(file.mime_type.clone())?;
    let sha256 = b.param(file.sha256.clone())?;
    let caption = b.param(caption.clone())?;
    let filename = b.param(file.filename.clone())?;
    b.statement(&format!(
        "INSERT INTO media (contact_id, channel, wamid, kind, provider_id, mime, sha256, \
            caption, filename, status, next_attempt_at, created_at, updated_at) \
        VALUES ({contact}, $1, {wamid}, {kind}, {provider_id}, {mime}, {sha256}, {caption}, \
            {filename}, 'pending', {NOW}, {NOW}, {NOW}) \
        ON CONFLICT (channel, wamid) DO NOTHING"
    ));
    Ok(())
}

/// The session after the turn, or its end.
fn write_session(
    b: &mut Batch,
    session: Option<&SessionRow>,
    contact: &str,
) -> Result<(), StoreError> {
    let Some(s) = session else {
        b.statement(&format!(
            "DELETE FROM sessions WHERE contact_id = {contact}"
        ));
        return Ok(());
    };
    let (flow, version, step) = (
        b.param(s.flow_id.clone())?,
        b.param(s.flow_version.clone())?,
        b.param(s.step.clone())?,
    );
    let state = b.param(serde_json::to_string(&s.state)?)?;
    let at = b.param(s.updated_at.timestamp_millis())?;
    b.statement(&format!(
        "INSERT INTO sessions (contact_id, flow_id, flow_version, step, state, updated_at) \
        VALUES ({contact}, {flow}, {version}, {step}, {state}, {at}) \
        ON CONFLICT (contact_id) DO UPDATE SET flow_id = excluded.flow_id, \
            flow_version = excluded.flow_version, step = excluded.step, \
            state = excluded.state, updated_at = excluded.updated_at"
    ));
    Ok(())
}

/// Queued messages' new decisions, each only if it is still queued.
fn update_dequeued(
    b: &mut Batch,
    dequeued: &[DequeuedRecord],
    contact: &str,
) -> Result<(), StoreError> {
    for r in dequeued {
        let [kind, body, decision, reason, status, reply_to] =
            outbound_params(b, &r.message, &r.decision, &r.status, &r.in_reply_to)?;
        let id = b.param(r.id)?;
        b.returning(&format!(
            "UPDATE messages SET kind = {kind}, body = {body}, decision = {decision}, \
                reason = {reason}, status = {status}, \
                in_reply_to = COALESCE({reply_to}, in_reply_to), \
                expires_at = CASE WHEN {status} = 'queued' THEN expires_at END, \
                updated_at = {NOW} \
            WHERE id = {id} AND contact_id = {contact} AND status = 'queued' \
            RETURNING 2, id"
        ));
    }
    Ok(())
}

/// The turn's outgoing messages, in one multi-row INSERT.
fn insert_outbound(
    b: &mut Batch,
    outbound: &[OutboundRecord],
    contact: &str,
) -> Result<(), StoreError> {
    if outbound.is_empty() {
        return Ok(());
    }
    let mut sql = String::from(
        "INSERT INTO messages (contact_id, channel, direction, wamid, kind, body, decision, \
            reason, status, created_at, in_reply_to, updated_at, expires_at) VALUES ",
    );
    for (i, r) in outbound.iter().enumerate() {
        let [kind, body, decision, reason, status, reply_to] =
            outbound_params(b, &r.message, &r.decision, &r.status, &r.in_reply_to)?;
        let expires = b.param(r.expires_at.map(|t| t.timestamp_millis()))?;
        if i > 0 {
            sql.push_str(", ");
        }
        let _ = write!(
            sql,
            "({contact}, $1, 'out', NULL, {kind}, {body}, {decision}, {reason}, {status}, \
                {NOW}, {reply_to}, {NOW}, {expires})"
        );
    }
    sql.push_str(" RETURNING 1, id");
    b.returning(&sql);
    Ok(())
}

/// The message the turn's outbound message replaces: `failed`, its reason naming the new
/// message (`newest`: its id).
fn mark_superseded(b: &mut Batch, old: &Superseded, newest: &str) -> Result<(), StoreError> {
    let id = b.param(old.id)?;
    let reason = b.param(old.reason.clone())?;
    b.statement(&format!(
        "UPDATE messages SET decision = 'failed', reason = {reason} || {newest}, \
            updated_at = {NOW} \
        WHERE id = {id}"
    ));
    Ok(())
}

/// The stages of A/B splits the turn reached. Reaching a split records the contact's
/// branch once; reaching it again on another branch (its weights changed) starts the row
/// over for that branch. A later stage is stamped once, on the row of the branch the
/// session passed.
///
/// One statement per split the turn passed, with every stage it reached folded in: on
/// PostgreSQL the turn is one statement whose parts do not see each other's rows, so a
/// split reached and finished in the same turn must be one write, not an insert and an
/// update of the row it inserted.
fn record_splits(b: &mut Batch, marks: &[SplitMark], contact: &str) -> Result<(), StoreError> {
    let mut passes: Vec<(&SplitPass, Vec<SplitStage>)> = Vec::new();
    for mark in marks {
        match passes.iter_mut().find(|(pass, _)| **pass == mark.pass) {
            Some((_, stages)) => stages.push(mark.stage),
            None => passes.push((&mark.pass, vec![mark.stage])),
        }
    }
    const LATER: [(SplitStage, &str); 3] = [
        (SplitStage::Replied, "replied_at"),
        (SplitStage::Finished, "finished_at"),
        (SplitStage::HandedOff, "handed_off_at"),
    ];
    for (pass, stages) in passes {
        let flow = b.param(pass.flow.clone())?;
        let step = b.param(pass.step.clone())?;
        let branch = b.param(pass.branch.clone())?;
        let stamped = |stage| if stages.contains(&stage) { NOW } else { "NULL" };
        if stages.contains(&SplitStage::Reached) {
            // A new branch starts the row over; the same branch keeps its first stamps.
            let restart = "split_assignments.branch <> excluded.branch";
            let mut set = format!(
                "branch = excluded.branch, reached_at = CASE WHEN {restart} \
                 THEN excluded.reached_at ELSE split_assignments.reached_at END"
            );
            for (_, column) in LATER {
                set.push_str(&format!(
                    ", {column} = CASE WHEN {restart} THEN excluded.{column} \
                     ELSE COALESCE(split_assignments.{column}, excluded.{column}) END"
                ));
            }
            b.statement(&format!(
                "INSERT INTO split_assignments \
                    (contact_id, flow, step, branch, reached_at, replied_at, finished_at, \
                     handed_off_at) \
                VALUES ({contact}, {flow}, {step}, {branch}, {NOW}, {}, {}, {}) \
                ON CONFLICT (contact_id, flow, step) DO UPDATE SET {set}",
                stamped(SplitStage::Replied),
                stamped(SplitStage::Finished),
                stamped(SplitStage::HandedOff),
            ));
        } else {
            let set: Vec<String> = LATER
                .iter()
                .filter(|(stage, _)| stages.contains(stage))
                .map(|(_, column)| format!("{column} = COALESCE({column}, {NOW})"))
                .collect();
            b.statement(&format!(
                "UPDATE split_assignments SET {} \
                WHERE contact_id = {contact} AND flow = {flow} AND step = {step} \
                    AND branch = {branch}",
                set.join(", ")
            ));
        }
    }
    Ok(())
}

/// All of the contact's timers, replaced by `timers`.
fn replace_timers(b: &mut Batch, timers: &[NewTimer], contact: &str) -> Result<(), StoreError> {
    b.statement(&format!("DELETE FROM timers WHERE contact_id = {contact}"));
    if timers.is_empty() {
        return Ok(());
    }
    let mut sql =
        String::from("INSERT INTO timers (contact_id, due_at, payload, created_at) VALUES ");
    for (i, t) in timers.iter().enumerate() {
        let due = b.param(t.due_at.timestamp_millis())?;
        let payload = b.param(serde_json::to_string(&t.payload)?)?;
        if i > 0 {
            sql.push_str(", ");
        }
        let _ = write!(sql, "({contact}, {due}, {payload}, {NOW})");
    }
    b.statement(&sql);
    Ok(())
}

/// An outgoing message's columns as parameters: kind, body, decision, reason, status and
/// the message it answers.
fn outbound_params(
    b: &mut Batch,
    message: &Outbound,
    decision: &Decision,
    status: &str,
    reply_to: &Option<String>,
) -> Result<[String; 6], StoreError> {
    Ok([
        b.param(outbound_kind(&message.content).to_string())?,
        b.param(serde_json::to_string(message)?)?,
        b.param(decision.name().to_string())?,
        b.param(decision.reason().to_string())?,
        b.param(status.to_string())?,
        b.param(reply_to.clone())?,
    ])
}

/// The customer's message, into the message log.
fn insert_inbound(b: &mut Batch, m: &Inbound, contact: &str) -> Result<(), StoreError> {
    let wamid = b.param(m.id.clone())?;
    let kind = b.param(m.content.kind().to_string())?;
    let body = b.param(serde_json::to_string(m)?)?;
    b.statement(&format!(
        "INSERT INTO messages (contact_id, channel, direction, wamid, kind, body, decision, \
            reason, status, created_at) \
        VALUES ({contact}, $1, 'in', {wamid}, {kind}, {body}, NULL, NULL, '{RECEIVED}', {NOW})"
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use chrono::DateTime;

    use super::*;
    use crate::domain::OutboundContent;
    use crate::store::conformance::{CH, bare_turn, inbound, memory_db, said, t};

    /// SQLite-specific: the writer is held so the turns commit as one group.
    #[tokio::test]
    async fn concurrent_turns_commit_and_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&format!("sqlite://{}", dir.path().join("t.db").display()))
            .await
            .unwrap();
        db.migrate().await.unwrap();
        let first = Contact::new("1000");
        let seen = inbound("wamid.seen", "hi", t(0));
        db.commit_turn(&TurnWrite {
            inbound: Some(&seen),
            ..bare_turn(None, &first, t(0))
        })
        .await
        .unwrap();
        // 60 contacts at once through the one writer, one of them replaying the message
        // already stored: only that turn fails, and writes nothing. The writer is held while
        // they queue, so they commit as one group, the failing turn in the middle of it (its
        // contact upsert ran before its inbound message failed, and is undone).
        let Backend::Sqlite(sqlite) = &db.backend else {
            unreachable!("a SQLite test")
        };
        let writer = &sqlite.writer;
        let release = writer.hold().await;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..60 {
            let db = db.clone();
            tasks.spawn(async move {
                let contact = Contact::new(format!("{}", 2000 + i));
                let id = if i == 30 {
                    "wamid.seen".to_string()
                } else {
                    format!("wamid.{i}")
                };
                let message = inbound(&id, "hello", t(1));
                let out = [said(
                    OutboundContent::text(format!("reply {i}")),
                    Decision::Send {
                        reason: "window open".into(),
                    },
                )];
                let result = db
                    .commit_turn(&TurnWrite {
                        inbound: Some(&message),
                        outbound: &out,
                        ..bare_turn(None, &contact, t(1))
                    })
                    .await;
                (i, contact.wa_id.clone(), result)
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        release.send(()).unwrap();
        let mut committed = 0;
        while let Some(joined) = tasks.join_next().await {
            let (i, wa_id, result) = joined.unwrap();
            match result {
                Ok(turn) => {
                    committed += 1;
                    let log = db.messages(CH, &wa_id, 10).await.unwrap();
                    assert_eq!(log.len(), 2, "contact {wa_id}");
                    assert_eq!(log[1].id, turn.outbound_ids[0]);
                    assert_eq!(log[1].body["content"]["body"], format!("reply {i}"));
                }
                Err(e) => {
                    assert_eq!(i, 30, "only the replay fails: {e}");
                    assert!(e.is_duplicate(), "{e}");
                    assert_eq!(
                        db.load_conversation(CH, &wa_id).await.unwrap().contact_id,
                        None
                    );
                }
            }
        }
        assert_eq!(committed, 59);
    }

    /// SQLite-specific: SQLite hands a deleted highest id out again, so a stale id can name
    /// another contact.
    #[tokio::test]
    async fn stale_contact_id_is_refused() {
        let db = memory_db().await;
        let contact = Contact::new("1555");
        let err = db
            .commit_turn(&bare_turn(Some(42), &contact, t(0)))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::UnknownContact { id: 42 }),
            "{err}"
        );
        assert_eq!(
            db.load_conversation(CH, "1555").await.unwrap().contact_id,
            None
        );

        // With a customer message the message itself is the guard: the contact was deleted
        // and created again since it was loaded, under a new id.
        let msg = inbound("wamid.stale", "hi", t(1));
        let old = db
            .commit_turn(&TurnWrite {
                inbound: Some(&msg),
                ..bare_turn(None, &contact, t(1))
            })
            .await
            .unwrap()
            .contact_id;
        db.commit_turn(&bare_turn(None, &Contact::new("1666"), t(1)))
            .await
            .unwrap();
        let Backend::Sqlite(sqlite) = &db.backend else {
            unreachable!("a SQLite test")
        };
        let pool = &sqlite.pool;
        sqlx::query("DELETE FROM contacts WHERE id = $1")
            .bind(old)
            .execute(pool)
            .await
            .unwrap();
        let new = db
            .commit_turn(&bare_turn(None, &contact, t(2)))
            .await
            .unwrap()
            .contact_id;
        assert_ne!(new, old);
        // A turn with a message and a reply for the contact as loaded with `id`, refused.
        let refused = async |id: i64, wamid: &str, at: DateTime<Utc>| {
            let message = inbound(wamid, "hi again", at);
            let out = [said(
                OutboundContent::text("hello"),
                Decision::Send {
                    reason: "window open".into(),
                },
            )];
            let err = db
                .commit_turn(&TurnWrite {
                    inbound: Some(&message),
                    outbound: &out,
                    ..bare_turn(Some(id), &contact, at)
                })
                .await
                .unwrap_err();
            assert!(
                matches!(err, StoreError::UnknownContact { id: e } if e == id),
                "{err}"
            );
        };
        refused(old, "wamid.stale.2", t(3)).await;
        assert!(db.messages(CH, "1555", 10).await.unwrap().is_empty());

        // The highest id, deleted, is given to the next contact: the stale id now names
        // someone else, who must not get this turn's message, contact or session.
        sqlx::query("DELETE FROM contacts WHERE id = $1")
            .bind(new)
            .execute(pool)
            .await
            .unwrap();
        let other = Contact::new("1888");
        let reused = db
            .commit_turn(&bare_turn(None, &other, t(4)))
            .await
            .unwrap()
            .contact_id;
        assert_eq!(reused, new, "SQLite hands the freed highest id out again");
        refused(new, "wamid.stale.3", t(5)).await;
        assert!(db.messages(CH, "1888", 10).await.unwrap().is_empty());
        let untouched = db.load_conversation(CH, "1888").await.unwrap();
        assert_eq!(untouched.contact.wa_id, "1888");
        assert_eq!(untouched.session, None);
    }

    /// On PostgreSQL a turn for a contact id that names nobody is refused as on SQLite
    /// (its guard is a part of the turn's one statement).
    #[tokio::test]
    async fn postgres_refuses_a_turn_for_an_unknown_contact_id() {
        use crate::domain::Contact;
        use crate::store::TurnWrite;
        use crate::store::conformance::{CH, bare_turn, drop_schema, inbound, postgres_db, t};
        let Some((db, schema)) = postgres_db().await else {
            return;
        };
        let contact = Contact::new("1555");
        let err = db
            .commit_turn(&bare_turn(Some(42), &contact, t(0)))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::UnknownContact { id: 42 }),
            "{err}"
        );
        let message = inbound("wamid.x", "hi", t(0));
        let err = db
            .commit_turn(&TurnWrite {
                inbound: Some(&message),
                ..bare_turn(Some(42), &contact, t(0))
            })
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::UnknownContact { id: 42 }),
            "{err}"
        );
        assert_eq!(
            db.load_conversation(CH, "1555").await.unwrap().contact_id,
            None
        );
        drop_schema(&db, &schema).await;
    }

    /// Two instances fire the same due timer on PostgreSQL at once: one turn commits (and
    /// deletes the timer), the other writes nothing and says the timer was already fired.
    #[tokio::test]
    async fn a_timer_fired_by_two_instances_commits_one_turn() {
        use crate::domain::{Contact, Decision, OutboundContent};
        use crate::store::TurnWrite;
        use crate::store::conformance::{
            CH, bare_turn, contact_with_timers, drop_schema, postgres_db, postgres_db_on, said, t,
            timer,
        };
        let Some((db, schema)) = postgres_db().await else {
            return;
        };
        let contact_id = contact_with_timers(&db, "1555", &[timer(t(5), "a")]).await;
        let due = db.due_timers(t(10), 10).await.unwrap();
        assert_eq!(due.len(), 1);
        let timer_id = due[0].id;
        let other = postgres_db_on(&schema).await;
        let fire = |db: Db, text: &'static str| {
            tokio::spawn(async move {
                let contact = Contact::new("1555");
                let out = [said(
                    OutboundContent::text(text),
                    Decision::Send {
                        reason: "window open".into(),
                    },
                )];
                db.commit_turn(&TurnWrite {
                    outbound: &out,
                    fired_timer: Some(timer_id),
                    ..bare_turn(Some(contact_id), &contact, t(10))
                })
                .await
            })
        };
        let (a, b) = (fire(db.clone(), "from a"), fire(other.clone(), "from b"));
        let results = [a.await.unwrap(), b.await.unwrap()];
        let committed = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(committed, 1, "{results:?}");
        for result in &results {
            if let Err(e) = result {
                assert!(
                    matches!(e, StoreError::TimerAlreadyFired { id } if *id == timer_id),
                    "{e}"
                );
            }
        }
        let log = db.messages(CH, "1555", 10).await.unwrap();
        assert_eq!(log.len(), 1, "one turn's reply");
        assert!(db.due_timers(t(10), 10).await.unwrap().is_empty());
        other.close().await;
        drop_schema(&db, &schema).await;
    }
}
