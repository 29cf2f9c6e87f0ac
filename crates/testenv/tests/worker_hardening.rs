//! testenv-worker against hostile requests, hung checks, a second worker, restarts, torn
//! journals and clock steps: the real worker binary, a real tebroker, real sockets. Raw
//! requests are sent with the gearman-client library, as any client on the network could.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use gearman_client::{Client, JobRequest, ServerAddr, Worker};

const SEC: Duration = Duration::from_secs(1);

/// A client takes the TE of worker `w`, which is then SIGKILLed mid-lease; the client is told
/// (its lockenv fails) and ends with 3.
fn crash_mid_lease(s: &Scene, b: &Broker, w: &mut Proc) {
    let mut c = s.client(
        &b.spec(),
        "held",
        &["--kill-grace", "0.5"],
        &format!("touch {}; sleep 1000", s.p("holding")),
    );
    wait_until(TIMEOUT, "the lease held", || s.path("holding").exists());
    w.signal(libc::SIGKILL);
    w.wait(TIMEOUT);
    c.expect_code(3, TIMEOUT);
}

/// Not a test: the entry point of the broker processes [`Broker::start`] runs.
#[test]
fn broker_child_process() {
    broker_child_main();
}

fn server(b: &Broker) -> ServerAddr {
    ServerAddr::new(b.addr.ip().to_string(), b.addr.port())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// What a raw client saw of one lock request.
#[derive(Debug)]
struct RawLease {
    /// The callback job's data, if the worker submitted one.
    callback_data: Option<String>,
    /// The lockenv job's result: `Ok(data)` on WORK_COMPLETE, `Err(why)` otherwise.
    lockenv: Result<String, String>,
}

/// Submits `body` as a lockenv request, serving `callback` (if given) the way testenv-client
/// does: take the callback job, read its data, complete it. Every step has a deadline.
fn raw_lock_request(b: &Broker, callback: Option<&str>, body: &str) -> RawLease {
    runtime().block_on(async {
        let cb_worker = Worker::new([server(b)]);
        if let Some(name) = callback {
            cb_worker.register(name);
            cb_worker.wait_for_server(TIMEOUT).await.unwrap();
        }
        let client = Client::new([server(b)]);
        let mut lockenv = tokio::time::timeout(
            TIMEOUT,
            client.submit(JobRequest::new("lockenv", body.to_string())),
        )
        .await
        .expect("submit lockenv in time")
        .expect("submit lockenv");
        let mut callback_data = None;
        if callback.is_some() {
            let job = tokio::time::timeout(TIMEOUT, cb_worker.grab_job())
                .await
                .expect("the worker calls back in time")
                .expect("a callback job");
            callback_data = Some(String::from_utf8_lossy(job.data()).into_owned());
            tokio::time::timeout(TIMEOUT, job.complete(""))
                .await
                .expect("complete the callback in time")
                .unwrap();
        }
        let lockenv = loop {
            let ev = tokio::time::timeout(TIMEOUT, lockenv.next_event())
                .await
                .expect("lockenv ends in time");
            match ev {
                Ok(Some(gearman_client::JobEvent::Complete(d))) => {
                    break Ok(String::from_utf8_lossy(&d).into_owned())
                }
                Ok(Some(e)) if e.is_final() => break Err(format!("{e:?}")),
                Ok(Some(_)) => {}
                Ok(None) => break Err("no final event".into()),
                Err(e) => break Err(e.to_string()),
            }
        };
        cb_worker.stop();
        RawLease {
            callback_data,
            lockenv,
        }
    })
}

/// `testenv-worker -b BROKERS -n TENUM --state-dir DIR ARGS... FILES...` logging to `log` (in
/// the scene), for TE names that are no file names and for second workers of one TE.
fn worker_logged(
    s: &Scene,
    b: &Broker,
    tenum: &str,
    log: &str,
    files: &[&std::path::Path],
) -> Proc {
    let mut cmd = Command::new(WORKER_BIN);
    cmd.args(["-b", &b.spec(), "-n", tenum])
        .arg("--state-dir")
        .arg(s.path("state"))
        .args(files)
        .env_remove("RUST_LOG");
    Proc::spawn(&format!("worker {tenum}"), &mut cmd, s.path(log))
}

/// The TE is free again: no lease, and the next client gets it at once.
fn assert_te_free(s: &Scene, b: &Broker, name: &str) {
    b.wait_no_leases(10 * SEC);
    let mut next = s.client(&b.spec(), name, &[], "exit 0");
    next.expect_code(0, TIMEOUT);
}

/// Issue 7, defect 1: `"timeout": "10000000000000000000"` panicked the worker (overflow when
/// adding the lease length to an instant). Now the client is told why, and the TE stays.
#[test]
fn a_hostile_timeout_is_refused_and_the_te_stays_usable() {
    let (s, b, mut w) = one_te(&[]);
    for (n, timeout) in [r#""10000000000000000000""#, "1e300", r#""-1""#, r#""soon""#]
        .iter()
        .enumerate()
    {
        let callback = format!("callback_hostile{n}");
        let body = format!(r#"{{"callback_name": "{callback}", "timeout": {timeout}}}"#);
        let seen = raw_lock_request(&b, Some(&callback), &body);
        let data = seen.callback_data.unwrap_or_default();
        assert!(
            data.starts_with("Couldn't retrieve env: bad lockenv request: timeout"),
            "timeout {timeout}: the client got {data:?}"
        );
        assert!(seen.lockenv.is_ok(), "{:?}", seen.lockenv);
        assert!(
            w.running(),
            "worker died on timeout {timeout}:\n{}",
            w.output()
        );
    }
    // No usable callback: nobody can be told, so lockenv fails; the worker lives on.
    for body in ["{}", r#"{"callback_name": "lockenv"}"#, "[1]", "not json"] {
        let seen = raw_lock_request(&b, None, body);
        assert!(seen.lockenv.is_err(), "{body}: {:?}", seen.lockenv);
        assert!(w.running(), "worker died on {body}:\n{}", w.output());
    }
    assert_te_free(&s, &b, "after");
    let log = w.output();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("refusing a lockenv request"), "{log}");
}

/// A worker for TE "te1" whose client-alive check (every 0.2 s) writes its pid to `check.pid`
/// and hangs; `extra` worker flags.
fn te_with_hung_alive_check(extra: &[&str]) -> (Scene, Broker, Proc) {
    let s = Scene::new();
    let check = format!("echo $$ > {}; sleep 1000", s.p("check.pid"));
    let mut args = vec!["--client-alive-cmd", &check, "--alive-interval", "0.2"];
    args.extend_from_slice(extra);
    let b = Broker::start();
    let w = s.worker(&b.spec(), "te1", &args, &[&s.datafile("1")]);
    b.wait_lockenv_workers(1);
    (s, b, w)
}

/// Issue 7, defect 2 (worker side): a client-alive check that hangs held up the whole lease
/// loop: the callback's end, the heartbeat and SIGTERM all waited for it.
#[test]
fn a_hung_client_alive_check_blocks_neither_the_lease_nor_the_heartbeat_nor_signals() {
    let (s, b, mut w) = te_with_hung_alive_check(&["--holder-grace", "0.5"]);
    let go = s.p("go");
    let mut c = s.client(
        &b.spec(),
        "first",
        &[],
        &format!("while [ ! -e {go} ]; do sleep 0.05; done"),
    );
    wait_until(TIMEOUT, "the alive check running", || {
        !s.read("check.pid").trim().is_empty()
    });
    let check_pid = read_pid(&s.path("check.pid"));
    // The heartbeat goes on while the check hangs.
    let journal = s.path("state/lease-te1.json");
    let heartbeat = || -> u64 {
        std::fs::read_to_string(&journal)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["heartbeat_ms"].as_u64())
            .unwrap_or(0)
    };
    let first = heartbeat();
    assert!(first > 0, "no journal at {}", journal.display());
    wait_until(TIMEOUT, "a heartbeat while the check hangs", || {
        heartbeat() > first
    });
    assert!(alive(check_pid), "the check should still hang");
    // The holder's command ends: the lease ends at once, and the check is killed.
    s.write("go", "");
    c.expect_code(0, TIMEOUT);
    b.wait_no_leases(10 * SEC);
    wait_until(TIMEOUT, "the hung check killed", || !alive(check_pid));

    // SIGTERM during a hung check stops the worker promptly.
    std::fs::remove_file(s.path("check.pid")).unwrap();
    let mut c2 = s.client(&b.spec(), "second", &[], "sleep 1000");
    wait_until(TIMEOUT, "the second alive check running", || {
        !s.read("check.pid").trim().is_empty()
    });
    let check_pid = read_pid(&s.path("check.pid"));
    w.signal(libc::SIGTERM);
    w.expect_code(0, 10 * SEC);
    c2.expect_code(3, TIMEOUT);
    wait_until(TIMEOUT, "the second hung check killed", || {
        !alive(check_pid)
    });
}

/// A check that outlives --alive-timeout is killed and counts as failed: the TE is freed.
#[test]
fn a_timed_out_client_alive_check_counts_as_failed() {
    let (s, b, w) = te_with_hung_alive_check(&["--alive-timeout", "0.5", "--holder-grace", "0.2"]);
    let mut c = s.client(&b.spec(), "held", &["--kill-grace", "1"], "sleep 1000");
    c.expect_code(3, TIMEOUT);
    let check_pid = read_pid(&s.path("check.pid"));
    wait_until(TIMEOUT, "the timed-out check killed", || !alive(check_pid));
    assert!(
        w.output().contains("client-alive check timed out"),
        "{}",
        w.output()
    );
}

/// Issue 7, defect 8: two workers with the same -n both offered the TE.
#[test]
fn a_second_worker_for_the_same_te_is_refused_and_similar_names_do_not_collide() {
    let (s, b, mut w) = one_te(&[]);
    let mut second = worker_logged(&s, &b, "te1", "second.log", &[&s.datafile("2")]);
    assert_eq!(second.wait_code(TIMEOUT), 1, "{}", second.output());
    assert!(
        second
            .output()
            .contains("another testenv-worker already serves this TE"),
        "{}",
        second.output()
    );
    assert!(w.running());
    // te.1, te/1 and te_1 shared one journal before; now each has its own (and its own lock).
    let mut others: Vec<Proc> = ["te.1", "te/1", "te_1"]
        .iter()
        .enumerate()
        .map(|(i, n)| worker_logged(&s, &b, n, &format!("other{i}.log"), &[&s.datafile("3")]))
        .collect();
    b.wait_lockenv_workers(4);
    for o in &mut others {
        assert!(o.running(), "{}", o.output());
    }
    assert_te_free(&s, &b, "after");
}

/// Without -n the TE name was random, so a restarted worker never found its journal and
/// re-offered the TE at once. Now it is the host name and the datafile's path.
#[test]
fn without_n_a_restarted_worker_finds_its_journal() {
    let s = Scene::new();
    let b = Broker::start();
    let df = s.datafile("1");
    let start = |log: &str| {
        let mut cmd = Command::new(WORKER_BIN);
        cmd.args(["-b", &b.spec(), "--holder-grace", "1"])
            .arg("--state-dir")
            .arg(s.path("state"))
            .arg(&df)
            .env_remove("RUST_LOG");
        Proc::spawn("worker", &mut cmd, s.path(log))
    };
    let mut w = start("w1.log");
    b.wait_lockenv_workers(1);
    crash_mid_lease(&s, &b, &mut w);
    let w2 = start("w2.log");
    wait_until(TIMEOUT, "the restarted worker offering the TE", || {
        w2.output().contains("offering the test environment")
    });
    let log = w2.output();
    assert!(
        log.contains("a previous run left a lease open"),
        "the restarted worker did not find its journal:\n{log}"
    );
    // A second worker for the same datafile is the same TE, and is refused.
    let mut again = start("w3.log");
    assert_eq!(again.wait_code(TIMEOUT), 1, "{}", again.output());
    assert_te_free(&s, &b, "after");
}

/// The GET_STATUS fallback: a callback job nobody takes ends the lease after
/// --callback-start-timeout (30 s by default), and the TE is offered again.
#[test]
fn a_callback_nobody_takes_ends_the_lease_after_the_start_timeout() {
    let (s, b, w) = one_te(&["--callback-start-timeout", "1"]);
    let seen = raw_lock_request(
        &b,
        None,
        r#"{"callback_name": "callback_nobody", "timeout": "10800"}"#,
    );
    assert_eq!(seen.lockenv, Ok(String::new()));
    wait_until(TIMEOUT, "the lease end logged", || {
        w.output().contains("lease end")
    });
    assert!(
        w.output().contains("outcome=NeverStarted"),
        "{}",
        w.output()
    );
    assert_te_free(&s, &b, "after");
}

/// DESTROY_SCRIPT runs when a worker restarts after a crash mid-lease, before the TE is
/// offered again.
#[test]
fn destroy_script_runs_at_restart_after_a_crash() {
    let s = Scene::new();
    let b = Broker::start();
    let log = s.p("scripts.log");
    let create = s.script(
        "create.sh",
        &format!(
            "echo \"create $1\" >> {log}\ncat > \"$TE_DATAFILE\" <<'EOF'\n{}\nEOF",
            te_json("1")
        ),
    );
    let destroy = s.script("destroy.sh", &format!("echo \"destroy $1\" >> {log}"));
    let args = ["--holder-grace", "1"];
    let mut w = s.worker(&b.spec(), "te1", &args, &[&create, &destroy]);
    b.wait_lockenv_workers(1);
    crash_mid_lease(&s, &b, &mut w);
    assert_eq!(s.read("scripts.log"), "create te1\n");
    let w2 = s.worker(&b.spec(), "te1", &args, &[&create, &destroy]);
    wait_until(TIMEOUT, "the restarted worker offering the TE", || {
        w2.output().contains("offering the test environment")
    });
    assert_eq!(s.read("scripts.log"), "create te1\ndestroy te1\n");
    let out = w2.output();
    let destroyed = out.find("destroy script done").expect("destroy logged");
    let offered = out.find("offering the test environment").unwrap();
    assert!(destroyed < offered, "{out}");
    assert_te_free(&s, &b, "after");
}

/// A torn journal (empty, cut short, garbage) is reported, quarantined for the holder grace,
/// and the TE then offered; the worker does not panic.
#[test]
fn a_torn_journal_is_reported_and_quarantined() {
    for (n, torn) in [&b""[..], br#"{"tenum": "te1", "callb"#, b"\xff\x00garbage"]
        .iter()
        .enumerate()
    {
        let s = Scene::new();
        let b = Broker::start();
        std::fs::create_dir_all(s.path("state")).unwrap();
        std::fs::write(s.path("state/lease-te1.json"), torn).unwrap();
        let w = s.worker(
            &b.spec(),
            "te1",
            &["--holder-grace", "1"],
            &[&s.datafile("1")],
        );
        b.wait_lockenv_workers(1);
        let log = w.output();
        assert!(
            log.contains("the lease journal is unreadable"),
            "case {n}:\n{log}"
        );
        assert!(
            quarantine_secs(&log) > 0.5,
            "case {n}: no quarantine:\n{log}"
        );
        assert!(!s.path("state/lease-te1.json").exists());
        assert_te_free(&s, &b, "after");
    }
}

/// The seconds of the worker's "quarantine before offering the TE again" line.
fn quarantine_secs(log: &str) -> f64 {
    log.lines()
        .find(|l| l.contains("quarantine before offering"))
        .and_then(|l| l.split("seconds=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no quarantine line in\n{log}"))
}

/// `CLOCK_BOOTTIME` now, in milliseconds, and this boot's id.
fn boot_clock() -> (String, u64) {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) },
        0
    );
    (
        id.trim().to_string(),
        ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000,
    )
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Issue 7, defect 7: the quarantine was measured on the wall clock, so a clock stepped back
/// after the crash stalled it (by the size of the step) and one stepped forward ended it early.
/// A journal whose heartbeat is an hour off the wall clock but just now on this boot's clock
/// stands for both.
#[test]
fn a_wall_clock_step_neither_stalls_nor_skips_the_quarantine() {
    for (case, wall_offset) in [
        ("clock stepped back", 3_600_000i64),
        ("clock stepped forward", -3_600_000),
    ] {
        let s = Scene::new();
        let b = Broker::start();
        let (boot_id, boot_ms) = boot_clock();
        let heartbeat = (wall_ms() as i64 + wall_offset) as u64;
        let record = serde_json::json!({
            "tenum": "te1", "callback": "callback_old", "job_identifier": "1: old",
            "started_ms": heartbeat - 1000, "heartbeat_ms": heartbeat,
            "boot_id": boot_id, "heartbeat_boottime_ms": boot_ms,
        });
        std::fs::create_dir_all(s.path("state")).unwrap();
        std::fs::write(s.path("state/lease-te1.json"), record.to_string()).unwrap();
        let w = s.worker(
            &b.spec(),
            "te1",
            &["--holder-grace", "3"],
            &[&s.datafile("1")],
        );
        // Stepped back: offered after the grace (3 s), not after an hour.
        b.wait_lockenv_workers(1);
        // Stepped forward: the whole grace is still sat out (less the time since writing it).
        let secs = quarantine_secs(&w.output());
        assert!(secs > 1.5 && secs <= 3.0, "{case}: quarantine of {secs} s");
        assert_te_free(&s, &b, "after");
    }
}

