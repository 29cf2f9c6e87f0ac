//! TLS on the broker's port: without client certificates, with `--ssl-ca` (client certificates
//! required and verified), and PyPI `gear` over SSL.

mod harness;

use std::process::Command;
use std::time::Duration;

use gearman_proto::PacketType as T;
use harness::{path, tls_connect, try_tls_connect, Pki, Server};

fn echo<S: std::io::Read + std::io::Write>(c: &mut harness::Stream<S>) {
    c.send(T::EchoReq, &[b"over tls"]);
    let p = c.recv();
    assert_eq!(p.ptype, T::EchoRes);
    assert_eq!(p.arg(0), b"over tls");
}

#[test]
fn tls_without_client_certificates() {
    let pki = Pki::new("test CA");
    let server = pki.issue("localhost");
    let mut broker = Server::tebroker_with(&[
        "--ssl-cert",
        path(&server.cert),
        "--ssl-key",
        path(&server.key),
    ]);
    let mut c = tls_connect(broker.addr(), &pki.ca(), None);
    echo(&mut c);
    assert!(c.admin("status").ends_with(".\n"));
    // A full job over TLS.
    let mut w = tls_connect(broker.addr(), &pki.ca(), None);
    w.send(T::CanDo, &[b"rev"]);
    c.send(T::SubmitJob, &[b"rev", b"", b"hello"]);
    assert_eq!(c.recv().ptype, T::JobCreated);
    w.send(T::GrabJob, &[]);
    let job = w.recv();
    assert_eq!(job.ptype, T::JobAssign);
    w.send(T::WorkComplete, &[job.arg(0), b"olleh"]);
    let done = c.recv();
    assert_eq!(done.ptype, T::WorkComplete);
    assert_eq!(done.arg(1), b"olleh");

    // Plain Gearman on the TLS port is refused, and counted; the server goes on.
    let mut plain = broker.connect();
    let _ = plain.raw(b"status\n");
    assert!(plain.closed_within(Duration::from_secs(5)));
    broker.wait_stat_tls("tls_handshake_failures", 1, &pki);
    echo(&mut tls_connect(broker.addr(), &pki.ca(), None));
    assert!(broker.alive());
}

trait TlsStat {
    fn wait_stat_tls(&self, name: &str, want: u64, pki: &Pki);
}

