//! Graceful shutdown: once draining, no new work is handed out while running jobs finish.

use super::Broker;

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

impl Broker {
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
    pub(super) fn may_hand_out(&self, function: &[u8]) -> bool {
        !self.shutting_down || self.leases.is_active_callback(function)
    }

    /// Whether a worker of `function` has a job to grab.
    pub(super) fn has_work_for(&self, function: &[u8]) -> bool {
        self.functions.get(function).is_some_and(|f| f.queued() > 0) && self.may_hand_out(function)
    }
}
