//! A malformed-input corpus thrown at the real binary: every case gets an ERROR or a closed
//! connection, never a crash, and the server keeps serving everyone else throughout.

mod harness;

use std::time::Duration;

use gearman_proto::PacketType as T;
use harness::{Rng, Server};

fn header(magic: &[u8; 4], code: u32, len: u32) -> Vec<u8> {
    let mut h = magic.to_vec();
    h.extend_from_slice(&code.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h
}

fn packet(code: u32, body: &[u8]) -> Vec<u8> {
    let mut p = header(b"\0REQ", code, body.len() as u32);
    p.extend_from_slice(body);
    p
}

/// The corpus: (name, bytes to send). Each case runs on its own connection.
fn corpus() -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = vec![
        ("wrong magic".into(), header(b"\0XYZ", 16, 0)),
        ("response magic".into(), header(b"\0RES", 16, 0)),
        ("truncated header".into(), b"\0REQ\0\0".to_vec()),
        ("truncated body".into(), header(b"\0REQ", 7, 100)[..].iter().chain(b"abc").copied().collect()),
        ("oversized header".into(), header(b"\0REQ", 7, u32::MAX)),
        ("unknown type".into(), packet(9999, b"")),
        ("type zero".into(), packet(0, b"")),
        ("submit without NULs".into(), packet(7, b"no separators at all")),
        ("status res without NULs".into(), packet(20, b"x")),
        ("can_do empty".into(), packet(1, b"")),
        ("noop with body".into(), packet(6, b"junk")),
        ("grab with body".into(), packet(9, b"junk")),
        ("invalid utf-8 function".into(), packet(1, b"\xff\xfe\xfd")),
        ("invalid utf-8 submit".into(), packet(7, b"\xff\xfe\0\xc3\x28\0\x80")),
        ("invalid utf-8 admin".into(), b"\xff\xfe status \xc3\x28\n".to_vec()),
        ("admin garbage".into(), b"show\nshow me\ncancel\ncancel job\nmaxqueue\nmaxqueue f x y\nshutdown now\nacl\nacl grant\nacl revoke\n".to_vec()),
        ("bad epoch".into(), packet(36, b"f\0u\0notanumber\0data")),
        ("bad schedule".into(), packet(35, b"f\0u\099\099\099\099\099\0data")),
        ("bad can_do_timeout".into(), packet(23, b"f\0-5")),
        ("work for unknown handle".into(), packet(13, b"H:nowhere:1\0result")),
        ("status of garbage".into(), packet(15, b"\0\0\0")),
        ("option unknown".into(), packet(26, b"frobnicate")),
        ("echo of NULs".into(), packet(16, &[0u8; 300])),
        ("nul then text".into(), b"\0status\n".to_vec()),
        ("lone CR LF".into(), b"\r\n\r\n\n".to_vec()),
    ];
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for i in 0..40 {
        let n = 1 + rng.below(2048) as usize;
        v.push((format!("random bytes #{i}"), rng.bytes(n)));
    }
    for i in 0..40 {
        // Plausible headers with random types, lengths and bodies.
        let code = rng.below(45) as u32;
        let n = rng.below(64) as usize;
        let body = rng.bytes(n);
        let mut p = packet(code, &body);
        if rng.below(4) == 0 {
            p.truncate(rng.below(p.len() as u64) as usize);
        }
        v.push((format!("random packet #{i}"), p));
    }
    v
}

#[test]
fn corpus_never_hurts_the_server() {
    let mut broker =
        Server::tebroker_with(&["--partial-packet-timeout", "2", "--max-frame", "65536"]);
    // A worker and a client in the middle of a job while the corpus flies.
    let mut worker = broker.connect();
    let mut client = broker.connect();
    worker.send(T::CanDo, &[b"steady"]);
    client.send(T::SubmitJob, &[b"steady", b"", b"payload"]);
    assert_eq!(client.recv().ptype, T::JobCreated);
    worker.send(T::GrabJob, &[]);
    let job = worker.recv();
    for (name, bytes) in corpus() {
        let mut c = broker.connect();
        let _ = c.raw(&bytes);
        // Half-close: the server sees EOF after the bytes, whatever state they left it in.
        let _ = c.stream.shutdown(std::net::Shutdown::Write);
        let _ = c.recv_until_closed();
        assert!(broker.alive(), "tebroker died on {name}");
    }
    // Same corpus, all at once, connections left open.
    let mut open = Vec::new();
    for (_, bytes) in corpus() {
        let mut c = broker.connect();
        let _ = c.raw(&bytes);
        open.push(c);
    }
    broker.assert_serving();
    drop(open);
    worker.send(T::WorkComplete, &[job.arg(0), b"done"]);
    let done = client.recv();
    assert_eq!((done.ptype, done.arg(1)), (T::WorkComplete, &b"done"[..]));
    assert!(broker.stat("protocol_errors") > 10);
    broker.assert_serving();
}

