//! The agents over TLS: a tebroker requiring client certificates, a worker and a client that
//! present theirs (the same `--ssl-cert/--ssl-key/--ssl-ca` options gear's addServer takes).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use test_support::{Files, KillOnDrop, Pki};

/// A TLS tebroker in this process, on its own runtime thread.
fn start_tls_broker(pki: &Pki) -> String {
    let Files { cert, key } = pki.issue("broker");
    let settings = tebroker::config::Settings {
        port: 0,
        listen: "127.0.0.1".into(),
        tls: Some(tebroker::tls::TlsFiles {
            cert,
            key,
            ca: Some(pki.ca()),
        }),
        ..tebroker::config::Settings::default()
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let server = tebroker::server::Server::bind(settings).await.unwrap();
            tx.send(server.local_addr().unwrap().to_string()).unwrap();
            server.run().await.unwrap();
        });
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap()
}

fn tls_args(pki: &Pki, cn: &str) -> Vec<String> {
    let Files { cert, key } = pki.issue(cn);
    let p = |p: &Path| p.to_str().unwrap().to_string();
    vec![
        "--ssl-cert".into(),
        p(&cert),
        "--ssl-key".into(),
        p(&key),
        "--ssl-ca".into(),
        p(&pki.ca()),
    ]
}

/// A testenv-worker over TLS offering `datafile` as TE "tls-te".
fn tls_worker(pki: &Pki, addr: &str, state: &Path, datafile: &Path) -> KillOnDrop {
    KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_testenv-worker"))
            .args(["-b", addr, "-n", "tls-te", "--state-dir"])
            .arg(state)
            .args(tls_args(pki, "te-worker"))
            .arg(datafile)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

#[test]
fn agents_lease_a_te_over_tls_with_client_certificates() {
    let pki = Pki::new("testenv-ca");
    let addr = start_tls_broker(&pki);
    let state = tempfile::tempdir().unwrap();
    let datafile = state.path().join("te.json");
    std::fs::write(&datafile, r#"{"env-num": "7", "ssh-key": "SECRET"}"#).unwrap();
    let _worker = tls_worker(&pki, &addr, state.path(), &datafile);
    let out = Command::new(env!("CARGO_BIN_EXE_testenv-client"))
        .args(["-b", &addr, "-t", "30"])
        .args(tls_args(&pki, "ci-job"))
        .args([
            "--",
            "sh",
            "-c",
            "grep -o '\"env-num\": \"7\"' \"$TE_DATAFILE\"",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "\"env-num\": \"7\""
    );
}

#[test]
fn a_client_that_does_not_trust_the_broker_gets_no_te() {
    let pki = Pki::new("real-ca");
    let addr = start_tls_broker(&pki);
    let impostor = Pki::new("other-ca");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_testenv-client"))
        .args(["-b", &addr, "-t", "3"])
        .args(tls_args(&impostor, "ci-job"))
        .args(["--", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "gave up in bounded time"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broker") || err.contains("TLS") || err.contains("certificate"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_testenv-client"))
        .args(["-b", &addr, "--ssl-cert", "/nonexistent.crt", "--", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ssl-cert and --ssl-key go together"));
}

/// The queue position is asked over the same TLS connection settings as the jobs.
#[test]
fn a_waiting_client_reports_its_queue_position_over_tls() {
    let pki = Pki::new("testenv-ca");
    let addr = start_tls_broker(&pki);
    let state = tempfile::tempdir().unwrap();
    let datafile = state.path().join("te.json");
    std::fs::write(&datafile, r#"{"env-num": "7"}"#).unwrap();
    let _worker = tls_worker(&pki, &addr, state.path(), &datafile);
    let held = state.path().join("held");
    let _holder = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_testenv-client"))
            .args(["-b", &addr, "-t", "60"])
            .args(tls_args(&pki, "holder"))
            .arg("--")
            .args(["sh", "-c", &format!("touch {}; sleep 1000", held.display())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !held.exists() {
        assert!(Instant::now() < deadline, "the holder never got the TE");
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = state.path().join("waiter.log");
    let _waiter = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_testenv-client"))
            .args(["-b", &addr, "-t", "60", "--report-interval", "0.3"])
            .args(tls_args(&pki, "waiter"))
            .args(["--", "true"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    loop {
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        if out.contains("(position 1 of 1 in the queue)") {
            break;
        }
        assert!(Instant::now() < deadline, "no position line:\n{out}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
