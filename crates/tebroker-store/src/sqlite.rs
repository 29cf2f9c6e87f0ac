//! The embedded store: one SQLite file in the data directory, in WAL mode (readers do not block
//! the writer), `synchronous=NORMAL` (a power loss may lose the last transactions, never
//! corrupt the file).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{params, params_from_iter, Connection, TransactionBehavior};

use crate::query::{self, Param, StoredLease};
use crate::record::{labels_from_text, labels_to_text, now_ms, Record};
use crate::schema::{self, Dialect};
use crate::{
    EnvState, EnvStateChange, EnvSummary, HistoryPage, HistoryQuery, InventoryQuery, LeaseRecord,
    Millis, Outcome, PauseKind, Priority, PurgeCounts, Stamped, Store, StoreError, TePause,
    WaitEnd, WaitQuery, WaitRecord,
};

/// The database file's name inside the data directory.
pub const FILE_NAME: &str = "tebroker.sqlite3";

/// How long a statement waits for another connection's write lock before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

/// The page cache per connection (KiB).
const CACHE_KIB: i64 = 64 * 1024;

pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    checkpointer: Checkpointer,
}

/// How often the checkpointer looks whether the store wrote since its last checkpoint.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// A thread with its own connection that runs PASSIVE checkpoints (they never wait for, nor
/// block, the writer) after the store wrote; stopped when the store is dropped.
struct Checkpointer {
    dirty: Arc<AtomicBool>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    fn start(path: &Path) -> Result<Checkpointer, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let dirty = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = mpsc::channel::<()>();
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let wal = PathBuf::from(wal);
        let thread = {
            let dirty = dirty.clone();
            std::thread::Builder::new()
                .name("sqlite-checkpoint".into())
                .spawn(move || {
                    while let Err(mpsc::RecvTimeoutError::Timeout) =
                        stopped.recv_timeout(CHECKPOINT_EVERY)
                    {
                        if dirty.swap(false, Ordering::Relaxed) {
                            if let Err(e) = checkpoint(&conn, &wal) {
                                tracing::debug!(error = %e, "sqlite checkpoint");
                                dirty.store(true, Ordering::Relaxed);
                            }
                        }
                    }
                })
                .map_err(|source| StoreError::Io {
                    path: path.to_path_buf(),
                    source,
                })?
        };
        Ok(Checkpointer {
            dirty,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn wrote(&self) {
        self.dirty.store(true, Ordering::Relaxed);
    }
}

/// Above this the WAL is truncated (the writer waits for the rest of that checkpoint).
const WAL_LIMIT_BYTES: u64 = 64 << 20;

/// A PASSIVE checkpoint copies what the WAL holds without waiting for the writer; but a WAL
/// that is written all the time never starts over by itself, so past [`WAL_LIMIT_BYTES`] a
/// TRUNCATE checkpoint (little left to copy by then) brings it back to empty.
fn checkpoint(conn: &Connection, wal: &Path) -> rusqlite::Result<()> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
    if std::fs::metadata(wal).is_ok_and(|m| m.len() > WAL_LIMIT_BYTES) {
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    }
    Ok(())
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl SqliteStore {
    /// Opens `DIR/tebroker.sqlite3`, creating the directory and the file as needed.
    pub fn open_dir(dir: &Path) -> Result<SqliteStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        SqliteStore::open_file(&dir.join(FILE_NAME))
    }

    /// Opens (creating) the database file `path` and brings its schema up to date.
    pub fn open_file(path: &Path) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        use_wal(&conn)?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Job identifiers arrive in no order, so their index takes inserts all over; with the
        // default 2 MiB cache a million-lease file reads pages back from disk on every batch.
        conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
        // Checkpoints (copying the WAL into the file, with fsyncs) run on their own thread:
        // done by the committing connection they stall the writer for as long as the disk
        // takes, and it falls behind the broker.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let mut store = SqliteStore {
            conn,
            path: path.to_path_buf(),
            checkpointer: Checkpointer::start(path)?,
        };
        store.migrate()?;
        Ok(store)
    }

    /// Runs the pending migrations in one IMMEDIATE transaction: a second process opening the
    /// same file waits for the first and then finds nothing left to do.
    fn migrate(&mut self) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(schema::VERSION_TABLE, [])?;
        let current = current_version(&tx)?;
        if current > schema::SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found: current,
                known: schema::SCHEMA_VERSION,
            });
        }
        for (version, sql) in schema::pending(Dialect::Sqlite, current) {
            tx.execute_batch(&sql)?;
            tx.execute(
                "INSERT INTO schema_version (version, applied_ms) VALUES (?1, ?2)",
                params![version, now_ms()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn summary_details(
        &self,
        mut s: EnvSummary,
        q: &InventoryQuery,
    ) -> Result<EnvSummary, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT outcome FROM leases WHERE env = ?1 ORDER BY ended_ms DESC, id DESC LIMIT ?2",
        )?;
        s.last_outcomes = stmt
            .query_map(params![s.latest.env, q.last_outcomes], |r| {
                Ok(Outcome::from_text(&r.get::<_, String>(0)?))
            })?
            .collect::<Result<_, _>>()?;
        let sql = format!(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN outcome IN ({}) THEN 1 ELSE 0 END), 0) \
             FROM leases WHERE env = ?1 AND ended_ms >= ?2",
            Outcome::failure_sql_list()
        );
        let (n, failed): (i64, i64) = self
            .conn
            .prepare_cached(&sql)?
            .query_row(params![s.latest.env, q.window_start_ms], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        s.window_leases = n.max(0) as u64;
        s.window_failures = failed.max(0) as u64;
        Ok(s)
    }

    fn envs_where(
        &self,
        filter: &str,
        params: &[&dyn rusqlite::ToSql],
        q: &InventoryQuery,
    ) -> Result<Vec<EnvSummary>, StoreError> {
        let sql = format!(
            "SELECT env, agent, labels, state, since_ms, detail, holder FROM envs{filter} \
             ORDER BY env"
        );
        let rows: Vec<EnvSummary> = self
            .conn
            .prepare_cached(&sql)?
            .query_map(params, |r| {
                Ok(EnvSummary {
                    latest: state_change(r)?,
                    last_outcomes: Vec::new(),
                    window_leases: 0,
                    window_failures: 0,
                })
            })?
            .collect::<Result<_, _>>()?;
        rows.into_iter()
            .map(|s| self.summary_details(s, q))
            .collect()
    }
}

