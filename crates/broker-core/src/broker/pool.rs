//! The broker's side of the TE pool: agents' state reports consumed into the inventory, the
//! inventory snapshot, and operators' control commands (forwarded to the TE's agent, or applied
//! by the broker itself to a plain testenv-worker).

use bytes::Bytes;
use gearman_proto::{Packet, PacketType};
use rustc_hash::FxHashMap;
use testenv_proto::agent::{
    control_function, AgentReport, ControlCommand, ControlOp, EnvState, CONTROL_PREFIX,
};

use super::{Broker, Conn};
use crate::inventory::{
    EnvInfo, EnvSource, EnvStatus, GoneEnv, Inventory, Pause, PauseKind, PlainPause,
};
use crate::testenv::{te_name, LeaseRecord, LOCKENV_PREFIX};
use crate::types::{show, Action, ConnId, JobId};

/// Who a control command reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlTarget {
    /// Queued as background job `handle` of the agent's control function.
    Agent { agent: String, handle: String },
    /// A plain TE: the broker itself changed whether it gets lockenv jobs.
    Broker,
}

/// Why a control command was not carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlError {
    /// No TE of that name is known.
    UnknownTe(String),
    /// Several agents report a TE of that name; name it `AGENT/TE`.
    AmbiguousTe(String),
    /// The TE's agent serves no control function now.
    AgentUnreachable(String),
    /// Plain TEs have no agent to run this (e.g. `rebuild`).
    NotSupported(String),
}

impl ControlError {
    /// The admin protocol's error code and text.
    pub fn code_and_text(&self) -> (&'static str, String) {
        match self {
            ControlError::UnknownTe(te) => ("unknown_te", format!("no TE named {te}")),
            ControlError::AmbiguousTe(te) => (
                "ambiguous_te",
                format!("several agents report {te}; name it AGENT/{te}"),
            ),
            ControlError::AgentUnreachable(agent) => (
                "agent_unreachable",
                format!("agent {agent} serves no {}", control_function(agent)),
            ),
            ControlError::NotSupported(why) => ("not_supported", why.clone()),
        }
    }
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (code, text) = self.code_and_text();
        write!(f, "{code}: {text}")
    }
}

impl std::error::Error for ControlError {}

/// The TE a connection is, if it serves lockenv as a plain worker (not for an agent).
fn plain_te_name(id: ConnId, c: &Conn) -> Option<String> {
    let mut lockenv = false;
    for name in c.abilities.keys() {
        if name.starts_with(CONTROL_PREFIX.as_bytes()) {
            return None;
        }
        lockenv |= name.starts_with(LOCKENV_PREFIX);
    }
    lockenv.then(|| conn_te_name(id, c))
}

/// A worker connection's TE name: its client id, or `conn-N` without one.
fn conn_te_name(id: ConnId, c: &Conn) -> String {
    te_name(id, &String::from_utf8_lossy(&c.client_id))
}

/// The labels a worker registered (`lockenv:<label>`).
fn labels_of(c: &Conn) -> Vec<String> {
    let prefix = testenv_proto::agent::label_function("");
    c.abilities
        .keys()
        .filter_map(|f| f.strip_prefix(prefix.as_bytes()))
        .filter(|l| !l.is_empty())
        .map(show)
        .collect()
}

impl Broker {
    /// A SUBMIT_JOB* to [`crate::REPORT_FUNCTION`]: an agent's report, consumed here and never
    /// queued. A foreground submitter also gets WORK_COMPLETE at once.
    pub(super) fn consume_report(
        &mut self,
        conn: ConnId,
        data: &[u8],
        background: bool,
        out: &mut Vec<Action>,
    ) {
        let report = match AgentReport::parse(data) {
            Ok(r) => r,
            Err(e) => {
                self.stats.agent_reports_refused += 1;
                tracing::warn!(%conn, error = %e, "agent report refused");
                return self.reply_error(conn, "INVALID_REPORT", &e.0, out);
            }
        };
        self.stats.agent_reports += 1;
        tracing::debug!(%conn, agent = %report.agent, envs = report.envs.len(), "agent report");
        self.inventory.report(report, self.now);
        let id = self.next_job;
        self.next_job += 1;
        let handle = Bytes::from(format!("{}{id}", self.handle_prefix));
        out.push(Action::Send(
            conn,
            Packet::res(PacketType::JobCreated, [handle.clone()]),
        ));
        if !background {
            out.push(Action::Send(
                conn,
                Packet::res(PacketType::WorkComplete, [handle, Bytes::new()]),
            ));
        }
    }

