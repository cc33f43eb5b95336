//! # lumenflow-pack-sdk
//!
//! Everything a pack author touches, and nothing that runs: the manifest model and its
//! validation rules (SPEC §4), the schema-2 event envelope (SPEC §5), handler outcomes (SPEC §6),
//! and the types a Rust program uses to register a *native* pack with the agent.
//!
//! The crate has no runtime dependencies (no actix, no tokio, no SQLite) so that the agent's
//! `actors` crate and any pack can depend on it; dependencies point one way:
//! `lumenflow-agent` -> `lumenflow-actors` -> `lumenflow-pack-sdk`.

pub mod canonical;
pub mod envelope;
pub mod kernel;
pub mod kind;
pub mod manifest;
pub mod native;
pub mod outcome;
pub mod platform;

pub use envelope::{Envelope, EnvelopeError, EventDraft};
pub use kind::{DeliveryClass, KindError};
pub use manifest::{Diagnostic, Manifest, PackLoad, Severity};
pub use native::{BoxFuture, HandlerCtx, NativeHandler, NativePack, PackServices, ServiceError};
pub use outcome::{HandlerOutcome, OutcomeStatus};

/// Surfaces this agent provides to packs (`surfaces_required`).
pub const PROVIDED_SURFACES: &[&str] = &["http"];

/// Namespaces reserved for the control plane (`conductor:`), the agent itself (`agent:`) and
/// the platform's v1 kernel events (`kernel:task_completed`): packs may subscribe to kinds in
/// them, never emit them.
pub const RESERVED_NAMESPACES: &[&str] = &["conductor", "agent", "kernel"];
