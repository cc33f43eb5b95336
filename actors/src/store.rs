//! `Store`: the one SQLite writer.
//!
//! Owns the writer connection of `agent.db` (WAL) and runs every write of the agent on its own
//! arbiter thread, so SQLite never blocks the actors that route events.
//!
//! Guarantees:
//! - **Group commit.** Operations that arrive while others are queued share one transaction:
//!   the actor opens `BEGIN IMMEDIATE` at the first operation and commits once its mailbox is
//!   drained (actix runs `notify`-ed work after the mailbox). No caller gets an answer before
//!   the commit that holds its operation is on disk (`synchronous=FULL`) or in the WAL
//!   (`synchronous=NORMAL`, durability `normal`).
//! - **Isolation of failures.** Each operation runs in a savepoint: one that fails (or panics)
//!   is rolled back alone and answered with its error; the others commit.
//! - A failed commit answers every operation of the batch with the error; nothing is reported
//!   as stored that is not.
//! - Commit hooks ([`OnCommit`]) run on this thread, after the commit, in operation order: what
//!   they send on (rows to dispatch) leaves in exactly the order it was written.
//!
//! The operations themselves ([`StoreOp`]) live beside the actor that owns each table.

use actix::prelude::*;
use rusqlite::{Connection, ErrorCode};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::oneshot;

/// Durability of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync at every commit: survives a power cut.
    Full,
    /// survives a process crash, not a power cut.
    Normal,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("disk full: the state database cannot grow; free space, then retry")]
    DiskFull,
    #[error("state database is read-only: {0}")]
    ReadOnly(String),
    #[error("storage error: {0}")]
    Sqlite(String),
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Invalid(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => StoreError::DiskFull,
            Some(ErrorCode::ReadOnly)
            | Some(ErrorCode::CannotOpen)
            | Some(ErrorCode::PermissionDenied) => StoreError::ReadOnly(e.to_string()),
            _ => StoreError::Sqlite(e.to_string()),
        }
    }
}

/// One unit of work on the database, run inside the current group transaction.
pub trait StoreOp: Send + 'static {
    type Output: Send + 'static;
    fn run(self, conn: &Connection) -> Result<Self::Output, StoreError>;
}

/// Runs on the Store's thread right after the commit that holds the operation, in operation
/// order. Used to hand committed rows on (dispatch) in exactly the order they were written.
pub type OnCommit<T> = Box<dyn FnOnce(&T) + Send>;

/// Message wrapper for any [`StoreOp`].
pub struct Exec<O: StoreOp>(pub O, pub Option<OnCommit<O::Output>>);

impl<O: StoreOp> Message for Exec<O> {
    type Result = Result<O::Output, StoreError>;
}

#[derive(Debug, Default)]
pub struct StoreStats {
    pub commits: AtomicU64,
    pub ops: AtomicU64,
    pub failed_commits: AtomicU64,
    /// Set when the database file was deleted or replaced under the running agent: nothing is
    /// acknowledged after that, and the agent exits (see [`DbFile`]).
    pub lost: std::sync::Mutex<Option<String>>,
}

impl StoreStats {
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The database file as it was opened, to notice it being deleted under the agent (`rm -rf
/// .lumenflow/state`). SQLite keeps writing into the unlinked inode, every commit succeeds, and
/// everything acknowledged afterwards is gone at the next start. Checked after every commit,
/// before anyone is answered, and every second when idle: one `fstat` and one `stat`.
struct DbFile {
    path: PathBuf,
    file: std::fs::File,
}

impl DbFile {
    fn open(path: &Path) -> Option<DbFile> {
        Some(DbFile {
            path: path.to_path_buf(),
            file: std::fs::File::open(path).ok()?,
        })
    }

