//! Callback hijack protection (on by default) and secrets: no log line, error or admin output
//! carries TE data.

mod harness;

use gearman_proto::PacketType as T;
use harness::Server;

const SECRET: &str = "SECRET-ssh-key-3f9a";

#[test]
fn a_second_registration_of_a_callback_is_refused_and_logged() {
    let mut broker = Server::tebroker_with(&[]);
    let mut owner = broker.connect();
    let mut thief = broker.connect();
    let mut te_worker = broker.connect();
    let mut client = broker.connect();
    owner.send(T::CanDo, &[b"callback_42"]);
    owner.send(T::EchoReq, &[b"sync"]);
    assert_eq!(owner.recv().ptype, T::EchoRes);

    thief.send(T::CanDo, &[b"callback_42"]);
    let e = thief.recv();
    assert_eq!(e.ptype, T::Error);
    assert_eq!(e.arg(0), b"CALLBACK_TAKEN");
    assert_eq!(broker.stat("callback_hijacks_refused"), 1);
    assert!(broker
        .log_text()
        .contains("callback hijack attempt refused"));

    // The legitimate flow: lockenv names callback_42, the TE worker submits the data to it, and
    // only the owner gets it.
    te_worker.send(T::CanDo, &[b"lockenv"]);
    let request =
        format!(r#"{{"callback_name": "callback_42", "timeout": "60", "ssh_key": "{SECRET}"}}"#);
    client.send(T::SubmitJob, &[b"lockenv", b"", request.as_bytes()]);
    assert_eq!(client.recv().ptype, T::JobCreated);
    te_worker.send(T::GrabJob, &[]);
    let lock = te_worker.recv();
    te_worker.send(T::SubmitJob, &[b"callback_42", b"", SECRET.as_bytes()]);
    assert_eq!(te_worker.recv().ptype, T::JobCreated);
    thief.send(T::GrabJob, &[]);
    assert_eq!(thief.recv().ptype, T::NoJob, "the thief holds no callback");
    owner.send(T::GrabJob, &[]);
    let cb = owner.recv();
    assert_eq!(cb.ptype, T::JobAssign);
    assert_eq!(cb.arg(2), SECRET.as_bytes());

    // While the callback job runs, the owner dies: the TE worker learns at once, and a job queued
    // for the callback stays reserved for the owner's address (same host here, so the
    // reconnecting client may take it back) -- see docs/security.md.
    drop(owner);
    assert_eq!(te_worker.recv().ptype, T::WorkFail);
    te_worker.send(T::WorkComplete, &[lock.arg(0), b""]);
    assert_eq!(client.recv().ptype, T::WorkComplete);
    broker.assert_serving();
}

#[test]
fn geard_compatible_mode_allows_it() {
    let broker = Server::tebroker_with(&["--no-callback-protection"]);
    let mut a = broker.connect();
    let mut b = broker.connect();
    a.send(T::CanDo, &[b"callback_1"]);
    b.send(T::CanDo, &[b"callback_1"]);
    b.send(T::EchoReq, &[b"x"]);
    assert_eq!(b.recv().ptype, T::EchoRes);
    assert_eq!(broker.stat("callback_hijacks_refused"), 0);
}

#[test]
fn no_log_line_or_admin_output_carries_te_data() {
    let mut broker = Server::tebroker_env(&["-vvv"], &[("RUST_LOG", "trace")]);
    let secret = SECRET.as_bytes();
    let mut cbw = broker.connect();
    let mut client = broker.connect();
    let mut tew = broker.connect();
    let mut admin = broker.connect();
    cbw.send(T::CanDo, &[b"callback_s"]);
    tew.send(T::CanDo, &[b"lockenv"]);
    tew.send(T::SetClientId, &[b"te-1"]);
    let request = format!(
        r#"{{"callback_name": "callback_s", "timeout": "60", "ssh_key": "{SECRET}", "job_identifier": "j1"}}"#
    );
    client.send(T::SubmitJob, &[b"lockenv", b"", request.as_bytes()]);
    client.recv();
    tew.send(T::GrabJobUniq, &[]);
    let lock = tew.recv();
    tew.send(T::SubmitJob, &[b"callback_s", b"u1", secret]);
    tew.recv();
    tew.send(T::SubmitJobBg, &[b"callback_s", b"", secret]);
    tew.recv();
    // Every admin view while the lease is held.
    let mut outputs = Vec::new();
    for cmd in [
        "status",
        "workers",
        "show jobs",
        "show unique jobs",
        "leases",
        "stats",
        "prioritystatus",
    ] {
        outputs.push(admin.admin(cmd));
    }
    assert!(
        outputs[4].contains("callback_s"),
        "the lease is shown: {}",
        outputs[4]
    );
    // Hostile and failing paths that log: a thief, work for a job not held, malformed packets.
    let mut thief = broker.connect();
    thief.send(T::CanDo, &[b"callback_s"]);
    thief.recv();
    thief.send(T::WorkComplete, &[b"H:x:1", secret]);
    thief.send(T::WorkData, &[b"H:x:1", secret]);
    let mut bad = request.as_bytes().to_vec();
    bad.retain(|&b| b != 0);
    let mut pkt = b"\0REQ\0\0\0\x07".to_vec(); // SUBMIT_JOB without NULs
    pkt.extend_from_slice(&(bad.len() as u32).to_be_bytes());
    pkt.extend_from_slice(&bad);
    thief.raw(&pkt).unwrap();
    assert_eq!(thief.recv().ptype, T::Error);
    thief.raw(format!("{SECRET}\n").as_bytes()).unwrap();
    // (gearmand echoes an unknown command's word back to its sender, who knows it already.)
    assert!(
        matches!(thief.next_frame(), Some(gearman_proto::Frame::Admin(l)) if l.starts_with("ERR UNKNOWN_COMMAND"))
    );
    // The callback worker takes the job and dies with it; everything is failed and logged.
    cbw.send(T::GrabJob, &[]);
    assert_eq!(cbw.recv().ptype, T::JobAssign);
    cbw.send(T::WorkData, &[b"H:none:1", secret]);
    drop(cbw);
    assert_eq!(tew.recv().ptype, T::WorkFail);
    tew.send(T::WorkComplete, &[lock.arg(0), secret]);
    client.recv();
    // Every step above got its answer, so the broker has processed (and logged) it.
    for cmd in [
        "status",
        "workers",
        "show jobs",
        "show unique jobs",
        "leases",
    ] {
        outputs.push(admin.admin(cmd));
    }
    broker.assert_serving();
    let log = broker.log_text();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "verbose logging was on"
    );
    assert!(!log.contains(SECRET), "a log line holds TE data:\n{log}");
    for o in outputs {
        assert!(!o.contains(SECRET), "admin output holds TE data: {o}");
    }
}
