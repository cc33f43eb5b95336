//! A loopback TCP proxy in front of the control plane, for the faults a server cannot make by
//! answering: a connection reset after the request was stored (the agent never learns that it
//! was accepted), and an answer that drips in a byte at a time.
//!
//! It speaks just enough HTTP/1.1 to find message boundaries (headers, then a Content-Length
//! body), forwards each request over a fresh connection and, by mode, answers, resets or drips.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass = 0,
    /// Forward, let the server answer, then reset the agent's connection (SO_LINGER 0).
    Reset = 1,
    /// Forward, then send the answer one byte every 5 ms.
    Drip = 2,
}

pub struct Proxy {
    pub port: u16,
    mode: Arc<AtomicU8>,
    resets: Arc<AtomicUsize>,
}

impl Proxy {
    /// Listens on a free loopback port, forwarding to `target` on loopback.
    pub fn start(target: u16) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let mode = Arc::new(AtomicU8::new(Mode::Pass as u8));
        let resets = Arc::new(AtomicUsize::new(0));
        let (m, r) = (mode.clone(), resets.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (m, r) = (m.clone(), r.clone());
                std::thread::spawn(move || serve(conn, target, &m, &r));
            }
        });
        Ok(Proxy { port, mode, resets })
    }

    pub fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// Connections reset so far.
    pub fn resets(&self) -> usize {
        self.resets.load(Ordering::SeqCst)
    }
}

fn serve(mut client: TcpStream, target: u16, mode: &AtomicU8, resets: &AtomicUsize) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(120)));
    while let Some(request) = read_message(&mut client) {
        let Some(answer) = exchange(target, &request) else {
            return; // the server is gone: the agent sees the connection close
        };
        match mode.load(Ordering::SeqCst) {
            1 => {
                reset(&client);
                resets.fetch_add(1, Ordering::SeqCst);
                return;
            }
            2 => {
                for b in &answer {
                    if client.write_all(std::slice::from_ref(b)).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            _ => {
                if client.write_all(&answer).is_err() {
                    return;
                }
            }
        }
    }
}

/// Closes with a TCP RST instead of a FIN.
fn reset(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Sends one HTTP request to loopback `port` (a fresh connection) and reads its answer; None
/// when nothing answers.
pub fn exchange(port: u16, request: &[u8]) -> Option<Vec<u8>> {
    let mut up = TcpStream::connect(("127.0.0.1", port)).ok()?;
    let _ = up.set_read_timeout(Some(Duration::from_secs(120)));
    up.write_all(request).ok()?;
    read_message(&mut up)
}

/// One HTTP/1.1 message: headers, then a Content-Length body. None at end of stream.
pub fn read_message<S: Read>(s: &mut S) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).ok().filter(|n| *n > 0)?;
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.truncate(end + 4 + len);
            return Some(buf);
        }
        let n = s.read(&mut chunk).ok().filter(|n| *n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    }
}
