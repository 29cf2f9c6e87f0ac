//! One lease of one TE, from a grabbed `lockenv` job to the end of the holder's grace: check
//! the request, journal it, hand the TE data to the holder's callback, watch the callback (and
//! the client-alive check) until the lease ends, complete `lockenv`. `testenv-worker` (one TE)
//! and `testenv-agent` (a pool) both lease through [`lease`], so there is one implementation
//! of the protocol's lease side.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use gearman_client::{Client, Job, JobEvent, JobRequest, Worker};
use testenv_proto::{LockRequest, ValidLockRequest};

use crate::journal::{Journal, LeaseRecord};
use crate::resume::sleep_until_opt as sleep_until;
use crate::tedata;

mod environment;
mod resumable;

pub use environment::run_destroy;
use environment::{read_datafile, run_create, AliveWatch, Environment};

/// How often an unwritable journal is tried again before the TE is offered again.
pub const JOURNAL_RETRY: Duration = Duration::from_secs(5);

/// A lease is held at most this much less than the client's timeout, so the client's own
/// timeout (which also counts its wait for a TE) does not fire first, as in the original.
const HOLD_MARGIN: Duration = Duration::from_secs(40);

/// The lease tunables (testenv-worker's options of the same names).
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// Most time to hold the TE for one lease when the client names no timeout.
    pub timeout: Duration,
    pub client_alive_cmd: Option<String>,
    pub alive_interval: Duration,
    pub alive_timeout: Duration,
    pub holder_grace: Duration,
    pub dead_holder_grace: Duration,
    pub callback_start_timeout: Duration,
}

/// Where a lease's TE data comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A datafile, read for every lease so edits take effect.
    Static(PathBuf),
    /// testenv-worker's script form: CREATE_SCRIPT per lease, DESTROY_SCRIPT after it.
    Scripts { create: PathBuf, destroy: PathBuf },
}

/// Why a lease ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Failed,
    NeverStarted,
    TimedOut,
    ClientGone,
    LostBroker(String),
    Stopping,
    NoEnvironment,
    /// The request could not be served (see the log); the client, if it could be named, was
    /// told `Couldn't retrieve env: bad lockenv request: ...`.
    Refused,
    /// The journal could not record the lease, so it was not started.
    JournalFailed,
    /// The TE has fewer nodes than the request needs: `lockenv` was failed (WORK_FAIL) before
    /// anything was handed over, so the client submits it again and another TE can take it.
    TooSmall {
        has: usize,
        needs: usize,
    },
    /// A resumable lease lost its callback job and the holder did not take a resume within
    /// the worker's resume grace (`extra`): the holder may still run for its own resume grace.
    ResumeExpired {
        extra: Duration,
    },
    /// A resumable lease ended early (`ended`) and the holder did not confirm that COMMAND is
    /// dead: it may run on for its own resume grace, which `extra` covers.
    Unconfirmed {
        ended: Box<Outcome>,
        extra: Duration,
    },
}

impl Outcome {
    /// Whether the holder may still be running when the lease ends this way.
    pub fn holder_may_run(&self) -> bool {
        !matches!(
            self,
            Outcome::Completed
                | Outcome::NoEnvironment
                | Outcome::NeverStarted
                | Outcome::Refused
                | Outcome::JournalFailed
                | Outcome::TooSmall { .. }
        )
    }

    /// How long the holder's command may outlive the lease ending this way.
    pub fn holder_grace(&self, settings: &LeaseSettings) -> Duration {
        match self {
            o if !o.holder_may_run() => Duration::ZERO,
            // The callback job failed: the client's connection is gone, so the client is dead
            // and its guard SIGKILLs COMMAND's whole tree at once.
            Outcome::Failed => settings.dead_holder_grace,
            Outcome::ResumeExpired { extra } => settings.holder_grace.saturating_add(*extra),
            Outcome::Unconfirmed { ended, extra } => {
                ended.holder_grace(settings).saturating_add(*extra)
            }
            // The client is alive and learns from lockenv that the TE was taken back; it gives
            // COMMAND its kill grace.
            _ => settings.holder_grace,
        }
    }

