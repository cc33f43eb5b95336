//! "Nothing lost, nothing doubled": one regression test per hole an adversarial pass found in
//! the core promise (issue 19). Each runs the real binary, real Node workers, a real SQLite
//! file, the development conductor on loopback and real signals; each failed before its fix.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A workspace (mem:inbox unless enrolled) with the Node helper under `packs/node`.
fn workspace(config: Value) -> Workspace {
    let ws = Workspace::new(config, "");
    copy_dir(&repo().join("packs/node"), &ws.path().join("packs/node"));
    ws
}

/// `packs/ID/manifest.json` (`manifest` plus id, version and the runtime) and `handler.mjs`,
/// which starts with the helper's import and `appendFileSync`.
fn node_pack(ws: &Workspace, id: &str, manifest: Value, handlers: &str) -> PathBuf {
    let dir = ws.path().join("packs").join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let mut m =
        json!({"id": id, "version": "0.1.0", "runtime": {"command": ["node", "handler.mjs"]}});
    for (k, v) in manifest.as_object().unwrap() {
        m[k] = v.clone();
    }
    std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
    std::fs::write(
        dir.join("handler.mjs"),
        format!(
            "import {{ runPack }} from '../node/lumenflow-pack.mjs';\nimport {{ appendFileSync }} from 'node:fs';\nconst sleep = (ms) => new Promise((r) => setTimeout(r, ms));\n{handlers}\n"
        ),
    )
    .unwrap();
    dir
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn signal(ws: &Workspace, sig: i32) {
    let pid = ws.child.as_ref().unwrap().id() as i32;
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

fn inbox_kinds(ws: &Workspace, kind: &str) -> Vec<Value> {
    ws.inbox()
        .into_iter()
        .filter(|e| e["event"]["kind"] == kind)
        .collect()
}

/// Injects `conductor:job_poked` events `{"n": n}` for each `n`, in one inbound batch.
fn poke(ws: &Workspace, ns: std::ops::Range<u32>) {
    let events: Vec<Value> = ns
        .map(|n| json!({"kind": "conductor:job_poked", "payload": {"n": n}}))
        .collect();
    let r = ws.api().post("/v1/inbound", &json!({"events": events}));
    assert_eq!(r.status, 200, "{}", r.body);
}

fn emit_orders(ws: &Workspace, from: usize, n: usize) {
    let events: Vec<Value> = (from..from + n)
        .map(|i| json!({"kind": "shop:order_placed", "payload": {"n": i}}))
        .collect();
    let r = ws.api().emit(events);
    assert_eq!(r.status, 200, "{}", r.body);
}

fn received_orders(c: &Conductor) -> Vec<(i64, i64)> {
    c.received()
        .iter()
        .filter(|r| r["event"]["kind"] == "shop:order_placed")
        .map(|r| {
            (
                r["event"]["payload"]["n"].as_i64().unwrap(),
                r["deliveries"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// Hole 1 and the SIGSTOP finding: the agent stopped for 3 s while handlers were working.
/// Before: the timers fired late, both workers were timed out although they had answered, the
/// quickstart handler's emit was lost or doubled (its requests, read after the timeout, were
/// committed at once), and the pipelined worker re-ran the events it had finished.
#[test]
fn a_stalled_agent_times_out_no_worker_and_loses_or_doubles_nothing() {
    let mut ws = workspace(json!({"identity": "ws-test", "handler": {"timeout_ms": 1000}}));
    let quick = node_pack(
        &ws,
        "quick",
        json!({"subscribed_event_kinds": ["conductor:recovery_requested"],
               "emitted_event_kinds": ["quick:job_completed"],
               "backpressure_policy": {"quick:job_completed": "queue"}}),
        r#"runPack({ handlers: { 'conductor:recovery_requested': async (event, ctx) => {
  const key = `${event.payload.job_id}:completed`;
  if (await ctx.replayLog.has(key)) return { status: 'replayed', action: 'noop' };
  appendFileSync('started.txt', `${event.payload.job_id} attempt=${ctx.attempt}\n`);
  await sleep(300);
  await ctx.emit('quick:job_completed', { job_id: event.payload.job_id });
  await sleep(300);
  await ctx.replayLog.put(key);
  return { status: 'handled', action: 'recovered' };
} } });"#,
    );
    let slow = node_pack(
        &ws,
        "slow",
        json!({"subscribed_event_kinds": ["conductor:job_poked"]}),
        r#"runPack({ handlers: { 'conductor:job_poked': async (event) => {
  await sleep(200);
  appendFileSync('effects.txt', `${event.payload.n}\n`);
  return { status: 'handled' };
} } });"#,
    );
    ws.start();
    ws.inbound("conductor:recovery_requested", r#"{"job_id":"job-1"}"#);
    let pokes: Vec<Value> = (0..20)
        .map(|n| json!({"kind": "conductor:job_poked", "payload": {"n": n}}))
        .collect();
    let r = ws.api().post("/v1/inbound", &json!({"events": pokes}));
    assert_eq!(r.status, 200, "{}", r.body);
    wait_for("the quickstart handler to start", T, || {
        (!lines(&quick.join("started.txt")).is_empty()).then_some(())
    });
    wait_for("the slow worker to be under way", T, || {
        (lines(&slow.join("effects.txt")).len() >= 2).then_some(())
    });
    // The fault itself: the agent does not run for 3 s (three handler timeouts).
    signal(&ws, libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(3));
    signal(&ws, libc::SIGCONT);
    wait_for("all 21 events handled", T, || {
        (ws.pack_status("quick")["handled"] == 1 && ws.pack_status("slow")["handled"] == 20)
            .then_some(())
    });
    let log = ws.log();
    assert!(!log.contains("timed out"), "no handler timed out:\n{log}");
    assert_eq!(ws.pack_status("quick")["restarts"], 0);
    assert_eq!(ws.pack_status("slow")["restarts"], 0);
    assert_eq!(lines(&quick.join("started.txt")), vec!["job-1 attempt=1"]);
    assert_eq!(
        inbox_kinds(&ws, "quick:job_completed").len(),
        1,
        "the emit happens exactly once"
    );
    let mut effects = lines(&slow.join("effects.txt"));
    effects.sort_by_key(|l| l.parse::<u32>().unwrap());
    let want: Vec<String> = (0..20).map(|n| n.to_string()).collect();
    assert_eq!(effects, want, "each slow event's effect ran exactly once");
}

