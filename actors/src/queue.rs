//! `DurableQueue`: the backpressure queue between producers and the upstream (SPEC §6).
//!
//! Owns the `outbox` table's admission: what a producer hands over is accepted here.
//!
//! Guarantees:
//! - `queue` kinds are committed to SQLite (with the rows for local subscribers, in the same
//!   transaction) before the producer gets its answer; nothing is acknowledged that is not
//!   stored.
//! - When the durable depth would exceed `queue.max_depth` the whole batch is refused with
//!   [`QueueError::Backpressure`] (HTTP 429 + Retry-After); nothing is dropped silently and
//!   nothing is half-accepted.
//! - `ephemeral` kinds never touch the disk on the way upstream: they go to the upstream's
//!   memory ring, which drops and counts them when it is disconnected.
//! - Local subscribers are dispatched from the Store's commit hook: in commit order, always.
//! - With the embedded mem:inbox as upstream, a queue event accepted while nothing waits in the
//!   outbox is written straight into mem:inbox by the accepting transaction (one row instead of
//!   an outbox row, its move and its delete); otherwise it waits behind the others.

use crate::approvals::held::{insert_held, Hold};
use crate::router::{Dispatch, InboundRow, Router};
use crate::stats::AgentStats;
use crate::store::{now_ms, OnCommit, StoreError, StoreHandle, StoreOp};
use crate::tap::{Stage, TapEvent};
use crate::upstreams::drain::Push;
use actix::prelude::*;
use lumenflow_pack_sdk::{DeliveryClass, Envelope};
use rusqlite::{params, Connection};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// One event a producer hands over, already validated against its pack's manifest.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub envelope: Arc<Envelope>,
    pub body: Arc<str>,
    pub pack: String,
    pub class: DeliveryClass,
    /// True when at least one local pack subscribes to the kind.
    pub local: bool,
    /// Its kind is in its pack's `required_approvals`: held until a decision
    /// (`approvals::held`), neither in the outbox nor at local subscribers before.
    pub hold: Option<Arc<Hold>>,
}

impl Accepted {
    /// Goes to the outbox now (a `queue` kind, not held).
    pub fn to_outbox(&self) -> bool {
        self.class == DeliveryClass::Queue && self.hold.is_none()
    }

    /// Goes to the upstream's memory ring now (an `ephemeral` kind, not held).
    pub fn to_ring(&self) -> bool {
        self.class == DeliveryClass::Ephemeral && self.hold.is_none()
    }

