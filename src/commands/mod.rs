//! One module per CLI command. Each returns the process exit code, or an error that the CLI
//! edge prints (exit 2: usage or environment).

pub mod approvals;
pub mod conductor;
pub mod conformance;
pub mod dlq;
pub mod emit;
pub mod enroll;
pub mod graph;
pub mod inbox;
pub mod new_pack;
pub mod start;
pub mod status;
pub mod stop;
pub mod tap;
pub mod top;
pub mod validate;

/// Exit codes of SPEC §12.
pub mod exit {
    pub const OK: u8 = 0;
    pub const INVALID: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const NOT_RUNNING: u8 = 3;
}

/// A multi-line text (a handler's stack trace) on one line, for tables: its first line, and how
/// many more there are (the full text is in `--json` and the log).
pub fn one_line(text: &str) -> String {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().unwrap_or("").trim().to_string();
    match lines.count() {
        0 => first,
        n => format!("{first} (+{n} more lines: see --json)"),
    }
}
