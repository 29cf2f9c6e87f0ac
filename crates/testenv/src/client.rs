//! testenv-client: lock a test environment, run COMMAND with `TE_DATAFILE`, hand it back.

use std::ffi::OsString;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use gearman_client::{
    Backoff, Client, ClientOptions, ForegroundJob, JobEvent, JobRequest, Liveness, Priority,
    ServerAddr, Worker, WorkerOptions,
};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::guard;
use crate::request::{LockRequest, LOCKENV};
use crate::tedata;

/// Exit status when the TE was taken back (lockenv ended) while COMMAND still ran.
pub const EXIT_LEASE_LOST: i32 = 3;
/// The least time an adopted lease's C1 resume gets (see `hold`).
const ADOPT_MIN_GRACE: Duration = Duration::from_secs(5);
/// How often a lock request that ends without an environment is submitted again.
const MAX_LOCKENV_RETRIES: u32 = 5;
/// The callback job's result when COMMAND exited: this followed by its exit status.
pub const COMMAND_EXIT_PREFIX: &str = "exit ";
/// Exit status when the local --timeout expired.
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit status when the worker could not provide an environment, as the original.
pub const EXIT_NO_ENV: i32 = 2;
/// `--label`: a name usable in a function name (as testenv-proto checks agent labels).
fn parse_label(text: &str) -> Result<String, String> {
    testenv_proto::agent::check_name("label", text).map_err(|e| e.to_string())?;
    Ok(text.to_string())
}

/// The lock function and priority the lock request is submitted with.
struct LockTarget {
    function: String,
    priority: Priority,
}

/// `-t`: a number of seconds, more than 0 and at most the longest lease a worker grants
/// ([`crate::request::MAX_TIMEOUT_SECS`], 30 days): the one range of testenv-proto, so every deadline derived
/// from it stays far from overflowing. Kept as given, since the lock request carries it as a
/// string.
fn parse_timeout(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("the timeout must be a number of seconds".into());
    }
    crate::request::parse_timeout(text).map(|_| text.to_string())
}

fn timeout_duration(text: &str) -> Duration {
    // parse_timeout has already checked the range, so the conversion cannot fail.
    Duration::try_from_secs_f64(text.trim().parse().unwrap_or(0.0)).unwrap_or(Duration::ZERO)
}

#[derive(Debug, Parser)]
#[command(
    name = "testenv-client",
    version,
    about = "Lock a test environment through Gearman, run COMMAND with $TE_DATAFILE describing \
             it, and release it when COMMAND exits. The exit status is COMMAND's.",
    after_help = "Example: echo 'cat $TE_DATAFILE' | testenv-client -b broker:4730 -- bash"
)]
pub struct ClientArgs {
    /// Comma-separated Gearman brokers, host[:port] (port 4730 by default).
    #[arg(short = 'b', long = "geard", default_value = "127.0.0.1:4730")]
    pub geard: String,
    /// A unique identifier for this job (default: a random hex uuid).
    #[arg(short = 'n', long)]
    pub jobnum: Option<String>,
    /// Seconds (more than 0, at most 30 days) after which the client gives up waiting, or
    /// releases the environment and kills COMMAND; it exits 124 then.
    #[arg(short = 't', long, default_value = "10800", value_parser = parse_timeout)]
    pub timeout: String,
    /// Number of baremetal nodes to request.
    #[arg(long, default_value = "2")]
    pub envsize: String,
    /// Number of compute nodes to request.
    #[arg(long, default_value = "0")]
    pub compute_envsize: String,
    /// UUID of the undercloud instance.
    #[arg(long, default_value = "")]
    pub ucinstance: String,
    /// Deploy the undercloud node.
    #[arg(long)]
    pub create_undercloud: bool,
    /// SSH key for the nodes to be deployed.
    #[arg(long, default_value = "")]
    pub ssh_key: String,
    /// Network isolation of the requested environment.
    #[arg(long, default_value = "multi-nic", value_parser = ["none", "multi-nic", "public-bond"])]
    pub net_iso: String,
    /// Number of extra nodes to request.
    #[arg(long, default_value = "0")]
    pub extra_nodes: String,
    /// Debug logging.
    #[arg(short = 'd', long)]
    pub debug: bool,
    /// Seconds (0 to 3600) between passing a signal to COMMAND and killing everything it
    /// started.
    #[arg(long, default_value = "10", value_parser = parse_kill_grace)]
    pub kill_grace: Duration,
    /// Seconds between the "waited N s" and "no broker answers" lines while waiting for a TE.
    #[arg(long, default_value = "30", value_parser = parse_report_interval, hide = true)]
    pub report_interval: Duration,
    /// Seconds of silence after which a broker connection is probed (ECHO_REQ).
    #[arg(long, default_value = "30", value_parser = parse_probe_seconds, hide = true)]
    pub probe_idle: Duration,
    /// Seconds a probed broker has to answer before its connection counts as dead.
    #[arg(long, default_value = "10", value_parser = parse_probe_seconds, hide = true)]
    pub probe_timeout: Duration,
    /// Seconds to keep COMMAND running after the broker carrying the lease is lost, while the
    /// lease is resumed through any broker; when the worker has not taken it back by then,
    /// COMMAND is killed and the client exits 3. 0 turns resume off. Keep it below the
    /// workers' --resume-grace minus the kill grace and the time to notice a dead broker.
    #[arg(long, default_value = "60", value_parser = parse_resume_grace)]
    pub resume_grace: Duration,
    #[command(flatten)]
    pub tls: crate::TlsArgs,
    /// Ask only for a TE with this label (testenv-agent registers `lockenv:LABEL` for it).
    #[arg(long, value_parser = parse_label)]
    pub label: Option<String>,
    /// Submit the lock request with this Gearman priority (SUBMIT_JOB_HIGH / SUBMIT_JOB /
    /// SUBMIT_JOB_LOW).
    #[arg(long, default_value = "normal", value_parser = ["high", "normal", "low"])]
    pub priority: String,
    /// The project the job runs for; tebroker serves waiting requests of equal priority fairly
    /// across tenants. Default: $ZUUL_PROJECT, else the one shared tenant.
    #[arg(long, env = "ZUUL_PROJECT", default_value = "")]
    pub tenant: String,
    /// The command to run while the environment is locked.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<OsString>,
}

