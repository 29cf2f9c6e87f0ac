//! The admin text commands, answered from the broker's state in gearmand's formats.

use std::fmt::Write;

use gearman_proto::{AdminCommand, AdminError};

use testenv_proto::agent::ControlOp;

use crate::broker::{Broker, ControlTarget, ControlWaiter};
use crate::function::Function;
use crate::types::{show, Action, ConnId, Job, JobState, Now};

impl Broker {
    /// One admin text line from `conn`.
    pub fn admin(&mut self, conn: ConnId, line: &str, now: Now, out: &mut Vec<Action>) {
        if let Some(cmd) = PoolCommand::parse(line) {
            match cmd.and_then(|cmd| self.run_pool_admin(conn, cmd, now, out)) {
                Ok(Some(text)) => self.admin_answer(conn, text, out),
                // Answered when the agent replies (see `broker::control`).
                Ok(None) => {}
                Err(e) => self.admin_answer(conn, e.to_line(), out),
            }
            return;
        }
        let reply = match AdminCommand::parse(line) {
            // The regex of `acl grant` is the rest of the line, spaces included: hand over the line.
            Ok(AdminCommand::Acl(_)) => Ok(self.acl_admin(conn, line)),
            Ok(cmd) => match self.admin_denied(conn, &cmd) {
                Some(e) => Err(e),
                None => self.run_admin(cmd, now, out),
            },
            Err(e) => Err(e),
        };
        let text = reply.unwrap_or_else(|e| e.to_line());
        self.admin_answer(conn, text, out);
    }

    fn run_admin(
        &mut self,
        cmd: AdminCommand,
        now: Now,
        out: &mut Vec<Action>,
    ) -> Result<String, AdminError> {
        let mut s = String::new();
        match cmd {
            AdminCommand::Status => {
                for (name, f) in self.sorted_functions() {
                    let total = f.queued() + f.running() + f.scheduled();
                    let _ = writeln!(
                        s,
                        "{}\t{}\t{}\t{}",
                        show(name),
                        total,
                        f.running(),
                        f.workers.len()
                    );
                }
                s.push_str(".\n");
            }
            AdminCommand::PriorityStatus => {
                for (name, f) in self.sorted_functions() {
                    let [h, n, l] = f.queues();
                    let _ = writeln!(
                        s,
                        "{}\t{}\t{}\t{}\t{}",
                        show(name),
                        h.len(),
                        n.len(),
                        l.len(),
                        f.workers.len()
                    );
                }
                s.push_str(".\n");
            }
            AdminCommand::Workers => {
                let mut ids: Vec<_> = self.conns.keys().copied().collect();
                ids.sort();
                for id in ids {
                    let c = &self.conns[&id];
                    let _ = write!(s, "{} {} {} :", id, c.peer, show(&c.client_id));
                    for name in c.abilities.keys() {
                        let _ = write!(s, " {}", show(name));
                    }
                    s.push('\n');
                }
                s.push_str(".\n");
            }
            AdminCommand::ShowJobs => {
                for job in self.sorted_jobs() {
                    let queued = matches!(job.state, JobState::Queued { .. }) as u8;
                    let _ = writeln!(s, "{}\t{}\t0\t{}", show(&job.handle), job.retries, queued);
                }
                s.push_str(".\n");
            }
            AdminCommand::ShowUniqueJobs => {
                for job in self.sorted_jobs() {
                    if !job.unique.is_empty() {
                        let _ = writeln!(s, "{}", show(&job.unique));
                    }
                }
                s.push_str(".\n");
            }
            AdminCommand::Version => s = format!("OK {}\n", self.config.version),
            AdminCommand::GetPid => s = format!("OK {}\n", self.config.pid),
            AdminCommand::Verbose => s = "OK INFO\n".into(),
            AdminCommand::MaxQueue { function, sizes } => {
                self.set_max_queue(function.as_bytes(), sizes);
                s = "OK\r\n".into();
            }
            AdminCommand::CancelJob { handle } => {
                if !self.cancel_queued_background(handle.as_bytes()) {
                    return Err(AdminError::UnknownJob);
                }
                s = "OK\r\n".into();
            }
            AdminCommand::Shutdown { graceful } => {
                if graceful {
                    self.begin_shutdown();
                }
                out.push(Action::Shutdown { graceful });
                s = "OK\n".into();
            }
            AdminCommand::Position { handle } => {
                let (position, total) = self
                    .queue_position(handle.as_bytes())
                    .ok_or(AdminError::UnknownJob)?;
                s = format!("OK {position} {total}\n");
            }
            AdminCommand::Leases => {
                for lease in self.leases(now) {
                    let _ = writeln!(s, "{}", lease.admin_line());
                }
                s.push_str(".\n");
            }
            AdminCommand::Acl(_) => unreachable!("handled in admin()"),
            AdminCommand::Stats => s = self.stats_text(),
        }
        Ok(s)
    }

