//! The lease-resume protocol of docs/design/lease-resume.md as a finite model: one
//! testenv-worker, two testenv-clients (each with its guard and COMMAND), two brokers.
//! docs/design/lease-model.md explains the abstractions; this file is the model itself.
//!
//! Time is a digital clock: every timer holds the units left until it fires and `Tick` takes
//! one unit off all of them at once. A timer at zero must fire before time goes on, unless its
//! owner is paused (SIGSTOP): then it fires late, when the owner runs again. Steps an agent takes
//! at once in reality (grabbing a job, reading a message, reacting to it) are *eager*: time does
//! not pass while one is possible. Faults, a COMMAND ending, an early release and noticing a dead
//! broker before the detection bound happen at any time.

use stateright::{Model, Property};

pub const BROKERS: usize = 2;
pub const CLIENTS: usize = 2;

/// The protocol's timers and detection bounds, in seconds (the agents' defaults).
#[derive(Clone, Copy, Debug)]
pub struct Seconds {
    /// K: a dead broker noticed by our library (probe idle + probe timeout).
    pub detect: u32,
    /// The client's `--kill-grace`: SIGTERM to SIGKILL of COMMAND's tree.
    pub kill_grace: u32,
    /// The worker's `--holder-grace`: after a take-back, before the TE is offered.
    pub holder_grace: u32,
    /// The client's `--resume-grace`.
    pub client_grace: u32,
    /// The worker's `--resume-grace`.
    pub worker_grace: u32,
    /// The worker's `--callback-start-timeout`.
    pub start_check: u32,
    /// The longest SIGSTOP of a client or the worker the model injects.
    pub pause: u32,
}

impl Seconds {
    /// The defaults of testenv-client / testenv-worker and the design's client grace.
    pub const DEFAULTS: Seconds = Seconds {
        detect: 40,
        kill_grace: 10,
        holder_grace: 15,
        client_grace: 60,
        worker_grace: 120,
        start_check: 30,
        pause: 20,
    };
}

/// The same timers in model units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Timing {
    pub detect: u8,
    pub kill_grace: u8,
    pub holder_grace: u8,
    pub client_grace: u8,
    pub worker_grace: u8,
    pub start_check: u8,
    pub pause: u8,
}

impl Timing {
    /// `s` in units of `unit` seconds, rounded against safety: what lets the holder run longer
    /// (detection, kill grace, client grace, pauses) up, what lets the worker offer sooner
    /// (its graces) down. With a unit dividing every value the model's time is exact.
    pub fn from_seconds(s: Seconds, unit: u32) -> Timing {
        let up = |v: u32| u8::try_from(v.div_ceil(unit)).expect("timer fits a u8");
        let down = |v: u32| u8::try_from(v / unit).expect("timer fits a u8");
        Timing {
            detect: up(s.detect),
            kill_grace: up(s.kill_grace),
            holder_grace: down(s.holder_grace),
            client_grace: up(s.client_grace),
            worker_grace: down(s.worker_grace),
            start_check: down(s.start_check),
            pause: up(s.pause),
        }
    }

    /// The defaults scaled down for the fast checks: not one unit, but small values that keep
    /// the orders between the sums the resume inequality compares (checked by the test
    /// `fast_timing_keeps_the_orders_of_the_defaults`). Two orders of the defaults it does
    /// not keep: K > holder grace, and pause > holder grace − kill grace (the exact timing of
    /// the ignored test `exact_default_timers` keeps every one).
    pub const FAST: Timing = Timing {
        detect: 2,
        kill_grace: 1,
        holder_grace: 2,
        client_grace: 3,
        worker_grace: 6,
        start_check: 2,
        pause: 1,
    };

    /// The design's safety inequality: worker grace + holder grace > client grace + K + kill
    /// grace.
    pub fn margin_holds(&self) -> bool {
        u32::from(self.worker_grace) + u32::from(self.holder_grace)
            > u32::from(self.client_grace) + u32::from(self.detect) + u32::from(self.kill_grace)
    }
}

/// How many faults of each kind one run may inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Faults {
    pub broker_crashes: u8,
    pub worker_restarts: u8,
    pub client_crashes: u8,
    pub pauses: u8,
    pub early_releases: u8,
}

/// Protocol rules that differ between the design as written and the fixes the model led to
/// (docs/design/lease-model.md, "Findings").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rules {
    /// After a lease ends without proof that its holder is gone (COMMAND's exit status, the
    /// holder's connection closed, `released`, a refused callback), the TE is offered only
    /// after `worker_grace + holder_grace` from the last loss of C1 (from the take-back when C1
    /// was there to carry it) instead of after `holder_grace`: a take-back lost with its
    /// broker, or read late by a paused client, leaves the client only its own C1-lost grace,
    /// which runs until K + client grace + kill grace after that loss.
    pub long_wait_unproven: bool,
    /// Every end of a lease withdraws the callbacks the worker submitted and the client has
    /// not taken (closing the connection that submitted them, so the broker drops them): a
    /// client must not start COMMAND from the TE data of a lease that is over.
    pub withdraw_unstarted: bool,
    /// The TE data names the `lockenv` job the worker took; a client whose lock request was
    /// lost and submitted again refuses TE data for the old one instead of starting COMMAND
    /// with a C1 it does not hold (its C1 grace would never start).
    pub te_data_names_c1: bool,
}

impl Rules {
    pub const DESIGN: Rules = Rules {
        long_wait_unproven: false,
        withdraw_unstarted: false,
        te_data_names_c1: false,
    };
    pub const FIXED: Rules = Rules {
        long_wait_unproven: true,
        withdraw_unstarted: true,
        te_data_names_c1: true,
    };
}

/// A job waiting in a broker's queue. Running jobs live in the agents' carrier sets. The
/// worker's jobs and the replies to them name the client and the lease (the worker's lease
/// counter): the worker listens only to the jobs of its current lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Job {
    /// `lockenv` from a client.
    Lock(u8),
    /// The first callback (`callback_<jobnum>`, the TE data), worker to client.
    Plain(u8, u8),
    /// C2 resume, worker to client.
    ResumeC2(u8, u8),
    /// Revoke, worker to client.
    Revoke(u8, u8),
    /// C1 resume to `lease_<id>`, client to worker.
    ResumeC1(u8),
    /// `released` to `lease_<id>` (background: it outlives its client), client to worker.
    Released(u8),
}

