//! `cargo run --release -p lumenflow-bench [-- --quick] [-- --runs N]`
//!
//! Runs the release `lumenflow-test-agent` (the agent with native test packs) against
//! temporary workspaces and prints one table of medians (3 runs of each throughput scenario;
//! 1 with `--quick`), each row with its durability setting and, where there is one, the
//! baseline or peer measured in the same run on the same machine:
//!
//! - baselines: raw SQLite batched inserts of the same event bodies (500 per transaction), WAL,
//!   at the same `synchronous` setting (the durable limit of one SQLite writer); a raw loopback
//!   HTTP sink taking the same batches from the same client (the transport limit);
//! - peers a user might use as a local durable buffer instead (`peers.rs`): Redis Streams with
//!   `appendfsync always` and `everysec`, NATS JetStream with file storage, publish acked;
//! - queue kind end to end: local API (batches of 100 and of 1, 4 clients) -> durable commit ->
//!   producer acknowledged -> upstream acknowledged (mem:inbox, and the development conductor
//!   over loopback HTTP) -> removed from the outbox;
//! - ephemeral end to end: local API -> memory ring -> upstream;
//! - inbound -> native handler with replay dedupe, replay log at 0 and at 1M entries;
//! - inbound -> Node exec handler;
//! - emit -> upstream latency p50/p99 at a fixed 10k events/s (conductor);
//! - hot reload, crash -> next event, `status`, start-up, idle RSS with 10 packs, RSS per pack.

mod peers;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Row {
    scenario: String,
    durability: &'static str,
    value: f64,
    unit: &'static str,
    baseline: Option<(String, f64)>,
    target: &'static str,
}

fn agent_bin() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "lumenflow-agent",
            "--bins",
            "--features",
            "test-agent",
        ])
        .current_dir(&root)
        .status()
        .expect("cargo build");
    assert!(status.success(), "building the agent failed");
    root.join("target/release/lumenflow-test-agent")
}

struct Agent {
    child: Child,
    dir: PathBuf,
    url: String,
    token: String,
    bin: PathBuf,
    packs: String,
}

