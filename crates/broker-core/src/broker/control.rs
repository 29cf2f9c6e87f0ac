//! Relaying an agent's answer to a control command back to whoever asked.
//!
//! `drain|undrain|hold|release|rebuild` for an agent's TE is queued as a background job of the
//! agent's control function ([`Broker::control_env`]); the agent completes it with its
//! [`ControlReply`]. The asker — an admin connection or an API caller of the network layer —
//! waits for that reply, at most [`CONTROL_REPLY_TIMEOUT_MS`]: an agent that has gone, or never
//! takes the job, gets a clear timeout instead of an endless wait.
//!
//! Admin answers keep the order of the commands: while a control command of a connection waits,
//! that connection's later admin answers wait behind it.

use std::collections::{BTreeSet, VecDeque};

use gearman_proto::{Packet, PacketType};
use rustc_hash::FxHashMap;
use testenv_proto::agent::{ControlOp, ControlReply};

use super::{pop_due, Broker, ControlError, ControlTarget};
use crate::types::{Action, ConnId, JobId, JobState, Millis};

/// How long an asker waits for the agent's reply.
pub const CONTROL_REPLY_TIMEOUT_MS: Millis = 10_000;

/// Longest agent message relayed (a reply is remote input).
const MAX_MESSAGE: usize = 1024;

/// Who waits for the agent's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ControlWaiter {
    /// An admin connection: the reply is its answer line.
    Admin(ConnId),
    /// A caller of the network layer, told by [`Action::ControlDone`] with this token.
    Edge(u64),
}

/// How a control command forwarded to an agent ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlOutcome {
    /// The agent answered: `ok` false is a refusal, `message` its reason.
    Replied {
        agent: String,
        ok: bool,
        message: String,
    },
    /// The agent's worker failed the job, or answered something that is not a reply.
    Failed { agent: String, why: String },
    /// No answer within [`CONTROL_REPLY_TIMEOUT_MS`]. `delivered`: the agent had taken the
    /// command (it may still carry it out); otherwise it was withdrawn and will not be.
    TimedOut { agent: String, delivered: bool },
}

impl ControlOutcome {
    /// The admin protocol's answer line.
    pub fn admin_line(&self, op: ControlOp, env: &str) -> String {
        let err = |code: &str, text: String| format!("ERR {code} {}\r\n", text.replace(' ', "+"));
        match self {
            ControlOutcome::Replied {
                agent,
                ok: true,
                message,
            } => format!("OK {} {env}: agent {agent}: {message}\n", op.as_str()),
            ControlOutcome::Replied {
                agent,
                ok: false,
                message,
            } => err("refused", format!("agent {agent}: {message}")),
            ControlOutcome::Failed { agent, why } => {
                err("agent_failed", format!("agent {agent}: {why}"))
            }
            ControlOutcome::TimedOut { .. } => err("agent_timeout", self.timeout_text()),
        }
    }

    /// Why a timed-out command got no answer, for people.
    pub fn timeout_text(&self) -> String {
        match self {
            ControlOutcome::TimedOut {
                agent,
                delivered: true,
            } => format!(
                "agent {agent} took the command but did not answer within {}s; it may still carry it out",
                CONTROL_REPLY_TIMEOUT_MS / 1000
            ),
            ControlOutcome::TimedOut { agent, .. } => format!(
                "agent {agent} did not take the command within {}s; withdrawn, nothing was done",
                CONTROL_REPLY_TIMEOUT_MS / 1000
            ),
            _ => String::new(),
        }
    }
}

/// A forwarded command whose reply someone waits for.
#[derive(Debug)]
struct Pending {
    waiter: ControlWaiter,
    agent: String,
    op: ControlOp,
    env: String,
    deadline: Millis,
}

/// One admin answer of a connection, in command order.
#[derive(Debug)]
enum Slot {
    Ready(String),
    Waiting(JobId),
}

/// The commands waiting for their agent's reply.
#[derive(Debug, Default)]
pub(crate) struct ControlRelay {
    pending: FxHashMap<JobId, Pending>,
    deadlines: BTreeSet<(Millis, JobId)>,
    /// Admin connections with a command waiting, and the answers queued behind it.
    admin_answers: FxHashMap<ConnId, VecDeque<Slot>>,
}

impl ControlRelay {
    pub(crate) fn next_deadline(&self) -> Option<Millis> {
        self.deadlines.first().map(|&(t, _)| t)
    }
}

