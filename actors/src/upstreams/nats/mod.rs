//! `NatsUpstream`: NATS JetStream as the upstream, for fleets of workspaces (SPEC §9; README
//! "Fleet").
//!
//! Subjects (one NATS message per event, its body the v2 envelope as JSON):
//! - events of workspace `W`: `lumenflow.<W>.events.<slug>.<name>` (kind `<slug>:<name>`);
//! - events for workspace `W`: `lumenflow.<W>.inbound.<slug>.<name>`.
//!
//! `<W>` is the identity with every byte outside `[A-Za-z0-9_-]` written `~XX` (hex), so any
//! identity is one subject token.
//!
//! Guarantees:
//! - Queue events leave the outbox in order, in batches, only when their publish ack arrived
//!   (the server stored them). Each carries `Nats-Msg-Id: <event_id>`: a retry inside the
//!   stream's duplicate window is acked `duplicate` and not stored twice.
//! - Ephemeral events are published without waiting for acks while connected, dropped and
//!   counted while not (never left in a reconnect buffer to arrive late).
//! - Inbound (`consumers`): durable pull consumers, for the workspace's inbox and for
//!   cross-workspace subscriptions, each acked only after the inbound-log commit and watched
//!   for stalls.
//! - The stream (`LUMENFLOW`, subjects `lumenflow.>`, file storage, limits retention) is created
//!   when missing; an existing one is used as the operator configured it, or refused in
//!   `status` when it does not capture this workspace's subjects (`connect`).
//! - Refused credentials show as `unauthorized`, a stream that does not fit as
//!   `misconfigured`; events wait in the outbox meanwhile, nothing is dropped.

pub mod connect;
pub mod consumers;

pub use connect::{subject, subject_token, NatsAuth, NatsConfig, DEFAULT_STREAM, DUPLICATE_WINDOW};

use crate::router::{Router, SharedTable};
use crate::stats::AgentStats;
use crate::store::{StoreError, StoreHandle};
use crate::upstreams::drain::{DrainLoop, End, IsIdle, Next, Push, Settled};
use crate::upstreams::outbox::{Item, ReadOutbox, Settle};
use actix::prelude::*;
use async_nats::jetstream;
use connect::{ConnectFailure, StreamFacts};
use consumers::{ConsumerSpec, ConsumerStates};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How often the wanted consumers are compared with the routing table, and `status` refreshed.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);

pub struct NatsUpstream {
    cfg: NatsConfig,
    store: StoreHandle,
    router: Addr<Router>,
    table: SharedTable,
    stats: Arc<AgentStats>,
    /// The shared delivery loop (its transport here: JetStream publishes and their acks).
    drain: DrainLoop,
    js: Option<jetstream::Context>,
    client: Option<async_nats::Client>,
    stream: Option<StreamFacts>,
    /// A publish failed: the stream is looked up (or created) again before the next round.
    recheck_stream: bool,
    /// The running consumer loops, by consumer name.
    loops: BTreeMap<String, (ConsumerSpec, SpawnHandle)>,
    consumer_states: ConsumerStates,
    last_lame_duck_ms: Option<i64>,
}

/// An event of the NATS client (disconnect, reconnect, lame duck, authorization error).
struct ClientEvent(async_nats::Event);
impl Message for ClientEvent {
    type Result = ();
}

