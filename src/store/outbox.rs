//! The outbox: outbound rows of `messages` that a sender still has to deliver, and the
//! per-channel stop switch (`channel_state`).
//!
//! A row's life: `pending` (written by [`Db::commit_turn`]) -> `sending` (claimed with a
//! lease, [`Db::claim_outbox`]) -> `sent` with its wamid ([`Db::record_sent`]), `failed`
//! with the reason ([`Db::record_failed`]), or back to `pending` for later
//! ([`Db::record_retry`], [`Db::record_deferred`], [`Db::release_leases`]). Statuses from
//! webhooks (`delivered`, `read`, …) move it on from `sent`; that is the inbox's business.
//!
//! A `sending` row whose lease ran out belongs to a sender that died between claiming it
//! and recording the outcome: it is claimed again, with the same idempotency key (see
//! `crate::outbox` for what that does and does not guarantee).

use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::types::Value;
use serde::Deserialize as _;

use super::db::{Backend, Db};
use super::db::{with_pool, with_writer};
use super::error::StoreError;
use super::sql::{from_millis, placeholders};
use crate::domain::Outbound;

/// One claimed outbound message: what the sender needs to deliver it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: i64,
    pub channel: String,
    pub contact_id: i64,
    /// The contact's WhatsApp id: a phone number, or a business-scoped user id.
    pub wa_id: String,
    /// The stored [`Outbound`], as JSON (read it with [`OutboxRow::outbound`]); kept raw so
    /// one unreadable row fails alone instead of failing the whole claim.
    pub body: serde_json::Value,
    /// The inbound wamid this message answers, if any.
    pub in_reply_to: Option<String>,
    /// Whether no earlier outbound message answers the same inbound message (the one to
    /// precede with mark-as-read and the typing indicator).
    pub first_reply: bool,
    /// Sent as `biz_opaque_callback_data`; the same on every attempt of this row.
    pub idempotency_key: String,
    /// Attempts including this one.
    pub attempts: i64,
    /// The claim is this sender's until then.
    pub lease_until: DateTime<Utc>,
    /// The row was `sending` under an expired lease: a sender died with it in flight, so the
    /// previous attempt may or may not have reached WhatsApp.
    pub reclaimed: bool,
    pub created_at: DateTime<Utc>,
}

impl OutboxRow {
    /// The message to send.
    pub fn outbound(&self) -> Result<Outbound, serde_json::Error> {
        Outbound::deserialize(&self.body)
    }
}

/// The delivery state of one outbound message, for the admin API, logs and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEntry {
    pub id: i64,
    pub wa_id: String,
    /// `pending`, `sending`, `sent`, `delivered`, `read`, `failed`…
    pub status: String,
    pub wamid: Option<String>,
    pub attempts: i64,
    pub next_attempt_at: DateTime<Utc>,
    pub lease_until: Option<DateTime<Utc>>,
    pub lease_owner: Option<String>,
    pub idempotency_key: Option<String>,
    pub in_reply_to: Option<String>,
    pub error_code: Option<i64>,
    pub error: Option<String>,
}

/// Why a channel's sender is stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelStop {
    /// The WhatsApp error code that stopped it, if one did.
    pub code: Option<i64>,
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// Rows that may be claimed at `$2` (now): due pending rows and `sending` rows whose lease
/// ran out, each only if it is its contact's oldest undelivered message (a contact's
/// messages leave in order, one at a time), and only while the channel is not stopped.
/// Every term is served by an index (`messages_outbox_priority`, which holds the unsent
/// rows only, in claim order: conversational before campaign messages, then by id;
/// `messages_unsent_by_contact`), so a claim costs the same however much history there is.
const CLAIMABLE: &str = "m.channel = $1 AND m.direction = 'out' \
    AND m.status IN ('pending', 'sending') \
    AND ((m.status = 'pending' AND m.next_attempt_at <= $2) \
        OR (m.status = 'sending' AND m.lease_until < $2)) \
    AND NOT EXISTS (SELECT 1 FROM messages o \
        WHERE o.contact_id = m.contact_id AND o.direction = 'out' \
            AND o.status IN ('pending', 'sending') AND o.id < m.id) \
    AND NOT EXISTS (SELECT 1 FROM channel_state s \
        WHERE s.channel = $1 AND s.stopped_at IS NOT NULL)";

