//! A socket-free driver of the broker core shared by the rule and security tests: packets in,
//! the actions for one connection out, invariants checked after every step.
#![allow(dead_code)]

use broker_core::{Action, Broker, BrokerConfig, ConnId, Now, Security};
use bytes::Bytes;
use gearman_proto::{Packet, PacketType as T};

pub struct Sim {
    pub broker: Broker,
    pub now: Now,
    pub out: Vec<Action>,
}

impl Sim {
    pub fn new() -> Sim {
        Sim {
            broker: Broker::new(BrokerConfig {
                handle_host: "t".into(),
                pid: 42,
                version: "test".into(),
                max_functions_per_conn: 0,
            }),
            now: Now {
                mono: 5_000,
                wall: 1_700_000_000_000,
            },
            out: Vec::new(),
        }
    }

    /// A simulator whose broker enforces `security`.
    pub fn with_security(security: Security) -> Sim {
        let mut sim = Sim::new();
        sim.broker.set_security(security);
        sim
    }

    /// A connection whose TLS certificate names `cn`.
    pub fn conn_as(&mut self, id: u64, peer: &str, cn: Option<&str>) -> ConnId {
        self.broker
            .connect_as(ConnId(id), peer, cn.map(str::to_string));
        ConnId(id)
    }

    /// Packets sent to `c` since the last call, as (type, args).
    pub fn take_pairs(&mut self, c: ConnId) -> Vec<(T, Vec<Bytes>)> {
        self.take(c)
            .into_iter()
            .map(|p| (p.ptype, p.args))
            .collect()
    }

    pub fn conn(&mut self, id: u64) -> ConnId {
        self.broker.connect(ConnId(id), "127.0.0.1");
        ConnId(id)
    }

    pub fn send(&mut self, c: ConnId, t: T, args: &[&[u8]]) {
        let p = Packet::req(t, args.iter().map(|a| Bytes::copy_from_slice(a)));
        self.broker.packet(c, p, self.now, &mut self.out);
        self.broker.check_invariants().unwrap();
    }

    pub fn admin(&mut self, c: ConnId, line: &str) -> String {
        self.broker.admin(c, line, self.now, &mut self.out);
        self.texts(c)
    }

    /// The admin answers sent to `c` since the last call, removed from the outbox.
    pub fn texts(&mut self, c: ConnId) -> String {
        let mut text = String::new();
        self.out.retain(|a| match a {
            Action::Text(to, t) if *to == c => {
                text.push_str(t);
                false
            }
            _ => true,
        });
        text
    }

    pub fn drop_conn(&mut self, c: ConnId) {
        self.broker.disconnect(c, &mut self.out);
        self.broker.check_invariants().unwrap();
    }

    /// Both clocks move on by `ms`, then the broker's timers run.
    pub fn advance(&mut self, ms: u64) {
        self.now.mono += ms;
        self.now.wall += ms;
        self.broker.tick(self.now, &mut self.out);
        self.broker.check_invariants().unwrap();
    }

    /// The wall clock steps by `ms` (an NTP correction) while no monotonic time passes.
    pub fn step_wall(&mut self, ms: i64) {
        self.now.wall = self.now.wall.saturating_add_signed(ms);
        self.broker.tick(self.now, &mut self.out);
        self.broker.check_invariants().unwrap();
    }

    /// Packets sent to `c` since the last call, removed from the outbox.
    pub fn take(&mut self, c: ConnId) -> Vec<Packet> {
        let mut mine = Vec::new();
        self.out.retain(|a| match a {
            Action::Send(to, p) if *to == c => {
                mine.push(p.clone());
                false
            }
            _ => true,
        });
        mine
    }

    pub fn types(&mut self, c: ConnId) -> Vec<T> {
        self.take(c).into_iter().map(|p| p.ptype).collect()
    }

    pub fn submit(&mut self, c: ConnId, t: T, f: &str, unique: &str, data: &str) -> Bytes {
        self.send(c, t, &[f.as_bytes(), unique.as_bytes(), data.as_bytes()]);
        let created = self.take(c);
        let p = created.last().expect("a reply");
        assert_eq!(p.ptype, T::JobCreated, "{p:?}");
        p.args[0].clone()
    }

    /// Two workers of `f` asleep (connections 2 and 3), then a job for `f` from `client`: returns
    /// (the worker it woke, the other), checking that exactly one was sent NOOP.
    pub fn two_sleepers_and_a_job(&mut self, client: ConnId, f: &str) -> (ConnId, ConnId) {
        let (w1, w2) = (self.conn(2), self.conn(3));
        for w in [w1, w2] {
            self.send(w, T::CanDo, &[f.as_bytes()]);
            self.send(w, T::PreSleep, &[]);
        }
        self.submit(client, T::SubmitJob, f, "", "x");
        let woken = if self.types(w1) == vec![T::Noop] {
            w1
        } else {
            w2
        };
        let other = if woken == w1 { w2 } else { w1 };
        assert!(self.take(other).is_empty());
        (woken, other)
    }

    /// Worker grabs; returns (handle, function, unique, data) or None on NO_JOB.
    pub fn grab(&mut self, w: ConnId) -> Option<(Bytes, String, String, String)> {
        self.send(w, T::GrabJobUniq, &[]);
        let p = self.take(w).into_iter().last().unwrap();
        match p.ptype {
            T::NoJob => None,
            T::JobAssignUniq => Some((
                p.args[0].clone(),
                s(&p.args[1]),
                s(&p.args[2]),
                s(&p.args[3]),
            )),
            other => panic!("unexpected {other}"),
        }
    }
}

pub fn s(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
