//! The one error type of this crate.

use std::time::Duration;

use bytes::Bytes;

use crate::addr::AddrError;

/// Everything that can go wrong talking to Gearman servers.
///
/// Messages name the server involved, because with several brokers the first question when
/// something fails is "which one?".
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Addr(#[from] AddrError),
    #[error("cannot connect to gearman server {server}: {source}")]
    Connect {
        server: String,
        #[source]
        source: std::io::Error,
    },
    /// The TLS settings of a server cannot be used (missing or invalid files); not retried.
    #[error("TLS settings for gearman server {server}: {reason}")]
    TlsConfig { server: String, reason: String },
    #[error("no gearman server answered: {tried}")]
    NoServer { tried: String },
    #[error("connection to gearman server {server} lost: {reason}")]
    Disconnected { server: String, reason: String },
    #[error("gearman server {server} sent ERROR {code}: {text}")]
    Server {
        server: String,
        code: String,
        text: String,
    },
    #[error("protocol error from gearman server {server}: {reason}")]
    Protocol { server: String, reason: String },
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("job {handle} failed (WORK_FAIL)")]
    JobFailed { handle: String },
    #[error("job {handle} raised an exception: {}", String::from_utf8_lossy(.data))]
    JobException { handle: String, data: Bytes },
    #[error("the worker has been stopped")]
    Stopped,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Shorthand for `Result<T, gearman_client::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
