//! The lease side of lease resume (docs/design/lease-resume.md): a lease whose client sent a
//! `resume_key` survives the loss of the broker carrying either of its two jobs.
//!
//! - C2 (the callback job) lost, or failed → the TE stays locked for the holder; a C2 resume is
//!   offered on every broker until the holder takes it (WORK_STATUS) or `--resume-grace` runs
//!   out.
//! - C1 (`lockenv`) lost → the holder sends a C1 resume to `lease_<id>`, registered on every
//!   broker for the whole lease; one with the right key becomes the new C1.
//! - An early end (timeout, client-alive check, stop) completes C1 and revokes through C2; the
//!   holder confirms COMMAND is dead by completing C2. Without that confirmation the TE is kept
//!   for the holder's own resume grace on top of the holder grace.

use std::time::Duration;

use gearman_client::{Job, JobEvent, Liveness, Worker, WorkerOptions};
use testenv_proto::resume::{
    Carrier, LeaseKey, LeaseMessage, LeaseOp, ALREADY_SERVED, NEVER_STARTED,
};
use testenv_proto::ValidLockRequest;

use super::environment::AliveWatch;
use super::{sleep_until, Interrupts, LeaseContext, Outcome};
use crate::journal::LeaseRecord;
use crate::resume::{per_broker_clients, taken, Offer, OfferEvent};

/// What [`hand_over`] needs besides the context.
pub(super) struct Resumable<'r> {
    pub request: &'r ValidLockRequest,
    pub key: &'r LeaseKey,
    pub grace: Duration,
    pub data: String,
    pub hold_for: Duration,
}

/// The carriers of the lease on the worker's side.
struct Carriers {
    c1: Option<Job>,
    /// Earlier C1s replaced by a resume; answered when the lease ends.
    retired: Vec<Job>,
    c2: Option<gearman_client::ForegroundJob>,
    /// The C2 resume (or revoke) being offered on every broker.
    offer: Option<Offer>,
    /// What C1 is completed with: empty, or [`ALREADY_SERVED`] when the holder turned this TE
    /// down because it holds another.
    c1_result: &'static str,
    /// When the worker lost its last C1 (none held since): the holder noticed by then plus
    /// K and kills COMMAND within its own grace after that.
    c1_lost_at: Option<tokio::time::Instant>,
    /// The connection the first C2 (the TE data) was submitted on.
    c2_client: Option<gearman_client::Client>,
}

async fn c1_lost(c1: &Option<Job>) {
    match c1 {
        Some(job) => job.connection_lost().await,
        None => std::future::pending().await,
    }
}

async fn c2_event(
    c2: &mut Option<gearman_client::ForegroundJob>,
) -> gearman_client::Result<Option<JobEvent>> {
    match c2 {
        Some(job) => job.next_event().await,
        None => std::future::pending().await,
    }
}

impl Carriers {
    /// How much longer than the holder grace the holder may run after an end it did not
    /// confirm. With a C1 still held, the take-back sent on it may be lost with its broker:
    /// the holder then waits its whole resume grace, covered by ours (`grace`). With C1 lost
    /// at `t`, the holder's own grace has been running since `t` (plus K), so ours from `t`
    /// covers it: only what is left of it counts.
    fn unconfirmed_extra(&self, grace: Duration) -> Duration {
        match (&self.c1, self.c1_lost_at) {
            (None, Some(lost)) => lost.checked_add(grace).map_or(grace, |until| {
                until.saturating_duration_since(tokio::time::Instant::now())
            }),
            _ => grace,
        }
    }

    /// Completes every C1 still held: the holder reads it as "the TE is taken back".
    async fn complete_c1(&mut self, tenum: &str) {
        for job in self.c1.take().into_iter().chain(self.retired.drain(..)) {
            if job.is_connected() {
                if let Err(e) = job.complete(self.c1_result).await {
                    tracing::debug!(tenum, error = %e, "could not complete a lock job");
                }
            }
        }
    }
}

/// A taken lease message: what it means for the lease.
enum Taken {
    NewC1,
    Released(Option<i32>),
    Refused,
}

