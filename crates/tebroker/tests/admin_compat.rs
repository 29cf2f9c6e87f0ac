//! The admin text protocol, compared line by line with gearmand: the same sequence of
//! operations is run against gearmand and tebroker and the answers must agree (job handles and
//! connection numbers are replaced by placeholders, listings compared as sets).

mod harness;

use std::collections::BTreeMap;

use gearman_proto::PacketType;
use harness::{Conn, Server};

/// Builds the same state on a server and returns every admin answer, normalised.
fn scenario(server: &Server) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    let mut handles: Vec<(String, String)> = Vec::new();

    let mut worker = Conn::connect(server.port);
    worker.req(PacketType::SetClientId, &["compat-worker"]);
    worker.req(PacketType::CanDo, &["fa"]);
    worker.req(PacketType::CanDo, &["fb"]);
    worker.echo(b"sync");

    let mut client = Conn::connect(server.port);
    for (i, (t, f, u)) in [
        (PacketType::SubmitJobHighBg, "q", "u-high"),
        (PacketType::SubmitJobBg, "q", "u-normal"),
        (PacketType::SubmitJobLowBg, "q", ""),
        (PacketType::SubmitJobBg, "q", ""),
        (PacketType::SubmitJob, "fa", "u-running"),
    ]
    .into_iter()
    .enumerate()
    {
        client.req(t, &[f, u, "data"]);
        let h = String::from_utf8(client.expect(PacketType::JobCreated).arg(0).to_vec()).unwrap();
        handles.push((h, format!("<job{i}>")));
    }
    // The worker runs the foreground job.
    worker.req::<&[u8]>(PacketType::GrabJob, &[]);
    worker.expect(PacketType::JobAssign);
    worker.req(PacketType::WorkStatus, &[handles[4].0.as_str(), "1", "4"]);
    worker.echo(b"sync");

    let norm = |l: &str| {
        let mut l = l.to_string();
        for (h, label) in &handles {
            l = l.replace(h.as_str(), label);
        }
        l
    };
    let mut admin = Conn::connect(server.port);
    for cmd in ["status", "prioritystatus", "show jobs", "show unique jobs"] {
        admin.send_line(cmd);
        let mut lines: Vec<String> = admin
            .read_block()
            .iter()
            .map(|l| norm(l))
            // gearmand prints an empty line for each job without a unique id; not compared.
            .filter(|l| !(cmd == "show unique jobs" && l.is_empty()))
            .collect();
        lines.sort();
        out.insert(cmd.to_string(), lines);
    }
    admin.send_line("workers");
    let mut workers: Vec<String> = admin
        .read_block()
        .iter()
        // Drop the fd column; keep address, client id and functions.
        .map(|l| {
            let (_, rest) = l.split_once(' ').expect("workers line");
            let (left, funcs) = rest.split_once(" :").expect("workers line");
            let mut f: Vec<&str> = funcs.split_whitespace().collect();
            f.sort();
            format!("{left} : {}", f.join(" "))
        })
        .filter(|l| l.contains("compat-worker"))
        .collect();
    workers.sort();
    out.insert("workers".into(), workers);

    for cmd in [
        "maxqueue q",
        "maxqueue q 10",
        "maxqueue",
        "cancel job H:nowhere:424242",
        "bogus",
    ] {
        admin.send_line(cmd);
        let ans = admin.read_line();
        // Keep the code word only: the texts may differ.
        let ans: String = ans.split(' ').take(2).collect::<Vec<_>>().join(" ");
        out.insert(cmd.into(), vec![ans]);
    }
    let cancel = format!("cancel job {}", handles[3].0);
    admin.send_line(&cancel);
    out.insert("cancel job <queued job3>".into(), vec![admin.read_line()]);
    admin.send_line("getpid");
    let pid = admin.read_line();
    assert_eq!(pid, format!("OK {}", server.pid()), "getpid");
    admin.send_line("version");
    let v = admin.read_line();
    assert!(v.starts_with("OK ") && v.len() > 3, "version: {v:?}");
    out
}

#[test]
fn admin_answers_match_gearmand() {
    let gearmand = Server::gearmand();
    let want = scenario(&gearmand);
    // Guard against a vacuous comparison.
    assert_eq!(want["show jobs"].len(), 5, "gearmand show jobs: {want:?}");
    assert_eq!(want["workers"].len(), 1, "gearmand workers: {want:?}");
    assert_eq!(want["status"].len(), 3, "gearmand status: {want:?}");
    let mut tebroker = Server::tebroker();
    let got = scenario(&tebroker);
    let mut diffs = Vec::new();
    for (cmd, w) in &want {
        let g = got.get(cmd).cloned().unwrap_or_default();
        if &g != w {
            diffs.push(format!("`{cmd}`:\n  gearmand: {w:?}\n  tebroker: {g:?}"));
        }
    }
    tebroker.assert_alive();
    assert!(
        diffs.is_empty(),
        "admin answers differ from gearmand's:\n{}",
        diffs.join("\n")
    );
}

#[test]
fn admin_shutdown_stops_the_server() {
    let mut server = Server::tebroker();
    let mut c = Conn::connect(server.port);
    c.send_line("shutdown");
    let ans = c.read_line();
    assert_eq!(ans, "OK", "answer to shutdown");
    harness::wait_until("tebroker to exit after `shutdown`", || {
        std::net::TcpStream::connect(server.addr())
            .err()
            .map(|_| ())
    });
    harness::wait_until("the tebroker process to exit", || server.exit_status());
}
