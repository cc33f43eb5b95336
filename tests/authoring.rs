//! The pack author's story end to end: `new pack` -> `validate` -> `conformance` -> `start` ->
//! the pack's event in `inbox`; and the conformance harness catching a non-idempotent handler.

mod common;

use common::*;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn agent_in(dir: &Path, args: &[&str]) -> (i32, String) {
    let mut c = Command::new(AGENT);
    c.env("LUMENFLOW_AGENT_NO_USER_CONFIG", "1");
    outcome(c.args(args).current_dir(dir), AGENT)
}

/// Runs `cmd args` in `dir`; exit code and output.
fn run_in(dir: &Path, cmd: &str, args: &[&str]) -> (i32, String) {
    outcome(Command::new(cmd).args(args).current_dir(dir), cmd)
}

/// Exit code and stdout + stderr of a command run to completion.
fn outcome(c: &mut Command, name: &str) -> (i32, String) {
    let out = c.output().unwrap_or_else(|e| panic!("{name}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn new_pack_validates_passes_conformance_and_runs() {
    let mut ws = Workspace::new(json!({"identity": "ws-new"}), "");
    ws.bin = AGENT;
    let (code, out) = agent_in(ws.path(), &["new", "pack", "hello"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = agent_in(ws.path(), &["validate"]);
    assert_eq!(code, 0, "{out}");
    // The scaffold is what the platform's loader takes too (manifest.yaml, a task type...).
    assert!(
        out.contains("ok: hello 0.1.0 (packs/hello/manifest.yaml)") && out.contains("0 warnings"),
        "{out}"
    );
    let (code, out) = agent_in(ws.path(), &["conformance", "packs/hello"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(
            "PASS  conductor:recovery_requested: second delivery of the same event -> replayed"
        ),
        "{out}"
    );
    ws.start();
    ws.inbound("conductor:recovery_requested", r#"{"wu_id":"hello-job-1"}"#);
    let inbox = wait_for(
        "hello:job_completed in the inbox",
        Duration::from_secs(20),
        || {
            let i = ws.inbox();
            (!i.is_empty()).then_some(i)
        },
    );
    assert_eq!(inbox[0]["event"]["kind"], "hello:job_completed");
    assert_eq!(inbox[0]["event"]["from"], "ws-new");
    let (code, out) = agent_in(ws.path(), &["new", "pack", "hello"]);
    assert_eq!(code, 2, "an existing pack is never overwritten: {out}");
    let (code, out) = agent_in(ws.path(), &["new", "pack", "Bad_Name"]);
    assert_eq!(code, 2);
    assert!(out.contains("kebab-case"), "{out}");
}

/// The README's first path, as written: `new pack hello --lang ts`, `npm install`, `npm test`
/// (the quickstart's tests), `npx tsc --noEmit`, `validate`, `conformance`, `start`, an
/// inbound recovery -> `hello:job_completed` in the inbox. Needs npm and the npm registry
/// (`.ci/run` installs npm); skipped, saying so, where npm is missing.
#[test]
fn a_new_typescript_pack_tests_typechecks_passes_conformance_and_runs() {
    if Command::new("npm").arg("--version").output().is_err() {
        eprintln!("SKIPPED: npm is not installed (`.ci/run` installs it)");
        return;
    }
    let mut ws = Workspace::new(json!({"identity": "ws-ts"}), "");
    ws.bin = AGENT;
    let (code, out) = agent_in(ws.path(), &["new", "pack", "hello", "--lang", "ts"]);
    assert_eq!(code, 0, "{out}");
    let pack = ws.path().join("packs/hello");
    // Before `npm install` the worker cannot start: the handshake says why, in one line.
    let (code, out) = agent_in(ws.path(), &["conformance", "packs/hello"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL  handshake: worker exited (exit status: 1; stderr: Error [ERR_MODULE_NOT_FOUND]: Cannot find package 'tsx'"),
        "{out}"
    );
    let (code, out) = run_in(
        &pack,
        "npm",
        &["install", "--no-audit", "--no-fund", "--loglevel=error"],
    );
    assert_eq!(code, 0, "npm install: {out}");
    let (code, out) = run_in(&pack, "npm", &["test"]);
    assert_eq!(code, 0, "npm test: {out}");
    assert!(out.contains("3 passed"), "{out}");
    let (code, out) = run_in(&pack, "npx", &["tsc", "--noEmit"]);
    assert_eq!(code, 0, "tsc --noEmit: {out}");
    validate_conformance_and_run_hello(&mut ws);
}

/// The end of every scaffold's path: `validate` (0 warnings), `conformance`, `start`, an
/// inbound recovery -> `hello:job_completed` in the inbox, with the id the published
/// derivation gives (identity `ws-ts`, the kind, key `hello-job-1:completed`).
fn validate_conformance_and_run_hello(ws: &mut Workspace) {
    let (code, out) = agent_in(ws.path(), &["validate"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 warnings"), "{out}");
    let (code, out) = agent_in(ws.path(), &["conformance", "packs/hello"]);
    assert_eq!(code, 0, "{out}");
    ws.start();
    ws.inbound("conductor:recovery_requested", r#"{"wu_id":"hello-job-1"}"#);
    let inbox = wait_for(
        "hello:job_completed in the inbox",
        Duration::from_secs(30),
        || {
            let i = ws.inbox();
            (!i.is_empty()).then_some(i)
        },
    );
    let e = &inbox[0]["event"];
    assert_eq!(e["kind"], "hello:job_completed");
    assert_eq!(e["from"], "ws-ts");
    assert_eq!(e["payload"]["job_id"], "hello-job-1");
    assert_eq!(e["event_id"], "5fac27ff-47aa-53bb-aef4-cd09e18cf50b");
}

/// The same path in Python: `new pack hello --lang python`, its unittest tests (the
/// quickstart's two and the event-id vectors), `validate`, `conformance`, `start`, an inbound
/// recovery -> `hello:job_completed` with the published id.
#[test]
fn a_new_python_pack_tests_passes_conformance_and_runs() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("SKIPPED: python3 is not installed");
        return;
    }
    let mut ws = Workspace::new(json!({"identity": "ws-ts"}), "");
    ws.bin = AGENT;
    let (code, out) = agent_in(ws.path(), &["new", "pack", "hello", "--lang", "python"]);
    assert_eq!(code, 0, "{out}");
    let pack = ws.path().join("packs/hello");
    let (code, out) = run_in(
        &pack,
        "python3",
        &["-m", "unittest", "discover", "-s", "tests"],
    );
    assert_eq!(code, 0, "unittest: {out}");
    assert!(out.contains("Ran 3 tests"), "{out}");
    validate_conformance_and_run_hello(&mut ws);
}

/// The Python helper passes the published vectors.
#[test]
fn python_helper_passes_the_event_id_vectors() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (code, out) = run_in(
        repo,
        "python3",
        &["-m", "unittest", "discover", "-s", "packs/python/tests"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Ran 3 tests"), "{out}");
}

#[test]
fn conformance_passes_for_acme_demo_and_catches_a_non_idempotent_copy() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (code, out) = agent_in(repo, &["conformance", "packs/acme-demo"]);
    assert_eq!(code, 0, "{out}");

    // The folder stands alone (its helper is vendored): copied alone into a fresh workspace.
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(
        &repo.join("packs/acme-demo"),
        &tmp.path().join("packs/acme-demo"),
    );
    let (code, out) = agent_in(tmp.path(), &["conformance", "packs/acme-demo"]);
    assert_eq!(code, 0, "acme-demo copied alone: {out}");
    let handler = tmp.path().join("packs/acme-demo/handler.mjs");
    let text = std::fs::read_to_string(&handler).unwrap();
    let without_check = text.replace("if (await ctx.replayLog.has(replayKey)) {", "if (false) {");
    assert_ne!(text, without_check);
    std::fs::write(&handler, without_check).unwrap();
    let (code, out) = agent_in(tmp.path(), &["conformance", "packs/acme-demo"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL  conductor:recovery_requested: Handler called twice: the second delivery of event"), "{out}");
}

#[test]
fn conformance_reports_undeclared_emits_and_missing_handlers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sloppy");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("manifest.json"),
        json!({"id": "sloppy", "version": "0.1.0", "subscribed_event_kinds": ["conductor:recovery_requested", "conductor:other"],
            "runtime": {"command": ["node", "h.mjs"]}})
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("lumenflow-pack.mjs"),
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("packs/node/lumenflow-pack.mjs"),
        )
        .unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("h.mjs"),
        "import { runPack } from './lumenflow-pack.mjs';\nrunPack({ handlers: { 'conductor:recovery_requested': async (e, ctx) => { try { await ctx.emit('sloppy:undeclared', {}); } catch {} return { status: 'ignored' }; } } });\n",
    )
    .unwrap();
    let (code, out) = agent_in(tmp.path(), &["conformance", "sloppy"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(r#"FAIL  handshake: Missing handler: subscribed kind "conductor:other" has no registered handler"#), "{out}");
    assert!(out.contains(r#"FAIL  emits: Unknown kind at emit: pack "sloppy" does not declare "sloppy:undeclared""#), "{out}");
}

#[test]
fn a_new_rust_pack_builds_passes_conformance_and_runs() {
    let mut ws = Workspace::new(json!({}), "");
    ws.bin = AGENT;
    let (code, out) = agent_in(ws.path(), &["new", "pack", "rusty", "--lang", "rust"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = agent_in(ws.path(), &["validate"]);
    assert_eq!(code, 0, "{out}");
    // The first run builds the worker with cargo (runtime.timeout_ms covers the build).
    let (code, out) = agent_in(ws.path(), &["conformance", "packs/rusty"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("5 checks passed"), "{out}");
    ws.start();
    ws.inbound("conductor:recovery_requested", r#"{"wu_id":"rusty-job-1"}"#);
    let inbox = wait_for(
        "rusty:job_completed in the inbox",
        Duration::from_secs(120),
        || {
            let i = ws.inbox();
            (!i.is_empty()).then_some(i)
        },
    );
    assert_eq!(inbox[0]["event"]["kind"], "rusty:job_completed");
}

/// Vendored copies of the Node helper are the helper: a pack folder that stands alone must not
/// run an older protocol.
#[test]
fn vendored_helpers_are_the_helper() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let helper = std::fs::read_to_string(repo.join("packs/node/lumenflow-pack.mjs")).unwrap();
    let copy = std::fs::read_to_string(repo.join("packs/acme-demo/lumenflow-pack.mjs")).unwrap();
    assert!(
        helper == copy,
        "packs/acme-demo/lumenflow-pack.mjs differs from packs/node/lumenflow-pack.mjs: run `cp packs/node/lumenflow-pack.mjs packs/acme-demo/`"
    );
}

/// The Node helper computes the same event ids as the agent: both are tested against the
/// published vectors (`packs/event-id-vectors.json`; the Rust side in the SDK's unit tests).
#[test]
fn node_helper_passes_the_event_id_vectors() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (code, text) = run_in(
        repo,
        "node",
        &[
            "--test",
            "--test-reporter=tap",
            "packs/node/test/event-id.test.mjs",
        ],
    );
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("# pass 4"), "{text}");
}

/// A pack author adds `required_approvals` to the scaffold: `conformance` shows the event is
/// held until approved, and a running agent holds it from the real (node) worker until
/// `approvals approve`.
#[test]
fn a_required_approvals_kind_is_held_in_conformance_and_at_run_time() {
    let mut ws = Workspace::new(json!({"identity": "ws-held"}), "");
    ws.bin = AGENT;
    let (code, out) = agent_in(ws.path(), &["new", "pack", "hello"]);
    assert_eq!(code, 0, "{out}");
    let manifest = ws.path().join("packs/hello/manifest.yaml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let text = text.replace(
        "emitted_event_kinds: [\"hello:job_completed\"]",
        "emitted_event_kinds: [\"hello:job_completed\"]\nrequired_approvals: [\"hello:job_completed\"]",
    );
    assert!(text.contains("required_approvals"), "{text}");
    std::fs::write(&manifest, text).unwrap();
    let (code, out) = agent_in(ws.path(), &["conformance", "packs/hello"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(
            "PASS  approvals: hello:job_completed is held until approved (the handler's event"
        ),
        "{out}"
    );
    ws.start();
    ws.inbound("conductor:recovery_requested", r#"{"wu_id":"hello-job-1"}"#);
    let id = wait_for("the held event listed", Duration::from_secs(20), || {
        let (_, out) = agent_in(ws.path(), &["approvals", "list", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        v[0]["approval_id"].as_str().map(str::to_string)
    });
    assert!(ws.inbox().is_empty(), "held until approved");
    let (code, out) = agent_in(ws.path(), &["approvals", "approve", &id, "--as", "author"]);
    assert_eq!(code, 0, "{out}");
    let inbox = wait_for(
        "hello:job_completed in the inbox",
        Duration::from_secs(20),
        || {
            let i = ws.inbox();
            (!i.is_empty()).then_some(i)
        },
    );
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0]["event"]["kind"], "hello:job_completed");
}
