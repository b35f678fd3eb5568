//! Wake-ups from the other instances on one PostgreSQL database: `LISTEN` on the channels
//! migration 0014's triggers `NOTIFY` in the transactions that write (a webhook's updates
//! stored, an outbound message pending, a contact's lease released), so an instance starts
//! on work another stored instead of finding it at its next poll. The polls stay, slower,
//! as the safety net: a notification sent while the listener reconnects is lost, and the
//! listener says [`WakeUp::Reconnected`] so its user looks at everything once.

use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::mpsc;

use super::db::{Backend, Db};

/// The channels the listener follows, as the triggers name them.
pub const INBOX_CHANNEL: &str = "flowgate_inbox";
pub const OUTBOX_CHANNEL: &str = "flowgate_outbox";
pub const LEASES_CHANNEL: &str = "flowgate_leases";

/// How long the listener waits before connecting again after an error.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// What another instance (or this one) did that may leave work here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WakeUp {
    /// Webhook updates were stored.
    Inbox,
    /// An outbound message is pending on this channel.
    Outbox(String),
    /// A contact's lease was released: its next updates may be taken.
    Leases,
    /// The listener (re)connected: notifications may have been missed meanwhile.
    Reconnected,
}

impl Db {
    /// Wake-ups from every instance on this database, from a listener that reconnects on
    /// errors and ends when the receiver is dropped or the database closed; `None` on
    /// SQLite (one process: nobody else writes).
    pub fn wake_ups(&self) -> Option<mpsc::UnboundedReceiver<WakeUp>> {
        let Backend::Postgres(postgres) = &self.backend else {
            return None;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(listen(postgres.pool.clone(), tx));
        Some(rx)
    }
}

/// Listens until `tx`'s receiver is gone or the pool closes.
async fn listen(pool: sqlx::PgPool, tx: mpsc::UnboundedSender<WakeUp>) {
    loop {
        if tx.is_closed() || pool.is_closed() {
            return;
        }
        match follow(&pool, &tx).await {
            Ok(()) => return,
            Err(e) => {
                if pool.is_closed() {
                    return;
                }
                tracing::warn!(error = %e, "listening for other instances' notifications failed; reconnecting");
            }
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(RECONNECT_AFTER) => {}
        }
    }
}

/// One listener connection's life: `Ok` when nobody listens any more, `Err` to reconnect.
async fn follow(
    pool: &sqlx::PgPool,
    tx: &mpsc::UnboundedSender<WakeUp>,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener
        .listen_all([INBOX_CHANNEL, OUTBOX_CHANNEL, LEASES_CHANNEL])
        .await?;
    if tx.send(WakeUp::Reconnected).is_err() {
        return Ok(());
    }
    loop {
        let next = tokio::select! {
            _ = tx.closed() => return Ok(()),
            next = listener.try_recv() => next?,
        };
        let wake = match next {
            // The connection dropped; the next `try_recv` connects again.
            None => WakeUp::Reconnected,
            Some(n) => match n.channel() {
                INBOX_CHANNEL => WakeUp::Inbox,
                OUTBOX_CHANNEL => WakeUp::Outbox(n.payload().to_string()),
                LEASES_CHANNEL => WakeUp::Leases,
                _ => continue,
            },
        };
        if tx.send(wake).is_err() {
            return Ok(());
        }
    }
}
