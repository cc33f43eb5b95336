//! Conductor mode end to end: the agent and the development conductor as two processes
//! (SPEC §9, LUMENFLOW-FACTS.md wire protocol).

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

#[test]
fn acme_demo_in_conductor_mode_events_on_the_wire_and_inbound_once() {
    let mut ws = Workspace::new(json!({}), "");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    copy_dir(
        &repo.join("packs/acme-demo"),
        &ws.path().join("packs/acme-demo"),
    );
    copy_dir(&repo.join("packs/node"), &ws.path().join("packs/node"));
    let c = Conductor::start(ws.path(), "tok-1");
    enroll(&ws, &c, "tok-1");
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(ws.path().join(".lumenflow/state/conductor/enrollment.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode, 0o600);
    ws.start();
    for _ in 0..2 {
        c.publish("ws-test", json!([{"kind": "conductor:recovery_requested", "event_id": "evt-rec-1", "payload": {"wu_id": "acme-job-1"}}]));
    }
    let got = wait_for("job_completed at the conductor", T, || {
        let r = c.received();
        (!r.is_empty()).then_some(r)
    });
    let expected = lumenflow_agent::sdk::envelope::idempotent_event_id(
        "ws-test",
        "acme-demo:job_completed",
        "acme-job-1:completed",
    );
    assert_eq!(got[0]["event"]["event_id"], expected.to_string());
    assert_eq!(got[0]["event"]["from"], "ws-test");
    assert_eq!(got[0]["workspace_id"], "ws-test");
    let p = wait_for("handled once, replayed once", T, || {
        let p = ws.pack_status("acme-demo");
        (p["replayed"] == 1).then_some(p)
    });
    assert_eq!(p["handled"], 1);
    let s = ws.status();
    assert_eq!(s["upstream"]["mode"], "http");
    assert_eq!(s["upstream"]["state"], "connected");
    assert_eq!(s["upstream"]["pulled"], 2);
    assert!(!ws.log().contains("tok-1"), "the token is never logged");
}

#[test]
fn an_enrollment_readable_by_others_is_refused() {
    let ws = Workspace::new(json!({}), "emitter");
    let c = Conductor::start(ws.path(), "tok");
    enroll(&ws, &c, "tok");
    let f = ws.path().join(".lumenflow/state/conductor/enrollment.json");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = ws.run(&["start"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is readable by group or others (mode 644)") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!err.contains("tok\""), "{err}");
}

#[test]
fn a_rejected_event_is_dead_lettered_alone_with_the_reason() {
    let mut ws = Workspace::new(json!({}), "emitter");
    let c = Conductor::start(ws.path(), "tok");
    enroll(&ws, &c, "tok");
    c.admin(
        "/admin/faults",
        Some(json!({"reject_event_ids": ["evt-bad"]})),
    );
    ws.start();
    let events: Vec<Value> = ["evt-1", "evt-2", "evt-bad", "evt-4", "evt-5"]
        .iter()
        .map(|id| json!({"schema_version": 2, "event_id": id, "kind": "emitter:job_completed", "timestamp": "2026-04-20T00:00:00.000Z", "from": "ws-test", "payload": {}}))
        .collect();
    assert_eq!(ws.api().emit(events).status, 200);
    wait_for("four delivered", T, || {
        (c.received().len() == 4).then_some(())
    });
    wait_for("the queue drained", T, || {
        (ws.status()["queue"]["durable_depth"] == 0).then_some(())
    });
    let ids: Vec<String> = c
        .received()
        .iter()
        .map(|r| r["event"]["event_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["evt-1", "evt-2", "evt-4", "evt-5"]);
    let out = ws.run(&["dlq", "list", "--json"]);
    let dead: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["event_id"], "evt-bad");
    assert!(
        dead[0]["error"].as_str().unwrap().contains("HTTP 422")
            && dead[0]["error"]
                .as_str()
                .unwrap()
                .contains("schema check failed"),
        "{}",
        dead[0]
    );
}

#[test]
fn a_wrong_token_pauses_as_unauthorized_and_fixing_it_resumes_with_nothing_dropped() {
    let mut ws = Workspace::new(json!({}), "emitter");
    let c = Conductor::start(ws.path(), "right");
    enroll(&ws, &c, "wrong");
    ws.start();
    let api = ws.api();
    assert_eq!(
        api.emit(
            (0..3)
                .map(|i| json!({"kind": "emitter:job_completed", "payload": {"n": i}}))
                .collect()
        )
        .status,
        200
    );
    let s = wait_for("unauthorized", T, || {
        let s = ws.status();
        (s["upstream"]["state"] == "unauthorized").then_some(s)
    });
    assert_eq!(s["queue"]["durable_depth"], 3);
    assert!(c.received().is_empty());
    enroll(&ws, &c, "right");
    wait_for("delivered after the fix", T, || {
        (c.received().len() == 3).then_some(())
    });
    let s = wait_for("connected", T, || {
        let s = ws.status();
        (s["upstream"]["state"] == "connected").then_some(s)
    });
    assert_eq!(s["queue"]["durable_depth"], 0);
    // Connected again: the refusal is history (status said "(connected) last error:
    // unauthorized" after the fix).
    assert!(s["upstream"]["last_error"].is_null(), "{}", s["upstream"]);
    assert_eq!(s["upstream"]["last_error_ms"], 0);
}

/// A refused token shows as `unauthorized` even with nothing to push (the heartbeat was
/// refused and status said `connecting`), and the fixed token is picked up live.
#[test]
fn a_wrong_token_shows_as_unauthorized_with_nothing_to_push() {
    let mut ws = Workspace::new(json!({}), "");
    let c = Conductor::start(ws.path(), "right");
    enroll(&ws, &c, "wrong");
    ws.start();
    let s = wait_for("unauthorized", T, || {
        let s = ws.status();
        (s["upstream"]["state"] == "unauthorized").then_some(s)
    });
    assert!(
        s["upstream"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("heartbeat: HTTP 401")),
        "{}",
        s["upstream"]
    );
    enroll(&ws, &c, "right");
    let s = wait_for("connected after the fix, without a restart", T, || {
        let s = ws.status();
        (s["upstream"]["state"] == "connected").then_some(s)
    });
    assert!(s["upstream"]["last_error"].is_null(), "{}", s["upstream"]);
}

#[test]
fn a_client_speaking_the_sdk_wire_format_reaches_the_conductor_through_the_agent() {
    let mut ws = Workspace::new(json!({}), "emitter");
    let c = Conductor::start(ws.path(), "tok");
    enroll(&ws, &c, "tok");
    ws.start();
    // What the LumenFlow SDK's HTTP sync port sends: POST {workspace_id, events}, bearer token.
    let sdk_event = json!({"schema_version": 2, "event_id": "0a27416d-e7f4-5565-be7e-675b6c7932d8", "kind": "emitter:job_completed",
        "timestamp": "2026-04-20T00:00:00.000Z", "from": "ws-test", "payload": {"job_id": "job-1", "result": "ok"}, "wu_id": "WU-7"});
    let api = ws.api();
    let r = api.post(
        "/api/v1/events",
        &json!({"workspace_id": "ws-test", "events": [sdk_event.clone()]}),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body["accepted"], 1);
    let got = wait_for("at the conductor", T, || {
        let r = c.received();
        (!r.is_empty()).then_some(r)
    });
    assert_eq!(got[0]["event"], sdk_event, "passed through unchanged");
}

/// A 30-second conductor outage with events emitted throughout: every queue event arrives
/// after recovery, in order, once; ephemeral events emitted during the outage are counted as
/// dropped and none is delivered late.
#[test]
fn a_30_second_outage_loses_no_queue_event_and_delivers_no_ephemeral_late() {
    let outage = Duration::from_secs(
        std::env::var("LUMENFLOW_TEST_OUTAGE_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30),
    );
    let mut ws = Workspace::new(json!({}), "emitter");
    let mut c = Conductor::start(ws.path(), "tok");
    enroll(&ws, &c, "tok");
    ws.start();
    let api = ws.api();
    let t0 = Instant::now();
    let mut queue_ids: Vec<String> = Vec::new();
    let mut ephemeral: Vec<(String, Duration)> = Vec::new();
    let emit_for =
        |d: Duration, queue_ids: &mut Vec<String>, ephemeral: &mut Vec<(String, Duration)>| {
            let until = Instant::now() + d;
            while Instant::now() < until {
                let r = api.emit(vec![
                    json!({"kind": "emitter:job_completed", "payload": {}}),
                    json!({"kind": "emitter:tick", "payload": {}}),
                ]);
                assert_eq!(r.status, 200, "{}", r.body);
                queue_ids.push(r.body["event_ids"][0].as_str().unwrap().to_string());
                ephemeral.push((
                    r.body["event_ids"][1].as_str().unwrap().to_string(),
                    t0.elapsed(),
                ));
                std::thread::sleep(Duration::from_millis(50));
            }
        };
    emit_for(Duration::from_secs(2), &mut queue_ids, &mut ephemeral);
    c.kill();
    let down_at = t0.elapsed();
    emit_for(outage, &mut queue_ids, &mut ephemeral);
    let s = ws.status();
    assert!(
        s["queue"]["durable_depth"].as_i64().unwrap() > 0,
        "queue events wait durably: {s}"
    );
    assert!(
        s["upstream"]["state"]
            .as_str()
            .unwrap()
            .starts_with("backoff"),
        "{s}"
    );
    c.restart();
    let up_at = t0.elapsed();
    emit_for(Duration::from_secs(2), &mut queue_ids, &mut ephemeral);
    wait_for("the queue drained", Duration::from_secs(90), || {
        (ws.status()["queue"]["durable_depth"] == 0).then_some(())
    });

    let received = c.received();
    let order: Vec<String> = received
        .iter()
        .filter(|r| r["event"]["kind"] == "emitter:job_completed")
        .map(|r| r["event"]["event_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(order, queue_ids, "every queue event, in emit order, once");
    let redelivered: i64 = received
        .iter()
        .map(|r| r["deliveries"].as_i64().unwrap() - 1)
        .sum();
    let got: HashMap<&str, ()> = received
        .iter()
        .map(|r| (r["event"]["event_id"].as_str().unwrap(), ()))
        .collect();
    // Ephemeral events emitted while the conductor was down (with a 1 s margin for the agent to
    // notice) never arrive late.
    let during: Vec<&(String, Duration)> = ephemeral
        .iter()
        .filter(|(_, at)| *at > down_at + Duration::from_secs(1) && *at < up_at)
        .collect();
    let late = during
        .iter()
        .filter(|(id, _)| got.contains_key(id.as_str()))
        .count();
    assert_eq!(late, 0, "ephemeral events delivered late");
    let dropped = ws.status()["queue"]["ephemeral_dropped"].as_u64().unwrap();
    assert!(
        dropped >= during.len() as u64,
        "{dropped} dropped < {} emitted during the outage",
        during.len()
    );
    eprintln!(
        "outage {:?}: {} queue events, all delivered in order ({redelivered} redeliveries deduped by the conductor); {} ephemeral during the outage, {dropped} counted dropped, 0 late",
        outage,
        queue_ids.len(),
        during.len()
    );
}

#[test]
fn a_413_splits_the_batch_and_a_deny_policy_pauses_forwarding() {
    let mut ws = Workspace::new(json!({}), "emitter");
    let c = Conductor::start(ws.path(), "tok");
    enroll(&ws, &c, "tok");
    c.admin("/admin/faults", Some(json!({"max_batch": 3})));
    ws.start();
    let api = ws.api();
    assert_eq!(
        api.emit(
            (0..10)
                .map(|i| json!({"kind": "emitter:job_completed", "payload": {"n": i}}))
                .collect()
        )
        .status,
        200
    );
    wait_for("all 10 delivered in batches of at most 3", T, || {
        (c.received().len() == 10).then_some(())
    });
    let ns: Vec<i64> = c
        .received()
        .iter()
        .map(|r| r["event"]["payload"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(ns, (0..10).collect::<Vec<_>>(), "in order");
    assert_eq!(ws.status()["dead_letters"], 0);

    // default_decision: deny pauses forwarding at the next heartbeat (every 5 s here); events wait.
    c.admin("/admin/policy", Some(json!({"default_decision": "deny"})));
    wait_for("paused by policy", T, || {
        ws.status()["upstream"]["state"]
            .as_str()
            .unwrap()
            .starts_with("paused")
            .then_some(())
    });
    assert_eq!(
        api.emit(vec![
            json!({"kind": "emitter:job_completed", "payload": {"n": 10}})
        ])
        .status,
        200
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.received().len(), 10, "nothing forwarded while denied");
    assert_eq!(ws.status()["queue"]["durable_depth"], 1);
    c.admin("/admin/policy", Some(json!({"default_decision": "allow"})));
    wait_for("resumed", T, || (c.received().len() == 11).then_some(()));
}

/// An https control plane whose certificate comes from a private CA: trusted through
/// `tls.ca_file`, events arrive over TLS; without it, the certificate is refused, named in
/// `status`, and the events wait.
#[test]
fn https_upstream_with_a_private_ca_delivers_and_without_the_ca_refuses_and_keeps_events() {
    let mut ws = Workspace::new(json!({"tls": {"ca_file": "ca.pem"}}), "emitter");
    let c = Conductor::start(ws.path(), "tok");
    let front = TlsFront::start(ws.path(), c.port);
    let endpoint = format!("https://localhost:{}", front.port);
    enroll_at(&ws, &endpoint, "tok");
    ws.start();
    let r = ws.api().emit(
        (0..5)
            .map(|n| json!({"kind": "emitter:job_completed", "payload": {"n": n}}))
            .collect(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    wait_for("5 events at the conductor over TLS", T, || {
        (c.received().len() == 5 && ws.status()["queue"]["durable_depth"] == 0).then_some(())
    });

    // The same control plane without the CA: refused, said so, nothing lost.
    let mut other = Workspace::new(json!({}), "emitter");
    enroll_at(&other, &endpoint, "tok");
    other.start();
    let r = other.api().emit(vec![
        json!({"kind": "emitter:job_completed", "payload": {"n": 99}}),
    ]);
    assert_eq!(r.status, 200, "{}", r.body);
    let s = wait_for("the certificate refusal in status", T, || {
        let s = other.status();
        s["upstream"]["last_error"]
            .as_str()
            .is_some_and(|e| {
                e.to_lowercase().contains("certificate") || e.contains("UnknownIssuer")
            })
            .then_some(s)
    });
    assert_eq!(s["queue"]["durable_depth"], 1, "{s}");
    assert_eq!(c.received().len(), 5, "nothing arrived without trust");

    // A bad ca_file is a start error naming the file and the key.
    let bad = Workspace::new(json!({"tls": {"ca_file": "missing.pem"}}), "emitter");
    enroll_at(&bad, &endpoint, "tok");
    let out = bad.run(&["start"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("agent.json: tls.ca_file: cannot read") && err.contains("missing.pem"),
        "{err}"
    );
}