fn parse_seconds(text: &str, min: f64, max: f64) -> Result<Duration, String> {
    match text.trim().parse::<f64>() {
        Ok(secs) if (min..=max).contains(&secs) => {
            Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
        }
        _ => Err(format!(
            "{text:?} is not a number of seconds between {min} and {max}"
        )),
    }
}

fn parse_kill_grace(text: &str) -> Result<Duration, String> {
    parse_seconds(text, 0.0, 3600.0)
}

fn parse_resume_grace(text: &str) -> Result<Duration, String> {
    parse_seconds(text, 0.0, testenv_proto::MAX_TIMEOUT_SECS as f64)
}

fn parse_probe_seconds(text: &str) -> Result<Duration, String> {
    parse_seconds(text, 0.1, 3600.0)
}

fn parse_report_interval(text: &str) -> Result<Duration, String> {
    parse_seconds(text, 0.1, 3600.0)
}

/// What ends the client before COMMAND runs, in whatever phase it is: SIGINT/SIGTERM (exit
/// 128+N) or `-t` (exit 124).
struct Stops {
    sigint: Signal,
    sigterm: Signal,
    deadline: tokio::time::Instant,
    timeout: Duration,
}

impl Stops {
    /// The exit status, once one of them happens.
    async fn next(&mut self) -> i32 {
        tokio::select! {
            _ = self.sigint.recv() => 128 + libc::SIGINT,
            _ = self.sigterm.recv() => 128 + libc::SIGTERM,
            _ = tokio::time::sleep_until(self.deadline) => {
                eprintln!(
                    "testenv-client: timed out after {:.0}s waiting for a test environment",
                    self.timeout.as_secs_f64()
                );
                EXIT_TIMEOUT
            }
        }
    }

    /// Runs `work` unless a stop comes first (then `Err(exit status)`).
    async fn or_stop<T>(&mut self, work: impl std::future::Future<Output = T>) -> Result<T, i32> {
        tokio::select! {
            r = work => Ok(r),
            code = self.next() => Err(code),
        }
    }
}

/// Says, at most once per `every`, that no broker answers: which ones, for how long, and why.
struct Silence {
    brokers: String,
    since: Instant,
    every: Duration,
    last_said: Option<Instant>,
}

impl Silence {
    fn new(servers: &[ServerAddr], every: Duration) -> Silence {
        Silence {
            brokers: servers
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            since: Instant::now(),
            every,
            last_said: None,
        }
    }

    fn report(&mut self, error: &dyn std::fmt::Display) {
        if self.last_said.is_some_and(|t| t.elapsed() < self.every) {
            return;
        }
        self.last_said = Some(Instant::now());
        eprintln!(
            "testenv-client: no broker answers ({}) for {:.0}s; still trying: {error}",
            self.brokers,
            self.since.elapsed().as_secs_f64()
        );
    }
}

/// How a run ended, before it becomes an exit status.
enum Ending {
    Command(i32),
    LeaseLost,
    TimedOut,
    Signalled(i32),
}

