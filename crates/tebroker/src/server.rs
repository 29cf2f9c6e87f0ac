//! The network edge: accepts connections, feeds the core, delivers its replies.
//!
//! One lock guards the [`Broker`] together with every connection's outbox, so the replies of one
//! event are queued on all connections atomically and in order. Each connection has a reader task
//! (decode, then apply frames under the lock; see [`crate::connection`]) and a writer task that
//! drains its outbox ([`crate::outbox`]); nothing blocks while the lock is held.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use broker_core::{Action, Broker, ConnId, ControlOutcome, Millis, Now};
use gearman_proto::{Frame, Packet};
use rustc_hash::FxHashMap;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::connection::{serve_connection, serve_tcp, HIGH_WATER};
use crate::edge::EdgeCounters;
use crate::history::HistoryWriter;
use crate::outbox::{Outbox, Queued};

/// Kernel send buffer of each connection (Linux doubles the figure for its bookkeeping).
const SEND_BUFFER: usize = 128 * 1024;

/// What came of an operator's control command ([`Shared::control_env`]).
#[derive(Debug)]
pub enum ControlDone {
    /// A plain TE: the broker did it.
    Broker,
    /// Forwarded as job `handle` of `agent`'s control function; `outcome` is its reply.
    Agent {
        agent: String,
        handle: String,
        outcome: ControlOutcome,
    },
}

struct State {
    broker: Broker,
    outboxes: FxHashMap<ConnId, Arc<Outbox>>,
}

/// What all connection tasks share.
pub struct Shared {
    state: Mutex<State>,
    settings: Settings,
    next_conn: AtomicU64,
    /// Connections admitted and not yet finished (TLS handshakes included), for max_connections.
    live: AtomicUsize,
    /// Set when the port speaks TLS; replaced on reload.
    tls: RwLock<Option<tokio_rustls::TlsAcceptor>>,
    /// Set when the HTTP surface speaks TLS (`--http-tls-*`); replaced on reload.
    http_tls: RwLock<Option<tokio_rustls::TlsAcceptor>>,
    /// Stops accepting and closes every connection.
    stop: CancellationToken,
    /// Stops accepting only (graceful shutdown lets running jobs finish).
    stop_accepting: CancellationToken,
    /// Limits enforced and failures met at the edge, counted without the broker lock.
    pub(crate) edge: Arc<EdgeCounters>,
    pub(crate) timer: crate::timer::Timer,
    history: HistoryWriter,
    /// The durable store (`None`: `--no-store`).
    pub(crate) store: Option<Arc<crate::server_store::StoreLink>>,
    /// Wait and lease-duration histograms.
    pub(crate) lease_metrics: crate::http::LeaseHistograms,
    /// Store reads the HTTP readers share.
    pub(crate) http_reads: crate::http_api::HttpReads,
    /// The bearer token API control requires (`--api-token-file`).
    api_token: Option<Vec<u8>>,
    /// Callers of [`Shared::control_env`] waiting for an agent's reply, by token. Taken after
    /// the broker lock (in `deliver`), never held while taking it.
    control_waiters: Mutex<FxHashMap<u64, tokio::sync::oneshot::Sender<ControlOutcome>>>,
    next_control_token: AtomicU64,
    pub(crate) reload: crate::reload::Reloadable,
    clock: crate::clock::Clock,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock is held ends the process (see `crate::panic`), so a poisoned
        // lock is only ever seen by a task racing with that exit.
        self.state.lock().expect("broker lock poisoned")
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    pub(crate) fn now(&self) -> Now {
        self.clock.now()
    }

    /// Runs `f` on the broker under the lock and delivers the actions it produced.
    fn apply<R>(&self, f: impl FnOnce(&mut Broker, &mut Vec<Action>) -> R) -> R {
        let mut actions = Vec::new();
        let mut woken: Vec<Arc<Outbox>> = Vec::new();
        let mut state = self.lock();
        let r = f(&mut state.broker, &mut actions);
        for action in actions.drain(..) {
            self.deliver(&mut state, action, &mut woken);
        }
        self.after_apply(state, woken);
        r
    }

