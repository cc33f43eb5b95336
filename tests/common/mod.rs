//! Helpers for end-to-end tests: a temporary workspace, the real binary as a child process,
//! its API, and polling with a deadline (never a bare sleep as synchronisation).
#![allow(dead_code)]

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const AGENT: &str = env!("CARGO_BIN_EXE_lumenflow-agent");
pub const TEST_AGENT: &str = env!("CARGO_BIN_EXE_lumenflow-test-agent");

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Copies a folder tree (a pack, the Node helper) into a test workspace.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

pub struct Workspace {
    pub dir: tempfile::TempDir,
    pub bin: &'static str,
    pub child: Option<Child>,
    pub packs: String,
}

impl Workspace {
    /// A workspace with `.lumenflow/agent.json` = `config`, run by the test agent with `packs`.
    pub fn new(config: Value, packs: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join(".lumenflow")).unwrap();
        std::fs::write(dir.path().join(".lumenflow/agent.json"), config.to_string()).unwrap();
        Workspace {
            dir,
            bin: TEST_AGENT,
            child: None,
            packs: packs.to_string(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn effects_file(&self) -> PathBuf {
        self.path().join("effects.log")
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(self.bin);
        c.current_dir(self.path())
            .env("LUMENFLOW_AGENT_NO_USER_CONFIG", "1")
            .env("LUMENFLOW_TEST_PACKS", &self.packs)
            .env("LUMENFLOW_TEST_EFFECTS", self.effects_file())
            .env("LUMENFLOW_AGENT_BACKOFF_BASE_MS", "50")
            .env("RUST_LOG", "info");
        c
    }

    /// Runs a CLI command to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run agent command")
    }

    /// Starts `start` in the background and waits for `api.json`.
    pub fn start(&mut self) {
        self.start_with_env(&[]);
    }

    /// Like [`Workspace::start`], with extra environment variables.
    pub fn start_with_env(&mut self, env: &[(&str, &str)]) {
        let _ = std::fs::remove_file(self.api_file());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join("agent.log"))
            .unwrap();
        let child = self
            .cmd()
            .envs(env.iter().copied())
            .arg("start")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        self.child = Some(child);
        let api = self.api_file();
        wait_for("api.json", Duration::from_secs(20), || {
            api.exists().then_some(())
        });
    }

