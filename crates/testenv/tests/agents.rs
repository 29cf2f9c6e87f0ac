//! End-to-end tests of testenv-client and testenv-worker: the real binaries, a real tebroker
//! (in-process, on a loopback port), real sockets and real signals. Timing knobs are turned down
//! with flags (--holder-grace, --kill-grace, --alive-interval, -t); every wait is generous.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const SEC: Duration = Duration::from_secs(1);

/// A COMMAND that records its pid and that of a grandchild (`sleep`), then waits forever.
fn hold_script(s: &Scene, name: &str) -> String {
    format!(
        "echo $$ > {cmd}; sleep 1000 & echo $! > {gc}; wait",
        cmd = s.p(&format!("{name}.cmd.pid")),
        gc = s.p(&format!("{name}.gc.pid")),
    )
}

/// The pids [`hold_script`] wrote: (COMMAND, grandchild).
fn held_pids(s: &Scene, name: &str) -> (i32, i32) {
    (
        read_pid(&s.path(&format!("{name}.cmd.pid"))),
        read_pid(&s.path(&format!("{name}.gc.pid"))),
    )
}

/// The TE is free again: no lease, and the next client gets it at once.
fn assert_te_free(s: &Scene, b: &Broker) {
    b.wait_no_leases(5 * SEC);
    let mut next = s.client(&b.spec(), "next", &[], "exit 0");
    next.expect_code(0, 5 * SEC);
}

fn wait_gone(pids: &[i32], within: Duration) {
    wait_until(within, &format!("processes {pids:?} gone"), || {
        pids.iter().all(|&p| !alive(p))
    });
}

/// Shell that sets `$n` to the env-num of the TE in `$TE_DATAFILE`.
const TE_NUM: &str = r#"n=$(sed -n 's/.*"env-num": "\([^"]*\)".*/\1/p' "$TE_DATAFILE")"#;

#[test]
fn datafile_content_and_mode_exit_codes_and_no_secrets_in_logs() {
    let s = Scene::new();
    let b = Broker::start();
    let df = s.datafile("1");
    let w = s.worker(&b.spec(), "te1", &["-d"], &[&df]);
    b.wait_lockenv_workers(1);

    let client_key = "CLIENTKEY-d00d-NEVER-LOG";
    let mut c = s.client(
        &b.spec(),
        "ok",
        &["-d", "--ssh-key", client_key],
        &format!(
            r#"cp "$TE_DATAFILE" {copy}; stat -c %a "$TE_DATAFILE" > {mode}; echo "$TE_DATAFILE" > {path}"#,
            copy = s.p("copy"),
            mode = s.p("mode"),
            path = s.p("path"),
        ),
    );
    c.expect_code(0, TIMEOUT);
    assert_eq!(
        s.read("copy"),
        te_json("1"),
        "TE_DATAFILE holds the TE JSON verbatim"
    );
    assert_eq!(s.read("mode").trim(), "600", "TE_DATAFILE mode");
    let datafile = s.read("path").trim().to_string();
    assert!(!datafile.is_empty());
    assert!(
        !Path::new(&datafile).exists(),
        "TE_DATAFILE {datafile} must be removed after the run"
    );

    let mut c = s.client(&b.spec(), "seven", &["-d"], "exit 7");
    c.expect_code(7, TIMEOUT);
    let mut c = s.client(&b.spec(), "killed", &["-d"], "kill -KILL $$");
    c.expect_code(128 + libc::SIGKILL, TIMEOUT);
    let mut c = s.client(&b.spec(), "termed", &["-d"], "kill -TERM $$");
    c.expect_code(128 + libc::SIGTERM, TIMEOUT);
    // COMMAND not found: 127, as a shell would say.
    let mut c = s.client_cmd(&b.spec(), "notfound", &["-d"], [s.p("no-such-command")]);
    c.expect_code(127, TIMEOUT);
    // What COMMAND leaves running in the background ends with it: the TE is handed back.
    let mut c = s.client(
        &b.spec(),
        "bg",
        &["-d"],
        &format!("sleep 1000 & echo $! > {}; exit 0", s.p("bg.pid")),
    );
    c.expect_code(0, TIMEOUT);
    let bg = read_pid(&s.path("bg.pid"));
    assert!(
        !alive(bg),
        "COMMAND's background process outlived the client"
    );
    b.wait_no_leases(5 * SEC);

    // Secrets: neither agent logs the TE's ssh key or power password, nor the client's key,
    // even with -d.
    let worker_log = w.output();
    assert!(worker_log.contains("lease start"), "{worker_log}");
    assert!(worker_log.contains("lease end"), "{worker_log}");
    let mut logs = vec![("worker", worker_log)];
    for j in ["ok", "seven", "killed", "termed", "notfound", "bg"] {
        logs.push(("client", s.read(&format!("client-{j}.log"))));
    }
    assert!(logs[1].1.contains("environment locked"), "{}", logs[1].1);
    for (who, log) in &logs {
        for secret in [SSH_KEY_SECRET, PM_PASSWORD_SECRET, client_key] {
            assert!(!log.contains(secret), "{who} log leaks {secret}:\n{log}");
        }
    }
}