type ClaimRaw = (
    i64,
    i64,
    Option<String>,
    String,
    Option<String>,
    i64,
    Option<String>,
    i64,
    i64,
);

type EntryRaw = (
    i64,
    String,
    String,
    Option<String>,
    i64,
    i64,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<String>,
);

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The claiming UPDATE for `ids` candidates (`$5`…): [`CLAIMABLE`] checked again, as it
/// stands when the writer runs it.
fn claim_update(ids: usize) -> String {
    format!(
        "UPDATE messages SET status = 'sending', lease_until = $3, lease_owner = $4, \
            attempts = attempts + 1, \
            idempotency_key = COALESCE(idempotency_key, 'fg-' || CAST(id AS TEXT)), \
            updated_at = $2 \
        WHERE id IN ({}) AND channel = $1 AND direction = 'out' \
            AND status IN ('pending', 'sending') \
            AND ((status = 'pending' AND next_attempt_at <= $2) \
                OR (status = 'sending' AND lease_until < $2)) \
            AND NOT EXISTS (SELECT 1 FROM messages o \
                WHERE o.contact_id = messages.contact_id AND o.direction = 'out' \
                    AND o.status IN ('pending', 'sending') AND o.id < messages.id) \
            AND NOT EXISTS (SELECT 1 FROM channel_state s \
                WHERE s.channel = $1 AND s.stopped_at IS NOT NULL) \
        RETURNING id, contact_id, \
            (SELECT c.wa_id FROM contacts c WHERE c.id = messages.contact_id), \
            body, in_reply_to, \
            CAST(CASE WHEN in_reply_to IS NOT NULL AND EXISTS (SELECT 1 FROM messages f \
                WHERE f.contact_id = messages.contact_id AND f.direction = 'out' \
                    AND f.in_reply_to = messages.in_reply_to AND f.id < messages.id) \
                THEN 0 ELSE 1 END AS BIGINT), \
            idempotency_key, attempts, created_at",
        placeholders(5, ids)
    )
}

/// Claimed rows, in claim order, and the candidates' statuses before the claim (a `sending`
/// one is reclaimed).
type Claimed = (Vec<ClaimRaw>, Vec<(i64, String)>);

/// SQLite's claim: a read (on the caller's thread), then the claiming UPDATE as a raw writer job.
async fn claim_sqlite(
    sqlite: &super::db::Sqlite,
    channel: &str,
    now_ms: i64,
    lease_ms: i64,
    limit: i64,
    lease_owner: &str,
) -> Result<Claimed, StoreError> {
    // Two statements, no explicit transaction: a read that takes no lock (and usually
    // finds nothing), then one UPDATE that claims what is still claimable, so the
    // database's write lock is held for one statement only. Another sender may claim a
    // candidate in between, or an older message of its contact may become pending (a
    // flushed queue); the UPDATE checks both again and skips the candidate.
    let select = format!(
        "SELECT m.id, m.status FROM messages m WHERE {CLAIMABLE} \
            ORDER BY m.priority, m.id LIMIT $3"
    );
    let candidates: Vec<(i64, String)> =
        sqlite
            .readers
            .query(&select, &[&channel, &now_ms, &limit], |row| {
                Ok(<(i64, String)>::try_from(row)?)
            })?;
    if candidates.is_empty() {
        return Ok((Vec::new(), candidates));
    }
    let update = claim_update(candidates.len());
    let mut args = vec![
        Value::Text(channel.to_owned()),
        Value::Integer(now_ms),
        Value::Integer(lease_ms),
        Value::Text(lease_owner.to_owned()),
    ];
    args.extend(candidates.iter().map(|(id, _)| Value::Integer(*id)));
    let mut rows: Vec<ClaimRaw> = sqlite.writer.query(update, args).await?;
    // In the candidates' order: conversational first, then by id.
    let order: std::collections::HashMap<i64, usize> = candidates
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (*id, i))
        .collect();
    rows.sort_by_key(|r| order.get(&r.0).copied().unwrap_or(usize::MAX));

    Ok((rows, candidates))
}

