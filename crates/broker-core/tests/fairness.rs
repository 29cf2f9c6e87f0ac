//! Tenant fairness of lock requests: of equal priority, waiting requests are served round-robin
//! across tenants and FIFO within one; `position` predicts the order; other functions stay FIFO.

mod sim;

use std::collections::{BTreeMap, VecDeque};

use broker_core::ConnId;
use bytes::Bytes;
use gearman_proto::PacketType as T;
use proptest::prelude::*;
use sim::{s, Sim};

const TENANTS: [&str; 4] = ["", "proj-a", "proj-b", "proj-c"];
const PRIORITIES: [T; 3] = [T::SubmitJobHigh, T::SubmitJob, T::SubmitJobLow];

fn lock_request(n: u64, tenant: &str) -> String {
    format!(
        r#"{{"callback_name":"callback_{n}","timeout":"60","job_identifier":"job-{n}","tenant":"{tenant}"}}"#
    )
}

#[derive(Debug, Clone)]
enum Op {
    Submit {
        tenant: usize,
        priority: usize,
    },
    Grab,
    /// The client of the n-th waiting request (mod their number) goes away.
    Leave(usize),
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..TENANTS.len(), 0..3usize).prop_map(|(tenant, priority)| Op::Submit { tenant, priority }),
        3 => Just(Op::Grab),
        1 => any::<usize>().prop_map(Op::Leave),
    ]
}

/// The model: waiting requests by (priority, tenant), oldest first, with their client.
#[derive(Default)]
struct Waiting {
    queues: BTreeMap<(usize, usize), VecDeque<(Bytes, u64)>>,
}

impl Waiting {
    fn tenants_waiting(&self, priority: usize) -> Vec<usize> {
        self.queues
            .iter()
            .filter(|((p, _), q)| *p == priority && !q.is_empty())
            .map(|((_, t), _)| *t)
            .collect()
    }

    fn all(&self) -> Vec<(Bytes, u64)> {
        self.queues.values().flatten().cloned().collect()
    }
}

struct Pool {
    sim: Sim,
    worker: ConnId,
    next_client: u64,
    waiting: Waiting,
}

impl Pool {
    fn new() -> Pool {
        let mut sim = Sim::new();
        let worker = sim.conn(1);
        sim.send(worker, T::CanDo, &[b"lockenv"]);
        Pool {
            sim,
            worker,
            next_client: 100,
            waiting: Waiting::default(),
        }
    }

    fn submit(&mut self, tenant: usize, priority: usize) {
        let n = self.next_client;
        self.next_client += 1;
        let client = self.sim.conn(n);
        let handle = self.sim.submit(
            client,
            PRIORITIES[priority],
            "lockenv",
            "",
            &lock_request(n, TENANTS[tenant]),
        );
        self.waiting
            .queues
            .entry((priority, tenant))
            .or_default()
            .push_back((handle, n));
    }

