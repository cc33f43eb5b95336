//! `lumenflow-agent conductor serve`: a development control plane on loopback, implementing
//! the LumenFlow wire protocol the agent speaks upstream (SPEC §9, LUMENFLOW-FACTS.md), for
//! local work, demos and tests.
//!
//! - `POST /api/v1/events` `{workspace_id, events}` -> `{accepted}`; stored in SQLite, deduped
//!   per workspace by `event_id` (a retry of an accepted event is accepted again and stored
//!   once), or by the canonical JSON's SHA-256 for events without one (v1 kernel events).
//! - `POST /api/v1/heartbeat` -> `{status, server_time, next_heartbeat_ms}`.
//! - `POST /api/v1/policies` -> `{default_decision, rules}`.
//! - `POST /api/v1/events/pull` `{workspace_id, cursor, limit, wait_ms}` -> `{events,
//!   next_cursor}`: long-poll for events published to the workspace.
//! - `POST /api/v1/telemetry`, `/api/v1/evidence` -> `{accepted}`: stored (`GET /admin/records`).
//! - Admin (same token): `POST /admin/publish {workspace_id, events: [{kind, payload,
//!   event_id?}], raw?}` (`raw`: stored as given), `GET /admin/events` (what was received),
//!   `POST /admin/faults {status?, retry_after?, rate?, latency_ms?, drop?, reject_event_ids?,
//!   max_batch?, redirect?, html?, accept_at_most?}` (`status`, `redirect` and `html` apply to
//!   the approvals endpoints too), `POST /admin/policy {default_decision}`.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use rusqlite::{params, Connection};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::Notify;

/// Largest request body the dev conductor accepts.
pub const MAX_PUSH_BODY: usize = 40 << 20;

/// Injected failures (for tests and demos).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Answer every push with this status.
    pub status: Option<u16>,
    /// Fail this fraction (0..1) of pushes with 503.
    pub rate: Option<f64>,
    /// Delay every answer.
    pub latency_ms: Option<u64>,
    /// Close the connection without answering pushes.
    pub drop: Option<bool>,
    /// Answer 422 to a batch containing one of these ids, naming it.
    pub reject_event_ids: Option<Vec<String>>,
    /// Answer 413 to a batch with more events than this.
    pub max_batch: Option<usize>,
    /// Answer every push with this redirect (301, 302, 303, 307, 308) to `/login`, storing
    /// nothing: a misconfigured endpoint or a login wall in front of the control plane.
    pub redirect: Option<u16>,
    /// Answer every push with `200` and an HTML page, storing nothing (a captive portal).
    pub html: Option<bool>,
    /// Store only the first N events of each push and answer `{"accepted": N}`.
    pub accept_at_most: Option<usize>,
    /// With `status`: the Retry-After header (seconds).
    pub retry_after: Option<u64>,
}

struct Inner {
    db: Connection,
    faults: Faults,
    deny: bool,
}

#[derive(Clone)]
pub struct Conductor {
    inner: Arc<Mutex<Inner>>,
    token: Arc<str>,
    published: Arc<Notify>,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({"error": {"message": message.into()}})),
    )
        .into_response()
}

fn now_iso() -> String {
    lumenflow_pack_sdk::envelope::format_timestamp(SystemTime::now())
}

