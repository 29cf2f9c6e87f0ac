//! Synthetic runs, each with one kind of violation (or none), through the checker.

use super::*;

const T0: u64 = 1_000_000;

fn ev(kind: HoldKind, te: &str, client: &str, at: u64, code: i32) -> HoldEvent {
    HoldEvent {
        kind,
        te: te.into(),
        client: client.into(),
        pid: 1,
        mono_ms: T0 + at,
        wall_ms: 0,
        code,
    }
}

fn run(id: &str, started: u64, ended: u64, exit: Exit, code: i32) -> ClientRun {
    ClientRun {
        id: id.into(),
        started_ms: T0 + started,
        ended_ms: T0 + ended,
        exit,
        code,
        killed_ms: None,
        terminated_ms: None,
        hung: false,
    }
}

fn fault(kind: FaultKind, target: &str, at: u64, until: u64) -> FaultRecord {
    FaultRecord {
        kind,
        target: target.into(),
        at_ms: T0 + at,
        until_ms: T0 + until,
        hit: true,
    }
}

/// A lease that ran from `from` to `to` and delivered `code`.
fn delivered(f: &mut RunFacts, te: &str, client: &str, from: u64, to: u64, code: i32) {
    f.holds.push(ev(HoldKind::Start, te, client, from, code));
    f.holds.push(ev(HoldKind::End, te, client, to, code));
    f.clients.push(run(
        client,
        from.saturating_sub(100),
        to + 10,
        Exit::Code(code),
        code,
    ));
}

fn facts() -> RunFacts {
    RunFacts {
        started_ms: T0,
        demand_until_ms: T0 + 1_000_000,
        tes: 2,
        ..RunFacts::default()
    }
}

fn kinds(r: &Report) -> Vec<&'static str> {
    r.violations.iter().map(|v| v.kind()).collect()
}

#[test]
fn a_clean_run_has_no_violation() {
    let mut f = facts();
    delivered(&mut f, "te1", "c1", 1_000, 5_000, 0);
    delivered(&mut f, "te1", "c2", 5_500, 9_000, 7);
    delivered(&mut f, "te2", "c3", 1_000, 9_000, 7);
    f.faults
        .push(fault(FaultKind::StopWorker, "te2", 2_000, 4_000));
    let r = check(&f, &Bounds::default());
    assert!(r.ok(), "{r}");
    assert_eq!(r.leases, 3);
    assert_eq!(r.leases_by_outcome.get("delivered"), Some(&3));
    assert_eq!(r.faults_by_kind.get(&FaultKind::StopWorker), Some(&1));
    assert!(r.to_string().contains("violations: 0"), "{r}");
}

#[test]
fn two_holders_of_one_te_at_once_are_an_overlap() {
    let mut f = facts();
    delivered(&mut f, "te1", "c1", 1_000, 5_000, 0);
    delivered(&mut f, "te1", "c2", 4_000, 9_000, 0);
    delivered(&mut f, "te2", "c3", 4_000, 9_000, 0);
    let r = check(&f, &Bounds::default());
    assert_eq!(kinds(&r), ["overlap"], "{r}");
    assert_eq!(
        r.violations[0],
        Violation::Overlap {
            te: "te1".into(),
            first: "c1".into(),
            second: "c2".into(),
            by_ms: 1_000
        }
    );
}

#[test]
fn a_holder_killed_without_a_line_ends_at_the_kill_so_a_later_start_is_no_overlap() {
    let mut f = facts();
    f.holds.push(ev(HoldKind::Start, "te1", "c1", 1_000, 0));
    let mut killed = run("c1", 900, 3_000, Exit::Signal(9), 0);
    killed.killed_ms = Some(T0 + 3_000);
    f.clients.push(killed);
    delivered(&mut f, "te1", "c2", 4_200, 9_000, 0);
    let r = check(&f, &Bounds::default());
    assert!(r.ok(), "{r}");
    assert_eq!(r.reclaim_times(), [1_200]);
    assert_eq!(r.leases_by_outcome.get("holder killed"), Some(&1));
}

#[test]
fn a_command_writing_after_its_client_was_killed_escaped_the_guard() {
    let mut f = facts();
    f.holds.push(ev(HoldKind::Start, "te1", "c1", 1_000, 0));
    f.holds.push(ev(HoldKind::End, "te1", "c1", 8_000, 0));
    let mut killed = run("c1", 900, 3_000, Exit::Signal(9), 0);
    killed.killed_ms = Some(T0 + 3_000);
    f.clients.push(killed);
    delivered(&mut f, "te1", "c2", 10_000, 12_000, 0);
    let r = check(&f, &Bounds::default());
    assert_eq!(kinds(&r), ["command outlived its client"], "{r}");
}

#[test]
fn a_command_ending_after_its_client_exited_outlived_it() {
    let mut f = facts();
    f.holds.push(ev(HoldKind::Start, "te1", "c1", 1_000, 0));
    f.holds.push(ev(HoldKind::Term, "te1", "c1", 6_000, 0));
    f.clients.push(run("c1", 900, 5_000, Exit::Code(3), 0));
    let r = check(&f, &Bounds::default());
    assert_eq!(kinds(&r), ["command outlived its client"], "{r}");
}

