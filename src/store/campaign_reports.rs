//! What a run's report and `/metrics` read about campaigns beyond the ledger's counts
//! ([`Db::run_counts`]): who replied, which sends are charged, and the counts of runs and
//! of active runs' recipients.
//!
//! "Replied" is a recipient with an inbound message after (by id: the log's order) the
//! campaign's message to them. Whether a send was inside the customer's window is read back
//! from the log the same way the policy reads it: an inbound message at most `window`
//! before the outbound message was written.

use chrono::Duration;

use super::db::{Db, with_pool};
use super::error::StoreError;

/// How many of a run's accepted sends share a kind and a window state: what a cost
/// estimate multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChargeCount {
    /// A template (else a free-form message).
    pub template: bool,
    /// The customer's window was open when the message was written.
    pub window_open: bool,
    pub count: i64,
}

/// Recipients of the runs not over yet, by campaign, decision and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveRecipients {
    pub campaign: String,
    pub decision: String,
    pub reason: Option<String>,
    pub count: i64,
}

/// A campaign message WhatsApp accepted (statuses past `sent`), to charge or count.
const ACCEPTED: &str = "m.status IN ('sent', 'delivered', 'read')";

impl Db {
    /// How many recipients of run `run_id` wrote after its message to them, by the split
    /// campaign's variant (`None` without a split; only variants someone replied to).
    pub async fn run_replied(&self, run_id: i64) -> Result<Vec<(Option<String>, i64)>, StoreError> {
        const SQL: &str = "SELECT r.variant, COUNT(*) FROM campaign_recipients r \
            JOIN messages m ON m.id = r.message_id \
            WHERE r.run_id = $1 AND EXISTS (SELECT 1 FROM messages i \
                WHERE i.contact_id = r.contact_id AND i.direction = 'in' AND i.id > m.id) \
            GROUP BY r.variant ORDER BY r.variant";
        Ok(with_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(run_id)
            .fetch_all(pool)
            .await?))
    }

    /// Run `run_id`'s accepted sends by kind (template or not) and by whether the
    /// customer's window (`window` long) was open when each was written.
    pub async fn run_charges(
        &self,
        run_id: i64,
        window: Duration,
    ) -> Result<Vec<ChargeCount>, StoreError> {
        let sql = format!(
            "SELECT m.kind = 'template', EXISTS (SELECT 1 FROM messages i \
                WHERE i.contact_id = m.contact_id AND i.direction = 'in' AND i.id < m.id \
                AND i.created_at > m.created_at - $2), COUNT(*) \
            FROM campaign_recipients r JOIN messages m ON m.id = r.message_id \
            WHERE r.run_id = $1 AND {ACCEPTED} GROUP BY 1, 2 ORDER BY 1, 2"
        );
        let raw: Vec<(bool, bool, i64)> = with_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(run_id)
            .bind(window.num_milliseconds())
            .fetch_all(pool)
            .await?);
        Ok(raw
            .into_iter()
            .map(|(template, window_open, count)| ChargeCount {
                template,
                window_open,
                count,
            })
            .collect())
    }

    /// Every run counted by status.
    pub async fn runs_by_status(&self) -> Result<Vec<(String, i64)>, StoreError> {
        const SQL: &str =
            "SELECT status, COUNT(*) FROM campaign_runs GROUP BY status ORDER BY status";
        Ok(with_pool!(self, |pool| sqlx::query_as(SQL)
            .fetch_all(pool)
            .await?))
    }

    /// The recipients of every run not over yet (planned, running, paused) by campaign,
    /// decision and reason.
    pub async fn active_recipients(&self) -> Result<Vec<ActiveRecipients>, StoreError> {
        const SQL: &str = "SELECT c.campaign, r.decision, r.reason, COUNT(*) \
            FROM campaign_runs c JOIN campaign_recipients r ON r.run_id = c.id \
            WHERE c.status IN ('planned', 'running', 'paused') \
            GROUP BY c.campaign, r.decision, r.reason ORDER BY 1, 2, 3";
        let raw: Vec<(String, String, Option<String>, i64)> =
            with_pool!(self, |pool| sqlx::query_as(SQL).fetch_all(pool).await?);
        Ok(raw
            .into_iter()
            .map(|(campaign, decision, reason, count)| ActiveRecipients {
                campaign,
                decision,
                reason,
                count,
            })
            .collect())
    }
}
