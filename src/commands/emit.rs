//! `lumenflow-agent emit KIND --payload JSON [--idempotency-key K] [--inbound]`.

use super::exit;
use crate::client::ApiClient;
use crate::workspace::Workspace;
use serde_json::{json, Value};
use std::path::Path;

pub fn run(
    workspace: Option<&Path>,
    kind: &str,
    payload: &str,
    key: Option<&str>,
    inbound: bool,
) -> anyhow::Result<u8> {
    let ws = Workspace::locate(workspace)?;
    let payload: Value = serde_json::from_str(payload)
        .map_err(|e| anyhow::anyhow!("--payload is not valid JSON: {e}"))?;
    if !payload.is_object() {
        anyhow::bail!("--payload must be a JSON object, e.g. '{{\"job_id\": \"job-1\"}}'");
    }
    let mut event = json!({"kind": kind, "payload": payload});
    if let Some(k) = key {
        event["idempotency_key"] = Value::String(k.to_string());
    }
    let client = match ApiClient::connect(&ws) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(exit::NOT_RUNNING);
        }
    };
    let path = if inbound {
        "/v1/inbound"
    } else {
        "/api/v1/events"
    };
    let reply = match client.post(path, &json!({"events": [event]}), &ws) {
        Ok(r) => r,
        Err(crate::client::ClientError::NotRunning(w)) => {
            eprintln!("error: lumenflow-agent is not running in {w}");
            return Ok(exit::NOT_RUNNING);
        }
        Err(e) => return Err(e.into()),
    };
    match reply.status {
        200 => {
            println!(
                "{}",
                reply.body["event_ids"][0].as_str().unwrap_or_default()
            );
            Ok(exit::OK)
        }
        422 => {
            // "events[0]: " is noise for a single event.
            let m = reply.message();
            eprintln!("error: {}", m.strip_prefix("events[0]: ").unwrap_or(&m));
            Ok(exit::INVALID)
        }
        429 => {
            eprintln!(
                "error: {} (Retry-After: {} s)",
                reply.message(),
                reply.retry_after.unwrap_or_default()
            );
            Ok(exit::USAGE)
        }
        _ => {
            eprintln!(
                "error: the agent answered {}: {}",
                reply.status,
                reply.message()
            );
            Ok(exit::USAGE)
        }
    }
}
