//! [`Db`]: flowgate's database, a handle over the one [`Backend`] it was opened on, and
//! what concerns the whole database: opening it, migrating its schema, closing it.
//!
//! Each aggregate module adds its operations to `Db` in an `impl Db` block of its own; an
//! operation reaches the backend through the macros below (portable SQL) or by matching on
//! `self.backend` (the hot writes, one version per backend). See the module doc of `store`.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::error::StoreError;
use super::migrate::{postgres_migrator, sqlite_migrator};
use super::readers::Readers;
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
    Postgres(Postgres),
}

/// PostgreSQL: one pool of connections for reads and writes. Each write is its own
/// transaction on the server (or one transaction for an operation's statements), so several
/// flowgate processes can share the database.
#[derive(Clone, Debug)]
pub(super) struct Postgres {
    pub(super) pool: sqlx::PgPool,
    /// The options the pool connects with (a test's schema is in them), for the migrator's
    /// own connection (boxed: they are large, and a `Db` is cloned often).
    pub(super) options: Arc<PgConnectOptions>,
}

/// Connections in a PostgreSQL pool unless the URL's `max_connections` says otherwise: the
/// inbound worker runs up to 64 contacts' turns at once, but a turn holds a connection only
/// while its statements run.
pub const DEFAULT_POSTGRES_POOL: u32 = 16;

