//! `Tap`: a live, lossy copy of the events flowing through the agent, for `lumenflow-agent tap`.
//!
//! Owns a bounded broadcast ring ([`TAP_RING`] entries). The actors that accept, deliver, emit
//! and dead-letter events publish into it; each tap (a `GET /v1/tap` stream) reads from it at
//! its own pace.
//!
//! Guarantees:
//! - **Never slows the agent**: with no tap attached, publishing is one atomic load. With taps,
//!   it is an `Arc` clone and a push into the ring; it never waits for a reader.
//! - **Lossy, and says so**: a reader that falls more than [`TAP_RING`] entries behind skips
//!   the oldest and is told how many it lost (`Lagged`).
//! - **Bounded memory**: the ring holds at most [`TAP_RING`] entries, whatever the number of
//!   taps and however slowly they read. Entries share the agent's envelopes (no copy of the
//!   payload is made while publishing).
//! - Nothing here is durable: the tap observes, the inbound log and the outbox keep the events.

use lumenflow_pack_sdk::Envelope;
use serde::Serialize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::broadcast;

/// Entries kept for taps that read slowly.
pub const TAP_RING: usize = 1024;

/// Where in its life an event was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Logged by the agent: from the upstream, the local API (`/v1/inbound`) or the agent
    /// itself (`agent:*`).
    Inbound,
    /// Accepted from a producer (the local API, `emit`) for the upstream and local packs.
    Accepted,
    /// Emitted by a pack's handler (committed with the outcome of the event it handled).
    Emitted,
    /// A pack's handler finished with it (the outcome says how).
    Delivered,
    /// Dead-lettered (see `lumenflow-agent dlq list`).
    DeadLettered,
}

/// One event as a tap sees it.
#[derive(Debug, Clone)]
pub struct TapEvent {
    pub stage: Stage,
    pub at_ms: i64,
    /// The pack that emitted it, was delivered it, or dead-lettered it.
    pub pack: Option<String>,
    /// `handled`, `replayed`, `ignored`, `failed`, `retry` (delivered), or the error
    /// (dead-lettered).
    pub detail: Option<String>,
    pub envelope: Arc<Envelope>,
}

/// The hub. One per agent (in `AgentStats`).
#[derive(Debug)]
pub struct Tap {
    tx: broadcast::Sender<Arc<TapEvent>>,
    listeners: Arc<AtomicUsize>,
}

impl Default for Tap {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(TAP_RING);
        Tap {
            tx,
            listeners: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl Tap {
    /// Whether any tap is attached (publishers skip building entries otherwise).
    pub fn active(&self) -> bool {
        self.listeners.load(Ordering::Relaxed) > 0
    }

    /// Publishes what `make` builds, only while a tap is attached.
    pub fn publish(&self, make: impl FnOnce() -> Vec<TapEvent>) {
        if self.active() {
            for e in make() {
                let _ = self.tx.send(Arc::new(e));
            }
        }
    }

    /// Attaches a tap; it sees what is published from now on.
    pub fn subscribe(&self) -> TapReader {
        self.listeners.fetch_add(1, Ordering::Relaxed);
        TapReader {
            rx: self.tx.subscribe(),
            listeners: self.listeners.clone(),
        }
    }

    /// Taps attached now.
    pub fn listeners(&self) -> usize {
        self.listeners.load(Ordering::Relaxed)
    }
}

/// What a tap reads next.
#[derive(Debug)]
pub enum Next {
    Event(Arc<TapEvent>),
    /// The reader fell behind: this many entries were skipped.
    Lost(u64),
    /// The agent is stopping.
    Closed,
}

/// One attached tap; detaches when dropped.
#[derive(Debug)]
pub struct TapReader {
    rx: broadcast::Receiver<Arc<TapEvent>>,
    listeners: Arc<AtomicUsize>,
}

impl TapReader {
    pub async fn next(&mut self) -> Next {
        match self.rx.recv().await {
            Ok(e) => Next::Event(e),
            Err(broadcast::error::RecvError::Lagged(n)) => Next::Lost(n),
            Err(broadcast::error::RecvError::Closed) => Next::Closed,
        }
    }
}

impl TapReader {
    /// The next entry if one is there now (`None`: none is).
    pub fn try_next(&mut self) -> Option<Next> {
        match self.rx.try_recv() {
            Ok(e) => Some(Next::Event(e)),
            Err(broadcast::error::TryRecvError::Lagged(n)) => Some(Next::Lost(n)),
            Err(broadcast::error::TryRecvError::Closed) => Some(Next::Closed),
            Err(broadcast::error::TryRecvError::Empty) => None,
        }
    }
}

impl Drop for TapReader {
    fn drop(&mut self) {
        self.listeners.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether `kind` matches a tap's pattern: `*` matches any run of characters (`demo.*`,
/// `*.failed`, `agent:*`); anything else matches itself.
pub fn kind_matches(pattern: &str, kind: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == kind;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !kind.starts_with(first) || kind.len() < first.len() + last.len() || !kind.ends_with(last) {
        return false;
    }
    let mut rest = &kind[first.len()..kind.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use lumenflow_pack_sdk::EventDraft;

    fn event(kind: &str) -> TapEvent {
        TapEvent {
            stage: Stage::Inbound,
            at_ms: 0,
            pack: None,
            detail: None,
            envelope: Arc::new(
                EventDraft::new(kind, Default::default()).build("ws", std::time::SystemTime::now()),
            ),
        }
    }

    #[test]
    fn patterns_match_like_globs() {
        assert!(kind_matches("*", "demo.a"));
        assert!(kind_matches("demo.*", "demo.a"));
        assert!(!kind_matches("demo.*", "demox.a"));
        assert!(kind_matches("*.failed", "ci.run.failed"));
        assert!(kind_matches("agent:*", "agent:pack_crashed"));
        assert!(kind_matches("a*b*c", "axxbyyc"));
        assert!(!kind_matches("a*b*c", "axxc"));
        assert!(!kind_matches("ab*ba", "aba"));
        assert!(kind_matches("demo.a", "demo.a"));
        assert!(!kind_matches("demo.a", "demo.ab"));
    }

    #[actix_rt::test]
    async fn nothing_is_built_without_a_tap_and_a_slow_tap_is_told_what_it_lost() {
        let tap = Tap::default();
        let mut built = 0;
        tap.publish(|| {
            built += 1;
            vec![event("demo.a")]
        });
        assert_eq!(built, 0, "no tap attached: nothing is built");
        let mut reader = tap.subscribe();
        assert!(tap.active());
        for _ in 0..TAP_RING + 10 {
            tap.publish(|| vec![event("demo.a")]);
        }
        match reader.next().await {
            Next::Lost(n) => assert_eq!(n, 10),
            other => panic!("expected a loss, got {other:?}"),
        }
        assert!(matches!(reader.next().await, Next::Event(_)));
        drop(reader);
        assert!(!tap.active(), "a dropped reader detaches");
    }
}
