//! Supervision end to end (SPEC §7): crashed handlers restart, poison events are
//! dead-lettered, no restart storms, `dlq` manages what was dead-lettered.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn inbound(ws: &Workspace, kind: &str, payload: Value) -> String {
    ws.inbound(kind, &payload.to_string())
}

fn effect_count(ws: &Workspace, id: &str) -> usize {
    ws.effects()
        .iter()
        .filter(|l| l.split(' ').nth(1) == Some(id))
        .count()
}

fn dlq(ws: &Workspace) -> Vec<Value> {
    let out = ws.run(&["dlq", "list", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_native_poison_event_is_dead_lettered_after_3_attempts_and_retried_after_the_fix() {
    let mut ws = Workspace::new(json!({}), "recorder,observer");
    let flag = ws.path().join("poison.flag");
    std::fs::write(&flag, "x").unwrap();
    ws.start();
    let before = inbound(&ws, "conductor:recovery_requested", json!({"n": 1}));
    let poison = inbound(
        &ws,
        "conductor:recovery_requested",
        json!({"panic_while_exists": flag}),
    );
    let after = inbound(&ws, "conductor:recovery_requested", json!({"n": 3}));
    let p = wait_for("2 handled and 1 dead letter", T, || {
        let p = ws.pack_status("recorder");
        (p["handled"] == 2 && p["dead_lettered"] == 1).then_some(p)
    });
    assert_eq!(p["restarts"], 3, "one restart per crash: {p}");
    assert!(
        p["last_error"]
            .as_str()
            .unwrap()
            .contains("handler panicked: poison"),
        "{p}"
    );
    assert_eq!(effect_count(&ws, &before), 1);
    assert_eq!(effect_count(&ws, &after), 1);
    assert_eq!(effect_count(&ws, &poison), 0);
    let lines = ws.effects();
    assert!(
        lines[0].contains(&before) && lines[1].contains(&after),
        "order kept: {lines:?}"
    );
    assert_eq!(ws.status()["dead_letters"], 1);

    let dead = dlq(&ws);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["pack"], "recorder");
    assert_eq!(dead[0]["event_id"], poison);
    assert_eq!(dead[0]["attempts"], 3);
    assert!(
        dead[0]["error"]
            .as_str()
            .unwrap()
            .contains("(after 3 attempts)"),
        "{}",
        dead[0]
    );
    assert_eq!(dead[0]["event"]["event_id"], poison);
    // agent: events reached the observer pack.
    let agent_log = wait_for("agent: events", T, || {
        let l = std::fs::read_to_string(ws.path().join("effects.log.agent")).unwrap_or_default();
        l.contains("agent:event_dead_lettered").then_some(l)
    });
    assert!(agent_log.contains("agent:pack_crashed"), "{agent_log}");
    assert!(agent_log.contains(&poison), "{agent_log}");

    // Retried without a fix: one more attempt, one more crash, dead-lettered again (not three
    // more crashes).
    let out = ws.run(&["dlq", "retry", "--all"]);
    assert_eq!(out.status.code(), Some(0));
    let p = wait_for("dead-lettered again", T, || {
        let p = ws.pack_status("recorder");
        (p["dead_lettered"] == 2 && ws.status()["dead_letters"] == 1).then_some(p)
    });
    assert_eq!(p["restarts"], 4, "one more crash only: {p}");
    assert_eq!(dlq(&ws)[0]["attempts"], 3);

    // Fix the handler, retry: delivered once, to the recorder only.
    std::fs::remove_file(&flag).unwrap();
    let out = ws.run(&["dlq", "retry", "--all"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("retried 1"));
    wait_for("retried event handled", T, || {
        (effect_count(&ws, &poison) == 1).then_some(())
    });
    assert!(dlq(&ws).is_empty());
    assert_eq!(ws.status()["dead_letters"], 0);
    assert_eq!(ws.pack_status("recorder")["handled"], 3);
}

#[test]
fn dlq_works_without_a_running_agent_and_retry_is_delivered_at_start() {
    let mut ws = Workspace::new(json!({"supervision": {"max_attempts": 1}}), "recorder");
    let flag = ws.path().join("poison.flag");
    std::fs::write(&flag, "x").unwrap();
    ws.start();
    let poison = inbound(
        &ws,
        "conductor:recovery_requested",
        json!({"panic_while_exists": flag}),
    );
    wait_for("dead letter", T, || {
        (ws.status()["dead_letters"] == 1).then_some(())
    });
    let failed = inbound(
        &ws,
        "conductor:recovery_requested",
        json!({"outcome": "failed"}),
    );
    wait_for("failed dead-lettered at once", T, || {
        (ws.status()["dead_letters"] == 2).then_some(())
    });
    assert_eq!(ws.terminate(), Some(0));
    let dead = dlq(&ws);
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[1]["event_id"], failed);
    assert_eq!(dead[1]["error"], "handler failed: asked");
    let out = ws.run(&["dlq", "retry", "999"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no dead letter with id 999"));
    std::fs::remove_file(&flag).unwrap();
    let id = dead[0]["id"].as_i64().unwrap().to_string();
    let out = ws.run(&["dlq", "retry", &id]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("delivered at the next"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = ws.run(&["dlq", "purge", "--yes"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("purged 1"));
    ws.start();
    wait_for("retried event handled after start", T, || {
        (effect_count(&ws, &poison) == 1).then_some(())
    });
    assert_eq!(ws.status()["dead_letters"], 0);
}

#[test]
fn a_handler_crashing_on_every_event_ends_in_crashed_with_backoff_and_idle_cpu() {
    let mut ws = Workspace::new(
        json!({"supervision": {"max_restarts": 5, "window_s": 30, "max_attempts": 100}}),
        "recorder,sink",
    );
    ws.start_with_env(&[("LUMENFLOW_AGENT_BACKOFF_BASE_MS", "3000")]);
    for _ in 0..3 {
        inbound(&ws, "conductor:recovery_requested", json!({"panic": true}));
    }
    wait_for("crashed", T, || {
        (ws.pack_status("recorder")["state"] == "crashed").then_some(())
    });
    let restarts = ws.pack_status("recorder")["restarts"].as_u64().unwrap();
    assert_eq!(restarts, 5, "crashed after 5 restarts");
    // While crashed: no spinning.
    let pid = ws.child.as_ref().unwrap().id();
    let cpu = |pid: u32| -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
    };
    let c0 = cpu(pid);
    // A healthy pack in the same agent keeps handling events meanwhile.
    for _ in 0..5 {
        ws.inbound("bench:ping", "{}");
    }
    wait_for("sink handled", T, || {
        (ws.pack_status("sink")["handled"] == 5).then_some(())
    });
    std::thread::sleep(Duration::from_millis(1000));
    let used = cpu(pid) - c0;
    assert!(
        used < 0.3,
        "agent used {used:.2} s of CPU in ~1 s while a pack was crashed"
    );
    assert_eq!(ws.pack_status("recorder")["state"], "crashed");
    // Retried later: after the backoff the pack runs (and crashes) again.
    wait_for("a restart after the backoff", T, || {
        (ws.pack_status("recorder")["restarts"].as_u64().unwrap() > restarts).then_some(())
    });
}

#[test]
fn an_exec_worker_killed_with_sigkill_mid_event_is_restarted_and_the_event_handled() {
    let mut ws = Workspace::new(json!({}), "");
    let dir = ws.path().join("packs/slow");
    std::fs::create_dir_all(&dir).unwrap();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(
        repo.join("packs/node/lumenflow-pack.mjs"),
        dir.join("lumenflow-pack.mjs"),
    )
    .unwrap();
    std::fs::write(
        dir.join("manifest.json"),
        json!({"id": "slow", "version": "0.1.0", "subscribed_event_kinds": ["conductor:recovery_requested"],
            "runtime": {"command": ["node", "handler.mjs"]}})
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("handler.mjs"),
        r#"import { runPack } from './lumenflow-pack.mjs';
import { writeFileSync, appendFileSync } from 'node:fs';
runPack({ handlers: { 'conductor:recovery_requested': async (event, ctx) => {
  if (ctx.attempt === 1) { writeFileSync('busy.pid', String(process.pid)); await new Promise((r) => setTimeout(r, 60000)); }
  appendFileSync('handled.log', `${event.event_id} attempt=${ctx.attempt}\n`);
  return { status: 'handled' };
} } });
"#,
    )
    .unwrap();
    // Poison in exec form: a worker that exits on one payload.
    let dir2 = ws.path().join("packs/exiter");
    std::fs::create_dir_all(&dir2).unwrap();
    std::fs::copy(
        repo.join("packs/node/lumenflow-pack.mjs"),
        dir2.join("lumenflow-pack.mjs"),
    )
    .unwrap();
    std::fs::write(
        dir2.join("manifest.json"),
        json!({"id": "exiter", "version": "0.1.0", "subscribed_event_kinds": ["conductor:job_poked"],
            "runtime": {"command": ["node", "handler.mjs"]}})
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        dir2.join("handler.mjs"),
        r#"import { runPack } from './lumenflow-pack.mjs';
import { appendFileSync } from 'node:fs';
runPack({ handlers: { 'conductor:job_poked': async (event) => {
  if (event.payload.poison) process.exit(7);
  appendFileSync('handled.log', `${event.event_id}\n`);
  return { status: 'handled' };
} } });
"#,
    )
    .unwrap();
    ws.start();
    let id = inbound(&ws, "conductor:recovery_requested", json!({}));
    let pid: i32 = wait_for("the worker to be busy", T, || {
        std::fs::read_to_string(dir.join("busy.pid"))
            .ok()
            .and_then(|s| s.parse().ok())
    });
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let handled = wait_for("handled after the restart", T, || {
        std::fs::read_to_string(dir.join("handled.log")).ok()
    });
    assert_eq!(handled.trim(), format!("{id} attempt=2"));
    let p = ws.pack_status("slow");
    assert_eq!(p["restarts"], 1, "{p}");
    assert_eq!(p["handled"], 1);
    assert!(
        p["last_error"].as_str().unwrap().contains("worker exited"),
        "{p}"
    );

    let a = inbound(&ws, "conductor:job_poked", json!({"n": 1}));
    let poison = inbound(&ws, "conductor:job_poked", json!({"poison": true}));
    let b = inbound(&ws, "conductor:job_poked", json!({"n": 2}));
    let p = wait_for("exiter: 2 handled, 1 dead letter", T, || {
        let p = ws.pack_status("exiter");
        (p["handled"] == 2 && p["dead_lettered"] == 1).then_some(p)
    });
    assert_eq!(p["restarts"], 3, "{p}");
    let handled = std::fs::read_to_string(dir2.join("handled.log")).unwrap();
    assert_eq!(handled, format!("{a}\n{b}\n"));
    assert_eq!(dlq(&ws)[0]["event_id"], poison);
    assert!(
        dlq(&ws)[0]["error"]
            .as_str()
            .unwrap()
            .contains("exit status: 7"),
        "{}",
        dlq(&ws)[0]
    );
}

/// A handler that crashes after its effects: what it emitted through the agent is committed
/// only with its outcome, so the redeliveries do not double it; its effect outside the agent
/// (a file append) runs once per attempt, as at-least-once delivery says.
#[test]
fn a_crash_after_the_effects_does_not_double_the_events_the_handler_emitted() {
    let mut ws = Workspace::new(json!({}), "ledger,emitter");
    ws.start();
    let api = ws.api();
    let r = api.emit(vec![
        json!({"kind": "emitter:job_completed", "payload": {"crash_after_effects_until_attempt": 3}}),
        json!({"kind": "emitter:job_completed", "payload": {"n": 2}}),
    ]);
    assert_eq!(r.status, 200, "{:?}", r.body);
    let flaky = r.body["event_ids"][0].as_str().unwrap().to_string();
    let calm = r.body["event_ids"][1].as_str().unwrap().to_string();
    let p = wait_for("both handled", T, || {
        let p = ws.pack_status("ledger");
        (p["handled"] == 2).then_some(p)
    });
    assert_eq!(p["restarts"], 2, "{p}");
    let entries = |source: &str| {
        ws.inbox()
            .iter()
            .filter(|r| {
                r["event"]["kind"] == "ledger:entry_recorded"
                    && r["event"]["payload"]["source"] == source
            })
            .count()
    };
    wait_for("both entries in mem:inbox", T, || {
        (entries(&flaky) >= 1 && entries(&calm) >= 1).then_some(())
    });
    assert_eq!(entries(&flaky), 1, "one entry despite 3 attempts");
    assert_eq!(entries(&calm), 1);
    assert_eq!(
        effect_count(&ws, &flaky),
        3,
        "the file append ran per attempt"
    );
    assert_eq!(effect_count(&ws, &calm), 1);
}
