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
use std::collections::HashSet;

use stateright::{Checker, HasDiscoveries, Model};

const NEVER_TWO: &str = "never two COMMANDs on the TE";
const NEVER_WITHOUT: &str = "never a COMMAND without its lease";
const LEASES_END: &str = "every lease ends once faults stop";
const SAFETY: [&str; 3] = [NEVER_TWO, NEVER_WITHOUT, LEASES_END];

const NO_FAULTS: Faults = Faults {
    broker_crashes: 0,
    worker_restarts: 0,
    client_crashes: 0,
    pauses: 0,
    early_releases: 0,
};

/// Explores every interleaving within the bound and returns the checker.
fn explore(name: &str, m: LeaseModel) -> impl Checker<LeaseModel> {
    let started = Instant::now();
    let checker = m.checker().threads(1).spawn_bfs().join();
    eprintln!(
        "{name}: {} states explored ({} unique), depth {}, {:.1} s",
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        started.elapsed().as_secs_f64()
    );
    checker
}

/// Explores until one of the three properties breaks, and returns that counterexample.
fn counterexample(name: &str, m: LeaseModel) -> (String, Vec<model::Action>) {
    let started = Instant::now();
    let checker = m
        .checker()
        .threads(1)
        .finish_when(HasDiscoveries::AnyFailures)
        .spawn_bfs()
        .join();
    eprintln!(
        "{name}: {} states explored until a counterexample, {:.1} s",
        checker.unique_state_count(),
        started.elapsed().as_secs_f64()
    );
    let (property, path) = SAFETY
        .iter()
        .find_map(|p| checker.discovery(p).map(|path| (p.to_string(), path)))
        .unwrap_or_else(|| panic!("{name}: the checker found no counterexample"));
    let actions = path.into_actions();
    eprintln!("{name}: {property:?} broken by {actions:?}");
    (property, actions)
}

const RESUMED: &str = "a resumed lease ends with COMMAND's exit status";
const HANDED_ON: &str = "both clients run COMMAND, one after the other";

/// The defaults in 5-second units: every default is a multiple of 5 s, so this is exact.
fn exact() -> Timing {
    Timing::from_seconds(Seconds::DEFAULTS, 5)
}

/// Checks the three properties for the fixed protocol with `faults`, and that the model
/// does hand the TE on (and, with a broker crash, resume a lease to its end).
fn assert_safe_and_live(name: &str, timing: Timing, faults: Faults) {
    let m = LeaseModel::new(timing, faults, Rules::FIXED, Coarse::BOUNDS);
    let checker = explore(name, m);
    for p in SAFETY {
        checker.assert_no_discovery(p);
    }
    checker.assert_any_discovery(HANDED_ON);
    // (A restarted worker quarantines the TE instead of resuming, as implemented.)
    if faults.broker_crashes > 0 {
        checker.assert_any_discovery(RESUMED);
    }
}

#[test]
fn the_defaults_satisfy_the_design_inequality() {
    assert!(exact().margin_holds());
    assert!(Timing::FAST.margin_holds());
}

/// The fast timing is not the defaults in one unit, so it must order every sum that the
/// safety argument compares the way the defaults do.
#[test]
fn fast_timing_keeps_the_orders_of_the_defaults() {
    let d = exact();
    let f = Timing::FAST;
    let orders = |t: Timing| {
        let v = |x: u8| i32::from(x);
        let margin = v(t.worker_grace) + v(t.holder_grace)
            - v(t.client_grace)
            - v(t.detect)
            - v(t.kill_grace);
        [
            (v(t.holder_grace) - v(t.kill_grace)).signum(),
            margin.signum(),
            (margin - v(t.pause)).signum(),
            (v(t.client_grace) - v(t.detect)).signum(),
            (v(t.worker_grace) - v(t.client_grace)).signum(),
        ]
    };
    assert_eq!(orders(f), orders(d), "fast {f:?} vs defaults {d:?}");
}

#[test]
fn without_faults_every_lease_completes() {
    assert_safe_and_live("no faults", exact(), NO_FAULTS);
}

#[test]
fn two_broker_crashes() {
    // The fast timing: with the exact one this bound takes about 45 s (see the ignored test).
    assert_safe_and_live(
        "2 broker crashes",
        Timing::FAST,
        Faults {
            broker_crashes: 2,
            ..NO_FAULTS
        },
    );
}

#[test]
fn a_broker_crash_and_a_worker_restart() {
    assert_safe_and_live(
        "1 broker crash, 1 worker restart",
        exact(),
        Faults {
            broker_crashes: 1,
            worker_restarts: 1,
            ..NO_FAULTS
        },
    );
}

