//! The local API (SPEC §10): the `http` surface packs may require.
//!
//! HTTP on loopback; every request needs `Authorization: Bearer <token>` (the token is in
//! `.lumenflow/state/agent/api.json`, mode 0600) and a loopback `Host` header (so a web page
//! cannot reach it through DNS rebinding).
//!
//! - `POST /api/v1/events` — the control plane's push endpoint: `{workspace_id, events}` ->
//!   `{accepted}`. v2 events are attributed to the pack whose slug prefixes their kind and
//!   checked against its manifest; the platform's v1 kernel events are checked against the v1
//!   union and kept unchanged (`lumenflow_pack_sdk::kernel`). A batch is accepted whole or not
//!   at all; a `workspace_id` that is not this agent's is refused.
//! - The rest of the platform's sync port: `heartbeat`, `policies`, `config`,
//!   `authenticate`, `telemetry`, `evidence`, `approvals/*` (see `sync_port`).
//! - `POST /v1/inbound` — inject events as if they came from the upstream (`emit --inbound`).
//! - `GET /v1/status`, `GET /metrics` (Prometheus text), `GET /v1/tap` (the live event feed,
//!   newline-delimited JSON: `tap_api`).
//!
//! Besides its own random token, the API accepts the token of the variable `api.token_env`
//! names: the one the platform's SDK sends (its `auth.token_env`).
//!
//! Errors are `{"error": {"message": …}}` with 400 (malformed JSON), 401 (token), 403 (Host),
//! 408 (body too slow), 413 (body or batch too large), 422 (an invalid event, named by index),
//! 429 + Retry-After (durable queue full), 503 (shutting down or storage unavailable).
//! Connections, timeouts and their limits: `api_server`.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use lumenflow_actors::dead_letters::PurgeOp;
use lumenflow_actors::queue::QueueError;
use lumenflow_actors::queue::RetryDeadLetters;
use lumenflow_actors::router::{EmitError, Emitter, Posted};
use lumenflow_actors::stats::AgentStats;
use lumenflow_actors::store::{StoreError, StoreHandle};
use lumenflow_pack_sdk::envelope::Incoming;
use lumenflow_pack_sdk::kernel::{self, KernelEvent};
use lumenflow_pack_sdk::Envelope;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 8 << 20;
/// Most events accepted in one request.
pub const MAX_BATCH_EVENTS: usize = 10_000;
/// Deepest JSON nesting accepted (serde_json itself stops at 128).
pub const MAX_DEPTH: usize = 64;

#[derive(Clone)]
pub struct ApiState {
    pub emitter: Emitter,
    pub store: StoreHandle,
    pub stats: Arc<AgentStats>,
    token: Arc<str>,
    workspace: Arc<str>,
    identity: Arc<str>,
    upstream: Arc<str>,
    upstream_source: &'static str,
    /// A second token the API accepts: the one the platform's SDK sends (`api.token_env`).
    extra_token: Option<Arc<str>>,
    pub sync: Arc<crate::sync_port::SyncPort>,
    pub shutdown: Arc<AtomicBool>,
    pub connections: Arc<crate::api_server::Connections>,
    body_timeout: std::time::Duration,
    /// Decisions on held events (and on the platform's own requests, on mem:inbox).
    pub approvals: actix::Addr<lumenflow_actors::approvals::Approvals>,
}

/// What the API says about where it runs.
pub struct ApiNames {
    /// The workspace folder.
    pub workspace: String,
    /// The workspace identity (`workspace_id`).
    pub identity: String,
    /// The upstream's endpoint (or `mem:inbox`).
    pub upstream: String,
    /// Where the upstream came from: `enrollment`, `workspace.yaml` or `agent.json`.
    pub upstream_source: &'static str,
}

