//! The broker's rules, driven through the state machine without sockets.

mod sim;

use broker_core::{Action, ConnId};
use bytes::Bytes;
use gearman_proto::{Packet, PacketType as T};
use sim::{s, Sim};

#[test]
fn foreground_round_trip_with_updates() {
    let mut sim = Sim::new();
    let (c, w) = (sim.conn(1), sim.conn(2));
    sim.send(w, T::CanDo, &[b"rev"]);
    sim.send(w, T::PreSleep, &[]);
    let h = sim.submit(c, T::SubmitJob, "rev", "", "hello");
    assert_eq!(sim.types(w), vec![T::Noop]);
    let (h2, f, _, data) = sim.grab(w).unwrap();
    assert_eq!(
        (h2.clone(), f.as_str(), data.as_str()),
        (h.clone(), "rev", "hello")
    );
    sim.send(w, T::WorkData, &[&h, b"part"]);
    sim.send(w, T::WorkStatus, &[&h, b"1", b"2"]);
    sim.send(w, T::WorkWarning, &[&h, b"careful"]);
    sim.send(w, T::WorkComplete, &[&h, b"olleh"]);
    let got = sim.take(c);
    let types: Vec<T> = got.iter().map(|p| p.ptype).collect();
    assert_eq!(
        types,
        vec![T::WorkData, T::WorkStatus, T::WorkWarning, T::WorkComplete]
    );
    assert_eq!(got[3].args[1], "olleh");
    assert_eq!(sim.broker.job_count(), 0);
    // The function stays while a worker can do it; the job is gone.
    assert_eq!(sim.admin(c, "status"), "rev\t0\t0\t1\n.\n");
}

#[test]
fn priorities_then_fifo() {
    let mut sim = Sim::new();
    let (c, w) = (sim.conn(1), sim.conn(2));
    sim.submit(c, T::SubmitJobLowBg, "f", "", "low1");
    sim.submit(c, T::SubmitJobBg, "f", "", "normal1");
    sim.submit(c, T::SubmitJobHighBg, "f", "", "high1");
    sim.submit(c, T::SubmitJobBg, "f", "", "normal2");
    sim.submit(c, T::SubmitJobHigh, "f", "", "high2");
    sim.submit(c, T::SubmitJobLow, "f", "", "low2");
    assert_eq!(sim.admin(c, "prioritystatus"), "f\t2\t2\t2\t0\n.\n");
    sim.send(w, T::CanDo, &[b"f"]);
    let mut order = Vec::new();
    while let Some((h, _, _, data)) = sim.grab(w) {
        sim.send(w, T::WorkComplete, &[&h, b""]);
        order.push(data);
    }
    assert_eq!(
        order,
        ["high1", "high2", "normal1", "normal2", "low1", "low2"]
    );
}

#[test]
fn unique_jobs_coalesce_and_every_client_gets_results() {
    let mut sim = Sim::new();
    let (c1, c2, c3, w) = (sim.conn(1), sim.conn(2), sim.conn(3), sim.conn(4));
    let h1 = sim.submit(c1, T::SubmitJob, "f", "u1", "x");
    sim.send(w, T::CanDo, &[b"f"]);
    let (h, _, unique, _) = sim.grab(w).unwrap();
    assert_eq!(unique, "u1");
    // Attaches to the running job.
    let h2 = sim.submit(c2, T::SubmitJob, "f", "u1", "ignored");
    assert_eq!(h1, h2);
    // Same unique on another function is another job.
    let h3 = sim.submit(c3, T::SubmitJob, "g", "u1", "y");
    assert_ne!(h1, h3);
    sim.send(w, T::WorkStatus, &[&h, b"5", b"10"]);
    sim.send(w, T::WorkComplete, &[&h, b"done"]);
    for c in [c1, c2] {
        assert_eq!(sim.types(c), vec![T::WorkStatus, T::WorkComplete]);
    }
    assert!(sim.take(c3).is_empty());
    // "-" means: the data is the unique key.
    let a = sim.submit(c1, T::SubmitJobBg, "g", "-", "same");
    let b = sim.submit(c2, T::SubmitJobBg, "g", "-", "same");
    assert_eq!(a, b);
}