impl Conductor {
    pub fn open(db_path: &std::path::Path, token: String) -> anyhow::Result<Self> {
        let db = Connection::open(db_path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        // A push is answered after its transaction commits (to the WAL; fsync at checkpoints).
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.execute_batch(
            // Deduped per workspace by `dedupe_key`: the event_id, or for an event without
            // one (the platform's v1 kernel events) `sha256:` + its canonical JSON's hash.
            // `received_us`: first delivery time (µs), for latency figures.
            "CREATE TABLE IF NOT EXISTS received_events (seq INTEGER PRIMARY KEY, workspace_id TEXT NOT NULL, dedupe_key TEXT NOT NULL, kind TEXT, body TEXT, received_ms INTEGER, deliveries INTEGER NOT NULL DEFAULT 1, received_us INTEGER, UNIQUE (workspace_id, dedupe_key));
             CREATE TABLE IF NOT EXISTS outgoing (seq INTEGER PRIMARY KEY, workspace_id TEXT, body TEXT);
             CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY, workspace_id TEXT, path TEXT, body TEXT);",
        )?;
        // Approvals in the agent's own table shape: the same request / resolve / list code
        // answers them (`lumenflow_actors::approvals::records`), per workspace.
        db.execute_batch(lumenflow_actors::approvals::records::STANDALONE_TABLE)?;
        Ok(Conductor {
            inner: Arc::new(Mutex::new(Inner {
                db,
                faults: Faults::default(),
                deny: false,
            })),
            token: token.into(),
            published: Arc::new(Notify::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn router(self) -> Router {
        Router::new()
            .route("/api/v1/events", post(push))
            .route("/api/v1/heartbeat", post(heartbeat))
            .route("/api/v1/policies", post(policies))
            .route("/api/v1/events/pull", post(pull))
            .route(
                "/api/v1/telemetry",
                post(|State(c): State<Conductor>, body: Bytes| {
                    records(c, "/api/v1/telemetry", "records", body)
                }),
            )
            .route(
                "/api/v1/evidence",
                post(|State(c): State<Conductor>, body: Bytes| {
                    records(c, "/api/v1/evidence", "evidence_refs", body)
                }),
            )
            .route(
                "/api/v1/approvals/request",
                post(|State(c): State<Conductor>, body: Bytes| approvals(c, "request", body)),
            )
            .route(
                "/api/v1/approvals/resolve",
                post(|State(c): State<Conductor>, body: Bytes| approvals(c, "resolve", body)),
            )
            .route(
                "/api/v1/approvals/list",
                post(|State(c): State<Conductor>, body: Bytes| approvals(c, "list", body)),
            )
            .route("/admin/records", get(received_records))
            .route("/admin/publish", post(publish))
            .route("/admin/events", get(received))
            .route("/admin/faults", post(set_faults))
            .route("/admin/policy", post(set_policy))
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                require_token,
            ))
            // A push round carries at most ROUND_MAX_BYTES of events per class plus its JSON
            // (axum's default of 2 MB refused a single 8 MB event, which was then retried).
            .layer(axum::extract::DefaultBodyLimit::max(MAX_PUSH_BODY))
            .with_state(self)
    }

    fn authorized(&self, headers: &axum::http::HeaderMap) -> bool {
        crate::api::bearer_token(headers).is_some_and(|t| crate::api::token_matches(t, &self.token))
    }
}

/// Every endpoint needs `Authorization: Bearer <token>`.
async fn require_token(
    State(c): State<Conductor>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !c.authorized(req.headers()) {
        return error(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    next.run(req).await
}

fn parse(body: &Bytes) -> Result<Value, String> {
    serde_json::from_slice(body).map_err(|e| format!("Malformed JSON: {e}"))
}

/// `{workspace_id, events: [...]}` (pushes and admin publishes), or what makes it a 400.
fn workspace_batch(body: &Bytes) -> Result<(String, Vec<Value>), String> {
    let mut v = parse(body)?;
    let ws = match v["workspace_id"].as_str() {
        Some(ws) if !ws.is_empty() => ws.to_string(),
        _ => return Err("missing workspace_id (a non-empty string)".into()),
    };
    match v["events"].take() {
        Value::Array(events) => Ok((ws, events)),
        _ => Err("missing events".into()),
    }
}

async fn push(State(c): State<Conductor>, body: Bytes) -> Response {
    let faults = c.lock().faults.clone();
    if let Some(ms) = faults.latency_ms {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if faults.drop == Some(true) {
        // Answer with a broken connection: the agent sees a network error.
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONNECTION, "close")],
            "",
        )
            .into_response();
    }
    if let Some(r) = lie(&faults) {
        return r;
    }
    if let Some(status) = faults.status {
        let mut r = error(
            StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            format!("injected fault: HTTP {status}"),
        );
        if let Some(s) = faults.retry_after {
            if let Ok(v) = header::HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        return r;
    }
    if let Some(rate) = faults.rate {
        if rand::random::<f64>() < rate {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "injected fault: random failure",
            );
        }
    }
    let (ws, mut events) = match workspace_batch(&body) {
        Ok(b) => b,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    if let Some(n) = faults.accept_at_most {
        events.truncate(n);
    }
    if let Some(max) = faults.max_batch {
        if events.len() > max {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("batch of {} events is larger than {max}", events.len()),
            );
        }
    }
    if let Some(reject) = &faults.reject_event_ids {
        if let Some(bad) = events
            .iter()
            .filter_map(|e| e["event_id"].as_str())
            .find(|id| reject.iter().any(|r| r == id))
        {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("event {bad} rejected: schema check failed (injected)"),
            );
        }
    }
    let inner = c.lock();
    let now_us = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    // One transaction per push: answered only once the batch is stored.
    let stored: rusqlite::Result<()> = (|| {
        let tx = inner.db.unchecked_transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO received_events(workspace_id, dedupe_key, kind, body, received_ms, received_us) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(workspace_id, dedupe_key) DO UPDATE SET deliveries = deliveries + 1",
            )?;
            for e in &events {
                let kind = e["kind"].as_str().unwrap_or_default();
                stmt.execute(params![
                    ws,
                    dedupe_key(e),
                    kind,
                    e.to_string(),
                    now_us / 1000,
                    now_us
                ])?;
            }
        }
        tx.commit()
    })();
    if let Err(e) = stored {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot store the batch: {e}"),
        );
    }
    axum::Json(json!({"accepted": events.len()})).into_response()
}