    /// The envelope's JSON as local packs get it. It is `body` except for a v1 kernel event,
    /// whose `body` is the event as posted (what goes upstream, unchanged) and which packs
    /// get wrapped in its `kernel:<kind>` envelope.
    pub fn local_body(&self) -> std::borrow::Cow<'_, str> {
        if lumenflow_pack_sdk::kernel::carried_event(&self.envelope).is_some() {
            std::borrow::Cow::Owned(self.envelope.to_json())
        } else {
            std::borrow::Cow::Borrowed(&self.body)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("Backpressure: the durable queue holds {depth} events (queue.max_depth = {max}); retry after {retry_after_s} s")]
    Backpressure {
        depth: i64,
        max: u64,
        retry_after_s: u64,
    },
    #[error("Backpressure: {pending} held events wait for a decision (approvals.max_pending = {max}); decide some (`lumenflow-agent approvals list`) or retry after {retry_after_s} s")]
    HeldFull {
        pending: i64,
        max: u64,
        retry_after_s: u64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Inserts outbox rows (queue kinds) and inbound rows (local subscribers), inside the
/// caller's transaction. Returns the inbound seq per event (None without a local subscriber).
/// Used by the queue's own admission and by a pack host committing its handlers' emits.
pub fn insert_accepted(
    conn: &Connection,
    events: &[Accepted],
) -> Result<Vec<Option<i64>>, StoreError> {
    let now = now_ms();
    let mut out_stmt = conn.prepare_cached(
        "INSERT INTO outbox(event_id, kind, pack, created_ms, body) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for e in events.iter().filter(|e| e.to_outbox()) {
        out_stmt.execute(params![
            e.envelope.event_id,
            e.envelope.kind,
            e.pack,
            now,
            &*e.body
        ])?;
    }
    insert_local(conn, events)
}

/// Inserts the inbound rows of the events local packs subscribe to, and holds the held ones
/// (their row is their `agent:approval_requested`); the seqs, in order (None: no row).
fn insert_local(conn: &Connection, events: &[Accepted]) -> Result<Vec<Option<i64>>, StoreError> {
    let now = now_ms();
    let mut in_stmt = conn.prepare_cached(
        "INSERT INTO inbound(event_id, kind, event_ms, received_ms, body) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut seqs = Vec::with_capacity(events.len());
    for e in events {
        if let Some(hold) = &e.hold {
            seqs.push(insert_held(conn, e, hold)?);
        } else if e.local {
            in_stmt.execute(params![
                e.envelope.event_id,
                e.envelope.kind,
                e.envelope.timestamp_ms(),
                now,
                &*e.local_body()
            ])?;
            seqs.push(Some(conn.last_insert_rowid()));
        } else {
            seqs.push(None);
        }
    }
    Ok(seqs)
}

/// The rows of `events` that local packs subscribe to, sent to the router once committed (from
/// the Store's commit hook, so they reach packs in commit order whoever wrote them).
pub fn dispatch_when_committed(
    router: Addr<Router>,
    events: &[Accepted],
) -> impl FnOnce(&[Option<i64>]) + Send + 'static {
    // Aligned with the events: what each one's inbound row carries (a held event's row is its
    // `agent:approval_requested`).
    let local: Vec<Option<Arc<Envelope>>> = events
        .iter()
        .map(|e| match &e.hold {
            Some(h) => Some(h.requested.clone()),
            None => e.local.then(|| e.envelope.clone()),
        })
        .collect();
    move |seqs: &[Option<i64>]| {
        let rows: Vec<InboundRow> = seqs
            .iter()
            .zip(local)
            .filter_map(|(seq, envelope)| {
                Some(InboundRow {
                    seq: (*seq)?,
                    envelope: envelope?,
                    target: None,
                })
            })
            .collect();
        if !rows.is_empty() {
            router.do_send(Dispatch { rows });
        }
    }
}

/// Inserts a batch handed over through [`Accept`] in one transaction.
struct AcceptOp {
    events: Vec<Accepted>,
    /// The upstream is mem:inbox: see [`DurableQueue::new`].
    direct: bool,
}

struct AcceptedBatch {
    seqs: Vec<Option<i64>>,
    /// Queue events delivered straight into mem:inbox.
    direct: usize,
    /// The events come back, so admission needs no copy of the batch.
    events: Vec<Accepted>,
}

impl StoreOp for AcceptOp {
    type Output = AcceptedBatch;
    fn run(self, conn: &Connection) -> Result<Self::Output, StoreError> {
        let nothing_waiting = self.direct
            && !conn
                .prepare_cached("SELECT 1 FROM outbox LIMIT 1")?
                .exists([])?;
        if !nothing_waiting {
            return Ok(AcceptedBatch {
                seqs: insert_accepted(conn, &self.events)?,
                direct: 0,
                events: self.events,
            });
        }
        // Nothing is waiting ahead of them: the queue events go straight into mem:inbox,
        // in this transaction. That is what the upstream would do with them next (an outbox
        // row moved to mem:inbox in one transaction), minus a copy, a delete and a commit.
        let now = now_ms();
        let mut inbox = conn.prepare_cached(
            "INSERT OR IGNORE INTO mem_inbox(event_id, kind, received_ms, body) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let mut direct = 0;
        for e in self.events.iter().filter(|e| e.to_outbox()) {
            inbox.execute(params![e.envelope.event_id, e.envelope.kind, now, &*e.body])?;
            direct += 1;
        }
        let seqs = insert_local(conn, &self.events)?;
        Ok(AcceptedBatch {
            seqs,
            direct,
            events: self.events,
        })
    }
}

/// Depth and oldest row of the outbox (at start).
pub fn outbox_depth(conn: &Connection) -> Result<(i64, i64), StoreError> {
    Ok(conn.query_row(
        "SELECT count(*), coalesce(min(created_ms), 0) FROM outbox",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?)
}

pub struct DurableQueue {
    store: StoreHandle,
    upstream: Recipient<Push>,
    router: Addr<Router>,
    stats: Arc<AgentStats>,
    direct_to_inbox: bool,
}

impl DurableQueue {
    pub fn new(
        store: StoreHandle,
        upstream: Recipient<Push>,
        router: Addr<Router>,
        max_depth: u64,
        stats: Arc<AgentStats>,
    ) -> Self {
        stats.queue.max_depth.store(max_depth, Ordering::Relaxed);
        DurableQueue {
            store,
            upstream,
            router,
            stats,
            direct_to_inbox: false,
        }
    }

    /// The upstream is the embedded mem:inbox, a table of the same database: a queue event
    /// accepted while nothing waits in the outbox is written straight into it, in the
    /// transaction that accepts it (order kept: nothing is ahead of it). Otherwise it waits in
    /// the outbox like any other.
    pub fn deliver_to_mem_inbox(mut self) -> Self {
        self.direct_to_inbox = true;
        self
    }
}

impl Actor for DurableQueue {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(1024);
    }
}

impl Supervised for DurableQueue {}

/// Hand over a batch of events: all are accepted, or none.
pub struct Accept {
    pub events: Vec<Accepted>,
}

impl Message for Accept {
    type Result = Result<(), QueueError>;
}

impl Handler<Accept> for DurableQueue {
    type Result = ResponseFuture<Result<(), QueueError>>;

    fn handle(&mut self, msg: Accept, _: &mut Context<Self>) -> Self::Result {
        let stats = self.stats.clone();
        let n_queue = msg.events.iter().filter(|e| e.to_outbox()).count() as i64;
        // Reserve the depth now, release on failure.
        if let Err(e) = reserve_depth(&stats, n_queue) {
            return Box::pin(async move { Err(e) });
        }
        let store = self.store.clone();
        let upstream = self.upstream.clone();
        let router = self.router.clone();
        let direct = self.direct_to_inbox;
        Box::pin(async move {
            let events = msg.events;
            let needs_store = events
                .iter()
                .any(|e| e.class == DeliveryClass::Queue || e.local || e.hold.is_some());
            let (events, waiting) = if needs_store {
                let hook = dispatch_when_committed(router, &events);
                let on_commit: OnCommit<AcceptedBatch> = Box::new(move |b| hook(&b.seqs));
                match store
                    .run_then(AcceptOp { events, direct }, Some(on_commit))
                    .await
                {
                    Ok(b) => {
                        if b.direct > 0 {
                            // Delivered already: never waited in the outbox.
                            let d = b.direct as i64;
                            release_depth(&stats, d);
                            stats
                                .queue
                                .accepted_queue
                                .fetch_add(d as u64, Ordering::Relaxed);
                            stats.upstream.pushed.fetch_add(d as u64, Ordering::Relaxed);
                            stats
                                .upstream
                                .last_success_ms
                                .store(now_ms(), Ordering::Relaxed);
                        }
                        (b.events, n_queue - b.direct as i64)
                    }
                    Err(e) => {
                        release_depth(&stats, n_queue);
                        return Err(e.into());
                    }
                }
            } else {
                (events, n_queue)
            };
            announce(&stats, &upstream, events, waiting, Stage::Accepted);
            Ok(())
        })
    }
}

/// Counts committed events and wakes the upstream (it reads durable events from the outbox
/// itself; ephemeral ones ride along).
pub(crate) fn announce(
    stats: &AgentStats,
    upstream: &Recipient<Push>,
    events: Vec<Accepted>,
    n_queue: i64,
    stage: Stage,
) {
    count_by_producer(stats, &events);
    if tracing::enabled!(tracing::Level::TRACE) {
        for e in &events {
            tracing::trace!(pack = %e.pack, kind = %e.envelope.kind, event_id = %e.envelope.event_id, stage = ?stage, "event accepted");
        }
    }
    stats.tap.publish(|| {
        let at_ms = now_ms();
        // Events of a batch are mostly one pack's: one name for a run of them.
        let mut name: Option<Arc<str>> = None;
        events.iter().map(move |e| {
            let pack = match &name {
                Some(n) if **n == *e.pack => n.clone(),
                _ => name.insert(e.pack.as_str().into()).clone(),
            };
            TapEvent {
                stage,
                at_ms,
                pack: Some(pack),
                detail: e.hold.is_some().then_some("held for approval".into()),
                envelope: e.envelope.clone(),
            }
        })
    });
    if n_queue > 0 {
        let _ = stats.queue.oldest_ms.compare_exchange(
            0,
            now_ms(),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
        stats
            .queue
            .accepted_queue
            .fetch_add(n_queue as u64, Ordering::Relaxed);
    }
    let held = events.iter().filter(|e| e.hold.is_some()).count() as i64;
    if held > 0 {
        // Counted now; the Approvals actor recounts from the table every second.
        stats.approvals.pending.fetch_add(held, Ordering::AcqRel);
    }
    let ephemeral: Vec<Accepted> = events.into_iter().filter(|e| e.to_ring()).collect();
    stats
        .queue
        .accepted_ephemeral
        .fetch_add(ephemeral.len() as u64, Ordering::Relaxed);
    upstream.do_send(Push {
        ephemeral,
        durable: n_queue > 0,
    });
}

/// Events a pack host committed itself (its handlers' emits, in the transaction that finished
/// their events; see `effects`). Their durable depth was reserved with
/// [`reserve_depth`] before that commit.
pub struct Committed {
    pub events: Vec<Accepted>,
}
impl Message for Committed {
    type Result = ();
}
impl Handler<Committed> for DurableQueue {
    type Result = ();
    fn handle(&mut self, m: Committed, _: &mut Context<Self>) {
        let n_queue = m.events.iter().filter(|e| e.to_outbox()).count() as i64;
        announce(
            &self.stats,
            &self.upstream,
            m.events,
            n_queue,
            Stage::Emitted,
        );
    }
}

/// Adds each event to its producer's `emitted` (a batch is mostly one pack's: one lookup a
/// run of the same pack).
fn count_by_producer(stats: &AgentStats, events: &[Accepted]) {
    let mut i = 0;
    while i < events.len() {
        let pack = &events[i].pack;
        let run = events[i..].iter().take_while(|e| &e.pack == pack).count();
        // Not `pack()`: a producer that is no pack (the platform's kernel events) would show
        // up in `status` as a pack.
        if let Some(p) = stats.existing_pack(pack) {
            p.emitted.fetch_add(run as u64, Ordering::Relaxed);
        }
        i += run;
    }
}

/// The bound of `queue.max_depth`: `Err` (backpressure, counted) when `n` more durable events
/// on top of `depth` would exceed it. Producers check it through [`reserve_depth`]; handlers'
/// emits check it when staged (they are counted in at their commit).
pub fn check_depth(stats: &AgentStats, depth: i64, n: i64) -> Result<(), QueueError> {
    let max = stats.queue.max_depth.load(Ordering::Relaxed);
    if n > 0 && depth + n > max as i64 {
        stats
            .queue
            .backpressure_rejections
            .fetch_add(1, Ordering::Relaxed);
        return Err(QueueError::Backpressure {
            depth,
            max,
            retry_after_s: 1,
        });
    }
    Ok(())
}

/// Reserves room for `n` durable events (a producer's batch) before they are committed;
/// release it with [`release_depth`] if they are not.
fn reserve_depth(stats: &AgentStats, n: i64) -> Result<(), QueueError> {
    let depth = stats.queue.durable_depth.fetch_add(n, Ordering::AcqRel);
    check_depth(stats, depth, n).inspect_err(|_| release_depth(stats, n))
}

pub fn release_depth(stats: &AgentStats, n: i64) {
    stats.queue.durable_depth.fetch_sub(n, Ordering::AcqRel);
}

/// A new `queue.max_depth` (agent.json reloaded).
pub struct SetMaxDepth(pub u64);
impl Message for SetMaxDepth {
    type Result = ();
}
impl Handler<SetMaxDepth> for DurableQueue {
    type Result = ();
    fn handle(&mut self, SetMaxDepth(max): SetMaxDepth, _: &mut Context<Self>) {
        self.stats.queue.max_depth.store(max, Ordering::Relaxed);
    }
}

/// Put dead letters back where their origin says (`dead_letters::retry`): handler dead letters
/// into the inbound log for their pack, upstream rejections into the outbox; then deliver.
pub struct RetryDeadLetters {
    pub ids: Option<Vec<i64>>,
}
impl Message for RetryDeadLetters {
    type Result = Result<crate::dead_letters::RetryReport, StoreError>;
}
impl Handler<RetryDeadLetters> for DurableQueue {
    type Result = ResponseFuture<Result<crate::dead_letters::RetryReport, StoreError>>;
    fn handle(&mut self, m: RetryDeadLetters, _: &mut Context<Self>) -> Self::Result {
        let (store, stats) = (self.store.clone(), self.stats.clone());
        let (router, upstream) = (self.router.clone(), self.upstream.clone());
        Box::pin(async move {
            let on_commit: OnCommit<crate::dead_letters::RetryReport> = Box::new(move |report| {
                let rows: Vec<InboundRow> = report
                    .to_inbound()
                    .filter_map(|(seq, pack, body)| {
                        Envelope::parse(body.as_bytes()).ok().map(|e| InboundRow {
                            seq,
                            envelope: Arc::new(e),
                            target: (!pack.is_empty()).then(|| pack.to_string()),
                        })
                    })
                    .collect();
                if !rows.is_empty() {
                    router.do_send(Dispatch { rows });
                }
            });
            let report = store
                .run_then(crate::dead_letters::RetryOp { ids: m.ids }, Some(on_commit))
                .await?;
            stats
                .dead_letters
                .fetch_sub(report.moved() as i64, Ordering::Relaxed);
            let to_outbox = report.to_outbox() as i64;
            if to_outbox > 0 {
                stats
                    .queue
                    .durable_depth
                    .fetch_add(to_outbox, Ordering::AcqRel);
                announce(&stats, &upstream, Vec::new(), to_outbox, Stage::Accepted);
            }
            Ok(report)
        })
    }
}

/// An accepted event of pack `demo` for unit tests: `kind` with `payload`, in `class`.
#[cfg(test)]
pub(crate) fn test_event(
    kind: &str,
    payload: serde_json::Map<String, serde_json::Value>,
    class: DeliveryClass,
) -> Accepted {
    let e = lumenflow_pack_sdk::EventDraft::new(kind, payload)
        .build("ws", std::time::SystemTime::now());
    Accepted {
        body: e.to_json().into(),
        envelope: Arc::new(e),
        pack: "demo".into(),
        class,
        local: false,
        hold: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(n: usize) -> Vec<Accepted> {
        (0..n)
            .map(|i| {
                let mut p = serde_json::Map::new();
                p.insert("i".into(), i.into());
                test_event("demo:done", p, DeliveryClass::Queue)
            })
            .collect()
    }

    fn count(c: &Connection, table: &str) -> i64 {
        c.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn queue_events_go_straight_to_mem_inbox_only_when_nothing_waits_ahead() {
        let mut c = Connection::open_in_memory().unwrap();
        crate::schema::migrate(&mut c).unwrap();
        let b = AcceptOp {
            events: accepted(3),
            direct: true,
        }
        .run(&c)
        .unwrap();
        assert_eq!(
            (b.direct, count(&c, "mem_inbox"), count(&c, "outbox")),
            (3, 3, 0)
        );
        // Without direct delivery (an HTTP upstream) they wait in the outbox.
        let b = AcceptOp {
            events: accepted(2),
            direct: false,
        }
        .run(&c)
        .unwrap();
        assert_eq!((b.direct, count(&c, "outbox")), (0, 2));
        // Something waits: later events queue behind it, order kept.
        let b = AcceptOp {
            events: accepted(4),
            direct: true,
        }
        .run(&c)
        .unwrap();
        assert_eq!(
            (b.direct, count(&c, "mem_inbox"), count(&c, "outbox")),
            (0, 3, 6)
        );
    }
}
