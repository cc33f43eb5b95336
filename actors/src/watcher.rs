//! `Watcher`: turns file-system changes under the packs root and `.lumenflow/` into reload
//! requests (SPEC §8).
//!
//! Owns the notify debouncer. It watches *directories*, never files: editors save by writing a
//! temporary file and renaming it over the old one, which would end a file watch after the
//! first save. Events are debounced (`DEBOUNCE`), so one save (truncate + write, or write +
//! rename) and a burst of saves become one reload. A rescan or an error from the OS watcher
//! reloads everything, since events may have been lost.
//!
//! When the OS refuses a watch (no inotify instance left, `max_user_watches` reached), edits
//! are still applied: every manifest is read again each [`POLL`] (unchanged content is a
//! no-op), and `status` says why (`reload.watching: false`, `reload.off`).

use crate::pack_registry::{PackRegistry, ReloadConfig, ReloadPacks};
use crate::stats::AgentStats;
use actix::prelude::*;
use lumenflow_pack_sdk::manifest::MANIFEST_FILES;
use notify_debouncer_full::notify::RecursiveMode;
use notify_debouncer_full::{new_debouncer, DebounceEventResult, Debouncer, RecommendedCache};
use std::collections::BTreeSet;
use std::path::{Component, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Quiet time before a change is acted on.
pub const DEBOUNCE: Duration = Duration::from_millis(40);
/// How often manifests are read again when the OS cannot watch them.
pub const POLL: Duration = Duration::from_secs(2);

pub struct Watcher {
    packs_root: PathBuf,
    config_dir: PathBuf,
    registry: Addr<PackRegistry>,
    stats: Arc<AgentStats>,
    debouncer:
        Option<Debouncer<notify_debouncer_full::notify::RecommendedWatcher, RecommendedCache>>,
}

impl Watcher {
    pub fn new(
        packs_root: PathBuf,
        config_dir: PathBuf,
        registry: Addr<PackRegistry>,
        stats: Arc<AgentStats>,
    ) -> Self {
        Watcher {
            packs_root,
            config_dir,
            registry,
            stats,
            debouncer: None,
        }
    }

    /// The OS refused a watch: say so, and read every manifest again each [`POLL`].
    fn poll_instead(&mut self, why: String, ctx: &mut Context<Self>) {
        let why = format!(
            "{why}; manifests are read again every {} s instead",
            POLL.as_secs()
        );
        tracing::error!("cannot watch for manifest changes: {why}");
        if let Ok(mut off) = self.stats.reload.off.lock() {
            *off = Some(why);
        }
        ctx.run_interval(POLL, |act, _| {
            act.registry.do_send(ReloadConfig);
            act.registry.do_send(ReloadPacks {
                folders: None,
                code: BTreeSet::new(),
            });
        });
    }
}

/// Extensions of handler source files: an edit restarts the pack's worker.
pub const CODE_EXTENSIONS: &[&str] = &[
    "mjs", "js", "cjs", "ts", "mts", "py", "rb", "rs", "go", "sh", "lua", "php", "pl",
];

/// Folders inside a pack that are build output or dependencies, never handler source.
const NOT_SOURCE_DIRS: &[&str] = &["node_modules", "target", "dist", "build", "__pycache__"];

/// What one batch of debounced events asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Pack folder names whose manifest (or the folder itself) changed.
    pub packs: BTreeSet<String>,
    /// Pack folder names where a handler source file changed (see [`CODE_EXTENSIONS`]).
    pub code: BTreeSet<String>,
    pub all_packs: bool,
    pub config: bool,
}

/// Maps changed paths to pack folders (the first component under the packs root).
pub fn classify(
    packs_root: &std::path::Path,
    config_file: &std::path::Path,
    paths: &[PathBuf],
    rescan: bool,
) -> Changes {
    let mut c = Changes {
        all_packs: rescan,
        ..Changes::default()
    };
    for p in paths {
        if p == config_file {
            c.config = true;
        } else if let Ok(rel) = p.strip_prefix(packs_root) {
            let parts: Vec<String> = rel
                .components()
                .filter_map(|c| match c {
                    Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
                    _ => None,
                })
                .collect();
            match parts.as_slice() {
                [] => c.all_packs = true, // the packs root itself
                // A pack folder appeared or went away, or its manifest changed. Other files
                // (handler code, a worker's own output, editor swap files) are not manifests.
                [folder] | [folder, _]
                    if !folder.starts_with('.')
                        && (parts.len() == 1 || MANIFEST_FILES.contains(&parts[1].as_str())) =>
                {
                    c.packs.insert(folder.clone());
                }
                // Handler source (not in a dot folder, dependencies or build output; not an
                // editor's dot-file): the pack's worker restarts with it.
                [folder, inner @ .., file]
                    if !folder.starts_with('.')
                        && !file.starts_with('.')
                        && inner.iter().all(|d| {
                            !d.starts_with('.') && !NOT_SOURCE_DIRS.contains(&d.as_str())
                        })
                        && std::path::Path::new(file)
                            .extension()
                            .and_then(|e| e.to_str())
                            .is_some_and(|e| CODE_EXTENSIONS.contains(&e)) =>
                {
                    c.code.insert(folder.clone());
                }
                _ => {}
            }
        }
    }
    c
}

