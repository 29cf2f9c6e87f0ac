//! One chaos run, start to verdict: brokers, workers and client loops up; faults injected
//! on schedule (each undone after a while); the drain; the facts handed to the checker.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::check::{check, Bounds, ClientRun, FaultRecord, Report, Resumes, RunFacts};
use crate::clock::mono_ms;
use crate::fleet::{rotated, signal, worker, Broker, Clients, LoopSettings, Service};
use crate::holdlog::{parse_log, HoldEvent, HoldKind};
use crate::netns::Netns;
use crate::schedule::{schedule, FaultKind, ScheduleSettings};

/// What an agent logs when a lease survives the loss of its carrier (issue 8's resume); each
/// line of the agents' logs holding it counts as one resume.
pub const RESUME_LOG_MARK: &str = "lease resumed";

/// The exit statuses COMMAND is told to return, at random.
const COMMAND_CODES: [i32; 2] = [0, 7];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetnsMode {
    Auto,
    Off,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub duration: Duration,
    pub seed: u64,
    pub tes: usize,
    pub clients: usize,
    pub brokers: usize,
    pub netns: NetnsMode,
    pub faults: Vec<FaultKind>,
    pub mean_gap: Duration,
    pub hold: (Duration, Duration),
    pub agent_flags: Vec<String>,
    pub client_flags: Vec<String>,
    pub bin: PathBuf,
    pub out: PathBuf,
    pub bounds: Bounds,
    pub verbose: bool,
}

pub struct Outcome {
    pub report: Report,
    pub header: String,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether SIGINT or SIGTERM asked the run to stop.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// What undoes a fault, and when.
#[derive(Debug)]
enum Undo {
    RestartWorker(usize),
    ContWorker(usize),
    RestartBroker(usize),
    ContBroker(usize),
    ContClient { slot: usize, id: String },
    Restore,
}

struct Pending {
    at_ms: u64,
    undo: Undo,
    fault: usize,
}

/// Every process of the run. Fields drop in order: clients first (their guards kill their
/// COMMANDs), then workers, brokers and the namespace.
struct Fleet {
    clients: Option<Clients>,
    workers: Vec<Service>,
    brokers: Vec<Broker>,
    netns: Option<Netns>,
    faults: Vec<FaultRecord>,
    pending: Vec<Pending>,
    skipped: BTreeMap<FaultKind, usize>,
    fault_log: std::fs::File,
    hold_log: PathBuf,
    started_ms: u64,
    verbose: bool,
}

impl Fleet {
    fn note(&mut self, text: &str) {
        let line = format!(
            "+{:.1}s {text}",
            mono_ms().saturating_sub(self.started_ms) as f64 / 1000.0
        );
        let _ = writeln!(self.fault_log, "{line}");
        if self.verbose {
            println!("{line}");
        }
    }

    /// Records a fault that began at `at`: taken before acting, since the agents may react
    /// to a kill before the runner has reaped the process.
    fn record(
        &mut self,
        at: u64,
        kind: FaultKind,
        target: &str,
        lasts: Duration,
        hit: bool,
    ) -> usize {
        self.faults.push(FaultRecord {
            kind,
            target: target.to_string(),
            at_ms: at,
            until_ms: at + lasts.as_millis() as u64,
            hit,
        });
        self.note(&format!(
            "{kind} {target}{}",
            if hit {
                format!(" for {:.1}s", lasts.as_secs_f64())
            } else {
                " (no target)".into()
            }
        ));
        self.faults.len() - 1
    }

    fn later(&mut self, fault: usize, lasts: Duration, undo: Undo) {
        self.pending.push(Pending {
            at_ms: mono_ms() + lasts.as_millis() as u64,
            undo,
            fault,
        });
    }

