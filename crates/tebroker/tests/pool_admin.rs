//! The pool through the real broker and its real CLI: `tebroker admin envs` lists a plain
//! testenv-worker (PyPI gear, the original's library and client id) as ready, leased and gone,
//! and an agent's TE from a report sent with Debian's `gearman` CLI; `drain`/`undrain` take a
//! plain worker out of rotation and back; a control command reaches an agent's control function
//! (a `gearman -w` worker); lock requests are served fairly across two tenants.

mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;

use gearman_proto::PacketType as T;
use harness::{
    parse_status, require_program, run_with_timeout, wait_until, Conn, KillOnDrop, Server, TIMEOUT,
};
use test_support::LoggedChild;

fn tebroker_admin(server: &Server, args: &[&str]) -> (i32, String, String) {
    let out = run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_tebroker"))
            .args(["admin", "-b", &format!("127.0.0.1:{}", server.port)])
            .args(args),
        TIMEOUT,
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `envs` row of TE `name`, split at tabs, as the CLI prints it.
fn envs_row(server: &Server, name: &str) -> Option<Vec<String>> {
    let (code, stdout, stderr) = tebroker_admin(server, &["envs"]);
    assert_eq!(code, 0, "tebroker admin envs: {stderr}");
    stdout
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect::<Vec<_>>())
        .find(|f| f[0] == name)
}

/// Waits until TE `name` is listed in `state`; returns its row.
fn wait_state(server: &Server, name: &str, state: &str) -> Vec<String> {
    wait_until(&format!("{name} {state} in `envs`"), || {
        envs_row(server, name).filter(|f| f[1] == state)
    })
}

fn py_worker_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testenv/tests/py/te_worker.py")
}

/// A gear-based testenv-worker (`testenv-worker-<tenum>`) serving `datafile`.
fn py_worker(server: &Server, tenum: &str, datafile: &Path) -> LoggedChild {
    let python = require_program("python3");
    LoggedChild::spawn(
        &format!("te_worker.py {tenum}"),
        Command::new(python)
            .arg(py_worker_script())
            .arg(datafile)
            .args(["-b", &format!("127.0.0.1:{}", server.port), "-n", tenum]),
    )
}

fn te_datafile(dir: &Path) -> PathBuf {
    let path = dir.join("te.json");
    std::fs::write(
        &path,
        r#"{"host-ip":"192.0.2.1","ssh-key":"SECRET-SSH-KEY","env-num":"1","nodes":[]}"#,
    )
    .unwrap();
    path
}

/// A testenv client on raw sockets: registers its callback, asks for a TE.
struct RawClient {
    conn: Conn,
    callback: String,
    lockenv: Vec<u8>,
}

impl RawClient {
    fn request(server: &Server, jobnum: &str, tenant: &str) -> RawClient {
        let mut conn = server.conn();
        let callback = format!("callback_{jobnum}");
        conn.req(T::CanDo, &[callback.as_bytes()]);
        let request = format!(
            r#"{{"callback_name":"{callback}","timeout":"600","job_identifier":"job-{jobnum}","tenant":"{tenant}"}}"#
        );
        conn.req(
            T::SubmitJob,
            &[b"lockenv".as_slice(), b"", request.as_bytes()],
        );
        let lockenv = conn.expect(T::JobCreated).arg(0).to_vec();
        RawClient {
            conn,
            callback,
            lockenv,
        }
    }

    /// Waits for the TE's data on the callback (the lease has begun); returns the job handle.
    fn take_te(&mut self) -> (Vec<u8>, String) {
        loop {
            self.conn.req::<&[u8]>(T::GrabJob, &[]);
            let p = self.conn.packet();
            match p.ptype {
                T::JobAssign => {
                    assert_eq!(p.arg(1), self.callback.as_bytes());
                    return (
                        p.arg(0).to_vec(),
                        String::from_utf8_lossy(p.arg(2)).into_owned(),
                    );
                }
                T::NoJob => {
                    self.conn.req::<&[u8]>(T::PreSleep, &[]);
                    self.conn.expect(T::Noop);
                }
                other => panic!("{}: unexpected {other}", self.callback),
            }
        }
    }

    /// Ends the lease: the callback job completes, then the worker completes lockenv.
    fn release(&mut self, callback_job: &[u8]) {
        self.conn.req(T::WorkComplete, &[callback_job, b""]);
        let done = self.conn.expect(T::WorkComplete);
        assert_eq!(done.arg(0), &self.lockenv[..], "lockenv completes");
    }
}