impl ApiState {
    pub fn new(
        emitter: Emitter,
        store: StoreHandle,
        stats: Arc<AgentStats>,
        token: String,
        names: ApiNames,
        sync: crate::sync_port::SyncPort,
        approvals: actix::Addr<lumenflow_actors::approvals::Approvals>,
    ) -> Self {
        ApiState {
            emitter,
            store,
            stats,
            token: token.into(),
            workspace: names.workspace.into(),
            identity: names.identity.into(),
            upstream: names.upstream.into(),
            upstream_source: names.upstream_source,
            extra_token: None,
            sync: Arc::new(sync),
            shutdown: Arc::new(AtomicBool::new(false)),
            connections: Default::default(),
            body_timeout: crate::api_server::BODY_TIMEOUT,
            approvals,
        }
    }

    /// Accepts `token` besides the API's own (`api.token_env`: the platform SDK's token).
    pub fn also_accepting(mut self, token: Option<String>) -> Self {
        self.extra_token = token.filter(|t| !t.is_empty()).map(Into::into);
        self
    }

    /// The workspace identity (`workspace_id` upstream).
    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn accepts(&self, presented: &str) -> bool {
        token_matches(presented, &self.token)
            || self
                .extra_token
                .as_deref()
                .is_some_and(|t| token_matches(presented, t))
    }
}

/// The endpoints, for the 404 of any other path.
const ENDPOINTS: &str = "POST /api/v1/events, /api/v1/heartbeat, /api/v1/policies, /api/v1/config, /api/v1/authenticate, /api/v1/telemetry, /api/v1/evidence, /api/v1/approvals/request|resolve|list, /v1/inbound, /v1/approvals/decide; GET /v1/status, /v1/tap, /metrics";

/// `{"error": {"message": …}}` with a status: the error shape of every LumenFlow HTTP surface.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({"error": {"message": message.into()}})),
    )
        .into_response()
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/v1/events", post(post_events))
        .route("/v1/inbound", post(post_inbound))
        .route("/api/v1/heartbeat", sync_route(crate::sync_port::heartbeat))
        .route("/api/v1/policies", sync_route(crate::sync_port::policies))
        .route("/api/v1/config", sync_route(crate::sync_port::config))
        .route(
            "/api/v1/authenticate",
            post(|State(s): State<ApiState>, req: Request| {
                let presented = bearer_token(req.headers()).map(|t| t.trim().to_string());
                crate::sync_port::authenticate(s, presented, req.into_body())
            }),
        )
        .route(
            "/api/v1/telemetry",
            sync_route(|s, b| crate::sync_port::records(s, "/api/v1/telemetry", b)),
        )
        .route(
            "/api/v1/evidence",
            sync_route(|s, b| crate::sync_port::records(s, "/api/v1/evidence", b)),
        )
        .route(
            "/api/v1/approvals/request",
            sync_route(|s, b| crate::sync_port::approvals(s, "request", b)),
        )
        .route(
            "/api/v1/approvals/resolve",
            sync_route(|s, b| crate::sync_port::approvals(s, "resolve", b)),
        )
        .route(
            "/api/v1/approvals/list",
            sync_route(|s, b| crate::sync_port::approvals(s, "list", b)),
        )
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route("/v1/tap", get(crate::tap_api::tap))
        .route("/v1/dlq/retry", post(dlq_retry))
        .route("/v1/dlq/purge", post(dlq_purge))
        .route("/v1/approvals/decide", post(approvals_decide))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                format!("Not found: the local API serves {ENDPOINTS}"),
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// A POST route of the sync port: its handler gets the state and the request body.
fn sync_route<F, Fut>(handler: F) -> axum::routing::MethodRouter<ApiState>
where
    F: Fn(ApiState, Body) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response> + Send + 'static,
{
    post(move |State(s): State<ApiState>, req: Request| handler(s, req.into_body()))
}

/// Starts serving the API on `listener` within `limits`, on a runtime of its own (two
/// threads): a storm of connections opening and timing out is handled beside the actors, not
/// between their messages, and one thread busy with it leaves the other for authorized
/// requests. The runtime also hands freed memory back to the OS every 10 s. Shut the runtime
/// down with `shutdown_background` (it lives inside the actor system's async context).
pub fn start(
    listener: std::net::TcpListener,
    state: ApiState,
    limits: crate::api_server::Limits,
) -> std::io::Result<(tokio::runtime::Runtime, tokio::task::JoinHandle<()>)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("lumenflow-api")
        .enable_all()
        .build()?;
    let server = runtime.spawn(async move {
        match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => serve(listener, state, limits).await,
            Err(e) => tracing::error!(error = %e, "local API cannot listen"),
        }
    });
    runtime.spawn(async {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
        loop {
            tick.tick().await;
            crate::api_server::trim_memory();
        }
    });
    Ok((runtime, server))
}

