//! What the LumenFlow platform's own pack loader (`kernel/src/pack/pack-loader.ts`,
//! `manifest.ts`, `hash.ts`) requires, so a pack that runs in the agent also loads in the
//! platform:
//! - **Pins** (`workspace.yaml` `packs: [{id, version, integrity}]`): a pinned pack loads only
//!   when its manifest's version is the pinned one and, unless `integrity: dev`, the folder's
//!   hash is the pinned `sha256:<hex>`. Checked before the pack loads; a mismatch is an error
//!   naming both values and the pack is not loaded.
//! - **The folder hash**, computed exactly as the platform does: the files of the folder in
//!   sorted order (relative paths with `/`; `node_modules/`, `.git/`, `dist/` at the top and
//!   any `.DS_Store` skipped), SHA-256 over `relpath NUL sha256hex(contents) NUL` for each.
//! - **Loader rules the agent does not need** (at least one `task_types` entry, `tools` and
//!   `policies` present, known policy triggers, network scope postures): reported as warnings
//!   by `validate`, one line each, since the agent runs such a pack but the platform refuses it.

use crate::manifest::{Diagnostic, PackLoad, Severity};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::Path;

/// A `packs:` entry of workspace.yaml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackPin {
    pub id: String,
    pub version: String,
    /// `dev` (not verified) or `sha256:<64 hex>`.
    pub integrity: String,
    /// Where the pin is written, for messages (`workspace.yaml: packs[0]`).
    pub at: String,
}

const EXCLUDED_DIRS: &[&str] = &["node_modules/", ".git/", "dist/"];
const EXCLUDED_NAME: &str = ".DS_Store";

/// The platform's deterministic hash of a pack folder (hex, without `sha256:`).
pub fn pack_hash(root: &Path) -> std::io::Result<String> {
    let mut files = Vec::new();
    collect(root, root, &mut files)?;
    files.retain(|rel| {
        !EXCLUDED_DIRS.iter().any(|d| rel.starts_with(d))
            && rel != EXCLUDED_NAME
            && !rel.ends_with(&format!("/{EXCLUDED_NAME}"))
    });
    files.sort();
    let mut outer = Sha256::new();
    for rel in &files {
        let contents = std::fs::read(root.join(rel))?;
        outer.update(rel.as_bytes());
        outer.update([0u8]);
        outer.update(hex::encode(Sha256::digest(&contents)).as_bytes());
        outer.update([0u8]);
    }
    Ok(hex::encode(outer.finalize()))
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            let rel: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            out.push(rel.join("/"));
        }
    }
    Ok(())
}

/// Checks a loaded pack against its pin: an error diagnostic (and the pack not loaded) when
/// the version or the folder hash is not the pinned one.
pub fn check_pin(load: &mut PackLoad, pin: &PackPin) {
    let Some(manifest) = &load.manifest else {
        return;
    };
    let mut error = |message: String| {
        load.diagnostics.push(Diagnostic {
            severity: Severity::Error,
            file: pin.at.clone(),
            field: None,
            message,
        })
    };
    if manifest.version != pin.version {
        error(format!(
            "Pack version mismatch: {} is pinned at {} but {} says {}",
            pin.id, pin.version, load.display, manifest.version
        ));
    } else if pin.integrity != "dev" {
        let expected = pin
            .integrity
            .strip_prefix("sha256:")
            .unwrap_or(&pin.integrity)
            .to_ascii_lowercase();
        match pack_hash(&load.dir) {
            Ok(actual) if actual == expected => return,
            Ok(actual) => error(format!(
                "Pack integrity mismatch for {}: expected sha256:{expected}, got sha256:{actual} (the folder changed since it was pinned; update the pin if the change is intended)",
                pin.id
            )),
            Err(e) => error(format!(
                "Pack integrity: cannot hash {}: {e}",
                load.dir.display()
            )),
        }
    } else {
        return;
    }
    load.manifest = None;
}

const POLICY_TRIGGERS: &[&str] = &[
    "on_tool_request",
    "on_claim",
    "on_completion",
    "on_evidence_added",
];