#[test]
fn envs_shows_a_plain_testenv_worker_ready_leased_and_gone() {
    let server = Server::tebroker();
    let dir = tempfile::tempdir().unwrap();
    let mut worker = py_worker(&server, "te1", &te_datafile(dir.path()));
    let row = wait_state(&server, "testenv-worker-te1", "ready");
    assert_eq!(row[5], "127.0.0.1", "host: {row:?}");
    assert_eq!((row[7].as_str(), row[8].as_str()), ("", ""), "no lease yet");

    let mut client = RawClient::request(&server, "41", "");
    let (callback_job, data) = client.take_te();
    assert!(data.contains("192.0.2.1"));
    let row = wait_state(&server, "testenv-worker-te1", "leased");
    assert_eq!(row[3], "job-41", "holder: {row:?}");
    let (_, listing, _) = tebroker_admin(&server, &["envs"]);
    assert!(!listing.contains("SECRET"), "{listing}");

    client.release(&callback_job);
    let row = wait_state(&server, "testenv-worker-te1", "ready");
    assert_eq!((row[7].as_str(), row[8].as_str()), ("0.00", "released"));

    worker.kill();
    let row = wait_state(&server, "testenv-worker-te1", "gone");
    assert_eq!(row[8], "released", "its history stays: {row:?}");
}

