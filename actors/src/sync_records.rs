//! The platform's sync-port records: telemetry (`/api/v1/telemetry`, `records`) and evidence
//! (`/api/v1/evidence`, `evidence_refs`), accepted on the local API for the control plane.
//!
//! Guarantees (the outbox's, for records):
//! - A request is committed (one row, the body as the platform sent it) before the API
//!   answers `{"accepted": n}`; nothing acknowledged is only in memory.
//! - In conductor mode the HTTP upstream forwards the rows in order, one request each, and
//!   removes a row only when the control plane acknowledged it: `{"accepted": n}` for the
//!   leading n records (a partial answer keeps the rest of the row, in order). `accepted: 0`,
//!   a 3xx, 408/429/5xx and network errors keep it for a retry with backoff.
//! - A control plane that does not have the endpoint (404, the SDK's own "not supported"
//!   fallback) or refuses the request (400/422) gets nothing more of that row: it is dropped,
//!   logged with the reason and counted (`upstream.records_refused`), never retried forever.
//! - On mem:inbox the embedded upstream keeps them (`mem_sync`, the newest 100,000 rows).

use crate::store::{now_ms, StoreError, StoreOp};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

/// The sync-port paths that carry records, and the list each request's records are in.
pub const RECORD_PATHS: &[(&str, &str)] = &[
    ("/api/v1/telemetry", "records"),
    ("/api/v1/evidence", "evidence_refs"),
];

/// Rows `mem_sync` keeps (the newest).
const MEM_SYNC_MAX: i64 = 100_000;

/// The list of records of a request to `path`, by name (`records`, `evidence_refs`).
pub fn list_key(path: &str) -> Option<&'static str> {
    RECORD_PATHS
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, k)| *k)
}

/// Stores one accepted request: for the control plane (`relay`), or kept by mem:inbox.
pub struct StoreRecords {
    pub path: &'static str,
    pub body: String,
    pub relay: bool,
}

impl StoreOp for StoreRecords {
    type Output = ();
    fn run(self, conn: &Connection) -> Result<(), StoreError> {
        if self.relay {
            conn.prepare_cached(
                "INSERT INTO sync_outbox(path, body, created_ms) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![self.path, self.body, now_ms()])?;
        } else {
            conn.prepare_cached(
                "INSERT INTO mem_sync(path, body, received_ms) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![self.path, self.body, now_ms()])?;
            conn.prepare_cached(
                "DELETE FROM mem_sync WHERE seq <= (SELECT max(seq) FROM mem_sync) - ?1",
            )?
            .execute([MEM_SYNC_MAX])?;
        }
        Ok(())
    }
}

/// The oldest row waiting for the control plane.
pub struct OldestRecord;

#[derive(Debug, Clone)]
pub struct WaitingRecord {
    pub seq: i64,
    pub path: String,
    pub body: String,
}

impl StoreOp for OldestRecord {
    type Output = Option<WaitingRecord>;
    fn run(self, conn: &Connection) -> Result<Self::Output, StoreError> {
        Ok(conn
            .prepare_cached("SELECT seq, path, body FROM sync_outbox ORDER BY seq LIMIT 1")?
            .query_row([], |r| {
                Ok(WaitingRecord {
                    seq: r.get(0)?,
                    path: r.get(1)?,
                    body: r.get(2)?,
                })
            })
            .optional()?)
    }
}

/// What became of a forwarded row.
pub enum RecordOutcome {
    /// The control plane took the leading `n` records: the row keeps the rest, or goes.
    Accepted(usize),
    /// The control plane will never take it (404, 400, 422): the row goes.
    Refused,
}

pub struct SettleRecord {
    pub record: WaitingRecord,
    pub outcome: RecordOutcome,
}

impl StoreOp for SettleRecord {
    /// Rows still waiting.
    type Output = i64;
    fn run(self, conn: &Connection) -> Result<i64, StoreError> {
        let rest = match self.outcome {
            RecordOutcome::Refused => None,
            RecordOutcome::Accepted(n) => remaining(&self.record, n),
        };
        match rest {
            Some(body) => conn
                .prepare_cached("UPDATE sync_outbox SET body = ?1 WHERE seq = ?2")?
                .execute(params![body, self.record.seq])?,
            None => conn
                .prepare_cached("DELETE FROM sync_outbox WHERE seq = ?1")?
                .execute([self.record.seq])?,
        };
        Ok(conn.query_row("SELECT count(*) FROM sync_outbox", [], |r| r.get(0))?)
    }
}

/// The number of records in a request body (what an `{"accepted": n}` is compared with).
pub fn record_count(path: &str, body: &str) -> usize {
    let key = list_key(path).unwrap_or("records");
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v[key].as_array().map(Vec::len))
        .unwrap_or(0)
}

/// The body without its leading `n` records, or `None` when nothing is left.
fn remaining(record: &WaitingRecord, n: usize) -> Option<String> {
    let key = list_key(&record.path).unwrap_or("records");
    let mut v: Value = serde_json::from_str(&record.body).ok()?;
    let list = v.get_mut(key)?.as_array_mut()?;
    if n >= list.len() {
        return None;
    }
    list.drain(..n);
    Some(v.to_string())
}

/// Rows waiting for the control plane (for `status` at start).
pub fn waiting(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row("SELECT count(*) FROM sync_outbox", [], |r| r.get(0))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Connection {
        let mut c = Connection::open_in_memory().unwrap();
        crate::schema::migrate(&mut c).unwrap();
        c
    }

    #[test]
    fn a_partial_ack_keeps_the_rest_in_order_and_a_full_one_removes_the_row() {
        let c = conn();
        let body =
            r#"{"workspace_id":"w","records":[{"metric":"a"},{"metric":"b"},{"metric":"c"}]}"#;
        StoreRecords {
            path: "/api/v1/telemetry",
            body: body.into(),
            relay: true,
        }
        .run(&c)
        .unwrap();
        let r = OldestRecord.run(&c).unwrap().unwrap();
        assert_eq!(record_count(&r.path, &r.body), 3);
        let left = SettleRecord {
            record: r,
            outcome: RecordOutcome::Accepted(1),
        }
        .run(&c)
        .unwrap();
        assert_eq!(left, 1);
        let r = OldestRecord.run(&c).unwrap().unwrap();
        assert!(
            r.body.contains(r#"[{"metric":"b"},{"metric":"c"}]"#),
            "{}",
            r.body
        );
        let r2 = r.clone();
        assert_eq!(
            SettleRecord {
                record: r,
                outcome: RecordOutcome::Accepted(0),
            }
            .run(&c)
            .unwrap(),
            1
        );
        assert_eq!(
            SettleRecord {
                record: r2,
                outcome: RecordOutcome::Accepted(2),
            }
            .run(&c)
            .unwrap(),
            0
        );
    }

    #[test]
    fn mem_inbox_keeps_records_apart_from_the_outbox() {
        let c = conn();
        StoreRecords {
            path: "/api/v1/evidence",
            body: r#"{"evidence_refs":["e1"]}"#.into(),
            relay: false,
        }
        .run(&c)
        .unwrap();
        assert!(OldestRecord.run(&c).unwrap().is_none());
        let n: i64 = c
            .query_row("SELECT count(*) FROM mem_sync", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
    }
}