impl NatsUpstream {
    pub fn new(
        cfg: NatsConfig,
        store: StoreHandle,
        router: Addr<Router>,
        table: SharedTable,
        stats: Arc<AgentStats>,
    ) -> Self {
        let drain = DrainLoop::new(cfg.batch_max);
        NatsUpstream {
            cfg,
            store,
            router,
            table,
            stats,
            drain,
            js: None,
            client: None,
            stream: None,
            recheck_stream: false,
            loops: BTreeMap::new(),
            consumer_states: Default::default(),
            last_lame_duck_ms: None,
        }
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        let cfg = self.cfg.clone();
        let me = ctx.address();
        let fut = async move { connect::connect(&cfg, move |e| me.do_send(ClientEvent(e))).await };
        ctx.spawn(fut.into_actor(self).map(|res, act, ctx| match res {
            Ok((client, js, facts)) => {
                tracing::info!(servers = %act.cfg.servers.join(","), stream = %act.cfg.stream, "NATS JetStream upstream connected");
                act.client = Some(client);
                act.js = Some(js);
                act.stream = Some(facts);
                act.stats.set_upstream(Some("nats"), "connected", None);
                act.drain.mark_dirty();
                act.pump(ctx);
                act.reconcile(ctx);
                ctx.run_interval(RECONCILE_EVERY, |act, ctx| act.reconcile(ctx));
            }
            Err(failure) => {
                let (state, e, wait) = match failure {
                    ConnectFailure::Unauthorized(e) => ("unauthorized", e, 2),
                    ConnectFailure::Misconfigured(e) => ("misconfigured", e, 5),
                    ConnectFailure::Unreachable(e) => ("connecting", e, 2),
                };
                tracing::warn!(error = %e, "NATS upstream: {state}; retrying in {wait} s");
                act.stats.set_upstream(Some("nats"), state, Some(e));
                ctx.run_later(Duration::from_secs(wait), |act, ctx| act.connect(ctx));
            }
        }));
    }

