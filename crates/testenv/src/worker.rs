//! testenv-worker: offer one test environment under `lockenv`, lease it to one job at a time.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use gearman_client::{Client, Job, JobEvent, JobRequest, Worker, WorkerOptions};
use testenv_proto::{LockRequest, ValidLockRequest, LOCKENV, MAX_TIMEOUT_SECS};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::journal::{BootClock, Journal, LeaseRecord, OpenError, PreviousLease};
use crate::tedata;

mod environment;

use environment::{client_alive, read_datafile, run_create, run_destroy, Environment};

#[derive(Debug, Parser)]
#[command(
    name = "testenv-worker",
    version,
    about = "Offer a test environment through Gearman (function lockenv) and lease it to one \
             testenv-client at a time.",
    after_help = "Forms:\n  testenv-worker [options] DATAFILE                  a static TE described by DATAFILE\n  \
                  testenv-worker [options] CREATE_SCRIPT DESTROY_SCRIPT  TEs created and destroyed per lease\n\n\
                  Signals: SIGUSR2 pauses (no new leases), SIGUSR1 resumes, SIGINT/SIGTERM stop.\n\
                  A second worker for the same TE (same -n and --state-dir) is refused (exit 1)."
)]
pub struct WorkerArgs {
    /// DATAFILE, or CREATE_SCRIPT DESTROY_SCRIPT.
    #[arg(required = true, num_args = 1..=2)]
    pub files: Vec<PathBuf>,
    /// Most seconds to hold the TE for one lease (a client's timeout overrides it); 1 to
    /// 2592000 (30 days), the range a client's timeout must also be in.
    #[arg(short = 't', long, default_value_t = 10800,
          value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_SECS))]
    pub timeout: u64,
    /// An identifier of this TE on this host; names its lease journal (default: HOST:PATH,
    /// the host name and the absolute path of DATAFILE or CREATE_SCRIPT).
    #[arg(short = 'n', long)]
    pub tenum: Option<String>,
    /// Comma-separated Gearman brokers, host[:port].
    #[arg(short = 'b', long = "geard", default_value = "127.0.0.1:4730")]
    pub geard: String,
    /// Debug logging.
    #[arg(short = 'd', long)]
    pub debug: bool,
    /// Exit after one lease (a refused lock request is not one).
    #[arg(long)]
    pub once: bool,
    /// Directory for the lease journal (default: /var/lib/testenv-worker, or
    /// ~/.local/state/testenv-worker when that is not writable).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Run every --alive-interval seconds during a lease, with TE_UCINSTANCE, TE_JOB_IDENTIFIER
    /// and TE_CALLBACK set; a non-zero exit frees the TE.
    #[arg(long)]
    pub client_alive_cmd: Option<String>,
    /// Seconds between client-alive checks.
    #[arg(long, default_value = "60", value_parser = parse_seconds)]
    pub alive_interval: Duration,
    /// Seconds a client-alive check may run; one that takes longer is killed (its process
    /// group) and counts as failed, freeing the TE.
    #[arg(long, default_value = "60", value_parser = parse_seconds)]
    pub alive_timeout: Duration,
    /// Seconds after a lease ends abnormally (or after a crash) before the TE is offered again:
    /// the client's kill grace plus a margin.
    #[arg(long, default_value = "15", value_parser = parse_seconds)]
    pub holder_grace: Duration,
    /// Seconds to wait after the holder's client process died (its callback job failed) before
    /// the TE is offered again: its guard kills COMMAND at once when the client dies.
    #[arg(long, default_value = "1", value_parser = parse_seconds)]
    pub dead_holder_grace: Duration,
    #[command(flatten)]
    pub tls: crate::TlsArgs,
    /// Seconds to wait for the callback job to start before asking the broker about it
    /// (GET_STATUS); if it is not running then, the lease ends.
    #[arg(long, default_value = "30", value_parser = parse_seconds)]
    pub callback_start_timeout: Duration,
}

