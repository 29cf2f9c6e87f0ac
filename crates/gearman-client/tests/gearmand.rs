//! Integration tests against a real gearmand (Debian's gearman-job-server).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{within, Gearmand};
use gearman_client::{
    Backoff, Client, Error, JobEvent, JobRequest, Priority, ServerAddr, Worker, WorkerOptions,
};
use tokio::sync::mpsc;

fn fast_worker(servers: Vec<ServerAddr>) -> Worker {
    Worker::with_options(
        servers,
        WorkerOptions {
            client_id: Some("test-worker".into()),
            backoff: Backoff {
                initial: Duration::from_millis(20),
                max: Duration::from_millis(200),
            },
            ..WorkerOptions::default()
        },
    )
}

/// A worker that answers every job of `function` with its data reversed.
fn spawn_reverser(servers: Vec<ServerAddr>, function: &str) -> Worker {
    let worker = fast_worker(servers);
    worker.register(function);
    let w = worker.clone();
    tokio::spawn(async move {
        while let Some(job) = w.grab_job().await {
            let mut out = job.data().to_vec();
            out.reverse();
            let _ = job.complete(out).await;
        }
    });
    worker
}

#[tokio::test]
async fn foreground_round_trip_and_echo() {
    let g = Gearmand::start();
    let _w = spawn_reverser(vec![g.addr()], "reverse");
    let client = within("connect", Client::connect([g.addr()]))
        .await
        .unwrap();
    let out = within("call", client.call("reverse", "hello"))
        .await
        .unwrap();
    assert_eq!(&out[..], b"olleh");
    let echoed = within("echo", client.echo("ping")).await.unwrap();
    assert_eq!(&echoed[..], b"ping");
}

#[tokio::test]
async fn many_concurrent_jobs_on_one_connection() {
    let g = Gearmand::start();
    let _w1 = spawn_reverser(vec![g.addr()], "reverse");
    let _w2 = spawn_reverser(vec![g.addr()], "reverse");
    let client = Client::new([g.addr()]);
    let calls = (0..100).map(|i| {
        let client = client.clone();
        async move {
            let out = client.call("reverse", format!("job-{i}")).await.unwrap();
            assert_eq!(
                out,
                Bytes::from(format!("job-{i}").chars().rev().collect::<String>())
            );
        }
    });
    within("100 calls", futures::future::join_all(calls)).await;
}

#[tokio::test]
async fn data_status_and_warning_reach_the_client() {
    let g = Gearmand::start();
    let worker = fast_worker(vec![g.addr()]);
    worker.register("chatty");
    tokio::spawn(async move {
        let job = worker.grab_job().await.unwrap();
        job.send_data("part1").await.unwrap();
        job.send_status(1, 2).await.unwrap();
        job.send_warning("careful").await.unwrap();
        job.complete("done").await.unwrap();
    });
    let client = Client::new([g.addr()]);
    let mut job = within("submit", client.submit(JobRequest::new("chatty", "x")))
        .await
        .unwrap();
    assert!(job.handle().starts_with("H:"), "{}", job.handle());
    let mut events = Vec::new();
    while let Some(ev) = within("event", job.next_event()).await.unwrap() {
        events.push(ev);
    }
    assert_eq!(
        events,
        vec![
            JobEvent::Data("part1".into()),
            JobEvent::Status {
                numerator: 1,
                denominator: 2
            },
            JobEvent::Warning("careful".into()),
            JobEvent::Complete("done".into()),
        ]
    );
}

