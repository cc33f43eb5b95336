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

use crate::router::{Dispatch, InboundRow, Router};
use crate::stats::AgentStats;
use crate::store::{now_ms, OnCommit, StoreError, StoreHandle, StoreOp};
use crate::upstream::Push;
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
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("Backpressure: the durable queue holds {depth} events (queue.max_depth = {max}); retry after {retry_after_s} s")]
    Backpressure {
        depth: i64,
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
    let mut in_stmt = conn.prepare_cached(
        "INSERT INTO inbound(event_id, kind, event_ms, received_ms, body) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut seqs = Vec::with_capacity(events.len());
    for e in events {
        if e.class == DeliveryClass::Queue {
            out_stmt.execute(params![
                e.envelope.event_id,
                e.envelope.kind,
                e.pack,
                now,
                &*e.body
            ])?;
        }
        if e.local {
            in_stmt.execute(params![
                e.envelope.event_id,
                e.envelope.kind,
                e.envelope.timestamp_ms(),
                now,
                &*e.body
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
    let local: Vec<Arc<Envelope>> = events
        .iter()
        .filter(|e| e.local)
        .map(|e| e.envelope.clone())
        .collect();
    move |seqs: &[Option<i64>]| {
        let rows: Vec<InboundRow> = seqs
            .iter()
            .flatten()
            .zip(local)
            .map(|(seq, envelope)| InboundRow {
                seq: *seq,
                envelope,
                target: None,
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
}

impl StoreOp for AcceptOp {
    /// The events come back with their seqs, so admission needs no copy of the batch.
    type Output = (Vec<Option<i64>>, Vec<Accepted>);
    fn run(self, conn: &Connection) -> Result<Self::Output, StoreError> {
        Ok((insert_accepted(conn, &self.events)?, self.events))
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
        }
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
        let n_queue = msg
            .events
            .iter()
            .filter(|e| e.class == DeliveryClass::Queue)
            .count() as i64;
        // Reserve the depth now, release on failure.
        if let Err(e) = reserve_depth(&stats, n_queue) {
            return Box::pin(async move { Err(e) });
        }
        let store = self.store.clone();
        let upstream = self.upstream.clone();
        let router = self.router.clone();
        Box::pin(async move {
            let events = msg.events;
            let needs_store = events
                .iter()
                .any(|e| e.class == DeliveryClass::Queue || e.local);
            let events = if needs_store {
                let hook = dispatch_when_committed(router, &events);
                let on_commit: OnCommit<(Vec<Option<i64>>, Vec<Accepted>)> =
                    Box::new(move |(seqs, _)| hook(seqs));
                match store.run_then(AcceptOp { events }, Some(on_commit)).await {
                    Ok((_, events)) => events,
                    Err(e) => {
                        stats
                            .queue
                            .durable_depth
                            .fetch_sub(n_queue, Ordering::AcqRel);
                        return Err(e.into());
                    }
                }
            } else {
                events
            };
            announce(&stats, &upstream, events, n_queue);
            Ok(())
        })
    }
}

/// Counts committed events and wakes the upstream (it reads durable events from the outbox
/// itself; ephemeral ones ride along).
fn announce(stats: &AgentStats, upstream: &Recipient<Push>, events: Vec<Accepted>, n_queue: i64) {
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
    let ephemeral: Vec<Accepted> = events
        .into_iter()
        .filter(|e| e.class == DeliveryClass::Ephemeral)
        .collect();
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
        let n_queue = m
            .events
            .iter()
            .filter(|e| e.class == DeliveryClass::Queue)
            .count() as i64;
        announce(&self.stats, &self.upstream, m.events, n_queue);
    }
}

/// Reserves room for `n` durable events a handler emitted; `Err` (backpressure) when the queue
/// would exceed `queue.max_depth`. Release with [`release_depth`] if they are not committed.
pub fn reserve_depth(stats: &AgentStats, n: i64) -> Result<(), QueueError> {
    if n == 0 {
        return Ok(());
    }
    let max = stats.queue.max_depth.load(Ordering::Relaxed);
    let depth = stats.queue.durable_depth.fetch_add(n, Ordering::AcqRel);
    if depth + n > max as i64 {
        release_depth(stats, n);
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