pub async fn run(args: ClientArgs, guard: guard::Guard) -> anyhow::Result<i32> {
    let started = Instant::now();
    let servers = args.tls.servers(&args.geard)?;
    let jobnum = args
        .jobnum
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let callback = format!("callback_{jobnum}");
    let timeout = timeout_duration(&args.timeout);
    let resume_key = crate::resume::new_key()?;
    let resumable = !args.resume_grace.is_zero();
    let request = LockRequest {
        callback_name: callback.clone(),
        timeout: args.timeout.clone(),
        envsize: args.envsize.clone(),
        compute_envsize: args.compute_envsize.clone(),
        ucinstance: args.ucinstance.clone(),
        create_undercloud: if args.create_undercloud {
            "true".into()
        } else {
            String::new()
        },
        ssh_key: args.ssh_key.clone(),
        net_iso: args.net_iso.clone(),
        extra_nodes: args.extra_nodes.clone(),
        job_identifier: LockRequest::job_identifier_from_env(),
        tenant: args.tenant.clone(),
        resume_key: if resumable {
            resume_key.secret_hex()
        } else {
            String::new()
        },
    };
    let target = LockTarget {
        function: match &args.label {
            Some(label) => testenv_proto::agent::label_function(label),
            None => LOCKENV.to_string(),
        },
        priority: match args.priority.as_str() {
            "high" => Priority::High,
            "low" => Priority::Low,
            _ => Priority::Normal,
        },
    };

    let mut stops = Stops {
        sigint: signal(SignalKind::interrupt())?,
        sigterm: signal(SignalKind::terminate())?,
        deadline: tokio::time::Instant::from_std(started) + timeout,
        timeout,
    };

    // The callback must be registered before lockenv is submitted, or a fast worker could
    // submit the callback job before anyone can take it.
    let liveness = Liveness {
        probe_idle: Some(args.probe_idle),
        probe_timeout: args.probe_timeout,
        ..Liveness::default()
    };
    let worker = Worker::with_options(
        servers.clone(),
        WorkerOptions {
            client_id: Some(format!("testenv-client-{jobnum}")),
            liveness,
            // A hung broker must not later read an end-of-file from the connection carrying
            // our callback job: tebroker would tell the worker we died (see
            // docs/design/lease-resume.md, "A gap this closes").
            keep_abandoned_connections: resumable,
            ..WorkerOptions::default()
        },
    );
    worker.register(callback.clone());
    let client = Client::with_options(
        servers.clone(),
        ClientOptions {
            liveness,
            ..ClientOptions::default()
        },
    );
    let mut silence = Silence::new(&servers, args.report_interval);
    let connected = async {
        // The client connection's error says which brokers failed and why; the first one is
        // reported at once, later ones once per report interval.
        let mut window = args.report_interval.min(Duration::from_secs(1));
        while let Err(e) = client.wait_for_server(window).await {
            silence.report(&e);
            window = args.report_interval;
        }
        while let Err(e) = worker.wait_for_server(args.report_interval).await {
            silence.report(&e);
        }
    };
    if let Err(code) = stops.or_stop(connected).await {
        return Ok(code);
    }
    tracing::info!(%callback, "requesting a test environment");
    let mut lockenv = match stops
        .or_stop(submit_lockenv(&client, &target, &request, &mut silence))
        .await
    {
        Ok(job) => job,
        Err(code) => return Ok(code),
    };

    // Wait for the environment, re-submitting if the broker holding our request dies.
    let every = args.report_interval;
    let mut report = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut lockenv_retries = 0u32;
    let mut worker_resumes = false;
    // Whether a resuming worker said it took the request we wait on now, and when we first
    // lost a request with its broker (a worker may have taken it just before).
    let mut current_taken = false;
    let mut lock_lost_at: Option<tokio::time::Instant> = None;
    let job = loop {
        let resubmit_after = tokio::select! {
            job = worker.grab_job() => match job {
                Some(job) if testenv_proto::resume::LeaseMessage::parse(job.data()).is_some() => {
                    answer_before_lease(job, &resume_key).await;
                    continue;
                }
                Some(job) => break job,
                None => anyhow::bail!("callback worker stopped"),
            },
            ev = lockenv.next_event() => match ev {
                Ok(Some(e)) if e.is_final() => {
                    // A worker that died or gave up between grabbing lockenv and calling back:
                    // ask again, a bounded number of times (a worker that rejects every request
                    // must not make us loop forever).
                    lockenv_retries += 1;
                    if lockenv_retries > MAX_LOCKENV_RETRIES {
                        anyhow::bail!("the testenv workers ended the lock request {lockenv_retries} times without an environment (last: {e:?})");
                    }
                    tracing::warn!(event = ?e, "the lock request ended without an environment; submitting again");
                    Backoff::RECONNECT.initial * 2 * lockenv_retries
                }
                Ok(Some(JobEvent::Status { .. })) => {
                    worker_resumes = true;
                    current_taken = true;
                    continue
                }
                Ok(_) => continue,
                Err(e) => {
                    eprintln!("testenv-client: lost the broker holding our request ({e}); submitting it again");
                    lock_lost_at.get_or_insert_with(tokio::time::Instant::now);
                    Backoff::RECONNECT.initial
                }
            },
            _ = report.tick() => {
                let place = match queue_position(&servers, lockenv.server(), lockenv.handle()).await {
                    Some((0, _, _)) => " (a worker has the request)".to_string(),
                    Some((n, total, None)) => format!(" (position {n} of {total} in the queue)"),
                    Some((n, total, Some(est))) => format!(" (position {n} of {total} in the queue, about {est}s to wait)"),
                    None => String::new(),
                };
                eprintln!(
                    "testenv-client: waited {:.0}s for a test environment{place}",
                    started.elapsed().as_secs_f64()
                );
                continue;
            }
            code = stops.next() => return Ok(code),
        };
        let resubmit = async {
            tokio::time::sleep(resubmit_after).await;
            let mut silence = Silence::new(&servers, args.report_interval);
            submit_lockenv(&client, &target, &request, &mut silence).await
        };
        match stops.or_stop(resubmit).await {
            Ok(job) => {
                lockenv = job;
                current_taken = false;
            }
            Err(code) => return Ok(code),
        }
    };
    let waited = started.elapsed().as_secs_f64();
    if waited > 90.0 {
        tracing::warn!("{waited:.1} seconds waiting for a worker.");
    }
    let data = String::from_utf8_lossy(job.data()).into_owned();
    if tedata::is_failure_notice(&data) {
        eprintln!("testenv-client: {data}");
        let _ = job.complete("").await;
        worker.stop();
        return Ok(EXIT_NO_ENV);
    }
    tracing::info!(te = %tedata::describe(&data), "environment locked after {waited:.1}s");
    let c1_lost_since = match lock_lost_at {
        Some(since) if resumable && !current_taken => {
            adopted_lease_lost_since(&mut lockenv, since, &mut worker_resumes, &client, liveness)
                .await
        }
        _ => None,
    };

    let mut datafile = tempfile::Builder::new()
        .prefix("te-datafile-")
        .suffix(".json")
        .tempfile()
        .context("cannot create the TE datafile")?;
    datafile.write_all(data.as_bytes())?;
    datafile.flush()?;

    let mut guard_process = guard
        .start(datafile.path())
        .context("cannot start the command")?;
    // An adopted lease's C1 is the request lost with its broker; the queued duplicate is kept
    // (not our carrier): a worker that takes it is told ALREADY_SERVED on its callback.
    let (c1, duplicate) = match c1_lost_since {
        Some(_) => (None, Some(lockenv)),
        None => (Some(lockenv), None),
    };
    let carriers = Carriers {
        c1,
        _duplicate: duplicate,
        c2: Some(job),
        retired_c2: Vec::new(),
        c1_offer: None,
        release_offer: None,
        tell_released: false,
    };
    let resume = ResumeSetup {
        key: &resume_key,
        grace: args.resume_grace,
        worker_resumes,
        c1_lost_since,
        client: &client,
        liveness,
    };
    let (ending, mut carriers) = hold(
        &mut guard_process,
        carriers,
        &worker,
        &resume,
        &mut stops,
        timeout,
    )
    .await;
    drop(datafile);

    // Hand the environment back, saying how COMMAND ended (testenv-agent counts failed jobs
    // and holds their TEs; other workers ignore the data). After a lost lease this also tells
    // a resuming worker that COMMAND is dead.
    let how = match ending {
        Ending::Command(code) => format!("{COMMAND_EXIT_PREFIX}{code}"),
        _ => String::new(),
    };
    let retired = std::mem::take(&mut carriers.retired_c2);
    for job in carriers.c2.take().into_iter().chain(retired) {
        if !job.is_connected() {
            continue;
        }
        if let Err(e) = job.complete(how.clone()).await {
            tracing::warn!(error = %e, "could not complete the callback job; the worker will free the TE when it notices");
        }
    }
    worker.stop();
    if carriers.tell_released {
        tell_released(&resume).await;
    }
    if let (Some(lockenv), false) = (&mut carriers.c1, matches!(ending, Ending::LeaseLost)) {
        // The worker completes lockenv once it has released the TE; do not wait forever, nor
        // past a signal.
        let released = async {
            while let Ok(Some(e)) = lockenv.next_event().await {
                if e.is_final() {
                    break;
                }
            }
        };
        tokio::select! {
            _ = tokio::time::timeout(Duration::from_secs(30), released) => {}
            _ = stops.sigint.recv() => {}
            _ = stops.sigterm.recv() => {}
        }
    }
    Ok(match ending {
        Ending::Command(code) => code,
        Ending::LeaseLost => EXIT_LEASE_LOST,
        Ending::TimedOut => EXIT_TIMEOUT,
        Ending::Signalled(sig) => 128 + sig,
    })
}

