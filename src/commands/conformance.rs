//! `lumenflow-agent conformance PACK_DIR`: the emit + replay conformance harness.
//!
//! 1. The manifest validates.
//! 2. The worker starts and its `initialize` covers every subscribed kind.
//! 3. For each subscribed kind, one event (from `conformance/<kind with ':' as '_'>.json` if
//!    present, else generated) is delivered twice with the same `event_id`: the second
//!    delivery must return `replayed` and repeat no effect (no emit), else
//!    `Handler called twice: …`.
//! 4. Every emit the handler makes is declared, namespaced and well-formed.
//! 5. Each kind in `required_approvals` is held by the agent's own code (an in-memory copy of
//!    its database): the handler's event of that kind (or a generated one) is neither in the
//!    outbox nor at local subscribers until approved; the approval releases it once; a second
//!    approval is refused.
//!
//! Prints a PASS/FAIL line per check; exit 1 on any failure.

use super::exit;
use lumenflow_actors::effects::Tag;
use lumenflow_actors::exec_worker::ExecWorker;
use lumenflow_pack_sdk::envelope::{EventDraft, Incoming};
use lumenflow_pack_sdk::manifest::{check_handlers, load_pack_dir};
use lumenflow_pack_sdk::native::{BoxFuture, PackServices, ServiceError};
use lumenflow_pack_sdk::{Envelope, Manifest, OutcomeStatus};
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// In-memory stand-ins for the agent's services, recording what the handler does.
#[derive(Default)]
struct Recorder {
    manifest: Option<Arc<Manifest>>,
    replay: Mutex<HashSet<String>>,
    emits: Mutex<Vec<Result<Envelope, String>>>,
    puts: Mutex<usize>,
}

struct HarnessServices(Arc<Recorder>);

impl PackServices for HarnessServices {
    fn replay_has(&self, key: String) -> BoxFuture<Result<bool, ServiceError>> {
        let r = self.0.clone();
        Box::pin(async move { Ok(r.replay.lock().map(|s| s.contains(&key)).unwrap_or(false)) })
    }
    fn replay_put(&self, key: String) -> BoxFuture<Result<(), ServiceError>> {
        let r = self.0.clone();
        Box::pin(async move {
            if let Ok(mut s) = r.replay.lock() {
                s.insert(key);
            }
            if let Ok(mut n) = r.puts.lock() {
                *n += 1;
            }
            Ok(())
        })
    }
    fn emit(&self, draft: EventDraft) -> BoxFuture<Result<String, ServiceError>> {
        let r = self.0.clone();
        Box::pin(async move {
            let Some(m) = r.manifest.clone() else {
                return Err(ServiceError::Unavailable("no manifest".into()));
            };
            let result = m
                .check_emit(&draft.kind)
                .map(|_| Incoming::Draft(draft).complete("conformance", SystemTime::now()))
                .map_err(|e| e.to_string());
            let reply = match &result {
                Ok(e) => Ok(e.event_id.clone()),
                Err(msg) => Err(ServiceError::Rejected(msg.clone())),
            };
            if let Ok(mut v) = r.emits.lock() {
                v.push(result);
            }
            reply
        })
    }
}

struct Report {
    passed: usize,
    failed: usize,
}

impl Report {
    fn pass(&mut self, what: impl AsRef<str>) {
        self.passed += 1;
        println!("PASS  {}", what.as_ref());
    }
    fn fail(&mut self, what: impl AsRef<str>) {
        self.failed += 1;
        println!("FAIL  {}", what.as_ref());
    }
}

fn sample_event(dir: &Path, kind: &str) -> Result<(Envelope, String), String> {
    let file = dir
        .join("conformance")
        .join(format!("{}.json", kind.replace(':', "_")));
    let now = SystemTime::now();
    let draft_payload = |payload: Map<String, Value>| {
        EventDraft::new(kind, payload)
            .with_idempotency_key(format!("conformance:{kind}"))
            .build("conformance", now)
    };
    if !file.exists() {
        return Ok((draft_payload(Map::new()), "generated, empty payload".into()));
    }
    let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let shown = format!(
        "fixture {}",
        file.strip_prefix(dir).unwrap_or(&file).display()
    );
    if v.get("schema_version").is_some() {
        return Envelope::from_value(v)
            .map(|e| (e, shown.clone()))
            .map_err(|e| format!("{}: {e}", file.display()));
    }
    match v.get("payload") {
        Some(Value::Object(p)) => Ok((draft_payload(p.clone()), shown)),
        _ => Err(format!(
            "{}: expected {{\"payload\": {{…}}}} or a complete event",
            file.display()
        )),
    }
}

fn effects(r: &Recorder) -> (usize, usize) {
    (
        r.emits.lock().map(|v| v.len()).unwrap_or(0),
        r.puts.lock().map(|n| *n).unwrap_or(0),
    )
}

