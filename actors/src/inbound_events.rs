//! Reading the events an upstream sends in, as the platform sends them.
//!
//! A pulled event the agent cannot read must never vanish: either it is normalised into a
//! schema-2 envelope, or it is dead-lettered (origin `inbound`) with the reason, in the same
//! transaction that moves the pull cursor past it (see `router::Inbound`).
//!
//! Normalised, because other LumenFlow code writes them so:
//! - a timestamp with a numeric offset (`2026-04-20T02:00:00+02:00`, `+00:00`) or without
//!   milliseconds becomes the same instant in UTC, `Z`, milliseconds;
//! - a missing `schema_version` on an object that has the other envelope fields (`event_id`,
//!   `kind`, `payload`) is taken as 2.
//!
//! A v1 kernel event (`schema_version: 1`, the platform's own events) is accepted as the
//! envelope `kernel:<kind>` it travels in inside the agent (`lumenflow_pack_sdk::kernel`),
//! from `conductor`, when it is valid against the v1 union.
//!
//! Anything else that is not a valid envelope (no `event_id`, a payload that is not an object,
//! a v1 event outside the union, not JSON) is dead-lettered with the parser's reason.

use lumenflow_pack_sdk::envelope::format_timestamp;
use lumenflow_pack_sdk::Envelope;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// An event that could not be read: its text and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    pub body: String,
    pub reason: String,
}

impl Unreadable {
    /// `event_id` and `kind` when the text has them (for `dlq list`).
    pub fn ids(&self) -> (String, String) {
        let v: Value = serde_json::from_str(&self.body).unwrap_or(Value::Null);
        let get = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        (get("event_id"), get("kind"))
    }
}

/// `from` of the envelope a pulled v1 kernel event travels in (it has no `from` of its own).
pub const PULLED_KERNEL_FROM: &str = "conductor";

/// Reads one pulled event, normalising what the platform writes differently.
pub fn read_pulled_value(v: Value) -> Result<Envelope, Unreadable> {
    let body = v.to_string();
    let fail = |reason: String| Unreadable {
        body: body.clone(),
        reason: format!("unreadable inbound event: {reason}"),
    };
    if lumenflow_pack_sdk::kernel::is_v1(&v) {
        return lumenflow_pack_sdk::kernel::KernelEvent::parse(v)
            .map(|k| k.to_envelope(PULLED_KERNEL_FROM))
            .map_err(fail);
    }
    let Value::Object(mut obj) = v else {
        return Err(fail("not a JSON object".into()));
    };
    if !obj.contains_key("schema_version")
        && ["event_id", "kind", "payload"]
            .iter()
            .all(|k| obj.contains_key(*k))
    {
        obj.insert("schema_version".into(), Value::from(2));
    }
    if let Some(Value::String(ts)) = obj.get("timestamp") {
        if let Some(utc) = to_utc_millis(ts) {
            obj.insert("timestamp".into(), Value::String(utc));
        }
    }
    Envelope::from_value(Value::Object(obj)).map_err(|e| fail(e.to_string()))
}

/// Reads one pulled event from its text (a dead letter being retried).
pub fn read_pulled(text: &str) -> Result<Envelope, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    read_pulled_value(v).map_err(|u| u.reason)
}

/// `ts` as `YYYY-MM-DDTHH:MM:SS.mmmZ` when it is any RFC 3339 timestamp.
fn to_utc_millis(ts: &str) -> Option<String> {
    let dt = OffsetDateTime::parse(ts, &Rfc3339).ok()?;
    Some(format_timestamp(dt.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(ts: &str) -> Value {
        json!({"schema_version": 2, "event_id": "e1", "kind": "conductor:recovery_requested",
               "timestamp": ts, "from": "cp", "payload": {"a": 1}})
    }

    #[test]
    fn offsets_and_missing_schema_version_are_normalised() {
        let e = read_pulled_value(event("2026-04-20T02:00:00+02:00")).unwrap();
        assert_eq!(e.timestamp, "2026-04-20T00:00:00.000Z");
        let e = read_pulled_value(event("2026-04-20T00:00:00.5+00:00")).unwrap();
        assert_eq!(e.timestamp, "2026-04-20T00:00:00.500Z");
        let mut v = event("2026-04-20T00:00:00.000Z");
        v.as_object_mut().unwrap().remove("schema_version");
        assert_eq!(read_pulled_value(v).unwrap().event_id, "e1");
    }

    #[test]
    fn what_cannot_be_read_says_why() {
        let v1 = json!({"schema_version": 1, "kind": "task_created", "timestamp": "2026-04-20T00:00:00.000Z", "task_id": "t"});
        let u = read_pulled_value(v1).unwrap_err();
        assert!(
            u.reason.starts_with("unreadable inbound event: "),
            "{}",
            u.reason
        );
        assert!(
            u.reason.contains("missing field \"spec_hash\""),
            "{}",
            u.reason
        );
        assert!(u.body.contains("task_created"));
        assert_eq!(u.ids().1, "task_created");
        let u = read_pulled_value(json!("x")).unwrap_err();
        assert!(u.reason.contains("not a JSON object"));
        let mut v = event("yesterday");
        v["payload"] = json!([1]);
        assert!(read_pulled_value(v).is_err());
    }

    #[test]
    fn a_valid_v1_kernel_event_arrives_as_its_kernel_envelope() {
        let v1 = json!({"schema_version": 1, "kind": "task_completed", "timestamp": "2026-04-20T00:00:00.000Z", "task_id": "WU-7"});
        let e = read_pulled_value(v1.clone()).unwrap();
        assert_eq!(e.kind, "kernel:task_completed");
        assert_eq!(e.from, PULLED_KERNEL_FROM);
        assert_eq!(serde_json::Value::Object(e.payload), v1);
    }
}