/// The kill -9 finding: a worker outlived its agent, finished its effect, and the next agent
/// ran the same event again, both times as `attempt=1`.
#[test]
fn a_worker_dies_with_its_agent_and_the_next_agent_counts_the_attempt() {
    let mut ws = workspace(json!({"identity": "ws-test"}));
    let dir = node_pack(
        &ws,
        "long",
        json!({"subscribed_event_kinds": ["conductor:job_poked"]}),
        r#"runPack({ handlers: { 'conductor:job_poked': async (event, ctx) => {
  appendFileSync('runs.txt', `start attempt=${ctx.attempt} redelivered=${ctx.redelivered} pid=${process.pid}\n`);
  if (ctx.attempt === 1) await sleep(10000);
  appendFileSync('runs.txt', `done attempt=${ctx.attempt}\n`);
  return { status: 'handled' };
} } });"#,
    );
    ws.start();
    ws.inbound("conductor:job_poked", r#"{"n":1}"#);
    let first = wait_for("the handler to start", T, || {
        lines(&dir.join("runs.txt")).first().cloned()
    });
    let pid: i32 = first.rsplit("pid=").next().unwrap().parse().unwrap();
    ws.kill9();
    wait_for(
        "the worker to die with its agent",
        Duration::from_secs(5),
        || process_gone(pid).then_some(()),
    );
    ws.start();
    wait_for("handled after the restart", T, || {
        (ws.pack_status("long")["handled"] == 1).then_some(())
    });
    let runs = lines(&dir.join("runs.txt"));
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert!(
        runs[1].starts_with("start attempt=2 redelivered=true"),
        "{runs:?}"
    );
    assert_eq!(runs[2], "done attempt=2");
}

