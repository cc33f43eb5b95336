//! The end of a run: let everything arrive, then account for every event by id.
//!
//! Quiescing is what an operator would do after an incident: faults off, the agent running,
//! the dead letters that are not poison (`upstream` rejections, events that timed out three
//! times) retried. Then the run waits, up to two minutes, for the outbox to drain and every
//! job to be settled. The accounting does not trust the agent's counters: it reads what the
//! control plane stored, the dead letters in SQLite and the effects file.

use crate::load::Sent;
use crate::schedule::Step;
use crate::world::World;
use crate::Applied;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

#[derive(Debug, Default, Clone)]
pub struct Report {
    pub seed: u64,
    pub duration_s: f64,
    pub quiet_s: f64,
    pub schedule: Vec<Step>,
    pub applied: Applied,
    /// Incidents that may re-run an external effect once: kills, crashes, disk full.
    pub incidents: u64,
    pub orders_accepted: usize,
    pub orders_at_upstream: usize,
    pub orders_lost: Vec<u64>,
    pub order_retries: u64,
    pub orders_refused: u64,
    pub jobs_published: usize,
    pub jobs_handled: usize,
    pub jobs_dead_poison: usize,
    /// Non-poison jobs still dead-lettered after the retry (with their reasons).
    pub jobs_dead_other: Vec<(String, String)>,
    pub jobs_lost: Vec<String>,
    /// Jobs still waiting in the agent's inbound log when the accounting ran (late, not lost;
    /// a run that ends with any is a liveness failure).
    pub jobs_pending: Vec<String>,
    /// Jobs whose entry the control plane rejected, waiting in the dead letters (origin
    /// `upstream`).
    pub entries_dead_upstream: Vec<String>,
    /// The ledger pack's line of `status` at the end.
    pub ledger_status: String,
    /// Jobs whose entry reached the control plane under more than one event id.
    pub entries_doubled: Vec<String>,
    pub v1_published: usize,
    pub v1_dead_lettered: usize,
    pub v1_lost: Vec<String>,
    /// External effects run again (sum over jobs of lines - 1).
    pub reexecuted: u64,
    /// Pushes the control plane received again (deduplicated by event id).
    pub upstream_redeliveries: i64,
    pub timeouts: u64,
    pub crashes: u64,
}

impl Report {
    pub fn lost(&self) -> usize {
        self.orders_lost.len() + self.jobs_lost.len() + self.v1_lost.len()
    }

    pub fn ok(&self) -> bool {
        self.lost() == 0
            && self.jobs_pending.is_empty()
            && self.entries_dead_upstream.is_empty()
            && self.entries_doubled.is_empty()
            && self.reexecuted <= self.incidents
            && self.orders_refused == 0
            && self.applied.unexpected_exits == 0
    }

    pub fn faults(&self) -> u64 {
        let a = &self.applied;
        a.agent_kills
            + a.agent_stops
            + a.worker_kills
            + a.worker_stops
            + a.upstream_faults
            + a.manifest_faults
            + a.renames
            + a.dlq_retries
            + a.disk_full
    }
}

