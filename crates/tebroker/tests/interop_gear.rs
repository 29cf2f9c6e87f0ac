//! Interoperability with PyPI `gear` (the library the original testenv agents use): its Client
//! and Worker, driven by `tests/py/gear_interop.py`, against a real tebroker process.
//!
//! Each test runs one scenario of the script; the script checks what gear observes and exits
//! non-zero with a `FAIL <scenario>: ...` line on the first mismatch. Needs `python3` with `gear`
//! (scripts/install-peers.sh); `TEBROKER_TEST_PYTHON` overrides the interpreter.

mod harness;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use harness::{run_with_timeout, Kind, Server};

fn python() -> String {
    std::env::var("TEBROKER_TEST_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/gear_interop.py")
}

fn require_gear() {
    let out = Command::new(python())
        .args(["-c", "import gear"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python()));
    assert!(
        out.status.success(),
        "PyPI gear is not importable by {}; run scripts/install-peers.sh\n{}",
        python(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the scenarios against `server`; panics with the script's output on failure.
fn run_scenarios(server: &mut Server, scenarios: &[&str]) {
    require_gear();
    let out = run_with_timeout(
        Command::new(python())
            .arg(script())
            .args(["--host", "127.0.0.1", "--port", &server.port.to_string()])
            .args(scenarios),
        Duration::from_secs(30 + 15 * scenarios.len() as u64),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if server.kind == Kind::Tebroker {
        server.assert_alive();
    }
    assert!(
        out.status.success(),
        "gear scenario(s) {scenarios:?} against {:?} failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        server.kind,
        out.status
    );
    for s in scenarios {
        assert!(
            stdout.lines().any(|l| l.starts_with(&format!("PASS {s} "))),
            "no PASS line for {s}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        );
    }
    assert_eq!(stdout.lines().last(), Some("OK"), "stdout: {stdout}");
}

fn against_tebroker(scenario: &str) {
    let mut server = Server::tebroker();
    run_scenarios(&mut server, &[scenario]);
    server.assert_alive();
    server.assert_no_panic_in_log();
}

#[test]
fn gear_foreground_jobs_echo_and_binary_payloads() {
    against_tebroker("foreground");
}

#[test]
fn gear_background_jobs() {
    against_tebroker("background");
}

#[test]
fn gear_priorities_and_fifo() {
    against_tebroker("priority");
}

#[test]
fn gear_work_data_status_warning_passthrough() {
    against_tebroker("data_status");
}

#[test]
fn gear_exceptions_option_and_work_fail() {
    against_tebroker("exceptions");
}

#[test]
fn gear_unique_jobs_coalesce() {
    against_tebroker("unique");
}

#[test]
fn gear_get_status() {
    against_tebroker("get_status");
}

#[test]
fn gear_admin_status_and_workers() {
    against_tebroker("admin_status_workers");
}

#[test]
fn gear_admin_show_jobs_unique_version_cancel() {
    against_tebroker("admin_jobs");
}

#[test]
fn gear_worker_disconnect_fails_foreground_job() {
    against_tebroker("worker_disconnect_fg");
}

#[test]
fn gear_worker_disconnect_requeues_background_job_at_head() {
    against_tebroker("worker_disconnect_bg");
}

#[test]
fn gear_client_disconnect_drops_queued_and_discards_running() {
    against_tebroker("client_disconnect");
}

#[test]
fn gear_can_do_timeout_fails_the_job() {
    against_tebroker("can_do_timeout");
}

/// The scenarios whose rules gearmand shares, run against gearmand: if this fails the script or
/// the installed peers are wrong, not tebroker.
#[test]
fn gear_scenarios_hold_against_gearmand_baseline() {
    let mut server = Server::gearmand();
    run_scenarios(
        &mut server,
        &[
            "foreground",
            "background",
            "priority",
            "data_status",
            "exceptions",
            "unique",
            "get_status",
            "admin_status_workers",
        ],
    );
}
