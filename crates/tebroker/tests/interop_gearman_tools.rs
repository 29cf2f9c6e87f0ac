//! Interoperability with Debian `gearman-tools`: the `gearman` CLI as worker and client, and
//! `gearadmin` reading tebroker's admin output. Needs scripts/install-peers.sh.
//!
//! Every check runs against tebroker; `gearman_tools_baseline_against_gearmand` runs the same
//! checks against gearmand to prove the expectations are gearmand's.

mod harness;

use std::process::{Command, Stdio};
use std::time::Duration;

use gearman_proto::PacketType;
use harness::{
    parse_status, require_program, run_with_timeout, wait_until, Conn, KillOnDrop, Server,
};

const RUN: Duration = Duration::from_secs(15);

fn gearman() -> std::path::PathBuf {
    require_program("gearman")
}

fn gearadmin(server: &Server, args: &[&str]) -> String {
    let bin = require_program("gearadmin");
    let out = run_with_timeout(
        Command::new(bin)
            .args(["-h", "127.0.0.1", "-p", &server.port.to_string()])
            .args(args),
        RUN,
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "gearadmin {args:?} failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `gearman -w -f FUNC -- rev`, once the server lists it as a worker of FUNC.
fn start_rev_worker(server: &Server, func: &str) -> KillOnDrop {
    let child = Command::new(gearman())
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &server.port.to_string(),
            "-w",
            "-f",
            func,
            "--",
            "rev",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn gearman -w");
    let mut worker = KillOnDrop(child);
    wait_until(&format!("`status` to list one worker for {func}"), || {
        if let Some(st) = worker.try_status() {
            panic!("gearman -w exited: {st}");
        }
        let status = parse_status(&server.admin_block("status"));
        status
            .iter()
            .any(|row| row.function == func && row.workers >= 1)
            .then_some(())
    });
    worker
}

/// Queues a background job through a raw connection and returns its handle.
fn queue_background(server: &Server, func: &str, unique: &str, data: &str) -> String {
    let mut c = Conn::connect(server.port);
    c.req(PacketType::SubmitJobBg, &[func, unique, data]);
    let p = c.expect(PacketType::JobCreated);
    String::from_utf8(p.arg(0).to_vec()).expect("utf-8 handle")
}

fn lines_of(out: &str) -> Vec<&str> {
    out.lines().collect()
}

fn check_rev_round_trip(server: &Server) {
    let _worker = start_rev_worker(server, "rev");
    for (input, want) in [("hello", "olleh"), ("tebroker", "rekorbet")] {
        let out = run_with_timeout(
            Command::new(gearman()).args([
                "-h",
                "127.0.0.1",
                "-p",
                &server.port.to_string(),
                "-f",
                "rev",
                input,
            ]),
            RUN,
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "gearman -f rev {input} failed ({}): {stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            stdout.trim_end_matches('\n'),
            want,
            "gearman -f rev {input}"
        );
    }
}

fn check_status(server: &Server) {
    let _worker = start_rev_worker(server, "rev");
    queue_background(server, "queued", "", "one");
    queue_background(server, "queued", "", "two");
    let out = gearadmin(server, &["--status"]);
    let lines = lines_of(&out);
    assert_eq!(
        lines.last(),
        Some(&"."),
        "gearadmin --status output:\n{out}"
    );
    assert!(lines.contains(&"rev\t0\t0\t1"), "rev line in:\n{out}");
    assert!(lines.contains(&"queued\t2\t0\t0"), "queued line in:\n{out}");
}

fn check_workers(server: &Server) {
    let _worker = start_rev_worker(server, "rev");
    let mut idle = Conn::connect(server.port);
    idle.req(PacketType::SetClientId, &["tools-test-client"]);
    idle.req(PacketType::CanDo, &["alpha"]);
    idle.req(PacketType::CanDo, &["beta"]);
    idle.echo(b"sync");
    let out = gearadmin(server, &["--workers"]);
    let lines = lines_of(&out);
    assert_eq!(
        lines.last(),
        Some(&"."),
        "gearadmin --workers output:\n{out}"
    );
    let parsed: Vec<(Vec<&str>, Vec<&str>)> = lines[..lines.len() - 1]
        .iter()
        .map(|l| {
            let (left, right) = l
                .split_once(" :")
                .unwrap_or_else(|| panic!("workers line without ' :' in {l:?}\n{out}"));
            let left: Vec<&str> = left.split(' ').collect();
            assert_eq!(left.len(), 3, "'FD IP CLIENT-ID' before ':' in {l:?}");
            assert_eq!(left[1], "127.0.0.1", "address in {l:?}");
            let mut funcs: Vec<&str> = right.split_whitespace().collect();
            funcs.sort();
            (left, funcs)
        })
        .collect();
    assert!(
        parsed.iter().any(|(_, f)| f == &["rev"]),
        "no worker line for the gearman -w worker (functions: rev) in:\n{out}"
    );
    assert!(
        parsed
            .iter()
            .any(|(l, f)| l[2] == "tools-test-client" && f == &["alpha", "beta"]),
        "no line `FD 127.0.0.1 tools-test-client : alpha beta` in:\n{out}"
    );
}

fn check_show_jobs(server: &Server) {
    let h1 = queue_background(server, "showme", "uniq-one", "1");
    let h2 = queue_background(server, "showme", "", "2");
    let out = gearadmin(server, &["--show-jobs"]);
    let lines = lines_of(&out);
    assert_eq!(
        lines.last(),
        Some(&"."),
        "gearadmin --show-jobs output:\n{out}"
    );
    for h in [&h1, &h2] {
        // HANDLE, retries, ignore-job, queued: gearmand's columns.
        let want = format!("{h}\t0\t0\t1");
        assert!(
            lines.contains(&want.as_str()),
            "no line {want:?} in:\n{out}"
        );
    }
    let out = gearadmin(server, &["--show-unique-jobs"]);
    let lines = lines_of(&out);
    assert_eq!(
        lines.last(),
        Some(&"."),
        "gearadmin --show-unique-jobs output:\n{out}"
    );
    assert!(lines.contains(&"uniq-one"), "uniq-one missing from:\n{out}");
}

fn check_getpid(server: &Server) {
    let out = gearadmin(server, &["--getpid"]);
    assert_eq!(out.trim(), server.pid().to_string(), "gearadmin --getpid");
}

fn check_priority_status(server: &Server) {
    let mut c = Conn::connect(server.port);
    for (t, d) in [
        (PacketType::SubmitJobHighBg, "h"),
        (PacketType::SubmitJobBg, "n1"),
        (PacketType::SubmitJobBg, "n2"),
        (PacketType::SubmitJobLowBg, "l"),
    ] {
        c.req(t, &["prio", "", d]);
        c.expect(PacketType::JobCreated);
    }
    let out = gearadmin(server, &["--priority-status"]);
    let lines = lines_of(&out);
    assert_eq!(
        lines.last(),
        Some(&"."),
        "gearadmin --priority-status output:\n{out}"
    );
    // FUNCTION, high, normal, low, workers.
    assert!(lines.contains(&"prio\t1\t2\t1\t0"), "prio line in:\n{out}");
}

fn check_server_version(server: &Server) {
    let out = gearadmin(server, &["--server-version"]);
    assert!(
        !out.trim().is_empty() && !out.starts_with("ERR"),
        "gearadmin --server-version: {out:?}"
    );
}

#[test]
fn gearman_cli_worker_reverses_for_gearman_cli_client() {
    check_rev_round_trip(&Server::tebroker());
}

#[test]
fn gearadmin_status() {
    check_status(&Server::tebroker());
}

#[test]
fn gearadmin_workers() {
    check_workers(&Server::tebroker());
}

#[test]
fn gearadmin_show_jobs_and_unique_jobs() {
    check_show_jobs(&Server::tebroker());
}

#[test]
fn gearadmin_getpid_is_the_child_pid() {
    check_getpid(&Server::tebroker());
}

#[test]
fn gearadmin_priority_status_and_version() {
    let server = Server::tebroker();
    check_priority_status(&server);
    check_server_version(&server);
}

#[test]
fn gearadmin_cancel_job() {
    let server = Server::tebroker();
    let h = queue_background(&server, "cancelme", "", "x");
    let keep = queue_background(&server, "cancelme", "", "y");
    let out = gearadmin(&server, &["--cancel-job", &h]);
    assert!(!out.contains("ERR"), "gearadmin --cancel-job {h}: {out:?}");
    let status = parse_status(&server.admin_block("status"));
    assert!(
        status
            .iter()
            .any(|s| s.function == "cancelme" && (s.total, s.running, s.workers) == (1, 0, 0)),
        "after cancelling one of two jobs: {status:?}"
    );
    let jobs = server.admin_block("show jobs");
    assert!(
        !jobs.iter().any(|l| l.starts_with(&format!("{h}\t"))),
        "{jobs:?}"
    );
    assert!(
        jobs.iter().any(|l| l.starts_with(&format!("{keep}\t"))),
        "{jobs:?}"
    );
}

#[test]
fn gearman_tools_baseline_against_gearmand() {
    let server = Server::gearmand();
    check_rev_round_trip(&server);
    check_status(&server);
    check_workers(&server);
    check_show_jobs(&server);
    check_getpid(&server);
    check_priority_status(&server);
    check_server_version(&server);
}
