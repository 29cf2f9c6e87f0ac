//! End-to-end: the brief states of a TE (cleaning, rebuilding, unhealthy) seen through
//! `ctl status --json` while hooks wait on files this test controls; no lease is lost when a
//! hook fails; a lease that timed out counts as a failed one. Real agent, real clients, real
//! tebroker; every wait has a deadline.

mod common;

use std::process::{Command, Stdio};

use common::*;
use test_support::wait_until;
use testenv_proto::agent::EnvState;

/// A shell loop that returns once `file` exists.
fn wait_for(file: &str) -> String {
    format!("while [ ! -e {file} ]; do sleep 0.05; done")
}

/// Starts an agent on `dir` (made by [`te1_with_health_and_rebuild`]) whose hooks are its
/// `health.sh`, its `rebuild.sh` and a `cleanup.sh` running `cleanup` (`{d}` in it stands for
/// the dir), each with 5 minutes; `tables` is the rest of the config.
fn start_with_cleanup(
    dir: tempfile::TempDir,
    broker: std::net::SocketAddr,
    cleanup: &str,
    tables: &str,
) -> Agent {
    let d = dir.path().display().to_string();
    script(&dir.path().join("cleanup.sh"), &cleanup.replace("{d}", &d));
    Agent::start_in(
        dir,
        broker,
        &format!(
            "{HEALTH_AND_REBUILD}cleanup = \"{{dir}}/cleanup.sh\"\ntimeout = \"5m\"\n{tables}"
        ),
    )
}

#[test]
fn cleaning_rebuilding_and_unhealthy_are_reported_and_a_waiting_client_is_served_after_the_rebuild()
{
    let broker = tebroker();
    // cleanup waits for `cleanup-go`, then fails; rebuild waits for `rebuild-go`, then fails
    // until `rebuild-ok` exists. Each run is logged.
    let dir = te1_with_health_and_rebuild(
        "true",
        &format!(
            "echo rebuild >> {{d}}/hooks.log\n{}\n[ -e {{d}}/rebuild-ok ] || {{ echo 'still broken'; exit 1; }}",
            wait_for("{d}/rebuild-go")
        ),
    );
    let agent = start_with_cleanup(
        dir,
        broker,
        &format!(
            "echo cleanup >> {{d}}/hooks.log\n{}\necho 'disk full'; exit 1",
            wait_for("{d}/cleanup-go")
        ),
        &format!("[policy]\nmax_rebuilds = 1000\n{TE1}"),
    );
    agent.wait_state("te1", EnvState::Ready);
    lease_ok(broker, &[], "true");

    // The lease is over and cleanup runs: cleaning, and nobody else gets the TE meanwhile.
    let te = agent.wait_state("te1", EnvState::Cleaning);
    assert_eq!(te.holder, None, "{te:?}");
    let waiting = client(broker, &[], "true");
    wait_until("the second request queued", || {
        function_status(broker, "lockenv").filter(|&(queued, _, _)| queued >= 1)
    });

    // The cleanup fails: the TE is rebuilt, with the cleanup's failure as the reason.
    std::fs::write(agent.path("cleanup-go"), "").unwrap();
    let te = agent.wait_state("te1", EnvState::Rebuilding);
    let detail = te.detail.unwrap_or_default();
    assert!(
        detail.contains("hook cleanup") && detail.contains("disk full"),
        "{detail}"
    );

    // The rebuild fails: unhealthy (between retries) with the rebuild's failure.
    std::fs::write(agent.path("rebuild-go"), "").unwrap();
    let te = agent.wait_state("te1", EnvState::Unhealthy);
    let detail = te.detail.clone().unwrap_or_default();
    assert!(
        detail.contains("hook rebuild") && detail.contains("still broken"),
        "{detail}"
    );
    assert!(te.failed_rebuilds >= 1, "{te:?}");

    // Through all of it the waiting client was not handed the broken TE; it is served once a
    // rebuild passes.
    let status = agent.status().unwrap();
    assert_ne!(status.envs[0].state, EnvState::Leased, "{status:?}");
    std::fs::write(agent.path("rebuild-ok"), "").unwrap();
    let out = finish(waiting);
    assert!(out.status.success(), "{out:?}");
    // Hooks in order: the first lease's cleanup, the failed rebuilds and the one that passed,
    // and only then the second lease (and its cleanup).
    let hooks = wait_until("the second lease's cleanup", || {
        let h = std::fs::read_to_string(agent.path("hooks.log")).ok()?;
        (h.lines().filter(|l| *l == "cleanup").count() == 2).then_some(h)
    });
    let lines: Vec<&str> = hooks.lines().collect();
    assert_eq!(lines[0], "cleanup", "{hooks}");
    let second = lines.iter().rposition(|l| *l == "cleanup").unwrap();
    assert!(
        second >= 3,
        "at least two rebuilds before the second lease: {hooks}"
    );
    assert!(lines[1..second].iter().all(|l| *l == "rebuild"), "{hooks}");
}

