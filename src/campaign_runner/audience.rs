//! A run's audience, snapshotted into its ledger when the run starts: the contacts of the
//! campaign's channel with every one of its tags (a store query, in id-order pages) for
//! which its `where` condition is true.
//!
//! The condition is evaluated by the flows' Rhai sandbox exactly like a flow's `if:`, on
//! `contact.*` (no conversation variables, no message), with the contact's zone for
//! `today()`. A page is evaluated on a blocking thread, so a large audience never holds an
//! async worker (and with it conversational replies). A contact whose condition fails (a
//! script error, a value that is not true or false) is left out and counted; the first
//! error is logged, so the marketer can fix the expression.
//!
//! A split campaign's recipients are snapshotted with their variant
//! (`Campaign::variant_for`), so a run's pending recipients count under it too.
//!
//! Only contacts created at or before the run was claimed are selected: a contact added
//! mid-run is not in the running run, and a snapshot taken again after a crash selects the
//! same contacts (the ledger's insert-or-ignore adds only those still missing).

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::RunnerError;
use crate::campaign::Campaign;
use crate::dispatch::Runtime;
use crate::domain::Contact;
use crate::script::Scripting;

/// Contacts read, evaluated and snapshotted per page.
pub const PAGE: i64 = 5_000;

/// Snapshots the audience of `campaign` into run `run_id`'s ledger: contacts created at or
/// before `created_by`. Answers how many ledger rows were added.
pub async fn snapshot(
    runtime: &Runtime,
    campaign: &Arc<Campaign>,
    run_id: i64,
    created_by: DateTime<Utc>,
) -> Result<u64, RunnerError> {
    walk(runtime, campaign, created_by, Walk::Snapshot(run_id)).await
}

/// How many contacts are in the audience of `campaign` now, as a run starting now would
/// snapshot it (the console's live count while a marketer picks the tags).
pub async fn count(runtime: &Runtime, campaign: &Arc<Campaign>) -> Result<u64, RunnerError> {
    walk(runtime, campaign, runtime.clock.now(), Walk::Count).await
}

/// What [`walk`] does with each page's selected contacts.
#[derive(Debug, Clone, Copy)]
enum Walk {
    /// Adds them to run `.0`'s ledger.
    Snapshot(i64),
    /// Only counts them.
    Count,
}

/// Reads the audience page by page, selects each page's contacts by the `where`, and
/// snapshots or counts them; answers how many were added or counted.
async fn walk(
    runtime: &Runtime,
    campaign: &Arc<Campaign>,
    created_by: DateTime<Utc>,
    what: Walk,
) -> Result<u64, RunnerError> {
    let db = &runtime.db;
    let tags = &campaign.audience.tags;
    let (mut after, mut added, mut failed) = (0, 0, 0);
    let mut first_error: Option<String> = None;
    loop {
        let page = db
            .audience_page(&campaign.channel, tags, created_by, after, PAGE)
            .await?;
        let Some((last, _)) = page.last() else {
            break;
        };
        after = *last;
        let full = page.len() as i64 == PAGE;
        let now = runtime.clock.now();
        let selected = select(&runtime.engine.scripting, campaign, page, now).await?;
        failed += selected.failed;
        first_error = first_error.or(selected.first_error);
        added += match what {
            Walk::Snapshot(run_id) => {
                let mut added = 0;
                for (variant, ids) in by_variant(campaign, &selected.contacts) {
                    added += db
                        .snapshot_audience(run_id, variant, &ids, now, runtime.clock.now())
                        .await?;
                }
                added
            }
            Walk::Count => selected.contacts.len() as u64,
        };
        if !full {
            break;
        }
    }
    if let Some(error) = first_error {
        let run = match what {
            Walk::Snapshot(run_id) => Some(run_id),
            Walk::Count => None,
        };
        tracing::warn!(
            campaign = %campaign.name,
            run = ?run,
            left_out = failed,
            error = %error,
            "the audience's `where` failed for some contacts; they are left out"
        );
    }
    Ok(added)
}

/// A page's selected contacts by the variant each is given (`Campaign::variant_for`; one
/// group, `None`, without a split), for the ledger.
fn by_variant<'a>(
    campaign: &'a Campaign,
    contacts: &[(i64, String)],
) -> Vec<(Option<&'a str>, Vec<i64>)> {
    let mut groups: Vec<(Option<&str>, Vec<i64>)> = campaign
        .variants
        .iter()
        .map(|v| (v.name.as_deref(), Vec::new()))
        .collect();
    for (id, wa_id) in contacts {
        groups[campaign.variant_index(wa_id)].1.push(*id);
    }
    groups.retain(|(_, ids)| !ids.is_empty());
    groups
}

/// What a page's condition selected.
#[derive(Debug, Default)]
struct Selected {
    /// Each contact's id and `wa_id` (its variant's key).
    contacts: Vec<(i64, String)>,
    failed: u64,
    first_error: Option<String>,
}

/// The contacts of `page` whose `where` is true, evaluated on a blocking thread.
async fn select(
    scripting: &Arc<Scripting>,
    campaign: &Arc<Campaign>,
    page: Vec<(i64, Contact)>,
    now: DateTime<Utc>,
) -> Result<Selected, RunnerError> {
    if campaign.audience.filter.is_none() {
        return Ok(Selected {
            contacts: page.into_iter().map(|(id, c)| (id, c.wa_id)).collect(),
            ..Selected::default()
        });
    }
    let (scripting, campaign) = (scripting.clone(), campaign.clone());
    tokio::task::spawn_blocking(move || {
        let mut selected = Selected::default();
        for (id, contact) in &page {
            match matches(&scripting, &campaign, contact, now) {
                Ok(true) => selected.contacts.push((*id, contact.wa_id.clone())),
                Ok(false) => {}
                Err(e) => {
                    selected.failed += 1;
                    selected
                        .first_error
                        .get_or_insert_with(|| format!("contact {}: {e}", contact.wa_id));
                }
            }
        }
        selected
    })
    .await
    .map_err(|e| RunnerError::Audience(e.to_string()))
}

/// Whether `contact` is in the campaign's audience by its `where` (true when it has none).
pub fn matches(
    scripting: &Scripting,
    campaign: &Campaign,
    contact: &Contact,
    now: DateTime<Utc>,
) -> Result<bool, String> {
    let Some(filter) = &campaign.audience.filter else {
        return Ok(true);
    };
    crate::engine::render_for_contact(scripting, contact, now, |s, ctx| {
        s.eval_condition(&filter.ast, ctx)
    })
    .map_err(|e| format!("`{}`: {}", filter.source, e.message))
}
