//! SQLite's one writer connection, owned by a thread of its own.
//!
//! SQLite lets one connection write at a time, so every write in flowgate goes through this
//! one. It is driven by a small runtime on a dedicated thread, fed by a queue of jobs:
//!
//! * **No idle gaps.** Between two writes the connection waits for nobody. Driven from the
//!   server's runtime instead, each write would wait for its task to be polled among
//!   hundreds of webhook and send tasks, and the writer would sit idle in between; under load
//!   that wait, not SQLite, was most of a write's latency.
//! * **Group commit.** When several jobs are waiting, they run in one transaction: one
//!   commit, and the pages they share (the tails of the inbox and the message log, their
//!   indexes) written once instead of once per job. A caller hears back only after that
//!   commit. A job that fails on a constraint (a statement SQLite undid by itself, or a
//!   batch that rolled back to its own savepoint) fails alone; any other error, or a failed
//!   commit, rolls the whole group back and every job in it reports the error, as if each
//!   had failed on its own connection. The connection is then opened again, and the jobs
//!   the group never started run in a new transaction on it. A panic in a job stops the
//!   process (without its writer the server can store nothing; a restart resumes).
//! * **Jobs run to the end.** A caller that stops waiting (a timeout, a shutdown) does not
//!   stop its job half-way, so no transaction is ever left open on the connection.
//!
//! A job is a closure over data it owns (`'static`): it gets the connection, runs its
//! statements, and returns its result. Every job runs inside a transaction (its group's,
//! even when it is alone), so a job's statements commit together. Jobs must not begin or
//! commit transactions with plain `BEGIN`/`COMMIT` text; `Connection::begin` works (sqlx
//! makes it a savepoint), and so does `SAVEPOINT`/`RELEASE` text. A job that can fail on a
//! constraint after it has written must undo its own writes (a savepoint); one whose only
//! statement that can fail is its first needs nothing.

use std::future::Future;
use std::pin::Pin;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection as _, SqliteConnection};
use tokio::sync::{mpsc, oneshot};

use super::StoreError;

/// A job's future, boxed: the writer runs jobs of every type.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Jobs run together in one transaction at most.
const GROUP_MAX: usize = 128;

/// What a job came to, waiting for its group's commit: whether it failed in a way that
/// leaves the transaction usable, and how to tell its caller.
struct Ran {
    failed: Option<Failure>,
    reply: Box<dyn FnOnce(Option<StoreError>) + Send>,
}

#[derive(PartialEq)]
enum Failure {
    /// SQLite undid the failing statement (or the job its savepoint); the rest stands.
    Statement,
    /// The transaction may be gone or broken.
    Transaction,
}

type Job = Box<dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Ran> + Send>;

enum Command {
    Run(Job),
    Close(oneshot::Sender<()>),
}

/// A handle on the writer thread; cheap to clone.
#[derive(Clone, Debug)]
pub struct Writer {
    jobs: mpsc::UnboundedSender<Command>,
}

