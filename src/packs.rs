//! Finding the packs of a workspace: every folder of the packs root that has a manifest.
//! Folders without one (a library the packs share) are skipped with a debug log.

use crate::config::AgentConfig;
use crate::workspace::Workspace;
use lumenflow_pack_sdk::manifest::{load_pack_dir, PackLoad};
use std::collections::BTreeMap;

pub struct PackScan {
    pub loads: Vec<PackLoad>,
    /// Problems between packs (two packs with one slug).
    pub conflicts: Vec<String>,
    pub root_missing: bool,
}

pub fn scan_packs(ws: &Workspace, cfg: &AgentConfig) -> PackScan {
    let root = ws.root.join(&cfg.packs_dir);
    let mut scan = PackScan {
        loads: Vec::new(),
        conflicts: Vec::new(),
        root_missing: false,
    };
    let entries = match std::fs::read_dir(&root) {
        Ok(e) => e,
        Err(_) => {
            scan.root_missing = true;
            return scan;
        }
    };
    let mut dirs: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    dirs.sort();
    for dir in dirs {
        match load_pack_dir(&dir, &ws.root, None) {
            Some(load) => scan.loads.push(load),
            None => {
                tracing::debug!(folder = %ws.display(&dir), "skipping folder without a manifest")
            }
        }
    }
    let mut slugs: BTreeMap<&str, &str> = BTreeMap::new();
    for load in &scan.loads {
        if let Some(m) = &load.manifest {
            if let Some(other) = slugs.insert(&m.slug, &load.display) {
                scan.conflicts.push(format!(
                    "{}: slug: Duplicate slug: \"{}\" is already used by {other}; event kinds would be ambiguous",
                    load.display, m.slug
                ));
            }
        }
    }
    scan
}
