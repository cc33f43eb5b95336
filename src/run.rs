//! The CLI edge: parse arguments, set up logging, dispatch, map errors to exit codes. Shared
//! by the `lumenflow-agent` binary and any program that embeds the agent with native packs.

use crate::cli::{Cli, Command, LogFormat, StartArgs};
use crate::commands::{self, exit};
use clap::Parser;
use lumenflow_pack_sdk::NativePack;
use std::process::ExitCode;

/// Is this panic `println!` failing on a closed stdout (EPIPE)?
fn is_closed_stdout(msg: &str) -> bool {
    msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe")
}

/// Is this error, anywhere in its chain, a write to a closed pipe?
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `start --log-file`: the rotating file the log goes to, or why it cannot be opened.
fn log_file(cli: &Cli) -> Result<Option<crate::service::RotatingFile>, anyhow::Error> {
    match &cli.command {
        Command::Start(StartArgs {
            log_file: Some(path),
            log_max_mb,
            log_keep,
            ..
        }) => {
            crate::service::RotatingFile::open(path, log_max_mb.saturating_mul(1 << 20), *log_keep)
                .map(Some)
        }
        _ => Ok(None),
    }
}

fn init_logging(
    cli: &Cli,
    quiet_on_closed_stdout: bool,
    file: Option<crate::service::RotatingFile>,
) {
    use tracing_subscriber::EnvFilter;
    let filter = match &cli.log_level {
        Some(level) => EnvFilter::try_new(level),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new("info")),
    }
    .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = file.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    match (cli.log_format, file) {
        (LogFormat::Json, Some(f)) => builder.with_writer(f).json().init(),
        (LogFormat::Text, Some(f)) => builder.with_writer(f).with_target(false).init(),
        (LogFormat::Json, None) => builder.with_writer(std::io::stderr).json().init(),
        (LogFormat::Text, None) => builder
            .with_writer(std::io::stderr)
            .with_target(false)
            .init(),
    }
    // A panic in a handler is caught and reported by its pack host; route the default report
    // through the log so it carries the same format and context as everything else.
    std::panic::set_hook(Box::new(move |info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        if quiet_on_closed_stdout && is_closed_stdout(&msg) {
            std::process::exit(0);
        }
        tracing::error!(%location, "panic: {msg}");
    }));
}

/// Runs the CLI with these native packs registered (for `start`).
pub fn cli_main(native: Vec<NativePack>) -> ExitCode {
    let cli = Cli::parse();
    // A command whose output goes to a pipe that closed (`| head`) ends quietly with 0, as
    // git and ripgrep do. Not the agent itself: it never prints its work to stdout.
    let quiet_on_closed_stdout = !matches!(
        cli.command,
        Command::Start(_)
            | Command::Conductor {
                action: crate::cli::ConductorAction::Serve { .. }
            }
    );
    let file = match log_file(&cli) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(exit::USAGE);
        }
    };
    init_logging(&cli, quiet_on_closed_stdout, file);
    let ws = cli.workspace.as_deref();
    let result = match &cli.command {
        Command::Validate { pack_dir } => commands::validate::run(ws, pack_dir.as_deref()),
        Command::Start(args) => commands::start::run(ws, native, args),
        Command::Top { interval, once } => commands::top::run(ws, *interval, *once),
        Command::Tap {
            pattern,
            pack,
            json,
            limit,
        } => commands::tap::run(ws, pattern.as_deref(), pack.as_deref(), *json, *limit),
        Command::Graph { format, output } => commands::graph::run(ws, *format, output.as_deref()),
        Command::Stop { timeout } => commands::stop::run(ws, *timeout),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            // Into a buffer first: clap_complete panics when its writer fails (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "lumenflow-agent", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script)
                .map(|_| exit::OK)
                .map_err(anyhow::Error::from)
        }
        Command::Version => {
            println!(
                "lumenflow-agent {} (worker protocol {}, state schema {})",
                env!("CARGO_PKG_VERSION"),
                lumenflow_actors::exec_worker::PROTOCOL_VERSION,
                lumenflow_actors::schema::SCHEMA_VERSION
            );
            Ok(exit::OK)
        }
        Command::Status { json } => commands::status::run(ws, *json),
        Command::Emit {
            kind,
            payload,
            idempotency_key,
            inbound,
        } => commands::emit::run(ws, kind, payload, idempotency_key.as_deref(), *inbound),
        Command::Inbox { json, limit } => commands::inbox::run(ws, *json, *limit),
        Command::Conformance { pack_dir } => commands::conformance::run(pack_dir),
        Command::Dlq { action } => commands::dlq::run(ws, action),
        Command::Approvals { action } => commands::approvals::run(ws, action),
        Command::Conductor { action } => commands::conductor::run(action),
        Command::Enroll {
            endpoint,
            token_env,
            token_file,
            subject,
        } => commands::enroll::run(
            ws,
            endpoint,
            token_env.as_deref(),
            token_file.as_deref(),
            subject.as_deref(),
        ),
        Command::New {
            what: crate::cli::NewWhat::Pack { name, lang },
        } => commands::new_pack::run(ws, name, *lang),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) if quiet_on_closed_stdout && is_broken_pipe(&e) => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit::USAGE)
        }
    }
}
