//! The TEs of one host and their life cycle. Each TE runs as a task of its own, with its own
//! worker connections and lease journal, and leases through [`testenv::lease`] like
//! testenv-worker. Control commands change a TE's wishes (drain, hold, rebuild) in the shared
//! [`Pool`] and wake its task, which acts on them at the next point where it may: a lease is
//! never cut short by a drain or a hold.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use gearman_client::{Client, Job, ServerAddr, Worker, WorkerOptions};
use testenv::journal::{BootClock, Journal, PreviousLease};
use testenv::lease::{lease, Interrupt, Interrupts, LeaseContext, LeaseSettings, Outcome, Source};
use testenv_proto::agent::{
    label_function, AgentReport, ControlCommand, ControlOp, ControlReply, EnvReport, EnvState,
    ALL_ENVS,
};
use testenv_proto::{LockRequest, TeData, LOCKENV};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{TeConfig, TeKind};
use crate::hooks::{self, HookError};

/// How long a held TE stays held when the command names no time.
const HOLD_FOREVER: Duration = Duration::from_secs(testenv_proto::MAX_TIMEOUT_SECS);
/// How long a TE too small for a request stays out of rotation, so the client's retries
/// (about 3 s of them) reach other TEs.
const STEP_ASIDE: Duration = Duration::from_secs(5);
/// Pause between two rebuild attempts of the same TE.
const REBUILD_PAUSE: Duration = Duration::from_secs(1);

/// What the agent knows and wants of one TE.
#[derive(Debug, Clone)]
pub struct EnvStatus {
    pub state: EnvState,
    pub since_ms: u64,
    pub holder: Option<String>,
    pub detail: Option<String>,
    pub failed_leases: u32,
    pub failed_rebuilds: u32,
    /// An operator asked for it to be drained.
    pub drain: bool,
    pub hold_until: Option<Instant>,
    /// The state (and detail) a hold interrupted when it was unhealthy or failed: restored when
    /// the hold ends, so holding a broken TE never puts it back into rotation unchecked.
    pub held_from: Option<(EnvState, Option<String>)>,
    pub rebuild_requested: bool,
    /// A TE is there: always for static and carved TEs; for an on-demand slot, from the moment
    /// its creation is recorded until its destroy succeeds. Slots with no TE are left out of
    /// reports unless drained.
    pub present: bool,
}

pub struct Pool {
    pub agent: String,
    pub host: String,
    pub tes: Vec<TeConfig>,
    status: RefCell<Vec<EnvStatus>>,
    wake: Vec<Notify>,
    stopping: Cell<bool>,
    /// Signalled on every state change (the reporter sends a report).
    pub changed: Notify,
    /// The on-demand slots' shared state, with `[on_demand]`.
    pub on_demand: Option<crate::on_demand::Demand>,
}

impl Pool {
    pub fn new(
        agent: String,
        host: String,
        tes: Vec<TeConfig>,
        on_demand: Option<crate::config::OnDemand>,
    ) -> Pool {
        let now = testenv::journal::now_ms();
        let status = tes
            .iter()
            .map(|te| EnvStatus {
                state: EnvState::Provisioning,
                since_ms: now,
                holder: None,
                detail: None,
                failed_leases: 0,
                failed_rebuilds: 0,
                drain: false,
                hold_until: None,
                held_from: None,
                rebuild_requested: false,
                present: te.kind != TeKind::OnDemand,
            })
            .collect();
        let wake = tes.iter().map(|_| Notify::new()).collect();
        let on_demand = on_demand.map(|od| crate::on_demand::Demand::new(od, tes.len()));
        Pool {
            agent,
            host,
            tes,
            status: RefCell::new(status),
            wake,
            stopping: Cell::new(false),
            changed: Notify::new(),
            on_demand,
        }
    }

    pub fn status(&self, i: usize) -> EnvStatus {
        self.status.borrow()[i].clone()
    }

    /// The status of every TE, in config order.
    pub fn statuses(&self) -> Vec<EnvStatus> {
        self.status.borrow().clone()
    }

    pub(crate) fn update(&self, i: usize, f: impl FnOnce(&mut EnvStatus)) {
        f(&mut self.status.borrow_mut()[i]);
        self.changed.notify_one();
        if let Some(od) = &self.on_demand {
            od.changed.notify_one();
        }
    }

