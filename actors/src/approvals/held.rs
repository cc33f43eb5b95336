//! Held events: an event whose kind is in its pack's `required_approvals` waits here, in the
//! `approvals` table, until a decision releases it or withholds it for good.
//!
//! Guarantees:
//! - **Held, not lost.** A held event is committed in the transaction that accepts it (a
//!   producer's batch, or a handler's outcome), so the producer is acknowledged and the
//!   handler never runs again for it; it is neither in the outbox nor in the inbound log.
//! - **Matched to its request.** An approval row is keyed by the event id and the SHA-256 of
//!   the event's payload (keys sorted): a producer's retry of the same event is held once; the
//!   same id with another payload is another request. A control plane's decision is matched by
//!   its approval id, or by the subject's `event_id` *and* `payload_sha256`, never by kind.
//! - **Decided once.** A decision, the release of the event (an outbox row and an inbound row)
//!   and the `agent:approval_resolved` row are one transaction: after a crash either all of
//!   them are there or none. A second decision is refused, naming the first.
//! - **Deadlines.** Each held event has one (`approvals.timeout_s`, per kind
//!   `approvals.kinds`); past it a decision is refused and the agent records `expired`,
//!   releasing the event only when `on_expiry` is `allow`.
//! - A denied or expired event is kept with its decision (who, when, why), never delivered.
//!
//! A released event goes upstream as a durable (`queue`) event whatever its kind's class: it
//! has been durable since it was held. It goes out after the events emitted meanwhile.

use super::records::{as_of, ApprovalError};
use crate::queue::Accepted;
use crate::router::InboundRow;
use crate::store::{now_ms, StoreError, StoreOp};
use lumenflow_pack_sdk::envelope::format_timestamp;
use lumenflow_pack_sdk::{Envelope, EventDraft};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The kind the agent publishes when it holds an event.
pub const REQUESTED_KIND: &str = "agent:approval_requested";
/// The kind the agent publishes when a held event is decided.
pub const RESOLVED_KIND: &str = "agent:approval_resolved";
/// Who decides on expiry.
pub const AGENT_REVIEWER: &str = "lumenflow-agent";
/// Payloads up to this size are shown in the approval's subject (what the reviewer sees).
const SUBJECT_PAYLOAD_MAX: usize = 16 << 10;
/// Default deadline: a day.
pub const DEFAULT_TIMEOUT_S: u64 = 86_400;
/// Default bound on held events waiting at once.
pub const DEFAULT_MAX_PENDING: u64 = 10_000;

/// What happens to a held event nobody decided on in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExpiry {
    /// `expired`, never delivered (the default).
    Deny,
    /// `expired`, and delivered.
    Allow,
}

impl OnExpiry {
    pub fn name(self) -> &'static str {
        match self {
            OnExpiry::Deny => "deny",
            OnExpiry::Allow => "allow",
        }
    }
}

/// A kind's own deadline and expiry rule (`approvals.kinds.<kind>` in agent.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct KindPolicy {
    pub timeout_s: Option<u64>,
    pub on_expiry: Option<OnExpiry>,
}

/// `approvals` in agent.json.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ApprovalPolicy {
    pub timeout_s: u64,
    pub on_expiry: OnExpiry,
    /// A request may not be approved by its requester (reviewer_id == requester_id).
    pub forbid_self_approval: bool,
    /// Most held events waiting at once; beyond, producers get backpressure (429, a
    /// handler's emit `Backpressure`) until some are decided.
    pub max_pending: u64,
    pub kinds: BTreeMap<String, KindPolicy>,
}

impl Default for ApprovalPolicy {
    fn default() -> Self {
        ApprovalPolicy {
            timeout_s: DEFAULT_TIMEOUT_S,
            on_expiry: OnExpiry::Deny,
            forbid_self_approval: false,
            max_pending: DEFAULT_MAX_PENDING,
            kinds: BTreeMap::new(),
        }
    }
}