pub fn run(pack_dir: &Path) -> anyhow::Result<u8> {
    if !pack_dir.is_dir() {
        anyhow::bail!("{} is not a folder", pack_dir.display());
    }
    let dir = pack_dir.canonicalize()?;
    let cwd = std::env::current_dir()?;
    let base = if dir.starts_with(&cwd) {
        cwd
    } else {
        dir.parent().unwrap_or(&dir).to_path_buf()
    };
    let mut report = Report {
        passed: 0,
        failed: 0,
    };
    println!("conformance {}", pack_dir.display());

    let Some(load) = load_pack_dir(&dir, &base, None) else {
        report.fail(format!(
            "manifest: no manifest.json or manifest.yaml in {}",
            pack_dir.display()
        ));
        return Ok(exit::INVALID);
    };
    let Some(manifest) = load.manifest.clone() else {
        for d in load.errors() {
            report.fail(format!("manifest: {d}"));
        }
        return Ok(exit::INVALID);
    };
    report.pass(format!("manifest: {} is valid", load.display));
    if manifest.runtime.is_none() {
        report.pass("handshake: no runtime (an emit-only pack has no handlers to test)");
        check_holds(&manifest, &[], &mut report);
        println!("{} checks passed", report.passed);
        return Ok(if report.failed == 0 {
            exit::OK
        } else {
            exit::INVALID
        });
    }

    let recorder = Arc::new(Recorder {
        manifest: Some(Arc::new(manifest.clone())),
        ..Recorder::default()
    });
    let system = actix::System::new();
    let result = system.block_on(harness(
        &dir,
        &manifest,
        &load.display,
        recorder,
        &mut report,
    ));
    match result {
        Ok(emitted) => check_holds(&manifest, &emitted, &mut report),
        Err(e) => report.fail(e),
    }
    if report.failed == 0 {
        println!("{} checks passed", report.passed);
        Ok(exit::OK)
    } else {
        println!("{} passed, {} failed", report.passed, report.failed);
        Ok(exit::INVALID)
    }
}

async fn harness(
    dir: &Path,
    manifest: &Manifest,
    display: &str,
    recorder: Arc<Recorder>,
    report: &mut Report,
) -> Result<Vec<Envelope>, String> {
    let timeout = Duration::from_millis(
        manifest
            .runtime
            .as_ref()
            .and_then(|r| r.timeout_ms)
            .unwrap_or(10_000),
    );
    let services: Arc<dyn PackServices> = Arc::new(HarnessServices(recorder.clone()));
    let worker = ExecWorker::spawn(manifest, dir, dir, Arc::new(move |_| services.clone()))
        .map_err(|e| format!("handshake: {e}"))?;
    let handles = worker
        .initialize(manifest, dir, "conformance", timeout)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let missing = check_handlers(manifest, &handles, display);
    if missing.is_empty() {
        report.pass(format!(
            "handshake: the worker handles every subscribed kind ({})",
            manifest.subscribed_event_kinds.join(", ")
        ));
    } else {
        for d in missing {
            report.fail(format!("handshake: {}", d.message));
        }
    }

    for kind in &manifest.subscribed_event_kinds {
        let (event, source) = match sample_event(dir, kind) {
            Ok(s) => s,
            Err(e) => {
                report.fail(format!("{kind}: {e}"));
                continue;
            }
        };
        let before = effects(&recorder);
        let first = worker
            .outcome(
                worker.send_handle(&event, 1, false, Tag { chunk: 1, seq: 1 }),
                timeout,
            )
            .await;
        let first = match first {
            Ok(o) => o,
            Err(e) => {
                report.fail(format!(
                    "{kind}: the handler crashed on the first delivery ({source}): {e}{}",
                    if source.starts_with("generated") {
                        format!(
                            "; add a fixture conformance/{}.json with a realistic payload",
                            kind.replace(':', "_")
                        )
                    } else {
                        String::new()
                    }
                ));
                return Ok(Vec::new());
            }
        };
        let after_first = effects(&recorder);
        report.pass(format!(
            "{kind}: first delivery -> {}{} ({} emit(s), {} replay put(s); {source})",
            first.status,
            first
                .action
                .as_deref()
                .map(|a| format!(" ({a})"))
                .unwrap_or_default(),
            after_first.0 - before.0,
            after_first.1 - before.1
        ));
        let second = worker
            .outcome(
                worker.send_handle(&event, 2, true, Tag { chunk: 2, seq: 1 }),
                timeout,
            )
            .await;
        let after_second = effects(&recorder);
        let emitted_again = after_second.0 - after_first.0;
        match second {
            Err(e) => report.fail(format!(
                "{kind}: the handler crashed on the second delivery of the same event: {e}"
            )),
            Ok(second) => {
                let expected_replayed = matches!(
                    first.status,
                    OutcomeStatus::Handled | OutcomeStatus::Replayed
                );
                if emitted_again > 0
                    || (expected_replayed && second.status != OutcomeStatus::Replayed)
                {
                    let what = if emitted_again > 0 {
                        format!("and repeated its effect ({emitted_again} emit(s) again)")
                    } else {
                        "instead of \"replayed\"".to_string()
                    };
                    report.fail(format!(
                        "{kind}: Handler called twice: the second delivery of event {} returned \"{}\" {what}; check ctx.replayLog.has(key) before the effect and put(key) after it",
                        event.event_id, second.status
                    ));
                } else {
                    report.pass(format!(
                        "{kind}: second delivery of the same event -> {}, no effect repeated",
                        second.status
                    ));
                }
            }
        }
    }

    let emits = recorder.emits.lock().map(|v| v.clone()).unwrap_or_default();
    let bad: Vec<&String> = emits.iter().filter_map(|e| e.as_ref().err()).collect();
    if bad.is_empty() {
        report.pass(format!(
            "emits: {} emit(s), all declared, namespaced and well-formed",
            emits.len()
        ));
    } else {
        for b in bad {
            report.fail(format!("emits: {b}"));
        }
    }
    worker.shutdown(Duration::from_secs(2)).await;
    Ok(emits.into_iter().filter_map(Result::ok).collect())
}

