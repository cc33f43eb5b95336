//! `cargo run -p lumenflow-chaos -- --seed S --minutes M`: a fault campaign against the real
//! agent (see the crate documentation). Exit 0 when every event is accounted for, 1 with the
//! seed, the schedule and a shrunk schedule that still fails otherwise.

use clap::Parser;
use lumenflow_chaos::{run, shrink, Config};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[derive(Parser)]
#[command(about = "Fault campaign for lumenflow-agent: random faults, every event accounted by id")]
struct Args {
    /// Seed of the first run (the schedule and the workload follow from it).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Minutes of load per run (fractions allowed).
    #[arg(long, default_value_t = 1.0)]
    minutes: f64,
    /// Runs, with seeds seed, seed+1, ...
    #[arg(long, default_value_t = 1)]
    runs: u64,
    /// The agent binary (default: built by cargo in this workspace, release profile).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// No disk-full faults (they need root to mount a tmpfs).
    #[arg(long)]
    no_disk: bool,
    /// Runs the shrinker may spend on a failing schedule.
    #[arg(long, default_value_t = 8)]
    shrink: usize,
    /// Keep each run's folder (workspace, logs, databases).
    #[arg(long)]
    keep: bool,
    /// Print each fault as it is applied.
    #[arg(long, short)]
    verbose: bool,
    /// Only these faults, comma-separated: kill-agent, stop-agent, kill-worker, stop-worker,
    /// upstream, invalid, rename, dlq, disk.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn build_agent() -> anyhow::Result<PathBuf> {
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "lumenflow-agent",
            "--bin",
            "lumenflow-agent",
        ])
        .current_dir(repo())
        .status()?;
    anyhow::ensure!(status.success(), "building the agent failed");
    Ok(repo().join("target/release/lumenflow-agent"))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let agent = match args.agent {
        Some(a) => a,
        None => build_agent()?,
    };
    let mut failed = false;
    let mut totals = (0u64, 0usize, 0usize, 0usize, 0u64);
    for i in 0..args.runs {
        let cfg = Config {
            agent: agent.clone(),
            node_helper: repo().join("packs/node/lumenflow-pack.mjs"),
            seed: args.seed + i,
            duration: Duration::from_secs_f64(args.minutes * 60.0),
            disk: !args.no_disk,
            schedule: None,
            keep: args.keep,
            verbose: args.verbose,
            only: args.only.clone(),
        };
        let report = run(&cfg)?;
        println!("{report}");
        totals.0 += report.faults();
        totals.1 += report.orders_accepted;
        totals.2 += report.jobs_published;
        totals.3 += report.lost() + report.entries_doubled.len();
        totals.4 += report.reexecuted;
        if !report.ok() {
            failed = true;
            println!(
                "FAILED: seed {}; replay with `cargo run -p lumenflow-chaos -- --seed {} --minutes {}`",
                cfg.seed, cfg.seed, args.minutes
            );
            println!("schedule ({} steps):", report.schedule.len());
            for s in &report.schedule {
                println!("  {s}");
            }
            if args.shrink > 0 {
                let small = shrink(&cfg, report.schedule.clone(), args.shrink);
                println!(
                    "a smaller schedule that still fails ({} steps):",
                    small.len()
                );
                for s in &small {
                    println!("  {s}");
                }
            }
        }
    }
    println!(
        "total: {} runs, {} faults, {} orders accepted, {} jobs published, lost + doubled {}, external effects re-run {}",
        args.runs, totals.0, totals.1, totals.2, totals.3, totals.4
    );
    std::process::exit(if failed { 1 } else { 0 });
}