#[test]
fn a_broker_crash_and_a_client_crash() {
    assert_safe_and_live(
        "1 broker crash, 1 client crash",
        exact(),
        Faults {
            broker_crashes: 1,
            client_crashes: 1,
            ..NO_FAULTS
        },
    );
}

#[test]
fn a_worker_restart_and_a_client_crash() {
    assert_safe_and_live(
        "1 worker restart, 1 client crash",
        exact(),
        Faults {
            worker_restarts: 1,
            client_crashes: 1,
            ..NO_FAULTS
        },
    );
}

#[test]
fn a_broker_crash_and_a_pause() {
    assert_safe_and_live(
        "1 broker crash, 1 pause",
        exact(),
        Faults {
            broker_crashes: 1,
            pauses: 1,
            ..NO_FAULTS
        },
    );
}

#[test]
fn a_pause_and_an_early_release() {
    assert_safe_and_live(
        "1 pause, 1 early release",
        exact(),
        Faults {
            pauses: 1,
            early_releases: 1,
            ..NO_FAULTS
        },
    );
}

/// The negative: a client grace of at least worker grace + holder grace breaks the design's
/// inequality, and the checker must find the interleaving where COMMAND outlives the lease.
#[test]
fn a_wrong_safety_margin_is_found() {
    let mut t = Timing::FAST;
    t.client_grace = t.worker_grace + t.holder_grace;
    assert!(!t.margin_holds());
    // Both brokers must be down for longer than the grace: while one is up the sides
    // resume through it at once.
    let faults = Faults {
        broker_crashes: 2,
        ..NO_FAULTS
    };
    let coarse = Coarse {
        restart_at_once: false,
        ..Coarse::BOUNDS
    };
    let (property, _) = counterexample(
        "client grace = worker grace + holder grace",
        LeaseModel::new(t, faults, Rules::FIXED, coarse),
    );
    assert!(
        property == NEVER_TWO || property == NEVER_WITHOUT,
        "{property}"
    );
}

/// Finding 1 (docs/design/lease-model.md): a lease that ends before its client took the TE
/// data leaves that callback job queued, and the client starts COMMAND from it later.
#[test]
fn design_finding_stale_callback_starts_command() {
    let faults = Faults {
        early_releases: 1,
        ..NO_FAULTS
    };
    let (property, actions) = counterexample(
        "finding 1",
        LeaseModel::new(Timing::FAST, faults, Rules::DESIGN, Coarse::BOUNDS),
    );
    assert!(
        property == NEVER_TWO || property == NEVER_WITHOUT,
        "{property}"
    );
    assert!(actions.contains(&model::Action::EarlyRelease));
}

/// Finding 2: a take-back that is not known to have reached the client (here lost with its
/// broker) followed by only the holder grace.
#[test]
fn design_finding_unconfirmed_take_back_needs_the_long_wait() {
    let rules = Rules {
        long_wait_unproven: false,
        ..Rules::FIXED
    };
    let faults = Faults {
        broker_crashes: 1,
        early_releases: 1,
        ..NO_FAULTS
    };
    let (property, _) = counterexample(
        "finding 2",
        LeaseModel::new(Timing::FAST, faults, rules, Coarse::BOUNDS),
    );
    assert!(
        property == NEVER_TWO || property == NEVER_WITHOUT,
        "{property}"
    );
}

/// The liveness property is checked on final states only; that is enough because the model
/// has no cycle (every step uses up a fault, a job, a message or time), which this checks
/// with a depth-first search over the whole graph of a bound.
#[test]
fn the_model_has_no_cycle() {
    let faults = Faults {
        broker_crashes: 1,
        client_crashes: 1,
        ..NO_FAULTS
    };
    let m = LeaseModel::new(Timing::FAST, faults, Rules::FIXED, Coarse::BOUNDS);
    let mut done = HashSet::new();
    let mut on_path = HashSet::new();
    let mut stack: Vec<(model::State, Vec<model::State>)> = Vec::new();
    for s in m.init_states() {
        stack.push((s, successors(&m, &s)));
        on_path.insert(s);
        while let Some((state, next)) = stack.last_mut() {
            match next.pop() {
                Some(t) if on_path.contains(&t) => panic!("a cycle through {t:?}"),
                Some(t) if done.contains(&t) => {}
                Some(t) => {
                    on_path.insert(t);
                    let succ = successors(&m, &t);
                    stack.push((t, succ));
                }
                None => {
                    let state = *state;
                    on_path.remove(&state);
                    done.insert(state);
                    stack.pop();
                }
            }
        }
    }
    eprintln!("no cycle among {} states", done.len());
    assert!(done.len() > 1000, "the bound explores something");
}

