//! Types every part of the core shares: connections, jobs, actions and time.

use bytes::Bytes;
use gearman_proto::Packet;

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

/// A connection, numbered by the network layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

pub(crate) type JobId = u64;

/// Something the network layer must do on the broker's behalf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send(ConnId, Packet),
    Text(ConnId, String),
    /// Close the connection once what was queued for it has been written.
    Close(ConnId),
    Shutdown {
        graceful: bool,
    },
    /// The agent's answer to a control command the network layer asked for with
    /// [`crate::ControlWaiter::Edge`] and this token (or its timeout).
    ControlDone(u64, crate::ControlOutcome),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Priority {
    High = 0,
    Normal = 1,
    Low = 2,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobState {
    Queued {
        seq: i64,
    },
    /// Due at this wall-clock time.
    Scheduled {
        at: Millis,
    },
    Running {
        worker: ConnId,
        /// Monotonic time the worker's CAN_DO_TIMEOUT ends.
        deadline: Option<Millis>,
    },
}

#[derive(Debug)]
pub(crate) struct Job {
    pub handle: Bytes,
    pub function: Bytes,
    pub unique: Bytes,
    pub data: Bytes,
    pub priority: Priority,
    pub background: bool,
    /// Foreground clients attached to this job; each gets every result packet.
    pub clients: Vec<ConnId>,
    pub state: JobState,
    pub numerator: Bytes,
    pub denominator: Bytes,
    pub retries: u32,
    /// When it was submitted.
    pub submitted: Now,
    /// A lock request's non-secret fields; `None` for other functions' jobs.
    pub lock: Option<Box<LeaseRequest>>,
}

impl Job {
    /// A lock request's tenant (empty: the shared one); `None` for other jobs, which are not
    /// queued per tenant.
    pub fn tenant(&self) -> Option<&Bytes> {
        self.lock.as_ref().map(|l| &l.tenant)
    }
}

/// The non-secret fields of a `lockenv` request (never `ssh_key`), as
/// `crate::testenv::lease_request` reads them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct LeaseRequest {
    pub callback: String,
    pub job_identifier: String,
    pub timeout_secs: Option<u64>,
    /// Empty for the shared tenant.
    pub tenant: Bytes,
}

/// Bytes shown in logs: lossy UTF-8.
pub(crate) fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A decimal number in a packet argument (surrounding spaces allowed).
pub(crate) fn parse_num<T: std::str::FromStr>(b: &[u8]) -> Option<T> {
    std::str::from_utf8(b).ok()?.trim().parse().ok()
}
