//! Restart intensity and backoff, shared by every supervised actor (SPEC §7).
//!
//! actix's `Supervisor` restarts an actor when it *stops*; it does not count, wait or give up.
//! This is the part OTP's supervisor adds: more than `max_restarts` in `window` means the
//! child is `crashed`, and the next try waits an exponential, jittered backoff, so a broken
//! handler never spins.

use rand::Rng;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Restart now.
    Restart,
    /// Too many restarts: wait this long, then try again.
    Crashed(Duration),
}

#[derive(Debug, Clone)]
pub struct RestartIntensity {
    max_restarts: u32,
    window: Duration,
    restarts: VecDeque<Instant>,
    crashed_periods: u32,
    base: Duration,
    cap: Duration,
}

impl RestartIntensity {
    pub fn new(max_restarts: u32, window: Duration) -> Self {
        RestartIntensity {
            max_restarts,
            window,
            restarts: VecDeque::new(),
            crashed_periods: 0,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
        }
    }

    /// Overrides the backoff range (tests, benchmarks).
    pub fn with_backoff(mut self, base: Duration, cap: Duration) -> Self {
        self.base = base;
        self.cap = cap;
        self
    }

    /// Records a crash at `now` and decides what to do.
    pub fn record(&mut self, now: Instant) -> Decision {
        while self
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.window)
        {
            self.restarts.pop_front();
        }
        if self.restarts.len() as u32 >= self.max_restarts {
            self.crashed_periods += 1;
            self.restarts.clear();
            return Decision::Crashed(backoff(self.base, self.cap, self.crashed_periods));
        }
        self.restarts.push_back(now);
        Decision::Restart
    }

    /// A healthy period ends the escalation.
    pub fn reset_escalation(&mut self) {
        self.crashed_periods = 0;
    }

    pub fn restarts_in_window(&self) -> usize {
        self.restarts.len()
    }
}

/// Exponential backoff with jitter: uniformly in `[d/2, d]` where `d = min(cap, base * 2^(n-1))`.
/// (Half-jitter keeps a floor, so a crashed child is never retried immediately.)
pub fn backoff(base: Duration, cap: Duration, n: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << n.saturating_sub(1).min(20));
    let d = exp.min(cap);
    let half = d / 2;
    let jitter_ms = rand::rng().random_range(0..=half.as_millis().max(1) as u64);
    half + Duration::from_millis(jitter_ms)
}

/// Full-jitter backoff (uniform in `[0, d]`), for retries against a remote peer.
pub fn full_jitter(base: Duration, cap: Duration, n: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << n.saturating_sub(1).min(20));
    let d = exp.min(cap);
    Duration::from_millis(rand::rng().random_range(0..=d.as_millis().max(1) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_restarts_in_window_then_crashed_with_growing_backoff() {
        let mut r = RestartIntensity::new(5, Duration::from_secs(30));
        let t0 = Instant::now();
        for i in 0..5 {
            assert_eq!(r.record(t0 + Duration::from_secs(i)), Decision::Restart);
        }
        let Decision::Crashed(d1) = r.record(t0 + Duration::from_secs(5)) else {
            panic!()
        };
        assert!(
            d1 >= Duration::from_millis(500) && d1 <= Duration::from_secs(1),
            "{d1:?}"
        );
        for i in 0..5 {
            assert_eq!(r.record(t0 + Duration::from_secs(6 + i)), Decision::Restart);
        }
        let Decision::Crashed(d2) = r.record(t0 + Duration::from_secs(12)) else {
            panic!()
        };
        assert!(
            d2 >= Duration::from_secs(1),
            "second crash period backs off longer: {d2:?}"
        );
    }

    #[test]
    fn restarts_outside_the_window_are_forgotten() {
        let mut r = RestartIntensity::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(r.record(t0), Decision::Restart);
        assert_eq!(r.record(t0 + Duration::from_secs(1)), Decision::Restart);
        assert_eq!(r.record(t0 + Duration::from_secs(30)), Decision::Restart);
        assert_eq!(r.restarts_in_window(), 1);
    }

    #[test]
    fn backoff_is_capped() {
        for n in 1..40 {
            let d = backoff(Duration::from_secs(1), Duration::from_secs(60), n);
            assert!(d <= Duration::from_secs(60));
            assert!(
                full_jitter(Duration::from_millis(100), Duration::from_secs(5), n)
                    <= Duration::from_secs(5)
            );
        }
    }
}
