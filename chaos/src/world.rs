//! The system under test: a workspace with two packs, the real agent binary as a child
//! process, its Node worker, and the development control plane behind the fault proxy.
//!
//! - `shop` only emits `shop:order_placed` (queue), posted by a producer on the local API.
//! - `ledger` is the quickstart's handler shape on the Node helper: for each
//!   `conductor:job_requested` pulled from the control plane it checks its replay key, appends
//!   a line to a file (an effect outside the agent), emits `ledger:entry_recorded` (no
//!   idempotency key: a doubled emit shows as two event ids) and records its key. Jobs carry
//!   their own delays, some close to the handler timeout, so timeouts land at random points;
//!   a few are poison (the handler throws).

use crate::proxy::Proxy;
use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "chaos-token";
pub const IDENTITY: &str = "ws-chaos";
pub const HANDLER_TIMEOUT_MS: u64 = 1500;

const LEDGER_HANDLER: &str = r#"import { runPack } from './lumenflow-pack.mjs';
import { appendFileSync } from 'node:fs';
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
runPack({ handlers: { 'conductor:job_requested': async (event, ctx) => {
  const { job, delay_ms = 0, gap_ms = 0, poison = false } = event.payload;
  const key = `${job}:recorded`;
  if (await ctx.replayLog.has(key)) return { status: 'replayed', action: 'noop' };
  if (poison) throw new Error(`poison job ${job}`);
  appendFileSync(process.env.EFFECTS, `${job}\n`);
  // Slow on the first attempt only: a timeout lands somewhere in it, the redelivery succeeds.
  const first = ctx.attempt === 1;
  await sleep(first ? delay_ms : 0);
  await ctx.emit('ledger:entry_recorded', { job });
  await sleep(first ? gap_ms : 0);
  await ctx.replayLog.put(key);
  return { status: 'handled', action: 'recorded' };
} } });
"#;

