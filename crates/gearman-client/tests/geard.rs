//! Interoperability with PyPI gear's `geard`, the server the original testenv system ran. It
//! ignores OPTION_REQ (and ECHO_REQ), which the client must survive.

mod common;

use common::{within, Gearmand, Kind};
use gearman_client::{Client, JobEvent, JobRequest, Worker};

#[tokio::test]
async fn round_trip_events_and_background_jobs_with_geard() {
    let g = Gearmand::start_kind(Kind::Geard);
    let worker = Worker::new([g.addr()]);
    worker.register("lockenv");
    let w = worker.clone();
    tokio::spawn(async move {
        while let Some(job) = w.grab_job().await {
            job.send_status(1, 2).await.unwrap();
            let answer = format!("locked {}", String::from_utf8_lossy(job.data()));
            job.complete(answer).await.unwrap();
        }
    });
    let client = Client::new([g.addr()]);
    let mut job = within(
        "submit",
        client.submit(JobRequest::new("lockenv", "te1").unique("u1")),
    )
    .await
    .unwrap();
    let mut events = Vec::new();
    while let Some(ev) = within("event", job.next_event()).await.unwrap() {
        events.push(ev);
    }
    assert_eq!(
        events,
        vec![
            JobEvent::Status {
                numerator: 1,
                denominator: 2
            },
            JobEvent::Complete("locked te1".into()),
        ]
    );
    let handle = within(
        "bg",
        client.submit_background(JobRequest::new("lockenv", "te2")),
    )
    .await
    .unwrap();
    within("drained", async {
        while within("status", client.get_status(&handle))
            .await
            .unwrap()
            .known
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}
