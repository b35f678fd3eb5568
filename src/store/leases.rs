//! Contact leases (`contact_leases`): which instance may run a contact's turns when several
//! share one database (PostgreSQL).
//!
//! A lease names a contact by its channel and the inbox's `contact_key` (the phone, else the
//! BSUID; a timer's contact by its `wa_id`, the same text), or `#` and the row id for an
//! update about no contact ([`inbox_lease_key!`]). An instance takes a lease only when it is
//! free, expired or already its own ([`Db::take_inbox_leases`], [`Db::take_contact_lease`]), keeps it
//! alive while it works ([`Db::renew_contact_leases`]) and gives it back when the contact has nothing
//! left for it to do ([`Db::release_contact_leases`]); an instance that dies loses its leases when
//! they expire. The rules that use them are `dispatch::ownership`'s.

use chrono::{DateTime, Utc};

use super::db::{Backend, Db, with_pool, with_writer};
use super::error::StoreError;

/// The lease key of inbox row `i` in SQL: its contact, else `#` and its id.
macro_rules! inbox_lease_key {
    () => {
        "COALESCE(i.contact_key, '#' || CAST(i.id AS TEXT))"
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

    /// The lease an inbox row runs under: its contact's, else one of its own.
    pub fn of_inbox_row(row: &super::InboxRow) -> Self {
        match &row.contact_key {
            Some(contact) => Self::new(&row.channel, contact),
            None => Self::new(&row.channel, format!("#{}", row.id)),
        }
    }
}

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
    /// would return, at most `limit` contacts, oldest row first; a lease is taken only when
    /// nobody holds it, its holder's time ran out, or `owner` holds it already. Every lease
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
               WHERE i.processed_at IS NULL AND i.next_attempt_at <= $1 AND ",
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
        let rows: Vec<(String, String)> = one_write!(self, own(owner), |pool| {
            sqlx::query_as(SQL)
                .bind(now)
                .bind(limit.max(0))
                .bind(&owner)
                .bind(until)
                .fetch_all(pool)
                .await?
        });
        Ok(rows
            .into_iter()
            .map(|(channel, key)| LeaseKey { channel, key })
            .collect())
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
                .bind(&channel)
                .bind(&key)
                .bind(&owner)
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
        let rows: Vec<(String, String)> = one_write!(self, own(owner), |pool| {
            sqlx::query_as(SQL)
                .bind(&owner)
                .bind(until)
                .fetch_all(pool)
                .await?
        });
        Ok(rows
            .into_iter()
            .map(|(channel, key)| LeaseKey { channel, key })
            .collect())
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
