//! One connection: a reader task that frames bytes and hands whole frames to the broker, and a
//! writer task (see [`crate::outbox`]) that sends what the broker queued for it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;

use broker_core::ConnId;
use bytes::BytesMut;
use gearman_proto::{Codec, Frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::outbox::{write_loop, Outbox, SharedWrite, BIG_BUFFER};
use crate::server::Shared;

/// The disconnect reason of a connection that failed rather than closed.
const READ_FAILED: &str = "read error";

/// Bytes a connection reads at a time when no larger frame is pending.
const READ_CHUNK: usize = 1024;

/// Backlog past which a connection's next frame waits until the peer has read what is queued
/// for it: a worker that sends GRAB_JOBs but does not read gets no more jobs meanwhile, and
/// the jobs stay queued for other workers. Small, so a peer that never reads costs the broker
/// little more than this plus the socket buffers.
pub const HIGH_WATER: usize = 64 * 1024;
/// Backlog at which a held-back connection is served again.
pub const LOW_WATER: usize = 16 * 1024;

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
    let cancel = shared.stop_token().child_token();
    let outbox = Arc::new(Outbox::new(cancel.clone(), direct));
    shared.connect(id, peer, identity, outbox.clone());
    tracing::debug!(conn = %id, %peer, "connected");
    let writer_task = tokio::spawn(write_loop(writer, outbox.clone()));
    let reason = read_loop(&shared, reader, id, &outbox, &cancel).await;
    tracing::debug!(conn = %id, %peer, reason, "disconnected");
    if reason == READ_FAILED {
        shared.disconnect_lost(id);
    } else {
        shared.disconnect(id);
    }
    outbox.finish();
    let _ = writer_task.await;
}

async fn read_loop<R: AsyncRead + Unpin>(
    shared: &Shared,
    mut reader: R,
    id: ConnId,
    outbox: &Outbox,
    cancel: &CancellationToken,
) -> &'static str {
    let settings = shared.settings();
    let codec = Codec {
        max_frame: settings.max_frame,
        max_admin_line: settings.max_admin_line,
    };
    let idle = settings.partial_packet_timeout;
    // Buffers start small and shrink back after a burst: thousands of idle connections (one
    // per waiting testenv-client) must cost little memory each.
    let mut buf = BytesMut::new();
    let mut frames: VecDeque<Frame> = VecDeque::new();
    let mut fatal = None;
    // A connection holding part of a frame must finish it in time, however slowly it trickles
    // bytes in (slowloris): the deadline runs from when the unfinished frame started and only
    // moves when a frame completes.
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        // Frames already read wait while the peer has not read what it was sent (see
        // HIGH_WATER); nothing more is read from it meanwhile either.
        while !frames.is_empty() {
            if outbox.over(HIGH_WATER) {
                outbox.wait_below(LOW_WATER).await;
                if cancel.is_cancelled() {
                    return "closed by server";
                }
                // The peer cannot finish a frame while we do not read: its time starts again.
                if deadline.is_some() {
                    deadline = tokio::time::Instant::now().checked_add(idle);
                }
            }
            shared.apply_frames(id, &mut frames, outbox);
        }
        if let Some(e) = fatal.take() {
            shared.protocol_error(id, &e);
            return "protocol error";
        }
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
                shared.partial_packet_timeout(id);
                return "partial packet timeout";
            }
        };
        match read {
            Ok(0) => return "peer closed",
            Ok(_) => {}
            // A reset comes from the peer's kernel (its process died with data unread): the
            // peer is as gone as after a close. Anything else (a keepalive timeout, an
            // unreachable host) says nothing about whether the peer still runs.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return "peer reset",
            Err(_) => return READ_FAILED,
        }
        let before = frames.len();
        loop {
            match codec.decode_frame(&mut buf) {
                Ok(Some(frame)) => frames.push_back(frame),
                Ok(None) => break,
                Err(e) => {
                    fatal = Some(e);
                    break;
                }
            }
        }
        if buf.is_empty() || idle.is_zero() {
            deadline = None;
        } else if deadline.is_none() || frames.len() > before {
            deadline = tokio::time::Instant::now().checked_add(idle);
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
