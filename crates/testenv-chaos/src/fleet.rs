//! The processes of a run: brokers, workers and client loops, each started, signalled,
//! killed and restarted here, and all killed when dropped (also on a panic).

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::check::{ClientRun, Exit};
use crate::clock::mono_ms;
use crate::netns::Netns;

pub fn signal(pid: u32, sig: libc::c_int) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// Kills `pid`'s whole process group (every child leads its own).
fn kill_group(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: as above.
        unsafe {
            libc::kill(-pid, libc::SIGCONT);
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

fn append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Spawns `cmd` in its own process group (so a Ctrl-C reaches only the runner, which then
/// cleans up) and dying with the thread that started it (PR_SET_PDEATHSIG), so nothing
/// outlives a runner killed with SIGKILL.
fn spawn(cmd: &mut Command, stdout: File, stderr: File) -> std::io::Result<Child> {
    cmd.stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn()
}

/// A long-running process (a broker or a worker) that faults kill, stop and restart.
pub struct Service {
    pub target: String,
    program: PathBuf,
    args: Vec<OsString>,
    netns: Option<String>,
    log: PathBuf,
    stdout: PathBuf,
    child: Option<Child>,
    pub stopped: bool,
}

impl Service {
    fn command(&self) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.program);
                c.args(&self.args);
                c
            }
            None => {
                let mut c = Command::new(&self.program);
                c.args(&self.args);
                c
            }
        }
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        let mut log = append(&self.log)?;
        writeln!(log, "=== testenv-chaos: start at {} ms", mono_ms())?;
        let stdout = File::create(&self.stdout)?;
        let child = spawn(&mut self.command(), stdout, log)
            .with_context(|| format!("cannot start {}", self.program.display()))?;
        self.child = Some(child);
        self.stopped = false;
        Ok(())
    }

    pub fn up(&self) -> bool {
        self.child.is_some()
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.stopped = false;
    }

    pub fn stop(&mut self) -> bool {
        self.stopped = self
            .child
            .as_ref()
            .is_some_and(|c| signal(c.id(), libc::SIGSTOP));
        self.stopped
    }

    pub fn cont(&mut self) {
        if let Some(c) = &self.child {
            signal(c.id(), libc::SIGCONT);
        }
        self.stopped = false;
    }

    /// Ends it cleanly (SIGTERM; SIGKILL after `grace`).
    pub fn terminate(&mut self, grace: Duration) {
        if let Some(child) = &mut self.child {
            signal(child.id(), libc::SIGCONT);
            signal(child.id(), libc::SIGTERM);
            let until = mono_ms() + grace.as_millis() as u64;
            while mono_ms() < until {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.kill();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            kill_group(child.id());
        }
        self.kill();
    }
}

/// A tebroker: its first start picks a free port, restarts reuse it.
pub struct Broker {
    pub service: Service,
    pub host: String,
    pub port: u16,
}

