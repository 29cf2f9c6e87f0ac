//! Structured views of the broker's state for the operator surface (JSON API, metrics); the
//! admin text protocol renders the same facts in gearmand's formats.

use serde::Serialize;

use crate::broker::Broker;
use crate::testenv::Lease;
use crate::types::{show, JobState, Now};

/// One number the broker exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Metric {
    pub name: &'static str,
    pub value: u64,
    /// A counter only goes up; otherwise it is a gauge.
    pub counter: bool,
    pub help: &'static str,
}

/// A function's queues, as `status` and `prioritystatus` show them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FunctionStatus {
    pub name: String,
    pub queued_high: usize,
    pub queued_normal: usize,
    pub queued_low: usize,
    pub scheduled: usize,
    pub running: usize,
    pub workers: usize,
}

/// A lock request waiting for a TE (for the API's queue view).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WaitingRequest {
    pub handle: String,
    pub function: String,
    pub callback: String,
    pub job_identifier: String,
    /// Empty for the shared tenant.
    pub tenant: String,
    /// `high`, `normal` or `low`.
    pub priority: &'static str,
    /// 1-based place in the order its function's requests will be served in (as `position`).
    pub position: usize,
    /// How long it has waited, in milliseconds.
    pub waited_ms: u64,
}

/// A connection, as `workers` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectionInfo {
    pub id: u64,
    pub peer: String,
    pub client_id: String,
    pub identity: Option<String>,
    pub functions: Vec<String>,
    pub running_jobs: usize,
}

impl Broker {
    pub fn metrics(&self) -> Vec<Metric> {
        let s = &self.stats;
        let gauge = |name, value: usize, help| Metric {
            name,
            value: value as u64,
            counter: false,
            help,
        };
        let counter = |name, value, help| Metric {
            name,
            value,
            counter: true,
            help,
        };
        vec![
            gauge("connections", self.conns.len(), "Open connections"),
            gauge(
                "functions",
                self.functions.len(),
                "Functions with workers, jobs or limits",
            ),
            gauge("jobs", self.jobs.len(), "Jobs queued, scheduled or running"),
            gauge(
                "leases",
                self.leases.active_count(),
                "Test environments leased now",
            ),
            gauge(
                "callback_reservations",
                self.callbacks.len(),
                "callback_* names reserved by the hijack protection",
            ),
            counter("jobs_submitted", s.jobs_submitted, "Jobs created"),
            counter(
                "jobs_completed",
                s.jobs_completed,
                "Jobs ended by WORK_COMPLETE",
            ),
            counter(
                "jobs_failed",
                s.jobs_failed,
                "Jobs ended by failure, exception, lost worker or timeout",
            ),
            counter(
                "jobs_requeued",
                s.jobs_requeued,
                "Background jobs requeued after losing their worker",
            ),
            counter(
                "jobs_timed_out",
                s.jobs_timed_out,
                "Jobs failed by CAN_DO_TIMEOUT",
            ),
            counter(
                "protocol_errors",
                s.protocol_errors,
                "ERROR packets sent for bad requests",
            ),
            counter(
                "frames_too_large",
                s.frames_too_large,
                "Connections closed for an oversized frame",
            ),
            counter(
                "admin_lines_too_long",
                s.admin_lines_too_long,
                "Connections closed for an overlong admin line",
            ),
            counter(
                "connections_refused",
                s.connections_refused,
                "Connections refused at the connection limit",
            ),
            counter(
                "functions_refused",
                s.functions_refused,
                "CAN_DOs refused at the per-connection limit",
            ),
            counter("queue_full", s.queue_full, "Submits refused by maxqueue"),
            counter(
                "slow_readers_closed",
                s.slow_readers_closed,
                "Connections closed for not reading their replies",
            ),
            counter(
                "partial_packet_timeouts",
                s.partial_packet_timeouts,
                "Connections closed for an unfinished packet",
            ),
            counter(
                "tls_handshake_failures",
                s.tls_handshake_failures,
                "Failed TLS handshakes",
            ),
            counter(
                "acl_register_denied",
                s.acl_register_denied,
                "CAN_DOs denied by the ACL",
            ),
            counter(
                "acl_invoke_denied",
                s.acl_invoke_denied,
                "Submits denied by the ACL",
            ),
            counter(
                "acl_admin_denied",
                s.acl_admin_denied,
                "Admin commands denied by the ACL",
            ),
            counter(
                "callback_hijacks_refused",
                s.callback_hijacks_refused,
                "Second registrations of a callback_* refused",
            ),
            gauge(
                "agents",
                self.inventory.agents.len(),
                "testenv-agents whose reports the broker keeps",
            ),
            counter(
                "agent_reports",
                s.agent_reports,
                "testenv-agent state reports taken into the inventory",
            ),
            counter(
                "agent_reports_refused",
                s.agent_reports_refused,
                "testenv-agent state reports refused as malformed",
            ),
            counter(
                "env_controls",
                s.env_controls,
                "drain/undrain/hold/release/rebuild commands carried out",
            ),
            counter(
                "leases_ended",
                self.leases.ended_count(),
                "Test environment leases ended",
            ),
        ]
    }