    pub fn stops_worker(&self) -> bool {
        match self {
            Outcome::Unconfirmed { ended, .. } => ended.stops_worker(),
            o => *o == Outcome::Stopping,
        }
    }

    /// Whether a TE was leased at all (for --once: a refused request does not count).
    pub fn leased(&self) -> bool {
        !matches!(
            self,
            Outcome::Refused | Outcome::JournalFailed | Outcome::TooSmall { .. }
        )
    }
}

/// What a lease learns about its holder besides the outcome.
#[derive(Debug, Clone)]
pub struct LeaseEnd {
    pub outcome: Outcome,
    /// The holder's job identifier (empty when the request named none or was refused).
    pub job_identifier: String,
    /// How long the TE was held.
    pub held: Duration,
    /// COMMAND's exit status, when the holder's testenv-client reported it.
    pub exit_status: Option<i32>,
}

/// What may interrupt a wait of the lease machinery: the owner pausing or resuming the worker
/// (testenv-worker's SIGUSR2/SIGUSR1, an agent's drain) or stopping it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    Pause,
    Resume,
    Stop,
}

/// A source of [`Interrupt`]s; `next` must be cancel-safe (it is raced against other events).
pub trait Interrupts {
    fn next(&mut self) -> impl std::future::Future<Output = Interrupt>;
}

/// Everything a lease works with; one per TE, reused for every lease.
pub struct LeaseContext<'a, I: Interrupts> {
    pub settings: &'a LeaseSettings,
    pub tenum: &'a str,
    pub source: &'a Source,
    pub journal: &'a Journal,
    pub client: &'a Client,
    pub worker: &'a Worker,
    pub interrupts: &'a mut I,
    /// Refuse requests needing more nodes than the TE data lists (the agent does; the
    /// original testenv-worker never did, so testenv-worker does not).
    pub check_size: bool,
    /// The holder's COMMAND exit status, when its testenv-client said it (ours do).
    pub exit_status: Option<i32>,
    /// A lease is running: a pause waits for its end, since gearmand hands a running job out
    /// again when its worker sends CANT_DO for the function.
    pub leasing: bool,
    /// A pause asked for during the lease, applied when `lockenv` is answered.
    pub pause_after_lease: bool,
    /// The last journal write failed: a crash now would not quarantine the TE, so it is not
    /// offered again until the journal can be written.
    pub journal_failing: bool,
}

