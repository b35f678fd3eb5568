//! Contacts from a CSV file, for `flowgate contacts import` and `POST /api/contacts/import`:
//! the file read ([`csv::parse`], pure) and written by the identity rules
//! ([`Db::import_contacts`]), answered as an [`ImportReport`]: how many contacts were new,
//! updated or unchanged, and each line skipped with its reason.
//!
//! The file as a whole is refused (nothing written) when it cannot be read or its header is
//! wrong; a bad line is skipped and reported, and the others are imported. Contacts go on
//! the channel named, else the first configured one (the sandbox channel when none is
//! configured): an import prepares business-initiated sends, which go out on a real
//! number, not on the sandbox a conversation without a channel falls back to.

pub mod csv;

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::Serialize;

use self::csv::{FileError, SkippedLine, parse};
use crate::config::ChannelConfig;
use crate::diagnostic::Diagnostics;
use crate::store::{Db, ImportOutcome, StoreError};

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    pub channel: String,
    pub created: usize,
    pub updated: usize,
    pub unchanged: usize,
    /// Lines not imported, by line number: a bad value, or identifiers that name two
    /// different contacts.
    pub skipped: Vec<SkippedLine>,
}

impl ImportReport {
    /// One line: `imported 3 new, 1 updated, 0 unchanged on channel main; 2 lines skipped`.
    pub fn summary(&self) -> String {
        let skipped = match self.skipped.len() {
            0 => String::new(),
            1 => "; 1 line skipped".to_string(),
            n => format!("; {n} lines skipped"),
        };
        format!(
            "imported {} new, {} updated, {} unchanged on channel {}{skipped}",
            self.created, self.updated, self.unchanged, self.channel
        )
    }
}

/// Why nothing was imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The config did not load: its diagnostics say why.
    #[error("the config has errors")]
    Config(Box<Diagnostics>),
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    File(#[from] FileError),
    #[error("there is no channel `{name}`; the configured channels are: {known}")]
    UnknownChannel { name: String, known: String },
    #[error(
        "the import stopped: {0}; the lines before the failed chunk are written, import the file again to finish (it is idempotent)"
    )]
    Store(#[from] StoreError),
}

/// The channel an import goes on: `name`, else the first configured channel.
pub fn channel<'a>(
    channels: &'a [ChannelConfig],
    name: Option<&str>,
) -> Result<&'a str, ImportError> {
    let found = match name {
        Some(name) => channels.iter().find(|c| c.name == name),
        None => channels.first(),
    };
    found.map(|c| c.name.as_str()).ok_or_else(|| {
        let known: Vec<&str> = channels.iter().map(|c| c.name.as_str()).collect();
        ImportError::UnknownChannel {
            name: name.unwrap_or_default().to_string(),
            known: known.join(", "),
        }
    })
}

/// Imports a CSV file's `bytes` onto `channel`. Reading the file is CPU work (100,000 lines
/// take a while), so it runs off the async runtime.
pub async fn import(
    db: &Db,
    channel: &str,
    bytes: impl AsRef<[u8]> + Send + 'static,
    now: DateTime<Utc>,
) -> Result<ImportReport, ImportError> {
    let parsed = tokio::task::spawn_blocking(move || parse(bytes.as_ref()))
        .await
        .expect("reading a CSV file does not panic")?;
    let outcomes = db.import_contacts(channel, &parsed.rows, now).await?;
    let mut report = ImportReport {
        channel: channel.to_string(),
        created: 0,
        updated: 0,
        unchanged: 0,
        skipped: parsed.skipped,
    };
    for (row, outcome) in parsed.rows.iter().zip(outcomes) {
        match outcome {
            ImportOutcome::Created => report.created += 1,
            ImportOutcome::Updated => report.updated += 1,
            ImportOutcome::Unchanged => report.unchanged += 1,
            ImportOutcome::Conflict(why) => report.skipped.push(SkippedLine {
                line: row.line,
                reason: why,
            }),
        }
    }
    report.skipped.sort_by_key(|s| s.line);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_skipped_by_the_file_and_by_the_store_are_reported_in_order() {
        let db = Db::connect("sqlite::memory:").await.unwrap();
        db.migrate().await.unwrap();
        let now = crate::clock::VirtualClock::test_epoch();
        let seeded = import(&db, "main", "wa_id,bsuid\n15555550123,\n,US.1\n", now).await;
        assert_eq!(seeded.unwrap().created, 2);
        let csv = "wa_id,bsuid,timezone\n\
                   15555550123,US.1,\n\
                   15555550124,,Mars/Olympus\n\
                   15555550123,,UTC\n\
                   15555550125,,\n";
        let report = import(&db, "main", csv, now).await.unwrap();
        assert_eq!(
            (report.created, report.updated, report.unchanged),
            (1, 1, 0)
        );
        let lines: Vec<u64> = report.skipped.iter().map(|s| s.line).collect();
        assert_eq!(lines, [2, 3], "{:?}", report.skipped);
        assert!(report.skipped[0].reason.contains("two contacts"));
        assert!(report.skipped[1].reason.contains("unknown time zone"));
        assert_eq!(
            report.summary(),
            "imported 1 new, 1 updated, 0 unchanged on channel main; 2 lines skipped"
        );
    }

    #[test]
    fn the_channel_is_the_named_one_else_the_first() {
        let channels = [
            ChannelConfig::sandbox("first"),
            ChannelConfig::sandbox("second"),
        ];
        assert_eq!(channel(&channels, None).unwrap(), "first");
        assert_eq!(channel(&channels, Some("second")).unwrap(), "second");
        let err = channel(&channels, Some("thrid")).unwrap_err().to_string();
        assert_eq!(
            err,
            "there is no channel `thrid`; the configured channels are: first, second"
        );
    }
}
