//! The platform's sync-port surface on the local API (SPEC §10; LUMENFLOW-FACTS "Control-plane
//! wire protocol"), beside `/api/v1/events`: so that the platform's own forwarder and SDK
//! (`HttpControlPlaneSyncPort`) pointed at the agent work unchanged.
//!
//! | path | mem:inbox (embedded) | conductor mode (a control plane upstream) |
//! |---|---|---|
//! | `policies` | `agent.json` `policies` (default allow) | fetched; the last good answer is kept durably and served while the control plane is unreachable (`status`: its age) |
//! | `config` | workspace.yaml `{id, control_plane}`; 404 without one (the SDK's own fallback) | as `policies` |
//! | `authenticate` | the caller's identity, its own token | relayed |
//! | `heartbeat` | answered | relayed; answered locally when the control plane is unreachable |
//! | `telemetry`, `evidence` | kept (`mem_sync`) | committed, then forwarded in order (`sync_records`) |
//! | `approvals/request\|resolve\|list` | kept and decided locally (`approvals`) | relayed |
//!
//! A relayed call is answered with the control plane's own status and body; a control plane
//! that cannot be reached is a 502 naming it. Every request is checked like events: valid JSON
//! object, this workspace's `workspace_id` when it names one.

use crate::api::{error, ApiState};
use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use lumenflow_actors::approvals::{ListApprovals, RequestApproval};
use lumenflow_actors::store::{now_ms, StoreError, StoreHandle, StoreOp};
use lumenflow_actors::sync_records::StoreRecords;
use lumenflow_actors::upstreams::http::{post, Reply};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Largest sync-port request body.
const MAX_BODY: usize = 4 << 20;
/// A relayed call gives up after this (the platform's client gives up after 10 s).
const RELAY_TIMEOUT: Duration = Duration::from_secs(8);

/// The control plane the agent relays to.
pub struct Relay {
    pub endpoint: String,
    pub token: String,
    pub agent: ureq::Agent,
}

impl Relay {
    pub fn new(
        endpoint: &str,
        token: String,
        roots: Option<&std::sync::Arc<Vec<ureq::tls::Certificate<'static>>>>,
    ) -> Relay {
        Relay {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            agent: lumenflow_actors::upstreams::http::http_agent(RELAY_TIMEOUT, roots),
        }
    }
}

/// Where a pulled answer (policies, config) came from, for `status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PullState {
    /// `control plane`, `cache` (the control plane failed), or `local`.
    pub source: &'static str,
    /// When the answer served was fetched from the control plane (ms since the epoch).
    pub fetched_ms: Option<i64>,
    pub last_error: Option<String>,
}

pub struct SyncPort {
    relay: Option<Relay>,
    store: StoreHandle,
    /// agent.json `policies` (served on mem:inbox).
    policies: Value,
    /// `{id, control_plane}` from workspace.yaml (served on mem:inbox).
    config: Option<Value>,
    pulls: Mutex<BTreeMap<&'static str, PullState>>,
}

impl SyncPort {
    pub fn new(
        relay: Option<Relay>,
        store: StoreHandle,
        policies: Value,
        config: Option<Value>,
    ) -> Self {
        SyncPort {
            relay,
            store,
            policies,
            config,
            pulls: Mutex::new(BTreeMap::new()),
        }
    }

    /// `status`: where policies and config were last served from, and their age.
    pub fn status(&self) -> Value {
        let pulls = self.pulls.lock().map(|p| p.clone()).unwrap_or_default();
        let now = now_ms();
        let mut out = Map::new();
        for (path, p) in pulls {
            out.insert(
                path.trim_start_matches("/api/v1/").to_string(),
                json!({
                    "source": p.source,
                    "age_s": p.fetched_ms.map(|ms| (now - ms).max(0) / 1000),
                    "last_error": p.last_error,
                }),
            );
        }
        json!({"mode": if self.relay.is_some() { "relay" } else { "local" }, "pulls": out})
    }

    fn note(&self, path: &'static str, state: PullState) {
        if let Ok(mut p) = self.pulls.lock() {
            p.insert(path, state);
        }
    }

