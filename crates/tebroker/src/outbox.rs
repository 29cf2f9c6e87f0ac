//! One connection's outgoing bytes: the queue the broker fills under its lock, and the writer
//! task that drains it.
//!
//! Replies are first written straight from the task that produced them (plain TCP only: one
//! task switch less per packet); what the socket does not take at once goes to the writer task.
//! The writer holds the bytes it took from the queue outside the queue's lock, so it marks
//! itself busy meanwhile and direct writes wait for it: bytes never overtake each other.
//!
//! Two limits bound what a peer that does not read can cost:
//! * a small high-water mark ([`Outbox::over`]), which the connection's reader checks before
//!   each frame it hands to the broker, so such a peer stops being served (a worker stops
//!   being assigned jobs) until its backlog drains;
//! * a hard cap (`--max-output-buffer`), for output other connections cause (results for a
//!   client that does not read), past which the connection is dropped.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A buffer grown past this by a burst is given back once it is empty: thousands of idle
/// connections must cost little memory each.
pub const BIG_BUFFER: usize = 64 * 1024;

/// What [`Outbox::queue`] did with the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// Queued; this many bytes now wait in the queue.
    Ok(usize),
    /// Dropped: the connection is being torn down.
    Aborted,
    /// Queued, and the queue went over the hard cap: the connection is now aborted.
    OverCap(usize),
}

/// Bytes waiting to be written to one connection.
pub struct Outbox {
    buf: Mutex<BytesMut>,
    ready: Notify,
    /// Signalled whenever the writer has written what it held.
    drained: Notify,
    /// Set once the connection is to be closed after the queued bytes are written.
    closing: AtomicBool,
    /// Cancels the connection's reader (Close action, or the server stopping).
    cancel: CancellationToken,
    /// Drops whatever is unwritten: the peer is not reading (slow reader) or is gone.
    abort: CancellationToken,
    /// For plain TCP: the socket, for direct writes.
    direct: Option<Arc<OwnedWriteHalf>>,
    /// Set while the writer task holds bytes taken from `buf`; direct writes wait for it.
    writer_busy: AtomicBool,
    /// How many bytes the writer task holds (taken from `buf`, not yet written).
    in_writer: AtomicUsize,
}

impl Outbox {
    pub fn new(cancel: CancellationToken, direct: Option<Arc<OwnedWriteHalf>>) -> Outbox {
        Outbox {
            buf: Mutex::new(BytesMut::new()),
            ready: Notify::new(),
            drained: Notify::new(),
            closing: AtomicBool::new(false),
            cancel,
            abort: CancellationToken::new(),
            direct,
            writer_busy: AtomicBool::new(false),
            in_writer: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BytesMut> {
        // The guarded bytes stay consistent whatever panicked while holding the lock.
        self.buf.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends bytes with `fill`; `cap` is the hard cap (0: none). Call [`Outbox::push`] once
    /// the broker's lock is released.
    pub fn queue(&self, cap: usize, fill: impl FnOnce(&mut BytesMut)) -> Queued {
        let mut buf = self.lock();
        if self.abort.is_cancelled() {
            return Queued::Aborted;
        }
        fill(&mut buf);
        let len = buf.len();
        if cap > 0 && len > cap {
            self.abort();
            return Queued::OverCap(len);
        }
        Queued::Ok(len)
    }

    /// Bytes queued or held by the writer, not yet handed to the socket.
    pub fn backlog(&self) -> usize {
        let buf = self.lock();
        buf.len() + self.in_writer.load(Ordering::Acquire)
    }

    /// Whether the backlog is over `mark` (the reader then holds back the next frame).
    pub fn over(&self, mark: usize) -> bool {
        self.backlog() > mark
    }

    /// Waits until the backlog is at most `mark`, or the connection is cancelled or aborted.
    pub async fn wait_below(&self, mark: usize) {
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if !self.over(mark) || self.cancel.is_cancelled() || self.abort.is_cancelled() {
                return;
            }
            tokio::select! {
                _ = drained => {}
                _ = self.cancel.cancelled() => return,
                _ = self.abort.cancelled() => return,
            }
        }
    }

    /// Sends what is queued: directly when the socket takes it now, else through the writer.
    pub fn push(&self) {
        if let Some(half) = &self.direct {
            let tcp: &TcpStream = half.as_ref().as_ref();
            let mut buf = self.lock();
            if !self.writer_busy.load(Ordering::Acquire) && !self.abort.is_cancelled() {
                while !buf.is_empty() {
                    match tcp.try_write(&buf) {
                        Ok(n) => bytes::Buf::advance(&mut *buf, n),
                        // Would block, or an error the writer task will meet and report.
                        Err(_) => break,
                    }
                }
                if buf.is_empty() && buf.capacity() > BIG_BUFFER {
                    *buf = BytesMut::new();
                }
            }
            if buf.is_empty() && !self.closing.load(Ordering::Acquire) {
                drop(buf);
                self.drained.notify_one();
                return;
            }
        }
        self.ready.notify_one();
    }

    /// Closes the connection once what is queued has been written.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.cancel.cancel();
        self.ready.notify_one();
    }

    /// Closes the connection at once, dropping what is unwritten.
    pub fn abort(&self) {
        self.closing.store(true, Ordering::Release);
        self.cancel.cancel();
        self.abort.cancel();
    }

    pub fn is_aborted(&self) -> bool {
        self.abort.is_cancelled()
    }

    /// The reader has ended: the writer finishes what is queued, then stops.
    pub fn finish(&self) {
        self.closing.store(true, Ordering::Release);
        self.ready.notify_one();
    }
}

/// Drains `outbox` into `writer` until the connection closes, then shuts the writer down.
pub async fn write_loop<W: AsyncWrite + Unpin>(mut writer: W, outbox: Arc<Outbox>) {
    let mut pending = BytesMut::new();
    loop {
        {
            let mut buf = outbox.lock();
            if outbox.abort.is_cancelled() {
                buf.clear();
                break;
            }
            std::mem::swap(&mut *buf, &mut pending);
            outbox.in_writer.store(pending.len(), Ordering::Release);
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
            let _buf = outbox.lock();
            outbox.in_writer.store(0, Ordering::Release);
            outbox.writer_busy.store(false, Ordering::Release);
        }
        outbox.drained.notify_one();
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
    outbox.drained.notify_one();
    let _ = writer.shutdown().await;
}

/// The write half of a TCP stream shared by a connection's writer task and direct writes.
pub struct SharedWrite(pub Arc<OwnedWriteHalf>);

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

#[cfg(test)]
mod tests;