#[test]
fn worker_loss_fails_foreground_and_requeues_background_at_head() {
    let mut sim = Sim::new();
    let (c, w1, w2) = (sim.conn(1), sim.conn(2), sim.conn(3));
    sim.send(w1, T::CanDo, &[b"f"]);
    let fg = sim.submit(c, T::SubmitJob, "f", "", "fg");
    let (h, ..) = sim.grab(w1).unwrap();
    assert_eq!(h, fg);
    sim.drop_conn(w1);
    let got = sim.take(c);
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].ptype, got[0].args[0].clone()), (T::WorkFail, fg));
    assert_eq!(sim.broker.job_count(), 0);

    let w3 = sim.conn(4);
    sim.send(w3, T::CanDo, &[b"f"]);
    sim.submit(c, T::SubmitJobBg, "f", "", "bg1");
    sim.submit(c, T::SubmitJobBg, "f", "", "bg2");
    let (_, _, _, first) = sim.grab(w3).unwrap();
    assert_eq!(first, "bg1");
    sim.send(w2, T::CanDo, &[b"f"]);
    sim.send(w2, T::PreSleep, &[]);
    assert_eq!(sim.types(w2), vec![T::Noop], "work waiting: woken at once");
    sim.send(w2, T::PreSleep, &[]);
    sim.take(w2);
    sim.drop_conn(w3);
    assert!(
        sim.take(c).is_empty(),
        "a background job's client hears nothing"
    );
    let (_, _, _, again) = sim.grab(w2).unwrap();
    assert_eq!(again, "bg1", "requeued at the head, before bg2");
    assert_eq!(sim.admin(c, "show jobs").lines().count(), 3);
}

#[test]
fn client_loss_drops_its_queued_jobs_but_not_shared_or_running_ones() {
    let mut sim = Sim::new();
    let (c1, c2, w) = (sim.conn(1), sim.conn(2), sim.conn(3));
    sim.submit(c1, T::SubmitJob, "f", "", "running");
    sim.send(w, T::CanDo, &[b"f"]);
    let (h, ..) = sim.grab(w).unwrap();
    sim.submit(c1, T::SubmitJob, "f", "", "queued-alone");
    sim.submit(c1, T::SubmitJob, "f", "shared", "queued-shared");
    sim.submit(c2, T::SubmitJob, "f", "shared", "queued-shared");
    sim.submit(c1, T::SubmitJobBg, "f", "", "background");
    assert_eq!(sim.broker.job_count(), 4);
    sim.drop_conn(c1);
    assert_eq!(sim.broker.job_count(), 3);
    sim.send(w, T::WorkComplete, &[&h, b"nobody listens"]);
    assert!(sim.out.is_empty());
    let (_, _, _, d) = sim.grab(w).unwrap();
    assert_eq!(d, "queued-shared");
    let (_, _, _, d) = sim.grab(w).unwrap();
    assert_eq!(d, "background");
}

#[test]
fn can_do_timeout_fails_the_job() {
    let mut sim = Sim::new();
    let (c, w) = (sim.conn(1), sim.conn(2));
    sim.send(w, T::CanDoTimeout, &[b"slow", b"2"]);
    let h = sim.submit(c, T::SubmitJob, "slow", "", "x");
    sim.grab(w).unwrap();
    sim.advance(1_500);
    assert!(sim.take(c).is_empty());
    sim.advance(600);
    let got = sim.take(c);
    assert_eq!(
        (got[0].ptype, got[0].args[0].clone()),
        (T::WorkFail, h.clone())
    );
    // A late answer from the worker is ignored.
    sim.send(w, T::WorkComplete, &[&h, b"late"]);
    assert!(sim.take(c).is_empty());
    assert_eq!(sim.broker.stats().jobs_timed_out, 1);
}

