//! The TEs the broker knows, and in what state.
//!
//! Two sources, one list:
//! - **Agents' reports.** A testenv-agent submits an [`AgentReport`] as a background job of
//!   [`REPORT_FUNCTION`]; the broker consumes it (it is never queued) and the report replaces the
//!   agent's previous one. An agent silent for [`REPORT_STALE_SECS`] has its TEs shown as
//!   `unknown`; after [`AGENT_FORGET_SECS`] they are dropped.
//! - **Traffic.** A connection registered for `lockenv*` (a plain testenv-worker or the original
//!   scripts) is one TE, named by its client id (`testenv-worker-te3`) or, without one, by the
//!   connection (`conn-17`): `ready` while it waits for work, `leased` while it runs a lockenv
//!   job, `gone` for [`GONE_KEEP_SECS`] once it disconnects. A connection that serves an agent
//!   control function, or whose client id names a TE an agent reports, is that agent's and is
//!   not listed twice.
//!
//! Plain TEs have no agent to obey `drain` or `hold`, so the broker does it itself: it stops
//! handing lockenv jobs to the TE's connections ([`Inventory::pause`]).
//!
//! Nothing here reads job data beyond the lock request's non-secret fields; reports carry no
//! secrets by construction ([`testenv_proto::agent::EnvReport`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use indexmap::IndexMap;
use serde::Serialize;
use testenv_proto::agent::{AgentReport, EnvState};

use crate::types::{Millis, Now};

pub use testenv_proto::agent::{REPORT_FUNCTION, REPORT_STALE_SECS};

/// How long a plain TE whose connection dropped stays listed as `gone`.
pub const GONE_KEEP_SECS: u64 = 3600;
/// How long an agent that stopped reporting stays listed (as `unknown`).
pub const AGENT_FORGET_SECS: u64 = 10 * REPORT_STALE_SECS;
/// Lease outcomes kept per TE, for `last outcomes` and the failure rate.
pub const OUTCOMES_KEPT: usize = 20;
/// Bounds on what the inventory remembers, whatever the traffic.
pub const MAX_AGENTS: usize = 4096;
const MAX_GONE: usize = 4096;
const MAX_OUTCOME_TES: usize = 16384;

/// Where the broker learned of a TE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvSource {
    /// A testenv-agent's state report.
    Agent,
    /// A connection registered for `lockenv*` (plain testenv-worker, original scripts).
    Worker,
}

/// A TE's state as the broker shows it: an agent's [`EnvState`], or one of the broker's own
/// words for what it cannot know from a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvStatus {
    State(EnvState),
    /// The agent stopped reporting ([`REPORT_STALE_SECS`]).
    Unknown,
    /// A plain TE whose worker connection dropped.
    Gone,
}

impl Serialize for EnvStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl EnvStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EnvStatus::State(s) => s.as_str(),
            EnvStatus::Unknown => "unknown",
            EnvStatus::Gone => "gone",
        }
    }
}

impl std::fmt::Display for EnvStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One TE, for the admin `envs` command, the API and the dashboard.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EnvInfo {
    pub name: String,
    pub source: EnvSource,
    /// The reporting agent; `None` for a plain TE.
    pub agent: Option<String>,
    /// The agent's host, or the plain worker's peer address.
    pub host: String,
    pub labels: Vec<String>,
    pub state: EnvStatus,
    /// When it entered `state`, wall clock, milliseconds since the epoch.
    pub since_ms: u64,
    /// The lease holder's job identifier (or callback), or the held job's.
    pub holder: Option<String>,
    /// Why it is in this state, for people.
    pub detail: Option<String>,
    /// Outcomes of its last leases (at most [`OUTCOMES_KEPT`]), newest first: `released`,
    /// `failed`, `worker lost`, `timed out`, `ended`.
    pub last_outcomes: Vec<&'static str>,
    /// The share of `last_outcomes` that count against the TE (`failed`, `worker lost`,
    /// `timed out`; not `released`, nor `ended` by the broker); `None` before its first lease.
    pub failure_rate: Option<f64>,
    /// The worker connections serving it (plain TEs; agent TEs whose client id is the TE name).
    pub connections: Vec<u64>,
}

