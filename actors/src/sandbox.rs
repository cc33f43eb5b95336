//! Confinement of an exec pack's worker, opt-in per pack: a manifest whose tools declare
//! `required_scopes` (the platform's own field) gets a worker that can reach exactly that.
//!
//! What is enforced, by the kernel, from the worker's `exec` on (it and all its children):
//! - **Files** (Landlock): read and execute under the system folders (`/usr`, `/bin`, `/sbin`,
//!   `/lib`, `/lib64`, `/etc` less its secrets: the platform's own list), the pack folder, the
//!   folders of the program that runs it, `/proc` and `/dev`; read under each `access: read`
//!   path scope; everything under each `access: write` path scope and the worker's private
//!   `TMPDIR`. Nothing else: opening `~/.ssh/id_rsa` fails with `EACCES`. A scope's pattern
//!   counts from its static prefix (`src/**/*.ts` is `src/`), relative to the workspace.
//! - **Network**: the union of the tools' network scopes, as the platform computes it (`full`
//!   wins over `allowlist`, no network scope is `off`). `off` is a seccomp filter that refuses
//!   `socket(AF_INET|AF_INET6, …)` (and `io_uring_setup`, which could open one behind it) with
//!   `EACCES`, plus Landlock's TCP rules where the kernel has them (ABI 4). `allowlist` names
//!   hosts, which neither Landlock nor seccomp can check: such a pack fails closed.
//! - **Limits**: `RLIMIT_NOFILE` 1024 and `RLIMIT_NPROC` 4096 (a fork-bomb guard; root is
//!   exempt from it). Never `RLIMIT_AS`: it kills V8 at start.
//!
//! Fails closed: a pack that declares scopes on a kernel without Landlock (or seccomp, for
//! `off`) is not started, with a message naming what is missing. Everything the child does
//! between fork and exec is a raw system call on memory prepared here in the parent (the
//! ruleset's file descriptor, the compiled filter): no allocation after fork.

use lumenflow_pack_sdk::Manifest;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Files a sandboxed worker may open at once.
pub const SANDBOX_NOFILE: u64 = 1024;
/// Processes the worker's user may have (checked by the kernel at fork; root is exempt).
pub const SANDBOX_NPROC: u64 = 4096;
/// Read-only system folders, the platform's `SYSTEM_READONLY_ALLOWLIST` (`/etc` is added
/// entry by entry, less [`ETC_SECRETS`]).
const SYSTEM_READ: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib64"];
/// What a worker never reads under `/etc`, even though the platform's list has `/etc` whole:
/// password hashes, sudo rules, host keys, TLS private keys.
const ETC_SECRETS: &[&str] = &[
    "shadow",
    "shadow-",
    "gshadow",
    "gshadow-",
    "sudoers",
    "sudoers.d",
    "ssh",
    "ssl/private",
    "security/opasswd",
];

/// The entries of `dir` less the `denied` paths (relative, at most two levels deep).
fn entries_less(dir: &Path, denied: &[&str]) -> Vec<PathBuf> {
    let Ok(list) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in list.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if denied.contains(&name.as_str()) {
            continue;
        }
        let below: Vec<&str> = denied
            .iter()
            .filter_map(|d| d.strip_prefix(&format!("{name}/")))
            .collect();
        if below.is_empty() {
            out.push(e.path());
        } else {
            out.extend(entries_less(&e.path(), &below));
        }
    }
    out
}

/// The network a pack's tools declare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    Off,
    Full,
    Allowlist(Vec<String>),
}

/// What a pack's manifest asks for, resolved against the workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scopes {
    pub read: Vec<PathBuf>,
    pub write: Vec<PathBuf>,
    pub network: Network,
}

/// Why a declared confinement cannot be enforced (the worker is not started).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the manifest's required_scopes cannot be enforced here: {0} (the agent does not run a pack with less confinement than it declares)")]
pub struct CannotEnforce(pub String);

/// The static prefix of a scope pattern: its segments before the first glob segment.
fn static_prefix(pattern: &str, workspace: &Path) -> PathBuf {
    let normalized = pattern.replace('\\', "/");
    let mut out = if normalized.starts_with('/') {
        PathBuf::from("/")
    } else {
        workspace.to_path_buf()
    };
    for seg in normalized.split('/').filter(|s| !s.is_empty()) {
        if seg.contains(['*', '?', '[', '{', '(']) {
            break;
        }
        out.push(seg);
    }
    out
}

