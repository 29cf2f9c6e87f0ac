//! One framed connection to one Gearman server, plus connect-with-retry, and how a connection
//! notices a server that stopped answering ([`Liveness`]).
//!
//! The transport is a boxed `AsyncRead + AsyncWrite`, so TLS wraps the TCP stream without
//! touching the client and worker state machines.

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use gearman_proto::{Codec, Frame, Packet, PacketType};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::codec::Framed;
use tracing::debug;

use crate::addr::ServerAddr;
use crate::error::{Error, Result};

/// Any byte stream a connection can run over (TCP or TLS over TCP).
pub trait Transport: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Transport for T {}

/// A boxed [`Transport`].
pub type BoxTransport = Pin<Box<dyn Transport>>;

/// How long a single TCP connect attempt may take before we try the next address.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Exponential backoff between connection attempts: `initial`, doubling up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::RECONNECT
    }
}

impl Backoff {
    /// Between attempts to reach a server that was up before (reconnects, resubmits).
    pub const RECONNECT: Backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(5),
    };
    /// While waiting for a server that is just starting (`wait_for_server`).
    pub const STARTUP: Backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(500),
    };

    /// The delay to use after `delay`.
    pub fn next(&self, delay: Duration) -> Duration {
        (delay * 2).clamp(self.initial, self.max.max(self.initial))
    }
}

/// TCP keepalive settings: the kernel probes a connection idle for `idle`, every `interval`,
/// and resets it after `retries` unanswered probes; the same total bounds how long sent data
/// may stay unacknowledged (TCP_USER_TIMEOUT). It notices a vanished host or a cut network,
/// not a server process that hangs with its socket open (see [`Liveness::probe_idle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub retries: u32,
}

impl Default for Keepalive {
    /// 30 s idle, then 3 probes 10 s apart: a dead peer is noticed within about a minute.
    fn default() -> Self {
        Keepalive {
            idle: Duration::from_secs(30),
            interval: Duration::from_secs(10),
            retries: 3,
        }
    }
}

impl Keepalive {
    /// How long a silent peer lasts before the kernel gives up on it.
    pub fn bound(&self) -> Duration {
        self.idle
            .saturating_add(self.interval.saturating_mul(self.retries))
    }

    fn apply(&self, stream: &TcpStream) -> std::io::Result<()> {
        let sock = socket2::SockRef::from(stream);
        sock.set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(self.idle)
                .with_interval(self.interval)
                .with_retries(self.retries),
        )?;
        sock.set_tcp_user_timeout(Some(self.bound()))
    }
}

/// How client and worker connections notice a dead server, on two levels:
/// TCP keepalive (a vanished host, a cut network) and an application-level ECHO_REQ sent on a
/// connection that has heard nothing for `probe_idle` (a server process that is stopped or
/// hung while its kernel still keeps the socket open). A connection that hears nothing for
/// `probe_timeout` after a probe is closed: its jobs fail with [`Error::Disconnected`] and a
/// worker reconnects.
///
/// Whether a server answers ECHO_REQ is learned from one probe sent when the connection opens
/// (geard ignores ECHO_REQ): a server that does not answer it is watched by keepalive only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// `None`: no TCP keepalive.
    pub keepalive: Option<Keepalive>,
    /// `None`: no ECHO_REQ probes.
    pub probe_idle: Option<Duration>,
    pub probe_timeout: Duration,
}

impl Default for Liveness {
    /// Keepalive as [`Keepalive::default`]; a probe after 30 s of silence, answered within 10 s:
    /// a hung server is noticed within 40 s.
    fn default() -> Self {
        Liveness {
            keepalive: Some(Keepalive::default()),
            probe_idle: Some(Duration::from_secs(30)),
            probe_timeout: Duration::from_secs(10),
        }
    }
}

/// The ECHO_REQ payload of liveness probes (any reply at all proves the server alive).
const PROBE_DATA: &[u8] = b"gearman-client liveness probe";

/// Whether the server answers ECHO_REQ, as learned from the first probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EchoSupport {
    Unknown,
    Yes,
    No,
}