/// A row of `env, agent, labels, state, since_ms, detail, holder` (from `envs` or
/// `env_states`).
fn state_change(r: &rusqlite::Row<'_>) -> rusqlite::Result<EnvStateChange> {
    Ok(EnvStateChange {
        env: r.get(0)?,
        agent: r.get(1)?,
        labels: labels_from_text(&r.get::<_, String>(2)?),
        state: EnvState::from_text(&r.get::<_, String>(3)?),
        since_ms: r.get(4)?,
        detail: r.get(5)?,
        holder: r.get(6)?,
    })
}

fn current_version(conn: &Connection) -> Result<u32, StoreError> {
    let v: Option<i64> =
        conn.query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))?;
    Ok(v.unwrap_or(0).clamp(0, i64::from(u32::MAX)) as u32)
}

fn sqlite_params(params: &[Param]) -> Vec<rusqlite::types::Value> {
    params
        .iter()
        .map(|p| match p {
            Param::Int(i) => rusqlite::types::Value::Integer(*i),
            Param::Text(t) => rusqlite::types::Value::Text(t.clone()),
        })
        .collect()
}

impl Store for SqliteStore {
    fn describe(&self) -> String {
        format!("sqlite {}", self.path.display())
    }

    fn schema_version(&mut self) -> Result<u32, StoreError> {
        current_version(&self.conn)
    }

