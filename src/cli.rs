//! Command-line interface (SPEC §12). Exit codes: 0 ok, 1 validation/conformance failure,
//! 2 usage or environment error, 3 not running.

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "lumenflow-agent",
    version,
    about = "Hosts LumenFlow packs in one workspace: routes their events, keeps them durable, restarts what crashes",
    after_help = "Exit codes: 0 ok, 1 validation or conformance failure, 2 usage or environment error, 3 agent not running."
)]
pub struct Cli {
    /// Workspace folder (the one containing .lumenflow/); default: search upward from here.
    #[arg(long, global = true, value_name = "DIR")]
    pub workspace: Option<PathBuf>,
    /// Log level or filter (overrides RUST_LOG), e.g. info, debug, lumenflow_actors=trace.
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GraphFormat {
    Dot,
    Svg,
    Png,
}

#[derive(Debug, Clone, Default, clap::Args)]
pub struct StartArgs {
    /// Write this file (PID and API URL) once the agent is ready; removed when it stops.
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
    /// Log to this file instead of stderr, rotated by size (leave it out under systemd: the
    /// journal keeps stderr).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Rotate the log file past this many megabytes.
    #[arg(long, default_value_t = 10, value_name = "MB", requires = "log_file")]
    pub log_max_mb: u64,
    /// Old log files to keep (F.1 ... F.N).
    #[arg(long, default_value_t = 3, value_name = "N", requires = "log_file")]
    pub log_keep: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    /// TypeScript: the quickstart's layout (package.json, src/, vitest tests), run with tsx.
    Ts,
    /// Plain JavaScript (ESM), no install step.
    Node,
    /// A Rust program (cargo).
    Rust,
    /// Python 3, dependency-free (unittest tests).
    Python,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent in the foreground (one per workspace); SIGINT/SIGTERM drain and exit 0.
    #[command(
        after_long_help = "Readiness: with NOTIFY_SOCKET set (systemd Type=notify) the agent sends READY=1 once its packs are started and its API answers, and STOPPING=1 when it stops; --ready-file writes a file at the same moment and removes it on exit.\n\nExamples:\n  lumenflow-agent start\n  lumenflow-agent start --ready-file /run/user/1000/lumenflow.ready --log-file .lumenflow/state/agent/agent.log"
    )]
    Start(StartArgs),
    /// A live view of every pack: state, events/s in and out, in flight, restarts, dead
    /// letters; the queue and the upstream. Keys: s sort, / filter, q quit.
    #[command(
        after_long_help = "Keys: q or Esc quit; s next sort column; r reverse; / filter by pack id (Enter applies, Esc clears); p pause.\n\nExample:\n  lumenflow-agent top --interval 500"
    )]
    Top {
        /// Refresh interval in milliseconds (at most 1000 is useful: rates are per refresh).
        #[arg(long, default_value_t = 1000, value_name = "MS")]
        interval: u64,
        /// Print one frame as text and exit (for scripts and terminals without a TUI).
        #[arg(long)]
        once: bool,
    },
    /// Stream events live as the agent accepts, delivers, emits and dead-letters them. A tap
    /// that cannot keep up loses events and says how many; the agent never waits for it.
    #[command(
        after_long_help = "Examples:\n  lumenflow-agent tap\n  lumenflow-agent tap 'acme-demo:*' --json | jq .\n  lumenflow-agent tap --pack hello --limit 10"
    )]
    Tap {
        /// Only kinds matching this pattern (`*` matches any run of characters), e.g. demo.* or agent:*.
        #[arg(value_name = "KIND-PATTERN")]
        pattern: Option<String>,
        /// Only what this pack emits, is delivered or dead-letters.
        #[arg(long, value_name = "ID")]
        pack: Option<String>,
        /// Print JSON lines (one object an event; a loss is {"lost": n}).
        #[arg(long)]
        json: bool,
        /// Stop after this many events.
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
    },
    /// Print the routing table (packs, kinds, subscriptions, upstream, delivery classes) as
    /// Graphviz DOT, or render it with `dot`.
    #[command(
        after_long_help = "Examples:\n  lumenflow-agent graph | dot -Tsvg > routes.svg\n  lumenflow-agent graph --format png --output routes.png"
    )]
    Graph {
        /// dot prints the DOT text; svg and png run Graphviz's `dot` (it must be installed).
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
        /// Write here instead of stdout.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Stop the running agent (SIGTERM) and wait until it has exited: 0 once stopped, 3 when
    /// none runs, 1 if it still runs after --timeout.
    #[command(after_long_help = "Example:\n  lumenflow-agent stop --timeout 60")]
    Stop {
        /// Seconds to wait for the events in flight to finish.
        #[arg(long, default_value_t = 30, value_name = "SECONDS")]
        timeout: u64,
    },
    /// Print the agent's version, its worker protocol and state-database schema versions.
    #[command(after_long_help = "Example:\n  lumenflow-agent version")]
    Version,
    /// Print a shell completion script.
    #[command(
        after_long_help = "Examples:\n  lumenflow-agent completions bash > ~/.local/share/bash-completion/completions/lumenflow-agent\n  lumenflow-agent completions zsh > ~/.zfunc/_lumenflow-agent\n  lumenflow-agent completions fish > ~/.config/fish/completions/lumenflow-agent.fish"
    )]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Show the running agent's state; when none runs, say so (exit 3) and show the durable state.
    #[command(
        after_long_help = "Examples:\n  lumenflow-agent status\n  lumenflow-agent status --json | jq '.packs[] | {id, state, handled}'"
    )]
    Status {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Validate pack manifests (all packs of the workspace, or one pack folder); exit 1 on errors.
    #[command(
        after_long_help = "Examples:\n  lumenflow-agent validate\n  lumenflow-agent validate packs/hello"
    )]
    Validate {
        /// A pack folder; default: every pack under the workspace's packs root.
        pack_dir: Option<PathBuf>,
    },
    /// Emit an event through the running agent; prints the event_id.
    #[command(
        after_long_help = "Examples:\n  lumenflow-agent emit acme-demo:job_completed --payload '{\"wu_id\":\"acme-job-1\"}' --idempotency-key acme-job-1\n  lumenflow-agent emit conductor:recovery_requested --inbound --payload '{\"wu_id\":\"acme-job-1\"}'"
    )]
    Emit {
        /// Event kind, e.g. acme-demo:job_completed (the pack is the one whose slug prefixes it).
        kind: String,
        /// Payload, a JSON object.
        #[arg(long, default_value = "{}")]
        payload: String,
        /// Makes the event_id deterministic (UUIDv5 over from, kind and key).
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Inject as if it came from the upstream (e.g. a conductor:* event).
        #[arg(long)]
        inbound: bool,
    },
    /// Scaffold things.
    New {
        #[command(subcommand)]
        what: NewWhat,
    },
    /// Run the emit + replay conformance harness against a pack folder.
    #[command(after_long_help = "Example:\n  lumenflow-agent conformance packs/hello")]
    Conformance {
        /// The pack folder (with its manifest), e.g. packs/hello.
        pack_dir: PathBuf,
    },
    /// Show what reached the embedded mem:inbox upstream.
    #[command(
        after_long_help = "Examples:\n  lumenflow-agent inbox\n  lumenflow-agent inbox --json --limit 10"
    )]
    Inbox {
        /// Print JSON: an array of the events, each with its seq and when it arrived.
        #[arg(long)]
        json: bool,
        /// Show at most this many of the newest events.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Manage dead letters.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Decide on held events (kinds in a pack's required_approvals) and other approvals.
    Approvals {
        #[command(subcommand)]
        action: ApprovalsAction,
    },
    /// Write .lumenflow/state/conductor/enrollment.json (mode 0600) for conductor mode.
    #[command(
        after_long_help = "Example:\n  LUMENFLOW_TOKEN=... lumenflow-agent enroll --endpoint https://cp.example.com --token-env LUMENFLOW_TOKEN"
    )]
    Enroll {
        /// The control plane's URL, e.g. https://cp.lumenflow.dev.
        #[arg(long)]
        endpoint: String,
        /// Name of the environment variable holding the token.
        #[arg(
            long,
            required_unless_present = "token_file",
            conflicts_with = "token_file"
        )]
        token_env: Option<String>,
        /// A file holding the token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Workspace identity at the conductor (default: the configured identity).
        #[arg(long)]
        subject: Option<String>,
    },
    /// The development control plane.
    Conductor {
        #[command(subcommand)]
        action: ConductorAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum NewWhat {
    /// Scaffold a pack that passes validate and conformance as written.
    #[command(
        after_long_help = "Examples:\n  lumenflow-agent new pack hello\n  lumenflow-agent new pack billing --lang ts"
    )]
    Pack {
        /// The pack's id and folder name under the packs root (kebab-case, e.g. hello or
        /// billing-sync); also its kinds' prefix.
        name: String,
        /// The handler's language.
        #[arg(long, value_enum, default_value_t = Lang::Node)]
        lang: Lang,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// List dead letters.
    #[command(
        after_long_help = "Examples:\n  lumenflow-agent dlq list\n  lumenflow-agent dlq list --json | jq '.[0].error'"
    )]
    List {
        /// Print JSON (an array of dead letters, with their events and errors).
        #[arg(long)]
        json: bool,
    },
    /// Deliver dead letters again.
    #[command(
        after_long_help = "Examples:\n  lumenflow-agent dlq retry 12\n  lumenflow-agent dlq retry --all"
    )]
    Retry {
        /// Dead-letter id.
        id: Option<i64>,
        /// Every dead letter.
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Delete dead letters for good (all of them, or one); asks first unless --yes.
    #[command(
        after_long_help = "Examples:\n  lumenflow-agent dlq purge 12 --yes\n  lumenflow-agent dlq purge --yes   # all of them"
    )]
    Purge {
        /// Dead-letter id (default: every dead letter).
        id: Option<i64>,
        /// Do not ask (needed when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsAction {
    /// List pending approvals (with --all: every approval and its decision).
    #[command(
        after_long_help = "Examples:\n  lumenflow-agent approvals list\n  lumenflow-agent approvals list --all --json"
    )]
    List {
        /// Every approval, decided ones too, with who decided, when and why (the audit trail).
        #[arg(long)]
        all: bool,
        /// Print JSON: ApprovalRecords; a held event's has `held_event` {event_id, kind, pack,
        /// state: held | released | withheld | expiring, deadline, on_expiry}.
        #[arg(long)]
        json: bool,
    },
    /// Approve: the held event is delivered (once).
    #[command(
        after_long_help = "Example:\n  lumenflow-agent approvals approve 01a2 --reason \"checked the number\""
    )]
    Approve {
        /// Approval id (or a unique prefix of at least 4 characters, or the held event's id).
        id: String,
        /// Why (kept with the decision).
        #[arg(long)]
        reason: Option<String>,
        /// Who decides (default: your user name).
        #[arg(long = "as", value_name = "NAME")]
        reviewer: Option<String>,
    },
    /// Deny: the held event is never delivered; it is kept with the decision.
    #[command(
        after_long_help = "Example:\n  lumenflow-agent approvals deny 01a2 --reason \"not a customer number\""
    )]
    Deny {
        /// Approval id (or a unique prefix of at least 4 characters, or the held event's id).
        id: String,
        /// Why (kept with the decision).
        #[arg(long)]
        reason: String,
        /// Who decides (default: your user name).
        #[arg(long = "as", value_name = "NAME")]
        reviewer: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConductorAction {
    /// Serve the development control plane on loopback.
    #[command(
        after_long_help = "Example:\n  lumenflow-agent conductor serve --listen 127.0.0.1:8787 --token dev-token --db /tmp/conductor.db"
    )]
    Serve {
        /// Address to listen on (loopback: it is a development tool).
        #[arg(long, default_value = "127.0.0.1:8787")]
        listen: String,
        /// Bearer token clients must send (default: $LUMENFLOW_CONTROL_PLANE_TOKEN, else dev-token).
        #[arg(long)]
        token: Option<String>,
        /// Where received and published events are kept.
        #[arg(long, default_value = "conductor.db")]
        db: PathBuf,
    },
    /// Publish an inbound event to a workspace through a development conductor.
    #[command(
        after_long_help = "Example:\n  lumenflow-agent conductor publish conductor:recovery_requested --workspace-id ws-1 --payload '{\"wu_id\":\"acme-job-1\"}'"
    )]
    Publish {
        /// Event kind, e.g. conductor:recovery_requested.
        kind: String,
        /// Payload, a JSON object.
        #[arg(long, default_value = "{}")]
        payload: String,
        /// The workspace identity (its enrollment subject).
        #[arg(long)]
        workspace_id: String,
        /// The development conductor's URL.
        #[arg(long, default_value = "http://127.0.0.1:8787")]
        url: String,
        /// Bearer token (default: $LUMENFLOW_CONTROL_PLANE_TOKEN, else dev-token).
        #[arg(long)]
        token: Option<String>,
        /// Fixed event id (to publish the same event twice).
        #[arg(long)]
        event_id: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}

