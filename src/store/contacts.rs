//! Contacts (`contacts`, `contact_aliases`): who a contact is, the identifiers WhatsApp
//! gives a customer (a phone number, a business-scoped user id) resolved to one contact per
//! channel, and changed when Meta says the customer's identity changed (see ARCHITECTURE.md, "One
//! contact per customer").
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
//! On SQLite a resolution that wrote nothing is remembered ([`ResolvedCache`]), so a known
//! customer's next webhook costs no query: only this process writes identities (SQLite has
//! one server process), and every identity write forgets everything remembered. On
//! PostgreSQL other instances write identities too, so nothing is remembered; identity
//! writes of a channel take its advisory lock (`store::identities`).
//!
//! A contact's policy state (consent, the window) is written by its turn, or alone when it
//! changes outside one ([`Db::save_contact_policy`]); the sender reads it back for many
//! contacts at once ([`Db::contacts_for_policy`]).

use chrono::{DateTime, Utc};

use super::db::{Backend, Db};
use super::db::{with_pool, with_writer};
use super::error::StoreError;
use super::identities::{IdentityConn, LOOKUP, LookupRow, SqliteIds, lock_channel, ready};
use super::resolved_cache::ResolvedCache;
use super::sql::{from_millis, json_elements, no_index, placeholders};
use crate::domain::{Contact, PolicyState, is_bsuid};

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
pub(super) struct Link {
    pub(super) channel: String,
    pub(super) contact: Option<i64>,
    pub(super) key: Option<String>,
    pub(super) alias: Option<String>,
    pub(super) displace: bool,
    pub(super) number_changed: bool,
    pub(super) now: i64,
}

/// How a link job ended.
#[derive(Debug)]
pub(super) enum Linked {
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

/// What a lookup's answer asks [`Db::resolve_contact`] to do.
enum Resolution {
    /// Nothing to write: what the database says now holds until an identity write (so it
    /// is remembered).
    Settled(String),
    /// A pairing to record first; the key answers if it conflicts.
    Link(Link, String),
    /// The answer as it is, not remembered.
    Answer(Resolved),
}

// A row as the database returns it.
type PolicyContactRaw = (i64, String, Option<String>, String, Option<i64>, String);

/// How a webhook's resolution ends when its identifiers name two contacts (an import
/// reports the conflict without it: it writes neither).
const BSUID_ANSWERS: &str = "; the BSUID's contact answers";

/// The contacts [`LOOKUP`]'s rows name for `ids`' BSUID and phone.
fn known(rows: &[LookupRow], ids: Identifiers<'_>) -> (Option<Known>, Option<Known>) {
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
    (find(ids.bsuid), find(ids.phone))
}

/// Which contact an operator's identifiers name, resolved inside a writer job
/// ([`identify`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Identified {
    /// A contact that existed; `relinked` when this resolution changed its identifiers.
    Existing { key: String, relinked: bool },
    /// A contact created by this resolution.
    Created { key: String },
    /// The identifiers name two different contacts, or a pairing would take another's
    /// identifier: nothing was written.
    Conflict(String),
}

