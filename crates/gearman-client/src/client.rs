//! The client side: submit jobs, follow foreground jobs, ask for status, echo.
//!
//! A [`Client`] holds at most one live connection at a time, to the first server in its list
//! that answers; when that connection dies the next request fails over to the next server.
//! Each connection is driven by one task that owns the socket: requests reach it over a
//! channel, and it matches the server's replies to them. Gearman servers answer the requests of
//! one connection in order, so replies are matched first-in first-out; WORK_* packets are
//! routed to foreground jobs by job handle.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gearman_proto::{Packet, PacketType};
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::time::Instant;
use tracing::debug;

use crate::addr::ServerAddr;
use crate::connection::{
    arg, Backoff, Connection, Liveness, ProbeDue, Prober, DEFAULT_CONNECT_TIMEOUT,
};
use crate::error::{Error, Result};

/// Queue priority of a submitted job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    fn packet_type(self, background: bool) -> PacketType {
        match (self, background) {
            (Priority::High, false) => PacketType::SubmitJobHigh,
            (Priority::Normal, false) => PacketType::SubmitJob,
            (Priority::Low, false) => PacketType::SubmitJobLow,
            (Priority::High, true) => PacketType::SubmitJobHighBg,
            (Priority::Normal, true) => PacketType::SubmitJobBg,
            (Priority::Low, true) => PacketType::SubmitJobLowBg,
        }
    }
}

/// A job to submit: function name, payload, and optionally a unique id and a priority.
///
/// ```
/// use gearman_client::{JobRequest, Priority};
/// let req = JobRequest::new("lockenv", r#"{"timeout": "10800"}"#)
///     .unique("job-42")
///     .priority(Priority::High);
/// assert_eq!(req.function(), "lockenv");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRequest {
    function: String,
    data: Bytes,
    unique: String,
    priority: Priority,
}

impl JobRequest {
    pub fn new(function: impl Into<String>, data: impl Into<Bytes>) -> JobRequest {
        JobRequest {
            function: function.into(),
            data: data.into(),
            unique: String::new(),
            priority: Priority::Normal,
        }
    }

    /// Sets the unique id. Servers coalesce jobs with the same function and unique id; an
    /// empty unique id (the default) lets the server pick one.
    pub fn unique(mut self, unique: impl Into<String>) -> JobRequest {
        self.unique = unique.into();
        self
    }

    pub fn priority(mut self, priority: Priority) -> JobRequest {
        self.priority = priority;
        self
    }

    pub fn function(&self) -> &str {
        &self.function
    }

    pub fn data(&self) -> &Bytes {
        &self.data
    }

    fn packet(&self, background: bool) -> Packet {
        Packet::req(
            self.priority.packet_type(background),
            [
                Bytes::copy_from_slice(self.function.as_bytes()),
                Bytes::copy_from_slice(self.unique.as_bytes()),
                self.data.clone(),
            ],
        )
    }
}

/// Something a worker reported about a foreground job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    /// WORK_DATA: partial output.
    Data(Bytes),
    /// WORK_WARNING.
    Warning(Bytes),
    /// WORK_STATUS: progress as `numerator / denominator`.
    Status { numerator: u64, denominator: u64 },
    /// WORK_COMPLETE, with the result. Final.
    Complete(Bytes),
    /// WORK_FAIL. Final.
    Fail,
    /// WORK_EXCEPTION, with the exception data. Final.
    Exception(Bytes),
}

impl JobEvent {
    /// Whether no more events follow this one.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            JobEvent::Complete(_) | JobEvent::Fail | JobEvent::Exception(_)
        )
    }
}

/// Reply to GET_STATUS / GET_STATUS_UNIQUE.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobStatus {
    /// The server knows the job (queued or running).
    pub known: bool,
    /// A worker is running it.
    pub running: bool,
    pub numerator: u64,
    pub denominator: u64,
    /// Number of clients waiting for the job (GET_STATUS_UNIQUE only).
    pub waiting_clients: Option<u64>,
}

type EventTx = mpsc::UnboundedSender<Result<JobEvent>>;

