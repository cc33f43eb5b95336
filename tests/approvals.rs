//! Approvals end to end (issue 16): an event of a `required_approvals` kind is held until a
//! person or the control plane decides; the real binary, a real SQLite file, the CLI with and
//! without a running agent, kill -9, and the development conductor.
//!
//! The test packs (`tests/support/test_agent.rs`): `phone` answers
//! `conductor:phone_requested` by emitting `phone:send_requested` (held) and `phone:sms_sent`
//! (not held); `handset` subscribes to both and to `agent:approval_requested|resolved`, and
//! appends what it gets to `effects.log.handset`.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);
const HELD: &str = "phone:send_requested";

fn phone_workspace(config: Value) -> Workspace {
    Workspace::new(config, "phone,handset")
}

/// `approvals list [--all] --json`.
fn approvals(ws: &Workspace, all: bool) -> Vec<Value> {
    let mut args = vec!["approvals", "list", "--json"];
    if all {
        args.push("--all");
    }
    let out = ws.run(&args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("approvals list --json")
}

/// The handset's lines of `kind`.
fn handset(ws: &Workspace, kind: &str) -> Vec<Value> {
    std::fs::read_to_string(ws.path().join("effects.log.handset"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').next() == Some(kind))
        .map(|l| serde_json::from_str(l.splitn(3, ' ').nth(2).unwrap_or("null")).unwrap())
        .collect()
}

fn inbox_of(ws: &Workspace, kind: &str) -> Vec<Value> {
    ws.inbox()
        .into_iter()
        .filter(|e| e["kind"] == kind)
        .collect()
}

/// Rows of `kind` in the inbound log (each release writes one: a double release shows here
/// even though mem:inbox dedupes by event id).
fn inbound_rows(ws: &Workspace, kind: &str) -> i64 {
    let c = rusqlite::Connection::open(ws.path().join(".lumenflow/state/agent/agent.db")).unwrap();
    c.query_row(
        "SELECT count(*) FROM inbound WHERE kind = ?1",
        [kind],
        |r| r.get(0),
    )
    .unwrap()
}

/// Asks the phone pack for `n` sends and waits until all are held.
fn hold(ws: &Workspace, n: usize) -> Vec<Value> {
    let before = approvals(ws, true).len();
    for i in 0..n {
        ws.inbound(
            "conductor:phone_requested",
            &json!({"to": format!("+44 {i}")}).to_string(),
        );
    }
    wait_for("the sends held", T, || {
        let all = approvals(ws, true);
        (all.len() == before + n).then_some(all)
    })
}

fn cli(ws: &Workspace, args: &[&str]) -> (i32, String, String) {
    let out = ws.run(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn a_held_event_waits_for_approval_and_is_delivered_once() {
    let mut ws = phone_workspace(json!({}));
    ws.start();
    let held = hold(&ws, 1);
    let a = &held[0];
    assert_eq!(a["status"], "pending");
    assert_eq!(a["type"], HELD);
    assert_eq!(a["requester_id"], "phone");
    assert_eq!(a["requester_type"], "agent");
    assert_eq!(a["held_event"]["state"], "held");
    assert_eq!(a["subject"]["payload"]["to"], "+44 0");
    assert_eq!(a["subject"]["payload_sha256"].as_str().unwrap().len(), 64);
    let event_id = a["subject"]["event_id"].as_str().unwrap().to_string();
    let id = a["approval_id"].as_str().unwrap().to_string();

    // The not-held kind of the same handler went out; the held one did not.
    wait_for("sms_sent delivered", T, || {
        (!inbox_of(&ws, "phone:sms_sent").is_empty()).then_some(())
    });
    let requested = wait_for("agent:approval_requested at the handset", T, || {
        handset(&ws, "agent:approval_requested").pop()
    });
    assert_eq!(requested["approval_id"], id.as_str());
    assert_eq!(requested["event_id"], event_id.as_str());
    assert!(inbox_of(&ws, HELD).is_empty(), "held: not upstream");
    assert!(handset(&ws, HELD).is_empty(), "held: not at the subscriber");
    assert_eq!(inbound_rows(&ws, HELD), 0);

    // status: pending, with age and deadline.
    let s = ws.status();
    assert_eq!(s["approvals"]["pending"], 1, "{}", s["approvals"]);
    assert_eq!(s["approvals"]["held"][0]["approval_id"], id.as_str());
    assert!(s["approvals"]["held"][0]["deadline_in_s"].as_f64().unwrap() > 86_000.0);
    let human = cli(&ws, &["status"]).1;
    assert!(
        human.contains("approvals: 1 held event(s) waiting") && human.contains(&id),
        "{human}"
    );

    let metrics = ws.api().get("/metrics").body.to_string();
    assert!(
        metrics.contains("lumenflow_agent_approvals_pending 1"),
        "{metrics}"
    );

    // A producer's event of the held kind (the local API) is held the same way.
    let r = ws
        .api()
        .emit(vec![json!({"kind": HELD, "payload": {"to": "api"}})]);
    assert_eq!(r.status, 200, "{}", r.body);
    wait_for("the API's event held", T, || {
        (approvals(&ws, false).len() == 2).then_some(())
    });

    // Approve by a prefix of the id, as alice.
    let (code, out, err) = cli(
        &ws,
        &[
            "approvals",
            "approve",
            &id[..13],
            "--as",
            "alice",
            "--reason",
            "ok",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("is delivered"), "{out}");
    let up = wait_for("the approved event upstream", T, || {
        let v = inbox_of(&ws, HELD);
        (!v.is_empty()).then_some(v)
    });
    assert_eq!(up.len(), 1);
    assert_eq!(up[0]["event_id"], event_id.as_str());
    let got = wait_for("the approved event at the subscriber", T, || {
        let v = handset(&ws, HELD);
        (!v.is_empty()).then_some(v)
    });
    assert_eq!(got.len(), 1);
    let resolved = wait_for("agent:approval_resolved", T, || {
        handset(&ws, "agent:approval_resolved").pop()
    });
    assert_eq!(resolved["status"], "approved");
    assert_eq!(resolved["reviewer_id"], "alice");
    assert_eq!(resolved["released"], true);

    // A second approve is refused, naming the first decision.
    let (code, _, err) = cli(&ws, &["approvals", "approve", &id]);
    assert_eq!(code, 1);
    assert!(err.contains("already approved by alice"), "{err}");
    // Through the platform's sync-port shape too: 409.
    let r = ws.api().post(
        "/api/v1/approvals/resolve",
        &json!({"approval_id": id, "decision": "rejected"}),
    );
    assert_eq!(r.status, 409, "{}", r.body);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(inbound_rows(&ws, HELD), 1, "released once");
    assert_eq!(handset(&ws, HELD).len(), 1);
}

#[test]
fn a_denied_event_is_never_delivered_and_the_decision_is_kept() {
    let mut ws = phone_workspace(json!({"approvals": {"forbid_self_approval": true}}));
    ws.start();
    let held = hold(&ws, 2);
    let (deny, other) = (
        held[0]["approval_id"].as_str().unwrap().to_string(),
        held[1]["approval_id"].as_str().unwrap().to_string(),
    );
    let (code, out, err) = cli(
        &ws,
        &[
            "approvals",
            "deny",
            &deny,
            "--reason",
            "wrong number",
            "--as",
            "bob",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("never delivered"), "{out}");
    // The requester (the pack) may not approve its own request.
    let (code, _, err) = cli(&ws, &["approvals", "approve", &other, "--as", "phone"]);
    assert_eq!(code, 1);
    assert!(err.contains("may not approve it"), "{err}");
    let r = ws.api().post(
        "/api/v1/approvals/resolve",
        &json!({"approval_id": other, "decision": "approved", "reviewer_id": "phone"}),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    // The platform's SDK may decide through the local API (mem:inbox: decided here).
    let r = ws.api().post(
        "/api/v1/approvals/resolve",
        &json!({"approval_id": other, "decision": "approved", "reviewer_id": "ops", "reviewer_type": "user"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "approved");
    wait_for("the approved one upstream", T, || {
        (inbox_of(&ws, HELD).len() == 1).then_some(())
    });
    // The denied one: listed with who, when and why; never delivered, not after a restart.
    assert!(approvals(&ws, false).is_empty());
    let all = approvals(&ws, true);
    let d = all
        .iter()
        .find(|a| a["approval_id"] == deny.as_str())
        .unwrap();
    assert_eq!(d["status"], "rejected");
    assert_eq!(d["reviewer_id"], "bob");
    assert_eq!(d["reviewer_type"], "user");
    assert_eq!(d["decision_reason"], "wrong number");
    assert!(d["decided_at"].is_string());
    assert_eq!(d["held_event"]["state"], "withheld");
    let table = cli(&ws, &["approvals", "list", "--all"]).1;
    assert!(
        table.contains("by bob at") && table.contains("wrong number"),
        "{table}"
    );
    ws.terminate();
    ws.start();
    std::thread::sleep(Duration::from_millis(500));
    let denied_event = d["subject"]["event_id"].as_str().unwrap();
    assert!(inbox_of(&ws, HELD)
        .iter()
        .all(|e| e["event_id"] != denied_event));
    assert_eq!(inbound_rows(&ws, HELD), 1);
}

#[test]
fn kill9_with_pending_approvals_and_during_approvals_loses_and_doubles_nothing() {
    let mut ws = phone_workspace(json!({}));
    ws.start();
    let held = hold(&ws, 6);
    let ids: Vec<String> = held
        .iter()
        .map(|a| a["approval_id"].as_str().unwrap().to_string())
        .collect();
    // Killed with everything pending: all still pending after the restart.
    ws.kill9();
    ws.start();
    assert_eq!(approvals(&ws, false).len(), 6);
    assert_eq!(ws.status()["approvals"]["pending"], 6);
    // Killed while approvals are being taken: each approve either happened (and its event
    // is released exactly once) or did not (and it is still pending).
    let (first, rest) = ids.split_at(3);
    let runs: Vec<_> = first
        .iter()
        .map(|id| {
            ws.cmd()
                .args(["approvals", "approve", id, "--as", "ops"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(15));
    ws.kill9();
    for mut r in runs {
        let _ = r.wait();
    }
    // Offline: decided in the database, delivered at the next start.
    let (code, out, err) = cli(&ws, &["approvals", "approve", &rest[0], "--as", "ops"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("at the next `lumenflow-agent start`"), "{out}");
    ws.start();
    let all = approvals(&ws, true);
    let approved: Vec<&Value> = all.iter().filter(|a| a["status"] == "approved").collect();
    let pending = all.iter().filter(|a| a["status"] == "pending").count();
    assert_eq!(approved.len() + pending, 6, "{all:?}");
    eprintln!("approved after the kill: {} of 6", approved.len());
    assert!(!approved.is_empty());
    for a in &approved {
        assert_eq!(a["held_event"]["state"], "released");
    }
    let want = approved.len();
    wait_for("every approved event upstream", T, || {
        (inbox_of(&ws, HELD).len() == want).then_some(())
    });
    wait_for("every approved event at the subscriber", T, || {
        (handset(&ws, HELD).len() >= want).then_some(())
    });
    assert_eq!(inbound_rows(&ws, HELD), want as i64, "each released once");
    // Whatever was left pending can still be decided.
    for a in all.iter().filter(|a| a["status"] == "pending") {
        let (code, out, err) = cli(
            &ws,
            &[
                "approvals",
                "deny",
                a["approval_id"].as_str().unwrap(),
                "--reason",
                "late",
            ],
        );
        assert_eq!(code, 0, "{out}{err}");
    }
    assert!(approvals(&ws, false).is_empty());
    assert_eq!(inbound_rows(&ws, HELD), want as i64);
}

#[test]
fn a_deadline_expires_the_event_or_releases_it_when_so_configured() {
    // Default rule: deny on expiry.
    let mut ws = phone_workspace(json!({"approvals": {"timeout_s": 1}}));
    ws.start();
    let held = hold(&ws, 1);
    let id = held[0]["approval_id"].as_str().unwrap().to_string();
    let a = wait_for("expired", T, || {
        approvals(&ws, true)
            .into_iter()
            .find(|a| a["status"] == "expired" && a["held_event"]["state"] == "withheld")
    });
    assert_eq!(a["reviewer_id"], "lumenflow-agent");
    assert!(a["decision_reason"]
        .as_str()
        .unwrap()
        .contains("no decision within 1 s"));
    let (code, _, err) = cli(&ws, &["approvals", "approve", &id]);
    assert_eq!(code, 1);
    assert!(err.contains("already expired"), "{err}");
    let resolved = wait_for("agent:approval_resolved", T, || {
        handset(&ws, "agent:approval_resolved").pop()
    });
    assert_eq!(resolved["status"], "expired");
    assert_eq!(resolved["released"], false);
    assert!(inbox_of(&ws, HELD).is_empty());
    assert_eq!(inbound_rows(&ws, HELD), 0);
    ws.terminate();

    // Per kind: released on expiry. A deadline that passes while the agent is stopped is
    // recorded at the next start.
    std::fs::write(
        ws.path().join(".lumenflow/agent.json"),
        json!({"approvals": {"kinds": {HELD: {"timeout_s": 2, "on_expiry": "allow"}}}}).to_string(),
    )
    .unwrap();
    ws.start();
    hold(&ws, 1);
    ws.terminate();
    std::thread::sleep(Duration::from_secs(3));
    ws.start();
    let up = wait_for("released on expiry", T, || {
        let v = inbox_of(&ws, HELD);
        (!v.is_empty()).then_some(v)
    });
    assert_eq!(up.len(), 1);
    let all = approvals(&ws, true);
    let a = all.last().unwrap();
    assert_eq!(a["status"], "expired");
    assert_eq!(a["held_event"]["state"], "released");
}

#[test]
fn a_bad_approvals_setting_names_the_key() {
    let ws = phone_workspace(json!({"approvals": {"timeout_s": 0}}));
    let (code, _, err) = cli(&ws, &["start"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("approvals.timeout_s: expected a whole number of seconds from 1"),
        "{err}"
    );
    std::fs::write(
        ws.path().join(".lumenflow/agent.json"),
        json!({"approvals": {"kinds": {HELD: {"on_expiry": "maybe"}}}}).to_string(),
    )
    .unwrap();
    let (_, _, err) = cli(&ws, &["start"]);
    assert!(
        err.contains(&format!(
            "approvals.kinds.{HELD}.on_expiry: expected \"deny\" or \"allow\""
        )),
        "{err}"
    );
}

#[test]
fn conductor_mode_the_control_plane_gets_the_request_and_its_decision_releases_the_event() {
    let mut ws = phone_workspace(json!({}));
    let c = Conductor::start(ws.path(), "tok-a");
    enroll(&ws, &c, "tok-a");
    ws.start();
    c.publish(
        "ws-test",
        json!([{"kind": "conductor:phone_requested", "event_id": "evt-call-1", "payload": {"to": "+1 555"}}]),
    );
    // The request reaches the control plane in the platform's shape.
    let list = |status: &str| {
        c.admin(
            "/api/v1/approvals/list",
            Some(json!({"workspace_id": "ws-test", "status": status})),
        )
    };
    let remote = wait_for("the request at the control plane", T, || {
        list("pending")["approvals"]
            .as_array()
            .and_then(|a| a.first().cloned())
    });
    assert_eq!(remote["workspace_id"], "ws-test");
    assert_eq!(remote["type"], HELD);
    assert_eq!(remote["status"], "pending");
    assert_eq!(remote["requester_type"], "agent");
    assert_eq!(remote["subject"]["payload"]["to"], "+1 555");
    let event_id = remote["subject"]["event_id"].as_str().unwrap().to_string();
    // Held: not at the control plane's events, not at the subscriber.
    std::thread::sleep(Duration::from_millis(500));
    assert!(c.received().iter().all(|r| r["event"]["kind"] != HELD));
    assert!(handset(&ws, HELD).is_empty());
    // Decided at the control plane (as its UI would): the agent pulls it and releases.
    let r = c.admin(
        "/api/v1/approvals/resolve",
        Some(json!({"workspace_id": "ws-test", "approval_id": remote["approval_id"], "decision": "approved", "reviewer_id": "cp-reviewer", "reviewer_type": "user", "reason": "fine"})),
    );
    assert_eq!(r["status"], "approved", "{r}");
    let got = wait_for("the released event at the control plane", T, || {
        let v: Vec<Value> = c
            .received()
            .into_iter()
            .filter(|r| r["event"]["kind"] == HELD)
            .collect();
        (!v.is_empty()).then_some(v)
    });
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["event"]["event_id"], event_id.as_str());
    wait_for("at the subscriber", T, || {
        (handset(&ws, HELD).len() == 1).then_some(())
    });
    let local = approvals(&ws, true);
    assert_eq!(local[0]["status"], "approved");
    assert_eq!(local[0]["reviewer_id"], "cp-reviewer");
    assert_eq!(local[0]["decision_reason"], "fine");

    // A decision taken here (the CLI) reaches the control plane's record.
    c.publish(
        "ws-test",
        json!([{"kind": "conductor:phone_requested", "event_id": "evt-call-2", "payload": {"to": "+1 556"}}]),
    );
    let second = wait_for("the second request at the control plane", T, || {
        list("pending")["approvals"]
            .as_array()
            .and_then(|a| a.first().cloned())
    });
    let local_id = wait_for("held here", T, || {
        approvals(&ws, false)
            .first()
            .map(|a| a["approval_id"].as_str().unwrap().to_string())
    });
    let (code, out, err) = cli(
        &ws,
        &[
            "approvals",
            "deny",
            &local_id,
            "--reason",
            "no",
            "--as",
            "dana",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let decided = wait_for("the control plane told", T, || {
        list("rejected")["approvals"].as_array().and_then(|a| {
            a.iter()
                .find(|r| r["approval_id"] == second["approval_id"])
                .cloned()
        })
    });
    assert_eq!(decided["reviewer_id"], "dana");
    assert_eq!(decided["decision_reason"], "no");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        c.received()
            .iter()
            .filter(|r| r["event"]["kind"] == HELD)
            .count(),
        1
    );
}

#[test]
fn held_events_are_bounded_by_max_pending_with_backpressure() {
    let mut ws = phone_workspace(json!({"approvals": {"max_pending": 2}}));
    ws.start();
    let api = ws.api();
    for i in 0..2 {
        let r = api.emit(vec![json!({"kind": HELD, "payload": {"i": i}})]);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = api
        .try_emit(vec![json!({"kind": HELD, "payload": {"i": 2}})])
        .unwrap();
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(
        r.body
            .to_string()
            .contains("2 held events wait for a decision (approvals.max_pending = 2)"),
        "{}",
        r.body
    );
    // Kinds that are not held are not affected.
    let r = api.emit(vec![json!({"kind": "phone:sms_sent", "payload": {}})]);
    assert_eq!(r.status, 200, "{}", r.body);
    // A decision makes room.
    let first = approvals(&ws, false)[0]["approval_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, out, err) = cli(&ws, &["approvals", "deny", &first, "--reason", "full"]);
    assert_eq!(code, 0, "{out}{err}");
    let r = api.emit(vec![json!({"kind": HELD, "payload": {"i": 3}})]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(approvals(&ws, false).len(), 2);
}

#[test]
fn conductor_mode_requests_and_decisions_survive_a_failing_control_plane_and_kill9() {
    let mut ws = phone_workspace(json!({}));
    let c = Conductor::start(ws.path(), "tok-b");
    enroll(&ws, &c, "tok-b");
    ws.start();
    // A captive portal (200 with HTML), a redirect to a login page, a 503: none is an answer.
    let relay_error = |fault: Value, says: &str| {
        c.admin("/admin/faults", Some(fault));
        wait_for(&format!("the relay error {says:?} in status"), T, || {
            let s = ws.status();
            s["approvals"]["relay_error"]
                .as_str()
                .is_some_and(|e| e.contains(says))
                .then_some(s)
        })
    };
    c.admin("/admin/faults", Some(json!({"html": true})));
    ws.inbound("conductor:phone_requested", r#"{"to": "+1 1"}"#);
    let s = relay_error(json!({"html": true}), "the reply is not an ApprovalRecord");
    // Held meanwhile: nothing reached the control plane's events either.
    assert!(handset(&ws, HELD).is_empty());
    assert_eq!(s["approvals"]["pending"], 1);
    relay_error(json!({"redirect": 302}), "HTTP 302");
    relay_error(json!({"status": 503}), "HTTP 503");
    c.admin("/admin/faults", Some(json!({})));
    let list = || {
        c.admin(
            "/api/v1/approvals/list",
            Some(json!({"workspace_id": "ws-test"})),
        )["approvals"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let remote = wait_for("the request at the control plane", T, || {
        list().first().cloned()
    });
    wait_for("the relay error cleared", T, || {
        ws.status()["approvals"]["relay_error"]
            .is_null()
            .then_some(())
    });
    // Killed while waiting for the decision: the next agent pulls it.
    ws.kill9();
    let r = c.admin(
        "/api/v1/approvals/resolve",
        Some(json!({"workspace_id": "ws-test", "approval_id": remote["approval_id"], "decision": "approved", "reviewer_id": "cp"})),
    );
    assert_eq!(r["status"], "approved", "{r}");
    ws.start();
    wait_for("released after the restart", T, || {
        (c.received()
            .iter()
            .filter(|r| r["event"]["kind"] == HELD)
            .count()
            == 1)
            .then_some(())
    });
    assert_eq!(list().len(), 1, "the request was sent once");
    assert_eq!(inbound_rows(&ws, HELD), 1);
    // A decision relayed through the local API (the platform's SDK pointed at the agent) is
    // the control plane's, applied here at once.
    ws.inbound("conductor:phone_requested", r#"{"to": "+1 2"}"#);
    let second = wait_for("the second request at the control plane", T, || {
        list().into_iter().find(|a| a["status"] == "pending")
    });
    let r = ws.api().post(
        "/api/v1/approvals/resolve",
        &json!({"approval_id": second["approval_id"], "decision": "rejected", "reason": "via sdk"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let local = wait_for("decided here", T, || {
        approvals(&ws, true)
            .into_iter()
            .find(|a| a["status"] == "rejected")
    });
    assert_eq!(local["decision_reason"], "via sdk");
    assert_eq!(inbound_rows(&ws, HELD), 1);
}