    fn connected(&self) -> bool {
        self.client
            .as_ref()
            .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected)
    }

    /// Starts a loop for each wanted consumer that has none, stops those no longer wanted
    /// (their consumers stay on the server), and refreshes what `status` shows.
    fn reconcile(&mut self, ctx: &mut Context<Self>) {
        let Some(js) = self.js.clone() else {
            return;
        };
        let wanted = consumers::wanted(&self.cfg, &self.table.load());
        let gone: Vec<String> = self
            .loops
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for name in gone {
            if let Some((spec, handle)) = self.loops.remove(&name) {
                tracing::info!(consumer = %name, filter = %spec.filter, "no local pack subscribes any more: pulling stops (the consumer stays on the server)");
                ctx.cancel_future(handle);
            }
            if let Ok(mut m) = self.consumer_states.lock() {
                m.remove(&name);
            }
        }
        for (name, spec) in wanted {
            if self.loops.contains_key(&name) {
                continue;
            }
            let l = consumers::Loop {
                spec: spec.clone(),
                cfg: self.cfg.clone(),
                js: js.clone(),
                router: self.router.clone(),
                store: self.store.clone(),
                stats: self.stats.clone(),
                states: self.consumer_states.clone(),
            };
            let handle = ctx.spawn(l.run().into_actor(self));
            self.loops.insert(name, (spec, handle));
        }
        self.publish_status();
    }

    /// `status.upstream.nats` and the lag gauges.
    fn publish_status(&self) {
        let consumers = self
            .consumer_states
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        let pending: u64 = consumers.values().map(|c| c.pending + c.ack_pending).sum();
        self.stats
            .upstream
            .consumer_pending
            .store(pending as i64, Ordering::Relaxed);
        let server = self.client.as_ref().map(|c| {
            let i = c.server_info();
            serde_json::json!({"name": i.server_name, "host": i.host, "port": i.port, "version": i.version})
        });
        // `last_ack_ms` and `consumer_recoveries` are filled in from the counters when status is
        // read (`AgentStats::nats_snapshot`), so they are never a second late.
        let detail = serde_json::json!({
            "servers": self.cfg.servers,
            "connected_to": server,
            "auth": format!("{:?}", self.cfg.auth),
            "stream": self.stream,
            "consumers": consumers,
            "consumer_pending": pending,
            "last_lame_duck_ms": self.last_lame_duck_ms,
        });
        if let Ok(mut n) = self.stats.upstream.nats.lock() {
            *n = Some(detail);
        }
    }

    /// One round of the shared drain loop: the oldest outbox rows published (pipelined, each
    /// with `Nats-Msg-Id`), their acks awaited in order, the acked prefix settled; waiting
    /// ephemeral events published without acks.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        let (Some(js), Some(client)) = (self.js.clone(), self.client.clone()) else {
            return;
        };
        if !self.connected() {
            // Not connected: ephemeral events are dropped now, never sent late.
            self.drain.ring.drop_all(&self.stats);
            self.drain.mark_dirty();
            ctx.run_later(Duration::from_millis(500), |act, ctx| act.pump(ctx));
            return;
        }
        if !self.drain.begin() {
            return;
        }
        let ephemeral = self.drain.take_ephemeral_items();
        let (store, cfg) = (self.store.clone(), self.cfg.clone());
        let recheck = std::mem::take(&mut self.recheck_stream);
        let stats = self.stats.clone();
        let fut = async move {
            if recheck {
                // The last publish failed: the stream may have been deleted or changed.
                if let Err(f) = connect::ensure_stream(&js, &cfg).await {
                    let e = match f {
                        ConnectFailure::Unauthorized(e)
                        | ConnectFailure::Misconfigured(e)
                        | ConnectFailure::Unreachable(e) => e,
                    };
                    return Ok(Some(retry(e, 0, ephemeral.len())));
                }
            }
            let mut sent = 0usize;
            for (i, item) in ephemeral.iter().enumerate() {
                let subj = subject(&cfg.workspace_id, "events", &item.kind);
                if let Err(e) = client
                    .publish(subj, bytes::Bytes::from(item.body.to_string()))
                    .await
                {
                    return Ok(Some(retry(
                        format!("publish: {e}"),
                        sent,
                        ephemeral.len() - i,
                    )));
                }
                sent += 1;
            }
            let items: Vec<Item> = store
                .run(ReadOutbox {
                    limit: cfg.batch_max,
                    max_bytes: crate::upstreams::drain::ROUND_MAX_BYTES,
                })
                .await?;
            if items.is_empty() && sent == 0 {
                return Ok::<_, StoreError>(None);
            }
            let (acked, error) = publish_in_order(&js, &cfg, &items).await;
            if !acked.is_empty() {
                stats
                    .upstream
                    .last_ack_ms
                    .store(crate::store::now_ms(), Ordering::Relaxed);
            }
            let n = acked.len();
            let more = n == cfg.batch_max;
            let oldest = store
                .run(Settle {
                    acked,
                    rejected: Vec::new(),
                })
                .await?;
            let end = match error {
                None => End::Done,
                Some(error) => End::Retry {
                    error,
                    retry_after: None,
                    dropped_ephemeral: 0,
                },
            };
            Ok(Some(Settled {
                end,
                sent: sent + n,
                removed: n,
                dead_lettered: 0,
                oldest,
                more,
            }))
        };
        ctx.spawn(fut.into_actor(self).map(|res, act, ctx| {
            match act.drain.finish(res, &act.stats) {
                Next::Idle => {}
                Next::Again => {
                    act.stats.set_upstream(None, "connected", None);
                    act.pump(ctx);
                }
                Next::Backoff { wait, error } => {
                    tracing::warn!(error = %error, wait_ms = wait.as_millis() as u64, "NATS publish failed; retrying");
                    act.recheck_stream = true;
                    act.stats.set_upstream(None, &format!("backoff (next try in {} ms)", wait.as_millis()), Some(error));
                    ctx.run_later(wait, |act, ctx| act.pump(ctx));
                }
                Next::Unauthorized(error) => {
                    act.stats.set_upstream(None, "unauthorized", Some(error));
                    ctx.run_later(Duration::from_secs(2), |act, ctx| act.pump(ctx));
                }
                Next::Store(e) => {
                    tracing::warn!(error = %e, "NATS upstream: cannot read or settle the outbox; retrying in 1 s");
                    ctx.run_later(Duration::from_secs(1), |act, ctx| act.pump(ctx));
                }
            }
        }));
    }
}

