//! Native packs: handlers written in Rust and registered with an embedded agent, the library
//! form of the quickstart's `packRegistry.register({manifest, handlers})`.
//!
//! A handler is an async function of the event and a [`HandlerCtx`]; the context gives it the
//! replay log (`replay_has`/`replay_put` on its own keys) and `emit`, backed by the running
//! agent through [`PackServices`]. A panic inside a handler is caught by the agent and treated
//! as a crash of the pack (SPEC §7); it never unwinds into the agent.

use crate::envelope::{Envelope, EventDraft};
use crate::manifest::{Diagnostic, Manifest};
use crate::outcome::HandlerOutcome;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Why a call from a handler into the agent failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// The request was refused (e.g. `Unknown kind at emit: …`); retrying will not help.
    #[error("{0}")]
    Rejected(String),
    /// The durable queue is full; retry after the given delay.
    #[error("Backpressure: the durable queue is full; retry after {retry_after_ms} ms")]
    Backpressure { retry_after_ms: u64 },
    /// The agent could not serve the request right now (shutting down, storage error).
    #[error("Agent unavailable: {0}")]
    Unavailable(String),
}

/// What the agent offers a running handler.
pub trait PackServices: Send + Sync {
    fn replay_has(&self, key: String) -> BoxFuture<Result<bool, ServiceError>>;
    fn replay_put(&self, key: String) -> BoxFuture<Result<(), ServiceError>>;
    /// Emits on behalf of the pack; returns the event id.
    fn emit(&self, draft: EventDraft) -> BoxFuture<Result<String, ServiceError>>;
}

/// Per-delivery context handed to a native handler.
#[derive(Clone)]
pub struct HandlerCtx {
    pub pack: String,
    /// 1 for the first delivery of this event to this pack.
    pub attempt: u32,
    /// True when the event was delivered before (after a crash or a `retry`).
    pub redelivered: bool,
    services: Arc<dyn PackServices>,
}

impl HandlerCtx {
    pub fn new(pack: String, attempt: u32, services: Arc<dyn PackServices>) -> Self {
        HandlerCtx {
            pack,
            attempt,
            redelivered: attempt > 1,
            services,
        }
    }

    /// Has this pack recorded `key` in the replay log?
    pub async fn replay_has(&self, key: &str) -> Result<bool, ServiceError> {
        self.services.replay_has(key.to_string()).await
    }

    /// Records `key` in the replay log (after the effect, as in the quickstart). During a
    /// delivery the key is committed together with the event's outcome: a handler that crashes
    /// before finishing leaves no key behind.
    pub async fn replay_put(&self, key: &str) -> Result<(), ServiceError> {
        self.services.replay_put(key.to_string()).await
    }

    /// Emits an event of this pack; `idempotency_key` makes the id deterministic. The event is
    /// checked at once (an undeclared kind is an error here) and, during a delivery, committed
    /// together with the event's outcome: a delivery that crashes or asks for a retry emits
    /// nothing, so a redelivered event's emits are not doubled.
    pub async fn emit(
        &self,
        kind: &str,
        payload: Map<String, Value>,
        idempotency_key: Option<&str>,
    ) -> Result<String, ServiceError> {
        let mut draft = EventDraft::new(kind, payload);
        draft.idempotency_key = idempotency_key.map(str::to_string);
        self.services.emit(draft).await
    }
}

/// A handler gets the event shared (`Arc`): the agent keeps it for redelivery and dead
/// letters, so handing it over costs no copy.
pub type NativeHandler =
    Arc<dyn Fn(Arc<Envelope>, HandlerCtx) -> BoxFuture<HandlerOutcome> + Send + Sync>;

/// A validated manifest with a handler for every subscribed kind.
#[derive(Clone)]
pub struct NativePack {
    pub manifest: Manifest,
    pub handlers: BTreeMap<String, NativeHandler>,
}

impl std::fmt::Debug for NativePack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativePack")
            .field("id", &self.manifest.id)
            .field("handlers", &self.handlers.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Builds a [`NativePack`]: `NativePack::builder(MANIFEST_JSON).on(kind, handler).build()`.
pub struct NativePackBuilder {
    manifest_json: String,
    handlers: BTreeMap<String, NativeHandler>,
}

impl NativePack {
    pub fn builder(manifest_json: impl Into<String>) -> NativePackBuilder {
        NativePackBuilder {
            manifest_json: manifest_json.into(),
            handlers: BTreeMap::new(),
        }
    }
}

impl NativePackBuilder {
    /// Registers the handler of one subscribed kind.
    pub fn on<F, Fut>(mut self, kind: &str, handler: F) -> Self
    where
        F: Fn(Arc<Envelope>, HandlerCtx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerOutcome> + Send + 'static,
    {
        let h: NativeHandler = Arc::new(move |e, ctx| Box::pin(handler(e, ctx)));
        self.handlers.insert(kind.to_string(), h);
        self
    }

    /// Validates the manifest, including `Missing handler: …` for every subscribed kind
    /// without a handler.
    pub fn build(self) -> Result<NativePack, Vec<Diagnostic>> {
        let handled: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
        let manifest = Manifest::from_json_str(&self.manifest_json, &handled)?;
        Ok(NativePack {
            manifest,
            handlers: self.handlers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::HandlerOutcome;

    const M: &str = r#"{"id":"acme-demo","version":"0.1.0",
        "emitted_event_kinds":["acme-demo:job_completed"],
        "subscribed_event_kinds":["conductor:recovery_requested"],
        "backpressure_policy":{"acme-demo:job_completed":"ephemeral"}}"#;

    #[test]
    fn builder_requires_a_handler_per_subscribed_kind() {
        let err = NativePack::builder(M).build().unwrap_err();
        assert_eq!(err.len(), 1);
        assert_eq!(
            err[0].message,
            "Missing handler: subscribed kind \"conductor:recovery_requested\" has no registered handler"
        );
        let pack = NativePack::builder(M)
            .on("conductor:recovery_requested", |_e, _ctx| async {
                HandlerOutcome::handled("recovered")
            })
            .build()
            .unwrap();
        assert_eq!(pack.manifest.id, "acme-demo");
        assert!(pack.handlers.contains_key("conductor:recovery_requested"));
    }
}
