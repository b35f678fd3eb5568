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
//! * **Hot writes skip sqlx's worker thread.** sqlx runs each SQLite connection on a worker
//!   thread of its own and hands it every statement through a channel: two thread switches
//!   per statement, which under load cost the writer more than SQLite did. A *raw* job
//!   ([`Writer::run_raw`], [`Writer::query`]) instead runs on this thread, directly on the
//!   connection's SQLite handle (through rusqlite, while sqlx's `lock_handle` keeps sqlx's
//!   worker off it). The raw jobs of a group run first, together, under one lock; a group
//!   of raw jobs only also begins and commits on the handle, and the lock is kept for the
//!   next group while it is raw too (waiting for it included), so a run of raw groups costs
//!   one hand-off in all. The hot writes (webhook updates, turns, claims, recorded sends,
//!   finished inbox rows) are raw; the rest stay on sqlx.
//! * **Savepoints only when a job fails.** A failed job must leave nothing behind, which a
//!   savepoint around each job gives; but inside a group a savepoint makes SQLite copy each
//!   page the job touches that the group touched before it (its sub-journal), and the jobs
//!   of a group touch the same pages: under load that copying was a quarter of the writer's
//!   time. So a group of raw jobs runs them bare first; if one fails, the transaction is
//!   rolled back and the group runs again from its first job, each job in a savepoint of
//!   its own. A raw job may therefore run twice (only the last run's writes and result
//!   count): it must do nothing but its statements.
//!
//! A job is a closure over data it owns (`'static`): it gets the connection, runs its
//! statements, and returns its result. Every job runs inside a transaction (its group's,
//! even when it is alone), so a job's statements commit together. Jobs of one group have no
//! order between them (raw jobs run first); a caller's own jobs run in the order it awaits
//! them. Jobs must not begin or commit transactions with plain `BEGIN`/`COMMIT` text;
//! `Connection::begin` works (sqlx makes it a savepoint), and so does `SAVEPOINT`/`RELEASE`
//! text. A raw job that fails leaves nothing behind and fails alone (unless the failure
//! ended the whole transaction): it ran, or runs again, in a savepoint of its own. A sqlx
//! job that can fail on a constraint after it has written must undo its own writes (a
//! savepoint); one whose only statement that can fail is its first needs nothing.
//!
//! Raw writes wait for readers of an in-memory (shared-cache) database through SQLite's
//! unlock-notify, as sqlx's do; a file database in WAL mode never makes a writer wait for
//! a reader.

use std::future::Future;
use std::pin::Pin;

use rusqlite::types::Value;
use sqlx::sqlite::{LockedSqliteHandle, SqliteConnectOptions};
use sqlx::{Connection as _, SqliteConnection};
use tokio::sync::{mpsc, oneshot};

use super::error::StoreError;
use super::sql::bind_numbered;

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

#[derive(Clone, Copy, PartialEq)]
enum Failure {
    /// SQLite undid the failing statement (or the job its savepoint); the rest stands.
    Statement,
    /// The transaction may be gone or broken.
    Transaction,
}

/// A job on the connection through sqlx.
type SqlxJob = Box<dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Ran> + Send>;

/// A job on the connection's SQLite handle, called directly on the writer thread.
type RawJob = Box<dyn RawWork>;

/// A raw job: run (perhaps twice, see the module's doc), then answered.
trait RawWork: Send {
    /// Runs the job's statements; `isolated`: inside a savepoint of its own, so that
    /// whatever fails leaves nothing behind. How it failed, if it did; its result is kept
    /// (a later run replaces it).
    fn attempt(&mut self, db: &rusqlite::Connection, isolated: bool) -> Option<Failure>;

    /// The last run's outcome, waiting for the group's commit.
    fn into_ran(self: Box<Self>) -> Ran;
}

