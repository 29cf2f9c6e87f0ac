//! Starting, probing and stopping the servers under test, and reading their RSS and CPU time.

use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use gearman_client::ServerAddr;
use tokio::net::TcpStream;

/// The servers the bench knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Tebroker,
    Gearmand,
    Geard,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Tebroker, Kind::Gearmand, Kind::Geard];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Tebroker => "tebroker",
            Kind::Gearmand => "gearmand",
            Kind::Geard => "geard",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// How many connections the bench opens at once against this server, and the pause after
    /// each connect. geard listens with a backlog of 1 and its accept thread is slow to wake: a
    /// connect that arrives before it accepted the previous one has its SYN dropped and retried
    /// only after a second. Measured here: back-to-back connects to geard alternate between
    /// ~0.1 ms and ~1 s; with a 2 ms pause after each, 300 connect in 1.6 s.
    pub fn connect_pacing(self) -> (usize, Duration) {
        match self {
            Kind::Geard => (1, Duration::from_millis(2)),
            _ => (64, Duration::ZERO),
        }
    }
}

/// Where a server's executable is, and its version text.
#[derive(Debug, Clone)]
pub struct Installed {
    pub kind: Kind,
    pub exe: PathBuf,
    pub version: String,
}

/// Finds the executables of the servers; `Err` says why one is missing.
pub fn locate(kind: Kind) -> Result<Installed, String> {
    match kind {
        Kind::Tebroker => {
            let exe = sibling("tebroker").ok_or("tebroker is not built next to tebroker-bench")?;
            let version = first_line(Command::new(&exe).arg("--version"));
            Ok(Installed { kind, exe, version })
        }
        Kind::Gearmand => {
            let exe = which("gearmand")
                .or_else(|| Some(PathBuf::from("/usr/sbin/gearmand")).filter(|p| p.exists()))
                .ok_or("gearmand not found (Debian package gearman-job-server)")?;
            let version = first_line(Command::new(&exe).arg("--version"));
            Ok(Installed { kind, exe, version })
        }
        Kind::Geard => {
            let mut exe = which("geard").ok_or("geard not found (PyPI package gear)")?;
            // A pyenv shim is a shell script that execs the real one after some work: run the
            // real one, so that the process we measure is the Python server itself.
            if exe.to_string_lossy().contains("/shims/") {
                if let Ok(out) = Command::new("pyenv").args(["which", "geard"]).output() {
                    let real = String::from_utf8_lossy(&out.stdout).trim().to_string();
                    if out.status.success() && !real.is_empty() {
                        exe = PathBuf::from(real);
                    }
                }
            }
            let version = Command::new("python3")
                .args([
                    "-c",
                    "import importlib.metadata as m; print('gear', m.version('gear'))",
                ])
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "gear (version unknown)".into());
            Ok(Installed { kind, exe, version })
        }
    }
}

