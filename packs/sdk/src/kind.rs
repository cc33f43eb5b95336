//! The event-kind grammar: `<slug>:<event_name_snake_case>` (SPEC §4).
//!
//! Kept in one place because the manifest validator, the emit path and the router all need
//! exactly the same answer to "is this a kind, and whose is it".

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest slug or pack id accepted.
pub const MAX_SLUG_LEN: usize = 64;
/// Longest event name (the part after the colon).
pub const MAX_EVENT_NAME_LEN: usize = 128;

/// Delivery class of an emitted kind (`backpressure_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryClass {
    /// Memory only; sent when the upstream is connected, dropped and counted otherwise.
    Ephemeral,
    /// Durable: on disk before the producer is acknowledged, delivered in order, never dropped.
    Queue,
}

impl DeliveryClass {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryClass::Ephemeral => "ephemeral",
            DeliveryClass::Queue => "queue",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ephemeral" => Some(DeliveryClass::Ephemeral),
            "queue" => Some(DeliveryClass::Queue),
            _ => None,
        }
    }
}

impl fmt::Display for DeliveryClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not a well-formed kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KindError {
    #[error("Invalid event kind: \"{0}\" has no ':' (rule: <slug>:<event_name_snake_case>)")]
    NoColon(String),
    #[error("Invalid event kind: \"{kind}\" has an invalid namespace \"{slug}\" (rule: <slug>:<event_name_snake_case>, slug in lowercase kebab-case)")]
    BadSlug { kind: String, slug: String },
    #[error("Invalid event kind: \"{kind}\" has an invalid event name \"{name}\" (rule: <slug>:<event_name_snake_case>)")]
    BadName { kind: String, name: String },
}

/// `^[a-z0-9]+(-[a-z0-9]+)*$`, at most 64 characters.
pub fn is_kebab_slug(s: &str) -> bool {
    if s.is_empty() || s.len() > MAX_SLUG_LEN {
        return false;
    }
    s.split('-').all(|part| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    })
}

/// `^[a-z][a-z0-9]*(_[a-z0-9]+)*$`, at most 128 characters.
pub fn is_snake_name(s: &str) -> bool {
    if s.is_empty() || s.len() > MAX_EVENT_NAME_LEN {
        return false;
    }
    if !s.as_bytes()[0].is_ascii_lowercase() {
        return false;
    }
    s.split('_').all(|part| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    })
}

/// Splits a kind into `(slug, event_name)` after checking the grammar.
pub fn parse_kind(kind: &str) -> Result<(&str, &str), KindError> {
    let Some((slug, name)) = kind.split_once(':') else {
        return Err(KindError::NoColon(kind.to_string()));
    };
    if !is_kebab_slug(slug) {
        return Err(KindError::BadSlug {
            kind: kind.to_string(),
            slug: slug.to_string(),
        });
    }
    if !is_snake_name(name) {
        return Err(KindError::BadName {
            kind: kind.to_string(),
            name: name.to_string(),
        });
    }
    Ok((slug, name))
}

/// The namespace of a kind (text before the first ':'), without checking the grammar.
pub fn namespace_of(kind: &str) -> Option<&str> {
    kind.split_once(':').map(|(ns, _)| ns)
}

/// True when the kind belongs to a reserved namespace (`conductor:`, `agent:`, `kernel:`).
pub fn is_reserved(kind: &str) -> bool {
    namespace_of(kind).is_some_and(|ns| crate::RESERVED_NAMESPACES.contains(&ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        for ok in ["a", "acme-demo", "a1-b2-c3", "0", &"a".repeat(64)] {
            assert!(is_kebab_slug(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a--b",
            "Acme",
            "acme_demo",
            "acme demo",
            "é",
            &"a".repeat(65),
        ] {
            assert!(!is_kebab_slug(bad), "{bad}");
        }
    }

    #[test]
    fn kind_grammar_edge_cases() {
        assert_eq!(
            parse_kind("acme-demo:job_completed"),
            Ok(("acme-demo", "job_completed"))
        );
        assert_eq!(parse_kind("a:b"), Ok(("a", "b")));
        assert_eq!(parse_kind("a:b2_c3"), Ok(("a", "b2_c3")));
        assert!(matches!(parse_kind("acme"), Err(KindError::NoColon(_))));
        assert!(matches!(parse_kind(":x"), Err(KindError::BadSlug { .. })));
        assert!(matches!(
            parse_kind("Acme:x"),
            Err(KindError::BadSlug { .. })
        ));
        for bad_name in [
            "a:",
            "a:JobDone",
            "a:job-done",
            "a:_job",
            "a:job_",
            "a:job__done",
            "a:1job",
            "a:job:done",
            "a:job done",
        ] {
            assert!(
                matches!(parse_kind(bad_name), Err(KindError::BadName { .. })),
                "{bad_name}"
            );
        }
        let long = format!("a:{}", "x".repeat(129));
        assert!(parse_kind(&long).is_err());
    }

    #[test]
    fn reserved() {
        assert!(is_reserved("conductor:recovery_requested"));
        assert!(is_reserved("agent:pack_crashed"));
        assert!(!is_reserved("acme-demo:job_completed"));
        assert!(!is_reserved("conductorx:y"));
    }
}