fn sample<T: fmt::Debug>(v: &[T]) -> String {
    let shown: Vec<String> = v.iter().take(5).map(|x| format!("{x:?}")).collect();
    if v.len() > 5 {
        format!("{} ...", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = &self.applied;
        writeln!(
            f,
            "seed {}: {:.0} s of load, settled {:.1} s after",
            self.seed, self.duration_s, self.quiet_s
        )?;
        writeln!(
            f,
            "faults {}: agent kill -9 {}, agent SIGSTOP {}, worker kill -9 {}, worker SIGSTOP {}, control-plane answers {}, manifest invalid {}, folder away {}, dlq retry {}, disk full {}",
            self.faults(), a.agent_kills, a.agent_stops, a.worker_kills, a.worker_stops, a.upstream_faults, a.manifest_faults, a.renames, a.dlq_retries, a.disk_full
        )?;
        writeln!(
            f,
            "orders: {} accepted, {} at the control plane, lost {} ({} retried sends, {} refused, {} redelivered pushes deduplicated)",
            self.orders_accepted, self.orders_at_upstream, self.orders_lost.len(), self.order_retries, self.orders_refused, self.upstream_redeliveries
        )?;
        writeln!(
            f,
            "jobs: {} published, {} handled, {} poison dead-lettered, {} other dead-lettered, lost {}, doubled entries {}{}{}",
            self.jobs_published, self.jobs_handled, self.jobs_dead_poison, self.jobs_dead_other.len(), self.jobs_lost.len(), self.entries_doubled.len(),
            if self.jobs_pending.is_empty() { String::new() } else { format!(", still pending in the agent {}", self.jobs_pending.len()) },
            if self.entries_dead_upstream.is_empty() { String::new() } else { format!(", entry dead-lettered upstream {}", self.entries_dead_upstream.len()) }
        )?;
        writeln!(
            f,
            "unreadable inbound: {} published, {} dead-lettered, lost {}",
            self.v1_published,
            self.v1_dead_lettered,
            self.v1_lost.len()
        )?;
        writeln!(
            f,
            "external effects re-run {} for {} incidents ({} crashes, {} of them timeouts){}",
            self.reexecuted,
            self.incidents,
            self.crashes,
            self.timeouts,
            if a.unexpected_exits > 0 {
                format!("; the agent exited by itself {} times", a.unexpected_exits)
            } else {
                String::new()
            }
        )?;
        if !self.orders_lost.is_empty() {
            writeln!(f, "  lost orders: {}", sample(&self.orders_lost))?;
        }
        if !self.jobs_lost.is_empty() {
            writeln!(f, "  lost jobs: {}", sample(&self.jobs_lost))?;
        }
        if !self.jobs_pending.is_empty() {
            writeln!(f, "  pending jobs: {}", sample(&self.jobs_pending))?;
            writeln!(f, "  ledger pack: {}", self.ledger_status)?;
        }
        if !self.entries_dead_upstream.is_empty() {
            writeln!(
                f,
                "  entries dead-lettered upstream: {}",
                sample(&self.entries_dead_upstream)
            )?;
        }
        if !self.v1_lost.is_empty() {
            writeln!(f, "  lost unreadable events: {}", sample(&self.v1_lost))?;
        }
        if !self.entries_doubled.is_empty() {
            writeln!(f, "  doubled entries: {}", sample(&self.entries_doubled))?;
        }
        if !self.jobs_dead_other.is_empty() {
            writeln!(f, "  dead-lettered jobs: {}", sample(&self.jobs_dead_other))?;
        }
        write!(f, "{}", if self.ok() { "PASS" } else { "FAIL" })
    }
}

struct Seen {
    orders: BTreeSet<u64>,
    entries: BTreeMap<String, BTreeSet<String>>,
    redeliveries: i64,
}

fn at_upstream(world: &World) -> anyhow::Result<Seen> {
    let mut s = Seen {
        orders: BTreeSet::new(),
        entries: BTreeMap::new(),
        redeliveries: 0,
    };
    for r in world.received()? {
        s.redeliveries += r["deliveries"].as_i64().unwrap_or(1) - 1;
        let e = &r["event"];
        match e["kind"].as_str() {
            Some("shop:order_placed") => {
                if let Some(n) = e["payload"]["n"].as_u64() {
                    s.orders.insert(n);
                }
            }
            Some("ledger:entry_recorded") => {
                if let Some(job) = e["payload"]["job"].as_str() {
                    s.entries
                        .entry(job.to_string())
                        .or_default()
                        .insert(e["event_id"].as_str().unwrap_or("").to_string());
                }
            }
            _ => {}
        }
    }
    Ok(s)
}

fn is_poison(d: &Value) -> bool {
    d["error"]
        .as_str()
        .is_some_and(|e| e.contains("poison job"))
}

/// Faults off, agent up, non-poison dead letters retried; waits for everything to settle.
/// Returns the seconds it took.
pub fn quiesce(world: &mut World, sent: &Sent) -> anyhow::Result<f64> {
    let started = Instant::now();
    world.proxy.set(crate::proxy::Mode::Pass);
    world.faults(serde_json::json!({}))?;
    if world.agent.is_none() {
        world.start_agent()?;
    }
    // Up to 10 minutes while there is progress; given up after 150 s without any (longer than
    // the longest crash backoff, 60 s).
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut progress_at = Instant::now();
    let mut last = (0usize, 0usize);
    let mut retried_at: Option<Instant> = None;
    loop {
        // Retry what is retryable, again every 10 s (a retried event may time out again).
        if retried_at.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            for d in world.dead_letters()? {
                let retryable =
                    d["origin"] == "upstream" || (d["origin"] == "handler" && !is_poison(&d));
                if retryable {
                    if let Some(id) = d["id"].as_i64() {
                        world.cli(&["dlq", "retry", &id.to_string()])?;
                    }
                }
            }
            retried_at = Some(Instant::now());
        }
        let seen = at_upstream(world)?;
        let orders_done = sent.orders.iter().all(|n| seen.orders.contains(n));
        let jobs_done = sent
            .jobs
            .iter()
            .filter(|j| !sent.poison.contains(*j))
            .all(|j| seen.entries.contains_key(j));
        let drained = world
            .status()
            .is_some_and(|s| s["queue"]["durable_depth"] == 0);
        if orders_done && jobs_done && drained {
            break;
        }
        let now = (seen.orders.len(), seen.entries.len());
        if now != last {
            last = now;
            progress_at = Instant::now();
        }
        if Instant::now() > deadline || progress_at.elapsed() > Duration::from_secs(150) {
            eprintln!(
                "chaos: not settled {:.0} s after the load stopped ({:.0} s without progress): accounting as it is",
                started.elapsed().as_secs_f64(),
                progress_at.elapsed().as_secs_f64()
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(started.elapsed().as_secs_f64())
}

pub fn account(world: &World, sent: &Sent, applied: &Applied) -> anyhow::Result<Report> {
    let seen = at_upstream(world)?;
    let dead = world.dead_letters()?;
    let effects = std::fs::read_to_string(world.root.join("effects.log")).unwrap_or_default();
    let mut runs: BTreeMap<&str, u64> = BTreeMap::new();
    for line in effects.lines() {
        *runs.entry(line).or_default() += 1;
    }
    let log = std::fs::read_to_string(world.root.join("agent.log")).unwrap_or_default();
    let crashes = log
        .lines()
        .filter(|l| {
            l.contains("handler crashed; restarting") || l.contains("pack crashed too often")
        })
        .count() as u64;
    let timeouts = log
        .lines()
        .filter(|l| {
            (l.contains("handler crashed; restarting") || l.contains("pack crashed too often"))
                && l.contains("timed out")
        })
        .count() as u64;
    let progress_errors = log
        .lines()
        .filter(|l| l.contains("cannot record progress"))
        .count() as u64;

    let mut r = Report {
        applied: applied.clone(),
        incidents: applied.agent_kills + applied.disk_full + crashes + progress_errors,
        crashes,
        timeouts,
        orders_accepted: sent.orders.len(),
        orders_at_upstream: seen.orders.len(),
        order_retries: sent.order_retries,
        orders_refused: sent.orders_refused,
        jobs_published: sent.jobs.len(),
        v1_published: sent.v1_events.len(),
        upstream_redeliveries: seen.redeliveries,
        ..Report::default()
    };
    r.orders_lost = sent
        .orders
        .iter()
        .filter(|n| !seen.orders.contains(n))
        .copied()
        .collect();
    let dead_jobs: BTreeMap<String, &Value> = dead
        .iter()
        .filter(|d| d["origin"] == "handler")
        .filter_map(|d| Some((d["event"]["payload"]["job"].as_str()?.to_string(), d)))
        .collect();
    let pending = world.jobs_pending_in_agent()?;
    let dead_entries: BTreeSet<&str> = dead
        .iter()
        .filter(|d| d["origin"] == "upstream" && d["kind"] == "ledger:entry_recorded")
        .filter_map(|d| d["event"]["payload"]["job"].as_str())
        .collect();
    r.ledger_status = world
        .status()
        .and_then(|s| {
            s["packs"]
                .as_array()?
                .iter()
                .find(|p| p["id"] == "ledger")
                .map(Value::to_string)
        })
        .unwrap_or_default();
    for job in &sent.jobs {
        let entries = seen.entries.get(job).map(BTreeSet::len).unwrap_or(0);
        if entries > 1 {
            r.entries_doubled.push(job.clone());
        }
        if entries >= 1 {
            r.jobs_handled += 1;
        } else if let Some(d) = dead_jobs.get(job) {
            if sent.poison.contains(job) {
                r.jobs_dead_poison += 1;
            } else {
                r.jobs_dead_other
                    .push((job.clone(), d["error"].as_str().unwrap_or("").to_string()));
            }
        } else if pending.contains(job) {
            r.jobs_pending.push(job.clone());
        } else if dead_entries.contains(job.as_str()) {
            r.entries_dead_upstream.push(job.clone());
        } else {
            r.jobs_lost.push(job.clone());
        }
        if !sent.poison.contains(job) {
            r.reexecuted += runs
                .get(job.as_str())
                .copied()
                .unwrap_or(0)
                .saturating_sub(1);
        }
    }
    let dead_v1: BTreeSet<&str> = dead
        .iter()
        .filter(|d| d["origin"] == "inbound")
        .filter_map(|d| d["event"]["task_id"].as_str())
        .collect();
    for id in &sent.v1_events {
        if dead_v1.contains(id.as_str()) {
            r.v1_dead_lettered += 1;
        } else {
            r.v1_lost.push(id.clone());
        }
    }
    Ok(r)
}
