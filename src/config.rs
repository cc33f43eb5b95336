//! `agent.json` (SPEC §3): every field optional with a default; an unknown key or a bad value
//! is an error naming the file, the key and what is allowed.
//!
//! User-wide defaults may live in the platform config folder
//! (`~/.config/lumenflow-agent/config.json` on Linux); the workspace's file wins, key by key.

use serde_json::{Map, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// fsync at every group commit (survives a power cut).
    Full,
    /// survives a process crash, not a power cut.
    Normal,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AgentConfig {
    pub identity: String,
    pub packs_dir: String,
    pub upstream: String,
    pub api_listen: SocketAddr,
    pub durability: Durability,
    pub queue_max_depth: u64,
    pub queue_batch_max: usize,
    pub replay_retention_days: u32,
    pub max_restarts: u32,
    pub window_s: u64,
    pub max_attempts: u32,
    pub handler_timeout_ms: u64,
    /// PEM file of extra root certificates for an https upstream (relative to the workspace).
    pub tls_ca_file: Option<String>,
}

impl AgentConfig {
    pub fn defaults(workspace_name: &str) -> Self {
        AgentConfig {
            identity: workspace_name.to_string(),
            packs_dir: "packs".into(),
            upstream: "mem:inbox".into(),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            durability: Durability::Full,
            queue_max_depth: 1_000_000,
            queue_batch_max: 500,
            replay_retention_days: 7,
            max_restarts: 5,
            window_s: 30,
            max_attempts: 3,
            handler_timeout_ms: 30_000,
            tls_ca_file: None,
        }
    }

    /// Loads the user-wide file (if any) then the workspace file (if any) over the defaults.
    pub fn load(workspace_name: &str, workspace_file: &Path) -> Result<Self, ConfigError> {
        let mut cfg = Self::defaults(workspace_name);
        if std::env::var_os("LUMENFLOW_AGENT_NO_USER_CONFIG").is_none() {
            if let Some(user) = user_config_file() {
                if user.is_file() {
                    cfg.apply_file(&user, &user.display().to_string())?;
                }
            }
        }
        if workspace_file.is_file() {
            cfg.apply_file(workspace_file, ".lumenflow/agent.json")?;
        }
        Ok(cfg)
    }

    fn apply_file(&mut self, path: &Path, shown: &str) -> Result<(), ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            file: shown.to_string(),
            key: key.to_string(),
            message,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| err("(file)", format!("cannot read: {e}")))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| ConfigError {
            file: format!("{shown}:{}:{}", e.line(), e.column()),
            key: "(syntax)".into(),
            message: format!("JSON syntax error: {e}"),
        })?;
        self.apply_value(&value, shown)
    }

    /// Applies one config object over `self`.
    pub fn apply_value(&mut self, value: &Value, shown: &str) -> Result<(), ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            file: shown.to_string(),
            key: key.to_string(),
            message,
        };
        let Value::Object(obj) = value else {
            return Err(err("(top level)", "must be a JSON object".into()));
        };
        check_keys(obj, "", TOP_KEYS, &err)?;
        for (key, v) in obj {
            match key.as_str() {
                "identity" => {
                    self.identity = non_empty_string(v).ok_or_else(|| {
                        err(key, format!("expected a non-empty string, found {v}"))
                    })?;
                }
                "packs_dir" => {
                    let s = non_empty_string(v).ok_or_else(|| {
                        err(
                            key,
                            format!("expected a folder path relative to the workspace, found {v}"),
                        )
                    })?;
                    if Path::new(&s).is_absolute() || s.split('/').any(|seg| seg == "..") {
                        return Err(err(
                            key,
                            format!("\"{s}\" must be a folder inside the workspace"),
                        ));
                    }
                    self.packs_dir = s;
                }
                "upstream" => {
                    let s = non_empty_string(v).ok_or_else(|| {
                        err(
                            key,
                            format!("expected \"mem:inbox\" or an http(s) URL, found {v}"),
                        )
                    })?;
                    check_upstream(&s).map_err(|m| err(key, m))?;
                    self.upstream = s;
                }
                "durability" => {
                    self.durability = match v.as_str() {
                        Some("full") => Durability::Full,
                        Some("normal") => Durability::Normal,
                        _ => {
                            return Err(err(
                                key,
                                format!("expected \"full\" or \"normal\", found {v}"),
                            ))
                        }
                    }
                }
                "api" => {
                    let m = v.as_object().ok_or_else(|| err(key, format!("expected an object like {{\"listen\": \"127.0.0.1:0\"}}, found {v}")))?;
                    check_keys(m, "api.", &["listen"], &err)?;
                    if let Some(l) = m.get("listen") {
                        let addr: SocketAddr =
                            l.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
                                err(
                                    "api.listen",
                                    format!("expected \"127.0.0.1:PORT\", found {l}"),
                                )
                            })?;
                        if !addr.ip().is_loopback() {
                            return Err(err("api.listen", format!("{addr} is not a loopback address; the local API only listens on 127.0.0.1 or ::1")));
                        }
                        self.api_listen = addr;
                    }
                }
                "queue" => {
                    let m = obj_of(v, key, &err)?;
                    check_keys(m, "queue.", &["max_depth", "batch_max"], &err)?;
                    if let Some(x) = m.get("max_depth") {
                        self.queue_max_depth = int_in(x, 1, 1_000_000_000).ok_or_else(|| {
                            err(
                                "queue.max_depth",
                                format!("expected a whole number from 1 to 1000000000, found {x}"),
                            )
                        })?;
                    }
                    if let Some(x) = m.get("batch_max") {
                        self.queue_batch_max = int_in(x, 1, 10_000).ok_or_else(|| {
                            err(
                                "queue.batch_max",
                                format!("expected a whole number from 1 to 10000, found {x}"),
                            )
                        })? as usize;
                    }
                }
                "tls" => {
                    let m = obj_of(v, key, &err)?;
                    check_keys(m, "tls.", &["ca_file"], &err)?;
                    if let Some(x) = m.get("ca_file") {
                        let path = x.as_str().filter(|s| !s.is_empty()).ok_or_else(|| {
                            err(
                                "tls.ca_file",
                                format!(
                                    "expected the path of a PEM file of CA certificates, found {x}"
                                ),
                            )
                        })?;
                        self.tls_ca_file = Some(path.to_string());
                    }
                }
                "replay" => {
                    let m = obj_of(v, key, &err)?;
                    check_keys(m, "replay.", &["retention_days"], &err)?;
                    if let Some(x) = m.get("retention_days") {
                        self.replay_retention_days = int_in(x, 1, 3650).ok_or_else(|| {
                            err(
                                "replay.retention_days",
                                format!(
                                    "expected a whole number of days from 1 to 3650, found {x}"
                                ),
                            )
                        })? as u32;
                    }
                }
                "supervision" => {
                    let m = obj_of(v, key, &err)?;
                    check_keys(
                        m,
                        "supervision.",
                        &["max_restarts", "window_s", "max_attempts"],
                        &err,
                    )?;
                    if let Some(x) = m.get("max_restarts") {
                        self.max_restarts = int_in(x, 0, 1000).ok_or_else(|| {
                            err(
                                "supervision.max_restarts",
                                format!("expected a whole number from 0 to 1000, found {x}"),
                            )
                        })? as u32;
                    }
                    if let Some(x) = m.get("window_s") {
                        self.window_s = int_in(x, 1, 86_400).ok_or_else(|| {
                            err(
                                "supervision.window_s",
                                format!(
                                    "expected a whole number of seconds from 1 to 86400, found {x}"
                                ),
                            )
                        })?;
                    }
                    if let Some(x) = m.get("max_attempts") {
                        self.max_attempts = int_in(x, 1, 100).ok_or_else(|| {
                            err(
                                "supervision.max_attempts",
                                format!("expected a whole number from 1 to 100, found {x}"),
                            )
                        })? as u32;
                    }
                }
                "handler" => {
                    let m = obj_of(v, key, &err)?;
                    check_keys(m, "handler.", &["timeout_ms"], &err)?;
                    if let Some(x) = m.get("timeout_ms") {
                        self.handler_timeout_ms = int_in(x, 1, 86_400_000).ok_or_else(|| err("handler.timeout_ms", format!("expected a whole number of milliseconds from 1 to 86400000, found {x}")))?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

const TOP_KEYS: &[&str] = &[
    "identity",
    "packs_dir",
    "upstream",
    "api",
    "durability",
    "queue",
    "replay",
    "supervision",
    "handler",
    "tls",
];

fn check_keys(
    obj: &Map<String, Value>,
    prefix: &str,
    known: &[&str],
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<(), ConfigError> {
    for k in obj.keys() {
        if !known.contains(&k.as_str()) {
            let hint = known
                .iter()
                .map(|c| (*c, strsim_like(k, c)))
                .filter(|(_, s)| *s >= 0.8)
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(c, _)| format!(" (did you mean \"{prefix}{c}\"?)"))
                .unwrap_or_default();
            return Err(err(
                &format!("{prefix}{k}"),
                format!("unknown key{hint}; known keys: {}", known.join(", ")),
            ));
        }
    }
    Ok(())
}

/// Jaro-Winkler similarity (the SDK's did-you-mean uses the same measure).
fn strsim_like(a: &str, b: &str) -> f64 {
    lumenflow_pack_sdk::manifest::similarity(a, b)
}

fn obj_of<'a>(
    v: &'a Value,
    key: &str,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<&'a Map<String, Value>, ConfigError> {
    v.as_object()
        .ok_or_else(|| err(key, format!("expected an object, found {v}")))
}

fn non_empty_string(v: &Value) -> Option<String> {
    v.as_str().filter(|s| !s.is_empty()).map(str::to_string)
}

fn int_in(v: &Value, min: u64, max: u64) -> Option<u64> {
    v.as_u64().filter(|n| (min..=max).contains(n))
}

/// `mem:inbox`, `https://…`, or `http://` to a loopback host only (as the platform requires).
pub fn check_upstream(s: &str) -> Result<(), String> {
    if s == "mem:inbox" {
        return Ok(());
    }
    if let Some(rest) = s.strip_prefix("https://") {
        if !rest.is_empty() {
            return Ok(());
        }
    }
    if let Some(rest) = s.strip_prefix("http://") {
        let host = rest.split(['/', '?']).next().unwrap_or("");
        let host_only = if host.starts_with('[') {
            host.split(']')
                .next()
                .map(|h| format!("{h}]"))
                .unwrap_or_default()
        } else {
            host.rsplit_once(':')
                .map(|(h, _)| h.to_string())
                .unwrap_or(host.to_string())
        };
        if ["localhost", "127.0.0.1", "[::1]"].contains(&host_only.as_str()) {
            return Ok(());
        }
        return Err(format!(
            "\"{s}\": plain http is only allowed for localhost, 127.0.0.1 or [::1]; use https"
        ));
    }
    Err(format!(
        "\"{s}\" must be \"mem:inbox\" or an http(s):// endpoint URL"
    ))
}

/// `~/.config/lumenflow-agent/config.json` (per platform conventions).
pub fn user_config_file() -> Option<PathBuf> {
    directories::ProjectDirs::from("", "", "lumenflow-agent")
        .map(|d| d.config_dir().join("config.json"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn apply(v: Value) -> Result<AgentConfig, String> {
        let mut c = AgentConfig::defaults("ws");
        c.apply_value(&v, ".lumenflow/agent.json")
            .map(|_| c)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_overrides() {
        let c = apply(json!({})).unwrap();
        assert_eq!(c, AgentConfig::defaults("ws"));
        assert_eq!(c.queue_max_depth, 1_000_000);
        let c = apply(
            json!({"identity": "ws-test", "queue": {"max_depth": 10}, "durability": "normal",
            "supervision": {"max_restarts": 2}, "api": {"listen": "127.0.0.1:7070"}}),
        )
        .unwrap();
        assert_eq!(c.identity, "ws-test");
        assert_eq!(c.queue_max_depth, 10);
        assert_eq!(c.durability, Durability::Normal);
        assert_eq!(c.max_restarts, 2);
        assert_eq!(c.window_s, 30);
        assert_eq!(c.api_listen.port(), 7070);
    }

    #[test]
    fn bad_values_name_file_and_key() {
        assert_eq!(
            apply(json!({"queue": {"max_depht": 5}})).unwrap_err(),
            ".lumenflow/agent.json: queue.max_depht: unknown key (did you mean \"queue.max_depth\"?); known keys: max_depth, batch_max"
        );
        assert!(apply(json!({"upsteam": "mem:inbox"}))
            .unwrap_err()
            .contains("did you mean \"upstream\"?"));
        assert!(apply(json!({"durability": "fast"}))
            .unwrap_err()
            .starts_with(".lumenflow/agent.json: durability: expected \"full\" or \"normal\""));
        assert!(apply(json!({"queue": {"max_depth": 0}}))
            .unwrap_err()
            .contains("queue.max_depth: expected a whole number"));
        assert!(apply(json!({"api": {"listen": "0.0.0.0:80"}}))
            .unwrap_err()
            .contains("not a loopback address"));
        assert!(apply(json!({"upstream": "http://example.com"}))
            .unwrap_err()
            .contains("plain http is only allowed"));
        assert!(apply(json!({"packs_dir": "../elsewhere"}))
            .unwrap_err()
            .contains("inside the workspace"));
        assert!(apply(json!([1])).is_err());
        assert!(apply(json!({"tls": {"ca_file": ""}}))
            .unwrap_err()
            .contains("tls.ca_file: expected the path of a PEM file"));
        assert!(apply(json!({"tls": {"ca": "x.pem"}}))
            .unwrap_err()
            .contains("tls.ca: unknown key (did you mean \"tls.ca_file\"?)"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]
        /// Arbitrary agent.json content is an error or a config, never a panic.
        #[test]
        fn arbitrary_agent_json_never_panics(text in "[\\{\\}\\[\\]\":,0-9a-z_. -]{0,200}") {
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                let mut c = AgentConfig::defaults("ws");
                let _ = c.apply_value(&v, "agent.json");
            }
        }

        #[test]
        fn arbitrary_values_for_known_keys_never_panic(key in proptest::sample::select(TOP_KEYS.to_vec()), n in proptest::prelude::any::<i64>(), s in ".{0,20}") {
            for v in [json!(n), json!(s), json!({"max_depth": n, "listen": s, "timeout_ms": n, "max_restarts": n}), json!([n])] {
                let mut c = AgentConfig::defaults("ws");
                let _ = c.apply_value(&json!({ key: v }), "agent.json");
            }
        }
    }

    #[test]
    fn upstream_forms() {
        for ok in [
            "mem:inbox",
            "https://cp.example.com",
            "http://127.0.0.1:8080",
            "http://localhost:1/x",
            "http://[::1]:9",
        ] {
            assert!(check_upstream(ok).is_ok(), "{ok}");
        }
        for bad in ["inbox", "ftp://x", "http://10.0.0.1:80", "https://"] {
            assert!(check_upstream(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn syntax_errors_have_position() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("agent.json");
        std::fs::write(&f, "{\n \"identity\": ,\n}").unwrap();
        let mut c = AgentConfig::defaults("ws");
        let e = c
            .apply_file(&f, ".lumenflow/agent.json")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(".lumenflow/agent.json:2:"), "{e}");
    }
}