/// An event during which the agent dies every time (here: `kill -9` three times) is counted
/// across the restarts and quarantined after `max_attempts`, not delivered forever; the next
/// event goes on.
#[test]
fn an_event_that_takes_the_agent_down_every_time_is_dead_lettered_after_max_attempts() {
    let mut ws = workspace(json!({"identity": "ws-test"}));
    let dir = node_pack(
        &ws,
        "long",
        json!({"subscribed_event_kinds": ["conductor:job_poked"]}),
        r#"runPack({ handlers: { 'conductor:job_poked': async (event, ctx) => {
  appendFileSync('runs.txt', `${event.payload.n} attempt=${ctx.attempt}\n`);
  if (event.payload.n === 1) await sleep(10000);
  return { status: 'handled' };
} } });"#,
    );
    let runs = || lines(&dir.join("runs.txt"));
    ws.start();
    ws.inbound("conductor:job_poked", r#"{"n":1}"#);
    for attempt in 1..=3 {
        wait_for(&format!("attempt {attempt} under way"), T, || {
            (runs().len() == attempt).then_some(())
        });
        ws.kill9();
        if attempt < 3 {
            ws.start();
        }
    }
    assert_eq!(runs(), vec!["1 attempt=1", "1 attempt=2", "1 attempt=3"]);
    ws.start();
    ws.inbound("conductor:job_poked", r#"{"n":2}"#);
    let deadline = Instant::now() + T;
    while ws.pack_status("long")["handled"] != 1 {
        assert!(
            Instant::now() < deadline,
            "the second event was not handled: {}\n{}",
            ws.status(),
            ws.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ws.status()["dead_letters"], 1);
    let dl: Vec<Value> =
        serde_json::from_slice(&ws.run(&["dlq", "list", "--json"]).stdout).unwrap();
    assert!(
        dl[0]["error"]
            .as_str()
            .unwrap()
            .contains("delivered 3 times without an outcome"),
        "{dl:?}"
    );
    assert_eq!(
        runs(),
        vec!["1 attempt=1", "1 attempt=2", "1 attempt=3", "2 attempt=1"],
        "not run a fourth time"
    );
}

/// The agent killed while a chunk of a handler that keeps no keys of its own was under way:
/// which event was in flight is not known, so none is blamed (quarantining an innocent one
/// would be worse); they come again as `redelivered`, one at a time, so a second kill blames
/// exactly the event in flight.
#[test]
fn after_a_kill_during_a_chunk_events_come_one_at_a_time_and_the_next_kill_counts_precisely() {
    let mut ws = workspace(json!({"identity": "ws-test"}));
    let dir = node_pack(
        &ws,
        "batchy",
        json!({"subscribed_event_kinds": ["conductor:job_poked"]}),
        r#"runPack({ handlers: { 'conductor:job_poked': async (event, ctx) => {
  appendFileSync('runs.txt', `${event.payload.n} attempt=${ctx.attempt} redelivered=${ctx.redelivered}\n`);
  if (event.payload.n === 2 && ctx.attempt < 2) await sleep(10000);
  return { status: 'handled' };
} } });"#,
    );
    let runs = || lines(&dir.join("runs.txt"));
    ws.start();
    // The first chunk after a start takes one event (the pack counts as keyed until it shows
    // otherwise): event 0 lets it show that, so 1 to 3 go in one chunk.
    ws.inbound("conductor:job_poked", r#"{"n":0}"#);
    wait_for("event 0", T, || (runs().len() == 1).then_some(()));
    poke(&ws, 1..4);
    for (kill, lines_then) in [(1, 3), (2, 5)] {
        wait_for(&format!("event 2 in flight before kill {kill}"), T, || {
            (runs().len() == lines_then).then_some(())
        });
        ws.kill9();
        ws.start();
    }
    wait_for("all handled", T, || (runs().len() == 7).then_some(()));
    assert_eq!(
        runs(),
        vec![
            "0 attempt=1 redelivered=false",
            "1 attempt=1 redelivered=false",
            "2 attempt=1 redelivered=false",
            "1 attempt=1 redelivered=true",
            "2 attempt=1 redelivered=true",
            "2 attempt=2 redelivered=true",
            "3 attempt=1 redelivered=false",
        ]
    );
}

