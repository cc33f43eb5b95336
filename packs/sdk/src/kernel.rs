//! The platform's v1 kernel events (SPEC §5, §10; LUMENFLOW-FACTS "Kernel events today").
//!
//! Every event the LumenFlow platform (v3.19) produces is a v1 kernel event: `schema_version:
//! 1`, one `kind` of a closed union, its own fields, no `event_id`, `from` or `payload`. The
//! agent accepts them beside v2 envelopes and must pass them on **unchanged** (the platform
//! says receivers must not mutate them). Inside the agent one travels as a v2 envelope of kind
//! `kernel:<kind>` whose payload is the v1 event itself, so packs can subscribe to
//! `kernel:task_completed`; upstream, the payload alone is sent.
//!
//! - Validation follows `kernel.schemas.ts` (`KernelEventSchema` and the tool traces): the
//!   kind must be one of the union, its required fields present and non-empty, hashes 64 hex
//!   characters, the timestamp ISO 8601 UTC. Unknown fields pass through, as in the platform.
//! - Identity: the event has no id, so its id is derived from its content: the UUIDv5 of
//!   (`from`, `kernel:<kind>`, SHA-256 of its canonical JSON), the same derivation as an
//!   idempotency key (`packs/event-id-vectors.json`). The same event posted twice (a forwarder
//!   retrying a batch) has the same id and is deduplicated like any retry.

use crate::canonical::canonical_hash;
use crate::envelope::{format_timestamp, idempotent_event_id, Envelope};
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The reserved namespace of v1 kernel events inside the agent.
pub const NAMESPACE: &str = "kernel";

