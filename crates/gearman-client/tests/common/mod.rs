//! Test harness: a real `gearmand` (or python gear's `geard`) on a free loopback port, killed on
//! drop.

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gearman_client::ServerAddr;

/// Finds `name` on PATH or in /usr/sbin. Panics with a clear message otherwise: CI installs
/// the peers, so a missing binary is a broken environment, not a reason to skip.
pub fn find_binary(name: &str, package: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push("/usr/sbin".into());
    dirs.push("/usr/local/sbin".into());
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found on PATH or in /usr/sbin: install {package} \
                 (the project's CI setup script does this)"
            )
        })
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .unwrap()
        .port()
}

/// Which server implementation to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Debian's gearmand (C++).
    Gearmand,
    /// PyPI gear's geard, the server the original testenv system ran.
    Geard,
}

/// A running gearmand (or geard).
pub struct Gearmand {
    pub port: u16,
    kind: Kind,
    child: Option<Child>,
}

impl Gearmand {
    pub fn start() -> Gearmand {
        Gearmand::start_kind(Kind::Gearmand)
    }

    pub fn start_kind(kind: Kind) -> Gearmand {
        let mut g = Gearmand {
            port: free_port(),
            kind,
            child: None,
        };
        g.spawn(true);
        g
    }

    fn command(&self) -> Command {
        let port = self.port.to_string();
        match self.kind {
            Kind::Gearmand => {
                let mut c = Command::new(find_binary("gearmand", "Debian's gearman-job-server"));
                c.args(["--port", &port, "--listen", "127.0.0.1"]);
                c.args(["--threads", "1", "--log-file", "none"]);
                c
            }
            Kind::Geard => {
                let mut c = Command::new(find_binary("geard", "PyPI's gear"));
                c.args(["-d", "-p", &port, "--listen-address", "127.0.0.1"]);
                c
            }
        }
    }

    pub fn addr(&self) -> ServerAddr {
        ServerAddr::localhost(self.port)
    }

    /// Starts the server and waits until it listens. With `may_move`, a port that another
    /// process grabbed in the meantime (another test binary's server, picked by the same racy
    /// bind-to-0) is abandoned for a fresh one.
    fn spawn(&mut self, may_move: bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut child = self
                .command()
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {:?}: {e}", self.kind));
            loop {
                assert!(
                    Instant::now() < deadline,
                    "{:?} did not listen on port {} within 10 s",
                    self.kind,
                    self.port
                );
                match listener_owner(self.port, child.id()) {
                    Listener::Ours => {
                        if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                            self.child = Some(child);
                            return;
                        }
                    }
                    Listener::Theirs => {
                        // gearmand would retry bind() for 20 s; do not wait for it.
                        let _ = child.kill();
                        let _ = child.wait();
                        assert!(may_move, "port {} was taken by another process", self.port);
                        self.port = free_port();
                        break;
                    }
                    Listener::None => {}
                }
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("{:?} on port {} exited: {status}", self.kind, self.port);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Kills the server (connections drop at once).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the server and starts a fresh one (empty queues) on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn(false);
    }
}

impl Drop for Gearmand {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Generous timeout for anything a test awaits: a bug shows as a clear failure, not a hang.
pub const WAIT: Duration = Duration::from_secs(10);

pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?}: {what}"))
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