    /// A lease ended: its TE's outcomes and since-time follow.
    pub(super) fn lease_ended(&mut self, id: JobId, handle: &[u8]) {
        let Some((worker, ended)) = self.leases.job_ended(id, handle, self.now) else {
            return;
        };
        self.inventory.lease_ended(&ended.env, ended.outcome);
        if let Some(c) = self.conns.get_mut(&worker) {
            c.te_since = self.now.wall;
        }
    }

    /// Before connection `id` goes: a plain TE served by no other connection is listed as gone.
    pub(super) fn note_gone_worker(&mut self, id: ConnId, c: &Conn) {
        let Some(name) = plain_te_name(id, c) else {
            return;
        };
        let still_served = self
            .conns
            .iter()
            .any(|(&other, oc)| other != id && plain_te_name(other, oc).as_deref() == Some(&name));
        if still_served {
            return;
        }
        let gone = GoneEnv {
            host: c.peer.clone(),
            labels: labels_of(c),
            since_wall: self.now.wall,
            since_mono: self.now.mono,
        };
        self.inventory.worker_gone(name, gone, self.now);
    }

    /// Every TE the broker knows, sorted by name (then agent).
    pub fn envs(&self, now: crate::Now) -> Vec<EnvInfo> {
        let now = self.now.advanced_to(now);
        let mut envs = Vec::new();
        let by_worker: FxHashMap<ConnId, &LeaseRecord> =
            self.leases.active().map(|(_, r)| (r.worker, r)).collect();
        let mut conns_by_name: FxHashMap<String, Vec<ConnId>> = FxHashMap::default();
        for (&id, c) in &self.conns {
            if c.abilities.keys().any(|f| f.starts_with(LOCKENV_PREFIX)) {
                conns_by_name
                    .entry(conn_te_name(id, c))
                    .or_default()
                    .push(id);
            }
        }
        let mut reported = rustc_hash::FxHashSet::default();
        for entry in self.inventory.agents.values() {
            if self.agent_forgotten(entry, now) {
                continue;
            }
            let stale = Inventory::is_stale(entry, now);
            let report = &entry.report;
            for env in &report.envs {
                reported.insert(env.name.as_str());
                let (last_outcomes, failure_rate) = self.inventory.outcomes_of(&env.name);
                let silent_secs = now.mono.saturating_sub(entry.received_mono) / 1000;
                let mut connections: Vec<u64> = conns_by_name
                    .get(&env.name)
                    .map(|v| v.iter().map(|c| c.0).collect())
                    .unwrap_or_default();
                connections.sort_unstable();
                envs.push(EnvInfo {
                    name: env.name.clone(),
                    source: EnvSource::Agent,
                    agent: Some(report.agent.clone()),
                    host: report.host.clone(),
                    labels: env.labels.clone(),
                    state: if stale {
                        EnvStatus::Unknown
                    } else {
                        EnvStatus::State(env.state)
                    },
                    since_ms: env.since_ms,
                    holder: env.holder.clone(),
                    detail: if stale {
                        Some(format!(
                            "no report from agent {} for {silent_secs}s (last state {})",
                            report.agent, env.state
                        ))
                    } else {
                        env.detail.clone()
                    },
                    last_outcomes,
                    failure_rate,
                    connections,
                });
            }
        }
        let mut plain: FxHashMap<String, EnvInfo> = FxHashMap::default();
        let mut ids: Vec<&ConnId> = self.conns.keys().collect();
        ids.sort_unstable();
        for &id in ids {
            let c = &self.conns[&id];
            let Some(name) = plain_te_name(id, c) else {
                continue;
            };
            if reported.contains(name.as_str()) {
                continue;
            }
            let lease = by_worker.get(&id);
            let pause = self
                .inventory
                .paused
                .get(&name)
                .filter(|_| self.inventory.is_paused(&name, now));
            let (state, since_ms) = match (lease, pause) {
                (Some(_), Some(p)) if p.kind == PauseKind::Drain => {
                    (EnvState::Draining, p.since_wall)
                }
                (Some(r), _) => (EnvState::Leased, r.since.wall),
                (None, Some(p)) if p.kind == PauseKind::Drain => (EnvState::Drained, p.since_wall),
                (None, Some(p)) => (EnvState::Held, p.since_wall),
                (None, None) => (EnvState::Ready, c.te_since),
            };
            let holder = lease.map(|r| {
                if r.request.job_identifier.is_empty() {
                    r.request.callback.clone()
                } else {
                    r.request.job_identifier.clone()
                }
            });
            let detail = match pause {
                Some(p) if p.kind == PauseKind::Hold => Some(match p.until {
                    Some(until) => format!(
                        "held by the broker for {}s more",
                        until.saturating_sub(now.mono) / 1000
                    ),
                    None => "held by the broker until released".to_string(),
                }),
                Some(_) => Some("drained by the broker: gets no lockenv jobs".to_string()),
                None => None,
            };
            match plain.get_mut(&name) {
                // Several connections with one client id: one TE; a lease wins over idle.
                Some(info) => {
                    info.connections.push(id.0);
                    if lease.is_some() && info.holder.is_none() {
                        info.state = EnvStatus::State(state);
                        info.since_ms = since_ms;
                        info.holder = holder;
                    }
                }
                None => {
                    let (last_outcomes, failure_rate) = self.inventory.outcomes_of(&name);
                    plain.insert(
                        name.clone(),
                        EnvInfo {
                            name,
                            source: EnvSource::Worker,
                            agent: None,
                            host: c.peer.clone(),
                            labels: labels_of(c),
                            state: EnvStatus::State(state),
                            since_ms,
                            holder,
                            detail,
                            last_outcomes,
                            failure_rate,
                            connections: vec![id.0],
                        },
                    );
                }
            }
        }
        for (name, g) in self.inventory.recently_gone(now) {
            if plain.contains_key(name) || reported.contains(name.as_str()) {
                continue;
            }
            let (last_outcomes, failure_rate) = self.inventory.outcomes_of(name);
            plain.insert(
                name.clone(),
                EnvInfo {
                    name: name.clone(),
                    source: EnvSource::Worker,
                    agent: None,
                    host: g.host.clone(),
                    labels: g.labels.clone(),
                    state: EnvStatus::Gone,
                    since_ms: g.since_wall,
                    holder: None,
                    detail: Some("its worker connection closed".to_string()),
                    last_outcomes,
                    failure_rate,
                    connections: Vec::new(),
                },
            );
        }
        envs.extend(plain.into_values());
        envs.sort_by(|a, b| (&a.name, &a.agent).cmp(&(&b.name, &b.agent)));
        envs
    }

