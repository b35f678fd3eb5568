//! The SQLite schema: the migrations of `migrations/sqlite/`, embedded so the binary carries
//! its schema, and the [`Migrator`] that applies them ([`super::Db::migrate`]).

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;

use sqlx::error::BoxDynError;
use sqlx::migrate::{MigrateError, Migration, MigrationSource, MigrationType, Migrator};

/// The SQLite migrations, embedded so the binary carries its schema.
///
/// `sqlx::migrate!` would embed them too, but it lives behind sqlx's `macros` feature, which
/// flowgate leaves off. A test checks this list against `migrations/sqlite/`.
const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "channels",
        include_str!("../../migrations/sqlite/0002_channels.sql"),
    ),
    (
        3,
        "policy",
        include_str!("../../migrations/sqlite/0003_policy.sql"),
    ),
    (
        4,
        "outbox indexes",
        include_str!("../../migrations/sqlite/0004_outbox_indexes.sql"),
    ),
    (
        5,
        "contact aliases",
        include_str!("../../migrations/sqlite/0005_contact_aliases.sql"),
    ),
    (
        6,
        "campaigns",
        include_str!("../../migrations/sqlite/0006_campaigns.sql"),
    ),
    (
        7,
        "campaign dispatch",
        include_str!("../../migrations/sqlite/0007_campaign_dispatch.sql"),
    ),
    (
        8,
        "campaign run requests",
        include_str!("../../migrations/sqlite/0008_campaign_run_requests.sql"),
    ),
    (
        9,
        "api requests",
        include_str!("../../migrations/sqlite/0009_api_requests.sql"),
    ),
];

/// A [`MigrationSource`] over migrations compiled into the binary.
#[derive(Debug)]
struct Embedded(&'static [(i64, &'static str, &'static str)]);

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send + 's>> {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .map(|&(version, description, sql)| {
                    Migration::new(
                        version,
                        Cow::Borrowed(description),
                        MigrationType::Simple,
                        Cow::Borrowed(sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// The migrator of SQLite's embedded migrations.
pub(super) async fn sqlite_migrator() -> Result<Migrator, MigrateError> {
    Migrator::new(Embedded(SQLITE_MIGRATIONS)).await
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The embedded list must match `migrations/sqlite/` exactly: a file added there but not
    /// to [`SQLITE_MIGRATIONS`] would never run.
    #[tokio::test]
    async fn embedded_migrations_match_the_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
        let on_disk = Migrator::new(dir).await.unwrap();
        let embedded = Migrator::new(Embedded(SQLITE_MIGRATIONS)).await.unwrap();
        let key = |m: &Migration| (m.version, m.description.to_string(), m.checksum.to_vec());
        assert_eq!(
            on_disk.iter().map(key).collect::<Vec<_>>(),
            embedded.iter().map(key).collect::<Vec<_>>()
        );
    }
}