/// One line of at most [`MAX_MESSAGE`] bytes, control characters shown as spaces.
fn one_line(text: &str) -> String {
    let mut s: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

impl Broker {
    /// [`Broker::control_env`] at `now`, and for an agent's TE, `waiter` is told the agent's
    /// reply (or the timeout). The plain-TE and error cases answer at once, as the result.
    #[allow(clippy::too_many_arguments)]
    pub fn control_env_awaiting(
        &mut self,
        op: ControlOp,
        env: &str,
        hold_secs: Option<u64>,
        requested_by: &str,
        waiter: ControlWaiter,
        now: crate::Now,
        out: &mut Vec<Action>,
    ) -> Result<ControlTarget, ControlError> {
        // The reply deadline and a hold's end count from now, not from the last event.
        self.now = self.now.advanced_to(now);
        let target = self.control_env(op, env, hold_secs, requested_by, out)?;
        if let ControlTarget::Agent { agent, handle } = &target {
            if let Some(id) = self.job_id_of_handle(handle.as_bytes()) {
                let deadline = self.now.mono.saturating_add(CONTROL_REPLY_TIMEOUT_MS);
                self.controls.pending.insert(
                    id,
                    Pending {
                        waiter,
                        agent: agent.clone(),
                        op,
                        env: env.to_string(),
                        deadline,
                    },
                );
                self.controls.deadlines.insert((deadline, id));
                if let ControlWaiter::Admin(conn) = waiter {
                    self.controls
                        .admin_answers
                        .entry(conn)
                        .or_default()
                        .push_back(Slot::Waiting(id));
                }
            }
        }
        Ok(target)
    }

    /// An admin answer for `conn`: sent now, or queued behind a control command still waiting.
    pub(crate) fn admin_answer(&mut self, conn: ConnId, text: String, out: &mut Vec<Action>) {
        match self.controls.admin_answers.get_mut(&conn) {
            Some(queue) => queue.push_back(Slot::Ready(text)),
            None => out.push(Action::Text(conn, text)),
        }
    }

    /// A worker ended job `id` with `p` (WORK_COMPLETE, WORK_FAIL or WORK_EXCEPTION): if it was
    /// a control command someone waits for, they get the agent's reply.
    pub(super) fn control_job_ended(&mut self, id: JobId, p: &Packet, out: &mut Vec<Action>) {
        let Some(pending) = self.controls.pending.remove(&id) else {
            return;
        };
        self.controls.deadlines.remove(&(pending.deadline, id));
        let agent = pending.agent.clone();
        let outcome = match p.ptype {
            PacketType::WorkComplete => match serde_json::from_slice::<ControlReply>(p.arg(1)) {
                Ok(reply) => ControlOutcome::Replied {
                    agent,
                    ok: reply.ok,
                    message: one_line(&reply.message),
                },
                Err(e) => ControlOutcome::Failed {
                    agent,
                    why: one_line(&format!("its answer is not a control reply: {e}")),
                },
            },
            PacketType::WorkException => ControlOutcome::Failed {
                agent,
                why: one_line(&format!("exception: {}", String::from_utf8_lossy(p.arg(1)))),
            },
            _ => ControlOutcome::Failed {
                agent,
                why: "its worker failed the job".to_string(),
            },
        };
        tracing::info!(job = id, outcome = ?outcome, "agent answered a control command");
        self.tell_waiter(id, pending, outcome, out);
    }

    /// Control commands whose reply is overdue: their askers hear so, and one no agent has
    /// taken yet is withdrawn (it will not be carried out later, surprising the operator).
    pub(super) fn expire_control_replies(&mut self, out: &mut Vec<Action>) {
        while let Some((_, id)) = pop_due(&mut self.controls.deadlines, self.now.mono) {
            let Some(pending) = self.controls.pending.remove(&id) else {
                continue;
            };
            let delivered = match self.jobs.get(&id).map(|j| j.state) {
                Some(JobState::Running { .. }) => true,
                Some(_) => {
                    self.remove_job(id);
                    false
                }
                None => false,
            };
            let outcome = ControlOutcome::TimedOut {
                agent: pending.agent.clone(),
                delivered,
            };
            tracing::warn!(job = id, agent = %pending.agent, delivered, "no answer from the agent to a control command");
            self.tell_waiter(id, pending, outcome, out);
        }
    }

    fn tell_waiter(
        &mut self,
        id: JobId,
        pending: Pending,
        outcome: ControlOutcome,
        out: &mut Vec<Action>,
    ) {
        match pending.waiter {
            ControlWaiter::Edge(token) => out.push(Action::ControlDone(token, outcome)),
            ControlWaiter::Admin(conn) => {
                let line = outcome.admin_line(pending.op, &pending.env);
                let Some(queue) = self.controls.admin_answers.get_mut(&conn) else {
                    return;
                };
                for slot in queue.iter_mut() {
                    if matches!(slot, Slot::Waiting(j) if *j == id) {
                        *slot = Slot::Ready(line);
                        break;
                    }
                }
                while let Some(Slot::Ready(_)) = queue.front() {
                    if let Some(Slot::Ready(text)) = queue.pop_front() {
                        out.push(Action::Text(conn, text));
                    }
                }
                if queue.is_empty() {
                    self.controls.admin_answers.remove(&conn);
                }
            }
        }
    }
}
