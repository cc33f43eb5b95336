//! `HttpUpstream`: the LumenFlow control plane as the upstream (SPEC §9; conductor mode).
//!
//! Owns the connection to the control plane: pushing the outbox, heartbeats, the policy pull
//! and the inbound long-poll. HTTP calls run on tokio's blocking pool (ureq, rustls for
//! https) so they never block the actors.
//!
//! Guarantees:
//! - Durable events are pushed in order, in batches (`POST /api/v1/events`), and deleted from
//!   the outbox only when a 2xx reply counts them: `{"accepted": n}` acknowledges the first `n`
//!   of the batch; the rest wait, in order. A 2xx without that count (an HTML login page) acks
//!   nothing; redirects are never followed (a followed POST turns into a GET without the
//!   token). 3xx/408/429/5xx/network errors retry with full-jitter backoff (Retry-After
//!   honoured); nothing is dropped.
//! - 401/403 pause the upstream (`unauthorized`; the token is re-read from the enrollment at
//!   every retry); 413 splits the batch; 400/422 bisect it and dead-letter only the rejected
//!   events, with the server's reason.
//! - Circuit breaker: while the upstream is not connected, ephemeral events are dropped and
//!   counted (fail-silent), queue events wait durably.
//! - A policy pull answering `default_decision: "deny"` pauses forwarding (events wait).
//! - Inbound events are persisted together with the pull cursor before the cursor advances;
//!   an event the agent cannot read is dead-lettered (origin `inbound`) in that transaction.

use crate::inbound_events::read_pulled_value;
use crate::policy_mode::PolicyMode;
use crate::router::{Inbound, Router};
use crate::stats::AgentStats;
use crate::store::{now_ms, StoreError, StoreHandle};
use crate::supervision::full_jitter;
use crate::sync_records::{record_count, OldestRecord, RecordOutcome, SettleRecord};
use crate::upstreams::drain::{DrainLoop, End, IsIdle, Next, Push, Settled};
use crate::upstreams::outbox::{Item, ReadOutbox, Settle};
use actix::prelude::*;
use rusqlite::Connection;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const PUSH_TIMEOUT: Duration = Duration::from_secs(10);
const PULL_WAIT_MS: u64 = 20_000;

#[derive(Clone)]
pub struct HttpConfig {
    pub endpoint: String,
    pub token: String,
    pub workspace_id: String,
    pub batch_max: usize,
    /// Re-read for a new token while unauthorized.
    pub enrollment_file: Option<PathBuf>,
    /// Root certificates to trust instead of the bundled Mozilla roots (`tls.ca_file`).
    pub root_certs: Option<Arc<Vec<ureq::tls::Certificate<'static>>>>,
    /// Heartbeat and policy refresh until the control plane says otherwise
    /// (`next_heartbeat_ms`); workspace.yaml `sync_interval`, else 30 s.
    pub sync_interval: Duration,
    /// How the control plane's `default_decision` combines with the local one.
    pub policy_mode: PolicyMode,
    /// The local policies' `default_decision` is `deny` (agent.json `policies`).
    pub local_deny: bool,
}

/// Reads the certificates of a PEM file (`tls.ca_file`); an error names what is wrong.
pub fn load_root_certs(pem: &[u8]) -> Result<Vec<ureq::tls::Certificate<'static>>, String> {
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(pem) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(e) => return Err(format!("not a valid PEM file: {e}")),
        }
    }
    if certs.is_empty() {
        return Err("no certificate in it (expected -----BEGIN CERTIFICATE-----)".into());
    }
    Ok(certs)
}

/// The pull cursor persisted with the inbound events (`meta.pull_cursor`).
pub fn load_pull_cursor(conn: &Connection) -> Result<Option<String>, StoreError> {
    Ok(crate::schema::meta_get(conn, "pull_cursor")?)
}

/// The result of one HTTP call: status, body, Retry-After (s), Location.
pub enum Reply {
    Status(u16, String, Option<u64>, Option<String>),
    Network(String),
}

