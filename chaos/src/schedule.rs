//! The faults a campaign injects, and the schedule drawn from a seed.
//!
//! A schedule is a list of steps, one fault at a time: the fault is applied at `at_ms` (from
//! the start of the run), lasts `ms` where it has a duration, and is undone before the next
//! one starts. The same seed draws the same schedule, so a failing run is replayed by its seed,
//! and a shrunk schedule (a subset of the steps, at the same times) by its printed list.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fmt;

/// What the control plane answers pushes with while an `Upstream` fault lasts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// An error status, with Retry-After seconds for 429/503.
    Status(u16, Option<u64>),
    /// 301/302/303/307/308 to a login page, nothing stored.
    Redirect(u16),
    /// `200` with an HTML page, nothing stored.
    Html,
    /// `{"accepted": k}`: only the first k of each push are stored.
    AcceptAtMost(usize),
    /// The connection closed without an answer.
    Drop,
    /// Every answer delayed.
    Slow(u64),
    /// Forwarded and stored, then the connection reset (TCP RST) before the answer.
    Reset,
    /// The answer sent a byte at a time.
    Drip,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9` of the agent; started again after `down_ms`.
    KillAgent { down_ms: u64 },
    /// SIGSTOP of the agent for `ms`, then SIGCONT.
    StopAgent { ms: u64 },
    /// `kill -9` of the ledger pack's worker.
    KillWorker,
    /// SIGSTOP of the ledger worker for `ms` (past the handler timeout: a timeout).
    StopWorker { ms: u64 },
    /// The control plane answers pushes so for `ms`.
    Upstream { answer: Answer, ms: u64 },
    /// The ledger manifest has a syntax error for `ms`.
    InvalidManifest { ms: u64 },
    /// The ledger pack folder is renamed out of the packs root for `ms`.
    RenameAway { ms: u64 },
    /// `lumenflow-agent dlq retry --all`.
    DlqRetry,
    /// The state directory's file system is full for `ms` (needs root: a tmpfs).
    DiskFull { ms: u64 },
}

impl Fault {
    /// How long the fault lasts before it is undone.
    pub fn duration_ms(&self) -> u64 {
        match self {
            Fault::KillAgent { down_ms } => *down_ms,
            Fault::StopAgent { ms }
            | Fault::StopWorker { ms }
            | Fault::Upstream { ms, .. }
            | Fault::InvalidManifest { ms }
            | Fault::RenameAway { ms }
            | Fault::DiskFull { ms } => *ms,
            Fault::KillWorker | Fault::DlqRetry => 0,
        }
    }

    /// The fault's name for `--only` (kill-agent, stop-agent, kill-worker, stop-worker,
    /// upstream, invalid, rename, dlq, disk).
    pub fn name(&self) -> &'static str {
        match self {
            Fault::KillAgent { .. } => "kill-agent",
            Fault::StopAgent { .. } => "stop-agent",
            Fault::KillWorker => "kill-worker",
            Fault::StopWorker { .. } => "stop-worker",
            Fault::Upstream { .. } => "upstream",
            Fault::InvalidManifest { .. } => "invalid",
            Fault::RenameAway { .. } => "rename",
            Fault::DlqRetry => "dlq",
            Fault::DiskFull { .. } => "disk",
        }
    }

    /// A fault after which a handler's external effect may run once more (the event was in
    /// flight and not recorded): the bound of "at most once per incident".
    pub fn is_incident(&self) -> bool {
        matches!(
            self,
            Fault::KillAgent { .. }
                | Fault::KillWorker
                | Fault::StopWorker { .. }
                | Fault::DiskFull { .. }
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub at_ms: u64,
    pub fault: Fault,
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Status(s, Some(ra)) => write!(f, "HTTP {s} (Retry-After {ra})"),
            Answer::Status(s, None) => write!(f, "HTTP {s}"),
            Answer::Redirect(s) => write!(f, "HTTP {s} redirect to /login"),
            Answer::Html => write!(f, "200 with an HTML page"),
            Answer::AcceptAtMost(k) => write!(f, "{{\"accepted\": at most {k}}}"),
            Answer::Drop => write!(f, "connection closed, no answer"),
            Answer::Slow(ms) => write!(f, "answers {ms} ms late"),
            Answer::Reset => write!(f, "stored, then TCP reset before the answer"),
            Answer::Drip => write!(f, "the answer a byte at a time"),
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "+{:>7.3}s ", self.at_ms as f64 / 1000.0)?;
        match &self.fault {
            Fault::KillAgent { down_ms } => write!(f, "kill -9 the agent, down {down_ms} ms"),
            Fault::StopAgent { ms } => write!(f, "SIGSTOP the agent for {ms} ms"),
            Fault::KillWorker => write!(f, "kill -9 the ledger worker"),
            Fault::StopWorker { ms } => write!(f, "SIGSTOP the ledger worker for {ms} ms"),
            Fault::Upstream { answer, ms } => write!(f, "control plane: {answer} for {ms} ms"),
            Fault::InvalidManifest { ms } => write!(f, "ledger manifest invalid for {ms} ms"),
            Fault::RenameAway { ms } => write!(f, "ledger folder renamed away for {ms} ms"),
            Fault::DlqRetry => write!(f, "dlq retry --all"),
            Fault::DiskFull { ms } => write!(f, "disk full for {ms} ms"),
        }
    }
}

fn answer(rng: &mut StdRng) -> Answer {
    match rng.random_range(0..14) {
        0 => Answer::Status(500, None),
        1 => Answer::Status(503, Some(1)),
        2 => Answer::Status(429, Some(1)),
        3 => Answer::Status(408, None),
        4 => Answer::Status(if rng.random_bool(0.5) { 400 } else { 422 }, None),
        5 => Answer::Status(401, None),
        6 => Answer::Redirect([301, 302, 303, 307, 308][rng.random_range(0..5)]),
        7 => Answer::Html,
        8 => Answer::AcceptAtMost(rng.random_range(0..4)),
        9 => Answer::Drop,
        10 => Answer::Slow(rng.random_range(200..3000)),
        11 | 12 => Answer::Reset,
        _ => Answer::Drip,
    }
}

fn fault(rng: &mut StdRng, disk: bool) -> Fault {
    loop {
        let f = match rng.random_range(0..20) {
            0..=3 => Fault::KillAgent {
                down_ms: rng.random_range(0..1000),
            },
            4 | 5 => Fault::StopAgent {
                ms: rng.random_range(500..4000),
            },
            6 | 7 => Fault::KillWorker,
            8 | 9 => Fault::StopWorker {
                ms: rng.random_range(300..3000),
            },
            10..=13 => Fault::Upstream {
                answer: answer(rng),
                ms: rng.random_range(1000..5000),
            },
            14 | 15 => Fault::InvalidManifest {
                ms: rng.random_range(500..3000),
            },
            16 | 17 => Fault::RenameAway {
                ms: rng.random_range(500..3000),
            },
            18 => Fault::DlqRetry,
            _ => Fault::DiskFull {
                ms: rng.random_range(500..2500),
            },
        };
        if disk || !matches!(f, Fault::DiskFull { .. }) {
            return f;
        }
    }
}

/// The schedule of a run of `duration_ms` from `seed`. `disk`: disk-full faults can be made.
pub fn draw(seed: u64, duration_ms: u64, disk: bool) -> Vec<Step> {
    draw_only(seed, duration_ms, disk, &[])
}

/// Like [`draw`], with only the faults named in `only` (all when empty).
pub fn draw_only(seed: u64, duration_ms: u64, disk: bool, only: &[String]) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xfa17_5eed);
    let mut steps = Vec::new();
    let mut t = rng.random_range(500..1500);
    while t < duration_ms {
        let fault = loop {
            let f = fault(&mut rng, disk);
            if only.is_empty() || only.iter().any(|o| o == f.name()) {
                break f;
            }
        };
        let lasts = fault.duration_ms();
        steps.push(Step { at_ms: t, fault });
        t += lasts + rng.random_range(300..2500);
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_draws_the_same_schedule_and_faults_do_not_overlap() {
        let a = draw(7, 120_000, true);
        assert_eq!(a, draw(7, 120_000, true));
        assert_ne!(a, draw(8, 120_000, true));
        assert!(a.len() > 20);
        for w in a.windows(2) {
            assert!(w[0].at_ms + w[0].fault.duration_ms() < w[1].at_ms);
        }
        assert!(draw(7, 120_000, false)
            .iter()
            .all(|s| !matches!(s.fault, Fault::DiskFull { .. })));
    }
}
