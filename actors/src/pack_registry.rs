//! `PackRegistry`: which packs run, with which manifest (SPEC §8).
//!
//! Owns the set of running pack hosts and the routing table they are reached through. It
//! starts every pack at boot and applies hot reloads, one at a time:
//!
//! - a reload re-reads the changed pack folders and validates them *first*; only a valid
//!   manifest whose content changed replaces a running pack;
//! - a replaced pack finishes its event in flight, then its new host (and, for an exec pack,
//!   a new worker with the new command) takes over from the old one's cursor; the routing table
//!   is swapped in one step;
//! - an invalid edit never replaces a working version: the old one keeps running and the error
//!   shows in the log and in `status` until a valid version arrives;
//! - a new folder starts a pack at the end of the inbound log; a removed folder stops its pack
//!   (state `stopped`); its durable data (cursor, dead letters, replay log) is kept.
//!
//! Native packs registered through the library are fixed for the agent's lifetime.

use crate::pack_host::{Drain, HandlerKind, HostConfig, PackHost, SetHostConfig, Stop};
use crate::replay_log::ReplayLog;
use crate::router::{Emitter, RegisterHost, Router, RoutingTable, SharedTable, UnregisterHost};
use crate::stats::{AgentStats, PackState};
use crate::store::{now_ms, StoreError, StoreHandle, StoreOp};
use actix::prelude::*;
use lumenflow_pack_sdk::manifest::{load_pack_dir, scan_packs_root, PackLoad};
use lumenflow_pack_sdk::platform::{check_pin, PackPin};
use lumenflow_pack_sdk::{Manifest, NativePack};
use rusqlite::Connection;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Settings that take effect without a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveSettings {
    pub max_depth: u64,
    pub max_attempts: u32,
    pub max_restarts: u32,
    pub window: std::time::Duration,
    pub handler_timeout: std::time::Duration,
}

/// What changed in the agent's config file.
#[derive(Debug, Clone)]
pub struct ConfigChange {
    pub live: LiveSettings,
    /// Names of changed settings applied now.
    pub applied: Vec<String>,
    /// Names of changed settings that need a restart.
    pub restart: Vec<String>,
}

/// Re-reads the agent's config file after it changed: what changed, or the error.
pub type ConfigCheck = Box<dyn FnMut() -> Result<ConfigChange, String>>;

/// What a pack host needs, shared by every host the registry starts.
#[derive(Clone)]
pub struct HostDeps {
    pub store: StoreHandle,
    pub replay: Addr<ReplayLog>,
    pub emitter: Emitter,
    pub router: Addr<Router>,
    pub table: SharedTable,
    pub cfg: HostConfig,
    pub stats: Arc<AgentStats>,
}

struct Running {
    manifest: Arc<Manifest>,
    addr: Addr<PackHost>,
    /// The folder it was loaded from; `None` for a native pack.
    folder: Option<String>,
}

/// Creates a pack's cursor at the end of the inbound log if it has none, and records the kinds
/// it now subscribes to (`pack_host::sync_kinds`). Before the new routes are published.
struct InitCursor {
    pack: String,
    kinds: Vec<String>,
}

impl StoreOp for InitCursor {
    type Output = ();
    fn run(self, conn: &Connection) -> Result<(), StoreError> {
        conn.execute(
            "INSERT OR IGNORE INTO pack_cursor(pack, cursor) SELECT ?1, coalesce(max(seq), 0) FROM inbound",
            [&self.pack],
        )?;
        crate::pack_host::sync_kinds(conn, &self.pack, &self.kinds)
    }
}

/// The pack is known but not loaded (folder removed, manifest invalid): it keeps its cursor,
/// and so its place in the inbound log, for at most the replay retention (`replay_log::PruneOp`).
pub struct MarkAbsent {
    pub pack: String,
}

impl StoreOp for MarkAbsent {
    type Output = ();
    fn run(self, conn: &Connection) -> Result<(), StoreError> {
        conn.execute(
            "UPDATE pack_cursor SET absent_since_ms = coalesce(absent_since_ms, ?2) WHERE pack = ?1",
            rusqlite::params![self.pack, now_ms()],
        )?;
        Ok(())
    }
}