/// A reply travelling through a broker (lost if the broker dies first), FIFO per receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Msg {
    /// The worker completed the client's C1 on this broker: the TE is taken back.
    TakenBack(u8),
    /// The worker's connection closed: the C1 it ran on this broker failed.
    C1Failed(u8),
    /// WORK_STATUS on a C1 resume the worker grabbed on this broker.
    C1Resumed(u8),
    /// The client completed its C2 with COMMAND's exit status.
    Exit(u8, u8),
    /// The client's C2 failed because its connection closed (EOF: the process is gone), or
    /// the client refused a callback for a lease it does not hold.
    HolderGone(u8, u8),
    /// WORK_STATUS 1/1: the client took a C2 resume on this broker.
    C2Resumed(u8, u8, u8),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Agent {
    Worker,
    Client(u8),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Broker {
    pub up: bool,
    pub queue: JobSet,
    /// Replies in flight: (receiver, message), in sending order.
    pub replies: Replies,
}

/// A broker's queued jobs as a bit set (a state is copied for every step, so it owns no heap).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct JobSet(u128);

/// Leases a run can start, bounding the lease counter carried by jobs.
const MAX_LEASES: u8 = 8;

impl JobSet {
    fn index(job: Job) -> u32 {
        let (kind, c, g) = match job {
            Job::Lock(c) => (0, c, 0),
            Job::ResumeC1(c) => (1, c, 0),
            Job::Released(c) => (2, c, 0),
            Job::Plain(c, g) => (3, c, g),
            Job::ResumeC2(c, g) => (4, c, g),
            Job::Revoke(c, g) => (5, c, g),
        };
        assert!(g < MAX_LEASES && usize::from(c) < CLIENTS);
        kind * 16 + u32::from(c) * 8 + u32::from(g)
    }
    fn job(i: u32) -> Job {
        let (kind, c, g) = (i / 16, (i / 8 % 2) as u8, (i % 8) as u8);
        match kind {
            0 => Job::Lock(c),
            1 => Job::ResumeC1(c),
            2 => Job::Released(c),
            3 => Job::Plain(c, g),
            4 => Job::ResumeC2(c, g),
            _ => Job::Revoke(c, g),
        }
    }
    pub fn contains(&self, job: Job) -> bool {
        self.0 & (1 << Self::index(job)) != 0
    }
    fn insert(&mut self, job: Job) {
        self.0 |= 1 << Self::index(job);
    }
    fn remove(&mut self, job: Job) {
        self.0 &= !(1 << Self::index(job));
    }
    pub fn iter(&self) -> impl Iterator<Item = Job> + '_ {
        (0..96).filter(|i| self.0 & (1 << i) != 0).map(Self::job)
    }
    fn retain(&mut self, keep: impl Fn(Job) -> bool) {
        for job in self.iter().collect::<Vec<_>>() {
            if !keep(job) {
                self.remove(job);
            }
        }
    }
}

/// Replies in flight on a broker, oldest first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Replies([Option<(Agent, Msg)>; 6]);