/// A command-line duration: a finite number of seconds from 0 to 30 days.
fn parse_seconds(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(0.0..=MAX_TIMEOUT_SECS as f64).contains(&secs) {
        return Err(format!(
            "{text} is not from 0 to {MAX_TIMEOUT_SECS} seconds"
        ));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

/// How often an unwritable journal is tried again before the TE is offered again.
const JOURNAL_RETRY: Duration = Duration::from_secs(5);

/// A lease is held at most this much less than the client's timeout, so the client's own
/// timeout (which also counts its wait for a TE) does not fire first, as in the original.
const HOLD_MARGIN: Duration = Duration::from_secs(40);

#[derive(Debug, Clone)]
enum Source {
    Static(PathBuf),
    Scripts { create: PathBuf, destroy: PathBuf },
}

/// Why a lease ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
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
}

impl Outcome {
    /// Whether the holder may still be running when the lease ends this way.
    fn holder_may_run(&self) -> bool {
        !matches!(
            self,
            Outcome::Completed
                | Outcome::NoEnvironment
                | Outcome::NeverStarted
                | Outcome::Refused
                | Outcome::JournalFailed
        )
    }

    /// How long the holder's command may outlive the lease ending this way.
    fn holder_grace(&self, args: &WorkerArgs) -> Duration {
        match self {
            o if !o.holder_may_run() => Duration::ZERO,
            // The callback job failed: the client's connection is gone, so the client is dead
            // and its guard SIGKILLs COMMAND's whole tree at once.
            Outcome::Failed => args.dead_holder_grace,
            // The client is alive and learns from lockenv that the TE was taken back; it gives
            // COMMAND its kill grace.
            _ => args.holder_grace,
        }
    }

    fn stops_worker(&self) -> bool {
        *self == Outcome::Stopping
    }

    /// Whether a TE was leased at all (for --once: a refused request does not count).
    fn leased(&self) -> bool {
        !matches!(self, Outcome::Refused | Outcome::JournalFailed)
    }
}

struct Signals {
    usr1: Signal,
    usr2: Signal,
    int: Signal,
    term: Signal,
}

/// Everything a lease works with; one per worker, reused for every lease.
struct LeaseContext<'a> {
    args: &'a WorkerArgs,
    tenum: &'a str,
    source: &'a Source,
    journal: &'a Journal,
    client: &'a Client,
    worker: &'a Worker,
    signals: &'a mut Signals,
    /// The last journal write failed: a crash now would not quarantine the TE, so it is not
    /// offered again until the journal can be written.
    journal_failing: bool,
}

