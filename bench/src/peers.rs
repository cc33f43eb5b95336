//! What a user might run instead of the agent as a local durable buffer, and the transport
//! limit, each driven with the same event bodies, batches and client threads as the agent:
//!
//! - a raw loopback HTTP/1.1 sink (keep-alive, answers `{}` at once): the transport limit of
//!   the benchmark's own HTTP client and batches;
//! - Redis Streams (`XADD`, one pipeline per batch) with `appendfsync always` and `everysec`;
//! - NATS JetStream (file storage; each publish waits for its PubAck, one pipeline per batch).
//!
//! The servers come from the distribution's packages (`redis-server`, `nats-server`), started on
//! loopback in a temporary directory; a peer that is not installed is skipped with a note.
//! The protocols are spoken directly (RESP, the NATS text protocol) to keep the client cost
//! as small as the benchmark's own HTTP client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn wait_port(port: u16) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

pub fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Runs `per_client(client_index)` on `clients` threads; returns events/s for `total`.
fn drive(total: usize, clients: usize, per_client: impl Fn(usize) + Sync) -> f64 {
    let t = Instant::now();
    std::thread::scope(|s| {
        for c in 0..clients {
            let f = &per_client;
            s.spawn(move || f(c));
        }
    });
    total as f64 / t.elapsed().as_secs_f64()
}

/// A keep-alive HTTP/1.1 server answering every request `200 {}` as soon as its body is read.
pub struct HttpSink {
    pub port: u16,
}

impl HttpSink {
    pub fn start() -> HttpSink {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                std::thread::spawn(move || serve_http(conn));
            }
        });
        HttpSink { port }
    }
}

fn serve_http(conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let mut out = match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    };
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let Some(len) = read_headers(&mut r, &mut line) else {
            return;
        };
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let reply =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        if out.write_all(reply).is_err() {
            return;
        }
    }
}

