//! The schema-2 event envelope (SPEC §5).
//!
//! ```json
//! {"schema_version": 2, "event_id": "…", "kind": "acme-demo:job_completed",
//!  "timestamp": "2026-04-20T00:00:00.000Z", "from": "ws-test", "payload": {…}}
//! ```
//!
//! Guarantees:
//! - An envelope built here always has an RFC 3339 UTC timestamp with millisecond precision and
//!   a `Z` suffix.
//! - With an idempotency key the `event_id` is a UUIDv5 in [`EVENT_ID_NAMESPACE`] over
//!   `from`, `kind` and the key, so a retry yields the same id; without one it is a UUIDv7
//!   (time-ordered, which keeps database indexes append-mostly).
//! - Parsing rejects a malformed envelope with the first precise reason, and keeps every field
//!   it does not know (`extra`) so an envelope passes through the agent unchanged.

use crate::kind::{parse_kind, KindError};
use serde_json::{Map, Value};
use std::time::SystemTime;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

pub const SCHEMA_VERSION: u64 = 2;

/// The project's fixed UUIDv5 namespace for event ids:
/// `uuid5(NAMESPACE_URL, "https://lumenflow.dev/ns/event-id")` = `d103d564-…-fb3fa51d85e3`.
/// Published with test vectors in `packs/event-id-vectors.json`, which every helper that
/// computes event ids (this crate, the Node helper) is tested against.
pub const EVENT_ID_NAMESPACE: Uuid = uuid::uuid!("d103d564-ba4b-52ca-bb35-fb3fa51d85e3");

/// Longest `event_id` accepted from outside (ids we build are 36 characters).
pub const MAX_EVENT_ID_LEN: usize = 128;
/// Longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("event is not a JSON object")]
    NotObject,
    #[error("event is not valid JSON: {0}")]
    Syntax(String),
    #[error("missing field \"{0}\"")]
    Missing(&'static str),
    #[error("field \"{field}\" must be {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("unsupported schema_version {0} (this agent speaks schema_version 2)")]
    SchemaVersion(String),
    #[error("field \"timestamp\": {0}")]
    Timestamp(String),
    #[error("field \"kind\": {0}")]
    Kind(#[from] KindError),
    #[error("field \"event_id\" must be 1 to {MAX_EVENT_ID_LEN} printable ASCII characters")]
    EventId,
    #[error("field \"idempotency_key\" must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters")]
    IdempotencyKey,
    #[error("field \"from\" must be a non-empty string")]
    From,
}

/// A complete schema-2 event.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub event_id: String,
    pub kind: String,
    pub timestamp: String,
    pub from: String,
    pub payload: Map<String, Value>,
    /// Fields beyond the six of schema 2, kept as they came.
    pub extra: Map<String, Value>,
}

/// What a producer supplies; the agent completes it into an [`Envelope`].
#[derive(Debug, Clone, PartialEq)]
pub struct EventDraft {
    pub kind: String,
    pub payload: Map<String, Value>,
    pub idempotency_key: Option<String>,
    /// The id chosen by the producer (a worker that does not wait for the agent's answer to
    /// its emit). Ignored when there is an idempotency key: that fixes the id.
    pub event_id: Option<Uuid>,
}

/// An event as posted to the agent: already complete, or a draft to complete.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Complete(Envelope),
    Draft(EventDraft),
}

/// The deterministic id of an event with an idempotency key.
pub fn idempotent_event_id(from: &str, kind: &str, key: &str) -> Uuid {
    // NUL separators: ("a", "b:c") and ("a:b", "c") must not collide.
    let mut name = Vec::with_capacity(from.len() + kind.len() + key.len() + 2);
    name.extend_from_slice(from.as_bytes());
    name.push(0);
    name.extend_from_slice(kind.as_bytes());
    name.push(0);
    name.extend_from_slice(key.as_bytes());
    Uuid::new_v5(&EVENT_ID_NAMESPACE, &name)
}

/// `2026-04-20T00:00:00.000Z`.
pub fn format_timestamp(t: SystemTime) -> String {
    let dt = OffsetDateTime::from(t);
    let ms = dt.millisecond();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        ms
    )
}

/// Checks an RFC 3339 UTC timestamp with a `Z` suffix; returns milliseconds since the epoch.
pub fn parse_timestamp(s: &str) -> Result<i64, String> {
    if !s.ends_with('Z') || s.as_bytes().get(10) != Some(&b'T') {
        return Err(format!(
            "\"{s}\" must be RFC 3339 in UTC with a 'Z' suffix, e.g. 2026-04-20T00:00:00.000Z"
        ));
    }
    let dt = OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("\"{s}\" is not an RFC 3339 timestamp ({e})"))?;
    Ok((dt.unix_timestamp_nanos() / 1_000_000) as i64)
}