    /// Wakes TE `i`'s task to look at its status again.
    pub(crate) fn wake(&self, i: usize) {
        self.wake[i].notify_one();
    }

    pub(crate) async fn woken(&self, i: usize) {
        self.wake[i].notified().await;
    }

    pub(crate) fn set_state(&self, i: usize, state: EnvState, detail: Option<String>) {
        let name = &self.tes[i].name;
        self.update(i, |s| {
            if s.state != state {
                match &detail {
                    Some(d) => {
                        tracing::info!(te = name, from = %s.state, to = %state, detail = d, "state")
                    }
                    None => tracing::info!(te = name, from = %s.state, to = %state, "state"),
                }
                s.state = state;
                s.since_ms = testenv::journal::now_ms();
            }
            s.detail = detail;
            if !matches!(
                state,
                EnvState::Leased | EnvState::Draining | EnvState::Held
            ) {
                s.holder = None;
            }
        });
    }

    pub(crate) fn unhealthy(&self, i: usize, e: &HookError) {
        tracing::error!("{e}");
        self.set_state(i, EnvState::Unhealthy, Some(e.to_string()));
    }

    pub fn stop(&self) {
        self.stopping.set(true);
        for w in &self.wake {
            w.notify_one();
        }
        if let Some(od) = &self.on_demand {
            od.changed.notify_one();
        }
    }

    pub fn stopping(&self) -> bool {
        self.stopping.get()
    }

    pub fn report(&self) -> AgentReport {
        let status = self.status.borrow();
        AgentReport {
            agent: self.agent.clone(),
            host: self.host.clone(),
            version: format!("testenv-agent {}", env!("CARGO_PKG_VERSION")),
            sent_ms: testenv::journal::now_ms(),
            envs: self
                .tes
                .iter()
                .zip(status.iter())
                .filter(|(_, s)| s.present || s.drain)
                .map(|(te, s)| EnvReport {
                    name: te.name.clone(),
                    state: s.state,
                    since_ms: s.since_ms,
                    labels: te.labels.clone(),
                    holder: s.holder.clone(),
                    detail: s.detail.clone(),
                    failed_leases: s.failed_leases,
                    failed_rebuilds: s.failed_rebuilds,
                })
                .collect(),
        }
    }

    /// Runs an operator's command (local socket, Gearman control job or signal).
    pub fn apply(&self, cmd: &ControlCommand) -> ControlReply {
        let who = cmd.requested_by.as_deref().unwrap_or("?");
        let targets: Vec<usize> = if cmd.op == ControlOp::Status {
            vec![]
        } else if cmd.env == ALL_ENVS {
            // An empty on-demand slot can only be drained or undrained (no TE to hold or
            // rebuild).
            (0..self.tes.len())
                .filter(|&i| {
                    self.status(i).present
                        || matches!(cmd.op, ControlOp::Drain | ControlOp::Undrain)
                })
                .collect()
        } else {
            match self.tes.iter().position(|t| t.name == cmd.env) {
                Some(i)
                    if !self.status(i).present
                        && !matches!(cmd.op, ControlOp::Drain | ControlOp::Undrain) =>
                {
                    return ControlReply {
                        ok: false,
                        message: format!(
                            "agent {}: the on-demand TE {:?} is not created now",
                            self.agent, cmd.env
                        ),
                        report: Some(self.report()),
                    }
                }
                Some(i) => vec![i],
                None => {
                    return ControlReply {
                        ok: false,
                        message: format!("agent {} has no TE {:?}", self.agent, cmd.env),
                        report: Some(self.report()),
                    }
                }
            }
        };
        for &i in &targets {
            tracing::info!(
                te = self.tes[i].name,
                op = cmd.op.as_str(),
                requested_by = who,
                "control"
            );
            self.update(i, |s| match cmd.op {
                ControlOp::Drain => {
                    s.drain = true;
                    if s.state == EnvState::Leased {
                        s.state = EnvState::Draining;
                        s.since_ms = testenv::journal::now_ms();
                    }
                }
                ControlOp::Undrain => {
                    s.drain = false;
                    if s.state == EnvState::Draining {
                        s.state = EnvState::Leased;
                        s.since_ms = testenv::journal::now_ms();
                    }
                }
                ControlOp::Hold => {
                    let d = cmd.hold_secs.map_or(HOLD_FOREVER, Duration::from_secs);
                    s.hold_until = Instant::now().checked_add(d.min(HOLD_FOREVER));
                }
                ControlOp::Release => s.hold_until = None,
                ControlOp::Rebuild => {
                    s.rebuild_requested = true;
                    // An operator acting takes a failed TE back into the rebuild cycle.
                    s.failed_rebuilds = 0;
                }
                ControlOp::Status => {}
            });
            self.wake[i].notify_one();
        }
        let message = match cmd.op {
            ControlOp::Status => "ok".to_string(),
            op => format!(
                "{} {}",
                op.as_str(),
                if cmd.env == ALL_ENVS {
                    "every TE"
                } else {
                    &cmd.env
                }
            ),
        };
        ControlReply {
            ok: true,
            message,
            report: Some(self.report()),
        }
    }
}