#[test]
fn a_waiting_client_reports_its_queue_position() {
    let (s, b, _w) = one_te(&[]);
    let holder = s.client(&b.spec(), "holder", &[], &hold_script(&s, "h"));
    held_pids(&s, "h");
    let mut waiter = s.client(&b.spec(), "waiter", &["--report-interval", "0.3"], "exit 0");
    wait_until(10 * SEC, "a position line", || {
        waiter.output().contains("(position 1 of 1 in the queue)")
    });
    assert!(waiter.output().contains("testenv-client: waited"));
    holder.signal_group(libc::SIGKILL);
    waiter.expect_code(0, 10 * SEC);
}

#[test]
fn exclusivity_six_clients_two_workers() {
    let s = Scene::new();
    let b = Broker::start();
    let _w1 = s.worker(&b.spec(), "te1", &[], &[&s.datafile("1")]);
    let _w2 = s.worker(&b.spec(), "te2", &[], &[&s.datafile("2")]);
    b.wait_lockenv_workers(2);
    let log = s.p("shared.log");
    let script = format!(
        r#"{TE_NUM}; echo "start $n $TOCI_JOBTYPE" >> {log}; sleep 0.3; echo "end $n $TOCI_JOBTYPE" >> {log}"#
    );
    let mut clients: Vec<Proc> = (0..6)
        .map(|i| s.client(&b.spec(), &format!("x{i}"), &[], &script))
        .collect();
    for c in &mut clients {
        c.expect_code(0, TIMEOUT);
    }
    // O_APPEND writes of one short line are atomic, so the file's order is the real order.
    let text = s.read("shared.log");
    let mut open: std::collections::HashMap<String, String> = Default::default();
    let mut jobs = std::collections::HashSet::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [what, te, job] = f[..] else {
            panic!("bad log line {line:?} in\n{text}")
        };
        assert!(te == "1" || te == "2", "unknown TE in {line:?}");
        match what {
            "start" => {
                if let Some(other) = open.insert(te.to_string(), job.to_string()) {
                    panic!("TE {te} given to {job} while {other} held it:\n{text}");
                }
                assert!(jobs.insert(job.to_string()), "{job} ran twice:\n{text}");
            }
            "end" => assert_eq!(
                open.remove(te).as_deref(),
                Some(job),
                "end without start:\n{text}"
            ),
            _ => panic!("bad log line {line:?}"),
        }
    }
    assert!(open.is_empty(), "unfinished: {open:?}\n{text}");
    assert_eq!(jobs.len(), 6, "{text}");
    b.wait_no_leases(5 * SEC);
}