impl TlsStat for Server {
    /// `stats` over TLS (the port speaks nothing else).
    fn wait_stat_tls(&self, name: &str, want: u64, pki: &Pki) {
        let until = std::time::Instant::now() + harness::TIMEOUT;
        loop {
            let text = tls_connect(self.addr(), &pki.ca(), None).admin("stats");
            let v: u64 = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}\t")))
                .unwrap()
                .parse()
                .unwrap();
            if v >= want {
                return;
            }
            assert!(std::time::Instant::now() < until, "{name} = {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn ssl_ca_requires_a_client_certificate() {
    let pki = Pki::new("test CA");
    let server = pki.issue("localhost");
    let client = pki.issue("ci-client");
    let stranger_pki = Pki::new("another CA");
    let stranger = stranger_pki.issue("ci-client");
    let broker = Server::tebroker_with(&[
        "--ssl-cert",
        path(&server.cert),
        "--ssl-key",
        path(&server.key),
        "--ssl-ca",
        path(&pki.ca()),
    ]);
    // With a certificate from the CA: served.
    let mut ok = tls_connect(broker.addr(), &pki.ca(), Some(&client));
    echo(&mut ok);

    // Without a certificate: rejected. With TLS 1.3 the client may finish its side of the
    // handshake before the server's verdict arrives, so the refusal can also show on first use.
    for cert in [None, Some(&stranger)] {
        match try_tls_connect(broker.addr(), &pki.ca(), cert) {
            Err(_) => {}
            Ok(mut c) => {
                let _ = c.raw(&gearman_proto::Packet::req(T::EchoReq, ["x"]).to_bytes());
                assert!(
                    c.recv_until_closed().is_empty(),
                    "no reply without a valid cert"
                );
            }
        }
    }
    let text = tls_connect(broker.addr(), &pki.ca(), Some(&client)).admin("stats");
    assert!(text.contains("tls_handshake_failures\t2\n"), "{text}");
    // The identity reaches the core: it is what ACLs check (see acl.rs); and the rejected
    // connections never became broker connections.
    assert!(text.contains("connections\t2\n"), "{text}"); // `ok` and this one
    echo(&mut ok);
}

#[test]
fn bad_tls_settings_fail_at_start() {
    let pki = Pki::new("test CA");
    let server = pki.issue("localhost");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tebroker"))
            .args(["serve", "-p", "0", "-L", "127.0.0.1"])
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--ssl-cert", path(&server.cert)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ssl-key"));
    // Key and certificate swapped: an error naming the files, never the key's content.
    let out = run(&[
        "--ssl-cert",
        path(&server.key),
        "--ssl-key",
        path(&server.cert),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("PRIVATE KEY"), "{err}");
}

const GEAR_SCRIPT: &str = r#"
import sys, threading, time, gear
port = int(sys.argv[1]); d = sys.argv[2]
def ssl(cn):
    return dict(ssl_key=f"{d}/{cn}.key", ssl_cert=f"{d}/{cn}.crt", ssl_ca=f"{d}/ca.pem")
w = gear.Worker("w")
w.addServer("127.0.0.1", port, **ssl("worker"))
w.registerFunction("lockenv")
w.waitForServer()
def work():
    job = w.getJob()
    job.sendWorkComplete(job.arguments[::-1])
threading.Thread(target=work, daemon=True).start()
c = gear.Client("c")
c.addServer("127.0.0.1", port, **ssl("client"))
c.waitForServer()
time.sleep(0.5)
job = gear.Job("lockenv", b"hello")
c.submitJob(job)
deadline = time.time() + 10
while not job.complete and time.time() < deadline:
    time.sleep(0.05)
assert job.complete, "job did not complete"
print("RESULT", b"".join(job.data).decode())
# Denied by the ACL: the client may not invoke anything but lockenv.
bad = gear.Job("other", b"x")
try:
    c.submitJob(bad, timeout=5)
    print("SUBMITTED")
except Exception as e:
    print("REFUSED", type(e).__name__)
"#;

#[test]
fn pypi_gear_over_ssl_with_acl() {
    let pki = Pki::new("test CA");
    let server = pki.issue("localhost");
    pki.issue("worker");
    pki.issue("client");
    let acl = pki.dir.path().join("acl.ini");
    std::fs::write(
        &acl,
        "[worker]\nregister = lockenv\n\n[client]\nregister = callback_.*\ninvoke = lockenv$\n",
    )
    .unwrap();
    let broker = Server::tebroker_with(&harness::strs(&harness::tls_acl_args(&server, &pki, &acl)));
    let out = Command::new("python3")
        .args([
            "-c",
            GEAR_SCRIPT,
            &broker.addr().port().to_string(),
            path(pki.dir.path()),
        ])
        .output()
        .expect("python3 with PyPI gear (scripts/install-peers.sh)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "gear failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("RESULT olleh"), "{stdout}");
    assert!(!stdout.contains("SUBMITTED"), "{stdout}");
    let stats = tls_connect(
        broker.addr(),
        &pki.ca(),
        Some(&harness::Files {
            cert: pki.dir.path().join("client.crt"),
            key: pki.dir.path().join("client.key"),
        }),
    )
    .admin("stats");
    assert!(stats.contains("acl_invoke_denied\t1\n"), "{stats}");
}

#[tokio::test(flavor = "multi_thread")]
async fn gearman_client_library_over_tls_with_a_client_certificate() {
    use gearman_client::{Client, ServerAddr, TlsConfig, Worker};
    let pki = Pki::new("test CA");
    let server = pki.issue("localhost");
    let worker_cert = pki.issue("worker");
    let client_cert = pki.issue("client");
    let acl = pki.dir.path().join("acl.ini");
    std::fs::write(
        &acl,
        "[worker]\nregister = reverse\n[client]\ninvoke = reverse\n",
    )
    .unwrap();
    let broker = Server::tebroker_with(&harness::strs(&harness::tls_acl_args(&server, &pki, &acl)));
    let addr = |files: Option<&harness::Files>| {
        ServerAddr::new("localhost", broker.addr().port()).with_tls(TlsConfig {
            ssl_cert: files.map(|f| f.cert.clone()),
            ssl_key: files.map(|f| f.key.clone()),
            ssl_ca: Some(pki.ca()),
        })
    };
    let worker = Worker::new(vec![addr(Some(&worker_cert))]);
    worker.register("reverse");
    tokio::spawn(async move {
        while let Some(job) = worker.grab_job().await {
            let mut out = job.data().to_vec();
            out.reverse();
            job.complete(out).await.ok();
        }
    });
    let client = Client::connect(vec![addr(Some(&client_cert))])
        .await
        .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), client.call("reverse", "abc"))
        .await
        .expect("job done in time")
        .unwrap();
    assert_eq!(&result[..], b"cba");
    // Without a client certificate the server refuses us.
    let anon = tokio::time::timeout(Duration::from_secs(10), async {
        let c = Client::connect(vec![addr(None)]).await?;
        c.call("reverse", "abc").await
    })
    .await
    .expect("an answer in time");
    assert!(anon.is_err());
    // A missing CA file is a clear configuration error.
    let mut bad = addr(Some(&client_cert));
    bad.tls.as_mut().unwrap().ssl_ca = Some(pki.dir.path().join("nope.pem"));
    let err = gearman_client::Connection::connect(&bad, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nope.pem"), "{err}");
}

