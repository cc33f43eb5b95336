//! The inbound side of the NATS upstream: one durable pull consumer per stream of events this
//! workspace takes in, each with its own loop.
//!
//! - `lf-<W>` on `lumenflow.<W>.inbound.>`: events for this workspace (its inbox; a new
//!   consumer starts at the beginning, so what was published before the agent first connected
//!   is delivered).
//! - `lf-<W>-<from>-<slug>-<name>` on `lumenflow.<from>.events.<slug>.<name>` for each pack
//!   kind a local pack subscribes to (`<from>` is `*`, every workspace of the fleet, unless
//!   `nats.workspaces` names them): cross-workspace subscriptions. These start "now", as a new
//!   local subscription does; this workspace's own events are skipped (they were routed
//!   locally when emitted).
//!
//! Guarantees of each loop:
//! - a message is acked only after the inbound-log transaction holding it committed; that
//!   transaction also stores the consumer's stream sequence (`meta.nats_seq:<consumer>`), so a
//!   consumer that is lost on the server is recreated after what was committed, not from the
//!   stream's beginning;
//! - a failed commit `nak`s with a 1 s delay; an unreadable event is dead-lettered, then
//!   `term`ed;
//! - **no silent stall**: a fetch that never returns is abandoned after its expiry plus a grace,
//!   and a consumer that makes no progress for `stall_after` while the server says messages
//!   wait is looked up again (counted in `status` as `consumer_recoveries`). Pull consumers
//!   that stop after reconnects are a known bug class in every NATS integration.
//! - A kind no longer subscribed stops its loop but keeps its consumer on the server, as a
//!   local pack that is away keeps its cursor: when it comes back it gets what it missed.

use crate::inbound_events::read_pulled_value;
use crate::router::{Inbound, PullCursor, Router, RoutingTable};
use crate::stats::AgentStats;
use crate::store::{StoreError, StoreHandle, StoreOp};
use crate::upstreams::nats::connect::{subject_of, subject_token, NatsConfig};
use actix::prelude::*;
use async_nats::jetstream;
use futures_util::StreamExt;
use rusqlite::Connection;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Messages asked for per fetch, and how long the server holds a fetch open.
const FETCH_MAX: usize = 500;
const FETCH_EXPIRES: Duration = Duration::from_secs(5);
/// A fetch that has not ended this long after its expiry is abandoned.
const FETCH_GRACE: Duration = Duration::from_secs(10);
/// How often a loop asks the server how many messages wait.
const INFO_EVERY: Duration = Duration::from_secs(5);

/// One consumer the agent pulls from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerSpec {
    pub name: String,
    pub filter: String,
    /// A cross-workspace subscription (starts "now"; this workspace's own events skipped).
    pub fleet: bool,
}

/// The consumers the agent wants now: the inbox, and one per subscribed pack kind and source.
pub fn wanted(cfg: &NatsConfig, table: &RoutingTable) -> BTreeMap<String, ConsumerSpec> {
    let w = subject_token(&cfg.workspace_id);
    let mut out = BTreeMap::new();
    let inbox = ConsumerSpec {
        name: format!("lf-{w}"),
        filter: format!("lumenflow.{w}.inbound.>"),
        fleet: false,
    };
    out.insert(inbox.name.clone(), inbox);
    let sources: Vec<(String, String)> = match &cfg.fleet_from {
        None => vec![("*".into(), "all".into())],
        Some(list) => list
            .iter()
            .filter(|s| **s != cfg.workspace_id)
            .map(|s| (subject_token(s), subject_token(s)))
            .collect(),
    };
    for (kind, subscribers) in &table.subscribers {
        if subscribers.is_empty()
            || !kind.contains(':')
            || lumenflow_pack_sdk::kind::is_reserved(kind)
        {
            continue;
        }
        let (slug, name) = kind.split_once(':').unwrap_or((kind, "_"));
        for (from_subject, from_name) in &sources {
            let spec = ConsumerSpec {
                name: format!(
                    "lf-{w}-{from_name}-{}-{}",
                    subject_token(slug),
                    subject_token(name)
                ),
                filter: subject_of(from_subject, "events", kind),
                fleet: true,
            };
            out.insert(spec.name.clone(), spec);
        }
    }
    out
}

