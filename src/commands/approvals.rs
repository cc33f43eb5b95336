//! `lumenflow-agent approvals list [--all] [--json] | approve ID | deny ID --reason R`.
//!
//! `list` reads SQLite directly. `approve` and `deny` go through the running agent (its
//! Approvals actor delivers the released event at once and keeps its counters right); when no
//! agent runs they take the decision in the database directly, in one transaction with the
//! release of the event, and the next `start` delivers it. The decider is recorded: `--as`,
//! or the user name.

use super::exit;
use crate::cli::ApprovalsAction;
use crate::client::post_if_running;
use crate::workspace::Workspace;
use lumenflow_actors::approvals::held::{self, Origin};
use lumenflow_actors::approvals::{ApprovalError, ResolveApproval};
use lumenflow_actors::store::{open_connection, open_reader, Durability, StoreOp};
use serde_json::{json, Map, Value};
use std::path::Path;
use std::time::SystemTime;

pub fn run(workspace: Option<&Path>, action: &ApprovalsAction) -> anyhow::Result<u8> {
    let ws = Workspace::locate(workspace)?;
    match action {
        ApprovalsAction::List { all, json } => list(&ws, *all, *json),
        ApprovalsAction::Approve {
            id,
            reason,
            reviewer,
        } => decide(&ws, id, "approved", reason.as_deref(), reviewer.as_deref()),
        ApprovalsAction::Deny {
            id,
            reason,
            reviewer,
        } => decide(&ws, id, "rejected", Some(reason), reviewer.as_deref()),
    }
}

fn now_iso() -> String {
    lumenflow_pack_sdk::envelope::format_timestamp(SystemTime::now())
}

fn list(ws: &Workspace, all: bool, as_json: bool) -> anyhow::Result<u8> {
    let db = ws.db_file();
    let rows = if db.exists() {
        held::list(&open_reader(&db)?, all, &now_iso()).map_err(|e| {
            anyhow::anyhow!("cannot read approvals from {}: {e} (start this version of the agent once to upgrade the state database)", ws.display(&db))
        })?
    } else {
        Vec::new()
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(exit::OK);
    }
    if rows.is_empty() {
        println!(
            "{}",
            if all {
                "no approvals"
            } else {
                "no pending approvals"
            }
        );
        return Ok(exit::OK);
    }
    println!(
        "{:<36}  {:<9} {:<32} {:<20} {:<9} {:<24}  DECISION",
        "APPROVAL ID", "STATUS", "KIND", "REQUESTER", "EVENT", "DEADLINE"
    );
    for r in &rows {
        let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
        let decision = match r["status"].as_str() {
            Some("pending") => "-".to_string(),
            _ => format!(
                "by {} at {}{}",
                r["reviewer_id"].as_str().unwrap_or("?"),
                r["decided_at"].as_str().unwrap_or("(deadline)"),
                r["decision_reason"]
                    .as_str()
                    .map(|t| format!(": {}", super::one_line(t)))
                    .unwrap_or_default()
            ),
        };
        println!(
            "{:<36}  {:<9} {:<32} {:<20} {:<9} {:<24}  {}",
            s("approval_id"),
            s("status"),
            s("type"),
            s("requester_id"),
            r["held_event"]["state"].as_str().unwrap_or("-"),
            r["held_event"]["deadline"].as_str().unwrap_or("-"),
            decision
        );
    }
    let pending = rows.iter().filter(|r| r["status"] == "pending").count();
    println!(
        "{} approval(s), {pending} pending; `lumenflow-agent approvals approve ID` or `approvals deny ID --reason ...` decides",
        rows.len()
    );
    Ok(exit::OK)
}

/// The user deciding: `--as`, else `$USER` / `$LOGNAME`, else the account's name.
fn reviewer_name(given: Option<&str>) -> String {
    given
        .map(str::to_string)
        .or_else(|| std::env::var("USER").ok().filter(|s| !s.is_empty()))
        .or_else(|| std::env::var("LOGNAME").ok().filter(|s| !s.is_empty()))
        .or_else(account_name)
        .unwrap_or_else(|| "unknown-user".into())
}

