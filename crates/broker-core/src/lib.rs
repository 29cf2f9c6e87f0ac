//! The broker's state machine, with no I/O and no clock of its own.
//!
//! The network layer feeds it [`Broker::connect`], [`Broker::packet`], [`Broker::admin`],
//! [`Broker::disconnect`] and [`Broker::tick`], passing the current time in; each call appends the
//! resulting [`Action`]s (packets or text to send, connections to close) to an output vector.
//! Unit tests drive it exactly the same way, without sockets.

pub mod acl;
mod admin;
mod broker;
mod function;
mod inventory;
mod schedule;
mod security;
mod snapshot;
mod testenv;
mod types;

pub use broker::{
    Broker, BrokerConfig, ControlError, ControlOutcome, ControlTarget, ControlWaiter, RunningJobs,
    Stats, CONTROL_REPLY_TIMEOUT_MS, WAKE_RETRY_MS,
};
pub use inventory::{
    EnvInfo, EnvSource, EnvStatus, PauseKind, PlainPause, AGENT_FORGET_SECS, GONE_KEEP_SECS,
    OUTCOMES_KEPT, REPORT_FUNCTION, REPORT_STALE_SECS,
};
pub use schedule::next_cron_match;
pub use security::{Security, CALLBACK_PREFIX};
pub use snapshot::{ConnectionInfo, FunctionStatus, Metric, WaitingRequest};
pub use testenv::{EndedLease, EndedWait, Lease, HISTORY_LEN};
pub use types::{Action, ConnId, Millis, Now};
