//! The worker side: register functions with every server, grab jobs, answer them.
//!
//! A [`Worker`] runs one task ("link") per server. Each link owns its connection, reconnects
//! with backoff when it drops, and re-sends the worker's abilities (CAN_DO ...) from the state
//! shared by all links, so a restarted server learns them again.
//!
//! Links only ask for work (GRAB_JOB_UNIQ) while a caller is waiting in
//! [`Worker::grab_job`]: a job grabbed early would sit here while another worker could be
//! running it — for testenv, a test environment locked for nothing. Between jobs a link follows
//! the protocol's sleep cycle: NO_JOB → PRE_SLEEP → (server's NOOP) → grab again.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use gearman_proto::{Packet, PacketType};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::addr::ServerAddr;
use crate::client::sleep_until_some;
use crate::connection::{
    arg, Backoff, Connection, Liveness, ProbeDue, Prober, DEFAULT_CONNECT_TIMEOUT,
};
use crate::error::{Error, Result};
use crate::job::{Job, Outgoing};

/// Tunables of a [`Worker`].
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Sent as SET_CLIENT_ID on every connection (shows up in gearmand's `workers` listing).
    pub client_id: Option<String>,
    /// Delay between reconnection attempts.
    pub backoff: Backoff,
    /// Timeout of one TCP connect attempt.
    pub connect_timeout: Duration,
    /// How a connection notices a dead server; the link then reconnects (jobs taken on it can
    /// no longer be answered).
    pub liveness: Liveness,
    /// A connection given up because its server stopped answering probes, while it still
    /// holds jobs, is kept open (unread) until the worker stops, instead of closed. A server
    /// that was only stopped or hung then never reads an end-of-file from it, which would say
    /// "this worker's process is gone" (tebroker fails such a job with WORK_FAIL, and a
    /// testenv-worker reads that as its holder's death). Off by default.
    pub keep_abandoned_connections: bool,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            client_id: None,
            backoff: Backoff::default(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            liveness: Liveness::default(),
            keep_abandoned_connections: false,
        }
    }
}

/// A Gearman worker registered with every given server. Cheap to clone; clones share state.
///
/// Must be created inside a tokio runtime (it spawns one task per server).
#[derive(Clone, Debug)]
pub struct Worker {
    core: Arc<Core>,
}

#[derive(Debug)]
struct Core {
    shared: Arc<Shared>,
    links: Vec<mpsc::UnboundedSender<Control>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// State the worker handle and its links share.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Signalled when a job lands in `State::queue`.
    job_ready: Notify,
    /// Bumped when callers start waiting for jobs, so links grab.
    demand: watch::Sender<()>,
    /// Number of links currently connected and registered.
    connected: watch::Sender<usize>,
}

#[derive(Debug, Default)]
struct State {
    /// Function name → CAN_DO_TIMEOUT seconds (None: plain CAN_DO).
    abilities: BTreeMap<String, Option<u32>>,
    client_id: Option<String>,
    paused: bool,
    stopped: bool,
    /// Callers blocked in `grab_job`.
    waiters: usize,
    /// Jobs assigned but not yet handed to a caller.
    queue: VecDeque<Job>,
}

impl State {
    fn wants_jobs(&self) -> bool {
        !self.paused && !self.stopped && self.waiters > self.queue.len()
    }

