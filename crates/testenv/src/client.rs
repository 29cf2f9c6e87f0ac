//! testenv-client: lock a test environment, run COMMAND with `TE_DATAFILE`, hand it back.

use std::ffi::OsString;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use gearman_client::{Client, ClientOptions, ForegroundJob, JobRequest, Worker, WorkerOptions};
use tokio::signal::unix::{signal, SignalKind};

use crate::guard;
use crate::request::{LockRequest, LOCKENV};
use crate::tedata;

/// Exit status when the TE was taken back (lockenv ended) while COMMAND still ran.
pub const EXIT_LEASE_LOST: i32 = 3;
/// How often a lock request that ends without an environment is submitted again.
const MAX_LOCKENV_RETRIES: u32 = 5;
/// Exit status when the local --timeout expired.
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit status when the worker could not provide an environment, as the original.
pub const EXIT_NO_ENV: i32 = 2;

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
    /// Seconds after which the environment is released and COMMAND killed.
    #[arg(short = 't', long, default_value = "10800")]
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
    /// Seconds between passing a signal to COMMAND and killing everything it started.
    #[arg(long, default_value = "10")]
    pub kill_grace: f64,
    /// Seconds between the "waited N s" lines while waiting for a TE.
    #[arg(long, default_value_t = 30.0, hide = true)]
    pub report_interval: f64,
    #[command(flatten)]
    pub tls: crate::TlsArgs,
    /// The command to run while the environment is locked.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<OsString>,
}

/// How a run ended, before it becomes an exit status.
enum Ending {
    Command(i32),
    LeaseLost,
    TimedOut,
    Signalled(i32),
}

