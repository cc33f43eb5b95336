//! `/metrics`: the live counters of [`AgentStats`] in Prometheus/OpenMetrics text, encoded by
//! `prometheus-client` at scrape time (no second copy of any counter).

use lumenflow_actors::stats::AgentStats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use std::sync::Arc;

#[derive(Debug)]
pub struct StatsCollector(pub Arc<AgentStats>);

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    ConstCounter::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: i64,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for StatsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.snapshot();
        gauge(
            &mut enc,
            "lumenflow_agent_uptime_seconds",
            "Seconds since the agent started",
            s.uptime_s as i64,
        )?;
        gauge(
            &mut enc,
            "lumenflow_agent_queue_durable_depth",
            "Durable events waiting for the upstream",
            s.queue.durable_depth,
        )?;
        counter(
            &mut enc,
            "lumenflow_agent_queue_accepted_queue",
            "Durable (queue) events accepted",
            s.queue.accepted_queue,
        )?;
        counter(
            &mut enc,
            "lumenflow_agent_queue_accepted_ephemeral",
            "Ephemeral events accepted",
            s.queue.accepted_ephemeral,
        )?;
        counter(
            &mut enc,
            "lumenflow_agent_queue_ephemeral_dropped",
            "Ephemeral events dropped (upstream disconnected or ring full)",
            s.queue.ephemeral_dropped,
        )?;
        counter(
            &mut enc,
            "lumenflow_agent_queue_backpressure_rejections",
            "Batches refused because the durable queue was full",
            s.queue.backpressure_rejections,
        )?;
        counter(
            &mut enc,
            "lumenflow_agent_upstream_pushed",
            "Events delivered to the upstream",
            s.upstream.pushed,
        )?;
        if s.upstream.mode == "nats" {
            let u = &self.0.upstream;
            gauge(
                &mut enc,
                "lumenflow_agent_nats_consumer_pending",
                "Messages waiting in this workspace's NATS consumers (not delivered or not acked)",
                u.consumer_pending
                    .load(std::sync::atomic::Ordering::Relaxed),
            )?;
            let last = u.last_ack_ms.load(std::sync::atomic::Ordering::Relaxed);
            if last > 0 {
                gauge(
                    &mut enc,
                    "lumenflow_agent_nats_last_ack_age_seconds",
                    "Seconds since the last JetStream publish ack",
                    (lumenflow_actors::store::now_ms() - last) / 1000,
                )?;
            }
            counter(
                &mut enc,
                "lumenflow_agent_nats_consumer_recoveries",
                "NATS consumers looked up again after no progress while messages waited",
                u.consumer_recoveries
                    .load(std::sync::atomic::Ordering::Relaxed),
            )?;
        }
        counter(
            &mut enc,
            "lumenflow_agent_inbound_accepted",
            "Inbound events accepted",
            s.inbound.accepted,
        )?;
        counter(
            &mut enc,
            "lumenflow_agent_inbound_agent_events",
            "The agent's own agent:* events (crashes, dead letters, approvals), counted apart from inbound",
            s.inbound.agent,
        )?;
        {
            let mut family = enc.encode_descriptor(
                "lumenflow_agent_events_per_second",
                "Events per second over the last 10 s and 1 min (what: inbound, accepted, emitted, delivered, pushed, pulled, dead_lettered)",
                None,
                MetricType::Gauge,
            )?;
            for (window, r) in [("10s", &s.rates.last_10s), ("1m", &s.rates.last_1m)] {
                let series = [
                    ("inbound", r.inbound),
                    ("accepted", r.accepted),
                    ("emitted", r.emitted),
                    ("delivered", r.delivered),
                    ("pushed", r.pushed),
                    ("pulled", r.pulled),
                    ("dead_lettered", r.dead_lettered),
                ];
                for (what, v) in series {
                    let labels = [("what", what), ("window", window)];
                    ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut family = enc.encode_descriptor(
                "lumenflow_agent_pack_events_per_second",
                "A pack's events per second: in (finished by its handler), out (emitted), over 10 s and 1 min",
                None,
                MetricType::Gauge,
            )?;
            for p in &s.packs {
                let r = &p.rates;
                for (dir, window, v) in [
                    ("in", "10s", r.in_10s),
                    ("out", "10s", r.out_10s),
                    ("in", "1m", r.in_1m),
                    ("out", "1m", r.out_1m),
                ] {
                    let labels = [
                        ("pack", p.id.as_str()),
                        ("direction", dir),
                        ("window", window),
                    ];
                    ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        gauge(
            &mut enc,
            "lumenflow_agent_replay_log_entries",
            "Entries in the replay log",
            s.replay_log_entries,
        )?;
        gauge(
            &mut enc,
            "lumenflow_agent_dead_letters",
            "Dead letters kept",
            s.dead_letters,
        )?;
        gauge(
            &mut enc,
            "lumenflow_agent_approvals_pending",
            "Held events waiting for a decision",
            s.approvals.pending,
        )?;
        counter(
            &mut enc,
            "lumenflow_agent_approvals_released",
            "Held events released by a decision (approved, or expired with on_expiry allow)",
            s.approvals.released,
        )?;
        counter(
            &mut enc,
            "lumenflow_agent_approvals_withheld",
            "Held events denied or expired, never delivered",
            (s.approvals.rejected + s.approvals.expired)
                .saturating_sub(s.approvals.released.saturating_sub(s.approvals.approved)),
        )?;
        counter(
            &mut enc,
            "lumenflow_agent_store_commits",
            "SQLite group commits",
            s.store.commits,
        )?;
        counter(
            &mut enc,
            "lumenflow_agent_reloads",
            "Manifest reloads",
            s.reload.count,
        )?;
        type Get = fn(&lumenflow_actors::stats::PackSnapshot) -> u64;
        let per_pack: [(&str, &str, Get); 7] = [
            (
                "lumenflow_agent_pack_emitted",
                "Events a pack emitted (or that were posted in its name)",
                |p| p.emitted,
            ),
            (
                "lumenflow_agent_pack_handled",
                "Events a pack handled",
                |p| p.handled,
            ),
            (
                "lumenflow_agent_pack_replayed",
                "Events not delivered again (replay log)",
                |p| p.replayed,
            ),
            (
                "lumenflow_agent_pack_ignored",
                "Events a pack ignored",
                |p| p.ignored,
            ),
            (
                "lumenflow_agent_pack_failed",
                "Events a pack failed (dead-lettered)",
                |p| p.failed,
            ),
            (
                "lumenflow_agent_pack_restarts",
                "Restarts of a pack after crashes",
                |p| p.restarts,
            ),
            (
                "lumenflow_agent_pack_dead_lettered",
                "Events of a pack dead-lettered",
                |p| p.dead_lettered,
            ),
        ];
        for (name, help, get) in per_pack {
            let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for p in &s.packs {
                let labels = [("pack", p.id.as_str())];
                ConstCounter::new(get(p)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
