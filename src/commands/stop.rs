//! `stop`: asks the workspace's running agent to stop (SIGTERM: it finishes the events in
//! flight, commits, and exits) and waits until it has. Exit 0 once it is gone, 3 when none
//! runs, 1 when it is still running after `--timeout`.

use super::exit;
use crate::agent::running_pid;
use crate::workspace::Workspace;
use std::path::Path;
use std::time::{Duration, Instant};

pub fn run(workspace: Option<&Path>, timeout_s: u64) -> anyhow::Result<u8> {
    let ws = Workspace::locate(workspace)?;
    let Some(pid) = running_pid(&ws) else {
        eprintln!("lumenflow-agent is not running in {}", ws.root.display());
        return Ok(exit::NOT_RUNNING);
    };
    let pid: i32 = pid.parse().map_err(|_| {
        anyhow::anyhow!(
            "the workspace lock names no pid ({:?}): is an agent starting?",
            pid
        )
    })?;
    // SAFETY: kill(2) with a pid read from the lock its holder wrote; no memory is shared.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        let e = std::io::Error::last_os_error();
        anyhow::bail!("cannot signal the agent (pid {pid}): {e}");
    }
    eprintln!("stopping lumenflow-agent (pid {pid}): finishing the events in flight…");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(timeout_s);
    // The lock is released when the process exits: that is "stopped".
    while running_pid(&ws).is_some() {
        if Instant::now() >= deadline {
            eprintln!(
                "lumenflow-agent (pid {pid}) is still running after {timeout_s} s; `kill -9 {pid}` ends it now (what it had accepted is kept, the events in flight come again)"
            );
            return Ok(exit::INVALID);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "stopped lumenflow-agent (pid {pid}) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(exit::OK)
}