fn take_string(
    obj: &mut Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, EnvelopeError> {
    match obj.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(EnvelopeError::WrongType {
            field,
            expected: "a string",
        }),
    }
}

fn require_string(
    obj: &mut Map<String, Value>,
    field: &'static str,
) -> Result<String, EnvelopeError> {
    take_string(obj, field)?.ok_or(EnvelopeError::Missing(field))
}

fn take_payload(obj: &mut Map<String, Value>) -> Result<Map<String, Value>, EnvelopeError> {
    match obj.remove("payload") {
        None => Err(EnvelopeError::Missing("payload")),
        Some(Value::Object(m)) => Ok(m),
        Some(_) => Err(EnvelopeError::WrongType {
            field: "payload",
            expected: "a JSON object",
        }),
    }
}

fn check_event_id(id: &str) -> Result<(), EnvelopeError> {
    if id.is_empty() || id.len() > MAX_EVENT_ID_LEN || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(EnvelopeError::EventId);
    }
    Ok(())
}

impl Envelope {
    /// Parses a complete schema-2 envelope.
    pub fn from_value(v: Value) -> Result<Self, EnvelopeError> {
        let Value::Object(mut obj) = v else {
            return Err(EnvelopeError::NotObject);
        };
        match obj.remove("schema_version") {
            None => return Err(EnvelopeError::Missing("schema_version")),
            Some(Value::Number(n)) if n.as_u64() == Some(SCHEMA_VERSION) => {}
            Some(other) => return Err(EnvelopeError::SchemaVersion(other.to_string())),
        }
        let event_id = require_string(&mut obj, "event_id")?;
        check_event_id(&event_id)?;
        let kind = require_string(&mut obj, "kind")?;
        parse_kind(&kind)?;
        let timestamp = require_string(&mut obj, "timestamp")?;
        parse_timestamp(&timestamp).map_err(EnvelopeError::Timestamp)?;
        let from = require_string(&mut obj, "from")?;
        if from.is_empty() {
            return Err(EnvelopeError::From);
        }
        let payload = take_payload(&mut obj)?;
        Ok(Envelope {
            event_id,
            kind,
            timestamp,
            from,
            payload,
            extra: obj,
        })
    }

    /// Parses JSON text.
    pub fn parse(text: &[u8]) -> Result<Self, EnvelopeError> {
        let v: Value =
            serde_json::from_slice(text).map_err(|e| EnvelopeError::Syntax(e.to_string()))?;
        Self::from_value(v)
    }

