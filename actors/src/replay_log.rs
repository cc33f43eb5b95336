//! `ReplayLog`: which events each pack has finished, and the keys handlers record themselves.
//!
//! Owns the `replay_recent` / `replay_log` tables (see `schema.rs` for why there are two), the
//! merge of the first into the second, and retention; its hourly pass also compacts the inbound
//! log past every pack's cursor.
//!
//! Guarantees:
//! - An event is recorded for a pack in the same transaction that advances the pack's cursor
//!   past it (see `pack_host::CompleteChunk`): a crash never leaves an event recorded but
//!   pending, or finished but unrecorded and skipped.
//! - A lookup sees both levels, so a merge never makes an entry invisible.
//! - Entries older than the retention are pruned hourly (and once at start).

use crate::stats::AgentStats;
use crate::store::{now_ms, StoreError, StoreHandle, StoreOp};
use actix::prelude::*;
use rusqlite::{params, Connection};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// `replay_recent` rows that trigger a merge.
pub const MERGE_THRESHOLD: i64 = 50_000;

/// The replay-log key of an event.
pub fn event_key(event_id: &str) -> String {
    format!("event:{event_id}")
}

/// The replay-log key of a handler's own key.
pub fn handler_key(key: &str) -> String {
    format!("key:{key}")
}

/// Records keys for a pack; used inside other operations' transactions. Returns how many
/// were new to the recent level.
pub fn record(conn: &Connection, pack: &str, keys: &[String]) -> Result<usize, StoreError> {
    let mut stmt = conn.prepare_cached(
        "INSERT OR IGNORE INTO replay_recent(pack, key, recorded_ms) VALUES (?1, ?2, ?3)",
    )?;
    let now = now_ms();
    let mut n = 0;
    for k in keys {
        n += stmt.execute(params![pack, k, now])?;
    }
    Ok(n)
}

/// Is `key` recorded for `pack` (either level)?
pub fn contains(conn: &Connection, pack: &str, key: &str) -> Result<bool, StoreError> {
    Ok(seen(conn, pack, std::slice::from_ref(&key))?[0])
}

/// Which of `keys` the pack has recorded (either level); the statements are prepared once.
pub fn seen<K: AsRef<str>>(
    conn: &Connection,
    pack: &str,
    keys: &[K],
) -> Result<Vec<bool>, StoreError> {
    let mut recent =
        conn.prepare_cached("SELECT 1 FROM replay_recent WHERE pack = ?1 AND key = ?2")?;
    let mut merged =
        conn.prepare_cached("SELECT 1 FROM replay_log WHERE pack = ?1 AND key = ?2")?;
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        let k = k.as_ref();
        out.push(recent.exists(params![pack, k])? || merged.exists(params![pack, k])?);
    }
    Ok(out)
}

/// Which of `keys` the pack has recorded. Read-only: it may run on a reader
/// ([`StoreHandle::read`]). `replay_recent` is read before `replay_log`: a merge moving a key
/// from one to the other between the two statements is then seen in one of them.
#[derive(Clone)]
pub struct SeenOp {
    pub pack: String,
    pub keys: Vec<String>,
}

impl StoreOp for SeenOp {
    type Output = Vec<bool>;
    fn run(self, conn: &Connection) -> Result<Vec<bool>, StoreError> {
        seen(conn, &self.pack, &self.keys)
    }
}

pub struct PutOp {
    pub pack: String,
    pub key: String,
}

impl StoreOp for PutOp {
    type Output = usize;
    fn run(self, conn: &Connection) -> Result<usize, StoreError> {
        record(conn, &self.pack, &[self.key])
    }
}

/// Moves `replay_recent` into `replay_log` in one sorted pass when it holds `threshold` rows.
pub struct MergeOp {
    pub threshold: i64,
}

impl StoreOp for MergeOp {
    type Output = usize;
    fn run(self, conn: &Connection) -> Result<usize, StoreError> {
        let n: i64 = conn.query_row("SELECT count(*) FROM replay_recent", [], |r| r.get(0))?;
        if n < self.threshold {
            return Ok(0);
        }
        conn.execute(
            "INSERT OR IGNORE INTO replay_log(pack, key, recorded_ms)
             SELECT pack, key, recorded_ms FROM replay_recent ORDER BY pack, key",
            [],
        )?;
        conn.execute("DELETE FROM replay_recent", [])?;
        Ok(n as usize)
    }
}

/// Deletes entries older than the cutoff; returns how many rows went.
pub struct PruneOp {
    pub cutoff_ms: i64,
}

impl StoreOp for PruneOp {
    type Output = usize;
    fn run(self, conn: &Connection) -> Result<usize, StoreError> {
        let a = conn.execute(
            "DELETE FROM replay_log WHERE recorded_ms < ?1",
            [self.cutoff_ms],
        )?;
        let b = conn.execute(
            "DELETE FROM replay_recent WHERE recorded_ms < ?1",
            [self.cutoff_ms],
        )?;
        // A pack away (folder removed, manifest invalid) for longer than the retention gives
        // up its place in the inbound log; until then it holds its pending events.
        let forgotten = conn.execute(
            "DELETE FROM pack_cursor WHERE absent_since_ms IS NOT NULL AND absent_since_ms < ?1",
            [self.cutoff_ms],
        )?;
        if forgotten > 0 {
            conn.execute(
                "DELETE FROM attempts WHERE pack NOT IN (SELECT pack FROM pack_cursor)",
                [],
            )?;
            tracing::warn!(
                packs = forgotten,
                "packs away for longer than the replay retention gave up their place in the inbound log"
            );
        }
        // The inbound log: rows every known pack's cursor has passed are done for everyone
        // (with no pack at all, every row is). AUTOINCREMENT keeps seqs unique after this.
        let compacted = conn.execute(
            "DELETE FROM inbound WHERE seq <= (SELECT coalesce(min(cursor), (SELECT coalesce(max(seq), 0) FROM inbound)) FROM pack_cursor)",
            [],
        )?;
        if compacted > 0 {
            tracing::info!(
                rows = compacted,
                "inbound log: compacted rows every pack has passed"
            );
        }
        Ok(a + b)
    }
}

