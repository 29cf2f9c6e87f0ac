//! What the broker understands of the testenv protocol: a running `lockenv` job is a lease of a
//! test environment by the job whose `callback_name` it carries.
//!
//! Only non-secret fields of the lockenv request are kept (never `ssh_key`), so nothing here can
//! leak a secret into admin output or logs.

use rustc_hash::FxHashMap;

use crate::broker::{show, Broker, ConnId, Job, JobId, JobState, Millis};

/// The function testenv-workers register; a prefix, since deployments add suffixes for pools.
pub const LOCKENV_PREFIX: &[u8] = b"lockenv";

/// One TE lease as the broker sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub lockenv_handle: String,
    pub worker: ConnId,
    pub worker_id: String,
    pub callback: String,
    pub job_identifier: String,
    pub timeout_secs: Option<u64>,
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

#[derive(Debug)]
struct LeaseRecord {
    worker: ConnId,
    since: Millis,
    callback: String,
    job_identifier: String,
    timeout_secs: Option<u64>,
}

#[derive(Debug, Default)]
pub(crate) struct LeaseTracker {
    active: FxHashMap<JobId, LeaseRecord>,
}

impl LeaseTracker {
    pub fn job_started(&mut self, id: JobId, job: &Job, worker: ConnId, now: Millis) {
        if !job.function.starts_with(LOCKENV_PREFIX) {
            return;
        }
        let request: serde_json::Value = serde_json::from_slice(&job.data).unwrap_or_default();
        let field = |k: &str| {
            request
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        self.active.insert(
            id,
            LeaseRecord {
                worker,
                since: now,
                callback: field("callback_name"),
                job_identifier: field("job_identifier"),
                timeout_secs: field("timeout").parse().ok(),
            },
        );
    }

    pub fn job_ended(&mut self, id: JobId) {
        self.active.remove(&id);
    }

    pub fn list(&self, broker: &Broker, now: Millis) -> Vec<Lease> {
        let mut leases: Vec<Lease> = self
            .active
            .iter()
            .filter_map(|(id, r)| {
                let job = broker.jobs.get(id)?;
                let callback_state = match broker.functions.get(r.callback.as_bytes()) {
                    Some(f) if f.running > 0 => "running",
                    Some(f) if f.queued() > 0 => "queued",
                    Some(_) => "waiting",
                    None => "gone",
                };
                let worker_id = broker
                    .conns
                    .get(&r.worker)
                    .map(|c| show(&c.client_id))
                    .unwrap_or_default();
                debug_assert!(matches!(job.state, JobState::Running { .. }));
                Some(Lease {
                    lockenv_handle: show(&job.handle),
                    worker: r.worker,
                    worker_id,
                    callback: r.callback.clone(),
                    job_identifier: r.job_identifier.clone(),
                    timeout_secs: r.timeout_secs,
                    held_ms: now.saturating_sub(r.since),
                    callback_state,
                })
            })
            .collect();
        leases.sort_by_key(|l| std::cmp::Reverse(l.held_ms));
        leases
    }
}
