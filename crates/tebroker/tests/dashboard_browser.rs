//! The dashboard in a real browser (Debian's headless `chromium`): a leased TE appears with its
//! holder, a drained one shows as drained, the page loaded its data and logged no console
//! message (no error, no failed request); the queue card shows a waiting request with its wait,
//! both charts draw the leases and waits that happened, and each TE shows its failure rate. Set `DASHBOARD_SCREENSHOT=FILE.png` to keep a
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

/// The inner HTML of the element with id `id` up to its closing `end` tag, in the dumped DOM.
fn element<'a>(dom: &'a str, id: &str, end: &str) -> Option<&'a str> {
    let start = dom.find(&format!("id=\"{id}\""))?;
    let stop = dom[start..].find(end)? + start;
    Some(&dom[start..stop])
}

/// One lease of `worker` by job `job`, ended with `end` (WORK_COMPLETE or WORK_FAIL).
fn lease_and_end(client: &mut Conn, worker: &mut Conn, job: &str, end: T) {
    let body = format!(
        r#"{{"callback_name": "callback_{job}", "timeout": "600", "ssh_key": "SECRET-KEY", "job_identifier": "{job}"}}"#
    );
    client.req(T::SubmitJob, &["lockenv", "", &body]);
    client.expect(T::JobCreated);
    worker.req(T::GrabJob, &[] as &[&str]);
    let handle = worker.expect(T::JobAssign).arg(0).to_vec();
    match end {
        T::WorkComplete => worker.req(T::WorkComplete, &[handle, Vec::new()]),
        _ => worker.req(end, &[handle]),
    }
    client.expect(end);
}

#[test]
fn the_dashboard_shows_the_queue_with_its_wait_charts_with_data_and_failure_rates() {
    let Some(browser) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let broker = Server::tebroker_with(&[
        "--http",
        "127.0.0.1:0",
        "--data-dir",
        harness::path(&dir.path().join("data")),
    ]);
    let http = broker.http.unwrap();

    let mut good = Conn::connect(broker.port);
    good.req(T::SetClientId, &["testenv-worker-good"]);
    good.req(T::CanDo, &["lockenv"]);
    let mut bad = Conn::connect(broker.port);
    bad.req(T::SetClientId, &["testenv-worker-bad"]);
    bad.req(T::CanDo, &["lockenv"]);
    let mut client = Conn::connect(broker.port);
    lease_and_end(&mut client, &mut good, "job-good", T::WorkComplete);
    lease_and_end(&mut client, &mut bad, "job-bad", T::WorkFail);

    // Both TEs stay registered but grab nothing more: the next request waits.
    let mut waiter = Conn::connect(broker.port);
    waiter.req(
        T::SubmitJob,
        &[
            "lockenv",
            "",
            r#"{"callback_name": "callback_job-waiting", "timeout": "600", "job_identifier": "job-waiting"}"#,
        ],
    );
    waiter.expect(T::JobCreated);

    let url = format!("http://{http}/");
    let profile = dir.path().join("profile");
    let dom = test_support::wait_until("the dashboard with the queue and both charts", || {
        let (dom, log) = run_chromium(&browser, &profile, &url, &["--dump-dom"]);
        let console: Vec<&str> = log.lines().filter(|l| l.contains(":CONSOLE")).collect();
        assert!(
            console.is_empty(),
            "the page logged to its console: {console:#?}"
        );
        assert!(!dom.contains("data-errors"), "the page met an error: {dom}");
        let ready = dom.contains("data-loaded=\"yes\"")
            && element(&dom, "queue", "</tbody>").is_some_and(|q| q.contains("job-waiting"))
            && element(&dom, "lease-chart", "</svg>").is_some_and(|c| c.contains("failed"))
            && te_row(&dom, "testenv-worker-bad").is_some();
        ready.then_some(dom)
    });

    // The queue card: the waiting request with its position, priority and how long it waited.
    let queue = element(&dom, "queue", "</tbody>").unwrap();
    let cells: Vec<&str> = queue
        .split("<td")
        .skip(1)
        .map(|c| {
            let c = &c[c.find('>').unwrap() + 1..];
            &c[..c.find("</td>").unwrap()]
        })
        .collect();
    assert_eq!(cells.len(), 6, "one row of six cells: {queue}");
    assert_eq!(cells[0], "1", "position: {queue}");
    assert_eq!(cells[1], "job-waiting", "{queue}");
    assert_eq!(cells[3], "normal", "{queue}");
    let waited = cells[4].strip_suffix(" s").expect("a wait in seconds");
    assert!(waited.parse::<u64>().is_ok(), "waited {waited:?}: {queue}");
    assert!(
        dom.contains("<b>1</b>waiting"),
        "the waiting card counts it"
    );

    // The lease chart: one bar segment per outcome that happened, with its count.
    let leases = element(&dom, "lease-chart", "</svg>").unwrap();
    assert!(
        leases.contains("<title>1 released</title>"),
        "a released bar: {leases}"
    );
    assert!(
        leases.contains("<title>1 failed</title>"),
        "a failed bar: {leases}"
    );
    let legend = element(&dom, "lease-legend", "</div>").unwrap();
    assert!(
        legend.contains("released") && legend.contains("failed"),
        "{legend}"
    );
    // The wait chart: a mean-wait bar for the bucket of the two granted waits, and a queue
    // line through at least one point.
    let waits = element(&dom, "wait-chart", "</svg>").unwrap();
    assert!(
        waits.contains("fill=\"#f59e0b\""),
        "a mean-wait bar: {waits}"
    );
    let line = waits
        .split("<path d=\"")
        .nth(2)
        .and_then(|p| p.split('"').next())
        .expect("the queue line");
    assert!(line.starts_with('M'), "a queue line with points: {waits}");
    // Its last point (now) counts job-waiting: above the baseline the earlier, empty
    // buckets sit on.
    let ys: Vec<f64> = line
        .split(['M', 'L'])
        .filter(|p| !p.is_empty())
        .map(|p| p.split(',').nth(1).unwrap().parse().unwrap())
        .collect();
    let (last, first) = (ys[ys.len() - 1], ys[0]);
    assert!(
        last < first,
        "the request waiting now is in the line: {line}"
    );

    // The per-TE failure rate: 1 failed of 1 lease, and 0 of 1.
    let bad_row = te_row(&dom, "testenv-worker-bad").unwrap();
    assert!(bad_row.contains("100%"), "failure rate: {bad_row}");
    assert!(bad_row.contains("class=\"bar\""), "a rate bar: {bad_row}");
    let good_row = te_row(&dom, "testenv-worker-good").unwrap();
    assert!(good_row.contains("0%"), "failure rate: {good_row}");
    assert!(!good_row.contains("class=\"bar\""), "{good_row}");
    drop((good, bad, client, waiter));
}
