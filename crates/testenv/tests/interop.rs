//! Interoperability of our testenv agents with testenv agents of another implementation (small
//! ones of our own written with PyPI `gear`, the library the originals used: `tests/py/`), and
//! with the job servers the original system ran on (geard, gearmand), plus the one way gearmand
//! differs: it requeues the callback job of a dead client, so the TE stays locked; tebroker
//! fails it, so the TE is free again at once.
//!
//! Needs python3 with `gear`, `geard` and `gearmand` (scripts/install-peers.sh).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const SEC: Duration = Duration::from_secs(1);

/// Our gear-based worker (`tests/py/te_worker.py`) serving `datafile`, registered on `servers`.
fn py_worker(s: &Scene, servers: &str, tenum: &str, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(python());
    cmd.arg("-u")
        .arg(py_script("te_worker.py"))
        .args(["-b", servers, "-n", tenum])
        .args(extra)
        .arg(s.datafile(tenum));
    let p = Proc::spawn(
        &format!("py worker {tenum}"),
        &mut cmd,
        s.path(&format!("py-worker-{tenum}.log")),
    );
    wait_until(TIMEOUT, "py worker READY", || p.output().contains("READY"));
    p
}

/// Our gear-based client (`tests/py/te_client.py`) running `sh -c script`.
fn py_client(s: &Scene, servers: &str, jobnum: &str, script: &str) -> Proc {
    let mut cmd = Command::new(python());
    cmd.arg("-u")
        .arg(py_script("te_client.py"))
        .args(["-b", servers, "-n", jobnum, "--", "sh", "-c", script])
        .env("TOCI_JOBTYPE", format!("py-{jobnum}"));
    Proc::spawn(
        &format!("py client {jobnum}"),
        &mut cmd,
        s.path(&format!("py-client-{jobnum}.log")),
    )
}

