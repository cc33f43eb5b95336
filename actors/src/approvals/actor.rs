//! `Approvals`: takes decisions on held events (from the local API and the CLI), records
//! `expired` when a deadline passes, and in conductor mode carries each request to the control
//! plane and its decision back.
//!
//! Guarantees:
//! - A decision's released event and `agent:approval_*` rows reach local packs from the
//!   Store's commit hook (commit order), and the released event is counted into the durable
//!   depth before the upstream can read it.
//! - Deadlines are checked every second; a deadline that passed while the agent was stopped
//!   is recorded at start.
//! - Conductor mode: a held event's request is sent with `requestApproval`
//!   (`/api/v1/approvals/request`) until the control plane answers with its approval id; its
//!   decision is pulled with `listApprovals` and matched by that id, or by the subject's
//!   `event_id` and `payload_sha256`; a decision taken here is sent with `resolveApproval`.
//!   All three are retried with backoff until they succeed; their state is in the table, so a
//!   restart resumes them. A crash between the control plane's answer to a request and its
//!   commit here sends the request again: a decision on either copy decides the event, once.

use super::held::{decide, Decided, Decision, ExpireDue, Origin};
use super::records::{ApprovalError, ResolveApproval};
use super::SharedPolicy;
use crate::router::{Dispatch, Router};
use crate::stats::AgentStats;
use crate::store::{now_ms, OnCommit, StoreError, StoreHandle, StoreOp};
use crate::upstreams::drain::Push;
use crate::upstreams::http::{excerpt, post, Reply};
use actix::prelude::*;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Map, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How often deadlines are checked.
const EXPIRY_EVERY: Duration = Duration::from_secs(1);
/// How often the control plane is asked for decisions (and waiting requests are sent).
const RELAY_EVERY: Duration = Duration::from_secs(2);
/// Most pages of `listApprovals` read per kind and round.
const LIST_PAGES_MAX: usize = 20;

/// The control plane of conductor mode.
#[derive(Clone)]
pub struct RelayTarget {
    pub endpoint: String,
    pub token: String,
    pub workspace_id: String,
    pub agent: ureq::Agent,
}

pub struct Approvals {
    io: Io,
    policy: SharedPolicy,
    relay: Option<RelayTarget>,
    relay_busy: bool,
    relay_failures: u32,
    /// Deadline checks since start: with nothing pending, only every 10th touches the database.
    ticks: u64,
}

impl Approvals {
    pub fn new(
        store: StoreHandle,
        router: Addr<Router>,
        upstream: Recipient<Push>,
        stats: Arc<AgentStats>,
        policy: SharedPolicy,
        relay: Option<RelayTarget>,
    ) -> Self {
        Approvals {
            io: Io {
                store,
                router,
                upstream,
                stats,
            },
            policy,
            relay,
            relay_busy: false,
            relay_failures: 0,
            ticks: 0,
        }
    }

    fn expire(&mut self, ctx: &mut Context<Self>) {
        self.ticks += 1;
        // Nothing held: an idle agent does not query every second. A hold counts itself in
        // at once (`queue::announce`); the count is read again every 10 s regardless.
        if self.io.stats.approvals.pending.load(Ordering::Acquire) <= 0 && self.ticks % 10 != 1 {
            ctx.run_later(EXPIRY_EVERY, |act, ctx| act.expire(ctx));
            return;
        }
        let io = self.io.clone();
        let fut = async move {
            let decided = io.decide(ExpireDue { now_ms: now_ms() }).await?;
            for d in &decided {
                tracing::info!(approval_id = %d.record["approval_id"].as_str().unwrap_or(""), kind = %d.record["type"].as_str().unwrap_or(""), released = d.released, "held event expired");
            }
            let pending = io.store.run(CountPending).await?;
            io.stats.approvals.pending.store(pending, Ordering::Relaxed);
            Ok::<_, StoreError>(())
        };
        ctx.spawn(fut.into_actor(self).map(|res, _, ctx| {
            if let Err(e) = res {
                tracing::warn!(error = %e, "approvals: cannot check deadlines; retrying");
            }
            ctx.run_later(EXPIRY_EVERY, |act, ctx| act.expire(ctx));
        }));
    }

    fn relay_round(&mut self, ctx: &mut Context<Self>) {
        let Some(target) = self.relay.clone() else {
            return;
        };
        if self.relay_busy {
            return;
        }
        self.relay_busy = true;
        let fut = relay(target, self.io.clone());
        ctx.spawn(fut.into_actor(self).map(|res, act, ctx| {
            act.relay_busy = false;
            let wait = match res {
                Ok(()) => {
                    act.relay_failures = 0;
                    act.io.stats.approvals.set_relay_error(None);
                    RELAY_EVERY
                }
                Err(e) => {
                    act.relay_failures += 1;
                    let wait = crate::supervision::full_jitter(
                        Duration::from_millis(500),
                        Duration::from_secs(30),
                        act.relay_failures,
                    )
                    .max(RELAY_EVERY);
                    tracing::warn!(error = %e, wait_ms = wait.as_millis() as u64, "approvals: the control plane did not take a request or decision; retrying");
                    act.io.stats.approvals.set_relay_error(Some(e));
                    wait
                }
            };
            ctx.run_later(wait, |act, ctx| act.relay_round(ctx));
        }));
    }
}

