//! SQLite's hot reads, run on the calling thread on connections of their own.
//!
//! sqlx runs each SQLite connection on a worker thread of its own and hands it every
//! statement, and every row back, through channels; a pooled read also returns its
//! connection through a spawned task. For a point read by index (a few microseconds in
//! SQLite) those hand-offs cost more than the read, and each is a thread switch on a busy
//! machine. The reads of every reply (`Db::load_conversation`, the sender's contacts,
//! the inbound worker's claims) run here instead: synchronously, on the caller's thread,
//! through rusqlite on a connection taken from a small stack of idle ones (opened on
//! demand, each with its own statement cache).
//!
//! They never wait on a file database: in WAL mode a reader does not wait for the writer.
//! In memory (shared cache, for `chat` and tests) a read of a table the writer is writing
//! waits for its commit (SQLite's unlock-notify), which the writer thread makes without
//! needing the caller's runtime. The connections are `query_only`: nothing here writes.

use std::sync::Mutex;

use rusqlite::OpenFlags;
use sqlx::sqlite::SqliteConnectOptions;

use super::error::StoreError;
use super::sql::bind_numbered;

/// Idle connections kept; more may be open for a moment when more threads read at once.
const IDLE_MAX: usize = 8;

/// Statements each connection keeps prepared.
const STATEMENT_CACHE: usize = 64;

/// The readers of one SQLite database.
#[derive(Debug)]
pub(super) struct Readers {
    path: String,
    flags: OpenFlags,
    busy_timeout: std::time::Duration,
    /// `mmap_size` for a file database (`None` in memory).
    mmap_size: Option<i64>,
    idle: Mutex<Vec<rusqlite::Connection>>,
}

impl Readers {
    /// Readers of the database `options` open (the writer's), with the writer's busy
    /// timeout; `mmap_size` for a file database, `None` for a shared in-memory one (named
    /// by the options' file name).
    pub(super) fn new(
        options: &SqliteConnectOptions,
        busy_timeout: std::time::Duration,
        mmap_size: Option<i64>,
    ) -> Self {
        let in_memory = mmap_size.is_none();
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if in_memory {
            flags |= OpenFlags::SQLITE_OPEN_MEMORY | OpenFlags::SQLITE_OPEN_SHARED_CACHE;
        } else {
            flags |= OpenFlags::SQLITE_OPEN_PRIVATE_CACHE;
        }
        Self {
            path: options.get_filename().to_string_lossy().into_owned(),
            flags,
            busy_timeout,
            mmap_size,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Runs `read` on an idle connection (or a new one) and returns the connection to the
    /// idle ones. A connection whose read failed is closed rather than kept.
    pub(super) fn read<T>(
        &self,
        read: impl FnOnce(&rusqlite::Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let idle = self.idle.lock().expect("readers lock").pop();
        let conn = match idle {
            Some(conn) => conn,
            None => self.connect()?,
        };
        let result = read(&conn);
        if result.is_ok() {
            let mut idle = self.idle.lock().expect("readers lock");
            if idle.len() < IDLE_MAX {
                idle.push(conn);
            }
        }
        result
    }

    /// Every row of `sql` (`$n` parameters bound to `args[n - 1]`), each converted by `map`.
    pub(super) fn query<T>(
        &self,
        sql: &str,
        args: &[&dyn rusqlite::ToSql],
        mut map: impl FnMut(&rusqlite::Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        self.read(|conn| {
            let mut statement = conn.prepare_cached(sql)?;
            bind_numbered(&mut statement, args)?;
            let mut rows = statement.raw_query();
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(map(row)?);
            }
            Ok(out)
        })
    }

    /// The first row of `sql`, if any, converted by `map`.
    pub(super) fn query_optional<T>(
        &self,
        sql: &str,
        args: &[&dyn rusqlite::ToSql],
        map: impl FnOnce(&rusqlite::Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        self.read(|conn| {
            let mut statement = conn.prepare_cached(sql)?;
            bind_numbered(&mut statement, args)?;
            let mut rows = statement.raw_query();
            rows.next()?.map(map).transpose()
        })
    }

    /// Closes the idle connections (before the writer's close, which checkpoints the WAL
    /// only as the database's last connection). A read after this opens a new one.
    pub(super) fn close(&self) {
        self.idle.lock().expect("readers lock").clear();
    }

    fn connect(&self) -> Result<rusqlite::Connection, StoreError> {
        let conn = rusqlite::Connection::open_with_flags(&self.path, self.flags)?;
        conn.busy_timeout(self.busy_timeout)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        if let Some(size) = self.mmap_size {
            conn.pragma_update(None, "mmap_size", size)?;
        }
        conn.pragma_update(None, "query_only", true)?;
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use crate::domain::Contact;
    use crate::store::Db;
    use crate::store::conformance::{CH, bare_turn, memory_db, t};
    use crate::store::db::Backend;

    fn readers(db: &Db) -> &super::Readers {
        match &db.backend {
            Backend::Sqlite(sqlite) => &sqlite.readers,
            Backend::Postgres(_) => unreachable!("a SQLite test"),
        }
    }

    #[tokio::test]
    async fn readers_see_what_the_writer_committed_and_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = Db::connect(&format!("sqlite://{}", dir.path().join("r.db").display()))
            .await
            .unwrap();
        file.migrate().await.unwrap();
        for db in [file, memory_db().await] {
            assert!(
                db.load_conversation(CH, "1555")
                    .await
                    .unwrap()
                    .contact_id
                    .is_none()
            );
            let contact = Contact::new("1555");
            db.commit_turn(&bare_turn(None, &contact, t(0)))
                .await
                .unwrap();
            // The next read, on the same idle connection, sees the commit.
            let loaded = db.load_conversation(CH, "1555").await.unwrap();
            assert!(loaded.contact_id.is_some());

            // Nothing writes through a reader.
            let err = readers(&db)
                .read(|conn| Ok(conn.execute("DELETE FROM contacts", [])?))
                .unwrap_err();
            assert!(err.to_string().contains("readonly"), "{err}");
            // A failed read does not keep its connection; the next read opens another.
            let n: Vec<i64> = readers(&db)
                .query(
                    "SELECT COUNT(*) FROM contacts WHERE wa_id = $1",
                    &[&"1555"],
                    |row| Ok(row.get(0)?),
                )
                .unwrap();
            assert_eq!(n, [1]);
            // A statement that does not compile is an error, not a panic.
            let err = readers(&db)
                .query_optional("SELECT x FROM nowhere", &[], |_| Ok(()))
                .unwrap_err();
            assert!(err.to_string().contains("nowhere"), "{err}");
            db.close().await;
        }
        // Closed, the database leaves no WAL behind: the readers closed before the writer,
        // whose close was the last and checkpointed it.
        assert!(!dir.path().join("r.db-wal").exists());
    }
}