/// [`Db::resolve_contact`]'s rules on the writer's handle, inside the caller's job (an
/// import writes many contacts in one transaction): the same lookup, the same
/// [`resolution`], the same link job. Unlike a webhook's resolution, a contact named for
/// the first time is created here (there is no turn to create it). The caller forgets
/// what the [`ResolvedCache`] remembers before and after its job.
pub(super) async fn identify(
    db: &mut impl IdentityConn,
    channel: &str,
    ids: Identifiers<'_>,
    now: DateTime<Utc>,
) -> Result<Option<Identified>, StoreError> {
    let Some(new_key) = ids.new_key() else {
        return Ok(None);
    };
    let found = db.lookup(channel, ids.bsuid, ids.phone).await?;
    let identified = match resolution(channel, ids, new_key, known(&found, ids), now) {
        Resolution::Settled(key) => Identified::Existing {
            key,
            relinked: false,
        },
        Resolution::Link(link, _) => {
            let created = link.contact.is_none();
            match link.run(db).await? {
                Linked::Key { key, .. } if created => Identified::Created { key },
                Linked::Key { key, .. } => Identified::Existing {
                    key,
                    relinked: true,
                },
                Linked::Conflict { why, .. } => Identified::Conflict(why),
            }
        }
        Resolution::Answer(Resolved {
            conflict: Some(why),
            ..
        }) => Identified::Conflict(why.replace(BSUID_ANSWERS, "")),
        Resolution::Answer(Resolved { key, .. }) => {
            let create = Link {
                channel: channel.to_string(),
                key: Some(key),
                now: now.timestamp_millis(),
                ..Link::default()
            };
            match create.run(db).await? {
                Linked::Key { key, .. } => Identified::Created { key },
                Linked::Conflict { why, .. } => Identified::Conflict(why),
            }
        }
    };
    Ok(Some(identified))
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
        let by = ResolvedCache::by(channel, ids.phone, ids.bsuid);
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
        let found = self.lookup(channel, ids).await?;
        Ok(Some(match resolution(channel, ids, new_key, found, now) {
            Resolution::Settled(key) => {
                if let Some(cache) = cache {
                    cache.remember(generation, by, &key);
                }
                Resolved {
                    key,
                    conflict: None,
                }
            }
            Resolution::Link(link, fallback) => self.linked(link, fallback).await?,
            Resolution::Answer(resolved) => resolved,
        }))
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
        let rows: Vec<LookupRow> = with_pool!(self, |pool| {
            sqlx::query_as(LOOKUP)
                .bind(channel)
                .bind(ids.bsuid)
                .bind(ids.phone)
                .fetch_all(pool)
                .await?
        });
        Ok(known(&rows, ids))
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
    pub(super) async fn link(&self, link: Link) -> Result<Linked, StoreError> {
        match &self.backend {
            Backend::Sqlite(sqlite) => {
                sqlite.identities.forget_all();
                let linked = sqlite
                    .writer
                    .run_raw(move |db| ready(link.run(&mut SqliteIds(db))))
                    .await?;
                if matches!(linked, Linked::Key { .. }) {
                    sqlite.identities.forget_all();
                }
                Ok(linked)
            }
            Backend::Postgres(postgres) => {
                let mut tx = postgres.pool.begin().await?;
                lock_channel(&mut tx, &link.channel).await?;
                let linked = link.run(&mut *tx).await?;
                tx.commit().await?;
                Ok(linked)
            }
        }
    }

    /// What this process remembers of resolved identities; a backend whose identities
    /// other processes write too (PostgreSQL) has none.
    fn resolved_cache(&self) -> Option<&ResolvedCache> {
        match &self.backend {
            Backend::Sqlite(sqlite) => Some(&sqlite.identities),
            Backend::Postgres(_) => None,
        }
    }

    /// Writes a contact's policy state alone (consent and window changes that arrive outside
    /// a turn: statuses, preferences, send errors). Callers hold the contact's lock.
    pub async fn save_contact_policy(
        &self,
        contact_id: i64,
        policy: &PolicyState,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        const SQL: &str = "UPDATE contacts SET policy = $1, updated_at = $2 WHERE id = $3";
        let json = serde_json::to_string(policy)?;
        let n = with_writer!(self, |pool| {
            sqlx::query(SQL)
                .bind(json)
                .bind(now.timestamp_millis())
                .bind(contact_id)
                .execute(pool)
                .await?
                .rows_affected()
        });
        if n == 0 {
            return Err(StoreError::UnknownContact { id: contact_id });
        }
        Ok(())
    }

    /// The window and consent part of some contacts (what the sender decides again with),
    /// by contact id.
    pub async fn contacts_for_policy(
        &self,
        ids: &[i64],
    ) -> Result<Vec<(i64, Contact)>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let list = placeholders(1, chunk.len());
            let sql = format!(
                "SELECT id, wa_id, name, attrs, last_customer_message_at, policy FROM contacts \
                WHERE id IN ({list})"
            );
            let rows: Vec<PolicyContactRaw> = match &self.backend {
                Backend::Sqlite(sqlite) => {
                    let args: Vec<&dyn rusqlite::ToSql> =
                        chunk.iter().map(|id| id as &dyn rusqlite::ToSql).collect();
                    sqlite
                        .readers
                        .query(&sql, &args, |row| Ok(PolicyContactRaw::try_from(row)?))?
                }
                Backend::Postgres(postgres) => {
                    let mut q = sqlx::query_as(&sql);
                    for id in chunk {
                        q = q.bind(*id);
                    }
                    q.fetch_all(&postgres.pool).await?
                }
            };
            for (id, wa_id, name, attrs, last, policy) in rows {
                let mut contact = Contact::new(wa_id);
                contact.name = name;
                contact.attrs = serde_json::from_str(&attrs)?;
                contact.last_customer_message_at = last
                    .map(|ms| from_millis(ms, "contacts.last_customer_message_at"))
                    .transpose()?;
                contact.policy = serde_json::from_str(&policy)?;
                out.push((id, contact));
            }
        }
        Ok(out)
    }
}