/// Hands the TE over and carries the lease until it ends; answers `lockenv` (and any C1 that
/// replaced it) itself.
pub(super) async fn hand_over<I: Interrupts>(
    ctx: &mut LeaseContext<'_, I>,
    lockenv: Job,
    r: Resumable<'_>,
    record: &mut LeaseRecord,
) -> Outcome {
    let tenum = ctx.tenum;
    let callback = r.request.callback_name.clone();
    let lease_id = r.key.lease_id();
    let lease_worker = Worker::with_options(
        ctx.client.servers().to_vec(),
        WorkerOptions {
            client_id: Some(format!("testenv-worker-{tenum}-lease")),
            ..WorkerOptions::default()
        },
    );
    lease_worker.register(lease_id.function());
    // Tells the holder this worker resumes leases (an original worker never sends it).
    let _ = lockenv.send_status(0, 1).await;
    tracing::info!(tenum, lease = %lease_id, holder = callback, "the lease is resumable");

    let mut carriers = Carriers {
        c1: Some(lockenv),
        retired: Vec::new(),
        c2: None,
        offer: None,
        c1_result: "",
        c1_lost_at: None,
        c2_client: None,
    };
    let outcome = carry(ctx, &r, &lease_worker, &mut carriers, record).await;
    if outcome != Outcome::Completed {
        withdraw_untaken(ctx.client.servers(), &mut carriers).await;
    }
    carriers.complete_c1(tenum).await;
    lease_worker.stop();
    outcome
}

async fn carry<I: Interrupts>(
    ctx: &mut LeaseContext<'_, I>,
    r: &Resumable<'_>,
    lease_worker: &Worker,
    carriers: &mut Carriers,
    record: &mut LeaseRecord,
) -> Outcome {
    let tenum = ctx.tenum;
    let settings = ctx.settings;
    let callback = r.request.callback_name.as_str();
    let mut resume_msg = LeaseMessage::new(LeaseOp::Resume, r.key, Carrier::Callback);
    resume_msg.te = tenum.to_string();
    let fresh = || per_broker_clients(ctx.client, Liveness::default());

    // On a connection of the lease's own, so that the TE data can be withdrawn (by closing
    // it) if the lease ends before the holder took it.
    let c2_client = gearman_client::Client::new(ctx.client.servers().to_vec());
    carriers.c2_client = Some(c2_client.clone());
    match c2_client
        .submit(gearman_client::JobRequest::new(
            callback.to_string(),
            r.data.clone(),
        ))
        .await
    {
        Ok(job) => carriers.c2 = Some(job),
        Err(e) => return Outcome::LostBroker(e.to_string()),
    }
    let now = tokio::time::Instant::now();
    let start_check = now.checked_add(settings.callback_start_timeout);
    let hold_until = now.checked_add(r.hold_for);
    let mut checked_start = false;
    let mut resume_until: Option<tokio::time::Instant> = None;
    let mut alive_watch = AliveWatch::new(
        settings.client_alive_cmd.as_deref(),
        Some(r.request),
        tenum,
        settings.alive_interval,
        settings.alive_timeout,
    );
    let mut heartbeat = tokio::time::interval(Duration::from_secs(1));

    let early_end = loop {
        tokio::select! {
            ev = c2_event(&mut carriers.c2) => match ev {
                Ok(Some(JobEvent::Complete(data))) if data == ALREADY_SERVED.as_bytes() => {
                    tracing::info!(tenum, holder = callback, "the holder already holds another TE; this was a duplicate lock request");
                    carriers.c1_result = ALREADY_SERVED;
                    return Outcome::Completed;
                }
                Ok(Some(JobEvent::Complete(data))) => {
                    ctx.exit_status = exit_status(&data);
                    return Outcome::Completed;
                }
                Ok(Some(JobEvent::Fail)) if from_tebroker(ctx.client.servers(), carriers.c2.as_ref()).await => {
                    // tebroker fails a callback job only when its connection closed: the
                    // holder's process is gone and its guard has killed COMMAND.
                    return Outcome::Failed;
                }
                Ok(Some(e)) if e.is_final() => {
                    lost_c2(tenum, callback, r, &format!("{e:?}"));
                    carriers.c2 = None;
                    carriers.offer = Some(Offer::new(callback.to_string(), resume_msg.to_json(), fresh()));
                    resume_until = tokio::time::Instant::now().checked_add(r.grace);
                }
                Ok(_) => {}
                Err(e) => {
                    lost_c2(tenum, callback, r, &e.to_string());
                    carriers.c2 = None;
                    carriers.offer = Some(Offer::new(callback.to_string(), resume_msg.to_json(), fresh()));
                    resume_until = tokio::time::Instant::now().checked_add(r.grace);
                }
            },
            taken = taken(&mut carriers.offer) => {
                let OfferEvent::Taken(job, ev) = taken;
                carriers.offer = None;
                resume_until = None;
                if let JobEvent::Complete(data) = ev {
                    if data == NEVER_STARTED.as_bytes() {
                        tracing::warn!(tenum, holder = callback, "the holder never got the TE data (its callback job was lost); freeing the TE");
                        return Outcome::NeverStarted;
                    }
                    ctx.exit_status = exit_status(&data);
                    return Outcome::Completed;
                }
                tracing::info!(tenum, holder = callback, server = job.server(), "lease resumed: the holder took the new callback job");
                carriers.c2 = Some(job);
            }
            _ = sleep_until(resume_until), if resume_until.is_some() => {
                tracing::warn!(
                    tenum,
                    holder = callback,
                    seconds = r.grace.as_secs_f64(),
                    "the holder did not take a lease resume within --resume-grace; ending the lease"
                );
                return Outcome::ResumeExpired { extra: carriers.unconfirmed_extra(r.grace) };
            }
            _ = c1_lost(&carriers.c1) => {
                tracing::warn!(tenum, holder = callback, "lost the broker carrying the lock job; the holder resumes it on lease_<id>");
                if let Some(old) = carriers.c1.take() {
                    carriers.retired.push(old);
                }
                carriers.c1_lost_at = Some(tokio::time::Instant::now());
            }
            job = lease_worker.grab_job() => {
                let Some(job) = job else { continue };
                match take_lease_message(tenum, r.key, &job) {
                    Taken::NewC1 => {
                        let _ = job.send_status(1, 1).await;
                        tracing::info!(tenum, holder = callback, server = job.server(), "lease resumed: took the holder's new lock job");
                        if let Some(old) = carriers.c1.replace(job) {
                            carriers.retired.push(old);
                        }
                        carriers.c1_lost_at = None;
                    }
                    Taken::Released(code) => {
                        tracing::info!(tenum, holder = callback, exit = ?code, "the holder reported its command's end on lease_<id>");
                        ctx.exit_status = code;
                        let _ = job.complete("").await;
                        return Outcome::Completed;
                    }
                    Taken::Refused => {
                        let _ = job.fail().await;
                    }
                }
            }
            _ = sleep_until(start_check), if !checked_start => {
                checked_start = true;
                if let Some(c2) = &carriers.c2 {
                    match ctx.client.get_status(c2.handle()).await {
                        Ok(s) if s.known && s.running => {}
                        Ok(_) => return Outcome::NeverStarted,
                        // The broker is gone: C2 reports it and the resume takes over.
                        Err(_) => {}
                    }
                }
            }
            _ = sleep_until(hold_until) => break Outcome::TimedOut,
            _ = alive_watch.failed() => break Outcome::ClientGone,
            _ = heartbeat.tick() => {
                ctx.heartbeat(record);
            }
            stop = ctx.pause_resume_or_stop() => if stop { break Outcome::Stopping },
        }
    };
    end_early(ctx, r, carriers, early_end).await
}