/// [`RawWork`] for a closure and its caller's reply channel.
struct RawTask<T, F> {
    work: F,
    last: Option<(Result<T, StoreError>, Option<Failure>)>,
    tx: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> RawWork for RawTask<T, F>
where
    T: Send + 'static,
    F: FnMut(&rusqlite::Connection) -> Result<T, StoreError> + Send,
{
    fn attempt(&mut self, db: &rusqlite::Connection, isolated: bool) -> Option<Failure> {
        let (result, failed) = if isolated {
            let exec = |sql: &str| db.prepare_cached(sql).and_then(|mut s| s.execute([]));
            match exec("SAVEPOINT job") {
                Err(e) => (Err(e.into()), Some(Failure::Transaction)),
                Ok(_) => {
                    let result = (self.work)(db);
                    let ended = match result {
                        Ok(_) => exec("RELEASE job"),
                        Err(_) => exec("ROLLBACK TO job").and_then(|_| exec("RELEASE job")),
                    };
                    let failed = match (ended, &result) {
                        (Ok(_), Ok(_)) => None,
                        (Ok(_), Err(_)) => Some(Failure::Statement),
                        (Err(_), _) => Some(Failure::Transaction),
                    };
                    (result, failed)
                }
            }
        } else {
            // Bare: what a failed job wrote is its group's to undo.
            let result = (self.work)(db);
            let failed = result.as_ref().err().map(|_| Failure::Transaction);
            (result, failed)
        };
        self.last = Some((result, failed));
        failed
    }

    fn into_ran(self: Box<Self>) -> Ran {
        let (result, failed) = self
            .last
            .unwrap_or_else(|| (Err(StoreError::Closed), Some(Failure::Transaction)));
        Ran::new(result, failed, self.tx)
    }
}

enum Job {
    Sqlx(SqlxJob),
    Raw(RawJob),
}

enum Command {
    Run(Job),
    Close(oneshot::Sender<()>),
}

/// A handle on the writer thread; cheap to clone.
#[derive(Clone, Debug)]
pub struct Writer {
    jobs: mpsc::UnboundedSender<Command>,
    /// Counts the groups written, so readers can wait for a change instead of polling.
    commits: tokio::sync::watch::Receiver<u64>,
}

impl Writer {
    /// Hands `conn` to a new writer thread; `options` open it again if it breaks.
    pub fn start(conn: SqliteConnection, options: SqliteConnectOptions) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::unbounded_channel();
        let (committed, commits) = tokio::sync::watch::channel(0u64);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("flowgate-writer".into())
            .spawn(move || {
                let driven = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    runtime.block_on(drive(conn, options, queue, committed))
                }));
                if driven.is_err() {
                    // Without its writer the server can take no webhook; a restart (which
                    // processes every stored webhook exactly once) is the way back.
                    tracing::error!("the database's writer panicked; stopping flowgate");
                    std::process::abort();
                }
            })?;
        Ok(Self { jobs, commits })
    }

    /// A receiver that changes after each group the writer ran (committed or not: a
    /// spurious wake-up costs a reader one look). The console's live pages wait on it.
    pub fn commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.commits.clone()
    }

    /// Runs `work` on the writer connection and returns its result once it is committed.
    pub async fn run<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T, StoreError>>
            + Send
            + 'static,
    {
        self.submit(|tx| {
            Job::Sqlx(Box::new(move |conn| {
                Box::pin(async move {
                    let result = work(conn).await;
                    let failed = match &result {
                        Ok(_) => None,
                        Err(e) if e.is_statement_error() => Some(Failure::Statement),
                        Err(_) => Some(Failure::Transaction),
                    };
                    Ran::new(result, failed, tx)
                })
            }))
        })
        .await
    }

    /// Runs `work` directly on the connection's SQLite handle (through rusqlite), on the
    /// writer thread, and returns its result once it is committed.
    /// `work` may run twice (its group's first run rolled back because another job failed):
    /// it must do nothing but its statements.
    pub async fn run_raw<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&rusqlite::Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.submit(|tx| {
            Job::Raw(Box::new(RawTask {
                work,
                last: None,
                tx,
            }))
        })
        .await
    }

    /// Queues the job `make` builds around its reply channel, and waits for the reply.
    async fn submit<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Job,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Command::Run(make(tx)))
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

impl Writer {
    /// Runs one statement with `$n` parameters on the handle; returns its rows. Statements
    /// whose text varies with the length of a list are cached too: the cache drops the
    /// least recently used, and the turns' statements, used by every turn, stay.
    pub async fn query<T>(&self, sql: String, args: Vec<Value>) -> Result<Vec<T>, StoreError>
    where
        T: for<'r> TryFrom<&'r rusqlite::Row<'r>, Error = rusqlite::Error> + Send + 'static,
    {
        self.run_raw(move |db| {
            let mut statement = db.prepare_cached(&sql)?;
            bind_numbered(&mut statement, &args)?;
            let mut rows = statement.raw_query();
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(T::try_from(row)?);
            }
            Ok(out)
        })
        .await
    }
}

impl Ran {
    fn new<T: Send + 'static>(
        result: Result<T, StoreError>,
        failed: Option<Failure>,
        tx: oneshot::Sender<Result<T, StoreError>>,
    ) -> Self {
        Ran {
            failed,
            reply: Box::new(move |group_error: Option<StoreError>| {
                let _ = tx.send(match group_error {
                    Some(e) if result.is_ok() => Err(e),
                    _ => result,
                });
            }),
        }
    }
}

