//! The pack author's story end to end: `new pack` -> `validate` -> `conformance` -> `start` ->
//! the pack's event in `inbox`; and the conformance harness catching a non-idempotent handler.

mod common;

use common::*;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn agent_in(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(AGENT)
        .args(args)
        .current_dir(dir)
        .env("LUMENFLOW_AGENT_NO_USER_CONFIG", "1")
        .output()
        .unwrap();
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

#[test]
fn conformance_passes_for_acme_demo_and_catches_a_non_idempotent_copy() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (code, out) = agent_in(repo, &["conformance", "packs/acme-demo"]);
    assert_eq!(code, 0, "{out}");

    let tmp = tempfile::tempdir().unwrap();
    for sub in ["packs/acme-demo", "packs/node"] {
        copy_dir(&repo.join(sub), &tmp.path().join(sub));
    }
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

/// The Node helper computes the same event ids as the agent: both are tested against the
/// published vectors (`packs/event-id-vectors.json`; the Rust side in the SDK's unit tests).
#[test]
fn node_helper_passes_the_event_id_vectors() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("node")
        .args([
            "--test",
            "--test-reporter=tap",
            "packs/node/test/event-id.test.mjs",
        ])
        .current_dir(repo)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("# pass 2"), "{text}");
}