/// SQLite has one writer at a time. Readers share `pool` (WAL lets them run beside the
/// writer); every write goes through `writer`, one connection on a thread of its own
/// ([`super::writer`]), so writes queue in the process, first come first served, and commit
/// in groups, instead of colliding on SQLite's lock and sleeping in its busy handler.
#[derive(Clone, Debug)]
pub(super) struct Sqlite {
    pub(super) pool: sqlx::SqlitePool,
    pub(super) writer: Writer,
    /// The hot reads, on the caller's thread ([`super::readers`]).
    pub(super) readers: Arc<Readers>,
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
    ///
    /// `postgres://user:password@host:port/database` (or `postgresql://`) opens a pool of
    /// [`DEFAULT_POSTGRES_POOL`] connections; `?max_connections=N` in the URL sets another
    /// size. The other parameters are PostgreSQL's own (`sslmode`, `options`, …).
    pub async fn connect(url: &str) -> Result<Db, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let (options, size) = postgres_options(url)?;
            return Db::connect_postgres(options, size).await;
        }
        if !url.starts_with("sqlite:") {
            return Err(StoreError::InvalidUrl {
                url: redact(url),
                reason: "flowgate supports SQLite and PostgreSQL URLs only".into(),
            });
        }
        let sqlite = Sqlite::open(sqlite_options(url)?, is_in_memory(url)).await?;
        tracing::debug!(url, "connected to SQLite");
        Ok(Db {
            backend: Backend::Sqlite(sqlite),
        })
    }

    /// A PostgreSQL pool of `size` connections on `options`.
    pub(super) async fn connect_postgres(
        options: PgConnectOptions,
        size: u32,
    ) -> Result<Db, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await?;
        tracing::debug!(pool = size, "connected to PostgreSQL");
        Ok(Db {
            backend: Backend::Postgres(Postgres {
                pool,
                options: Arc::new(options),
            }),
        })
    }

    /// Brings the schema up to date; safe to run on every start, and on PostgreSQL from
    /// several instances at once (sqlx's migrator holds an advisory lock while it works:
    /// the others wait for it, then find nothing left to apply).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(sqlite) => {
                let migrator = sqlite_migrator().await?;
                sqlite
                    .writer
                    .run(move |conn| Box::pin(async move { Ok(migrator.run_direct(conn).await?) }))
                    .await?;
            }
            Backend::Postgres(postgres) => {
                // A connection of its own, closed after: the advisory lock is the
                // session's, and a failed migration leaves no pooled connection holding it.
                let migrator = postgres_migrator().await?;
                let mut conn = sqlx::ConnectOptions::connect(&*postgres.options).await?;
                let result = migrator.run_direct(&mut conn).await;
                let _ = sqlx::Connection::close(conn).await;
                result?;
            }
        }
        tracing::debug!("database schema is up to date");
        Ok(())
    }

    /// `sqlite` or `postgres` (one name per backend), for logs and readiness.
    pub fn backend(&self) -> &'static str {
        match &self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Another handle on this PostgreSQL database with a pool of `size` connections of its
    /// own (opened when first used), for work that must not wait behind the main pool's
    /// turns: the contact leases' heartbeat, the notifications' listener. `None` on SQLite.
    pub fn side_pool(&self, size: u32) -> Option<Db> {
        let Backend::Postgres(postgres) = &self.backend else {
            return None;
        };
        let pool = PgPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with((*postgres.options).clone());
        Some(Db {
            backend: Backend::Postgres(Postgres {
                pool,
                options: postgres.options.clone(),
            }),
        })
    }

    /// Whether several instances may share this database (PostgreSQL): then a contact's
    /// turns run under its lease (`dispatch::ownership`). SQLite is one process by design.
    pub fn shared(&self) -> bool {
        self.is_postgres()
    }

    /// Whether the database is on PostgreSQL (for the few statements written per backend).
    pub(super) fn is_postgres(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// Whether the database answers now, for `/readyz`: on SQLite a read on the readers'
    /// pool and a job through the writer (it also waits for the writes queued before it);
    /// on PostgreSQL a query on the pool (a connection from it, or a new one).
    pub async fn check_ready(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(sqlite) => {
                sqlx::query("SELECT 1").execute(&sqlite.pool).await?;
                sqlite
                    .writer
                    .run_raw(|db| Ok(db.query_row("SELECT 1", [], |_| Ok(()))?))
                    .await
            }
            Backend::Postgres(postgres) => {
                sqlx::query("SELECT 1").execute(&postgres.pool).await?;
                Ok(())
            }
        }
    }

    /// The text at `path` inside the JSON text of `column`, in this backend's SQL (the few
    /// queries that look inside stored JSON: campaigns' frequency caps).
    pub(super) fn json_text(&self, column: &str, path: &[&str]) -> String {
        match &self.backend {
            Backend::Sqlite(_) => format!("json_extract({column}, '$.{}')", path.join(".")),
            Backend::Postgres(_) => {
                format!("(CAST({column} AS json) #>> '{{{}}}')", path.join(","))
            }
        }
    }

    /// Closes every connection, so SQLite checkpoints its WAL before the process exits.
    pub async fn close(&self) {
        match &self.backend {
            Backend::Sqlite(sqlite) => {
                sqlite.pool.close().await;
                sqlite.readers.close();
                sqlite.writer.close().await;
            }
            Backend::Postgres(postgres) => postgres.pool.close().await,
        }
    }

    /// Changes after every write (see [`Writer::commits`]): what live views wait on. On
    /// PostgreSQL, where other instances write too and nothing here sees their writes, it
    /// changes every second instead (until LISTEN/NOTIFY tells of each write).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        match &self.backend {
            Backend::Sqlite(sqlite) => sqlite.writer.commits(),
            Backend::Postgres(_) => {
                let (tick, changes) = tokio::sync::watch::channel(0);
                tokio::spawn(async move {
                    let mut interval = tokio::time::interval(Duration::from_secs(1));
                    loop {
                        tokio::select! {
                            _ = tick.closed() => break,
                            _ = interval.tick() => tick.send_modify(|n| *n += 1),
                        }
                    }
                });
                changes
            }
        }
    }

    /// The SQLite reading pool, for tests that look into the database directly; `None` on
    /// another backend.
    pub fn sqlite_pool(&self) -> Option<&sqlx::SqlitePool> {
        match &self.backend {
            Backend::Sqlite(sqlite) => Some(&sqlite.pool),
            Backend::Postgres(_) => None,
        }
    }

    /// The PostgreSQL pool, for tests that look into the database directly; `None` on
    /// another backend.
    pub fn postgres_pool(&self) -> Option<&sqlx::PgPool> {
        match &self.backend {
            Backend::Postgres(postgres) => Some(&postgres.pool),
            Backend::Sqlite(_) => None,
        }
    }
}

