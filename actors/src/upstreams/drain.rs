//! The delivery loop every upstream shares (mem:inbox, the HTTP control plane, NATS
//! JetStream): what a round is, how it is booked, and when the next one runs. A transport only
//! says how a batch is sent and what was acknowledged.
//!
//! - **One round at a time.** A round takes the oldest outbox rows (in order) and the waiting
//!   ephemeral events; work that arrives meanwhile marks the loop dirty, and runs next.
//! - **Ack accounting.** A round ends [`Settled`]: the rows the upstream acknowledged (removed
//!   in the settling transaction), the ones it rejected (dead-lettered with its reason), what was
//!   sent. The queue's depth, the oldest row's age, the pushed counter and the success time are
//!   booked here, the same way for every upstream.
//! - **Backoff.** A retryable failure waits with full-jitter exponential backoff (or the
//!   server's Retry-After); a round that acknowledged something resets it (progress, not an
//!   outage). Ephemeral events of a failed round, and those waiting while the link is down,
//!   are dropped and counted: never delivered late.

use crate::queue::Accepted;
use crate::stats::AgentStats;
use crate::store::{now_ms, StoreError};
use crate::supervision::full_jitter;
use crate::upstreams::outbox::Item;
use actix::prelude::*;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The longest backoff between rounds that failed.
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// Longest wait a `Retry-After` can impose: the backoff's cap.
pub const MAX_RETRY_AFTER: Duration = BACKOFF_CAP;

/// Ephemeral events held in memory while the upstream is busy.
const RING_MAX: usize = 100_000;
/// ... and their bytes: 100,000 events of 8 MB would otherwise be allowed.
pub const RING_MAX_BYTES: usize = 64 << 20;
/// Most event bytes in one round (a single larger event still goes, alone): rounds were bounded
/// by count only, and 60 events of 8 MB took the agent to 1.29 GB.
pub const ROUND_MAX_BYTES: usize = 8 << 20;

/// Ephemeral events waiting in memory for the upstream (SPEC §6: memory only, fail-silent).
/// Bounded: what does not fit, or arrives while the upstream refuses it, is dropped and
/// counted.
#[derive(Default)]
pub struct EphemeralRing {
    events: VecDeque<Accepted>,
    bytes: usize,
}

