//! Peer job servers (gearmand, geard) on loopback ports.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{require_program, LoggedChild};

/// A port that was free a moment ago (for servers that cannot pick their own).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .unwrap()
        .port()
}

/// Whether a job server answers two GET_STATUS requests on one connection. Accepting is not
/// enough: geard listens (and serves) before its constructor has finished, and a packet it handles
/// in that window raises inside geard and drops the connection (its `statsd` attribute is not
/// set yet), so a test that connects at once can lose its first connection.
fn answers_twice(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    const GET_STATUS: u32 = 15;
    const STATUS_RES: u32 = 20;
    let Ok(mut conn) = TcpStream::connect(addr) else {
        return false;
    };
    let timeout = Some(Duration::from_secs(2));
    if conn.set_read_timeout(timeout).is_err() || conn.set_write_timeout(timeout).is_err() {
        return false;
    }
    let handle = b"H:readiness:0";
    let mut request = b"\0REQ".to_vec();
    request.extend_from_slice(&GET_STATUS.to_be_bytes());
    request.extend_from_slice(&(handle.len() as u32).to_be_bytes());
    request.extend_from_slice(handle);
    for _ in 0..2 {
        if conn.write_all(&request).is_err() {
            return false;
        }
        let mut header = [0u8; 12];
        if conn.read_exact(&mut header).is_err()
            || &header[..4] != b"\0RES"
            || u32::from_be_bytes(header[4..8].try_into().unwrap()) != STATUS_RES
        {
            return false;
        }
        let len = u32::from_be_bytes(header[8..12].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len];
        if len > 4096 || conn.read_exact(&mut body).is_err() {
            return false;
        }
    }
    true
}

/// Which peer job server a [`PeerServer`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// Debian's gearmand (gearman-job-server):
    /// `gearmand --port P --listen 127.0.0.1 --threads N --log-file none`.
    Gearmand { threads: u32 },
    /// PyPI gear's server, the one the original testenv system ran:
    /// `geard -d -p P --listen-address 127.0.0.1`.
    Geard,
}

impl Peer {
    pub fn name(self) -> &'static str {
        match self {
            Peer::Gearmand { .. } => "gearmand",
            Peer::Geard => "geard",
        }
    }

    fn command(self, port: u16) -> Command {
        let p = port.to_string();
        let mut cmd = Command::new(require_program(self.name()));
        match self {
            Peer::Gearmand { threads } => {
                cmd.args(["--port", &p, "--listen", "127.0.0.1"]);
                cmd.args(["--threads", &threads.to_string(), "--log-file", "none"]);
            }
            // `-d`: stay in the foreground. A pyenv shim `exec`s Python, so the child's pid is
            // geard's own and killing it leaves nothing behind.
            Peer::Geard => {
                cmd.args(["-d", "-p", &p, "--listen-address", "127.0.0.1"]);
            }
        }
        cmd
    }
}

/// A peer job server on 127.0.0.1, its output in a temp log; killed (SIGKILL) and reaped when
/// dropped, with the log's tail printed if the test panics meanwhile.
pub struct PeerServer {
    peer: Peer,
    port: u16,
    startup: Duration,
    proc: Option<LoggedChild>,
}

impl PeerServer {
    /// Starts `peer` on a free port and waits (at most `startup`) until it accepts connections.
    /// A port that another process grabbed in the meantime (say another test binary's server,
    /// picked by the same racy bind-to-0) is abandoned for a fresh one.
    pub fn start(peer: Peer, startup: Duration) -> PeerServer {
        let mut s = PeerServer {
            peer,
            port: free_port(),
            startup,
            proc: None,
        };
        s.spawn(true);
        s
    }

    pub fn peer(&self) -> Peer {
        self.peer
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The running process; panics after [`PeerServer::kill`].
    pub fn process(&self) -> &LoggedChild {
        self.proc.as_ref().expect("the peer server was killed")
    }

    pub fn process_mut(&mut self) -> &mut LoggedChild {
        self.proc.as_mut().expect("the peer server was killed")
    }

    pub fn pid(&self) -> u32 {
        self.process().pid()
    }

    /// Everything the server wrote so far.
    pub fn log_text(&self) -> String {
        self.process().log_text()
    }

    /// Kills the server (connections drop at once).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Kills the server and starts a fresh one (empty queues) on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn(false);
    }

    /// Starts the server and waits until it listens. With `may_move`, a port taken by another
    /// process is given up for a fresh one; without, that fails the test.
    fn spawn(&mut self, may_move: bool) {
        let name = self.peer.name();
        let deadline = Instant::now() + self.startup;
        loop {
            let mut proc = LoggedChild::spawn(name, &mut self.peer.command(self.port));
            loop {
                if Instant::now() > deadline {
                    let log = proc.log_text();
                    proc.kill();
                    panic!(
                        "{name} did not accept connections on 127.0.0.1:{} within {:?}\n\
                         --- {name} log ---\n{log}",
                        self.port, self.startup
                    );
                }
                match listener_owner(self.port, proc.pid()) {
                    Listener::Ours => {
                        if answers_twice(self.addr()) {
                            self.proc = Some(proc);
                            return;
                        }
                    }
                    Listener::Theirs => {
                        // gearmand would retry bind() for 20 s; do not wait for it.
                        proc.kill();
                        assert!(may_move, "port {} was taken by another process", self.port);
                        self.port = free_port();
                        break;
                    }
                    Listener::None => {}
                }
                if let Some(st) = proc.try_status() {
                    panic!(
                        "{name} on port {} exited during start-up: {st}\n--- {name} log ---\n{}",
                        self.port,
                        proc.log_text()
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

enum Listener {
    None,
    Ours,
    Theirs,
}

/// Who listens on 127.0.0.1:`port`: process `pid`, someone else, or nobody. Reads /proc, so that
/// a test never mistakes another test's server (same port, picked concurrently) for its own.
fn listener_owner(port: u16, pid: u32) -> Listener {
    let tcp = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let want = format!(":{port:04X}");
    let inodes: Vec<String> = tcp
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 9 && f[1].ends_with(&want) && f[3] == "0A").then(|| f[9].to_string())
        })
        .collect();
    if inodes.is_empty() {
        return Listener::None;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Listener::None;
    };
    for fd in fds.flatten() {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let t = target.to_string_lossy();
            if inodes.iter().any(|i| t == format!("socket:[{i}]")) {
                return Listener::Ours;
            }
        }
    }
    Listener::Theirs
}
