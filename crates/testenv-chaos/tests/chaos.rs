//! The chaos runner end to end: real tebrokers, testenv-workers and testenv-clients for 30 s
//! with a fixed seed and only client and worker kills (no broker fault, so it must pass
//! without lease resume), checked for zero violations and for faults and leases that really
//! happened.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use test_support::run_with_timeout;

const CHAOS_BIN: &str = env!("CARGO_BIN_EXE_testenv-chaos");

/// The directory of the agents and the broker, built next to this test binary (by
/// `cargo test --workspace`, or here).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    if ["tebroker", "testenv-worker", "testenv-client"]
        .iter()
        .any(|b| !dir.join(b).is_file())
    {
        let out = run_with_timeout(
            Command::new(env!("CARGO"))
                .args(["build", "-p", "tebroker", "-p", "testenv", "--bins"]),
            Duration::from_secs(900),
        );
        assert!(out.status.success(), "cannot build the agents: {out:?}");
    }
    dir
}

#[test]
fn thirty_seconds_of_client_and_worker_kills_break_no_lease() {
    let bin = bin_dir();
    let out = tempfile::tempdir().unwrap();
    let run = run_with_timeout(
        Command::new(CHAOS_BIN)
            .args(["--duration", "30s", "--seed", "8", "--netns", "off"])
            .args(["--faults", "kill-client,kill-worker", "--fault-every", "2s"])
            .arg("--bin")
            .arg(&bin)
            .arg("--out")
            .arg(out.path()),
        Duration::from_secs(300),
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "the chaos run failed ({:?}):\n{stdout}\n{stderr}",
        run.status
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap())
            .unwrap();
    assert_eq!(report["violations"], 0, "{stdout}");
    assert!(
        report["faults_by_kind"]["kill-client"].as_u64() > Some(0),
        "{stdout}"
    );
    assert!(
        report["faults_by_kind"]["kill-worker"].as_u64() > Some(0),
        "{stdout}"
    );
    assert!(report["leases"].as_u64() > Some(20), "{stdout}");
    assert!(
        report["leases_by_outcome"]["delivered"].as_u64() > Some(0),
        "{stdout}"
    );
    assert!(
        report["reclaims"].as_u64() > Some(0),
        "no holder was killed:\n{stdout}"
    );
    assert_eq!(report["tes_not_free_at_end"], 0, "{stdout}");
    // Every lease left its lines in the hold log.
    let holds = std::fs::read_to_string(out.path().join("holds.log")).unwrap();
    let starts = holds.lines().filter(|l| l.starts_with("start\t")).count() as u64;
    assert_eq!(Some(starts), report["leases"].as_u64());
}
