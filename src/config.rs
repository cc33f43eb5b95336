//! `agent.json` (SPEC §3): every field optional with a default; an unknown key or a bad value
//! is an error naming the file, the key and what is allowed.
//!
//! User-wide defaults may live in the platform config folder
//! (`~/.config/lumenflow-agent/config.json` on Linux); the workspace's file wins, key by key.

use lumenflow_actors::approvals::held::{ApprovalPolicy, KindPolicy, OnExpiry};
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
    /// An environment variable whose token the local API accepts besides its own (the token
    /// the platform's SDK sends: its `auth.token_env`).
    pub api_token_env: Option<String>,
    /// The policy set the local API serves on mem:inbox (`POST /api/v1/policies`), and the
    /// local policies `policy_mode` combines with the control plane's in conductor mode.
    pub policies: Value,
    /// The NATS JetStream upstream's settings (`nats` in agent.json).
    pub nats: NatsSettings,
    /// Deadlines and expiry rules of held events (`approvals` in agent.json).
    pub approvals: ApprovalPolicy,
}

/// `nats` in agent.json: how the agent authenticates to NATS, which stream it uses, and where
/// cross-workspace subscriptions come from. Secrets are never in the file: they are read from
/// the files or variables named here, at every connection attempt.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct NatsSettings {
    pub stream: Option<String>,
    /// A `.creds` file (JWT + nkey seed), as `nsc` writes it.
    pub credentials_file: Option<String>,
    /// A file holding a user nkey seed (`SU…`).
    pub nkey_seed_file: Option<String>,
    pub token_env: Option<String>,
    pub token_file: Option<String>,
    pub user: Option<String>,
    pub password_env: Option<String>,
    /// The workspaces whose events local packs may receive (None: every workspace).
    pub workspaces: Option<Vec<String>>,
    pub ack_wait_ms: Option<u64>,
    /// No progress for this long while messages wait: the consumer is looked up again.
    pub stall_after_s: Option<u64>,
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
            api_token_env: None,
            policies: serde_json::json!({"default_decision": "allow", "rules": []}),
            nats: NatsSettings::default(),
            approvals: ApprovalPolicy::default(),
        }
    }

    /// The configuration of a workspace: [`AgentConfig::load`], then what the platform's
    /// `workspace.yaml` says (its `id` is the identity: precedence enrollment >
    /// workspace.yaml > agent.json), then the platform's packs root when the workspace has no
    /// `packs/` (`packages/@lumenflow/packs`, where the quickstart puts packs).
    pub fn for_workspace(
        ws: &crate::workspace::Workspace,
    ) -> Result<(Self, Option<crate::workspace_yaml::WorkspaceYaml>), ConfigError> {
        let mut cfg = Self::load(&ws.name(), &ws.config_file())?;
        let yaml = crate::workspace_yaml::load(&ws.root)?;
        if let Some(id) = yaml.as_ref().and_then(|y| y.id.clone()) {
            cfg.identity = id;
        }
        if cfg.packs_dir == "packs" && !ws.root.join("packs").exists() {
            let platform = PLATFORM_PACKS_DIR;
            if ws.root.join(platform).is_dir() {
                cfg.packs_dir = platform.into();
            }
        }
        Ok((cfg, yaml))
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
                    check_keys(m, "api.", &["listen", "token_env"], &err)?;
                    if let Some(t) = m.get("token_env") {
                        let name = t.as_str().filter(|s| is_env_name(s)).ok_or_else(|| {
                            err(
                                "api.token_env",
                                format!("expected an environment variable name like \"LUMENFLOW_CONTROL_PLANE_TOKEN\" (^[A-Z][A-Z0-9_]*$), found {t}"),
                            )
                        })?;
                        self.api_token_env = Some(name.to_string());
                    }
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
                "nats" => self.nats = parse_nats(v, &err)?,
                "approvals" => self.approvals = parse_approvals(v, &err)?,
                "policies" => {
                    check_policy_set(v).map_err(|m| err(key, m))?;
                    self.policies = v.clone();
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

/// The platform's second packs root, used when the workspace has no `packs/`.
pub const PLATFORM_PACKS_DIR: &str = "packages/@lumenflow/packs";

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
    "policies",
    "nats",
    "approvals",
];

/// Most seconds a held event may wait for a decision: a year.
const APPROVAL_TIMEOUT_MAX: u64 = 366 * 86_400;

fn parse_on_expiry(
    v: &Value,
    key: &str,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<OnExpiry, ConfigError> {
    match v.as_str() {
        Some("deny") => Ok(OnExpiry::Deny),
        Some("allow") => Ok(OnExpiry::Allow),
        _ => Err(err(
            key,
            format!("expected \"deny\" or \"allow\", found {v}"),
        )),
    }
}

fn parse_timeout(
    v: &Value,
    key: &str,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<u64, ConfigError> {
    int_in(v, 1, APPROVAL_TIMEOUT_MAX).ok_or_else(|| {
        err(
            key,
            format!(
                "expected a whole number of seconds from 1 to {APPROVAL_TIMEOUT_MAX}, found {v}"
            ),
        )
    })
}

/// `approvals`: `{timeout_s, on_expiry, forbid_self_approval, kinds: {KIND: {timeout_s,
/// on_expiry}}}`.
fn parse_approvals(
    v: &Value,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<ApprovalPolicy, ConfigError> {
    let m = obj_of(v, "approvals", err)?;
    check_keys(
        m,
        "approvals.",
        &[
            "timeout_s",
            "on_expiry",
            "forbid_self_approval",
            "max_pending",
            "kinds",
        ],
        err,
    )?;
    let mut p = ApprovalPolicy::default();
    if let Some(x) = m.get("timeout_s") {
        p.timeout_s = parse_timeout(x, "approvals.timeout_s", err)?;
    }
    if let Some(x) = m.get("on_expiry") {
        p.on_expiry = parse_on_expiry(x, "approvals.on_expiry", err)?;
    }
    if let Some(x) = m.get("forbid_self_approval") {
        p.forbid_self_approval = x.as_bool().ok_or_else(|| {
            err(
                "approvals.forbid_self_approval",
                format!("expected true or false, found {x}"),
            )
        })?;
    }
    if let Some(x) = m.get("max_pending") {
        p.max_pending = int_in(x, 1, 10_000_000).ok_or_else(|| {
            err(
                "approvals.max_pending",
                format!("expected a whole number from 1 to 10000000, found {x}"),
            )
        })?;
    }
    if let Some(x) = m.get("kinds") {
        let kinds = obj_of(x, "approvals.kinds", err)?;
        for (kind, k) in kinds {
            let at = format!("approvals.kinds.{kind}");
            if lumenflow_pack_sdk::kind::parse_kind(kind).is_err() {
                return Err(err(
                    &at,
                    "expected an event kind like \"acme-phone:send_requested\" as the key".into(),
                ));
            }
            let km = obj_of(k, &at, err)?;
            check_keys(km, &format!("{at}."), &["timeout_s", "on_expiry"], err)?;
            let timeout_s = km
                .get("timeout_s")
                .map(|t| parse_timeout(t, &format!("{at}.timeout_s"), err))
                .transpose()?;
            let on_expiry = km
                .get("on_expiry")
                .map(|o| parse_on_expiry(o, &format!("{at}.on_expiry"), err))
                .transpose()?;
            p.kinds.insert(
                kind.clone(),
                KindPolicy {
                    timeout_s,
                    on_expiry,
                },
            );
        }
    }
    Ok(p)
}

fn parse_nats(
    v: &Value,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<NatsSettings, ConfigError> {
    let m = obj_of(v, "nats", err)?;
    check_keys(
        m,
        "nats.",
        &[
            "stream",
            "credentials_file",
            "nkey_seed_file",
            "token_env",
            "token_file",
            "user",
            "password_env",
            "workspaces",
            "ack_wait_ms",
            "stall_after_s",
        ],
        err,
    )?;
    let mut n = NatsSettings::default();
    let text = |key: &str, what: &str| -> Result<Option<String>, ConfigError> {
        match m.get(key) {
            None => Ok(None),
            Some(x) => non_empty_string(x).map(Some).ok_or_else(|| {
                err(
                    &format!("nats.{key}"),
                    format!("expected {what}, found {x}"),
                )
            }),
        }
    };
    let env = |key: &str| -> Result<Option<String>, ConfigError> {
        match m.get(key) {
            None => Ok(None),
            Some(x) => x
                .as_str()
                .filter(|s| is_env_name(s))
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| {
                    err(
                        &format!("nats.{key}"),
                        format!(
                            "expected an environment variable name (^[A-Z][A-Z0-9_]*$), found {x}"
                        ),
                    )
                }),
        }
    };
    n.stream = text("stream", "a stream name")?;
    if let Some(s) = &n.stream {
        if s.contains(['.', '*', '>', ' ', '/', '\\']) {
            return Err(err(
                "nats.stream",
                format!("\"{s}\": a stream name has no '.', '*', '>', spaces or slashes"),
            ));
        }
    }
    n.credentials_file = text("credentials_file", "the path of a .creds file")?;
    n.nkey_seed_file = text("nkey_seed_file", "the path of a file holding an nkey seed")?;
    n.token_file = text("token_file", "the path of a file holding the token")?;
    n.user = text("user", "a user name")?;
    n.token_env = env("token_env")?;
    n.password_env = env("password_env")?;
    if n.password_env.is_some() != n.user.is_some() {
        return Err(err(
            "nats.user",
            "nats.user and nats.password_env go together".into(),
        ));
    }
    let secrets = [
        n.credentials_file.is_some(),
        n.nkey_seed_file.is_some(),
        n.token_env.is_some() || n.token_file.is_some(),
        n.user.is_some(),
    ];
    if secrets.iter().filter(|x| **x).count() > 1
        || (n.token_env.is_some() && n.token_file.is_some())
    {
        return Err(err(
            "nats",
            "choose one way to authenticate: credentials_file, nkey_seed_file, token_env or token_file, or user + password_env".into(),
        ));
    }
    if let Some(x) = m.get("workspaces") {
        let list = x
            .as_array()
            .filter(|a| !a.is_empty())
            .and_then(|a| a.iter().map(non_empty_string).collect::<Option<Vec<_>>>())
            .ok_or_else(|| {
                err(
                    "nats.workspaces",
                    format!("expected a non-empty list of workspace identities, or [\"*\"] for every workspace, found {x}"),
                )
            })?;
        n.workspaces = (!list.iter().any(|w| w == "*")).then_some(list);
    }
    if let Some(x) = m.get("ack_wait_ms") {
        n.ack_wait_ms = Some(int_in(x, 1000, 3_600_000).ok_or_else(|| {
            err(
                "nats.ack_wait_ms",
                format!("expected a whole number of milliseconds from 1000 to 3600000, found {x}"),
            )
        })?);
    }
    if let Some(x) = m.get("stall_after_s") {
        n.stall_after_s = Some(int_in(x, 5, 86_400).ok_or_else(|| {
            err(
                "nats.stall_after_s",
                format!("expected a whole number of seconds from 5 to 86400, found {x}"),
            )
        })?);
    }
    Ok(n)
}

/// `^[A-Z][A-Z0-9_]*$`: the platform's rule for the names of token variables.
pub fn is_env_name(s: &str) -> bool {
    let mut b = s.bytes();
    b.next().is_some_and(|c| c.is_ascii_uppercase())
        && b.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_')
}

/// A `ControlPlanePolicySet`: `{default_decision: allow|deny, rules: [{id, decision, reason?}]}`.
pub fn check_policy_set(v: &Value) -> Result<(), String> {
    let decision = |d: &Value| matches!(d.as_str(), Some("allow" | "deny"));
    let Some(obj) = v.as_object() else {
        return Err(format!(
            "expected {{\"default_decision\": \"allow\" | \"deny\", \"rules\": [...]}}, found {v}"
        ));
    };
    if !obj.get("default_decision").is_some_and(decision) {
        return Err("default_decision must be \"allow\" or \"deny\"".into());
    }
    let rules = match obj.get("rules") {
        None => &Vec::new(),
        Some(Value::Array(r)) => r,
        Some(other) => return Err(format!("rules must be a list, found {other}")),
    };
    for (i, r) in rules.iter().enumerate() {
        if r.get("id")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(format!("rules[{i}]: needs a non-empty \"id\""));
        }
        if !r.get("decision").is_some_and(decision) {
            return Err(format!(
                "rules[{i}]: decision must be \"allow\" or \"deny\""
            ));
        }
    }
    Ok(())
}

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
    if s.starts_with("nats://") || s.starts_with("tls://") {
        // NATS JetStream: one server, or a comma-separated list for a cluster.
        return match s.split(',').map(str::trim).find(|u| {
            !(u.starts_with("nats://") || u.starts_with("tls://")) || u.len() <= "nats://".len()
        }) {
            None => Ok(()),
            Some(bad) => Err(format!(
                "\"{bad}\": a NATS server is nats://host:port or tls://host:port"
            )),
        };
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
        "\"{s}\" must be \"mem:inbox\", an http(s):// endpoint URL, or nats:// servers"
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

    #[test]
    fn nats_settings_name_what_is_wrong() {
        let c = apply(
            json!({"nats": {"stream": "FLEET", "token_env": "NATS_TOKEN",
            "workspaces": ["ws-a", "ws-b"], "ack_wait_ms": 5000, "stall_after_s": 10}}),
        )
        .unwrap();
        assert_eq!(c.nats.stream.as_deref(), Some("FLEET"));
        assert_eq!(c.nats.workspaces, Some(vec!["ws-a".into(), "ws-b".into()]));
        let every = apply(json!({"nats": {"workspaces": ["*"]}})).unwrap();
        assert_eq!(every.nats.workspaces, None, "* is every workspace");
        for (bad, says) in [
            (
                json!({"nats": {"stream": "a.b"}}),
                "nats.stream: \"a.b\": a stream name has no '.'",
            ),
            (
                json!({"nats": {"token_env": "lower"}}),
                "nats.token_env: expected an environment variable name",
            ),
            (
                json!({"nats": {"user": "u"}}),
                "nats.user and nats.password_env go together",
            ),
            (
                json!({"nats": {"token_env": "A", "credentials_file": "x.creds"}}),
                "choose one way to authenticate",
            ),
            (
                json!({"nats": {"workspaces": []}}),
                "nats.workspaces: expected a non-empty list",
            ),
            (
                json!({"nats": {"ack_wait_ms": 10}}),
                "nats.ack_wait_ms: expected a whole number of milliseconds from 1000",
            ),
            (json!({"nats": {"creds": "x"}}), "nats.creds: unknown key"),
        ] {
            let e = apply(bad.clone()).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
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
