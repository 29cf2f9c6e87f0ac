//! tebroker-bench: runs the same workloads against tebroker, gearmand and geard and prints a
//! comparison table (see `--help`, and `scripts/bench.sh`).
//!
//! Every server is started fresh for every workload, on a free port, and measured alone; the
//! bench and the server share the machine, so the bench's own CPU use is printed too.

mod servers;
mod workloads;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;

use servers::{Installed, Kind, Server};
use workloads::{EchoParams, IdleResult, LeaseParams, Throughput, WallResult, Window};

const WORKLOADS: [&str; 6] = [
    "echo",
    "echo-idle",
    "lease",
    "lease-readers",
    "history-api",
    "client-wall",
];

/// The TE description the lease and client-wall workloads hand out (the repo's demo TE).
const DEMO_TE: &[u8] = include_bytes!("../../../demo/testenv-1.json");

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Benchmark tebroker against gearmand and geard: echo, echo-idle, lease, lease-readers, \
             history-api, client-wall.",
    after_help = "Workloads (default: all):\n  \
        echo         8 clients x 8 workers, 64-byte payload, one foreground job at a time per client\n  \
        echo-idle    echo again with 10,000 idle connections, each CAN_DO its own function\n  \
        lease        testenv lease cycles: 100 simulated TEs, 200 simulated clients holding 0 ms\n  \
        lease-readers  tebroker only: lease with and without --readers HTTP readers, each an open\n  \
                     dashboard (its page and API reads, every --reader-pause s); the ratio\n  \
        history-api  tebroker only, with --history-dir: filtered /api/v1/history pages over HTTP\n  \
                     from a store store-bench filled, p50/p99 per kind of filter\n  \
        client-wall  wall time of the real `testenv-client -- true` with one free real testenv-worker\n\n\
        Servers missing on this machine are reported and skipped."
)]
struct Args {
    /// Short runs (2 s windows, fewer client-wall runs) for a quick look.
    #[arg(long)]
    quick: bool,
    /// Seconds measured per throughput run (default 5, 2 with --quick).
    #[arg(long)]
    seconds: Option<f64>,
    /// Idle connections for echo-idle.
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// Runs of testenv-client for client-wall (default 20, 7 with --quick).
    #[arg(long)]
    runs: Option<usize>,
    /// HTTP readers for lease-readers.
    #[arg(long, default_value_t = 50)]
    readers: usize,
    /// Seconds each lease-readers reader waits after reading every path once: by default the
    /// dashboard's refresh interval (each reader is one open dashboard); 0 polls without
    /// pause, a stress figure that on a machine the lease workload saturates measures CPU
    /// shared, not the broker.
    #[arg(long, default_value_t = 3.0, value_name = "SECS")]
    reader_pause: f64,
    /// Comma-separated paths one lease-readers round reads (default: the dashboard page and
    /// what it reads on a refresh).
    #[arg(long, value_delimiter = ',', value_name = "PATHS")]
    reader_paths: Vec<String>,
    /// For history-api: a data directory with a filled SQLite store, made by
    /// `store-bench --backend sqlite --data-dir D --seconds 0 --history-rows 1000000` (then
    /// give D/history). Without it history-api is skipped.
    #[arg(long, value_name = "DIR")]
    history_dir: Option<std::path::PathBuf>,
    /// Pages per kind of filter for history-api.
    #[arg(long, default_value_t = 300)]
    queries: usize,
    /// Comma-separated servers to measure.
    #[arg(long, default_value = "tebroker,gearmand,geard", value_delimiter = ',')]
    servers: Vec<String>,
    /// Workloads to run: echo, echo-idle, lease, client-wall (default: all).
    #[arg(value_parser = WORKLOADS)]
    workloads: Vec<String>,
}

/// Everything measured, for the report.
#[derive(Default)]
struct Report {
    echo: BTreeMap<Kind, Result<Throughput, String>>,
    idle: BTreeMap<Kind, Result<IdleResult, String>>,
    lease: BTreeMap<Kind, Result<Throughput, String>>,
    /// The lease workload with fewer clients than TEs: every lockenv finds a free TE.
    lease_free: BTreeMap<Kind, Result<Throughput, String>>,
    wall: BTreeMap<Kind, Result<WallResult, String>>,
    /// The store writer's counters after the saturated lease run (tebroker).
    lease_store: BTreeMap<Kind, servers::StoreStats>,
    /// The lease workload without and with API readers (tebroker).
    readers: BTreeMap<Kind, Result<ReadersOutcome, String>>,
    history: BTreeMap<Kind, Result<workloads::HistoryLatency, String>>,
}