/// A TE's interrupts during a lease: only the agent stopping cuts a lease short; a drain
/// arriving meanwhile marks it draining, and the TE leaves rotation when the lease ends.
pub(crate) struct TeInterrupts {
    pub(crate) pool: Rc<Pool>,
    pub(crate) i: usize,
}

impl Interrupts for TeInterrupts {
    async fn next(&mut self) -> Interrupt {
        // Commands are in the status already; the main loop reads it once the lease is over.
        while !self.pool.stopping() {
            self.pool.wake[self.i].notified().await;
        }
        Interrupt::Stop
    }
}

/// Whether the datafile is there and TE data (a JSON object): the first health check.
fn check_datafile(te: &TeConfig) -> Result<(), HookError> {
    let text = std::fs::read_to_string(&te.datafile).map_err(|e| {
        HookError(format!(
            "TE {}: datafile {}: {e}",
            te.name,
            te.datafile.display()
        ))
    })?;
    TeData::parse(text).map_err(|e| {
        HookError(format!(
            "TE {}: datafile {}: {e}",
            te.name,
            te.datafile.display()
        ))
    })?;
    Ok(())
}

pub(crate) async fn health(te: &TeConfig) -> Result<(), HookError> {
    check_datafile(te)?;
    hooks::run(te, "health", te.hooks.health.as_deref()).await
}

/// Which lease endings count as failed: the holder lost (callback failed, never started, its
/// client-alive check failed), the lease timed out, or COMMAND failed within `early_failure`.
fn lease_failed(te: &TeConfig, end: &testenv::lease::LeaseEnd) -> Option<String> {
    match &end.outcome {
        Outcome::Failed => Some("the holder was lost (its callback job failed)".into()),
        Outcome::NeverStarted => Some("the holder never took the TE".into()),
        Outcome::ClientGone => Some("the client-alive check failed".into()),
        Outcome::TimedOut => Some("the lease timed out".into()),
        Outcome::Completed => match end.exit_status {
            Some(code) if code != 0 && end.held < te.policy.early_failure => Some(format!(
                "the job's command failed (exit {code}) after {:.0}s",
                end.held.as_secs_f64()
            )),
            _ => None,
        },
        _ => None,
    }
}

pub struct TeRuntime {
    pub servers: Vec<ServerAddr>,
    pub settings: Rc<LeaseSettings>,
    pub state_dir: PathBuf,
}

/// Opens TE `i`'s lease journal and, after a lease of a previous run, sits out the rest of its
/// holder's grace. None: the journal cannot be opened (the TE is `failed`) or the agent stops.
pub(crate) async fn open_journal(
    pool: &Pool,
    i: usize,
    rt: &TeRuntime,
    tenum: &str,
) -> Option<Journal> {
    let te = &pool.tes[i];
    let journal = match Journal::open(&rt.state_dir, tenum) {
        Ok(j) => j,
        Err(e) => {
            let e = HookError(format!(
                "TE {}: cannot open its lease journal: {e}",
                te.name
            ));
            tracing::error!("{e}");
            pool.update(i, |s| s.present = true);
            pool.set_state(i, EnvState::Failed, Some(e.0));
            return None;
        }
    };
    if let Some(previous) = journal.previous() {
        if let PreviousLease::Open(r) = &previous {
            tracing::warn!(
                te = te.name,
                job = r.job_identifier,
                "a previous run left a lease open; quarantine"
            );
        }
        let wait = Journal::quarantine_left(&previous, rt.settings.holder_grace, &BootClock::now());
        pool.update(i, |s| s.present = true);
        pool.set_state(
            i,
            EnvState::Provisioning,
            Some(format!(
                "quarantine of {:.0}s after a lease of a previous run",
                wait.as_secs_f64()
            )),
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = wait_stop(pool, i) => return None,
        }
        if let Err(e) = journal.clear() {
            tracing::error!(te = te.name, error = %e, "cannot clear the lease journal");
        }
    }
    Some(journal)
}

