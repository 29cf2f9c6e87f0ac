//! The checker: from the hold log, the client runs and the faults of one run, what went wrong.
//! Pure: every fact comes in as data (times in CLOCK_MONOTONIC milliseconds), so it is tested
//! on synthetic runs that contain each kind of violation.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use crate::holdlog::{HoldEvent, HoldKind};
use crate::schedule::FaultKind;

/// How a client run ended, as its parent saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit {c}"),
            Exit::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// One testenv-client process the runner started.
#[derive(Debug, Clone)]
pub struct ClientRun {
    /// Also the CLIENT of its hold-log lines.
    pub id: String,
    pub started_ms: u64,
    pub ended_ms: u64,
    pub exit: Exit,
    /// The exit status its COMMAND was told to return.
    pub code: i32,
    /// When the runner SIGKILLed it (a fault).
    pub killed_ms: Option<u64>,
    /// When the runner SIGTERMed it (the drain stops clients still waiting for a TE).
    pub terminated_ms: Option<u64>,
    /// Still running when the drain's deadline passed (then killed).
    pub hung: bool,
}

/// A fault as it was injected. `target` is a client run id, a TE name (its worker) or a
/// broker name; `hit` is false when there was nothing to hit (no client running).
#[derive(Debug, Clone)]
pub struct FaultRecord {
    pub kind: FaultKind,
    pub target: String,
    pub at_ms: u64,
    pub until_ms: u64,
    pub hit: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// A killed client's guard SIGKILLs COMMAND at once (PR_SET_PDEATHSIG); a COMMAND still
    /// writing after this is one the guard missed.
    pub guard_kill_ms: u64,
    /// From a holder's death to the TE's next lease, with no other fault around.
    pub reclaim_ms: u64,
    /// The same when the TE's worker or a broker was hit meanwhile: a restarted worker's
    /// quarantine (holder grace, plus the resume grace of a resumable lease), a broker's
    /// keepalive bound. Also how long the TEs may take to be free at the end.
    pub disturbed_reclaim_ms: u64,
}

impl Default for Bounds {
    fn default() -> Bounds {
        Bounds {
            guard_kill_ms: 1_000,
            reclaim_ms: 10_000,
            disturbed_reclaim_ms: 150_000,
        }
    }
}