/// What the liveness timer asks the connection's owner to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProbeDue {
    /// Send [`Prober::probe_packet`].
    Send,
    /// The server stopped answering: close the connection.
    Dead,
}

/// The application-level half of [`Liveness`] for one connection: when to probe and when to
/// give up. The owner sends the first probe right after connecting, reports every packet it
/// receives, and sleeps until [`Prober::deadline`].
#[derive(Debug)]
pub(crate) struct Prober {
    idle: Option<Duration>,
    timeout: Duration,
    echo: EchoSupport,
    last_heard: Instant,
    /// When the outstanding probe was sent.
    probe_sent: Option<Instant>,
}

impl Prober {
    pub(crate) fn new(liveness: &Liveness) -> Prober {
        Prober {
            idle: liveness.probe_idle,
            timeout: liveness.probe_timeout,
            echo: EchoSupport::Unknown,
            last_heard: Instant::now(),
            probe_sent: None,
        }
    }

    /// Whether probes are on at all (the owner then sends the first one at once).
    pub(crate) fn enabled(&self) -> bool {
        self.idle.is_some()
    }

    pub(crate) fn probe_packet() -> Packet {
        Packet::req(PacketType::EchoReq, [Bytes::from_static(PROBE_DATA)])
    }

    /// Records that a probe was written.
    pub(crate) fn sent(&mut self) {
        self.probe_sent = Some(Instant::now());
    }

    /// Records a packet from the server. The first packet after the first probe tells whether
    /// the server answers ECHO_REQ: servers answer one connection's requests in order.
    pub(crate) fn heard(&mut self, ptype: PacketType) {
        self.last_heard = Instant::now();
        if self.echo == EchoSupport::Unknown && self.probe_sent.is_some() {
            self.echo = if ptype == PacketType::EchoRes {
                EchoSupport::Yes
            } else {
                EchoSupport::No
            };
        }
        self.probe_sent = None;
    }

    /// When [`Prober::due`] has something to say; `None`: never.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        let idle = self.idle?;
        match (self.probe_sent, self.echo) {
            (Some(sent), _) => sent.checked_add(self.timeout),
            (None, EchoSupport::Yes) => self.last_heard.checked_add(idle),
            (None, _) => None,
        }
    }

    /// What to do now that [`Prober::deadline`] has passed.
    pub(crate) fn due(&mut self) -> Option<ProbeDue> {
        if self.deadline().is_none_or(|d| Instant::now() < d) {
            return None;
        }
        if self.probe_sent.is_none() {
            return Some(ProbeDue::Send);
        }
        if self.echo == EchoSupport::Unknown {
            // Not even the first probe was answered: a server that ignores ECHO_REQ (geard)
            // looks the same as a hung one, so leave this connection to TCP keepalive.
            debug!("server does not answer ECHO_REQ; liveness left to TCP keepalive");
            self.echo = EchoSupport::No;
            self.probe_sent = None;
            return None;
        }
        Some(ProbeDue::Dead)
    }

    /// Why the connection is being closed, for [`Error::Disconnected`].
    pub(crate) fn dead_reason(&self) -> String {
        format!(
            "no answer to a liveness probe (ECHO_REQ) within {:?}",
            self.timeout
        )
    }
}

/// A packet-level connection to one server.
///
/// Most users want [`Client`](crate::Client) or [`Worker`](crate::Worker); this is public for
/// tests that need to speak raw packets (e.g. the broker's own tests).
pub struct Connection {
    framed: Framed<BoxTransport, Codec>,
    server: ServerAddr,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("server", &self.server)
            .finish()
    }
}

impl Connection {
    /// Connects once, trying every address the host name resolves to, with TCP_NODELAY set
    /// (without it every request/response round trip can stall ~40 ms on delayed ACKs) and
    /// the default TCP keepalive.
    pub async fn connect(server: &ServerAddr, timeout: Duration) -> Result<Connection> {
        Connection::connect_with(server, timeout, Some(Keepalive::default())).await
    }

