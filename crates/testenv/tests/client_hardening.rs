//! testenv-client under adverse conditions: bad `-t`, no broker, a broker that dies while the
//! client waits, workers that never provide an environment, and COMMANDs that ignore SIGTERM.
//! The real binaries, a real tebroker in a process of its own, real signals.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const SEC: Duration = Duration::from_secs(1);

/// The tebroker test binaries re-execute themselves as the broker process.
#[test]
fn broker_child_process() {
    broker_child_main();
}

fn wait_gone(pids: &[i32], within: Duration) {
    wait_until(within, &format!("processes {pids:?} gone"), || {
        pids.iter().all(|&p| !alive(p))
    });
}

/// Waits until the broker has `n` lockenv requests (queued or running).
fn wait_lockenv_jobs(b: &Broker, n: u64) {
    wait_until(TIMEOUT, &format!("{n} lockenv job(s)"), || {
        b.status()
            .iter()
            .any(|(f, total, _, _)| f == "lockenv" && *total == n)
    });
}

fn wait_output(p: &mut Proc, text: &str) {
    wait_until(
        TIMEOUT,
        &format!("{text:?} in the output of {}", p.name),
        || {
            assert!(p.running(), "{} exited:\n{}", p.name, p.output());
            p.output().contains(text)
        },
    );
}

#[test]
fn an_out_of_range_timeout_is_refused_with_a_clear_error() {
    let s = Scene::new();
    for bad in ["10000000000000000000", "0", "-5", "nan", "inf", "ten"] {
        let flag = format!("--timeout={bad}");
        let mut c = s.client("127.0.0.1:1", "bad-t", &[&flag], "exit 0");
        c.expect_code(2, TIMEOUT);
        let out = c.output();
        assert!(
            out.contains("--timeout") && out.contains("at most 2592000"),
            "-t {bad}: {out}"
        );
        assert!(!out.contains("panicked"), "-t {bad}: {out}");
    }
}

#[test]
fn with_no_broker_the_client_says_so_and_honours_signals_and_its_timeout() {
    let s = Scene::new();
    let nobody = format!("127.0.0.1:{}", test_support::free_port());
    let interval = ["--report-interval", "0.3"];

    let mut c = s.client(
        &nobody,
        "nob-term",
        &[&["-t", "60"][..], &interval].concat(),
        "exit 0",
    );
    wait_output(&mut c, &format!("no broker answers ({nobody})"));
    c.signal(libc::SIGTERM);
    c.expect_code(128 + libc::SIGTERM, 5 * SEC);

    let mut c = s.client(
        &nobody,
        "nob-int",
        &[&["-t", "60"][..], &interval].concat(),
        "exit 0",
    );
    wait_output(&mut c, "no broker answers");
    c.signal(libc::SIGINT);
    c.expect_code(128 + libc::SIGINT, 5 * SEC);

    let mut c = s.client(
        &nobody,
        "nob-t",
        &[&["-t", "2"][..], &interval].concat(),
        "exit 0",
    );
    c.expect_code(124, TIMEOUT);
    assert!(c.output().contains("timed out after 2s"), "{}", c.output());
}

#[test]
fn a_client_whose_broker_dies_while_it_waits_honours_signals_and_its_timeout() {
    let s = Scene::new();
    let mut b = Broker::start();
    let interval = ["--report-interval", "0.3"];
    // No worker: both lock requests stay queued.
    let mut by_signal = s.client(
        &b.spec(),
        "dies-term",
        &[&["-t", "60"][..], &interval].concat(),
        "exit 0",
    );
    let mut by_timeout = s.client(
        &b.spec(),
        "dies-t",
        &[&["-t", "4"][..], &interval].concat(),
        "exit 0",
    );
    wait_lockenv_jobs(&b, 2);
    let spec = b.spec();
    b.kill();

    for c in [&mut by_signal, &mut by_timeout] {
        wait_output(c, "lost the broker holding our request");
        wait_output(c, &format!("no broker answers ({spec}) for"));
    }
    by_signal.signal(libc::SIGTERM);
    by_signal.expect_code(128 + libc::SIGTERM, 5 * SEC);
    by_timeout.expect_code(124, TIMEOUT);
}

#[test]
fn exit_124_and_128_plus_n_while_still_waiting_for_a_te() {
    let s = Scene::new();
    let b = Broker::start();
    let mut by_int = s.client(&b.spec(), "w-int", &["-t", "60"], "exit 0");
    let mut by_term = s.client(&b.spec(), "w-term", &["-t", "60"], "exit 0");
    let mut by_timeout = s.client(&b.spec(), "w-t", &["-t", "2"], "exit 0");
    wait_lockenv_jobs(&b, 3);
    by_int.signal(libc::SIGINT);
    by_int.expect_code(128 + libc::SIGINT, 5 * SEC);
    by_term.signal(libc::SIGTERM);
    by_term.expect_code(128 + libc::SIGTERM, 5 * SEC);
    by_timeout.expect_code(124, TIMEOUT);
    // Their requests went with them: nothing is left for a worker to lease for nobody (the
    // function may be gone from `status` altogether).
    wait_until(TIMEOUT, "no lockenv job left", || {
        !b.status()
            .iter()
            .any(|(f, total, _, _)| f == "lockenv" && *total > 0)
    });
}

