//! Canonical JSON (LUMENFLOW-FACTS: keys sorted recursively, compact, SHA-256 hex of the UTF-8
//! text). Used for `manifest_hash`, so the same manifest in JSON or YAML, in any key order,
//! hashes the same.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Writes `v` as canonical JSON.
pub fn to_canonical_string(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// SHA-256 hex of the canonical JSON text.
pub fn canonical_hash(v: &Value) -> String {
    hex::encode(Sha256::digest(to_canonical_string(v).as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_platform_reference_hash() {
        let v: Value = serde_json::from_str(r#"{"b":2,"a":1}"#).unwrap();
        assert_eq!(to_canonical_string(&v), r#"{"a":1,"b":2}"#);
        assert_eq!(
            canonical_hash(&v),
            "43258cff783fe7036d8a43033f830adfc60ec037382473548ac742b888292777"
        );
    }

    #[test]
    fn nested_and_arrays() {
        let v: Value = serde_json::from_str(r#"{"z":[{"y":1,"x":"é"}],"a":null}"#).unwrap();
        assert_eq!(
            to_canonical_string(&v),
            r#"{"a":null,"z":[{"x":"é","y":1}]}"#
        );
    }
}