/// The first 200 characters of a reply, for a log line or an error.
pub fn excerpt(text: &str) -> String {
    text.chars().take(200).collect()
}

impl Reply {
    /// Why a call to `what` did not succeed (`{what}: HTTP 503: …`, `{what}: network: …`), for
    /// a retry's log line and `status`.
    pub fn failure(&self, what: &str) -> String {
        match self {
            Reply::Status(s, text, _, _) => format!("{what}: HTTP {s}: {}", excerpt(text)),
            Reply::Network(e) => format!("{what}: network: {e}"),
        }
    }
}

/// How many events of a batch of `sent` a 2xx reply acknowledges: the leading `accepted` of
/// them, as the platform reads `{"accepted": n}` (`accepted: 0` is "none accepted", not
/// success). A 2xx that does not say so (an HTML page, `{}`, a proxy's empty 204) is no ack:
/// nothing leaves the outbox on it.
pub fn accepted_count(body: &str, sent: usize) -> Result<usize, String> {
    let excerpt = || body.chars().take(120).collect::<String>();
    let v: Value = serde_json::from_str(body).map_err(|_| {
        format!(
            "the reply is not the JSON {{\"accepted\": n}} of a LumenFlow control plane: {:?}",
            excerpt()
        )
    })?;
    match v.get("accepted").and_then(Value::as_u64) {
        Some(n) => Ok((n as usize).min(sent)),
        None => Err(format!(
            "the reply has no \"accepted\" count: {:?}",
            excerpt()
        )),
    }
}

/// An HTTP client for the control plane: never follows redirects; `roots`: `tls.ca_file`.
pub fn http_agent(
    timeout: Duration,
    roots: Option<&Arc<Vec<ureq::tls::Certificate<'static>>>>,
) -> ureq::Agent {
    // Never follow a redirect: ureq would turn the POST into a GET without the token, and the
    // 200 of a login page would read as an ack. A 3xx is an error that says where it points.
    let mut b = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .max_redirects(0)
        .http_status_as_error(false);
    if let Some(roots) = roots {
        b = b.tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::Specific(roots.clone()))
                .build(),
        );
    }
    b.build().into()
}

/// One blocking HTTP call on a thread of its own, detached: a shutting-down agent never waits
/// for it. (On tokio's blocking pool, the runtime's drop at exit waited for an open 20 s
/// long-poll: the process lived 12-17 s after `stopped`.) A call abandoned at exit changes
/// nothing durable: its answer would only have been acted on by a running agent.
pub async fn post(agent: ureq::Agent, url: String, token: String, body: String) -> Reply {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("lumenflow-http".into())
        .spawn(move || {
            let _ = tx.send(blocking_post(agent, url, token, body));
        });
    if let Err(e) = spawned {
        return Reply::Network(format!("cannot start an HTTP thread: {e}"));
    }
    rx.await
        .unwrap_or_else(|_| Reply::Network("HTTP thread ended without an answer".into()))
}

fn blocking_post(agent: ureq::Agent, url: String, token: String, body: String) -> Reply {
    {
        let resp = agent
            .post(&url)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .send(body);
        match resp {
            Ok(mut r) => {
                let status = r.status().as_u16();
                let retry_after = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok());
                let location = r
                    .headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let text = r
                    .body_mut()
                    .with_config()
                    .limit(16 << 20)
                    .read_to_string()
                    .unwrap_or_default();
                Reply::Status(status, text, retry_after, location)
            }
            Err(e) => Reply::Network(e.to_string()),
        }
    }
}

fn batch_body(workspace_id: &str, items: &[Item]) -> String {
    let mut s = String::with_capacity(64 + items.iter().map(|i| i.body.len() + 1).sum::<usize>());
    s.push_str("{\"workspace_id\":");
    s.push_str(&Value::String(workspace_id.to_string()).to_string());
    s.push_str(",\"events\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&item.body);
    }
    s.push_str("]}");
    s
}

