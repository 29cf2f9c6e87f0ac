//! The core's two clocks: a wall-clock step (NTP) neither fires nor stalls a timer measured on
//! the monotonic clock, and no time field from the network can overflow the arithmetic.

mod sim;

use broker_core::WAKE_RETRY_MS;
use gearman_proto::PacketType as T;
use sim::Sim;

const HOURS_5: i64 = 5 * 3_600_000;

#[test]
fn a_wall_clock_step_neither_fires_nor_stalls_a_can_do_timeout() {
    let mut sim = Sim::new();
    let (client, te) = (sim.conn(1), sim.conn(2));
    sim.send(te, T::CanDoTimeout, &[b"lockenv", b"10"]);
    let handle = sim.submit(
        client,
        T::SubmitJob,
        "lockenv",
        "",
        r#"{"callback_name": "callback_1", "timeout": "600"}"#,
    );
    sim.grab(te).unwrap();
    sim.advance(4_000);
    // Forward by hours: the job has still run for 4 s only.
    sim.step_wall(HOURS_5);
    assert!(sim.take(client).is_empty(), "timeout fired by a wall step");
    assert_eq!(sim.broker.leases(sim.now)[0].held_ms, 4_000);
    // Back by ten hours: the deadline is still 6 s away, not hours.
    sim.step_wall(-2 * HOURS_5);
    sim.advance(5_999);
    assert!(sim.take(client).is_empty(), "timeout fired early");
    assert_eq!(sim.broker.leases(sim.now)[0].held_ms, 9_999);
    sim.advance(1);
    let failed = sim.take(client);
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(
        (failed[0].ptype, &failed[0].args[0]),
        (T::WorkFail, &handle)
    );
    let ended = &sim.broker.lease_history()[0];
    assert_eq!(ended.outcome, "timed out");
    // Shown in wall time, which went back: the history never shows a negative duration.
    assert!(ended.ended_ms >= ended.started_ms, "{ended:?}");
}

#[test]
fn a_wall_clock_step_neither_fires_nor_stalls_a_wake_check() {
    for step in [HOURS_5, -HOURS_5] {
        let mut sim = Sim::new();
        let c = sim.conn(1);
        let (_woken, other) = sim.two_sleepers_and_a_job(c, "f");
        // `woken` ignores its NOOP; the wall clock steps while no real time passes.
        sim.step_wall(step);
        assert!(sim.take(other).is_empty(), "step {step}: wake check fired");
        sim.advance(WAKE_RETRY_MS - 1);
        assert!(sim.take(other).is_empty(), "step {step}: wake check early");
        sim.advance(1);
        assert_eq!(sim.types(other), vec![T::Noop], "step {step}: stalled");
    }
}

#[test]
fn scheduled_jobs_follow_the_wall_clock() {
    // SUBMIT_JOB_EPOCH names a wall-clock time: a step forward past it makes the job due.
    let mut sim = Sim::new();
    let (c, w) = (sim.conn(1), sim.conn(2));
    sim.send(w, T::CanDo, &[b"f"]);
    let at = (sim.now.wall / 1000 + 3_600).to_string();
    sim.send(c, T::SubmitJobEpoch, &[b"f", b"", at.as_bytes(), b"later"]);
    assert_eq!(sim.types(c), vec![T::JobCreated]);
    let due = sim.broker.next_deadline(sim.now).unwrap();
    assert_eq!(due, sim.now.mono + 3_600_000);
    assert!(sim.grab(w).is_none());
    sim.step_wall(HOURS_5);
    assert_eq!(sim.grab(w).unwrap().3, "later");
}

#[test]
fn extreme_time_fields_neither_panic_nor_wrap() {
    let mut sim = Sim::new();
    // A broker whose monotonic clock is near its end, and the largest values the fields take.
    sim.now.mono = u64::MAX - 10;
    sim.now.wall = u64::MAX - 10;
    let (c, w1, w2) = (sim.conn(1), sim.conn(2), sim.conn(3));
    sim.send(w1, T::CanDoTimeout, &[b"f", b"4294967295"]);
    sim.send(w2, T::CanDo, &[b"f"]);
    sim.send(w2, T::PreSleep, &[]);
    sim.send(
        c,
        T::SubmitJobEpoch,
        &[b"f", b"", b"18446744073709551615", b"x"],
    );
    sim.send(
        c,
        T::SubmitJobSched,
        &[b"f", b"", b"", b"", b"", b"", b"", b"y"],
    );
    let handle = sim.submit(c, T::SubmitJob, "f", "", "z");
    assert_eq!(sim.types(w2), vec![T::Noop]);
    assert_eq!(sim.grab(w1).unwrap().0, handle);
    sim.advance(5);
    // The deadline saturated at the end of time rather than wrapping into the past.
    assert!(sim.take(c).iter().all(|p| p.ptype != T::WorkFail));
    assert!(sim.broker.next_deadline(sim.now).is_some());
}
