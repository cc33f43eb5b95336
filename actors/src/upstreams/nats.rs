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
//! - Inbound: one durable pull consumer per workspace; a message is acked only after the
//!   inbound-log transaction that holds it committed. A redelivery is absorbed by the packs'
//!   replay log. An event the agent cannot read is dead-lettered (origin `inbound`) and then
//!   `term`ed, never redelivered forever.
//! - The stream (`LUMENFLOW`, subjects `lumenflow.>`, file storage, limits retention) is created
//!   when missing; an existing one is used as the operator configured it.

use crate::inbound_events::read_pulled_value;
use crate::router::{Inbound, Router};
use crate::stats::AgentStats;
use crate::store::{StoreError, StoreHandle};
use crate::upstreams::drain::{DrainLoop, End, IsIdle, Next, Push, Settled};
use crate::upstreams::outbox::{Item, ReadOutbox, Settle};
use actix::prelude::*;
use async_nats::jetstream;
use futures_util::StreamExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// The stream the agent creates when it is missing.
pub const DEFAULT_STREAM: &str = "LUMENFLOW";
/// Its duplicate window: retries of one event inside it are stored once. The agent's retry
/// backoff tops out at 30 s, far inside it.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

#[derive(Clone, Debug)]
pub struct NatsConfig {
    /// `nats://host:port` (several for a cluster).
    pub servers: Vec<String>,
    pub workspace_id: String,
    pub stream: String,
    pub batch_max: usize,
    /// A token for the server, when it asks for one (never logged).
    pub token: Option<String>,
}

/// `identity` as one subject token: bytes outside `[A-Za-z0-9_-]` as `~XX`.
pub fn subject_token(identity: &str) -> String {
    let mut out = String::with_capacity(identity.len());
    for b in identity.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("~{b:02X}"));
        }
    }
    out
}

/// The subject of an event of `kind` for `workspace`: `lumenflow.<W>.<dir>.<slug>.<name>`.
pub fn subject(workspace: &str, dir: &str, kind: &str) -> String {
    let (slug, name) = kind.split_once(':').unwrap_or((kind, "_"));
    format!(
        "lumenflow.{}.{dir}.{}.{}",
        subject_token(workspace),
        subject_token(slug),
        subject_token(name)
    )
}

pub struct NatsUpstream {
    cfg: NatsConfig,
    store: StoreHandle,
    router: Addr<Router>,
    stats: Arc<AgentStats>,
    /// The shared delivery loop (its transport here: JetStream publishes and their acks).
    drain: DrainLoop,
    js: Option<jetstream::Context>,
    client: Option<async_nats::Client>,
    /// The workspace's inbound consumer, once looked up.
    consumer: Option<jetstream::consumer::PullConsumer>,
}