    fn write(&mut self, batch: &[Stamped]) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut lease = tx.prepare_cached(
                "INSERT INTO leases (origin, seq, broker, lockenv_handle, env, worker_id, \
                 callback, job_identifier, tenant, priority, started_ms, ended_ms, outcome) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) \
                 ON CONFLICT (origin, seq) DO NOTHING",
            )?;
            let mut state = tx.prepare_cached(
                "INSERT INTO env_states (origin, seq, env, agent, labels, state, since_ms, \
                 detail, holder) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                 ON CONFLICT (origin, seq) DO NOTHING",
            )?;
            let mut latest = tx.prepare_cached(
                "INSERT INTO envs (env, agent, labels, state, since_ms, detail, holder, origin, \
                 seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                 ON CONFLICT (env) DO UPDATE SET agent = excluded.agent, \
                 labels = excluded.labels, state = excluded.state, since_ms = excluded.since_ms, \
                 detail = excluded.detail, holder = excluded.holder, origin = excluded.origin, \
                 seq = excluded.seq \
                 WHERE (excluded.since_ms, excluded.origin, excluded.seq) \
                     > (envs.since_ms, envs.origin, envs.seq)",
            )?;
            let mut wait = tx.prepare_cached(
                "INSERT INTO waits (origin, seq, job_identifier, tenant, priority, function, \
                 queued_ms, ended_ms, outcome, env) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                 ON CONFLICT (origin, seq) DO NOTHING",
            )?;
            let mut pause = tx.prepare_cached(
                "INSERT INTO pauses (broker, env, kind, since_ms, until_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (broker, env) DO UPDATE SET \
                 kind = excluded.kind, since_ms = excluded.since_ms, until_ms = excluded.until_ms",
            )?;
            let mut unpause =
                tx.prepare_cached("DELETE FROM pauses WHERE broker = ?1 AND env = ?2")?;
            for s in batch {
                let (o, q) = (s.origin(), s.seq());
                match s.record() {
                    Record::Pause(p) => match &p.pause {
                        Some(t) => {
                            pause.execute(params![
                                p.broker,
                                p.env,
                                t.kind.as_str(),
                                t.since_ms,
                                t.until_ms
                            ])?;
                        }
                        None => {
                            unpause.execute(params![p.broker, p.env])?;
                        }
                    },
                    Record::Lease(l) => {
                        lease.execute(params![
                            o,
                            q,
                            l.broker,
                            l.lockenv_handle,
                            l.env,
                            l.worker_id,
                            l.callback,
                            l.job_identifier,
                            l.tenant,
                            l.priority.as_str(),
                            l.started_ms,
                            l.ended_ms,
                            l.outcome.as_str()
                        ])?;
                    }
                    Record::EnvState(e) => {
                        let labels = labels_to_text(&e.labels);
                        let state_name = e.state.as_str();
                        state.execute(params![
                            o, q, e.env, e.agent, labels, state_name, e.since_ms, e.detail,
                            e.holder
                        ])?;
                        latest.execute(params![
                            e.env, e.agent, labels, state_name, e.since_ms, e.detail, e.holder, o,
                            q
                        ])?;
                    }
                    Record::Wait(w) => {
                        let (outcome, env) = match &w.end {
                            WaitEnd::Granted { env, .. } => ("granted", Some(env.as_str())),
                            WaitEnd::Abandoned { .. } => ("abandoned", None),
                        };
                        wait.execute(params![
                            o,
                            q,
                            w.job_identifier,
                            w.tenant,
                            w.priority.as_str(),
                            w.function,
                            w.queued_ms,
                            w.end.at_ms(),
                            outcome,
                            env
                        ])?;
                    }
                }
            }
        }
        tx.commit()?;
        self.checkpointer.wrote();
        Ok(())
    }

    fn history(&mut self, q: &HistoryQuery) -> Result<HistoryPage, StoreError> {
        let (sql, params) = query::history_sql(q, |n| format!("?{n}"));
        let rows = self
            .conn
            .prepare_cached(&sql)?
            .query_map(params_from_iter(sqlite_params(&params)), |r| {
                Ok(StoredLease {
                    id: r.get(0)?,
                    lease: LeaseRecord {
                        broker: r.get(1)?,
                        lockenv_handle: r.get(2)?,
                        env: r.get(3)?,
                        worker_id: r.get(4)?,
                        callback: r.get(5)?,
                        job_identifier: r.get(6)?,
                        tenant: r.get(7)?,
                        priority: Priority::from_text(&r.get::<_, String>(8)?),
                        started_ms: r.get(9)?,
                        ended_ms: r.get(10)?,
                        outcome: Outcome::from_text(&r.get::<_, String>(11)?),
                    },
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(query::into_page(rows, q))
    }

    fn inventory(&mut self, q: &InventoryQuery) -> Result<Vec<EnvSummary>, StoreError> {
        self.envs_where("", &[], q)
    }

    fn env(&mut self, name: &str, q: &InventoryQuery) -> Result<Option<EnvSummary>, StoreError> {
        Ok(self
            .envs_where(" WHERE env = ?1", &[&name], q)?
            .into_iter()
            .next())
    }

    fn env_states(&mut self, name: &str, limit: u32) -> Result<Vec<EnvStateChange>, StoreError> {
        let rows = self
            .conn
            .prepare_cached(
                "SELECT env, agent, labels, state, since_ms, detail, holder FROM env_states \
                 WHERE env = ?1 ORDER BY since_ms DESC, id DESC LIMIT ?2",
            )?
            .query_map(params![name, limit.min(query::MAX_PAGE)], state_change)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    fn waits(&mut self, q: &WaitQuery) -> Result<Vec<WaitRecord>, StoreError> {
        let (sql, params) = query::waits_sql(q, |n| format!("?{n}"));
        let rows = self
            .conn
            .prepare_cached(&sql)?
            .query_map(params_from_iter(sqlite_params(&params)), |r| {
                let at_ms: Millis = r.get(5)?;
                let outcome: String = r.get(6)?;
                let env: Option<String> = r.get(7)?;
                Ok(WaitRecord {
                    job_identifier: r.get(0)?,
                    tenant: r.get(1)?,
                    priority: Priority::from_text(&r.get::<_, String>(2)?),
                    function: r.get(3)?,
                    queued_ms: r.get(4)?,
                    end: match (outcome.as_str(), env) {
                        ("granted", Some(env)) => WaitEnd::Granted { at_ms, env },
                        _ => WaitEnd::Abandoned { at_ms },
                    },
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    fn purge_older_than(&mut self, days: u32, now_ms: Millis) -> Result<PurgeCounts, StoreError> {
        let cutoff = query::cutoff(days, now_ms);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let leases = tx.execute("DELETE FROM leases WHERE ended_ms < ?1", [cutoff])?;
        let env_states = tx.execute("DELETE FROM env_states WHERE since_ms < ?1", [cutoff])?;
        let waits = tx.execute("DELETE FROM waits WHERE ended_ms < ?1", [cutoff])?;
        tx.commit()?;
        self.checkpointer.wrote();
        Ok(PurgeCounts {
            leases: leases as u64,
            env_states: env_states as u64,
            waits: waits as u64,
        })
    }

    fn pauses(&mut self, broker: &str) -> Result<Vec<(String, TePause)>, StoreError> {
        let rows = self
            .conn
            .prepare_cached(
                "SELECT env, kind, since_ms, until_ms FROM pauses WHERE broker = ?1 ORDER BY env",
            )?
            .query_map([broker], |r| {
                Ok((
                    r.get(0)?,
                    TePause {
                        kind: PauseKind::from_text(&r.get::<_, String>(1)?),
                        since_ms: r.get(2)?,
                        until_ms: r.get(3)?,
                    },
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }
}

/// Puts the file in WAL mode. SQLite answers BUSY at once, without calling the busy handler,
/// when another connection is opening the same file (WAL recovery after a killed broker, or
/// the API's connection opening beside the writer's), so it is retried here for as long as
/// the busy timeout; a file already in WAL mode is left alone.
fn use_wal(conn: &Connection) -> Result<(), StoreError> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        let attempt = conn
            .query_row("PRAGMA journal_mode", [], |row| row.get::<_, String>(0))
            .and_then(|mode| {
                if mode.eq_ignore_ascii_case("wal") {
                    Ok(())
                } else {
                    conn.pragma_update(None, "journal_mode", "WAL")
                }
            });
        match attempt {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other.map_err(StoreError::from),
        }
    }
}