/// Serves the API on `listener` within `limits` (see `api_server`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    mut state: ApiState,
    limits: crate::api_server::Limits,
) {
    state.body_timeout = limits.body_timeout;
    let conns = state.connections.clone();
    crate::api_server::serve(listener, router(state), limits, conns).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of an `Authorization: Bearer <token>` header, if there is one.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Compares a presented token with the expected one in constant time.
pub fn token_matches(presented: &str, expected: &str) -> bool {
    constant_time_eq(presented.as_bytes(), expected.as_bytes())
}

/// Whether `host` is a loopback host with an optional port, and nothing else: `127.0.0.1`,
/// `localhost` or `[::1]`, then at most `:` and 1 to 5 digits. (`127.0.0.1:evil.com` and
/// `127.0.0.1:80@evil.com` are not.)
fn is_loopback_authority(host: &str) -> bool {
    let (name, rest) = if let Some(r) = host.strip_prefix("[::1]") {
        ("::1", r)
    } else {
        match host.find(':') {
            Some(i) => (&host[..i], &host[i..]),
            None => (host, ""),
        }
    };
    let port_ok = match rest.strip_prefix(':') {
        None => rest.is_empty(),
        // Digits only (`u16::from_str` would take a `+`), at most 5, at most 65535.
        Some(p) => {
            p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()
        }
    };
    port_ok && (name == "::1" || name == "127.0.0.1" || name.eq_ignore_ascii_case("localhost"))
}

fn loopback_host(headers: &HeaderMap) -> Result<(), String> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let Some(host) = hosts.next() else {
        return Ok(());
    };
    if hosts.next().is_some() {
        return Err("Forbidden: more than one Host header".to_string());
    }
    let host = host
        .to_str()
        .map_err(|_| "Host header is not text".to_string())?;
    if is_loopback_authority(host) {
        Ok(())
    } else {
        Err(format!(
            "Forbidden: Host \"{}\" is not a loopback address (127.0.0.1, localhost or [::1], with an optional port)",
            host.escape_debug()
        ))
    }
}

/// Reads the whole body of an authorized request within the body timeout, so a client that
/// sends half a body cannot hold a handler (and its connection) forever.
async fn read_body_in_time(state: &ApiState, req: Request) -> Result<Request, Response> {
    use axum::body::HttpBody;
    if req.body().is_end_stream() {
        return Ok(req);
    }
    let (parts, body) = req.into_parts();
    let read = read_body_limited(body);
    match tokio::time::timeout(state.body_timeout, read).await {
        Err(_) => {
            let mut r = error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "Request Timeout: the body did not arrive within {} s",
                    state.body_timeout.as_secs()
                ),
            );
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            Err(r)
        }
        Ok(Err(drained)) => {
            let mut r = error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("Payload too large: the body exceeds {MAX_BODY_BYTES} bytes"),
            );
            if !drained {
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Err(r)
        }
        Ok(Ok(bytes)) => Ok(Request::from_parts(parts, Body::from(bytes))),
    }
}

/// Most of an oversized body read (and dropped) so that its sender can read the 413: a socket
/// closed with unread data sends a reset, and the client saw "connection reset" instead.
const MAX_DRAIN_BYTES: usize = 4 * MAX_BODY_BYTES;

/// The body, at most [`MAX_BODY_BYTES`]. `Err(drained)` when it is larger: the rest was read
/// and dropped (`true`), or it is larger than [`MAX_DRAIN_BYTES`] too or broke (`false`: the
/// connection must close).
async fn read_body_limited(body: Body) -> Result<axum::body::Bytes, bool> {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| false)?;
        seen += chunk.len();
        if seen > MAX_BODY_BYTES + MAX_DRAIN_BYTES {
            return Err(false);
        }
        if seen <= MAX_BODY_BYTES {
            buf.extend_from_slice(&chunk);
        } else if !buf.is_empty() {
            buf = Vec::new();
        }
    }
    if seen > MAX_BODY_BYTES {
        return Err(true);
    }
    Ok(buf.into())
}