    /// The worker takes the next request and ends it at once: (priority, tenant) it was for.
    fn grab(&mut self) -> Option<(usize, usize)> {
        let (handle, _, _, data) = self.sim.grab(self.worker)?;
        self.sim.send(self.worker, T::WorkComplete, &[&handle, b""]);
        let (&(p, t), q) = self
            .waiting
            .queues
            .iter_mut()
            .find(|(_, q)| q.iter().any(|(h, _)| *h == handle))
            .unwrap_or_else(|| panic!("grabbed an unknown job {}", s(&handle)));
        let (oldest, _) = q.pop_front().unwrap();
        assert_eq!(
            oldest, handle,
            "FIFO within tenant {:?}: got {data}",
            TENANTS[t]
        );
        Some((p, t))
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn no_waiting_tenant_is_skipped_more_than_tenants_minus_one_times(
        ops in prop::collection::vec(arb_op(), 1..120)
    ) {
        let mut pool = Pool::new();
        // Skips in a row, by (priority, tenant), while the tenant waits.
        let mut skipped: BTreeMap<(usize, usize), usize> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Submit { tenant, priority } => pool.submit(tenant, priority),
                Op::Leave(i) => {
                    let all = pool.waiting.all();
                    if all.is_empty() {
                        continue;
                    }
                    let (handle, client) = all[i % all.len()].clone();
                    pool.sim.drop_conn(ConnId(client));
                    for q in pool.waiting.queues.values_mut() {
                        q.retain(|(h, _)| *h != handle);
                    }
                }
                Op::Grab => {
                    let before: Vec<Vec<usize>> =
                        (0..3).map(|p| pool.waiting.tenants_waiting(p)).collect();
                    let Some((p, served)) = pool.grab() else {
                        prop_assert!(pool.waiting.all().is_empty());
                        continue;
                    };
                    prop_assert!(before[..p].iter().all(Vec::is_empty), "a higher priority waits");
                    for &t in &before[p] {
                        let n = skipped.entry((p, t)).or_default();
                        if t == served {
                            *n = 0;
                        } else {
                            *n += 1;
                            prop_assert!(
                                *n < TENANTS.len(),
                                "tenant {:?} skipped {} times in a row at priority {}",
                                TENANTS[t], n, p
                            );
                        }
                    }
                }
            }
            // A tenant that stopped waiting starts afresh.
            for (key, n) in skipped.iter_mut() {
                if pool.waiting.queues.get(key).is_none_or(VecDeque::is_empty) {
                    *n = 0;
                }
            }
        }

        // `position` tells the order the rest will be served in.
        let mut predicted: Vec<(usize, Bytes)> = pool
            .waiting
            .all()
            .into_iter()
            .map(|(h, _)| {
                let (pos, total) = pool.sim.broker.queue_position(&h).unwrap();
                assert_eq!(total, pool.waiting.all().len());
                (pos, h)
            })
            .collect();
        predicted.sort();
        for (i, (pos, handle)) in predicted.iter().enumerate() {
            prop_assert_eq!(*pos, i + 1);
            let (got, ..) = pool.sim.grab(pool.worker).unwrap();
            prop_assert_eq!(&got, handle);
            pool.sim.send(pool.worker, T::WorkComplete, &[&got, b""]);
        }
    }
}

#[test]
fn a_busy_tenant_does_not_starve_another() {
    let mut pool = Pool::new();
    for _ in 0..5 {
        pool.submit(1, 1);
    }
    pool.submit(2, 1);
    pool.submit(0, 1);
    pool.sim.advance(1_500);
    pool.submit(3, 0);
    let queue = pool.sim.broker.waiting_requests(pool.sim.now);
    let seen: Vec<(&str, &str, usize, u64)> = queue
        .iter()
        .map(|w| (w.tenant.as_str(), w.priority, w.position, w.waited_ms))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("proj-c", "high", 1, 0),
            ("proj-a", "normal", 2, 1_500),
            ("proj-b", "normal", 3, 1_500),
            ("", "normal", 4, 1_500),
            ("proj-a", "normal", 5, 1_500),
            ("proj-a", "normal", 6, 1_500),
            ("proj-a", "normal", 7, 1_500),
            ("proj-a", "normal", 8, 1_500),
        ]
    );
    assert!(queue
        .iter()
        .all(|w| w.function == "lockenv" && w.job_identifier.starts_with("job-")));
    assert_eq!(pool.grab(), Some((0, 3)));
    let served: Vec<usize> = std::iter::from_fn(|| pool.grab().map(|(_, t)| t)).collect();
    assert_eq!(served, vec![1, 2, 0, 1, 1, 1, 1]);
}

#[test]
fn other_functions_stay_fifo_whatever_their_data_says() {
    let mut sim = Sim::new();
    let worker = sim.conn(1);
    sim.send(worker, T::CanDo, &[b"build"]);
    let client = sim.conn(2);
    let mut handles = Vec::new();
    for (n, tenant) in ["a", "a", "b", "a"].iter().enumerate() {
        handles.push(sim.submit(
            client,
            T::SubmitJobBg,
            "build",
            "",
            &lock_request(n as u64, tenant),
        ));
    }
    for h in &handles {
        assert_eq!(sim.grab(worker).unwrap().0, *h);
        sim.send(worker, T::WorkComplete, &[h, b""]);
    }
}
