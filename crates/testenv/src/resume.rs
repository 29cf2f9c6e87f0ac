//! What both agents share for lease resume (docs/design/lease-resume.md): drawing a key, one
//! client per broker, and submitting a lease message on every broker until one side takes it.

use std::time::Duration;

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
    pending: Vec<Option<ForegroundJob>>,
    retry_at: Vec<tokio::time::Instant>,
    delay: Vec<Duration>,
}

/// What became of an offer.
#[derive(Debug)]
pub enum OfferEvent {
    /// The other side took it: WORK_STATUS (a resume accepted) or WORK_COMPLETE (a revoke or
    /// release done). The job stays with the caller as the new carrier.
    Taken(ForegroundJob, JobEvent),
}

impl Offer {
    pub fn new(function: String, data: String, clients: Vec<Client>) -> Offer {
        let now = tokio::time::Instant::now();
        let n = clients.len();
        Offer {
            function,
            data,
            clients,
            pending: (0..n).map(|_| None).collect(),
            retry_at: vec![now; n],
            delay: vec![Backoff::RECONNECT.initial; n],
        }
    }

    /// Waits until some broker's copy is taken (a WORK_STATUS or a final event other than
    /// WORK_FAIL). A refused copy (WORK_FAIL: a wrong key, or a stale party) is offered again
    /// later, as is one whose broker went away. Cancel-safe between calls: pending jobs stay.
    pub async fn next_taken(&mut self) -> OfferEvent {
        loop {
            let now = tokio::time::Instant::now();
            for i in 0..self.clients.len() {
                if self.pending[i].is_none() && self.retry_at[i] <= now {
                    let req = JobRequest::new(self.function.clone(), self.data.clone());
                    match tokio::time::timeout(Duration::from_secs(5), self.clients[i].submit(req))
                        .await
                    {
                        Ok(Ok(job)) => self.pending[i] = Some(job),
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, function = self.function, "cannot offer the lease message here yet");
                            self.back_off(i, now);
                        }
                        Err(_) => self.back_off(i, now),
                    }
                }
            }
            let next_retry = (0..self.clients.len())
                .filter(|&i| self.pending[i].is_none())
                .map(|i| self.retry_at[i])
                .min();
            let events = futures_any(&mut self.pending);
            tokio::select! {
                (i, ev) = events => match ev {
                    Ok(Some(e @ (JobEvent::Status { .. } | JobEvent::Complete(_)))) => {
                        let job = self.pending[i].take().expect("event from a pending job");
                        return OfferEvent::Taken(job, e);
                    }
                    Ok(Some(JobEvent::Fail | JobEvent::Exception(_))) | Err(_) | Ok(None) => {
                        self.pending[i] = None;
                        let now = tokio::time::Instant::now();
                        self.back_off(i, now);
                    }
                    Ok(Some(_)) => {}
                },
                _ = sleep_until_opt(next_retry) => {}
            }
        }
    }

    fn back_off(&mut self, i: usize, now: tokio::time::Instant) {
        self.retry_at[i] = now + self.delay[i];
        self.delay[i] = Backoff::RECONNECT.next(self.delay[i]);
    }
}

/// The next event of any pending job, with its index; pending for ever when there is none.
async fn futures_any(
    pending: &mut [Option<ForegroundJob>],
) -> (usize, gearman_client::Result<Option<JobEvent>>) {
    let futures: Vec<_> = pending
        .iter_mut()
        .enumerate()
        .filter_map(|(i, j)| j.as_mut().map(|j| (i, j)))
        .map(|(i, j)| Box::pin(async move { (i, j.next_event().await) }))
        .collect();
    if futures.is_empty() {
        return std::future::pending().await;
    }
    select_all(futures).await
}

/// The first of `futures` to finish.
async fn select_all<F: std::future::Future + Unpin>(mut futures: Vec<F>) -> F::Output {
    std::future::poll_fn(move |cx| {
        for f in futures.iter_mut() {
            if let std::task::Poll::Ready(v) = std::pin::Pin::new(f).poll(cx) {
                return std::task::Poll::Ready(v);
            }
        }
        std::task::Poll::Pending
    })
    .await
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
