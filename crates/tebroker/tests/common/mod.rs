//! Helpers shared by the integration tests: start a job server (tebroker, or gearmand / geard for
//! comparison) on a free loopback port, talk to it over raw TCP (binary packets and admin lines),
//! run a full job round trip, and run peer programs with a timeout.
//!
//! Every test binary compiles this module on its own and uses part of it.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use gearman_proto::{Codec, Frame, Packet, PacketType};
#[allow(unused_imports)] // for the tests that run gearman-tools
pub use test_support::{require_program, run_with_timeout, KillOnDrop};
use test_support::{LoggedChild, Peer, PeerServer};

/// How long any single wait (start-up, one answer) may take before the test fails. Generous:
/// the tests assert behaviour, never speed.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Which job server a [`Server`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tebroker,
    Gearmand,
    Geard,
}

/// A job server child process on 127.0.0.1, killed when dropped. Its output goes to a log file
/// whose tail is printed if the test panics while the server is alive.
pub struct Server {
    pub kind: Kind,
    pub port: u16,
    proc: Proc,
}

enum Proc {
    Tebroker(LoggedChild),
    Peer(PeerServer),
}

fn tebroker_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tebroker")
}

impl Server {
    /// `tebroker serve -p 0 -L 127.0.0.1`.
    pub fn tebroker() -> Server {
        Server::tebroker_with(&[])
    }