#[test]
fn process_group_sigkill_frees_te_fast_and_kills_command_tree() {
    // Default graces: a dead client's TE is offered again after --dead-holder-grace (1 s).
    let (s, b, _w) = one_te(&[]);
    let c = s.client(&b.spec(), "victim", &[], &hold_script(&s, "v"));
    let (cmd, gc) = held_pids(&s, "v");
    assert_eq!(b.leases().len(), 1, "{:?}", b.leases());

    // What a CI system does to abort a job: SIGKILL its whole process group.
    c.signal_group(libc::SIGKILL);
    let killed = Instant::now();
    wait_gone(&[cmd, gc], 5 * SEC);
    // The broker fails the dead client's callback job at once (no requeue), so the worker
    // frees the TE now rather than after its timeout.
    assert_te_free(&s, &b);
    eprintln!(
        "TE reused {:.2}s after the group kill",
        killed.elapsed().as_secs_f64()
    );
    drop(c);
}

#[test]
fn client_pid_sigkill_ends_command_and_grandchild() {
    let (s, b, _w) = one_te(&["--holder-grace", "0.2"]);
    // The grandchild leaves the process group too: only the guard's subreaper walk finds it.
    let script = format!(
        "echo $$ > {cmd}; setsid sleep 1000 & echo $! > {gc}; wait",
        cmd = s.p("k.cmd.pid"),
        gc = s.p("k.gc.pid")
    );
    let mut c = s.client(&b.spec(), "k", &["--kill-grace", "0.5"], &script);
    let (cmd, gc) = held_pids(&s, "k");
    c.signal(libc::SIGKILL);
    c.wait(5 * SEC);
    // The guard gets SIGTERM (PR_SET_PDEATHSIG), passes it on, then kills what is left.
    wait_gone(&[cmd, gc], 10 * SEC);
    assert_te_free(&s, &b);
}

#[test]
fn lease_timeout_by_worker_kills_command_and_children() {
    let (s, b, w) = one_te(&["--holder-grace", "0.2"]);
    // -t 42: the worker holds the TE for 42 - 40 = 2 s, the client's own deadline is 42 s.
    let mut c = s.client(
        &b.spec(),
        "late",
        &["-t", "42", "--kill-grace", "1"],
        &hold_script(&s, "l"),
    );
    let (cmd, gc) = held_pids(&s, "l");
    c.expect_code(3, TIMEOUT);
    // Everything the command started is gone by the time the client exits.
    assert!(!alive(cmd) && !alive(gc), "command tree survived the lease");
    assert!(
        c.output().contains("released the environment"),
        "{}",
        c.output()
    );
    // The worker tells the client first and logs the lease's end after.
    wait_until(TIMEOUT, "the worker logs the lease end", || {
        w.output().contains("lease end")
    });
    let wl = w.output();
    assert!(wl.contains("outcome=TimedOut"), "{wl}");
}

#[test]
fn worker_sigterm_mid_lease_kills_command_and_children() {
    let (s, b, mut w) = one_te(&[]);
    let mut c = s.client(
        &b.spec(),
        "held",
        &["--kill-grace", "1"],
        &hold_script(&s, "h"),
    );
    let (cmd, gc) = held_pids(&s, "h");
    w.signal(libc::SIGTERM);
    c.expect_code(3, TIMEOUT);
    assert!(!alive(cmd) && !alive(gc), "command tree survived the lease");
    w.expect_code(0, TIMEOUT);
    assert!(w.output().contains("Stopping"), "{}", w.output());
}

#[test]
fn client_timeout_kills_command() {
    let (s, b, _w) = one_te(&[]);
    // "1.5" is not whole seconds, so the worker holds for its own -t (10800 - 40 s): only the
    // client's own deadline can end this run.
    let mut c = s.client(
        &b.spec(),
        "slow",
        &["-t", "1.5", "--kill-grace", "1"],
        &hold_script(&s, "t"),
    );
    let (cmd, gc) = held_pids(&s, "t");
    c.expect_code(124, TIMEOUT);
    assert!(
        !alive(cmd) && !alive(gc),
        "command tree survived the timeout"
    );
    assert!(c.output().contains("--timeout"), "{}", c.output());
    // The client handed the TE back properly.
    assert_te_free(&s, &b);
}