impl LeaseContext<'_> {
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

    fn clear_journal(&mut self) {
        if let Err(e) = self.journal.clear() {
            tracing::error!(tenum = self.tenum, error = %e, "cannot clear the lease journal");
        }
    }

    /// SIGUSR2 and SIGUSR1 while the worker waits for something else; true on SIGINT/SIGTERM.
    async fn pause_resume_or_stop(&mut self) -> bool {
        tokio::select! {
            _ = self.signals.usr2.recv() => {
                tracing::info!(tenum = self.tenum, "SIGUSR2: paused, taking no new leases");
                self.worker.pause();
                false
            }
            _ = self.signals.usr1.recv() => {
                tracing::info!(tenum = self.tenum, "SIGUSR1: taking leases again");
                self.worker.resume();
                false
            }
            _ = self.signals.int.recv() => true,
            _ = self.signals.term.recv() => true,
        }
    }

    /// Sleeps `d` while still obeying signals. Returns whether the worker was asked to stop.
    async fn sit_out(&mut self, d: Duration) -> bool {
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
    async fn wait_for_journal(&mut self) -> bool {
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
}

/// The TE name when `-n` is not given: the same on every start of the same service.
fn default_tenum(source: &Source) -> String {
    let file = match source {
        Source::Static(f) => f,
        Source::Scripts { create, .. } => create,
    };
    let path = std::path::absolute(file).unwrap_or_else(|_| file.clone());
    format!("{}:{}", host_name(), path.display())
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let servers = args.tls.servers(&args.geard)?;
    let source = match args.files.as_slice() {
        [datafile] => Source::Static(datafile.clone()),
        [create, destroy] => Source::Scripts {
            create: create.clone(),
            destroy: destroy.clone(),
        },
        _ => anyhow::bail!("give DATAFILE, or CREATE_SCRIPT DESTROY_SCRIPT"),
    };
    if let Source::Scripts { create, destroy } = &source {
        for script in [create, destroy] {
            anyhow::ensure!(
                script.exists(),
                "script {} does not exist",
                script.display()
            );
        }
    }
    let tenum = args.tenum.clone().unwrap_or_else(|| default_tenum(&source));
    let dir = state_dir(&args);
    let journal = match Journal::open(&dir, &tenum) {
        Ok(j) => j,
        Err(e @ OpenError::Busy { .. }) => anyhow::bail!("TE {tenum:?}: {e}"),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot open the lease journal of TE {tenum:?} in {}",
                    dir.display()
                )
            })
        }
    };
    let mut signals = Signals {
        usr1: signal(SignalKind::user_defined1())?,
        usr2: signal(SignalKind::user_defined2())?,
        int: signal(SignalKind::interrupt())?,
        term: signal(SignalKind::terminate())?,
    };

    if let Some(previous) = journal.previous() {
        match &previous {
            PreviousLease::Open(r) => tracing::warn!(
                tenum,
                callback = r.callback,
                job = r.job_identifier,
                "a previous run left a lease open; not offering the TE until its holder cannot be running"
            ),
            PreviousLease::Unreadable { error } => tracing::error!(
                tenum,
                path = %journal.path().display(),
                error,
                "the lease journal is unreadable (torn or not ours); treating it as a lease that \
                 has just ended"
            ),
        }
        if let Source::Scripts { destroy, .. } = &source {
            run_destroy(destroy, &tenum).await;
        }
        let wait = Journal::quarantine_left(&previous, args.holder_grace, &BootClock::now());
        tracing::info!(
            seconds = wait.as_secs_f64(),
            "quarantine before offering the TE again"
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = signals.int.recv() => return Ok(()),
            _ = signals.term.recv() => return Ok(()),
        }
        journal
            .clear()
            .context("cannot clear the lease journal after the quarantine")?;
    }

    let worker = Worker::with_options(
        servers.clone(),
        WorkerOptions {
            client_id: Some(format!("testenv-worker-{tenum}")),
            ..WorkerOptions::default()
        },
    );
    let client = Client::new(servers.clone());
    worker.register(LOCKENV);
    tracing::info!(tenum, servers = args.geard, "offering the test environment");

    let mut ctx = LeaseContext {
        args: &args,
        tenum: &tenum,
        source: &source,
        journal: &journal,
        client: &client,
        worker: &worker,
        signals: &mut signals,
        journal_failing: false,
    };
    loop {
        if ctx.wait_for_journal().await {
            break;
        }
        let job = {
            let grab = worker.grab_job();
            tokio::pin!(grab);
            loop {
                tokio::select! {
                    job = &mut grab => break job,
                    stop = ctx.pause_resume_or_stop() => if stop { worker.stop(); return Ok(()) },
                }
            }
        };
        let Some(job) = job else {
            return Ok(());
        };
        let outcome = lease(&mut ctx, job).await;
        if outcome.stops_worker() || (args.once && outcome.leased()) {
            break;
        }
        if outcome.holder_may_run() {
            // Until the client's kill grace has passed, the previous holder's command may run.
            // The journal keeps the lease meanwhile, so a crash now still quarantines the TE.
            let grace = outcome.holder_grace(&args);
            tracing::info!(
                tenum,
                seconds = grace.as_secs_f64(),
                "waiting for the previous holder to be gone"
            );
            if ctx.sit_out(grace).await {
                break;
            }
            ctx.clear_journal();
        }
    }
    worker.stop();
    Ok(())
}

