//! Wake-ups: which sleeping worker is told (NOOP) that there is work, and passing a wake-up on
//! when the woken worker stays silent.

use bytes::Bytes;
use gearman_proto::{Packet, PacketType};

use super::{pop_due, Broker};
use crate::types::{Action, ConnId, Millis};

/// How long a woken worker may stay silent before another sleeping worker is woken instead.
pub const WAKE_RETRY_MS: Millis = 200;

impl Broker {
    /// Sends NOOP to one sleeping worker of `function`, if there is one.
    pub(super) fn wake_one(&mut self, function: &[u8], out: &mut Vec<Action>) {
        if !self.may_hand_out(function) {
            return;
        }
        let Some(f) = self.functions.get(function) else {
            return;
        };
        // The most recent sleeper that may take this work (a drained plain TE may not).
        let Some(index) = f.sleeping.iter().rposition(|&w| self.may_take(w, function)) else {
            return;
        };
        let Some(worker) = self
            .functions
            .get_mut(function)
            .and_then(|f| f.sleeping.swap_remove_index(index))
        else {
            return;
        };
        self.set_awake(worker);
        self.send_noop(worker, out);
    }

    /// Sends NOOP and remembers to check that the worker acts on it.
    pub(super) fn send_noop(&mut self, worker: ConnId, out: &mut Vec<Action>) {
        if let Some(c) = self.conns.get_mut(&worker) {
            c.woken_at = Some(self.now.mono);
            self.wake_checks
                .insert((wake_check_time(self.now.mono), worker));
        }
        out.push(Action::Send(
            worker,
            Packet::res(PacketType::Noop, Vec::<Bytes>::new()),
        ));
    }

    pub(super) fn set_awake(&mut self, worker: ConnId) {
        let Some(c) = self.conns.get_mut(&worker) else {
            return;
        };
        if !c.sleeping {
            return;
        }
        c.sleeping = false;
        for name in c.abilities.keys() {
            if let Some(f) = self.functions.get_mut(name) {
                f.sleeping.swap_remove(&worker);
            }
        }
    }

    pub(super) fn pre_sleep(&mut self, conn: ConnId, out: &mut Vec<Action>) {
        self.conn(conn).woken_at = None;
        let c = self.conns.get(&conn).expect("known connection");
        let work_waiting = c
            .abilities
            .keys()
            .any(|name| self.has_work_for(name) && self.may_take(conn, name));
        if work_waiting {
            self.send_noop(conn, out);
            return;
        }
        let names: Vec<Bytes> = c.abilities.keys().cloned().collect();
        for name in names {
            if let Some(f) = self.functions.get_mut(&name) {
                f.sleeping.insert(conn);
            }
        }
        self.conn(conn).sleeping = true;
    }

    /// Wakes one sleeping worker for each function of `conn` that has queued jobs. Collects
    /// only those functions, so the usual case (no work waiting) allocates nothing.
    pub(super) fn wake_for_waiting_work(&mut self, conn: ConnId, out: &mut Vec<Action>) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let waiting: Vec<Bytes> = c
            .abilities
            .keys()
            .filter(|name| self.has_work_for(name))
            .cloned()
            .collect();
        for name in waiting {
            self.wake_one(&name, out);
        }
    }

    /// Woken workers that did not grab in time (a worker may ignore NOOP while it wants no
    /// work) let another sleeping worker take what they were woken for.
    pub(super) fn check_woken_workers(&mut self, out: &mut Vec<Action>) {
        while let Some((at, worker)) = pop_due(&mut self.wake_checks, self.now.mono) {
            let Some(c) = self.conns.get_mut(&worker) else {
                continue;
            };
            if c.woken_at.map(wake_check_time) != Some(at) {
                continue;
            }
            c.woken_at = None;
            self.wake_for_waiting_work(worker, out);
        }
    }
}

/// When a worker woken at `woken_at` (monotonic) is checked on.
fn wake_check_time(woken_at: Millis) -> Millis {
    woken_at.saturating_add(WAKE_RETRY_MS)
}
