//! The one harness of tebroker's integration tests: start a job server (the real tebroker
//! binary, or gearmand / geard for comparison) on a free loopback port, talk to it raw over TCP
//! ([`Conn`]: frames with explicit waits) or over any stream, TLS included ([`Stream`]), make
//! certificates, run a full job round trip. Generic helpers (waiting, admin commands, running
//! programs) come from `test-support`.
//!
//! Every test binary compiles this module on its own and uses part of it.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use gearman_proto::{Codec, Frame, Packet, PacketType};
#[allow(unused_imports)] // not every test binary parses `status`
pub use test_support::{parse_status, wait_until, StatusRow, TIMEOUT};
#[allow(unused_imports)] // for the tests that run gearman-tools
pub use test_support::{require_program, run_with_timeout, KillOnDrop};
use test_support::{LoggedChild, Peer, PeerServer};

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
    /// The HTTP operator surface's address, when tebroker was started with `--http`.
    pub http: Option<SocketAddr>,
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
        Server::tebroker_env(extra, &[])
    }

    /// [`Server::tebroker_with`] with environment variables set for the broker.
    pub fn tebroker_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(tebroker_bin());
        cmd.args(["serve", "-p", "0", "-L", "127.0.0.1"])
            .args(extra);
        // Tests that do not name a store get none, rather than sharing the default directory
        // (no test's config file names a store).
        let store_flags = ["--data-dir", "--database", "--no-store"];
        if !extra.iter().any(|a| store_flags.contains(a)) {
            cmd.arg("--no-store");
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.envs(env.iter().copied());
        let http = extra.contains(&"--http");
        let mut child = LoggedChild::spawn_stdout_piped("tebroker", &mut cmd);
        let stdout = child.take_stdout().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut lines = std::io::BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            if http {
                let _ = tx.send(lines.next());
            }
            // Keep draining so that anything else printed never blocks the server.
            for _ in lines {}
        });
        let mut server = Server {
            kind: Kind::Tebroker,
            port: 0,
            http: None,
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
        if http {
            let line = match rx.recv_timeout(TIMEOUT) {
                Ok(Some(Ok(line))) => line,
                other => server.die(&format!("no dashboard line: {other:?}")),
            };
            let url = line.trim().strip_prefix("tebroker dashboard on ");
            server.http = url
                .and_then(|u| {
                    u.strip_prefix("http://")
                        .or_else(|| u.strip_prefix("https://"))
                })
                .and_then(|a| a.trim_end_matches('/').parse().ok());
            if server.http.is_none() {
                server.die(&format!("bad dashboard line {line:?}"));
            }
        }
        // No probe connection: tebroker prints the line once it listens, and a probe would
        // count against --max-connections (or as a failed TLS handshake).
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
            http: None,
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

    /// A raw connection as a [`Stream`] (what the TLS tests use over TLS).
    pub fn connect(&self) -> Stream<TcpStream> {
        Stream::new(tcp(self.addr()))
    }

    pub fn alive(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// A fresh connection gets an echo back: the server still serves.
    pub fn assert_serving(&mut self) {
        self.assert_alive();
        let mut c = self.connect();
        c.send(PacketType::EchoReq, &[b"still here"]);
        let p = c.recv();
        assert_eq!(p.ptype, PacketType::EchoRes);
        assert_eq!(p.arg(0), b"still here");
    }

    /// One counter of the `stats` admin command, read over a new connection.
    pub fn stat(&self, name: &str) -> u64 {
        let lines = test_support::admin(self.addr(), "stats");
        test_support::stat(&lines, name).unwrap_or_else(|| panic!("no {name} in stats: {lines:?}"))
    }

    /// Waits until counter `name` reaches at least `want`.
    pub fn wait_stat(&self, name: &str, want: u64) {
        wait_until(&format!("{name} >= {want}"), || {
            (self.stat(name) >= want).then_some(())
        });
    }

    /// Sends signal `sig` to the server process.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.pid() as libc::pid_t, sig) }, 0);
    }

    /// Waits for the server to exit, at most `within`; panics (with the log) if it does not.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let until = Instant::now() + within;
        loop {
            if let Some(st) = self.exit_status() {
                return st;
            }
            assert!(
                Instant::now() < until,
                "{:?} still running after {within:?}:\n{}",
                self.kind,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the log contains `text`; returns the log.
    pub fn wait_log(&self, text: &str) -> String {
        wait_until(&format!("{text:?} in the {:?} log", self.kind), || {
            let log = self.log_text();
            log.contains(text).then_some(log)
        })
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

// ---------------------------------------------------------------- any stream, TLS

pub fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A raw Gearman connection over any byte stream (plain TCP or TLS); every read waits at most
/// [`TIMEOUT`].
pub struct Stream<S: Read + Write> {
    pub stream: S,
    buf: BytesMut,
}

impl<S: Read + Write> Stream<S> {
    pub fn new(stream: S) -> Stream<S> {
        Stream {
            stream,
            buf: BytesMut::new(),
        }
    }

    pub fn send(&mut self, t: PacketType, args: &[&[u8]]) {
        let p = Packet::req(t, args.iter().map(|a| Bytes::copy_from_slice(a)));
        self.stream.write_all(&p.to_bytes()).unwrap();
        self.stream.flush().unwrap();
    }

    pub fn raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    fn fill(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 16384];
        let n = self.stream.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// The next frame, or `None` at EOF (or on a connection reset).
    pub fn next_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = Codec::default().decode_frame(&mut self.buf).unwrap() {
                return Some(f);
            }
            match self.fill() {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    panic!("no answer within {TIMEOUT:?}")
                }
                Err(_) => return None,
            }
        }
    }

    pub fn recv(&mut self) -> Packet {
        match self.next_frame() {
            Some(Frame::Packet(p)) => p,
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    /// GRAB_JOB until a JOB_ASSIGN arrives (NOOPs skipped, NO_JOB asks again): the job a
    /// worker that registered its function is handed next.
    pub fn grab_assignment(&mut self) -> Packet {
        self.send(PacketType::GrabJob, &[]);
        loop {
            let p = self.recv();
            match p.ptype {
                PacketType::JobAssign => return p,
                PacketType::NoJob => self.send(PacketType::GrabJob, &[]),
                PacketType::Noop => {}
                other => panic!("expected JOB_ASSIGN, got {other:?} {p:?}"),
            }
        }
    }

    /// Reads until the server closes; returns the packets seen on the way.
    pub fn recv_until_closed(&mut self) -> Vec<Packet> {
        let mut v = Vec::new();
        while let Some(f) = self.next_frame() {
            if let Frame::Packet(p) = f {
                v.push(p);
            }
        }
        v
    }

    /// The next text line, without its line end.
    pub fn recv_line(&mut self) -> String {
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let l = self.buf.split_to(nl + 1);
                return String::from_utf8_lossy(&l).trim_end().to_string();
            }
            assert!(self.fill().unwrap() > 0, "closed before a full line");
        }
    }

    /// Sends an admin line; reads a one-line reply, or a list up to `.`.
    pub fn admin(&mut self, line: &str) -> String {
        self.raw(format!("{line}\n").as_bytes()).unwrap();
        let mut text = String::new();
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let l = self.buf.split_to(nl + 1);
                let l = String::from_utf8_lossy(&l).into_owned();
                text.push_str(&l);
                let t = l.trim_end();
                let list = test_support::answers_with_list(line);
                if !list || t == "." || (text.len() == l.len() && t.starts_with("ERR")) {
                    return text;
                }
                continue;
            }
            if self.fill().unwrap() == 0 {
                return text;
            }
        }
    }

    /// Whether the server has closed this connection (EOF or reset within `wait`).
    pub fn closed_within(&mut self, wait: Duration) -> bool
    where
        S: AsRawStream,
    {
        self.stream.set_timeout(Some(wait));
        let r = loop {
            match self.fill() {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    break false
                }
                Err(_) => break true,
            }
        };
        self.stream.set_timeout(Some(TIMEOUT));
        r
    }
}

