//! API v1 against a real broker and real testenv-protocol peers: a lease recorded in the SQLite
//! store, queried through `/api/v1/history` (filters, paging), surviving a broker restart;
//! `/api/v1/envs` before and after; control refused without the bearer token and applied with
//! it; JSON errors.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use gearman_client::{Client, JobRequest, ServerAddr, Worker};
use harness::Server;

mod harness;

const SECRET: &str = "PRIVATE-KEY-MATERIAL";
const TOKEN: &str = "t0ken-for-the-api-v1-test";

/// One HTTP/1.1 request; returns (status code, body).
fn request(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    request_within(addr, method, path, token, Duration::from_secs(10))
}

/// [`request`], waiting at most `wait` for the answer.
fn request_within(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    wait: Duration,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

fn get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let (code, body) = request(addr, "GET", path, None);
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

fn start(dir: &Path) -> Server {
    let token = dir.join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    Server::tebroker_with(&[
        "--http",
        "127.0.0.1:0",
        "--data-dir",
        harness::path(&dir.join("data")),
        "--api-token-file",
        harness::path(&token),
    ])
}

/// One full lease of TE `te` by job `job` (a testenv-worker, a CI job's callback worker and
/// client, all on real sockets), released.
fn lease_once(port: u16, te: &str, job: &str) {
    let addr = ServerAddr::localhost(port);
    test_support::block_on_within(Duration::from_secs(60), async {
        let worker = Worker::with_options(
            [addr.clone()],
            gearman_client::WorkerOptions {
                client_id: Some(te.into()),
                ..Default::default()
            },
        );
        worker.register("lockenv");
        let callback = Worker::new([addr.clone()]);
        callback.register("callback_api1");
        worker
            .wait_for_server(Duration::from_secs(10))
            .await
            .unwrap();
        callback
            .wait_for_server(Duration::from_secs(10))
            .await
            .unwrap();
        let client = Client::connect([addr.clone()]).await.unwrap();
        let body = format!(
            r#"{{"callback_name": "callback_api1", "timeout": "600", "ssh_key": "{SECRET}", "job_identifier": "{job}"}}"#
        );
        let lockenv = client
            .submit(JobRequest::new("lockenv", body))
            .await
            .unwrap();
        let lease = worker.grab_job().await.unwrap();
        lease.complete("").await.unwrap();
        lockenv.result().await.unwrap();
    });
}

fn history_has(http: SocketAddr, query: &str, want: usize) -> serde_json::Value {
    test_support::wait_until(&format!("{want} leases in /api/v1/history?{query}"), || {
        let page = get_json(http, &format!("/api/v1/history?{query}"));
        (page["leases"].as_array().unwrap().len() == want).then_some(page)
    })
}

#[test]
fn history_and_inventory_survive_a_restart_and_control_needs_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start(dir.path());
    let http = broker.http.unwrap();
    lease_once(broker.port, "testenv-worker-api1", "job-1");
    lease_once(broker.port, "testenv-worker-api1", "job-2");
    lease_once(broker.port, "testenv-worker-api2", "job-3");

    let page = history_has(http, "", 3);
    assert_eq!(page["leases"][0]["job_identifier"], "job-3", "newest first");
    assert_eq!(page["leases"][0]["outcome"], "released");
    let one = history_has(http, "env=testenv-worker-api1&limit=1", 1);
    let cursor = one["next"].as_str().expect("a next cursor").to_string();
    let two = history_has(
        http,
        &format!("env=testenv-worker-api1&limit=1&cursor={cursor}"),
        1,
    );
    assert_eq!(one["leases"][0]["job_identifier"], "job-2");
    assert_eq!(two["leases"][0]["job_identifier"], "job-1");
    history_has(http, "job=job-3&outcome=released", 1);
    history_has(http, "outcome=failed", 0);

    // Bad input: a JSON error with a status, nothing else lost.
    let (code, body) = request(http, "GET", "/api/v1/history?outcome=exploded", None);
    assert_eq!(code, 400, "{body}");
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"], "bad_request");
    assert!(
        err["message"].as_str().unwrap().contains("released"),
        "{body}"
    );
    let (code, body) = request(http, "GET", "/api/v1/history?cursor=zz", None);
    assert_eq!(code, 400, "{body}");
    let (code, body) = request(http, "GET", "/api/v1/nothing-here", None);
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("not_found"));

    // The TEs are gone (their workers disconnected) but listed, with their outcomes.
    let envs = get_json(http, "/api/v1/envs");
    let names: Vec<&str> = envs
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"testenv-worker-api1") && names.contains(&"testenv-worker-api2"),
        "{envs}"
    );
    let te = get_json(http, "/api/v1/envs/testenv-worker-api1");
    assert_eq!(te["recent_leases"].as_array().unwrap().len(), 2, "{te}");
    let (code, _) = request(http, "GET", "/api/v1/envs/no-such-te", None);
    assert_eq!(code, 404);

    // Control: refused without the token or with a wrong one; a known TE drained with it.
    for token in [None, Some("wrong-token-of-good-length")] {
        let (code, body) = request(
            http,
            "POST",
            "/api/v1/envs/testenv-worker-api1/drain",
            token,
        );
        assert_eq!(code, 401, "{body}");
        assert!(body.contains("unauthorized"), "{body}");
    }
    let (code, body) = request(http, "POST", "/api/v1/envs/no-such-te/drain", Some(TOKEN));
    assert_eq!(code, 404, "{body}");
    let (code, body) = request(
        http,
        "POST",
        "/api/v1/envs/testenv-worker-api1/explode",
        Some(TOKEN),
    );
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("unknown_operation"), "{body}");

    // The TEs' states reach the store (scanned every 2 s) before the restart.
    test_support::wait_until("TE states in the store", || {
        let states = get_json(http, "/api/v1/envs/testenv-worker-api2");
        (!states["state_changes"].as_array().unwrap().is_empty()).then_some(())
    });
    for path in [
        "/api/v1/history",
        "/api/v1/envs",
        "/api/v1/envs/testenv-worker-api1",
        "/api/v1/workers",
        "/api/v1/leases",
        "/api/v1/queue",
    ] {
        let (_, body) = request(http, "GET", path, None);
        assert!(!body.contains(SECRET), "{path} leaks TE data: {body}");
    }

    // Metrics: histograms of waits and lease durations, TEs by state, the store's counters.
    // Waited for as a whole, not only the store counter: once, on a loaded machine, one of
    // these lines was not there yet when the store counter was.
    let want = [
        "tebroker_lease_wait_seconds_count 3",
        "tebroker_lease_duration_seconds_count 3",
        "tebroker_store_dropped_total 0",
        "tebroker_store_errors_total 0",
        "tebroker_store_up 1",
        "# TYPE tebroker_lease_wait_seconds histogram",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let (_, m) = request(http, "GET", "/metrics", None);
        let missing: Vec<&str> = want
            .iter()
            .copied()
            .filter(|line| !m.lines().any(|l| l == *line))
            .collect();
        if m.contains("tebroker_store_written_total ") && missing.is_empty() {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {missing:?} in\n{m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        metrics.contains("tebroker_envs{state=\"gone\"} 2"),
        "{metrics}"
    );
    let stats = get_json(http, "/api/v1/stats");
    assert_eq!(stats["dropped"], 0);
    assert!(
        stats["written"].as_u64().unwrap() >= 6,
        "3 leases and 3 waits: {stats}"
    );

    broker.signal(libc::SIGTERM);
    broker.wait_exit(Duration::from_secs(30));
    assert!(!broker.log_text().contains(SECRET));

    // A new broker on the same data directory has the history and the TEs.
    let broker = start(dir.path());
    let http = broker.http.unwrap();
    let page = history_has(http, "", 3);
    assert_eq!(page["leases"][2]["job_identifier"], "job-1");
    let envs = get_json(http, "/api/v1/envs");
    let api2 = envs
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "testenv-worker-api2")
        .unwrap_or_else(|| panic!("the stored TE after a restart: {envs}"));
    assert_eq!(api2["live"], false);
    assert_eq!(api2["last_outcomes"][0], "released");
}