/// The lease workload on two fresh servers with `--http`: without readers, then with them.
struct ReadersOutcome {
    /// The windows without readers and with them, in the order run.
    without: Vec<Throughput>,
    with: Vec<Throughput>,
    readers: workloads::ReadersResult,
}

impl ReadersOutcome {
    /// The median window of `runs` by lease rate.
    fn median(runs: &[Throughput]) -> &Throughput {
        let mut by_rate: Vec<&Throughput> = runs.iter().collect();
        by_rate.sort_by(|a, b| a.per_sec.total_cmp(&b.per_sec));
        by_rate[by_rate.len() / 2]
    }
    fn without(&self) -> &Throughput {
        Self::median(&self.without)
    }
    fn with(&self) -> &Throughput {
        Self::median(&self.with)
    }
    /// The lowest and highest ratio of a window with readers to the one without run next to it.
    fn pair_ratios(&self) -> (f64, f64) {
        let ratios = self
            .with
            .iter()
            .zip(&self.without)
            .map(|(w, wo)| w.per_sec / wo.per_sec.max(1e-9));
        ratios.fold((f64::INFINITY, 0.0), |(lo, hi), r| (lo.min(r), hi.max(r)))
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let nofile = raise_nofile(args.idle as u64 + 4096);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args, nofile))
}

/// Raises RLIMIT_NOFILE (inherited by the servers we start) to at least `want`, if allowed.
fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        let target = want.max(65_536);
        if lim.rlim_max < target {
            let raised = libc::rlimit {
                rlim_cur: target,
                rlim_max: target,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return target;
            }
        }
        lim.rlim_cur = lim.rlim_max.min(target.max(lim.rlim_cur));
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

