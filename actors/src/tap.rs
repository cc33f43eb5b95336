//! `Tap`: a live, lossy copy of the events flowing through the agent, for `lumenflow-agent tap`.
//!
//! Owns a bounded ring ([`TAP_RING`] entries) with a sequence number per entry. The actors that
//! accept, deliver, emit and dead-letter events publish into it, a batch at a time; each tap
//! (a `GET /v1/tap` stream) keeps its own position and reads at its own pace.
//!
//! Guarantees:
//! - **Never slows the agent**: with no tap attached, publishing is one atomic load. With taps,
//!   it is one lock per batch (not per event) and, per event, a few reference-count increments:
//!   no allocation, no copy of the payload, and never a wait for a reader.
//! - **Lossy, and says so**: a reader whose position fell out of the ring (more than
//!   [`TAP_RING`] entries behind) skips to the oldest entry and is told how many it lost.
//! - **Bounded memory**: the ring holds at most [`TAP_RING`] entries, whatever the number of
//!   taps and however slowly they read.
//! - Nothing here is durable: the tap observes, the inbound log and the outbox keep the events.

use lumenflow_pack_sdk::Envelope;
use serde::Serialize;
use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

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
    pub pack: Option<Arc<str>>,
    /// `handled`, `replayed`, `ignored`, `failed`, `retry` (delivered), or the error
    /// (dead-lettered).
    pub detail: Option<Cow<'static, str>>,
    pub envelope: Arc<Envelope>,
}

#[derive(Debug, Default)]
struct Ring {
    entries: VecDeque<TapEvent>,
    /// Sequence number of the next entry (the first entry's is `next - entries.len()`).
    next: u64,
}

#[derive(Debug, Default)]
struct Shared {
    ring: Mutex<Ring>,
    listeners: AtomicUsize,
    published: Notify,
}

/// The hub. One per agent (in `AgentStats`).
#[derive(Debug, Default)]
pub struct Tap {
    shared: Arc<Shared>,
}

impl Tap {
    /// Whether any tap is attached (publishers skip building entries otherwise).
    pub fn active(&self) -> bool {
        self.shared.listeners.load(Ordering::Relaxed) > 0
    }

    /// Publishes what `make` yields, only while a tap is attached: one lock for the batch.
    pub fn publish<I: IntoIterator<Item = TapEvent>>(&self, make: impl FnOnce() -> I) {
        if !self.active() {
            return;
        }
        let events = make().into_iter();
        let Ok(mut ring) = self.shared.ring.lock() else {
            return;
        };
        let mut n = 0;
        for e in events {
            ring.entries.push_back(e);
            n += 1;
        }
        let excess = ring.entries.len().saturating_sub(TAP_RING);
        ring.entries.drain(..excess);
        ring.next += n;
        drop(ring);
        if n > 0 {
            self.shared.published.notify_waiters();
        }
    }

    /// Attaches a tap; it sees what is published from now on.
    pub fn subscribe(&self) -> TapReader {
        self.shared.listeners.fetch_add(1, Ordering::Relaxed);
        let next = self.shared.ring.lock().map(|r| r.next).unwrap_or(0);
        TapReader {
            shared: self.shared.clone(),
            next,
        }
    }

    /// Taps attached now.
    pub fn listeners(&self) -> usize {
        self.shared.listeners.load(Ordering::Relaxed)
    }
}

/// What a tap reads next.
#[derive(Debug)]
pub enum Next {
    Event(TapEvent),
    /// The reader fell behind: this many entries were skipped.
    Lost(u64),
}

/// One attached tap; detaches when dropped.
#[derive(Debug)]
pub struct TapReader {
    shared: Arc<Shared>,
    /// Sequence number of the next entry this reader takes.
    next: u64,
}

impl TapReader {
    /// Up to `max` entries there now (a loss first, if this reader fell out of the ring).
    pub fn take(&mut self, max: usize) -> Vec<Next> {
        let Ok(ring) = self.shared.ring.lock() else {
            return Vec::new();
        };
        let first = ring.next - ring.entries.len() as u64;
        let mut out = Vec::new();
        if self.next < first {
            out.push(Next::Lost(first - self.next));
            self.next = first;
        }
        let from = (self.next - first) as usize;
        out.extend(
            ring.entries
                .iter()
                .skip(from)
                .take(max)
                .cloned()
                .map(Next::Event),
        );
        self.next += (out.len() - usize::from(matches!(out.first(), Some(Next::Lost(_))))) as u64;
        out
    }

    /// Waits for entries, then takes up to `max` of them.
    pub async fn next(&mut self, max: usize) -> Vec<Next> {
        loop {
            // Registered before looking, so a publish in between is not missed.
            let shared = self.shared.clone();
            let published = shared.published.notified();
            tokio::pin!(published);
            published.as_mut().enable();
            let got = self.take(max);
            if !got.is_empty() {
                return got;
            }
            published.await;
        }
    }
}

impl Drop for TapReader {
    fn drop(&mut self) {
        self.shared.listeners.fetch_sub(1, Ordering::Relaxed);
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
        let got = reader.next(4).await;
        assert!(matches!(got[0], Next::Lost(10)), "{got:?}");
        assert_eq!(got.len(), 5, "the loss, then 4 entries");
        assert_eq!(reader.take(usize::MAX).len(), TAP_RING - 4);
        assert!(reader.take(10).is_empty(), "read to the end");
        // A publish wakes a waiting reader.
        let waiting = tokio::spawn(async move { reader.next(10).await.len() });
        tokio::task::yield_now().await;
        tap.publish(|| vec![event("demo.b"), event("demo.c")]);
        assert_eq!(waiting.await.unwrap(), 2);
        assert!(!tap.active(), "a dropped reader detaches");
    }
}
