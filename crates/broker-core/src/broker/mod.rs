//! The broker: jobs, functions, connections, and the rules that move jobs between them.
//!
//! This file holds the state and the entry points the network layer calls; the rules live in
//! the submodules, one concern each: [`dispatch`] (what each packet does), [`jobs`] (a job's
//! life from submit to end, and the one place its state changes), [`wake`] (which sleeping
//! worker is told of work), [`drain`] (graceful shutdown), [`access`] (ACLs and callback
//! protection applied to connections) and [`invariants`] (the cross-index checks).

use std::collections::BTreeSet;

use bytes::Bytes;
use gearman_proto::{Packet, PacketType};
use indexmap::IndexMap;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::function::Function;
use crate::inventory::Inventory;
use crate::security::{CallbackGuard, Security};
use crate::testenv::{EndedLease, LeaseTracker};
use crate::types::{parse_num, show, Action, ConnId, Job, JobId, JobState, Millis, Now};
use testenv_proto::resume::HOLDER_CONNECTION_LOST;
use testenv_proto::CALLBACK_PREFIX;

mod access;
mod control;
mod dispatch;
mod drain;
mod invariants;
mod jobs;
mod pool;
mod wake;

pub use control::{ControlOutcome, ControlWaiter, CONTROL_REPLY_TIMEOUT_MS};
pub use drain::RunningJobs;
pub use pool::{ControlError, ControlTarget};
pub use wake::WAKE_RETRY_MS;

/// Takes the first timer of `timers` if it is due at `now`.
fn pop_due<T: Ord + Copy>(timers: &mut BTreeSet<(Millis, T)>, now: Millis) -> Option<(Millis, T)> {
    let &(at, _) = timers.first()?;
    if at > now {
        return None;
    }
    timers.pop_first()
}

/// Static settings of the core.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Job handles are `H:<handle_host>:<n>`, as gearmand spells them.
    pub handle_host: String,
    /// Answer to the `getpid` admin command.
    pub pid: u32,
    /// Answer to the `version` admin command; testenv-agents send state reports to a broker whose
    /// version starts with `tebroker` ([`testenv_proto::agent::TEBROKER_VERSION_PREFIX`]).
    pub version: String,
    /// Most functions one connection may register (0: no limit).
    pub max_functions_per_conn: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            handle_host: "tebroker".into(),
            pid: std::process::id(),
            version: format!("tebroker {}", env!("CARGO_PKG_VERSION")),
            max_functions_per_conn: 0,
        }
    }
}

/// Counters for metrics and the benchmark; they only ever go up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub jobs_submitted: u64,
    pub jobs_completed: u64,
    pub jobs_failed: u64,
    pub jobs_requeued: u64,
    pub jobs_timed_out: u64,
    pub protocol_errors: u64,
    /// Limits hit and security refusals (see `crate::security`); the network layer counts the
    /// ones it enforces through [`Broker::stats_mut`].
    pub frames_too_large: u64,
    pub admin_lines_too_long: u64,
    pub connections_refused: u64,
    pub functions_refused: u64,
    pub queue_full: u64,
    pub slow_readers_closed: u64,
    pub partial_packet_timeouts: u64,
    pub tls_handshake_failures: u64,
    pub acl_register_denied: u64,
    pub acl_invoke_denied: u64,
    pub acl_admin_denied: u64,
    pub callback_hijacks_refused: u64,
    /// Agents' state reports taken into the inventory, and refused as malformed.
    pub agent_reports: u64,
    pub agent_reports_refused: u64,
    /// `drain|undrain|hold|release|rebuild` commands carried out.
    pub env_controls: u64,
}

#[derive(Debug)]
pub(crate) struct Conn {
    pub peer: String,
    pub client_id: Bytes,
    /// Registered functions with their CAN_DO_TIMEOUT in seconds, in registration order.
    pub abilities: IndexMap<Bytes, Option<u32>>,
    pub sleeping: bool,
    /// When (monotonic) this worker was last sent a NOOP it has not yet answered with a GRAB or
    /// PRE_SLEEP.
    pub woken_at: Option<Millis>,
    pub running: FxHashSet<JobId>,
    pub attached: FxHashSet<JobId>,
    /// Common name of the TLS client certificate, if any: the subject ACLs apply to.
    pub identity: Option<String>,
    /// When (wall clock) its TE, if it is a plain testenv-worker, entered its current state.
    pub te_since: Millis,
}