/// What a push round did: what was acknowledged or rejected, and how it ended.
struct Round {
    /// Outbox rows the upstream accepted.
    acked: Vec<i64>,
    /// Events the upstream rejected (400/413/422 on a single event), with the reason.
    rejected: Vec<(Item, String)>,
    /// Events accepted (durable and ephemeral).
    sent: usize,
    end: End,
}

/// Sends `items`, splitting on 413 and bisecting on 400/422.
async fn push_round(agent: ureq::Agent, cfg: HttpConfig, items: Vec<Item>) -> Round {
    let url = format!("{}/api/v1/events", cfg.endpoint);
    let mut stack = vec![items];
    let mut round = Round {
        acked: Vec::new(),
        rejected: Vec::new(),
        sent: 0,
        end: End::Done,
    };
    while let Some(batch) = stack.pop() {
        let reply = post(
            agent.clone(),
            url.clone(),
            cfg.token.clone(),
            batch_body(&cfg.workspace_id, &batch),
        )
        .await;
        let dropped_ephemeral = || {
            stack
                .iter()
                .flatten()
                .chain(batch.iter())
                .filter(|i| i.seq.is_none())
                .count()
        };
        let excerpt = |text: &str, n: usize| text.chars().take(n).collect::<String>();
        match reply {
            Reply::Status(s, text, _, _) if (200..300).contains(&s) => {
                let n = match accepted_count(&text, batch.len()) {
                    Ok(n) => n,
                    Err(why) => {
                        round.end = End::Retry {
                            error: format!("HTTP {s} is not an ack: {why}; the events wait"),
                            retry_after: None,
                            dropped_ephemeral: dropped_ephemeral(),
                        };
                        return round;
                    }
                };
                round.sent += n;
                round.acked.extend(batch[..n].iter().filter_map(|i| i.seq));
                if n < batch.len() {
                    // The rest of the batch, in order, waits for the next push.
                    let rest = batch.len() - n;
                    let dropped = stack
                        .iter()
                        .flatten()
                        .chain(batch[n..].iter())
                        .filter(|i| i.seq.is_none())
                        .count();
                    round.end = End::Retry {
                        error: format!(
                            "the control plane accepted {n} of {} events; {rest} wait and are sent again",
                            batch.len()
                        ),
                        retry_after: None,
                        dropped_ephemeral: dropped,
                    };
                    return round;
                }
            }
            Reply::Status(s @ 300..=399, _, _, location) => {
                round.end = End::Retry {
                    error: format!(
                        "HTTP {s} redirect to {} is not an ack (redirects are not followed: set the endpoint to the control plane itself); the events wait",
                        location.as_deref().unwrap_or("(no Location)")
                    ),
                    retry_after: None,
                    dropped_ephemeral: dropped_ephemeral(),
                };
                return round;
            }
            Reply::Status(s @ (400 | 413 | 422), text, _, _) => {
                if batch.len() > 1 {
                    let mut first = batch;
                    let second = first.split_off(first.len() / 2);
                    stack.push(second);
                    stack.push(first);
                } else if let Some(item) = batch.into_iter().next() {
                    let reason = format!(
                        "upstream rejected the event: HTTP {s}: {}",
                        excerpt(&text, 500)
                    );
                    tracing::error!(event_id = %item.event_id, kind = %item.kind, "{reason}");
                    round.rejected.push((item, reason));
                }
            }
            Reply::Status(s @ (401 | 403), text, _, _) => {
                let error = format!("HTTP {s}: {}", excerpt(&text, 300));
                round.end = End::Unauthorized {
                    error,
                    dropped_ephemeral: dropped_ephemeral(),
                };
                return round;
            }
            Reply::Status(s, text, retry_after, _) => {
                let error = format!("HTTP {s}: {}", excerpt(&text, 300));
                round.end = End::Retry {
                    error,
                    retry_after,
                    dropped_ephemeral: dropped_ephemeral(),
                };
                return round;
            }
            Reply::Network(e) => {
                round.end = End::Retry {
                    error: format!("network: {e}"),
                    retry_after: None,
                    dropped_ephemeral: dropped_ephemeral(),
                };
                return round;
            }
        }
    }
    round
}