/// A submitted foreground job: await its events or its result.
#[derive(Debug)]
pub struct ForegroundJob {
    handle: String,
    server: String,
    events: mpsc::UnboundedReceiver<Result<JobEvent>>,
    finished: bool,
}

impl ForegroundJob {
    /// The server-assigned job handle.
    pub fn handle(&self) -> &str {
        &self.handle
    }

    /// The server the job was submitted to.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The next event; `Ok(None)` once a final event has been returned. Fails if the connection
    /// to the server is lost before the job finished.
    pub async fn next_event(&mut self) -> Result<Option<JobEvent>> {
        if self.finished {
            return Ok(None);
        }
        match self.events.recv().await {
            Some(Ok(ev)) => {
                self.finished = ev.is_final();
                Ok(Some(ev))
            }
            Some(Err(e)) => {
                self.finished = true;
                Err(e)
            }
            None => {
                self.finished = true;
                Err(Error::Disconnected {
                    server: self.server.clone(),
                    reason: "connection task ended before the job finished".into(),
                })
            }
        }
    }

    /// Waits for the job to finish, skipping intermediate events: the WORK_COMPLETE data, or an
    /// error for WORK_FAIL ([`Error::JobFailed`]), WORK_EXCEPTION ([`Error::JobException`]) or a
    /// lost connection.
    pub async fn result(mut self) -> Result<Bytes> {
        loop {
            match self.next_event().await? {
                Some(JobEvent::Complete(data)) => return Ok(data),
                Some(JobEvent::Fail) => {
                    return Err(Error::JobFailed {
                        handle: self.handle,
                    })
                }
                Some(JobEvent::Exception(data)) => {
                    return Err(Error::JobException {
                        handle: self.handle,
                        data,
                    })
                }
                Some(_) => {}
                None => {
                    return Err(Error::Protocol {
                        server: self.server,
                        reason: "job already finished".into(),
                    })
                }
            }
        }
    }
}

/// Tunables of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Timeout of one TCP connect attempt.
    pub connect_timeout: Duration,
    /// How long to wait for the server's reply to a request (JOB_CREATED, STATUS_RES,
    /// ECHO_RES). Not a limit on how long a job may run.
    pub response_timeout: Duration,
    /// Send `OPTION_REQ exceptions` so that WORK_EXCEPTION reaches us (gearmand drops it
    /// otherwise).
    pub exceptions: bool,
    /// How a connection notices a dead server; its jobs then fail with
    /// [`Error::Disconnected`].
    pub liveness: Liveness,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: Duration::from_secs(30),
            exceptions: true,
            liveness: Liveness::default(),
        }
    }
}

/// A Gearman client. Cheap to clone; clones share the connection.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<ClientInner>,
}

#[derive(Debug)]
struct ClientInner {
    servers: Vec<ServerAddr>,
    opts: ClientOptions,
    state: Mutex<ConnState>,
}

#[derive(Debug, Default)]
struct ConnState {
    conn: Option<ConnHandle>,
    /// Index of the server to try first: the last one that answered.
    next: usize,
}

#[derive(Debug, Clone)]
struct ConnHandle {
    tx: mpsc::UnboundedSender<Request>,
    server: String,
}

impl Client {
    /// A client for `servers` with default options. Connects lazily, on the first request.
    pub fn new(servers: impl IntoIterator<Item = ServerAddr>) -> Client {
        Client::with_options(servers, ClientOptions::default())
    }

    pub fn with_options(
        servers: impl IntoIterator<Item = ServerAddr>,
        opts: ClientOptions,
    ) -> Client {
        Client {
            inner: Arc::new(ClientInner {
                servers: servers.into_iter().collect(),
                opts,
                state: Mutex::new(ConnState::default()),
            }),
        }
    }

    /// A client connected to the first of `servers` that answers.
    pub async fn connect(servers: impl IntoIterator<Item = ServerAddr>) -> Result<Client> {
        let client = Client::new(servers);
        client.connection().await?;
        Ok(client)
    }

    /// The servers this client may use, in order of preference.
    pub fn servers(&self) -> &[ServerAddr] {
        &self.inner.servers
    }