/// The writer thread's loop: take what is queued, run it, commit, answer.
async fn drive(
    mut conn: SqliteConnection,
    options: SqliteConnectOptions,
    queue: mpsc::UnboundedReceiver<Command>,
    committed: tokio::sync::watch::Sender<u64>,
) {
    let mut raw = RawView::default();
    let mut queue = Queue {
        commands: queue,
        closing: None,
    };
    let mut group: Vec<Job> = Vec::with_capacity(GROUP_MAX);
    loop {
        if group.is_empty() && (queue.closing.is_some() || !queue.fill(&mut group).await) {
            break;
        }
        if group.is_empty() {
            continue;
        }
        // Jobs a broken group never started (or all of them, if it could not begin) run
        // again in a new transaction, on a new connection.
        let before = group.len();
        let ok = if group.iter().all(|job| matches!(job, Job::Raw(_))) {
            run_raw_groups(&mut conn, &mut raw, &mut group, &mut queue, &committed).await
        } else {
            let ok = run_group(&mut conn, &mut raw, &mut group).await;
            if ok {
                committed.send_modify(|n| *n = n.wrapping_add(1));
            }
            ok
        };
        if ok {
            continue;
        }
        if group.len() == before {
            // Not even BEGIN worked: wait a little before the next try.
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        raw.release(&mut conn).await;
        conn = reconnect(conn, &options).await;
    }
    raw.release(&mut conn).await;
    if let Err(e) = conn.close().await {
        tracing::warn!(error = %e, "closing the database's writer connection failed");
    }
    if let Some(done) = queue.closing {
        let _ = done.send(());
    }
}

/// The writer's queue of commands, and the close it was asked for.
struct Queue {
    commands: mpsc::UnboundedReceiver<Command>,
    closing: Option<oneshot::Sender<()>>,
}

impl Queue {
    /// Waits for a command, then takes what else is queued (up to [`GROUP_MAX`] jobs, or up
    /// to a close) into `group`; `false` when every sender is gone.
    async fn fill(&mut self, group: &mut Vec<Job>) -> bool {
        match self.commands.recv().await {
            Some(Command::Run(job)) => group.push(job),
            Some(Command::Close(done)) => self.closing = Some(done),
            None => return false,
        }
        while group.len() < GROUP_MAX && self.closing.is_none() {
            match self.commands.try_recv() {
                Ok(Command::Run(job)) => group.push(job),
                Ok(Command::Close(done)) => self.closing = Some(done),
                Err(_) => break,
            }
        }
        true
    }
}

/// rusqlite's view of the writer connection's SQLite handle, kept for its statement cache.
/// It is used only while the handle is locked out of sqlx's worker thread
/// ([`RawView::get`] takes the lock as proof), and dropped before the connection closes.
#[derive(Default)]
struct RawView(Option<rusqlite::Connection>);

/// Statements kept prepared: the turns' shapes, and the list shapes (claims, recorded
/// sends, finished inbox rows) most recently used.
const STATEMENT_CACHE: usize = 512;

impl RawView {
    fn get<'a>(
        &'a mut self,
        locked: &'a mut LockedSqliteHandle<'_>,
    ) -> Result<&'a rusqlite::Connection, rusqlite::Error> {
        if self.0.is_none() {
            // SAFETY: the handle stays open until `release`, which drops this view first;
            // the view does not close the handle, and it is only ever used while `locked`
            // keeps sqlx's worker off the handle (the borrow ties every use to the lock).
            let raw =
                unsafe { rusqlite::Connection::from_handle(locked.as_raw_handle().as_ptr()) }?;
            raw.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
            self.0 = Some(raw);
        }
        Ok(self.0.as_ref().expect("just set"))
    }

    /// Finalizes the cached statements (before `conn` closes or is replaced: sqlx's close
    /// fails, and aborts, while statements are left).
    async fn release(&mut self, conn: &mut SqliteConnection) {
        let Some(raw) = self.0.take() else { return };
        // Finalizing touches the handle: under the lock, or with sqlx's worker gone.
        let locked = conn.lock_handle().await;
        drop(raw);
        drop(locked);
    }
}

impl Drop for RawView {
    /// Not released (a panic is unwinding): finalizing now could race sqlx's worker, so the
    /// statements are left to the process's end (which a writer panic brings at once).
    fn drop(&mut self) {
        if let Some(raw) = self.0.take() {
            std::mem::forget(raw);
        }
    }
}

