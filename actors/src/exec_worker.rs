//! `ExecWorker`: a pack's handler program, spoken to in JSON-RPC 2.0 over its stdio, one
//! message per line (SPEC §11; the framing of MCP's stdio transport). Owned by the pack's
//! `PackHost`; not an actor of its own (it lives and dies with its host's incarnation).
//!
//! - agent -> worker: `initialize {protocol_version, pack, workspace}` -> `{handles: [kind]}`;
//!   `handle {event, delivery: {attempt, redelivered}}` -> outcome; `shutdown`; notification
//!   `resume` (see below).
//! - worker -> agent: `emit {kind, payload, idempotency_key?}` -> `{event_id}` (or an error
//!   carrying the validation message); `replay.has {key}` -> bool; `replay.put {key}`;
//!   notification `log {level, message}`.
//!
//! Requests are pipelined: `handle` writes its request at once and returns a future for the
//! reply, so throughput is not bound by one round trip per event. When a handler answers
//! `retry`, the requests already queued behind it must not run (they are sent again after the
//! retried event): a worker answers them with error 1004 ("held") until the agent's `resume`
//! notification, which comes before the next requests. The Node helper does this; a worker
//! that does not runs them, and they run again later. The worker's stderr is its
//! log, forwarded with the pack id.
//!
//! Anything that breaks the protocol (a line that is not JSON-RPC, a reply to an unknown id, a
//! line over [`MAX_LINE`]) or a worker exit fails every request in flight with the reason, and
//! the worker is killed: the host treats it as a crash.
//!
//! Containment, whatever the worker does:
//! - It runs in a process group of its own; killing it kills the group, so a child it started
//!   does not outlive a restart or the agent's exit. Its exit is seen by its pid, at once, even
//!   when a child of its own still holds its stdout open.
//! - Its environment is clean: [`INHERITED_ENV`] (and `LC_*`) from the agent's, the names its
//!   tools list in `required_env`, its manifest's `runtime.env`, and `LUMENFLOW_PACK_ID`. The
//!   agent's own secrets (`LUMENFLOW_CONTROL_PLANE_TOKEN`, …) are not passed on.
//! - Its stderr is read as bytes, lossily decoded, one line of at most [`MAX_LOG_LINE`] bytes
//!   at a time (the rest of a longer line is skipped): no byte sequence stops the log or grows
//!   the agent's memory.
//! - A manifest whose tools declare `required_scopes` is confined by the kernel (see
//!   [`crate::sandbox`]).

use crate::effects::Tag;
use futures_util::FutureExt;
use lumenflow_pack_sdk::envelope::EventDraft;
use lumenflow_pack_sdk::native::{PackServices, ServiceError};
use lumenflow_pack_sdk::{Envelope, HandlerOutcome, Manifest};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot, watch};

/// Version of this protocol, sent in `initialize`.
pub const PROTOCOL_VERSION: u32 = 1;
/// stderr lines kept for the reason of a worker's exit.
const STDERR_TAIL_LINES: usize = 50;

/// What a dead worker's stderr says went wrong: its last line that names an error (`Error
/// [ERR_MODULE_NOT_FOUND]: Cannot find package 'tsx'…`, `ModuleNotFoundError: …`), not a
/// stack frame; else its last line.
fn last_words(tail: &[String]) -> Option<String> {
    let names_an_error = |l: &&String| {
        let t = l.trim_start();
        !t.starts_with("at ") && (t.contains("Error") || t.contains("error:"))
    };
    tail.iter()
        .rev()
        .find(names_an_error)
        .or_else(|| tail.last())
        .cloned()
}
/// Longest line accepted from a worker.
pub const MAX_LINE: usize = 16 << 20;
/// Longest stderr line kept; the rest of a longer one is skipped.
pub const MAX_LOG_LINE: usize = 64 << 10;
/// Variables a worker inherits from the agent's environment (with every `LC_*`): what a
/// program needs to find its tools, libraries, locale, certificates and proxy.
pub const INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "TERM",
    "NODE_PATH",
    "NODE_EXTRA_CA_CERTS",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "VIRTUAL_ENV",
    "PYTHONPATH",
];

/// Where `program` (a bare name) is found on `path` (a `PATH` value), as `execvp` would look.
pub fn find_on_path(program: &Path, path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    std::env::split_paths(path?)
        .map(|d| d.join(program))
        .find(|c| c.is_file())
}

/// The names a manifest's tools list in `required_env`.
fn required_env(manifest: &Manifest) -> Vec<String> {
    manifest
        .raw
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| t.get("required_env")?.as_array())
        .flatten()
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect()
}

/// The environment a worker of `manifest` starts with, from the agent's `vars`.
pub fn worker_env(
    manifest: &Manifest,
    vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    let required = required_env(manifest);
    let mut env: Vec<_> = vars
        .filter(|(k, _)| {
            k.to_str().is_some_and(|k| {
                INHERITED_ENV.contains(&k)
                    || k.starts_with("LC_")
                    || required.iter().any(|r| r == k)
            })
        })
        .collect();
    if let Some(rt) = &manifest.runtime {
        env.retain(|(k, _)| !rt.env.keys().any(|r| k.to_str() == Some(r)));
        env.extend(rt.env.iter().map(|(k, v)| (k.into(), v.into())));
    }
    env.retain(|(k, _)| k != "LUMENFLOW_PACK_ID");
    env.push(("LUMENFLOW_PACK_ID".into(), manifest.id.clone().into()));
    env
}

