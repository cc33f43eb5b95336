//! `PackHost`: one per pack. Delivers the pack's events to its handlers, one at a time, in
//! arrival order (SPEC §6, §7); an exec pack with `runtime.concurrency: N` lets its worker run
//! up to N at once, and its outcomes are still committed in arrival order.
//!
//! Owns the pack's progress: its cursor over the inbound log, its in-memory queue, its
//! counters and its restart intensity.
//!
//! Guarantees:
//! - **At least once, in order.** Work comes from the durable inbound log; in-memory `Deliver`
//!   messages are only a fast path. On (re)start the host reloads everything after its cursor.
//! - **Replay dedupe.** An event already recorded for this pack is not delivered again (status
//!   `replayed`). Handled events are recorded in the same transaction that advances the cursor.
//! - **Crash containment.** A handler panic, an error, or a timeout is a crash: the host
//!   records an attempt for the event (persisted, so it survives an agent restart), stops, and
//!   its supervisor restarts it, redelivering the event. After `max_attempts` the event is
//!   dead-lettered and the pack goes on. More than `max_restarts` in `window` puts the pack in
//!   `crashed` with backoff; other packs are never affected.
//! - `retry` redelivers with backoff (same attempt budget); `failed` dead-letters at once.
//! - **Attempts across agent deaths.** The events handed to the handler are leased in SQLite
//!   (`pack_cursor.leased_to`, written with the chunk's lookups or the previous commit: no extra
//!   round trip). An agent that finds a lease was killed during it: one leased event counts an
//!   attempt (quarantined after `max_attempts`); several are delivered again one per commit
//!   (`careful_to`), so that the next stop leases exactly one.
//! - **Keyed handlers re-run little.** A handler that records its own replay keys guards its
//!   external effects with them, so its events are committed `runtime.concurrency` at a time
//!   (1 by default): a crash re-runs at most that many effects. Until a chunk shows otherwise a
//!   pack counts as keyed, so the first chunk after a start is bounded too.
//! - **Handler time, not agent time.** Timeouts are measured with `worker_clock`: an agent
//!   that was stopped does not time out a handler that answered meanwhile.
//! - A pack keeps its place in the inbound log while it is away; a kind it starts subscribing
//!   to starts from then (`sync_kinds`).

use crate::effects::{EffectStage, Tag};
use crate::exec_worker::{ExecWorker, ServicesFor, WorkerError};
use crate::queue::{insert_accepted, Accepted, Committed};
use crate::replay_log::{event_key, handler_key, record, seen, ReplayLog};
use crate::router::{Emitter, InboundRow};
use crate::stats::{AgentStats, PackState, PackStats};
use crate::store::{now_ms, StoreError, StoreHandle, StoreOp};
use crate::supervision::{backoff, Decision, RestartIntensity};
use crate::tap::{Stage, TapEvent};
use actix::prelude::*;
use lumenflow_pack_sdk::envelope::Incoming;
use lumenflow_pack_sdk::manifest::check_handlers;
use lumenflow_pack_sdk::native::{BoxFuture, HandlerCtx, NativePack, PackServices, ServiceError};
use lumenflow_pack_sdk::{Envelope, EventDraft, HandlerOutcome, Manifest, OutcomeStatus};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Events handled between two commits of the pack's progress, at most.
const CHUNK: usize = 256;
/// A chunk takes no new event after this long, so slow handlers still commit progress (and
/// their effects) often: a crash redelivers little.
const CHUNK_TIME: Duration = Duration::from_millis(20);
/// Events a chunk takes, and replay-log lookups a commit makes for the next chunks, when the
/// pack commits one event at a time (a keyed handler, or after an interrupted chunk). Such a
/// chunk handles one event: 256 lookups per commit (the plain `CHUNK`) made the quickstart's
/// handler pattern spend ~700 µs of agent CPU per event on lookups it mostly threw away.
const ONE_AT_A_TIME_AHEAD: usize = 16;
/// `handle` requests an exec worker has queued ahead of the one it is working on.
const EXEC_WINDOW: usize = 32;

/// Events handed to the handler before a commit, at most: 1 when `careful`, the pack's
/// `concurrency` when `keyed`, else `None` (the whole chunk). See [`ChunkRun::per_commit`].
fn per_commit(careful: bool, keyed: bool, concurrency: usize) -> Option<usize> {
    if careful {
        Some(1)
    } else {
        keyed.then_some(concurrency)
    }
}

/// Events a chunk takes, and replay-log lookups a commit makes for the next one: a whole
/// `CHUNK`, or a few beyond what one commit takes.
fn chunk_size(per_commit: Option<usize>) -> usize {
    per_commit.map_or(CHUNK, |n| ONE_AT_A_TIME_AHEAD.max(n))
}
/// Rows kept in memory; beyond that the host reads them from the inbound log when it gets there.
const MEMORY_QUEUE_MAX: usize = 10_000;

/// How a pack's handlers run.
#[derive(Clone)]
pub enum HandlerKind {
    /// Rust handlers registered through the library.
    Native(Box<NativePack>),
    /// `runtime.command` started in the pack folder (JSON-RPC over stdio).
    Exec { dir: PathBuf },
    /// A pack that only emits (no subscriptions, no runtime).
    EmitOnly,
}

#[derive(Debug, Clone)]
pub struct HostConfig {
    pub max_attempts: u32,
    pub max_restarts: u32,
    pub window: Duration,
    pub handler_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// Sent to exec workers in `initialize`.
    pub workspace: PathBuf,
    pub identity: String,
}

#[derive(Debug, Clone)]
struct Pending {
    seq: i64,
    envelope: Arc<Envelope>,
    attempts: u32,
    /// It may have been delivered before, by an agent that stopped while it was leased.
    redelivered: bool,
}

/// Which inbound rows (alias `i`, the pack as `?1`) are the pack's, besides their kind: every
/// row of a kind it subscribes to, except those logged before it subscribed to that kind (see
/// [`sync_kinds`]); a retried dead letter targeted at it, always.
const FOR_PACK: &str = "(i.target = ?1 OR (i.target IS NULL AND i.seq > coalesce((SELECT s.since_seq FROM pack_kind_since s WHERE s.pack = ?1 AND s.kind = i.kind), 0)))";

/// The `IN (...)` placeholders for `kinds`, and the arguments of a query over a pack's rows:
/// `?1` the pack, then `fixed` (`?2`, `?3`, ...), then the kinds. Shared by every such query.
fn pack_query<'a>(
    fixed: &[&'a dyn rusqlite::ToSql],
    kinds: &'a [String],
) -> (String, Vec<&'a dyn rusqlite::ToSql>) {
    let placeholders = vec!["?"; kinds.len()].join(",");
    let mut args = fixed.to_vec();
    args.extend(kinds.iter().map(|k| k as &dyn rusqlite::ToSql));
    (placeholders, args)
}

/// Records the kinds a pack subscribes to as it (re)starts. A kind it did not subscribe to
/// before starts from the end of the inbound log: the log keeps every event (for packs that
/// are away), but a new subscription takes the events that arrive from now on, as it always
/// did. Run before the routing table with the new kinds is published.
pub fn sync_kinds(conn: &Connection, pack: &str, kinds: &[String]) -> Result<(), StoreError> {
    let stored: Option<Option<String>> = conn
        .query_row(
            "SELECT kinds FROM pack_cursor WHERE pack = ?1",
            [pack],
            |r| r.get(0),
        )
        .optional()?;
    let Some(stored) = stored else {
        return Ok(()); // no cursor yet: it starts at the end of the log anyway
    };
    if let Some(before) = stored.and_then(|t| serde_json::from_str::<Vec<String>>(&t).ok()) {
        let added: Vec<&String> = kinds.iter().filter(|k| !before.contains(k)).collect();
        if !added.is_empty() {
            let end: i64 =
                conn.query_row("SELECT coalesce(max(seq), 0) FROM inbound", [], |r| {
                    r.get(0)
                })?;
            let mut stmt = conn.prepare_cached(
                "INSERT INTO pack_kind_since(pack, kind, since_seq) VALUES (?1, ?2, ?3)
                 ON CONFLICT(pack, kind) DO UPDATE SET since_seq = excluded.since_seq",
            )?;
            for k in added {
                stmt.execute(params![pack, k, end])?;
            }
        }
    }
    let text = serde_json::to_string(kinds).unwrap_or_else(|_| "[]".into());
    conn.prepare_cached("UPDATE pack_cursor SET kinds = ?2 WHERE pack = ?1")?
        .execute(params![pack, text])?;
    Ok(())
}

/// Reads the pack's cursor (creating it at the log's end for a new pack) and the rows after it.
struct LoadPending {
    pack: String,
    kinds: Vec<String>,
    limit: usize,
}

struct Loaded {
    cursor: i64,
    rows: Vec<(i64, String, u32)>,
    truncated: bool,
    /// The previous agent stopped while the rows up to this seq were leased (0: it did not).
    interrupted_to: i64,
    /// Several rows were leased: which of them was in flight is not known, so they are
    /// delivered one at a time, each committed before the next (see [`PackHost::careful_to`]).
    careful: bool,
}