/// Number of entries (once at start; then kept up to date in memory).
pub fn count_entries(conn: &Connection) -> Result<i64, StoreError> {
    let a: i64 = conn.query_row("SELECT count(*) FROM replay_log", [], |r| r.get(0))?;
    let b: i64 = conn.query_row("SELECT count(*) FROM replay_recent", [], |r| r.get(0))?;
    Ok(a + b)
}

pub struct ReplayLog {
    store: StoreHandle,
    retention: Duration,
    stats: Arc<AgentStats>,
    merging: bool,
}

impl ReplayLog {
    pub fn new(store: StoreHandle, retention: Duration, stats: Arc<AgentStats>) -> Self {
        ReplayLog {
            store,
            retention,
            stats,
            merging: false,
        }
    }

    fn prune(&mut self, ctx: &mut Context<Self>) {
        let cutoff = now_ms() - self.retention.as_millis() as i64;
        let store = self.store.clone();
        let stats = self.stats.clone();
        ctx.spawn(
            async move {
                match store.run(PruneOp { cutoff_ms: cutoff }).await {
                    Ok(n) if n > 0 => {
                        stats.replay_entries.fetch_sub(n as i64, Ordering::Relaxed);
                        tracing::info!(pruned = n, "replay log: pruned entries past retention");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "replay log: pruning failed; will retry"),
                }
            }
            .into_actor(self),
        );
    }

    fn merge(&mut self, ctx: &mut Context<Self>) {
        if self.merging {
            return;
        }
        self.merging = true;
        let store = self.store.clone();
        ctx.spawn(
            async move {
                store
                    .run(MergeOp {
                        threshold: MERGE_THRESHOLD,
                    })
                    .await
            }
            .into_actor(self)
            .map(|res, act, _| {
                act.merging = false;
                match res {
                    Ok(n) if n > 0 => {
                        tracing::debug!(merged = n, "replay log: merged recent entries")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "replay log: merge failed; will retry"),
                }
            }),
        );
    }
}

impl Actor for ReplayLog {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Self::Context) {
        self.merging = false;
        self.prune(ctx);
        ctx.run_interval(Duration::from_secs(3600), |act, ctx| act.prune(ctx));
        ctx.run_interval(Duration::from_secs(1), |act, ctx| act.merge(ctx));
    }
}

impl Supervised for ReplayLog {}

/// Which events has `pack` finished? (keys from [`event_key`])
pub struct Seen {
    pub pack: String,
    pub keys: Vec<String>,
}
impl Message for Seen {
    type Result = Result<Vec<bool>, StoreError>;
}
impl Handler<Seen> for ReplayLog {
    type Result = ResponseFuture<Result<Vec<bool>, StoreError>>;
    fn handle(&mut self, m: Seen, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        Box::pin(async move {
            store
                .run(SeenOp {
                    pack: m.pack,
                    keys: m.keys,
                })
                .await
        })
    }
}

/// `ctx.replayLog.put(key)`.
pub struct PutKey {
    pub pack: String,
    pub key: String,
}
impl Message for PutKey {
    type Result = Result<(), StoreError>;
}
impl Handler<PutKey> for ReplayLog {
    type Result = ResponseFuture<Result<(), StoreError>>;
    fn handle(&mut self, m: PutKey, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let stats = self.stats.clone();
        Box::pin(async move {
            let n = store
                .run(PutOp {
                    pack: m.pack,
                    key: handler_key(&m.key),
                })
                .await?;
            stats.replay_entries.fetch_add(n as i64, Ordering::Relaxed);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_see_both_levels_across_a_merge() {
        let mut c = Connection::open_in_memory().unwrap();
        crate::schema::migrate(&mut c).unwrap();
        let keys: Vec<String> = (0..10).map(|i| event_key(&format!("e{i}"))).collect();
        assert_eq!(record(&c, "p", &keys[..5]).unwrap(), 5);
        assert_eq!(
            record(&c, "p", &keys[..5]).unwrap(),
            0,
            "recording twice is idempotent"
        );
        assert!(contains(&c, "p", &keys[0]).unwrap());
        assert!(!contains(&c, "q", &keys[0]).unwrap(), "per pack");
        assert_eq!(
            MergeOp { threshold: 100 }.run(&c).unwrap(),
            0,
            "below threshold"
        );
        assert_eq!(MergeOp { threshold: 1 }.run(&c).unwrap(), 5);
        assert!(
            contains(&c, "p", &keys[4]).unwrap(),
            "visible after the merge"
        );
        record(&c, "p", &keys[3..]).unwrap();
        let seen = SeenOp {
            pack: "p".into(),
            keys: keys.clone(),
        }
        .run(&c)
        .unwrap();
        assert!(seen.iter().all(|s| *s));
        assert_eq!(
            count_entries(&c).unwrap(),
            12,
            "3 duplicates across levels until the next merge"
        );
        MergeOp { threshold: 1 }.run(&c).unwrap();
        assert_eq!(count_entries(&c).unwrap(), 10);
        assert!(
            !contains(&c, "p", &handler_key("e1")).unwrap(),
            "handler keys are a separate namespace"
        );
        assert_eq!(
            PruneOp {
                cutoff_ms: now_ms() + 1000
            }
            .run(&c)
            .unwrap(),
            10
        );
    }
}
