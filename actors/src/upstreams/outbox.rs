//! The outbox as the upstreams read and settle it: the oldest rows, in order; after a round,
//! the acknowledged rows deleted and the rejected ones dead-lettered (origin `upstream`, with
//! the server's reason), in one transaction.

use crate::queue::Accepted;
use crate::store::{now_ms, StoreError, StoreOp};
use rusqlite::{params, Connection, OptionalExtension};
use std::sync::Arc;

/// One event of a round: an outbox row, or an ephemeral event.
#[derive(Clone)]
pub struct Item {
    /// Outbox row, `None` for an ephemeral event.
    pub seq: Option<i64>,
    pub event_id: String,
    pub kind: String,
    pub pack: String,
    pub body: Arc<str>,
}

/// The oldest `limit` outbox rows, in order.
pub struct ReadOutbox {
    pub limit: usize,
}
impl StoreOp for ReadOutbox {
    type Output = Vec<Item>;
    fn run(self, conn: &Connection) -> Result<Vec<Item>, StoreError> {
        let mut stmt = conn.prepare_cached(
            "SELECT seq, event_id, kind, pack, body FROM outbox ORDER BY seq LIMIT ?1",
        )?;
        let rows = stmt
            .query_map([self.limit as i64], |r| {
                Ok(Item {
                    seq: Some(r.get(0)?),
                    event_id: r.get(1)?,
                    kind: r.get(2)?,
                    pack: r.get(3)?,
                    body: r.get::<_, String>(4)?.into(),
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }
}

/// Deletes acknowledged rows; dead-letters rejected ones. Returns the oldest remaining row time.
pub struct Settle {
    pub acked: Vec<i64>,
    pub rejected: Vec<(Item, String)>,
}
impl StoreOp for Settle {
    type Output = i64;
    fn run(self, conn: &Connection) -> Result<i64, StoreError> {
        let mut del = conn.prepare_cached("DELETE FROM outbox WHERE seq = ?1")?;
        for seq in &self.acked {
            del.execute([seq])?;
        }
        for (item, reason) in &self.rejected {
            conn.prepare_cached(
                "INSERT INTO dead_letters(pack, event_id, kind, attempts, error, created_ms, body, origin) VALUES (?1, ?2, ?3, 1, ?4, ?5, ?6, 'upstream')",
            )?
            .execute(params![item.pack, item.event_id, item.kind, reason, now_ms(), &*item.body])?;
            if let Some(seq) = item.seq {
                del.execute([seq])?;
            }
        }
        Ok(conn
            .query_row(
                "SELECT created_ms FROM outbox ORDER BY seq LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0))
    }
}

impl Item {
    /// An ephemeral event as a round item (no outbox row).
    pub fn ephemeral(a: &Accepted) -> Item {
        Item {
            seq: None,
            event_id: a.envelope.event_id.clone(),
            kind: a.envelope.kind.clone(),
            pack: a.pack.clone(),
            body: a.body.clone(),
        }
    }
}
