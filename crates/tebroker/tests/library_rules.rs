//! The broker's rules as seen through our own client/worker library, over real sockets.

mod harness;

use std::time::Duration;

use gearman_client::{Client, Error, JobEvent, JobRequest, Priority, ServerAddr, Worker};
use harness::{Server, TIMEOUT};

/// Every async body gets one deadline, so no await in it can hang the test.
fn run<F: std::future::Future>(body: F) -> F::Output {
    test_support::block_on_within(Duration::from_secs(60), body)
}

#[test]
fn coalesced_foreground_jobs_share_every_event() {
    let server = Server::tebroker();
    let addr = ServerAddr::localhost(server.port);
    run(async {
        let worker = Worker::new([addr.clone()]);
        worker.register("shared");
        worker.wait_for_server(TIMEOUT).await.unwrap();
        let a = Client::connect([addr.clone()]).await.unwrap();
        let b = Client::connect([addr.clone()]).await.unwrap();
        let mut ja = a
            .submit(JobRequest::new("shared", "x").unique("same"))
            .await
            .unwrap();
        let job = worker.grab_job().await.unwrap();
        let mut jb = b
            .submit(JobRequest::new("shared", "x").unique("same"))
            .await
            .unwrap();
        assert_eq!(ja.handle(), jb.handle());
        job.send_status(1, 2).await.unwrap();
        job.complete("result").await.unwrap();
        for j in [&mut ja, &mut jb] {
            assert_eq!(
                j.next_event().await.unwrap(),
                Some(JobEvent::Status {
                    numerator: 1,
                    denominator: 2
                })
            );
            assert_eq!(
                j.next_event().await.unwrap(),
                Some(JobEvent::Complete("result".into()))
            );
        }
    });
}

#[test]
fn priorities_are_served_high_normal_low() {
    let server = Server::tebroker();
    let addr = ServerAddr::localhost(server.port);
    run(async {
        let client = Client::connect([addr.clone()]).await.unwrap();
        for (p, d) in [
            (Priority::Low, "low"),
            (Priority::Normal, "normal"),
            (Priority::High, "high"),
        ] {
            client
                .submit_background(JobRequest::new("prio", d).priority(p))
                .await
                .unwrap();
        }
        let worker = Worker::new([addr.clone()]);
        worker.register("prio");
        let mut order = Vec::new();
        for _ in 0..3 {
            let job = worker.grab_job().await.unwrap();
            order.push(String::from_utf8_lossy(job.data()).into_owned());
            job.complete("").await.unwrap();
        }
        assert_eq!(order, ["high", "normal", "low"]);
    });
}

#[test]
fn a_dead_worker_fails_foreground_jobs_and_requeues_background_ones() {
    let server = Server::tebroker();
    let addr = ServerAddr::localhost(server.port);
    run(async {
        let client = Client::connect([addr.clone()]).await.unwrap();
        let fg = client
            .submit(JobRequest::new("fragile", "fg"))
            .await
            .unwrap();
        client
            .submit_background(JobRequest::new("fragile", "bg"))
            .await
            .unwrap();
        // A raw worker connection that takes both jobs and then vanishes.
        let mut raw = harness::Conn::connect(server.port);
        raw.req(gearman_proto::PacketType::CanDo, &["fragile"]);
        raw.req(gearman_proto::PacketType::GrabJob, &[] as &[&str]);
        raw.expect(gearman_proto::PacketType::JobAssign);
        raw.req(gearman_proto::PacketType::GrabJob, &[] as &[&str]);
        raw.expect(gearman_proto::PacketType::JobAssign);
        drop(raw);
        let err = tokio::time::timeout(TIMEOUT, fg.result())
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, Error::JobFailed { .. }), "{err:?}");
        let worker = Worker::new([addr.clone()]);
        worker.register("fragile");
        let job = tokio::time::timeout(TIMEOUT, worker.grab_job())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            &job.data()[..],
            b"bg",
            "the background job survived its worker"
        );
        job.complete("").await.unwrap();
    });
}

#[test]
fn a_client_fails_over_to_the_second_broker() {
    let first = Server::tebroker();
    let second = Server::tebroker();
    let servers = [
        ServerAddr::localhost(first.port),
        ServerAddr::localhost(second.port),
    ];
    run(async {
        let worker = Worker::new(servers.clone());
        worker.register("echo");
        worker.wait_for_all_servers(TIMEOUT).await.unwrap();
        let w = worker.clone();
        tokio::spawn(async move {
            while let Some(job) = w.grab_job().await {
                let data = job.data().clone();
                job.complete(data).await.ok();
            }
        });
        let client = Client::connect(servers.clone()).await.unwrap();
        assert_eq!(&client.call("echo", "one").await.unwrap()[..], b"one");
        drop(first);
        // Retried until the client has noticed the dead server, with a deadline rather than a
        // fixed number of attempts.
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        let answered = loop {
            match client.call("echo", "two").await {
                Ok(data) => break data,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "no answer through the remaining server: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        assert_eq!(&answered[..], b"two");
    });
    drop(second);
}
