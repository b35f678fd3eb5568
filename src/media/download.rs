//! The media worker: downloads customers' files in the background, never on the webhook's
//! path.
//!
//! A turn that stores a customer's file message writes a `pending` row in `media` and rings
//! [`Runtime::media_bell`]. The worker claims due rows with a lease (as the outbox sender
//! claims messages: a crash or a restart retries the row once the lease runs out, and two
//! instances never both work on it), then for each:
//!
//! 1. `GET /{media-id}` for a fresh download URL (it lasts minutes, so every attempt asks
//!    again), refused at once when its `file_size` is over `media.max_bytes`;
//! 2. downloads the URL with the channel's credentials, refused by its `Content-Length` or
//!    as soon as the bytes pass the limit ([`Client::download`]);
//! 3. checks the bytes against the webhook's SHA-256 ([`super::sha256_matches`]);
//! 4. stores them under their content address ([`super::store::content_key`]);
//! 5. records the outcome, then tells the contact's flow in a turn of its own
//!    ([`Runtime::media_ready`]) and marks the row notified.
//!
//! Retried ([`ATTEMPTS`] in all, backing off [`backoff`]): 131052, any error answer, an
//! expired URL, a timeout, a store that fails. Failed for good at once: `too_large`,
//! `sha256_mismatch`. The last error of a download that runs out of attempts becomes
//! `download_failed: …`.
//!
//! Every attempt is counted by how it ended ([`Outcome`]): `flowgate_media_downloads_total`,
//! `flowgate_media_download_seconds`, and the bytes stored in
//! `flowgate_media_download_bytes_total`.

use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::Duration;
use tokio::sync::watch;

use super::store::content_key;
use super::{Media, sha256_hex, sha256_matches};
use crate::dispatch::Runtime;
use crate::store::{MediaFinish, MediaRow};
use crate::whatsapp::media::MEDIA_DOWNLOAD_ERROR;
use crate::whatsapp::{Client, DownloadError, Endpoint};

/// Attempts of one download before it fails for good.
pub const ATTEMPTS: i64 = 4;
/// How long a claimed row is the worker's: two requests' timeouts and the store, with room.
pub const LEASE: Duration = Duration::minutes(5);
/// How long one request (the media's description, or the file) may take.
pub const REQUEST_TIMEOUT: StdDuration = StdDuration::from_secs(60);
/// Rows claimed at once (downloaded concurrently).
const BATCH: i64 = 8;
/// How often the worker looks for rows that fell due (retries) without a bell.
const POLL: StdDuration = StdDuration::from_secs(1);

/// The wait before attempt `attempt + 1` after `attempt` failed: 1 s, 4 s, 16 s.
pub fn backoff(attempt: i64) -> Duration {
    Duration::seconds(4_i64.saturating_pow(u32::try_from(attempt.clamp(1, 8) - 1).unwrap_or(0)))
}

/// How one attempt ended.
#[derive(Debug)]
enum Attempt {
    Finished(MediaFinish, Outcome),
    /// Worth another try: the problem, as `download_failed` will name it.
    Retry(String, Outcome),
}

/// An attempt's outcome, the `outcome` label of the download metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Verified and in the media store.
    Stored,
    TooLarge,
    Sha256Mismatch,
    /// WhatsApp could not give the file (`131052`: the customer's media is gone or not yet
    /// there); retried.
    Expired,
    /// The media store refused the bytes; retried.
    StoreFailed,
    /// Any other problem: an error answer, no answer, a channel that is gone.
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::TooLarge => "too_large",
            Self::Sha256Mismatch => "sha256_mismatch",
            Self::Expired => "expired",
            Self::StoreFailed => "store_failed",
            Self::Failed => "failed",
        }
    }

    /// A Graph API problem's outcome: `131052` is [`Outcome::Expired`].
    fn of(error: &crate::whatsapp::GraphError) -> Self {
        if error.code == MEDIA_DOWNLOAD_ERROR {
            Self::Expired
        } else {
            Self::Failed
        }
    }
}

/// Counts one attempt in the download metrics.
fn count(outcome: Outcome, stored_bytes: u64, seconds: f64) {
    let label = [("outcome", outcome.as_str())];
    crate::metrics::count(
        "flowgate_media_downloads_total",
        "Download attempts of customers' files, by outcome.",
        &label,
        1,
    );
    crate::metrics::observe(
        "flowgate_media_download_seconds",
        "How long a download attempt of a customer's file took, by outcome.",
        &label,
        seconds,
    );
    if stored_bytes > 0 {
        crate::metrics::count(
            "flowgate_media_download_bytes_total",
            "Bytes of customers' files downloaded and stored.",
            &[],
            stored_bytes,
        );
    }
}

/// The worker's shared parts.
#[derive(Clone)]
struct Worker {
    runtime: Arc<Runtime>,
    media: Arc<Media>,
    http: reqwest::Client,
}