/// What one step of the records loop did.
enum RecordRound {
    /// Nothing waits.
    Idle,
    Progress {
        waiting: i64,
        forwarded: usize,
        refused: bool,
    },
    Retry(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Connected,
    Backoff,
    Unauthorized,
    PolicyDeny,
}

pub struct HttpUpstream {
    cfg: HttpConfig,
    store: StoreHandle,
    router: Addr<Router>,
    stats: Arc<AgentStats>,
    /// The shared delivery loop: rounds, ack accounting, backoff, the ephemeral ring.
    drain: DrainLoop,
    link: Link,
    heartbeat_every: Duration,
    pull_cursor: Option<String>,
    /// Empty pull answers in a row that came back without waiting (see `pull_pause`).
    empty_pulls: u32,
    push_agent: ureq::Agent,
    /// Built once, like `push_agent`: its connection (and TLS session) is kept between polls.
    pull_agent: ureq::Agent,
    session_id: String,
    /// Sync-port records in flight (their own loop beside the events': see `sync_records`).
    records_busy: bool,
    records_attempt: u32,
    /// An exchange with the control plane succeeded since the last failure: only then does
    /// `status` say `connected` (`connecting` before).
    exchanged: bool,
}

impl HttpUpstream {
    pub fn new(
        cfg: HttpConfig,
        store: StoreHandle,
        router: Addr<Router>,
        stats: Arc<AgentStats>,
        pull_cursor: Option<String>,
    ) -> Self {
        let heartbeat_every = cfg.sync_interval;
        let drain = DrainLoop::new(cfg.batch_max);
        let push_agent = http_agent(PUSH_TIMEOUT, cfg.root_certs.as_ref());
        let pull_agent = http_agent(
            Duration::from_millis(PULL_WAIT_MS) + PUSH_TIMEOUT,
            cfg.root_certs.as_ref(),
        );
        HttpUpstream {
            cfg,
            store,
            router,
            stats,
            drain,
            link: Link::Connected,
            heartbeat_every,
            pull_cursor,
            empty_pulls: 0,
            push_agent,
            pull_agent,
            session_id: uuid::Uuid::now_v7().to_string(),
            records_busy: false,
            records_attempt: 0,
            exchanged: false,
        }
    }

    fn set_link(&mut self, link: Link, error: Option<String>, next_try: Option<Duration>) {
        self.link = link;
        if link != Link::Connected {
            self.exchanged = false;
        }
        let state = match (link, next_try) {
            (Link::Connected, _) if self.exchanged => "connected".to_string(),
            (Link::Connected, _) => "connecting".to_string(),
            (Link::Backoff, Some(d)) => format!("backoff (next try in {} ms)", d.as_millis()),
            (Link::Backoff, None) => "backoff".to_string(),
            (Link::Unauthorized, _) => "unauthorized".to_string(),
            (Link::PolicyDeny, _) => "paused (policy default_decision: deny)".to_string(),
        };
        self.stats.set_upstream(None, &state, error);
    }

    /// The control plane answered a request with success: the link is up.
    fn exchanged_ok(&mut self) {
        if !self.exchanged && self.link == Link::Connected {
            self.exchanged = true;
            self.set_link(Link::Connected, None, None);
        }
    }

    /// A request that should have succeeded failed while nothing else said so (the drain was
    /// idle): `status` no longer says `connected`.
    fn exchange_failed(&mut self, error: String) {
        if self.link == Link::Connected {
            self.exchanged = false;
            self.set_link(Link::Connected, Some(error), None);
        }
    }

    fn reread_token(&mut self) {
        if let Some(f) = &self.cfg.enrollment_file {
            if let Some(t) = std::fs::read_to_string(f)
                .ok()
                .and_then(|s| serde_json::from_str::<Value>(&s).ok())
                .and_then(|v| v["token"].as_str().map(str::to_string))
            {
                self.cfg.token = t;
            }
        }
    }

