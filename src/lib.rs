//! # lumenflow-agent
//!
//! The local, embedded, actor-based agent that hosts LumenFlow packs inside one workspace.
//! This crate is the edge: CLI, workspace and config loading, the wiring of the actor tree
//! (`lumenflow-actors`), the local HTTP API and the status client. A Rust program can embed the
//! agent and register native packs through [`lumenflow_pack_sdk::NativePack`].

pub mod agent;
pub mod api;
pub mod api_server;
pub mod cli;
pub mod client;
pub mod commands;
pub mod conductor;
pub mod config;
pub mod enrollment;
pub mod limits;
pub mod metrics;
pub mod packs;
pub mod run;
pub mod service;
pub mod sync_port;
pub mod tap_api;
pub mod workspace;
pub mod workspace_yaml;

pub use lumenflow_actors as actors;
pub use lumenflow_pack_sdk as sdk;