    /// TEs that are new or changed state, holder or since-time since the last call (all of them
    /// on the first call): for a store of TE state changes. Changes between two calls collapse
    /// into the latest; TEs no longer listed are dropped silently (their last state was `gone`
    /// or `unknown`).
    pub fn take_env_changes(&mut self, now: crate::Now) -> Vec<EnvInfo> {
        let envs = self.envs(now);
        let mut changed = Vec::new();
        let mut marks = FxHashMap::default();
        for env in envs {
            let key = (env.name.clone(), env.agent.clone());
            let mark = EnvMark {
                state: env.state,
                holder: env.holder.clone(),
                since_ms: env.since_ms,
            };
            if self.last_envs.get(&key) != Some(&mark) {
                changed.push(env);
            }
            marks.insert(key, mark);
        }
        self.last_envs = marks;
        changed
    }

    fn agent_forgotten(&self, entry: &crate::inventory::AgentEntry, now: crate::Now) -> bool {
        now.mono.saturating_sub(entry.received_mono)
            > crate::inventory::AGENT_FORGET_SECS.saturating_mul(1000)
    }

    /// Carries out `drain|undrain|hold|release|rebuild` for TE `env` (`TE` or `AGENT/TE`): an
    /// agent's TE gets a [`ControlCommand`] queued for its agent; a plain TE's `drain`/`hold` keep
    /// lockenv jobs from its connections (`hold_secs`: for that long), `undrain`/`release` end
    /// either. `requested_by` goes to the agent's log. No ACL check here: callers check.
    pub fn control_env(
        &mut self,
        op: ControlOp,
        env: &str,
        hold_secs: Option<u64>,
        requested_by: &str,
        out: &mut Vec<Action>,
    ) -> Result<ControlTarget, ControlError> {
        let target = self.resolve_env(env)?;
        match target {
            Resolved::Agent { agent, te } => {
                let function = control_function(&agent);
                if self
                    .functions
                    .get(function.as_bytes())
                    .is_none_or(|f| f.workers.is_empty())
                {
                    return Err(ControlError::AgentUnreachable(agent));
                }
                let command = ControlCommand {
                    op,
                    env: te.clone(),
                    hold_secs,
                    requested_by: Some(requested_by.to_string()),
                };
                let handle = self.enqueue_background(
                    Bytes::from(function),
                    Bytes::from(command.to_json()),
                    out,
                );
                self.stats.env_controls += 1;
                tracing::info!(%agent, te = %te, op = op.as_str(), by = requested_by, handle = %show(&handle), "control command forwarded to agent");
                Ok(ControlTarget::Agent {
                    agent,
                    handle: show(&handle),
                })
            }
            Resolved::Plain(name) => {
                match op {
                    ControlOp::Drain | ControlOp::Hold => {
                        let kind = if op == ControlOp::Drain {
                            PauseKind::Drain
                        } else {
                            PauseKind::Hold
                        };
                        let until = hold_secs
                            .filter(|_| kind == PauseKind::Hold)
                            .map(|s| self.now.mono.saturating_add(s.saturating_mul(1000)));
                        self.inventory.pause(
                            name.clone(),
                            Pause {
                                kind,
                                since_wall: self.now.wall,
                                until,
                            },
                        );
                    }
                    ControlOp::Undrain | ControlOp::Release => {
                        self.inventory.unpause(&name);
                        self.wake_te(&name, out);
                    }
                    ControlOp::Rebuild | ControlOp::Status => {
                        return Err(ControlError::NotSupported(format!(
                            "{name} is a plain testenv-worker: only a testenv-agent can {}",
                            op.as_str()
                        )))
                    }
                }
                self.stats.env_controls += 1;
                tracing::info!(te = %name, op = op.as_str(), by = requested_by, "plain TE control applied by the broker");
                Ok(ControlTarget::Broker)
            }
        }
    }

