//! The agent as the drop-in sidecar of a LumenFlow workspace (issue 13): the platform's own
//! forwarder cycle, with the SDK's exact shapes (`control-plane-sdk/src/sync-port.ts`,
//! `surfaces/http/control-plane-event-subscriber.ts`), against the agent on mem:inbox and in
//! conductor mode; a workspace with only `workspace.yaml`; the dev conductor's dedupe; and a
//! prompt exit on SIGTERM while a long-poll is open.

mod common;

use common::*;
use lumenflow_agent::sdk::canonical::to_canonical_string;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);
/// The token the platform's SDK sends (its `auth.token_env`), accepted through `api.token_env`.
const PLATFORM_TOKEN: &str = "platform-sdk-token";
const HASH: &str = "43258cff783fe7036d8a43033f830adfc60ec037382473548ac742b888292777";

/// Events the platform produces today: v1 kernel events, as its kernel writes them.
fn v1_events() -> Vec<Value> {
    vec![
        json!({"schema_version": 1, "kind": "task_created", "task_id": "WU-42", "timestamp": "2026-03-14T10:00:00.000Z", "spec_hash": HASH}),
        json!({"schema_version": 1, "kind": "task_claimed", "task_id": "WU-42", "timestamp": "2026-03-14T10:00:01.000Z", "by": "agent-7", "session_id": "sess-1", "domain_data": {"lane": "core", "n": 1.5}}),
        json!({"schema_version": 1, "kind": "workspace_warning", "timestamp": "2026-03-14T10:00:02.000Z", "message": "policy pull failed once"}),
    ]
}

fn v2_event(ws: &str) -> Value {
    json!({"schema_version": 2, "event_id": "0190a0e0-0000-7000-8000-000000000042", "kind": "emitter:job_completed",
           "timestamp": "2026-03-14T10:00:03.000Z", "from": ws, "payload": {"job_id": "job-42"}})
}

fn platform_api(ws: &Workspace) -> Api {
    Api {
        url: ws.api().url,
        token: PLATFORM_TOKEN.into(),
    }
}

/// One cycle of the platform's forwarder: pullPolicies -> heartbeat -> pushKernelEvents.
fn forwarder_cycle(api: &Api, ws_id: &str, events: &[Value]) -> Reply {
    let p = api.post("/api/v1/policies", &json!({"workspace_id": ws_id}));
    assert_eq!(p.status, 200, "policies: {}", p.body);
    assert!(
        matches!(p.body["default_decision"].as_str(), Some("allow" | "deny")),
        "{}",
        p.body
    );
    assert!(p.body["rules"].is_array(), "{}", p.body);
    let h = api.post(
        "/api/v1/heartbeat",
        &json!({"workspace_id": ws_id, "session_id": "http-surface-sync:2026-03-14T10:00:00.000Z"}),
    );
    assert_eq!(h.status, 200, "heartbeat: {}", h.body);
    assert_eq!(h.body["status"], "ok");
    assert!(h.body["server_time"].is_string());
    api.post(
        "/api/v1/events",
        &json!({"workspace_id": ws_id, "events": events}),
    )
}

fn canonical_set(events: impl IntoIterator<Item = Value>) -> Vec<String> {
    let mut v: Vec<String> = events
        .into_iter()
        .map(|e| to_canonical_string(&e))
        .collect();
    v.sort();
    v
}

