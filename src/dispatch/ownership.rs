//! Who runs a contact's turns when several instances share one database (PostgreSQL).
//!
//! An instance runs a contact's turns (its customer's messages, statuses and preferences
//! from the inbox, its timers) only while it holds the contact's lease
//! (`store::leases`): the inbound worker claims inbox rows only of contacts whose lease it
//! took, and a timer fires only under its contact's lease, checked again once taken. One
//! instance at a time therefore works on a contact, in the inbox's id order, and different
//! contacts run in parallel on every instance.
//!
//! [`Ownership`] keeps this instance's side: its owner id, the leases it holds with how
//! many of its workers use each ([`Ownership::hold`], [`Ownership::unhold`]), the heartbeat
//! that keeps them alive ([`Ownership::heartbeat`], every [`HEARTBEAT`] to [`LEASE`] from
//! now) and the release of those nobody here uses any more ([`Ownership::release_idle`]),
//! which notifies the other instances. An instance that dies keeps its leases until they
//! expire ([`LEASE`] after its last heartbeat); then any instance takes them and runs the
//! contact's rows from the oldest unprocessed one.
//!
//! On SQLite there is no `Ownership` (`Runtime::ownership` is `None`): one process, and
//! its per-contact locks already order a contact's turns.

use std::collections::HashMap;
use std::hash::BuildHasher as _;
use std::sync::Mutex;
use std::time::Duration;

use crate::clock::SharedClock;
use crate::store::{Db, LeaseKey, StoreError};

/// How long a lease lasts without a heartbeat: how long a dead instance's contacts wait
/// before another instance takes them over.
pub const LEASE: Duration = Duration::from_secs(12);
/// How often an instance extends its leases.
pub const HEARTBEAT: Duration = Duration::from_secs(3);
/// Contacts' leases taken per inbox claim at most, so one instance waking first does not
/// take every waiting contact.
pub const TAKE_PER_CLAIM: i64 = 256;

/// Connections of the leases' own pool (`Db::side_pool`): the notifications' listener
/// holds one, the lease statements (one at a time, under the gate, and the heartbeat) the
/// others.
pub const SIDE_POOL: u32 = 3;

/// This instance's leases.
#[derive(Debug)]
pub struct Ownership {
    db: Db,
    clock: SharedClock,
    owner: String,
    /// The leases this instance holds in the database, with how many of its workers use
    /// each now (0: held, idle, to be released).
    held: Mutex<HashMap<LeaseKey, usize>>,
    /// Held while leases are taken together with what is read under them, and while idle
    /// leases are released, so nothing is read under a lease that is being given back.
    gate: tokio::sync::Mutex<()>,
}

impl Ownership {
    /// This instance's side of the leases on `db`, under an owner id of its own (the process
    /// id and a random number: unique across instances and restarts).
    pub fn new(db: Db, clock: SharedClock) -> Self {
        let salt = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
        Self {
            db,
            clock,
            owner: format!("{}-{salt:016x}", std::process::id()),
            held: Mutex::new(HashMap::new()),
            gate: tokio::sync::Mutex::new(()),
        }
    }

