//! `Router`: who gets which event (SPEC §6).
//!
//! Owns the routing table (kind -> subscribing packs, slug -> pack) and the addresses of the
//! pack hosts. The table is an immutable value behind an `ArcSwap`: a reload builds a new one
//! and swaps it in one step, so every event sees either the old routes or the new ones, never a
//! mix. Readers (the local API, [`Emitter`]) load it without going through the actor.
//!
//! Guarantees:
//! - Inbound events (from the upstream or the API) are appended to the inbound log before they
//!   are acknowledged; each subscriber then gets them at least once (`PackHost`).
//! - Rows reach each pack in commit order: they are dispatched from the Store's commit hook
//!   (never from the futures that wait for the commit, which actix may poll in any order).

use crate::inbound_events::Unreadable;
use crate::pack_host::{Deliver, PackHost};
use crate::queue::{Accept, Accepted, DurableQueue, QueueError};
use crate::stats::AgentStats;
use crate::store::{now_ms, OnCommit, StoreError, StoreHandle, StoreOp};
use crate::tap::{Stage, TapEvent};
use actix::prelude::*;
use arc_swap::ArcSwap;
use lumenflow_pack_sdk::envelope::Incoming;
use lumenflow_pack_sdk::kernel::KernelEvent;
use lumenflow_pack_sdk::kind::{is_reserved, namespace_of};
use lumenflow_pack_sdk::{DeliveryClass, Envelope, Manifest};
use rusqlite::{params, Connection};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

/// Immutable routes, rebuilt on every reload.
#[derive(Debug, Default, Clone)]
pub struct RoutingTable {
    pub packs: BTreeMap<String, Arc<Manifest>>,
    pub by_slug: HashMap<String, String>,
    pub subscribers: HashMap<String, Vec<String>>,
}

impl RoutingTable {
    pub fn build<'a>(manifests: impl IntoIterator<Item = &'a Arc<Manifest>>) -> Self {
        let mut t = RoutingTable::default();
        for m in manifests {
            t.packs.insert(m.id.clone(), m.clone());
            t.by_slug.insert(m.slug.clone(), m.id.clone());
            for kind in &m.subscribed_event_kinds {
                t.subscribers
                    .entry(kind.clone())
                    .or_default()
                    .push(m.id.clone());
            }
        }
        t
    }

    pub fn subscribers_of(&self, kind: &str) -> &[String] {
        self.subscribers.get(kind).map(Vec::as_slice).unwrap_or(&[])
    }
}

pub type SharedTable = Arc<ArcSwap<RoutingTable>>;

/// A committed inbound-log row on its way to a pack.
#[derive(Debug, Clone)]
pub struct InboundRow {
    pub seq: i64,
    pub envelope: Arc<Envelope>,
    /// Only this pack (a retried dead letter); `None`: every subscriber.
    pub target: Option<String>,
}

struct AppendInbound {
    events: Vec<(Arc<Envelope>, Arc<str>)>,
    /// Events that could not be read: dead-lettered (origin `inbound`) in this transaction.
    unreadable: Vec<Unreadable>,
    cursor: Option<PullCursor>,
}

/// An upstream's place in its inbound stream, stored in `meta` in the transaction that holds
/// the events it passes: after a crash the upstream resumes exactly after what was committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullCursor {
    pub key: String,
    pub value: String,
}

impl PullCursor {
    /// The HTTP control plane's cursor (`meta.pull_cursor`).
    pub fn http(value: String) -> Self {
        PullCursor {
            key: "pull_cursor".into(),
            value,
        }
    }
}

