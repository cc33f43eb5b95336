//! `lumenflow-test-agent`: the agent's CLI with native test packs registered, for the
//! end-to-end tests and the benchmark. Packs are chosen with `LUMENFLOW_TEST_PACKS`
//! (comma-separated; default: all).
//!
//! - `recorder` subscribes to `conductor:recovery_requested`, `emitter:job_completed` and
//!   `emitter:tick`. Its effect is a line `<kind> <event_id> attempt=<n>` appended to
//!   `$LUMENFLOW_TEST_EFFECTS` (default `effects.log` in the working directory), so tests
//!   count effects. The payload steers it: `{"panic": true}` panics, `{"sleep_ms": n}`
//!   sleeps, `{"outcome": "retry"|"failed"|"ignored"}` returns that status,
//!   `{"panic_until_attempt": n}` panics on attempts below n.
//!   `{"panic_while_exists": "/path"}` panics while that file exists (delete it to "fix").
//! - `observer` subscribes to `agent:pack_crashed` and `agent:event_dead_lettered` and appends
//!   them to `$LUMENFLOW_TEST_EFFECTS.agent`.
//! - `emitter` emits `emitter:job_completed` (queue) and `emitter:tick` (ephemeral).
//! - `ledger` subscribes to `emitter:job_completed` and follows the quickstart's pattern:
//!   `replay_has` before its effects, `replay_put` after. Two effects: an append to the effects
//!   file (outside the agent: at least once) and an emitted `ledger:entry_recorded` (queue, no
//!   idempotency key, `{"source": event_id}`; committed with the outcome: exactly once).
//!   `{"crash_after_effects_until_attempt": n}` panics after both effects (and the key) on
//!   attempts below n.
//! - `sink` subscribes to `bench:ping` and does nothing (for throughput benchmarks).
//! - `bench` emits `bench:ping` (queue) and `bench:pulse` (ephemeral).
//! - `phone` subscribes to `conductor:phone_requested` and emits `phone:send_requested` (queue,
//!   in `required_approvals`: held until approved) with `{"to": payload.to, "source":
//!   event_id}`, and `phone:sms_sent` (ephemeral, not held) with the same payload.
//! - `handset` subscribes to `phone:send_requested`, `phone:sms_sent`,
//!   `agent:approval_requested` and `agent:approval_resolved` and appends `<kind> <event_id>
//!   <payload>` to `$LUMENFLOW_TEST_EFFECTS.handset`.

use lumenflow_agent::sdk::Envelope;
use lumenflow_agent::sdk::{HandlerCtx, HandlerOutcome, NativePack};
use std::io::Write;
use std::sync::Arc;

const RECORDER: &str = r#"{"id":"recorder","version":"0.1.0",
  "subscribed_event_kinds":["conductor:recovery_requested","emitter:job_completed","emitter:tick"]}"#;
const EMITTER: &str = r#"{"id":"emitter","version":"0.1.0",
  "emitted_event_kinds":["emitter:job_completed","emitter:tick"],
  "backpressure_policy":{"emitter:job_completed":"queue","emitter:tick":"ephemeral"}}"#;
const OBSERVER: &str = r#"{"id":"observer","version":"0.1.0",
  "subscribed_event_kinds":["agent:pack_crashed","agent:event_dead_lettered"]}"#;
const LEDGER: &str = r#"{"id":"ledger","version":"0.1.0",
  "subscribed_event_kinds":["emitter:job_completed"],
  "emitted_event_kinds":["ledger:entry_recorded"],
  "backpressure_policy":{"ledger:entry_recorded":"queue"}}"#;
const PHONE: &str = r#"{"id":"phone","version":"0.1.0",
  "subscribed_event_kinds":["conductor:phone_requested"],
  "emitted_event_kinds":["phone:send_requested","phone:sms_sent"],
  "required_approvals":["phone:send_requested"],
  "backpressure_policy":{"phone:send_requested":"queue","phone:sms_sent":"ephemeral"}}"#;
const HANDSET: &str = r#"{"id":"handset","version":"0.1.0",
  "subscribed_event_kinds":["phone:send_requested","phone:sms_sent","agent:approval_requested","agent:approval_resolved"]}"#;
const SINK: &str = r#"{"id":"sink","version":"0.1.0","subscribed_event_kinds":["bench:ping"]}"#;
const BENCH: &str = r#"{"id":"bench","version":"0.1.0",
  "emitted_event_kinds":["bench:ping","bench:pulse"],
  "backpressure_policy":{"bench:ping":"queue","bench:pulse":"ephemeral"}}"#;

