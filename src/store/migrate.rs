//! The schema of each backend: the migrations of `migrations/sqlite/` and
//! `migrations/postgres/` (the same numbers and names), embedded so the binary carries its
//! schema, and the [`Migrator`]s that apply them ([`super::Db::migrate`]).

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
    (
        11,
        "split assignments",
        include_str!("../../migrations/sqlite/0011_split_assignments.sql"),
    ),
    (
        12,
        "media",
        include_str!("../../migrations/sqlite/0012_media.sql"),
    ),
    (
        13,
        "media uploads",
        include_str!("../../migrations/sqlite/0013_media_uploads.sql"),
    ),
    (
        14,
        "contact leases",
        include_str!("../../migrations/sqlite/0014_contact_leases.sql"),
    ),
    (
        15,
        "campaign variants",
        include_str!("../../migrations/sqlite/0015_campaign_variants.sql"),
    ),
    (
        16,
        "media retention",
        include_str!("../../migrations/sqlite/0016_media_retention.sql"),
    ),
];

/// The PostgreSQL migrations: the same numbers and names as SQLite's, each written for
/// PostgreSQL. A test checks this list against `migrations/postgres/`, and another that
/// both backends have the same migrations: every SQLite migration needs its PostgreSQL
/// twin here.
const POSTGRES_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "channels",
        include_str!("../../migrations/postgres/0002_channels.sql"),
    ),
    (
        3,
        "policy",
        include_str!("../../migrations/postgres/0003_policy.sql"),
    ),
    (
        4,
        "outbox indexes",
        include_str!("../../migrations/postgres/0004_outbox_indexes.sql"),
    ),
    (
        5,
        "contact aliases",
        include_str!("../../migrations/postgres/0005_contact_aliases.sql"),
    ),
    (
        6,
        "campaigns",
        include_str!("../../migrations/postgres/0006_campaigns.sql"),
    ),
    (
        7,
        "campaign dispatch",
        include_str!("../../migrations/postgres/0007_campaign_dispatch.sql"),
    ),
    (
        8,
        "campaign run requests",
        include_str!("../../migrations/postgres/0008_campaign_run_requests.sql"),
    ),
    (
        9,
        "api requests",
        include_str!("../../migrations/postgres/0009_api_requests.sql"),
    ),
    (
        11,
        "split assignments",
        include_str!("../../migrations/postgres/0011_split_assignments.sql"),
    ),
    (
        12,
        "media",
        include_str!("../../migrations/postgres/0012_media.sql"),
    ),
    (
        13,
        "media uploads",
        include_str!("../../migrations/postgres/0013_media_uploads.sql"),
    ),
    (
        14,
        "contact leases",
        include_str!("../../migrations/postgres/0014_contact_leases.sql"),
    ),
    (
        15,
        "campaign variants",
        include_str!("../../migrations/postgres/0015_campaign_variants.sql"),
    ),
    (
        16,
        "media retention",
        include_str!("../../migrations/postgres/0016_media_retention.sql"),
    ),
];

/// The PostgreSQL migrations' versions, in order (for tests that check what was applied).
#[cfg(test)]
pub(super) fn postgres_versions() -> Vec<i64> {
    POSTGRES_MIGRATIONS.iter().map(|m| m.0).collect()
}

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

/// The migrator of PostgreSQL's embedded migrations. On PostgreSQL sqlx's migrator holds an
/// advisory lock (`pg_advisory_lock`) while it applies them, so two instances migrating at
/// once apply each migration once: the second waits, then finds nothing left to do.
pub(super) async fn postgres_migrator() -> Result<Migrator, MigrateError> {
    Migrator::new(Embedded(POSTGRES_MIGRATIONS)).await
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    async fn on_disk_and_embedded(
        dir: &str,
        list: &'static [(i64, &'static str, &'static str)],
    ) -> (Migrator, Migrator) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(dir);
        let on_disk = Migrator::new(dir).await.unwrap();
        let embedded = Migrator::new(Embedded(list)).await.unwrap();
        (on_disk, embedded)
    }

    /// The embedded lists must match `migrations/sqlite/` and `migrations/postgres/`
    /// exactly: a file added there but not to the list would never run.
    #[tokio::test]
    async fn embedded_migrations_match_the_directory() {
        let key = |m: &Migration| (m.version, m.description.to_string(), m.checksum.to_vec());
        for (dir, list) in [
            ("sqlite", SQLITE_MIGRATIONS),
            ("postgres", POSTGRES_MIGRATIONS),
        ] {
            let (on_disk, embedded) = on_disk_and_embedded(dir, list).await;
            assert_eq!(
                on_disk.iter().map(key).collect::<Vec<_>>(),
                embedded.iter().map(key).collect::<Vec<_>>(),
                "{dir}"
            );
        }
    }

    /// Both backends have the same migrations, by number and name.
    #[tokio::test]
    async fn backends_have_the_same_migrations() {
        let key = |m: &Migration| (m.version, m.description.to_string());
        let (sqlite, _) = on_disk_and_embedded("sqlite", SQLITE_MIGRATIONS).await;
        let (postgres, _) = on_disk_and_embedded("postgres", POSTGRES_MIGRATIONS).await;
        assert_eq!(
            sqlite.iter().map(key).collect::<Vec<_>>(),
            postgres.iter().map(key).collect::<Vec<_>>()
        );
    }
}