/// What a decision touches besides its transaction: the packs, the upstream, the counters.
#[derive(Clone)]
struct Io {
    store: StoreHandle,
    router: Addr<Router>,
    upstream: Recipient<Push>,
    stats: Arc<AgentStats>,
}

/// The decisions a store operation took (none, one, or several).
trait Decisions {
    fn each(&self) -> impl Iterator<Item = &Decided>;
}

impl Decisions for Vec<Decided> {
    fn each(&self) -> impl Iterator<Item = &Decided> {
        self.iter()
    }
}

impl Decisions for Result<Decided, ApprovalError> {
    fn each(&self) -> impl Iterator<Item = &Decided> {
        self.as_ref().ok().into_iter()
    }
}

impl Io {
    /// Runs `op` (decisions in one transaction); from its commit hook, counts each released
    /// event into the durable depth (before the upstream can read and count off its outbox
    /// row) and hands the rows to the packs (in commit order); then counts each decision and
    /// wakes the upstream.
    async fn decide<O>(&self, op: O) -> Result<O::Output, StoreError>
    where
        O: StoreOp,
        O::Output: Decisions,
    {
        let (router, stats) = (self.router.clone(), self.stats.clone());
        let on_commit: OnCommit<O::Output> = Box::new(move |out| {
            for d in out.each() {
                if d.released {
                    stats.queue.durable_depth.fetch_add(1, Ordering::AcqRel);
                }
                if !d.dispatch.is_empty() {
                    router.do_send(Dispatch {
                        rows: d.dispatch.clone(),
                    });
                }
            }
        });
        let out = self.store.run_then(op, Some(on_commit)).await?;
        for d in out.each() {
            after_decision(&self.stats, &self.upstream, d);
        }
        Ok(out)
    }
}

/// Counts the decision and wakes the upstream for a released event.
fn after_decision(stats: &AgentStats, upstream: &Recipient<Push>, d: &Decided) {
    if !d.held {
        return;
    }
    let c = &stats.approvals;
    match d.record["status"].as_str() {
        Some("approved") => &c.approved,
        Some("rejected") => &c.rejected,
        _ => &c.expired,
    }
    .fetch_add(1, Ordering::Relaxed);
    if d.released {
        c.released.fetch_add(1, Ordering::Relaxed);
        crate::queue::announce(stats, upstream, Vec::new(), 1, crate::tap::Stage::Accepted);
    }
    let _ = c
        .pending
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
            Some((n - 1).max(0))
        });
}

impl Actor for Approvals {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(256);
        self.relay_busy = false;
        self.expire(ctx);
        self.relay_round(ctx);
    }
}

impl Supervised for Approvals {}

/// A decision through the sync-port shape (`ResolveApprovalInput`), from the local API or the
/// CLI. Answers with the ApprovalRecord as it now reads.
pub struct Decide {
    pub input: Map<String, Value>,
    pub now: String,
}

impl Message for Decide {
    type Result = Result<Result<Value, ApprovalError>, StoreError>;
}

impl Handler<Decide> for Approvals {
    type Result = ResponseFuture<Result<Result<Value, ApprovalError>, StoreError>>;
    fn handle(&mut self, m: Decide, _: &mut Context<Self>) -> Self::Result {
        let io = self.io.clone();
        let forbid_self = self.policy.load().forbid_self_approval;
        Box::pin(async move {
            let op = ResolveApproval {
                input: m.input,
                now: m.now,
                forbid_self,
                origin: Origin::Local,
            };
            Ok(io.decide(op).await?.map(|d| d.record))
        })
    }
}

/// A decision the control plane answered with (a relayed `resolve`): applied at once rather
/// than at the next pull.
pub struct RemoteDecided(pub Value);

impl Message for RemoteDecided {
    type Result = ();
}

impl Handler<RemoteDecided> for Approvals {
    type Result = ();
    fn handle(&mut self, m: RemoteDecided, ctx: &mut Context<Self>) {
        let io = self.io.clone();
        ctx.spawn(
            async move {
                if let Err(e) = apply_remote(&io, vec![m.0]).await {
                    tracing::warn!(error = %e, "approvals: cannot record the control plane's decision; the next pull does");
                }
            }
            .into_actor(self),
        );
    }
}