/// The client's ends of a lease: C1 (the lock job it submitted, or the resume that replaced
/// it) and C2 (the callback job it took), and the resumes it is offering.
struct Carriers {
    c1: Option<ForegroundJob>,
    /// The lock request submitted again after the first was lost, when the TE data came for
    /// the first (see [`adopted_lease_lost_since`]). Kept so it stays queued as it was.
    _duplicate: Option<ForegroundJob>,
    c2: Option<gearman_client::Job>,
    /// Callback jobs replaced by a resume. Never answered before the end (dropping one would
    /// fail it, and the worker may still be watching it rather than the newest): at the end
    /// every one gets COMMAND's result, so whichever the worker watches hears it.
    retired_c2: Vec<gearman_client::Job>,
    /// A C1 resume offered on every broker's `lease_<id>` after C1 was lost.
    c1_offer: Option<crate::resume::Offer>,
    /// COMMAND's end offered on `lease_<id>`, when there was no C2 to report it on.
    release_offer: Option<crate::resume::Offer>,
    /// The lease ended without a live worker hearing that COMMAND is dead (the worker died,
    /// or never took our resume): a restarted worker learns it from `released` on
    /// `lease_<id>` and need not sit out its whole quarantine.
    tell_released: bool,
}

struct ResumeSetup<'k> {
    key: &'k testenv_proto::resume::LeaseKey,
    /// Zero: this client does not resume (it sent no key).
    grace: Duration,
    /// The worker said it resumes leases (WORK_STATUS on lockenv); an original one never does.
    worker_resumes: bool,
    /// The lease was adopted (TE data for a lock request lost with its broker): C1 has been
    /// lost since then, and the client's grace runs from then.
    c1_lost_since: Option<tokio::time::Instant>,
    /// The template of the offers' own per-broker clients.
    client: &'k Client,
    liveness: Liveness,
}