    fn inject(&mut self, kind: FaultKind, lasts: Duration, pick: u64) -> anyhow::Result<()> {
        let at = mono_ms();
        let choose = |candidates: &[usize]| -> Option<usize> {
            (!candidates.is_empty()).then(|| candidates[(pick % candidates.len() as u64) as usize])
        };
        match kind {
            FaultKind::KillClient | FaultKind::StopClient => {
                let holding = holders(&self.hold_log);
                let clients = self.clients.as_ref().expect("clients run");
                let running = clients.running();
                let holders: Vec<usize> = running
                    .iter()
                    .copied()
                    .filter(|&i| holding.contains(&clients.slot(i).id))
                    .collect();
                // Mostly a holder: a kill then tests the guard and the reclaim, a stop a
                // lease that must go on.
                let pool = if !(pick >> 40).is_multiple_of(4) && !holders.is_empty() {
                    holders
                } else {
                    running
                };
                let Some(i) = choose(&pool) else {
                    self.record(at, kind, "-", lasts, false);
                    return Ok(());
                };
                let mut slot = clients.slot(i);
                let (Some(pid), id) = (slot.pid, slot.id.clone()) else {
                    drop(slot);
                    self.record(at, kind, "-", lasts, false);
                    return Ok(());
                };
                // The holder search above took a while: the fault's time is the signal's.
                let at = mono_ms();
                if kind == FaultKind::KillClient {
                    slot.killed_ms = Some(at);
                    signal(pid, libc::SIGKILL);
                    drop(slot);
                    self.record(at, kind, &id, lasts, true);
                } else {
                    signal(pid, libc::SIGSTOP);
                    drop(slot);
                    let f = self.record(at, kind, &id, lasts, true);
                    self.later(f, lasts, Undo::ContClient { slot: i, id });
                }
            }
            FaultKind::KillWorker | FaultKind::StopWorker => {
                let up: Vec<usize> = (0..self.workers.len())
                    .filter(|&i| self.workers[i].up() && !self.workers[i].stopped)
                    .collect();
                let Some(i) = choose(&up) else {
                    self.record(at, kind, "-", lasts, false);
                    return Ok(());
                };
                let target = self.workers[i].target.clone();
                if kind == FaultKind::KillWorker {
                    self.workers[i].kill();
                    let f = self.record(at, kind, &target, lasts, true);
                    self.later(f, lasts, Undo::RestartWorker(i));
                } else {
                    let hit = self.workers[i].stop();
                    let f = self.record(at, kind, &target, lasts, hit);
                    self.later(f, lasts, Undo::ContWorker(i));
                }
            }
            FaultKind::KillBroker | FaultKind::StopBroker => {
                let up: Vec<usize> = (0..self.brokers.len())
                    .filter(|&i| self.brokers[i].service.up() && !self.brokers[i].service.stopped)
                    .collect();
                let Some(i) = choose(&up) else {
                    self.record(at, kind, "-", lasts, false);
                    return Ok(());
                };
                let target = self.brokers[i].service.target.clone();
                if kind == FaultKind::KillBroker {
                    self.brokers[i].service.kill();
                    let f = self.record(at, kind, &target, lasts, true);
                    self.later(f, lasts, Undo::RestartBroker(i));
                } else {
                    let hit = self.brokers[i].service.stop();
                    let f = self.record(at, kind, &target, lasts, hit);
                    self.later(f, lasts, Undo::ContBroker(i));
                }
            }
            FaultKind::CutNetwork => {
                let Some(ns) = &self.netns else {
                    *self.skipped.entry(kind).or_default() += 1;
                    self.note("cut-network skipped: no network namespace");
                    return Ok(());
                };
                let cut = ns.cut();
                match cut {
                    Ok(()) => {
                        let f = self.record(at, kind, "b", lasts, true);
                        self.later(f, lasts, Undo::Restore);
                    }
                    Err(e) => {
                        *self.skipped.entry(kind).or_default() += 1;
                        self.note(&format!("cut-network skipped: {e}"));
                    }
                }
            }
        }
        Ok(())
    }

    fn undo(&mut self, p: Pending) -> anyhow::Result<()> {
        let what = format!("{:?}", p.undo);
        match p.undo {
            Undo::RestartWorker(i) => self.workers[i].start()?,
            Undo::ContWorker(i) => self.workers[i].cont(),
            Undo::RestartBroker(i) => self.brokers[i].start()?,
            Undo::ContBroker(i) => self.brokers[i].service.cont(),
            Undo::ContClient { slot, id } => {
                if let Some(clients) = &self.clients {
                    let s = clients.slot(slot);
                    if let (Some(pid), true) = (s.pid, s.id == id) {
                        signal(pid, libc::SIGCONT);
                    }
                }
            }
            Undo::Restore => {
                if let Some(ns) = &self.netns {
                    ns.restore().map_err(anyhow::Error::msg)?;
                }
            }
        }
        self.faults[p.fault].until_ms = mono_ms();
        self.note(&format!("undo {what}"));
        Ok(())
    }

    /// Undoes every fault whose time has come (all of them with `all`).
    fn undo_due(&mut self, all: bool) -> anyhow::Result<()> {
        let now = mono_ms();
        self.pending.sort_by_key(|p| p.at_ms);
        while let Some(p) = self.pending.first() {
            if !all && p.at_ms > now {
                break;
            }
            let p = self.pending.remove(0);
            self.undo(p)?;
        }
        Ok(())
    }