pub struct PackRegistry {
    deps: HostDeps,
    packs_root: PathBuf,
    workspace_root: PathBuf,
    native: BTreeMap<String, NativePack>,
    running: BTreeMap<String, Running>,
    /// Outstanding reload errors per pack folder.
    errors: BTreeMap<String, String>,
    config_check: Option<ConfigCheck>,
    /// workspace.yaml `packs:` pins, by pack id: checked before a pinned pack loads.
    pins: BTreeMap<String, PackPin>,
    /// Reload requests not read yet, merged (see `ReloadPacks`).
    pending_reload: Option<ReloadPacks>,
}

impl PackRegistry {
    /// Checks each pinned pack's version and folder hash before it loads (see
    /// `lumenflow_pack_sdk::platform`).
    pub fn with_pins(mut self, pins: Vec<PackPin>) -> Self {
        self.pins = pins.into_iter().map(|p| (p.id.clone(), p)).collect();
        self
    }

    pub fn new(
        deps: HostDeps,
        packs_root: PathBuf,
        workspace_root: PathBuf,
        native: Vec<NativePack>,
        config_check: Option<ConfigCheck>,
    ) -> Self {
        PackRegistry {
            deps,
            packs_root,
            workspace_root,
            native: native
                .into_iter()
                .map(|p| (p.manifest.id.clone(), p))
                .collect(),
            running: BTreeMap::new(),
            errors: BTreeMap::new(),
            config_check,
            pins: BTreeMap::new(),
            pending_reload: None,
        }
    }

    fn publish_table(&self) {
        let table = RoutingTable::build(self.running.values().map(|r| &r.manifest));
        self.deps.table.store(Arc::new(table));
    }

    fn start_host(
        &mut self,
        manifest: Arc<Manifest>,
        handler: HandlerKind,
        folder: Option<String>,
    ) {
        let d = self.deps.clone();
        let m = manifest.clone();
        let addr = Supervisor::start(move |_| {
            PackHost::new(m, handler, d.cfg, d.store, d.replay, d.emitter, d.stats)
        });
        self.deps.router.do_send(RegisterHost {
            pack: manifest.id.clone(),
            addr: addr.clone(),
        });
        self.running.insert(
            manifest.id.clone(),
            Running {
                manifest,
                addr,
                folder,
            },
        );
    }

    fn handler_for(load: &PackLoad, m: &Manifest) -> HandlerKind {
        match &m.runtime {
            Some(_) => HandlerKind::Exec {
                dir: load.dir.clone(),
            },
            None => HandlerKind::EmitOnly,
        }
    }

    fn record_error(&mut self, folder: &str, id: &str, message: String, keep_running: bool) {
        tracing::error!(pack = %id, "{message}");
        let stats = self.deps.stats.pack(id);
        stats.set_last_error(Some(message.clone()));
        if !keep_running {
            stats.set_state(PackState::Invalid);
        }
        self.deps.stats.set_reload_error(Some(message.clone()));
        self.errors.insert(folder.to_string(), message);
    }

    fn clear_error(&mut self, folder: &str) {
        if self.errors.remove(folder).is_some() {
            self.deps
                .stats
                .set_reload_error(self.errors.values().last().cloned());
        }
    }

    /// Valid loads and their ids, after checking slugs against the other running packs.
    fn slug_conflict(&self, m: &Manifest) -> Option<String> {
        self.running
            .values()
            .find(|r| r.manifest.id != m.id && r.manifest.slug == m.slug)
            .map(|r| format!("Duplicate slug: \"{}\" is already used by pack \"{}\"; event kinds would be ambiguous", m.slug, r.manifest.id))
    }
}

impl Actor for PackRegistry {
    type Context = Context<Self>;
}

impl Supervised for PackRegistry {}

