//! [`Db::commit_turn`]: everything one engine turn changes, in one transaction.
//!
//! The turn's statements (contact, session, the queue, the inbound and outbound messages,
//! timers) are written as one SQL batch with absolutely numbered parameters (`$1`, `$2`, …
//! shared by every statement), and SQLite runs the whole batch, inside a savepoint, in one
//! call on the writer's connection. A statement at a time would cost a thread hand-off
//! each, and the writer connection is the one place every turn waits for (see [`Db`]).
//! Statements after the first find the contact by `(channel, wa_id)`, so a contact created
//! by this very turn needs no round trip for its id.
//!
//! Rows come back tagged: `(0, contact id)`, `(1, outbound id)`, `(2, dequeued id)`.

use std::fmt::Write as _;

use sqlx::Arguments as _;
use sqlx::sqlite::SqliteArguments;

use super::{CommittedTurn, Db, RECEIVED, StoreError, Turn, Writer, outbound_kind};

/// The contact the turn is about, for every statement after the upsert.
const CONTACT: &str = "(SELECT id FROM contacts WHERE channel = $1 AND wa_id = $2)";

/// What the stale-contact guard's error says (see [`build`]).
const GUARD_FAILS_ON: &str = "contacts.channel";

/// Runs a turn's batch as one job on the writer, inside a savepoint of its own: alone it
/// is the turn's transaction, in a group commit it keeps a failing turn from leaving half
/// its statements in the group. A batch that fails stops at the failing statement and is
/// rolled back to the savepoint; if even that fails, the error says so and the writer
/// treats its connection as broken.
async fn run_batch(writer: &Writer, batch: Batch) -> Result<Vec<(i64, i64)>, StoreError> {
    let sql = format!("SAVEPOINT turn;\n{}RELEASE turn;", batch.sql);
    let args = batch.args;
    writer
        .run(move |conn| {
            Box::pin(async move {
                let result = sqlx::query_as_with(&sql, args).fetch_all(&mut *conn).await;
                if result.is_err()
                    && let Err(e) = sqlx::query("ROLLBACK TO turn; RELEASE turn;")
                        .execute(&mut *conn)
                        .await
                {
                    return Err(StoreError::Database(e));
                }
                Ok(result?)
            })
        })
        .await
}

/// A growing SQL batch and its parameters.
struct Batch {
    sql: String,
    args: SqliteArguments<'static>,
    count: usize,
}

impl Batch {
    fn new() -> Self {
        Self {
            sql: String::with_capacity(2048),
            args: SqliteArguments::default(),
            count: 0,
        }
    }

    /// Adds a parameter and returns its placeholder (`$n`).
    fn param<T>(&mut self, value: T) -> Result<String, StoreError>
    where
        T: sqlx::Encode<'static, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite> + 'static,
    {
        self.args
            .add(value)
            .map_err(|e| StoreError::Corrupt(format!("a value does not bind: {e}")))?;
        self.count += 1;
        Ok(format!("${}", self.count))
    }

    fn statement(&mut self, sql: &str) {
        self.sql.push_str(sql);
        self.sql.push_str(";\n");
    }
}