    /// Hands `frames` of connection `id` to the broker, one at a time, until they are done or
    /// the connection's backlog goes over the high-water mark (the rest wait; see
    /// [`crate::connection::HIGH_WATER`]).
    pub(crate) fn apply_frames(&self, id: ConnId, frames: &mut VecDeque<Frame>, outbox: &Outbox) {
        let now = self.now();
        let mut actions = Vec::new();
        let mut woken: Vec<Arc<Outbox>> = Vec::new();
        let mut state = self.lock();
        while let Some(frame) = frames.pop_front() {
            let b = &mut state.broker;
            match frame {
                Frame::Packet(p) => b.packet(id, p, now, &mut actions),
                Frame::Admin(line) => {
                    if crate::fault::inject(&line, &mut actions, id) {
                        // Handled (a fault injected on purpose, test builds only).
                    } else {
                        self.edge.copy_into(b.stats_mut());
                        b.admin(id, &line, now, &mut actions);
                        self.edge.annotate_stats(&line, id, &mut actions);
                        self.annotate_position(&line, id, &mut actions);
                    }
                }
                Frame::Malformed { reason, .. } => b.malformed(id, &reason, &mut actions),
            }
            for action in actions.drain(..) {
                self.deliver(&mut state, action, &mut woken);
            }
            if outbox.over(HIGH_WATER) {
                break;
            }
        }
        self.after_apply(state, woken);
    }

    /// Releases the lock, then writes what was queued, hands ended leases to the history
    /// file, and tells the timer when the next deadline moved earlier.
    fn after_apply(&self, mut state: MutexGuard<'_, State>, woken: Vec<Arc<Outbox>>) {
        let now = self.now();
        let next = state.broker.next_deadline(now);
        let ended = state.broker.take_new_history();
        // Taken even without a store, so the core's buffer never fills.
        let waits = state.broker.take_ended_waits();
        let pauses = state.broker.take_pause_changes(now);
        drop(state);
        self.timer.rearm(next);
        for o in woken {
            o.push();
        }
        if !ended.is_empty() {
            self.record_ended(ended);
        }
        if let (Some(store), false) = (&self.store, waits.is_empty()) {
            store.waits_ended(&waits);
        }
        if let (Some(store), false) = (&self.store, pauses.is_empty()) {
            store.pauses_changed(&pauses);
        }
    }

    fn record_ended(&self, ended: Vec<broker_core::EndedLease>) {
        self.lease_metrics.observe(&ended);
        if let Some(store) = &self.store {
            store.leases_ended(&ended);
        }
        self.history.append(ended);
    }

    /// Adds the estimated wait in seconds to tebroker's `position` answer: `OK N TOTAL` becomes
    /// `OK N TOTAL EST_SECS` when the store has recent grants (older clients read the first
    /// two numbers only).
    fn annotate_position(&self, line: &str, conn: ConnId, actions: &mut [Action]) {
        let Some(store) = &self.store else { return };
        if line.split_whitespace().next() != Some("position") {
            return;
        }
        for action in actions.iter_mut().rev() {
            let Action::Text(c, text) = action else {
                continue;
            };
            if *c != conn {
                continue;
            }
            let words: Vec<&str> = text.split_whitespace().collect();
            if let ["OK", n, _total] = words.as_slice() {
                if let Some(est) = n.parse().ok().and_then(|n| store.estimate_secs(n)) {
                    *text = format!("{} {est}\n", text.trim_end());
                }
            }
            return;
        }
    }

    pub(crate) fn api_token(&self) -> Option<&[u8]> {
        self.api_token.as_deref()
    }

    /// Carries out an operator's control command on TE `env` (see
    /// [`Broker::control_env`]); for an agent's TE, waits for the agent's reply (the core ends
    /// the wait after [`broker_core::CONTROL_REPLY_TIMEOUT_MS`]).
    pub async fn control_env(
        &self,
        op: testenv_proto::agent::ControlOp,
        env: &str,
        hold_secs: Option<u64>,
        requested_by: &str,
    ) -> Result<ControlDone, broker_core::ControlError> {
        let token = self.next_control_token.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiters().insert(token, tx);
        let waiter = broker_core::ControlWaiter::Edge(token);
        let now = self.now();
        let target = self.apply(|b, out| {
            b.control_env_awaiting(op, env, hold_secs, requested_by, waiter, now, out)
        });
        let (agent, handle) = match target {
            Ok(broker_core::ControlTarget::Agent { agent, handle }) => (agent, handle),
            other => {
                self.waiters().remove(&token);
                return other.map(|_| ControlDone::Broker);
            }
        };
        // The core answers by its deadline; the margin is for a timer late on a loaded machine.
        let limit = Duration::from_millis(broker_core::CONTROL_REPLY_TIMEOUT_MS + 5_000);
        let outcome = match tokio::time::timeout(limit, rx).await {
            Ok(Ok(outcome)) => outcome,
            _ => {
                self.waiters().remove(&token);
                ControlOutcome::TimedOut {
                    agent: agent.clone(),
                    delivered: true,
                }
            }
        };
        Ok(ControlDone::Agent {
            agent,
            handle,
            outcome,
        })
    }