impl Broker {
    pub fn new(
        name: &str,
        bin: &Path,
        host: &str,
        netns: Option<&Netns>,
        dir: &Path,
    ) -> anyhow::Result<Broker> {
        let mut b = Broker {
            service: Service {
                target: name.to_string(),
                program: bin.join("tebroker"),
                args: Vec::new(),
                netns: netns.map(|n| n.name.clone()),
                log: dir.join(format!("broker-{name}.log")),
                stdout: dir.join(format!("broker-{name}.out")),
                child: None,
                stopped: false,
            },
            host: host.to_string(),
            port: 0,
        };
        b.start()?;
        Ok(b)
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        let port = self.port.to_string();
        self.service.args = ["serve", "-p", &port, "-L", &self.host, "--no-store", "-v"]
            .iter()
            .map(OsString::from)
            .collect();
        self.service.start()?;
        // The first line on stdout says where it listens.
        let deadline = mono_ms() + 20_000;
        loop {
            let out = std::fs::read_to_string(&self.service.stdout).unwrap_or_default();
            if let Some(addr) = out
                .lines()
                .find_map(|l| l.strip_prefix("tebroker listening on "))
            {
                let listening: u16 = addr
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.trim().parse().ok())
                    .with_context(|| {
                        format!("broker {}: odd address {addr:?}", self.service.target)
                    })?;
                self.port = listening;
                return Ok(());
            }
            if let Some(child) = &mut self.service.child {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!(
                        "broker {} exited at start ({status}); see {}",
                        self.service.target,
                        self.service.log.display()
                    );
                }
            }
            if mono_ms() > deadline {
                bail!(
                    "broker {} did not say where it listens within 20 s; see {}",
                    self.service.target,
                    self.service.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A testenv-worker serving one TE, with its own datafile and journal directory.
pub fn worker(
    te: &str,
    bin: &Path,
    brokers: &str,
    flags: &[String],
    dir: &Path,
) -> anyhow::Result<Service> {
    let home = dir.join(te);
    std::fs::create_dir_all(home.join("state"))?;
    let datafile = home.join("te.json");
    std::fs::write(
        &datafile,
        serde_json::json!({ crate::holdlog::TE_FIELD: te, "env_num": te }).to_string(),
    )?;
    let mut args: Vec<OsString> = vec!["-b".into(), brokers.into(), "-n".into(), te.into()];
    args.push("--state-dir".into());
    args.push(home.join("state").into());
    args.extend(flags.iter().map(OsString::from));
    args.push(datafile.into());
    let mut s = Service {
        target: te.to_string(),
        program: bin.join("testenv-worker"),
        args,
        netns: None,
        log: dir.join(format!("{te}.log")),
        stdout: home.join("stdout"),
        child: None,
        stopped: false,
    };
    s.start()?;
    Ok(s)
}

/// `list` joined with commas, starting at its `first` entry.
pub fn rotated(list: &[String], first: usize) -> String {
    let n = list.len().max(1);
    (0..list.len())
        .map(|i| list[(first + i) % n].as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// What a client loop's process is doing now, for the fault injector.
#[derive(Debug, Default)]
pub struct Slot {
    pub id: String,
    pub pid: Option<u32>,
    pub killed_ms: Option<u64>,
    pub terminated_ms: Option<u64>,
    pub hung: bool,
}

pub struct LoopSettings {
    pub client_bin: PathBuf,
    /// This program, run as `hold` for COMMAND.
    pub exe: PathBuf,
    pub brokers: Vec<String>,
    pub flags: Vec<String>,
    pub hold_log: PathBuf,
    pub log_dir: PathBuf,
    pub hold_ms: (u64, u64),
    pub codes: Vec<i32>,
    pub seed: u64,
}

/// The client loops: each runs testenv-client after testenv-client until the drain.
pub struct Clients {
    pub slots: Arc<Vec<Mutex<Slot>>>,
    pub draining: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Vec<ClientRun>>>,
}

fn lock(slot: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

impl Clients {
    pub fn start(n: usize, settings: LoopSettings) -> Clients {
        let slots: Arc<Vec<Mutex<Slot>>> =
            Arc::new((0..n).map(|_| Mutex::new(Slot::default())).collect());
        let draining = Arc::new(AtomicBool::new(false));
        let settings = Arc::new(settings);
        let threads = (0..n)
            .map(|i| {
                let (slots, draining, settings) =
                    (slots.clone(), draining.clone(), settings.clone());
                std::thread::Builder::new()
                    .name(format!("client-loop-{i}"))
                    .spawn(move || client_loop(i, &slots[i], &draining, &settings))
                    .expect("spawn a client loop thread")
            })
            .collect();
        Clients {
            slots,
            draining,
            threads,
        }
    }

    pub fn slot(&self, i: usize) -> MutexGuard<'_, Slot> {
        lock(&self.slots[i])
    }

    /// Indexes of the loops whose client runs now.
    pub fn running(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slot(i).pid.is_some())
            .collect()
    }

    /// Waits for every loop to end; past `deadline_ms` kills what still runs as hung.
    pub fn finish(mut self, deadline_ms: u64) -> anyhow::Result<Vec<ClientRun>> {
        self.draining.store(true, Ordering::SeqCst);
        while mono_ms() < deadline_ms && !self.running().is_empty() {
            std::thread::sleep(Duration::from_millis(100));
        }
        for i in self.running() {
            let mut s = self.slot(i);
            s.hung = true;
            if let Some(pid) = s.pid {
                kill_group(pid);
            }
        }
        let mut runs = Vec::new();
        for t in self.threads.drain(..) {
            match t.join() {
                Ok(r) => runs.extend(r),
                Err(_) => bail!("a client loop thread panicked"),
            }
        }
        Ok(runs)
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.draining.store(true, Ordering::SeqCst);
        for slot in self.slots.iter() {
            if let Some(pid) = lock(slot).pid {
                kill_group(pid);
            }
        }
    }
}

fn client_loop(
    i: usize,
    slot: &Mutex<Slot>,
    draining: &AtomicBool,
    s: &LoopSettings,
) -> Vec<ClientRun> {
    let mut rng = fastrand::Rng::with_seed(s.seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let log_path = s.log_dir.join(format!("c{i:02}.log"));
    let mut runs = Vec::new();
    let mut seq = 0u32;
    while !draining.load(Ordering::SeqCst) {
        seq += 1;
        let id = format!("c{i:02}-{seq}");
        let hold_ms = rng.u64(s.hold_ms.0..=s.hold_ms.1);
        let code = s.codes[rng.usize(..s.codes.len())];
        // Our client submits through the first broker of its list that answers: rotating the
        // list spreads the leases over every broker, so each broker fault hits some.
        let brokers = rotated(&s.brokers, rng.usize(..s.brokers.len().max(1)));
        let started = mono_ms();
        let spawned = append(&log_path).and_then(|mut log| {
            writeln!(
                log,
                "=== {id}: hold {hold_ms} ms, exit {code}, at {started} ms"
            )?;
            let mut cmd = Command::new(&s.client_bin);
            cmd.arg("-b")
                .arg(&brokers)
                .args(["-n", &id])
                .args(&s.flags)
                .arg("--")
                .arg(&s.exe)
                .arg("hold")
                .arg("--log")
                .arg(&s.hold_log)
                .args(["--client", &id])
                .args(["--ms", &hold_ms.to_string()])
                .args(["--exit", &code.to_string()]);
            let err = log.try_clone()?;
            // Under the slot's lock, so the injector never signals a pid not yet recorded.
            let mut guard = lock(slot);
            let child = spawn(&mut cmd, log, err)?;
            *guard = Slot {
                id: id.clone(),
                pid: Some(child.id()),
                ..Slot::default()
            };
            Ok(child)
        });
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                eprintln!("testenv-chaos: cannot start testenv-client: {e}");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let status = child.wait();
        let ended = mono_ms();
        let mut guard = lock(slot);
        guard.pid = None;
        let exit = match status {
            Ok(st) => match (st.code(), st.signal()) {
                (Some(c), _) => Exit::Code(c),
                (None, Some(sig)) => Exit::Signal(sig),
                (None, None) => Exit::Signal(0),
            },
            Err(_) => Exit::Signal(0),
        };
        runs.push(ClientRun {
            id,
            started_ms: started,
            ended_ms: ended,
            exit,
            code,
            killed_ms: guard.killed_ms,
            terminated_ms: guard.terminated_ms,
            hung: guard.hung,
        });
        drop(guard);
        // A short random pause, so the loops do not move in step.
        std::thread::sleep(Duration::from_millis(rng.u64(0..=300)));
    }
    runs
}
