//! The statements the identity rules of `store::contacts` run (a link, an operator's
//! resolution, an import's rows), once per backend behind [`IdentityConn`], so the rules
//! themselves are written once.
//!
//! On SQLite they run on the writer's handle inside a raw job: each statement is a plain
//! call, so the rules' futures never wait and [`ready`] drives them to the end in one poll.
//! On PostgreSQL they run on a connection inside a transaction that first takes the
//! channel's identity lock ([`lock_channel`]): identity writes of one channel happen one at
//! a time across every instance, as they do behind SQLite's one writer.

use std::future::Future;
use std::task::{Context, Poll, Waker};

use rusqlite::OptionalExtension as _;

use super::error::StoreError;

/// A contact named by a lookup: (identifier, contact id, key, found by key, paired).
pub(super) type LookupRow = (String, i64, String, bool, bool);

/// A contact's id and profile columns: id, name, tags, attrs, timezone.
pub(super) type ProfileRaw = (i64, Option<String>, String, String, Option<String>);

/// The contacts two identifiers (`$2`: a BSUID, `$3`: a phone) name on channel `$1`, by key
/// or alias: (identifier, contact id, key, found by key, paired). A key match comes first:
/// it outranks an alias that (written before the key) repeats it.
pub(super) const LOOKUP: &str = "SELECT x.identifier, c.id, c.wa_id, x.by_key, \
        EXISTS (SELECT 1 FROM contact_aliases o WHERE o.contact_id = c.id \
            AND o.current = 1) \
    FROM (SELECT wa_id AS identifier, id AS contact_id, TRUE AS by_key FROM contacts \
            WHERE channel = $1 AND wa_id IN ($2, $3) \
        UNION ALL SELECT identifier, contact_id, FALSE FROM contact_aliases \
            WHERE channel = $1 AND identifier IN ($2, $3)) x \
    JOIN contacts c ON c.id = x.contact_id \
    ORDER BY x.by_key DESC";

const OWNER: &str = "SELECT c.id, c.wa_id FROM contacts c WHERE c.channel = $1 AND c.wa_id = $2 \
     UNION ALL SELECT c.id, c.wa_id FROM contact_aliases a \
        JOIN contacts c ON c.id = a.contact_id \
        WHERE a.channel = $1 AND a.identifier = $2 LIMIT 1";
const INSERT_CONTACT: &str = "INSERT INTO contacts (channel, wa_id, created_at, updated_at) \
     VALUES ($1, $2, $3, $3) RETURNING id";
const KEY_OF: &str = "SELECT wa_id FROM contacts WHERE id = $1 AND channel = $2";
const CLEAR_CURRENT: &str = "UPDATE contact_aliases SET current = 0 WHERE contact_id = $1";
const DELETE_ALIAS: &str = "DELETE FROM contact_aliases WHERE channel = $1 AND identifier = $2";
const SET_KEY: &str = "UPDATE contacts SET wa_id = $1, updated_at = $2 WHERE id = $3";
const UPSERT_ALIAS: &str = "INSERT INTO contact_aliases (channel, identifier, contact_id, current) \
     VALUES ($1, $2, $3, $4) \
     ON CONFLICT (channel, identifier) DO UPDATE SET current = excluded.current";
const TAKE_CURRENT_ALIAS: &str = "DELETE FROM contact_aliases WHERE channel = $1 AND identifier = \
        (SELECT identifier FROM contact_aliases WHERE contact_id = $2 \
         AND current = 1 LIMIT 1) \
     RETURNING identifier";
const PROFILE: &str = "SELECT id, name, tags, attrs, timezone FROM contacts \
     WHERE channel = $1 AND wa_id = $2";
const UPDATE_PROFILE: &str = "UPDATE contacts SET name = $1, tags = $2, attrs = $3, \
     timezone = $4, updated_at = $5 WHERE id = $6";

