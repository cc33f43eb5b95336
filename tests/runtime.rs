//! The actor runtime end to end (issue: `start` and `status` on the embedded default): the real
//! binary, a temporary workspace, a real SQLite file, the real local API.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

fn count_by_id(inbox: &[Value]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in inbox {
        *m.entry(r["event"]["event_id"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    m
}

#[test]
fn emit_reaches_local_subscriber_and_mem_inbox_with_the_same_event_id() {
    let mut ws = Workspace::new(json!({"identity": "ws-test"}), "recorder,emitter");
    ws.start();
    let out = ws.run(&[
        "emit",
        "emitter:job_completed",
        "--payload",
        r#"{"job_id":"job-1"}"#,
        "--idempotency-key",
        "job-1:completed",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // The published derivation (packs/event-id-vectors.json), computed independently.
    assert_eq!(
        id, "d59755c8-800a-5c47-8e07-275b0bbaf713",
        "prints the event id"
    );
    // Deterministic: the same key gives the same id.
    let again = ws.run(&[
        "emit",
        "emitter:job_completed",
        "--payload",
        r#"{"job_id":"job-1"}"#,
        "--idempotency-key",
        "job-1:completed",
    ]);
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), id);

    let line = format!("emitter:job_completed {id} attempt=1");
    wait_for("the recorder's effect", T, || {
        ws.effects().contains(&line).then_some(())
    });
    // mem:inbox dedupes by event_id, as a control plane does: the retry is stored once.
    let inbox = wait_for("mem:inbox to hold the event", T, || {
        let i = ws.inbox();
        (!i.is_empty()).then_some(i)
    });
    assert_eq!(inbox.len(), 1, "{inbox:?}");
    let e = &inbox[0]["event"];
    assert_eq!(e["event_id"], id);
    assert_eq!(e["kind"], "emitter:job_completed");
    assert_eq!(e["from"], "ws-test");
    assert_eq!(e["schema_version"], 2);
    assert_eq!(e["payload"]["job_id"], "job-1");
    // The second emit is the same event: the recorder handled it once, replayed it once.
    let p = wait_for("two deliveries counted", T, || {
        let p = ws.pack_status("recorder");
        (p["handled"].as_u64().unwrap_or(0) + p["replayed"].as_u64().unwrap_or(0) == 2).then_some(p)
    });
    assert_eq!(p["handled"], 1);
    assert_eq!(p["replayed"], 1);
    assert_eq!(ws.effects().len(), 1, "{:?}", ws.effects());
    assert_eq!(ws.terminate(), Some(0));
}

#[test]
fn the_same_inbound_event_twice_reaches_the_handler_once() {
    let mut ws = Workspace::new(json!({}), "recorder");
    ws.start();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let out = ws.run(&[
            "emit",
            "conductor:recovery_requested",
            "--inbound",
            "--payload",
            r#"{"wu_id":"acme-job-1"}"#,
            "--idempotency-key",
            "rec-1",
        ]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ids.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    assert_eq!(ids[0], ids[1]);
    let p = wait_for("handled + replayed", T, || {
        let p = ws.pack_status("recorder");
        (p["replayed"] == 1).then_some(p)
    });
    assert_eq!(p["handled"], 1, "{p}");
    assert_eq!(ws.effects().len(), 1);
    // An inbound event nobody subscribes to is accepted and counted, not delivered.
    ws.inbound("conductor:other_thing", "{}");
    assert_eq!(ws.status()["inbound"]["unrouted"], 1);
}

#[test]
fn an_undeclared_kind_is_refused_and_nothing_is_stored() {
    let mut ws = Workspace::new(json!({}), "recorder,emitter");
    ws.start();
    let out = ws.run(&["emit", "emitter:job_started", "--payload", "{}"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(r#"Unknown kind at emit: pack "emitter" does not declare "emitter:job_started" in emitted_event_kinds"#),
        "{err}"
    );
    let api = ws.api();
    // A batch with one bad event is refused whole: the good one is not stored either.
    let r = api.emit(vec![
        json!({"kind": "emitter:job_completed", "payload": {}}),
        json!({"kind": "nobody:thing", "payload": {}}),
    ]);
    assert_eq!(r.status, 422);
    assert_eq!(
        r.body["error"]["message"],
        r#"events[1]: Unknown kind at emit: no loaded pack has the slug "nobody" (kind "nobody:thing")"#
    );
    let r = api.emit(vec![
        json!({"kind": "conductor:recovery_requested", "payload": {}}),
    ]);
    assert_eq!(r.status, 422);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("reserved namespace"),
        "{}",
        r.body
    );
    let s = ws.status();
    assert_eq!(s["queue"]["accepted_queue"], 0);
    assert_eq!(s["queue"]["durable_depth"], 0);
    assert!(ws.inbox().is_empty());
    assert!(ws.effects().is_empty());
}

/// A body far over the limit is read to its end and answered 413: closing with it unread
/// reset the connection, and the sender saw "connection reset" instead of the reason.
#[test]
fn an_oversized_body_is_answered_413_not_reset() {
    use std::io::{Read, Write};
    let mut ws = Workspace::new(json!({}), "");
    ws.start();
    let api = ws.api();
    let addr = api.url.trim_start_matches("http://").to_string();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    let size = 20 << 20;
    write!(
        s,
        "POST /api/v1/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {size}\r\n\r\n",
        api.token
    )
    .unwrap();
    let chunk = vec![b' '; 1 << 20];
    for _ in 0..20 {
        s.write_all(&chunk).expect("the agent reads the whole body");
    }
    let mut reply = String::new();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("Payload too large"), "{reply}");
}

#[test]
fn bad_api_input_gets_a_clear_4xx_and_the_agent_keeps_serving() {
    let mut ws = Workspace::new(json!({}), "recorder,emitter");
    ws.start();
    let api = ws.api();
    let good = json!({"events": [{"kind": "emitter:job_completed", "payload": {}}]})
        .to_string()
        .into_bytes();

    let r = api.post_raw("/api/v1/events", good.clone(), None);
    assert_eq!(r.status, 401);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Unauthorized: missing"),
        "{}",
        r.body
    );
    let r = api.post_raw("/api/v1/events", good.clone(), Some("not-the-token"));
    assert_eq!(r.status, 401);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("Unauthorized: wrong token"));

    let r = api.post_raw(
        "/api/v1/events",
        b"{\"events\": [".to_vec(),
        Some(&api.token),
    );
    assert_eq!(r.status, 400);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Malformed JSON"),
        "{}",
        r.body
    );
    let r = api.post_raw("/api/v1/events", b"[]".to_vec(), Some(&api.token));
    assert_eq!(r.status, 400);

    let big = vec![b' '; 9 << 20];
    let r = api.post_raw("/api/v1/events", big, Some(&api.token));
    assert_eq!(r.status, 413);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Payload too large"));

    let many: Vec<Value> = (0..10_001)
        .map(|_| json!({"kind": "emitter:job_completed", "payload": {}}))
        .collect();
    let r = api.emit(many);
    assert_eq!(r.status, 413);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Batch too large: 10001 events"),
        "{}",
        r.body
    );

    let r = api.emit(vec![
        json!({"kind": "emitter:job_completed", "payload": []}),
    ]);
    assert_eq!(r.status, 422);
    assert_eq!(
        r.body["error"]["message"],
        "events[0]: invalid event: field \"payload\" must be a JSON object"
    );
    let r = api.emit(vec![json!({"schema_version": 1, "event_id": "x", "kind": "emitter:job_completed", "timestamp": "2026-04-20T00:00:00.000Z", "from": "w", "payload": {}})]);
    assert_eq!(r.status, 422);
    // schema_version 1 is the platform's v1 kernel union, which has no such kind.
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown v1 kernel event kind \"emitter:job_completed\""),
        "{}",
        r.body
    );
    let mut deep = json!(1);
    for _ in 0..100 {
        deep = json!([deep]);
    }
    let r = api.emit(vec![
        json!({"kind": "emitter:job_completed", "payload": {"d": deep}}),
    ]);
    assert_eq!(r.status, 400, "{}", r.body);

    // Still serving, and nothing of the above was accepted.
    let r = api.post_raw("/api/v1/events", good, Some(&api.token));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["accepted"], 1);
    assert_eq!(ws.status()["queue"]["accepted_queue"], 1);
    let r = api.get("/v1/nope");
    assert_eq!(r.status, 404);
}