/// One lease, from lockenv grabbed to lockenv completed.
async fn lease(ctx: &mut LeaseContext<'_>, lockenv: Job) -> Outcome {
    let started = Instant::now();
    let tenum = ctx.tenum;
    let request = match LockRequest::parse_valid(lockenv.data()) {
        Ok(r) => r,
        Err(e) => return refuse(ctx, lockenv, e).await,
    };
    let hold_for = request
        .timeout_or(Duration::from_secs(ctx.args.timeout))
        .saturating_sub(HOLD_MARGIN)
        .max(Duration::from_secs(1));
    let mut record = LeaseRecord::new(tenum, &request.callback_name, &request.job_identifier);
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
    let alive = if no_env { None } else { Some(&request) };
    let mut outcome = hand_over(
        ctx,
        &request.callback_name,
        env.into_callback_data(),
        hold_for,
        alive,
        Some(&mut record),
    )
    .await;
    if no_env && outcome == Outcome::Completed {
        outcome = Outcome::NoEnvironment;
    }

    // Tell the client first: if its command still runs, it is killed now, before the TE is
    // destroyed or offered to anyone else.
    if let Err(e) = lockenv.complete("").await {
        tracing::warn!(tenum, error = %e, "could not complete lockenv");
    }
    if let Source::Scripts { destroy, .. } = ctx.source {
        // Also after a failed create: it may have left half an environment behind.
        run_destroy(destroy, tenum).await;
    }
    if outcome.holder_may_run() {
        // The holder may still be running: keep the lease in the journal, its heartbeat set to
        // now, until the holder grace in `run` is over (a worker restarted meanwhile, or after
        // --once or a stop, then sits out the rest of it).
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

/// A request that cannot be served: its client (if the request names a usable callback) is
/// told why, as a failed environment; otherwise lockenv fails. Nothing was leased.
async fn refuse(
    ctx: &mut LeaseContext<'_>,
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
    let hold_for = Duration::from_secs(ctx.args.timeout);
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
    ctx: &mut LeaseContext<'_>,
    callback_name: &str,
    data: String,
    hold_for: Duration,
    alive: Option<&ValidLockRequest>,
    mut record: Option<&mut LeaseRecord>,
) -> Outcome {
    let args = ctx.args;
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
    let alive_cmd = alive.and(args.client_alive_cmd.as_deref());
    let alive_period = args.alive_interval.max(Duration::from_millis(100));
    let mut alive_ticks = tokio::time::interval_at(now + alive_period, alive_period);
    alive_ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A running client-alive check: polled alongside everything else, so a hung check holds
    // up neither the heartbeat nor signals nor the callback's events.
    let mut check: Option<std::pin::Pin<Box<dyn std::future::Future<Output = bool>>>> = None;
    let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            ev = callback.next_event() => match ev {
                Ok(Some(JobEvent::Complete(_))) => return Outcome::Completed,
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
            _ = alive_ticks.tick(), if alive_cmd.is_some() && check.is_none() => {
                if let (Some(cmd), Some(req)) = (alive_cmd, alive) {
                    check = Some(Box::pin(client_alive(
                        cmd.to_string(),
                        ctx.tenum.to_string(),
                        req.clone(),
                        args.alive_timeout,
                    )));
                }
            }
            passed = async { check.as_mut().expect("guarded by is_some").await }, if check.is_some() => {
                check = None;
                if !passed {
                    return Outcome::ClientGone;
                }
            }
            _ = heartbeat.tick() => {
                if let Some(r) = record.as_deref_mut() {
                    ctx.heartbeat(r);
                }
            }
            stop = ctx.pause_resume_or_stop() => if stop { return Outcome::Stopping },
        }
    }
}

/// Sleeps until `deadline`, or for ever if there is none.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn state_dir(args: &WorkerArgs) -> PathBuf {
    if let Some(dir) = &args.state_dir {
        return dir.clone();
    }
    let system = PathBuf::from("/var/lib/testenv-worker");
    if std::fs::create_dir_all(&system).is_ok() && tempfile::tempfile_in(&system).is_ok() {
        return system;
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".local/state/testenv-worker")
}