#[tokio::test]
async fn exception_and_fail_are_errors() {
    let g = Gearmand::start();
    let worker = fast_worker(vec![g.addr()]);
    worker.register("bad");
    tokio::spawn(async move {
        while let Some(job) = worker.grab_job().await {
            if &job.data()[..] == b"exception" {
                job.exception("boom").await.unwrap();
            } else {
                job.fail().await.unwrap();
            }
        }
    });
    let client = Client::new([g.addr()]);
    let job = within("submit", client.submit(JobRequest::new("bad", "exception")))
        .await
        .unwrap();
    let handle = job.handle().to_string();
    match within("exception", job.result()).await {
        Err(Error::JobException { data, .. }) => assert_eq!(&data[..], b"boom"),
        other => panic!("expected an exception, got {other:?}"),
    }
    // WORK_EXCEPTION ends the job on the server too.
    let st = within("status", client.get_status(&handle)).await.unwrap();
    assert!(!st.known, "{st:?}");
    match within("fail", client.call("bad", "fail")).await {
        Err(Error::JobFailed { handle }) => assert!(handle.starts_with("H:")),
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[tokio::test]
async fn background_job_and_get_status() {
    let g = Gearmand::start();
    let client = Client::new([g.addr()]);
    let handle = within(
        "submit bg",
        client.submit_background(JobRequest::new("slow", "data").unique("bg-1")),
    )
    .await
    .unwrap();
    let st = within("status", client.get_status(&handle)).await.unwrap();
    assert!(st.known && !st.running, "{st:?}");
    let st = within("status unique", client.get_status_unique("bg-1"))
        .await
        .unwrap();
    assert!(st.known && !st.running, "{st:?}");

    let worker = fast_worker(vec![g.addr()]);
    worker.register("slow");
    let (progress_tx, mut progress_rx) = mpsc::channel(1);
    let (finish_tx, mut finish_rx) = mpsc::channel::<()>(1);
    tokio::spawn(async move {
        let job = worker.grab_job().await.unwrap();
        assert_eq!(job.unique(), "bg-1");
        job.send_status(3, 4).await.unwrap();
        progress_tx.send(()).await.unwrap();
        finish_rx.recv().await;
        job.complete("").await.unwrap();
        progress_tx.send(()).await.unwrap();
    });
    within("progress", progress_rx.recv()).await.unwrap();
    let st = within("status", client.get_status(&handle)).await.unwrap();
    assert!(st.known && st.running, "{st:?}");
    assert_eq!((st.numerator, st.denominator), (3, 4));
    finish_tx.send(()).await.unwrap();
    within("completion", progress_rx.recv()).await.unwrap();
    // WORK_COMPLETE was written; give the server its own round trip before asking.
    within("echo", client.echo("sync")).await.unwrap();
    let st = within("status", client.get_status(&handle)).await.unwrap();
    assert!(!st.known, "{st:?}");
    let st = within("status", client.get_status("H:no-such-job"))
        .await
        .unwrap();
    assert!(!st.known && !st.running, "{st:?}");
}

#[tokio::test]
async fn priorities_are_honoured() {
    let g = Gearmand::start();
    let client = Client::new([g.addr()]);
    for (data, prio) in [
        ("low", Priority::Low),
        ("normal", Priority::Normal),
        ("high", Priority::High),
    ] {
        within(
            "submit",
            client.submit_background(JobRequest::new("prio", data).priority(prio)),
        )
        .await
        .unwrap();
    }
    let worker = fast_worker(vec![g.addr()]);
    worker.register("prio");
    let mut order = Vec::new();
    for _ in 0..3 {
        let job = within("grab", worker.grab_job()).await.unwrap();
        order.push(String::from_utf8(job.data().to_vec()).unwrap());
        job.complete("").await.unwrap();
    }
    assert_eq!(order, ["high", "normal", "low"]);
}

#[tokio::test]
async fn foreground_priorities_and_unique_ids() {
    let g = Gearmand::start();
    let client = Client::new([g.addr()]);
    // Two submits with the same unique id coalesce into one job; a third is separate.
    let a = within(
        "a",
        client.submit(
            JobRequest::new("uniq", "a")
                .unique("same")
                .priority(Priority::Low),
        ),
    )
    .await
    .unwrap();
    let b = within(
        "b",
        client.submit(
            JobRequest::new("uniq", "b")
                .unique("same")
                .priority(Priority::Low),
        ),
    )
    .await
    .unwrap();
    let c = within(
        "c",
        client.submit(
            JobRequest::new("uniq", "c")
                .unique("other")
                .priority(Priority::High),
        ),
    )
    .await
    .unwrap();
    assert_eq!(a.handle(), b.handle());
    assert_ne!(a.handle(), c.handle());

    let worker = fast_worker(vec![g.addr()]);
    worker.register("uniq");
    let mut seen = Vec::new();
    for _ in 0..2 {
        let job = within("grab", worker.grab_job()).await.unwrap();
        seen.push((job.unique().to_string(), job.data().clone()));
        let answer = format!("ran {}", job.unique());
        job.complete(answer).await.unwrap();
    }
    assert_eq!(
        seen,
        vec![
            ("other".to_string(), Bytes::from("c")),
            ("same".to_string(), Bytes::from("a"))
        ]
    );
    assert_eq!(&within("a", a.result()).await.unwrap()[..], b"ran same");
    assert_eq!(&within("b", b.result()).await.unwrap()[..], b"ran same");
    assert_eq!(&within("c", c.result()).await.unwrap()[..], b"ran other");
}

#[tokio::test]
async fn worker_reregisters_after_server_restart() {
    let mut g = Gearmand::start();
    let worker = spawn_reverser(vec![g.addr()], "reverse");
    within("worker up", worker.wait_for_server(common::WAIT))
        .await
        .unwrap();
    let client = Client::new([g.addr()]);
    assert_eq!(
        &within("call", client.call("reverse", "ab")).await.unwrap()[..],
        b"ba"
    );

    g.restart();
    // The client's connection died with the old server; it reconnects on the next request.
    // The job waits in the new server's queue until the worker is back and has re-sent CAN_DO.
    let out = within("call after restart", async {
        loop {
            match client.call("reverse", "xyz").await {
                Ok(out) => return out,
                // The first request may still go to the dead connection.
                Err(Error::Disconnected { .. }) => continue,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    assert_eq!(&out[..], b"zyx");
}

#[tokio::test]
async fn client_and_worker_skip_a_dead_server() {
    let g = Gearmand::start();
    // Nothing listens on port 1 (and no test server can take it), so connects are refused.
    let dead = ServerAddr::localhost(1);
    let worker = spawn_reverser(vec![dead.clone(), g.addr()], "reverse");
    within("worker up", worker.wait_for_server(common::WAIT))
        .await
        .unwrap();
    assert_eq!(worker.connected_servers(), 1);
    let client = within("connect", Client::connect([dead.clone(), g.addr()]))
        .await
        .unwrap();
    assert_eq!(
        &within("call", client.call("reverse", "12")).await.unwrap()[..],
        b"21"
    );

    // With no live server at all the error says so, and names what was tried.
    let nobody = Client::new([dead.clone()]);
    let err = within("connect to dead", nobody.echo("x"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NoServer { .. }), "{err}");
    assert!(err.to_string().contains(&dead.to_string()), "{err}");
}

#[tokio::test]
async fn worker_takes_jobs_from_every_server() {
    let g1 = Gearmand::start();
    let g2 = Gearmand::start();
    let worker = spawn_reverser(vec![g1.addr(), g2.addr()], "reverse");
    within("both up", worker.wait_for_all_servers(common::WAIT))
        .await
        .unwrap();
    let c1 = Client::new([g1.addr()]);
    let c2 = Client::new([g2.addr()]);
    assert_eq!(
        &within("g1", c1.call("reverse", "one")).await.unwrap()[..],
        b"eno"
    );
    assert_eq!(
        &within("g2", c2.call("reverse", "two")).await.unwrap()[..],
        b"owt"
    );
}

#[tokio::test]
async fn job_fails_when_its_server_dies_mid_job() {
    let mut g = Gearmand::start();
    let worker = fast_worker(vec![g.addr()]);
    worker.register("hang");
    let (got_tx, mut got_rx) = mpsc::channel(1);
    let w = worker.clone();
    tokio::spawn(async move {
        let job = w.grab_job().await.unwrap();
        got_tx.send(()).await.unwrap();
        // Keep the job until the server is gone, then try to answer.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let err = job.complete("late").await.unwrap_err();
        assert!(matches!(err, Error::Disconnected { .. }), "{err}");
    });
    let client = Client::new([g.addr()]);
    let job = within("submit", client.submit(JobRequest::new("hang", "")))
        .await
        .unwrap();
    within("worker got job", got_rx.recv()).await.unwrap();
    g.kill();
    let err = within("job result", job.result()).await.unwrap_err();
    assert!(matches!(err, Error::Disconnected { .. }), "{err}");
    assert!(err.to_string().contains(&g.addr().to_string()), "{err}");
}

#[tokio::test]
async fn can_do_cant_do_and_pause_at_runtime() {
    let g = Gearmand::start();
    let worker = spawn_reverser(vec![g.addr()], "a");
    within("worker up", worker.wait_for_server(common::WAIT))
        .await
        .unwrap();
    let client = Client::new([g.addr()]);
    assert_eq!(
        &within("a", client.call("a", "1a")).await.unwrap()[..],
        b"a1"
    );

    // Registered while the worker sleeps in its grab loop.
    worker.register_with_timeout("b", 60);
    assert_eq!(
        &within("b", client.call("b", "1b")).await.unwrap()[..],
        b"b1"
    );
    assert_eq!(worker.functions(), ["a", "b"]);

    // Paused: CANT_DO everywhere, so a job stays queued until resume.
    worker.pause();
    within("sync", client.echo("")).await.unwrap();
    let handle = within(
        "bg",
        client.submit_background(JobRequest::new("b", "paused")),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let st = within("status", client.get_status(&handle)).await.unwrap();
    assert!(st.known && !st.running, "paused worker took a job: {st:?}");
    worker.resume();
    within("drained", async {
        while within("status", client.get_status(&handle))
            .await
            .unwrap()
            .known
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    worker.unregister("b");
    worker.reset_abilities();
    assert!(worker.functions().is_empty());
    worker.register("c");
    assert_eq!(
        &within("c", client.call("c", "1c")).await.unwrap()[..],
        b"c1"
    );
}

#[tokio::test]
async fn graceful_stop_lets_the_current_job_finish() {
    let g = Gearmand::start();
    let worker = fast_worker(vec![g.addr()]);
    worker.register("work");
    let client = Client::new([g.addr()]);
    let job = within("submit", client.submit(JobRequest::new("work", "x")))
        .await
        .unwrap();
    let assigned = within("grab", worker.grab_job()).await.unwrap();
    worker.stop();
    assert!(within("grab after stop", worker.grab_job()).await.is_none());
    assigned.complete("finished").await.unwrap();
    assert_eq!(
        &within("result", job.result()).await.unwrap()[..],
        b"finished"
    );
    within("shutdown", worker.shutdown()).await;
    assert_eq!(worker.connected_servers(), 0);
}

#[tokio::test]
async fn dropped_job_is_failed_not_forgotten() {
    let g = Gearmand::start();
    let worker = fast_worker(vec![g.addr()]);
    worker.register("drop");
    let client = Client::new([g.addr()]);
    let job = within("submit", client.submit(JobRequest::new("drop", "")))
        .await
        .unwrap();
    drop(within("grab", worker.grab_job()).await.unwrap());
    let err = within("result", job.result()).await.unwrap_err();
    assert!(matches!(err, Error::JobFailed { .. }), "{err}");
}

#[tokio::test]
async fn server_errors_surface_as_errors() {
    let g = Gearmand::start();
    let client = Client::new([g.addr()]);
    // gearmand refuses unique ids over 64 bytes with ERROR ARGUMENT_TOO_LARGE.
    let req = JobRequest::new("f", "x").unique("u".repeat(1000));
    match within("submit", client.submit_background(req)).await {
        Err(Error::Server { code, .. }) => assert_eq!(code, "ARGUMENT_TOO_LARGE"),
        other => panic!("expected a server error, got {other:?}"),
    }
    // The connection stays usable and replies stay matched to their requests.
    let (a, b) = within(
        "after error",
        futures::future::join(
            client.echo("a"),
            client.submit_background(JobRequest::new("f", "y")),
        ),
    )
    .await;
    assert_eq!(&a.unwrap()[..], b"a");
    assert!(b.unwrap().starts_with("H:"));
}
