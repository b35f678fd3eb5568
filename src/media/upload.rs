//! Project files sent by media id: the outbox sender asks [`Uploads::media_id`] for the id of
//! a file a message names, and gets the one already uploaded on its channel or uploads the
//! file now.
//!
//! Why ids: WhatsApp fetches a link again for every message (it caches one for only ten
//! minutes), so a campaign sending one file to thousands would send thousands of fetches;
//! an uploaded file is sent by its id, which WhatsApp keeps for 30 days.
//!
//! - **Once per channel and content.** A file is known by its SHA-256: a file changed on
//!   disk is a new upload, and two paths with one content share one. The store's
//!   `media_uploads` row is the one upload of a content on a channel: the sender whose
//!   claim writes it uploads, others (other instances too) wait for its id
//!   ([`Db::claim_media_upload`]). In this process, a per-file lock makes two sends of the
//!   same file at once upload it once.
//! - **Expiry.** An id is used until [`UploadOptions::renew_before`] before its expiry
//!   ([`UploadOptions::expiry`] after the upload, WhatsApp's 30 days by default), then the
//!   file is uploaded again.
//! - **Refused ids.** A send WhatsApp answers with `131053` (the media id is expired or
//!   unknown) drops the id ([`Uploads::refused`]); the sender uploads again once.
//!
//! The file is judged by the same table `check` uses
//! ([`crate::whatsapp::media_files::check_file`]) before it is uploaded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::clock::SharedClock;
use crate::store::{Db, MediaUpload, MediaUploadState, StoreError};
use crate::whatsapp::media_files::{SNIFF_BYTES, check_file};
use crate::whatsapp::{Client, GraphError};

/// The longest a send waits for another sender's upload of its file.
pub const MAX_WAIT: Duration = Duration::from_secs(10);

/// How project files are uploaded; the defaults suit production.
#[derive(Debug, Clone)]
pub struct UploadOptions {
    /// The project's directory: a message's `file` is relative to it.
    pub root: PathBuf,
    /// How long WhatsApp keeps an upload (30 days).
    pub expiry: Duration,
    /// Upload again this long before the expiry, so no send meets an id about to lapse.
    pub renew_before: Duration,
    /// How long a claim to upload a file lasts; another instance takes it over after.
    pub lease: Duration,
    /// How often a sender waiting for another instance's upload looks for its id.
    pub poll: Duration,
    /// How long one upload may take (`media.upload_timeout`).
    pub timeout: Duration,
}

impl Default for UploadOptions {
    fn default() -> Self {
        Self {
            root: PathBuf::new(),
            expiry: Duration::from_secs(30 * 24 * 3600),
            renew_before: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(120),
            poll: Duration::from_millis(100),
            timeout: Duration::from_secs(30),
        }
    }
}

/// A project file's id on the channel, and the content it was found by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub sha256: String,
    pub media_id: String,
}

