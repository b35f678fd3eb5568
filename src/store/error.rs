//! [`StoreError`]: everything that can go wrong talking to the database, each saying what
//! to do about it, whichever backend raised it.

use std::path::PathBuf;

/// Everything that can go wrong talking to the database, each saying what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// An error of a write made directly on the writer's SQLite handle ([`super::writer`]).
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
        "invalid database URL `{url}`: {reason}; use sqlite://path/to/flowgate.db, sqlite::memory: \
         or postgres://user:password@host/database"
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
        "timer {id} was already fired (by another instance, or replaced since it was read); \
         the turn wrote nothing"
    )]
    TimerAlreadyFired { id: i64 },
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
    /// in a savepoint of its own instead; see [`super::writer`]): a constraint refused one
    /// statement (SQLite undid just that statement), or a value did not bind (nothing ran).
    /// Anything else may have ended the transaction, or failed after a statement wrote (a
    /// row of `RETURNING` that does not decode), so it counts as breaking it.
    pub(super) fn is_statement_error(&self) -> bool {
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