#[test]
fn without_a_token_file_control_is_refused_and_without_a_store_history_says_so() {
    let broker = Server::tebroker_with(&["--http", "127.0.0.1:0", "--no-store"]);
    let http = broker.http.unwrap();
    let (code, body) = request(http, "POST", "/api/v1/envs/x/drain", Some(TOKEN));
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("control_disabled"));
    let (code, body) = request(http, "GET", "/api/v1/history", None);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no_store"));
    assert_eq!(get_json(http, "/api/v1/queue"), serde_json::json!([]));
}

/// `tebroker ARGS... --url URL`; returns (exit code, stdout, stderr).
fn cli(http: SocketAddr, args: &[&str]) -> (i32, String, String) {
    let url = format!("http://{http}");
    let mut all = args.to_vec();
    all.extend(["--url", &url]);
    finish(spawn_tebroker(&all))
}

/// [`cli`] with `--token-file TOKEN`.
fn cli_with_token(http: SocketAddr, args: &[&str], token: &Path) -> (i32, String, String) {
    let mut all = args.to_vec();
    all.extend(["--token-file", harness::path(token)]);
    cli(http, &all)
}

#[test]
fn the_cli_lists_drains_holds_and_releases_a_te_and_shows_its_leases_and_history() {
    use gearman_proto::PacketType as T;
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let http = broker.http.unwrap();
    lease_once(broker.port, "testenv-worker-cli", "job-cli-1");
    // A plain testenv-worker that stays: registered for lockenv, waiting for work.
    let mut te = harness::Conn::connect(broker.port);
    te.req(T::SetClientId, &["testenv-worker-cli"]);
    te.req(T::CanDo, &["lockenv"]);
    te.req(T::PreSleep, &[] as &[&str]);

    let ready = test_support::wait_until("the TE ready in `tebroker envs`", || {
        let (code, out, err) = cli(http, &["envs"]);
        assert_eq!(code, 0, "{err}");
        out.lines()
            .find(|l| l.starts_with("testenv-worker-cli ") && l.contains(" ready "))
            .map(str::to_string)
    });
    assert!(ready.contains("released"), "its last outcome: {ready}");
    let (code, out, _) = cli(http, &["envs"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("TE "), "a table with a header: {out}");

    let token = dir.path().join("token");
    let (code, _, err) = cli(http, &["drain", "testenv-worker-cli"]);
    assert_eq!(code, 1, "refused without a token");
    assert!(err.contains("401") && err.contains("unauthorized"), "{err}");
    let (code, out, err) = cli_with_token(http, &["drain", "testenv-worker-cli"], &token);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("drain testenv-worker-cli: done by the broker"),
        "{out}"
    );
    test_support::wait_until("the TE drained in `tebroker envs --json`", || {
        let (_, out, _) = cli(http, &["envs", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "testenv-worker-cli" && e["state"] == "drained")
            .then_some(())
    });
    let (code, _, err) = cli_with_token(http, &["undrain", "testenv-worker-cli"], &token);
    assert_eq!(code, 0, "{err}");
    test_support::wait_until("the TE ready again", || {
        let (_, out, _) = cli(http, &["envs"]);
        out.lines()
            .any(|l| l.starts_with("testenv-worker-cli ") && l.contains(" ready "))
            .then_some(())
    });

    let (code, out, err) = cli(http, &["history", "--env", "testenv-worker-cli"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("job-cli-1") && out.contains("released"),
        "{out}"
    );
    let (code, _, err) = cli(http, &["history", "--outcome", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("400"), "{err}");
    let (code, out, _) = cli(http, &["queue"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("POS"), "{out}");

    // hold with a time, release; rebuild has no agent to do it for a plain TE.
    let (code, out, err) = cli_with_token(
        http,
        &["hold", "testenv-worker-cli", "--secs", "600"],
        &token,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("hold testenv-worker-cli"), "{out}");
    test_support::wait_until("the TE held in `tebroker envs`", || {
        let (_, out, _) = cli(http, &["envs"]);
        out.lines()
            .any(|l| l.starts_with("testenv-worker-cli ") && l.contains(" held "))
            .then_some(())
    });
    let (code, _, err) = cli_with_token(http, &["release", "testenv-worker-cli"], &token);
    assert_eq!(code, 0, "{err}");
    test_support::wait_until("the TE ready after its release", || {
        let (_, out, _) = cli(http, &["envs"]);
        out.lines()
            .any(|l| l.starts_with("testenv-worker-cli ") && l.contains(" ready "))
            .then_some(())
    });
    let (code, _, err) = cli_with_token(http, &["rebuild", "testenv-worker-cli"], &token);
    assert_eq!(code, 1, "no agent to rebuild a plain TE");
    assert!(err.contains("not_supported"), "{err}");

    // leases: the TE while a lock request holds it.
    let mut client = harness::Conn::connect(broker.port);
    client.req(
        T::SubmitJob,
        &[
            "lockenv",
            "",
            r#"{"callback_name": "callback_cli2", "job_identifier": "job-cli-2"}"#,
        ],
    );
    client.expect(T::JobCreated);
    te.expect(T::Noop);
    te.req(T::GrabJob, &[] as &[&str]);
    te.expect(T::JobAssign);
    let leased = test_support::wait_until("the lease in `tebroker leases`", || {
        let (code, out, err) = cli(http, &["leases"]);
        assert_eq!(code, 0, "{err}");
        out.lines()
            .find(|l| l.contains("testenv-worker-cli") && l.contains("job-cli-2"))
            .map(str::to_string)
    });
    assert!(!leased.contains("SECRET"), "{leased}");
    drop((te, client));
}

/// Two brokers on one PostgreSQL database (a real throwaway cluster): each sees the other's
/// leases in its history and the other's TEs in its inventory.
#[test]
fn two_brokers_share_history_and_inventory_through_postgresql() {
    let Some(pg) = test_support::postgres::PgCluster::start_or_skip(
        "two_brokers_share_history_and_inventory_through_postgresql",
    ) else {
        return;
    };
    let url = pg.url();
    let start_pg = || Server::tebroker_with(&["--http", "127.0.0.1:0", "--database", &url]);
    let a = start_pg();
    let b = start_pg();
    lease_once(a.port, "testenv-worker-on-a", "job-a");
    lease_once(b.port, "testenv-worker-on-b", "job-b");
    for broker in [&a, &b] {
        let http = broker.http.unwrap();
        let page = history_has(http, "", 2);
        let jobs: Vec<&str> = page["leases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["job_identifier"].as_str().unwrap())
            .collect();
        assert!(jobs.contains(&"job-a") && jobs.contains(&"job-b"), "{page}");
        test_support::wait_until("both TEs in the inventory", || {
            let envs = get_json(http, "/api/v1/envs");
            let names: Vec<String> = envs
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["name"].as_str().unwrap().to_string())
                .collect();
            (names.contains(&"testenv-worker-on-a".to_string())
                && names.contains(&"testenv-worker-on-b".to_string()))
            .then_some(())
        });
    }
    drop((a, b));
}

/// With recent grants in the store, a waiting lock request gets an estimate: in the API's queue
/// and as a third number of tebroker's `position` answer (`OK N TOTAL EST_SECS`).
#[test]
fn a_waiting_request_gets_an_estimated_wait() {
    use gearman_proto::PacketType as T;
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let http = broker.http.unwrap();
    for job in ["est-1", "est-2", "est-3"] {
        lease_once(broker.port, "testenv-worker-est", job);
    }
    // No TE serves lockenv now: this request waits.
    let mut client = harness::Conn::connect(broker.port);
    client.req(
        T::SubmitJob,
        &[
            "lockenv",
            "",
            r#"{"callback_name": "callback_w", "job_identifier": "est-wait"}"#,
        ],
    );
    let created = client.expect(T::JobCreated);
    let handle = String::from_utf8_lossy(created.arg(0)).into_owned();
    let queued = test_support::wait_until("an estimate in /api/v1/queue", || {
        let q = get_json(http, "/api/v1/queue");
        q[0]["estimated_wait_ms"].as_u64().map(|_| q)
    });
    assert_eq!(queued[0]["job_identifier"], "est-wait");
    assert_eq!(queued[0]["position"], 1);
    let answer = broker.admin_line(&format!("position {handle}"));
    let words: Vec<&str> = answer.split_whitespace().collect();
    assert_eq!(words.len(), 4, "OK N TOTAL EST_SECS: {answer:?}");
    assert_eq!(&words[..3], ["OK", "1", "1"], "{answer:?}");
    let est: u64 = words[3].parse().unwrap();
    assert_eq!(
        est * 1000,
        queued[0]["estimated_wait_ms"].as_u64().unwrap(),
        "the same estimate"
    );
}

/// An agent's side on raw sockets: its report of `te1`, then its control function served by
/// `ctl` (registered, asleep).
fn agent_with_te1(port: u16) -> harness::Conn {
    use gearman_proto::PacketType as T;
    let report = testenv_proto::agent::AgentReport {
        agent: "host1".into(),
        host: "host1.example".into(),
        version: "testenv-agent 0.1.0".into(),
        sent_ms: 1,
        envs: vec![testenv_proto::agent::EnvReport {
            name: "te1".into(),
            state: testenv_proto::agent::EnvState::Ready,
            since_ms: 1,
            labels: vec![],
            holder: None,
            detail: None,
            failed_leases: 0,
            failed_rebuilds: 0,
        }],
    };
    let mut ctl = harness::Conn::connect(port);
    ctl.req(
        T::SubmitJobBg,
        &["tebroker:te-report", "", &report.to_json()],
    );
    ctl.expect(T::JobCreated);
    ctl.req(T::CanDo, &["testenv-agent:ctl:host1"]);
    ctl.req(T::PreSleep, &[] as &[&str]);
    ctl
}

/// The agent takes the next control command and answers it with `ok` / `message`; returns
/// the command.
fn answer_control(ctl: &mut harness::Conn, ok: bool, message: &str) -> serde_json::Value {
    use gearman_proto::PacketType as T;
    ctl.expect(T::Noop);
    ctl.req(T::GrabJobUniq, &[] as &[&str]);
    let job = ctl.expect(T::JobAssignUniq);
    let reply = testenv_proto::agent::ControlReply {
        ok,
        message: message.into(),
        report: None,
    };
    ctl.req(T::WorkComplete, &[job.arg(0), reply.to_json().as_bytes()]);
    ctl.req(T::PreSleep, &[] as &[&str]);
    serde_json::from_slice(job.arg(3)).unwrap()
}

/// Starts `tebroker ARGS...` without waiting (its answer waits for the agent's).
fn spawn_tebroker(args: &[&str]) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_tebroker"))
        .args(args)
        .env_remove("TEBROKER_URL")
        .env_remove("TEBROKER_TOKEN_FILE")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// (exit code, stdout, stderr) of a child started by [`spawn_tebroker`].
fn finish(child: std::process::Child) -> (i32, String, String) {
    let out = test_support::wait_until_within("the tebroker command", Duration::from_secs(60), {
        let mut child = Some(child);
        move || {
            let c = child.as_mut().unwrap();
            c.try_wait()
                .unwrap()
                .map(|_| child.take().unwrap().wait_with_output().unwrap())
        }
    });
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn control_of_an_agents_te_answers_with_the_agents_reply() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let http = broker.http.unwrap();
    let port = broker.port.to_string();
    let token = dir.path().join("token");
    let mut ctl = agent_with_te1(broker.port);

    // `tebroker admin`: the agent's word, both ways.
    let admin = spawn_tebroker(&["admin", "-b", &format!("127.0.0.1:{port}"), "drain", "te1"]);
    let cmd = answer_control(&mut ctl, true, "drain te1");
    assert_eq!(
        (cmd["op"].as_str(), cmd["env"].as_str()),
        (Some("drain"), Some("te1"))
    );
    let (code, out, err) = finish(admin);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "OK drain te1: agent host1: drain te1\n");
    let admin = spawn_tebroker(&[
        "admin",
        "-b",
        &format!("127.0.0.1:{port}"),
        "release",
        "te1",
    ]);
    answer_control(&mut ctl, false, "te1 is not held");
    let (code, _, err) = finish(admin);
    assert_eq!(code, 1);
    assert!(err.starts_with("ERR refused "), "{err}");
    assert!(
        err.contains("te1") && err.contains("not") && err.contains("held"),
        "{err}"
    );

    // The API.
    let api = std::thread::spawn(move || {
        request(http, "POST", "/api/v1/envs/te1/hold?secs=60", Some(TOKEN))
    });
    let cmd = answer_control(&mut ctl, true, "hold te1");
    assert_eq!(cmd["hold_secs"], 60);
    let (code, body) = api.join().unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["applied_by"], "agent");
    assert_eq!(v["reply"], "hold te1");
    let api =
        std::thread::spawn(move || request(http, "POST", "/api/v1/envs/te1/release", Some(TOKEN)));
    answer_control(&mut ctl, false, "te1 is not held");
    let (code, body) = api.join().unwrap();
    assert_eq!(code, 409, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "refused");
    assert_eq!(v["message"], "agent host1: te1 is not held");

    // The CLI (through the API).
    let url = format!("http://{http}");
    let token_arg = harness::path(&token);
    let cli = spawn_tebroker(&["undrain", "te1", "--url", &url, "--token-file", token_arg]);
    answer_control(&mut ctl, true, "undrain te1");
    let (code, out, err) = finish(cli);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "undrain te1: agent host1: undrain te1\n");

    // An agent that takes nothing: the command is withdrawn at the deadline, and said so.
    let started = std::time::Instant::now();
    let (code, body) = request_within(
        http,
        "POST",
        "/api/v1/envs/te1/drain",
        Some(TOKEN),
        Duration::from_secs(30),
    );
    assert_eq!(code, 504, "{body}");
    assert!(
        body.contains("agent_timeout") && body.contains("withdrawn"),
        "{body}"
    );
    assert!(started.elapsed() >= Duration::from_millis(broker_core::CONTROL_REPLY_TIMEOUT_MS));
    assert!(
        !broker
            .admin_block("status")
            .iter()
            .any(|l| l.starts_with("testenv-agent:ctl:host1\t1")),
        "the withdrawn command is not queued: {:?}",
        broker.admin_block("status")
    );
}

/// A plain testenv-worker named `name` on raw sockets: registered for lockenv, asleep.
fn plain_te(port: u16, name: &str) -> harness::Conn {
    use gearman_proto::PacketType as T;
    let mut te = harness::Conn::connect(port);
    te.req(T::SetClientId, &[name]);
    te.req(T::CanDo, &["lockenv"]);
    te.req(T::PreSleep, &[] as &[&str]);
    te
}

/// TE `name`'s state in `tebroker admin envs` (waits until the TE is listed in `state`).
fn wait_admin_state(broker: &Server, name: &str, state: &str) {
    let mut last = Vec::new();
    let found = test_support::wait_until_within_or_none(test_support::TIMEOUT, || {
        last = broker.admin_block("envs");
        last.iter()
            .map(|l| l.split('\t').map(str::to_string).collect::<Vec<_>>())
            .find(|f| f[0] == name && f[1] == state)
    });
    assert!(
        found.is_some(),
        "timed out waiting for {name} {state} in `envs`; last seen:\n{}\n{}",
        last.join("\n"),
        broker.log_text()
    );
}

#[test]
fn broker_side_drains_and_holds_of_plain_tes_survive_a_restart() {
    use gearman_proto::PacketType as T;
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start(dir.path());
    let http = broker.http.unwrap();
    let (drained, held, back) = ("plain-drained", "plain-held", "plain-back");
    let conns: Vec<_> = [drained, held, back]
        .iter()
        .map(|n| plain_te(broker.port, n))
        .collect();
    wait_admin_state(&broker, back, "ready");
    assert!(broker
        .admin_line(&format!("drain {drained}"))
        .starts_with("OK drain"));
    let (code, body) = request(
        http,
        "POST",
        &format!("/api/v1/envs/{held}/hold?secs=3600"),
        Some(TOKEN),
    );
    assert_eq!(code, 200, "{body}");
    assert!(broker.admin_line(&format!("hold {back}")).starts_with("OK"));
    assert!(broker
        .admin_line(&format!("release {back}"))
        .starts_with("OK"));
    wait_admin_state(&broker, drained, "drained");
    wait_admin_state(&broker, held, "held");
    drop(conns);
    // SIGTERM writes out what the store writer holds.
    broker.signal(libc::SIGTERM);
    broker.wait_exit(Duration::from_secs(30));

    let broker = start(dir.path());
    let mut conns: Vec<_> = [drained, held, back]
        .iter()
        .map(|n| plain_te(broker.port, n))
        .collect();
    wait_admin_state(&broker, drained, "drained");
    wait_admin_state(&broker, held, "held");
    wait_admin_state(&broker, back, "ready");
    let envs = get_json(broker.http.unwrap(), "/api/v1/envs");
    let row = envs
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == held && e["live"] == true)
        .unwrap_or_else(|| panic!("{held} in {envs}"));
    let detail = row["detail"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with("held by the broker for 35"),
        "the hold keeps its end: {row}"
    );

    // Still out of rotation: a lock request goes to the TE in rotation only.
    let mut client = harness::Conn::connect(broker.port);
    client.req(
        T::SubmitJob,
        &[
            "lockenv",
            "",
            r#"{"callback_name": "callback_restart", "timeout": "60"}"#,
        ],
    );
    client.expect(T::JobCreated);
    for te in &mut conns[..2] {
        te.req(T::GrabJobUniq, &[] as &[&str]);
        te.expect(T::NoJob);
    }
    conns[2].req(T::GrabJobUniq, &[] as &[&str]);
    conns[2].expect(T::JobAssignUniq);
}

