//! The outbox over real byte streams: a `tokio::io::duplex` pipe with a tiny buffer (partial
//! writes) and loopback TCP pairs (direct writes next to the writer task).

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use super::*;

const WAIT: Duration = Duration::from_secs(10);

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (a.unwrap(), b.unwrap().0)
}

/// An outbox over the write half of a TCP stream, with its writer task running.
fn tcp_outbox(stream: TcpStream) -> (Arc<Outbox>, tokio::task::JoinHandle<()>) {
    let (_read, write) = stream.into_split();
    let write = Arc::new(write);
    let outbox = Arc::new(Outbox::new(CancellationToken::new(), Some(write.clone())));
    let writer = tokio::spawn(write_loop(SharedWrite(write), outbox.clone()));
    (outbox, writer)
}

async fn read_exactly(peer: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut got = vec![0u8; n];
    tokio::time::timeout(WAIT, peer.read_exact(&mut got))
        .await
        .expect("the peer got every byte in time")
        .unwrap();
    got
}

#[tokio::test]
async fn partial_writes_deliver_every_byte_in_order() {
    // A 1 KiB pipe takes each 64 KiB batch in many partial writes.
    let (ours, mut theirs) = tokio::io::duplex(1024);
    let outbox = Arc::new(Outbox::new(CancellationToken::new(), None));
    let writer = tokio::spawn(write_loop(ours, outbox.clone()));
    let mut want = Vec::new();
    for seed in 0..4u8 {
        let chunk = pattern(64 * 1024 + seed as usize, seed);
        let queued = outbox.queue(0, |b| b.extend_from_slice(&chunk));
        assert!(
            matches!(queued, Queued::Ok(n) if n >= chunk.len()),
            "{queued:?}"
        );
        outbox.push();
        want.extend_from_slice(&chunk);
    }
    outbox.finish();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, theirs.read_to_end(&mut got))
        .await
        .expect("the writer finished and shut the pipe")
        .unwrap();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "bytes arrived reordered or altered");
    tokio::time::timeout(WAIT, writer).await.unwrap().unwrap();
}

#[tokio::test]
async fn direct_writes_wait_while_the_writer_holds_bytes() {
    let (ours, mut peer) = tcp_pair().await;
    let (outbox, writer) = tcp_outbox(ours);
    // Far more than the socket buffers take while the peer does not read: the direct write
    // stops part way, the writer task takes the rest and blocks holding it.
    let first = pattern(8 << 20, 1);
    outbox.queue(0, |b| b.extend_from_slice(&first));
    outbox.push();
    tokio::time::timeout(WAIT, async {
        while !outbox.writer_busy.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the writer task took the bytes the socket refused");
    assert!(outbox.backlog() > 0, "the writer's bytes count as backlog");
    // A reply queued now must not go straight to the socket ahead of the writer's bytes.
    let second = pattern(1000, 2);
    outbox.queue(0, |b| b.extend_from_slice(&second));
    outbox.push();
    assert_eq!(
        outbox.lock().len(),
        second.len(),
        "held back while the writer is busy"
    );
    let got = read_exactly(&mut peer, first.len() + second.len()).await;
    assert!(
        got[..first.len()] == first[..],
        "the first batch arrived intact and first"
    );
    assert!(
        got[first.len()..] == second[..],
        "the second batch arrived after it"
    );
    tokio::time::timeout(WAIT, outbox.wait_below(0))
        .await
        .expect("the backlog drained");
    assert_eq!(outbox.backlog(), 0);
    outbox.finish();
    tokio::time::timeout(WAIT, writer).await.unwrap().unwrap();
}

#[tokio::test]
async fn buffers_shrink_after_a_burst() {
    let (ours, mut peer) = tcp_pair().await;
    let (outbox, writer) = tcp_outbox(ours);
    let burst = pattern(4 << 20, 3);
    outbox.queue(0, |b| b.extend_from_slice(&burst));
    outbox.push();
    read_exactly(&mut peer, burst.len()).await;
    tokio::time::timeout(WAIT, outbox.wait_below(0))
        .await
        .unwrap();
    // The next small reply goes out through whichever path; the big buffers are gone.
    outbox.queue(0, |b| b.extend_from_slice(b"small"));
    outbox.push();
    assert_eq!(read_exactly(&mut peer, 5).await, b"small");
    tokio::time::timeout(WAIT, outbox.wait_below(0))
        .await
        .unwrap();
    let capacity = outbox.lock().capacity();
    assert!(
        capacity <= BIG_BUFFER,
        "queue kept {capacity} bytes of capacity after the burst"
    );
    outbox.finish();
    tokio::time::timeout(WAIT, writer).await.unwrap().unwrap();
}

#[tokio::test]
async fn the_hard_cap_aborts_the_connection() {
    let (ours, mut peer) = tcp_pair().await;
    let (outbox, writer) = tcp_outbox(ours);
    assert_eq!(
        outbox.queue(1000, |b| b.extend_from_slice(&[7; 600])),
        Queued::Ok(600)
    );
    // Not pushed: the peer "does not read", so the queue only grows.
    assert_eq!(
        outbox.queue(1000, |b| b.extend_from_slice(&[7; 600])),
        Queued::OverCap(1200)
    );
    assert!(outbox.is_aborted());
    assert!(outbox.cancel.is_cancelled(), "the reader is told to stop");
    assert_eq!(
        outbox.queue(1000, |b| b.extend_from_slice(b"x")),
        Queued::Aborted
    );
    outbox.push();
    tokio::time::timeout(WAIT, writer)
        .await
        .expect("the writer stops on abort")
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, peer.read_to_end(&mut got))
        .await
        .expect("the peer sees the connection end")
        .unwrap();
    assert!(
        got.is_empty(),
        "nothing of the aborted queue was written: {}",
        got.len()
    );
}

#[tokio::test]
async fn wait_below_returns_once_the_peer_reads() {
    let (ours, mut peer) = tcp_pair().await;
    let (outbox, writer) = tcp_outbox(ours);
    let big = pattern(8 << 20, 4);
    outbox.queue(0, |b| b.extend_from_slice(&big));
    outbox.push();
    assert!(
        outbox.over(64 * 1024),
        "the peer does not read: backlog over the mark"
    );
    let waiter = {
        let outbox = outbox.clone();
        tokio::spawn(async move { outbox.wait_below(64 * 1024).await })
    };
    read_exactly(&mut peer, big.len()).await;
    tokio::time::timeout(WAIT, waiter)
        .await
        .expect("the waiter woke once the backlog drained")
        .unwrap();
    assert!(!outbox.over(64 * 1024));
    outbox.finish();
    tokio::time::timeout(WAIT, writer).await.unwrap().unwrap();
}