    /// Waits until some server accepts a connection, retrying with backoff up to `timeout`.
    pub async fn wait_for_server(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now().checked_add(timeout);
        let backoff = Backoff::STARTUP;
        let mut delay = backoff.initial;
        loop {
            match self.connection().await {
                Ok(_) => return Ok(()),
                Err(e)
                    if deadline.is_some_and(|d| {
                        Instant::now().checked_add(delay).is_none_or(|t| t >= d)
                    }) =>
                {
                    return Err(e)
                }
                Err(e) => debug!(error = %e, "no server yet"),
            }
            tokio::time::sleep(delay).await;
            delay = backoff.next(delay);
        }
    }

    /// Submits a foreground job; returns once the server has accepted it (JOB_CREATED).
    pub async fn submit(&self, req: JobRequest) -> Result<ForegroundJob> {
        let (etx, erx) = mpsc::unbounded_channel();
        let packet = req.packet(false);
        let (handle, server) = self
            .request("JOB_CREATED", |reply| Request::Submit {
                packet: packet.clone(),
                events: Some(etx.clone()),
                reply,
            })
            .await?;
        Ok(ForegroundJob {
            handle,
            server,
            events: erx,
            finished: false,
        })
    }

    /// Submits a foreground job and waits for its result (see [`ForegroundJob::result`]).
    pub async fn call(&self, function: &str, data: impl Into<Bytes>) -> Result<Bytes> {
        self.submit(JobRequest::new(function, data))
            .await?
            .result()
            .await
    }

    /// Submits a background job; returns its job handle.
    pub async fn submit_background(&self, req: JobRequest) -> Result<String> {
        let packet = req.packet(true);
        let (handle, _) = self
            .request("JOB_CREATED", |reply| Request::Submit {
                packet: packet.clone(),
                events: None,
                reply,
            })
            .await?;
        Ok(handle)
    }

    /// GET_STATUS for a job handle. Asks the server the client is currently connected to,
    /// which is the one that created the job unless the client has failed over since.
    pub async fn get_status(&self, handle: &str) -> Result<JobStatus> {
        let packet = Packet::req(
            PacketType::GetStatus,
            [Bytes::copy_from_slice(handle.as_bytes())],
        );
        self.request("STATUS_RES", |reply| Request::Status {
            packet: packet.clone(),
            reply,
        })
        .await
        .map(|(s, _)| s)
    }

    /// GET_STATUS_UNIQUE for a unique id (gearmand extension).
    pub async fn get_status_unique(&self, unique: &str) -> Result<JobStatus> {
        let packet = Packet::req(
            PacketType::GetStatusUnique,
            [Bytes::copy_from_slice(unique.as_bytes())],
        );
        self.request("STATUS_RES_UNIQUE", |reply| Request::StatusUnique {
            packet: packet.clone(),
            reply,
        })
        .await
        .map(|(s, _)| s)
    }

    /// ECHO_REQ: the server sends `data` back. A cheap liveness check (gearmand; geard ignores
    /// ECHO_REQ, so against geard this ends in [`Error::Timeout`]).
    pub async fn echo(&self, data: impl Into<Bytes>) -> Result<Bytes> {
        let data = data.into();
        self.request("ECHO_RES", |reply| Request::Echo {
            packet: Packet::req(PacketType::EchoReq, [data.clone()]),
            reply,
        })
        .await
        .map(|(d, _)| d)
    }

