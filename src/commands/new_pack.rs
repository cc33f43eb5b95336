//! `lumenflow-agent new pack NAME [--lang node]`: scaffolds a pack that validates, passes
//! conformance and runs under `start` as written.

use super::exit;
use crate::cli::Lang;
use crate::config::AgentConfig;
use crate::workspace::Workspace;
use lumenflow_pack_sdk::kind::is_kebab_slug;
use std::path::Path;

/// The manifest `new pack` writes (`runtime:` is appended per language).
const MANIFEST: &str =
    "# The pack's manifest: read by lumenflow-agent and by the LumenFlow platform's pack loader.
id: {{NAME}}
version: 0.1.0
task_types: [{{NAME}}]
tools: []
policies: []
# Events: what the pack emits (each with its delivery class) and what its handlers receive.
emitted_event_kinds: [\"{{NAME}}:job_completed\"]
subscribed_event_kinds: [\"conductor:recovery_requested\"]
backpressure_policy:
  \"{{NAME}}:job_completed\": queue
surfaces_required: [http]
";

/// The Node helper, copied into each new pack so the pack folder stands alone.
pub const NODE_HELPER: &str = include_str!("../../packs/node/lumenflow-pack.mjs");
const NODE_HELPER_TYPES: &str = include_str!("../../packs/node/lumenflow-pack.d.mts");
const NODE_TESTING: &str = include_str!("../../packs/node/testing.mjs");
const NODE_TESTING_TYPES: &str = include_str!("../../packs/node/testing.d.mts");

/// The TypeScript scaffold (`packs/templates/ts/`), `{{NAME}}` and `{{CONST}}` replaced.
const TS_TEMPLATE: &[(&str, &str)] = &[
    (
        "package.json",
        include_str!("../../packs/templates/ts/package.json"),
    ),
    (
        "tsconfig.json",
        include_str!("../../packs/templates/ts/tsconfig.json"),
    ),
    (
        "tsconfig.build.json",
        include_str!("../../packs/templates/ts/tsconfig.build.json"),
    ),
    (
        "src/manifest.ts",
        include_str!("../../packs/templates/ts/src/manifest.ts"),
    ),
    (
        "src/emit.ts",
        include_str!("../../packs/templates/ts/src/emit.ts"),
    ),
    (
        "src/handlers/recovery-requested.ts",
        include_str!("../../packs/templates/ts/src/handlers/recovery-requested.ts"),
    ),
    (
        "src/index.ts",
        include_str!("../../packs/templates/ts/src/index.ts"),
    ),
    (
        "src/worker.ts",
        include_str!("../../packs/templates/ts/src/worker.ts"),
    ),
    (
        "__tests__/emit-replay.test.ts",
        include_str!("../../packs/templates/ts/__tests__/emit-replay.test.ts"),
    ),
];

/// The Python scaffold (`packs/templates/python/`) with the helper, its test kit and the
/// event-id vectors vendored, so the folder works wherever it is copied.
const PYTHON_TEMPLATE: &[(&str, &str)] = &[
    (
        "handlers.py",
        include_str!("../../packs/templates/python/handlers.py"),
    ),
    (
        "worker.py",
        include_str!("../../packs/templates/python/worker.py"),
    ),
    (
        "tests/test_emit_replay.py",
        include_str!("../../packs/templates/python/tests/test_emit_replay.py"),
    ),
    (
        "lumenflow_pack.py",
        include_str!("../../packs/python/lumenflow_pack.py"),
    ),
    (
        "lumenflow_testing.py",
        include_str!("../../packs/python/lumenflow_testing.py"),
    ),
    (
        "event-id-vectors.json",
        include_str!("../../packs/event-id-vectors.json"),
    ),
    (".gitignore", "__pycache__/\n"),
];

/// Writes a template's files, `{{NAME}}` and `{{CONST}}` (NAME in SCREAMING_SNAKE) replaced.
fn write_files(dir: &Path, name: &str, files: &[(&str, &str)]) -> anyhow::Result<()> {
    let konst = name.to_ascii_uppercase().replace('-', "_");
    for (rel, text) in files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(
            path,
            text.replace("{{NAME}}", name).replace("{{CONST}}", &konst),
        )?;
    }
    Ok(())
}

/// The quickstart's TypeScript layout, with the helper vendored in `src/lumenflow/` so the
/// folder works wherever it is copied.
fn write_ts_pack(dir: &Path, name: &str) -> anyhow::Result<()> {
    write_files(dir, name, TS_TEMPLATE)?;
    let helper = dir.join("src/lumenflow");
    std::fs::create_dir_all(&helper)?;
    for (file, text) in [
        ("lumenflow-pack.mjs", NODE_HELPER),
        ("lumenflow-pack.d.mts", NODE_HELPER_TYPES),
        ("testing.mjs", NODE_TESTING),
        ("testing.d.mts", NODE_TESTING_TYPES),
    ] {
        std::fs::write(helper.join(file), text)?;
    }
    std::fs::write(dir.join(".gitignore"), "node_modules/\ndist/\n")?;
    Ok(())
}

pub fn run(workspace: Option<&Path>, name: &str, lang: Lang) -> anyhow::Result<u8> {
    if !is_kebab_slug(name) || lumenflow_pack_sdk::RESERVED_NAMESPACES.contains(&name) {
        anyhow::bail!("pack name \"{name}\" must be lowercase kebab-case (^[a-z0-9]+(-[a-z0-9]+)*$, at most 64 characters), and not a reserved namespace (conductor, agent, kernel)");
    }
    let ws = Workspace::locate(workspace)?;
    let (cfg, _) = AgentConfig::for_workspace(&ws)?;
    let dir = ws.root.join(&cfg.packs_dir).join(name);
    if dir.exists() {
        anyhow::bail!(
            "{} already exists; choose another name or remove it",
            ws.display(&dir)
        );
    }
    std::fs::create_dir_all(dir.join("conformance"))?;
    // YAML: the only manifest the platform's loader reads, with what it requires (a task
    // type, `tools`, `policies`), so the pack loads in the platform as in the agent.
    let runtime = match lang {
        Lang::Ts => "runtime:\n  # tsx runs the TypeScript as it is (installed by `npm install`).\n  command: [node, --import, tsx, src/worker.ts]\n".to_string(),
        Lang::Node => "runtime:\n  command: [node, handler.mjs]\n".to_string(),
        Lang::Python => "runtime:\n  command: [python3, -u, worker.py]\n".to_string(),
        // The first start builds the worker; its timeout covers that build.
        Lang::Rust => "runtime:\n  command: [cargo, run, --quiet, --release, --manifest-path, Cargo.toml]\n  timeout_ms: 300000\n".to_string(),
    };
    let manifest = MANIFEST.replace("{{NAME}}", name) + &runtime;
    std::fs::write(dir.join("manifest.yaml"), manifest)?;
    let files: &[(&str, &str)] = match lang {
        Lang::Ts => &[
            (
                "package.json",
                "build, typecheck and test scripts (npm install first)",
            ),
            ("src/manifest.ts", "the manifest as a typed value"),
            (
                "src/emit.ts",
                "runJob: builds the event with buildKernelEventV2",
            ),
            ("src/handlers/", "onRecoveryRequested (edit me)"),
            ("src/worker.ts", "the worker the agent starts (runPack)"),
            (
                "src/lumenflow/",
                "the Node helper, its types and test kit (no dependencies)",
            ),
            ("__tests__/", "the quickstart's tests (vitest)"),
        ],
        Lang::Python => &[
            ("handlers.py", "run_job and on_recovery_requested (edit me)"),
            ("worker.py", "the worker the agent starts (run_pack)"),
            (
                "lumenflow_pack.py",
                "the Python helper (protocol; no dependencies)",
            ),
            (
                "lumenflow_testing.py",
                "the test kit (an in-memory handler context)",
            ),
            (
                "tests/",
                "the quickstart's tests (python3 -m unittest discover -s tests)",
            ),
        ],
        Lang::Node => &[
            ("handler.mjs", "the handler (edit me)"),
            (
                "lumenflow-pack.mjs",
                "the Node helper (protocol; no dependencies)",
            ),
        ],
        Lang::Rust => &[
            ("src/main.rs", "the protocol loop and the handler (edit me)"),
            (
                "Cargo.toml",
                "the worker's crate (its own workspace; depends on serde_json)",
            ),
        ],
    };
    match lang {
        Lang::Ts => write_ts_pack(&dir, name)?,
        Lang::Python => write_files(&dir, name, PYTHON_TEMPLATE)?,
        Lang::Node => {
            std::fs::write(dir.join("lumenflow-pack.mjs"), NODE_HELPER)?;
            std::fs::write(dir.join("handler.mjs"), HANDLER.replace("{{NAME}}", name))?;
        }
        Lang::Rust => {
            std::fs::create_dir_all(dir.join("src"))?;
            std::fs::write(dir.join("Cargo.toml"), RUST_CARGO.replace("{{NAME}}", name))?;
            std::fs::write(dir.join("src/main.rs"), RUST_MAIN.replace("{{NAME}}", name))?;
            std::fs::write(dir.join(".gitignore"), "/target\n")?;
        }
    }
    std::fs::write(
        dir.join("conformance/conductor_recovery_requested.json"),
        format!("{{\"payload\": {{\"wu_id\": \"{name}-job-1\"}}}}\n"),
    )?;
    let shown = ws.display(&dir);
    println!("created {shown}/");
    println!(
        "  {:<19}emits {name}:job_completed (queue), handles conductor:recovery_requested",
        "manifest.yaml"
    );
    for (f, what) in files {
        println!("  {f:<19}{what}");
    }
    println!(
        "  {:<19}the sample event the conformance harness delivers",
        "conformance/"
    );
    println!();
    println!("next:");
    if lang == Lang::Ts {
        println!("  (cd {shown} && npm install && npm test && npx tsc --noEmit)");
    }
    if lang == Lang::Python {
        println!("  (cd {shown} && python3 -m unittest discover -s tests)");
    }
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

const RUST_CARGO: &str = r#"[package]
name = "{{NAME}}-pack"
version = "0.1.0"
edition = "2021"
publish = false

[dependencies]
serde_json = "1"

# Its own workspace, so the pack builds wherever its folder sits.
[workspace]
"#;

const RUST_MAIN: &str = r##"//! {{NAME}}: a lumenflow-agent exec pack in Rust. The agent starts it (`runtime.command` in
//! manifest.yaml) and speaks JSON-RPC 2.0 over stdin/stdout, one message per line. stdout
//! belongs to the protocol: log with `eprintln!` (the agent forwards stderr to its log).
//! Run `lumenflow-agent conformance .` in this folder after edits.

use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{self, BufRead, Write};

/// The kinds this worker handles (checked against subscribed_event_kinds at start).
const HANDLES: &[&str] = &["conductor:recovery_requested"];

/// `on_recovery_requested(event, ctx)`, as in the pack-authoring quickstart.
fn on_recovery_requested(event: &Value, ctx: &mut Ctx) -> Result<Value, String> {
    let replay_key = format!("{{NAME}}:recover:{}", event["event_id"].as_str().unwrap_or_default());

    // At-least-once delivery: the same event may come twice. Check before the effect...
    if ctx.replay_has(&replay_key)? {
        return Ok(json!({"status": "replayed", "action": "noop"}));
    }
    let job_id = event["payload"]["wu_id"].as_str().unwrap_or_default();
    if !job_id.starts_with("{{NAME}}-job-") {
        return Ok(json!({"status": "ignored", "action": "wrong-pack"}));
    }
    // The effect. The idempotency key makes a retry produce the same event_id.
    let key = format!("{job_id}:completed");
    ctx.emit("{{NAME}}:job_completed", json!({"job_id": job_id, "result": "recovered"}), Some(&key))?;
    // ...and record it after.
    ctx.replay_put(&replay_key)?;
    Ok(json!({"status": "handled", "action": "recovered"}))
}

/// The connection to the agent.
struct Agent {
    lines: io::Lines<io::StdinLock<'static>>,
    /// Messages from the agent that arrived while we waited for a reply.
    backlog: VecDeque<Value>,
    next_id: u64,
}

impl Agent {
    fn send(&self, msg: Value) {
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "{msg}");
        let _ = out.flush();
    }

    fn next(&mut self) -> Option<Value> {
        if let Some(m) = self.backlog.pop_front() {
            return Some(m);
        }
        loop {
            let line = self.lines.next()?.ok()?;
            match serde_json::from_str(&line) {
                Ok(v) => return Some(v),
                Err(e) => eprintln!("the agent sent a line that is not JSON: {e}"),
            }
        }
    }

    /// A request to the agent (emit, replay.has, replay.put); other messages wait meanwhile.
    fn call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        let id = format!("w{}", self.next_id);
        self.next_id += 1;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        loop {
            let line = self.lines.next().ok_or("the agent closed the connection")?.map_err(|e| e.to_string())?;
            let Ok(msg) = serde_json::from_str::<Value>(&line) else { continue };
            if msg.get("method").is_none() && msg["id"] == json!(id) {
                if let Some(err) = msg.get("error") {
                    return Err(err["message"].as_str().unwrap_or("error").to_string());
                }
                return Ok(msg["result"].clone());
            }
            self.backlog.push_back(msg);
        }
    }
}