/// Reads one stderr line: at most `max` bytes of it are kept, the rest skipped. `Ok(None)` at
/// end of stream.
async fn read_log_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<Option<(Vec<u8>, bool)>> {
    let (mut line, mut cut, mut any) = (Vec::new(), false, false);
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(any.then_some((line, cut)));
        }
        any = true;
        let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        let room = max.saturating_sub(line.len());
        if chunk.len() > room {
            cut = true;
        }
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let consumed = done.unwrap_or(buf.len());
        r.consume(consumed);
        if done.is_some() {
            return Ok(Some((line, cut)));
        }
    }
}

/// Why a worker call did not produce a result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start worker `{command}` in {dir}: {error}")]
    Spawn {
        command: String,
        dir: String,
        error: String,
    },
    #[error("worker exited ({0})")]
    Exited(String),
    /// The manifest declares a confinement this machine cannot enforce (see `sandbox`).
    #[error("{0}")]
    Unenforceable(String),
    #[error("broken protocol: {0}")]
    Protocol(String),
    #[error("no reply to `{method}` within {ms} ms")]
    Timeout { method: String, ms: u64 },
    /// The handler answered with a JSON-RPC error (a thrown exception).
    #[error("handler error: {0}")]
    Handler(String),
}

type Reply = Result<Value, WorkerError>;

struct Shared {
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    /// `handle` requests not answered yet, with the delivery each one is. A call the worker
    /// makes belongs to the one it names, else to the oldest (see [`delivery_of_request`]).
    handling: BTreeMap<u64, Tag>,
    /// Deliveries (`handle` request ids) one of whose calls without reply failed: what their
    /// reply becomes.
    failed_calls: HashMap<u64, Reply>,
    dead: Option<WorkerError>,
    /// The worker's last stderr lines, for the reason of its exit (a missing module, a syntax
    /// error: what the author needs, instead of only `exit status: 1`).
    stderr_tail: std::collections::VecDeque<String>,
    stderr_closed: bool,
    stdout_closed: bool,
    /// The worker process was reaped: its pid (and group id) may belong to another process.
    reaped: bool,
}

/// The services a worker request is served with, for the delivery it belongs to (`None`:
/// outside any delivery, e.g. from `onStart`).
pub type ServicesFor = Arc<dyn Fn(Option<Tag>) -> Arc<dyn PackServices> + Send + Sync>;

pub struct ExecWorker {
    pack: String,
    out: mpsc::UnboundedSender<String>,
    shared: Arc<Mutex<Shared>>,
    next_id: Mutex<u64>,
    /// The worker's pid, which is also its process group's id.
    pid: Option<u32>,
    /// Set once the process exited: its status and last words.
    exited: watch::Receiver<Option<String>>,
}

