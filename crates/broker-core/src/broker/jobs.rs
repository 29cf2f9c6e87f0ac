//! A job's life: submitted (queued or scheduled), handed to a worker, updated, and ended by its
//! worker, its timeout, a lost connection or `cancel job`. Every change of a job's state goes
//! through [`Broker::move_job`] and its two siblings, which keep all indexes in step.

use std::collections::BTreeMap;

use bytes::Bytes;
use gearman_proto::{Magic, Packet, PacketType};

use super::{pop_due, Broker};
use crate::function::Function;
use crate::types::{show, Action, ConnId, Job, JobId, JobState, Millis, Priority};

/// How a SUBMIT_JOB* packet asks for its job to run.
pub(super) enum Submit {
    Foreground(Priority),
    Background(Priority),
    At(Millis),
}

impl Broker {
    pub(super) fn submit(&mut self, conn: ConnId, p: Packet, how: Submit, out: &mut Vec<Action>) {
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
        if function == crate::inventory::REPORT_FUNCTION.as_bytes() {
            let background = !matches!(how, Submit::Foreground(_));
            return self.consume_report(conn, &data, background, out);
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
            if limit > 0 && f.queues()[priority as usize].len() as i64 >= limit {
                self.stats.queue_full += 1;
                tracing::info!(function = %show(&function), limit, "queue full; job refused");
                return self.reply_error(conn, "QUEUE_ERROR", "Job queue is full", out);
            }
        }

        let lock = testenv_proto::is_lockenv(&function)
            .then(|| Box::new(crate::testenv::lease_request(&data)));
        let id = self.next_job;
        self.next_job += 1;
        let handle = Bytes::from(format!("{}{id}", self.handle_prefix));
        if !unique.is_empty() {
            f.unique.insert(unique.clone(), id);
            self.by_unique.insert(unique.clone(), id);
        }
        let state = match at {
            Some(at) => JobState::Scheduled { at },
            None => JobState::Queued {
                seq: self.next_tail_seq(),
            },
        };
        self.add_job(
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
                submitted: self.now,
                lock,
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

    pub(super) fn grab(&mut self, conn: ConnId, reply: PacketType, out: &mut Vec<Action>) {
        self.set_awake(conn);
        self.conn(conn).woken_at = None;
        let c = self.conns.get(&conn).expect("known connection");
        let mut best: Option<(usize, i64, JobId, Option<u32>)> = None;
        for (name, timeout) in &c.abilities {
            if !self.may_hand_out(name) || !self.may_take(conn, name) {
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
        debug_assert_eq!(self.jobs[&id].state, JobState::Queued { seq });
        debug_assert_eq!(self.jobs[&id].priority as usize, p);
        let job = &self.jobs[&id];
        if let Some(tenant) = job.tenant().cloned() {
            let (function, priority) = (job.function.clone(), job.priority);
            if let Some(f) = self.functions.get_mut(&function) {
                f.served(priority, &tenant);
            }
        }
        self.move_job(
            id,
            JobState::Running {
                worker: conn,
                deadline,
            },
        );
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

    /// Looks up a job by handle, checking it runs on `worker`.
    fn running_job_of(&self, worker: ConnId, handle: &[u8]) -> Option<JobId> {
        let id = self.job_id_of_handle(handle)?;
        match self.jobs.get(&id)?.state {
            JobState::Running { worker: w, .. } if w == worker => Some(id),
            _ => None,
        }
    }

    pub(super) fn work_update(&mut self, conn: ConnId, p: Packet, out: &mut Vec<Action>) {
        let Some(id) = self.running_job_of(conn, p.arg(0)) else {
            tracing::debug!(%conn, packet = %p.ptype, "update for a job this worker does not hold; ignored");
            return;
        };
        let job = self.jobs.get_mut(&id).expect("job");
        if p.ptype == PacketType::WorkStatus {
            job.numerator = p.args[1].clone();
            job.denominator = p.args[2].clone();
        }
        forward_to_clients(job, &p, out);
    }

    pub(super) fn work_end(&mut self, conn: ConnId, p: Packet, out: &mut Vec<Action>) {
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
        // WORK_EXCEPTION goes to every client, asked for or not, as geard does: PyPI gear's
        // clients expect it without OPTION_REQ (libgearman's report it as the job's error).
        forward_to_clients(job, &p, out);
        self.control_job_ended(id, &p, out);
        self.remove_job(id);
    }

    /// Scheduled jobs whose (wall-clock) time has come join the back of their queue.
    pub(super) fn queue_due_jobs(&mut self, out: &mut Vec<Action>) {
        while let Some((_, id)) = pop_due(&mut self.schedule, self.now.wall) {
            let Some(job) = self.jobs.get(&id) else {
                continue;
            };
            let function = job.function.clone();
            let seq = self.next_tail_seq();
            self.move_job(id, JobState::Queued { seq });
            self.wake_one(&function, out);
        }
    }

    /// Running jobs past their worker's CAN_DO_TIMEOUT fail.
    pub(super) fn fail_overdue_jobs(&mut self, out: &mut Vec<Action>) {
        while let Some((_, id)) = pop_due(&mut self.timeouts, self.now.mono) {
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

    /// Removes a queued, scheduled or running job from every index.
    pub(crate) fn remove_job(&mut self, id: JobId) {
        let Some(job) = self.jobs.remove(&id) else {
            return;
        };
        if matches!(
            job.state,
            JobState::Queued { .. } | JobState::Scheduled { .. }
        ) {
            self.leases.wait_ended(&job, self.now, None);
        }
        self.leave_state(id, &job.function, job.priority, job.tenant(), job.state);
        let f = self
            .functions
            .get_mut(&job.function)
            .expect("function of job");
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
        self.lease_ended(id, &job.handle);
        self.gc_function(&job.function);
    }

    /// Puts a running background job back at the head of its queue, so it is not lost.
    pub(super) fn requeue_at_head(&mut self, id: JobId, out: &mut Vec<Action>) {
        let seq = self.next_head_seq;
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        self.next_head_seq -= 1;
        self.stats.jobs_requeued += 1;
        job.retries += 1;
        let (function, handle) = (job.function.clone(), job.handle.clone());
        self.move_job(id, JobState::Queued { seq });
        self.leases.set_outcome(id, "worker lost");
        self.lease_ended(id, &handle);
        self.wake_one(&function, out);
    }

    /// Forgets a function nobody uses, so per-client callback functions do not pile up.
    pub(super) fn gc_function(&mut self, function: &[u8]) {
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
                let ahead: usize = f.queues()[..p].iter().map(BTreeMap::len).sum::<usize>()
                    + f.ahead_in_priority(job.priority, job.tenant(), seq);
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

    /// Queues a background job the broker itself submits (a control command for an agent);
    /// returns its handle.
    pub(super) fn enqueue_background(
        &mut self,
        function: Bytes,
        data: Bytes,
        out: &mut Vec<Action>,
    ) -> Bytes {
        let id = self.next_job;
        self.next_job += 1;
        let handle = Bytes::from(format!("{}{id}", self.handle_prefix));
        self.functions.entry(function.clone()).or_default();
        let seq = self.next_tail_seq();
        self.add_job(
            id,
            Job {
                handle: handle.clone(),
                function: function.clone(),
                unique: Bytes::new(),
                data,
                priority: Priority::Normal,
                background: true,
                clients: Vec::new(),
                state: JobState::Queued { seq },
                numerator: Bytes::new(),
                denominator: Bytes::new(),
                retries: 0,
                submitted: self.now,
                lock: None,
            },
        );
        self.stats.jobs_submitted += 1;
        self.wake_one(&function, out);
        handle
    }

    /// The sequence number of a job joining the back of its queue.
    fn next_tail_seq(&mut self) -> i64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Adds a new job in its initial state (queued or scheduled).
    fn add_job(&mut self, id: JobId, job: Job) {
        let (function, priority, state) = (job.function.clone(), job.priority, job.state);
        let tenant = job.tenant().cloned();
        self.jobs.insert(id, job);
        self.enter_state(id, &function, priority, tenant.as_ref(), state);
    }

    /// Moves job `id` to `state`. With [`Broker::add_job`] and [`Broker::remove_job`], the only
    /// way a job changes state, so its function's queues and counts, the timers and its worker's
    /// running set always agree with it.
    fn move_job(&mut self, id: JobId, state: JobState) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let old = std::mem::replace(&mut job.state, state);
        let (function, priority, tenant) =
            (job.function.clone(), job.priority, job.tenant().cloned());
        self.leave_state(id, &function, priority, tenant.as_ref(), old);
        self.enter_state(id, &function, priority, tenant.as_ref(), state);
    }

    fn enter_state(
        &mut self,
        id: JobId,
        function: &[u8],
        priority: Priority,
        tenant: Option<&Bytes>,
        state: JobState,
    ) {
        self.functions
            .get_mut(function)
            .expect("function of job")
            .enter(id, priority, tenant, state);
        match state {
            JobState::Queued { .. } => {}
            JobState::Scheduled { at } => {
                self.schedule.insert((at, id));
            }
            JobState::Running { worker, deadline } => {
                if let Some(d) = deadline {
                    self.timeouts.insert((d, id));
                }
                if let Some(w) = self.conns.get_mut(&worker) {
                    w.running.insert(id);
                }
            }
        }
    }

    fn leave_state(
        &mut self,
        id: JobId,
        function: &[u8],
        priority: Priority,
        tenant: Option<&Bytes>,
        state: JobState,
    ) {
        self.functions
            .get_mut(function)
            .expect("function of job")
            .leave(priority, tenant, state);
        match state {
            JobState::Queued { .. } => {}
            JobState::Scheduled { at } => {
                self.schedule.remove(&(at, id));
            }
            JobState::Running { worker, deadline } => {
                if let Some(d) = deadline {
                    self.timeouts.remove(&(d, id));
                }
                if let Some(w) = self.conns.get_mut(&worker) {
                    w.running.remove(&id);
                }
            }
        }
    }
}

/// Passes a worker's WORK_* packet on to every client attached to `job`.
fn forward_to_clients(job: &Job, p: &Packet, out: &mut Vec<Action>) {
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