#[test]
fn position_tells_where_a_queued_job_stands() {
    let mut sim = Sim::new();
    let (c, w) = (sim.conn(1), sim.conn(2));
    let a = sim.submit(c, T::SubmitJob, "lockenv", "", "a");
    let b = sim.submit(c, T::SubmitJob, "lockenv", "", "b");
    let hi = sim.submit(c, T::SubmitJobHigh, "lockenv", "", "hi");
    assert_eq!(sim.admin(c, &format!("position {}", s(&b))), "OK 3 3\n");
    assert_eq!(sim.admin(c, &format!("position {}", s(&hi))), "OK 1 3\n");
    sim.send(w, T::CanDo, &[b"lockenv"]);
    sim.grab(w).unwrap();
    assert_eq!(sim.admin(c, &format!("position {}", s(&hi))), "OK 0 2\n");
    assert_eq!(sim.admin(c, &format!("position {}", s(&a))), "OK 1 2\n");
    assert_eq!(sim.admin(c, "position H:t:999"), "ERR UNKNOWN_JOB\r\n");
    assert!(sim
        .admin(c, "position")
        .starts_with("ERR INVALID_ARGUMENTS"));
}

#[test]
fn cancel_job_only_for_queued_background() {
    let mut sim = Sim::new();
    let c = sim.conn(1);
    let bg = sim.submit(c, T::SubmitJobBg, "f", "", "x");
    let fg = sim.submit(c, T::SubmitJob, "f", "", "y");
    assert_eq!(
        sim.admin(c, &format!("cancel job {}", s(&fg))),
        "ERR UNKNOWN_JOB\r\n"
    );
    assert_eq!(sim.admin(c, &format!("cancel job {}", s(&bg))), "OK\r\n");
    assert_eq!(
        sim.admin(c, &format!("cancel job {}", s(&bg))),
        "ERR UNKNOWN_JOB\r\n"
    );
    assert_eq!(sim.broker.job_count(), 1);
}

#[test]
fn exceptions_go_to_every_client_asked_or_not() {
    let mut sim = Sim::new();
    let (c1, c2, w) = (sim.conn(1), sim.conn(2), sim.conn(3));
    sim.send(c1, T::OptionReq, &[b"exceptions"]);
    assert_eq!(sim.types(c1), vec![T::OptionRes]);
    sim.submit(c1, T::SubmitJob, "f", "u", "x");
    sim.submit(c2, T::SubmitJob, "f", "u", "x");
    sim.send(w, T::CanDo, &[b"f"]);
    let (h, ..) = sim.grab(w).unwrap();
    sim.send(w, T::WorkException, &[&h, b"boom"]);
    // c2 did not send OPTION_REQ: it gets the exception too, as with geard.
    for c in [c1, c2] {
        let got = sim.take(c);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(
            (got[0].ptype, &got[0].args[1]),
            (T::WorkException, &"boom".into())
        );
    }
    sim.send(c2, T::OptionReq, &[b"nonsense"]);
    assert_eq!(sim.types(c2), vec![T::Error]);
}

#[test]
fn get_status_and_get_status_unique() {
    let mut sim = Sim::new();
    let (c, w) = (sim.conn(1), sim.conn(2));
    let h = sim.submit(c, T::SubmitJobBg, "f", "uu", "x");
    sim.send(c, T::GetStatus, &[&h]);
    let st = sim.take(c).pop().unwrap();
    assert_eq!(
        st.args,
        vec![h.clone(), "1".into(), "0".into(), "0".into(), "0".into()]
    );
    sim.send(w, T::CanDo, &[b"f"]);
    sim.grab(w).unwrap();
    sim.send(w, T::WorkStatus, &[&h, b"3", b"4"]);
    sim.send(c, T::GetStatusUnique, &[b"uu"]);
    let st = sim.take(c).pop().unwrap();
    assert_eq!(st.ptype, T::StatusResUnique);
    assert_eq!(
        st.args[1..5],
        [Bytes::from("1"), "1".into(), "3".into(), "4".into()]
    );
    sim.send(c, T::GetStatus, &[b"H:t:999"]);
    let st = sim.take(c).pop().unwrap();
    assert_eq!(st.args[1], "0");
}

