//! The store's benchmark (not a test):
//!
//! ```text
//! cargo run --release -p tebroker-store --example store-bench -- \
//!     [--backend sqlite|postgres|both] [--rate N] [--seconds S] [--mix leases|full] \
//!     [--history-rows N] [--queries N] [--data-dir DIR] [--database URL]
//! ```
//!
//! 1. Write throughput: records offered to a [`StoreWriter`] at `--rate` leases/s (0 = as fast
//!    as possible) for `--seconds`; prints how many were recorded, written and dropped, and how
//!    long the writer took to catch up. `--mix full` offers per lease what a broker would: the
//!    lease, its wait and two TE state changes.
//! 2. History latency: fills a fresh store with `--history-rows` leases (100 TEs, 30 days) and
//!    times filtered `history` pages (p50/p99 per kind of filter).
//!
//! PostgreSQL runs in a throwaway cluster with the server's default durability (test-support's
//! `PgCluster`), unless `--database` names one. SQLite uses a temp dir unless `--data-dir`.

use std::time::{Duration, Instant};

use tebroker_store::{
    Database, EnvState, EnvStateChange, HistoryQuery, LeaseRecord, Millis, Outcome, Priority,
    Record, Stamped, Store, StoreWriter, WaitEnd, WaitRecord, WriterConfig,
};
use test_support::postgres::{Durability, PgCluster};

struct Args {
    backends: Vec<String>,
    rate: u64,
    seconds: u64,
    full_mix: bool,
    history_rows: u64,
    queries: usize,
    data_dir: Option<std::path::PathBuf>,
    database: Option<String>,
}

fn parse_args() -> Args {
    let mut a = Args {
        backends: vec!["sqlite".into(), "postgres".into()],
        rate: 20_000,
        seconds: 60,
        full_mix: false,
        history_rows: 1_000_000,
        queries: 300,
        data_dir: None,
        database: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| die(&format!("{flag} needs a value")))
        };
        let number = |v: String| {
            v.parse::<u64>()
                .unwrap_or_else(|_| die(&format!("bad number {v:?}")))
        };
        match flag.as_str() {
            "--backend" => {
                a.backends = match value().as_str() {
                    "both" => vec!["sqlite".into(), "postgres".into()],
                    b @ ("sqlite" | "postgres") => vec![b.to_string()],
                    other => die(&format!("unknown backend {other:?}")),
                }
            }
            "--rate" => a.rate = number(value()),
            "--seconds" => a.seconds = number(value()),
            "--mix" => {
                a.full_mix = match value().as_str() {
                    "leases" => false,
                    "full" => true,
                    other => die(&format!("unknown mix {other:?}")),
                }
            }
            "--history-rows" => a.history_rows = number(value()),
            "--queries" => a.queries = number(value()) as usize,
            "--data-dir" => a.data_dir = Some(value().into()),
            "--database" => a.database = Some(value()),
            "-h" | "--help" => {
                println!("see the doc comment of crates/tebroker-store/examples/store-bench.rs");
                std::process::exit(0);
            }
            other => die(&format!("unknown argument {other:?}")),
        }
    }
    a
}

fn die(msg: &str) -> ! {
    eprintln!("store-bench: {msg}");
    std::process::exit(2)
}

/// Seeded, so the figures do not depend on luck.
type Rng = fastrand::Rng;

const ENVS: u64 = 100;
const JOBS: u64 = 50_000;

fn lease(rng: &mut Rng, i: u64, ended_ms: Millis) -> LeaseRecord {
    let outcome = match rng.u64(..100) {
        0..=89 => Outcome::Released,
        90..=95 => Outcome::Failed,
        96..=97 => Outcome::WorkerLost,
        _ => Outcome::TimedOut,
    };
    let env = format!("te{}", rng.u64(..ENVS));
    LeaseRecord {
        broker: "bench".into(),
        lockenv_handle: format!("H:bench:{i}"),
        worker_id: format!("testenv-worker-{env}"),
        env,
        callback: format!("callback_{i:032x}"),
        job_identifier: format!("job-{}", rng.u64(..JOBS)),
        tenant: "openstack/tripleo-ci".into(),
        priority: Priority::Normal,
        started_ms: ended_ms - 3_600_000,
        ended_ms,
        outcome,
    }
}

