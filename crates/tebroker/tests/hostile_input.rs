//! Hostile input over TCP against a running tebroker: random bytes, wrong magic, truncated
//! headers, huge declared sizes, unknown packet types, too few arguments, admin garbage, invalid
//! UTF-8. After each, the broker must still be running, a fresh well-behaved connection must get
//! correct answers (ECHO and a full job round trip through a raw-socket worker), and its log
//! must show no panic.

mod harness;

use std::time::Duration;

use bytes::Bytes;
use gearman_proto::{Frame, Packet, PacketType};
use harness::{check_round_trip, expect_error_packet, Conn, Got, Server};

/// How long a connection that must be closed by the server may stay open.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

fn still_serving(server: &mut Server) {
    server.assert_alive();
    check_round_trip(server.port);
    server.assert_alive();
    server.assert_no_panic_in_log();
}

fn header(magic: &[u8; 4], code: u32, len: u32) -> Vec<u8> {
    let mut h = magic.to_vec();
    h.extend_from_slice(&code.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h
}

fn raw_packet(code: u32, body: &[u8]) -> Vec<u8> {
    let mut p = header(b"\0REQ", code, body.len() as u32);
    p.extend_from_slice(body);
    p
}

/// After an unrecoverable error the server must say so (ERROR packet) and close.
fn expect_error_then_close(c: &mut Conn, context: &str) -> (String, String) {
    let got = c.next(harness::TIMEOUT);
    let err = expect_error_packet(got, context);
    let (rest, closed) = c.drain(CLOSE_WAIT);
    assert!(
        closed,
        "{context}: connection still open {CLOSE_WAIT:?} after the ERROR packet (then got {rest:?})"
    );
    assert!(rest.is_empty(), "{context}: more after the ERROR: {rest:?}");
    err
}

/// Deterministic xorshift generator: no extra dependency, reproducible failures.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn random_bytes_never_hurt_the_broker() {
    let mut server = Server::tebroker();
    let mut rng = Rng(0x5eed_7eb5_0c3e_u64);
    for round in 0..6 {
        // A batch of connections at once, each sending random garbage then half-closing.
        let mut conns = Vec::new();
        for i in 0..10 {
            let len = 1 + rng.below(3000) as usize;
            let mut data = rng.bytes(len);
            match i % 3 {
                // Binary-looking: valid magic, random rest.
                0 => {
                    let mut v = b"\0REQ".to_vec();
                    v.append(&mut data);
                    data = v;
                }
                // Text-looking: non-NUL first byte.
                1 => data[0] = b'a' + (data[0] % 26),
                _ => {}
            }
            let mut c = server.conn();
            // The server may close early; a failed write is fine.
            let _ = c.try_send_raw(&data);
            c.shutdown_write();
            conns.push((round, i, data, c));
        }
        for (round, i, data, mut c) in conns {
            // Answers may be ERROR packets or admin ERR lines; then the server must close
            // (the client has half-closed, nothing more can come).
            let mut closed = false;
            let deadline = std::time::Instant::now() + CLOSE_WAIT;
            while std::time::Instant::now() < deadline {
                match c.next(CLOSE_WAIT) {
                    Got::Closed => {
                        closed = true;
                        break;
                    }
                    Got::Frame(_) => {}
                    Got::Nothing => break,
                    Got::Garbage(g) => panic!("round {round} conn {i}: server sent {g}"),
                }
            }
            assert!(
                closed,
                "round {round} conn {i}: server kept a half-closed connection open after \
                 {} random bytes (first 16: {:?})",
                data.len(),
                &data[..data.len().min(16)]
            );
        }
        still_serving(&mut server);
    }
}