/// Starts every pack (at boot). Answers when all hosts are started.
pub struct StartAll;
impl Message for StartAll {
    type Result = usize;
}
impl Handler<StartAll> for PackRegistry {
    type Result = usize;
    fn handle(&mut self, _: StartAll, _: &mut Context<Self>) -> usize {
        for pack in self.native.values().cloned().collect::<Vec<_>>() {
            self.start_host(
                Arc::new(pack.manifest.clone()),
                HandlerKind::Native(Box::new(pack)),
                None,
            );
        }
        let mut scan = scan_packs_root(&self.packs_root, &self.workspace_root);
        for l in &scan.lookalikes {
            tracing::warn!("{l}");
        }
        for load in &mut scan.loads {
            let pin = load.manifest.as_ref().and_then(|m| self.pins.get(&m.id));
            if let Some(pin) = pin {
                check_pin(load, pin);
            }
        }
        for load in &scan.loads {
            let folder = load.folder_name();
            let id = load
                .manifest
                .as_ref()
                .map(|m| m.id.clone())
                .unwrap_or_else(|| folder.clone());
            for w in load.warnings() {
                tracing::warn!(pack = %id, "{w}");
            }
            if self.native.contains_key(&id) {
                continue; // a native registration of the same id wins
            }
            match &load.manifest {
                None => {
                    let msg = load
                        .errors()
                        .map(|d| d.to_string())
                        .collect::<Vec<_>>()
                        .join("; ");
                    self.record_error(&folder, &id, msg, false);
                }
                Some(m) => {
                    if let Some(conflict) = self.slug_conflict(m) {
                        self.record_error(
                            &folder,
                            &id,
                            format!("{}: slug: {conflict}", load.display),
                            false,
                        );
                        continue;
                    }
                    let handler = Self::handler_for(load, m);
                    self.start_host(Arc::new(m.clone()), handler, Some(folder));
                }
            }
        }
        self.publish_table();
        for (id, r) in &self.running {
            tracing::info!(pack = %id, version = %r.manifest.version, "pack started");
        }
        self.running.len()
    }
}

/// Re-reads pack folders (`None`: all of them) and applies what changed. A running exec pack
/// in `code` (its handler source changed) is restarted even when its manifest did not change.
pub struct ReloadPacks {
    pub folders: Option<Vec<String>>,
    pub code: BTreeSet<String>,
}
impl Message for ReloadPacks {
    type Result = ();
}

enum Change {
    Start(Arc<Manifest>, HandlerKind, String),
    Replace(Arc<Manifest>, HandlerKind, String),
    /// Same manifest, new handler code: a new worker.
    Restart(Arc<Manifest>, HandlerKind, String),
    Remove(String),
}

impl Handler<ReloadPacks> for PackRegistry {
    type Result = ();
    fn handle(&mut self, m: ReloadPacks, ctx: &mut Context<Self>) {
        // Requests that queued up while a read was running are merged into one read: a burst
        // of saves reads the folder once more, not once per batch of file events.
        match &mut self.pending_reload {
            Some(p) => p.merge(m),
            None => {
                self.pending_reload = Some(m);
                ctx.notify(ReadPending);
            }
        }
    }
}

impl ReloadPacks {
    fn merge(&mut self, other: ReloadPacks) {
        self.folders = match (self.folders.take(), other.folders) {
            (Some(mut a), Some(b)) => {
                a.extend(b);
                a.sort();
                a.dedup();
                Some(a)
            }
            _ => None,
        };
        self.code.extend(other.code);
    }
}

/// Reads the merged pending reload requests (sent to itself behind those already queued).
struct ReadPending;
impl Message for ReadPending {
    type Result = ();
}

impl Handler<ReadPending> for PackRegistry {
    type Result = ();
    fn handle(&mut self, _: ReadPending, ctx: &mut Context<Self>) {
        let Some(m) = self.pending_reload.take() else {
            return;
        };
        // Reading and parsing run on a blocking thread: a hostile manifest must not hold the
        // actor thread (and the local API beside it). The mailbox waits meanwhile, so reloads
        // still apply one at a time, in order.
        let (root, ws) = (self.packs_root.clone(), self.workspace_root.clone());
        let running: Vec<String> = self
            .running
            .values()
            .filter_map(|r| r.folder.clone())
            .collect();
        let folders = m.folders;
        let read = async move {
            tokio::task::spawn_blocking(move || read_folders(folders, &root, &ws, running))
                .await
                .unwrap_or_default()
        };
        let code = m.code;
        ctx.wait(
            read.into_actor(self)
                .map(move |loads, act, ctx| act.apply_loads(loads, code, ctx)),
        );
    }
}

