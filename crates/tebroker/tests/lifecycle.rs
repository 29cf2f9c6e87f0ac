//! The broker's life, with the real binary: graceful shutdown (drain, `--shutdown-timeout`,
//! the history file written to the end), SIGHUP reload of the ACL and TLS files, a panic in
//! the core ending the process, `/healthz` telling a stuck core, history-file write errors.

mod harness;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use gearman_proto::PacketType as T;
use harness::{path, tls_connect, wait_until, Pki, Server, Stream, TIMEOUT};
use test_support::parse_status;

/// A TE worker holding a lease: it registered `lockenv` and was assigned a lockenv job.
struct Lease {
    worker: Stream<TcpStream>,
    _client: Stream<TcpStream>,
    handle: Vec<u8>,
}

fn lease(broker: &Server, callback: &str) -> Lease {
    let mut worker = broker.connect();
    worker.send(T::SetClientId, &[b"te-worker"]);
    worker.send(T::CanDo, &[b"lockenv"]);
    let mut client = broker.connect();
    let request = format!(r#"{{"callback_name": "{callback}", "timeout": "600"}}"#);
    client.send(T::SubmitJob, &[b"lockenv", b"", request.as_bytes()]);
    assert_eq!(client.recv().ptype, T::JobCreated);
    let assign = worker.grab_assignment();
    Lease {
        handle: assign.arg(0).to_vec(),
        worker,
        _client: client,
    }
}

fn history_lines(file: &Path, want: usize) -> Vec<serde_json::Value> {
    wait_until(&format!("{want} line(s) in the history file"), || {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (lines.len() >= want).then_some(lines)
    })
}

fn refuses_connections(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err()
}

#[test]
fn graceful_shutdown_waits_for_running_jobs_only() {
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("leases.jsonl");
    let mut broker =
        Server::tebroker_with(&["--history-file", path(&history), "--shutdown-timeout", "30"]);
    let mut held = lease(&broker, "callback_1");
    // Queued with no worker: must not hold the shutdown up.
    let mut submitter = broker.connect();
    submitter.send(T::SubmitJobBg, &[b"nobody-works-this", b"", b"x"]);
    assert_eq!(submitter.recv().ptype, T::JobCreated);
    let mut idle_worker = broker.connect();
    idle_worker.send(T::CanDo, &[b"nobody-works-this-either"]);
    idle_worker.send(T::EchoReq, &[b"sync"]);
    assert_eq!(idle_worker.recv().ptype, T::EchoRes);

    assert_eq!(broker.connect().admin("shutdown graceful"), "OK\n");
    wait_until("the listener to close", || {
        refuses_connections(broker.addr()).then_some(())
    });
    // No new work is handed out: the queued job stays with the broker.
    idle_worker.send(T::CanDo, &[b"nobody-works-this"]);
    idle_worker.send(T::GrabJob, &[]);
    assert_eq!(idle_worker.recv().ptype, T::NoJob);
    // Nor accepted.
    submitter.send(T::SubmitJob, &[b"nobody-works-this", b"", b"y"]);
    let refused = submitter.recv();
    assert_eq!(refused.ptype, T::Error, "{refused:?}");
    assert!(broker.alive(), "the running lease keeps the broker up");

    // The running job ends: the broker exits, and the lease is in the history file.
    held.worker.send(T::WorkComplete, &[&held.handle, b""]);
    let status = broker.wait_exit(TIMEOUT);
    assert!(status.success(), "{status}\n{}", broker.log_text());
    let lines = history_lines(&history, 1);
    assert_eq!(lines[0]["outcome"], "released");
    assert_eq!(lines[0]["callback"], "callback_1");
}

#[test]
fn graceful_shutdown_gives_up_after_the_timeout_and_records_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("leases.jsonl");
    let mut broker =
        Server::tebroker_with(&["--history-file", path(&history), "--shutdown-timeout", "1"]);
    let _held = lease(&broker, "callback_9");
    assert_eq!(broker.connect().admin("shutdown graceful"), "OK\n");
    let status = broker.wait_exit(TIMEOUT);
    assert!(status.success(), "{status}");
    broker.wait_log("shutdown timeout reached");
    // Ended by the shutdown itself: still written out before the process exited.
    let text = std::fs::read_to_string(&history).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let entry: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(entry["callback"], "callback_9");
    assert_eq!(entry["outcome"], "worker lost");
}