/// Everything one run produced.
#[derive(Debug, Clone, Default)]
pub struct RunFacts {
    pub started_ms: u64,
    /// When clients stopped starting (the drain began): no demand for a TE after it.
    pub demand_until_ms: u64,
    pub holds: Vec<HoldEvent>,
    pub bad_hold_lines: Vec<(usize, String)>,
    pub clients: Vec<ClientRun>,
    pub faults: Vec<FaultRecord>,
    /// Faults the schedule planned but the run could not inject (e.g. no netns), by kind.
    pub skipped: BTreeMap<FaultKind, usize>,
    /// TEs not free again at the end (after the drain), as the runner found them.
    pub not_free_at_end: Vec<String>,
    pub tes: usize,
    /// Lines of the clients' and of the workers' logs that say a lease was resumed.
    pub resumes: Resumes,
    /// When each TE's worker started a lease (its `lease start` lines), on the hold log's
    /// monotonic clock: a TE counts as reclaimed when it is leased again, even if the next
    /// holder's COMMAND starts much later (its callback lost in a fault, say).
    pub lease_starts: Vec<(String, u64)>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resumes {
    pub clients: usize,
    pub workers: usize,
}

/// The exit statuses README's table documents besides COMMAND's own.
pub fn documented_exit_codes() -> [i32; 4] {
    [
        1, // the lock request ended without an environment 6 times
        testenv::client::EXIT_NO_ENV,
        testenv::client::EXIT_LEASE_LOST,
        testenv::client::EXIT_TIMEOUT,
    ]
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    BadHoldLine {
        line: usize,
        why: String,
    },
    BadHoldSequence {
        client: String,
        why: String,
    },
    Overlap {
        te: String,
        first: String,
        second: String,
        by_ms: u64,
    },
    CommandOutlivedClient {
        client: String,
        te: String,
        after_ms: u64,
    },
    SlowReclaim {
        te: String,
        client: String,
        reclaim_ms: u64,
        bound_ms: u64,
    },
    NotReclaimed {
        te: String,
        client: String,
    },
    BadExit {
        client: String,
        exit: Exit,
        code: i32,
    },
    HungClient {
        client: String,
    },
    CutLease {
        client: String,
        te: String,
        fault: String,
        exit: Exit,
        ended: bool,
    },
    NotFreeAtEnd {
        te: String,
    },
}

impl Violation {
    /// A short name for counting violations by kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Violation::BadHoldLine { .. } => "bad hold-log line",
            Violation::BadHoldSequence { .. } => "bad hold sequence",
            Violation::Overlap { .. } => "overlap",
            Violation::CommandOutlivedClient { .. } => "command outlived its client",
            Violation::SlowReclaim { .. } => "slow reclaim",
            Violation::NotReclaimed { .. } => "not reclaimed",
            Violation::BadExit { .. } => "bad exit",
            Violation::HungClient { .. } => "hung client",
            Violation::CutLease { .. } => "cut lease",
            Violation::NotFreeAtEnd { .. } => "TE not free at the end",
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.kind())?;
        match self {
            Violation::BadHoldLine { line, why } => write!(f, "line {line}: {why}"),
            Violation::BadHoldSequence { client, why } => write!(f, "{client}: {why}"),
            Violation::Overlap { te, first, second, by_ms } => {
                write!(f, "{te} held by {first} and {second} at once for {by_ms} ms")
            }
            Violation::CommandOutlivedClient { client, te, after_ms } => write!(
                f,
                "{client}'s COMMAND on {te} was still running {after_ms} ms after its client ended"
            ),
            Violation::SlowReclaim { te, client, reclaim_ms, bound_ms } => write!(
                f,
                "{te} leased again {reclaim_ms} ms after its holder {client} was killed (bound {bound_ms} ms)"
            ),
            Violation::NotReclaimed { te, client } => write!(
                f,
                "{te} never leased again after its holder {client} was killed, while clients waited"
            ),
            Violation::BadExit { client, exit, code } => write!(
                f,
                "{client} ended with {exit}; expected its COMMAND's {code} or a documented code"
            ),
            Violation::HungClient { client } => {
                write!(f, "{client} was still running at the end of the drain")
            }
            Violation::CutLease { client, te, fault, exit, ended } => write!(
                f,
                "{client} on {te}, active at {fault}: {exit}{}",
                if *ended { "" } else { ", COMMAND did not finish" }
            ),
            Violation::NotFreeAtEnd { te } => write!(f, "{te}"),
        }
    }
}

/// A lease as the hold log shows it, tied to its client run.
#[derive(Debug, Clone)]
struct Lease<'a> {
    te: String,
    client: String,
    start_ms: u64,
    end_ms: Option<u64>,
    term_ms: Option<u64>,
    code: i32,
    run: Option<&'a ClientRun>,
}

impl Lease<'_> {
    /// When COMMAND stopped: its last line, else its client's end (a SIGKILLed COMMAND writes
    /// nothing; its guard kills it with the client), else never.
    fn over_ms(&self) -> u64 {
        self.end_ms
            .or(self.term_ms)
            .or_else(|| self.run.map(|r| r.killed_ms.unwrap_or(r.ended_ms)))
            .unwrap_or(u64::MAX)
    }

    fn active_at(&self, t: u64) -> bool {
        self.start_ms <= t && t < self.over_ms()
    }

    /// The runner ended this lease's client itself: what happened to it is no fault of the
    /// agents.
    fn client_killed_during(&self) -> Option<u64> {
        self.run
            .and_then(|r| r.killed_ms)
            .filter(|&k| k >= self.start_ms)
    }

    fn outcome(&self) -> &'static str {
        let Some(run) = self.run else {
            return "no client run";
        };
        if self.client_killed_during().is_some() {
            "holder killed"
        } else if run.terminated_ms.is_some() {
            "stopped by the runner"
        } else if self.end_ms.is_some() && run.exit == Exit::Code(self.code) {
            "delivered"
        } else if run.exit == Exit::Code(testenv::client::EXIT_LEASE_LOST) {
            "taken back"
        } else {
            "other"
        }
    }
}