#[test]
fn sigint_and_sigterm_to_client_reach_command_and_release_te() {
    // A long holder grace: if the TE were not released cleanly, the next client would wait.
    let (s, b, _w) = one_te(&["--holder-grace", "60"]);
    for (sig, name) in [(libc::SIGTERM, "TERM"), (libc::SIGINT, "INT")] {
        let got = s.p(&format!("got-{name}"));
        let script = format!(
            "trap 'echo {name} > {got}; exit 0' {name}; echo $$ > {pid}; sleep 1000 & wait",
            pid = s.p(&format!("{name}.pid")),
        );
        let mut c = s.client(
            &b.spec(),
            &format!("sig{name}"),
            &["--kill-grace", "2"],
            &script,
        );
        read_pid(&s.path(&format!("{name}.pid")));
        c.signal(sig);
        c.expect_code(128 + sig, TIMEOUT);
        assert_eq!(
            s.read(&format!("got-{name}")).trim(),
            name,
            "COMMAND got SIG{name}"
        );
        let mut next = s.client(&b.spec(), &format!("after{name}"), &[], "exit 0");
        next.expect_code(0, 10 * SEC);
    }
}

#[test]
fn sigusr2_pauses_and_sigusr1_resumes_worker() {
    let (s, b, w) = one_te(&[]);
    let worker_line = |b: &Broker| {
        b.admin("workers")
            .into_iter()
            .find(|l| l.contains("testenv-worker-te1"))
    };
    w.signal(libc::SIGUSR2);
    wait_until(TIMEOUT, "worker without lockenv", || {
        worker_line(&b).is_some_and(|l| !l.contains("lockenv"))
    });
    let mut c = s.client(&b.spec(), "waiter", &[], "exit 0");
    wait_until(TIMEOUT, "lockenv queued", || {
        b.status().iter().any(|(f, total, running, workers)| {
            f == "lockenv" && (*total, *running, *workers) == (1, 0, 0)
        })
    });
    // No worker has lockenv now (status says so), so nothing can hand this client a TE.
    assert!(c.running(), "client got a TE from a paused worker");
    w.signal(libc::SIGUSR1);
    c.expect_code(0, TIMEOUT);
    assert!(worker_line(&b).is_some_and(|l| l.contains("lockenv")));
}

#[test]
fn sigusr2_during_a_lease_through_gearmand_does_not_lease_the_request_twice() {
    // gearmand hands a running job out again when its worker sends CANT_DO for the function,
    // so a pause during a lease must wait for the lease's end.
    let s = Scene::new();
    let g = PeerServer::gearmand();
    let w = s.worker(&g.spec(), "te1", &[], &[&s.datafile("1")]);
    wait_lockenv_workers(g.addr, 1);
    let go = s.path("go");
    let mut c = s.client(
        &g.spec(),
        "holder",
        &[],
        &format!(
            "touch {0}.started; while [ ! -e {0} ]; do sleep 0.05; done",
            go.display()
        ),
    );
    wait_until(TIMEOUT, "lease started", || {
        go.with_extension("started").exists()
    });
    w.signal(libc::SIGUSR2);
    wait_until(TIMEOUT, "pause noted", || w.output().contains("paused"));
    std::fs::write(&go, "").unwrap();
    c.expect_code(0, TIMEOUT);
    wait_until(TIMEOUT, "lease end logged", || {
        w.output().contains("lease end")
    });
    w.signal(libc::SIGUSR1);
    // Re-leased, the holder's request would keep the TE until its callback start timeout
    // (30 s): the next client would not get it in time.
    let mut c = s.client(&g.spec(), "next", &[], "exit 0");
    c.expect_code(0, TIMEOUT);
    let out = w.output();
    let starts: Vec<&str> = out.lines().filter(|l| l.contains("lease start")).collect();
    assert_eq!(starts.len(), 2, "{out}");
    assert!(starts[1].contains("callback_next"), "{out}");
}