/// The union of the scopes the manifest's tools declare; `None` when no tool declares any
/// (the pack is not confined).
pub fn scopes_of(manifest: &Manifest, workspace: &Path) -> Option<Scopes> {
    let tools = manifest.raw.get("tools")?.as_array()?;
    let mut declared = false;
    let (mut read, mut write) = (Vec::new(), Vec::new());
    let (mut full, mut allow) = (false, None::<Vec<String>>);
    for scope in tools
        .iter()
        .filter_map(|t| t.get("required_scopes")?.as_array())
        .flatten()
    {
        declared = true;
        match scope.get("type").and_then(Value::as_str) {
            Some("network") => match scope.get("posture").and_then(Value::as_str) {
                Some("full") => full = true,
                Some("allowlist") => {
                    let entries: Vec<String> = scope
                        .get("allowlist_entries")
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(|e| e.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default();
                    allow.get_or_insert_with(Vec::new).extend(entries);
                }
                _ => {}
            },
            _ => {
                let Some(pattern) = scope.get("pattern").and_then(Value::as_str) else {
                    continue;
                };
                let path = static_prefix(pattern, workspace);
                if scope.get("access").and_then(Value::as_str) == Some("write") {
                    write.push(path);
                } else {
                    read.push(path);
                }
            }
        }
    }
    if !declared {
        return None;
    }
    let network = match (full, allow) {
        (true, _) => Network::Full,
        (false, Some(mut hosts)) => {
            hosts.sort();
            hosts.dedup();
            Network::Allowlist(hosts)
        }
        (false, None) => Network::Off,
    };
    read.sort();
    read.dedup();
    write.sort();
    write.dedup();
    Some(Scopes {
        read,
        write,
        network,
    })
}

/// The Landlock ABI this kernel offers (0: none).
pub fn landlock_abi() -> i32 {
    #[cfg(target_os = "linux")]
    {
        // landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) returns the ABI.
        let r = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<u8>(),
                0usize,
                1u32,
            )
        };
        if r > 0 {
            return r as i32;
        }
    }
    0
}

/// Whether seccomp filters can be installed here.
pub fn seccomp_available() -> bool {
    #[cfg(target_os = "linux")]
    {
        // PR_GET_SECCOMP fails with EINVAL on a kernel built without seccomp.
        unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) >= 0 }
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// What this machine can enforce, for `status` and `validate`.
pub fn kernel_support() -> String {
    let abi = landlock_abi();
    let fs = if abi > 0 {
        format!("Landlock ABI {abi}")
    } else {
        "no Landlock".to_string()
    };
    let net = if seccomp_available() {
        "seccomp"
    } else {
        "no seccomp"
    };
    format!("{fs}, {net}")
}

/// One line that says what a pack's worker is confined to.
pub fn describe(scopes: Option<&Scopes>) -> String {
    let Some(s) = scopes else {
        return "none (no tool declares required_scopes)".into();
    };
    let net = match &s.network {
        Network::Off => "network off".to_string(),
        Network::Full => "network full".to_string(),
        Network::Allowlist(h) => format!("network allowlist {} (cannot be enforced)", h.join(",")),
    };
    format!(
        "files: read {} + system, write {} + TMPDIR; {net}; nofile {SANDBOX_NOFILE}, nproc {SANDBOX_NPROC}",
        s.read.len(),
        s.write.len()
    )
}

/// Checks that `scopes` can be enforced on this kernel.
pub fn check_enforceable(scopes: &Scopes) -> Result<(), CannotEnforce> {
    if let Network::Allowlist(hosts) = &scopes.network {
        return Err(CannotEnforce(format!(
            "network posture allowlist ({}) names hosts, which the kernel's Landlock and seccomp cannot restrict; declare posture full or off",
            hosts.join(", ")
        )));
    }
    if landlock_abi() < 1 {
        return Err(CannotEnforce(
            "this kernel has no Landlock (needs Linux 5.13+ with landlock in the lsm= list)".into(),
        ));
    }
    if scopes.network == Network::Off && !seccomp_available() {
        return Err(CannotEnforce(
            "network posture off needs seccomp, which this kernel lacks".into(),
        ));
    }
    Ok(())
}

/// A confinement ready to apply in the child: everything allocated here, in the parent.
pub struct Confinement {
    #[cfg(target_os = "linux")]
    ruleset: std::os::fd::OwnedFd,
    #[cfg(target_os = "linux")]
    filter: Option<seccompiler::BpfProgram>,
}