    /// Sleeps until `until_ms`, undoing faults as they come due; false if interrupted.
    fn wait_until(&mut self, until_ms: u64) -> anyhow::Result<bool> {
        loop {
            self.undo_due(false)?;
            let now = mono_ms();
            if interrupted() {
                return Ok(false);
            }
            if now >= until_ms {
                return Ok(true);
            }
            let next = self
                .pending
                .iter()
                .map(|p| p.at_ms)
                .min()
                .unwrap_or(u64::MAX)
                .min(until_ms);
            std::thread::sleep(Duration::from_millis(
                next.saturating_sub(now).clamp(1, 100),
            ));
        }
    }
}

/// The clients whose COMMAND runs now, from the hold log.
fn holders(hold_log: &Path) -> BTreeSet<String> {
    let mut holding = BTreeSet::new();
    for e in parse_log(&std::fs::read_to_string(hold_log).unwrap_or_default()).events {
        if e.kind == HoldKind::Start {
            holding.insert(e.client);
        } else {
            holding.remove(&e.client);
        }
    }
    holding
}

/// The TEs that are not free on some broker: not registered for `lockenv`, or leased.
fn busy_tes(rt: &tokio::runtime::Runtime, brokers: &[Broker], tes: &[String]) -> Vec<String> {
    let mut busy = BTreeSet::new();
    for b in brokers {
        let server = gearman_client::ServerAddr::new(b.host.clone(), b.port);
        let ask = |cmd: &str| {
            rt.block_on(gearman_client::admin::query(
                &server,
                cmd,
                Duration::from_secs(5),
            ))
        };
        let (Ok(workers), Ok(leases)) = (ask("workers"), ask("leases")) else {
            busy.extend(tes.iter().cloned());
            continue;
        };
        let registered: BTreeSet<&str> = workers
            .iter()
            .filter_map(|l| l.split_once(" : "))
            .filter(|(_, funcs)| funcs.split_whitespace().any(|f| f == "lockenv"))
            .filter_map(|(conn, _)| conn.split_whitespace().last())
            .collect();
        let leased: BTreeSet<&str> = leases.iter().filter_map(|l| l.split('\t').nth(1)).collect();
        for te in tes {
            let id = format!("testenv-worker-{te}");
            if !registered.contains(id.as_str()) || leased.contains(id.as_str()) {
                busy.insert(te.clone());
            }
        }
    }
    busy.into_iter().collect()
}

/// The `lease start` lines of the workers' logs in `dir` (one `TE.log` per TE, its restarts
/// appended), as (TE, ms on the hold log's monotonic clock). The logs stamp wall-clock time;
/// the hold log has both clocks, which gives the offset.
fn worker_lease_starts(dir: &Path, holds: &[HoldEvent]) -> Vec<(String, u64)> {
    let mut offsets: Vec<i64> = holds
        .iter()
        .map(|e| e.mono_ms as i64 - e.wall_ms as i64)
        .collect();
    offsets.sort_unstable();
    let Some(&offset) = offsets.get(offsets.len() / 2) else {
        return Vec::new();
    };
    let mut starts = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return starts;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(te) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".log"))
        else {
            continue;
        };
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mark = format!("lease start tenum=\"{te}\"");
        for line in text.lines().filter(|l| l.contains(&mark)) {
            let stamp = line.split_whitespace().next().unwrap_or_default();
            let Ok(at) = humantime::parse_rfc3339(stamp) else {
                continue;
            };
            let Ok(wall) = at.duration_since(std::time::UNIX_EPOCH) else {
                continue;
            };
            if let Ok(mono) = u64::try_from(wall.as_millis() as i64 + offset) {
                starts.push((te.to_string(), mono));
            }
        }
    }
    starts
}

/// Lines holding [`RESUME_LOG_MARK`] in every file under `dir`.
fn count_resumes(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let path = e.path();
            if path.is_dir() {
                count_resumes(&path)
            } else {
                std::fs::read(&path)
                    .map(|b| {
                        String::from_utf8_lossy(&b)
                            .lines()
                            .filter(|l| l.contains(RESUME_LOG_MARK))
                            .count()
                    })
                    .unwrap_or(0)
            }
        })
        .sum()
}

