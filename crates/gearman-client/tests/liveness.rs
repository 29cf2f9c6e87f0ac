//! A server that stops answering while its socket stays open (SIGSTOP: the kernel still
//! accepts and acknowledges, the process reads nothing) is noticed by the liveness probe, by
//! clients (the job fails) and by workers (the link drops and reconnects).

mod common;

use std::time::{Duration, Instant};

use common::{within, Gearmand, WAIT};
use gearman_client::{
    admin, Client, ClientOptions, Error, JobRequest, Keepalive, Liveness, Worker, WorkerOptions,
};

/// Probes after 300 ms of silence, answered within 500 ms: a hung server is noticed in < 1 s.
fn quick() -> Liveness {
    Liveness {
        keepalive: Some(Keepalive::default()),
        probe_idle: Some(Duration::from_millis(300)),
        probe_timeout: Duration::from_millis(500),
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: plain kill(2) on the server process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

/// Waits until the server's `status` lists `function` with a worker.
async fn wait_registered(g: &Gearmand, function: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let lines = admin::query(&g.addr(), "status", WAIT).await.unwrap();
        if lines.iter().any(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            f.len() == 4 && f[0] == function && f[3] != "0"
        }) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{function} never registered: {lines:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_stopped_server_fails_the_waiting_job_and_drops_the_worker_link() {
    let g = Gearmand::start();
    let worker = Worker::with_options(
        [g.addr()],
        WorkerOptions {
            liveness: quick(),
            ..WorkerOptions::default()
        },
    );
    worker.register("liveness_registered");
    within("worker connected", worker.wait_for_server(WAIT))
        .await
        .unwrap();
    wait_registered(&g, "liveness_registered").await;
    let client = Client::with_options(
        [g.addr()],
        ClientOptions {
            liveness: quick(),
            ..ClientOptions::default()
        },
    );
    // Nobody does this function: the job stays queued, its client waits.
    let mut job = within(
        "submit",
        client.submit(JobRequest::new("liveness_nobody_runs_this", "x")),
    )
    .await
    .unwrap();

    signal(g.server_pid(), libc::SIGSTOP);
    let stopped = Instant::now();
    let err = within("the waiting job fails", job.next_event())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Disconnected { reason, .. } if reason.contains("liveness probe")),
        "{err}"
    );
    let deadline = Instant::now() + WAIT;
    while worker.connected_servers() > 0 {
        assert!(
            Instant::now() < deadline,
            "the worker still counts the stopped server as connected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("noticed within {:?}", stopped.elapsed());

    // Once the server runs again, the worker is back.
    signal(g.server_pid(), libc::SIGCONT);
    within("worker reconnected", worker.wait_for_server(WAIT))
        .await
        .unwrap();
}
