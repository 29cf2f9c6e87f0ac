//! Lease resume end to end (docs/design/lease-resume.md): the real testenv-client and
//! testenv-worker binaries, real tebroker processes killed with SIGKILL and restarted, real
//! COMMANDs. Timers are turned down with flags; every wait has a deadline and none concludes
//! from a fixed sleep.

mod common;

use std::time::Duration;

use common::*;

const SEC: Duration = Duration::from_secs(1);

/// A COMMAND that records its pid and start time, waits for `NAME.go` to appear, records its
/// end time and exits `code`.
fn held_until_go(s: &Scene, name: &str, code: i32) -> String {
    format!(
        "echo $$ > {pid}; date +%s.%N > {start}; while [ ! -e {go} ]; do sleep 0.05; done; \
         date +%s.%N > {end}; exit {code}",
        pid = s.p(&format!("{name}.pid")),
        start = s.p(&format!("{name}.start")),
        go = s.p(&format!("{name}.go")),
        end = s.p(&format!("{name}.end")),
    )
}

/// [`held_until_go`] that also records when SIGTERM killed it (`NAME.killed`).
fn held_until_go_or_killed(s: &Scene, name: &str, code: i32) -> String {
    format!(
        "trap 'date +%s.%N > {killed}; exit 1' TERM; {cmd}",
        killed = s.p(&format!("{name}.killed")),
        cmd = held_until_go(s, name, code)
    )
}

fn time_in(s: &Scene, name: &str) -> f64 {
    s.read(name)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{name} holds no time: {:?}", s.read(name)))
}

fn wait_log(p: &Proc, line: &str, within: Duration) {
    wait_until(within, &format!("{} logs {line:?}", p.name), || {
        p.output().contains(line)
    });
}

fn count(text: &str, what: &str) -> usize {
    text.matches(what).count()
}

const CLIENT_C1_RESUMED: &str = "lease resumed: the testenv worker took our new lock job";
const CLIENT_C2_RESUMED: &str = "lease resumed: took the testenv worker's new callback job";
const WORKER_C2_RESUMED: &str = "lease resumed: the holder took the new callback job";

#[test]
fn a_broker_killed_and_restarted_mid_lease_loses_nothing() {
    let s = Scene::new();
    let mut b = Broker::start();
    let port = b.addr.port();
    let w = s.worker(
        &b.spec(),
        "te1",
        &["--holder-grace", "2", "--resume-grace", "30"],
        &[&s.datafile("1")],
    );
    b.wait_lockenv_workers(1);
    let mut held = s.client(
        &b.spec(),
        "held",
        &["--resume-grace", "20", "--kill-grace", "1"],
        &held_until_go(&s, "held", 7),
    );
    let pid = read_pid(&s.path("held.pid"));

    b.kill();
    let b = Broker::start_on(port);
    wait_log(&held, CLIENT_C1_RESUMED, 20 * SEC);
    wait_log(&held, CLIENT_C2_RESUMED, 20 * SEC);
    wait_log(&w, WORKER_C2_RESUMED, 20 * SEC);
    assert!(alive(pid), "COMMAND died in the resume:\n{}", held.output());
    assert!(held.running());

    // A second client waits for the TE while the first still holds it.
    let mut waiter = s.client(&b.spec(), "waiter", &[], &held_until_go(&s, "waiter", 0));
    wait_until(TIMEOUT, "the waiter's lock request queued", || {
        b.status()
            .iter()
            .any(|(f, total, running, _)| f == "lockenv" && *total >= 1 && *running == 0)
    });
    assert!(!s.path("waiter.start").exists(), "the TE was leased twice");

    std::fs::write(s.path("held.go"), "").unwrap();
    held.expect_code(7, TIMEOUT);
    std::fs::write(s.path("waiter.go"), "").unwrap();
    waiter.expect_code(0, TIMEOUT);
    assert!(
        time_in(&s, "waiter.start") >= time_in(&s, "held.end"),
        "the waiter got the TE before the holder's COMMAND ended"
    );
    wait_until(TIMEOUT, "both leases ended", || {
        count(&w.output(), "lease end") >= 2
    });
    let log = w.output();
    assert_eq!(
        count(&log, "lease end"),
        2,
        "one end per lease, the resumed one included:\n{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("lease end")
            && l.contains("callback_held")
            && l.contains("Completed")),
        "{log}"
    );
}

