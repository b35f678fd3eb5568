//! The campaigns changeable at run time: the files of `campaigns/` (replaced whole by a
//! live reload) and the campaigns written through the API (stored with origin `api`), and
//! the operator's controls: create or replace, delete, pause, resume, cancel, run now.
//!
//! An API definition is compiled by the function `flowgate check` uses
//! ([`compile_campaigns`]: the same diagnostics, located in the text sent), against the
//! templates, channels and flows running now. A file campaign belongs to its file: the API
//! may pause, resume, cancel or run it, never change or delete it. A file wins a name: a
//! file campaign loaded under an API campaign's name replaces it.
//!
//! Pause, resume and cancel are store writes (the campaign's `paused`, its runs' status);
//! the dispatcher reads them on every tick.

use std::collections::HashMap;
use std::sync::Arc;

use super::{CampaignRunner, RunnerError, next_run_at};
use crate::campaign::Campaign;
use crate::campaign::compile::{Env, compile_campaigns};
use crate::diagnostic::Diagnostics;
use crate::store::{CampaignOrigin, ManualRun, NewCampaign, RunRow, RunStatus};

/// The campaigns by name: files', the API's, and the API's that no longer compile.
#[derive(Debug, Default)]
pub(super) struct Registry {
    files: HashMap<String, Arc<Campaign>>,
    api: HashMap<String, Arc<Campaign>>,
    /// API campaigns stored but not running: why (their diagnostics).
    broken: HashMap<String, String>,
}

impl Registry {
    pub(super) fn with_files(campaigns: &[Arc<Campaign>]) -> Self {
        Self {
            files: by_name(campaigns),
            ..Self::default()
        }
    }

    pub(super) fn get(&self, name: &str) -> Option<Arc<Campaign>> {
        self.files.get(name).or_else(|| self.api.get(name)).cloned()
    }

    pub(super) fn files(&self) -> Vec<Arc<Campaign>> {
        self.files.values().cloned().collect()
    }

    /// The longest `frequency_cap` period of any campaign: the history a cap counts.
    pub(super) fn longest_frequency_cap(&self) -> Option<chrono::Duration> {
        self.files
            .values()
            .chain(self.api.values())
            .filter_map(|c| c.frequency_cap.as_ref().map(|cap| cap.per))
            .max()
    }

    pub(super) fn put_api(&mut self, campaign: Arc<Campaign>) {
        self.broken.remove(&campaign.name);
        self.api.insert(campaign.name.clone(), campaign);
    }

    pub(super) fn broken(&mut self, name: &str, why: &str) {
        self.api.remove(name);
        self.broken.insert(name.to_string(), why.to_string());
    }
}

fn by_name(campaigns: &[Arc<Campaign>]) -> HashMap<String, Arc<Campaign>> {
    campaigns
        .iter()
        .map(|c| (c.name.clone(), c.clone()))
        .collect()
}

/// The name an API campaign's diagnostics give as its file.
pub fn api_file(name: &str) -> String {
    format!("api/{name}.yaml")
}

/// Why an operator's change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The definition has errors (located in the text sent).
    #[error("the campaign has {} error(s); nothing was saved", .0.errors())]
    Invalid(Box<Diagnostics>),
    #[error(
        "campaign `{0}` is defined by a file of the campaigns directory: edit the file (the server reloads it), or pick another name"
    )]
    FileCampaign(String),
    #[error("there is no campaign `{0}`")]
    Unknown(String),
    #[error("campaign `{0}` exists already: replace it with PUT /api/campaigns/{0}")]
    Exists(String),
    #[error(
        "the path names campaign `{path}` but the text is campaign `{text}`: make them the same"
    )]
    NameMismatch { path: String, text: String },
    #[error("campaign `{0}` is paused: resume it first")]
    Paused(String),
    #[error("campaign `{campaign}` has run {run} not over yet: wait for it, or cancel it first")]
    Busy { campaign: String, run: i64 },
    #[error("campaign `{0}` has no run to cancel")]
    NoActiveRun(String),
    #[error("campaign `{name}` is stored but does not compile any more; write it again:\n{why}")]
    Broken { name: String, why: String },
    #[error(transparent)]
    Runner(#[from] RunnerError),
}

impl From<crate::store::StoreError> for ChangeError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Runner(e.into())
    }
}

/// How a definition arrives.
#[derive(Debug, Clone, Copy)]
pub enum Write<'a> {
    /// A new campaign (`POST`): refused when the name exists.
    Create,
    /// Create or replace the campaign at this name (`PUT`).
    Put(&'a str),
}

/// A saved definition.
#[derive(Debug)]
pub struct Saved {
    pub campaign: Arc<Campaign>,
    pub created: bool,
    /// Its warnings (as `check` gives them).
    pub warnings: Diagnostics,
}

