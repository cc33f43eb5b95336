//! Hot reload end to end (SPEC §8): real file edits in a running agent's packs root.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

fn manifest(version: &str, kinds: &[&str]) -> Value {
    json!({"id": "flex", "version": version, "subscribed_event_kinds": kinds,
        "runtime": {"command": ["node", "handler.mjs"]}})
}

/// A Node pack handling two kinds; it subscribes to what its manifest says.
fn flex_pack(ws: &Workspace, kinds: &[&str]) -> PathBuf {
    let dir = ws.path().join("packs/flex");
    std::fs::create_dir_all(&dir).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(
        repo.join("packs/node/lumenflow-pack.mjs"),
        dir.join("lumenflow-pack.mjs"),
    )
    .unwrap();
    std::fs::write(
        dir.join("handler.mjs"),
        r#"import { runPack } from './lumenflow-pack.mjs';
import { appendFileSync } from 'node:fs';
const h = async (event) => { appendFileSync('effects.txt', `${event.kind}\n`); return { status: 'handled' }; };
runPack({ handlers: { 'conductor:a_happened': h, 'conductor:b_happened': h } });
"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("manifest.json"),
        manifest("0.1.0", kinds).to_string(),
    )
    .unwrap();
    dir
}

fn reloads(ws: &Workspace) -> u64 {
    ws.status()["reload"]["count"].as_u64().unwrap()
}

fn wait_reloads(ws: &Workspace, n: u64) {
    wait_for(&format!("{n} reloads"), T, || {
        (reloads(ws) >= n).then_some(())
    });
}

/// Nothing more happens for a while (checking an absence needs a bounded wait).
fn still_reloads(ws: &Workspace, n: u64) {
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(reloads(ws), n, "an extra reload happened");
}

fn inbound(ws: &Workspace, kind: &str) {
    ws.inbound(kind, "{}");
}