/// The folders a program needs to be executed from: its own and its parent, by the path it
/// is found at and by the path it resolves to (`/usr/local/bin/node` -> `/opt/node/bin`).
fn program_dirs(program: &Path, path_var: Option<&std::ffi::OsStr>) -> Vec<PathBuf> {
    let found = if program.components().count() > 1 {
        Some(program.to_path_buf())
    } else {
        crate::exec_worker::find_on_path(program, path_var)
    };
    let mut dirs = Vec::new();
    for p in found
        .iter()
        .cloned()
        .chain(found.iter().filter_map(|p| p.canonicalize().ok()))
    {
        if let Some(d) = p.parent() {
            dirs.push(d.to_path_buf());
            if let Some(g) = d.parent().filter(|g| g.parent().is_some()) {
                dirs.push(g.to_path_buf());
            }
        }
    }
    dirs
}

impl Confinement {
    /// Builds the ruleset and the filter for a worker of `pack_dir` started as `program`.
    #[cfg(target_os = "linux")]
    pub fn prepare(
        scopes: &Scopes,
        pack_dir: &Path,
        program: &Path,
        path_var: Option<&std::ffi::OsStr>,
        tmpdir: &Path,
    ) -> Result<Confinement, CannotEnforce> {
        use landlock::{
            path_beneath_rules, Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset,
            RulesetAttr, RulesetCreatedAttr, ABI,
        };
        check_enforceable(scopes)?;
        let abi = ABI::from(landlock_abi());
        let fail = |e: &dyn std::fmt::Display| CannotEnforce(format!("Landlock: {e}"));
        let mut read: Vec<PathBuf> = SYSTEM_READ.iter().map(PathBuf::from).collect();
        read.extend(entries_less(Path::new("/etc"), ETC_SECRETS));
        read.extend(["/proc", "/dev"].map(PathBuf::from));
        read.push(pack_dir.to_path_buf());
        read.extend(program_dirs(program, path_var));
        read.extend(scopes.read.iter().cloned());
        let mut write = scopes.write.clone();
        write.push(tmpdir.to_path_buf());
        let devices = ["/dev/null", "/dev/zero", "/dev/full", "/dev/tty"];
        let read_access = AccessFs::from_read(abi);
        let mut ruleset = Ruleset::default()
            .set_compatibility(CompatLevel::HardRequirement)
            .handle_access(AccessFs::from_all(abi))
            .map_err(|e| fail(&e))?;
        let net_rules = scopes.network == Network::Off && abi >= ABI::V4;
        if net_rules {
            ruleset = ruleset
                .handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)
                .map_err(|e| fail(&e))?;
        }
        let created = ruleset
            .create()
            .map_err(|e| fail(&e))?
            .add_rules(path_beneath_rules(&read, read_access))
            .map_err(|e| fail(&e))?
            .add_rules(path_beneath_rules(&write, AccessFs::from_all(abi)))
            .map_err(|e| fail(&e))?
            .add_rules(path_beneath_rules(devices, AccessFs::from_file(abi)))
            .map_err(|e| fail(&e))?;
        let fd: Option<std::os::fd::OwnedFd> = created.into();
        let ruleset = fd.ok_or_else(|| CannotEnforce("Landlock created no ruleset".into()))?;
        let filter = match scopes.network {
            Network::Off => Some(no_inet_filter()?),
            _ => None,
        };
        Ok(Confinement { ruleset, filter })
    }

    #[cfg(not(target_os = "linux"))]
    pub fn prepare(
        _: &Scopes,
        _: &Path,
        _: &Path,
        _: Option<&std::ffi::OsStr>,
        _: &Path,
    ) -> Result<Confinement, CannotEnforce> {
        Err(CannotEnforce("confinement needs Linux".into()))
    }

    /// Applies the confinement to the calling process. Runs in the child between fork and
    /// exec: system calls only, on memory prepared in the parent.
    #[cfg(target_os = "linux")]
    pub fn apply_in_child(&self) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let err = std::io::Error::last_os_error;
        unsafe {
            for (res, n) in [
                (libc::RLIMIT_NOFILE, SANDBOX_NOFILE),
                (libc::RLIMIT_NPROC, SANDBOX_NPROC),
            ] {
                let mut cur = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(res, &mut cur) != 0 {
                    return Err(err());
                }
                let lim = libc::rlimit {
                    rlim_cur: n.min(cur.rlim_max),
                    rlim_max: n.min(cur.rlim_max),
                };
                if libc::setrlimit(res, &lim) != 0 {
                    return Err(err());
                }
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(err());
            }
            if libc::syscall(
                libc::SYS_landlock_restrict_self,
                self.ruleset.as_raw_fd(),
                0u32,
            ) != 0
            {
                return Err(err());
            }
            if let Some(filter) = &self.filter {
                let prog = libc::sock_fprog {
                    len: filter.len() as u16,
                    filter: filter.as_ptr() as *mut libc::sock_filter,
                };
                if libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                ) != 0
                {
                    return Err(err());
                }
            }
        }
        Ok(())
    }

    #[cfg(not(target_os = "linux"))]
    pub fn apply_in_child(&self) -> std::io::Result<()> {
        Err(std::io::Error::other("confinement needs Linux"))
    }
}