/// TE `i`'s worker, paused: `lockenv` and one function per label, its client id the TE name
/// (so the brokers' `workers` listings name the TE).
pub(crate) fn te_worker(te: &TeConfig, rt: &TeRuntime) -> Worker {
    let worker = Worker::with_options(
        rt.servers.clone(),
        WorkerOptions {
            client_id: Some(te.name.clone()),
            ..WorkerOptions::default()
        },
    );
    worker.pause();
    worker.register(LOCKENV);
    for label in &te.labels {
        worker.register(label_function(label));
    }
    worker
}

/// While TE `i` is held, waits for the hold to end (or a command). True if it was held: the
/// caller looks at the status again.
pub(crate) async fn sit_out_hold(pool: &Pool, i: usize) -> bool {
    let s = pool.status(i);
    let Some(until) = s.hold_until.filter(|&until| until > Instant::now()) else {
        if s.hold_until.is_some() {
            pool.update(i, |s| s.hold_until = None);
        }
        if let Some((state, detail)) = s.held_from {
            pool.update(i, |s| s.held_from = None);
            pool.set_state(i, state, detail);
        }
        return false;
    };
    if matches!(s.state, EnvState::Unhealthy | EnvState::Failed) {
        pool.update(i, |h| h.held_from = Some((s.state, s.detail.clone())));
    }
    pool.set_state(
        i,
        EnvState::Held,
        s.detail.clone().filter(|_| s.state == EnvState::Held),
    );
    tokio::select! {
        _ = tokio::time::sleep_until(until) => pool.update(i, |s| s.hold_until = None),
        _ = pool.woken(i) => {}
    }
    true
}

/// Offers ready TE `i` until a lock request arrives. None when a command woke the TE, or after
/// the periodic health check (which marks the TE unhealthy if it failed).
pub(crate) async fn offer(
    pool: &Pool,
    i: usize,
    worker: &Worker,
    last_health: &mut Instant,
) -> Option<Job> {
    let te = &pool.tes[i];
    pool.set_state(i, EnvState::Ready, None);
    worker.resume();
    let next_health = *last_health + te.policy.health_interval;
    let job = tokio::select! {
        job = worker.grab_job() => job,
        _ = pool.woken(i) => None,
        _ = tokio::time::sleep_until(next_health) => {
            worker.pause();
            refuse_queued(worker, &te.name).await;
            if let Err(e) = health(te).await {
                pool.unhealthy(i, &e);
            }
            *last_health = Instant::now();
            return None;
        }
    };
    if job.is_none() {
        worker.pause();
        refuse_queued(worker, &te.name).await;
    }
    // Not paused during the lease: gearmand hands a running job out again when its worker
    // sends CANT_DO for the function meanwhile. No second job is grabbed, since nobody
    // waits in `grab_job` until the TE is ready again.
    job
}

/// How [`serve`] ended.
pub(crate) enum Served {
    /// The agent stops.
    Stop,
    /// Nothing was handed over (a refused or too-big request): the TE is as it was.
    NotLeased,
    /// The TE was leased; the holder's grace is over.
    Leased(testenv::lease::LeaseEnd),
}