async fn guard(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    if let Err(m) = loopback_host(req.headers()) {
        return error(StatusCode::FORBIDDEN, m);
    }
    match bearer_token(req.headers()) {
        None => error(StatusCode::UNAUTHORIZED, "Unauthorized: missing \"Authorization: Bearer <token>\" (the token is in .lumenflow/state/agent/api.json)"),
        Some(t) if !state.accepts(t.trim()) => {
            error(StatusCode::UNAUTHORIZED, "Unauthorized: wrong token (the token is in .lumenflow/state/agent/api.json)")
        }
        Some(_) => match read_body_in_time(&state, req).await {
            Ok(req) => next.run(req).await,
            Err(r) => r,
        },
    }
}

fn json_depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(json_depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// A parsed `{workspace_id?, events: [...]}` body.
#[derive(Debug)]
pub struct Batch {
    pub workspace_id: Option<String>,
    pub events: Vec<Posted>,
}

/// Parses a `{workspace_id?, events: [...]}` body into events, enforcing the limits. Pure:
/// the whole parsing surface of the event endpoints, fuzzed in the tests below. An event with
/// `schema_version: 1` is one of the platform's v1 kernel events, checked against the v1
/// union; anything else is a v2 envelope or a draft.
pub fn parse_batch(bytes: &[u8]) -> Result<Batch, (StatusCode, String)> {
    let bad = |m: String| (StatusCode::BAD_REQUEST, m);
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("Malformed JSON: {e}")))?;
    if json_depth(&v) > MAX_DEPTH {
        return Err(bad(format!(
            "Malformed request: JSON nested deeper than {MAX_DEPTH} levels"
        )));
    }
    let Value::Object(mut obj) = v else {
        return Err(bad(
            "Malformed request: expected an object {\"workspace_id\": …, \"events\": [...]}".into(),
        ));
    };
    let workspace_id = match obj.remove("workspace_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(w)) => Some(w),
        Some(_) => {
            return Err(bad(
                "Malformed request: \"workspace_id\" must be a string".into()
            ))
        }
    };
    let events = match obj.remove("events") {
        Some(Value::Array(events)) => events,
        Some(_) => return Err(bad("Malformed request: \"events\" must be an array".into())),
        None => return Err(bad("Malformed request: missing \"events\"".into())),
    };
    if events.len() > MAX_BATCH_EVENTS {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Batch too large: {} events; at most {MAX_BATCH_EVENTS} per request",
                events.len()
            ),
        ));
    }
    let invalid = |i: usize, e: String| {
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("events[{i}]: invalid event: {e}"),
        )
    };
    let events = events
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            if kernel::is_v1(&v) {
                KernelEvent::parse(v)
                    .map(Posted::Kernel)
                    .map_err(|e| invalid(i, format!("v1 kernel event: {e}")))
            } else {
                Incoming::from_value(v)
                    .map(Posted::Pack)
                    .map_err(|e| invalid(i, e.to_string()))
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(Batch {
        workspace_id,
        events,
    })
}

/// Reads a request body (at most [`MAX_BODY_BYTES`]) and parses it with [`parse_batch`]. A
/// `workspace_id` that is not this agent's is refused: the batch is for another workspace.
async fn read_batch(state: &ApiState, body: Body) -> Result<Vec<Posted>, Response> {
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("Payload too large: the body exceeds {MAX_BODY_BYTES} bytes"),
            )
        })?;
    let batch = parse_batch(&bytes).map_err(|(status, m)| error(status, m))?;
    check_workspace(state, batch.workspace_id.as_deref())
        .map_err(|m| error(StatusCode::UNPROCESSABLE_ENTITY, m))?;
    Ok(batch.events)
}