    /// Sends a request built by `make` and waits for its reply, together with the name of the
    /// server that answered. A request that could not be handed to a connection task (it died
    /// in between) is retried once on a fresh connection: it was never written, so resending
    /// cannot run a job twice.
    async fn request<T>(
        &self,
        what: &str,
        make: impl Fn(oneshot::Sender<Result<T>>) -> Request,
    ) -> Result<(T, String)> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let conn = self.connection().await?;
            let (tx, rx) = oneshot::channel();
            if conn.tx.send(make(tx)).is_err() {
                self.forget(&conn).await;
                if attempts < 2 {
                    continue;
                }
                return Err(Error::Disconnected {
                    server: conn.server,
                    reason: "connection closed".into(),
                });
            }
            let after = self.inner.opts.response_timeout;
            return match tokio::time::timeout(after, rx).await {
                Ok(Ok(r)) => r.map(|v| (v, conn.server)),
                Ok(Err(_)) => Err(Error::Disconnected {
                    server: conn.server,
                    reason: "connection task ended".into(),
                }),
                Err(_) => {
                    // A server that does not answer is no better than a dead one: the next
                    // request goes to the next server of the list.
                    self.forget(&conn).await;
                    Err(Error::Timeout {
                        what: format!("{what} from {}", conn.server),
                        after,
                    })
                }
            };
        }
    }

    async fn forget(&self, dead: &ConnHandle) {
        let mut st = self.inner.state.lock().await;
        if st
            .conn
            .as_ref()
            .is_some_and(|c| c.tx.same_channel(&dead.tx))
        {
            st.conn = None;
            st.next = (st.next + 1) % self.inner.servers.len().max(1);
        }
    }

    /// The live connection, opening one if needed: servers are tried in order, starting with
    /// the last one that answered.
    async fn connection(&self) -> Result<ConnHandle> {
        let mut st = self.inner.state.lock().await;
        if let Some(c) = &st.conn {
            if !c.tx.is_closed() {
                return Ok(c.clone());
            }
            debug!(server = %c.server, "connection gone; failing over");
            st.conn = None;
            st.next = (st.next + 1) % self.inner.servers.len().max(1);
        }
        let servers = &self.inner.servers;
        if servers.is_empty() {
            return Err(Error::NoServer {
                tried: "no servers configured".into(),
            });
        }
        let mut tried = Vec::new();
        for i in 0..servers.len() {
            let idx = (st.next + i) % servers.len();
            let server = &servers[idx];
            let opts = &self.inner.opts;
            match Connection::connect_with(server, opts.connect_timeout, opts.liveness.keepalive)
                .await
            {
                Ok(conn) => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    let prober = Prober::new(&opts.liveness);
                    tokio::spawn(run_connection(conn, rx, opts.exceptions, prober));
                    let handle = ConnHandle {
                        tx,
                        server: server.to_string(),
                    };
                    st.next = idx;
                    st.conn = Some(handle.clone());
                    return Ok(handle);
                }
                Err(e) => {
                    debug!(server = %server, error = %e, "server unavailable");
                    tried.push(e.to_string());
                }
            }
        }
        Err(Error::NoServer {
            tried: tried.join("; "),
        })
    }
}

/// A request handed to a connection task.
#[derive(Debug)]
enum Request {
    Submit {
        packet: Packet,
        events: Option<EventTx>,
        reply: oneshot::Sender<Result<String>>,
    },
    Status {
        packet: Packet,
        reply: oneshot::Sender<Result<JobStatus>>,
    },
    StatusUnique {
        packet: Packet,
        reply: oneshot::Sender<Result<JobStatus>>,
    },
    Echo {
        packet: Packet,
        reply: oneshot::Sender<Result<Bytes>>,
    },
}

/// A request written to the server, waiting for its reply.
#[derive(Debug)]
enum Pending {
    Submit {
        events: Option<EventTx>,
        reply: oneshot::Sender<Result<String>>,
    },
    Status(oneshot::Sender<Result<JobStatus>>),
    StatusUnique(oneshot::Sender<Result<JobStatus>>),
    Echo(oneshot::Sender<Result<Bytes>>),
    /// OPTION_REQ; some servers (geard) never answer it, so it is dropped when a later reply
    /// overtakes it.
    Option,
    /// A liveness probe (ECHO_REQ); dropped like `Option` by servers that ignore it.
    Probe,
}

impl Pending {
    fn reply_type(&self) -> PacketType {
        match self {
            Pending::Submit { .. } => PacketType::JobCreated,
            Pending::Status(_) => PacketType::StatusRes,
            Pending::StatusUnique(_) => PacketType::StatusResUnique,
            Pending::Echo(_) => PacketType::EchoRes,
            Pending::Option => PacketType::OptionRes,
            Pending::Probe => PacketType::EchoRes,
        }
    }

    /// Whether the server may never answer this (so it must not hold a connection open).
    fn optional(&self) -> bool {
        matches!(self, Pending::Option | Pending::Probe)
    }