/// Reads HTTP/1.1 header lines up to the blank one; returns the `content-length` (0 without
/// one), or `None` if the stream ended first.
fn read_headers(r: &mut BufReader<TcpStream>, line: &mut String) -> Option<usize> {
    let mut len = 0usize;
    loop {
        line.clear();
        if r.read_line(line).unwrap_or(0) == 0 {
            return None;
        }
        let l = line.trim_end();
        if l.is_empty() {
            return Some(len);
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
}

/// A server process in a temporary directory, killed on drop.
pub struct Server {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `redis-server` on loopback with an append-only file, `appendfsync` as given.
pub fn start_redis(appendfsync: &str) -> Option<Server> {
    let dir = tempfile::tempdir().ok()?;
    let port = free_port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            appendfsync,
            "--dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let s = Server {
        child,
        port,
        _dir: dir,
    };
    wait_port(port).then_some(s)
}

fn resp_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Reads one RESP reply (simple, error, integer or bulk string); panics on an error reply.
fn resp_reply(r: &mut BufReader<TcpStream>, line: &mut String) {
    line.clear();
    r.read_line(line).expect("redis reply");
    match line.as_bytes().first() {
        Some(b'$') => {
            let n: i64 = line[1..].trim().parse().expect("bulk length");
            if n >= 0 {
                let mut b = vec![0u8; n as usize + 2];
                r.read_exact(&mut b).expect("bulk");
            }
        }
        Some(b'-') => panic!("redis: {}", line.trim()),
        _ => {}
    }
}

/// `XADD lumenflow * body <event>` for every body, `batch` per pipeline, `clients` threads.
pub fn redis_streams(port: u16, bodies: &[String], batch: usize, clients: usize) -> f64 {
    let per = bodies.len() / clients;
    drive(per * clients, clients, |c| {
        let conn = TcpStream::connect(("127.0.0.1", port)).expect("connect redis");
        let _ = conn.set_nodelay(true);
        let mut w = conn.try_clone().expect("clone");
        let mut r = BufReader::new(conn);
        let mut line = String::new();
        let mut buf = Vec::new();
        for chunk in bodies[c * per..(c + 1) * per].chunks(batch) {
            buf.clear();
            for b in chunk {
                resp_command(
                    &mut buf,
                    &[b"XADD", b"lumenflow", b"*", b"body", b.as_bytes()],
                );
            }
            w.write_all(&buf).expect("write redis");
            for _ in chunk {
                resp_reply(&mut r, &mut line);
            }
        }
    })
}

/// `nats-server -js` on loopback, file storage in a temporary directory. `sync` (when the
/// server knows the option) sets `jetstream.sync_interval`.
pub fn start_nats(sync: Option<&str>) -> Option<Server> {
    let dir = tempfile::tempdir().ok()?;
    let port = free_port();
    let store = dir.path().join("js");
    let conf = dir.path().join("nats.conf");
    let mut text = format!(
        "listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: \"{}\"\n",
        store.display()
    );
    if let Some(s) = sync {
        text.push_str(&format!("  sync_interval: {s}\n"));
    }
    text.push_str("}\n");
    std::fs::write(&conf, text).ok()?;
    let child = Command::new("nats-server")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut s = Server {
        child,
        port,
        _dir: dir,
    };
    if !wait_port(port) {
        return None;
    }
    if let Ok(Some(_)) = s.child.try_wait() {
        return None;
    }
    Some(s)
}

struct Nats {
    w: TcpStream,
    r: BufReader<TcpStream>,
    line: String,
}

impl Nats {
    fn connect(port: u16) -> Nats {
        let conn = TcpStream::connect(("127.0.0.1", port)).expect("connect nats");
        let _ = conn.set_nodelay(true);
        let w = conn.try_clone().expect("clone");
        let mut n = Nats {
            w,
            r: BufReader::new(conn),
            line: String::new(),
        };
        n.read_line(); // INFO
        n.w.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":false,\"protocol\":1}\r\nPING\r\n")
            .expect("connect");
        loop {
            n.read_line();
            if n.line.starts_with("PONG") {
                return n;
            }
            assert!(!n.line.starts_with("-ERR"), "nats: {}", n.line.trim());
        }
    }

    fn read_line(&mut self) {
        self.line.clear();
        self.r.read_line(&mut self.line).expect("nats read");
    }

    /// The payload of the next MSG (answering PINGs on the way).
    fn next_msg(&mut self) -> Vec<u8> {
        loop {
            self.read_line();
            if self.line.starts_with("MSG ") {
                let n: usize = self
                    .line
                    .split_whitespace()
                    .last()
                    .and_then(|v| v.parse().ok())
                    .expect("MSG size");
                let mut b = vec![0u8; n + 2];
                self.r.read_exact(&mut b).expect("MSG payload");
                b.truncate(n);
                return b;
            }
            if self.line.starts_with("PING") {
                self.w.write_all(b"PONG\r\n").expect("pong");
            }
            assert!(!self.line.starts_with("-ERR"), "nats: {}", self.line.trim());
        }
    }
}

/// Creates the `LUMENFLOW` stream (file storage, subjects `lumenflow.>`).
pub fn nats_create_stream(port: u16) -> Result<(), String> {
    let mut n = Nats::connect(port);
    let cfg = r#"{"name":"LUMENFLOW","subjects":["lumenflow.>"],"storage":"file","retention":"limits","discard":"old","num_replicas":1}"#;
    let msg = format!(
        "SUB _INBOX.setup 1\r\nPUB $JS.API.STREAM.CREATE.LUMENFLOW _INBOX.setup {}\r\n{cfg}\r\n",
        cfg.len()
    );
    n.w.write_all(msg.as_bytes()).map_err(|e| e.to_string())?;
    let reply = String::from_utf8_lossy(&n.next_msg()).to_string();
    if reply.contains("\"error\"") {
        return Err(reply);
    }
    Ok(())
}

/// Publishes every body to `lumenflow.events` and waits for each PubAck, `batch` per
/// pipeline, `clients` threads.
pub fn nats_jetstream(port: u16, bodies: &[String], batch: usize, clients: usize) -> f64 {
    let per = bodies.len() / clients;
    drive(per * clients, clients, |c| {
        let mut n = Nats::connect(port);
        let inbox = format!("_INBOX.bench{c}");
        n.w.write_all(format!("SUB {inbox} 1\r\n").as_bytes())
            .expect("sub");
        let mut buf = Vec::new();
        for chunk in bodies[c * per..(c + 1) * per].chunks(batch) {
            buf.clear();
            for b in chunk {
                buf.extend_from_slice(
                    format!("PUB lumenflow.events {inbox} {}\r\n", b.len()).as_bytes(),
                );
                buf.extend_from_slice(b.as_bytes());
                buf.extend_from_slice(b"\r\n");
            }
            n.w.write_all(&buf).expect("publish");
            for _ in chunk {
                let ack = n.next_msg();
                assert!(
                    !ack.windows(7).any(|w| w == b"\"error\""),
                    "JetStream refused a publish: {}",
                    String::from_utf8_lossy(&ack)
                );
            }
        }
    })
}

/// The server's version line, for the table.
pub fn version(program: &str) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// A minimal keep-alive HTTP/1.1 client on one connection: writes the request, reads the
/// status line, the headers and a `content-length` body. What the Redis and NATS clients here
/// are to their servers (no pooling, no redirects, no allocation beyond the buffers), so that
/// many-connection rows measure the server, not the client library.
pub struct RawHttp {
    w: TcpStream,
    r: BufReader<TcpStream>,
    host: String,
    line: String,
}

impl RawHttp {
    pub fn connect(url: &str) -> RawHttp {
        let host = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let conn = TcpStream::connect(&host).expect("connect agent");
        let _ = conn.set_nodelay(true);
        let w = conn.try_clone().expect("clone");
        RawHttp {
            w,
            r: BufReader::new(conn),
            host,
            line: String::new(),
        }
    }

    /// POSTs `body` (JSON) to `path`; returns the status and the body.
    pub fn post(&mut self, path: &str, token: &str, body: &str) -> (u16, String) {
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        self.w.write_all(head.as_bytes()).expect("write");
        self.w.write_all(body.as_bytes()).expect("write");
        self.line.clear();
        self.r.read_line(&mut self.line).expect("status line");
        let status: u16 = self
            .line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let len = read_headers(&mut self.r, &mut self.line).unwrap_or(0);
        let mut buf = vec![0u8; len];
        self.r.read_exact(&mut buf).expect("body");
        (status, String::from_utf8_lossy(&buf).into_owned())
    }
}
