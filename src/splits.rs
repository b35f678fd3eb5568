//! A/B splits at run time: the per-branch report, for the API and for `/metrics`.
//!
//! A flow's `split` step sends each contact down one weighted branch, the same one every
//! time (`flow::split_branch`); every turn records the stages its contacts reach
//! (`split_assignments`, written with the turn). This module reads them back: how many
//! contacts each branch reached, and how many of those replied, finished the flow or were
//! handed to a person.

use serde::Serialize;

use crate::domain::SplitStage;
use crate::metrics::Gauge;
use crate::store::{Db, SplitCount, StoreError};

/// One branch of a split, with its counts and the share of its contacts at each stage.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BranchReport {
    #[serde(flatten)]
    pub counts: SplitCount,
    /// `replied / reached`, `finished / reached`, `handed_off / reached` (0 when none
    /// reached it).
    pub reply_rate: f64,
    pub finish_rate: f64,
    pub handoff_rate: f64,
}

/// Every split's branches (a flow, and a step of it, narrow the report): what the API
/// answers for the A/B report.
pub async fn report(
    db: &Db,
    flow: Option<&str>,
    step: Option<&str>,
) -> Result<Vec<BranchReport>, StoreError> {
    Ok(db
        .split_counts(flow, step)
        .await?
        .into_iter()
        .map(|counts| {
            let rate = |n: i64| {
                if counts.reached == 0 {
                    0.0
                } else {
                    n as f64 / counts.reached as f64
                }
            };
            BranchReport {
                reply_rate: rate(counts.replied),
                finish_rate: rate(counts.finished),
                handoff_rate: rate(counts.handed_off),
                counts,
            }
        })
        .collect())
}

/// `flowgate_split_contacts{flow, step, branch, stage}`, read at scrape time.
pub async fn gauges(db: &Db) -> Result<Vec<Gauge<'static>>, StoreError> {
    let mut gauges = Vec::new();
    for c in db.split_counts(None, None).await? {
        for stage in SplitStage::ALL {
            let n = match stage {
                SplitStage::Reached => c.reached,
                SplitStage::Replied => c.replied,
                SplitStage::Finished => c.finished,
                SplitStage::HandedOff => c.handed_off,
            };
            gauges.push((
                "flowgate_split_contacts",
                "Contacts an A/B split sent down each branch (stage reached), and of them those who replied, finished the flow or were handed off.",
                vec![
                    ("flow", c.flow.clone()),
                    ("step", c.step.clone()),
                    ("branch", c.branch.clone()),
                    ("stage", stage.as_str().to_string()),
                ],
                n as f64,
            ));
        }
    }
    Ok(gauges)
}