/// PostgreSQL's claim, one statement: the claimable rows locked in claim order, skipping
/// rows another sender (in this instance or another) has locked, and claimed, each
/// returned with its status before the claim. A contact's later message is not claimable
/// while an earlier one is unsent, locked or not, so a contact's messages still leave one
/// at a time and in order whichever instance claims them.
async fn claim_postgres(
    pool: &sqlx::PgPool,
    channel: &str,
    now_ms: i64,
    lease_ms: i64,
    limit: i64,
    lease_owner: &str,
) -> Result<Claimed, StoreError> {
    let sql = format!(
        "WITH c AS (SELECT m.id, m.status, m.priority FROM messages m WHERE {CLAIMABLE} \
            ORDER BY m.priority, m.id LIMIT $3 FOR UPDATE OF m SKIP LOCKED) \
        UPDATE messages SET status = 'sending', lease_until = $4, lease_owner = $5, \
            attempts = messages.attempts + 1, \
            idempotency_key = COALESCE(messages.idempotency_key, \
                'fg-' || CAST(messages.id AS TEXT)), \
            updated_at = $2 \
        FROM c WHERE messages.id = c.id \
        RETURNING messages.id, messages.contact_id, \
            (SELECT k.wa_id FROM contacts k WHERE k.id = messages.contact_id), \
            messages.body, messages.in_reply_to, \
            CAST(CASE WHEN messages.in_reply_to IS NOT NULL AND EXISTS (SELECT 1 \
                FROM messages f WHERE f.contact_id = messages.contact_id \
                    AND f.direction = 'out' AND f.in_reply_to = messages.in_reply_to \
                    AND f.id < messages.id) \
                THEN 0 ELSE 1 END AS BIGINT), \
            messages.idempotency_key, messages.attempts, messages.created_at, \
            c.status, c.priority"
    );
    type Row = (
        i64,
        i64,
        Option<String>,
        String,
        Option<String>,
        i64,
        Option<String>,
        i64,
        i64,
        String,
        i64,
    );
    let mut claimed: Vec<Row> = sqlx::query_as(&sql)
        .bind(channel)
        .bind(now_ms)
        .bind(limit)
        .bind(lease_ms)
        .bind(lease_owner)
        .fetch_all(pool)
        .await?;
    claimed.sort_by_key(|r| (r.10, r.0));
    let candidates = claimed.iter().map(|r| (r.0, r.9.clone())).collect();
    let rows = claimed
        .into_iter()
        .map(
            |(id, contact, wa_id, body, reply_to, first, key, attempts, created, _, _)| {
                (
                    id, contact, wa_id, body, reply_to, first, key, attempts, created,
                )
            },
        )
        .collect();
    Ok((rows, candidates))
}

impl Db {
    /// Claims up to `limit` rows of `channel` for `lease_owner` until `now + lease_for`,
    /// conversational messages before campaign messages (`priority`), each in id order: each becomes `sending`, its attempts go up by one and it gets an idempotency
    /// key (`fg-{id}`) if it had none. Two senders never claim one row: the claiming UPDATE
    /// checks each row is still claimable.
    pub async fn claim_outbox(
        &self,
        channel: &str,
        now: DateTime<Utc>,
        limit: i64,
        lease_owner: &str,
        lease_for: Duration,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        if limit <= 0 {
            return Ok(Vec::new());
        }
        let now_ms = now.timestamp_millis();
        let lease_ms = now_ms.saturating_add(millis(lease_for));
        let (rows, candidates) = match &self.backend {
            Backend::Sqlite(sqlite) => {
                claim_sqlite(sqlite, channel, now_ms, lease_ms, limit, lease_owner).await?
            }
            Backend::Postgres(postgres) => {
                claim_postgres(
                    &postgres.pool,
                    channel,
                    now_ms,
                    lease_ms,
                    limit,
                    lease_owner,
                )
                .await?
            }
        };
        let lease_until = from_millis(lease_ms, "messages.lease_until")?;
        rows.into_iter()
            .map(
                |(id, contact_id, wa_id, body, in_reply_to, first, key, attempts, created)| {
                    let reclaimed = candidates
                        .iter()
                        .any(|(c, status)| *c == id && status == "sending");
                    Ok(OutboxRow {
                        id,
                        channel: channel.to_string(),
                        contact_id,
                        wa_id: wa_id.unwrap_or_default(),
                        // Unreadable JSON fails this row when it is sent, not the claim.
                        body: serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
                        in_reply_to,
                        first_reply: first != 0,
                        idempotency_key: key.unwrap_or_else(|| format!("fg-{id}")),
                        attempts,
                        lease_until,
                        reclaimed,
                        created_at: from_millis(created, "messages.created_at")?,
                    })
                },
            )
            .collect()
    }

