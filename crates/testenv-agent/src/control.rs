//! How operators reach the agent: the local control socket (JSON lines of `ControlCommand` /
//! `ControlReply`), the Gearman control function `testenv-agent:ctl:<agent>` on every broker,
//! and state reports to the brokers that are tebroker.

use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use gearman_client::{Client, JobRequest, ServerAddr, Worker, WorkerOptions};
use testenv_proto::agent::{
    control_function, ControlCommand, ControlReply, REPORT_FUNCTION, REPORT_INTERVAL_SECS,
    TEBROKER_VERSION_PREFIX,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::pool::Pool;

/// The longest command line accepted on the control socket.
const MAX_COMMAND: usize = 64 * 1024;

fn answer(pool: &Pool, data: &[u8], via: &str) -> ControlReply {
    match ControlCommand::parse(data) {
        Ok(mut cmd) => {
            if cmd.requested_by.is_none() {
                cmd.requested_by = Some(via.to_string());
            }
            pool.apply(&cmd)
        }
        Err(e) => ControlReply {
            ok: false,
            message: e.to_string(),
            report: None,
        },
    }
}

/// Serves the control socket until the agent stops.
pub async fn serve_socket(pool: Rc<Pool>, path: &Path) -> anyhow::Result<()> {
    // A socket file left by a crashed agent is in the way; one a running agent listens on is
    // not ours to take.
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!(
            "control_socket {}: another agent is listening there",
            path.display()
        );
    }
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("control_socket {}: {e}", path.display()))?;
    tokio::task::spawn_local(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let pool = pool.clone();
            tokio::task::spawn_local(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read.take(MAX_COMMAND as u64 * 16)).lines();
                while let Ok(Ok(Some(line))) =
                    tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await
                {
                    if line.len() > MAX_COMMAND {
                        break;
                    }
                    let reply = answer(&pool, line.as_bytes(), "ctl");
                    let mut out = reply.to_json();
                    out.push('\n');
                    if write.write_all(out.as_bytes()).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}

/// Takes control jobs on every broker.
pub fn serve_gearman(pool: Rc<Pool>, servers: Vec<ServerAddr>) -> Worker {
    let worker = Worker::with_options(
        servers,
        WorkerOptions {
            client_id: Some(format!("testenv-agent-ctl-{}", pool.agent)),
            ..WorkerOptions::default()
        },
    );
    worker.register(control_function(&pool.agent));
    let w = worker.clone();
    tokio::task::spawn_local(async move {
        while let Some(job) = w.grab_job().await {
            let reply = answer(&pool, job.data(), "gearman");
            if let Err(e) = job.complete(reply.to_json()).await {
                tracing::warn!(error = %e, "cannot answer a control job");
            }
        }
    });
    worker
}

/// Whether `server` is tebroker (its admin `version` says so).
async fn is_tebroker(server: &ServerAddr) -> bool {
    match gearman_client::admin::query(server, "version", Duration::from_secs(5)).await {
        // Older tebroker versions answer `OK 0.1.0 (tebroker)`.
        Ok(lines) => lines.first().is_some_and(|l| {
            let v = l.trim_start_matches("OK ");
            v.starts_with(TEBROKER_VERSION_PREFIX) || v.ends_with("(tebroker)")
        }),
        Err(_) => false,
    }
}

/// Sends a report to every tebroker among `servers` on every change (at most a few a second)
/// and every [`REPORT_INTERVAL_SECS`]. Which brokers are tebroker is asked again at every
/// periodic report, so a broker restarted as something else (or started later) is followed.
pub fn report_forever(pool: Rc<Pool>, servers: Vec<ServerAddr>) {
    tokio::task::spawn_local(async move {
        let clients: Vec<(ServerAddr, Client)> = servers
            .iter()
            .map(|s| (s.clone(), Client::new([s.clone()])))
            .collect();
        let mut tebrokers: Vec<bool> = vec![false; clients.len()];
        let every = Duration::from_secs(REPORT_INTERVAL_SECS);
        let mut periodic = tokio::time::interval(every);
        loop {
            let full = tokio::select! {
                _ = periodic.tick() => true,
                _ = pool.changed.notified() => false,
            };
            if full {
                for (k, (server, _)) in clients.iter().enumerate() {
                    tebrokers[k] = is_tebroker(server).await;
                }
            }
            let report = pool.report().to_json();
            for (k, (server, client)) in clients.iter().enumerate() {
                if !tebrokers[k] {
                    continue;
                }
                let send =
                    client.submit_background(JobRequest::new(REPORT_FUNCTION, report.clone()));
                match tokio::time::timeout(Duration::from_secs(5), send).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(%server, error = %e, "cannot send a state report")
                    }
                    Err(_) => tracing::debug!(%server, "sending a state report timed out"),
                }
            }
            // Coalesce bursts of changes into one report.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}