/// What a broker records for one lease in the `full` mix.
fn full_lease(rng: &mut Rng, i: u64, now: Millis) -> Vec<Record> {
    let l = lease(rng, i, now);
    let state = |s: EnvState, holder: Option<String>| EnvStateChange {
        env: l.env.clone(),
        agent: "host-1".into(),
        labels: vec!["ovb".into()],
        state: s,
        since_ms: now,
        detail: String::new(),
        holder,
    };
    vec![
        WaitRecord {
            job_identifier: l.job_identifier.clone(),
            tenant: l.tenant.clone(),
            priority: Priority::Normal,
            function: "lockenv".into(),
            queued_ms: now - 50,
            end: WaitEnd::Granted {
                at_ms: now,
                env: l.env.clone(),
            },
        }
        .into(),
        state(EnvState::Leased, Some(l.job_identifier.clone())).into(),
        state(EnvState::Ready, None).into(),
        l.into(),
    ]
}

/// CPU seconds the thread named `name` has used (from /proc; 0 if not found): what the writer
/// costs, whatever else the machine is doing.
fn thread_cpu_seconds(name: &str) -> f64 {
    let ticks_per_s = 100.0; // USER_HZ on Linux
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            f.get(i - 3)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        return (ticks(14) + ticks(15)) / ticks_per_s;
    }
    0.0
}

