//! The harness itself: each peer starts, accepts, is the process we hold (a pyenv shim has
//! exec'd into geard), and is gone — reaped, not a zombie — once dropped.

use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use test_support::{Peer, PeerServer};

fn check(peer: Peer) {
    let mut s = PeerServer::start(peer, Duration::from_secs(10));
    TcpStream::connect(s.addr()).expect("accepts");
    let pid = s.pid();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains(peer.name()),
        "pid {pid} is not {}: {:?}",
        peer.name(),
        String::from_utf8_lossy(&cmdline)
    );
    let port = s.port();
    s.restart();
    assert_eq!(s.port(), port, "restart keeps the port");
    TcpStream::connect(s.addr()).expect("accepts after restart");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "old {pid} left"
    );
    let pid = s.pid();
    drop(s);
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "{pid} left");
}

#[test]
fn gearmand_starts_and_is_gone_after_drop() {
    check(Peer::Gearmand { threads: 1 });
}

#[test]
fn geard_starts_and_is_gone_after_drop() {
    check(Peer::Geard);
}