    /// Why the file is no longer the agent's database, if it is not.
    fn gone(&self) -> Option<String> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let open = self.file.metadata().ok()?;
            let what = match std::fs::metadata(&self.path) {
                _ if open.nlink() == 0 => "was deleted",
                Err(_) => "was moved away",
                Ok(m) if (m.dev(), m.ino()) != (open.dev(), open.ino()) => "was replaced",
                Ok(_) => return None,
            };
            Some(format!(
                "the state database {} {what} under the running agent: nothing more is accepted, and the agent stops (restart it to begin with the state on disk)",
                self.path.display()
            ))
        }
        #[cfg(not(unix))]
        None
    }
}

type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

pub struct Store {
    path: PathBuf,
    durability: Durability,
    conn: Option<Connection>,
    in_tx: bool,
    flush_scheduled: bool,
    pending: Vec<Completion>,
    stats: Arc<StoreStats>,
    file: Option<DbFile>,
}

/// Opens a connection with the agent's pragmas. Creates the file (mode 0600) when missing.
pub fn open_connection(path: &Path, durability: Durability) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        },
    )?;
    // Reads of large tables (the replay log at 1M entries is ~80 MiB) go through a memory map,
    // served by the OS page cache. SQLite's own cache stays small: at every commit it scans
    // its page hash to drop pages past the end of the file, and with a 64 MiB cache that scan
    // was 10% of the agent's CPU under a steady queue load (measured with perf).
    conn.pragma_update(None, "cache_size", -8192)?;
    conn.pragma_update(None, "mmap_size", 256i64 << 20)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(conn)
}

/// A read-only connection for commands that inspect state while no agent runs.
pub fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

impl Store {
    /// The database must already be migrated ([`crate::schema::migrate`]).
    pub fn new(path: PathBuf, durability: Durability, stats: Arc<StoreStats>) -> Self {
        Store {
            path,
            durability,
            conn: None,
            in_tx: false,
            flush_scheduled: false,
            pending: Vec::new(),
            stats,
            file: None,
        }
    }

    /// SQLite may roll back the whole transaction on its own after SQLITE_FULL, SQLITE_IOERR or
    /// SQLITE_NOMEM, not just the failing statement. The group's earlier ops are then gone,
    /// and what runs next would run outside any transaction: `SAVEPOINT` would open one and
    /// `RELEASE` commit it at once, so an op would be durable while its caller is told it
    /// failed, and its commit hook (the dispatch of inbound rows) would never run: a pack would
    /// later move its cursor past rows it was never given. Found by the fault campaign (a full
    /// disk, 6.5% of pulled jobs never handled). So: when the connection is back in autocommit
    /// mode inside a group, every op of the group is answered with the error, and the next op
    /// starts a new group. Returns the error for the current op when it was one of them.
    fn abort_if_rolled_back(&mut self, cause: Option<&StoreError>) -> Option<StoreError> {
        if !self.in_tx || !self.conn.as_ref().is_some_and(|c| c.is_autocommit()) {
            return None;
        }
        let e = match cause {
            Some(StoreError::DiskFull) => StoreError::DiskFull,
            Some(e) => StoreError::Unavailable(format!(
                "SQLite rolled back the transaction ({e}); nothing of it was stored, retry"
            )),
            None => StoreError::Unavailable(
                "SQLite rolled back the transaction (disk full or I/O error); nothing of it was stored, retry".into(),
            ),
        };
        tracing::error!(ops = self.pending.len(), error = %e, "the group transaction was rolled back by SQLite; every op of it is answered with the error");
        self.stats.failed_commits.fetch_add(1, Ordering::Relaxed);
        self.in_tx = false;
        for done in self.pending.drain(..) {
            done(Err(e.clone()));
        }
        Some(e)
    }

    /// Checks that the database file is still the one opened; records and logs it if not.
    fn check_file(&mut self) -> Result<(), StoreError> {
        if let Some(why) = self.stats.lost() {
            return Err(StoreError::Unavailable(why));
        }
        let Some(why) = self.file.as_ref().and_then(DbFile::gone) else {
            return Ok(());
        };
        tracing::error!("{why}");
        *self.stats.lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
        Err(StoreError::Unavailable(why))
    }

