//! `EffectStage`: the effects a pack's handlers ask of the agent while a chunk of events is being
//! handled (emits, replay keys), held until the chunk's progress is committed. Owned by one
//! `PackHost` (one stage per host incarnation; chunks run one at a time).
//!
//! Guarantees (the transactional outbox of SPEC §6's at-least-once delivery):
//! - **Effects commit with the outcome.** An event's emits and `replay.put` keys are written in
//!   the same SQLite transaction that records the event as finished and moves the cursor. An
//!   event that crashes, times out or asks for a retry leaves nothing behind: when it is
//!   redelivered, its effects are staged again, so each one is committed exactly once.
//! - **Read your writes.** `replay.has` sees keys staged earlier in the same chunk.
//! - **No stale effects.** Every call carries the [`Tag`] of the delivery it belongs to; a call
//!   from an abandoned delivery (a timed-out task, a killed worker's last lines) is refused.
//!
//! Effects outside the agent (a file, an HTTP call) cannot join that transaction: they run at
//! least once, and the quickstart's rule applies (upsert-shaped, or keyed by event_id).

use crate::queue::Accepted;
use lumenflow_pack_sdk::native::ServiceError;
use std::collections::HashSet;
use std::sync::Mutex;

/// Which delivery an effect belongs to: the chunk it ran in and the event's inbound seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    pub chunk: u64,
    pub seq: i64,
}

/// What a closed chunk commits.
#[derive(Default)]
pub struct Staged {
    pub emits: Vec<Accepted>,
    /// Handler keys, as given by the handler.
    pub puts: Vec<String>,
}

#[derive(Default)]
struct Inner {
    chunk: u64,
    open: bool,
    emits: Vec<(i64, Accepted)>,
    puts: Vec<(i64, String)>,
    keys: HashSet<String>,
    queued: i64,
    /// Emits the manifest refused, by delivery: such a delivery fails the same way every time.
    refused: Vec<(i64, String)>,
    /// Bytes of the staged emits.
    bytes: usize,
    /// Emits staged by each delivery.
    per_delivery: std::collections::HashMap<i64, usize>,
}

/// Most events one delivery may emit before its outcome is committed.
pub const MAX_EMITS_PER_DELIVERY: usize = 10_000;
/// Most bytes of events a chunk may hold staged (200,000 emits in one `handle` held 277 MB).
pub const MAX_STAGED_BYTES: usize = 64 << 20;

#[derive(Default)]
pub struct EffectStage {
    inner: Mutex<Inner>,
}

fn stale(tag: Tag) -> ServiceError {
    ServiceError::Unavailable(format!(
        "the delivery of inbound event {} this call belongs to was abandoned (crash or timeout)",
        tag.seq
    ))
}

