//! The admin API's idempotency keys (`api_requests`): a request that creates a message and
//! carries an `Idempotency-Key` is remembered with the message it created, so a retry
//! answers that message instead of sending another.

use chrono::{DateTime, Utc};

use super::db::{Db, with_pool, with_writer};
use super::error::StoreError;

/// A request seen before under its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRequest {
    /// What the key was used for (e.g. `channel/contact`).
    pub subject: String,
    pub message_id: i64,
}

impl Db {
    /// The request remembered under `key` in `scope`, if any.
    pub async fn api_request(
        &self,
        scope: &str,
        key: &str,
    ) -> Result<Option<ApiRequest>, StoreError> {
        const SQL: &str = "SELECT subject, message_id FROM api_requests \
            WHERE scope = $1 AND idempotency_key = $2";
        let row: Option<(String, i64)> = with_pool!(self, |pool| {
            sqlx::query_as(SQL)
                .bind(scope)
                .bind(key)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(|(subject, message_id)| ApiRequest {
            subject,
            message_id,
        }))
    }

    /// Remembers that the request under `key` in `scope` created `message_id`; a key
    /// already remembered keeps its first message.
    pub async fn remember_api_request(
        &self,
        scope: &str,
        key: &str,
        request: &ApiRequest,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO api_requests \
            (scope, idempotency_key, subject, message_id, created_at) \
            VALUES ($1, $2, $3, $4, $5) ON CONFLICT (scope, idempotency_key) DO NOTHING";
        let subject = request.subject.clone();
        let message_id = request.message_id;
        with_writer!(self, own(scope, key, subject), |pool| {
            sqlx::query(SQL)
                .bind(&scope)
                .bind(&key)
                .bind(&subject)
                .bind(message_id)
                .bind(now.timestamp_millis())
                .execute(pool)
                .await?;
        });
        Ok(())
    }
}
