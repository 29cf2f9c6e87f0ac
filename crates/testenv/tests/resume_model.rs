//! Model check of lease resume (issue 8): every interleaving of one testenv-worker, two
//! testenv-clients and two brokers, with crashes, restarts, pauses and grace timers, up to a
//! bound of faults (docs/design/lease-model.md; the model is in resume_model/model.rs).
//!
//! `cargo test -p testenv --test resume_model` runs the bounded checks; the larger bound is
//! `cargo test -p testenv --test resume_model -- --ignored`.

#[path = "resume_model/model.rs"]
mod model;

use std::time::Instant;

use model::{Coarse, Faults, LeaseModel, Rules, Seconds, Timing};
use stateright::{Checker, Model};

const NEVER_TWO: &str = "never two COMMANDs on the TE";
const NEVER_WITHOUT: &str = "never a COMMAND without its lease";
const LEASES_END: &str = "every lease ends once faults stop";
const SAFETY: [&str; 3] = [NEVER_TWO, NEVER_WITHOUT, LEASES_END];

/// The defaults in units of 5 s: every default timer is a multiple of 5 s, so the model's
/// clock is exact for them.
fn default_timing() -> Timing {
    Timing::from_seconds(Seconds::DEFAULTS, 5)
}

const BOUND: Faults = Faults {
    broker_crashes: 2,
    worker_restarts: 1,
    client_crashes: 1,
    pauses: 1,
    early_releases: 1,
};

fn check(name: &str, m: LeaseModel) -> impl Checker<LeaseModel> {
    let started = Instant::now();
    let checker = m.checker().threads(1).spawn_bfs().join();
    eprintln!(
        "{name}: {} states ({} unique), depth {}, {:.1} s",
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        started.elapsed().as_secs_f64()
    );
    checker
}

#[test]
fn the_default_timers_satisfy_the_design_inequality() {
    let t = default_timing();
    assert!(t.margin_holds(), "{t:?}");
}

#[test]
fn fixed_protocol_is_safe_and_every_lease_ends() {
    let m = LeaseModel::new(default_timing(), BOUND, Rules::FIXED, Coarse::BOUNDS);
    let checker = check("fixed protocol, default timers", m);
    checker.assert_properties();
}

/// Prints the size of the state space for the bound in RESUME_MODEL_BOUND
/// ("crashes,restarts,client_crashes,pauses,early_releases") and RESUME_MODEL_UNIT seconds.
#[test]
#[ignore]
fn explore_bound() {
    let Ok(bound) = std::env::var("RESUME_MODEL_BOUND") else {
        return;
    };
    let n: Vec<u8> = bound.split(',').map(|x| x.parse().unwrap()).collect();
    let unit = std::env::var("RESUME_MODEL_UNIT").map_or(0, |u| u.parse().unwrap());
    let timing = if unit == 0 {
        Timing::FAST
    } else {
        Timing::from_seconds(Seconds::DEFAULTS, unit)
    };
    let faults = Faults {
        broker_crashes: n[0],
        worker_restarts: n[1],
        client_crashes: n[2],
        pauses: n[3],
        early_releases: n[4],
    };
    let coarse = if std::env::var("RESUME_MODEL_FULL").is_ok() {
        Coarse::FULL
    } else {
        Coarse::BOUNDS
    };
    let rules = if std::env::var("RESUME_MODEL_DESIGN").is_ok() {
        Rules::DESIGN
    } else {
        Rules::FIXED
    };
    let m = LeaseModel::new(timing, faults, rules, coarse);
    let c = m
        .checker()
        .threads(1)
        .timeout(std::time::Duration::from_secs(60))
        .target_state_count(
            std::env::var("RESUME_MODEL_STATES").map_or(usize::MAX, |n| n.parse().unwrap()),
        )
        .spawn_bfs()
        .join();
    eprintln!(
        "bound {bound} unit {unit}: {} unique states, depth {}",
        c.unique_state_count(),
        c.max_depth()
    );
    for p in SAFETY {
        eprintln!(
            "  {p}: {}",
            if c.discovery(p).is_some() {
                "VIOLATED"
            } else {
                "ok"
            }
        );
    }
    if let Some(path) = SAFETY.iter().find_map(|p| c.discovery(p)) {
        for (state, action) in path.into_vec() {
            eprintln!("{state:?}\n  -> {action:?}");
        }
    }
}

#[test]
#[ignore]
fn frontier_sizes() {
    let Ok(bound) = std::env::var("RESUME_MODEL_BOUND") else {
        return;
    };
    let n: Vec<u8> = bound.split(',').map(|x| x.parse().unwrap()).collect();
    let faults = Faults {
        broker_crashes: n[0],
        worker_restarts: n[1],
        client_crashes: n[2],
        pauses: n[3],
        early_releases: n[4],
    };
    let m = LeaseModel::new(Timing::FAST, faults, Rules::FIXED, Coarse::BOUNDS);
    let mut seen = std::collections::HashSet::new();
    let mut frontier = m.init_states();
    for d in 0..40 {
        let mut next = Vec::new();
        for s in &frontier {
            let mut acts = Vec::new();
            m.actions(s, &mut acts);
            for a in acts {
                if let Some(t) = m.next_state(s, a) {
                    if seen.insert(t.clone()) {
                        next.push(t);
                    }
                }
            }
        }
        eprintln!("depth {d}: {}", next.len());
        if next.len() > 20000 {
            for s in next.iter().step_by(next.len() / 3).take(3) {
                eprintln!("{s:?}");
            }
            break;
        }
        frontier = next;
    }
}