#[test]
fn wrong_magic_gets_error_and_close() {
    let mut server = Server::tebroker();
    for magic in [b"\0REX", b"\0res", b"\0\0\0\0", b"\0QER"] {
        let mut c = server.conn();
        let mut bytes = header(magic, 16, 4);
        bytes.extend_from_slice(b"ping");
        c.send_raw(&bytes);
        let (code, text) = expect_error_then_close(&mut c, &format!("magic {magic:?}"));
        assert!(
            code.contains("MAGIC"),
            "magic {magic:?}: ERROR code {code:?} ({text})"
        );
        still_serving(&mut server);
    }
    // A bad magic alone, before a whole header arrived.
    let mut c = server.conn();
    c.send_raw(b"\0XYZ");
    expect_error_then_close(&mut c, "4 bytes of bad magic");
    still_serving(&mut server);
}

#[test]
fn response_magic_from_a_client_is_refused_or_ignored_safely() {
    let mut server = Server::tebroker();
    let mut c = server.conn();
    // A \0RES packet sent *to* the server: must not crash or be taken as a request.
    c.send(&Packet::res(PacketType::JobCreated, ["H:fake:1"]));
    c.send(&Packet::res(PacketType::WorkComplete, ["H:fake:1", "x"]));
    // ERROR answers (or a close) are fine; the ECHO after them shows nothing else came back.
    let _ = c.try_send_raw(&Packet::req(PacketType::EchoReq, ["after"]).to_bytes());
    loop {
        match c.next(harness::TIMEOUT) {
            Got::Frame(Frame::Packet(p)) if p.ptype == PacketType::Error => continue,
            Got::Frame(Frame::Packet(p)) if p.ptype == PacketType::EchoRes => break,
            Got::Closed => break,
            other => panic!("unexpected answer to a \\0RES packet: {other:?}"),
        }
    }
    still_serving(&mut server);
}

#[test]
fn truncated_headers_and_bodies_are_dropped_at_eof() {
    let mut server = Server::tebroker();
    let echo = raw_packet(16, b"hello");
    // Every prefix of a header, then every short body.
    let mut cuts: Vec<usize> = (1..12).collect();
    cuts.extend([12, 13, 16]);
    for cut in cuts {
        let mut c = server.conn();
        c.send_raw(&echo[..cut]);
        c.shutdown_write();
        let (frames, closed) = c.drain(CLOSE_WAIT);
        assert!(
            closed,
            "connection with {cut} of {} bytes then EOF still open; got {frames:?}",
            echo.len()
        );
        for f in &frames {
            assert!(
                matches!(f, Frame::Packet(p) if p.ptype == PacketType::Error),
                "truncated at {cut}: unexpected answer {f:?}"
            );
        }
    }
    // A truncated header on a connection left open must not block anybody else.
    let mut hanging = server.conn();
    hanging.send_raw(&echo[..7]);
    let mut hanging_body = server.conn();
    hanging_body.send_raw(&header(b"\0REQ", 7, 1000));
    hanging_body.send_raw(b"fn\0\0");
    still_serving(&mut server);
    drop((hanging, hanging_body));
    still_serving(&mut server);
}

#[test]
fn declared_size_over_max_frame_gets_error_and_close() {
    let mut server = Server::tebroker_with(&["--max-frame", "1024"]);
    // At the limit: fine.
    let mut c = server.conn();
    c.echo(&[b'x'; 1024]);
    // Over the limit, body never sent: the header alone must be refused.
    for len in [1025u32, 1 << 20, u32::MAX] {
        let mut c = server.conn();
        c.send_raw(&header(b"\0REQ", PacketType::SubmitJob as u32, len));
        let (code, text) = expect_error_then_close(&mut c, &format!("declared length {len}"));
        assert!(
            code.contains("LARGE") || code.contains("SIZE") || code.contains("LIMIT"),
            "declared length {len}: ERROR {code:?} {text:?} should name the size problem"
        );
        still_serving(&mut server);
    }
    // Over the limit with the body actually sent.
    let mut c = server.conn();
    let _ = c.try_send_raw(&raw_packet(PacketType::EchoReq as u32, &[b'y'; 4096]));
    expect_error_then_close(&mut c, "4096-byte ECHO_REQ over a 1024 limit");
    still_serving(&mut server);
}