struct CountPending;
impl StoreOp for CountPending {
    type Output = i64;
    fn run(self, conn: &Connection) -> Result<i64, StoreError> {
        super::held::pending_count(conn)
    }
}

/// A held approval the control plane has to hear of.
#[derive(Debug, Clone)]
struct RemoteWork {
    approval_id: String,
    remote: String,
    remote_id: Option<String>,
    record: Value,
}

struct ReadRemoteWork;
impl StoreOp for ReadRemoteWork {
    type Output = Vec<RemoteWork>;
    fn run(self, conn: &Connection) -> Result<Vec<RemoteWork>, StoreError> {
        Ok(conn
            .prepare_cached(
                "SELECT approval_id, remote, remote_id, record FROM approvals
                 WHERE remote IN ('request', 'resolve', 'sent') AND (remote != 'sent' OR status = 'pending')
                 ORDER BY seq LIMIT 200",
            )?
            .query_map([], |r| {
                Ok(RemoteWork {
                    approval_id: r.get(0)?,
                    remote: r.get(1)?,
                    remote_id: r.get(2)?,
                    record: serde_json::from_str(&r.get::<_, String>(3)?).unwrap_or(Value::Null),
                })
            })?
            .collect::<Result<_, _>>()?)
    }
}

struct SetRemote {
    approval_id: String,
    remote: &'static str,
    remote_id: Option<String>,
}
impl StoreOp for SetRemote {
    type Output = ();
    fn run(self, conn: &Connection) -> Result<(), StoreError> {
        // Decided here while its request was on the way: now that the control plane has the
        // request, it must hear the decision too (`resolve`, not `sent`).
        conn.prepare_cached(
            "UPDATE approvals SET remote = CASE WHEN ?2 = 'sent' AND status != 'pending' THEN 'resolve' ELSE ?2 END,
             remote_id = coalesce(?3, remote_id) WHERE approval_id = ?1",
        )?
        .execute(params![self.approval_id, self.remote, self.remote_id])?;
        Ok(())
    }
}

/// Decisions the control plane took, matched to pending held approvals and applied.
struct ApplyRemote {
    records: Vec<Value>,
}
impl StoreOp for ApplyRemote {
    type Output = Vec<Decided>;
    fn run(self, conn: &Connection) -> Result<Vec<Decided>, StoreError> {
        let now = lumenflow_pack_sdk::envelope::format_timestamp(std::time::SystemTime::now());
        let mut out = Vec::new();
        for r in self.records {
            let Some(status @ ("approved" | "rejected" | "expired")) = r["status"].as_str() else {
                continue;
            };
            let subject = &r["subject"];
            // By the control plane's id, or by the event and its payload: never by kind alone.
            let id: Option<String> = conn
                .prepare_cached(
                    "SELECT approval_id FROM approvals WHERE status = 'pending' AND event_id IS NOT NULL
                     AND (remote_id = ?1 OR (event_id = ?2 AND payload_hash = ?3)) LIMIT 1",
                )?
                .query_row(
                    params![
                        r["approval_id"].as_str(),
                        subject["event_id"].as_str(),
                        subject["payload_sha256"].as_str()
                    ],
                    |row| row.get(0),
                )
                .optional()?;
            let Some(id) = id else { continue };
            let decision = Decision {
                status: status.to_string(),
                reason: r["decision_reason"].as_str().map(str::to_string),
                reviewer_id: r["reviewer_id"].as_str().map(str::to_string),
                reviewer_type: r["reviewer_type"].as_str().map(str::to_string),
                origin: Origin::Remote,
            };
            if let Ok(d) = decide(conn, &id, &decision, &now, true, false)? {
                out.push(d);
            }
        }
        Ok(out)
    }
}

async fn apply_remote(io: &Io, records: Vec<Value>) -> Result<usize, StoreError> {
    let decided = io.decide(ApplyRemote { records }).await?;
    for d in &decided {
        tracing::info!(approval_id = %d.record["approval_id"].as_str().unwrap_or(""), status = %d.record["status"].as_str().unwrap_or(""), reviewer = %d.record["reviewer_id"].as_str().unwrap_or(""), "the control plane decided a held event");
    }
    Ok(decided.len())
}

/// One round with the control plane: waiting requests, then decisions taken here, then the
/// control plane's decisions on what it has.
async fn relay(t: RelayTarget, io: Io) -> Result<(), String> {
    let work = io
        .store
        .run(ReadRemoteWork)
        .await
        .map_err(|e| e.to_string())?;
    let mut sent_kinds = std::collections::BTreeSet::new();
    for w in &work {
        let kind = w.record["type"].as_str().unwrap_or_default().to_string();
        let remote = match w.remote.as_str() {
            "request" => send_request(&t, w).await?,
            "resolve" => send_decision(&t, w).await?,
            _ => {
                sent_kinds.insert(kind);
                continue;
            }
        };
        if remote.0 == "sent" {
            sent_kinds.insert(kind);
        }
        io.store
            .run(SetRemote {
                approval_id: w.approval_id.clone(),
                remote: remote.0,
                remote_id: remote.1,
            })
            .await
            .map_err(|e| e.to_string())?;
    }
    for kind in sent_kinds {
        pull_decisions(&t, &kind, &io).await?;
    }
    Ok(())
}

