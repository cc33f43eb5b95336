//! `lumenflow-agent new pack NAME [--lang node]`: scaffolds a pack that validates, passes
//! conformance and runs under `start` as written.

use super::exit;
use crate::cli::Lang;
use crate::config::AgentConfig;
use crate::workspace::Workspace;
use lumenflow_pack_sdk::kind::is_kebab_slug;
use std::path::Path;

/// The Node helper, copied into each new pack so the pack folder stands alone.
pub const NODE_HELPER: &str = include_str!("../../packs/node/lumenflow-pack.mjs");

pub fn run(workspace: Option<&Path>, name: &str, lang: Lang) -> anyhow::Result<u8> {
    if !is_kebab_slug(name) || lumenflow_pack_sdk::RESERVED_NAMESPACES.contains(&name) {
        anyhow::bail!("pack name \"{name}\" must be lowercase kebab-case (^[a-z0-9]+(-[a-z0-9]+)*$, at most 64 characters), and not \"conductor\" or \"agent\"");
    }
    if lang == Lang::Rust {
        anyhow::bail!("--lang rust is not available yet: write a native Rust pack with lumenflow_pack_sdk::NativePack and register it with lumenflow_agent::agent::Agent::register (see README), or use --lang node");
    }
    let ws = Workspace::locate(workspace)?;
    let cfg = AgentConfig::load(&ws.name(), &ws.config_file())?;
    let dir = ws.root.join(&cfg.packs_dir).join(name);
    if dir.exists() {
        anyhow::bail!(
            "{} already exists; choose another name or remove it",
            ws.display(&dir)
        );
    }
    std::fs::create_dir_all(dir.join("conformance"))?;
    let manifest = serde_json::json!({
        "id": name,
        "slug": name,
        "version": "0.1.0",
        "task_types": [],
        "tools": [],
        "policies": [],
        "evidence_types": [],
        "state_aliases": {},
        "lane_templates": [],
        "emitted_event_kinds": [format!("{name}:job_completed")],
        "subscribed_event_kinds": ["conductor:recovery_requested"],
        "required_approvals": [],
        "surfaces_required": ["http"],
        "backpressure_policy": {format!("{name}:job_completed"): "queue"},
        "runtime": {"command": ["node", "handler.mjs"]}
    });
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)? + "\n",
    )?;
    std::fs::write(dir.join("lumenflow-pack.mjs"), NODE_HELPER)?;
    std::fs::write(dir.join("handler.mjs"), HANDLER.replace("{{NAME}}", name))?;
    std::fs::write(
        dir.join("conformance/conductor_recovery_requested.json"),
        format!("{{\"payload\": {{\"wu_id\": \"{name}-job-1\"}}}}\n"),
    )?;
    let shown = ws.display(&dir);
    println!("created {shown}/");
    println!("  manifest.json      emits {name}:job_completed (queue), handles conductor:recovery_requested");
    println!("  handler.mjs        the handler (edit me)");
    println!("  lumenflow-pack.mjs the Node helper (protocol; no dependencies)");
    println!("  conformance/       the sample event the conformance harness delivers");
    println!();
    println!("next:");
    println!("  lumenflow-agent validate");
    println!("  lumenflow-agent conformance {shown}");
    println!("  lumenflow-agent start");
    Ok(exit::OK)
}

const HANDLER: &str = r#"// {{NAME}}: handles conductor:recovery_requested for its own jobs ({{NAME}}-job-*) and
// emits {{NAME}}:job_completed. Run `lumenflow-agent conformance .` in this folder after edits.

import { runPack } from './lumenflow-pack.mjs';

export const onRecoveryRequested = async (event, ctx) => {
  const replayKey = `{{NAME}}:recover:${event.event_id}`;

  // At-least-once delivery: the same event may come twice. Check before the effect...
  if (await ctx.replayLog.has(replayKey)) {
    return { status: 'replayed', action: 'noop' };
  }

  const jobId = String(event.payload?.wu_id ?? '');
  if (!jobId.startsWith('{{NAME}}-job-')) {
    return { status: 'ignored', action: 'wrong-pack' };
  }

  // The effect. The idempotency key makes a retry produce the same event_id.
  await ctx.emit('{{NAME}}:job_completed', { job_id: jobId, result: 'recovered' }, { idempotencyKey: `${jobId}:completed` });

  // ...and record it after.
  await ctx.replayLog.put(replayKey);
  return { status: 'handled', action: 'recovered' };
};

runPack({
  handlers: {
    'conductor:recovery_requested': onRecoveryRequested,
  },
});
"#;