impl Writer {
    /// Hands `conn` to a new writer thread; `options` open it again if it breaks.
    pub fn start(conn: SqliteConnection, options: SqliteConnectOptions) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::unbounded_channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("flowgate-writer".into())
            .spawn(move || {
                let driven = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    runtime.block_on(drive(conn, options, queue))
                }));
                if driven.is_err() {
                    // Without its writer the server can take no webhook; a restart (which
                    // processes every stored webhook exactly once) is the way back.
                    tracing::error!("the database's writer panicked; stopping flowgate");
                    std::process::abort();
                }
            })?;
        Ok(Self { jobs })
    }

    /// Runs `work` on the writer connection and returns its result once it is committed.
    pub async fn run<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T, StoreError>>
            + Send
            + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            Box::pin(async move {
                let result = work(conn).await;
                let failed = match &result {
                    Ok(_) => None,
                    Err(e) if e.is_statement_error() => Some(Failure::Statement),
                    Err(_) => Some(Failure::Transaction),
                };
                Ran {
                    failed,
                    reply: Box::new(move |group_error: Option<StoreError>| {
                        let _ = tx.send(match group_error {
                            Some(e) if result.is_ok() => Err(e),
                            _ => result,
                        });
                    }),
                }
            })
        });
        self.jobs
            .send(Command::Run(job))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Finishes the jobs already queued, then closes the connection (SQLite checkpoints its
    /// WAL). Later jobs fail with [`StoreError::Closed`].
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Command::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// The writer thread's loop: take what is queued, run it, commit, answer.
async fn drive(
    mut conn: SqliteConnection,
    options: SqliteConnectOptions,
    mut queue: mpsc::UnboundedReceiver<Command>,
) {
    let mut closing = None;
    let mut group: Vec<Job> = Vec::with_capacity(GROUP_MAX);
    while closing.is_none() {
        match queue.recv().await {
            Some(Command::Run(job)) => group.push(job),
            Some(Command::Close(done)) => closing = Some(done),
            None => break,
        }
        while group.len() < GROUP_MAX && closing.is_none() {
            match queue.try_recv() {
                Ok(Command::Run(job)) => group.push(job),
                Ok(Command::Close(done)) => closing = Some(done),
                Err(_) => break,
            }
        }
        // Jobs a broken group never started (or all of them, if it could not begin) run
        // again in a new transaction, on a new connection.
        while !group.is_empty() {
            let before = group.len();
            if run_group(&mut conn, &mut group).await {
                continue;
            }
            if group.len() == before {
                // Not even BEGIN worked: wait a little before the next try.
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            conn = reconnect(conn, &options).await;
        }
    }
    if let Err(e) = conn.close().await {
        tracing::warn!(error = %e, "closing the database's writer connection failed");
    }
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

/// Runs `jobs` in one transaction and answers each after the commit (or the rollback).
/// Jobs it did not start stay in `jobs`. Returns `false` when the group broke or could not
/// begin: the connection's transaction state is then unknown, and it must be opened again.
async fn run_group(conn: &mut SqliteConnection, jobs: &mut Vec<Job>) -> bool {
    let mut tx = match conn.begin().await {
        Ok(tx) => tx,
        Err(e) => {
            tracing::error!(error = %e, "the database's writer could not begin a transaction; opening it again");
            return false;
        }
    };
    let mut ran = Vec::with_capacity(jobs.len());
    let mut broken = false;
    let mut started = 0;
    let mut pending = std::mem::take(jobs).into_iter();
    for job in pending.by_ref() {
        started += 1;
        let outcome = job(&mut tx).await;
        broken = outcome.failed == Some(Failure::Transaction);
        ran.push(outcome);
        if broken {
            break;
        }
    }
    jobs.extend(pending);
    debug_assert_eq!(started, ran.len());
    let group_error = if broken {
        // Whatever the group wrote goes, and each job in it hears that it failed.
        let _ = tx.rollback().await;
        Some("another write in its group commit failed, so none of the group was written")
    } else {
        match tx.commit().await {
            Ok(()) => None,
            Err(e) => {
                tracing::error!(error = %e, "a group commit failed; its writes are undone");
                broken = true;
                Some("the group commit failed, so none of the group was written")
            }
        }
    };
    for outcome in ran {
        (outcome.reply)(group_error.map(|reason| StoreError::GroupFailed(reason.into())));
    }
    !broken
}

/// Closes a connection in an unknown state (an open transaction is rolled back) and opens
/// a fresh one, retrying every second until the database can be opened.
async fn reconnect(conn: SqliteConnection, options: &SqliteConnectOptions) -> SqliteConnection {
    // The new connection first: an in-memory database lives only while one is open.
    loop {
        match sqlx::ConnectOptions::connect(options).await {
            Ok(fresh) => {
                let _ = conn.close().await;
                return fresh;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot open the database's writer connection again; retrying in a second");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

/// Holding the writer still, so tests can queue jobs behind it and see them grouped.
#[cfg(test)]
impl Writer {
    /// Occupies the writer until the returned sender is used or dropped; returns once the
    /// writer is held.
    pub(crate) async fn hold(&self) -> oneshot::Sender<()> {
        let (release, released) = oneshot::channel::<()>();
        let (held, is_held) = oneshot::channel();
        let writer = self.clone();
        tokio::spawn(async move {
            writer
                .run(move |_| {
                    Box::pin(async move {
                        let _ = held.send(());
                        let _ = released.await;
                        Ok(())
                    })
                })
                .await
        });
        is_held.await.expect("the writer runs the holding job");
        release
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sqlx::sqlite::SqlitePool;

    use super::*;

    /// A writer on a fresh file database with `t(v TEXT UNIQUE)`, and a reader pool.
    async fn setup() -> (Writer, SqlitePool, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("w.db"))
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
        let mut conn = sqlx::ConnectOptions::connect(&options).await.unwrap();
        sqlx::query("CREATE TABLE t (v TEXT NOT NULL UNIQUE)")
            .execute(&mut conn)
            .await
            .unwrap();
        let writer = Writer::start(conn, options.clone()).unwrap();
        let pool = SqlitePool::connect_with(options).await.unwrap();
        (writer, pool, dir)
    }

    /// Runs `sql` (binding `v`) as a job in a task of its own, as a caller would.
    fn write(
        writer: &Writer,
        sql: &'static str,
        v: &str,
    ) -> tokio::task::JoinHandle<Result<u64, StoreError>> {
        let (writer, v) = (writer.clone(), v.to_string());
        tokio::spawn(async move {
            writer
                .run(move |conn| {
                    Box::pin(async move {
                        let done = sqlx::query(sql).bind(v).execute(conn).await?;
                        Ok(done.rows_affected())
                    })
                })
                .await
        })
    }

    fn insert(writer: &Writer, v: &str) -> tokio::task::JoinHandle<Result<u64, StoreError>> {
        write(writer, "INSERT INTO t (v) VALUES ($1)", v)
    }

    /// A job that breaks its transaction's group (not a constraint: a missing table).
    fn broken(writer: &Writer) -> tokio::task::JoinHandle<Result<u64, StoreError>> {
        write(writer, "INSERT INTO nowhere VALUES ($1)", "x")
    }

    async fn values(pool: &SqlitePool) -> Vec<String> {
        sqlx::query_scalar("SELECT v FROM t ORDER BY v")
            .fetch_all(pool)
            .await
            .unwrap()
    }

    /// Lets spawned callers queue their jobs behind a held writer.
    async fn queued() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    #[tokio::test]
    async fn queued_jobs_commit_together_and_each_hears_its_own_result() {
        let (writer, pool, _dir) = setup().await;
        let release = writer.hold().await;
        let calls: Vec<_> = (0..50)
            .map(|i| insert(&writer, &format!("v{i:02}")))
            .collect();
        let duplicate = insert(&writer, "v07");
        queued().await;
        assert!(
            values(&pool).await.is_empty(),
            "nothing runs while the writer is held"
        );
        release.send(()).unwrap();
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap(), 1);
        }
        // A constraint refuses one statement; the rest of its group stands.
        let err = duplicate.await.unwrap().unwrap_err();
        assert!(err.is_duplicate(), "{err}");
        assert_eq!(values(&pool).await.len(), 50);
    }

    #[tokio::test]
    async fn a_broken_job_undoes_its_group_and_the_writer_goes_on() {
        let (writer, pool, _dir) = setup().await;
        let release = writer.hold().await;
        let before = insert(&writer, "before");
        queued().await;
        let bad = broken(&writer);
        queued().await;
        let after = insert(&writer, "after");
        queued().await;
        release.send(()).unwrap();

        let err = before.await.unwrap().unwrap_err();
        assert!(matches!(err, StoreError::GroupFailed(_)), "{err}");
        assert!(err.to_string().contains("write it again"), "{err}");
        let err = bad.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("no such table"), "{err}");
        // Queued behind the broken job, it runs on its own once the group is undone.
        assert_eq!(after.await.unwrap().unwrap(), 1);
        assert_eq!(values(&pool).await, ["after"]);
        assert_eq!(insert(&writer, "later").await.unwrap().unwrap(), 1);
        assert_eq!(values(&pool).await, ["after", "later"]);
    }

    #[tokio::test]
    async fn a_caller_that_stops_waiting_does_not_stop_its_job() {
        let (writer, pool, _dir) = setup().await;
        let release = writer.hold().await;
        let call = insert(&writer, "orphan");
        queued().await;
        call.abort();
        assert!(call.await.unwrap_err().is_cancelled());
        release.send(()).unwrap();
        assert_eq!(insert(&writer, "next").await.unwrap().unwrap(), 1);
        assert_eq!(values(&pool).await, ["next", "orphan"]);
    }

    #[tokio::test]
    async fn close_finishes_what_is_queued_then_refuses() {
        let (writer, pool, _dir) = setup().await;
        let release = writer.hold().await;
        let queued_first = insert(&writer, "queued");
        queued().await;
        let closing = {
            let writer = writer.clone();
            tokio::spawn(async move { writer.close().await })
        };
        queued().await;
        release.send(()).unwrap();
        closing.await.unwrap();
        assert_eq!(queued_first.await.unwrap().unwrap(), 1);
        let err = insert(&writer, "too late").await.unwrap().unwrap_err();
        assert!(matches!(err, StoreError::Closed), "{err}");
        assert_eq!(values(&pool).await, ["queued"]);
    }
}
