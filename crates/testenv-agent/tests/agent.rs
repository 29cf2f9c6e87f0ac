//! End-to-end: the real testenv-agent binary with real hook scripts, real testenv-clients, and
//! a real broker (tebroker in this process, or Debian's gearmand). Every wait has a deadline.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use test_support::{run_with_timeout, wait_until, Peer, PeerServer};
use testenv_proto::agent::EnvState;

#[test]
fn a_flaky_te_is_rebuilt_by_itself_and_only_then_offered() {
    let broker = tebroker();
    // te1's health fails until its rebuild hook has run; every health run is logged.
    let agent = Agent::te1_hooked(
        broker,
        "echo \"$TE_NAME\" >> {d}/health.log\n[ -e {d}/rebuilt ] || { echo 'lost its IP'; exit 1; }",
        "touch {d}/rebuilt",
        "timeout = \"10s\"",
    );
    let te = agent.wait_state("te1", EnvState::Ready);
    assert_eq!(te.failed_rebuilds, 0);
    let health_runs = std::fs::read_to_string(agent.path("health.log")).unwrap();
    assert_eq!(
        health_runs.lines().count(),
        2,
        "health before the first offer and after the rebuild"
    );
    assert!(
        agent.log().contains("TE te1: hook health: failed"),
        "{}",
        agent.log()
    );
    assert!(agent.log().contains("lost its IP"));
    // Offered now: a client gets it.
    let out = lease_ok(broker, &[], "cat $TE_DATAFILE");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"env-num\":\"1\""));
}

#[test]
fn failing_rebuilds_end_failed_and_bad_hooks_do_not_stop_the_other_tes() {
    let broker = tebroker();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    te_data(&d.join("good.json"), "1", 2);
    te_data(&d.join("broken.json"), "2", 2);
    te_data(&d.join("hung.json"), "3", 2);
    std::fs::write(d.join("not-executable.sh"), "#!/bin/sh\nexit 0\n").unwrap();
    let agent = Agent::start_in(
        dir,
        broker,
        r#"
[hooks]
timeout = "1s"
[policy]
max_rebuilds = 2
[[te]]
name = "good"
datafile = "{dir}/good.json"
[[te]]
name = "broken"
datafile = "{dir}/broken.json"
[te.hooks]
health = "{dir}/no-such-hook"
[[te]]
name = "hung"
datafile = "{dir}/hung.json"
[te.hooks]
health = "sleep 1000 & echo $! > {dir}/hung.pid; wait"
[[te]]
name = "nodata"
datafile = "{dir}/missing.json"
[[te]]
name = "noexec"
datafile = "{dir}/good.json"
[te.hooks]
health = "{dir}/not-executable.sh"
"#,
    );
    let broken = agent.wait_state("broken", EnvState::Failed);
    assert_eq!(broken.failed_rebuilds, 2, "{broken:?}");
    let detail = broken.detail.unwrap();
    assert!(
        detail.contains("TE broken: hook health: not found"),
        "{detail}"
    );
    let hung = agent.wait_state("hung", EnvState::Failed);
    assert!(hung.detail.unwrap().contains("hung past its timeout of 1s"));
    // The hung hook's whole process group was killed.
    let pid: i32 = std::fs::read_to_string(agent.path("hung.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_until("the hung hook's child is gone", || {
        // SAFETY: signal 0 only checks for existence.
        (unsafe { libc::kill(pid, 0) } != 0).then_some(())
    });
    let noexec = agent.wait_state("noexec", EnvState::Failed);
    assert!(
        noexec
            .detail
            .unwrap()
            .contains("TE noexec: hook health: not executable"),
        "{}",
        agent.log()
    );
    let nodata = agent.wait_state("nodata", EnvState::Failed);
    assert!(nodata.detail.unwrap().contains("TE nodata: datafile"));
    // The healthy TE serves throughout.
    agent.wait_state("good", EnvState::Ready);
    let out = lease_ok(broker, &[], "cat $TE_DATAFILE");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"env-num\":\"1\""));
    // An operator's rebuild takes a failed TE back into the cycle (it fails again here).
    std::fs::write(agent.path("missing.json"), r#"{"env-num":"4"}"#).unwrap();
    agent.ctl_ok(&["rebuild", "nodata"]);
    agent.wait_state("nodata", EnvState::Ready);
}

