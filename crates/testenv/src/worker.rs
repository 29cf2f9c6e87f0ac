//! testenv-worker: offer one test environment under `lockenv`, lease it to one job at a time.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use gearman_client::{Client, Job, JobEvent, JobRequest, Worker, WorkerOptions};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::journal::{now_ms, Journal, LeaseRecord};
use crate::request::{LockRequest, LOCKENV};
use crate::tedata;

#[derive(Debug, Parser)]
#[command(
    name = "testenv-worker",
    version,
    about = "Offer a test environment through Gearman (function lockenv) and lease it to one \
             testenv-client at a time.",
    after_help = "Forms:\n  testenv-worker [options] DATAFILE                  a static TE described by DATAFILE\n  \
                  testenv-worker [options] CREATE_SCRIPT DESTROY_SCRIPT  TEs created and destroyed per lease\n\n\
                  Signals: SIGUSR2 pauses (no new leases), SIGUSR1 resumes, SIGINT/SIGTERM stop."
)]
pub struct WorkerArgs {
    /// DATAFILE, or CREATE_SCRIPT DESTROY_SCRIPT.
    #[arg(required = true, num_args = 1..=2)]
    pub files: Vec<PathBuf>,
    /// Most seconds to hold the TE for one lease (a client's timeout overrides it).
    #[arg(short = 't', long, default_value_t = 10800)]
    pub timeout: u64,
    /// An identifier of this TE on this host (default: a random hex uuid).
    #[arg(short = 'n', long)]
    pub tenum: Option<String>,
    /// Comma-separated Gearman brokers, host[:port].
    #[arg(short = 'b', long = "geard", default_value = "127.0.0.1:4730")]
    pub geard: String,
    /// Debug logging.
    #[arg(short = 'd', long)]
    pub debug: bool,
    /// Exit after one lease.
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
    #[arg(long, default_value_t = 60.0)]
    pub alive_interval: f64,
    /// Seconds after a lease ends abnormally (or after a crash) before the TE is offered again:
    /// the client's kill grace plus a margin.
    #[arg(long, default_value_t = 15.0)]
    pub holder_grace: f64,
    /// Seconds to wait after the holder's client process died (its callback job failed) before
    /// the TE is offered again: its guard kills COMMAND at once when the client dies.
    #[arg(long, default_value_t = 1.0)]
    pub dead_holder_grace: f64,
    #[command(flatten)]
    pub tls: crate::TlsArgs,
    /// Seconds to wait for the callback job to start before asking the broker about it.
    #[arg(long, default_value_t = 30.0)]
    pub callback_start_timeout: f64,
}

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
}

impl Outcome {
    /// Whether the holder may still be running when the lease ends this way.
    fn holder_may_run(&self) -> bool {
        !matches!(
            self,
            Outcome::Completed | Outcome::NoEnvironment | Outcome::NeverStarted
        )
    }

    /// How long the holder's command may outlive the lease ending this way.
    fn holder_grace(&self, args: &WorkerArgs) -> Duration {
        match self {
            Outcome::Completed | Outcome::NoEnvironment | Outcome::NeverStarted => Duration::ZERO,
            // The callback job failed: the client's connection is gone, so the client is dead
            // and its guard SIGKILLs COMMAND's whole tree at once.
            Outcome::Failed => Duration::from_secs_f64(args.dead_holder_grace),
            // The client is alive and learns from lockenv that the TE was taken back; it gives
            // COMMAND its kill grace.
            _ => Duration::from_secs_f64(args.holder_grace),
        }
    }
}