impl Replies {
    fn push(&mut self, to: Agent, msg: Msg) {
        let free = self.0.iter_mut().find(|r| r.is_none());
        *free.expect("more replies in flight than the model bounds") = Some((to, msg));
    }
    /// Takes the oldest reply to `to`.
    fn take(&mut self, to: Agent) -> Option<Msg> {
        let i = self
            .0
            .iter()
            .position(|r| matches!(r, Some((a, _)) if *a == to))?;
        let msg = self.0[i].map(|(_, m)| m);
        self.0.copy_within(i + 1.., i);
        self.0[self.0.len() - 1] = None;
        msg
    }
    fn drop_to(&mut self, to: Agent) {
        while self.take(to).is_some() {}
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proc {
    Up,
    Paused(u8),
    Down,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WorkerPhase {
    /// Registered for `lockenv`: the TE is free.
    Offering,
    Leasing(Lease),
    /// The lease is over but its holder may still run: the TE is kept `left` more units.
    HolderWait {
        holder: u8,
        left: u8,
    },
}

/// The worker's side of a lease. Carriers are sets of brokers (bit b = a job on broker b).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lease {
    pub holder: u8,
    pub c1: u8,
    pub c2: u8,
    /// The TE data was submitted as a callback on this broker and not yet seen running.
    pub plain: Option<u8>,
    /// The TE data was submitted at all (before that an empty C2 is not "lost").
    pub handed: bool,
    /// The resume grace: running while a carrier is lost.
    pub grace: Option<u8>,
    /// The resume grace of C1 alone, from its loss: until it ends the holder may still wait
    /// for its own C1 resume (its grace started at most K later).
    pub c1_grace: Option<u8>,
    /// The callback start check.
    pub start: Option<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Worker {
    pub proc: Proc,
    /// The lease journal's holder: survives a crash.
    pub journal: Option<u8>,
    /// Counts the leases (kept in the journal with the holder).
    pub gen: u8,
    /// Brokers a C2 resume was submitted to since C2 was lost (retried when one dies).
    pub resumes_sent: u8,
    pub phase: WorkerPhase,
    /// A broker's death to notice within this many units.
    pub detect: [Option<u8>; BROKERS],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cmd {
    NotStarted,
    Running,
    /// SIGTERM sent, SIGKILL of the tree after the kill grace.
    Dying(u8),
    /// Ended by itself: its exit status is to be delivered.
    Exited,
    Killed,
}

impl Cmd {
    pub fn alive(self) -> bool {
        matches!(self, Cmd::Running | Cmd::Dying(_))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Exit {
    Status,
    LeaseLost,
    Crashed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClientPhase {
    /// Waiting for a TE; `lock` is the broker holding its lock request (None: to submit).
    Waiting {
        lock: Option<u8>,
    },
    /// Holding a TE: carriers as broker sets, the client's resume grace while C1 is lost.
    Holding {
        c1: u8,
        c2: u8,
        grace: Option<u8>,
    },
    Done(Exit),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Client {
    pub proc: Proc,
    pub phase: ClientPhase,
    pub cmd: Cmd,
    pub detect: [Option<u8>; BROKERS],
    /// C2 jobs (broker bits) whose worker process died: what the client sends on them is lost.
    pub detached: u8,
    /// The lease was resumed at least once (a C1 or C2 resume was taken).
    pub resumed: bool,
    /// The worker's lease counter of the callback the client took.
    pub gen: u8,
    /// Brokers a C1 resume was submitted to since C1 was lost (retried when one dies).
    pub resumes_sent: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct State {
    pub brokers: [Broker; BROKERS],
    pub worker: Worker,
    pub clients: [Client; CLIENTS],
    /// Faults still allowed.
    pub faults: Faults,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Tick,
    // Faults and the environment.
    BrokerCrash(u8),
    BrokerRestart(u8),
    WorkerCrash,
    WorkerRestart,
    ClientCrash(u8),
    Pause(Agent),
    Continue(Agent),
    CommandExits(u8),
    EarlyRelease,
    Detect(Agent, u8),
    CommandDies(u8),
    // Client steps.
    SubmitLock(u8, u8),
    ClientGrab(u8, u8, Job),
    SubmitResumeC1(u8),
    ClientGraceExpires(u8),
    ReportExit(u8),
    ClientExits(u8),
    // Worker steps.
    GrabLock(u8, u8),
    SubmitPlain(u8),
    SubmitResumeC2,
    WorkerGrab(u8, Job),
    WorkerGraceExpires,
    StartCheck,
    HolderWaitEnds,
    // A reply read by its receiver.
    Deliver(u8, Agent),
}

/// Coarser views of the environment that keep the state space small (the larger-bound test
/// turns them off).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Coarse {
    /// A dead broker is noticed either at once (its sockets closed: kill -9) or exactly at
    /// the detection bound K (a cut or a SIGSTOPped broker), not at the points between.
    pub detect_at_bounds: bool,
    /// A crashed broker comes back as soon as everybody has noticed it died (a supervisor
    /// restarting it), not at any later time.
    pub restart_at_once: bool,
}

impl Coarse {
    pub const FULL: Coarse = Coarse {
        detect_at_bounds: false,
        restart_at_once: false,
    };
    pub const BOUNDS: Coarse = Coarse {
        detect_at_bounds: true,
        restart_at_once: true,
    };
}

#[derive(Clone, Debug)]
pub struct LeaseModel {
    pub timing: Timing,
    pub faults: Faults,
    pub rules: Rules,
    pub coarse: Coarse,
}

fn bit(b: u8) -> u8 {
    1 << b
}

fn brokers() -> impl Iterator<Item = u8> {
    0..BROKERS as u8
}

impl State {
    fn client(&self, c: u8) -> &Client {
        &self.clients[usize::from(c)]
    }
    fn client_mut(&mut self, c: u8) -> &mut Client {
        &mut self.clients[usize::from(c)]
    }
    fn proc(&self, a: Agent) -> Proc {
        match a {
            Agent::Worker => self.worker.proc,
            Agent::Client(c) => self.client(c).proc,
        }
    }
    fn detect(&self, a: Agent) -> &[Option<u8>; BROKERS] {
        match a {
            Agent::Worker => &self.worker.detect,
            Agent::Client(c) => &self.client(c).detect,
        }
    }
    fn detect_mut(&mut self, a: Agent) -> &mut [Option<u8>; BROKERS] {
        match a {
            Agent::Worker => &mut self.worker.detect,
            Agent::Client(c) => &mut self.client_mut(c).detect,
        }
    }
    fn can_act(&self, a: Agent) -> bool {
        self.proc(a) == Proc::Up
            && !matches!(a, Agent::Client(c) if matches!(self.client(c).phase, ClientPhase::Done(_)))
    }
    /// The agent has a live connection to broker `b` (and believes so).
    fn connected(&self, a: Agent, b: u8) -> bool {
        self.brokers[usize::from(b)].up
            && self.proc(a) != Proc::Down
            && self.detect(a)[usize::from(b)].is_none()
            && !matches!(a, Agent::Client(c) if matches!(self.client(c).phase, ClientPhase::Done(_)))
    }
    fn queued(&self, b: u8, job: Job) -> bool {
        self.brokers[usize::from(b)].queue.contains(job)
    }
    fn enqueue(&mut self, b: u8, job: Job) {
        self.brokers[usize::from(b)].queue.insert(job);
    }
    fn dequeue(&mut self, b: u8, job: Job) {
        self.brokers[usize::from(b)].queue.remove(job);
    }
    /// Sends `msg` through broker `b`; lost when the broker is down or the receiver gone.
    fn reply(&mut self, b: u8, to: Agent, msg: Msg) {
        let gone = match to {
            Agent::Worker => self.worker.proc == Proc::Down,
            Agent::Client(c) => matches!(self.client(c).phase, ClientPhase::Done(_)),
        };
        let broker = &mut self.brokers[usize::from(b)];
        if broker.up && !gone {
            broker.replies.push(to, msg);
        }
    }
    /// What client `c` sends on its C2 on broker `b` reaches the worker unless that job's
    /// worker process died.
    fn reply_on_c2(&mut self, c: u8, b: u8, msg: Msg) {
        if self.client(c).detached & bit(b) == 0 {
            self.reply(b, Agent::Worker, msg);
        }
    }
    pub fn all_done(&self) -> bool {
        self.clients
            .iter()
            .all(|c| matches!(c.phase, ClientPhase::Done(_)))
    }
    pub fn te_free(&self) -> bool {
        self.worker.proc != Proc::Down && self.worker.phase == WorkerPhase::Offering
    }
    /// The worker keeps the TE for client `c` (holding it, waiting out its grace, or down with
    /// `c` in its journal: it restarts into that lease).
    pub fn held_for(&self, c: u8) -> bool {
        self.worker.journal == Some(c)
            && match self.worker.phase {
                _ if self.worker.proc == Proc::Down => true,
                WorkerPhase::Offering => false,
                WorkerPhase::Leasing(l) => l.holder == c,
                WorkerPhase::HolderWait { holder, .. } => holder == c,
            }
    }
}

impl LeaseModel {
    pub fn new(timing: Timing, faults: Faults, rules: Rules, coarse: Coarse) -> LeaseModel {
        LeaseModel {
            timing,
            faults,
            rules,
            coarse,
        }
    }

    fn candidates(&self, s: &State) -> Vec<Action> {
        let mut v = vec![
            Action::WorkerCrash,
            Action::WorkerRestart,
            Action::EarlyRelease,
            Action::SubmitResumeC2,
            Action::WorkerGraceExpires,
            Action::StartCheck,
            Action::HolderWaitEnds,
            Action::Pause(Agent::Worker),
            Action::Continue(Agent::Worker),
        ];
        for b in brokers() {
            v.push(Action::BrokerCrash(b));
            v.push(Action::BrokerRestart(b));
            v.push(Action::Detect(Agent::Worker, b));
            v.push(Action::SubmitPlain(b));
            v.push(Action::Deliver(b, Agent::Worker));
            for job in s.brokers[usize::from(b)].queue.iter() {
                v.push(Action::WorkerGrab(b, job));
                if let Job::Lock(c) = job {
                    v.push(Action::GrabLock(b, c));
                }
            }
        }
        for c in 0..CLIENTS as u8 {
            v.push(Action::ClientCrash(c));
            v.push(Action::Pause(Agent::Client(c)));
            v.push(Action::Continue(Agent::Client(c)));
            v.push(Action::CommandExits(c));
            v.push(Action::CommandDies(c));
            v.push(Action::SubmitResumeC1(c));
            v.push(Action::ClientGraceExpires(c));
            v.push(Action::ReportExit(c));
            v.push(Action::ClientExits(c));
            for b in brokers() {
                v.push(Action::Detect(Agent::Client(c), b));
                v.push(Action::SubmitLock(c, b));
                v.push(Action::Deliver(b, Agent::Client(c)));
                for job in s.brokers[usize::from(b)].queue.iter() {
                    v.push(Action::ClientGrab(c, b, job));
                }
            }
        }
        v
    }

    /// Whether time may not pass while `a` is possible.
    fn eager(&self, s: &State, a: Action) -> bool {
        match a {
            Action::Tick
            | Action::BrokerCrash(_)
            | Action::WorkerCrash
            | Action::WorkerRestart
            | Action::ClientCrash(_)
            | Action::Pause(_)
            | Action::CommandExits(_)
            | Action::EarlyRelease => false,
            Action::Continue(a) => s.proc(a) == Proc::Paused(0),
            Action::Detect(a, b) => s.detect(a)[usize::from(b)] == Some(0),
            Action::BrokerRestart(_) => self.coarse.restart_at_once,
            _ => true,
        }
    }

    fn enabled(&self, s: &State) -> Vec<(Action, State)> {
        let mut out = Vec::new();
        for a in self.candidates(s) {
            if let Some(n) = self.step(s, a) {
                out.push((a, n));
            }
        }
        out
    }

    /// The state after `a`, or None when `a` is not possible in `s`.
    pub fn step(&self, s: &State, a: Action) -> Option<State> {
        let t = self.timing;
        let mut n = *s;
        let faults_allowed = !s.all_done();
        match a {
            // `actions` offers Tick only when no eager step is possible.
            Action::Tick => {
                if !tick(&mut n) {
                    return None;
                }
            }
            Action::BrokerCrash(b) => {
                let bi = usize::from(b);
                if !faults_allowed || n.faults.broker_crashes == 0 || !n.brokers[bi].up {
                    return None;
                }
                n.faults.broker_crashes -= 1;
                n.brokers[bi] = Broker {
                    up: false,
                    queue: JobSet::default(),
                    replies: Replies::default(),
                };
                let agents =
                    std::iter::once(Agent::Worker).chain((0..CLIENTS as u8).map(Agent::Client));
                for ag in agents {
                    if s.connected(ag, b) && uses(s, ag, b) {
                        n.detect_mut(ag)[bi] = Some(t.detect);
                    }
                }
            }
            Action::BrokerRestart(b) => {
                let bi = usize::from(b);
                let noticing = n.worker.detect[bi].is_some()
                    || n.clients.iter().any(|c| c.detect[bi].is_some());
                if n.brokers[bi].up || noticing {
                    return None;
                }
                n.brokers[bi].up = true;
            }
            Action::Detect(ag, b) => {
                let bi = usize::from(b);
                let left = s.detect(ag)[bi]?;
                let extreme = left == 0 || left == t.detect;
                if !s.can_act(ag) || self.coarse.detect_at_bounds && !extreme {
                    return None;
                }
                n.detect_mut(ag)[bi] = None;
                self.lose(&mut n, ag, b);
            }
            Action::WorkerCrash => {
                if !faults_allowed || n.faults.worker_restarts == 0 || n.worker.proc == Proc::Down {
                    return None;
                }
                n.faults.worker_restarts -= 1;
                if let WorkerPhase::Leasing(l) = n.worker.phase {
                    for b in brokers().filter(|b| l.c1 & bit(*b) != 0) {
                        n.reply(b, Agent::Client(l.holder), Msg::C1Failed(b));
                    }
                }
                // The callback jobs it submitted are detached from it: their results go nowhere.
                for cl in &mut n.clients {
                    if let ClientPhase::Holding { c2, .. } = cl.phase {
                        cl.detached |= c2;
                    }
                }
                for broker in &mut n.brokers {
                    broker.queue.retain(|j| {
                        !matches!(j, Job::Plain(..) | Job::ResumeC2(..) | Job::Revoke(..))
                    });
                    broker.replies.drop_to(Agent::Worker);
                }
                n.worker.proc = Proc::Down;
                n.worker.phase = WorkerPhase::Offering;
                n.worker.detect = [None; BROKERS];
            }
            Action::WorkerRestart => {
                if n.worker.proc != Proc::Down {
                    return None;
                }
                n.worker.proc = Proc::Up;
                n.worker.resumes_sent = 0;
                // The journal names a resumable lease: the TE is quarantined for holder grace +
                // resume grace (the holder may be waiting for a resume); `lease_<id>` is
                // registered meanwhile, so `released` ends the quarantine; a C1 resume is
                // refused (see `WorkerGrab`).
                n.worker.phase = match n.worker.journal {
                    Some(holder) => WorkerPhase::HolderWait {
                        holder,
                        left: t.worker_grace.saturating_add(t.holder_grace),
                    },
                    None => WorkerPhase::Offering,
                };
            }
            Action::ClientCrash(c) => {
                if !faults_allowed || n.faults.client_crashes == 0 || !s.can_act(Agent::Client(c)) {
                    return None;
                }
                n.faults.client_crashes -= 1;
                let cl = n.client_mut(c);
                // The guard gets SIGTERM from PR_SET_PDEATHSIG and SIGKILLs the tree at once.
                if cl.cmd.alive() {
                    cl.cmd = Cmd::Killed;
                }
                close_client(&mut n, c, Exit::Crashed);
            }
            Action::Pause(ag) => {
                if !faults_allowed || n.faults.pauses == 0 || !s.can_act(ag) || t.pause == 0 {
                    return None;
                }
                n.faults.pauses -= 1;
                set_proc(&mut n, ag, Proc::Paused(t.pause));
            }
            Action::Continue(ag) => {
                if !matches!(s.proc(ag), Proc::Paused(_)) {
                    return None;
                }
                set_proc(&mut n, ag, Proc::Up);
            }
            Action::CommandExits(c) => {
                if n.client(c).cmd != Cmd::Running {
                    return None;
                }
                n.client_mut(c).cmd = Cmd::Exited;
            }
            Action::CommandDies(c) => {
                if n.client(c).cmd != Cmd::Dying(0) {
                    return None;
                }
                n.client_mut(c).cmd = Cmd::Killed;
            }
            Action::EarlyRelease => {
                let WorkerPhase::Leasing(l) = n.worker.phase else {
                    return None;
                };
                if !faults_allowed || n.faults.early_releases == 0 || !s.can_act(Agent::Worker) {
                    return None;
                }
                n.faults.early_releases -= 1;
                self.take_back(&mut n, l);
            }
            Action::SubmitLock(c, b) => {
                let ag = Agent::Client(c);
                if !s.can_act(ag)
                    || !s.connected(ag, b)
                    || n.client(c).phase != (ClientPhase::Waiting { lock: None })
                {
                    return None;
                }
                n.enqueue(b, Job::Lock(c));
                n.client_mut(c).phase = ClientPhase::Waiting { lock: Some(b) };
            }
            Action::ClientGrab(c, b, job) => {
                let ag = Agent::Client(c);
                if !s.can_act(ag) || !s.connected(ag, b) || !s.queued(b, job) {
                    return None;
                }
                match job {
                    Job::Plain(x, _) | Job::ResumeC2(x, _) | Job::Revoke(x, _) if x == c => {}
                    _ => return None,
                }
                n.dequeue(b, job);
                self.client_takes(&mut n, c, b, job);
            }
            Action::SubmitResumeC1(c) => {
                let ag = Agent::Client(c);
                let ClientPhase::Holding { c1: 0, .. } = n.client(c).phase else {
                    return None;
                };
                if !s.can_act(ag) || n.client(c).cmd != Cmd::Running {
                    return None;
                }
                let targets: Vec<u8> = brokers()
                    .filter(|b| s.connected(ag, *b) && s.client(c).resumes_sent & bit(*b) == 0)
                    .collect();
                if targets.is_empty() {
                    return None;
                }
                for b in targets {
                    n.enqueue(b, Job::ResumeC1(c));
                    n.client_mut(c).resumes_sent |= bit(b);
                }
            }
            Action::ClientGraceExpires(c) => {
                let ClientPhase::Holding {
                    c1: 0,
                    c2,
                    grace: Some(0),
                } = n.client(c).phase
                else {
                    return None;
                };
                if !s.can_act(Agent::Client(c)) {
                    return None;
                }
                n.client_mut(c).phase = ClientPhase::Holding {
                    c1: 0,
                    c2,
                    grace: None,
                };
                self.kill(&mut n, c);
            }
            Action::ReportExit(c) => {
                let ClientPhase::Holding { c2, .. } = n.client(c).phase else {
                    return None;
                };
                let ag = Agent::Client(c);
                let on = brokers().find(|b| c2 & bit(*b) != 0 && s.connected(ag, *b));
                if !s.can_act(ag) || n.client(c).cmd != Cmd::Exited || on.is_none() {
                    return None;
                }
                for b in brokers().filter(|b| c2 & bit(*b) != 0 && s.connected(ag, *b)) {
                    n.reply_on_c2(c, b, Msg::Exit(c, s.client(c).gen));
                }
                if let ClientPhase::Holding { c2, .. } = &mut n.client_mut(c).phase {
                    *c2 = 0;
                }
                close_client(&mut n, c, Exit::Status);
            }
            Action::ClientExits(c) => {
                if !s.can_act(Agent::Client(c))
                    || !matches!(n.client(c).phase, ClientPhase::Holding { .. })
                    || n.client(c).cmd != Cmd::Killed
                {
                    return None;
                }
                // After COMMAND is dead: `released` (background) tells the worker at once.
                for b in brokers().filter(|b| s.connected(Agent::Client(c), *b)) {
                    n.enqueue(b, Job::Released(c));
                }
                close_client(&mut n, c, Exit::LeaseLost);
            }
            Action::GrabLock(b, c) => {
                if !s.can_act(Agent::Worker)
                    || !s.connected(Agent::Worker, b)
                    || n.worker.phase != WorkerPhase::Offering
                    || !s.queued(b, Job::Lock(c))
                {
                    return None;
                }
                n.dequeue(b, Job::Lock(c));
                n.worker.journal = Some(c);
                n.worker.gen += 1;
                n.worker.resumes_sent = 0;
                n.worker.phase = WorkerPhase::Leasing(Lease {
                    holder: c,
                    c1: bit(b),
                    c2: 0,
                    plain: None,
                    handed: false,
                    grace: None,
                    c1_grace: None,
                    start: None,
                });
            }
            Action::SubmitPlain(b) => {
                let WorkerPhase::Leasing(mut l) = n.worker.phase else {
                    return None;
                };
                if !s.can_act(Agent::Worker) || !s.connected(Agent::Worker, b) || l.handed {
                    return None;
                }
                n.enqueue(b, Job::Plain(l.holder, n.worker.gen));
                l.handed = true;
                l.plain = Some(b);
                l.start = Some(t.start_check);
                n.worker.phase = WorkerPhase::Leasing(l);
            }
            Action::SubmitResumeC2 => {
                let WorkerPhase::Leasing(l) = n.worker.phase else {
                    return None;
                };
                if !s.can_act(Agent::Worker) || !l.handed || l.c2 != 0 || l.plain.is_some() {
                    return None;
                }
                let targets: Vec<u8> = brokers()
                    .filter(|b| {
                        s.connected(Agent::Worker, *b) && s.worker.resumes_sent & bit(*b) == 0
                    })
                    .collect();
                if targets.is_empty() {
                    return None;
                }
                for b in targets {
                    n.enqueue(b, Job::ResumeC2(l.holder, s.worker.gen));
                    n.worker.resumes_sent |= bit(b);
                }
            }
            Action::WorkerGrab(b, job) => {
                if !s.can_act(Agent::Worker) || !s.connected(Agent::Worker, b) || !s.queued(b, job)
                {
                    return None;
                }
                let holder = match n.worker.phase {
                    WorkerPhase::Leasing(l) => l.holder,
                    WorkerPhase::HolderWait { holder, .. } => holder,
                    WorkerPhase::Offering => return None,
                };
                match (n.worker.phase, job) {
                    (WorkerPhase::Leasing(_), Job::ResumeC1(c)) if c == holder => {}
                    (_, Job::Released(c)) if c == holder => {}
                    // A restarted worker refuses a C1 resume (the holder's lease may be with
                    // another TE's worker): the copy is offered again, as if never taken.
                    _ => return None,
                }
                n.dequeue(b, job);
                self.worker_takes(&mut n, b, job);
            }
            Action::WorkerGraceExpires => {
                let WorkerPhase::Leasing(l) = n.worker.phase else {
                    return None;
                };
                if !s.can_act(Agent::Worker) || l.grace != Some(0) {
                    return None;
                }
                self.take_back(&mut n, l);
            }
            Action::StartCheck => {
                let WorkerPhase::Leasing(mut l) = n.worker.phase else {
                    return None;
                };
                let (Some(b), Some(0)) = (l.plain, l.start) else {
                    return None;
                };
                if !s.can_act(Agent::Worker) {
                    return None;
                }
                l.start = None;
                if !s.connected(Agent::Worker, b) {
                    // GET_STATUS fails: the broker is noticed dead now.
                    n.worker.phase = WorkerPhase::Leasing(l);
                    n.worker.detect[usize::from(b)] = None;
                    self.lose(&mut n, Agent::Worker, b);
                } else if s.queued(b, Job::Plain(l.holder, s.worker.gen)) {
                    // NeverStarted: the holder never ran COMMAND; the TE is offered at once.
                    for x in brokers().filter(|x| l.c1 & bit(*x) != 0) {
                        n.reply(x, Agent::Client(l.holder), Msg::TakenBack(x));
                    }
                    self.offer(&mut n);
                } else {
                    l.plain = None;
                    l.c2 |= bit(b);
                    n.worker.phase = WorkerPhase::Leasing(l);
                }
            }
            Action::HolderWaitEnds => {
                if !s.can_act(Agent::Worker) {
                    return None;
                }
                let WorkerPhase::HolderWait { left: 0, .. } = n.worker.phase else {
                    return None;
                };
                self.offer(&mut n);
            }
            Action::Deliver(b, to) => {
                if !s.can_act(to) || !s.connected(to, b) {
                    return None;
                }
                let msg = n.brokers[usize::from(b)].replies.take(to)?;
                match to {
                    Agent::Worker => self.worker_reads(&mut n, msg),
                    Agent::Client(c) => self.client_reads(&mut n, c, msg),
                }
            }
        }
        Some(n)
    }

    /// Agent `ag` has noticed broker `b` dead: its carriers there are lost.
    fn lose(&self, n: &mut State, ag: Agent, b: u8) {
        let t = self.timing;
        match ag {
            Agent::Worker => {
                n.worker.resumes_sent &= !bit(b);
                if let WorkerPhase::Leasing(mut l) = n.worker.phase {
                    l.c1 &= !bit(b);
                    l.c2 &= !bit(b);
                    if l.plain == Some(b) {
                        l.plain = None;
                        l.start = None;
                    }
                    if !carriers_ok(&l) && l.grace.is_none() {
                        l.grace = Some(t.worker_grace);
                    }
                    if l.c1 == 0 && l.c1_grace.is_none() {
                        l.c1_grace = Some(t.worker_grace);
                    }
                    n.worker.phase = WorkerPhase::Leasing(l);
                }
            }
            Agent::Client(c) => {
                let cl = n.client_mut(c);
                cl.resumes_sent &= !bit(b);
                match &mut cl.phase {
                    ClientPhase::Waiting { lock } if *lock == Some(b) => *lock = None,
                    ClientPhase::Holding { c1, c2, grace } => {
                        let had_c1 = *c1 != 0;
                        *c1 &= !bit(b);
                        *c2 &= !bit(b);
                        if had_c1 && *c1 == 0 && grace.is_none() {
                            *grace = Some(t.client_grace);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// The worker takes the TE back (early release or its grace ran out): through C1 if it
    /// has one, else a revoke through the client's callback; then waits out the holder.
    fn take_back(&self, n: &mut State, l: Lease) {
        let t = self.timing;
        let mut told = false;
        for b in brokers().filter(|b| l.c1 & bit(*b) != 0) {
            if n.brokers[usize::from(b)].up {
                n.reply(b, Agent::Client(l.holder), Msg::TakenBack(b));
                told = true;
            }
        }
        if !told {
            let reachable: Vec<u8> = brokers()
                .filter(|b| n.connected(Agent::Worker, *b))
                .collect();
            for b in reachable {
                n.enqueue(b, Job::Revoke(l.holder, n.worker.gen));
            }
        }
        self.withdraw_callbacks(n);
        let left = match (self.rules.long_wait_unproven, told) {
            (false, _) => t.holder_grace,
            // The take-back may be lost with its broker: the client then notices its C1 gone
            // within K and kills COMMAND after its own grace.
            (true, true) => t.worker_grace.saturating_add(t.holder_grace),
            // C1 was lost before (or is found lost now): the client's grace started at most K
            // after that loss.
            (true, false) => l
                .c1_grace
                .unwrap_or(t.worker_grace)
                .saturating_add(t.holder_grace),
        };
        n.worker.phase = WorkerPhase::HolderWait {
            holder: l.holder,
            left,
        };
    }

    /// The lease is over: the TE is free again.
    fn offer(&self, n: &mut State) {
        self.withdraw_callbacks(n);
        n.worker.phase = WorkerPhase::Offering;
        n.worker.journal = None;
    }

    /// Under `withdraw_unstarted`, the callbacks of the ending lease still queued are dropped.
    fn withdraw_callbacks(&self, n: &mut State) {
        let holder = match n.worker.phase {
            WorkerPhase::Leasing(l) => l.holder,
            WorkerPhase::HolderWait { holder, .. } => holder,
            WorkerPhase::Offering => return,
        };
        if self.rules.withdraw_unstarted {
            for broker in &mut n.brokers {
                broker.queue.retain(
                    |j| !matches!(j, Job::Plain(x, _) | Job::ResumeC2(x, _) if x == holder),
                );
            }
        }
    }

    fn kill(&self, n: &mut State, c: u8) {
        let kill_grace = self.timing.kill_grace;
        let cl = n.client_mut(c);
        match cl.cmd {
            Cmd::Running => cl.cmd = Cmd::Dying(kill_grace),
            // COMMAND already ended: nothing to kill, its status goes undelivered.
            Cmd::Exited => close_client(n, c, Exit::Status),
            _ => {}
        }
    }

    fn client_takes(&self, n: &mut State, c: u8, b: u8, job: Job) {
        let t = self.timing;
        let cl = *n.client(c);
        match (cl.phase, job) {
            (ClientPhase::Waiting { lock }, Job::Plain(_, gen)) => {
                // The TE data names the lockenv job the worker holds (the model looks at the
                // worker's carriers): TE data for a lockenv the client no longer waits on (lost
                // and submitted again) is refused, since the client's C1 grace would start
                // only now, long after the worker lost that C1.
                let worker_c1 = match n.worker.phase {
                    WorkerPhase::Leasing(l) if n.worker.gen == gen => l.c1,
                    _ => 0,
                };
                if self.rules.te_data_names_c1 && lock.is_none_or(|x| worker_c1 & bit(x) == 0) {
                    n.reply(b, Agent::Worker, Msg::HolderGone(c, gen));
                    return;
                }
                n.client_mut(c).gen = gen;
                let c1 = lock.map_or(0, bit);
                n.client_mut(c).phase = ClientPhase::Holding {
                    c1,
                    c2: bit(b),
                    grace: (c1 == 0).then_some(t.client_grace),
                };
                n.client_mut(c).cmd = Cmd::Running;
            }
            (ClientPhase::Holding { c1, c2, grace }, Job::ResumeC2(_, gen)) => match cl.cmd {
                Cmd::Running => {
                    n.client_mut(c).phase = ClientPhase::Holding {
                        c1,
                        c2: c2 | bit(b),
                        grace,
                    };
                    n.client_mut(c).detached &= !bit(b);
                    n.client_mut(c).resumed = true;
                    // A resume left over from an earlier lease of the same request carries the
                    // same key: it is taken too, but the client reports on every C2 it holds,
                    // so the current lease's job still carries the exit status.
                    n.reply(b, Agent::Worker, Msg::C2Resumed(c, b, gen));
                }
                Cmd::Exited => {
                    n.client_mut(c).resumed = true;
                    n.reply(b, Agent::Worker, Msg::Exit(c, gen));
                    close_client(n, c, Exit::Status);
                }
                // Being killed: it exits soon and its connections close.
                _ => {}
            },
            (ClientPhase::Holding { .. }, Job::Revoke(..)) => self.kill(n, c),
            // A callback for a lease this client does not hold: WORK_FAIL.
            (_, Job::Plain(_, gen) | Job::ResumeC2(_, gen)) => {
                n.reply(b, Agent::Worker, Msg::HolderGone(c, gen))
            }
            _ => {}
        }
    }

    fn client_reads(&self, n: &mut State, c: u8, msg: Msg) {
        let ClientPhase::Holding { c1, c2, .. } = n.client(c).phase else {
            // The lock request ended without a TE (failed, or completed by a worker that gave
            // up): it is submitted again.
            if let (ClientPhase::Waiting { lock: Some(b) }, Msg::C1Failed(x) | Msg::TakenBack(x)) =
                (n.client(c).phase, msg)
            {
                if b == x {
                    n.client_mut(c).phase = ClientPhase::Waiting { lock: None };
                }
            }
            return;
        };
        let resuming = n.client(c).resumes_sent;
        match msg {
            // The completion of its C1, or of a C1 resume it submitted, ends the lease.
            Msg::TakenBack(b) if (c1 | resuming) & bit(b) != 0 => self.kill(n, c),
            // The worker's connection closed: the worker is gone, COMMAND is killed now.
            Msg::C1Failed(b) if c1 & bit(b) != 0 => self.kill(n, c),
            Msg::C1Resumed(b) => {
                n.client_mut(c).resumed = true;
                n.client_mut(c).resumes_sent = 0;
                n.client_mut(c).phase = ClientPhase::Holding {
                    c1: c1 | bit(b),
                    c2,
                    grace: None,
                };
            }
            _ => {}
        }
    }

    fn worker_takes(&self, n: &mut State, b: u8, job: Job) {
        match (n.worker.phase, job) {
            (WorkerPhase::Leasing(mut l), Job::ResumeC1(c)) => {
                l.c1 |= bit(b);
                l.c1_grace = None;
                if carriers_ok(&l) {
                    l.grace = None;
                }
                n.worker.phase = WorkerPhase::Leasing(l);
                n.reply(b, Agent::Client(c), Msg::C1Resumed(b));
            }
            (_, Job::Released(_)) => self.offer(n),
            _ => {}
        }
    }

    fn worker_reads(&self, n: &mut State, msg: Msg) {
        let holder = match n.worker.phase {
            WorkerPhase::Leasing(l) => l.holder,
            WorkerPhase::HolderWait { holder, .. } => holder,
            WorkerPhase::Offering => return,
        };
        match msg {
            Msg::Exit(c, g) | Msg::HolderGone(c, g) if c == holder && g == n.worker.gen => {
                if let WorkerPhase::Leasing(l) = n.worker.phase {
                    // Completing lockenv: the client has finished with it.
                    for b in brokers().filter(|b| l.c1 & bit(*b) != 0) {
                        n.reply(b, Agent::Client(c), Msg::TakenBack(b));
                    }
                }
                self.offer(n);
            }
            Msg::C2Resumed(c, b, g) if c == holder && g == n.worker.gen => {
                if let WorkerPhase::Leasing(mut l) = n.worker.phase {
                    l.c2 |= bit(b);
                    if carriers_ok(&l) {
                        l.grace = None;
                    }
                    n.worker.phase = WorkerPhase::Leasing(l);
                    n.worker.resumes_sent = 0;
                }
            }
            _ => {}
        }
    }
}

/// Both carriers of the lease are there (an unsubmitted or unconfirmed C2 is not lost).
fn carriers_ok(l: &Lease) -> bool {
    l.c1 != 0 && (!l.handed || l.c2 != 0 || l.plain.is_some())
}

/// Whether agent `ag` has anything on broker `b` whose loss it must notice.
fn uses(s: &State, ag: Agent, b: u8) -> bool {
    match ag {
        Agent::Worker => match s.worker.phase {
            WorkerPhase::Leasing(l) => (l.c1 | l.c2) & bit(b) != 0 || l.plain == Some(b),
            _ => false,
        },
        Agent::Client(c) => match s.client(c).phase {
            ClientPhase::Waiting { lock } => lock == Some(b),
            ClientPhase::Holding { c1, c2, .. } => (c1 | c2) & bit(b) != 0,
            ClientPhase::Done(_) => false,
        },
    }
}

fn set_proc(n: &mut State, ag: Agent, p: Proc) {
    match ag {
        Agent::Worker => n.worker.proc = p,
        Agent::Client(c) => n.client_mut(c).proc = p,
    }
}

/// The client process ends: the broker drops its queued foreground jobs and fails the
/// callbacks it was running (EOF), which tells the worker the holder is gone.
fn close_client(n: &mut State, c: u8, exit: Exit) {
    if let ClientPhase::Holding { c2, .. } = n.client(c).phase {
        for b in brokers().filter(|b| c2 & bit(*b) != 0) {
            n.reply_on_c2(c, b, Msg::HolderGone(c, n.client(c).gen));
        }
    }
    for broker in &mut n.brokers {
        broker
            .queue
            .retain(|j| !matches!(j, Job::Lock(x) | Job::ResumeC1(x) if x == c));
        broker.replies.drop_to(Agent::Client(c));
    }
    let cl = n.client_mut(c);
    cl.phase = ClientPhase::Done(exit);
    cl.detect = [None; BROKERS];
    cl.detached = 0;
    cl.resumes_sent = 0;
}

/// One unit of time passes; false when no timer runs (time would pass without effect).
fn tick(n: &mut State) -> bool {
    fn dec(t: &mut u8, any: &mut bool) {
        if *t > 0 {
            *t -= 1;
            *any = true;
        }
    }
    fn dec_opt(t: &mut Option<u8>, any: &mut bool) {
        if let Some(v) = t {
            dec(v, any);
        }
    }
    let mut any = false;
    match &mut n.worker.phase {
        WorkerPhase::Leasing(l) => {
            dec_opt(&mut l.grace, &mut any);
            dec_opt(&mut l.c1_grace, &mut any);
            dec_opt(&mut l.start, &mut any);
        }
        WorkerPhase::HolderWait { left, .. } => dec(left, &mut any),
        WorkerPhase::Offering => {}
    }
    if let Proc::Paused(p) = &mut n.worker.proc {
        dec(p, &mut any);
    }
    for d in &mut n.worker.detect {
        dec_opt(d, &mut any);
    }
    for cl in &mut n.clients {
        if let ClientPhase::Holding { grace, .. } = &mut cl.phase {
            dec_opt(grace, &mut any);
        }
        if let Cmd::Dying(k) = &mut cl.cmd {
            dec(k, &mut any);
        }
        if let Proc::Paused(p) = &mut cl.proc {
            dec(p, &mut any);
        }
        for d in &mut cl.detect {
            dec_opt(d, &mut any);
        }
    }
    any
}

impl Model for LeaseModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let broker = Broker {
            up: true,
            queue: JobSet::default(),
            replies: Replies::default(),
        };
        let client = Client {
            proc: Proc::Up,
            phase: ClientPhase::Waiting { lock: None },
            cmd: Cmd::NotStarted,
            detect: [None; BROKERS],
            detached: 0,
            resumed: false,
            gen: 0,
            resumes_sent: 0,
        };
        vec![State {
            brokers: [broker, broker],
            worker: Worker {
                proc: Proc::Up,
                journal: None,
                gen: 0,
                resumes_sent: 0,
                phase: WorkerPhase::Offering,
                detect: [None; BROKERS],
            },
            clients: [client, client],
            faults: self.faults,
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        let steps = self.enabled(s);
        let eager = steps.iter().any(|(a, _)| self.eager(s, *a));
        actions.extend(steps.into_iter().map(|(a, _)| a));
        if !eager && self.step(s, Action::Tick).is_some() {
            actions.push(Action::Tick);
        }
    }

    fn next_state(&self, s: &State, a: Action) -> Option<State> {
        self.step(s, a)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(
                "never two COMMANDs on the TE",
                |_: &LeaseModel, s: &State| s.clients.iter().filter(|c| c.cmd.alive()).count() <= 1,
            ),
            Property::always(
                "never a COMMAND without its lease",
                |_: &LeaseModel, s: &State| {
                    (0..CLIENTS as u8).all(|c| !s.client(c).cmd.alive() || s.held_for(c))
                },
            ),
            Property::always(
                "every lease ends once faults stop",
                |m: &LeaseModel, s: &State| !m.is_final(s) || m.settled(s),
            ),
            Property::sometimes(
                "a resumed lease ends with COMMAND's exit status",
                |_: &LeaseModel, s: &State| {
                    s.clients
                        .iter()
                        .any(|c| c.resumed && c.phase == ClientPhase::Done(Exit::Status))
                },
            ),
            Property::sometimes(
                "both clients run COMMAND, one after the other",
                |_: &LeaseModel, s: &State| s.clients.iter().all(|c| c.cmd != Cmd::NotStarted),
            ),
        ]
    }
}

impl LeaseModel {
    /// No step is possible: every run from here has ended.
    pub fn is_final(&self, s: &State) -> bool {
        let mut actions = Vec::new();
        self.actions(s, &mut actions);
        actions.is_empty()
    }

    /// Every client has finished, no COMMAND runs, and the TE is offered again.
    pub fn settled(&self, s: &State) -> bool {
        s.all_done() && s.clients.iter().all(|c| !c.cmd.alive()) && s.te_free()
    }
}