#[test]
fn when_nobody_comes_back_the_command_is_killed_and_the_te_offered_only_after() {
    // The client reaches only broker A; the worker is on A and B. A dies for good: the client
    // cannot resume, kills COMMAND after its grace and exits 3; the worker keeps the TE for its
    // own, longer, grace (plus the holder grace) before offering it on B.
    let s = Scene::new();
    let mut a = Broker::start();
    let b = Broker::start();
    let both = format!("{},{}", a.spec(), b.spec());
    let w = s.worker(
        &both,
        "te1",
        &["--holder-grace", "1", "--resume-grace", "6"],
        &[&s.datafile("1")],
    );
    a.wait_lockenv_workers(1);
    b.wait_lockenv_workers(1);
    let mut held = s.client(
        &a.spec(),
        "held",
        &["--resume-grace", "2", "--kill-grace", "1"],
        &held_until_go_or_killed(&s, "held", 0),
    );
    let pid = read_pid(&s.path("held.pid"));
    a.kill();
    let mut next = s.client(&b.spec(), "next", &[], &held_until_go(&s, "next", 0));
    held.expect_code(3, 30 * SEC);
    assert!(!alive(pid), "COMMAND outlived its client");
    let out = held.output();
    assert!(
        out.contains("did not take our lease resume within --resume-grace"),
        "{out}"
    );
    std::fs::write(s.path("next.go"), "").unwrap();
    next.expect_code(0, 30 * SEC);
    assert!(
        time_in(&s, "next.start") > time_in(&s, "held.killed"),
        "the TE was offered while the holder's COMMAND ran"
    );
    let log = w.output();
    assert!(
        log.contains("the holder did not take a lease resume within --resume-grace"),
        "{log}"
    );
    assert!(log.contains("ResumeExpired"), "{log}");
    // Both carriers were lost at once: the holder's own grace has run since then, so after
    // ours only the holder grace (1 s) is left, not the resume grace (6 s) once more.
    let sit_out: f64 = log
        .lines()
        .find(|l| l.contains("waiting for the previous holder"))
        .and_then(|l| l.split("seconds=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sit-out line:\n{log}"));
    assert!(
        sit_out < 6.0,
        "sat out {sit_out} s after the resume grace:\n{log}"
    );
}

#[test]
fn a_lease_fails_over_to_the_second_broker() {
    let s = Scene::new();
    let mut a = Broker::start();
    let b = Broker::start();
    let both = format!("{},{}", a.spec(), b.spec());
    let w = s.worker(&both, "te1", &["--holder-grace", "2"], &[&s.datafile("1")]);
    a.wait_lockenv_workers(1);
    b.wait_lockenv_workers(1);
    let mut held = s.client(&both, "held", &[], &held_until_go(&s, "held", 5));
    let pid = read_pid(&s.path("held.pid"));
    // Both carriers start on the first broker of the lists.
    assert!(
        a.status()
            .iter()
            .any(|(f, _, running, _)| f == "callback_held" && *running == 1),
        "{:?}",
        a.status()
    );
    a.kill();
    wait_log(&held, CLIENT_C1_RESUMED, 20 * SEC);
    wait_log(&held, CLIENT_C2_RESUMED, 20 * SEC);
    assert!(alive(pid));
    assert!(
        b.status()
            .iter()
            .any(|(f, _, running, _)| f == "callback_held" && *running == 1),
        "the new callback job is not on B: {:?}",
        b.status()
    );
    std::fs::write(s.path("held.go"), "").unwrap();
    held.expect_code(5, TIMEOUT);
    wait_until(TIMEOUT, "the lease ended on the worker", || {
        w.output().contains("lease end")
    });
    assert!(w.output().contains("Completed"), "{}", w.output());
    let mut next = s.client(&b.spec(), "next", &[], "exit 0");
    next.expect_code(0, TIMEOUT);
}