    /// WhatsApp accepted message `id` as `wamid`: the row is `sent` and its lease ends, in
    /// one statement. Recorded whoever holds the lease (an accepted send is a fact), and a
    /// status that already moved on (a webhook matched the row first) is kept. Returns
    /// whether the row exists.
    pub async fn record_sent(
        &self,
        id: i64,
        wamid: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE messages SET wamid = COALESCE(wamid, $2), \
                status = CASE WHEN status IN ('pending', 'sending') THEN 'sent' ELSE status END, \
                lease_until = NULL, lease_owner = NULL, error_code = NULL, error = NULL, \
                updated_at = $3 \
            WHERE id = $1 AND direction = 'out'";
        let done = with_writer!(self, own(wamid), |pool| {
            sqlx::query(SQL)
                .bind(id)
                .bind(wamid)
                .bind(now.timestamp_millis())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(done > 0)
    }

    /// [`Db::record_sent`] for many messages in one statement (a sender's group commit);
    /// returns the ids that exist.
    pub async fn record_sent_many(
        &self,
        sent: &[(i64, &str)],
        now: DateTime<Utc>,
    ) -> Result<Vec<i64>, StoreError> {
        let sqlite = match &self.backend {
            Backend::Sqlite(sqlite) => sqlite,
            Backend::Postgres(postgres) => {
                return record_sent_postgres(&postgres.pool, sent, now).await;
            }
        };
        let mut done = Vec::with_capacity(sent.len());
        // Two parameters per row; SQLite allows 32,766.
        for chunk in sent.chunks(1000) {
            let cases: String = (0..chunk.len())
                .map(|i| format!(" WHEN ${} THEN ${}", 2 + 2 * i, 3 + 2 * i))
                .collect();
            let ids = (0..chunk.len())
                .map(|i| format!("${}", 2 + 2 * i))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "UPDATE messages SET wamid = COALESCE(wamid, CASE id{cases} END), \
                    status = CASE WHEN status IN ('pending', 'sending') THEN 'sent' \
                        ELSE status END, \
                    lease_until = NULL, lease_owner = NULL, error_code = NULL, error = NULL, \
                    updated_at = $1 \
                WHERE direction = 'out' AND id IN ({ids}) \
                RETURNING id"
            );
            let mut args = Vec::with_capacity(1 + 2 * chunk.len());
            args.push(Value::Integer(now.timestamp_millis()));
            for (id, wamid) in chunk {
                args.push(Value::Integer(*id));
                args.push(Value::Text((*wamid).to_owned()));
            }
            let ids = sqlite
                .writer
                .query::<(i64,)>(sql, args)
                .await?
                .into_iter()
                .map(|(id,)| id);
            done.extend(ids);
        }
        Ok(done)
    }

    /// The attempt failed and counts: back to `pending`, not before `not_before`, with the
    /// error. Only the lease holder can do this; returns whether it did.
    pub async fn record_retry(
        &self,
        id: i64,
        lease_owner: &str,
        not_before: DateTime<Utc>,
        code: Option<i64>,
        error: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE messages SET status = 'pending', next_attempt_at = $3, \
                lease_until = NULL, lease_owner = NULL, error_code = $4, error = $5, \
                updated_at = $6 \
            WHERE id = $1 AND status = 'sending' AND lease_owner = $2";
        let done = with_writer!(self, own(lease_owner, error), |pool| {
            sqlx::query(SQL)
                .bind(id)
                .bind(lease_owner)
                .bind(not_before.timestamp_millis())
                .bind(code)
                .bind(error)
                .bind(now.timestamp_millis())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(done > 0)
    }

    /// Not now, and not the message's fault (pacing, a rate limit, a stopped channel): back
    /// to `pending`, not before `not_before`, and the attempt is given back so it does not
    /// count against the message's retry cap. `error` (with `code`) replaces the last error
    /// when given. Only the lease holder can do this; returns whether it did.
    pub async fn record_deferred(
        &self,
        id: i64,
        lease_owner: &str,
        not_before: DateTime<Utc>,
        error: Option<(Option<i64>, &str)>,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE messages SET status = 'pending', next_attempt_at = $3, \
                lease_until = NULL, lease_owner = NULL, \
                attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, \
                error_code = CASE WHEN $4 = 1 THEN $5 ELSE error_code END, \
                error = CASE WHEN $4 = 1 THEN $6 ELSE error END, \
                updated_at = $7 \
            WHERE id = $1 AND status = 'sending' AND lease_owner = $2";
        let (replace, code, text) = match error {
            Some((code, text)) => (1i64, code, Some(text.to_owned())),
            None => (0, None, None),
        };
        let done = with_writer!(self, own(lease_owner), |pool| {
            sqlx::query(SQL)
                .bind(id)
                .bind(lease_owner)
                .bind(not_before.timestamp_millis())
                .bind(replace)
                .bind(code)
                .bind(text)
                .bind(now.timestamp_millis())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(done > 0)
    }

    /// Message `id` will not be sent: `failed`, with the WhatsApp code (if any) and the
    /// reason. Only the lease holder can do this; returns whether it did.
    pub async fn record_failed(
        &self,
        id: i64,
        lease_owner: &str,
        code: Option<i64>,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE messages SET status = 'failed', lease_until = NULL, \
                lease_owner = NULL, error_code = $3, error = $4, updated_at = $5 \
            WHERE id = $1 AND status = 'sending' AND lease_owner = $2";
        let done = with_writer!(self, own(lease_owner, reason), |pool| {
            sqlx::query(SQL)
                .bind(id)
                .bind(lease_owner)
                .bind(code)
                .bind(reason)
                .bind(now.timestamp_millis())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(done > 0)
    }

    /// Gives back every row `lease_owner` still holds (claimed, never sent: a sender shutting
    /// down after its in-flight sends finished): `pending` again, due at once, the attempt
    /// given back. Returns how many.
    pub async fn release_leases(
        &self,
        lease_owner: &str,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        Ok(with_writer!(self, own(lease_owner), |pool| {
            sqlx::query(RELEASE_LEASES)
                .bind(lease_owner)
                .bind(now.timestamp_millis())
                .execute(pool)
                .await?
                .rows_affected()
        }))
    }

    /// Outbound messages of `channel` not yet accepted by WhatsApp (`pending` or `sending`).
    pub async fn outbox_depth(&self, channel: &str) -> Result<i64, StoreError> {
        const SQL: &str = "SELECT COUNT(*) FROM messages \
            WHERE channel = $1 AND direction = 'out' AND status IN ('pending', 'sending')";
        Ok(with_pool!(self, |pool| {
            sqlx::query_scalar(SQL)
                .bind(channel)
                .fetch_one(pool)
                .await?
        }))
    }

    /// The delivery state of `channel`'s outbound messages, oldest first, at most `limit`.
    pub async fn outbox_entries(
        &self,
        channel: &str,
        limit: i64,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        const SQL: &str = "SELECT m.id, c.wa_id, m.status, m.wamid, m.attempts, \
                m.next_attempt_at, m.lease_until, m.lease_owner, m.idempotency_key, \
                m.in_reply_to, m.error_code, m.error \
            FROM messages m JOIN contacts c ON c.id = m.contact_id \
            WHERE m.channel = $1 AND m.direction = 'out' \
            ORDER BY m.id LIMIT $2";
        let rows: Vec<EntryRaw> = with_pool!(self, |pool| {
            sqlx::query_as(SQL)
                .bind(channel)
                .bind(limit.max(0))
                .fetch_all(pool)
                .await?
        });
        rows.into_iter()
            .map(
                |(
                    id,
                    wa_id,
                    status,
                    wamid,
                    attempts,
                    next,
                    lease,
                    owner,
                    key,
                    reply,
                    code,
                    error,
                )| {
                    Ok(OutboxEntry {
                        id,
                        wa_id,
                        status,
                        wamid,
                        attempts,
                        next_attempt_at: from_millis(next, "messages.next_attempt_at")?,
                        lease_until: lease
                            .map(|ms| from_millis(ms, "messages.lease_until"))
                            .transpose()?,
                        lease_owner: owner,
                        idempotency_key: key,
                        in_reply_to: reply,
                        error_code: code,
                        error,
                    })
                },
            )
            .collect()
    }

    /// Stops `channel`'s sender (an account-level error) until [`Db::resume_channel`]:
    /// nothing of the channel is claimed meanwhile. In the same transaction every campaign
    /// on the channel is paused with the reason: a campaign must not start sending again
    /// when an operator resumes the channel, a marketer resumes it on purpose (WhatsApp's
    /// 131048 is about the number's marketing, and the next run would meet it again).
    pub async fn stop_channel(
        &self,
        channel: &str,
        code: Option<i64>,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        const STOP: &str = "INSERT INTO channel_state (channel, stopped_reason, stopped_code, \
                stopped_at, updated_at) \
            VALUES ($1, $2, $3, $4, $4) \
            ON CONFLICT (channel) DO UPDATE SET stopped_reason = excluded.stopped_reason, \
                stopped_code = excluded.stopped_code, stopped_at = excluded.stopped_at, \
                updated_at = excluded.updated_at";
        const PAUSE: &str = "UPDATE campaigns SET paused = 1, pause_reason = $2, updated_at = $3 \
            WHERE channel = $1 AND paused = 0";
        let pause_reason = format!(
            "the channel `{channel}` stopped on an account-level WhatsApp error ({reason}); \
             resume the campaign once the channel sends again"
        );
        let now = now.timestamp_millis();
        with_writer!(self, own(channel, reason, pause_reason), |pool| {
            let mut tx = sqlx::Connection::begin(&mut *pool).await?;
            sqlx::query(STOP)
                .bind(&channel)
                .bind(&reason)
                .bind(code)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            sqlx::query(PAUSE)
                .bind(&channel)
                .bind(&pause_reason)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Why `channel` is stopped, or `None` if it is not.
    pub async fn channel_stopped(&self, channel: &str) -> Result<Option<ChannelStop>, StoreError> {
        const SQL: &str = "SELECT stopped_code, stopped_reason, stopped_at FROM channel_state \
            WHERE channel = $1 AND stopped_at IS NOT NULL";
        let row: Option<(Option<i64>, Option<String>, i64)> = with_pool!(self, |pool| {
            sqlx::query_as(SQL)
                .bind(channel)
                .fetch_optional(pool)
                .await?
        });
        row.map(|(code, reason, at)| {
            Ok(ChannelStop {
                code,
                reason: reason.unwrap_or_default(),
                at: from_millis(at, "channel_state.stopped_at")?,
            })
        })
        .transpose()
    }

    /// Lets `channel`'s sender go again; returns whether it was stopped.
    pub async fn resume_channel(
        &self,
        channel: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE channel_state SET stopped_reason = NULL, stopped_code = NULL, \
                stopped_at = NULL, updated_at = $2 \
            WHERE channel = $1 AND stopped_at IS NOT NULL";
        let done = with_writer!(self, own(channel), |pool| {
            sqlx::query(SQL)
                .bind(channel)
                .bind(now.timestamp_millis())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(done > 0)
    }
}

/// [`Db::record_sent_many`] on PostgreSQL: one statement, the ids and wamids as two array
/// parameters.
async fn record_sent_postgres(
    pool: &sqlx::PgPool,
    sent: &[(i64, &str)],
    now: DateTime<Utc>,
) -> Result<Vec<i64>, StoreError> {
    const SQL: &str = "UPDATE messages SET wamid = COALESCE(messages.wamid, u.wamid), \
            status = CASE WHEN messages.status IN ('pending', 'sending') THEN 'sent' \
                ELSE messages.status END, \
            lease_until = NULL, lease_owner = NULL, error_code = NULL, error = NULL, \
            updated_at = $1 \
        FROM UNNEST($2::bigint[], $3::text[]) AS u (id, wamid) \
        WHERE messages.direction = 'out' AND messages.id = u.id \
        RETURNING messages.id";
    let ids: Vec<i64> = sent.iter().map(|(id, _)| *id).collect();
    let wamids: Vec<&str> = sent.iter().map(|(_, wamid)| *wamid).collect();
    Ok(sqlx::query_scalar(SQL)
        .bind(now.timestamp_millis())
        .bind(ids)
        .bind(wamids)
        .fetch_all(pool)
        .await?)
}

/// `release_leases`: the terms of the partial index of unsent rows written out (SQLite uses a
/// partial index only when the query repeats its terms), so that a shutdown reads the unsent
/// rows, not the whole history (on three million messages the bare `status = 'sending'`
/// took ten seconds).
const RELEASE_LEASES: &str = "UPDATE messages SET status = 'pending', lease_until = NULL, \
        lease_owner = NULL, attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, \
        updated_at = $2 \
    WHERE direction = 'out' AND status IN ('pending', 'sending') \
        AND status = 'sending' AND lease_owner = $1";

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The plan SQLite picks for `sql`, one line per step.
    pub(in crate::store) async fn plan(db: &Db, sql: &str) -> String {
        let Backend::Sqlite(sqlite) = &db.backend else {
            unreachable!("a SQLite test")
        };
        let rows: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(&format!("EXPLAIN QUERY PLAN {sql}"))
                .fetch_all(&sqlite.pool)
                .await
                .unwrap();
        rows.into_iter().map(|r| r.3).collect::<Vec<_>>().join("\n")
    }

    /// The claim must not read a contact's whole history (or the channel's) on every call:
    /// under load that made every claim slower than the last.
    #[tokio::test]
    async fn claiming_reads_only_unsent_rows() {
        let db = Db::connect("sqlite::memory:").await.unwrap();
        db.migrate().await.unwrap();
        let select = plan(
            &db,
            &format!(
                "SELECT m.id, m.status FROM messages m WHERE {CLAIMABLE} \
                ORDER BY m.priority, m.id"
            ),
        )
        .await;
        // The unsent rows of the channel, already in claim order: no sort.
        assert!(
            select.contains("messages_outbox_priority (channel=?)"),
            "{select}"
        );
        assert!(!select.contains("TEMP B-TREE"), "{select}");
        assert!(
            select.contains("messages_unsent_by_contact (contact_id=? AND id<?)"),
            "{select}"
        );
        let update = plan(&db, &claim_update(2)).await;
        assert!(
            update.contains("messages_unsent_by_contact (contact_id=? AND id<?)"),
            "{update}"
        );
        assert!(
            update.contains("messages_replies (in_reply_to=? AND contact_id=? AND id<?)"),
            "{update}"
        );
        assert!(!update.contains("messages_by_contact"), "{update}");
    }

    /// A sender shutting down gives back its claims without reading the whole history.
    #[tokio::test]
    async fn releasing_claims_reads_only_unsent_rows() {
        let db = Db::connect("sqlite::memory:").await.unwrap();
        db.migrate().await.unwrap();
        let release = plan(&db, RELEASE_LEASES).await;
        assert!(
            release.contains("USING INDEX messages_unsent_by_contact")
                || release.contains("USING INDEX messages_outbox_priority"),
            "{release}"
        );
    }

    /// Two instances' senders claim one channel's outbox on PostgreSQL at once, each
    /// recording its sends: every message is claimed once, and a contact's messages are
    /// claimed one at a time in order (never while an earlier one is unsent), whichever
    /// instance claims them.
    #[tokio::test]
    async fn two_instances_claim_each_message_once_in_each_contacts_order() {
        use crate::domain::{Contact, Decision, OutboundContent};
        use crate::store::conformance::{
            CH, bare_turn, drop_schema, postgres_db, postgres_db_on, said, t,
        };
        use crate::store::{OutboundRecord, TurnWrite};
        let Some((db, schema)) = postgres_db().await else {
            return;
        };
        let mut contacts = Vec::new();
        for c in 0..20 {
            let contact = Contact::new(format!("{}", 1000 + c));
            let out: Vec<OutboundRecord> = (0..4)
                .map(|i| OutboundRecord {
                    status: "pending".into(),
                    ..said(
                        OutboundContent::text(format!("{c}-{i}")),
                        Decision::Send {
                            reason: "window open".into(),
                        },
                    )
                })
                .collect();
            let turn = db
                .commit_turn(&TurnWrite {
                    outbound: &out,
                    ..bare_turn(None, &contact, t(0))
                })
                .await
                .unwrap();
            contacts.push((turn.contact_id, turn.outbound_ids));
        }
        let other = postgres_db_on(&schema).await;
        let sender = |db: Db, owner: &'static str| {
            tokio::spawn(async move {
                let mut claimed = Vec::new();
                for _ in 0..200 {
                    let rows = db
                        .claim_outbox(CH, t(1), 7, owner, Duration::from_secs(60))
                        .await
                        .unwrap();
                    if rows.is_empty() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    let sent: Vec<(i64, String)> = rows
                        .iter()
                        .map(|r| (r.id, format!("wamid.{}", r.id)))
                        .collect();
                    for row in &rows {
                        // Nothing earlier of this contact is unsent when it is claimed.
                        let unsent: i64 = with_pool!(db, |pool| sqlx::query_scalar(
                            "SELECT COUNT(*) FROM messages WHERE contact_id = $1 \
                                AND direction = 'out' AND status IN ('pending', 'sending') \
                                AND id < $2"
                        )
                        .bind(row.contact_id)
                        .bind(row.id)
                        .fetch_one(pool)
                        .await
                        .unwrap());
                        assert_eq!(unsent, 0, "message {} claimed out of order", row.id);
                    }
                    let pairs: Vec<(i64, &str)> =
                        sent.iter().map(|(id, w)| (*id, w.as_str())).collect();
                    db.record_sent_many(&pairs, t(1)).await.unwrap();
                    claimed.extend(rows.iter().map(|r| (r.contact_id, r.id)));
                }
                claimed
            })
        };
        let (a, b) = (sender(db.clone(), "a"), sender(other.clone(), "b"));
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        assert!(!a.is_empty() && !b.is_empty(), "both instances sent");
        let mut all: Vec<(i64, i64)> = a.into_iter().chain(b).collect();
        let claims = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(claims, all.len(), "a message was claimed twice");
        let expected: Vec<(i64, i64)> = contacts
            .iter()
            .flat_map(|(c, ids)| ids.iter().map(move |id| (*c, *id)))
            .collect();
        assert_eq!(all, expected, "every message claimed");
        other.close().await;
        drop_schema(&db, &schema).await;
    }
}

// The admin API's reads: outbound messages a page at a time.

/// Which outbound messages [`Db::outbound_page`] lists: ids above `after`, in id order, at
/// most `limit`, of the channel and in the status given.
#[derive(Debug, Clone, Default)]
pub struct OutboundFilter {
    pub channel: Option<String>,
    /// `pending`, `sending`, `sent`, `delivered`, `read`, `failed`, `queued`, `skipped`…
    pub status: Option<String>,
    pub after: i64,
    pub limit: i64,
}

impl Db {
    /// A page of outbound messages by `filter`, each with its decision, reason, status and
    /// error.
    pub async fn outbound_page(
        &self,
        filter: &OutboundFilter,
    ) -> Result<Vec<super::MessageDetail>, StoreError> {
        use super::conversations::{DETAIL_COLUMNS, DetailRow};
        let sql = format!(
            "SELECT {DETAIL_COLUMNS} FROM messages m JOIN contacts c ON c.id = m.contact_id \
            WHERE m.direction = 'out' AND m.id > $1 \
                AND (CAST($3 AS TEXT) IS NULL OR m.channel = $3) \
                AND (CAST($4 AS TEXT) IS NULL OR m.status = $4) \
            ORDER BY m.id LIMIT $2"
        );
        let rows: Vec<DetailRow> = with_pool!(self, |pool| {
            sqlx::query_as(&sql)
                .bind(filter.after)
                .bind(filter.limit.max(0))
                .bind(filter.channel.as_deref())
                .bind(filter.status.as_deref())
                .fetch_all(pool)
                .await?
        });
        rows.into_iter().map(DetailRow::detail).collect()
    }
}
