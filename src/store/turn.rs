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

use rusqlite::types::Value;

use crate::domain::{Decision, Inbound, Outbound};

use super::writer::bind_numbered;
use super::{
    CommittedTurn, Db, RECEIVED, StoreError, TurnWrite, Writer, outbound_kind, postgres_writes,
};

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

/// A growing SQL batch and its parameters.
struct Batch {
    /// The statements, each with absolutely numbered parameters (`$n` is `args[n - 1]`),
    /// and whether it returns tagged rows.
    statements: Vec<(String, bool)>,
    args: Vec<Value>,
}

impl Batch {
    fn new() -> Self {
        Self {
            statements: Vec::with_capacity(8),
            args: Vec::with_capacity(32),
        }
    }

    /// Adds a parameter and returns its placeholder (`$n`).
    fn param(&mut self, value: impl Into<Value>) -> Result<String, StoreError> {
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
        let batch = build(turn)?;
        let (contact_id, mut outbound_ids, dequeued_ids) = match self {
            Db::Sqlite { writer, .. } => {
                let rows = run_batch(writer, batch).await.map_err(|e| match e {
                    StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, Some(message)))
                        if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_NOTNULL
                            && GUARD_FAILS_ON.iter().any(|m| message.contains(m)) =>
                    {
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
                })?;
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
                let contact_id = contact_id.or(turn.contact_id).ok_or_else(|| {
                    StoreError::Corrupt("the contact upsert returned no id".into())
                })?;
                (contact_id, outbound_ids, dequeued_ids)
            }
            // PostgreSQL's protocol takes one statement per parameterised query: its
            // support (a later release) runs the batch's statements one by one.
            Db::Postgres(_) => return Err(postgres_writes()),
        };
        // One multi-row INSERT: RETURNING order is not promised, ids grow with the rows.
        outbound_ids.sort_unstable();
        Ok(CommittedTurn {
            contact_id,
            outbound_ids,
            dequeued_ids,
        })
    }
}

/// The turn as one SQL batch.
fn build(turn: &TurnWrite<'_>) -> Result<Batch, StoreError> {
    let c = turn.contact;
    let mut b = Batch::new();
    // $1..$9, used throughout.
    b.param(turn.channel.to_string())?;
    b.param(c.wa_id.clone())?;
    b.param(c.name.clone())?;
    b.param(serde_json::to_string(&c.tags)?)?;
    b.param(serde_json::to_string(&c.attrs)?)?;
    b.param(c.timezone.clone())?;
    b.param(c.last_customer_message_at.map(|t| t.timestamp_millis()))?;
    b.param(turn.now.timestamp_millis())?;
    b.param(serde_json::to_string(&c.policy)?)?;

    let contact = match turn.contact_id {
        Some(id) => b.param(id)?,
        None => CONTACT.to_string(),
    };
    let mut inbound_written = false;
    if turn.contact_id.is_some() {
        // A known contact, checked by the turn's first write. With a customer message, that
        // write is the message: a replay fails its unique wamid, and a contact id that no
        // longer names this contact (deleted, or its id reused by another) gives it no
        // contact, which fails NOT NULL.
        if let Some(m) = turn.inbound {
            let checked = format!(
                "(SELECT id FROM contacts WHERE id = {contact} AND channel = $1 AND wa_id = $2)"
            );
            insert_inbound(&mut b, m, &checked)?;
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
    } else {
        // A new contact is written first (or updated, if it appeared meanwhile), and later
        // statements find it by `(channel, wa_id)`; not under an identifier that names
        // another contact (an identity change since the turn resolved it): the same guard
        // as above stops the batch.
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

    match turn.session {
        Some(s) => {
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
        }
        None => b.statement(&format!(
            "DELETE FROM sessions WHERE contact_id = {contact}"
        )),
    }

    // The queue first: flushed messages keep their (lower) ids, so they leave before this
    // turn's new messages.
    for r in turn.dequeued {
        let [kind, body, decision, reason, status, reply_to] =
            outbound_params(&mut b, &r.message, &r.decision, &r.status, &r.in_reply_to)?;
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

    if let Some(m) = turn.inbound.filter(|_| !inbound_written) {
        insert_inbound(&mut b, m, &contact)?;
    }

    if !turn.outbound.is_empty() {
        let mut sql = String::from(
            "INSERT INTO messages (contact_id, channel, direction, wamid, kind, body, decision, \
                reason, status, created_at, in_reply_to, updated_at, expires_at) VALUES ",
        );
        for (i, r) in turn.outbound.iter().enumerate() {
            let [kind, body, decision, reason, status, reply_to] =
                outbound_params(&mut b, &r.message, &r.decision, &r.status, &r.in_reply_to)?;
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
    }

    if let Some(old) = turn.superseded {
        let id = b.param(old.id)?;
        let reason = b.param(old.reason.clone())?;
        b.statement(&format!(
            "UPDATE messages SET decision = 'failed', \
                reason = {reason} || (SELECT MAX(id) FROM messages \
                    WHERE contact_id = {contact} AND direction = 'out'), \
                updated_at = {NOW} \
            WHERE id = {id}"
        ));
    }
    if let Some(id) = turn.fired_timer {
        let id = b.param(id)?;
        b.statement(&format!("DELETE FROM timers WHERE id = {id}"));
    }
    if let Some(timers) = turn.replace_timers {
        b.statement(&format!("DELETE FROM timers WHERE contact_id = {contact}"));
        if !timers.is_empty() {
            let mut sql = String::from(
                "INSERT INTO timers (contact_id, due_at, payload, created_at) VALUES ",
            );
            for (i, t) in timers.iter().enumerate() {
                let due = b.param(t.due_at.timestamp_millis())?;
                let payload = b.param(serde_json::to_string(&t.payload)?)?;
                if i > 0 {
                    sql.push_str(", ");
                }
                let _ = write!(sql, "({contact}, {due}, {payload}, {NOW})");
            }
            b.statement(&sql);
        }
    }
    Ok(b)
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
