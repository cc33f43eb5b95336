//! The platform's `workspace.yaml` (LUMENFLOW-FACTS "Workspace config"), read so that a
//! LumenFlow workspace runs the agent with no configuration of its own.
//!
//! What the agent takes from it:
//! - `id`: the workspace identity (the `from` of events, the `workspace_id` upstream).
//! - `control_plane` (strict, as in the platform): `{endpoint, org_id, project_id,
//!   sync_interval, policy_mode, auth: {token_env}}`: the upstream when there is no
//!   enrollment. The token is read from the variable `auth.token_env` names, never stored.
//!   `sync_interval` (s) sets the heartbeat and policy refresh; `policy_mode` decides how the
//!   control plane's policies combine with `agent.json` `policies` (see `policy_mode.rs`).
//! - `packs`: pins `{id, version, integrity: dev | sha256:<hex>, source}` checked before a
//!   pack loads (see `packs::integrity`).
//!
//! Other root keys belong to the platform and packs (`lanes`, `security`, pack config keys):
//! the agent leaves them alone. Errors name the file and the key, as for `agent.json`.
//! Precedence: enrollment > workspace.yaml > agent.json.

use crate::config::{check_upstream, is_env_name, ConfigError};
use serde_json::{Map, Value};
use std::path::Path;

pub const FILE: &str = "workspace.yaml";

pub use lumenflow_actors::policy_mode::PolicyMode;

#[derive(Debug, Clone, PartialEq)]
pub struct ControlPlane {
    pub endpoint: String,
    pub org_id: String,
    pub project_id: String,
    pub sync_interval_s: u64,
    pub policy_mode: PolicyMode,
    pub token_env: String,
    /// The block as written (served on `/api/v1/config` on mem:inbox).
    pub raw: Value,
}

pub use lumenflow_pack_sdk::platform::PackPin;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkspaceYaml {
    pub id: Option<String>,
    pub control_plane: Option<ControlPlane>,
    pub pins: Vec<PackPin>,
}

/// Reads `<root>/workspace.yaml`; `None` when there is none.
pub fn load(root: &Path) -> Result<Option<WorkspaceYaml>, ConfigError> {
    let path = root.join(FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err("(file)", format!("cannot read: {e}"))),
    };
    parse(&text).map(Some)
}

fn err(key: &str, message: String) -> ConfigError {
    ConfigError {
        file: FILE.into(),
        key: key.into(),
        message,
    }
}

/// Parses the text of a workspace.yaml.
pub fn parse(text: &str) -> Result<WorkspaceYaml, ConfigError> {
    let value: Value = serde_yaml_ng::from_str(text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!(":{}:{}", l.line(), l.column()))
            .unwrap_or_default();
        ConfigError {
            file: format!("{FILE}{at}"),
            key: "(syntax)".into(),
            message: format!("YAML syntax error: {e}"),
        }
    })?;
    let root = match value {
        Value::Object(m) => m,
        Value::Null => Map::new(),
        other => {
            return Err(err(
                "(top level)",
                format!("must be a mapping, found {other}"),
            ))
        }
    };
    let id = match root.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(other) => {
            return Err(err(
                "id",
                format!("expected a non-empty string, found {other}"),
            ))
        }
    };
    let control_plane = match root.get("control_plane") {
        None | Some(Value::Null) => None,
        Some(v) => Some(control_plane(v)?),
    };
    let pins = match root.get("packs") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, p)| pin(i, p))
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(err("packs", format!("expected a list, found {other}"))),
    };
    Ok(WorkspaceYaml {
        id,
        control_plane,
        pins,
    })
}

const CONTROL_PLANE_KEYS: &[&str] = &[
    "endpoint",
    "org_id",
    "project_id",
    "sync_interval",
    "policy_mode",
    "auth",
];