async fn run(args: Args, nofile: u64) -> anyhow::Result<()> {
    let secs = args.seconds.unwrap_or(if args.quick { 2.0 } else { 5.0 });
    let window = Window {
        warmup: Duration::from_secs_f64(if args.quick { 0.5 } else { 1.0 }),
        measure: Duration::from_secs_f64(secs),
    };
    let runs = args.runs.unwrap_or(if args.quick { 7 } else { 20 });
    let idle_budget = Duration::from_secs(if args.quick { 60 } else { 180 });
    let selected: Vec<&str> = if args.workloads.is_empty() {
        WORKLOADS.to_vec()
    } else {
        WORKLOADS
            .into_iter()
            .filter(|w| args.workloads.iter().any(|a| a == w))
            .collect()
    };

    // Environment.
    let mut installed: Vec<Installed> = Vec::new();
    let mut missing: Vec<(Kind, String)> = Vec::new();
    for name in &args.servers {
        let Some(kind) = Kind::parse(name.trim()) else {
            anyhow::bail!("unknown server {name:?} (tebroker, gearmand, geard)");
        };
        match servers::locate(kind) {
            Ok(i) => installed.push(i),
            Err(why) => missing.push((kind, why)),
        }
    }
    println!("tebroker-bench {}", env!("CARGO_PKG_VERSION"));
    println!("{}", environment(nofile));
    for i in &installed {
        println!(
            "  {:<9} {}  ({})",
            i.kind.name(),
            i.version,
            i.exe.display()
        );
    }
    for (k, why) in &missing {
        println!("  {:<9} SKIPPED: {why}", k.name());
    }
    println!(
        "  mode: {} (warm-up {:.1} s, measured {:.1} s per throughput run; client-wall {} runs; \
         {} idle connections)",
        if args.quick { "quick" } else { "full" },
        window.warmup.as_secs_f64(),
        secs,
        runs,
        args.idle
    );
    println!();

    let tmp = tempfile::Builder::new()
        .prefix("tebroker-bench-")
        .tempdir()?;
    let echo_p = EchoParams {
        clients: 8,
        workers: 8,
        payload: 64,
        window,
    };
    let lease_p = LeaseParams {
        tes: 100,
        clients: 200,
        window,
    };
    let lease_free_p = LeaseParams {
        tes: 100,
        clients: 1,
        window,
    };
    let mut report = Report::default();
    for workload in &selected {
        for inst in &installed {
            let with_http = matches!(*workload, "lease-readers" | "history-api");
            if with_http && inst.kind != Kind::Tebroker {
                // Only tebroker has an HTTP surface to read.
                continue;
            }
            if *workload == "history-api" && args.history_dir.is_none() {
                eprintln!("[{workload:<11}] skipped: give --history-dir (see --help)");
                continue;
            }
            wait_quiet().await;
            eprint!("[{workload:<11}] {:<9} ... ", inst.kind.name());
            let started = match (*workload, &args.history_dir) {
                ("history-api", Some(dir)) => Server::start_on_store(inst, tmp.path(), dir).await,
                _ if with_http => Server::start_with_http(inst, tmp.path()).await,
                _ => Server::start(inst, tmp.path()).await,
            };
            let server = match started {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("cannot start: {e:#}");
                    let msg = format!("cannot start: {e:#}");
                    match *workload {
                        "echo" => drop(report.echo.insert(inst.kind, Err(msg))),
                        "echo-idle" => drop(report.idle.insert(inst.kind, Err(msg))),
                        "lease" => drop(report.lease.insert(inst.kind, Err(msg))),
                        "lease-readers" => drop(report.readers.insert(inst.kind, Err(msg))),
                        "history-api" => drop(report.history.insert(inst.kind, Err(msg))),
                        _ => drop(report.wall.insert(inst.kind, Err(msg))),
                    }
                    continue;
                }
            };
            let began = std::time::Instant::now();
            let msg = match *workload {
                "echo" => {
                    let r = workloads::echo(&server, echo_p)
                        .await
                        .map_err(|e| format!("{e:#}"));
                    let m = summary_tp(&r, "jobs/s");
                    report.echo.insert(inst.kind, r);
                    m
                }
                "echo-idle" => {
                    let r = workloads::echo_idle(&server, echo_p, args.idle, idle_budget)
                        .await
                        .map_err(|e| format!("{e:#}"));
                    let m = match &r {
                        Ok(i) => format!(
                            "{} idle registered in {:.1} s; {}",
                            i.registered,
                            i.open_secs,
                            i.loaded
                                .as_ref()
                                .map(|t| format!("{:.0} jobs/s", t.per_sec))
                                .unwrap_or_else(|| "no echo".into())
                        ),
                        Err(e) => e.clone(),
                    };
                    report.idle.insert(inst.kind, r);
                    m
                }
                "lease" => {
                    let r = workloads::lease(&server, lease_p, Bytes::from_static(DEMO_TE))
                        .await
                        .map_err(|e| format!("{e:#}"));
                    let mut m = summary_tp(&r, "cycles/s");
                    report.lease.insert(inst.kind, r);
                    // Again on a fresh server, with every lockenv finding a free TE: the grant
                    // latency is then the broker's dispatch path alone, without queueing.
                    wait_quiet().await;
                    let free = match Server::start(inst, tmp.path()).await {
                        Ok(s2) => {
                            let r =
                                workloads::lease(&s2, lease_free_p, Bytes::from_static(DEMO_TE))
                                    .await
                                    .map_err(|e| format!("{e:#}"));
                            s2.stop().await;
                            r
                        }
                        Err(e) => Err(format!("cannot start: {e:#}")),
                    };
                    m.push_str(&format!("; free TEs: {}", summary_tp(&free, "cycles/s")));
                    report.lease_free.insert(inst.kind, free);
                    m
                }
                "lease-readers" => {
                    let paths = if args.reader_paths.is_empty() {
                        workloads::READER_PATHS
                            .iter()
                            .map(|p| p.to_string())
                            .collect()
                    } else {
                        args.reader_paths.clone()
                    };
                    let readers = workloads::ReaderLoad {
                        readers: args.readers,
                        paths: paths.into(),
                        pause: Duration::try_from_secs_f64(args.reader_pause)
                            .map_err(|e| anyhow::anyhow!("--reader-pause: {e}"))?,
                    };
                    let r = lease_with_readers(&server, lease_p, readers).await;
                    let m = match &r {
                        Ok(o) => format!(
                            "{:.0} cycles/s without readers, {:.0} with {} ({:.0} answers/s)",
                            o.without().per_sec,
                            o.with().per_sec,
                            o.readers.load.readers,
                            o.readers.per_sec
                        ),
                        Err(e) => e.clone(),
                    };
                    report.readers.insert(inst.kind, r);
                    m
                }
                "history-api" => {
                    let r = match server.http {
                        Some(http) => workloads::history_api(http, args.queries)
                            .await
                            .map_err(|e| format!("{e:#}")),
                        None => Err("no HTTP address".to_string()),
                    };
                    let m = match &r {
                        Ok(h) => format!(
                            "all filters p50 {}, p99 {}",
                            q(&h.all, 0.5),
                            q(&h.all, 0.99)
                        ),
                        Err(e) => e.clone(),
                    };
                    report.history.insert(inst.kind, r);
                    m
                }
                _ => {
                    let r = workloads::client_wall(&server, runs, DEMO_TE, tmp.path())
                        .await
                        .map_err(|e| format!("{e:#}"));
                    let m = match &r {
                        Ok(w) => format!(
                            "median {}",
                            w.median().map(fmt_dur).unwrap_or_else(|| "-".into())
                        ),
                        Err(e) => e.clone(),
                    };
                    report.wall.insert(inst.kind, r);
                    m
                }
            };
            eprintln!("{msg} ({:.0} s)", began.elapsed().as_secs_f64());
            let store = server.stop().await;
            if let (true, Some(store)) = (*workload == "lease", store) {
                // The server of the saturated run (200 clients): did its store keep up?
                report.lease_store.insert(inst.kind, store);
            }
        }
    }
    println!("{}", render(&report, &selected, args.idle));
    Ok(())
}