/// A holder's death and how long its TE took to be leased again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reclaim {
    pub te: String,
    pub client: String,
    pub ms: Option<u64>,
    pub disturbed: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub faults_by_kind: BTreeMap<FaultKind, usize>,
    pub missed_by_kind: BTreeMap<FaultKind, usize>,
    pub skipped_by_kind: BTreeMap<FaultKind, usize>,
    pub leases_by_outcome: BTreeMap<&'static str, usize>,
    pub leases: usize,
    pub client_runs: usize,
    pub exits: BTreeMap<String, usize>,
    pub reclaims: Vec<Reclaim>,
    /// Reclaims that could not be judged: the holder died too close to the drain.
    pub reclaims_unchecked: usize,
    pub leases_at_broker_faults: usize,
    pub cut_leases: usize,
    pub resumes: Resumes,
    pub tes: usize,
    pub not_free_at_end: usize,
    pub violations: Vec<Violation>,
}

fn percentile(sorted: &[u64], p: usize) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let i = (sorted.len() - 1) * p / 100;
    sorted.get(i).copied()
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// Reclaim times (ms) of the cases that were measured, sorted.
    pub fn reclaim_times(&self) -> Vec<u64> {
        let mut t: Vec<u64> = self.reclaims.iter().filter_map(|r| r.ms).collect();
        t.sort_unstable();
        t
    }

    /// The counts as JSON (`OUT/report.json`), for scripts and tests.
    pub fn summary_json(&self) -> serde_json::Value {
        let by_name = |m: &BTreeMap<FaultKind, usize>| -> BTreeMap<&'static str, usize> {
            m.iter().map(|(k, n)| (k.name(), *n)).collect()
        };
        let times = self.reclaim_times();
        serde_json::json!({
            "faults": self.faults_by_kind.values().sum::<usize>(),
            "faults_by_kind": by_name(&self.faults_by_kind),
            "faults_missed_by_kind": by_name(&self.missed_by_kind),
            "faults_skipped_by_kind": by_name(&self.skipped_by_kind),
            "leases": self.leases,
            "leases_by_outcome": self.leases_by_outcome,
            "client_runs": self.client_runs,
            "exits": self.exits,
            "reclaims": self.reclaims.len(),
            "reclaim_p50_ms": percentile(&times, 50),
            "reclaim_max_ms": times.last(),
            "reclaims_unchecked": self.reclaims_unchecked,
            "leases_at_broker_faults": self.leases_at_broker_faults,
            "cut_leases": self.cut_leases,
            "resumes_clients": self.resumes.clients,
            "resumes_workers": self.resumes.workers,
            "tes": self.tes,
            "tes_not_free_at_end": self.not_free_at_end,
            "violations": self.violations.len(),
            "violations_by_kind": self.violations_by_kind(),
            "violation_lines": self.violations.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
        })
    }

    pub fn violations_by_kind(&self) -> BTreeMap<&'static str, usize> {
        let mut by = BTreeMap::new();
        for v in &self.violations {
            *by.entry(v.kind()).or_default() += 1;
        }
        by
    }
}