struct Signals {
    usr1: Signal,
    usr2: Signal,
    int: Signal,
    term: Signal,
}

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let servers = args.tls.servers(&args.geard)?;
    let tenum = args
        .tenum
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let source = match args.files.as_slice() {
        [datafile] => Source::Static(datafile.clone()),
        [create, destroy] => Source::Scripts {
            create: create.clone(),
            destroy: destroy.clone(),
        },
        _ => unreachable!("clap enforces one or two files"),
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
    let journal =
        Journal::open(&state_dir(&args), &tenum).context("cannot open the state directory")?;
    let holder_grace = Duration::from_secs_f64(args.holder_grace);
    let mut signals = Signals {
        usr1: signal(SignalKind::user_defined1())?,
        usr2: signal(SignalKind::user_defined2())?,
        int: signal(SignalKind::interrupt())?,
        term: signal(SignalKind::terminate())?,
    };

    if let Some(previous) = journal.open_lease() {
        tracing::warn!(
            tenum,
            callback = previous.callback,
            job = previous.job_identifier,
            "a previous run left a lease open; not offering the TE until its holder cannot be running"
        );
        if let Source::Scripts { destroy, .. } = &source {
            run_destroy(destroy, &tenum).await;
        }
        let wait = Journal::quarantine_left(&previous, holder_grace);
        tracing::info!(
            seconds = wait.as_secs_f64(),
            "quarantine before offering the TE again"
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = signals.int.recv() => return Ok(()),
            _ = signals.term.recv() => return Ok(()),
        }
        journal.clear()?;
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

    loop {
        let job = {
            let grab = worker.grab_job();
            tokio::pin!(grab);
            loop {
                tokio::select! {
                    job = &mut grab => break job,
                    _ = signals.usr2.recv() => {
                        tracing::info!(tenum, "SIGUSR2: paused, taking no new leases");
                        worker.pause();
                    }
                    _ = signals.usr1.recv() => {
                        tracing::info!(tenum, "SIGUSR1: taking leases again");
                        worker.resume();
                    }
                    _ = signals.int.recv() => { worker.stop(); return Ok(()); }
                    _ = signals.term.recv() => { worker.stop(); return Ok(()); }
                }
            }
        };
        let Some(job) = job else {
            return Ok(());
        };
        let (outcome, stop) = lease(
            &args,
            &tenum,
            &source,
            &journal,
            &client,
            &worker,
            job,
            &mut signals,
        )
        .await;
        if stop || args.once {
            worker.stop();
            return Ok(());
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
            if sit_out(grace, &worker, &mut signals).await {
                worker.stop();
                return Ok(());
            }
            if let Err(e) = journal.clear() {
                tracing::error!(error = %e, "cannot clear the lease journal");
            }
        }
    }
}

/// Sleeps `grace` while still obeying signals: SIGUSR2/SIGUSR1 pause and resume, SIGINT/SIGTERM
/// cut it short. Returns whether the worker was asked to stop.
async fn sit_out(grace: Duration, worker: &Worker, signals: &mut Signals) -> bool {
    let until = tokio::time::sleep(grace);
    tokio::pin!(until);
    loop {
        tokio::select! {
            _ = &mut until => return false,
            _ = signals.usr2.recv() => worker.pause(),
            _ = signals.usr1.recv() => worker.resume(),
            _ = signals.int.recv() => return true,
            _ = signals.term.recv() => return true,
        }
    }
}

/// One lease, from lockenv grabbed to lockenv completed. Returns the outcome and whether the
/// worker was asked to stop meanwhile.
#[allow(clippy::too_many_arguments)]
async fn lease(
    args: &WorkerArgs,
    tenum: &str,
    source: &Source,
    journal: &Journal,
    client: &Client,
    worker: &Worker,
    lockenv: Job,
    signals: &mut Signals,
) -> (Outcome, bool) {
    let started = Instant::now();
    let request = match LockRequest::parse(lockenv.data()) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(tenum, error = e, "unusable lockenv request; failing it");
            let _ = lockenv.fail().await;
            return (Outcome::NoEnvironment, false);
        }
    };
    let hold_for = Duration::from_secs(request.timeout_secs().unwrap_or(args.timeout))
        .saturating_sub(Duration::from_secs(40))
        .max(Duration::from_secs(1));
    let mut record = LeaseRecord {
        tenum: tenum.to_string(),
        callback: request.callback_name.clone(),
        job_identifier: request.job_identifier.clone(),
        started_ms: now_ms(),
        heartbeat_ms: now_ms(),
    };
    if let Err(e) = journal.heartbeat(&mut record) {
        tracing::error!(error = %e, "cannot write the lease journal; refusing the lease");
        let _ = lockenv.fail().await;
        return (Outcome::NoEnvironment, false);
    }
    tracing::info!(
        tenum,
        holder = request.callback_name,
        job = request.job_identifier,
        "lease start"
    );

    let data = match source {
        Source::Static(path) => read_datafile(path),
        Source::Scripts { create, .. } => run_create(create, tenum, &request).await,
    };
    let no_env = tedata::is_failure_notice(&data);
    if no_env {
        tracing::error!(tenum, "{}", data.lines().next().unwrap_or(""));
    } else {
        tracing::info!(tenum, te = %tedata::describe(&data), "environment ready");
    }

    let mut stop = false;
    let mut outcome = match client
        .submit(JobRequest::new(request.callback_name.clone(), data))
        .await
    {
        Err(e) => Outcome::LostBroker(e.to_string()),
        Ok(mut callback) => {
            let start_check =
                tokio::time::Instant::now() + Duration::from_secs_f64(args.callback_start_timeout);
            let hold_until = tokio::time::Instant::now() + hold_for;
            let mut checked_start = false;
            let mut alive = tokio::time::interval_at(
                tokio::time::Instant::now() + Duration::from_secs_f64(args.alive_interval),
                Duration::from_secs_f64(args.alive_interval.max(0.1)),
            );
            let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    ev = callback.next_event() => match ev {
                        Ok(Some(JobEvent::Complete(_))) => break Outcome::Completed,
                        Ok(Some(e)) if e.is_final() => break Outcome::Failed,
                        Ok(_) => {}
                        Err(e) => break Outcome::LostBroker(e.to_string()),
                    },
                    _ = tokio::time::sleep_until(start_check), if !checked_start => {
                        checked_start = true;
                        match client.get_status(callback.handle()).await {
                            Ok(s) if s.known && s.running => {}
                            Ok(_) => break Outcome::NeverStarted,
                            Err(e) => break Outcome::LostBroker(e.to_string()),
                        }
                    }
                    _ = tokio::time::sleep_until(hold_until) => break Outcome::TimedOut,
                    _ = alive.tick(), if args.client_alive_cmd.is_some() => {
                        let cmd = args.client_alive_cmd.as_deref().unwrap_or_default();
                        if !client_alive(cmd, tenum, &request).await {
                            break Outcome::ClientGone;
                        }
                    }
                    _ = heartbeat.tick() => {
                        let _ = journal.heartbeat(&mut record);
                    }
                    _ = signals.usr2.recv() => { worker.pause(); }
                    _ = signals.usr1.recv() => { worker.resume(); }
                    _ = signals.int.recv() => { stop = true; break Outcome::Stopping; }
                    _ = signals.term.recv() => { stop = true; break Outcome::Stopping; }
                }
            }
        }
    };
    if no_env && outcome == Outcome::Completed {
        outcome = Outcome::NoEnvironment;
    }

    // Tell the client first: if its command still runs, it is killed now, before the TE is
    // destroyed or offered to anyone else.
    if let Err(e) = lockenv.complete("").await {
        tracing::warn!(tenum, error = %e, "could not complete lockenv");
    }
    if let Source::Scripts { destroy, .. } = source {
        // Also after a failed create: it may have left half an environment behind.
        run_destroy(destroy, tenum).await;
    }
    if outcome.holder_may_run() {
        // The holder may still be running: keep the lease in the journal, its heartbeat set to
        // now, until the holder grace in `run` is over (a worker restarted meanwhile, or after
        // --once or a stop, then sits out the rest of it).
        if let Err(e) = journal.heartbeat(&mut record) {
            tracing::error!(error = %e, "cannot write the lease journal");
        }
    } else if let Err(e) = journal.clear() {
        tracing::error!(error = %e, "cannot clear the lease journal");
    }
    tracing::info!(
        tenum,
        holder = request.callback_name,
        job = request.job_identifier,
        outcome = ?outcome,
        held_secs = format!("{:.1}", started.elapsed().as_secs_f64()),
        "lease end"
    );
    (outcome, stop)
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