    /// [`Connection::connect`] with the given TCP keepalive (`None`: off).
    pub async fn connect_with(
        server: &ServerAddr,
        timeout: Duration,
        keepalive: Option<Keepalive>,
    ) -> Result<Connection> {
        let transport = connect_transport(server, timeout, keepalive).await?;
        Ok(Connection::from_transport(transport, server.clone()))
    }

    /// Connects, retrying with exponential backoff until `deadline` passes (forever if `None`).
    /// Returns the last connect error once the deadline has passed.
    pub async fn connect_with_retry(
        server: &ServerAddr,
        backoff: Backoff,
        deadline: Option<Instant>,
    ) -> Result<Connection> {
        let mut delay = backoff.initial;
        loop {
            let timeout = match deadline {
                Some(d) => d
                    .saturating_duration_since(Instant::now())
                    .min(DEFAULT_CONNECT_TIMEOUT),
                None => DEFAULT_CONNECT_TIMEOUT,
            };
            match Connection::connect(server, timeout).await {
                Ok(c) => return Ok(c),
                Err(e @ Error::TlsConfig { .. }) => return Err(e),
                Err(e) => {
                    let retry_at = Instant::now().checked_add(delay);
                    if deadline.is_some_and(|d| retry_at.is_none_or(|t| t >= d)) {
                        return Err(e);
                    }
                    debug!(server = %server, error = %e, ?delay, "connect failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = backoff.next(delay);
                }
            }
        }
    }

    /// Wraps an already established stream (e.g. a TLS stream, or one end of a test pipe).
    pub fn from_transport(transport: BoxTransport, server: ServerAddr) -> Connection {
        Connection {
            framed: Framed::new(transport, Codec::default()),
            server,
        }
    }

    /// The server this connection talks to.
    pub fn server(&self) -> &ServerAddr {
        &self.server
    }

    /// Writes and flushes one packet.
    pub async fn send(&mut self, packet: Packet) -> Result<()> {
        debug!(server = %self.server, ptype = %packet.ptype, "send");
        self.framed
            .send(packet)
            .await
            .map_err(|e| Error::Disconnected {
                server: self.server.to_string(),
                reason: format!("write failed: {e}"),
            })
    }

    /// Reads the next binary packet. Returns `Ok(None)` when the server closed the connection.
    ///
    /// Malformed packets and stray text lines are logged and skipped: the codec keeps the
    /// stream in sync, and one bad packet should not cost the jobs on the connection. A stream
    /// that cannot be resynchronised (bad magic, oversized frame, I/O error) is an error.
    pub async fn recv(&mut self) -> Result<Option<Packet>> {
        loop {
            match self.framed.next().await {
                None => {
                    debug!(server = %self.server, "connection closed by server");
                    return Ok(None);
                }
                Some(Ok(Frame::Packet(p))) => {
                    debug!(server = %self.server, ptype = %p.ptype, "recv");
                    return Ok(Some(p));
                }
                Some(Ok(Frame::Malformed { code, reason, .. })) => {
                    debug!(server = %self.server, code, %reason, "skipping malformed packet");
                }
                Some(Ok(Frame::Admin(line))) => {
                    debug!(server = %self.server, %line, "skipping unexpected text line");
                }
                Some(Err(e)) => {
                    return Err(Error::Disconnected {
                        server: self.server.to_string(),
                        reason: e.to_string(),
                    })
                }
            }
        }
    }
}

/// Waits until `server` accepts TCP connections, retrying with backoff for up to `timeout`.
///
/// Useful right after starting a server process, and in agents that start before their broker.
pub async fn wait_for_server(server: &ServerAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now().checked_add(timeout);
    Connection::connect_with_retry(server, Backoff::STARTUP, deadline)
        .await
        .map(drop)
}

/// A byte stream to `server`: TCP (every resolved address in turn, TCP_NODELAY, `keepalive`),
/// wrapped in TLS when the server has TLS settings; `timeout` bounds each of the two steps.
/// Used by [`Connection`] and by the admin client.
pub(crate) async fn connect_transport(
    server: &ServerAddr,
    timeout: Duration,
    keepalive: Option<Keepalive>,
) -> Result<BoxTransport> {
    let connect_err = |source| Error::Connect {
        server: server.to_string(),
        source,
    };
    let attempt = async {
        // An address needs no resolver (which would start a thread to block in).
        if let Ok(ip) = server.host.parse::<std::net::IpAddr>() {
            return TcpStream::connect((ip, server.port))
                .await
                .map_err(connect_err);
        }
        let addrs = tokio::net::lookup_host((server.host.as_str(), server.port))
            .await
            .map_err(connect_err)?;
        let mut last = None;
        for sa in addrs {
            match TcpStream::connect(sa).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(connect_err(last.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "host resolved to no address")
        })))
    };
    let timed_out = |what: &str| {
        connect_err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{what} timed out after {timeout:?}"),
        ))
    };
    let stream = tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| timed_out("connect"))??;
    stream.set_nodelay(true).map_err(connect_err)?;
    if let Some(k) = keepalive {
        k.apply(&stream).map_err(connect_err)?;
    }
    debug!(server = %server, "connected");
    Ok(match &server.tls {
        None => Box::pin(stream),
        Some(tls) => {
            let handshake = crate::tls::handshake(server, tls, stream);
            Box::pin(
                tokio::time::timeout(timeout, handshake)
                    .await
                    .map_err(|_| timed_out("TLS handshake"))??,
            )
        }
    })
}