fn counts<K: fmt::Display>(map: &BTreeMap<K, usize>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn secs(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let injected: usize = self.faults_by_kind.values().sum();
        writeln!(
            f,
            "faults injected: {injected} ({})",
            counts(&self.faults_by_kind)
        )?;
        if !self.missed_by_kind.is_empty() {
            writeln!(
                f,
                "faults with no target then: {}",
                counts(&self.missed_by_kind)
            )?;
        }
        if !self.skipped_by_kind.is_empty() {
            writeln!(f, "faults skipped: {}", counts(&self.skipped_by_kind))?;
        }
        writeln!(
            f,
            "leases: {} ({})",
            self.leases,
            counts(&self.leases_by_outcome)
        )?;
        writeln!(
            f,
            "client runs: {} ({})",
            self.client_runs,
            counts(&self.exits)
        )?;
        let overlaps = self
            .violations
            .iter()
            .filter(|v| matches!(v, Violation::Overlap { .. }))
            .count();
        writeln!(f, "overlaps (two holders of one TE at once): {overlaps}")?;
        let times = self.reclaim_times();
        let disturbed = self.reclaims.iter().filter(|r| r.disturbed).count();
        match (percentile(&times, 50), times.last()) {
            (Some(p50), Some(max)) => writeln!(
                f,
                "reclaim after a holder was killed: {} cases, p50 {}, max {} ({disturbed} near another fault; {} unchecked: too close to the drain)",
                self.reclaims.len(),
                secs(p50),
                secs(*max),
                self.reclaims_unchecked
            )?,
            _ => writeln!(
                f,
                "reclaim after a holder was killed: {} cases ({} unchecked)",
                self.reclaims.len(),
                self.reclaims_unchecked
            )?,
        }
        writeln!(
            f,
            "cut leases: {} of {} leases active at a broker kill or network cut",
            self.cut_leases, self.leases_at_broker_faults
        )?;
        writeln!(
            f,
            "resumes seen: {} in clients' logs, {} in workers' logs",
            self.resumes.clients, self.resumes.workers
        )?;
        writeln!(
            f,
            "TEs free at the end: {} of {}",
            self.tes.saturating_sub(self.not_free_at_end),
            self.tes
        )?;
        writeln!(
            f,
            "violations: {} ({})",
            self.violations.len(),
            counts(&self.violations_by_kind())
        )?;
        for v in &self.violations {
            writeln!(f, "  {v}")?;
        }
        Ok(())
    }
}

pub fn check(facts: &RunFacts, bounds: &Bounds) -> Report {
    let mut report = Report {
        tes: facts.tes,
        resumes: facts.resumes,
        skipped_by_kind: facts.skipped.clone(),
        client_runs: facts.clients.len(),
        ..Report::default()
    };
    let rel = |t: u64| secs(t.saturating_sub(facts.started_ms));
    for f in &facts.faults {
        let map = if f.hit {
            &mut report.faults_by_kind
        } else {
            &mut report.missed_by_kind
        };
        *map.entry(f.kind).or_default() += 1;
    }
    for (line, why) in &facts.bad_hold_lines {
        report.violations.push(Violation::BadHoldLine {
            line: *line,
            why: why.clone(),
        });
    }

    let runs: HashMap<&str, &ClientRun> =
        facts.clients.iter().map(|r| (r.id.as_str(), r)).collect();
    let leases = leases(facts, &runs, &mut report.violations);
    report.leases = leases.len();
    for l in &leases {
        *report.leases_by_outcome.entry(l.outcome()).or_default() += 1;
    }

    check_overlaps(&leases, &mut report.violations);
    check_guard(&leases, bounds, &mut report.violations);
    check_reclaims(facts, &leases, bounds, &mut report);
    check_exits(facts, &mut report);
    check_cut_leases(facts, &leases, &mut report, &rel);
    for te in &facts.not_free_at_end {
        report
            .violations
            .push(Violation::NotFreeAtEnd { te: te.clone() });
    }
    report.not_free_at_end = facts.not_free_at_end.len();
    report
}

