//! The cross-index invariants of the broker, checked by the tests and the fuzzer after every step.

use super::Broker;
use crate::types::JobState;

impl Broker {
    /// Checks the cross-index invariants; for tests and fuzzing.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut queued = 0;
        let mut running = 0;
        for (name, f) in &self.functions {
            for (p, q) in f.queues().iter().enumerate() {
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
            f.check_tenant_queues(|id| self.jobs.get(&id).and_then(|j| j.tenant().cloned()))
                .map_err(|e| format!("function {}: {e}", String::from_utf8_lossy(name)))?;
            running += f.running();
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
