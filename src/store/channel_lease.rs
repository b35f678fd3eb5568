//! The channel lease: which instance sends for a WhatsApp number.
//!
//! The limits WhatsApp sets are the number's (its throughput, the pair limit per recipient,
//! a `130429` and its `Retry-After`, the messaging limit), not an instance's. Rather than
//! share the pacing state through the database on every send, one instance at a time holds
//! the channel's lease and sends (and dispatches campaigns) for it; its in-memory pacing is
//! then the whole number's.
//!
//! On PostgreSQL the lease is a session-level advisory lock
//! (`pg_try_advisory_lock(CHANNEL_LEASE, hashtext(schema.channel))`: advisory locks are the
//! database's, so the schema keeps two deployments in one database apart) on a connection
//! of its own,
//! outside the pool: PostgreSQL releases it the moment that connection ends, whether the
//! holder closes it, exits, is killed or loses the network, so there is no expiry to tune
//! and no row to renew. The other instances keep their own connection open and try again
//! now and then. On SQLite (one instance per file) the lease is always held.

use super::db::{Backend, Db};
use super::error::StoreError;

/// The first key of the channel leases (`pg_try_advisory_lock(int, int)`); the second is
/// the hash of the schema and the channel. The identity locks use another first key (`identities`).
const CHANNEL_LEASE: i32 = 0x6667_736c; // "fgsl"

/// One instance's hold (or attempt to hold) on one channel's lease.
pub struct ChannelLease {
    channel: String,
    /// PostgreSQL: the lease's own connection; `None` on SQLite, where it is always held.
    conn: Option<sqlx::PgConnection>,
    held: bool,
}

impl std::fmt::Debug for ChannelLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelLease")
            .field("channel", &self.channel)
            .field("held", &self.held)
            .finish()
    }
}

impl Db {
    /// A handle on `channel`'s lease, not yet held: on PostgreSQL it opens the lease's own
    /// connection (with the pool's options, not from the pool).
    pub async fn channel_lease(&self, channel: &str) -> Result<ChannelLease, StoreError> {
        let conn = match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(postgres) => {
                Some(sqlx::ConnectOptions::connect(&*postgres.options).await?)
            }
        };
        Ok(ChannelLease {
            channel: channel.to_string(),
            conn,
            held: false,
        })
    }

    /// The server process id of the session holding `channel`'s lease now, from any
    /// instance (PostgreSQL; `None` when nobody holds it, and always on SQLite): for
    /// operators' queries and for tests that end the holder's session as a crash would.
    pub async fn channel_lease_holder(&self, channel: &str) -> Result<Option<i32>, StoreError> {
        let Backend::Postgres(postgres) = &self.backend else {
            return Ok(None);
        };
        Ok(sqlx::query_scalar(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND classid = CAST($1 AS oid) AND objid = CAST(hashtext(current_schema() || '.' || $2) AS oid) AND objsubid = 2",
        )
        .bind(CHANNEL_LEASE)
        .bind(channel)
        .fetch_optional(&postgres.pool)
        .await?)
    }
}

impl ChannelLease {
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Takes the lease if no other session holds it; whether this one holds it now.
    pub async fn try_take(&mut self) -> Result<bool, StoreError> {
        if self.held {
            return self.still_held().await;
        }
        let Some(conn) = self.conn.as_mut() else {
            self.held = true;
            return Ok(true);
        };
        self.held = sqlx::query_scalar(
            "SELECT pg_try_advisory_lock($1, hashtext(current_schema() || '.' || $2))",
        )
        .bind(CHANNEL_LEASE)
        .bind(&self.channel)
        .fetch_one(conn)
        .await?;
        Ok(self.held)
    }

    /// Whether this session still holds the lease, asked of the server (its lock table), so
    /// a connection the server ended, or a lock released behind our back, reads as lost.
    pub async fn still_held(&mut self) -> Result<bool, StoreError> {
        if !self.held {
            return Ok(false);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Ok(true);
        };
        let held: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
             AND pid = pg_backend_pid() AND granted \
             AND classid = CAST($1 AS oid) AND objid = CAST(hashtext(current_schema() || '.' || $2) AS oid) AND objsubid = 2)",
        )
        .bind(CHANNEL_LEASE)
        .bind(&self.channel)
        .fetch_one(conn)
        .await
        .inspect_err(|_| self.held = false)?;
        self.held = held;
        Ok(held)
    }

    /// Gives the lease up and closes its connection, so another instance may take it at
    /// once.
    pub async fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            if self.held {
                let _ = sqlx::query(
                    "SELECT pg_advisory_unlock($1, hashtext(current_schema() || '.' || $2))",
                )
                .bind(CHANNEL_LEASE)
                .bind(&self.channel)
                .execute(&mut conn)
                .await;
            }
            let _ = sqlx::Connection::close(conn).await;
        }
    }
}
