//! Hostile input and resource limits, end to end: what one bad worker, manifest or local
//! process can do to the real agent binary (issue 20). Each test is one attack and what must
//! hold under it: no freeze, no unbounded memory, nothing reached that should not be.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

fn agent_pid(ws: &Workspace) -> u32 {
    ws.child.as_ref().expect("agent running").id()
}

/// A process's peak resident memory, in MB.
fn peak_rss_mb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

fn read_pid(file: &Path) -> i32 {
    wait_for("a pid file", T, || {
        std::fs::read_to_string(file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    })
}

/// Answers `initialize`; `on_handle(msg)` is the script's own.
const SERVE: &str = r#"
import { createInterface } from 'node:readline';
const send = (m) => process.stdout.write(JSON.stringify({jsonrpc: '2.0', ...m}) + '\n');
createInterface({ input: process.stdin }).on('line', (line) => {
  const msg = JSON.parse(line);
  if (msg.method === 'initialize') { send({ id: msg.id, result: { handles: ['conductor:recovery_requested'] } }); return onInit(); }
  if (msg.method === 'handle') return onHandle(msg);
});
"#;

fn script(body: &str) -> String {
    format!("{SERVE}\n{body}")
}

#[test]
fn a_worker_stderr_of_any_bytes_never_stops_the_log_nor_grows_the_agent() {
    let mut ws = Workspace::new(json!({}), "");
    raw_pack(
        &ws,
        "noisy",
        &script(
            r#"
function onHandle() {}
function onInit() {
  process.stderr.write(Buffer.from([0xff, 0xfe, 0x0a]));
  for (let i = 0; i < 200; i++) process.stderr.write(`line ${i}\n`);
  // 64 MiB without a newline, then one more line.
  const chunk = Buffer.alloc(1 << 20, 0x61);
  let left = 64;
  const more = () => { while (left > 0) { left--; if (!process.stderr.write(chunk)) return process.stderr.once('drain', more); } process.stderr.write('\nafter the flood\n'); };
  more();
}
"#,
        ),
        json!({}),
    );
    ws.start();
    wait_for(
        "the line after the flood in the log",
        Duration::from_secs(60),
        || ws.log().contains("after the flood").then_some(()),
    );
    let log = ws.log();
    let lines = (0..200)
        .filter(|i| log.contains(&format!("worker: line {i} ")))
        .count();
    assert_eq!(
        lines,
        200,
        "every line after a non-UTF-8 byte is logged: {}",
        &log[..log.len().min(3000)]
    );
    assert!(log.contains("line cut"), "the long line is marked as cut");
    let peak = peak_rss_mb(agent_pid(&ws));
    assert!(
        peak < 100,
        "agent peak RSS {peak} MB after 64 MiB of stderr"
    );
    assert_eq!(ws.pack_status("noisy")["state"], "running");
    assert_eq!(ws.terminate(), Some(0));
}

#[test]
fn a_worker_whose_child_holds_its_stdout_is_seen_to_exit_and_its_group_dies() {
    let mut ws = Workspace::new(
        json!({"supervision": {"max_restarts": 5, "window_s": 60}}),
        "",
    );
    let pids = ws.path().join("pids");
    std::fs::create_dir_all(&pids).unwrap();
    raw_pack(
        &ws,
        "forker",
        &script(&format!(
            r#"
import {{ spawn }} from 'node:child_process';
import {{ writeFileSync, existsSync }} from 'node:fs';
function onInit() {{
  // A child that inherits stdout and stderr: the pipes stay open after this worker exits.
  const c = spawn('sleep', ['300'], {{ stdio: ['ignore', 'inherit', 'inherit'] }});
  const first = !existsSync('{dir}/1');
  writeFileSync(first ? '{dir}/1' : '{dir}/2', String(c.pid));
}}
function onHandle(msg) {{
  if (msg.params.delivery.attempt === 1) process.exit(3);
  send({{ id: msg.id, result: {{ status: 'handled' }} }});
}}
"#,
            dir = pids.display()
        )),
        json!({"runtime": {"command": ["node", "worker.mjs"], "timeout_ms": 25000}}),
    );
    ws.start();
    let first = read_pid(&pids.join("1"));
    ws.inbound("conductor:recovery_requested", "{}");
    // Seen by its pid at once, not after the 25 s handler timeout.
    let began = Instant::now();
    let p = wait_for("the crash", T, || {
        let p = ws.pack_status("forker");
        p["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("exit status: 3"))
            .then_some(p)
    });
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "took {:?}: {p}",
        began.elapsed()
    );
    wait_for("the first worker's child killed with it", T, || {
        process_gone(first).then_some(())
    });
    // The restarted worker handles the redelivery; its child dies with the agent's clean exit.
    wait_for("the redelivery handled", T, || {
        (ws.pack_status("forker")["handled"] == 1).then_some(())
    });
    let second = read_pid(&pids.join("2"));
    assert!(!process_gone(second));
    assert_eq!(ws.terminate(), Some(0));
    wait_for("the child killed at the agent's exit", T, || {
        process_gone(second).then_some(())
    });
}

#[test]
fn workers_get_a_clean_environment() {
    let mut ws = Workspace::new(json!({}), "");
    let out = ws.path().join("env.json");
    raw_pack(
        &ws,
        "envy",
        &script(&format!(
            "import {{ writeFileSync }} from 'node:fs';\nfunction onHandle() {{}}\nfunction onInit() {{ writeFileSync('{}', JSON.stringify(process.env)); }}",
            out.display()
        )),
        json!({
            "runtime": {"command": ["node", "worker.mjs"], "env": {"FROM_MANIFEST": "m"}},
            "tools": [{"name": "t", "entry": "worker.mjs", "required_env": ["MY_API_KEY"]}]
        }),
    );
    ws.start_with_env(&[
        ("LUMENFLOW_CONTROL_PLANE_TOKEN", "s3cret-control-plane"),
        ("AWS_SECRET_ACCESS_KEY", "s3cret-aws"),
        ("MY_API_KEY", "declared"),
        ("LC_ALL", "C.UTF-8"),
    ]);
    let env: Value = wait_for("the worker's environment", T, || {
        serde_json::from_str(&std::fs::read_to_string(&out).ok()?).ok()
    });
    assert!(env.get("LUMENFLOW_CONTROL_PLANE_TOKEN").is_none(), "{env}");
    assert!(env.get("AWS_SECRET_ACCESS_KEY").is_none(), "{env}");
    assert_eq!(env["MY_API_KEY"], "declared", "required_env is passed");
    assert_eq!(env["FROM_MANIFEST"], "m", "runtime.env is passed");
    assert_eq!(env["LUMENFLOW_PACK_ID"], "envy");
    assert_eq!(env["LC_ALL"], "C.UTF-8");
    assert!(env.get("PATH").is_some());
    assert_eq!(ws.terminate(), Some(0));
}

#[test]
fn an_idle_worker_that_dies_is_not_shown_running() {
    let mut ws = Workspace::new(
        json!({"supervision": {"max_restarts": 1, "window_s": 60}}),
        "",
    );
    raw_pack(
        &ws,
        "quitter",
        &script(
            "function onHandle() {}\nfunction onInit() { setTimeout(() => process.exit(7), 300); }",
        ),
        json!({}),
    );
    ws.start();
    let p = wait_for("the idle worker's exit seen", T, || {
        let p = ws.pack_status("quitter");
        p["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("exit status: 7"))
            .then_some(p)
    });
    assert_ne!(p["state"], "running", "{p}");
    assert_eq!(ws.terminate(), Some(0));
}

/// A worker confined by its manifest's `required_scopes` tries to leave them.
#[test]
fn a_confined_worker_is_refused_by_the_kernel_outside_its_scopes() {
    if lumenflow_agent::actors::sandbox::landlock_abi() < 1 {
        eprintln!("SKIPPED: this kernel has no Landlock; confinement cannot be tested here");
        return;
    }
    let mut ws = Workspace::new(json!({}), "");
    let root = ws.path().to_path_buf();
    std::fs::create_dir_all(root.join("data")).unwrap();
    std::fs::create_dir_all(root.join("out")).unwrap();
    std::fs::write(root.join("data/ok.txt"), "fine").unwrap();
    std::fs::write(root.join("secret.txt"), "top secret").unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    raw_pack(
        &ws,
        "jailed",
        &script(&format!(
            r#"
import {{ readFileSync, writeFileSync }} from 'node:fs';
import net from 'node:net';
import dgram from 'node:dgram';
const tryIt = (f) => {{ try {{ return f(); }} catch (e) {{ return e.code || String(e); }} }};
function onHandle() {{}}
function onInit() {{
  const r = {{
    data: tryIt(() => readFileSync('{root}/data/ok.txt', 'utf8')),
    secret: tryIt(() => readFileSync('{root}/secret.txt', 'utf8')),
    shadow: tryIt(() => readFileSync('/etc/shadow', 'utf8').slice(0, 4)),
    home: tryIt(() => readFileSync('{root}/.lumenflow/agent.json', 'utf8')),
    write_out: tryIt(() => {{ writeFileSync('{root}/out/w.txt', 'x'); return 'ok'; }}),
    write_data: tryIt(() => {{ writeFileSync('{root}/data/w.txt', 'x'); return 'ok'; }}),
  }};
  const s = net.connect({port}, '127.0.0.1');
  s.on('connect', () => {{ r.tcp = 'connected'; done(); }});
  s.on('error', (e) => {{ r.tcp = e.code; done(); }});
  const u = dgram.createSocket('udp4');
  u.on('error', (e) => {{ r.udp = e.code; done(); }});
  u.on('listening', () => {{ r.udp = 'bound'; done(); }});
  u.bind(0);
  function done() {{ if (r.tcp && r.udp) writeFileSync('{root}/out/result.json', JSON.stringify(r)); }}
}}
"#,
            root = root.display()
        )),
        json!({"tools": [{"name": "t", "entry": "worker.mjs", "permission": "read", "required_scopes": [
            {"type": "path", "pattern": "data/**", "access": "read"},
            {"type": "path", "pattern": "out/**", "access": "write"}
        ]}]}),
    );
    raw_pack(
        &ws,
        "allowlisted",
        &script("function onHandle() {}\nfunction onInit() {}"),
        json!({"tools": [{"name": "t", "entry": "worker.mjs", "required_scopes": [
            {"type": "network", "posture": "allowlist", "allowlist_entries": ["api.example.com:443"]}
        ]}]}),
    );
    ws.start();
    let r: Value = wait_for("the confined worker's findings", T, || {
        if ws.log().contains("jailed") && ws.pack_status("jailed")["last_error"].is_string() {
            panic!("{}\n{}", ws.pack_status("jailed"), ws.log());
        }
        serde_json::from_str(&std::fs::read_to_string(root.join("out/result.json")).ok()?).ok()
    });
    assert_eq!(r["data"], "fine", "a declared read path is readable: {r}");
    assert_eq!(
        r["write_out"], "ok",
        "a declared write path is writable: {r}"
    );
    for denied in ["secret", "shadow", "home", "write_data"] {
        assert_eq!(r[denied], "EACCES", "{denied}: {r}");
    }
    assert_eq!(r["tcp"], "EACCES", "posture off: no TCP socket: {r}");
    assert_eq!(r["udp"], "EACCES", "posture off: no UDP socket: {r}");
    let p = ws.pack_status("jailed");
    assert!(
        p["sandbox"]
            .as_str()
            .is_some_and(|s| s.contains("network off")),
        "{p}"
    );
    // An allowlist names hosts, which the kernel cannot check: not started.
    let a = wait_for("the allowlisted pack refused", T, || {
        let a = ws.pack_status("allowlisted");
        a["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot be enforced"))
            .then_some(a)
    });
    assert_eq!(
        a["state"], "invalid",
        "refused for good, not restarted: {a}"
    );
    assert_eq!(a["restarts"], 0, "{a}");
    assert!(
        a["last_error"]
            .as_str()
            .unwrap()
            .contains("api.example.com:443"),
        "{a}"
    );
    assert!(ws.status()["limits"]["sandbox_support"]
        .as_str()
        .unwrap()
        .contains("Landlock ABI"));
    drop(listener);
    assert_eq!(ws.terminate(), Some(0));
}

/// Sends raw bytes and reads the reply (or what there is within `wait`).
fn raw_request(addr: &str, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn a_flood_of_idle_and_slow_connections_is_shed_and_never_starves_a_client() {
    let mut ws = Workspace::new(json!({}), "recorder");
    ws.start();
    let api = ws.api();
    let addr = api.url.trim_start_matches("http://").to_string();
    let rss_before = peak_rss_mb(agent_pid(&ws));
    // 1,100 idle connections (more than the common fd limit of 1024), 50 with half a
    // request head, 10 authorized ones with half a body.
    let mut flood: Vec<TcpStream> = (0..1100)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    for _ in 0..50 {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            .unwrap();
        flood.push(s);
    }
    let mut half_bodies = Vec::new();
    for _ in 0..10 {
        let mut s = TcpStream::connect(&addr).unwrap();
        write!(s, "POST /v1/inbound HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{{\"events\": [", api.token).unwrap();
        half_bodies.push(s);
    }
    // Authorized requests are served at once meanwhile.
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(api.get("/v1/status").status, 200);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
    let st = ws.status();
    assert!(
        st["api"]["connections"].as_u64().unwrap() >= 1100,
        "{}",
        st["api"]
    );
    // Hosts that only start like a loopback one, and two Host headers, are refused.
    for host in ["127.0.0.1:evil.com", "127.0.0.1:80@evil.com"] {
        let reply = raw_request(
            &addr,
            format!("GET /v1/status HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n", api.token).as_bytes(),
            Duration::from_secs(5),
        );
        assert!(reply.starts_with("HTTP/1.1 403"), "{host}: {reply}");
    }
    let reply = raw_request(
        &addr,
        format!("GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.com\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n", api.token).as_bytes(),
        Duration::from_secs(5),
    );
    assert!(
        reply.starts_with("HTTP/1.1 403"),
        "two Host headers: {reply}"
    );
    // The half bodies get 408 after the body timeout (15 s); everything idle or half a head is
    // closed by the server after the header timeout (10 s).
    for mut s in half_bodies {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    }
    for s in &mut flood {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 64];
        assert!(
            matches!(s.read(&mut buf), Ok(0) | Err(_)),
            "closed by the agent"
        );
    }
    wait_for("the flood's connections closed", T, || {
        (ws.status()["api"]["connections"].as_u64() == Some(1)).then_some(())
    });
    drop(flood);
    eprintln!(
        "agent RSS peak before the flood {rss_before} MB, after {} MB",
        peak_rss_mb(agent_pid(&ws))
    );
    assert_eq!(ws.terminate(), Some(0));
}

#[test]
fn a_deeply_nested_manifest_is_refused_without_freezing_the_agent() {
    let mut ws = Workspace::new(json!({}), "recorder");
    ws.start();
    let api = ws.api();
    let dir = ws.path().join("packs/deep");
    std::fs::create_dir_all(&dir).unwrap();
    let d = 200_000;
    std::fs::write(
        dir.join("manifest.yaml"),
        format!(
            "id: deep\nversion: 1.0.0\nx: {}{}\n",
            "[".repeat(d),
            "]".repeat(d)
        ),
    )
    .unwrap();
    // The API answers throughout the reload (it used to freeze for 69 s on 400 KB).
    let began = Instant::now();
    let mut slowest = Duration::ZERO;
    let err = loop {
        let t = Instant::now();
        assert_eq!(api.get("/v1/status").status, 200);
        slowest = slowest.max(t.elapsed());
        if let Some(e) = ws.status()["reload"]["last_error"].as_str() {
            if e.contains("levels deep") {
                break e.to_string();
            }
        }
        assert!(began.elapsed() < T, "no reload error");
    };
    assert!(
        slowest < Duration::from_secs(1),
        "slowest status: {slowest:?}"
    );
    assert!(err.contains("packs/deep/manifest.yaml"), "{err}");
    assert_eq!(ws.terminate(), Some(0));
}

#[test]
fn the_open_files_limit_is_raised_and_shown() {
    let mut ws = Workspace::new(json!({}), "");
    start_with_soft_nofile(&mut ws, 256);
    let files = ws.status()["limits"]["open_files"].clone();
    assert_eq!(files["started_with"], 256, "{files}");
    assert_eq!(files["limit"], files["hard"], "{files}");
    assert_eq!(ws.terminate(), Some(0));
}

/// Starts the test agent with a soft open-files limit of `soft` (the hard one unchanged).
fn start_with_soft_nofile(ws: &mut Workspace, soft: u64) {
    use std::os::unix::process::CommandExt;
    let log = std::fs::File::create(ws.path().join("agent.log")).unwrap();
    let mut cmd = ws.cmd();
    unsafe {
        cmd.pre_exec(move || {
            let mut l = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
            l.rlim_cur = soft.min(l.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
            Ok(())
        });
    }
    let child = cmd
        .arg("start")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    ws.child = Some(child);
    let api = ws.api_file();
    wait_for("api.json", Duration::from_secs(60), || {
        api.exists().then_some(())
    });
}

/// A worker in `sh`: answers `initialize` (no handlers) and `shutdown`.
const SH_WORKER: &str = r#"while IFS= read -r line; do
  id=${line#*\"id\":}; id=${id%%,*}
  case "$line" in
    *'"initialize"'*) printf '{"jsonrpc":"2.0","id":%s,"result":{"handles":[]}}\n' "$id" ;;
    *'"shutdown"'*) printf '{"jsonrpc":"2.0","id":%s,"result":null}\n' "$id"; exit 0 ;;
  esac
done
"#;

#[test]
fn four_hundred_exec_packs_start_under_a_soft_limit_of_1024_files() {
    let mut ws = Workspace::new(json!({}), "");
    let n = 400;
    for i in 0..n {
        let dir = ws.path().join(format!("packs/sh-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("manifest.json"),
            json!({"id": format!("sh-{i}"), "version": "0.1.0", "runtime": {"command": ["sh", "worker.sh"]}})
                .to_string(),
        )
        .unwrap();
        std::fs::write(dir.join("worker.sh"), SH_WORKER).unwrap();
    }
    start_with_soft_nofile(&mut ws, 1024);
    let st = wait_for("every pack running", Duration::from_secs(60), || {
        let st = ws.status();
        let running = st["packs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["state"] == "running" && p["last_error"].is_null())
            .count();
        (running == n).then_some(st)
    });
    let files = &st["limits"]["open_files"];
    assert_eq!(files["started_with"], 1024, "{files}");
    assert!(files["limit"].as_u64().unwrap() >= 4096, "{files}");
    assert_eq!(ws.terminate(), Some(0));
}

#[test]
fn when_the_os_refuses_to_watch_manifests_edits_still_apply_and_status_says_so() {
    let probe = std::process::Command::new("unshare")
        .args([
            "-r",
            "sh",
            "-c",
            "echo 0 > /proc/sys/user/max_inotify_instances",
        ])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: no unprivileged user namespace with its own inotify limit here");
        return;
    }
    let mut ws = Workspace::new(json!({}), "recorder");
    let log = std::fs::File::create(ws.path().join("agent.log")).unwrap();
    let agent = ws.cmd().get_program().to_owned();
    let cmd = ws.cmd();
    // The same command, inside a user namespace allowed no inotify instance at all.
    let child = std::process::Command::new("unshare")
        .args([
            "-r",
            "sh",
            "-c",
            "echo 0 > /proc/sys/user/max_inotify_instances && exec \"$@\"",
            "sh",
        ])
        .arg(agent)
        .arg("start")
        .envs(
            cmd.get_envs()
                .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))),
        )
        .current_dir(ws.path())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    ws.child = Some(child);
    let api = ws.api_file();
    wait_for("api.json", T, || api.exists().then_some(()));
    let reload = ws.status()["reload"].clone();
    assert_eq!(reload["watching"], false, "{reload}");
    assert!(
        reload["off"]
            .as_str()
            .is_some_and(|s| s.contains("every 2 s")),
        "{reload}"
    );
    // A pack added now is started all the same.
    let dir = ws.path().join("packs/late");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("manifest.json"),
        json!({"id": "late", "version": "0.1.0"}).to_string(),
    )
    .unwrap();
    // (No runtime, no subscriptions: it has nothing to run, so `idle`.)
    wait_for("the new pack started by polling", T, || {
        (ws.pack_status("late")["state"] == "idle").then_some(())
    });
    assert_eq!(ws.terminate(), Some(0));
}

