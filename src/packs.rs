//! Finding the packs of a workspace: every folder of the packs root that has a manifest.

use crate::config::AgentConfig;
use crate::workspace::Workspace;
pub use lumenflow_pack_sdk::manifest::PackScan;

pub fn scan_packs(ws: &Workspace, cfg: &AgentConfig) -> PackScan {
    lumenflow_pack_sdk::manifest::scan_packs_root(&ws.root.join(&cfg.packs_dir), &ws.root)
}