    /// One round of the shared drain loop (`drain`): the HTTP transport is `push_round`.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.link != Link::Connected || !self.drain.begin() {
            return;
        }
        let ephemeral = self.drain.take_ephemeral_items();
        let limit = self.cfg.batch_max - ephemeral.len();
        let (store, agent, cfg) = (
            self.store.clone(),
            self.push_agent.clone(),
            self.cfg.clone(),
        );
        let fut = async move {
            let mut items = if limit > 0 {
                store
                    .run(ReadOutbox {
                        limit,
                        max_bytes: crate::upstreams::drain::ROUND_MAX_BYTES,
                    })
                    .await?
            } else {
                Vec::new()
            };
            items.extend(ephemeral);
            if items.is_empty() {
                return Ok(None);
            }
            let Round {
                acked,
                rejected,
                sent,
                end,
            } = push_round(agent, cfg, items).await;
            let dead_lettered = rejected.iter().filter(|(i, _)| i.seq.is_some()).count();
            let removed = acked.len() + dead_lettered;
            let oldest = store.run(Settle { acked, rejected }).await?;
            Ok::<_, StoreError>(Some(Settled {
                end,
                sent,
                removed,
                dead_lettered,
                oldest,
                more: true,
            }))
        };
        ctx.spawn(fut.into_actor(self).map(|res, act, ctx| {
            match act.drain.finish(res, &act.stats) {
                Next::Idle => {}
                Next::Again => {
                    act.exchanged = true;
                    act.set_link(Link::Connected, None, None);
                    act.pump(ctx);
                }
                Next::Backoff { wait, error } => {
                    tracing::warn!(error = %error, attempt = act.drain.attempt(), wait_ms = wait.as_millis() as u64, "upstream push failed; retrying");
                    act.set_link(Link::Backoff, Some(error), Some(wait));
                    ctx.run_later(wait, |act, ctx| {
                        if act.link == Link::Backoff {
                            act.set_link(Link::Connected, None, None);
                        }
                        act.pump(ctx);
                    });
                }
                Next::Unauthorized(error) => {
                    tracing::error!(error = %error, "upstream refused the token: paused (nothing is dropped); fix the enrollment token");
                    act.set_link(Link::Unauthorized, Some(format!("unauthorized: {error}")), None);
                    ctx.run_later(Duration::from_secs(2), |act, ctx| act.retry_unauthorized(ctx));
                }
                Next::Store(e) => {
                    tracing::warn!(error = %e, "upstream: cannot read or settle the outbox; retrying in 1 s");
                    ctx.run_later(Duration::from_secs(1), |act, ctx| act.pump(ctx));
                }
            }
        }));
    }

    fn retry_unauthorized(&mut self, ctx: &mut Context<Self>) {
        if self.link != Link::Unauthorized {
            return;
        }
        self.reread_token();
        self.link = Link::Connected; // try once; a 401 puts us back
        self.pump(ctx);
        if self.link == Link::Connected && !self.drain.busy() {
            ctx.run_later(Duration::from_secs(2), |act, ctx| {
                act.retry_unauthorized(ctx)
            });
        }
    }

    fn heartbeat(&mut self, ctx: &mut Context<Self>) {
        let (agent, cfg, session) = (
            self.push_agent.clone(),
            self.cfg.clone(),
            self.session_id.clone(),
        );
        let fut = async move {
            let hb = post(agent.clone(), format!("{}/api/v1/heartbeat", cfg.endpoint), cfg.token.clone(),
                json!({"workspace_id": cfg.workspace_id, "session_id": session, "agent_id": "lumenflow-agent"}).to_string()).await;
            let policy = post(
                agent,
                format!("{}/api/v1/policies", cfg.endpoint),
                cfg.token.clone(),
                json!({"workspace_id": cfg.workspace_id}).to_string(),
            )
            .await;
            (hb, policy)
        };
        ctx.spawn(fut.into_actor(self).map(|(hb, policy), act, ctx| {
            match &hb {
                Reply::Status(200..=299, _, _, _) => act.exchanged_ok(),
                // A control plane without the endpoint is not down.
                Reply::Status(404 | 405, _, _, _) => {}
                // Refused while nothing else asked (an idle outbox): say so now, as a push
                // would, and read the token again until it is accepted.
                Reply::Status(401 | 403, _, _, _) => {
                    if act.link == Link::Connected {
                        act.set_link(Link::Unauthorized, Some(format!("unauthorized: {}", hb.failure("heartbeat"))), None);
                        ctx.run_later(Duration::from_secs(2), |act, ctx| act.retry_unauthorized(ctx));
                    }
                }
                other => act.exchange_failed(other.failure("heartbeat")),
            }
            if let Reply::Status(200..=299, text, _, _) = &hb {
                act.stats.upstream.heartbeat_ms.store(now_ms(), Ordering::Relaxed);
                if let Some(ms) = serde_json::from_str::<Value>(text).ok().and_then(|v| v["next_heartbeat_ms"].as_u64()).filter(|ms| (1000..=600_000).contains(ms)) {
                    act.heartbeat_every = Duration::from_millis(ms);
                }
            }
            if let Reply::Status(200..=299, text, _, _) = &policy {
                let remote_deny = serde_json::from_str::<Value>(text).ok().is_some_and(|v| v["default_decision"] == "deny");
                let (deny, warning) = act.cfg.policy_mode.deny(remote_deny, act.cfg.local_deny);
                if let Some(w) = warning {
                    tracing::warn!(policy_mode = act.cfg.policy_mode.name(), "{w}");
                }
                if deny && act.link == Link::Connected {
                    tracing::warn!("control plane policy default_decision is deny: forwarding paused (events wait)");
                    act.set_link(Link::PolicyDeny, None, None);
                } else if !deny && act.link == Link::PolicyDeny {
                    tracing::info!("control plane policy allows forwarding again");
                    act.set_link(Link::Connected, None, None);
                    act.drain.mark_dirty();
                    act.pump(ctx);
                }
            }
            let every = act.heartbeat_every;
            ctx.run_later(every, |act, ctx| act.heartbeat(ctx));
        }));
    }

    /// Forwards the oldest waiting sync-port record (telemetry, evidence), then the next; when
    /// none waits, looks again in a second. Held, like events, while the control plane refuses
    /// the token or its policy says deny.
    fn pump_records(&mut self, ctx: &mut Context<Self>) {
        if self.records_busy {
            return;
        }
        if matches!(self.link, Link::Unauthorized | Link::PolicyDeny) {
            ctx.run_later(Duration::from_secs(1), |act, ctx| act.pump_records(ctx));
            return;
        }
        self.records_busy = true;
        let (store, agent, cfg) = (
            self.store.clone(),
            self.push_agent.clone(),
            self.cfg.clone(),
        );
        let fut = async move {
            let Some(record) = store.run(OldestRecord).await? else {
                return Ok::<_, StoreError>(RecordRound::Idle);
            };
            let count = record_count(&record.path, &record.body);
            let reply = post(
                agent,
                format!("{}{}", cfg.endpoint, record.path),
                cfg.token.clone(),
                record.body.clone(),
            )
            .await;
            let outcome = match reply {
                Reply::Status(200..=299, text, _, _) => match accepted_count(&text, count) {
                    Ok(n) if n > 0 || count == 0 => RecordOutcome::Accepted(n.max(1)),
                    Ok(_) => {
                        return Ok(RecordRound::Retry(format!(
                            "{}: the control plane accepted 0 of {count} records",
                            record.path
                        )))
                    }
                    Err(e) => return Ok(RecordRound::Retry(format!("{}: {e}", record.path))),
                },
                Reply::Status(s @ (400 | 404 | 422), text, _, _) => {
                    tracing::error!(path = %record.path, status = s, reply = %excerpt(&text), "the control plane refused sync-port records; dropped (not retried)");
                    RecordOutcome::Refused
                }
                other => return Ok(RecordRound::Retry(other.failure(&record.path))),
            };
            let refused = matches!(outcome, RecordOutcome::Refused);
            let forwarded = match outcome {
                RecordOutcome::Accepted(n) => n.min(count),
                RecordOutcome::Refused => 0,
            };
            let waiting = store.run(SettleRecord { record, outcome }).await?;
            Ok(RecordRound::Progress {
                waiting,
                forwarded,
                refused,
            })
        };
        ctx.spawn(fut.into_actor(self).map(|res, act, ctx| {
            act.records_busy = false;
            let up = &act.stats.upstream;
            match res {
                Ok(RecordRound::Idle) => {
                    up.records_waiting.store(0, Ordering::Relaxed);
                    act.records_attempt = 0;
                    ctx.run_later(Duration::from_secs(1), |act, ctx| act.pump_records(ctx));
                }
                Ok(RecordRound::Progress { waiting, forwarded, refused }) => {
                    up.records_waiting.store(waiting, Ordering::Relaxed);
                    up.records_forwarded.fetch_add(forwarded as u64, Ordering::Relaxed);
                    if refused {
                        up.records_refused.fetch_add(1, Ordering::Relaxed);
                    }
                    act.records_attempt = 0;
                    act.pump_records(ctx);
                }
                Ok(RecordRound::Retry(error)) => {
                    act.records_attempt += 1;
                    let wait = full_jitter(Duration::from_millis(200), Duration::from_secs(30), act.records_attempt);
                    tracing::warn!(error = %error, wait_ms = wait.as_millis() as u64, "forwarding sync-port records failed; retrying");
                    ctx.run_later(wait, |act, ctx| act.pump_records(ctx));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read or settle sync-port records; retrying in 1 s");
                    ctx.run_later(Duration::from_secs(1), |act, ctx| act.pump_records(ctx));
                }
            }
        }));
    }

    fn pull(&mut self, ctx: &mut Context<Self>) {
        let agent = self.pull_agent.clone();
        let cfg = self.cfg.clone();
        let cursor = self.pull_cursor.clone();
        let router = self.router.clone();
        let fut = async move {
            let body = json!({"workspace_id": cfg.workspace_id, "cursor": cursor, "limit": 500, "wait_ms": PULL_WAIT_MS}).to_string();
            match post(
                agent,
                format!("{}/api/v1/events/pull", cfg.endpoint),
                cfg.token.clone(),
                body,
            )
            .await
            {
                Reply::Status(200..=299, text, _, _) => {
                    let mut v: Value = serde_json::from_str(&text)
                        .map_err(|e| format!("pull reply is not JSON: {e}"))?;
                    let next = match &v["next_cursor"] {
                        Value::String(s) => Some(s.clone()),
                        Value::Number(n) => Some(n.to_string()),
                        _ => cursor.clone(),
                    };
                    let mut events = Vec::new();
                    let mut unreadable = Vec::new();
                    let listed = match v["events"].take() {
                        Value::Array(list) => list,
                        Value::Null => Vec::new(),
                        other => {
                            return Err(format!(
                                "pull reply: \"events\" must be a list, got {}",
                                other.to_string().chars().take(100).collect::<String>()
                            ))
                        }
                    };
                    for e in listed {
                        match read_pulled_value(e) {
                            Ok(env) => events.push(env),
                            Err(u) => {
                                // Dead-lettered with the cursor that passes it: never lost.
                                tracing::error!(reason = %u.reason, "upstream sent an event the agent cannot read; dead-lettered (see `lumenflow-agent dlq list`)");
                                unreadable.push(u);
                            }
                        }
                    }
                    let n = events.len();
                    if n > 0 || !unreadable.is_empty() || next != cursor {
                        router
                            .send(Inbound {
                                events,
                                unreadable,
                                cursor: next.clone().map(crate::router::PullCursor::http),
                            })
                            .await
                            .map_err(|e| e.to_string())?
                            .map_err(|e| e.to_string())?;
                    }
                    Ok((next, n))
                }
                other => Err(other.failure("pull")),
            }
        };
        let began = std::time::Instant::now();
        ctx.spawn(fut.into_actor(self).map(
            move |res: Result<(Option<String>, usize), String>, act, ctx| match res {
                Ok((next, n)) => {
                    act.exchanged_ok();
                    act.pull_cursor = next;
                    act.stats
                        .upstream
                        .pulled
                        .fetch_add(n as u64, Ordering::Relaxed);
                    // An endpoint that answers "nothing" at once (it ignores wait_ms) would be
                    // polled as fast as it answers: wait longer after each such answer.
                    match pull_pause(n, began.elapsed(), &mut act.empty_pulls) {
                        None => act.pull(ctx),
                        Some(wait) => {
                            ctx.run_later(wait, |act, ctx| act.pull(ctx));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "inbound pull failed; retrying in 2 s");
                    ctx.run_later(Duration::from_secs(2), |act, ctx| act.pull(ctx));
                }
            },
        ));
    }
}

