//! The dashboard in a real browser (Debian's headless `chromium`): a leased TE appears with its
//! holder, a drained one shows as drained, the page loaded its data and logged no console
//! message (no error, no failed request). Set `DASHBOARD_SCREENSHOT=FILE.png` to keep a
//! screenshot of the page the test saw.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gearman_proto::PacketType as T;
use harness::{Conn, Server};

mod harness;

const TOKEN: &str = "dashboard-test-token-0123456789";

fn post(addr: SocketAddr, path: &str) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn chromium() -> Option<String> {
    for c in ["chromium", "chromium-browser"] {
        if Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Some(c.to_string());
        }
    }
    if std::env::var_os("CI").is_some() {
        panic!("chromium is not installed; run scripts/install-peers.sh");
    }
    eprintln!("SKIPPED: chromium is not installed (scripts/install-peers.sh installs it)");
    None
}

/// Runs headless chromium on `url` with `extra` flags; returns (stdout, stderr).
fn run_chromium(browser: &str, profile: &Path, url: &str, extra: &[&str]) -> (String, String) {
    let out = test_support::run_with_timeout(
        Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--enable-logging=stderr",
                "--v=0",
                // Lets the page's fetches and first render finish before the dump.
                "--virtual-time-budget=8000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(url),
        Duration::from_secs(120),
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `<tr data-te="NAME" ...>...</tr>` row of TE `name` in the dumped DOM.
fn te_row<'a>(dom: &'a str, name: &str) -> Option<&'a str> {
    let start = dom.find(&format!("data-te=\"{name}\""))?;
    let end = dom[start..].find("</tr>")? + start;
    Some(&dom[start..end])
}

#[test]
fn the_dashboard_shows_a_leased_te_with_its_holder_and_a_drained_one() {
    let Some(browser) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let broker = Server::tebroker_with(&[
        "--http",
        "127.0.0.1:0",
        "--data-dir",
        harness::path(&dir.path().join("data")),
        "--api-token-file",
        harness::path(&token),
    ]);
    let http = broker.http.unwrap();

    // A finished lease for the history and the charts.
    let mut old = Conn::connect(broker.port);
    old.req(T::SetClientId, &["testenv-worker-past"]);
    old.req(T::CanDo, &["lockenv"]);
    let mut client = Conn::connect(broker.port);
    let request = |job: &str| {
        format!(
            r#"{{"callback_name": "callback_{job}", "timeout": "600", "ssh_key": "SECRET-KEY", "job_identifier": "{job}"}}"#
        )
    };
    client.req(T::SubmitJob, &["lockenv", "", &request("job-past")]);
    client.expect(T::JobCreated);
    old.req(T::GrabJob, &[] as &[&str]);
    let assigned = old.expect(T::JobAssign);
    let handle = assigned.arg(0).to_vec();
    old.req(T::WorkComplete, &[handle, Vec::new()]);
    client.expect(T::WorkComplete);

    // A TE leased now by job-now, and one drained.
    let mut busy = Conn::connect(broker.port);
    busy.req(T::SetClientId, &["testenv-worker-busy"]);
    busy.req(T::CanDo, &["lockenv"]);
    let mut idle = Conn::connect(broker.port);
    idle.req(T::SetClientId, &["testenv-worker-idle"]);
    idle.req(T::CanDo, &["lockenv"]);
    busy.echo(b"sync");
    idle.echo(b"sync");
    assert_eq!(post(http, "/api/v1/envs/testenv-worker-idle/drain"), 200);
    client.req(T::SubmitJob, &["lockenv", "", &request("job-now")]);
    client.expect(T::JobCreated);
    busy.req(T::GrabJob, &[] as &[&str]);
    busy.expect(T::JobAssign);

    let url = format!("http://{http}/");
    let profile = dir.path().join("profile");
    let dom = test_support::wait_until("the dashboard showing both TEs", || {
        let (dom, log) = run_chromium(&browser, &profile, &url, &["--dump-dom"]);
        let console: Vec<&str> = log.lines().filter(|l| l.contains(":CONSOLE")).collect();
        assert!(
            console.is_empty(),
            "the page logged to its console: {console:#?}"
        );
        assert!(!dom.contains("data-errors"), "the page met an error: {dom}");
        let ready = dom.contains("data-loaded=\"yes\"")
            && te_row(&dom, "testenv-worker-busy").is_some()
            && te_row(&dom, "testenv-worker-idle").is_some_and(|r| r.contains("drained"));
        ready.then_some(dom)
    });
    let busy_row = te_row(&dom, "testenv-worker-busy").unwrap();
    assert!(busy_row.contains("data-state=\"leased\""), "{busy_row}");
    assert!(busy_row.contains("job-now"), "the holder: {busy_row}");
    let idle_row = te_row(&dom, "testenv-worker-idle").unwrap();
    assert!(idle_row.contains("data-state=\"drained\""), "{idle_row}");
    assert!(
        dom.contains("data-lease=\"testenv-worker-busy\""),
        "in the leases table"
    );
    assert!(
        dom.contains("job-past"),
        "recent leases list the finished one"
    );
    assert!(
        dom.contains("leases per hour by outcome"),
        "the lease chart"
    );
    assert!(dom.contains("<svg"), "charts are drawn");
    assert!(!dom.contains("SECRET-KEY"), "no TE secret on the page");

    if let Some(png) = std::env::var_os("DASHBOARD_SCREENSHOT") {
        let png = Path::new(&png);
        run_chromium(
            &browser,
            &profile,
            &url,
            &[
                &format!("--screenshot={}", png.display()),
                "--window-size=1400,1100",
            ],
        );
        assert!(png.exists(), "chromium wrote no screenshot");
    }
    drop((old, busy, idle, client));
}
