//! The workloads: echo, echo with idle connections, testenv lease cycles, testenv-client wall time.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use futures::StreamExt;
use gearman_client::{Client, JobRequest, ServerAddr, Worker};
use hdrhistogram::Histogram;
use testenv_proto::{callback_name, LockRequest, LOCKENV};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::servers::{self, proc_cpu_secs, Server};

/// Latencies are recorded in nanoseconds, 1 µs .. 120 s, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 120_000_000_000, 3).expect("histogram bounds")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(d.as_nanos().min(u64::MAX as u128) as u64);
}

/// Timing of one measured run: `warmup`, then `measure`.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub warmup: Duration,
    pub measure: Duration,
}

/// What one throughput run measured.
#[derive(Debug, Clone)]
pub struct Throughput {
    /// Operations completed inside the measurement window, per second.
    pub per_sec: f64,
    /// Latency of those operations (ns).
    pub latency: Histogram<u64>,
    /// For lease: grant latency (ns).
    pub grant: Option<Histogram<u64>>,
    pub errors: u64,
    /// CPU use during the window.
    pub cpu: CpuUse,
    pub rss_kib: Option<u64>,
}

/// Samples server, bench and whole-machine CPU time across the measurement window.
struct CpuProbe {
    pid: u32,
    t0: Instant,
    server0: Option<f64>,
    self0: Option<f64>,
    all0: Option<f64>,
}

/// CPU use in % of one core during a window.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUse {
    pub server: Option<f64>,
    pub bench: Option<f64>,
    /// Everything else on the machine (other processes, interrupts): a busy machine makes the
    /// figures unreliable.
    pub other: Option<f64>,
}

/// Busy CPU seconds of the whole machine (all cores), from /proc/stat.
pub fn machine_busy_secs() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)? + f.get(7).unwrap_or(&0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(busy as f64 / hz)
}

impl CpuProbe {
    fn start(pid: u32) -> CpuProbe {
        CpuProbe {
            pid,
            t0: Instant::now(),
            server0: proc_cpu_secs(&format!("/proc/{pid}/stat")),
            self0: proc_cpu_secs("/proc/self/stat"),
            all0: machine_busy_secs(),
        }
    }

    fn finish(self) -> CpuUse {
        let wall = self.t0.elapsed().as_secs_f64();
        let server1 = proc_cpu_secs(&format!("/proc/{}/stat", self.pid));
        let self1 = proc_cpu_secs("/proc/self/stat");
        let all1 = machine_busy_secs();
        let pct = |a: Option<f64>, b: Option<f64>| Some((b? - a?) / wall * 100.0);
        let server = pct(self.server0, server1);
        let bench = pct(self.self0, self1);
        let other = pct(self.all0, all1)
            .map(|all| (all - server.unwrap_or(0.0) - bench.unwrap_or(0.0)).max(0.0));
        CpuUse {
            server,
            bench,
            other,
        }
    }
}

/// Opens `n` connections with at most `pacing.0` connects in flight and a pause of `pacing.1`
/// after each (see [`crate::servers::Kind::connect_pacing`]), each with a timeout.
async fn connect_many<T, F, Fut>(
    n: usize,
    pacing: (usize, Duration),
    f: F,
) -> anyhow::Result<Vec<T>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let (concurrency, gap) = pacing;
    let results: Vec<anyhow::Result<T>> = futures::stream::iter(0..n)
        .map(|i| {
            let fut = f(i);
            async move {
                let r = tokio::time::timeout(Duration::from_secs(30), fut)
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("connect timed out after 30 s")));
                if !gap.is_zero() {
                    tokio::time::sleep(gap).await;
                }
                r
            }
        })
        .buffered(concurrency)
        .collect()
        .await;
    results.into_iter().collect()
}

async fn new_worker(addr: &ServerAddr, function: &str) -> anyhow::Result<Worker> {
    let w = Worker::new([addr.clone()]);
    w.register(function);
    w.wait_for_server(Duration::from_secs(30))
        .await
        .context("worker could not connect")?;
    Ok(w)
}

async fn new_client(addr: &ServerAddr) -> anyhow::Result<Client> {
    Ok(Client::connect([addr.clone()]).await?)
}