impl StoreOp for LoadPending {
    type Output = Loaded;
    fn run(self, conn: &Connection) -> Result<Loaded, StoreError> {
        let found: Option<(i64, i64)> = conn
            .query_row(
                "SELECT cursor, leased_to FROM pack_cursor WHERE pack = ?1",
                [&self.pack],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let (mut interrupted_to, mut careful) = (0, false);
        let cursor = match found {
            Some((c, leased_to)) => {
                if leased_to > c && !self.kinds.is_empty() {
                    let leased =
                        count_interrupted_deliveries(conn, &self.pack, &self.kinds, c, leased_to)?;
                    interrupted_to = leased_to;
                    careful = leased > 1;
                }
                conn.prepare_cached(
                    "UPDATE pack_cursor SET leased_to = cursor, absent_since_ms = NULL WHERE pack = ?1",
                )?
                .execute([&self.pack])?;
                c
            }
            None => {
                // A new pack starts with the events that arrive from now on.
                let end: i64 =
                    conn.query_row("SELECT coalesce(max(seq), 0) FROM inbound", [], |r| {
                        r.get(0)
                    })?;
                conn.execute(
                    "INSERT INTO pack_cursor(pack, cursor) VALUES (?1, ?2)",
                    params![self.pack, end],
                )?;
                end
            }
        };
        if self.kinds.is_empty() {
            return Ok(Loaded {
                cursor,
                rows: Vec::new(),
                truncated: false,
                interrupted_to,
                careful,
            });
        }
        let (placeholders, args) = pack_query(&[&self.pack, &cursor], &self.kinds);
        let sql = format!(
            "SELECT i.seq, i.body, coalesce(a.attempts, 0) FROM inbound i
             LEFT JOIN attempts a ON a.pack = ?1 AND a.seq = i.seq
             WHERE i.seq > ?2 AND i.kind IN ({placeholders}) AND {FOR_PACK}
             ORDER BY i.seq LIMIT {}",
            self.limit + 1
        );
        let mut stmt = conn.prepare_cached(&sql)?;
        let mut rows: Vec<(i64, String, u32)> = stmt
            .query_map(args.as_slice(), |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let truncated = rows.len() > self.limit;
        rows.truncate(self.limit);
        Ok(Loaded {
            cursor,
            rows,
            truncated,
            interrupted_to,
            careful,
        })
    }
}

/// The rows in `(cursor, leased_to]` were handed to the pack's handler by an agent that then
/// stopped without finishing them (kill -9, power cut). Returns how many rows that is.
///
/// One row: it was the event in flight, and it counts one attempt (the next delivery says
/// `attempt: 2`; an event that takes the agent down with it every time reaches
/// `max_attempts` and is quarantined). Several rows (a chunk of a handler that does not record
/// its own keys): any of them may have been in flight, and blaming the first would quarantine
/// an innocent event, so none is counted; they are delivered again as `redelivered`, one at a
/// time with a commit after each, so that a second stop leases exactly one.
fn count_interrupted_deliveries(
    conn: &Connection,
    pack: &str,
    kinds: &[String],
    cursor: i64,
    leased_to: i64,
) -> Result<usize, StoreError> {
    let (placeholders, args) = pack_query(&[&pack, &cursor, &leased_to], kinds);
    let leased: Vec<i64> = conn
        .prepare(&format!(
            "SELECT i.seq FROM inbound i WHERE i.seq > ?2 AND i.seq <= ?3 AND i.kind IN ({placeholders}) AND {FOR_PACK} ORDER BY i.seq LIMIT 2"
        ))?
        .query_map(args.as_slice(), |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    if let [seq] = leased.as_slice() {
        conn.execute(
            "INSERT INTO attempts(pack, seq, attempts, last_error) VALUES (?1, ?2, 1, 'the agent stopped while the event was being handled')
             ON CONFLICT(pack, seq) DO UPDATE SET attempts = attempts + 1, last_error = excluded.last_error",
            params![pack, seq],
        )?;
        tracing::warn!(pack, seq, "the agent stopped while this event was being handled: it is delivered again, as a new attempt");
    } else if !leased.is_empty() {
        tracing::warn!(pack, "the agent stopped while a chunk of events was being handled: they are delivered again one at a time");
    }
    Ok(leased.len())
}

/// The replay-log lookups for a chunk about to start, and its lease: the chunk's events are
/// marked as handed to the handler (see [`count_interrupted_deliveries`]). One store round trip.
struct StartChunk {
    pack: String,
    keys: Vec<String>,
    leased_to: i64,
}

impl StoreOp for StartChunk {
    type Output = Vec<bool>;
    fn run(self, conn: &Connection) -> Result<Vec<bool>, StoreError> {
        conn.prepare_cached(
            "UPDATE pack_cursor SET leased_to = max(leased_to, ?2) WHERE pack = ?1",
        )?
        .execute(params![self.pack, self.leased_to])?;
        seen(conn, &self.pack, &self.keys)
    }
}

/// Ends the lease of a host that stops cleanly (drain, removal): nothing is in flight.
struct EndLease {
    pack: String,
}

impl StoreOp for EndLease {
    type Output = ();
    fn run(self, conn: &Connection) -> Result<(), StoreError> {
        conn.prepare_cached("UPDATE pack_cursor SET leased_to = cursor WHERE pack = ?1")?
            .execute([&self.pack])?;
        Ok(())
    }
}

/// An idle pack (nothing queued) moves its cursor to the end of the inbound log if no row after
/// its cursor is for it, so the log can be compacted past packs that get no traffic. Runs in
/// the Store's serialized transaction: a row for the pack committed but not yet dispatched
/// keeps the cursor where it is.
struct IdleCursor {
    pack: String,
    kinds: Vec<String>,
}

impl StoreOp for IdleCursor {
    type Output = Option<i64>;
    fn run(self, conn: &Connection) -> Result<Option<i64>, StoreError> {
        let cursor: i64 = conn
            .query_row(
                "SELECT cursor FROM pack_cursor WHERE pack = ?1",
                [&self.pack],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        let end: i64 = conn.query_row("SELECT coalesce(max(seq), 0) FROM inbound", [], |r| {
            r.get(0)
        })?;
        if end <= cursor {
            return Ok(None);
        }
        if !self.kinds.is_empty() {
            let (placeholders, args) = pack_query(&[&self.pack, &cursor], &self.kinds);
            let sql = format!(
                "SELECT 1 FROM inbound i WHERE i.seq > ?2 AND i.kind IN ({placeholders}) AND {FOR_PACK} LIMIT 1"
            );
            if conn.prepare_cached(&sql)?.exists(args.as_slice())? {
                return Ok(None);
            }
        }
        conn.execute(
            "UPDATE pack_cursor SET cursor = ?2 WHERE pack = ?1",
            params![self.pack, end],
        )?;
        Ok(Some(end))
    }
}

struct DeadLetter {
    seq: i64,
    envelope: Arc<Envelope>,
    attempts: u32,
    error: String,
}

/// Commits a chunk's progress atomically: replay records, dead letters, the cursor, and the
/// crash or retry of the event that stopped the chunk.
struct CompleteChunk {
    pack: String,
    records: Vec<String>,
    /// What the finished events' handlers emitted (see `effects`).
    emits: Vec<Accepted>,
    dead_letters: Vec<DeadLetter>,
    cursor: Option<i64>,
    cleared: Vec<i64>,
    /// (seq, envelope, error): the event that crashed or asked for a retry.
    stopped_at: Option<(i64, Arc<Envelope>, String)>,
    max_attempts: u32,
    /// The events expected next (seq, replay key): looked up in this transaction, after this
    /// chunk's records, so the next chunk needs no lookup of its own (one store round trip
    /// per chunk instead of two).
    lookahead: Vec<(i64, String)>,
    /// The next chunk delivers this many events before it commits (a keyed handler, or one at
    /// a time after an interrupted agent): lease only them. `None`: all of the lookahead.
    lease: Option<usize>,
    /// The pack's kinds, and the seqs this chunk went through (finished or replayed), in
    /// order: the cursor moves past no row of the pack that is not among them.
    kinds: Vec<String>,
    covered: Vec<i64>,
}

/// The first row of the pack in `(cursor, to]` that `covered` (sorted) does not hold: a row
/// committed to the inbound log that never reached the pack (its dispatch was lost). The
/// cursor must not pass it, or the event is skipped for good.
fn first_uncovered(
    conn: &Connection,
    pack: &str,
    kinds: &[String],
    to: i64,
    covered: &[i64],
) -> Result<Option<i64>, StoreError> {
    if kinds.is_empty() {
        return Ok(None);
    }
    let from: i64 = conn
        .prepare_cached("SELECT cursor FROM pack_cursor WHERE pack = ?1")?
        .query_row([pack], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    if to <= from {
        return Ok(None);
    }
    let (placeholders, args) = pack_query(&[&pack, &from, &to], kinds);
    let sql = format!(
        "SELECT i.seq FROM inbound i WHERE i.seq > ?2 AND i.seq <= ?3 AND i.kind IN ({placeholders}) AND {FOR_PACK} ORDER BY i.seq"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(args.as_slice())?;
    while let Some(row) = rows.next()? {
        let seq: i64 = row.get(0)?;
        if covered.binary_search(&seq).is_err() {
            return Ok(Some(seq));
        }
    }
    Ok(None)
}

/// Replay-log answers for upcoming events: (seq, already recorded).
type Prefetched = Vec<(i64, bool)>;

struct ChunkCommitted {
    recorded: usize,
    /// The handlers' emits, back from the transaction, with their inbound seqs.
    emits: Vec<Accepted>,
    seqs: Vec<Option<i64>>,
    next: Prefetched,
    /// Attempts of the stopping event after this one, and whether it was dead-lettered.
    stopped: Option<(u32, bool)>,
    /// A row of the pack the chunk's range skipped (see [`first_uncovered`]).
    gap: Option<i64>,
}

fn insert_dead_letter(conn: &Connection, pack: &str, d: &DeadLetter) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO dead_letters(pack, event_id, kind, attempts, error, created_ms, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![pack, d.envelope.event_id, d.envelope.kind, d.attempts, d.error, now_ms(), d.envelope.to_json()])?;
    conn.prepare_cached("DELETE FROM attempts WHERE pack = ?1 AND seq = ?2")?
        .execute(params![pack, d.seq])?;
    Ok(())
}

impl StoreOp for CompleteChunk {
    type Output = ChunkCommitted;
    fn run(self, conn: &Connection) -> Result<ChunkCommitted, StoreError> {
        let recorded = record(conn, &self.pack, &self.records)?;
        let seqs = insert_accepted(conn, &self.emits)?;
        for d in &self.dead_letters {
            insert_dead_letter(conn, &self.pack, d)?;
        }
        for seq in &self.cleared {
            conn.prepare_cached("DELETE FROM attempts WHERE pack = ?1 AND seq = ?2")?
                .execute(params![self.pack, seq])?;
        }
        let mut cursor = self.cursor;
        let mut covered = self.covered;
        let mut stopped = None;
        if let Some((seq, envelope, error)) = self.stopped_at {
            let attempts: u32 = conn.query_row(
                "INSERT INTO attempts(pack, seq, attempts, last_error) VALUES (?1, ?2, 1, ?3)
                 ON CONFLICT(pack, seq) DO UPDATE SET attempts = attempts + 1, last_error = excluded.last_error
                 RETURNING attempts",
                params![self.pack, seq, error],
                |r| r.get(0),
            )?;
            let dead = attempts >= self.max_attempts;
            if dead {
                let d = DeadLetter {
                    seq,
                    envelope,
                    attempts,
                    error: format!("{error} (after {attempts} attempts)"),
                };
                insert_dead_letter(conn, &self.pack, &d)?;
                cursor = Some(seq);
                if let Err(at) = covered.binary_search(&seq) {
                    covered.insert(at, seq);
                }
            }
            stopped = Some((attempts, dead));
        }
        let gap = match cursor {
            Some(to) => first_uncovered(conn, &self.pack, &self.kinds, to, &covered)?,
            None => None,
        };
        if let Some(missing) = gap {
            cursor = Some(missing - 1);
        }
        if let Some(c) = cursor {
            conn.prepare_cached("UPDATE pack_cursor SET cursor = max(cursor, ?2) WHERE pack = ?1")?
                .execute(params![self.pack, c])?;
        }
        // The lease moves on to the events the next chunk takes from the lookups below (none
        // after a crash or a retry: that chunk starts with its own `StartChunk`).
        let lease = if stopped.is_some() {
            None
        } else if let Some(n) = self.lease {
            self.lookahead.iter().take(n).map(|(seq, _)| *seq).max()
        } else {
            self.lookahead.iter().map(|(seq, _)| *seq).max()
        };
        conn.prepare_cached(
            "UPDATE pack_cursor SET leased_to = coalesce(?2, cursor) WHERE pack = ?1",
        )?
        .execute(params![self.pack, lease])?;
        let next = if stopped.is_some() || self.lookahead.is_empty() {
            Vec::new()
        } else {
            let keys: Vec<&str> = self.lookahead.iter().map(|(_, k)| k.as_str()).collect();
            let found = seen(conn, &self.pack, &keys)?;
            self.lookahead
                .iter()
                .map(|(seq, _)| *seq)
                .zip(found)
                .collect()
        };
        Ok(ChunkCommitted {
            recorded,
            emits: self.emits,
            seqs,
            next,
            stopped,
            gap,
        })
    }
}

/// Why a delivery did not produce an outcome.
#[derive(Debug, Clone)]
enum Crash {
    Panic(String),
    Timeout(Duration),
    Worker(WorkerError),
}

impl std::fmt::Display for Crash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Crash::Panic(m) => write!(f, "handler panicked: {m}"),
            Crash::Timeout(d) => write!(f, "handler timed out after {} ms", d.as_millis()),
            Crash::Worker(WorkerError::Timeout { ms, .. }) => {
                write!(f, "handler timed out after {ms} ms")
            }
            Crash::Worker(e) => write!(f, "{e}"),
        }
    }
}

#[derive(Default)]
struct ChunkResult {
    /// Dead-lettered events: (event_id, kind, error, attempts), for `agent:` events.
    dead: Vec<(String, String, String, u32)>,
    /// Number of queue entries finished (popped), and their statuses for the counters.
    finished: usize,
    statuses: Vec<OutcomeStatus>,
    dead_lettered: usize,
    /// A handler recorded its own replay key.
    keyed: bool,
    /// Replay-log answers for the events after this chunk.
    next_seen: Prefetched,
    /// The event that stopped the chunk: crash or retry, with attempts after it.
    crash: Option<(String, u32, bool)>,
    retry: Option<(u32, bool)>,
    cursor: Option<i64>,
    /// The commit found a row of the pack this chunk never saw (see [`first_uncovered`]).
    gap: Option<i64>,
    recorded: usize,
    commit_error: Option<StoreError>,
}

/// What the agent offers this pack's handlers. With a `tag` (a call made while handling an
/// event) emits and keys are staged and committed with the event's outcome; without one
/// (e.g. a worker's `onStart`) they are committed at once.
struct HostShared {
    pack: String,
    /// `replayLog.has` reads here directly (a reader beside the writer: no hop through the
    /// ReplayLog actor and the Store's thread, no wait behind its group commits).
    store: StoreHandle,
    replay: Addr<ReplayLog>,
    emitter: Emitter,
    agent: Arc<AgentStats>,
    stage: Arc<EffectStage>,
}

#[derive(Clone)]
struct HostServices {
    shared: Arc<HostShared>,
    tag: Option<Tag>,
}

impl HostServices {
    fn for_delivery(&self, tag: Tag) -> Arc<dyn PackServices> {
        Arc::new(HostServices {
            shared: self.shared.clone(),
            tag: Some(tag),
        })
    }
}

fn emit_error(e: crate::router::EmitError) -> ServiceError {
    match e {
        crate::router::EmitError::Rejected { message, .. } => ServiceError::Rejected(message),
        crate::router::EmitError::Queue(
            crate::queue::QueueError::Backpressure { retry_after_s, .. }
            | crate::queue::QueueError::HeldFull { retry_after_s, .. },
        ) => ServiceError::Backpressure {
            retry_after_ms: retry_after_s * 1000,
        },
        e => ServiceError::Unavailable(e.to_string()),
    }
}

fn unavailable<E: std::fmt::Display>(e: E) -> ServiceError {
    ServiceError::Unavailable(e.to_string())
}

impl PackServices for HostServices {
    fn replay_has(&self, key: String) -> BoxFuture<Result<bool, ServiceError>> {
        let store = self.shared.store.clone();
        let pack = self.shared.pack.clone();
        let staged = match self.tag {
            Some(tag) => self.shared.stage.has(tag, &key),
            None => Ok(false),
        };
        Box::pin(async move {
            if staged? {
                return Ok(true);
            }
            // Committed keys: this pack's earlier chunks committed before this one started.
            let op = crate::replay_log::SeenOp {
                pack,
                keys: vec![crate::replay_log::handler_key(&key)],
            };
            store
                .read(op)
                .await
                .map(|v| v.first().copied().unwrap_or(false))
                .map_err(unavailable)
        })
    }
    fn replay_put(&self, key: String) -> BoxFuture<Result<(), ServiceError>> {
        if let Some(tag) = self.tag {
            let staged = self.shared.stage.put(tag, key);
            return Box::pin(async move { staged });
        }
        let replay = self.shared.replay.clone();
        let pack = self.shared.pack.clone();
        Box::pin(async move {
            replay
                .send(crate::replay_log::PutKey { pack, key })
                .await
                .map_err(unavailable)?
                .map_err(unavailable)
        })
    }
    fn emit(&self, draft: EventDraft) -> BoxFuture<Result<String, ServiceError>> {
        if let Some(tag) = self.tag {
            let staged = self.stage_emit(tag, draft);
            return Box::pin(async move { staged });
        }
        let emitter = self.shared.emitter.clone();
        let pack = self.shared.pack.clone();
        Box::pin(async move {
            let mut ids = emitter
                .emit(Some(&pack), vec![Incoming::Draft(draft)])
                .await
                .map_err(emit_error)?;
            ids.pop()
                .ok_or_else(|| ServiceError::Unavailable("no id".into()))
        })
    }
}

impl HostServices {
    /// Checks the event now (the handler learns of a bad kind at once) and stages it.
    fn stage_emit(&self, tag: Tag, draft: EventDraft) -> Result<String, ServiceError> {
        let events = self
            .shared
            .emitter
            .prepare(Some(&self.shared.pack), vec![Incoming::Draft(draft)])
            .map_err(emit_error)
            .inspect_err(|e| {
                if let ServiceError::Rejected(m) = e {
                    self.shared.stage.refuse(tag, m);
                }
            })?;
        let queued = events.iter().filter(|e| e.to_outbox()).count() as i64;
        let waiting = self
            .shared
            .agent
            .queue
            .durable_depth
            .load(Ordering::Acquire)
            + self.shared.stage.queued();
        crate::queue::check_depth(&self.shared.agent, waiting, queued)
            .map_err(|e| emit_error(crate::router::EmitError::Queue(e)))?;
        let id = events
            .first()
            .map(|e| e.envelope.event_id.clone())
            .ok_or_else(|| ServiceError::Unavailable("no id".into()))?;
        // Over the stage's bounds: as deterministic as a kind the manifest refuses.
        self.shared.stage.emit(tag, events).inspect_err(|e| {
            if let ServiceError::Rejected(m) = e {
                self.shared.stage.refuse(tag, m);
            }
        })?;
        Ok(id)
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}

/// Runs one native handler call. A panic, in the handler's synchronous part or while its
/// future is polled, is caught here and becomes a crash; it never reaches the actor. The first
/// poll happens at once: a handler that finishes without waiting (most do) costs no task and
/// no timer; one that waits is given `timeout` from then on.
async fn call_native(
    pack: &NativePack,
    envelope: Arc<Envelope>,
    ctx: HandlerCtx,
    timeout: Duration,
) -> Result<HandlerOutcome, Crash> {
    use futures_util::FutureExt;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::task::Poll;
    let Some(handler) = pack.handlers.get(&envelope.kind) else {
        return Ok(HandlerOutcome::ignored("no-handler"));
    };
    let fut = catch_unwind(AssertUnwindSafe(|| handler(envelope, ctx)))
        .map_err(|p| Crash::Panic(panic_message(p)))?;
    let mut fut = std::pin::pin!(AssertUnwindSafe(fut).catch_unwind());
    let first =
        std::future::poll_fn(|cx| Poll::Ready(std::future::Future::poll(fut.as_mut(), cx))).await;
    let done = match first {
        Poll::Ready(r) => r,
        // The handler's own time: a stalled agent does not time it out (see `worker_clock`).
        Poll::Pending => match crate::worker_clock::timeout(timeout, fut).await {
            Ok(r) => r,
            // Dropping the future cancels the handler.
            Err(_) => return Err(Crash::Timeout(timeout)),
        },
    };
    done.map_err(|p| Crash::Panic(panic_message(p)))
}

/// What one chunk's deliveries produced, for its commit.
#[derive(Default)]
struct Progress {
    records: Vec<String>,
    dead_letters: Vec<DeadLetter>,
    /// Events whose attempt count is cleared (they finished after earlier attempts).
    cleared: Vec<i64>,
    /// (seq, envelope, error): the event that crashed or asked for a retry.
    stopped_at: Option<(i64, Arc<Envelope>, String)>,
    finished: HashSet<i64>,
}

/// One chunk of a pack's events, in three steps: [`ChunkRun::start`] (replay lookups and the
/// lease, unless the last commit brought them), [`ChunkRun::deliver`] (each event to the
/// handler, in order; exec requests pipelined), [`ChunkRun::commit`] (outcomes, effects and
/// cursor in one transaction). Runs detached from the host's context, so it owns what it needs.
struct ChunkRun {
    pack: String,
    store: StoreHandle,
    handler: HandlerKind,
    worker: Option<Arc<ExecWorker>>,
    timeout: Duration,
    max_attempts: u32,
    services: HostServices,
    stage: Arc<EffectStage>,
    agent: Arc<AgentStats>,
    router: Addr<crate::router::Router>,
    queue: Addr<crate::queue::DurableQueue>,
    /// Exec `handle` requests in flight ahead of the outcome awaited (`per_commit` when set).
    window: usize,
    /// Events handed to the handler before the next commit, at most: 1 when `careful` (events
    /// an interrupted agent had leased together), the pack's `runtime.concurrency` for a keyed
    /// handler (its effects guarded by its own keys: a crash re-runs at most that many); `None`:
    /// the whole chunk.
    per_commit: Option<usize>,
    /// One event per commit (events an interrupted agent had leased together).
    careful: bool,
    /// The pack's `runtime.concurrency`.
    concurrency: usize,
    kinds: Vec<String>,
}

impl ChunkRun {
    /// Looks the chunk's events up in the replay log and leases them (see
    /// [`count_interrupted_deliveries`]): one store round trip.
    async fn start(&self, chunk: &[Pending], keys: &[String]) -> Result<Vec<bool>, StoreError> {
        // A keyed handler gets `per_commit` events before the next commit; others all of them.
        let leased_to = match self.per_commit {
            Some(n) => chunk[..n.min(chunk.len())].last(),
            None => chunk.last(),
        };
        let op = StartChunk {
            pack: self.pack.clone(),
            keys: keys.to_vec(),
            leased_to: leased_to.map(|p| p.seq).unwrap_or(0),
        };
        self.store.run(op).await
    }

    /// Hands the events to the handler, in order, until the chunk is done, a crash or retry
    /// stops it, or it has run for `CHUNK_TIME` (a keyed handler: after one event).
    async fn deliver(
        &self,
        chunk: &[Pending],
        keys: &[String],
        seen: &[bool],
        r: &mut ChunkResult,
    ) -> Progress {
        let started = Instant::now();
        let chunk_no = self.stage.open();
        let tag = |p: &Pending| Tag {
            chunk: chunk_no,
            seq: p.seq,
        };
        let mut done = Progress::default();
        // `fresh[i]`: the event goes to the handler (not seen, not a repeat within the chunk).
        let fresh: Vec<bool> = {
            let mut first_seen: HashSet<&str> = HashSet::new();
            (0..chunk.len())
                .map(|i| !seen[i] && first_seen.insert(keys[i].as_str()))
                .collect()
        };
        let exec = match (&self.handler, &self.worker) {
            (HandlerKind::Exec { .. }, Some(w)) => Some(w.clone()),
            _ => None,
        };
        // Exec packs: handle requests are pipelined, `window` ahead of the outcome being
        // waited for (the worker handles them one at a time, in order).
        let mut sent = VecDeque::new();
        let mut next_send = 0;
        // Past CHUNK_TIME the chunk takes no new event (exec: sends no new request).
        let mut limit = self.per_commit.map_or(chunk.len(), |n| n.min(chunk.len()));
        let full = limit;
        for (i, p) in chunk.iter().enumerate() {
            if i >= limit {
                break;
            }
            if let Some(w) = &exec {
                while next_send < limit && sent.len() < self.window {
                    let q = &chunk[next_send];
                    // A quarantined event (below) is never sent.
                    if fresh[next_send] && q.attempts < self.max_attempts {
                        sent.push_back((
                            next_send,
                            w.send_handle(&q.envelope, q.attempts + 1, q.redelivered, tag(q)),
                        ));
                    }
                    next_send += 1;
                }
            }
            // Not fresh: recorded already, or a repeat of an event earlier in this chunk.
            if !fresh[i] {
                r.statuses.push(OutcomeStatus::Replayed);
                r.finished += 1;
                r.cursor = Some(p.seq);
                continue;
            }
            // Delivered `max_attempts` times already without an outcome (each time the agent
            // stopped while it was being handled): quarantined, so one event that takes the
            // agent down cannot do so forever.
            let outcome = if p.attempts >= self.max_attempts {
                Ok(HandlerOutcome {
                    status: OutcomeStatus::Failed,
                    action: Some(format!(
                        "delivered {} times without an outcome (the agent stopped while handling it each time)",
                        p.attempts
                    )),
                })
            } else {
                let outcome = self.outcome(p, i, tag(p), exec.as_deref(), &mut sent).await;
                self.deterministic_failure(p.seq, outcome)
            };
            if !self.settle(p, &keys[i], outcome, &mut done, r) {
                break;
            }
            done.finished.insert(p.seq);
            r.finished += 1;
            r.cursor = Some(p.seq);
            let keyed = self.stage.keyed(p.seq);
            r.keyed |= keyed;
            if limit == full && (keyed || self.careful || started.elapsed() >= CHUNK_TIME) {
                // Requests already sent are answered first; the worker is working on them.
                limit = next_send.max(i + 1);
            }
        }
        done
    }

    /// A handler that crashed after the manifest refused one of its emits (`Unknown kind at
    /// emit: …`) would crash the same way at every redelivery: it is dead-lettered now, with
    /// the refusal as the reason and without the attempt's effects, instead of being retried
    /// `max_attempts` times as a crash (restarting the worker each time).
    fn deterministic_failure(
        &self,
        seq: i64,
        outcome: Result<HandlerOutcome, Crash>,
    ) -> Result<HandlerOutcome, Crash> {
        match outcome {
            Err(crash) => match self.stage.refusal(seq) {
                Some(refused) => {
                    self.stage.discard(seq);
                    tracing::warn!(pack = %self.pack, crash = %crash, "the handler failed after an emit its manifest refuses: dead-lettered now (it would fail the same way every time)");
                    Ok(HandlerOutcome {
                        status: OutcomeStatus::Failed,
                        action: Some(format!("an emit was refused: {refused}")),
                    })
                }
                None => Err(crash),
            },
            ok => ok,
        }
    }

    /// Runs event `i` (`p`) through the handler: a native call, or the exec reply to the
    /// request sent for it.
    async fn outcome(
        &self,
        p: &Pending,
        i: usize,
        tag: Tag,
        exec: Option<&ExecWorker>,
        sent: &mut VecDeque<(
            usize,
            tokio::sync::oneshot::Receiver<Result<serde_json::Value, WorkerError>>,
        )>,
    ) -> Result<HandlerOutcome, Crash> {
        let not_running = || Err(Crash::Worker(WorkerError::Exited("not running".into())));
        match (&self.handler, exec) {
            (HandlerKind::Native(np), _) => {
                let ctx = HandlerCtx::new(
                    self.pack.clone(),
                    p.attempts + 1,
                    self.services.for_delivery(tag),
                );
                call_native(np, p.envelope.clone(), ctx, self.timeout).await
            }
            (HandlerKind::Exec { .. }, Some(w)) => match sent.pop_front() {
                Some((j, rx)) if j == i => w.outcome(rx, self.timeout).await.map_err(Crash::Worker),
                _ => not_running(),
            },
            (HandlerKind::Exec { .. }, None) => not_running(),
            (HandlerKind::EmitOnly, _) => Ok(HandlerOutcome::ignored("no-handler")),
        }
    }

    /// Books one outcome. `false`: the chunk stops here (a crash, or a retry).
    fn settle(
        &self,
        p: &Pending,
        key: &str,
        outcome: Result<HandlerOutcome, Crash>,
        done: &mut Progress,
        r: &mut ChunkResult,
    ) -> bool {
        let attempt = p.attempts + 1;
        match outcome {
            Err(crash) => {
                done.stopped_at = Some((p.seq, p.envelope.clone(), crash.to_string()));
                r.crash = Some((crash.to_string(), 0, false));
                false
            }
            Ok(o) if o.status == OutcomeStatus::Retry => {
                let why = format!("handler asked to retry: {}", o.action.unwrap_or_default());
                done.stopped_at = Some((p.seq, p.envelope.clone(), why));
                r.retry = Some((0, false));
                false
            }
            Ok(o) if o.status == OutcomeStatus::Failed => {
                let error = format!("handler failed: {}", o.action.unwrap_or_default());
                r.dead.push((
                    p.envelope.event_id.clone(),
                    p.envelope.kind.clone(),
                    error.clone(),
                    attempt,
                ));
                done.dead_letters.push(DeadLetter {
                    seq: p.seq,
                    envelope: p.envelope.clone(),
                    attempts: attempt,
                    error,
                });
                r.dead_lettered += 1;
                r.statuses.push(OutcomeStatus::Failed);
                true
            }
            Ok(o) => {
                done.records.push(key.to_string());
                if p.attempts > 0 {
                    done.cleared.push(p.seq);
                }
                r.statuses.push(o.status);
                true
            }
        }
    }

    /// Commits the chunk: the finished events' records, their staged effects, dead letters,
    /// the cursor and the stopping event's attempt, with the next chunk's lookups and lease.
    async fn commit(
        self,
        chunk: &[Pending],
        keys: &[String],
        ahead: Vec<(i64, String)>,
        done: Progress,
        mut r: ChunkResult,
    ) -> ChunkResult {
        // A chunk stopped by a crash or a retry may leave requests queued at the worker:
        // their replies are ignored, their staged effects dropped (their tags are stale
        // once the stage closes), and the events are sent again with the next chunk.
        let staged = self.stage.close(&done.finished);
        let mut records = done.records;
        records.extend(staged.puts.iter().map(|k| handler_key(k)));
        let emits = staged.emits;
        let queued = emits.iter().filter(|e| e.to_outbox()).count() as i64;
        // Counted before the commit: the upstream may deliver (and count off) these rows
        // as soon as they are committed.
        self.agent
            .queue
            .durable_depth
            .fetch_add(queued, Ordering::AcqRel);
        // The next chunk starts where this one stopped: its unfinished events, then `ahead`.
        let next_per_commit = per_commit(self.careful, r.keyed, self.concurrency);
        let lookahead: Vec<(i64, String)> = if done.stopped_at.is_some() {
            Vec::new()
        } else {
            chunk[r.finished..]
                .iter()
                .zip(&keys[r.finished..])
                .map(|(p, k)| (p.seq, k.clone()))
                .chain(ahead)
                .take(chunk_size(next_per_commit))
                .collect()
        };
        let op = CompleteChunk {
            pack: self.pack,
            records,
            emits,
            dead_letters: done.dead_letters,
            cursor: r.cursor,
            cleared: done.cleared,
            stopped_at: done.stopped_at,
            max_attempts: self.max_attempts,
            lookahead,
            lease: next_per_commit,
            kinds: self.kinds,
            covered: chunk[..r.finished].iter().map(|p| p.seq).collect(),
        };
        let router = self.router;
        let hook = move |c: &ChunkCommitted| {
            if !c.emits.is_empty() {
                crate::queue::dispatch_when_committed(router, &c.emits)(&c.seqs);
            }
        };
        match self.store.run_then(op, Some(Box::new(hook))).await {
            Ok(c) => {
                r.recorded = c.recorded;
                r.next_seen = c.next;
                r.gap = c.gap;
                if !c.emits.is_empty() {
                    self.queue.do_send(Committed { events: c.emits });
                }
                if let (Some((attempts, true)), Some(p)) = (c.stopped, chunk.get(r.finished)) {
                    let error = r
                        .crash
                        .as_ref()
                        .map(|c| c.0.clone())
                        .unwrap_or_else(|| "handler asked to retry".into());
                    r.dead.push((
                        p.envelope.event_id.clone(),
                        p.envelope.kind.clone(),
                        error,
                        attempts,
                    ));
                }
                if let Some((attempts, dead)) = c.stopped {
                    if let Some(crash) = &mut r.crash {
                        crash.1 = attempts;
                        crash.2 = dead;
                    }
                    if let Some(retry) = &mut r.retry {
                        *retry = (attempts, dead);
                    }
                }
            }
            Err(e) => {
                crate::queue::release_depth(&self.agent, queued);
                r.commit_error = Some(e);
            }
        }
        r
    }
}

pub struct PackHost {
    id: String,
    manifest: Arc<Manifest>,
    handler: HandlerKind,
    cfg: HostConfig,
    store: StoreHandle,
    replay: Addr<ReplayLog>,
    emitter: Emitter,
    stats: Arc<PackStats>,
    agent: Arc<AgentStats>,
    queue: VecDeque<Pending>,
    cursor: i64,
    high_water: i64,
    loaded: bool,
    overflow: bool,
    early: Vec<InboundRow>,
    busy: Arc<AtomicBool>,
    paused: bool,
    intensity: RestartIntensity,
    healthy_since: Instant,
    worker: Option<Arc<ExecWorker>>,
    /// The pack cannot run as configured (e.g. `Missing handler`); waits for a new manifest.
    invalid: bool,
    /// Last time the idle cursor advance ran.
    idle_checked: Option<Instant>,
    /// Effects of the chunk in progress.
    stage: Arc<EffectStage>,
    /// Replay-log answers for the next events, from the last chunk's commit.
    prefetched: Option<Prefetched>,
    /// The last chunk ended with a `retry`: tell the exec worker to `resume` before sending it
    /// the held events again.
    resume: bool,
    /// The handlers record their own replay keys (guarding effects outside the agent): each
    /// event is committed before the next one starts, so a crash repeats at most one effect.
    keyed: bool,
    /// Events up to this seq were leased together by an agent that stopped: they are delivered
    /// one at a time, each committed before the next, so that another stop leases exactly the
    /// one in flight (and counts its attempt).
    careful_to: i64,
    /// The last row a commit found skipped (see [`first_uncovered`]).
    last_gap: Option<i64>,
}

impl PackHost {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        manifest: Arc<Manifest>,
        handler: HandlerKind,
        cfg: HostConfig,
        store: StoreHandle,
        replay: Addr<ReplayLog>,
        emitter: Emitter,
        agent: Arc<AgentStats>,
    ) -> Self {
        let stats = agent.pack(&manifest.id);
        stats.set_manifest(&manifest.version, &manifest.hash);
        stats.set_state(running_state(&handler));
        let intensity = RestartIntensity::new(cfg.max_restarts, cfg.window)
            .with_backoff(cfg.backoff_base, cfg.backoff_cap);
        PackHost {
            id: manifest.id.clone(),
            manifest,
            handler,
            cfg,
            store,
            replay,
            emitter,
            stats,
            agent,
            queue: VecDeque::new(),
            cursor: 0,
            high_water: 0,
            loaded: false,
            overflow: false,
            early: Vec::new(),
            busy: Arc::new(AtomicBool::new(false)),
            paused: false,
            intensity,
            healthy_since: Instant::now(),
            worker: None,
            invalid: false,
            idle_checked: None,
            stage: Arc::new(EffectStage::default()),
            prefetched: None,
            resume: false,
            // Assumed until a chunk shows otherwise (a chunk that finishes events without a
            // key of their own): the first chunk after a start would otherwise send a keyed
            // handler a whole window of events before its first commit, and a kill then re-ran
            // all their effects.
            keyed: true,
            careful_to: 0,
            last_gap: None,
        }
    }

    /// When idle, at most every 5 s: move the cursor past rows that are not for this pack.
    fn advance_when_idle(&mut self, ctx: &mut Context<Self>) {
        let due = self
            .idle_checked
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5));
        if !due
            || !self.loaded
            || self.overflow
            || !self.queue.is_empty()
            || self.busy.load(Ordering::Acquire)
        {
            return;
        }
        self.idle_checked = Some(Instant::now());
        let op = IdleCursor {
            pack: self.id.clone(),
            kinds: self.manifest.subscribed_event_kinds.clone(),
        };
        let store = self.store.clone();
        ctx.spawn(
            async move { store.run(op).await }
                .into_actor(self)
                .map(|res, act, _| {
                    if let Ok(Some(end)) = res {
                        act.cursor = act.cursor.max(end);
                        act.high_water = act.high_water.max(end);
                    }
                }),
        );
    }

