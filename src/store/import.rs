//! Contacts written in bulk (`contacts`, `contact_aliases`): the rows of an imported CSV
//! file ([`crate::contacts_import`]) upserted by the identity rules of `store::contacts`.
//!
//! Rows are written in chunks of [`IMPORT_CHUNK`], one raw writer job (one transaction) per
//! chunk: a row per transaction would cost a commit each, and one transaction for the whole
//! file would hold the writer (and every customer's reply behind it) for seconds. A chunk
//! that fails writes nothing; chunks before it stay written, and importing the file again
//! (idempotent) finishes the job.
//!
//! Each row's identifiers are resolved as a webhook's are ([`identify`]): a phone or BSUID
//! that names a contact updates it, a row with both pairs them (or reports that they name
//! two contacts), and a row naming no contact creates one. Its profile is then merged in
//! ([`ImportRow::apply`]) and written only when something changed, so importing the same
//! file twice reports every row unchanged the second time.

use chrono::{DateTime, Utc};

use super::Identifiers;
use super::contacts::{Identified, identify};
use super::db::{Backend, Db};
use super::error::StoreError;
use super::identities::{IdentityConn, SqliteIds, lock_channel, ready};
use crate::contacts_import::csv::{ImportRow, Profile};

/// Rows per transaction.
pub const IMPORT_CHUNK: usize = 1_000;

/// What importing one row did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportOutcome {
    Created,
    Updated,
    /// The contact already had everything the row gives.
    Unchanged,
    /// The row's identifiers name two different contacts (or would take another's): not
    /// written, and why.
    Conflict(String),
}

impl Db {
    /// Imports `rows` onto `channel`, in order, in chunks of [`IMPORT_CHUNK`]; one outcome
    /// per row.
    pub async fn import_contacts(
        &self,
        channel: &str,
        rows: &[ImportRow],
        now: DateTime<Utc>,
    ) -> Result<Vec<ImportOutcome>, StoreError> {
        let mut outcomes = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(IMPORT_CHUNK) {
            outcomes.extend(self.import_chunk(channel, chunk.to_vec(), now).await?);
        }
        Ok(outcomes)
    }

    /// One chunk, as one raw writer job. Identities may change, so what this process
    /// remembers of them is forgotten before and after (as a link job does).
    async fn import_chunk(
        &self,
        channel: &str,
        rows: Vec<ImportRow>,
        now: DateTime<Utc>,
    ) -> Result<Vec<ImportOutcome>, StoreError> {
        match &self.backend {
            Backend::Sqlite(sqlite) => {
                let channel = channel.to_string();
                sqlite.identities.forget_all();
                let outcomes = sqlite
                    .writer
                    .run_raw(move |db| ready(import_rows(&mut SqliteIds(db), &channel, &rows, now)))
                    .await;
                sqlite.identities.forget_all();
                outcomes
            }
            Backend::Postgres(postgres) => {
                let mut tx = postgres.pool.begin().await?;
                lock_channel(&mut tx, channel).await?;
                let outcomes = import_rows(&mut *tx, channel, &rows, now).await?;
                tx.commit().await?;
                Ok(outcomes)
            }
        }
    }
}

/// A chunk's rows, in order, inside the caller's transaction.
async fn import_rows(
    db: &mut impl IdentityConn,
    channel: &str,
    rows: &[ImportRow],
    now: DateTime<Utc>,
) -> Result<Vec<ImportOutcome>, StoreError> {
    let mut outcomes = Vec::with_capacity(rows.len());
    for row in rows {
        outcomes.push(import_row(db, channel, row, now).await?);
    }
    Ok(outcomes)
}

/// Resolves one row to its contact and merges its profile in.
async fn import_row(
    db: &mut impl IdentityConn,
    channel: &str,
    row: &ImportRow,
    now: DateTime<Utc>,
) -> Result<ImportOutcome, StoreError> {
    let ids = Identifiers::new(row.phone.as_deref(), row.bsuid.as_deref());
    let (key, outcome) = match identify(db, channel, ids, now).await? {
        None => {
            return Ok(ImportOutcome::Conflict(
                "neither a wa_id nor a bsuid".into(),
            ));
        }
        Some(Identified::Conflict(why)) => return Ok(ImportOutcome::Conflict(why)),
        Some(Identified::Created { key }) => (key, ImportOutcome::Created),
        Some(Identified::Existing { key, relinked }) => (
            key,
            if relinked {
                ImportOutcome::Updated
            } else {
                ImportOutcome::Unchanged
            },
        ),
    };
    let (id, mut profile) = read_profile(db, channel, &key).await?;
    if !row.apply(&mut profile) {
        return Ok(outcome);
    }
    let (tags, attrs) = (
        serde_json::to_string(&profile.tags)?,
        serde_json::to_string(&profile.attrs)?,
    );
    let columns = (
        profile.name.as_deref(),
        tags.as_str(),
        attrs.as_str(),
        profile.timezone.as_deref(),
    );
    db.update_profile(id, columns, now.timestamp_millis())
        .await?;
    Ok(match outcome {
        ImportOutcome::Created => ImportOutcome::Created,
        _ => ImportOutcome::Updated,
    })
}

/// The id and profile of the contact keyed `key`.
async fn read_profile(
    db: &mut impl IdentityConn,
    channel: &str,
    key: &str,
) -> Result<(i64, Profile), StoreError> {
    let row = db.profile(channel, key).await?;
    let Some((id, name, tags, attrs, timezone)) = row else {
        return Err(StoreError::Corrupt(format!(
            "contact `{key}` on channel `{channel}` was resolved but is not in `contacts`"
        )));
    };
    let profile = Profile {
        name,
        tags: serde_json::from_str(&tags)?,
        attrs: serde_json::from_str(&attrs)?,
        timezone,
    };
    Ok((id, profile))
}