#[test]
fn only_one_sleeping_worker_is_woken_per_job() {
    let mut sim = Sim::new();
    let c = sim.conn(1);
    let workers: Vec<ConnId> = (10..20).map(|i| sim.conn(i)).collect();
    for &w in &workers {
        sim.send(w, T::CanDo, &[b"lockenv"]);
        sim.send(w, T::PreSleep, &[]);
    }
    sim.submit(c, T::SubmitJob, "lockenv", "", "{}");
    let woken: Vec<ConnId> = workers
        .iter()
        .copied()
        .filter(|&w| !sim.take(w).is_empty())
        .collect();
    assert_eq!(woken.len(), 1);
}

#[test]
fn a_woken_worker_that_stays_silent_passes_the_wakeup_on() {
    let mut sim = Sim::new();
    let c = sim.conn(1);
    let (_first, other) = sim.two_sleepers_and_a_job(c, "f");
    // `first` ignores its NOOP (it wants no work right now).
    sim.advance(broker_core::WAKE_RETRY_MS / 2);
    assert!(sim.take(other).is_empty());
    sim.advance(broker_core::WAKE_RETRY_MS);
    assert_eq!(sim.types(other), vec![T::Noop]);
    assert_eq!(sim.grab(other).unwrap().3, "x");
}

#[test]
fn woken_worker_taking_other_work_passes_the_wakeup_on() {
    let mut sim = Sim::new();
    let c = sim.conn(1);
    let (both, only_g) = (sim.conn(2), sim.conn(3));
    sim.send(both, T::CanDo, &[b"f"]);
    sim.send(both, T::CanDo, &[b"g"]);
    sim.send(only_g, T::CanDo, &[b"g"]);
    sim.send(both, T::PreSleep, &[]);
    sim.send(only_g, T::PreSleep, &[]);
    sim.submit(c, T::SubmitJobHighBg, "f", "", "f-job");
    assert_eq!(sim.types(both), vec![T::Noop]);
    sim.submit(c, T::SubmitJobBg, "g", "", "g-job");
    assert_eq!(sim.types(only_g), vec![T::Noop]);
    let (_, f, ..) = sim.grab(both).unwrap();
    assert_eq!(f, "f");
    let (_, g, ..) = sim.grab(only_g).unwrap();
    assert_eq!(g, "g");
}

#[test]
fn scheduled_jobs_run_at_their_time() {
    let mut sim = Sim::new();
    let (c, w) = (sim.conn(1), sim.conn(2));
    sim.send(w, T::CanDo, &[b"f"]);
    sim.send(w, T::PreSleep, &[]);
    let at = (sim.now.wall / 1000 + 5).to_string();
    sim.send(c, T::SubmitJobEpoch, &[b"f", b"", at.as_bytes(), b"later"]);
    assert_eq!(sim.types(c), vec![T::JobCreated]);
    assert!(sim.take(w).is_empty());
    sim.advance(6_000);
    assert_eq!(sim.types(w), vec![T::Noop]);
    assert_eq!(sim.grab(w).unwrap().3, "later");
    // SUBMIT_JOB_SCHED with every field "any" runs at the next minute.
    sim.send(
        c,
        T::SubmitJobSched,
        &[b"f", b"", b"", b"", b"", b"", b"", b"cron"],
    );
    assert_eq!(sim.types(c), vec![T::JobCreated]);
    sim.advance(61_000);
    assert_eq!(sim.grab(w).map(|j| j.3), Some("cron".to_string()));
    sim.send(
        c,
        T::SubmitJobSched,
        &[b"f", b"", b"99", b"", b"", b"", b"", b"bad"],
    );
    assert_eq!(sim.types(c), vec![T::Error]);
}

