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
    }
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
        println!("bot> {}", describe_content(&m.message.content));
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
