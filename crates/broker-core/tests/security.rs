//! ACLs, callback hijack protection and the limits the core enforces, without sockets.

mod sim;

use broker_core::acl::Acl;
use broker_core::{ConnId, Security};
use gearman_proto::PacketType as T;
use sim::Sim;

fn protected() -> Security {
    Security {
        callback_protection: true,
        ..Security::default()
    }
}

#[test]
fn second_registration_of_a_callback_is_refused() {
    let mut s = Sim::with_security(protected());
    let owner = s.conn_as(1, "10.0.0.1", None);
    let thief = s.conn_as(2, "10.0.0.2", None);
    s.send(owner, T::CanDo, &[b"callback_1"]);
    assert!(s.take_pairs(owner).is_empty());
    s.send(thief, T::CanDo, &[b"callback_1"]);
    let got = s.take_pairs(thief);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, T::Error);
    assert_eq!(&got[0].1[0][..], b"CALLBACK_TAKEN");
    // Also through CAN_DO_TIMEOUT.
    s.send(thief, T::CanDoTimeout, &[b"callback_1", b"10"]);
    assert_eq!(s.take_pairs(thief)[0].0, T::Error);
    // The owner may register again; other functions are unaffected.
    s.send(owner, T::CanDo, &[b"callback_1"]);
    assert!(s.take_pairs(owner).is_empty());
    s.send(thief, T::CanDo, &[b"lockenv"]);
    s.send(owner, T::CanDo, &[b"lockenv"]);
    assert!(s.take_pairs(thief).is_empty());
    let workers = s.admin(owner, "workers");
    assert!(
        workers.contains("10.0.0.1 - : callback_1 lockenv"),
        "{workers}"
    );
    assert!(workers.contains("10.0.0.2 - : lockenv\n"), "{workers}");
    let stats = s.admin(owner, "stats");
    assert!(stats.contains("callback_hijacks_refused\t2\n"), "{stats}");
}

#[test]
fn legitimate_testenv_flow_works_with_protection() {
    let mut s = Sim::with_security(protected());
    let cb_worker = s.conn_as(1, "10.0.0.1", None);
    let client = s.conn_as(2, "10.0.0.1", None);
    let te_worker = s.conn_as(3, "10.0.0.9", None);
    s.send(te_worker, T::CanDo, &[b"lockenv"]);
    s.send(cb_worker, T::CanDo, &[b"callback_abc"]);
    s.send(
        client,
        T::SubmitJob,
        &[
            b"lockenv",
            b"",
            br#"{"callback_name": "callback_abc", "timeout": "100"}"#,
        ],
    );
    s.send(te_worker, T::GrabJob, &[]);
    let assign = s.take_pairs(te_worker);
    assert_eq!(assign.last().unwrap().0, T::JobAssign);
    let lock_handle = assign.last().unwrap().1[0].clone();
    // The TE worker submits the TE data to the callback (submitting is never restricted).
    s.send(
        te_worker,
        T::SubmitJob,
        &[b"callback_abc", b"", b"{\"ssh-key\": \"SECRET\"}"],
    );
    s.send(cb_worker, T::GrabJob, &[]);
    let got = s.take_pairs(cb_worker);
    let (ty, args) = got.last().unwrap();
    assert_eq!(*ty, T::JobAssign);
    s.send(cb_worker, T::WorkComplete, &[&args[0], b""]);
    s.send(te_worker, T::WorkComplete, &[&lock_handle, b""]);
    assert!(s
        .take_pairs(client)
        .iter()
        .any(|(t, _)| *t == T::WorkComplete));
    // No admin output shows the TE data.
    for cmd in [
        "status",
        "workers",
        "show jobs",
        "show unique jobs",
        "leases",
        "stats",
    ] {
        assert!(!s.admin(client, cmd).contains("SECRET"));
    }
}

#[test]
fn an_orphaned_callback_is_reserved_for_its_owner_while_jobs_wait() {
    let mut s = Sim::with_security(protected());
    let owner = s.conn_as(1, "10.0.0.1", None);
    let te_worker = s.conn_as(2, "10.0.0.9", None);
    s.send(owner, T::CanDo, &[b"callback_x"]);
    s.send(te_worker, T::SubmitJob, &[b"callback_x", b"", b"secret"]);
    s.broker.disconnect(owner, &mut s.out);
    // A job waits for callback_x: a stranger may not take the name...
    let thief = s.conn_as(3, "10.0.0.2", None);
    s.send(thief, T::CanDo, &[b"callback_x"]);
    assert_eq!(s.take_pairs(thief)[0].0, T::Error);
    // ...but the owner coming back from the same address may.
    let back = s.conn_as(4, "10.0.0.1", None);
    s.send(back, T::CanDo, &[b"callback_x"]);
    assert!(s.take_pairs(back).is_empty());
    s.send(back, T::CantDo, &[b"callback_x"]);
    // Once no job is left for it, the name is free for anyone.
    s.broker.disconnect(te_worker, &mut s.out);
    s.send(thief, T::CanDo, &[b"callback_x"]);
    assert!(s.take_pairs(thief).is_empty());
    assert_eq!(s.broker.callback_reservations(), 1);
}

