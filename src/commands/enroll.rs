//! `lumenflow-agent enroll --endpoint URL --token-env VAR | --token-file F [--subject S]`:
//! writes `.lumenflow/state/conductor/enrollment.json` (mode 0600) for conductor mode. The
//! token is never printed.

use super::exit;
use crate::config::{check_upstream, AgentConfig};
use crate::enrollment::Enrollment;
use crate::workspace::Workspace;
use std::path::Path;

pub fn run(
    workspace: Option<&Path>,
    endpoint: &str,
    token_env: Option<&str>,
    token_file: Option<&Path>,
    subject: Option<&str>,
) -> anyhow::Result<u8> {
    let ws = Workspace::locate(workspace)?;
    let endpoint = endpoint.trim_end_matches('/').to_string();
    if endpoint == "mem:inbox" {
        anyhow::bail!("--endpoint must be the control plane's URL (mem:inbox needs no enrollment)");
    }
    check_upstream(&endpoint).map_err(|e| anyhow::anyhow!("--endpoint {e}"))?;
    let token = match (token_env, token_file) {
        (Some(var), _) => {
            let valid = !var.is_empty()
                && var.as_bytes()[0].is_ascii_uppercase()
                && var
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
            if !valid {
                anyhow::bail!("--token-env {var}: a variable name must match ^[A-Z][A-Z0-9_]*$");
            }
            std::env::var(var)
                .map_err(|_| anyhow::anyhow!("--token-env {var}: the variable is not set"))?
        }
        (None, Some(f)) => std::fs::read_to_string(f)
            .map_err(|e| anyhow::anyhow!("--token-file {}: {e}", f.display()))?
            .trim()
            .to_string(),
        (None, None) => anyhow::bail!("give --token-env VAR or --token-file FILE"),
    };
    if token.is_empty() {
        anyhow::bail!("the token is empty");
    }
    let subject = match subject {
        Some(s) => s.to_string(),
        None => AgentConfig::for_workspace(&ws)?.0.identity,
    };
    let e = Enrollment {
        endpoint: endpoint.clone(),
        token,
        subject: subject.clone(),
    };
    e.write(&ws)?;
    println!(
        "enrolled: {} as \"{subject}\" ({}, mode 0600); restart the agent to connect",
        endpoint,
        ws.display(&ws.enrollment_file())
    );
    Ok(exit::OK)
}