/// Hole 2: answers that are not acks. Before, each of them deleted the batch from the outbox
/// (20 of 20 events lost): a followed redirect (POST turned into a GET, 200), an HTML 200,
/// `accepted: 0`, and `accepted` < sent.
#[test]
fn answers_that_are_not_acks_keep_the_events_until_the_control_plane_accepts_them() {
    let mut ws = workspace(json!({"identity": "ws-test"}));
    shop_pack(&ws);
    let conductor = Conductor::start(ws.path(), "tok");
    enroll(&ws, &conductor, "tok");
    conductor.admin("/admin/faults", Some(json!({"redirect": 302})));
    ws.start();
    let faults = [
        (
            json!({"redirect": 302}),
            "HTTP 302 redirect to /login is not an ack",
        ),
        (json!({"redirect": 301}), "HTTP 301 redirect"),
        (json!({"redirect": 303}), "HTTP 303 redirect"),
        (json!({"html": true}), "HTTP 200 is not an ack"),
        (json!({"accept_at_most": 0}), "accepted 0 of"),
    ];
    let mut sent = 0;
    for (fault, says) in &faults {
        conductor.admin("/admin/faults", Some(fault.clone()));
        emit_orders(&ws, sent, 4);
        sent += 4;
        wait_for(&format!("the upstream to say {says}"), T, || {
            let s = ws.status();
            let err = s["upstream"]["last_error"]
                .as_str()
                .unwrap_or("")
                .to_string();
            (err.contains(says) && s["queue"]["durable_depth"] == sent).then_some(())
        });
        assert!(
            received_orders(&conductor).is_empty(),
            "nothing stored under {fault}"
        );
    }
    // A partial ack: 3 of each push are accepted, the rest wait, in order.
    conductor.admin("/admin/faults", Some(json!({"accept_at_most": 3})));
    let got = wait_for("all 20 at the conductor through partial acks", T, || {
        let got = received_orders(&conductor);
        (got.len() == sent).then_some(got)
    });
    let order: Vec<i64> = got.iter().map(|(n, _)| *n).collect();
    assert_eq!(order, (0..sent as i64).collect::<Vec<_>>(), "in emit order");
    assert!(
        got.iter().all(|(_, d)| *d == 1),
        "each accepted once: {got:?}"
    );
    wait_for("an empty outbox", T, || {
        (ws.status()["queue"]["durable_depth"] == 0).then_some(())
    });
}

