//! Builds and runs the actor tree for one workspace; owns start-up and shutdown.
//!
//! Start-up order: lock the workspace -> open and migrate the database (a corrupt or newer
//! database is a clear error, never a crash loop) -> start the Store on its own thread -> the
//! replay log, upstream, router, queue -> one PackHost per valid pack -> the local API, whose
//! `api.json` (mode 0600) appears only once everything is ready.
//!
//! Shutdown (SIGINT/SIGTERM): stop intake (the API answers 503), let each pack finish its
//! event in flight, let the upstream flush, then exit 0.
//!
//! This is also the library entry point: a Rust program can embed the agent and register
//! native packs with [`Agent::register`].

use crate::api::{self, ApiNames, ApiState};
use crate::config::{AgentConfig, Durability as CfgDurability};
use crate::packs::scan_packs;
use crate::workspace::Workspace;
use actix::prelude::*;
use anyhow::Context as _;
use arc_swap::ArcSwap;
use lumenflow_actors::approvals::Approvals;
use lumenflow_actors::pack_host::HostConfig;
use lumenflow_actors::pack_registry::{DrainAll, HostDeps, PackRegistry, StartAll};
use lumenflow_actors::queue::{outbox_depth, DurableQueue};
use lumenflow_actors::replay_log::{count_entries, ReplayLog};
use lumenflow_actors::router::{Emitter, Router, RoutingTable};
use lumenflow_actors::schema::{migrate, SchemaError};
use lumenflow_actors::stats::AgentStats;
use lumenflow_actors::store::{open_connection, Durability, Store, StoreHandle};
use lumenflow_actors::upstreams::drain::{IsIdle, Push};
use lumenflow_actors::upstreams::http::{load_pull_cursor, HttpConfig, HttpUpstream};
use lumenflow_actors::upstreams::mem::{Upstream, UpstreamMode};
use lumenflow_actors::watcher::{Watcher, Watching};
use lumenflow_pack_sdk::NativePack;
use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Why the agent could not start (exit 2 at the CLI).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("lumenflow-agent is already running in {workspace} (pid {pid}); stop it first, or use `lumenflow-agent status`")]
    AlreadyRunning { workspace: String, pid: String },
    #[error("state database {path}: {reason}")]
    Database { path: String, reason: SchemaError },
}

/// Is a core actor's mailbox still open?
type AliveProbe = Box<dyn Fn() -> bool>;

#[derive(Clone)]
enum UpstreamChoice {
    MemInbox,
    Http(HttpConfig),
    Nats(lumenflow_actors::upstreams::nats::NatsConfig),
}

/// An agent for one workspace, ready to run.
pub struct Agent {
    ws: Workspace,
    cfg: AgentConfig,
    native: Vec<NativePack>,
    backoff_base: Duration,
    upstream: UpstreamChoice,
    /// workspace.yaml, read once at start: its pins (checked before a pinned pack loads), its
    /// control_plane (the upstream, and the config the sync port serves).
    yaml: crate::workspace_yaml::WorkspaceYaml,
    /// Where the upstream came from: `enrollment`, `workspace.yaml` or `agent.json`.
    upstream_source: &'static str,
    pull_cursor: Option<String>,
    /// `start --ready-file`: written once ready (see `service`).
    ready_file: Option<std::path::PathBuf>,
}

impl Agent {
    pub fn new(ws: Workspace, cfg: AgentConfig) -> Self {
        Agent {
            ws,
            cfg,
            native: Vec::new(),
            backoff_base: Duration::from_secs(1),
            upstream: UpstreamChoice::MemInbox,
            upstream_source: "agent.json",
            yaml: Default::default(),
            pull_cursor: None,
            ready_file: None,
        }
    }

    /// Writes this file once the agent is ready, and removes it when it stops.
    pub fn ready_file(mut self, path: Option<std::path::PathBuf>) -> Self {
        self.ready_file = path;
        self
    }

    /// Registers a native Rust pack (the quickstart's `packRegistry.register`).
    pub fn register(mut self, pack: NativePack) -> Self {
        self.native.push(pack);
        self
    }

    /// Base of the restart and retry backoff (default 1 s).
    pub fn backoff_base(mut self, d: Duration) -> Self {
        self.backoff_base = d;
        self
    }