    fn fail(self, err: Error) {
        // The requester may have given up (timeout); nobody to tell then.
        match self {
            Pending::Submit { reply, .. } => drop(reply.send(Err(err))),
            Pending::Status(r) | Pending::StatusUnique(r) => drop(r.send(Err(err))),
            Pending::Echo(r) => drop(r.send(Err(err))),
            Pending::Option | Pending::Probe => {}
        }
    }
}

/// State of one client connection task.
struct ConnTask {
    server: String,
    pending: VecDeque<Pending>,
    /// Foreground jobs by handle. Several submits with the same unique id share a handle.
    jobs: HashMap<Bytes, Vec<EventTx>>,
}

async fn run_connection(
    mut conn: Connection,
    mut rx: mpsc::UnboundedReceiver<Request>,
    exceptions: bool,
    mut prober: Prober,
) {
    let mut task = ConnTask {
        server: conn.server().to_string(),
        pending: VecDeque::new(),
        jobs: HashMap::new(),
    };
    let mut reason = String::from("client closed");
    if prober.enabled() {
        match conn.send(Prober::probe_packet()).await {
            Ok(()) => {
                prober.sent();
                task.pending.push_back(Pending::Probe);
            }
            Err(e) => reason = e.to_string(),
        }
    }
    if exceptions {
        match conn
            .send(Packet::req(
                PacketType::OptionReq,
                [Bytes::from_static(b"exceptions")],
            ))
            .await
        {
            Ok(()) => task.pending.push_back(Pending::Option),
            Err(e) => reason = e.to_string(),
        }
    }
    let mut requests_open = true;
    loop {
        if !requests_open {
            task.jobs.retain(|_, txs| {
                txs.retain(|t| !t.is_closed());
                !txs.is_empty()
            });
            if task.jobs.is_empty() && task.pending.iter().all(Pending::optional) {
                break;
            }
        }
        let probe_at = prober.deadline();
        tokio::select! {
            req = rx.recv(), if requests_open => match req {
                None => requests_open = false,
                Some(req) => {
                    let (packet, pending) = match req {
                        Request::Submit { packet, events, reply } => {
                            (packet, Pending::Submit { events, reply })
                        }
                        Request::Status { packet, reply } => (packet, Pending::Status(reply)),
                        Request::StatusUnique { packet, reply } => {
                            (packet, Pending::StatusUnique(reply))
                        }
                        Request::Echo { packet, reply } => (packet, Pending::Echo(reply)),
                    };
                    if let Err(e) = conn.send(packet).await {
                        reason = e.to_string();
                        pending.fail(e);
                        break;
                    }
                    task.pending.push_back(pending);
                }
            },
            _ = sleep_until_some(probe_at) => match prober.due() {
                Some(ProbeDue::Send) => {
                    if let Err(e) = conn.send(Prober::probe_packet()).await {
                        reason = e.to_string();
                        break;
                    }
                    prober.sent();
                    task.pending.push_back(Pending::Probe);
                }
                Some(ProbeDue::Dead) => {
                    reason = prober.dead_reason();
                    break;
                }
                None => {}
            },
            res = conn.recv() => match res {
                Ok(Some(p)) => {
                    prober.heard(p.ptype);
                    task.handle(p)
                }
                Ok(None) => {
                    reason = "server closed the connection".into();
                    break;
                }
                Err(e) => {
                    reason = e.to_string();
                    break;
                }
            },
        }
    }
    debug!(server = %task.server, %reason, "client connection ends");
    // Whatever is still outstanding will never be answered: tell every waiter now rather than
    // let it hang.
    let lost = |server: &str| Error::Disconnected {
        server: server.to_string(),
        reason: reason.clone(),
    };
    for p in task.pending.drain(..) {
        p.fail(lost(&task.server));
    }
    for (_, txs) in task.jobs.drain() {
        for tx in txs {
            let _ = tx.send(Err(lost(&task.server)));
        }
    }
}