/// What `status` shows of one consumer.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ConsumerState {
    pub filter: String,
    /// Messages the server holds for it, not yet delivered.
    pub pending: u64,
    /// Delivered, not yet acked.
    pub ack_pending: u64,
    pub delivered: u64,
    pub last_delivery_ms: i64,
    pub last_error: Option<String>,
}

pub type ConsumerStates = Arc<Mutex<BTreeMap<String, ConsumerState>>>;

/// The stream sequence last committed for `consumer`.
struct LoadSeq(String);
impl StoreOp for LoadSeq {
    type Output = Option<u64>;
    fn run(self, conn: &Connection) -> Result<Option<u64>, StoreError> {
        Ok(crate::schema::meta_get(conn, &seq_key(&self.0))?.and_then(|v| v.parse().ok()))
    }
}

fn seq_key(consumer: &str) -> String {
    format!("nats_seq:{consumer}")
}

/// Everything one loop needs.
pub struct Loop {
    pub spec: ConsumerSpec,
    pub cfg: NatsConfig,
    pub js: jetstream::Context,
    pub router: Addr<Router>,
    pub store: StoreHandle,
    pub stats: Arc<AgentStats>,
    pub states: ConsumerStates,
}

impl Loop {
    fn set(&self, f: impl FnOnce(&mut ConsumerState)) {
        if let Ok(mut m) = self.states.lock() {
            let s = m.entry(self.spec.name.clone()).or_default();
            s.filter.clone_from(&self.spec.filter);
            f(s);
        }
    }

    /// Runs until cancelled (the actor stops, or the kind is no longer subscribed).
    pub async fn run(self) {
        let own = subject_token(&self.cfg.workspace_id);
        let mut consumer: Option<jetstream::consumer::PullConsumer> = None;
        let mut last_progress = Instant::now();
        let mut last_info = Instant::now() - INFO_EVERY;
        self.set(|_| {});
        loop {
            let mut c = match consumer.take() {
                Some(c) => c,
                None => match self.lookup().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(consumer = %self.spec.name, error = %e, "NATS consumer: cannot look it up; retrying in 2 s");
                        self.set(|s| s.last_error = Some(e));
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        continue;
                    }
                },
            };
            let fetched = tokio::time::timeout(
                FETCH_EXPIRES + FETCH_GRACE,
                fetch_and_commit(&c, &self.spec, &own, &self.router),
            )
            .await;
            match fetched {
                Ok(Ok(n)) => {
                    if n > 0 {
                        last_progress = Instant::now();
                        self.stats
                            .upstream
                            .pulled
                            .fetch_add(n as u64, Ordering::Relaxed);
                        self.set(|s| {
                            s.delivered += n as u64;
                            s.last_delivery_ms = crate::store::now_ms();
                            s.last_error = None;
                        });
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(consumer = %self.spec.name, error = %e, "NATS inbound pull failed; looking the consumer up again in 2 s");
                    self.set(|s| s.last_error = Some(e));
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
                Err(_) => {
                    tracing::warn!(consumer = %self.spec.name, "NATS fetch did not end {} s after its expiry; looking the consumer up again", FETCH_GRACE.as_secs());
                    self.recovered("a fetch that never ended");
                    continue;
                }
            }
            if last_info.elapsed() >= INFO_EVERY {
                last_info = Instant::now();
                match c.info().await {
                    Ok(info) => {
                        let (pending, ack_pending) =
                            (info.num_pending, info.num_ack_pending as u64);
                        self.set(|s| {
                            s.pending = pending;
                            s.ack_pending = ack_pending;
                        });
                        if pending == 0 {
                            last_progress = Instant::now();
                        } else if is_stalled(last_progress.elapsed(), self.cfg.stall_after, pending)
                        {
                            tracing::warn!(consumer = %self.spec.name, pending, idle_s = last_progress.elapsed().as_secs(), "NATS consumer made no progress while messages wait; looking it up again");
                            self.recovered(&format!(
                                "no progress for {} s with {pending} waiting",
                                last_progress.elapsed().as_secs()
                            ));
                            last_progress = Instant::now();
                            continue;
                        }
                    }
                    Err(e) => {
                        self.set(|s| s.last_error = Some(format!("consumer info: {e}")));
                        continue;
                    }
                }
            }
            consumer = Some(c);
        }
    }