    /// The envelope as JSON, schema fields first, extra fields after them.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// The wire form: the six fields of schema 2 in order, then the extra fields.
    pub fn to_json(&self) -> String {
        // Serialising a map of strings and JSON values cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Milliseconds since the epoch of `timestamp` (validated at parse/build time).
    pub fn timestamp_ms(&self) -> i64 {
        parse_timestamp(&self.timestamp).unwrap_or(0)
    }
}

/// Written straight from the fields (no intermediate `Value`, no copy of the payload).
impl serde::Serialize for Envelope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(6 + self.extra.len()))?;
        m.serialize_entry("schema_version", &SCHEMA_VERSION)?;
        m.serialize_entry("event_id", &self.event_id)?;
        m.serialize_entry("kind", &self.kind)?;
        m.serialize_entry("timestamp", &self.timestamp)?;
        m.serialize_entry("from", &self.from)?;
        m.serialize_entry("payload", &self.payload)?;
        for (k, v) in &self.extra {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl EventDraft {
    pub fn new(kind: impl Into<String>, payload: Map<String, Value>) -> Self {
        EventDraft {
            kind: kind.into(),
            payload,
            idempotency_key: None,
            event_id: None,
        }
    }

    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Completes the draft: id (UUIDv5 with a key, else the producer's or a UUIDv7),
    /// timestamp `now`, `from`.
    pub fn build(self, from: &str, now: SystemTime) -> Envelope {
        let event_id = match (&self.idempotency_key, self.event_id) {
            (Some(key), _) => idempotent_event_id(from, &self.kind, key),
            (None, Some(id)) => id,
            (None, None) => {
                let d = now
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default();
                let ts = uuid::Timestamp::from_unix(uuid::NoContext, d.as_secs(), d.subsec_nanos());
                Uuid::new_v7(ts)
            }
        };
        Envelope {
            event_id: event_id.hyphenated().to_string(),
            kind: self.kind,
            timestamp: format_timestamp(now),
            from: from.to_string(),
            payload: self.payload,
            extra: Map::new(),
        }
    }

    /// Parses `{kind, payload, idempotency_key?}`.
    pub fn from_value(v: Value) -> Result<Self, EnvelopeError> {
        let Value::Object(mut obj) = v else {
            return Err(EnvelopeError::NotObject);
        };
        let kind = require_string(&mut obj, "kind")?;
        parse_kind(&kind)?;
        let payload = take_payload(&mut obj)?;
        let idempotency_key = take_string(&mut obj, "idempotency_key")?;
        if let Some(k) = &idempotency_key {
            if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_LEN {
                return Err(EnvelopeError::IdempotencyKey);
            }
        }
        Ok(EventDraft {
            kind,
            payload,
            idempotency_key,
            event_id: None,
        })
    }
}

impl Incoming {
    /// An object with `schema_version` is a complete envelope; one without is a draft.
    pub fn from_value(v: Value) -> Result<Self, EnvelopeError> {
        match &v {
            Value::Object(m) if m.contains_key("schema_version") => {
                Envelope::from_value(v).map(Incoming::Complete)
            }
            Value::Object(_) => EventDraft::from_value(v).map(Incoming::Draft),
            _ => Err(EnvelopeError::NotObject),
        }
    }

    pub fn kind(&self) -> &str {
        match self {
            Incoming::Complete(e) => &e.kind,
            Incoming::Draft(d) => &d.kind,
        }
    }

    pub fn complete(self, from: &str, now: SystemTime) -> Envelope {
        match self {
            Incoming::Complete(e) => e,
            Incoming::Draft(d) => d.build(from, now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn namespace_constant_is_what_the_doc_says() {
        let ns = Uuid::new_v5(&Uuid::NAMESPACE_URL, b"https://lumenflow.dev/ns/event-id");
        assert_eq!(EVENT_ID_NAMESPACE, ns);
    }

    /// The published vectors (`packs/event-id-vectors.json`): what other languages' helpers
    /// are tested against must be what this crate computes.
    #[test]
    fn published_test_vectors() {
        let text = include_str!("../../event-id-vectors.json");
        let doc: Value = serde_json::from_str(text).unwrap();
        assert_eq!(doc["namespace"]["uuid"], EVENT_ID_NAMESPACE.to_string());
        let vectors = doc["vectors"].as_array().unwrap();
        assert!(vectors.len() >= 8);
        for v in vectors {
            let id = idempotent_event_id(
                v["from"].as_str().unwrap(),
                v["kind"].as_str().unwrap(),
                v["idempotency_key"].as_str().unwrap(),
            );
            assert_eq!(id.to_string(), v["event_id"].as_str().unwrap(), "{v}");
        }
    }

    #[test]
    fn deterministic_ids() {
        let a = idempotent_event_id("ws-test", "acme-demo:job_completed", "job-1:completed");
        let b = idempotent_event_id("ws-test", "acme-demo:job_completed", "job-1:completed");
        assert_eq!(a, b);
        assert_eq!(a.get_version_num(), 5);
        assert_ne!(
            a,
            idempotent_event_id("ws-other", "acme-demo:job_completed", "job-1:completed")
        );
        assert_ne!(
            a,
            idempotent_event_id("ws-test", "acme-demo:job_started", "job-1:completed")
        );
        assert_ne!(
            a,
            idempotent_event_id("ws-test", "acme-demo:job_completed", "job-2:completed")
        );
        // Separator: moving a character across the field boundary changes the id.
        assert_ne!(
            idempotent_event_id("a", "b:c", "d"),
            idempotent_event_id("a", "b:c", "d\0")
        );
        assert_ne!(
            idempotent_event_id("ab", "x:y", "k"),
            idempotent_event_id("a", "bx:y", "k")
        );
    }

    #[test]
    fn pinned_id_never_changes() {
        // If this changes, every deployed agent's retries stop deduping at the conductor.
        assert_eq!(
            idempotent_event_id("ws-test", "acme-demo:job_completed", "job-1:completed")
                .to_string(),
            "fb5c5f73-6729-525c-a307-a4fbe90b0695"
        );
    }

    #[test]
    fn ids_without_key_are_v7_and_unique() {
        let now = SystemTime::now();
        let a = EventDraft::new("a:b", Map::new()).build("ws", now);
        let b = EventDraft::new("a:b", Map::new()).build("ws", now);
        assert_ne!(a.event_id, b.event_id);
        assert_eq!(Uuid::parse_str(&a.event_id).unwrap().get_version_num(), 7);
    }

    #[test]
    fn timestamp_format() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_776_643_200_007);
        assert_eq!(format_timestamp(t), "2026-04-20T00:00:00.007Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_776_643_200_999_999_999);
        assert_eq!(format_timestamp(t), "2026-04-20T00:00:00.999Z");
        assert_eq!(
            format_timestamp(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            parse_timestamp("2026-04-20T00:00:00.007Z"),
            Ok(1_776_643_200_007)
        );
        assert!(parse_timestamp("2026-04-20T00:00:00.000+02:00").is_err());
        assert!(parse_timestamp("2026-04-20 00:00:00Z").is_err());
        assert!(parse_timestamp("yesterday").is_err());
    }

    #[test]
    fn round_trip_keeps_extra_fields() {
        let text = r#"{"schema_version":2,"event_id":"evt-abc","kind":"conductor:recovery_requested","timestamp":"2026-04-20T00:00:00.000Z","from":"ws-test","payload":{"wu_id":"acme-job-1"},"trace":{"id":7}}"#;
        let e = Envelope::parse(text.as_bytes()).unwrap();
        assert_eq!(e.extra.get("trace"), Some(&json!({"id": 7})));
        assert_eq!(e.to_json(), text);
        let again = Envelope::parse(e.to_json().as_bytes()).unwrap();
        assert_eq!(again, e);
    }

    #[test]
    fn malformed_envelopes() {
        let good = json!({"schema_version":2,"event_id":"e1","kind":"a:b","timestamp":"2026-04-20T00:00:00.000Z","from":"ws","payload":{}});
        assert!(Envelope::from_value(good.clone()).is_ok());
        let with = |k: &str, v: Value| {
            let mut m = obj(good.clone());
            m.insert(k.into(), v);
            Envelope::from_value(Value::Object(m))
        };
        let without = |k: &str| {
            let mut m = obj(good.clone());
            m.remove(k);
            Envelope::from_value(Value::Object(m))
        };
        for f in [
            "schema_version",
            "event_id",
            "kind",
            "timestamp",
            "from",
            "payload",
        ] {
            let err = without(f).unwrap_err();
            assert_eq!(err.to_string(), format!("missing field \"{f}\""));
        }
        assert_eq!(
            with("schema_version", json!(1)).unwrap_err().to_string(),
            "unsupported schema_version 1 (this agent speaks schema_version 2)"
        );
        assert!(matches!(
            with("schema_version", json!("2")),
            Err(EnvelopeError::SchemaVersion(_))
        ));
        assert_eq!(
            with("payload", json!([1])).unwrap_err().to_string(),
            "field \"payload\" must be a JSON object"
        );
        assert!(matches!(
            with("payload", json!("x")),
            Err(EnvelopeError::WrongType {
                field: "payload",
                ..
            })
        ));
        assert!(matches!(
            with("kind", json!("nope")),
            Err(EnvelopeError::Kind(_))
        ));
        assert!(matches!(
            with("kind", json!(3)),
            Err(EnvelopeError::WrongType { field: "kind", .. })
        ));
        assert!(matches!(
            with("timestamp", json!("2026-04-20")),
            Err(EnvelopeError::Timestamp(_))
        ));
        assert!(matches!(
            with("event_id", json!("")),
            Err(EnvelopeError::EventId)
        ));
        assert!(matches!(
            with("event_id", json!("a b")),
            Err(EnvelopeError::EventId)
        ));
        assert!(matches!(with("from", json!("")), Err(EnvelopeError::From)));
        assert_eq!(
            Envelope::from_value(json!([])),
            Err(EnvelopeError::NotObject)
        );
        assert!(matches!(
            Envelope::parse(b"{"),
            Err(EnvelopeError::Syntax(_))
        ));
    }

    #[test]
    fn drafts_complete_with_deterministic_ids() {
        let d = Incoming::from_value(json!({"kind":"acme-demo:job_completed","payload":{"job_id":"job-1"},"idempotency_key":"job-1:completed"})).unwrap();
        let Incoming::Draft(draft) = d.clone() else {
            panic!("draft expected")
        };
        assert_eq!(draft.idempotency_key.as_deref(), Some("job-1:completed"));
        let e1 = d.clone().complete("ws-test", SystemTime::now());
        let e2 = d.complete("ws-test", SystemTime::now() + Duration::from_secs(3));
        assert_eq!(e1.event_id, e2.event_id);
        assert_eq!(e1.from, "ws-test");
        assert!(Envelope::parse(e1.to_json().as_bytes()).is_ok());
        assert!(matches!(
            Incoming::from_value(json!({"kind":"a:b","payload":{},"idempotency_key":""})),
            Err(EnvelopeError::IdempotencyKey)
        ));
        assert!(matches!(
            Incoming::from_value(json!({"payload":{}})),
            Err(EnvelopeError::Missing("kind"))
        ));
    }
}
