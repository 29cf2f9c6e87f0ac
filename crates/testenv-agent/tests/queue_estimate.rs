//! A waiting testenv-client prints its queue position with the estimated wait tebroker derives
//! from its store's recent grants: the real tebroker binary with its SQLite store, a real agent
//! serving one TE, real clients.

mod common;

use common::*;
use testenv_proto::agent::EnvState;

#[test]
fn a_waiting_client_prints_its_position_and_estimated_wait() {
    let work = tempfile::tempdir().unwrap();
    let (_broker, addr, _http) = tebroker_process(&work.path().join("data"));
    let agent = Agent::te1(addr, "");
    agent.wait_state("te1", EnvState::Ready);
    // Recent grants for the estimate.
    for _ in 0..3 {
        lease_ok(addr, &[], "true");
        agent.wait_state("te1", EnvState::Ready);
    }
    let go = agent.path("go");
    let holder = hold_until(addr, &go);
    agent.wait_state("te1", EnvState::Leased);
    let mut waiter = client(addr, &["--report-interval", "0.3"], "true");
    let stderr = waiter.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The broker refreshes its mean gap between grants every 2 s, so the first reports may
    // come without an estimate; one with it must follow.
    let deadline = std::time::Instant::now() + LONG;
    let line = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("a waiting report with an estimate");
        if line.contains("in the queue, about ") {
            break line;
        }
    };
    assert!(
        line.contains("(position 1 of 1 in the queue, about ") && line.ends_with("s to wait)"),
        "{line}"
    );
    std::fs::write(&go, "").unwrap();
    let out = finish(holder);
    assert!(out.status.success(), "{out:?}");
    let out = finish(waiter);
    assert!(out.status.success(), "the waiter got the TE next: {out:?}");
}