#[test]
fn script_form_create_argv_destroy_and_failing_create() {
    let s = Scene::new();
    let b = Broker::start();
    let create = s.script(
        "create-env",
        &format!(
            r#"printf '%s\n' "$@" > {argv}
if [ -e {fail} ]; then echo "boom: no OVB quota left"; exit 1; fi
printf '{{"env-num": "%s", "made-by": "create-env"}}' "$1" > "$TE_DATAFILE""#,
            argv = s.p("argv"),
            fail = s.p("fail-create"),
        ),
    );
    let destroy = s.script(
        "destroy-env",
        &format!(r#"echo "$@" >> {}"#, s.p("destroyed")),
    );
    let _w = s.worker(&b.spec(), "te7", &[], &[&create, &destroy]);
    b.wait_lockenv_workers(1);

    let mut c = s.client(
        &b.spec(),
        "made",
        &[
            "--envsize",
            "3",
            "--ucinstance",
            "uc-1",
            "--create-undercloud",
            "--ssh-key",
            "ssh-rsa AAAA key",
            "--net-iso",
            "none",
            "--compute-envsize",
            "4",
            "--extra-nodes",
            "5",
        ],
        // Destroy must not have run while COMMAND runs.
        &format!(
            r#"cat "$TE_DATAFILE" > {out}; test ! -s {destroyed}"#,
            out = s.p("out"),
            destroyed = s.p("destroyed")
        ),
    );
    c.expect_code(0, TIMEOUT);
    assert_eq!(
        s.read("argv").lines().collect::<Vec<_>>(),
        ["te7", "3", "uc-1", "true", "ssh-rsa AAAA key", "none", "4", "5"],
        "create-env TENUM ENVSIZE UCINSTANCE CREATE_UNDERCLOUD SSH_KEY NET_ISO COMPUTE_ENVSIZE EXTRA_NODES"
    );
    assert_eq!(
        s.read("out"),
        r#"{"env-num": "te7", "made-by": "create-env"}"#
    );
    wait_until(TIMEOUT, "destroy-env te7", || {
        s.read("destroyed") == "te7\n"
    });

    // Defaults reach the script as the original sent them.
    let mut c = s.client(&b.spec(), "defaults", &[], "true");
    c.expect_code(0, TIMEOUT);
    assert_eq!(
        s.read("argv").lines().collect::<Vec<_>>(),
        ["te7", "2", "", "", "", "multi-nic", "0", "0"]
    );
    wait_until(TIMEOUT, "second destroy", || {
        s.read("destroyed").lines().count() == 2
    });

    // A failing create: the client prints the notice, does not run COMMAND, exits 2.
    s.write("fail-create", "");
    let mut c = s.client(&b.spec(), "nope", &[], &format!("touch {}", s.p("ran")));
    c.expect_code(2, TIMEOUT);
    let out = c.output();
    assert!(out.contains("Couldn't retrieve env"), "{out}");
    assert!(out.contains("boom: no OVB quota left"), "{out}");
    assert!(
        !s.path("ran").exists(),
        "COMMAND ran without an environment"
    );
    wait_until(TIMEOUT, "destroy after failed create", || {
        s.read("destroyed").lines().count() == 3
    });

    // And the worker still serves.
    std::fs::remove_file(s.path("fail-create")).unwrap();
    let mut c = s.client(&b.spec(), "again", &[], "true");
    c.expect_code(0, TIMEOUT);
}

#[test]
fn script_form_missing_script_is_a_clear_error() {
    let s = Scene::new();
    let b = Broker::start();
    let destroy = s.script("destroy-env", "true");
    let missing = s.path("no-such-create-env");
    let mut w = s.worker(&b.spec(), "te1", &[], &[&missing, &destroy]);
    let code = w.wait_code(TIMEOUT);
    assert_ne!(code, 0);
    let out = w.output();
    assert!(
        out.contains("no-such-create-env") && out.contains("does not exist"),
        "{out}"
    );
}

#[test]
fn once_worker_exits_after_one_lease() {
    let (s, b, mut w) = one_te(&["--once"]);
    let mut c = s.client(&b.spec(), "only", &[], "exit 0");
    c.expect_code(0, TIMEOUT);
    w.expect_code(0, TIMEOUT);
    assert!(
        !b.admin("workers").iter().any(|l| l.contains("lockenv")),
        "{:?}",
        b.admin("workers")
    );
}

#[test]
fn two_brokers_one_dies_work_continues_without_double_lease() {
    let s = Scene::new();
    let mut a = Broker::start();
    let b = Broker::start();
    let both = format!("{},{}", a.spec(), b.spec());
    let _w = s.worker(&both, "te1", &["--holder-grace", "1"], &[&s.datafile("1")]);
    a.wait_lockenv_workers(1);
    b.wait_lockenv_workers(1);
    let log = s.p("log");
    // Holds the TE ~3 s; on SIGTERM notes its end at once.
    let script = format!(
        r#"echo "start $TOCI_JOBTYPE $(date +%s.%N)" >> {log}
trap 'echo "end $TOCI_JOBTYPE $(date +%s.%N)" >> {log}; exit 0' TERM
sleep 3 & wait
echo "end $TOCI_JOBTYPE $(date +%s.%N)" >> {log}"#
    );
    // Without lease resume (--resume-grace 0: the rules before it; tests/resume.rs has the
    // lease surviving this).
    let mut c1 = s.client(
        &both,
        "one",
        &["--kill-grace", "0.5", "--resume-grace", "0"],
        &script,
    );
    wait_until(TIMEOUT, "first holder running", || {
        s.read("log").contains("start")
    });
    // A second client waits; its lockenv sits on broker A (the first that answers).
    let mut c2 = s.client(&both, "two", &[], &script);
    wait_until(TIMEOUT, "second lockenv queued on A", || {
        a.status()
            .iter()
            .any(|(f, total, _, _)| f == "lockenv" && *total == 2)
    });
    a.kill();
    // Work goes on through B: the waiting client resubmits there, and a new one gets a TE too.
    let c1_code = c1.wait_code(TIMEOUT);
    c2.expect_code(0, TIMEOUT);
    let mut c3 = s.client(&both, "three", &[], "exit 0");
    c3.expect_code(0, TIMEOUT);

    // Never two holders at once.
    let text = s.read("log");
    let mut events: Vec<(f64, &str, &str)> = text
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[2].parse().unwrap(), f[0], f[1])
        })
        .collect();
    events.sort_by(|x, y| x.0.partial_cmp(&y.0).unwrap());
    let mut holder: Option<&str> = None;
    for (_, what, who) in &events {
        match *what {
            "start" => {
                assert!(
                    holder.is_none(),
                    "{who} started while {holder:?} held the TE:\n{text}"
                );
                holder = Some(who);
            }
            _ => {
                assert_eq!(holder, Some(*who), "{text}");
                holder = None;
            }
        }
    }
    // The first holder's lease went down with broker A (its worker can no longer hear from
    // it), so it was told and stopped; had it run on, it would have overlapped the second.
    assert_eq!(c1_code, 3, "first client:\n{}", c1.output());
}

