//! [`Db`]: flowgate's database, a handle over the one [`Backend`] it was opened on, and
//! what concerns the whole database: opening it, migrating its schema, closing it.
//!
//! Each aggregate module adds its operations to `Db` in an `impl Db` block of its own; an
//! operation reaches the backend through the macros of [`super::sql`] (portable SQL) or by
//! `let Backend::Sqlite(sqlite) = &self.backend;` (SQLite's writer handle). See the module
//! doc of `store` for how a backend is added.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::error::StoreError;
use super::migrate::sqlite_migrator;
use super::resolved_cache::ResolvedCache;
use super::writer::Writer;

/// flowgate's database; cheap to clone (every clone shares the connections).
#[derive(Clone, Debug)]
pub struct Db {
    pub(super) backend: Backend,
}

/// The database a [`Db`] was opened on: one variant per backend.
#[derive(Clone, Debug)]
pub(super) enum Backend {
    Sqlite(Sqlite),
}

/// SQLite has one writer at a time. Readers share `pool` (WAL lets them run beside the
/// writer); every write goes through `writer`, one connection on a thread of its own
/// ([`super::writer`]), so writes queue in the process, first come first served, and commit
/// in groups, instead of colliding on SQLite's lock and sleeping in its busy handler.
#[derive(Clone, Debug)]
pub(super) struct Sqlite {
    pub(super) pool: sqlx::SqlitePool,
    pub(super) writer: Writer,
    /// Contacts' identities this process has resolved (`store::contacts`).
    pub(super) identities: Arc<ResolvedCache>,
}

impl Db {
    /// Opens the database at `url`.
    ///
    /// `sqlite://path/to/file.db` creates the file and its directories if missing and opens it
    /// in WAL mode (readers don't block the writer) with foreign keys on, a 5 s busy timeout and
    /// `synchronous = NORMAL` (durable across crashes of flowgate; WAL makes it safe).
    /// `sqlite::memory:` is a private in-memory database for `chat`, tests and demos.
    pub async fn connect(url: &str) -> Result<Db, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Err(StoreError::Unsupported(
                "PostgreSQL support arrives with its migrations in a later release; use \
                 sqlite://… for now"
                    .into(),
            ));
        }
        if !url.starts_with("sqlite:") {
            return Err(StoreError::InvalidUrl {
                url: url.into(),
                reason: "flowgate supports SQLite URLs only".into(),
            });
        }
        let sqlite = Sqlite::open(sqlite_options(url)?).await?;
        tracing::debug!(url, "connected to SQLite");
        Ok(Db {
            backend: Backend::Sqlite(sqlite),
        })
    }

    /// Brings the schema up to date; safe to run on every start.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let Backend::Sqlite(sqlite) = &self.backend;
        let migrator = sqlite_migrator().await?;
        sqlite
            .writer
            .run(move |conn| Box::pin(async move { Ok(migrator.run_direct(conn).await?) }))
            .await?;
        tracing::debug!("database schema is up to date");
        Ok(())
    }

    /// `sqlite` (one name per backend), for logs and `flowgate doctor`-style output.
    pub fn backend(&self) -> &'static str {
        let Backend::Sqlite(_) = &self.backend;
        "sqlite"
    }

    /// Closes every connection, so SQLite checkpoints its WAL before the process exits.
    pub async fn close(&self) {
        let Backend::Sqlite(sqlite) = &self.backend;
        sqlite.pool.close().await;
        sqlite.writer.close().await;
    }

    /// Changes after every write (see [`Writer::commits`]): what live views wait on.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        let Backend::Sqlite(sqlite) = &self.backend;
        sqlite.writer.commits()
    }

    /// The SQLite reading pool, for tests that look into the database directly; `None` on
    /// another backend.
    pub fn sqlite_pool(&self) -> Option<&sqlx::SqlitePool> {
        let Backend::Sqlite(sqlite) = &self.backend;
        Some(&sqlite.pool)
    }
}