#[test]
fn huge_declared_size_with_default_limit() {
    let mut server = Server::tebroker();
    let mut c = server.conn();
    c.send_raw(&header(b"\0REQ", PacketType::EchoReq as u32, u32::MAX));
    expect_error_then_close(&mut c, "declared length u32::MAX with the default limit");
    let mut c = server.conn();
    c.send_raw(&header(
        b"\0REQ",
        PacketType::EchoReq as u32,
        16 * 1024 * 1024 + 1,
    ));
    expect_error_then_close(&mut c, "declared length 16 MiB + 1 with the default limit");
    still_serving(&mut server);
}

#[test]
fn unknown_packet_types_get_error_and_connection_stays_usable() {
    let mut server = Server::tebroker();
    let mut c = server.conn();
    for code in [0u32, 5, 43, 99, 1000, 0x7fff_ffff, u32::MAX] {
        c.send_raw(&raw_packet(code, b"some\0args"));
        let got = c.next(harness::TIMEOUT);
        expect_error_packet(got, &format!("unknown packet type {code}"));
        c.echo(format!("after type {code}").as_bytes());
    }
    // An unknown type with an empty body, then a known packet in the same write.
    let mut both = raw_packet(77, b"");
    both.extend_from_slice(&raw_packet(16, b"same-write"));
    c.send_raw(&both);
    expect_error_packet(c.next(harness::TIMEOUT), "unknown type 77 (empty body)");
    let p = c.expect(PacketType::EchoRes);
    assert_eq!(p.arg(0), b"same-write");
    still_serving(&mut server);
}