impl EffectStage {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a chunk; returns its number (for the chunk's tags).
    pub fn open(&self) -> u64 {
        let mut s = self.lock();
        let chunk = s.chunk + 1;
        *s = Inner {
            chunk,
            open: true,
            ..Inner::default()
        };
        chunk
    }

    fn check(s: &Inner, tag: Tag) -> Result<(), ServiceError> {
        if s.open && s.chunk == tag.chunk {
            Ok(())
        } else {
            Err(stale(tag))
        }
    }

    /// Durable events staged in the open chunk (they count against `queue.max_depth`).
    pub fn queued(&self) -> i64 {
        self.lock().queued
    }

    pub fn emit(&self, tag: Tag, events: Vec<Accepted>) -> Result<(), ServiceError> {
        let mut s = self.lock();
        Self::check(&s, tag)?;
        let bytes: usize = events.iter().map(|e| e.body.len()).sum();
        let count = s.per_delivery.get(&tag.seq).copied().unwrap_or(0) + events.len();
        if count > MAX_EMITS_PER_DELIVERY {
            return Err(ServiceError::Rejected(format!(
                "Too many emits: one delivery may emit at most {MAX_EMITS_PER_DELIVERY} events (they are held until its outcome is committed); emit the rest from later events"
            )));
        }
        if s.bytes + bytes > MAX_STAGED_BYTES && !s.emits.is_empty() {
            return Err(ServiceError::Rejected(format!(
                "Too many emitted bytes: the events emitted while handling one chunk may hold at most {} MiB until their outcome is committed",
                MAX_STAGED_BYTES >> 20
            )));
        }
        s.bytes += bytes;
        s.per_delivery.insert(tag.seq, count);
        for e in events {
            if e.to_outbox() {
                s.queued += 1;
            }
            s.emits.push((tag.seq, e));
        }
        Ok(())
    }

    pub fn put(&self, tag: Tag, key: String) -> Result<(), ServiceError> {
        let mut s = self.lock();
        Self::check(&s, tag)?;
        s.keys.insert(key.clone());
        s.puts.push((tag.seq, key));
        Ok(())
    }

    /// Notes that the delivery of `tag` asked for an emit its manifest forbids.
    pub fn refuse(&self, tag: Tag, message: &str) {
        let mut s = self.lock();
        if Self::check(&s, tag).is_ok() {
            s.refused.push((tag.seq, message.to_string()));
        }
    }

    /// The first refused emit of the delivery of `seq` in this chunk, if any.
    pub fn refusal(&self, seq: i64) -> Option<String> {
        let s = self.lock();
        s.refused
            .iter()
            .find(|(q, _)| *q == seq)
            .map(|(_, m)| m.clone())
    }

    /// Drops what the delivery of `seq` staged: it is dead-lettered without its effects, as a
    /// crashed attempt would leave none.
    pub fn discard(&self, seq: i64) {
        let mut s = self.lock();
        let dropped_queued = s
            .emits
            .iter()
            .filter(|(q, e)| *q == seq && e.to_outbox())
            .count() as i64;
        s.queued -= dropped_queued;
        let dropped_bytes: usize = s
            .emits
            .iter()
            .filter(|(q, _)| *q == seq)
            .map(|(_, e)| e.body.len())
            .sum();
        s.bytes -= dropped_bytes;
        s.per_delivery.remove(&seq);
        s.emits.retain(|(q, _)| *q != seq);
        let keys: Vec<String> = s
            .puts
            .iter()
            .filter(|(q, _)| *q == seq)
            .map(|(_, k)| k.clone())
            .collect();
        s.puts.retain(|(q, _)| *q != seq);
        for k in keys {
            if !s.puts.iter().any(|(_, other)| *other == k) {
                s.keys.remove(&k);
            }
        }
    }

    /// Did the delivery of `seq` put a key? (A handler recording its own key is guarding an
    /// effect outside the agent; the host commits such an event before starting the next.)
    pub fn keyed(&self, seq: i64) -> bool {
        self.lock().puts.iter().any(|(s, _)| *s == seq)
    }

    /// Was `key` put earlier in this chunk? (`Err` for a stale tag.)
    pub fn has(&self, tag: Tag, key: &str) -> Result<bool, ServiceError> {
        let s = self.lock();
        Self::check(&s, tag)?;
        Ok(s.keys.contains(key))
    }

    /// Ends the chunk: returns the effects of the deliveries in `finished` (in the order they
    /// were asked for) and drops the rest. Later calls with this chunk's tags are refused.
    pub fn close(&self, finished: &HashSet<i64>) -> Staged {
        let mut s = self.lock();
        s.open = false;
        s.keys.clear();
        s.queued = 0;
        s.bytes = 0;
        s.per_delivery.clear();
        Staged {
            emits: std::mem::take(&mut s.emits)
                .into_iter()
                .filter(|(seq, _)| finished.contains(seq))
                .map(|(_, e)| e)
                .collect(),
            puts: std::mem::take(&mut s.puts)
                .into_iter()
                .filter(|(seq, _)| finished.contains(seq))
                .map(|(_, k)| k)
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lumenflow_pack_sdk::DeliveryClass;

    fn event(bytes: usize) -> Accepted {
        let mut p = serde_json::Map::new();
        p.insert("blob".into(), "x".repeat(bytes).into());
        crate::queue::test_event("demo:done", p, DeliveryClass::Queue)
    }

    #[test]
    fn a_delivery_cannot_stage_without_bound() {
        let stage = EffectStage::default();
        let c = stage.open();
        let a = Tag { chunk: c, seq: 1 };
        for _ in 0..MAX_EMITS_PER_DELIVERY {
            stage.emit(a, vec![event(1)]).unwrap();
        }
        let e = stage.emit(a, vec![event(1)]).unwrap_err();
        assert!(e.to_string().contains("Too many emits"), "{e}");
        // Another delivery of the chunk still may, until the chunk's bytes run out.
        let b = Tag { chunk: c, seq: 2 };
        stage.emit(b, vec![event(1)]).unwrap();
        let big = || vec![event(MAX_STAGED_BYTES / 4)];
        let refused = (0..8)
            .map(|_| stage.emit(b, big()))
            .filter(Result::is_err)
            .count();
        assert!(refused >= 4, "{refused}");
        // Dropping a delivery gives its bytes back.
        stage.discard(2);
        stage.emit(b, big()).unwrap();
    }

    #[test]
    fn only_finished_deliveries_commit_and_stale_tags_are_refused() {
        let stage = EffectStage::default();
        let c = stage.open();
        let (a, b) = (Tag { chunk: c, seq: 1 }, Tag { chunk: c, seq: 2 });
        stage.put(a, "k1".into()).unwrap();
        stage.put(b, "k2".into()).unwrap();
        assert!(stage.has(b, "k1").unwrap(), "read your writes in the chunk");
        let staged = stage.close(&HashSet::from([1]));
        assert_eq!(staged.puts, vec!["k1".to_string()]);
        assert!(stage.put(a, "late".into()).is_err(), "closed chunk");
        let c2 = stage.open();
        assert!(stage.put(a, "old chunk".into()).is_err());
        assert!(!stage.has(Tag { chunk: c2, seq: 1 }, "k1").unwrap());
    }
}