impl Db {
    /// Commits one engine turn in one transaction: the contact, the session, the inbound and
    /// outbound messages, the queue and the timers are all written or, on any error, none
    /// of them.
    pub async fn commit_turn(&self, turn: &Turn<'_>) -> Result<CommittedTurn, StoreError> {
        let batch = build(turn)?;
        let (contact_id, mut outbound_ids, dequeued_ids) = match self {
            Db::Sqlite { writer, .. } => {
                let rows = run_batch(writer, batch).await.map_err(|e| match e {
                    // The guard's NOT NULL failure: the contact id the caller loaded is gone.
                    StoreError::Database(sqlx::Error::Database(db))
                        if db.message().contains(GUARD_FAILS_ON) =>
                    {
                        StoreError::UnknownContact {
                            id: turn.contact_id.unwrap_or_default(),
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
                let contact_id = contact_id.ok_or_else(|| {
                    StoreError::Corrupt("the contact upsert returned no id".into())
                })?;
                (contact_id, outbound_ids, dequeued_ids)
            }
            // PostgreSQL's protocol takes one statement per parameterised query: its
            // support (a later release) runs the batch's statements one by one.
            Db::Postgres(_) => {
                return Err(StoreError::Unsupported(
                    "PostgreSQL turns arrive with its migrations".into(),
                ));
            }
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
fn build(turn: &Turn<'_>) -> Result<Batch, StoreError> {
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
    const NOW: &str = "$8";

    // The contact the caller loaded must still be this row: if it is gone, the guard inserts
    // a row without a channel, whose NOT NULL failure stops the batch (SQLite has no RAISE
    // outside triggers).
    if let Some(id) = turn.contact_id {
        let id = b.param(id)?;
        b.statement(&format!(
            "INSERT INTO contacts (channel, wa_id, created_at, updated_at) \
            SELECT NULL, NULL, 0, 0 WHERE NOT EXISTS (SELECT 1 FROM contacts \
                WHERE id = {id} AND channel = $1 AND wa_id = $2)"
        ));
    }
    b.statement(
        "INSERT INTO contacts (channel, wa_id, name, tags, attrs, timezone, \
            last_customer_message_at, created_at, updated_at, policy) \
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9) \
        ON CONFLICT (channel, wa_id) DO UPDATE SET name = excluded.name, \
            tags = excluded.tags, attrs = excluded.attrs, timezone = excluded.timezone, \
            last_customer_message_at = excluded.last_customer_message_at, \
            updated_at = excluded.updated_at, policy = excluded.policy \
        RETURNING 0, id",
    );

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
                VALUES ({CONTACT}, {flow}, {version}, {step}, {state}, {at}) \
                ON CONFLICT (contact_id) DO UPDATE SET flow_id = excluded.flow_id, \
                    flow_version = excluded.flow_version, step = excluded.step, \
                    state = excluded.state, updated_at = excluded.updated_at"
            ));
        }
        None => b.statement(&format!(
            "DELETE FROM sessions WHERE contact_id = {CONTACT}"
        )),
    }

    // The queue first: flushed messages keep their (lower) ids, so they leave before this
    // turn's new messages.
    for r in turn.dequeued {
        let kind = b.param(outbound_kind(&r.message.content).to_string())?;
        let body = b.param(serde_json::to_string(&r.message)?)?;
        let decision = b.param(r.decision.name().to_string())?;
        let reason = b.param(r.decision.reason().to_string())?;
        let status = b.param(r.status.clone())?;
        let reply_to = b.param(r.in_reply_to.clone())?;
        let id = b.param(r.id)?;
        b.statement(&format!(
            "UPDATE messages SET kind = {kind}, body = {body}, decision = {decision}, \
                reason = {reason}, status = {status}, \
                in_reply_to = COALESCE({reply_to}, in_reply_to), \
                expires_at = CASE WHEN {status} = 'queued' THEN expires_at END, \
                updated_at = {NOW} \
            WHERE id = {id} AND contact_id = {CONTACT} AND status = 'queued' \
            RETURNING 2, id"
        ));
    }

    if let Some(m) = turn.inbound {
        let wamid = b.param(m.id.clone())?;
        let kind = b.param(m.content.kind().to_string())?;
        let body = b.param(serde_json::to_string(m)?)?;
        b.statement(&format!(
            "INSERT INTO messages (contact_id, channel, direction, wamid, kind, body, decision, \
                reason, status, created_at) \
            VALUES ({CONTACT}, $1, 'in', {wamid}, {kind}, {body}, NULL, NULL, '{RECEIVED}', {NOW})"
        ));
    }

    if !turn.outbound.is_empty() {
        let mut sql = String::from(
            "INSERT INTO messages (contact_id, channel, direction, wamid, kind, body, decision, \
                reason, status, created_at, in_reply_to, updated_at, expires_at) VALUES ",
        );
        for (i, r) in turn.outbound.iter().enumerate() {
            let kind = b.param(outbound_kind(&r.message.content).to_string())?;
            let body = b.param(serde_json::to_string(&r.message)?)?;
            let decision = b.param(r.decision.name().to_string())?;
            let reason = b.param(r.decision.reason().to_string())?;
            let status = b.param(r.status.clone())?;
            let reply_to = b.param(r.in_reply_to.clone())?;
            let expires = b.param(r.expires_at.map(|t| t.timestamp_millis()))?;
            if i > 0 {
                sql.push_str(", ");
            }
            let _ = write!(
                sql,
                "({CONTACT}, $1, 'out', NULL, {kind}, {body}, {decision}, {reason}, {status}, \
                    {NOW}, {reply_to}, {NOW}, {expires})"
            );
        }
        sql.push_str(" RETURNING 1, id");
        b.statement(&sql);
    }

    if let Some(old) = turn.superseded {
        let id = b.param(old.id)?;
        let reason = b.param(old.reason.clone())?;
        b.statement(&format!(
            "UPDATE messages SET decision = 'failed', \
                reason = {reason} || (SELECT MAX(id) FROM messages \
                    WHERE contact_id = {CONTACT} AND direction = 'out'), \
                updated_at = {NOW} \
            WHERE id = {id}"
        ));
    }
    if let Some(id) = turn.fired_timer {
        let id = b.param(id)?;
        b.statement(&format!("DELETE FROM timers WHERE id = {id}"));
    }
    if let Some(timers) = turn.replace_timers {
        b.statement(&format!("DELETE FROM timers WHERE contact_id = {CONTACT}"));
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
                let _ = write!(sql, "({CONTACT}, {due}, {payload}, {NOW})");
            }
            b.statement(&sql);
        }
    }
    Ok(b)
}
