//! Jobs, functions, connections, and the rules that move jobs between them.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use gearman_proto::{Magic, Packet, PacketType};
use indexmap::{IndexMap, IndexSet};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::security::{CallbackGuard, Security};
use crate::testenv::{EndedLease, Lease, LeaseTracker};
pub use crate::types::{Millis, Now};

/// How long a woken worker may stay silent before another sleeping worker is woken instead.
pub const WAKE_RETRY_MS: Millis = 200;

/// A connection, numbered by the network layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

pub(crate) type JobId = u64;

/// Something the network layer must do on the broker's behalf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send(ConnId, Packet),
    Text(ConnId, String),
    /// Close the connection once what was queued for it has been written.
    Close(ConnId),
    Shutdown {
        graceful: bool,
    },
}

/// Static settings of the core.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Job handles are `H:<handle_host>:<n>`, as gearmand spells them.
    pub handle_host: String,
    /// Answer to the `getpid` admin command.
    pub pid: u32,
    /// Answer to the `version` admin command.
    pub version: String,
    /// Most functions one connection may register (0: no limit).
    pub max_functions_per_conn: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            handle_host: "tebroker".into(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            max_functions_per_conn: 0,
        }
    }
}

/// Jobs running on a worker now, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunningJobs {
    pub foreground: usize,
    pub background: usize,
}

