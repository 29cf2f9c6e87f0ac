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
use crate::types::ConnId;

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