impl ApprovalPolicy {
    /// The deadline and expiry rule of `kind`.
    pub fn for_kind(&self, kind: &str) -> (u64, OnExpiry) {
        let k = self.kinds.get(kind);
        (
            k.and_then(|k| k.timeout_s).unwrap_or(self.timeout_s),
            k.and_then(|k| k.on_expiry).unwrap_or(self.on_expiry),
        )
    }
}

/// The policy, swapped whole when agent.json changes.
pub type SharedPolicy = Arc<arc_swap::ArcSwap<ApprovalPolicy>>;

/// Why an accepted event is held: decided when it is prepared (its pack's manifest).
#[derive(Debug, Clone)]
pub struct Hold {
    pub approval_id: String,
    pub payload_hash: String,
    pub deadline_ms: i64,
    pub timeout_s: u64,
    pub on_expiry: OnExpiry,
    /// What the reviewer sees (`subject_of`), in the ApprovalRecord and the request event.
    pub subject: Value,
    /// The `agent:approval_requested` event for local subscribers, written with the hold.
    pub requested: Arc<Envelope>,
}

/// SHA-256 (hex) of a payload's JSON with every object's keys sorted: the same payload hashes
/// the same whatever order a producer wrote its keys in.
pub fn payload_hash(payload: &Map<String, Value>) -> String {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                Value::Object(
                    keys.into_iter()
                        .map(|k| (k.clone(), sorted(&m[k])))
                        .collect(),
                )
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    let text = sorted(&Value::Object(payload.clone())).to_string();
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn ms_of(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn iso_of_ms(ms: i64) -> String {
    format_timestamp(UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64))
}

/// What the reviewer sees of a held event: its ids, and its payload when it is small.
fn subject_of(envelope: &Envelope, pack: &str, hash: &str) -> Value {
    let mut s = json!({
        "event_id": envelope.event_id,
        "kind": envelope.kind,
        "pack": pack,
        "payload_sha256": hash,
    });
    let payload = Value::Object(envelope.payload.clone());
    let bytes = payload.to_string().len();
    if bytes <= SUBJECT_PAYLOAD_MAX {
        s["payload"] = payload;
    } else {
        s["payload_bytes"] = json!(bytes);
    }
    s
}

impl Hold {
    /// The hold of `envelope` (of `pack`) under `policy`, decided at `now`.
    pub fn new(
        envelope: &Envelope,
        pack: &str,
        policy: &ApprovalPolicy,
        identity: &str,
        now: SystemTime,
    ) -> Hold {
        let (timeout_s, on_expiry) = policy.for_kind(&envelope.kind);
        let payload_hash = payload_hash(&envelope.payload);
        let approval_id = uuid::Uuid::now_v7().to_string();
        let deadline_ms = ms_of(now).saturating_add((timeout_s as i64).saturating_mul(1000));
        let subject = subject_of(envelope, pack, &payload_hash);
        let mut payload = match &subject {
            Value::Object(m) => m.clone(),
            _ => Map::new(),
        };
        payload.insert("approval_id".into(), json!(approval_id));
        payload.insert("deadline".into(), json!(iso_of_ms(deadline_ms)));
        payload.insert("on_expiry".into(), json!(on_expiry.name()));
        let requested = Arc::new(EventDraft::new(REQUESTED_KIND, payload).build(identity, now));
        Hold {
            approval_id,
            payload_hash,
            deadline_ms,
            timeout_s,
            on_expiry,
            subject,
            requested,
        }
    }
}

/// Writes a held event (inside the caller's transaction) and its `agent:approval_requested`
/// row. Returns that row's inbound seq, or `None` when the same event (id and payload) is held
/// already: a producer's retry.
pub fn insert_held(
    conn: &Connection,
    e: &Accepted,
    hold: &Hold,
) -> Result<Option<i64>, StoreError> {
    let now = now_ms();
    let record = json!({
        "approval_id": hold.approval_id,
        "workspace_id": e.envelope.from,
        "type": e.envelope.kind,
        "status": "pending",
        "subject": hold.subject,
        "context": {"held_by": AGENT_REVIEWER, "timeout_s": hold.timeout_s, "on_expiry": hold.on_expiry.name()},
        "requester_id": e.pack,
        "requester_type": "agent",
        "requested_at": iso_of_ms(now),
        "expires_at": iso_of_ms(hold.deadline_ms),
    });
    let inserted = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO approvals(approval_id, type, status, record, event_id, payload_hash, pack, body, created_ms, deadline_ms, on_expiry, remote)
             VALUES (?1, ?2, 'pending', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'request')",
        )?
        .execute(params![
            hold.approval_id,
            e.envelope.kind,
            record.to_string(),
            e.envelope.event_id,
            hold.payload_hash,
            e.pack,
            &*e.body,
            now,
            hold.deadline_ms,
            hold.on_expiry.name(),
        ])?;
    if inserted == 0 {
        return Ok(None);
    }
    Ok(Some(insert_inbound(conn, &hold.requested)?))
}