    fn recovered(&self, why: &str) {
        self.stats
            .upstream
            .consumer_recoveries
            .fetch_add(1, Ordering::Relaxed);
        self.set(|s| s.last_error = Some(format!("recovered from {why}")));
    }

    /// The consumer, created when missing: after the committed stream sequence when there is
    /// one (it was lost on the server), else from the start (the inbox) or from now (fleet).
    async fn lookup(&self) -> Result<jetstream::consumer::PullConsumer, String> {
        let stream = self
            .js
            .get_stream(&self.cfg.stream)
            .await
            .map_err(|e| format!("stream {}: {e}", self.cfg.stream))?;
        if let Ok(c) = stream.get_consumer(&self.spec.name).await {
            return Ok(c);
        }
        let committed = self
            .store
            .run(LoadSeq(self.spec.name.clone()))
            .await
            .map_err(|e| e.to_string())?;
        use jetstream::consumer::DeliverPolicy;
        let deliver_policy = match committed {
            Some(seq) => DeliverPolicy::ByStartSequence {
                start_sequence: seq + 1,
            },
            None if self.spec.fleet => DeliverPolicy::New,
            None => DeliverPolicy::All,
        };
        tracing::info!(consumer = %self.spec.name, filter = %self.spec.filter, ?deliver_policy, "creating NATS consumer");
        stream
            .get_or_create_consumer(
                &self.spec.name,
                jetstream::consumer::pull::Config {
                    durable_name: Some(self.spec.name.clone()),
                    filter_subject: self.spec.filter.clone(),
                    deliver_policy,
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: self.cfg.ack_wait,
                    // What is handed out unacked: two fetches' worth, handled in order.
                    max_ack_pending: (2 * FETCH_MAX) as i64,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("consumer {}: {e}", self.spec.name))
    }
}

/// Stalled: messages wait, yet nothing arrived for longer than the threshold.
pub fn is_stalled(idle: Duration, threshold: Duration, pending: u64) -> bool {
    pending > 0 && idle >= threshold
}

/// One fetch: the messages committed to the inbound log with the stream sequence they reach,
/// then acked (`term` for those the agent cannot read, dead-lettered in the same commit; a
/// plain ack for this workspace's own events on a fleet subject). When the commit fails they
/// are `nak`ed with a delay so they come again soon. Returns how many events were committed.
async fn fetch_and_commit(
    consumer: &jetstream::consumer::PullConsumer,
    spec: &ConsumerSpec,
    own: &str,
    router: &Addr<Router>,
) -> Result<usize, String> {
    let mut batch = consumer
        .fetch()
        .max_messages(FETCH_MAX)
        .expires(FETCH_EXPIRES)
        .messages()
        .await
        .map_err(|e| format!("fetch: {e}"))?;
    let mut messages = Vec::new();
    while let Some(m) = batch.next().await {
        match m {
            Ok(m) => messages.push(m),
            Err(e) => return Err(format!("fetch: {e}")),
        }
    }
    if messages.is_empty() {
        return Ok(0);
    }
    #[derive(Clone, Copy)]
    enum Fate {
        Commit,
        Term,
        Skip,
    }
    let mut events = Vec::new();
    let mut unreadable = Vec::new();
    let mut fates = Vec::with_capacity(messages.len());
    let mut last_seq = None;
    for m in &messages {
        if let Ok(info) = m.info() {
            last_seq = Some(info.stream_sequence);
        }
        if spec.fleet && m.subject.split('.').nth(1) == Some(own) {
            fates.push(Fate::Skip);
            continue;
        }
        let value = serde_json::from_slice(&m.payload).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&m.payload).into_owned())
        });
        match read_pulled_value(value) {
            Ok(env) => {
                events.push(env);
                fates.push(Fate::Commit);
            }
            Err(u) => {
                unreadable.push(u);
                fates.push(Fate::Term);
            }
        }
    }
    let n = events.len();
    if n > 0 || !unreadable.is_empty() {
        let committed = router
            .send(Inbound {
                events,
                unreadable,
                cursor: last_seq.map(|seq| PullCursor {
                    key: seq_key(&spec.name),
                    value: seq.to_string(),
                }),
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = committed {
            for m in &messages {
                let _ = m
                    .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
            return Err(format!("inbound commit: {e}"));
        }
    }
    // Committed: now the server may forget them.
    for (m, fate) in messages.iter().zip(fates) {
        let kind = match fate {
            Fate::Commit | Fate::Skip => jetstream::AckKind::Ack,
            Fate::Term => jetstream::AckKind::Term,
        };
        if let Err(e) = m.ack_with(kind).await {
            tracing::debug!(error = %e, "NATS ack failed; the message comes again and the replay log absorbs it");
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lumenflow_pack_sdk::manifest::Manifest;

    fn table(subscriptions: &[&str]) -> RoutingTable {
        let mut t = RoutingTable::default();
        for k in subscriptions {
            t.subscribers.insert(k.to_string(), vec!["p".into()]);
        }
        let _ = std::marker::PhantomData::<Manifest>;
        t
    }

    #[test]
    fn the_inbox_and_one_consumer_per_subscribed_pack_kind() {
        let cfg = NatsConfig::new(vec![], "ws b".into());
        let w = wanted(
            &cfg,
            &table(&[
                "acme-demo:job_completed",
                "conductor:recovery_requested",
                "kernel:task_created",
            ]),
        );
        let got: Vec<(&str, &str, bool)> = w
            .values()
            .map(|s| (s.name.as_str(), s.filter.as_str(), s.fleet))
            .collect();
        assert_eq!(
            got,
            vec![
                ("lf-ws~20b", "lumenflow.ws~20b.inbound.>", false),
                (
                    "lf-ws~20b-all-acme-demo-job_completed",
                    "lumenflow.*.events.acme-demo.job_completed",
                    true
                ),
            ]
        );
    }

    #[test]
    fn named_sources_get_a_consumer_each_and_never_this_workspace() {
        let mut cfg = NatsConfig::new(vec![], "ws-b".into());
        cfg.fleet_from = Some(vec!["ws-a".into(), "ws-b".into(), "ws-c".into()]);
        let w = wanted(&cfg, &table(&["acme-demo:job_completed"]));
        let filters: Vec<&str> = w
            .values()
            .filter(|s| s.fleet)
            .map(|s| s.filter.as_str())
            .collect();
        assert_eq!(
            filters,
            vec![
                "lumenflow.ws-a.events.acme-demo.job_completed",
                "lumenflow.ws-c.events.acme-demo.job_completed"
            ]
        );
    }

    #[test]
    fn stalled_only_when_messages_wait_past_the_threshold() {
        let t = Duration::from_secs(30);
        assert!(is_stalled(Duration::from_secs(31), t, 5));
        assert!(!is_stalled(Duration::from_secs(31), t, 0));
        assert!(!is_stalled(Duration::from_secs(10), t, 5));
    }
}
