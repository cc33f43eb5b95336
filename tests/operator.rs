//! The operator's view, driven as an operator would: `top` in a real terminal (tmux), `tap`
//! over the local API, `graph` through Graphviz, readiness and the log file of a service, and
//! the state words of `status`.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

/// A tmux server of this test's own (its own socket), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new(name: &str) -> Tmux {
        let socket = format!("lf-{name}-{}", std::process::id());
        Tmux { socket }
    }
    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.socket]);
        c
    }
    fn run(&self, args: &[&str]) -> std::process::Output {
        self.cmd()
            .args(args)
            .output()
            .expect("tmux (installed by .ci/run)")
    }
    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }
    fn alive(&self) -> bool {
        self.run(&["has-session", "-t", "top"]).status.success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// A rate cell (`0`, `4.5`, `120`, `1.3k`) as a number.
fn rate(cell: &str) -> f64 {
    match cell.strip_suffix('k') {
        Some(k) => k.parse::<f64>().unwrap_or(0.0) * 1000.0,
        None => cell.parse().unwrap_or(-1.0),
    }
}

/// The IN/s of `pack`'s row on the screen (`None`: no row yet).
fn in_rate(screen: &str, pack: &str) -> Option<f64> {
    screen.lines().find_map(|l| {
        let cells: Vec<&str> = l.split_whitespace().collect();
        (cells.first() == Some(&pack) && cells.len() > 3).then(|| rate(cells[2]))
    })
}

/// Posts `bench:ping` batches of 100 until stopped; the count posted.
fn flow(api: Api, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let events: Vec<Value> = (0..100)
                .map(|i| json!({"kind": "bench:ping", "payload": {"i": i}}))
                .collect();
            if api.emit(events).status == 200 {
                n += 100;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        n
    })
}

/// `top` in a real terminal: the sink's IN/s reads 0, moves while events flow, falls back when
/// they stop; `s` changes the sort; `q` quits.
#[test]
fn top_in_a_terminal_shows_a_pack_s_rate_move_and_quits_on_q() {
    let mut ws = Workspace::new(json!({}), "sink,bench");
    ws.start();
    let tmux = Tmux::new("top");
    let command = format!(
        "env LUMENFLOW_AGENT_NO_USER_CONFIG=1 {AGENT} top --workspace {}",
        ws.path().display()
    );
    let out = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "120",
        "-y",
        "30",
        &command,
    ]);
    assert!(out.status.success(), "tmux: {out:?}");
    let idle = wait_for("top's first frame", T, || {
        let s = tmux.screen();
        in_rate(&s, "sink").map(|r| (r, s))
    });
    assert_eq!(idle.0, 0.0, "nothing flows yet:\n{}", idle.1);
    assert!(
        idle.1.contains("upstream mem:inbox connected"),
        "{}",
        idle.1
    );

    let stop = Arc::new(AtomicBool::new(false));
    let producer = flow(ws.api(), stop.clone());
    let busy = wait_for("the sink's rate moving", T, || {
        let s = tmux.screen();
        in_rate(&s, "sink").filter(|r| *r > 100.0).map(|r| (r, s))
    });
    stop.store(true, Ordering::Relaxed);
    let posted = producer.join().unwrap();
    eprintln!("top showed the sink at {} events/s:\n{}", busy.0, busy.1);
    assert!(busy.1.contains("bench"), "the producer's row is there too");
    wait_for("the sink's rate falling back to 0", T, || {
        (in_rate(&tmux.screen(), "sink") == Some(0.0)).then_some(())
    });
    assert!(posted > 0);

    // `s` moves the sort to the next column (OUT/s): its header gets the marker.
    tmux.run(&["send-keys", "-t", "top", "s"]);
    wait_for("the sort marker on OUT/s", T, || {
        tmux.screen().contains("OUT/s▼").then_some(())
    });
    tmux.run(&["send-keys", "-t", "top", "q"]);
    wait_for("top quitting on q", T, || (!tmux.alive()).then_some(()));
}

/// A narrow terminal still reads: the pack, its state and its rates stay.
#[test]
fn top_in_a_narrow_terminal_keeps_the_essential_columns() {
    let mut ws = Workspace::new(json!({}), "sink");
    ws.start();
    let out = ws
        .cmd()
        .env("COLUMNS", "50")
        .args(["top", "--once"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(text.contains("sink") && text.contains("IN/s"), "{text}");
    ws.terminate();
    let out = ws.run(&["top", "--once"]);
    assert_eq!(out.status.code(), Some(3), "no agent: exit 3");
}

/// Starts `tap ARGS` and waits until the agent counts it attached.
fn start_tap(ws: &Workspace, args: &[&str]) -> std::process::Child {
    let before = ws.status()["taps"].as_u64().unwrap_or(0);
    let child = ws
        .cmd()
        .arg("tap")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the tap attached", T, || {
        (ws.status()["taps"].as_u64().unwrap_or(0) > before).then_some(())
    });
    child
}

fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + T;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the tap did not end");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `tap --json` sees each event accepted, then delivered with its outcome, in order; a pattern
/// keeps other kinds out.
#[test]
fn tap_json_receives_a_known_sequence_of_events() {
    let mut ws = Workspace::new(json!({}), "recorder,emitter");
    ws.start();
    let mut tap = start_tap(&ws, &["conductor:*", "--json", "--limit", "6"]);
    let ids: Vec<String> = (0..3)
        .map(|i| {
            ws.inbound(
                "conductor:recovery_requested",
                &format!("{{\"wu_id\":\"w{i}\"}}"),
            )
        })
        .collect();
    // A kind the pattern leaves out.
    ws.api()
        .emit(vec![json!({"kind": "emitter:tick", "payload": {}})]);
    let status = wait_exit(&mut tap);
    assert!(status.success());
    let mut out = String::new();
    tap.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6, "{out}");
    let inbound: Vec<&str> = lines
        .iter()
        .filter(|l| l["stage"] == "inbound")
        .map(|l| l["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(inbound, ids, "accepted in order");
    for id in &ids {
        let delivered = lines
            .iter()
            .find(|l| l["stage"] == "delivered" && l["event_id"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} delivered: {out}"));
        assert_eq!(delivered["pack"], "recorder");
        assert_eq!(delivered["detail"], "handled");
        assert_eq!(
            delivered["event"]["payload"]["wu_id"]
                .as_str()
                .unwrap()
                .len(),
            2
        );
        // Delivered after it was accepted.
        let pos = |stage: &str| {
            lines
                .iter()
                .position(|l| l["stage"] == stage && l["event_id"] == id.as_str())
        };
        assert!(pos("inbound") < pos("delivered"));
    }
    assert!(lines
        .iter()
        .all(|l| l["kind"] == "conductor:recovery_requested"));
    wait_for("the tap detached", T, || {
        (ws.status()["taps"] == 0).then_some(())
    });
}

/// Emits and dead letters reach the tap, named by pack; the human format is one line each.
#[test]
fn tap_shows_emits_and_dead_letters_by_pack() {
    let mut ws = Workspace::new(json!({}), "recorder,emitter");
    ws.start();
    let mut tap = start_tap(&ws, &["--limit", "3"]);
    ws.api().emit(vec![
        json!({"kind": "emitter:job_completed", "payload": {"n": 1}}),
    ]);
    let id = ws.inbound("conductor:recovery_requested", r#"{"outcome":"failed"}"#);
    let status = wait_exit(&mut tap);
    assert!(status.success());
    let mut out = String::new();
    tap.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].contains("accepted") && lines[0].contains("emitter:job_completed"),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("inbound") && l.contains(&id)),
        "{out}"
    );
    // The dead letter comes after the third line's limit: ask again with a pack filter.
    let mut tap = start_tap(&ws, &["--pack", "recorder", "--json", "--limit", "2"]);
    let id = ws.inbound("conductor:recovery_requested", r#"{"outcome":"failed"}"#);
    assert!(wait_exit(&mut tap).success());
    let mut out = String::new();
    tap.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let stages: Vec<(String, String)> = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| {
            (
                v["stage"].as_str().unwrap().to_string(),
                v["event_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        stages,
        vec![
            ("delivered".to_string(), id.clone()),
            ("dead_lettered".to_string(), id)
        ],
        "{out}"
    );
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A tap that never reads: the agent keeps handling every event at its pace, its memory stays
/// within a bound, and a tap that reads late is told how many events it lost.
#[test]
fn a_tap_that_never_reads_neither_blocks_the_agent_nor_grows_its_memory() {
    let mut ws = Workspace::new(json!({}), "sink,bench");
    ws.start();
    let api = ws.api();
    let pid = ws.child.as_ref().unwrap().id();
    let addr = api.url.trim_start_matches("http://").to_string();
    let open_tap = || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "GET /v1/tap HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\r\n",
            api.token
        )
        .unwrap();
        s
    };
    // Warm up (SQLite cache, threads), then measure.
    let batch = |n: usize| -> Vec<Value> {
        (0..n)
            .map(|i| json!({"kind": "bench:ping", "payload": {"i": i, "pad": "x".repeat(200)}}))
            .collect()
    };
    for _ in 0..20 {
        assert_eq!(api.emit(batch(500)).status, 200);
    }
    wait_for("the warm-up handled", T, || {
        (ws.pack_status("sink")["handled"] == 10_000).then_some(())
    });
    let before = rss_kib(pid);
    let never = open_tap();
    let late = open_tap();
    wait_for("two taps attached", T, || {
        (ws.status()["taps"] == 2).then_some(())
    });
    let total = 100_000u64;
    for _ in 0..(total / 500) {
        assert_eq!(api.emit(batch(500)).status, 200);
    }
    wait_for("every event handled with the taps attached", T, || {
        (ws.pack_status("sink")["handled"] == 10_000 + total).then_some(())
    });
    let after = rss_kib(pid);
    let grown = after.saturating_sub(before);
    eprintln!("RSS {before} KiB before, {after} KiB after {total} events with a tap that never reads (+{grown} KiB)");
    assert!(grown < 64 * 1024, "memory grew by {grown} KiB");

    // The late reader finds the events its socket held, then how many it lost.
    let mut reader = std::io::BufReader::new(late);
    let mut lost = 0u64;
    let mut line = String::new();
    let deadline = Instant::now() + T;
    while lost == 0 && Instant::now() < deadline {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if let Some(rest) = line.split("\"lost\":").nth(1) {
            lost = rest
                .trim_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .unwrap_or(0);
        }
    }
    assert!(lost > 0, "the late tap is told it lost events");
    eprintln!("the late tap lost {lost} of {} entries", total * 3);
    drop(never);
    // The agent still serves.
    assert_eq!(ws.status()["packs"].as_array().unwrap().len(), 2);
}

/// `graph` for a workspace of 3 packs is DOT that Graphviz reads; `--format svg` renders it.
#[test]
fn graph_of_three_packs_parses_with_dot() {
    let ws = Workspace::new(json!({}), "");
    shop_pack(&ws);
    for (id, m) in [
        (
            "billing",
            json!({"id": "billing", "version": "1.0.0", "subscribed_event_kinds": ["shop:order_placed"],
            "emitted_event_kinds": ["billing:invoice_sent", "billing:tick"],
            "backpressure_policy": {"billing:invoice_sent": "queue", "billing:tick": "ephemeral"},
            "runtime": {"command": ["node", "w.mjs"]}}),
        ),
        (
            "audit",
            json!({"id": "audit", "version": "0.2.0", "subscribed_event_kinds": ["billing:invoice_sent", "conductor:recovery_requested"],
            "runtime": {"command": ["node", "w.mjs"]}}),
        ),
    ] {
        let dir = ws.path().join("packs").join(id);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
    }
    let out = ws.run(&["graph"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for needle in [
        "\"pack:shop\"",
        "\"pack:billing\" -> \"kind:billing:invoice_sent\"",
        "\"kind:shop:order_placed\" -> \"pack:billing\"",
        "\"kind:billing:tick\" -> upstream [label=\"ephemeral\", style=dashed]",
        "upstream -> \"kind:conductor:recovery_requested\"",
        "no handlers",
    ] {
        assert!(text.contains(needle), "{needle} in:\n{text}");
    }
    let mut dot = Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("Graphviz dot (installed by .ci/run)");
    dot.stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let rendered = dot.wait_with_output().unwrap();
    assert!(
        rendered.status.success(),
        "dot: {}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    assert!(String::from_utf8_lossy(&rendered.stdout).contains("<svg"));
    let svg = ws.path().join("routes.svg");
    let out = ws.run(&[
        "graph",
        "--format",
        "svg",
        "--output",
        svg.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(std::fs::read_to_string(&svg)
        .unwrap()
        .contains("billing:invoice_sent"));
}

/// Under a service manager: READY=1 on $NOTIFY_SOCKET and the --ready-file once the API
/// answers; STOPPING=1 and the file removed on SIGTERM; the log in --log-file, not stderr.
#[test]
fn readiness_and_the_log_file_serve_a_service_manager() {
    let mut ws = Workspace::new(json!({}), "recorder");
    let sock_path = ws.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    let ready = ws.path().join("ready.json");
    let log = ws.path().join("logs/agent.log");
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    let mut child = ws
        .cmd()
        .env("NOTIFY_SOCKET", &sock_path)
        .args(["start", "--ready-file"])
        .arg(&ready)
        .arg("--log-file")
        .arg(&log)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).expect("READY=1 within 30 s");
    assert_eq!(&buf[..n], b"READY=1");
    // Ready means the API answers now.
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
    assert_eq!(r["pid"], child.id());
    assert_eq!(ws.api().url, r["url"].as_str().unwrap());
    assert_eq!(ws.api().get("/v1/status").status, 200);
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let n = sock.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(wait_exit(&mut child).success());
    assert!(!ready.exists(), "the ready file is removed on exit");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("agent started") && text.contains("stopped"),
        "{text}"
    );
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        !stderr.contains("agent started"),
        "the log went to the file: {stderr}"
    );
    ws.child = None;
}

/// The words of `status` are true: a pack with nothing to run is `idle (no handlers)`; the
/// agent's own `agent:*` events are counted apart from inbound.
#[test]
fn status_says_idle_for_a_tools_only_pack_and_counts_agent_events_apart() {
    let mut ws = Workspace::new(json!({}), "recorder");
    shop_pack(&ws);
    ws.start();
    assert_eq!(ws.pack_status("shop")["state"], "idle");
    assert_eq!(ws.pack_status("recorder")["state"], "running");
    let out = ws.run(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let shop = text.lines().find(|l| l.starts_with("shop ")).unwrap();
    assert!(shop.contains("idle (no handlers)"), "{text}");
    // A crash publishes agent:pack_crashed: not an inbound event from outside.
    ws.inbound(
        "conductor:recovery_requested",
        r#"{"panic_until_attempt": 2}"#,
    );
    let s = wait_for("the crash's agent:* event counted", T, || {
        let s = ws.status();
        (s["inbound"]["agent"].as_u64().unwrap_or(0) >= 1).then_some(s)
    });
    assert_eq!(s["inbound"]["accepted"], 1, "{}", s["inbound"]);
    wait_for("handled on the second attempt", T, || {
        (ws.pack_status("recorder")["handled"] == 1).then_some(())
    });
    // Rates: one second after, events/s over 10 s are there.
    let s = ws.status();
    assert!(
        s["rates"]["10s"]["inbound"].as_f64().is_some(),
        "{}",
        s["rates"]
    );
}

/// Upstream state words: `connecting` with a dated last error while the control plane is down,
/// `connected` with no error once an exchange succeeded; `enroll` says what the running agent
/// will do.
#[test]
fn upstream_state_words_are_true_and_enroll_says_what_happens() {
    let mut ws = Workspace::new(json!({}), "");
    let mut c = Conductor::start(ws.path(), "tok-1");
    let said = enroll_at(&ws, &c.url(), "tok-1");
    assert!(said.contains("connects to it when it starts"), "{said}");
    c.kill();
    ws.start();
    let s = wait_for("the failed heartbeat", T, || {
        let s = ws.status();
        s["upstream"]["last_error"].is_string().then_some(s)
    });
    assert_ne!(s["upstream"]["state"], "connected", "{}", s["upstream"]);
    assert!(s["upstream"]["last_error_ms"].as_i64().unwrap() > 0);
    let text = String::from_utf8_lossy(&ws.run(&["status"]).stdout).into_owned();
    assert!(
        text.contains("(connecting;") && text.contains("ago:"),
        "{text}"
    );
    c.restart();
    let s = wait_for(
        "connected after the conductor is back",
        Duration::from_secs(60),
        || {
            let s = ws.status();
            (s["upstream"]["state"] == "connected").then_some(s)
        },
    );
    assert!(s["upstream"]["last_error"].is_null(), "{}", s["upstream"]);
    // Re-enrolled at the same endpoint: picked up by the running agent.
    let said = enroll_at(&ws, &c.url(), "tok-1");
    assert!(said.contains("no restart needed"), "{said}");
    let said = enroll_at(&ws, "http://127.0.0.1:9", "tok-1");
    assert!(said.contains("restart it to connect"), "{said}");
}

/// `status` (and so `top`) shows what a handler works on now and for how long, and when an
/// event it asked to retry is tried again.
#[test]
fn status_shows_what_is_in_flight_and_when_a_retry_comes() {
    let mut ws = Workspace::new(json!({}), "recorder");
    ws.start_with_env(&[("LUMENFLOW_AGENT_BACKOFF_BASE_MS", "400")]);
    ws.inbound("conductor:recovery_requested", r#"{"sleep_ms": 1500}"#);
    let p = wait_for("the slow event in flight for a while", T, || {
        let p = ws.pack_status("recorder");
        (p["in_flight_age_s"].as_f64().unwrap_or(0.0) > 0.3).then_some(p)
    });
    assert_eq!(p["in_flight"], 1, "{p}");
    wait_for("handled", T, || {
        (ws.pack_status("recorder")["handled"] == 1).then_some(())
    });
    assert_eq!(ws.pack_status("recorder")["in_flight"], 0);
    ws.inbound("conductor:recovery_requested", r#"{"outcome": "retry"}"#);
    let p = wait_for("a retry announced", T, || {
        let p = ws.pack_status("recorder");
        p["next_retry_in_s"]
            .as_f64()
            .filter(|s| *s > 0.0)
            .map(|_| p)
    });
    assert!(p["next_retry_in_s"].as_f64().unwrap() <= 0.8, "{p}");
    wait_for("dead-lettered after its attempts", T, || {
        (ws.pack_status("recorder")["dead_lettered"] == 1).then_some(())
    });
    assert!(ws.pack_status("recorder")["next_retry_in_s"].is_null());
}