/// The static form: the datafile is read for every lease, so edits take effect.
fn read_datafile(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Err(e) => format!(
            "{}: cannot read {}: {e}",
            tedata::RETRIEVE_FAILED,
            path.display()
        ),
        Ok(text) => match tedata::validate(&text) {
            Ok(()) => text,
            Err(e) => format!("{}: {} {e}", tedata::RETRIEVE_FAILED, path.display()),
        },
    }
}

/// The script form: `CREATE_SCRIPT TENUM ENVSIZE UCINSTANCE CREATE_UNDERCLOUD SSH_KEY NET_ISO
/// COMPUTE_ENVSIZE EXTRA_NODES` writes the TE's JSON to `$TE_DATAFILE`.
async fn run_create(script: &Path, tenum: &str, req: &LockRequest) -> String {
    let or = |v: &str, d: &str| {
        if v.is_empty() {
            d.to_string()
        } else {
            v.to_string()
        }
    };
    let datafile = match tempfile::Builder::new().prefix("te-create-").tempfile() {
        Ok(f) => f,
        Err(e) => {
            return format!(
                "{}: cannot create a temp file: {e}",
                tedata::RETRIEVE_FAILED
            )
        }
    };
    let output = tokio::process::Command::new(script)
        .args([
            tenum.to_string(),
            or(&req.envsize, "2"),
            req.ucinstance.clone(),
            req.create_undercloud.clone(),
            req.ssh_key.clone(),
            or(&req.net_iso, "multi-nic"),
            or(&req.compute_envsize, "0"),
            or(&req.extra_nodes, "0"),
        ])
        .env("TE_DATAFILE", datafile.path())
        .stdin(Stdio::null())
        .output()
        .await;
    let output = match output {
        Ok(o) => o,
        Err(e) => {
            return format!(
                "{}: cannot run {}: {e}",
                tedata::RETRIEVE_FAILED,
                script.display()
            )
        }
    };
    let mut combined = output.stdout.clone();
    combined.extend_from_slice(&output.stderr);
    if !output.status.success() {
        return format!(
            "{}: {} failed ({}): {}",
            tedata::RETRIEVE_FAILED,
            script.display(),
            output.status,
            tedata::tail(&combined, 2000)
        );
    }
    match std::fs::read_to_string(datafile.path()) {
        Ok(text) => match tedata::validate(&text) {
            Ok(()) => text,
            Err(e) => format!(
                "{}: {} wrote {e}",
                tedata::RETRIEVE_FAILED,
                script.display()
            ),
        },
        Err(e) => format!(
            "{}: cannot read back the TE data: {e}",
            tedata::RETRIEVE_FAILED
        ),
    }
}