    fn conn(&mut self) -> Result<&Connection, StoreError> {
        if self.conn.is_none() {
            self.conn = Some(open_connection(&self.path, self.durability)?);
            if self.file.is_none() {
                self.file = DbFile::open(&self.path);
            }
        }
        self.conn
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("no connection".into()))
    }

    fn flush(&mut self, ctx: &mut Context<Self>) {
        self.flush_scheduled = false;
        if !self.in_tx {
            return;
        }
        self.in_tx = false;
        let result = match self.conn() {
            Ok(c) => c.execute_batch("COMMIT").map_err(StoreError::from),
            Err(e) => Err(e),
        };
        // Committed into a file nobody will read again is not stored: answer with the error.
        let result = result.and_then(|()| self.check_file());
        if let Err(e) = &result {
            self.stats.failed_commits.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, ops = self.pending.len(), "group commit failed; the batch is answered with the error");
            if let Ok(c) = self.conn() {
                let _ = c.execute_batch("ROLLBACK");
            }
            if matches!(e, StoreError::Sqlite(_)) {
                // An unexpected I/O failure: restart with a fresh connection.
                ctx.stop();
            }
        } else {
            self.stats.commits.fetch_add(1, Ordering::Relaxed);
        }
        for done in self.pending.drain(..) {
            done(result.clone());
        }
    }
}

impl Actor for Store {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // The mailbox is the group-commit queue: let it hold many small operations.
        ctx.set_mailbox_capacity(4096);
        let _ = self.conn();
        ctx.run_interval(std::time::Duration::from_secs(1), |act, _| {
            let _ = act.check_file();
        });
    }
}

impl Supervised for Store {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        tracing::warn!("store restarting: reopening the database");
        self.conn = None;
        self.in_tx = false;
        self.flush_scheduled = false;
        for done in self.pending.drain(..) {
            done(Err(StoreError::Unavailable("store restarted".into())));
        }
    }
}

struct Flush;
impl Message for Flush {
    type Result = ();
}
impl Handler<Flush> for Store {
    type Result = ();
    fn handle(&mut self, _: Flush, ctx: &mut Context<Self>) {
        self.flush(ctx);
    }
}

/// Ops per group transaction before committing without waiting for the mailbox to drain.
const MAX_OPS_PER_COMMIT: usize = 2048;

impl<O: StoreOp> Handler<Exec<O>> for Store {
    type Result = ResponseFuture<Result<O::Output, StoreError>>;

    fn handle(&mut self, Exec(op, on_commit): Exec<O>, ctx: &mut Context<Self>) -> Self::Result {
        self.stats.ops.fetch_add(1, Ordering::Relaxed);
        self.abort_if_rolled_back(None);
        let outcome = (|| {
            if let Some(why) = self.stats.lost() {
                return Err(StoreError::Unavailable(why));
            }
            let in_tx = self.in_tx;
            let conn = self.conn()?;
            if !in_tx {
                conn.execute_batch("BEGIN IMMEDIATE")?;
            }
            self.in_tx = true;
            let conn = self.conn()?;
            conn.execute_batch("SAVEPOINT op")?;
            let result = catch_unwind(AssertUnwindSafe(|| op.run(conn))).unwrap_or_else(|_| {
                Err(StoreError::Invalid(
                    "internal error: a store operation panicked".into(),
                ))
            });
            if result.is_err() {
                // Fails when SQLite already rolled the whole transaction back: the op's own
                // error is the one to report (see `abort_if_rolled_back`).
                if conn.execute_batch("ROLLBACK TO op").is_err() {
                    return result;
                }
            }
            conn.execute_batch("RELEASE op")?;
            result
        })();
        // The op itself may have made SQLite give up the whole group (a full disk mid-op).
        let outcome = match self.abort_if_rolled_back(outcome.as_ref().err()) {
            Some(e) => Err(e),
            None => outcome,
        };
        let (tx, rx) = oneshot::channel();
        match outcome {
            Err(e) => {
                let _ = tx.send(Err(e));
            }
            Ok(value) => {
                self.pending
                    .push(Box::new(move |commit: Result<(), StoreError>| {
                        if let (Ok(()), Some(f)) = (&commit, on_commit) {
                            f(&value);
                        }
                        let _ = tx.send(commit.map(|()| value));
                    }));
            }
        }
        if self.pending.len() >= MAX_OPS_PER_COMMIT {
            self.flush(ctx);
        } else if self.in_tx && !self.flush_scheduled {
            self.flush_scheduled = true;
            ctx.notify(Flush);
        }
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(StoreError::Unavailable("store stopped".into())))
        })
    }
}