#[test]
fn the_platform_forwarder_cycle_on_mem_inbox() {
    let mut ws = Workspace::new(
        json!({"api": {"token_env": "LF_TEST_PLATFORM_TOKEN"}, "policies": {"default_decision": "allow", "rules": [{"id": "no-prod", "decision": "deny"}]}}),
        "emitter",
    );
    std::fs::write(
        ws.path().join("workspace.yaml"),
        "id: ws-side\nname: Side\n",
    )
    .unwrap();
    ws.start_with_env(&[("LF_TEST_PLATFORM_TOKEN", PLATFORM_TOKEN)]);
    let api = platform_api(&ws);
    let mut events = v1_events();
    events.push(v2_event("ws-side"));
    let r = forwarder_cycle(&api, "ws-side", &events);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["accepted"], 4);
    // The forwarder puts a failed batch back and pushes it again: still once each.
    let again = forwarder_cycle(&api, "ws-side", &events);
    assert_eq!(again.body["accepted"], 4, "{}", again.body);
    let inbox = wait_for("4 events in mem:inbox", T, || {
        let i = ws.inbox();
        (i.len() >= 4).then_some(i)
    });
    assert_eq!(inbox.len(), 4, "each once: {inbox:?}");
    // The platform is no pack: its events are not counted as one in `status` (or `top`).
    let packs = ws.status()["packs"].clone();
    assert_eq!(packs.as_array().unwrap().len(), 1, "{packs}");
    assert_eq!(packs[0]["id"], "emitter", "{packs}");
    assert_eq!(
        canonical_set(inbox.iter().map(|e| e["event"].clone())),
        canonical_set(events.clone()),
        "byte-for-byte unchanged (canonical JSON)"
    );
    // agent.json policies are what mem:inbox serves.
    let p = api.post("/api/v1/policies", &json!({"workspace_id": "ws-side"}));
    assert_eq!(p.body["rules"][0]["id"], "no-prod");

    // Refusals name what is wrong; nothing of a refused batch is kept.
    let other = api.post(
        "/api/v1/events",
        &json!({"workspace_id": "ws-else", "events": [v1_events()[0]]}),
    );
    assert_eq!(other.status, 422);
    assert!(
        other.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Wrong workspace: workspace_id \"ws-else\""),
        "{}",
        other.body
    );
    let unknown = api.post(
        "/api/v1/events",
        &json!({"workspace_id": "ws-side", "events": [{"schema_version": 1, "kind": "task_exploded", "timestamp": "2026-03-14T10:00:00.000Z"}]}),
    );
    assert_eq!(unknown.status, 422);
    assert!(
        unknown.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("events[0]: invalid event: v1 kernel event: unknown v1 kernel event kind \"task_exploded\""),
        "{}",
        unknown.body
    );
    // The rest of the sync port, answered locally.
    let t = api.post(
        "/api/v1/telemetry",
        &json!({"workspace_id": "ws-side", "records": [{"metric": "tokens", "value": 12, "timestamp": "2026-03-14T10:00:00.000Z"}]}),
    );
    assert_eq!(t.body, json!({"accepted": 1}));
    let e = api.post(
        "/api/v1/evidence",
        &json!({"workspace_id": "ws-side", "evidence_refs": ["ev-1", "ev-2"]}),
    );
    assert_eq!(e.body, json!({"accepted": 2}));
    let a = api.post(
        "/api/v1/authenticate",
        &json!({"workspace_id": "ws-side", "org_id": "acme", "agent_id": "a-1"}),
    );
    assert_eq!(a.body["workspace_id"], "ws-side");
    assert_eq!(a.body["agent_id"], "a-1");
    let c = api.post("/api/v1/config", &json!({"workspace_id": "ws-side"}));
    assert_eq!(c.status, 404, "no control_plane block to serve: {}", c.body);
    let req = api.post(
        "/api/v1/approvals/request",
        &json!({"workspace_id": "ws-side", "type": "deploy", "subject": {"wu_id": "WU-42"}, "requester_type": "agent"}),
    );
    assert_eq!(req.body["status"], "pending", "{}", req.body);
    let id = req.body["approval_id"].as_str().unwrap().to_string();
    let res = api.post(
        "/api/v1/approvals/resolve",
        &json!({"workspace_id": "ws-side", "approval_id": id, "decision": "approved", "reviewer_type": "user"}),
    );
    assert_eq!(res.body["status"], "approved", "{}", res.body);
    let list = api.post(
        "/api/v1/approvals/list",
        &json!({"workspace_id": "ws-side", "status": "approved"}),
    );
    assert_eq!(list.body["approvals"][0]["approval_id"], id.as_str());
    // The agent's own token still works; a wrong one does not.
    assert_eq!(
        ws.api()
            .post("/api/v1/policies", &json!({"workspace_id": "ws-side"}))
            .status,
        200
    );
    let wrong = api.post_raw("/api/v1/policies", b"{}".to_vec(), Some("nope"));
    assert_eq!(wrong.status, 401);
    let nowhere = api.post("/api/v1/nothing", &json!({}));
    assert_eq!(nowhere.status, 404);
    assert!(
        !nowhere.body.to_string().contains("SPEC"),
        "{}",
        nowhere.body
    );
}