    fn waiters(
        &self,
    ) -> MutexGuard<'_, FxHashMap<u64, tokio::sync::oneshot::Sender<ControlOutcome>>> {
        self.control_waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The durable store, when there is one.
    pub fn store(&self) -> Option<&Arc<crate::server_store::StoreLink>> {
        self.store.as_ref()
    }

    fn deliver(&self, state: &mut State, action: Action, woken: &mut Vec<Arc<Outbox>>) {
        let cap = self.settings.max_output_buffer;
        let (conn, queued) = match action {
            Action::Send(conn, packet) => match state.outboxes.get(&conn) {
                Some(o) => {
                    push_unique(woken, o);
                    (conn, o.queue(cap, |buf| packet.encode_into(buf)))
                }
                None => return,
            },
            Action::Text(conn, text) => match state.outboxes.get(&conn) {
                Some(o) => {
                    push_unique(woken, o);
                    (
                        conn,
                        o.queue(cap, |buf| buf.extend_from_slice(text.as_bytes())),
                    )
                }
                None => return,
            },
            Action::Close(conn) => {
                if let Some(o) = state.outboxes.get(&conn) {
                    o.close();
                }
                return;
            }
            Action::Shutdown { graceful } => {
                tracing::info!(graceful, "shutdown requested by admin command");
                self.begin_shutdown(&mut state.broker, graceful);
                return;
            }
            Action::ControlDone(token, outcome) => {
                // A caller that went away (its HTTP request dropped) is not waiting any more.
                if let Some(tx) = self.waiters().remove(&token) {
                    let _ = tx.send(outcome);
                }
                return;
            }
        };
        if let Queued::OverCap(buffered) = queued {
            // A reader that does not keep up must not make the broker buffer without bound.
            tracing::warn!(%conn, buffered, cap, "slow reader: output buffer over the cap; closing");
            state.broker.stats_mut().slow_readers_closed += 1;
        }
    }

    /// Stops accepting; graceful: stop handing out work and let running jobs finish (see
    /// [`Server::run`]); else close everything now.
    fn begin_shutdown(&self, broker: &mut Broker, graceful: bool) {
        self.stop_accepting.cancel();
        if graceful {
            broker.begin_shutdown();
        } else {
            self.stop.cancel();
        }
    }

    /// Starts a graceful shutdown, as `shutdown graceful` does.
    pub fn shutdown_gracefully(&self) {
        self.apply(|b, _| self.begin_shutdown(b, true));
    }

    pub(crate) fn connect(
        &self,
        id: ConnId,
        peer: SocketAddr,
        identity: Option<String>,
        outbox: Arc<Outbox>,
    ) {
        let mut state = self.lock();
        state.broker.connect_as(id, peer.ip().to_string(), identity);
        state.outboxes.insert(id, outbox);
    }

    /// [`Shared::disconnect`] for a connection that failed rather than closed (see
    /// `broker_core::Broker::disconnect_lost`).
    pub(crate) fn disconnect_lost(&self, id: ConnId) {
        self.apply(|b, out| b.disconnect_lost(id, out));
        self.lock().outboxes.remove(&id);
    }

    pub(crate) fn disconnect(&self, id: ConnId) {
        self.apply(|b, out| b.disconnect(id, out));
        self.lock().outboxes.remove(&id);
    }

    /// Fires the broker's timers that are due.
    pub(crate) fn tick(&self) -> Option<Millis> {
        let now = self.now();
        self.apply(|b, out| {
            b.tick(now, out);
            b.next_deadline(now)
        })
    }

