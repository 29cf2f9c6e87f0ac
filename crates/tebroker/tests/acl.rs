//! geard-compatible ACLs end to end: certificate CN → identity → register/invoke/grant rules and
//! the `acl` admin commands, over real TLS connections to the real binary.

mod harness;

use gearman_proto::PacketType as T;
use harness::{path, tls_connect, Files, Pki, Server, Stream, TlsStream};

const ACL: &str = "\
# recommended testenv deployment (docs/security.md)
[testenv-worker]
register = lockenv
invoke = callback_

[testenv-client]
register = callback_
invoke = lockenv

[operator]
grant = true
";

struct Setup {
    pki: Pki,
    broker: Server,
    certs: Vec<(String, Files)>,
}

impl Setup {
    fn new() -> Setup {
        let pki = Pki::new("test CA");
        let server = pki.issue("localhost");
        let certs = ["testenv-worker", "testenv-client", "operator", "stranger"]
            .iter()
            .map(|cn| (cn.to_string(), pki.issue(cn)))
            .collect();
        let acl = pki.dir.path().join("acl.ini");
        std::fs::write(&acl, ACL).unwrap();
        let broker =
            Server::tebroker_with(&harness::strs(&harness::tls_acl_args(&server, &pki, &acl)));
        Setup { pki, broker, certs }
    }

    fn as_(&self, cn: &str) -> Stream<TlsStream> {
        let files = &self.certs.iter().find(|(n, _)| n == cn).unwrap().1;
        tls_connect(self.broker.addr(), &self.pki.ca(), Some(files))
    }
}