/// Issue 7, defect 8: heartbeat write errors were ignored. Now the first is logged, the lease
/// goes on, and the TE is not offered again until the journal can be written.
#[test]
fn a_journal_write_error_is_logged_and_the_te_waits_until_it_heals() {
    let (s, b, w) = one_te(&[]);
    let go = s.p("go");
    let mut c = s.client(
        &b.spec(),
        "held",
        &[],
        &format!(
            "touch {}; while [ ! -e {go} ]; do sleep 0.05; done",
            s.p("holding")
        ),
    );
    wait_until(TIMEOUT, "the lease held", || s.path("holding").exists());
    // Every journal write goes through this file: a directory there makes them fail, even
    // for root.
    let blocker = s.path("state/lease-te1.json.tmp");
    std::fs::create_dir(&blocker).unwrap();
    wait_until(TIMEOUT, "the write error logged", || {
        w.output().contains("cannot write the lease journal")
    });
    s.write("go", "");
    c.expect_code(0, TIMEOUT);
    let mut next = s.client(&b.spec(), "next", &[], "exit 0");
    wait_until(TIMEOUT, "the worker waiting for its journal", || {
        w.output()
            .contains("still not writable; not offering the TE")
    });
    wait_until(TIMEOUT, "the next lockenv queued", || {
        b.status()
            .iter()
            .any(|(f, total, running, _)| f == "lockenv" && (*total, *running) == (1, 0))
    });
    assert!(next.running(), "the TE was leased without a journal");
    std::fs::remove_dir(&blocker).unwrap();
    next.expect_code(0, TIMEOUT);
    assert!(w.output().contains("writable again"), "{}", w.output());
}

/// Durations on the command line were converted unchecked: `--holder-grace=-1` panicked the
/// worker at start-up and `-t 10000000000000000000` at its first lease. Now they are usage
/// errors (exit 2) that say what is wrong.
#[test]
fn out_of_range_durations_on_the_command_line_are_usage_errors() {
    let s = Scene::new();
    let df = s.datafile("1");
    for bad in [
        &["--holder-grace=-1"][..],
        &["--alive-interval", "nan"],
        &["--dead-holder-grace", "1e30"],
        &["--callback-start-timeout", "soon"],
        &["-t", "10000000000000000000"],
        &["-t", "0"],
    ] {
        let out = Command::new(WORKER_BIN)
            .args(["-b", "127.0.0.1:1", "-n", "te1", "--state-dir"])
            .arg(s.path("state"))
            .args(bad)
            .arg(&df)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {err}");
        assert!(err.contains("invalid value"), "{bad:?}: {err}");
    }
}