/// What a control plane dedupes an event by: its `event_id`, or, for an event without one (a
/// v1 kernel event), the SHA-256 of its canonical JSON.
fn dedupe_key(event: &Value) -> String {
    match event["event_id"].as_str() {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => format!(
            "sha256:{}",
            lumenflow_pack_sdk::canonical::canonical_hash(event)
        ),
    }
}

/// Telemetry and evidence: stored, answered `{"accepted": n}` (the `accept_at_most` fault
/// applies to them too).
async fn records(c: Conductor, path: &'static str, key: &'static str, body: Bytes) -> Response {
    let mut v = match parse(&body) {
        Ok(v) => v,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let Some(ws) = v["workspace_id"].as_str().map(str::to_string) else {
        return error(StatusCode::BAD_REQUEST, "missing workspace_id");
    };
    let faults = c.lock().faults.clone();
    if let Some(status) = faults.status {
        return error(
            StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            format!("injected fault: HTTP {status}"),
        );
    }
    let Some(list) = v[key].as_array_mut() else {
        return error(StatusCode::BAD_REQUEST, format!("missing {key}"));
    };
    if let Some(n) = faults.accept_at_most {
        list.truncate(n);
    }
    let n = list.len();
    let inner = c.lock();
    if let Err(e) = inner.db.execute(
        "INSERT INTO records(workspace_id, path, body) VALUES (?1, ?2, ?3)",
        params![ws, path, v.to_string()],
    ) {
        return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
    axum::Json(json!({"accepted": n})).into_response()
}

/// The answers of something that is not a control plane: a redirect to a login page, or a
/// captive portal's `200` HTML page.
fn lie(faults: &Faults) -> Option<Response> {
    if let Some(status) = faults.redirect {
        return Some(
            (
                StatusCode::from_u16(status).unwrap_or(StatusCode::FOUND),
                [(header::LOCATION, "/login")],
                "",
            )
                .into_response(),
        );
    }
    if faults.html == Some(true) {
        return Some(
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "text/html")],
                "<html><body>Please sign in</body></html>",
            )
                .into_response(),
        );
    }
    None
}