/// Check 5: every `required_approvals` kind is held until approved, released once.
fn check_holds(manifest: &Manifest, emitted: &[Envelope], report: &mut Report) {
    for kind in &manifest.required_approvals {
        let (event, source) = match emitted.iter().find(|e| &e.kind == kind) {
            Some(e) => (e.clone(), "the handler's event"),
            None => (
                EventDraft::new(kind.as_str(), Map::new()).build("conformance", SystemTime::now()),
                "a generated event (no delivery emitted one)",
            ),
        };
        match hold_and_approve(manifest, event) {
            Ok(()) => report.pass(format!(
                "approvals: {kind} is held until approved ({source}: not upstream, not at local subscribers; approve released it once; a second approve was refused)"
            )),
            Err(e) => report.fail(format!("approvals: {kind}: {e}")),
        }
    }
}

/// Holds `event` with the agent's own code on an in-memory database, then approves it twice.
fn hold_and_approve(manifest: &Manifest, event: Envelope) -> Result<(), String> {
    use lumenflow_actors::approvals::held::{ApprovalPolicy, Hold, Origin};
    use lumenflow_actors::approvals::ResolveApproval;
    use lumenflow_actors::store::StoreOp;
    let mut conn = rusqlite::Connection::open_in_memory().map_err(|e| e.to_string())?;
    lumenflow_actors::schema::migrate(&mut conn).map_err(|e| e.to_string())?;
    let count = |sql: &str| -> Result<i64, String> {
        conn.query_row(sql, [&event.kind], |r| r.get(0))
            .map_err(|e| e.to_string())
    };
    let hold = Hold::new(
        &event,
        &manifest.id,
        &ApprovalPolicy::default(),
        "conformance",
        SystemTime::now(),
    );
    let approval_id = hold.approval_id.clone();
    let class = manifest
        .check_emit(&event.kind)
        .map_err(|e| e.to_string())?;
    let accepted = lumenflow_actors::queue::Accepted {
        body: event.to_json().into(),
        envelope: Arc::new(event.clone()),
        pack: manifest.id.clone(),
        class,
        local: true,
        hold: Some(Arc::new(hold)),
    };
    lumenflow_actors::queue::insert_accepted(&conn, &[accepted.clone(), accepted])
        .map_err(|e| e.to_string())?;
    let (out, local) = (
        count("SELECT count(*) FROM outbox WHERE kind = ?1")?,
        count("SELECT count(*) FROM inbound WHERE kind = ?1")?,
    );
    if out + local > 0 {
        return Err(format!(
            "not held: {out} outbox row(s), {local} inbound row(s) before any decision"
        ));
    }
    let pending = count("SELECT count(*) FROM approvals WHERE status = 'pending' AND type = ?1")?;
    if pending != 1 {
        return Err(format!(
            "{pending} pending approval(s) for one event emitted twice (expected 1)"
        ));
    }
    let approve = || {
        let mut input = Map::new();
        input.insert("approval_id".into(), json!(approval_id));
        input.insert("decision".into(), json!("approved"));
        input.insert("reviewer_id".into(), json!("conformance"));
        ResolveApproval {
            input,
            now: lumenflow_pack_sdk::envelope::format_timestamp(SystemTime::now()),
            forbid_self: false,
            origin: Origin::Local,
        }
        .run(&conn)
        .map_err(|e| e.to_string())
    };
    approve()?.map_err(|e| format!("approve: {}", e.message()))?;
    let (out, local) = (
        count("SELECT count(*) FROM outbox WHERE kind = ?1")?,
        count("SELECT count(*) FROM inbound WHERE kind = ?1")?,
    );
    if (out, local) != (1, 1) {
        return Err(format!(
            "after approval: {out} outbox row(s) and {local} inbound row(s) (expected 1 and 1)"
        ));
    }
    if approve()?.is_ok() {
        return Err("a second approval was taken".into());
    }
    Ok(())
}
