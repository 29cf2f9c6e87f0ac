//! A job handed to a worker, and the ways to answer it.

use bytes::Bytes;
use gearman_proto::{Packet, PacketType};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::error::{Error, Result};

/// A packet a job asks its connection to write. `ack` learns whether the write happened.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub packet: Packet,
    /// Set on the packet that finishes the job (WORK_COMPLETE / WORK_FAIL / WORK_EXCEPTION).
    pub finishes: Option<Bytes>,
    pub ack: Option<oneshot::Sender<Result<()>>>,
}

/// A job assigned to this worker by a server.
///
/// Every answer goes back on the connection the job came from: a job handle means nothing to
/// another server, nor to the same server after a reconnect. If that connection is gone, the
/// methods fail with [`Error::Disconnected`] (gearmand will have requeued or failed the job).
///
/// A job dropped without [`complete`](Job::complete), [`fail`](Job::fail) or
/// [`exception`](Job::exception) is failed (WORK_FAIL), so that its client never waits forever.
#[derive(Debug)]
pub struct Job {
    handle: Bytes,
    function: String,
    unique: String,
    data: Bytes,
    server: String,
    out: mpsc::UnboundedSender<Outgoing>,
    finished: bool,
}

impl Job {
    pub(crate) fn new(
        handle: Bytes,
        function: String,
        unique: String,
        data: Bytes,
        server: String,
        out: mpsc::UnboundedSender<Outgoing>,
    ) -> Job {
        Job {
            handle,
            function,
            unique,
            data,
            server,
            out,
            finished: false,
        }
    }

    /// The server-assigned job handle.
    pub fn handle(&self) -> &str {
        std::str::from_utf8(&self.handle).unwrap_or("<non-utf8 handle>")
    }

    /// The function the job was submitted for.
    pub fn function(&self) -> &str {
        &self.function
    }

    /// The unique id given by the client (empty if none; JOB_ASSIGN carries none).
    pub fn unique(&self) -> &str {
        &self.unique
    }

    /// The job's payload.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// The server the job came from.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Whether the connection this job came from is still up. Once it is gone the job cannot
    /// be answered (the server has failed or requeued it); a reconnect does not bring it back.
    pub fn is_connected(&self) -> bool {
        !self.out.is_closed()
    }

    /// Resolves when the connection this job came from is gone (at once if it already is):
    /// how a worker learns it lost a job it holds for a long time. Cancel-safe.
    pub async fn connection_lost(&self) {
        self.out.closed().await
    }

    /// WORK_DATA: partial output for a foreground client.
    pub async fn send_data(&self, data: impl Into<Bytes>) -> Result<()> {
        self.send(PacketType::WorkData, Some(data.into()), false)
            .await
    }

    /// WORK_WARNING.
    pub async fn send_warning(&self, data: impl Into<Bytes>) -> Result<()> {
        self.send(PacketType::WorkWarning, Some(data.into()), false)
            .await
    }

    /// WORK_STATUS: progress `numerator / denominator`, also what GET_STATUS reports.
    pub async fn send_status(&self, numerator: u64, denominator: u64) -> Result<()> {
        let packet = Packet::req(
            PacketType::WorkStatus,
            [
                self.handle.clone(),
                Bytes::from(numerator.to_string()),
                Bytes::from(denominator.to_string()),
            ],
        );
        self.write(packet, false).await
    }

    /// WORK_COMPLETE with the result.
    pub async fn complete(mut self, data: impl Into<Bytes>) -> Result<()> {
        self.finished = true;
        self.send(PacketType::WorkComplete, Some(data.into()), true)
            .await
    }

    /// WORK_FAIL.
    pub async fn fail(mut self) -> Result<()> {
        self.finished = true;
        self.send(PacketType::WorkFail, None, true).await
    }

    /// WORK_EXCEPTION with exception data (clients see it if they set the `exceptions` option).
    pub async fn exception(mut self, data: impl Into<Bytes>) -> Result<()> {
        self.finished = true;
        self.send(PacketType::WorkException, Some(data.into()), true)
            .await
    }

    async fn send(&self, ptype: PacketType, data: Option<Bytes>, finishes: bool) -> Result<()> {
        let mut args = vec![self.handle.clone()];
        args.extend(data);
        self.write(Packet::req(ptype, args), finishes).await
    }

    async fn write(&self, packet: Packet, finishes: bool) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let out = Outgoing {
            packet,
            finishes: finishes.then(|| self.handle.clone()),
            ack: Some(tx),
        };
        if self.out.send(out).is_err() {
            return Err(self.lost());
        }
        rx.await.unwrap_or_else(|_| Err(self.lost()))
    }

    fn lost(&self) -> Error {
        Error::Disconnected {
            server: self.server.clone(),
            reason: format!("the connection job {} came from is gone", self.handle()),
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        debug!(
            handle = self.handle(),
            "job dropped without an answer: sending WORK_FAIL"
        );
        let _ = self.out.send(Outgoing {
            packet: Packet::req(PacketType::WorkFail, [self.handle.clone()]),
            finishes: Some(self.handle.clone()),
            ack: None,
        });
    }
}
