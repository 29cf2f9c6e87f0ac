//! Every limit, hit over real sockets: a clear error, a counter in `stats`, and the server goes
//! on serving everyone else.

mod harness;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use gearman_proto::PacketType as T;
use harness::{Server, Stream};

fn header(code: u32, len: u32) -> Vec<u8> {
    let mut h = b"\0REQ".to_vec();
    h.extend_from_slice(&code.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h
}

#[test]
fn max_frame() {
    let mut broker = Server::tebroker_with(&["--max-frame", "1024"]);
    let mut c = broker.connect();
    // At the limit: served.
    let payload = vec![b'x'; 1024];
    c.send(T::EchoReq, &[&payload]);
    assert_eq!(c.recv().arg(0).len(), 1024);
    // Over it: ERROR as soon as the header is in, then closed.
    c.raw(&header(16, 1025)).unwrap();
    let got = c.recv_until_closed();
    assert_eq!(got[0].ptype, T::Error);
    assert_eq!(got[0].arg(0), b"PACKET_TOO_LARGE");
    // A header declaring 4 GiB.
    let mut c = broker.connect();
    c.raw(&header(7, u32::MAX)).unwrap();
    assert_eq!(c.recv_until_closed()[0].arg(0), b"PACKET_TOO_LARGE");
    assert_eq!(broker.stat("frames_too_large"), 2);
    broker.assert_serving();
}

#[test]
fn max_admin_line() {
    let mut broker = Server::tebroker_with(&["--max-admin-line", "64"]);
    let mut c = broker.connect();
    assert!(c.admin("status").ends_with(".\n"));
    c.raw(&[b'a'; 100]).unwrap(); // no newline, over the limit
    let got = c.recv_until_closed();
    assert_eq!(got[0].arg(0), b"LINE_TOO_LONG");
    let mut c = broker.connect();
    c.raw(format!("{}\n", "w".repeat(65)).as_bytes()).unwrap();
    assert_eq!(c.recv_until_closed()[0].arg(0), b"LINE_TOO_LONG");
    assert_eq!(broker.stat("admin_lines_too_long"), 2);
    broker.assert_serving();
}

#[test]
fn max_connections() {
    let broker = Server::tebroker_with(&["--max-connections", "3"]);
    let mut held: Vec<Stream<TcpStream>> = (0..3).map(|_| broker.connect()).collect();
    for c in &mut held {
        c.send(T::EchoReq, &[b"in"]);
        assert_eq!(c.recv().ptype, T::EchoRes);
    }
    // Over the limit: ERROR SERVER_BUSY and closed, at once.
    for _ in 0..5 {
        let mut extra = broker.connect();
        let got = extra.recv_until_closed();
        assert_eq!(got[0].arg(0), b"SERVER_BUSY");
    }
    let stats = held[0].admin("stats");
    assert!(stats.contains("connections_refused\t5\n"), "{stats}");
    // The three admitted ones are still served; when one leaves, a newcomer gets in.
    for c in &mut held {
        c.send(T::EchoReq, &[b"still"]);
        assert_eq!(c.recv().ptype, T::EchoRes);
    }
    held.pop();
    let until = Instant::now() + harness::TIMEOUT;
    loop {
        let mut c = broker.connect();
        c.send(T::EchoReq, &[b"new"]);
        match c.next_frame() {
            Some(gearman_proto::Frame::Packet(p)) if p.ptype == T::EchoRes => break,
            _ => assert!(Instant::now() < until, "the freed slot was never reused"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn max_functions_per_conn() {
    let mut broker = Server::tebroker_with(&["--max-functions-per-conn", "5"]);
    let mut w = broker.connect();
    for i in 0..5 {
        w.send(T::CanDo, &[format!("f{i}").as_bytes()]);
    }
    w.send(T::CanDo, &[b"f0"]); // again: not a new one
    w.send(T::CanDo, &[b"f5"]);
    let e = w.recv();
    assert_eq!(e.ptype, T::Error);
    assert_eq!(e.arg(0), b"TOO_MANY_FUNCTIONS");
    // The connection stays usable, and its five functions work.
    let mut c = broker.connect();
    c.send(T::SubmitJobBg, &[b"f4", b"", b"x"]);
    assert_eq!(c.recv().ptype, T::JobCreated);
    w.send(T::GrabJob, &[]);
    assert_eq!(w.recv().ptype, T::JobAssign);
    assert_eq!(broker.stat("functions_refused"), 1);
    broker.assert_serving();
}

#[test]
fn max_queue_default_and_per_function() {
    let mut broker = Server::tebroker_with(&["--max-queue", "2"]);
    let mut c = broker.connect();
    for _ in 0..2 {
        c.send(T::SubmitJobBg, &[b"q", b"", b"x"]);
        assert_eq!(c.recv().ptype, T::JobCreated);
    }
    c.send(T::SubmitJob, &[b"q", b"", b"x"]);
    let e = c.recv();
    assert_eq!((e.ptype, e.arg(0)), (T::Error, &b"QUEUE_ERROR"[..]));
    // gearmand's admin command sets it per function.
    assert_eq!(c.admin("maxqueue other 1"), "OK\r\n");
    c.send(T::SubmitJobBg, &[b"other", b"", b"x"]);
    assert_eq!(c.recv().ptype, T::JobCreated);
    c.send(T::SubmitJobBg, &[b"other", b"", b"x"]);
    assert_eq!(c.recv().ptype, T::Error);
    assert_eq!(broker.stat("queue_full"), 2);
    broker.assert_serving();
}

#[test]
fn slow_reader_is_cut_off() {
    let cap = 256 * 1024;
    let mut broker = Server::tebroker_with(&["--max-output-buffer", &cap.to_string()]);
    // A client that submits a job and never reads; a small receive buffer makes the kernel's
    // share small, so the broker's own buffer must fill. The output is caused by another
    // connection (the worker's WORK_DATA), so backpressure on the client's own frames cannot
    // hold it back: the hard cap must.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&broker.addr().into()).unwrap();
    let hog: TcpStream = sock.into();
    hog.set_read_timeout(Some(harness::TIMEOUT)).unwrap();
    let mut hog = Stream::new(hog);
    let mut worker = broker.connect();
    worker.send(T::CanDo, &[b"chatty"]);
    hog.send(T::SubmitJob, &[b"chatty", b"", b"go"]);
    let assign = worker.grab_assignment();
    let handle = assign.arg(0).to_vec();
    let chunk = vec![b'z'; 60_000];
    let data = gearman_proto::Packet::req(T::WorkData, [handle, chunk]).to_bytes();
    let mut sent = 0usize;
    while sent < 200 * 1024 * 1024 {
        worker.raw(&data).unwrap();
        sent += data.len();
        if sent % (4 * 1024 * 1024) < data.len() && broker.stat("slow_readers_closed") > 0 {
            break;
        }
    }
    assert!(
        broker.stat("slow_readers_closed") > 0,
        "sent {sent} bytes and the slow reader is still connected"
    );
    broker.wait_stat("slow_readers_closed", 1);
    broker.assert_serving();
    assert!(broker.log_text().contains("slow reader"));
}

#[test]
fn slowloris_is_closed_but_idle_connections_are_not() {
    let mut broker = Server::tebroker_with(&["--partial-packet-timeout", "1"]);
    let mut idle = broker.connect();
    let mut loris = broker.connect();
    let packet = gearman_proto::Packet::req(T::EchoReq, [vec![b'x'; 64]]).to_bytes();
    // One byte every 200 ms: each read makes progress, but the frame never completes in time.
    let start = Instant::now();
    let mut closed_after = None;
    for b in packet.iter() {
        if loris.raw(&[*b]).is_err() {
            closed_after = Some(start.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        if broker.stat("partial_packet_timeouts") > 0 {
            closed_after = Some(start.elapsed());
            break;
        }
    }
    let after = closed_after.expect("the slowloris connection was never closed");
    assert!(
        after < Duration::from_secs(5),
        "closed only after {after:?}"
    );
    let got = loris.recv_until_closed();
    assert_eq!(got[0].arg(0), b"TIMEOUT");
    // A connection that holds no unfinished frame may idle as long as it likes.
    idle.send(T::EchoReq, &[b"idle"]);
    assert_eq!(idle.recv().ptype, T::EchoRes);
    // Nor is a busy one that sends whole packets split over several writes cut off.
    let mut busy = broker.connect();
    for _ in 0..8 {
        busy.raw(&packet[..20]).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        busy.raw(&packet[20..]).unwrap();
        assert_eq!(busy.recv().ptype, T::EchoRes);
    }
    broker.assert_serving();
    let _ = std::io::stdout().flush();
}

#[test]
fn limits_and_security_settings_from_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("tebroker.toml");
    std::fs::write(
        &conf,
        "max_queue = 1\nmax_functions_per_conn = 2\ncallback_protection = false\n",
    )
    .unwrap();
    let broker = Server::tebroker_with(&["--config", conf.to_str().unwrap()]);
    let mut c = broker.connect();
    c.send(T::SubmitJobBg, &[b"q", b"", b"x"]);
    assert_eq!(c.recv().ptype, T::JobCreated);
    c.send(T::SubmitJobBg, &[b"q", b"", b"x"]);
    assert_eq!(c.recv().arg(0), b"QUEUE_ERROR");
    let mut a = broker.connect();
    let mut b = broker.connect();
    a.send(T::CanDo, &[b"callback_1"]);
    b.send(T::CanDo, &[b"callback_1"]); // allowed: protection off
    b.send(T::CanDo, &[b"g"]);
    b.send(T::CanDo, &[b"h"]);
    assert_eq!(b.recv().arg(0), b"TOO_MANY_FUNCTIONS");
    assert_eq!(broker.stat("callback_hijacks_refused"), 0);
}