impl ResumeSetup<'_> {
    fn clients(&self) -> Vec<Client> {
        crate::resume::per_broker_clients(self.client, self.liveness)
    }

    /// A C1 resume (`resume` on `lease_<id>`) offered on every broker.
    fn c1_resume_offer(&self) -> crate::resume::Offer {
        use testenv_proto::resume::{Carrier, LeaseMessage, LeaseOp};
        let msg = LeaseMessage::new(LeaseOp::Resume, self.key, Carrier::Lease);
        crate::resume::Offer::new(
            self.key.lease_id().function(),
            msg.to_json(),
            self.clients(),
        )
    }
}

/// Whether the TE data just taken is for a lock request we lost with its broker, not for the
/// one we wait on now: no resuming worker said it took the current one (its WORK_STATUS may
/// lag the TE data, so it gets a moment), while an earlier one was lost at `since`. Then that
/// worker holds the lease on the lost request and waits for a C1 resume (the model's finding
/// 3): the lease is adopted, C1 counted lost since `since`. Returns that time, or `None`.
async fn adopted_lease_lost_since(
    lockenv: &mut ForegroundJob,
    since: tokio::time::Instant,
    worker_resumes: &mut bool,
    client: &Client,
    liveness: Liveness,
) -> Option<tokio::time::Instant> {
    const STATUS_LAG: Duration = Duration::from_secs(1);
    if let Ok(Ok(Some(JobEvent::Status { .. }))) =
        tokio::time::timeout(STATUS_LAG, lockenv.next_event()).await
    {
        *worker_resumes = true;
        return None;
    }
    // A worker running the current request without saying it resumes is an original one: its
    // lease is carried by that request, as before resume existed, and nobody waits for a C1
    // resume. Only its broker can say (GET_STATUS).
    if current_request_running(lockenv, client, liveness).await {
        eprintln!(
            "testenv-client: the testenv worker does not resume leases (an original \
             testenv-worker?); a lost broker ends the lease as before"
        );
        return None;
    }
    eprintln!(
        "testenv-client: got the environment of a lock request lost with its broker (we had \
         submitted it again); resuming its lease on every broker"
    );
    // The worker holding the lost request waits for our C1 resume: it resumes leases.
    *worker_resumes = true;
    Some(since)
}