/// The inbound row of one of the agent's own events (`agent:approval_*`).
fn insert_inbound(conn: &Connection, e: &Envelope) -> Result<i64, StoreError> {
    conn.prepare_cached(
        "INSERT INTO inbound(event_id, kind, event_ms, received_ms, body) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![e.event_id, e.kind, e.timestamp_ms(), now_ms(), e.to_json()])?;
    Ok(conn.last_insert_rowid())
}

/// A decision as given: by a person (CLI, local API), the control plane, or the agent itself
/// (expiry).
#[derive(Debug, Clone)]
pub struct Decision {
    /// `approved`, `rejected` or `expired`.
    pub status: String,
    pub reason: Option<String>,
    pub reviewer_id: Option<String>,
    pub reviewer_type: Option<String>,
    /// Where it came from: `local` (decided here; the control plane is told in conductor
    /// mode) or `remote` (the control plane's own decision).
    pub origin: Origin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Local,
    Remote,
}

/// What a decision did.
#[derive(Debug, Clone)]
pub struct Decided {
    /// The ApprovalRecord as it now reads.
    pub record: Value,
    /// The held event went out: into the outbox (and the inbound log).
    pub released: bool,
    /// Rows for local subscribers: the released event's, then `agent:approval_resolved`.
    pub dispatch: Vec<InboundRow>,
    /// The approval held an event (not a plain sync-port request).
    pub held: bool,
}

struct Row {
    record: Value,
    status: String,
    event_id: Option<String>,
    pack: Option<String>,
    body: Option<String>,
    on_expiry: Option<String>,
    remote: Option<String>,
}

fn load(conn: &Connection, id: &str) -> Result<Option<Row>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT record, status, event_id, pack, body, on_expiry, remote FROM approvals WHERE approval_id = ?1",
        )?
        .query_row([id], |r| {
            Ok(Row {
                record: serde_json::from_str(&r.get::<_, String>(0)?).unwrap_or(Value::Null),
                status: r.get(1)?,
                event_id: r.get(2)?,
                pack: r.get(3)?,
                body: r.get(4)?,
                on_expiry: r.get(5)?,
                remote: r.get(6)?,
            })
        })
        .optional()?)
}