/// Sleeps until `at`, or for ever.
pub(crate) async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn parse_num(b: &[u8]) -> u64 {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn parse_flag(b: &[u8]) -> bool {
    parse_num(b) != 0
}

impl ConnTask {
    /// Removes and returns the pending request that a reply of type `ptype` answers.
    fn take_pending(&mut self, ptype: PacketType) -> Option<Pending> {
        while self
            .pending
            .front()
            .is_some_and(|p| p.optional() && p.reply_type() != ptype)
        {
            debug!(server = %self.server, "server did not answer OPTION_REQ or ECHO_REQ");
            self.pending.pop_front();
        }
        let pos = self.pending.iter().position(|p| p.reply_type() == ptype);
        match pos {
            Some(0) => self.pending.pop_front(),
            Some(i) => {
                debug!(server = %self.server, %ptype, "reply out of order");
                self.pending.remove(i)
            }
            None => {
                debug!(server = %self.server, %ptype, "unsolicited reply ignored");
                None
            }
        }
    }

    fn handle(&mut self, p: Packet) {
        match p.ptype {
            PacketType::JobCreated => {
                if let Some(Pending::Submit { events, reply }) = self.take_pending(p.ptype) {
                    let handle = arg(&p, 0);
                    if let Some(events) = events {
                        self.jobs.entry(handle.clone()).or_default().push(events);
                    }
                    let _ = reply.send(Ok(String::from_utf8_lossy(&handle).into_owned()));
                }
            }
            PacketType::StatusRes | PacketType::StatusResUnique => {
                let unique = p.ptype == PacketType::StatusResUnique;
                let status = JobStatus {
                    known: parse_flag(p.arg(1)),
                    running: parse_flag(p.arg(2)),
                    numerator: parse_num(p.arg(3)),
                    denominator: parse_num(p.arg(4)),
                    waiting_clients: unique.then(|| parse_num(p.arg(5))),
                };
                match self.take_pending(p.ptype) {
                    Some(Pending::Status(r)) | Some(Pending::StatusUnique(r)) => {
                        let _ = r.send(Ok(status));
                    }
                    _ => {}
                }
            }
            PacketType::EchoRes => {
                if let Some(Pending::Echo(r)) = self.take_pending(p.ptype) {
                    let _ = r.send(Ok(arg(&p, 0)));
                }
            }
            PacketType::OptionRes => {
                self.take_pending(p.ptype);
            }
            PacketType::Error => {
                let code = String::from_utf8_lossy(p.arg(0)).into_owned();
                let text = String::from_utf8_lossy(p.arg(1)).into_owned();
                debug!(server = %self.server, %code, %text, "ERROR from server");
                match self.pending.pop_front() {
                    Some(p) if p.optional() => {
                        debug!(server = %self.server, "server refused OPTION_REQ or ECHO_REQ");
                    }
                    Some(pending) => pending.fail(Error::Server {
                        server: self.server.clone(),
                        code,
                        text,
                    }),
                    None => {}
                }
            }
            PacketType::WorkData
            | PacketType::WorkWarning
            | PacketType::WorkStatus
            | PacketType::WorkComplete
            | PacketType::WorkFail
            | PacketType::WorkException => self.job_event(p),
            other => debug!(server = %self.server, ptype = %other, "unexpected packet ignored"),
        }
    }

    fn job_event(&mut self, p: Packet) {
        let event = match p.ptype {
            PacketType::WorkData => JobEvent::Data(arg(&p, 1)),
            PacketType::WorkWarning => JobEvent::Warning(arg(&p, 1)),
            PacketType::WorkStatus => JobEvent::Status {
                numerator: parse_num(p.arg(1)),
                denominator: parse_num(p.arg(2)),
            },
            PacketType::WorkComplete => JobEvent::Complete(arg(&p, 1)),
            PacketType::WorkFail => JobEvent::Fail,
            PacketType::WorkException => JobEvent::Exception(arg(&p, 1)),
            _ => return,
        };
        let handle = arg(&p, 0);
        let Some(txs) = self.jobs.get_mut(&handle) else {
            debug!(server = %self.server, handle = %String::from_utf8_lossy(&handle), "event for unknown job");
            return;
        };
        // A receiver that was dropped just means the caller lost interest.
        txs.retain(|tx| tx.send(Ok(event.clone())).is_ok());
        if event.is_final() || txs.is_empty() {
            self.jobs.remove(&handle);
        }
    }
}