    async fn relay(&self, relay: &Relay, path: &str, body: &Value) -> Reply {
        post(
            relay.agent.clone(),
            format!("{}{path}", relay.endpoint),
            relay.token.clone(),
            body.to_string(),
        )
        .await
    }
}

/// The control plane's answer, as it gave it.
fn passthrough(reply: Reply, path: &str) -> Response {
    match reply {
        Reply::Status(status, text, _, _) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            [(header::CONTENT_TYPE, "application/json")],
            text,
        )
            .into_response(),
        Reply::Network(e) => error(
            StatusCode::BAD_GATEWAY,
            format!("control plane unreachable for {path}: {e}"),
        ),
    }
}

fn json_reply(v: Value) -> Response {
    axum::Json(v).into_response()
}

/// Reads a sync-port request: a JSON object, naming this workspace if it names one.
async fn read_request(state: &ApiState, body: Body) -> Result<Map<String, Value>, Response> {
    let bytes = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Payload too large: the body exceeds {MAX_BODY} bytes"),
        )
    })?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("Malformed JSON: {e}")))?;
    let Value::Object(m) = v else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "Malformed request: expected a JSON object with \"workspace_id\"",
        ));
    };
    let workspace_id = match m.get("workspace_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(w)) => Some(w.as_str()),
        Some(_) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "Malformed request: \"workspace_id\" must be a string",
            ))
        }
    };
    crate::api::check_workspace(state, workspace_id)
        .map_err(|m| error(StatusCode::UNPROCESSABLE_ENTITY, m))?;
    Ok(m)
}

/// `policies` and `config`: fetched from the control plane, the last good answer cached
/// durably and served (with its age) while it is unreachable.
async fn pull(
    state: &ApiState,
    path: &'static str,
    request: Map<String, Value>,
    local: Option<Value>,
) -> Response {
    let sync = &state.sync;
    let Some(relay) = &sync.relay else {
        sync.note(
            path,
            PullState {
                source: "local",
                fetched_ms: None,
                last_error: None,
            },
        );
        return match local {
            Some(v) => json_reply(v),
            None => error(
                StatusCode::NOT_FOUND,
                format!("Not found: {path}: this workspace has no workspace.yaml control_plane block to serve"),
            ),
        };
    };
    let failure = match sync.relay(relay, path, &Value::Object(request)).await {
        Reply::Status(200..=299, text, _, _) => match serde_json::from_str::<Value>(&text) {
            Ok(v @ Value::Object(_)) => {
                let fetched_ms = now_ms();
                if let Err(e) = sync
                    .store
                    .run(PutCache {
                        path,
                        body: text,
                        fetched_ms,
                    })
                    .await
                {
                    tracing::warn!(path, error = %e, "cannot keep the control plane's answer in the cache");
                }
                sync.note(
                    path,
                    PullState {
                        source: "control plane",
                        fetched_ms: Some(fetched_ms),
                        last_error: None,
                    },
                );
                return json_reply(v);
            }
            _ => format!(
                "the control plane's answer is not a JSON object: {:?}",
                text.chars().take(120).collect::<String>()
            ),
        },
        Reply::Status(s, text, _, _) => {
            format!("HTTP {s}: {}", text.chars().take(200).collect::<String>())
        }
        Reply::Network(e) => format!("network: {e}"),
    };
    match sync.store.run(GetCache { path }).await {
        Ok(Some((body, fetched_ms))) => {
            tracing::warn!(path, error = %failure, age_s = (now_ms() - fetched_ms) / 1000, "control plane unreachable: serving its last good answer");
            sync.note(
                path,
                PullState {
                    source: "cache",
                    fetched_ms: Some(fetched_ms),
                    last_error: Some(failure),
                },
            );
            let age = ((now_ms() - fetched_ms).max(0) / 1000).to_string();
            (
                [
                    (header::CONTENT_TYPE, "application/json".to_string()),
                    (header::AGE, age),
                ],
                body,
            )
                .into_response()
        }
        _ => {
            sync.note(
                path,
                PullState {
                    source: "cache",
                    fetched_ms: None,
                    last_error: Some(failure.clone()),
                },
            );
            error(
                StatusCode::BAD_GATEWAY,
                format!("control plane unreachable for {path} and no earlier answer is cached: {failure}"),
            )
        }
    }
}

