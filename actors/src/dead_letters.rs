//! Dead letters: events a pack could not handle (`failed`, or a crash `max_attempts` times).
//!
//! They are written by `PackHost` in the same transaction that moves its cursor past them, so
//! a dead-lettered event is never lost and never blocks the pack. `retry` puts one back into
//! the inbound log *for that pack only* (`inbound.target`); `purge` deletes them.
//! These operations run through the `Store` when the agent runs, or on a direct connection
//! when it does not (the CLI); the next `start` then delivers what was retried.

use crate::store::{now_ms, StoreError, StoreOp};
use rusqlite::{params, Connection};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub pack: String,
    pub event_id: String,
    pub kind: String,
    pub attempts: u32,
    pub error: String,
    pub created_ms: i64,
    pub event: serde_json::Value,
}

pub fn list(conn: &Connection, limit: u32) -> Result<Vec<DeadLetter>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT id, pack, event_id, kind, attempts, error, created_ms, body FROM dead_letters ORDER BY id LIMIT ?1",
    )?;
    let rows = stmt
        .query_map([limit], |r| {
            let body: String = r.get(7)?;
            Ok(DeadLetter {
                id: r.get(0)?,
                pack: r.get(1)?,
                event_id: r.get(2)?,
                kind: r.get(3)?,
                attempts: r.get(4)?,
                error: r.get(5)?,
                created_ms: r.get(6)?,
                event: serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// A retried dead letter, back in the inbound log.
#[derive(Debug, Clone)]
pub struct Retried {
    pub seq: i64,
    pub pack: String,
    pub body: String,
}

/// Moves dead letters (`ids`, or all) back into the inbound log for their pack.
pub fn retry(conn: &Connection, ids: Option<&[i64]>) -> Result<Vec<Retried>, StoreError> {
    let selected: Vec<(i64, String, String, String, String)> = {
        let mut stmt =
            conn.prepare("SELECT id, pack, event_id, kind, body FROM dead_letters ORDER BY id")?;
        let all = stmt
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        all.into_iter()
            .filter(|row| ids.is_none_or(|ids| ids.contains(&row.0)))
            .collect()
    };
    if let Some(ids) = ids {
        if let Some(missing) = ids
            .iter()
            .find(|id| !selected.iter().any(|row| row.0 == **id))
        {
            return Err(StoreError::Invalid(format!(
                "no dead letter with id {missing} (see `lumenflow-agent dlq list`)"
            )));
        }
    }
    let now = now_ms();
    let mut out = Vec::with_capacity(selected.len());
    for (id, pack, event_id, kind, body) in selected {
        let event_ms = lumenflow_pack_sdk::Envelope::parse(body.as_bytes())
            .map(|e| e.timestamp_ms())
            .unwrap_or(now);
        conn.execute(
            "INSERT INTO inbound(event_id, kind, event_ms, received_ms, body, target) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![event_id, kind, event_ms, now, body, pack],
        )?;
        out.push(Retried {
            seq: conn.last_insert_rowid(),
            pack,
            body,
        });
        conn.execute("DELETE FROM dead_letters WHERE id = ?1", [id])?;
    }
    Ok(out)
}

pub fn purge(conn: &Connection) -> Result<usize, StoreError> {
    Ok(conn.execute("DELETE FROM dead_letters", [])?)
}

pub struct RetryOp {
    pub ids: Option<Vec<i64>>,
}

impl StoreOp for RetryOp {
    type Output = Vec<Retried>;
    fn run(self, conn: &Connection) -> Result<Vec<Retried>, StoreError> {
        retry(conn, self.ids.as_deref())
    }
}

pub struct PurgeOp;

impl StoreOp for PurgeOp {
    type Output = usize;
    fn run(self, conn: &Connection) -> Result<usize, StoreError> {
        purge(conn)
    }
}
