//! Conductor-mode enrollment: `.lumenflow/state/conductor/enrollment.json`
//! `{endpoint, token, subject}`, mode 0600. When present it wins over `agent.json`'s `upstream`,
//! and its `subject` is the workspace identity (the `from` of every event).

use crate::workspace::Workspace;
use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrollment {
    pub endpoint: String,
    pub token: String,
    pub subject: String,
}

impl std::fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("Enrollment")
            .field("endpoint", &self.endpoint)
            .field("subject", &self.subject)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollmentError {
    #[error(
        "{0} is readable by group or others (mode {1:o}); it holds a token: run `chmod 600 {0}`"
    )]
    Permissions(String, u32),
    #[error("{0}: {1}")]
    Invalid(String, String),
}

impl Enrollment {
    /// Reads the enrollment if there is one; refuses a file others can read.
    pub fn load(ws: &Workspace) -> Result<Option<Enrollment>, EnrollmentError> {
        let path = ws.enrollment_file();
        let shown = ws.display(&path);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(_) => return Ok(None),
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(EnrollmentError::Permissions(shown, mode));
            }
        }
        let _ = meta;
        let text = std::fs::read_to_string(&path)
            .map_err(|e| EnrollmentError::Invalid(shown.clone(), e.to_string()))?;
        Enrollment::parse(&text, &shown).map(Some)
    }

    /// Reads an enrollment file's text; `shown` names the file in errors.
    pub fn parse(text: &str, shown: &str) -> Result<Enrollment, EnrollmentError> {
        let invalid = |m: String| EnrollmentError::Invalid(shown.to_string(), m);
        let e: Enrollment = serde_json::from_str(text).map_err(|e| {
            invalid(format!(
                "expected {{\"endpoint\", \"token\", \"subject\"}}: {e}"
            ))
        })?;
        crate::config::check_upstream(&e.endpoint)
            .map_err(|m| invalid(format!("endpoint: {m}")))?;
        if e.token.is_empty() || e.subject.is_empty() {
            return Err(invalid("token and subject must not be empty".into()));
        }
        Ok(e)
    }

    pub fn write(&self, ws: &Workspace) -> anyhow::Result<()> {
        let path = ws.enrollment_file();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
        }
        crate::agent::write_private_json(&path, &serde_json::to_value(self)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FILE: &str = ".lumenflow/state/conductor/enrollment.json";

    #[test]
    fn a_good_enrollment_parses_and_bad_ones_name_the_file() {
        let ok = r#"{"endpoint": "http://127.0.0.1:9", "token": "t", "subject": "ws"}"#;
        assert_eq!(Enrollment::parse(ok, FILE).unwrap().subject, "ws");
        for bad in [
            "",
            "{}",
            r#"{"endpoint": "ftp://x", "token": "t", "subject": "ws"}"#,
            r#"{"endpoint": "http://x", "token": "", "subject": "ws"}"#,
            r#"{"endpoint": "http://x", "token": "t", "subject": "ws", "extra": 1}"#,
        ] {
            let e = Enrollment::parse(bad, FILE).unwrap_err().to_string();
            assert!(e.starts_with(FILE), "{e}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Any file content is an enrollment or an error naming the file; never a panic, and
        /// the token never appears in the error.
        #[test]
        fn arbitrary_enrollment_text(text in ".{0,200}") {
            if let Err(e) = Enrollment::parse(&text, FILE) {
                prop_assert!(e.to_string().starts_with(FILE));
            }
        }

        #[test]
        fn arbitrary_enrollment_fields(
            endpoint in prop_oneof![".{0,40}", "(http|https)://[a-z0-9.:\\[\\]/-]{0,30}"],
            token in "[ -~]{0,20}",
            subject in ".{0,20}",
        ) {
            let text = serde_json::json!({"endpoint": endpoint, "token": token, "subject": subject}).to_string();
            match Enrollment::parse(&text, FILE) {
                Ok(e) => {
                    prop_assert_eq!(&e.token, &token);
                    prop_assert!(!e.token.is_empty() && !e.subject.is_empty());
                    let shown = format!("{:?}", e);
                    prop_assert!(!shown.contains("token:"));
                }
                Err(e) => {
                    let m = e.to_string();
                    prop_assert!(m.starts_with(FILE));
                    if token.len() >= 8 {
                        prop_assert!(!m.contains(&token), "the token leaked into: {}", m);
                    }
                }
            }
        }
    }
}