/// `curl` over HTTPS trusting `ca`, with a client certificate when given; returns (curl's exit
/// code, HTTP status, body).
fn curl(
    ca: &Path,
    cert: Option<&test_support::Files>,
    method: &str,
    url: &str,
) -> (i32, u16, String) {
    let out_dir = tempfile::tempdir().unwrap();
    let body = out_dir.path().join("body");
    let mut cmd = std::process::Command::new(test_support::require_program("curl"));
    cmd.args(["-sS", "--max-time", "20", "-X", method, "--cacert"])
        .arg(ca)
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_code}", url]);
    if let Some(c) = cert {
        cmd.arg("--cert").arg(&c.cert).arg("--key").arg(&c.key);
    }
    let out = test_support::run_with_timeout(&mut cmd, Duration::from_secs(30));
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (
        out.status.code().unwrap_or(-1),
        code,
        std::fs::read_to_string(&body).unwrap_or_default(),
    )
}

/// A broker without a store whose HTTP surface speaks HTTPS with `cert`, plus `extra` flags.
fn https_broker(cert: &test_support::Files, extra: &[&str]) -> Server {
    let mut args = vec![
        "--http",
        "127.0.0.1:0",
        "--no-store",
        "--http-tls-cert",
        harness::path(&cert.cert),
        "--http-tls-key",
        harness::path(&cert.key),
    ];
    args.extend_from_slice(extra);
    Server::tebroker_with(&args)
}