/// Hole 3: `dlq retry` of events the control plane rejected. Before, they were written into
/// the inbound log for the emit-only producer, which never reads it: 0 of 5 arrived upstream.
#[test]
fn dlq_retry_of_events_the_upstream_rejected_sends_them_upstream_again() {
    let mut ws = workspace(json!({"identity": "ws-test"}));
    shop_pack(&ws);
    let conductor = Conductor::start(ws.path(), "tok");
    enroll(&ws, &conductor, "tok");
    conductor.admin("/admin/faults", Some(json!({"status": 422})));
    ws.start();
    emit_orders(&ws, 0, 5);
    wait_for("5 dead letters", T, || {
        (ws.status()["dead_letters"] == 5).then_some(())
    });
    let dl: Vec<Value> =
        serde_json::from_slice(&ws.run(&["dlq", "list", "--json"]).stdout).unwrap();
    assert!(dl.iter().all(|d| d["origin"] == "upstream"), "{dl:?}");
    conductor.admin("/admin/faults", Some(json!({})));
    let out = ws.run(&["dlq", "retry", "--all"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("5 back in the outbox"), "{said}");
    wait_for("all 5 at the conductor", T, || {
        (received_orders(&conductor).len() == 5).then_some(())
    });
    assert_eq!(ws.status()["dead_letters"], 0);

    // The same with the agent stopped: the retry waits in the outbox for the next start.
    conductor.admin("/admin/faults", Some(json!({"status": 400})));
    emit_orders(&ws, 5, 1);
    wait_for("1 dead letter", T, || {
        (ws.status()["dead_letters"] == 1).then_some(())
    });
    assert_eq!(ws.terminate(), Some(0));
    let out = ws.run(&["dlq", "retry", "--all"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 back in the outbox"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    conductor.admin("/admin/faults", Some(json!({})));
    ws.start();
    wait_for("the 6th at the conductor", T, || {
        (received_orders(&conductor).len() == 6).then_some(())
    });
}

/// Hole 4: inbound events for a pack that is briefly absent. Before, they were acknowledged
/// and dropped: 0 of 10 delivered after a manifest fixed at runtime, 0 of 20 for a folder
/// renamed away for a moment.
#[test]
fn a_pack_that_is_invalid_or_away_keeps_its_place_and_gets_its_events() {
    let mut ws = workspace(json!({"identity": "ws-test"}));
    let dir = node_pack(
        &ws,
        "rec",
        json!({"subscribed_event_kinds": ["conductor:job_poked"]}),
        r#"runPack({ handlers: { 'conductor:job_poked': async (event) => {
  appendFileSync('../../effects-rec.txt', `${event.payload.n}\n`);
  return { status: 'handled' };
} } });"#,
    );
    let effects = ws.path().join("effects-rec.txt");
    ws.start();
    poke(&ws, 0..1);
    wait_for("the first event", T, || {
        (lines(&effects).len() == 1).then_some(())
    });
    assert_eq!(ws.terminate(), Some(0));

    // The agent starts while the manifest has a syntax error.
    let good = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    std::fs::write(dir.join("manifest.json"), "{\"id\": \"rec\",").unwrap();
    ws.start();
    wait_for("rec invalid", T, || {
        (ws.pack_status("rec")["state"] == "invalid").then_some(())
    });
    poke(&ws, 1..11);
    std::fs::write(dir.join("manifest.json"), &good).unwrap();
    wait_for("the 10 events sent while it was invalid", T, || {
        (lines(&effects).len() == 11).then_some(())
    });

    // The folder renamed away, events sent, the folder back.
    let away = ws.path().join("rec.away");
    std::fs::rename(&dir, &away).unwrap();
    wait_for("rec stopped", T, || {
        (ws.pack_status("rec")["state"] == "stopped").then_some(())
    });
    poke(&ws, 11..31);
    std::fs::rename(&away, &dir).unwrap();
    let got = wait_for("the 20 events sent while it was away", T, || {
        let l = lines(&effects);
        (l.len() >= 31).then_some(l)
    });
    let want: Vec<String> = (0..31).map(|n| n.to_string()).collect();
    assert_eq!(got, want, "each once, in order");
}

/// Hole 5: pulled events the agent cannot parse. Before, 2 of 5 vanished (a `+00:00`
/// timestamp, no `schema_version`), counted nowhere. Now what can be read the way the platform
/// writes it is normalised, and what cannot is dead-lettered with the reason.
#[test]
fn pulled_events_are_normalised_or_dead_lettered_never_dropped() {
    let mut ws = workspace(json!({"identity": "ws-test"}));
    node_pack(
        &ws,
        "rec",
        json!({"subscribed_event_kinds": ["conductor:job_poked"]}),
        r#"runPack({ handlers: { 'conductor:job_poked': async (event) => {
  appendFileSync('../../effects-rec.txt', `${event.payload.n} ${event.timestamp}\n`);
  return { status: 'handled' };
} } });"#,
    );
    let conductor = Conductor::start(ws.path(), "tok");
    enroll(&ws, &conductor, "tok");
    ws.start();
    let ev = |n: u32, ts: &str| {
        json!({"schema_version": 2, "event_id": format!("e{n}"), "kind": "conductor:job_poked",
               "timestamp": ts, "from": "conductor", "payload": {"n": n}})
    };
    let mut no_version = ev(3, "2026-04-20T00:00:03.000Z");
    no_version.as_object_mut().unwrap().remove("schema_version");
    let events = json!([
        ev(1, "2026-04-20T00:00:01.000Z"),
        ev(2, "2026-04-20T00:00:02+00:00"),
        no_version,
        {"schema_version": 1, "kind": "task_created", "timestamp": "2026-04-20T00:00:04.000Z", "task_id": "t-4"},
        ev(5, "2026-04-20T02:00:05.000+02:00"),
    ]);
    conductor.admin(
        "/admin/publish",
        Some(json!({"workspace_id": "ws-test", "events": events, "raw": true})),
    );
    let effects = ws.path().join("effects-rec.txt");
    wait_for("4 handled and 1 dead letter", T, || {
        (lines(&effects).len() == 4 && ws.status()["dead_letters"] == 1).then_some(())
    });
    assert_eq!(
        lines(&effects),
        vec![
            "1 2026-04-20T00:00:01.000Z",
            "2 2026-04-20T00:00:02.000Z",
            "3 2026-04-20T00:00:03.000Z",
            "5 2026-04-20T00:00:05.000Z"
        ]
    );
    let dl: Vec<Value> =
        serde_json::from_slice(&ws.run(&["dlq", "list", "--json"]).stdout).unwrap();
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0]["origin"], "inbound");
    assert_eq!(dl[0]["event"]["task_id"], "t-4", "the event as it came");
    assert!(
        dl[0]["error"]
            .as_str()
            .unwrap()
            .contains("task_created: missing field \"spec_hash\""),
        "a v1 kernel event outside the platform's union: {}",
        dl[0]["error"]
    );
    assert_eq!(ws.status()["inbound"]["dead_lettered"], 1);
}