/// Submits `data` to `function` on `addr` and returns the job's end, from a throwaway runtime.
fn submit(addr: std::net::SocketAddr, function: &str, data: String) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let servers = gearman_client::parse_servers(&addr.to_string()).expect("broker address");
        let client = gearman_client::Client::new(servers);
        let mut job = client
            .submit(gearman_client::JobRequest::new(function, data))
            .await
            .expect("submit");
        loop {
            match tokio::time::timeout(TIMEOUT, job.next_event()).await {
                Ok(Ok(Some(e))) if e.is_final() => return format!("{e:?}"),
                Ok(Ok(Some(_))) => {}
                other => return format!("{other:?}"),
            }
        }
    })
}

#[test]
fn a_forged_resume_or_revoke_is_refused_and_changes_nothing() {
    let (s, b, w) = one_te(&["--holder-grace", "1"]);
    let mut held = s.client(&b.spec(), "held", &[], &held_until_go(&s, "held", 0));
    let pid = read_pid(&s.path("held.pid"));
    // The lease function is public (it shows in the broker's status); its key is not.
    let lease_fn = {
        let mut found = None;
        wait_until(TIMEOUT, "lease_<id> registered", || {
            found = b
                .status()
                .into_iter()
                .map(|(f, ..)| f)
                .find(|f| f.starts_with("lease_"));
            found.is_some()
        });
        found.unwrap()
    };
    let forged = testenv_proto::resume::LeaseKey::from_bytes([0x5a; 16]);
    for op in [
        testenv_proto::resume::LeaseOp::Resume,
        testenv_proto::resume::LeaseOp::Revoke,
    ] {
        use testenv_proto::resume::{Carrier, LeaseMessage};
        let to_client = LeaseMessage::new(op, &forged, Carrier::Callback).to_json();
        assert_eq!(
            submit(b.addr, "callback_held", to_client),
            "Fail",
            "{op:?} to the client"
        );
        let to_worker = LeaseMessage::new(op, &forged, Carrier::Lease).to_json();
        assert_eq!(
            submit(b.addr, &lease_fn, to_worker),
            "Fail",
            "{op:?} to the worker"
        );
    }
    let mut released = testenv_proto::resume::LeaseMessage::new(
        testenv_proto::resume::LeaseOp::Released,
        &forged,
        testenv_proto::resume::Carrier::Lease,
    );
    released.exit = Some(0);
    assert_eq!(submit(b.addr, &lease_fn, released.to_json()), "Fail");
    assert_eq!(
        submit(b.addr, "callback_held", "{\"testenv_lease\": 1}".into()),
        "Fail"
    );

    assert!(alive(pid), "a forged message killed COMMAND");
    assert!(held.running());
    assert!(!w.output().contains("lease end"), "{}", w.output());
    let client_log = held.output();
    assert_eq!(
        count(&client_log, "refused a lease message with a wrong key"),
        2,
        "{client_log}"
    );
    assert!(
        client_log.contains("refused a malformed lease message"),
        "{client_log}"
    );
    assert!(
        count(&w.output(), "refused a lease message with a wrong key") >= 2,
        "{}",
        w.output()
    );
    // The real key is in the worker's 0600 journal, and in no log.
    let journal = std::fs::read_dir(s.path("state"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .expect("a lease journal");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&journal).unwrap()).unwrap();
    let key = record["resume_key"]
        .as_str()
        .expect("resume_key in the journal")
        .to_string();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&journal).unwrap().permissions().mode() & 0o777,
        0o600
    );

    std::fs::write(s.path("held.go"), "").unwrap();
    held.expect_code(0, TIMEOUT);
    wait_until(TIMEOUT, "lease end", || w.output().contains("lease end"));
    for (who, log) in [("worker", w.output()), ("client", held.output())] {
        assert!(!log.contains(&key), "the {who} logs the lease key:\n{log}");
    }
}

#[test]
fn our_client_and_an_original_worker_degrade_to_the_old_rules_with_one_line() {
    // The original worker never says it resumes: a lost broker ends the lease as before.
    let s = Scene::new();
    let mut b = Broker::start();
    let mut cmd = std::process::Command::new(python());
    cmd.arg("-u")
        .arg(py_script("te_worker.py"))
        .args(["-b", &b.spec(), "-n", "te1"])
        .arg(s.datafile("1"));
    let py = Proc::spawn("py worker", &mut cmd, s.path("py-worker.log"));
    wait_until(TIMEOUT, "py worker READY", || py.output().contains("READY"));
    let mut held = s.client(
        &b.spec(),
        "held",
        &["--kill-grace", "1"],
        &held_until_go(&s, "held", 0),
    );
    let pid = read_pid(&s.path("held.pid"));
    b.kill();
    held.expect_code(3, TIMEOUT);
    assert!(!alive(pid));
    let out = held.output();
    assert_eq!(
        count(&out, "the testenv worker does not resume leases"),
        1,
        "{out}"
    );
}

