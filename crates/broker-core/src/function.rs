//! A function's queues, counts and workers. The counts change only through [`Function::enter`]
//! and [`Function::leave`], which the broker calls as one of the function's jobs changes state,
//! so they cannot drift from the jobs.

use std::collections::BTreeMap;

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
}

impl Function {
    /// Job `id` of this function is now in `state`.
    pub fn enter(&mut self, id: JobId, priority: Priority, state: JobState) {
        match state {
            JobState::Queued { seq } => {
                self.queues[priority as usize].insert(seq, id);
            }
            JobState::Scheduled { .. } => self.scheduled += 1,
            JobState::Running { .. } => self.running += 1,
        }
    }

    /// A job of this function is no longer in `state`.
    pub fn leave(&mut self, priority: Priority, state: JobState) {
        match state {
            JobState::Queued { seq } => {
                self.queues[priority as usize].remove(&seq);
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
        self.queues
            .iter()
            .enumerate()
            .find_map(|(p, q)| q.first_key_value().map(|(&seq, &id)| (p, seq, id)))
    }
}
