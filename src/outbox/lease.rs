//! Which channels this instance sends for: one task per channel keeps trying to take the
//! channel's lease ([`Db::channel_lease`]) and, while it holds it, checks every
//! [`LeaseOptions::check_every`] that it still does.
//!
//! The channel's [`Sender`](super::Sender) sends, and the campaign dispatcher dispatches
//! the channel's runs, only while [`ChannelLeases::holds`] says so; so the number's
//! throughput, pair limit, `130429` back-off and messaging limit are counted in one process,
//! whichever instance that is. An instance that stops ([`ChannelLeases::release`]) gives its
//! leases up at once; one that dies loses them when PostgreSQL sees its connection end;
//! another instance takes each over within [`LeaseOptions::standby_poll`]. On SQLite every
//! lease is held at once (one instance per file).
//!
//! The overlap when a holder loses its connection but lives on (a network cut) is bounded:
//! it stops claiming at its next check, and the sends it had started finish (at most about
//! a second of sending, what a sender claims ahead).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::store::{ChannelLease, Db};

/// How often the leases are tried and checked.
#[derive(Debug, Clone, Copy)]
pub struct LeaseOptions {
    /// How often an instance without the lease tries to take it (how soon it takes over).
    pub standby_poll: Duration,
    /// How often the holder checks it still holds the lease (how long two instances may
    /// both send after the holder's connection was cut).
    pub check_every: Duration,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        Self {
            standby_poll: Duration::from_secs(1),
            check_every: Duration::from_secs(1),
        }
    }
}

/// The leases of this instance's channels, each tried and checked by a task of its own.
#[derive(Debug)]
pub struct ChannelLeases {
    held: HashMap<String, watch::Receiver<bool>>,
    stop: watch::Sender<bool>,
    tasks: tokio::sync::Mutex<JoinSet<()>>,
}

impl ChannelLeases {
    /// Starts trying to take the lease of each of `channels`.
    pub fn start(db: &Db, channels: &[String], options: LeaseOptions) -> Arc<Self> {
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut held = HashMap::new();
        // One instance per SQLite file: every lease is its own from the start.
        let sqlite = db.backend() == "sqlite";
        for channel in channels {
            let (tx, rx) = watch::channel(sqlite);
            held.insert(channel.clone(), rx);
            if sqlite {
                // Held from the start; the task only tells `release`.
                let mut stopped = stopped.clone();
                tasks.spawn(async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                    tx.send_replace(false);
                });
                continue;
            }
            tasks.spawn(keep(
                db.clone(),
                channel.clone(),
                options,
                tx,
                stopped.clone(),
            ));
        }
        Arc::new(Self {
            held,
            stop,
            tasks: tokio::sync::Mutex::new(tasks),
        })
    }

    /// Whether this instance holds `channel`'s lease now (a channel it does not manage:
    /// no).
    pub fn holds(&self, channel: &str) -> bool {
        self.held.get(channel).is_some_and(|rx| *rx.borrow())
    }

    /// Follows `channel`'s lease: `true` while this instance holds it. `None` for a channel
    /// it does not manage.
    pub fn watch(&self, channel: &str) -> Option<watch::Receiver<bool>> {
        self.held.get(channel).cloned()
    }

    /// Waits (at most `timeout`) until this instance holds `channel`'s lease; whether it
    /// does.
    pub async fn wait_for(&self, channel: &str, timeout: Duration) -> bool {
        let Some(mut rx) = self.watch(channel) else {
            return false;
        };
        tokio::time::timeout(timeout, rx.wait_for(|held| *held))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Gives every lease up (call after the senders stopped) and waits for that.
    pub async fn release(&self) {
        self.stop.send_replace(true);
        let mut tasks = self.tasks.lock().await;
        while tasks.join_next().await.is_some() {}
    }
}

/// One channel's lease for as long as the instance runs: take it when free, check it while
/// held, tell `held` each change; on stop, release it.
async fn keep(
    db: Db,
    channel: String,
    options: LeaseOptions,
    held: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut lease: Option<ChannelLease> = None;
    while !*stop.borrow() {
        let holds = match lease.as_mut() {
            Some(l) => l.try_take().await,
            None => match db.channel_lease(&channel).await {
                Ok(mut l) => {
                    let taken = l.try_take().await;
                    lease = Some(l);
                    taken
                }
                Err(e) => Err(e),
            },
        };
        let holds = match holds {
            Ok(holds) => holds,
            Err(e) => {
                // The connection is gone or failing: a new one next round.
                if *held.borrow() {
                    tracing::error!(%channel, error = %e, "lost the channel's lease: this instance stops sending for it");
                } else {
                    tracing::warn!(%channel, error = %e, "cannot try the channel's lease");
                }
                lease = None;
                false
            }
        };
        let was = held.send_replace(holds);
        match (was, holds) {
            (false, true) => {
                tracing::info!(%channel, "this instance now sends for the channel (it holds its lease)")
            }
            (true, false) => {
                tracing::warn!(%channel, "this instance no longer holds the channel's lease: another sends for it")
            }
            _ => {}
        }
        let pause = if holds {
            options.check_every
        } else {
            options.standby_poll
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => {}
        }
    }
    held.send_replace(false);
    if let Some(lease) = lease {
        lease.release().await;
    }
}
