//! Helpers for the security tests (tls, acl, callback_guard, limits, hostile_corpus): start the
//! real tebroker binary, make certificates with rcgen, talk raw Gearman over TCP or TLS.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use gearman_proto::{Codec, Frame, Packet, PacketType};

pub use test_support::{wait_until, TIMEOUT};

/// A tebroker child process, killed when dropped; stderr goes to `log`.
pub struct Broker {
    pub addr: SocketAddr,
    /// The HTTP operator surface's address, when started with `--http`.
    pub http: Option<SocketAddr>,
    child: Child,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Broker {
    pub fn start(args: &[&str]) -> Broker {
        Broker::start_env(args, &[])
    }

    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("tebroker.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_tebroker"))
            .args(["serve", "-p", "0", "-L", "127.0.0.1"])
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn tebroker");
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut line).unwrap();
        let http = args.contains(&"--http").then(|| {
            let mut second = String::new();
            stdout.read_line(&mut second).unwrap();
            second
                .trim()
                .strip_prefix("tebroker dashboard on http://")
                .and_then(|a| a.trim_end_matches('/').parse().ok())
                .unwrap_or_else(|| panic!("no dashboard line: {second:?}"))
        });
        let addr = line
            .trim()
            .strip_prefix("tebroker listening on ")
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!(
                    "tebroker did not start: {line:?}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
            .parse()
            .unwrap();
        Broker {
            addr,
            http,
            child,
            log,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends signal `sig` to the broker.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) },
            0
        );
    }

    /// Waits for the broker to exit, at most `within`; panics (with the log) if it does not.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let until = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < until,
                "tebroker still running after {within:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the log contains `text`.
    pub fn wait_log(&self, text: &str) -> String {
        wait_until(&format!("{text:?} in the tebroker log"), || {
            let log = self.log_text();
            log.contains(text).then_some(log)
        })
    }

    pub fn connect(&self) -> Conn<TcpStream> {
        Conn::new(tcp(self.addr))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// A fresh connection gets an echo back and `stats` answers: the server still serves.
    pub fn assert_serving(&mut self) {
        assert!(self.alive(), "tebroker died:\n{}", self.log_text());
        let mut c = self.connect();
        c.send(PacketType::EchoReq, &[b"still here"]);
        let p = c.recv();
        assert_eq!(p.ptype, PacketType::EchoRes);
        assert_eq!(p.arg(0), b"still here");
    }

    /// One counter of the `stats` admin command, read over a new connection.
    pub fn stat(&self, name: &str) -> u64 {
        let text = self.connect().admin("stats");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}\t")))
            .unwrap_or_else(|| panic!("no {name} in stats:\n{text}"))
            .parse()
            .unwrap()
    }

    /// Waits until counter `name` reaches at least `want`.
    pub fn wait_stat(&self, name: &str, want: u64) {
        let until = Instant::now() + TIMEOUT;
        loop {
            let v = self.stat(name);
            if v >= want {
                return;
            }
            assert!(Instant::now() < until, "{name} stayed at {v}, want {want}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- tebroker log ---\n{}", self.log_text());
        }
    }
}

pub fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A raw Gearman connection over any byte stream.
pub struct Conn<S: Read + Write> {
    pub stream: S,
    buf: BytesMut,
}

impl<S: Read + Write> Conn<S> {
    pub fn new(stream: S) -> Conn<S> {
        Conn {
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
                let list = matches!(
                    line.split_whitespace().collect::<Vec<_>>()[..],
                    ["status"]
                        | ["workers"]
                        | ["stats"]
                        | ["acl", "list"]
                        | ["show", ..]
                        | ["leases"]
                        | ["prioritystatus"]
                );
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

fn load_certs(p: &Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    rustls_pemfile::certs(&mut &std::fs::read(p).unwrap()[..])
        .collect::<Result<_, _>>()
        .unwrap()
}

pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection trusting `ca`, presenting `client` if given. The handshake is driven to
/// completion here, so a refused client certificate shows up as an error.
pub fn tls_connect(addr: SocketAddr, ca: &Path, client: Option<&Files>) -> Conn<TlsStream> {
    try_tls_connect(addr, ca, client).expect("TLS connection")
}

pub fn try_tls_connect(
    addr: SocketAddr,
    ca: &Path,
    client: Option<&Files>,
) -> std::io::Result<Conn<TlsStream>> {
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
    Ok(Conn::new(stream))
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