/// Sends SIGKILL to the worker's whole process group, unless it was reaped already (its group
/// was killed then).
fn kill_group(shared: &Mutex<Shared>, pid: Option<u32>) {
    let Some(pid) = pid else { return };
    if lock(shared).reaped {
        return;
    }
    #[cfg(unix)]
    unsafe {
        libc::killpg(pid as libc::pid_t, libc::SIGKILL);
    }
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// Fails every pending request with `why` and marks the worker dead (first reason wins).
fn fail_all(shared: &Mutex<Shared>, why: WorkerError) {
    let mut s = lock(shared);
    if s.dead.is_none() {
        s.dead = Some(why.clone());
    }
    let reason = s.dead.clone().unwrap_or(why);
    s.handling.clear();
    s.failed_calls.clear();
    for (_, tx) in s.pending.drain() {
        let _ = tx.send(Err(reason.clone()));
    }
}

/// The delivery a call the worker makes now belongs to, as (`handle` request id, tag): the
/// one it names (`params.delivery`, the id of the `handle` request: a worker that runs several
/// handlers at once names it), else the oldest unanswered `handle` (a worker that handles one
/// at a time); `Ok(None)`: outside any delivery (e.g. `onStart`). `Err` once the worker was
/// abandoned, or when the named delivery is not open any more (answered, or abandoned).
fn delivery_of_request(shared: &Mutex<Shared>, params: &Value) -> Result<Option<(u64, Tag)>, ()> {
    let s = lock(shared);
    if s.dead.is_some() {
        return Err(());
    }
    match params.get("delivery").and_then(Value::as_u64) {
        Some(id) => s.handling.get(&id).map(|t| Some((id, *t))).ok_or(()),
        None => Ok(s.handling.iter().next().map(|(id, t)| (*id, *t))),
    }
}

/// Methods a worker may send without an id (no reply) during a delivery, when `initialize`
/// offered it (`calls_without_reply`): staged at once, in the order they arrive, before the
/// `handle` reply that follows them. A failure becomes the delivery's outcome (see
/// [`failed_call_outcome`]), since nobody waits for the answer.
pub const CALLS_WITHOUT_REPLY: [&str; 2] = ["emit", "replay.put"];

/// What a delivery's reply becomes when one of its calls without reply failed: backpressure
/// retries the event later; anything else is a crash (an emit the manifest or the stage's
/// bounds refused was recorded as the delivery's refusal: the pack host then dead-letters the
/// event without its effects, as it would be refused again).
fn failed_call_outcome(method: &str, e: CallError) -> Reply {
    match e {
        CallError::Service(ServiceError::Backpressure { retry_after_ms }) => Ok(json!({
            "status": "retry",
            "action": format!("{method} refused with backpressure (retry after {retry_after_ms} ms)")
        })),
        CallError::Service(e) => Err(WorkerError::Handler(format!("{method} failed: {e}"))),
        CallError::Invalid(_, m) => Err(WorkerError::Handler(format!("{method} failed: {m}"))),
    }
}

/// Reads one line of at most `max` bytes; `Ok(None)` at end of stream.
async fn read_line_limited<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, String> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await.map_err(|e| e.to_string())?;
        if buf.is_empty() {
            return Ok(if line.is_empty() { None } else { Some(line) });
        }
        let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if line.len() + chunk.len() > max {
            return Err(format!("a line longer than {max} bytes"));
        }
        line.extend_from_slice(chunk);
        let consumed = done.unwrap_or(buf.len());
        r.consume(consumed);
        if done.is_some() {
            return Ok(Some(line));
        }
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn rpc_error(id: &Value, code: i64, message: String, data: Option<Value>) -> String {
    let mut err = json!({"code": code, "message": message});
    if let Some(d) = data {
        err["data"] = d;
    }
    json!({"jsonrpc": "2.0", "id": id, "error": err}).to_string()
}

/// Why a worker's call failed: its parameters, or the service.
enum CallError {
    Invalid(i64, String),
    Service(ServiceError),
}

/// Runs one call from the worker (emit, replay.has, replay.put).
async fn call(
    services: Arc<dyn PackServices>,
    method: &str,
    params: Value,
) -> Result<Value, CallError> {
    let key = || {
        params
            .get("key")
            .and_then(|k| k.as_str())
            .map(str::to_string)
    };
    match method {
        "replay.has" => match key() {
            None => Err(CallError::Invalid(
                -32602,
                "replay.has needs {\"key\": string}".into(),
            )),
            Some(k) => services
                .replay_has(k)
                .await
                .map(Value::Bool)
                .map_err(CallError::Service),
        },
        "replay.put" => match key() {
            None => Err(CallError::Invalid(
                -32602,
                "replay.put needs {\"key\": string}".into(),
            )),
            Some(k) => services
                .replay_put(k)
                .await
                .map(|()| Value::Bool(true))
                .map_err(CallError::Service),
        },
        "emit" => {
            let mut obj = match params {
                Value::Object(o) => o,
                _ => Map::new(),
            };
            obj.remove("delivery");
            // `idempotency_key: null` (JS `undefined` keys are dropped, null is not) means none.
            if obj.get("idempotency_key").is_some_and(Value::is_null) {
                obj.remove("idempotency_key");
            }
            // A worker that does not wait for the answer chose the id itself.
            let event_id = match obj.remove("event_id") {
                None | Some(Value::Null) => None,
                Some(v) => match v.as_str().and_then(|s| uuid::Uuid::parse_str(s).ok()) {
                    Some(id) => Some(id),
                    None => {
                        return Err(CallError::Invalid(
                            -32602,
                            format!("invalid emit: event_id must be a UUID, got {v}"),
                        ))
                    }
                },
            };
            match EventDraft::from_value(Value::Object(obj)) {
                Err(e) => Err(CallError::Invalid(-32602, format!("invalid emit: {e}"))),
                Ok(mut draft) => {
                    draft.event_id = event_id;
                    services
                        .emit(draft)
                        .await
                        .map(|id| json!({"event_id": id}))
                        .map_err(CallError::Service)
                }
            }
        }
        other => Err(CallError::Invalid(
            -32601,
            format!("method not found: {other}"),
        )),
    }
}

/// Serves one request from the worker: its JSON-RPC reply line.
async fn serve_request(
    services: Arc<dyn PackServices>,
    id: Value,
    method: String,
    params: Value,
) -> String {
    match call(services, &method, params).await {
        Ok(v) => json!({"jsonrpc": "2.0", "id": id, "result": v}).to_string(),
        Err(CallError::Invalid(code, message)) => rpc_error(&id, code, message, None),
        Err(CallError::Service(e)) => {
            let (code, message, data) = service_error(e);
            rpc_error(&id, code, message, data)
        }
    }
}

fn service_error(e: ServiceError) -> (i64, String, Option<Value>) {
    match e {
        ServiceError::Rejected(m) => (1001, m, None),
        ServiceError::Backpressure { retry_after_ms } => (
            1002,
            e.to_string(),
            Some(json!({"retry_after_ms": retry_after_ms})),
        ),
        ServiceError::Unavailable(m) => (1003, m, None),
    }
}

/// One line from a worker, classified.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerLine {
    Blank,
    /// Not a JSON-RPC message: the worker broke the protocol.
    Invalid(String),
    Log {
        level: String,
        message: String,
    },
    Notification {
        method: String,
        params: Value,
    },
    /// A request from the worker (emit, replay.has, replay.put).
    Request {
        id: Value,
        method: String,
        params: Value,
    },
    /// A reply to one of our requests.
    Reply {
        id: u64,
        reply: Result<Value, WorkerError>,
    },
}

