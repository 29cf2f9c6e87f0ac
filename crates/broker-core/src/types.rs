//! Types every part of the core shares.

/// Milliseconds, on one of the two clocks of [`Now`].
pub type Millis = u64;

/// The time, as the network layer reads it before each call into the core.
///
/// Durations and deadlines (CAN_DO_TIMEOUT, wake checks, how long a lease is held) use the
/// monotonic clock, so an NTP step can neither fire nor stall them. The wall clock is used only
/// for what is defined in wall time (SUBMIT_JOB_EPOCH, SUBMIT_JOB_SCHED) or shown to people
/// (when a lease started and ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Now {
    /// Monotonic milliseconds since an arbitrary origin fixed for the broker's life.
    pub mono: Millis,
    /// Milliseconds since the Unix epoch; may jump either way.
    pub wall: Millis,
}

impl Now {
    /// `later` with the monotonic part never going backwards (callers may race to the lock).
    pub(crate) fn advanced_to(self, later: Now) -> Now {
        Now {
            mono: self.mono.max(later.mono),
            wall: later.wall,
        }
    }
}