/// Withdraws a callback job the holder has not taken (it still waits for its TE) before the
/// lease ends: closing the connection that submitted it makes the broker drop it, so the
/// holder cannot take it after the TE is offered again. Waits (at most 2 s) until the broker no
/// longer has it queued. gearmand keeps such a job; nothing more can be done there.
async fn withdraw_untaken(servers: &[gearman_client::ServerAddr], carriers: &mut Carriers) {
    let Some(job) = carriers.c2.take() else {
        carriers.c2_client = None;
        return;
    };
    let handle = job.handle().to_string();
    let server = servers
        .iter()
        .find(|s| s.to_string() == job.server())
        .cloned();
    drop(job);
    carriers.c2_client = None;
    carriers.offer = None;
    let Some(server) = server else { return };
    let probe = gearman_client::Client::new([server]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline {
        match probe.get_status(&handle).await {
            Ok(st) if st.known && !st.running => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ => return,
        }
    }
    tracing::warn!(
        handle,
        "the broker still holds the TE data the holder never took"
    );
}

/// Whether the broker carrying `job` is a tebroker, which tells a closed holder connection
/// (WORK_FAIL) from a failed one (WORK_EXCEPTION); other brokers fail both alike.
async fn from_tebroker(
    servers: &[gearman_client::ServerAddr],
    job: Option<&gearman_client::ForegroundJob>,
) -> bool {
    let Some(server) = job.and_then(|j| servers.iter().find(|s| s.to_string() == j.server()))
    else {
        return false;
    };
    match gearman_client::admin::query(server, "version", Duration::from_secs(2)).await {
        Ok(lines) => lines.first().is_some_and(|v| {
            let v = v.trim_start_matches("OK ");
            v.starts_with(testenv_proto::agent::TEBROKER_VERSION_PREFIX)
        }),
        Err(_) => false,
    }
}

fn lost_c2(tenum: &str, callback: &str, r: &Resumable<'_>, why: &str) {
    tracing::warn!(
        tenum,
        holder = callback,
        why,
        seconds = r.grace.as_secs_f64(),
        "lost the holder's callback job; keeping the TE locked and offering a lease resume on \
         every broker"
    );
}

/// Takes the TE back before the holder is done: C1 completed and a revoke offered through
/// C2, then waits (at most the holder grace) for the holder to confirm COMMAND is dead.
async fn end_early<I: Interrupts>(
    ctx: &mut LeaseContext<'_, I>,
    r: &Resumable<'_>,
    carriers: &mut Carriers,
    ended: Outcome,
) -> Outcome {
    let tenum = ctx.tenum;
    let extra = carriers.unconfirmed_extra(r.grace);
    tracing::info!(tenum, outcome = ?ended, "ending the lease early: taking the TE back through every carrier");
    carriers.complete_c1(tenum).await;
    carriers.offer = Some(Offer::new(
        r.request.callback_name.clone(),
        LeaseMessage::new(LeaseOp::Revoke, r.key, Carrier::Callback).to_json(),
        per_broker_clients(ctx.client, Liveness::default()),
    ));
    let confirmed = tokio::time::timeout(ctx.settings.holder_grace, async {
        loop {
            tokio::select! {
                ev = c2_event(&mut carriers.c2) => match ev {
                    Ok(Some(JobEvent::Complete(_))) => return true,
                    Ok(Some(e)) if e.is_final() => carriers.c2 = None,
                    Ok(_) => {}
                    Err(_) => carriers.c2 = None,
                },
                taken = taken(&mut carriers.offer) => {
                    let OfferEvent::Taken(_, ev) = taken;
                    carriers.offer = None;
                    if matches!(ev, JobEvent::Complete(_)) {
                        return true;
                    }
                }
            }
        }
    })
    .await
    .unwrap_or(false);
    if confirmed {
        tracing::info!(tenum, "the holder confirmed its command is dead");
        ended
    } else {
        tracing::warn!(
            tenum,
            seconds = extra.as_secs_f64(),
            "the holder did not confirm its command is dead; keeping the TE longer than the holder grace"
        );
        Outcome::Unconfirmed {
            ended: Box::new(ended),
            extra,
        }
    }
}

/// Reads a job grabbed on `lease_<id>`; logs a refused one without its key.
fn take_lease_message(tenum: &str, key: &LeaseKey, job: &Job) -> Taken {
    match LeaseMessage::parse(job.data()) {
        Some(Ok(m)) if m.proves(key, Carrier::Lease) => match m.op {
            LeaseOp::Resume => Taken::NewC1,
            LeaseOp::Released => Taken::Released(m.exit),
            LeaseOp::Revoke => {
                tracing::warn!(
                    tenum,
                    server = job.server(),
                    "refused a revoke sent to the worker's lease function"
                );
                Taken::Refused
            }
        },
        Some(Ok(_)) => {
            tracing::warn!(
                tenum,
                server = job.server(),
                function = job.function(),
                "refused a lease message with a wrong key (forged or stale)"
            );
            Taken::Refused
        }
        Some(Err(e)) => {
            tracing::warn!(tenum, server = job.server(), error = %e, "refused a malformed lease message");
            Taken::Refused
        }
        None => {
            tracing::warn!(
                tenum,
                server = job.server(),
                "refused a job on the lease function that is not a lease message"
            );
            Taken::Refused
        }
    }
}

fn exit_status(data: &[u8]) -> Option<i32> {
    std::str::from_utf8(data)
        .ok()
        .and_then(|t| t.strip_prefix(crate::client::COMMAND_EXIT_PREFIX))
        .and_then(|n| n.trim().parse().ok())
}