    /// The pack's `runtime.concurrency` (1 without a runtime).
    fn concurrency(&self) -> usize {
        self.manifest
            .runtime
            .as_ref()
            .map_or(1, |r| r.concurrency as usize)
    }

    fn services(&self) -> HostServices {
        HostServices {
            shared: Arc::new(HostShared {
                pack: self.id.clone(),
                store: self.store.clone(),
                replay: self.replay.clone(),
                emitter: self.emitter.clone(),
                agent: self.agent.clone(),
                stage: self.stage.clone(),
            }),
            tag: None,
        }
    }

    /// Starts the exec worker and checks its handshake, then loads the pending events.
    fn start_worker(&mut self, dir: PathBuf, ctx: &mut Context<Self>) {
        let base = self.services();
        let services: ServicesFor = Arc::new(move |tag| match tag {
            Some(tag) => base.for_delivery(tag),
            None => Arc::new(base.clone()),
        });
        let scopes = crate::sandbox::scopes_of(&self.manifest, &self.cfg.workspace);
        self.stats
            .set_sandbox(Some(crate::sandbox::describe(scopes.as_ref())));
        let worker = match ExecWorker::spawn(&self.manifest, &dir, &self.cfg.workspace, services) {
            Ok(w) => Arc::new(w),
            Err(WorkerError::Unenforceable(why)) => {
                // Deterministic: restarting cannot help. Fixed by editing the manifest.
                tracing::error!(pack = %self.id, "{why}");
                self.invalid = true;
                self.stats.set_state(PackState::Invalid);
                self.stats.set_last_error(Some(why));
                return;
            }
            Err(e) => {
                tracing::error!(pack = %self.id, error = %e, "cannot start the pack's worker");
                self.crashed(e.to_string(), ctx);
                return;
            }
        };
        tracing::info!(pack = %self.id, pid = worker.pid().unwrap_or(0), command = %self.manifest.runtime.as_ref().map(|r| r.command.join(" ")).unwrap_or_default(), "worker started");
        self.worker = Some(worker.clone());
        self.watch_worker_exit(&worker, ctx);
        let manifest = self.manifest.clone();
        let (root, identity) = (self.cfg.workspace.clone(), self.cfg.identity.clone());
        // The handshake may include a build (e.g. `cargo run`): a pack's own runtime.timeout_ms
        // governs it; otherwise at most 30 s.
        let timeout = match self.manifest.runtime.as_ref().and_then(|r| r.timeout_ms) {
            Some(ms) => Duration::from_millis(ms),
            None => self.timeout().min(Duration::from_secs(30)),
        };
        let fut = async move {
            worker
                .initialize(&manifest, &root, &identity, timeout)
                .await
        };
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| match res {
            Ok(handles) => {
                let file = format!("{}/manifest", dir.display());
                let missing = check_handlers(&act.manifest, &handles, &file);
                if let Some(first) = missing.first() {
                    for d in &missing {
                        tracing::error!(pack = %act.id, "{}", d.message);
                    }
                    act.invalid = true;
                    act.stats.set_state(PackState::Invalid);
                    act.stats.set_last_error(Some(first.message.clone()));
                    if let Some(w) = act.worker.take() {
                        w.kill();
                    }
                    return;
                }
                act.reload(ctx);
            }
            Err(e) => {
                let why = format!("worker failed its initialize handshake: {e}");
                tracing::error!(pack = %act.id, "{why}");
                act.crashed(why, ctx);
            }
        }));
    }

    /// A worker that exits while no chunk is running is a crash now, not at the next event
    /// (`status` must not say `running` for a dead worker). During a chunk, the chunk's own
    /// requests fail and report it.
    fn watch_worker_exit(&mut self, worker: &ExecWorker, ctx: &mut Context<Self>) {
        let pid = worker.pid();
        ctx.spawn(
            worker
                .exited()
                .into_actor(self)
                .map(move |detail, act, ctx| {
                    let current = act.worker.as_ref().is_some_and(|w| w.pid() == pid);
                    if current && !act.busy.load(Ordering::Acquire) {
                        act.worker = None;
                        act.crashed(format!("worker exited ({detail})"), ctx);
                    }
                }),
        );
    }

    fn timeout(&self) -> Duration {
        self.manifest
            .runtime
            .as_ref()
            .and_then(|r| r.timeout_ms)
            .map(Duration::from_millis)
            .unwrap_or(self.cfg.handler_timeout)
    }

    fn reload(&mut self, ctx: &mut Context<Self>) {
        self.prefetched = None;
        self.loaded = false;
        self.overflow = false;
        self.queue.clear();
        let op = LoadPending {
            pack: self.id.clone(),
            kinds: self.manifest.subscribed_event_kinds.clone(),
            limit: MEMORY_QUEUE_MAX,
        };
        let store = self.store.clone();
        ctx.spawn(async move { store.run(op).await }.into_actor(self).map(|res, act, ctx| match res {
            Ok(loaded) => {
                act.cursor = loaded.cursor;
                act.high_water = act.high_water.max(loaded.cursor);
                if loaded.careful {
                    act.careful_to = act.careful_to.max(loaded.interrupted_to);
                }
                for (seq, body, attempts) in loaded.rows {
                    match Envelope::parse(body.as_bytes()) {
                        Ok(env) => {
                            act.high_water = act.high_water.max(seq);
                            let redelivered = seq <= loaded.interrupted_to;
                            act.queue.push_back(Pending { seq, envelope: Arc::new(env), attempts, redelivered });
                        }
                        Err(e) => tracing::error!(pack = %act.id, seq, error = %e, "unreadable inbound row skipped"),
                    }
                }
                act.overflow = loaded.truncated;
                act.loaded = true;
                if act.stats.state() == PackState::Restarting {
                    act.stats.set_state(PackState::Running);
                }
                let early = std::mem::take(&mut act.early);
                act.accept_rows(early);
                act.stats.pending.store(act.queue.len() as i64, Ordering::Relaxed);
                act.pump(ctx);
            }
            Err(e) => {
                tracing::error!(pack = %act.id, error = %e, "cannot load pending events; retrying in 1 s");
                act.stats.set_last_error(Some(format!("cannot load pending events: {e}")));
                ctx.run_later(Duration::from_secs(1), |act, ctx| act.reload(ctx));
            }
        }));
    }

    fn accept_rows(&mut self, rows: Vec<InboundRow>) {
        for row in rows {
            if row.seq <= self.high_water {
                // Already queued or loaded from the log, unless rows arrived out of order:
                // then fall back to the log, which is the truth.
                let known = row.seq <= self.cursor
                    || self.queue.binary_search_by_key(&row.seq, |p| p.seq).is_ok();
                if !known {
                    tracing::warn!(pack = %self.id, seq = row.seq, "row arrived out of order; reloading from the inbound log");
                    self.overflow = true;
                }
                continue;
            }
            if self.overflow || self.queue.len() >= MEMORY_QUEUE_MAX {
                // Durable already: read it from the log when the queue drains.
                self.overflow = true;
                continue;
            }
            self.high_water = row.seq;
            self.queue.push_back(Pending {
                seq: row.seq,
                envelope: row.envelope,
                attempts: 0,
                redelivered: false,
            });
        }
        self.stats
            .pending
            .store(self.queue.len() as i64, Ordering::Relaxed);
    }

    fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.busy.load(Ordering::Acquire) || self.paused || !self.loaded || self.invalid {
            return;
        }
        if self.queue.is_empty() {
            if self.overflow {
                self.reload(ctx);
            } else {
                self.advance_when_idle(ctx);
            }
            return;
        }
        self.busy.store(true, Ordering::Release);
        // Events an interrupted agent had leased together go one per commit (`careful_to`).
        let careful = self.queue.front().is_some_and(|p| p.seq <= self.careful_to);
        let size = chunk_size(per_commit(careful, self.keyed, self.concurrency()));
        let mut chunk: Vec<Pending> = self.queue.iter().take(size).cloned().collect();
        let ahead: Vec<(i64, String)> = self
            .queue
            .iter()
            .skip(chunk.len())
            .take(size)
            .map(|p| (p.seq, event_key(&p.envelope.event_id)))
            .collect();
        // Use the last commit's lookups for as many leading events as they cover.
        let known: Vec<bool> = match self.prefetched.take() {
            Some(pre) => pre
                .iter()
                .zip(&chunk)
                .take_while(|((seq, _), p)| *seq == p.seq)
                .map(|((_, s), _)| *s)
                .collect(),
            None => Vec::new(),
        };
        if !known.is_empty() {
            chunk.truncate(known.len());
        }
        if std::mem::take(&mut self.resume) {
            if let Some(w) = &self.worker {
                w.notify("resume");
            }
        }
        self.stats
            .in_flight
            .store(chunk.len() as i64, Ordering::Relaxed);
        self.stats
            .in_flight_since_ms
            .store(now_ms(), Ordering::Relaxed);
        let fut = self.run_chunk(chunk, ahead, (!known.is_empty()).then_some(known), careful);
        ctx.spawn(
            fut.into_actor(self)
                .map(|res, act, ctx| act.after_chunk(res, ctx)),
        );
    }

    /// Handles `chunk` and commits its progress. `ahead`: the events queued after it, whose
    /// replay-log lookups ride on the commit; `known`: this chunk's lookups when the previous
    /// commit already made them; `careful`: one event per commit. The steps are
    /// [`ChunkRun`]'s.
    fn run_chunk(
        &self,
        chunk: Vec<Pending>,
        ahead: Vec<(i64, String)>,
        known: Option<Vec<bool>>,
        careful: bool,
    ) -> impl std::future::Future<Output = ChunkResult> + 'static {
        let per_commit = per_commit(careful, self.keyed, self.concurrency());
        let run = ChunkRun {
            pack: self.id.clone(),
            store: self.store.clone(),
            handler: self.handler.clone(),
            worker: self.worker.clone(),
            timeout: self.timeout(),
            max_attempts: self.cfg.max_attempts,
            services: self.services(),
            stage: self.stage.clone(),
            agent: self.agent.clone(),
            router: self.emitter.router.clone(),
            queue: self.emitter.queue.clone(),
            window: per_commit.unwrap_or(EXEC_WINDOW.max(self.concurrency())),
            per_commit,
            careful,
            concurrency: self.concurrency(),
            kinds: self.manifest.subscribed_event_kinds.clone(),
        };
        async move {
            let mut r = ChunkResult::default();
            let keys: Vec<String> = chunk
                .iter()
                .map(|p| event_key(&p.envelope.event_id))
                .collect();
            let seen = match known {
                Some(k) => k,
                None => match run.start(&chunk, &keys).await {
                    Ok(s) => s,
                    Err(e) => {
                        r.commit_error = Some(e);
                        return r;
                    }
                },
            };
            let progress = run.deliver(&chunk, &keys, &seen, &mut r).await;
            run.commit(&chunk, &keys, ahead, progress, r).await
        }
    }

    fn after_chunk(&mut self, mut r: ChunkResult, ctx: &mut Context<Self>) {
        self.busy.store(false, Ordering::Release);
        self.stats.in_flight.store(0, Ordering::Relaxed);
        self.stats.in_flight_since_ms.store(0, Ordering::Relaxed);
        if let Some(e) = r.commit_error {
            // Effects may have happened but are not recorded: redeliver from the log.
            tracing::error!(pack = %self.id, error = %e, "cannot record progress; reloading from the log in 1 s");
            self.stats
                .set_last_error(Some(format!("cannot record progress: {e}")));
            self.paused = true;
            ctx.run_later(Duration::from_secs(1), |act, ctx| {
                act.paused = false;
                act.reload(ctx);
            });
            return;
        }
        // Storage works again: an error about it is history now.
        if self.stats.last_error().is_some_and(|e| {
            e.starts_with("cannot record progress") || e.starts_with("cannot load pending events")
        }) {
            self.stats.set_last_error(None);
        }
        self.keyed = r.keyed || (self.keyed && r.finished == 0);
        self.prefetched = (r.crash.is_none() && r.retry.is_none() && !r.next_seen.is_empty())
            .then(|| std::mem::take(&mut r.next_seen));
        self.resume |= r.retry.is_some();
        for s in &r.statuses {
            let c = match s {
                OutcomeStatus::Handled => &self.stats.handled,
                OutcomeStatus::Replayed => &self.stats.replayed,
                OutcomeStatus::Ignored => &self.stats.ignored,
                OutcomeStatus::Failed => &self.stats.failed,
                OutcomeStatus::Retry => &self.stats.retried,
            };
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.agent
            .replay_entries
            .fetch_add(r.recorded as i64, Ordering::Relaxed);
        self.tap_finished(&r);
        for (event_id, kind, error, attempts) in &r.dead {
            self.agent_event(
                "agent:event_dead_lettered",
                serde_json::json!({"pack": self.id, "event_id": event_id, "kind": kind, "error": error, "attempts": attempts}),
            );
        }
        self.add_dead_letters(r.dead_lettered as u64);
        if let (Some(seq), None, None) = (r.gap, &r.crash, &r.retry) {
            // Committed to the log but never dispatched here: read it from the log, with
            // what follows it (those are recorded already and come back as `replayed`).
            if self.last_gap.replace(seq) == Some(seq) {
                // The same row again after a reload: it cannot be read (see `reload`). Do not
                // spin on it; try again in a second, visibly.
                tracing::error!(pack = %self.id, seq, "an inbound event of this pack cannot be delivered (unreadable row); retrying in 1 s");
                self.stats
                    .set_last_error(Some(format!("inbound row {seq} cannot be read")));
                self.paused = true;
                ctx.run_later(Duration::from_secs(1), |act, ctx| {
                    act.paused = false;
                    act.reload(ctx);
                });
                return;
            }
            tracing::warn!(pack = %self.id, seq, "an inbound event committed to the log never reached this pack; reloading it from the log");
            self.reload(ctx);
            return;
        }
        for _ in 0..r.finished {
            self.queue.pop_front();
        }
        if let Some(c) = r.cursor {
            self.cursor = self.cursor.max(c);
        }
        if let Some((error, attempts, dead)) = r.crash {
            if dead {
                self.tap_front(Stage::DeadLettered, error.clone());
                self.queue.pop_front();
                self.add_dead_letters(1);
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(pack = %self.id, attempts, error = %error, "poison event dead-lettered");
            } else if let Some(p) = self.queue.front_mut() {
                p.attempts = attempts;
            }
            self.crashed(error, ctx);
            return;
        }
        if let Some((attempts, dead)) = r.retry {
            self.stats.retried.fetch_add(1, Ordering::Relaxed);
            if dead {
                self.tap_front(Stage::DeadLettered, "retried too often");
                self.queue.pop_front();
                self.add_dead_letters(1);
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
            } else {
                self.tap_front(Stage::Delivered, "retry");
                if let Some(p) = self.queue.front_mut() {
                    p.attempts = attempts;
                }
                let wait = backoff(self.cfg.backoff_base, self.cfg.backoff_cap, attempts);
                self.retry_after(wait);
                self.paused = true;
                ctx.run_later(wait, |act, ctx| {
                    act.stats.next_retry_ms.store(0, Ordering::Relaxed);
                    act.paused = false;
                    act.pump(ctx);
                });
            }
        }
        self.stats
            .pending
            .store(self.queue.len() as i64, Ordering::Relaxed);
        if self.healthy_since.elapsed() > self.cfg.window {
            self.intensity.reset_escalation();
        }
        self.pump(ctx);
    }

    /// Shows when the waiting event is tried again (`status`, `top`).
    fn retry_after(&self, wait: Duration) {
        self.stats
            .next_retry_ms
            .store(now_ms() + wait.as_millis() as i64, Ordering::Relaxed);
    }

    /// Tells the taps how the chunk's finished events ended (and which were dead-lettered).
    fn tap_finished(&self, r: &ChunkResult) {
        // `--log-level trace` (or `lumenflow_actors=trace`): one line per finished event.
        if tracing::enabled!(tracing::Level::TRACE) {
            for (p, status) in self.queue.iter().take(r.finished).zip(&r.statuses) {
                tracing::trace!(pack = %self.id, kind = %p.envelope.kind, event_id = %p.envelope.event_id, outcome = status_word(*status), "delivered");
            }
        }
        self.agent.tap.publish(|| {
            let at_ms = now_ms();
            let pack: Arc<str> = self.id.as_str().into();
            let done = self.queue.iter().take(r.finished);
            let delivered = done.clone().zip(&r.statuses).map({
                let pack = pack.clone();
                move |(p, status)| TapEvent {
                    stage: Stage::Delivered,
                    at_ms,
                    pack: Some(pack.clone()),
                    detail: Some(status_word(*status).into()),
                    envelope: p.envelope.clone(),
                }
            });
            let dead = r.dead.iter().filter_map(move |(event_id, _, error, _)| {
                let p = done.clone().find(|p| &p.envelope.event_id == event_id)?;
                Some(TapEvent {
                    stage: Stage::DeadLettered,
                    at_ms,
                    pack: Some(pack.clone()),
                    detail: Some(error.clone().into()),
                    envelope: p.envelope.clone(),
                })
            });
            delivered.chain(dead)
        });
    }

    /// Tells the taps about the event at the front of the queue.
    fn tap_front(&self, stage: Stage, detail: impl Into<std::borrow::Cow<'static, str>>) {
        self.agent.tap.publish(|| {
            self.queue.front().map(|p| TapEvent {
                stage,
                at_ms: now_ms(),
                pack: Some(self.id.as_str().into()),
                detail: Some(detail.into()),
                envelope: p.envelope.clone(),
            })
        });
    }

    fn add_dead_letters(&self, n: u64) {
        if n > 0 {
            self.stats.dead_lettered.fetch_add(n, Ordering::Relaxed);
            self.agent
                .dead_letters
                .fetch_add(n as i64, Ordering::Relaxed);
        }
    }

    /// Publishes one of the agent's own events (`agent:*`) to the packs that subscribe.
    /// Detached from this actor's context, which may be about to stop.
    fn agent_event(&self, kind: &str, payload: serde_json::Value) {
        let serde_json::Value::Object(payload) = payload else {
            return;
        };
        let envelope =
            EventDraft::new(kind, payload).build(&self.cfg.identity, std::time::SystemTime::now());
        let emitter = self.emitter.clone();
        actix::spawn(async move {
            if let Err(e) = emitter.inbound(vec![envelope]).await {
                tracing::warn!(error = %e, "could not publish an agent: event");
            }
        });
    }

    /// A handler crashed: restart through the supervisor, or wait in `crashed`.
    fn crashed(&mut self, error: String, ctx: &mut Context<Self>) {
        self.stats.set_last_error(Some(error.clone()));
        self.healthy_since = Instant::now();
        let decision = self.intensity.record(Instant::now());
        let (state, backoff_ms) = match decision {
            Decision::Restart => ("restarting", 0),
            Decision::Crashed(wait) => ("crashed", wait.as_millis() as u64),
        };
        self.agent_event(
            "agent:pack_crashed",
            serde_json::json!({"pack": self.id, "error": error, "state": state, "backoff_ms": backoff_ms,
                "restarts": self.stats.restarts.load(Ordering::Relaxed)}),
        );
        match decision {
            Decision::Restart => {
                tracing::warn!(pack = %self.id, error = %error, "handler crashed; restarting the pack");
                self.stats.set_state(PackState::Restarting);
                ctx.stop();
            }
            Decision::Crashed(wait) => {
                tracing::error!(pack = %self.id, error = %error, backoff_ms = wait.as_millis() as u64,
                    "pack crashed too often (more than {} restarts in {} s); next try after backoff",
                    self.cfg.max_restarts, self.cfg.window.as_secs());
                self.stats.set_state(PackState::Crashed);
                self.retry_after(wait);
                self.paused = true;
                ctx.run_later(wait, |act, ctx| {
                    act.stats.next_retry_ms.store(0, Ordering::Relaxed);
                    act.stats.set_state(PackState::Restarting);
                    ctx.stop();
                });
            }
        }
    }
}