/// A new, empty schema on the PostgreSQL server at `url`, named `{prefix}_…` so that no
/// other test, run or process uses it: for tests that each need a database of their own
/// (the store's conformance suite, the integration tests on PostgreSQL). Returns its name.
#[doc(hidden)]
pub async fn create_test_schema(url: &str, prefix: &str) -> Result<String, StoreError> {
    use std::hash::BuildHasher as _;
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // Random per process (the hasher's keys are), so a schema a failed run kept is never met.
    let salt = std::collections::hash_map::RandomState::new().hash_one(n) as u32;
    let schema = format!("{prefix}_{}_{n}_{salt:08x}", std::process::id());
    let (options, _) = postgres_options(url)?;
    let mut conn = sqlx::ConnectOptions::connect(&options).await?;
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut conn)
        .await?;
    sqlx::Connection::close(conn).await?;
    Ok(schema)
}

/// The connection options and pool size of a `postgres://` URL: `max_connections` is
/// flowgate's parameter (taken out before sqlx reads the rest).
pub(super) fn postgres_options(url: &str) -> Result<(PgConnectOptions, u32), StoreError> {
    let invalid = |reason: String| StoreError::InvalidUrl {
        url: redact(url),
        reason,
    };
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut size = DEFAULT_POSTGRES_POOL;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("max_connections", n)) => {
                size = n.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    invalid(format!(
                        "max_connections must be a whole number above 0, not `{n}`"
                    ))
                })?;
            }
            _ => rest.push(pair),
        }
    }
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    let options = PgConnectOptions::from_str(&url).map_err(|e| invalid(e.to_string()))?;
    Ok((options, size))
}

/// `url` with its password replaced by `***`, for errors and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = rest
        .split_once('/')
        .map_or((rest, None), |(a, p)| (a, Some(p)));
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{name}:***@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    match path {
        Some(path) => format!("{scheme}://{authority}/{path}"),
        None => format!("{scheme}://{authority}"),
    }
}

impl Sqlite {
    /// Starts the writer, then the readers' pool, on `options`.
    async fn open(options: SqliteConnectOptions, in_memory: bool) -> Result<Self, StoreError> {
        // The writer first: it creates the file and switches it to WAL.
        let writer = Writer::start(
            sqlx::ConnectOptions::connect(&options).await?,
            options.clone(),
        )
        .map_err(StoreError::WriterThread)?;
        let mmap_size = (!in_memory).then_some(MMAP_SIZE);
        let readers = Arc::new(Readers::new(&options, BUSY_TIMEOUT, mmap_size));
        let pool = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        Ok(Sqlite {
            pool,
            writer,
            readers,
            identities: Default::default(),
        })
    }
}

/// How long a SQLite connection waits for a lock another holds.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// SQLite's `mmap_size` for a file database: pages are read through a memory map rather
/// than a read() call each, so under load the readers spend less time in the kernel.
const MMAP_SIZE: i64 = 268_435_456;

/// The connection options of a `sqlite:` URL; for a file, its directory is created.
fn sqlite_options(url: &str) -> Result<SqliteConnectOptions, StoreError> {
    let invalid = |e: sqlx::Error| StoreError::InvalidUrl {
        url: url.into(),
        reason: e.to_string(),
    };
    let options = SqliteConnectOptions::from_str(url)
        .map_err(invalid)?
        .foreign_keys(true)
        .busy_timeout(BUSY_TIMEOUT);

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
    Ok(options
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .pragma("mmap_size", MMAP_SIZE.to_string()))
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
        match &$db.backend {
            $crate::store::db::Backend::Sqlite(sqlite) => {
                let $pool = &sqlite.pool;
                $body
            }
            $crate::store::db::Backend::Postgres(postgres) => {
                let $pool = &postgres.pool;
                $body
            }
        }
    }};
}
pub(super) use with_pool;

/// [`with_pool!`] for statements that write: on SQLite, a job on the writer connection.
///
/// The SQLite body runs on the writer's thread (see [`super::writer`]), so it owns what it
/// uses: list the borrowed values it reads in `own(…)`, and the body works on owned copies
/// (`ToOwned`: a `&str` becomes a `String`, a slice a `Vec`) under the same names. Values
/// already owned move in as they are.
///
/// On PostgreSQL `$body` runs on a connection of the pool inside a transaction of its own,
/// so its statements commit together as they do in a writer job (a job's statements always
/// share its group's transaction); a failing body rolls back.
macro_rules! with_writer {
    ($db:expr, |$pool:ident| $body:expr) => {
        $crate::store::db::with_writer!($db, own(), |$pool| $body)
    };
    ($db:expr, own($($owned:ident),*), |$pool:ident| $body:expr) => {{
        match &$db.backend {
            $crate::store::db::Backend::Sqlite(sqlite) => {
                $(let $owned = ::std::borrow::ToOwned::to_owned(&*$owned);)*
                sqlite
                    .writer
                    .run(move |$pool| Box::pin(async move { Ok($body) }))
                    .await?
            }
            $crate::store::db::Backend::Postgres(postgres) => {
                $(let $owned = ::std::borrow::ToOwned::to_owned(&*$owned);)*
                let mut tx = postgres.pool.begin().await?;
                let result: Result<_, $crate::store::StoreError> = async {
                    let $pool: &mut sqlx::PgConnection = &mut *tx;
                    Ok($body)
                }
                .await;
                let value = result?;
                tx.commit().await?;
                value
            }
        }
    }};
}
pub(super) use with_writer;