/// Takes `decision` on approval `id` (inside the caller's transaction). `deadline_applies`:
/// a decision after the approval's deadline is refused (a person's or the control plane's);
/// the agent's own expiry passes `false`. `forbid_self`: `approvals.forbid_self_approval`.
pub fn decide(
    conn: &Connection,
    id: &str,
    decision: &Decision,
    now: &str,
    deadline_applies: bool,
    forbid_self: bool,
) -> Result<Result<Decided, ApprovalError>, StoreError> {
    let Some(row) = load(conn, id)? else {
        return Ok(Err(ApprovalError::NotFound(format!(
            "no approval \"{id}\""
        ))));
    };
    let shown = if deadline_applies {
        as_of(row.record.clone(), now)
    } else {
        row.record.clone()
    };
    if row.status != "pending" || shown["status"] != "pending" {
        let who = row.record["reviewer_id"]
            .as_str()
            .map(|r| format!(" by {r}"))
            .unwrap_or_default();
        let when = row.record["decided_at"]
            .as_str()
            .map(|t| format!(" at {t}"))
            .unwrap_or_default();
        return Ok(Err(ApprovalError::Decided(format!(
            "approval \"{id}\" is already {}{who}{when}",
            shown["status"].as_str().unwrap_or("decided")
        ))));
    }
    if forbid_self
        && decision.status == "approved"
        && decision.reviewer_id.is_some()
        && decision.reviewer_id.as_deref() == row.record["requester_id"].as_str()
    {
        return Ok(Err(ApprovalError::SelfApproval(format!(
            "approval \"{id}\" was requested by \"{}\", who may not approve it (approvals.forbid_self_approval)",
            decision.reviewer_id.as_deref().unwrap_or_default()
        ))));
    }
    let mut record = row.record;
    record["status"] = json!(decision.status);
    record["decided_at"] = json!(now);
    if let Some(r) = &decision.reason {
        record["decision_reason"] = json!(r);
    }
    if let Some(r) = &decision.reviewer_id {
        record["reviewer_id"] = json!(r);
    }
    if let Some(r) = &decision.reviewer_type {
        record["reviewer_type"] = json!(r);
    }
    let held = row.event_id.is_some();
    let release = held
        && (decision.status == "approved"
            || (decision.status == "expired" && row.on_expiry.as_deref() == Some("allow")));
    // The control plane is told of a decision taken here once it knows of the request; one
    // it never heard of needs no request any more.
    let remote = match (decision.origin, row.remote.as_deref()) {
        (_, None) => None,
        (Origin::Remote, _) | (Origin::Local, Some("request" | "done" | "refused")) => Some("done"),
        (Origin::Local, Some(_)) => Some("resolve"),
    };
    conn.prepare_cached(
        "UPDATE approvals SET status = ?1, record = ?2, released_ms = ?3, remote = ?4 WHERE approval_id = ?5",
    )?
    .execute(params![
        decision.status,
        record.to_string(),
        release.then(now_ms),
        remote,
        id
    ])?;
    let mut dispatch = Vec::new();
    if held {
        let (Some(event_id), Some(pack), Some(body)) = (&row.event_id, &row.pack, &row.body) else {
            return Err(StoreError::Invalid(format!(
                "approval \"{id}\" holds an event but its row is incomplete"
            )));
        };
        if release {
            // Accepted now, as a durable event with a local row: what the queue writes for
            // any accepted event.
            let envelope = Envelope::parse(body.as_bytes()).map_err(|e| {
                StoreError::Invalid(format!("the event held by approval \"{id}\": {e}"))
            })?;
            let released = Accepted {
                envelope: Arc::new(envelope),
                body: body.as_str().into(),
                pack: pack.clone(),
                class: lumenflow_pack_sdk::DeliveryClass::Queue,
                local: true,
                hold: None,
            };
            let seqs = crate::queue::insert_accepted(conn, std::slice::from_ref(&released))?;
            if let Some(seq) = seqs.first().copied().flatten() {
                dispatch.push(InboundRow {
                    seq,
                    envelope: released.envelope,
                    target: None,
                });
            }
        }
        let mut payload = Map::new();
        for k in [
            "approval_id",
            "status",
            "reviewer_id",
            "reviewer_type",
            "decision_reason",
            "decided_at",
        ] {
            if let Some(v) = record.get(k) {
                payload.insert(k.into(), v.clone());
            }
        }
        payload.insert("event_id".into(), json!(event_id));
        payload.insert("kind".into(), record["type"].clone());
        payload.insert("pack".into(), json!(pack));
        payload.insert("released".into(), json!(release));
        let identity = record["workspace_id"].as_str().unwrap_or(AGENT_REVIEWER);
        let resolved = EventDraft::new(RESOLVED_KIND, payload).build(identity, SystemTime::now());
        let seq = insert_inbound(conn, &resolved)?;
        dispatch.push(InboundRow {
            seq,
            envelope: Arc::new(resolved),
            target: None,
        });
    }
    Ok(Ok(Decided {
        record: as_of(record, now),
        released: release,
        dispatch,
        held,
    }))
}