#[test]
fn a_complete_envelope_keeps_its_event_id_and_fields() {
    let mut ws = Workspace::new(json!({}), "emitter");
    ws.start();
    let env = json!({"schema_version": 2, "event_id": "evt-from-sdk-1", "kind": "emitter:job_completed",
        "timestamp": "2026-04-20T00:00:00.000Z", "from": "ws-sdk", "payload": {"job_id": "j"}, "trace_id": "t-1"});
    let r = ws.api().emit(vec![env.clone()]);
    assert_eq!(r.status, 200, "{}", r.body);
    let inbox = wait_for("inbox", T, || {
        let i = ws.inbox();
        (!i.is_empty()).then_some(i)
    });
    assert_eq!(inbox[0]["event"], env, "passed through unchanged");
}

/// Producers emit batches of queue events until the agent dies; returns the acknowledged ids.
fn produce_until_killed(
    api: &Api,
    threads: usize,
    acked_total: &std::sync::atomic::AtomicUsize,
) -> Vec<String> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut acked = Vec::new();
                    for b in 0..10_000 {
                        let events: Vec<Value> =
                            (0..100).map(|i| json!({"kind": "emitter:job_completed", "payload": {"t": t, "n": b * 100 + i}})).collect();
                        match api.try_emit(events) {
                            Some(r) if r.status == 200 => {
                                let ids = r.body["event_ids"].as_array().unwrap();
                                acked.extend(ids.iter().map(|v| v.as_str().unwrap().to_string()));
                                acked_total.fetch_add(ids.len(), std::sync::atomic::Ordering::SeqCst);
                            }
                            _ => break, // the agent is gone
                        }
                    }
                    acked
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

