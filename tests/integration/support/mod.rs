//! Helpers shared by the integration test modules (`use crate::support;`).

pub mod channel;
pub mod fake_graph;

/// A `flowgate.yaml` in `dir` for the repository's own flows, scripts and templates, with
/// `extra` config appended; returns its path.
pub fn shipped_project(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = format!(
        "flows: {}\nscripts: {}\ntemplates: {}\n{extra}",
        root.join("flows").display(),
        root.join("scripts").display(),
        root.join("templates.yaml").display()
    );
    let path = dir.join("flowgate.yaml");
    std::fs::write(&path, config).unwrap();
    path
}

/// A webhook `timestamp` (unix seconds, as text) for a message written now. Servers in tests
/// run on the system clock, and an older timestamp would put the customer outside the
/// 24-hour window.
pub fn now_timestamp() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
        .to_string()
}

/// A TCP port on 127.0.0.1 free a moment ago, for a server started as its own process
/// (`listen:` in its config).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a port on loopback")
        .port()
}

/// `sha256=<hex>`: the `X-Hub-Signature-256` Meta sends, over `body` with the app secret.
pub fn sign(secret: &str, body: &[u8]) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A `messages` webhook for business number `phone_number_id` with `value` merged into its
/// `value` (`{"messages": […]}`, `{"statuses": […]}`).
pub fn envelope(phone_number_id: &str, value: serde_json::Value) -> Vec<u8> {
    webhook("messages", phone_number_id, value)
}

/// A webhook of `field` (`messages`, `user_preferences`…) for business number
/// `phone_number_id`, with `value` merged into its `value`.
pub fn webhook(field: &str, phone_number_id: &str, value: serde_json::Value) -> Vec<u8> {
    let mut v = serde_json::json!({
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550001111", "phone_number_id": phone_number_id}
    });
    if let (Some(v), Some(extra)) = (v.as_object_mut(), value.as_object()) {
        v.extend(extra.clone());
    }
    serde_json::to_vec(&serde_json::json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": "100000000000001", "changes": [{"field": field, "value": v}]}]
    }))
    .expect("JSON serializes")
}

/// Polls `check` every 20 ms for up to 60 s; panics with `what` when it never holds.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The real server (`Application`) on 127.0.0.1:0, running until [`Running::shutdown`].
pub struct Running {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    pub db: flowgate::store::Db,
    /// An HTTP client whose requests give up after 20 s.
    pub client: reqwest::Client,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// The value of the series `series` (its name and labels, as written) on `/metrics`;
    /// 0 when it is not there. Tests share the process's metrics: compare with a value read
    /// before.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    pub async fn start(
        loaded: &flowgate::app::Loaded,
        database_url: &str,
        clock: flowgate::clock::SharedClock,
    ) -> Self {
        Self::start_on(loaded, database_url, "127.0.0.1:0", clock).await
    }

    /// [`Running::start`] listening on `listen` (e.g. `0.0.0.0:0`); `base` is still
    /// 127.0.0.1 with the port it got, so tests connect over loopback only.
    pub async fn start_on(
        loaded: &flowgate::app::Loaded,
        database_url: &str,
        listen: &str,
        clock: flowgate::clock::SharedClock,
    ) -> Self {
        let application = flowgate::app::Application::build(loaded, database_url, listen, clock)
            .await
            .unwrap();
        let base = format!("http://127.0.0.1:{}", application.local_addr().port());
        let db = application.runtime.db.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(application.run_until(async {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(20))
            .build()
            .unwrap();
        Self {
            base,
            db,
            client,
            stop,
            task,
        }
    }

    /// Stops it as Ctrl-C would, and waits (bounded) for a clean stop.
    pub async fn shutdown(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(20), self.task)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
    }
}

/// Runs `flowgate --config CONFIG ARGS…` to its end (at most 60 s), without colours or a
/// `RUST_LOG` from the environment.
pub async fn run_flowgate(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(std::time::Duration::from_secs(60), run)
        .await
        .unwrap_or_else(|_| panic!("flowgate {args:?} finishes within 60 s"))
        .expect("flowgate runs")
}

/// The database a test's server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A test's database: a SQLite file in the test's directory, or a fresh schema of the
/// PostgreSQL database `FLOWGATE_TEST_POSTGRES_URL` names (dropped by [`TestDb::clean_up`]).
pub struct TestDb {
    /// The `database:` URL for the server.
    pub url: String,
    /// The schema on PostgreSQL, and the URL to drop it through.
    schema: Option<(String, String)>,
}

impl TestDb {
    /// The database for `backend`; `None` (after saying why) when the test asks for
    /// PostgreSQL and `FLOWGATE_TEST_POSTGRES_URL` is unset, unless `FLOWGATE_REQUIRE_POSTGRES`
    /// is set (CI), which fails the test instead.
    pub async fn new(dir: &std::path::Path, backend: Backend) -> Option<TestDb> {
        if backend == Backend::Sqlite {
            return Some(TestDb {
                url: format!("sqlite://{}", dir.join("flowgate.db").display()),
                schema: None,
            });
        }
        let Ok(base) = std::env::var("FLOWGATE_TEST_POSTGRES_URL") else {
            assert!(
                std::env::var_os("FLOWGATE_REQUIRE_POSTGRES").is_none(),
                "FLOWGATE_REQUIRE_POSTGRES is set but FLOWGATE_TEST_POSTGRES_URL is not"
            );
            eprintln!("skipped: set FLOWGATE_TEST_POSTGRES_URL to run this test on PostgreSQL");
            return None;
        };
        let schema = flowgate::store::create_test_schema(&base, "fg_it")
            .await
            .expect("FLOWGATE_TEST_POSTGRES_URL names a server that answers");
        let separator = if base.contains('?') { '&' } else { '?' };
        Some(TestDb {
            url: format!("{base}{separator}options[search_path]={schema}"),
            schema: Some((schema, base)),
        })
    }

    /// Drops the PostgreSQL schema (a failed test keeps it, to look at).
    pub async fn clean_up(self) {
        use sqlx::Connection as _;
        if let Some((schema, base)) = self.schema {
            let mut conn = sqlx::PgConnection::connect(&base).await.unwrap();
            sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                .execute(&mut conn)
                .await
                .unwrap();
            conn.close().await.unwrap();
        }
    }
}

/// `SELECT COUNT(*)…` (any one BIGINT) on whichever backend `db` is.
pub async fn count(db: &flowgate::store::Db, sql: &str) -> i64 {
    if let Some(pool) = db.sqlite_pool() {
        return sqlx::query_scalar(sql).fetch_one(pool).await.unwrap();
    }
    let pool = db.postgres_pool().expect("SQLite or PostgreSQL");
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// One text value, on whichever backend `db` is.
pub async fn text(db: &flowgate::store::Db, sql: &str) -> String {
    if let Some(pool) = db.sqlite_pool() {
        return sqlx::query_scalar(sql).fetch_one(pool).await.unwrap();
    }
    let pool = db.postgres_pool().expect("SQLite or PostgreSQL");
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Runs a statement, on whichever backend `db` is.
pub async fn exec(db: &flowgate::store::Db, sql: &str) {
    if let Some(pool) = db.sqlite_pool() {
        sqlx::query(sql).execute(pool).await.unwrap();
        return;
    }
    let pool = db.postgres_pool().expect("SQLite or PostgreSQL");
    sqlx::query(sql).execute(pool).await.unwrap();
}
