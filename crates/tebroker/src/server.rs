//! The network edge: accepts connections, frames bytes, feeds the core, writes its replies.
//!
//! One lock guards the [`Broker`] together with every connection's outbox, so the replies of one
//! event are queued on all connections atomically and in order. Each connection has a reader task
//! (decode, then apply a whole batch of frames under one lock) and a writer task that drains its
//! outbox; nothing blocks while the lock is held.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use broker_core::{Action, Broker, ConnId, Millis, Now};
use bytes::BytesMut;
use gearman_proto::{Codec, Frame, Packet};
use rustc_hash::FxHashMap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;

/// Bytes a connection reads at a time when no larger frame is pending.
const READ_CHUNK: usize = 1024;
/// A buffer grown past this by a burst is given back once it is empty.
const BIG_BUFFER: usize = 64 * 1024;

/// Bytes waiting to be written to one connection.
struct Outbox {
    buf: Mutex<BytesMut>,
    ready: Notify,
    /// Set once the connection is to be closed after the queued bytes are written.
    closing: AtomicBool,
    /// Cancels the connection's reader (Close action, or the server stopping).
    cancel: CancellationToken,
    /// Drops whatever is unwritten: the peer is not reading (slow reader) or is gone.
    abort: CancellationToken,
    /// For plain TCP: the socket, so replies can be written straight from the task that produced
    /// them instead of waking the writer task (one task switch less per packet).
    direct: Option<Arc<OwnedWriteHalf>>,
    /// Set while the writer task holds bytes taken from `buf`; direct writes wait for it, so
    /// bytes never overtake each other.
    writer_busy: AtomicBool,
}

impl Outbox {
    fn new(cancel: CancellationToken, direct: Option<Arc<OwnedWriteHalf>>) -> Outbox {
        Outbox {
            direct,
            writer_busy: AtomicBool::new(false),
            buf: Mutex::new(BytesMut::new()),
            ready: Notify::new(),
            closing: AtomicBool::new(false),
            cancel,
            abort: CancellationToken::new(),
        }
    }

    /// Sends what is queued: directly when the socket takes it now, else through the writer.
    fn push(&self) {
        if let Some(half) = &self.direct {
            let tcp: &TcpStream = half.as_ref().as_ref();
            let mut buf = self.buf.lock().expect("outbox lock");
            if !self.writer_busy.load(Ordering::Acquire) && !self.abort.is_cancelled() {
                while !buf.is_empty() {
                    match tcp.try_write(&buf) {
                        Ok(n) => bytes::Buf::advance(&mut *buf, n),
                        // Would block, or an error the writer task will meet and report.
                        Err(_) => break,
                    }
                }
            }
            if buf.is_empty() && !self.closing.load(Ordering::Acquire) {
                return;
            }
        }
        self.ready.notify_one();
    }

    fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.cancel.cancel();
        self.ready.notify_one();
    }
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
    /// Set when the port speaks TLS.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Stops accepting and closes every connection.
    stop: CancellationToken,
    /// Stops accepting only (graceful shutdown waits for running jobs).
    stop_accepting: CancellationToken,
}

/// The time for the core: monotonic since the first call (timers), and wall (what people see).
pub fn now() -> Now {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let millis = |d: Duration| Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX);
    Now {
        mono: millis(START.get_or_init(Instant::now).elapsed()),
        wall: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(millis)
            .unwrap_or(0),
    }
}

impl Shared {
    /// Runs `f` on the broker under the lock and delivers the actions it produced.
    fn apply<R>(&self, f: impl FnOnce(&mut Broker, &mut Vec<Action>) -> R) -> R {
        let mut actions = Vec::new();
        let mut woken: Vec<Arc<Outbox>> = Vec::new();
        let r = {
            let mut state = self.state.lock().expect("broker lock");
            let r = f(&mut state.broker, &mut actions);
            for action in actions.drain(..) {
                self.deliver(&mut state, action, &mut woken);
            }
            r
        };
        for o in woken {
            o.push();
        }
        r
    }