#[test]
fn an_original_client_with_our_worker_is_told_apart_in_one_line() {
    let (s, b, w) = one_te(&[]);
    let mut cmd = std::process::Command::new(python());
    cmd.arg("-u").arg(py_script("te_client.py")).args([
        "-b",
        &b.spec(),
        "-n",
        "py1",
        "--",
        "sh",
        "-c",
        "exit 4",
    ]);
    let mut c = Proc::spawn("py client", &mut cmd, s.path("py-client.log"));
    c.expect_code(4, TIMEOUT);
    wait_until(TIMEOUT, "lease end", || w.output().contains("lease end"));
    let log = w.output();
    assert_eq!(count(&log, "the holder does not resume leases"), 1, "{log}");
    assert!(!log.contains("lease_"), "{log}");
}

#[test]
fn a_worker_restarted_mid_lease_ends_its_quarantine_when_the_holder_reports_its_end() {
    // The worker dies: tebroker fails lockenv, the client kills COMMAND and leaves `released`
    // on lease_<id>; the restarted worker finds it from its journal's key instead of sitting
    // out its resume grace (here 600 s, far beyond the test's deadline).
    let s = Scene::new();
    let b = Broker::start();
    let df = s.datafile("1");
    let args = ["--holder-grace", "1", "--resume-grace", "600"];
    let mut w = s.worker(&b.spec(), "te1", &args, &[&df]);
    b.wait_lockenv_workers(1);
    let mut held = s.client(
        &b.spec(),
        "held",
        &["--kill-grace", "1"],
        &held_until_go_or_killed(&s, "held", 0),
    );
    let pid = read_pid(&s.path("held.pid"));
    w.signal(libc::SIGKILL);
    w.wait(TIMEOUT);
    held.expect_code(3, TIMEOUT);
    assert!(!alive(pid));
    let w2 = s.worker(&b.spec(), "te1", &args, &[&df]);
    let mut next = s.client(&b.spec(), "next", &[], &held_until_go(&s, "next", 0));
    wait_log(
        &w2,
        "the previous holder reported its command's end",
        TIMEOUT,
    );
    std::fs::write(s.path("next.go"), "").unwrap();
    next.expect_code(0, TIMEOUT);
    assert!(time_in(&s, "next.start") > time_in(&s, "held.killed"));
}

#[test]
fn a_hung_broker_does_not_read_the_holder_as_dead_when_it_wakes() {
    // The broker stops answering (SIGSTOP) long enough for the client's probes to give up on
    // its connections. When it wakes, the connection carrying the callback job must not read
    // as closed (the client never closes it), or tebroker would tell the worker its holder died
    // and the TE would be leased again while COMMAND still runs.
    let (s, b, w) = one_te(&["--holder-grace", "1"]);
    let quick = ["--probe-idle", "0.3", "--probe-timeout", "0.5"];
    let mut held = s.client(&b.spec(), "held", &quick, &held_until_go(&s, "held", 6));
    let pid = read_pid(&s.path("held.pid"));
    b.signal(libc::SIGSTOP);
    wait_log(&held, "lost the broker carrying the lock", TIMEOUT);
    b.signal(libc::SIGCONT);
    wait_log(&held, CLIENT_C1_RESUMED, TIMEOUT);
    let mut next = s.client(&b.spec(), "next", &[], &held_until_go(&s, "next", 0));
    // Queued: one lockenv more than the worker runs (the first C1 still runs, unattached).
    wait_until(TIMEOUT, "the next lock request queued", || {
        b.status()
            .iter()
            .any(|(f, total, running, _)| f == "lockenv" && *total > *running)
    });
    assert!(alive(pid));
    std::fs::write(s.path("held.go"), "").unwrap();
    held.expect_code(6, TIMEOUT);
    std::fs::write(s.path("next.go"), "").unwrap();
    next.expect_code(0, TIMEOUT);
    assert!(
        time_in(&s, "next.start") >= time_in(&s, "held.end"),
        "the TE was leased again while the holder's COMMAND ran:\n{}",
        w.output()
    );
}