/// The whole state of the job server.
pub struct Broker {
    pub(crate) config: BrokerConfig,
    pub(crate) conns: FxHashMap<ConnId, Conn>,
    pub(crate) functions: FxHashMap<Bytes, Function>,
    pub(crate) jobs: FxHashMap<JobId, Job>,
    /// Every job by unique id, for GET_STATUS_UNIQUE (which names no function).
    by_unique: FxHashMap<Bytes, JobId>,
    next_job: JobId,
    next_seq: i64,
    next_head_seq: i64,
    /// Running jobs by monotonic CAN_DO_TIMEOUT deadline.
    timeouts: BTreeSet<(Millis, JobId)>,
    /// Scheduled jobs by wall-clock due time.
    schedule: BTreeSet<(Millis, JobId)>,
    /// Woken workers to check on (monotonic): one that does not grab in time passes its wake-up on.
    wake_checks: BTreeSet<(Millis, ConnId)>,
    /// The latest time the network layer passed in.
    pub(crate) now: Now,
    /// `H:<handle_host>:`, the start of every job handle.
    handle_prefix: String,
    pub(crate) leases: LeaseTracker,
    pub(crate) inventory: Inventory,
    /// What [`Broker::take_env_changes`] last handed out, by (TE, agent).
    pub(crate) last_envs: FxHashMap<(String, Option<String>), pool::EnvMark>,
    /// Control commands forwarded to agents whose reply someone waits for.
    controls: control::ControlRelay,
    /// Set by [`Broker::begin_shutdown`]: no new work is handed out.
    shutting_down: bool,
    pub(crate) stats: Stats,
    pub(crate) security: Security,
    pub(crate) callbacks: CallbackGuard,
}

impl Broker {
    pub fn new(config: BrokerConfig) -> Broker {
        Broker {
            handle_prefix: format!("H:{}:", config.handle_host),
            config,
            conns: FxHashMap::default(),
            functions: FxHashMap::default(),
            jobs: FxHashMap::default(),
            by_unique: FxHashMap::default(),
            next_job: 1,
            next_seq: 0,
            next_head_seq: -1,
            timeouts: BTreeSet::new(),
            schedule: BTreeSet::new(),
            wake_checks: BTreeSet::new(),
            now: Now::default(),
            leases: LeaseTracker::default(),
            inventory: Inventory::default(),
            last_envs: FxHashMap::default(),
            controls: control::ControlRelay::default(),
            shutting_down: false,
            stats: Stats::default(),
            security: Security::default(),
            callbacks: CallbackGuard::default(),
        }
    }

