//! The operator surface: dashboard, JSON API, Prometheus metrics and the lease history file,
//! watched while a real testenv-style lease goes through the broker.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gearman_client::{Client, JobRequest, ServerAddr, Worker};
use harness::Server;

mod harness;

const SECRET: &str = "PRIVATE-KEY-MATERIAL";

fn start(history: &std::path::Path) -> Server {
    Server::tebroker_with(&[
        "--http",
        "127.0.0.1:0",
        "--history-file",
        harness::path(history),
    ])
}

/// A plain HTTP/1.1 GET; returns (status line, body).
fn get(addr: impl std::fmt::Display, path: &str) -> (String, String) {
    let addr = addr.to_string();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

fn json(addr: impl std::fmt::Display + Copy, path: &str) -> serde_json::Value {
    let (status, body) = get(addr, path);
    assert!(status.contains("200"), "{path}: {status}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[test]
fn dashboard_api_metrics_and_history_follow_a_lease() {
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("leases.jsonl");
    let broker = start(&history);
    let addr = ServerAddr::localhost(broker.port);
    let http = broker.http.unwrap();
    let (status, page) = get(http, "/");
    assert!(status.contains("200") && page.contains("Leased test environments"));
    assert_eq!(get(http, "/healthz").1, "ok\n");

    test_support::block_on_within(Duration::from_secs(60), async {
        // The TE worker and the CI job's callback worker, speaking the testenv protocol.
        let te = Worker::with_options(
            [addr.clone()],
            gearman_client::WorkerOptions {
                client_id: Some("testenv-worker-te9".into()),
                ..Default::default()
            },
        );
        te.register("lockenv");
        let callback = Worker::new([addr.clone()]);
        callback.register("callback_job42");
        te.wait_for_server(Duration::from_secs(10)).await.unwrap();
        callback
            .wait_for_server(Duration::from_secs(10))
            .await
            .unwrap();
        let client = Client::connect([addr.clone()]).await.unwrap();
        let request = format!(
            r#"{{"callback_name": "callback_job42", "timeout": "600", "ssh_key": "{SECRET}", "job_identifier": "42: demo"}}"#
        );
        let lockenv = client
            .submit(JobRequest::new("lockenv", request))
            .await
            .unwrap();
        let lease = te.grab_job().await.unwrap();
        let te_client = Client::connect([addr.clone()]).await.unwrap();
        let cb = te_client
            .submit(JobRequest::new(
                "callback_job42",
                format!(r#"{{"ssh-key": "{SECRET}"}}"#),
            ))
            .await
            .unwrap();
        let cb_job = callback.grab_job().await.unwrap();

        let leases = json(http, "/api/leases");
        assert_eq!(leases[0]["worker_id"], "testenv-worker-te9");
        assert_eq!(leases[0]["callback"], "callback_job42");
        assert_eq!(leases[0]["job_identifier"], "42: demo");
        assert_eq!(leases[0]["callback_state"], "running");
        let (_, metrics) = get(http, "/metrics");
        assert_eq!(metric(&metrics, "tebroker_leases "), 1.0);
        assert!(
            metrics.contains(r#"tebroker_function_workers{function="lockenv"} 1"#),
            "{metrics}"
        );
        let status = json(http, "/api/status");
        assert!(status
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["name"] == "lockenv" && f["running"] == 1));
        let conns = json(http, "/api/connections");
        assert!(conns.as_array().unwrap().len() >= 4);

        cb_job.complete("").await.unwrap();
        cb.result().await.unwrap();
        lease.complete("").await.unwrap();
        lockenv.result().await.unwrap();
    });

    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let text = std::fs::read_to_string(&history).unwrap_or_default();
        if let Some(line) = text.lines().next() {
            break line.to_string();
        }
        assert!(Instant::now() < deadline, "history file never written");
        std::thread::sleep(Duration::from_millis(50));
    };
    let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(entry["outcome"], "released");
    assert_eq!(entry["callback"], "callback_job42");
    let api_history = json(http, "/api/history");
    assert_eq!(api_history[0]["outcome"], "released");
    let (_, metrics) = get(http, "/metrics");
    assert_eq!(metric(&metrics, "tebroker_leases "), 0.0);
    assert_eq!(metric(&metrics, "tebroker_leases_ended_total "), 1.0);
    for path in [
        "/api/leases",
        "/api/history",
        "/api/status",
        "/api/connections",
        "/metrics",
    ] {
        assert!(!get(http, path).1.contains(SECRET), "{path} leaks TE data");
    }
    assert!(!std::fs::read_to_string(&history).unwrap().contains(SECRET));
    assert!(get(http, "/nope").0.contains("404"));
}

#[test]
fn admin_cli_prints_answers_and_fails_on_err() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(&dir.path().join("h.jsonl"));
    let b = format!("127.0.0.1:{}", broker.port);
    let admin = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tebroker"))
            .args(["admin", "-b", &b])
            .args(args)
            .output()
            .unwrap()
    };
    let out = admin(&["maxqueue", "jobsq", "3"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    let out = admin(&["status"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "jobsq\t0\t0\t0\n");
    let out = admin(&["getpid"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("OK {}", broker.pid())
    );
    let out = admin(&["leases"]);
    assert!(out.status.success() && out.stdout.is_empty());
    let out = admin(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ERR UNKNOWN_COMMAND Unknown server command")
    );
}

use gearman_proto::PacketType as T;

/// Parses `/metrics` with the reference parser (Python prometheus_client's OpenMetrics
/// parser) and returns every sample as (name, labels, value).
fn parse_with_prometheus_client(
    text: &str,
) -> Vec<(String, serde_json::Map<String, serde_json::Value>, f64)> {
    const SCRIPT: &str = r#"
import json, sys
try:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
except ImportError:
    sys.exit("prometheus_client is not installed; run scripts/install-peers.sh")
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<(String, serde_json::Map<String, serde_json::Value>, f64)> =
        serde_json::from_slice(&out.stdout).unwrap();
    samples
}

#[test]
fn metrics_label_values_are_escaped() {
    let broker = Server::tebroker_with(&["--http", "127.0.0.1:0"]);
    let names = ["quote\"d", "back\\slash", "new\nline", "plain"];
    let mut worker = broker.connect();
    for name in names {
        worker.send(T::CanDo, &[name.as_bytes()]);
    }
    worker.send(T::EchoReq, &[b"sync"]);
    assert_eq!(worker.recv().ptype, T::EchoRes);
    let (status, body) = get(broker.http.unwrap(), "/metrics");
    assert!(status.contains("200"), "{status}");
    let samples = parse_with_prometheus_client(&body);
    for name in names {
        let workers = samples
            .iter()
            .find(|(metric, labels, _)| {
                metric == "tebroker_function_workers" && labels["function"] == name
            })
            .unwrap_or_else(|| panic!("no workers sample for {name:?} in\n{body}"));
        assert_eq!(workers.2, 1.0, "{name:?}");
    }
    assert!(samples
        .iter()
        .any(|(metric, _, _)| metric == "tebroker_history_write_errors_total"));
}

/// Ends one lease per entry of `outcomes` ("released", "failed" or "timed out") through raw
/// connections; returns when the last has ended.
fn end_leases(broker: &Server, outcomes: &[&str]) {
    let mut client = broker.connect();
    let mut worker = broker.connect();
    worker.send(T::SetClientId, &[b"te-history"]);
    for (i, outcome) in outcomes.iter().enumerate() {
        let timeout = *outcome == "timed out";
        if timeout {
            worker.send(T::CanDoTimeout, &[b"lockenv", b"1"]);
        } else {
            worker.send(T::CanDo, &[b"lockenv"]);
        }
        let request = format!(r#"{{"callback_name": "callback_{i}", "timeout": "60"}}"#);
        client.send(T::SubmitJob, &[b"lockenv", b"", request.as_bytes()]);
        assert_eq!(client.recv().ptype, T::JobCreated);
        let assign = worker.grab_assignment();
        match *outcome {
            "released" => worker.send(T::WorkComplete, &[assign.arg(0), b""]),
            "failed" => worker.send(T::WorkFail, &[assign.arg(0)]),
            // The broker fails the job itself after the CAN_DO_TIMEOUT's second.
            "timed out" => {}
            other => panic!("no such outcome {other}"),
        }
        let end = client.recv();
        let want = if *outcome == "released" {
            T::WorkComplete
        } else {
            T::WorkFail
        };
        assert_eq!(end.ptype, want, "lease {i} ({outcome})");
    }
}

#[test]
fn history_records_failed_and_timed_out_leases() {
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("leases.jsonl");
    let broker = start(&history);
    end_leases(&broker, &["failed", "timed out", "released"]);
    let api = json(broker.http.unwrap(), "/api/history");
    let outcomes: Vec<&str> = api
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["released", "timed out", "failed"],
        "newest first"
    );
    let lines = harness::wait_until("3 lines in the history file", || {
        let text = std::fs::read_to_string(&history).unwrap_or_default();
        (text.lines().count() >= 3).then_some(text)
    });
    let file: Vec<String> = lines
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["outcome"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        file,
        ["failed", "timed out", "released"],
        "in the order they ended"
    );
}

#[test]
fn the_api_history_keeps_the_last_1000_and_the_file_keeps_all() {
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("leases.jsonl");
    let broker = start(&history);
    let total = 1005;
    end_leases(&broker, &vec!["released"; total]);
    let api = json(broker.http.unwrap(), "/api/history");
    let entries = api.as_array().unwrap();
    assert_eq!(entries.len(), 1000);
    assert_eq!(
        entries[0]["callback"],
        format!("callback_{}", total - 1),
        "newest first"
    );
    assert_eq!(
        entries[999]["callback"], "callback_5",
        "the five oldest are gone"
    );
    harness::wait_until("every lease in the history file", || {
        let text = std::fs::read_to_string(&history).unwrap_or_default();
        (text.lines().count() == total).then_some(())
    });
    let (_, metrics) = get(broker.http.unwrap(), "/metrics");
    assert_eq!(
        metric(&metrics, "tebroker_leases_ended_total "),
        total as f64
    );
}

/// With a store and ended leases, `/metrics` carries the wait and duration histograms, TEs by
/// state and the store's counters, and the reference parser reads all of them.
#[test]
fn metrics_with_a_store_and_ended_leases_parse_with_the_reference_parser() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Server::tebroker_with(&[
        "--http",
        "127.0.0.1:0",
        "--data-dir",
        harness::path(&dir.path().join("data")),
    ]);
    end_leases(&broker, &["released", "failed"]);
    let http = broker.http.unwrap();
    // Both leases counted and every record queued for the store written.
    let body = test_support::wait_until("both leases in /metrics and the store", || {
        let (_, body) = get(http, "/metrics");
        let done = body.contains("tebroker_lease_duration_seconds_count 2\n")
            && body.contains("tebroker_lease_wait_seconds_count 2\n")
            && metric(&body, "tebroker_store_written_total ") >= 2.0
            && metric(&body, "tebroker_store_written_total ")
                == metric(&body, "tebroker_store_records_total ");
        done.then_some(body)
    });
    let samples = parse_with_prometheus_client(&body);
    let value = |name: &str, label: Option<(&str, &str)>| {
        samples
            .iter()
            .find(|(n, labels, _)| {
                n == name
                    && label.is_none_or(|(k, v)| labels.get(k).and_then(|l| l.as_str()) == Some(v))
            })
            .map(|s| s.2)
            .unwrap_or_else(|| panic!("no sample {name} {label:?} in\n{body}"))
    };
    for histogram in [
        "tebroker_lease_duration_seconds",
        "tebroker_lease_wait_seconds",
    ] {
        assert_eq!(value(&format!("{histogram}_count"), None), 2.0, "{body}");
        assert_eq!(
            value(&format!("{histogram}_bucket"), Some(("le", "+Inf"))),
            2.0,
            "{body}"
        );
    }
    // end_leases' worker has disconnected: its TE is gone.
    assert_eq!(
        value("tebroker_envs", Some(("state", "gone"))),
        1.0,
        "{body}"
    );
    assert_eq!(value("tebroker_store_up", None), 1.0);
    assert!(value("tebroker_store_records_total", None) >= 2.0);
    assert_eq!(value("tebroker_store_dropped_total", None), 0.0);
    assert_eq!(value("tebroker_store_errors_total", None), 0.0);
    value("tebroker_store_backlog", None);
}