/// kill -9 mid-stream, 3 times: every acknowledged queue event ends in mem:inbox exactly once.
/// (With nothing waiting, an accepted event is written straight into mem:inbox in the
/// accepting transaction; under a backlog it waits in the outbox and moves in one
/// transaction. The outbox path across kills is exercised by the conductor-mode kill test in
/// `reliability.rs`.)
#[test]
fn kill_9_with_undelivered_queue_events_then_restart_delivers_each_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mut ws = Workspace::new(json!({"durability": "full"}), "emitter");
    let mut all_acked = Vec::new();
    let mut stranded = 0;
    for _round in 0..3 {
        ws.start();
        let api = ws.api();
        let acked_total = AtomicUsize::new(0);
        let acked = std::thread::scope(|s| {
            let producer = s.spawn(|| produce_until_killed(&api, 3, &acked_total));
            wait_for("3000 acknowledged", T, || {
                (acked_total.load(Ordering::SeqCst) >= 3000).then_some(())
            });
            ws.kill9();
            producer.join().unwrap()
        });
        all_acked.extend(acked);
        let durable = ws.status();
        assert_eq!(durable["agent"]["running"], false);
        stranded += durable["durable"]["queue"]["durable_depth"]
            .as_u64()
            .unwrap();
    }

    ws.start();
    wait_for("the outbox to drain", T, || {
        (ws.status()["queue"]["durable_depth"] == 0).then_some(())
    });
    let counts = count_by_id(&ws.inbox());
    let missing = all_acked
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .count();
    let dupes = counts.values().filter(|n| **n > 1).count();
    eprintln!(
        "kill -9: {} acked, {stranded} stranded in the outbox at the kill, {} in mem:inbox, {missing} lost, {dupes} duplicated",
        all_acked.len(),
        counts.len()
    );
    assert_eq!(missing, 0, "acknowledged events lost after kill -9");
    assert_eq!(dupes, 0, "events delivered twice after kill -9");
}