/// What a handler gets: the replay log and emit, through the agent.
struct Ctx<'a> {
    agent: &'a mut Agent,
    /// 1 for the first delivery of this event.
    #[allow(dead_code)]
    attempt: u64,
}

impl Ctx<'_> {
    fn replay_has(&mut self, key: &str) -> Result<bool, String> {
        Ok(self.agent.call("replay.has", json!({"key": key}))?.as_bool().unwrap_or(false))
    }
    fn replay_put(&mut self, key: &str) -> Result<(), String> {
        self.agent.call("replay.put", json!({"key": key})).map(|_| ())
    }
    fn emit(&mut self, kind: &str, payload: Value, idempotency_key: Option<&str>) -> Result<String, String> {
        let mut params = json!({"kind": kind, "payload": payload});
        if let Some(k) = idempotency_key {
            params["idempotency_key"] = json!(k);
        }
        Ok(self.agent.call("emit", params)?["event_id"].as_str().unwrap_or_default().to_string())
    }
}

fn main() {
    let mut agent = Agent { lines: io::stdin().lock().lines(), backlog: VecDeque::new(), next_id: 1 };
    // After a `retry`, requests already queued behind it are answered "held" until `resume`
    // (the agent sends them again after the retried event).
    let mut held = false;
    while let Some(msg) = agent.next() {
        let id = msg["id"].clone();
        match msg["method"].as_str() {
            Some("initialize") => agent.send(json!({"jsonrpc": "2.0", "id": id, "result": {"handles": HANDLES}})),
            Some("resume") => held = false,
            Some("handle") if held => {
                agent.send(json!({"jsonrpc": "2.0", "id": id, "error": {"code": 1004, "message": "held: an earlier event asked for a retry"}}))
            }
            Some("handle") => {
                let event = msg["params"]["event"].clone();
                let attempt = msg["params"]["delivery"]["attempt"].as_u64().unwrap_or(1);
                let mut ctx = Ctx { agent: &mut agent, attempt };
                let result = match event["kind"].as_str() {
                    Some("conductor:recovery_requested") => on_recovery_requested(&event, &mut ctx),
                    _ => Ok(json!({"status": "ignored", "action": "no-handler"})),
                };
                match result {
                    Ok(outcome) => {
                        held = outcome["status"] == "retry";
                        agent.send(json!({"jsonrpc": "2.0", "id": id, "result": outcome}))
                    }
                    Err(e) => agent.send(json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32000, "message": e}})),
                }
            }
            Some("shutdown") => {
                agent.send(json!({"jsonrpc": "2.0", "id": id, "result": null}));
                return;
            }
            _ => {}
        }
    }
}
"##;