/// Records `expired` on every held event past its deadline (at most 100 per call), releasing
/// those whose rule is `allow`.
pub struct ExpireDue {
    pub now_ms: i64,
}

impl StoreOp for ExpireDue {
    type Output = Vec<Decided>;
    fn run(self, conn: &Connection) -> Result<Vec<Decided>, StoreError> {
        let due: Vec<(String, Option<i64>)> = conn
            .prepare_cached(
                "SELECT approval_id, json_extract(record, '$.context.timeout_s') FROM approvals
                 WHERE status = 'pending' AND deadline_ms IS NOT NULL AND deadline_ms <= ?1
                 ORDER BY deadline_ms LIMIT 100",
            )?
            .query_map([self.now_ms], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let now = iso_of_ms(self.now_ms);
        let mut out = Vec::with_capacity(due.len());
        for (id, timeout_s) in due {
            let decision = Decision {
                status: "expired".into(),
                reason: Some(format!(
                    "no decision within {} s",
                    timeout_s.unwrap_or_default()
                )),
                reviewer_id: Some(AGENT_REVIEWER.into()),
                reviewer_type: Some("agent".into()),
                origin: Origin::Local,
            };
            if let Ok(d) = decide(conn, &id, &decision, &now, false, false)? {
                out.push(d);
            }
        }
        Ok(out)
    }
}

/// One held approval as `status` and `approvals list` show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HeldSummary {
    pub approval_id: String,
    pub kind: String,
    pub pack: String,
    pub event_id: String,
    pub age_s: f64,
    /// Seconds until the deadline (negative: past it, the agent records `expired` next).
    pub deadline_in_s: f64,
    pub deadline: String,
    pub on_expiry: String,
}

