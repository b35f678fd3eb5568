//! Wiring: config -> flows -> database -> runtime, in one place, for every command.
//!
//! `check` stops after [`load`]; `chat` and `test` add a database and a virtual clock;
//! `serve` adds the system clock, the timer loop and the HTTP server.

use std::path::Path;
use std::sync::Arc;

use crate::campaign_runner::CampaignRunner;
use crate::clock::SharedClock;
use crate::config::Config;
use crate::diagnostic::Diagnostics;
use crate::dispatch::Runtime;
use crate::engine::Engine;
use crate::flow::load::{Project, load_project};
use crate::http::doors::Doors;
use crate::script::Scripting;
use crate::state::AppState;
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
    let scripting = Arc::new(Scripting::new(crate::script::Limits {
        timeout: config.limits.script_timeout,
        ..Default::default()
    }));
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

/// A running server: the runtime, its timer loop and the HTTP listener.
pub struct Application {
    pub runtime: Arc<Runtime>,
    pub config: Arc<Config>,
    pub inbox: Arc<tokio::sync::Notify>,
    /// The loaded campaigns, saved to the store at build and started by the timer loop.
    pub campaigns: Arc<CampaignRunner>,
    listener: tokio::net::TcpListener,
    doors: Doors,
    /// Told when the server starts to stop ([`AppState::closing`]).
    closing: tokio::sync::watch::Sender<bool>,
}

impl Application {
    /// Connects the database, migrates it, and binds `listen` (port 0 picks a free port).
    pub async fn build(
        loaded: &Loaded,
        database_url: &str,
        listen: &str,
        clock: SharedClock,
    ) -> anyhow::Result<Self> {
        refuse_open_admin(listen, &loaded.config)?;
        let runtime = Arc::new(loaded.runtime(database_url, clock).await?);
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
        let doors = Doors::decide(&loaded.config, listener.local_addr()?);
        if let (None, Some(media)) = (&loaded.config.media.public_url, &runtime.media) {
            // Links to customers' files name the address the server really listens on.
            let mut addr = listener.local_addr()?;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            media.signer.set_base(&format!("http://{addr}"));
        }
        let campaigns = Arc::new(CampaignRunner::new(
            runtime.clone(),
            &loaded.project.campaigns,
        ));
        for run in campaigns.sync().await? {
            tracing::info!(campaign = %run.campaign, run = run.run_id, "interrupted campaign run resumed");
        }
        Ok(Self {
            runtime,
            campaigns,
            config: Arc::new(loaded.config.clone()),
            inbox: Arc::new(tokio::sync::Notify::new()),
            listener,
            doors,
            closing: tokio::sync::watch::channel(false).0,
        })
    }

    /// What the HTTP handlers and the inbound worker share.
    pub fn state(&self) -> AppState {
        AppState {
            runtime: self.runtime.clone(),
            config: self.config.clone(),
            inbox: self.inbox.clone(),
            campaigns: self.campaigns.clone(),
            closing: self.closing.subscribe(),
        }
    }