/// seccomp: `socket(AF_INET | AF_INET6, …)` and `io_uring_setup` fail with `EACCES`.
#[cfg(target_os = "linux")]
fn no_inet_filter() -> Result<seccompiler::BpfProgram, CannotEnforce> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };
    let fail = |e: &dyn std::fmt::Display| CannotEnforce(format!("seccomp: {e}"));
    let family = |f: i32| {
        SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, f as u64)
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(|e| fail(&e))
    };
    let rules = [
        (
            libc::SYS_socket,
            vec![family(libc::AF_INET)?, family(libc::AF_INET6)?],
        ),
        (libc::SYS_io_uring_setup, vec![]),
    ];
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| fail(&e))?;
    let filter = SeccompFilter::new(
        rules.into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        arch,
    )
    .map_err(|e| fail(&e))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| fail(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(tools: Value) -> Manifest {
        let mut m = Manifest::from_json_str(
            r#"{"id": "p", "version": "1.0.0", "task_types": ["t"]}"#,
            &[],
        )
        .unwrap();
        m.raw.insert("tools".into(), tools);
        m
    }

    #[test]
    fn patterns_count_from_their_static_prefix() {
        let ws = Path::new("/ws");
        assert_eq!(static_prefix("src/**/*.ts", ws), PathBuf::from("/ws/src"));
        assert_eq!(static_prefix("**", ws), PathBuf::from("/ws"));
        assert_eq!(static_prefix("/var/data/*", ws), PathBuf::from("/var/data"));
        assert_eq!(static_prefix("a\\b", ws), PathBuf::from("/ws/a/b"));
    }

    #[test]
    fn scopes_are_the_union_of_the_tools_with_the_platforms_network_rule() {
        let none = manifest(serde_json::json!([{"name": "t", "entry": "t.mjs"}]));
        assert_eq!(scopes_of(&none, Path::new("/ws")), None);
        let m = manifest(serde_json::json!([
            {"name": "a", "required_scopes": [{"type": "path", "pattern": "docs/**", "access": "read"}]},
            {"name": "b", "required_scopes": [{"type": "path", "pattern": "out/*", "access": "write"}]}
        ]));
        let s = scopes_of(&m, Path::new("/ws")).unwrap();
        assert_eq!(s.read, vec![PathBuf::from("/ws/docs")]);
        assert_eq!(s.write, vec![PathBuf::from("/ws/out")]);
        assert_eq!(s.network, Network::Off, "no network scope is off");
        let m = manifest(serde_json::json!([
            {"name": "a", "required_scopes": [{"type": "network", "posture": "allowlist", "allowlist_entries": ["x:443"]}]},
            {"name": "b", "required_scopes": [{"type": "network", "posture": "full"}]}
        ]));
        assert_eq!(
            scopes_of(&m, Path::new("/ws")).unwrap().network,
            Network::Full
        );
    }

    #[test]
    fn etc_is_granted_entry_by_entry_without_its_secrets() {
        let tmp = std::env::temp_dir().join(format!("lf-sandbox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        for d in ["ssl/private", "ssl/certs", "ssh"] {
            std::fs::create_dir_all(tmp.join(d)).unwrap();
        }
        for f in ["shadow", "passwd", "hosts"] {
            std::fs::write(tmp.join(f), "").unwrap();
        }
        let mut got: Vec<String> = entries_less(&tmp, ETC_SECRETS)
            .iter()
            .map(|p| p.strip_prefix(&tmp).unwrap().display().to_string())
            .collect();
        got.sort();
        assert_eq!(got, vec!["hosts", "passwd", "ssl/certs"]);
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn an_allowlist_fails_closed() {
        let s = Scopes {
            read: vec![],
            write: vec![],
            network: Network::Allowlist(vec!["api.example.com:443".into()]),
        };
        let e = check_enforceable(&s).unwrap_err();
        assert!(e.to_string().contains("api.example.com:443"), "{e}");
    }
}
