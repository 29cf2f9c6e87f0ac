//! Security settings of the core: ACLs, callback hijack protection, the default queue limit.
//!
//! **Callback hijack protection.** A testenv-client registers a function `callback_<jobnum>` and
//! names it in its `lockenv` job; the testenv-worker holding a TE then submits the TE's data
//! (SSH private key, power credentials) as a job to that function. Function names are visible to
//! anyone (`status`), so on a plain Gearman server anyone could register the same callback and be
//! handed the secrets. With protection on, a `callback_*` function belongs to the first connection
//! that registers it, for as long as that connection holds it: a CAN_DO for it from any other
//! connection is refused with an ERROR packet and a warning in the log. If the owner goes away
//! while jobs are still queued for its callback, the reservation stays, and only a connection from
//! the same peer address with the same TLS identity (a reconnecting client) may claim it back; the
//! reservation ends when no job is left for the function. Submitting to a callback is never
//! restricted (the testenv-worker must do it), so the legitimate flow is unchanged.

use bytes::Bytes;
use rustc_hash::FxHashMap;

use crate::acl::Acl;
use crate::broker::ConnId;

/// Prefix of the functions callback hijack protection guards.
pub const CALLBACK_PREFIX: &[u8] = b"callback_";

/// Security settings of a [`crate::Broker`]; the default is plain geard/gearmand behaviour.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// geard's access control list; `None`: everyone may do everything.
    pub acl: Option<Acl>,
    /// Refuse a second registration of a `callback_*` function (see the module docs).
    pub callback_protection: bool,
    /// Limit of queued jobs per function and priority, for functions without a `maxqueue`
    /// setting of their own (`None`: unlimited).
    pub default_max_queue: Option<i64>,
}

#[derive(Debug, Clone)]
struct Owner {
    /// `None` once the owner has gone while jobs were still queued for the callback.
    conn: Option<ConnId>,
    peer: String,
    identity: Option<String>,
}

/// Who holds each `callback_*` function.
#[derive(Debug, Default)]
pub(crate) struct CallbackGuard {
    owners: FxHashMap<Bytes, Owner>,
}

impl CallbackGuard {
    pub fn is_guarded(function: &[u8]) -> bool {
        function.starts_with(CALLBACK_PREFIX)
    }

    /// Tries to make `conn` the owner of `function`. Returns the reason for a refusal.
    pub fn claim(
        &mut self,
        function: &Bytes,
        conn: ConnId,
        peer: &str,
        identity: Option<&str>,
    ) -> Result<(), &'static str> {
        match self.owners.get_mut(function) {
            None => {
                self.owners.insert(
                    function.clone(),
                    Owner {
                        conn: Some(conn),
                        peer: peer.to_string(),
                        identity: identity.map(str::to_string),
                    },
                );
                Ok(())
            }
            Some(o) if o.conn == Some(conn) => Ok(()),
            Some(o) if o.conn.is_none() => {
                if o.peer == peer && o.identity.as_deref() == identity {
                    o.conn = Some(conn);
                    Ok(())
                } else {
                    Err("reserved for its previous owner while jobs are queued for it")
                }
            }
            Some(_) => Err("registered by another connection"),
        }
    }

    /// `conn` no longer does `function`. With `jobs_waiting`, the name stays reserved for a
    /// reconnect of the same peer.
    pub fn release(&mut self, function: &[u8], conn: ConnId, jobs_waiting: bool) {
        if let Some(o) = self.owners.get_mut(function) {
            if o.conn == Some(conn) {
                if jobs_waiting {
                    o.conn = None;
                } else {
                    self.owners.remove(function);
                }
            }
        }
    }

    /// The function is gone from the broker: nothing is left to protect.
    pub fn forget(&mut self, function: &[u8]) {
        if let Some(o) = self.owners.get(function) {
            if o.conn.is_none() {
                self.owners.remove(function);
            }
        }
    }

    pub fn owner(&self, function: &[u8]) -> Option<ConnId> {
        self.owners.get(function).and_then(|o| o.conn)
    }

    pub fn len(&self) -> usize {
        self.owners.len()
    }
}

impl crate::Broker {
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
        out: &mut Vec<crate::Action>,
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
                out.push(crate::Action::Send(
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
}

impl crate::Broker {
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
