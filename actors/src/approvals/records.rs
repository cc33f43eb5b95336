//! The platform's sync-port `approvals/request | resolve | list` answered from the local
//! `approvals` table, with its exact shapes (`ApprovalRecord`, `ListApprovalsResult` in
//! `control-plane-sdk/src/sync-port.ts`): on mem:inbox, and for the CLI. The table holds the
//! platform's own requests and the agent's held events (`held`) alike.
//!
//! Guarantees: a request is committed before it is answered; a decision is taken once (a
//! second `resolve` of a decided approval is refused, naming its status); a pending approval
//! past its `expires_at` reads as `expired`; `list` pages by an opaque cursor in request order.

use super::held::{decide, Decided, Decision, Origin};
use crate::store::{StoreError, StoreOp};
use rusqlite::{params, Connection};
use serde_json::{json, Map, Value};

/// Most approvals one `list` returns.
pub const LIST_MAX: i64 = 500;

/// Why a call was refused: the message names the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalError {
    /// 422: the input is not what sync-port.ts says.
    Invalid(String),
    /// 404: no approval with that id.
    NotFound(String),
    /// 409: already decided.
    Decided(String),
    /// 403: the requester may not approve its own request (`approvals.forbid_self_approval`).
    SelfApproval(String),
}

impl ApprovalError {
    /// The HTTP status the local API answers with.
    pub fn status(&self) -> u16 {
        match self {
            ApprovalError::Invalid(_) => 422,
            ApprovalError::NotFound(_) => 404,
            ApprovalError::Decided(_) => 409,
            ApprovalError::SelfApproval(_) => 403,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            ApprovalError::Invalid(m)
            | ApprovalError::NotFound(m)
            | ApprovalError::Decided(m)
            | ApprovalError::SelfApproval(m) => m,
        }
    }
}

pub struct RequestApproval {
    pub input: Map<String, Value>,
    pub now: String,
}

/// A decision through the sync-port shape (`ResolveApprovalInput`); for a held event it
/// releases or withholds the event in the same transaction (`held::decide`).
pub struct ResolveApproval {
    pub input: Map<String, Value>,
    pub now: String,
    /// `approvals.forbid_self_approval`.
    pub forbid_self: bool,
    /// Who decided: here, or at the control plane.
    pub origin: Origin,
}

pub struct ListApprovals {
    pub input: Map<String, Value>,
    pub now: String,
    /// Only the approvals of the input's `workspace_id` (a control plane serving many); the
    /// agent's own table is one workspace's.
    pub by_workspace: bool,
}

/// The `approvals` table for a database that is not the agent's (the development
/// conductor's): the columns `held::decide` reads, none of them used there.
pub const STANDALONE_TABLE: &str = "
    CREATE TABLE IF NOT EXISTS approvals (
        seq          INTEGER PRIMARY KEY,
        approval_id  TEXT NOT NULL UNIQUE,
        type         TEXT NOT NULL,
        status       TEXT NOT NULL,
        record       TEXT NOT NULL,
        event_id     TEXT,
        payload_hash TEXT,
        pack         TEXT,
        body         TEXT,
        created_ms   INTEGER,
        deadline_ms  INTEGER,
        on_expiry    TEXT,
        released_ms  INTEGER,
        remote       TEXT,
        remote_id    TEXT
    );";

fn text<'a>(m: &'a Map<String, Value>, k: &str) -> Result<Option<&'a str>, ApprovalError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s)),
        Some(other) => Err(ApprovalError::Invalid(format!(
            "field \"{k}\" must be a non-empty string, found {other}"
        ))),
    }
}

fn actor_type(m: &Map<String, Value>, k: &str) -> Result<(), ApprovalError> {
    match text(m, k)? {
        None | Some("agent" | "user") => Ok(()),
        Some(other) => Err(ApprovalError::Invalid(format!(
            "field \"{k}\" must be \"agent\" or \"user\", found \"{other}\""
        ))),
    }
}

fn object(m: &Map<String, Value>, k: &str, required: bool) -> Result<(), ApprovalError> {
    match m.get(k) {
        Some(Value::Object(_)) => Ok(()),
        None if !required => Ok(()),
        None => Err(ApprovalError::Invalid(format!(
            "missing field \"{k}\" (an object)"
        ))),
        Some(other) => Err(ApprovalError::Invalid(format!(
            "field \"{k}\" must be an object, found {other}"
        ))),
    }
}

/// The record as it reads now: a pending approval past `expires_at` is `expired`.
pub(super) fn as_of(mut record: Value, now: &str) -> Value {
    let expired =
        record["status"] == "pending" && record["expires_at"].as_str().is_some_and(|t| t <= now);
    if expired {
        record["status"] = json!("expired");
    }
    if let Some(o) = record.as_object_mut() {
        o.remove("expires_at");
    }
    record
}

