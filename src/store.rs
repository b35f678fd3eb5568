//! Persistence: contacts, sessions, the message log, durable timers and flow versions.
//!
//! All of flowgate's SQL lives here; no other module writes a query. Everything else speaks
//! [`Conversation`], [`TurnWrite`] and the row types below, so the engine stays testable without a
//! database schema in its head and the schema can change in one place.
//!
//! The SQL is portable between SQLite and PostgreSQL (`$n` placeholders, `ON CONFLICT`,
//! `RETURNING`, times as unix milliseconds, JSON as text), and `with_pool!` runs the one
//! query text on whichever pool a [`Db`] holds. Only SQLite is accepted by [`Db::connect`] for
//! now: PostgreSQL needs its own migrations first.
//!
//! Times are stored at millisecond precision; anything finer is dropped.

use sqlx::Connection as _;
use std::borrow::Cow;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::types::Value;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use crate::domain::{Contact, Decision, Inbound, Outbound, OutboundContent};

/// Everything that can go wrong talking to the database, each saying what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// An error of a write made directly on the writer's SQLite handle ([`writer`]).
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(
        "could not migrate the database: {0}; if another (newer) flowgate wrote this database, \
         run that version or point database_url at a new file"
    )]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("could not convert JSON for the database: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Unsupported(String),
    #[error(
        "invalid database URL `{url}`: {reason}; use sqlite://path/to/flowgate.db or sqlite::memory:"
    )]
    InvalidUrl { url: String, reason: String },
    #[error(
        "could not create the directory {} for the database: {source}; create it or choose a \
         writable path",
        path.display()
    )]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "contact {id} is no longer in the database (was it deleted during the turn?); load the \
         conversation again"
    )]
    UnknownContact { id: i64 },
    #[error(
        "`{identifier}` became another contact's identifier during the turn (an identity \
         change); handle the event again"
    )]
    IdentifierTaken { identifier: String },
    #[error(
        "the database holds data flowgate cannot read: {0}; was it written by another program?"
    )]
    Corrupt(String),
    #[error("the database is closed (flowgate is shutting down); the write was not made")]
    Closed,
    #[error("could not start the database's writer thread: {0}")]
    WriterThread(std::io::Error),
    #[error("{0}; write it again")]
    GroupFailed(String),
}

impl StoreError {
    /// Whether a unique constraint refused the write, e.g. an inbound message stored twice
    /// (WhatsApp redelivers webhooks); callers treat that as "already handled".
    pub fn is_duplicate(&self) -> bool {
        use rusqlite::ffi;
        match self {
            Self::Database(sqlx::Error::Database(e)) => e.is_unique_violation(),
            Self::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.extended_code,
                ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY
            ),
            _ => false,
        }
    }

    /// Whether the failed write of a sqlx job left its transaction as it was (a raw job runs
    /// in a savepoint of its own instead; see [`writer`]): a constraint refused one
    /// statement (SQLite undid just that statement), or a value did not bind (nothing ran).
    /// Anything else may have ended the transaction, or failed after a statement wrote (a
    /// row of `RETURNING` that does not decode), so it counts as breaking it.
    fn is_statement_error(&self) -> bool {
        use sqlx::error::ErrorKind;
        match self {
            Self::Database(sqlx::Error::Database(e)) => matches!(
                e.kind(),
                ErrorKind::UniqueViolation
                    | ErrorKind::ForeignKeyViolation
                    | ErrorKind::NotNullViolation
                    | ErrorKind::CheckViolation
            ),
            Self::Database(sqlx::Error::Encode(_)) => true,
            _ => false,
        }
    }
}

/// Connection pools to flowgate's database.
#[derive(Clone, Debug)]
pub enum Db {
    /// SQLite has one writer at a time. Readers share `pool` (WAL lets them run beside the
    /// writer); every write goes through `writer`, one connection on a thread of its own
    /// ([`writer`]), so writes queue in the process, first come first served, and commit
    /// in groups, instead of colliding on SQLite's lock and sleeping in its busy handler.
    Sqlite {
        pool: sqlx::SqlitePool,
        writer: Writer,
        /// Contacts' identities this process has resolved (`store::identity`).
        identities: std::sync::Arc<ResolvedCache>,
    },
    Postgres(sqlx::PgPool),
}

/// Runs `$body` with `$pool` bound to the (reading) pool inside `$db`, once per backend.
///
/// sqlx's pools are distinct types, so one query text needs one typed call per backend; this
/// writes both from one body instead of duplicating every query.
macro_rules! with_pool {
    ($db:expr, |$pool:ident| $body:expr) => {
        match $db {
            Db::Sqlite { pool: $pool, .. } => $body,
            Db::Postgres($pool) => $body,
        }
    };
}

/// [`with_pool!`] for statements that write: a job on SQLite's writer connection,
/// PostgreSQL's pool.
///
/// The SQLite body runs on the writer's thread (see [`writer`]), so it owns what it uses:
/// list the borrowed values it reads in `own(…)`, and the SQLite arm works on owned copies
/// (`ToOwned`: a `&str` becomes a `String`, a slice a `Vec`) under the same names. Values
/// already owned move in as they are.
macro_rules! with_writer {
    ($db:expr, |$pool:ident| $body:expr) => {
        with_writer!($db, own(), |$pool| $body)
    };
    ($db:expr, own($($owned:ident),*), |$pool:ident| $body:expr) => {
        match $db {
            Db::Sqlite { writer, .. } => {
                $(let $owned = ::std::borrow::ToOwned::to_owned(&*$owned);)*
                writer
                    .run(move |$pool| Box::pin(async move { Ok($body) }))
                    .await?
            }
            Db::Postgres($pool) => $body,
        }
    };
}

impl Db {
    /// One writing statement with `$n` parameters (`$n` is `args[n - 1]`), run on SQLite's
    /// writer handle; returns the rows it returns.
    async fn write_rows<T>(&self, sql: String, args: Vec<Value>) -> Result<Vec<T>, StoreError>
    where
        T: for<'r> TryFrom<&'r rusqlite::Row<'r>, Error = rusqlite::Error> + Send + 'static,
    {
        match self {
            Db::Sqlite { writer, .. } => writer.query(sql, args).await,
            Db::Postgres(_) => Err(postgres_writes()),
        }
    }