    pub(crate) fn protocol_error(&self, id: ConnId, e: &gearman_proto::DecodeError) {
        tracing::info!(conn = %id, error = %e, "protocol error; closing connection");
        let packet = Packet::error(e.error_code(), &e.to_string());
        self.apply(|b, out| {
            let s = b.stats_mut();
            match e {
                gearman_proto::DecodeError::FrameTooLarge { .. } => s.frames_too_large += 1,
                gearman_proto::DecodeError::AdminLineTooLong { .. } => s.admin_lines_too_long += 1,
                _ => s.protocol_errors += 1,
            }
            out.push(Action::Send(id, packet));
            out.push(Action::Close(id));
        });
    }

    pub(crate) fn partial_packet_timeout(&self, id: ConnId) {
        tracing::warn!(conn = %id, "incomplete packet not finished in time; closing");
        let packet = Packet::error("TIMEOUT", "incomplete packet not finished in time");
        self.apply(|b, out| {
            b.stats_mut().partial_packet_timeouts += 1;
            out.push(Action::Send(id, packet));
            out.push(Action::Close(id));
        });
    }

    /// Reads the broker's state (for the operator surface); `now` is passed in. Only the
    /// copying happens under the lock; callers format outside it.
    pub fn inspect<R>(&self, f: impl FnOnce(&Broker, Now) -> R) -> R {
        let now = self.now();
        let mut state = self.lock();
        self.edge.copy_into(state.broker.stats_mut());
        f(&state.broker, now)
    }

    /// Like [`Shared::inspect`], for the HTTP surface: gives up after `within` if the lock
    /// is not free (a core that hangs), and reports a poisoned lock, instead of blocking.
    pub async fn inspect_within<R>(
        &self,
        within: Duration,
        f: impl FnOnce(&Broker, Now) -> R,
    ) -> Result<R, CoreUnavailable> {
        let deadline = Instant::now() + within;
        loop {
            match self.state.try_lock() {
                Ok(mut state) => {
                    self.edge.copy_into(state.broker.stats_mut());
                    return Ok(f(&state.broker, self.now()));
                }
                Err(std::sync::TryLockError::Poisoned(_)) => return Err(CoreUnavailable::Panicked),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            if Instant::now() >= deadline {
                return Err(CoreUnavailable::NoAnswer);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Jobs being worked on now (queued ones do not hold up a graceful shutdown).
    fn running_jobs(&self) -> usize {
        self.lock()
            .broker
            .function_status()
            .iter()
            .map(|f| f.running)
            .sum()
    }

    fn flush_history(&self) {
        let ended = self.lock().broker.take_new_history();
        if !ended.is_empty() {
            self.record_ended(ended);
        }
        self.history.finish();
    }

    fn tls_acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.tls.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set_tls_acceptor(&self, acceptor: tokio_rustls::TlsAcceptor) {
        *self.tls.write().unwrap_or_else(|e| e.into_inner()) = Some(acceptor);
    }

    pub(crate) fn http_tls_acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.http_tls
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_http_tls_acceptor(&self, acceptor: tokio_rustls::TlsAcceptor) {
        *self.http_tls.write().unwrap_or_else(|e| e.into_inner()) = Some(acceptor);
    }

    pub(crate) fn with_broker<R>(&self, f: impl FnOnce(&mut Broker) -> R) -> R {
        f(&mut self.lock().broker)
    }
}

/// Records TE state changes every [`crate::server_store::ENV_SCAN_EVERY`] (the core compares
/// its inventory with the last one under the lock; the records are queued outside it).
async fn scan_envs(shared: Arc<Shared>, link: Arc<crate::server_store::StoreLink>) {
    loop {
        let now = shared.now();
        let changed = shared.with_broker(|b| b.take_env_changes(now));
        link.envs_changed(&changed);
        link.refresh_grant_interval().await;
        tokio::time::sleep(crate::server_store::ENV_SCAN_EVERY).await;
    }
}

/// The token file's first line; an empty one is refused (it would let anyone in).
fn read_token(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the API token file {}", path.display()))?;
    let token = text.lines().next().unwrap_or_default().trim();
    anyhow::ensure!(
        token.len() >= 16,
        "the API token in {} is shorter than 16 characters",
        path.display()
    );
    Ok(token.as_bytes().to_vec())
}

/// Why the broker core could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoreUnavailable {
    /// Its lock was not free in time: the core is stuck (or extremely busy).
    NoAnswer,
    /// Its lock is poisoned: the core panicked.
    Panicked,
}

impl std::fmt::Display for CoreUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CoreUnavailable::NoAnswer => "the broker core does not answer",
            CoreUnavailable::Panicked => "the broker core panicked",
        })
    }
}