    /// The roots of `tls.ca_file`, read once at start (a path relative to the workspace).
    fn root_certs(&self) -> anyhow::Result<Option<Arc<Vec<ureq::tls::Certificate<'static>>>>> {
        let Some(file) = &self.cfg.tls_ca_file else {
            return Ok(None);
        };
        let path = self.ws.root.join(file);
        let at = format!("{}: tls.ca_file", self.ws.display(&self.ws.config_file()));
        let pem = std::fs::read(&path)
            .map_err(|e| anyhow::anyhow!("{at}: cannot read {}: {e}", path.display()))?;
        let certs = lumenflow_actors::upstreams::http::load_root_certs(&pem)
            .map_err(|m| anyhow::anyhow!("{at}: {}: {m}", path.display()))?;
        tracing::info!(file = %path.display(), certificates = certs.len(), "https upstream: trusting the roots of tls.ca_file");
        Ok(Some(Arc::new(certs)))
    }

    /// Runs in the foreground until SIGINT/SIGTERM. The steps, in order: the upstream, the
    /// workspace lock, the state database, the known packs' places in the inbound log, then
    /// the actor tree ([`Agent::run_tree`]).
    pub fn run(mut self) -> anyhow::Result<()> {
        // Before anything opens a file: packs, the store and the API share this limit.
        let files = crate::limits::raise_open_files();
        if files.limit > files.started_with {
            tracing::debug!(
                from = files.started_with,
                to = files.limit,
                "raised the open-files limit"
            );
        } else if files.limit < 4096 {
            tracing::warn!(limit = files.limit, "the open-files limit is low (ulimit -n); many exec packs or API connections may not fit");
        }
        self.choose_upstream()?;
        create_private_dir(&self.ws.state_dir())?;
        ignore_state_in_git(&self.ws);
        let _lock = lock_workspace(&self.ws)?;
        let db_path = self.ws.db_file();
        let durability = match self.cfg.durability {
            CfgDurability::Full => Durability::Full,
            CfgDurability::Normal => Durability::Normal,
        };
        let conn = self.open_state(&db_path, durability)?;
        let stats = durable_stats(&conn)?;
        self.place_known_packs(&conn)?;
        self.pull_cursor = load_pull_cursor(&conn)?;
        drop(conn);

        let system = System::new();
        let result = system.block_on(self.run_tree(db_path, durability, stats));
        System::current().stop();
        result
    }

    /// The upstream, by precedence: the enrollment (conductor mode; its subject is the
    /// identity), then workspace.yaml's `control_plane` (token from the variable its
    /// `auth.token_env` names), then agent.json's `upstream`.
    fn choose_upstream(&mut self) -> anyhow::Result<()> {
        let root_certs = self.root_certs()?;
        self.yaml = crate::workspace_yaml::load(&self.ws.root)?.unwrap_or_default();
        let yaml_cp = self.yaml.control_plane.clone();
        let local_deny = self.cfg.policies["default_decision"] == "deny";
        let http = |endpoint: &str, token: String, workspace_id: String| HttpConfig {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            workspace_id,
            batch_max: self.cfg.queue_batch_max,
            enrollment_file: None,
            root_certs: root_certs.clone(),
            sync_interval: Duration::from_secs(30),
            policy_mode: Default::default(),
            local_deny,
        };
        if let Some(e) = crate::enrollment::Enrollment::load(&self.ws)? {
            self.cfg.identity = e.subject.clone();
            self.cfg.upstream = e.endpoint.clone();
            if is_nats(&e.endpoint) {
                self.upstream = UpstreamChoice::Nats(self.nats_config(Some(e.token)));
                self.upstream_source = "enrollment";
                return Ok(());
            }
            let mut h = http(&e.endpoint, e.token, e.subject);
            h.enrollment_file = Some(self.ws.enrollment_file());
            self.upstream = UpstreamChoice::Http(h);
            self.upstream_source = "enrollment";
            return Ok(());
        }
        if let Some(cp) = yaml_cp {
            if self.is_own_api(&cp.endpoint) {
                // The platform is pointed at this agent: its control_plane is us, not an
                // upstream (following it would send every event back to ourselves).
                tracing::info!(endpoint = %cp.endpoint, "workspace.yaml control_plane.endpoint is this agent's own API (api.listen): the platform forwards through the agent; upstream from agent.json");
            } else {
                let token = std::env::var(&cp.token_env).map_err(|_| anyhow::anyhow!(
                    "workspace.yaml: control_plane.auth.token_env: the environment variable {} is not set (it holds the control plane's token; the agent never stores it)",
                    cp.token_env
                ))?;
                self.cfg.upstream = cp.endpoint.trim_end_matches('/').to_string();
                let mut h = http(&cp.endpoint, token, self.cfg.identity.clone());
                h.sync_interval = Duration::from_secs(cp.sync_interval_s);
                h.policy_mode = cp.policy_mode;
                self.upstream = UpstreamChoice::Http(h);
                self.upstream_source = "workspace.yaml";
                return Ok(());
            }
        }
        if is_nats(&self.cfg.upstream) {
            let token = std::env::var("LUMENFLOW_NATS_TOKEN")
                .ok()
                .filter(|t| !t.is_empty());
            self.upstream = UpstreamChoice::Nats(self.nats_config(token));
            return Ok(());
        }
        if self.cfg.upstream != "mem:inbox" {
            let var = "LUMENFLOW_CONTROL_PLANE_TOKEN";
            let token = std::env::var(var).map_err(|_| anyhow::anyhow!(
                "upstream {}: no enrollment and no token; run `lumenflow-agent enroll --endpoint {} --token-env VAR`, or set {var}",
                self.cfg.upstream, self.cfg.upstream
            ))?;
            let h = http(&self.cfg.upstream, token, self.cfg.identity.clone());
            self.upstream = UpstreamChoice::Http(h);
        }
        Ok(())
    }

    /// NATS JetStream at `cfg.upstream` (a comma-separated list of servers for a cluster), with
    /// agent.json's `nats` settings. `token` is an enrollment's (or `LUMENFLOW_NATS_TOKEN`), used
    /// when `nats` names no other way to authenticate.
    fn nats_config(&self, token: Option<String>) -> lumenflow_actors::upstreams::nats::NatsConfig {
        use lumenflow_actors::upstreams::nats::{NatsAuth, NatsConfig};
        let n = &self.cfg.nats;
        let path = |p: &String| self.ws.root.join(p);
        let auth = if let Some(p) = &n.credentials_file {
            NatsAuth::Credentials(path(p))
        } else if let Some(p) = &n.nkey_seed_file {
            NatsAuth::NkeySeed(path(p))
        } else if let Some(v) = &n.token_env {
            NatsAuth::TokenEnv(v.clone())
        } else if let Some(p) = &n.token_file {
            NatsAuth::TokenFile(path(p))
        } else if let (Some(user), Some(pw)) = (&n.user, &n.password_env) {
            NatsAuth::UserPassword {
                user: user.clone(),
                password_env: pw.clone(),
            }
        } else if let Some(t) = token {
            NatsAuth::Token(t)
        } else {
            NatsAuth::None
        };
        let servers = self
            .cfg
            .upstream
            .split(',')
            .map(|s| s.trim().to_string())
            .collect();
        let mut c = NatsConfig::new(servers, self.cfg.identity.clone());
        if let Some(s) = &n.stream {
            c.stream.clone_from(s);
        }
        // Each event is its own NATS message (no request-size limit): a round publishes four
        // API batches' worth, so its fixed costs (outbox read, settle commit) are amortised.
        c.batch_max = self.cfg.queue_batch_max.saturating_mul(4);
        c.auth = auth;
        c.ca_file = self.cfg.tls_ca_file.as_ref().map(path);
        c.fleet_from.clone_from(&n.workspaces);
        if let Some(ms) = n.ack_wait_ms {
            c.ack_wait = Duration::from_millis(ms);
        }
        if let Some(s) = n.stall_after_s {
            c.stall_after = Duration::from_secs(s);
        }
        c
    }

    /// Is `endpoint` this agent's own local API (a fixed loopback `api.listen` port)?
    fn is_own_api(&self, endpoint: &str) -> bool {
        let port = self.cfg.api_listen.port();
        let rest = endpoint
            .strip_prefix("http://")
            .unwrap_or("")
            .trim_end_matches('/');
        let hostport = rest.split('/').next().unwrap_or("");
        port != 0
            && ["127.0.0.1", "localhost", "[::1]"]
                .iter()
                .any(|h| hostport == format!("{h}:{port}"))
    }

    /// Opens and migrates the state database; a corrupt or newer one is a clear error.
    fn open_state(
        &self,
        db_path: &std::path::Path,
        durability: Durability,
    ) -> anyhow::Result<rusqlite::Connection> {
        let db_err = |reason: SchemaError| StartError::Database {
            path: self.ws.display(db_path),
            reason,
        };
        let mut conn = open_connection(db_path, durability)
            .map_err(|e| db_err(SchemaError::Corrupt(e.to_string())))?;
        let from = migrate(&mut conn).map_err(db_err)?;
        if from != lumenflow_actors::schema::SCHEMA_VERSION {
            tracing::info!(
                from,
                to = lumenflow_actors::schema::SCHEMA_VERSION,
                "state database migrated"
            );
        }
        Ok(conn)
    }

    /// A pack seen for the first time starts at the end of the inbound log. Fix that point
    /// now, before any event can arrive: an exec pack's first load happens only after its
    /// worker's handshake, and events accepted meanwhile must not fall before its cursor. A
    /// folder whose manifest is invalid right now is a pack too (its folder name is its id):
    /// it gets its place now and finds the events that arrive meanwhile once fixed. Every
    /// known pack counts as away until its host loads (`LoadPending` clears it).
    fn place_known_packs(&self, conn: &rusqlite::Connection) -> anyhow::Result<()> {
        let mut ids: Vec<(String, Option<Vec<String>>)> = self
            .native
            .iter()
            .map(|p| {
                let m = &p.manifest;
                (m.id.clone(), Some(m.subscribed_event_kinds.clone()))
            })
            .collect();
        ids.extend(scan_packs(&self.ws, &self.cfg).loads.iter().map(
            |l| match l.manifest.as_ref() {
                Some(m) => (m.id.clone(), Some(m.subscribed_event_kinds.clone())),
                None => (l.folder_name(), None),
            },
        ));
        for (id, kinds) in ids {
            conn.execute(
                "INSERT OR IGNORE INTO pack_cursor(pack, cursor) SELECT ?1, coalesce(max(seq), 0) FROM inbound",
                [&id],
            )?;
            if let Some(kinds) = kinds {
                lumenflow_actors::pack_host::sync_kinds(conn, &id, &kinds)?;
            }
        }
        conn.execute(
            "UPDATE pack_cursor SET absent_since_ms = coalesce(absent_since_ms, ?1)",
            [lumenflow_actors::store::now_ms()],
        )?;
        Ok(())
    }

    /// Starts the actor tree, serves the API until a signal (or a failure), then shuts down.
    async fn run_tree(
        self,
        db_path: std::path::PathBuf,
        durability: Durability,
        stats: Arc<AgentStats>,
    ) -> anyhow::Result<()> {
        let core = self.start_core(db_path, durability, &stats);
        let (registry, watcher) = self.start_packs(&core, &stats).await;
        let api = self.start_api(&core, &stats).await?;
        actix_rt::spawn(sample_rates(stats.clone()));
        // Ready: packs started, the API answers.
        let mut ready = match &self.ready_file {
            Some(path) => Some(crate::service::ReadyFile::write(path, &api.url)?),
            None => None,
        };
        crate::service::notify("READY=1");
        let probes = core_probes(&core, &registry, &watcher);
        let end = wait_for_end(probes, stats.store.clone()).await;
        crate::service::notify("STOPPING=1");
        ready.take();
        let stop_intake = |api: &Api| {
            api.shutdown.store(true, Ordering::SeqCst);
            let _ = std::fs::remove_file(&api.file);
        };
        match end {
            End::Lost(why) => {
                stop_intake(&api);
                api.server.abort();
                core.store_arbiter.stop();
                Err(anyhow::anyhow!("{why}"))
            }
            End::Died(name) => {
                tracing::error!("internal error: the {name} actor stopped unexpectedly (a panic); exiting so that a restart recovers it cleanly (accepted events are on disk)");
                stop_intake(&api);
                api.server.abort();
                core.store_arbiter.stop();
                Err(anyhow::anyhow!(
                    "the {name} actor stopped unexpectedly; see the log"
                ))
            }
            End::Signal => {
                tracing::info!("shutting down: finishing events in flight");
                stop_intake(&api);
                self.drain(&core, &registry).await;
                api.server.abort();
                core.store_arbiter.stop();
                tracing::info!("stopped");
                Ok(())
            }
        }
    }

    /// The Store (on its own thread), the replay log, the router, the upstream and the queue.
    fn start_core(
        &self,
        db_path: std::path::PathBuf,
        durability: Durability,
        stats: &Arc<AgentStats>,
    ) -> Core {
        let cfg = &self.cfg;
        // Store on its own arbiter: SQLite's fsyncs never block routing.
        let store_arbiter = Arbiter::new();
        let store_stats = stats.store.clone();
        let db_path_for_readers = db_path.clone();
        let store_addr = Supervisor::start_in_arbiter(&store_arbiter.handle(), move |_| {
            Store::new(db_path, durability, store_stats)
        });
        let store_probe = store_addr.clone();
        let store = StoreHandle::new(store_addr).with_readers(db_path_for_readers);

        let retention = Duration::from_secs(u64::from(cfg.replay_retention_days) * 86_400);
        let replay = {
            let (s, st) = (store.clone(), stats.clone());
            Supervisor::start(move |_| ReplayLog::new(s, retention, st))
        };
        let table: lumenflow_actors::router::SharedTable =
            Arc::new(ArcSwap::from_pointee(RoutingTable::default()));
        let router = {
            let (t, s, st) = (table.clone(), store.clone(), stats.clone());
            Supervisor::start(move |_| Router::new(t, s, st))
        };
        // The upstream: the embedded mem:inbox, or the control plane over HTTP.
        let (push, idle): (Recipient<Push>, Recipient<IsIdle>) = match &self.upstream {
            UpstreamChoice::MemInbox => {
                let (s, st, batch) = (store.clone(), stats.clone(), cfg.queue_batch_max);
                let addr =
                    Supervisor::start(move |_| Upstream::new(UpstreamMode::MemInbox, s, batch, st));
                (addr.clone().recipient(), addr.recipient())
            }
            UpstreamChoice::Http(http) => {
                let (h, s, r, st, c) = (
                    http.clone(),
                    store.clone(),
                    router.clone(),
                    stats.clone(),
                    self.pull_cursor.clone(),
                );
                let addr = Supervisor::start(move |_| HttpUpstream::new(h, s, r, st, c));
                (addr.clone().recipient(), addr.recipient())
            }
            UpstreamChoice::Nats(nats) => {
                let (n, s, r, t, st) = (
                    nats.clone(),
                    store.clone(),
                    router.clone(),
                    table.clone(),
                    stats.clone(),
                );
                let addr = Supervisor::start(move |_| {
                    lumenflow_actors::upstreams::nats::NatsUpstream::new(n, s, r, t, st)
                });
                (addr.clone().recipient(), addr.recipient())
            }
        };
        let approval_policy: lumenflow_actors::approvals::SharedPolicy =
            Arc::new(ArcSwap::from_pointee(cfg.approvals.clone()));
        let approvals = {
            let relay = match &self.upstream {
                UpstreamChoice::Http(h) => Some(lumenflow_actors::approvals::actor::RelayTarget {
                    endpoint: h.endpoint.trim_end_matches('/').to_string(),
                    token: h.token.clone(),
                    workspace_id: h.workspace_id.clone(),
                    agent: lumenflow_actors::upstreams::http::http_agent(
                        Duration::from_secs(10),
                        h.root_certs.as_ref(),
                    ),
                }),
                UpstreamChoice::MemInbox | UpstreamChoice::Nats(_) => None,
            };
            let (s, r, u, st, p) = (
                store.clone(),
                router.clone(),
                push.clone(),
                stats.clone(),
                approval_policy.clone(),
            );
            Supervisor::start(move |_| Approvals::new(s, r, u, st, p, relay.clone()))
        };
        let queue = {
            let (s, u, r, st, max) = (
                store.clone(),
                push,
                router.clone(),
                stats.clone(),
                cfg.queue_max_depth,
            );
            let direct = matches!(self.upstream, UpstreamChoice::MemInbox);
            Supervisor::start(move |_| {
                let q = DurableQueue::new(s, u, r, max, st.clone());
                if direct {
                    q.deliver_to_mem_inbox()
                } else {
                    q
                }
            })
        };
        let emitter = Emitter {
            table: table.clone(),
            identity: cfg.identity.clone().into(),
            queue,
            router: router.clone(),
            approvals: approval_policy.clone(),
            stats: stats.clone(),
        };
        Core {
            approvals,
            approval_policy,
            store_arbiter,
            store,
            store_probe,
            replay,
            router,
            table,
            idle,
            emitter,
        }
    }

    /// The pack registry (one PackHost per valid pack) and the watcher for hot reloads.
    async fn start_packs(
        &self,
        core: &Core,
        stats: &Arc<AgentStats>,
    ) -> (Addr<PackRegistry>, Addr<Watcher>) {
        let cfg = &self.cfg;
        let host_cfg = HostConfig {
            max_attempts: cfg.max_attempts,
            max_restarts: cfg.max_restarts,
            window: Duration::from_secs(cfg.window_s),
            handler_timeout: Duration::from_millis(cfg.handler_timeout_ms),
            backoff_base: self.backoff_base,
            backoff_cap: Duration::from_secs(60),
            workspace: self.ws.root.clone(),
            identity: cfg.identity.clone(),
        };
        let deps = HostDeps {
            store: core.store.clone(),
            replay: core.replay.clone(),
            emitter: core.emitter.clone(),
            router: core.router.clone(),
            table: core.table.clone(),
            cfg: host_cfg,
            stats: stats.clone(),
        };
        let packs_root = self.ws.root.join(&cfg.packs_dir);
        // Identity and upstream from the enrollment or workspace.yaml are not agent.json's.
        let pinned = self.upstream_source != "agent.json";
        let config_check = config_checker(&self.ws, cfg, pinned, core.approval_policy.clone());
        let registry = {
            let (root, ws_root, native) = (
                packs_root.clone(),
                self.ws.root.clone(),
                self.native.clone(),
            );
            let mut check = Some(config_check);
            let pins = self.yaml.pins.clone();
            Supervisor::start(move |_| {
                PackRegistry::new(deps, root, ws_root, native, check.take()).with_pins(pins)
            })
        };
        // The watches are in place before the packs are read and before the API opens, so an
        // edit made at any moment after start is seen (a later save of unchanged content is a
        // no-op). Actix runs `started` before any message, hence the `Watching` round trip.
        let watcher = {
            let (root, dir, reg) = (packs_root, self.ws.lumenflow_dir(), registry.clone());
            let stats = stats.clone();
            Supervisor::start(move |_| Watcher::new(root, dir, reg, stats.clone()))
        };
        let _ = watcher.send(Watching).await;
        let started = registry.send(StartAll).await.unwrap_or(0);
        tracing::debug!(packs = started, "packs started");
        (registry, watcher)
    }

    /// The local API; `api.json` (mode 0600) appears only now, once everything is ready.
    async fn start_api(&self, core: &Core, stats: &Arc<AgentStats>) -> anyhow::Result<Api> {
        let cfg = &self.cfg;
        let token = random_token();
        let listener = std::net::TcpListener::bind(cfg.api_listen).with_context(|| {
            format!(
                "cannot listen on {} (agent.json api.listen)",
                cfg.api_listen
            )
        })?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let extra_token = match &cfg.api_token_env {
            Some(var) => Some(std::env::var(var).map_err(|_| anyhow::anyhow!(
                "{}: api.token_env: the environment variable {var} is not set (its token is the one the local API accepts from the platform)",
                self.ws.display(&self.ws.config_file())
            ))?),
            None => None,
        };
        let state = ApiState::new(
            core.emitter.clone(),
            core.store.clone(),
            stats.clone(),
            token.clone(),
            ApiNames {
                workspace: self.ws.root.display().to_string(),
                identity: cfg.identity.clone(),
                upstream: cfg.upstream.clone(),
                upstream_source: self.upstream_source,
            },
            self.sync_port(core),
            core.approvals.clone(),
        )
        .also_accepting(extra_token);
        let shutdown = state.shutdown.clone();
        let file = self.ws.api_file();
        write_private_json(
            &file,
            &serde_json::json!({"url": format!("http://{addr}"), "token": token, "pid": std::process::id()}),
        )?;
        tracing::info!(api = %format!("http://{addr}"), workspace = %self.ws.root.display(), identity = %cfg.identity, upstream = %cfg.upstream, "agent started");
        let open_files = crate::limits::raise_open_files();
        let limits = crate::api_server::Limits::for_fd_limit(open_files.limit);
        let (runtime, server) =
            api::start(listener, state, limits).context("cannot start the local API's threads")?;
        Ok(Api {
            url: format!("http://{addr}"),
            shutdown,
            file,
            server,
            runtime: Some(runtime),
        })
    }

    /// The platform's sync port on the local API: relayed to the control plane in conductor
    /// mode, answered locally on mem:inbox (policies from agent.json, config from
    /// workspace.yaml).
    fn sync_port(&self, core: &Core) -> crate::sync_port::SyncPort {
        let relay = match &self.upstream {
            UpstreamChoice::Http(h) => Some(crate::sync_port::Relay::new(
                &h.endpoint,
                h.token.clone(),
                h.root_certs.as_ref(),
            )),
            UpstreamChoice::MemInbox | UpstreamChoice::Nats(_) => None,
        };
        let config = self.yaml.control_plane.as_ref().map(|cp| {
            let id = self
                .yaml
                .id
                .clone()
                .unwrap_or_else(|| self.cfg.identity.clone());
            serde_json::json!({"id": id, "control_plane": cp.raw})
        });
        crate::sync_port::SyncPort::new(
            relay,
            core.store.clone(),
            self.cfg.policies.clone(),
            config,
        )
    }

    /// Lets each pack finish its event in flight, then the upstream flush (bounded).
    async fn drain(&self, core: &Core, registry: &Addr<PackRegistry>) {
        let drain_deadline = Duration::from_millis(self.cfg.handler_timeout_ms.min(30_000) + 1000);
        if tokio::time::timeout(drain_deadline, registry.send(DrainAll))
            .await
            .is_err()
        {
            tracing::warn!(
                "a handler did not finish in time; its event will be redelivered at the next start"
            );
        }
        let flush_until = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < flush_until {
            if core.idle.send(IsIdle).await.unwrap_or(true) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The counters `status` starts from, read from the durable state.
fn durable_stats(conn: &rusqlite::Connection) -> anyhow::Result<Arc<AgentStats>> {
    let stats = Arc::new(AgentStats::default());
    let (depth, oldest) = outbox_depth(conn)?;
    stats.queue.durable_depth.store(depth, Ordering::Relaxed);
    stats.queue.oldest_ms.store(oldest, Ordering::Relaxed);
    stats
        .replay_entries
        .store(count_entries(conn)?, Ordering::Relaxed);
    let dead: i64 = conn.query_row("SELECT count(*) FROM dead_letters", [], |r| r.get(0))?;
    stats.dead_letters.store(dead, Ordering::Relaxed);
    stats.upstream.records_waiting.store(
        lumenflow_actors::sync_records::waiting(conn)?,
        Ordering::Relaxed,
    );
    stats.approvals.pending.store(
        lumenflow_actors::approvals::held::pending_count(conn)?,
        Ordering::Relaxed,
    );
    Ok(stats)
}

/// The core actors, started by [`Agent::start_core`].
struct Core {
    store_arbiter: Arbiter,
    store: StoreHandle,
    store_probe: Addr<Store>,
    replay: Addr<ReplayLog>,
    router: Addr<Router>,
    table: lumenflow_actors::router::SharedTable,
    idle: Recipient<IsIdle>,
    emitter: Emitter,
    approvals: Addr<Approvals>,
    approval_policy: lumenflow_actors::approvals::SharedPolicy,
}

/// The running local API.
struct Api {
    url: String,
    shutdown: Arc<std::sync::atomic::AtomicBool>,
    file: std::path::PathBuf,
    server: tokio::task::JoinHandle<()>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Api {
    fn drop(&mut self) {
        // Dropped inside the actor system's async context, where a blocking runtime drop
        // would panic.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Samples the counters once a second, for the rates of `status`, `top` and `/metrics`.
async fn sample_rates(stats: Arc<AgentStats>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        stats.sample_rates();
    }
}

/// Why the agent stops.
enum End {
    /// SIGINT/SIGTERM: drain and exit 0.
    Signal,
    /// A core actor died (a panic): exit 1 at once.
    Died(&'static str),
    /// The state database was deleted or replaced under the agent: exit non-zero at once.
    Lost(String),
}

/// Every core actor runs under a Supervisor, which restarts it when it stops. A panic instead
/// ends its task and closes its mailbox; no restart in place could hand the new address to
/// everyone holding the old one. So escalate, as an OTP supervisor does when a child cannot be
/// restarted: say which one died and exit 1. Everything accepted is in SQLite; the next start
/// recovers it.
fn core_probes(
    core: &Core,
    registry: &Addr<PackRegistry>,
    watcher: &Addr<Watcher>,
) -> Vec<(&'static str, AliveProbe)> {
    let (queue, idle) = (core.emitter.queue.clone(), core.idle.clone());
    vec![
        (
            "store",
            Box::new({
                let a = core.store_probe.clone();
                move || a.connected()
            }),
        ),
        (
            "replay log",
            Box::new({
                let a = core.replay.clone();
                move || a.connected()
            }),
        ),
        (
            "router",
            Box::new({
                let a = core.router.clone();
                move || a.connected()
            }),
        ),
        ("queue", Box::new(move || queue.connected())),
        (
            "approvals",
            Box::new({
                let a = core.approvals.clone();
                move || a.connected()
            }),
        ),
        ("upstream", Box::new(move || idle.connected())),
        (
            "pack registry",
            Box::new({
                let a = registry.clone();
                move || a.connected()
            }),
        ),
        (
            "watcher",
            Box::new({
                let a = watcher.clone();
                move || a.connected()
            }),
        ),
    ]
}

/// Waits for a signal, a dead core actor (checked every second) or a lost database (the Store
/// refuses everything from the moment it sees it; checked every 200 ms).
async fn wait_for_end(
    probes: Vec<(&'static str, AliveProbe)>,
    store: Arc<lumenflow_actors::store::StoreStats>,
) -> End {
    let died = async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if let Some((name, _)) = probes.iter().find(|(_, alive)| !alive()) {
                return *name;
            }
        }
    };
    let lost = async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            if let Some(why) = store.lost() {
                return why;
            }
        }
    };
    tokio::select! {
        _ = wait_for_signal() => End::Signal,
        name = died => End::Died(name),
        why = lost => End::Lost(why),
    }
}

/// Re-reads agent.json after a change. Settings that can change live are reported as applied
/// (the registry applies them); the others take effect at the next start.
fn config_checker(
    ws: &Workspace,
    running: &AgentConfig,
    enrolled: bool,
    approvals: lumenflow_actors::approvals::SharedPolicy,
) -> lumenflow_actors::pack_registry::ConfigCheck {
    use lumenflow_actors::pack_registry::{ConfigChange, LiveSettings};
    const LIVE: &[&str] = &[
        "queue_max_depth",
        "max_attempts",
        "max_restarts",
        "window_s",
        "handler_timeout_ms",
        "approvals",
    ];
    let ws = ws.clone();
    let mut current = running.clone();
    // With an enrollment, identity and upstream come from it, not from agent.json.
    let (enrolled_identity, enrolled_upstream) =
        (running.identity.clone(), running.upstream.clone());
    Box::new(move || {
        let (mut now, _) = AgentConfig::for_workspace(&ws).map_err(|e| e.to_string())?;
        if enrolled {
            now.identity = enrolled_identity.clone();
            now.upstream = enrolled_upstream.clone();
        }
        let (a, b) = (
            serde_json::to_value(&current).unwrap_or_default(),
            serde_json::to_value(&now).unwrap_or_default(),
        );
        let (mut applied, mut restart) = (Vec::new(), Vec::new());
        if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
            for (k, v) in b {
                if a.get(k) != Some(v) {
                    if LIVE.contains(&k.as_str()) {
                        applied.push(k.clone())
                    } else {
                        restart.push(k.clone())
                    }
                }
            }
        }
        // What was applied is now the running value; restart-only changes keep being reported.
        current.queue_max_depth = now.queue_max_depth;
        current.max_attempts = now.max_attempts;
        current.max_restarts = now.max_restarts;
        current.window_s = now.window_s;
        current.handler_timeout_ms = now.handler_timeout_ms;
        // New holds take the new deadlines; held events keep the deadline they were given.
        if current.approvals != now.approvals {
            approvals.store(Arc::new(now.approvals.clone()));
            current.approvals = now.approvals.clone();
        }
        Ok(ConfigChange {
            live: LiveSettings {
                max_depth: now.queue_max_depth,
                max_attempts: now.max_attempts,
                max_restarts: now.max_restarts,
                window: Duration::from_secs(now.window_s),
                handler_timeout: Duration::from_millis(now.handler_timeout_ms),
            },
            applied,
            restart,
        })
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn random_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// A NATS upstream: `nats://` or `tls://` servers.
fn is_nats(upstream: &str) -> bool {
    upstream.starts_with("nats://") || upstream.starts_with("tls://")
}

/// `.lumenflow/state/.gitignore` (`*`): the agent's state is never committed, also in a
/// workspace whose own `.gitignore` does not know about it (one that had only workspace.yaml).
fn ignore_state_in_git(ws: &Workspace) {
    let file = ws.lumenflow_dir().join("state").join(".gitignore");
    if !file.exists() {
        if let Err(e) = std::fs::write(&file, "# lumenflow-agent state: never committed\n*\n") {
            tracing::debug!(error = %e, "cannot write .lumenflow/state/.gitignore");
        }
    }
}

fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    let cannot = || {
        format!(
            "cannot write the state directory {} (the agent keeps its durable state there)",
            dir.display()
        )
    };
    std::fs::create_dir_all(dir).with_context(cannot)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(cannot)?;
    }
    Ok(())
}

/// Writes JSON to `path` with mode 0600, atomically (temp file + rename).
pub fn write_private_json(path: &std::path::Path, value: &serde_json::Value) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(value.to_string().as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Takes the workspace lock (held until the process exits) and records our pid in it.
fn lock_workspace(ws: &Workspace) -> anyhow::Result<File> {
    use std::io::{Read, Seek, Write};
    let path = ws.lock_file();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    if !try_lock(&f) {
        let mut pid = String::new();
        let _ = f.read_to_string(&mut pid);
        return Err(StartError::AlreadyRunning {
            workspace: ws.root.display().to_string(),
            pid: pid.trim().to_string(),
        }
        .into());
    }
    f.set_len(0)?;
    f.seek(std::io::SeekFrom::Start(0))?;
    write!(f, "{}", std::process::id())?;
    f.sync_all()?;
    Ok(f)
}

#[cfg(unix)]
fn try_lock(f: &File) -> bool {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a file descriptor we own; no memory is shared with the call.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

#[cfg(not(unix))]
fn try_lock(_f: &File) -> bool {
    true
}

/// Is the workspace lock held by a running agent? Returns its pid if so.
pub fn running_pid(ws: &Workspace) -> Option<String> {
    use std::io::Read;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(ws.lock_file())
        .ok()?;
    if try_lock(&f) {
        // Nobody holds it. Release: closing the file drops our lock.
        return None;
    }
    let mut pid = String::new();
    let _ = f.read_to_string(&mut pid);
    Some(pid.trim().to_string())
}