impl StoreOp for AppendInbound {
    type Output = Vec<i64>;
    fn run(self, conn: &Connection) -> Result<Vec<i64>, StoreError> {
        let now = now_ms();
        let mut stmt = conn.prepare_cached(
            "INSERT INTO inbound(event_id, kind, event_ms, received_ms, body) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut seqs = Vec::with_capacity(self.events.len());
        for (e, body) in &self.events {
            stmt.execute(params![e.event_id, e.kind, e.timestamp_ms(), now, &**body])?;
            seqs.push(conn.last_insert_rowid());
        }
        for u in &self.unreadable {
            let (event_id, kind) = u.ids();
            conn.prepare_cached(
                "INSERT INTO dead_letters(pack, event_id, kind, attempts, error, created_ms, body, origin) VALUES ('', ?1, ?2, 0, ?3, ?4, ?5, 'inbound')",
            )?
            .execute(params![event_id, kind, u.reason, now, u.body])?;
        }
        if let Some(c) = &self.cursor {
            conn.execute(
                "INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [&c.key, &c.value],
            )?;
        }
        Ok(seqs)
    }
}

pub struct Router {
    table: SharedTable,
    hosts: HashMap<String, Addr<PackHost>>,
    store: StoreHandle,
    stats: Arc<AgentStats>,
}

impl Router {
    pub fn new(table: SharedTable, store: StoreHandle, stats: Arc<AgentStats>) -> Self {
        Router {
            table,
            hosts: HashMap::new(),
            store,
            stats,
        }
    }
}

impl Actor for Router {
    type Context = Context<Self>;
}

impl Supervised for Router {}

/// Deliver committed rows to their subscribers.
pub struct Dispatch {
    pub rows: Vec<InboundRow>,
}
impl Message for Dispatch {
    type Result = ();
}
impl Handler<Dispatch> for Router {
    type Result = ();
    fn handle(&mut self, m: Dispatch, _: &mut Context<Self>) {
        let table = self.table.load();
        let mut per_pack: HashMap<&str, Vec<InboundRow>> = HashMap::new();
        for row in m.rows {
            for pack in table.subscribers_of(&row.envelope.kind) {
                if row.target.as_deref().is_none_or(|t| t == pack) {
                    per_pack.entry(pack.as_str()).or_default().push(row.clone());
                }
            }
        }
        for (pack, rows) in per_pack {
            if let Some(host) = self.hosts.get(pack) {
                // Rows are durable: if the host is gone it reloads them from the inbound log.
                host.do_send(Deliver { rows });
            }
        }
    }
}

/// Events from the upstream or the local API (`--inbound`): log, then dispatch.
///
/// Every event is logged, whether or not a loaded pack subscribes to its kind: a pack whose
/// manifest is broken right now, or whose folder is away for a moment, still has its cursor
/// and finds its events when it is back. Events for kinds no loaded pack subscribes to are
/// counted (`inbound.unrouted`) and compacted away once every known pack's cursor has passed
/// them (a pack that stays away holds them for at most the replay retention).
pub struct Inbound {
    pub events: Vec<Envelope>,
    /// Pulled events that could not be read: dead-lettered with the cursor that passes them.
    pub unreadable: Vec<Unreadable>,
    /// The upstream's pull cursor after these events, stored in the same transaction.
    pub cursor: Option<PullCursor>,
}
impl Message for Inbound {
    type Result = Result<usize, StoreError>;
}
impl Handler<Inbound> for Router {
    type Result = ResponseFuture<Result<usize, StoreError>>;
    fn handle(&mut self, m: Inbound, ctx: &mut Context<Self>) -> Self::Result {
        let table = self.table.load();
        let total = m.events.len();
        let unrouted = m
            .events
            .iter()
            .filter(|e| table.subscribers_of(&e.kind).is_empty())
            .count();
        let routed: Vec<(Arc<Envelope>, Arc<str>)> = m
            .events
            .into_iter()
            .map(|e| {
                let body: Arc<str> = e.to_json().into();
                (Arc::new(e), body)
            })
            .collect();
        let unreadable = m.unreadable;
        let dead = unreadable.len() as i64;
        let cursor = m.cursor;
        let store = self.store.clone();
        let stats = self.stats.clone();
        let me = ctx.address();
        let envs: Vec<Arc<Envelope>> = routed.iter().map(|(e, _)| e.clone()).collect();
        let own = envs.iter().filter(|e| e.kind.starts_with("agent:")).count() as u64;
        let tapped = self.stats.tap.active().then(|| envs.clone());
        // For the trace log when no tap took the copy.
        let traced: Vec<Arc<Envelope>> =
            if tapped.is_none() && tracing::enabled!(tracing::Level::TRACE) {
                envs.clone()
            } else {
                Vec::new()
            };
        Box::pin(async move {
            if !routed.is_empty() || !unreadable.is_empty() || cursor.is_some() {
                // Dispatched from the commit hook: packs see rows in commit order.
                let on_commit: OnCommit<Vec<i64>> = Box::new(move |seqs| {
                    let rows = seqs
                        .iter()
                        .zip(envs)
                        .map(|(seq, envelope)| InboundRow {
                            seq: *seq,
                            envelope,
                            target: None,
                        })
                        .collect();
                    me.do_send(Dispatch { rows });
                });
                store
                    .run_then(
                        AppendInbound {
                            events: routed,
                            unreadable,
                            cursor,
                        },
                        Some(on_commit),
                    )
                    .await?;
            }
            stats
                .inbound_accepted
                .fetch_add(total as u64 - own, Ordering::Relaxed);
            stats.inbound_agent.fetch_add(own, Ordering::Relaxed);
            if tracing::enabled!(tracing::Level::TRACE) {
                for e in tapped.iter().flatten().chain(&traced) {
                    tracing::trace!(kind = %e.kind, event_id = %e.event_id, "inbound event logged");
                }
            }
            if let Some(envs) = tapped {
                stats.tap.publish(|| {
                    let at_ms = now_ms();
                    envs.into_iter().map(move |envelope| TapEvent {
                        stage: Stage::Inbound,
                        at_ms,
                        pack: None,
                        detail: None,
                        envelope,
                    })
                });
            }
            stats
                .inbound_unrouted
                .fetch_add(unrouted as u64, Ordering::Relaxed);
            if dead > 0 {
                stats.dead_letters.fetch_add(dead, Ordering::Relaxed);
                stats
                    .inbound_dead_lettered
                    .fetch_add(dead as u64, Ordering::Relaxed);
            }
            Ok(total)
        })
    }
}

/// Add or replace the host of a pack.
pub struct RegisterHost {
    pub pack: String,
    pub addr: Addr<PackHost>,
}
impl Message for RegisterHost {
    type Result = ();
}
impl Handler<RegisterHost> for Router {
    type Result = ();
    fn handle(&mut self, m: RegisterHost, _: &mut Context<Self>) {
        self.hosts.insert(m.pack, m.addr);
    }
}

/// Forget a pack's host (it was removed).
pub struct UnregisterHost {
    pub pack: String,
}
impl Message for UnregisterHost {
    type Result = ();
}
impl Handler<UnregisterHost> for Router {
    type Result = ();
    fn handle(&mut self, m: UnregisterHost, _: &mut Context<Self>) {
        self.hosts.remove(&m.pack);
    }
}

/// Why an emit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmitError {
    /// Event `index` of the batch is invalid; nothing of the batch was accepted.
    #[error("{message}")]
    Rejected { index: usize, message: String },
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("agent unavailable: {0}")]
    Unavailable(String),
}

