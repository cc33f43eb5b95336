//! The short fault campaign CI runs (`lumenflow-chaos`, issue 19): two fixed seeds, 25 s of
//! load each, with kill -9 and SIGSTOP of the agent and its worker, handler timeouts, lying
//! and failing control-plane answers, invalid manifests, folders away, dlq retries and (as
//! root) a full disk. Every event accounted by id; a failure prints the seed and schedule, to
//! replay with `cargo run -p lumenflow-chaos -- --seed S`.

mod common;

use lumenflow_chaos::{run, Config};
use std::path::Path;
use std::time::Duration;

#[test]
fn a_short_fault_campaign_loses_and_doubles_nothing() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    for seed in [11, 12] {
        let cfg = Config {
            agent: common::AGENT.into(),
            node_helper: repo.join("packs/node/lumenflow-pack.mjs"),
            seed,
            duration: Duration::from_secs(25),
            disk: true,
            schedule: None,
            keep: false,
            verbose: false,
            only: Vec::new(),
        };
        let report = run(&cfg).expect("the campaign runs");
        eprintln!("CHAOS {report}");
        let schedule: Vec<String> = report.schedule.iter().map(|s| s.to_string()).collect();
        assert!(
            report.ok(),
            "{report}\nschedule of seed {seed}:\n{}",
            schedule.join("\n")
        );
        assert!(report.faults() >= 5, "faults were injected: {report}");
        assert!(report.orders_accepted > 100 && report.jobs_published > 50);
    }
}
