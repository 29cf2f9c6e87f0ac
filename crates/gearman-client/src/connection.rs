//! One framed connection to one Gearman server, plus connect-with-retry.
//!
//! The transport is a boxed `AsyncRead + AsyncWrite` so that TLS (a later issue) can be slotted in
//! by wrapping the TCP stream, without touching the client and worker state machines.

use std::pin::Pin;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use gearman_proto::{Codec, Frame, Packet};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::codec::Framed;
use tracing::debug;

use crate::addr::ServerAddr;
use crate::error::{Error, Result};

/// Any byte stream a connection can run over (TCP today, TLS later).
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
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The delay to use after `delay`.
    pub fn next(&self, delay: Duration) -> Duration {
        (delay * 2).clamp(self.initial, self.max.max(self.initial))
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
    /// (without it every request/response round trip can stall ~40 ms on delayed ACKs).
    pub async fn connect(server: &ServerAddr, timeout: Duration) -> Result<Connection> {
        let connect_err = |source| Error::Connect {
            server: server.to_string(),
            source,
        };
        let attempt = async {
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
        let stream = match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(connect_err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect timed out after {timeout:?}"),
                )))
            }
        };
        stream.set_nodelay(true).map_err(connect_err)?;
        debug!(server = %server, "connected");
        let transport: BoxTransport = match &server.tls {
            None => Box::pin(stream),
            Some(tls) => {
                let handshake = crate::tls::handshake(server, tls, stream);
                match tokio::time::timeout(timeout, handshake).await {
                    Ok(r) => Box::pin(r?),
                    Err(_) => {
                        return Err(connect_err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("TLS handshake timed out after {timeout:?}"),
                        )))
                    }
                }
            }
        };
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
                    let now = Instant::now();
                    if deadline.is_some_and(|d| now + delay >= d) {
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
    let backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(500),
    };
    Connection::connect_with_retry(server, backoff, Some(Instant::now() + timeout))
        .await
        .map(drop)
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
