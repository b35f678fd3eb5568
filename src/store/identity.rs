//! Who a contact is: the identifiers WhatsApp gives a customer (a phone number, a
//! business-scoped user id) resolved to one contact per channel, and changed when Meta says
//! the customer's identity changed (DESIGN §3, FACTS.md §10.10).
//!
//! A contact is keyed by `contacts.wa_id`: its phone number when one is known (replies go
//! `to` it), else its BSUID. Its other identifiers are in `contact_aliases`: its BSUID while
//! it is keyed by phone, and BSUIDs it had before a change, for late or retried webhooks.
//! Old phone numbers are dropped: WhatsApp gives a number to someone else, a BSUID never.
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
}

/// What a link job does to one contact: a new key (the old one becomes an alias if it is a
/// BSUID), a new alias. `contact: None` creates the contact, keyed by `key`.
#[derive(Debug, Clone)]
struct Link {
    channel: String,
    contact: Option<i64>,
    key: Option<String>,
    alias: Option<String>,
    now: i64,
}

/// How a link job ended.
#[derive(Debug)]
enum Linked {
    Key { contact_id: i64, key: String },
    Conflict(String),
}

impl Db {
    /// The contact `ids` name on `channel`, by BSUID first, then phone; `None` when `ids` is
    /// empty. A pairing the database does not know yet is recorded: a phone for a contact
    /// known by BSUID alone becomes its key (replies go to the phone), a BSUID for a contact
    /// known by phone becomes its alias, and a new customer who comes with both is created
    /// with both (so a later webhook with the BSUID alone finds them).
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
        let link = |contact, key: Option<&str>, alias: Option<&str>| Link {
            channel: channel.to_string(),
            contact,
            key: key.map(str::to_string),
            alias: alias.map(str::to_string),
            now: now.timestamp_millis(),
        };
        let resolved = match (by_bsuid, by_phone) {
            (Some(b), Some(p)) if b.id == p.id => settled(b.key),
            (Some(b), Some(p)) => Resolved {
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
            (Some(b), None) => match ids.phone {
                None => settled(b.key),
                // Meta paired this BSUID with a phone no contact has: the phone is theirs now.
                Some(phone) => {
                    self.linked(link(Some(b.id), Some(phone), None), b.key)
                        .await?
                }
            },
            (None, Some(p)) => match ids.bsuid {
                None => settled(p.key),
                Some(bsuid) => {
                    self.linked(link(Some(p.id), None, Some(bsuid)), p.key)
                        .await?
                }
            },
            (None, None) => match (ids.phone, ids.bsuid) {
                (Some(phone), Some(bsuid)) => {
                    self.linked(link(None, Some(phone), Some(bsuid)), phone.to_string())
                        .await?
                }
                // A new contact, created by its first turn (not remembered: until it is,
                // the lookup is what would notice a BSUID-keyed contact learn a phone).
                _ => Resolved {
                    key: new_key.to_string(),
                    conflict: None,
                },
            },
        };
        Ok(Some(resolved))
    }

    /// Applies a `system` identity change: the contact the previous identifiers name (by
    /// BSUID first) takes the new phone as its key, and the new BSUID as an alias (or as its
    /// key, when it has no phone). Its previous BSUID stays an alias; its previous phone is
    /// dropped.
    pub async fn change_identity(
        &self,
        channel: &str,
        previous: Identifiers<'_>,
        new: Identifiers<'_>,
        now: DateTime<Utc>,
    ) -> Result<IdentityChanged, StoreError> {
        if previous.new_key().is_none() {
            return Ok(IdentityChanged::UnknownContact);
        }
        let (by_bsuid, by_phone) = self.lookup(channel, previous).await?;
        let Some(contact) = by_bsuid.or(by_phone) else {
            return Ok(IdentityChanged::UnknownContact);
        };
        let key = match (new.phone, new.bsuid) {
            (Some(phone), _) => Some(phone),
            (None, Some(bsuid)) if is_bsuid(&contact.key) => Some(bsuid),
            _ => None,
        };
        let alias = new.bsuid.filter(|b| Some(*b) != key);
        let linked = self
            .link(Link {
                channel: channel.to_string(),
                contact: Some(contact.id),
                key: key.map(str::to_string),
                alias: alias.map(str::to_string),
                now: now.timestamp_millis(),
            })
            .await?;
        Ok(match linked {
            Linked::Key { contact_id, key } => IdentityChanged::Changed { contact_id, key },
            Linked::Conflict(why) => IdentityChanged::Conflict(why),
        })
    }