/// Every client run as a line of `OUT/runs.tsv` (times in seconds from the start).
fn write_runs(path: &Path, t0: u64, runs: &[ClientRun]) -> std::io::Result<()> {
    let secs = |t: u64| format!("{:.3}", t.saturating_sub(t0) as f64 / 1000.0);
    let opt = |t: Option<u64>| t.map_or("-".to_string(), secs);
    let mut text =
        String::from("client\tstarted\tended\texit\tcommand_code\tkilled\tterminated\thung\n");
    for r in runs {
        text.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            r.id,
            secs(r.started_ms),
            secs(r.ended_ms),
            r.exit,
            r.code,
            opt(r.killed_ms),
            opt(r.terminated_ms),
            r.hung
        ));
    }
    std::fs::write(path, text)
}

pub fn run(o: &Options) -> anyhow::Result<Outcome> {
    for program in ["tebroker", "testenv-worker", "testenv-client"] {
        if !o.bin.join(program).is_file() {
            bail!(
                "{} not found in {} (build it: cargo build -p tebroker -p testenv)",
                program,
                o.bin.display()
            );
        }
    }
    if o.brokers == 0 || o.tes == 0 || o.clients == 0 {
        bail!("--brokers, --tes and --clients must be at least 1");
    }
    let exe = std::env::current_exe().context("where is testenv-chaos?")?;
    for d in ["brokers", "workers", "clients"] {
        std::fs::create_dir_all(o.out.join(d))?;
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        let h = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGINT, h);
        libc::signal(libc::SIGTERM, h);
    }

    let wants_cut = o.faults.contains(&FaultKind::CutNetwork) && o.brokers >= 2;
    let mut notes = Vec::new();
    let netns = match (o.netns, wants_cut) {
        (NetnsMode::Off, true) => {
            notes.push("network cut: off (--netns off)".to_string());
            None
        }
        (NetnsMode::Auto, true) => match Netns::create(std::process::id()) {
            Ok(ns) => {
                notes.push(format!(
                    "network cut: broker b in network namespace {} at {}",
                    ns.name, ns.ns_ip
                ));
                Some(ns)
            }
            Err(why) => {
                notes.push(format!(
                    "network cut: skipped, no network namespace ({why})"
                ));
                None
            }
        },
        (_, false) => None,
    };
    let header = format!(
        "testenv-chaos: seed {} (replay: --seed {}), {}s, {} brokers, {} TEs, {} clients, faults {}\n{}logs: {}",
        o.seed,
        o.seed,
        o.duration.as_secs(),
        o.brokers,
        o.tes,
        o.clients,
        o.faults.iter().map(|k| k.name()).collect::<Vec<_>>().join(","),
        notes.iter().map(|n| format!("{n}\n")).collect::<String>(),
        o.out.display()
    );
    println!("{header}");

    let hold_log = o.out.join("holds.log");
    let fault_log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(o.out.join("faults.log"))?;
    let mut fleet = Fleet {
        clients: None,
        workers: Vec::new(),
        brokers: Vec::new(),
        netns,
        faults: Vec::new(),
        pending: Vec::new(),
        skipped: BTreeMap::new(),
        fault_log,
        hold_log: hold_log.clone(),
        started_ms: mono_ms(),
        verbose: o.verbose,
    };
    let broker_dir = o.out.join("brokers");
    for i in 0..o.brokers {
        let name = ((b'a' + (i % 26) as u8) as char).to_string();
        let in_ns = (i == 1).then_some(()).and(fleet.netns.as_ref());
        let host = in_ns.map_or("127.0.0.1".to_string(), |n| n.ns_ip.clone());
        fleet
            .brokers
            .push(Broker::new(&name, &o.bin, &host, in_ns, &broker_dir)?);
    }
    let brokers: Vec<String> = fleet.brokers.iter().map(|b| b.addr()).collect();
    let tes: Vec<String> = (1..=o.tes).map(|i| format!("te{i:02}")).collect();
    for (i, te) in tes.iter().enumerate() {
        // Workers submit callbacks through the first broker of their list: spread them too.
        fleet.workers.push(worker(
            te,
            &o.bin,
            &rotated(&brokers, i),
            &o.agent_flags,
            &o.out.join("workers"),
        )?);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ready_by = mono_ms() + 30_000;
    while !busy_tes(&rt, &fleet.brokers, &tes).is_empty() {
        if mono_ms() > ready_by || interrupted() {
            bail!(
                "the workers did not register with every broker within 30 s: {:?}; see {}",
                busy_tes(&rt, &fleet.brokers, &tes),
                o.out.join("workers").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    fleet.started_ms = mono_ms();
    fleet.clients = Some(Clients::start(
        o.clients,
        LoopSettings {
            client_bin: o.bin.join("testenv-client"),
            exe,
            brokers: brokers.clone(),
            flags: o.client_flags.clone(),
            hold_log: hold_log.clone(),
            log_dir: o.out.join("clients"),
            hold_ms: (o.hold.0.as_millis() as u64, o.hold.1.as_millis() as u64),
            codes: COMMAND_CODES.to_vec(),
            seed: o.seed,
        },
    ));
    let plan = schedule(
        o.seed,
        &ScheduleSettings {
            duration: o.duration,
            warmup: Duration::from_secs(5).min(o.duration / 4),
            mean_gap: o.mean_gap,
            kinds: o.faults.clone(),
            cut_min: gearman_client::Keepalive::default().bound() + Duration::from_secs(5),
            cut_every: Duration::from_secs(300),
        },
    );
    let t0 = fleet.started_ms;
    for f in &plan {
        if !fleet.wait_until(t0 + f.at.as_millis() as u64)? {
            break;
        }
        fleet.inject(f.kind, f.lasts, f.pick)?;
    }
    let finished = fleet.wait_until(t0 + o.duration.as_millis() as u64)?;
    if !finished || interrupted() {
        bail!("interrupted");
    }

    // The drain: faults undone, no new clients, waiting ones stopped, holders finish.
    fleet.note("drain");
    fleet.undo_due(true)?;
    let demand_until_ms = mono_ms();
    let clients = fleet.clients.take().expect("clients run");
    clients.draining.store(true, Ordering::SeqCst);
    let started: BTreeSet<String> =
        parse_log(&std::fs::read_to_string(&hold_log).unwrap_or_default())
            .events
            .into_iter()
            .map(|e| e.client)
            .collect();
    for i in clients.running() {
        let mut s = clients.slot(i);
        if let (Some(pid), false) = (s.pid, started.contains(&s.id)) {
            s.terminated_ms = Some(mono_ms());
            signal(pid, libc::SIGTERM);
        }
    }
    let drain_bound = o.hold.1 + Duration::from_secs(60);
    let runs = clients.finish(mono_ms() + drain_bound.as_millis() as u64)?;
    fleet.note("every client has ended");
    let free_by = mono_ms() + o.bounds.disturbed_reclaim_ms;
    let mut not_free = busy_tes(&rt, &fleet.brokers, &tes);
    while !not_free.is_empty() && mono_ms() < free_by && !interrupted() {
        std::thread::sleep(Duration::from_millis(500));
        not_free = busy_tes(&rt, &fleet.brokers, &tes);
    }
    fleet.note(&format!("TEs not free: {not_free:?}"));
    fleet.note("stop");
    for w in &mut fleet.workers {
        w.terminate(Duration::from_secs(5));
    }
    for b in &mut fleet.brokers {
        b.service.terminate(Duration::from_secs(5));
    }

    write_runs(&o.out.join("runs.tsv"), fleet.started_ms, &runs)?;
    let holds = parse_log(&std::fs::read_to_string(&hold_log).unwrap_or_default());
    let lease_starts = worker_lease_starts(&o.out.join("workers"), &holds.events);
    let facts = RunFacts {
        lease_starts,
        started_ms: fleet.started_ms,
        demand_until_ms,
        holds: holds.events,
        bad_hold_lines: holds.bad_lines,
        clients: runs,
        faults: std::mem::take(&mut fleet.faults),
        skipped: std::mem::take(&mut fleet.skipped),
        not_free_at_end: not_free,
        tes: o.tes,
        resumes: Resumes {
            clients: count_resumes(&o.out.join("clients")),
            workers: count_resumes(&o.out.join("workers")),
        },
    };
    let report = check(&facts, &o.bounds);
    Ok(Outcome { report, header })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_lease_starts_are_read_from_the_logs_on_the_hold_logs_clock() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("te07.log"),
            "2026-12-01T14:04:13.858362Z  INFO testenv::lease: lease end tenum=\"te07\" holder=\"callback_c59-13\" outcome=Completed\n\
             2026-12-01T14:04:13.859881Z  INFO testenv::lease: lease start tenum=\"te07\" holder=\"callback_c13-10\" job=\"No change: \"\n\
             garbage lease start tenum=\"te07\"\n",
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("te07")).unwrap();
        let wall_at = 1_796_133_853_859u64; // 2026-12-01T14:04:13.859Z
        let hold = HoldEvent {
            kind: HoldKind::Start,
            te: "te07".into(),
            client: "c1".into(),
            pid: 1,
            mono_ms: 5_000,
            wall_ms: wall_at - 1_000,
            code: 0,
        };
        assert_eq!(
            worker_lease_starts(dir.path(), &[hold]),
            [("te07".to_string(), 6_000)]
        );
        assert!(worker_lease_starts(dir.path(), &[]).is_empty());
    }
}