impl EnvInfo {
    /// `NAME STATE SECS_IN_STATE HOLDER AGENT HOST LABELS FAILURE_RATE LAST_OUTCOMES`,
    /// tab-separated; lists are comma-separated, missing values empty.
    pub fn admin_line(&self, now: Now) -> String {
        format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            self.name,
            self.state,
            now.wall.saturating_sub(self.since_ms) / 1000,
            self.holder.as_deref().unwrap_or_default(),
            self.agent.as_deref().unwrap_or_default(),
            self.host,
            self.labels.join(","),
            self.failure_rate
                .map(|r| format!("{r:.2}"))
                .unwrap_or_default(),
            self.last_outcomes.join(","),
        )
    }
}

/// Why a plain TE gets no lockenv jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseKind {
    Drain,
    Hold,
}

/// A plain TE the broker keeps out of rotation, in wall-clock times: what a store keeps so a
/// restarted broker keeps it so ([`crate::Broker::take_pause_changes`],
/// [`crate::Broker::restore_pauses`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainPause {
    pub kind: PauseKind,
    pub since_ms: Millis,
    /// When a hold given a duration ends.
    pub until_ms: Option<Millis>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Pause {
    pub kind: PauseKind,
    pub since_wall: Millis,
    /// Monotonic end of a hold given a duration.
    pub until: Option<Millis>,
}

#[derive(Debug)]
pub(crate) struct AgentEntry {
    pub report: AgentReport,
    /// When the last report came (monotonic).
    pub received_mono: Millis,
}

#[derive(Debug, Clone)]
pub(crate) struct GoneEnv {
    pub host: String,
    pub labels: Vec<String>,
    pub since_wall: Millis,
    pub since_mono: Millis,
}

#[derive(Debug, Default)]
pub(crate) struct Inventory {
    pub agents: BTreeMap<String, AgentEntry>,
    /// Plain TEs whose connections dropped, by name, oldest first.
    pub gone: IndexMap<String, GoneEnv>,
    /// Lease outcomes by TE name (the lease's worker client id), newest last.
    outcomes: IndexMap<String, VecDeque<&'static str>>,
    /// Plain TEs the broker keeps out of rotation, by name (changed only through `pause`,
    /// `unpause` and `end_due_holds`, which note the change for a store).
    pub paused: BTreeMap<String, Pause>,
    /// TEs paused or unpaused since the last `take_pause_changes`.
    pause_changes: BTreeSet<String>,
}

impl Inventory {
    /// Stores an accepted report; the agent's previous one is replaced.
    pub fn report(&mut self, report: AgentReport, now: Now) {
        self.forget_silent_agents(now);
        if self.agents.len() >= MAX_AGENTS && !self.agents.contains_key(&report.agent) {
            tracing::warn!(agent = %report.agent, "too many agents; report dropped");
            return;
        }
        self.agents.insert(
            report.agent.clone(),
            AgentEntry {
                report,
                received_mono: now.mono,
            },
        );
    }

    fn forget_silent_agents(&mut self, now: Now) {
        self.agents
            .retain(|_, a| !is_older_than(a.received_mono, now, AGENT_FORGET_SECS));
    }

    /// Whether an agent is silent for longer than [`REPORT_STALE_SECS`].
    pub fn is_stale(entry: &AgentEntry, now: Now) -> bool {
        is_older_than(entry.received_mono, now, REPORT_STALE_SECS)
    }

    /// Agents (listed now) that report a TE named `name`.
    pub fn agents_reporting(&self, name: &str, now: Now) -> Vec<&AgentEntry> {
        self.agents
            .values()
            .filter(|a| !is_older_than(a.received_mono, now, AGENT_FORGET_SECS))
            .filter(|a| a.report.envs.iter().any(|e| e.name == name))
            .collect()
    }

    pub fn lease_ended(&mut self, te: &str, outcome: &'static str) {
        let kept = match self.outcomes.get_mut(te) {
            Some(kept) => kept,
            None => {
                if self.outcomes.len() >= MAX_OUTCOME_TES {
                    self.outcomes.shift_remove_index(0);
                }
                self.outcomes.entry(te.to_string()).or_default()
            }
        };
        if kept.len() == OUTCOMES_KEPT {
            kept.pop_front();
        }
        kept.push_back(outcome);
    }

