//! Two operator-surface promises checked through a running broker: `--history-days` purges what
//! a store holds from before (rows written into the SQLite file with tebroker-store's own API
//! before the broker starts) and keeps the recent rows; `/api/v1/workers` lists the real
//! workers on the broker — a testenv-worker and a Debian `gearman -w` — with their client ids
//! and functions.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use harness::Server;
use tebroker_store::{
    EnvState, EnvStateChange, LeaseRecord, Millis, Outcome, Priority, Record, SqliteStore, Stamped,
    Store, WaitEnd, WaitRecord,
};
use test_support::LoggedChild;

mod harness;

const DAY_MS: Millis = 24 * 3600 * 1000;

fn get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
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
    assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}\n{body}");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

fn old_lease(seq: usize, job: &str, ended_ms: Millis) -> LeaseRecord {
    LeaseRecord {
        broker: "an-earlier-broker".into(),
        lockenv_handle: format!("H:earlier:{seq}"),
        env: "testenv-worker-kept".into(),
        worker_id: "testenv-worker-kept".into(),
        callback: format!("callback_{job}"),
        job_identifier: job.into(),
        tenant: "openstack/nova".into(),
        priority: Priority::Normal,
        started_ms: ended_ms - 60_000,
        ended_ms,
        outcome: Outcome::Released,
    }
}

fn granted_wait(job: &str, ended_ms: Millis) -> WaitRecord {
    WaitRecord {
        job_identifier: job.into(),
        tenant: "openstack/nova".into(),
        priority: Priority::Normal,
        function: "lockenv".into(),
        queued_ms: ended_ms - 5_000,
        end: WaitEnd::Granted {
            at_ms: ended_ms,
            env: "testenv-worker-kept".into(),
        },
    }
}

/// The store of `data_dir` as a broker run `age_days` ago would have left it: per age one lease,
/// one wait and one TE state change, named `job-<age>d`.
fn seed_store(data_dir: &Path, ages_days: &[i64]) {
    let mut store = SqliteStore::open_dir(data_dir).expect("open the SQLite store");
    let now = tebroker_store::now_ms();
    let mut records: Vec<Record> = Vec::new();
    for (i, age) in ages_days.iter().enumerate() {
        let at = now - age * DAY_MS;
        let job = format!("job-{age}d");
        records.push(old_lease(i, &job, at).into());
        records.push(granted_wait(&job, at).into());
        records.push(
            EnvStateChange {
                env: "testenv-worker-kept".into(),
                agent: "host-a".into(),
                labels: Vec::new(),
                state: EnvState::Ready,
                since_ms: at,
                detail: format!("ready {age} days ago"),
                holder: None,
            }
            .into(),
        );
    }
    let batch: Vec<Stamped> = records
        .into_iter()
        .enumerate()
        .map(|(i, r)| Stamped::new(7, i as i64, r))
        .collect();
    store.write(&batch).expect("write the old records");
}

