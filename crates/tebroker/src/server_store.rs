//! The broker's link to its durable store: ended leases and their waits, and TE state changes,
//! handed to a [`StoreWriter`] (a bounded queue, never blocking the core); reads for the API on
//! a connection of their own, always off the runtime's threads; retention.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker_core::{EndedLease, EndedWait, EnvInfo, PlainPause};
use tebroker_store::{
    Database, EnvState, EnvStateChange, LeaseRecord, Millis, Outcome, PauseKind, PauseRecord,
    Priority, Store, StoreError, StoreWriter, TePause, WaitEnd, WaitRecord, WriterConfig,
    WriterStats,
};

/// How often the core is asked which TEs changed state (it compares the whole inventory).
pub const ENV_SCAN_EVERY: Duration = Duration::from_secs(2);
/// How often retention runs.
pub const PURGE_EVERY: Duration = Duration::from_secs(3600);
/// Grants the estimated wait is the median of.
pub const ESTIMATE_SAMPLES: u32 = 50;

pub struct StoreLink {
    database: Database,
    /// The `broker` column: which broker recorded a lease (several may share PostgreSQL).
    broker: String,
    writer: StoreWriter,
    /// The API's connection, opened on first use and again after an error.
    reader: Mutex<Option<Box<dyn Store>>>,
    pub history_days: u32,
    /// The mean time between recent grants (ms; 0: unknown), refreshed by the scan task so the
    /// `position` answer can add an estimate without a query under the broker lock.
    grant_interval_ms: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for StoreLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreLink({})", self.database)
    }
}

impl StoreLink {
    pub fn start(database: Database, broker: String, history_days: u32) -> StoreLink {
        tracing::info!(store = %database, history_days, "recording history to the store");
        let open_db = database.clone();
        let writer = StoreWriter::start(Box::new(move || open_db.open()), WriterConfig::default());
        StoreLink {
            database,
            broker,
            writer,
            reader: Mutex::new(None),
            history_days,
            grant_interval_ms: Default::default(),
        }
    }

    pub fn database(&self) -> &Database {
        &self.database
    }

    pub fn stats(&self) -> WriterStats {
        self.writer.stats()
    }

    /// Queues ended leases; never blocks.
    pub fn leases_ended(&self, ended: &[EndedLease]) {
        for l in ended {
            self.writer.record(LeaseRecord {
                broker: self.broker.clone(),
                lockenv_handle: l.lockenv_handle.clone(),
                env: l.env.clone(),
                worker_id: l.worker_id.clone(),
                callback: l.callback.clone(),
                job_identifier: l.job_identifier.clone(),
                tenant: l.tenant.clone(),
                priority: Priority::from_text(l.priority),
                started_ms: millis(l.started_ms),
                ended_ms: millis(l.ended_ms),
                outcome: Outcome::from_text(l.outcome),
            });
        }
    }

    /// Queues ended waits of lock requests (granted or abandoned); never blocks.
    pub fn waits_ended(&self, waits: &[EndedWait]) {
        for w in waits {
            let at_ms = millis(w.ended_ms);
            self.writer.record(WaitRecord {
                job_identifier: w.job_identifier.clone(),
                tenant: w.tenant.clone(),
                priority: Priority::from_text(w.priority),
                function: w.function.clone(),
                queued_ms: millis(w.queued_ms),
                end: match &w.granted_env {
                    Some(env) => WaitEnd::Granted {
                        at_ms,
                        env: env.clone(),
                    },
                    None => WaitEnd::Abandoned { at_ms },
                },
            });
        }
    }

    /// Queues the state changes of TEs (what [`broker_core::Broker::take_env_changes`] found).
    pub fn envs_changed(&self, envs: &[EnvInfo]) {
        for e in envs {
            self.writer.record(EnvStateChange {
                env: e.name.clone(),
                agent: e.agent.clone().unwrap_or_else(|| e.host.clone()),
                labels: e.labels.clone(),
                state: EnvState::from_text(e.state.as_str()),
                since_ms: millis(e.since_ms),
                detail: e.detail.clone().unwrap_or_default(),
                holder: e.holder.clone(),
            });
        }
    }

    /// Queues the plain TEs the broker drained, held or put back in rotation (what
    /// [`broker_core::Broker::take_pause_changes`] found); never blocks.
    pub fn pauses_changed(&self, changes: &[(String, Option<PlainPause>)]) {
        for (env, pause) in changes {
            self.writer.record(PauseRecord {
                broker: self.broker.clone(),
                env: env.clone(),
                pause: pause.as_ref().map(|p| TePause {
                    kind: match p.kind {
                        broker_core::PauseKind::Drain => PauseKind::Drain,
                        broker_core::PauseKind::Hold => PauseKind::Hold,
                    },
                    since_ms: millis(p.since_ms),
                    until_ms: p.until_ms.map(millis),
                }),
            });
        }
    }

