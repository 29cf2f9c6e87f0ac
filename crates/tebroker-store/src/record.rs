//! What the store keeps: ended leases, TE state changes and ended waits. Times are wall-clock
//! milliseconds since the epoch. No record has a field for a secret: TE data (SSH keys, power
//! credentials) never reaches the store.

use std::fmt;

use serde::Serialize;

/// Milliseconds since the Unix epoch (signed, as both databases store them).
pub type Millis = i64;

/// The wall clock now, in [`Millis`] (0 if the clock is before 1970).
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX))
        .unwrap_or(0)
}

/// Longest text field kept, in bytes; longer remote input is cut at a character boundary so one
/// hostile job identifier cannot bloat the database.
pub const MAX_FIELD_BYTES: usize = 1024;

/// Defines a string-valued enum whose unknown values (written by a newer broker sharing the
/// database) survive a read as `Other`.
macro_rules! text_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $variant,)*
            /// A value this version does not know (stored by a newer one).
            Other(String),
        }

        impl $name {
            /// Every known value, in declaration order.
            pub const KNOWN: &'static [$name] = &[$($name::$variant,)*];

            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $text,)*
                    $name::Other(s) => s,
                }
            }

            /// The value named `s`; an unknown name becomes `Other`.
            pub fn from_text(s: &str) -> $name {
                match s {
                    $($text => $name::$variant,)*
                    other => $name::Other(other.to_string()),
                }
            }

            /// The known value named `s`, or an error listing the known ones (for user input).
            pub fn parse_known(s: &str) -> Result<$name, UnknownValue> {
                match $name::from_text(s) {
                    $name::Other(_) => Err(UnknownValue {
                        kind: stringify!($name),
                        value: s.chars().take(64).collect(),
                        known: $name::KNOWN.iter().map(|v| v.as_str().to_string()).collect(),
                    }),
                    v => Ok(v),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

/// A name that is not one of an enum's known values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?} (known: {})", known.join(", "))]
pub struct UnknownValue {
    pub kind: &'static str,
    pub value: String,
    pub known: Vec<String>,
}

text_enum! {
    /// How a lease ended (the broker's names).
    Outcome {
        /// lockenv completed: the worker released the TE.
        Released = "released",
        /// lockenv failed.
        Failed = "failed",
        /// The worker's connection dropped while it held the TE.
        WorkerLost = "worker lost",
        /// The holder (testenv-client) went away.
        ClientLost = "client lost",
        /// CAN_DO_TIMEOUT fired.
        TimedOut = "timed out",
        /// Ended some other way (the broker shut down with the lease open).
        Ended = "ended",
    }
}

impl Outcome {
    /// Whether this outcome counts against the TE in its failure rate (the agent's quarantine
    /// rule: holder lost, lease timed out, command failed).
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            Outcome::Failed | Outcome::WorkerLost | Outcome::ClientLost | Outcome::TimedOut
        )
    }

    /// The SQL list of failure outcomes, for `outcome IN (...)` (constants, never user input).
    pub(crate) fn failure_sql_list() -> String {
        Outcome::KNOWN
            .iter()
            .filter(|o| o.is_failure())
            .map(|o| format!("'{}'", o.as_str()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

text_enum! {
    /// A TE's state (testenv-agent's states, plus `gone` for a plain worker that disappeared).
    EnvState {
        Provisioning = "provisioning",
        Ready = "ready",
        Leased = "leased",
        Cleaning = "cleaning",
        Unhealthy = "unhealthy",
        Rebuilding = "rebuilding",
        Draining = "draining",
        Drained = "drained",
        Held = "held",
        Failed = "failed",
        Gone = "gone",
    }
}

text_enum! {
    /// A lock request's Gearman priority.
    Priority {
        High = "high",
        Normal = "normal",
        Low = "low",
    }
}

/// A lease that has ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseRecord {
    /// Which broker saw it (several brokers can share one PostgreSQL database).
    pub broker: String,
    pub lockenv_handle: String,
    /// The TE's name (as the worker or agent reports it).
    pub env: String,
    pub worker_id: String,
    pub callback: String,
    pub job_identifier: String,
    pub tenant: String,
    pub priority: Priority,
    pub started_ms: Millis,
    pub ended_ms: Millis,
    pub outcome: Outcome,
}

/// A TE changed state (reported by its agent, or inferred by the broker).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EnvStateChange {
    pub env: String,
    /// The agent or host that serves it.
    pub agent: String,
    pub labels: Vec<String>,
    pub state: EnvState,
    pub since_ms: Millis,
    /// Free text: why (a failed health check, the hold's job identifier, ...).
    pub detail: String,
    /// The job identifier holding it, when leased or held.
    pub holder: Option<String>,
}

/// How a wait for a TE ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "end", rename_all = "snake_case")]
pub enum WaitEnd {
    Granted { at_ms: Millis, env: String },
    Abandoned { at_ms: Millis },
}

impl WaitEnd {
    pub fn at_ms(&self) -> Millis {
        match self {
            WaitEnd::Granted { at_ms, .. } | WaitEnd::Abandoned { at_ms } => *at_ms,
        }
    }
}

/// A lock request that has stopped waiting: granted a TE, or abandoned by its client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WaitRecord {
    pub job_identifier: String,
    pub tenant: String,
    pub priority: Priority,
    /// The function (or label) it waited on, e.g. `lockenv` or `lockenv:ovb`.
    pub function: String,
    pub queued_ms: Millis,
    #[serde(flatten)]
    pub end: WaitEnd,
}

impl WaitRecord {
    /// How long it waited (0 if the clock went backwards).
    pub fn waited_ms(&self) -> Millis {
        self.end
            .at_ms()
            .checked_sub(self.queued_ms)
            .unwrap_or(0)
            .max(0)
    }
}

text_enum! {
    /// How the broker keeps a plain TE out of rotation.
    PauseKind {
        /// Until undrained.
        Drain = "drain",
        /// Until released, or until its end.
        Hold = "hold",
    }
}

/// A plain TE the broker itself keeps out of rotation (`drain` / `hold` of a testenv-worker with
/// no agent), kept so a restarted broker keeps it so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TePause {
    pub kind: PauseKind,
    pub since_ms: Millis,
    /// When a hold given a duration ends.
    pub until_ms: Option<Millis>,
}