#[test]
fn worker_sigkill_and_restart_does_not_double_lease() {
    let s = Scene::new();
    let b = Broker::start();
    let df = s.datafile("1");
    let args = ["--holder-grace", "2.5"];
    let mut w = s.worker(&b.spec(), "te1", &args, &[&df]);
    b.wait_lockenv_workers(1);
    let log = s.p("log");
    // The old holder takes its time to stop (0.8 s after SIGTERM, under its 1.5 s kill grace).
    let script1 = format!(
        r#"trap 'sleep 0.8; echo "end old $(date +%s.%N)" >> {log}; exit 0' TERM
echo $$ > {pid}
sleep 1000 & wait"#,
        pid = s.p("old.pid")
    );
    let mut c1 = s.client(&b.spec(), "old", &["--kill-grace", "1.5"], &script1);
    let old = read_pid(&s.path("old.pid"));
    w.signal(libc::SIGKILL);
    w.wait(TIMEOUT);
    // Restarted at once with the same state directory and TE number.
    let _w2 = s.worker(&b.spec(), "te1", &args, &[&df]);
    let script2 = format!(
        r#"st=$(cut -d' ' -f3 /proc/{old}/stat 2>/dev/null)
echo "start new $(date +%s.%N) old-state=${{st:-gone}}" >> {log}"#
    );
    let mut c2 = s.client(&b.spec(), "new", &[], &script2);
    c1.expect_code(3, TIMEOUT);
    c2.expect_code(0, TIMEOUT);
    let text = s.read("log");
    let time_of = |prefix: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix:?} line in\n{text}"))
    };
    assert!(
        time_of("end old") < time_of("start new"),
        "the old holder still ran when the TE was leased again:\n{text}"
    );
    assert!(
        text.contains("old-state=gone") || text.contains("old-state=Z"),
        "old COMMAND alive at the new lease:\n{text}"
    );
}