/// Aborts the given tasks and waits until they are gone, so their sockets are closed.
async fn abort_all(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
}

// ---------------------------------------------------------------------------------------------
// echo
// ---------------------------------------------------------------------------------------------

/// Parameters of the echo workload.
#[derive(Debug, Clone, Copy)]
pub struct EchoParams {
    pub clients: usize,
    pub workers: usize,
    pub payload: usize,
    pub window: Window,
}

/// 8 clients × 8 workers, 64-byte payload, each client submitting one foreground job at a time.
pub async fn echo(server: &Server, p: EchoParams) -> anyhow::Result<Throughput> {
    let addr = server.addr();
    let function = "bench_echo";
    let conc = server.kind.connect_pacing();

    let workers = connect_many(p.workers, conc, |_| new_worker(&addr, function)).await?;
    let worker_tasks: Vec<_> = workers
        .into_iter()
        .map(|w| {
            tokio::spawn(async move {
                while let Some(job) = w.grab_job().await {
                    let data = job.data().clone();
                    let _ = job.complete(data).await;
                }
            })
        })
        .collect();
    let clients = connect_many(p.clients, conc, |_| new_client(&addr)).await?;

    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + p.window.warmup;
    let measure_to = measure_from + p.window.measure;
    let payload = Bytes::from(vec![b'x'; p.payload]);
    let client_tasks: Vec<_> = clients
        .into_iter()
        .map(|client| {
            let req = JobRequest::new(function, payload.clone());
            tokio::spawn(async move {
                let mut hist = new_hist();
                let mut done = 0u64;
                let mut errors = 0u64;
                tokio::time::sleep_until(start.into()).await;
                loop {
                    let t0 = Instant::now();
                    if t0 >= measure_to {
                        break;
                    }
                    let job = async { client.submit(req.clone()).await?.result().await };
                    let r = tokio::time::timeout(Duration::from_secs(30), job).await;
                    let t1 = Instant::now();
                    match r {
                        Ok(Ok(_)) if t1 >= measure_from && t1 < measure_to => {
                            record(&mut hist, t1 - t0);
                            done += 1;
                        }
                        Ok(Ok(_)) => {}
                        _ => {
                            errors += 1;
                            if errors > 20 {
                                break;
                            }
                        }
                    }
                }
                (hist, done, errors)
            })
        })
        .collect();

    tokio::time::sleep_until(measure_from.into()).await;
    let probe = CpuProbe::start(server.pid());
    tokio::time::sleep_until(measure_to.into()).await;
    let cpu = probe.finish();
    let rss_kib = server.rss_kib();

    let mut latency = new_hist();
    let mut done = 0;
    let mut errors = 0;
    for t in client_tasks {
        let (h, d, e) = t.await?;
        latency.add(&h).ok();
        done += d;
        errors += e;
    }
    abort_all(worker_tasks).await;
    Ok(Throughput {
        per_sec: done as f64 / p.window.measure.as_secs_f64(),
        latency,
        grant: None,
        errors,
        cpu,
        rss_kib,
    })
}

// ---------------------------------------------------------------------------------------------
// echo-idle
// ---------------------------------------------------------------------------------------------

/// Result of the echo-idle workload.
#[derive(Debug, Clone)]
pub struct IdleResult {
    /// Echo on the same server before the idle connections were opened.
    pub baseline: Throughput,
    /// Echo with the idle connections open.
    pub loaded: Option<Throughput>,
    pub wanted: usize,
    pub opened: usize,
    pub registered: usize,
    pub open_secs: f64,
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    /// Why the idle connections could not all be opened, if so.
    pub problem: Option<String>,
}

/// A CAN_DO packet for `function`.
fn can_do(function: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(12 + function.len());
    p.extend_from_slice(b"\0REQ");
    p.extend_from_slice(&1u32.to_be_bytes()); // CAN_DO
    p.extend_from_slice(&(function.len() as u32).to_be_bytes());
    p.extend_from_slice(function.as_bytes());
    p
}