    /// The contacts `ids`' BSUID and phone name (by key or alias).
    async fn lookup(
        &self,
        channel: &str,
        ids: Identifiers<'_>,
    ) -> Result<(Option<Known>, Option<Known>), StoreError> {
        // A key match first: it outranks an alias that (written before the key) repeats it.
        const SQL: &str = "SELECT wa_id, id, wa_id, 0 FROM contacts \
                WHERE channel = $1 AND wa_id IN ($2, $3) \
            UNION ALL SELECT a.identifier, c.id, c.wa_id, 1 FROM contact_aliases a \
                JOIN contacts c ON c.id = a.contact_id \
                WHERE a.channel = $1 AND a.identifier IN ($2, $3) \
            ORDER BY 4";
        let rows: Vec<(String, i64, String, i64)> = with_pool!(self, |pool| {
            sqlx::query_as(SQL)
                .bind(channel)
                .bind(ids.bsuid)
                .bind(ids.phone)
                .fetch_all(pool)
                .await?
        });
        let find = |id: Option<&str>| {
            let id = id?;
            rows.iter()
                .find(|(identifier, ..)| identifier == id)
                .map(|(_, contact, key, _)| Known {
                    id: *contact,
                    key: key.clone(),
                })
        };
        Ok((find(ids.bsuid), find(ids.phone)))
    }

    /// Runs `link`; `fallback` is the key to answer with if it conflicts.
    async fn linked(&self, link: Link, fallback: String) -> Result<Resolved, StoreError> {
        Ok(match self.link(link).await? {
            Linked::Key { key, .. } => Resolved {
                key,
                conflict: None,
            },
            Linked::Conflict(why) => Resolved {
                key: fallback,
                conflict: Some(why),
            },
        })
    }