/// Validates producers' events against their pack's manifest and hands them to the queue.
/// Shared by the local API, the CLI's `emit`, native handlers and exec workers, so every
/// producer gets the same checks and the same messages.
#[derive(Clone)]
pub struct Emitter {
    pub table: SharedTable,
    pub identity: Arc<str>,
    pub queue: Addr<DurableQueue>,
    pub router: Addr<Router>,
    /// Deadlines and expiry rules of held events (`approvals` in agent.json).
    pub approvals: crate::approvals::SharedPolicy,
    /// Held events waiting (`approvals.max_pending` bounds them).
    pub stats: Arc<AgentStats>,
}

/// What the local API is posted: a pack's event (a v2 envelope or a draft) or one of the
/// platform's v1 kernel events.
#[derive(Debug, Clone)]
pub enum Posted {
    Pack(Incoming),
    Kernel(KernelEvent),
}

/// The `pack` column of the outbox rows of v1 kernel events: no pack emitted them (and no pack
/// id can have parentheses).
pub const PLATFORM_PRODUCER: &str = "(platform)";

impl Emitter {
    /// Checks every event and builds the envelopes. `pack`: the emitting pack when known (a
    /// handler); otherwise the pack whose slug prefixes each kind.
    pub fn prepare(
        &self,
        pack: Option<&str>,
        items: Vec<Incoming>,
    ) -> Result<Vec<Accepted>, EmitError> {
        self.prepare_posted(pack, items.into_iter().map(Posted::Pack).collect())
    }

