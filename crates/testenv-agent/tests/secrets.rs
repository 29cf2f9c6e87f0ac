//! No secret from TE data (the example datafiles' SSH key and power-management passwords) nor
//! the client's `--ssh-key` reaches any log, API answer, page, report, admin answer or store row,
//! with every party logging at debug level: the real tebroker binary (with `--http` and its SQLite
//! store), the real testenv-agent, the real testenv-client.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use common::*;
use test_support::wait_until;
use testenv_proto::agent::EnvState;

/// The repository's demo datafile, the same as the shared example TE data: its `ssh-key` and
/// every node's `pm_password` are the secrets.
const DATAFILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../demo/testenv-1.json");
const CLIENT_KEY: &str = "ssh-rsa CLIENT-PUBLIC-KEY-OF-THE-JOB";

fn secrets() -> Vec<String> {
    let data: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DATAFILE).unwrap()).unwrap();
    let key = data["ssh-key"].as_str().unwrap().to_string();
    let mut secrets: Vec<String> = key
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::to_string)
        .collect();
    secrets.push(key);
    for node in data["nodes"].as_array().unwrap() {
        secrets.push(node["pm_password"].as_str().unwrap().to_string());
    }
    secrets.push(CLIENT_KEY.to_string());
    assert!(secrets.len() >= 3, "{secrets:?}");
    secrets
}

fn assert_no_secret(what: &str, text: &str) {
    for s in secrets() {
        assert!(!text.contains(&s), "{what} holds the secret {s:?}:\n{text}");
    }
}

/// One HTTP GET; (status, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    (
        head.split_whitespace().nth(1).unwrap().parse().unwrap(),
        body.to_string(),
    )
}

const PAGES: &[&str] = &[
    "/",
    "/metrics",
    "/api/v1/envs",
    "/api/v1/envs/te1",
    "/api/v1/leases",
    "/api/v1/queue",
    "/api/v1/workers",
    "/api/v1/history",
    "/api/v1/stats",
    "/api/v1/charts",
    "/api/leases",
    "/api/history",
    "/api/status",
    "/api/connections",
];

/// Every HTTP answer, admin answer and the agent's own status, checked for secrets.
fn check_every_answer(http: SocketAddr, broker: SocketAddr, agent: &Agent, when: &str) {
    for path in PAGES {
        let (code, body) = get(http, path);
        assert_eq!(code, 200, "{when}: {path}: {body}");
        assert_no_secret(&format!("{when}: {path}"), &body);
    }
    for command in ["envs", "leases", "status", "workers", "stats"] {
        let answer = test_support::admin(broker, command).join("\n");
        assert_no_secret(&format!("{when}: admin {command}"), &answer);
    }
    let status = agent.ctl(&["status", "--json"]);
    assert!(status.status.success(), "{status:?}");
    assert_no_secret(
        &format!("{when}: ctl status --json"),
        &String::from_utf8_lossy(&status.stdout),
    );
}

/// Every file of the store (the database and its WAL), as text.
fn store_bytes(data_dir: &Path) -> String {
    let mut all = String::new();
    for entry in std::fs::read_dir(data_dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        all.push_str(&String::from_utf8_lossy(&bytes));
    }
    all
}

#[test]
fn no_te_secret_reaches_a_log_an_answer_a_page_or_the_store() {
    let work = tempfile::tempdir().unwrap();
    let data_dir = work.path().join("data");
    let (mut broker, addr, http) = tebroker_process(&data_dir);

    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(DATAFILE, dir.path().join("te1.json")).unwrap();
    let agent = Agent::start_in_with(
        dir,
        addr,
        &format!(
            r#"
[hooks]
health = "test -r \"$TE_DATAFILE\""
cleanup = "true"
[policy]
hold_on_failure = "1h"
{TE1}"#
        ),
        &["-d"],
    );
    agent.wait_state("te1", EnvState::Ready);

    // A job holds te1 (its TE data in hand) while every answer is read, then fails, so the TE
    // is autoheld with the job's identifier.
    let go = agent.path("go");
    let job = client(
        addr,
        &["-d", "--ssh-key", CLIENT_KEY],
        &format!(
            "grep -q pm_password \"$TE_DATAFILE\" || exit 9; \
             while [ ! -e {} ]; do sleep 0.05; done; exit 1",
            go.display()
        ),
    );
    agent.wait_state("te1", EnvState::Leased);
    wait_until("the lease in /api/v1/leases", || {
        get(http, "/api/v1/leases").1.contains("te1").then_some(())
    });
    check_every_answer(http, addr, &agent, "during the lease");

    std::fs::write(&go, "").unwrap();
    let out = finish(job);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let held = agent.wait_state("te1", EnvState::Held);
    assert!(held.holder.is_some(), "{held:?}");
    wait_until("the lease in the store's history", || {
        let (_, body) = get(http, "/api/v1/history");
        body.contains("\"env\":\"te1\"").then_some(())
    });
    wait_until("te1 held in the store's inventory", || {
        let (_, body) = get(http, "/api/v1/envs/te1");
        body.contains("held").then_some(())
    });
    check_every_answer(http, addr, &agent, "after the lease");

    // Everything was logged at debug level; none of it holds a secret.
    assert!(agent.log().contains("lease"), "{}", agent.log());
    assert_no_secret("the agent's log", &agent.log());
    assert_no_secret(
        "the client's output",
        &format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    );
    assert_no_secret("the store", &store_bytes(&data_dir));
    drop(agent);
    broker.kill();
    assert!(broker.log_text().contains("DEBUG"), "{}", broker.log_text());
    assert_no_secret("tebroker's log", &broker.log_text());
}