/// Classifies one line a worker wrote on stdout. Pure: the protocol's whole parsing surface.
pub fn classify_line(line: &[u8]) -> WorkerLine {
    if line.iter().all(u8::is_ascii_whitespace) {
        return WorkerLine::Blank;
    }
    let text = String::from_utf8_lossy(line);
    let invalid = || {
        WorkerLine::Invalid(format!(
            "worker wrote a line that is not a JSON-RPC message: {}",
            truncate(&text, 200)
        ))
    };
    let msg = match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(m)) => m,
        _ => return invalid(),
    };
    if let Some(method) = msg.get("method").and_then(|m| m.as_str()) {
        let params = msg.get("params").cloned().unwrap_or(Value::Null);
        return match msg.get("id") {
            None if method == "log" => WorkerLine::Log {
                level: params
                    .get("level")
                    .and_then(|v| v.as_str())
                    .unwrap_or("info")
                    .to_string(),
                message: truncate(
                    params.get("message").and_then(|v| v.as_str()).unwrap_or(""),
                    4096,
                ),
            },
            None => WorkerLine::Notification {
                method: method.to_string(),
                params,
            },
            Some(id) => WorkerLine::Request {
                id: id.clone(),
                method: method.to_string(),
                params,
            },
        };
    }
    let Some(id) = msg.get("id").and_then(|v| v.as_u64()) else {
        return WorkerLine::Invalid(format!(
            "worker answered an unknown request id: {}",
            truncate(&text, 200)
        ));
    };
    let reply = match (msg.get("result"), msg.get("error")) {
        (_, Some(err)) => Err(WorkerError::Handler(
            err.get("message")
                .and_then(|m| m.as_str())
                .map(|m| truncate(m, 2000))
                .unwrap_or_else(|| err.to_string()),
        )),
        (Some(result), None) => Ok(result.clone()),
        (None, None) => Err(WorkerError::Protocol(format!(
            "reply has neither result nor error: {}",
            truncate(&text, 200)
        ))),
    };
    WorkerLine::Reply { id, reply }
}

/// A worker must not outlive its agent: after a `kill -9` of the agent, a worker that finishes
/// its handler performs an effect that the next agent runs again (the event was never
/// recorded), with nobody left to refuse its emits. The kernel sends it SIGKILL when the agent
/// dies (`PR_SET_PDEATHSIG`; the agent starts workers from its main thread, which lives as long
/// as the process). Its own children see their stdin close; the Node helper exits on that.
fn die_with_the_agent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id() as libc::pid_t;
        // Runs in the child between fork and exec: only async-signal-safe calls, no allocation.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The agent died before the prctl took effect: no signal will come.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

impl ExecWorker {
    /// Starts `runtime.command` in the pack folder.
    pub fn spawn(
        manifest: &Manifest,
        pack_dir: &Path,
        workspace: &Path,
        services: ServicesFor,
    ) -> Result<ExecWorker, WorkerError> {
        let runtime = manifest
            .runtime
            .as_ref()
            .ok_or_else(|| WorkerError::Spawn {
                command: String::new(),
                dir: pack_dir.display().to_string(),
                error: "the manifest has no runtime.command".into(),
            })?;
        let argv = &runtime.command;
        let program: PathBuf = if argv[0].contains('/') && !Path::new(&argv[0]).is_absolute() {
            pack_dir.join(&argv[0])
        } else {
            PathBuf::from(&argv[0])
        };
        let spawn_error = |error: String| WorkerError::Spawn {
            command: argv.join(" "),
            dir: pack_dir.display().to_string(),
            error,
        };
        let mut env = worker_env(manifest, std::env::vars_os());
        let mut cmd = Command::new(&program);
        cmd.args(&argv[1..])
            .current_dir(pack_dir)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        die_with_the_agent(&mut cmd);
        if let Some(scopes) = crate::sandbox::scopes_of(manifest, workspace) {
            // A private, writable TMPDIR: the only place outside its write scopes it may write.
            let tmp = workspace
                .join(".lumenflow/state/agent/tmp")
                .join(&manifest.id);
            std::fs::create_dir_all(&tmp)
                .map_err(|e| spawn_error(format!("cannot create {}: {e}", tmp.display())))?;
            env.retain(|(k, _)| k != "TMPDIR");
            env.push(("TMPDIR".into(), tmp.clone().into()));
            let path_var = env
                .iter()
                .find(|(k, _)| k == "PATH")
                .map(|(_, v)| v.as_os_str());
            let confinement =
                crate::sandbox::Confinement::prepare(&scopes, pack_dir, &program, path_var, &tmp)
                    .map_err(|e| {
                    WorkerError::Unenforceable(format!("{e}; the worker was not started"))
                })?;
            // Runs in the child between fork and exec: raw system calls on memory prepared here.
            unsafe {
                cmd.pre_exec(move || confinement.apply_in_child());
            }
        }
        cmd.envs(env);
        let mut child = cmd.spawn().map_err(|e| spawn_error(e.to_string()))?;
        let pid = child.id();
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(WorkerError::Protocol("worker stdio not available".into()));
        };
        let pack = manifest.id.clone();
        let shared = Arc::new(Mutex::new(Shared {
            pending: HashMap::new(),
            handling: BTreeMap::new(),
            failed_calls: HashMap::new(),
            dead: None,
            stderr_tail: Default::default(),
            stderr_closed: false,
            stdout_closed: false,
            reaped: false,
        }));
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<String>();