#[test]
fn an_early_release_kills_the_command_and_is_confirmed() {
    // -t 42: the worker holds the TE 2 s, then takes it back; the client kills COMMAND and
    // confirms on the callback job, so the TE comes back after the holder grace alone.
    let (s, b, w) = one_te(&["--holder-grace", "1"]);
    let mut held = s.client(
        &b.spec(),
        "held",
        &["-t", "42", "--kill-grace", "1"],
        &held_until_go_or_killed(&s, "held", 0),
    );
    held.expect_code(3, TIMEOUT);
    assert!(s.path("held.killed").exists(), "COMMAND was not signalled");
    wait_log(&w, "the holder confirmed its command is dead", TIMEOUT);
    wait_log(&w, "lease end", TIMEOUT);
    let log = w.output();
    assert!(
        log.lines()
            .any(|l| l.contains("lease end") && l.contains("TimedOut")),
        "{log}"
    );
    assert!(!log.contains("Unconfirmed"), "{log}");
    let mut next = s.client(&b.spec(), "next", &[], "exit 0");
    next.expect_code(0, TIMEOUT);
}

#[test]
fn a_lock_request_submitted_twice_does_not_end_the_lease_it_did_not_carry() {
    // te1 takes the first lock request on A and is still creating its TE when A dies; the
    // client submits the request again on B and then gets te1's TE. Later te4 takes the
    // duplicate on B: the client turns that TE down, te4 frees it and ends the duplicate
    // with ALREADY_SERVED, and the client resumes te1's lease instead of killing COMMAND.
    let s = Scene::new();
    let mut a = Broker::start();
    let b = Broker::start();
    let create = s.script(
        "create",
        &format!(
            "while [ ! -e {go} ]; do sleep 0.05; done; cp {df} \"$TE_DATAFILE\"",
            go = s.p("create.go"),
            df = s.datafile("1").display()
        ),
    );
    let destroy = s.script("destroy", "exit 0");
    let te1 = s.worker(
        &format!("{},{}", b.spec(), a.spec()),
        "te1",
        &["--holder-grace", "1"],
        &[&create, &destroy],
    );
    let te4 = s.worker(
        &b.spec(),
        "te4",
        &["--holder-grace", "1"],
        &[&s.datafile("4")],
    );
    b.wait_lockenv_workers(2);
    te4.signal(libc::SIGUSR2);
    wait_until(TIMEOUT, "te4 paused", || {
        b.status()
            .iter()
            .any(|(f, _, _, workers)| f == "lockenv" && *workers == 1)
    });
    a.wait_lockenv_workers(1);
    let mut held = s.client(
        &format!("{},{}", a.spec(), b.spec()),
        "held",
        &[],
        &held_until_go(&s, "held", 7),
    );
    wait_log(&te1, "lease start", TIMEOUT);
    a.kill();
    wait_until(TIMEOUT, "the request submitted again on B", || {
        b.status()
            .iter()
            .any(|(f, total, running, _)| f == "lockenv" && (*total, *running) == (1, 0))
    });
    std::fs::write(s.path("create.go"), "").unwrap();
    let pid = read_pid(&s.path("held.pid"));
    te4.signal(libc::SIGUSR1);
    wait_log(&te4, "the holder already holds another TE", TIMEOUT);
    wait_log(&held, CLIENT_C1_RESUMED, TIMEOUT);
    assert!(alive(pid), "COMMAND was killed:\n{}", held.output());
    std::fs::write(s.path("held.go"), "").unwrap();
    held.expect_code(7, TIMEOUT);
    wait_log(&te1, "lease end", TIMEOUT);
    assert!(
        te1.output().contains("outcome=Completed"),
        "{}",
        te1.output()
    );
}