#[test]
fn maxqueue_refuses_with_queue_error() {
    let mut sim = Sim::new();
    let c = sim.conn(1);
    assert_eq!(sim.admin(c, "maxqueue f 1"), "OK\r\n");
    sim.submit(c, T::SubmitJobBg, "f", "", "1");
    sim.send(c, T::SubmitJobBg, &[b"f", b"", b"2"]);
    let e = sim.take(c).pop().unwrap();
    assert_eq!(
        (e.ptype, e.args[0].clone()),
        (T::Error, Bytes::from("QUEUE_ERROR"))
    );
    assert_eq!(sim.admin(c, "maxqueue f"), "OK\r\n");
    sim.submit(c, T::SubmitJobBg, "f", "", "2");
}

#[test]
fn a_worker_cannot_answer_for_a_job_it_does_not_hold() {
    let mut sim = Sim::new();
    let (c, w, intruder) = (sim.conn(1), sim.conn(2), sim.conn(3));
    sim.send(w, T::CanDo, &[b"f"]);
    let h = sim.submit(c, T::SubmitJob, "f", "", "x");
    sim.send(intruder, T::WorkComplete, &[&h, b"forged"]);
    assert!(sim.take(c).is_empty());
    sim.grab(w).unwrap();
    sim.send(intruder, T::WorkComplete, &[&h, b"forged"]);
    assert!(sim.take(c).is_empty());
    sim.send(w, T::WorkComplete, &[&h, b"real"]);
    assert_eq!(sim.take(c)[0].args[1], "real");
}

#[test]
fn callback_functions_are_forgotten_when_unused() {
    let mut sim = Sim::new();
    for i in 0..1000 {
        let cw = sim.conn(100 + i);
        let name = format!("callback_{i}");
        sim.send(cw, T::CanDo, &[name.as_bytes()]);
        sim.send(cw, T::PreSleep, &[]);
    }
    assert_eq!(sim.broker.function_count(), 1000);
    for i in 0..1000 {
        sim.drop_conn(ConnId(100 + i));
    }
    assert_eq!(sim.broker.function_count(), 0);
}

#[test]
fn testenv_lease_is_visible_without_secrets() {
    let mut sim = Sim::new();
    let (client, cbw, te) = (sim.conn(1), sim.conn(2), sim.conn(3));
    sim.send(te, T::SetClientId, &[b"te-worker-1"]);
    sim.send(te, T::CanDo, &[b"lockenv"]);
    sim.send(cbw, T::CanDo, &[b"callback_abc"]);
    let req = r#"{"callback_name": "callback_abc", "timeout": "600", "ssh_key": "SECRET-KEY", "job_identifier": "123: toci"}"#;
    sim.submit(client, T::SubmitJob, "lockenv", "", req);
    sim.grab(te).unwrap();
    sim.submit(
        te,
        T::SubmitJob,
        "callback_abc",
        "",
        "{\"ssh-key\": \"SECRET\"}",
    );
    sim.grab(cbw).unwrap();
    sim.advance(3_000);
    let text = sim.admin(client, "leases");
    assert!(
        text.contains("te-worker-1\tcallback_abc\t123: toci\t3\t600\trunning"),
        "{text}"
    );
    assert!(!text.contains("SECRET"));
    // The client dies: its callback job fails to the TE worker at once.
    sim.drop_conn(cbw);
    assert_eq!(sim.types(te), vec![T::WorkFail]);
    assert!(
        sim.broker.lease_history().is_empty(),
        "still leased until lockenv ends"
    );
    let lockenv = sim.broker.leases(sim.now)[0].lockenv_handle.clone();
    sim.advance(1_000);
    sim.send(te, T::WorkComplete, &[lockenv.as_bytes(), b""]);
    let history = sim.broker.lease_history();
    assert_eq!(history.len(), 1);
    let ended = &history[0];
    assert_eq!(
        (
            ended.worker_id.as_str(),
            ended.callback.as_str(),
            ended.outcome
        ),
        ("te-worker-1", "callback_abc", "released")
    );
    assert_eq!(ended.ended_ms - ended.started_ms, 4_000);
    assert_eq!(sim.broker.take_new_history(), history);
    assert!(sim.broker.take_new_history().is_empty());
    let json = serde_json::to_string(&history).unwrap();
    assert!(!json.contains("SECRET"), "{json}");
}

