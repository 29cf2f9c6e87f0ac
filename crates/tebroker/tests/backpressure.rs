//! Backpressure: a peer that does not read its socket stops being served until it does, so it
//! costs the broker little memory and (a worker) takes no more jobs than it can be sent.

mod harness;

use std::io::Write;
use std::net::TcpStream;

use gearman_proto::PacketType as T;
use harness::{wait_until, Server, Stream};
use test_support::{admin, parse_status};

const JOBS: usize = 2000;
const JOB_SIZE: usize = 4096;
/// What a worker that never reads may hold (600 KiB): the 64 KiB high-water mark plus what the
/// socket buffers absorb (about 63 jobs in all when measured); far below the 2,000 jobs
/// (8 MiB) it asks for.
const STUCK_MAX: usize = 150;

fn running(broker: &Server, function: &str) -> usize {
    parse_status(&admin(broker.addr(), "status"))
        .into_iter()
        .find(|row| row.function == function)
        .map_or(0, |row| row.running as usize)
}

fn small_receive_buffer(broker: &Server) -> Stream<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&broker.addr().into()).unwrap();
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(harness::TIMEOUT)).unwrap();
    s.set_write_timeout(Some(harness::TIMEOUT)).unwrap();
    Stream::new(s)
}

#[test]
fn a_worker_that_never_reads_gets_only_a_few_jobs() {
    let mut broker = Server::tebroker_with(&[]);
    let function = "backpressure";
    let mut client = broker.connect();
    let payload = vec![b'j'; JOB_SIZE];
    let mut submits = Vec::new();
    for i in 0..JOBS {
        let unique = format!("u{i}");
        submits.extend_from_slice(
            &gearman_proto::Packet::req(
                T::SubmitJobBg,
                [
                    function.as_bytes().to_vec(),
                    unique.into_bytes(),
                    payload.clone(),
                ],
            )
            .to_bytes(),
        );
    }
    client.raw(&submits).unwrap();
    for _ in 0..JOBS {
        assert_eq!(client.recv().ptype, T::JobCreated);
    }

    // Asks for every job at once, then reads nothing.
    let mut stuck = small_receive_buffer(&broker);
    stuck.send(T::CanDo, &[function.as_bytes()]);
    let grab = gearman_proto::Packet::req(T::GrabJob, Vec::<Vec<u8>>::new()).to_bytes();
    stuck.stream.write_all(&grab.repeat(JOBS)).unwrap();
    wait_until("the stuck worker is assigned its first job", || {
        (running(&broker, function) > 0).then_some(())
    });

    // A normal worker takes whatever is left, until the queue is empty.
    let mut worker = broker.connect();
    worker.send(T::CanDo, &[function.as_bytes()]);
    let mut done = 0;
    loop {
        worker.send(T::GrabJob, &[]);
        let p = worker.recv();
        match p.ptype {
            T::JobAssign => {
                assert_eq!(p.arg(2).len(), JOB_SIZE);
                worker.send(T::WorkComplete, &[p.arg(0), b""]);
                done += 1;
            }
            T::NoJob => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let held = JOBS - done;
    assert_eq!(
        running(&broker, function),
        held,
        "the jobs not done by the normal worker are the stuck one's"
    );
    assert!(
        held <= STUCK_MAX,
        "the worker that never reads holds {held} jobs ({} KiB); the normal one did {done}",
        held * JOB_SIZE / 1024
    );

    // Once it reads, it is served again: it gets the jobs it holds, then NO_JOB for the rest
    // of its GRAB_JOBs.
    let mut assigned = 0;
    let mut no_job = 0;
    while assigned + no_job < JOBS {
        let p = stuck.recv();
        match p.ptype {
            T::JobAssign => assigned += 1,
            T::NoJob => no_job += 1,
            T::Noop => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(assigned, held, "every job it held reached it, and no other");
    broker.assert_serving();
    assert_eq!(
        broker.stat("slow_readers_closed"),
        0,
        "held back, not cut off"
    );
}

#[test]
fn a_client_that_floods_echoes_without_reading_is_held_back() {
    let mut broker = Server::tebroker_with(&[]);
    let mut hog = small_receive_buffer(&broker);
    // The stall is expected: a short write timeout ends it.
    hog.stream
        .set_write_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    let echo = gearman_proto::Packet::req(T::EchoReq, [vec![b'z'; 60_000]]).to_bytes();
    // The broker stops reading from the hog once 64 KiB of answers wait for it, so the hog's
    // own socket fills and its writes stall; without backpressure the broker would read on
    // and buffer answers up to the 64 MiB cap.
    let mut sent = 0usize;
    let stalled = loop {
        match hog.stream.write_all(&echo) {
            Ok(()) => sent += echo.len(),
            Err(e) => break e,
        }
        assert!(
            sent < 48 * 1024 * 1024,
            "wrote {sent} bytes of echo requests without reading: the broker never stopped reading"
        );
    };
    assert!(
        matches!(
            stalled.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{stalled}"
    );
    broker.assert_serving();
    assert_eq!(broker.stat("slow_readers_closed"), 0);
}