#[test]
fn python_client_with_our_worker_through_tebroker() {
    let s = Scene::new();
    let b = Broker::start();
    let w = s.worker(&b.spec(), "te1", &[], &[&s.datafile("1")]);
    b.wait_lockenv_workers(1);
    let mut c = py_client(
        &s,
        &b.spec(),
        "py1",
        &format!(r#"cat "$TE_DATAFILE" > {}; exit 5"#, s.p("out")),
    );
    c.expect_code(5, TIMEOUT);
    assert_eq!(s.read("out"), te_json("1"));
    b.wait_no_leases(5 * SEC);
    wait_until(TIMEOUT, "lease logged", || w.output().contains("Completed"));
    assert!(
        w.output().contains(r#"holder="callback_py1""#),
        "{}",
        w.output()
    );

    // A missing datafile reaches the python client as the original notice: it exits 2.
    let w2 = s.worker(&b.spec(), "te2", &[], &[&s.path("missing.json")]);
    drop(w);
    b.wait_lockenv_workers(1);
    let mut c = py_client(&s, &b.spec(), "py2", &format!("touch {}", s.p("ran")));
    c.expect_code(2, TIMEOUT);
    assert!(
        c.output().contains("Couldn't retrieve env"),
        "{}",
        c.output()
    );
    assert!(!s.path("ran").exists());
    drop(w2);
}

#[test]
fn our_client_with_python_worker_through_tebroker() {
    let s = Scene::new();
    let b = Broker::start();
    let w = py_worker(&s, &b.spec(), "7", &[]);
    b.wait_lockenv_workers(1);
    let mut c = s.client(
        &b.spec(),
        "rs1",
        &[],
        &format!(r#"cat "$TE_DATAFILE" > {}; exit 6"#, s.p("out")),
    );
    c.expect_code(6, TIMEOUT);
    assert_eq!(s.read("out"), te_json("7"));
    wait_until(TIMEOUT, "python worker lease end", || {
        w.output().contains("LEASE end complete")
    });
    assert!(
        w.output()
            .contains("LEASE start callback_rs1 No change: e2e-rs1"),
        "{}",
        w.output()
    );

    // The python worker gives the TE back after timeout - 40 s; our client then kills COMMAND.
    let mut c = s.client(
        &b.spec(),
        "rs2",
        &["-t", "42", "--kill-grace", "1"],
        &format!("echo $$ > {}; sleep 1000 & wait", s.p("cmd.pid")),
    );
    let pid = read_pid(&s.path("cmd.pid"));
    c.expect_code(3, TIMEOUT);
    assert!(!alive(pid), "COMMAND outlived the lease");
    wait_until(TIMEOUT, "python worker timeout", || {
        w.output().contains("LEASE end timeout")
    });
}

/// Our client and worker through a server that is not tebroker.
fn our_agents_through(server: &str, addr: std::net::SocketAddr) {
    let s = Scene::new();
    let _w1 = s.worker(server, "te1", &[], &[&s.datafile("1")]);
    let _w2 = s.worker(server, "te2", &[], &[&s.datafile("2")]);
    wait_lockenv_workers(addr, 2);
    let mut clients: Vec<Proc> = (0..4)
        .map(|i| {
            s.client(
                server,
                &format!("j{i}"),
                &[],
                &format!(r#"cp "$TE_DATAFILE" {}; exit {i}"#, s.p(&format!("out{i}"))),
            )
        })
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.expect_code(i as i32, TIMEOUT);
        let got = s.read(&format!("out{i}"));
        assert!(got == te_json("1") || got == te_json("2"), "{got}");
    }
}

#[test]
fn our_agents_through_geard() {
    let g = PeerServer::geard();
    our_agents_through(&g.spec(), g.addr);
}

#[test]
fn our_agents_through_gearmand() {
    let g = PeerServer::gearmand();
    our_agents_through(&g.spec(), g.addr);
}

/// Starts a worker and a client holding its TE on `server`, then kills the client's whole
/// process group. Returns the scene and the worker.
fn kill_holding_client(
    server: &str,
    addr: std::net::SocketAddr,
    worker_args: &[&str],
) -> (Scene, Proc) {
    let s = Scene::new();
    let mut args = vec!["--holder-grace", "0.2"];
    args.extend_from_slice(worker_args);
    let w = s.worker(server, "te1", &args, &[&s.datafile("1")]);
    wait_lockenv_workers(addr, 1);
    let c = s.client(
        server,
        "victim",
        &[],
        &format!("echo $$ > {}; sleep 1000 & wait", s.p("cmd.pid")),
    );
    let pid = read_pid(&s.path("cmd.pid"));
    c.signal_group(libc::SIGKILL);
    wait_until(TIMEOUT, "client's command gone", || !alive(pid));
    drop(c);
    (s, w)
}

#[test]
fn tebroker_fails_the_callback_of_a_dead_client_so_the_te_is_free_at_once() {
    let b = Broker::start();
    let (s, _w) = kill_holding_client(&b.spec(), b.addr, &[]);
    // The callback job is failed, not requeued: no job is left for it, the lease ends.
    wait_until(5 * SEC, "callback job gone and lease over", || {
        let st = b.status();
        let callback_jobs: u64 = st
            .iter()
            .filter(|(f, ..)| f.starts_with("callback_"))
            .map(|(_, total, ..)| total)
            .sum();
        let lockenv_running = st
            .iter()
            .any(|(f, _, running, _)| f == "lockenv" && *running > 0);
        callback_jobs == 0 && !lockenv_running && b.leases().is_empty()
    });
    let mut next = s.client(&b.spec(), "next", &[], "exit 0");
    next.expect_code(0, 5 * SEC);
}

/// Documents (and pins) gearmand's behaviour the README describes: when the client holding a TE
/// dies, gearmand requeues its callback job (a foreground job whose worker vanished) instead of
/// failing it, so the testenv-worker keeps waiting and the TE stays locked until the worker's
/// own fallback (GET_STATUS --callback-start-timeout after submitting the callback: 30 s by
/// default, 8 s here) or its timeout.
#[test]
fn gearmand_requeues_the_callback_of_a_dead_client_and_keeps_the_te_locked() {
    let g = PeerServer::gearmand();
    let (s, w) = kill_holding_client(&g.spec(), g.addr, &["--callback-start-timeout", "8"]);
    wait_until(5 * SEC, "gearmand shows the callback job requeued", || {
        let st = g.status();
        let requeued = st
            .iter()
            .any(|(f, total, running, _)| f == "callback_victim" && (*total, *running) == (1, 0));
        let locked = st
            .iter()
            .any(|(f, _, running, _)| f == "lockenv" && *running == 1);
        requeued && locked
    });
    // The next job waits: its lockenv queues behind the one still locked for the dead client.
    let mut next = s.client(&g.spec(), "next", &[], "exit 0");
    wait_until(
        TIMEOUT,
        "the next lockenv queued behind the locked TE",
        || {
            g.status()
                .iter()
                .any(|(f, total, running, _)| f == "lockenv" && (*total, *running) == (2, 1))
        },
    );
    assert!(next.running(), "gearmand freed the TE after all");
    assert!(!w.output().contains("lease end"), "{}", w.output());
    // The worker's fallback finds the callback job not running, ends the lease, and the next
    // client gets the TE.
    next.expect_code(0, TIMEOUT);
    assert!(
        w.output().contains("outcome=NeverStarted"),
        "{}",
        w.output()
    );
}

/// Not a test: the entry point of the broker processes [`Broker::start`] runs.
#[test]
fn broker_child_process() {
    broker_child_main();
}