    /// What every connection should have advertised right now.
    fn advertised(&self) -> BTreeMap<String, Option<u32>> {
        if self.paused {
            BTreeMap::new()
        } else {
            self.abilities.clone()
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves consistent-enough data; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The first wait before abilities are sent again after an ERROR, doubling up to the second.
const RESYNC_FIRST: Duration = Duration::from_millis(500);
const RESYNC_MAX: Duration = Duration::from_secs(30);

/// Commands from the worker handle to its links. Ability changes are not carried in the
/// message: the link re-reads the shared state, so a link that was reconnecting meanwhile
/// cannot miss or reorder one.
#[derive(Debug, Clone, Copy)]
enum Control {
    /// Abilities or pause state changed: bring the server up to date.
    Sync,
    /// Send RESET_ABILITIES, then sync.
    Reset,
    /// Send SET_CLIENT_ID.
    ClientId,
    /// Stop grabbing; close once every job taken on this connection is answered.
    Shutdown,
}

impl Worker {
    /// A worker for `servers` with default options; it connects in the background.
    pub fn new(servers: impl IntoIterator<Item = ServerAddr>) -> Worker {
        Worker::with_options(servers, WorkerOptions::default())
    }

    pub fn with_options(
        servers: impl IntoIterator<Item = ServerAddr>,
        opts: WorkerOptions,
    ) -> Worker {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                client_id: opts.client_id.clone(),
                ..State::default()
            }),
            job_ready: Notify::new(),
            demand: watch::channel(()).0,
            connected: watch::channel(0).0,
        });
        let mut links = Vec::new();
        let mut tasks = Vec::new();
        for server in servers {
            let (tx, rx) = mpsc::unbounded_channel();
            let link = Link {
                server,
                shared: shared.clone(),
                ctl: rx,
                demand: shared.demand.subscribe(),
                opts: opts.clone(),
                draining: false,
                abandoned: Mutex::new(Vec::new()),
            };
            tasks.push(tokio::spawn(link.run()));
            links.push(tx);
        }
        Worker {
            core: Arc::new(Core {
                shared,
                links,
                tasks: Mutex::new(tasks),
            }),
        }
    }

    fn control(&self, c: Control) {
        for link in &self.core.links {
            let _ = link.send(c);
        }
    }

    fn update(&self, f: impl FnOnce(&mut State), c: Control) {
        f(&mut self.core.shared.lock());
        self.control(c);
    }

    /// CAN_DO `function` on every server, now and after every reconnect.
    pub fn register(&self, function: impl Into<String>) {
        let function = function.into();
        self.update(
            |s| {
                s.abilities.insert(function, None);
            },
            Control::Sync,
        );
    }

    /// CAN_DO_TIMEOUT: the server may give up on a job of `function` after `timeout_secs`.
    pub fn register_with_timeout(&self, function: impl Into<String>, timeout_secs: u32) {
        let function = function.into();
        self.update(
            |s| {
                s.abilities.insert(function, Some(timeout_secs));
            },
            Control::Sync,
        );
    }

    /// CANT_DO `function` on every server.
    pub fn unregister(&self, function: &str) {
        self.update(
            |s| {
                s.abilities.remove(function);
            },
            Control::Sync,
        );
    }

    /// RESET_ABILITIES on every server: forget all functions.
    pub fn reset_abilities(&self) {
        self.update(|s| s.abilities.clear(), Control::Reset);
    }

    /// SET_CLIENT_ID on every server, now and after every reconnect.
    pub fn set_client_id(&self, id: impl Into<String>) {
        let id = id.into();
        self.update(|s| s.client_id = Some(id), Control::ClientId);
    }

    /// The registered functions.
    pub fn functions(&self) -> Vec<String> {
        self.core.shared.lock().abilities.keys().cloned().collect()
    }

    /// Stops taking jobs: CANT_DO for every function on every server, so the servers hand the
    /// work to other workers. A job already running is not affected.
    pub fn pause(&self) {
        self.update(|s| s.paused = true, Control::Sync);
    }

    /// Undoes [`pause`](Worker::pause): CAN_DO again and grab if a caller is waiting.
    pub fn resume(&self) {
        self.update(|s| s.paused = false, Control::Sync);
        self.core.shared.demand.send_replace(());
    }

    pub fn is_paused(&self) -> bool {
        self.core.shared.lock().paused
    }

    /// Stops asking servers for jobs and wakes every [`grab_job`](Worker::grab_job) caller.
    /// Connections stay open so that jobs already handed out can still be answered. Jobs the
    /// servers had already assigned are still returned by `grab_job`, which then returns `None`.
    pub fn stop(&self) {
        self.core.shared.lock().stopped = true;
        self.core.shared.job_ready.notify_waiters();
    }

    /// Graceful shutdown: [`stop`](Worker::stop), fail (WORK_FAIL) jobs assigned but never
    /// handed out, then wait until every job handed out has been answered (or dropped) and
    /// close all connections.
    pub async fn shutdown(&self) {
        self.stop();
        let queued = std::mem::take(&mut self.core.shared.lock().queue);
        drop(queued);
        self.control(Control::Shutdown);
        let tasks = std::mem::take(&mut *self.core.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Waits for the next job from any server. Returns `None` once the worker is stopped.
    ///
    /// Cancel-safe: dropping the future loses no job (a job that arrives afterwards is kept for
    /// the next call).
    pub async fn grab_job(&self) -> Option<Job> {
        let shared = &self.core.shared;
        let _waiting = WaiterGuard::new(shared);
        loop {
            let notified = shared.job_ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = shared.lock();
                if let Some(job) = st.queue.pop_front() {
                    return Some(job);
                }
                if st.stopped {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Waits until at least one server connection is up and registered.
    pub async fn wait_for_server(&self, timeout: Duration) -> Result<()> {
        self.wait_connected(1, timeout).await
    }

    /// Waits until connections to all servers are up and registered.
    pub async fn wait_for_all_servers(&self, timeout: Duration) -> Result<()> {
        self.wait_connected(self.core.links.len(), timeout).await
    }

    async fn wait_connected(&self, n: usize, timeout: Duration) -> Result<()> {
        let mut rx = self.core.shared.connected.subscribe();
        let reached = tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n))
            .await
            .is_ok();
        match reached {
            true => Ok(()),
            false => Err(Error::Timeout {
                what: format!("{n} worker connection(s)"),
                after: timeout,
            }),
        }
    }

    /// Number of servers currently connected and registered.
    pub fn connected_servers(&self) -> usize {
        *self.core.shared.connected.borrow()
    }
}

/// Counts a `grab_job` caller for as long as it waits, so links grab exactly while needed.
struct WaiterGuard<'a>(&'a Shared);

impl<'a> WaiterGuard<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.lock().waiters += 1;
        shared.demand.send_replace(());
        WaiterGuard(shared)
    }
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.waiters = st.waiters.saturating_sub(1);
    }
}