    /// The database handle the leases use (a pool of their own, see [`SIDE_POOL`]).
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The owner id this instance's leases carry.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<LeaseKey, usize>> {
        self.held.lock().expect("ownership lock")
    }

    fn until(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now() + chrono::Duration::from_std(LEASE).expect("a short duration")
    }

    /// Waits for the gate: hold it from taking leases to holding what was read under them.
    pub async fn gate(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.gate.lock().await
    }

    /// Takes (or keeps) the leases of contacts with inbox rows due now (hold the
    /// [`Ownership::gate`]); whether any of them is new to this instance (its rows may lie
    /// below what this instance has read so far).
    pub async fn take_inbox(&self) -> Result<bool, StoreError> {
        let taken = self
            .db
            .take_inbox_leases(&self.owner, self.clock.now(), self.until(), TAKE_PER_CLAIM)
            .await?;
        let mut held = self.held();
        let mut new = false;
        for lease in taken {
            held.entry(lease).or_insert_with(|| {
                new = true;
                0
            });
        }
        Ok(new)
    }

    /// One more worker uses `lease` (held: taken by [`Ownership::take_inbox`] or
    /// [`Ownership::acquire`]).
    pub fn hold(&self, lease: LeaseKey) {
        *self.held().entry(lease).or_insert(0) += 1;
    }

    /// A worker is done with `lease`; released by the next [`Ownership::release_idle`] if
    /// nobody else here uses it.
    pub fn unhold(&self, lease: &LeaseKey) {
        if let Some(n) = self.held().get_mut(lease) {
            *n = n.saturating_sub(1);
        }
    }

    /// Takes one contact's lease and holds it (a timer's turn); `false` when another
    /// instance holds it (try again later).
    pub async fn acquire(&self, lease: &LeaseKey) -> Result<bool, StoreError> {
        let _gate = self.gate().await;
        if let Some(n) = self.held().get_mut(lease) {
            *n += 1;
            return Ok(true);
        }
        let taken = self
            .db
            .take_contact_lease(&self.owner, lease, self.clock.now(), self.until())
            .await?;
        if taken {
            self.hold(lease.clone());
        }
        Ok(taken)
    }

    /// Unholds `lease` and releases the idle leases (the end of a timer's turn).
    pub async fn release(&self, lease: &LeaseKey) {
        self.unhold(lease);
        self.release_idle().await;
    }

    /// Gives back every lease nobody here uses (the other instances are notified); one that
    /// cannot be given back now stays held and is tried again next time.
    pub async fn release_idle(&self) {
        let _gate = self.gate().await;
        let idle: Vec<LeaseKey> = self
            .held()
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(lease, _)| lease.clone())
            .collect();
        if idle.is_empty() {
            return;
        }
        match self.db.release_contact_leases(&self.owner, &idle).await {
            Ok(_) => {
                let mut held = self.held();
                for lease in &idle {
                    if held.get(lease) == Some(&0) {
                        held.remove(lease);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, leases = idle.len(), "releasing contacts' leases failed; trying again later");
            }
        }
    }

    /// Extends this instance's leases every [`HEARTBEAT`], forever (the caller aborts it). A
    /// lease found gone (it expired, another instance took it: this process stalled longer
    /// than [`LEASE`]) is forgotten and logged.
    pub async fn heartbeat(&self) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.renew().await;
        }
    }

    /// One heartbeat.
    pub async fn renew(&self) {
        // Not under the gate (a claim holding it may wait for the main pool): only leases
        // held before the renewal began can be found lost. A lease wrongly forgotten here
        // (released and taken again meanwhile) is still renewed, and comes back into `held`
        // with the next claim or timer that takes it, which releases it again.
        let before: Vec<LeaseKey> = self.held().keys().cloned().collect();
        let kept = match self
            .db
            .renew_contact_leases(&self.owner, self.until())
            .await
        {
            Ok(kept) => kept,
            Err(e) => {
                tracing::warn!(error = %e, "extending contacts' leases failed; trying again");
                return;
            }
        };
        let kept: std::collections::HashSet<LeaseKey> = kept.into_iter().collect();
        let mut held = self.held();
        for lease in before.iter().filter(|l| !kept.contains(*l)) {
            if held.remove(lease).is_some_and(|users| users > 0) {
                tracing::error!(
                    channel = %lease.channel, contact = %lease.key,
                    "a contact's lease expired while this instance worked on it; another instance may run its turns too"
                );
            }
        }
    }

    /// How many leases this instance holds (for tests and metrics).
    pub fn held_count(&self) -> usize {
        self.held().len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::VirtualClock;
    use crate::store::conformance::{drop_schema, postgres_db, postgres_db_on};

    /// Two instances' `Ownership`s on one schema: a contact's lease is one instance's while
    /// any of its workers holds it, goes back when the last lets go (the other instance can
    /// take it then), and a heartbeat keeps what is held.
    #[tokio::test]
    async fn a_lease_is_held_while_any_worker_uses_it_and_released_when_idle() {
        let Some((db, schema)) = postgres_db().await else {
            return;
        };
        let clock: SharedClock = Arc::new(VirtualClock::new(VirtualClock::test_epoch()));
        let a = Ownership::new(db.clone(), clock.clone());
        let b = Ownership::new(postgres_db_on(&schema).await, clock.clone());
        assert_ne!(a.owner(), b.owner());
        let contact = LeaseKey::new("main", "1555");

        assert!(a.acquire(&contact).await.unwrap());
        assert!(
            a.acquire(&contact).await.unwrap(),
            "a second worker of A holds it too"
        );
        assert!(!b.acquire(&contact).await.unwrap());
        a.release(&contact).await;
        assert!(
            !b.acquire(&contact).await.unwrap(),
            "A's other worker still holds it"
        );
        a.renew().await;
        assert_eq!(a.held_count(), 1, "the heartbeat keeps a held lease");
        a.release(&contact).await;
        assert_eq!(a.held_count(), 0);
        assert_eq!(
            db.contact_lease_holder(&contact, clock.now())
                .await
                .unwrap(),
            None,
            "released in the database when idle"
        );
        assert!(
            b.acquire(&contact).await.unwrap(),
            "B takes it once A let go"
        );
        assert!(!a.acquire(&contact).await.unwrap());
        b.release(&contact).await;
        b.db().close().await;
        drop_schema(&db, &schema).await;
    }
}