#[test]
fn shutdown_timeout_from_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tebroker.toml");
    std::fs::write(&config, "shutdown_timeout = 1\n").unwrap();
    let mut broker = Server::tebroker_with(&["--config", path(&config)]);
    let _held = lease(&broker, "callback_2");
    assert_eq!(broker.connect().admin("shutdown graceful"), "OK\n");
    assert!(broker.wait_exit(TIMEOUT).success());
    broker.wait_log("shutdown timeout reached");
}

const ACL_BEFORE: &str = "[alice]\nregister = one\n";
const ACL_AFTER: &str = "[alice]\nregister = two\n";

/// Whether a CAN_DO `f` on `conn` is accepted (the ACL lets it register `f`).
fn registers(
    conn: &mut Stream<harness::TlsStream>,
    admin: &mut Stream<harness::TlsStream>,
    f: &str,
) -> bool {
    let workers = |admin: &mut Stream<harness::TlsStream>| {
        let lines: Vec<String> = admin.admin("status").lines().map(str::to_string).collect();
        let rows = parse_status(&lines[..lines.len() - 1]);
        rows.iter()
            .find(|r| r.function == f)
            .map_or(0, |r| r.workers)
    };
    let before = workers(admin);
    conn.send(T::CanDo, &[f.as_bytes()]);
    conn.send(T::EchoReq, &[b"sync"]);
    assert_eq!(conn.recv().ptype, T::EchoRes);
    workers(admin) == before + 1
}

#[test]
fn sighup_reloads_acl_and_certificate_and_keeps_connections() {
    let pki = Pki::new("reload CA");
    let server = pki.issue("localhost");
    let alice = pki.issue("alice");
    let acl = pki.dir.path().join("acl.ini");
    std::fs::write(&acl, ACL_BEFORE).unwrap();
    let mut broker =
        Server::tebroker_with(&harness::strs(&harness::tls_acl_args(&server, &pki, &acl)));
    let mut old = tls_connect(broker.addr(), &pki.ca(), Some(&alice));
    let mut admin = tls_connect(broker.addr(), &pki.ca(), Some(&alice));
    assert!(registers(&mut old, &mut admin, "one"));
    let first_cert = old.stream.conn.peer_certificates().unwrap()[0].to_vec();

    // New rules and a new server certificate, then SIGHUP.
    std::fs::write(&acl, ACL_AFTER).unwrap();
    // Issuing "localhost" again rewrites the same two files with a new key and certificate.
    let renewed = pki.issue("localhost");
    assert_eq!(renewed.cert, server.cert);
    broker.signal(libc::SIGHUP);
    let log = broker.wait_log("TLS certificate reloaded");
    assert!(log.contains("ACL reloaded"), "{log}");
    assert!(log.contains("two"), "the log names the new rule:\n{log}");

    assert!(
        broker.alive(),
        "SIGHUP must not stop the broker:\n{}",
        broker.log_text()
    );
    // The old connection is still served, under the new rules.
    old.send(T::EchoReq, &[b"still here"]);
    assert_eq!(old.recv().arg(0), b"still here");
    assert!(
        registers(&mut old, &mut admin, "two"),
        "the new ACL applies"
    );
    let mut fresh = tls_connect(broker.addr(), &pki.ca(), Some(&alice));
    assert!(!registers(&mut fresh, &mut admin, "three"));
    let new_cert = fresh.stream.conn.peer_certificates().unwrap()[0].to_vec();
    assert_ne!(
        new_cert, first_cert,
        "new connections get the renewed certificate"
    );
    assert_eq!(
        new_cert,
        std::fs::read(&renewed.cert)
            .map(|pem| {
                rustls_pemfile::certs(&mut &pem[..])
                    .next()
                    .unwrap()
                    .unwrap()
                    .to_vec()
            })
            .unwrap()
    );

    // A broken file is reported and the rules in force stay.
    std::fs::write(&acl, "[alice\nregister = x\n").unwrap();
    broker.signal(libc::SIGHUP);
    broker.wait_log("ACL reload failed; keeping the ACL in force");
    assert!(registers(&mut fresh, &mut admin, "two"));
    assert!(broker.alive());
    let mut last = tls_connect(broker.addr(), &pki.ca(), Some(&alice));
    last.send(T::EchoReq, &[b"ok"]);
    assert_eq!(last.recv().ptype, T::EchoRes);
}