/// How long to wait before the next pull: none after events or a pull that waited; after
/// quick empty answers, 250 ms doubling up to 5 s.
fn pull_pause(events: usize, took: Duration, quick_empty: &mut u32) -> Option<Duration> {
    if events > 0 || took >= Duration::from_secs(1) {
        *quick_empty = 0;
        return None;
    }
    *quick_empty = (*quick_empty + 1).min(16);
    Some((Duration::from_millis(250) * 2u32.pow(*quick_empty - 1)).min(Duration::from_secs(5)))
}

impl Actor for HttpUpstream {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Self::Context) {
        self.stats.set_upstream(Some("http"), "connecting", None);
        // A local deny that the policy mode lets win whatever the control plane says
        // (`tighten-only`, `dev-override`): paused from the start, not after a first push
        // raced the policy pull.
        if self.cfg.policy_mode.deny(false, self.cfg.local_deny).0 {
            self.set_link(Link::PolicyDeny, None, None);
        }
        self.drain.restarted();
        self.pump(ctx);
        self.heartbeat(ctx);
        self.pull(ctx);
        self.records_busy = false;
        self.pump_records(ctx);
    }
}

impl Supervised for HttpUpstream {}

impl Handler<Push> for HttpUpstream {
    type Result = ();
    fn handle(&mut self, m: Push, ctx: &mut Context<Self>) {
        // Circuit open: while not connected, ephemeral events are fail-silent.
        let connected = self.link == Link::Connected;
        self.drain.push(m, connected, &self.stats);
        self.pump(ctx);
    }
}

