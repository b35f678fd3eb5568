//! The `retention` setting: message history older than it is deleted, so a year of traffic
//! does not weigh on the database.
//!
//! `serve` runs [`run`]: a pass at start and then every [`EVERY`], each deleting in batches
//! of [`BATCH`] with a pause between them, so the pruning never holds the writer long
//! enough to be felt by a turn. The cutoff is the runtime's clock minus the kept period
//! ([`kept_for`]): the configured `retention`, raised to the longest campaign
//! `frequency_cap` period, since a cap counts the messages sent within it. What a pass
//! deletes and what it keeps is the store's rule (`store::retention`): settled messages and
//! idempotency keys go; unsettled messages, contacts, sessions, timers and campaign ledgers
//! stay. Customers' files go with their messages: the `media` rows, then each file no row
//! names any more from the media store ([`prune_media`]); a download not yet over stays.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::campaign_runner::CampaignRunner;
use crate::media::MediaStore;
use crate::store::{Db, StoreError};

/// The shortest `retention` accepted: WhatsApp redelivers a webhook for up to 7 days, and a
/// redelivered message is recognised by its wamid in the history.
pub const MINIMUM: chrono::Duration = chrono::Duration::days(8);
/// How often a pass runs (wall time).
pub const EVERY: Duration = Duration::from_secs(600);
/// Messages deleted per statement.
pub const BATCH: i64 = 2_000;
/// The pause between two batches, leaving the writer to the turns.
const PAUSE: Duration = Duration::from_millis(50);

/// What one pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub messages: u64,
    pub api_requests: u64,
    /// `media` rows.
    pub media: u64,
    /// Files deleted from the media store.
    pub media_files: u64,
}

/// How long history is kept: `retention`, or the longest frequency cap if that is longer.
pub fn kept_for(
    retention: chrono::Duration,
    longest_cap: Option<chrono::Duration>,
) -> chrono::Duration {
    longest_cap.map_or(retention, |cap| cap.max(retention))
}

/// Deletes what was written before `cutoff`, batch by batch, pausing `pause` between
/// batches: the messages, then their files (from `files`, the media store, when the runtime
/// keeps files).
pub async fn prune(
    db: &Db,
    files: Option<&dyn MediaStore>,
    cutoff: DateTime<Utc>,
    pause: Duration,
) -> Result<Pruned, StoreError> {
    let mut pruned = Pruned {
        api_requests: db.prune_api_requests(cutoff).await?,
        ..Pruned::default()
    };
    if let Some(boundary) = db.history_boundary(cutoff).await? {
        loop {
            let n = db.prune_messages(boundary, cutoff, BATCH).await?;
            pruned.messages += n;
            if n < BATCH as u64 {
                break;
            }
            tokio::time::sleep(pause).await;
        }
    }
    (pruned.media, pruned.media_files) = prune_media(db, files, cutoff, pause).await?;
    Ok(pruned)
}

/// Deletes the `media` rows of pruned messages, then each file no row names any more and no
/// pending download may be storing: `(rows, files)`. Without a store (`files` is `None`)
/// the rows stay, so the files can still be found once one is configured.
async fn prune_media(
    db: &Db,
    files: Option<&dyn MediaStore>,
    cutoff: DateTime<Utc>,
    pause: Duration,
) -> Result<(u64, u64), StoreError> {
    let (Some(files), Some(boundary)) = (files, db.media_boundary(cutoff).await?) else {
        return Ok((0, 0));
    };
    let (mut rows, mut deleted) = (0, 0);
    loop {
        let batch = db.prune_media(boundary, cutoff, BATCH).await?;
        rows += batch.rows;
        for key in &batch.store_keys {
            let forms = crate::media::store::sha256_forms(key);
            if db
                .media_file_in_use(key, forms.each_ref().map(String::as_str))
                .await?
            {
                continue;
            }
            // A file that cannot be deleted is left over (its rows are gone, so nothing
            // serves it); the pass goes on.
            match files.delete(key).await {
                Ok(()) => deleted += 1,
                Err(e) => tracing::warn!(key = %key, error = %e, "deleting a pruned file failed"),
            }
        }
        if batch.rows < BATCH as u64 {
            return Ok((rows, deleted));
        }
        tokio::time::sleep(pause).await;
    }
}

/// Prunes every `every` until aborted, keeping `retention` (see [`kept_for`]).
pub async fn run(
    campaigns: std::sync::Arc<CampaignRunner>,
    retention: chrono::Duration,
    every: Duration,
) {
    let runtime = campaigns.runtime().clone();
    loop {
        let kept = kept_for(retention, campaigns.longest_frequency_cap());
        let cutoff = runtime.clock.now() - kept;
        let files = runtime.media.as_ref().map(|m| m.store.as_ref());
        match prune(&runtime.db, files, cutoff, PAUSE).await {
            Ok(pruned) => {
                if pruned != Pruned::default() {
                    tracing::info!(
                        messages = pruned.messages,
                        api_requests = pruned.api_requests,
                        media = pruned.media,
                        media_files = pruned.media_files,
                        kept_days = kept.num_days(),
                        "pruned history older than the retention"
                    );
                }
                for (table, n) in [
                    ("messages", pruned.messages),
                    ("api_requests", pruned.api_requests),
                    ("media", pruned.media),
                ] {
                    crate::metrics::count(
                        "flowgate_pruned_rows_total",
                        "Rows deleted by the retention setting.",
                        &[("table", table)],
                        n,
                    );
                }
                crate::metrics::count(
                    "flowgate_pruned_media_files_total",
                    "Customers' files deleted from the media store by the retention setting.",
                    &[],
                    pruned.media_files,
                );
            }
            Err(e) => tracing::warn!(error = %e, "pruning the history failed"),
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_longer_frequency_cap_raises_the_kept_history() {
        let days = chrono::Duration::days;
        assert_eq!(kept_for(days(90), None), days(90));
        assert_eq!(kept_for(days(90), Some(days(30))), days(90));
        assert_eq!(kept_for(days(30), Some(days(60))), days(60));
    }
}
