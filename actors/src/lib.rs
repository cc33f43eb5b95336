//! # lumenflow-actors
//!
//! The actors of `lumenflow-agent`, one per file. Each module comment says what the actor owns
//! and what it guarantees.
//!
//! ```text
//! Store        one SQLite writer; group commits for every table
//! ReplayLog    (pack, event) finished?  handler keys; retention
//! DurableQueue admission: durable before ack, backpressure at max depth
//! upstreams/   one delivery loop (drain: rounds, acks, backoff, ephemeral ring) and one
//!              transport each: mem:inbox (embedded), HTTP (the control plane: events,
//!              sync-port records, pulls), NATS JetStream (fleets)
//! Router       kind -> packs; inbound log; dispatch in commit order
//! PackRegistry which packs run; validated hot reloads, atomic route swaps
//! Watcher      notify + debouncer on the packs root and agent.json
//! PackHost     one per pack: in-order delivery, dedupe, crash -> restart, dead letters
//!   EffectStage  (owned by a PackHost) handlers' emits and keys, committed with the outcome
//!   ExecWorker   (owned by a PackHost) a handler program spoken to in JSON-RPC over stdio
//! ```
//!
//! Every actor runs under an actix `Supervisor`. actix restarts an actor only when it
//! *stops*; a panic inside a handler would kill it silently, so handler code runs in its own
//! task and a panic there becomes a stop (see `pack_host`), with restart intensity counted in
//! [`supervision`].

pub mod approvals;
pub mod dead_letters;
pub mod effects;
pub mod exec_worker;
pub mod inbound_events;
pub mod pack_host;
pub mod pack_registry;
pub mod policy_mode;
pub mod queue;
pub mod rates;
pub mod replay_log;
pub mod router;
pub mod sandbox;
pub mod schema;
pub mod stats;
pub mod store;
pub mod supervision;
pub mod sync_records;
pub mod tap;
pub mod upstreams;
pub mod watcher;
pub mod worker_clock;
