//! `tebroker serve` as an operator starts it: flags, config file, pidfile, signals, shutdown.

mod harness;

use std::process::{Command, Stdio};
use std::time::Duration;

use gearman_client::{Client, JobRequest, ServerAddr, Worker};
use harness::{wait_until, Server, TIMEOUT};

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// `tebroker serve ARGS...`; returns the child and the port from its first stdout line.
fn serve(args: &[&str]) -> (std::process::Child, u16) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tebroker"))
        .args(["serve", "--no-store"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("tebroker listening on 127.0.0.1:")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    (child, addr.parse().unwrap())
}

#[test]
fn config_file_pidfile_and_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("tebroker.pid");
    let config = dir.path().join("tebroker.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1\"\nport = 0\npidfile = \"{}\"\nmax_frame = 2048\nhandle_host = \"cfg-host\"\n",
            pidfile.display()
        ),
    )
    .unwrap();
    let (mut child, port) = serve(&["-d", "--config", config.to_str().unwrap()]);
    let written = std::fs::read_to_string(&pidfile).unwrap();
    assert_eq!(written.trim(), child.id().to_string());

    // The config's settings are in force: handles carry the host name, frames are limited.
    let mut conn = harness::Conn::connect(port);
    conn.req(gearman_proto::PacketType::SubmitJobBg, &["f", "", "x"]);
    let created = conn.expect(gearman_proto::PacketType::JobCreated);
    assert!(created.args[0].starts_with(b"H:cfg-host:"), "{created:?}");
    conn.req(gearman_proto::PacketType::EchoReq, &["y".repeat(4096)]);
    let (code, _) = harness::expect_error_packet(conn.next(TIMEOUT), "oversized echo");
    assert_eq!(code, "PACKET_TOO_LARGE");

    signal(child.id(), libc::SIGTERM);
    let status = wait_until("tebroker exits after SIGTERM", || child.try_wait().unwrap());
    assert!(status.success(), "{status:?}");
    assert!(!pidfile.exists(), "pidfile removed on exit");
}

#[test]
fn bad_config_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "port = \"not a number\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tebroker"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid config file"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_tebroker"))
        .args(["serve", "--config", "/nonexistent/tebroker.toml"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"));
}

#[test]
fn geard_spelling_of_flags_is_accepted() {
    let (mut child, port) = serve(&[
        "-p",
        "0",
        "--listen-address",
        "127.0.0.1",
        "--keepalive",
        "--keepalive-idle",
        "30",
        "--keepalive-interval",
        "5",
        "--keepalive-count",
        "3",
    ]);
    harness::check_round_trip(port);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `shutdown graceful` stops accepting but lets the job in hand finish.
#[test]
fn graceful_shutdown_waits_for_running_jobs() {
    let mut server = Server::tebroker();
    let addr = ServerAddr::localhost(server.port);
    test_support::block_on_within(Duration::from_secs(60), async {
        let worker = Worker::new([addr.clone()]);
        worker.register("slow");
        worker.wait_for_server(TIMEOUT).await.unwrap();
        let client = Client::connect([addr.clone()]).await.unwrap();
        let job = client.submit(JobRequest::new("slow", "x")).await.unwrap();
        let grabbed = worker.grab_job().await.unwrap();
        assert_eq!(server.admin_line("shutdown graceful"), "OK");
        // The listener closing shows the shutdown has begun; the job in hand keeps it running.
        wait_until("the listener to close", || {
            std::net::TcpStream::connect(server.addr())
                .is_err()
                .then_some(())
        });
        assert!(
            server.exit_status().is_none(),
            "still running while a job is in hand"
        );
        grabbed.complete("done").await.unwrap();
        assert_eq!(&job.result().await.unwrap()[..], b"done");
    });
    let status = wait_until("tebroker exits once the job is done", || {
        server.exit_status()
    });
    assert!(status.success());
}

#[test]
fn the_sample_config_in_contrib_is_valid() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../../contrib/tebroker.toml");
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("leases.jsonl");
    // Its own port, HTTP address and history path are for a real host; override them.
    let (mut child, port) = serve(&[
        "--config",
        config,
        "-p",
        "0",
        "-L",
        "127.0.0.1",
        "--http",
        "127.0.0.1:0",
        "--history-file",
        history.to_str().unwrap(),
    ]);
    harness::check_round_trip(port);
    child.kill().unwrap();
    child.wait().unwrap();
}