/// Loads the pack folders `folders` (`None`: every folder under `root`, and the `running`
/// ones, which may be gone).
fn read_folders(
    folders: Option<Vec<String>>,
    root: &std::path::Path,
    ws: &std::path::Path,
    running: Vec<String>,
) -> Vec<(String, Option<PackLoad>)> {
    let folders: Vec<String> = match folders {
        Some(f) => f,
        None => {
            let mut all: Vec<String> = scan_packs_root(root, ws)
                .loads
                .iter()
                .map(|l| l.folder_name())
                .collect();
            all.extend(running);
            all.sort();
            all.dedup();
            all
        }
    };
    folders
        .into_iter()
        .map(|f| {
            let load = load_pack_dir(&root.join(&f), ws, None);
            (f, load)
        })
        .collect()
}

impl PackRegistry {
    /// Applies freshly read pack folders: starts, replaces, restarts or removes hosts.
    fn apply_loads(
        &mut self,
        loads: Vec<(String, Option<PackLoad>)>,
        code: BTreeSet<String>,
        ctx: &mut Context<Self>,
    ) {
        let mut changes = Vec::new();
        for (folder, load) in loads {
            let running_id = self
                .running
                .iter()
                .find(|(_, r)| r.folder.as_deref() == Some(&folder))
                .map(|(id, _)| id.clone());
            let Some(mut load) = load else {
                if let Some(id) = running_id {
                    changes.push(Change::Remove(id));
                }
                self.clear_error(&folder);
                continue;
            };
            let id = load
                .manifest
                .as_ref()
                .map(|m| m.id.clone())
                .unwrap_or_else(|| folder.clone());
            if self.native.contains_key(&id) {
                continue;
            }
            if let Some(pin) = self.pins.get(&id) {
                check_pin(&mut load, pin);
            }
            let Some(manifest) = load.manifest.clone() else {
                let msg = load
                    .errors()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("; ");
                let keep = running_id.is_some();
                let msg = if keep {
                    format!("{msg} (the previous version keeps running)")
                } else {
                    msg
                };
                self.record_error(&folder, &running_id.unwrap_or(id), msg, keep);
                continue;
            };
            if let Some(conflict) = self.slug_conflict(&manifest) {
                self.record_error(
                    &folder,
                    &id,
                    format!("{}: slug: {conflict}", load.display),
                    running_id.is_some(),
                );
                continue;
            }
            let had_error = self.errors.contains_key(&folder);
            self.clear_error(&folder);
            let handler = Self::handler_for(&load, &manifest);
            match running_id {
                Some(rid) if rid != id => {
                    changes.push(Change::Remove(rid));
                    changes.push(Change::Start(Arc::new(manifest), handler, folder));
                }
                Some(rid) => {
                    let same = self
                        .running
                        .get(&rid)
                        .is_some_and(|r| r.manifest.hash == manifest.hash);
                    if !same {
                        changes.push(Change::Replace(Arc::new(manifest), handler, folder));
                    } else if code.contains(&folder) && manifest.runtime.is_some() {
                        changes.push(Change::Restart(Arc::new(manifest), handler, folder));
                    } else if had_error {
                        // Back to the running content: the reload error is gone.
                        self.deps.stats.pack(&rid).set_last_error(None);
                    }
                }
                None => changes.push(Change::Start(Arc::new(manifest), handler, folder)),
            }
        }
        if changes.is_empty() {
            return;
        }
        // Apply with the mailbox paused: one reload at a time, in order.
        let store = self.deps.store.clone();
        let router = self.deps.router.clone();
        let stopping: Vec<(String, Addr<PackHost>)> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Replace(m, ..) | Change::Restart(m, ..) => self
                    .running
                    .get(&m.id)
                    .map(|r| (m.id.clone(), r.addr.clone())),
                Change::Remove(id) => self.running.get(id).map(|r| (id.clone(), r.addr.clone())),
                Change::Start(..) => None,
            })
            .collect();
        let starting: Vec<(String, Vec<String>)> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Start(m, ..) | Change::Replace(m, ..) => {
                    Some((m.id.clone(), m.subscribed_event_kinds.clone()))
                }
                _ => None,
            })
            .collect();
        let removed: Vec<String> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Remove(id) => Some(id.clone()),
                _ => None,
            })
            .collect();
        for (id, _) in &stopping {
            self.running.remove(id);
        }
        let fut = async move {
            for (id, addr) in stopping {
                // Finish the event in flight, then forget the host (its last address goes).
                let _ = addr.send(Drain).await;
                let _ = router.send(UnregisterHost { pack: id.clone() }).await;
                addr.do_send(Stop);
                // The last address must be gone when the host stops, or its supervisor
                // restarts it (in a folder that may be gone).
                drop(addr);
                if removed.contains(&id) {
                    if let Err(e) = store.run(MarkAbsent { pack: id.clone() }).await {
                        tracing::warn!(pack = %id, error = %e, "cannot mark the pack away");
                    }
                }
            }
            for (id, kinds) in starting {
                if let Err(e) = store
                    .run(InitCursor {
                        pack: id.clone(),
                        kinds,
                    })
                    .await
                {
                    tracing::error!(pack = %id, error = %e, "cannot create the pack's cursor");
                }
            }
        };
        ctx.wait(fut.into_actor(self).map(move |(), act, _| {
            for c in changes {
                let (m, handler, folder, verb) = match c {
                    Change::Start(m, h, f) => (m, h, f, "started"),
                    Change::Replace(m, h, f) => (m, h, f, "reloaded"),
                    Change::Restart(m, h, f) => (m, h, f, "restarted: its handler code changed"),
                    Change::Remove(id) => {
                        act.deps.stats.pack(&id).set_state(PackState::Stopped);
                        act.deps.stats.reload.count.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(pack = %id, "pack folder removed: pack stopped (its queued data is kept)");
                        continue;
                    }
                };
                tracing::info!(pack = %m.id, version = %m.version, hash = %&m.hash[..12], "pack {verb}");
                act.deps.stats.pack(&m.id).set_last_error(None);
                act.start_host(m, handler, Some(folder));
                act.deps.stats.reload.count.fetch_add(1, Ordering::Relaxed);
            }
            act.deps.stats.reload.last_ms.store(now_ms(), Ordering::Relaxed);
            act.publish_table();
        }));
    }
}

