//! What each packet does: checks its arguments and hands it to the rule that serves it.

use bytes::Bytes;
use gearman_proto::{Magic, Packet, PacketType};

use super::jobs::Submit;
use super::Broker;
use crate::testenv::LOCKENV_PREFIX;
use crate::types::{parse_num, Action, ConnId, Job, JobState, Now, Priority};

impl Broker {
    /// A frame that could not be understood; the stream is still in sync.
    pub fn malformed(&mut self, conn: ConnId, reason: &str, out: &mut Vec<Action>) {
        self.stats.protocol_errors += 1;
        tracing::debug!(%conn, reason, "malformed packet");
        out.push(Action::Send(conn, Packet::error("INVALID_PACKET", reason)));
    }

    /// One binary packet from `conn`.
    pub fn packet(&mut self, conn: ConnId, p: Packet, now: Now, out: &mut Vec<Action>) {
        self.now = self.now.advanced_to(now);
        if !self.conns.contains_key(&conn) {
            return;
        }
        if p.magic != Magic::Req {
            self.stats.protocol_errors += 1;
            out.push(Action::Send(
                conn,
                Packet::error("INVALID_MAGIC", "Request magic expected"),
            ));
            return;
        }
        use PacketType as T;
        match p.ptype {
            T::SubmitJob => self.submit(conn, p, Submit::Foreground(Priority::Normal), out),
            T::SubmitJobHigh => self.submit(conn, p, Submit::Foreground(Priority::High), out),
            T::SubmitJobLow => self.submit(conn, p, Submit::Foreground(Priority::Low), out),
            T::SubmitJobBg => self.submit(conn, p, Submit::Background(Priority::Normal), out),
            T::SubmitJobHighBg => self.submit(conn, p, Submit::Background(Priority::High), out),
            T::SubmitJobLowBg => self.submit(conn, p, Submit::Background(Priority::Low), out),
            T::SubmitJobEpoch => match parse_num::<u64>(p.arg(2)) {
                Some(epoch) => {
                    let at = epoch.saturating_mul(1000);
                    self.submit(conn, p, Submit::At(at.max(self.now.wall)), out)
                }
                None => self.reply_error(conn, "INVALID_ARGUMENTS", "bad epoch time", out),
            },
            T::SubmitJobSched => {
                let fields: Vec<&[u8]> = (2..7).map(|i| p.arg(i)).collect();
                match crate::schedule::parse_cron_fields(&fields)
                    .and_then(|f| crate::schedule::next_cron_match(&f, self.now.wall))
                {
                    Some(at) => self.submit(conn, p, Submit::At(at), out),
                    None => self.reply_error(
                        conn,
                        "INVALID_ARGUMENTS",
                        "bad schedule: minute hour day-of-month month day-of-week",
                        out,
                    ),
                }
            }
            T::SubmitReduceJob | T::SubmitReduceJobBackground => self.reply_error(
                conn,
                "NOT_SUPPORTED",
                "map/reduce jobs are not supported by tebroker",
                out,
            ),
            T::GetStatus => self.get_status(conn, p.args[0].clone(), out),
            T::GetStatusUnique => self.get_status_unique(conn, p.args[0].clone(), out),
            T::EchoReq => out.push(Action::Send(
                conn,
                Packet::res(PacketType::EchoRes, [p.args[0].clone()]),
            )),
            T::OptionReq => {
                // Accepted for compatibility; every client gets exceptions anyway (see work_end).
                if p.arg(0) == b"exceptions" {
                    out.push(Action::Send(
                        conn,
                        Packet::res(PacketType::OptionRes, [p.args[0].clone()]),
                    ));
                } else {
                    self.reply_error(
                        conn,
                        "UNKNOWN_OPTION",
                        "Server does not recognize given option",
                        out,
                    );
                }
            }
            T::SetClientId => self.conn(conn).client_id = p.args[0].clone(),
            T::CanDo => self.can_do(conn, p.args[0].clone(), None, out),
            T::CanDoTimeout => match parse_num::<u32>(p.arg(1)) {
                Some(t) => self.can_do(conn, p.args[0].clone(), (t > 0).then_some(t), out),
                None => self.reply_error(conn, "INVALID_ARGUMENTS", "bad timeout", out),
            },
            T::CantDo => self.cant_do(conn, p.arg(0)),
            T::ResetAbilities => {
                let names: Vec<Bytes> = self.conn(conn).abilities.keys().cloned().collect();
                for name in names {
                    self.cant_do(conn, &name);
                }
            }
            T::PreSleep => self.pre_sleep(conn, out),
            T::GrabJob => self.grab(conn, PacketType::JobAssign, out),
            T::GrabJobUniq => self.grab(conn, PacketType::JobAssignUniq, out),
            T::GrabJobAll => self.grab(conn, PacketType::JobAssignAll, out),
            T::WorkData | T::WorkWarning | T::WorkStatus => self.work_update(conn, p, out),
            T::WorkComplete | T::WorkFail | T::WorkException => self.work_end(conn, p, out),
            T::AllYours => {}
            T::Noop
            | T::JobCreated
            | T::NoJob
            | T::JobAssign
            | T::JobAssignUniq
            | T::JobAssignAll
            | T::EchoRes
            | T::Error
            | T::StatusRes
            | T::StatusResUnique
            | T::OptionRes => {
                self.reply_error(conn, "INVALID_COMMAND", "Command not expected", out)
            }
        }
    }