fn push_unique(v: &mut Vec<Arc<Outbox>>, o: &Arc<Outbox>) {
    if !v.iter().any(|x| Arc::ptr_eq(x, o)) {
        v.push(o.clone());
    }
}

/// A bound listener plus the state; `run` serves until shutdown.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Server {
    pub async fn bind(settings: Settings) -> anyhow::Result<Server> {
        let listener = listen(&settings)?;
        let tls = match &settings.tls {
            Some(files) => Some(crate::tls::acceptor(files)?),
            None => None,
        };
        let acl = match &settings.acl {
            Some(path) => {
                let acl = crate::reload::read_acl(path)?;
                if tls.is_none() || settings.tls.as_ref().is_some_and(|t| t.ca.is_none()) {
                    tracing::warn!(
                        "ACLs without --ssl-ca: no connection has a certificate identity, so \
                         every CAN_DO and SUBMIT_JOB will be denied"
                    );
                }
                Some(acl)
            }
            None => None,
        };
        let edge = Arc::new(EdgeCounters::default());
        let history = HistoryWriter::start(settings.history_file.clone(), edge.clone())?;
        let reload = crate::reload::Reloadable::new(&settings, acl.as_ref());
        let api_token = match &settings.api_token_file {
            Some(path) => Some(read_token(path)?),
            None => None,
        };
        let store = settings.store.clone().map(|db| {
            Arc::new(crate::server_store::StoreLink::start(
                db,
                format!("{}:{}", settings.handle_host, settings.port),
                settings.history_days,
            ))
        });
        let mut broker = Broker::new(broker_core::BrokerConfig {
            handle_host: settings.handle_host.clone(),
            pid: std::process::id(),
            version: format!("tebroker {}", env!("CARGO_PKG_VERSION")),
            max_functions_per_conn: settings.max_functions_per_conn,
        });
        broker.set_security(crate::reload::security(&settings, acl));
        let clock = crate::clock::Clock::start();
        if let Some(link) = &store {
            let _ = edge.store.set(link.clone());
            link.restore_pauses(&mut broker, clock.now());
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                broker,
                outboxes: FxHashMap::default(),
            }),
            settings,
            next_conn: AtomicU64::new(1),
            live: AtomicUsize::new(0),
            tls: RwLock::new(tls),
            http_tls: RwLock::new(None),
            stop: CancellationToken::new(),
            stop_accepting: CancellationToken::new(),
            edge,
            timer: crate::timer::Timer::default(),
            history,
            store,
            api_token,
            control_waiters: Mutex::new(FxHashMap::default()),
            next_control_token: AtomicU64::new(1),
            lease_metrics: crate::http::LeaseHistograms::default(),
            http_reads: crate::http_api::HttpReads::default(),
            reload,
            clock,
        });
        Ok(Server { listener, shared })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A token that, when cancelled, stops the server at once (closes every connection).
    pub fn stop_token(&self) -> CancellationToken {
        self.shared.stop.clone()
    }

    /// The state the connections share, for the HTTP operator surface and signal handling.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves until stopped. After a graceful shutdown began, waits for the running jobs for
    /// at most `--shutdown-timeout`, then closes every connection. Ended leases reach the
    /// history file before this returns.
    pub async fn run(self) -> anyhow::Result<()> {
        let shared = self.shared.clone();
        let timer = tokio::spawn(crate::timer::run(shared.clone()));
        let store_tasks = shared.store.clone().map(|link| {
            (
                tokio::spawn(crate::server_store::retention(
                    link.clone(),
                    shared.stop.clone(),
                )),
                tokio::spawn(scan_envs(shared.clone(), link)),
            )
        });
        loop {
            tokio::select! {
                _ = shared.stop_accepting.cancelled() => break,
                _ = shared.stop.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        if let Err(e) = self.admit(stream, peer) {
                            tracing::warn!(%peer, error = %e, "connection setup failed");
                        }
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(self.listener);
        if !shared.stop.is_cancelled() {
            let limit = shared.settings.shutdown_timeout;
            let running = shared.running_jobs();
            tracing::info!(
                running,
                timeout_s = limit.as_secs_f64(),
                "no longer accepting nor handing out work; waiting for running jobs"
            );
            let deadline = Instant::now().checked_add(limit);
            loop {
                let running = shared.running_jobs();
                if running == 0 || shared.stop.is_cancelled() {
                    break;
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    tracing::warn!(
                        running,
                        "shutdown timeout reached; stopping with jobs running"
                    );
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            shared.stop.cancel();
        }
        // Give writers a moment to flush what is queued (e.g. the reply to `shutdown`) and the
        // connection tasks to end their jobs (leases), then write out the history.
        let until = Instant::now() + Duration::from_secs(1);
        while shared.live.load(Ordering::Acquire) > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        timer.abort();
        shared.flush_history();
        if let Some((retention, scan)) = store_tasks {
            retention.abort();
            scan.abort();
        }
        if let Some(link) = shared.store.clone() {
            let flushed = tokio::task::spawn_blocking(move || {
                let done = link.flush(Duration::from_secs(5));
                link.close_reader();
                done
            })
            .await;
            if !matches!(flushed, Ok(true)) {
                tracing::warn!("the store did not take every record before shutdown");
            }
        }
        tracing::info!("stopped");
        Ok(())
    }

    fn admit(&self, stream: TcpStream, peer: SocketAddr) -> anyhow::Result<()> {
        let max = self.shared.settings.max_connections;
        // Counted at accept time (not when the connection task starts), so a burst of connects
        // cannot overshoot the limit.
        let live = self.shared.live.fetch_add(1, Ordering::AcqRel);
        let slot = LiveSlot(self.shared.clone());
        let tls = self.shared.tls_acceptor();
        if max > 0 && live >= max {
            tracing::warn!(%peer, max, "connection limit reached; refusing");
            self.shared
                .edge
                .count(&self.shared.edge.connections_refused);
            if tls.is_none() {
                tokio::spawn(async move {
                    let mut stream = stream;
                    let msg = Packet::error("SERVER_BUSY", "connection limit reached");
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        stream.write_all(&msg.to_bytes()),
                    )
                    .await;
                    drop(slot);
                });
            }
            return Ok(());
        }
        stream.set_nodelay(true)?;
        // A fixed, modest kernel send buffer (no autotuning up to megabytes): what a peer that
        // does not read can hold in the kernel stays small, like what the broker holds for it.
        socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER)?;
        crate::config::apply_keepalive(&stream, &self.shared.settings)?;
        let id = ConnId(self.shared.next_conn.fetch_add(1, Ordering::Relaxed));
        let shared = self.shared.clone();
        match tls {
            None => {
                tokio::spawn(async move {
                    serve_tcp(shared, stream, id, peer).await;
                    drop(slot);
                });
            }
            Some(acceptor) => {
                tokio::spawn(async move {
                    serve_tls(shared, acceptor, stream, id, peer).await;
                    drop(slot);
                });
            }
        }
        Ok(())
    }
}

async fn serve_tls(
    shared: Arc<Shared>,
    acceptor: tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    id: ConnId,
    peer: SocketAddr,
) {
    let limit = match shared.settings.partial_packet_timeout {
        d if d.is_zero() => Duration::from_secs(60),
        d => d,
    };
    let handshake = tokio::select! {
        r = tokio::time::timeout(limit, acceptor.accept(stream)) => r,
        _ = shared.stop.cancelled() => return,
    };
    match handshake {
        Ok(Ok(tls)) => {
            let identity = crate::tls::peer_common_name(tls.get_ref().1);
            tracing::debug!(conn = %id, %peer, identity = identity.as_deref().unwrap_or("-"), "TLS established");
            serve_connection(shared, tls, id, peer, identity).await;
        }
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "TLS handshake failed");
            shared.edge.count(&shared.edge.tls_handshake_failures);
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake not finished in time");
            shared.edge.count(&shared.edge.tls_handshake_failures);
        }
    }
}

fn listen(settings: &Settings) -> anyhow::Result<TcpListener> {
    let addr: SocketAddr = format!("{}:{}", settings.listen, settings.port)
        .parse()
        .or_else(|_| {
            // A host name rather than an address literal.
            std::net::ToSocketAddrs::to_socket_addrs(&(settings.listen.as_str(), settings.port))
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| anyhow::anyhow!("cannot resolve listen address {}", settings.listen))
        })?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("cannot listen on {addr}"))?;
    socket.listen(settings.backlog as i32)?;
    Ok(TcpListener::from_std(socket.into())?)
}

/// One admitted connection, released when its task ends.
struct LiveSlot(Arc<Shared>);

impl Drop for LiveSlot {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::AcqRel);
    }
}