/// What a run-now did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunNow {
    pub run_id: i64,
    /// `false`: the request's `Idempotency-Key` was seen before, and this is its run.
    pub started: bool,
    /// Recipients snapshotted (when started).
    pub recipients: u64,
}

/// A campaign as the list shows it: where it comes from, and whether it runs.
#[derive(Debug, Clone)]
pub struct Listed {
    pub origin: CampaignOrigin,
    pub campaign: Option<Arc<Campaign>>,
    /// Why a stored API campaign does not run.
    pub problem: Option<String>,
}

impl CampaignRunner {
    /// Compiles one definition as `check` does; `Err` holds its diagnostics when it has an
    /// error, `Ok` its warnings.
    pub fn compile(
        &self,
        file: &str,
        source: &str,
    ) -> Result<(Arc<Campaign>, Diagnostics), Box<Diagnostics>> {
        let templates = self.runtime.templates();
        let flows = self.runtime.flows.read().expect("flows lock");
        let flow_ids: Vec<&str> = flows.current().iter().map(|f| f.id.as_str()).collect();
        let env = Env {
            scripting: &self.runtime.engine.scripting,
            templates: &templates,
            channels: &self.runtime.channels,
        };
        let sources = [(file.to_string(), source.to_string())];
        let (mut campaigns, diags) = compile_campaigns(&sources, &env, &flow_ids);
        match campaigns.pop() {
            Some(campaign) if !diags.has_errors() => Ok((campaign, diags)),
            _ => Err(Box::new(diags)),
        }
    }

    /// Saves a definition written through the API, compiled first; the runner uses it from
    /// now on (its next run counts from now unless its schedule is unchanged).
    pub async fn create_or_replace(
        &self,
        source: &str,
        write: Write<'_>,
    ) -> Result<Saved, ChangeError> {
        let _one = self.changes.lock().await;
        let label = match write {
            Write::Create => "api/request.yaml".to_string(),
            Write::Put(name) => api_file(name),
        };
        let (campaign, warnings) = self.compile(&label, source).map_err(ChangeError::Invalid)?;
        let name = campaign.name.clone();
        if let Write::Put(path) = write
            && path != name
        {
            return Err(ChangeError::NameMismatch {
                path: path.into(),
                text: name,
            });
        }
        let db = &self.runtime.db;
        let stored = db.campaign(&name).await?;
        match &stored {
            Some(row) if row.origin == CampaignOrigin::File => {
                return Err(ChangeError::FileCampaign(name));
            }
            Some(_) if matches!(write, Write::Create) => return Err(ChangeError::Exists(name)),
            _ => {}
        }
        let now = self.runtime.clock.now();
        let created = db
            .save_campaign(
                &NewCampaign {
                    name: &name,
                    channel: &campaign.channel,
                    source: &campaign.source,
                    origin: CampaignOrigin::Api,
                    next_run_at: next_run_at(&campaign, stored.as_ref(), now),
                },
                now,
            )
            .await?;
        self.registry
            .write()
            .expect("campaigns lock")
            .put_api(campaign.clone());
        tracing::info!(campaign = %name, created, "campaign saved through the API");
        Ok(Saved {
            campaign,
            created,
            warnings,
        })
    }

    /// Deletes an API campaign; its runs not over are cancelled, its reports stay.
    pub async fn delete(&self, name: &str) -> Result<(), ChangeError> {
        let _one = self.changes.lock().await;
        self.origin(name).await?;
        self.forget(name, "deleted through the API").await?;
        let mut registry = self.registry.write().expect("campaigns lock");
        registry.api.remove(name);
        registry.broken.remove(name);
        Ok(())
    }

    /// Where a stored campaign comes from; only the API's may be changed.
    async fn origin(&self, name: &str) -> Result<(), ChangeError> {
        match self.runtime.db.campaign(name).await? {
            None => Err(ChangeError::Unknown(name.into())),
            Some(row) if row.origin == CampaignOrigin::File => {
                Err(ChangeError::FileCampaign(name.into()))
            }
            Some(_) => Ok(()),
        }
    }

