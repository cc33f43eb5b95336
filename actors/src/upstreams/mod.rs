//! The upstreams: where pack events go (SPEC §9), one transport each, on one shared delivery
//! loop.
//!
//! - [`drain`]: the loop every upstream shares (rounds in order, ack accounting, backoff, the
//!   ephemeral ring) and the messages they all take (`Push`, `IsIdle`);
//! - [`outbox`]: reading and settling the durable outbox;
//! - [`mem`]: the embedded `mem:inbox` (one transaction into a local table);
//! - [`http`]: the LumenFlow control plane (its wire protocol, heartbeat, policies, the inbound
//!   long-poll and the sync-port records);
//! - [`nats`]: NATS JetStream for fleets (publish acks, a durable pull consumer).

pub mod drain;
pub mod http;
pub mod mem;
pub mod nats;
pub mod outbox;