/// Opens `n` plain TCP connections, each sending CAN_DO for its own function. Stops at
/// `budget`, or after too many failures.
async fn open_idle(
    addr: SocketAddr,
    n: usize,
    pacing: (usize, Duration),
    budget: Duration,
) -> (Vec<TcpStream>, Option<String>) {
    let (concurrency, gap) = pacing;
    let began = Instant::now();
    let deadline = began + budget;
    let sem = Arc::new(Semaphore::new(concurrency));
    let mut conns = Vec::with_capacity(n);
    let mut failures = 0usize;
    let mut last_err = None;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        if Instant::now() > deadline {
            break;
        }
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
        // Collect finished ones as we go so failures stop us early.
        while let Some(r) = set.try_join_next() {
            match r {
                Ok(Ok(s)) => conns.push(s),
                Ok(Err(e)) => {
                    failures += 1;
                    last_err = Some(e);
                }
                Err(e) => {
                    failures += 1;
                    last_err = Some(e.to_string());
                }
            }
        }
        if failures > 100 {
            break;
        }
        set.spawn(async move {
            let _permit = permit;
            let r = tokio::time::timeout(Duration::from_secs(10), async {
                let mut s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                s.write_all(&can_do(&format!("idle_{i}"))).await?;
                std::io::Result::Ok(s)
            })
            .await;
            match r {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(format!("connection {i}: {e}")),
                Err(_) => Err(format!("connection {i}: connect timed out after 10 s")),
            }
        });
    }
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(s)) => conns.push(s),
            Ok(Err(e)) => {
                failures += 1;
                last_err = Some(e);
            }
            Err(e) => {
                failures += 1;
                last_err = Some(e.to_string());
            }
        }
    }
    let problem = if conns.len() < n {
        Some(format!(
            "opened {} of {n} in {:.0} s ({failures} failed{})",
            conns.len(),
            began.elapsed().as_secs_f64(),
            last_err.map(|e| format!("; last: {e}")).unwrap_or_default()
        ))
    } else {
        None
    };
    (conns, problem)
}