/// Counts a connection in `Shared::connected` from registration until it ends.
struct ConnectedGuard(Arc<Shared>);

impl ConnectedGuard {
    fn new(shared: Arc<Shared>) -> Self {
        shared.connected.send_modify(|n| *n += 1);
        ConnectedGuard(shared)
    }
}

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        self.0.connected.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Where a connection is in the grab cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grab {
    /// May have work: grab as soon as a caller waits.
    Idle,
    /// GRAB_JOB_UNIQ sent, waiting for JOB_ASSIGN_UNIQ or NO_JOB.
    Grabbing,
    /// PRE_SLEEP sent: wait for NOOP.
    Sleeping,
}

/// The task serving one server: connect, register, grab, reconnect.
struct Link {
    server: ServerAddr,
    shared: Arc<Shared>,
    ctl: mpsc::UnboundedReceiver<Control>,
    demand: watch::Receiver<()>,
    opts: WorkerOptions,
    draining: bool,
    /// Connections given up while holding jobs (see
    /// [`WorkerOptions::keep_abandoned_connections`]); closed when the link ends.
    /// (A mutex only so that `&Link` is `Sync`: transports are `Send` but not `Sync`.)
    abandoned: Mutex<Vec<Connection>>,
}

/// Per-connection state of a link.
struct Session {
    conn: Connection,
    server: String,
    grab: Grab,
    /// What this connection has advertised (CAN_DO / CAN_DO_TIMEOUT).
    sent: BTreeMap<String, Option<u32>>,
    /// Jobs handed out from this connection and not answered yet.
    in_flight: HashSet<Bytes>,
    out_tx: mpsc::UnboundedSender<Outgoing>,
    prober: Prober,
    /// When to send every ability again after the server refused something (ERROR): e.g.
    /// tebroker refuses a callback function still held by our previous connection, which it
    /// has not yet seen close; once it has, the same CAN_DO succeeds.
    resync_at: Option<tokio::time::Instant>,
    resync_delay: Duration,
}