#[test]
fn over_https_a_client_certificate_of_the_client_ca_may_control_and_reading_stays_open() {
    let pki = test_support::Pki::new("tebroker test CA");
    let server = pki.issue("localhost");
    let operator = pki.issue("operator-alice");
    let stranger_ca = test_support::Pki::new("some other CA");
    let stranger = stranger_ca.issue("mallory");
    let broker = https_broker(&server, &["--http-client-ca", harness::path(&pki.ca())]);
    let http = broker.http.unwrap();
    let _te = plain_te(broker.port, "plain-https");
    wait_admin_state(&broker, "plain-https", "ready");
    let base = format!("https://127.0.0.1:{}", http.port());
    let drain = format!("{base}/api/v1/envs/plain-https/drain");
    let ca = pki.ca();

    // Reading needs no certificate.
    let (rc, code, body) = curl(&ca, None, "GET", &format!("{base}/api/v1/envs"));
    assert_eq!((rc, code), (0, 200), "{body}");
    assert!(body.contains("plain-https"), "{body}");
    // Control without one is refused, with a JSON error that says what is needed.
    let (rc, code, body) = curl(&ca, None, "POST", &drain);
    assert_eq!((rc, code), (0, 401), "{body}");
    assert!(body.contains("client certificate"), "{body}");
    assert!(broker
        .admin_block("envs")
        .iter()
        .any(|l| l.starts_with("plain-https\tready\t")));
    // A certificate of another CA does not get through the handshake.
    let (rc, code, body) = curl(&ca, Some(&stranger), "POST", &drain);
    assert_ne!(
        rc, 0,
        "a stranger's certificate was accepted: {code} {body}"
    );
    // Plain HTTP on the HTTPS port gets no answer.
    let (code, _) = {
        let mut s = TcpStream::connect(http).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = write!(s, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        (
            String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 200"),
            raw.len(),
        )
    };
    assert!(!code, "plain HTTP answered on the HTTPS port");
    assert!(broker
        .admin_block("envs")
        .iter()
        .any(|l| l.starts_with("plain-https\tready\t")));

    // The operator's certificate may.
    let (rc, code, body) = curl(&ca, Some(&operator), "POST", &drain);
    assert_eq!((rc, code), (0, 200), "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["applied_by"], "broker");
    wait_admin_state(&broker, "plain-https", "drained");
    broker.wait_log("certificate operator-alice");

    // The CLI over HTTPS: reading with the CA alone, control with the certificate.
    let tls_cli = |args: &[&str], cert: Option<&test_support::Files>| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--url", &base, "--ca", harness::path(&ca)]);
        if let Some(c) = cert {
            all.extend([
                "--cert",
                harness::path(&c.cert),
                "--key",
                harness::path(&c.key),
            ]);
        }
        finish(spawn_tebroker(&all))
    };
    let (code, out, err) = tls_cli(&["envs"], None);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("plain-https ") && l.contains("drained")),
        "{out}"
    );
    let (code, _, err) = tls_cli(&["undrain", "plain-https"], None);
    assert_eq!(code, 1);
    assert!(err.starts_with("error 401 unauthorized"), "{err}");
    let (code, out, err) = tls_cli(&["undrain", "plain-https"], Some(&operator));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "undrain plain-https: done by the broker\n");
    wait_admin_state(&broker, "plain-https", "ready");
}