    /// `tebroker serve -p 0 -L 127.0.0.1 EXTRA...`; the port comes from the one line tebroker
    /// prints on stdout: `tebroker listening on 127.0.0.1:PORT`.
    pub fn tebroker_with(extra: &[&str]) -> Server {
        let mut cmd = Command::new(tebroker_bin());
        cmd.args(["serve", "-p", "0", "-L", "127.0.0.1"])
            .args(extra);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let mut child = LoggedChild::spawn_stdout_piped("tebroker", &mut cmd);
        let stdout = child.take_stdout().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut lines = std::io::BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            // Keep draining so that anything else printed never blocks the server.
            for _ in lines {}
        });
        let mut server = Server {
            kind: Kind::Tebroker,
            port: 0,
            proc: Proc::Tebroker(child),
        };
        let line = match rx.recv_timeout(TIMEOUT) {
            Ok(Some(Ok(line))) => line,
            Ok(other) => server.die(&format!(
                "tebroker exited or closed stdout before printing its listening line ({other:?})"
            )),
            Err(_) => server.die("tebroker printed no listening line within the timeout"),
        };
        let Some(addr) = line.strip_prefix("tebroker listening on ") else {
            server.die(&format!(
                "first stdout line is {line:?}, expected `tebroker listening on 127.0.0.1:PORT`"
            ));
        };
        let addr: SocketAddr = addr
            .trim()
            .parse()
            .unwrap_or_else(|e| server.die(&format!("bad address in {line:?}: {e}")));
        assert_eq!(
            addr.ip().to_string(),
            "127.0.0.1",
            "listening line {line:?}"
        );
        assert_ne!(addr.port(), 0, "listening line {line:?}");
        server.port = addr.port();
        server.wait_accepting();
        server
    }

    /// `gearmand --port P --listen 127.0.0.1 --threads 2 --log-file none`.
    pub fn gearmand() -> Server {
        Server::peer(Kind::Gearmand, Peer::Gearmand { threads: 2 })
    }

    /// `geard -d -p P --listen-address 127.0.0.1` (PyPI gear's server).
    pub fn geard() -> Server {
        Server::peer(Kind::Geard, Peer::Geard)
    }

    fn peer(kind: Kind, peer: Peer) -> Server {
        let peer = PeerServer::start(peer, TIMEOUT);
        Server {
            kind,
            port: peer.port(),
            proc: Proc::Peer(peer),
        }
    }

    fn process(&self) -> &LoggedChild {
        match &self.proc {
            Proc::Tebroker(c) => c,
            Proc::Peer(p) => p.process(),
        }
    }

    fn process_mut(&mut self) -> &mut LoggedChild {
        match &mut self.proc {
            Proc::Tebroker(c) => c,
            Proc::Peer(p) => p.process_mut(),
        }
    }

    fn wait_accepting(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if TcpStream::connect(self.addr()).is_ok() {
                return;
            }
            if let Some(st) = self.process_mut().try_status() {
                self.die(&format!("{:?} exited during start-up: {st}", self.kind));
            }
            if Instant::now() > deadline {
                self.die(&format!(
                    "{:?} does not accept connections on {}",
                    self.kind,
                    self.addr()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn die(&mut self, msg: &str) -> ! {
        self.process_mut().kill();
        panic!("{msg}\n--- server log ---\n{}", self.log_text());
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn pid(&self) -> u32 {
        self.process().pid()
    }

    /// Everything the server wrote to its log so far (tebroker: stderr; a peer: its output).
    pub fn log_text(&self) -> String {
        self.process().log_text()
    }

    /// Panics (with the server's log) if the process has exited: it must never die on bad input.
    pub fn assert_alive(&mut self) {
        if let Some(st) = self.process_mut().try_status() {
            panic!(
                "{:?} is no longer running ({st})\n--- server log ---\n{}",
                self.kind,
                self.log_text()
            );
        }
    }

    /// The exit status, once the process has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.process_mut().try_status()
    }

    /// The log must not show a panic.
    pub fn assert_no_panic_in_log(&self) {
        let log = self.log_text();
        assert!(
            !log.contains("panicked"),
            "the server panicked:\n--- server log ---\n{log}"
        );
    }

    pub fn conn(&self) -> Conn {
        Conn::connect(self.port)
    }

    /// Sends one admin command on a fresh connection and returns the lines before the `.` line.
    pub fn admin_block(&self, cmd: &str) -> Vec<String> {
        let mut c = self.conn();
        c.send_line(cmd);
        c.read_block()
    }

    /// Sends one admin command on a fresh connection and returns its one-line answer.
    pub fn admin_line(&self, cmd: &str) -> String {
        let mut c = self.conn();
        c.send_line(cmd);
        c.read_line()
    }
}

/// What a read on a [`Conn`] produced.
#[derive(Debug)]
pub enum Got {
    Frame(Frame),
    /// The server closed the connection (EOF or reset).
    Closed,
    /// Nothing arrived within the wait.
    Nothing,
    /// The server sent bytes the codec cannot frame.
    Garbage(String),
}

/// A raw TCP connection speaking the Gearman framing (the server's `\0RES` packets and text
/// lines), with a read timeout on every read.
pub struct Conn {
    pub stream: TcpStream,
    buf: BytesMut,
    codec: Codec,
}

impl Conn {
    pub fn connect(port: u16) -> Conn {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("connect 127.0.0.1:{port}: {e}"));
        stream.set_nodelay(true).unwrap();
        stream.set_write_timeout(Some(TIMEOUT)).unwrap();
        Conn {
            stream,
            buf: BytesMut::new(),
            // Answers can be large (admin listings), never larger than this in the tests.
            codec: Codec {
                max_frame: 64 << 20,
                max_admin_line: 1 << 20,
            },
        }
    }

    pub fn send(&mut self, p: &Packet) {
        self.send_raw(&p.to_bytes());
    }

    /// Sends a request packet of `ptype` with `args` joined by NUL.
    pub fn req<A: AsRef<[u8]>>(&mut self, ptype: PacketType, args: &[A]) {
        let p = Packet::req(
            ptype,
            args.iter()
                .map(|a| Bytes::copy_from_slice(a.as_ref()))
                .collect::<Vec<_>>(),
        );
        self.send(&p);
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("write {} bytes: {e}", bytes.len()));
    }

    /// Sends raw bytes; a failure (the server already closed) is returned, not a panic.
    pub fn try_send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    pub fn send_line(&mut self, line: &str) {
        self.send_raw(format!("{line}\r\n").as_bytes());
    }

    /// Half-closes: the server sees EOF, we can still read its answers.
    pub fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Next frame, waiting at most `wait`.
    pub fn next(&mut self, wait: Duration) -> Got {
        let deadline = Instant::now() + wait;
        loop {
            match self.codec.decode_frame(&mut self.buf) {
                Ok(Some(f)) => return Got::Frame(f),
                Ok(None) => {}
                Err(e) => return Got::Garbage(format!("{e} (buffer {:?})", &self.buf[..])),
            }
            let now = Instant::now();
            if now >= deadline {
                return Got::Nothing;
            }
            self.stream
                .set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))
                .unwrap();
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    if self.buf.is_empty() {
                        return Got::Closed;
                    }
                    return Got::Garbage(format!(
                        "connection closed inside a frame; left over {:?}",
                        &self.buf[..]
                    ));
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Got::Nothing
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Got::Closed,
            }
        }
    }

    /// Next binary packet; NOOPs are skipped unless `ptype` is NOOP. Panics on anything else.
    pub fn expect(&mut self, ptype: PacketType) -> Packet {
        loop {
            let p = self.packet();
            if p.ptype == PacketType::Noop && ptype != PacketType::Noop {
                continue;
            }
            assert_eq!(p.ptype, ptype, "expected {ptype}, got {p:?}");
            return p;
        }
    }

    /// Next binary packet, whatever its type.
    pub fn packet(&mut self) -> Packet {
        match self.next(TIMEOUT) {
            Got::Frame(Frame::Packet(p)) => p,
            other => panic!("expected a binary packet, got {other:?}"),
        }
    }

    /// Next text line (admin answer).
    pub fn read_line(&mut self) -> String {
        match self.next(TIMEOUT) {
            Got::Frame(Frame::Admin(l)) => l,
            other => panic!("expected an admin text line, got {other:?}"),
        }
    }

    /// Text lines up to (not including) the `.` line.
    pub fn read_block(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let l = self.read_line();
            if l == "." {
                return out;
            }
            out.push(l);
        }
    }

    /// Reads until the server closes the connection or `wait` passes. Returns the frames read
    /// and whether the connection was closed.
    pub fn drain(&mut self, wait: Duration) -> (Vec<Frame>, bool) {
        let deadline = Instant::now() + wait;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (frames, false);
            }
            match self.next(left) {
                Got::Frame(f) => frames.push(f),
                Got::Closed => return (frames, true),
                Got::Nothing => return (frames, false),
                Got::Garbage(g) => panic!("server sent unframeable bytes: {g}"),
            }
        }
    }

    /// ECHO_REQ / ECHO_RES on this connection.
    pub fn echo(&mut self, payload: &[u8]) {
        self.req(PacketType::EchoReq, &[payload]);
        let p = self.expect(PacketType::EchoRes);
        assert_eq!(p.arg(0), payload, "ECHO_RES payload");
    }
}