impl<I: Interrupts> LeaseContext<'_, I> {
    /// Writes the lease's heartbeat; logs the first failure of a streak and the recovery.
    fn heartbeat(&mut self, record: &mut LeaseRecord) -> bool {
        match self.journal.heartbeat(record) {
            Ok(()) => {
                if self.journal_failing {
                    tracing::info!(tenum = self.tenum, "the lease journal is writable again");
                    self.journal_failing = false;
                }
                true
            }
            Err(e) => {
                if !self.journal_failing {
                    tracing::error!(
                        tenum = self.tenum,
                        path = %self.journal.path().display(),
                        error = %e,
                        "cannot write the lease journal: a crash now would not quarantine the \
                         TE; it is not offered again until the journal can be written"
                    );
                    self.journal_failing = true;
                }
                false
            }
        }
    }

    pub fn clear_journal(&mut self) {
        if let Err(e) = self.journal.clear() {
            tracing::error!(tenum = self.tenum, error = %e, "cannot clear the lease journal");
        }
    }

    /// Pauses or resumes the worker as asked while waiting for something else; true on stop.
    pub async fn pause_resume_or_stop(&mut self) -> bool {
        match self.interrupts.next().await {
            Interrupt::Pause if self.leasing => {
                tracing::info!(tenum = self.tenum, "paused: no new leases after this one");
                self.pause_after_lease = true;
                false
            }
            Interrupt::Resume if self.leasing => {
                tracing::info!(tenum = self.tenum, "taking leases again after this one");
                self.pause_after_lease = false;
                false
            }
            Interrupt::Pause => {
                tracing::info!(tenum = self.tenum, "paused, taking no new leases");
                self.worker.pause();
                false
            }
            Interrupt::Resume => {
                tracing::info!(tenum = self.tenum, "taking leases again");
                self.worker.resume();
                false
            }
            Interrupt::Stop => true,
        }
    }

    /// Sleeps `d` while still obeying interrupts. Returns whether the worker was asked to stop.
    pub async fn sit_out(&mut self, d: Duration) -> bool {
        let until = tokio::time::sleep(d);
        tokio::pin!(until);
        loop {
            tokio::select! {
                _ = &mut until => return false,
                stop = self.pause_resume_or_stop() => if stop { return true },
            }
        }
    }

    /// Waits until the journal can be written again. Returns whether the worker was asked to
    /// stop meanwhile.
    pub async fn wait_for_journal(&mut self) -> bool {
        while self.journal_failing {
            match self.journal.writable() {
                Ok(()) => {
                    tracing::info!(tenum = self.tenum, "the lease journal is writable again");
                    self.journal_failing = false;
                }
                Err(e) => {
                    tracing::warn!(
                        tenum = self.tenum,
                        error = %e,
                        "the lease journal is still not writable; not offering the TE"
                    );
                    if self.sit_out(JOURNAL_RETRY).await {
                        return true;
                    }
                }
            }
        }
        false
    }

    /// After a lease: until the holder's grace has passed its command may still run, so the
    /// journal keeps the lease meanwhile (a crash now still quarantines the TE). Returns whether
    /// the worker was asked to stop.
    pub async fn sit_out_holder(&mut self, outcome: &Outcome) -> bool {
        if !outcome.holder_may_run() {
            return false;
        }
        let grace = outcome.holder_grace(self.settings);
        tracing::info!(
            tenum = self.tenum,
            seconds = grace.as_secs_f64(),
            "waiting for the previous holder to be gone"
        );
        if self.sit_out(grace).await {
            return true;
        }
        self.clear_journal();
        false
    }
}

/// The nodes a request needs: `envsize` (default 2, as the create script's) plus
/// `compute_envsize` and `extra_nodes` (default 0).
pub fn nodes_needed(req: &ValidLockRequest) -> usize {
    let n = |v: Option<u32>, d: u32| v.unwrap_or(d) as usize;
    n(req.envsize, 2)
        .saturating_add(n(req.compute_envsize, 0))
        .saturating_add(n(req.extra_nodes, 0))
}

/// One lease, from lockenv grabbed to lockenv completed, without resume (as before lease
/// resume existed). A caller that resumes leases uses [`lease_with`] and, after a restart,
/// races its quarantine against [`previous_holder_done`], as testenv-worker does.
pub async fn lease<I: Interrupts>(ctx: &mut LeaseContext<'_, I>, lockenv: Job) -> LeaseEnd {
    lease_with(ctx, lockenv, Duration::ZERO).await
}

/// [`lease`] with the worker's `--resume-grace`: how long the TE stays locked for a holder
/// whose callback job was lost (zero: leases never resume).
pub async fn lease_with<I: Interrupts>(
    ctx: &mut LeaseContext<'_, I>,
    lockenv: Job,
    resume_grace: Duration,
) -> LeaseEnd {
    let started = Instant::now();
    let job_identifier = LockRequest::parse(lockenv.data())
        .map(|r| r.job_identifier)
        .unwrap_or_default();
    ctx.exit_status = None;
    ctx.leasing = true;
    let outcome = lease_outcome(ctx, lockenv, resume_grace).await;
    ctx.leasing = false;
    if std::mem::take(&mut ctx.pause_after_lease) {
        ctx.worker.pause();
    }
    LeaseEnd {
        outcome,
        job_identifier,
        held: started.elapsed(),
        exit_status: ctx.exit_status,
    }
}