    /// The testenv leases held now, longest held first.
    pub fn leases(&self, now: Now) -> Vec<Lease> {
        let mut leases: Vec<Lease> = self
            .leases
            .active()
            .filter_map(|(id, r)| {
                let job = self.jobs.get(id)?;
                debug_assert!(matches!(job.state, JobState::Running { .. }));
                let callback_state = match self.functions.get(r.request.callback.as_bytes()) {
                    Some(f) if f.running() > 0 => "running",
                    Some(f) if f.queued() > 0 => "queued",
                    Some(_) => "waiting",
                    None => "gone",
                };
                let worker_id = self
                    .conns
                    .get(&r.worker)
                    .map(|c| show(&c.client_id))
                    .unwrap_or_default();
                Some(Lease {
                    lockenv_handle: show(&job.handle),
                    worker: r.worker,
                    worker_id,
                    callback: r.request.callback.clone(),
                    job_identifier: r.request.job_identifier.clone(),
                    timeout_secs: r.request.timeout_secs,
                    tenant: show(&r.request.tenant),
                    held_ms: now.mono.saturating_sub(r.since.mono),
                    callback_state,
                })
            })
            .collect();
        leases.sort_by_key(|l| std::cmp::Reverse(l.held_ms));
        leases
    }

    /// The lock requests (`lockenv*` jobs) waiting now, by function, in the order they will
    /// be served. Never shows the request's data beyond its non-secret fields.
    pub fn waiting_requests(&self, now: Now) -> Vec<WaitingRequest> {
        let now = self.now.advanced_to(now);
        let mut v: Vec<WaitingRequest> = Vec::new();
        for (name, f) in &self.functions {
            if !testenv_proto::is_lockenv(name) {
                continue;
            }
            for id in f.queues().iter().flat_map(|q| q.values()) {
                let Some(job) = self.jobs.get(id) else {
                    continue;
                };
                let Some((position, _)) = self.queue_position(&job.handle) else {
                    continue;
                };
                let lock = job.lock.as_deref().cloned().unwrap_or_default();
                v.push(WaitingRequest {
                    handle: show(&job.handle),
                    function: show(name),
                    callback: lock.callback,
                    job_identifier: lock.job_identifier,
                    tenant: show(&lock.tenant),
                    priority: job.priority.as_str(),
                    position,
                    waited_ms: now.mono.saturating_sub(job.submitted.mono),
                });
            }
        }
        v.sort_by(|a, b| (&a.function, a.position).cmp(&(&b.function, b.position)));
        v
    }

    /// Every function, sorted by name.
    pub fn function_status(&self) -> Vec<FunctionStatus> {
        let mut v: Vec<FunctionStatus> = self
            .functions
            .iter()
            .map(|(name, f)| FunctionStatus {
                name: show(name),
                queued_high: f.queues()[0].len(),
                queued_normal: f.queues()[1].len(),
                queued_low: f.queues()[2].len(),
                scheduled: f.scheduled(),
                running: f.running(),
                workers: f.workers.len(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Every connection, by id.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let mut v: Vec<ConnectionInfo> = self
            .conns
            .iter()
            .map(|(id, c)| ConnectionInfo {
                id: id.0,
                peer: c.peer.clone(),
                client_id: show(&c.client_id),
                identity: c.identity.clone(),
                functions: c.abilities.keys().map(|f| show(f)).collect(),
                running_jobs: c.running.len(),
            })
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }
}
