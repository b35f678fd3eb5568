//! Wiring: config -> flows -> database -> runtime, in one place, for every command.
//!
//! `check` stops after [`load`]; `chat` and `test` add a database and a virtual clock;
//! `serve` adds the system clock, the timer loop and the HTTP server.

use std::path::Path;
use std::sync::Arc;

use crate::clock::SharedClock;
use crate::config::Config;
use crate::diagnostic::Diagnostics;
use crate::dispatch::Runtime;
use crate::engine::Engine;
use crate::flow::load::{Project, load_project};
use crate::script::Scripting;
use crate::store::Db;

/// A loaded project: the config and everything it names, checked.
pub struct Loaded {
    pub config: Config,
    pub scripting: Arc<Scripting>,
    pub project: Project,
}

/// Loads config, flows, scripts and templates through the one loader. `Err` holds the
/// diagnostics when there is any error; warnings travel in `project.diagnostics`.
pub fn load(config_path: Option<&Path>) -> Result<Loaded, Box<Diagnostics>> {
    let config = Config::load(config_path)?;
    let scripting = Arc::new(Scripting::default());
    let project = load_project(&config, &scripting);
    if project.diagnostics.has_errors() {
        return Err(Box::new(project.diagnostics));
    }
    Ok(Loaded {
        config,
        scripting,
        project,
    })
}

impl Loaded {
    /// Connects (and migrates) `database_url`, and builds the runtime on `clock`.
    pub async fn runtime(&self, database_url: &str, clock: SharedClock) -> anyhow::Result<Runtime> {
        let db = Db::connect(database_url).await?;
        db.migrate().await?;
        let engine = Engine::new(self.scripting.clone(), self.config.fallback.clone());
        let runtime = Runtime::new(
            db,
            engine,
            self.project.flows.clone(),
            self.project.templates.clone(),
            clock,
            &self.config.default_channel().name,
        );
        runtime.remember_flow_versions().await?;
        Ok(runtime)
    }
}