/// Whether the broker holding `lockenv` says a worker is running it.
async fn current_request_running(
    lockenv: &ForegroundJob,
    client: &Client,
    liveness: Liveness,
) -> bool {
    let Some(broker) = crate::resume::per_broker_clients(client, liveness)
        .into_iter()
        .find(|c| {
            c.servers()
                .iter()
                .any(|s| s.to_string() == lockenv.server())
        })
    else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), broker.get_status(lockenv.handle())).await,
        Ok(Ok(status)) if status.known && status.running
    )
}

async fn c1_event(c1: &mut Option<ForegroundJob>) -> gearman_client::Result<Option<JobEvent>> {
    match c1 {
        Some(job) => job.next_event().await,
        None => std::future::pending().await,
    }
}

/// A lease message that reaches us while we still wait for a TE: the worker that took our
/// request lost the callback job carrying its TE data before we got it. COMMAND never started,
/// so we say so (the worker frees the TE) and go on waiting.
async fn answer_before_lease(job: gearman_client::Job, key: &testenv_proto::resume::LeaseKey) {
    use testenv_proto::resume::{Carrier, LeaseMessage, NEVER_STARTED};
    match LeaseMessage::parse(job.data()) {
        Some(Ok(m)) if m.proves(key, Carrier::Callback) => {
            eprintln!("testenv-client: a testenv worker lost the environment it was sending us; it frees it, and we keep waiting");
            let _ = job.complete(NEVER_STARTED).await;
        }
        _ => {
            eprintln!(
                "testenv-client: refused a lease message with a wrong key (forged or stale) from {}",
                job.server()
            );
            let _ = job.fail().await;
        }
    }
}

/// Leaves `released` (COMMAND is dead) on `lease_<id>` of every broker that takes it, as a
/// background job: the worker that restarts after dying mid-lease registers that function
/// from its journal and ends its quarantine when it finds this.
async fn tell_released(resume: &ResumeSetup<'_>) {
    let msg = testenv_proto::resume::LeaseMessage::new(
        testenv_proto::resume::LeaseOp::Released,
        resume.key,
        testenv_proto::resume::Carrier::Lease,
    );
    let lease_fn = resume.key.lease_id().function();
    for client in &resume.clients() {
        let req = JobRequest::new(lease_fn.clone(), msg.to_json()).unique(lease_fn.clone());
        match tokio::time::timeout(Duration::from_secs(2), client.submit_background(req)).await {
            Ok(Ok(_)) => {
                tracing::info!(servers = ?client.servers().iter().map(|s| s.to_string()).collect::<Vec<_>>(), "left the command's end for a restarted testenv worker")
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot leave the command's end on this broker")
            }
            Err(_) => tracing::debug!("no broker answered in time to take the command's end"),
        }
    }
}

async fn kill_command(guard: &mut guard::RunningGuard, sig: libc::c_int) {
    guard.signal(sig);
    let _ = guard.wait().await;
}

