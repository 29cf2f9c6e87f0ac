//! What the testenv-agent end-to-end tests share: the real agent binary started on a config in
//! a temp dir, real testenv-clients, tebroker in this process or Debian's gearmand, and hook
//! scripts. Every wait has a deadline.
#![allow(dead_code)] // each test file uses its own part

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use test_support::{run_with_timeout, wait_until, Peer, PeerServer};
use testenv_proto::agent::{AgentReport, EnvState};

pub const AGENT_BIN: &str = env!("CARGO_BIN_EXE_testenv-agent");
pub const LONG: Duration = Duration::from_secs(60);

/// testenv-client, built next to this test binary (by `cargo test --workspace`, or here).
pub fn client_bin() -> PathBuf {
    workspace_bin("testenv", "testenv-client")
}

/// Binary `bin` of workspace package `package`, built next to this test binary (by `cargo
/// test --workspace`, or here).
pub fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join(bin);
    if !path.exists() {
        let out = run_with_timeout(
            Command::new(env!("CARGO")).args(["build", "-p", package, "--bin", bin]),
            Duration::from_secs(600),
        );
        assert!(out.status.success(), "cannot build {bin}: {out:?}");
    }
    path
}

/// The tebroker binary on free loopback ports, logging at debug level, with `--http` and its
/// SQLite store in `data_dir`: the process, its Gearman address and its HTTP address.
pub fn tebroker_process(data_dir: &Path) -> (test_support::LoggedChild, SocketAddr, SocketAddr) {
    let broker = test_support::LoggedChild::spawn(
        "tebroker",
        Command::new(workspace_bin("tebroker", "tebroker"))
            .args(["serve", "-vv", "-p", "0", "-L", "127.0.0.1"])
            .args(["--http", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env("RUST_LOG", "debug"),
    );
    let banner = |prefix: &str| -> Option<SocketAddr> {
        let log = broker.log_text();
        let addr = log.lines().find_map(|l| l.strip_prefix(prefix))?;
        Some(addr.trim_end_matches('/').parse().unwrap())
    };
    let http = wait_until("tebroker's banner", || {
        banner("tebroker dashboard on http://")
    });
    let addr = banner("tebroker listening on ").unwrap();
    (broker, addr, http)
}

/// tebroker on a free loopback port, served by a thread of this test process.
pub fn tebroker() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let settings = tebroker::config::Settings {
                port: 0,
                listen: "127.0.0.1".into(),
                handle_host: "test".into(),
                ..tebroker::config::Settings::default()
            };
            let server = tebroker::server::Server::bind(settings).await.unwrap();
            tx.send(server.local_addr().unwrap()).unwrap();
            let _ = server.run().await;
        });
    });
    rx.recv_timeout(LONG).expect("tebroker started")
}

pub fn gearmand() -> PeerServer {
    PeerServer::start(Peer::Gearmand { threads: 1 }, Duration::from_secs(10))
}

/// A running testenv-agent with its config, datafiles and hooks in a temp dir.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub child: Child,
}

impl Agent {
    /// `body` is the config after `brokers`, `state_dir` and `control_socket`; `{dir}` in it
    /// stands for the agent's temp dir `dir`.
    pub fn start_in(dir: tempfile::TempDir, broker: SocketAddr, body: &str) -> Agent {
        Agent::start_in_with(dir, broker, body, &[])
    }

    /// [`Agent::start_in`] with more command-line arguments (e.g. `-d`).
    pub fn start_in_with(
        dir: tempfile::TempDir,
        broker: SocketAddr,
        body: &str,
        args: &[&str],
    ) -> Agent {
        let d = dir.path().display().to_string();
        let config = format!(
            "brokers = [\"{broker}\"]\nagent = \"test-agent\"\nstate_dir = \"{d}/state\"\n\
             control_socket = \"{d}/ctl.sock\"\n{}",
            body.replace("{dir}", &d)
        );
        std::fs::write(dir.path().join("agent.toml"), config).unwrap();
        let child = Command::new(AGENT_BIN)
            .arg("--config")
            .arg(dir.path().join("agent.toml"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("agent.log")).unwrap())
            .spawn()
            .unwrap();
        Agent { dir, child }
    }

    /// An agent serving `te1` (2 nodes, `{dir}/te1.json`) alone; `tables` is the config
    /// before its `[[te]]` table.
    pub fn te1(broker: SocketAddr, tables: &str) -> Agent {
        Agent::start_in(te1_dir(), broker, &format!("{tables}\n{TE1}"))
    }

    /// An agent serving te1 with the hooks `health` and `rebuild` (as in
    /// [`te1_with_health_and_rebuild`]); `settings` is the config after those two lines of
    /// `[hooks]` (more hooks, then other tables) and before te1's `[[te]]`.
    pub fn te1_hooked(broker: SocketAddr, health: &str, rebuild: &str, settings: &str) -> Agent {
        Agent::start_in(
            te1_with_health_and_rebuild(health, rebuild),
            broker,
            &format!("{HEALTH_AND_REBUILD}{settings}\n{TE1}"),
        )
    }

