//! `lumenflow-agent inbox [--json]`: what reached the embedded `mem:inbox` upstream. Reads
//! SQLite directly (WAL lets it read while the agent writes).

use crate::workspace::Workspace;
use lumenflow_actors::store::open_reader;
use serde_json::{json, Value};
use std::path::Path;

pub fn run(workspace: Option<&Path>, as_json: bool, limit: u32) -> anyhow::Result<u8> {
    let ws = Workspace::locate(workspace)?;
    let path = ws.db_file();
    let mut rows: Vec<Value> = Vec::new();
    if path.exists() {
        let c = open_reader(&path)?;
        let mut stmt = c.prepare(
            "SELECT seq, received_ms, body, event_id, kind FROM (SELECT * FROM mem_inbox ORDER BY seq DESC LIMIT ?1) ORDER BY seq",
        )?;
        for r in stmt.query_map([limit], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
            ))
        })? {
            let (seq, received_ms, body, event_id, kind) = r?;
            let event: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
            // `event`: as it arrived (a v1 kernel event has no id or payload of its own);
            // `event_id` and `kind`: as the agent knows it (`kernel:<kind>`, content-derived id).
            rows.push(json!({"seq": seq, "received_ms": received_ms, "event_id": event_id, "kind": kind, "event": event}));
        }
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    if rows.is_empty() {
        println!("mem:inbox is empty");
    }
    for r in &rows {
        let e = &r["event"];
        // A v1 kernel event's fields are its payload.
        let payload = match e.get("payload") {
            Some(p) => p.clone(),
            None => Value::Object(
                e.as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(k, _)| !matches!(k.as_str(), "schema_version" | "kind" | "timestamp"))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
        };
        println!(
            "{}  {}  {}  {}",
            e["timestamp"].as_str().unwrap_or("?"),
            r["event_id"].as_str().unwrap_or("?"),
            r["kind"].as_str().unwrap_or("?"),
            payload
        );
    }
    Ok(0)
}