    pub(super) fn reply_error(
        &mut self,
        conn: ConnId,
        code: &str,
        text: &str,
        out: &mut Vec<Action>,
    ) {
        self.stats.protocol_errors += 1;
        out.push(Action::Send(conn, Packet::error(code, text)));
    }

    fn can_do(
        &mut self,
        conn: ConnId,
        function: Bytes,
        timeout: Option<u32>,
        out: &mut Vec<Action>,
    ) {
        if function.is_empty() {
            return self.reply_error(conn, "INVALID_ARGUMENTS", "empty function name", out);
        }
        if !self.may_register(conn, &function) {
            return;
        }
        let limit = self.config.max_functions_per_conn;
        let c = self.conn(conn);
        if limit > 0 && c.abilities.len() >= limit && !c.abilities.contains_key(&function) {
            self.stats.functions_refused += 1;
            tracing::warn!(%conn, limit, "too many functions registered; CAN_DO refused");
            return self.reply_error(
                conn,
                "TOO_MANY_FUNCTIONS",
                "limit of functions per connection reached",
                out,
            );
        }
        if !self.claim_callback(conn, &function, out) {
            return;
        }
        let now = self.now.wall;
        let c = self.conn(conn);
        // A plain TE is ready from its first lockenv* registration (the connection itself may
        // date from before the broker's latest event).
        if function.starts_with(LOCKENV_PREFIX)
            && !c.abilities.keys().any(|f| f.starts_with(LOCKENV_PREFIX))
        {
            c.te_since = now;
        }
        c.abilities.insert(function.clone(), timeout);
        let sleeping = c.sleeping;
        self.functions
            .entry(function.clone())
            .or_default()
            .workers
            .insert(conn);
        if sleeping {
            if self.has_work_for(&function) && self.may_take(conn, &function) {
                self.set_awake(conn);
                self.send_noop(conn, out);
            } else if let Some(f) = self.functions.get_mut(&function) {
                f.sleeping.insert(conn);
            }
        }
    }

    fn cant_do(&mut self, conn: ConnId, function: &[u8]) {
        if self.conn(conn).abilities.shift_remove(function).is_none() {
            return;
        }
        if let Some(f) = self.functions.get_mut(function) {
            f.workers.remove(&conn);
            f.sleeping.swap_remove(&conn);
            self.callbacks
                .release(function, conn, f.queued() + f.scheduled() > 0);
            self.gc_function(function);
        }
    }

    fn get_status(&mut self, conn: ConnId, handle: Bytes, out: &mut Vec<Action>) {
        let job = self
            .job_id_of_handle(&handle)
            .and_then(|id| self.jobs.get(&id));
        let args = match job {
            Some(job) => [
                handle,
                Bytes::from_static(b"1"),
                running_flag(job),
                or_zero(&job.numerator),
                or_zero(&job.denominator),
            ],
            None => [
                handle,
                Bytes::from_static(b"0"),
                Bytes::from_static(b"0"),
                Bytes::from_static(b"0"),
                Bytes::from_static(b"0"),
            ],
        };
        out.push(Action::Send(conn, Packet::res(PacketType::StatusRes, args)));
    }

    fn get_status_unique(&mut self, conn: ConnId, unique: Bytes, out: &mut Vec<Action>) {
        let job = self.by_unique.get(&unique).and_then(|id| self.jobs.get(id));
        let args = match job {
            Some(job) => [
                unique,
                Bytes::from_static(b"1"),
                running_flag(job),
                or_zero(&job.numerator),
                or_zero(&job.denominator),
                Bytes::from(job.clients.len().to_string()),
            ],
            None => [
                unique,
                Bytes::from_static(b"0"),
                Bytes::from_static(b"0"),
                Bytes::from_static(b"0"),
                Bytes::from_static(b"0"),
                Bytes::from_static(b"0"),
            ],
        };
        out.push(Action::Send(
            conn,
            Packet::res(PacketType::StatusResUnique, args),
        ));
    }
}

fn running_flag(job: &Job) -> Bytes {
    if matches!(job.state, JobState::Running { .. }) {
        Bytes::from_static(b"1")
    } else {
        Bytes::from_static(b"0")
    }
}

fn or_zero(b: &Bytes) -> Bytes {
    if b.is_empty() {
        Bytes::from_static(b"0")
    } else {
        b.clone()
    }
}