pub trait AsRawStream {
    fn set_timeout(&self, t: Option<Duration>);
}

impl AsRawStream for TcpStream {
    fn set_timeout(&self, t: Option<Duration>) {
        self.set_read_timeout(t).unwrap();
    }
}

impl AsRawStream for rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    fn set_timeout(&self, t: Option<Duration>) {
        self.sock.set_read_timeout(t).unwrap();
    }
}

// ---------------------------------------------------------------- certificates

#[allow(unused_imports)] // not every test binary makes certificates
pub use test_support::{Files, Pki};

pub fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `tebroker serve` flags for TLS with `server`'s certificate, client certificates signed by
/// `pki`'s CA, and the ACL file `acl`.
pub fn tls_acl_args<'a>(server: &'a Files, pki: &Pki, acl: &'a Path) -> Vec<String> {
    [
        "--ssl-cert",
        path(&server.cert),
        "--ssl-key",
        path(&server.key),
        "--ssl-ca",
        path(&pki.ca()),
        "--acl",
        path(acl),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `Vec<String>` flags as the `&[&str]` that [`Server::tebroker_with`] takes.
pub fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn load_certs(p: &Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    rustls_pemfile::certs(&mut &std::fs::read(p).unwrap()[..])
        .collect::<Result<_, _>>()
        .unwrap()
}

pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection trusting `ca`, presenting `client` if given. The handshake is driven to
/// completion here, so a refused client certificate shows up as an error.
pub fn tls_connect(addr: SocketAddr, ca: &Path, client: Option<&Files>) -> Stream<TlsStream> {
    try_tls_connect(addr, ca, client).expect("TLS connection")
}

pub fn try_tls_connect(
    addr: SocketAddr,
    ca: &Path,
    client: Option<&Files>,
) -> std::io::Result<Stream<TlsStream>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca) {
        roots.add(c).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some(f) => {
            let key = rustls_pemfile::private_key(&mut &std::fs::read(&f.key).unwrap()[..])
                .unwrap()
                .unwrap();
            builder
                .with_client_auth_cert(load_certs(&f.cert), key)
                .unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, tcp(addr));
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(Stream::new(stream))
}

/// A small deterministic PRNG (xorshift64*), so corpus tests are reproducible.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