/// `running`, or `idle` for a pack with nothing to run (no runtime, no subscriptions: it
/// only declares kinds and tools).
fn running_state(handler: &HandlerKind) -> PackState {
    match handler {
        HandlerKind::EmitOnly => PackState::Idle,
        _ => PackState::Running,
    }
}

/// An outcome as `tap` shows it.
fn status_word(s: OutcomeStatus) -> &'static str {
    match s {
        OutcomeStatus::Handled => "handled",
        OutcomeStatus::Replayed => "replayed",
        OutcomeStatus::Ignored => "ignored",
        OutcomeStatus::Failed => "failed",
        OutcomeStatus::Retry => "retry",
    }
}

impl Actor for PackHost {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(256);
        self.paused = false;
        self.invalid = false;
        // After a crash the pack stays `restarting` until it can take events again (its worker
        // answered `initialize` and its pending events are loaded).
        if self.stats.restarts.load(Ordering::Relaxed) == 0 {
            self.stats.set_state(running_state(&self.handler));
        }
        match self.handler.clone() {
            HandlerKind::Exec { dir } => self.start_worker(dir, ctx),
            _ => self.reload(ctx),
        }
    }
}

impl Supervised for PackHost {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.stats.restarts.fetch_add(1, Ordering::Relaxed);
        self.busy.store(false, Ordering::Release);
        self.queue.clear();
        self.early.clear();
        self.prefetched = None;
        self.loaded = false;
        self.high_water = 0;
        if let Some(w) = self.worker.take() {
            w.kill();
        }
    }
}

