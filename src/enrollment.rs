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
        let e: Enrollment = serde_json::from_str(&text).map_err(|e| {
            EnrollmentError::Invalid(
                shown.clone(),
                format!("expected {{\"endpoint\", \"token\", \"subject\"}}: {e}"),
            )
        })?;
        crate::config::check_upstream(&e.endpoint)
            .map_err(|m| EnrollmentError::Invalid(shown.clone(), format!("endpoint: {m}")))?;
        if e.token.is_empty() || e.subject.is_empty() {
            return Err(EnrollmentError::Invalid(
                shown,
                "token and subject must not be empty".into(),
            ));
        }
        Ok(Some(e))
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
