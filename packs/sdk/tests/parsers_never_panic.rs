//! Arbitrary bytes and arbitrary JSON into every parser of the SDK: they return errors, never
//! panic. (Property tests; proptest keeps failing cases under `proptest-regressions/`.)

use lumenflow_pack_sdk::envelope::{Envelope, Incoming};
use lumenflow_pack_sdk::manifest::{parse_text, validate, Format, ValidateCtx};
use proptest::prelude::*;
use serde_json::Value;

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "[a-z:_\\-./ ]{0,24}".prop_map(Value::String),
        prop_oneof![
            Just("acme-demo:job_completed"),
            Just("queue"),
            Just("ephemeral"),
            Just("0.1.0"),
            Just("../x"),
            Just("2026-04-20T00:00:00.000Z"),
        ]
        .prop_map(|s| Value::String(s.to_string())),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        let keys = prop_oneof![
            Just("id".to_string()),
            Just("version".to_string()),
            Just("emitted_event_kinds".to_string()),
            Just("subscribed_event_kinds".to_string()),
            Just("backpressure_policy".to_string()),
            Just("runtime".to_string()),
            Just("command".to_string()),
            Just("tools".to_string()),
            Just("schema_version".to_string()),
            Just("payload".to_string()),
            Just("kind".to_string()),
            "[a-z_]{1,10}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(keys, inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn manifest_parsers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        for format in [Format::Json, Format::Yaml] {
            if let Ok(v) = parse_text(&text, format, "m") {
                let _ = validate(v, &ValidateCtx::default());
            }
        }
    }

    #[test]
    fn manifest_validation_never_panics(v in arb_json()) {
        let ctx = ValidateCtx { folder_name: Some("acme-demo".into()), ..ValidateCtx::default() };
        let (m, d) = validate(v, &ctx);
        // A manifest is returned exactly when there is no error.
        prop_assert_eq!(m.is_some(), !d.iter().any(|d| d.severity == lumenflow_pack_sdk::Severity::Error));
    }

    #[test]
    fn envelope_parsers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Envelope::parse(&bytes);
    }

    #[test]
    fn envelope_validation_never_panics(v in arb_json()) {
        if let Ok(e) = Envelope::from_value(v.clone()) {
            // What parses, round-trips.
            prop_assert_eq!(Envelope::parse(e.to_json().as_bytes()).ok(), Some(e));
        }
        let _ = Incoming::from_value(v);
    }
}