/// New committed rows for this pack.
pub struct Deliver {
    pub rows: Vec<InboundRow>,
}
impl Message for Deliver {
    type Result = ();
}
impl Handler<Deliver> for PackHost {
    type Result = ();
    fn handle(&mut self, m: Deliver, ctx: &mut Context<Self>) {
        if !self.loaded {
            self.early.extend(m.rows);
            return;
        }
        self.accept_rows(m.rows);
        self.pump(ctx);
    }
}

/// Stop for good (the pack was removed or replaced). Sent after the last other address of
/// the host is gone, so the supervisor does not restart it.
pub struct Stop;
impl Message for Stop {
    type Result = ();
}
impl Handler<Stop> for PackHost {
    type Result = ();
    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        if let Some(w) = self.worker.take() {
            w.kill();
        }
        ctx.stop();
    }
}

/// New limits from a reloaded agent.json (attempts, restarts, window, timeout).
pub struct SetHostConfig(pub HostConfig);
impl Message for SetHostConfig {
    type Result = ();
}
impl Handler<SetHostConfig> for PackHost {
    type Result = ();
    fn handle(&mut self, SetHostConfig(cfg): SetHostConfig, _: &mut Context<Self>) {
        self.intensity = RestartIntensity::new(cfg.max_restarts, cfg.window)
            .with_backoff(cfg.backoff_base, cfg.backoff_cap);
        self.cfg = cfg;
    }
}

