//! What the broker understands of the testenv protocol: a running `lockenv` job is a lease of a
//! test environment by the job whose `callback_name` it carries.
//!
//! Only non-secret fields of the lockenv request are kept (never `ssh_key`), so nothing here can
//! leak a secret into admin output or logs.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;
use serde::Serialize;

use bytes::Bytes;

use crate::types::{show, ConnId, Job, JobId, LeaseRequest, Now, Priority};

/// The function testenv-workers register; a prefix, since deployments add suffixes for pools.
pub const LOCKENV_PREFIX: &[u8] = testenv_proto::LOCKENV.as_bytes();

/// How many ended leases the broker remembers (older ones are only in the history file).
pub const HISTORY_LEN: usize = 1000;

/// One TE lease as the broker sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lease {
    pub lockenv_handle: String,
    #[serde(skip)]
    pub worker: ConnId,
    pub worker_id: String,
    pub callback: String,
    pub job_identifier: String,
    pub timeout_secs: Option<u64>,
    /// The lock request's tenant (empty: the shared one); not in the admin line.
    pub tenant: String,
    pub held_ms: u64,
    /// `queued`, `running` (the holder's command runs) or `gone`.
    pub callback_state: &'static str,
}

impl Lease {
    pub fn admin_line(&self) -> String {
        format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}",
            self.lockenv_handle,
            self.worker_id,
            self.callback,
            self.job_identifier,
            self.held_ms / 1000,
            self.timeout_secs.map(|t| t.to_string()).unwrap_or_default(),
            self.callback_state
        )
    }
}

/// A lease that has ended, for the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndedLease {
    pub lockenv_handle: String,
    /// The TE's name, as `envs` shows it (the worker's client id, or `conn-N` without one).
    pub env: String,
    pub worker_id: String,
    pub callback: String,
    pub job_identifier: String,
    /// Wall clock, milliseconds since the epoch. `ended_ms` is never before `started_ms`, even
    /// if the wall clock stepped back meanwhile.
    pub started_ms: u64,
    pub ended_ms: u64,
    /// How long the request waited for a TE before this lease began (monotonic).
    pub waited_ms: u64,
    /// The lock request's tenant (empty: the shared one).
    pub tenant: String,
    /// `high`, `normal` or `low`.
    pub priority: &'static str,
    /// `released` (lockenv completed), `failed` (lockenv failed), `worker lost` (the worker's
    /// connection dropped), `timed out` (CAN_DO_TIMEOUT) or `ended`.
    pub outcome: &'static str,
}

/// A lock request that stopped waiting: granted a TE, or abandoned (its client went, or it was
/// cancelled).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndedWait {
    /// The function it waited on (`lockenv`, `lockenv:ovb`).
    pub function: String,
    pub job_identifier: String,
    /// Empty for the shared tenant.
    pub tenant: String,
    /// `high`, `normal` or `low`.
    pub priority: &'static str,
    /// Wall clock, milliseconds since the epoch; `ended_ms` is never before `queued_ms`.
    pub queued_ms: u64,
    pub ended_ms: u64,
    /// Measured on the monotonic clock.
    pub waited_ms: u64,
    /// The TE it was granted (as `envs` names it); `None`: abandoned.
    pub granted_env: Option<String>,
}

/// A worker connection's TE name: its client id, or `conn-N` without one.
pub(crate) fn te_name(conn: ConnId, client_id: &str) -> String {
    if client_id.is_empty() || client_id == "-" {
        format!("conn-{conn}")
    } else {
        client_id.to_string()
    }
}

/// Reads a lockenv request's non-secret fields; a missing or malformed field is left empty.
/// The one place that knows the request's JSON; read once, when the request is submitted.
pub(crate) fn lease_request(data: &[u8]) -> LeaseRequest {
    let request = testenv_proto::LockRequest::parse(data).unwrap_or_default();
    LeaseRequest {
        timeout_secs: request.timeout_secs(),
        tenant: Bytes::from(request.tenant.trim().to_string()),
        callback: request.callback_name,
        job_identifier: request.job_identifier,
    }
}

#[derive(Debug)]
pub(crate) struct LeaseRecord {
    pub worker: ConnId,
    worker_id: String,
    pub since: Now,
    pub request: LeaseRequest,
    outcome: &'static str,
    waited_ms: u64,
    priority: Priority,
}