fn jobs_in_history(http: SocketAddr) -> Vec<String> {
    let page = get_json(http, "/api/v1/history?limit=100");
    page["leases"]
        .as_array()
        .expect("a leases array")
        .iter()
        .map(|l| l["job_identifier"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn history_days_purges_old_rows_of_the_store_at_start_and_keeps_recent_ones() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // 40 days: gone under either limit; 10 days: kept by the default 30, gone under 7 (so the
    // flag, not the default, decides); 1 day: kept.
    seed_store(&data, &[40, 10, 1]);
    {
        let mut store = SqliteStore::open_dir(&data).unwrap();
        let all = store.history(&Default::default()).unwrap();
        assert_eq!(all.leases.len(), 3, "seeded before the broker starts");
    }

    let broker = Server::tebroker_with(&[
        "--http",
        "127.0.0.1:0",
        "--data-dir",
        harness::path(&data),
        "--history-days",
        "7",
    ]);
    let http = broker.http.unwrap();
    let purged = broker.wait_log("store retention: purged");
    let line = purged
        .lines()
        .find(|l| l.contains("store retention: purged"))
        .unwrap();
    for want in ["leases=2", "waits=2", "env_states=2", "days=7"] {
        assert!(line.contains(want), "{want} in {line:?}");
    }

    assert_eq!(jobs_in_history(http), ["job-1d"], "only the recent lease");
    let env = get_json(http, "/api/v1/envs/testenv-worker-kept");
    let states: Vec<&str> = env["state_changes"]
        .as_array()
        .expect("state changes")
        .iter()
        .map(|s| s["detail"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["ready 1 days ago"], "{env}");
    assert_eq!(
        env["env"]["name"], "testenv-worker-kept",
        "the TE stays known"
    );
    drop(broker);

    // A second start with the default (30 days) purges nothing more: the recent rows stay.
    let broker =
        Server::tebroker_with(&["--http", "127.0.0.1:0", "--data-dir", harness::path(&data)]);
    let purged = broker.wait_log("store retention: purged");
    let line = purged
        .lines()
        .find(|l| l.contains("store retention: purged"))
        .unwrap();
    assert!(
        line.contains("leases=0") && line.contains("days=30"),
        "{line}"
    );
    assert_eq!(jobs_in_history(broker.http.unwrap()), ["job-1d"]);
}

/// Binary `bin` of workspace package `package`, built next to this test binary (by `cargo
/// test --workspace`, or here).
fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(bin);
    if !path.exists() {
        let out = test_support::run_with_timeout(
            Command::new(env!("CARGO")).args(["build", "-p", package, "--bin", bin]),
            Duration::from_secs(600),
        );
        assert!(out.status.success(), "cannot build {bin}: {out:?}");
    }
    path
}

const TE_DATA: &str = r#"{
  "env-num": "41",
  "host-ip": "192.0.2.41",
  "ssh-user": "root",
  "ssh-key": "WORKERS-TEST-SECRET-KEY",
  "nodes": []
}
"#;

#[test]
fn api_v1_workers_lists_a_real_testenv_worker_and_a_gearman_worker_with_their_functions() {
    let gearman = test_support::require_program("gearman");
    let dir = tempfile::tempdir().unwrap();
    let broker = Server::tebroker_with(&["--http", "127.0.0.1:0"]);
    let http = broker.http.unwrap();
    let datafile = dir.path().join("te-41.json");
    std::fs::write(&datafile, TE_DATA).unwrap();

    let _testenv_worker = LoggedChild::spawn(
        "testenv-worker",
        Command::new(workspace_bin("testenv", "testenv-worker"))
            .args(["-b", &format!("127.0.0.1:{}", broker.port), "-n", "41"])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg(&datafile)
            .env_remove("RUST_LOG"),
    );
    let _gearman_worker = LoggedChild::spawn(
        "gearman -w",
        Command::new(gearman).args([
            "-w",
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-f",
            "resize_image",
            "-f",
            "reverse",
            "--",
            "cat",
        ]),
    );

    let workers = test_support::wait_until("both workers in /api/v1/workers", || {
        let rows = get_json(http, "/api/v1/workers");
        let rows = rows.as_array().expect("an array of connections").clone();
        let registered = |f: &str| {
            rows.iter().any(|r| {
                r["functions"]
                    .as_array()
                    .is_some_and(|fs| fs.iter().any(|x| x == f))
            })
        };
        (registered("lockenv") && registered("reverse")).then_some(rows)
    });
    let with = |f: &str| {
        workers
            .iter()
            .find(|r| r["functions"].as_array().unwrap().iter().any(|x| x == f))
            .unwrap()
    };
    let te = with("lockenv");
    assert_eq!(te["client_id"], "testenv-worker-41", "{te}");
    assert_eq!(te["functions"], serde_json::json!(["lockenv"]), "{te}");
    assert_eq!(te["running_jobs"], 0, "{te}");
    // The peer's address only, as gearmand's `workers` shows it.
    assert_eq!(te["peer"], "127.0.0.1", "{te}");
    let tool = with("reverse");
    let mut functions: Vec<&str> = tool["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    functions.sort_unstable();
    assert_eq!(functions, ["resize_image", "reverse"], "{tool}");
    // libgearman's worker sends no client id: shown as `-`, as gearmand does.
    assert_eq!(tool["client_id"], "-", "{tool}");
    assert_eq!(tool["peer"], "127.0.0.1", "{tool}");
    assert_ne!(te["id"], tool["id"], "two connections");
    let text = serde_json::to_string(&workers).unwrap();
    assert!(
        !text.contains("WORKERS-TEST-SECRET-KEY"),
        "no TE secret: {text}"
    );
}

/// `--history-days 0` purged the whole history at start and every hour (the cutoff was "now");
/// it is refused now, and the store keeps its rows.
#[test]
fn history_days_zero_is_refused_and_the_store_keeps_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    seed_store(&data, &[1]);
    let out = test_support::run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_tebroker"))
            .args(["serve", "-p", "0", "-L", "127.0.0.1", "--data-dir"])
            .arg(&data)
            .args(["--history-days", "0"])
            .env("RUST_LOG", "info"),
        Duration::from_secs(10),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "tebroker ran: {err}");
    assert!(err.contains("--history-days"), "a clear error: {err}");
    assert!(!err.contains("store retention: purged"), "{err}");
    let mut store = SqliteStore::open_dir(&data).unwrap();
    assert_eq!(store.history(&Default::default()).unwrap().leases.len(), 1);
}