#[test]
fn without_protection_anyone_may_register_callbacks() {
    let mut s = Sim::with_security(Security::default());
    let a = s.conn_as(1, "10.0.0.1", None);
    let b = s.conn_as(2, "10.0.0.2", None);
    s.send(a, T::CanDo, &[b"callback_1"]);
    s.send(b, T::CanDo, &[b"callback_1"]);
    assert!(s.take_pairs(b).is_empty());
}

const ACL: &str = "\
[worker]
register = lockenv
[client]
register = callback_
invoke = lockenv
[admin]
grant = true
";

fn with_acl() -> Security {
    Security {
        acl: Some(Acl::parse(ACL).unwrap()),
        callback_protection: true,
        ..Security::default()
    }
}

#[test]
fn acl_register_is_ignored_when_not_allowed() {
    let mut s = Sim::with_security(with_acl());
    let w = s.conn_as(1, "h", Some("worker"));
    let anon = s.conn_as(2, "h", None);
    s.send(w, T::CanDo, &[b"lockenv"]);
    s.send(w, T::CanDo, &[b"callback_1"]);
    s.send(anon, T::CanDo, &[b"lockenv"]);
    // Ignored silently (geard sends nothing), but counted.
    assert!(s.take_pairs(w).is_empty());
    assert!(s.take_pairs(anon).is_empty());
    let workers = s.admin(w, "workers");
    assert!(workers.contains("1 h - : lockenv\n"), "{workers}");
    assert!(workers.contains("2 h - :\n"), "{workers}");
    assert!(s.admin(w, "stats").contains("acl_register_denied\t2\n"));
}

#[test]
fn acl_invoke_denied_gets_an_error_packet() {
    let mut s = Sim::with_security(with_acl());
    let c = s.conn_as(1, "h", Some("client"));
    let w = s.conn_as(2, "h", Some("worker"));
    for t in [
        T::SubmitJob,
        T::SubmitJobBg,
        T::SubmitJobHigh,
        T::SubmitJobHighBg,
        T::SubmitJobLow,
        T::SubmitJobLowBg,
    ] {
        s.send(w, t, &[b"lockenv", b"", b"x"]);
        let got = s.take_pairs(w);
        assert_eq!(got[0].0, T::Error, "{t:?}");
        assert_eq!(&got[0].1[1][..], b"Permission denied by ACL");
    }
    s.send(w, T::SubmitJobEpoch, &[b"lockenv", b"", b"1", b"x"]);
    assert_eq!(s.take_pairs(w)[0].0, T::Error);
    s.send(c, T::SubmitJob, &[b"lockenv", b"", b"x"]);
    assert_eq!(s.take_pairs(c)[0].0, T::JobCreated);
    s.send(c, T::SubmitJob, &[b"other", b"", b"x"]);
    assert_eq!(s.take_pairs(c)[0].0, T::Error);
}

#[test]
fn acl_guards_cancel_shutdown_and_maxqueue() {
    let mut s = Sim::with_security(with_acl());
    let c = s.conn_as(1, "h", Some("client"));
    let w = s.conn_as(2, "h", Some("worker"));
    let admin = s.conn_as(3, "h", Some("admin"));
    s.send(c, T::SubmitJobBg, &[b"lockenv", b"", b"x"]);
    let handle = s.take_pairs(c)[0].1[0].clone();
    let handle = String::from_utf8(handle.to_vec()).unwrap();
    assert_eq!(
        s.admin(w, &format!("cancel job {handle}")),
        "ERR PERMISSION_DENIED\r\n"
    );
    assert_eq!(s.admin(c, &format!("cancel job {handle}")), "OK\r\n");
    assert_eq!(s.admin(c, "shutdown"), "ERR PERMISSION_DENIED\r\n");
    assert_eq!(
        s.admin(c, "maxqueue lockenv 1"),
        "ERR PERMISSION_DENIED\r\n"
    );
    assert_eq!(s.admin(admin, "maxqueue lockenv 1"), "OK\r\n");
    assert!(s.admin(c, "status").ends_with(".\n"));
    // acl commands through the broker, with the connection's identity.
    assert!(s
        .admin(c, "acl list")
        .contains("client\tregister=callback_\tinvoke=lockenv\tgrant=False\n"));
    assert_eq!(
        s.admin(c, "acl grant invoke worker .*"),
        "ERR PERMISSION_DENIED\n"
    );
    assert_eq!(s.admin(admin, "acl grant invoke worker .*"), "OK\n");
    s.send(w, T::SubmitJob, &[b"anything", b"", b"x"]);
    assert_eq!(s.take_pairs(w)[0].0, T::JobCreated);
    assert_eq!(s.admin(w, "acl self-revoke invoke"), "OK\n");
    s.send(w, T::SubmitJob, &[b"anything", b"", b"x"]);
    assert_eq!(s.take_pairs(w)[0].0, T::Error);
}

