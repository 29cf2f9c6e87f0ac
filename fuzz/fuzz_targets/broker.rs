//! The broker core fed with packet sequences from several connections (connects, disconnects,
//! packets of every type, admin lines, clock ticks), with ACLs and callback protection on;
//! `check_invariants` after every step, plus the core invariants checked from outside:
//! every foreground job ends with exactly one final packet to each attached client. The clock
//! ticks on both time bases, with wall-clock steps of hours, and a graceful shutdown may begin.
#![no_main]

use std::collections::{HashMap, HashSet};

use broker_core::acl::Acl;
use broker_core::{Action, Broker, BrokerConfig, ConnId, Now, Security};
use bytes::Bytes;
use gearman_proto::{Magic, Packet, PacketType};
use libfuzzer_sys::fuzz_target;

const FUNCS: [&[u8]; 4] = [b"lockenv", b"callback_a", b"f", b"callback_b"];
const CONNS: u64 = 5;

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (a, rest) = self.0.split_at(n);
        self.0 = rest;
        a.to_vec()
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Some(flags) = input.byte() else { return };
    let mut broker = Broker::new(BrokerConfig {
        handle_host: "fz".into(),
        pid: 1,
        version: "fuzz".into(),
        max_functions_per_conn: 3,
    });
    let acl = (flags & 1 != 0).then(|| {
        Acl::parse("[a]\nregister = .*\ninvoke = .*\ngrant = true\n[b]\nregister = callback_\ninvoke = lockenv\n")
            .unwrap()
    });
    broker.set_security(Security {
        acl,
        callback_protection: flags & 2 != 0,
        default_max_queue: (flags & 4 != 0).then_some(3),
    });
    let mut now = Now { mono: 0, wall: 1_700_000_000_000 };
    let mut live: HashSet<u64> = HashSet::new();
    let mut generation: HashMap<u64, u64> = HashMap::new();
    let id_of = |slot: u64, generation: &HashMap<u64, u64>| {
        ConnId(slot * 1000 + generation.get(&slot).copied().unwrap_or(0))
    };
    // Final packets each (client, handle) got, to check "exactly one".
    let mut finals: HashMap<(ConnId, Bytes), u32> = HashMap::new();
    let mut out = Vec::new();
    let mut steps = 0;
    while let Some(op) = input.byte() {
        steps += 1;
        if steps > 400 {
            break;
        }
        let slot = u64::from(op >> 5) % CONNS;
        let conn = id_of(slot, &generation);
        if !live.contains(&slot) {
            let identity = match op & 3 {
                0 => None,
                1 => Some("a".to_string()),
                _ => Some("b".to_string()),
            };
            broker.connect_as(conn, format!("10.0.0.{}", slot % 2), identity);
            live.insert(slot);
            continue;
        }
        match op & 0x1f {
            0 => {
                broker.disconnect(conn, &mut out);
                live.remove(&slot);
                *generation.entry(slot).or_default() += 1;
            }
            1 => {
                // Monotonic time moves on; the wall clock sometimes steps by hours either way.
                let b = input.byte().unwrap_or(0);
                now.mono += u64::from(b) * 250;
                now.wall = match b % 16 {
                    0 => now.wall.saturating_sub(3_600_000 * u64::from(b / 16)),
                    1 => now.wall.saturating_add(3_600_000 * u64::from(b / 16)),
                    _ => now.wall.saturating_add(u64::from(b) * 250),
                };
                broker.tick(now, &mut out);
            }
            2 => {
                let n = input.byte().unwrap_or(0) as usize % 24;
                let line = String::from_utf8_lossy(&input.bytes(n)).into_owned();
                let cmds = [
                    "status", "workers", "show jobs", "show unique jobs", "leases", "stats",
                    "prioritystatus", "acl list", "maxqueue f 1", "cancel job H:fz:1",
                    "acl grant invoke b .*", "acl self-revoke all", "shutdown graceful",
                ];
                let pick = cmds[line.len() % cmds.len()];
                let line = if n % 2 == 0 { pick.to_string() } else { line };
                // A graceful shutdown drains (the broker goes on); random `shutdown` lines would
                // only add the server's part.
                if !line.starts_with("shutdown") || line == "shutdown graceful" {
                    broker.admin(conn, &line, now, &mut out);
                }
            }
            _ => {
                let code = u32::from(input.byte().unwrap_or(0)) % 43;
                let Some(ptype) = PacketType::from_code(code) else { continue };
                let mut args: Vec<Bytes> = Vec::new();
                for i in 0..ptype.arg_count() {
                    let sel = input.byte().unwrap_or(0);
                    let arg: Vec<u8> = match (i, sel % 4) {
                        (0, 0..=2) => FUNCS[sel as usize % FUNCS.len()].to_vec(),
                        (_, 0) => format!("H:fz:{}", sel / 4 % 8).into_bytes(),
                        // Time fields at their limits (CAN_DO_TIMEOUT, SUBMIT_JOB_EPOCH).
                        (_, 1) if sel >= 0xc0 => ["4294967295", "18446744073709551615", "99999999999"]
                            [sel as usize % 3]
                            .into(),
                        (_, 1) => (sel / 4 % 5).to_string().into_bytes(),
                        (_, 2) => Vec::new(),
                        _ => {
                            let n = sel as usize / 32;
                            input.bytes(n)
                        }
                    };
                    args.push(Bytes::from(arg));
                }
                let magic = if op & 0x80 != 0 && code % 7 == 0 { Magic::Res } else { Magic::Req };
                broker.packet(conn, Packet { magic, ptype, args }, now, &mut out);
            }
        }
        for a in out.drain(..) {
            if let Action::Send(to, p) = a {
                if matches!(
                    p.ptype,
                    PacketType::WorkComplete | PacketType::WorkFail | PacketType::WorkException
                ) {
                    *finals.entry((to, p.args[0].clone())).or_default() += 1;
                }
            }
        }
        if let Err(e) = broker.check_invariants() {
            panic!("invariant broken after step {steps}: {e}");
        }
    }
    for ((client, handle), n) in finals {
        assert!(n <= 1, "{client} got {n} final packets for {handle:?}");
    }
});
