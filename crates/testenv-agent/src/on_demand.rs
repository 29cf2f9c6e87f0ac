//! On-demand TEs (`[on_demand]`): `max_envs` slots, each holding at most one TE made by the
//! `create` hook, used for one lease and removed by `destroy`. A demand loop reads the waiting
//! lock requests from every broker's admin `status` (tebroker, gearmand and geard alike) and
//! grants slots a create when fewer TEs are ready or being created than
//! max(`min_ready`, waiting requests); a grant carries a permit of a semaphore of
//! `max_concurrent_creates`, so creates never exceed it.
//!
//! A slot's TE is recorded in `state_dir/on-demand/NAME.te` before `create` runs and the
//! record is removed only once `destroy` succeeded: an agent killed at any point finds the
//! record at its next start and destroys the TE first, so no stack is leaked. A TE whose
//! destroy keeps failing stays recorded, in state `failed`, until an operator's `rebuild`
//! (which destroys it again).

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use gearman_client::ServerAddr;
use serde::{Deserialize, Serialize};
use testenv::lease::{decline, LeaseContext};
use testenv_proto::agent::{label_function, EnvState};
use testenv_proto::tedata::OVB_FAILED_PREFIX;
use testenv_proto::LOCKENV;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::{OnDemand, TeConfig, TeKind};
use crate::hooks::{self, HookError};
use crate::pool::{self, Pool, Served, TeInterrupts, TeRuntime};

/// How often the demand loop reads the brokers' queues (also at every state change).
const DEMAND_POLL: Duration = Duration::from_millis(500);
/// Pause between two attempts of a failed create or destroy.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// After a create failed every retry, no slot is granted a create for this long, so a broken
/// `create` hook is not run in a tight loop.
const CREATE_BACKOFF: Duration = Duration::from_secs(3);
/// How long a slot whose create failed offers the failure to a waiting client.
const FAILURE_OFFER: Duration = Duration::from_secs(3);
/// Extension of the record that says a slot's TE may exist.
const RECORD_EXT: &str = "te";

/// Where on-demand TEs' datafiles and records live.
pub fn datafile_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("on-demand")
}

/// What the on-demand slots share: the limits, the create semaphore and the demand last read.
pub struct Demand {
    pub settings: OnDemand,
    creates: Arc<Semaphore>,
    /// Per pool index: a create granted to that slot, with its semaphore permit.
    grants: RefCell<Vec<Option<OwnedSemaphorePermit>>>,
    /// Lock requests the brokers had queued at the last read.
    waiting: Cell<u64>,
    backoff_until: Cell<Option<Instant>>,
    /// Signalled on every state change of the pool: the demand loop looks again.
    pub changed: Notify,
}

impl Demand {
    pub fn new(settings: OnDemand, tes: usize) -> Demand {
        let permits = usize::try_from(settings.max_concurrent_creates).unwrap_or(1);
        Demand {
            settings,
            creates: Arc::new(Semaphore::new(permits)),
            grants: RefCell::new((0..tes).map(|_| None).collect()),
            waiting: Cell::new(0),
            backoff_until: Cell::new(None),
            changed: Notify::new(),
        }
    }

    fn take_grant(&self, i: usize) -> Option<OwnedSemaphorePermit> {
        self.grants.borrow_mut()[i].take()
    }

    /// Grants creates to free slots while fewer TEs are ready or on their way than wanted and
    /// the semaphore has permits.
    fn grant(&self, pool: &Pool) {
        if self.backoff_until.get().is_some_and(|t| t > Instant::now()) {
            return;
        }
        let statuses = pool.statuses();
        let mut grants = self.grants.borrow_mut();
        let mut on_their_way = 0u64;
        let mut free = Vec::new();
        for (i, (te, s)) in pool.tes.iter().zip(&statuses).enumerate() {
            if te.kind != TeKind::OnDemand {
                continue;
            }
            if grants[i].is_some() {
                on_their_way += 1;
            } else if s.present {
                let offered = matches!(s.state, EnvState::Provisioning | EnvState::Ready);
                if offered && !s.drain && s.hold_until.is_none() {
                    on_their_way += 1;
                }
            } else if !s.drain {
                free.push(i);
            }
        }
        let wanted = creates_wanted(
            u64::from(self.settings.min_ready),
            self.waiting.get(),
            on_their_way,
        );
        for i in free
            .into_iter()
            .take(usize::try_from(wanted).unwrap_or(usize::MAX))
        {
            let Ok(permit) = self.creates.clone().try_acquire_owned() else {
                break;
            };
            tracing::debug!(te = pool.tes[i].name, "create granted");
            grants[i] = Some(permit);
            pool.wake(i);
        }
    }
}