#[test]
fn a_pack_with_too_many_kinds_is_refused_with_the_reason() {
    let mut ws = Workspace::new(json!({}), "");
    let dir = ws.path().join("packs/greedy");
    std::fs::create_dir_all(&dir).unwrap();
    let kinds: Vec<String> = (0..33_000).map(|i| format!("conductor:k{i}")).collect();
    std::fs::write(
        dir.join("manifest.json"),
        json!({"id": "greedy", "version": "0.1.0", "subscribed_event_kinds": kinds}).to_string(),
    )
    .unwrap();
    let out = ws.run(&["validate"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Too many kinds: 33000 listed"), "{text}");
    ws.start();
    let reload = ws.status()["reload"].clone();
    assert!(
        reload["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("Too many kinds")),
        "{reload}"
    );
    assert_eq!(ws.terminate(), Some(0));
}

#[test]
fn a_day_of_retry_after_does_not_stall_forwarding() {
    let mut ws = Workspace::new(json!({}), "emitter");
    let c = Conductor::start(ws.path(), "tok");
    enroll(&ws, &c, "tok");
    c.admin(
        "/admin/faults",
        Some(json!({"status": 429, "retry_after": 86400})),
    );
    ws.start();
    let r = ws.api().emit(vec![
        json!({"kind": "emitter:job_completed", "payload": {"n": 1}}),
    ]);
    assert_eq!(r.status, 200);
    wait_for("the 429 seen", T, || {
        let s = ws.status();
        s["upstream"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("429"))
            .then_some(())
    });
    let refused_at = Instant::now();
    c.admin("/admin/faults", Some(json!({})));
    wait_for(
        "delivered within the backoff's cap",
        Duration::from_secs(45),
        || (c.received().len() == 1).then_some(()),
    );
    assert!(refused_at.elapsed() < Duration::from_secs(40));
    assert_eq!(ws.terminate(), Some(0));
}

#[test]
fn validate_says_what_confines_a_pack_and_refuses_what_cannot_be_enforced() {
    let ws = Workspace::new(json!({}), "");
    let scopes = |network: Value| {
        json!({"tools": [{"name": "t", "entry": "worker.mjs", "required_scopes": [
            {"type": "path", "pattern": "docs/**", "access": "read"}, network]}]})
    };
    raw_pack(
        &ws,
        "offline",
        "",
        scopes(json!({"type": "network", "posture": "off"})),
    );
    let out = ws.run(&["validate"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if lumenflow_agent::actors::sandbox::landlock_abi() < 1 {
        assert!(text.contains("no Landlock"), "{text}");
        return;
    }
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("confined: files: read 1 + system") && text.contains("network off"),
        "{text}"
    );
    raw_pack(
        &ws,
        "listed",
        "",
        scopes(
            json!({"type": "network", "posture": "allowlist", "allowlist_entries": ["x.example:443"]}),
        ),
    );
    let out = ws.run(&["validate"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("packs/listed/manifest.json: tools[].required_scopes: the manifest's required_scopes cannot be enforced here: network posture allowlist (x.example:443)"),
        "{text}"
    );
    assert!(!text.contains("worker was not started"), "{text}");
}
