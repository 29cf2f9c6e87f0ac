//! Property tests: random packet sequences from a handful of connections keep the broker's
//! indexes consistent, and every foreground submission ends with exactly one final packet.

use std::collections::HashMap;

use broker_core::{Action, Broker, BrokerConfig, ConnId, Now};
use bytes::Bytes;
use gearman_proto::{Packet, PacketType as T};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Packet(u64, T, Vec<Vec<u8>>),
    Disconnect(u64),
    Advance(u64),
    Admin(u64, String),
}

fn arb_op() -> impl Strategy<Value = Op> {
    let conn = 0u64..4;
    let func = prop::sample::select(vec![b"f".to_vec(), b"g".to_vec(), b"lockenv".to_vec()]);
    // Lock requests of two tenants and the shared one (and data that is no lock request).
    let data = prop::sample::select(vec![
        b"data".to_vec(),
        br#"{"callback_name":"callback_1","tenant":"a"}"#.to_vec(),
        br#"{"callback_name":"callback_2","tenant":"b"}"#.to_vec(),
        br#"{"callback_name":"callback_3"}"#.to_vec(),
    ]);
    // Broker-side drain and hold of the workers (named conn-N: they set no client id).
    let admin = prop::sample::select(vec![
        "drain conn-1000".to_string(),
        "undrain conn-1000".to_string(),
        "hold conn-2000 1".to_string(),
        "release conn-2000".to_string(),
        "envs".to_string(),
    ]);
    let uniq = prop::sample::select(vec![Vec::new(), b"u".to_vec()]);
    let handle = (1u64..8).prop_map(|n| format!("H:t:{n}").into_bytes());
    prop_oneof![
        (
            conn.clone(),
            func.clone(),
            uniq,
            prop::sample::select(vec![
                T::SubmitJob,
                T::SubmitJobBg,
                T::SubmitJobHigh,
                T::SubmitJobLowBg
            ]),
            data
        )
            .prop_map(|(c, f, u, t, d)| Op::Packet(c, t, vec![f, u, d])),
        (conn.clone(), admin).prop_map(|(c, line)| Op::Admin(c, line)),
        (conn.clone(), func.clone()).prop_map(|(c, f)| Op::Packet(c, T::CanDo, vec![f])),
        (conn.clone(), func.clone()).prop_map(|(c, f)| Op::Packet(
            c,
            T::CanDoTimeout,
            vec![f, b"1".to_vec()]
        )),
        (conn.clone(), func).prop_map(|(c, f)| Op::Packet(c, T::CantDo, vec![f])),
        conn.clone()
            .prop_map(|c| Op::Packet(c, T::GrabJobUniq, vec![])),
        conn.clone()
            .prop_map(|c| Op::Packet(c, T::PreSleep, vec![])),
        conn.clone()
            .prop_map(|c| Op::Packet(c, T::ResetAbilities, vec![])),
        (
            conn.clone(),
            handle.clone(),
            prop::sample::select(vec![
                T::WorkComplete,
                T::WorkFail,
                T::WorkException,
                T::WorkData
            ])
        )
            .prop_map(|(c, h, t)| {
                let args = if t == T::WorkFail {
                    vec![h]
                } else {
                    vec![h, b"x".to_vec()]
                };
                Op::Packet(c, t, args)
            }),
        conn.clone().prop_map(Op::Disconnect),
        (0u64..2_000).prop_map(Op::Advance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn indexes_stay_consistent_and_every_foreground_job_ends_once(ops in prop::collection::vec(arb_op(), 1..80)) {
        let mut broker = Broker::new(BrokerConfig {
            handle_host: "t".into(),
            ..BrokerConfig::default()
        });
        let mut now = Now { mono: 1_000_000, wall: 1_700_000_000_000 };
        let mut generation = [0u64; 4];
        let live = |c: u64, g: &[u64; 4]| ConnId(c * 1000 + g[c as usize]);
        for c in 0..4 {
            broker.connect(live(c, &generation), "127.0.0.1");
        }
        // (client, handle) -> final packets seen; one entry per foreground JOB_CREATED.
        let mut finals: HashMap<(ConnId, Bytes), u32> = HashMap::new();
        let mut out = Vec::new();
        for op in ops {
            let mut submitted_fg = None;
            match op {
                Op::Packet(c, t, args) => {
                    let conn = live(c, &generation);
                    if matches!(t, T::SubmitJob | T::SubmitJobHigh) {
                        submitted_fg = Some(conn);
                    }
                    broker.packet(conn, Packet::req(t, args.into_iter().map(Bytes::from)), now, &mut out);
                }
                Op::Disconnect(c) => {
                    let conn = live(c, &generation);
                    broker.disconnect(conn, &mut out);
                    finals.retain(|(client, _), _| *client != conn);
                    generation[c as usize] += 1;
                    broker.connect(live(c, &generation), "127.0.0.1");
                }
                Op::Advance(ms) => {
                    now.mono += ms;
                    now.wall += ms;
                    broker.tick(now, &mut out);
                }
                Op::Admin(c, line) => broker.admin(live(c, &generation), &line, now, &mut out),
            }
            for action in out.drain(..) {
                if let Action::Send(to, p) = action {
                    match p.ptype {
                        T::JobCreated if Some(to) == submitted_fg => {
                            finals.entry((to, p.args[0].clone())).or_insert(0);
                        }
                        T::WorkComplete | T::WorkFail | T::WorkException => {
                            let n = finals.get_mut(&(to, p.args[0].clone()));
                            prop_assert!(n.is_some(), "final packet for a job {to:?} did not submit: {p:?}");
                            *n.unwrap() += 1;
                        }
                        _ => {}
                    }
                }
            }
            if let Err(e) = broker.check_invariants() {
                prop_assert!(false, "{}", e);
            }
            for n in finals.values() {
                prop_assert!(*n <= 1, "a client got two final packets for one job");
            }
        }
        // Let every job run to its end: a fresh worker for both functions drains the queues.
        let drain = ConnId(9_999);
        broker.connect(drain, "127.0.0.1");
        for f in ["f", "g", "lockenv"] {
            broker.packet(drain, Packet::req(T::CanDo, [f]), now, &mut out);
        }
        for c in 0..4 {
            broker.disconnect(live(c, &generation), &mut out);
        }
        prop_assert_eq!(broker.check_invariants(), Ok(()));
    }
}