#[test]
fn drain_during_a_lease_through_gearmand_and_the_gearman_cli() {
    let server = gearmand();
    let broker = server.addr();
    let agent = Agent::te1(broker, "[lease]\nholder_grace = \"1s\"");
    agent.wait_state("te1", EnvState::Ready);
    let go = agent.path("go");
    let holder = hold_until(broker, &go);
    agent.wait_state("te1", EnvState::Leased);
    // Debian's gearman CLI sends the command as a job of the agent's control function.
    let out = run_with_timeout(
        Command::new("gearman").args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port().to_string(),
            "-f",
            "testenv-agent:ctl:test-agent",
            r#"{"op":"drain","env":"te1"}"#,
        ]),
        LONG,
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(r#""ok":true"#),
        "{out:?}"
    );
    agent.wait_state("te1", EnvState::Draining);
    std::fs::write(&go, "").unwrap();
    let out = finish(holder);
    assert!(out.status.success(), "the lease finished normally: {out:?}");
    agent.wait_state("te1", EnvState::Drained);
    agent.ctl_ok(&["undrain", "--all"]);
    agent.wait_state("te1", EnvState::Ready);
}

#[test]
fn autohold_after_a_failed_job_and_release() {
    let broker = tebroker();
    let agent = Agent::te1(broker, "[policy]\nhold_on_failure = \"1h\"");
    agent.wait_state("te1", EnvState::Ready);
    let out = finish(client(broker, &[], "exit 7"));
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let held = agent.wait_state("te1", EnvState::Held);
    assert!(held.detail.unwrap().contains("autohold"));
    assert_eq!(
        held.failed_leases, 1,
        "a command failing in its first minute is a failed lease"
    );
    agent.ctl_ok(&["release", "te1"]);
    agent.wait_state("te1", EnvState::Ready);
    // An operator's hold with a time.
    agent.ctl_ok(&["hold", "te1", "--for", "1s"]);
    agent.wait_state("te1", EnvState::Held);
    agent.wait_state("te1", EnvState::Ready);
}

#[test]
fn labels_and_sizes_pick_the_te_and_a_too_big_request_is_not_stranded() {
    let broker = tebroker();
    let dir = tempfile::tempdir().unwrap();
    te_data(&dir.path().join("small.json"), "small", 2);
    te_data(&dir.path().join("big.json"), "big", 6);
    let agent = Agent::start_in(
        dir,
        broker,
        r#"
[[te]]
name = "small"
datafile = "{dir}/small.json"
labels = ["ovb"]
[[te]]
name = "big"
datafile = "{dir}/big.json"
labels = ["baremetal"]
"#,
    );
    agent.wait_state("small", EnvState::Ready);
    agent.wait_state("big", EnvState::Ready);
    for _ in 0..3 {
        let out = finish(client(broker, &["--label", "ovb"], "cat $TE_DATAFILE"));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("\"small\""),
            "{out:?}"
        );
        let out = finish(client(
            broker,
            &["--envsize", "4", "--extra-nodes", "1"],
            "cat $TE_DATAFILE",
        ));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("\"big\""),
            "{out:?}"
        );
    }
    // Nothing fits 9 nodes: every TE fails the request, the client gives up (exit 1) with a
    // clear message instead of waiting for its timeout.
    let out = finish(client(broker, &["--envsize", "9"], "true"));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("without an environment"),
        "{out:?}"
    );
    assert!(agent.log().contains("the TE is smaller than the request"));
    agent.wait_state("big", EnvState::Ready);
    agent.wait_state("small", EnvState::Ready);
}

