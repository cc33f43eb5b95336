//! The CLI as an operator meets it: `stop`, `version`, a closed pipe, help texts (the last in
//! `src/cli.rs`'s unit tests).

mod common;

use common::*;
use serde_json::json;
use std::process::Stdio;
use std::time::Duration;

/// `stop` signals the running agent, returns 0 once it has exited, and 3 when none runs.
#[test]
fn stop_waits_for_the_agent_to_exit_and_says_when_none_runs() {
    let mut ws = Workspace::new(json!({}), "");
    ws.start();
    let out = ws.run(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("stopped lumenflow-agent"));
    // It has exited (not merely been signalled): the child is reaped at once.
    let status = ws.child.take().unwrap().wait().unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM drains and exits 0");
    let out = ws.run(&["stop"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not running"));
}

#[test]
fn version_names_the_protocol_and_schema() {
    let ws = Workspace::new(json!({}), "");
    let out = ws.run(&["version"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("lumenflow-agent 0.") && text.contains("worker protocol 1"),
        "{text}"
    );
}

/// A command whose stdout closed (`| head -c 0`) ends quietly with 0: before, `dlq list
/// --json` panicked (`failed printing to stdout: Broken pipe`, exit 101) and `validate` exited 2.
#[test]
fn a_closed_stdout_ends_a_command_quietly_with_0() {
    let mut ws = Workspace::new(json!({}), "");
    ws.start();
    ws.run(&["stop"]);
    ws.child.take().unwrap().wait().unwrap();
    for args in [
        vec!["dlq", "list", "--json"],
        vec!["validate"],
        vec!["version"],
        vec!["inbox", "--json"],
        vec!["graph"],
        vec!["completions", "bash"],
    ] {
        let mut child = ws
            .cmd()
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before the command writes anything.
        drop(child.stdout.take());
        wait_for("the command to end", Duration::from_secs(20), || {
            child.try_wait().unwrap().map(|_| ())
        });
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panic"), "{args:?}: {stderr}");
    }
}

/// `dlq purge` deletes for good: it asks, refuses without a terminal unless `--yes`, and can
/// delete one dead letter.
#[test]
fn dlq_purge_asks_unless_yes_and_can_purge_one() {
    let mut ws = Workspace::new(json!({"identity": "ws-test"}), "");
    raw_pack(
        &ws,
        "refuser",
        "import { runPack } from '../node/lumenflow-pack.mjs';\nrunPack({ handlers: { 'conductor:recovery_requested': async () => ({ status: 'failed', action: 'never' }) } });\n",
        json!({}),
    );
    copy_dir(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packs/node"),
        &ws.path().join("packs/node"),
    );
    ws.start();
    for n in 0..3 {
        ws.inbound("conductor:recovery_requested", &format!(r#"{{"n":{n}}}"#));
    }
    wait_for("3 dead letters", Duration::from_secs(30), || {
        (ws.status()["dead_letters"] == 3).then_some(())
    });
    let list = || -> Vec<serde_json::Value> {
        serde_json::from_slice(&ws.run(&["dlq", "list", "--json"]).stdout).unwrap()
    };
    // No terminal (the test's stdin is not one), no --yes: nothing is deleted.
    let out = ws
        .cmd()
        .args(["dlq", "purge"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
    assert_eq!(list().len(), 3);
    let one = list()[1]["id"].as_i64().unwrap();
    let out = ws.run(&["dlq", "purge", &one.to_string(), "--yes"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("purged 1"),
        "{out:?}"
    );
    let left: Vec<i64> = list().iter().map(|d| d["id"].as_i64().unwrap()).collect();
    assert_eq!(left.len(), 2);
    assert!(!left.contains(&one));
    assert_eq!(ws.status()["dead_letters"], 2);
    let out = ws.run(&["dlq", "purge", "--yes"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("purged 2"),
        "{out:?}"
    );
    assert!(list().is_empty());
}

/// A pack that was never loaded (invalid from the start) shows no load time; before, it was
/// "498946h54m ago" (the epoch).
#[test]
fn a_pack_never_loaded_shows_no_load_time() {
    let mut ws = Workspace::new(json!({}), "");
    let dir = ws.path().join("packs/broken");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("manifest.json"),
        json!({"id": "broken", "version": "0.1.0", "emitted_event_kinds": ["broken:done"]})
            .to_string(),
    )
    .unwrap();
    ws.start();
    wait_for(
        "the invalid pack in status",
        Duration::from_secs(20),
        || (ws.pack_status("broken")["state"] == "invalid").then_some(()),
    );
    let out = ws.run(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("broken"))
        .unwrap()
        .to_string();
    assert!(!line.contains("h ago") && !line.contains("m ago"), "{line}");
}

/// `completions bash` is a script bash parses, offering the commands.
#[test]
fn bash_completions_parse_and_offer_the_commands() {
    let ws = Workspace::new(json!({}), "");
    let out = ws.run(&["completions", "bash"]);
    assert_eq!(out.status.code(), Some(0));
    let script = String::from_utf8_lossy(&out.stdout).to_string();
    for word in ["start", "stop", "status", "dlq", "completions"] {
        assert!(script.contains(word), "{word} missing");
    }
    let path = ws.path().join("completions.bash");
    std::fs::write(&path, &script).unwrap();
    let check = std::process::Command::new("bash")
        .arg("-n")
        .arg(&path)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
}