#[test]
fn te_data_for_a_lock_request_lost_with_its_broker_is_adopted_and_its_lease_resumed() {
    // The model's finding 3: te1 takes the first lock request on A and is still creating its
    // TE when A dies; the client submits the request again on B, where nobody takes it, and
    // then gets te1's TE through B. te1 lost its C1 with A and waits for a C1 resume. The
    // client must adopt te1's lease at once (C1 lost since A died) and resume it on
    // lease_<id>; before, it took the queued duplicate for its C1, never resumed, and te1
    // revoked the lease after its resume grace although both sides lived.
    let s = Scene::new();
    let mut a = Broker::start();
    let b = Broker::start();
    let create = s.script(
        "create",
        &format!(
            "while [ ! -e {go} ]; do sleep 0.05; done; cp {df} \"$TE_DATAFILE\"",
            go = s.p("create.go"),
            df = s.datafile("1").display()
        ),
    );
    let destroy = s.script("destroy", "exit 0");
    // A resume grace far beyond the deadline below: only a C1 resume keeps the lease.
    let te1 = s.worker(
        &format!("{},{}", b.spec(), a.spec()),
        "te1",
        &["--holder-grace", "1", "--resume-grace", "600"],
        &[&create, &destroy],
    );
    a.wait_lockenv_workers(1);
    b.wait_lockenv_workers(1);
    let mut held = s.client(
        &format!("{},{}", a.spec(), b.spec()),
        "held",
        &[],
        &held_until_go(&s, "held", 7),
    );
    wait_log(&te1, "lease start", TIMEOUT);
    a.kill();
    wait_until(TIMEOUT, "the request submitted again on B", || {
        b.status()
            .iter()
            .any(|(f, total, running, _)| f == "lockenv" && (*total, *running) == (1, 0))
    });
    std::fs::write(s.path("create.go"), "").unwrap();
    let pid = read_pid(&s.path("held.pid"));
    wait_log(&held, CLIENT_C1_RESUMED, TIMEOUT);
    wait_log(&te1, "took the holder's new lock job", TIMEOUT);
    assert!(alive(pid), "COMMAND was killed:\n{}", held.output());
    // The adopted lease's C1 now lives on B; A comes back and B dies: that loss is resumed
    // too (before, the client had never seen te1's WORK_STATUS and took te1 for an original
    // worker: it killed COMMAND).
    let a = Broker::start_on(a.addr.port());
    a.wait_lockenv_workers(1);
    let mut b = b;
    b.kill();
    wait_until(TIMEOUT, "the lease resumed a second time", || {
        count(&held.output(), CLIENT_C1_RESUMED) >= 2
    });
    assert!(alive(pid), "COMMAND was killed:\n{}", held.output());
    std::fs::write(s.path("held.go"), "").unwrap();
    held.expect_code(7, TIMEOUT);
    wait_log(&te1, "lease end", TIMEOUT);
    assert!(
        te1.output().contains("outcome=Completed"),
        "{}",
        te1.output()
    );
}

