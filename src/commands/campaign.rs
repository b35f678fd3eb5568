//! `flowgate campaign …`: a client of a running server's campaign API (`/api/campaigns`),
//! since the serving process owns dispatch. The server's URL is `--url`, else the config's
//! `listen` address (a wildcard address is reached on loopback); the token is
//! `FLOWGATE_ADMIN_TOKEN`, else the config's `admin.token`.
//!
//! Functions answer values and text for `main.rs` to print; `run-now`'s progress comes
//! through a callback so `main.rs` can draw it.

use std::path::Path;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::campaign::report::Report;
use crate::config::Config;
use crate::diagnostic::Diagnostics;

/// The environment variable that gives the admin token (before the config's).
pub const TOKEN_ENV: &str = "FLOWGATE_ADMIN_TOKEN";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the config does not load")]
    Config(Box<Diagnostics>),
    #[error("no flowgate server at {url}: start `flowgate serve` or pass --url")]
    NoServer { url: String },
    #[error("{method} {url} failed: {source}")]
    Http {
        method: Method,
        url: String,
        source: reqwest::Error,
    },
    /// The server refused: its code and message (and the diagnostics of an invalid
    /// definition, rendered).
    #[error("{message} ({code}){}", details.as_deref().map(|d| format!("\n{d}")).unwrap_or_default())]
    Refused {
        status: StatusCode,
        code: String,
        message: String,
        details: Option<String>,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("campaign `{0}` has no runs yet: start one with `flowgate campaign run-now {0}`")]
    NoRuns(String),
    #[error("the server's answer is not what this client expects: {0}")]
    Answer(String),
}

