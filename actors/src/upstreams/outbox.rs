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

/// The oldest outbox rows, in order: at most `limit` of them and at most `max_bytes` of bodies
/// (the first row always, whatever its size).
pub struct ReadOutbox {
    pub limit: usize,
    pub max_bytes: usize,
}
impl StoreOp for ReadOutbox {
    type Output = Vec<Item>;
    fn run(self, conn: &Connection) -> Result<Vec<Item>, StoreError> {
        let mut stmt = conn.prepare_cached(
            "SELECT seq, event_id, kind, pack, body FROM outbox ORDER BY seq LIMIT ?1",
        )?;
        let mut rows = stmt.query([self.limit as i64])?;
        let (mut items, mut bytes) = (Vec::new(), 0usize);
        while let Some(r) = rows.next()? {
            // The size is known before the body is copied out of SQLite.
            let len = r.get_ref(4)?.as_bytes().map(<[u8]>::len).unwrap_or(0);
            if !items.is_empty() && bytes + len > self.max_bytes {
                break;
            }
            bytes += len;
            items.push(Item {
                seq: Some(r.get(0)?),
                event_id: r.get(1)?,
                kind: r.get(2)?,
                pack: r.get(3)?,
                body: r.get::<_, String>(4)?.into(),
            });
        }
        Ok(items)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_is_bounded_in_bytes_but_always_takes_the_first_row() {
        let mut c = Connection::open_in_memory().unwrap();
        crate::schema::migrate(&mut c).unwrap();
        for (i, size) in [(1, 3_000_000), (2, 3_000_000), (3, 3_000_000), (4, 10)] {
            c.execute(
                "INSERT INTO outbox(seq, event_id, kind, pack, created_ms, body) VALUES (?1, ?2, 'd:k', 'd', 0, ?3)",
                params![i, format!("e{i}"), "x".repeat(size)],
            )
            .unwrap();
        }
        let read = |limit, max_bytes| {
            ReadOutbox { limit, max_bytes }
                .run(&c)
                .unwrap()
                .iter()
                .map(|i| i.seq.unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(read(100, 8_000_000), vec![1, 2]);
        assert_eq!(
            read(100, 1_000),
            vec![1],
            "one row over the limit goes alone"
        );
        assert_eq!(read(1, 100_000_000), vec![1]);
        assert_eq!(read(100, 100_000_000), vec![1, 2, 3, 4]);
    }
}
