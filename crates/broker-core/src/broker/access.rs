//! The security settings applied to connections: ACL checks for CAN_DO, submits and admin
//! commands, and callback hijack protection (see [`crate::security`]).

use bytes::Bytes;

use super::Broker;
use crate::security::CallbackGuard;
use crate::types::{Action, ConnId};

impl Broker {
    /// ACL check for CAN_DO: a function not allowed is ignored (logged), as geard does.
    pub(crate) fn may_register(&mut self, conn: ConnId, function: &[u8]) -> bool {
        let Some(acl) = &self.security.acl else {
            return true;
        };
        let identity = self.conns.get(&conn).and_then(|c| c.identity.as_deref());
        if acl.can_register(identity, function) {
            return true;
        }
        self.stats.acl_register_denied += 1;
        tracing::info!(
            %conn,
            subject = identity.unwrap_or("(none)"),
            function = %String::from_utf8_lossy(function),
            "ignoring CAN_DO due to ACL"
        );
        false
    }

    /// ACL check for SUBMIT_JOB* and `cancel job`.
    pub(crate) fn may_invoke(&mut self, conn: ConnId, function: &[u8]) -> bool {
        let Some(acl) = &self.security.acl else {
            return true;
        };
        let identity = self.conns.get(&conn).and_then(|c| c.identity.as_deref());
        if acl.can_invoke(identity, function) {
            return true;
        }
        self.stats.acl_invoke_denied += 1;
        tracing::info!(
            %conn,
            subject = identity.unwrap_or("(none)"),
            function = %String::from_utf8_lossy(function),
            "rejecting job submission due to ACL"
        );
        false
    }

    /// Callback hijack protection for CAN_DO; refuses with an ERROR packet.
    pub(crate) fn claim_callback(
        &mut self,
        conn: ConnId,
        function: &Bytes,
        out: &mut Vec<Action>,
    ) -> bool {
        if !self.security.callback_protection || !CallbackGuard::is_guarded(function) {
            return true;
        }
        let Some(c) = self.conns.get(&conn) else {
            return false;
        };
        let (peer, identity) = (c.peer.clone(), c.identity.clone());
        match self
            .callbacks
            .claim(function, conn, &peer, identity.as_deref())
        {
            Ok(()) => true,
            Err(why) => {
                self.stats.callback_hijacks_refused += 1;
                self.stats.protocol_errors += 1;
                tracing::warn!(
                    %conn,
                    %peer,
                    owner = ?self.callbacks.owner(function).map(|c| c.0),
                    function = %String::from_utf8_lossy(function),
                    why,
                    "callback hijack attempt refused: CAN_DO for a callback function another connection holds"
                );
                out.push(Action::Send(
                    conn,
                    gearman_proto::Packet::error(
                        "CALLBACK_TAKEN",
                        &format!("callback function {why}; refused"),
                    ),
                ));
                false
            }
        }
    }

    /// How many callback functions are reserved (for `stats`).
    pub fn callback_reservations(&self) -> usize {
        self.callbacks.len()
    }

    /// `acl ...` admin lines, answered as geard answers them.
    pub(crate) fn acl_admin(&mut self, conn: ConnId, line: &str) -> String {
        let identity = self.conns.get(&conn).and_then(|c| c.identity.clone());
        let Some(acl) = &mut self.security.acl else {
            return "ERR ACL_DISABLED\n".into();
        };
        let reply = acl.admin(identity.as_deref(), line);
        if reply.starts_with("ERR PERMISSION_DENIED") {
            self.stats.acl_admin_denied += 1;
        }
        if reply == "OK\n" {
            tracing::info!(%conn, subject = identity.as_deref().unwrap_or("(none)"), command = line, "ACL changed");
        }
        reply
    }

    /// With ACLs on, `drain|undrain|hold|release|rebuild TE` need what the change amounts to:
    /// for an agent's TE, invoke permission for the agent's control function (the command is a
    /// job of it); for a plain TE, whose rotation the broker changes itself, grant permission.
    pub(crate) fn control_denied(
        &mut self,
        conn: ConnId,
        env: &str,
    ) -> Option<gearman_proto::AdminError> {
        let acl = self.security.acl.as_ref()?;
        let identity = self.conns.get(&conn).and_then(|c| c.identity.as_deref());
        let agents: Vec<String> = match env.split_once('/') {
            Some((agent, _)) => vec![agent.to_string()],
            None => self
                .inventory
                .agents_reporting(env, self.now)
                .iter()
                .map(|a| a.report.agent.clone())
                .collect(),
        };
        let allowed = if agents.is_empty() {
            acl.can_grant(identity)
        } else {
            agents.iter().all(|agent| {
                acl.can_invoke(
                    identity,
                    testenv_proto::agent::control_function(agent).as_bytes(),
                )
            })
        };
        if allowed {
            return None;
        }
        self.stats.acl_admin_denied += 1;
        tracing::info!(%conn, subject = identity.unwrap_or("(none)"), env, "TE control command denied by ACL");
        Some(gearman_proto::AdminError::Other(
            "PERMISSION_DENIED",
            String::new(),
        ))
    }

    /// With ACLs on, admin commands that change the server need more than a TCP connection:
    /// `cancel job` needs invoke permission for the job's function (as in geard); `shutdown` and
    /// `maxqueue` (which geard does not have) need grant permission.
    pub(crate) fn admin_denied(
        &mut self,
        conn: ConnId,
        cmd: &gearman_proto::AdminCommand,
    ) -> Option<gearman_proto::AdminError> {
        use gearman_proto::{AdminCommand as C, AdminError};
        let acl = self.security.acl.as_ref()?;
        let identity = self.conns.get(&conn).and_then(|c| c.identity.as_deref());
        let allowed = match cmd {
            C::CancelJob { handle } => {
                let function = self
                    .job_id_of_handle(handle.as_bytes())
                    .and_then(|id| self.jobs.get(&id))
                    .map(|j| j.function.clone());
                match function {
                    // An unknown job gets the usual ERR UNKNOWN_JOB.
                    None => true,
                    Some(f) => acl.can_invoke(identity, &f),
                }
            }
            C::Shutdown { .. } | C::MaxQueue { .. } => acl.can_grant(identity),
            _ => true,
        };
        if allowed {
            return None;
        }
        self.stats.acl_admin_denied += 1;
        tracing::info!(%conn, subject = identity.unwrap_or("(none)"), ?cmd, "admin command denied by ACL");
        Some(AdminError::Other("PERMISSION_DENIED", String::new()))
    }
}