/// Deleting `.lumenflow/state` under a running agent. Before, it went unnoticed: 10 of 10
/// events accepted afterwards were gone after a restart.
#[test]
fn deleting_the_state_directory_under_a_running_agent_stops_it_and_acks_nothing_more() {
    let mut ws = workspace(json!({"identity": "ws-test"}));
    shop_pack(&ws);
    ws.start();
    emit_orders(&ws, 0, 1);
    let api = ws.api();
    std::fs::remove_dir_all(ws.path().join(".lumenflow/state")).unwrap();
    let started = Instant::now();
    let mut acked_after = 0;
    for i in 0..10 {
        if let Some(r) = api.try_emit(vec![
            json!({"kind": "shop:order_placed", "payload": {"n": i}}),
        ]) {
            if r.status == 200 {
                acked_after += 1;
            }
        }
    }
    assert_eq!(
        acked_after, 0,
        "nothing is acknowledged into a deleted database"
    );
    let code = wait_for("the agent to stop", Duration::from_secs(10), || {
        ws.child
            .as_mut()
            .unwrap()
            .try_wait()
            .unwrap()
            .map(|s| s.code())
    });
    assert!(
        matches!(code, Some(c) if c != 0),
        "exits non-zero, got {code:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        ws.log().contains("was deleted under the running agent"),
        "{}",
        ws.log()
    );
}

/// `runtime.concurrency`: handlers run at once, so a call cannot be told apart by "the oldest
/// event in flight" any more; each names its own delivery. Here event 1 is slow and event 2
/// emits, then crashes: its emit must go with its crashed attempt (dropped), not with event 1,
/// which was still in flight and is committed (before, the emit was in the inbox once from
/// the crashed attempt and once from the next).
#[test]
fn with_runtime_concurrency_a_call_belongs_to_the_event_that_made_it() {
    let mut ws = workspace(json!({"identity": "ws-test"}));
    node_pack(
        &ws,
        "calls",
        json!({"subscribed_event_kinds": ["conductor:job_poked"],
               "emitted_event_kinds": ["calls:noted"],
               "backpressure_policy": {"calls:noted": "queue"},
               "runtime": {"command": ["node", "handler.mjs"], "concurrency": 4}}),
        r#"runPack({ handlers: { 'conductor:job_poked': async (event, ctx) => {
  if (event.payload.n === 1) { await sleep(500); return { status: 'handled' }; }
  await ctx.emit('calls:noted', { n: event.payload.n, attempt: ctx.attempt });
  if (ctx.attempt === 1) throw new Error('crash after the emit');
  return { status: 'handled' };
} } });"#,
    );
    ws.start();
    poke(&ws, 1..3);
    wait_for("both handled", T, || {
        (ws.pack_status("calls")["handled"] == 2).then_some(())
    });
    let noted: Vec<Value> = inbox_kinds(&ws, "calls:noted")
        .into_iter()
        .map(|e| e["event"]["payload"].clone())
        .collect();
    assert_eq!(noted, vec![json!({"n": 2, "attempt": 2})]);
}

