//! The `flowgate` command line: a thin shell over the library (see `flowgate::app`).

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use flowgate::app::{self, Application, Loaded};
use flowgate::clock::{Clock, SystemClock, VirtualClock};
use flowgate::conversation::{self, describe_content};
use flowgate::diagnostic::Diagnostics;
use flowgate::domain::{HumanDuration, Inbound, InboundContent, format_duration};
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
    /// Run the server: migrations, flows, timers and the HTTP endpoints.
    Serve,
    /// Validate config, flows, scripts and templates; exit 1 on any error.
    Check,
    /// Talk to the flows in the terminal as a customer, on a virtual clock.
    Chat {
        /// The customer's number.
        #[arg(long, default_value = "15550001234")]
        from: String,
    },
    /// Run conversation tests (default: tests/conversations and *.test.yaml beside the flows).
    Test { paths: Vec<PathBuf> },
    /// Apply database migrations.
    Migrate,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                let level = if matches!(cli.command, Command::Serve | Command::Migrate) {
                    "info"
                } else {
                    "error"
                };
                tracing_subscriber::EnvFilter::new(level)
            }),
        )
        .with_writer(std::io::stderr)
        .init();
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

fn color() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Loads the project or prints why not.
fn load(config: Option<&std::path::Path>) -> Result<Loaded, ExitCode> {
    match app::load(config) {
        Ok(loaded) => {
            if loaded.project.diagnostics.warnings() > 0 {
                eprint!("{}", loaded.project.diagnostics.render(color()));
            }
            Ok(loaded)
        }
        Err(diags) => {
            eprint!("{}", diags.render(color()));
            Err(ExitCode::FAILURE)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = cli.config.as_deref();
    match cli.command {
        Command::Check => {
            let diags: Diagnostics = match app::load(config) {
                Ok(loaded) => loaded.project.diagnostics,
                Err(diags) => *diags,
            };
            print!(
                "{}",
                diags.render(
                    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
                )
            );
            Ok(if diags.has_errors() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Test { paths } => {
            let loaded = match load(config) {
                Ok(l) => l,
                Err(code) => return Ok(code),
            };
            let files = if paths.is_empty() {
                conversation::default_test_files(&loaded.config)
            } else {
                conversation::test_files(&paths)
            }
            .context("cannot list the test files")?;
            let mut out = String::new();
            let (_, failed) = conversation::run_all(&loaded, &files, &mut out).await;
            print!("{out}");
            Ok(if failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Migrate => {
            let loaded = match load(config) {
                Ok(l) => l,
                Err(code) => return Ok(code),
            };
            let db = Db::connect(&loaded.config.database).await?;
            db.migrate().await?;
            println!("migrated {}", loaded.config.database);
            Ok(ExitCode::SUCCESS)
        }
        Command::Chat { from } => chat(config, &from).await,
        Command::Serve => serve(config).await,
        Command::Templates {
            command: TemplatesCommand::Sync { channel },
        } => templates_sync(config, channel.as_deref()).await,
    }
}

/// `flowgate templates sync`: Meta's templates for the channel's WABA, merged into the
/// registry (`Registry::merge_synced`) and written atomically.
///
/// Reads only the config and the registry, not the flows: a sync is how a project whose
/// flows name templates the file does not have yet gets fixed, so broken flows must not stop
/// it. A registry file with errors does stop it, since merging into a file that did not
/// parse would drop its entries.
async fn templates_sync(
    config_path: Option<&std::path::Path>,
    channel: Option<&str>,
) -> anyhow::Result<ExitCode> {
    use flowgate::config::{Config, Provider};
    use flowgate::templates::{Registry, Status, sync_comment};
    use flowgate::whatsapp::{Client, Endpoint};

    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(diags) => {
            eprint!("{}", diags.render(color()));
            return Ok(ExitCode::FAILURE);
        }
    };
    let config_file = config
        .file
        .as_ref()
        .map(|f| f.display().to_string())
        .unwrap_or_else(|| flowgate::config::DEFAULT_CONFIG_FILE.to_string());
    let chosen = match channel {
        Some(name) => config
            .channels
            .iter()
            .find(|c| c.name == name)
            .with_context(|| format!("there is no channel `{name}` in {config_file}"))?,
        None => config
            .channels
            .iter()
            .find(|c| c.provider == Provider::CloudApi)
            // A dialog360 channel only to say why it cannot be synced.
            .or_else(|| config.channels.iter().find(|c| c.provider != Provider::Sandbox))
            .with_context(|| {
                format!("{config_file} has no cloud_api channel: templates sync reads a WhatsApp Business Account's templates")
            })?,
    };
    match chosen.provider {
        Provider::CloudApi => {}
        Provider::Dialog360 => anyhow::bail!(
            "channel `{}` is a dialog360 channel: templates sync supports cloud_api channels only (360dialog's template list is not read by flowgate); write its templates into {} by hand",
            chosen.name,
            config.templates.display()
        ),
        Provider::Sandbox => anyhow::bail!(
            "channel `{}` is a sandbox channel: it has no templates at Meta; templates sync needs a cloud_api channel",
            chosen.name
        ),
    }
    let waba_id = chosen
        .waba_id
        .as_ref()
        .map(|w| w.0.trim().to_string())
        .filter(|w| !w.is_empty())
        .with_context(|| {
            format!(
                "channel `{}` in {config_file} needs `waba_id` (its WhatsApp Business Account id) for templates sync",
                chosen.name
            )
        })?;
    let endpoint = Endpoint::for_channel(chosen).map_err(anyhow::Error::msg)?;

    let mut diags = Diagnostics::default();
    let current = Registry::load(&config.templates, &mut diags);
    if diags.has_errors() {
        eprint!("{}", diags.render(color()));
        anyhow::bail!(
            "{} has errors: fix them (or move the file away) before syncing into it",
            config.templates.display()
        );
    }

    let list = match Client::new(endpoint).list_templates(&waba_id).await {
        Ok(list) => list,
        Err(e) => {
            let hint = if e.code == 190 {
                format!(
                    " (the access token of channel `{}` was refused: renew `access_token` in {config_file})",
                    chosen.name
                )
            } else {
                String::new()
            };
            anyhow::bail!(
                "templates sync from channel `{}` failed, {} is unchanged: {e}{hint}",
                chosen.name,
                config.templates.display()
            );
        }
    };
    for warning in list.skipped.iter().chain(&list.warnings) {
        eprintln!("warning: {warning}");
    }
    let merge = current.merge_synced(list.templates);
    for duplicate in &merge.duplicates {
        eprintln!("warning: Meta listed template {duplicate} twice: the first one is used");
    }
    for t in &merge.kept {
        eprintln!(
            "warning: Meta does not list template `{}` ({}) for channel `{}`: kept as it was ({})",
            t.name,
            t.language,
            chosen.name,
            t.status.as_str()
        );
    }
    let comment = sync_comment(&chosen.name, &waba_id, SystemClock.now());
    merge.registry.write_atomic(&config.templates, &comment)?;

    let synced: Vec<_> = merge
        .registry
        .templates
        .iter()
        .filter(|t| {
            !merge
                .kept
                .iter()
                .any(|k| k.name == t.name && k.language == t.language)
        })
        .collect();
    // In the registry's order of statuses; one added later counts too, after these.
    let order = [
        Status::Approved,
        Status::Pending,
        Status::Rejected,
        Status::Paused,
        Status::Disabled,
    ];
    let mut counts: Vec<(Status, usize)> = Vec::new();
    for t in &synced {
        match counts.iter_mut().find(|(s, _)| *s == t.status) {
            Some((_, n)) => *n += 1,
            None => counts.push((t.status, 1)),
        }
    }
    counts.sort_by_key(|(s, _)| order.iter().position(|o| o == s).unwrap_or(order.len()));
    let breakdown: Vec<String> = counts
        .iter()
        .map(|(s, n)| format!("{n} {}", s.as_str()))
        .collect();
    let mut summary = format!(
        "synced {} template{} ({}) from channel {} into {}",
        synced.len(),
        if synced.len() == 1 { "" } else { "s" },
        if breakdown.is_empty() {
            "none".to_string()
        } else {
            breakdown.join(", ")
        },
        chosen.name,
        config.templates.display()
    );
    if !list.skipped.is_empty() {
        summary.push_str(&format!("; {} skipped", list.skipped.len()));
    }
    summary.push_str(&format!(
        "; {} kept that Meta does not list",
        merge.kept.len()
    ));
    println!("{summary}");
    Ok(ExitCode::SUCCESS)
}

/// The terminal chat: a customer on the sandbox channel, with a virtual clock.
async fn chat(config: Option<&std::path::Path>, from: &str) -> anyhow::Result<ExitCode> {
    let loaded = match load(config) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let clock = Arc::new(VirtualClock::new(SystemClock.now()));
    let runtime = loaded.runtime("sqlite::memory:", clock.clone()).await?;
    let flows: Vec<String> = loaded.project.flows.iter().map(|f| f.id.clone()).collect();
    println!(
        "flowgate chat: you are +{from} on the sandbox channel. Flows: {}",
        flows.join(", ")
    );
    println!("Type a message, or /button ID, /list ID, /wait 25h, /state, /reset, /quit.");
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        print!("you> ");
        std::io::stdout().flush()?;
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let input = line.trim();
        if input.is_empty() {
            continue;
        }
        let (command, arg) = input
            .split_once(' ')
            .map(|(c, a)| (c, a.trim()))
            .unwrap_or((input, ""));
        let content = match command {
            "/quit" | "/exit" => break,
            "/button" => InboundContent::ButtonReply {
                id: arg.into(),
                title: arg.into(),
            },
            "/list" => InboundContent::ListReply {
                id: arg.into(),
                title: arg.into(),
            },
            "/wait" => {
                let by: HumanDuration = match arg.parse() {
                    Ok(d) => d,
                    Err(e) => {
                        println!("  {e}");
                        continue;
                    }
                };
                for report in runtime.advance_clock(&clock, clock.now() + by.0).await? {
                    print_report(&report);
                }
                println!(
                    "  [clock] {} later: {}",
                    format_duration(by.0),
                    clock.now().format("%Y-%m-%d %H:%M UTC")
                );
                continue;
            }
            "/state" => {
                let c = runtime
                    .db
                    .load_conversation(&runtime.default_channel, from)
                    .await?;
                match &c.session {
                    Some(s) => println!(
                        "  [state] flow {} (version {}) at step {}: {}",
                        s.flow_id, s.flow_version, s.step, s.state
                    ),
                    None => println!("  [state] no active session"),
                }
                let window = c
                    .contact
                    .last_customer_message_at
                    .map(|t| format_duration(clock.now() - t) + " ago");
                println!(
                    "  [contact] tags {:?}, attrs {:?}, last customer message {}",
                    c.contact.tags,
                    c.contact.attrs,
                    window.unwrap_or_else(|| "never".into())
                );
                let p = &c.contact.policy;
                println!(
                    "  [policy] {}; marketing {}{}",
                    runtime
                        .policy
                        .window(&c.contact, clock.now())
                        .describe(clock.now()),
                    match &p.marketing_opt_out {
                        Some(o) => format!("stopped ({})", o.source),
                        None => "accepted".into(),
                    },
                    match p.free_entry_until {
                        Some(t) if t > clock.now() => format!("; free entry point until {t}"),
                        _ => String::new(),
                    }
                );
                continue;
            }
            "/reset" => {
                runtime
                    .db
                    .reset_conversation(&runtime.default_channel, from)
                    .await?;
                println!("  [reset] session and timers forgotten");
                continue;
            }
            c if c.starts_with('/') => {
                println!(
                    "  unknown command {c}: try /button ID, /list ID, /wait 25h, /state, /reset, /quit"
                );
                continue;
            }
            _ => InboundContent::text(input),
        };
        let now = clock.now();
        let inbound = Inbound::sandbox(content, now, now);
        let report = runtime
            .inbound(&runtime.default_channel, from, Some("You"), inbound)
            .await?;
        print_report(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_report(report: &flowgate::dispatch::TurnReport) {
    for m in &report.sent {
        if m.decision.sends() {
            println!("bot> {}", describe_content(&m.message.content));
        } else {
            println!(
                "bot [{}]> {}",
                m.decision.name(),
                describe_content(&m.message.content)
            );
        }
        println!("  [policy] {}", m.decision.explain());
    }
    if let Some(queue) = &report.handoff {
        println!("  [handoff] the conversation is with a person now (queue {queue})");
    }
    match report.handled {
        flowgate::engine::Handled::Unanswered if report.sent.is_empty() => {
            println!("  [no flow answered this message]")
        }
        flowgate::engine::Handled::InHandoff => {
            println!("  [handoff] a person has this conversation: the bot stays quiet")
        }
        _ => {}
    }
    for note in &report.notes {
        println!("  [note] {note}");
    }
}

/// The server: webhooks arrive in later releases; today the sandbox door and the timers.
async fn serve(config: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    let loaded = match load(config) {
        Ok(l) => l,
        Err(code) => return Ok(code),
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
    println!("  database: {}", loaded.config.database);
    println!("  health:   curl http://{addr}/healthz");
    println!(
        "  try it:   curl -s http://{addr}/sandbox/messages -H 'content-type: application/json' -d '{{\"from\":\"15550001234\",\"text\":\"menu\"}}'"
    );
    println!("  stop:     Ctrl-C");
    application.run_until(shutdown_signal()).await?;
    println!("flowgate stopped");
    Ok(ExitCode::SUCCESS)
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