/// The agent's config file changed.
pub struct ReloadConfig;
impl Message for ReloadConfig {
    type Result = ();
}
impl Handler<ReloadConfig> for PackRegistry {
    type Result = ();
    fn handle(&mut self, _: ReloadConfig, _: &mut Context<Self>) {
        let Some(check) = &mut self.config_check else {
            return;
        };
        match check() {
            Ok(change) => {
                if change.applied.is_empty() && change.restart.is_empty() {
                    return;
                }
                let live = change.live;
                self.deps.cfg.max_attempts = live.max_attempts;
                self.deps.cfg.max_restarts = live.max_restarts;
                self.deps.cfg.window = live.window;
                self.deps.cfg.handler_timeout = live.handler_timeout;
                for r in self.running.values() {
                    r.addr.do_send(SetHostConfig(self.deps.cfg.clone()));
                }
                self.deps
                    .emitter
                    .queue
                    .do_send(crate::queue::SetMaxDepth(live.max_depth));
                self.deps
                    .stats
                    .set_reload_error(self.errors.values().last().cloned());
                self.deps.stats.reload.count.fetch_add(1, Ordering::Relaxed);
                self.deps
                    .stats
                    .reload
                    .last_ms
                    .store(now_ms(), Ordering::Relaxed);
                if !change.applied.is_empty() {
                    tracing::info!(
                        ".lumenflow/agent.json reloaded: applied now: {}",
                        change.applied.join(", ")
                    );
                }
                if !change.restart.is_empty() {
                    tracing::warn!(".lumenflow/agent.json changed ({}): these settings take effect at the next start", change.restart.join(", "));
                }
            }
            Err(e) => {
                tracing::error!("{e} (the running configuration is unchanged)");
                self.deps.stats.set_reload_error(Some(e));
            }
        }
    }
}

/// Drains every running pack (shutdown).
pub struct DrainAll;
impl Message for DrainAll {
    type Result = ();
}
impl Handler<DrainAll> for PackRegistry {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: DrainAll, _: &mut Context<Self>) -> Self::Result {
        let addrs: Vec<Addr<PackHost>> = self.running.values().map(|r| r.addr.clone()).collect();
        Box::pin(async move {
            futures_util::future::join_all(addrs.iter().map(|a| a.send(Drain))).await;
        })
    }
}