        // The process itself: its exit is seen by its pid, not by its pipes closing (a child
        // of its own may hold them open). Its group is killed with it.
        let (exit_tx, exited) = watch::channel(None::<String>);
        let x_shared = shared.clone();
        actix::spawn(async move {
            let status = child.wait().await;
            kill_group(&x_shared, pid);
            lock(&x_shared).reaped = true;
            // What it wrote before it exited (a reply, its last words) is still being read.
            for _ in 0..25 {
                let drained = {
                    let s = lock(&x_shared);
                    s.stdout_closed && s.stderr_closed
                };
                if drained {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let status = match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("cannot wait for it: {e}"),
            };
            let tail: Vec<String> = lock(&x_shared).stderr_tail.iter().cloned().collect();
            let detail = match last_words(&tail) {
                None => status,
                Some(w) => format!("{status}; stderr: {w}"),
            };
            fail_all(&x_shared, WorkerError::Exited(detail.clone()));
            let _ = exit_tx.send(Some(detail));
        });

        // Writer: batches whatever is queued into one write + flush.
        let w_shared = shared.clone();
        actix::spawn(async move {
            let mut stdin = tokio::io::BufWriter::new(stdin);
            while let Some(line) = out_rx.recv().await {
                let mut ok = stdin.write_all(line.as_bytes()).await.is_ok()
                    && stdin.write_all(b"\n").await.is_ok();
                while ok {
                    match out_rx.try_recv() {
                        Ok(more) => {
                            ok = stdin.write_all(more.as_bytes()).await.is_ok()
                                && stdin.write_all(b"\n").await.is_ok()
                        }
                        Err(_) => break,
                    }
                }
                if !ok || stdin.flush().await.is_err() {
                    fail_all(&w_shared, WorkerError::Exited("its stdin closed".into()));
                    break;
                }
            }
        });

        // Stderr: the worker's log.
        let e_pack = pack.clone();
        let e_shared = shared.clone();
        actix::spawn(async move {
            let mut reader = BufReader::with_capacity(8 << 10, stderr);
            while let Ok(Some((bytes, cut))) = read_log_line(&mut reader, MAX_LOG_LINE).await {
                let line = String::from_utf8_lossy(&bytes);
                let more = if cut { " […line cut]" } else { "" };
                tracing::info!(pack = %e_pack, "worker: {}{more}", truncate(&line, 4096));
                if !line.trim().is_empty() {
                    let mut s = lock(&e_shared);
                    if s.stderr_tail.len() == STDERR_TAIL_LINES {
                        s.stderr_tail.pop_front();
                    }
                    s.stderr_tail.push_back(truncate(line.trim(), 300));
                }
            }
            lock(&e_shared).stderr_closed = true;
        });

        // Stdout: replies to our requests, and the worker's own requests.
        let r_shared = shared.clone();
        let r_out = out_tx.clone();
        let r_pack = pack.clone();
        actix::spawn(async move {
            let mut reader = BufReader::new(stdout);
            loop {
                let line = match read_line_limited(&mut reader, MAX_LINE).await {
                    Ok(Some(l)) => l,
                    Ok(None) => {
                        lock(&r_shared).stdout_closed = true;
                        fail_all(&r_shared, WorkerError::Exited("its stdout closed".into()));
                        break;
                    }
                    Err(e) => {
                        fail_all(
                            &r_shared,
                            WorkerError::Protocol(format!("worker wrote {e}")),
                        );
                        break;
                    }
                };
                match classify_line(&line) {
                    WorkerLine::Blank => {}
                    WorkerLine::Invalid(why) => {
                        fail_all(&r_shared, WorkerError::Protocol(why));
                        break;
                    }
                    WorkerLine::Log { level, message } => match level.as_str() {
                        "error" => tracing::error!(pack = %r_pack, "{message}"),
                        "warn" => tracing::warn!(pack = %r_pack, "{message}"),
                        "debug" => tracing::debug!(pack = %r_pack, "{message}"),
                        _ => tracing::info!(pack = %r_pack, "{message}"),
                    },
                    WorkerLine::Notification { method, params }
                        if CALLS_WITHOUT_REPLY.contains(&method.as_str()) =>
                    {
                        // Staged now, inline, so it is in the stage before the `handle` reply
                        // that follows it on this pipe is read.
                        let Ok(Some((delivery, tag))) = delivery_of_request(&r_shared, &params)
                        else {
                            tracing::warn!(pack = %r_pack, method, "ignoring a call without reply outside an open delivery (a handler's late call, or one from onStart: those must wait for a reply)");
                            continue;
                        };
                        let failure =
                            match call(services(Some(tag)), &method, params).now_or_never() {
                                Some(Ok(_)) => None,
                                Some(Err(e)) => Some(failed_call_outcome(&method, e)),
                                None => Some(Err(WorkerError::Handler(format!(
                                    "{method} could not be staged at once"
                                )))),
                            };
                        if let Some(f) = failure {
                            lock(&r_shared).failed_calls.entry(delivery).or_insert(f);
                        }
                    }
                    WorkerLine::Notification { method, .. } => {
                        tracing::debug!(pack = %r_pack, method, "ignoring unknown notification from worker")
                    }
                    WorkerLine::Request { id, method, params } => {
                        // Once the worker is abandoned (timeout, broken protocol) nothing it
                        // still says belongs to a live delivery: refuse it. Served without a
                        // tag, it would be committed at once, outside any outcome (an emit
                        // doubled by the redelivery, or a key that makes it `replayed`).
                        let Ok(tag) = delivery_of_request(&r_shared, &params) else {
                            let _ = r_out.send(rpc_error(
                                &id,
                                1003,
                                "the delivery this call belongs to was abandoned (timeout or crash) or has been answered; the event will be delivered again".into(),
                                None,
                            ));
                            continue;
                        };
                        let (services, out) = (services(tag.map(|(_, t)| t)), r_out.clone());
                        let reply = serve_request(services, id, method, params);
                        // Most calls (staged emits and keys) are answered at once: no task.
                        let mut reply = Box::pin(reply);
                        match (&mut reply).now_or_never() {
                            Some(line) => {
                                let _ = out.send(line);
                            }
                            None => {
                                actix::spawn(async move {
                                    let _ = out.send(reply.await);
                                });
                            }
                        }
                    }
                    WorkerLine::Reply { id, reply } => {
                        let (tx, reply) = {
                            let mut s = lock(&r_shared);
                            s.handling.remove(&id);
                            // A call of this delivery failed without anyone waiting for it.
                            let reply = match (s.failed_calls.remove(&id), reply) {
                                (Some(failed), Ok(_)) => failed,
                                (_, reply) => reply,
                            };
                            (s.pending.remove(&id), reply)
                        };
                        let Some(tx) = tx else {
                            let text = String::from_utf8_lossy(&line);
                            fail_all(
                                &r_shared,
                                WorkerError::Protocol(format!(
                                    "worker answered an unknown request id: {}",
                                    truncate(&text, 200)
                                )),
                            );
                            break;
                        };
                        let _ = tx.send(reply);
                    }
                }
            }
        });

        Ok(ExecWorker {
            pack,
            out: out_tx,
            shared,
            next_id: Mutex::new(1),
            pid,
            exited,
        })
    }

