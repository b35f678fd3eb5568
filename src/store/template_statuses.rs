//! Template statuses WhatsApp reported by webhook (`template_statuses`), which override the
//! registry file's until the next `templates sync`.

use chrono::{DateTime, Utc};

use super::db::Db;
use super::db::{with_pool, with_writer};
use super::error::StoreError;
use super::sql::from_millis;

/// A template status from a webhook, overriding the registry file's.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateStatusRow {
    pub name: String,
    pub language: String,
    pub status: String,
    pub event: String,
    pub reason: Option<String>,
    pub updated_at: DateTime<Utc>,
}

impl Db {
    /// Records a template status WhatsApp reported.
    pub async fn save_template_status(&self, row: &TemplateStatusRow) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO template_statuses (name, language, status, event, reason, \
                updated_at) VALUES ($1, $2, $3, $4, $5, $6) \
            ON CONFLICT (name, language) DO UPDATE SET status = excluded.status, \
                event = excluded.event, reason = excluded.reason, updated_at = excluded.updated_at";
        with_writer!(self, own(row), |pool| {
            sqlx::query(SQL)
                .bind(&row.name)
                .bind(&row.language)
                .bind(&row.status)
                .bind(&row.event)
                .bind(row.reason.as_deref())
                .bind(row.updated_at.timestamp_millis())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Every template status WhatsApp reported, oldest first.
    pub async fn template_statuses(&self) -> Result<Vec<TemplateStatusRow>, StoreError> {
        const SQL: &str = "SELECT name, language, status, event, reason, updated_at \
            FROM template_statuses ORDER BY updated_at, name, language";
        let rows: Vec<(String, String, String, String, Option<String>, i64)> =
            with_pool!(self, |pool| sqlx::query_as(SQL).fetch_all(pool).await?);
        rows.into_iter()
            .map(|(name, language, status, event, reason, at)| {
                Ok(TemplateStatusRow {
                    name,
                    language,
                    status,
                    event,
                    reason,
                    updated_at: from_millis(at, "template_statuses.updated_at")?,
                })
            })
            .collect()
    }

    /// Forgets every reported template status (after `templates sync` wrote fresh ones).
    pub async fn clear_template_statuses(&self) -> Result<(), StoreError> {
        with_writer!(self, |pool| {
            sqlx::query("DELETE FROM template_statuses")
                .execute(pool)
                .await?;
        });
        Ok(())
    }
}
