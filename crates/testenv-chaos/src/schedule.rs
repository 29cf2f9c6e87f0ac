//! The fault schedule: which fault happens when, drawn from a seeded RNG, so a seed replays
//! the same schedule (the processes' timing, and so which lease a fault hits, still varies).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    KillClient,
    KillWorker,
    KillBroker,
    StopClient,
    StopWorker,
    StopBroker,
    CutNetwork,
}

impl FaultKind {
    pub const ALL: [FaultKind; 7] = [
        FaultKind::KillClient,
        FaultKind::KillWorker,
        FaultKind::KillBroker,
        FaultKind::StopClient,
        FaultKind::StopWorker,
        FaultKind::StopBroker,
        FaultKind::CutNetwork,
    ];

    /// The name `--faults` takes.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillClient => "kill-client",
            FaultKind::KillWorker => "kill-worker",
            FaultKind::KillBroker => "kill-broker",
            FaultKind::StopClient => "stop-client",
            FaultKind::StopWorker => "stop-worker",
            FaultKind::StopBroker => "stop-broker",
            FaultKind::CutNetwork => "cut-network",
        }
    }

    /// Faults that take a broker (or the path to it) away; at most one runs at a time.
    pub fn hits_broker(self) -> bool {
        matches!(
            self,
            FaultKind::KillBroker | FaultKind::StopBroker | FaultKind::CutNetwork
        )
    }

    /// How likely a fault is this kind, relative to the others (the cut is placed apart).
    fn weight(self) -> u32 {
        match self {
            FaultKind::KillClient => 6,
            FaultKind::KillWorker => 3,
            FaultKind::KillBroker => 2,
            FaultKind::StopClient => 3,
            FaultKind::StopWorker => 3,
            FaultKind::StopBroker => 2,
            FaultKind::CutNetwork => 0,
        }
    }

    /// How long the fault lasts: until the restart, the SIGCONT or the link coming back.
    fn lasts(self, rng: &mut fastrand::Rng, cut_min: Duration) -> Duration {
        let mut ms = |lo: u64, hi: u64| Duration::from_millis(rng.u64(lo..=hi));
        match self {
            FaultKind::KillClient => Duration::ZERO,
            FaultKind::KillWorker => ms(500, 3_000),
            FaultKind::KillBroker => ms(2_000, 10_000),
            FaultKind::StopClient => ms(1_000, 15_000),
            FaultKind::StopWorker => ms(1_000, 10_000),
            FaultKind::StopBroker => ms(1_000, 10_000),
            FaultKind::CutNetwork => cut_min + ms(0, 10_000),
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FaultKind {
    type Err = String;
    fn from_str(s: &str) -> Result<FaultKind, String> {
        FaultKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
                format!("unknown fault {s:?} (one of {})", names.join(", "))
            })
    }
}

/// One planned fault. `pick` chooses the target among those present when it fires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub at: Duration,
    pub kind: FaultKind,
    pub lasts: Duration,
    pub pick: u64,
}

#[derive(Debug, Clone)]
pub struct ScheduleSettings {
    /// Faults start after `warmup` and are all over by `duration`.
    pub duration: Duration,
    pub warmup: Duration,
    /// The mean time between two faults.
    pub mean_gap: Duration,
    pub kinds: Vec<FaultKind>,
    /// The shortest network cut: longer than the agents' keepalive bound.
    pub cut_min: Duration,
    /// One network cut per this much run time (at least one if the run is long enough).
    pub cut_every: Duration,
}

/// Quiet time after a broker fault ends before the next one may start.
const BROKER_FAULT_GAP: Duration = Duration::from_secs(3);