    /// Sends a notification (no reply expected).
    pub fn notify(&self, method: &str) {
        let line = json!({"jsonrpc": "2.0", "method": method}).to_string();
        if self.out.send(line).is_err() {
            fail_all(&self.shared, WorkerError::Exited("its stdin closed".into()));
        }
    }

    /// Sends a request now; the returned receiver yields its reply.
    fn request(&self, method: &str, params: Value) -> oneshot::Receiver<Reply> {
        self.request_for(method, &params, None)
    }

    fn request_for<P: serde::Serialize>(
        &self,
        method: &str,
        params: &P,
        tag: Option<Tag>,
    ) -> oneshot::Receiver<Reply> {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut n = self.next_id.lock().unwrap_or_else(|p| p.into_inner());
            let id = *n;
            *n += 1;
            id
        };
        {
            let mut s = lock(&self.shared);
            if let Some(why) = &s.dead {
                let _ = tx.send(Err(why.clone()));
                return rx;
            }
            s.pending.insert(id, tx);
            if let Some(tag) = tag {
                s.handling.insert(id, tag);
            }
        }
        #[derive(serde::Serialize)]
        struct Request<'a, P> {
            jsonrpc: &'static str,
            id: u64,
            method: &'a str,
            params: &'a P,
        }
        let line = serde_json::to_string(&Request {
            jsonrpc: "2.0",
            id,
            method,
            params,
        })
        .unwrap_or_default();
        if self.out.send(line).is_err() {
            fail_all(&self.shared, WorkerError::Exited("its stdin closed".into()));
        }
        rx
    }

    async fn await_reply(
        &self,
        rx: oneshot::Receiver<Reply>,
        method: &str,
        timeout: Duration,
    ) -> Reply {
        // The handler's time, not the agent's: a stalled agent does not time out a worker that
        // answered meanwhile (see `worker_clock`).
        match crate::worker_clock::timeout(timeout, rx).await {
            Err(_) => {
                let e = WorkerError::Timeout {
                    method: method.into(),
                    ms: timeout.as_millis() as u64,
                };
                fail_all(&self.shared, e.clone());
                self.kill();
                Err(e)
            }
            Ok(Err(_)) => Err(lock(&self.shared)
                .dead
                .clone()
                .unwrap_or(WorkerError::Exited("unknown".into()))),
            Ok(Ok(r)) => {
                if let Err(e @ (WorkerError::Exited(_) | WorkerError::Protocol(_))) = &r {
                    let e = e.clone();
                    self.kill();
                    return Err(self.exit_detail(e).await);
                }
                r
            }
        }
    }

    /// Adds the exit status (and last words) to an `Exited` reason once the process is gone.
    async fn exit_detail(&self, e: WorkerError) -> WorkerError {
        if !matches!(e, WorkerError::Exited(_)) {
            return e;
        }
        match tokio::time::timeout(Duration::from_millis(500), self.exited()).await {
            Ok(detail) => WorkerError::Exited(detail),
            Err(_) => e,
        }
    }

    /// Resolves when the worker process has exited, with its status and last words.
    pub fn exited(&self) -> impl std::future::Future<Output = String> + 'static {
        let mut rx = self.exited.clone();
        async move {
            match rx.wait_for(Option::is_some).await {
                Ok(d) => d.clone().unwrap_or_default(),
                // The watcher task is gone: so is the process.
                Err(_) => "exited".into(),
            }
        }
    }

    /// The handshake: returns the kinds the worker handles.
    pub async fn initialize(
        &self,
        manifest: &Manifest,
        workspace: &Path,
        identity: &str,
        timeout: Duration,
    ) -> Result<Vec<String>, WorkerError> {
        let params = json!({
            "protocol_version": PROTOCOL_VERSION,
            "pack": {"id": manifest.id, "slug": manifest.slug, "version": manifest.version,
                     "subscribed_event_kinds": manifest.subscribed_event_kinds,
                     "emitted_event_kinds": manifest.emitted_event_kinds},
            "workspace": {"root": workspace.display().to_string(), "identity": identity},
            // `handle` requests the worker may run at once (`runtime.concurrency`); with more
            // than one, its calls name their delivery.
            "concurrency": manifest.runtime.as_ref().map_or(1, |r| r.concurrency),
            "calls_without_reply": CALLS_WITHOUT_REPLY,
        });
        let rx = self.request("initialize", params);
        let result = self.await_reply(rx, "initialize", timeout).await?;
        let handles = result
            .get("handles")
            .and_then(|h| h.as_array())
            .ok_or_else(|| {
                WorkerError::Protocol(format!(
                    "initialize reply must be {{\"handles\": [kind, …]}}, got {}",
                    truncate(&result.to_string(), 200)
                ))
            })?;
        Ok(handles
            .iter()
            .filter_map(|h| h.as_str().map(str::to_string))
            .collect())
    }

    /// Sends a `handle` request now (pipelined); await the result with [`ExecWorker::outcome`].
    pub fn send_handle(
        &self,
        event: &Envelope,
        attempt: u32,
        redelivered: bool,
        tag: Tag,
    ) -> oneshot::Receiver<Reply> {
        #[derive(serde::Serialize)]
        struct Delivery {
            attempt: u32,
            redelivered: bool,
        }
        #[derive(serde::Serialize)]
        struct Handle<'a> {
            event: &'a Envelope,
            delivery: Delivery,
        }
        let params = Handle {
            event,
            delivery: Delivery {
                attempt,
                redelivered: redelivered || attempt > 1,
            },
        };
        self.request_for("handle", &params, Some(tag))
    }

    /// Waits for one `handle` reply and reads it as an outcome.
    pub async fn outcome(
        &self,
        rx: oneshot::Receiver<Reply>,
        timeout: Duration,
    ) -> Result<HandlerOutcome, WorkerError> {
        let v = self.await_reply(rx, "handle", timeout).await?;
        serde_json::from_value::<HandlerOutcome>(v.clone()).map_err(|_| {
            let e = WorkerError::Protocol(format!(
                "handle reply must be {{\"status\": \"handled\"|\"replayed\"|\"ignored\"|\"retry\"|\"failed\", \"action\": …}}, got {}",
                truncate(&v.to_string(), 200)
            ));
            fail_all(&self.shared, e.clone());
            self.kill();
            e
        })
    }

    /// Asks the worker to exit; kills it (and its group) if it does not within `grace`. Its
    /// group is killed in any case: nothing it started outlives it.
    pub async fn shutdown(&self, grace: Duration) {
        let rx = self.request("shutdown", Value::Null);
        let _ = tokio::time::timeout(grace, rx).await;
        let _ = tokio::time::timeout(grace, self.exited()).await;
        self.kill();
    }

    /// Kills the worker's process group.
    pub fn kill(&self) {
        kill_group(&self.shared, self.pid);
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    pub fn pack(&self) -> &str {
        &self.pack
    }
}

