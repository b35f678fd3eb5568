//! `flowgate contacts import FILE.csv [--channel NAME]`: the config and the file read, the
//! database opened, and the contacts imported ([`crate::contacts_import::import`]); returns
//! the report for `main.rs` to print.

use std::path::Path;

use chrono::{DateTime, Utc};

use crate::config::Config;
use crate::contacts_import::{ImportError, ImportReport, channel, import};
use crate::store::Db;

/// `flowgate contacts import`: reads `path` and imports it into the database of the config
/// at `config_path` (migrated first, as `serve` does). Reads only the config, not the flows:
/// contacts do not depend on them.
pub async fn import_file(
    config_path: Option<&Path>,
    path: &Path,
    channel_name: Option<&str>,
    now: DateTime<Utc>,
) -> Result<ImportReport, ImportError> {
    let config = Config::load(config_path).map_err(ImportError::Config)?;
    let channel = channel(&config.channels, channel_name)?;
    let bytes = std::fs::read(path).map_err(|source| ImportError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let db = Db::connect(&config.database).await?;
    db.migrate().await?;
    let report = import(&db, channel, bytes, now).await;
    db.close().await;
    report
}