/// `approvals/request | resolve | list` of the sync port, as a control plane answers them: one
/// list per workspace (`workspace_id` required).
async fn approvals(c: Conductor, action: &'static str, body: Bytes) -> Response {
    use lumenflow_actors::approvals::{ListApprovals, RequestApproval, ResolveApproval};
    use lumenflow_actors::store::StoreOp;
    let input = match parse(&body) {
        Ok(Value::Object(m))
            if m.get("workspace_id")
                .and_then(Value::as_str)
                .is_some_and(|w| !w.is_empty()) =>
        {
            m
        }
        Ok(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "missing workspace_id (a non-empty string)",
            )
        }
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let faults = c.lock().faults.clone();
    if let Some(r) = lie(&faults) {
        return r;
    }
    if let Some(status) = faults.status {
        return error(
            StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            format!("injected fault: HTTP {status}"),
        );
    }
    let now = now_iso();
    let inner = c.lock();
    let result = match action {
        "request" => RequestApproval { input, now }.run(&inner.db),
        "resolve" => {
            // Only this workspace's approvals can be decided by it.
            let field = |k: &str| {
                input
                    .get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            let (ws, id) = (field("workspace_id"), field("approval_id"));
            let owner: Option<String> = inner
                .db
                .query_row(
                    "SELECT json_extract(record, '$.workspace_id') FROM approvals WHERE approval_id = ?1",
                    [&id],
                    |r| r.get(0),
                )
                .ok()
                .flatten();
            if owner.is_some_and(|o| o != ws) {
                return error(StatusCode::NOT_FOUND, format!("no approval \"{id}\""));
            }
            ResolveApproval {
                input,
                now,
                forbid_self: false,
                origin: lumenflow_actors::approvals::held::Origin::Local,
            }
            .run(&inner.db)
            .map(|r| r.map(|d| d.record))
        }
        _ => ListApprovals {
            input,
            now,
            by_workspace: true,
        }
        .run(&inner.db),
    };
    match result {
        Ok(Ok(v)) => axum::Json(v).into_response(),
        Ok(Err(e)) => error(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::CONFLICT),
            e.message().to_string(),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn received_records(State(c): State<Conductor>) -> Response {
    let inner = c.lock();
    let rows: rusqlite::Result<Vec<Value>> = (|| {
        let mut stmt = inner
            .db
            .prepare("SELECT workspace_id, path, body FROM records ORDER BY seq")?;
        let rows = stmt
            .query_map([], |r| {
                Ok(json!({"workspace_id": r.get::<_, String>(0)?, "path": r.get::<_, String>(1)?,
                    "body": serde_json::from_str::<Value>(&r.get::<_, String>(2)?).unwrap_or(Value::Null)}))
            })?
            .collect();
        rows
    })();
    match rows {
        Ok(r) => axum::Json(Value::Array(r)).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn heartbeat(State(_c): State<Conductor>) -> Response {
    axum::Json(json!({"status": "ok", "server_time": now_iso(), "next_heartbeat_ms": 5000}))
        .into_response()
}

async fn policies(State(c): State<Conductor>) -> Response {
    let deny = c.lock().deny;
    axum::Json(json!({"default_decision": if deny { "deny" } else { "allow" }, "rules": []}))
        .into_response()
}

fn outgoing_after(
    inner: &Inner,
    ws: &str,
    cursor: i64,
    limit: i64,
) -> rusqlite::Result<Vec<(i64, String)>> {
    let mut stmt = inner.db.prepare(
        "SELECT seq, body FROM outgoing WHERE workspace_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
    )?;
    let rows = stmt
        .query_map(params![ws, cursor, limit], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect();
    rows
}

async fn pull(State(c): State<Conductor>, body: Bytes) -> Response {
    let v = match parse(&body) {
        Ok(v) => v,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let ws = v["workspace_id"].as_str().unwrap_or_default().to_string();
    let cursor: i64 = match &v["cursor"] {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    };
    let limit = v["limit"].as_i64().unwrap_or(100).clamp(1, 1000);
    let wait = Duration::from_millis(v["wait_ms"].as_u64().unwrap_or(0).min(60_000));
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let notified = c.published.notified();
        let rows = {
            let inner = c.lock();
            outgoing_after(&inner, &ws, cursor, limit)
        };
        let rows = match rows {
            Ok(r) => r,
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
        if !rows.is_empty() || tokio::time::Instant::now() >= deadline {
            let next = rows.last().map(|r| r.0).unwrap_or(cursor);
            let events: Vec<Value> = rows
                .iter()
                .filter_map(|r| serde_json::from_str(&r.1).ok())
                .collect();
            return axum::Json(json!({"events": events, "next_cursor": next.to_string()}))
                .into_response();
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

async fn publish(State(c): State<Conductor>, body: Bytes) -> Response {
    let (ws, events) = match workspace_batch(&body) {
        Ok(b) => b,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let raw = serde_json::from_slice::<Value>(&body)
        .ok()
        .is_some_and(|v| v["raw"] == true);
    let mut ids = Vec::new();
    {
        let inner = c.lock();
        for e in &events {
            if raw {
                // Published as given, for tests of what the agent does with odd events.
                ids.push(e.get("event_id").cloned().unwrap_or(Value::Null));
                if let Err(e) = inner.db.execute(
                    "INSERT INTO outgoing(workspace_id, body) VALUES (?1, ?2)",
                    params![ws, e.to_string()],
                ) {
                    return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
                }
                continue;
            }
            let mut env = json!({"schema_version": 2, "event_id": e.get("event_id").cloned().unwrap_or_else(|| json!(uuid::Uuid::now_v7().to_string())),
                "kind": e["kind"], "timestamp": now_iso(), "from": "conductor", "payload": e.get("payload").cloned().unwrap_or(json!({}))});
            if let Some(ts) = e.get("timestamp") {
                env["timestamp"] = ts.clone();
            }
            ids.push(env["event_id"].clone());
            if let Err(e) = inner.db.execute(
                "INSERT INTO outgoing(workspace_id, body) VALUES (?1, ?2)",
                params![ws, env.to_string()],
            ) {
                return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
            }
        }
    }
    c.published.notify_waiters();
    axum::Json(json!({"published": ids.len(), "event_ids": ids})).into_response()
}

async fn received(State(c): State<Conductor>) -> Response {
    let inner = c.lock();
    let rows: rusqlite::Result<Vec<Value>> = (|| {
        let mut stmt = inner.db.prepare(
            "SELECT workspace_id, body, deliveries, received_us FROM received_events ORDER BY seq",
        )?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?, r.get::<_, Option<i64>>(3)?)))?
            .map(|r| {
                r.map(|(ws, b, n, us)| json!({"workspace_id": ws, "deliveries": n, "received_us": us, "event": serde_json::from_str::<Value>(&b).unwrap_or(Value::Null)}))
            })
            .collect();
        rows
    })();
    match rows {
        Ok(r) => axum::Json(Value::Array(r)).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn set_faults(State(c): State<Conductor>, body: Bytes) -> Response {
    match serde_json::from_slice::<Faults>(&body) {
        Ok(f) => {
            c.lock().faults = f;
            axum::Json(json!({"ok": true})).into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, format!("faults: {e}")),
    }
}

async fn set_policy(State(c): State<Conductor>, body: Bytes) -> Response {
    let v = match parse(&body) {
        Ok(v) => v,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    c.lock().deny = v["default_decision"] == "deny";
    axum::Json(json!({"ok": true})).into_response()
}

/// Runs the development conductor until Ctrl-C.
pub fn serve(listen: &str, token: Option<String>, db: &std::path::Path) -> anyhow::Result<()> {
    let token = token
        .or_else(|| std::env::var("LUMENFLOW_CONTROL_PLANE_TOKEN").ok())
        .unwrap_or_else(|| "dev-token".into());
    let conductor = Conductor::open(db, token.clone())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() {
            anyhow::bail!("the development conductor only listens on loopback, not {addr}");
        }
        println!("conductor listening on http://{addr} (token from --token or LUMENFLOW_CONTROL_PLANE_TOKEN; db {})", db.display());
        let server = axum::serve(listener, conductor.router()).with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        });
        server.await?;
        Ok(())
    })
}
