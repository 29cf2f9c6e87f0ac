//! Helpers for the testenv agents' end-to-end tests: a real tebroker (in-process, on its own
//! runtime thread, listening on a loopback port), the real `testenv-client` / `testenv-worker`
//! binaries as child processes in their own process groups, admin queries over TCP, and waits
//! with generous timeouts (the tests assert behaviour, never speed).
//!
//! Every test binary compiles this module on its own and uses part of it.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use test_support::Peer;

/// Upper bound for any single wait that should normally take well under a second.
pub const TIMEOUT: Duration = Duration::from_secs(20);

pub const CLIENT_BIN: &str = env!("CARGO_BIN_EXE_testenv-client");
pub const WORKER_BIN: &str = env!("CARGO_BIN_EXE_testenv-worker");

/// Set in the environment of the test binary re-executed as a broker; see [`broker_child_main`].
pub const BROKER_CHILD_ENV: &str = "TESTENV_E2E_BROKER_CHILD";
/// The port the broker child listens on (default: a free one), so a killed broker can be
/// restarted where its clients look for it.
pub const BROKER_PORT_ENV: &str = "TESTENV_E2E_BROKER_PORT";
/// The name of the `#[test]` in every test binary that calls [`broker_child_main`].
pub const BROKER_CHILD_TEST: &str = "broker_child_process";

/// The body of the `broker_child_process` test every test binary defines: a no-op, except when
/// [`Broker::start`] re-executes the test binary with [`BROKER_CHILD_ENV`] set; then it serves
/// tebroker (the library, as `tebroker serve -p 0 -L 127.0.0.1` does) until killed. A broker
/// in a process of its own can die like a real one (SIGKILL: sockets reset, nothing said).
pub fn broker_child_main() {
    if std::env::var_os(BROKER_CHILD_ENV).is_none() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("broker runtime");
    let result: anyhow::Result<()> = rt.block_on(async move {
        let port = std::env::var(BROKER_PORT_ENV)
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let settings = tebroker::config::Settings {
            port,
            listen: "127.0.0.1".into(),
            handle_host: "test".into(),
            ..tebroker::config::Settings::default()
        };
        let server = tebroker::server::Server::bind(settings).await?;
        // libtest has written "test broker_child_process ... " without a newline.
        println!("\ntebroker listening on {}", server.local_addr()?);
        std::io::stdout().flush()?;
        server.run().await
    });
    if let Err(e) = result {
        eprintln!("tebroker: {e:#}");
        std::process::exit(1);
    }
    std::process::exit(0);
}

/// A real tebroker in a process of its own (this test binary re-executed, see
/// [`broker_child_main`]) on `127.0.0.1:<free port>`; killed (SIGKILL) when dropped.
pub struct Broker {
    pub addr: SocketAddr,
    proc: Option<Proc>,
    _log: tempfile::TempPath,
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_on(0)
    }

    /// A broker on `port` (0: a free one); e.g. the same port again after [`Broker::kill`].
    pub fn start_on(port: u16) -> Broker {
        let log = tempfile::NamedTempFile::new()
            .expect("log")
            .into_temp_path();
        let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
        cmd.args([
            "--exact",
            BROKER_CHILD_TEST,
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(BROKER_CHILD_ENV, "1")
        .env(BROKER_PORT_ENV, port.to_string());
        let mut proc = Proc::spawn("tebroker", &mut cmd, log.to_path_buf());
        let mut addr = None;
        wait_until(TIMEOUT, "tebroker listening line", || {
            assert!(proc.running(), "tebroker exited:\n{}", proc.output());
            addr = proc
                .output()
                .lines()
                .find_map(|l| l.split("tebroker listening on ").nth(1))
                .and_then(|a| a.trim().parse().ok());
            addr.is_some()
        });
        Broker {
            addr: addr.unwrap(),
            proc: Some(proc),
            _log: log,
        }
    }

    /// `host:port`, for `-b`.
    pub fn spec(&self) -> String {
        self.addr.to_string()
    }

    /// Kills the broker with SIGKILL: its sockets reset, nothing is said to anyone.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.signal(libc::SIGKILL);
            p.wait(TIMEOUT);
        }
    }

    /// Sends `sig` to the broker process (SIGSTOP: its sockets stay open, nothing answers).
    pub fn signal(&self, sig: i32) {
        if let Some(p) = &self.proc {
            p.signal(sig);
        }
    }

    /// An admin command's answer, without the closing `.` line.
    pub fn admin(&self, cmd: &str) -> Vec<String> {
        admin(self.addr, cmd)
    }

    /// The `leases` listing: one line per TE held.
    pub fn leases(&self) -> Vec<String> {
        self.admin("leases")
    }

    /// `status` as (function, total, running, workers).
    pub fn status(&self) -> Vec<(String, u64, u64, u64)> {
        parse_status(&self.admin("status"))
    }

    /// Waits until `n` testenv-workers have `lockenv` registered here.
    pub fn wait_lockenv_workers(&self, n: u64) {
        wait_lockenv_workers(self.addr, n)
    }

    /// Waits until no TE is leased.
    pub fn wait_no_leases(&self, within: Duration) {
        wait_until(within, "no leases held", || self.leases().is_empty());
    }
}