#[test]
fn sighup_without_acl_or_tls_keeps_serving() {
    let mut broker = Server::tebroker_with(&[]);
    let mut before = broker.connect();
    broker.signal(libc::SIGHUP);
    broker.wait_log("SIGHUP: reloading");
    before.send(T::EchoReq, &[b"x"]);
    assert_eq!(before.recv().ptype, T::EchoRes);
    broker.assert_serving();
}

const FAULTS: (&str, &str) = ("TEBROKER_FAULT_INJECTION", "1");

#[test]
fn a_panic_in_the_core_ends_the_process() {
    let mut broker = Server::tebroker_env(&[], &[FAULTS]);
    let mut c = broker.connect();
    c.raw(b"debug panic\n").unwrap();
    let status = broker.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(101), "{status}");
    let log = broker.log_text();
    assert!(log.contains("deliberate panic"), "{log}");
    assert!(
        log.contains("internal error (panic") && log.contains("exiting with status 101"),
        "{log}"
    );
}

#[test]
fn faults_are_not_injected_unless_asked_for() {
    let mut broker = Server::tebroker_with(&[]);
    let answer = broker.connect().admin("debug panic");
    assert!(answer.starts_with("ERR"), "{answer}");
    broker.assert_serving();
}

fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

#[test]
fn healthz_fails_while_the_core_does_not_answer() {
    let broker = Server::tebroker_env(&["--http", "127.0.0.1:0"], &[FAULTS]);
    let http = broker.http.unwrap();
    assert_eq!(
        http_get(http, "/healthz"),
        ("HTTP/1.1 200 OK".into(), "ok\n".into())
    );
    // Holds the broker lock for 6 s, as a core stuck in a loop would.
    let mut stuck = broker.connect();
    stuck.raw(b"debug hang 6000\n").unwrap();
    let (status, body) = wait_until("/healthz to report the stuck core", || {
        let got = http_get(http, "/healthz");
        got.0.contains("503").then_some(got)
    });
    assert!(body.contains("does not answer"), "{status} {body}");
    // The other views say so too rather than hang.
    assert!(http_get(http, "/api/status").0.contains("503"));
    assert_eq!(stuck.recv_line(), "OK");
    wait_until("/healthz to recover", || {
        http_get(http, "/healthz").0.contains("200").then_some(())
    });
}

#[test]
fn an_unwritable_history_file_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("no-such-dir").join("leases.jsonl");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tebroker"));
    cmd.args([
        "serve",
        "-p",
        "0",
        "-L",
        "127.0.0.1",
        "--history-file",
        path(&bad),
    ]);
    let out = test_support::run_with_timeout(&mut cmd, TIMEOUT);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot write the lease history file") && err.contains(path(&bad)),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "it never listened");
}

#[test]
fn history_write_errors_are_counted_and_the_lines_retried() {
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("leases.jsonl");
    let broker =
        Server::tebroker_with(&["--history-file", path(&history), "--http", "127.0.0.1:0"]);
    // The path turns into a directory: appends fail.
    std::fs::remove_file(&history).unwrap();
    std::fs::create_dir(&history).unwrap();
    let mut held = lease(&broker, "callback_5");
    held.worker.send(T::WorkComplete, &[&held.handle, b""]);
    broker.wait_stat("history_write_errors", 1);
    broker.wait_log("cannot append to the lease history; keeping the lines to retry");
    let (_, metrics) = http_get(broker.http.unwrap(), "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tebroker_history_write_errors_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    // Writable again: the kept line lands.
    std::fs::remove_dir(&history).unwrap();
    let lines = history_lines(&history, 1);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["callback"], "callback_5");
}