/// A request naming a `workspace_id` must name this agent's workspace (a 422 otherwise).
pub fn check_workspace(state: &ApiState, workspace_id: Option<&str>) -> Result<(), String> {
    match workspace_id {
        Some(w) if w != &*state.identity => Err(format!(
            "Wrong workspace: workspace_id \"{w}\" is not this agent's workspace \"{}\" (set the workspace's id in workspace.yaml `id` or agent.json `identity`)",
            state.identity
        )),
        _ => Ok(()),
    }
}

fn emit_error(e: EmitError) -> Response {
    match e {
        EmitError::Rejected { index, message } => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("events[{index}]: {message}"),
        ),
        EmitError::Queue(
            QueueError::Backpressure { retry_after_s, .. }
            | QueueError::HeldFull { retry_after_s, .. },
        ) => {
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, e.to_string());
            if let Ok(v) = HeaderValue::from_str(&retry_after_s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            r
        }
        EmitError::Queue(QueueError::Store(StoreError::DiskFull)) => {
            error(StatusCode::INSUFFICIENT_STORAGE, e.to_string())
        }
        other => error(StatusCode::SERVICE_UNAVAILABLE, other.to_string()),
    }
}

/// The refusal to send while shutting down, if we are.
pub fn refusal_if_stopping(state: &ApiState) -> Option<Response> {
    state.shutdown.load(Ordering::SeqCst).then(|| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "Shutting down: the agent accepts no new events",
        )
    })
}

async fn post_events(State(state): State<ApiState>, req: Request) -> Response {
    if let Some(r) = refusal_if_stopping(&state) {
        return r;
    }
    let items = match read_batch(&state, req.into_body()).await {
        Ok(items) => items,
        Err(r) => return r,
    };
    let n = items.len();
    match state.emitter.emit_posted(None, items).await {
        Ok(ids) => axum::Json(json!({"accepted": n, "event_ids": ids})).into_response(),
        Err(e) => emit_error(e),
    }
}

async fn post_inbound(State(state): State<ApiState>, req: Request) -> Response {
    if let Some(r) = refusal_if_stopping(&state) {
        return r;
    }
    let items = match read_batch(&state, req.into_body()).await {
        Ok(items) => items,
        Err(r) => return r,
    };
    let now = SystemTime::now();
    let envs: Vec<Envelope> = items
        .into_iter()
        .map(|i| match i {
            Posted::Pack(i) => i.complete(&state.identity, now),
            Posted::Kernel(k) => k.to_envelope(&state.identity),
        })
        .collect();
    let ids: Vec<String> = envs.iter().map(|e| e.event_id.clone()).collect();
    match state.emitter.inbound(envs).await {
        Ok(n) => axum::Json(json!({"accepted": n, "event_ids": ids})).into_response(),
        Err(e) => emit_error(e),
    }
}

/// `{"id": N}` or `{"all": true}`: redeliver dead letters to the pack that failed them.
/// The JSON body of a small control request (dead letters, decisions): at most 64 KiB. An
/// empty body is `if_empty` when given.
async fn read_control_json(req: Request, if_empty: Option<Value>) -> Result<Value, Response> {
    let bytes = axum::body::to_bytes(req.into_body(), 64 << 10)
        .await
        .map_err(|_| error(StatusCode::PAYLOAD_TOO_LARGE, "Payload too large"))?;
    match if_empty {
        Some(v) if bytes.is_empty() => Ok(v),
        _ => serde_json::from_slice(&bytes)
            .map_err(|e| error(StatusCode::BAD_REQUEST, format!("Malformed JSON: {e}"))),
    }
}