#[test]
fn the_client_gives_up_after_five_lock_request_retries() {
    let s = Scene::new();
    let b = Broker::start();
    // A real Gearman worker for lockenv that fails every request without calling back.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = gearman_client::ServerAddr::new(b.addr.ip().to_string(), b.addr.port());
    let refused = Arc::new(AtomicUsize::new(0));
    let worker = rt.block_on(async { gearman_client::Worker::new([server]) });
    worker.register("lockenv");
    {
        let (worker, refused) = (worker.clone(), refused.clone());
        rt.spawn(async move {
            while let Some(job) = worker.grab_job().await {
                refused.fetch_add(1, Ordering::SeqCst);
                let _ = job.fail().await;
            }
        });
    }
    b.wait_lockenv_workers(1);
    let mut c = s.client(&b.spec(), "refused", &["-t", "60"], "exit 0");
    c.expect_code(1, TIMEOUT);
    assert!(
        c.output()
            .contains("ended the lock request 6 times without an environment"),
        "{}",
        c.output()
    );
    assert_eq!(
        refused.load(Ordering::SeqCst),
        6,
        "one request and five retries"
    );
}

#[test]
fn a_client_notices_a_stopped_broker_and_resubmits_through_another() {
    let s = Scene::new();
    let (stopped, alive) = (Broker::start(), Broker::start());
    let brokers = format!("{},{}", stopped.spec(), alive.spec());
    let quick_probe = ["--probe-idle", "0.3", "--probe-timeout", "0.5"];
    let mut c = s.client(
        &brokers,
        "stopped",
        &[&["-t", "60"][..], &quick_probe].concat(),
        "exit 0",
    );
    wait_lockenv_jobs(&stopped, 1);
    stopped.signal(libc::SIGSTOP);
    wait_output(&mut c, "lost the broker holding our request");
    wait_lockenv_jobs(&alive, 1);
    let _w = s.worker(&alive.spec(), "te1", &[], &[&s.datafile("1")]);
    c.expect_code(0, TIMEOUT);
    stopped.signal(libc::SIGCONT);
}

#[test]
fn a_command_that_ignores_sigterm_is_sigkilled_after_the_kill_grace() {
    let (s, b, _w) = one_te(&[]);
    let script = format!(
        "trap 'echo got-term >> {got}' TERM; echo $$ > {pid}; while :; do sleep 0.1; done",
        got = s.p("got"),
        pid = s.p("cmd.pid"),
    );
    let mut c = s.client(&b.spec(), "stubborn", &["--kill-grace", "1"], &script);
    let cmd = read_pid(&s.path("cmd.pid"));
    c.signal(libc::SIGTERM);
    c.expect_code(128 + libc::SIGTERM, TIMEOUT);
    wait_gone(&[cmd], 5 * SEC);
    assert!(
        s.read("got").contains("got-term"),
        "SIGTERM reached COMMAND first"
    );
    b.wait_no_leases(5 * SEC);
}

/// `(… &)`: the subshell starts the grandchild and exits, so the grandchild is an orphan whose
/// parent is the guard (the subreaper); it ignores SIGTERM.
fn double_forked_stubborn_grandchild(s: &Scene) -> String {
    format!(
        r#"(sh -c 'trap "" TERM; echo $$ > {gc}; exec sleep 1000' &); echo $$ > {cmd}"#,
        gc = s.p("gc.pid"),
        cmd = s.p("cmd.pid"),
    )
}

#[test]
fn a_double_forked_grandchild_that_ignores_sigterm_is_sigkilled_after_the_kill_grace() {
    let (s, b, _w) = one_te(&[]);
    let script = format!(
        "{}; while :; do sleep 0.1; done",
        double_forked_stubborn_grandchild(&s)
    );
    let mut c = s.client(&b.spec(), "escapee", &["--kill-grace", "1"], &script);
    let (cmd, gc) = (read_pid(&s.path("cmd.pid")), read_pid(&s.path("gc.pid")));
    assert!(alive(gc));
    c.signal(libc::SIGTERM);
    c.expect_code(128 + libc::SIGTERM, TIMEOUT);
    wait_gone(&[cmd, gc], 5 * SEC);
    b.wait_no_leases(5 * SEC);
}

#[test]
fn a_stubborn_grandchild_left_behind_by_a_finished_command_is_ended() {
    let (s, b, _w) = one_te(&[]);
    let script = format!(
        "{}; while [ ! -s {gc} ]; do sleep 0.05; done; exit 7",
        double_forked_stubborn_grandchild(&s),
        gc = s.p("gc.pid"),
    );
    let mut c = s.client(&b.spec(), "leftover", &["--kill-grace", "1"], &script);
    c.expect_code(7, TIMEOUT);
    wait_gone(&[read_pid(&s.path("gc.pid"))], 5 * SEC);
    b.wait_no_leases(5 * SEC);
}

#[test]
fn the_command_starts_with_no_blocked_or_ignored_signal() {
    let (s, b, _w) = one_te(&[]);
    let script = format!(
        "grep -E '^Sig(Blk|Ign):' /proc/self/status > {}",
        s.p("sigs")
    );
    let mut c = s.client(&b.spec(), "signals", &[], &script);
    c.expect_code(0, TIMEOUT);
    let sigs = s.read("sigs");
    let masks: Vec<u64> = sigs
        .lines()
        .map(|l| u64::from_str_radix(l.split('\t').nth(1).unwrap_or("?"), 16).unwrap())
        .collect();
    // Signals 1-31 (SIGPIPE above all, which Rust programs ignore); 32 and up are the C
    // library's own.
    assert_eq!(masks.len(), 2, "{sigs}");
    assert!(masks.iter().all(|m| m & 0x7fff_ffff == 0), "{sigs}");
}