/// The store going away under a running broker (its PostgreSQL server stopped): leasing goes
/// on, the outage shows (`tebroker_store_up 0`), and once the server is back every record held
/// meanwhile is written — none dropped.
#[test]
fn a_broker_keeps_leasing_while_postgresql_is_down_and_catches_up() {
    let Some(mut pg) = test_support::postgres::PgCluster::start_or_skip(
        "a_broker_keeps_leasing_while_postgresql_is_down_and_catches_up",
    ) else {
        return;
    };
    let url = pg.url();
    let broker = Server::tebroker_with(&["--http", "127.0.0.1:0", "--database", &url]);
    let http = broker.http.unwrap();
    let metrics = || request(http, "GET", "/metrics", None).1;
    lease_once(broker.port, "testenv-worker-pg", "before");
    history_has(http, "", 1);
    pg.stop();
    lease_once(broker.port, "testenv-worker-pg", "during-1");
    lease_once(broker.port, "testenv-worker-pg", "during-2");
    test_support::wait_until("the outage in /metrics", || {
        metrics().contains("tebroker_store_up 0").then_some(())
    });
    pg.restart();
    let page = history_has(http, "", 3);
    let jobs: Vec<&str> = page["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["job_identifier"].as_str().unwrap())
        .collect();
    assert_eq!(jobs, ["during-2", "during-1", "before"], "{page}");
    let m = test_support::wait_until("the store up again", || {
        let m = metrics();
        m.contains("tebroker_store_up 1").then_some(m)
    });
    assert!(m.contains("tebroker_store_dropped_total 0"), "{m}");
    assert!(
        !m.contains("tebroker_store_errors_total 0\n"),
        "the outage is counted: {m}"
    );
}

#[test]
fn sighup_loads_a_renewed_https_certificate_for_new_connections() {
    let old_ca = test_support::Pki::new("tebroker old CA");
    let served = old_ca.issue("localhost");
    let broker = https_broker(&served, &[]);
    let url = format!(
        "https://127.0.0.1:{}/api/v1/envs",
        broker.http.unwrap().port()
    );
    let (rc, code, body) = curl(&old_ca.ca(), None, "GET", &url);
    assert_eq!((rc, code), (0, 200), "{body}");

    // The certificate is renewed in place by another CA, then SIGHUP.
    let new_ca = test_support::Pki::new("tebroker new CA");
    let renewed = new_ca.issue("localhost");
    std::fs::copy(&renewed.cert, &served.cert).unwrap();
    std::fs::copy(&renewed.key, &served.key).unwrap();
    broker.signal(libc::SIGHUP);
    broker.wait_log("HTTPS certificate reloaded");

    let (rc, code, body) = curl(&new_ca.ca(), None, "GET", &url);
    assert_eq!((rc, code), (0, 200), "{body}");
    let (rc, _, _) = curl(&old_ca.ca(), None, "GET", &url);
    assert_ne!(rc, 0, "a new connection still got the old certificate");

    // A broken file is reported and the certificate in force stays.
    std::fs::write(&served.key, "not a key").unwrap();
    broker.signal(libc::SIGHUP);
    broker.wait_log("HTTPS reload failed");
    let (rc, code, body) = curl(&new_ca.ca(), None, "GET", &url);
    assert_eq!((rc, code), (0, 200), "{body}");
}