async fn lease_outcome<I: Interrupts>(
    ctx: &mut LeaseContext<'_, I>,
    lockenv: Job,
    resume_grace: Duration,
) -> Outcome {
    let started = Instant::now();
    let tenum = ctx.tenum;
    let request = match LockRequest::parse_valid(lockenv.data()) {
        Ok(r) => r,
        Err(e) => return refuse(ctx, lockenv, e).await,
    };
    let hold_for = request
        .timeout_or(ctx.settings.timeout)
        .saturating_sub(HOLD_MARGIN)
        .max(Duration::from_secs(1));
    let resume_key = request
        .resume_key
        .as_ref()
        .filter(|_| !resume_grace.is_zero());
    let mut record = LeaseRecord::new(tenum, &request.callback_name, &request.job_identifier);
    if let Some(key) = resume_key {
        record = record.resumable(key, resume_grace);
    }
    if !ctx.heartbeat(&mut record) {
        // Failing it (rather than serving without a journal) lets the broker or the client
        // give the request to another TE; this one waits for its journal in `run`.
        let _ = lockenv.fail().await;
        return Outcome::JournalFailed;
    }
    tracing::info!(
        tenum,
        holder = request.callback_name,
        job = request.job_identifier,
        "lease start"
    );

    let env = match ctx.source {
        Source::Static(path) => read_datafile(path),
        Source::Scripts { create, .. } => run_create(create, tenum, &request).await,
    };
    let no_env = match &env {
        Environment::Ready(te) => {
            tracing::info!(tenum, te = %te.summary(), "environment ready");
            false
        }
        Environment::Unavailable(notice) => {
            tracing::error!(tenum, "{}", notice.lines().next().unwrap_or(""));
            true
        }
    };
    if let (true, Environment::Ready(te)) = (ctx.check_size, &env) {
        let (has, needs) = (te.summary().nodes, nodes_needed(&request));
        // TE data without a `nodes` list does not say its size: it serves any request.
        if has > 0 && has < needs {
            tracing::warn!(
                tenum,
                job = request.job_identifier,
                has,
                needs,
                "the TE is smaller than the request; failing lockenv so the client asks again"
            );
            ctx.clear_journal();
            let _ = lockenv.fail().await;
            return Outcome::TooSmall { has, needs };
        }
    }
    let alive = if no_env { None } else { Some(&request) };
    let mut outcome = match resume_key.filter(|_| !no_env) {
        Some(key) => {
            let resumable = resumable::Resumable {
                request: &request,
                key,
                grace: resume_grace,
                data: env.into_callback_data(),
                hold_for,
            };
            // Answers lockenv, and any lock job that replaced it, itself.
            resumable::hand_over(ctx, lockenv, resumable, &mut record).await
        }
        None => {
            if request.resume_key.is_none() && !no_env {
                tracing::info!(
                    tenum,
                    holder = request.callback_name,
                    "the holder does not resume leases (an original testenv-client?): losing \
                     its broker ends this lease as before"
                );
            }
            let outcome = hand_over(
                ctx,
                &request.callback_name,
                env.into_callback_data(),
                hold_for,
                alive,
                Some(&mut record),
            )
            .await;
            // Tell the client first: if its command still runs, it is killed now, before the
            // TE is destroyed or offered to anyone else.
            if let Err(e) = lockenv.complete("").await {
                tracing::warn!(tenum, error = %e, "could not complete lockenv");
            }
            outcome
        }
    };
    if no_env && outcome == Outcome::Completed {
        outcome = Outcome::NoEnvironment;
    }
    if let Source::Scripts { destroy, .. } = ctx.source {
        // Also after a failed create: it may have left half an environment behind.
        run_destroy(destroy, tenum).await;
    }
    if outcome.holder_may_run() {
        // The holder may still be running: keep the lease in the journal, its heartbeat set to
        // now, until the holder grace in `run` is over (a worker restarted meanwhile, or after
        // --once or a stop, then sits out the rest of it).
        // A restart quarantines the holder grace plus what the holder may run beyond it.
        record.resume_grace_ms = match &outcome {
            Outcome::ResumeExpired { extra } | Outcome::Unconfirmed { extra, .. } => {
                u64::try_from(extra.as_millis()).unwrap_or(u64::MAX)
            }
            // The holder is known to stop within the holder grace: nothing on top.
            _ => 0,
        };
        ctx.heartbeat(&mut record);
    } else {
        ctx.clear_journal();
    }
    tracing::info!(
        tenum,
        holder = request.callback_name,
        job = request.job_identifier,
        outcome = ?outcome,
        held_secs = format!("{:.1}", started.elapsed().as_secs_f64()),
        "lease end"
    );
    outcome
}

