//! Graceful shutdown (drain): no new work is handed out, running jobs finish as usual, and a
//! TE lease in progress can still hand its data to its holder.

mod sim;

use broker_core::RunningJobs;
use gearman_proto::PacketType as T;
use sim::Sim;

#[test]
fn draining_refuses_new_work_and_lets_running_jobs_finish() {
    let mut sim = Sim::new();
    let (c, w1, w2, idle) = (sim.conn(1), sim.conn(2), sim.conn(3), sim.conn(4));
    for w in [w1, w2, idle] {
        sim.send(w, T::CanDo, &[b"f"]);
    }
    let fg = sim.submit(c, T::SubmitJob, "f", "", "fg");
    sim.submit(c, T::SubmitJobBg, "f", "", "bg");
    sim.submit(c, T::SubmitJobBg, "f", "", "queued");
    assert_eq!(sim.grab(w1).unwrap().0, fg);
    let (bg, ..) = sim.grab(w2).unwrap();
    let both = RunningJobs {
        foreground: 1,
        background: 1,
    };
    assert_eq!(sim.broker.running_jobs(), both);

    sim.broker.begin_shutdown();
    assert!(sim.broker.is_shutting_down());
    // New work is refused, queued work is not handed out.
    sim.send(c, T::SubmitJob, &[b"f", b"", b"late"]);
    let refused = sim.take(c);
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].ptype, T::Error);
    assert_eq!(refused[0].args[0], "SHUTTING_DOWN");
    assert!(sim.grab(idle).is_none());
    // A worker going to sleep is not woken for work it may not take (no NOOP loop).
    sim.send(idle, T::PreSleep, &[]);
    assert!(sim.take(idle).is_empty());

    // Running jobs report and end as usual.
    sim.send(w1, T::WorkStatus, &[&fg, b"1", b"2"]);
    sim.send(w1, T::WorkComplete, &[&fg, b"done"]);
    assert_eq!(sim.types(c), vec![T::WorkStatus, T::WorkComplete]);
    assert_eq!(
        sim.broker.running_jobs(),
        RunningJobs {
            foreground: 0,
            background: 1
        }
    );
    sim.send(w2, T::WorkComplete, &[&bg, b""]);
    assert_eq!(sim.broker.running_jobs().total(), 0);
    // The queued job is still there, and does not hold the shutdown up.
    assert_eq!(sim.admin(c, "status"), "f\t1\t0\t3\n.\n");
    assert!(sim.grab(w1).is_none());
}

#[test]
fn a_lease_in_progress_still_delivers_its_te_data_while_draining() {
    let mut sim = Sim::new();
    let (client, cbw, te, te2) = (sim.conn(1), sim.conn(2), sim.conn(3), sim.conn(4));
    sim.send(cbw, T::CanDo, &[b"callback_7"]);
    sim.send(cbw, T::PreSleep, &[]);
    for w in [te, te2] {
        sim.send(w, T::CanDo, &[b"lockenv"]);
    }
    let request = r#"{"callback_name": "callback_7", "timeout": "600"}"#;
    let lockenv = sim.submit(client, T::SubmitJob, "lockenv", "", request);
    let waiting = sim.submit(
        client,
        T::SubmitJob,
        "lockenv",
        "",
        r#"{"callback_name": "callback_8"}"#,
    );
    assert_eq!(sim.grab(te).unwrap().0, lockenv);

    sim.admin(client, "shutdown graceful");
    assert!(sim.broker.is_shutting_down());
    // The second request waits in the queue; no other TE is handed out.
    assert!(sim.grab(te2).is_none());
    // The TE worker hands the TE data to the holder's callback, which is woken and served.
    let data = sim.submit(te, T::SubmitJob, "callback_7", "", "te data");
    assert_eq!(sim.types(cbw), vec![T::Noop]);
    assert_eq!(sim.grab(cbw).unwrap().0, data);
    sim.send(cbw, T::WorkComplete, &[&data, b""]);
    assert_eq!(sim.types(te), vec![T::WorkComplete]);
    // Other functions stay closed, callback-looking or not.
    sim.send(te, T::SubmitJob, &[b"callback_8", b"", b"x"]);
    assert_eq!(sim.take(te)[0].args[0], "SHUTTING_DOWN");
    assert_eq!(sim.broker.running_jobs().total(), 1);
    sim.send(te, T::WorkComplete, &[&lockenv, b""]);
    assert_eq!(sim.types(client), vec![T::WorkComplete]);
    assert_eq!(sim.broker.running_jobs().total(), 0);
    assert_eq!(sim.broker.lease_history()[0].outcome, "released");
    assert_eq!(sim.broker.queue_position(&waiting), Some((1, 1)));
}

#[test]
fn only_graceful_shutdown_drains() {
    let mut sim = Sim::new();
    let c = sim.conn(1);
    sim.broker.admin(c, "shutdown", sim.now, &mut sim.out);
    assert!(!sim.broker.is_shutting_down());
    sim.admin(c, "shutdown graceful");
    assert!(sim.broker.is_shutting_down());
}
