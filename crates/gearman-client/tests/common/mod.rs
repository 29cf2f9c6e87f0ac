//! Test harness: a real `gearmand` (or python gear's `geard`) on a free loopback port, killed on
//! drop.

#![allow(dead_code)]

use std::time::Duration;

use gearman_client::ServerAddr;
use test_support::{Peer, PeerServer};

/// Which server implementation to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Debian's gearmand (C++).
    Gearmand,
    /// PyPI gear's geard, the server the original testenv system ran.
    Geard,
}

/// A running gearmand (or geard).
pub struct Gearmand {
    pub port: u16,
    server: PeerServer,
}

impl Gearmand {
    pub fn start() -> Gearmand {
        Gearmand::start_kind(Kind::Gearmand)
    }

    /// gearmand with `--threads 1`, or geard; waits up to 10 s for it to listen.
    pub fn start_kind(kind: Kind) -> Gearmand {
        let peer = match kind {
            Kind::Gearmand => Peer::Gearmand { threads: 1 },
            Kind::Geard => Peer::Geard,
        };
        let server = PeerServer::start(peer, Duration::from_secs(10));
        Gearmand {
            port: server.port(),
            server,
        }
    }

    pub fn addr(&self) -> ServerAddr {
        ServerAddr::localhost(self.port)
    }

    /// The server's process id (to stop and continue it).
    pub fn server_pid(&self) -> u32 {
        self.server.pid()
    }

    /// Kills the server (connections drop at once).
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// Kills the server and starts a fresh one (empty queues) on the same port.
    pub fn restart(&mut self) {
        self.server.restart();
    }
}

/// Generous timeout for anything a test awaits: a bug shows as a clear failure, not a hang.
pub const WAIT: Duration = Duration::from_secs(10);

pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?}: {what}"))
}