/// Waits until `n` workers have `lockenv` registered on the server at `addr` (any Gearman
/// server with the `status` admin command).
pub fn wait_lockenv_workers(addr: SocketAddr, n: u64) {
    wait_until(TIMEOUT, &format!("{n} lockenv worker(s) on {addr}"), || {
        parse_status(&admin(addr, "status"))
            .iter()
            .any(|(f, _, _, w)| f == "lockenv" && *w >= n)
    });
}

pub fn parse_status(lines: &[String]) -> Vec<(String, u64, u64, u64)> {
    lines
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            if f.len() != 4 {
                return None;
            }
            Some((
                f[0].to_string(),
                f[1].parse().ok()?,
                f[2].parse().ok()?,
                f[3].parse().ok()?,
            ))
        })
        .collect()
}

/// Sends one admin text command and reads the answer up to the `.` line (or one line for
/// single-line answers such as `version`).
pub fn admin(addr: SocketAddr, cmd: &str) -> Vec<String> {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("admin connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut out = Vec::new();
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => panic!("admin `{cmd}` on {addr}: {e}"),
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line == "." {
            break;
        }
        if line.starts_with("OK") || line.starts_with("ERR") {
            out.push(line);
            break;
        }
        out.push(line);
    }
    out
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `within`.
pub fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` is a live process (a zombie counts as gone: it runs no code). PID 1 of this
/// machine may never reap orphans, so zombies can linger.
pub fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return false;
    };
    !matches!(rest.split_ascii_whitespace().next(), Some("Z" | "X") | None)
}

/// Reads a pid a test command wrote to `path`, waiting for the file to appear.
pub fn read_pid(path: &Path) -> i32 {
    let mut pid = None;
    wait_until(TIMEOUT, &format!("pid file {}", path.display()), || {
        pid = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        pid.is_some()
    });
    pid.unwrap()
}

pub fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A child process in its own process group; the whole group is SIGKILLed when dropped, so a
/// failing test leaves nothing running. Output (stdout and stderr) goes to `log`.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        // SAFETY: setpgid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            log,
            status: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2).
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Signals the whole process group the child leads.
    pub fn signal_group(&self, sig: i32) {
        // SAFETY: plain kill(2) on a process group we created.
        unsafe {
            libc::kill(-self.pid(), sig);
        }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    pub fn running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Waits for the process to exit; panics (with its output) after `within`.
    pub fn wait(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.try_status() {
                return st;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} still running after {within:?}; output:\n{}",
                    self.name,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The exit code, which must exist (no death by signal).
    pub fn wait_code(&mut self, within: Duration) -> i32 {
        let st = self.wait(within);
        st.code().unwrap_or_else(|| {
            panic!(
                "{} died of a signal ({st}); output:\n{}",
                self.name,
                self.output()
            )
        })
    }

    /// Asserts the exit code, printing the output when it differs.
    pub fn expect_code(&mut self, code: i32, within: Duration) {
        let got = self.wait_code(within);
        assert_eq!(
            got,
            code,
            "{} exited {got}, expected {code}; output:\n{}",
            self.name,
            self.output()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- {} output -----\n{}", self.name, self.output());
        }
        self.signal_group(libc::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test's scratch directory plus the agents it runs.
pub struct Scene {
    pub dir: tempfile::TempDir,
}

impl Default for Scene {
    fn default() -> Self {
        Scene::new()
    }
}

impl Scene {
    pub fn new() -> Scene {
        Scene {
            dir: tempfile::Builder::new()
                .prefix("testenv-e2e-")
                .tempdir()
                .expect("tempdir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `path(name)` as a string for shell snippets.
    pub fn p(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    pub fn write(&self, name: &str, content: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// An executable `#!/bin/sh` script.
    pub fn script(&self, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.write(name, &format!("#!/bin/sh\n{body}\n"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// A TE datafile naming TE `num`, in the shape the original jobs consumed.
    pub fn datafile(&self, num: &str) -> PathBuf {
        self.write(&format!("te-{num}.json"), &te_json(num))
    }

    /// `testenv-worker -b BROKERS -n TENUM --state-dir DIR ARGS... FILES...`.
    pub fn worker(&self, brokers: &str, tenum: &str, extra: &[&str], files: &[&Path]) -> Proc {
        let mut cmd = Command::new(WORKER_BIN);
        cmd.args(["-b", brokers, "-n", tenum])
            .arg("--state-dir")
            .arg(self.path("state"))
            .args(extra)
            .args(files)
            .env_remove("RUST_LOG");
        Proc::spawn(
            &format!("worker {tenum}"),
            &mut cmd,
            self.path(&format!("worker-{tenum}.log")),
        )
    }

    /// `testenv-client -b BROKERS -n JOBNUM ARGS... -- sh -c SCRIPT`.
    pub fn client(&self, brokers: &str, jobnum: &str, extra: &[&str], script: &str) -> Proc {
        self.client_cmd(brokers, jobnum, extra, ["sh", "-c", script])
    }

    pub fn client_cmd<I, S>(&self, brokers: &str, jobnum: &str, extra: &[&str], command: I) -> Proc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(CLIENT_BIN);
        cmd.args(["-b", brokers, "-n", jobnum])
            .args(extra)
            .arg("--")
            .args(command)
            .env_remove("RUST_LOG")
            .env("TOCI_JOBTYPE", format!("e2e-{jobnum}"));
        Proc::spawn(
            &format!("client {jobnum}"),
            &mut cmd,
            self.path(&format!("client-{jobnum}.log")),
        )
    }
}

/// The secrets in [`te_json`]; they must never show up in an agent's log.
pub const SSH_KEY_SECRET: &str = "SSHKEY-7f3a9c-NEVER-LOG";
pub const PM_PASSWORD_SECRET: &str = "PMPASS-91be4d-NEVER-LOG";

/// A TE description like `examples/`, with recognisable secrets.
pub fn te_json(num: &str) -> String {
    format!(
        r#"{{
  "env-num": "{num}",
  "host-ip": "192.0.2.{num}",
  "seed-ip": "192.0.2.1{num}",
  "ssh-user": "root",
  "ssh-key": "-----BEGIN OPENSSH PRIVATE KEY-----\n{SSH_KEY_SECRET}\n-----END OPENSSH PRIVATE KEY-----\n",
  "nodes": [
    {{"mac": ["52:54:00:00:0{num}:01"], "cpu": "1", "memory": "3072", "disk": "40", "arch": "i386",
     "pm_type": "pxe_ssh", "pm_addr": "192.0.2.{num}", "pm_user": "root", "pm_password": "{PM_PASSWORD_SECRET}"}}
  ]
}}
"#
    )
}

