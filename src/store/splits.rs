//! A/B splits: how many contacts each branch reached, and how many of them replied,
//! finished the flow or were handed to a person. The rows are written by `turn`, in the
//! turn that reaches each stage; this module reads them.

use serde::Serialize;

use super::db::{Db, with_pool};
use super::error::StoreError;

/// One branch of one split, with its contacts at each stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SplitCount {
    pub flow: String,
    pub step: String,
    pub branch: String,
    /// Contacts sent down the branch.
    pub reached: i64,
    /// Of them, those who wrote after it (in the same session).
    pub replied: i64,
    /// Those whose session reached the end of a flow after it.
    pub finished: i64,
    /// Those handed to a person after it.
    pub handed_off: i64,
}

impl Db {
    /// Every split's branches with their counts, by flow, step and branch (a flow or step
    /// narrows it).
    pub async fn split_counts(
        &self,
        flow: Option<&str>,
        step: Option<&str>,
    ) -> Result<Vec<SplitCount>, StoreError> {
        const SQL: &str = "SELECT flow, step, branch, COUNT(*), COUNT(replied_at), \
                COUNT(finished_at), COUNT(handed_off_at) \
            FROM split_assignments \
            WHERE (CAST($1 AS TEXT) IS NULL OR flow = $1) AND (CAST($2 AS TEXT) IS NULL OR step = $2) \
            GROUP BY flow, step, branch \
            ORDER BY flow, step, branch";
        type Raw = (String, String, String, i64, i64, i64, i64);
        let (flow, step) = (flow.map(str::to_string), step.map(str::to_string));
        let raw: Vec<Raw> = with_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(flow)
            .bind(step)
            .fetch_all(pool)
            .await?);
        Ok(raw
            .into_iter()
            .map(
                |(flow, step, branch, reached, replied, finished, handed_off)| SplitCount {
                    flow,
                    step,
                    branch,
                    reached,
                    replied,
                    finished,
                    handed_off,
                },
            )
            .collect())
    }
}