/// Finish the event in flight and take no more (shutdown or removal).
pub struct Drain;
impl Message for Drain {
    type Result = ();
}
impl Handler<Drain> for PackHost {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: Drain, _: &mut Context<Self>) -> Self::Result {
        self.paused = true;
        self.stats.set_state(PackState::Stopped);
        let busy = self.busy.clone();
        let worker = self.worker.take();
        let (store, pack) = (self.store.clone(), self.id.clone());
        Box::pin(async move {
            while busy.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if let Some(w) = worker {
                w.shutdown(Duration::from_secs(2)).await;
            }
            // Nothing is in flight: the next host must not count the lease as interrupted.
            if let Err(e) = store.run(EndLease { pack }).await {
                tracing::warn!(error = %e, "cannot end the pack's lease; its next start counts one extra attempt");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk's commit never moves the cursor past a row of the pack it did not go through
    /// (a row committed to the log whose dispatch was lost).
    #[test]
    fn the_cursor_stops_before_a_row_the_chunk_never_saw() {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::schema::migrate(&mut conn).unwrap();
        for (kind, target) in [
            ("a:x", None),
            ("b:other", None),
            ("a:x", None),
            ("a:x", Some("someone-else")),
            ("a:x", None),
        ] {
            conn.execute(
                "INSERT INTO inbound(event_id, kind, event_ms, received_ms, body, target) VALUES ('e', ?1, 0, 0, '{}', ?2)",
                params![kind, target],
            )
            .unwrap();
        }
        conn.execute("INSERT INTO pack_cursor(pack, cursor) VALUES ('p', 0)", [])
            .unwrap();
        let kinds = vec!["a:x".to_string()];
        // Rows 2 (other kind) and 4 (another pack's) are not the pack's: passing them is fine.
        assert_eq!(
            first_uncovered(&conn, "p", &kinds, 5, &[1, 3, 5]).unwrap(),
            None
        );
        // Row 3 is the pack's and was not in the chunk.
        assert_eq!(
            first_uncovered(&conn, "p", &kinds, 5, &[1, 5]).unwrap(),
            Some(3)
        );
        assert_eq!(first_uncovered(&conn, "p", &[], 5, &[]).unwrap(), None);
        let op = CompleteChunk {
            pack: "p".into(),
            records: Vec::new(),
            emits: Vec::new(),
            dead_letters: Vec::new(),
            cursor: Some(5),
            cleared: Vec::new(),
            stopped_at: None,
            max_attempts: 3,
            lookahead: Vec::new(),
            lease: None,
            kinds,
            covered: vec![1, 5],
        };
        let done = op.run(&conn).unwrap();
        assert_eq!(done.gap, Some(3));
        let cursor: i64 = conn
            .query_row("SELECT cursor FROM pack_cursor WHERE pack = 'p'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(cursor, 2, "held just before the row it never saw");
    }
}
