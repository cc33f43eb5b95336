//! # lumenflow-chaos
//!
//! A fault campaign for `lumenflow-agent`, the way Jepsen and FoundationDB look for what
//! example tests miss: run the real agent binary, a real Node worker and the development
//! control plane (behind a fault proxy), drive a steady workload, and inject faults drawn at
//! random from a seed ([`schedule`]). At the end every event is accounted by id
//! ([`account`]):
//! - every order a producer was told was accepted is at the control plane (lost = 0);
//! - every job published at the control plane was handled, its `ledger:entry_recorded` emitted
//!   exactly once (doubled = 0), or it is in the dead letters with the reason (poison jobs);
//! - every unreadable inbound event is in the dead letters (origin `inbound`);
//! - the handler's effect outside the agent (a line in a file) ran again at most once per
//!   incident (a kill, a crash, a timeout, a full disk).
//!
//! A failing run prints its seed and schedule; [`shrink`] looks for a smaller schedule that
//! still fails.

pub mod account;
pub mod load;
pub mod proxy;
pub mod schedule;
pub mod world;

use account::Report;
use schedule::{Answer, Fault, Step};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use world::World;

#[derive(Debug, Clone)]
pub struct Config {
    /// The `lumenflow-agent` binary.
    pub agent: PathBuf,
    /// `packs/node/lumenflow-pack.mjs` of this repository.
    pub node_helper: PathBuf,
    pub seed: u64,
    pub duration: Duration,
    /// Make disk-full faults (needs root: the state directory becomes a tmpfs).
    pub disk: bool,
    /// Replay these steps instead of drawing a schedule from the seed.
    pub schedule: Option<Vec<Step>>,
    /// Keep the run's folder (workspace, logs, databases) and print where it is.
    pub keep: bool,
    /// Print each step as it is applied.
    pub verbose: bool,
    /// Draw only these faults (names as in `Fault::name`); all when empty.
    pub only: Vec<String>,
}

/// What was injected, as it happened.
#[derive(Debug, Default, Clone)]
pub struct Applied {
    pub steps: usize,
    pub agent_kills: u64,
    pub agent_stops: u64,
    pub worker_kills: u64,
    pub worker_stops: u64,
    pub upstream_faults: u64,
    pub manifest_faults: u64,
    pub renames: u64,
    pub dlq_retries: u64,
    pub disk_full: u64,
    /// The agent exited without being killed (a finding).
    pub unexpected_exits: u64,
}

fn fault_json(answer: &Answer) -> serde_json::Value {
    use serde_json::json;
    match answer {
        Answer::Status(s, ra) => json!({"status": s, "retry_after": ra}),
        Answer::Redirect(s) => json!({"redirect": s}),
        Answer::Html => json!({"html": true}),
        Answer::AcceptAtMost(k) => json!({"accept_at_most": k}),
        Answer::Drop => json!({"drop": true}),
        Answer::Slow(ms) => json!({"latency_ms": ms}),
        Answer::Reset | Answer::Drip => json!({}),
    }
}

/// Fills the state file system (a tmpfs) up to the last byte.
fn fill_disk(world: &World) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let state = world.ws.join(".lumenflow/state");
    let c = std::ffi::CString::new(state.display().to_string())?;
    // SAFETY: statvfs on a valid path into a zeroed struct.
    let free = unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            anyhow::bail!("statvfs {}", state.display());
        }
        s.f_bavail as i64 * s.f_frsize as i64
    };
    let f = std::fs::File::create(world.ballast())?;
    // SAFETY: fallocate on an open file; tmpfs allocates the pages.
    unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, free.max(0)) };
    Ok(())
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// Applies one step and, when it lasts, undoes it after its duration.
fn apply(world: &mut World, step: &Step, applied: &mut Applied) -> anyhow::Result<()> {
    applied.steps += 1;
    match &step.fault {
        Fault::KillAgent { down_ms } => {
            world.kill_agent();
            applied.agent_kills += 1;
            sleep_ms(*down_ms);
            world.start_agent()?;
        }
        Fault::StopAgent { ms } => {
            world.signal_agent(libc::SIGSTOP);
            applied.agent_stops += 1;
            sleep_ms(*ms);
            world.signal_agent(libc::SIGCONT);
        }
        Fault::KillWorker => {
            if let Some(pid) = world.worker_pid() {
                // SAFETY: a signal to the agent's child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                applied.worker_kills += 1;
            }
        }
        Fault::StopWorker { ms } => {
            if let Some(pid) = world.worker_pid() {
                // SAFETY: signals to the agent's child.
                unsafe { libc::kill(pid, libc::SIGSTOP) };
                applied.worker_stops += 1;
                sleep_ms(*ms);
                unsafe { libc::kill(pid, libc::SIGCONT) };
            }
        }
        Fault::Upstream { answer, ms } => {
            applied.upstream_faults += 1;
            match answer {
                Answer::Reset => world.proxy.set(proxy::Mode::Reset),
                Answer::Drip => world.proxy.set(proxy::Mode::Drip),
                a => world.faults(fault_json(a))?,
            }
            sleep_ms(*ms);
            world.proxy.set(proxy::Mode::Pass);
            world.faults(serde_json::json!({}))?;
        }
        Fault::InvalidManifest { ms } => {
            applied.manifest_faults += 1;
            let file = world.ledger_dir().join("manifest.json");
            std::fs::write(&file, "{\"id\": \"ledger\", \"version\": ")?;
            sleep_ms(*ms);
            std::fs::write(&file, &world.ledger_manifest)?;
        }
        Fault::RenameAway { ms } => {
            applied.renames += 1;
            std::fs::rename(world.ledger_dir(), world.away_dir())?;
            sleep_ms(*ms);
            std::fs::rename(world.away_dir(), world.ledger_dir())?;
        }
        Fault::DlqRetry => {
            applied.dlq_retries += 1;
            world.cli(&["dlq", "retry", "--all"])?;
        }
        Fault::DiskFull { ms } => {
            if world.tmpfs {
                applied.disk_full += 1;
                fill_disk(world)?;
                sleep_ms(*ms);
                std::fs::remove_file(world.ballast())?;
            }
        }
    }
    Ok(())
}