/// A cloneable handle to the [`Store`] actor, and to read-only connections beside it.
#[derive(Clone)]
pub struct StoreHandle {
    addr: Addr<Store>,
    readers: Option<Arc<Readers>>,
}

/// Read-only connections to the database, for lookups that need no write transaction and
/// should not queue behind the writer's group commits (a handler's `replayLog.has`). A WAL
/// reader sees every transaction committed before its statement starts.
struct Readers {
    path: PathBuf,
    idle: std::sync::Mutex<Vec<Connection>>,
}

/// Idle read-only connections kept (each holds three file descriptors).
const READERS_KEPT: usize = 4;

impl StoreHandle {
    pub fn new(addr: Addr<Store>) -> Self {
        StoreHandle {
            addr,
            readers: None,
        }
    }

    /// Lets [`StoreHandle::read`] use read-only connections to `path` (the Store's database)
    /// instead of the Store's thread.
    pub fn with_readers(mut self, path: PathBuf) -> Self {
        self.readers = Some(Arc::new(Readers {
            path,
            idle: std::sync::Mutex::new(Vec::new()),
        }));
        self
    }

    /// Runs a read-only `op` on a read-only connection, on the caller's thread (it blocks for
    /// the lookup: microseconds for an indexed read), or on the Store's thread when this
    /// handle has no readers or one cannot be opened.
    pub async fn read<O: StoreOp + Clone>(&self, op: O) -> Result<O::Output, StoreError> {
        if let Some(r) = &self.readers {
            let conn = {
                let popped = r.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
                match popped {
                    Some(c) => Some(c),
                    None => open_reader(&r.path).ok(),
                }
            };
            if let Some(conn) = conn {
                let out = op.clone().run(&conn);
                let mut idle = r.idle.lock().unwrap_or_else(|p| p.into_inner());
                if out.is_ok() && idle.len() < READERS_KEPT {
                    idle.push(conn);
                }
                drop(idle);
                if out.is_ok() {
                    return out;
                }
            }
        }
        self.run(op).await
    }

    pub async fn run<O: StoreOp>(&self, op: O) -> Result<O::Output, StoreError> {
        self.run_then(op, None).await
    }

