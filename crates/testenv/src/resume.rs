//! What both agents share for lease resume (docs/design/lease-resume.md): drawing a key, one
//! client per broker, and submitting a lease message on every broker until one side takes it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::error::Elapsed;

use gearman_client::{
    Backoff, Client, ClientOptions, ForegroundJob, JobEvent, JobRequest, Liveness,
};
use testenv_proto::resume::{LeaseKey, KEY_BYTES};

/// The worker's `--resume-grace` default: how long it keeps the TE for a holder it lost sight of.
pub const WORKER_RESUME_GRACE: Duration = Duration::from_secs(120);
/// The client's `--resume-grace` default: the worker's, minus the bound on noticing a dead
/// broker (our library's ECHO probe: 30 s idle + 10 s), minus the kill grace (10 s), minus a
/// 10 s margin, so COMMAND is dead before the worker gives the TE up.
pub const CLIENT_RESUME_GRACE: Duration = Duration::from_secs(60);

/// A fresh lease key from the kernel's random source.
pub fn new_key() -> anyhow::Result<LeaseKey> {
    let mut bytes = [0u8; KEY_BYTES];
    let mut filled = 0;
    while filled < KEY_BYTES {
        // SAFETY: getrandom writes at most the given length into the buffer it is given.
        let n =
            unsafe { libc::getrandom(bytes[filled..].as_mut_ptr().cast(), KEY_BYTES - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            anyhow::bail!("cannot draw a lease key: {e}");
        }
        filled += n as usize;
    }
    Ok(LeaseKey::from_bytes(bytes))
}

/// One [`Client`] per broker of `servers`: a resume must be offered on every broker, since the
/// other side may have reconnected to any of them.
pub fn per_broker_clients(template: &Client, liveness: Liveness) -> Vec<Client> {
    template
        .servers()
        .iter()
        .map(|s| {
            Client::with_options(
                [s.clone()],
                ClientOptions {
                    liveness,
                    response_timeout: Duration::from_secs(5),
                    ..ClientOptions::default()
                },
            )
        })
        .collect()
}

/// A lease message offered on every broker until one copy is taken: each broker gets one
/// pending job at a time, resubmitted (with backoff) when its broker fails or refuses it.
pub struct Offer {
    function: String,
    data: String,
    clients: Vec<Client>,
    slots: Vec<Slot>,
    delay: Vec<Duration>,
}

type Submitting =
    Pin<Box<dyn Future<Output = Result<gearman_client::Result<ForegroundJob>, Elapsed>>>>;

/// Where one broker's copy stands. A submit in flight lives here, not in a caller's future,
/// so an offer raced against other events (`select!`) never loses a copy it already created
/// on a broker (which the other side could still take, unseen).
enum Slot {
    Idle { retry_at: tokio::time::Instant },
    Submitting(Submitting),
    Pending(ForegroundJob),
}

/// What became of an offer.
#[derive(Debug)]
pub enum OfferEvent {
    /// The other side took it: WORK_STATUS (a resume accepted) or WORK_COMPLETE (a revoke or
    /// release done). The job stays with the caller as the new carrier.
    Taken(ForegroundJob, JobEvent),
}

impl Offer {
    /// `clients` (one per broker, see [`per_broker_clients`]) must be the offer's own: when it
    /// is dropped their connections close once no taken job needs them, and the brokers
    /// discard the copies nobody took, so none is taken later as a stale carrier.
    pub fn new(function: String, data: String, clients: Vec<Client>) -> Offer {
        let now = tokio::time::Instant::now();
        let n = clients.len();
        Offer {
            function,
            data,
            clients,
            slots: (0..n).map(|_| Slot::Idle { retry_at: now }).collect(),
            delay: vec![Backoff::RECONNECT.initial; n],
        }
    }

    /// Waits until some broker's copy is taken (a WORK_STATUS or a final event other than
    /// WORK_FAIL). A refused copy (WORK_FAIL: a wrong key, or a stale party) is offered again
    /// later, as is one whose broker went away. Cancel-safe: submits in flight and pending
    /// copies stay with the offer.
    pub async fn next_taken(&mut self) -> OfferEvent {
        loop {
            self.start_due();
            let next_retry = self
                .slots
                .iter()
                .filter_map(|s| match s {
                    Slot::Idle { retry_at } => Some(*retry_at),
                    _ => None,
                })
                .min();
            tokio::select! {
                taken = std::future::poll_fn(|cx| self.poll_slots(cx)) => {
                    if let Some(taken) = taken {
                        return taken;
                    }
                }
                _ = sleep_until_opt(next_retry) => {}
            }
        }
    }

    fn start_due(&mut self) {
        let now = tokio::time::Instant::now();
        for (slot, client) in self.slots.iter_mut().zip(&self.clients) {
            if matches!(slot, Slot::Idle { retry_at } if *retry_at <= now) {
                let req = JobRequest::new(self.function.clone(), self.data.clone());
                let client = client.clone();
                *slot = Slot::Submitting(Box::pin(async move {
                    tokio::time::timeout(Duration::from_secs(5), client.submit(req)).await
                }));
            }
        }
    }

    /// Advances every slot; `Ready(Some)` when a copy was taken, `Ready(None)` when a slot
    /// changed (so the caller starts due submits again), `Pending` otherwise.
    fn poll_slots(&mut self, cx: &mut Context<'_>) -> Poll<Option<OfferEvent>> {
        let mut changed = false;
        for i in 0..self.slots.len() {
            match &mut self.slots[i] {
                Slot::Idle { .. } => {}
                Slot::Submitting(submit) => {
                    if let Poll::Ready(r) = submit.as_mut().poll(cx) {
                        changed = true;
                        match r {
                            Ok(Ok(job)) => self.slots[i] = Slot::Pending(job),
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, function = self.function, "cannot offer the lease message here yet");
                                self.back_off(i);
                            }
                            Err(_) => self.back_off(i),
                        }
                    }
                }
                Slot::Pending(job) => {
                    let event = {
                        let next = job.next_event();
                        std::pin::pin!(next).poll(cx)
                    };
                    match event {
                        Poll::Pending => {}
                        Poll::Ready(Ok(Some(
                            e @ (JobEvent::Status { .. } | JobEvent::Complete(_)),
                        ))) => {
                            // No copy on this broker until the caller makes a new offer.
                            let taken = std::mem::replace(
                                &mut self.slots[i],
                                Slot::Idle {
                                    retry_at: far_future(),
                                },
                            );
                            let Slot::Pending(job) = taken else {
                                unreachable!("matched Pending above")
                            };
                            return Poll::Ready(Some(OfferEvent::Taken(job, e)));
                        }
                        Poll::Ready(Ok(Some(JobEvent::Data(_) | JobEvent::Warning(_)))) => {
                            changed = true;
                        }
                        Poll::Ready(_) => {
                            changed = true;
                            self.back_off(i);
                        }
                    }
                }
            }
        }
        if changed {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }

    fn back_off(&mut self, i: usize) {
        self.slots[i] = Slot::Idle {
            retry_at: tokio::time::Instant::now() + self.delay[i],
        };
        self.delay[i] = Backoff::RECONNECT.next(self.delay[i]);
    }
}

/// A deadline that never comes in practice (a year away).
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600)
}

/// The next taking of `offer`; pending for ever when there is none (for `select!`).
pub async fn taken(offer: &mut Option<Offer>) -> OfferEvent {
    match offer {
        Some(o) => o.next_taken().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, or for ever when there is no deadline.
pub async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