#[test]
fn a_resume_reaching_a_client_that_never_got_its_te_frees_the_te() {
    // te1 sends the TE data through B, which the client (on A only) never reads; B dies, so
    // te1 offers a lease resume on A. The waiting client must not take it for TE data: it says
    // it never started, te1 frees the TE, and the client's next request gets the real data.
    let s = Scene::new();
    let a = Broker::start();
    let mut b = Broker::start();
    let w = s.worker(
        &format!("{},{}", b.spec(), a.spec()),
        "te1",
        &["--holder-grace", "1", "--callback-start-timeout", "600"],
        &[&s.datafile("1")],
    );
    a.wait_lockenv_workers(1);
    b.wait_lockenv_workers(1);
    let mut c = s.client(
        &a.spec(),
        "held",
        &[],
        &format!(r#"cp "$TE_DATAFILE" {}; exit 5"#, s.p("out")),
    );
    wait_until(TIMEOUT, "the TE data waiting on B", || {
        b.status()
            .iter()
            .any(|(f, total, running, _)| f == "callback_held" && (*total, *running) == (1, 0))
    });
    b.kill();
    c.expect_code(5, TIMEOUT);
    assert_eq!(
        s.read("out"),
        te_json("1"),
        "COMMAND got something else as its TE"
    );
    assert!(
        c.output()
            .contains("lost the environment it was sending us"),
        "{}",
        c.output()
    );
    wait_log(&w, "the holder never got the TE data", TIMEOUT);
}

#[test]
fn a_callback_refused_while_its_old_connection_lives_is_registered_once_it_closes() {
    // What a hung broker that wakes can do to a client that reconnected meanwhile: tebroker
    // refuses the new connection's CAN_DO callback_x (CALLBACK_TAKEN) while the old one still
    // holds it. Once the old one is gone the library must register again by itself, or no TE
    // would ever reach the client through that broker.
    let b = Broker::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let server = gearman_client::parse_servers(&b.spec()).unwrap().remove(0);
        let mut old = gearman_client::Connection::connect(&server, TIMEOUT)
            .await
            .expect("connect");
        old.send(gearman_proto::Packet::req(
            gearman_proto::PacketType::CanDo,
            [bytes::Bytes::from_static(b"callback_x")],
        ))
        .await
        .unwrap();
        // The old connection is registered before the new one asks.
        let registered = || {
            b.status()
                .iter()
                .any(|(f, _, _, workers)| f == "callback_x" && *workers >= 1)
        };
        tokio::time::timeout(TIMEOUT, async {
            while !registered() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the first connection registers");
        let worker = gearman_client::Worker::new([server.clone()]);
        worker.register("callback_x");
        worker.wait_for_server(TIMEOUT).await.unwrap();
        tokio::time::timeout(TIMEOUT, async {
            while !b
                .admin("stats")
                .iter()
                .any(|l| l == "callback_hijacks_refused\t1")
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("tebroker refuses the second registration");
        drop(old);
        // A job for callback_x reaches the new worker once the broker has seen the old close.
        let client = gearman_client::Client::new([server]);
        let job = client
            .submit(gearman_client::JobRequest::new("callback_x", "te"))
            .await
            .unwrap();
        let grabbed = tokio::time::timeout(TIMEOUT, worker.grab_job())
            .await
            .expect("the worker registered callback_x again and got the job")
            .unwrap();
        assert_eq!(&grabbed.data()[..], b"te");
        grabbed.complete("done").await.unwrap();
        assert_eq!(&job.result().await.unwrap()[..], b"done");
    });
}

#[test]
fn te_data_the_holder_never_took_is_withdrawn_before_the_te_is_offered_again() {
    // te1 sends the TE data through B, where the client (on A only) is not: after
    // --callback-start-timeout the lease ends NeverStarted. The queued callback job must be
    // gone from B by then, or a client that registers there later would run COMMAND on a TE
    // leased to someone else (the model's F1).
    let s = Scene::new();
    let a = Broker::start();
    let b = Broker::start();
    let w = s.worker(
        &format!("{},{}", b.spec(), a.spec()),
        "te1",
        &["--holder-grace", "1", "--callback-start-timeout", "1"],
        &[&s.datafile("1")],
    );
    a.wait_lockenv_workers(1);
    b.wait_lockenv_workers(1);
    let _c = s.client(&a.spec(), "held", &[], "exit 0");
    wait_log(&w, "lease start", TIMEOUT);
    // No second lease after this one (the client submits its request again).
    w.signal(libc::SIGUSR2);
    wait_until(TIMEOUT, "the TE data queued on B", || {
        b.status()
            .iter()
            .any(|(f, total, _, _)| f == "callback_held" && *total == 1)
    });
    wait_log(&w, "outcome=NeverStarted", TIMEOUT);
    let queued = b
        .status()
        .iter()
        .any(|(f, total, _, _)| f == "callback_held" && *total > 0);
    assert!(
        !queued,
        "TE data still queued after the lease: {:?}",
        b.status()
    );
}

/// Not a test: the entry point of the broker processes [`Broker::start`] runs.
#[test]
fn broker_child_process() {
    broker_child_main();
}

#[test]
fn an_original_worker_serving_a_request_submitted_again_keeps_the_command_running() {
    // Our client's request waits on A, where no worker is; A dies and the client submits it
    // again on B, where an original worker takes it and sends the TE without the resumable
    // WORK_STATUS. That is not a lease lost with A (nobody took the first request): the
    // broker says the current request is running, so the client must not adopt a lease
    // nobody resumes (its grace would kill COMMAND) but keep today's rules.
    let s = Scene::new();
    let mut a = Broker::start();
    let b = Broker::start();
    let mut cmd = std::process::Command::new(python());
    cmd.arg("-u")
        .arg(py_script("te_worker.py"))
        .args(["-b", &b.spec(), "-n", "te1"])
        .arg(s.datafile("1"));
    let py = Proc::spawn("py worker", &mut cmd, s.path("py-worker.log"));
    wait_until(TIMEOUT, "py worker READY", || py.output().contains("READY"));
    let grace = 3;
    let mut held = s.client(
        &format!("{},{}", a.spec(), b.spec()),
        "held",
        &["--resume-grace", &grace.to_string()],
        &held_until_go(&s, "held", 5),
    );
    wait_until(TIMEOUT, "the request queued on A", || {
        a.status()
            .iter()
            .any(|(f, total, running, _)| f == "lockenv" && (*total, *running) == (1, 0))
    });
    a.kill();
    let pid_file = s.path("held.pid");
    wait_until(TIMEOUT, "COMMAND started", || pid_file.exists());
    wait_log(&held, "the testenv worker does not resume leases", TIMEOUT);
    // Past the grace an adopted lease would have had for its resume.
    std::thread::sleep(Duration::from_secs(grace + 2));
    let pid = read_pid(&pid_file);
    assert!(alive(pid), "COMMAND was killed:\n{}", held.output());
    std::fs::write(s.path("held.go"), "").unwrap();
    held.expect_code(5, TIMEOUT);
    let out = held.output();
    assert_eq!(
        count(&out, "resuming its lease on every broker"),
        0,
        "{out}"
    );
}

#[test]
fn a_restarted_worker_with_the_same_key_leaves_the_resume_to_the_te_holding_the_lease() {
    // A lock request submitted twice can be served under one resume key by two workers: one
    // that died mid-lease (its journal keeps the key) and the one whose TE the holder has now.
    // When the holder resumes its lease, the restarted worker must refuse the resume and leave
    // it to the live one; a take-back there killed COMMAND in the 10-minute chaos run.
    let s = Scene::new();
    let mut a = Broker::start();
    let b = Broker::start();
    let both = format!("{},{}", a.spec(), b.spec());
    let args = ["--holder-grace", "1", "--resume-grace", "600"];
    let live = s.worker(&both, "te2", &args, &[&s.datafile("2")]);
    a.wait_lockenv_workers(1);
    b.wait_lockenv_workers(1);
    let mut held = s.client(&both, "held", &[], &held_until_go(&s, "held", 4));
    let pid = read_pid(&s.path("held.pid"));
    // te1 "died" holding a lease under the holder's key: its journal is te2's, renamed.
    let mut record: serde_json::Value =
        serde_json::from_str(&s.read("state/lease-te2.json")).expect("te2's journal");
    assert!(record["resume_key"].is_string(), "{record}");
    record["tenum"] = "te1".into();
    s.write("state/lease-te1.json", &record.to_string());
    let restarted = s.worker(&both, "te1", &args, &[&s.datafile("1")]);
    wait_log(
        &restarted,
        "quarantine before offering the TE again",
        TIMEOUT,
    );
    wait_until(TIMEOUT, "both workers on the lease function of B", || {
        b.status()
            .iter()
            .any(|(f, _, _, workers)| f.starts_with("lease_") && *workers == 2)
    });
    // te2 sleeps through the broker's death, so the resume is offered to te1 first.
    live.signal(libc::SIGSTOP);
    a.kill();
    wait_log(&restarted, "refused here", 20 * SEC);
    live.signal(libc::SIGCONT);
    wait_log(&held, CLIENT_C1_RESUMED, 30 * SEC);
    assert!(alive(pid), "COMMAND was killed:\n{}", held.output());
    std::fs::write(s.path("held.go"), "").unwrap();
    held.expect_code(4, TIMEOUT);
    wait_until(TIMEOUT, "te2's lease ended", || {
        live.output().contains("lease end")
    });
    assert!(live.output().contains("Completed"), "{}", live.output());
    assert!(
        !restarted.output().contains("lease start"),
        "te1 was leased during its quarantine:\n{}",
        restarted.output()
    );
}