/// What the contacts `ids` name (`found`: by BSUID, by phone) ask for; `new_key` is the key
/// a new contact gets.
fn resolution(
    channel: &str,
    ids: Identifiers<'_>,
    new_key: &str,
    (by_bsuid, by_phone): (Option<Known>, Option<Known>),
    now: DateTime<Utc>,
) -> Resolution {
    let link = |contact, key: Option<&str>, alias: Option<&str>, displace| Link {
        channel: channel.to_string(),
        contact,
        key: key.map(str::to_string),
        alias: alias.map(str::to_string),
        displace,
        number_changed: false,
        now: now.timestamp_millis(),
    };
    match (by_bsuid, by_phone, ids.phone, ids.bsuid) {
        (Some(b), Some(p), ..) if b.id == p.id => Resolution::Settled(b.key),
        (Some(b), Some(p), ..) => Resolution::Answer(Resolved {
            conflict: Some(format!(
                "BSUID {} is contact {} and phone {} is contact {}: one customer, two \
                 contacts (not merged){BSUID_ANSWERS}",
                ids.bsuid.unwrap_or_default(),
                b.id,
                ids.phone.unwrap_or_default(),
                p.id
            )),
            key: b.key,
        }),
        // Known by this BSUID alone, now with a phone: the phone is theirs.
        (Some(b), None, Some(phone), _) if b.by_key && is_bsuid(&b.key) => {
            Resolution::Link(link(Some(b.id), Some(phone), None, false), b.key)
        }
        (Some(b), None, ..) => Resolution::Settled(b.key),
        // The phone's contact is paired with another BSUID: the number has a new owner.
        (None, Some(p), _, Some(bsuid)) if p.paired => {
            Resolution::Link(link(None, Some(&p.key), Some(bsuid), true), p.key)
        }
        (None, Some(p), _, Some(bsuid)) => {
            Resolution::Link(link(Some(p.id), None, Some(bsuid), false), p.key)
        }
        (None, Some(p), _, None) => Resolution::Settled(p.key),
        (None, None, Some(phone), Some(bsuid)) => Resolution::Link(
            link(None, Some(phone), Some(bsuid), false),
            phone.to_string(),
        ),
        // A new contact, created by its first turn (not remembered: until it is, the
        // lookup is what would notice a BSUID-keyed contact learn a phone).
        (None, None, ..) => Resolution::Answer(Resolved {
            key: new_key.to_string(),
            conflict: None,
        }),
    }
}

/// A link's answer when `identifier` already names contact `other` (not `contact`, or not
/// the new contact the link was to create, whose key then answers instead).
fn conflict(identifier: &str, other: (i64, String), contact: Option<i64>) -> Linked {
    let whose = contact.map_or("a new contact".to_string(), |c| format!("contact {c}"));
    Linked::Conflict {
        why: format!(
            "{identifier} already names contact {}, not {whose} (not merged)",
            other.0
        ),
        owner: contact.is_none().then_some(other.1),
    }
}

impl Link {
    /// Runs the link on `db`, inside the caller's transaction. Everything is checked
    /// before anything is written.
    pub(super) async fn run(&self, db: &mut impl IdentityConn) -> Result<Linked, StoreError> {
        match (self.contact, self.key.as_deref()) {
            (Some(contact), _) => self.relink(db, contact).await,
            (None, Some(key)) => self.create(db, key).await,
            (None, None) => Err(StoreError::Corrupt("a new contact without a key".into())),
        }
    }