fn effects(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("effects.txt"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Saves like vim: write a temporary file, rename it over the manifest.
fn save_by_rename(dir: &Path, v: &Value) {
    let tmp = dir.join(".manifest.json.swp");
    std::fs::write(&tmp, v.to_string()).unwrap();
    std::fs::rename(&tmp, dir.join("manifest.json")).unwrap();
}

/// Saves like many editors: truncate, then write in two pieces.
fn save_by_truncate(dir: &Path, v: &Value) {
    let text = v.to_string();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(dir.join("manifest.json"))
        .unwrap();
    let (a, b) = text.split_at(text.len() / 2);
    f.write_all(a.as_bytes()).unwrap();
    f.flush().unwrap();
    f.write_all(b.as_bytes()).unwrap();
}

#[test]
fn adding_and_removing_a_subscription_takes_effect_without_restart() {
    let mut ws = Workspace::new(json!({}), "");
    let dir = flex_pack(&ws, &["conductor:a_happened"]);
    ws.start();
    let pid = ws.child.as_ref().unwrap().id();
    inbound(&ws, "conductor:b_happened");
    assert_eq!(ws.status()["inbound"]["unrouted"], 1);

    save_by_rename(
        &dir,
        &manifest("0.1.1", &["conductor:a_happened", "conductor:b_happened"]),
    );
    wait_reloads(&ws, 1);
    inbound(&ws, "conductor:b_happened");
    wait_for("b handled", T, || {
        (effects(&dir) == ["conductor:b_happened"]).then_some(())
    });
    let p = ws.pack_status("flex");
    assert_eq!(p["version"], "0.1.1");
    assert_eq!(p["state"], "running");

    save_by_rename(&dir, &manifest("0.1.2", &["conductor:a_happened"]));
    wait_reloads(&ws, 2);
    inbound(&ws, "conductor:b_happened");
    inbound(&ws, "conductor:a_happened");
    wait_for("a handled", T, || (effects(&dir).len() == 2).then_some(()));
    assert_eq!(
        effects(&dir),
        ["conductor:b_happened", "conductor:a_happened"]
    );
    assert_eq!(ws.status()["inbound"]["unrouted"], 2);
    assert_eq!(ws.child.as_ref().unwrap().id(), pid, "same agent process");
}

#[test]
fn vim_saves_and_truncate_saves_reload_exactly_once_each() {
    let mut ws = Workspace::new(json!({}), "");
    let dir = flex_pack(&ws, &["conductor:a_happened"]);
    ws.start();
    for (i, by_rename) in [true, false, true, false].into_iter().enumerate() {
        let v = manifest(&format!("0.2.{i}"), &["conductor:a_happened"]);
        if by_rename {
            save_by_rename(&dir, &v);
        } else {
            save_by_truncate(&dir, &v);
        }
        wait_reloads(&ws, i as u64 + 1);
        still_reloads(&ws, i as u64 + 1);
        assert_eq!(ws.pack_status("flex")["version"], format!("0.2.{i}"));
    }
    // Saving the same content again changes nothing.
    save_by_rename(&dir, &manifest("0.2.3", &["conductor:a_happened"]));
    still_reloads(&ws, 4);
    // Handler files and the worker's own output are not manifests.
    std::fs::write(dir.join("notes.txt"), "x").unwrap();
    inbound(&ws, "conductor:a_happened");
    wait_for("handled", T, || (effects(&dir).len() == 1).then_some(()));
    still_reloads(&ws, 4);
}

#[test]
fn an_invalid_edit_keeps_the_previous_version_until_fixed() {
    let mut ws = Workspace::new(json!({}), "");
    let dir = flex_pack(&ws, &["conductor:a_happened"]);
    ws.start();
    std::fs::write(
        dir.join("manifest.json"),
        "{\"id\": \"flex\", \"version\": ",
    )
    .unwrap();
    let s = wait_for("the reload error", T, || {
        let s = ws.status();
        s["reload"]["last_error"].as_str().is_some().then_some(s)
    });
    let err = s["reload"]["last_error"].as_str().unwrap();
    assert!(
        err.contains("packs/flex/manifest.json:1:") && err.contains("JSON syntax error"),
        "{err}"
    );
    let p = ws.pack_status("flex");
    assert_eq!(p["state"], "running");
    assert_eq!(p["version"], "0.1.0");
    assert!(
        p["last_error"]
            .as_str()
            .unwrap()
            .contains("the previous version keeps running"),
        "{p}"
    );
    inbound(&ws, "conductor:a_happened");
    wait_for("old version handles", T, || {
        (effects(&dir).len() == 1).then_some(())
    });

    // A rule violation is refused the same way.
    let mut bad = manifest("0.3.0", &["conductor:a_happened"]);
    bad["emitted_event_kinds"] = json!(["flex:done"]);
    save_by_rename(&dir, &bad);
    wait_for("the rule error", T, || {
        let s = ws.status();
        s["reload"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("Missing backpressure_policy entry"))
            .then_some(())
    });
    assert_eq!(ws.pack_status("flex")["version"], "0.1.0");
    assert_eq!(reloads(&ws), 0);

    save_by_rename(&dir, &manifest("0.3.1", &["conductor:a_happened"]));
    wait_reloads(&ws, 1);
    let s = ws.status();
    assert_eq!(s["reload"]["last_error"], Value::Null);
    let p = ws.pack_status("flex");
    assert_eq!(p["version"], "0.3.1");
    assert_eq!(p["last_error"], Value::Null);
}

#[test]
fn a_burst_of_20_saves_in_100_ms_gives_one_or_two_reloads_ending_on_the_last() {
    let mut ws = Workspace::new(json!({}), "");
    let dir = flex_pack(&ws, &["conductor:a_happened"]);
    ws.start();
    for i in 0..20 {
        save_by_rename(
            &dir,
            &manifest(&format!("0.4.{i}"), &["conductor:a_happened"]),
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    wait_for("the last content", T, || {
        (ws.pack_status("flex")["version"] == "0.4.19").then_some(())
    });
    std::thread::sleep(Duration::from_millis(400));
    let n = reloads(&ws);
    assert!((1..=2).contains(&n), "{n} reloads for a burst of 20 saves");
    assert_eq!(ws.pack_status("flex")["version"], "0.4.19");
}

#[test]
fn a_new_folder_starts_a_pack_and_a_removed_one_stops_it() {
    let mut ws = Workspace::new(json!({}), "");
    std::fs::create_dir_all(ws.path().join("packs")).unwrap();
    ws.start();
    assert!(ws.status()["packs"].as_array().unwrap().is_empty());
    let dir = flex_pack(&ws, &["conductor:a_happened"]);
    wait_for("flex running", T, || {
        (ws.pack_status("flex")["state"] == "running").then_some(())
    });
    inbound(&ws, "conductor:a_happened");
    wait_for("handled", T, || (effects(&dir).len() == 1).then_some(()));
    let before = reloads(&ws);
    std::fs::remove_dir_all(&dir).unwrap();
    // The removal is applied (routes swapped) once the reload is counted.
    wait_reloads(&ws, before + 1);
    assert_eq!(ws.pack_status("flex")["state"], "stopped");
    inbound(&ws, "conductor:a_happened");
    let s = ws.status();
    assert_eq!(s["inbound"]["unrouted"], 1, "{s}\n{}", ws.log());
}

#[test]
fn agent_json_edits_are_validated_live_settings_applied_and_restart_only_ones_named() {
    let mut ws = Workspace::new(json!({}), "emitter");
    ws.start();
    let cfg = ws.path().join(".lumenflow/agent.json");
    std::fs::write(&cfg, r#"{"queue": {"max_depht": 5}}"#).unwrap();
    let s = wait_for("the config error", T, || {
        let s = ws.status();
        s["reload"]["last_error"].as_str().is_some().then_some(s)
    });
    assert!(
        s["reload"]["last_error"]
            .as_str()
            .unwrap()
            .contains("queue.max_depht: unknown key (did you mean \"queue.max_depth\"?)"),
        "{s}"
    );
    // queue.max_depth applies live: a batch of 6 no longer fits.
    std::fs::write(
        &cfg,
        r#"{"queue": {"max_depth": 5}, "identity": "renamed"}"#,
    )
    .unwrap();
    wait_for("applied", T, || {
        ws.log()
            .contains("agent.json reloaded: applied now: queue_max_depth")
            .then_some(())
    });
    assert!(
        ws.log().contains(
            "agent.json changed (identity): these settings take effect at the next start"
        ),
        "{}",
        ws.log()
    );
    assert_eq!(ws.status()["reload"]["last_error"], Value::Null);
    let r = ws.api().emit(
        (0..6)
            .map(|_| json!({"kind": "emitter:job_completed", "payload": {}}))
            .collect(),
    );
    assert_eq!(r.status, 429, "{}", r.body);
    let r = ws.api().emit(
        (0..5)
            .map(|_| json!({"kind": "emitter:job_completed", "payload": {}}))
            .collect(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Editing an exec pack's handler source restarts its worker with the new code (the manifest
/// unchanged); an event sent after the restart is handled by the new code, none is lost, and
/// files the handler writes in its folder (not source) restart nothing.
#[test]
fn editing_the_handler_code_restarts_the_worker_with_it() {
    let mut ws = Workspace::new(json!({}), "");
    let dir = flex_pack(&ws, &["conductor:a_happened"]);
    ws.start();
    wait_for("flex running", T, || {
        (ws.pack_status("flex")["state"] == "running").then_some(())
    });
    inbound(&ws, "conductor:a_happened");
    wait_for("v1 handled", T, || (effects(&dir).len() == 1).then_some(()));
    // The handler itself writes effects.txt in the pack folder: not source, no restart.
    still_reloads(&ws, 0);
    // Saved like an editor does: a temporary file renamed over the handler.
    let v2 = std::fs::read_to_string(dir.join("handler.mjs"))
        .unwrap()
        .replace("`${event.kind}\\n`", "`v2 ${event.kind}\\n`");
    assert!(v2.contains("v2 "), "the edit applies");
    std::fs::write(dir.join(".handler.mjs.swp"), v2).unwrap();
    std::fs::rename(dir.join(".handler.mjs.swp"), dir.join("handler.mjs")).unwrap();
    wait_reloads(&ws, 1);
    assert!(
        ws.log().contains("restarted: its handler code changed"),
        "{}",
        ws.log()
    );
    inbound(&ws, "conductor:a_happened");
    let e = wait_for("the new code handles the next event", T, || {
        let e = effects(&dir);
        (e.len() == 2).then_some(e)
    });
    assert_eq!(e, vec!["conductor:a_happened", "v2 conductor:a_happened"]);
    still_reloads(&ws, 1);
}
