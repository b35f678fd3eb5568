//! Contact leases (`contact_leases`): which instance may run a contact's turns when several
//! share one database (PostgreSQL).
//!
//! A lease names a contact by its channel and the inbox's `contact_key` (the phone, else the
//! BSUID; a timer's contact by its `wa_id`, the same text), or `#` and the row id for an
//! update that is not part of a conversation: a status, an error, a template's status
//! ([`inbox_lease_key!`], [`LeaseKey::of_inbox_row`]). An instance takes a lease only when it is
//! free, expired or already its own ([`Db::take_inbox_leases`], [`Db::take_contact_lease`]), keeps it
//! alive while it works ([`Db::renew_contact_leases`]) and gives it back when the contact has nothing
//! left for it to do ([`Db::release_contact_leases`]); an instance that dies loses its leases when
//! they expire. The rules that use them are `dispatch::ownership`'s.

use chrono::{DateTime, Utc};

use super::db::{Backend, Db, with_pool, with_writer};
use super::error::StoreError;

/// The lease key of inbox row `i` in SQL: its contact for the kinds of a conversation
/// (`inbox::ORDERED_KINDS`), else `#` and its id (see [`LeaseKey::of_inbox_row`]).
macro_rules! inbox_lease_key {
    () => {
        "(CASE WHEN i.contact_key IS NOT NULL \
            AND i.kind IN ('message', 'system', 'user_preference') \
            THEN i.contact_key ELSE '#' || CAST(i.id AS TEXT) END)"
    };
}
pub(super) use inbox_lease_key;

/// A contact as a lease names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseKey {
    pub channel: String,
    /// The inbox's `contact_key` (a timer's contact's `wa_id`), or `#` and an inbox row id.
    pub key: String,
}

impl LeaseKey {
    pub fn new(channel: impl Into<String>, key: impl Into<String>) -> Self {
        Self {
            channel: channel.into(),
            key: key.into(),
        }
    }

    /// The lease an inbox row runs under: its contact's for a row of the conversation
    /// (`ORDERED_KINDS`: messages, identity changes, preferences), else one of its own.
    ///
    /// A status has a lease of its own, not its contact's: it only moves a message forward,
    /// in any order, and it is what settles a send a dead instance made (`sending` under
    /// the outbox's lease until its status comes). Under the contact's lease it would wait
    /// for the dead instance's contact leases to expire, and an outbox lease shorter than
    /// that would send the message again.
    pub fn of_inbox_row(row: &super::InboxRow) -> Self {
        match &row.contact_key {
            Some(contact) if super::ORDERED_KINDS.contains(&row.kind.as_str()) => {
                Self::new(&row.channel, contact)
            }
            _ => Self::new(&row.channel, format!("#{}", row.id)),
        }
    }
}

// A lease as the statements that take or renew leases return it (`RETURNING channel,
// contact_key`), on either backend.
super::sql::from_row_on_every_backend!(LeaseKey, |row| {
    Ok(Self {
        channel: row.try_get("channel")?,
        key: row.try_get("contact_key")?,
    })
});

/// One statement that writes: on SQLite a job on the writer, on PostgreSQL the pool (one
/// statement commits alone, so no transaction round trips around it).
macro_rules! one_write {
    ($db:expr, own($($owned:ident),*), |$pool:ident| $body:expr) => {{
        match &$db.backend {
            Backend::Sqlite(_) => with_writer!($db, own($($owned),*), |$pool| $body),
            Backend::Postgres(postgres) => {
                let $pool = &postgres.pool;
                $body
            }
        }
    }};
}

