//! A function's queues, counts and workers. The counts change only through [`Function::enter`]
//! and [`Function::leave`], which the broker calls as one of the function's jobs changes state,
//! so they cannot drift from the jobs.
//!
//! Lock requests (jobs of `lockenv*`, which carry a tenant) are also kept per tenant, and of
//! equal priority are handed out round-robin across tenants, FIFO within each
//! ([`TenantQueues`]): one busy project cannot starve the rest. Other functions are plain FIFO.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use indexmap::IndexSet;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::types::{ConnId, JobId, JobState, Priority};

#[derive(Debug, Default)]
pub(crate) struct Function {
    /// Queued jobs by priority, each ordered by sequence number (FIFO; requeues jump the line).
    queues: [BTreeMap<i64, JobId>; 3],
    running: usize,
    scheduled: usize,
    pub workers: FxHashSet<ConnId>,
    pub sleeping: IndexSet<ConnId>,
    pub unique: FxHashMap<Bytes, JobId>,
    pub max_queue: Option<[i64; 3]>,
    /// The same queued jobs per tenant, for jobs that carry one (lock requests).
    fair: [TenantQueues; 3],
}

/// Queued jobs of one priority by tenant, and the order tenants are served in: the tenant at
/// the front of `turns` is next; once served it goes to the back (if it still waits), and a
/// tenant that starts waiting joins at the back. So with `n` tenants waiting, none is passed
/// over more than `n - 1` times in a row.
#[derive(Debug, Default)]
struct TenantQueues {
    turns: VecDeque<Bytes>,
    by_tenant: FxHashMap<Bytes, BTreeMap<i64, JobId>>,
}

impl TenantQueues {
    fn insert(&mut self, tenant: &Bytes, seq: i64, id: JobId) {
        let queue = self.by_tenant.entry(tenant.clone()).or_default();
        if queue.is_empty() {
            self.turns.push_back(tenant.clone());
        }
        queue.insert(seq, id);
    }

    fn remove(&mut self, tenant: &Bytes, seq: i64) {
        let Some(queue) = self.by_tenant.get_mut(tenant) else {
            return;
        };
        queue.remove(&seq);
        if queue.is_empty() {
            self.by_tenant.remove(tenant);
            if let Some(i) = self.turns.iter().position(|t| t == tenant) {
                self.turns.remove(i);
            }
        }
    }

    fn head(&self) -> Option<(i64, JobId)> {
        let tenant = self.turns.front()?;
        self.by_tenant[tenant]
            .first_key_value()
            .map(|(&seq, &id)| (seq, id))
    }

    /// `tenant`'s head job was handed out: its turn is over.
    fn served(&mut self, tenant: &Bytes) {
        if self.turns.front() == Some(tenant) {
            self.turns.pop_front();
            if self.by_tenant.contains_key(tenant) {
                self.turns.push_back(tenant.clone());
            }
        }
    }

    /// How many queued jobs are handed out before `tenant`'s job `seq`, if no new one comes:
    /// every tenant gets one job per round, starting from the front of `turns`.
    fn ahead_of(&self, tenant: &Bytes, seq: i64) -> Option<usize> {
        let rounds = self.by_tenant.get(tenant)?.range(..seq).count();
        let turn = self.turns.iter().position(|t| t == tenant)?;
        let mut ahead = rounds;
        for (i, t) in self.turns.iter().enumerate() {
            let len = self.by_tenant[t].len();
            if i < turn {
                ahead += len.min(rounds + 1);
            } else if i > turn {
                ahead += len.min(rounds);
            }
        }
        Some(ahead)
    }

    fn len(&self) -> usize {
        self.by_tenant.values().map(BTreeMap::len).sum()
    }
}