impl Sqlite {
    /// Starts the writer, then the readers' pool, on `options`.
    async fn open(options: SqliteConnectOptions) -> Result<Self, StoreError> {
        // The writer first: it creates the file and switches it to WAL.
        let writer = Writer::start(
            sqlx::ConnectOptions::connect(&options).await?,
            options.clone(),
        )
        .map_err(StoreError::WriterThread)?;
        let pool = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        Ok(Sqlite {
            pool,
            writer,
            identities: Default::default(),
        })
    }
}

/// The connection options of a `sqlite:` URL; for a file, its directory is created.
fn sqlite_options(url: &str) -> Result<SqliteConnectOptions, StoreError> {
    let invalid = |e: sqlx::Error| StoreError::InvalidUrl {
        url: url.into(),
        reason: e.to_string(),
    };
    let options = SqliteConnectOptions::from_str(url)
        .map_err(invalid)?
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(5));

    // In memory, sqlx names each database and opens it with a shared cache, so the
    // writer and the readers see one database; it lives as long as a connection to it:
    // the writer's, which stays open until `close`.
    if is_in_memory(url) {
        return Ok(options);
    }
    let path = options.get_filename().to_path_buf();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    // Pages are read through a memory map rather than a read() call each: under load
    // the readers spend less time in the kernel.
    Ok(options
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .pragma("mmap_size", "268435456"))
}

/// Whether a SQLite URL names an in-memory database (which must not be opened as a file).
fn is_in_memory(url: &str) -> bool {
    let rest = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let (database, params) = rest.split_once('?').unwrap_or((rest, ""));
    database == ":memory:" || params.split('&').any(|p| p == "mode=memory")
}

/// Runs `$body` with `$pool` bound to the reading pool of the backend `$db` holds.
///
/// The SQL of the operations that use it is portable (`$n` placeholders, `ON CONFLICT`,
/// `RETURNING`, times as unix milliseconds, JSON as text): a new backend adds its arm here
/// (making this a `match`, with `$body` written once for both pools) and every such
/// operation runs on it.
macro_rules! with_pool {
    ($db:expr, |$pool:ident| $body:expr) => {{
        let $crate::store::db::Backend::Sqlite(sqlite) = &$db.backend;
        let $pool = &sqlite.pool;
        $body
    }};
}
pub(super) use with_pool;