/// Answers a request with `notice` in place of TE data, leasing nothing: testenv-agent tells a
/// waiting client `Failed creating OVB stack: ...` when its on-demand TE could not be created.
/// Ends as [`Outcome::NoEnvironment`] once the holder has taken the notice (or
/// [`Outcome::Refused`] for a request that cannot be served at all).
pub async fn decline<I: Interrupts>(
    ctx: &mut LeaseContext<'_, I>,
    lockenv: Job,
    notice: String,
) -> Outcome {
    let request = match LockRequest::parse_valid(lockenv.data()) {
        Ok(r) => r,
        Err(e) => return refuse(ctx, lockenv, e).await,
    };
    tracing::warn!(
        tenum = ctx.tenum,
        holder = request.callback_name,
        job = request.job_identifier,
        "no environment for the request: {}",
        notice.lines().next().unwrap_or("")
    );
    let hold_for = ctx.settings.timeout;
    let delivered = hand_over(ctx, &request.callback_name, notice, hold_for, None, None).await;
    if let Err(e) = lockenv.complete("").await {
        tracing::warn!(tenum = ctx.tenum, error = %e, "could not complete lockenv");
    }
    if delivered.stops_worker() {
        delivered
    } else {
        Outcome::NoEnvironment
    }
}

/// A request that cannot be served: its client (if the request names a usable callback) is
/// told why, as a failed environment; otherwise lockenv fails. Nothing was leased.
async fn refuse(
    ctx: &mut LeaseContext<'_, impl Interrupts>,
    lockenv: Job,
    e: testenv_proto::RequestError,
) -> Outcome {
    let tenum = ctx.tenum;
    tracing::warn!(tenum, error = %e, "refusing a lockenv request");
    let Some(callback) = &e.callback else {
        let _ = lockenv.fail().await;
        return Outcome::Refused;
    };
    let notice = tedata::failure_notice(&e);
    let hold_for = ctx.settings.timeout;
    let delivered = hand_over(ctx, callback, notice, hold_for, None, None).await;
    if let Err(e) = lockenv.complete("").await {
        tracing::warn!(tenum, error = %e, "could not complete lockenv");
    }
    if delivered.stops_worker() {
        delivered
    } else {
        Outcome::Refused
    }
}

/// Submits `data` as the holder's callback job and waits until the lease ends: the callback
/// job ends, `hold_for` passes, the callback never starts, the client-alive check (when `alive`
/// is given) fails, or the worker is stopped. Heartbeats go to `record` meanwhile.
async fn hand_over(
    ctx: &mut LeaseContext<'_, impl Interrupts>,
    callback_name: &str,
    data: String,
    hold_for: Duration,
    alive: Option<&ValidLockRequest>,
    mut record: Option<&mut LeaseRecord>,
) -> Outcome {
    let args = ctx.settings;
    let mut callback = match ctx
        .client
        .submit(JobRequest::new(callback_name.to_string(), data))
        .await
    {
        Ok(job) => job,
        Err(e) => return Outcome::LostBroker(e.to_string()),
    };
    let now = tokio::time::Instant::now();
    // The deadlines are at most 30 days away (validated): checked anyway, never a panic.
    let start_check = now.checked_add(args.callback_start_timeout);
    let hold_until = now.checked_add(hold_for);
    let mut checked_start = false;
    let mut alive_watch = AliveWatch::new(
        args.client_alive_cmd.as_deref(),
        alive,
        ctx.tenum,
        args.alive_interval,
        args.alive_timeout,
    );
    let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            ev = callback.next_event() => match ev {
                Ok(Some(JobEvent::Complete(data))) => {
                    ctx.exit_status = std::str::from_utf8(&data)
                        .ok()
                        .and_then(|t| t.strip_prefix(crate::client::COMMAND_EXIT_PREFIX))
                        .and_then(|n| n.trim().parse().ok());
                    return Outcome::Completed;
                }
                // tebroker: the holder's connection failed, not closed; it may still run and
                // needs its kill grace once it notices.
                Ok(Some(JobEvent::Exception(data)))
                    if data == testenv_proto::resume::HOLDER_CONNECTION_LOST.as_bytes() =>
                {
                    return Outcome::LostBroker(testenv_proto::resume::HOLDER_CONNECTION_LOST.into());
                }
                Ok(Some(e)) if e.is_final() => return Outcome::Failed,
                Ok(_) => {}
                Err(e) => return Outcome::LostBroker(e.to_string()),
            },
            _ = sleep_until(start_check), if !checked_start => {
                checked_start = true;
                match ctx.client.get_status(callback.handle()).await {
                    Ok(s) if s.known && s.running => {}
                    Ok(_) => return Outcome::NeverStarted,
                    Err(e) => return Outcome::LostBroker(e.to_string()),
                }
            }
            _ = sleep_until(hold_until) => return Outcome::TimedOut,
            _ = alive_watch.failed() => return Outcome::ClientGone,
            _ = heartbeat.tick() => {
                if let Some(r) = record.as_deref_mut() {
                    ctx.heartbeat(r);
                }
            }
            stop = ctx.pause_resume_or_stop() => if stop { return Outcome::Stopping },
        }
    }
}