/// What a field of a v1 event must be.
#[derive(Clone, Copy)]
enum Field {
    /// A non-empty string.
    Text(&'static str),
    /// 64 lowercase or uppercase hex characters (a SHA-256).
    Sha256(&'static str),
    /// One of these strings.
    OneOf(&'static str, &'static [&'static str]),
}

use Field::{OneOf, Sha256, Text};

/// The v1 union, kind by kind, with the fields each requires (`kernel.schemas.ts`,
/// `event-kinds.ts`).
const V1_UNION: &[(&str, &[Field])] = &[
    ("task_created", &[Text("task_id"), Sha256("spec_hash")]),
    (
        "task_claimed",
        &[Text("task_id"), Text("by"), Text("session_id")],
    ),
    ("task_blocked", &[Text("task_id"), Text("reason")]),
    ("task_unblocked", &[Text("task_id")]),
    ("task_waiting", &[Text("task_id"), Text("reason")]),
    ("task_resumed", &[Text("task_id")]),
    ("task_completed", &[Text("task_id")]),
    ("task_released", &[Text("task_id"), Text("reason")]),
    (
        "task_delegated",
        &[
            Text("task_id"),
            Text("parent_task_id"),
            Text("delegation_id"),
        ],
    ),
    (
        "run_started",
        &[
            Text("task_id"),
            Text("run_id"),
            Text("by"),
            Text("session_id"),
        ],
    ),
    (
        "run_paused",
        &[Text("task_id"), Text("run_id"), Text("reason")],
    ),
    (
        "run_failed",
        &[Text("task_id"), Text("run_id"), Text("reason")],
    ),
    ("run_succeeded", &[Text("task_id"), Text("run_id")]),
    (
        "workspace_updated",
        &[Sha256("config_hash"), Text("changes_summary")],
    ),
    ("workspace_warning", &[Text("message")]),
    (
        "spec_tampered",
        &[
            OneOf("spec", &["task", "workspace"]),
            Text("id"),
            Sha256("expected_hash"),
            Sha256("actual_hash"),
        ],
    ),
    ("checkpoint", &[Text("task_id"), Text("note")]),
    (
        "tool_call_started",
        &[
            Text("receipt_id"),
            Text("run_id"),
            Text("task_id"),
            Text("session_id"),
            Text("tool_name"),
        ],
    ),
    ("tool_call_progress", &[Text("receipt_id")]),
    (
        "tool_call_finished",
        &[
            Text("receipt_id"),
            OneOf("result", &["success", "failure", "denied", "crashed"]),
        ],
    ),
];

/// The kinds of the v1 union.
pub fn v1_kinds() -> impl Iterator<Item = &'static str> {
    V1_UNION.iter().map(|(k, _)| *k)
}

/// True when `v` says it is a v1 event (`schema_version: 1`).
pub fn is_v1(v: &Value) -> bool {
    v.as_object().is_some_and(is_v1_object)
}

fn is_v1_object(v: &Map<String, Value>) -> bool {
    v.get("schema_version").and_then(Value::as_f64) == Some(1.0)
}

/// A validated v1 kernel event, kept exactly as it came.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelEvent {
    /// The v1 kind (`task_created`).
    pub kind: String,
    pub event: Map<String, Value>,
    timestamp_ms: i64,
}

impl KernelEvent {
    /// Validates `v` against the v1 union; the first precise reason when it is not one.
    pub fn parse(v: Value) -> Result<KernelEvent, String> {
        let Value::Object(event) = v else {
            return Err("a v1 kernel event must be a JSON object".into());
        };
        if !is_v1_object(&event) {
            return Err("a v1 kernel event has \"schema_version\": 1".into());
        }
        let kind = match event.get("kind") {
            Some(Value::String(k)) => k.clone(),
            Some(_) => return Err("field \"kind\" must be a string".into()),
            None => return Err("missing field \"kind\"".into()),
        };
        let Some((_, fields)) = V1_UNION.iter().find(|(k, _)| *k == kind) else {
            let known: Vec<&str> = v1_kinds().collect();
            return Err(format!(
                "unknown v1 kernel event kind \"{kind}\" (the platform's v1 kinds: {})",
                known.join(", ")
            ));
        };
        let timestamp_ms = match event.get("timestamp") {
            Some(Value::String(ts)) => iso_utc_ms(ts).ok_or_else(|| {
                format!("{kind}: field \"timestamp\": \"{ts}\" is not an ISO 8601 UTC date-time (e.g. 2026-04-20T00:00:00.000Z)")
            })?,
            Some(_) => return Err(format!("{kind}: field \"timestamp\" must be a string")),
            None => return Err(format!("{kind}: missing field \"timestamp\"")),
        };
        for field in *fields {
            check_field(&kind, &event, *field)?;
        }
        Ok(KernelEvent {
            kind,
            event,
            timestamp_ms,
        })
    }

    /// `kernel:<kind>`: the kind packs subscribe to.
    pub fn agent_kind(&self) -> String {
        format!("{NAMESPACE}:{}", self.kind)
    }

    /// The event as it came, as JSON text (what goes upstream).
    pub fn to_json(&self) -> String {
        Value::Object(self.event.clone()).to_string()
    }

    /// SHA-256 of the canonical JSON: what identifies an event that has no id.
    pub fn content_hash(&self) -> String {
        canonical_hash(&Value::Object(self.event.clone()))
    }

    /// The v2 envelope the event travels in inside the agent: kind `kernel:<kind>`, payload
    /// the v1 event, id derived from its content (see the module comment).
    pub fn to_envelope(&self, from: &str) -> Envelope {
        let kind = self.agent_kind();
        let event_id = idempotent_event_id(from, &kind, &self.content_hash()).to_string();
        let timestamp = format_timestamp(
            std::time::UNIX_EPOCH
                + std::time::Duration::from_millis(self.timestamp_ms.max(0) as u64),
        );
        Envelope {
            event_id,
            kind,
            timestamp,
            from: from.to_string(),
            payload: self.event.clone(),
            extra: Map::new(),
        }
    }
}

/// The v1 event a `kernel:` envelope carries (what the upstream gets), or `None` when the
/// envelope is not one.
pub fn carried_event(envelope: &Envelope) -> Option<&Map<String, Value>> {
    let ns = crate::kind::namespace_of(&envelope.kind)?;
    (ns == NAMESPACE && is_v1_object(&envelope.payload)).then_some(&envelope.payload)
}

fn check_field(kind: &str, event: &Map<String, Value>, field: Field) -> Result<(), String> {
    let (name, ok, expected) = match field {
        Text(name) => (
            name,
            matches!(event.get(name), Some(Value::String(s)) if !s.is_empty()),
            "a non-empty string".to_string(),
        ),
        Sha256(name) => (
            name,
            matches!(event.get(name), Some(Value::String(s)) if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())),
            "a SHA-256 (64 hex characters)".to_string(),
        ),
        OneOf(name, allowed) => (
            name,
            matches!(event.get(name), Some(Value::String(s)) if allowed.contains(&s.as_str())),
            format!("one of {}", allowed.join(", ")),
        ),
    };
    if ok {
        return Ok(());
    }
    match event.get(name) {
        None => Err(format!("{kind}: missing field \"{name}\" ({expected})")),
        Some(v) => Err(format!(
            "{kind}: field \"{name}\" must be {expected}, found {}",
            v.to_string().chars().take(80).collect::<String>()
        )),
    }
}

/// Milliseconds since the epoch of an ISO 8601 UTC date-time as zod's `datetime()` accepts
/// it (`Z` suffix, optional fraction).
fn iso_utc_ms(ts: &str) -> Option<i64> {
    if !ts.ends_with('Z') {
        return None;
    }
    let dt = OffsetDateTime::parse(ts, &Rfc3339).ok()?;
    Some((dt.unix_timestamp_nanos() / 1_000_000) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const HASH: &str = "43258cff783fe7036d8a43033f830adfc60ec037382473548ac742b888292777";

    fn created() -> Value {
        json!({"schema_version": 1, "kind": "task_created", "task_id": "WU-1",
               "timestamp": "2026-03-14T10:00:00.000Z", "spec_hash": HASH, "extra": {"b": 2, "a": 1}})
    }

    #[test]
    fn the_union_has_every_kind_of_the_platform() {
        assert_eq!(v1_kinds().count(), 20);
        for k in [
            "task_created",
            "run_succeeded",
            "checkpoint",
            "tool_call_finished",
        ] {
            assert!(v1_kinds().any(|x| x == k), "{k}");
        }
    }

    #[test]
    fn a_valid_event_travels_as_a_kernel_envelope_and_stays_unchanged() {
        let e = KernelEvent::parse(created()).unwrap();
        let env = e.to_envelope("ws-test");
        assert_eq!(env.kind, "kernel:task_created");
        assert_eq!(env.timestamp, "2026-03-14T10:00:00.000Z");
        assert_eq!(Value::Object(env.payload.clone()), created());
        assert_eq!(carried_event(&env), Some(&e.event));
        // Parsed back from its JSON (a row of the inbound log), it is the same envelope.
        assert_eq!(Envelope::parse(env.to_json().as_bytes()).unwrap(), env);
        // Content-derived id: stable, and the event's key order does not matter.
        let reordered: Value = serde_json::from_str(&created().to_string()).unwrap();
        assert_eq!(
            KernelEvent::parse(reordered)
                .unwrap()
                .to_envelope("ws-test")
                .event_id,
            env.event_id
        );
        let mut other = created();
        other["task_id"] = json!("WU-2");
        assert_ne!(
            KernelEvent::parse(other)
                .unwrap()
                .to_envelope("ws-test")
                .event_id,
            env.event_id
        );
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let cases = [
            (
                json!({"schema_version": 1, "kind": "task_exploded", "timestamp": "2026-03-14T10:00:00Z"}),
                "unknown v1 kernel event kind \"task_exploded\"",
            ),
            (
                json!({"schema_version": 1, "kind": "task_created", "task_id": "WU-1", "timestamp": "2026-03-14T10:00:00Z"}),
                "task_created: missing field \"spec_hash\"",
            ),
            (
                json!({"schema_version": 1, "kind": "task_created", "task_id": "WU-1", "spec_hash": "abc", "timestamp": "2026-03-14T10:00:00Z"}),
                "field \"spec_hash\" must be a SHA-256",
            ),
            (
                json!({"schema_version": 1, "kind": "task_claimed", "task_id": "", "by": "a", "session_id": "s", "timestamp": "2026-03-14T10:00:00Z"}),
                "field \"task_id\" must be a non-empty string",
            ),
            (
                json!({"schema_version": 1, "kind": "workspace_warning", "message": "m", "timestamp": "2026-03-14T12:00:00+02:00"}),
                "not an ISO 8601 UTC date-time",
            ),
            (
                json!({"schema_version": 1, "kind": "workspace_warning", "message": "m"}),
                "missing field \"timestamp\"",
            ),
            (
                json!({"schema_version": 1, "kind": "spec_tampered", "spec": "lane", "id": "x", "expected_hash": HASH, "actual_hash": HASH, "timestamp": "2026-03-14T10:00:00Z"}),
                "field \"spec\" must be one of task, workspace",
            ),
            (
                json!({"schema_version": 1, "timestamp": "2026-03-14T10:00:00Z"}),
                "missing field \"kind\"",
            ),
        ];
        for (v, want) in cases {
            let err = KernelEvent::parse(v.clone()).unwrap_err();
            assert!(err.contains(want), "{v}: {err}");
        }
    }

    #[test]
    fn a_v2_envelope_of_another_namespace_carries_no_kernel_event() {
        let env = KernelEvent::parse(created()).unwrap().to_envelope("ws");
        let mut other = env.clone();
        other.kind = "acme:task_created".into();
        assert!(carried_event(&other).is_none());
    }
}