/// The `env-num` of a TE datafile's text.
pub fn env_num(text: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(text).expect("TE JSON");
    v["env-num"].as_str().unwrap_or("?").to_string()
}

/// A peer job server (gearmand or geard) on a loopback port, killed when dropped.
pub struct PeerServer {
    pub addr: SocketAddr,
    _server: test_support::PeerServer,
}

impl PeerServer {
    /// `gearmand --port P --listen 127.0.0.1 --threads 1 --log-file none`.
    pub fn gearmand() -> PeerServer {
        PeerServer::start(Peer::Gearmand { threads: 1 })
    }

    /// `geard -d -p P --listen-address 127.0.0.1` (PyPI gear's server).
    pub fn geard() -> PeerServer {
        PeerServer::start(Peer::Geard)
    }

    fn start(peer: Peer) -> PeerServer {
        let server = test_support::PeerServer::start(peer, TIMEOUT);
        PeerServer {
            addr: server.addr(),
            _server: server,
        }
    }

    pub fn spec(&self) -> String {
        self.addr.to_string()
    }

    pub fn status(&self) -> Vec<(String, u64, u64, u64)> {
        parse_status(&admin(self.addr, "status"))
    }
}

/// The interpreter with PyPI gear (`TESTENV_TEST_PYTHON`, default python3); panics with the fix
/// if gear cannot be imported.
pub fn python() -> String {
    let py = std::env::var("TESTENV_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&py)
        .args(["-c", "import gear"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {py}: {e}"));
    assert!(
        out.status.success(),
        "PyPI gear is not importable by {py}; run scripts/install-peers.sh\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    py
}

/// A script of `tests/py`.
pub fn py_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(name)
}

/// A broker and one worker serving TE "te1" (extra worker flags in `worker_args`), ready.
pub fn one_te(worker_args: &[&str]) -> (Scene, Broker, Proc) {
    let s = Scene::new();
    let b = Broker::start();
    let w = s.worker(&b.spec(), "te1", worker_args, &[&s.datafile("1")]);
    b.wait_lockenv_workers(1);
    (s, b, w)
}
