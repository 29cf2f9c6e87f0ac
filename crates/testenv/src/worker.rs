//! testenv-worker: offer one test environment under `lockenv`, lease it to one job at a time.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use gearman_client::{Client, Worker, WorkerOptions};
use testenv_proto::{LOCKENV, MAX_TIMEOUT_SECS};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::journal::{BootClock, Journal, OpenError, PreviousLease};
use crate::lease::{
    lease_with, run_destroy, Interrupt, Interrupts, LeaseContext, LeaseSettings, Source,
};

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
    /// Seconds to keep the TE locked for a holder whose callback job was lost (its broker
    /// died or the link was cut), offering it a lease resume on every broker meanwhile; only
    /// for clients that resume leases (ours). 0 turns resume off. Keep it above the clients'
    /// --resume-grace plus their kill grace and the time to notice a dead broker (40 s).
    #[arg(long, default_value = "120", value_parser = parse_seconds)]
    pub resume_grace: Duration,
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

struct Signals {
    usr1: Signal,
    usr2: Signal,
    int: Signal,
    term: Signal,
}

impl Interrupts for Signals {
    async fn next(&mut self) -> Interrupt {
        tokio::select! {
            _ = self.usr2.recv() => {
                tracing::info!("SIGUSR2");
                Interrupt::Pause
            }
            _ = self.usr1.recv() => {
                tracing::info!("SIGUSR1");
                Interrupt::Resume
            }
            _ = self.int.recv() => Interrupt::Stop,
            _ = self.term.recv() => Interrupt::Stop,
        }
    }
}

impl WorkerArgs {
    fn lease_settings(&self) -> LeaseSettings {
        LeaseSettings {
            timeout: Duration::from_secs(self.timeout),
            client_alive_cmd: self.client_alive_cmd.clone(),
            alive_interval: self.alive_interval,
            alive_timeout: self.alive_timeout,
            holder_grace: self.holder_grace,
            dead_holder_grace: self.dead_holder_grace,
            callback_start_timeout: self.callback_start_timeout,
        }
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

/// This machine's host name (`localhost` when it has none); names TEs and agents by default.
pub fn host_name() -> String {
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
        let holder_done = crate::lease::previous_holder_done(&previous, &servers, &tenum);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = holder_done => {}
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

    let settings = args.lease_settings();
    let mut ctx = LeaseContext {
        settings: &settings,
        tenum: &tenum,
        source: &source,
        journal: &journal,
        client: &client,
        worker: &worker,
        interrupts: &mut signals,
        check_size: false,
        exit_status: None,
        leasing: false,
        pause_after_lease: false,
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
        let outcome = lease_with(&mut ctx, job, args.resume_grace).await.outcome;
        if outcome.stops_worker() || (args.once && outcome.leased()) {
            break;
        }
        if ctx.sit_out_holder(&outcome).await {
            break;
        }
    }
    worker.stop();
    Ok(())
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
