//! Exec packs end to end: real Node workers speaking JSON-RPC over stdio, started by the real
//! agent binary in temporary workspaces.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A workspace with the repository's acme-demo pack and the Node helper.
fn acme_workspace(packs: &str) -> Workspace {
    let ws = Workspace::new(json!({"identity": "ws-test"}), packs);
    copy_dir(
        &repo().join("packs/acme-demo"),
        &ws.path().join("packs/acme-demo"),
    );
    copy_dir(&repo().join("packs/node"), &ws.path().join("packs/node"));
    ws
}

const ANSWER_INIT: &str = r#"
import { createInterface } from 'node:readline';
const send = (m) => process.stdout.write(JSON.stringify({jsonrpc: '2.0', ...m}) + '\n');
createInterface({ input: process.stdin }).on('line', (line) => {
  const msg = JSON.parse(line);
  if (msg.method === 'initialize') return send({ id: msg.id, result: { handles: ['conductor:recovery_requested'] } });
  if (msg.method === 'handle') return onHandle(msg);
});
"#;

#[test]
fn quickstart_pack_handles_dedupes_ignores_and_emits() {
    let mut ws = acme_workspace("");
    ws.start();
    let inbound = |wu: &str, key: Option<&str>| {
        let mut args = vec![
            "emit",
            "conductor:recovery_requested",
            "--inbound",
            "--payload",
        ];
        let payload = format!(r#"{{"wu_id":"{wu}"}}"#);
        args.push(&payload);
        if let Some(k) = key {
            args.extend(["--idempotency-key", k]);
        }
        let out = ws.run(&args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // Sent right after start, while Node may still be starting: none may be skipped.
    inbound("acme-job-1", Some("rec-1"));
    inbound("acme-job-1", Some("rec-1"));
    inbound("other-job-9", None);
    let p = wait_for("three deliveries", T, || {
        let p = ws.pack_status("acme-demo");
        (p["handled"].as_u64().unwrap_or(0)
            + p["replayed"].as_u64().unwrap_or(0)
            + p["ignored"].as_u64().unwrap_or(0)
            == 3)
            .then_some(p)
    });
    assert_eq!(
        (
            p["handled"].clone(),
            p["replayed"].clone(),
            p["ignored"].clone()
        ),
        (json!(1), json!(1), json!(1)),
        "{p}"
    );
    let inbox = wait_for("job_completed upstream", T, || {
        let i = ws.inbox();
        (!i.is_empty()).then_some(i)
    });
    assert_eq!(inbox.len(), 1);
    let e = &inbox[0]["event"];
    assert_eq!(e["kind"], "acme-demo:job_completed");
    assert_eq!(
        e["payload"],
        json!({"job_id": "acme-job-1", "result": "recovered"})
    );
    assert_eq!(e["from"], "ws-test");
    // The id the pack built: UUIDv5 over (from, kind, idempotency key).
    let expected = lumenflow_agent::sdk::envelope::idempotent_event_id(
        "ws-test",
        "acme-demo:job_completed",
        "acme-job-1:completed",
    );
    assert_eq!(e["event_id"], expected.to_string());
    assert_eq!(ws.terminate(), Some(0));
}

#[test]
fn a_worker_writing_garbage_crashes_only_its_pack() {
    let mut ws = Workspace::new(
        json!({"supervision": {"max_restarts": 1, "window_s": 60}}),
        "recorder",
    );
    raw_pack(
        &ws,
        "garbage",
        "process.stdout.write('hello, I am not JSON-RPC\\n'); setInterval(() => {}, 1000);",
        json!({}),
    );
    ws.start();
    let p = wait_for("garbage pack to fail", T, || {
        let p = ws.pack_status("garbage");
        p["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("not a JSON-RPC message"))
            .then_some(p)
    });
    assert!(
        p["last_error"]
            .as_str()
            .unwrap()
            .contains("hello, I am not JSON-RPC"),
        "{p}"
    );
    wait_for("crashed after restarts", T, || {
        (ws.pack_status("garbage")["state"] == "crashed").then_some(())
    });
    // The agent and the other pack are unaffected.
    ws.inbound("conductor:recovery_requested", "{}");
    wait_for("recorder handled", T, || {
        (ws.pack_status("recorder")["handled"] == 1).then_some(())
    });
    assert!(ws.log().contains("broken protocol"), "{}", ws.log());
}

#[test]
fn worker_exiting_during_initialize_or_never_answering() {
    let mut ws = Workspace::new(json!({}), "recorder");
    raw_pack(
        &ws,
        "dies",
        "console.error('boom: missing config'); process.exit(3);",
        json!({}),
    );
    raw_pack(
        &ws,
        "silent",
        "setInterval(() => {}, 1000);",
        json!({"runtime": {"command": ["node", "worker.mjs"], "timeout_ms": 300}}),
    );
    ws.start();
    let p = wait_for("dies to fail", T, || {
        let p = ws.pack_status("dies");
        p["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("initialize"))
            .then_some(p)
    });
    assert!(
        p["last_error"].as_str().unwrap().contains("worker exited"),
        "{p}"
    );
    let p = wait_for("silent to time out", T, || {
        let p = ws.pack_status("silent");
        p["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("no reply to `initialize` within 300 ms"))
            .then_some(p)
    });
    assert_ne!(p["state"], "running");
    assert!(
        ws.log().contains("boom: missing config"),
        "worker stderr is forwarded to the log"
    );
    ws.inbound("conductor:recovery_requested", "{}");
    wait_for("recorder handled", T, || {
        (ws.pack_status("recorder")["handled"] == 1).then_some(())
    });
}

#[test]
fn a_reply_to_an_unknown_id_is_a_protocol_error_and_the_event_is_redelivered() {
    let mut ws = Workspace::new(json!({}), "");
    let script = format!(
        "{ANSWER_INIT}\nimport {{ appendFileSync, existsSync }} from 'node:fs';\nfunction onHandle(msg) {{\n  if (!existsSync('lied')) {{ appendFileSync('lied', 'x'); return send({{ id: 987654, result: {{ status: 'handled' }} }}); }}\n  appendFileSync('handled.log', msg.params.event.event_id + '\\n');\n  send({{ id: msg.id, result: {{ status: 'handled', action: 'ok' }} }});\n}}\n"
    );
    raw_pack(&ws, "liar", &script, json!({}));
    ws.start();
    let id = ws.inbound("conductor:recovery_requested", "{}");
    let p = wait_for("handled after restart", T, || {
        let p = ws.pack_status("liar");
        (p["handled"] == 1).then_some(p)
    });
    assert_eq!(p["restarts"], 1, "{p}");
    assert!(
        p["last_error"]
            .as_str()
            .unwrap()
            .contains("unknown request id"),
        "{p}"
    );
    let handled = std::fs::read_to_string(ws.path().join("packs/liar/handled.log")).unwrap();
    assert_eq!(handled.trim(), id);
}

#[test]
fn an_undeclared_emit_from_a_worker_gets_the_validation_error_and_nothing_is_routed() {
    let mut ws = Workspace::new(json!({}), "");
    copy_dir(&repo().join("packs/node"), &ws.path().join("packs/node"));
    raw_pack(
        &ws,
        "emitty",
        r#"import { runPack } from '../node/lumenflow-pack.mjs';
import { writeFileSync } from 'node:fs';
runPack({ handlers: { 'conductor:recovery_requested': async (event, ctx) => {
  try { await ctx.emit('emitty:not_declared', {}); writeFileSync('result.txt', 'accepted'); }
  catch (e) { writeFileSync('result.txt', `${e.code} ${e.message}`); }
  return { status: 'handled', action: 'tried' };
} } });
"#,
        json!({"emitted_event_kinds": ["emitty:done"], "backpressure_policy": {"emitty:done": "queue"}}),
    );
    let dir = ws.path().join("packs/emitty");
    ws.start();
    ws.inbound("conductor:recovery_requested", "{}");
    wait_for("handled", T, || {
        (ws.pack_status("emitty")["handled"] == 1).then_some(())
    });
    let result = std::fs::read_to_string(dir.join("result.txt")).unwrap();
    assert_eq!(
        result,
        r#"1001 Unknown kind at emit: pack "emitty" does not declare "emitty:not_declared" in emitted_event_kinds"#
    );
    assert_eq!(ws.status()["queue"]["accepted_queue"], 0);
    assert!(ws.inbox().is_empty());
}

/// A handler that lets a refused emit crash it would crash the same way at every redelivery:
/// it is dead-lettered at its first attempt, with the refusal as the reason, and without the
/// attempt's other effects; the worker is not restarted three times.
#[test]
fn a_handler_crashing_on_a_refused_emit_is_dead_lettered_at_once() {
    let mut ws = Workspace::new(json!({}), "");
    copy_dir(&repo().join("packs/node"), &ws.path().join("packs/node"));
    raw_pack(
        &ws,
        "strict",
        r#"import { runPack } from '../node/lumenflow-pack.mjs';
import { appendFileSync } from 'node:fs';
runPack({ handlers: { 'conductor:recovery_requested': async (event, ctx) => {
  appendFileSync('calls.log', 'call\n');
  await ctx.emit('strict:done', { n: 1 });
  await ctx.emit('strict:not_declared', {});
  return { status: 'handled', action: 'never' };
} } });
"#,
        json!({"emitted_event_kinds": ["strict:done"], "backpressure_policy": {"strict:done": "queue"}}),
    );
    ws.start();
    ws.inbound("conductor:recovery_requested", "{}");
    wait_for("the dead letter", T, || {
        (ws.status()["dead_letters"] == 1).then_some(())
    });
    let dl: Vec<Value> =
        serde_json::from_slice(&ws.run(&["dlq", "list", "--json"]).stdout).unwrap();
    assert_eq!(dl[0]["attempts"], 1, "{dl:?}");
    assert!(
        dl[0]["error"]
            .as_str()
            .unwrap()
            .contains("an emit was refused: Unknown kind at emit: pack \"strict\" does not declare \"strict:not_declared\""),
        "{dl:?}"
    );
    let calls = std::fs::read_to_string(ws.path().join("packs/strict/calls.log")).unwrap();
    assert_eq!(calls.lines().count(), 1, "handled once, not retried");
    let p = ws.pack_status("strict");
    assert_eq!(p["restarts"], 0, "{p}");
    assert!(
        ws.inbox().is_empty(),
        "the attempt's other emit is not kept"
    );
}

#[test]
fn missing_handler_in_the_handshake_marks_the_pack_invalid() {
    let mut ws = Workspace::new(json!({}), "");
    raw_pack(
        &ws,
        "partial",
        r#"import { createInterface } from 'node:readline';
createInterface({ input: process.stdin }).on('line', (line) => {
  const msg = JSON.parse(line);
  if (msg.method === 'initialize') process.stdout.write(JSON.stringify({jsonrpc: '2.0', id: msg.id, result: { handles: [] }}) + '\n');
});"#,
        json!({}),
    );
    ws.start();
    let p = wait_for("invalid", T, || {
        let p = ws.pack_status("partial");
        (p["state"] == "invalid").then_some(p)
    });
    assert_eq!(
        p["last_error"],
        r#"Missing handler: subscribed kind "conductor:recovery_requested" has no registered handler"#
    );
}

/// A handler that asks for a retry while events are already queued behind it (pipelined): the
/// queued ones do not run until the retried event has, and none runs twice.
#[test]
fn a_retry_holds_the_events_queued_behind_it_so_order_is_kept_and_none_runs_twice() {
    let mut ws = acme_workspace("");
    raw_pack(
        &ws,
        "retrier",
        r#"import { runPack } from '../node/lumenflow-pack.mjs';
import { appendFileSync } from 'node:fs';
runPack({ handlers: { 'conductor:job_poked': async (e, ctx) => {
  appendFileSync('runs.txt', `${e.payload.n} attempt=${ctx.attempt}\n`);
  if (e.payload.n === 0 && ctx.attempt === 1) return { status: 'retry', action: 'not yet' };
  return { status: 'handled' };
} } });
"#,
        json!({"subscribed_event_kinds": ["conductor:job_poked"]}),
    );
    let dir = ws.path().join("packs/retrier");
    ws.start();
    let events: Vec<Value> = (0..5)
        .map(|n| json!({"kind": "conductor:job_poked", "payload": {"n": n}}))
        .collect();
    let r = ws.api().post("/v1/inbound", &json!({"events": events}));
    assert_eq!(r.status, 200, "{}", r.body);
    let p = wait_for("all 5 handled", T, || {
        let p = ws.pack_status("retrier");
        (p["handled"] == 5 && p["pending"] == 0).then_some(p)
    });
    assert_eq!(p["retried"], 1, "{p}");
    let runs: Vec<String> = std::fs::read_to_string(dir.join("runs.txt"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        runs,
        vec![
            "0 attempt=1",
            "0 attempt=2",
            "1 attempt=1",
            "2 attempt=1",
            "3 attempt=1",
            "4 attempt=1"
        ],
        "in order, each once"
    );
}