impl Link {
    async fn run(mut self) {
        let mut delay = self.opts.backoff.initial;
        while !self.draining {
            let server = self.server.clone();
            let connected = tokio::select! {
                r = Connection::connect_with(&server, self.opts.connect_timeout, self.opts.liveness.keepalive) => r,
                _ = self.until_shutdown() => return,
            };
            match connected {
                Err(e @ Error::TlsConfig { .. }) => {
                    warn!(server = %server, error = %e, "worker link gives up");
                    return;
                }
                Err(e) => {
                    debug!(server = %server, error = %e, ?delay, "worker cannot connect; retrying")
                }
                Ok(conn) => {
                    delay = self.opts.backoff.initial;
                    let (out_tx, out_rx) = mpsc::unbounded_channel();
                    let session = Session {
                        conn,
                        server: server.to_string(),
                        grab: Grab::Idle,
                        sent: BTreeMap::new(),
                        in_flight: HashSet::new(),
                        out_tx,
                        prober: Prober::new(&self.opts.liveness),
                        resync_at: None,
                        resync_delay: RESYNC_FIRST,
                    };
                    match self.serve(session, out_rx).await {
                        Ok(()) => return,
                        Err(e) => {
                            debug!(server = %server, error = %e, "worker connection lost; reconnecting")
                        }
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.until_shutdown() => return,
            }
            delay = self.opts.backoff.next(delay);
        }
    }

    /// Resolves when the worker asks this link to shut down (or is dropped).
    async fn until_shutdown(&mut self) {
        loop {
            match self.ctl.recv().await {
                None | Some(Control::Shutdown) => {
                    self.begin_shutdown();
                    return;
                }
                // Applied from the shared state once connected.
                Some(_) => {}
            }
        }
    }

    fn begin_shutdown(&mut self) {
        self.draining = true;
        // Nobody can take queued jobs any more once the worker handle is gone; dropping them
        // answers WORK_FAIL rather than leaving their clients waiting.
        let queued = std::mem::take(&mut self.shared.lock().queue);
        drop(queued);
    }

    /// Runs one connection. `Ok` means a clean shutdown, `Err` a lost connection.
    async fn serve(
        &mut self,
        mut s: Session,
        mut out_rx: mpsc::UnboundedReceiver<Outgoing>,
    ) -> Result<()> {
        // The first packet, so that the server's first answer tells whether it echoes.
        if s.prober.enabled() {
            s.send(Prober::probe_packet()).await?;
            s.prober.sent();
        }
        let client_id = self.shared.lock().client_id.clone();
        if let Some(id) = client_id {
            s.send(Packet::req(PacketType::SetClientId, [Bytes::from(id)]))
                .await?;
        }
        self.sync(&mut s).await?;
        let _registered = ConnectedGuard::new(self.shared.clone());
        self.maybe_grab(&mut s).await?;
        loop {
            if self.draining && s.in_flight.is_empty() && s.grab != Grab::Grabbing {
                debug!(server = %s.server, "worker connection closes");
                return Ok(());
            }
            let probe_at = s.prober.deadline();
            let resync_at = s.resync_at;
            tokio::select! {
                _ = sleep_until_some(resync_at) => {
                    s.resync_at = None;
                    debug!(server = %s.server, "sending every ability again after an ERROR");
                    s.sent.clear();
                    self.sync(&mut s).await?;
                }
                _ = sleep_until_some(probe_at) => match s.prober.due() {
                    Some(ProbeDue::Send) => {
                        s.send(Prober::probe_packet()).await?;
                        s.prober.sent();
                    }
                    Some(ProbeDue::Dead) => {
                        let reason = s.prober.dead_reason();
                        warn!(server = %s.server, %reason, "worker connection dead; reconnecting");
                        if self.opts.keep_abandoned_connections && !s.in_flight.is_empty() {
                            debug!(server = %s.server, jobs = s.in_flight.len(), "keeping the abandoned connection open");
                            self.abandoned
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(s.conn);
                        }
                        return Err(Error::Disconnected { server: s.server.clone(), reason });
                    }
                    None => {}
                },
                c = self.ctl.recv(), if !self.draining => match c {
                    None | Some(Control::Shutdown) => self.begin_shutdown(),
                    Some(Control::Sync) => self.sync(&mut s).await?,
                    Some(Control::Reset) => {
                        s.send(Packet::req(PacketType::ResetAbilities, Vec::<Bytes>::new())).await?;
                        s.sent.clear();
                        self.sync(&mut s).await?;
                    }
                    Some(Control::ClientId) => {
                        let id = self.shared.lock().client_id.clone();
                        if let Some(id) = id {
                            s.send(Packet::req(PacketType::SetClientId, [Bytes::from(id)])).await?;
                        }
                    }
                },
                r = self.demand.changed(), if !self.draining => {
                    if r.is_ok() {
                        self.maybe_grab(&mut s).await?;
                    }
                }
                Some(out) = out_rx.recv() => {
                    let written = s.send(out.packet).await;
                    if let Some(handle) = &out.finishes {
                        s.in_flight.remove(handle);
                    }
                    let failed = written.as_ref().err().map(|e| e.to_string());
                    if let Some(ack) = out.ack {
                        let _ = ack.send(written);
                    }
                    if let Some(reason) = failed {
                        return Err(Error::Disconnected { server: s.server.clone(), reason });
                    }
                }
                r = s.conn.recv() => match r? {
                    Some(p) => {
                        s.prober.heard(p.ptype);
                        self.handle(&mut s, p).await?
                    }
                    None => {
                        return Err(Error::Disconnected {
                            server: s.server.clone(),
                            reason: "server closed the connection".into(),
                        })
                    }
                },
            }
        }
    }

    /// Brings the server's view of our abilities in line with the shared state.
    async fn sync(&self, s: &mut Session) -> Result<()> {
        let want = self.shared.lock().advertised();
        let gone: Vec<String> = s
            .sent
            .keys()
            .filter(|f| !want.contains_key(*f))
            .cloned()
            .collect();
        for f in gone {
            s.send(Packet::req(PacketType::CantDo, [Bytes::from(f.clone())]))
                .await?;
            s.sent.remove(&f);
        }
        let mut added = false;
        for (f, timeout) in want {
            if s.sent.get(&f) == Some(&timeout) {
                continue;
            }
            let name = Bytes::from(f.clone());
            let p = match timeout {
                None => Packet::req(PacketType::CanDo, [name]),
                Some(t) => {
                    Packet::req(PacketType::CanDoTimeout, [name, Bytes::from(t.to_string())])
                }
            };
            s.send(p).await?;
            s.sent.insert(f, timeout);
            added = true;
        }
        // A job for a new function may already be queued; the server owes a sleeping worker no
        // NOOP for it, so look for ourselves.
        if added && s.grab == Grab::Sleeping {
            s.grab = Grab::Idle;
        }
        self.maybe_grab(s).await
    }

    async fn maybe_grab(&self, s: &mut Session) -> Result<()> {
        if s.grab == Grab::Idle && !self.draining && self.shared.lock().wants_jobs() {
            s.send(Packet::req(PacketType::GrabJobUniq, Vec::<Bytes>::new()))
                .await?;
            s.grab = Grab::Grabbing;
        }
        Ok(())
    }

    async fn handle(&mut self, s: &mut Session, p: Packet) -> Result<()> {
        match p.ptype {
            PacketType::Noop => {
                if s.grab != Grab::Grabbing {
                    s.grab = Grab::Idle;
                    self.maybe_grab(s).await?;
                }
            }
            PacketType::NoJob => {
                s.grab = Grab::Sleeping;
                s.send(Packet::req(PacketType::PreSleep, Vec::<Bytes>::new()))
                    .await?;
            }
            PacketType::JobAssign | PacketType::JobAssignUniq | PacketType::JobAssignAll => {
                let (unique, data) = match p.ptype {
                    PacketType::JobAssign => (Bytes::new(), arg(&p, 2)),
                    PacketType::JobAssignUniq => (arg(&p, 2), arg(&p, 3)),
                    _ => (arg(&p, 2), arg(&p, 4)),
                };
                let handle = arg(&p, 0);
                let job = Job::new(
                    handle.clone(),
                    String::from_utf8_lossy(p.arg(1)).into_owned(),
                    String::from_utf8_lossy(&unique).into_owned(),
                    data,
                    s.server.clone(),
                    s.out_tx.clone(),
                );
                debug!(server = %s.server, handle = job.handle(), function = job.function(), "job assigned");
                s.grab = Grab::Idle;
                s.in_flight.insert(handle);
                if self.draining {
                    warn!(server = %s.server, handle = job.handle(), "job assigned while shutting down; failing it");
                    drop(job);
                } else {
                    self.shared.lock().queue.push_back(job);
                    self.shared.job_ready.notify_waiters();
                    self.maybe_grab(s).await?;
                }
            }
            PacketType::Error => {
                let code = String::from_utf8_lossy(p.arg(0));
                let text = String::from_utf8_lossy(p.arg(1));
                warn!(server = %s.server, %code, %text, "ERROR from server");
                if s.resync_at.is_none() {
                    s.resync_at = tokio::time::Instant::now().checked_add(s.resync_delay);
                    s.resync_delay = (s.resync_delay * 2).min(RESYNC_MAX);
                }
                if s.grab == Grab::Grabbing {
                    // Do not spin on a grab the server refuses: wait for its NOOP instead.
                    s.grab = Grab::Sleeping;
                    s.send(Packet::req(PacketType::PreSleep, Vec::<Bytes>::new()))
                        .await?;
                }
            }
            // Liveness probe answers; receiving them was the point.
            PacketType::EchoRes => {}
            other => debug!(server = %s.server, ptype = %other, "unexpected packet ignored"),
        }
        Ok(())
    }
}

impl Session {
    async fn send(&mut self, p: Packet) -> Result<()> {
        self.conn.send(p).await
    }
}