    /// One writer job: checks that the new identifiers name no other contact, then writes
    /// them (all or nothing).
    async fn link(&self, link: Link) -> Result<Linked, StoreError> {
        match self {
            Db::Sqlite {
                writer, identities, ..
            } => {
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
        let contact = match (self.contact, &self.key) {
            (Some(id), _) => id,
            (None, Some(key)) => {
                db.prepare_cached(
                    "INSERT INTO contacts (channel, wa_id, created_at, updated_at) \
                     VALUES (?1, ?2, ?3, ?3) ON CONFLICT (channel, wa_id) DO NOTHING",
                )?
                .execute(rusqlite::params![channel, key, self.now])?;
                db.prepare_cached("SELECT id FROM contacts WHERE channel = ?1 AND wa_id = ?2")?
                    .query_row([channel, key], |row| row.get(0))?
            }
            (None, None) => return Err(StoreError::Corrupt("a new contact without a key".into())),
        };
        let old_key: String = db
            .prepare_cached("SELECT wa_id FROM contacts WHERE id = ?1 AND channel = ?2")?
            .query_row(rusqlite::params![contact, channel], |row| row.get(0))
            .optional()?
            .ok_or(StoreError::UnknownContact { id: contact })?;
        let owner = |identifier: &str| -> Result<Option<i64>, StoreError> {
            Ok(db
                .prepare_cached(
                    "SELECT id FROM contacts WHERE channel = ?1 AND wa_id = ?2 \
                     UNION ALL SELECT contact_id FROM contact_aliases \
                        WHERE channel = ?1 AND identifier = ?2 LIMIT 1",
                )?
                .query_row([channel, identifier], |row| row.get(0))
                .optional()?)
        };
        let new_key = self.key.as_deref().filter(|k| *k != old_key);
        let alias = self.alias.as_deref();
        for identifier in new_key.iter().chain(alias.iter()) {
            if let Some(other) = owner(identifier)?.filter(|other| *other != contact) {
                return Ok(Linked::Conflict(format!(
                    "{identifier} already names contact {other}, not contact {contact} \
                     (not merged)"
                )));
            }
        }
        let add_alias = |identifier: &str| -> Result<(), StoreError> {
            db.prepare_cached(
                "INSERT INTO contact_aliases (channel, identifier, contact_id) \
                 VALUES (?1, ?2, ?3) ON CONFLICT (channel, identifier) DO NOTHING",
            )?
            .execute(rusqlite::params![channel, identifier, contact])?;
            Ok(())
        };
        let mut key = old_key.clone();
        if let Some(new_key) = new_key {
            db.prepare_cached(
                "DELETE FROM contact_aliases WHERE channel = ?1 AND identifier = ?2",
            )?
            .execute([channel, new_key])?;
            db.prepare_cached("UPDATE contacts SET wa_id = ?1, updated_at = ?2 WHERE id = ?3")?
                .execute(rusqlite::params![new_key, self.now, contact])?;
            if is_bsuid(&old_key) {
                add_alias(&old_key)?;
            }
            key = new_key.to_string();
        }
        if let Some(alias) = alias.filter(|a| *a != key) {
            add_alias(alias)?;
        }
        Ok(Linked::Key {
            contact_id: contact,
            key,
        })
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
        let changed = db
            .change_identity(
                CH,
                ids(Some(PHONE), None),
                ids(Some(NEW_PHONE), None),
                now(),
            )
            .await
            .unwrap();
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
    async fn a_changed_bsuid_keeps_the_old_one_as_an_alias() {
        let db = db().await;
        // Keyed by phone: the new BSUID joins the old one as an alias.
        let with_phone = contact(&db, PHONE).await;
        resolve(&db, Some(PHONE), Some(BSUID)).await;
        let changed = db
            .change_identity(
                CH,
                ids(None, Some(BSUID)),
                ids(None, Some(NEW_BSUID)),
                now(),
            )
            .await
            .unwrap();
        assert_eq!(
            changed,
            IdentityChanged::Changed {
                contact_id: with_phone,
                key: PHONE.into()
            }
        );
        for bsuid in [BSUID, NEW_BSUID] {
            assert_eq!(resolve(&db, None, Some(bsuid)).await, key(PHONE));
        }

        // Keyed by BSUID (no phone known): the new BSUID is the key, the old one an alias.
        let db = super::tests::db().await;
        let without_phone = contact(&db, BSUID).await;
        db.change_identity(
            CH,
            ids(None, Some(BSUID)),
            ids(None, Some(NEW_BSUID)),
            now(),
        )
        .await
        .unwrap();
        assert_eq!(
            contacts(&db).await,
            [(
                without_phone,
                NEW_BSUID.to_string(),
                vec![BSUID.to_string()]
            )]
        );
        assert_eq!(resolve(&db, None, Some(BSUID)).await, key(NEW_BSUID));
    }

    #[tokio::test]
    async fn identity_changes_that_cannot_apply_change_nothing() {
        let db = db().await;
        let unknown = db
            .change_identity(
                CH,
                ids(Some(PHONE), None),
                ids(Some(NEW_PHONE), None),
                now(),
            )
            .await
            .unwrap();
        assert_eq!(unknown, IdentityChanged::UnknownContact);
        let old = contact(&db, PHONE).await;
        let other = contact(&db, NEW_PHONE).await;
        let conflict = db
            .change_identity(
                CH,
                ids(Some(PHONE), None),
                ids(Some(NEW_PHONE), Some(NEW_BSUID)),
                now(),
            )
            .await
            .unwrap();
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