/// Leases TE `i` for `job`, then (state `cleaning`) waits for its holder to be gone.
pub(crate) async fn serve(
    pool: &Pool,
    i: usize,
    ctx: &mut LeaseContext<'_, TeInterrupts>,
    job: Job,
) -> Served {
    let holder = LockRequest::parse(job.data())
        .map(|r| r.job_identifier)
        .unwrap_or_default();
    pool.update(i, |s| s.holder = Some(holder).filter(|h| !h.is_empty()));
    let leased_state = if pool.status(i).drain {
        EnvState::Draining
    } else {
        EnvState::Leased
    };
    pool.set_state(i, leased_state, None);
    let end = lease(ctx, job).await;
    // lockenv is answered: out of rotation until the loop finds the TE ready again.
    ctx.worker.pause();
    if end.outcome.stops_worker() {
        return Served::Stop;
    }
    if let Outcome::TooSmall { has, needs } = end.outcome {
        pool.set_state(
            i,
            EnvState::Ready,
            Some(format!(
                "stepped aside: a request needed {needs} nodes, this TE has {has}"
            )),
        );
        // The client submits the request again at once; stepping aside for a moment lets
        // a bigger TE (of this agent or another) take it instead of this one again.
        tokio::select! {
            _ = tokio::time::sleep(STEP_ASIDE) => {}
            _ = wait_stop(pool, i) => return Served::Stop,
        }
    }
    if !end.outcome.leased() {
        return Served::NotLeased;
    }
    pool.set_state(i, EnvState::Cleaning, None);
    if ctx.sit_out_holder(&end.outcome).await {
        return Served::Stop;
    }
    Served::Leased(end)
}

/// With `hold_on_failure`, holds TE `i` after a lease whose command failed (Zuul's autohold).
pub(crate) fn autohold(pool: &Pool, i: usize, end: &testenv::lease::LeaseEnd) {
    let te = &pool.tes[i];
    let command_failed = matches!(end.exit_status, Some(c) if c != 0);
    if command_failed && !te.policy.hold_on_failure.is_zero() {
        let job = end.job_identifier.clone();
        pool.update(i, |s| {
            s.hold_until = Instant::now().checked_add(te.policy.hold_on_failure);
            s.holder = Some(job.clone()).filter(|j| !j.is_empty());
        });
        pool.set_state(
            i,
            EnvState::Held,
            Some(format!("autohold: the job {job:?} failed")),
        );
    }
}

/// What TE `i`'s task leases with, for the life of the task.
pub(crate) struct TeLink {
    tenum: String,
    journal: Journal,
    pub(crate) worker: Worker,
    client: Client,
    source: Source,
}

impl TeLink {
    /// The journal (after any quarantine), a paused worker and a client. None: see
    /// [`open_journal`].
    pub(crate) async fn open(pool: &Pool, i: usize, rt: &TeRuntime) -> Option<TeLink> {
        let te = &pool.tes[i];
        let tenum = format!("{}:{}", pool.agent, te.name);
        let journal = open_journal(pool, i, rt, &tenum).await?;
        Some(TeLink {
            tenum,
            journal,
            worker: te_worker(te, rt),
            client: Client::new(rt.servers.clone()),
            source: Source::Static(te.datafile.clone()),
        })
    }

    pub(crate) fn context<'a>(
        &'a self,
        rt: &'a TeRuntime,
        interrupts: &'a mut TeInterrupts,
    ) -> LeaseContext<'a, TeInterrupts> {
        LeaseContext {
            settings: &rt.settings,
            tenum: &self.tenum,
            source: &self.source,
            journal: &self.journal,
            client: &self.client,
            worker: &self.worker,
            interrupts,
            check_size: true,
            exit_status: None,
            leasing: false,
            pause_after_lease: false,
            journal_failing: false,
        }
    }
}