    /// [`Db::write_rows`] for a statement that returns no rows.
    async fn write(&self, sql: String, args: Vec<Value>) -> Result<(), StoreError> {
        self.write_rows::<()>(sql, args).await.map(drop)
    }
}

/// The hot writes (webhook updates, turns, claims, recorded sends) take typed arguments on
/// PostgreSQL, which arrive with its support; [`Db::connect`] refuses it until then.
fn postgres_writes() -> StoreError {
    StoreError::Unsupported("PostgreSQL writes arrive with its migrations".into())
}

// After the macros, so the submodules can use them.
mod identity;
mod inbox;
mod outbox;
mod policy;
mod turn;
pub mod writer;

use writer::Writer;

pub use identity::*;
pub use inbox::*;
pub use outbox::*;
pub use policy::*;

/// The SQLite migrations, embedded so the binary carries its schema.
///
/// `sqlx::migrate!` would embed them too, but it lives behind sqlx's `macros` feature, which
/// flowgate leaves off. A test checks this list against `migrations/sqlite/`.
const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "channels",
        include_str!("../migrations/sqlite/0002_channels.sql"),
    ),
    (
        3,
        "policy",
        include_str!("../migrations/sqlite/0003_policy.sql"),
    ),
    (
        4,
        "outbox indexes",
        include_str!("../migrations/sqlite/0004_outbox_indexes.sql"),
    ),
    (
        5,
        "contact aliases",
        include_str!("../migrations/sqlite/0005_contact_aliases.sql"),
    ),
];

/// A [`MigrationSource`] over migrations compiled into the binary.
#[derive(Debug)]
struct Embedded(&'static [(i64, &'static str, &'static str)]);

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send + 's>> {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .map(|&(version, description, sql)| {
                    Migration::new(
                        version,
                        Cow::Borrowed(description),
                        MigrationType::Simple,
                        Cow::Borrowed(sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// What the engine needs to handle one event for a contact.
#[derive(Debug, Clone)]
pub struct Conversation {
    /// `None` until the contact's first turn is committed.
    pub contact_id: Option<i64>,
    pub contact: Contact,
    pub session: Option<SessionRow>,
    /// Whether the contact has queued messages (to flush when the customer writes).
    pub has_queued: bool,
    /// Whether the contact has timers (a turn that sets none need not clear them).
    pub has_timers: bool,
}

/// A contact's place in a flow.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRow {
    pub flow_id: String,
    /// The flow version the session is pinned to (see [`Db::flow_version`]).
    pub flow_version: String,
    pub step: String,
    pub state: serde_json::Value,
    pub updated_at: DateTime<Utc>,
}

/// Everything one engine turn changes, written atomically by [`Db::commit_turn`].
pub struct TurnWrite<'a> {
    pub channel: &'a str,
    /// From [`Conversation::contact_id`]; `None` creates the contact.
    pub contact_id: Option<i64>,
    pub contact: &'a Contact,
    /// The session after the turn; `None` ends it.
    pub session: Option<&'a SessionRow>,
    /// The customer's message that started the turn, if any (timers start turns too).
    pub inbound: Option<&'a Inbound>,
    pub outbound: &'a [OutboundRecord],
    /// Queued messages leaving the queue (flushed or expired), updated in place.
    pub dequeued: &'a [DequeuedRecord],
    /// `Some` replaces all of the contact's timers with these (`Some(&[])` clears them);
    /// `None` leaves them alone.
    pub replace_timers: Option<&'a [NewTimer]>,
    /// The timer that started this turn, deleted with the turn so it fires exactly once.
    pub fired_timer: Option<i64>,
    /// A message this turn's (single) outbound message replaces: marked `failed` with a
    /// reason that names the new message.
    pub superseded: Option<&'a Superseded>,
    pub now: DateTime<Utc>,
}

/// An outbound message replaced by a new one (a 131047 decided again).
#[derive(Debug, Clone)]
pub struct Superseded {
    pub id: i64,
    /// The start of its new reason; the new message's id is appended.
    pub reason: String,
}

impl<'a> TurnWrite<'a> {
    /// A turn that writes only the contact (`session: None` ends a session: set it to keep
    /// one); the other fields are set with struct update syntax.
    pub fn new(
        channel: &'a str,
        contact_id: Option<i64>,
        contact: &'a Contact,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            channel,
            contact_id,
            contact,
            session: None,
            inbound: None,
            outbound: &[],
            dequeued: &[],
            replace_timers: None,
            fired_timer: None,
            superseded: None,
            now,
        }
    }
}

/// An outgoing message with the policy's verdict, for the message log.
#[derive(Debug, Clone)]
pub struct OutboundRecord {
    pub message: Outbound,
    pub decision: Decision,
    /// Initial delivery status: e.g. `sent` in the sandbox, `pending` for real channels.
    pub status: String,
    /// The wamid of the inbound message this answers, if any (for mark-as-read).
    pub in_reply_to: Option<String>,
    /// For a queued message: when it expires.
    pub expires_at: Option<DateTime<Utc>>,
}

/// A queued message's new decision (it leaves the queue, or stays with a new reason).
#[derive(Debug, Clone)]
pub struct DequeuedRecord {
    pub id: i64,
    pub message: Outbound,
    pub decision: Decision,
    pub status: String,
    /// The wamid of the customer message that flushed it.
    pub in_reply_to: Option<String>,
}

/// A timer to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTimer {
    pub due_at: DateTime<Utc>,
    pub payload: serde_json::Value,
}

/// A stored timer, with the contact it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct TimerRow {
    pub id: i64,
    pub channel: String,
    pub wa_id: String,
    pub contact_id: i64,
    pub due_at: DateTime<Utc>,
    pub payload: serde_json::Value,
}