    /// At start: the plain TEs this broker had drained or held before it stopped are kept out
    /// of rotation again. A store that cannot be read leaves them in rotation (logged).
    pub fn restore_pauses(&self, broker: &mut broker_core::Broker, now: broker_core::Now) {
        // On a thread of its own: the `postgres` client must not run on a runtime thread.
        let read = std::thread::scope(|s| {
            s.spawn(|| self.database.open()?.pauses(&self.broker))
                .join()
                .unwrap_or_else(|_| {
                    Err(StoreError::Io {
                        path: "store reader".into(),
                        source: std::io::Error::other("the reading thread panicked"),
                    })
                })
        });
        let stored = match read {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the drained and held plain TEs from the store; they start in rotation");
                return;
            }
        };
        let mut pauses = Vec::new();
        for (env, p) in stored {
            let kind = match p.kind {
                PauseKind::Drain => broker_core::PauseKind::Drain,
                PauseKind::Hold => broker_core::PauseKind::Hold,
                PauseKind::Other(other) => {
                    tracing::warn!(
                        env,
                        kind = other,
                        "unknown pause kind in the store; ignored"
                    );
                    continue;
                }
            };
            tracing::info!(
                env,
                kind = kind_name(kind),
                "plain TE kept out of rotation since before the restart"
            );
            pauses.push((
                env,
                PlainPause {
                    kind,
                    since_ms: u64::try_from(p.since_ms).unwrap_or(0),
                    until_ms: p.until_ms.map(|u| u64::try_from(u).unwrap_or(0)),
                },
            ));
        }
        broker.restore_pauses(pauses, now);
    }

    /// Runs `f` on the reading connection on a blocking thread (the `postgres` client must
    /// not run on a runtime thread, and a slow query must not hold one up).
    pub async fn read<R: Send + 'static>(
        self: &Arc<Self>,
        f: impl Fn(&mut dyn Store) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let link = self.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let mut reader = link.reader.lock().unwrap_or_else(|e| e.into_inner());
            let reused = reader.is_some();
            let store = match reader.as_mut() {
                Some(store) => store,
                None => reader.insert(link.database.open()?),
            };
            let r = f(store.as_mut());
            if r.is_ok() {
                return r;
            }
            *reader = None;
            if !reused {
                return r;
            }
            // The kept connection may have broken while idle (the database restarted): one
            // more try on a fresh one, so the first read after an outage does not fail.
            let store = reader.insert(link.database.open()?);
            let r = f(store.as_mut());
            if r.is_err() {
                *reader = None;
            }
            r
        })
        .await;
        joined.unwrap_or_else(|e| {
            Err(StoreError::Io {
                path: "store reader".into(),
                source: std::io::Error::other(e.to_string()),
            })
        })
    }

    /// The estimated wait, in seconds, of the request at `position` (1-based) in the queue.
    pub fn estimate_secs(&self, position: u64) -> Option<u64> {
        let interval = self
            .grant_interval_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        (interval > 0 && position > 0).then(|| interval.saturating_mul(position).div_ceil(1000))
    }

    /// Reads the mean time between the last grants from the store.
    pub async fn refresh_grant_interval(self: &Arc<Self>) {
        let waits = self
            .read(|s| {
                s.waits(&tebroker_store::WaitQuery {
                    function: None,
                    since: None,
                    granted_only: true,
                    limit: ESTIMATE_SAMPLES,
                })
            })
            .await;
        if let Ok(waits) = waits {
            let interval = mean_gap_ms(&waits).unwrap_or(0);
            self.grant_interval_ms
                .store(interval, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Waits up to `within` for what was recorded so far to be written (shutdown, tests).
    pub fn flush(&self, within: Duration) -> bool {
        self.writer.flush(within)
    }

    /// Closes the reading connection; call from a blocking context.
    pub fn close_reader(&self) {
        self.reader.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// The mean time between the grants of `waits`; `None` with fewer than two.
pub fn mean_gap_ms(waits: &[WaitRecord]) -> Option<u64> {
    let times = waits.iter().map(|w| w.end.at_ms());
    let newest = times.clone().max()?;
    let oldest = times.min()?;
    let gaps = u64::try_from(waits.len().checked_sub(1)?).ok()?;
    if gaps == 0 {
        return None;
    }
    Some(u64::try_from(newest.checked_sub(oldest)?).ok()? / gaps)
}

fn kind_name(kind: broker_core::PauseKind) -> &'static str {
    match kind {
        broker_core::PauseKind::Drain => "drain",
        broker_core::PauseKind::Hold => "hold",
    }
}

fn millis(ms: u64) -> Millis {
    Millis::try_from(ms).unwrap_or(Millis::MAX)
}

/// Purges what is older than `--history-days`, at start and every [`PURGE_EVERY`].
pub async fn retention(link: Arc<StoreLink>, stop: tokio_util::sync::CancellationToken) {
    loop {
        let days = link.history_days;
        let r = link
            .read(move |s| s.purge_older_than(days, tebroker_store::now_ms()))
            .await;
        match r {
            Ok(n) => tracing::info!(
                leases = n.leases,
                env_states = n.env_states,
                waits = n.waits,
                days,
                "store retention: purged"
            ),
            Err(e) => tracing::warn!(error = %e, "store retention failed; retrying later"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PURGE_EVERY) => {}
        }
    }
}