/// Argument `i` of a packet, or empty if absent. The codec guarantees the count for known
/// packet types; this keeps a bug elsewhere from turning into a panic.
pub(crate) fn arg(p: &Packet, i: usize) -> bytes::Bytes {
    p.args.get(i).cloned().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(350),
        };
        let d1 = b.next(b.initial);
        let d2 = b.next(d1);
        let d3 = b.next(d2);
        assert_eq!(
            [d1, d2, d3],
            [
                Duration::from_millis(200),
                Duration::from_millis(350),
                Duration::from_millis(350)
            ]
        );
    }

    fn probing() -> Prober {
        Prober::new(&Liveness {
            keepalive: None,
            probe_idle: Some(Duration::from_secs(30)),
            probe_timeout: Duration::from_secs(10),
        })
    }

    #[tokio::test]
    async fn a_server_that_echoes_is_probed_when_silent() {
        let mut p = probing();
        p.sent();
        let first = p.deadline().unwrap();
        assert!(first <= Instant::now() + Duration::from_secs(10));
        p.heard(PacketType::EchoRes);
        let idle = p.deadline().unwrap();
        assert!(
            idle > Instant::now() + Duration::from_secs(29),
            "probe after 30 s of silence"
        );
        assert_eq!(p.due(), None, "nothing due before the deadline");
        p.sent();
        assert!(p.deadline().unwrap() <= Instant::now() + Duration::from_secs(10));
        p.heard(PacketType::Noop);
        assert!(p.deadline().unwrap() > Instant::now() + Duration::from_secs(29));
    }

    #[tokio::test]
    async fn a_server_that_ignores_echo_is_never_taken_for_dead_by_the_probe() {
        // geard: the first answer is to a later request.
        let mut p = probing();
        p.sent();
        p.heard(PacketType::NoJob);
        assert_eq!(p.deadline(), None);
        // Or no answer at all to the first probe: keepalive only, not "dead".
        let mut p = Prober::new(&Liveness {
            keepalive: None,
            probe_idle: Some(Duration::from_millis(1)),
            probe_timeout: Duration::ZERO,
        });
        p.sent();
        assert_eq!(p.due(), None);
        assert_eq!(p.deadline(), None);
    }

    #[tokio::test]
    async fn unusable_tls_settings_are_refused_clearly() {
        // Needs a listener: the TLS settings are read once TCP is connected.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let addr = ServerAddr::localhost(port).with_tls(Default::default());
        let err = Connection::connect(&addr, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::TlsConfig { .. }), "{err}");
        assert!(err.to_string().contains("ssl_ca is required"), "{err}");
    }
}