    /// (last outcomes newest first, failure rate) of TE `te`.
    pub fn outcomes_of(&self, te: &str) -> (Vec<&'static str>, Option<f64>) {
        let Some(kept) = self.outcomes.get(te) else {
            return (Vec::new(), None);
        };
        let failed = kept
            .iter()
            .filter(|&&o| !matches!(o, "released" | "ended"))
            .count();
        let rate = (!kept.is_empty()).then(|| failed as f64 / kept.len() as f64);
        (kept.iter().rev().copied().collect(), rate)
    }

    /// A plain TE's last connection dropped.
    pub fn worker_gone(&mut self, name: String, gone: GoneEnv, now: Now) {
        self.gone
            .retain(|_, g| !is_older_than(g.since_mono, now, GONE_KEEP_SECS));
        self.gone.shift_remove(&name);
        if self.gone.len() >= MAX_GONE {
            self.gone.shift_remove_index(0);
        }
        self.gone.insert(name, gone);
    }

    /// Gone TEs still worth listing.
    pub fn recently_gone(&self, now: Now) -> impl Iterator<Item = (&String, &GoneEnv)> {
        self.gone
            .iter()
            .filter(move |(_, g)| !is_older_than(g.since_mono, now, GONE_KEEP_SECS))
    }

    /// Whether plain TE `name` is kept out of rotation at `now`.
    pub fn is_paused(&self, name: &str, now: Now) -> bool {
        self.paused
            .get(name)
            .is_some_and(|p| p.until.is_none_or(|until| now.mono < until))
    }

    /// The next monotonic time a hold ends.
    pub fn next_hold_end(&self) -> Option<Millis> {
        self.paused.values().filter_map(|p| p.until).min()
    }

    /// Ends the holds due at `now`; returns the TEs back in rotation.
    pub fn end_due_holds(&mut self, now: Now) -> Vec<String> {
        let due: Vec<String> = self
            .paused
            .iter()
            .filter(|(_, p)| p.until.is_some_and(|until| until <= now.mono))
            .map(|(name, _)| name.clone())
            .collect();
        for name in &due {
            self.unpause(name);
        }
        due
    }

    pub fn pause(&mut self, name: String, pause: Pause) {
        self.pause_changes.insert(name.clone());
        self.paused.insert(name, pause);
    }

    pub fn unpause(&mut self, name: &str) {
        if self.paused.remove(name).is_some() {
            self.pause_changes.insert(name.to_string());
        }
    }

    /// The TEs paused or unpaused since the last call, each with its pause now (None: back in
    /// rotation), in wall-clock times as of `now`.
    pub fn take_pause_changes(&mut self, now: Now) -> Vec<(String, Option<PlainPause>)> {
        if self.pause_changes.is_empty() {
            return Vec::new();
        }
        std::mem::take(&mut self.pause_changes)
            .into_iter()
            .map(|name| {
                let pause = self.paused.get(&name).map(|p| PlainPause {
                    kind: p.kind,
                    since_ms: p.since_wall,
                    until_ms: p
                        .until
                        .map(|until| now.wall.saturating_add(until.saturating_sub(now.mono))),
                });
                (name, pause)
            })
            .collect()
    }

    /// Pauses kept from before a restart. A hold whose end has passed is not restored (and
    /// noted as ended, so the store forgets it).
    pub fn restore_pauses(&mut self, pauses: Vec<(String, PlainPause)>, now: Now) {
        for (name, p) in pauses {
            let until = match p.until_ms {
                Some(end) if end <= now.wall => {
                    self.pause_changes.insert(name);
                    continue;
                }
                Some(end) => Some(now.mono.saturating_add(end.saturating_sub(now.wall))),
                None => None,
            };
            let pause = Pause {
                kind: p.kind,
                since_wall: p.since_ms,
                until,
            };
            self.paused.insert(name, pause);
        }
    }
}

