//! Who a contact is: the identifiers WhatsApp gives a customer (a phone number, a
//! business-scoped user id) resolved to one contact per channel, and changed when Meta says
//! the customer's identity changed (DESIGN §3, FACTS.md §10.10).
//!
//! A contact is keyed by `contacts.wa_id`: its phone number when one is known (replies go
//! `to` it), else its BSUID. Its BSUIDs are in `contact_aliases`: the one its phone is
//! paired with now (`current`), and those it had before a number change, for late or
//! retried webhooks. A number change regenerates the BSUID, so a phone that Meta pairs with
//! another BSUID than its contact's current one has changed hands. Old phone numbers are
//! dropped: WhatsApp gives a number to someone else, a BSUID never.
//!
//! Identifiers are linked only on pairings Meta asserts: both in one webhook (`from` and
//! `from_user_id`, or one `contacts[]` entry), or a `system` identity change. Two contacts
//! that turn out to be one customer (each written before Meta paired their identifiers) are
//! not merged: their histories stay apart, the BSUID's contact answers, and the caller
//! warns.
//!
//! A resolution that wrote nothing is remembered ([`ResolvedCache`]), so a known customer's
//! next webhook costs no query: only this process writes identities (SQLite has one server
//! process), and every identity write forgets everything remembered.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use rusqlite::OptionalExtension as _;

use super::{Db, StoreError, postgres_writes};
use crate::domain::is_bsuid;

/// The identifiers one webhook gives for a customer. Empty strings count as absent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Identifiers<'a> {
    pub phone: Option<&'a str>,
    pub bsuid: Option<&'a str>,
}

impl<'a> Identifiers<'a> {
    pub fn new(phone: Option<&'a str>, bsuid: Option<&'a str>) -> Self {
        let given = |s: Option<&'a str>| s.map(str::trim).filter(|s| !s.is_empty());
        Self {
            phone: given(phone),
            bsuid: given(bsuid),
        }
    }

    /// One identifier, either kind (an operator's, in the API).
    pub fn of(identifier: &'a str) -> Self {
        if is_bsuid(identifier) {
            Self::new(None, Some(identifier))
        } else {
            Self::new(Some(identifier), None)
        }
    }

    /// The key a new contact gets: the phone when known, else the BSUID.
    pub fn new_key(&self) -> Option<&'a str> {
        self.phone.or(self.bsuid)
    }
}

/// The contact a webhook's identifiers name (see [`Db::resolve_contact`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The key to run the turn on: the contact's `wa_id`, or the key a new contact gets.
    pub key: String,
    /// Set when the identifiers name two different contacts (not merged): what to warn.
    pub conflict: Option<String>,
}

/// What a `system` identity change did (see [`Db::change_identity`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityChanged {
    /// The contact's key is now `key` (it may be unchanged when only an alias was added).
    Changed { contact_id: i64, key: String },
    /// No contact has the previous identifiers: nothing to change.
    UnknownContact,
    /// The change names no new identifier: nothing to change.
    NothingNew,
    /// A new identifier already names another contact: nothing changed.
    Conflict(String),
}

/// Resolutions that needed no write: `(channel, phone, bsuid)` to the contact's key.
#[derive(Debug, Default)]
pub struct ResolvedCache(Mutex<Remembered>);

/// The resolutions, and how many identity writes have forgotten them: a lookup that began
/// before a write is not remembered after it.
#[derive(Debug, Default)]
struct Remembered {
    keys: HashMap<ResolvedBy, String>,
    generation: u64,
}

type ResolvedBy = (String, Option<String>, Option<String>);

/// Resolutions remembered at most; the cache starts again when full.
const RESOLVED_CACHE: usize = 100_000;

impl ResolvedCache {
    fn by(channel: &str, ids: Identifiers<'_>) -> ResolvedBy {
        (
            channel.to_string(),
            ids.phone.map(str::to_string),
            ids.bsuid.map(str::to_string),
        )
    }

    /// The key remembered, else the generation to remember a lookup made now under.
    fn get(&self, by: &ResolvedBy) -> Result<String, u64> {
        let remembered = self.lock();
        remembered
            .keys
            .get(by)
            .cloned()
            .ok_or(remembered.generation)
    }