pub async fn run(args: ClientArgs) -> anyhow::Result<i32> {
    let started = Instant::now();
    let servers = args.tls.servers(&args.geard)?;
    let jobnum = args
        .jobnum
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let callback = format!("callback_{jobnum}");
    let timeout = args
        .timeout
        .trim()
        .parse::<f64>()
        .map(Duration::from_secs_f64)
        .context("--timeout must be a number of seconds")?;
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
        ..LockRequest::default()
    };

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;

    // The callback must be registered before lockenv is submitted, or a fast worker could
    // submit the callback job before anyone can take it.
    let worker = Worker::with_options(
        servers.clone(),
        WorkerOptions {
            client_id: Some(format!("testenv-client-{jobnum}")),
            ..WorkerOptions::default()
        },
    );
    worker.register(callback.clone());
    let client = Client::with_options(servers.clone(), ClientOptions::default());
    tokio::select! {
        r = async {
            worker.wait_for_server(timeout).await?;
            client.wait_for_server(timeout).await
        } => r.context("no Gearman broker reachable")?,
        _ = sigint.recv() => return Ok(128 + libc::SIGINT),
        _ = sigterm.recv() => return Ok(128 + libc::SIGTERM),
    }
    tracing::info!(%callback, "requesting a test environment");
    let mut lockenv = submit_lockenv(&client, &request).await?;

    // Wait for the environment, re-submitting if the broker holding our request dies.
    let every = Duration::from_secs_f64(args.report_interval.max(0.1));
    let mut report = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut lockenv_retries = 0u32;
    let job = loop {
        tokio::select! {
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
                    tokio::time::sleep(Duration::from_millis(200 * lockenv_retries as u64)).await;
                    lockenv = submit_lockenv(&client, &request).await?;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "lost the broker holding our request; submitting again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    lockenv = submit_lockenv(&client, &request).await?;
                }
            },
            _ = report.tick() => {
                // tebroker answers `position`; other brokers do not, and then we say less.
                let position = if args.tls.ssl_ca.is_none() {
                    queue_position(lockenv.server(), lockenv.handle()).await
                } else {
                    None
                };
                let place = match position {
                    Some((0, _)) => " (a worker has the request)".to_string(),
                    Some((n, total)) => format!(" (position {n} of {total} in the queue)"),
                    None => String::new(),
                };
                eprintln!(
                    "testenv-client: waited {:.0}s for a test environment{place}",
                    started.elapsed().as_secs_f64()
                );
            }
            _ = tokio::time::sleep_until((started + timeout).into()) => {
                eprintln!("testenv-client: timed out after {:.0}s waiting for a test environment", timeout.as_secs_f64());
                return Ok(EXIT_TIMEOUT);
            }
            _ = sigint.recv() => return Ok(128 + libc::SIGINT),
            _ = sigterm.recv() => return Ok(128 + libc::SIGTERM),
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

    let exe = std::env::current_exe().context("cannot find my own executable")?;
    let mut guard_process = tokio::process::Command::new(exe)
        .env(guard::GUARD_ENV, "1")
        .env(
            guard::GRACE_ENV,
            ((args.kill_grace * 1000.0) as u64).to_string(),
        )
        .env("TE_DATAFILE", datafile.path())
        .args(&args.command)
        .spawn()
        .context("cannot start the command")?;
    let guard_pid = guard_process.id().map(|p| p as libc::pid_t);
    let forward = |sig: libc::c_int| {
        if let Some(pid) = guard_pid {
            crate::procs::signal(pid, sig);
        }
    };

    let mut lockenv_open = true;
    let ending = loop {
        tokio::select! {
            status = guard_process.wait() => {
                let code = status.map(exit_code).unwrap_or(1);
                break Ending::Command(code);
            }
            ev = lockenv.next_event(), if lockenv_open => match ev {
                Ok(Some(e)) if e.is_final() => {
                    eprintln!("testenv-client: the testenv worker released the environment while the command was running; killing it");
                    forward(libc::SIGTERM);
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
                    forward(libc::SIGTERM);
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
            _ = tokio::time::sleep_until((started + timeout).into()) => {
                eprintln!("testenv-client: --timeout of {:.0}s reached; killing the command", timeout.as_secs_f64());
                forward(libc::SIGTERM);
                let _ = guard_process.wait().await;
                break Ending::TimedOut;
            }
            _ = sigint.recv() => {
                forward(libc::SIGINT);
                let _ = guard_process.wait().await;
                break Ending::Signalled(libc::SIGINT);
            }
            _ = sigterm.recv() => {
                forward(libc::SIGTERM);
                let _ = guard_process.wait().await;
                break Ending::Signalled(libc::SIGTERM);
            }
        }
    };
    drop(datafile);

    // Hand the environment back.
    if let Err(e) = job.complete("").await {
        tracing::warn!(error = %e, "could not complete the callback job; the worker will free the TE when it notices");
    }
    worker.stop();
    if lockenv_open && !matches!(ending, Ending::LeaseLost) {
        // The worker completes lockenv once it has released the TE; do not wait forever.
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(e)) = lockenv.next_event().await {
                if e.is_final() {
                    break;
                }
            }
        })
        .await;
    }
    Ok(match ending {
        Ending::Command(code) => code,
        Ending::LeaseLost => EXIT_LEASE_LOST,
        Ending::TimedOut => EXIT_TIMEOUT,
        Ending::Signalled(sig) => 128 + sig,
    })
}

async fn submit_lockenv(client: &Client, request: &LockRequest) -> anyhow::Result<ForegroundJob> {
    let mut delay = Duration::from_millis(100);
    loop {
        match client
            .submit(JobRequest::new(LOCKENV, request.to_json()))
            .await
        {
            Ok(job) => return Ok(job),
            Err(e) => {
                tracing::warn!(error = %e, "cannot submit lockenv; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Asks a tebroker where our lock request stands: `position HANDLE` on its admin protocol.
pub async fn queue_position(server: &str, handle: &str) -> Option<(usize, usize)> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect(server).await.ok()?;
        stream
            .write_all(format!("position {handle}\n").as_bytes())
            .await
            .ok()?;
        let mut line = String::new();
        tokio::io::BufReader::new(stream)
            .read_line(&mut line)
            .await
            .ok()?;
        let mut words = line.split_whitespace();
        (words.next()? == "OK").then_some(())?;
        Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
    };
    tokio::time::timeout(Duration::from_secs(2), ask)
        .await
        .ok()
        .flatten()
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}
