use clap::Parser;
use lumenflow_agent::cli::{Cli, Command, LogFormat};
use lumenflow_agent::commands::{self, exit};
use std::process::ExitCode;

fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let filter = match &cli.log_level {
        Some(level) => EnvFilter::try_new(level),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new("info")),
    }
    .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    let ws = cli.workspace.as_deref();
    let result = match &cli.command {
        Command::Validate { pack_dir } => commands::validate::run(ws, pack_dir.as_deref()),
        other => {
            eprintln!("error: `{}` is not implemented yet", command_name(other));
            Ok(exit::USAGE)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit::USAGE)
        }
    }
}

fn command_name(c: &Command) -> &'static str {
    match c {
        Command::Start => "start",
        Command::Status { .. } => "status",
        Command::Validate { .. } => "validate",
        Command::Emit { .. } => "emit",
        Command::New { .. } => "new pack",
        Command::Conformance { .. } => "conformance",
        Command::Inbox { .. } => "inbox",
        Command::Dlq { .. } => "dlq",
        Command::Enroll { .. } => "enroll",
        Command::Conductor { .. } => "conductor serve",
    }
}