fn control_plane(v: &Value) -> Result<ControlPlane, ConfigError> {
    let Value::Object(m) = v else {
        return Err(err(
            "control_plane",
            format!("expected a mapping {{endpoint, org_id, project_id, sync_interval, policy_mode, auth}}, found {v}"),
        ));
    };
    for k in m.keys() {
        if !CONTROL_PLANE_KEYS.contains(&k.as_str()) {
            return Err(err(
                &format!("control_plane.{k}"),
                format!(
                    "unknown key (the block is strict); known keys: {}",
                    CONTROL_PLANE_KEYS.join(", ")
                ),
            ));
        }
    }
    let text = |k: &str| -> Result<String, ConfigError> {
        match m.get(k) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(other) => Err(err(
                &format!("control_plane.{k}"),
                format!("expected a non-empty string, found {other}"),
            )),
            None => Err(err(
                &format!("control_plane.{k}"),
                "missing (required)".into(),
            )),
        }
    };
    let endpoint = text("endpoint")?;
    check_upstream(endpoint.trim_end_matches('/')).map_err(|m| err("control_plane.endpoint", m))?;
    let org_id = text("org_id")?;
    let project_id = text("project_id")?;
    let sync_interval_s = match m.get("sync_interval") {
        Some(x) => x.as_u64().filter(|n| *n > 0).ok_or_else(|| {
            err(
                "control_plane.sync_interval",
                format!("expected a positive whole number of seconds, found {x}"),
            )
        })?,
        None => {
            return Err(err(
                "control_plane.sync_interval",
                "missing (required)".into(),
            ))
        }
    };
    let mode = text("policy_mode")?;
    let policy_mode = PolicyMode::parse(&mode).ok_or_else(|| {
        err(
            "control_plane.policy_mode",
            format!("\"{mode}\" is not one of authoritative, tighten-only, dev-override"),
        )
    })?;
    let token_env = match m.get("auth") {
        Some(Value::Object(a)) => {
            if let Some(k) = a.keys().find(|k| *k != "token_env") {
                return Err(err(
                    &format!("control_plane.auth.{k}"),
                    "unknown key (the block is strict); known keys: token_env".into(),
                ));
            }
            match a.get("token_env") {
                Some(Value::String(s)) if is_env_name(s) => s.clone(),
                Some(other) => {
                    return Err(err(
                        "control_plane.auth.token_env",
                        format!("expected an uppercase environment variable name (^[A-Z][A-Z0-9_]*$), found {other}"),
                    ))
                }
                None => {
                    return Err(err(
                        "control_plane.auth.token_env",
                        "missing (required)".into(),
                    ))
                }
            }
        }
        Some(other) => {
            return Err(err(
                "control_plane.auth",
                format!("expected a mapping {{token_env: NAME}}, found {other}"),
            ))
        }
        None => return Err(err("control_plane.auth", "missing (required)".into())),
    };
    Ok(ControlPlane {
        endpoint,
        org_id,
        project_id,
        sync_interval_s,
        policy_mode,
        token_env,
        raw: v.clone(),
    })
}

fn pin(i: usize, v: &Value) -> Result<PackPin, ConfigError> {
    let at = |k: &str| format!("packs[{i}].{k}");
    let field = |k: &str| -> Result<String, ConfigError> {
        match v.get(k) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            other => Err(err(
                &at(k),
                format!(
                    "expected a non-empty string, found {}",
                    other
                        .map(Value::to_string)
                        .unwrap_or_else(|| "nothing".into())
                ),
            )),
        }
    };
    let id = field("id")?;
    let version = field("version")?;
    let integrity = field("integrity")?;
    let well_formed = integrity == "dev"
        || integrity
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    if !well_formed {
        return Err(err(
            &at("integrity"),
            format!("expected \"dev\" or \"sha256:<64 hex characters>\", found \"{integrity}\""),
        ));
    }
    Ok(PackPin {
        id,
        version,
        integrity,
        at: format!("{FILE}: packs[{i}]"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLATFORM: &str = "id: acme-prod\nname: Acme\ncontrol_plane:\n  endpoint: https://cp.example.com/\n  org_id: acme\n  project_id: web\n  sync_interval: 15\n  policy_mode: tighten-only\n  auth:\n    token_env: ACME_CP_TOKEN\npacks:\n  - id: acme-demo\n    version: 0.1.0\n    integrity: dev\n    source: local\nlanes: []\n";

    #[test]
    fn reads_what_the_platform_writes() {
        let w = parse(PLATFORM).unwrap();
        assert_eq!(w.id.as_deref(), Some("acme-prod"));
        let cp = w.control_plane.unwrap();
        assert_eq!(cp.endpoint, "https://cp.example.com/");
        assert_eq!(cp.sync_interval_s, 15);
        assert_eq!(cp.policy_mode, PolicyMode::TightenOnly);
        assert_eq!(cp.token_env, "ACME_CP_TOKEN");
        assert_eq!(w.pins.len(), 1);
        assert_eq!(parse("").unwrap(), WorkspaceYaml::default());
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let cases = [
            (
                PLATFORM.replace("  org_id: acme\n", ""),
                "workspace.yaml: control_plane.org_id: missing",
            ),
            (
                PLATFORM.replace("tighten-only", "lenient"),
                "workspace.yaml: control_plane.policy_mode: \"lenient\"",
            ),
            (
                PLATFORM.replace("ACME_CP_TOKEN", "acme_token"),
                "workspace.yaml: control_plane.auth.token_env: expected an uppercase",
            ),
            (
                PLATFORM.replace("sync_interval: 15", "sync_interval: 0"),
                "workspace.yaml: control_plane.sync_interval: expected a positive",
            ),
            (
                PLATFORM.replace("https://cp.example.com/", "http://cp.example.com"),
                "workspace.yaml: control_plane.endpoint: ",
            ),
            (
                PLATFORM.replace("  org_id: acme\n", "  org_id: acme\n  region: eu\n"),
                "workspace.yaml: control_plane.region: unknown key",
            ),
            (
                PLATFORM.replace("integrity: dev", "integrity: md5:abc"),
                "workspace.yaml: packs[0].integrity: expected",
            ),
            ("id: [\n".to_string(), "workspace.yaml:"),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
        }
    }
}