#[test]
fn a_workspace_with_only_workspace_yaml_forwards_through_the_agent_to_its_control_plane() {
    let mut ws = Workspace::new(json!({}), "emitter");
    std::fs::remove_dir_all(ws.path().join(".lumenflow")).unwrap();
    let c = Conductor::start(ws.path(), "cp-secret");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    // The agent's API on a fixed port, accepting the platform's token; its upstream the
    // control_plane of workspace.yaml, the token from the variable auth.token_env names.
    std::fs::write(
        ws.path().join("workspace.yaml"),
        format!(
            "id: ws-yaml\nname: Yaml\ncontrol_plane:\n  endpoint: {}/\n  org_id: acme\n  project_id: web\n  sync_interval: 5\n  policy_mode: authoritative\n  auth:\n    token_env: LF_TEST_CP_TOKEN\n",
            c.url()
        ),
    )
    .unwrap();
    std::fs::create_dir_all(ws.path().join(".lumenflow")).unwrap();
    std::fs::write(
        ws.path().join(".lumenflow/agent.json"),
        json!({"api": {"listen": format!("127.0.0.1:{port}"), "token_env": "LF_TEST_PLATFORM_TOKEN"}}).to_string(),
    )
    .unwrap();
    // Only workspace.yaml first: `start` must not need .lumenflow/ (it creates its state).
    std::fs::remove_dir_all(ws.path().join(".lumenflow")).unwrap();
    let out = ws.run(&["validate"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "a workspace.yaml folder is a workspace: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::create_dir_all(ws.path().join(".lumenflow")).unwrap();
    std::fs::write(
        ws.path().join(".lumenflow/agent.json"),
        json!({"api": {"listen": format!("127.0.0.1:{port}"), "token_env": "LF_TEST_PLATFORM_TOKEN"}}).to_string(),
    )
    .unwrap();
    ws.start_with_env(&[
        ("LF_TEST_CP_TOKEN", "cp-secret"),
        ("LF_TEST_PLATFORM_TOKEN", PLATFORM_TOKEN),
    ]);
    assert_eq!(ws.api().url, format!("http://127.0.0.1:{port}"));
    assert!(
        ws.path().join(".lumenflow/state/.gitignore").is_file(),
        "the state is git-ignored"
    );
    let st = ws.status();
    assert_eq!(st["agent"]["identity"], "ws-yaml");
    assert_eq!(st["upstream"]["mode"], "http", "{st}");
    assert_eq!(st["upstream"]["source"], "workspace.yaml", "{st}");

    let api = platform_api(&ws);
    // Relayed: the control plane's own answer (the dev conductor asks for 5 s heartbeats).
    let hb = api.post(
        "/api/v1/heartbeat",
        &json!({"workspace_id": "ws-yaml", "session_id": "s"}),
    );
    assert_eq!(hb.body["next_heartbeat_ms"], 5000, "{}", hb.body);
    let mut events = v1_events();
    events.push(v2_event("ws-yaml"));
    let r = forwarder_cycle(&api, "ws-yaml", &events);
    assert_eq!(r.body["accepted"], 4, "{}", r.body);
    let received = wait_for("4 events at the control plane", T, || {
        let r = c.received();
        (r.len() >= 4).then_some(r)
    });
    assert_eq!(received.len(), 4, "{received:?}");
    assert!(received.iter().all(|r| r["workspace_id"] == "ws-yaml"));
    assert!(
        received.iter().all(|r| r["deliveries"] == 1),
        "{received:?}"
    );
    assert_eq!(
        canonical_set(received.iter().map(|r| r["event"].clone())),
        canonical_set(events.clone()),
        "the control plane got them unchanged"
    );
    // Telemetry and evidence: committed, then forwarded in order.
    let t = api.post(
        "/api/v1/telemetry",
        &json!({"workspace_id": "ws-yaml", "records": [{"metric": "m", "value": 1, "timestamp": "2026-03-14T10:00:00.000Z"}]}),
    );
    assert_eq!(t.body, json!({"accepted": 1}));
    let e = api.post(
        "/api/v1/evidence",
        &json!({"workspace_id": "ws-yaml", "evidence_refs": ["ev-1"]}),
    );
    assert_eq!(e.body, json!({"accepted": 1}));
    let records = wait_for("2 records at the control plane", T, || {
        let r = c.admin("/admin/records", None);
        (r.as_array().unwrap().len() >= 2).then_some(r)
    });
    assert_eq!(records[0]["path"], "/api/v1/telemetry");
    assert_eq!(records[1]["body"]["evidence_refs"], json!(["ev-1"]));

    // The control plane goes away: policies are served from the last good answer.
    drop(c);
    let p = api.post("/api/v1/policies", &json!({"workspace_id": "ws-yaml"}));
    assert_eq!(p.status, 200, "{}", p.body);
    assert_eq!(p.body["default_decision"], "allow");
    assert!(p.headers.iter().any(|(k, _)| k == "age"), "{:?}", p.headers);
    let st = ws.status();
    assert_eq!(
        st["sync_port"]["pulls"]["policies"]["source"], "cache",
        "{st}"
    );
    assert_eq!(ws.terminate(), Some(0));
}

#[test]
fn conductor_mode_exits_within_two_seconds_of_sigterm_while_a_long_poll_is_open() {
    let mut ws = Workspace::new(json!({"identity": "ws-test"}), "recorder");
    let c = Conductor::start(ws.path(), "tok");
    enroll(&ws, &c, "tok");
    ws.start();
    wait_for("the upstream connected", T, || {
        (ws.status()["upstream"]["state"] == "connected").then_some(())
    });
    // The pull is a 20 s long-poll; it is open now (nothing is published).
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    assert_eq!(ws.terminate(), Some(0), "{}", ws.log());
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(2), "exited after {took:?}");
}

#[test]
fn the_development_conductor_dedupes_per_workspace_and_keeps_events_without_an_id() {
    let ws = Workspace::new(json!({}), "");
    let c = Conductor::start(ws.path(), "tok");
    let push = |workspace: &str, events: Vec<Value>| {
        c.admin(
            "/api/v1/events",
            Some(json!({"workspace_id": workspace, "events": events})),
        )
    };
    // Five different platform-shaped events (no event_id): five rows, not one under "".
    for i in 0..5 {
        let r = push(
            "ws-a",
            vec![
                json!({"schema_version": 1, "kind": "checkpoint", "task_id": "WU-1", "note": format!("n{i}"), "timestamp": "2026-03-14T10:00:00.000Z"}),
            ],
        );
        assert_eq!(r["accepted"], 1);
    }
    // The same one again is a retry: stored once, delivered twice.
    push(
        "ws-a",
        vec![
            json!({"note": "n0", "schema_version": 1, "kind": "checkpoint", "task_id": "WU-1", "timestamp": "2026-03-14T10:00:00.000Z"}),
        ],
    );
    // The same event_id in two workspaces is two events.
    for w in ["ws-a", "ws-b"] {
        push(w, vec![v2_event(w)]);
    }
    let received = c.received();
    assert_eq!(received.len(), 7, "{received:?}");
    assert_eq!(received[0]["deliveries"], 2);
    let missing = c.admin("/api/v1/events", Some(json!({"events": []})));
    assert!(
        missing["error"]["message"]
            .as_str()
            .unwrap()
            .contains("workspace_id"),
        "{missing}"
    );
}

/// Packs where the platform keeps them (`packages/@lumenflow/packs`, no `packs/`), pinned in
/// workspace.yaml: the pack whose folder hash is the pinned one loads and gets the platform's
/// v1 events as `kernel:task_completed`; the one whose folder changed since it was pinned is
/// not loaded, and `validate` and `status` say why.
#[test]
fn pinned_packs_under_the_platform_packs_root_and_a_kernel_subscriber() {
    let mut ws = Workspace::new(json!({}), "");
    let root = ws.path().join("packages/@lumenflow/packs");
    let helper = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packs/node/lumenflow-pack.mjs"),
    )
    .unwrap();
    let pack = |id: &str| {
        let dir = root.join(id);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("lumenflow-pack.mjs"), &helper).unwrap();
        std::fs::write(
            dir.join("handler.mjs"),
            "import { runPack } from './lumenflow-pack.mjs';\nimport { appendFileSync } from 'node:fs';\nrunPack({ handlers: { 'kernel:task_completed': async (event) => {\n  appendFileSync('seen.log', `${event.kind} ${event.payload.task_id}\\n`);\n  return { status: 'handled', action: 'noted' };\n} } });\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("manifest.yaml"),
            format!("id: {id}\nversion: 0.1.0\ntask_types: [{id}]\ntools: []\npolicies: []\nsubscribed_event_kinds: [\"kernel:task_completed\"]\nruntime:\n  command: [node, handler.mjs]\n"),
        )
        .unwrap();
        dir
    };
    let good = pack("kwatch");
    let bad = pack("kstale");
    let hash = |d: &std::path::Path| lumenflow_agent::sdk::platform::pack_hash(d).unwrap();
    let (good_hash, stale_hash) = (hash(&good), hash(&bad));
    // Edited after it was pinned.
    std::fs::write(bad.join("handler.mjs"), "// changed\n").unwrap();
    std::fs::write(
        ws.path().join("workspace.yaml"),
        format!("id: ws-pins\npacks:\n  - id: kwatch\n    version: 0.1.0\n    integrity: sha256:{good_hash}\n    source: local\n  - id: kstale\n    version: 0.1.0\n    integrity: sha256:{stale_hash}\n    source: local\n"),
    )
    .unwrap();
    let out = ws.run(&["validate"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("ok: kwatch 0.1.0 (packages/@lumenflow/packs/kwatch/manifest.yaml)"),
        "{text}"
    );
    assert!(
        text.contains(&format!("error: workspace.yaml: packs[1]: Pack integrity mismatch for kstale: expected sha256:{stale_hash}, got sha256:")),
        "{text}"
    );

    ws.start();
    let st = wait_for("kwatch running", T, || {
        let st = ws.status();
        (ws.pack_status("kwatch")["state"] == "running").then_some(st)
    });
    let stale = st["packs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "kstale")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(stale["state"], "invalid", "{st}");
    assert!(
        stale["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("Pack integrity mismatch for kstale"),
        "{stale}"
    );
    let r = ws.api().post(
        "/api/v1/events",
        &json!({"workspace_id": "ws-pins", "events": [
            {"schema_version": 1, "kind": "task_completed", "task_id": "WU-5", "timestamp": "2026-03-14T10:00:00.000Z"}]}),
    );
    assert_eq!(r.body["accepted"], 1, "{}", r.body);
    let seen = wait_for("the kernel event handled", T, || {
        std::fs::read_to_string(good.join("seen.log")).ok()
    });
    assert_eq!(seen, "kernel:task_completed WU-5\n");
}

/// Telemetry accepted while the control plane is down survives a `kill -9` of the agent and
/// reaches the control plane, in order, once it is back.
#[test]
fn records_accepted_while_the_control_plane_is_down_survive_kill_9() {
    let mut ws = Workspace::new(json!({"identity": "ws-test"}), "");
    let mut c = Conductor::start(ws.path(), "tok");
    enroll(&ws, &c, "tok");
    c.kill();
    ws.start();
    let api = ws.api();
    for i in 0..3 {
        let r = api.post(
            "/api/v1/telemetry",
            &json!({"workspace_id": "ws-test", "records": [{"metric": format!("m{i}"), "value": i, "timestamp": "2026-03-14T10:00:00.000Z"}]}),
        );
        assert_eq!(r.body, json!({"accepted": 1}), "{}", r.body);
    }
    wait_for("3 records waiting", T, || {
        (ws.status()["upstream"]["records_waiting"] == 3).then_some(())
    });
    ws.kill9();
    c.restart();
    ws.start();
    let records = wait_for("3 records at the control plane", T, || {
        let r = c.admin("/admin/records", None);
        (r.as_array().unwrap().len() >= 3).then_some(r)
    });
    let metrics: Vec<&str> = records
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["body"]["records"][0]["metric"].as_str().unwrap())
        .collect();
    assert_eq!(metrics, ["m0", "m1", "m2"]);
}

/// workspace.yaml `policy_mode` combines the control plane's `default_decision` (allow) with
/// agent.json's (deny) as the platform does: `tighten-only` lets the local deny win (forwarding
/// pauses, the event waits durably); `authoritative` follows the control plane (it is sent).
#[test]
fn policy_mode_combines_the_control_planes_decision_with_the_local_one() {
    for (mode, paused) in [("tighten-only", true), ("authoritative", false)] {
        let mut ws = Workspace::new(
            json!({"policies": {"default_decision": "deny", "rules": []}}),
            "emitter",
        );
        let c = Conductor::start(ws.path(), "cp");
        std::fs::write(
            ws.path().join("workspace.yaml"),
            format!("id: ws-pm\ncontrol_plane:\n  endpoint: {}\n  org_id: o\n  project_id: p\n  sync_interval: 30\n  policy_mode: {mode}\n  auth:\n    token_env: LF_TEST_CP_TOKEN\n", c.url()),
        )
        .unwrap();
        ws.start_with_env(&[("LF_TEST_CP_TOKEN", "cp")]);
        let r = ws.api().emit(vec![
            json!({"kind": "emitter:job_completed", "payload": {"mode": mode}}),
        ]);
        assert_eq!(r.status, 200, "{}", r.body);
        if paused {
            let st = wait_for("forwarding paused by the local deny", T, || {
                let st = ws.status();
                st["upstream"]["state"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("paused"))
                    .then_some(st)
            });
            assert_eq!(st["queue"]["durable_depth"], 1, "{st}");
            assert!(c.received().is_empty(), "{mode}: nothing forwarded");
        } else {
            wait_for("the event at the control plane", T, || {
                (c.received().len() == 1).then_some(())
            });
        }
    }
}