/// Runs static or carved TE `i` until the agent stops.
pub async fn run_te(pool: Rc<Pool>, i: usize, rt: Rc<TeRuntime>) {
    let te = pool.tes[i].clone();
    let Some(link) = TeLink::open(&pool, i, &rt).await else {
        return;
    };
    let mut interrupts = TeInterrupts {
        pool: pool.clone(),
        i,
    };
    let mut ctx = link.context(&rt, &mut interrupts);
    let worker = &link.worker;

    pool.set_state(i, EnvState::Provisioning, None);
    let mut healthy = true;
    if te.kind == TeKind::Carved {
        if let Err(e) = hooks::run(&te, "setup", te.hooks.setup.as_deref()).await {
            pool.unhealthy(i, &e);
            healthy = false;
        }
    }
    if healthy {
        match health(&te).await {
            Ok(()) => pool.set_state(i, EnvState::Ready, None),
            Err(e) => pool.unhealthy(i, &e),
        }
    }
    let mut last_health = Instant::now();

    while !pool.stopping() {
        if ctx.wait_for_journal().await {
            break;
        }
        if sit_out_hold(&pool, i).await {
            continue;
        }
        let s = pool.status(i);
        if s.state == EnvState::Failed && !s.rebuild_requested {
            pool.woken(i).await;
            continue;
        }
        if s.rebuild_requested || s.state == EnvState::Unhealthy {
            if s.failed_rebuilds >= te.policy.max_rebuilds && !s.rebuild_requested {
                pool.set_state(
                    i,
                    EnvState::Failed,
                    Some(format!(
                        "{} failed rebuilds in a row; last: {}",
                        s.failed_rebuilds,
                        s.detail.unwrap_or_default()
                    )),
                );
                continue;
            }
            pool.update(i, |s| s.rebuild_requested = false);
            pool.set_state(i, EnvState::Rebuilding, s.detail.clone());
            let result = match hooks::run(&te, "rebuild", te.hooks.rebuild.as_deref()).await {
                Ok(()) => health(&te).await,
                Err(e) => Err(e),
            };
            last_health = Instant::now();
            match result {
                Ok(()) => {
                    pool.update(i, |s| {
                        s.failed_rebuilds = 0;
                        s.failed_leases = 0;
                    });
                    pool.set_state(i, EnvState::Ready, None);
                }
                Err(e) => {
                    pool.update(i, |s| {
                        s.failed_rebuilds = s.failed_rebuilds.saturating_add(1)
                    });
                    pool.unhealthy(i, &e);
                    tokio::time::sleep(REBUILD_PAUSE).await;
                }
            }
            continue;
        }
        if s.drain {
            pool.set_state(i, EnvState::Drained, None);
            pool.woken(i).await;
            continue;
        }

        let Some(job) = offer(&pool, i, worker, &mut last_health).await else {
            continue;
        };
        let end = match serve(&pool, i, &mut ctx, job).await {
            Served::Stop => break,
            Served::NotLeased => continue,
            Served::Leased(end) => end,
        };
        if end.outcome == Outcome::NoEnvironment {
            if let Err(e) = check_datafile(&te) {
                pool.unhealthy(i, &e);
                continue;
            }
        }
        // Counted at once (a held TE shows its failed leases); acted on after the cleanup.
        let quarantine = match lease_failed(&te, &end) {
            Some(why) => {
                let n = pool.status(i).failed_leases.saturating_add(1);
                pool.update(i, |s| s.failed_leases = n);
                tracing::warn!(te = te.name, failed_leases = n, "failed lease: {why}");
                (n >= te.policy.max_failed_leases)
                    .then(|| format!("TE {}: {n} failed leases in a row; last: {why}", te.name))
            }
            None => {
                pool.update(i, |s| s.failed_leases = 0);
                None
            }
        };
        autohold(&pool, i, &end);
        // An autoheld TE stays as its job left it: it is cleaned (and, after failed leases,
        // rebuilt) only once the hold ends.
        if pool.status(i).hold_until.is_some() {
            while !pool.stopping() && sit_out_hold(&pool, i).await {}
            pool.set_state(i, EnvState::Cleaning, None);
        }
        if let Err(e) = hooks::run(&te, "cleanup", te.hooks.cleanup.as_deref()).await {
            pool.unhealthy(i, &e);
        }
        if let Some(why) = quarantine {
            pool.set_state(i, EnvState::Unhealthy, Some(why));
        }
    }
    worker.stop();
}

/// A lockenv the broker assigned while the TE was being taken out of rotation: failed, so its
/// client submits it again for another TE.
pub(crate) async fn refuse_queued(worker: &Worker, te: &str) {
    while let Ok(Some(job)) = tokio::time::timeout(Duration::ZERO, worker.grab_job()).await {
        tracing::info!(
            te,
            "a lock request arrived as the TE left rotation; failing it so it is asked again"
        );
        let _ = job.fail().await;
    }
}

pub(crate) async fn wait_stop(pool: &Pool, i: usize) {
    while !pool.stopping() {
        pool.wake[i].notified().await;
    }
}
