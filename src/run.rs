//! The CLI edge: parse arguments, set up logging, dispatch, map errors to exit codes. Shared
//! by the `lumenflow-agent` binary and any program that embeds the agent with native packs.

use crate::cli::{Cli, Command, LogFormat};
use crate::commands::{self, exit};
use clap::Parser;
use lumenflow_pack_sdk::NativePack;
use std::process::ExitCode;

fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let filter = match &cli.log_level {
        Some(level) => EnvFilter::try_new(level),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new("info")),
    }
    .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
    // A panic in a handler is caught and reported by its pack host; route the default report
    // through the log so it carries the same format and context as everything else.
    std::panic::set_hook(Box::new(|info| {
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
        tracing::error!(%location, "panic: {msg}");
    }));
}

/// Runs the CLI with these native packs registered (for `start`).
pub fn cli_main(native: Vec<NativePack>) -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    let ws = cli.workspace.as_deref();
    let result = match &cli.command {
        Command::Validate { pack_dir } => commands::validate::run(ws, pack_dir.as_deref()),
        Command::Start => commands::start::run(ws, native),
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
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit::USAGE)
        }
    }
}