/// Where a manifest the agent accepts would be refused by the platform's loader: one line
/// each.
pub fn loader_warnings(manifest: &Value) -> Vec<String> {
    let mut w = Vec::new();
    let refuses = "the platform's pack loader refuses the pack";
    match manifest.get("task_types") {
        Some(Value::Array(t)) if !t.is_empty() => {}
        _ => w.push(format!(
            "task_types: needs at least one task type ({refuses})"
        )),
    }
    for key in ["tools", "policies"] {
        if !manifest.get(key).is_some_and(Value::is_array) {
            w.push(format!(
                "{key}: missing; write `{key}: []` if the pack has none ({refuses})"
            ));
        }
    }
    if let Some(Value::Array(policies)) = manifest.get("policies") {
        for (i, p) in policies.iter().enumerate() {
            let trigger = p.get("trigger").and_then(Value::as_str).unwrap_or("");
            if !POLICY_TRIGGERS.contains(&trigger) {
                w.push(format!(
                    "policies[{i}].trigger: \"{trigger}\" is not one of {} ({refuses})",
                    POLICY_TRIGGERS.join(", ")
                ));
            }
        }
    }
    if let Some(Value::Array(tools)) = manifest.get("tools") {
        for (i, t) in tools.iter().enumerate() {
            let scopes = t.get("required_scopes").and_then(Value::as_array);
            for (j, s) in scopes.into_iter().flatten().enumerate() {
                if s.get("type").and_then(Value::as_str) == Some("network") {
                    let posture = s.get("posture").and_then(Value::as_str).unwrap_or("");
                    if !matches!(posture, "off" | "full" | "allowlist") {
                        w.push(format!(
                            "tools[{i}].required_scopes[{j}].posture: \"{posture}\" is not one of off, full, allowlist ({refuses})"
                        ));
                    } else if posture == "allowlist"
                        && s.get("allowlist_entries")
                            .and_then(Value::as_array)
                            .is_none_or(Vec::is_empty)
                    {
                        w.push(format!(
                            "tools[{i}].required_scopes[{j}]: posture allowlist needs allowlist_entries ({refuses})"
                        ));
                    }
                }
            }
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_hash_is_the_platforms() {
        let d = tempfile_dir();
        std::fs::write(d.join("manifest.yaml"), "id: a\n").unwrap();
        std::fs::create_dir_all(d.join("src")).unwrap();
        std::fs::write(d.join("src/tool.mjs"), "export {}\n").unwrap();
        std::fs::create_dir_all(d.join("node_modules/x")).unwrap();
        std::fs::write(d.join("node_modules/x/i.js"), "ignored").unwrap();
        std::fs::write(d.join(".DS_Store"), "ignored").unwrap();
        // Computed independently: relpath NUL sha256(contents) NUL, sorted.
        let mut outer = Sha256::new();
        for (rel, body) in [
            ("manifest.yaml", "id: a\n"),
            ("src/tool.mjs", "export {}\n"),
        ] {
            outer.update(format!("{rel}\0{}\0", hex::encode(Sha256::digest(body))));
        }
        assert_eq!(pack_hash(&d).unwrap(), hex::encode(outer.finalize()));
        // Empty folder: the hash of nothing.
        let e = tempfile_dir();
        assert_eq!(
            pack_hash(&e).unwrap(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("lf-sdk-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn loader_rules_are_warned_one_line_each() {
        let w = loader_warnings(&json!({"id": "a", "task_types": []}));
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].starts_with("task_types: needs at least one"));
        let w = loader_warnings(
            &json!({"task_types": ["t"], "tools": [{"required_scopes": [{"type": "network", "posture": "some"}]}],
            "policies": [{"id": "p", "trigger": "on_push", "decision": "deny"}]}),
        );
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w
            .iter()
            .any(|l| l.starts_with("policies[0].trigger: \"on_push\"")));
        assert!(w
            .iter()
            .any(|l| l.starts_with("tools[0].required_scopes[0].posture")));
        assert!(
            loader_warnings(&json!({"task_types": ["t"], "tools": [], "policies": []})).is_empty()
        );
    }
}
