//! A throwaway PostgreSQL cluster: `initdb` into a temp dir, `pg_ctl start` on a free loopback
//! port with its socket in the same dir, stopped and removed on drop. PostgreSQL refuses to run
//! as root, so under root every server program runs as the `postgres` user (via `runuser`).
//!
//! Debian installs the server programs in `/usr/lib/postgresql/VERSION/bin` (not on PATH).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::peer::free_port;
use crate::process::find_program;

/// The directory holding `initdb` and `pg_ctl`: the newest `/usr/lib/postgresql/*/bin`, else
/// wherever PATH has `pg_ctl`.
pub fn postgres_bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((version, bin))
        })
        .collect();
    found.sort();
    if let Some((_, bin)) = found.pop() {
        return Some(bin);
    }
    let pg_ctl = find_program("pg_ctl")?;
    let bin = pg_ctl.parent()?.to_path_buf();
    bin.join("initdb").is_file().then_some(bin)
}

/// How a cluster is tuned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `fsync=off`: fast, and still loses nothing on a clean stop (tests).
    Relaxed,
    /// The server's defaults (benchmarks).
    Default,
}

/// A running throwaway cluster; see the module doc.
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// The `postgres` user's uid and gid when running as root.
    run_as: Option<(u32, u32)>,
    durability: Durability,
    running: bool,
}

impl PgCluster {
    /// Starts a cluster, or returns `None` after a loud message when PostgreSQL is not
    /// installed — except with `CI` set, where a missing PostgreSQL fails the test.
    pub fn start_or_skip(test: &str) -> Option<PgCluster> {
        match PgCluster::missing() {
            None => Some(PgCluster::start(Durability::Relaxed)),
            Some(why) if std::env::var_os("CI").is_some() => {
                panic!("{test}: PostgreSQL is required under CI: {why}")
            }
            Some(why) => {
                // Straight to stderr: the test harness captures eprintln! of passing tests.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "\n!!! SKIPPED {test}: {why}; install it with scripts/install-peers.sh \
                     (Debian `postgresql`) — with CI set this fails instead !!!\n"
                );
                None
            }
        }
    }

    /// Why a cluster cannot be started here, if it cannot.
    pub fn missing() -> Option<String> {
        if postgres_bin_dir().is_none() {
            return Some(
                "PostgreSQL's initdb/pg_ctl not found (in /usr/lib/postgresql/*/bin or PATH)"
                    .into(),
            );
        }
        if running_as_root() && postgres_user().is_none() {
            return Some(
                "running as root but there is no `postgres` user to run the server".into(),
            );
        }
        None
    }

    /// `initdb` and start; panics with the server's log when that fails.
    pub fn start(durability: Durability) -> PgCluster {
        let bin = postgres_bin_dir().expect("PostgreSQL is not installed (see PgCluster::missing)");
        let run_as = if running_as_root() {
            Some(postgres_user().expect("no `postgres` user"))
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("pg-")
            .tempdir()
            .expect("temp dir for the cluster");
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown cluster dir");
        }
        let mut cluster = PgCluster {
            dir,
            bin,
            port: 0,
            run_as,
            durability,
            running: false,
        };
        let data = cluster.data_dir();
        let out = cluster.run(
            cluster
                .tool("initdb")
                .args(["-U", "postgres", "-A", "trust", "-E", "UTF8"])
                .args(["--locale=C", "--no-sync", "-D"])
                .arg(&data),
        );
        assert!(out.status.success(), "initdb failed:\n{}", describe(&out));
        // A port another process took between picking and binding: pick again.
        for attempt in 1..=5 {
            cluster.port = free_port();
            match cluster.try_start() {
                Ok(()) => return cluster,
                Err(log) if attempt == 5 => panic!("the PostgreSQL cluster did not start:\n{log}"),
                Err(_) => {}
            }
        }
        unreachable!()
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory holding the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A `postgresql://` URL for database `postgres` as user `postgres` over TCP on loopback.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    pub fn url_for(&self, database: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A key=value address over the Unix socket.
    pub fn socket_address(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.socket_dir().display(),
            self.port
        )
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Everything the server logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// `pg_ctl stop -m fast`: sessions are terminated at once, as on a server restart.
    pub fn stop(&mut self) {
        let out = self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"]);
        assert!(
            out.status.success(),
            "pg_ctl stop failed:\n{}",
            describe(&out)
        );
        self.running = false;
    }

    /// Starts the stopped cluster again on the same port.
    pub fn restart(&mut self) {
        assert!(!self.running, "restart() of a running cluster");
        if let Err(log) = self.try_start() {
            panic!("the PostgreSQL cluster did not start again:\n{log}");
        }
    }

    /// Runs `psql -c SQL` on database `postgres`; panics if it fails. Returns psql's stdout.
    pub fn psql(&self, sql: &str) -> String {
        let mut cmd = self.tool("psql");
        cmd.args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-U",
            "postgres",
            "-h",
        ])
        .arg(self.socket_dir())
        .args(["-p", &self.port.to_string(), "-d", "postgres", "-c", sql]);
        let out = self.run(&mut cmd);
        assert!(
            out.status.success(),
            "psql {sql:?} failed:\n{}",
            describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn try_start(&mut self) -> Result<(), String> {
        let mut options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c max_connections=50",
            self.port,
            self.socket_dir().display()
        );
        if self.durability == Durability::Relaxed {
            options.push_str(" -c fsync=off -c full_page_writes=off");
        }
        let log = self.log_path();
        let log = log.to_str().expect("utf-8 temp path").to_string();
        let out = self.pg_ctl(&["start", "-w", "-t", "60", "-l", &log, "-o", &options]);
        if out.status.success() {
            self.running = true;
            Ok(())
        } else {
            Err(format!(
                "{}\n--- server log ---\n{}",
                describe(&out),
                self.log_text()
            ))
        }
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        let data = self.data_dir();
        let mut cmd = self.tool("pg_ctl");
        cmd.arg("-D").arg(&data).args(args);
        self.run(&mut cmd)
    }

    /// A server program, run as `postgres` when we are root.
    fn tool(&self, name: &str) -> Command {
        let prog = self.bin.join(name);
        match self.run_as {
            Some(_) => {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(prog);
                c
            }
            None => Command::new(prog),
        }
    }

    fn run(&self, cmd: &mut Command) -> Output {
        cmd.stdin(Stdio::null())
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- PostgreSQL log (last {} lines) ---\n{}",
                tail.len(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if self.running {
            let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"]);
        }
        // Whatever pg_ctl could not stop: the postmaster's pid is the first line of its pid file.
        if let Ok(pidfile) = std::fs::read_to_string(self.data_dir().join("postmaster.pid")) {
            if let Some(pid) = pidfile
                .lines()
                .next()
                .and_then(|l| l.trim().parse::<u32>().ok())
            {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn running_as_root() -> bool {
    // /proc/self belongs to the process's effective uid.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The `postgres` user's uid and gid, from /etc/passwd.
fn postgres_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[0] == "postgres")
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}