fn workers_line(admin: &mut Stream<TlsStream>, id_hint: &str) -> String {
    admin
        .admin("workers")
        .lines()
        .find(|l| l.contains(id_hint))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn register_and_invoke_rules() {
    let s = Setup::new();
    let mut worker = s.as_("testenv-worker");
    let mut client = s.as_("testenv-client");
    let mut stranger = s.as_("stranger");
    let mut op = s.as_("operator");

    worker.send(T::SetClientId, &[b"w1"]);
    worker.send(T::CanDo, &[b"lockenv"]);
    worker.send(T::CanDo, &[b"callback_steal"]); // not allowed: ignored
    stranger.send(T::SetClientId, &[b"s1"]);
    stranger.send(T::CanDo, &[b"lockenv"]); // no entry: ignored
    client.send(T::SetClientId, &[b"c1"]);
    client.send(T::CanDo, &[b"callback_1"]);
    // ECHO as a barrier: the CAN_DOs before it are done.
    for c in [&mut worker, &mut stranger, &mut client] {
        c.send(T::EchoReq, &[b"sync"]);
        assert_eq!(
            c.recv().ptype,
            T::EchoRes,
            "CAN_DO denied silently, as geard does"
        );
    }
    assert!(workers_line(&mut op, " w1 ").ends_with(": lockenv"));
    assert!(workers_line(&mut op, " s1 ").ends_with(":"));
    assert!(workers_line(&mut op, " c1 ").ends_with(": callback_1"));

    // invoke: the client may submit lockenv, the stranger nothing.
    client.send(T::SubmitJob, &[b"lockenv", b"", b"{}"]);
    assert_eq!(client.recv().ptype, T::JobCreated);
    for (c, f) in [
        (&mut stranger, &b"lockenv"[..]),
        (&mut client, &b"callback_1"[..]),
    ] {
        c.send(T::SubmitJobBg, &[f, b"", b"x"]);
        let e = c.recv();
        assert_eq!(e.ptype, T::Error);
        assert_eq!(e.arg(1), b"Permission denied by ACL");
    }
    // The worker may submit to callbacks (the TE data), and the real flow completes.
    worker.send(T::GrabJob, &[]);
    let lock = worker.recv();
    assert_eq!(lock.ptype, T::JobAssign);
    worker.send(T::SubmitJob, &[b"callback_1", b"", b"te data"]);
    assert_eq!(worker.recv().ptype, T::JobCreated);
    client.send(T::GrabJob, &[]);
    let cb = client.recv();
    assert_eq!(cb.ptype, T::JobAssign);
    client.send(T::WorkComplete, &[cb.arg(0), b""]);
    assert_eq!(worker.recv().ptype, T::WorkComplete);
    worker.send(T::WorkComplete, &[lock.arg(0), b""]);
    assert_eq!(client.recv().ptype, T::WorkComplete);

    let stats = op.admin("stats");
    assert!(stats.contains("acl_register_denied\t2\n"), "{stats}");
    assert!(stats.contains("acl_invoke_denied\t2\n"), "{stats}");
}

#[test]
fn acl_admin_commands() {
    let s = Setup::new();
    let mut op = s.as_("operator");
    let mut stranger = s.as_("stranger");
    let mut client = s.as_("testenv-client");
    assert_eq!(
        op.admin("acl list"),
        "operator\tregister=None\tinvoke=None\tgrant=True\n\
         testenv-client\tregister=callback_\tinvoke=lockenv\tgrant=False\n\
         testenv-worker\tregister=lockenv\tinvoke=callback_\tgrant=False\n.\n"
    );
    // grant needs the grant permission.
    assert_eq!(
        stranger.admin("acl grant invoke stranger .*"),
        "ERR PERMISSION_DENIED\n"
    );
    assert_eq!(op.admin("acl grant invoke stranger echo"), "OK\n");
    assert_eq!(op.admin("acl grant register stranger echo"), "OK\n");
    assert_eq!(
        op.admin("acl grant frob stranger x"),
        "ERR UNKNOWN_ACL_VERB\n"
    );
    assert!(op
        .admin("acl grant register stranger (")
        .starts_with("ERR UNABLE"));
    // The grant takes effect at once on live connections.
    stranger.send(T::SubmitJobBg, &[b"echo", b"", b"x"]);
    assert_eq!(stranger.recv().ptype, T::JobCreated);
    // revoke: others' entries need grant, one's own does not.
    assert_eq!(
        client.admin("acl revoke invoke stranger"),
        "ERR PERMISSION_DENIED\n"
    );
    assert_eq!(stranger.admin("acl revoke invoke stranger"), "OK\n");
    stranger.send(T::SubmitJobBg, &[b"echo", b"", b"x"]);
    assert_eq!(stranger.recv().ptype, T::Error);
    assert_eq!(stranger.admin("acl self-revoke register"), "OK\n");
    assert!(
        !op.admin("acl list").contains("stranger"),
        "empty entries go away"
    );
    // grant grant, then the new granter grants.
    assert_eq!(op.admin("acl grant grant stranger"), "OK\n");
    assert_eq!(stranger.admin("acl grant invoke stranger .*"), "OK\n");
    assert_eq!(op.admin("acl revoke all stranger"), "OK\n");
    assert_eq!(client.admin("acl self-revoke all"), "OK\n");
    assert_eq!(
        op.admin("acl list"),
        "operator\tregister=None\tinvoke=None\tgrant=True\n\
         testenv-worker\tregister=lockenv\tinvoke=callback_\tgrant=False\n.\n"
    );
    // State-changing admin commands need permission when ACLs are on.
    assert_eq!(stranger.admin("shutdown"), "ERR PERMISSION_DENIED\r\n");
    assert_eq!(
        stranger.admin("maxqueue lockenv 1"),
        "ERR PERMISSION_DENIED\r\n"
    );
    assert_eq!(op.admin("maxqueue lockenv 1"), "OK\r\n");
    assert!(op.admin("stats").contains("acl_admin_denied\t4\n"));
}

#[test]
fn acl_without_tls_denies_everything_and_acl_commands_report_disabled_without_acl() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl.ini");
    std::fs::write(&acl, ACL).unwrap();
    let broker = Server::tebroker_with(&["--acl", path(&acl)]);
    let mut c = broker.connect();
    c.send(T::SubmitJob, &[b"lockenv", b"", b"x"]);
    assert_eq!(c.recv().arg(1), b"Permission denied by ACL");
    assert!(broker
        .log_text()
        .contains("every CAN_DO and SUBMIT_JOB will be denied"));

    let plain = Server::tebroker_with(&[]);
    assert_eq!(plain.connect().admin("acl list"), "ERR ACL_DISABLED\n");

    let bad = dir.path().join("bad.ini");
    std::fs::write(&bad, "[x]\nregister = (\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tebroker"))
        .args(["serve", "-p", "0", "-L", "127.0.0.1", "--acl", path(&bad)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid ACL file"));
}