/// [`with_pool!`] for statements that write: on SQLite, a job on the writer connection.
///
/// The SQLite body runs on the writer's thread (see [`super::writer`]), so it owns what it
/// uses: list the borrowed values it reads in `own(…)`, and the body works on owned copies
/// (`ToOwned`: a `&str` becomes a `String`, a slice a `Vec`) under the same names. Values
/// already owned move in as they are. A backend with a pool of writers runs `$body` on it.
macro_rules! with_writer {
    ($db:expr, |$pool:ident| $body:expr) => {
        $crate::store::db::with_writer!($db, own(), |$pool| $body)
    };
    ($db:expr, own($($owned:ident),*), |$pool:ident| $body:expr) => {{
        let $crate::store::db::Backend::Sqlite(sqlite) = &$db.backend;
        $(let $owned = ::std::borrow::ToOwned::to_owned(&*$owned);)*
        sqlite
            .writer
            .run(move |$pool| Box::pin(async move { Ok($body) }))
            .await?
    }};
}
pub(super) use with_writer;

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::domain::Contact;
    use crate::store::conformance::{
        CH, bare_turn, contact_with_timers, memory_db, session, t, timer,
    };
    use crate::store::{NewInboxRow, TurnWrite};

    #[tokio::test]
    async fn file_database_uses_wal_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/flowgate.db");
        let url = format!("sqlite://{}", path.display());

        let db = Db::connect(&url).await.unwrap();
        db.migrate().await.unwrap();
        assert_eq!(db.backend(), "sqlite");
        let Backend::Sqlite(sqlite) = &db.backend;
        let pool = &sqlite.pool;
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(fk, 1);

        let contact = Contact::new("1555");
        let sess = session("ask_name", t(0));
        let timers = [timer(t(10), "a")];
        db.commit_turn(&TurnWrite {
            session: Some(&sess),
            replace_timers: Some(&timers),
            ..bare_turn(None, &contact, t(0))
        })
        .await
        .unwrap();
        db.save_flow_version("welcome", "v1", "{}", t(0))
            .await
            .unwrap();
        db.close().await;
        assert!(path.exists());

        let db = Db::connect(&url).await.unwrap();
        db.migrate().await.unwrap(); // already applied: a no-op
        let conv = db.load_conversation(CH, "1555").await.unwrap();
        assert_eq!(conv.session, Some(sess));
        assert_eq!(db.next_timer_at().await.unwrap(), Some(t(10)));
        assert_eq!(
            db.flow_version("welcome", "v1").await.unwrap().as_deref(),
            Some("{}")
        );
        db.close().await;
    }

    #[tokio::test]
    async fn raw_writes_wait_for_an_in_memory_reader() {
        // In memory, readers share the writer's cache and lock the tables they read while
        // their transaction lasts: a raw write waits for them (SQLite's unlock-notify), as a
        // write through sqlx does, instead of failing its group.
        let db = memory_db().await;
        let Backend::Sqlite(sqlite) = &db.backend;
        let pool = &sqlite.pool;
        let mut reader = pool.acquire().await.unwrap();
        sqlx::query("BEGIN").execute(&mut *reader).await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM inbox")
            .fetch_one(&mut *reader)
            .await
            .unwrap();
        assert_eq!(n, 0);
        let row = NewInboxRow {
            channel: CH.into(),
            dedupe_key: "wamid.locked".into(),
            kind: "message".into(),
            contact_key: None,
            payload: json!({}),
        };
        let write = tokio::spawn({
            let db = db.clone();
            async move { db.insert_updates(&[row], t(0)).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!write.is_finished(), "the write waits for the reader");
        sqlx::query("COMMIT").execute(&mut *reader).await.unwrap();
        let stored = tokio::time::timeout(std::time::Duration::from_secs(5), write)
            .await
            .expect("the write goes on once the reader is done")
            .unwrap()
            .unwrap();
        assert_eq!(stored.stored, 1);
    }

    #[tokio::test]
    async fn memory_databases_are_private() {
        let a = memory_db().await;
        let b = memory_db().await;
        contact_with_timers(&a, "1555", &[]).await;
        assert!(
            a.load_conversation(CH, "1555")
                .await
                .unwrap()
                .contact_id
                .is_some()
        );
        assert!(
            b.load_conversation(CH, "1555")
                .await
                .unwrap()
                .contact_id
                .is_none()
        );
    }

    #[tokio::test]
    async fn connect_refuses_other_urls() {
        let err = Db::connect("postgres://u:p@localhost/flowgate")
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Unsupported(_)), "{err}");
        assert!(err.to_string().contains("sqlite://"));
        assert!(!err.to_string().contains("u:p"));

        let err = Db::connect("flowgate.db").await.unwrap_err();
        assert!(matches!(err, StoreError::InvalidUrl { .. }), "{err}");
        let err = Db::connect("sqlite://x.db?mode=bogus").await.unwrap_err();
        assert!(matches!(err, StoreError::InvalidUrl { .. }), "{err}");
    }

    #[test]
    fn in_memory_urls() {
        assert!(is_in_memory("sqlite::memory:"));
        assert!(is_in_memory("sqlite://:memory:"));
        assert!(is_in_memory("sqlite://?mode=memory"));
        assert!(!is_in_memory("sqlite://data/flowgate.db"));
        assert!(!is_in_memory("sqlite:flowgate.db?mode=rwc"));
    }
}