/// Publishes `items` pipelined (each with `Nats-Msg-Id` and `Nats-Expected-Stream`) and awaits
/// their acks in order. Returns the outbox rows of the acked prefix (a row counts only with
/// every row before it) and the first error.
async fn publish_in_order(
    js: &jetstream::Context,
    cfg: &NatsConfig,
    items: &[Item],
) -> (Vec<i64>, Option<String>) {
    let mut acks = Vec::with_capacity(items.len());
    let mut error = None;
    for item in items {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", item.event_id.as_str());
        headers.insert("Nats-Expected-Stream", cfg.stream.as_str());
        let subj = subject(&cfg.workspace_id, "events", &item.kind);
        match js
            .publish_with_headers(subj, headers, bytes::Bytes::from(item.body.to_string()))
            .await
        {
            Ok(f) => acks.push(f),
            Err(e) => {
                error = Some(format!("publish: {e}"));
                break;
            }
        }
    }
    let mut acked = Vec::new();
    for (item, ack) in items.iter().zip(acks) {
        // A `duplicate: true` ack is a stored event too (an earlier try's).
        match ack.await {
            Ok(_) => acked.extend(item.seq),
            Err(e) => {
                error.get_or_insert(format!("publish ack: {e}"));
                break;
            }
        }
    }
    (acked, error)
}

impl Actor for NatsUpstream {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Self::Context) {
        self.stats.set_upstream(Some("nats"), "connecting", None);
        self.drain.restarted();
        self.connect(ctx);
    }
}

/// A round that stopped on a failed publish: what was sent, and the ephemeral events dropped.
fn retry(error: String, sent: usize, dropped_ephemeral: usize) -> Settled {
    Settled {
        end: End::Retry {
            error,
            retry_after: None,
            dropped_ephemeral,
        },
        sent,
        removed: 0,
        dead_lettered: 0,
        oldest: 0,
        more: true,
    }
}

impl Supervised for NatsUpstream {}

impl Handler<ClientEvent> for NatsUpstream {
    type Result = ();
    fn handle(&mut self, ClientEvent(e): ClientEvent, ctx: &mut Context<Self>) {
        use async_nats::Event;
        match e {
            Event::Disconnected => {
                tracing::warn!("NATS upstream: disconnected; reconnecting");
                self.drain.ring.drop_all(&self.stats);
                self.stats
                    .set_upstream(None, "disconnected (reconnecting)", None);
            }
            Event::Connected => {
                tracing::info!("NATS upstream: reconnected");
                self.stats.set_upstream(None, "connected", None);
                self.drain.mark_dirty();
                self.pump(ctx);
            }
            Event::LameDuckMode => {
                // The server is going away: the client moves to another server of the
                // cluster by itself; nothing is lost (unacked publishes are retried).
                tracing::info!("NATS upstream: the server entered lame duck mode");
                self.last_lame_duck_ms = Some(crate::store::now_ms());
            }
            Event::ServerError(async_nats::ServerError::AuthorizationViolation) => {
                self.stats.set_upstream(
                    None,
                    "unauthorized",
                    Some("the server refused the credentials (authorization violation)".into()),
                );
            }
            other => tracing::debug!(event = %other, "NATS client event"),
        }
    }
}

impl Handler<Push> for NatsUpstream {
    type Result = ();
    fn handle(&mut self, m: Push, ctx: &mut Context<Self>) {
        let connected = self.connected();
        self.drain.push(m, connected, &self.stats);
        self.pump(ctx);
    }
}

impl Handler<IsIdle> for NatsUpstream {
    type Result = bool;
    fn handle(&mut self, _: IsIdle, _: &mut Context<Self>) -> bool {
        self.drain.idle()
    }
}