/// What [`Db::commit_turn`] created.
#[derive(Debug, Clone, PartialEq)]
pub struct CommittedTurn {
    pub contact_id: i64,
    /// Ids of the outbound messages, in the order given; the sender updates their status.
    pub outbound_ids: Vec<i64>,
    /// Ids of the dequeued messages that were still queued (another path may have expired
    /// one in between).
    pub dequeued_ids: Vec<i64>,
}

/// One entry of the message log.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageRow {
    pub id: i64,
    /// `in` or `out`.
    pub direction: String,
    pub wamid: Option<String>,
    pub kind: String,
    /// The [`Inbound`] or [`Outbound`], serialized.
    pub body: serde_json::Value,
    pub decision: Option<String>,
    pub reason: Option<String>,
    /// `received` for inbound messages; the delivery status for outbound ones.
    pub status: String,
    pub created_at: DateTime<Utc>,
}

/// Status of every stored inbound message.
const RECEIVED: &str = "received";

// Rows as the database returns them, decoded identically by both backends.
type ConversationRaw = (
    i64,
    Option<String>,
    String,
    String,
    Option<String>,
    Option<i64>,
    String,
    bool,
    bool,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
);
type TimerRaw = (i64, String, String, i64, i64, String);
type MessageRaw = (
    i64,
    String,
    Option<String>,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    i64,
);

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
        let options = if is_in_memory(url) {
            options
        } else {
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
            options
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .pragma("mmap_size", "268435456")
        };
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
        tracing::debug!(url, "connected to SQLite");
        Ok(Db::Sqlite {
            pool,
            writer,
            identities: Default::default(),
        })
    }

    /// Brings the schema up to date; safe to run on every start.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Db::Sqlite { writer, .. } => {
                let migrator = Migrator::new(Embedded(SQLITE_MIGRATIONS)).await?;
                writer
                    .run(move |conn| Box::pin(async move { Ok(migrator.run_direct(conn).await?) }))
                    .await?;
                tracing::debug!("database schema is up to date");
                Ok(())
            }
            Db::Postgres(_) => Err(StoreError::Unsupported(
                "flowgate has no PostgreSQL migrations yet; use sqlite://… for now".into(),
            )),
        }
    }

    /// `sqlite` or `postgres`, for logs and `flowgate doctor`-style output.
    pub fn backend(&self) -> &'static str {
        match self {
            Db::Sqlite { .. } => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    /// Closes every connection, so SQLite checkpoints its WAL before the process exits.
    pub async fn close(&self) {
        match self {
            Db::Sqlite { pool, writer, .. } => {
                pool.close().await;
                writer.close().await;
            }
            Db::Postgres(pool) => pool.close().await,
        }
    }

    /// Loads the contact and its session; a contact never seen gets `contact_id: None` and a
    /// fresh [`Contact`], so the engine handles first and later messages alike.
    pub async fn load_conversation(
        &self,
        channel: &str,
        wa_id: &str,
    ) -> Result<Conversation, StoreError> {
        const SQL: &str = "SELECT c.id, c.name, c.tags, c.attrs, c.timezone, \
                c.last_customer_message_at, c.policy, \
                EXISTS (SELECT 1 FROM messages q WHERE q.contact_id = c.id \
                    AND q.status = 'queued'), \
                EXISTS (SELECT 1 FROM timers t WHERE t.contact_id = c.id), \
                s.flow_id, s.flow_version, s.step, s.state, s.updated_at \
            FROM contacts c LEFT JOIN sessions s ON s.contact_id = c.id \
            WHERE c.channel = $1 AND c.wa_id = $2";
        let row: Option<ConversationRaw> = with_pool!(self, |pool| {
            sqlx::query_as(SQL)
                .bind(channel)
                .bind(wa_id)
                .fetch_optional(pool)
                .await?
        });
        let Some((
            id,
            name,
            tags,
            attrs,
            timezone,
            last,
            policy,
            has_queued,
            has_timers,
            flow_id,
            version,
            step,
            state,
            at,
        )) = row
        else {
            return Ok(Conversation {
                contact_id: None,
                contact: Contact::new(wa_id),
                session: None,
                has_queued: false,
                has_timers: false,
            });
        };
        let contact = Contact {
            wa_id: wa_id.into(),
            name,
            tags: serde_json::from_str(&tags)?,
            attrs: serde_json::from_str(&attrs)?,
            timezone,
            last_customer_message_at: last
                .map(|ms| from_millis(ms, "contacts.last_customer_message_at"))
                .transpose()?,
            policy: serde_json::from_str(&policy)?,
        };
        let session = match (flow_id, version, step, state, at) {
            (Some(flow_id), Some(flow_version), Some(step), Some(state), Some(at)) => {
                Some(SessionRow {
                    flow_id,
                    flow_version,
                    step,
                    state: serde_json::from_str(&state)?,
                    updated_at: from_millis(at, "sessions.updated_at")?,
                })
            }
            _ => None,
        };
        Ok(Conversation {
            contact_id: Some(id),
            contact,
            session,
            has_queued,
            has_timers,
        })
    }

    /// Timers due at or before `now`, oldest first (ties by id), at most `limit`.
    pub async fn due_timers(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<TimerRow>, StoreError> {
        const SQL: &str = "SELECT t.id, c.channel, c.wa_id, t.contact_id, t.due_at, t.payload \
            FROM timers t JOIN contacts c ON c.id = t.contact_id \
            WHERE t.due_at <= $1 \
            ORDER BY t.due_at, t.id \
            LIMIT $2";
        let rows: Vec<TimerRaw> = with_pool!(self, |pool| {
            sqlx::query_as(SQL)
                .bind(now.timestamp_millis())
                .bind(limit.max(0))
                .fetch_all(pool)
                .await?
        });
        rows.into_iter()
            .map(|(id, channel, wa_id, contact_id, due_at, payload)| {
                Ok(TimerRow {
                    id,
                    channel,
                    wa_id,
                    contact_id,
                    due_at: from_millis(due_at, "timers.due_at")?,
                    payload: serde_json::from_str(&payload)?,
                })
            })
            .collect()
    }

    /// The earliest pending timer's due time, so the scheduler can sleep until then.
    pub async fn next_timer_at(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        const SQL: &str = "SELECT MIN(due_at) FROM timers";
        let at: Option<i64> =
            with_pool!(self, |pool| sqlx::query_scalar(SQL).fetch_one(pool).await?);
        at.map(|ms| from_millis(ms, "timers.due_at")).transpose()
    }

    /// Stores the bundle a flow version was compiled from, so a session pinned to it survives
    /// a reload and a restart. A version is immutable: saving it again keeps the first bundle.
    pub async fn save_flow_version(
        &self,
        flow_id: &str,
        version: &str,
        bundle: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO flow_versions (flow_id, version, bundle, created_at) \
            VALUES ($1, $2, $3, $4) \
            ON CONFLICT (flow_id, version) DO NOTHING";
        with_writer!(self, own(flow_id, version, bundle), |pool| {
            sqlx::query(SQL)
                .bind(flow_id)
                .bind(version)
                .bind(bundle)
                .bind(now.timestamp_millis())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// The bundle of a flow version, if it was ever saved.
    pub async fn flow_version(
        &self,
        flow_id: &str,
        version: &str,
    ) -> Result<Option<String>, StoreError> {
        const SQL: &str = "SELECT bundle FROM flow_versions WHERE flow_id = $1 AND version = $2";
        Ok(with_pool!(self, |pool| {
            sqlx::query_scalar(SQL)
                .bind(flow_id)
                .bind(version)
                .fetch_optional(pool)
                .await?
        }))
    }

    /// The last `limit` messages of a contact, oldest first.
    pub async fn messages(
        &self,
        channel: &str,
        wa_id: &str,
        limit: i64,
    ) -> Result<Vec<MessageRow>, StoreError> {
        const SQL: &str = "SELECT m.id, m.direction, m.wamid, m.kind, m.body, m.decision, \
                m.reason, m.status, m.created_at \
            FROM messages m JOIN contacts c ON c.id = m.contact_id \
            WHERE c.channel = $1 AND c.wa_id = $2 \
            ORDER BY m.id DESC \
            LIMIT $3";
        let rows: Vec<MessageRaw> = with_pool!(self, |pool| {
            sqlx::query_as(SQL)
                .bind(channel)
                .bind(wa_id)
                .bind(limit.max(0))
                .fetch_all(pool)
                .await?
        });
        rows.into_iter()
            .rev()
            .map(
                |(id, direction, wamid, kind, body, decision, reason, status, created_at)| {
                    Ok(MessageRow {
                        id,
                        direction,
                        wamid,
                        kind,
                        body: serde_json::from_str(&body)?,
                        decision,
                        reason,
                        status,
                        created_at: from_millis(created_at, "messages.created_at")?,
                    })
                },
            )
            .collect()
    }

    /// Forgets the contact's session and timers (the `/reset` of `flowgate chat`); the contact
    /// and the message log stay, so the history still shows what happened.
    pub async fn reset_conversation(&self, channel: &str, wa_id: &str) -> Result<(), StoreError> {
        const CONTACT: &str = "(SELECT id FROM contacts WHERE channel = $1 AND wa_id = $2)";
        let delete_session = format!("DELETE FROM sessions WHERE contact_id IN {CONTACT}");
        let delete_timers = format!("DELETE FROM timers WHERE contact_id IN {CONTACT}");
        with_writer!(self, own(channel, wa_id), |pool| {
            let mut tx = pool.begin().await?;
            for sql in [&delete_session, &delete_timers] {
                sqlx::query(sql)
                    .bind(channel.to_string())
                    .bind(wa_id.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }
}

/// Whether a SQLite URL names an in-memory database (which must not be opened as a file).
fn is_in_memory(url: &str) -> bool {
    let rest = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let (database, params) = rest.split_once('?').unwrap_or((rest, ""));
    database == ":memory:" || params.split('&').any(|p| p == "mode=memory")
}

/// The message-log `kind` of an outgoing message: its content variant.
fn outbound_kind(content: &OutboundContent) -> &'static str {
    match content {
        OutboundContent::Text { .. } => "text",
        OutboundContent::Buttons { .. } => "buttons",
        OutboundContent::List { .. } => "list",
        OutboundContent::Media { .. } => "media",
        OutboundContent::Template { .. } => "template",
    }
}

/// `$first, $first+1, …` for `n` values.
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads a stored millisecond timestamp; `column` names it in the error.
fn from_millis(ms: i64, column: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| StoreError::Corrupt(format!("{column} holds {ms}, which is not a time")))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use chrono::Duration;
    use serde_json::json;

    use super::*;
    use crate::clock::VirtualClock;
    use crate::domain::{InboundContent, Origin};

    const CH: &str = "sandbox";

    fn t(minutes: i64) -> DateTime<Utc> {
        VirtualClock::test_epoch() + Duration::minutes(minutes)
    }

    async fn memory_db() -> Db {
        let db = Db::connect("sqlite::memory:").await.unwrap();
        db.migrate().await.unwrap();
        db
    }

    fn inbound(id: &str, body: &str, at: DateTime<Utc>) -> Inbound {
        Inbound {
            id: id.into(),
            timestamp: at,
            content: InboundContent::text(body),
            from_ad: false,
        }
    }

    fn said(content: OutboundContent, decision: Decision) -> OutboundRecord {
        OutboundRecord {
            message: Outbound::new(
                content,
                Origin::Step {
                    flow: "welcome".into(),
                    step: "start".into(),
                },
            ),
            decision,
            in_reply_to: None,
            status: "sent".into(),
            expires_at: None,
        }
    }

    fn session(step: &str, at: DateTime<Utc>) -> SessionRow {
        SessionRow {
            flow_id: "welcome".into(),
            flow_version: "v1".into(),
            step: step.into(),
            state: json!({ "name": "Ada", "tries": 1 }),
            updated_at: at,
        }
    }

    fn timer(at: DateTime<Utc>, tag: &str) -> NewTimer {
        NewTimer {
            due_at: at,
            payload: json!({ "timer": tag }),
        }
    }

    /// A turn that only touches the contact (and whatever the caller sets on top).
    fn bare_turn<'a>(
        contact_id: Option<i64>,
        contact: &'a Contact,
        now: DateTime<Utc>,
    ) -> TurnWrite<'a> {
        TurnWrite::new(CH, contact_id, contact, now)
    }

    /// Commits a turn that creates `wa_id` with the given timers; returns its id.
    async fn contact_with_timers(db: &Db, wa_id: &str, timers: &[NewTimer]) -> i64 {
        let contact = Contact::new(wa_id);
        let turn = TurnWrite {
            replace_timers: Some(timers),
            ..bare_turn(None, &contact, t(0))
        };
        db.commit_turn(&turn).await.unwrap().contact_id
    }

    async fn timer_tags(db: &Db) -> Vec<String> {
        db.due_timers(t(1_000_000), 100)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.payload["timer"].as_str().unwrap().to_string())
            .collect()
    }

    #[tokio::test]
    async fn unknown_contact_is_new() {
        let db = memory_db().await;
        let conv = db.load_conversation(CH, "1555").await.unwrap();
        assert_eq!(conv.contact_id, None);
        assert_eq!(conv.contact, Contact::new("1555"));
        assert_eq!(conv.session, None);
        assert!(db.messages(CH, "1555", 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn commit_turn_round_trip() {
        let db = memory_db().await;
        let mut contact = Contact::new("1555");
        contact.name = Some("Ada".into());
        contact.tags.extend(["vip".to_string(), "beta".to_string()]);
        contact.attrs.insert("plan".into(), json!("pro"));
        contact.timezone = Some("Europe/Berlin".into());
        let msg = Inbound {
            id: "wamid.1".into(),
            timestamp: t(0),
            content: InboundContent::ButtonReply {
                id: "yes".into(),
                title: "Yes".into(),
            },
            from_ad: false,
        };
        contact.saw_customer_message(msg.timestamp);
        let sess = session("ask_name", t(1));
        let out = [
            said(
                OutboundContent::text("Hi Ada"),
                Decision::Send {
                    reason: "window open".into(),
                },
            ),
            said(
                OutboundContent::Template {
                    name: "hello".into(),
                    language: "en".into(),
                    params: vec![],
                },
                Decision::Skipped {
                    reason: "quiet hours".into(),
                },
            ),
        ];
        let timers = [timer(t(60), "late"), timer(t(30), "early")];
        let turn = TurnWrite {
            session: Some(&sess),
            inbound: Some(&msg),
            outbound: &out,
            replace_timers: Some(&timers),
            ..bare_turn(None, &contact, t(1))
        };
        let committed = db.commit_turn(&turn).await.unwrap();
        assert_eq!(committed.outbound_ids.len(), 2);
        assert!(committed.outbound_ids[0] < committed.outbound_ids[1]);

        let conv = db.load_conversation(CH, "1555").await.unwrap();
        assert_eq!(conv.contact_id, Some(committed.contact_id));
        assert_eq!(conv.contact, contact);
        assert_eq!(conv.session, Some(sess));
        // Same number, other channel: a different contact.
        assert_eq!(
            db.load_conversation("other", "1555")
                .await
                .unwrap()
                .contact_id,
            None
        );

        let log = db.messages(CH, "1555", 10).await.unwrap();
        assert_eq!(log.len(), 3);
        let (inb, hi, tpl) = (&log[0], &log[1], &log[2]);
        assert_eq!(
            (
                inb.direction.as_str(),
                inb.kind.as_str(),
                inb.status.as_str()
            ),
            ("in", "button_reply", "received")
        );
        assert_eq!(inb.wamid.as_deref(), Some("wamid.1"));
        assert_eq!(
            (inb.decision.as_deref(), inb.reason.as_deref()),
            (None, None)
        );
        assert_eq!(
            serde_json::from_value::<Inbound>(inb.body.clone()).unwrap(),
            msg
        );
        assert_eq!(inb.created_at, t(1));

        assert_eq!(hi.id, committed.outbound_ids[0]);
        assert_eq!((hi.direction.as_str(), hi.kind.as_str()), ("out", "text"));
        assert_eq!(
            (hi.decision.as_deref(), hi.reason.as_deref()),
            (Some("send"), Some("window open"))
        );
        assert_eq!((hi.wamid.as_deref(), hi.status.as_str()), (None, "sent"));
        assert_eq!(
            serde_json::from_value::<Outbound>(hi.body.clone()).unwrap(),
            out[0].message
        );
        assert_eq!(tpl.id, committed.outbound_ids[1]);
        assert_eq!(tpl.kind, "template");
        assert_eq!(
            (tpl.decision.as_deref(), tpl.reason.as_deref()),
            (Some("skipped"), Some("quiet hours"))
        );

        let due = db.due_timers(t(60), 10).await.unwrap();
        assert_eq!(due.len(), 2);
        assert_eq!(
            due[0],
            TimerRow {
                id: due[0].id,
                channel: CH.into(),
                wa_id: "1555".into(),
                contact_id: committed.contact_id,
                due_at: t(30),
                payload: json!({ "timer": "early" }),
            }
        );
        assert_eq!(due[1].due_at, t(60));

        // The last `limit` messages, still oldest first.
        let last_two = db.messages(CH, "1555", 2).await.unwrap();
        assert_eq!(last_two, log[1..].to_vec());
    }

    #[tokio::test]
    async fn second_turn_updates_the_contact() {
        let db = memory_db().await;
        let mut contact = Contact::new("1555");
        let id = db
            .commit_turn(&bare_turn(None, &contact, t(0)))
            .await
            .unwrap()
            .contact_id;
        contact.name = Some("Grace".into());
        contact.tags.insert("new".into());
        let again = db
            .commit_turn(&bare_turn(Some(id), &contact, t(1)))
            .await
            .unwrap();
        assert_eq!(again.contact_id, id);
        assert_eq!(
            db.load_conversation(CH, "1555").await.unwrap().contact,
            contact
        );

        // A second "first" turn (a race with another worker) lands on the same row.
        let racing = db
            .commit_turn(&bare_turn(None, &contact, t(2)))
            .await
            .unwrap();
        assert_eq!(racing.contact_id, id);
    }

    #[tokio::test]
    async fn concurrent_turns_commit_and_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&format!("sqlite://{}", dir.path().join("t.db").display()))
            .await
            .unwrap();
        db.migrate().await.unwrap();
        let first = Contact::new("1000");
        let seen = inbound("wamid.seen", "hi", t(0));
        db.commit_turn(&TurnWrite {
            inbound: Some(&seen),
            ..bare_turn(None, &first, t(0))
        })
        .await
        .unwrap();
        // 60 contacts at once through the one writer, one of them replaying the message
        // already stored: only that turn fails, and writes nothing. The writer is held while
        // they queue, so they commit as one group, the failing turn in the middle of it (its
        // contact upsert ran before its inbound message failed, and is undone).
        let Db::Sqlite { writer, .. } = &db else {
            unreachable!()
        };
        let release = writer.hold().await;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..60 {
            let db = db.clone();
            tasks.spawn(async move {
                let contact = Contact::new(format!("{}", 2000 + i));
                let id = if i == 30 {
                    "wamid.seen".to_string()
                } else {
                    format!("wamid.{i}")
                };
                let message = inbound(&id, "hello", t(1));
                let out = [said(
                    OutboundContent::text(format!("reply {i}")),
                    Decision::Send {
                        reason: "window open".into(),
                    },
                )];
                let result = db
                    .commit_turn(&TurnWrite {
                        inbound: Some(&message),
                        outbound: &out,
                        ..bare_turn(None, &contact, t(1))
                    })
                    .await;
                (i, contact.wa_id.clone(), result)
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        release.send(()).unwrap();
        let mut committed = 0;
        while let Some(joined) = tasks.join_next().await {
            let (i, wa_id, result) = joined.unwrap();
            match result {
                Ok(turn) => {
                    committed += 1;
                    let log = db.messages(CH, &wa_id, 10).await.unwrap();
                    assert_eq!(log.len(), 2, "contact {wa_id}");
                    assert_eq!(log[1].id, turn.outbound_ids[0]);
                    assert_eq!(log[1].body["content"]["body"], format!("reply {i}"));
                }
                Err(e) => {
                    assert_eq!(i, 30, "only the replay fails: {e}");
                    assert!(e.is_duplicate(), "{e}");
                    assert_eq!(
                        db.load_conversation(CH, &wa_id).await.unwrap().contact_id,
                        None
                    );
                }
            }
        }
        assert_eq!(committed, 59);
    }

    #[tokio::test]
    async fn turns_refuse_identifiers_that_changed_since_they_were_resolved() {
        use crate::store::Identifiers;
        let db = memory_db().await;
        let (phone, bsuid, new_phone) = ("1555", "US.1", "1666");
        let resolved = db
            .resolve_contact(CH, Identifiers::new(Some(phone), Some(bsuid)), t(0))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resolved.key, phone);
        let loaded = db.load_conversation(CH, phone).await.unwrap();
        let id = loaded.contact_id.expect("created with both identifiers");
        db.change_identity(
            CH,
            Identifiers::new(Some(phone), None),
            Identifiers::new(Some(new_phone), None),
            t(1),
        )
        .await
        .unwrap();
        // A turn on the contact as loaded before the change: its key no longer matches.
        let msg = inbound("wamid.before", "hi", t(2));
        let err = db
            .commit_turn(&TurnWrite {
                inbound: Some(&msg),
                ..bare_turn(Some(id), &loaded.contact, t(2))
            })
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::UnknownContact { id: e } if e == id),
            "{err}"
        );
        // A turn that would create a contact under what is now an alias (the BSUID,
        // resolved to itself before the contact learned it): refused, not a second contact.
        let err = db
            .commit_turn(&bare_turn(None, &Contact::new(bsuid), t(2)))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::IdentifierTaken { identifier } if identifier == bsuid),
            "{err}"
        );
        assert_eq!(count_contacts(&db).await, 1);
    }

    async fn count_contacts(db: &Db) -> i64 {
        let Db::Sqlite { pool, .. } = db else {
            unreachable!("tests use SQLite")
        };
        sqlx::query_scalar("SELECT COUNT(*) FROM contacts")
            .fetch_one(pool)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn stale_contact_id_is_refused() {
        let db = memory_db().await;
        let contact = Contact::new("1555");
        let err = db
            .commit_turn(&bare_turn(Some(42), &contact, t(0)))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::UnknownContact { id: 42 }),
            "{err}"
        );
        assert_eq!(
            db.load_conversation(CH, "1555").await.unwrap().contact_id,
            None
        );

        // With a customer message the message itself is the guard: the contact was deleted
        // and created again since it was loaded, under a new id.
        let msg = inbound("wamid.stale", "hi", t(1));
        let old = db
            .commit_turn(&TurnWrite {
                inbound: Some(&msg),
                ..bare_turn(None, &contact, t(1))
            })
            .await
            .unwrap()
            .contact_id;
        db.commit_turn(&bare_turn(None, &Contact::new("1666"), t(1)))
            .await
            .unwrap();
        let Db::Sqlite { pool, .. } = &db else {
            unreachable!()
        };
        sqlx::query("DELETE FROM contacts WHERE id = $1")
            .bind(old)
            .execute(pool)
            .await
            .unwrap();
        let new = db
            .commit_turn(&bare_turn(None, &contact, t(2)))
            .await
            .unwrap()
            .contact_id;
        assert_ne!(new, old);
        // A turn with a message and a reply for the contact as loaded with `id`, refused.
        let refused = async |id: i64, wamid: &str, at: DateTime<Utc>| {
            let message = inbound(wamid, "hi again", at);
            let out = [said(
                OutboundContent::text("hello"),
                Decision::Send {
                    reason: "window open".into(),
                },
            )];
            let err = db
                .commit_turn(&TurnWrite {
                    inbound: Some(&message),
                    outbound: &out,
                    ..bare_turn(Some(id), &contact, at)
                })
                .await
                .unwrap_err();
            assert!(
                matches!(err, StoreError::UnknownContact { id: e } if e == id),
                "{err}"
            );
        };
        refused(old, "wamid.stale.2", t(3)).await;
        assert!(db.messages(CH, "1555", 10).await.unwrap().is_empty());

        // The highest id, deleted, is given to the next contact: the stale id now names
        // someone else, who must not get this turn's message, contact or session.
        sqlx::query("DELETE FROM contacts WHERE id = $1")
            .bind(new)
            .execute(pool)
            .await
            .unwrap();
        let other = Contact::new("1888");
        let reused = db
            .commit_turn(&bare_turn(None, &other, t(4)))
            .await
            .unwrap()
            .contact_id;
        assert_eq!(reused, new, "SQLite hands the freed highest id out again");
        refused(new, "wamid.stale.3", t(5)).await;
        assert!(db.messages(CH, "1888", 10).await.unwrap().is_empty());
        let untouched = db.load_conversation(CH, "1888").await.unwrap();
        assert_eq!(untouched.contact.wa_id, "1888");
        assert_eq!(untouched.session, None);
    }

    #[tokio::test]
    async fn last_customer_message_at_round_trips() {
        let db = memory_db().await;
        let mut contact = Contact::new("1555");
        let id = db
            .commit_turn(&bare_turn(None, &contact, t(0)))
            .await
            .unwrap()
            .contact_id;
        let conv = db.load_conversation(CH, "1555").await.unwrap();
        assert_eq!(conv.contact.last_customer_message_at, None);

        // Millisecond precision survives.
        let at = t(5) + Duration::milliseconds(123);
        contact.saw_customer_message(at);
        db.commit_turn(&bare_turn(Some(id), &contact, t(6)))
            .await
            .unwrap();
        let conv = db.load_conversation(CH, "1555").await.unwrap();
        assert_eq!(conv.contact.last_customer_message_at, Some(at));
    }

    #[tokio::test]
    async fn session_is_replaced_then_deleted() {
        let db = memory_db().await;
        let contact = Contact::new("1555");
        let first = session("ask_name", t(0));
        let id = db
            .commit_turn(&TurnWrite {
                session: Some(&first),
                ..bare_turn(None, &contact, t(0))
            })
            .await
            .unwrap()
            .contact_id;

        let mut second = session("ask_email", t(1));
        second.flow_version = "v2".into();
        second.state = json!({ "email": null });
        db.commit_turn(&TurnWrite {
            session: Some(&second),
            ..bare_turn(Some(id), &contact, t(1))
        })
        .await
        .unwrap();
        let conv = db.load_conversation(CH, "1555").await.unwrap();
        assert_eq!(conv.session, Some(second));

        db.commit_turn(&bare_turn(Some(id), &contact, t(2)))
            .await
            .unwrap();
        let conv = db.load_conversation(CH, "1555").await.unwrap();
        assert_eq!(conv.contact_id, Some(id));
        assert_eq!(conv.session, None);
    }

    #[tokio::test]
    async fn replace_timers_none_keeps_some_replaces() {
        let db = memory_db().await;
        let contact = Contact::new("1555");
        let id = contact_with_timers(&db, "1555", &[timer(t(10), "a"), timer(t(20), "b")]).await;
        let other = contact_with_timers(&db, "1666", &[timer(t(15), "other")]).await;
        assert_ne!(id, other);

        db.commit_turn(&bare_turn(Some(id), &contact, t(1)))
            .await
            .unwrap();
        assert_eq!(timer_tags(&db).await, ["a", "other", "b"]);

        let new = [timer(t(30), "c")];
        db.commit_turn(&TurnWrite {
            replace_timers: Some(&new),
            ..bare_turn(Some(id), &contact, t(2))
        })
        .await
        .unwrap();
        assert_eq!(timer_tags(&db).await, ["other", "c"]);

        db.commit_turn(&TurnWrite {
            replace_timers: Some(&[]),
            ..bare_turn(Some(id), &contact, t(3))
        })
        .await
        .unwrap();
        assert_eq!(timer_tags(&db).await, ["other"]);
    }

    #[tokio::test]
    async fn fired_timer_is_deleted() {
        let db = memory_db().await;
        let contact = Contact::new("1555");
        let id = contact_with_timers(&db, "1555", &[timer(t(10), "a"), timer(t(20), "b")]).await;
        let fired = db.due_timers(t(10), 1).await.unwrap().remove(0);
        assert_eq!(fired.payload["timer"], "a");

        db.commit_turn(&TurnWrite {
            fired_timer: Some(fired.id),
            ..bare_turn(Some(id), &contact, t(10))
        })
        .await
        .unwrap();
        assert_eq!(timer_tags(&db).await, ["b"]);

        // Firing and rescheduling in one turn keeps the new timers, even though the table
        // was emptied first (ids are never reused).
        let fired = db.due_timers(t(20), 1).await.unwrap().remove(0);
        let next = [timer(t(40), "c")];
        db.commit_turn(&TurnWrite {
            fired_timer: Some(fired.id),
            replace_timers: Some(&next),
            ..bare_turn(Some(id), &contact, t(20))
        })
        .await
        .unwrap();
        let left = db.due_timers(t(100), 10).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].payload["timer"], "c");
        assert!(left[0].id > fired.id);
    }

    #[tokio::test]
    async fn due_timers_are_ordered_and_limited() {
        let db = memory_db().await;
        contact_with_timers(&db, "1", &[timer(t(30), "1@30"), timer(t(10), "1@10")]).await;
        contact_with_timers(&db, "2", &[timer(t(10), "2@10"), timer(t(90), "2@90")]).await;

        assert!(db.due_timers(t(9), 10).await.unwrap().is_empty());
        let due = db.due_timers(t(30), 10).await.unwrap();
        let tags: Vec<_> = due.iter().map(|r| r.payload["timer"].clone()).collect();
        // Ties on due_at go by id, i.e. creation order.
        assert_eq!(tags, [json!("1@10"), json!("2@10"), json!("1@30")]);
        assert!(due[0].id < due[1].id);
        assert_eq!((due[1].wa_id.as_str(), due[1].channel.as_str()), ("2", CH));

        let first_two = db.due_timers(t(30), 2).await.unwrap();
        assert_eq!(first_two, due[..2].to_vec());
        assert!(db.due_timers(t(30), 0).await.unwrap().is_empty());
        assert!(db.due_timers(t(30), -1).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn next_timer_at_is_the_earliest() {
        let db = memory_db().await;
        assert_eq!(db.next_timer_at().await.unwrap(), None);
        contact_with_timers(&db, "1", &[timer(t(30), "a")]).await;
        contact_with_timers(&db, "2", &[timer(t(20), "b"), timer(t(50), "c")]).await;
        assert_eq!(db.next_timer_at().await.unwrap(), Some(t(20)));
    }

    #[tokio::test]
    async fn flow_versions_are_immutable() {
        let db = memory_db().await;
        assert_eq!(db.flow_version("welcome", "v1").await.unwrap(), None);
        db.save_flow_version("welcome", "v1", "{\"a\":1}", t(0))
            .await
            .unwrap();
        db.save_flow_version("welcome", "v1", "{\"a\":2}", t(1))
            .await
            .unwrap();
        db.save_flow_version("welcome", "v2", "{\"a\":3}", t(2))
            .await
            .unwrap();
        assert_eq!(
            db.flow_version("welcome", "v1").await.unwrap().as_deref(),
            Some("{\"a\":1}")
        );
        assert_eq!(
            db.flow_version("welcome", "v2").await.unwrap().as_deref(),
            Some("{\"a\":3}")
        );
        assert_eq!(db.flow_version("other", "v1").await.unwrap(), None);
    }

    #[tokio::test]
    async fn reset_forgets_session_and_timers_only() {
        let db = memory_db().await;
        let contact = Contact::new("1555");
        let sess = session("ask_name", t(0));
        let msg = inbound("wamid.1", "hi", t(0));
        let timers = [timer(t(10), "mine")];
        let id = db
            .commit_turn(&TurnWrite {
                session: Some(&sess),
                inbound: Some(&msg),
                replace_timers: Some(&timers),
                ..bare_turn(None, &contact, t(0))
            })
            .await
            .unwrap()
            .contact_id;
        contact_with_timers(&db, "1666", &[timer(t(10), "theirs")]).await;

        db.reset_conversation(CH, "1555").await.unwrap();
        let conv = db.load_conversation(CH, "1555").await.unwrap();
        assert_eq!(conv.contact_id, Some(id));
        assert_eq!(conv.session, None);
        assert_eq!(timer_tags(&db).await, ["theirs"]);
        assert_eq!(db.messages(CH, "1555", 10).await.unwrap().len(), 1);

        // Resetting someone never seen is a no-op.
        db.reset_conversation(CH, "9999").await.unwrap();
    }

    #[tokio::test]
    async fn failing_turn_writes_nothing() {
        let db = memory_db().await;
        let mut contact = Contact::new("1555");
        let first = session("ask_name", t(0));
        let msg = inbound("wamid.1", "hi", t(0));
        let timers = [timer(t(10), "kept")];
        let id = db
            .commit_turn(&TurnWrite {
                session: Some(&first),
                inbound: Some(&msg),
                replace_timers: Some(&timers),
                ..bare_turn(None, &contact, t(0))
            })
            .await
            .unwrap()
            .contact_id;
        let before = db.load_conversation(CH, "1555").await.unwrap();

        // The same inbound message again violates the dedupe index, after the contact and the
        // session were already written inside the transaction.
        contact.name = Some("Changed".into());
        let second = session("ask_email", t(1));
        let out = [said(
            OutboundContent::text("again?"),
            Decision::Send {
                reason: "window open".into(),
            },
        )];
        let new_timers = [timer(t(20), "replacement")];
        let err = db
            .commit_turn(&TurnWrite {
                session: Some(&second),
                inbound: Some(&msg),
                outbound: &out,
                replace_timers: Some(&new_timers),
                fired_timer: None,
                ..bare_turn(Some(id), &contact, t(1))
            })
            .await
            .unwrap_err();
        assert!(err.is_duplicate(), "{err}");

        let after = db.load_conversation(CH, "1555").await.unwrap();
        assert_eq!(after.contact, before.contact);
        assert_eq!(after.session, before.session);
        assert_eq!(db.messages(CH, "1555", 10).await.unwrap().len(), 1);
        assert_eq!(timer_tags(&db).await, ["kept"]);

        // A new contact in a failing turn is not created either.
        let stranger = Contact::new("1777");
        let err = db
            .commit_turn(&TurnWrite {
                inbound: Some(&msg),
                ..bare_turn(None, &stranger, t(2))
            })
            .await
            .unwrap_err();
        assert!(err.is_duplicate(), "{err}");
        assert_eq!(
            db.load_conversation(CH, "1777").await.unwrap().contact_id,
            None
        );

        // The pool is still usable after the rollback.
        db.commit_turn(&bare_turn(Some(id), &contact, t(3)))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn file_database_uses_wal_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/flowgate.db");
        let url = format!("sqlite://{}", path.display());

        let db = Db::connect(&url).await.unwrap();
        db.migrate().await.unwrap();
        assert_eq!(db.backend(), "sqlite");
        let Db::Sqlite { pool, .. } = &db else {
            unreachable!()
        };
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
        let Db::Sqlite { pool, .. } = &db else {
            unreachable!()
        };
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

    /// The embedded list must match `migrations/sqlite/` exactly: a file added there but not
    /// to [`SQLITE_MIGRATIONS`] would never run.
    #[tokio::test]
    async fn embedded_migrations_match_the_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
        let on_disk = Migrator::new(dir).await.unwrap();
        let embedded = Migrator::new(Embedded(SQLITE_MIGRATIONS)).await.unwrap();
        let key = |m: &Migration| (m.version, m.description.to_string(), m.checksum.to_vec());
        assert_eq!(
            on_disk.iter().map(key).collect::<Vec<_>>(),
            embedded.iter().map(key).collect::<Vec<_>>()
        );
    }
}