async fn dlq_retry(State(state): State<ApiState>, req: Request) -> Response {
    let v = match read_control_json(req, None).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let ids = match (
        v.get("id").and_then(Value::as_i64),
        v.get("all").and_then(Value::as_bool),
    ) {
        (Some(id), _) => Some(vec![id]),
        (None, Some(true)) => None,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "Malformed request: expected {\"id\": N} or {\"all\": true}",
            )
        }
    };
    match state.emitter.queue.send(RetryDeadLetters { ids }).await {
        Ok(Ok(r)) => axum::Json(json!({
            "retried": r.moved(),
            "to_pack": r.to_inbound().count(),
            "to_outbox": r.to_outbox(),
            "kept": r.kept(),
            "summary": r.summary(),
        }))
        .into_response(),
        Ok(Err(StoreError::Invalid(m))) => error(StatusCode::NOT_FOUND, m),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `{}` or `{"all": true}`: every dead letter; `{"id": N}`: that one.
async fn dlq_purge(State(state): State<ApiState>, req: Request) -> Response {
    let v = match read_control_json(req, Some(json!({}))).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let id = match v.get("id") {
        None | Some(Value::Null) => None,
        Some(id) => match id.as_i64() {
            Some(id) => Some(id),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "Malformed request: expected {\"id\": N} or {}",
                )
            }
        },
    };
    match state.store.run(PurgeOp { id }).await {
        Ok(n) => {
            state
                .stats
                .dead_letters
                .fetch_sub(n as i64, Ordering::Relaxed);
            axum::Json(json!({"purged": n})).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// The `status --json` document.
pub fn status_json(state: &ApiState) -> Value {
    let s = state.stats.snapshot();
    json!({
        "agent": {
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
            "workspace": &*state.workspace,
            "identity": &*state.identity,
            "uptime_s": s.uptime_s,
            "started_ms": state.stats.started_ms,
            "running": true,
        },
        "limits": {
            "open_files": crate::limits::open_files(),
            "sandbox_support": lumenflow_actors::sandbox::kernel_support(),
        },
        "api": {
            "connections": state.connections.open.load(Ordering::Relaxed),
            "max_connections": state.connections.max.load(Ordering::Relaxed),
            "refused": state.connections.refused.load(Ordering::Relaxed),
        },
        "packs": s.packs,
        "queue": s.queue,
        "upstream": {
            "mode": s.upstream.mode,
            "endpoint": &*state.upstream,
            "source": state.upstream_source,
            "state": s.upstream.state,
            "last_error": s.upstream.last_error,
            "last_error_ms": s.upstream.last_error_ms,
            "last_success_ms": s.upstream.last_success_ms,
            "pushed": s.upstream.pushed,
            "pulled": s.upstream.pulled,
            "records_waiting": s.upstream.records_waiting,
            "records_forwarded": s.upstream.records_forwarded,
            "records_refused": s.upstream.records_refused,
            "nats": s.upstream.nats,
        },
        "inbound": s.inbound,
        "sync_port": state.sync.status(),
        "replay_log": {"entries": s.replay_log_entries},
        "dead_letters": s.dead_letters,
        "reload": s.reload,
        "approvals": s.approvals,
        "store": s.store,
        "taps": s.taps,
        "rates": s.rates,
    })
}

async fn status(State(state): State<ApiState>) -> Response {
    let mut doc = status_json(&state);
    // The oldest pending held events, with their age and deadline, from the database.
    if let Ok((pending, held)) = state
        .store
        .run(lumenflow_actors::approvals::held::PendingHeld { limit: 20 })
        .await
    {
        doc["approvals"]["pending"] = json!(pending);
        doc["approvals"]["held"] = json!(held);
    }
    axum::Json(doc).into_response()
}

/// The CLI's `approvals approve | deny`: a `ResolveApprovalInput` decided here, in every mode
/// (in conductor mode the control plane is told afterwards).
async fn approvals_decide(State(state): State<ApiState>, req: Request) -> Response {
    let input = match read_control_json(req, None).await {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "Malformed request: expected a JSON object",
            )
        }
        Err(r) => return r,
    };
    decide(&state, input).await
}