/// One lease per client run that logged a `start`; anything else in the log is a violation.
fn leases<'a>(
    facts: &RunFacts,
    runs: &HashMap<&str, &'a ClientRun>,
    violations: &mut Vec<Violation>,
) -> Vec<Lease<'a>> {
    let mut by_client: BTreeMap<&str, Lease<'a>> = BTreeMap::new();
    let mut bad = |client: &str, why: String| {
        violations.push(Violation::BadHoldSequence {
            client: client.to_string(),
            why,
        })
    };
    for e in &facts.holds {
        match e.kind {
            HoldKind::Start => {
                if by_client.contains_key(e.client.as_str()) {
                    bad(&e.client, "two `start` lines: COMMAND ran twice".into());
                    continue;
                }
                by_client.insert(
                    &e.client,
                    Lease {
                        te: e.te.clone(),
                        client: e.client.clone(),
                        start_ms: e.mono_ms,
                        end_ms: None,
                        term_ms: None,
                        code: e.code,
                        run: runs.get(e.client.as_str()).copied(),
                    },
                );
            }
            HoldKind::End | HoldKind::Term => {
                let Some(l) = by_client.get_mut(e.client.as_str()) else {
                    bad(&e.client, format!("`{:?}` without a `start`", e.kind));
                    continue;
                };
                if l.end_ms.is_some() || l.term_ms.is_some() || l.te != e.te {
                    bad(
                        &e.client,
                        "more than one end, or the end names another TE".into(),
                    );
                    continue;
                }
                if e.kind == HoldKind::End {
                    l.end_ms = Some(e.mono_ms);
                } else {
                    l.term_ms = Some(e.mono_ms);
                }
            }
        }
    }
    by_client.into_values().collect()
}