/// Holds the TE while COMMAND runs; resumes the lease when a broker carrying it is lost.
async fn hold(
    guard_process: &mut guard::RunningGuard,
    mut carriers: Carriers,
    worker: &Worker,
    resume: &ResumeSetup<'_>,
    stops: &mut Stops,
    timeout: Duration,
) -> (Ending, Carriers) {
    use crate::resume::{sleep_until_opt, taken, Offer, OfferEvent};
    use testenv_proto::resume::{Carrier, LeaseMessage, LeaseOp, ALREADY_SERVED};
    let lease_fn = resume.key.lease_id().function();
    let resumable = !resume.grace.is_zero();
    // An adopted lease's grace runs from the first loss; when the TE took longer than that to
    // come, the resume still gets a few seconds, well inside the design's 25 s margin (the
    // client noticed that loss at once, not up to K later as the inequality allows).
    let mut c1_lost_until = resume.c1_lost_since.and_then(|since| {
        let floor = tokio::time::Instant::now().checked_add(resume.grace.min(ADOPT_MIN_GRACE))?;
        Some(since.checked_add(resume.grace)?.max(floor))
    });
    if c1_lost_until.is_some() {
        carriers.c1_offer = Some(resume.c1_resume_offer());
    }
    let mut command_code: Option<i32> = None;
    let mut report_until: Option<tokio::time::Instant> = None;
    let mut worker_resumes = resume.worker_resumes;
    let ending = loop {
        tokio::select! {
            code = guard_process.wait(), if command_code.is_none() => {
                let on_c2 = carriers
                    .c2
                    .iter()
                    .chain(&carriers.retired_c2)
                    .any(|j| j.is_connected());
                if on_c2 || !resumable || !worker_resumes {
                    break Ending::Command(code);
                }
                // The callback job is gone with its broker: tell the worker on lease_<id>,
                // or on the new callback job it sends.
                tracing::warn!(code, "the command ended while the callback job was lost; reporting its end on every broker");
                command_code = Some(code);
                let mut released = LeaseMessage::new(LeaseOp::Released, resume.key, Carrier::Lease);
                released.exit = Some(code);
                carriers.release_offer = Some(Offer::new(lease_fn.clone(), released.to_json(), resume.clients()));
                report_until = tokio::time::Instant::now().checked_add(resume.grace);
            }
            taken = taken(&mut carriers.release_offer) => {
                let OfferEvent::Taken(_, _) = taken;
                carriers.release_offer = None;
                tracing::info!("the testenv worker took the command's end");
                break Ending::Command(command_code.unwrap_or(0));
            }
            _ = sleep_until_opt(report_until), if report_until.is_some() => {
                eprintln!("testenv-client: could not report the command's end to the testenv worker within --resume-grace; it frees the environment after its own grace");
                break Ending::Command(command_code.unwrap_or(0));
            }
            ev = c1_event(&mut carriers.c1) => match ev {
                Ok(Some(JobEvent::Status { .. })) => worker_resumes = true,
                Ok(Some(JobEvent::Complete(data)))
                    if resumable && data == ALREADY_SERVED.as_bytes() =>
                {
                    // That lockenv was a duplicate: the lease we hold came from the first one,
                    // whose broker is gone, so resume it.
                    eprintln!(
                        "testenv-client: our lock request was submitted twice; resuming the lease \
                         of the environment we hold on every broker for up to {:.0}s",
                        resume.grace.as_secs_f64()
                    );
                    carriers.c1 = None;
                    carriers.c1_offer = Some(resume.c1_resume_offer());
                    c1_lost_until = tokio::time::Instant::now().checked_add(resume.grace);
                }
                Ok(Some(e)) if e.is_final() => {
                    if let Some(code) = command_code {
                        // The worker ended the lease after taking our report of COMMAND's end.
                        break Ending::Command(code);
                    }
                    eprintln!("testenv-client: the testenv worker released the environment while the command was running; killing it");
                    kill_command(guard_process, libc::SIGTERM).await;
                    // WORK_FAIL: the worker's connection ended (the worker died), not its choice.
                    carriers.tell_released = resumable && worker_resumes && !matches!(e, JobEvent::Complete(_));
                    break Ending::LeaseLost;
                }
                Ok(_) => {}
                Err(e) if resumable && worker_resumes => {
                    eprintln!(
                        "testenv-client: lost the broker carrying the lock ({e}); the command keeps \
                         running; resuming the lease on every broker for up to {:.0}s",
                        resume.grace.as_secs_f64()
                    );
                    carriers.c1 = None;
                    carriers.c1_offer = Some(resume.c1_resume_offer());
                    c1_lost_until = tokio::time::Instant::now().checked_add(resume.grace);
                }
                Err(e) => {
                    let c2_here = carriers
                        .c2
                        .as_ref()
                        .is_none_or(|j| Some(j.server()) == carriers.c1.as_ref().map(|c| c.server()));
                    if resumable {
                        eprintln!("testenv-client: the testenv worker does not resume leases (an original testenv-worker?); a lost broker ends the lease as before");
                    }
                    if c2_here {
                        // The callback job lived on that broker too: the worker has lost sight
                        // of it (it waits its holder grace, then offers the TE again) and we can
                        // no longer answer it. Running on would share the TE with its next holder.
                        eprintln!(
                            "testenv-client: lost the broker holding the lock ({e}); the testenv \
                             worker will release the environment; killing the command"
                        );
                        kill_command(guard_process, libc::SIGTERM).await;
                        break Ending::LeaseLost;
                    }
                    // The callback job lives on another broker: the worker still holds the TE
                    // for us until it ends.
                    tracing::warn!(error = %e, "lost the broker holding the lock request");
                    carriers.c1 = None;
                }
            },
            taken = taken(&mut carriers.c1_offer) => {
                let OfferEvent::Taken(job, ev) = taken;
                carriers.c1_offer = None;
                if let (true, Some(code)) = (ev.is_final(), command_code) {
                    break Ending::Command(code);
                }
                if ev.is_final() {
                    eprintln!("testenv-client: the testenv worker released the environment while the command was running; killing it");
                    kill_command(guard_process, libc::SIGTERM).await;
                    carriers.tell_released = true;
                    break Ending::LeaseLost;
                }
                eprintln!("testenv-client: lease resumed: the testenv worker took our new lock job on {}", job.server());
                // Only a resuming worker takes lease_<id>: a later loss of this C1 is resumed
                // too, even when the lockenv WORK_STATUS never reached us (an adopted lease).
                worker_resumes = true;
                c1_lost_until = None;
                carriers.c1 = Some(job);
            }
            _ = sleep_until_opt(c1_lost_until), if c1_lost_until.is_some() && command_code.is_none() => {
                eprintln!(
                    "testenv-client: the testenv worker did not take our lease resume within \
                     --resume-grace ({:.0}s); killing the command",
                    resume.grace.as_secs_f64()
                );
                kill_command(guard_process, libc::SIGTERM).await;
                carriers.tell_released = true;
                break Ending::LeaseLost;
            }
            grabbed = worker.grab_job(), if resumable => {
                let Some(grabbed) = grabbed else { continue };
                match LeaseMessage::parse(grabbed.data()) {
                    Some(Ok(m)) if m.op == LeaseOp::Resume && m.proves(resume.key, Carrier::Callback) => {
                        let _ = grabbed.send_status(1, 1).await;
                        eprintln!("testenv-client: lease resumed: took the testenv worker's new callback job on {}", grabbed.server());
                        worker_resumes = true;
                        if let Some(old) = carriers.c2.replace(grabbed) {
                            carriers.retired_c2.push(old);
                        }
                        if let Some(code) = command_code {
                            break Ending::Command(code);
                        }
                    }
                    Some(Ok(m)) if m.op == LeaseOp::Revoke && m.proves(resume.key, Carrier::Callback) => {
                        if let Some(code) = command_code {
                            let _ = grabbed.complete("").await;
                            break Ending::Command(code);
                        }
                        eprintln!("testenv-client: the testenv worker took the environment back (revoke); killing the command");
                        kill_command(guard_process, libc::SIGTERM).await;
                        let _ = grabbed.complete("").await;
                        break Ending::LeaseLost;
                    }
                    Some(Ok(_)) => {
                        eprintln!("testenv-client: refused a lease message with a wrong key (forged or stale) from {}", grabbed.server());
                        let _ = grabbed.fail().await;
                    }
                    Some(Err(e)) => {
                        eprintln!("testenv-client: refused a malformed lease message from {}: {e}", grabbed.server());
                        let _ = grabbed.fail().await;
                    }
                    None => {
                        // TE data for a lock request submitted again after its broker died,
                        // while a worker already held the first: that worker frees its TE and
                        // tells us this lockenv was not our lease's (ALREADY_SERVED).
                        tracing::warn!(server = grabbed.server(), "turned down a second environment while holding one");
                        let _ = grabbed.complete(ALREADY_SERVED).await;
                    }
                }
            }
            _ = tokio::time::sleep_until(stops.deadline) => {
                eprintln!("testenv-client: --timeout of {:.0}s reached; killing the command", timeout.as_secs_f64());
                kill_command(guard_process, libc::SIGTERM).await;
                break Ending::TimedOut;
            }
            _ = stops.sigint.recv() => {
                kill_command(guard_process, libc::SIGINT).await;
                break Ending::Signalled(libc::SIGINT);
            }
            _ = stops.sigterm.recv() => {
                kill_command(guard_process, libc::SIGTERM).await;
                break Ending::Signalled(libc::SIGTERM);
            }
        }
    };
    (ending, carriers)
}

