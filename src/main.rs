//! The `flowgate` command line: clap parsing, a call into the library per command
//! (`flowgate::app`, `flowgate::commands`, `flowgate::conversation`), and printing.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use flowgate::app::{self, Application, Loaded};
use flowgate::clock::SystemClock;
use flowgate::commands::templates_sync::{self, SyncError};
use flowgate::commands::{
    self, campaign,
    chat::{Chat, Reply},
};
use flowgate::config::Config;
use flowgate::contacts_import::ImportError;
use flowgate::diagnostic::Diagnostics;
use flowgate::http::doors::Door;
use flowgate::reload;
use flowgate::store::Db;

/// mimalloc instead of the system allocator: a reply allocates in many small pieces across
/// threads (HTTP buffers, JSON, SQL arguments), and glibc's malloc spent about a third of the
/// server's runtime threads' time on them under load (see ARCHITECTURE.md, "Decisions").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "flowgate",
    version,
    about = "WhatsApp chatbot automation: YAML flows, Rhai scripts, a 24-hour-window policy"
)]
struct Cli {
    /// The config file (default: flowgate.yaml in the working directory; without one,
    /// the example flows on the sandbox channel).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: migrations, flows, timers and the HTTP endpoints. `SIGHUP` reloads
    /// the flows, scripts and templates.
    Serve {
        /// Reload when a flow, script, campaign or the template registry changes (checked
        /// every second).
        #[arg(long)]
        watch: bool,
    },
    /// Validate config, flows, scripts and templates; exit 1 on any error.
    Check,
    /// Talk to the flows in the terminal as a customer, on a virtual clock.
    Chat {
        /// The customer's number.
        #[arg(long, default_value = "15550001234")]
        from: String,
        /// Where the virtual clock starts, e.g. 2026-12-03T09:00:00Z (default: now).
        #[arg(long)]
        at: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Run conversation tests (default: tests/conversations and *.test.yaml beside the flows).
    Test { paths: Vec<PathBuf> },
    /// Apply database migrations.
    Migrate,
    /// Contacts: import them from a CSV file.
    Contacts {
        #[command(subcommand)]
        command: ContactsCommand,
    },
    /// Campaigns on a running server (`flowgate serve`): list, create, pause, resume,
    /// cancel, run now with a progress bar, report.
    Campaign {
        /// The server (default: the config's `listen` address). The token is
        /// `FLOWGATE_ADMIN_TOKEN`, else the config's `admin.token`.
        #[arg(long, global = true)]
        url: Option<String>,
        #[command(subcommand)]
        command: CampaignCommand,
    },
    /// The template registry (templates.yaml).
    Templates {
        #[command(subcommand)]
        command: TemplatesCommand,
    },
}

#[derive(Subcommand)]
enum TemplatesCommand {
    /// Pull the channel's templates from the Graph API into the registry file.
    Sync {
        /// The channel to read (default: the first cloud_api channel).
        #[arg(long)]
        channel: Option<String>,
    },
}

#[derive(Subcommand)]
enum CampaignCommand {
    /// Every campaign: origin, paused or not, next run, latest run.
    List,
    /// Create a campaign from a YAML file (checked as `flowgate check` checks a file).
    Create {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Pause a campaign: no run starts, its running run stops sending.
    Pause { name: String },
    /// Resume a paused campaign and its paused run.
    Resume { name: String },
    /// Cancel the campaign's run not over yet.
    Cancel { name: String },
    /// Start a run now and follow it with a progress bar until it is over; prints its
    /// report.
    RunNow {
        name: String,
        /// Print the run's id and return at once.
        #[arg(long)]
        detach: bool,
    },
    /// A run's report (default: the latest run).
    Report {
        name: String,
        #[arg(long)]
        run: Option<i64>,
    },
}

#[derive(Subcommand)]
enum ContactsCommand {
    /// Import contacts from a CSV file (columns wa_id and/or bsuid, name, tags, attr.KEY,
    /// timezone); bad lines are reported and skipped. While `serve` runs, import through
    /// `POST /api/contacts/import` instead.
    Import {
        file: PathBuf,
        /// The channel the contacts are on (default: the first configured channel).
        #[arg(long)]
        channel: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The log's format is the config's; a config that does not load says why later, in
    // the command's own words.
    let format = Config::load(cli.config.as_deref())
        .map(|c| c.log.format)
        .unwrap_or_default();
    let level = if matches!(cli.command, Command::Serve { .. } | Command::Migrate) {
        "info"
    } else {
        "error"
    };
    flowgate::logging::init(
        format,
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime starts");
    let result = runtime.block_on(run(cli));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether diagnostics on `stream` get colours: a terminal, and `NO_COLOR` unset.
fn color(stream: &impl IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Loads the project, printing its warnings, or prints why it does not load.
fn load(config: Option<&Path>) -> Option<Loaded> {
    match app::load(config) {
        Ok(loaded) => {
            if loaded.project.diagnostics.warnings() > 0 {
                eprint!(
                    "{}",
                    loaded.project.diagnostics.render(color(&std::io::stderr()))
                );
            }
            Some(loaded)
        }
        Err(diags) => {
            eprint!("{}", diags.render(color(&std::io::stderr())));
            None
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = cli.config.as_deref();
    match cli.command {
        Command::Check => Ok(check(config)),
        Command::Test { paths } => test(config, &paths).await,
        Command::Migrate => migrate(config).await,
        Command::Chat { from, at } => chat(config, &from, at).await,
        Command::Serve { watch } => serve(config, watch).await,
        Command::Templates {
            command: TemplatesCommand::Sync { channel },
        } => templates_sync(config, channel.as_deref()).await,
        Command::Contacts {
            command: ContactsCommand::Import { file, channel },
        } => contacts_import(config, &file, channel.as_deref()).await,
        Command::Campaign { url, command } => campaign(config, url.as_deref(), command).await,
    }
}

fn exit_code(success: bool) -> ExitCode {
    if success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `flowgate check`: every diagnostic, on stdout; exit 1 on any error.
fn check(config: Option<&Path>) -> ExitCode {
    let diags: Diagnostics = match app::load(config) {
        Ok(loaded) => loaded.project.diagnostics,
        Err(diags) => *diags,
    };
    print!("{}", diags.render(color(&std::io::stdout())));
    exit_code(!diags.has_errors())
}

/// `flowgate test`: the conversation tests' report; exit 1 when one failed.
async fn test(config: Option<&Path>, paths: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let Some(loaded) = load(config) else {
        return Ok(ExitCode::FAILURE);
    };
    let run = commands::test::run(&loaded, paths).await?;
    print!("{}", run.output);
    Ok(exit_code(run.failed == 0))
}

/// `flowgate migrate`: needs only the config's `database`, not the flows, so a project
/// whose flows do not load yet can still get its database ready.
async fn migrate(config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = match Config::load(config) {
        Ok(config) => config,
        Err(diags) => {
            eprint!("{}", diags.render(color(&std::io::stderr())));
            return Ok(ExitCode::FAILURE);
        }
    };
    let db = Db::connect(&config.database).await?;
    db.migrate().await?;
    db.close().await;
    println!("migrated {}", flowgate::store::redact_url(&config.database));
    Ok(ExitCode::SUCCESS)
}

/// `flowgate templates sync`: the warnings, then the file written, then the summary.
async fn templates_sync(config: Option<&Path>, channel: Option<&str>) -> anyhow::Result<ExitCode> {
    let fetched = match templates_sync::fetch(config, channel).await {
        Ok(fetched) => fetched,
        Err(SyncError::Config(diags)) => {
            eprint!("{}", diags.render(color(&std::io::stderr())));
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => {
            if let SyncError::Registry { diagnostics, .. } = &e {
                eprint!("{}", diagnostics.render(color(&std::io::stderr())));
            }
            return Err(e.into());
        }
    };
    for warning in fetched.warnings() {
        eprintln!("warning: {warning}");
    }
    fetched.write()?;
    println!("{}", fetched.summary());
    Ok(ExitCode::SUCCESS)
}

/// `flowgate contacts import`: the summary, then each skipped line; exit 1 only when the
/// file as a whole was not imported.
async fn contacts_import(
    config: Option<&Path>,
    file: &Path,
    channel: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let now = flowgate::clock::Clock::now(&SystemClock);
    match commands::contacts_import::import_file(config, file, channel, now).await {
        Ok(report) => {
            println!("{}", report.summary());
            for skipped in &report.skipped {
                println!("  line {}: {}", skipped.line, skipped.reason);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(ImportError::Config(diags)) => {
            eprint!("{}", diags.render(color(&std::io::stderr())));
            Ok(ExitCode::FAILURE)
        }
        Err(e) => Err(e.into()),
    }
}

/// `flowgate campaign …`: one call to the running server's API, printed.
async fn campaign(
    config: Option<&Path>,
    url: Option<&str>,
    command: CampaignCommand,
) -> anyhow::Result<ExitCode> {
    let client = match campaign::Client::new(config, url) {
        Ok(client) => client,
        Err(campaign::ClientError::Config(diags)) => {
            eprint!("{}", diags.render(color(&std::io::stderr())));
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => return Err(e.into()),
    };
    match command {
        CampaignCommand::List => print!("{}", campaign::list_table(&client.list().await?)),
        CampaignCommand::Create { file } => {
            let created = client.create(&file).await?;
            println!(
                "created campaign {}",
                created["name"].as_str().unwrap_or("?")
            );
            if let Some(warnings) = created["warnings"]["rendered"].as_str()
                && created["warnings"]["items"]
                    .as_array()
                    .is_some_and(|w| !w.is_empty())
            {
                eprint!("{warnings}");
            }
        }
        CampaignCommand::Pause { name } => {
            client.control(&name, "pause").await?;
            println!("paused campaign {name}");
        }
        CampaignCommand::Resume { name } => {
            client.control(&name, "resume").await?;
            println!("resumed campaign {name}");
        }
        CampaignCommand::Cancel { name } => {
            let done = client.control(&name, "cancel").await?;
            println!("cancelled run {} of campaign {name}", done["cancelled_run"]);
        }
        CampaignCommand::RunNow { name, detach } => run_now(&client, &name, detach).await?,
        CampaignCommand::Report { name, run } => {
            print!(
                "{}",
                campaign::report_table(&client.report(&name, run).await?)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `flowgate campaign run-now`: starts the run, then (unless `detach`) a progress bar
/// until it is over, and its report.
async fn run_now(client: &campaign::Client, name: &str, detach: bool) -> anyhow::Result<()> {
    let now = flowgate::clock::Clock::now(&SystemClock);
    let key = format!(
        "cli-{}-{}",
        std::process::id(),
        now.timestamp_nanos_opt().unwrap_or(0)
    );
    let started = client.run_now(name, &key).await?;
    let run = started["run"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("the server answered no run id: {started}"))?;
    println!(
        "started run {run} of campaign {name}: {} recipients",
        started["recipients"]
    );
    if detach {
        return Ok(());
    }
    let bar = indicatif::ProgressBar::new(started["recipients"].as_u64().unwrap_or(0));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
            .expect("a valid progress template"),
    );
    let every = std::time::Duration::from_millis(500);
    let report = client
        .follow(name, run, every, |r| {
            bar.set_length(r.report.measures.planned.max(0) as u64);
            bar.set_position(r.decided());
            bar.set_message(r.progress_line());
        })
        .await?;
    bar.finish();
    print!("{}", campaign::report_table(&report));
    Ok(())
}

/// The terminal chat: reads lines until end of input or `/quit`, printing what each did.
async fn chat(
    config: Option<&Path>,
    from: &str,
    at: Option<chrono::DateTime<chrono::Utc>>,
) -> anyhow::Result<ExitCode> {
    let Some(loaded) = load(config) else {
        return Ok(ExitCode::FAILURE);
    };
    let chat = match at {
        Some(at) => Chat::start_at(&loaded, from, at).await?,
        None => Chat::start(&loaded, from).await?,
    };
    print!("{}", chat.greeting());
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        print!("you> ");
        std::io::stdout().flush()?;
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        match chat.input(&line).await? {
            Reply::Print(text) => print!("{text}"),
            Reply::Quit => break,
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `flowgate serve`: the banner, then the server until Ctrl-C or SIGTERM.
async fn serve(config: Option<&Path>, watch: bool) -> anyhow::Result<ExitCode> {
    let Some(loaded) = load(config) else {
        return Ok(ExitCode::FAILURE);
    };
    let application = Application::build(
        &loaded,
        &loaded.config.database,
        &loaded.config.listen,
        Arc::new(SystemClock),
    )
    .await?;
    let addr = application.local_addr();
    let flows: Vec<String> = loaded.project.flows.iter().map(|f| f.id.clone()).collect();
    println!(
        "flowgate serving {} flow(s) [{}] on http://{addr}",
        flows.len(),
        flows.join(", ")
    );
    println!(
        "  database: {}",
        flowgate::store::redact_url(&loaded.config.database)
    );
    println!("  health:   curl http://{addr}/healthz");
    if loaded.config.admin.token.is_some() {
        println!("  console:  http://{addr}/ (sign in with admin.token)");
    } else {
        println!("  console:  off; set admin.token in the config to sign in at http://{addr}/");
    }
    let doors = application.doors();
    let auth = match &doors.sandbox {
        Door::Open => Some(String::new()),
        Door::Bearer { key, .. } => Some(format!(" -H 'authorization: Bearer <{key}>'")),
        Door::Closed { .. } => None,
    };
    if let Some(auth) = auth {
        println!(
            "  try it:   curl -s http://{addr}/sandbox/messages{auth} -H 'content-type: application/json' -d '{{\"from\":\"15550001234\",\"text\":\"menu\"}}'"
        );
    }
    for door in doors.describe() {
        println!("  {door}");
        tracing::info!("{door}");
    }
    println!(
        "  reload:   kill -HUP {}{}",
        std::process::id(),
        if watch {
            " (and on file changes: --watch)"
        } else {
            ""
        }
    );
    println!("  stop:     Ctrl-C");
    let reloads = reloads(&application, watch);
    application.run_until(shutdown_signal()).await?;
    reloads.abort();
    println!("flowgate stopped");
    Ok(ExitCode::SUCCESS)
}

/// Live reload in the background: on `SIGHUP` (unix), and on file changes with `--watch`.
fn reloads(application: &Application, watch: bool) -> tokio::task::JoinHandle<()> {
    let (runtime, config) = (application.runtime.clone(), application.config.clone());
    let campaigns = application.campaigns.clone();
    #[cfg(unix)]
    let hangups = reload::on_sighup(runtime.clone(), config.clone(), campaigns.clone());
    #[cfg(not(unix))]
    let hangups = std::future::pending::<()>();
    tokio::spawn(async move {
        let watching = async {
            if watch {
                reload::watch(
                    runtime,
                    config,
                    campaigns,
                    std::time::Duration::from_secs(1),
                )
                .await
            } else {
                std::future::pending().await
            }
        };
        tokio::join!(hangups, watching);
    })
}

/// Ctrl-C or SIGTERM (what a service manager sends).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler installs");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