    /// Pauses a campaign (no scheduled run starts) and its running run.
    pub async fn pause(&self, name: &str) -> Result<(), ChangeError> {
        let now = self.runtime.clock.now();
        let db = &self.runtime.db;
        if !db
            .pause_campaign(name, "paused by an operator", now)
            .await?
        {
            return Err(ChangeError::Unknown(name.into()));
        }
        for run in self.active_runs(name).await? {
            if run.status == RunStatus::Running {
                db.set_run_status(
                    run.id,
                    RunStatus::Paused,
                    Some("the campaign is paused"),
                    now,
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Resumes a paused campaign and its paused run.
    pub async fn resume(&self, name: &str) -> Result<(), ChangeError> {
        let now = self.runtime.clock.now();
        let db = &self.runtime.db;
        if !db.resume_campaign(name, now).await? {
            return Err(ChangeError::Unknown(name.into()));
        }
        for run in self.active_runs(name).await? {
            if run.status == RunStatus::Paused {
                db.set_run_status(run.id, RunStatus::Running, None, now)
                    .await?;
            }
        }
        Ok(())
    }

    /// Cancels the campaign's run not over (and its recipients not decided yet); answers
    /// its id.
    pub async fn cancel(&self, name: &str) -> Result<i64, ChangeError> {
        if self.runtime.db.campaign(name).await?.is_none() {
            return Err(ChangeError::Unknown(name.into()));
        }
        let Some(run) = self.active_runs(name).await?.pop() else {
            return Err(ChangeError::NoActiveRun(name.into()));
        };
        let now = self.runtime.clock.now();
        self.runtime
            .db
            .cancel_run(run.id, "cancelled by an operator", now)
            .await?;
        Ok(run.id)
    }

    /// The campaign's runs not over, oldest first.
    async fn active_runs(&self, name: &str) -> Result<Vec<RunRow>, ChangeError> {
        let mut runs = self.runtime.db.active_runs().await?;
        runs.retain(|r| r.campaign == name);
        Ok(runs)
    }

    /// Starts a run now: claimed (one at a time per campaign; a request's `key` seen before
    /// answers its run), its audience snapshotted, running. Answers the run.
    pub async fn run_now(&self, name: &str, key: Option<&str>) -> Result<RunNow, ChangeError> {
        // Claimed under the changes' lock, so a delete cannot come between the check and the
        // claim and leave a run of a deleted campaign; the snapshot runs after it.
        let one = self.changes.lock().await;
        let campaign = self.loaded(name).await?;
        let db = &self.runtime.db;
        if db.campaign(name).await?.is_some_and(|row| row.paused) {
            return Err(ChangeError::Paused(name.into()));
        }
        let now = self.runtime.clock.now();
        let claimed = db.claim_manual_run(name, key, now).await?;
        drop(one);
        match claimed {
            ManualRun::Started(run_id) => {
                let recipients = self.start(&campaign, run_id, now).await?;
                Ok(RunNow {
                    run_id,
                    started: true,
                    recipients,
                })
            }
            ManualRun::Replayed(run_id) => Ok(RunNow {
                run_id,
                started: false,
                recipients: 0,
            }),
            ManualRun::Busy(run) => Err(ChangeError::Busy {
                campaign: name.into(),
                run,
            }),
        }
    }

    /// The running definition of `name`, or why there is none.
    async fn loaded(&self, name: &str) -> Result<Arc<Campaign>, ChangeError> {
        if let Some(campaign) = self.campaign(name) {
            return Ok(campaign);
        }
        let registry = self.registry.read().expect("campaigns lock");
        match registry.broken.get(name) {
            Some(why) => Err(ChangeError::Broken {
                name: name.into(),
                why: why.clone(),
            }),
            None => Err(ChangeError::Unknown(name.into())),
        }
    }

    /// How the list shows `name` (stored with `origin`).
    pub fn listed(&self, name: &str, origin: CampaignOrigin) -> Listed {
        let registry = self.registry.read().expect("campaigns lock");
        Listed {
            origin,
            campaign: registry.get(name),
            problem: registry.broken.get(name).cloned(),
        }
    }

    /// A live reload's campaign files: saved, the removed ones forgotten, and used from now
    /// on (an API campaign of a file's name is replaced by the file).
    pub async fn replace_files(&self, files: &[Arc<Campaign>]) -> Result<(), RunnerError> {
        let _one = self.changes.lock().await;
        self.save_files(files).await?;
        let mut registry = self.registry.write().expect("campaigns lock");
        for campaign in files {
            registry.api.remove(&campaign.name);
            registry.broken.remove(&campaign.name);
        }
        registry.files = by_name(files);
        Ok(())
    }
}

impl CampaignRunner {
    /// Run `run_id`'s report now, from the ledger and the message log. `window` is the
    /// policy's window (was a send inside it); the category is the campaign's when it is
    /// still defined, else marketing (always charged: the estimate errs high).
    pub async fn report(
        &self,
        run: &RunRow,
        window: chrono::Duration,
        prices: Option<&crate::config::CampaignPrices>,
    ) -> Result<crate::campaign::report::Report, RunnerError> {
        use crate::campaign::report::{Counts, report};
        let db = &self.runtime.db;
        let counts = db.run_counts(run.id).await?;
        let replied = db.run_replied(run.id).await?;
        let charges = db.run_charges(run.id, window).await?;
        let category = self
            .campaign(&run.campaign)
            .map_or(crate::templates::Category::Marketing, |c| c.category);
        Ok(report(&Counts {
            counts: &counts,
            replied: &replied,
            charges: &charges,
            category,
            prices,
        }))
    }
}