/// Pairs of lease windows, one with readers and one without: two windows of the saturated
/// lease workload differ by up to ~10 % on a 2-core machine, more than the 5 % to be seen, so
/// the medians of several are compared.
const READER_PAIRS: usize = 5;

/// The lease workload on `server` (started with `--http`) in windows with and without HTTP
/// readers, alternating (off, on, on, off, off, on...) on the same server, so that the drift
/// of a growing store and the noise of a saturated machine fall on both sides alike.
async fn lease_with_readers(
    server: &Server,
    p: LeaseParams,
    readers: workloads::ReaderLoad,
) -> Result<ReadersOutcome, String> {
    let http = server.http.ok_or("no HTTP address")?;
    let polling = workloads::Readers::start(http, readers);
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for pair in 0..READER_PAIRS {
        let order = if pair % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for on in order {
            polling.set_active(on);
            let t = workloads::lease(server, p, Bytes::from_static(DEMO_TE))
                .await
                .map_err(|e| format!("{} readers: {e:#}", if on { "with" } else { "without" }))?;
            polling.set_active(false);
            if on {
                with.push(t)
            } else {
                without.push(t)
            }
            wait_quiet().await;
        }
    }
    let readers = polling.stop().await;
    Ok(ReadersOutcome {
        without,
        with,
        readers,
    })
}

/// CPU used by other processes, in % of one core, over `over`.
async fn other_cpu(over: Duration) -> Option<f64> {
    let a = workloads::machine_busy_secs()?;
    let s0 = servers::proc_cpu_secs("/proc/self/stat")?;
    tokio::time::sleep(over).await;
    let b = workloads::machine_busy_secs()?;
    let s1 = servers::proc_cpu_secs("/proc/self/stat")?;
    Some(((b - a) - (s1 - s0)).max(0.0) / over.as_secs_f64() * 100.0)
}

/// Others may share this machine (builds, tests): wait up to a minute for it to be quiet before
/// a measurement, so that the figures are the servers' and not the neighbours'. The "other
/// CPU" column shows what was left during each window.
async fn wait_quiet() {
    let limit = std::time::Instant::now() + Duration::from_secs(60);
    let mut told = false;
    while let Some(other) = other_cpu(Duration::from_millis(500)).await {
        if other < QUIET || std::time::Instant::now() > limit {
            if told {
                eprintln!(
                    "{}",
                    if other < QUIET {
                        "quiet"
                    } else {
                        "still busy; measuring anyway"
                    }
                );
            }
            return;
        }
        if !told {
            eprint!("(other processes use {other:.0}% CPU; waiting up to 60 s) ... ");
            told = true;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Above this much CPU used by others (% of one core) a run is marked as disturbed.
const QUIET: f64 = 25.0;

fn summary_tp(r: &Result<Throughput, String>, unit: &str) -> String {
    match r {
        Ok(t) => format!(
            "{:.0} {unit}, p50 {}, p99 {}{}",
            t.per_sec,
            fmt_ns(t.latency.value_at_quantile(0.5)),
            fmt_ns(t.latency.value_at_quantile(0.99)),
            t.grant
                .as_ref()
                .map(|g| format!(", grant p99 {}", fmt_ns(g.value_at_quantile(0.99))))
                .unwrap_or_default()
        ),
        Err(e) => e.clone(),
    }
}

fn environment(nofile: u64) -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "  host: {cores} cores ({model}), Linux {}, RLIMIT_NOFILE {nofile}, loopback 127.0.0.1",
        kernel.trim()
    )
}

fn fmt_ns(ns: u64) -> String {
    fmt_dur(Duration::from_nanos(ns))
}

fn fmt_dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1_000.0 {
        format!("{us:.0} µs")
    } else if us < 10_000_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.1} s", us / 1e6)
    }
}

fn mib(kib: Option<u64>) -> String {
    kib.map(|k| format!("{:.1}", k as f64 / 1024.0))
        .unwrap_or_else(|| "-".into())
}