pub fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// POST `body` to `url` with the bearer token: (status, JSON body), or None on a network error.
pub fn post(url: &str, token: &str, body: &Value) -> Option<(u16, Value)> {
    let mut r = http()
        .post(url)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .send(body.to_string())
        .ok()?;
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    Some((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

pub fn get(url: &str, token: &str) -> Option<Value> {
    let mut r = http()
        .get(url)
        .header("authorization", format!("Bearer {token}"))
        .call()
        .ok()?;
    let text = r
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_string()
        .ok()?;
    serde_json::from_str(&text).ok()
}

pub struct World {
    pub root: PathBuf,
    pub ws: PathBuf,
    pub agent_bin: PathBuf,
    pub agent: Option<Child>,
    pub conductor: Child,
    pub conductor_port: u16,
    pub proxy: Proxy,
    /// The state directory is a small tmpfs: disk-full faults can be made.
    pub tmpfs: bool,
    pub ledger_manifest: String,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_until<T>(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl World {
    /// Lays out the workspace under `root`, starts the control plane and the proxy, enrolls.
    pub fn create(
        root: &Path,
        agent_bin: &Path,
        node_helper: &Path,
        disk: bool,
    ) -> anyhow::Result<World> {
        let agent_bin = &std::fs::canonicalize(agent_bin)
            .with_context(|| format!("the agent binary {}", agent_bin.display()))?;
        let ws = root.join("ws");
        std::fs::create_dir_all(ws.join(".lumenflow/state"))?;
        std::fs::write(
            ws.join(".lumenflow/agent.json"),
            json!({"identity": IDENTITY, "handler": {"timeout_ms": HANDLER_TIMEOUT_MS}})
                .to_string(),
        )?;
        let shop = ws.join("packs/shop");
        std::fs::create_dir_all(&shop)?;
        std::fs::write(
            shop.join("manifest.json"),
            json!({"id": "shop", "version": "0.1.0", "emitted_event_kinds": ["shop:order_placed"],
                   "backpressure_policy": {"shop:order_placed": "queue"}})
            .to_string(),
        )?;
        let ledger = ws.join("packs/ledger");
        std::fs::create_dir_all(&ledger)?;
        std::fs::copy(node_helper, ledger.join("lumenflow-pack.mjs"))
            .with_context(|| format!("copying the Node helper {}", node_helper.display()))?;
        std::fs::write(ledger.join("handler.mjs"), LEDGER_HANDLER)?;
        let ledger_manifest = json!({"id": "ledger", "version": "0.1.0",
            "subscribed_event_kinds": ["conductor:job_requested"],
            "emitted_event_kinds": ["ledger:entry_recorded"],
            "backpressure_policy": {"ledger:entry_recorded": "queue"},
            "runtime": {"command": ["node", "handler.mjs"],
                        "env": {"EFFECTS": root.join("effects.log").display().to_string()}}})
        .to_string();
        std::fs::write(ledger.join("manifest.json"), &ledger_manifest)?;

        let tmpfs = disk
            && Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=128m", "tmpfs"])
                .arg(ws.join(".lumenflow/state"))
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());

        let conductor_port = free_port()?;
        let conductor = Command::new(agent_bin)
            .args([
                "conductor",
                "serve",
                "--listen",
                &format!("127.0.0.1:{conductor_port}"),
                "--token",
                TOKEN,
                "--db",
            ])
            .arg(root.join("conductor.db"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the development conductor")?;
        wait_until(
            "the control plane to listen",
            Duration::from_secs(30),
            || std::net::TcpStream::connect(("127.0.0.1", conductor_port)).ok(),
        )?;
        let proxy = Proxy::start(conductor_port)?;
        let world = World {
            root: root.to_path_buf(),
            ws,
            agent_bin: agent_bin.to_path_buf(),
            agent: None,
            conductor,
            conductor_port,
            proxy,
            tmpfs,
            ledger_manifest,
        };
        let out = world.cli(&[
            "enroll",
            "--endpoint",
            &format!("http://127.0.0.1:{}", world.proxy.port),
            "--token-env",
            "CHAOS_TOKEN",
            "--subject",
            IDENTITY,
        ])?;
        if !out.status.success() {
            bail!("enroll failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(world)
    }

    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(Command::new(&self.agent_bin)
            .args(args)
            .current_dir(&self.ws)
            .env("LUMENFLOW_AGENT_NO_USER_CONFIG", "1")
            .env("CHAOS_TOKEN", TOKEN)
            .output()?)
    }

    pub fn api_file(&self) -> PathBuf {
        self.ws.join(".lumenflow/state/agent/api.json")
    }

    /// The local API's address and token, while an agent runs.
    pub fn api(&self) -> Option<(String, String)> {
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(self.api_file()).ok()?).ok()?;
        Some((
            v["url"].as_str()?.to_string(),
            v["token"].as_str()?.to_string(),
        ))
    }

    pub fn start_agent(&mut self) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(self.api_file());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("agent.log"))?;
        let mut last = None;
        for _ in 0..50 {
            let mut child = Command::new(&self.agent_bin)
                .arg("start")
                .current_dir(&self.ws)
                .env("LUMENFLOW_AGENT_NO_USER_CONFIG", "1")
                .env("LUMENFLOW_AGENT_BACKOFF_BASE_MS", "50")
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log.try_clone()?)
                .spawn()
                .context("starting the agent")?;
            let api = self.api_file();
            let up = wait_until("api.json", Duration::from_secs(30), || {
                if api.exists() {
                    return Some(true);
                }
                child.try_wait().ok().flatten().map(|_| false)
            })?;
            if up {
                self.agent = Some(child);
                return Ok(());
            }
            // Exited at once (e.g. the dead agent's lock not yet released): try again.
            last = child.wait().ok();
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("the agent does not start (last exit {last:?}); see agent.log")
    }

    pub fn agent_pid(&self) -> Option<i32> {
        self.agent.as_ref().map(|c| c.id() as i32)
    }

    pub fn kill_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal_agent(&self, sig: i32) {
        if let Some(pid) = self.agent_pid() {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// The agent exited on its own (it must not).
    pub fn agent_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.agent
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The ledger pack's worker: the agent's child running `handler.mjs`.
    pub fn worker_pid(&self) -> Option<i32> {
        let agent = self.agent_pid()?;
        for e in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if ppid != Some(agent) {
                continue;
            }
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).contains("handler.mjs") {
                return Some(pid);
            }
        }
        None
    }

    pub fn status(&self) -> Option<Value> {
        let (url, token) = self.api()?;
        get(&format!("{url}/v1/status"), &token)
    }

    pub fn conductor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.conductor_port)
    }

    pub fn faults(&self, faults: Value) -> anyhow::Result<()> {
        match post(
            &format!("{}/admin/faults", self.conductor_url()),
            TOKEN,
            &faults,
        ) {
            Some((200, _)) => Ok(()),
            other => bail!("setting control-plane faults {faults}: {other:?}"),
        }
    }

    /// Everything the control plane received: `[{workspace_id, deliveries, event}]`.
    pub fn received(&self) -> anyhow::Result<Vec<Value>> {
        let v = get(&format!("{}/admin/events", self.conductor_url()), TOKEN)
            .context("reading the control plane's events")?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    pub fn dead_letters(&self) -> anyhow::Result<Vec<Value>> {
        let out = self.cli(&["dlq", "list", "--json"])?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "`dlq list --json` did not answer a list (exit {:?}): {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Jobs in the agent's inbound log that the ledger pack has not passed yet (read from its
    /// SQLite file, not from the agent): events that are late, not lost.
    pub fn jobs_pending_in_agent(&self) -> anyhow::Result<std::collections::BTreeSet<String>> {
        let db = self.ws.join(".lumenflow/state/agent/agent.db");
        let conn =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let mut stmt = conn.prepare(
            "SELECT body FROM inbound WHERE kind = 'conductor:job_requested'
             AND seq > coalesce((SELECT cursor FROM pack_cursor WHERE pack = 'ledger'), 0)",
        )?;
        let bodies = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(bodies
            .iter()
            .filter_map(|b| serde_json::from_str::<Value>(b).ok())
            .filter_map(|v| v["payload"]["job"].as_str().map(str::to_string))
            .collect())
    }

    pub fn ledger_dir(&self) -> PathBuf {
        self.ws.join("packs/ledger")
    }

    pub fn away_dir(&self) -> PathBuf {
        self.ws.join("ledger.away")
    }

    pub fn ballast(&self) -> PathBuf {
        self.ws.join(".lumenflow/state/ballast")
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.signal_agent(libc::SIGCONT);
        self.kill_agent();
        let _ = self.conductor.kill();
        let _ = self.conductor.wait();
        if self.tmpfs {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.ws.join(".lumenflow/state"))
                .status();
        }
    }
}
