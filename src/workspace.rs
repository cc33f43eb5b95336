//! Workspace discovery and the paths the agent uses inside one (SPEC §3).
//!
//! A workspace is a directory containing `.lumenflow/` or the platform's `workspace.yaml`. It
//! is found from `--workspace DIR` or by searching upward from the current directory, like git
//! finds `.git/`. In a workspace that has only `workspace.yaml`, the agent's state still goes
//! to `.lumenflow/state/`, created at start with a `.gitignore` so it is never committed.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("No workspace: {0} has no .lumenflow/ folder and no workspace.yaml (pass --workspace DIR, or create .lumenflow/ in the workspace root)")]
    NotAWorkspace(String),
    #[error("No workspace: no .lumenflow/ folder or workspace.yaml in {0} or any parent (pass --workspace DIR, or run `mkdir .lumenflow` in the workspace root)")]
    NotFound(String),
    #[error("Cannot read {0}: {1}")]
    Io(String, std::io::Error),
}

fn is_workspace(dir: &Path) -> bool {
    dir.join(".lumenflow").is_dir() || dir.join(crate::workspace_yaml::FILE).is_file()
}

/// Paths of one workspace.
#[derive(Debug, Clone)]
pub struct Workspace {
    pub root: PathBuf,
}

impl Workspace {
    /// `--workspace DIR` if given, else the nearest ancestor of the current directory that has
    /// `.lumenflow/`.
    pub fn locate(explicit: Option<&Path>) -> Result<Workspace, WorkspaceError> {
        if let Some(dir) = explicit {
            let root = dir
                .canonicalize()
                .map_err(|e| WorkspaceError::Io(dir.display().to_string(), e))?;
            if !is_workspace(&root) {
                return Err(WorkspaceError::NotAWorkspace(root.display().to_string()));
            }
            return Ok(Workspace { root });
        }
        let cwd = std::env::current_dir().map_err(|e| WorkspaceError::Io(".".into(), e))?;
        let mut dir: &Path = &cwd;
        loop {
            if is_workspace(dir) {
                return Ok(Workspace {
                    root: dir.to_path_buf(),
                });
            }
            match dir.parent() {
                Some(p) => dir = p,
                None => return Err(WorkspaceError::NotFound(cwd.display().to_string())),
            }
        }
    }

    pub fn lumenflow_dir(&self) -> PathBuf {
        self.root.join(".lumenflow")
    }
    pub fn config_file(&self) -> PathBuf {
        self.lumenflow_dir().join("agent.json")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.lumenflow_dir().join("state").join("agent")
    }
    pub fn db_file(&self) -> PathBuf {
        self.state_dir().join("agent.db")
    }
    pub fn lock_file(&self) -> PathBuf {
        self.state_dir().join("agent.lock")
    }
    pub fn api_file(&self) -> PathBuf {
        self.state_dir().join("api.json")
    }
    pub fn enrollment_file(&self) -> PathBuf {
        self.lumenflow_dir()
            .join("state")
            .join("conductor")
            .join("enrollment.json")
    }
    /// Folder name, the default identity.
    pub fn name(&self) -> String {
        self.root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "workspace".into())
    }
    /// A path shown relative to the workspace root when it is inside it.
    pub fn display(&self, p: &Path) -> String {
        p.strip_prefix(&self.root)
            .unwrap_or(p)
            .display()
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_dir_must_have_dot_lumenflow() {
        let tmp = tempfile::tempdir().unwrap();
        let err = Workspace::locate(Some(tmp.path())).unwrap_err();
        assert!(err.to_string().starts_with("No workspace: "), "{err}");
        std::fs::write(tmp.path().join("workspace.yaml"), "id: w\n").unwrap();
        assert!(Workspace::locate(Some(tmp.path())).is_ok());
        std::fs::remove_file(tmp.path().join("workspace.yaml")).unwrap();
        std::fs::create_dir(tmp.path().join(".lumenflow")).unwrap();
        let ws = Workspace::locate(Some(tmp.path())).unwrap();
        assert_eq!(
            ws.db_file(),
            ws.root.join(".lumenflow/state/agent/agent.db")
        );
    }
}