fn pct(p: Option<f64>) -> String {
    p.map(|p| format!("{p:.0}%")).unwrap_or_else(|| "-".into())
}

/// Like [`pct`], with a `!` when others used enough CPU to disturb the run.
fn other_pct(p: Option<f64>) -> String {
    match p {
        Some(v) if v >= QUIET => format!("{v:.0}%!"),
        _ => pct(p),
    }
}

fn q(h: &Histogram<u64>, quantile: f64) -> String {
    if h.is_empty() {
        "-".into()
    } else {
        fmt_ns(h.value_at_quantile(quantile))
    }
}

/// `a / b` as `1.23x`.
fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    match r {
        Some(r) if r >= 100.0 => format!("{r:.0}x"),
        Some(r) => format!("{r:.2}x"),
        None => "-".into(),
    }
}

fn ratios_line(out: &mut String, what: &str, te: Option<f64>, gm: Option<f64>, gd: Option<f64>) {
    let _ = writeln!(
        out,
        "  {what}: tebroker/gearmand {}, tebroker/geard {}",
        fmt_ratio(ratio(te, gm)),
        fmt_ratio(ratio(te, gd))
    );
}

fn render(r: &Report, selected: &[&str], idle: usize) -> String {
    let mut out = String::new();
    let w = &mut out;
    let per_sec = |m: &BTreeMap<Kind, Result<Throughput, String>>, k: Kind| {
        m.get(&k).and_then(|r| r.as_ref().ok()).map(|t| t.per_sec)
    };

    if selected.contains(&"echo") {
        let _ = writeln!(
            w,
            "== echo: 8 clients x 8 workers, 64-byte payload, one foreground job at a time per client =="
        );
        let _ = writeln!(
            w,
            "  {:<9} {:>10} {:>10} {:>10} {:>9} {:>8} {:>9} {:>9} {:>7}",
            "server",
            "jobs/s",
            "p50",
            "p99",
            "RSS MiB",
            "srv CPU",
            "bench CPU",
            "other CPU",
            "errors"
        );
        for (k, res) in &r.echo {
            match res {
                Ok(t) => {
                    let _ = writeln!(
                        w,
                        "  {:<9} {:>10.0} {:>10} {:>10} {:>9} {:>8} {:>9} {:>9} {:>7}",
                        k.name(),
                        t.per_sec,
                        q(&t.latency, 0.5),
                        q(&t.latency, 0.99),
                        mib(t.rss_kib),
                        pct(t.cpu.server),
                        pct(t.cpu.bench),
                        other_pct(t.cpu.other),
                        t.errors
                    );
                }
                Err(e) => {
                    let _ = writeln!(w, "  {:<9} FAILED: {e}", k.name());
                }
            }
        }
        ratios_line(
            w,
            "jobs/s",
            per_sec(&r.echo, Kind::Tebroker),
            per_sec(&r.echo, Kind::Gearmand),
            per_sec(&r.echo, Kind::Geard),
        );
        let _ = writeln!(w);
    }

    if selected.contains(&"echo-idle") {
        let _ = writeln!(
            w,
            "== echo-idle: echo with {idle} extra idle connections, each CAN_DO its own function =="
        );
        let _ = writeln!(
            w,
            "  {:<9} {:>7} {:>7} {:>9} {:>9} {:>7} {:>10} {:>10} {:>8} {:>8} {:>9} {:>9}",
            "server",
            "idle",
            "open s",
            "echo/s",
            "jobs/s",
            "% own",
            "p50",
            "p99",
            "RSS MiB",
            "growth",
            "KiB/conn",
            "other CPU"
        );
        for (k, res) in &r.idle {
            match res {
                Ok(i) => {
                    let growth = match (i.rss_before_kib, i.rss_after_kib) {
                        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                        _ => None,
                    };
                    let loaded = i.loaded.as_ref();
                    let own = ratio(loaded.map(|t| t.per_sec), Some(i.baseline.per_sec));
                    let _ = writeln!(
                        w,
                        "  {:<9} {:>7} {:>7.1} {:>9.0} {:>9} {:>7} {:>10} {:>10} {:>8} {:>8} {:>9} {:>9}",
                        k.name(),
                        i.registered,
                        i.open_secs,
                        i.baseline.per_sec,
                        loaded
                            .map(|t| format!("{:.0}", t.per_sec))
                            .unwrap_or_else(|| "-".into()),
                        own.map(|o| format!("{:.0}%", o * 100.0))
                            .unwrap_or_else(|| "-".into()),
                        loaded.map(|t| q(&t.latency, 0.5)).unwrap_or_else(|| "-".into()),
                        loaded.map(|t| q(&t.latency, 0.99)).unwrap_or_else(|| "-".into()),
                        mib(i.rss_after_kib),
                        mib(growth),
                        growth
                            .filter(|_| i.opened > 0)
                            .map(|g| format!("{:.1}", g as f64 / i.opened as f64))
                            .unwrap_or_else(|| "-".into()),
                        other_pct(loaded.and_then(|t| t.cpu.other)),
                    );
                    if let Some(p) = &i.problem {
                        let _ = writeln!(w, "  {:<9} note: {p}", "");
                    }
                }
                Err(e) => {
                    let _ = writeln!(w, "  {:<9} FAILED: {e}", k.name());
                }
            }
        }
        let _ = writeln!(
            w,
            "  (echo/s: the server's own echo just before the idle connections; growth: RSS MiB added by them)"
        );
        let idle_ps = |k| {
            r.idle
                .get(&k)
                .and_then(|x| x.as_ref().ok())
                .and_then(|i| i.loaded.as_ref())
                .map(|t| t.per_sec)
        };
        ratios_line(
            w,
            "jobs/s with idle",
            idle_ps(Kind::Tebroker),
            idle_ps(Kind::Gearmand),
            idle_ps(Kind::Geard),
        );
        let _ = writeln!(w);
    }

    if selected.contains(&"lease") {
        let _ = writeln!(
            w,
            "== lease: testenv cycles, 100 TEs, 200 clients holding 0 ms (grant: lockenv submitted -> callback job received) =="
        );
        let _ = writeln!(
            w,
            "  {:<14} {:>9} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>9} {:>9} {:>7}",
            "server",
            "cycles/s",
            "grant p50",
            "grant p99",
            "cycle p50",
            "cycle p99",
            "RSS MiB",
            "srv CPU",
            "bench CPU",
            "other CPU",
            "errors"
        );
        for (label, map) in [("", &r.lease), (" 1 client", &r.lease_free)] {
            for (k, res) in map {
                let name = format!("{}{label}", k.name());
                match res {
                    Ok(t) => {
                        let g = t.grant.as_ref().expect("lease has grant latencies");
                        let _ = writeln!(
                            w,
                            "  {:<14} {:>9.0} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>9} {:>9} {:>7}",
                            name,
                            t.per_sec,
                            q(g, 0.5),
                            q(g, 0.99),
                            q(&t.latency, 0.5),
                            q(&t.latency, 0.99),
                            mib(t.rss_kib),
                            pct(t.cpu.server),
                            pct(t.cpu.bench),
                            other_pct(t.cpu.other),
                            t.errors
                        );
                    }
                    Err(e) => {
                        let _ = writeln!(w, "  {name:<14} FAILED: {e}");
                    }
                }
            }
        }
        let _ = writeln!(
            w,
            "  (rows \"1 client\": 100 TEs, one client, so every lockenv finds a free TE on an otherwise idle\n   \
             server and the grant is the dispatch path alone; with 200 clients on 100 TEs, 100 clients\n   \
             always queue, so grant latency ~ 100 / cycles/s by Little's law)"
        );
        ratios_line(
            w,
            "cycles/s",
            per_sec(&r.lease, Kind::Tebroker),
            per_sec(&r.lease, Kind::Gearmand),
            per_sec(&r.lease, Kind::Geard),
        );
        for (k, s) in &r.lease_store {
            let _ = writeln!(
                w,
                "  {} store at saturation (SQLite; TEBROKER_BENCH_NO_STORE=1 for none): {} leases \
                 ended, {} records queued, {} written, {} dropped{}",
                k.name(),
                s.leases_ended,
                s.recorded,
                s.written,
                s.dropped,
                if s.caught_up {
                    ""
                } else {
                    " (NOT caught up 10 s after the run)"
                }
            );
            let _ = writeln!(
                w,
                "  {:<9} target: 0 dropped {}",
                "",
                if s.dropped == 0 && s.caught_up {
                    "met"
                } else {
                    "NOT met"
                }
            );
        }
        let _ = writeln!(w);
    }

    if selected.contains(&"lease-readers") {
        let _ = writeln!(
            w,
            "== lease-readers: the lease workload (100 TEs, 200 clients) on tebroker with --http, \
             without and with HTTP readers, each reading its paths (below) then pausing \
             (`pause`; --reader-pause) =="
        );
        let _ = writeln!(
            w,
            "  {:<9} {:>12} {:>12} {:>7} {:>8} {:>7} {:>10} {:>7} {:>12} {:>12} {:>9}",
            "server",
            "no readers",
            "readers",
            "ratio",
            "readers",
            "pause",
            "answers/s",
            "errors",
            "srv CPU",
            "bench CPU",
            "other CPU"
        );
        for (k, res) in &r.readers {
            match res {
                Ok(o) => {
                    let ratio = ratio(Some(o.with().per_sec), Some(o.without().per_sec));
                    let (lo, hi) = o.pair_ratios();
                    let _ = writeln!(
                        w,
                        "  {:<9} {:>12.0} {:>12.0} {:>7} {:>8} {:>7} {:>10.0} {:>7} {:>12} {:>12} {:>9}",
                        k.name(),
                        o.without().per_sec,
                        o.with().per_sec,
                        fmt_ratio(ratio),
                        o.readers.load.readers,
                        format!("{:.1} s", o.readers.load.pause.as_secs_f64()),
                        o.readers.per_sec,
                        o.readers.errors,
                        format!("{}>{}", pct(o.without().cpu.server), pct(o.with().cpu.server)),
                        format!("{}>{}", pct(o.without().cpu.bench), pct(o.with().cpu.bench)),
                        other_pct(o.with().cpu.other),
                    );
                    let _ = writeln!(
                        w,
                        "  {:<9} medians of {} windows each, alternating; ratio of neighbouring windows {:.2}x to {:.2}x",
                        "",
                        o.with.len(),
                        lo,
                        hi
                    );
                    let _ = writeln!(w, "  {:<9} paths: {}", "", o.readers.load.paths.join(", "));
                    let _ = writeln!(
                        w,
                        "  {:<9} target: readers lower the lease rate by at most 5 % (ratio >= 0.95): {}",
                        "",
                        match ratio {
                            Some(x) if x >= 0.95 => "met",
                            Some(_) => "NOT met",
                            None => "-",
                        }
                    );
                }
                Err(e) => {
                    let _ = writeln!(w, "  {:<9} FAILED: {e}", k.name());
                }
            }
        }
        if r.readers.is_empty() {
            let _ = writeln!(
                w,
                "  (tebroker not measured: only tebroker has an HTTP surface)"
            );
        }
        let _ = writeln!(w);
    }

    if selected.contains(&"history-api") {
        let _ = writeln!(
            w,
            "== history-api: filtered /api/v1/history pages (50 rows) over HTTP, one keep-alive \
             connection, from the store in --history-dir =="
        );
        for (k, res) in &r.history {
            match res {
                Ok(h) => {
                    for (kind, hist, rows) in &h.kinds {
                        let _ = writeln!(
                            w,
                            "  {:<9} {kind:<20} p50 {:>9}  p99 {:>9}  ({rows:.0} rows/page)",
                            k.name(),
                            q(hist, 0.5),
                            q(hist, 0.99)
                        );
                    }
                    let _ = writeln!(
                        w,
                        "  {:<9} {:<20} p50 {:>9}  p99 {:>9}  ({} pages, {} errors)",
                        k.name(),
                        "all filters",
                        q(&h.all, 0.5),
                        q(&h.all, 0.99),
                        h.all.len(),
                        h.errors
                    );
                    let met = !h.all.is_empty() && h.all.value_at_quantile(0.99) <= 50_000_000;
                    let _ = writeln!(
                        w,
                        "  {:<9} target: a filtered page in <= 50 ms p99: {}",
                        "",
                        if met { "met" } else { "NOT met" }
                    );
                }
                Err(e) => {
                    let _ = writeln!(w, "  {:<9} FAILED: {e}", k.name());
                }
            }
        }
        if r.history.is_empty() {
            let _ = writeln!(w, "  (skipped: give --history-dir)");
        }
        let _ = writeln!(w);
    }

    if selected.contains(&"client-wall") {
        let _ = writeln!(
            w,
            "== client-wall: real `testenv-client -b HOST:PORT -- true`, one free real testenv-worker =="
        );
        let _ = writeln!(
            w,
            "  {:<9} {:>10} {:>10} {:>10} {:>6} {:>9}",
            "server", "median", "min", "max", "runs", "failures"
        );
        for (k, res) in &r.wall {
            match res {
                Ok(x) => {
                    let d = |v: Option<Duration>| v.map(fmt_dur).unwrap_or_else(|| "-".into());
                    let _ = writeln!(
                        w,
                        "  {:<9} {:>10} {:>10} {:>10} {:>6} {:>9}",
                        k.name(),
                        d(x.median()),
                        d(x.min()),
                        d(x.max()),
                        x.runs.len(),
                        x.failures
                    );
                    if let Some(n) = &x.note {
                        let _ = writeln!(w, "  {:<9} note: {n}", "");
                    }
                }
                Err(e) => {
                    let _ = writeln!(w, "  {:<9} FAILED: {e}", k.name());
                }
            }
        }
        let med = |k| {
            r.wall
                .get(&k)
                .and_then(|x| x.as_ref().ok())
                .and_then(|x| x.median())
                .map(|d| d.as_secs_f64())
        };
        let _ = writeln!(
            w,
            "  median wall: gearmand/tebroker {}, geard/tebroker {} (how much faster on tebroker)",
            fmt_ratio(ratio(med(Kind::Gearmand), med(Kind::Tebroker))),
            fmt_ratio(ratio(med(Kind::Geard), med(Kind::Tebroker)))
        );
        let _ = writeln!(w);
    }

    let _ = writeln!(
        w,
        "  (CPU columns: % of one core during the measured window; other CPU = the rest of the\n   \
         machine; a `!` marks runs where others used >= {QUIET:.0}%, whose figures are unreliable)\n"
    );
    let _ = writeln!(
        w,
        "== targets (from issues 2 and 3; informative, not asserted) =="
    );
    let mut target = |name: &str, value: Option<f64>, ok: &dyn Fn(f64) -> bool, shown: String| {
        let tag = match value {
            Some(v) if ok(v) => "[MET] ",
            Some(_) => "[MISS]",
            None => "[n/a] ",
        };
        let _ = writeln!(w, "  {tag} {name:<46} {shown}");
    };
    if selected.contains(&"echo") {
        let g = ratio(
            per_sec(&r.echo, Kind::Tebroker),
            per_sec(&r.echo, Kind::Gearmand),
        );
        target("echo >= 1.5x gearmand", g, &|v| v >= 1.5, fmt_ratio(g));
        let g = ratio(
            per_sec(&r.echo, Kind::Tebroker),
            per_sec(&r.echo, Kind::Geard),
        );
        target("echo >= 20x geard", g, &|v| v >= 20.0, fmt_ratio(g));
    }
    if selected.contains(&"echo-idle") {
        let te = r.idle.get(&Kind::Tebroker).and_then(|x| x.as_ref().ok());
        let own = te.and_then(|i| {
            let full = i.registered >= i.wanted;
            ratio(
                i.loaded.as_ref().map(|t| t.per_sec),
                Some(i.baseline.per_sec),
            )
            .filter(|_| full)
        });
        target(
            &format!("echo with {idle} idle >= 90% of own echo"),
            own,
            &|v| v >= 0.9,
            own.map(|o| format!("{:.0}%", o * 100.0))
                .unwrap_or_else(|| "-".into()),
        );
        let growth = te.and_then(|i| {
            let (a, b) = (i.rss_before_kib?, i.rss_after_kib?);
            Some(b.saturating_sub(a) as f64 / 1024.0).filter(|_| i.registered >= i.wanted)
        });
        target(
            &format!("{idle} idle connections <= 64 MiB RSS"),
            growth,
            &|v| v <= 64.0,
            growth
                .map(|g| format!("{g:.1} MiB"))
                .unwrap_or_else(|| "-".into()),
        );
    }
    if selected.contains(&"lease") {
        let g = ratio(
            per_sec(&r.lease, Kind::Tebroker),
            per_sec(&r.lease, Kind::Gearmand),
        );
        target(
            "lease >= 2x gearmand cycles/s",
            g,
            &|v| v >= 2.0,
            fmt_ratio(g),
        );
        let p99 = r
            .lease
            .get(&Kind::Tebroker)
            .and_then(|x| x.as_ref().ok())
            .and_then(|t| t.grant.as_ref())
            .filter(|h| !h.is_empty())
            .map(|h| h.value_at_quantile(0.99) as f64 / 1e6);
        target(
            "lease grant p99 <= 1 ms on tebroker",
            p99,
            &|v| v <= 1.0,
            p99.map(|v| format!("{v:.2} ms"))
                .unwrap_or_else(|| "-".into()),
        );
        let p99 = r
            .lease_free
            .get(&Kind::Tebroker)
            .and_then(|x| x.as_ref().ok())
            .and_then(|t| t.grant.as_ref())
            .filter(|h| !h.is_empty())
            .map(|h| h.value_at_quantile(0.99) as f64 / 1e6);
        target(
            "  same, free TE (100 TEs, 1 client)",
            p99,
            &|v| v <= 1.0,
            p99.map(|v| format!("{v:.2} ms"))
                .unwrap_or_else(|| "-".into()),
        );
    }
    out
}