    fn deliver(&self, state: &mut State, action: Action, woken: &mut Vec<Arc<Outbox>>) {
        match action {
            Action::Send(conn, packet) => {
                if let Some(o) = state.outboxes.get(&conn) {
                    let mut buf = o.buf.lock().expect("outbox lock");
                    if o.abort.is_cancelled() {
                        return;
                    }
                    packet.encode_into(&mut buf);
                    let over = self.check_backlog(conn, o, buf.len());
                    drop(buf);
                    if over {
                        state.broker.stats_mut().slow_readers_closed += 1;
                    }
                    push_unique(woken, o);
                }
            }
            Action::Text(conn, text) => {
                if let Some(o) = state.outboxes.get(&conn) {
                    let mut buf = o.buf.lock().expect("outbox lock");
                    if o.abort.is_cancelled() {
                        return;
                    }
                    buf.extend_from_slice(text.as_bytes());
                    let over = self.check_backlog(conn, o, buf.len());
                    drop(buf);
                    if over {
                        state.broker.stats_mut().slow_readers_closed += 1;
                    }
                    push_unique(woken, o);
                }
            }
            Action::Close(conn) => {
                if let Some(o) = state.outboxes.get(&conn) {
                    o.close();
                }
            }
            Action::Shutdown { graceful } => {
                tracing::info!(graceful, "shutdown requested by admin command");
                self.stop_accepting.cancel();
                if !graceful {
                    self.stop.cancel();
                }
            }
        }
    }

    /// A reader that does not keep up must not make the broker buffer without bound. Returns
    /// whether this call closed the connection.
    fn check_backlog(&self, conn: ConnId, o: &Outbox, len: usize) -> bool {
        let cap = self.settings.max_output_buffer;
        if cap > 0 && len > cap && !o.abort.is_cancelled() {
            tracing::warn!(%conn, buffered = len, cap, "slow reader: output buffer over the cap; closing");
            o.closing.store(true, Ordering::Release);
            o.cancel.cancel();
            o.abort.cancel();
            return true;
        }
        false
    }

    /// Counts a limit enforced here rather than in the core.
    fn count(&self, f: impl FnOnce(&mut broker_core::Stats)) {
        f(self.state.lock().expect("broker lock").broker.stats_mut());
    }

    /// Reads the broker's state (for the operator surface); `now` is passed in.
    pub fn inspect<R>(&self, f: impl FnOnce(&Broker, Now) -> R) -> R {
        let state = self.state.lock().expect("broker lock");
        f(&state.broker, now())
    }

    fn running_jobs(&self) -> usize {
        let state = self.state.lock().expect("broker lock");
        state.broker.running_jobs().total()
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
        let addr: SocketAddr = format!("{}:{}", settings.listen, settings.port)
            .parse()
            .or_else(|_| {
                // A host name rather than an address literal.
                std::net::ToSocketAddrs::to_socket_addrs(&(settings.listen.as_str(), settings.port))
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| {
                        anyhow::anyhow!("cannot resolve listen address {}", settings.listen)
                    })
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
        let listener = TcpListener::from_std(socket.into())?;
        let tls = match &settings.tls {
            Some(files) => Some(crate::tls::acceptor(files)?),
            None => None,
        };
        let acl = match &settings.acl {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read ACL file {}", path.display()))?;
                let acl = broker_core::acl::Acl::parse(&text)
                    .map_err(|e| anyhow::anyhow!("invalid ACL file {}: {e}", path.display()))?;
                if tls.as_ref().is_none() || settings.tls.as_ref().is_some_and(|t| t.ca.is_none()) {
                    tracing::warn!(
                        "ACLs without --ssl-ca: no connection has a certificate identity, so \
                         every CAN_DO and SUBMIT_JOB will be denied"
                    );
                }
                Some(acl)
            }
            None => None,
        };
        let mut broker = Broker::new(broker_core::BrokerConfig {
            handle_host: settings.handle_host.clone(),
            pid: std::process::id(),
            version: format!("tebroker {}", env!("CARGO_PKG_VERSION")),
            max_functions_per_conn: settings.max_functions_per_conn,
        });
        broker.set_security(broker_core::Security {
            acl,
            callback_protection: settings.callback_protection,
            default_max_queue: (settings.max_queue > 0).then_some(settings.max_queue),
        });
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                broker,
                outboxes: FxHashMap::default(),
            }),
            settings,
            next_conn: AtomicU64::new(1),
            live: AtomicUsize::new(0),
            tls,
            stop: CancellationToken::new(),
            stop_accepting: CancellationToken::new(),
        });
        Ok(Server { listener, shared })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A token that, when cancelled, stops the server as SIGTERM does.
    pub fn stop_token(&self) -> CancellationToken {
        self.shared.stop.clone()
    }

    /// A token that stops accepting and waits for the jobs in hand, like `shutdown graceful`.
    /// The state the connections share, for the HTTP operator surface.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    pub fn graceful_token(&self) -> CancellationToken {
        self.shared.stop_accepting.clone()
    }

    pub async fn run(self) -> anyhow::Result<()> {
        let shared = self.shared.clone();
        let timer = tokio::spawn(tick_loop(shared.clone()));
        loop {
            tokio::select! {
                _ = shared.stop_accepting.cancelled() => break,
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
            tracing::info!("no longer accepting; waiting for jobs in hand to finish");
            while shared.running_jobs() > 0 && !shared.stop.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            shared.stop.cancel();
        }
        timer.abort();
        // Give writers a moment to flush what is queued (e.g. the reply to `shutdown`).
        tokio::time::sleep(Duration::from_millis(50)).await;
        tracing::info!("stopped");
        Ok(())
    }

    fn admit(&self, stream: TcpStream, peer: SocketAddr) -> anyhow::Result<()> {
        let max = self.shared.settings.max_connections;
        // Counted at accept time (not when the connection task starts), so a burst of connects
        // cannot overshoot the limit.
        let live = self.shared.live.fetch_add(1, Ordering::AcqRel);
        let slot = LiveSlot(self.shared.clone());
        if max > 0 && live >= max {
            tracing::warn!(%peer, max, "connection limit reached; refusing");
            self.shared.count(|s| s.connections_refused += 1);
            if self.shared.tls.is_none() {
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
        crate::config::apply_keepalive(&stream, &self.shared.settings)?;
        let id = ConnId(self.shared.next_conn.fetch_add(1, Ordering::Relaxed));
        let shared = self.shared.clone();
        match self.shared.tls.clone() {
            None => {
                tokio::spawn(async move {
                    serve_tcp(shared, stream, id, peer).await;
                    drop(slot);
                });
            }
            Some(acceptor) => {
                tokio::spawn(async move {
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
                            shared.count(|s| s.tls_handshake_failures += 1);
                        }
                        Err(_) => {
                            tracing::info!(%peer, "TLS handshake not finished in time");
                            shared.count(|s| s.tls_handshake_failures += 1);
                        }
                    }
                    drop(slot);
                });
            }
        }
        Ok(())
    }
}

