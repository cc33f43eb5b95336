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
        "enrolled: {} as \"{subject}\" ({}, mode 0600); {}",
        endpoint,
        ws.display(&ws.enrollment_file()),
        what_happens_next(&ws, &endpoint)
    );
    Ok(exit::OK)
}

/// What the running agent (if any) does with the new enrollment, as it is: an agent already
/// connected through an enrollment to this endpoint reads the new token when the control plane
/// refuses the one it has (within a few seconds); any other change (a new endpoint, a first
/// enrollment) takes a restart.
fn what_happens_next(ws: &crate::workspace::Workspace, endpoint: &str) -> String {
    let status = crate::client::ApiClient::connect(ws).and_then(|c| c.get("/v1/status", ws));
    match status {
        Ok(r) if r.status == 200 => {
            let up = &r.body["upstream"];
            let same = up["source"] == "enrollment"
                && up["endpoint"].as_str().map(|e| e.trim_end_matches('/'))
                    == Some(endpoint.trim_end_matches('/'));
            if same {
                "the running agent keeps its connection and reads the new token when the control plane refuses the old one (no restart needed)".into()
            } else {
                format!(
                    "the running agent (pid {}) still uses {}: restart it to connect (lumenflow-agent stop && lumenflow-agent start)",
                    r.body["agent"]["pid"],
                    up["endpoint"].as_str().unwrap_or("its upstream")
                )
            }
        }
        _ => "the agent connects to it when it starts (lumenflow-agent start)".into(),
    }
}