#[test]
fn worker_crash_during_holder_grace_keeps_the_quarantine() {
    let s = Scene::new();
    let b = Broker::start();
    let df = s.datafile("1");
    let args = ["--holder-grace", "3"];
    let mut w = s.worker(&b.spec(), "te1", &args, &[&df]);
    b.wait_lockenv_workers(1);
    let log = s.p("log");
    // The lease times out after 2 s (-t 42); the holder then needs 1.5 s to stop.
    let script1 = format!(
        r#"trap 'sleep 1.5; echo "end old $(date +%s.%N)" >> {log}; exit 0' TERM
sleep 1000 & wait"#
    );
    let mut c1 = s.client(
        &b.spec(),
        "old",
        &["-t", "42", "--kill-grace", "2.5"],
        &script1,
    );
    // The worker has ended the lease and sits out its holder grace: crash it there.
    wait_until(TIMEOUT, "worker in its holder grace", || {
        w.output().contains("waiting for the previous holder")
    });
    w.signal(libc::SIGKILL);
    w.wait(TIMEOUT);
    let _w2 = s.worker(&b.spec(), "te1", &args, &[&df]);
    let script2 = format!(r#"echo "start new $(date +%s.%N)" >> {log}"#);
    let mut c2 = s.client(&b.spec(), "new", &[], &script2);
    c1.expect_code(3, TIMEOUT);
    c2.expect_code(0, TIMEOUT);
    let text = s.read("log");
    let time_of = |prefix: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix:?} line in\n{text}"))
    };
    assert!(
        time_of("end old") < time_of("start new"),
        "the old holder still ran when the TE was leased again:\n{text}"
    );
}

#[test]
fn worker_stops_promptly_on_sigterm_during_holder_grace() {
    let (s, b, mut w) = one_te(&["--holder-grace", "60"]);
    let mut c = s.client(&b.spec(), "c", &["-t", "41"], &hold_script(&s, "c"));
    c.expect_code(3, TIMEOUT);
    wait_until(TIMEOUT, "worker in its holder grace", || {
        w.output().contains("waiting for the previous holder")
    });
    w.signal(libc::SIGTERM);
    w.expect_code(0, 5 * SEC);
}

#[test]
fn missing_or_broken_datafile_then_fixed() {
    let s = Scene::new();
    let b = Broker::start();
    let df = s.path("te.json");
    let mut w = s.worker(&b.spec(), "te1", &[], &[&df]);
    b.wait_lockenv_workers(1);
    let ran = format!("touch {}", s.p("ran"));

    let mut c = s.client(&b.spec(), "missing", &[], &ran);
    c.expect_code(2, TIMEOUT);
    assert!(
        c.output().contains("Couldn't retrieve env: "),
        "{}",
        c.output()
    );

    s.write("te.json", "this is { not JSON");
    let mut c = s.client(&b.spec(), "broken", &[], &ran);
    c.expect_code(2, TIMEOUT);
    assert!(
        c.output().contains("Couldn't retrieve env: "),
        "{}",
        c.output()
    );
    assert!(
        !s.path("ran").exists(),
        "COMMAND ran without an environment"
    );
    assert!(w.running(), "worker died:\n{}", w.output());

    std::fs::write(&df, te_json("1")).unwrap();
    let mut c = s.client(&b.spec(), "fixed", &[], &ran);
    c.expect_code(0, TIMEOUT);
    assert!(s.path("ran").exists());
    let wl = w.output();
    assert!(
        wl.contains("Couldn't retrieve env"),
        "worker logs the failure:\n{wl}"
    );
}