    /// The answer of a pool command; `None` when it comes later (the agent's reply).
    fn run_pool_admin(
        &mut self,
        conn: ConnId,
        cmd: PoolCommand,
        now: Now,
        out: &mut Vec<Action>,
    ) -> Result<Option<String>, AdminError> {
        self.now = self.now.advanced_to(now);
        match cmd {
            PoolCommand::Envs => {
                let mut s = String::new();
                for env in self.envs(now) {
                    let _ = writeln!(s, "{}", env.admin_line(now));
                }
                s.push_str(".\n");
                Ok(Some(s))
            }
            PoolCommand::Control { op, env, hold_secs } => {
                if let Some(denied) = self.control_denied(conn, &env) {
                    return Err(denied);
                }
                let waiter = ControlWaiter::Admin(conn);
                let by = "tebroker admin";
                match self.control_env_awaiting(op, &env, hold_secs, by, waiter, now, out) {
                    Ok(ControlTarget::Agent { .. }) => Ok(None),
                    Ok(ControlTarget::Broker) => Ok(Some(format!(
                        "OK {} {env} done by the broker (plain testenv-worker)\n",
                        op.as_str()
                    ))),
                    Err(e) => {
                        let (code, text) = e.code_and_text();
                        Err(AdminError::Other(code, text))
                    }
                }
            }
        }
    }

    fn sorted_functions(&self) -> Vec<(&bytes::Bytes, &Function)> {
        let mut v: Vec<_> = self.functions.iter().collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }

    fn sorted_jobs(&self) -> Vec<&Job> {
        let mut ids: Vec<_> = self.jobs.keys().copied().collect();
        ids.sort_unstable();
        ids.iter().map(|id| &self.jobs[id]).collect()
    }

    /// `stats`: every counter and a few gauges, `name<TAB>value`, then `.`.
    pub(crate) fn stats_text(&self) -> String {
        let rows = self.metrics();
        let mut out = String::new();
        for m in rows {
            out.push_str(m.name);
            out.push('\t');
            out.push_str(&m.value.to_string());
            out.push('\n');
        }
        out.push_str(".\n");
        out
    }
}

/// tebroker's pool commands, parsed here rather than in gearman-proto since they speak the
/// testenv-agent's language: `envs`, and `drain|undrain|hold|release|rebuild TE [SECS]`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PoolCommand {
    Envs,
    Control {
        op: ControlOp,
        env: String,
        hold_secs: Option<u64>,
    },
}

impl PoolCommand {
    /// `None`: not a pool command.
    fn parse(line: &str) -> Option<Result<PoolCommand, AdminError>> {
        let words: Vec<&str> = line.split_ascii_whitespace().collect();
        let first = *words.first()?;
        if first == "envs" {
            return Some(Ok(PoolCommand::Envs));
        }
        let op = ControlOp::parse(first).filter(|&op| op != ControlOp::Status)?;
        let invalid = || AdminError::InvalidArguments(first.to_string());
        let cmd = match (op, &words[1..]) {
            (ControlOp::Hold, [env, secs]) => match secs.parse::<u64>() {
                Ok(secs) => PoolCommand::Control {
                    op,
                    env: env.to_string(),
                    hold_secs: Some(secs),
                },
                Err(_) => return Some(Err(invalid())),
            },
            (_, [env]) => PoolCommand::Control {
                op,
                env: env.to_string(),
                hold_secs: None,
            },
            _ => return Some(Err(invalid())),
        };
        Some(Ok(cmd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_commands_parse() {
        assert_eq!(PoolCommand::parse("envs"), Some(Ok(PoolCommand::Envs)));
        assert_eq!(PoolCommand::parse("status"), None);
        assert_eq!(PoolCommand::parse("status te1"), None);
        assert_eq!(
            PoolCommand::parse("hold te1 60"),
            Some(Ok(PoolCommand::Control {
                op: ControlOp::Hold,
                env: "te1".into(),
                hold_secs: Some(60)
            }))
        );
        assert_eq!(
            PoolCommand::parse("drain host1/te1"),
            Some(Ok(PoolCommand::Control {
                op: ControlOp::Drain,
                env: "host1/te1".into(),
                hold_secs: None
            }))
        );
        for bad in ["drain", "drain a b", "hold te1 soon", "rebuild a 5"] {
            assert!(matches!(PoolCommand::parse(bad), Some(Err(_))), "{bad}");
        }
    }
}