/// Runs one campaign: the workload for `cfg.duration` with the schedule's faults, then a
/// quiet period in which everything must arrive, then the accounting.
pub fn run(cfg: &Config) -> anyhow::Result<Report> {
    let tmp = tempfile::Builder::new()
        .prefix("lumenflow-chaos-")
        .tempdir()?;
    let mut world = World::create(tmp.path(), &cfg.agent, &cfg.node_helper, cfg.disk)?;
    let duration_ms = cfg.duration.as_millis() as u64;
    let schedule = cfg
        .schedule
        .clone()
        .unwrap_or_else(|| schedule::draw_only(cfg.seed, duration_ms, world.tmpfs, &cfg.only));
    world.start_agent()?;
    let load = load::Load::start(
        cfg.seed,
        world.api_file(),
        world.conductor_url(),
        world::IDENTITY.to_string(),
    );
    let started = Instant::now();
    let mut applied = Applied::default();
    let watch = |world: &mut World, applied: &mut Applied| -> anyhow::Result<()> {
        if let Some(status) = world.agent_exited() {
            eprintln!("chaos: the agent exited by itself ({status}); starting it again");
            applied.unexpected_exits += 1;
            world.agent = None;
            world.start_agent()?;
        }
        Ok(())
    };
    for step in &schedule {
        while started.elapsed() < Duration::from_millis(step.at_ms) {
            watch(&mut world, &mut applied)?;
            sleep_ms(20);
        }
        if cfg.verbose {
            eprintln!("chaos: {step}");
        }
        apply(&mut world, step, &mut applied)?;
    }
    while started.elapsed() < cfg.duration {
        watch(&mut world, &mut applied)?;
        sleep_ms(20);
    }
    let sent = load.finish();
    watch(&mut world, &mut applied)?;
    let quiet = account::quiesce(&mut world, &sent)?;
    let mut report = account::account(&world, &sent, &applied)?;
    report.seed = cfg.seed;
    report.quiet_s = quiet;
    report.schedule = schedule;
    report.duration_s = cfg.duration.as_secs_f64();
    // A failing run keeps its folder (workspace, agent log, databases) for the post-mortem.
    if cfg.keep || !report.ok() {
        // Stop the agent first: the database is then complete. A tmpfs state directory goes
        // with its unmount, so copy it out.
        world.kill_agent();
        if world.tmpfs {
            let _ = std::process::Command::new("cp")
                .arg("-a")
                .arg(world.ws.join(".lumenflow/state"))
                .arg(world.root.join("state.kept"))
                .status();
        }
        drop(world);
        let kept = tmp.keep();
        eprintln!("chaos: the run's folder is kept at {}", kept.display());
    }
    Ok(report)
}

/// Looks for a smaller schedule that still fails, with at most `budget` more runs. Each run
/// replays the steps at their times and lasts until 3 s after the last one.
pub fn shrink(cfg: &Config, failing: Vec<Step>, budget: usize) -> Vec<Step> {
    let mut runs = 0;
    ddmin(failing, budget, |steps| {
        let end = steps
            .last()
            .map(|s| s.at_ms + s.fault.duration_ms())
            .unwrap_or(0);
        let c = Config {
            schedule: Some(steps.to_vec()),
            duration: Duration::from_millis(end + 3000),
            keep: false,
            ..cfg.clone()
        };
        runs += 1;
        let fails = run(&c).map(|r| !r.ok()).unwrap_or(true);
        eprintln!(
            "chaos: shrink run {runs}: {} steps {}",
            steps.len(),
            if fails { "still fail" } else { "pass" }
        );
        fails
    })
}

/// Delta debugging (Zeller's ddmin) over the steps: drops chunks of the schedule while
/// `fails` still says the rest fails, with at most `budget` calls of `fails`.
pub fn ddmin(
    failing: Vec<Step>,
    budget: usize,
    mut fails: impl FnMut(&[Step]) -> bool,
) -> Vec<Step> {
    let mut steps = failing;
    let mut n = 2;
    let mut calls = 0;
    while steps.len() > 1 && calls < budget {
        let chunk = steps.len().div_ceil(n);
        let mut reduced = false;
        let parts = n;
        for i in 0..parts {
            if calls >= budget {
                break;
            }
            let rest: Vec<Step> = steps
                .iter()
                .enumerate()
                .filter(|(j, _)| j / chunk != i)
                .map(|(_, s)| s.clone())
                .collect();
            if rest.is_empty() || rest.len() == steps.len() {
                continue;
            }
            calls += 1;
            if fails(&rest) {
                steps = rest;
                n = (n - 1).max(2);
                reduced = true;
                break;
            }
        }
        if !reduced {
            if n >= steps.len() {
                break;
            }
            n = (n * 2).min(steps.len());
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failure that needs two particular steps of forty is shrunk to those two.
    #[test]
    fn ddmin_finds_the_two_steps_a_failure_needs() {
        let schedule = schedule::draw(3, 200_000, true);
        assert!(schedule.len() >= 40);
        let (a, b) = (schedule[5].clone(), schedule[31].clone());
        let small = ddmin(schedule, 200, |s| s.contains(&a) && s.contains(&b));
        assert_eq!(small, vec![a, b]);
    }
}