pub async fn echo_idle(
    server: &Server,
    p: EchoParams,
    idle: usize,
    budget: Duration,
) -> anyhow::Result<IdleResult> {
    let baseline = echo(server, p).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before_kib = server.rss_kib();

    let t0 = Instant::now();
    let (conns, mut problem) = open_idle(
        server.sockaddr(),
        idle,
        server.kind.connect_pacing(),
        budget,
    )
    .await;
    let opened = conns.len();
    // Wait until the server has processed every CAN_DO (admin `status` lists the function).
    let mut registered = 0;
    let reg_deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < reg_deadline {
        match servers::registered_functions(server.sockaddr(), "idle_", Duration::from_secs(30))
            .await
        {
            Ok(n) => {
                registered = n;
                if n >= opened {
                    break;
                }
            }
            Err(e) => {
                problem.get_or_insert(format!("admin status failed: {e}"));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let open_secs = t0.elapsed().as_secs_f64();
    if registered < opened && problem.is_none() {
        problem = Some(format!(
            "only {registered} of {opened} idle functions registered after 60 s"
        ));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after_kib = server.rss_kib();

    let loaded = if opened > 0 {
        Some(echo(server, p).await?)
    } else {
        None
    };
    drop(conns);
    Ok(IdleResult {
        baseline,
        loaded,
        wanted: idle,
        opened,
        registered,
        open_secs,
        rss_before_kib,
        rss_after_kib,
        problem,
    })
}

// ---------------------------------------------------------------------------------------------
// lease
// ---------------------------------------------------------------------------------------------

/// Parameters of the lease workload.
#[derive(Debug, Clone, Copy)]
pub struct LeaseParams {
    pub tes: usize,
    pub clients: usize,
    pub window: Window,
}

/// testenv cycles with the real protocol, in-process: `tes` simulated testenv-workers and
/// `clients` simulated testenv-clients that hold their TE for 0 ms.
pub async fn lease(server: &Server, p: LeaseParams, tedata: Bytes) -> anyhow::Result<Throughput> {
    let addr = server.addr();
    let conc = server.kind.connect_pacing();

    // Simulated testenv-workers: `lockenv` worker plus a client connection for the callback.
    let te_workers = connect_many(p.tes, conc, |_| new_worker(&addr, LOCKENV)).await?;
    let te_clients = connect_many(p.tes, conc, |_| new_client(&addr)).await?;
    let te_tasks: Vec<_> = te_workers
        .into_iter()
        .zip(te_clients)
        .map(|(w, c)| {
            let tedata = tedata.clone();
            tokio::spawn(async move {
                while let Some(job) = w.grab_job().await {
                    let cb = match LockRequest::parse_valid(job.data()) {
                        Ok(r) => r.callback_name,
                        Err(_) => {
                            let _ = job.fail().await;
                            continue;
                        }
                    };
                    let r = async {
                        c.submit(JobRequest::new(cb, tedata.clone()))
                            .await?
                            .result()
                            .await
                    }
                    .await;
                    let _ = match r {
                        Ok(_) => job.complete(Bytes::new()).await,
                        Err(_) => job.fail().await,
                    };
                }
            })
        })
        .collect();

    // Simulated testenv-clients: a callback worker and a client connection each.
    let names: Vec<String> = (0..p.clients)
        .map(|_| callback_name(&uuid::Uuid::new_v4().simple().to_string()))
        .collect();
    let cb_workers = connect_many(p.clients, conc, |i| new_worker(&addr, &names[i])).await?;
    let clients = connect_many(p.clients, conc, |_| new_client(&addr)).await?;

    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + p.window.warmup;
    let measure_to = measure_from + p.window.measure;
    let client_tasks: Vec<_> = cb_workers
        .into_iter()
        .zip(clients)
        .zip(names)
        .map(|((w, c), name)| {
            let body = LockRequest {
                callback_name: name.clone(),
                timeout: "600".into(),
                envsize: "2".into(),
                compute_envsize: "0".into(),
                net_iso: "multi-nic".into(),
                extra_nodes: "0".into(),
                job_identifier: LockRequest::job_identifier(None, Some("bench")),
                ..LockRequest::default()
            };
            let req = JobRequest::new(LOCKENV, body.to_json());
            tokio::spawn(async move {
                let mut cycle_h = new_hist();
                let mut grant_h = new_hist();
                let mut done = 0u64;
                let mut errors = 0u64;
                tokio::time::sleep_until(start.into()).await;
                loop {
                    let t0 = Instant::now();
                    if t0 >= measure_to {
                        break;
                    }
                    // As testenv-client: the callback worker is already waiting when lockenv
                    // is submitted.
                    let cycle = async {
                        let (lock, cb) = tokio::join!(c.submit(req.clone()), async {
                            let j = w.grab_job().await;
                            (j, Instant::now())
                        });
                        let lock = lock?;
                        let (job, granted) = cb;
                        let job = job.ok_or_else(|| anyhow::anyhow!("callback worker stopped"))?;
                        job.complete(Bytes::new()).await?;
                        lock.result().await?;
                        anyhow::Ok(granted)
                    };
                    let r = tokio::time::timeout(Duration::from_secs(60), cycle).await;
                    let t1 = Instant::now();
                    match r {
                        Ok(Ok(granted)) => {
                            if t1 >= measure_from && t1 < measure_to {
                                record(&mut cycle_h, t1 - t0);
                                record(&mut grant_h, granted - t0);
                                done += 1;
                            }
                        }
                        _ => {
                            errors += 1;
                            if errors > 5 {
                                break;
                            }
                        }
                    }
                }
                (cycle_h, grant_h, done, errors)
            })
        })
        .collect();

    tokio::time::sleep_until(measure_from.into()).await;
    let probe = CpuProbe::start(server.pid());
    tokio::time::sleep_until(measure_to.into()).await;
    let cpu = probe.finish();
    let rss_kib = server.rss_kib();

    let mut latency = new_hist();
    let mut grant = new_hist();
    let mut done = 0;
    let mut errors = 0;
    for t in client_tasks {
        match tokio::time::timeout(Duration::from_secs(90), t).await {
            Ok(Ok((c, g, d, e))) => {
                latency.add(&c).ok();
                grant.add(&g).ok();
                done += d;
                errors += e;
            }
            _ => errors += 1,
        }
    }
    abort_all(te_tasks).await;
    Ok(Throughput {
        per_sec: done as f64 / p.window.measure.as_secs_f64(),
        latency,
        grant: Some(grant),
        errors,
        cpu,
        rss_kib,
    })
}

// ---------------------------------------------------------------------------------------------
// client-wall
// ---------------------------------------------------------------------------------------------

/// Result of the client-wall workload.
#[derive(Debug, Clone)]
pub struct WallResult {
    pub runs: Vec<Duration>,
    pub failures: usize,
    pub note: Option<String>,
}

impl WallResult {
    pub fn median(&self) -> Option<Duration> {
        let mut v = self.runs.clone();
        v.sort();
        v.get(v.len() / 2).copied()
    }
    pub fn min(&self) -> Option<Duration> {
        self.runs.iter().min().copied()
    }
    pub fn max(&self) -> Option<Duration> {
        self.runs.iter().max().copied()
    }
}

/// Wall time of the real `testenv-client -b ... -- true` with one free real testenv-worker.
pub async fn client_wall(
    server: &Server,
    runs: usize,
    datafile_content: &[u8],
    tmp: &Path,
) -> anyhow::Result<WallResult> {
    let client_exe = servers::sibling("testenv-client")
        .context("testenv-client is not built next to tebroker-bench")?;
    let worker_exe = servers::sibling("testenv-worker")
        .context("testenv-worker is not built next to tebroker-bench")?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("wall-{}-", server.kind.name()))
        .tempdir_in(tmp)?;
    let datafile = dir.path().join("testenv-1.json");
    std::fs::write(&datafile, datafile_content)?;
    let log = std::fs::File::create(dir.path().join("worker.log"))?;
    let mut worker = tokio::process::Command::new(&worker_exe)
        .arg("-b")
        .arg(server.hostport())
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["-n", "bench1"])
        .arg(&datafile)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start testenv-worker")?;

    let result = async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let n =
                servers::registered_functions(server.sockaddr(), LOCKENV, Duration::from_secs(5))
                    .await
                    .unwrap_or(0);
            if n > 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!("testenv-worker did not register lockenv within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut out = WallResult {
            runs: Vec::with_capacity(runs),
            failures: 0,
            note: None,
        };
        // One unmeasured run warms caches (binary pages, the worker's first lease).
        for i in 0..=runs {
            let t0 = Instant::now();
            let status = tokio::time::timeout(
                Duration::from_secs(60),
                tokio::process::Command::new(&client_exe)
                    .arg("-b")
                    .arg(server.hostport())
                    .args(["--", "true"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .kill_on_drop(true)
                    .status(),
            )
            .await;
            let wall = t0.elapsed();
            match status {
                Ok(Ok(s)) if s.success() => {
                    if i > 0 {
                        out.runs.push(wall);
                    }
                }
                Ok(Ok(s)) => {
                    out.failures += 1;
                    out.note = Some(format!("testenv-client exited with {s}"));
                }
                Ok(Err(e)) => {
                    out.failures += 1;
                    out.note = Some(format!("cannot run testenv-client: {e}"));
                }
                Err(_) => {
                    out.failures += 1;
                    out.note = Some("testenv-client did not finish within 60 s".into());
                }
            }
            if out.failures >= 3 {
                break;
            }
        }
        Ok(out)
    }
    .await;
    if let Some(pid) = worker.id() {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    if tokio::time::timeout(Duration::from_secs(5), worker.wait())
        .await
        .is_err()
    {
        let _ = worker.kill().await;
    }
    result
}

/// The paths an API reader reads in one round: the dashboard page and what it asks for on
/// every refresh (tebroker's dashboard.html, `refresh()`).
pub const READER_PATHS: [&str; 7] = [
    "/",
    "/api/v1/envs",
    "/api/v1/queue",
    "/api/v1/leases",
    "/api/v1/history?limit=25",
    "/api/v1/charts?hours=12",
    "/api/v1/stats",
];

/// HTTP readers polling tebroker's surface in a loop while a workload runs.
pub struct Readers {
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Readers read only while this is set; otherwise they wait.
    active: Arc<std::sync::atomic::AtomicBool>,
    /// When the readers were last set active, and for how long they have been in all.
    active_since: std::sync::Mutex<(Option<Instant>, Duration)>,
    tasks: Vec<tokio::task::JoinHandle<(u64, u64)>>,
    load: ReaderLoad,
}

/// How many readers, and how often each reads.
#[derive(Debug, Clone)]
pub struct ReaderLoad {
    pub readers: usize,
    /// After each round of `paths`; zero reads without pause.
    pub pause: Duration,
    /// What one round reads ([`READER_PATHS`] by default).
    pub paths: Arc<[String]>,
}

/// What the readers did.
#[derive(Debug, Clone)]
pub struct ReadersResult {
    pub load: ReaderLoad,
    /// Answers with status 200, per second over the readers' whole run.
    pub per_sec: f64,
    /// Failed requests (connection errors, non-200 answers).
    pub errors: u64,
}

impl Readers {
    /// Starts the readers of `http`, each on its own keep-alive connection (reopened when the
    /// server closes it), asking for `paths` one after the other and pausing after
    /// each round, like an open dashboard; their first rounds are spread over one pause.
    pub fn start(http: SocketAddr, load: ReaderLoad) -> Readers {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let active = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let n = load.readers;
        let pause = load.pause;
        let paths = load.paths.clone();
        let tasks = (0..n)
            .map(|i| {
                let stop = stop.clone();
                let active = active.clone();
                let paths = paths.clone();
                tokio::spawn(async move {
                    let (mut ok, mut errors) = (0u64, 0u64);
                    let mut conn: Option<tokio::io::BufStream<TcpStream>> = None;
                    let mut k = 0usize;
                    tokio::time::sleep(pause.mul_f64(i as f64 / n.max(1) as f64)).await;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if !active.load(std::sync::atomic::Ordering::Relaxed) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                        if k > 0 && k.is_multiple_of(paths.len()) && !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                        let path = paths[(i + k) % paths.len()].as_str();
                        k += 1;
                        if conn.is_none() {
                            match TcpStream::connect(http).await {
                                Ok(s) => {
                                    let _ = s.set_nodelay(true);
                                    conn = Some(tokio::io::BufStream::new(s));
                                }
                                Err(_) => {
                                    errors += 1;
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                    continue;
                                }
                            }
                        }
                        let stream = conn.as_mut().expect("connected above");
                        let answer = tokio::time::timeout(
                            Duration::from_secs(10),
                            http_get(stream, http, path),
                        )
                        .await;
                        match answer {
                            Ok(Ok(200)) => ok += 1,
                            Ok(Ok(_)) => errors += 1,
                            // Closed by the server (its connection lifetime) or broken.
                            Ok(Err(_)) | Err(_) => conn = None,
                        }
                    }
                    (ok, errors)
                })
            })
            .collect();
        Readers {
            stop,
            active,
            active_since: std::sync::Mutex::new((None, Duration::ZERO)),
            tasks,
            load,
        }
    }

    /// Starts or stops the reading (the readers start stopped).
    pub fn set_active(&self, on: bool) {
        let mut since = self.active_since.lock().unwrap_or_else(|e| e.into_inner());
        match (on, since.0) {
            (true, None) => since.0 = Some(Instant::now()),
            (false, Some(t)) => {
                since.1 += t.elapsed();
                since.0 = None;
            }
            _ => {}
        }
        self.active.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub async fn stop(self) -> ReadersResult {
        self.set_active(false);
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let elapsed = {
            let since = self.active_since.lock().unwrap_or_else(|e| e.into_inner());
            since.1.as_secs_f64().max(1e-9)
        };

        let (mut ok, mut errors) = (0, 0);
        for t in self.tasks {
            if let Ok((o, e)) = t.await {
                ok += o;
                errors += e;
            }
        }
        ReadersResult {
            load: self.load,
            per_sec: ok as f64 / elapsed,
            errors,
        }
    }
}

/// One keep-alive HTTP/1.1 GET; returns the status once the whole body is read.
async fn http_get(
    stream: &mut tokio::io::BufStream<TcpStream>,
    host: SocketAddr,
    path: &str,
) -> anyhow::Result<u16> {
    Ok(http_get_body(stream, host, path).await?.0)
}

/// One keep-alive HTTP/1.1 GET; returns the status and the body.
async fn http_get_body(
    stream: &mut tokio::io::BufStream<TcpStream>,
    host: SocketAddr,
    path: &str,
) -> anyhow::Result<(u16, Vec<u8>)> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    stream.flush().await?;
    let mut status = None;
    let mut length = None;
    let mut chunked = false;
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await? == 0 {
            bail!("connection closed");
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if status.is_none() {
            status = line.split_whitespace().nth(1).and_then(|c| c.parse().ok());
            continue;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse::<usize>().ok();
        } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    let mut body = Vec::new();
    if chunked {
        // Chunk size lines, then the chunks (each followed by CRLF), until the empty one.
        loop {
            let mut size = String::new();
            stream.read_line(&mut size).await?;
            let n = usize::from_str_radix(size.trim(), 16).context("chunk size")?;
            let mut chunk = vec![0; n + 2];
            stream.read_exact(&mut chunk).await?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        let n = length.context("an answer without content-length")?;
        body.resize(n, 0);
        stream.read_exact(&mut body).await?;
    }
    Ok((status.context("no status line")?, body))
}

/// Filtered `/api/v1/history` pages timed over HTTP, per kind of filter.
pub struct HistoryLatency {
    /// (filter, latencies of its pages in ns, mean rows per page).
    pub kinds: Vec<(&'static str, Histogram<u64>, f64)>,
    pub all: Histogram<u64>,
    pub errors: u64,
}

/// Times `queries` pages of each kind of filter through tebroker's API, on one keep-alive
/// connection, against a store filled by store-bench (`--data-dir DIR --history-rows N`: TEs
/// `te0`..`te99`, jobs `job-0`..`job-49999`, 30 days).
pub async fn history_api(http: SocketAddr, queries: usize) -> anyhow::Result<HistoryLatency> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut seed = 0x5eed_u64;
    let mut next = move |n: u64| {
        // xorshift64: the same pages every run.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut conn = tokio::io::BufStream::new(TcpStream::connect(http).await?);
    let mut result = HistoryLatency {
        kinds: Vec::new(),
        all: new_hist(),
        errors: 0,
    };
    let kinds: [&'static str; 6] = [
        "env",
        "job",
        "outcome=timed out",
        "env+outcome=failed",
        "since/until 1 day",
        "env, 5th page",
    ];
    for kind in kinds {
        let mut h = new_hist();
        let mut rows = 0usize;
        for _ in 0..queries {
            let mut query = match kind {
                "env" | "env, 5th page" => format!("env=te{}", next(100)),
                "job" => format!("job=job-{}", next(50_000)),
                "outcome=timed out" => "outcome=timed%20out".to_string(),
                "env+outcome=failed" => format!("env=te{}&outcome=failed", next(100)),
                _ => {
                    let since = now_ms.saturating_sub((1 + next(28)) * 86_400_000);
                    format!("since={since}&until={}", since + 86_400_000)
                }
            };
            if kind == "env, 5th page" {
                let first = query.clone();
                for _ in 0..4 {
                    let (_, body) = timed_json(&mut conn, http, &query).await?;
                    match body["next"].as_str() {
                        Some(cursor) => query = format!("{first}&cursor={cursor}"),
                        None => break,
                    }
                }
            }
            let t = Instant::now();
            match timed_json(&mut conn, http, &query).await {
                Ok((200, body)) => {
                    record(&mut h, t.elapsed());
                    record(&mut result.all, t.elapsed());
                    rows += body["leases"].as_array().map_or(0, Vec::len);
                }
                _ => {
                    result.errors += 1;
                    conn = tokio::io::BufStream::new(TcpStream::connect(http).await?);
                }
            }
        }
        result
            .kinds
            .push((kind, h, rows as f64 / queries.max(1) as f64));
    }
    Ok(result)
}

/// GET `/api/v1/history?QUERY` on `conn`; the status and the parsed JSON.
async fn timed_json(
    conn: &mut tokio::io::BufStream<TcpStream>,
    http: SocketAddr,
    query: &str,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let (status, body) = http_get_body(conn, http, &format!("/api/v1/history?{query}")).await?;
    Ok((status, serde_json::from_slice(&body).unwrap_or_default()))
}
