//! Live counters of the agent, shared by the actors that update them and read by `status` and
//! `/metrics` without a round trip through any actor (so a status request never waits behind
//! a busy mailbox).

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

/// State of a pack (SPEC §12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PackState {
    Running,
    Restarting,
    Crashed,
    Invalid,
    Stopped,
    /// Loaded, with nothing to run: no runtime and no subscriptions (a tools-only pack).
    Idle,
}

impl PackState {
    fn from_u64(v: u64) -> Self {
        match v {
            0 => PackState::Running,
            1 => PackState::Restarting,
            2 => PackState::Crashed,
            3 => PackState::Invalid,
            5 => PackState::Idle,
            _ => PackState::Stopped,
        }
    }
    fn to_u64(self) -> u64 {
        match self {
            PackState::Running => 0,
            PackState::Restarting => 1,
            PackState::Crashed => 2,
            PackState::Invalid => 3,
            PackState::Stopped => 4,
            PackState::Idle => 5,
        }
    }
}

fn lock_str(m: &Mutex<Option<String>>) -> Option<String> {
    m.lock().map(|g| g.clone()).unwrap_or(None)
}

fn set_str(m: &Mutex<Option<String>>, v: Option<String>) {
    if let Ok(mut g) = m.lock() {
        *g = v;
    }
}

#[derive(Debug, Default)]
pub struct PackStats {
    state: AtomicU64,
    pub handled: AtomicU64,
    pub replayed: AtomicU64,
    pub ignored: AtomicU64,
    pub failed: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub restarts: AtomicU64,
    pub pending: AtomicI64,
    /// Events this pack produced (its handlers' emits, and events posted in its name).
    pub emitted: AtomicU64,
    /// Events of the chunk its handler is working on now (0: none), and since when (ms).
    pub in_flight: AtomicI64,
    pub in_flight_since_ms: AtomicI64,
    /// When a retried or crashed event is tried again (ms since the epoch; 0: none waits).
    pub next_retry_ms: AtomicI64,
    last_error: Mutex<Option<String>>,
    version: Mutex<Option<String>>,
    manifest_hash: Mutex<Option<String>>,
    pub loaded_at_ms: AtomicI64,
    /// What its worker is confined to (see `sandbox::describe`); `None` before it starts.
    sandbox: Mutex<Option<String>>,
}