    /// Sets ACLs, callback hijack protection and the default queue limit.
    pub fn set_security(&mut self, security: Security) {
        self.security = security;
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// For the network layer to count the limits it enforces itself.
    pub fn stats_mut(&mut self) -> &mut Stats {
        &mut self.stats
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    pub fn function_count(&self) -> usize {
        self.functions.len()
    }

    pub fn job_count(&self) -> usize {
        self.jobs.len()
    }

    /// Ended leases, newest first (the last [`crate::HISTORY_LEN`]).
    pub fn lease_history(&self) -> Vec<EndedLease> {
        self.leases.history()
    }

    /// Ended leases not yet handed out by this call, oldest first: for a history file.
    pub fn take_new_history(&mut self) -> Vec<EndedLease> {
        self.leases.take_unflushed()
    }

    /// Lock requests that stopped waiting (granted or abandoned) since the last call, oldest
    /// first: for a store of waits. At most 10,000 are kept between calls.
    pub fn take_ended_waits(&mut self) -> Vec<crate::EndedWait> {
        self.leases.take_ended_waits()
    }

    /// A new connection from `peer` (an IP address, as shown by the `workers` command).
    pub fn connect(&mut self, conn: ConnId, peer: impl Into<String>) {
        self.connect_as(conn, peer, None);
    }

    /// A new connection whose TLS client certificate names `identity` (its common name).
    pub fn connect_as(&mut self, conn: ConnId, peer: impl Into<String>, identity: Option<String>) {
        self.conns.insert(
            conn,
            Conn {
                peer: peer.into(),
                client_id: Bytes::from_static(b"-"),
                abilities: IndexMap::new(),
                sleeping: false,
                woken_at: None,
                running: FxHashSet::default(),
                attached: FxHashSet::default(),
                identity,
                te_since: self.now.wall,
            },
        );
    }

    /// The connection is gone: fail or requeue what its worker held, detach what it submitted.
    pub fn disconnect(&mut self, conn: ConnId, out: &mut Vec<Action>) {
        self.disconnect_as(conn, false, out)
    }

    /// [`Broker::disconnect`] for a connection that failed (a read error other than a reset:
    /// timed out, or cut) rather than closed: its peer may still be alive. A testenv callback
    /// job it held then ends with WORK_EXCEPTION [`HOLDER_CONNECTION_LOST`] instead of WORK_FAIL,
    /// so a resume-capable testenv-worker keeps the TE for its holder instead of reading "the
    /// holder is dead" (docs/design/lease-resume.md).
    pub fn disconnect_lost(&mut self, conn: ConnId, out: &mut Vec<Action>) {
        self.disconnect_as(conn, true, out)
    }

    fn disconnect_as(&mut self, conn: ConnId, lost: bool, out: &mut Vec<Action>) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        self.note_gone_worker(conn, &c);
        // Detach first, so a connection that was its own client is not sent its own failure.
        for id in c.attached {
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            job.clients.retain(|&x| x != conn);
            if job.background || !job.clients.is_empty() {
                continue;
            }
            if let JobState::Queued { .. } = job.state {
                tracing::debug!(handle = %show(&job.handle), "client gone; queued job dropped");
                self.remove_job(id);
            }
        }
        for id in c.running {
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            if job.background {
                tracing::info!(handle = %show(&job.handle), "worker gone; background job requeued at head");
                self.requeue_at_head(id, out);
            } else {
                tracing::info!(handle = %show(&job.handle), "worker gone; foreground job failed");
                self.stats.jobs_failed += 1;
                self.leases.set_outcome(id, "worker lost");
                let handle = job.handle.clone();
                let packet = if lost && job.function.starts_with(CALLBACK_PREFIX.as_bytes()) {
                    Packet::res(
                        PacketType::WorkException,
                        [
                            handle.clone(),
                            Bytes::from_static(HOLDER_CONNECTION_LOST.as_bytes()),
                        ],
                    )
                } else {
                    Packet::res(PacketType::WorkFail, [handle.clone()])
                };
                for &client in &job.clients {
                    out.push(Action::Send(client, packet.clone()));
                }
                self.remove_job(id);
            }
        }
        for (function, _) in c.abilities {
            if let Some(f) = self.functions.get_mut(&function) {
                f.workers.remove(&conn);
                f.sleeping.swap_remove(&conn);
                self.callbacks
                    .release(&function, conn, f.queued() + f.scheduled() > 0);
                // This worker may have been the one woken for a queued job.
                if f.queued() > 0 {
                    self.wake_one(&function, out);
                }
                self.gc_function(&function);
            }
        }
    }

    /// The monotonic time at which [`Broker::tick`] has something to do (a CAN_DO_TIMEOUT, a
    /// wake check, a scheduled job, the end of a broker-side hold). A scheduled job is due in wall time; its monotonic
    /// estimate assumes the wall clock does not step before then, so a caller that sleeps until
    /// this deadline should also wake now and then (e.g. every second) to notice a step.
    pub fn next_deadline(&self, now: Now) -> Option<Millis> {
        let scheduled = self
            .schedule
            .first()
            .map(|&(at, _)| now.mono.saturating_add(at.saturating_sub(now.wall)));
        [
            self.timeouts.first().map(|&(t, _)| t),
            scheduled,
            self.wake_checks.first().map(|&(t, _)| t),
            self.inventory.next_hold_end(),
            self.controls.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Fires everything due at `now`: wake checks, hold ends, overdue control replies, scheduled
    /// jobs, CAN_DO_TIMEOUTs.
    pub fn tick(&mut self, now: Now, out: &mut Vec<Action>) {
        self.now = self.now.advanced_to(now);
        self.check_woken_workers(out);
        self.end_due_holds(out);
        self.expire_control_replies(out);
        self.queue_due_jobs(out);
        self.fail_overdue_jobs(out);
    }

    pub(crate) fn conn(&mut self, conn: ConnId) -> &mut Conn {
        self.conns.get_mut(&conn).expect("known connection")
    }

    pub(crate) fn job_id_of_handle(&self, handle: &[u8]) -> Option<JobId> {
        let rest = handle.strip_prefix(self.handle_prefix.as_bytes())?;
        parse_num::<JobId>(rest)
    }
}