impl Drop for ExecWorker {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn classifies_the_protocol() {
        assert_eq!(classify_line(b"  "), WorkerLine::Blank);
        assert!(
            matches!(classify_line(b"hello"), WorkerLine::Invalid(m) if m.contains("not a JSON-RPC message: hello"))
        );
        assert!(matches!(classify_line(b"[1]"), WorkerLine::Invalid(_)));
        assert_eq!(
            classify_line(br#"{"jsonrpc":"2.0","id":7,"result":{"status":"handled"}}"#),
            WorkerLine::Reply {
                id: 7,
                reply: Ok(serde_json::json!({"status": "handled"}))
            }
        );
        assert!(
            matches!(classify_line(br#"{"jsonrpc":"2.0","id":7,"error":{"code":-32000,"message":"boom"}}"#),
            WorkerLine::Reply { id: 7, reply: Err(WorkerError::Handler(m)) } if m == "boom")
        );
        assert!(matches!(
            classify_line(br#"{"jsonrpc":"2.0","id":"w1","method":"emit","params":{}}"#),
            WorkerLine::Request { .. }
        ));
        assert!(matches!(
            classify_line(
                br#"{"jsonrpc":"2.0","method":"log","params":{"level":"warn","message":"m"}}"#
            ),
            WorkerLine::Log { .. }
        ));
        assert!(
            matches!(classify_line(br#"{"jsonrpc":"2.0","id":"x","result":1}"#), WorkerLine::Invalid(m) if m.contains("unknown request id"))
        );
    }

    /// Requests read after a `handle` timed out (they were in the pipe while the agent gave up)
    /// belong to no live delivery: refused, never served untagged (committed at once).
    #[test]
    fn the_reason_of_an_exit_is_the_line_that_names_the_error() {
        let node: Vec<String> = [
            "node:internal/modules/esm/resolve:873",
            "  throw new ERR_MODULE_NOT_FOUND(packageName, fileURLToPath(base), null);",
            "Error [ERR_MODULE_NOT_FOUND]: Cannot find package 'tsx' imported from /p/",
            "    at packageResolve (node:internal/modules/esm/resolve:873:9)",
            "  code: 'ERR_MODULE_NOT_FOUND'",
            "Node.js v20.20.2",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            last_words(&node).as_deref(),
            Some("Error [ERR_MODULE_NOT_FOUND]: Cannot find package 'tsx' imported from /p/")
        );
        let python = [
            "Traceback (most recent call last):",
            "ModuleNotFoundError: No module named 'x'",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            last_words(&python).as_deref(),
            Some("ModuleNotFoundError: No module named 'x'")
        );
        assert_eq!(last_words(&["bye".to_string()]).as_deref(), Some("bye"));
        assert_eq!(last_words(&[]), None);
    }

    #[test]
    fn requests_after_the_worker_was_abandoned_are_refused() {
        let shared = Mutex::new(Shared {
            pending: HashMap::new(),
            handling: BTreeMap::from([
                (4, Tag { chunk: 1, seq: 9 }),
                (5, Tag { chunk: 1, seq: 10 }),
            ]),
            failed_calls: HashMap::new(),
            dead: None,
            stderr_tail: Default::default(),
            stderr_closed: false,
            stdout_closed: false,
            reaped: false,
        });
        let (t9, t10) = (Tag { chunk: 1, seq: 9 }, Tag { chunk: 1, seq: 10 });
        // One at a time: the oldest open delivery; several at once: the one named.
        assert_eq!(
            delivery_of_request(&shared, &Value::Null),
            Ok(Some((4, t9)))
        );
        assert_eq!(
            delivery_of_request(&shared, &json!({"key": "k", "delivery": 5})),
            Ok(Some((5, t10)))
        );
        // A delivery answered already (or never sent) takes no more calls.
        assert_eq!(
            delivery_of_request(&shared, &json!({"delivery": 3})),
            Err(())
        );
        fail_all(
            &shared,
            WorkerError::Timeout {
                method: "handle".into(),
                ms: 10,
            },
        );
        assert_eq!(delivery_of_request(&shared, &Value::Null), Err(()));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        /// Whatever a worker writes, classifying it never panics.
        #[test]
        fn arbitrary_worker_output_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            let _ = classify_line(&bytes);
        }

        #[test]
        fn arbitrary_json_rpc_shapes_never_panic(id in prop_oneof![Just(serde_json::json!(1)), Just(serde_json::json!("w1")), Just(serde_json::json!(null)), Just(serde_json::json!(-3)), Just(serde_json::json!([1]))],
            method in prop_oneof![Just(None), Just(Some("log".to_string())), Just(Some("emit".to_string())), Just(Some("replay.has".to_string())), ".{0,10}".prop_map(Some)],
            body in prop_oneof![Just(serde_json::json!(null)), Just(serde_json::json!({"status": "x"})), Just(serde_json::json!({"message": 1})), Just(serde_json::json!("s"))]) {
            let mut m = serde_json::json!({"jsonrpc": "2.0", "id": id, "result": body.clone(), "error": body.clone(), "params": body});
            if let Some(method) = method { m["method"] = serde_json::json!(method); }
            let _ = classify_line(m.to_string().as_bytes());
        }
    }
}