async fn run_destroy(script: &Path, tenum: &str) {
    let result = tokio::process::Command::new(script)
        .arg(tenum)
        .stdin(Stdio::null())
        .output()
        .await;
    match result {
        Ok(o) if o.status.success() => tracing::info!(tenum, "destroy script done"),
        Ok(o) => {
            let mut combined = o.stdout;
            combined.extend_from_slice(&o.stderr);
            tracing::error!(tenum, status = %o.status, output = tedata::tail(&combined, 500), "destroy script failed");
        }
        Err(e) => tracing::error!(tenum, error = %e, "cannot run the destroy script"),
    }
}

async fn client_alive(cmd: &str, tenum: &str, req: &LockRequest) -> bool {
    let status = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .env("TE_UCINSTANCE", &req.ucinstance)
        .env("TE_JOB_IDENTIFIER", &req.job_identifier)
        .env("TE_CALLBACK", &req.callback_name)
        .env("TE_TENUM", tenum)
        .stdin(Stdio::null())
        .status()
        .await;
    match status {
        Ok(s) if s.success() => true,
        Ok(s) => {
            tracing::warn!(tenum, holder = req.callback_name, %s, "client-alive check failed; freeing the TE");
            false
        }
        Err(e) => {
            tracing::warn!(tenum, error = %e, "cannot run the client-alive check; assuming alive");
            true
        }
    }
}