    /// Remembers what a lookup begun in `generation` found, unless an identity write has
    /// been made since.
    fn remember(&self, generation: u64, by: ResolvedBy, key: &str) {
        let mut remembered = self.lock();
        if remembered.generation != generation {
            return;
        }
        if remembered.keys.len() >= RESOLVED_CACHE {
            remembered.keys.clear();
        }
        remembered.keys.insert(by, key.to_string());
    }

    fn forget_all(&self) {
        let mut remembered = self.lock();
        remembered.keys.clear();
        remembered.generation += 1;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Remembered> {
        // A panic while holding it leaves a map that is still whole.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A contact found by one of its identifiers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Known {
    id: i64,
    key: String,
    /// Found by its key (not by an old identifier kept as an alias).
    by_key: bool,
    /// Whether its phone (its key) is paired with a BSUID now.
    paired: bool,
}

/// What a link job does. `contact: Some` gives that contact a new key (its old key stays
/// as an alias if it is a BSUID) and a new alias; `number_changed` marks its BSUIDs as from
/// before a number change. `None` creates a contact keyed by `key` with `alias`, first
/// moving `key` off the contact holding it when `displace` is set. A BSUID alias of a
/// phone-keyed contact is its current pairing unless the number changed.
#[derive(Debug, Clone, Default)]
struct Link {
    channel: String,
    contact: Option<i64>,
    key: Option<String>,
    alias: Option<String>,
    displace: bool,
    number_changed: bool,
    now: i64,
}

/// How a link job ended.
#[derive(Debug)]
enum Linked {
    Key {
        contact_id: i64,
        key: String,
    },
    /// Nothing was written: an identifier names another contact (whose key, if the link
    /// was to create a contact, answers instead).
    Conflict {
        why: String,
        owner: Option<String>,
    },
}

impl Db {
    /// The contact `ids` name on `channel`, by BSUID first, then phone; `None` when `ids` is
    /// empty. A pairing the database does not know yet is recorded:
    ///
    /// * a new customer who comes with both is created with both (so a later webhook with
    ///   the BSUID alone finds them);
    /// * a contact known by phone alone learns its BSUID (an alias);
    /// * a contact keyed by this BSUID (no phone known) that now shares its phone is keyed
    ///   by the phone (replies go to it);
    /// * a phone whose contact has other BSUIDs has changed hands (a BSUID is regenerated
    ///   with every number change): the old contact keeps its BSUID as its key, and the
    ///   new owner gets a contact of their own.
    ///
    /// An old BSUID (an alias) with a phone the contact no longer has is a late webhook: it
    /// finds the contact and changes nothing.
    pub async fn resolve_contact(
        &self,
        channel: &str,
        ids: Identifiers<'_>,
        now: DateTime<Utc>,
    ) -> Result<Option<Resolved>, StoreError> {
        let Some(new_key) = ids.new_key() else {
            return Ok(None);
        };
        let cache = self.resolved_cache();
        let by = ResolvedCache::by(channel, ids);
        let generation = match cache.map(|cache| cache.get(&by)) {
            Some(Ok(key)) => {
                return Ok(Some(Resolved {
                    key,
                    conflict: None,
                }));
            }
            Some(Err(generation)) => generation,
            None => 0,
        };
        let (by_bsuid, by_phone) = self.lookup(channel, ids).await?;
        // Nothing to write: what the database says now holds until an identity write.
        let settled = |key: String| {
            if let Some(cache) = cache {
                cache.remember(generation, by.clone(), &key);
            }
            Resolved {
                key,
                conflict: None,
            }
        };
        let link = |contact, key: Option<&str>, alias: Option<&str>, displace| Link {
            channel: channel.to_string(),
            contact,
            key: key.map(str::to_string),
            alias: alias.map(str::to_string),
            displace,
            number_changed: false,
            now: now.timestamp_millis(),
        };
        let resolved = match (by_bsuid, by_phone, ids.phone, ids.bsuid) {
            (Some(b), Some(p), ..) if b.id == p.id => settled(b.key),
            (Some(b), Some(p), ..) => Resolved {
                conflict: Some(format!(
                    "BSUID {} is contact {} and phone {} is contact {}: one customer, two \
                     contacts (not merged); the BSUID's contact answers",
                    ids.bsuid.unwrap_or_default(),
                    b.id,
                    ids.phone.unwrap_or_default(),
                    p.id
                )),
                key: b.key,
            },
            // Known by this BSUID alone, now with a phone: the phone is theirs.
            (Some(b), None, Some(phone), _) if b.by_key && is_bsuid(&b.key) => {
                self.linked(link(Some(b.id), Some(phone), None, false), b.key)
                    .await?
            }
            (Some(b), None, ..) => settled(b.key),
            (None, Some(p), _, Some(bsuid)) => {
                if p.paired {
                    // The phone's contact is paired with another BSUID: the number has a
                    // new owner.
                    self.linked(link(None, Some(&p.key), Some(bsuid), true), p.key)
                        .await?
                } else {
                    self.linked(link(Some(p.id), None, Some(bsuid), false), p.key)
                        .await?
                }
            }
            (None, Some(p), _, None) => settled(p.key),
            (None, None, Some(phone), Some(bsuid)) => {
                self.linked(
                    link(None, Some(phone), Some(bsuid), false),
                    phone.to_string(),
                )
                .await?
            }
            // A new contact, created by its first turn (not remembered: until it is, the
            // lookup is what would notice a BSUID-keyed contact learn a phone).
            (None, None, ..) => Resolved {
                key: new_key.to_string(),
                conflict: None,
            },
        };
        Ok(Some(resolved))
    }

    /// Applies a `system` identity change, which WhatsApp sends when a customer changes
    /// their phone number (which regenerates their BSUID): the contact the previous
    /// identifiers name (by BSUID first) is keyed by the new phone, else (the new phone is
    /// not shared: `user_changed_user_id`) by the new BSUID. Its BSUIDs stay as aliases, for
    /// late webhooks; its previous phone is dropped, since it now belongs to someone else.
    pub async fn change_identity(
        &self,
        channel: &str,
        previous: Identifiers<'_>,
        new: Identifiers<'_>,
        now: DateTime<Utc>,
    ) -> Result<IdentityChanged, StoreError> {
        let Some(key) = new.new_key() else {
            return Ok(IdentityChanged::NothingNew);
        };
        if previous.new_key().is_none() {
            return Ok(IdentityChanged::UnknownContact);
        }
        let (by_bsuid, by_phone) = self.lookup(channel, previous).await?;
        let Some(contact) = by_bsuid.or(by_phone) else {
            return Ok(IdentityChanged::UnknownContact);
        };
        let alias = new.bsuid.filter(|b| *b != key);
        let linked = self
            .link(Link {
                channel: channel.to_string(),
                contact: Some(contact.id),
                key: Some(key.to_string()),
                alias: alias.map(str::to_string),
                displace: false,
                number_changed: true,
                now: now.timestamp_millis(),
            })
            .await?;
        Ok(match linked {
            Linked::Key { contact_id, key } => IdentityChanged::Changed { contact_id, key },
            Linked::Conflict { why, .. } => IdentityChanged::Conflict(why),
        })
    }

    /// The contacts `ids`' BSUID and phone name (by key or alias).
    async fn lookup(
        &self,
        channel: &str,
        ids: Identifiers<'_>,
    ) -> Result<(Option<Known>, Option<Known>), StoreError> {
        // A key match first: it outranks an alias that (written before the key) repeats it.
        const SQL: &str = "SELECT x.identifier, c.id, c.wa_id, x.by_key, \
                EXISTS (SELECT 1 FROM contact_aliases o WHERE o.contact_id = c.id \
                    AND o.current = 1) \
            FROM (SELECT wa_id AS identifier, id AS contact_id, 1 AS by_key FROM contacts \
                    WHERE channel = $1 AND wa_id IN ($2, $3) \
                UNION ALL SELECT identifier, contact_id, 0 FROM contact_aliases \
                    WHERE channel = $1 AND identifier IN ($2, $3)) x \
            JOIN contacts c ON c.id = x.contact_id \
            ORDER BY x.by_key DESC";
        let rows: Vec<(String, i64, String, bool, bool)> = with_pool!(self, |pool| {
            sqlx::query_as(SQL)
                .bind(channel)
                .bind(ids.bsuid)
                .bind(ids.phone)
                .fetch_all(pool)
                .await?
        });
        let find = |id: Option<&str>| {
            let id = id?;
            rows.iter().find(|(identifier, ..)| identifier == id).map(
                |(_, contact, key, by_key, paired)| Known {
                    id: *contact,
                    key: key.clone(),
                    by_key: *by_key,
                    paired: *paired,
                },
            )
        };
        Ok((find(ids.bsuid), find(ids.phone)))
    }

    /// Runs `link`; `fallback` is the key to answer with if it conflicts (unless the
    /// conflict names the contact that answers).
    async fn linked(&self, link: Link, fallback: String) -> Result<Resolved, StoreError> {
        Ok(match self.link(link).await? {
            Linked::Key { key, .. } => Resolved {
                key,
                conflict: None,
            },
            Linked::Conflict { why, owner } => Resolved {
                key: owner.unwrap_or(fallback),
                conflict: Some(why),
            },
        })
    }

    /// One writer job: checks that the new identifiers name no other contact, then writes
    /// them (all or nothing). What is remembered is forgotten before the job (a lookup
    /// meanwhile is not remembered) and again after its commit (a cache hit in between
    /// could still answer the old key: a turn refuses to create a contact under an alias,
    /// and a turn on a contact whose key changed fails its stale-contact check, and either
    /// is retried).
    async fn link(&self, link: Link) -> Result<Linked, StoreError> {
        match self {
            Db::Sqlite {
                writer, identities, ..
            } => {
                identities.forget_all();
                let linked = writer.run_raw(move |db| link.run(db)).await?;
                if matches!(linked, Linked::Key { .. }) {
                    identities.forget_all();
                }
                Ok(linked)
            }
            Db::Postgres(_) => Err(postgres_writes()),
        }
    }

    fn resolved_cache(&self) -> Option<&ResolvedCache> {
        match self {
            Db::Sqlite { identities, .. } => Some(identities),
            Db::Postgres(_) => None,
        }
    }
}

impl Link {
    fn run(&self, db: &rusqlite::Connection) -> Result<Linked, StoreError> {
        let channel = self.channel.as_str();
        let owner = |identifier: &str| -> Result<Option<(i64, String)>, StoreError> {
            Ok(db
                .prepare_cached(
                    "SELECT c.id, c.wa_id FROM contacts c WHERE c.channel = ?1 AND c.wa_id = ?2 \
                     UNION ALL SELECT c.id, c.wa_id FROM contact_aliases a \
                        JOIN contacts c ON c.id = a.contact_id \
                        WHERE a.channel = ?1 AND a.identifier = ?2 LIMIT 1",
                )?
                .query_row([channel, identifier], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()?)
        };
        let conflict = |identifier: &str, other: (i64, String), contact: Option<i64>| {
            let whose = contact.map_or("a new contact".to_string(), |c| format!("contact {c}"));
            Linked::Conflict {
                why: format!(
                    "{identifier} already names contact {}, not {whose} (not merged)",
                    other.0
                ),
                owner: contact.is_none().then_some(other.1),
            }
        };
        // Everything is checked before anything is written.
        let contact = match (self.contact, self.key.as_deref()) {
            (Some(id), _) => id,
            (None, Some(key)) => {
                if let Some(alias) = self.alias.as_deref()
                    && let Some(other) = owner(alias)?
                {
                    return Ok(conflict(alias, other, None));
                }
                if let Some(holder) = owner(key)? {
                    if !self.displace || holder.1 != key {
                        return Ok(conflict(key, holder, None));
                    }
                    // The number has a new owner: its old contact is keyed by its BSUID.
                    let Some(bsuid) = self.take_current_alias(db, holder.0)? else {
                        return Ok(conflict(key, holder, None));
                    };
                    self.set_key(db, holder.0, &bsuid)?;
                }
                db.prepare_cached(
                    "INSERT INTO contacts (channel, wa_id, created_at, updated_at) \
                     VALUES (?1, ?2, ?3, ?3)",
                )?
                .execute(rusqlite::params![channel, key, self.now])?;
                let id = db.last_insert_rowid();
                if let Some(alias) = self.alias.as_deref() {
                    self.add_alias(db, id, alias, !is_bsuid(key))?;
                }
                return Ok(Linked::Key {
                    contact_id: id,
                    key: key.to_string(),
                });
            }
            (None, None) => return Err(StoreError::Corrupt("a new contact without a key".into())),
        };
        let old_key: String = db
            .prepare_cached("SELECT wa_id FROM contacts WHERE id = ?1 AND channel = ?2")?
            .query_row(rusqlite::params![contact, channel], |row| row.get(0))
            .optional()?
            .ok_or(StoreError::UnknownContact { id: contact })?;
        let new_key = self.key.as_deref().filter(|k| *k != old_key);
        let alias = self.alias.as_deref();
        for identifier in new_key.iter().chain(alias.iter()) {
            if let Some(other) = owner(identifier)?.filter(|other| other.0 != contact) {
                return Ok(conflict(identifier, other, Some(contact)));
            }
        }
        if self.number_changed {
            db.prepare_cached("UPDATE contact_aliases SET current = 0 WHERE contact_id = ?1")?
                .execute([contact])?;
        }
        let mut key = old_key.clone();
        if let Some(new_key) = new_key {
            db.prepare_cached(
                "DELETE FROM contact_aliases WHERE channel = ?1 AND identifier = ?2",
            )?
            .execute([channel, new_key])?;
            self.set_key(db, contact, new_key)?;
            if is_bsuid(&old_key) {
                // Known by this BSUID alone until now, it is the phone's pairing, unless
                // the number changed (which made a new BSUID).
                let current = !self.number_changed && !is_bsuid(new_key);
                self.add_alias(db, contact, &old_key, current)?;
            }
            key = new_key.to_string();
        }
        if let Some(alias) = alias.filter(|a| *a != key) {
            self.add_alias(db, contact, alias, !is_bsuid(&key))?;
        }
        Ok(Linked::Key {
            contact_id: contact,
            key,
        })
    }

    fn set_key(
        &self,
        db: &rusqlite::Connection,
        contact: i64,
        key: &str,
    ) -> Result<(), StoreError> {
        db.prepare_cached("UPDATE contacts SET wa_id = ?1, updated_at = ?2 WHERE id = ?3")?
            .execute(rusqlite::params![key, self.now, contact])?;
        Ok(())
    }

    /// Adds (or updates) an alias of `contact`, which the caller checked names no other
    /// contact; a `current` one replaces the contact's current pairing.
    fn add_alias(
        &self,
        db: &rusqlite::Connection,
        contact: i64,
        identifier: &str,
        current: bool,
    ) -> Result<(), StoreError> {
        if current {
            db.prepare_cached("UPDATE contact_aliases SET current = 0 WHERE contact_id = ?1")?
                .execute([contact])?;
        }
        db.prepare_cached(
            "INSERT INTO contact_aliases (channel, identifier, contact_id, current) \
             VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (channel, identifier) DO UPDATE SET current = excluded.current",
        )?
        .execute(rusqlite::params![
            self.channel,
            identifier,
            contact,
            current
        ])?;
        Ok(())
    }

    /// Removes `contact`'s current BSUID alias and returns it.
    fn take_current_alias(
        &self,
        db: &rusqlite::Connection,
        contact: i64,
    ) -> Result<Option<String>, StoreError> {
        Ok(db
            .prepare_cached(
                "DELETE FROM contact_aliases WHERE channel = ?1 AND identifier = \
                    (SELECT identifier FROM contact_aliases WHERE contact_id = ?2 \
                     AND current = 1 LIMIT 1) \
                 RETURNING identifier",
            )?
            .query_row(rusqlite::params![self.channel, contact], |row| row.get(0))
            .optional()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::VirtualClock;

    const CH: &str = "main";
    const PHONE: &str = "15555550123";
    const NEW_PHONE: &str = "15555550999";
    const BSUID: &str = "US.20000000000000000123";
    const NEW_BSUID: &str = "US.20000000000000000456";
    const STRANGER: &str = "US.20000000000000000789";

    async fn db() -> Db {
        let db = Db::connect("sqlite::memory:").await.unwrap();
        db.migrate().await.unwrap();
        db
    }

    fn now() -> DateTime<Utc> {
        VirtualClock::test_epoch()
    }

    fn ids<'a>(phone: Option<&'a str>, bsuid: Option<&'a str>) -> Identifiers<'a> {
        Identifiers::new(phone, bsuid)
    }

    async fn resolve(db: &Db, phone: Option<&str>, bsuid: Option<&str>) -> Resolved {
        db.resolve_contact(CH, ids(phone, bsuid), now())
            .await
            .unwrap()
            .expect("an identifier was given")
    }

    /// A `system` identity change, from `previous` to `new`.
    async fn change(db: &Db, previous: Identifiers<'_>, new: Identifiers<'_>) -> IdentityChanged {
        db.change_identity(CH, previous, new, now()).await.unwrap()
    }

    fn key(key: &str) -> Resolved {
        Resolved {
            key: key.into(),
            conflict: None,
        }
    }

    /// A contact as a turn creates it: keyed by `wa_id`, no alias.
    async fn contact(db: &Db, wa_id: &str) -> i64 {
        let Db::Sqlite { pool, .. } = db else {
            unreachable!("tests use SQLite")
        };
        sqlx::query_scalar(
            "INSERT INTO contacts (channel, wa_id, created_at, updated_at) \
             VALUES ($1, $2, 0, 0) RETURNING id",
        )
        .bind(CH)
        .bind(wa_id)
        .fetch_one(pool)
        .await
        .unwrap()
    }

    /// Every contact of the channel: (id, key, aliases).
    async fn contacts(db: &Db) -> Vec<(i64, String, Vec<String>)> {
        let Db::Sqlite { pool, .. } = db else {
            unreachable!("tests use SQLite")
        };
        let rows: Vec<(i64, String, Option<String>)> = sqlx::query_as(
            "SELECT c.id, c.wa_id, (SELECT group_concat(identifier, ',') FROM \
                (SELECT identifier FROM contact_aliases a WHERE a.contact_id = c.id \
                 ORDER BY identifier)) \
             FROM contacts c WHERE c.channel = $1 ORDER BY c.id",
        )
        .bind(CH)
        .fetch_all(pool)
        .await
        .unwrap();
        rows.into_iter()
            .map(|(id, key, aliases)| {
                let aliases = aliases
                    .map(|a| a.split(',').map(str::to_string).collect())
                    .unwrap_or_default();
                (id, key, aliases)
            })
            .collect()
    }

    #[tokio::test]
    async fn a_new_customer_with_both_identifiers_is_found_by_either() {
        let db = db().await;
        assert_eq!(resolve(&db, Some(PHONE), Some(BSUID)).await, key(PHONE));
        let all = contacts(&db).await;
        assert_eq!(all.len(), 1);
        assert_eq!(
            (all[0].1.as_str(), all[0].2.as_slice()),
            (PHONE, &[BSUID.to_string()][..])
        );
        // A username hides the phone: the BSUID alone finds the same contact.
        assert_eq!(resolve(&db, None, Some(BSUID)).await, key(PHONE));
        assert_eq!(resolve(&db, Some(PHONE), None).await, key(PHONE));
        assert_eq!(resolve(&db, Some(PHONE), Some(BSUID)).await, key(PHONE));
        assert_eq!(contacts(&db).await, all, "nothing more written");
    }

    #[tokio::test]
    async fn new_customers_with_one_identifier_are_left_to_their_turn() {
        let db = db().await;
        assert_eq!(resolve(&db, Some(PHONE), None).await, key(PHONE));
        assert_eq!(resolve(&db, Some(""), Some(BSUID)).await, key(BSUID));
        assert!(contacts(&db).await.is_empty());
        assert_eq!(
            db.resolve_contact(CH, ids(None, Some(" ")), now())
                .await
                .unwrap(),
            None
        );
    }

    #[tokio::test]
    async fn a_phone_contact_learns_its_bsuid() {
        let db = db().await;
        let id = contact(&db, PHONE).await;
        assert_eq!(resolve(&db, Some(PHONE), Some(BSUID)).await, key(PHONE));
        assert_eq!(
            contacts(&db).await,
            [(id, PHONE.to_string(), vec![BSUID.to_string()])]
        );
        assert_eq!(resolve(&db, None, Some(BSUID)).await, key(PHONE));
    }

    #[tokio::test]
    async fn a_bsuid_contact_that_shares_its_phone_is_keyed_by_it() {
        let db = db().await;
        let id = contact(&db, BSUID).await;
        // Remembered, then forgotten by the write below.
        assert_eq!(resolve(&db, None, Some(BSUID)).await, key(BSUID));
        // Replies go `to` the phone once it is known; the BSUID stays as an alias.
        assert_eq!(resolve(&db, Some(PHONE), Some(BSUID)).await, key(PHONE));
        assert_eq!(
            contacts(&db).await,
            [(id, PHONE.to_string(), vec![BSUID.to_string()])]
        );
        assert_eq!(resolve(&db, None, Some(BSUID)).await, key(PHONE));
    }

    #[test]
    fn a_lookup_begun_before_an_identity_write_is_not_remembered() {
        let cache = ResolvedCache::default();
        let by = ResolvedCache::by(CH, ids(None, Some(BSUID)));
        let generation = cache.get(&by).unwrap_err();
        cache.forget_all();
        cache.remember(generation, by.clone(), BSUID);
        let generation = cache.get(&by).expect_err("stale: not remembered");
        cache.remember(generation, by.clone(), PHONE);
        assert_eq!(cache.get(&by), Ok(PHONE.to_string()));
    }

    #[tokio::test]
    async fn two_contacts_of_one_customer_are_not_merged() {
        let db = db().await;
        let by_phone = contact(&db, PHONE).await;
        let by_bsuid = contact(&db, BSUID).await;
        let resolved = resolve(&db, Some(PHONE), Some(BSUID)).await;
        assert_eq!(resolved.key, BSUID, "the BSUID's contact answers");
        let conflict = resolved.conflict.expect("the conflict is reported");
        assert!(conflict.contains(&by_phone.to_string()), "{conflict}");
        assert!(conflict.contains(&by_bsuid.to_string()), "{conflict}");
        assert_eq!(
            contacts(&db).await,
            [
                (by_phone, PHONE.to_string(), vec![]),
                (by_bsuid, BSUID.to_string(), vec![])
            ]
        );
    }

    #[tokio::test]
    async fn a_changed_number_becomes_the_key_and_the_old_one_is_forgotten() {
        let db = db().await;
        assert_eq!(resolve(&db, Some(PHONE), Some(BSUID)).await, key(PHONE));
        let id = contacts(&db).await[0].0;
        // `user_changed_number`: from the old phone, `system.wa_id` the new one.
        let changed = change(&db, ids(Some(PHONE), None), ids(Some(NEW_PHONE), None)).await;
        assert_eq!(
            changed,
            IdentityChanged::Changed {
                contact_id: id,
                key: NEW_PHONE.into()
            }
        );
        assert_eq!(
            contacts(&db).await,
            [(id, NEW_PHONE.to_string(), vec![BSUID.to_string()])]
        );
        assert_eq!(
            resolve(&db, Some(NEW_PHONE), Some(BSUID)).await,
            key(NEW_PHONE)
        );
        // Whoever gets the old number next is someone else.
        assert_eq!(resolve(&db, Some(PHONE), None).await, key(PHONE));
        assert_eq!(contacts(&db).await.len(), 1);
    }

    #[tokio::test]
    async fn a_number_change_without_the_new_number_keys_the_contact_by_its_new_bsuid() {
        let db = db().await;
        assert_eq!(resolve(&db, Some(PHONE), Some(BSUID)).await, key(PHONE));
        let id = contacts(&db).await[0].0;
        // `user_changed_user_id`: the new number is not shared, only the new BSUID.
        let changed = change(&db, ids(None, Some(BSUID)), ids(None, Some(NEW_BSUID))).await;
        assert_eq!(
            changed,
            IdentityChanged::Changed {
                contact_id: id,
                key: NEW_BSUID.into()
            }
        );
        let ours = (id, NEW_BSUID.to_string(), vec![BSUID.to_string()]);
        assert_eq!(contacts(&db).await, std::slice::from_ref(&ours));
        for bsuid in [BSUID, NEW_BSUID] {
            assert_eq!(resolve(&db, None, Some(bsuid)).await, key(NEW_BSUID));
        }
        // The old number's next owner is someone else.
        assert_eq!(resolve(&db, Some(PHONE), Some(STRANGER)).await, key(PHONE));
        let all = contacts(&db).await;
        assert_eq!(all[0], ours);
        assert_eq!(all[1].1, PHONE);
    }

    #[tokio::test]
    async fn a_late_webhook_with_the_old_identifiers_changes_nothing() {
        let db = db().await;
        resolve(&db, Some(PHONE), Some(BSUID)).await;
        change(
            &db,
            ids(Some(PHONE), Some(BSUID)),
            ids(Some(NEW_PHONE), Some(NEW_BSUID)),
        )
        .await;
        let after = contacts(&db).await;
        assert_eq!(after[0].1, NEW_PHONE);
        // Redelivered from before the change: it finds the contact by its old BSUID.
        assert_eq!(resolve(&db, Some(PHONE), Some(BSUID)).await, key(NEW_PHONE));
        assert_eq!(contacts(&db).await, after);
    }

    #[tokio::test]
    async fn a_number_that_changed_hands_unannounced_gets_a_contact_of_its_own() {
        let db = db().await;
        resolve(&db, Some(PHONE), Some(BSUID)).await;
        let ours = contacts(&db).await[0].0;
        // Meta pairs the number with another BSUID: a BSUID is regenerated with every
        // number change, so this is the number's next owner (the change was never seen).
        assert_eq!(resolve(&db, Some(PHONE), Some(STRANGER)).await, key(PHONE));
        let all = contacts(&db).await;
        assert_eq!(all[0], (ours, BSUID.to_string(), vec![]), "ours, by BSUID");
        assert_eq!(all[1].1.as_str(), PHONE);
        assert_eq!(all[1].2, [STRANGER.to_string()]);
        assert_eq!(resolve(&db, None, Some(BSUID)).await, key(BSUID));
    }

    #[tokio::test]
    async fn a_new_number_announced_without_its_bsuid_learns_it_from_the_next_message() {
        let db = db().await;
        resolve(&db, Some(PHONE), Some(BSUID)).await;
        let id = contacts(&db).await[0].0;
        // The older `user_changed_number`: the new phone, no new BSUID.
        change(&db, ids(Some(PHONE), None), ids(Some(NEW_PHONE), None)).await;
        // Its next message pairs the new phone with the new BSUID: the same customer, not a
        // new owner of the number (their old BSUID is no longer their pairing).
        assert_eq!(
            resolve(&db, Some(NEW_PHONE), Some(NEW_BSUID)).await,
            key(NEW_PHONE)
        );
        assert_eq!(
            contacts(&db).await,
            [(
                id,
                NEW_PHONE.to_string(),
                vec![BSUID.to_string(), NEW_BSUID.to_string()]
            )]
        );
        // And now that pairing is current: another BSUID with this number is a new owner.
        assert_eq!(
            resolve(&db, Some(NEW_PHONE), Some(STRANGER)).await,
            key(NEW_PHONE)
        );
        let all = contacts(&db).await;
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].1, NEW_BSUID, "ours, keyed by its current BSUID");
    }

    #[tokio::test]
    async fn a_link_that_would_create_a_taken_identifier_writes_nothing() {
        let db = db().await;
        let by_bsuid = contact(&db, BSUID).await;
        let linked = db
            .link(Link {
                channel: CH.into(),
                contact: None,
                key: Some(PHONE.into()),
                alias: Some(BSUID.into()),
                ..Link::default()
            })
            .await
            .unwrap();
        assert!(
            matches!(&linked, Linked::Conflict { owner: Some(owner), .. } if owner == BSUID),
            "{linked:?}"
        );
        assert_eq!(contacts(&db).await, [(by_bsuid, BSUID.to_string(), vec![])]);
    }

    #[tokio::test]
    async fn identity_changes_that_cannot_apply_change_nothing() {
        let db = db().await;
        let unknown = change(&db, ids(Some(PHONE), None), ids(Some(NEW_PHONE), None)).await;
        assert_eq!(unknown, IdentityChanged::UnknownContact);
        assert_eq!(
            change(&db, ids(Some(PHONE), None), ids(None, None)).await,
            IdentityChanged::NothingNew
        );
        let old = contact(&db, PHONE).await;
        let other = contact(&db, NEW_PHONE).await;
        let conflict = change(
            &db,
            ids(Some(PHONE), None),
            ids(Some(NEW_PHONE), Some(NEW_BSUID)),
        )
        .await;
        assert!(
            matches!(&conflict, IdentityChanged::Conflict(why) if why.contains(NEW_PHONE)),
            "{conflict:?}"
        );
        assert_eq!(
            contacts(&db).await,
            [
                (old, PHONE.to_string(), vec![]),
                (other, NEW_PHONE.to_string(), vec![])
            ],
            "all or nothing: not even the new BSUID was linked"
        );
    }
}
