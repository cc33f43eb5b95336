//! Connecting to NATS: the client options (credentials read from their files or variables at
//! every attempt, never logged), the subject layout, and the stream the agent publishes to
//! (created when missing; an operator's stream is used as configured, and refused with a clear
//! error when it does not capture this workspace's subjects).

use async_nats::jetstream;
use std::path::PathBuf;
use std::time::Duration;

/// The stream the agent creates when it is missing.
pub const DEFAULT_STREAM: &str = "LUMENFLOW";
/// Its duplicate window: retries of one event inside it are stored once. The agent's retry
/// backoff tops out at 30 s, far inside it.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// How the agent proves who it is to the server. Secrets are read when connecting, so a
/// rotated file or variable is picked up at the next attempt.
#[derive(Clone, Default)]
pub enum NatsAuth {
    #[default]
    None,
    /// A token given directly (an enrollment's, or `LUMENFLOW_NATS_TOKEN`).
    Token(String),
    TokenEnv(String),
    TokenFile(PathBuf),
    /// A `.creds` file (JWT + nkey seed).
    Credentials(PathBuf),
    /// A file holding a user nkey seed.
    NkeySeed(PathBuf),
    UserPassword {
        user: String,
        password_env: String,
    },
}

impl std::fmt::Debug for NatsAuth {
    // Never the secret itself: only where it comes from.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NatsAuth::None => write!(f, "none"),
            NatsAuth::Token(_) => write!(f, "token"),
            NatsAuth::TokenEnv(v) => write!(f, "token from ${v}"),
            NatsAuth::TokenFile(p) => write!(f, "token from {}", p.display()),
            NatsAuth::Credentials(p) => write!(f, "credentials {}", p.display()),
            NatsAuth::NkeySeed(p) => write!(f, "nkey seed {}", p.display()),
            NatsAuth::UserPassword { user, password_env } => {
                write!(f, "user {user}, password from ${password_env}")
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct NatsConfig {
    /// `nats://host:port` or `tls://host:port` (several for a cluster).
    pub servers: Vec<String>,
    pub workspace_id: String,
    pub stream: String,
    pub batch_max: usize,
    pub auth: NatsAuth,
    /// PEM roots to trust for `tls://` servers (besides the system's).
    pub ca_file: Option<PathBuf>,
    /// Workspaces whose events local packs receive (None: every workspace of the fleet).
    pub fleet_from: Option<Vec<String>>,
    /// How long the server waits for an ack before it delivers a message again.
    pub ack_wait: Duration,
    /// No progress for this long while messages wait: the consumer is looked up again.
    pub stall_after: Duration,
}

impl NatsConfig {
    pub fn new(servers: Vec<String>, workspace_id: String) -> Self {
        NatsConfig {
            servers,
            workspace_id,
            stream: DEFAULT_STREAM.into(),
            batch_max: 500,
            auth: NatsAuth::None,
            ca_file: None,
            fleet_from: None,
            ack_wait: Duration::from_secs(30),
            stall_after: Duration::from_secs(30),
        }
    }
}

/// Why a connection attempt failed: each is shown in `status` as its own state.
#[derive(Debug)]
pub enum ConnectFailure {
    /// The server refused the credentials (or they could not be read): nothing is dropped,
    /// events wait in the outbox.
    Unauthorized(String),
    /// The stream is missing its subjects, or JetStream is off.
    Misconfigured(String),
    Unreachable(String),
}

/// `identity` as one subject token: bytes outside `[A-Za-z0-9_-]` as `~XX`.
pub fn subject_token(identity: &str) -> String {
    let mut out = String::with_capacity(identity.len());
    for b in identity.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("~{b:02X}"));
        }
    }
    out
}

/// The subject of an event of `kind` for `workspace` (already a token, or `*`):
/// `lumenflow.<W>.<dir>.<slug>.<name>`.
pub fn subject_of(workspace_token: &str, dir: &str, kind: &str) -> String {
    let (slug, name) = kind.split_once(':').unwrap_or((kind, "_"));
    format!(
        "lumenflow.{workspace_token}.{dir}.{}.{}",
        subject_token(slug),
        subject_token(name)
    )
}

/// The subject of an event of `kind` for the workspace named `workspace`.
pub fn subject(workspace: &str, dir: &str, kind: &str) -> String {
    subject_of(&subject_token(workspace), dir, kind)
}

/// Does the NATS subject filter `pattern` (`*` one token, `>` the rest) match `subject`?
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The client options for `cfg`, with its credentials read now.
async fn options(cfg: &NatsConfig) -> Result<async_nats::ConnectOptions, ConnectFailure> {
    let unreadable = |what: String, e: std::io::Error| {
        ConnectFailure::Unauthorized(format!("cannot read {what}: {e}"))
    };
    // A dead connection is noticed in ~20 s (two missed pings), not the default 2 minutes.
    let mut opts = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .ping_interval(Duration::from_secs(10));
    opts = match &cfg.auth {
        NatsAuth::None => opts,
        NatsAuth::Token(t) => opts.token(t.clone()),
        NatsAuth::TokenEnv(v) => match std::env::var(v) {
            Ok(t) if !t.is_empty() => opts.token(t),
            _ => {
                return Err(ConnectFailure::Unauthorized(format!(
                    "nats.token_env: the environment variable {v} is not set"
                )))
            }
        },
        NatsAuth::TokenFile(p) => {
            let t = std::fs::read_to_string(p)
                .map_err(|e| unreadable(format!("nats.token_file {}", p.display()), e))?;
            opts.token(t.trim().to_string())
        }
        NatsAuth::Credentials(p) => opts
            .credentials_file(p)
            .await
            .map_err(|e| unreadable(format!("nats.credentials_file {}", p.display()), e))?,
        NatsAuth::NkeySeed(p) => {
            let seed = std::fs::read_to_string(p)
                .map_err(|e| unreadable(format!("nats.nkey_seed_file {}", p.display()), e))?;
            opts.nkey(seed.trim().to_string())
        }
        NatsAuth::UserPassword { user, password_env } => match std::env::var(password_env) {
            Ok(pw) => opts.user_and_password(user.clone(), pw),
            Err(_) => {
                return Err(ConnectFailure::Unauthorized(format!(
                    "nats.password_env: the environment variable {password_env} is not set"
                )))
            }
        },
    };
    if let Some(ca) = &cfg.ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    if cfg.servers.iter().any(|s| s.starts_with("tls://")) {
        opts = opts.require_tls(true);
    }
    Ok(opts)
}