/// The name of the account this process runs as (getpwuid_r).
#[cfg(unix)]
fn account_name() -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: `pwd` and `buf` outlive the call; getpwuid_r writes only within them and sets
    // `out` to `&pwd` or null.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(
            libc::getuid(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        );
        if rc != 0 || out.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        std::ffi::CStr::from_ptr(pwd.pw_name)
            .to_str()
            .ok()
            .map(str::to_string)
    }
}

#[cfg(not(unix))]
fn account_name() -> Option<String> {
    None
}

fn decide(
    ws: &Workspace,
    typed: &str,
    decision: &str,
    reason: Option<&str>,
    reviewer: Option<&str>,
) -> anyhow::Result<u8> {
    let db = ws.db_file();
    if !db.exists() {
        anyhow::bail!(
            "no approval \"{typed}\": the agent has never run in {}",
            ws.root.display()
        );
    }
    let id = match held::resolve_id(&open_reader(&db)?, typed)? {
        Ok(id) => id,
        Err(m) => anyhow::bail!("{m}"),
    };
    let mut input = Map::new();
    input.insert("approval_id".into(), json!(id));
    input.insert("decision".into(), json!(decision));
    input.insert("reviewer_id".into(), json!(reviewer_name(reviewer)));
    input.insert("reviewer_type".into(), json!("user"));
    if let Some(r) = reason {
        input.insert("reason".into(), json!(r));
    }
    let record = match post_if_running(ws, "/v1/approvals/decide", &Value::Object(input.clone()))? {
        Some(r) if r.status == 200 => Some(r.body),
        Some(r) => {
            eprintln!("error: {}", r.message());
            return Ok(exit::INVALID);
        }
        None => None,
    };
    let (record, live) = match record {
        Some(r) => (r, true),
        None => {
            if let Some(pid) = crate::agent::running_pid(ws) {
                anyhow::bail!("lumenflow-agent (pid {pid}) holds this workspace but its API does not answer; try again when it does");
            }
            match decide_offline(ws, input)? {
                Ok(r) => (r, false),
                Err(e) => {
                    eprintln!("error: {}", e.message());
                    return Ok(exit::INVALID);
                }
            }
        }
    };
    let verb = if decision == "approved" {
        "approved"
    } else {
        "denied"
    };
    let what = match &record["subject"]["event_id"] {
        Value::String(e) => format!(
            "the held {} event {e} {}",
            record["type"].as_str().unwrap_or(""),
            match (decision, live) {
                ("approved", true) => "is delivered",
                ("approved", false) => "is delivered at the next `lumenflow-agent start`",
                _ => "is never delivered (kept with the decision)",
            }
        ),
        _ => "a plain request (no event held)".to_string(),
    };
    println!(
        "{verb} {} as {}: {what}",
        record["approval_id"].as_str().unwrap_or(&id),
        record["reviewer_id"].as_str().unwrap_or("?")
    );
    Ok(exit::OK)
}

/// The decision and the release, in one transaction on the database (no agent runs).
fn decide_offline(
    ws: &Workspace,
    input: Map<String, Value>,
) -> anyhow::Result<Result<Value, ApprovalError>> {
    let (cfg, _) =
        crate::config::AgentConfig::for_workspace(ws).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut conn = open_connection(&ws.db_file(), Durability::Full)?;
    lumenflow_actors::schema::migrate(&mut conn)?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let result = ResolveApproval {
        input,
        now: now_iso(),
        forbid_self: cfg.approvals.forbid_self_approval,
        origin: Origin::Local,
    }
    .run(&tx)?;
    if result.is_ok() {
        tx.commit()?;
    }
    Ok(result.map(|d| d.record))
}