/// A client of one server's campaign API.
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// The server `url` names, else the config's `listen`; the token from the environment,
    /// else the config. A config that does not load is an error only without `--url`.
    pub fn new(config_path: Option<&Path>, url: Option<&str>) -> Result<Self, ClientError> {
        let config = match (Config::load(config_path), url) {
            (Ok(config), _) => Some(config),
            (Err(_), Some(_)) => None,
            (Err(diags), None) => return Err(ClientError::Config(diags)),
        };
        let base = match url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => listen_url(&config.as_ref().expect("loaded without --url").listen),
        };
        let token = std::env::var(TOKEN_ENV)
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| {
                let token = config.as_ref()?.admin.token.as_ref()?;
                Some(token.expose().to_string()).filter(|t| !t.is_empty())
            });
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|source| ClientError::Http {
                method: Method::GET,
                url: base.clone(),
                source,
            })?;
        Ok(Self { base, token, http })
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// One API call: the JSON answer, or why not. `timeout` bounds the whole call.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, String)>,
        headers: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let url = format!("{}/api{path}", self.base);
        let mut request = self.http.request(method.clone(), &url).timeout(timeout);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some((content_type, body)) = body {
            request = request.header("content-type", content_type).body(body);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.map_err(|source| {
            if source.is_connect() {
                ClientError::NoServer {
                    url: self.base.clone(),
                }
            } else {
                ClientError::Http {
                    method: method.clone(),
                    url: url.clone(),
                    source,
                }
            }
        })?;
        let status = response.status();
        let text = response.text().await.map_err(|source| ClientError::Http {
            method,
            url,
            source,
        })?;
        let value: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).map_err(|_| ClientError::Answer(text.clone()))?
        };
        if status.is_success() {
            return Ok(value);
        }
        let error = &value["error"];
        Err(ClientError::Refused {
            status,
            code: error["code"].as_str().unwrap_or("unknown").to_string(),
            message: error["message"].as_str().unwrap_or(&text).to_string(),
            details: error["diagnostics"]["rendered"].as_str().map(String::from),
        })
    }

    async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call(Method::GET, path, None, &[], SHORT).await
    }

    async fn post(&self, path: &str) -> Result<Value, ClientError> {
        self.call(Method::POST, path, None, &[], SHORT).await
    }

    /// `GET /api/campaigns`.
    pub async fn list(&self) -> Result<Value, ClientError> {
        self.get("/campaigns").await
    }

    /// `POST /api/campaigns` with the file's YAML.
    pub async fn create(&self, file: &Path) -> Result<Value, ClientError> {
        let source = std::fs::read_to_string(file).map_err(|source| ClientError::Read {
            path: file.display().to_string(),
            source,
        })?;
        let body = Some(("application/yaml", source));
        self.call(Method::POST, "/campaigns", body, &[], SHORT)
            .await
    }

    /// `POST /api/campaigns/{name}/{action}` (pause, resume, cancel).
    pub async fn control(&self, name: &str, action: &str) -> Result<Value, ClientError> {
        self.post(&format!("/campaigns/{}/{action}", segment(name)))
            .await
    }

    /// `POST /api/campaigns/{name}/run-now` with `key` as its `Idempotency-Key`; a call
    /// that timed out is tried once more with the same key (it cannot start a second run).
    pub async fn run_now(&self, name: &str, key: &str) -> Result<Value, ClientError> {
        let path = format!("/campaigns/{}/run-now", segment(name));
        let headers = [("idempotency-key", key)];
        match self
            .call(Method::POST, &path, None, &headers, SNAPSHOT)
            .await
        {
            Err(ClientError::Http { source, .. }) if source.is_timeout() => {
                self.call(Method::POST, &path, None, &headers, SNAPSHOT)
                    .await
            }
            other => other,
        }
    }

    /// `GET /api/campaigns/{name}/runs/{id}`, or the latest run's when `run` is `None`.
    pub async fn report(&self, name: &str, run: Option<i64>) -> Result<RunReport, ClientError> {
        let name_path = segment(name);
        let run = match run {
            Some(run) => run,
            None => {
                let runs = self
                    .get(&format!("/campaigns/{name_path}/runs?limit=1"))
                    .await?;
                runs["runs"][0]["id"]
                    .as_i64()
                    .ok_or_else(|| ClientError::NoRuns(name.into()))?
            }
        };
        let value = self
            .get(&format!("/campaigns/{name_path}/runs/{run}"))
            .await?;
        RunReport::from_json(&value)
    }

    /// Polls run `run`'s report every `every` until the run is over, calling `progress`
    /// with each; answers the last.
    pub async fn follow(
        &self,
        name: &str,
        run: i64,
        every: Duration,
        mut progress: impl FnMut(&RunReport),
    ) -> Result<RunReport, ClientError> {
        loop {
            let report = self.report(name, Some(run)).await?;
            progress(&report);
            if report.is_over() {
                return Ok(report);
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// Calls that answer at once.
const SHORT: Duration = Duration::from_secs(30);
/// A run-now snapshots the audience before it answers: a million contacts take seconds.
const SNAPSHOT: Duration = Duration::from_secs(600);

/// A path segment: a campaign name is letters, digits, `_` and `-` (the compiler's
/// rule), anything else is percent-encoded so it cannot change the path.
fn segment(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `http://…` for a `listen` address; a wildcard address is reached on loopback.
pub fn listen_url(listen: &str) -> String {
    let listen = listen.trim();
    let host_port = if let Some(port) = listen.strip_prefix("0.0.0.0:") {
        format!("127.0.0.1:{port}")
    } else if let Some(port) = listen.strip_prefix("[::]:") {
        format!("[::1]:{port}")
    } else {
        listen.to_string()
    };
    format!("http://{host_port}")
}

/// A run and its report, as the API answers them.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub run: Value,
    pub report: Report,
}

impl RunReport {
    fn from_json(value: &Value) -> Result<Self, ClientError> {
        let report = serde_json::from_value(value["report"].clone())
            .map_err(|e| ClientError::Answer(format!("a report: {e}")))?;
        Ok(Self {
            run: value["run"].clone(),
            report,
        })
    }

    pub fn status(&self) -> &str {
        self.run["status"].as_str().unwrap_or("unknown")
    }

    /// Whether the run is over (done, cancelled, missed).
    pub fn is_over(&self) -> bool {
        matches!(self.status(), "done" | "cancelled" | "missed")
    }

    /// Recipients decided for good: the progress bar's position.
    pub fn decided(&self) -> u64 {
        self.report.measures.decided() as u64
    }

    /// One line: where the run is.
    pub fn progress_line(&self) -> String {
        let r = &self.report.measures;
        format!(
            "{}: sent {}, delivered {}, read {}, failed {}, skipped {}, deferred {}",
            self.status(),
            r.sent,
            r.delivered,
            r.read,
            r.failed.total,
            r.skipped.total,
            r.deferred.total
        )
    }
}

/// The list as a table: name, origin, state, next run, latest run.
pub fn list_table(list: &Value) -> String {
    let empty = Vec::new();
    let items = list["campaigns"].as_array().unwrap_or(&empty);
    if items.is_empty() {
        return "no campaigns: put one in the campaigns directory, or `flowgate campaign create -f FILE`\n".into();
    }
    let mut rows = vec![[
        "NAME".to_string(),
        "ORIGIN".into(),
        "STATE".into(),
        "NEXT RUN".into(),
        "LATEST RUN".into(),
    ]];
    for c in items {
        let state = match (c["paused"].as_bool(), c["loaded"].as_bool()) {
            (_, Some(false)) => "broken".to_string(),
            (Some(true), _) => "paused".to_string(),
            _ => "active".to_string(),
        };
        let latest = &c["latest_run"];
        let latest = match latest["id"].as_i64() {
            Some(id) => format!("#{id} {}", latest["status"].as_str().unwrap_or("")),
            None => "-".into(),
        };
        rows.push([
            text(&c["name"]),
            text(&c["origin"]),
            state,
            c["next_run_at"].as_str().unwrap_or("-").to_string(),
            latest,
        ]);
    }
    table(&rows)
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or("").to_string()
}

/// Rows of cells, each column as wide as its widest cell.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// A run's report as a readable table.
pub fn report_table(run: &RunReport) -> String {
    let r = &run.report;
    let mut out = format!(
        "campaign {}, run {} ({}, {}), scheduled for {}\n",
        text(&run.run["campaign"]),
        run.run["id"],
        text(&run.run["trigger"]),
        run.status(),
        text(&run.run["scheduled_for"]),
    );
    let mut rows: Vec<[String; 2]> = Vec::new();
    let mut line = |label: &str, n: i64| rows.push([label.to_string(), n.to_string()]);
    let m = &r.measures;
    line("planned", m.planned);
    line("pending", m.pending);
    line("in the outbox", m.outbox);
    line("sent", m.sent);
    line("delivered", m.delivered);
    line("read", m.read);
    line("replied", m.replied);
    for (label, part) in [
        ("failed", &m.failed),
        ("skipped", &m.skipped),
        ("deferred", &m.deferred),
    ] {
        line(label, part.total);
        for (why, n) in &part.by {
            line(&format!("  {why}"), *n);
        }
    }
    line("cancelled", m.cancelled);
    out.push_str(&indent(&table(&rows)));
    out.push_str(&variants_text(r));
    out.push_str(&cost_text(r));
    out
}

/// A split campaign's run by variant: one row each, the run's measures as columns.
fn variants_text(r: &Report) -> String {
    if r.variants.is_empty() {
        return String::new();
    }
    let mut rows = vec![
        [
            "VARIANT",
            "SHARE",
            "PLANNED",
            "SENT",
            "DELIVERED",
            "READ",
            "REPLIED",
            "FAILED",
            "SKIPPED",
        ]
        .map(String::from),
    ];
    for v in &r.variants {
        let m = &v.measures;
        rows.push([
            v.variant.clone().unwrap_or_else(|| "(none)".into()),
            format!("{:.1} %", v.share * 100.0),
            m.planned.to_string(),
            m.sent.to_string(),
            m.delivered.to_string(),
            m.read.to_string(),
            m.replied.to_string(),
            m.failed.total.to_string(),
            m.skipped.total.to_string(),
        ]);
    }
    format!("by variant\n{}", indent(&table(&rows)))
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// The cost part of a report.
fn cost_text(r: &Report) -> String {
    let cost = &r.cost;
    let mut out = match &cost.currency {
        Some(currency) => format!("cost estimate ({currency})\n"),
        None => {
            "charged messages (set `campaign_prices` in the config for a cost estimate)\n".into()
        }
    };
    for c in &cost.categories {
        let priced = match (c.price, c.amount) {
            (Some(price), Some(amount)) => format!(", {} × {price} = {amount:.4}", c.charged),
            _ => String::new(),
        };
        out.push_str(&format!(
            "  {}: {} charged, {} free{priced}\n",
            c.category, c.charged, c.free
        ));
    }
    if let (Some(total), Some(currency)) = (cost.total, &cost.currency) {
        out.push_str(&format!("  total: {total:.4} {currency}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listen_address_is_reached_on_loopback() {
        assert_eq!(listen_url("0.0.0.0:8080"), "http://127.0.0.1:8080");
        assert_eq!(listen_url("[::]:9000"), "http://[::1]:9000");
        assert_eq!(listen_url("127.0.0.1:8080"), "http://127.0.0.1:8080");
    }

    #[test]
    fn a_split_runs_report_has_a_row_per_variant() {
        use crate::campaign::report::{Measures, VariantReport};
        let variant = |name: &str, share, planned, sent| VariantReport {
            variant: Some(name.into()),
            share,
            measures: Measures {
                planned,
                sent,
                ..Measures::default()
            },
        };
        let run = RunReport {
            run: serde_json::json!({ "campaign": "sale", "id": 1, "status": "done" }),
            report: Report {
                measures: Measures {
                    planned: 10,
                    sent: 10,
                    ..Measures::default()
                },
                variants: vec![variant("long", 0.3, 3, 3), variant("short", 0.7, 7, 7)],
                ..Report::default()
            },
        };
        let text = report_table(&run);
        assert!(text.contains("by variant"), "{text}");
        let long = text
            .lines()
            .find(|l| l.trim_start().starts_with("long"))
            .unwrap();
        let cells: Vec<&str> = long.split_whitespace().collect();
        assert_eq!(cells[..4], ["long", "30.0", "%", "3"], "{text}");
        assert!(text.lines().any(|l| l.trim_start().starts_with("short")));
        let plain = RunReport {
            report: Report::default(),
            ..run
        };
        assert!(!report_table(&plain).contains("by variant"));
    }

    #[test]
    fn a_name_cannot_change_the_path() {
        assert_eq!(segment("spring_sale-2"), "spring_sale-2");
        assert_eq!(segment("a/../b"), "a%2F..%2Fb");
    }
}