/// How many more TEs to create: enough that `min_ready` TEs, or one per waiting request if
/// more, are ready or being created.
pub fn creates_wanted(min_ready: u64, waiting: u64, on_their_way: u64) -> u64 {
    min_ready.max(waiting).saturating_sub(on_their_way)
}

/// Lock requests queued (not yet running) for any of `functions`, from admin `status` lines
/// (`FUNCTION\tTOTAL\tRUNNING\tWORKERS`).
pub fn waiting_in_status(lines: &[String], functions: &[String]) -> u64 {
    lines
        .iter()
        .filter_map(|line| {
            let cols: Vec<&str> = line.split('\t').collect();
            let [name, total, running, ..] = cols.as_slice() else {
                return None;
            };
            if !functions.iter().any(|f| f == name) {
                return None;
            }
            let total: u64 = total.trim().parse().ok()?;
            let running: u64 = running.trim().parse().ok()?;
            Some(total.saturating_sub(running))
        })
        .sum()
}

/// Reads the demand from the brokers and grants creates, until the agent stops.
pub fn demand_forever(pool: Rc<Pool>, servers: Vec<ServerAddr>) {
    tokio::task::spawn_local(async move {
        let Some(demand) = &pool.on_demand else {
            return;
        };
        let functions: Vec<String> = std::iter::once(LOCKENV.to_string())
            .chain(demand.settings.labels.iter().map(|l| label_function(l)))
            .collect();
        while !pool.stopping() {
            let mut waiting = 0;
            for server in &servers {
                match gearman_client::admin::query(server, "status", Duration::from_secs(5)).await {
                    Ok(lines) => waiting += waiting_in_status(&lines, &functions),
                    Err(e) => tracing::debug!(%server, error = %e, "cannot read the queue"),
                }
            }
            demand.waiting.set(waiting);
            demand.grant(&pool);
            tokio::select! {
                _ = tokio::time::sleep(DEMAND_POLL) => {}
                _ = demand.changed.notified() => {
                    // Coalesce a burst of changes into one look.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    });
}

/// What `state_dir/on-demand/NAME.te` holds: a TE that may exist.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    name: String,
    num: u32,
    created_ms: u64,
}

fn record_path(te: &TeConfig) -> PathBuf {
    te.datafile.with_extension(RECORD_EXT)
}

/// Writes the record durably (temp file, fsync, rename, directory fsync).
fn write_record(te: &TeConfig) -> std::io::Result<()> {
    use std::io::Write;
    let path = record_path(te);
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let record = Record {
        name: te.name.clone(),
        num: te.num,
        created_ms: testenv::journal::now_ms(),
    };
    let tmp = path.with_extension("te.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(serde_json::to_string(&record)?.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()
}

fn remove_record(te: &TeConfig) -> std::io::Result<()> {
    let _ = std::fs::remove_file(&te.datafile);
    match std::fs::remove_file(record_path(te)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let dir = te.datafile.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// The records in `dir`: (name, num) of every TE a run left.
fn records(dir: &Path) -> Vec<(String, u32)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some(RECORD_EXT) {
            continue;
        }
        match std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str::<Record>(&t).map_err(|e| e.to_string()))
        {
            Ok(r) => found.push((r.name, r.num)),
            Err(e) => tracing::error!(
                path = %path.display(),
                error = e,
                "an unreadable on-demand TE record; the TE it names may be left: remove it by hand"
            ),
        }
    }
    found.sort();
    found
}

/// At start: TEs recorded by a previous run under names that are no longer slots (the
/// configuration changed) are destroyed with the on-demand hooks. Slots destroy their own.
pub fn destroy_orphans(pool: &Pool, state_dir: &Path) {
    let dir = datafile_dir(state_dir);
    let Some(template) = pool.tes.iter().find(|t| t.kind == TeKind::OnDemand) else {
        let left = records(&dir);
        if !left.is_empty() {
            tracing::error!(
                tes = ?left.iter().map(|(n, _)| n).collect::<Vec<_>>(),
                dir = %dir.display(),
                "a previous run left on-demand TEs, but [on_demand] is not configured: \
                 they are not destroyed"
            );
        }
        return;
    };
    let retries = pool
        .on_demand
        .as_ref()
        .map_or(0, |d| d.settings.destroy_retries);
    for (name, num) in records(&dir) {
        if pool.tes.iter().any(|t| t.name == name) {
            continue;
        }
        let te = TeConfig {
            datafile: dir.join(format!("{name}.json")),
            name,
            num,
            ..template.clone()
        };
        tracing::warn!(
            te = te.name,
            "a previous run left this on-demand TE, no longer a slot; destroying it"
        );
        let dir = dir.clone();
        tokio::task::spawn_local(async move {
            if let Err(e) = destroy_with_retries(&te, retries).await {
                tracing::error!("{e}; its record stays in {}", dir.display());
            }
        });
    }
}

async fn destroy_with_retries(te: &TeConfig, retries: u32) -> Result<(), HookError> {
    let mut attempt = 0;
    loop {
        match hooks::run(te, "destroy", te.hooks.destroy.as_deref()).await {
            Ok(()) => {
                return remove_record(te).map_err(|e| {
                    HookError(format!(
                        "TE {}: destroyed, but its record cannot be removed: {e}",
                        te.name
                    ))
                })
            }
            Err(e) if attempt >= retries => {
                return Err(HookError(format!(
                    "{e} (destroy failed {} times; the TE may be left)",
                    attempt + 1
                )))
            }
            Err(e) => {
                attempt += 1;
                tracing::warn!("{e}; trying again ({attempt} of {retries} retries)");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

/// Destroys slot `i`'s TE. On success the slot is free; otherwise it is `failed` and stays
/// recorded.
async fn destroy(pool: &Pool, i: usize, retries: u32) -> bool {
    let te = &pool.tes[i];
    pool.set_state(i, EnvState::Cleaning, Some("destroying".into()));
    match destroy_with_retries(te, retries).await {
        Ok(()) => {
            tracing::info!(te = te.name, "on-demand TE destroyed");
            pool.update(i, |s| {
                s.present = false;
                s.holder = None;
                s.hold_until = None;
                s.rebuild_requested = false;
            });
            let state = if pool.status(i).drain {
                EnvState::Drained
            } else {
                EnvState::Provisioning
            };
            pool.set_state(i, state, None);
            true
        }
        Err(e) => {
            tracing::error!("{e}");
            pool.set_state(i, EnvState::Failed, Some(e.0));
            false
        }
    }
}

/// How a create series ended.
enum Created {
    Ready,
    /// Every attempt failed (each half-made TE was destroyed); the last error.
    GaveUp(HookError),
    /// A half-made TE could not be destroyed: the slot is `failed`.
    Leaked,
    Stopping,
}

/// Creates slot `i`'s TE: record, `create`, datafile and `health`; retried `create_retries`
/// times, each failed attempt destroyed first.
async fn create(pool: &Pool, i: usize, od: &OnDemand) -> Created {
    let te = &pool.tes[i];
    let attempts = od.create_retries.saturating_add(1);
    let mut attempt = 0;
    loop {
        attempt += 1;
        if let Err(e) = write_record(te) {
            // Without the record a crash could leak the TE: it is not created.
            let e = HookError(format!(
                "TE {}: cannot record it in {}: {e}",
                te.name,
                record_path(te).display()
            ));
            tracing::error!("{e}");
            return Created::GaveUp(e);
        }
        let _ = std::fs::remove_file(&te.datafile);
        pool.update(i, |s| s.present = true);
        pool.set_state(
            i,
            EnvState::Provisioning,
            Some(format!("creating (attempt {attempt} of {attempts})")),
        );
        let made = async {
            hooks::run(te, "create", te.hooks.create.as_deref()).await?;
            pool::health(te).await
        };
        let result = tokio::select! {
            r = made => r,
            // Dropping the hook kills it; the record makes the next start destroy the TE.
            _ = pool::wait_stop(pool, i) => return Created::Stopping,
        };
        let e = match result {
            Ok(()) => return Created::Ready,
            Err(e) => e,
        };
        tracing::warn!("{e} (create attempt {attempt} of {attempts})");
        // Whatever the failed attempt made goes before the next one starts.
        if !destroy(pool, i, od.destroy_retries).await {
            return Created::Leaked;
        }
        if attempt >= attempts {
            return Created::GaveUp(e);
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// Runs on-demand slot `i` until the agent stops.
pub async fn run_slot(pool: Rc<Pool>, i: usize, rt: Rc<TeRuntime>) {
    let Some(demand) = pool.on_demand.as_ref() else {
        return;
    };
    let od = demand.settings.clone();
    let te = pool.tes[i].clone();
    let Some(link) = pool::TeLink::open(&pool, i, &rt).await else {
        return;
    };
    let worker = &link.worker;
    let mut interrupts = TeInterrupts {
        pool: pool.clone(),
        i,
    };
    let mut ctx = link.context(&rt, &mut interrupts);

    if record_path(&te).exists() {
        tracing::warn!(
            te = te.name,
            "a previous run left this on-demand TE; destroying it"
        );
        pool.update(i, |s| s.present = true);
        destroy(&pool, i, od.destroy_retries).await;
    } else if pool.status(i).present {
        // Only the quarantine of a previous run's lease made it show; nothing to destroy.
        pool.update(i, |s| s.present = false);
    }
    // The TE in the slot has served its one lease (or was held after it).
    let mut used = false;
    let mut last_health = Instant::now();

    while !pool.stopping() {
        if ctx.wait_for_journal().await {
            break;
        }
        let s = pool.status(i);
        if !s.present {
            if s.drain {
                pool.set_state(i, EnvState::Drained, None);
            }
            let Some(permit) = demand.take_grant(i) else {
                pool.woken(i).await;
                continue;
            };
            let created = create(&pool, i, &od).await;
            drop(permit);
            match created {
                Created::Ready => {
                    used = false;
                    last_health = Instant::now();
                    pool.set_state(i, EnvState::Ready, None);
                }
                Created::Leaked => {}
                Created::Stopping => break,
                Created::GaveUp(e) => {
                    demand
                        .backoff_until
                        .set(Instant::now().checked_add(CREATE_BACKOFF));
                    tell_a_waiting_client(&pool, i, demand, &mut ctx, &e, od.create_retries).await;
                }
            }
            continue;
        }
        if pool::sit_out_hold(&pool, i).await {
            continue;
        }
        let s = pool.status(i);
        if s.state == EnvState::Failed && !s.rebuild_requested {
            pool.woken(i).await;
            continue;
        }
        // An on-demand TE is not rebuilt or cleaned: it is destroyed, and created afresh
        // when wanted.
        if used
            || s.rebuild_requested
            || s.drain
            || matches!(s.state, EnvState::Unhealthy | EnvState::Failed)
        {
            pool.update(i, |s| s.rebuild_requested = false);
            if destroy(&pool, i, od.destroy_retries).await {
                used = false;
            }
            continue;
        }
        let Some(job) = pool::offer(&pool, i, worker, &mut last_health).await else {
            continue;
        };
        match pool::serve(&pool, i, &mut ctx, job).await {
            Served::Stop => break,
            Served::NotLeased => {}
            Served::Leased(end) => {
                used = true;
                pool::autohold(&pool, i, &end);
            }
        }
    }
    worker.stop();
}

/// After a create failed every retry: a client waiting while no TE of the agent is ready gets
/// `Failed creating OVB stack: ...` (its testenv-client exits 2), as from the original
/// worker. Nobody waiting: nothing to tell; the slot is free for a later create.
async fn tell_a_waiting_client(
    pool: &Pool,
    i: usize,
    demand: &Demand,
    ctx: &mut LeaseContext<'_, TeInterrupts>,
    e: &HookError,
    retries: u32,
) {
    let anything_ready = pool
        .statuses()
        .iter()
        .any(|s| s.present && s.state == EnvState::Ready);
    if demand.waiting.get() == 0 || anything_ready {
        return;
    }
    let notice = format!(
        "{OVB_FAILED_PREFIX}: {} attempts failed; last: {e}",
        retries.saturating_add(1)
    );
    let worker = ctx.worker;
    worker.resume();
    let job = tokio::time::timeout(FAILURE_OFFER, worker.grab_job()).await;
    if let Ok(Some(job)) = job {
        decline(ctx, job, notice).await;
    }
    worker.pause();
    pool::refuse_queued(worker, &pool.tes[i].name).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_cover_min_ready_or_the_waiting_requests() {
        assert_eq!(creates_wanted(2, 0, 0), 2);
        assert_eq!(creates_wanted(2, 0, 1), 1);
        assert_eq!(creates_wanted(2, 5, 1), 4);
        assert_eq!(creates_wanted(0, 1, 1), 0);
        assert_eq!(creates_wanted(1, 0, 3), 0);
    }

    #[test]
    fn waiting_requests_are_the_queued_ones_of_our_functions() {
        let lines: Vec<String> = [
            "lockenv\t5\t2\t3",
            "lockenv:ovb\t1\t0\t0",
            "lockenv:other\t9\t0\t0",
            "echo\t4\t0\t1",
            "garbage",
            "lockenv\tx\t1\t1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(waiting_in_status(&lines, &f(&["lockenv"])), 3);
        assert_eq!(
            waiting_in_status(&lines, &f(&["lockenv", "lockenv:ovb"])),
            4
        );
        assert_eq!(waiting_in_status(&lines, &f(&["nothing"])), 0);
    }
}
