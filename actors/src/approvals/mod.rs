//! Approvals: events of `required_approvals` kinds held until a person or the control plane
//! decides (`held`), the platform's sync-port approval calls answered locally (`records`), and
//! the actor that expires held events and, in conductor mode, carries requests and decisions
//! to and from the control plane (`actor`).
//!
//! One table, `approvals`, holds both kinds of approval: a plain sync-port request (its
//! `ApprovalRecord`) and a held event (the record plus the event, its payload hash, deadline
//! and expiry rule). A decision on either goes through `held::decide`.

pub mod actor;
pub mod held;
pub mod records;

pub use actor::Approvals;
pub use held::{ApprovalPolicy, Decided, Hold, OnExpiry, SharedPolicy};
pub use records::{ApprovalError, ListApprovals, RequestApproval, ResolveApproval, LIST_MAX};