/// The statements of the identity rules, on one backend's connection.
pub(super) trait IdentityConn {
    /// [`LOOKUP`]'s rows.
    async fn lookup(
        &mut self,
        channel: &str,
        bsuid: Option<&str>,
        phone: Option<&str>,
    ) -> Result<Vec<LookupRow>, StoreError>;
    /// The contact `identifier` names on `channel` (by key, else alias): id and key.
    async fn owner(
        &mut self,
        channel: &str,
        identifier: &str,
    ) -> Result<Option<(i64, String)>, StoreError>;
    /// A new contact keyed `key`; its id.
    async fn insert_contact(
        &mut self,
        channel: &str,
        key: &str,
        now: i64,
    ) -> Result<i64, StoreError>;
    /// The key of contact `id` on `channel`.
    async fn key_of(&mut self, id: i64, channel: &str) -> Result<Option<String>, StoreError>;
    /// None of the contact's aliases is its current pairing any more.
    async fn clear_current(&mut self, contact: i64) -> Result<(), StoreError>;
    async fn delete_alias(&mut self, channel: &str, identifier: &str) -> Result<(), StoreError>;
    async fn set_key(&mut self, contact: i64, key: &str, now: i64) -> Result<(), StoreError>;
    /// Adds an alias, or updates whether it is current.
    async fn upsert_alias(
        &mut self,
        channel: &str,
        identifier: &str,
        contact: i64,
        current: bool,
    ) -> Result<(), StoreError>;
    /// Removes the contact's current alias and returns it.
    async fn take_current_alias(
        &mut self,
        channel: &str,
        contact: i64,
    ) -> Result<Option<String>, StoreError>;
    /// The id and profile of the contact keyed `key`.
    async fn profile(&mut self, channel: &str, key: &str)
    -> Result<Option<ProfileRaw>, StoreError>;
    /// Writes a contact's profile: name, tags and attrs (JSON), timezone.
    async fn update_profile(
        &mut self,
        id: i64,
        profile: (Option<&str>, &str, &str, Option<&str>),
        now: i64,
    ) -> Result<(), StoreError>;
}

/// Drives a future that never waits (the identity rules over [`SqliteIds`]) to its end.
pub(super) fn ready<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => unreachable!("SQLite's identity statements are synchronous"),
    }
}

/// The writer's SQLite handle, inside a raw job.
pub(super) struct SqliteIds<'a>(pub(super) &'a rusqlite::Connection);

impl SqliteIds<'_> {
    fn statement(&self, sql: &str) -> Result<rusqlite::CachedStatement<'_>, StoreError> {
        Ok(self.0.prepare_cached(sql)?)
    }
}

impl IdentityConn for SqliteIds<'_> {
    async fn lookup(
        &mut self,
        channel: &str,
        bsuid: Option<&str>,
        phone: Option<&str>,
    ) -> Result<Vec<LookupRow>, StoreError> {
        let mut statement = self.statement(LOOKUP)?;
        let mut rows = statement.query(rusqlite::params![channel, bsuid, phone])?;
        let mut found = Vec::new();
        while let Some(row) = rows.next()? {
            found.push((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
            ));
        }
        Ok(found)
    }

    async fn owner(
        &mut self,
        channel: &str,
        identifier: &str,
    ) -> Result<Option<(i64, String)>, StoreError> {
        Ok(self
            .statement(OWNER)?
            .query_row([channel, identifier], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?)
    }

    async fn insert_contact(
        &mut self,
        channel: &str,
        key: &str,
        now: i64,
    ) -> Result<i64, StoreError> {
        Ok(self
            .statement(INSERT_CONTACT)?
            .query_row(rusqlite::params![channel, key, now], |row| row.get(0))?)
    }

    async fn key_of(&mut self, id: i64, channel: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .statement(KEY_OF)?
            .query_row(rusqlite::params![id, channel], |row| row.get(0))
            .optional()?)
    }

    async fn clear_current(&mut self, contact: i64) -> Result<(), StoreError> {
        self.statement(CLEAR_CURRENT)?.execute([contact])?;
        Ok(())
    }

    async fn delete_alias(&mut self, channel: &str, identifier: &str) -> Result<(), StoreError> {
        self.statement(DELETE_ALIAS)?
            .execute([channel, identifier])?;
        Ok(())
    }

    async fn set_key(&mut self, contact: i64, key: &str, now: i64) -> Result<(), StoreError> {
        self.statement(SET_KEY)?
            .execute(rusqlite::params![key, now, contact])?;
        Ok(())
    }

    async fn upsert_alias(
        &mut self,
        channel: &str,
        identifier: &str,
        contact: i64,
        current: bool,
    ) -> Result<(), StoreError> {
        self.statement(UPSERT_ALIAS)?.execute(rusqlite::params![
            channel,
            identifier,
            contact,
            i64::from(current)
        ])?;
        Ok(())
    }

    async fn take_current_alias(
        &mut self,
        channel: &str,
        contact: i64,
    ) -> Result<Option<String>, StoreError> {
        Ok(self
            .statement(TAKE_CURRENT_ALIAS)?
            .query_row(rusqlite::params![channel, contact], |row| row.get(0))
            .optional()?)
    }

    async fn profile(
        &mut self,
        channel: &str,
        key: &str,
    ) -> Result<Option<ProfileRaw>, StoreError> {
        Ok(self
            .statement(PROFILE)?
            .query_row([channel, key], |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                ))
            })
            .optional()?)
    }

    async fn update_profile(
        &mut self,
        id: i64,
        (name, tags, attrs, timezone): (Option<&str>, &str, &str, Option<&str>),
        now: i64,
    ) -> Result<(), StoreError> {
        self.statement(UPDATE_PROFILE)?
            .execute(rusqlite::params![name, tags, attrs, timezone, now, id])?;
        Ok(())
    }
}