/// Answers whether the OS watches are in place. Sent once after start: actix handles no message
/// before `started` has returned, so the answer also means "edits from now on are seen".
pub struct Watching;
impl Message for Watching {
    type Result = bool;
}

impl Handler<Watching> for Watcher {
    type Result = bool;
    fn handle(&mut self, _: Watching, _: &mut Context<Self>) -> bool {
        self.debouncer.is_some()
    }
}

struct FsChanged(DebounceEventResult);
impl Message for FsChanged {
    type Result = ();
}

impl Actor for Watcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let me = ctx.address();
        let debouncer = new_debouncer(DEBOUNCE, None, move |res: DebounceEventResult| {
            me.do_send(FsChanged(res))
        });
        let mut debouncer = match debouncer {
            Ok(d) => d,
            Err(e) => {
                self.poll_instead(e.to_string(), ctx);
                return;
            }
        };
        if let Err(e) = std::fs::create_dir_all(&self.packs_root) {
            tracing::warn!(error = %e, root = %self.packs_root.display(), "cannot create the packs root");
        }
        let mut refused = None;
        for (dir, mode) in [
            (&self.packs_root, RecursiveMode::Recursive),
            (&self.config_dir, RecursiveMode::NonRecursive),
        ] {
            if let Err(e) = debouncer.watch(dir, mode) {
                refused = Some(format!("{}: {e}", dir.display()));
            }
        }
        tracing::debug!(root = %self.packs_root.display(), "watching for manifest changes");
        self.debouncer = Some(debouncer);
        if let Some(why) = refused {
            self.poll_instead(why, ctx);
        }
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        if let Some(d) = self.debouncer.take() {
            d.stop_nonblocking();
        }
    }
}

impl Supervised for Watcher {
    fn restarting(&mut self, _: &mut Self::Context) {
        if let Some(d) = self.debouncer.take() {
            d.stop_nonblocking();
        }
    }
}

impl Handler<FsChanged> for Watcher {
    type Result = ();
    fn handle(&mut self, FsChanged(res): FsChanged, _: &mut Context<Self>) {
        let (paths, rescan) = match res {
            Ok(events) => {
                let rescan = events.iter().any(|e| e.need_rescan());
                (
                    events
                        .into_iter()
                        // Reads are not changes: a worker starting opens its handler file, and
                        // the agent opens manifests to load them (a restart loop otherwise).
                        .filter(|e| !e.event.kind.is_access())
                        .flat_map(|e| e.event.paths)
                        .collect::<Vec<_>>(),
                    rescan,
                )
            }
            Err(errors) => {
                for e in errors {
                    tracing::warn!(error = %e, "file watcher error; reloading every pack");
                }
                (Vec::new(), true)
            }
        };
        let changes = classify(
            &self.packs_root,
            &self.config_dir.join("agent.json"),
            &paths,
            rescan,
        );
        if changes.config {
            self.registry.do_send(ReloadConfig);
        }
        if changes.all_packs {
            self.registry.do_send(ReloadPacks {
                folders: None,
                code: changes.code,
            });
        } else if !changes.packs.is_empty() || !changes.code.is_empty() {
            self.registry.do_send(ReloadPacks {
                folders: Some(changes.packs.union(&changes.code).cloned().collect()),
                code: changes.code,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn classify_paths() {
        let root = Path::new("/ws/packs");
        let cfg = Path::new("/ws/.lumenflow/agent.json");
        let p = |s: &str| PathBuf::from(s);
        let c = classify(
            root,
            cfg,
            &[
                p("/ws/packs/acme/manifest.json"),
                p("/ws/packs/acme/.manifest.json.swp"),
                p("/ws/packs/billing/manifest.yaml"),
                p("/ws/packs/new-one"),
            ],
            false,
        );
        assert_eq!(
            c.packs.into_iter().collect::<Vec<_>>(),
            vec!["acme", "billing", "new-one"]
        );
        assert!(!c.all_packs && !c.config);
        let c = classify(
            root,
            cfg,
            &[
                p("/ws/packs/acme/handler.mjs"),
                p("/ws/packs/acme/x/manifest.json"),
                p("/ws/packs/.hidden/manifest.json"),
            ],
            false,
        );
        assert!(c.packs.is_empty(), "{:?}", c.packs);
        assert_eq!(c.code.into_iter().collect::<Vec<_>>(), vec!["acme"]);
        // Not handler source: output files, dependencies, build output, editor files.
        let c = classify(
            root,
            cfg,
            &[
                p("/ws/packs/acme/effects.txt"),
                p("/ws/packs/acme/worker.pid"),
                p("/ws/packs/acme/node_modules/x/index.js"),
                p("/ws/packs/rusty/target/release/build/x/main.rs"),
                p("/ws/packs/acme/.handler.mjs.swp"),
                p("/ws/packs/acme/.git/hooks/pre-commit.sh"),
            ],
            false,
        );
        assert!(c.code.is_empty() && c.packs.is_empty(), "{c:?}");
        let c = classify(root, cfg, &[p("/ws/packs/rusty/src/main.rs")], false);
        assert_eq!(c.code.into_iter().collect::<Vec<_>>(), vec!["rusty"]);
        let c = classify(
            root,
            cfg,
            &[p("/ws/.lumenflow/agent.json"), p("/ws/packs")],
            false,
        );
        assert!(c.config && c.all_packs);
        assert!(classify(root, cfg, &[], true).all_packs);
    }
}
