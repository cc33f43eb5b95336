//! Process-wide resource limits the agent sets for itself at start.
//!
//! The soft open-files limit is raised to the hard one: with the common soft 1024, 300 exec
//! packs (three pipes each) used to leave 49 of them `crashed` with EMFILE. What was done is
//! kept for `status` (`limits.open_files`).

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct OpenFiles {
    /// The soft limit in force.
    pub limit: u64,
    /// The hard limit (the most it can be raised to without privileges).
    pub hard: u64,
    /// The soft limit the agent was started with.
    pub started_with: u64,
}

static OPEN_FILES: OnceLock<OpenFiles> = OnceLock::new();

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (once) and returns what is in force.
pub fn raise_open_files() -> OpenFiles {
    *OPEN_FILES.get_or_init(|| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return OpenFiles {
                limit: 1024,
                hard: 1024,
                started_with: 1024,
            };
        }
        let started_with = lim.rlim_cur;
        // RLIM_INFINITY is not a valid soft limit for files: cap it as the kernel's nr_open does.
        let target = lim.rlim_max.min(1 << 20);
        if target > lim.rlim_cur {
            let raised = libc::rlimit {
                rlim_cur: target,
                rlim_max: lim.rlim_max,
            };
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                lim.rlim_cur = target;
            }
        }
        OpenFiles {
            limit: lim.rlim_cur,
            hard: lim.rlim_max,
            started_with,
        }
    })
}

/// What [`raise_open_files`] did, if it ran.
pub fn open_files() -> Option<OpenFiles> {
    OPEN_FILES.get().copied()
}
