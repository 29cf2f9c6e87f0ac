//! The broker's notion of time at the edge.

use std::time::{SystemTime, UNIX_EPOCH};

use broker_core::Millis;

#[derive(Debug, Clone, Copy)]
pub struct Clock;

impl Clock {
    pub fn start() -> Clock {
        Clock
    }

    pub fn now(&self) -> Millis {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as Millis)
            .unwrap_or(0)
    }
}