#[test]
fn acl_disabled_answers_like_geard() {
    let mut s = Sim::with_security(Security::default());
    let c = s.conn_as(1, "h", None);
    for cmd in [
        "acl list",
        "acl grant invoke x y",
        "acl revoke all x",
        "acl self-revoke all",
    ] {
        assert_eq!(s.admin(c, cmd), "ERR ACL_DISABLED\n");
    }
}

#[test]
fn default_max_queue_and_function_limit_are_counted() {
    let mut s = Sim::with_security(Security {
        default_max_queue: Some(2),
        ..Security::default()
    });
    let c = s.conn_as(1, "h", None);
    for _ in 0..2 {
        s.send(c, T::SubmitJobBg, &[b"f", b"", b"x"]);
        assert_eq!(s.take_pairs(c)[0].0, T::JobCreated);
    }
    s.send(c, T::SubmitJobBg, &[b"f", b"", b"x"]);
    let got = s.take_pairs(c);
    assert_eq!(got[0].0, T::Error);
    assert_eq!(&got[0].1[0][..], b"QUEUE_ERROR");
    // A per-function maxqueue overrides the default.
    assert_eq!(s.admin(c, "maxqueue f 0"), "OK\r\n");
    s.send(c, T::SubmitJobBg, &[b"f", b"", b"x"]);
    assert_eq!(s.take_pairs(c)[0].0, T::JobCreated);
    assert!(s.admin(c, "stats").contains("queue_full\t1\n"));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        CanDo(u64, usize),
        CantDo(u64, usize),
        Reset(u64),
        Submit(u64, usize),
        Grab(u64),
        Complete(u64, u64),
        Disconnect(u64),
    }

    const FUNCS: [&[u8]; 3] = [b"callback_a", b"callback_b", b"lockenv"];

    fn arb_op() -> impl Strategy<Value = Op> {
        let c = 0u64..4;
        let f = 0usize..FUNCS.len();
        prop_oneof![
            (c.clone(), f.clone()).prop_map(|(c, f)| Op::CanDo(c, f)),
            (c.clone(), f.clone()).prop_map(|(c, f)| Op::CantDo(c, f)),
            c.clone().prop_map(Op::Reset),
            (c.clone(), f).prop_map(|(c, f)| Op::Submit(c, f)),
            c.clone().prop_map(Op::Grab),
            (c.clone(), 1u64..10).prop_map(|(c, h)| Op::Complete(c, h)),
            c.prop_map(Op::Disconnect),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// With protection on, a callback function never has two registered connections, and
        /// the core's own invariants hold after every step.
        #[test]
        fn a_callback_never_has_two_owners(ops in prop::collection::vec(arb_op(), 1..120)) {
            let mut s = Sim::with_security(protected());
            let mut generation = [0u64; 4];
            let id = |c: u64, g: &[u64; 4]| ConnId(c * 1000 + g[c as usize]);
            for c in 0..4u64 {
                s.conn_as(id(c, &generation).0, &format!("10.0.0.{}", c % 2), None);
            }
            for op in ops {
                match op {
                    Op::CanDo(c, f) => s.send(id(c, &generation), T::CanDo, &[FUNCS[f]]),
                    Op::CantDo(c, f) => s.send(id(c, &generation), T::CantDo, &[FUNCS[f]]),
                    Op::Reset(c) => s.send(id(c, &generation), T::ResetAbilities, &[]),
                    Op::Submit(c, f) => s.send(id(c, &generation), T::SubmitJob, &[FUNCS[f], b"", b"d"]),
                    Op::Grab(c) => s.send(id(c, &generation), T::GrabJob, &[]),
                    Op::Complete(c, h) => s.send(
                        id(c, &generation),
                        T::WorkComplete,
                        &[format!("H:t:{h}").as_bytes(), b""],
                    ),
                    Op::Disconnect(c) => {
                        s.broker.disconnect(id(c, &generation), &mut s.out);
                        s.broker.check_invariants().unwrap();
                        generation[c as usize] += 1;
                        s.conn_as(id(c, &generation).0, &format!("10.0.0.{}", c % 2), None);
                    }
                }
                s.out.clear();
                let workers = s.admin(ConnId(0), "workers");
                for f in ["callback_a", "callback_b"] {
                    let holders = workers
                        .lines()
                        .filter(|l| l.split(" : ").nth(1).is_some_and(|fs| fs.split(' ').any(|x| x == f)))
                        .count();
                    prop_assert!(holders <= 1, "{f} registered by {holders} connections:\n{workers}");
                }
            }
        }
    }
}
