//! testenv-client: lock a test environment, run COMMAND with `TE_DATAFILE`, hand it back.

use std::ffi::OsString;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use gearman_client::{
    Backoff, Client, ClientOptions, ForegroundJob, JobRequest, Liveness, Priority, ServerAddr,
    Worker, WorkerOptions,
};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::guard;
use crate::request::{LockRequest, LOCKENV};
use crate::tedata;

/// Exit status when the TE was taken back (lockenv ended) while COMMAND still ran.
pub const EXIT_LEASE_LOST: i32 = 3;
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
        resume_key: resume_key.secret_hex(),
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
    let job = loop {
        let resubmit_after = tokio::select! {
            job = worker.grab_job() => match job {
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
                Ok(_) => continue,
                Err(e) => {
                    eprintln!("testenv-client: lost the broker holding our request ({e}); submitting it again");
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
            Ok(job) => lockenv = job,
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
    let mut lockenv_open = true;
    let ending = loop {
        tokio::select! {
            code = guard_process.wait() => break Ending::Command(code),
            ev = lockenv.next_event(), if lockenv_open => match ev {
                Ok(Some(e)) if e.is_final() => {
                    eprintln!("testenv-client: the testenv worker released the environment while the command was running; killing it");
                    guard_process.signal(libc::SIGTERM);
                    let _ = guard_process.wait().await;
                    break Ending::LeaseLost;
                }
                Ok(_) => {}
                Err(e) if job.server() == lockenv.server() => {
                    // The callback job lived on that broker too: the worker has lost sight of
                    // it (it waits its holder grace, then offers the TE again) and we can no
                    // longer answer it. Running on would share the TE with its next holder.
                    eprintln!(
                        "testenv-client: lost the broker holding the lock ({e}); the testenv \
                         worker will release the environment; killing the command"
                    );
                    guard_process.signal(libc::SIGTERM);
                    let _ = guard_process.wait().await;
                    break Ending::LeaseLost;
                }
                Err(e) => {
                    // The broker holding lockenv is gone, but the callback job lives on
                    // another one: the worker still holds the TE for us until it ends.
                    tracing::warn!(error = %e, "lost the broker holding the lock request");
                    lockenv_open = false;
                }
            },
            _ = tokio::time::sleep_until(stops.deadline) => {
                eprintln!("testenv-client: --timeout of {:.0}s reached; killing the command", timeout.as_secs_f64());
                guard_process.signal(libc::SIGTERM);
                let _ = guard_process.wait().await;
                break Ending::TimedOut;
            }
            _ = stops.sigint.recv() => {
                guard_process.signal(libc::SIGINT);
                let _ = guard_process.wait().await;
                break Ending::Signalled(libc::SIGINT);
            }
            _ = stops.sigterm.recv() => {
                guard_process.signal(libc::SIGTERM);
                let _ = guard_process.wait().await;
                break Ending::Signalled(libc::SIGTERM);
            }
        }
    };
    drop(datafile);

    // Hand the environment back, saying how COMMAND ended (testenv-agent counts failed jobs
    // and holds their TEs; other workers ignore the data).
    let how = match ending {
        Ending::Command(code) => format!("{COMMAND_EXIT_PREFIX}{code}"),
        _ => String::new(),
    };
    if let Err(e) = job.complete(how).await {
        tracing::warn!(error = %e, "could not complete the callback job; the worker will free the TE when it notices");
    }
    worker.stop();
    if lockenv_open && !matches!(ending, Ending::LeaseLost) {
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