#[test]
fn a_failing_cleanup_loses_no_lease_the_waiting_client_gets_the_other_te() {
    let broker = tebroker();
    let dir = te1_with_health_and_rebuild("true", &wait_for("{d}/rebuild-go"));
    te_data(&dir.path().join("te2.json"), "2", 2);
    // Only te1's cleanup fails (after `cleanup-go`); te2's passes.
    let agent = start_with_cleanup(
        dir,
        broker,
        &format!(
            "[ \"$TE_NAME\" = te2 ] && exit 0\n{}\necho 'cannot wipe'; exit 1",
            wait_for("{d}/cleanup-go")
        ),
        &format!("{TE1}[[te]]\nname = \"te2\"\ndatafile = \"{{dir}}/te2.json\"\n"),
    );
    agent.wait_state("te1", EnvState::Ready);
    agent.wait_state("te2", EnvState::Ready);
    // te2 is taken by a holder that waits for `release` (te1 is held meanwhile, so which TE
    // the broker hands out first does not matter); the next client gets te1.
    agent.ctl_ok(&["hold", "te1"]);
    agent.wait_state("te1", EnvState::Held);
    let release = agent.path("release").display().to_string();
    let on_te2 = client(broker, &[], &wait_for(&release));
    agent.wait_state("te2", EnvState::Leased);
    agent.ctl_ok(&["release", "te1"]);
    agent.wait_state("te1", EnvState::Ready);
    let on_te1 = lease_ok(broker, &[], "cat \"$TE_DATAFILE\"");
    assert!(String::from_utf8_lossy(&on_te1.stdout).contains("\"env-num\":\"1\""));
    agent.wait_state("te1", EnvState::Cleaning);

    // A client waits while te1 is cleaned and te2 is leased; te1's cleanup fails.
    let waiting = client(broker, &[], "cat \"$TE_DATAFILE\"");
    wait_until("the waiting request queued", || {
        function_status(broker, "lockenv").filter(|&(queued, _, _)| queued >= 2)
    });
    std::fs::write(agent.path("cleanup-go"), "").unwrap();
    agent.wait_state("te1", EnvState::Rebuilding);
    // te2 comes free while te1 is still being rebuilt: the waiting client gets te2.
    std::fs::write(&release, "").unwrap();
    assert!(finish(on_te2).status.success());
    let out = finish(waiting);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"env-num\":\"2\""),
        "{out:?}"
    );
    assert_eq!(
        agent.status().unwrap().envs[0].state,
        EnvState::Rebuilding,
        "te1 was still being rebuilt"
    );
    std::fs::write(agent.path("rebuild-go"), "").unwrap();
    agent.wait_state("te1", EnvState::Ready);
}

#[test]
fn a_lease_that_timed_out_counts_as_a_failed_lease_and_the_te_is_rebuilt() {
    let broker = tebroker();
    let agent = Agent::rebuilt_after_one_failed_lease(broker);
    // The job asked for the TE for 2 s and runs on: the lease times out.
    let holder = Command::new(client_bin())
        .args(["-b", &broker.to_string(), "-t", "2", "--", "sleep", "600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = finish(holder);
    assert!(!out.status.success(), "{out:?}");
    agent.wait_rebuilt_after_failed_lease(broker, "the lease timed out");
}
