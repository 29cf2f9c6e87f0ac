//! WORK_EXCEPTION reaches every client, as geard forwards it: PyPI `gear` clients get
//! `job.exception` without sending OPTION_REQ, and Debian's `gearman` CLI (libgearman) reports
//! the exception as an error. Each check runs against real peers, with geard (and gearmand,
//! whose rule differs) as baselines. Needs python3 with `gear` and gearman-tools
//! (scripts/install-peers.sh).

mod harness;

use std::process::{Command, Output};
use std::thread::JoinHandle;
use std::time::Duration;

use gearman_proto::{Packet, PacketType};
use harness::{require_program, run_with_timeout, wait_until, Conn, Server};

const RUN: Duration = Duration::from_secs(30);
const EXCEPTION: &str = "boom: it broke";

/// A gear client that submits one job without asking for exceptions and prints how it ended.
/// With `--gear-worker`, a gear worker in the same process answers it with WORK_EXCEPTION.
const GEAR_CLIENT: &str = r#"
import sys, threading, time
import gear

port, fn, exception = int(sys.argv[1]), sys.argv[2], sys.argv[3].encode()
if "--gear-worker" in sys.argv:
    worker = gear.Worker("exc-worker")
    worker.addServer("127.0.0.1", port)
    worker.waitForServer(10)
    worker.registerFunction(fn)

    def serve():
        job = worker.getJob()
        job.sendWorkException(exception)

    threading.Thread(target=serve, daemon=True).start()
client = gear.Client("plain-client")
client.addServer("127.0.0.1", port)
client.waitForServer(10)
job = gear.Job(fn, b"payload")
client.submitJob(job, timeout=10)
deadline = time.monotonic() + 10
while not job.complete:
    if time.monotonic() > deadline:
        print("TIMEOUT waiting for the job to end")
        sys.exit(1)
    time.sleep(0.01)
print("exception=%r failure=%r" % (job.exception, job.failure))
"#;

fn python() -> String {
    std::env::var("TEBROKER_TEST_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Runs `cmd` in a thread, so the test can play the worker meanwhile.
fn spawn_run(mut cmd: Command) -> JoinHandle<Output> {
    std::thread::spawn(move || run_with_timeout(&mut cmd, RUN))
}

fn gear_client(server: &Server, function: &str, gear_worker: bool) -> Command {
    let mut cmd = Command::new(python());
    cmd.args(["-c", GEAR_CLIENT])
        .args([&server.port.to_string(), function, EXCEPTION]);
    if gear_worker {
        cmd.arg("--gear-worker");
    }
    cmd
}

/// A raw worker of `function`.
fn raw_worker(server: &Server, function: &str) -> Conn {
    let mut worker = server.conn();
    worker.req(PacketType::CanDo, &[function]);
    worker
}

/// Grabs the job the client submits (polling GRAB_JOB_UNIQ, which geard answers too) and ends
/// it with WORK_EXCEPTION.
fn answer_with_exception(worker: &mut Conn) {
    let assigned: Packet = wait_until("the client's job to reach the worker", || {
        worker.req::<&[u8]>(PacketType::GrabJobUniq, &[]);
        let p = worker.packet();
        (p.ptype == PacketType::JobAssignUniq).then_some(p)
    });
    worker.req(
        PacketType::WorkException,
        &[&assigned.args[0][..], EXCEPTION.as_bytes()],
    );
}

/// The line the gear client printed, after checking it exited cleanly.
fn gear_verdict(out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "gear client failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn forwarded() -> String {
    format!("exception=b'{EXCEPTION}' failure=True")
}

#[test]
fn gear_client_gets_the_exception_of_a_gear_worker_without_asking() {
    for mut server in [Server::tebroker(), Server::geard()] {
        let f = harness::unique_name("exc_gear");
        let verdict = gear_verdict(spawn_run(gear_client(&server, &f, true)).join().unwrap());
        assert_eq!(verdict, forwarded(), "against {:?}", server.kind);
        if server.kind == harness::Kind::Tebroker {
            server.assert_alive();
            server.assert_no_panic_in_log();
        }
    }
}

#[test]
fn gear_client_gets_the_exception_of_a_raw_worker_without_asking() {
    let server = Server::tebroker();
    let f = harness::unique_name("exc_raw");
    let mut worker = raw_worker(&server, &f);
    let client = spawn_run(gear_client(&server, &f, false));
    answer_with_exception(&mut worker);
    assert_eq!(gear_verdict(client.join().unwrap()), forwarded());
}

/// The rule tebroker no longer follows: gearmand turns the exception into WORK_FAIL for a
/// client that did not ask (README, "Rules that differ").
#[test]
fn gearmand_baseline_hides_the_exception_from_a_client_that_did_not_ask() {
    let server = Server::gearmand();
    let f = harness::unique_name("exc_gearmand");
    let verdict = gear_verdict(spawn_run(gear_client(&server, &f, true)).join().unwrap());
    assert_eq!(verdict, "exception=None failure=True");
}

/// `gearman -f F -- data` against a raw worker that ends the job with WORK_EXCEPTION.
fn gearman_cli_run(server: &Server) -> Output {
    let f = harness::unique_name("exc_cli");
    let mut worker = raw_worker(server, &f);
    let mut cli = Command::new(require_program("gearman"));
    cli.args(["-h", "127.0.0.1", "-p", &server.port.to_string(), "-f", &f])
        .args(["--", "payload"]);
    let run = spawn_run(cli);
    answer_with_exception(&mut worker);
    run.join().unwrap()
}

#[test]
fn gearman_cli_reports_the_exception_as_an_error() {
    let mut server = Server::tebroker();
    let out = gearman_cli_run(&server);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    // libgearman hands the exception to the CLI as the job's error: printed on stderr, no
    // result on stdout.
    assert!(stderr.contains(EXCEPTION), "stderr: {stderr:?}");
    assert!(stdout.trim().is_empty(), "a result was printed: {stdout:?}");
    // Exactly what the same CLI does against geard, whose rule tebroker now follows (its exit
    // status is libgearman's choice: see README).
    let geard = gearman_cli_run(&Server::geard());
    assert_eq!(
        (out.status.code(), &out.stdout, &out.stderr),
        (geard.status.code(), &geard.stdout, &geard.stderr)
    );
    server.assert_alive();
    server.assert_no_panic_in_log();
}