/// Runs `jobs`, a group holding sqlx jobs, in one transaction and answers each after the
/// commit (or the rollback). Jobs it did not start stay in `jobs`. Returns `false` when the
/// group broke or could not begin: the connection's transaction state is then unknown, and
/// it must be opened again. (Groups of raw jobs only, the usual case, go to
/// [`run_raw_groups`].)
///
/// Raw jobs run first, together, under one lock of the handle.
async fn run_group(conn: &mut SqliteConnection, raw: &mut RawView, jobs: &mut Vec<Job>) -> bool {
    jobs.sort_by_key(|job| matches!(job, Job::Sqlx(_)));
    let mut pending = std::mem::take(jobs).into_iter().peekable();
    let mut ran = Vec::with_capacity(pending.len());
    let (begun, group_error) = run_mixed_group(conn, raw, &mut pending, &mut ran).await;
    jobs.extend(pending);
    let broken = !begun || group_error.is_some();
    for outcome in ran {
        (outcome.reply)(group_error.map(|reason| StoreError::GroupFailed(reason.into())));
    }
    !broken
}

type Pending = std::iter::Peekable<std::vec::IntoIter<Job>>;

/// Why a group's jobs all failed.
const GROUP_BROKE: &str =
    "another write in its group commit failed, so none of the group was written";
const COMMIT_FAILED: &str = "the group commit failed, so none of the group was written";

/// Groups of raw jobs, one after another, each begun and committed on the handle, under
/// one lock of it: taking the lock is a hand-off to sqlx's worker thread and back, so it is
/// kept (waiting for the next jobs included) until a group holds a sqlx job. Returns `false`
/// when a group broke or could not begin (the jobs it did not start stay in `group`), else
/// `true`, with the next group (it holds a sqlx job) in `group`, or nothing when the writer
/// is closing.
async fn run_raw_groups(
    conn: &mut SqliteConnection,
    raw: &mut RawView,
    group: &mut Vec<Job>,
    queue: &mut Queue,
    committed: &tokio::sync::watch::Sender<u64>,
) -> bool {
    let mut locked = match conn.lock_handle().await {
        Ok(locked) => locked,
        Err(e) => {
            tracing::error!(error = %e, "the database's writer could not reach its connection; opening it again");
            return false;
        }
    };
    loop {
        let db = match raw.get(&mut locked) {
            Ok(db) => db,
            Err(e) => {
                tracing::error!(error = %e, "the database's writer could not use its connection; opening it again");
                return false;
            }
        };
        let mut pending = std::mem::take(group).into_iter().peekable();
        let mut ran = Vec::with_capacity(pending.len());
        let (begun, group_error) = raw_transaction(db, &mut pending, &mut ran);
        group.extend(pending);
        for outcome in ran {
            (outcome.reply)(group_error.map(|reason| StoreError::GroupFailed(reason.into())));
        }
        if !begun || group_error.is_some() {
            return false;
        }
        committed.send_modify(|n| *n = n.wrapping_add(1));
        if queue.closing.is_some() || !queue.fill(group).await {
            return true;
        }
        if group.is_empty() || group.iter().any(|job| matches!(job, Job::Sqlx(_))) {
            return true;
        }
    }
}

/// One transaction of raw jobs on the locked handle. Returns whether it began, and the
/// group's error if it did not commit.
fn raw_transaction(
    db: &rusqlite::Connection,
    pending: &mut Pending,
    ran: &mut Vec<Ran>,
) -> (bool, Option<&'static str>) {
    if let Err(e) = db.execute_batch("BEGIN IMMEDIATE") {
        tracing::error!(error = %e, "the database's writer could not begin a transaction; opening it again");
        return (false, None);
    }
    let mut jobs = take_raw(pending);
    // Bare first; after a failure, again from the start, each job in its savepoint.
    let clean = jobs.iter_mut().all(|job| job.attempt(db, false).is_none());
    let broke_at = if clean {
        None
    } else {
        match run_isolated_again(db, &mut jobs) {
            Ok(broke_at) => broke_at,
            Err(()) => {
                put_back(pending, jobs);
                return (false, None);
            }
        }
    };
    if settle(pending, ran, jobs, broke_at) {
        if !db.is_autocommit() {
            let _ = db.execute_batch("ROLLBACK");
        }
        return (true, Some(GROUP_BROKE));
    }
    match db.execute_batch("COMMIT") {
        Ok(()) => (true, None),
        Err(e) => {
            tracing::error!(error = %e, "a group commit failed; its writes are undone");
            let _ = db.execute_batch("ROLLBACK");
            (true, Some(COMMIT_FAILED))
        }
    }
}

/// After a job of a bare run failed: rolls the transaction back and runs `jobs` again in a
/// new one ([`run_isolated`]). `Err` when the transaction could not begin again: no job
/// counts as started.
fn run_isolated_again(db: &rusqlite::Connection, jobs: &mut [RawJob]) -> Result<Option<usize>, ()> {
    // A failure may have ended the transaction already (SQLite rolls back on some errors).
    let again = if db.is_autocommit() {
        db.execute_batch("BEGIN IMMEDIATE")
    } else {
        db.execute_batch("ROLLBACK; BEGIN IMMEDIATE")
    };
    if let Err(e) = again {
        tracing::error!(error = %e, "the database's writer could not run a group again after a failed job; opening it again");
        return Err(());
    }
    Ok(run_isolated(db, jobs))
}

