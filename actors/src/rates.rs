//! Events per second, from counter samples: the agent samples its counters once a second
//! (`AgentStats::sample_rates`) and keeps the last minute of samples here; `status` and
//! `/metrics` read rates over the last 10 s and the last minute.
//!
//! A rate is the change of a counter between the newest sample and the one a window earlier,
//! divided by the time between them. Until a window's worth of samples exists, the oldest
//! sample stands in (so a rate is there one second after start, over the time there is).

use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Samples kept: one a second for a minute, and the one a minute ago.
const KEEP: usize = 62;

/// The agent-wide counters that rates are made of.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub inbound: u64,
    pub accepted: u64,
    pub emitted: u64,
    pub delivered: u64,
    pub pushed: u64,
    pub pulled: u64,
    pub dead_lettered: u64,
}

/// Events per second agent-wide, over one window.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Rates {
    /// Inbound events logged (upstream and local API; not `agent:*`).
    pub inbound: f64,
    /// Events accepted for the upstream (producers' and handlers').
    pub accepted: f64,
    /// Events handlers emitted (or were posted in a pack's name).
    pub emitted: f64,
    /// Events handlers finished (any outcome).
    pub delivered: f64,
    pub pushed: f64,
    pub pulled: f64,
    pub dead_lettered: f64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct AgentRates {
    #[serde(rename = "10s")]
    pub last_10s: Rates,
    #[serde(rename = "1m")]
    pub last_1m: Rates,
}

/// One pack's events per second: `in` (finished by its handler) and `out` (it emitted).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct PackRates {
    pub in_10s: f64,
    pub out_10s: f64,
    pub in_1m: f64,
    pub out_1m: f64,
}

struct Sample {
    at: Instant,
    totals: Counters,
    /// Per pack: [in, out].
    packs: HashMap<String, [u64; 2]>,
}

#[derive(Default)]
pub struct RateHistory {
    samples: VecDeque<Sample>,
}

impl std::fmt::Debug for RateHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RateHistory({} samples)", self.samples.len())
    }
}

/// The rates read from the history now.
#[derive(Debug, Default)]
pub struct Read {
    pub totals: AgentRates,
    packs: HashMap<String, PackRates>,
}

impl Read {
    pub fn pack(&self, id: &str) -> PackRates {
        self.packs.get(id).copied().unwrap_or_default()
    }
}

impl RateHistory {
    pub fn push(&mut self, at: Instant, totals: Counters, packs: Vec<(String, [u64; 2])>) {
        self.samples.push_back(Sample {
            at,
            totals,
            packs: packs.into_iter().collect(),
        });
        while self.samples.len() > KEEP {
            self.samples.pop_front();
        }
    }

    /// The sample at least `window` older than the newest (or the oldest there is).
    fn before(&self, window: Duration) -> Option<&Sample> {
        let newest = self.samples.back()?;
        self.samples
            .iter()
            .rev()
            .find(|s| newest.at.duration_since(s.at) >= window)
            .or(self.samples.front())
    }

    pub fn rates(&self) -> Read {
        let Some(newest) = self.samples.back() else {
            return Read::default();
        };
        let over = |window: Duration| -> Option<(&Sample, f64)> {
            let then = self.before(window)?;
            let dt = newest.at.duration_since(then.at).as_secs_f64();
            (dt > 0.0).then_some((then, dt))
        };
        let per_s = |now: u64, then: u64, dt: f64| now.saturating_sub(then) as f64 / dt;
        let totals = |w: Duration| -> Rates {
            let Some((then, dt)) = over(w) else {
                return Rates::default();
            };
            let (n, t) = (&newest.totals, &then.totals);
            Rates {
                inbound: per_s(n.inbound, t.inbound, dt),
                accepted: per_s(n.accepted, t.accepted, dt),
                emitted: per_s(n.emitted, t.emitted, dt),
                delivered: per_s(n.delivered, t.delivered, dt),
                pushed: per_s(n.pushed, t.pushed, dt),
                pulled: per_s(n.pulled, t.pulled, dt),
                dead_lettered: per_s(n.dead_lettered, t.dead_lettered, dt),
            }
        };
        let (w10, w60) = (Duration::from_secs(10), Duration::from_secs(60));
        let pack_over = |id: &str, now: [u64; 2], w: Duration| -> [f64; 2] {
            match over(w) {
                Some((then, dt)) => {
                    // A pack loaded since then started from zero.
                    let before = then.packs.get(id).copied().unwrap_or([0, 0]);
                    [per_s(now[0], before[0], dt), per_s(now[1], before[1], dt)]
                }
                None => [0.0, 0.0],
            }
        };
        let packs = newest
            .packs
            .iter()
            .map(|(id, now)| {
                let [in_10s, out_10s] = pack_over(id, *now, w10);
                let [in_1m, out_1m] = pack_over(id, *now, w60);
                let r = PackRates {
                    in_10s,
                    out_10s,
                    in_1m,
                    out_1m,
                };
                (id.clone(), r)
            })
            .collect();
        Read {
            totals: AgentRates {
                last_10s: totals(w10),
                last_1m: totals(w60),
            },
            packs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(inbound: u64) -> Counters {
        Counters {
            inbound,
            ..Default::default()
        }
    }

    #[test]
    fn rates_are_per_second_over_each_window() {
        let mut h = RateHistory::default();
        let t0 = Instant::now();
        assert_eq!(h.rates().totals, AgentRates::default());
        // 100 events a second for 60 s, then 1,000 a second for 10 s.
        let mut n = 0;
        for s in 0..=70u64 {
            h.push(
                t0 + Duration::from_secs(s),
                counters(n),
                vec![("p".into(), [n, n / 2])],
            );
            n += if s < 60 { 100 } else { 1000 };
        }
        let r = h.rates();
        assert_eq!(r.totals.last_10s.inbound, 1000.0);
        // The last minute: 50 s at 100/s and 10 s at 1,000/s.
        assert_eq!(r.totals.last_1m.inbound, (50.0 * 100.0 + 10_000.0) / 60.0);
        assert_eq!(r.pack("p").in_10s, 1000.0);
        assert_eq!(r.pack("p").out_10s, 500.0);
        assert_eq!(r.pack("absent"), PackRates::default());
    }

    #[test]
    fn a_young_history_gives_rates_over_the_time_there_is() {
        let mut h = RateHistory::default();
        let t0 = Instant::now();
        h.push(t0, counters(0), vec![]);
        h.push(t0 + Duration::from_secs(2), counters(50), vec![]);
        assert_eq!(h.rates().totals.last_10s.inbound, 25.0);
        assert_eq!(h.rates().totals.last_1m.inbound, 25.0);
    }
}