fn check_overlaps(leases: &[Lease<'_>], violations: &mut Vec<Violation>) {
    let mut by_te: BTreeMap<&str, Vec<&Lease<'_>>> = BTreeMap::new();
    for l in leases {
        by_te.entry(&l.te).or_default().push(l);
    }
    for (te, mut ls) in by_te {
        ls.sort_by_key(|l| l.start_ms);
        let mut holder: Option<&Lease<'_>> = None;
        for l in ls {
            if let Some(h) = holder {
                if l.start_ms < h.over_ms() {
                    violations.push(Violation::Overlap {
                        te: te.to_string(),
                        first: h.client.clone(),
                        second: l.client.clone(),
                        by_ms: h.over_ms().min(l.over_ms()).saturating_sub(l.start_ms),
                    });
                }
                if l.over_ms() <= h.over_ms() {
                    continue;
                }
            }
            holder = Some(l);
        }
    }
}

/// A COMMAND must be gone when its client is: at once when the client was SIGKILLed (the
/// guard), before the client exits otherwise.
fn check_guard(leases: &[Lease<'_>], bounds: &Bounds, violations: &mut Vec<Violation>) {
    for l in leases {
        let Some(run) = l.run else { continue };
        let Some(last_line) = l.end_ms.or(l.term_ms) else {
            continue;
        };
        let (gone_ms, slack) = match run.killed_ms {
            Some(k) => (k, bounds.guard_kill_ms),
            None => (run.ended_ms, 0),
        };
        if last_line > gone_ms.saturating_add(slack) {
            violations.push(Violation::CommandOutlivedClient {
                client: l.client.clone(),
                te: l.te.clone(),
                after_ms: last_line - gone_ms,
            });
        }
    }
}

/// Whether a fault other than one on a client touched `te` (its worker) or any broker between
/// `from` and `to`.
fn disturbed(facts: &RunFacts, te: &str, from: u64, to: u64) -> bool {
    facts.faults.iter().any(|f| {
        let relevant = f.hit
            && (f.kind.hits_broker()
                || (matches!(f.kind, FaultKind::KillWorker | FaultKind::StopWorker)
                    && f.target == te));
        relevant && f.at_ms <= to && from <= f.until_ms
    })
}

fn check_reclaims(facts: &RunFacts, leases: &[Lease<'_>], bounds: &Bounds, report: &mut Report) {
    for l in leases {
        let Some(killed) = l.client_killed_during() else {
            continue;
        };
        if l.end_ms.or(l.term_ms).is_some_and(|t| t <= killed) {
            continue; // it had let go before the kill
        }
        let next = leases
            .iter()
            .filter(|o| o.te == l.te && o.start_ms > killed)
            .map(|o| o.start_ms)
            .chain(
                facts
                    .lease_starts
                    .iter()
                    .filter(|(te, at)| *te == l.te && *at > killed)
                    .map(|(_, at)| *at),
            )
            .min();
        let is_disturbed = disturbed(facts, &l.te, killed, killed + bounds.reclaim_ms);
        let bound = if is_disturbed {
            bounds.disturbed_reclaim_ms
        } else {
            bounds.reclaim_ms
        };
        match next {
            Some(start) => {
                let ms = start - killed;
                if start > facts.demand_until_ms && ms > bound {
                    report.reclaims_unchecked += 1;
                    continue;
                }
                report.reclaims.push(Reclaim {
                    te: l.te.clone(),
                    client: l.client.clone(),
                    ms: Some(ms),
                    disturbed: is_disturbed,
                });
                if ms > bound {
                    report.violations.push(Violation::SlowReclaim {
                        te: l.te.clone(),
                        client: l.client.clone(),
                        reclaim_ms: ms,
                        bound_ms: bound,
                    });
                }
            }
            None if killed.saturating_add(bound) > facts.demand_until_ms => {
                report.reclaims_unchecked += 1;
            }
            None => {
                report.reclaims.push(Reclaim {
                    te: l.te.clone(),
                    client: l.client.clone(),
                    ms: None,
                    disturbed: is_disturbed,
                });
                report.violations.push(Violation::NotReclaimed {
                    te: l.te.clone(),
                    client: l.client.clone(),
                });
            }
        }
    }
}

fn check_exits(facts: &RunFacts, report: &mut Report) {
    let documented = documented_exit_codes();
    for run in &facts.clients {
        let label = match (run.killed_ms, run.exit) {
            (Some(_), _) => "killed by the runner".to_string(),
            (None, exit) => exit.to_string(),
        };
        *report.exits.entry(label).or_default() += 1;
        if run.hung {
            report.violations.push(Violation::HungClient {
                client: run.id.clone(),
            });
            continue;
        }
        if run.killed_ms.is_some() {
            continue;
        }
        let fine = match run.exit {
            Exit::Code(c) => {
                c == run.code
                    || documented.contains(&c)
                    || (run.terminated_ms.is_some() && c == 128 + libc::SIGTERM)
            }
            Exit::Signal(_) => false,
        };
        if !fine {
            report.violations.push(Violation::BadExit {
                client: run.id.clone(),
                exit: run.exit,
                code: run.code,
            });
        }
    }
}

/// Every lease active when a broker was killed or cut off, whose client and worker both
/// lived on, must have delivered COMMAND's exit status.
fn check_cut_leases(
    facts: &RunFacts,
    leases: &[Lease<'_>],
    report: &mut Report,
    rel: &dyn Fn(u64) -> String,
) {
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    for f in &facts.faults {
        if !f.hit || !matches!(f.kind, FaultKind::KillBroker | FaultKind::CutNetwork) {
            continue;
        }
        for l in leases.iter().filter(|l| l.active_at(f.at_ms)) {
            let Some(run) = l.run else { continue };
            if run.killed_ms.is_some() || run.terminated_ms.is_some() {
                continue;
            }
            let worker_killed = facts.faults.iter().any(|w| {
                w.hit
                    && w.kind == FaultKind::KillWorker
                    && w.target == l.te
                    && l.start_ms <= w.at_ms
                    && w.at_ms < l.over_ms()
            });
            if worker_killed || !seen.insert(l.client.as_str()) {
                continue;
            }
            report.leases_at_broker_faults += 1;
            let delivered = l.end_ms.is_some() && run.exit == Exit::Code(l.code);
            if !delivered {
                report.cut_leases += 1;
                report.violations.push(Violation::CutLease {
                    client: l.client.clone(),
                    te: l.te.clone(),
                    fault: format!("{} {} at +{}", f.kind, f.target, rel(f.at_ms)),
                    exit: run.exit,
                    ended: l.end_ms.is_some(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests;