/// Runs `jobs` in order, each in a savepoint of its own, until one breaks the transaction:
/// that job's index (the jobs after it did not start).
fn run_isolated(db: &rusqlite::Connection, jobs: &mut [RawJob]) -> Option<usize> {
    jobs.iter_mut()
        .position(|job| job.attempt(db, true) == Some(Failure::Transaction))
}

/// The raw jobs at the front of `pending`, taken out of it.
fn take_raw(pending: &mut Pending) -> Vec<RawJob> {
    let mut jobs = Vec::new();
    while let Some(Job::Raw(_)) = pending.peek() {
        let Some(Job::Raw(job)) = pending.next() else {
            unreachable!("just peeked")
        };
        jobs.push(job);
    }
    jobs
}

/// Answers the jobs that ran (up to the one at `broke_at`, which broke the transaction,
/// if any) once the group ends, and returns the rest to the front of `pending`. Whether
/// the transaction broke.
fn settle(
    pending: &mut Pending,
    ran: &mut Vec<Ran>,
    mut jobs: Vec<RawJob>,
    broke_at: Option<usize>,
) -> bool {
    if let Some(last) = broke_at {
        put_back(pending, jobs.split_off(last + 1));
    }
    ran.extend(jobs.into_iter().map(RawWork::into_ran));
    broke_at.is_some()
}

/// Returns raw jobs that did not start to the front of `pending`.
fn put_back(pending: &mut Pending, jobs: Vec<RawJob>) {
    let rest = std::mem::replace(pending, Vec::new().into_iter().peekable());
    *pending = jobs
        .into_iter()
        .map(Job::Raw)
        .chain(rest)
        .collect::<Vec<_>>()
        .into_iter()
        .peekable();
}

/// A group with sqlx jobs: begun and committed through sqlx, its raw jobs under one lock.
async fn run_mixed_group(
    conn: &mut SqliteConnection,
    raw: &mut RawView,
    pending: &mut Pending,
    ran: &mut Vec<Ran>,
) -> (bool, Option<&'static str>) {
    let mut tx = match conn.begin_with("BEGIN IMMEDIATE").await {
        Ok(tx) => tx,
        Err(e) => {
            tracing::error!(error = %e, "the database's writer could not begin a transaction; opening it again");
            return (false, None);
        }
    };
    let mut broken = false;
    if matches!(pending.peek(), Some(Job::Raw(_))) {
        broken = match tx.lock_handle().await {
            Ok(mut locked) => match raw.get(&mut locked) {
                Ok(db) => run_raw_jobs(db, pending, ran),
                Err(e) => {
                    tracing::error!(error = %e, "the database's writer could not use its connection");
                    true
                }
            },
            Err(e) => {
                tracing::error!(error = %e, "the database's writer could not reach its connection");
                true
            }
        };
    }
    while !broken && let Some(Job::Sqlx(_)) = pending.peek() {
        let Some(Job::Sqlx(job)) = pending.next() else {
            unreachable!("just peeked")
        };
        let outcome = job(&mut tx).await;
        broken = outcome.failed == Some(Failure::Transaction);
        ran.push(outcome);
    }
    if broken {
        // Whatever the group wrote goes, and each job in it hears that it failed.
        let _ = tx.rollback().await;
        return (true, Some(GROUP_BROKE));
    }
    match tx.commit().await {
        Ok(()) => (true, None),
        Err(e) => {
            tracing::error!(error = %e, "a group commit failed; its writes are undone");
            (true, Some(COMMIT_FAILED))
        }
    }
}