/// A keyed handler (the quickstart's has, effect, put) with `runtime.concurrency` N: a kill
/// re-runs the effects of at most N events, including a kill during the first chunk after a
/// start (before, that chunk took a whole window of 32 events before its first commit).
#[test]
fn a_kill_re_runs_at_most_runtime_concurrency_keyed_effects() {
    for concurrency in [1, 4] {
        let mut ws = workspace(json!({"identity": "ws-test"}));
        let dir = node_pack(
            &ws,
            "keyed",
            json!({"subscribed_event_kinds": ["conductor:job_poked"],
                   "runtime": {"command": ["node", "handler.mjs"], "concurrency": concurrency}}),
            r#"runPack({ handlers: { 'conductor:job_poked': async (event, ctx) => {
  const key = `job:${event.payload.n}`;
  if (await ctx.replayLog.has(key)) return { status: 'replayed' };
  appendFileSync('effects.txt', `${event.payload.n}\n`);
  await sleep(5);
  await ctx.replayLog.put(key);
  return { status: 'handled' };
} } });"#,
        );
        let effects = || lines(&dir.join("effects.txt"));
        ws.start();
        poke(&ws, 0..120);
        // Kills mid-stream, the second and third just after a start (in the first chunk).
        let mut kills = 0;
        for at in [30, 31, 32] {
            wait_for(&format!("{at} effects"), T, || {
                (effects().len() >= at).then_some(())
            });
            ws.kill9();
            kills += 1;
            ws.start();
        }
        wait_for("every event's effect", T, || {
            let mut seen = effects();
            seen.sort();
            seen.dedup();
            (seen.len() == 120).then_some(())
        });
        let all = effects();
        let reruns = all.len() - 120;
        assert!(
            reruns <= concurrency * kills,
            "concurrency {concurrency}: {reruns} effects re-run after {kills} kills (at most {} allowed)",
            concurrency * kills
        );
        ws.kill9();
    }
}

/// `emit` and `replayLog.put` do not wait for the agent's answer (they are staged with the
/// outcome anyway), so a refusal nobody waited for must still decide the outcome: the 10,001st
/// emit of one delivery is refused, and the event is dead-lettered with that reason and none
/// of its emits, instead of being committed as handled with 10,000 of them.
#[test]
fn an_emit_refused_without_anyone_waiting_decides_the_outcome() {
    let mut ws = workspace(json!({"identity": "ws-test"}));
    node_pack(
        &ws,
        "chatty",
        json!({"subscribed_event_kinds": ["conductor:job_poked"],
               "emitted_event_kinds": ["chatty:said"],
               "backpressure_policy": {"chatty:said": "queue"}}),
        r#"runPack({ handlers: { 'conductor:job_poked': async (event, ctx) => {
  const n = event.payload.n === 1 ? 10001 : 1;
  for (let i = 0; i < n; i++) await ctx.emit('chatty:said', { of: event.payload.n, i });
  return { status: 'handled' };
} } });"#,
    );
    ws.start();
    poke(&ws, 1..3);
    wait_for("event 2 handled", T, || {
        (ws.pack_status("chatty")["handled"] == 1).then_some(())
    });
    let dl: Vec<Value> =
        serde_json::from_slice(&ws.run(&["dlq", "list", "--json"]).stdout).unwrap();
    assert_eq!(dl.len(), 1, "{dl:?}");
    let error = dl[0]["error"].as_str().unwrap();
    assert!(
        error.contains("an emit was refused: Too many emits"),
        "{error}"
    );
    let said: Vec<Value> = inbox_kinds(&ws, "chatty:said")
        .into_iter()
        .map(|e| e["event"]["payload"].clone())
        .collect();
    assert_eq!(
        said.len(),
        1,
        "emits in the inbox, of event 1 too: {:?}",
        &said[..2.min(said.len())]
    );
    assert_eq!(said[0], json!({"of": 2, "i": 0}));
}
