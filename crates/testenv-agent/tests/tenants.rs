//! End-to-end: testenv-client's `--tenant` and its `$ZUUL_PROJECT` default reach tebroker,
//! which serves equal-priority lock requests of two tenants in turn. Real tebroker, real
//! agent with one TE, real clients; the order of leases is the order their commands ran.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::*;
use test_support::wait_until;
use testenv_proto::agent::EnvState;

/// A testenv-client whose COMMAND appends `name` to `log`; `tenant` is how it names its
/// tenant (the environment or the flag).
fn tenant_client(broker: SocketAddr, tenant: Tenant, name: &str, log: &Path) -> Child {
    let mut cmd = Command::new(client_bin());
    cmd.args(["-b", &broker.to_string(), "-t", "300"])
        .env_remove("ZUUL_PROJECT");
    match tenant {
        Tenant::Env(t) => {
            cmd.env("ZUUL_PROJECT", t);
        }
        Tenant::Flag(t) => {
            cmd.args(["--tenant", t]);
        }
    }
    cmd.args(["--", "sh", "-c"])
        .arg(format!("echo {name} >> {}", log.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[derive(Clone, Copy)]
enum Tenant {
    Env(&'static str),
    Flag(&'static str),
}

/// lockenv jobs the broker has, queued or running.
fn lock_jobs(broker: SocketAddr) -> u64 {
    function_status(broker, "lockenv").map_or(0, |(total, _, _)| total)
}

#[test]
fn two_tenants_at_equal_priority_are_served_in_turn() {
    let broker = tebroker();
    let agent = Agent::te1(broker, "");
    agent.wait_state("te1", EnvState::Ready);
    let release = agent.path("release");
    let holder = hold_until(broker, &release);
    agent.wait_state("te1", EnvState::Leased);
    let base = wait_until("the holder's lock request", || {
        Some(lock_jobs(broker)).filter(|&n| n >= 1)
    });

    // Tenant a (by $ZUUL_PROJECT) asks twice, then tenant b (by --tenant) twice, each request
    // queued before the next is made.
    let log = agent.path("order.log");
    let mut waiting = Vec::new();
    for (tenant, name) in [
        (Tenant::Env("proj-a"), "a1"),
        (Tenant::Env("proj-a"), "a2"),
        (Tenant::Flag("proj-b"), "b1"),
        (Tenant::Flag("proj-b"), "b2"),
    ] {
        waiting.push(tenant_client(broker, tenant, name, &log));
        let want = base + waiting.len() as u64;
        wait_until(&format!("{name}'s request queued"), || {
            Some(lock_jobs(broker)).filter(|&n| n >= want)
        });
    }
    std::fs::write(&release, "").unwrap();
    assert!(finish(holder).status.success());
    for child in waiting {
        let out = finish(child);
        assert!(out.status.success(), "{out:?}");
    }
    // First come first served would run a1 a2 b1 b2.
    let order = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        order.split_whitespace().collect::<Vec<_>>(),
        ["a1", "b1", "a2", "b2"],
        "agent log:\n{}",
        agent.log()
    );
}
