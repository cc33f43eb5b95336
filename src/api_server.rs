//! The local API's connections: what one local process can hold of the agent, and for how
//! long. `axum::serve` has no timeouts and no limit, so 1,100 idle sockets (no token needed)
//! used to exhaust the agent's file descriptors and hold 370 MB.
//!
//! Guarantees (defaults in [`Limits`], all in `SECURITY.md`):
//! - **Headers**: a connection that has not sent a complete request head within
//!   `header_timeout` is closed. Hyper runs this timer from the moment the connection is ready
//!   for a request, so it is also the idle timeout of a keep-alive connection.
//! - **Body**: an authorized request whose body has not fully arrived within `body_timeout` is
//!   answered 408 and the connection closed (`api::guard` reads it).
//! - **Writes**: a client that stops reading its response for `write_timeout` is dropped.
//! - **Connections**: at most `max_connections` at once (below the file-descriptor limit, with
//!   room kept for the store, workers and upstreams); one more is closed at once, counted in
//!   `status` (`api.refused`). An `accept` error (EMFILE) pauses accepting briefly instead of
//!   spinning.
//! - **Memory**: a connection buffers at most [`MAX_BUF`] of request head; freed memory is
//!   handed back to the OS after a flood (`trim_memory`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Largest buffered request head (hyper's read buffer) per connection.
pub const MAX_BUF: usize = 64 << 10;
/// How long an authorized request's body may take to arrive.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub write_timeout: Duration,
    pub max_connections: usize,
}

impl Limits {
    /// The defaults, with the connection limit fitted to the process's file-descriptor limit:
    /// half of it, at most 4096, at least 16.
    pub fn for_fd_limit(nofile: u64) -> Limits {
        Limits {
            header_timeout: Duration::from_secs(10),
            body_timeout: BODY_TIMEOUT,
            write_timeout: Duration::from_secs(15),
            max_connections: ((nofile / 2) as usize).clamp(16, 4096),
        }
    }
}

/// Live connection counts, for `status`.
#[derive(Debug, Default)]
pub struct Connections {
    pub open: AtomicUsize,
    pub refused: AtomicU64,
    pub max: AtomicUsize,
}

/// Serves `app` on `listener` within `limits` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: Limits,
    conns: Arc<Connections>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    conns.max.store(limits.max_connections, Ordering::Relaxed);
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut last_warning = None::<std::time::Instant>;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE/ENFILE: the connection stays in the backlog; try again shortly.
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(error = %e, "local API cannot accept a connection; pausing accepts for 100 ms");
                    last_warning = Some(std::time::Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            conns.refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut io = tokio_io_timeout::TimeoutStream::new(stream);
        io.set_write_timeout(Some(limits.write_timeout));
        let io = TokioIo::new(Box::pin(io));
        let service = TowerToHyperService::new(app.clone());
        let conns = conns.clone();
        conns.open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(MAX_BUF)
                .serve_connection(io, service)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "local API connection ended");
            }
            conns.open.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

/// Returns freed heap memory to the OS (glibc keeps it otherwise: after a flood of connections
/// or one large batch, RSS stayed at its peak).
pub fn trim_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_limit_leaves_room_below_the_fd_limit() {
        assert_eq!(Limits::for_fd_limit(1024).max_connections, 512);
        assert_eq!(Limits::for_fd_limit(20_000).max_connections, 4096);
        assert_eq!(Limits::for_fd_limit(20).max_connections, 16);
    }
}