#[test]
fn status_without_agent_exits_3_and_shows_durable_state() {
    let mut ws = Workspace::new(json!({}), "emitter");
    let out = ws.run(&["status"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not running"));
    ws.start();
    assert_eq!(
        ws.api()
            .emit(vec![
                json!({"kind": "emitter:job_completed", "payload": {}})
            ])
            .status,
        200
    );
    wait_for("delivery", T, || (ws.inbox().len() == 1).then_some(()));
    assert_eq!(ws.terminate(), Some(0));
    assert!(!ws.api_file().exists(), "api.json is removed at shutdown");
    let out = ws.run(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(3));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["agent"]["running"], false);
    assert_eq!(v["durable"]["mem_inbox"], 1);
    assert_eq!(v["durable"]["queue"]["durable_depth"], 0);
}

#[test]
fn one_agent_per_workspace_and_state_files_are_private() {
    let mut ws = Workspace::new(json!({}), "emitter");
    ws.start();
    let pid = ws.child.as_ref().unwrap().id();
    let out = ws.run(&["start"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already running in") && err.contains(&format!("(pid {pid})")),
        "{err}"
    );
    use std::os::unix::fs::PermissionsExt;
    for f in [
        ".lumenflow/state/agent/api.json",
        ".lumenflow/state/agent/agent.db",
    ] {
        let mode = std::fs::metadata(ws.path().join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let mode = std::fs::metadata(ws.path().join(".lumenflow/state/agent"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);
}

#[test]
fn metrics_and_heartbeat() {
    let mut ws = Workspace::new(json!({}), "recorder,emitter");
    ws.start();
    let api = ws.api();
    assert_eq!(
        api.emit(vec![
            json!({"kind": "emitter:job_completed", "payload": {}})
        ])
        .status,
        200
    );
    wait_for("handled", T, || {
        (ws.pack_status("recorder")["handled"] == 1).then_some(())
    });
    let r = api.get("/metrics");
    assert_eq!(r.status, 200);
    let text = r.body.as_str().unwrap().to_string();
    assert!(
        text.contains("lumenflow_agent_pack_handled_total{pack=\"recorder\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("lumenflow_agent_queue_accepted_queue_total 1"),
        "{text}"
    );
    let identity = ws.status()["agent"]["identity"].clone();
    let r = api.post(
        "/api/v1/heartbeat",
        &json!({"workspace_id": identity, "session_id": "s"}),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body["status"], "ok");
}

#[test]
fn ephemeral_events_and_a_full_queue_pushes_back() {
    let mut ws = Workspace::new(json!({"queue": {"max_depth": 5}}), "emitter");
    ws.start();
    let api = ws.api();
    // Ephemeral kinds never count against the durable queue.
    let r = api.emit(
        (0..50)
            .map(|_| json!({"kind": "emitter:tick", "payload": {}}))
            .collect(),
    );
    assert_eq!(r.status, 200);
    // Six durable events in one batch cannot fit in a queue of five: refused whole, 429.
    let r = api.emit(
        (0..6)
            .map(|_| json!({"kind": "emitter:job_completed", "payload": {}}))
            .collect(),
    );
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(
        r.headers
            .iter()
            .any(|(k, v)| k == "retry-after" && v == "1"),
        "{:?}",
        r.headers
    );
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("Backpressure"));
    let r = api.emit(
        (0..5)
            .map(|_| json!({"kind": "emitter:job_completed", "payload": {}}))
            .collect(),
    );
    assert_eq!(r.status, 200);
    wait_for("all delivered", T, || {
        (ws.inbox().len() == 55).then_some(())
    });
    let s = ws.status();
    assert_eq!(s["queue"]["accepted_ephemeral"], 50);
    assert_eq!(s["queue"]["backpressure_rejections"], 1);
}

/// Regression: concurrent inbound batches once reached a pack out of commit order and 2.4% of
/// the events were skipped. 4 clients x 50 batches x 100 events, past the 10k in-memory queue
/// (so the reload-from-log path runs too): every event is handled exactly once.
/// Duplicates spread over many chunks, while the agent carries replay-log lookups from one
/// chunk's commit to the next (the handler takes 1 ms, so chunks end on time with events
/// queued behind them): every event handled once, every repeat `replayed`.
#[test]
fn repeated_events_across_chunks_are_replayed_not_handled_again() {
    let mut ws = Workspace::new(json!({"durability": "normal"}), "recorder");
    ws.start();
    let api = ws.api();
    let envelope = |n: usize| {
        json!({"schema_version": 2, "event_id": format!("0193b000-0000-7000-8000-{n:012}"),
            "kind": "conductor:recovery_requested", "timestamp": "2026-11-25T00:00:00.000Z",
            "from": "conductor", "payload": {"n": n, "sleep_ms": 1}})
    };
    // 0..1000, then 500..2000 (500 repeats among 1000 new), then 1950..2050 (repeats
    // straddling the end), in batches of 100.
    for range in [0..1000, 500..2000, 1950..2050] {
        let all: Vec<usize> = range.collect();
        for batch in all.chunks(100) {
            let events: Vec<Value> = batch.iter().map(|n| envelope(*n)).collect();
            let r = api.post("/v1/inbound", &json!({"events": events}));
            assert_eq!(r.status, 200, "{}", r.body);
        }
    }
    let p = wait_for(
        "2050 handled, 550 replayed",
        Duration::from_secs(60),
        || {
            let p = ws.pack_status("recorder");
            (p["handled"].as_u64().unwrap_or(0) + p["replayed"].as_u64().unwrap_or(0) >= 2600
                && p["pending"] == 0)
                .then_some(p)
        },
    );
    assert_eq!(p["handled"], 2050, "{p}");
    assert_eq!(p["replayed"], 550, "{p}");
    let mut seen: HashMap<String, usize> = HashMap::new();
    for line in ws.effects() {
        *seen
            .entry(line.split(' ').nth(1).unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2050);
    assert!(seen.values().all(|n| *n == 1), "an effect happened twice");
}

#[test]
fn concurrent_inbound_batches_are_each_handled_exactly_once() {
    let mut ws = Workspace::new(json!({"durability": "normal"}), "recorder");
    ws.start();
    let api = ws.api();
    let ids: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|c| {
                let api = &api;
                s.spawn(move || {
                    let mut ids = Vec::new();
                    for b in 0..50 {
                        let events: Vec<Value> = (0..100)
                            .map(|i| json!({"kind": "conductor:recovery_requested", "payload": {"c": c, "n": b * 100 + i}}))
                            .collect();
                        let r = api.post("/v1/inbound", &json!({"events": events}));
                        assert_eq!(r.status, 200, "{}", r.body);
                        ids.extend(r.body["event_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()));
                    }
                    ids
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(ids.len(), 20_000);
    wait_for("20000 handled", Duration::from_secs(60), || {
        (ws.pack_status("recorder")["handled"] == 20_000).then_some(())
    });
    let mut seen: HashMap<String, usize> = HashMap::new();
    for line in ws.effects() {
        *seen
            .entry(line.split(' ').nth(1).unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 20_000);
    assert!(seen.values().all(|n| *n == 1), "an effect happened twice");
    assert!(ids.iter().all(|id| seen.contains_key(id)));
    assert!(
        !ws.log().contains("out of order"),
        "rows reached the pack out of commit order"
    );
}

#[test]
fn a_corrupt_database_is_a_clear_error_with_a_way_out_not_a_crash_loop() {
    let mut ws = Workspace::new(json!({}), "emitter");
    ws.start();
    assert_eq!(
        ws.api()
            .emit(vec![
                json!({"kind": "emitter:job_completed", "payload": {}})
            ])
            .status,
        200
    );
    assert_eq!(ws.terminate(), Some(0));
    let db = ws.path().join(".lumenflow/state/agent/agent.db");
    // Overwrite the middle of the file: the header survives, the pages do not.
    let mut bytes = std::fs::read(&db).unwrap();
    assert!(bytes.len() > 8192, "{}", bytes.len());
    for b in bytes[4096..].iter_mut() {
        *b = 0x5a;
    }
    std::fs::write(&db, &bytes).unwrap();
    let _ = std::fs::remove_file(db.with_extension("db-wal"));
    let out = ws.run(&["start"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("state database .lumenflow/state/agent/agent.db")
            && err.contains("corrupt")
            && err.contains("move it aside"),
        "{err}"
    );
    // Truncated to garbage: the same clear error.
    std::fs::write(&db, b"this is not a database").unwrap();
    let out = ws.run(&["start"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("move it aside"));
    // The way out works.
    std::fs::rename(&db, db.with_extension("db.corrupt")).unwrap();
    ws.start();
    assert_eq!(
        ws.api()
            .emit(vec![
                json!({"kind": "emitter:job_completed", "payload": {}})
            ])
            .status,
        200
    );
}

/// The inbound log is compacted past every pack's cursor (at start and hourly), and sequence
/// numbers are never reused afterwards: events that arrive after the log was emptied are still
/// delivered (a reused seq would fall behind the cursors and be skipped forever).
#[test]
fn the_inbound_log_is_compacted_and_new_events_still_arrive_after_it_emptied() {
    let mut ws = Workspace::new(json!({}), "recorder");
    ws.start();
    for _ in 0..20 {
        ws.inbound("conductor:recovery_requested", "{}");
    }
    wait_for("20 handled", T, || {
        (ws.pack_status("recorder")["handled"] == 20).then_some(())
    });
    assert_eq!(ws.terminate(), Some(0));
    assert_eq!(ws.status()["durable"]["inbound_log"], 20);
    // The next start compacts (every pack has passed all 20 rows).
    ws.start();
    assert_eq!(ws.terminate(), Some(0));
    assert_eq!(ws.status()["durable"]["inbound_log"], 0, "compacted");
    ws.start();
    let id = ws.inbound("conductor:recovery_requested", "{}");
    wait_for("the new event handled", T, || {
        ws.effects().iter().any(|l| l.contains(&id)).then_some(())
    });
    assert_eq!(ws.effects().len(), 21);
}