/// Runs a decision through the Approvals actor and answers with the record or the refusal.
pub async fn decide(state: &ApiState, input: serde_json::Map<String, Value>) -> Response {
    let now = lumenflow_pack_sdk::envelope::format_timestamp(std::time::SystemTime::now());
    match state
        .approvals
        .send(lumenflow_actors::approvals::actor::Decide { input, now })
        .await
    {
        Ok(Ok(Ok(record))) => axum::Json(record).into_response(),
        Ok(Ok(Err(e))) => error(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::CONFLICT),
            e.message().to_string(),
        ),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(crate::metrics::StatsCollector(
        state.stats.clone(),
    )));
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("metrics encoding failed: {e}"),
        );
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy;

    #[test]
    fn host_check() {
        let mut h = HeaderMap::new();
        for ok in ["127.0.0.1:8080", "localhost", "[::1]:9", "localhost:1"] {
            h.insert(header::HOST, HeaderValue::from_static(ok));
            assert!(loopback_host(&h).is_ok(), "{ok}");
        }
        for bad in [
            "evil.example:80",
            "10.0.0.1:8080",
            "127.0.0.1.evil.com",
            "127.0.0.1:evil.com",
            "127.0.0.1:80@evil.com",
            "localhost:",
            "localhost:99999",
            "[::1]evil",
            "[::1]:80:81",
            "",
        ] {
            h.insert(header::HOST, HeaderValue::from_static(bad));
            assert!(loopback_host(&h).is_err(), "{bad}");
        }
        // Two Host headers: refused, whichever comes first.
        let mut two = HeaderMap::new();
        two.append(header::HOST, HeaderValue::from_static("127.0.0.1:1"));
        two.append(header::HOST, HeaderValue::from_static("evil.com"));
        assert!(loopback_host(&two).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Any request body is a batch or a 4xx, never a panic.
        #[test]
        fn arbitrary_bodies_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            if let Err((status, _)) = parse_batch(&bytes) {
                proptest::prop_assert!(status.is_client_error());
            }
        }

        #[test]
        fn arbitrary_event_lists_never_panic(events in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::strategy::Just(json!({"kind": "a:b", "payload": {}})),
                proptest::strategy::Just(json!({"kind": "a:b", "payload": []})),
                proptest::strategy::Just(json!({"schema_version": 2})),
                proptest::strategy::Just(json!(null)),
                ".{0,12}".prop_map(|s| json!({"kind": s, "payload": {}, "idempotency_key": s})),
            ], 0..20)) {
            let body = json!({"workspace_id": "w", "events": events}).to_string();
            let _ = parse_batch(body.as_bytes());
        }

        /// Any Host header value: accepted only when it names a loopback host; never a panic.
        #[test]
        fn arbitrary_host_headers(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..60)) {
            let Ok(v) = HeaderValue::from_bytes(&bytes) else { return Ok(()) };
            let mut h = HeaderMap::new();
            h.insert(header::HOST, v);
            if loopback_host(&h).is_ok() {
                let text = String::from_utf8_lossy(&bytes);
                // Exactly a loopback name and an optional numeric port: nothing after it.
                let rest = ["127.0.0.1", "localhost", "[::1]"]
                    .iter()
                    .find_map(|n| text.to_ascii_lowercase().strip_prefix(n).map(str::to_string));
                proptest::prop_assert!(
                    rest.as_deref().is_some_and(|r| r.is_empty() || (r.starts_with(':') && r[1..].bytes().all(|b| b.is_ascii_digit()))),
                    "accepted {:?}", text
                );
            }
        }

        /// Any Authorization header value: only `Bearer <the token>` gets in; never a panic.
        #[test]
        fn arbitrary_authorization_headers(bytes in proptest::prop_oneof![
            proptest::collection::vec(proptest::prelude::any::<u8>(), 0..60),
            "(Bearer |bearer |Basic |Bearer)?[ \t]{0,2}s3cret-toke[mn]?[a-z \t]{0,2}".prop_map(String::into_bytes),
        ]) {
            const TOKEN: &str = "s3cret-token";
            let Ok(v) = HeaderValue::from_bytes(&bytes) else { return Ok(()) };
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v);
            if let Some(t) = bearer_token(&h) {
                if token_matches(t.trim(), TOKEN) {
                    let text = String::from_utf8_lossy(&bytes).to_string();
                    proptest::prop_assert_eq!(text.strip_prefix("Bearer ").map(str::trim), Some(TOKEN));
                }
            }
        }
    }

    #[test]
    fn token_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