fn killed_holder(f: &mut RunFacts, te: &str, client: &str, kill_at: u64) {
    f.holds
        .push(ev(HoldKind::Start, te, client, kill_at - 2_000, 0));
    let mut killed = run(client, kill_at - 2_100, kill_at, Exit::Signal(9), 0);
    killed.killed_ms = Some(T0 + kill_at);
    f.clients.push(killed);
    f.faults
        .push(fault(FaultKind::KillClient, client, kill_at, kill_at));
}

#[test]
fn a_te_leased_again_too_late_after_its_holder_died_is_a_slow_reclaim() {
    let mut f = facts();
    killed_holder(&mut f, "te1", "c1", 10_000);
    delivered(&mut f, "te1", "c2", 30_000, 31_000, 0);
    let r = check(&f, &Bounds::default());
    assert_eq!(kinds(&r), ["slow reclaim"], "{r}");
    assert_eq!(r.reclaim_times(), [20_000]);
}

#[test]
fn a_te_leased_again_in_time_is_reclaimed_even_if_the_next_command_starts_late() {
    // The worker leased te1 2 s after the kill; that holder's COMMAND began 20 s later (its
    // callback job was lost in a fault). The reclaim is the worker's lease start.
    let mut f = facts();
    killed_holder(&mut f, "te1", "c1", 10_000);
    f.lease_starts.push(("te1".into(), T0 + 5_000));
    f.lease_starts.push(("te1".into(), T0 + 12_000));
    delivered(&mut f, "te1", "c2", 30_000, 31_000, 0);
    let r = check(&f, &Bounds::default());
    assert!(r.ok(), "{r}");
    assert_eq!(r.reclaim_times(), [2_000]);
    // Another TE's lease start says nothing about te1.
    let mut f = facts();
    killed_holder(&mut f, "te1", "c1", 10_000);
    f.lease_starts.push(("te2".into(), T0 + 12_000));
    delivered(&mut f, "te1", "c2", 30_000, 31_000, 0);
    assert_eq!(kinds(&check(&f, &Bounds::default())), ["slow reclaim"]);
}

#[test]
fn a_worker_fault_on_that_te_allows_the_longer_bound() {
    let mut f = facts();
    killed_holder(&mut f, "te1", "c1", 10_000);
    f.faults
        .push(fault(FaultKind::KillWorker, "te1", 11_000, 13_000));
    delivered(&mut f, "te1", "c2", 30_000, 31_000, 0);
    // A fault on another TE's worker does not excuse a slow reclaim of this one.
    killed_holder(&mut f, "te2", "c3", 10_000);
    f.faults
        .push(fault(FaultKind::StopWorker, "te1", 10_500, 12_000));
    delivered(&mut f, "te2", "c4", 30_000, 31_000, 0);
    let r = check(&f, &Bounds::default());
    assert_eq!(kinds(&r), ["slow reclaim"], "{r}");
    assert!(r.violations[0].to_string().contains("te2"), "{r}");
    assert_eq!(r.reclaims.iter().filter(|c| c.disturbed).count(), 1);
}

#[test]
fn a_te_never_leased_again_while_clients_waited_was_not_reclaimed() {
    let mut f = facts();
    killed_holder(&mut f, "te1", "c1", 10_000);
    let r = check(&f, &Bounds::default());
    assert_eq!(kinds(&r), ["not reclaimed"], "{r}");
    // The same death just before the drain cannot be judged.
    f.demand_until_ms = T0 + 12_000;
    let r = check(&f, &Bounds::default());
    assert!(r.ok(), "{r}");
    assert_eq!(r.reclaims_unchecked, 1);
}

#[test]
fn exits_other_than_commands_or_documented_ones_are_violations() {
    let mut f = facts();
    delivered(&mut f, "te1", "c1", 1_000, 2_000, 7);
    f.clients.push(run("c2", 0, 100, Exit::Code(2), 0));
    f.clients.push(run("c3", 0, 100, Exit::Code(124), 0));
    f.clients.push(run("c4", 0, 100, Exit::Code(5), 0));
    f.clients.push(run("c5", 0, 100, Exit::Signal(11), 0));
    f.clients.push(run("c6", 0, 100, Exit::Code(143), 0));
    let mut stopped = run("c7", 0, 100, Exit::Code(143), 0);
    stopped.terminated_ms = Some(T0 + 50);
    f.clients.push(stopped);
    let r = check(&f, &Bounds::default());
    let bad: Vec<String> = r
        .violations
        .iter()
        .map(|v| match v {
            Violation::BadExit { client, .. } => client.clone(),
            other => panic!("unexpected {other}"),
        })
        .collect();
    assert_eq!(bad, ["c4", "c5", "c6"], "{r}");
}

#[test]
fn a_client_still_running_after_the_drain_hung() {
    let mut f = facts();
    let mut hung = run("c1", 0, 100, Exit::Signal(9), 0);
    hung.hung = true;
    f.clients.push(hung);
    let r = check(&f, &Bounds::default());
    assert_eq!(kinds(&r), ["hung client"], "{r}");
}