    /// Creates a contact keyed by `key` with the link's alias; first moves `key` off the
    /// contact holding it when the link displaces it.
    async fn create(&self, db: &mut impl IdentityConn, key: &str) -> Result<Linked, StoreError> {
        let channel = self.channel.as_str();
        if let Some(alias) = self.alias.as_deref()
            && let Some(other) = db.owner(channel, alias).await?
        {
            return Ok(conflict(alias, other, None));
        }
        if let Some(holder) = db.owner(channel, key).await? {
            if !self.displace || holder.1 != key {
                return Ok(conflict(key, holder, None));
            }
            // The number has a new owner: its old contact is keyed by its BSUID.
            let Some(bsuid) = db.take_current_alias(channel, holder.0).await? else {
                return Ok(conflict(key, holder, None));
            };
            db.set_key(holder.0, &bsuid, self.now).await?;
        }
        let id = db.insert_contact(channel, key, self.now).await?;
        if let Some(alias) = self.alias.as_deref() {
            self.add_alias(db, id, alias, !is_bsuid(key)).await?;
        }
        Ok(Linked::Key {
            contact_id: id,
            key: key.to_string(),
        })
    }

    /// Gives `contact` the link's key (its old key stays as an alias if it is a BSUID) and
    /// alias.
    async fn relink(&self, db: &mut impl IdentityConn, contact: i64) -> Result<Linked, StoreError> {
        let channel = self.channel.as_str();
        let old_key: String = db
            .key_of(contact, channel)
            .await?
            .ok_or(StoreError::UnknownContact { id: contact })?;
        let new_key = self.key.as_deref().filter(|k| *k != old_key);
        let alias = self.alias.as_deref();
        for identifier in new_key.iter().chain(alias.iter()) {
            if let Some(other) = db
                .owner(channel, identifier)
                .await?
                .filter(|other| other.0 != contact)
            {
                return Ok(conflict(identifier, other, Some(contact)));
            }
        }
        if self.number_changed {
            db.clear_current(contact).await?;
        }
        let mut key = old_key.clone();
        if let Some(new_key) = new_key {
            db.delete_alias(channel, new_key).await?;
            db.set_key(contact, new_key, self.now).await?;
            if is_bsuid(&old_key) {
                // Known by this BSUID alone until now, it is the phone's pairing, unless
                // the number changed (which made a new BSUID).
                let current = !self.number_changed && !is_bsuid(new_key);
                self.add_alias(db, contact, &old_key, current).await?;
            }
            key = new_key.to_string();
        }
        if let Some(alias) = alias.filter(|a| *a != key) {
            self.add_alias(db, contact, alias, !is_bsuid(&key)).await?;
        }
        Ok(Linked::Key {
            contact_id: contact,
            key,
        })
    }

    /// Adds (or updates) an alias of `contact`, which the caller checked names no other
    /// contact; a `current` one replaces the contact's current pairing.
    async fn add_alias(
        &self,
        db: &mut impl IdentityConn,
        contact: i64,
        identifier: &str,
        current: bool,
    ) -> Result<(), StoreError> {
        if current {
            db.clear_current(contact).await?;
        }
        db.upsert_alias(&self.channel, identifier, contact, current)
            .await
    }
}

// The admin API's reads: contacts and conversations, a page at a time.

/// Which contacts [`Db::contact_page`] lists: those of `channel` with an id above `after`,
/// in id order, at most `limit`, narrowed by each filter given.
#[derive(Debug, Clone, Default)]
pub struct ContactFilter {
    pub channel: String,
    /// Only the contact keyed by this `wa_id`.
    pub wa_id: Option<String>,
    /// Only contacts with this tag.
    pub tag: Option<String>,
    /// Only contacts whose number or name contains this text.
    pub search: Option<String>,
    /// Only contacts who wrote at or after this time (their window may be open).
    pub wrote_since: Option<DateTime<Utc>>,
    /// Only contacts with at least one message (a conversation).
    pub with_messages: bool,
    pub after: i64,
    pub limit: i64,
}