/// An executable next to our own (cargo puts every binary of a workspace in one target dir).
pub fn sibling(name: &str) -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    let p = me.parent()?.join(name);
    p.is_file().then_some(p)
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn first_line(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            if s.trim().is_empty() {
                s = String::from_utf8_lossy(&o.stderr).into_owned();
            }
            s.lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// A free TCP port on 127.0.0.1 (free when asked; the server binds it right after).
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

/// One running server process.
pub struct Server {
    pub kind: Kind,
    pub port: u16,
    /// tebroker's HTTP operator surface, when started with [`Server::start_with_http`].
    pub http: Option<SocketAddr>,
    child: Child,
    log: PathBuf,
}

/// What a tebroker's store writer did (its `stats` counters).
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreStats {
    pub leases_ended: u64,
    /// Records handed to the writer (a lease and its wait per lease, plus TE state changes).
    pub recorded: u64,
    pub written: u64,
    pub dropped: u64,
    /// Whether everything recorded was written before the bench gave up waiting (10 s).
    pub caught_up: bool,
}

impl Server {
    /// Starts a fresh server on a free port and waits until it accepts connections.
    pub async fn start(inst: &Installed, logdir: &Path) -> anyhow::Result<Server> {
        Server::start_opts(inst, logdir, false, None).await
    }

    /// As [`Server::start`], for tebroker with its HTTP surface (`--http`) on another free port.
    pub async fn start_with_http(inst: &Installed, logdir: &Path) -> anyhow::Result<Server> {
        Server::start_opts(inst, logdir, true, None).await
    }

    /// As [`Server::start_with_http`], with the store in `data_dir` (kept as it is: no
    /// retention purge).
    pub async fn start_on_store(
        inst: &Installed,
        logdir: &Path,
        data_dir: &Path,
    ) -> anyhow::Result<Server> {
        Server::start_opts(inst, logdir, true, Some(data_dir)).await
    }

    async fn start_opts(
        inst: &Installed,
        logdir: &Path,
        http: bool,
        data_dir: Option<&Path>,
    ) -> anyhow::Result<Server> {
        let port = free_port()?;
        let p = port.to_string();
        let http = if http && inst.kind == Kind::Tebroker {
            Some(SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)))
        } else {
            None
        };
        let mut cmd = Command::new(&inst.exe);
        match inst.kind {
            // With its default store (SQLite), in the run's temporary directory;
            // TEBROKER_BENCH_NO_STORE=1 measures without one.
            Kind::Tebroker => {
                cmd.args(["serve", "-p", &p, "-L", "127.0.0.1"]);
                if let Some(h) = http {
                    cmd.arg("--http").arg(h.to_string());
                }
                if let Some(dir) = data_dir {
                    cmd.arg("--data-dir")
                        .arg(dir)
                        .args(["--history-days", "36500"])
                } else if std::env::var_os("TEBROKER_BENCH_NO_STORE").is_some() {
                    cmd.arg("--no-store")
                } else {
                    cmd.arg("--data-dir")
                        .arg(logdir.join(format!("store-{port}")))
                }
            }
            Kind::Gearmand => cmd.args([
                "--port",
                &p,
                "--listen",
                "127.0.0.1",
                "--threads",
                "2",
                "--log-file",
                "none",
            ]),
            Kind::Geard => cmd.args(["-d", "-p", &p, "--listen-address", "127.0.0.1"]),
        };
        let log = logdir.join(format!("{}-{port}.log", inst.kind.name()));
        let out = File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .env_remove("RUST_LOG");
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", inst.exe.display()))?;
        let mut server = Server {
            kind: inst.kind,
            port,
            http,
            child,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                bail!(
                    "{} exited at start ({status}): {}",
                    inst.kind.name(),
                    server.log_tail()
                );
            }
            let http_up = match http {
                Some(h) => TcpStream::connect(h).await.is_ok(),
                None => true,
            };
            if http_up && TcpStream::connect(server.sockaddr()).await.is_ok() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                let tail = server.log_tail();
                server.stop().await;
                bail!("{} did not listen within 15 s: {tail}", inst.kind.name());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn sockaddr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn addr(&self) -> ServerAddr {
        ServerAddr::localhost(self.port)
    }

    /// `127.0.0.1:PORT`, as the testenv agents take it.
    pub fn hostport(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Resident set size in KiB (VmRSS).
    pub fn rss_kib(&self) -> Option<u64> {
        proc_status_kib(self.pid(), "VmRSS:")
    }

    fn log_tail(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// SIGTERM, then SIGKILL if it has not exited after 3 s. A tebroker first reports on
    /// stderr what its store recorded, wrote and dropped (waiting up to 10 s for the writer to
    /// catch up); the same figures are returned.
    pub async fn stop(mut self) -> Option<StoreStats> {
        let store = if self.kind == Kind::Tebroker {
            self.store_stats().await
        } else {
            None
        };
        if let Some(s) = store {
            eprint!(
                "[store: {} leases ended, {} records queued, {} written, {} dropped{}] ",
                s.leases_ended,
                s.recorded,
                s.written,
                s.dropped,
                if s.caught_up { "" } else { ", NOT caught up" }
            );
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid; it is not reaped before try_wait below.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return store,
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return store;
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

pub fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// utime + stime of a /proc/.../stat file, in seconds.
pub fn proc_cpu_secs(path: &str) -> Option<f64> {
    let s = std::fs::read_to_string(path).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

impl Server {
    /// The store writer's counters once it has written everything recorded (or after 10 s);
    /// `None` without a store or an answer.
    async fn store_stats(&self) -> Option<StoreStats> {
        let stat = |lines: &[String], name: &str| -> Option<u64> {
            lines.iter().find_map(|l| {
                let (k, v) = l.split_once('\t')?;
                (k == name).then(|| v.trim().parse().ok()).flatten()
            })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let local = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
            let lines = admin(local, "stats", Duration::from_secs(5)).await.ok()?;
            let recorded = stat(&lines, "store_records")?;
            let written = stat(&lines, "store_written")?;
            let dropped = stat(&lines, "store_dropped")?;
            let caught_up = written >= recorded;
            if caught_up || Instant::now() >= deadline {
                return Some(StoreStats {
                    leases_ended: stat(&lines, "leases_ended").unwrap_or(0),
                    recorded,
                    written,
                    dropped,
                    caught_up,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Sends one admin text command and returns its answer's lines (without the closing `.`).
pub async fn admin(
    addr: SocketAddr,
    command: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    let server = gearman_client::ServerAddr::new(addr.ip().to_string(), addr.port());
    Ok(gearman_client::admin::query(&server, command, timeout).await?)
}

/// Functions in `status` output whose name starts with `prefix` and that have a worker.
pub async fn registered_functions(
    addr: SocketAddr,
    prefix: &str,
    timeout: Duration,
) -> anyhow::Result<usize> {
    let out = admin(addr, "status", timeout).await?;
    Ok(out
        .iter()
        .filter(|l| l.starts_with(prefix))
        .filter(|l| {
            l.split('\t')
                .nth(3)
                .and_then(|w| w.trim().parse::<u64>().ok())
                .is_some_and(|w| w > 0)
        })
        .count())
}
