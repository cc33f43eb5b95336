//! `lumenflow-agent validate` end to end: the real binary against temporary workspaces.

use std::path::Path;
use std::process::Command;

fn agent() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lumenflow-agent"));
    c.env("LUMENFLOW_AGENT_NO_USER_CONFIG", "1")
        .env_remove("RUST_LOG");
    c
}

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

fn run(ws: &Path, args: &[&str]) -> (i32, String) {
    let out = agent()
        .arg("--workspace")
        .arg(ws)
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn every_violation_of_every_pack_is_printed_and_exit_is_1() {
    let ws = tempfile::tempdir().unwrap();
    let root = ws.path();
    write(root, ".lumenflow/agent.json", "{}");
    write(
        root,
        "packs/acme-demo/manifest.json",
        r#"{"id":"acme-demo","version":"0.1.0",
            "emitted_event_kinds":["acme-demo:job_completed","billing:job_completed"],
            "subscribed_event_kinds":["conductor:recovery_requested"],
            "backpressure_policy":{"billing:job_completed":"queue"}}"#,
    );
    write(
        root,
        "packs/broken/manifest.json",
        "{\n  \"id\": \"broken\",\n  \"version\": \n}",
    );
    write(root, "packs/shared-lib/index.mjs", "export {}");
    write(
        root,
        "packs/escape/manifest.yaml",
        "id: escape\nversion: 0.1.0\nruntime:\n  command: [node, ../../evil.mjs]\ntools:\n  - name: t\n    entry: ../t.ts#x\n    required_scopes: [{type: path, pattern: 'src/**', access: read}]\n",
    );
    let (code, out) = run(root, &["validate"]);
    assert_eq!(code, 1, "{out}");
    for needle in [
        "packs/acme-demo/manifest.json: emitted_event_kinds[1]: Pack slug prefix mismatch: kind \"billing:job_completed\" must start with \"acme-demo:\" (rule: <slug>:<event_name_snake_case>)",
        "packs/acme-demo/manifest.json: backpressure_policy: Missing backpressure_policy entry: emitted kind \"acme-demo:job_completed\" needs \"ephemeral\" or \"queue\"",
        "packs/acme-demo/manifest.json: subscribed_event_kinds[0]: Missing handler: subscribed kind \"conductor:recovery_requested\" has no registered handler",
        "packs/broken/manifest.json:4:1: JSON syntax error",
        "packs/escape/manifest.yaml: runtime.command[1]: Path escapes pack folder",
        "packs/escape/manifest.yaml: tools[0].entry: Path escapes pack folder",
        "3 packs checked: 0 valid, 3 invalid",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    assert!(
        !out.contains("shared-lib"),
        "a folder without manifest is skipped: {out}"
    );
}

#[test]
fn a_valid_workspace_exits_0_and_existing_yaml_packs_validate() {
    let ws = tempfile::tempdir().unwrap();
    let root = ws.path();
    std::fs::create_dir_all(root.join(".lumenflow")).unwrap();
    write(
        root,
        "packs/software-delivery/manifest.yaml",
        "id: software-delivery\nversion: 3.19.0\ntask_types: [wu]\ntools:\n  - name: wu:status\n    entry: tools/wu.ts#status\n    permission: read\n    required_scopes:\n      - {type: network, posture: off}\n    input_schema: {type: object}\nconfig_schema: schema.json\npolicies: []\nevidence_types: []\nstate_aliases: {}\nlane_templates: []\n",
    );
    let (code, out) = run(root, &["validate"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: software-delivery 3.19.0"), "{out}");
    let (code, out) = run(
        root,
        &[
            "validate",
            root.join("packs/software-delivery").to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}");
}

#[test]
fn this_repository_is_a_valid_demo_workspace() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (code, out) = run(repo, &["validate"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: acme-demo"), "{out}");
}

#[test]
fn bad_agent_json_names_file_and_key() {
    let ws = tempfile::tempdir().unwrap();
    write(
        ws.path(),
        ".lumenflow/agent.json",
        r#"{"queue":{"max_depht":5}}"#,
    );
    let (code, out) = run(ws.path(), &["validate"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(".lumenflow/agent.json: queue.max_depht: unknown key (did you mean \"queue.max_depth\"?)"), "{out}");
}

#[test]
fn no_workspace_is_an_environment_error() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = run(dir.path(), &["validate"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("No workspace"), "{out}");
}

#[test]
fn help_lists_every_command() {
    let out = agent().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "start",
        "status",
        "validate",
        "emit",
        "new",
        "conformance",
        "inbox",
        "dlq",
        "enroll",
        "conductor",
    ] {
        assert!(text.contains(cmd), "{cmd} missing from --help:\n{text}");
    }
}

/// A pack written like the quickstart (src/manifest.ts, no manifest.yaml) is not skipped in
/// silence; a manifest without `runtime` says that is why its handler is missing.
#[test]
fn the_real_cause_is_named_for_a_pack_author() {
    let ws = tempfile::tempdir().unwrap();
    let root = ws.path();
    write(root, ".lumenflow/agent.json", "{}");
    write(
        root,
        "packs/ts-only/src/manifest.ts",
        "export const M = {};\n",
    );
    write(
        root,
        "packs/no-runtime/manifest.yaml",
        "id: no-runtime\nversion: 0.1.0\nsubscribed_event_kinds: [\"conductor:recovery_requested\"]\n",
    );
    write(
        root,
        "packs/no-script/manifest.yaml",
        "id: no-script\nversion: 0.1.0\nruntime:\n  command: [node, --import, tsx, src/worker.ts]\n",
    );
    write(
        root,
        "packs/no-program/manifest.yaml",
        "id: no-program\nversion: 0.1.0\nruntime:\n  command: [no-such-runtime-xyz, main.py]\n",
    );
    let (code, out) = run(root, &["validate"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("packs/no-script/manifest.yaml: runtime.command[3]: Worker script not found: \"src/worker.ts\" is not in the pack folder"),
        "{out}"
    );
    assert!(
        out.contains("packs/no-program/manifest.yaml: runtime.command[0]: Worker program not found: \"no-such-runtime-xyz\""),
        "{out}"
    );
    assert!(
        out.contains("warning: packs/ts-only: skipped: it has src/manifest.ts but no manifest.yaml or manifest.json"),
        "{out}"
    );
    assert!(
        out.contains("Missing handler: subscribed kind \"conductor:recovery_requested\" has no registered handler (the manifest has no `runtime`"),
        "{out}"
    );
}