    /// [`Emitter::prepare`] for a batch that may hold v1 kernel events: those are durable
    /// (`queue`), go upstream exactly as posted, and reach packs subscribed to
    /// `kernel:<kind>`.
    pub fn prepare_posted(
        &self,
        pack: Option<&str>,
        items: Vec<Posted>,
    ) -> Result<Vec<Accepted>, EmitError> {
        let table = self.table.load();
        let now = SystemTime::now();
        let mut out = Vec::with_capacity(items.len());
        for (index, item) in items.into_iter().enumerate() {
            let accepted = match item {
                Posted::Pack(item) => self.prepare_pack_event(&table, pack, item, now),
                Posted::Kernel(event) => Ok(self.prepare_kernel_event(&table, event)),
            };
            out.push(accepted.map_err(|message| EmitError::Rejected { index, message })?);
        }
        let held = out.iter().filter(|e| e.hold.is_some()).count() as i64;
        if held > 0 {
            let max = self.approvals.load().max_pending;
            let pending = self.stats.approvals.pending.load(Ordering::Acquire);
            if pending + held > max as i64 {
                self.stats
                    .queue
                    .backpressure_rejections
                    .fetch_add(1, Ordering::Relaxed);
                return Err(EmitError::Queue(QueueError::HeldFull {
                    pending,
                    max,
                    retry_after_s: 10,
                }));
            }
        }
        Ok(out)
    }

    fn prepare_pack_event(
        &self,
        table: &RoutingTable,
        pack: Option<&str>,
        item: Incoming,
        now: SystemTime,
    ) -> Result<Accepted, String> {
        let kind = item.kind().to_string();
        if is_reserved(&kind) {
            return Err(format!(
                "Unknown kind at emit: \"{kind}\" is in a reserved namespace; packs may subscribe to it, never emit it (inject it with `emit --inbound`)"
            ));
        }
        let manifest = match pack {
            Some(p) => table.packs.get(p),
            None => namespace_of(&kind)
                .and_then(|ns| table.by_slug.get(ns))
                .and_then(|id| table.packs.get(id)),
        };
        let Some(manifest) = manifest else {
            return Err(match pack {
                Some(p) => format!("Unknown kind at emit: pack \"{p}\" is not loaded"),
                None => format!(
                    "Unknown kind at emit: no loaded pack has the slug \"{}\" (kind \"{kind}\")",
                    namespace_of(&kind).unwrap_or(&kind)
                ),
            });
        };
        let class = manifest.check_emit(&kind).map_err(|e| e.to_string())?;
        let envelope = item.complete(&self.identity, now);
        let body: Arc<str> = envelope.to_json().into();
        let hold = manifest.required_approvals.contains(&kind).then(|| {
            Arc::new(crate::approvals::Hold::new(
                &envelope,
                &manifest.id,
                &self.approvals.load(),
                &self.identity,
                now,
            ))
        });
        Ok(Accepted {
            local: !table.subscribers_of(&envelope.kind).is_empty(),
            envelope: Arc::new(envelope),
            body,
            pack: manifest.id.clone(),
            class,
            hold,
        })
    }

    /// A v1 kernel event: durable, its body (what goes upstream) the event as posted.
    fn prepare_kernel_event(&self, table: &RoutingTable, event: KernelEvent) -> Accepted {
        let envelope = event.to_envelope(&self.identity);
        Accepted {
            local: !table.subscribers_of(&envelope.kind).is_empty(),
            body: event.to_json().into(),
            envelope: Arc::new(envelope),
            pack: PLATFORM_PRODUCER.to_string(),
            class: DeliveryClass::Queue,
            hold: None,
        }
    }

    /// Emits a batch; all or nothing. Returns the event ids in order.
    pub async fn emit(
        &self,
        pack: Option<&str>,
        items: Vec<Incoming>,
    ) -> Result<Vec<String>, EmitError> {
        self.emit_posted(pack, items.into_iter().map(Posted::Pack).collect())
            .await
    }

    /// [`Emitter::emit`] for a batch that may hold v1 kernel events (the local API's).
    pub async fn emit_posted(
        &self,
        pack: Option<&str>,
        items: Vec<Posted>,
    ) -> Result<Vec<String>, EmitError> {
        let events = self.prepare_posted(pack, items)?;
        let ids = events.iter().map(|e| e.envelope.event_id.clone()).collect();
        self.queue
            .send(Accept { events })
            .await
            .map_err(|e| EmitError::Unavailable(e.to_string()))??;
        Ok(ids)
    }

    /// Injects events as if they came from the upstream.
    pub async fn inbound(&self, events: Vec<Envelope>) -> Result<usize, EmitError> {
        self.router
            .send(Inbound {
                events,
                unreadable: Vec::new(),
                cursor: None,
            })
            .await
            .map_err(|e| EmitError::Unavailable(e.to_string()))?
            .map_err(|e| EmitError::Queue(QueueError::Store(e)))
    }
}