pub async fn policies(state: ApiState, body: Body) -> Response {
    match read_request(&state, body).await {
        Ok(req) => {
            let local = Some(state.sync.policies.clone());
            pull(&state, "/api/v1/policies", req, local).await
        }
        Err(r) => r,
    }
}

pub async fn config(state: ApiState, body: Body) -> Response {
    match read_request(&state, body).await {
        Ok(req) => {
            let local = state.sync.config.clone();
            pull(&state, "/api/v1/config", req, local).await
        }
        Err(r) => r,
    }
}

pub async fn authenticate(state: ApiState, presented: Option<String>, body: Body) -> Response {
    let req = match read_request(&state, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    if let Some(relay) = &state.sync.relay {
        let reply = state
            .sync
            .relay(relay, "/api/v1/authenticate", &Value::Object(req))
            .await;
        return passthrough(reply, "/api/v1/authenticate");
    }
    for k in ["org_id", "agent_id"] {
        if req.get(k).and_then(Value::as_str).is_none_or(str::is_empty) {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("authenticate: missing field \"{k}\" (a non-empty string)"),
            );
        }
    }
    json_reply(json!({
        "workspace_id": state.identity(),
        "org_id": req["org_id"],
        "agent_id": req["agent_id"],
        "token": presented.unwrap_or_default(),
    }))
}