/// One admitted connection, released when its task ends.
struct LiveSlot(Arc<Shared>);

impl Drop for LiveSlot {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn tick_loop(shared: Arc<Shared>) {
    let mut interval = tokio::time::interval(Duration::from_millis(50));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let history = crate::history::HistoryWriter::start(shared.settings.history_file.clone());
    loop {
        interval.tick().await;
        let now = now();
        let (due, ended) = {
            let mut state = shared.state.lock().expect("broker lock");
            (
                state
                    .broker
                    .next_deadline(now)
                    .is_some_and(|d| d <= now.mono),
                state.broker.take_new_history(),
            )
        };
        if due {
            shared.apply(|b, out| b.tick(now, out));
        }
        if !ended.is_empty() {
            history.append(ended);
        }
    }
}

/// Serves one plain TCP connection; replies may be written directly from other tasks.
pub async fn serve_tcp(shared: Arc<Shared>, stream: TcpStream, id: ConnId, peer: SocketAddr) {
    let (reader, writer) = stream.into_split();
    let writer = Arc::new(writer);
    let halves = (reader, SharedWrite(writer.clone()));
    serve_halves(shared, halves, Some(writer), id, peer, None).await;
}

/// Serves one connection over any byte stream (TLS wraps the TCP stream).
pub async fn serve_connection<S>(
    shared: Arc<Shared>,
    stream: S,
    id: ConnId,
    peer: SocketAddr,
    identity: Option<String>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let halves = tokio::io::split(stream);
    serve_halves(shared, halves, None, id, peer, identity).await;
}

async fn serve_halves<R, W>(
    shared: Arc<Shared>,
    (reader, writer): (R, W),
    direct: Option<Arc<OwnedWriteHalf>>,
    id: ConnId,
    peer: SocketAddr,
    identity: Option<String>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let cancel = shared.stop.child_token();
    let outbox = Arc::new(Outbox::new(cancel.clone(), direct));
    {
        let mut state = shared.state.lock().expect("broker lock");
        state.broker.connect_as(id, peer.ip().to_string(), identity);
        state.outboxes.insert(id, outbox.clone());
    }
    tracing::debug!(conn = %id, %peer, "connected");
    let writer_task = tokio::spawn(write_loop(writer, outbox.clone()));
    let reason = read_loop(&shared, reader, id, &cancel).await;
    tracing::debug!(conn = %id, %peer, reason, "disconnected");
    {
        shared.apply(|b, out| b.disconnect(id, out));
        let mut state = shared.state.lock().expect("broker lock");
        state.outboxes.remove(&id);
    }
    outbox.closing.store(true, Ordering::Release);
    outbox.ready.notify_one();
    let _ = writer_task.await;
}

async fn read_loop<R: AsyncRead + Unpin>(
    shared: &Shared,
    mut reader: R,
    id: ConnId,
    cancel: &CancellationToken,
) -> &'static str {
    let codec = Codec {
        max_frame: shared.settings.max_frame,
        max_admin_line: shared.settings.max_admin_line,
    };
    let idle = shared.settings.partial_packet_timeout;
    // Buffers start small and shrink back after a burst: thousands of idle connections (one
    // per waiting testenv-client) must cost little memory each.
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    // A connection holding part of a frame must finish it in time, however slowly it trickles
    // bytes in (slowloris): the deadline runs from when the unfinished frame started and only
    // moves when a frame completes.
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        if buf.is_empty() && buf.capacity() > BIG_BUFFER {
            buf = BytesMut::new();
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 2 {
            buf.reserve(READ_CHUNK);
        }
        let read = tokio::select! {
            _ = cancel.cancelled() => return "closed by server",
            r = reader.read_buf(&mut buf) => r,
            _ = sleep_until(deadline) => {
                tracing::warn!(conn = %id, "incomplete packet not finished in time; closing");
                shared.count(|s| s.partial_packet_timeouts += 1);
                send_error_and_close(shared, id, "TIMEOUT", "incomplete packet not finished in time");
                return "partial packet timeout";
            }
        };
        match read {
            Ok(0) => return "peer closed",
            Ok(_) => {}
            Err(_) => return "read error",
        }
        let mut fatal = None;
        loop {
            match codec.decode_frame(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => {
                    fatal = Some(e);
                    break;
                }
            }
        }
        if buf.is_empty() || idle.is_zero() {
            deadline = None;
        } else if deadline.is_none() || !frames.is_empty() {
            deadline = Some(tokio::time::Instant::now() + idle);
        }
        if !frames.is_empty() {
            let now = now();
            shared.apply(|b, out| {
                for frame in frames.drain(..) {
                    match frame {
                        Frame::Packet(p) => b.packet(id, p, now, out),
                        Frame::Admin(line) => b.admin(id, &line, now, out),
                        Frame::Malformed { reason, .. } => b.malformed(id, &reason, out),
                    }
                }
            });
        }
        if let Some(e) = fatal {
            tracing::info!(conn = %id, error = %e, "protocol error; closing connection");
            shared.count(|s| match e {
                gearman_proto::DecodeError::FrameTooLarge { .. } => s.frames_too_large += 1,
                gearman_proto::DecodeError::AdminLineTooLong { .. } => s.admin_lines_too_long += 1,
                _ => s.protocol_errors += 1,
            });
            send_error_and_close(shared, id, e.error_code(), &e.to_string());
            return "protocol error";
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn send_error_and_close(shared: &Shared, id: ConnId, code: &str, text: &str) {
    let packet = Packet::error(code, text);
    shared.apply(|_, out| {
        out.push(Action::Send(id, packet));
        out.push(Action::Close(id));
    });
}

async fn write_loop<W: AsyncWrite + Unpin>(mut writer: W, outbox: Arc<Outbox>) {
    let mut pending = BytesMut::new();
    loop {
        {
            let mut buf = outbox.buf.lock().expect("outbox lock");
            if outbox.abort.is_cancelled() {
                buf.clear();
                break;
            }
            std::mem::swap(&mut *buf, &mut pending);
            outbox
                .writer_busy
                .store(!pending.is_empty(), Ordering::Release);
        }
        if pending.is_empty() {
            if outbox.closing.load(Ordering::Acquire) {
                break;
            }
            outbox.ready.notified().await;
            continue;
        }
        let written = tokio::select! {
            r = writer.write_all(&pending) => r.is_ok(),
            _ = outbox.abort.cancelled() => false,
        };
        {
            let _buf = outbox.buf.lock().expect("outbox lock");
            outbox.writer_busy.store(false, Ordering::Release);
        }
        if !written {
            outbox.cancel.cancel();
            break;
        }
        if pending.capacity() > BIG_BUFFER {
            pending = BytesMut::new();
        } else {
            pending.clear();
        }
    }
    let _ = writer.shutdown().await;
}

/// The write half of a TCP stream shared by a connection's writer task and direct writes.
struct SharedWrite(Arc<OwnedWriteHalf>);

impl SharedWrite {
    fn tcp(&self) -> &TcpStream {
        self.0.as_ref().as_ref()
    }
}

impl AsyncWrite for SharedWrite {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        loop {
            std::task::ready!(self.tcp().poll_write_ready(cx))?;
            match self.tcp().try_write(data) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => return std::task::Poll::Ready(r),
            }
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = socket2::SockRef::from(self.tcp()).shutdown(std::net::Shutdown::Write);
        std::task::Poll::Ready(r.or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotConnected {
                Ok(())
            } else {
                Err(e)
            }
        }))
    }
}