#[test]
fn a_lost_testenv_worker_ends_its_lease_as_worker_lost() {
    let mut sim = Sim::new();
    let (client, te) = (sim.conn(1), sim.conn(2));
    sim.send(te, T::CanDo, &[b"lockenv"]);
    sim.submit(
        client,
        T::SubmitJob,
        "lockenv",
        "",
        r#"{"callback_name": "callback_z"}"#,
    );
    sim.grab(te).unwrap();
    assert_eq!(sim.broker.leases(sim.now).len(), 1);
    sim.drop_conn(te);
    assert_eq!(sim.types(client), vec![T::WorkFail]);
    assert!(sim.broker.leases(sim.now).is_empty());
    assert_eq!(sim.broker.lease_history()[0].outcome, "worker lost");
}

#[test]
fn admin_formats() {
    let mut sim = Sim::new();
    let (c, w) = (sim.conn(1), sim.conn(2));
    sim.send(w, T::SetClientId, &[b"my-worker"]);
    sim.send(w, T::CanDo, &[b"a"]);
    sim.send(w, T::CanDo, &[b"b"]);
    assert_eq!(
        sim.admin(c, "workers"),
        "1 127.0.0.1 - :\n2 127.0.0.1 my-worker : a b\n.\n"
    );
    assert_eq!(sim.admin(c, "getpid"), "OK 42\n");
    assert_eq!(sim.admin(c, "version"), "OK test\n");
    assert!(sim
        .admin(c, "frobnicate")
        .starts_with("ERR UNKNOWN_COMMAND"));
    sim.submit(c, T::SubmitJobBg, "a", "uniq-1", "x");
    assert_eq!(sim.admin(c, "show unique jobs"), "uniq-1\n.\n");
    assert_eq!(sim.admin(c, "show jobs"), "H:t:1\t0\t0\t1\n.\n");
    sim.send(w, T::CantDo, &[b"a"]);
    assert_eq!(sim.admin(c, "status"), "a\t1\t0\t0\nb\t0\t0\t1\n.\n");
    sim.send(w, T::ResetAbilities, &[]);
    assert_eq!(sim.admin(c, "status"), "a\t1\t0\t0\n.\n");
    sim.broker
        .admin(c, "shutdown graceful", sim.now, &mut sim.out);
    assert!(sim.out.contains(&Action::Shutdown { graceful: true }));
}

#[test]
fn server_only_packets_and_response_magic_get_errors() {
    let mut sim = Sim::new();
    let c = sim.conn(1);
    sim.send(c, T::JobCreated, &[b"H:x:1"]);
    let e = sim.take(c).pop().unwrap();
    assert_eq!(e.args[0], "INVALID_COMMAND");
    let mut p = Packet::req(T::EchoReq, ["x"]);
    p.magic = gearman_proto::Magic::Res;
    sim.broker.packet(c, p, sim.now, &mut sim.out);
    assert_eq!(sim.take(c).pop().unwrap().args[0], "INVALID_MAGIC");
    sim.send(c, T::EchoReq, &[b"ping\0with nul"]);
    assert_eq!(sim.take(c).pop().unwrap().args[0], "ping\0with nul");
    sim.send(c, T::SubmitReduceJob, &[b"f", b"", b"r", b"x"]);
    assert_eq!(sim.take(c).pop().unwrap().ptype, T::Error);
}