/// Connects (one pass over the servers; the caller retries) and makes sure the stream takes
/// this workspace's subjects. `on_event` sees the client's events afterwards (disconnects,
/// lame duck, authorization errors).
pub async fn connect<F>(
    cfg: &NatsConfig,
    on_event: F,
) -> Result<(async_nats::Client, jetstream::Context, StreamFacts), ConnectFailure>
where
    F: Fn(async_nats::Event) + Send + Sync + 'static,
{
    let on_event = std::sync::Arc::new(on_event);
    let opts = options(cfg).await?.event_callback(move |e| {
        let f = on_event.clone();
        async move { f(e) }
    });
    let servers = cfg.servers.join(",");
    let client = opts.connect(cfg.servers.clone()).await.map_err(|e| {
        use async_nats::ConnectErrorKind as K;
        match e.kind() {
            K::AuthorizationViolation | K::Authentication => ConnectFailure::Unauthorized(format!(
                "{servers}: {e} (check the credentials in agent.json's nats section)"
            )),
            _ => ConnectFailure::Unreachable(format!("cannot connect to {servers}: {e}")),
        }
    })?;
    let js = jetstream::new(client.clone());
    let facts = ensure_stream(&js, cfg).await?;
    Ok((client, js, facts))
}

/// What `status` shows of the stream.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StreamFacts {
    pub name: String,
    pub subjects: Vec<String>,
    pub duplicate_window_s: u64,
    pub replicas: usize,
    pub created_by_agent: bool,
}

/// The stream, created when missing; an existing one must capture this workspace's event and
/// inbound subjects.
pub async fn ensure_stream(
    js: &jetstream::Context,
    cfg: &NatsConfig,
) -> Result<StreamFacts, ConnectFailure> {
    let hint = |e: String| {
        if e.contains("no responders") || e.contains("not enabled") {
            ConnectFailure::Misconfigured(format!(
                "stream {}: JetStream does not answer ({e}); start nats-server with -js (or enable JetStream for this account)",
                cfg.stream
            ))
        } else {
            ConnectFailure::Unreachable(format!("stream {}: {e}", cfg.stream))
        }
    };
    let (mut stream, created) = match js.get_stream(&cfg.stream).await {
        Ok(s) => (s, false),
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            let s = js
                .create_stream(jetstream::stream::Config {
                    name: cfg.stream.clone(),
                    subjects: vec!["lumenflow.>".into()],
                    storage: jetstream::stream::StorageType::File,
                    duplicate_window: DUPLICATE_WINDOW,
                    ..Default::default()
                })
                .await
                .map_err(|e| hint(e.to_string()))?;
            (s, true)
        }
        Err(e) => return Err(hint(e.to_string())),
    };
    let info = stream.info().await.map_err(|e| hint(e.to_string()))?;
    let subjects = info.config.subjects.clone();
    let w = subject_token(&cfg.workspace_id);
    for needed in [
        format!("lumenflow.{w}.events.x.y"),
        format!("lumenflow.{w}.inbound.x.y"),
    ] {
        if !subjects.iter().any(|p| subject_matches(p, &needed)) {
            return Err(ConnectFailure::Misconfigured(format!(
                "stream {} does not capture {} (its subjects: {}); add \"lumenflow.>\" to it, or name another stream in agent.json nats.stream",
                cfg.stream,
                needed.trim_end_matches(".x.y").to_string() + ".>",
                subjects.join(", ")
            )));
        }
    }
    Ok(StreamFacts {
        name: cfg.stream.clone(),
        subjects,
        duplicate_window_s: info.config.duplicate_window.as_secs(),
        replicas: info.config.num_replicas,
        created_by_agent: created,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_one_token_per_part() {
        assert_eq!(
            subject("ws-test", "events", "acme-demo:job_completed"),
            "lumenflow.ws-test.events.acme-demo.job_completed"
        );
        assert_eq!(subject_token("acme.prod west"), "acme~2Eprod~20west");
        assert_eq!(subject_token("ünï"), "~C3~BCn~C3~AF");
        assert_eq!(
            subject_of("*", "events", "acme-demo:job_completed"),
            "lumenflow.*.events.acme-demo.job_completed"
        );
    }

    #[test]
    fn wildcards_match_as_nats_does() {
        assert!(subject_matches("lumenflow.>", "lumenflow.w.events.a.b"));
        assert!(subject_matches(
            "lumenflow.*.events.>",
            "lumenflow.w.events.a.b"
        ));
        assert!(!subject_matches(
            "lumenflow.*.events.>",
            "lumenflow.w.inbound.a.b"
        ));
        assert!(!subject_matches("lumenflow.>", "lumenflow"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.b.c"));
        assert!(!subject_matches("other.>", "lumenflow.w.events.a.b"));
    }

    #[test]
    fn the_debug_form_never_shows_a_secret() {
        let s = format!("{:?}", NatsAuth::Token("s3cret".into()));
        assert!(!s.contains("s3cret"), "{s}");
    }
}