fn write_throughput(db: &Database, a: &Args) {
    let writer = {
        let db = db.clone();
        StoreWriter::start(Box::new(move || db.open()), WriterConfig::default())
    };
    let mut rng = Rng::with_seed(0x5eed);
    let start = Instant::now();
    let end = start + Duration::from_secs(a.seconds);
    let mut offered = 0u64;
    let mut max_depth = 0u64;
    let mut i = 0u64;
    while Instant::now() < end {
        let due = if a.rate == 0 {
            offered + 1000
        } else {
            (start.elapsed().as_secs_f64() * a.rate as f64) as u64
        };
        let now = tebroker_store::now_ms();
        while offered < due {
            if a.full_mix {
                for r in full_lease(&mut rng, i, now) {
                    writer.record(r);
                }
            } else {
                writer.record(lease(&mut rng, i, now));
            }
            offered += 1;
            i += 1;
        }
        max_depth = max_depth.max(writer.stats().queue_depth);
        if a.rate != 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let offered_for = start.elapsed();
    let at_end = writer.stats();
    let caught_up = writer.flush(Duration::from_secs(300));
    let writer_cpu = thread_cpu_seconds("store-writer");
    let total = start.elapsed();
    let st = writer.shutdown(Duration::from_secs(10));
    let per_lease = if a.full_mix { 4 } else { 1 };
    println!(
        "  write: offered {offered} leases ({} records) in {:.1}s = {:.0} leases/s; recorded {} \
         records, dropped {}, written {} ({:.0} leases/s over the run incl. catch-up {:.1}s{}); \
         max queue depth {max_depth}, errors {}",
        offered * per_lease,
        offered_for.as_secs_f64(),
        offered as f64 / offered_for.as_secs_f64(),
        st.recorded,
        st.dropped,
        st.written,
        st.written as f64 / per_lease as f64 / total.as_secs_f64(),
        (total - offered_for).as_secs_f64(),
        if caught_up { "" } else { ", NOT caught up" },
        st.errors,
    );
    println!(
        "         written by the end of the offered period: {} records ({:.0} leases/s); \
         writer thread CPU {writer_cpu:.1}s = {:.0} leases per CPU-second",
        at_end.written,
        at_end.written as f64 / per_lease as f64 / offered_for.as_secs_f64(),
        st.written as f64 / per_lease as f64 / writer_cpu.max(0.001)
    );
}

fn fill(store: &mut dyn Store, rows: u64) {
    let mut rng = Rng::with_seed(0xf111);
    let start = Instant::now();
    let first: Millis = tebroker_store::now_ms() - 30 * 86_400_000;
    let step = (30 * 86_400_000 / rows.max(1)) as Millis;
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..rows {
        let l = lease(&mut rng, i, first + step * i as Millis);
        batch.push(Stamped::new(7, i as i64, l.into()));
        if batch.len() == 10_000 {
            store.write(&batch).expect("fill");
            batch.clear();
        }
    }
    store.write(&batch).expect("fill");
    println!(
        "  fill: {rows} leases in {:.1}s ({:.0}/s direct batches of 10k)",
        start.elapsed().as_secs_f64(),
        rows as f64 / start.elapsed().as_secs_f64()
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn history_latency(store: &mut dyn Store, a: &Args) {
    let mut rng = Rng::with_seed(0xabcd);
    let now = tebroker_store::now_ms();
    type Make = fn(&mut Rng, Millis) -> HistoryQuery;
    let kinds: [(&str, Make); 7] = [
        ("newest page", |_, _| HistoryQuery::default()),
        ("env", |r, _| HistoryQuery {
            env: Some(format!("te{}", r.u64(..ENVS))),
            ..Default::default()
        }),
        ("job", |r, _| HistoryQuery {
            job: Some(format!("job-{}", r.u64(..JOBS))),
            ..Default::default()
        }),
        ("outcome=timed out", |_, _| HistoryQuery {
            outcome: Some(Outcome::TimedOut),
            ..Default::default()
        }),
        ("env+outcome=failed", |r, _| HistoryQuery {
            env: Some(format!("te{}", r.u64(..ENVS))),
            outcome: Some(Outcome::Failed),
            ..Default::default()
        }),
        ("since/until 1 day", |r, now| {
            let since = now - (1 + r.u64(..28) as Millis) * 86_400_000;
            HistoryQuery {
                since: Some(since),
                until: Some(since + 86_400_000),
                ..Default::default()
            }
        }),
        ("env, 5th page", |r, _| HistoryQuery {
            env: Some(format!("te{}", r.u64(..ENVS))),
            ..Default::default()
        }),
    ];
    let mut all = Vec::new();
    for (name, make) in kinds {
        let mut times = Vec::with_capacity(a.queries);
        let mut rows = 0;
        for _ in 0..a.queries {
            let mut q = make(&mut rng, now);
            if name == "env, 5th page" {
                for _ in 0..4 {
                    q.after = store.history(&q).expect("history").next;
                }
            }
            let t = Instant::now();
            let page = store.history(&q).expect("history");
            times.push(t.elapsed());
            rows += page.leases.len();
        }
        times.sort();
        println!(
            "  history {name:<20} p50 {:>7.2} ms  p99 {:>7.2} ms  ({:.0} rows/page)",
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            percentile(&times, 0.99).as_secs_f64() * 1e3,
            rows as f64 / a.queries as f64
        );
        all.extend(times);
    }
    all.sort();
    println!(
        "  history all filters          p50 {:>7.2} ms  p99 {:>7.2} ms  ({} pages of 50)",
        percentile(&all, 0.5).as_secs_f64() * 1e3,
        percentile(&all, 0.99).as_secs_f64() * 1e3,
        all.len()
    );
}

fn main() {
    let a = parse_args();
    for backend in &a.backends {
        let mut _cluster = None;
        let mut _tmp = None;
        let (write_db, read_db) = match backend.as_str() {
            "sqlite" => {
                let dir = match &a.data_dir {
                    Some(d) => d.clone(),
                    None => _tmp
                        .insert(tempfile::tempdir().expect("temp dir"))
                        .path()
                        .to_path_buf(),
                };
                (
                    Database::Sqlite {
                        dir: dir.join("write"),
                    },
                    Database::Sqlite {
                        dir: dir.join("history"),
                    },
                )
            }
            _ => {
                let (write_url, read_url) = match &a.database {
                    Some(u) => (u.clone(), u.clone()),
                    None => {
                        if let Some(why) = PgCluster::missing() {
                            println!("{backend}: skipped: {why}");
                            continue;
                        }
                        let c = _cluster.insert(PgCluster::start(Durability::Default));
                        c.psql("CREATE DATABASE history");
                        (c.url(), c.url_for("history"))
                    }
                };
                let db = |u: &str| Database::postgres(u).unwrap_or_else(|e| die(&e.to_string()));
                (db(&write_url), db(&read_url))
            }
        };
        println!("{backend} ({write_db}):");
        if a.seconds > 0 {
            write_throughput(&write_db, &a);
        }
        if a.history_rows > 0 {
            let mut store = read_db.open().unwrap_or_else(|e| die(&e.to_string()));
            if backend == "postgres" {
                // The write phase's leases would skew the history figures: start empty.
                store
                    .purge_older_than(0, Millis::MAX)
                    .expect("empty the store");
            }
            fill(&mut *store, a.history_rows);
            history_latency(&mut *store, &a);
        }
    }
}