/// Takes the identity lock of `channel` until the transaction on `conn` ends: identity
/// writes of one channel, from any instance, run one at a time.
pub(super) async fn lock_channel(
    conn: &mut sqlx::PgConnection,
    channel: &str,
) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(IDENTITY_LOCK)
        .bind(channel)
        .execute(conn)
        .await?;
    Ok(())
}

/// The first key of the identity locks (`pg_advisory_xact_lock(int, int)`); the second is
/// the channel's hash. Other advisory locks flowgate takes use other first keys.
pub(super) const IDENTITY_LOCK: i32 = 0x6667_6964; // "fgid"

impl IdentityConn for sqlx::PgConnection {
    async fn lookup(
        &mut self,
        channel: &str,
        bsuid: Option<&str>,
        phone: Option<&str>,
    ) -> Result<Vec<LookupRow>, StoreError> {
        Ok(sqlx::query_as(LOOKUP)
            .bind(channel)
            .bind(bsuid)
            .bind(phone)
            .fetch_all(self)
            .await?)
    }

    async fn owner(
        &mut self,
        channel: &str,
        identifier: &str,
    ) -> Result<Option<(i64, String)>, StoreError> {
        Ok(sqlx::query_as(OWNER)
            .bind(channel)
            .bind(identifier)
            .fetch_optional(self)
            .await?)
    }

    async fn insert_contact(
        &mut self,
        channel: &str,
        key: &str,
        now: i64,
    ) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(INSERT_CONTACT)
            .bind(channel)
            .bind(key)
            .bind(now)
            .fetch_one(self)
            .await?)
    }

    async fn key_of(&mut self, id: i64, channel: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar(KEY_OF)
            .bind(id)
            .bind(channel)
            .fetch_optional(self)
            .await?)
    }

    async fn clear_current(&mut self, contact: i64) -> Result<(), StoreError> {
        sqlx::query(CLEAR_CURRENT)
            .bind(contact)
            .execute(self)
            .await?;
        Ok(())
    }

    async fn delete_alias(&mut self, channel: &str, identifier: &str) -> Result<(), StoreError> {
        sqlx::query(DELETE_ALIAS)
            .bind(channel)
            .bind(identifier)
            .execute(self)
            .await?;
        Ok(())
    }

    async fn set_key(&mut self, contact: i64, key: &str, now: i64) -> Result<(), StoreError> {
        sqlx::query(SET_KEY)
            .bind(key)
            .bind(now)
            .bind(contact)
            .execute(self)
            .await?;
        Ok(())
    }

    async fn upsert_alias(
        &mut self,
        channel: &str,
        identifier: &str,
        contact: i64,
        current: bool,
    ) -> Result<(), StoreError> {
        sqlx::query(UPSERT_ALIAS)
            .bind(channel)
            .bind(identifier)
            .bind(contact)
            .bind(i64::from(current))
            .execute(self)
            .await?;
        Ok(())
    }

    async fn take_current_alias(
        &mut self,
        channel: &str,
        contact: i64,
    ) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar(TAKE_CURRENT_ALIAS)
            .bind(channel)
            .bind(contact)
            .fetch_optional(self)
            .await?)
    }

    async fn profile(
        &mut self,
        channel: &str,
        key: &str,
    ) -> Result<Option<ProfileRaw>, StoreError> {
        Ok(sqlx::query_as(PROFILE)
            .bind(channel)
            .bind(key)
            .fetch_optional(self)
            .await?)
    }

    async fn update_profile(
        &mut self,
        id: i64,
        (name, tags, attrs, timezone): (Option<&str>, &str, &str, Option<&str>),
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(UPDATE_PROFILE)
            .bind(name)
            .bind(tags)
            .bind(attrs)
            .bind(timezone)
            .bind(now)
            .bind(id)
            .execute(self)
            .await?;
        Ok(())
    }
}