#[derive(Debug, Default)]
pub(crate) struct LeaseTracker {
    active: FxHashMap<JobId, LeaseRecord>,
    history: VecDeque<EndedLease>,
    /// Ended leases the network layer has not yet written to the history file.
    unflushed: Vec<EndedLease>,
    /// Lock requests that stopped waiting, not yet taken by the network layer.
    unflushed_waits: Vec<EndedWait>,
    ended: u64,
}

impl LeaseTracker {
    pub fn job_started(
        &mut self,
        id: JobId,
        job: &Job,
        worker: ConnId,
        worker_id: String,
        now: Now,
    ) {
        if !job.function.starts_with(LOCKENV_PREFIX) {
            return;
        }
        self.active.insert(
            id,
            LeaseRecord {
                worker,
                worker_id,
                outcome: "ended",
                since: now,
                waited_ms: now.mono.saturating_sub(job.submitted.mono),
                priority: job.priority,
                request: job
                    .lock
                    .as_deref()
                    .cloned()
                    .unwrap_or_else(|| lease_request(&job.data)),
            },
        );
        let env = te_name(worker, &self.active[&id].worker_id);
        self.wait_ended(job, now, Some(env));
    }

    /// A lock request stopped waiting: granted TE `env`, or abandoned (`None`).
    pub fn wait_ended(&mut self, job: &Job, now: Now, env: Option<String>) {
        let Some(lock) = job.lock.as_deref() else {
            return;
        };
        if self.unflushed_waits.len() >= HISTORY_LEN * 10 {
            return;
        }
        self.unflushed_waits.push(EndedWait {
            function: show(&job.function),
            job_identifier: lock.job_identifier.clone(),
            tenant: show(&lock.tenant),
            priority: job.priority.as_str(),
            queued_ms: job.submitted.wall,
            ended_ms: now.wall.max(job.submitted.wall),
            waited_ms: now.mono.saturating_sub(job.submitted.mono),
            granted_env: env,
        });
    }

    pub fn take_ended_waits(&mut self) -> Vec<EndedWait> {
        std::mem::take(&mut self.unflushed_waits)
    }

    /// Says how the lease of job `id` (if it is one) is ending, before `job_ended`.
    pub fn set_outcome(&mut self, id: JobId, outcome: &'static str) {
        if let Some(r) = self.active.get_mut(&id) {
            r.outcome = outcome;
        }
    }

    /// The lease of job `id` (if it is one) has ended: returns its worker and record.
    pub fn job_ended(
        &mut self,
        id: JobId,
        handle: &[u8],
        now: Now,
    ) -> Option<(ConnId, &EndedLease)> {
        let r = self.active.remove(&id)?;
        let ended = EndedLease {
            lockenv_handle: show(handle),
            env: te_name(r.worker, &r.worker_id),
            worker_id: r.worker_id,
            callback: r.request.callback,
            job_identifier: r.request.job_identifier,
            started_ms: r.since.wall,
            ended_ms: now.wall.max(r.since.wall),
            waited_ms: r.waited_ms,
            tenant: show(&r.request.tenant),
            priority: r.priority.as_str(),
            outcome: r.outcome,
        };
        self.ended += 1;
        if self.history.len() == HISTORY_LEN {
            self.history.pop_front();
        }
        if self.unflushed.len() < HISTORY_LEN * 10 {
            self.unflushed.push(ended.clone());
        }
        self.history.push_back(ended);
        self.history.back().map(|e| (r.worker, e))
    }

    /// Whether `function` is the callback of a lease held now.
    pub fn is_active_callback(&self, function: &[u8]) -> bool {
        self.active
            .values()
            .any(|r| !r.request.callback.is_empty() && r.request.callback.as_bytes() == function)
    }

    pub fn active_count(&self) -> usize {
        self.active.len()
    }

    pub fn ended_count(&self) -> u64 {
        self.ended
    }

    /// Ended leases, newest first.
    pub fn history(&self) -> Vec<EndedLease> {
        self.history.iter().rev().cloned().collect()
    }

    pub fn take_unflushed(&mut self) -> Vec<EndedLease> {
        std::mem::take(&mut self.unflushed)
    }

    /// The leases held now, by job.
    pub fn active(&self) -> impl Iterator<Item = (&JobId, &LeaseRecord)> {
        self.active.iter()
    }
}