fn tls_broker(pki: &Pki, extra: &[&str]) -> Server {
    let server = pki.issue("localhost");
    let mut args = vec![
        "--ssl-cert".to_string(),
        path(&server.cert).to_string(),
        "--ssl-key".to_string(),
        path(&server.key).to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Server::tebroker_with(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn a_handshake_not_finished_in_time_is_dropped() {
    let pki = Pki::new("test CA");
    let mut broker = tls_broker(&pki, &["--partial-packet-timeout", "1"]);
    // Connects and never says a word: the handshake cannot finish.
    let mut silent = broker.connect();
    assert!(
        silent.closed_within(harness::TIMEOUT),
        "the silent connection is still open"
    );
    broker.wait_stat_tls("tls_handshake_failures", 1, &pki);
    assert!(broker
        .log_text()
        .contains("TLS handshake not finished in time"));
    echo(&mut tls_connect(broker.addr(), &pki.ca(), None));
    assert!(broker.alive());
}

#[test]
fn max_connections_holds_over_tls() {
    let pki = Pki::new("test CA");
    let mut broker = tls_broker(&pki, &["--max-connections", "2"]);
    let mut first = tls_connect(broker.addr(), &pki.ca(), None);
    let mut second = tls_connect(broker.addr(), &pki.ca(), None);
    echo(&mut first);
    echo(&mut second);
    // A third is closed before its handshake (no SERVER_BUSY packet: it would not be TLS).
    let third = try_tls_connect(broker.addr(), &pki.ca(), None).map(|mut c| {
        c.send(T::EchoReq, &[b"x"]);
        c.next_frame()
    });
    assert!(
        matches!(third, Err(_) | Ok(None)),
        "a third TLS connection was served: {third:?}"
    );
    drop(first);
    // The slot is free again once the first connection has ended.
    let mut again = harness::wait_until("a free connection slot", || {
        try_tls_connect(broker.addr(), &pki.ca(), None)
            .ok()
            .and_then(|mut c| {
                c.send(T::EchoReq, &[b"over tls"]);
                matches!(c.next_frame(), Some(gearman_proto::Frame::Packet(_))).then_some(c)
            })
    });
    let stats = again.admin("stats");
    let refused: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("connections_refused\t"))
        .unwrap()
        .parse()
        .unwrap();
    assert!(refused >= 1, "{stats}");
    echo(&mut second);
    assert!(broker.alive());
}