/// The pending held events (oldest first, at most `limit`) and how many there are.
pub fn pending(conn: &Connection, limit: i64) -> Result<(i64, Vec<HeldSummary>), StoreError> {
    let now = now_ms();
    let count: i64 = conn.query_row(
        "SELECT count(*) FROM approvals WHERE status = 'pending' AND event_id IS NOT NULL",
        [],
        |r| r.get(0),
    )?;
    let items = conn
        .prepare_cached(
            "SELECT approval_id, type, pack, event_id, created_ms, deadline_ms, on_expiry FROM approvals
             WHERE status = 'pending' AND event_id IS NOT NULL ORDER BY seq LIMIT ?1",
        )?
        .query_map([limit], |r| {
            let created: i64 = r.get(4)?;
            let deadline: i64 = r.get(5)?;
            Ok(HeldSummary {
                approval_id: r.get(0)?,
                kind: r.get(1)?,
                pack: r.get(2)?,
                event_id: r.get(3)?,
                age_s: (now - created) as f64 / 1000.0,
                deadline_in_s: (deadline - now) as f64 / 1000.0,
                deadline: iso_of_ms(deadline),
                on_expiry: r.get(6)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok((count, items))
}

/// [`pending`] as a store operation (the running agent's `status`).
pub struct PendingHeld {
    pub limit: i64,
}

impl StoreOp for PendingHeld {
    type Output = (i64, Vec<HeldSummary>);
    fn run(self, conn: &Connection) -> Result<Self::Output, StoreError> {
        pending(conn, self.limit)
    }
}

/// Every approval (or the pending ones), oldest first, each its ApprovalRecord plus, for a
/// held event, `held_event` {event_id, kind, pack, state: held | released | withheld,
/// deadline, on_expiry}: what `approvals list` prints.
pub fn list(conn: &Connection, all: bool, now: &str) -> Result<Vec<Value>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT record, event_id, pack, released_ms, deadline_ms, on_expiry, status FROM approvals
         WHERE ?1 OR status = 'pending' ORDER BY seq",
    )?;
    let mut rows = stmt.query([all])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let record: String = r.get(0)?;
        let mut v = as_of(serde_json::from_str(&record).unwrap_or(Value::Null), now);
        let event_id: Option<String> = r.get(1)?;
        if let Some(event_id) = event_id {
            let released: Option<i64> = r.get(3)?;
            let status: String = r.get(6)?;
            let state = match (released, status.as_str()) {
                (Some(_), _) => "released",
                (None, "pending") => "held",
                _ => "withheld",
            };
            let deadline: Option<i64> = r.get(4)?;
            v["held_event"] = json!({
                "event_id": event_id,
                "kind": v["type"],
                "pack": r.get::<_, Option<String>>(2)?,
                "state": state,
                "deadline": deadline.map(iso_of_ms),
                "on_expiry": r.get::<_, Option<String>>(5)?,
            });
        }
        if v["held_event"]["state"] == "held" && v["status"] != "pending" {
            // Past its deadline: it reads `expired` already (the agent records it next).
            v["held_event"]["state"] = json!("expiring");
        }
        out.push(v);
    }
    Ok(out)
}

/// The full approval id for what a person typed: an id, a unique prefix of one (at least 4
/// characters), or a held event's id.
pub fn resolve_id(conn: &Connection, typed: &str) -> Result<Result<String, String>, StoreError> {
    let exact: Option<String> = conn
        .query_row(
            "SELECT approval_id FROM approvals WHERE approval_id = ?1 OR event_id = ?1 LIMIT 1",
            [typed],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(id) = exact {
        return Ok(Ok(id));
    }
    if typed.len() < 4 {
        return Ok(Err(format!(
            "no approval \"{typed}\" (a prefix needs at least 4 characters)"
        )));
    }
    let like: Vec<String> = conn
        .prepare("SELECT approval_id FROM approvals WHERE substr(approval_id, 1, ?2) = ?1 LIMIT 3")?
        .query_map(params![typed, typed.len() as i64], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(match like.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(format!(
            "no approval \"{typed}\" (see `lumenflow-agent approvals list --all`)"
        )),
        _ => Err(format!(
            "\"{typed}\" matches more than one approval: type more of its id"
        )),
    })
}

/// How many held events wait (for the agent's counters at start).
pub fn pending_count(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row(
        "SELECT count(*) FROM approvals WHERE status = 'pending' AND event_id IS NOT NULL",
        [],
        |r| r.get(0),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lumenflow_pack_sdk::DeliveryClass;

    fn conn() -> Connection {
        let mut c = Connection::open_in_memory().unwrap();
        crate::schema::migrate(&mut c).unwrap();
        c
    }

    fn held_event(payload: Value, policy: &ApprovalPolicy) -> Accepted {
        let Value::Object(p) = payload else { panic!() };
        let mut e = crate::queue::test_event("demo:send", p, DeliveryClass::Queue);
        e.local = true;
        e.hold = Some(Arc::new(Hold::new(
            &e.envelope,
            "demo",
            policy,
            "ws",
            SystemTime::now(),
        )));
        e
    }

    fn count(c: &Connection, sql: &str) -> i64 {
        c.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    fn decision(status: &str, origin: Origin) -> Decision {
        Decision {
            status: status.into(),
            reason: Some("r".into()),
            reviewer_id: Some("alice".into()),
            reviewer_type: Some("user".into()),
            origin,
        }
    }

    const NOW: &str = "2026-12-02T00:00:00.000Z";

    #[test]
    fn the_payload_hash_ignores_key_order_and_nothing_else() {
        let a = json!({"to": "x", "n": {"b": 1, "a": [1, {"z": 0, "y": 1}]}});
        let b = json!({"n": {"a": [1, {"y": 1, "z": 0}], "b": 1}, "to": "x"});
        let h = |v: &Value| payload_hash(v.as_object().unwrap());
        assert_eq!(h(&a), h(&b));
        assert_ne!(
            h(&a),
            h(&json!({"to": "y", "n": {"b": 1, "a": [1, {"z": 0, "y": 1}]}}))
        );
        assert_ne!(h(&json!({"a": [1, 2]})), h(&json!({"a": [2, 1]})));
    }

    #[test]
    fn a_retry_is_held_once_and_another_payload_under_the_same_id_is_another_request() {
        let c = conn();
        let p = ApprovalPolicy::default();
        let e = held_event(json!({"to": "x"}), &p);
        let seqs = crate::queue::insert_accepted(&c, std::slice::from_ref(&e)).unwrap();
        assert!(seqs[0].is_some(), "its agent:approval_requested row");
        // The producer's retry: same id, same payload, a new hold (new approval id).
        let mut retry = e.clone();
        retry.hold = Some(Arc::new(Hold::new(
            &e.envelope,
            "demo",
            &p,
            "ws",
            SystemTime::now(),
        )));
        assert_eq!(
            crate::queue::insert_accepted(&c, &[retry]).unwrap(),
            vec![None]
        );
        assert_eq!(count(&c, "SELECT count(*) FROM approvals"), 1);
        // Same id, another payload: another request, never matched to the first.
        let mut other = held_event(json!({"to": "y"}), &p);
        let mut env = (*other.envelope).clone();
        env.event_id = e.envelope.event_id.clone();
        other.envelope = Arc::new(env);
        let h = Hold::new(&other.envelope, "demo", &p, "ws", SystemTime::now());
        assert_ne!(h.payload_hash, e.hold.as_ref().unwrap().payload_hash);
        other.hold = Some(Arc::new(h));
        crate::queue::insert_accepted(&c, &[other]).unwrap();
        assert_eq!(count(&c, "SELECT count(*) FROM approvals"), 2);
        assert_eq!(count(&c, "SELECT count(*) FROM outbox"), 0);
        assert_eq!(
            count(&c, "SELECT count(*) FROM inbound WHERE kind = 'demo:send'"),
            0
        );
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM inbound WHERE kind = 'agent:approval_requested'"
            ),
            2
        );
    }

    #[test]
    fn an_approval_releases_once_and_a_denial_never() {
        let c = conn();
        let p = ApprovalPolicy::default();
        let (a, b) = (
            held_event(json!({"i": 1}), &p),
            held_event(json!({"i": 2}), &p),
        );
        crate::queue::insert_accepted(&c, &[a.clone(), b.clone()]).unwrap();
        let id = |e: &Accepted| e.hold.as_ref().unwrap().approval_id.clone();
        let d = decide(
            &c,
            &id(&a),
            &decision("approved", Origin::Local),
            NOW,
            true,
            false,
        )
        .unwrap()
        .unwrap();
        assert!(d.released && d.held);
        assert_eq!(
            d.dispatch.len(),
            2,
            "the event, then agent:approval_resolved"
        );
        assert_eq!(d.dispatch[0].envelope.event_id, a.envelope.event_id);
        assert_eq!(d.dispatch[1].envelope.kind, RESOLVED_KIND);
        assert_eq!(d.record["reviewer_id"], "alice");
        let again = decide(
            &c,
            &id(&a),
            &decision("rejected", Origin::Local),
            NOW,
            true,
            false,
        )
        .unwrap();
        assert!(
            matches!(again, Err(ApprovalError::Decided(m)) if m.contains("already approved by alice"))
        );
        let d = decide(
            &c,
            &id(&b),
            &decision("rejected", Origin::Local),
            NOW,
            true,
            false,
        )
        .unwrap()
        .unwrap();
        assert!(!d.released);
        assert_eq!(d.dispatch.len(), 1);
        assert_eq!(count(&c, "SELECT count(*) FROM outbox"), 1);
        assert_eq!(
            count(&c, "SELECT count(*) FROM inbound WHERE kind = 'demo:send'"),
            1
        );
        let rows = list(&c, true, NOW).unwrap();
        assert_eq!(rows[0]["held_event"]["state"], "released");
        assert_eq!(rows[1]["held_event"]["state"], "withheld");
        assert!(list(&c, false, NOW).unwrap().is_empty());
    }

    #[test]
    fn a_deadline_expires_or_releases_by_the_kinds_rule() {
        let c = conn();
        let mut p = ApprovalPolicy {
            timeout_s: 1,
            ..ApprovalPolicy::default()
        };
        let deny = held_event(json!({"i": 1}), &p);
        p.on_expiry = OnExpiry::Allow;
        let allow = held_event(json!({"i": 2}), &p);
        crate::queue::insert_accepted(&c, &[deny.clone(), allow.clone()]).unwrap();
        assert!(ExpireDue {
            now_ms: now_ms() - 5_000
        }
        .run(&c)
        .unwrap()
        .is_empty());
        // A person's decision past the deadline is refused; the agent's expiry is not.
        let late = iso_of_ms(now_ms() + 5_000);
        let id = deny.hold.as_ref().unwrap().approval_id.clone();
        let r = decide(
            &c,
            &id,
            &decision("approved", Origin::Local),
            &late,
            true,
            false,
        )
        .unwrap();
        assert!(matches!(r, Err(ApprovalError::Decided(m)) if m.contains("already expired")));
        let done = ExpireDue {
            now_ms: now_ms() + 5_000,
        }
        .run(&c)
        .unwrap();
        assert_eq!(done.len(), 2);
        assert!(done.iter().all(|d| d.record["status"] == "expired"));
        assert!(!done[0].released && done[1].released);
        assert_eq!(done[0].record["reviewer_id"], AGENT_REVIEWER);
        assert_eq!(count(&c, "SELECT count(*) FROM outbox"), 1);
        assert!(ExpireDue {
            now_ms: now_ms() + 9_000
        }
        .run(&c)
        .unwrap()
        .is_empty());
    }

    #[test]
    fn the_control_plane_is_told_only_what_it_does_not_know() {
        let c = conn();
        let p = ApprovalPolicy::default();
        let es: Vec<Accepted> = (0..3).map(|i| held_event(json!({"i": i}), &p)).collect();
        crate::queue::insert_accepted(&c, &es).unwrap();
        let id = |i: usize| es[i].hold.as_ref().unwrap().approval_id.clone();
        let remote = |i: usize| -> Option<String> {
            c.query_row(
                "SELECT remote FROM approvals WHERE approval_id = ?1",
                [id(i)],
                |r| r.get(0),
            )
            .unwrap()
        };
        assert_eq!(remote(0).as_deref(), Some("request"));
        c.execute(
            "UPDATE approvals SET remote = 'sent' WHERE approval_id IN (?1, ?2)",
            params![id(1), id(2)],
        )
        .unwrap();
        // Never sent: no request needed any more. Sent: the decision must follow. Decided
        // there: nothing to tell.
        for (i, origin) in [(0, Origin::Local), (1, Origin::Local), (2, Origin::Remote)] {
            decide(&c, &id(i), &decision("approved", origin), NOW, true, false)
                .unwrap()
                .unwrap();
        }
        assert_eq!(remote(0).as_deref(), Some("done"));
        assert_eq!(remote(1).as_deref(), Some("resolve"));
        assert_eq!(remote(2).as_deref(), Some("done"));
    }

    #[test]
    fn ids_resolve_from_prefixes_and_event_ids() {
        let c = conn();
        let p = ApprovalPolicy::default();
        let e = held_event(json!({}), &p);
        crate::queue::insert_accepted(&c, std::slice::from_ref(&e)).unwrap();
        let id = e.hold.as_ref().unwrap().approval_id.clone();
        assert_eq!(resolve_id(&c, &id[..10]).unwrap().unwrap(), id);
        assert_eq!(resolve_id(&c, &e.envelope.event_id).unwrap().unwrap(), id);
        assert!(resolve_id(&c, "abc")
            .unwrap()
            .unwrap_err()
            .contains("at least 4"));
        assert!(resolve_id(&c, "ffffffff")
            .unwrap()
            .unwrap_err()
            .contains("no approval"));
    }
}