impl StoreOp for RequestApproval {
    type Output = Result<Value, ApprovalError>;
    fn run(self, conn: &Connection) -> Result<Self::Output, StoreError> {
        let m = &self.input;
        let check = || -> Result<(String, Value), ApprovalError> {
            let ty = text(m, "type")?
                .ok_or_else(|| ApprovalError::Invalid("missing field \"type\"".into()))?;
            object(m, "subject", true)?;
            object(m, "context", false)?;
            text(m, "requester_id")?;
            actor_type(m, "requester_type")?;
            text(m, "expires_at")?;
            let id = uuid::Uuid::now_v7().to_string();
            let mut r = json!({
                "approval_id": id,
                "workspace_id": m.get("workspace_id").cloned().unwrap_or(Value::Null),
                "type": ty,
                "status": "pending",
                "subject": m["subject"],
                "requested_at": self.now,
            });
            for k in ["context", "requester_id", "requester_type", "expires_at"] {
                if let Some(v) = m.get(k).filter(|v| !v.is_null()) {
                    r[k] = v.clone();
                }
            }
            Ok((ty.to_string(), r))
        };
        let (ty, record) = match check() {
            Ok(x) => x,
            Err(e) => return Ok(Err(e)),
        };
        conn.prepare_cached(
            "INSERT INTO approvals(approval_id, type, status, record) VALUES (?1, ?2, 'pending', ?3)",
        )?
        .execute(params![record["approval_id"].as_str(), ty, record.to_string()])?;
        Ok(Ok(as_of(record, &self.now)))
    }
}

impl StoreOp for ResolveApproval {
    type Output = Result<Decided, ApprovalError>;
    fn run(self, conn: &Connection) -> Result<Self::Output, StoreError> {
        let m = &self.input;
        let check = || -> Result<(String, Decision), ApprovalError> {
            let id = text(m, "approval_id")?
                .ok_or_else(|| ApprovalError::Invalid("missing field \"approval_id\"".into()))?;
            let decision = text(m, "decision")?
                .ok_or_else(|| ApprovalError::Invalid("missing field \"decision\"".into()))?;
            if !matches!(decision, "approved" | "rejected" | "expired") {
                return Err(ApprovalError::Invalid(format!(
                    "field \"decision\" must be approved, rejected or expired, found \"{decision}\""
                )));
            }
            let reason = text(m, "reason")?.map(str::to_string);
            let reviewer_id = text(m, "reviewer_id")?.map(str::to_string);
            actor_type(m, "reviewer_type")?;
            let reviewer_type = text(m, "reviewer_type")?.map(str::to_string);
            Ok((
                id.to_string(),
                Decision {
                    status: decision.to_string(),
                    reason,
                    reviewer_id,
                    reviewer_type,
                    origin: self.origin,
                },
            ))
        };
        let (id, decision) = match check() {
            Ok(x) => x,
            Err(e) => return Ok(Err(e)),
        };
        decide(conn, &id, &decision, &self.now, true, self.forbid_self)
    }
}