/// Why a file could not be sent by id.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The file is gone or unreadable: the message fails with this.
    #[error("the project file `{path}` cannot be read: {reason}; restore it or change the flow")]
    Unreadable { path: String, reason: String },
    /// The file does not fit WhatsApp's limits (changed since `check`).
    #[error("the project file `{path}` cannot be sent: {message} ({help})")]
    Misfit {
        path: String,
        message: String,
        help: String,
    },
    /// WhatsApp refused the upload, or did not answer.
    #[error("uploading `{path}` failed: {error}")]
    Upload { path: String, error: GraphError },
    /// Another sender holds the claim and its id did not come in time.
    #[error("`{path}` is being uploaded by another sender; trying again shortly")]
    Busy { path: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The uploads of one channel's sender.
#[derive(Debug)]
pub struct Uploads {
    channel: String,
    /// Who claims uploads (the sender's lease owner).
    owner: String,
    db: Db,
    clock: SharedClock,
    options: UploadOptions,
    /// One lock per content: two sends of one file in this process upload it once.
    flights: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The content hash of each file read, with the modification time and size it had.
    hashes: Mutex<HashMap<PathBuf, (SystemTime, u64, String)>>,
    /// Ids known to this process, by content (saves a read per send).
    ids: Mutex<HashMap<String, MediaUpload>>,
}

impl Uploads {
    pub fn new(
        channel: &str,
        owner: &str,
        db: Db,
        clock: SharedClock,
        options: UploadOptions,
    ) -> Self {
        Self {
            channel: channel.into(),
            owner: owner.into(),
            db,
            clock,
            options,
            flights: Mutex::new(HashMap::new()),
            hashes: Mutex::new(HashMap::new()),
            ids: Mutex::new(HashMap::new()),
        }
    }

    /// The media id to send the project file `path` (a `kind`: image, document, …) by:
    /// one already uploaded on this channel and fresh, else uploaded now.
    pub async fn media_id(
        &self,
        client: &Client,
        kind: &str,
        path: &str,
    ) -> Result<Uploaded, UploadError> {
        let full = self.options.root.join(path);
        let sha256 = self.content_hash(&full, path).await?;
        if let Some(id) = self.fresh_in_memory(&sha256) {
            return Ok(Uploaded {
                sha256,
                media_id: id,
            });
        }
        let flight = self
            .flights
            .lock()
            .expect("flights lock")
            .entry(sha256.clone())
            .or_default()
            .clone();
        let _one_at_a_time = flight.lock().await;
        if let Some(id) = self.fresh_in_memory(&sha256) {
            return Ok(Uploaded {
                sha256,
                media_id: id,
            });
        }
        // Waiting holds the message's own lease: at most [`MAX_WAIT`], then the message is
        // tried again shortly ([`UploadError::Busy`]).
        let polls = (self.options.lease.min(MAX_WAIT).as_millis()
            / self.options.poll.as_millis().max(1))
            + 1;
        for _ in 0..polls {
            let now = self.clock.now();
            if let MediaUploadState::Uploaded(u) =
                self.db.media_upload(&self.channel, &sha256).await?
                && self.fresh(&u, now)
            {
                return Ok(self.remember(sha256, u));
            }
            let claimed = self
                .db
                .claim_media_upload(
                    &self.channel,
                    &sha256,
                    &self.owner,
                    now,
                    now + chrono(self.options.renew_before),
                    now + chrono(self.options.lease),
                )
                .await?;
            if claimed {
                return self.upload(client, kind, path, &full, sha256).await;
            }
            // Another sender uploads it (or just did): wait for its id.
            tokio::time::sleep(self.options.poll).await;
        }
        Err(UploadError::Busy { path: path.into() })
    }

    /// WhatsApp refused `uploaded`'s id (`131053`): forgets it here and in the store, so the
    /// next [`Uploads::media_id`] uploads the file again.
    pub async fn refused(&self, uploaded: &Uploaded) -> Result<(), StoreError> {
        {
            let mut ids = self.ids.lock().expect("ids lock");
            if ids
                .get(&uploaded.sha256)
                .is_some_and(|u| u.media_id == uploaded.media_id)
            {
                ids.remove(&uploaded.sha256);
            }
        }
        self.db
            .drop_media_id(&self.channel, &uploaded.sha256, &uploaded.media_id)
            .await
    }

    /// Uploads the claimed file, records its id (or gives the claim back on failure).
    async fn upload(
        &self,
        client: &Client,
        kind: &str,
        path: &str,
        full: &Path,
        sha256: String,
    ) -> Result<Uploaded, UploadError> {
        let result = self
            .read_and_upload(client, kind, path, full, &sha256)
            .await;
        let media_id = match result {
            Ok(id) => id,
            Err(e) => {
                self.db
                    .release_media_upload(&self.channel, &sha256, &self.owner)
                    .await?;
                return Err(e);
            }
        };
        let now = self.clock.now();
        let upload = MediaUpload {
            media_id,
            expires_at: now + chrono(self.options.expiry),
        };
        if !self
            .db
            .record_media_upload(&self.channel, &sha256, &self.owner, &upload, now)
            .await?
        {
            tracing::warn!(channel = %self.channel, file = %path, "an upload outlived its claim; another sender may upload the file too");
        }
        tracing::info!(channel = %self.channel, file = %path, media_id = %upload.media_id, "project file uploaded");
        Ok(self.remember(sha256, upload))
    }

    async fn read_and_upload(
        &self,
        client: &Client,
        kind: &str,
        path: &str,
        full: &Path,
        sha256: &str,
    ) -> Result<String, UploadError> {
        let bytes = tokio::fs::read(full)
            .await
            .map_err(|e| unreadable(path, &e))?;
        if hex::encode(Sha256::digest(&bytes)) != sha256 {
            // Changed between hashing and reading: the next send hashes it again.
            self.hashes.lock().expect("hashes lock").remove(full);
            return Err(UploadError::Unreadable {
                path: path.into(),
                reason: "it changed while it was read".into(),
            });
        }
        let name = full
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.to_string());
        let head = &bytes[..bytes.len().min(SNIFF_BYTES)];
        let fits =
            check_file(kind, &name, head, bytes.len() as u64).map_err(|m| UploadError::Misfit {
                path: path.into(),
                message: m.message,
                help: m.help,
            })?;
        let size = bytes.len() as u64;
        let started = std::time::Instant::now();
        let result = client
            .upload_media(bytes, fits.mime, &name, self.options.timeout)
            .await;
        count_upload(&result, size, started.elapsed().as_secs_f64());
        result.map_err(|error| UploadError::Upload {
            path: path.into(),
            error,
        })
    }

    /// The file's SHA-256, read again only when its modification time or size changed.
    async fn content_hash(&self, full: &Path, path: &str) -> Result<String, UploadError> {
        let meta = tokio::fs::metadata(full)
            .await
            .map_err(|e| unreadable(path, &e))?;
        let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if let Some((m, size, sha)) = self.hashes.lock().expect("hashes lock").get(full)
            && *m == modified
            && *size == meta.len()
        {
            return Ok(sha.clone());
        }
        let bytes = tokio::fs::read(full)
            .await
            .map_err(|e| unreadable(path, &e))?;
        let sha = hex::encode(Sha256::digest(&bytes));
        self.hashes.lock().expect("hashes lock").insert(
            full.to_path_buf(),
            (modified, bytes.len() as u64, sha.clone()),
        );
        Ok(sha)
    }

    fn fresh(&self, upload: &MediaUpload, now: DateTime<Utc>) -> bool {
        upload.expires_at > now + chrono(self.options.renew_before)
    }

    fn fresh_in_memory(&self, sha256: &str) -> Option<String> {
        let now = self.clock.now();
        let ids = self.ids.lock().expect("ids lock");
        ids.get(sha256)
            .filter(|u| self.fresh(u, now))
            .map(|u| u.media_id.clone())
    }

    fn remember(&self, sha256: String, upload: MediaUpload) -> Uploaded {
        let media_id = upload.media_id.clone();
        self.ids
            .lock()
            .expect("ids lock")
            .insert(sha256.clone(), upload);
        Uploaded { sha256, media_id }
    }
}

/// Counts one upload in the metrics: `flowgate_media_uploads_total{outcome}` (`uploaded`,
/// `refused` by WhatsApp, `failed`: no answer, a timeout), its seconds, and the bytes
/// uploaded.
fn count_upload(result: &Result<String, GraphError>, size: u64, seconds: f64) {
    let outcome = match result {
        Ok(_) => "uploaded",
        Err(e) if e.origin == crate::whatsapp::errors::ErrorOrigin::Transport => "failed",
        Err(_) => "refused",
    };
    let label = [("outcome", outcome)];
    crate::metrics::count(
        "flowgate_media_uploads_total",
        "Uploads of project files to WhatsApp, by outcome.",
        &label,
        1,
    );
    crate::metrics::observe(
        "flowgate_media_upload_seconds",
        "How long an upload of a project file took, by outcome.",
        &label,
        seconds,
    );
    if result.is_ok() {
        crate::metrics::count(
            "flowgate_media_upload_bytes_total",
            "Bytes of project files uploaded to WhatsApp.",
            &[],
            size,
        );
    }
}

fn unreadable(path: &str, e: &std::io::Error) -> UploadError {
    UploadError::Unreadable {
        path: path.into(),
        reason: e.to_string(),
    }
}

fn chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}