/// Runs the raw jobs at the front of `pending`; `true` when one broke the transaction (the
/// jobs after it stay in `pending`).
fn run_raw_jobs(db: &rusqlite::Connection, pending: &mut Pending, ran: &mut Vec<Ran>) -> bool {
    let mut jobs = take_raw(pending);
    let broke_at = run_isolated(db, &mut jobs);
    settle(pending, ran, jobs, broke_at)
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
        setup_with_busy_timeout(Duration::from_secs(5)).await
    }

    /// [`setup`], with connections that wait `busy` for a lock another connection holds.
    async fn setup_with_busy_timeout(busy: Duration) -> (Writer, SqlitePool, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("w.db"))
            .create_if_missing(true)
            .busy_timeout(busy)
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

    /// How a test's jobs reach the connection: through sqlx, on the handle, or alternating
    /// (groups mixing both).
    #[derive(Clone, Copy, Debug)]
    enum Mode {
        Sqlx,
        Raw,
        Mixed,
    }

    const MODES: [Mode; 3] = [Mode::Sqlx, Mode::Raw, Mode::Mixed];

    /// Runs `sql` (binding `v`) as a job in a task of its own, as a caller would: the `n`th
    /// job of a test in `mode`.
    fn write(
        writer: &Writer,
        sql: &'static str,
        v: &str,
        mode: Mode,
        n: usize,
    ) -> tokio::task::JoinHandle<Result<u64, StoreError>> {
        let (writer, v) = (writer.clone(), v.to_string());
        let raw = is_raw(mode, n);
        tokio::spawn(async move {
            if raw {
                let rows = writer
                    .run_raw(move |db| Ok(db.execute(sql, [&v])? as u64))
                    .await?;
                return Ok(rows);
            }
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

    fn is_raw(mode: Mode, n: usize) -> bool {
        match mode {
            Mode::Sqlx => false,
            Mode::Raw => true,
            Mode::Mixed => n % 2 == 1,
        }
    }

    fn insert(
        writer: &Writer,
        v: &str,
        mode: Mode,
        n: usize,
    ) -> tokio::task::JoinHandle<Result<u64, StoreError>> {
        write(writer, "INSERT INTO t (v) VALUES ($1)", v, mode, n)
    }

    /// A job that breaks its transaction's group: through sqlx, any error but a constraint
    /// (here a missing table); a raw job (which runs in a savepoint of its own), one that
    /// ends the transaction itself.
    fn broken(
        writer: &Writer,
        mode: Mode,
        n: usize,
    ) -> tokio::task::JoinHandle<Result<u64, StoreError>> {
        if !is_raw(mode, n) {
            return write(writer, "INSERT INTO nowhere VALUES ($1)", "x", mode, n);
        }
        let writer = writer.clone();
        tokio::spawn(async move {
            writer
                .run_raw(|db| {
                    db.execute_batch("ROLLBACK")?;
                    Ok(db.execute("INSERT INTO nowhere VALUES (1)", [])? as u64)
                })
                .await
        })
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
        for mode in MODES {
            let (writer, pool, _dir) = setup().await;
            let release = writer.hold().await;
            let calls: Vec<_> = (0..50)
                .map(|i| insert(&writer, &format!("v{i:02}"), mode, i))
                .collect();
            // Each the same kind of job as the one it repeats (in a mixed group, raw jobs run
            // first: jobs of one group have no order between them, only their callers').
            let duplicates = [
                insert(&writer, "v07", mode, 7),
                insert(&writer, "v08", mode, 8),
            ];
            queued().await;
            assert!(
                values(&pool).await.is_empty(),
                "nothing runs while the writer is held"
            );
            release.send(()).unwrap();
            for call in calls {
                assert_eq!(call.await.unwrap().unwrap(), 1, "{mode:?}");
            }
            // A constraint refuses one statement; the rest of its group stands.
            for duplicate in duplicates {
                let err = duplicate.await.unwrap().unwrap_err();
                assert!(err.is_duplicate(), "{mode:?}: {err}");
            }
            assert_eq!(values(&pool).await.len(), 50, "{mode:?}");
        }
    }

    #[tokio::test]
    async fn a_broken_job_undoes_its_group_and_the_writer_goes_on() {
        // In a mixed group the raw jobs run first: the raw one comes before the broken one.
        for mode in MODES {
            let (writer, pool, _dir) = setup().await;
            let release = writer.hold().await;
            let before = insert(&writer, "before", mode, 1);
            queued().await;
            let bad = broken(&writer, mode, 0);
            queued().await;
            let after = insert(&writer, "after", mode, 0);
            queued().await;
            release.send(()).unwrap();

            let err = before.await.unwrap().unwrap_err();
            assert!(matches!(err, StoreError::GroupFailed(_)), "{mode:?}: {err}");
            assert!(err.to_string().contains("write it again"), "{err}");
            let err = bad.await.unwrap().unwrap_err();
            assert!(err.to_string().contains("no such table"), "{mode:?}: {err}");
            // Queued behind the broken job, it runs on its own once the group is undone.
            assert_eq!(after.await.unwrap().unwrap(), 1, "{mode:?}");
            assert_eq!(values(&pool).await, ["after"], "{mode:?}");
            assert_eq!(insert(&writer, "later", mode, 1).await.unwrap().unwrap(), 1);
            assert_eq!(values(&pool).await, ["after", "later"], "{mode:?}");
        }
    }

    #[tokio::test]
    async fn a_failed_raw_job_leaves_nothing_and_fails_alone() {
        let (writer, pool, _dir) = setup().await;
        insert(&writer, "taken", Mode::Raw, 0)
            .await
            .unwrap()
            .unwrap();
        let release = writer.hold().await;
        let other = insert(&writer, "other", Mode::Raw, 0);
        queued().await;
        let half = {
            let writer = writer.clone();
            tokio::spawn(async move {
                writer
                    .run_raw(|db| {
                        db.execute("INSERT INTO t (v) VALUES ('half')", [])?;
                        Ok(db.execute("INSERT INTO t (v) VALUES ('taken')", [])?)
                    })
                    .await
            })
        };
        queued().await;
        release.send(()).unwrap();
        let err = half.await.unwrap().unwrap_err();
        assert!(err.is_duplicate(), "{err}");
        assert_eq!(other.await.unwrap().unwrap(), 1);
        // Its first insert went with its savepoint; the job before it in its group stands.
        assert_eq!(values(&pool).await, ["other", "taken"]);
    }

    #[tokio::test]
    async fn a_raw_group_runs_again_in_savepoints_only_after_a_failed_job() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (writer, pool, _dir) = setup().await;
        insert(&writer, "taken", Mode::Raw, 0)
            .await
            .unwrap()
            .unwrap();
        // Queued behind a held writer, so that they make one group, in this order.
        let counted = |value: &'static str, runs: &Arc<AtomicUsize>| {
            let (writer, runs) = (writer.clone(), runs.clone());
            tokio::spawn(async move {
                writer
                    .run_raw(move |db| {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok(db.execute("INSERT INTO t (v) VALUES (?1)", [value])?)
                    })
                    .await
            })
        };
        let (first, last) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));

        let release = writer.hold().await;
        let clean = [counted("a", &first), counted("b", &last)];
        queued().await;
        release.send(()).unwrap();
        for call in clean {
            assert_eq!(call.await.unwrap().unwrap(), 1);
        }
        assert_eq!(
            (first.load(Ordering::SeqCst), last.load(Ordering::SeqCst)),
            (1, 1),
            "a group without a failure runs each job once"
        );

        let release = writer.hold().await;
        let before = counted("c", &first);
        queued().await;
        let failing = insert(&writer, "taken", Mode::Raw, 1);
        queued().await;
        let after = counted("d", &last);
        queued().await;
        release.send(()).unwrap();
        assert_eq!(before.await.unwrap().unwrap(), 1);
        assert!(failing.await.unwrap().unwrap_err().is_duplicate());
        assert_eq!(after.await.unwrap().unwrap(), 1);
        // The job before the failure ran bare, then again in its savepoint; the one after it
        // only in its savepoint. Each wrote once.
        assert_eq!(
            (first.load(Ordering::SeqCst), last.load(Ordering::SeqCst)),
            (1 + 2, 1 + 1)
        );
        assert_eq!(values(&pool).await, ["a", "b", "c", "d", "taken"]);
    }

    #[tokio::test]
    async fn a_failed_commit_fails_the_group_and_the_writer_goes_on() {
        let (writer, pool, _dir) = setup().await;
        sqlx::query(
            "CREATE TABLE parent (id INTEGER PRIMARY KEY); \
             CREATE TABLE child (parent INTEGER REFERENCES parent (id) \
                DEFERRABLE INITIALLY DEFERRED)",
        )
        .execute(&pool)
        .await
        .unwrap();
        for mode in [Mode::Raw, Mode::Mixed] {
            let release = writer.hold().await;
            let orphan = {
                let writer = writer.clone();
                // A deferred foreign key is checked only at COMMIT.
                tokio::spawn(async move {
                    writer
                        .run_raw(|db| Ok(db.execute("INSERT INTO child VALUES (99)", [])?))
                        .await
                })
            };
            let beside = insert(&writer, "beside", mode, 0);
            queued().await;
            release.send(()).unwrap();
            for err in [
                orphan.await.unwrap().unwrap_err(),
                beside.await.unwrap().map(|_| ()).unwrap_err(),
            ] {
                assert!(matches!(err, StoreError::GroupFailed(_)), "{mode:?}: {err}");
            }
            assert!(values(&pool).await.is_empty(), "{mode:?}");
        }
        assert_eq!(
            insert(&writer, "later", Mode::Raw, 0)
                .await
                .unwrap()
                .unwrap(),
            1
        );
        assert_eq!(values(&pool).await, ["later"]);
    }

    #[tokio::test]
    async fn a_group_that_cannot_begin_fails_nobody_and_runs_on_a_new_connection() {
        for mode in MODES {
            let (writer, pool, _dir) = setup_with_busy_timeout(Duration::from_millis(50)).await;
            // Another connection holds the write lock: the writer's BEGIN IMMEDIATE gives up
            // after its busy timeout, again and again.
            let mut blocker = pool.acquire().await.unwrap();
            sqlx::query("BEGIN IMMEDIATE")
                .execute(&mut *blocker)
                .await
                .unwrap();
            let calls: Vec<_> = (0..3)
                .map(|i| insert(&writer, &format!("v{i}"), mode, i))
                .collect();
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert!(
                calls.iter().all(|call| !call.is_finished()),
                "{mode:?}: jobs whose group could not begin wait, and fail nobody"
            );
            sqlx::query("COMMIT").execute(&mut *blocker).await.unwrap();
            for call in calls {
                let written = tokio::time::timeout(Duration::from_secs(10), call)
                    .await
                    .expect("the jobs run once the lock is released")
                    .unwrap();
                assert_eq!(written.unwrap(), 1, "{mode:?}");
            }
            assert_eq!(values(&pool).await, ["v0", "v1", "v2"], "{mode:?}");
            // The connection it opened again goes on writing.
            assert_eq!(insert(&writer, "v3", mode, 1).await.unwrap().unwrap(), 1);
        }
    }

    /// A panic inside a job stops the process (its callers would otherwise wait forever for
    /// a writer that is gone). Checked in a child process: this test binary, run again on
    /// this one test with `PANIC_IN_A_WRITER_JOB` set.
    #[tokio::test]
    async fn a_panic_in_a_job_aborts_the_process() {
        const CHILD: &str = "PANIC_IN_A_WRITER_JOB";
        if let Some(mode) = std::env::var_os(CHILD) {
            let (writer, _pool, _dir) = setup().await;
            let outcome = if mode == "raw" {
                writer
                    .run_raw(|_| -> Result<(), StoreError> { panic!("a job panics") })
                    .await
            } else {
                writer
                    .run(|_| Box::pin(async { panic!("a job panics") }))
                    .await
            };
            // The caller may hear an error first (the writer's unwinding drops its reply),
            // but the abort follows at once; the parent sees a normal exit otherwise.
            eprintln!("the caller heard back: {outcome:?}");
            tokio::time::sleep(Duration::from_secs(10)).await;
            std::process::exit(0);
        }
        for mode in ["raw", "sqlx"] {
            let child = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "store::writer::tests::a_panic_in_a_job_aborts_the_process",
                    "--nocapture",
                ])
                .env(CHILD, mode)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&child.stderr);
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(
                child.status.signal(),
                Some(6),
                "{mode}: SIGABRT expected, got {:?}; stderr: {stderr}",
                child.status
            );
            assert!(stderr.contains("a job panics"), "{mode}: {stderr}");
        }
    }

    #[tokio::test]
    async fn close_finalizes_the_cached_statements_and_checkpoints() {
        let (writer, pool, dir) = setup().await;
        // A cached statement stays prepared on the handle; closing must finalize it first,
        // or SQLite refuses to close (and the WAL is left behind).
        writer
            .run_raw(|db| {
                db.prepare_cached("INSERT INTO t (v) VALUES (?1)")?
                    .execute(["cached"])?;
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(values(&pool).await, ["cached"]);
        pool.close().await;
        writer.close().await;
        assert!(
            !dir.path().join("w.db-wal").exists(),
            "the WAL was checkpointed away"
        );
    }

    #[tokio::test]
    async fn a_caller_that_stops_waiting_does_not_stop_its_job() {
        for mode in MODES {
            let (writer, pool, _dir) = setup().await;
            let release = writer.hold().await;
            let call = insert(&writer, "orphan", mode, 1);
            queued().await;
            call.abort();
            assert!(call.await.unwrap_err().is_cancelled());
            release.send(()).unwrap();
            assert_eq!(insert(&writer, "next", mode, 0).await.unwrap().unwrap(), 1);
            assert_eq!(values(&pool).await, ["next", "orphan"], "{mode:?}");
        }
    }

    #[tokio::test]
    async fn close_finishes_what_is_queued_then_refuses() {
        let (writer, pool, _dir) = setup().await;
        let release = writer.hold().await;
        let queued_first = insert(&writer, "queued", Mode::Raw, 0);
        queued().await;
        let closing = {
            let writer = writer.clone();
            tokio::spawn(async move { writer.close().await })
        };
        queued().await;
        release.send(()).unwrap();
        closing.await.unwrap();
        assert_eq!(queued_first.await.unwrap().unwrap(), 1);
        let err = insert(&writer, "too late", Mode::Sqlx, 0)
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, StoreError::Closed), "{err}");
        assert_eq!(values(&pool).await, ["queued"]);
    }
}