/// Resolves when the holder of a resumable lease a previous run left open says its COMMAND is
/// dead (`released` on `lease_<id>`); never for other leases. A resume of the lock job it sends
/// meanwhile is refused, and this worker steps aside from `lease_<id>` for a while: the key
/// names the holder's lock request, not a TE, and a request submitted twice may have been
/// served by this worker before it died and by another TE's worker since, which holds the
/// holder's real lease and must be the one to take the resume (the 10-minute chaos run found
/// a take-back here killing that lease's COMMAND). If this TE was the holder's, the holder
/// kills COMMAND when its resume grace runs out and says `released`, inside the quarantine.
/// For a restarted worker or agent to race against its quarantine.
pub async fn previous_holder_done(
    previous: &crate::journal::PreviousLease,
    servers: &[gearman_client::ServerAddr],
    tenum: &str,
) {
    use testenv_proto::resume::{Carrier, LeaseKey, LeaseMessage, LeaseOp};
    /// Long enough for the holder's offer (backing off at most 5 s) to reach another worker.
    const STEP_ASIDE: Duration = Duration::from_secs(10);
    let key = match previous {
        crate::journal::PreviousLease::Open(r) if r.resume_grace_ms > 0 => r
            .resume_key
            .as_deref()
            .and_then(|k| LeaseKey::parse(k).ok()),
        _ => None,
    };
    let Some(key) = key else {
        return std::future::pending().await;
    };
    loop {
        let lease_worker = Worker::new(servers.to_vec());
        lease_worker.register(key.lease_id().function());
        let mut stepping_aside = false;
        while let Some(job) = lease_worker.grab_job().await {
            match LeaseMessage::parse(job.data()) {
                Some(Ok(m)) if m.op == LeaseOp::Released && m.proves(&key, Carrier::Lease) => {
                    tracing::info!(
                        tenum,
                        "the previous holder reported its command's end; the quarantine ends"
                    );
                    let _ = job.complete("").await;
                    lease_worker.stop();
                    return;
                }
                Some(Ok(m)) if m.op == LeaseOp::Resume && m.proves(&key, Carrier::Lease) => {
                    tracing::info!(
                        tenum,
                        seconds = STEP_ASIDE.as_secs(),
                        "the previous holder is resuming a lease; refused here (its lease may \
                         be with another TE's worker), stepping aside"
                    );
                    let _ = job.fail().await;
                    stepping_aside = true;
                    break;
                }
                _ => {
                    tracing::warn!(
                        tenum,
                        server = job.server(),
                        "refused a lease message with a wrong key (forged or stale)"
                    );
                    let _ = job.fail().await;
                }
            }
        }
        lease_worker.stop();
        if !stepping_aside {
            break;
        }
        tokio::time::sleep(STEP_ASIDE).await;
    }
    std::future::pending().await
}