/// POSTs `body` to the control plane, without its null fields: the SDK's inputs have optional
/// fields, not nullable ones.
fn call(t: &RelayTarget, path: &str, mut body: Value) -> impl std::future::Future<Output = Reply> {
    if let Some(m) = body.as_object_mut() {
        m.retain(|_, v| !v.is_null());
    }
    post(
        t.agent.clone(),
        format!("{}{path}", t.endpoint),
        t.token.clone(),
        body.to_string(),
    )
}

/// `requestApproval` for a held event: its new `remote` state and the control plane's id.
async fn send_request(
    t: &RelayTarget,
    w: &RemoteWork,
) -> Result<(&'static str, Option<String>), String> {
    const PATH: &str = "/api/v1/approvals/request";
    let r = &w.record;
    let mut body = json!({
        "workspace_id": t.workspace_id,
        "type": r["type"],
        "subject": r["subject"],
        "context": r["context"],
        "requester_id": r["requester_id"],
        "requester_type": r["requester_type"],
    });
    if let Some(e) = r.get("expires_at") {
        body["expires_at"] = e.clone();
    }
    match call(t, PATH, body).await {
        Reply::Status(200..=299, text, _, _) => {
            // A 2xx that is not an ApprovalRecord (an HTML page) is no answer: retried.
            let id = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["approval_id"].as_str().map(str::to_string))
                .ok_or_else(|| {
                    format!(
                        "{PATH}: the reply is not an ApprovalRecord: {:?}",
                        excerpt(&text)
                    )
                })?;
            Ok(("sent", Some(id)))
        }
        Reply::Status(s @ (400 | 404 | 422), text, _, _) => {
            tracing::error!(approval_id = %w.approval_id, status = s, reply = %excerpt(&text), "the control plane refused an approval request; it can be decided here only (`lumenflow-agent approvals`)");
            Ok(("refused", None))
        }
        other => Err(other.failure(PATH)),
    }
}

/// `resolveApproval` for a decision taken here.
async fn send_decision(
    t: &RelayTarget,
    w: &RemoteWork,
) -> Result<(&'static str, Option<String>), String> {
    const PATH: &str = "/api/v1/approvals/resolve";
    let r = &w.record;
    let body = json!({
        "workspace_id": t.workspace_id,
        "approval_id": w.remote_id,
        "decision": r["status"],
        "reason": r["decision_reason"],
        "reviewer_id": r["reviewer_id"],
        "reviewer_type": r["reviewer_type"],
    });
    match call(t, PATH, body).await {
        Reply::Status(200..=299, _, _, _) => Ok(("done", None)),
        Reply::Status(s @ (400 | 404 | 409 | 422), text, _, _) => {
            tracing::warn!(approval_id = %w.approval_id, status = s, reply = %excerpt(&text), "the control plane did not take a decision made here (it keeps its own record)");
            Ok(("done", None))
        }
        other => Err(other.failure(PATH)),
    }
}

/// `listApprovals` of `kind`, every page (up to [`LIST_PAGES_MAX`]): the decided ones are
/// matched to what waits here and applied.
async fn pull_decisions(t: &RelayTarget, kind: &str, io: &Io) -> Result<(), String> {
    const PATH: &str = "/api/v1/approvals/list";
    let mut cursor: Option<String> = None;
    for _ in 0..LIST_PAGES_MAX {
        let mut body = json!({"workspace_id": t.workspace_id, "type": kind, "limit": 500});
        if let Some(c) = &cursor {
            body["cursor"] = json!(c);
        }
        let page = match call(t, PATH, body).await {
            Reply::Status(200..=299, text, _, _) => serde_json::from_str::<Value>(&text)
                .ok()
                .filter(|v| v["approvals"].is_array())
                .ok_or_else(|| {
                    format!(
                        "{PATH}: the reply is not a ListApprovalsResult: {:?}",
                        excerpt(&text)
                    )
                })?,
            other => return Err(other.failure(PATH)),
        };
        let decided: Vec<Value> = page["approvals"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["status"] != "pending")
            .cloned()
            .collect();
        if !decided.is_empty() {
            apply_remote(io, decided).await.map_err(|e| e.to_string())?;
        }
        match page["next_cursor"].as_str() {
            Some(c) if Some(c) != cursor.as_deref() => cursor = Some(c.to_string()),
            _ => break,
        }
    }
    Ok(())
}