impl RunningJobs {
    pub fn total(&self) -> usize {
        self.foreground + self.background
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Priority {
    High = 0,
    Normal = 1,
    Low = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobState {
    Queued {
        seq: i64,
    },
    /// Due at this wall-clock time.
    Scheduled {
        at: Millis,
    },
    Running {
        worker: ConnId,
        /// Monotonic time the worker's CAN_DO_TIMEOUT ends.
        deadline: Option<Millis>,
    },
}

#[derive(Debug)]
pub(crate) struct Job {
    pub handle: Bytes,
    pub function: Bytes,
    pub unique: Bytes,
    pub data: Bytes,
    pub priority: Priority,
    pub background: bool,
    /// Foreground clients attached to this job; each gets every result packet.
    pub clients: Vec<ConnId>,
    pub state: JobState,
    pub numerator: Bytes,
    pub denominator: Bytes,
    pub retries: u32,
}

#[derive(Debug, Default)]
pub(crate) struct Function {
    /// Queued jobs by priority, each ordered by sequence number (FIFO; requeues jump the line).
    pub queues: [BTreeMap<i64, JobId>; 3],
    pub running: usize,
    pub scheduled: usize,
    pub workers: FxHashSet<ConnId>,
    pub sleeping: IndexSet<ConnId>,
    pub unique: FxHashMap<Bytes, JobId>,
    pub max_queue: Option<[i64; 3]>,
}

impl Function {
    pub fn queued(&self) -> usize {
        self.queues.iter().map(BTreeMap::len).sum()
    }

    fn is_unused(&self) -> bool {
        self.workers.is_empty()
            && self.running == 0
            && self.scheduled == 0
            && self.max_queue.is_none()
            && self.queues.iter().all(BTreeMap::is_empty)
    }

    /// The job a worker should get next from this function: (priority, seq, id).
    fn head(&self) -> Option<(usize, i64, JobId)> {
        self.queues
            .iter()
            .enumerate()
            .find_map(|(p, q)| q.first_key_value().map(|(&seq, &id)| (p, seq, id)))
    }
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
    pub exceptions: bool,
    /// Common name of the TLS client certificate, if any: the subject ACLs apply to.
    pub identity: Option<String>,
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
    now: Now,
    /// `H:<handle_host>:`, the start of every job handle.
    handle_prefix: String,
    pub(crate) leases: LeaseTracker,
    /// Set by [`Broker::begin_shutdown`]: no new work is handed out.
    shutting_down: bool,
    pub(crate) stats: Stats,
    pub(crate) security: Security,
    pub(crate) callbacks: CallbackGuard,
}

enum Submit {
    Foreground(Priority),
    Background(Priority),
    At(Millis),
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

    /// The testenv leases currently held, oldest first.
    pub fn leases(&self, now: Now) -> Vec<Lease> {
        self.leases.list(self, now)
    }

    /// Ended leases, newest first (the last [`crate::HISTORY_LEN`]).
    pub fn lease_history(&self) -> Vec<EndedLease> {
        self.leases.history()
    }

    /// Ended leases not yet handed out by this call, oldest first: for a history file.
    pub fn take_new_history(&mut self) -> Vec<EndedLease> {
        self.leases.take_unflushed()
    }

    /// Starts a graceful shutdown (drain): from now on no new work is handed out, and running
    /// jobs go on and end as usual. Submits are refused with an ERROR `SHUTTING_DOWN` packet and
    /// GRAB_JOB* gets NO_JOB, except for the callback function of a TE lease still held (the
    /// testenv-worker's job with the TE data), so a lease in progress can finish. Queued jobs stay
    /// queued (visible in `status`) and are not failed; their clients learn of the end when the
    /// server closes their connections. Wait with [`Broker::running_jobs`]. Idempotent.
    pub fn begin_shutdown(&mut self) {
        if !self.shutting_down {
            tracing::info!(
                running = self.running_jobs().total(),
                "shutting down: no new work is handed out; running jobs go on"
            );
        }
        self.shutting_down = true;
    }

    /// Whether [`Broker::begin_shutdown`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// Jobs a worker is running now: what a graceful shutdown waits for.
    pub fn running_jobs(&self) -> RunningJobs {
        let mut running = RunningJobs::default();
        for id in self.conns.values().flat_map(|c| &c.running) {
            match self.jobs.get(id) {
                Some(job) if job.background => running.background += 1,
                Some(_) => running.foreground += 1,
                None => {}
            }
        }
        running
    }

    /// Whether queued jobs of `function` may be handed out now (see [`Broker::begin_shutdown`]).
    fn may_hand_out(&self, function: &[u8]) -> bool {
        !self.shutting_down || self.leases.is_active_callback(function)
    }

    /// Whether a worker of `function` has a job to grab.
    fn has_work_for(&self, function: &[u8]) -> bool {
        self.functions.get(function).is_some_and(|f| f.queued() > 0) && self.may_hand_out(function)
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
                exceptions: false,
                identity,
            },
        );
    }

    /// The connection is gone: fail or requeue what its worker held, detach what it submitted.
    pub fn disconnect(&mut self, conn: ConnId, out: &mut Vec<Action>) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
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
                for &client in &job.clients {
                    out.push(Action::Send(
                        client,
                        Packet::res(PacketType::WorkFail, [handle.clone()]),
                    ));
                }
                self.remove_job(id);
            }
        }
        for (function, _) in c.abilities {
            if let Some(f) = self.functions.get_mut(&function) {
                f.workers.remove(&conn);
                f.sleeping.swap_remove(&conn);
                self.callbacks
                    .release(&function, conn, f.queued() + f.scheduled > 0);
                // This worker may have been the one woken for a queued job.
                if f.queued() > 0 {
                    self.wake_one(&function, out);
                }
                self.gc_function(&function);
            }
        }
    }

    /// A frame that could not be understood; the stream is still in sync.
    pub fn malformed(&mut self, conn: ConnId, reason: &str, out: &mut Vec<Action>) {
        self.stats.protocol_errors += 1;
        tracing::debug!(%conn, reason, "malformed packet");
        out.push(Action::Send(conn, Packet::error("INVALID_PACKET", reason)));
    }

    /// One binary packet from `conn`.
    pub fn packet(&mut self, conn: ConnId, p: Packet, now: Now, out: &mut Vec<Action>) {
        self.now = self.now.advanced_to(now);
        if !self.conns.contains_key(&conn) {
            return;
        }
        if p.magic != Magic::Req {
            self.stats.protocol_errors += 1;
            out.push(Action::Send(
                conn,
                Packet::error("INVALID_MAGIC", "Request magic expected"),
            ));
            return;
        }
        use PacketType as T;
        match p.ptype {
            T::SubmitJob => self.submit(conn, p, Submit::Foreground(Priority::Normal), out),
            T::SubmitJobHigh => self.submit(conn, p, Submit::Foreground(Priority::High), out),
            T::SubmitJobLow => self.submit(conn, p, Submit::Foreground(Priority::Low), out),
            T::SubmitJobBg => self.submit(conn, p, Submit::Background(Priority::Normal), out),
            T::SubmitJobHighBg => self.submit(conn, p, Submit::Background(Priority::High), out),
            T::SubmitJobLowBg => self.submit(conn, p, Submit::Background(Priority::Low), out),
            T::SubmitJobEpoch => match parse_num::<u64>(p.arg(2)) {
                Some(epoch) => {
                    let at = epoch.saturating_mul(1000);
                    self.submit(conn, p, Submit::At(at.max(self.now.wall)), out)
                }
                None => self.reply_error(conn, "INVALID_ARGUMENTS", "bad epoch time", out),
            },
            T::SubmitJobSched => {
                let fields: Vec<&[u8]> = (2..7).map(|i| p.arg(i)).collect();
                match crate::schedule::parse_cron_fields(&fields)
                    .and_then(|f| crate::schedule::next_cron_match(&f, self.now.wall))
                {
                    Some(at) => self.submit(conn, p, Submit::At(at), out),
                    None => self.reply_error(
                        conn,
                        "INVALID_ARGUMENTS",
                        "bad schedule: minute hour day-of-month month day-of-week",
                        out,
                    ),
                }
            }
            T::SubmitReduceJob | T::SubmitReduceJobBackground => self.reply_error(
                conn,
                "NOT_SUPPORTED",
                "map/reduce jobs are not supported by tebroker",
                out,
            ),
            T::GetStatus => self.get_status(conn, p.args[0].clone(), out),
            T::GetStatusUnique => self.get_status_unique(conn, p.args[0].clone(), out),
            T::EchoReq => out.push(Action::Send(
                conn,
                Packet::res(PacketType::EchoRes, [p.args[0].clone()]),
            )),
            T::OptionReq => {
                if p.arg(0) == b"exceptions" {
                    self.conn(conn).exceptions = true;
                    out.push(Action::Send(
                        conn,
                        Packet::res(PacketType::OptionRes, [p.args[0].clone()]),
                    ));
                } else {
                    self.reply_error(
                        conn,
                        "UNKNOWN_OPTION",
                        "Server does not recognize given option",
                        out,
                    );
                }
            }
            T::SetClientId => self.conn(conn).client_id = p.args[0].clone(),
            T::CanDo => self.can_do(conn, p.args[0].clone(), None, out),
            T::CanDoTimeout => match parse_num::<u32>(p.arg(1)) {
                Some(t) => self.can_do(conn, p.args[0].clone(), (t > 0).then_some(t), out),
                None => self.reply_error(conn, "INVALID_ARGUMENTS", "bad timeout", out),
            },
            T::CantDo => self.cant_do(conn, p.arg(0)),
            T::ResetAbilities => {
                let names: Vec<Bytes> = self.conn(conn).abilities.keys().cloned().collect();
                for name in names {
                    self.cant_do(conn, &name);
                }
            }
            T::PreSleep => self.pre_sleep(conn, out),
            T::GrabJob => self.grab(conn, PacketType::JobAssign, out),
            T::GrabJobUniq => self.grab(conn, PacketType::JobAssignUniq, out),
            T::GrabJobAll => self.grab(conn, PacketType::JobAssignAll, out),
            T::WorkData | T::WorkWarning | T::WorkStatus => self.work_update(conn, p, out),
            T::WorkComplete | T::WorkFail | T::WorkException => self.work_end(conn, p, out),
            T::AllYours => {}
            T::Noop
            | T::JobCreated
            | T::NoJob
            | T::JobAssign
            | T::JobAssignUniq
            | T::JobAssignAll
            | T::EchoRes
            | T::Error
            | T::StatusRes
            | T::StatusResUnique
            | T::OptionRes => {
                self.reply_error(conn, "INVALID_COMMAND", "Command not expected", out)
            }
        }
    }

    /// The monotonic time at which [`Broker::tick`] has something to do (a CAN_DO_TIMEOUT, a
    /// wake check, a scheduled job). A scheduled job is due in wall time; its monotonic
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
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Fires everything due at or before `now`.
    pub fn tick(&mut self, now: Now, out: &mut Vec<Action>) {
        self.now = self.now.advanced_to(now);
        let now = self.now;
        while let Some(&(at, worker)) = self.wake_checks.first() {
            if at > now.mono {
                break;
            }
            self.wake_checks.pop_first();
            let Some(c) = self.conns.get_mut(&worker) else {
                continue;
            };
            if c.woken_at.map(wake_check_time) != Some(at) {
                continue;
            }
            // Woken but silent (a worker may ignore NOOP while it wants no work): let another
            // sleeping worker take what it was woken for.
            c.woken_at = None;
            self.wake_for_waiting_work(worker, out);
        }
        while let Some(&(at, id)) = self.schedule.first() {
            if at > now.wall {
                break;
            }
            self.schedule.pop_first();
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            let seq = self.next_seq;
            self.next_seq += 1;
            job.state = JobState::Queued { seq };
            let f = self
                .functions
                .get_mut(&job.function)
                .expect("function of job");
            f.scheduled -= 1;
            f.queues[job.priority as usize].insert(seq, id);
            let function = job.function.clone();
            self.wake_one(&function, out);
        }
        while let Some(&(at, id)) = self.timeouts.first() {
            if at > now.mono {
                break;
            }
            self.timeouts.pop_first();
            let Some(job) = self.jobs.get(&id) else {
                continue;
            };
            tracing::warn!(handle = %show(&job.handle), "job exceeded its worker's CAN_DO_TIMEOUT; failed");
            self.leases.set_outcome(id, "timed out");
            self.stats.jobs_timed_out += 1;
            self.stats.jobs_failed += 1;
            for &client in &job.clients {
                out.push(Action::Send(
                    client,
                    Packet::res(PacketType::WorkFail, [job.handle.clone()]),
                ));
            }
            self.remove_job(id);
        }
    }

    pub(crate) fn conn(&mut self, conn: ConnId) -> &mut Conn {
        self.conns.get_mut(&conn).expect("known connection")
    }

    fn reply_error(&mut self, conn: ConnId, code: &str, text: &str, out: &mut Vec<Action>) {
        self.stats.protocol_errors += 1;
        out.push(Action::Send(conn, Packet::error(code, text)));
    }

    fn submit(&mut self, conn: ConnId, p: Packet, how: Submit, out: &mut Vec<Action>) {
        let mut args = p.args.into_iter();
        let function = args.next().unwrap_or_default();
        let mut unique = args.next().unwrap_or_default();
        let data = args.last().unwrap_or_default();
        if function.is_empty() {
            return self.reply_error(conn, "INVALID_ARGUMENTS", "empty function name", out);
        }
        if !self.may_invoke(conn, &function) {
            return self.reply_error(conn, "PERMISSION_DENIED", "Permission denied by ACL", out);
        }
        if !self.may_hand_out(&function) {
            tracing::debug!(%conn, function = %show(&function), "submit refused: shutting down");
            return self.reply_error(conn, "SHUTTING_DOWN", "server shutting down", out);
        }
        if &unique[..] == b"-" {
            // libgearman's convention: "-" means "the data is the unique key".
            unique = data.clone();
        }
        let (priority, background, at) = match how {
            Submit::Foreground(p) => (p, false, None),
            Submit::Background(p) => (p, true, None),
            Submit::At(at) => (Priority::Normal, true, Some(at)),
        };

        if !unique.is_empty() {
            let existing = self
                .functions
                .get(&function)
                .and_then(|f| f.unique.get(&unique))
                .copied();
            if let Some(id) = existing {
                let job = self.jobs.get_mut(&id).expect("indexed job");
                if !background && !job.clients.contains(&conn) {
                    job.clients.push(conn);
                    self.conn(conn).attached.insert(id);
                }
                let handle = self.jobs[&id].handle.clone();
                out.push(Action::Send(
                    conn,
                    Packet::res(PacketType::JobCreated, [handle]),
                ));
                return;
            }
        }

        let f = self.functions.entry(function.clone()).or_default();
        let default_limit = self.security.default_max_queue.map(|n| [n; 3]);
        if let Some(limits) = f.max_queue.or(default_limit) {
            let limit = limits[priority as usize];
            if limit > 0 && f.queues[priority as usize].len() as i64 >= limit {
                self.stats.queue_full += 1;
                tracing::info!(function = %show(&function), limit, "queue full; job refused");
                return self.reply_error(conn, "QUEUE_ERROR", "Job queue is full", out);
            }
        }

        let id = self.next_job;
        self.next_job += 1;
        let handle = Bytes::from(format!("{}{id}", self.handle_prefix));
        let state = match at {
            Some(at) => {
                f.scheduled += 1;
                self.schedule.insert((at, id));
                JobState::Scheduled { at }
            }
            None => {
                let seq = self.next_seq;
                self.next_seq += 1;
                f.queues[priority as usize].insert(seq, id);
                JobState::Queued { seq }
            }
        };
        if !unique.is_empty() {
            f.unique.insert(unique.clone(), id);
            self.by_unique.insert(unique.clone(), id);
        }
        self.jobs.insert(
            id,
            Job {
                handle: handle.clone(),
                function: function.clone(),
                unique,
                data,
                priority,
                background,
                clients: if background { Vec::new() } else { vec![conn] },
                state,
                numerator: Bytes::new(),
                denominator: Bytes::new(),
                retries: 0,
            },
        );
        if !background {
            self.conn(conn).attached.insert(id);
        }
        self.stats.jobs_submitted += 1;
        out.push(Action::Send(
            conn,
            Packet::res(PacketType::JobCreated, [handle]),
        ));
        if at.is_none() {
            self.wake_one(&function, out);
        }
    }

    /// Sends NOOP to one sleeping worker of `function`, if there is one.
    fn wake_one(&mut self, function: &[u8], out: &mut Vec<Action>) {
        if !self.may_hand_out(function) {
            return;
        }
        let Some(f) = self.functions.get_mut(function) else {
            return;
        };
        let Some(worker) = f.sleeping.pop() else {
            return;
        };
        self.set_awake(worker);
        self.send_noop(worker, out);
    }

    /// Sends NOOP and remembers to check that the worker acts on it.
    fn send_noop(&mut self, worker: ConnId, out: &mut Vec<Action>) {
        if let Some(c) = self.conns.get_mut(&worker) {
            c.woken_at = Some(self.now.mono);
            self.wake_checks
                .insert((wake_check_time(self.now.mono), worker));
        }
        out.push(Action::Send(
            worker,
            Packet::res(PacketType::Noop, Vec::<Bytes>::new()),
        ));
    }

    fn set_awake(&mut self, worker: ConnId) {
        let Some(c) = self.conns.get_mut(&worker) else {
            return;
        };
        if !c.sleeping {
            return;
        }
        c.sleeping = false;
        for name in c.abilities.keys() {
            if let Some(f) = self.functions.get_mut(name) {
                f.sleeping.swap_remove(&worker);
            }
        }
    }

    fn can_do(
        &mut self,
        conn: ConnId,
        function: Bytes,
        timeout: Option<u32>,
        out: &mut Vec<Action>,
    ) {
        if function.is_empty() {
            return self.reply_error(conn, "INVALID_ARGUMENTS", "empty function name", out);
        }
        if !self.may_register(conn, &function) {
            return;
        }
        let limit = self.config.max_functions_per_conn;
        let c = self.conn(conn);
        if limit > 0 && c.abilities.len() >= limit && !c.abilities.contains_key(&function) {
            self.stats.functions_refused += 1;
            tracing::warn!(%conn, limit, "too many functions registered; CAN_DO refused");
            return self.reply_error(
                conn,
                "TOO_MANY_FUNCTIONS",
                "limit of functions per connection reached",
                out,
            );
        }
        if !self.claim_callback(conn, &function, out) {
            return;
        }
        let c = self.conn(conn);
        c.abilities.insert(function.clone(), timeout);
        let sleeping = c.sleeping;
        self.functions
            .entry(function.clone())
            .or_default()
            .workers
            .insert(conn);
        if sleeping {
            if self.has_work_for(&function) {
                self.set_awake(conn);
                self.send_noop(conn, out);
            } else if let Some(f) = self.functions.get_mut(&function) {
                f.sleeping.insert(conn);
            }
        }
    }

    fn cant_do(&mut self, conn: ConnId, function: &[u8]) {
        if self.conn(conn).abilities.shift_remove(function).is_none() {
            return;
        }
        if let Some(f) = self.functions.get_mut(function) {
            f.workers.remove(&conn);
            f.sleeping.swap_remove(&conn);
            self.callbacks
                .release(function, conn, f.queued() + f.scheduled > 0);
            self.gc_function(function);
        }
    }

    fn pre_sleep(&mut self, conn: ConnId, out: &mut Vec<Action>) {
        self.conn(conn).woken_at = None;
        let c = self.conns.get(&conn).expect("known connection");
        let work_waiting = c.abilities.keys().any(|name| self.has_work_for(name));
        if work_waiting {
            self.send_noop(conn, out);
            return;
        }
        let names: Vec<Bytes> = c.abilities.keys().cloned().collect();
        for name in names {
            if let Some(f) = self.functions.get_mut(&name) {
                f.sleeping.insert(conn);
            }
        }
        self.conn(conn).sleeping = true;
    }

    fn grab(&mut self, conn: ConnId, reply: PacketType, out: &mut Vec<Action>) {
        self.set_awake(conn);
        self.conn(conn).woken_at = None;
        let c = self.conns.get(&conn).expect("known connection");
        let mut best: Option<(usize, i64, JobId, Option<u32>)> = None;
        for (name, timeout) in &c.abilities {
            if !self.may_hand_out(name) {
                continue;
            }
            let Some((p, seq, id)) = self.functions.get(name).and_then(Function::head) else {
                continue;
            };
            if best.is_none_or(|(bp, bs, _, _)| (p, seq) < (bp, bs)) {
                best = Some((p, seq, id, *timeout));
            }
        }
        let Some((p, seq, id, timeout)) = best else {
            out.push(Action::Send(
                conn,
                Packet::res(PacketType::NoJob, Vec::<Bytes>::new()),
            ));
            return;
        };
        let deadline = timeout.map(|secs| {
            self.now
                .mono
                .saturating_add(u64::from(secs).saturating_mul(1000))
        });
        let job = self.jobs.get_mut(&id).expect("queued job");
        job.state = JobState::Running {
            worker: conn,
            deadline,
        };
        let f = self
            .functions
            .get_mut(&job.function)
            .expect("function of job");
        f.queues[p].remove(&seq);
        f.running += 1;
        if let Some(d) = deadline {
            self.timeouts.insert((d, id));
        }
        self.conn(conn).running.insert(id);
        let job = &self.jobs[&id];
        let packet = match reply {
            PacketType::JobAssign => Packet::res(
                reply,
                [job.handle.clone(), job.function.clone(), job.data.clone()],
            ),
            PacketType::JobAssignUniq => Packet::res(
                reply,
                [
                    job.handle.clone(),
                    job.function.clone(),
                    job.unique.clone(),
                    job.data.clone(),
                ],
            ),
            _ => Packet::res(
                reply,
                [
                    job.handle.clone(),
                    job.function.clone(),
                    job.unique.clone(),
                    Bytes::new(),
                    job.data.clone(),
                ],
            ),
        };
        let worker_id = show(&self.conns[&conn].client_id);
        self.leases.job_started(id, job, conn, worker_id, self.now);
        out.push(Action::Send(conn, packet));
        // The wake-up that brought this worker may have been meant for a job of another of its
        // functions; make sure every function it serves that still has work has a worker awake.
        self.wake_for_waiting_work(conn, out);
    }

    /// Wakes one sleeping worker for each function of `conn` that has queued jobs. Collects
    /// only those functions, so the usual case (no work waiting) allocates nothing.
    fn wake_for_waiting_work(&mut self, conn: ConnId, out: &mut Vec<Action>) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let waiting: Vec<Bytes> = c
            .abilities
            .keys()
            .filter(|name| self.has_work_for(name))
            .cloned()
            .collect();
        for name in waiting {
            self.wake_one(&name, out);
        }
    }

    /// Looks up a job by handle, checking it runs on `worker`.
    fn running_job_of(&self, worker: ConnId, handle: &[u8]) -> Option<JobId> {
        let id = self.job_id_of_handle(handle)?;
        match self.jobs.get(&id)?.state {
            JobState::Running { worker: w, .. } if w == worker => Some(id),
            _ => None,
        }
    }

    pub(crate) fn job_id_of_handle(&self, handle: &[u8]) -> Option<JobId> {
        let rest = handle.strip_prefix(self.handle_prefix.as_bytes())?;
        parse_num::<JobId>(rest)
    }

    fn work_update(&mut self, conn: ConnId, p: Packet, out: &mut Vec<Action>) {
        let Some(id) = self.running_job_of(conn, p.arg(0)) else {
            tracing::debug!(%conn, packet = %p.ptype, "update for a job this worker does not hold; ignored");
            return;
        };
        let job = self.jobs.get_mut(&id).expect("job");
        if p.ptype == PacketType::WorkStatus {
            job.numerator = p.args[1].clone();
            job.denominator = p.args[2].clone();
        }
        for &client in &job.clients {
            out.push(Action::Send(
                client,
                Packet {
                    magic: Magic::Res,
                    ptype: p.ptype,
                    args: p.args.clone(),
                },
            ));
        }
    }

    fn work_end(&mut self, conn: ConnId, p: Packet, out: &mut Vec<Action>) {
        let Some(id) = self.running_job_of(conn, p.arg(0)) else {
            tracing::debug!(%conn, packet = %p.ptype, "result for a job this worker does not hold; ignored");
            return;
        };
        let job = &self.jobs[&id];
        match p.ptype {
            PacketType::WorkComplete => {
                self.stats.jobs_completed += 1;
                self.leases.set_outcome(id, "released");
            }
            _ => {
                self.stats.jobs_failed += 1;
                self.leases.set_outcome(id, "failed");
            }
        }
        for &client in &job.clients {
            let exceptions = self.conns.get(&client).is_some_and(|c| c.exceptions);
            let packet = if p.ptype == PacketType::WorkException && !exceptions {
                // A client that did not ask for exceptions still learns that its job ended.
                Packet::res(PacketType::WorkFail, [p.args[0].clone()])
            } else {
                Packet {
                    magic: Magic::Res,
                    ptype: p.ptype,
                    args: p.args.clone(),
                }
            };
            out.push(Action::Send(client, packet));
        }
        self.remove_job(id);
    }

    fn get_status(&mut self, conn: ConnId, handle: Bytes, out: &mut Vec<Action>) {
        let job = self
            .job_id_of_handle(&handle)
            .and_then(|id| self.jobs.get(&id));
        let args = match job {
            Some(job) => [
                handle,
                Bytes::from_static(b"1"),
                running_flag(job),
                or_zero(&job.numerator),
                or_zero(&job.denominator),
            ],
            None => [
                handle,
                Bytes::from_static(b"0"),
                Bytes::from_static(b"0"),
                Bytes::from_static(b"0"),
                Bytes::from_static(b"0"),
            ],
        };
        out.push(Action::Send(conn, Packet::res(PacketType::StatusRes, args)));
    }

    fn get_status_unique(&mut self, conn: ConnId, unique: Bytes, out: &mut Vec<Action>) {
        let job = self.by_unique.get(&unique).and_then(|id| self.jobs.get(id));
        let args = match job {
            Some(job) => [
                unique,
                Bytes::from_static(b"1"),
                running_flag(job),
                or_zero(&job.numerator),
                or_zero(&job.denominator),
                Bytes::from(job.clients.len().to_string()),
            ],
            None => [
                unique,
                Bytes::from_static(b"0"),
                Bytes::from_static(b"0"),
                Bytes::from_static(b"0"),
                Bytes::from_static(b"0"),
                Bytes::from_static(b"0"),
            ],
        };
        out.push(Action::Send(
            conn,
            Packet::res(PacketType::StatusResUnique, args),
        ));
    }

    /// Removes a queued, scheduled or running job from every index.
    pub(crate) fn remove_job(&mut self, id: JobId) {
        let Some(job) = self.jobs.remove(&id) else {
            return;
        };
        let f = self
            .functions
            .get_mut(&job.function)
            .expect("function of job");
        match job.state {
            JobState::Queued { seq } => {
                f.queues[job.priority as usize].remove(&seq);
            }
            JobState::Scheduled { at } => {
                f.scheduled -= 1;
                self.schedule.remove(&(at, id));
            }
            JobState::Running { worker, deadline } => {
                f.running -= 1;
                if let Some(d) = deadline {
                    self.timeouts.remove(&(d, id));
                }
                if let Some(w) = self.conns.get_mut(&worker) {
                    w.running.remove(&id);
                }
            }
        }
        if !job.unique.is_empty() {
            if f.unique.get(&job.unique) == Some(&id) {
                f.unique.remove(&job.unique);
            }
            if self.by_unique.get(&job.unique) == Some(&id) {
                self.by_unique.remove(&job.unique);
            }
        }
        for client in &job.clients {
            if let Some(c) = self.conns.get_mut(client) {
                c.attached.remove(&id);
            }
        }
        self.leases.job_ended(id, &job.handle, self.now);
        self.gc_function(&job.function);
    }

    /// Puts a running background job back at the head of its queue, so it is not lost.
    fn requeue_at_head(&mut self, id: JobId, out: &mut Vec<Action>) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if let JobState::Running {
            deadline: Some(d), ..
        } = job.state
        {
            self.timeouts.remove(&(d, id));
        }
        self.stats.jobs_requeued += 1;
        job.retries += 1;
        let seq = self.next_head_seq;
        self.next_head_seq -= 1;
        job.state = JobState::Queued { seq };
        let f = self
            .functions
            .get_mut(&job.function)
            .expect("function of job");
        f.running -= 1;
        f.queues[job.priority as usize].insert(seq, id);
        let function = job.function.clone();
        self.leases.set_outcome(id, "worker lost");
        let handle = job.handle.clone();
        self.leases.job_ended(id, &handle, self.now);
        self.wake_one(&function, out);
    }

    /// Forgets a function nobody uses, so per-client callback functions do not pile up.
    fn gc_function(&mut self, function: &[u8]) {
        if self
            .functions
            .get(function)
            .is_some_and(Function::is_unused)
        {
            self.functions.remove(function);
            self.callbacks.forget(function);
        }
    }

    /// Where a job stands in its function's queues: (1-based position, jobs queued), with
    /// position 0 once it runs. Counts the jobs ahead of it, so it costs time proportional to
    /// the queue; testenv-clients ask every 30 s.
    pub fn queue_position(&self, handle: &[u8]) -> Option<(usize, usize)> {
        let id = self.job_id_of_handle(handle)?;
        let job = self.jobs.get(&id)?;
        let f = self.functions.get(&job.function)?;
        let total = f.queued();
        match job.state {
            JobState::Queued { seq } => {
                let p = job.priority as usize;
                let ahead: usize = f.queues[..p].iter().map(BTreeMap::len).sum::<usize>()
                    + f.queues[p].range(..seq).count();
                Some((ahead + 1, total))
            }
            JobState::Scheduled { .. } => Some((total + 1, total)),
            JobState::Running { .. } => Some((0, total)),
        }
    }

    /// Cancels a queued background job (admin `cancel job`). Returns whether it was one.
    pub(crate) fn cancel_queued_background(&mut self, handle: &[u8]) -> bool {
        let Some(id) = self.job_id_of_handle(handle) else {
            return false;
        };
        match self.jobs.get(&id) {
            Some(job)
                if job.background
                    && matches!(
                        job.state,
                        JobState::Queued { .. } | JobState::Scheduled { .. }
                    ) =>
            {
                self.remove_job(id);
                true
            }
            _ => false,
        }
    }

    pub(crate) fn set_max_queue(&mut self, function: &[u8], sizes: Option<[i64; 3]>) {
        let key = Bytes::copy_from_slice(function);
        self.functions.entry(key).or_default().max_queue = sizes;
        self.gc_function(function);
    }

    /// Checks the cross-index invariants; for tests and fuzzing.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut queued = 0;
        let mut running = 0;
        for (name, f) in &self.functions {
            for (p, q) in f.queues.iter().enumerate() {
                for (&seq, id) in q {
                    let job = self.jobs.get(id).ok_or("queued job missing")?;
                    if job.state != (JobState::Queued { seq }) || job.priority as usize != p {
                        return Err(format!("job {id} queued but in state {:?}", job.state));
                    }
                    if job.function != name {
                        return Err("job queued under the wrong function".into());
                    }
                    queued += 1;
                }
            }
            running += f.running;
            for w in &f.workers {
                let c = self.conns.get(w).ok_or("worker of function missing")?;
                if !c.abilities.contains_key(name) {
                    return Err("function lists a worker that cannot do it".into());
                }
            }
            for w in &f.sleeping {
                if !f.workers.contains(w) || !self.conns[w].sleeping {
                    return Err("sleeping set holds a non-sleeping worker".into());
                }
            }
        }
        let mut really_running = 0;
        let mut really_queued = 0;
        for (id, job) in &self.jobs {
            match job.state {
                JobState::Running { worker, .. } => {
                    really_running += 1;
                    let w = self
                        .conns
                        .get(&worker)
                        .ok_or("running job's worker missing")?;
                    if !w.running.contains(id) {
                        return Err(format!("worker does not know it runs job {id}"));
                    }
                }
                JobState::Queued { .. } => really_queued += 1,
                JobState::Scheduled { .. } => {}
            }
            for c in &job.clients {
                if !self.conns.get(c).is_some_and(|c| c.attached.contains(id)) {
                    return Err(format!("client of job {id} is not attached"));
                }
            }
        }
        for (cid, c) in &self.conns {
            for id in &c.running {
                match self.jobs.get(id).map(|j| j.state) {
                    Some(JobState::Running { worker, .. }) if worker == *cid => {}
                    _ => return Err(format!("connection {cid} holds job {id} it does not run")),
                }
            }
        }
        if queued != really_queued || running != really_running {
            return Err(format!(
                "counts differ: queued {queued}/{really_queued}, running {running}/{really_running}"
            ));
        }
        Ok(())
    }
}

/// When a worker woken at `woken_at` (monotonic) is checked on.
fn wake_check_time(woken_at: Millis) -> Millis {
    woken_at.saturating_add(WAKE_RETRY_MS)
}

fn running_flag(job: &Job) -> Bytes {
    if matches!(job.state, JobState::Running { .. }) {
        Bytes::from_static(b"1")
    } else {
        Bytes::from_static(b"0")
    }
}

fn or_zero(b: &Bytes) -> Bytes {
    if b.is_empty() {
        Bytes::from_static(b"0")
    } else {
        b.clone()
    }
}

fn parse_num<T: std::str::FromStr>(b: &[u8]) -> Option<T> {
    std::str::from_utf8(b).ok()?.trim().parse().ok()
}

/// Bytes shown in logs: lossy UTF-8.
pub(crate) fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