/// Submits the lock request, trying every broker in turn with backoff until one takes it.
async fn submit_lockenv(
    client: &Client,
    target: &LockTarget,
    request: &LockRequest,
    silence: &mut Silence,
) -> ForegroundJob {
    let backoff = Backoff::RECONNECT;
    let mut delay = backoff.initial;
    loop {
        match client
            .submit(
                JobRequest::new(target.function.clone(), request.to_json())
                    .priority(target.priority),
            )
            .await
        {
            Ok(job) => return job,
            Err(e) => {
                tracing::debug!(error = %e, "cannot submit lockenv; retrying");
                silence.report(&e);
                tokio::time::sleep(delay).await;
                delay = backoff.next(delay);
            }
        }
    }
}

/// Asks the broker holding our request where it stands (`position HANDLE`, which tebroker
/// answers; other brokers do not, and then we say less), over TCP or TLS as for jobs.
async fn queue_position(
    servers: &[ServerAddr],
    server: &str,
    handle: &str,
) -> Option<(usize, usize, Option<u64>)> {
    let server = servers.iter().find(|s| s.to_string() == server)?;
    let answer = gearman_client::admin::query(
        server,
        &format!("position {handle}"),
        Duration::from_secs(2),
    )
    .await
    .ok()?;
    let mut words = answer.first()?.split_whitespace();
    (words.next()? == "OK").then_some(())?;
    // tebroker with a store adds the estimated wait in seconds; older ones do not.
    Some((
        words.next()?.parse().ok()?,
        words.next()?.parse().ok()?,
        words.next().and_then(|w| w.parse().ok()),
    ))
}