impl Agent {
    fn start(bin: &Path, dir: &Path, packs: &str) -> Agent {
        let started = Instant::now();
        let _ = std::fs::remove_file(dir.join(".lumenflow/state/agent/api.json"));
        let child = Command::new(bin)
            .arg("start")
            .current_dir(dir)
            .env("LUMENFLOW_AGENT_NO_USER_CONFIG", "1")
            .env("LUMENFLOW_TEST_PACKS", packs)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn agent");
        let api = dir.join(".lumenflow/state/agent/api.json");
        while !api.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "agent did not start"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&api).unwrap()).unwrap();
        Agent {
            child,
            dir: dir.to_path_buf(),
            url: v["url"].as_str().unwrap().into(),
            token: v["token"].as_str().unwrap().into(),
            bin: bin.to_path_buf(),
            packs: packs.into(),
        }
    }

    fn http() -> ureq::Agent {
        ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            .build()
            .into()
    }

    fn post(&self, http: &ureq::Agent, path: &str, body: String) -> (u16, String) {
        post_to(http, &self.url, &self.token, path, body)
    }

    fn status(&self, http: &ureq::Agent) -> Value {
        let mut r = http
            .get(format!("{}/v1/status", self.url))
            .header("authorization", format!("Bearer {}", self.token))
            .call()
            .expect("status");
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
    }

    fn wait_until(&self, what: &str, f: impl Fn(&Value) -> bool) {
        let http = Self::http();
        let deadline = Instant::now()
            + Duration::from_secs(
                std::env::var("BENCH_WAIT_S")
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(600),
            );
        loop {
            let status = self.status(&http);
            if f(&status) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; status: {status}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn rss_anon_kb(&self) -> u64 {
        anon_kb(self.child.id())
    }

    fn rss_kb(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// CPU time (user + system) the agent process has used, in seconds.
    fn cpu_s(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        ticks / 100.0
    }

    fn stop(mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }

    fn cli_status_ms(&self) -> f64 {
        let mut times: Vec<f64> = (0..20)
            .map(|_| {
                let t = Instant::now();
                let out = Command::new(&self.bin)
                    .args(["status", "--json"])
                    .current_dir(&self.dir)
                    .env("LUMENFLOW_TEST_PACKS", &self.packs)
                    .output()
                    .unwrap();
                assert!(out.status.success());
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        median(&mut times)
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn workspace(config: Value) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("lf-bench")
        .tempdir()
        .unwrap();
    std::fs::create_dir_all(d.path().join(".lumenflow")).unwrap();
    std::fs::write(d.path().join(".lumenflow/agent.json"), config.to_string()).unwrap();
    d
}

fn body(kind: &str, from: usize, n: usize) -> String {
    let events: Vec<Value> = (from..from + n)
        .map(|i| json!({"kind": kind, "payload": {"job_id": format!("job-{i}"), "result": "ok", "seq": i}}))
        .collect();
    json!({"events": events}).to_string()
}

fn post_to(http: &ureq::Agent, url: &str, token: &str, path: &str, body: String) -> (u16, String) {
    let mut r = http
        .post(format!("{url}{path}"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .send(body)
        .expect("post");
    (
        r.status().as_u16(),
        r.body_mut().read_to_string().unwrap_or_default(),
    )
}

/// Posts `total` events in batches of `batch` from `clients` threads to `url` (the agent, or
/// the raw HTTP sink); returns seconds.
/// Returns when the first request was sent (request bodies are built before) and the seconds
/// the sending took.
fn blast(
    agent: &Agent,
    path: &str,
    kind: &str,
    total: usize,
    batch: usize,
    clients: usize,
) -> (Instant, f64) {
    blast_to(&agent.url, &agent.token, path, kind, total, batch, clients)
}

/// `n` more `bench:ping` events inbound to the `sink` pack (which has handled `done` so far),
/// batches of 100 from 4 clients: events/s from the first request to the last one handled.
fn inbound_to_sink(agent: &Agent, n: usize, done: &mut u64) -> f64 {
    let (t0, _) = blast(agent, "/v1/inbound", "bench:ping", n, 100, 4);
    *done += n as u64;
    let done = *done;
    agent.wait_until("sink handled all", |s| {
        s["packs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == "sink" && p["handled"].as_u64().unwrap() >= done)
    });
    n as f64 / t0.elapsed().as_secs_f64()
}

fn blast_to(
    url: &str,
    token: &str,
    path: &str,
    kind: &str,
    total: usize,
    batch: usize,
    clients: usize,
) -> (Instant, f64) {
    blast_with(url, token, path, kind, total, batch, clients, false)
}

/// [`blast_to`]; `raw`: each client is a [`peers::RawHttp`] connection instead of `ureq`.
#[allow(clippy::too_many_arguments)]
fn blast_with(
    url: &str,
    token: &str,
    path: &str,
    kind: &str,
    total: usize,
    batch: usize,
    clients: usize,
    raw: bool,
) -> (Instant, f64) {
    let per = total / clients;
    // Request bodies are built before the clock starts, as the peers' are.
    let bodies: Vec<Vec<(usize, String)>> = (0..clients)
        .map(|c| {
            (0..per)
                .step_by(batch)
                .map(|sent| {
                    let n = batch.min(per - sent);
                    (n, body(kind, c * per + sent, n))
                })
                .collect()
        })
        .collect();
    let t = Instant::now();
    std::thread::scope(|s| {
        for mine in &bodies {
            s.spawn(move || {
                let http = Agent::http();
                let mut conn = raw.then(|| peers::RawHttp::connect(url));
                for (_, b) in mine {
                    loop {
                        let (status, text) = match &mut conn {
                            Some(c) => c.post(path, token, b),
                            None => post_to(&http, url, token, path, b.clone()),
                        };
                        if status == 429 {
                            std::thread::sleep(Duration::from_millis(50));
                            continue;
                        }
                        assert_eq!(status, 200, "{text}");
                        break;
                    }
                }
            });
        }
    });
    (t, t.elapsed().as_secs_f64())
}

/// Raw SQLite: the same bodies inserted in transactions of `batch`, one connection.
fn sqlite_baseline(n: usize, batch: usize, synchronous: &str) -> f64 {
    let d = tempfile::tempdir().unwrap();
    let c = rusqlite::Connection::open(d.path().join("b.db")).unwrap();
    c.pragma_update(None, "journal_mode", "WAL").unwrap();
    c.pragma_update(None, "synchronous", synchronous).unwrap();
    c.execute_batch("CREATE TABLE outbox(seq INTEGER PRIMARY KEY, event_id TEXT, kind TEXT, created_ms INTEGER, body TEXT)")
        .unwrap();
    let bodies: Vec<(String, String)> = (0..n)
        .map(|i| {
            let id = uuid::Uuid::now_v7().to_string();
            let b = json!({"schema_version": 2, "event_id": id, "kind": "bench:ping", "timestamp": "2026-04-20T00:00:00.000Z",
                "from": "bench", "payload": {"job_id": format!("job-{i}"), "result": "ok", "seq": i}})
            .to_string();
            (id, b)
        })
        .collect();
    let t = Instant::now();
    for chunk in bodies.chunks(batch) {
        let tx = c.unchecked_transaction().unwrap();
        {
            let mut st = tx.prepare_cached("INSERT INTO outbox(event_id, kind, created_ms, body) VALUES (?1, 'bench:ping', 0, ?2)").unwrap();
            for (id, b) in chunk {
                st.execute(rusqlite::params![id, b]).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// Fills the replay log of `pack` with `n` entries (random v4 ids, as a conductor's would be).
fn prefill_replay(dir: &Path, pack: &str, n: usize) {
    let c = rusqlite::Connection::open(dir.join(".lumenflow/state/agent/agent.db")).unwrap();
    let mut keys: Vec<String> = (0..n)
        .map(|_| format!("event:{}", uuid::Uuid::new_v4()))
        .collect();
    keys.sort();
    let tx = c.unchecked_transaction().unwrap();
    {
        let mut st = tx
            .prepare("INSERT INTO replay_log(pack, key, recorded_ms) VALUES (?1, ?2, ?3)")
            .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        for k in &keys {
            st.execute(rusqlite::params![pack, k, now]).unwrap();
        }
    }
    tx.commit().unwrap();
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Posts one inbound event and waits until its id appears in `effects`; milliseconds.
fn time_to_effect(
    agent: &Agent,
    http: &ureq::Agent,
    kind: &str,
    payload: Value,
    effects: &Path,
) -> f64 {
    let t = Instant::now();
    let (status, text) = agent.post(
        http,
        "/v1/inbound",
        json!({"events": [{"kind": kind, "payload": payload}]}).to_string(),
    );
    assert_eq!(status, 200, "{text}");
    let id = serde_json::from_str::<Value>(&text).unwrap()["event_ids"][0]
        .as_str()
        .unwrap()
        .to_string();
    loop {
        if std::fs::read_to_string(effects)
            .unwrap_or_default()
            .contains(&id)
        {
            return t.elapsed().as_secs_f64() * 1000.0;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no effect for {id}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Time for `node handler.mjs` to start and answer `initialize` (what an exec restart costs).
fn node_start_ms(dir: &Path) -> f64 {
    use std::io::{BufRead, Write};
    let mut times: Vec<f64> = (0..10)
        .map(|_| {
            let t = Instant::now();
            let mut child = Command::new("node")
                .arg("handler.mjs")
                .current_dir(dir)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("node");
            let mut stdin = child.stdin.take().unwrap();
            writeln!(stdin, r#"{{"jsonrpc":"2.0","id":1,"method":"initialize","params":{{"protocol_version":1,"pack":{{}},"workspace":{{}}}}}}"#).unwrap();
            let mut line = String::new();
            std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            let _ = child.kill();
            let _ = child.wait();
            ms
        })
        .collect();
    median(&mut times)
}

/// The event bodies the agent would store, for the baselines and peers.
fn envelope_bodies(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            json!({"schema_version": 2, "event_id": uuid::Uuid::now_v7().to_string(), "kind": "bench:ping",
                "timestamp": "2026-04-20T00:00:00.000Z", "from": "bench",
                "payload": {"job_id": format!("job-{i}"), "result": "ok", "seq": i}})
            .to_string()
        })
        .collect()
}

/// A Node exec pack `packs/ID` in the workspace `root` with the repository's helper,
/// subscribing to `kind`; `handler` is its `handler.mjs` after the helper's import.
fn node_pack(root: &Path, id: &str, kind: &str, handler: &str) -> PathBuf {
    node_pack_with(root, id, kind, handler, json!({}))
}

/// [`node_pack`] with more manifest fields (`extra`'s keys; `runtime` merged into the one made
/// here).
fn node_pack_with(root: &Path, id: &str, kind: &str, handler: &str, extra: Value) -> PathBuf {
    let dir = root.join("packs").join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    std::fs::copy(
        repo.join("packs/node/lumenflow-pack.mjs"),
        dir.join("lumenflow-pack.mjs"),
    )
    .unwrap();
    let mut manifest = json!({"id": id, "version": "0.1.0", "subscribed_event_kinds": [kind],
        "runtime": {"command": ["node", "handler.mjs"]}});
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        match (k.as_str(), v) {
            ("runtime", Value::Object(rt)) => {
                for (rk, rv) in rt {
                    manifest["runtime"][rk] = rv;
                }
            }
            (_, v) => manifest[k] = v,
        }
    }
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    std::fs::write(
        dir.join("handler.mjs"),
        format!("import {{ runPack }} from './lumenflow-pack.mjs';\n{handler}\n"),
    )
    .unwrap();
    dir
}

/// The median of `runs` measurements.
fn med(runs: usize, mut f: impl FnMut() -> f64) -> f64 {
    let mut v: Vec<f64> = (0..runs).map(|_| f()).collect();
    median(&mut v)
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// The development conductor (`conductor serve`), on loopback, with its own database.
struct DevConductor {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl DevConductor {
    fn start(bin: &Path) -> DevConductor {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin)
            .args([
                "conductor",
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--token",
                "bench-token",
                "--db",
            ])
            .arg(dir.path().join("conductor.db"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("conductor");
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "conductor did not start"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        DevConductor {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    /// Enrolls the workspace `dir` with this conductor.
    fn enroll(&self, bin: &Path, dir: &Path) {
        let out = Command::new(bin)
            .args([
                "enroll",
                "--endpoint",
                &self.url,
                "--token-env",
                "BENCH_TOKEN",
                "--subject",
                "bench",
            ])
            .current_dir(dir)
            .env("LUMENFLOW_AGENT_NO_USER_CONFIG", "1")
            .env("BENCH_TOKEN", "bench-token")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn events(&self) -> Vec<Value> {
        let mut r = Agent::http()
            .get(format!("{}/admin/events", self.url))
            .header("authorization", "Bearer bench-token")
            .call()
            .expect("admin/events");
        let text = r
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_string()
            .expect("admin/events body");
        serde_json::from_str(&text).expect("admin/events JSON")
    }
}

impl Drop for DevConductor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Queue kind end to end: `total` events in batches of `batch` from 4 clients, until the
/// upstream acknowledged them all (outbox empty). Events/s.
fn queue_e2e(agent: &Agent, total: usize, batch: usize) -> f64 {
    queue_e2e_with(agent, total, batch, 4)
}

/// [`queue_e2e`] from `clients` keep-alive connections (one thread each).
fn queue_e2e_with(agent: &Agent, total: usize, batch: usize, clients: usize) -> f64 {
    // What `blast` sends: the same number per client.
    let total = total / clients * clients;
    let http = Agent::http();
    let pushed_before = agent.status(&http)["upstream"]["pushed"].as_u64().unwrap();
    let cpu0 = agent.cpu_s();
    // Many connections: raw keep-alive clients, like the peers' (ureq's own cost bounds it).
    let raw = clients > 4;
    let (t0, ingest) = blast_with(
        &agent.url,
        &agent.token,
        "/api/v1/events",
        "bench:ping",
        total,
        batch,
        clients,
        raw,
    );
    agent.wait_until("outbox drained", |s| {
        s["queue"]["durable_depth"] == 0
            && s["upstream"]["pushed"].as_u64().unwrap() >= pushed_before + total as u64
    });
    let rate = total as f64 / t0.elapsed().as_secs_f64();
    eprintln!(
        "  batch {batch}: {rate:.0}/s end to end ({:.0}/s acknowledged to producers), agent CPU {:.1} µs/event",
        total as f64 / ingest,
        (agent.cpu_s() - cpu0) * 1e6 / total as f64
    );
    rate
}

/// Accept latency of single-event requests offered at `rate` events/s for `secs` (from 8
/// keep-alive connections, each paced on its own schedule): (p50, p99, max) in ms.
fn accept_latency(agent: &Agent, rate: usize, secs: f64) -> (f64, f64, f64) {
    const CONNS: usize = 8;
    let per_conn = (rate as f64 * secs) as usize / CONNS;
    let gap = Duration::from_secs_f64(CONNS as f64 / rate as f64);
    let mut all: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CONNS)
            .map(|c| {
                s.spawn(move || {
                    let mut http = peers::RawHttp::connect(&agent.url);
                    let bodies: Vec<String> = (0..per_conn)
                        .map(|i| body("bench:ping", c * per_conn + i, 1))
                        .collect();
                    let start = Instant::now() + gap.mul_f64(c as f64 / CONNS as f64);
                    let mut lat = Vec::with_capacity(per_conn);
                    for (i, b) in bodies.into_iter().enumerate() {
                        let due = start + gap * i as u32;
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let t = Instant::now();
                        let (status, text) = http.post("/api/v1/events", &agent.token, &b);
                        assert_eq!(status, 200, "{text}");
                        lat.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                    lat
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let max = all.iter().cloned().fold(0.0, f64::max);
    (percentile(&mut all, 0.5), percentile(&mut all, 0.99), max)
}

/// Ephemeral end to end: until every event was pushed or counted dropped. (events/s, dropped)
fn ephemeral_e2e(agent: &Agent, total: usize) -> (f64, u64) {
    let http = Agent::http();
    let s0 = agent.status(&http);
    let base = s0["upstream"]["pushed"].as_u64().unwrap()
        + s0["queue"]["ephemeral_dropped"].as_u64().unwrap();
    let dropped0 = s0["queue"]["ephemeral_dropped"].as_u64().unwrap();
    let (t0, _) = blast(agent, "/api/v1/events", "bench:pulse", total, 100, 4);
    agent.wait_until("ephemeral pushed", |s| {
        s["upstream"]["pushed"].as_u64().unwrap()
            + s["queue"]["ephemeral_dropped"].as_u64().unwrap()
            >= base + total as u64
    });
    let rate = total as f64 / t0.elapsed().as_secs_f64();
    let dropped = agent.status(&http)["queue"]["ephemeral_dropped"]
        .as_u64()
        .unwrap()
        - dropped0;
    (rate, dropped)
}

/// A workspace (durability `full`) enrolled with a fresh development conductor, and its agent
/// with the `bench` pack.
fn with_conductor(bin: &Path) -> (tempfile::TempDir, DevConductor, Agent) {
    let ws = workspace(json!({"durability": "full"}));
    let conductor = DevConductor::start(bin);
    conductor.enroll(bin, ws.path());
    let agent = Agent::start(bin, ws.path(), "bench");
    (ws, conductor, agent)
}

const FULL: &str = "fsync per group commit, ack after commit";
const NORMAL: &str = "WAL, no fsync; ack after commit";

/// The authorized load of the flood soak for `secs`: 50 requests a second, four of five a
/// batch of 10 events, one a status. Returns each request's latency in ms.
fn steady_load(agent: &Agent, secs: u64, from: usize) -> Vec<f64> {
    let http = Agent::http();
    let mut lat: Vec<f64> = Vec::new();
    let began = Instant::now();
    let mut i = from;
    while began.elapsed() < Duration::from_secs(secs) {
        let t = Instant::now();
        if i % 5 == 4 {
            agent.status(&http);
        } else {
            let (code, _) = agent.post(&http, "/api/v1/events", body("bench:ping", i * 10, 10));
            assert_eq!(code, 200);
        }
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        i += 1;
        std::thread::sleep(Duration::from_millis(20).saturating_sub(t.elapsed()));
    }
    lat
}

/// Issue 20's soak: the steady load alone (the baseline, in the same run), then the same load
/// beside 1,000 idle unauthenticated connections (re-opened as the agent closes them) for
/// `secs`. Latency of the authorized requests in both, and the agent's anonymous memory (its
/// heap: file-backed pages of the mmapped database are the kernel's to reclaim) idle, after
/// the baseline and after the flood.
fn flood_soak(bin: &Path, secs: u64, rows: &mut Vec<Row>) {
    use std::io::Read;
    use std::net::TcpStream;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let ws = workspace(json!({}));
    let agent = Agent::start(bin, ws.path(), "bench");
    let addr = agent.url.trim_start_matches("http://").to_string();
    // Warm the store first (300,000 events in batches of 1,000): its page caches reach their
    // bounds (cache_size 8 MiB a connection) before the idle size is taken, so what the steady
    // load adds later is not mistaken for memory the flood kept.
    let http = Agent::http();
    for b in 0..300 {
        let (code, _) = agent.post(&http, "/api/v1/events", body("bench:ping", b * 1000, 1000));
        assert_eq!(code, 200);
    }
    agent.wait_until("the warm-up drained", |s| s["queue"]["durable_depth"] == 0);
    std::thread::sleep(Duration::from_secs(12));
    let idle_kb = agent.rss_anon_kb();
    let base_s = (secs / 5).clamp(20, 120);
    let mut base = steady_load(&agent, base_s, 0);
    std::thread::sleep(Duration::from_secs(12));
    let after_base_kb = agent.rss_anon_kb();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let reopened = std::sync::Arc::new(AtomicU64::new(0));
    let flood = {
        let (stop, reopened, addr) = (stop.clone(), reopened.clone(), addr.clone());
        std::thread::spawn(move || {
            let open = |i: usize| {
                let mut s = TcpStream::connect(&addr).ok()?;
                if i.is_multiple_of(10) {
                    // Every tenth sends half a request head, then nothing.
                    let _ = std::io::Write::write_all(
                        &mut s,
                        b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n",
                    );
                }
                s.set_nonblocking(true).ok()?;
                Some(s)
            };
            // LF_BENCH_FLOOD_N=0: the same run without the flood (a control).
            let n: usize = std::env::var("LF_BENCH_FLOOD_N")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000);
            let mut conns: Vec<Option<TcpStream>> = (0..n).map(open).collect();
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                for (i, c) in conns.iter_mut().enumerate() {
                    let closed = match c {
                        None => true,
                        Some(s) => {
                            !matches!(s.read(&mut buf), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
                        }
                    };
                    if closed {
                        *c = open(i);
                        reopened.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let peak = std::sync::Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak, pid) = (stop.clone(), peak.clone(), agent.child.id());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(anon_kb(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    let mut lat = steady_load(&agent, secs, 1 << 24);
    stop.store(true, Ordering::Relaxed);
    let _ = flood.join();
    let _ = sampler.join();
    // The agent closes what is left within its header timeout (10 s) and trims every 10 s.
    std::thread::sleep(Duration::from_secs(25));
    let after_kb = agent.rss_anon_kb();
    let peak_kb = peak.load(Ordering::Relaxed);
    let (b50, b99, bmax) = (
        percentile(&mut base, 0.5),
        percentile(&mut base, 0.99),
        base[base.len() - 1],
    );
    let (p50, p99, max) = (
        percentile(&mut lat, 0.5),
        percentile(&mut lat, 0.99),
        lat[lat.len() - 1],
    );
    eprintln!(
        "flood: baseline {base_s} s: {} requests, p50 {b50:.2} ms, p99 {b99:.2} ms, max {bmax:.1} ms; flood {secs} s: {} requests, p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.1} ms; {} idle connections re-opened; heap idle {idle_kb} KiB, after the baseline {after_base_kb} KiB, peak {peak_kb} KiB, after the flood {after_kb} KiB",
        base.len(),
        lat.len(),
        reopened.load(Ordering::Relaxed),
    );
    rows.push(Row {
        scenario: format!("authorized request p99, steady load alone, {base_s} s ({} requests, p50 {b50:.2} ms, max {bmax:.1} ms)", base.len()),
        durability: "full",
        value: b99,
        unit: "ms",
        baseline: None,
        target: "",
    });
    rows.push(Row {
        scenario: format!("authorized request p99, same load beside 1,000 idle connections, {secs} s ({} requests, p50 {p50:.2} ms, max {max:.1} ms; {:.2}x the load alone)", lat.len(), p99 / b99),
        durability: "full",
        value: p99,
        unit: "ms",
        baseline: None,
        target: "<= 50 ms",
    });
    rows.push(Row {
        scenario: format!(
            "agent heap (RssAnon) after the flood / idle before it (idle {:.1} MiB, after the load alone {:.1} MiB, peak in the flood {:.1} MiB, after {:.1} MiB)",
            idle_kb as f64 / 1024.0,
            after_base_kb as f64 / 1024.0,
            peak_kb as f64 / 1024.0,
            after_kb as f64 / 1024.0
        ),
        durability: "",
        value: after_kb as f64 / idle_kb.max(1) as f64,
        unit: "x",
        baseline: None,
        target: "<= 1.2x",
    });
    agent.stop();
}

/// A process's anonymous resident memory (its heap and stacks), in KiB.
fn anon_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let runs: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 1 } else { 3 });
    // `--only queue,native`: run just those scenarios (names: baselines peers nats queue conductor ephemeral
    // latency native tap exec crash reload idle rss). `--only flood [--flood-s N]` runs issue 20's
    // soak (600 s, 30 with `--quick`); it is not part of the full run.
    let only: Option<String> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let want = |name: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|x| x == name))
    };
    let n: usize = if quick { 40_000 } else { 200_000 };
    let replay_n: usize = if quick { 200_000 } else { 1_000_000 };
    let bin = agent_bin();
    let mut rows: Vec<Row> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    eprintln!(
        "lumenflow-bench: {n} events per scenario, replay log {replay_n}, medians of {runs} runs"
    );

    // Baselines: the durable limit (raw SQLite) and the transport limit (raw loopback HTTP).
    // (`--only` without `baselines` skips them, e.g. to profile the agent alone.)
    let baselines = want("baselines");
    let sqlite_full = if baselines {
        med(runs, || sqlite_baseline(n, 500, "FULL"))
    } else {
        f64::NAN
    };
    let sqlite_normal = if baselines {
        med(runs, || sqlite_baseline(n, 500, "NORMAL"))
    } else {
        f64::NAN
    };
    let sink = peers::HttpSink::start();
    let sink_url = format!("http://127.0.0.1:{}", sink.port);
    let http_limit = if baselines {
        med(runs, || {
            n as f64 / blast_to(&sink_url, "-", "/api/v1/events", "bench:ping", n, 100, 4).1
        })
    } else {
        f64::NAN
    };
    eprintln!("baselines: sqlite FULL {sqlite_full:.0}/s, NORMAL {sqlite_normal:.0}/s, loopback HTTP {http_limit:.0}/s");
    let base_full = (
        "raw SQLite insert, 500/txn, synchronous=FULL".to_string(),
        sqlite_full,
    );
    let base_normal = (
        "raw SQLite insert, 500/txn, synchronous=NORMAL".to_string(),
        sqlite_normal,
    );
    let base_http = (
        "raw loopback HTTP sink, same batches and client".to_string(),
        http_limit,
    );
    rows.push(Row {
        scenario: "baseline: raw SQLite inserts of the same bodies, 500 per transaction, 1 thread"
            .into(),
        durability: "synchronous=FULL (fsync per commit)",
        value: sqlite_full,
        unit: "events/s",
        baseline: None,
        target: "",
    });
    rows.push(Row {
        scenario: "baseline: raw SQLite inserts of the same bodies, 500 per transaction, 1 thread"
            .into(),
        durability: "synchronous=NORMAL (WAL, no fsync)",
        value: sqlite_normal,
        unit: "events/s",
        baseline: None,
        target: "",
    });
    rows.push(Row {
        scenario: "baseline: raw loopback HTTP sink, batches of 100, 4 clients (answers at once)"
            .into(),
        durability: "none",
        value: http_limit,
        unit: "events/s",
        baseline: None,
        target: "",
    });

    // Peers, fed the same bodies, batches of 100 pipelined, 4 clients.
    let bodies = envelope_bodies(n);
    let mut redis_always = None;
    let mut redis_always_1x64 = None;
    let mut jetstream = None;
    if !want("peers") {
    } else if peers::installed("redis-server") {
        let v = peers::version("redis-server");
        let server_label = v.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
        for (fsync, durability, base) in [
            (
                "always",
                "AOF, appendfsync always (fsync before the reply)",
                &base_full,
            ),
            (
                "everysec",
                "AOF, appendfsync everysec (fsync once a second)",
                &base_normal,
            ),
        ] {
            let rate = med(runs, || {
                let server = peers::start_redis(fsync).expect("redis-server did not start");
                peers::redis_streams(server.port, &bodies, 100, 4)
            });
            eprintln!("redis streams appendfsync={fsync}: {rate:.0}/s");
            if fsync == "always" {
                redis_always = Some(rate);
                // Many small producers: one XADD per round trip, 64 connections.
                let r64 = med(runs, || {
                    let server = peers::start_redis(fsync).expect("redis-server did not start");
                    peers::redis_streams(server.port, &bodies[..bodies.len() / 4], 1, 64)
                });
                eprintln!(
                    "redis streams appendfsync=always, unpipelined, 64 connections: {r64:.0}/s"
                );
                redis_always_1x64 = Some(r64);
                rows.push(Row {
                    scenario: format!(
                        "peer: Redis Streams XADD, unpipelined, 64 connections ({server_label})"
                    ),
                    durability,
                    value: r64,
                    unit: "events/s",
                    baseline: Some(base.clone()),
                    target: "",
                });
            }
            rows.push(Row {
                scenario: format!(
                    "peer: Redis Streams XADD, pipelines of 100, 4 clients ({server_label})"
                ),
                durability,
                value: rate,
                unit: "events/s",
                baseline: Some(base.clone()),
                target: "",
            });
        }
    } else {
        notes.push("Redis Streams skipped: `redis-server` is not installed (Debian: `apt-get install redis-server`).".into());
    }
    if !want("peers") {
    } else if peers::installed("nats-server") {
        let v = peers::version("nats-server");
        let rate = med(runs, || {
            let server = peers::start_nats(None).expect("nats-server did not start");
            peers::nats_create_stream(server.port).expect("create stream");
            peers::nats_jetstream(server.port, &bodies, 100, 4)
        });
        eprintln!("nats jetstream: {rate:.0}/s");
        jetstream = Some(rate);
        rows.push(Row { scenario: format!("peer: NATS JetStream publish, acked, file storage, pipelines of 100, 4 clients ({v})"), durability: "written to the file store, fsync every 2 min (sync_interval default); ack after write", value: rate, unit: "events/s", baseline: Some(base_normal.clone()), target: "" });
        match peers::start_nats(Some("always")) {
            Some(server) if peers::nats_create_stream(server.port).is_ok() => {
                drop(server);
                let rate = med(runs, || {
                    let server = peers::start_nats(Some("always")).expect("nats-server");
                    peers::nats_create_stream(server.port).expect("create stream");
                    peers::nats_jetstream(server.port, &bodies, 100, 4)
                });
                rows.push(Row { scenario: format!("peer: NATS JetStream as above, sync_interval: always ({v})"), durability: "fsync per write; ack after", value: rate, unit: "events/s", baseline: Some(base_full.clone()), target: "" });
            }
            _ => notes.push(format!("NATS JetStream with `sync_interval: always` skipped: {v} does not accept the option (added in 2.10).")),
        }
    } else {
        notes.push("NATS JetStream skipped: `nats-server` is not installed (Debian: `apt-get install nats-server`).".into());
    }

    // Queue kind end to end to NATS JetStream, beside the raw publisher on a fresh server of
    // the same configuration in the same run (file store, acked publishes, pipelines of 100).
    if want("nats") && peers::installed("nats-server") {
        let v = peers::version("nats-server");
        let raw = jetstream.unwrap_or_else(|| {
            med(runs, || {
                let server = peers::start_nats(None).expect("nats-server did not start");
                peers::nats_create_stream(server.port).expect("create stream");
                peers::nats_jetstream(server.port, &bodies, 100, 4)
            })
        });
        let rate = med(runs, || {
            let server = peers::start_nats(None).expect("nats-server did not start");
            let ws = workspace(json!({"durability": "full", "identity": "ws-bench",
                "upstream": format!("nats://127.0.0.1:{}", server.port)}));
            let agent = Agent::start(&bin, ws.path(), "bench");
            agent.wait_until("connected to NATS", |s| {
                s["upstream"]["state"] == "connected"
            });
            let rate = queue_e2e(&agent, n, 100);
            agent.stop();
            rate
        });
        eprintln!("queue -> NATS JetStream: {rate:.0}/s (raw publisher {raw:.0}/s)");
        rows.push(Row {
            scenario: format!("queue kind, API batch 100, 4 clients -> NATS JetStream, acked (end to end; {v})"),
            durability: "agent: fsync per group commit, ack after commit; server: file store, ack after write",
            value: rate,
            unit: "events/s",
            baseline: Some(("raw JetStream publisher, pipelines of 100, 4 clients".to_string(), raw)),
            target: ">= 0.8x",
        });
    }

    // Queue kind end to end, mem:inbox.
    let (mut queue_full_100, mut queue_normal_100, mut queue_full_1x64) = (0.0, 0.0, 0.0);
    for (durability, label, base) in [("full", FULL, &base_full), ("normal", NORMAL, &base_normal)]
        .into_iter()
        .filter(|_| want("queue"))
    {
        let ws = workspace(json!({"durability": durability}));
        let agent = Agent::start(&bin, ws.path(), "bench");
        for batch in [100usize, 1] {
            let total = if batch == 1 { n / 20 } else { n };
            let rate = med(runs, || queue_e2e(&agent, total, batch));
            eprintln!("queue -> mem:inbox durability={durability} batch={batch}: {rate:.0}/s");
            match (durability, batch) {
                ("full", 100) => queue_full_100 = rate,
                ("normal", 100) => queue_normal_100 = rate,
                _ => {}
            }
            rows.push(Row {
                scenario: format!(
                    "queue kind, API batch {batch}, 4 clients -> mem:inbox (end to end)"
                ),
                durability: label,
                value: rate,
                unit: "events/s",
                baseline: Some(base.clone()),
                target: if batch == 100 {
                    ">= 100k/s and >= 0.3x"
                } else {
                    ""
                },
            });
        }
        if durability == "full" {
            // Many small producers: one event per request, 64 keep-alive connections.
            let rate = med(runs, || queue_e2e_with(&agent, n / 4, 1, 64));
            eprintln!("queue -> mem:inbox durability=full batch=1 64 connections: {rate:.0}/s");
            queue_full_1x64 = rate;
            rows.push(Row {
                scenario:
                    "queue kind, API batch 1, 64 keep-alive connections -> mem:inbox (end to end)"
                        .into(),
                durability: label,
                value: rate,
                unit: "events/s",
                baseline: Some(base.clone()),
                target: ">= 100k/s, ahead of Redis (64 connections)",
            });
            let (p50, p99, max) = accept_latency(&agent, 10_000, if quick { 2.0 } else { 5.0 });
            eprintln!("accept latency at 10k/s offered: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.1} ms");
            for (what, v, target) in [("p50", p50, ""), ("p99", p99, "<= 2 ms")] {
                rows.push(Row {
                    scenario: format!("queue kind, single-event requests offered at 10k events/s (8 connections), accept latency {what} (max {max:.1} ms)"),
                    durability: label,
                    value: v,
                    unit: "ms",
                    baseline: None,
                    target,
                });
            }
        }
        agent.stop();
    }

    // Queue kind end to end, the development conductor over loopback HTTP.
    if want("conductor") {
        let (_ws, _conductor, agent) = with_conductor(&bin);
        for batch in [100usize, 1] {
            let total = if batch == 1 { n / 20 } else { n };
            let rate = med(runs, || queue_e2e(&agent, total, batch));
            eprintln!("queue -> conductor batch={batch}: {rate:.0}/s");
            rows.push(Row {
                scenario: format!("queue kind, API batch {batch}, 4 clients -> development conductor over loopback HTTP (end to end)"),
                durability: "agent: fsync per group commit, ack after commit; conductor: WAL, ack after commit",
                value: rate,
                unit: "events/s",
                baseline: Some(if batch == 100 { base_http.clone() } else { base_full.clone() }),
                target: "",
            });
        }
        let (rate, dropped) = ephemeral_e2e(&agent, n);
        rows.push(Row { scenario: format!("ephemeral kind, API batch 100, 4 clients -> development conductor ({dropped} dropped)"), durability: "memory until sent", value: rate, unit: "events/s", baseline: Some(base_http.clone()), target: "" });
        agent.stop();
    }

    if want("ephemeral") {
        let ws = workspace(json!({}));
        let agent = Agent::start(&bin, ws.path(), "bench");
        let mut dropped = 0;
        let rate = med(runs, || {
            let (r, d) = ephemeral_e2e(&agent, n);
            dropped += d;
            r
        });
        eprintln!("ephemeral -> mem:inbox: {rate:.0}/s ({dropped} dropped)");
        rows.push(Row {
            scenario: format!(
                "ephemeral kind, API batch 100, 4 clients -> mem:inbox ({dropped} dropped)"
            ),
            durability: "memory until sent",
            value: rate,
            unit: "events/s",
            baseline: Some(base_http.clone()),
            target: "",
        });
        agent.stop();
    }

    // Emit -> upstream latency at a fixed 10k events/s (batches of 10 every millisecond).
    if want("latency") {
        let (_ws, conductor, agent) = with_conductor(&bin);
        let secs = if quick { 2 } else { 5 };
        let ticks = secs * 1000;
        let http = Agent::http();
        let t0 = Instant::now();
        let mut late = 0;
        for tick in 0..ticks {
            let due = t0 + Duration::from_micros(tick as u64 * 1000);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            } else if now - due > Duration::from_millis(5) {
                late += 1;
            }
            let sent = now_us();
            let events: Vec<Value> = (0..10)
                .map(|i| json!({"kind": "bench:ping", "payload": {"sent_us": sent, "n": tick * 10 + i}}))
                .collect();
            let (status, text) = agent.post(
                &http,
                "/api/v1/events",
                json!({"events": events}).to_string(),
            );
            assert_eq!(status, 200, "{text}");
        }
        let offered = (ticks * 10) as f64 / t0.elapsed().as_secs_f64();
        agent.wait_until("outbox drained", |s| s["queue"]["durable_depth"] == 0);
        let mut lat: Vec<f64> = conductor
            .events()
            .iter()
            .filter_map(|r| {
                Some(
                    (r["received_us"].as_i64()? - r["event"]["payload"]["sent_us"].as_i64()?)
                        as f64
                        / 1000.0,
                )
            })
            .collect();
        assert_eq!(lat.len(), ticks * 10, "every event at the conductor");
        let p50 = percentile(&mut lat, 0.5);
        let p99 = percentile(&mut lat, 0.99);
        let max = percentile(&mut lat, 1.0);
        eprintln!("latency at {offered:.0}/s: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms ({late} ticks late)");
        let scenario = format!("emit -> stored at the development conductor, {offered:.0} events/s offered for {secs} s (10 every ms)");
        rows.push(Row {
            scenario: format!("{scenario}, p50"),
            durability: FULL,
            value: p50,
            unit: "ms",
            baseline: None,
            target: "",
        });
        rows.push(Row {
            scenario: format!("{scenario}, p99 (max {max:.1} ms)"),
            durability: FULL,
            value: p99,
            unit: "ms",
            baseline: None,
            target: "<= 5 ms",
        });
        agent.stop();
    }

    for prefill in [0usize, replay_n].into_iter().filter(|_| want("native")) {
        let ws = workspace(json!({"durability": "normal"}));
        // Create the database (schema) once, then prefill the replay log.
        let agent = Agent::start(&bin, ws.path(), "sink");
        agent.stop();
        if prefill > 0 {
            let t = Instant::now();
            prefill_replay(ws.path(), "sink", prefill);
            eprintln!(
                "prefilled {prefill} replay entries in {:.1}s",
                t.elapsed().as_secs_f64()
            );
        }
        let agent = Agent::start(&bin, ws.path(), "sink");
        let mut done = 0u64;
        let rate = med(runs, || inbound_to_sink(&agent, n, &mut done));
        eprintln!("inbound -> native, replay log {prefill}: {rate:.0}/s");
        rows.push(Row {
            scenario: format!(
                "inbound -> native handler, dedupe, replay log at {prefill} (+{} per run)",
                n
            ),
            durability: "WAL, no fsync; recorded with the cursor",
            value: rate,
            unit: "events/s",
            baseline: Some(base_normal.clone()),
            target: if prefill > 0 { ">= 100k/s" } else { "" },
        });
        agent.stop();
    }
    if want("tap") {
        // `lumenflow-agent tap` that never reads: the same inbound -> native flow as above,
        // without a tap and with two attached that read nothing (the agent must not wait for
        // them, and their ring is bounded). The two alternate, so that the growing replay log
        // weighs on both alike.
        let ws = workspace(json!({"durability": "normal"}));
        let agent = Agent::start(&bin, ws.path(), "sink");
        let addr = agent.url.trim_start_matches("http://").to_string();
        let mut done = 0u64;
        let mut flow = |agent: &Agent| inbound_to_sink(agent, n, &mut done);
        let attach = |agent: &Agent| -> Vec<std::net::TcpStream> {
            let taps = ["/v1/tap", "/v1/tap?kind=bench%3A%2A"]
                .iter()
                .map(|path| {
                    use std::io::Write;
                    let mut s = std::net::TcpStream::connect(&addr).expect("tap connect");
                    write!(
                        s,
                        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\r\n",
                        agent.token
                    )
                    .expect("tap request");
                    s
                })
                .collect();
            agent.wait_until("two taps attached", |s| s["taps"] == 2);
            taps
        };
        flow(&agent); // warm-up
        let (mut without, mut with) = (Vec::new(), Vec::new());
        let (mut grown_without, mut grown_with) = (0u64, 0u64);
        // Which goes first alternates too (each run meets a larger replay log than the last).
        for i in 0..runs.max(4) {
            for tapped in [i % 2 == 1, i % 2 == 0] {
                let taps = tapped.then(|| attach(&agent));
                let rss = agent.rss_kb();
                let rate = flow(&agent);
                let grown = agent.rss_kb().saturating_sub(rss);
                if let Some(taps) = taps {
                    let still = agent.status(&Agent::http())["taps"].as_u64().unwrap_or(0);
                    assert_eq!(still, 2, "the taps stayed attached through the run");
                    drop(taps);
                    agent.wait_until("the taps detached", |s| s["taps"] == 0);
                    with.push(rate);
                    grown_with += grown;
                } else {
                    without.push(rate);
                    grown_without += grown;
                }
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v[v.len() / 2]
        };
        let (without, with) = (median(&mut without), median(&mut with));
        eprintln!("inbound -> native: {without:.0}/s without a tap, {with:.0}/s with two that never read; RSS grew {grown_without} KiB over the runs without, {grown_with} KiB with");
        rows.push(Row {
            scenario: format!(
                "inbound -> native handler with 2 taps attached that never read ({n} per run, alternating with runs without, median)"
            ),
            durability: "WAL, no fsync; recorded with the cursor",
            value: with,
            unit: "events/s",
            baseline: Some(("the same without a tap".to_string(), without)),
            target: ">= 0.95x",
        });
        rows.push(Row {
            scenario: format!(
                "RSS growth over the runs with those taps (ring bounded at 1,024 entries); {:.1} MB over the runs without",
                grown_without as f64 / 1024.0
            ),
            durability: "-",
            value: grown_with as f64 / 1024.0,
            unit: "MB",
            baseline: None,
            target: "bounded",
        });
        agent.stop();
    }
    if want("exec") {
        // Inbound -> Node exec packs (the repository's helper). The handlers return at once:
        // what is measured is the agent and the protocol, not the handler's work.
        const KEYED: &str = "async (e, ctx) => { const k = `k:${e.event_id}`; if (await ctx.replayLog.has(k)) return { status: 'replayed' }; await ctx.replayLog.put(k); return { status: 'handled' }; }";
        // The quickstart's whole pattern: has, emit, put.
        const QUICKSTART: &str = "async (e, ctx) => { const k = `k:${e.event_id}`; if (await ctx.replayLog.has(k)) return { status: 'replayed' }; await ctx.emit(`${ctx.pack.id}:done`, { of: e.event_id }); await ctx.replayLog.put(k); return { status: 'handled' }; }";
        let pack = |ws: &Path, id: &str, handler: &str, concurrency: u32, emits: Option<&str>| {
            let mut extra = json!({"runtime": {"concurrency": concurrency}});
            if let Some(kind) = emits {
                extra["emitted_event_kinds"] = json!([kind]);
                extra["backpressure_policy"] = json!({ kind: "queue" });
            }
            let kind = format!("bench:{}", id.replace('-', "_"));
            node_pack_with(
                ws,
                id,
                &kind,
                &format!("runPack({{ handlers: {{ '{kind}': {handler} }} }});"),
                extra,
            );
        };
        type ExecRow = (&'static str, usize, String, &'static str);
        let handled = |s: &Value, pack: &str, n: u64| {
            s["packs"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["id"] == pack && p["handled"].as_u64().unwrap() >= n)
        };
        let measure =
            |agent: &Agent, durability: &'static str, list: Vec<ExecRow>, rows: &mut Vec<Row>| {
                // One event to each pack first, so that no worker's start-up (about 70 ms
                // each, several at once on 2 cores) falls inside a measured row.
                let http = Agent::http();
                for (pack, ..) in &list {
                    let kind = format!("bench:{}", pack.replace('-', "_"));
                    let body = json!({"events": [{"kind": kind, "payload": {}}]}).to_string();
                    let (status, text) = agent.post(&http, "/v1/inbound", body);
                    assert_eq!(status, 200, "{text}");
                }
                for (pack, ..) in &list {
                    agent.wait_until("the Node pack's warm-up event", |s| handled(s, pack, 1));
                }
                for (pack, total, label, target) in list {
                    let kind = format!("bench:{}", pack.replace('-', "_"));
                    let cpu0 = agent.cpu_s();
                    let (t0, _) = blast(agent, "/v1/inbound", &kind, total, 100, 4);
                    agent.wait_until("the Node pack handled all", |s| {
                        handled(s, pack, total as u64 + 1)
                    });
                    let rate = total as f64 / t0.elapsed().as_secs_f64();
                    let cpu_us = (agent.cpu_s() - cpu0) * 1e6 / total as f64;
                    eprintln!("inbound -> {pack}: {rate:.0}/s, agent CPU {cpu_us:.1} us/event");
                    rows.push(Row {
                        scenario: format!("{label}, agent CPU {cpu_us:.1} µs/event"),
                        durability,
                        value: rate,
                        unit: "events/s",
                        baseline: None,
                        target,
                    });
                }
            };
        let ws = workspace(json!({"durability": "normal"}));
        pack(
            ws.path(),
            "node-sink",
            "async () => ({ status: 'handled' })",
            1,
            None,
        );
        pack(ws.path(), "node-keyed", KEYED, 1, None);
        pack(ws.path(), "node-keyed-32", KEYED, 32, None);
        pack(ws.path(), "node-emit", "async (e, ctx) => { await ctx.emit('node-emit:done', { of: e.event_id }); return { status: 'handled' }; }", 1, Some("node-emit:done"));
        pack(ws.path(), "node-qs", QUICKSTART, 1, Some("node-qs:done"));
        pack(
            ws.path(),
            "node-qs-32",
            QUICKSTART,
            32,
            Some("node-qs-32:done"),
        );
        let agent = Agent::start(&bin, ws.path(), "");
        measure(&agent, "WAL, no fsync; recorded with the cursor", vec![
            ("node-sink", n / 2, "inbound -> Node exec pack (pipelined JSON-RPC)".into(), ">= 20k/s"),
            ("node-keyed", n / 40, "inbound -> Node exec pack written like the quickstart (replayLog.has, then put), runtime.concurrency 1: each event committed before the next".into(), ""),
            ("node-keyed-32", n / 4, "the same keyed handler, runtime.concurrency 32: up to 32 events at once, committed together".into(), ">= 15k/s, <= 40 µs CPU"),
            ("node-emit", n / 4, "inbound -> Node handler that emits one event per event (no keys of its own)".into(), ">= 40k/s"),
            ("node-qs", n / 40, "inbound -> the quickstart's whole handler (has, emit, put), runtime.concurrency 1".into(), ""),
            ("node-qs-32", n / 4, "the quickstart's whole handler, runtime.concurrency 32".into(), ""),
        ], &mut rows);
        agent.stop();
        let ws = workspace(json!({"durability": "full"}));
        pack(ws.path(), "node-keyed", KEYED, 1, None);
        pack(ws.path(), "node-keyed-32", KEYED, 32, None);
        let agent = Agent::start(&bin, ws.path(), "");
        measure(
            &agent,
            "fsync per commit; recorded with the cursor",
            vec![
                (
                    "node-keyed",
                    n / 100,
                    "inbound -> Node keyed handler (has, put), runtime.concurrency 1".into(),
                    "",
                ),
                (
                    "node-keyed-32",
                    n / 4,
                    "the same keyed handler, runtime.concurrency 32".into(),
                    ">= 5k/s",
                ),
            ],
            &mut rows,
        );
        agent.stop();
    }

    if want("crash") {
        // Crash -> next event handled. Native: the recorder panics on attempt 1 of an event
        // and handles attempt 2; the cost is the median latency of such an event minus that of
        // a normal one. Exec: a Node worker that exits on attempt 1.
        let ws = workspace(json!({"supervision": {"max_restarts": 1000, "window_s": 1}}));
        let dir = node_pack(ws.path(), "flaky", "conductor:job_poked", "import { appendFileSync } from 'node:fs';\nrunPack({ handlers: { 'conductor:job_poked': async (e, ctx) => { if (e.payload.crash && ctx.attempt === 1) process.exit(1); appendFileSync('../../effects.log', e.event_id + '\\n'); return { status: 'handled' }; } } });");
        let agent = Agent::start(&bin, ws.path(), "recorder");
        let http = Agent::http();
        let effects = ws.path().join("effects.log");
        let samples = if quick { 10 } else { 30 };
        let lat = |kind: &str, payload: Value| -> f64 {
            let mut v: Vec<f64> = (0..samples)
                .map(|_| time_to_effect(&agent, &http, kind, payload.clone(), &effects))
                .collect();
            median(&mut v)
        };
        let native_ok = lat("conductor:recovery_requested", json!({}));
        let native_crash = lat(
            "conductor:recovery_requested",
            json!({"panic_until_attempt": 2}),
        );
        let exec_ok = lat("conductor:job_poked", json!({}));
        let exec_crash = lat("conductor:job_poked", json!({"crash": true}));
        let node_ms = node_start_ms(&dir);
        eprintln!("crash->next: native {native_ok:.2} -> {native_crash:.2} ms; exec {exec_ok:.2} -> {exec_crash:.2} ms (node start {node_ms:.1} ms)");
        rows.push(Row { scenario: format!("crash -> event handled, native (panic, restart, redeliver; median, normal event {native_ok:.2} ms)"), durability: "", value: native_crash - native_ok, unit: "ms", baseline: None, target: "<= 10 ms" });
        rows.push(Row { scenario: format!("crash -> event handled, Node exec (worker exit, restart, handshake; worker start {node_ms:.1} ms)"), durability: "", value: exec_crash - exec_ok, unit: "ms", baseline: None, target: "<= worker start + 20 ms" });
        agent.stop();
    }

    if want("reload") {
        // Hot reload: save (write temp + rename) -> new manifest active, per status.
        let ws = workspace(json!({}));
        let dir = ws.path().join("packs/hot");
        std::fs::create_dir_all(&dir).unwrap();
        let m = |v: &str| {
            json!({"id": "hot", "version": v, "emitted_event_kinds": ["hot:done"], "backpressure_policy": {"hot:done": "queue"}}).to_string()
        };
        std::fs::write(dir.join("manifest.json"), m("0.0.0")).unwrap();
        let agent = Agent::start(&bin, ws.path(), "");
        let http = Agent::http();
        let samples = if quick { 10 } else { 30 };
        let mut times: Vec<f64> = (1..=samples)
            .map(|i| {
                let version = format!("0.0.{i}");
                let t = Instant::now();
                std::fs::write(dir.join(".manifest.json.tmp"), m(&version)).unwrap();
                std::fs::rename(dir.join(".manifest.json.tmp"), dir.join("manifest.json")).unwrap();
                loop {
                    let s = agent.status(&http);
                    if s["packs"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|p| p["version"] == version.as_str())
                    {
                        break t.elapsed().as_secs_f64() * 1000.0;
                    }
                    std::thread::sleep(Duration::from_micros(500));
                }
            })
            .collect();
        let p50 = percentile(&mut times, 0.5);
        let p99 = percentile(&mut times, 0.99);
        eprintln!("hot reload: p50 {p50:.1} ms, p99 {p99:.1} ms");
        rows.push(Row {
            scenario: format!(
                "hot reload, save -> new manifest active, p50 ({samples} saves; debounce 40 ms)"
            ),
            durability: "",
            value: p50,
            unit: "ms",
            baseline: None,
            target: "<= 100 ms",
        });
        rows.push(Row {
            scenario: format!("hot reload, save -> new manifest active, p99 ({samples} saves)"),
            durability: "",
            value: p99,
            unit: "ms",
            baseline: None,
            target: "<= 200 ms",
        });
        agent.stop();
    }

    if want("idle") {
        let ws = workspace(json!({}));
        for i in 0..10 {
            let dir = ws.path().join(format!("packs/pack-{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            let m = json!({"id": format!("pack-{i}"), "version": "0.1.0",
                "emitted_event_kinds": [format!("pack-{i}:done")], "backpressure_policy": {format!("pack-{i}:done"): "queue"}});
            std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
        }
        let t = Instant::now();
        let agent = Agent::start(&bin, ws.path(), "");
        let startup_ms = t.elapsed().as_secs_f64() * 1000.0;
        std::thread::sleep(Duration::from_secs(2));
        let rss = agent.rss_kb();
        let http = Agent::http();
        let mut times: Vec<f64> = (0..200)
            .map(|_| {
                let t = Instant::now();
                agent.status(&http);
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        let status_http = median(&mut times);
        let status_cli = agent.cli_status_ms();
        rows.push(Row {
            scenario: "idle RSS with 10 packs".into(),
            durability: "",
            value: rss as f64 / 1024.0,
            unit: "MiB",
            baseline: None,
            target: "<= 20 MiB",
        });
        rows.push(Row {
            scenario: "start-up to API ready (10 packs)".into(),
            durability: "",
            value: startup_ms,
            unit: "ms",
            baseline: None,
            target: "",
        });
        rows.push(Row {
            scenario: "status round trip, HTTP GET /v1/status (median of 200)".into(),
            durability: "",
            value: status_http,
            unit: "ms",
            baseline: None,
            target: "<= 10 ms",
        });
        rows.push(Row {
            scenario: "status round trip, `lumenflow-agent status --json` process (median of 20)"
                .into(),
            durability: "",
            value: status_cli,
            unit: "ms",
            baseline: None,
            target: "<= 10 ms",
        });
        agent.stop();
    }

    if only
        .as_deref()
        .is_some_and(|o| o.split(',').any(|x| x == "flood"))
    {
        let secs: u64 = args
            .iter()
            .position(|a| a == "--flood-s")
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(if quick { 30 } else { 600 });
        flood_soak(&bin, secs, &mut rows);
    }

    if want("rss") {
        // RSS growth per pack: the same idle agent with 10 and with 410 packs (a subscription
        // and an emitted kind each), 400 apart so that the growth stands out of the noise of a
        // few hundred KiB.
        let rss_with = |packs: usize| -> f64 {
            let ws = workspace(json!({}));
            for i in 0..packs {
                let dir = ws.path().join(format!("packs/pack-{i}"));
                std::fs::create_dir_all(&dir).unwrap();
                let m = json!({"id": format!("pack-{i}"), "version": "0.1.0",
                    "subscribed_event_kinds": [format!("conductor:poke_{i}")],
                    "emitted_event_kinds": [format!("pack-{i}:done")], "backpressure_policy": {format!("pack-{i}:done"): "queue"}});
                std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
            }
            let agent = Agent::start(&bin, ws.path(), "");
            std::thread::sleep(Duration::from_secs(2));
            let rss = agent.rss_kb() as f64;
            agent.stop();
            rss
        };
        let (small, large) = (rss_with(10), rss_with(410));
        let per_pack = (large - small) / 400.0;
        eprintln!(
            "RSS: 10 packs {small:.0} KiB, 410 packs {large:.0} KiB: {per_pack:.1} KiB per pack"
        );
        rows.push(Row {
            scenario: format!(
                "RSS growth per pack (idle, 10 -> 410 packs: {:.1} -> {:.1} MiB)",
                small / 1024.0,
                large / 1024.0
            ),
            durability: "",
            value: per_pack,
            unit: "KiB",
            baseline: None,
            target: "",
        });
    }

    println!();
    println!("| scenario | durability | result | baseline (same run) | ratio | target |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        let value = if r.unit == "events/s" {
            format!("{:.0} {}", r.value, r.unit)
        } else {
            format!("{:.2} {}", r.value, r.unit)
        };
        let (base, ratio) = match &r.baseline {
            Some((name, b)) => (format!("{name}: {b:.0}/s"), format!("{:.2}x", r.value / b)),
            None => ("".into(), "".into()),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.scenario, r.durability, value, base, ratio, r.target
        );
    }
    println!();
    println!("Agent beside its peers (queue kind through the local API to mem:inbox, batches of 100, 4 clients; peers fed the same bodies):");
    println!();
    if let Some(r) = redis_always {
        println!("- fsync before the producer's ack: agent {queue_full_100:.0}/s vs Redis Streams appendfsync=always {r:.0}/s: {:.2}x", queue_full_100 / r);
    }
    if let (Some(r), true) = (redis_always_1x64, queue_full_1x64 > 0.0) {
        println!("- one event per request, 64 connections, fsync before the ack: agent {queue_full_1x64:.0}/s vs Redis Streams XADD unpipelined, appendfsync=always {r:.0}/s: {:.2}x", queue_full_1x64 / r);
    }
    if let Some(j) = jetstream {
        println!("- no fsync before the ack: agent {queue_normal_100:.0}/s vs NATS JetStream (file, default sync) {j:.0}/s: {:.2}x", queue_normal_100 / j);
    }
    for note in &notes {
        println!("- {note}");
    }
}