impl PackStats {
    pub fn state(&self) -> PackState {
        PackState::from_u64(self.state.load(Ordering::Relaxed))
    }
    pub fn set_state(&self, s: PackState) {
        self.state.store(s.to_u64(), Ordering::Relaxed);
    }
    pub fn last_error(&self) -> Option<String> {
        lock_str(&self.last_error)
    }
    pub fn set_last_error(&self, e: Option<String>) {
        set_str(&self.last_error, e);
    }
    pub fn set_sandbox(&self, s: Option<String>) {
        set_str(&self.sandbox, s);
    }
    pub fn set_manifest(&self, version: &str, hash: &str) {
        set_str(&self.version, Some(version.to_string()));
        set_str(&self.manifest_hash, Some(hash.to_string()));
        self.loaded_at_ms
            .store(crate::store::now_ms(), Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
pub struct QueueStats {
    /// Durable events waiting for the upstream.
    pub durable_depth: AtomicI64,
    /// Creation time (ms) of the oldest waiting durable event; 0 when empty.
    pub oldest_ms: AtomicI64,
    pub accepted_queue: AtomicU64,
    pub accepted_ephemeral: AtomicU64,
    pub ephemeral_dropped: AtomicU64,
    pub backpressure_rejections: AtomicU64,
    /// `queue.max_depth` in force (handlers' emits check it without asking the queue actor).
    pub max_depth: AtomicU64,
}

#[derive(Debug, Default)]
pub struct UpstreamStats {
    pub mode: Mutex<Option<String>>,
    pub state: Mutex<Option<String>>,
    pub last_error: Mutex<Option<String>>,
    /// When `last_error` was set (ms since the epoch).
    pub last_error_ms: AtomicI64,
    pub last_success_ms: AtomicI64,
    pub pushed: AtomicU64,
    pub pulled: AtomicU64,
    pub heartbeat_ms: AtomicI64,
    /// Sync-port requests (telemetry, evidence) waiting for the control plane.
    pub records_waiting: AtomicI64,
    pub records_forwarded: AtomicU64,
    /// Records the control plane refused or has no endpoint for (dropped, logged).
    pub records_refused: AtomicU64,
    /// The NATS upstream's details (server, stream, consumers), refreshed every few seconds.
    pub nats: Mutex<Option<serde_json::Value>>,
    /// Messages waiting in this workspace's NATS consumers (its inbound lag).
    pub consumer_pending: AtomicI64,
    /// When the last publish ack arrived (NATS), ms since the epoch.
    pub last_ack_ms: AtomicI64,
    /// Consumers looked up again because they made no progress while messages waited.
    pub consumer_recoveries: AtomicU64,
}

#[derive(Debug, Default)]
pub struct ReloadStats {
    pub count: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    pub last_ms: AtomicI64,
    /// Why manifest edits are not being watched (`None`: they are).
    pub off: Mutex<Option<String>>,
}

/// Held events (`approvals`): what waits, what was decided since start.
#[derive(Debug, Default)]
pub struct ApprovalStats {
    /// Held events waiting for a decision (refreshed every second).
    pub pending: AtomicI64,
    pub approved: AtomicU64,
    pub rejected: AtomicU64,
    pub expired: AtomicU64,
    /// Decided events sent on (approved, or expired with `on_expiry: allow`).
    pub released: AtomicU64,
    /// Conductor mode: why the last exchange with the control plane failed (`None`: it did not).
    relay_error: Mutex<Option<String>>,
}

impl ApprovalStats {
    pub fn set_relay_error(&self, e: Option<String>) {
        set_str(&self.relay_error, e);
    }
}

/// Everything `status` shows, live.
#[derive(Debug)]
pub struct AgentStats {
    pub started: Instant,
    pub started_ms: i64,
    pub packs: RwLock<BTreeMap<String, Arc<PackStats>>>,
    pub queue: QueueStats,
    pub upstream: UpstreamStats,
    pub reload: ReloadStats,
    pub approvals: ApprovalStats,
    pub dead_letters: AtomicI64,
    pub replay_entries: AtomicI64,
    /// Inbound events from the upstream and the local API (not the agent's own).
    pub inbound_accepted: AtomicU64,
    /// The agent's own events (`agent:*`: crashes, dead letters, approvals), counted apart.
    pub inbound_agent: AtomicU64,
    pub inbound_unrouted: AtomicU64,
    /// Pulled events that could not be read, dead-lettered (origin `inbound`).
    pub inbound_dead_lettered: AtomicU64,
    pub store: Arc<crate::store::StoreStats>,
    /// The live, lossy event feed of `lumenflow-agent tap`.
    pub tap: crate::tap::Tap,
    /// Counter samples of the last minute, for rates (`sample_rates`).
    rates: Mutex<crate::rates::RateHistory>,
}

impl Default for AgentStats {
    fn default() -> Self {
        AgentStats {
            started: Instant::now(),
            started_ms: crate::store::now_ms(),
            packs: RwLock::new(BTreeMap::new()),
            queue: QueueStats::default(),
            upstream: UpstreamStats::default(),
            reload: ReloadStats::default(),
            approvals: ApprovalStats::default(),
            dead_letters: AtomicI64::new(0),
            replay_entries: AtomicI64::new(0),
            inbound_accepted: AtomicU64::new(0),
            inbound_agent: AtomicU64::new(0),
            inbound_unrouted: AtomicU64::new(0),
            inbound_dead_lettered: AtomicU64::new(0),
            store: Arc::new(crate::store::StoreStats::default()),
            tap: Default::default(),
            rates: Default::default(),
        }
    }
}

impl AgentStats {
    /// The stats of one pack, created on first use.
    pub fn pack(&self, id: &str) -> Arc<PackStats> {
        if let Ok(map) = self.packs.read() {
            if let Some(s) = map.get(id) {
                return s.clone();
            }
        }
        match self.packs.write() {
            Ok(mut map) => map.entry(id.to_string()).or_default().clone(),
            Err(_) => Arc::new(PackStats::default()),
        }
    }

    /// The stats of a pack that has them already (`None` for a producer that is no pack, such
    /// as the platform's v1 kernel events).
    pub fn existing_pack(&self, id: &str) -> Option<Arc<PackStats>> {
        self.packs.read().ok()?.get(id).cloned()
    }

    pub fn set_upstream(&self, mode: Option<&str>, state: &str, error: Option<String>) {
        if let Some(m) = mode {
            set_str(&self.upstream.mode, Some(m.to_string()));
        }
        set_str(&self.upstream.state, Some(state.to_string()));
        // Connected again: the last error is history (it used to say "disk full" for ever).
        if error.is_some() || state == "connected" {
            let at = if error.is_some() {
                crate::store::now_ms()
            } else {
                0
            };
            self.upstream.last_error_ms.store(at, Ordering::Relaxed);
            set_str(&self.upstream.last_error, error);
        }
    }

    pub fn set_reload_error(&self, e: Option<String>) {
        set_str(&self.reload.last_error, e);
    }

    /// The NATS details (refreshed each second), with the counters read now.
    fn nats_snapshot(&self) -> Option<serde_json::Value> {
        let mut n = self.upstream.nats.lock().ok().and_then(|n| n.clone())?;
        let last_ack = self.upstream.last_ack_ms.load(Ordering::Relaxed);
        n["last_ack_ms"] = (last_ack > 0).then_some(last_ack).into();
        n["consumer_recoveries"] = self
            .upstream
            .consumer_recoveries
            .load(Ordering::Relaxed)
            .into();
        Some(n)
    }

    /// A consistent-enough copy for `status --json` (each counter is read once).
    pub fn snapshot(&self) -> StatusSnapshot {
        let now = crate::store::now_ms();
        let rates = self.rates.lock().map(|h| h.rates()).unwrap_or_default();
        let packs = self
            .packs
            .read()
            .map(|m| {
                m.iter()
                    .map(|(id, s)| PackSnapshot {
                        id: id.clone(),
                        version: lock_str(&s.version),
                        state: s.state(),
                        handled: s.handled.load(Ordering::Relaxed),
                        replayed: s.replayed.load(Ordering::Relaxed),
                        ignored: s.ignored.load(Ordering::Relaxed),
                        failed: s.failed.load(Ordering::Relaxed),
                        retried: s.retried.load(Ordering::Relaxed),
                        dead_lettered: s.dead_lettered.load(Ordering::Relaxed),
                        restarts: s.restarts.load(Ordering::Relaxed),
                        pending: s.pending.load(Ordering::Relaxed).max(0),
                        last_error: s.last_error(),
                        manifest_hash: lock_str(&s.manifest_hash),
                        loaded_at_ms: s.loaded_at_ms.load(Ordering::Relaxed),
                        sandbox: lock_str(&s.sandbox),
                        emitted: s.emitted.load(Ordering::Relaxed),
                        in_flight: s.in_flight.load(Ordering::Relaxed).max(0),
                        in_flight_age_s: age_s(now, s.in_flight_since_ms.load(Ordering::Relaxed)),
                        next_retry_in_s: {
                            let at = s.next_retry_ms.load(Ordering::Relaxed);
                            (at > 0).then(|| ((at - now).max(0) as f64) / 1000.0)
                        },
                        rates: rates.pack(id),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let oldest = self.queue.oldest_ms.load(Ordering::Relaxed);
        let depth = self.queue.durable_depth.load(Ordering::Relaxed).max(0);
        StatusSnapshot {
            uptime_s: self.started.elapsed().as_secs(),
            packs,
            queue: QueueSnapshot {
                durable_depth: depth,
                oldest_age_s: if depth > 0 && oldest > 0 {
                    ((now - oldest).max(0) as f64) / 1000.0
                } else {
                    0.0
                },
                accepted_queue: self.queue.accepted_queue.load(Ordering::Relaxed),
                accepted_ephemeral: self.queue.accepted_ephemeral.load(Ordering::Relaxed),
                ephemeral_dropped: self.queue.ephemeral_dropped.load(Ordering::Relaxed),
                backpressure_rejections: self.queue.backpressure_rejections.load(Ordering::Relaxed),
            },
            upstream: UpstreamSnapshot {
                mode: lock_str(&self.upstream.mode).unwrap_or_default(),
                state: lock_str(&self.upstream.state).unwrap_or_default(),
                last_error: lock_str(&self.upstream.last_error),
                last_error_ms: self.upstream.last_error_ms.load(Ordering::Relaxed),
                last_success_ms: self.upstream.last_success_ms.load(Ordering::Relaxed),
                pushed: self.upstream.pushed.load(Ordering::Relaxed),
                pulled: self.upstream.pulled.load(Ordering::Relaxed),
                heartbeat_ms: self.upstream.heartbeat_ms.load(Ordering::Relaxed),
                records_waiting: self.upstream.records_waiting.load(Ordering::Relaxed),
                records_forwarded: self.upstream.records_forwarded.load(Ordering::Relaxed),
                records_refused: self.upstream.records_refused.load(Ordering::Relaxed),
                nats: self.nats_snapshot(),
            },
            inbound: InboundSnapshot {
                accepted: self.inbound_accepted.load(Ordering::Relaxed),
                agent: self.inbound_agent.load(Ordering::Relaxed),
                unrouted: self.inbound_unrouted.load(Ordering::Relaxed),
                dead_lettered: self.inbound_dead_lettered.load(Ordering::Relaxed),
            },
            replay_log_entries: self.replay_entries.load(Ordering::Relaxed).max(0),
            dead_letters: self.dead_letters.load(Ordering::Relaxed).max(0),
            reload: ReloadSnapshot {
                count: self.reload.count.load(Ordering::Relaxed),
                last_error: lock_str(&self.reload.last_error),
                last_ms: self.reload.last_ms.load(Ordering::Relaxed),
                watching: lock_str(&self.reload.off).is_none(),
                off: lock_str(&self.reload.off),
            },
            approvals: ApprovalSnapshot {
                pending: self.approvals.pending.load(Ordering::Relaxed).max(0),
                approved: self.approvals.approved.load(Ordering::Relaxed),
                rejected: self.approvals.rejected.load(Ordering::Relaxed),
                expired: self.approvals.expired.load(Ordering::Relaxed),
                released: self.approvals.released.load(Ordering::Relaxed),
                relay_error: lock_str(&self.approvals.relay_error),
                held: Vec::new(),
            },
            store: StoreSnapshot {
                commits: self.store.commits.load(Ordering::Relaxed),
                ops: self.store.ops.load(Ordering::Relaxed),
                failed_commits: self.store.failed_commits.load(Ordering::Relaxed),
            },
            taps: self.tap.listeners(),
            rates: rates.totals,
        }
    }

    /// Takes this second's sample of the counters that rates are made of (the agent calls it
    /// once a second).
    pub fn sample_rates(&self) {
        let packs = self
            .packs
            .read()
            .map(|m| {
                m.iter()
                    .map(|(id, s)| {
                        let delivered = s.handled.load(Ordering::Relaxed)
                            + s.replayed.load(Ordering::Relaxed)
                            + s.ignored.load(Ordering::Relaxed)
                            + s.failed.load(Ordering::Relaxed);
                        let counts = [
                            delivered,
                            s.emitted.load(Ordering::Relaxed),
                            s.dead_lettered.load(Ordering::Relaxed),
                        ];
                        (id.clone(), counts)
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let delivered = packs.iter().map(|(_, c)| c[0]).sum();
        let emitted = packs.iter().map(|(_, c)| c[1]).sum();
        let dead = packs.iter().map(|(_, c)| c[2]).sum::<u64>()
            + self.inbound_dead_lettered.load(Ordering::Relaxed);
        let packs = packs
            .into_iter()
            .map(|(id, c)| (id, [c[0], c[1]]))
            .collect();
        let totals = crate::rates::Counters {
            inbound: self.inbound_accepted.load(Ordering::Relaxed),
            accepted: self.queue.accepted_queue.load(Ordering::Relaxed)
                + self.queue.accepted_ephemeral.load(Ordering::Relaxed),
            emitted,
            delivered,
            pushed: self.upstream.pushed.load(Ordering::Relaxed),
            pulled: self.upstream.pulled.load(Ordering::Relaxed),
            dead_lettered: dead,
        };
        if let Ok(mut h) = self.rates.lock() {
            h.push(Instant::now(), totals, packs);
        }
    }
}

/// Seconds since `since_ms` (0: not set).
fn age_s(now: i64, since_ms: i64) -> f64 {
    if since_ms > 0 {
        ((now - since_ms).max(0) as f64) / 1000.0
    } else {
        0.0
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusSnapshot {
    pub uptime_s: u64,
    pub packs: Vec<PackSnapshot>,
    pub queue: QueueSnapshot,
    pub upstream: UpstreamSnapshot,
    pub inbound: InboundSnapshot,
    pub replay_log_entries: i64,
    pub dead_letters: i64,
    pub reload: ReloadSnapshot,
    pub approvals: ApprovalSnapshot,
    pub store: StoreSnapshot,
    /// Taps attached (`lumenflow-agent tap`).
    pub taps: usize,
    /// Events per second over the last 10 s and the last minute.
    pub rates: crate::rates::AgentRates,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApprovalSnapshot {
    pub pending: i64,
    pub approved: u64,
    pub rejected: u64,
    pub expired: u64,
    pub released: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_error: Option<String>,
    /// The oldest pending held events (filled in by the API from the database).
    pub held: Vec<crate::approvals::held::HeldSummary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PackSnapshot {
    pub id: String,
    pub version: Option<String>,
    pub state: PackState,
    pub handled: u64,
    pub replayed: u64,
    pub ignored: u64,
    pub failed: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub restarts: u64,
    pub pending: i64,
    pub last_error: Option<String>,
    pub manifest_hash: Option<String>,
    pub loaded_at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    pub emitted: u64,
    /// Events its handler works on now, and how long the oldest of them has been in flight.
    pub in_flight: i64,
    pub in_flight_age_s: f64,
    /// Seconds until a retried or crashed event is tried again.
    pub next_retry_in_s: Option<f64>,
    /// Events per second in (delivered to it) and out (emitted), over 10 s and 1 min.
    pub rates: crate::rates::PackRates,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueueSnapshot {
    pub durable_depth: i64,
    pub oldest_age_s: f64,
    pub accepted_queue: u64,
    pub accepted_ephemeral: u64,
    pub ephemeral_dropped: u64,
    pub backpressure_rejections: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct UpstreamSnapshot {
    pub mode: String,
    pub state: String,
    pub last_error: Option<String>,
    /// When `last_error` happened (ms since the epoch; 0 with no error).
    pub last_error_ms: i64,
    pub last_success_ms: i64,
    pub pushed: u64,
    pub pulled: u64,
    pub heartbeat_ms: i64,
    pub records_waiting: i64,
    pub records_forwarded: u64,
    pub records_refused: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InboundSnapshot {
    /// From the upstream and the local API.
    pub accepted: u64,
    /// The agent's own `agent:*` events.
    pub agent: u64,
    /// Logged with no loaded pack subscribing to the kind (kept for packs that come back).
    pub unrouted: u64,
    /// Unreadable pulled events, dead-lettered with the reason.
    pub dead_lettered: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReloadSnapshot {
    pub count: u64,
    pub last_error: Option<String>,
    pub last_ms: i64,
    /// Whether manifest edits are watched.
    pub watching: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub off: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StoreSnapshot {
    pub commits: u64,
    pub ops: u64,
    pub failed_commits: u64,
}