pub fn schedule(seed: u64, s: &ScheduleSettings) -> Vec<Fault> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut faults = Vec::new();
    let end = s.duration;
    // Times when a broker fault runs; another broker fault must not overlap them.
    let mut broker_busy: Vec<(Duration, Duration)> = Vec::new();

    if s.kinds.contains(&FaultKind::CutNetwork) {
        let cuts = (s.duration.as_secs() / s.cut_every.as_secs().max(1)).max(1);
        let window = s.duration.saturating_sub(s.warmup) / u32::try_from(cuts).unwrap_or(1);
        for i in 0..cuts {
            let lasts = FaultKind::CutNetwork.lasts(&mut rng, s.cut_min);
            let room = window.saturating_sub(lasts + BROKER_FAULT_GAP);
            if room.is_zero() {
                continue;
            }
            let offset = Duration::from_millis(rng.u64(0..=room.as_millis() as u64));
            let at = s.warmup + window * u32::try_from(i).unwrap_or(0) + offset;
            if at + lasts < end {
                broker_busy.push((at, at + lasts));
                faults.push(Fault {
                    at,
                    kind: FaultKind::CutNetwork,
                    lasts,
                    pick: rng.u64(..),
                });
            }
        }
    }

    // Broker kills are what lease resume is for: a run that allows them has one at least,
    // placed before the others can crowd it out.
    if s.kinds.contains(&FaultKind::KillBroker) {
        let lasts = FaultKind::KillBroker.lasts(&mut rng, s.cut_min);
        let span = end.saturating_sub(s.warmup + lasts).as_millis() as u64;
        for _ in 0..100 {
            let at = s.warmup + Duration::from_millis(rng.u64(0..=span));
            let clashes = broker_busy.iter().any(|&(from, to)| {
                at < to + BROKER_FAULT_GAP && from < at + lasts + BROKER_FAULT_GAP
            });
            if !clashes && at + lasts < end {
                broker_busy.push((at, at + lasts));
                faults.push(Fault {
                    at,
                    kind: FaultKind::KillBroker,
                    lasts,
                    pick: rng.u64(..),
                });
                break;
            }
        }
    }

    let weighted: Vec<FaultKind> = s
        .kinds
        .iter()
        .flat_map(|&k| std::iter::repeat_n(k, k.weight() as usize))
        .collect();
    let others: Vec<FaultKind> = weighted
        .iter()
        .copied()
        .filter(|k| !k.hits_broker())
        .collect();
    if weighted.is_empty() {
        faults.sort_by_key(|f| f.at);
        return faults;
    }
    let mean_ms = s.mean_gap.as_millis().max(1) as f64;
    let mut at = s.warmup;
    loop {
        // Exponential gaps: faults arrive as a Poisson process, bursts included.
        let gap = -mean_ms * (1.0 - rng.f64()).ln();
        at += Duration::from_millis(gap as u64);
        if at >= end {
            break;
        }
        let mut kind = weighted[rng.usize(..weighted.len())];
        let mut lasts = kind.lasts(&mut rng, s.cut_min);
        let mut fault_at = at;
        if kind.hits_broker() {
            // A broker fault that would overlap another waits until that one is over, so a
            // long network cut does not crowd broker kills out of a short run.
            while let Some(&(_, to)) = broker_busy.iter().find(|&&(from, to)| {
                fault_at < to + BROKER_FAULT_GAP && from < fault_at + lasts + BROKER_FAULT_GAP
            }) {
                fault_at = to + BROKER_FAULT_GAP;
            }
            if fault_at + lasts >= end {
                if others.is_empty() {
                    continue;
                }
                kind = others[rng.usize(..others.len())];
                lasts = kind.lasts(&mut rng, s.cut_min);
                fault_at = at;
            } else {
                broker_busy.push((fault_at, fault_at + lasts));
            }
        }
        if fault_at + lasts >= end {
            continue;
        }
        faults.push(Fault {
            at: fault_at,
            kind,
            lasts,
            pick: rng.u64(..),
        });
    }
    faults.sort_by_key(|f| f.at);
    faults
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(kinds: &[FaultKind], secs: u64) -> ScheduleSettings {
        ScheduleSettings {
            duration: Duration::from_secs(secs),
            warmup: Duration::from_secs(5),
            mean_gap: Duration::from_secs(3),
            kinds: kinds.to_vec(),
            cut_min: Duration::from_secs(65),
            cut_every: Duration::from_secs(300),
        }
    }

    #[test]
    fn a_seed_replays_its_schedule_and_another_seed_differs() {
        let s = settings(&FaultKind::ALL, 600);
        assert_eq!(schedule(42, &s), schedule(42, &s));
        assert_ne!(schedule(42, &s), schedule(43, &s));
    }

    #[test]
    fn faults_stay_inside_the_run_and_broker_faults_never_overlap() {
        for seed in 0..200 {
            let s = settings(&FaultKind::ALL, 300);
            let faults = schedule(seed, &s);
            assert!(
                faults.len() > 20,
                "seed {seed}: only {} faults",
                faults.len()
            );
            let mut last_broker_end = Duration::ZERO;
            for f in &faults {
                assert!(f.at >= s.warmup && f.at + f.lasts < s.duration, "{f:?}");
                if f.kind.hits_broker() {
                    assert!(f.at >= last_broker_end, "seed {seed}: overlap at {f:?}");
                    last_broker_end = f.at + f.lasts;
                }
            }
            let cuts: Vec<&Fault> = faults
                .iter()
                .filter(|f| f.kind == FaultKind::CutNetwork)
                .collect();
            assert_eq!(cuts.len(), 1, "seed {seed}: {cuts:?}");
            assert!(cuts[0].lasts >= s.cut_min);
        }
    }

    #[test]
    fn a_two_minute_run_with_a_cut_still_kills_a_broker() {
        for seed in 0..50 {
            let faults = schedule(seed, &settings(&FaultKind::ALL, 120));
            assert!(
                faults.iter().any(|f| f.kind == FaultKind::KillBroker),
                "seed {seed}: {faults:?}"
            );
        }
    }

    #[test]
    fn only_the_chosen_kinds_happen() {
        let kinds = [FaultKind::KillClient, FaultKind::KillWorker];
        let faults = schedule(7, &settings(&kinds, 120));
        assert!(faults.iter().any(|f| f.kind == FaultKind::KillClient));
        assert!(faults.iter().any(|f| f.kind == FaultKind::KillWorker));
        assert!(faults.iter().all(|f| kinds.contains(&f.kind)));
    }

    #[test]
    fn a_run_too_short_for_a_cut_gets_none() {
        let faults = schedule(1, &settings(&[FaultKind::CutNetwork], 60));
        assert!(faults.is_empty(), "{faults:?}");
    }

    #[test]
    fn fault_names_parse_back() {
        for k in FaultKind::ALL {
            assert_eq!(k.name().parse::<FaultKind>(), Ok(k));
        }
        assert!("kill-everything".parse::<FaultKind>().is_err());
    }
}