#[test]
fn drain_takes_a_plain_worker_out_of_rotation_and_undrain_puts_it_back() {
    let server = Server::tebroker();
    let dir = tempfile::tempdir().unwrap();
    let datafile = te_datafile(dir.path());
    let _te1 = py_worker(&server, "te1", &datafile);
    let _te2 = py_worker(&server, "te2", &datafile);
    wait_state(&server, "testenv-worker-te1", "ready");
    wait_state(&server, "testenv-worker-te2", "ready");

    let (code, stdout, stderr) = tebroker_admin(&server, &["drain", "testenv-worker-te1"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("OK drain testenv-worker-te1"),
        "{stdout}"
    );
    wait_state(&server, "testenv-worker-te1", "drained");

    // The only TE in rotation serves the first client; the second waits for it.
    let mut a = RawClient::request(&server, "1", "");
    let (a_job, _) = a.take_te();
    assert_eq!(
        wait_state(&server, "testenv-worker-te2", "leased")[3],
        "job-1"
    );
    let mut b = RawClient::request(&server, "2", "");
    let handle = String::from_utf8(b.lockenv.clone()).unwrap();
    assert_eq!(server.admin_line(&format!("position {handle}")), "OK 1 1");
    a.release(&a_job);
    let (b_job, _) = b.take_te();
    assert_eq!(
        wait_state(&server, "testenv-worker-te2", "leased")[3],
        "job-2"
    );
    assert_eq!(
        envs_row(&server, "testenv-worker-te1").unwrap()[1],
        "drained"
    );

    let (code, stdout, stderr) = tebroker_admin(&server, &["undrain", "testenv-worker-te1"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("OK undrain"), "{stdout}");
    let mut c = RawClient::request(&server, "3", "");
    let (c_job, _) = c.take_te();
    assert_eq!(
        wait_state(&server, "testenv-worker-te1", "leased")[3],
        "job-3"
    );
    b.release(&b_job);
    c.release(&c_job);

    let (code, _, stderr) = tebroker_admin(&server, &["drain", "no-such-te"]);
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("ERR unknown_te no TE named no-such-te"),
        "{stderr}"
    );
}

const REPORT: &str = r#"{"agent":"host1","host":"host1.example","version":"testenv-agent 0.1.0","sent_ms":1700000000000,"envs":[{"name":"ovb-te1","state":"ready","since_ms":1700000000000,"labels":["ovb"]},{"name":"ovb-te2","state":"unhealthy","since_ms":1700000000000,"detail":"health hook exited 1"}]}"#;

fn gearman(server: &Server) -> Command {
    let mut cmd = Command::new(require_program("gearman"));
    cmd.args(["-h", "127.0.0.1", "-p", &server.port.to_string()]);
    cmd
}

#[test]
fn an_agents_report_is_listed_and_control_commands_reach_the_agent() {
    let server = Server::tebroker();
    assert!(server.admin_line("version").starts_with("OK tebroker "));
    let out = run_with_timeout(
        gearman(&server).args(["-b", "-f", "tebroker:te-report", REPORT]),
        TIMEOUT,
    );
    assert!(out.status.success(), "{out:?}");
    let row = wait_state(&server, "ovb-te1", "ready");
    assert_eq!(&row[4..7], ["host1", "host1.example", "ovb"]);
    assert_eq!(envs_row(&server, "ovb-te2").unwrap()[1], "unhealthy");
    // Consumed, never queued.
    assert!(!server
        .admin_block("status")
        .iter()
        .any(|l| l.starts_with("tebroker:te-report")));

    // A malformed report is refused and counted.
    let out = run_with_timeout(
        gearman(&server).args(["-b", "-f", "tebroker:te-report", "{not json"]),
        TIMEOUT,
    );
    // (the CLI exits 0 anyway, but prints the broker's error)
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("INVALID_REPORT"),
        "{out:?}"
    );
    assert!(server
        .admin_block("stats")
        .contains(&"agent_reports_refused\t1".to_string()));

    // The agent's control function, served by `gearman -w`: the command lands in a file and
    // the worker answers as an agent does; that answer is the admin command's.
    let dir = tempfile::tempdir().unwrap();
    let got = dir.path().join("command.json");
    let mut agent_worker = gearman(&server);
    agent_worker
        .args(["-w", "-c", "1", "-f", "testenv-agent:ctl:host1", "--"])
        .args([
            "sh",
            "-c",
            &format!(
                r#"cat > {}; printf '{{"ok":true,"message":"hold ovb-te1"}}'"#,
                got.display()
            ),
        ]);
    let mut agent = KillOnDrop(agent_worker.spawn().unwrap());
    wait_until("the control function's worker", || {
        parse_status(&server.admin_block("status"))
            .into_iter()
            .find(|r| r.function == "testenv-agent:ctl:host1" && r.workers == 1)
    });
    let (code, stdout, stderr) = tebroker_admin(&server, &["hold", "ovb-te1", "600"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, "OK hold ovb-te1: agent host1: hold ovb-te1\n");
    let status = wait_until("the control worker to finish", || agent.try_status());
    assert!(status.success());
    let command: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&got).unwrap()).unwrap();
    assert_eq!(command["op"], "hold");
    assert_eq!(command["env"], "ovb-te1");
    assert_eq!(command["hold_secs"], 600);
    assert_eq!(command["requested_by"], "tebroker admin");

    // With the agent's worker gone, nothing is queued for nobody.
    wait_until("the control worker to be gone", || {
        (!parse_status(&server.admin_block("status"))
            .iter()
            .any(|r| r.function == "testenv-agent:ctl:host1" && r.workers > 0))
        .then_some(())
    });
    let (code, _, stderr) = tebroker_admin(&server, &["drain", "ovb-te1"]);
    assert_eq!(code, 1);
    assert!(stderr.starts_with("ERR agent_unreachable"), "{stderr}");
}

#[test]
fn lock_requests_are_served_fairly_across_two_tenants() {
    let server = Server::tebroker();
    let mut clients: Vec<RawClient> = Vec::new();
    for n in 0..4 {
        clients.push(RawClient::request(
            &server,
            &format!("busy{n}"),
            "busy-project",
        ));
    }
    clients.push(RawClient::request(&server, "small", "small-project"));
    let small = String::from_utf8(clients[4].lockenv.clone()).unwrap();
    assert_eq!(server.admin_line(&format!("position {small}")), "OK 2 5");

    let mut worker = server.conn();
    worker.req(T::CanDo, &[b"lockenv"]);
    let mut order = Vec::new();
    for _ in 0..5 {
        worker.req::<&[u8]>(T::GrabJob, &[]);
        let job = worker.expect(T::JobAssign);
        let request: serde_json::Value = serde_json::from_slice(job.arg(2)).unwrap();
        order.push(request["job_identifier"].as_str().unwrap().to_string());
        worker.req(T::WorkComplete, &[job.arg(0), b""]);
    }
    assert_eq!(
        order,
        [
            "job-busy0",
            "job-small",
            "job-busy1",
            "job-busy2",
            "job-busy3"
        ]
    );
    for c in &mut clients {
        assert_eq!(c.conn.expect(T::WorkComplete).arg(0), &c.lockenv[..]);
    }
}