    fn resolve_env(&self, env: &str) -> Result<Resolved, ControlError> {
        let now = self.now;
        if let Some((agent, te)) = env.split_once('/') {
            let known = self.inventory.agents.get(agent).is_some_and(|a| {
                !self.agent_forgotten(a, now) && a.report.envs.iter().any(|e| e.name == te)
            });
            return if known {
                Ok(Resolved::Agent {
                    agent: agent.to_string(),
                    te: te.to_string(),
                })
            } else {
                Err(ControlError::UnknownTe(env.to_string()))
            };
        }
        match self.inventory.agents_reporting(env, now).as_slice() {
            [one] => {
                return Ok(Resolved::Agent {
                    agent: one.report.agent.clone(),
                    te: env.to_string(),
                })
            }
            [] => {}
            _ => return Err(ControlError::AmbiguousTe(env.to_string())),
        }
        let plain = self
            .conns
            .iter()
            .any(|(&id, c)| plain_te_name(id, c).as_deref() == Some(env))
            || self.inventory.recently_gone(now).any(|(n, _)| n == env)
            || self.inventory.paused.contains_key(env);
        if plain {
            Ok(Resolved::Plain(env.to_string()))
        } else {
            Err(ControlError::UnknownTe(env.to_string()))
        }
    }

    /// Whether worker `conn` may be handed jobs of `function` now: not lockenv jobs while its
    /// TE is drained or held by the broker.
    pub(super) fn may_take(&self, conn: ConnId, function: &[u8]) -> bool {
        if self.inventory.paused.is_empty() || !function.starts_with(LOCKENV_PREFIX) {
            return true;
        }
        let Some(c) = self.conns.get(&conn) else {
            return false;
        };
        !self.inventory.is_paused(&conn_te_name(conn, c), self.now)
    }

    /// Tells the sleeping connections of plain TE `name` of waiting work (it is back in rotation).
    fn wake_te(&mut self, name: &str, out: &mut Vec<Action>) {
        let mut ids: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(&id, c)| c.sleeping && conn_te_name(id, c) == name)
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        for id in ids {
            let waiting = self.conns[&id]
                .abilities
                .keys()
                .any(|f| self.has_work_for(f) && self.may_take(id, f));
            if waiting {
                self.set_awake(id);
                self.send_noop(id, out);
            }
        }
    }

    /// The plain TEs paused or unpaused since the last call, each with its pause now (None:
    /// back in rotation): for a store, so a restarted broker keeps them out of rotation.
    pub fn take_pause_changes(&mut self, now: crate::Now) -> Vec<(String, Option<PlainPause>)> {
        let now = self.now.advanced_to(now);
        self.inventory.take_pause_changes(now)
    }

    /// Plain TEs drained or held before a restart (from the store): kept out of rotation again
    /// (a hold until its end, if it has one and it has not passed).
    pub fn restore_pauses(&mut self, pauses: Vec<(String, PlainPause)>, now: crate::Now) {
        self.now = self.now.advanced_to(now);
        self.inventory.restore_pauses(pauses, self.now);
    }

    /// Holds given a duration that are over: their TEs are back in rotation.
    pub(super) fn end_due_holds(&mut self, out: &mut Vec<Action>) {
        if self
            .inventory
            .next_hold_end()
            .is_none_or(|t| t > self.now.mono)
        {
            return;
        }
        for name in self.inventory.end_due_holds(self.now) {
            tracing::info!(te = %name, "broker-side hold ended");
            self.wake_te(&name, out);
        }
    }
}

/// What makes a TE's row a new state change.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EnvMark {
    state: EnvStatus,
    holder: Option<String>,
    since_ms: u64,
}

enum Resolved {
    Agent { agent: String, te: String },
    Plain(String),
}