    /// te1 with a health hook that passes and a rebuild hook logging to `rebuild.log`, rebuilt
    /// after its first failed lease (`holder_grace` 1 s); returned once te1 is ready.
    pub fn rebuilt_after_one_failed_lease(broker: SocketAddr) -> Agent {
        let agent = Agent::te1_hooked(
            broker,
            "true",
            "echo rebuilt >> {d}/rebuild.log",
            "timeout = \"10s\"\n[policy]\nmax_failed_leases = 1\n[lease]\nholder_grace = \"1s\"",
        );
        agent.wait_state("te1", EnvState::Ready);
        agent
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("agent.log")).unwrap_or_default()
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        run_with_timeout(
            Command::new(AGENT_BIN)
                .arg("ctl")
                .arg("--socket")
                .arg(self.path("ctl.sock"))
                .args(args),
            LONG,
        )
    }

    /// [`Agent::ctl`] that must succeed.
    pub fn ctl_ok(&self, args: &[&str]) {
        let out = self.ctl(args);
        assert!(out.status.success(), "ctl {args:?}: {out:?}");
    }

    pub fn status(&self) -> Option<AgentReport> {
        let out = self.ctl(&["status", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn wait_state(&self, te: &str, want: EnvState) -> testenv_proto::agent::EnvReport {
        wait_until(&format!("{te} {want}; log:\n{}", self.log()), || {
            std::thread::sleep(Duration::from_millis(50));
            self.status()?
                .envs
                .into_iter()
                .find(|e| e.name == te && e.state == want)
        })
    }
}

impl Agent {
    /// After a failed lease given in the log as `failed lease: {reason}`: waits for the one
    /// rebuild the hook logs in `rebuild.log`, then for te1 ready again and leasing.
    pub fn wait_rebuilt_after_failed_lease(&self, broker: SocketAddr, reason: &str) {
        let what = format!("the rebuild after the failed lease; log:\n{}", self.log());
        wait_until(&what, || {
            std::fs::read_to_string(self.path("rebuild.log"))
                .ok()
                .filter(|l| l.lines().count() == 1)
        });
        assert!(
            self.log().contains(&format!("failed lease: {reason}")),
            "{}",
            self.log()
        );
        self.wait_state("te1", EnvState::Ready);
        lease_ok(broker, &[], "true");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: a signal to our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes an executable script.
pub fn script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

pub fn te_data(path: &Path, num: &str, nodes: usize) {
    let nodes = vec!["{}"; nodes].join(",");
    std::fs::write(
        path,
        format!("{{\"env-num\":\"{num}\",\"nodes\":[{nodes}]}}"),
    )
    .unwrap();
}

/// A testenv-client running `command` (sh -c) with the TE; its output and exit status.
pub fn client(broker: SocketAddr, extra: &[&str], command: &str) -> Child {
    Command::new(client_bin())
        .args(["-b", &broker.to_string(), "-t", "300"])
        .args(extra)
        .args(["--", "sh", "-c", command])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A lease by a testenv-client running `command` that must succeed; its output.
pub fn lease_ok(broker: SocketAddr, extra: &[&str], command: &str) -> Output {
    let out = finish(client(broker, extra, command));
    assert!(out.status.success(), "{out:?}");
    out
}

/// A testenv-client that holds its TE until `go` exists; returned once its command runs.
pub fn hold_until(broker: SocketAddr, go: &Path) -> Child {
    let holder = client(
        broker,
        &[],
        &format!(
            "touch {0}.started; while [ ! -e {0} ]; do sleep 0.05; done",
            go.display()
        ),
    );
    wait_until("the lease started", || {
        go.with_extension("started").exists().then_some(())
    });
    holder
}

pub fn finish(child: Child) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(LONG) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("testenv-client did not finish within {LONG:?}");
        }
    }
}

/// The rows of admin `status` for `function`: (queued, running, workers).
pub fn function_status(broker: SocketAddr, function: &str) -> Option<(u64, u64, u64)> {
    test_support::parse_status(&test_support::admin(broker, "status"))
        .into_iter()
        .find(|r| r.function == function)
        .map(|r| (r.total, r.running, r.workers))
}

/// A temp dir with `te1.json` (2 nodes).
pub fn te1_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    te_data(&dir.path().join("te1.json"), "1", 2);
    dir
}

/// The config table of TE `te1` on `{dir}/te1.json`.
pub const TE1: &str = "[[te]]\nname = \"te1\"\ndatafile = \"{dir}/te1.json\"\n";

/// The `[hooks]` table naming the hooks of [`te1_with_health_and_rebuild`]; more hook lines
/// may follow.
pub const HEALTH_AND_REBUILD: &str =
    "[hooks]\nhealth = \"{dir}/health.sh\"\nrebuild = \"{dir}/rebuild.sh\"\n";

/// A temp dir with `te1.json` (2 nodes) and the hooks `health.sh` and `rebuild.sh` running
/// `health` and `rebuild`, in which `{d}` stands for the dir.
pub fn te1_with_health_and_rebuild(health: &str, rebuild: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    te_data(&d.join("te1.json"), "1", 2);
    let here = d.display().to_string();
    script(&d.join("health.sh"), &health.replace("{d}", &here));
    script(&d.join("rebuild.sh"), &rebuild.replace("{d}", &here));
    dir
}
