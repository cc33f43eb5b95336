//! Running as a service: readiness and the log file.
//!
//! - **Readiness**: once the packs are started and the local API answers, the agent tells a
//!   service manager it is ready: `READY=1` on `$NOTIFY_SOCKET` (systemd `Type=notify`) and,
//!   with `start --ready-file F`, by writing F (its PID and API URL). Stopping, it says
//!   `STOPPING=1` and removes F. A supervisor that starts the agent and then talks to it waits
//!   for either instead of polling the API.
//! - **Log file**: `start --log-file F` writes the log to F instead of stderr, rotated by
//!   size: past `--log-max-size` bytes F becomes F.1 (F.1 becomes F.2, ...; `--log-keep` old
//!   files are kept). Under systemd, leave it out: the journal takes stderr and rotates it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Sends `state` (`READY=1`, `STOPPING=1`) to the service manager when `NOTIFY_SOCKET` is set.
/// A socket that cannot be reached is logged, never fatal.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send_notify(&path, state) {
        tracing::warn!(socket = ?path, error = %e, "cannot tell the service manager {state}");
    }
}

#[cfg(unix)]
fn send_notify(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    // `@name`: a Linux abstract socket (systemd may use one).
    #[cfg(target_os = "linux")]
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
        return Ok(());
    }
    sock.send_to(state.as_bytes(), Path::new(path))?;
    Ok(())
}

#[cfg(not(unix))]
fn send_notify(_: &std::ffi::OsStr, _: &str) -> std::io::Result<()> {
    Ok(())
}

/// The `--ready-file`: written when the agent is ready, removed when it stops.
pub struct ReadyFile(PathBuf);

impl ReadyFile {
    /// Writes `{"pid": …, "url": …}` to `path` (through a temporary file, so a reader never
    /// sees half of it).
    pub fn write(path: &Path, url: &str) -> anyhow::Result<ReadyFile> {
        let tmp = path.with_extension("tmp");
        let text = serde_json::json!({"pid": std::process::id(), "url": url}).to_string();
        std::fs::write(&tmp, text + "\n")
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| anyhow::anyhow!("--ready-file {}: {e}", path.display()))?;
        Ok(ReadyFile(path.to_path_buf()))
    }
}

impl Drop for ReadyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A log file rotated by size (see the module comment). Shared by the log's writers.
#[derive(Clone)]
pub struct RotatingFile {
    inner: Arc<Mutex<Rotating>>,
}

struct Rotating {
    path: PathBuf,
    file: File,
    size: u64,
    max_size: u64,
    keep: u32,
}

impl RotatingFile {
    pub fn open(path: &Path, max_size: u64, keep: u32) -> anyhow::Result<RotatingFile> {
        let file = open_append(path)?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(RotatingFile {
            inner: Arc::new(Mutex::new(Rotating {
                path: path.to_path_buf(),
                file,
                size,
                max_size: max_size.max(4096),
                keep,
            })),
        })
    }
}

fn open_append(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| anyhow::anyhow!("--log-file {}: {e}", path.display()))
}

impl Rotating {
    /// F.(keep-1) -> F.keep, ..., F -> F.1, and a new F. A failure keeps writing to the old
    /// file: the log is never lost for a rename.
    fn rotate(&mut self) {
        let name = |i: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        if self.keep == 0 {
            let _ = std::fs::remove_file(&self.path);
        } else {
            for i in (1..self.keep).rev() {
                let _ = std::fs::rename(name(i), name(i + 1));
            }
            let _ = std::fs::rename(&self.path, name(1));
        }
        if let Ok(f) = open_append(&self.path) {
            self.file = f;
            self.size = 0;
        }
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut r = self
            .inner
            .lock()
            .map_err(|_| std::io::Error::other("log file lock poisoned"))?;
        if r.size > 0 && r.size + buf.len() as u64 > r.max_size {
            r.rotate();
        }
        let n = r.file.write(buf)?;
        r.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self.inner.lock() {
            Ok(mut r) => r.file.flush(),
            Err(_) => Ok(()),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RotatingFile {
    type Writer = RotatingFile;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_rotates_by_size_and_keeps_as_many_old_files_as_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.log");
        let mut f = RotatingFile::open(&path, 4096, 2).unwrap();
        let line = [b'x'; 1000];
        for _ in 0..20 {
            f.write_all(&line).unwrap();
        }
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(size(&path) <= 4096, "the live file stays under the size");
        assert!(size(&dir.path().join("agent.log.1")) > 0);
        assert!(size(&dir.path().join("agent.log.2")) > 0);
        assert!(
            !dir.path().join("agent.log.3").exists(),
            "keeps 2 old files"
        );
    }

    #[test]
    fn readiness_goes_to_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock_path = dir.path().join("notify");
        let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
        send_notify(sock_path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