    pub fn api_file(&self) -> PathBuf {
        self.path().join(".lumenflow/state/agent/api.json")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path().join("agent.log")).unwrap_or_default()
    }

    pub fn api(&self) -> Api {
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(self.api_file()).unwrap()).unwrap();
        Api {
            url: v["url"].as_str().unwrap().to_string(),
            token: v["token"].as_str().unwrap().to_string(),
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return s.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("agent did not exit after SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn status(&self) -> Value {
        let out = self.run(&["status", "--json"]);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("status --json: {}", String::from_utf8_lossy(&out.stdout)))
    }

    pub fn pack_status(&self, id: &str) -> Value {
        self.status()["packs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == id)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// The mem:inbox contents.
    pub fn inbox(&self) -> Vec<Value> {
        let out = self.run(&["inbox", "--json", "--limit", "10000000"]);
        serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("inbox --json")
    }

    /// Lines of the recorder pack's effects file.
    /// `emit KIND --inbound --payload PAYLOAD`: injects an event as if it came from the
    /// upstream; asserts it was accepted and returns its event_id.
    #[allow(dead_code)]
    pub fn inbound(&self, kind: &str, payload: &str) -> String {
        let out = self.run(&["emit", kind, "--inbound", "--payload", payload]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn effects(&self) -> Vec<String> {
        std::fs::read_to_string(self.effects_file())
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Api {
    pub url: String,
    pub token: String,
}

pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub headers: Vec<(String, String)>,
}

impl Api {
    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false)
            .build()
            .into()
    }

    pub fn post_raw(&self, path: &str, body: Vec<u8>, token: Option<&str>) -> Reply {
        let mut req = Self::agent()
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        Self::reply(req.send(body))
    }

    pub fn post(&self, path: &str, body: &Value) -> Reply {
        self.post_raw(path, body.to_string().into_bytes(), Some(&self.token))
    }

    pub fn get(&self, path: &str) -> Reply {
        let r = Self::agent()
            .get(format!("{}{path}", self.url))
            .header("authorization", format!("Bearer {}", self.token))
            .call();
        Self::reply(r)
    }

    fn reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
        Self::try_reply(r).expect("request")
    }

    fn try_reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Option<Reply> {
        let mut r = r.ok()?;
        let status = r.status().as_u16();
        let headers = r
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let text = r.body_mut().read_to_string().unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Some(Reply {
            status,
            body,
            headers,
        })
    }

    /// Like [`Api::emit`], but `None` when the agent is gone.
    pub fn try_emit(&self, events: Vec<Value>) -> Option<Reply> {
        let body = json!({"events": events}).to_string();
        let r = Self::agent()
            .post(format!("{}/api/v1/events", self.url))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {}", self.token))
            .send(body);
        Self::try_reply(r)
    }

    /// Posts drafts `{kind, payload}` to /api/v1/events (naming no workspace: any identity).
    pub fn emit(&self, events: Vec<Value>) -> Reply {
        self.post("/api/v1/events", &json!({"events": events}))
    }
}

/// The development conductor (`lumenflow-agent conductor serve`) as a child process, on a free
/// loopback port, with its SQLite file in the test workspace.
pub struct Conductor {
    child: Option<Child>,
    pub port: u16,
    db: PathBuf,
    token: String,
}

/// Waits (up to 30 s) until something listens on the loopback `port`.
pub fn wait_for_port(what: &str, port: u16) {
    wait_for(
        &format!("{what} to listen"),
        Duration::from_secs(30),
        || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| ())
        },
    );
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Conductor {
    pub fn start(dir: &Path, token: &str) -> Conductor {
        let mut c = Conductor {
            child: None,
            port: free_port(),
            db: dir.join("conductor.db"),
            token: token.into(),
        };
        c.restart();
        c
    }

    pub fn restart(&mut self) {
        let child = Command::new(AGENT)
            .args([
                "conductor",
                "serve",
                "--listen",
                &format!("127.0.0.1:{}", self.port),
                "--token",
                &self.token,
                "--db",
            ])
            .arg(&self.db)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_for_port("the conductor", self.port);
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn admin(&self, path: &str, body: Option<Value>) -> Value {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let auth = format!("Bearer {}", self.token);
        let mut r = match body {
            Some(b) => agent
                .post(format!("{}{path}", self.url()))
                .header("authorization", &auth)
                .send(b.to_string())
                .unwrap(),
            None => agent
                .get(format!("{}{path}", self.url()))
                .header("authorization", &auth)
                .call()
                .unwrap(),
        };
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
    }

    pub fn received(&self) -> Vec<Value> {
        self.admin("/admin/events", None)
            .as_array()
            .unwrap()
            .clone()
    }

    pub fn publish(&self, ws: &str, events: Value) -> Value {
        self.admin(
            "/admin/publish",
            Some(json!({"workspace_id": ws, "events": events})),
        )
    }
}

impl Drop for Conductor {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `enroll` the workspace with the conductor (subject `ws-test`), the token passed by env.
pub fn enroll(ws: &Workspace, c: &Conductor, token: &str) {
    enroll_at(ws, &c.url(), token);
}

/// `enroll` the workspace with the control plane at `endpoint` (e.g. a proxy in front of the
/// conductor), subject `ws-test`, the token passed by env; the token is never printed.
/// Returns what it printed.
pub fn enroll_at(ws: &Workspace, endpoint: &str, token: &str) -> String {
    let out = ws
        .cmd()
        .args([
            "enroll",
            "--endpoint",
            endpoint,
            "--token-env",
            "TEST_TOKEN",
            "--subject",
            "ws-test",
        ])
        .env("TEST_TOKEN", token)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!said.contains(token), "the token is never printed");
    said
}

/// HTTP/1.1 framing for the test fronts: one message (headers, then a Content-Length body), and
/// one request/answer exchange with a loopback port (the chaos crate's proxy has them).
#[allow(unused_imports)]
pub use lumenflow_chaos::proxy::{exchange, read_message as read_http_message};

/// An https front for the development conductor: a self-signed certificate for `localhost`
/// (its PEM written to `dir/ca.pem`), every request forwarded to the conductor on `target`.
#[allow(dead_code)]
pub struct TlsFront {
    pub port: u16,
}

#[allow(dead_code)]
impl TlsFront {
    pub fn start(dir: &Path, target: u16) -> TlsFront {
        use std::io::Write;
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        std::fs::write(dir.join("ca.pem"), ck.cert.pem()).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
        let cfg = std::sync::Arc::new(
            rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![ck.cert.der().clone()], key)
            .unwrap(),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let cfg = cfg.clone();
                std::thread::spawn(move || {
                    let Ok(tls) = rustls::ServerConnection::new(cfg) else {
                        return;
                    };
                    let mut s = rustls::StreamOwned::new(tls, conn);
                    while let Some(req) = read_http_message(&mut s) {
                        let Some(resp) = exchange(target, &req) else {
                            return;
                        };
                        if s.write_all(&resp).and_then(|()| s.flush()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        TlsFront { port }
    }
}

/// A pack that only emits `shop:order_placed` (queue), for upstream tests.
pub fn shop_pack(ws: &Workspace) {
    let dir = ws.path().join("packs/shop");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("manifest.json"),
        json!({"id": "shop", "version": "0.1.0", "emitted_event_kinds": ["shop:order_placed"],
               "backpressure_policy": {"shop:order_placed": "queue"}})
        .to_string(),
    )
    .unwrap();
}

/// A pack folder `packs/ID` with a manifest (subscribing to `conductor:recovery_requested`,
/// running `node worker.mjs`; `extra` overrides or adds keys) and the worker script.
pub fn raw_pack(ws: &Workspace, id: &str, script: &str, extra: Value) {
    let dir = ws.path().join("packs").join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let mut m = json!({"id": id, "version": "0.1.0", "subscribed_event_kinds": ["conductor:recovery_requested"],
        "runtime": {"command": ["node", "worker.mjs"]}});
    for (k, v) in extra.as_object().unwrap() {
        m[k] = v.clone();
    }
    std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
    std::fs::write(dir.join("worker.mjs"), script).unwrap();
}

/// Is the process gone (or a zombie nobody reaped yet: it runs no more code)?
pub fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}