impl NatsUpstream {
    pub fn new(
        cfg: NatsConfig,
        store: StoreHandle,
        router: Addr<Router>,
        stats: Arc<AgentStats>,
    ) -> Self {
        let drain = DrainLoop::new(cfg.batch_max);
        NatsUpstream {
            cfg,
            store,
            router,
            stats,
            drain,
            js: None,
            client: None,
            consumer: None,
        }
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        let cfg = self.cfg.clone();
        let fut = async move {
            let mut opts = async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .connection_timeout(Duration::from_secs(5));
            if let Some(t) = &cfg.token {
                opts = opts.token(t.clone());
            }
            let client = opts
                .connect(cfg.servers.clone())
                .await
                .map_err(|e| format!("cannot connect to {}: {e}", cfg.servers.join(",")))?;
            let js = jetstream::new(client.clone());
            js.get_or_create_stream(jetstream::stream::Config {
                name: cfg.stream.clone(),
                subjects: vec!["lumenflow.>".into()],
                storage: jetstream::stream::StorageType::File,
                duplicate_window: DUPLICATE_WINDOW,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("stream {}: {e}", cfg.stream))?;
            Ok::<_, String>((client, js))
        };
        ctx.spawn(fut.into_actor(self).map(|res, act, ctx| match res {
            Ok((client, js)) => {
                tracing::info!(servers = %act.cfg.servers.join(","), stream = %act.cfg.stream, "NATS JetStream upstream connected");
                act.client = Some(client);
                act.js = Some(js.clone());
                act.stats.set_upstream(Some("nats"), "connected", None);
                act.drain.mark_dirty();
                act.pump(ctx);
                act.pull(ctx, js);
            }
            Err(e) => {
                tracing::warn!(error = %e, "NATS upstream: not connected; retrying in 2 s");
                act.stats.set_upstream(Some("nats"), "connecting", Some(e));
                ctx.run_later(Duration::from_secs(2), |act, ctx| act.connect(ctx));
            }
        }));
    }

    fn connected(&self) -> bool {
        self.client
            .as_ref()
            .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected)
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
        let fut = async move {
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
                })
                .await?;
            if items.is_empty() && sent == 0 {
                return Ok::<_, StoreError>(None);
            }
            let mut acks = Vec::with_capacity(items.len());
            let mut error = None;
            for item in &items {
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
            // Acked in order: a row leaves only with every row before it.
            let mut acked = Vec::new();
            for (item, ack) in items.iter().zip(acks) {
                match ack.await {
                    Ok(_) => acked.extend(item.seq),
                    Err(e) => {
                        error.get_or_insert(format!("publish ack: {e}"));
                        break;
                    }
                }
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

    /// The inbound loop: fetch from the workspace's durable consumer, commit to the inbound
    /// log, then ack (an event the agent cannot read is dead-lettered, then `term`ed).
    fn pull(&mut self, ctx: &mut Context<Self>, js: jetstream::Context) {
        let (cfg, router) = (self.cfg.clone(), self.router.clone());
        let known = self.consumer.clone();
        let fut = async move {
            // The consumer is looked up once and kept; after any failure it is looked up (or
            // created) again, so a consumer that went stale across a reconnect is replaced.
            let consumer = match known {
                Some(c) => c,
                None => workspace_consumer(&js, &cfg).await?,
            };
            let keep = consumer.clone();
            let fetched = fetch_and_commit(consumer, &router).await;
            fetched.map(|n| (n, keep))
        };
        ctx.spawn(fut.into_actor(self).map(
            move |res: Result<(usize, jetstream::consumer::PullConsumer), String>, act, ctx| {
                match res {
                    Ok((n, consumer)) => {
                        act.consumer = Some(consumer);
                        act.stats
                            .upstream
                            .pulled
                            .fetch_add(n as u64, Ordering::Relaxed);
                        if let Some(js) = act.js.clone() {
                            act.pull(ctx, js);
                        }
                    }
                    Err(e) => {
                        act.consumer = None;
                        tracing::warn!(error = %e, "NATS inbound pull failed; retrying in 2 s");
                        ctx.run_later(Duration::from_secs(2), |act, ctx| {
                            if let Some(js) = act.js.clone() {
                                act.pull(ctx, js);
                            }
                        });
                    }
                }
            },
        ));
    }
}

/// The workspace's durable pull consumer `lf-<W>` on its inbound subjects, created when
/// missing. `max_ack_pending` bounds what is handed out unacked (one fetch of 500 at a time,
/// handled in order).
async fn workspace_consumer(
    js: &jetstream::Context,
    cfg: &NatsConfig,
) -> Result<jetstream::consumer::PullConsumer, String> {
    let stream = js
        .get_stream(&cfg.stream)
        .await
        .map_err(|e| format!("stream {}: {e}", cfg.stream))?;
    let name = format!("lf-{}", subject_token(&cfg.workspace_id));
    stream
        .get_or_create_consumer(
            &name,
            jetstream::consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: format!("lumenflow.{}.inbound.>", subject_token(&cfg.workspace_id)),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 1000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("consumer {name}: {e}"))
}

/// One fetch: the messages committed to the inbound log, then acked (`term` for those the agent
/// cannot read, dead-lettered in the same commit); when the commit fails, `nak`ed with a delay
/// so they come again soon. Returns how many events were read.
async fn fetch_and_commit(
    consumer: jetstream::consumer::PullConsumer,
    router: &Addr<Router>,
) -> Result<usize, String> {
    let mut batch = consumer
        .fetch()
        .max_messages(500)
        .expires(Duration::from_secs(5))
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
    let mut events = Vec::new();
    let mut unreadable = Vec::new();
    let mut readable = Vec::with_capacity(messages.len());
    for m in &messages {
        let value = serde_json::from_slice(&m.payload).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&m.payload).into_owned())
        });
        match read_pulled_value(value) {
            Ok(env) => {
                events.push(env);
                readable.push(true);
            }
            Err(u) => {
                unreadable.push(u);
                readable.push(false);
            }
        }
    }
    let n = events.len();
    let committed = router
        .send(Inbound {
            events,
            unreadable,
            cursor: None,
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
    // Committed: now the server may forget them.
    for (m, ok) in messages.iter().zip(readable) {
        let kind = if ok {
            jetstream::AckKind::Ack
        } else {
            jetstream::AckKind::Term
        };
        if let Err(e) = m.ack_with(kind).await {
            tracing::debug!(error = %e, "NATS ack failed; the message comes again and the replay log absorbs it");
        }
    }
    Ok(n)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_one_token_per_part() {
        assert_eq!(
            subject("ws-test", "events", "acme-demo:job_completed"),
            "lumenflow.ws-test.events.acme-demo.job_completed"
        );
        assert_eq!(subject_token("acme.prod west"), "acme~2Eprod~20west");
        assert_eq!(subject_token("ünï"), "~C3~BCn~C3~AF");
    }
}
