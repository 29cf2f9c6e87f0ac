//! The broker's time at the edge: a monotonic clock for durations and deadlines, the wall clock
//! only for what people see (see [`broker_core::Now`]).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use broker_core::{Millis, Now};

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
}

impl Clock {
    /// A clock whose monotonic milliseconds count from now.
    pub fn start() -> Clock {
        Clock {
            origin: Instant::now(),
        }
    }

    pub fn now(&self) -> Now {
        Now {
            mono: millis(self.origin.elapsed()),
            wall: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(millis)
                .unwrap_or(0),
        }
    }
}

fn millis(d: Duration) -> Millis {
    Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)
}
