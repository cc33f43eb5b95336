//! Handler outcome (SPEC §6): what a handler says it did with one event.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutcomeStatus {
    /// The effect happened.
    Handled,
    /// The event (or its effect) was seen before; nothing was done again.
    Replayed,
    /// Not for this handler (e.g. another pack's job).
    Ignored,
    /// Transient failure: redeliver later with backoff.
    Retry,
    /// Permanent failure: dead-letter now.
    Failed,
}

impl OutcomeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeStatus::Handled => "handled",
            OutcomeStatus::Replayed => "replayed",
            OutcomeStatus::Ignored => "ignored",
            OutcomeStatus::Retry => "retry",
            OutcomeStatus::Failed => "failed",
        }
    }
}

impl fmt::Display for OutcomeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandlerOutcome {
    pub status: OutcomeStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
}

impl HandlerOutcome {
    pub fn new(status: OutcomeStatus, action: impl Into<String>) -> Self {
        HandlerOutcome {
            status,
            action: Some(action.into()),
        }
    }
    pub fn handled(action: impl Into<String>) -> Self {
        Self::new(OutcomeStatus::Handled, action)
    }
    pub fn replayed(action: impl Into<String>) -> Self {
        Self::new(OutcomeStatus::Replayed, action)
    }
    pub fn ignored(action: impl Into<String>) -> Self {
        Self::new(OutcomeStatus::Ignored, action)
    }
    pub fn retry(action: impl Into<String>) -> Self {
        Self::new(OutcomeStatus::Retry, action)
    }
    pub fn failed(action: impl Into<String>) -> Self {
        Self::new(OutcomeStatus::Failed, action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shape() {
        let o: HandlerOutcome =
            serde_json::from_str(r#"{"status":"handled","action":"recovered"}"#).unwrap();
        assert_eq!(o, HandlerOutcome::handled("recovered"));
        let o: HandlerOutcome = serde_json::from_str(r#"{"status":"ignored"}"#).unwrap();
        assert_eq!(o.status, OutcomeStatus::Ignored);
        assert!(serde_json::from_str::<HandlerOutcome>(r#"{"status":"done"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&HandlerOutcome::retry("later")).unwrap(),
            r#"{"status":"retry","action":"later"}"#
        );
    }
}