impl EphemeralRing {
    /// Keeps `events` if `accepting` and there is room; drops and counts the rest.
    pub fn offer(&mut self, events: Vec<Accepted>, accepting: bool, stats: &AgentStats) {
        for e in events {
            let fits = self.events.len() < RING_MAX && self.bytes + e.body.len() <= RING_MAX_BYTES;
            if accepting && fits {
                self.bytes += e.body.len();
                self.events.push_back(e);
            } else {
                stats
                    .queue
                    .ephemeral_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Takes up to `max` of the oldest events, and at most [`ROUND_MAX_BYTES`] of them (at
    /// least one).
    pub fn take(&mut self, max: usize) -> Vec<Accepted> {
        let (mut n, mut bytes) = (0, 0);
        for e in self.events.iter().take(max) {
            if n > 0 && bytes + e.body.len() > ROUND_MAX_BYTES {
                break;
            }
            bytes += e.body.len();
            n += 1;
        }
        self.bytes -= bytes;
        self.events.drain(..n).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Drops and counts everything waiting: the upstream turned out to be down, and ephemeral
    /// events are never delivered late.
    pub fn drop_all(&mut self, stats: &AgentStats) {
        let n = self.events.len();
        self.events.clear();
        self.bytes = 0;
        stats
            .queue
            .ephemeral_dropped
            .fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// New work: ephemeral events to send, and whether durable ones were added to the outbox.
pub struct Push {
    pub ephemeral: Vec<Accepted>,
    pub durable: bool,
}
impl Message for Push {
    type Result = ();
}

/// Is the upstream idle (nothing in flight, nothing waiting in memory)? Used to drain at stop.
pub struct IsIdle;
impl Message for IsIdle {
    type Result = bool;
}

/// How a round ended.
pub enum End {
    /// Everything sent, acknowledged or rejected.
    Done,
    /// Stopped on a retryable failure; the ephemeral events not sent are dropped.
    Retry {
        error: String,
        retry_after: Option<u64>,
        dropped_ephemeral: usize,
    },
    /// Stopped on an authorization failure; the ephemeral events not sent are dropped.
    Unauthorized {
        error: String,
        dropped_ephemeral: usize,
    },
}

/// A round, settled in the outbox.
pub struct Settled {
    pub end: End,
    /// Events accepted by the upstream (durable and ephemeral).
    pub sent: usize,
    /// Outbox rows gone (acknowledged or dead-lettered).
    pub removed: usize,
    pub dead_lettered: usize,
    /// Creation time of the oldest row still waiting.
    pub oldest: i64,
    /// Rows may still wait behind this round (false: the round took everything).
    pub more: bool,
}

/// What the transport does next, decided by [`DrainLoop::finish`].
#[derive(Debug, PartialEq)]
pub enum Next {
    /// A round delivered: run the next one now.
    Again,
    /// Nothing was waiting.
    Idle,
    /// A retryable failure: try again after the wait.
    Backoff { wait: Duration, error: String },
    /// The upstream refused the credentials: pause (nothing is dropped).
    Unauthorized(String),
    /// The outbox could not be read or settled: try again in a second.
    Store(String),
}

/// The loop's state: one round in flight, work noted meanwhile, the backoff attempt, the
/// ephemeral ring.
pub struct DrainLoop {
    busy: bool,
    dirty: bool,
    attempt: u32,
    pub ring: EphemeralRing,
    pub batch_max: usize,
}

impl DrainLoop {
    pub fn new(batch_max: usize) -> Self {
        DrainLoop {
            busy: false,
            dirty: true,
            attempt: 0,
            ring: EphemeralRing::default(),
            batch_max,
        }
    }

    /// New work: the ephemeral events (dropped and counted unless `accepting`), and whether
    /// the outbox grew.
    pub fn push(&mut self, m: Push, accepting: bool, stats: &AgentStats) {
        self.ring.offer(m.ephemeral, accepting, stats);
        if m.durable || !self.ring.is_empty() {
            self.dirty = true;
        }
    }

    /// Starts a round if none is in flight and work waits.
    pub fn begin(&mut self) -> bool {
        if self.busy || !self.dirty {
            return false;
        }
        self.busy = true;
        self.dirty = false;
        true
    }

    /// The ephemeral events of the round (at most `batch_max`).
    pub fn take_ephemeral(&mut self) -> Vec<Accepted> {
        self.ring.take(self.batch_max)
    }

    /// The same, as push items.
    pub fn take_ephemeral_items(&mut self) -> Vec<Item> {
        self.take_ephemeral().iter().map(Item::ephemeral).collect()
    }

    /// Marks work waiting (a retry will run a round).
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// After a restart of the actor: nothing is in flight, and the outbox is looked at again.
    pub fn restarted(&mut self) {
        self.busy = false;
        self.dirty = true;
    }

    /// A round is in flight.
    pub fn busy(&self) -> bool {
        self.busy
    }

    /// Nothing in flight and nothing in memory.
    pub fn idle(&self) -> bool {
        !self.busy && self.ring.is_empty()
    }

    /// Nothing in flight, nothing in memory, nothing noted.
    pub fn quiet(&self) -> bool {
        self.idle() && !self.dirty
    }

    /// Books a finished round and says what comes next.
    pub fn finish(
        &mut self,
        round: Result<Option<Settled>, StoreError>,
        stats: &AgentStats,
    ) -> Next {
        self.busy = false;
        let settled = match round {
            Ok(Some(s)) => s,
            Ok(None) => return Next::Idle,
            Err(e) => {
                self.dirty = true;
                return Next::Store(e.to_string());
            }
        };
        let q = &stats.queue;
        q.durable_depth
            .fetch_sub(settled.removed as i64, Ordering::AcqRel);
        q.oldest_ms.store(settled.oldest, Ordering::Relaxed);
        if settled.dead_lettered > 0 {
            stats
                .dead_letters
                .fetch_add(settled.dead_lettered as i64, Ordering::Relaxed);
        }
        stats
            .upstream
            .pushed
            .fetch_add(settled.sent as u64, Ordering::Relaxed);
        match settled.end {
            End::Done => {
                stats
                    .upstream
                    .last_success_ms
                    .store(now_ms(), Ordering::Relaxed);
                self.attempt = 0;
                if settled.more || !self.ring.is_empty() {
                    self.dirty = true;
                }
                Next::Again
            }
            End::Retry {
                error,
                retry_after,
                dropped_ephemeral,
            } => {
                q.ephemeral_dropped
                    .fetch_add(dropped_ephemeral as u64, Ordering::Relaxed);
                // Offered while this round was in flight, before the link was known down.
                self.ring.drop_all(stats);
                // A partial ack is progress: the rest goes again soon, not after a backoff
                // that grew while nothing went through.
                if settled.sent > 0 {
                    self.attempt = 0;
                }
                self.attempt += 1;
                self.dirty = true;
                // Retry-After is honoured up to the backoff's own cap: `Retry-After: 86400`
                // must not stall forwarding for a day while heartbeats go through.
                let wait = retry_after
                    .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER))
                    .unwrap_or_else(|| {
                        full_jitter(Duration::from_millis(200), BACKOFF_CAP, self.attempt)
                    });
                Next::Backoff { wait, error }
            }
            End::Unauthorized {
                error,
                dropped_ephemeral,
            } => {
                q.ephemeral_dropped
                    .fetch_add(dropped_ephemeral as u64, Ordering::Relaxed);
                self.ring.drop_all(stats);
                self.dirty = true;
                Next::Unauthorized(error)
            }
        }
    }

    /// The backoff attempt (1 after the first failure).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn big_event(bytes: usize) -> Accepted {
        let mut p = serde_json::Map::new();
        p.insert("blob".into(), "x".repeat(bytes).into());
        crate::queue::test_event("demo:big", p, lumenflow_pack_sdk::DeliveryClass::Ephemeral)
    }

    #[test]
    fn the_ring_and_its_rounds_are_bounded_in_bytes() {
        let stats = AgentStats::default();
        let mut ring = EphemeralRing::default();
        // 20 events of 5 MB: 64 MiB of them fit, the rest is dropped and counted.
        ring.offer((0..20).map(|_| big_event(5 << 20)).collect(), true, &stats);
        let dropped = stats.queue.ephemeral_dropped.load(Ordering::Relaxed);
        assert_eq!(dropped, 20 - (RING_MAX_BYTES / (5 << 20)) as u64);
        // A round takes at most ROUND_MAX_BYTES (one 5 MB event at a time here).
        assert_eq!(ring.take(100).len(), 1);
        // A single event over the round limit still goes, alone.
        let mut one = EphemeralRing::default();
        one.offer(vec![big_event(9 << 20), big_event(10)], true, &stats);
        assert_eq!(one.take(100).len(), 1);
        assert_eq!(one.take(100).len(), 1);
        assert!(one.is_empty());
    }

    fn settled(end: End, sent: usize, removed: usize) -> Option<Settled> {
        Some(Settled {
            end,
            sent,
            removed,
            dead_lettered: 0,
            oldest: 0,
            more: true,
        })
    }

    #[test]
    fn rounds_book_acks_and_back_off_with_progress_resetting_the_attempt() {
        let stats = AgentStats::default();
        stats.queue.durable_depth.store(10, Ordering::Relaxed);
        let mut d = DrainLoop::new(100);
        assert!(d.begin());
        assert!(!d.begin(), "one round at a time");
        assert_eq!(d.finish(Ok(settled(End::Done, 4, 4)), &stats), Next::Again);
        assert_eq!(stats.queue.durable_depth.load(Ordering::Relaxed), 6);
        for expected_attempt in 1..=3 {
            assert!(d.begin());
            let next = d.finish(
                Ok(settled(
                    End::Retry {
                        error: "503".into(),
                        retry_after: None,
                        dropped_ephemeral: 0,
                    },
                    0,
                    0,
                )),
                &stats,
            );
            assert!(matches!(next, Next::Backoff { .. }));
            assert_eq!(d.attempt(), expected_attempt);
        }
        // A partial ack: progress, the attempt starts over.
        assert!(d.begin());
        d.finish(
            Ok(settled(
                End::Retry {
                    error: "accepted 2 of 5".into(),
                    retry_after: Some(3),
                    dropped_ephemeral: 0,
                },
                2,
                2,
            )),
            &stats,
        );
        assert_eq!(d.attempt(), 1);
        // A day of Retry-After is capped at the backoff's cap.
        assert!(d.begin());
        let next = d.finish(
            Ok(settled(
                End::Retry {
                    error: "429".into(),
                    retry_after: Some(86_400),
                    dropped_ephemeral: 0,
                },
                0,
                0,
            )),
            &stats,
        );
        assert!(
            matches!(next, Next::Backoff { wait, .. } if wait == MAX_RETRY_AFTER),
            "{next:?}"
        );
        assert!(d.begin());
        assert_eq!(d.finish(Ok(None), &stats), Next::Idle);
        assert!(d.quiet());
    }
}