/// Runs the media worker until `shutdown` turns true.
pub async fn run(runtime: Arc<Runtime>, mut shutdown: watch::Receiver<bool>) {
    let Some(media) = runtime.media.clone() else {
        return;
    };
    let worker = Worker {
        http: crate::whatsapp::client::http_client(
            crate::whatsapp::client::CONNECT_TIMEOUT,
            REQUEST_TIMEOUT,
        ),
        runtime,
        media,
    };
    loop {
        if *shutdown.borrow() {
            break;
        }
        let claimed = worker.pump().await;
        if claimed > 0 {
            continue;
        }
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = worker.runtime.media_bell.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

impl Worker {
    /// Claims due rows and handles them concurrently; how many it claimed.
    async fn pump(&self) -> usize {
        let now = self.runtime.clock.now();
        let rows = match self.runtime.db.claim_media(now, now + LEASE, BATCH).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(error = %e, "claiming media downloads failed");
                return 0;
            }
        };
        let claimed = rows.len();
        let mut tasks = tokio::task::JoinSet::new();
        for row in rows {
            let worker = self.clone();
            tasks.spawn(async move { worker.handle(row).await });
        }
        while tasks.join_next().await.is_some() {}
        claimed
    }

    /// One claimed row: its download when it is pending, then the flow told.
    async fn handle(&self, row: MediaRow) {
        let db = &self.runtime.db;
        let row = if row.status == "pending" {
            let started = std::time::Instant::now();
            let attempt = self.attempt(&row).await;
            let outcome = match &attempt {
                Attempt::Finished(_, outcome) | Attempt::Retry(_, outcome) => *outcome,
            };
            let stored = match &attempt {
                Attempt::Finished(MediaFinish::Ok { size, .. }, _) => *size as u64,
                _ => 0,
            };
            count(outcome, stored, started.elapsed().as_secs_f64());
            let finish = match attempt {
                Attempt::Finished(finish, _) => finish,
                Attempt::Retry(problem, _) if row.attempts + 1 < ATTEMPTS => {
                    let at = self.runtime.clock.now() + backoff(row.attempts + 1);
                    tracing::warn!(media = row.id, attempt = row.attempts + 1, %problem, "media download failed; retrying");
                    if let Err(e) = db
                        .media_retry(row.id, &problem, at, self.runtime.clock.now())
                        .await
                    {
                        tracing::error!(media = row.id, error = %e, "recording a media retry failed");
                    }
                    return;
                }
                Attempt::Retry(problem, _) => MediaFinish::Failed {
                    error: format!("download_failed: {problem}"),
                },
            };
            match &finish {
                MediaFinish::Ok { size, .. } => {
                    tracing::info!(media = row.id, contact = %row.wa_id, size, "customer's file downloaded");
                }
                MediaFinish::Failed { error } => {
                    tracing::warn!(media = row.id, contact = %row.wa_id, %error, "customer's file refused");
                }
            }
            let recorded = db
                .media_finished(row.id, &finish, self.runtime.clock.now())
                .await;
            match recorded.and(db.media(row.id).await) {
                Ok(Some(row)) => row,
                Ok(None) => return,
                Err(e) => {
                    tracing::error!(media = row.id, error = %e, "recording a media download failed");
                    return;
                }
            }
        } else {
            row
        };
        // The flow is told after the outcome is stored: a crash in between tells it when
        // the lease runs out, and a flow told twice ignores the second (it moved on).
        match self.runtime.media_ready(&row).await {
            Ok(report) => {
                tracing::debug!(media = row.id, handled = %report.handled, "flow told of the file");
                if let Err(e) = db.media_notified(row.id, self.runtime.clock.now()).await {
                    tracing::error!(media = row.id, error = %e, "marking a file told failed");
                }
            }
            Err(e) => {
                tracing::error!(media = row.id, error = %e, "telling the flow of a file failed; retried after the lease");
            }
        }
    }

    /// One download attempt.
    async fn attempt(&self, row: &MediaRow) -> Attempt {
        let max = self.media.max_bytes;
        let Some(media_id) = &row.provider_id else {
            return failed(
                "download_failed: the message names no media id".into(),
                Outcome::Failed,
            );
        };
        let channel = self.runtime.channels.iter().find(|c| c.name == row.channel);
        let endpoint = match channel.map(Endpoint::for_channel) {
            Some(Ok(endpoint)) => endpoint,
            Some(Err(problem)) => {
                return failed(format!("download_failed: {problem}"), Outcome::Failed);
            }
            None => {
                let problem = format!("channel `{}` is not configured", row.channel);
                return failed(format!("download_failed: {problem}"), Outcome::Failed);
            }
        };
        let client = Client::with_http(self.http.clone(), endpoint);
        let info = match client.media_info(media_id).await {
            Ok(info) => info,
            Err(e) => return Attempt::Retry(e.to_string(), Outcome::of(&e)),
        };
        if info.file_size.is_some_and(|size| size > max) {
            tracing::warn!(
                media = row.id,
                size = info.file_size,
                max,
                "file larger than media.max_bytes"
            );
            return failed("too_large".into(), Outcome::TooLarge);
        }
        let bytes = match client.download(&info.url, max).await {
            Ok(bytes) => bytes,
            Err(DownloadError::TooLarge { size }) => {
                tracing::warn!(
                    media = row.id,
                    size,
                    max,
                    "file larger than media.max_bytes"
                );
                return failed("too_large".into(), Outcome::TooLarge);
            }
            Err(DownloadError::Failed(e)) => return Attempt::Retry(e.to_string(), Outcome::of(&e)),
        };
        let expected = row.sha256.as_deref().or(info.sha256.as_deref());
        if !sha256_matches(&bytes, expected) {
            return failed("sha256_mismatch".into(), Outcome::Sha256Mismatch);
        }
        let key = content_key(&sha256_hex(&bytes));
        let size = bytes.len() as i64;
        if let Err(e) = self.media.store.put(&key, bytes).await {
            return Attempt::Retry(e.to_string(), Outcome::StoreFailed);
        }
        let finish = MediaFinish::Ok {
            size,
            mime: info.mime_type.or_else(|| row.mime.clone()),
            store_key: key,
        };
        Attempt::Finished(finish, Outcome::Stored)
    }
}

/// An attempt that failed for good with `error`.
fn failed(error: String, outcome: Outcome) -> Attempt {
    Attempt::Finished(MediaFinish::Failed { error }, outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows() {
        assert_eq!(backoff(1), Duration::seconds(1));
        assert_eq!(backoff(2), Duration::seconds(4));
        assert_eq!(backoff(3), Duration::seconds(16));
    }
}
