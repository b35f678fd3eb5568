//! Checkpoints a file database's write-ahead log on a thread of its own.
//!
//! SQLite checkpoints the WAL (copies its pages into the database file and syncs it) on the
//! connection whose commit crosses `wal_autocheckpoint` pages: that is always the writer,
//! the one serial resource, and under load the checkpoints were a seventh of its time. So
//! the writer's automatic checkpoint is off (`wal_autocheckpoint = 0`) and this thread runs
//! a `PASSIVE` checkpoint on a connection of its own every [`EVERY`] while there were
//! commits. A passive checkpoint takes no lock a writer or reader waits for: it copies what
//! no reader still needs, and the writer starts the log over at its next commit once all
//! of it is copied (as after an automatic checkpoint). It must stop before the writer
//! closes its connection, so that the writer's close (the last connection's) checkpoints
//! the rest and removes the WAL.

use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::OpenFlags;

use super::error::StoreError;

/// How often the log is checkpointed while there are commits: at a few thousand pages a
/// second under load, this keeps it near SQLite's default of 1,000 pages.
pub const EVERY: Duration = Duration::from_millis(200);

/// The checkpointing thread; [`Checkpointer::stop`] ends it.
pub struct Checkpointer {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Checkpointer {
    /// Opens a connection to the database at `path` and starts checkpointing it after each
    /// change of `commits` (the writer's count of groups written).
    pub fn start(
        path: &Path,
        commits: tokio::sync::watch::Receiver<u64>,
    ) -> Result<Self, StoreError> {
        let conn = rusqlite::Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("flowgate-checkpoint".into())
            .spawn(move || run(conn, commits, stopped))
            .map_err(StoreError::WriterThread)?;
        Ok(Checkpointer { stop, thread })
    }

    /// Ends the thread (after the checkpoint it may be running) and closes its connection.
    pub fn stop(self) {
        let _ = self.stop.send(());
        if self.thread.join().is_err() {
            tracing::error!("the WAL checkpoint thread panicked");
        }
    }
}

fn run(
    conn: rusqlite::Connection,
    commits: tokio::sync::watch::Receiver<u64>,
    stopped: mpsc::Receiver<()>,
) {
    let mut seen = *commits.borrow();
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(EVERY) {
        let now = *commits.borrow();
        if now == seen {
            continue;
        }
        seen = now;
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "checkpointing the database's WAL failed; retrying after the next commit");
        }
    }
}