#[test]
fn server_only_packet_types_from_a_client_get_error() {
    // Types a server sends but never receives: a client sending them is confused; the broker
    // must say so (ERROR) rather than stay silent, and keep the connection usable.
    let mut server = Server::tebroker();
    let mut c = server.conn();
    for (t, args) in [
        (PacketType::JobCreated, vec!["H:x:1"]),
        (PacketType::NoJob, vec![]),
        (PacketType::Noop, vec![]),
        (PacketType::EchoRes, vec!["x"]),
        (PacketType::StatusRes, vec!["H:x:1", "1", "0", "0", "0"]),
        (PacketType::JobAssign, vec!["H:x:1", "f", "d"]),
    ] {
        c.send(&Packet::req(
            t,
            args.into_iter()
                .map(|a: &'static str| Bytes::from_static(a.as_bytes()))
                .collect::<Vec<_>>(),
        ));
        expect_error_packet(c.next(harness::TIMEOUT), &format!("{t} sent as a request"));
        c.echo(t.name().as_bytes());
    }
    still_serving(&mut server);
}

#[test]
fn too_few_arguments_get_error() {
    let mut server = Server::tebroker();
    let cases: Vec<(PacketType, &[u8])> = vec![
        (PacketType::SubmitJob, b"onlyfunction"),
        (PacketType::SubmitJobBg, b"func\0no-data-separator"),
        (PacketType::SubmitJobEpoch, b"f\0u"),
        (PacketType::SubmitJobSched, b"f\0u\0"),
        (PacketType::CanDoTimeout, b"f"),
        (PacketType::WorkComplete, b"H:x:1"),
        (PacketType::WorkData, b"H:x:1"),
        (PacketType::WorkStatus, b"H:x:1\x001"),
        (PacketType::WorkException, b"H:x:1"),
        (PacketType::ResetAbilities, b"unexpected body"),
    ];
    for (t, body) in cases {
        let mut c = server.conn();
        c.send_raw(&raw_packet(t as u32, body));
        let context = format!("{t} with body {body:?}");
        expect_error_packet(c.next(harness::TIMEOUT), &context);
        // The connection may be closed or stay usable; if it stays, it must work.
        let _ = c.try_send_raw(&Packet::req(PacketType::EchoReq, ["still-usable"]).to_bytes());
        match c.next(harness::TIMEOUT) {
            Got::Closed => {}
            Got::Frame(Frame::Packet(p)) if p.ptype == PacketType::EchoRes => {
                assert_eq!(p.arg(0), b"still-usable", "{context}")
            }
            other => panic!("{context}: after the ERROR: {other:?}"),
        }
        still_serving(&mut server);
    }
}

#[test]
fn admin_garbage_gets_unknown_command() {
    let mut server = Server::tebroker();
    let mut c = server.conn();
    for line in [
        "bogus",
        "STATUS",
        "status-ish",
        "show",
        "show nothing",
        "\x01\x02\x03",
        "x y z w",
    ] {
        c.send_line(line);
        let ans = c.read_line();
        assert!(
            ans.starts_with("ERR UNKNOWN_COMMAND "),
            "admin line {line:?} answered {ans:?}, expected `ERR UNKNOWN_COMMAND ...`"
        );
        // Same connection still answers properly.
        c.send_line("version");
        let v = c.read_line();
        assert!(v.starts_with("OK "), "version after {line:?}: {v:?}");
    }
    // Many garbage lines in one write, then a real command.
    let mut burst = String::new();
    for i in 0..200 {
        burst.push_str(&format!("junk{i} \t more junk\r\n"));
    }
    burst.push_str("status\n");
    c.send_raw(burst.as_bytes());
    for i in 0..200 {
        let ans = c.read_line();
        assert!(
            ans.starts_with("ERR UNKNOWN_COMMAND "),
            "burst line {i}: {ans:?}"
        );
    }
    c.read_block();
    still_serving(&mut server);
}

#[test]
fn admin_errors_match_gearmand_codes() {
    // The ERR code word for incomplete/unknown arguments, compared to gearmand's own answers.
    let lines = ["bogus", "maxqueue", "cancel job H:nowhere:424242"];
    let answers = |server: &Server| -> Vec<String> {
        let mut c = server.conn();
        lines
            .iter()
            .map(|l| {
                c.send_line(l);
                let a = c.read_line();
                a.split(' ').take(2).collect::<Vec<_>>().join(" ")
            })
            .collect()
    };
    let gearmand = Server::gearmand();
    let want = answers(&gearmand);
    assert_eq!(
        want,
        [
            "ERR UNKNOWN_COMMAND",
            "ERR INVALID_ARGUMENTS",
            "ERR UNKNOWN_JOB"
        ],
        "gearmand's answers changed?"
    );
    let mut server = Server::tebroker();
    assert_eq!(answers(&server), want, "tebroker vs gearmand for {lines:?}");
    still_serving(&mut server);
}

#[test]
fn overlong_admin_line_is_refused() {
    let mut server = Server::tebroker();
    let mut c = server.conn();
    let long = vec![b'a'; 1 << 20];
    let _ = c.try_send_raw(&long);
    let (frames, closed) = c.drain(CLOSE_WAIT);
    assert!(
        closed || !frames.is_empty(),
        "a 1 MiB line without a newline got neither an answer nor a close"
    );
    still_serving(&mut server);
}

#[test]
fn invalid_utf8_in_admin_lines_and_names() {
    let mut server = Server::tebroker();
    let mut c = server.conn();
    c.send_raw(b"\xff\xfe\xfd\r\n");
    let ans = c.read_line();
    assert!(ans.starts_with("ERR UNKNOWN_COMMAND"), "{ans:?}");
    c.send_raw(b"cancel job H:\xff\xfe:1\r\n");
    let ans = c.read_line();
    assert!(
        ans.starts_with("ERR "),
        "cancel job with invalid UTF-8: {ans:?}"
    );
    c.send_raw(b"maxqueue \xc3\x28 5\r\n");
    let ans = c.read_line();
    assert!(
        ans.starts_with("OK") || ans.starts_with("ERR "),
        "maxqueue with invalid UTF-8: {ans:?}"
    );

    // Function names, client ids and uniques are bytes: a job round trip with invalid UTF-8.
    let func: &[u8] = b"f\xff\xfe\x80name";
    let mut worker = server.conn();
    worker.req(PacketType::SetClientId, &[&b"id\xc3\x28"[..]]);
    worker.req(PacketType::CanDo, &[func]);
    worker.echo(b"sync");
    let mut client = server.conn();
    client.req(PacketType::SubmitJob, &[func, b"u\xff", b"\xfe\xff data"]);
    let handle = client.expect(PacketType::JobCreated).arg(0).to_vec();
    // Admin listings with such names must still be well-formed.
    let status = server.admin_block("status");
    assert!(
        status.iter().any(|l| l.ends_with("\t1\t0\t1")),
        "{status:?}"
    );
    server.admin_block("workers");
    server.admin_block("show jobs");
    server.admin_block("show unique jobs");
    worker.req::<&[u8]>(PacketType::GrabJobUniq, &[]);
    let a = worker.expect(PacketType::JobAssignUniq);
    assert_eq!(
        (a.arg(0), a.arg(1), a.arg(2), a.arg(3)),
        (&handle[..], func, &b"u\xff"[..], &b"\xfe\xff data"[..])
    );
    worker.req(PacketType::WorkComplete, &[&handle[..], b"\xff"]);
    let done = client.expect(PacketType::WorkComplete);
    assert_eq!(done.arg(1), b"\xff");
    still_serving(&mut server);
}

#[test]
fn slow_and_hostile_connections_do_not_block_others() {
    let mut server = Server::tebroker();
    // Connections parked mid-packet and mid-line, one that never reads its answers.
    let mut parked = Vec::new();
    for i in 0..20 {
        let mut c = server.conn();
        match i % 3 {
            0 => c.send_raw(b"\0RE"),
            1 => c.send_raw(b"stat"),
            _ => {
                for _ in 0..50 {
                    c.send_raw(&raw_packet(16, &[b'z'; 1000]));
                }
            }
        }
        parked.push(c);
    }
    still_serving(&mut server);
    // Abrupt disconnects in the middle of a job: worker and client vanish.
    let mut worker = server.conn();
    worker.req(PacketType::CanDo, &["vanishing"]);
    worker.echo(b"sync");
    let mut client = server.conn();
    client.req(PacketType::SubmitJob, &["vanishing", "", "data"]);
    let handle = client.expect(PacketType::JobCreated).arg(0).to_vec();
    worker.req::<&[u8]>(PacketType::GrabJob, &[]);
    worker.expect(PacketType::JobAssign);
    drop(client);
    worker.req(PacketType::WorkData, &[&handle[..], b"to nobody"]);
    worker.req(PacketType::WorkComplete, &[&handle[..], b"to nobody"]);
    worker.echo(b"after orphan");
    drop(parked);
    still_serving(&mut server);
}

#[test]
fn work_packets_for_foreign_or_unknown_handles_are_refused() {
    let mut server = Server::tebroker();
    // A second worker must not be able to complete a job it does not hold.
    let mut owner = server.conn();
    owner.req(PacketType::CanDo, &["owned"]);
    owner.echo(b"sync");
    let mut client = server.conn();
    client.req(PacketType::SubmitJob, &["owned", "", "d"]);
    let handle = client.expect(PacketType::JobCreated).arg(0).to_vec();
    owner.req::<&[u8]>(PacketType::GrabJob, &[]);
    owner.expect(PacketType::JobAssign);

    let mut intruder = server.conn();
    intruder.req(PacketType::WorkComplete, &[&handle[..], b"forged"]);
    intruder.req(PacketType::WorkFail, &[b"H:unknown:1"]);
    // ERROR answers are welcome; the connection must stay usable.
    intruder.req(PacketType::EchoReq, &[b"intruder"]);
    loop {
        let p = intruder.packet();
        match p.ptype {
            PacketType::Error => continue,
            PacketType::EchoRes => break,
            _ => panic!("intruder got {p:?}"),
        }
    }
    // The client must not have received the forged result: the first thing it gets is the
    // genuine one (a forged packet would have been queued before it).
    owner.req(PacketType::WorkComplete, &[&handle[..], b"genuine"]);
    let done = client.expect(PacketType::WorkComplete);
    assert_eq!(done.arg(1), b"genuine");
    still_serving(&mut server);
}