impl Db {
    /// Takes (or keeps) the leases of the contacts with inbox rows due at `now` that a claim
    /// would return, at most `limit` contacts, oldest row first, leaving out contacts another
    /// instance holds (so `limit` counts only contacts this one can have); a lease is taken
    /// only when nobody holds it, its holder's time ran out, or `owner` holds it already. Every lease
    /// taken or kept lasts until `until`. Returns the leases `owner` now holds among them.
    pub async fn take_inbox_leases(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<LeaseKey>, StoreError> {
        // Sorted by key, so two instances taking overlapping sets lock them in one order.
        const SQL: &str = concat!(
            "INSERT INTO contact_leases (channel, contact_key, owner, lease_until) \
             SELECT w.channel, w.lease_key, $3, $4 FROM ( \
               SELECT i.channel, ",
            inbox_lease_key!(),
            " AS lease_key, MIN(i.id) AS first \
               FROM inbox i \
               WHERE i.processed_at IS NULL AND i.next_attempt_at <= $1 \
                 AND NOT EXISTS (SELECT 1 FROM contact_leases h \
                   WHERE h.channel = i.channel AND h.contact_key = ",
            inbox_lease_key!(),
            " AND h.owner <> $3 AND h.lease_until >= $1) AND ",
            super::inbox::not_behind_a_retry!(),
            " GROUP BY i.channel, ",
            inbox_lease_key!(),
            " ORDER BY first LIMIT $2) w \
             WHERE true \
             ORDER BY w.channel, w.lease_key \
             ON CONFLICT (channel, contact_key) DO UPDATE \
               SET owner = excluded.owner, lease_until = excluded.lease_until \
               WHERE contact_leases.owner = excluded.owner \
                  OR contact_leases.lease_until < $1 \
             RETURNING channel, contact_key"
        );
        let now = now.timestamp_millis();
        let until = until.timestamp_millis();
        let leases: Vec<LeaseKey> = one_write!(self, own(owner), |pool| {
            sqlx::query_as(SQL)
                .bind(now)
                .bind(limit.max(0))
                .bind(owner)
                .bind(until)
                .fetch_all(pool)
                .await?
        });
        Ok(leases)
    }

    /// Takes (or keeps) one contact's lease until `until`, as [`Db::take_inbox_leases`] does;
    /// whether `owner` holds it now.
    pub async fn take_contact_lease(
        &self,
        owner: &str,
        lease: &LeaseKey,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "INSERT INTO contact_leases (channel, contact_key, owner, lease_until) \
            VALUES ($1, $2, $3, $4) \
            ON CONFLICT (channel, contact_key) DO UPDATE \
              SET owner = excluded.owner, lease_until = excluded.lease_until \
              WHERE contact_leases.owner = excluded.owner OR contact_leases.lease_until < $5";
        let (channel, key) = (lease.channel.as_str(), lease.key.as_str());
        let (now, until) = (now.timestamp_millis(), until.timestamp_millis());
        let taken = one_write!(self, own(owner, channel, key), |pool| {
            sqlx::query(SQL)
                .bind(channel)
                .bind(key)
                .bind(owner)
                .bind(until)
                .bind(now)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(taken > 0)
    }

    /// Extends every lease `owner` holds to `until` (its heartbeat); returns them.
    pub async fn renew_contact_leases(
        &self,
        owner: &str,
        until: DateTime<Utc>,
    ) -> Result<Vec<LeaseKey>, StoreError> {
        const SQL: &str = "UPDATE contact_leases SET lease_until = $2 WHERE owner = $1 \
            RETURNING channel, contact_key";
        let until = until.timestamp_millis();
        let leases: Vec<LeaseKey> = one_write!(self, own(owner), |pool| {
            sqlx::query_as(SQL)
                .bind(owner)
                .bind(until)
                .fetch_all(pool)
                .await?
        });
        Ok(leases)
    }

    /// Gives back `owner`'s leases of `leases` (another instance's, taken after ours
    /// expired, stay); how many it gave back. On PostgreSQL the delete notifies
    /// `flowgate_leases` in its transaction (migration 0014's trigger), so the other
    /// instances look for the contacts' next updates at once.
    pub async fn release_contact_leases(
        &self,
        owner: &str,
        leases: &[LeaseKey],
    ) -> Result<u64, StoreError> {
        if leases.is_empty() {
            return Ok(0);
        }
        match &self.backend {
            Backend::Postgres(postgres) => {
                const SQL: &str = "DELETE FROM contact_leases l \
                    USING UNNEST($2::text[], $3::text[]) AS r (channel, contact_key) \
                    WHERE l.owner = $1 AND l.channel = r.channel \
                      AND l.contact_key = r.contact_key";
                let channels: Vec<&str> = leases.iter().map(|l| l.channel.as_str()).collect();
                let keys: Vec<&str> = leases.iter().map(|l| l.key.as_str()).collect();
                Ok(sqlx::query(SQL)
                    .bind(owner)
                    .bind(channels)
                    .bind(keys)
                    .execute(&postgres.pool)
                    .await?
                    .rows_affected())
            }
            Backend::Sqlite(_) => {
                const SQL: &str = "DELETE FROM contact_leases \
                    WHERE owner = $1 AND channel = $2 AND contact_key = $3";
                let leases = leases.to_vec();
                Ok(with_writer!(self, own(owner), |pool| {
                    let mut released = 0;
                    for lease in &leases {
                        released += sqlx::query(SQL)
                            .bind(&owner)
                            .bind(&lease.channel)
                            .bind(&lease.key)
                            .execute(&mut *pool)
                            .await?
                            .rows_affected();
                    }
                    released
                }))
            }
        }
    }

    /// Who holds `lease` at `now`, if anyone (an expired lease is nobody's).
    pub async fn contact_lease_holder(
        &self,
        lease: &LeaseKey,
        now: DateTime<Utc>,
    ) -> Result<Option<String>, StoreError> {
        const SQL: &str = "SELECT owner FROM contact_leases \
            WHERE channel = $1 AND contact_key = $2 AND lease_until >= $3";
        Ok(with_pool!(self, |pool| {
            sqlx::query_scalar(SQL)
                .bind(&lease.channel)
                .bind(&lease.key)
                .bind(now.timestamp_millis())
                .fetch_optional(pool)
                .await?
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use crate::store::NewInboxRow;
    use crate::store::conformance::{drop_schema, postgres_db, postgres_db_on, t};
    use crate::store::wake::WakeUp;

    fn message(n: usize, contact: usize) -> NewInboxRow {
        NewInboxRow {
            channel: "main".into(),
            dedupe_key: format!("wamid.{n}"),
            kind: "message".into(),
            contact_key: Some(format!("{}", 1000 + contact)),
            payload: serde_json::json!({ "n": n }).to_string(),
            delivery: None,
        }
    }

    async fn next(wake_ups: &mut tokio::sync::mpsc::UnboundedReceiver<WakeUp>) -> WakeUp {
        tokio::time::timeout(Duration::from_secs(10), wake_ups.recv())
            .await
            .expect("a notification within 10 s")
            .expect("the listener runs")
    }

    /// Three instances (three pools on one schema) take leases of the same 60 waiting
    /// contacts at once, again and again: each contact is held by one of them, and each
    /// instance's claim returns exactly the rows of the contacts it holds.
    #[tokio::test]
    async fn instances_racing_for_leases_hold_each_contact_once() {
        let Some((db, schema)) = postgres_db().await else {
            return;
        };
        let rows: Vec<NewInboxRow> = (0..180).map(|n| message(n, n % 60)).collect();
        db.insert_updates(&rows, t(0)).await.unwrap();
        let mut instances = vec![db.clone()];
        for _ in 0..2 {
            instances.push(postgres_db_on(&schema).await);
        }
        let now = t(0);
        let until = now + chrono::Duration::seconds(60);
        let mut tasks = Vec::new();
        for (i, db) in instances.iter().enumerate() {
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                let owner = format!("instance-{i}");
                let mut held = Vec::new();
                for _ in 0..5 {
                    held = db.take_inbox_leases(&owner, now, until, 20).await.unwrap();
                }
                let claimed = db.claim_owned_inbox(&owner, 0, now, 1000).await.unwrap();
                (owner, held, claimed)
            }));
        }
        let mut holder: HashMap<String, String> = HashMap::new();
        let mut claimed_rows = 0;
        for task in tasks {
            let (owner, held, claimed) = task.await.unwrap();
            for lease in &held {
                let before = holder.insert(lease.key.clone(), owner.clone());
                assert_eq!(before, None, "{} held twice", lease.key);
            }
            for row in &claimed {
                let key = row.contact_key.clone().unwrap();
                assert_eq!(
                    holder.get(&key),
                    Some(&owner),
                    "row {} claimed without its lease",
                    row.id
                );
            }
            let ids: Vec<i64> = claimed.iter().map(|r| r.id).collect();
            assert!(
                ids.windows(2).all(|w| w[0] < w[1]),
                "claims are in id order"
            );
            claimed_rows += claimed.len();
        }
        assert_eq!(holder.len(), 60, "every waiting contact is held by someone");
        assert_eq!(claimed_rows, 180, "every row is claimed once");
        for other in &instances[1..] {
            other.close().await;
        }
        drop_schema(&db, &schema).await;
    }

    /// What another instance listens for: a stored update, a pending outbound message (with
    /// its channel) and a released lease each notify, in the writing transaction.
    #[tokio::test]
    async fn stored_updates_pending_messages_and_released_leases_notify() {
        use crate::domain::{Contact, Decision, OutboundContent};
        use crate::store::conformance::{CH, bare_turn, said};
        use crate::store::{OutboundRecord, TurnWrite};
        let Some((db, schema)) = postgres_db().await else {
            return;
        };
        let listener = postgres_db_on(&schema).await;
        let mut wake_ups = listener.wake_ups().expect("PostgreSQL listens");
        assert_eq!(next(&mut wake_ups).await, WakeUp::Reconnected);

        db.insert_updates(&[message(1, 1)], t(0)).await.unwrap();
        assert_eq!(next(&mut wake_ups).await, WakeUp::Inbox);

        let contact = Contact::new("1555");
        let out = [OutboundRecord {
            status: "pending".into(),
            ..said(
                OutboundContent::text("hi"),
                Decision::Send {
                    reason: "window open".into(),
                },
            )
        }];
        db.commit_turn(&TurnWrite {
            outbound: &out,
            ..bare_turn(None, &contact, t(0))
        })
        .await
        .unwrap();
        assert_eq!(next(&mut wake_ups).await, WakeUp::Outbox(CH.to_string()));

        let now = t(0);
        let taken = db
            .take_inbox_leases("A", now, now + chrono::Duration::seconds(10), 10)
            .await
            .unwrap();
        assert_eq!(taken.len(), 1);
        db.release_contact_leases("A", &taken).await.unwrap();
        assert_eq!(next(&mut wake_ups).await, WakeUp::Leases);
        assert!(wake_ups.try_recv().is_err(), "nothing else was notified");

        drop(wake_ups);
        listener.close().await;
        drop_schema(&db, &schema).await;
    }
}