/// TE `env` of broker `broker` is now paused as `pause`, or (None) back in rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PauseRecord {
    pub broker: String,
    pub env: String,
    pub pause: Option<TePause>,
}

/// Anything the store keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    Lease(LeaseRecord),
    EnvState(EnvStateChange),
    Wait(WaitRecord),
    Pause(PauseRecord),
}

impl From<PauseRecord> for Record {
    fn from(r: PauseRecord) -> Record {
        Record::Pause(r)
    }
}

impl From<LeaseRecord> for Record {
    fn from(r: LeaseRecord) -> Record {
        Record::Lease(r)
    }
}
impl From<EnvStateChange> for Record {
    fn from(r: EnvStateChange) -> Record {
        Record::EnvState(r)
    }
}
impl From<WaitRecord> for Record {
    fn from(r: WaitRecord) -> Record {
        Record::Wait(r)
    }
}

/// A record with the key that makes writing it idempotent: `origin` names the writer (random
/// per [`StoreWriter`](crate::StoreWriter)), `seq` counts its records. A batch retried after a
/// commit whose answer was lost writes nothing twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamped {
    origin: i64,
    seq: i64,
    record: Record,
}

impl Stamped {
    /// Keys `record`, and makes its text storable: NUL characters (which PostgreSQL refuses, and
    /// which would poison every retry of the batch) become U+FFFD, and overlong fields are cut to
    /// [`MAX_FIELD_BYTES`].
    pub fn new(origin: i64, seq: i64, mut record: Record) -> Stamped {
        match &mut record {
            Record::Lease(l) => {
                for s in [
                    &mut l.broker,
                    &mut l.lockenv_handle,
                    &mut l.env,
                    &mut l.worker_id,
                    &mut l.callback,
                    &mut l.job_identifier,
                    &mut l.tenant,
                ] {
                    clean(s);
                }
                clean_enum_other(&mut l.priority);
                if let Outcome::Other(s) = &mut l.outcome {
                    clean(s);
                }
            }
            Record::EnvState(e) => {
                for s in [&mut e.env, &mut e.agent, &mut e.detail] {
                    clean(s);
                }
                e.labels.iter_mut().for_each(clean);
                if let Some(h) = &mut e.holder {
                    clean(h);
                }
                if let EnvState::Other(s) = &mut e.state {
                    clean(s);
                }
            }
            Record::Wait(w) => {
                for s in [&mut w.job_identifier, &mut w.tenant, &mut w.function] {
                    clean(s);
                }
                clean_enum_other(&mut w.priority);
                if let WaitEnd::Granted { env, .. } = &mut w.end {
                    clean(env);
                }
            }
            Record::Pause(p) => {
                clean(&mut p.broker);
                clean(&mut p.env);
                if let Some(TePause {
                    kind: PauseKind::Other(s),
                    ..
                }) = &mut p.pause
                {
                    clean(s);
                }
            }
        }
        Stamped {
            origin,
            seq,
            record,
        }
    }

    pub fn origin(&self) -> i64 {
        self.origin
    }
    pub fn seq(&self) -> i64 {
        self.seq
    }
    pub fn record(&self) -> &Record {
        &self.record
    }
}

fn clean_enum_other(p: &mut Priority) {
    if let Priority::Other(s) = p {
        clean(s);
    }
}

fn clean(s: &mut String) {
    if s.contains('\0') {
        *s = s.replace('\0', "\u{FFFD}");
    }
    if s.len() > MAX_FIELD_BYTES {
        let mut end = MAX_FIELD_BYTES;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Labels as stored: a JSON array of strings (the same text in both databases).
pub(crate) fn labels_to_text(labels: &[String]) -> String {
    serde_json::to_string(labels).unwrap_or_else(|_| "[]".to_string())
}

pub(crate) fn labels_from_text(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_names_round_trip_and_unknown_ones_survive() {
        for o in Outcome::KNOWN {
            assert_eq!(&Outcome::from_text(o.as_str()), o);
        }
        assert_eq!(
            Outcome::from_text("vanished"),
            Outcome::Other("vanished".into())
        );
        let err = Outcome::parse_known("vanished").unwrap_err();
        assert!(err.to_string().contains("worker lost"), "{err}");
        assert_eq!(EnvState::parse_known("drained"), Ok(EnvState::Drained));
    }

    #[test]
    fn stamping_removes_nul_and_cuts_long_fields_at_a_char_boundary() {
        let long = "é".repeat(MAX_FIELD_BYTES); // 2 bytes each
        let w = WaitRecord {
            job_identifier: "a\0b".into(),
            tenant: long,
            priority: Priority::Normal,
            function: "lockenv".into(),
            queued_ms: 1,
            end: WaitEnd::Abandoned { at_ms: 0 },
        };
        let s = Stamped::new(1, 1, w.into());
        let Record::Wait(w) = s.record() else {
            unreachable!()
        };
        assert_eq!(w.job_identifier, "a\u{FFFD}b");
        assert_eq!(w.tenant.len(), MAX_FIELD_BYTES);
        assert_eq!(w.waited_ms(), 0, "a clock that went backwards is no wait");
    }
}