impl StoreOp for ListApprovals {
    type Output = Result<Value, ApprovalError>;
    fn run(self, conn: &Connection) -> Result<Self::Output, StoreError> {
        let m = &self.input;
        let check = || -> Result<(Option<String>, Option<String>, i64, i64), ApprovalError> {
            let status = text(m, "status")?.map(str::to_string);
            if let Some(s) = &status {
                if !matches!(s.as_str(), "pending" | "approved" | "rejected" | "expired") {
                    return Err(ApprovalError::Invalid(format!(
                        "field \"status\" must be pending, approved, rejected or expired, found \"{s}\""
                    )));
                }
            }
            let ty = text(m, "type")?.map(str::to_string);
            let limit = match m.get("limit") {
                None | Some(Value::Null) => 50,
                Some(v) => v
                    .as_i64()
                    .filter(|n| (1..=LIST_MAX).contains(n))
                    .ok_or_else(|| {
                        ApprovalError::Invalid(format!(
                        "field \"limit\" must be a whole number from 1 to {LIST_MAX}, found {v}"
                    ))
                    })?,
            };
            let after = match text(m, "cursor")? {
                None => 0,
                Some(c) => c.parse::<i64>().map_err(|_| {
                    ApprovalError::Invalid(format!(
                        "field \"cursor\": \"{c}\" is not a cursor this agent gave"
                    ))
                })?,
            };
            Ok((status, ty, limit, after))
        };
        let (status, ty, limit, after) = match check() {
            Ok(x) => x,
            Err(e) => return Ok(Err(e)),
        };
        let ws = self
            .by_workspace
            .then(|| m.get("workspace_id").and_then(Value::as_str))
            .flatten();
        let mut stmt = conn.prepare_cached(
            "SELECT seq, record FROM approvals WHERE seq > ?1 AND (?2 IS NULL OR type = ?2)
             AND (?3 IS NULL OR json_extract(record, '$.workspace_id') = ?3) ORDER BY seq",
        )?;
        let mut rows = stmt.query(params![after, ty, ws])?;
        let mut approvals = Vec::new();
        let mut next = None;
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            let record: String = row.get(1)?;
            let record = as_of(
                serde_json::from_str(&record).unwrap_or(Value::Null),
                &self.now,
            );
            if status.as_deref().is_some_and(|s| record["status"] != s) {
                continue;
            }
            if approvals.len() as i64 == limit {
                // A full page with more after it: the cursor is its last approval.
                next = approvals.last().map(|(s, _): &(i64, Value)| s.to_string());
                break;
            }
            approvals.push((seq, record));
        }
        let mut out =
            json!({"approvals": approvals.into_iter().map(|(_, r)| r).collect::<Vec<_>>()});
        if let Some(n) = next {
            out["next_cursor"] = json!(n);
        }
        Ok(Ok(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Connection {
        let mut c = Connection::open_in_memory().unwrap();
        crate::schema::migrate(&mut c).unwrap();
        c
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    const T0: &str = "2026-12-01T00:00:00.000Z";

    #[test]
    fn request_resolve_list() {
        let c = conn();
        let r = RequestApproval {
            input: obj(json!({"workspace_id": "w", "type": "deploy", "subject": {"wu": "WU-1"}, "requester_type": "agent"})),
            now: T0.into(),
        }
        .run(&c)
        .unwrap()
        .unwrap();
        assert_eq!(r["status"], "pending");
        assert_eq!(r["requested_at"], T0);
        let id = r["approval_id"].as_str().unwrap().to_string();
        for i in 0..3 {
            RequestApproval {
                input: obj(json!({"workspace_id": "w", "type": "spend", "subject": {"i": i}})),
                now: T0.into(),
            }
            .run(&c)
            .unwrap()
            .unwrap();
        }
        let done = ResolveApproval {
            input: obj(json!({"workspace_id": "w", "approval_id": id, "decision": "approved", "reason": "ok", "reviewer_type": "user"})),
            now: T0.into(),
            forbid_self: false,
            origin: Origin::Local,
        }
        .run(&c)
        .unwrap()
        .unwrap()
        .record;
        assert_eq!(done["status"], "approved");
        assert_eq!(done["decision_reason"], "ok");
        assert_eq!(done["decided_at"], T0);
        let again = ResolveApproval {
            input: obj(json!({"approval_id": id, "decision": "rejected"})),
            now: T0.into(),
            forbid_self: false,
            origin: Origin::Local,
        }
        .run(&c)
        .unwrap();
        assert!(matches!(again, Err(ApprovalError::Decided(m)) if m.contains("already approved")));
        let page = ListApprovals {
            input: obj(json!({"workspace_id": "w", "status": "pending", "limit": 2})),
            now: T0.into(),
            by_workspace: false,
        }
        .run(&c)
        .unwrap()
        .unwrap();
        assert_eq!(page["approvals"].as_array().unwrap().len(), 2);
        let cursor = page["next_cursor"].as_str().unwrap().to_string();
        let rest = ListApprovals {
            input: obj(json!({"status": "pending", "cursor": cursor})),
            now: T0.into(),
            by_workspace: false,
        }
        .run(&c)
        .unwrap()
        .unwrap();
        assert_eq!(rest["approvals"].as_array().unwrap().len(), 1);
        assert!(rest.get("next_cursor").is_none());
    }

    #[test]
    fn expiry_and_refusals() {
        let c = conn();
        let r = RequestApproval {
            input: obj(
                json!({"type": "t", "subject": {}, "expires_at": "2026-12-01T00:00:01.000Z"}),
            ),
            now: T0.into(),
        }
        .run(&c)
        .unwrap()
        .unwrap();
        let later = "2026-12-01T00:00:02.000Z";
        let res = ResolveApproval {
            input: obj(json!({"approval_id": r["approval_id"], "decision": "approved"})),
            now: later.into(),
            forbid_self: false,
            origin: Origin::Local,
        }
        .run(&c)
        .unwrap();
        assert!(matches!(res, Err(ApprovalError::Decided(m)) if m.contains("expired")));
        for (input, want) in [
            (json!({"subject": {}}), "missing field \"type\""),
            (json!({"type": "t"}), "missing field \"subject\""),
            (
                json!({"type": "t", "subject": {}, "requester_type": "robot"}),
                "\"agent\" or \"user\"",
            ),
        ] {
            let e = RequestApproval {
                input: obj(input),
                now: T0.into(),
            }
            .run(&c)
            .unwrap();
            assert!(
                matches!(&e, Err(ApprovalError::Invalid(m)) if m.contains(want)),
                "{e:?}"
            );
        }
    }
}