fn is_older_than(at_mono: Millis, now: Now, secs: u64) -> bool {
    now.mono.saturating_sub(at_mono) > secs.saturating_mul(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_bounded_and_the_rate_counts_everything_but_released() {
        let mut inv = Inventory::default();
        assert_eq!(inv.outcomes_of("te1"), (vec![], None));
        for _ in 0..OUTCOMES_KEPT {
            inv.lease_ended("te1", "released");
        }
        inv.lease_ended("te1", "failed");
        inv.lease_ended("te1", "worker lost");
        let (last, rate) = inv.outcomes_of("te1");
        assert_eq!(last.len(), OUTCOMES_KEPT);
        assert_eq!(&last[..3], &["worker lost", "failed", "released"]);
        assert_eq!(rate, Some(2.0 / OUTCOMES_KEPT as f64));
    }

    #[test]
    fn holds_end_on_time_and_drains_do_not() {
        let mut inv = Inventory::default();
        let now = Now {
            mono: 1000,
            wall: 5,
        };
        inv.paused.insert(
            "a".into(),
            Pause {
                kind: PauseKind::Hold,
                since_wall: 5,
                until: Some(3000),
            },
        );
        inv.paused.insert(
            "b".into(),
            Pause {
                kind: PauseKind::Drain,
                since_wall: 5,
                until: None,
            },
        );
        assert!(inv.is_paused("a", now) && inv.is_paused("b", now));
        assert_eq!(inv.next_hold_end(), Some(3000));
        let later = Now {
            mono: 3000,
            wall: 7,
        };
        assert!(!inv.is_paused("a", later));
        assert_eq!(inv.end_due_holds(later), vec!["a".to_string()]);
        assert!(inv.is_paused("b", later));
        assert_eq!(inv.next_hold_end(), None);
    }

    #[test]
    fn pauses_go_to_a_store_in_wall_time_and_come_back_from_it() {
        let mut inv = Inventory::default();
        let now = Now {
            mono: 1_000,
            wall: 1_700_000_000_000,
        };
        inv.pause(
            "held".into(),
            Pause {
                kind: PauseKind::Hold,
                since_wall: now.wall,
                until: Some(now.mono + 60_000),
            },
        );
        inv.pause(
            "drained".into(),
            Pause {
                kind: PauseKind::Drain,
                since_wall: now.wall,
                until: None,
            },
        );
        inv.pause(
            "back".into(),
            Pause {
                kind: PauseKind::Drain,
                since_wall: now.wall,
                until: None,
            },
        );
        inv.unpause("back");
        let changes = inv.take_pause_changes(now);
        let hold = PlainPause {
            kind: PauseKind::Hold,
            since_ms: now.wall,
            until_ms: Some(now.wall + 60_000),
        };
        assert_eq!(
            changes,
            vec![
                ("back".to_string(), None),
                (
                    "drained".to_string(),
                    Some(PlainPause {
                        kind: PauseKind::Drain,
                        since_ms: now.wall,
                        until_ms: None
                    })
                ),
                ("held".to_string(), Some(hold.clone())),
            ]
        );
        assert_eq!(
            inv.take_pause_changes(now),
            vec![],
            "each change is handed out once"
        );
        inv.unpause("never-paused");
        assert_eq!(inv.take_pause_changes(now), vec![]);

        // A restarted broker, 30 s later on the wall clock, a fresh monotonic clock.
        let mut after = Inventory::default();
        let restart = Now {
            mono: 5,
            wall: now.wall + 30_000,
        };
        let over = PlainPause {
            until_ms: Some(now.wall + 10_000),
            ..hold.clone()
        };
        after.restore_pauses(vec![("held".into(), hold), ("over".into(), over)], restart);
        assert!(after.is_paused("held", restart) && !after.is_paused("over", restart));
        assert_eq!(
            after.next_hold_end(),
            Some(restart.mono + 30_000),
            "its end kept"
        );
        assert_eq!(
            after.take_pause_changes(restart),
            vec![("over".to_string(), None)],
            "the hold that ended while the broker was down is forgotten in the store too"
        );
    }

    #[test]
    fn states_serialise_as_words() {
        for (status, word) in [
            (EnvStatus::State(EnvState::Ready), "\"ready\""),
            (EnvStatus::Unknown, "\"unknown\""),
            (EnvStatus::Gone, "\"gone\""),
        ] {
            assert_eq!(serde_json::to_string(&status).unwrap(), word);
        }
    }
}