    /// Like [`StoreHandle::run`], with a hook run right after the commit, in commit order.
    pub async fn run_then<O: StoreOp>(
        &self,
        op: O,
        on_commit: Option<OnCommit<O::Output>>,
    ) -> Result<O::Output, StoreError> {
        match self.addr.send(Exec(op, on_commit)).await {
            Ok(r) => r,
            Err(e) => Err(StoreError::Unavailable(format!("store mailbox: {e}"))),
        }
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Insert(i64);
    impl StoreOp for Insert {
        type Output = i64;
        fn run(self, conn: &Connection) -> Result<i64, StoreError> {
            if self.0 < 0 {
                return Err(StoreError::Invalid("negative".into()));
            }
            conn.execute(
                "INSERT INTO meta(key, value) VALUES (?1, 'v')",
                [self.0.to_string()],
            )?;
            Ok(self.0)
        }
    }
    #[derive(Clone)]
    struct Count;
    impl StoreOp for Count {
        type Output = i64;
        fn run(self, conn: &Connection) -> Result<i64, StoreError> {
            Ok(conn.query_row("SELECT count(*) FROM meta", [], |r| r.get(0))?)
        }
    }
    struct Boom;
    impl StoreOp for Boom {
        type Output = ();
        fn run(self, _conn: &Connection) -> Result<(), StoreError> {
            panic!("boom")
        }
    }

    /// A Store on a fresh, migrated database in `dir`.
    fn started_store(dir: &Path) -> (StoreHandle, Arc<StoreStats>) {
        let path = dir.join("agent.db");
        let mut c = open_connection(&path, Durability::Normal).unwrap();
        crate::schema::migrate(&mut c).unwrap();
        drop(c);
        let stats = Arc::new(StoreStats::default());
        let addr = Store::new(path, Durability::Normal, stats.clone()).start();
        (StoreHandle::new(addr), stats)
    }

    /// A read on a reader sees every write answered before it (a handler's `replayLog.has`
    /// after its pack's last commit), and falls back to the Store without readers.
    #[actix_rt::test]
    async fn a_reader_sees_what_was_committed_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (store, stats) = started_store(dir.path());
        let with_readers = store.clone().with_readers(dir.path().join("agent.db"));
        for i in 1..=50 {
            store.run(Insert(i)).await.unwrap();
            assert_eq!(with_readers.read(Count).await.unwrap(), i);
        }
        let ops = stats.ops.load(Ordering::Relaxed);
        assert_eq!(ops, 50, "the reads did not go through the Store");
        assert_eq!(store.read(Count).await.unwrap(), 50);
        assert_eq!(
            stats.ops.load(Ordering::Relaxed),
            51,
            "no readers: the Store answers"
        );
    }

    /// Stands for SQLite rolling the whole transaction back on its own (as it may on
    /// SQLITE_FULL): the op's statement ends the transaction.
    struct RolledBack;
    impl StoreOp for RolledBack {
        type Output = ();
        fn run(self, conn: &Connection) -> Result<(), StoreError> {
            conn.execute_batch("ROLLBACK")?;
            Err(StoreError::DiskFull)
        }
    }

    /// What SQLite rolled back is answered as failed, and nothing answered as failed is stored:
    /// ops after the rollback do not run outside a transaction (committed at once, their
    /// callers told they failed and their commit hooks never run).
    #[actix_rt::test]
    async fn a_transaction_sqlite_rolled_back_is_failed_whole_and_nothing_failed_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _stats) = started_store(dir.path());
        // One group: an insert, the rollback, two more inserts.
        let (a, b, c2, d) = tokio::join!(
            store.run(Insert(1)),
            store.run(RolledBack),
            store.run(Insert(2)),
            store.run(Insert(3)),
        );
        assert!(a.is_err(), "rolled back with the group: {a:?}");
        assert!(matches!(b, Err(StoreError::DiskFull)), "{b:?}");
        let ok = [c2.is_ok(), d.is_ok()].iter().filter(|x| **x).count() as i64;
        assert_eq!(
            store.run(Count).await.unwrap(),
            ok,
            "stored exactly what was answered as stored"
        );
    }

    #[actix_rt::test]
    async fn group_commit_isolates_failures() {
        let dir = tempfile::tempdir().unwrap();
        let (store, stats) = started_store(dir.path());
        let mut futs = Vec::new();
        for i in 0..200 {
            let s = store.clone();
            futs.push(async move { s.run(Insert(if i == 7 { -1 } else { i })).await });
        }
        let results = futures_util::future::join_all(futs).await;
        assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
        assert!(
            store.run(Boom).await.is_err(),
            "a panicking op is an error, not a dead actor"
        );
        assert_eq!(store.run(Count).await.unwrap(), 199);
        let commits = stats.commits.load(Ordering::Relaxed);
        assert!(
            commits < 50,
            "200 concurrent ops should share commits, got {commits}"
        );
    }
}
