//! Fires the core's timers (CAN_DO_TIMEOUT, scheduled jobs, wake checks): the task sleeps until
//! the next deadline and is woken early when an event moves that deadline earlier.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use broker_core::Millis;
use tokio::sync::Notify;

use crate::server::Shared;

/// What the timer task sleeps until, and how to wake it.
pub struct Timer {
    changed: Notify,
    /// The deadline the task sleeps until (`u64::MAX`: none).
    armed: AtomicU64,
}

impl Default for Timer {
    fn default() -> Self {
        Timer {
            changed: Notify::new(),
            armed: AtomicU64::new(u64::MAX),
        }
    }
}

impl Timer {
    /// Called after every event with the core's next deadline: wakes the task if it would
    /// otherwise sleep past it.
    pub fn rearm(&self, next: Option<Millis>) {
        if next.is_some_and(|n| n < self.armed.load(Ordering::Acquire)) {
            self.changed.notify_one();
        }
    }
}

const WALL_CHECK_MS: Millis = 1000;

pub async fn run(shared: Arc<Shared>) {
    let timer = &shared.timer;
    loop {
        // While the next deadline is being read, any event must wake us (a stored permit).
        timer.armed.store(u64::MAX, Ordering::Release);
        let next = shared.with_broker(|b| b.next_deadline(shared.now()));
        timer
            .armed
            .store(next.unwrap_or(u64::MAX), Ordering::Release);
        let Some(at) = next else {
            timer.changed.notified().await;
            continue;
        };
        // Wakes at least every second: a scheduled job is due in wall time, and the core's
        // monotonic estimate of it moves if the wall clock steps.
        let wait = at.saturating_sub(shared.now().mono).min(WALL_CHECK_MS);
        if wait > 0 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                _ = timer.changed.notified() => continue,
            }
        }
        shared.tick();
    }
}