#[test]
fn a_lease_active_at_a_broker_kill_must_deliver_its_exit_status() {
    let mut f = facts();
    f.faults
        .push(fault(FaultKind::KillBroker, "b", 5_000, 9_000));
    // Cut: COMMAND killed by its client, which exits 3.
    f.holds.push(ev(HoldKind::Start, "te1", "c1", 1_000, 7));
    f.holds.push(ev(HoldKind::Term, "te1", "c1", 6_000, 7));
    f.clients.push(run("c1", 900, 6_100, Exit::Code(3), 7));
    // Survived: delivered through the kill.
    delivered(&mut f, "te2", "c2", 1_000, 8_000, 7);
    // Its worker was killed too: the lease may end.
    f.holds.push(ev(HoldKind::Start, "te3", "c3", 1_000, 0));
    f.holds.push(ev(HoldKind::Term, "te3", "c3", 6_000, 0));
    f.clients.push(run("c3", 900, 6_100, Exit::Code(3), 0));
    f.faults
        .push(fault(FaultKind::KillWorker, "te3", 5_500, 6_500));
    // Over before the kill: not active at it.
    delivered(&mut f, "te4", "c4", 1_000, 4_000, 0);
    let r = check(&f, &Bounds::default());
    assert_eq!(kinds(&r), ["cut lease"], "{r}");
    assert_eq!(r.cut_leases, 1);
    assert_eq!(r.leases_at_broker_faults, 2);
    let text = r.violations[0].to_string();
    assert!(
        text.contains("c1 on te1") && text.contains("kill-broker b at +5.0s"),
        "{text}"
    );
    assert_eq!(r.leases_by_outcome.get("taken back"), Some(&2));
}

#[test]
fn a_network_cut_counts_like_a_broker_kill_but_a_broker_stop_does_not() {
    let mut f = facts();
    f.faults
        .push(fault(FaultKind::StopBroker, "a", 2_000, 3_000));
    f.faults
        .push(fault(FaultKind::CutNetwork, "b", 5_000, 70_000));
    f.holds.push(ev(HoldKind::Start, "te1", "c1", 1_000, 0));
    f.holds.push(ev(HoldKind::Term, "te1", "c1", 45_000, 0));
    f.clients.push(run("c1", 900, 45_100, Exit::Code(3), 0));
    let r = check(&f, &Bounds::default());
    assert_eq!(kinds(&r), ["cut lease"], "{r}");
    assert!(r.violations[0].to_string().contains("cut-network b"), "{r}");
}

#[test]
fn broken_hold_sequences_and_lines_are_violations() {
    let mut f = facts();
    f.holds.push(ev(HoldKind::End, "te1", "ghost", 1_000, 0));
    delivered(&mut f, "te1", "c1", 2_000, 3_000, 0);
    f.holds.push(ev(HoldKind::Start, "te1", "c1", 3_500, 0));
    f.bad_hold_lines.push((7, "garbage".into()));
    let r = check(&f, &Bounds::default());
    assert_eq!(
        kinds(&r),
        [
            "bad hold-log line",
            "bad hold sequence",
            "bad hold sequence"
        ],
        "{r}"
    );
}

#[test]
fn a_te_not_free_at_the_end_is_a_violation() {
    let mut f = facts();
    f.not_free_at_end.push("te2".into());
    let r = check(&f, &Bounds::default());
    assert_eq!(kinds(&r), ["TE not free at the end"], "{r}");
    assert!(r.to_string().contains("TEs free at the end: 1 of 2"), "{r}");
}

#[test]
fn faults_without_a_target_are_counted_apart() {
    let mut f = facts();
    let mut missed = fault(FaultKind::KillClient, "-", 1_000, 1_000);
    missed.hit = false;
    f.faults.push(missed);
    f.skipped.insert(FaultKind::CutNetwork, 1);
    let r = check(&f, &Bounds::default());
    let text = r.to_string();
    assert!(text.contains("faults injected: 0"), "{text}");
    assert!(text.contains("no target then: kill-client 1"), "{text}");
    assert!(text.contains("faults skipped: cut-network 1"), "{text}");
}

#[test]
fn the_json_summary_carries_the_counts() {
    let mut f = facts();
    delivered(&mut f, "te1", "c1", 1_000, 5_000, 0);
    killed_holder(&mut f, "te2", "c2", 10_000);
    delivered(&mut f, "te2", "c3", 11_500, 12_000, 0);
    let j = check(&f, &Bounds::default()).summary_json();
    assert_eq!(j["faults"], 1);
    assert_eq!(j["faults_by_kind"]["kill-client"], 1);
    assert_eq!(j["leases"], 3);
    assert_eq!(j["leases_by_outcome"]["delivered"], 2);
    assert_eq!(j["reclaims"], 1);
    assert_eq!(j["reclaim_max_ms"], 1_500);
    assert_eq!(j["violations"], 0);
}
