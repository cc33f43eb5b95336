//! `lumenflow-agent start`: runs the agent in the foreground.

use super::exit;
use crate::agent::Agent;
use crate::cli::StartArgs;
use crate::config::AgentConfig;
use crate::workspace::Workspace;
use lumenflow_pack_sdk::NativePack;
use std::path::Path;
use std::time::Duration;

pub fn run(
    workspace: Option<&Path>,
    native: Vec<NativePack>,
    args: &StartArgs,
) -> anyhow::Result<u8> {
    let ws = Workspace::locate(workspace)?;
    let (cfg, _) = AgentConfig::for_workspace(&ws)?;
    let mut agent = Agent::new(ws, cfg).ready_file(args.ready_file.clone());
    for p in native {
        agent = agent.register(p);
    }
    // For tests and benchmarks: a shorter restart backoff than the production 1 s.
    if let Some(ms) = std::env::var("LUMENFLOW_AGENT_BACKOFF_BASE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        agent = agent.backoff_base(Duration::from_millis(ms));
    }
    agent.run()?;
    Ok(exit::OK)
}
