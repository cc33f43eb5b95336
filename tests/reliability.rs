//! The reliability suite (RELIABILITY.md): crashes at random moments under a steady stream,
//! with exact accounting by event_id. `cargo test --test reliability` runs the CI size;
//! `LUMENFLOW_SOAK=1 cargo test --release --test reliability -- --nocapture` runs longer.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

fn soak() -> bool {
    std::env::var_os("LUMENFLOW_SOAK").is_some()
}

/// A small deterministic random source (no extra dependency; seeds are printed).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

fn seed() -> u64 {
    std::env::var("LUMENFLOW_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(42)
                | 1
        })
}

/// Emits `batches` batches of `per` `emitter:job_completed` events; their ids, in order.
fn emit_jobs(api: &Api, batches: usize, per: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for b in 0..batches {
        let r = api.emit(
            (0..per)
                .map(|i| json!({"kind": "emitter:job_completed", "payload": {"n": b * per + i}}))
                .collect(),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        ids.extend(
            r.body["event_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string()),
        );
    }
    ids
}

/// kill -9 of the agent at random moments during a steady stream of queue events (conductor
/// mode, with a local subscriber written like the quickstart: replay key checked before the
/// effect, recorded after): after the last restart every accepted event is at the conductor
/// (deduplicated by event_id) and its effect happened; redeliveries and re-executed effects
/// are counted.
#[test]
fn kill_9_the_agent_at_random_moments_during_a_steady_stream() {
    let rounds = if soak() { 25 } else { 5 };
    let mut rng = Rng(seed());
    let s0 = rng.0;
    let mut ws = Workspace::new(json!({"durability": "full"}), "ledger,emitter");
    let c = Conductor::start(ws.path(), "tok");
    enroll(&ws, &c, "tok");
    let acked: Mutex<Vec<String>> = Mutex::new(Vec::new());
    for round in 0..rounds {
        ws.start();
        let api = ws.api();
        let stop = AtomicBool::new(false);
        let kill_after = Duration::from_millis(rng.between(100, 800));
        std::thread::scope(|s| {
            let producer = s.spawn(|| {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    let events: Vec<Value> = (0..20).map(|i| json!({"kind": "emitter:job_completed", "payload": {"round": round, "n": n * 20 + i}})).collect();
                    match api.try_emit(events) {
                        Some(r) if r.status == 200 => {
                            let ids = r.body["event_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string());
                            acked.lock().unwrap().extend(ids);
                        }
                        _ => break,
                    }
                    n += 1;
                    // A steady stream (~400 events/s): the subscriber records a replay key per
                    // event (one commit each, fsync with durability full).
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
            std::thread::sleep(kill_after);
            ws.kill9();
            stop.store(true, Ordering::SeqCst);
            producer.join().unwrap();
        });
    }
    ws.start();
    let acked = acked.into_inner().unwrap();
    let n = acked.len();
    // The subscriber first (its entries go to the outbox), then the outbox.
    wait_for("the subscriber to catch up", T, || {
        (ws.pack_status("ledger")["pending"] == 0).then_some(())
    });
    wait_for("the outbox to drain", T, || {
        (ws.status()["queue"]["durable_depth"] == 0).then_some(())
    });
    let received = c.received();
    let at_conductor: HashMap<String, i64> = received
        .iter()
        .map(|r| {
            (
                r["event"]["event_id"].as_str().unwrap().to_string(),
                r["deliveries"].as_i64().unwrap(),
            )
        })
        .collect();
    let mut effects: HashMap<String, usize> = HashMap::new();
    for line in ws.effects() {
        *effects
            .entry(line.split(' ').nth(1).unwrap().to_string())
            .or_insert(0) += 1;
    }
    // The ledger's emitted entries (committed with its outcome), by the event they record.
    let mut entries: HashMap<String, usize> = HashMap::new();
    for r in &received {
        if r["event"]["kind"] == "ledger:entry_recorded" {
            let source = r["event"]["payload"]["source"]
                .as_str()
                .unwrap()
                .to_string();
            *entries.entry(source).or_insert(0) += 1;
        }
    }
    let jobs: HashMap<&str, i64> = received
        .iter()
        .filter(|r| r["event"]["kind"] == "emitter:job_completed")
        .map(|r| {
            (
                r["event"]["event_id"].as_str().unwrap(),
                r["deliveries"].as_i64().unwrap(),
            )
        })
        .collect();
    let lost_upstream = acked
        .iter()
        .filter(|id| !jobs.contains_key(id.as_str()))
        .count();
    let lost_handler = acked.iter().filter(|id| !effects.contains_key(*id)).count();
    let lost_entries = acked.iter().filter(|id| !entries.contains_key(*id)).count();
    let doubled_entries: usize = entries.values().map(|n| n - 1).sum();
    let redelivered_upstream: i64 = at_conductor.values().map(|d| d - 1).sum();
    let rerun_handler: usize = effects.values().map(|n| n - 1).sum();
    let line = format!(
        "RELIABILITY kill-9 agent: seed {s0}, {rounds} kills, {n} events acknowledged; at the conductor: {} distinct, {lost_upstream} lost, {redelivered_upstream} redeliveries (deduped by event_id); handler effects through the agent (emitted entries): {} distinct, {lost_entries} lost, {doubled_entries} duplicated; outside the agent (file append, at least once): {} distinct, {lost_handler} lost, {rerun_handler} re-executions",
        jobs.len(),
        entries.len(),
        effects.len()
    );
    eprintln!("{line}");
    assert!(n > 0);
    assert_eq!(lost_upstream, 0, "{line}");
    assert_eq!(lost_handler, 0, "{line}");
    assert_eq!(lost_entries, 0, "{line}");
    assert_eq!(doubled_entries, 0, "{line}");
}

/// kill -9 of an exec worker at random moments while it handles a steady inbound stream:
/// every event is handled; none is dead-lettered (kills land on different events).
#[test]
fn kill_9_exec_workers_at_random_moments() {
    let kills = if soak() { 40 } else { 8 };
    let mut rng = Rng(seed());
    let s0 = rng.0;
    let mut ws = Workspace::new(
        json!({"supervision": {"max_restarts": 1000, "window_s": 1}}),
        "",
    );
    let dir = ws.path().join("packs/worker");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packs/node/lumenflow-pack.mjs"),
        dir.join("lumenflow-pack.mjs"),
    )
    .unwrap();
    std::fs::write(
        dir.join("manifest.json"),
        json!({"id": "worker", "version": "0.1.0", "subscribed_event_kinds": ["conductor:job_poked"],
            "emitted_event_kinds": ["worker:entry_recorded"], "backpressure_policy": {"worker:entry_recorded": "queue"},
            "runtime": {"command": ["node", "handler.mjs"]}}).to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("handler.mjs"),
        "import { runPack } from './lumenflow-pack.mjs';\nimport { appendFileSync, writeFileSync } from 'node:fs';\nwriteFileSync('worker.pid', String(process.pid));\nrunPack({ handlers: { 'conductor:job_poked': async (e, ctx) => { await new Promise((r) => setTimeout(r, 2)); appendFileSync('effects.txt', e.event_id + '\\n'); await ctx.emit('worker:entry_recorded', { source: e.event_id }); return { status: 'handled' }; } } });\n",
    )
    .unwrap();
    ws.start();
    let api = ws.api();
    let ids: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let events: Vec<Value> = (0..10)
                    .map(|i| json!({"kind": "conductor:job_poked", "payload": {"i": i}}))
                    .collect();
                let r = api.post("/v1/inbound", &json!({"events": events}));
                assert_eq!(r.status, 200);
                ids.lock().unwrap().extend(
                    r.body["event_ids"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_str().unwrap().to_string()),
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let mut last_pid = 0;
        let handled = || ws.pack_status("worker")["handled"].as_u64().unwrap_or(0);
        let mut handled_at_kill = 0;
        for _ in 0..kills {
            std::thread::sleep(Duration::from_millis(rng.between(150, 600)));
            let pid: i32 = wait_for("a new worker", T, || {
                std::fs::read_to_string(dir.join("worker.pid"))
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .filter(|p| *p != last_pid)
            });
            // The new worker has handled something since the last kill: a kill that lands
            // while a slow start (a loaded machine) has only just ended would hit the same
            // first event each time, and 3 of those make it a poison event (dead-lettered by
            // design), which is not what this test is about.
            wait_for("progress since the last kill", T, || {
                (handled() > handled_at_kill).then_some(())
            });
            handled_at_kill = handled();
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            last_pid = pid;
        }
        stop.store(true, Ordering::SeqCst);
    });
    let ids = ids.into_inner().unwrap();
    let started = Instant::now();
    wait_for("every event handled", T, || {
        let p = ws.pack_status("worker");
        (p["handled"].as_u64().unwrap_or(0) + p["dead_lettered"].as_u64().unwrap_or(0)
            >= ids.len() as u64
            && p["pending"] == 0)
            .then_some(())
    });
    let mut effects: HashMap<String, usize> = HashMap::new();
    for l in std::fs::read_to_string(dir.join("effects.txt"))
        .unwrap_or_default()
        .lines()
    {
        *effects.entry(l.to_string()).or_insert(0) += 1;
    }
    let p = ws.pack_status("worker");
    let lost = ids.iter().filter(|id| !effects.contains_key(*id)).count();
    let reruns: usize = effects.values().map(|n| n - 1).sum();
    // The worker's emitted entries (committed with its outcomes), by the event they record.
    // On a timeout, say where the missing entries are (dead-lettered, still queued, or gone).
    let deadline = Instant::now() + T;
    let inbox = loop {
        let i = ws.inbox();
        if i.len() >= ids.len() {
            break i;
        }
        if Instant::now() > deadline {
            let s = ws.status();
            let have: std::collections::HashSet<&str> = i
                .iter()
                .filter_map(|r| r["event"]["payload"]["source"].as_str())
                .collect();
            let missing: Vec<&String> = ids
                .iter()
                .filter(|id| !have.contains(id.as_str()))
                .collect();
            panic!(
                "seed {s0}: {} of {} entries in mem:inbox after {T:?}; missing {} (first: {:?}; their effects: {:?}); pack {}; queue {}; dead letters {}",
                i.len(),
                ids.len(),
                missing.len(),
                missing.first(),
                missing.first().map(|m| effects.get(*m)),
                s["packs"],
                s["queue"],
                String::from_utf8_lossy(&ws.run(&["dlq", "list"]).stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut entries: HashMap<String, usize> = HashMap::new();
    for r in &inbox {
        let source = r["event"]["payload"]["source"]
            .as_str()
            .unwrap()
            .to_string();
        *entries.entry(source).or_insert(0) += 1;
    }
    let lost_entries = ids.iter().filter(|id| !entries.contains_key(*id)).count();
    let doubled: usize = entries.values().map(|n| n - 1).sum();
    let line = format!(
        "RELIABILITY kill-9 workers: seed {s0}, {kills} kills, {} restarts, {} events; emitted entries (through the agent): {} distinct, {lost_entries} lost, {doubled} duplicated; file appends (outside): {} distinct, {lost} lost, {reruns} re-executions; {} dead-lettered; drained {:?} after the last kill",
        p["restarts"],
        ids.len(),
        entries.len(),
        effects.len(),
        p["dead_lettered"],
        started.elapsed()
    );
    eprintln!("{line}");
    assert!(p["restarts"].as_u64().unwrap() >= kills as u64, "{line}");
    assert_eq!(lost, 0, "{line}");
    assert_eq!(lost_entries, 0, "{line}");
    assert_eq!(doubled, 0, "{line}");
    assert_eq!(p["dead_lettered"], 0, "{line}");
}

/// A 5xx storm (half the pushes fail) with slow answers (150 ms): every queue event arrives,
/// in order, none lost.
#[test]
fn a_5xx_storm_with_slow_answers_loses_nothing_and_keeps_order() {
    let mut ws = Workspace::new(json!({}), "emitter");
    let c = Conductor::start(ws.path(), "tok");
    enroll(&ws, &c, "tok");
    c.admin(
        "/admin/faults",
        Some(json!({"rate": 0.5, "latency_ms": 150})),
    );
    ws.start();
    let api = ws.api();
    let ids = emit_jobs(&api, 20, 25);
    wait_for("delivered through the storm", T, || {
        (c.received().len() >= ids.len()).then_some(())
    });
    c.admin("/admin/faults", Some(json!({})));
    let got: Vec<String> = c
        .received()
        .iter()
        .map(|r| r["event"]["event_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, ids, "all, in order");
    eprintln!("RELIABILITY 5xx storm: {} events through a 50% failure rate with 150 ms answers: 0 lost, order kept", ids.len());
}

/// Mounts a tmpfs (root only) and unmounts it when dropped.
struct Tmpfs(std::path::PathBuf);
impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .ok()?
            .success();
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
    fn remount(&self, opts: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount {opts}");
    }
}
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A full disk: the agent refuses new events with a clear error (507) instead of losing them,
/// keeps serving, and accepts again when space returns; every acknowledged event is delivered
/// once. Needs root (mount); skipped with a note otherwise.
#[test]
fn a_full_disk_refuses_new_events_clearly_and_recovers_when_space_returns() {
    let mut ws = Workspace::new(json!({"durability": "normal"}), "emitter");
    let state = ws.path().join(".lumenflow/state");
    let Some(fs) = Tmpfs::mount(&state, "2m") else {
        eprintln!("RELIABILITY full disk: skipped (mounting a tmpfs needs root)");
        return;
    };
    ws.start();
    let api = ws.api();
    let mut acked: Vec<String> = Vec::new();
    let mut refusal = None;
    for b in 0..5000 {
        let events: Vec<Value> = (0..50).map(|i| json!({"kind": "emitter:job_completed", "payload": {"n": b * 50 + i, "pad": "x".repeat(200)}})).collect();
        let r = api.emit(events);
        if r.status == 200 {
            acked.extend(
                r.body["event_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string()),
            );
        } else {
            refusal = Some(r);
            break;
        }
    }
    let r = refusal.expect("the disk never filled");
    assert_eq!(r.status, 507, "{}", r.body);
    let msg = r.body["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("disk full"), "{msg}");
    assert_eq!(api.get("/v1/status").status, 200, "still serving");
    // Space returns.
    fs.remount("size=64m");
    let r = wait_for("accepted again", T, || {
        let r = api.emit(vec![
            json!({"kind": "emitter:job_completed", "payload": {"after": true}}),
        ]);
        (r.status == 200).then_some(r)
    });
    acked.push(r.body["event_ids"][0].as_str().unwrap().to_string());
    wait_for("the outbox to drain", T, || {
        (ws.status()["queue"]["durable_depth"] == 0).then_some(())
    });
    let mut count: HashMap<String, usize> = HashMap::new();
    for row in ws.inbox() {
        *count
            .entry(row["event"]["event_id"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    let lost = acked.iter().filter(|id| !count.contains_key(*id)).count();
    let dupes = count.values().filter(|n| **n > 1).count();
    eprintln!("RELIABILITY full disk: {} events acknowledged before the 2 MiB state disk filled; refused with 507 \"{msg}\"; accepted again after it grew; {lost} lost, {dupes} duplicated", acked.len() - 1);
    assert_eq!(lost, 0);
    assert_eq!(dupes, 0);
    // Recovered: status no longer shows the disk-full error as current.
    let s = ws.status();
    assert!(
        s["upstream"]["last_error"].is_null(),
        "after recovery: {}",
        s["upstream"]
    );
    assert_eq!(s["upstream"]["state"], "connected");
    ws.kill9();
}

/// A read-only state directory: `start` refuses with a clear error (exit 2), nothing already
/// accepted is lost, and the agent starts and delivers once it is writable again. (Linux does
/// not let a filesystem turn read-only under a process that holds files open for writing, so
/// the running case is the full disk above.) Needs root.
#[test]
fn a_read_only_state_directory_refuses_clearly_and_recovers() {
    let mut ws = Workspace::new(
        json!({"durability": "normal", "queue": {"max_depth": 1000}}),
        "emitter",
    );
    let state = ws.path().join(".lumenflow/state");
    let Some(fs) = Tmpfs::mount(&state, "64m") else {
        eprintln!("RELIABILITY read-only: skipped (mounting a tmpfs needs root)");
        return;
    };
    ws.start();
    let r = ws.api().emit(vec![
        json!({"kind": "emitter:job_completed", "payload": {"n": 1}}),
    ]);
    assert_eq!(r.status, 200);
    let id = r.body["event_ids"][0].as_str().unwrap().to_string();
    assert_eq!(ws.terminate(), Some(0));
    fs.remount("ro");
    let out = ws.run(&["start"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("Read-only file system")
            || err.contains("read-only")
            || err.contains("readonly"),
        "{err}"
    );
    fs.remount("rw");
    ws.start();
    wait_for("delivered", T, || {
        (ws.status()["queue"]["durable_depth"] == 0).then_some(())
    });
    let inbox: Vec<String> = ws
        .inbox()
        .iter()
        .map(|r| r["event"]["event_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(inbox, vec![id]);
    eprintln!(
        "RELIABILITY read-only: start refused with exit 2: {}; started once writable; 0 lost",
        err.trim()
    );
    ws.kill9();
}

/// Security at the edge: a request with a valid token but a non-loopback Host header (DNS
/// rebinding from a web page) is refused with 403.
#[test]
fn a_non_loopback_host_header_is_refused_even_with_the_token() {
    let mut ws = Workspace::new(json!({}), "emitter");
    ws.start();
    let api = ws.api();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent
        .get(format!("{}/v1/status", api.url))
        .header("authorization", format!("Bearer {}", api.token))
        .header("host", "evil.example:80")
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let body = r.body_mut().read_to_string().unwrap();
    assert!(
        body.contains("Forbidden: Host \\\"evil.example:80\\\" is not a loopback address"),
        "{body}"
    );
    assert_eq!(api.get("/v1/status").status, 200);
}

/// Writes `tests/fixtures/state-v1.sql` (a database as the first release wrote it) into the
/// workspace's state directory.
fn install_v1_state(ws: &Workspace) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = ws.path().join(".lumenflow/state/agent");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let db = dir.join("agent.db");
    let sql = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/state-v1.sql"),
    )
    .unwrap();
    let c = rusqlite::Connection::open(&db).unwrap();
    c.pragma_update(None, "journal_mode", "WAL").unwrap();
    c.execute_batch(&sql).unwrap();
    // Recorded "just before the upgrade", inside the replay retention.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    for table in ["replay_log", "replay_recent"] {
        c.execute(&format!("UPDATE {table} SET recorded_ms = ?1"), [now])
            .unwrap();
    }
    drop(c);
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600)).unwrap();
    db
}

/// A state directory written by the first release (schema version 1) is taken over as it is:
/// its outbox is delivered, each pack resumes at its cursor with its attempts, its replay log
/// and dead letters are kept.
#[test]
fn a_state_directory_from_an_older_schema_version_is_upgraded_with_nothing_lost() {
    let mut ws = Workspace::new(json!({}), "recorder,emitter");
    install_v1_state(&ws);
    ws.start();
    let inbox = wait_for("the 3 waiting queue events in mem:inbox", T, || {
        let i = ws.inbox();
        (i.len() >= 4).then_some(i)
    });
    let ids: Vec<&str> = inbox
        .iter()
        .map(|r| r["event"]["event_id"].as_str().unwrap())
        .collect();
    for n in ["31", "01", "02", "03"] {
        let id = format!("0193a000-0000-7000-8000-0000000000{n}");
        assert_eq!(
            ids.iter().filter(|i| **i == id).count(),
            1,
            "{id} once: {ids:?}"
        );
    }
    let p = wait_for("the recorder to resume at its cursor", T, || {
        let p = ws.pack_status("recorder");
        (p["handled"].as_u64() == Some(2) && p["pending"] == 0).then_some(p)
    });
    assert_eq!(p["replayed"], 1, "row 4 was in the replay log: {p}");
    let effects = ws.effects();
    assert_eq!(effects.len(), 2, "{effects:?}");
    assert!(effects[0].contains("000000000012 attempt=1"), "{effects:?}");
    assert!(
        effects[1].contains("000000000013 attempt=2"),
        "the attempt recorded before the upgrade counts: {effects:?}"
    );
    let dlq: Vec<Value> =
        serde_json::from_slice(&ws.run(&["dlq", "list", "--json"]).stdout).unwrap();
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(dlq[0]["event_id"], "0193a000-0000-7000-8000-000000000021");
}

/// A state database from a newer agent is refused at start, naming the versions, and left as
/// it is.
#[test]
fn a_state_database_from_a_newer_agent_is_refused_and_left_untouched() {
    let ws = Workspace::new(json!({}), "recorder");
    let db = install_v1_state(&ws);
    rusqlite::Connection::open(&db)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let before = std::fs::read(&db).unwrap();
    let out = ws.run(&["start"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("schema version 99, newer than this agent's"),
        "{err}"
    );
    assert!(
        std::fs::read(&db).unwrap() == before,
        "the database was modified"
    );
}

/// Connection resets after the conductor accepted a push: the agent hears nothing, so it keeps
/// the events and pushes them again once answers come back; the conductor deduplicates by
/// event_id. Nothing is lost, nothing is stored twice.
#[test]
fn connection_resets_after_the_conductor_accepted_lose_nothing_and_store_nothing_twice() {
    let mut ws = Workspace::new(json!({}), "emitter");
    let c = Conductor::start(ws.path(), "tok");
    // Forwards each push, lets the conductor answer, then resets the agent's connection (TCP
    // RST, no answer): the events are at the conductor but the agent never heard so.
    let proxy = lumenflow_chaos::proxy::Proxy::start(c.port).unwrap();
    proxy.set(lumenflow_chaos::proxy::Mode::Reset);
    enroll_at(&ws, &format!("http://127.0.0.1:{}", proxy.port), "tok");
    ws.start();
    let api = ws.api();
    let ids = emit_jobs(&api, 10, 10);
    // The conductor has every event, the agent has heard of none.
    wait_for("all 100 at the conductor, unacknowledged", T, || {
        (c.received().len() >= 100 && proxy.resets() >= 3).then_some(())
    });
    assert_eq!(ws.status()["queue"]["durable_depth"], 100);
    proxy.set(lumenflow_chaos::proxy::Mode::Pass);
    wait_for("the outbox to drain", T, || {
        (ws.status()["queue"]["durable_depth"] == 0).then_some(())
    });
    let received = c.received();
    let at: HashMap<&str, i64> = received
        .iter()
        .map(|r| {
            (
                r["event"]["event_id"].as_str().unwrap(),
                r["deliveries"].as_i64().unwrap(),
            )
        })
        .collect();
    let lost = ids
        .iter()
        .filter(|id| !at.contains_key(id.as_str()))
        .count();
    let redelivered: i64 = at.values().map(|d| d - 1).sum();
    let line = format!(
        "RELIABILITY connection resets: {} events, {} resets, {} stored at the conductor, {lost} lost, {redelivered} redeliveries deduplicated",
        ids.len(),
        proxy.resets(),
        received.len()
    );
    eprintln!("{line}");
    assert_eq!(lost, 0, "{line}");
    assert_eq!(received.len(), 100, "{line}");
    assert!(redelivered >= 100, "each was pushed again: {line}");
}