#[cfg(test)]
mod tests {

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
        let Backend::Sqlite(sqlite) = &db.backend else {
            unreachable!("a SQLite test")
        };
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
        let Backend::Sqlite(sqlite) = &db.backend else {
            unreachable!("a SQLite test")
        };
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
            payload: "{}".into(),
            delivery: None,
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
        let err = Db::connect("postgres://u:secret@localhost/flowgate?max_connections=0")
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::InvalidUrl { .. }), "{err}");
        assert!(err.to_string().contains("max_connections"), "{err}");
        assert!(!err.to_string().contains("secret"), "{err}");

        let err = Db::connect("flowgate.db").await.unwrap_err();
        assert!(matches!(err, StoreError::InvalidUrl { .. }), "{err}");
        let err = Db::connect("mysql://u:secret@host/db").await.unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        let err = Db::connect("sqlite://x.db?mode=bogus").await.unwrap_err();
        assert!(matches!(err, StoreError::InvalidUrl { .. }), "{err}");
    }

    /// Two instances migrating one fresh PostgreSQL database at once: sqlx's migrator takes
    /// an advisory lock, so one applies every migration and the other waits and finds
    /// nothing to do; neither fails.
    #[tokio::test]
    async fn two_instances_migrate_postgres_at_once() {
        use crate::store::conformance::{drop_schema, postgres_db, postgres_db_on};
        let Some((db, schema)) = postgres_db().await else {
            return;
        };
        // A second schema, empty, for the race: `postgres_db` migrated its own.
        let race = format!("{schema}_race");
        sqlx::query(&format!("CREATE SCHEMA {race}"))
            .execute(db.postgres_pool().unwrap())
            .await
            .unwrap();
        let mut instances = Vec::new();
        for _ in 0..3 {
            instances.push(postgres_db_on(&race).await);
        }
        let migrations: Vec<_> = instances
            .iter()
            .map(|db| {
                let db = db.clone();
                tokio::spawn(async move { db.migrate().await })
            })
            .collect();
        for migration in migrations {
            migration.await.unwrap().unwrap();
        }
        let applied: Vec<(i64, bool)> = sqlx::query_as(&format!(
            "SELECT version, success FROM {race}._sqlx_migrations ORDER BY version"
        ))
        .fetch_all(db.postgres_pool().unwrap())
        .await
        .unwrap();
        assert_eq!(
            applied,
            super::super::migrate::postgres_versions()
                .into_iter()
                .map(|v| (v, true))
                .collect::<Vec<_>>(),
            "each migration applied once"
        );
        // The schema works: a turn commits on it.
        let contact = Contact::new("1555");
        instances[1]
            .commit_turn(&bare_turn(None, &contact, t(0)))
            .await
            .unwrap();
        for instance in &instances {
            instance.close().await;
        }
        drop_schema(&db, &race).await;
        drop_schema(&db, &schema).await;
    }

    #[test]
    fn postgres_urls_give_their_pool_size() {
        let (_, size) = postgres_options("postgres://u:p@h/db").unwrap();
        assert_eq!(size, DEFAULT_POSTGRES_POOL);
        let (options, size) =
            postgres_options("postgresql://u:p@h:5433/db?max_connections=40&sslmode=disable")
                .unwrap();
        assert_eq!(size, 40);
        assert_eq!(options.get_port(), 5433);
        assert_eq!(options.get_database(), Some("db"));
        assert_eq!(
            redact("postgres://u:p@h/db?x=1"),
            "postgres://u:***@h/db?x=1"
        );
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
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