fn successors(m: &LeaseModel, s: &model::State) -> Vec<model::State> {
    let mut actions = Vec::new();
    m.actions(s, &mut actions);
    actions
        .into_iter()
        .filter_map(|a| m.next_state(s, a))
        .collect()
}

/// The larger bound: every fault kind at once (it did not finish within 15 minutes on one
/// shared core here; run it on a free machine):
/// `cargo test -p testenv --test resume_model -- --ignored larger_bound`.
#[test]
#[ignore]
fn larger_bound() {
    assert_safe_and_live(
        "2 broker crashes, 1 worker restart, 1 client crash, 1 pause, 1 early release",
        Timing::FAST,
        Faults {
            broker_crashes: 2,
            worker_restarts: 1,
            client_crashes: 1,
            pauses: 1,
            early_releases: 1,
        },
    );
}

/// Two broker crashes with the exact default timers (about 45 s):
/// `cargo test -p testenv --test resume_model -- --ignored two_broker_crashes_exact`.
#[test]
#[ignore]
fn two_broker_crashes_exact() {
    assert_safe_and_live(
        "2 broker crashes, exact timers",
        exact(),
        Faults {
            broker_crashes: 2,
            ..NO_FAULTS
        },
    );
}

/// The defaults in exact 5-second units with detection at any point of its window and
/// brokers restarted at any time, for one broker crash:
/// `cargo test -p testenv --test resume_model -- --ignored exact_default_timers`.
#[test]
#[ignore]
fn exact_default_timers() {
    let faults = Faults {
        broker_crashes: 1,
        ..NO_FAULTS
    };
    let m = LeaseModel::new(
        Timing::from_seconds(Seconds::DEFAULTS, 5),
        faults,
        Rules::FIXED,
        Coarse::FULL,
    );
    explore("defaults in 5 s units, 1 broker crash", m).assert_properties();
}

/// Finding 5: the client's own grace timer runs in the client process; a client SIGSTOPped
/// for longer than the safety margin notices the lost C1 too late, while its guard keeps
/// COMMAND running. The model finds it once a pause may exceed the margin.
#[test]
fn finding_a_pause_longer_than_the_margin_breaks_safety() {
    let mut t = Timing::FAST;
    t.pause = t.worker_grace + t.holder_grace;
    let faults = Faults {
        broker_crashes: 1,
        pauses: 1,
        ..NO_FAULTS
    };
    let (property, actions) = counterexample(
        "finding 5",
        LeaseModel::new(t, faults, Rules::FIXED, Coarse::BOUNDS),
    );
    assert!(
        property == NEVER_TWO || property == NEVER_WITHOUT,
        "{property}"
    );
    assert!(actions.iter().any(|a| matches!(a, model::Action::Pause(_))));
}

/// Finding 3 in the rules as implemented on 12-01 12:44 (the tight wait of finding 2, no
/// withdrawal of untaken TE data, TE data that does not name its lockenv), exact timers, a
/// broker crash and a client pause shorter than the margin: the client took TE data for the
/// lockenv it had resubmitted, so its C1 grace never started; the worker revoked after its
/// resume grace and offered the TE one holder grace later, while the paused client had not yet
/// read the revoke. `Rules::FIXED` passes the same bound (`a_broker_crash_and_a_pause`).
/// The implementation fixed it (12-01 13:20) with the other fix the finding proposes, which
/// the model has no flag for: the client adopts TE data for its lost lock request, counts C1
/// lost since that loss and resumes at once (`te_data_for_a_lock_request_lost_with_its_broker_
/// is_adopted_and_its_lease_resumed` in tests/resume.rs). `te_data_names_c1` models the refusal
/// instead, so this test keeps the rules of 12:44 and still shows the counterexample.
#[test]
fn finding_3_in_the_implemented_rules() {
    let rules = Rules {
        withdraw_unstarted: false,
        te_data_names_c1: false,
        ..Rules::FIXED
    };
    let faults = Faults {
        broker_crashes: 1,
        pauses: 1,
        ..NO_FAULTS
    };
    let (property, actions) = counterexample(
        "finding 3, implemented rules",
        LeaseModel::new(exact(), faults, rules, Coarse::BOUNDS),
    );
    assert!(
        property == NEVER_TWO || property == NEVER_WITHOUT,
        "{property}"
    );
    assert!(actions.iter().any(|a| matches!(a, model::Action::Pause(_))));
    assert!(actions.contains(&model::Action::WorkerGraceExpires));
}