/// One contact as the admin API lists it: the whole [`Contact`], its session and when its
/// latest message was written.
#[derive(Debug, Clone)]
pub struct ContactSummary {
    pub id: i64,
    pub contact: Contact,
    pub session: Option<super::SessionRow>,
    pub last_message_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

type SummaryRaw = (
    super::campaigns::AudienceRaw,
    (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
    ),
    (Option<i64>, Option<i64>, i64),
);

impl Db {
    /// A page of contacts by `filter` (see [`ContactFilter`]), in id order.
    pub async fn contact_page(
        &self,
        filter: &ContactFilter,
    ) -> Result<Vec<ContactSummary>, StoreError> {
        let postgres = self.is_postgres();
        let sql = format!(
            "SELECT c.id, c.wa_id, c.name, c.tags, c.attrs, c.timezone, \
                c.last_customer_message_at, c.policy, \
                s.flow_id, s.flow_version, s.step, s.state, s.updated_at, \
                (SELECT m.created_at FROM messages m WHERE m.contact_id = c.id \
                    ORDER BY m.id DESC LIMIT 1), \
                c.created_at \
            FROM contacts c LEFT JOIN sessions s ON s.contact_id = c.id \
            WHERE {channel} = $1 AND c.id > $2 \
                AND (CAST($4 AS TEXT) IS NULL OR c.wa_id = $4) \
                AND (CAST($5 AS TEXT) IS NULL \
                    OR EXISTS (SELECT 1 FROM {tags} WHERE t.value = $5)) \
                AND (CAST($6 AS TEXT) IS NULL OR LOWER(c.wa_id) LIKE LOWER($6) ESCAPE '\\' \
                    OR LOWER(c.name) LIKE LOWER($6) ESCAPE '\\') \
                AND (CAST($7 AS BIGINT) IS NULL OR c.last_customer_message_at >= $7) \
                AND ($8 = FALSE OR EXISTS (SELECT 1 FROM messages m WHERE m.contact_id = c.id)) \
            ORDER BY c.id LIMIT $3",
            channel = no_index("c.channel", postgres),
            tags = json_elements("c.tags", postgres),
        );
        let search = filter.search.as_deref().map(like_pattern);
        let rows: Vec<SummaryRow> = with_pool!(self, |pool| {
            sqlx::query_as(&sql)
                .bind(&filter.channel)
                .bind(filter.after)
                .bind(filter.limit.max(0))
                .bind(filter.wa_id.as_deref())
                .bind(filter.tag.as_deref())
                .bind(search.as_deref())
                .bind(filter.wrote_since.map(|t| t.timestamp_millis()))
                .bind(filter.with_messages)
                .fetch_all(pool)
                .await?
        });
        rows.into_iter().map(|r| summary(r.into_parts())).collect()
    }
}

/// A [`ContactSummary`] row as SQLite returns it (15 columns, more than a tuple decodes).
#[derive(Debug)]
struct SummaryRow(SummaryRaw);

impl SummaryRow {
    fn into_parts(self) -> SummaryRaw {
        self.0
    }
}

super::sql::from_row_on_every_backend!(SummaryRow, |row| {
    Ok(Self((
        (
            row.try_get(0)?,
            row.try_get(1)?,
            row.try_get(2)?,
            row.try_get(3)?,
            row.try_get(4)?,
            row.try_get(5)?,
            row.try_get(6)?,
            row.try_get(7)?,
        ),
        (
            row.try_get(8)?,
            row.try_get(9)?,
            row.try_get(10)?,
            row.try_get(11)?,
        ),
        (row.try_get(12)?, row.try_get(13)?, row.try_get(14)?),
    )))
});

fn summary(raw: SummaryRaw) -> Result<ContactSummary, StoreError> {
    let (contact, (flow_id, flow_version, step, state), (session_at, last, created)) = raw;
    let (id, contact) = super::campaigns::audience_contact(contact)?;
    let session = match (flow_id, flow_version, step, state, session_at) {
        (Some(flow_id), Some(flow_version), Some(step), Some(state), Some(at)) => {
            Some(super::SessionRow {
                flow_id,
                flow_version,
                step,
                state: serde_json::from_str(&state)?,
                updated_at: from_millis(at, "sessions.updated_at")?,
            })
        }
        _ => None,
    };
    Ok(ContactSummary {
        id,
        contact,
        session,
        last_message_at: last
            .map(|ms| from_millis(ms, "messages.created_at"))
            .transpose()?,
        created_at: from_millis(created, "contacts.created_at")?,
    })
}

/// `%text%` for `LIKE … ESCAPE '\'`, with the text's own `%`, `_` and `\` matched as
/// themselves.
fn like_pattern(text: &str) -> String {
    let mut pattern = String::from("%");
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}
