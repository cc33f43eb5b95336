//! One module per CLI command. Each returns the process exit code, or an error that the CLI
//! edge prints (exit 2: usage or environment).

pub mod conductor;
pub mod conformance;
pub mod dlq;
pub mod emit;
pub mod enroll;
pub mod inbox;
pub mod new_pack;
pub mod start;
pub mod status;
pub mod validate;

/// Exit codes of SPEC §12.
pub mod exit {
    pub const OK: u8 = 0;
    pub const INVALID: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const NOT_RUNNING: u8 = 3;
}