async fn record(e: Arc<Envelope>, ctx: HandlerCtx) -> HandlerOutcome {
    let p = &e.payload;
    if let Some(ms) = p.get("sleep_ms").and_then(|v| v.as_u64()) {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    if p.get("panic").and_then(|v| v.as_bool()) == Some(true) {
        panic!("poison payload in {}", e.event_id);
    }
    if let Some(flag) = p.get("panic_while_exists").and_then(|v| v.as_str()) {
        if std::path::Path::new(flag).exists() {
            panic!("poison: {flag} exists");
        }
    }
    if let Some(n) = p.get("panic_until_attempt").and_then(|v| v.as_u64()) {
        if u64::from(ctx.attempt) < n {
            panic!("flaky: attempt {} of {}", ctx.attempt, e.event_id);
        }
    }
    match p.get("outcome").and_then(|v| v.as_str()) {
        Some("retry") => return HandlerOutcome::retry("asked"),
        Some("failed") => return HandlerOutcome::failed("asked"),
        Some("ignored") => return HandlerOutcome::ignored("asked"),
        _ => {}
    }
    let path = std::env::var("LUMENFLOW_TEST_EFFECTS").unwrap_or_else(|_| "effects.log".into());
    let line = format!("{} {} attempt={}\n", e.kind, e.event_id, ctx.attempt);
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    match written {
        Ok(()) => HandlerOutcome::handled("recorded"),
        Err(err) => HandlerOutcome::retry(format!("cannot write {path}: {err}")),
    }
}

/// The ledger pack: the quickstart's pattern. Replay key checked before the effects (an append
/// to `$LUMENFLOW_TEST_EFFECTS`, an emitted entry), recorded after them.
async fn ledger(e: Arc<Envelope>, ctx: HandlerCtx) -> HandlerOutcome {
    let key = format!("ledger:{}", e.event_id);
    match ctx.replay_has(&key).await {
        Ok(true) => return HandlerOutcome::replayed("noop"),
        Ok(false) => {}
        Err(err) => return HandlerOutcome::retry(err.to_string()),
    }
    let path = std::env::var("LUMENFLOW_TEST_EFFECTS").unwrap_or_else(|_| "effects.log".into());
    let line = format!("{} {} attempt={}\n", e.kind, e.event_id, ctx.attempt);
    if let Err(err) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()))
    {
        return HandlerOutcome::retry(err.to_string());
    }
    let mut payload = serde_json::Map::new();
    payload.insert("source".into(), e.event_id.clone().into());
    if let Err(err) = ctx.emit("ledger:entry_recorded", payload, None).await {
        return HandlerOutcome::retry(err.to_string());
    }
    match ctx.replay_put(&key).await {
        Ok(())
            if e.payload
                .get("crash_after_effects_until_attempt")
                .and_then(|v| v.as_u64())
                .is_some_and(|n| u64::from(ctx.attempt) < n) =>
        {
            panic!(
                "crash after the effects of {} (attempt {})",
                e.event_id, ctx.attempt
            )
        }
        Ok(()) => HandlerOutcome::handled("recorded"),
        Err(err) => HandlerOutcome::retry(err.to_string()),
    }
}

/// The phone pack: asks to send (held) and says it sent (not held).
async fn phone(e: Arc<Envelope>, ctx: HandlerCtx) -> HandlerOutcome {
    let mut payload = serde_json::Map::new();
    payload.insert(
        "to".into(),
        e.payload.get("to").cloned().unwrap_or_default(),
    );
    payload.insert("source".into(), e.event_id.clone().into());
    for kind in ["phone:send_requested", "phone:sms_sent"] {
        if let Err(err) = ctx.emit(kind, payload.clone(), None).await {
            return HandlerOutcome::retry(err.to_string());
        }
    }
    HandlerOutcome::handled("asked")
}

/// The handset pack: appends `<kind> <event_id> <payload>` to `$LUMENFLOW_TEST_EFFECTS.handset`.
async fn handset(e: Arc<Envelope>, _ctx: HandlerCtx) -> HandlerOutcome {
    let path = std::env::var("LUMENFLOW_TEST_EFFECTS").unwrap_or_else(|_| "effects.log".into())
        + ".handset";
    let line = format!(
        "{} {} {}\n",
        e.kind,
        e.event_id,
        serde_json::Value::Object(e.payload.clone())
    );
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()))
    {
        Ok(()) => HandlerOutcome::handled("rang"),
        Err(err) => HandlerOutcome::retry(err.to_string()),
    }
}

/// The observer pack: appends `<kind> <payload>` to `$LUMENFLOW_TEST_EFFECTS.agent`.
async fn observe(e: Arc<Envelope>, _ctx: HandlerCtx) -> HandlerOutcome {
    let path =
        std::env::var("LUMENFLOW_TEST_EFFECTS").unwrap_or_else(|_| "effects.log".into()) + ".agent";
    let line = format!(
        "{} {}\n",
        e.kind,
        serde_json::Value::Object(e.payload.clone())
    );
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    HandlerOutcome::handled("observed")
}

fn packs() -> Vec<NativePack> {
    let wanted =
        std::env::var("LUMENFLOW_TEST_PACKS").unwrap_or_else(|_| "recorder,emitter".into());
    let mut out = Vec::new();
    for name in wanted.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let built = match name {
            "recorder" => NativePack::builder(RECORDER)
                .on("conductor:recovery_requested", record)
                .on("emitter:job_completed", record)
                .on("emitter:tick", record)
                .build(),
            "emitter" => NativePack::builder(EMITTER).build(),
            "observer" => NativePack::builder(OBSERVER)
                .on("agent:pack_crashed", observe)
                .on("agent:event_dead_lettered", observe)
                .build(),
            "ledger" => NativePack::builder(LEDGER)
                .on("emitter:job_completed", ledger)
                .build(),
            "sink" => NativePack::builder(SINK)
                .on("bench:ping", |_e, _ctx| async {
                    HandlerOutcome::handled("ok")
                })
                .build(),
            "bench" => NativePack::builder(BENCH).build(),
            "phone" => NativePack::builder(PHONE)
                .on("conductor:phone_requested", phone)
                .build(),
            "handset" => NativePack::builder(HANDSET)
                .on("phone:send_requested", handset)
                .on("phone:sms_sent", handset)
                .on("agent:approval_requested", handset)
                .on("agent:approval_resolved", handset)
                .build(),
            other => {
                eprintln!("unknown test pack {other}");
                std::process::exit(2);
            }
        };
        match built {
            Ok(p) => out.push(p),
            Err(e) => {
                eprintln!("{e:?}");
                std::process::exit(2);
            }
        }
    }
    out
}

fn main() -> std::process::ExitCode {
    lumenflow_agent::run::cli_main(packs())
}