#[test]
fn carving_from_given_host_figures() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        r#"
state_dir = "/tmp/unused"
control_socket = "/tmp/unused.sock"
[hooks]
setup = "echo '{}' > $TE_DATAFILE"
[carve]
mem_per_env_gb = 32
cpu_per_env = 8
disk_per_env_gb = 200
disk_path = "/"
datafile_pattern = "/tmp/carved-te{n}.json"
host_mem_gb = 100
host_cpus = 64
host_disk_gb = 5000
"#,
    )
    .unwrap();
    let out = run_with_timeout(
        Command::new(AGENT_BIN).arg("check-config").arg(&config),
        LONG,
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[te te3] num = 3 (carved)"), "{text}");
    assert!(!text.contains("[te te4]"), "100 GB / 32 GB = 3 TEs: {text}");
    // The sample in contrib/ loads.
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/testenv-agent.toml");
    let out = run_with_timeout(
        Command::new(AGENT_BIN).arg("check-config").arg(sample),
        LONG,
    );
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("[te te2]"));
    // An unknown key and a bad duration are clear errors.
    std::fs::write(
        &config,
        "state_dir = \"/x\"\ncontrol_socket = \"/y\"\ncolour = 1\n",
    )
    .unwrap();
    let out = run_with_timeout(
        Command::new(AGENT_BIN).arg("check-config").arg(&config),
        LONG,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("colour"),
        "{out:?}"
    );
    std::fs::write(
        &config,
        "state_dir = \"/x\"\ncontrol_socket = \"/y\"\n[policy]\nhealth_interval = \"soon\"\n",
    )
    .unwrap();
    let out = run_with_timeout(
        Command::new(AGENT_BIN).arg("check-config").arg(&config),
        LONG,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("health_interval") && err.contains("soon"),
        "{out:?}"
    );
}

#[test]
fn reports_go_to_tebroker_only_and_sigusr2_drains_the_host() {
    let te = |broker: SocketAddr| {
        Agent::start_in(te1_dir(), broker, &format!("{TE1}labels = [\"ovb\"]\n"))
    };
    let broker = tebroker();
    let agent = te(broker);
    agent.wait_state("te1", EnvState::Ready);
    // tebroker consumes the reports (never queued) into its inventory: te1 is listed as the
    // agent's, ready.
    wait_until("a state report reached tebroker", || {
        test_support::admin(broker, "envs")
            .into_iter()
            .find(|line| {
                let cols: Vec<&str> = line.split('\t').collect();
                cols.len() >= 5 && cols[0] == "te1" && cols[1] == "ready" && !cols[4].is_empty()
            })
    });
    assert!(
        function_status(broker, "tebroker:te-report").is_none_or(|r| r.0 == 0),
        "reports are consumed, not queued"
    );
    wait_until("te1 registered lockenv:ovb", || {
        function_status(broker, "lockenv:ovb").filter(|r| r.2 == 1)
    });
    // SIGUSR2: the whole host drained (CANT_DO everywhere); SIGUSR1: back.
    // SAFETY: signals to our own child.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGUSR2) };
    agent.wait_state("te1", EnvState::Drained);
    // tebroker deletes a function nobody can do, so the row may be gone altogether.
    wait_until("te1 unregistered while drained", || {
        match function_status(broker, "lockenv") {
            None => Some(()),
            Some(r) => (r.2 == 0).then_some(()),
        }
    });
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGUSR1) };
    agent.wait_state("te1", EnvState::Ready);

    let server = gearmand();
    let agent = te(server.addr());
    agent.wait_state("te1", EnvState::Ready);
    wait_until("te1 registered on gearmand", || {
        function_status(server.addr(), "lockenv").filter(|r| r.2 == 1)
    });
    lease_ok(server.addr(), &[], "cat $TE_DATAFILE");
    // The agent asked gearmand's version and sent no report there.
    assert_eq!(function_status(server.addr(), "tebroker:te-report"), None);
}