#[test]
fn failing_client_alive_cmd_frees_te() {
    let s = Scene::new();
    let b = Broker::start();
    let alive_cmd = format!(
        r#"echo "$TE_UCINSTANCE|$TE_JOB_IDENTIFIER" > {seen}; echo >> {runs}; test ! -e {stop}"#,
        seen = s.p("seen"),
        runs = s.p("runs"),
        stop = s.p("stop"),
    );
    let _w = s.worker(
        &b.spec(),
        "te1",
        &[
            "--client-alive-cmd",
            &alive_cmd,
            "--alive-interval",
            "0.2",
            "--holder-grace",
            "0.2",
        ],
        &[&s.datafile("1")],
    );
    b.wait_lockenv_workers(1);
    let mut cmd = std::process::Command::new(CLIENT_BIN);
    cmd.args([
        "-b",
        &b.spec(),
        "-n",
        "alive",
        "--ucinstance",
        "uc-9",
        "--kill-grace",
        "1",
    ])
    .args(["--", "sh", "-c", &hold_script(&s, "a")])
    .env("ZUUL_CHANGE", "4242")
    .env("TOCI_JOBTYPE", "ovb-ha");
    let mut c = Proc::spawn("client alive", &mut cmd, s.path("client-alive.log"));
    let (pid, gc) = held_pids(&s, "a");
    wait_until(TIMEOUT, "alive check ran", || !s.read("seen").is_empty());
    assert_eq!(s.read("seen").trim(), "uc-9|4242: ovb-ha");
    wait_until(TIMEOUT, "three passing alive checks", || {
        s.read("runs").lines().count() >= 3
    });
    assert!(c.running(), "client ended while its alive check passed");
    s.write("stop", "");
    c.expect_code(3, TIMEOUT);
    assert!(!alive(pid) && !alive(gc));
    b.wait_no_leases(5 * SEC);
}

/// Not a test: the entry point of the broker processes [`Broker::start`] runs.
#[test]
fn broker_child_process() {
    broker_child_main();
}

/// A worker that takes the lock request and dies before calling back: tebroker fails the
/// request to the client, which asks again and gets a TE from a healthy worker.
#[test]
fn a_lock_request_lost_with_its_worker_is_submitted_again() {
    let s = Scene::new();
    let b = Broker::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = gearman_client::ServerAddr::new(b.addr.ip().to_string(), b.addr.port());
    let mut flaky = rt
        .block_on(gearman_client::Connection::connect(&server, 5 * SEC))
        .unwrap();
    rt.block_on(async {
        use gearman_proto::{Packet, PacketType as P};
        flaky
            .send(Packet::req(P::CanDo, ["lockenv"]))
            .await
            .unwrap();
    });
    b.wait_lockenv_workers(1);
    let mut c = s.client(&b.spec(), "retry", &[], "exit 0");
    // The flaky worker grabs the request, then vanishes without a word.
    let assigned = rt.block_on(async {
        use gearman_proto::{Packet, PacketType as P};
        loop {
            flaky
                .send(Packet::req(P::GrabJob, Vec::<bytes::Bytes>::new()))
                .await
                .unwrap();
            let p = flaky.recv().await.unwrap().unwrap();
            if p.ptype == P::JobAssign {
                break p;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert!(String::from_utf8_lossy(&assigned.args[2]).contains("callback_retry"));
    drop(flaky);
    let _w = s.worker(&b.spec(), "te1", &[], &[&s.datafile("1")]);
    c.expect_code(0, TIMEOUT);
    assert!(c.output().contains("submitting again"), "{}", c.output());
}