impl Function {
    /// Job `id` of this function, of `tenant` if it has one, is now in `state`.
    pub fn enter(
        &mut self,
        id: JobId,
        priority: Priority,
        tenant: Option<&Bytes>,
        state: JobState,
    ) {
        match state {
            JobState::Queued { seq } => {
                self.queues[priority as usize].insert(seq, id);
                if let Some(t) = tenant {
                    self.fair[priority as usize].insert(t, seq, id);
                }
            }
            JobState::Scheduled { .. } => self.scheduled += 1,
            JobState::Running { .. } => self.running += 1,
        }
    }

    /// A job of this function is no longer in `state`.
    pub fn leave(&mut self, priority: Priority, tenant: Option<&Bytes>, state: JobState) {
        match state {
            JobState::Queued { seq } => {
                self.queues[priority as usize].remove(&seq);
                if let Some(t) = tenant {
                    self.fair[priority as usize].remove(t, seq);
                }
            }
            JobState::Scheduled { .. } => self.scheduled -= 1,
            JobState::Running { .. } => self.running -= 1,
        }
    }

    /// Queued jobs by priority (high, normal, low), each in the order they are handed out.
    pub fn queues(&self) -> &[BTreeMap<i64, JobId>; 3] {
        &self.queues
    }

    pub fn queued(&self) -> usize {
        self.queues.iter().map(BTreeMap::len).sum()
    }

    pub fn running(&self) -> usize {
        self.running
    }

    pub fn scheduled(&self) -> usize {
        self.scheduled
    }

    pub fn is_unused(&self) -> bool {
        self.workers.is_empty()
            && self.running == 0
            && self.scheduled == 0
            && self.max_queue.is_none()
            && self.queues.iter().all(BTreeMap::is_empty)
    }

    /// The job a worker should get next from this function: (priority, seq, id).
    pub fn head(&self) -> Option<(usize, i64, JobId)> {
        self.queues.iter().enumerate().find_map(|(p, q)| {
            let (seq, id) = self.fair[p]
                .head()
                .or_else(|| q.first_key_value().map(|(&seq, &id)| (seq, id)))?;
            Some((p, seq, id))
        })
    }

    /// The head job of `priority`, of `tenant`, was handed out (see [`TenantQueues`]).
    pub fn served(&mut self, priority: Priority, tenant: &Bytes) {
        self.fair[priority as usize].served(tenant);
    }

    /// How many queued jobs of `priority` go before job `seq` (of `tenant`, if it has one).
    pub fn ahead_in_priority(&self, priority: Priority, tenant: Option<&Bytes>, seq: i64) -> usize {
        let p = priority as usize;
        tenant
            .and_then(|t| self.fair[p].ahead_of(t, seq))
            .unwrap_or_else(|| self.queues[p].range(..seq).count())
    }

    /// The per-tenant queues hold exactly the tenant jobs of the main queues, each tenant with
    /// jobs waiting has one turn, and no other does. For [`crate::Broker::check_invariants`];
    /// `tenant_of` gives a queued job's tenant.
    pub fn check_tenant_queues(
        &self,
        tenant_of: impl Fn(JobId) -> Option<Bytes>,
    ) -> Result<(), String> {
        for (p, fair) in self.fair.iter().enumerate() {
            let with_tenant = self.queues[p]
                .values()
                .filter(|&&id| tenant_of(id).is_some())
                .count();
            if fair.len() != with_tenant {
                return Err(format!(
                    "{} jobs in tenant queues, {with_tenant} queued with a tenant",
                    fair.len()
                ));
            }
            for (tenant, queue) in &fair.by_tenant {
                if queue.is_empty() {
                    return Err("an empty tenant queue is kept".into());
                }
                if fair.turns.iter().filter(|t| *t == tenant).count() != 1 {
                    return Err("a waiting tenant does not have exactly one turn".into());
                }
                for (seq, &id) in queue {
                    if self.queues[p].get(seq) != Some(&id)
                        || tenant_of(id).as_ref() != Some(tenant)
                    {
                        return Err(format!("job {id} in the wrong tenant queue"));
                    }
                }
            }
            if fair.turns.len() != fair.by_tenant.len() {
                return Err("a tenant with nothing waiting has a turn".into());
            }
        }
        Ok(())
    }
}