#[test]
fn a_gear_based_original_style_client_leases_from_the_agent_through_geard() {
    let py = std::env::var("TESTENV_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let server = PeerServer::start(Peer::Geard, Duration::from_secs(20));
    let agent = Agent::te1(server.addr(), "");
    agent.wait_state("te1", EnvState::Ready);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testenv/tests/py/te_client.py");
    let out_file = agent.path("out");
    let out = run_with_timeout(
        Command::new(py)
            .arg("-u")
            .arg(script)
            .args([
                "-b",
                &server.addr().to_string(),
                "-n",
                "py1",
                "--",
                "sh",
                "-c",
            ])
            .arg(format!(
                "cat \"$TE_DATAFILE\" > {}; exit 5",
                out_file.display()
            )),
        LONG,
    );
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(std::fs::read_to_string(&out_file)
        .unwrap()
        .contains("\"env-num\":\"1\""));
    // The gear client says nothing of COMMAND's status: the lease is not a failed one.
    let te = agent.wait_state("te1", EnvState::Ready);
    assert_eq!(te.failed_leases, 0);
}

#[test]
fn a_te_leased_when_the_agent_crashes_is_quarantined_after_restart() {
    let broker = tebroker();
    let mut agent = Agent::te1(broker, "[lease]\nholder_grace = \"3s\"");
    agent.wait_state("te1", EnvState::Ready);
    // Held until the agent dies: `go` never comes.
    let holder = hold_until(broker, &agent.path("go"));
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    // The holder learns its TE is gone (tebroker fails lockenv of a dead worker).
    let out = finish(holder);
    assert!(!out.status.success(), "{out:?}");
    // Restarted on the same state_dir: the journal says a lease was open, so te1 sits out the
    // holder grace before it is offered again.
    let dir = std::mem::replace(&mut agent.dir, tempfile::tempdir().unwrap());
    drop(agent);
    let agent = Agent::start_in(
        dir,
        broker,
        &format!("[lease]\nholder_grace = \"3s\"\n{TE1}"),
    );
    let te = agent.wait_state("te1", EnvState::Provisioning);
    assert!(
        te.detail.unwrap_or_default().contains("quarantine"),
        "{}",
        agent.log()
    );
    agent.wait_state("te1", EnvState::Ready);
    assert!(agent.log().contains("a previous run left a lease open"));
}

#[test]
fn a_high_priority_request_overtakes_waiting_low_ones_through_gearmand() {
    let server = gearmand();
    let broker = server.addr();
    let agent = Agent::te1(broker, "[lease]\nholder_grace = \"1s\"");
    agent.wait_state("te1", EnvState::Ready);
    let go = agent.path("go");
    let order = agent.path("order");
    let first = hold_until(broker, &go);
    let queued = |n: u64| {
        wait_until(&format!("{n} lock requests queued"), || {
            function_status(broker, "lockenv").filter(|r| r.0 > n)
        })
    };
    let low = client(
        broker,
        &["--priority", "low"],
        &format!("echo low >> {}", order.display()),
    );
    queued(1);
    let high = client(
        broker,
        &["--priority", "high"],
        &format!("echo high >> {}", order.display()),
    );
    queued(2);
    std::fs::write(&go, "").unwrap();
    for c in [first, high, low] {
        let out = finish(c);
        assert!(out.status.success(), "{out:?}");
    }
    assert_eq!(std::fs::read_to_string(&order).unwrap(), "high\nlow\n");
    // Each request was leased once: gearmand hands a running job out again if its worker sends
    // CANT_DO meanwhile, so the agent must not leave rotation during a lease.
    let te = agent.wait_state("te1", EnvState::Ready);
    assert_eq!(
        agent.log().matches("lease start").count(),
        3,
        "{}",
        agent.log()
    );
    assert_eq!(te.failed_leases, 0);
}

#[test]
fn a_ready_te_failing_its_periodic_health_check_is_rebuilt_and_never_checked_during_a_lease() {
    let broker = tebroker();
    // Every health run and rebuild is logged with the wall clock in ns; health fails while
    // `sick` exists, and the rebuild mends it.
    let agent = Agent::te1_hooked(
        broker,
        "echo \"health $(date +%s%N)\" >> {d}/hooks.log\n[ ! -e {d}/sick ] || { echo 'lost its IP'; exit 1; }",
        "echo \"rebuild $(date +%s%N)\" >> {d}/hooks.log\nrm {d}/sick",
        "[policy]\nhealth_interval = \"300ms\"\n[lease]\nholder_grace = \"1s\"",
    );
    agent.wait_state("te1", EnvState::Ready);
    let log = |what: &str| -> Vec<u128> {
        std::fs::read_to_string(agent.path("hooks.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix(what)?.trim().parse().ok())
            .collect()
    };
    // Checked again and again while ready.
    wait_until("3 health runs while ready", || {
        (log("health").len() >= 3).then_some(())
    });

    // A lease of several health intervals: no health run inside it.
    let lease_log = agent.path("lease.log");
    lease_ok(
        broker,
        &[],
        &format!(
            "echo \"start $(date +%s%N)\" >> {0}; sleep 2; echo \"end $(date +%s%N)\" >> {0}",
            lease_log.display()
        ),
    );
    let lease = std::fs::read_to_string(&lease_log).unwrap();
    let at = |what: &str| -> u128 {
        lease
            .lines()
            .find_map(|l| l.strip_prefix(what)?.trim().parse().ok())
            .unwrap()
    };
    let (start, end) = (at("start"), at("end"));
    let runs = log("health");
    assert!(
        runs.iter().all(|&t| t < start || t > end),
        "a health check ran during the lease {start}..{end}: {runs:?}"
    );
    wait_until("health checks again after the lease", || {
        log("health").iter().any(|&t| t > end).then_some(())
    });

    // The TE falls ill while ready: unhealthy, rebuilt, checked, offered again, nobody acting.
    std::fs::write(agent.path("sick"), "").unwrap();
    wait_until("te1 rebuilt", || (!log("rebuild").is_empty()).then_some(()));
    let te = agent.wait_state("te1", EnvState::Ready);
    assert_eq!(te.failed_rebuilds, 0);
    let text = agent.log();
    let unhealthy = text
        .find("from=ready to=unhealthy")
        .unwrap_or_else(|| panic!("{text}"));
    let rebuilding = text[unhealthy..]
        .find("from=unhealthy to=rebuilding")
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        text[unhealthy + rebuilding..].contains("from=rebuilding to=ready"),
        "{text}"
    );
    assert!(text.contains("TE te1: hook health: failed"), "{text}");
    assert!(text.contains("lost its IP"), "{text}");
    let rebuilt_at = log("rebuild")[0];
    assert!(
        log("health").iter().any(|&t| t > rebuilt_at),
        "health runs after the rebuild before the TE is offered"
    );
    lease_ok(broker, &[], "cat $TE_DATAFILE");
}

/// The worker lines of admin `workers` (`ID ADDRESS CLIENT-ID : FUNCTIONS`) as
/// (client id, functions).
fn workers(broker: SocketAddr) -> Vec<(String, Vec<String>)> {
    test_support::admin(broker, "workers")
        .into_iter()
        .filter_map(|line| {
            let (who, functions) = line.split_once(" :")?;
            let id = who.split_whitespace().nth(2).unwrap_or("").to_string();
            Some((id, functions.split_whitespace().map(String::from).collect()))
        })
        .collect()
}

#[test]
fn te_workers_carry_their_te_name_as_client_id_in_tebroker_and_gearmand() {
    let body = "[[te]]\nname = \"te1\"\ndatafile = \"{dir}/te1.json\"\nlabels = [\"ovb\"]\n\
                [[te]]\nname = \"te2\"\ndatafile = \"{dir}/te1.json\"\n";
    let broker = tebroker();
    let agent = Agent::start_in(te1_dir(), broker, body);
    agent.wait_state("te1", EnvState::Ready);
    agent.wait_state("te2", EnvState::Ready);
    let named = |broker: SocketAddr| {
        wait_until("both TEs' workers named in `workers`", || {
            let w = workers(broker);
            let has = |te: &str, f: &str| {
                w.iter()
                    .any(|(id, fs)| id == te && fs.iter().any(|x| x == f))
            };
            (has("te1", "lockenv") && has("te1", "lockenv:ovb") && has("te2", "lockenv"))
                .then_some(w)
        })
    };
    named(broker);
    // tebroker's inventory lists each TE once, as the agent's: the TE workers are not also
    // taken for plain testenv-workers.
    wait_until("te1 and te2 listed once each by tebroker", || {
        let envs = test_support::admin(broker, "envs");
        let names: Vec<&str> = envs.iter().filter_map(|l| l.split('\t').next()).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        (sorted == ["te1", "te2"]).then_some(())
    });

    let server = gearmand();
    let agent = Agent::start_in(te1_dir(), server.addr(), body);
    agent.wait_state("te1", EnvState::Ready);
    named(server.addr());
    // Debian's gearadmin shows the same.
    let out = run_with_timeout(
        Command::new("gearadmin").args([
            "-h",
            "127.0.0.1",
            "-p",
            &server.addr().port().to_string(),
            "--workers",
        ]),
        LONG,
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.contains(" te1 : lockenv")),
        "{out:?}"
    );
}

/// A TE whose jobs keep failing is taken out of rotation after `max_failed_leases` of them and
/// rebuilt before it is offered again; with autohold it first stays held as the last job left
/// it: cleanup and rebuild run only after the release.
#[test]
fn failed_leases_make_a_te_rebuilt_and_an_autoheld_one_is_cleaned_only_after_its_release() {
    let broker = tebroker();
    let agent = Agent::te1_hooked(
        broker,
        "echo health >> {d}/events.log",
        "echo rebuild >> {d}/events.log",
        "cleanup = \"echo cleanup >> {dir}/events.log\"\ntimeout = \"10s\"\n\
         [policy]\nmax_failed_leases = 2\nhold_on_failure = \"1h\"",
    );
    let events = || std::fs::read_to_string(agent.path("events.log")).unwrap_or_default();
    let mark = |what: &str| {
        let mut log = events();
        log.push_str(what);
        log.push('\n');
        std::fs::write(agent.path("events.log"), log).unwrap();
    };
    agent.wait_state("te1", EnvState::Ready);
    for round in 1..=2 {
        let out = finish(client(broker, &[], "exit 3"));
        assert_eq!(out.status.code(), Some(3), "{out:?}");
        let held = agent.wait_state("te1", EnvState::Held);
        assert_eq!(held.failed_leases, round, "{held:?}");
        assert!(held.holder.is_some(), "the job's identifier: {held:?}");
        mark(&format!("release {round}"));
        agent.ctl_ok(&["release", "te1"]);
        agent.wait_state("te1", EnvState::Ready);
    }
    lease_ok(broker, &[], "cat $TE_DATAFILE");
    let log = wait_until("the last lease's cleanup", || {
        let log = events();
        (log.lines().count() >= 8).then_some(log)
    });
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(
        lines,
        [
            "health",
            "release 1",
            "cleanup",
            "release 2",
            "cleanup",
            "rebuild",
            "health",
            "cleanup"
        ],
        "each cleanup after its hold, the rebuild after the second failed lease; log:\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("2 failed leases in a row"),
        "{}",
        agent.log()
    );
}

/// Holding a failed (or unhealthy) TE and releasing it does not put it back into rotation:
/// it returns to where it was, and only an operator's rebuild brings it back.
#[test]
fn a_failed_te_held_and_released_stays_failed() {
    let broker = tebroker();
    let agent = Agent::te1_hooked(
        broker,
        "[ -e {d}/fixed ] || { echo 'still broken'; exit 1; }",
        "true",
        "timeout = \"10s\"\n[policy]\nmax_rebuilds = 1",
    );
    agent.wait_state("te1", EnvState::Failed);
    agent.ctl_ok(&["hold", "te1"]);
    agent.wait_state("te1", EnvState::Held);
    agent.ctl_ok(&["release", "te1"]);
    let te = agent.wait_state("te1", EnvState::Failed);
    assert!(te.detail.unwrap().contains("still broken"));
    // A lock request waits: nothing offers it the failed TE.
    let waiting = client(broker, &[], "true");
    wait_until("the lock request queued", || {
        (function_status(broker, "lockenv")? == (1, 0, 0)).then_some(())
    });
    assert_eq!(agent.status().unwrap().envs[0].state, EnvState::Failed);
    std::fs::write(agent.path("fixed"), "").unwrap();
    agent.ctl_ok(&["rebuild", "te1"]);
    let out = finish(waiting);
    assert!(out.status.success(), "{out:?}");
}

/// tebroker's admin commands reach a real agent's TE: `envs` lists it with its state, and
/// `drain|undrain|hold|release|rebuild TE` are carried out by the agent, answered with its reply.
#[test]
fn tebroker_admin_controls_a_real_agents_te() {
    let broker = tebroker();
    let dir = te1_with_health_and_rebuild("true", "echo rebuilt >> {d}/rebuild.log");
    let agent = Agent::start_in(
        dir,
        broker,
        &format!("{HEALTH_AND_REBUILD}{TE1}labels = [\"ovb\"]\n"),
    );
    agent.wait_state("te1", EnvState::Ready);
    let envs_row = |state: &str| {
        wait_until(&format!("te1 {state} in admin envs"), || {
            test_support::admin(broker, "envs").into_iter().find(|l| {
                let cols: Vec<&str> = l.split('\t').collect();
                cols.first() == Some(&"te1")
                    && cols.get(1) == Some(&state)
                    && cols.get(4) == Some(&"test-agent")
            })
        })
    };
    let row = envs_row("ready");
    let cols: Vec<&str> = row.split('\t').collect();
    assert_eq!(cols[6], "ovb", "{row}");
    let secs: u64 = cols[2].parse().unwrap();
    assert!(secs < 3600, "seconds in that state: {row}");
    let control = |command: &str| {
        let answer = test_support::admin(broker, command).join("\n");
        assert!(
            answer.starts_with(&format!("OK {}:", command.trim_end_matches(" 3600")))
                && answer.contains("agent test-agent"),
            "{command}: {answer}"
        );
    };
    control("drain te1");
    agent.wait_state("te1", EnvState::Drained);
    envs_row("drained");
    control("undrain te1");
    agent.wait_state("te1", EnvState::Ready);
    control("hold te1 3600");
    agent.wait_state("te1", EnvState::Held);
    envs_row("held");
    control("release te1");
    agent.wait_state("te1", EnvState::Ready);
    control("rebuild te1");
    wait_until("the rebuild hook ran", || {
        std::fs::read_to_string(agent.path("rebuild.log"))
            .ok()
            .filter(|l| l.contains("rebuilt"))
    });
    agent.wait_state("te1", EnvState::Ready);
    // And it still leases.
    lease_ok(broker, &["--label", "ovb"], "true");
}

/// A lease whose holder is lost (its testenv-client killed with SIGKILL mid-lease) is a failed
/// lease: with `max_failed_leases = 1` the TE is rebuilt and checked before it is offered again.
#[test]
fn a_lost_holder_counts_as_a_failed_lease_and_the_te_is_rebuilt() {
    let broker = tebroker();
    let agent = Agent::rebuilt_after_one_failed_lease(broker);
    let mut holder = client(broker, &[], "sleep 600");
    agent.wait_state("te1", EnvState::Leased);
    holder.kill().unwrap();
    holder.wait().unwrap();
    agent.wait_rebuilt_after_failed_lease(broker, "the holder was lost");
}