#[cfg(test)]
mod help_tests {
    use super::Cli;
    use clap::CommandFactory;

    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if a.is_hide_set() || id == "help" || id == "version" {
                continue;
            }
            if a.get_help().is_none() && a.get_long_help().is_none() {
                missing.push(format!("{path} {id}"));
            }
        }
        for s in cmd.get_subcommands() {
            if s.get_name() == "help" {
                continue;
            }
            if s.get_about().is_none() {
                missing.push(format!("{path} {} (what the command does)", s.get_name()));
            }
            let leaf = s.get_subcommands().all(|c| c.get_name() == "help");
            let example = s
                .get_after_long_help()
                .is_some_and(|h| h.to_string().contains("Example"));
            if leaf && !example {
                missing.push(format!("{path} {} (an example)", s.get_name()));
            }
            walk(s, &format!("{path} {}", s.get_name()), missing);
        }
    }

    /// `--help` explains every command, argument and flag (blank lines were what a new user
    /// found for `new pack <NAME>`, `--lang`, `conformance <PACK_DIR>`, `--json` and others),
    /// and `--help` of every command shows an example.
    #[test]
    fn every_command_argument_and_flag_has_help() {
        let mut missing = Vec::new();
        walk(&Cli::command(), "lumenflow-agent", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }
}