impl Handler<IsIdle> for HttpUpstream {
    type Result = bool;
    fn handle(&mut self, _: IsIdle, _: &mut Context<Self>) -> bool {
        self.drain.idle()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_empty_pulls_back_off_and_events_reset_it() {
        let mut k = 0;
        let quick = Duration::from_millis(3);
        let waits: Vec<_> = (0..7).map(|_| pull_pause(0, quick, &mut k)).collect();
        assert_eq!(waits[0], Some(Duration::from_millis(250)));
        assert_eq!(waits[1], Some(Duration::from_millis(500)));
        assert_eq!(waits[6], Some(Duration::from_secs(5)));
        assert_eq!(pull_pause(3, quick, &mut k), None);
        assert_eq!(
            pull_pause(0, quick, &mut k),
            Some(Duration::from_millis(250))
        );
        // A pull that waited (long poll) is followed at once.
        assert_eq!(pull_pause(0, Duration::from_secs(20), &mut k), None);
    }

    use super::accepted_count;

    #[test]
    fn only_an_accepted_count_is_an_ack() {
        assert_eq!(accepted_count(r#"{"accepted": 5}"#, 5), Ok(5));
        assert_eq!(accepted_count(r#"{"accepted": 2}"#, 5), Ok(2));
        assert_eq!(accepted_count(r#"{"accepted": 0}"#, 5), Ok(0));
        assert_eq!(accepted_count(r#"{"accepted": 9}"#, 5), Ok(5));
        assert!(accepted_count("<html>sign in</html>", 5).is_err());
        assert!(accepted_count("{}", 5).is_err());
        assert!(accepted_count("", 5).is_err());
        assert!(accepted_count(r#"{"accepted": "5"}"#, 5).is_err());
        assert!(accepted_count(r#"{"accepted": -1}"#, 5).is_err());
    }
}