/// An ERROR packet's code and text, or a panic describing what came instead.
pub fn expect_error_packet(got: Got, context: &str) -> (String, String) {
    match got {
        Got::Frame(Frame::Packet(p)) if p.ptype == PacketType::Error => {
            let code = String::from_utf8_lossy(p.arg(0)).into_owned();
            let text = String::from_utf8_lossy(p.arg(1)).into_owned();
            assert!(
                !code.is_empty()
                    && code
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'),
                "{context}: ERROR code should be an upper-case word, got {code:?} ({text:?})"
            );
            assert!(!text.is_empty(), "{context}: ERROR {code} without a text");
            (code, text)
        }
        other => panic!("{context}: expected an ERROR packet, got {other:?}"),
    }
}

static NAMES: AtomicUsize = AtomicUsize::new(0);

/// A function name no other test uses.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NAMES.fetch_add(1, Ordering::Relaxed)
    )
}

/// A full foreground job through raw sockets: a worker registers a fresh function, a client
/// submits, the worker grabs with GRAB_JOB, sends WORK_DATA and WORK_COMPLETE, the client gets
/// JOB_CREATED, WORK_DATA and WORK_COMPLETE with the same handle. Also checks ECHO on the client.
pub fn check_round_trip(port: u16) {
    let func = unique_name("roundtrip");
    let payload = b"round\0trip payload".to_vec();
    let mut worker = Conn::connect(port);
    worker.req(PacketType::CanDo, &[func.as_bytes()]);
    // The ECHO answer proves the CAN_DO before it was read.
    worker.echo(b"sync");

    let mut client = Conn::connect(port);
    client.echo(b"hello\0echo");
    client.req(
        PacketType::SubmitJob,
        &[func.as_bytes(), b"".as_slice(), payload.as_slice()],
    );
    let created = client.expect(PacketType::JobCreated);
    let handle = created.arg(0).to_vec();
    assert!(!handle.is_empty(), "empty job handle");

    worker.req::<&[u8]>(PacketType::GrabJob, &[]);
    let assign = worker.expect(PacketType::JobAssign);
    assert_eq!(assign.arg(0), &handle[..], "JOB_ASSIGN handle");
    assert_eq!(assign.arg(1), func.as_bytes(), "JOB_ASSIGN function");
    assert_eq!(assign.arg(2), &payload[..], "JOB_ASSIGN workload");

    worker.req(PacketType::WorkData, &[&handle[..], b"partial"]);
    let mut reply = payload.clone();
    reply.reverse();
    worker.req(PacketType::WorkComplete, &[&handle[..], &reply[..]]);

    let data = client.expect(PacketType::WorkData);
    assert_eq!(
        (data.arg(0), data.arg(1)),
        (&handle[..], &b"partial"[..]),
        "WORK_DATA"
    );
    let done = client.expect(PacketType::WorkComplete);
    assert_eq!(
        (done.arg(0), done.arg(1)),
        (&handle[..], &reply[..]),
        "WORK_COMPLETE"
    );

    // Nothing left for this function.
    worker.req::<&[u8]>(PacketType::GrabJob, &[]);
    worker.expect(PacketType::NoJob);
}

/// Polls `f` until it returns Some, or panics with `what` after [`TIMEOUT`].
pub fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Parsed `status` output: (function, total, running, available workers).
pub fn parse_status(lines: &[String]) -> Vec<(String, u64, u64, u64)> {
    lines
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(
                f.len(),
                4,
                "status line {l:?} should have 4 tab-separated fields"
            );
            let n = |s: &str| {
                s.parse::<u64>()
                    .unwrap_or_else(|_| panic!("non-numeric field {s:?} in status line {l:?}"))
            };
            (f[0].to_string(), n(f[1]), n(f[2]), n(f[3]))
        })
        .collect()
}