    /// Who may use the sandbox and `/metrics` on this listener (for the start-up banner).
    pub fn doors(&self) -> &Doors {
        &self.doors
    }

    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` resolves, firing due timers and starting due campaign runs
    /// every half second meanwhile; then stops taking requests, lets in-flight ones finish
    /// and closes the database.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let timers = self.runtime.clone();
        let campaigns = self.campaigns.clone();
        // The number's limits are counted by the instance holding its channel's lease.
        let channels: Vec<String> = self
            .config
            .channels
            .iter()
            .map(|c| c.name.clone())
            .collect();
        let leases = crate::outbox::ChannelLeases::start(
            &self.runtime.db,
            &channels,
            crate::outbox::LeaseOptions::default(),
        );
        let dispatcher = crate::campaign_runner::dispatch::Dispatcher::new(campaigns.clone())
            .with_leases(leases.clone());
        // Other instances take template status webhooks too: on a shared database, read
        // their statuses every few rounds (SQLite's one instance already has them).
        let shared = self.runtime.db.backend() != "sqlite";
        let timer_task = tokio::spawn(async move {
            for round in 0u64.. {
                if shared
                    && round % TEMPLATE_REFRESH_ROUNDS == 0
                    && let Err(e) = timers.load_template_statuses().await
                {
                    tracing::error!(error = %e, "reading template statuses failed");
                }
                if let Err(e) = campaigns.tick().await {
                    tracing::error!(error = %e, "starting due campaign runs failed");
                }
                // Right after the tick, so a run it started sends at once.
                if let Err(e) = dispatcher.tick().await {
                    tracing::error!(error = %e, "dispatching campaign runs failed");
                }
                match timers.fire_due_timers().await {
                    Ok(reports) => {
                        for r in reports {
                            tracing::info!(contact = %r.wa_id, sent = r.sent.len(), "timer fired");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "firing timers failed"),
                }
                // A running campaign run is paced meanwhile.
                dispatcher
                    .pace_for(std::time::Duration::from_millis(500))
                    .await;
            }
        });
        let stated = self.runtime.clone();
        let limits_task = tokio::spawn(async move {
            loop {
                crate::campaign_runner::limits::read_stated_limits(&stated).await;
                tokio::time::sleep(crate::campaign_runner::limits::REFRESH).await;
            }
        });
        let retention_task = self.config.retention.map(|kept| {
            let campaigns = self.campaigns.clone();
            tokio::spawn(crate::retention::run(
                campaigns,
                kept.0,
                crate::retention::EVERY,
            ))
        });
        let state = self.state();
        let heartbeat_task = self
            .runtime
            .ownership
            .clone()
            .map(|ownership| tokio::spawn(async move { ownership.heartbeat().await }));
        let wake_task = wake_on_notifications(&state);
        let (stop_inbound, inbound_stop) = tokio::sync::watch::channel(false);
        let inbound_task = tokio::spawn(crate::inbound::run(state.clone(), inbound_stop));
        let options = crate::outbox::SenderOptions {
            lease: self
                .config
                .outbox
                .lease
                .0
                .to_std()
                .unwrap_or(std::time::Duration::from_secs(60)),
            pair_limit: self
                .config
                .outbox
                .pace_recipients
                .then(crate::outbox::PairLimit::default),
            media: self.config.upload_options(),
            ..Default::default()
        };
        let senders = crate::outbox::spawn_senders(&self.runtime, &options, &leases);
        let (stop_media, media_stop) = tokio::sync::watch::channel(false);
        let media_task = tokio::spawn(crate::media::download::run(
            self.runtime.clone(),
            media_stop,
        ));
        let closing = self.closing.clone();
        let shutdown = async move {
            shutdown.await;
            closing.send_replace(true);
        };
        axum::serve(self.listener, crate::http::router(state, self.doors))
            .with_graceful_shutdown(shutdown)
            .await?;
        let _ = stop_inbound.send(true);
        let _ = inbound_task.await;
        let _ = stop_media.send(true);
        let _ = media_task.await;
        timer_task.abort();
        limits_task.abort();
        if let Some(task) = retention_task {
            task.abort();
        }
        let _ = timer_task.await;
        if let Some(task) = wake_task {
            task.abort();
        }
        if let Some(ownership) = &self.runtime.ownership {
            // Whatever this instance still holds goes back now, not at expiry.
            ownership.release_idle().await;
        }
        if let Some(task) = heartbeat_task {
            task.abort();
        }
        if let Some(ownership) = &self.runtime.ownership {
            ownership.db().close().await;
        }
        crate::outbox::shutdown_senders(senders).await;
        leases.release().await;
        self.runtime.db.close().await;
        Ok(())
    }
}

/// On a shared database, rings this instance's workers when any instance stored work for
/// them (`store::wake`): the inbound worker for stored updates and released leases, a
/// channel's sender for a pending message; everything after the listener (re)connects.
/// Their polls stay as the safety net.
fn wake_on_notifications(state: &AppState) -> Option<tokio::task::JoinHandle<()>> {
    use crate::store::WakeUp;
    // On the leases' own pool when there is one: the listener holds its connection.
    let db = match &state.runtime.ownership {
        Some(ownership) => ownership.db(),
        None => &state.runtime.db,
    };
    let mut wake_ups = db.wake_ups()?;
    let state = state.clone();
    Some(tokio::spawn(async move {
        while let Some(wake) = wake_ups.recv().await {
            match wake {
                WakeUp::Inbox | WakeUp::Leases => state.inbox.notify_one(),
                WakeUp::Outbox(channel) => state.runtime.outbox_ready(&channel).notify_one(),
                WakeUp::Reconnected => {
                    state.inbox.notify_one();
                    for channel in &state.runtime.channels {
                        state.runtime.outbox_ready(&channel.name).notify_one();
                    }
                }
            }
        }
    }))
}

/// Every this many rounds of the timer loop (half a second each), an instance on a shared
/// database reads the template statuses other instances stored.
const TEMPLATE_REFRESH_ROUNDS: u64 = 4;

/// The admin API needs a token unless only this machine can reach it.
fn refuse_open_admin(listen: &str, config: &Config) -> anyhow::Result<()> {
    let has_token = config
        .admin
        .token
        .as_ref()
        .is_some_and(|t| !t.expose().is_empty());
    let loopback = match listen.parse::<std::net::SocketAddr>() {
        Ok(addr) => addr.ip().is_loopback(),
        Err(_) => listen.starts_with("localhost:"),
    };
    if !loopback && !has_token {
        anyhow::bail!(
            "refusing to listen on {listen} without an admin token: set `admin.token` in the config \
             (e.g. `token: ${{FLOWGATE_ADMIN_TOKEN}}`), or listen on 127.0.0.1"
        );
    }
    Ok(())
}

impl Loaded {
    /// Connects (and migrates) `database_url`, and builds the runtime on `clock`.
    pub async fn runtime(&self, database_url: &str, clock: SharedClock) -> anyhow::Result<Runtime> {
        let db = Db::connect(database_url).await?;
        db.migrate().await?;
        let engine = Engine::new(self.scripting.clone(), self.config.fallback.clone())
            .with_messages_per_turn(self.config.limits.messages_per_turn);
        let runtime = Runtime::new(
            db,
            engine,
            self.project.flows.clone(),
            self.project.templates.clone(),
            crate::policy::Policy::new(&self.config.policy),
            clock,
            self.config.channels.clone(),
        );
        let media = self.media(&runtime.db, runtime.clock.now()).await?;
        let runtime = runtime.with_media(Arc::new(media));
        runtime.remember_flow_versions().await?;
        runtime.load_template_statuses().await?;
        Ok(runtime)
    }

    /// Customers' files in memory, gone with the process (conversation tests and `chat`,
    /// which run on an in-memory database too), links signed with a key of their own.
    pub fn memory_media(&self) -> crate::media::Media {
        let config = &self.config.media;
        crate::media::Media::new(
            Arc::new(crate::media::Memory::default()),
            crate::media::Signer::new(
                crate::media::random_key().into_bytes(),
                &format!("http://{}", self.config.listen),
                config.url_ttl.0,
            ),
            config.max_bytes,
        )
    }

    /// Customers' files as the config says: the local directory `media.dir`, links signed
    /// with `media.url_secret` (else the key generated once and kept in the database) on
    /// `media.public_url` (else the listener's address, set once it is bound).
    async fn media(
        &self,
        db: &Db,
        now: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<crate::media::Media> {
        let config = &self.config.media;
        let key = match config
            .url_secret
            .as_ref()
            .filter(|s| !s.expose().is_empty())
        {
            Some(secret) => secret.expose().to_string(),
            None => {
                db.server_secret("media_url_key", &crate::media::random_key(), now)
                    .await?
            }
        };
        let base = match &config.public_url {
            Some(url) => url.0.clone(),
            None => format!("http://{}", self.config.listen),
        };
        let signer = crate::media::Signer::new(key.into_bytes(), &base, config.url_ttl.0);
        Ok(crate::media::Media::new(
            Arc::new(crate::media::LocalDir::new(&config.dir)),
            signer,
            config.max_bytes,
        ))
    }
}
