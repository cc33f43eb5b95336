//! Dead letters: events the agent could not take further, kept in SQLite with the reason.
//!
//! Each has an `origin`, which says where `retry` puts it back:
//! - `handler`: a pack could not handle an inbound event (`failed`, or a crash `max_attempts`
//!   times). Written by `PackHost` in the transaction that moves its cursor past it, so it is
//!   never lost and never blocks the pack. `retry` puts it back into the inbound log *for
//!   that pack only* (`inbound.target`), for one more attempt: if it crashes the handler
//!   again, it is dead-lettered again at once.
//! - `upstream`: the control plane rejected an outgoing event (400/422 after bisecting).
//!   `retry` puts it back at the end of the outbox, to be pushed again.
//! - `inbound`: an event from the upstream the agent could not read (written with the pull
//!   cursor that passed it). `retry` reads it again; one still unreadable stays, with the
//!   reason, and is reported as kept.
//!
//! `purge` deletes them. These operations run through the `Store` when the agent runs, or on
//! a direct connection when it does not (the CLI); the next `start` then delivers what was
//! retried.

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
    /// `handler`, `upstream` or `inbound` (see the module comment).
    pub origin: String,
    pub event: serde_json::Value,
}

pub fn list(conn: &Connection, limit: u32) -> Result<Vec<DeadLetter>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT id, pack, event_id, kind, attempts, error, created_ms, body, origin FROM dead_letters ORDER BY id LIMIT ?1",
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
                origin: r.get(8)?,
                event: serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Where a retried dead letter went.
#[derive(Debug, Clone)]
pub enum Retried {
    /// Back in the inbound log for `pack`, at `seq`.
    Inbound {
        seq: i64,
        pack: String,
        body: String,
    },
    /// Back at the end of the outbox (origin `upstream`).
    Outbox,
    /// Still unreadable (origin `inbound`): kept in the dead letters.
    Kept { id: i64, reason: String },
}

/// What a retry did, per dead letter, in id order.
#[derive(Debug, Clone, Default)]
pub struct RetryReport {
    pub retried: Vec<Retried>,
}

impl RetryReport {
    pub fn to_inbound(&self) -> impl Iterator<Item = (i64, &str, &str)> {
        self.retried.iter().filter_map(|r| match r {
            Retried::Inbound { seq, pack, body } => Some((*seq, pack.as_str(), body.as_str())),
            _ => None,
        })
    }
    pub fn to_outbox(&self) -> usize {
        self.retried
            .iter()
            .filter(|r| matches!(r, Retried::Outbox))
            .count()
    }
    pub fn kept(&self) -> usize {
        self.retried
            .iter()
            .filter(|r| matches!(r, Retried::Kept { .. }))
            .count()
    }
    /// Dead letters that left the table.
    pub fn moved(&self) -> usize {
        self.retried.len() - self.kept()
    }
    /// One line for people.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "retried {} dead letter(s): {} redelivered to their pack, {} back in the outbox",
            self.moved(),
            self.to_inbound().count(),
            self.to_outbox()
        );
        for r in &self.retried {
            if let Retried::Kept { id, reason } = r {
                s.push_str(&format!("; {id} kept, still unreadable: {reason}"));
            }
        }
        s
    }
}

/// Moves dead letters (`ids`, or all) back where their origin says (see the module comment).
pub fn retry(conn: &Connection, ids: Option<&[i64]>) -> Result<RetryReport, StoreError> {
    type Row = (i64, String, String, String, String, String, u32);
    let selected: Vec<Row> = {
        let mut stmt = conn.prepare(
            "SELECT id, pack, event_id, kind, body, origin, attempts FROM dead_letters ORDER BY id",
        )?;
        let all = stmt
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
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
    let mut report = RetryReport::default();
    for (id, pack, event_id, kind, body, origin, attempts) in selected {
        let retried = match origin.as_str() {
            "upstream" => {
                conn.execute(
                    "INSERT INTO outbox(event_id, kind, pack, created_ms, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![event_id, kind, pack, now, body],
                )?;
                Retried::Outbox
            }
            "inbound" => match crate::inbound_events::read_pulled(&body) {
                Err(reason) => Retried::Kept { id, reason },
                Ok(envelope) => {
                    let body = envelope.to_json();
                    conn.execute(
                        "INSERT INTO inbound(event_id, kind, event_ms, received_ms, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![envelope.event_id, envelope.kind, envelope.timestamp_ms(), now, body],
                    )?;
                    Retried::Inbound {
                        seq: conn.last_insert_rowid(),
                        pack: String::new(),
                        body,
                    }
                }
            },
            _ => {
                let event_ms = lumenflow_pack_sdk::Envelope::parse(body.as_bytes())
                    .map(|e| e.timestamp_ms())
                    .unwrap_or(now);
                conn.execute(
                    "INSERT INTO inbound(event_id, kind, event_ms, received_ms, body, target) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![event_id, kind, event_ms, now, body, pack],
                )?;
                let seq = conn.last_insert_rowid();
                // One more try, not a whole new budget: a dead letter that crashes its handler
                // again goes straight back (a `dlq retry --all` of 25 poison events is 25
                // crashes, not 75 and a pack in `crashed` backoff for minutes).
                if attempts > 1 {
                    conn.execute(
                        "INSERT INTO attempts(pack, seq, attempts, last_error) VALUES (?1, ?2, ?3, 'retried from the dead letters')
                         ON CONFLICT(pack, seq) DO UPDATE SET attempts = excluded.attempts",
                        params![pack, seq, attempts - 1],
                    )?;
                }
                Retried::Inbound { seq, pack, body }
            }
        };
        if !matches!(retried, Retried::Kept { .. }) {
            conn.execute("DELETE FROM dead_letters WHERE id = ?1", [id])?;
        }
        report.retried.push(retried);
    }
    Ok(report)
}

/// Deletes dead letter `id`, or all of them; returns how many.
pub fn purge(conn: &Connection, id: Option<i64>) -> Result<usize, StoreError> {
    Ok(conn.execute(
        "DELETE FROM dead_letters WHERE ?1 IS NULL OR id = ?1",
        rusqlite::params![id],
    )?)
}

pub struct RetryOp {
    pub ids: Option<Vec<i64>>,
}

impl StoreOp for RetryOp {
    type Output = RetryReport;
    fn run(self, conn: &Connection) -> Result<RetryReport, StoreError> {
        retry(conn, self.ids.as_deref())
    }
}

/// Purges dead letter `id`, or all of them.
pub struct PurgeOp {
    pub id: Option<i64>,
}

impl StoreOp for PurgeOp {
    type Output = usize;
    fn run(self, conn: &Connection) -> Result<usize, StoreError> {
        purge(conn, self.id)
    }
}