#[test]
fn errors_are_errors_not_silence() {
    let broker = Server::tebroker_with(&[]);
    let cases: [(&str, Vec<u8>, &[u8]); 5] = [
        ("wrong magic", header(b"\0XYZ", 16, 0), b"INVALID_MAGIC"),
        (
            "oversized",
            header(b"\0REQ", 7, u32::MAX),
            b"PACKET_TOO_LARGE",
        ),
        ("unknown type", packet(9999, b""), b"INVALID_PACKET"),
        ("no NULs", packet(7, b"abc"), b"INVALID_PACKET"),
        ("response magic", header(b"\0RES", 16, 0), b"INVALID_MAGIC"),
    ];
    for (name, bytes, code) in cases {
        let mut c = broker.connect();
        c.raw(&bytes).unwrap();
        let p = c.recv();
        assert_eq!(p.ptype, T::Error, "{name}");
        assert_eq!(p.arg(0), code, "{name}");
    }
}

#[test]
fn ten_thousand_can_dos_on_one_connection() {
    let mut broker = Server::tebroker_with(&[]);
    let mut w = broker.connect();
    let mut all = Vec::new();
    for i in 0..10_000 {
        all.extend(packet(1, format!("fn_{i}").as_bytes()));
    }
    w.raw(&all).unwrap();
    w.send(T::EchoReq, &[b"after"]);
    assert_eq!(
        w.recv().ptype,
        T::EchoRes,
        "all 10,000 accepted without an error"
    );
    assert_eq!(broker.stat("functions"), 10_000);
    // Others are served promptly meanwhile, and the worker still gets work.
    let mut c = broker.connect();
    let t = std::time::Instant::now();
    c.send(T::SubmitJobBg, &[b"fn_9999", b"", b"x"]);
    assert_eq!(c.recv().ptype, T::JobCreated);
    w.send(T::GrabJob, &[]);
    let job = w.recv();
    assert_eq!(job.ptype, T::JobAssign);
    assert!(t.elapsed() < Duration::from_secs(2));
    w.send(T::WorkComplete, &[job.arg(0), b""]);
    // Past the default limit (16384), CAN_DO is refused with an error.
    let mut more = Vec::new();
    for i in 10_000..16_385 {
        more.extend(packet(1, format!("fn_{i}").as_bytes()));
    }
    w.raw(&more).unwrap();
    let e = w.recv();
    assert_eq!((e.ptype, e.arg(0)), (T::Error, &b"TOO_MANY_FUNCTIONS"[..]));
    drop(w);
    let until = std::time::Instant::now() + harness::TIMEOUT;
    while broker.stat("functions") != 0 {
        assert!(
            std::time::Instant::now() < until,
            "functions of a gone worker linger"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    broker.assert_serving();
}

#[test]
fn slowloris_connections_are_closed_while_others_are_served() {
    let mut broker = Server::tebroker_with(&["--partial-packet-timeout", "1"]);
    let mut lorises: Vec<_> = (0..20).map(|_| broker.connect()).collect();
    for (i, l) in lorises.iter_mut().enumerate() {
        // Half a header, half an admin line, or a header promising a body.
        let bytes: &[u8] = match i % 3 {
            0 => b"\0RE",
            1 => b"stat",
            _ => b"\0REQ\0\0\0\x10\0\0\0\x05ab",
        };
        l.raw(bytes).unwrap();
    }
    for _ in 0..3 {
        broker.assert_serving();
        std::thread::sleep(Duration::from_millis(200));
    }
    for l in &mut lorises {
        assert!(l.closed_within(Duration::from_secs(5)));
    }
    broker.wait_stat("partial_packet_timeouts", 20);
    broker.assert_serving();
}