pub async fn heartbeat(state: ApiState, body: Body) -> Response {
    let req = match read_request(&state, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    if let Some(relay) = &state.sync.relay {
        match state
            .sync
            .relay(relay, "/api/v1/heartbeat", &Value::Object(req))
            .await
        {
            reply @ Reply::Status(200..=299, _, _, _) => {
                return passthrough(reply, "/api/v1/heartbeat")
            }
            Reply::Status(s, text, _, _) => {
                tracing::debug!(status = s, reply = %text.chars().take(120).collect::<String>(), "heartbeat relay failed; answered locally")
            }
            Reply::Network(e) => {
                tracing::debug!(error = %e, "heartbeat relay failed; answered locally")
            }
        }
    }
    let now = lumenflow_pack_sdk::envelope::format_timestamp(SystemTime::now());
    json_reply(json!({"status": "ok", "server_time": now, "workspace_id": state.identity()}))
}

/// `telemetry` (`records`) and `evidence` (`evidence_refs`): checked, committed, answered
/// `{"accepted": n}`; forwarded in order in conductor mode (see `sync_records`).
pub async fn records(state: ApiState, path: &'static str, body: Body) -> Response {
    if let Some(r) = crate::api::refusal_if_stopping(&state) {
        return r;
    }
    let req = match read_request(&state, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let n = match check_records(path, &req) {
        Ok(n) => n,
        Err(m) => return error(StatusCode::UNPROCESSABLE_ENTITY, m),
    };
    let relay = state.sync.relay.is_some();
    let op = StoreRecords {
        path,
        body: Value::Object(req).to_string(),
        relay,
    };
    match state.sync.store.run(op).await {
        Ok(()) => {
            if relay {
                state
                    .stats
                    .upstream
                    .records_waiting
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            json_reply(json!({"accepted": n}))
        }
        Err(StoreError::DiskFull) => error(
            StatusCode::INSUFFICIENT_STORAGE,
            StoreError::DiskFull.to_string(),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// The number of records of a valid request; what is wrong otherwise.
fn check_records(path: &str, req: &Map<String, Value>) -> Result<usize, String> {
    let key = lumenflow_actors::sync_records::list_key(path).unwrap_or("records");
    let Some(Value::Array(list)) = req.get(key) else {
        return Err(format!("{path}: \"{key}\" must be a list"));
    };
    for (i, item) in list.iter().enumerate() {
        let ok = if key == "evidence_refs" {
            item.as_str().is_some_and(|s| !s.is_empty())
        } else {
            item["metric"].as_str().is_some_and(|s| !s.is_empty())
                && item["value"].as_f64().is_some_and(f64::is_finite)
                && item["timestamp"].as_str().is_some()
        };
        if !ok {
            let want = if key == "evidence_refs" {
                "a non-empty string"
            } else {
                "{metric: string, value: number, timestamp: string, tags?}"
            };
            return Err(format!("{path}: {key}[{i}] must be {want}"));
        }
    }
    Ok(list.len())
}

/// `approvals/request | resolve | list`: relayed in conductor mode, kept locally otherwise.
pub async fn approvals(state: ApiState, action: &'static str, body: Body) -> Response {
    let path = match action {
        "request" => "/api/v1/approvals/request",
        "resolve" => "/api/v1/approvals/resolve",
        _ => "/api/v1/approvals/list",
    };
    let req = match read_request(&state, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    if let Some(relay) = &state.sync.relay {
        let mut req = req;
        // The control plane files approvals by workspace: this one's, when the caller named none.
        req.entry("workspace_id")
            .or_insert_with(|| json!(state.identity()));
        let reply = state.sync.relay(relay, path, &Value::Object(req)).await;
        if action == "resolve" {
            // A decision the control plane took on our request: applied here at once (the
            // next pull would find it too).
            if let Reply::Status(200..=299, text, _, _) = &reply {
                if let Ok(record @ Value::Object(_)) = serde_json::from_str::<Value>(text) {
                    state
                        .approvals
                        .do_send(lumenflow_actors::approvals::actor::RemoteDecided(record));
                }
            }
        }
        return passthrough(reply, path);
    }
    let mut req = req;
    req.insert("workspace_id".into(), json!(state.identity()));
    if action == "resolve" {
        return crate::api::decide(&state, req).await;
    }
    let now = lumenflow_pack_sdk::envelope::format_timestamp(SystemTime::now());
    let result = match action {
        "request" => {
            state
                .sync
                .store
                .run(RequestApproval { input: req, now })
                .await
        }
        _ => {
            state
                .sync
                .store
                .run(ListApprovals {
                    input: req,
                    now,
                    by_workspace: false,
                })
                .await
        }
    };
    match result {
        Ok(Ok(v)) => json_reply(v),
        Ok(Err(e)) => error(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::CONFLICT),
            format!("{path}: {}", e.message()),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

struct PutCache {
    path: &'static str,
    body: String,
    fetched_ms: i64,
}

impl StoreOp for PutCache {
    type Output = ();
    fn run(self, conn: &Connection) -> Result<(), StoreError> {
        conn.execute(
            "INSERT INTO sync_cache(path, body, fetched_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(path) DO UPDATE SET body = excluded.body, fetched_ms = excluded.fetched_ms",
            params![self.path, self.body, self.fetched_ms],
        )?;
        Ok(())
    }
}

struct GetCache {
    path: &'static str,
}

impl StoreOp for GetCache {
    type Output = Option<(String, i64)>;
    fn run(self, conn: &Connection) -> Result<Self::Output, StoreError> {
        Ok(conn
            .query_row(
                "SELECT body, fetched_ms FROM sync_cache WHERE path = ?1",
                [self.path],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_checked_with_the_sdk_shapes() {
        let ok = json!({"workspace_id": "w", "records": [{"metric": "m", "value": 1.5, "timestamp": "2026-01-01T00:00:00.000Z", "tags": {"a": 1}}]});
        assert_eq!(
            check_records("/api/v1/telemetry", ok.as_object().unwrap()),
            Ok(1)
        );
        let bad = json!({"records": [{"metric": "m", "value": "1", "timestamp": "t"}]});
        let e = check_records("/api/v1/telemetry", bad.as_object().unwrap()).unwrap_err();
        assert!(e.contains("records[0] must be"), "{e}");
        let ev = json!({"evidence_refs": ["a", ""]});
        let e = check_records("/api/v1/evidence", ev.as_object().unwrap()).unwrap_err();
        assert!(
            e.contains("evidence_refs[1] must be a non-empty string"),
            "{e}"
        );
    }
}
