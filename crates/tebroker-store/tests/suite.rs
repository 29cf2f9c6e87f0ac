//! The store's test suite, run against both backends: every test is a function generic over a
//! [`Backend`] fixture, instantiated once for SQLite (a file in a temp dir) and once for
//! PostgreSQL (a real throwaway cluster from test-support; skipped loudly when PostgreSQL is not
//! installed, a failure under CI).

use std::collections::BTreeSet;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use tebroker_store::{
    Database, EnvState, EnvStateChange, HistoryQuery, InventoryQuery, LeaseRecord, Millis, Outcome,
    PauseKind, PauseRecord, Priority, Record, Stamped, Store, StoreError, StoreWriter, StoredLease,
    TePause, WaitEnd, WaitQuery, WaitRecord, WriterConfig, DEFAULT_PAGE, SCHEMA_VERSION,
};
use test_support::postgres::PgCluster;

/// A store to test, with the means to make it unavailable and back.
trait Backend {
    fn database(&self) -> Database;
    /// Writes fail until `come_back`.
    fn go_away(&mut self);
    fn come_back(&mut self);
    /// Runs raw SQL and returns the first column of the first row as an integer (or 0).
    fn scalar(&self, sql: &str) -> i64;

    fn open(&self) -> Box<dyn Store> {
        self.database().open().expect("open the store")
    }
}

struct SqliteBackend {
    dir: tempfile::TempDir,
    /// A connection holding the write lock while the store is "away".
    blocker: Option<rusqlite::Connection>,
}

impl SqliteBackend {
    fn new() -> SqliteBackend {
        SqliteBackend {
            dir: tempfile::tempdir().unwrap(),
            blocker: None,
        }
    }
    fn file(&self) -> std::path::PathBuf {
        self.dir.path().join(tebroker_store::sqlite::FILE_NAME)
    }
}

impl Backend for SqliteBackend {
    fn database(&self) -> Database {
        Database::Sqlite {
            dir: self.dir.path().to_path_buf(),
        }
    }
    fn go_away(&mut self) {
        // Another process holding the write lock (a backup, a stuck tool): every write waits out
        // the busy timeout and fails.
        drop(self.open());
        let conn = rusqlite::Connection::open(self.file()).unwrap();
        conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
        self.blocker = Some(conn);
    }
    fn come_back(&mut self) {
        let conn = self.blocker.take().expect("go_away first");
        conn.execute_batch("COMMIT").unwrap();
    }
    fn scalar(&self, sql: &str) -> i64 {
        let conn = rusqlite::Connection::open(self.file()).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        let mut stmt = conn.prepare(sql).unwrap();
        let mut rows = stmt.query([]).unwrap();
        match rows.next().unwrap() {
            Some(r) => r.get::<_, Option<i64>>(0).unwrap().unwrap_or(0),
            None => 0,
        }
    }
}

struct PgBackend {
    cluster: PgCluster,
}

impl PgBackend {
    fn start(test: &str) -> Option<PgBackend> {
        PgCluster::start_or_skip(test).map(|cluster| PgBackend { cluster })
    }
}

impl Backend for PgBackend {
    fn database(&self) -> Database {
        Database::postgres(&self.cluster.url()).unwrap()
    }
    fn go_away(&mut self) {
        self.cluster.stop();
    }
    fn come_back(&mut self) {
        self.cluster.restart();
    }
    fn scalar(&self, sql: &str) -> i64 {
        let mut c = ::postgres::Client::connect(&self.cluster.url(), ::postgres::NoTls).unwrap();
        c.batch_execute("SET statement_timeout = '10s'").unwrap();
        let rows = c.simple_query(sql).unwrap();
        rows.iter()
            .find_map(|m| match m {
                ::postgres::SimpleQueryMessage::Row(r) => {
                    Some(r.get(0).map_or(0, |v| v.parse().unwrap()))
                }
                _ => None,
            })
            .unwrap_or(0)
    }
}

macro_rules! suite {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(#[test]
            fn $test() {
                super::$test(&mut super::SqliteBackend::new());
            })*
        }
        mod postgres {
            $(#[test]
            fn $test() {
                if let Some(mut b) = super::PgBackend::start(concat!("postgres::", stringify!($test))) {
                    super::$test(&mut b);
                }
            })*
        }
    };
}

suite!(
    migrations_from_empty_and_reopen,
    concurrent_opens_migrate_once,
    history_filters_and_paging,
    inventory_and_failure_rate,
    retention_purges_only_old_records,
    waits_and_estimate,
    writer_writes_everything_once,
    two_writers_share_one_database,
    store_goes_away_and_comes_back,
    full_queue_drops_and_counts,
    hostile_text_is_stored_without_poisoning_the_batch,
    pauses_are_kept_per_broker_and_the_last_change_wins,
    a_version_1_database_gains_the_pauses_table_and_keeps_its_data,
);

// ---------------------------------------------------------------------------------------------
// Helpers

const DAY: Millis = 86_400_000;

fn lease(i: usize, env: &str, job: &str, outcome: Outcome, ended_ms: Millis) -> LeaseRecord {
    LeaseRecord {
        broker: "broker-a".into(),
        lockenv_handle: format!("H:broker-a:{i}"),
        env: env.into(),
        worker_id: format!("worker-{env}"),
        callback: format!("callback_{i}"),
        job_identifier: job.into(),
        tenant: "tenant".into(),
        priority: Priority::Normal,
        started_ms: ended_ms - 1000,
        ended_ms,
        outcome,
    }
}

fn state(env: &str, state: EnvState, since_ms: Millis, holder: Option<&str>) -> EnvStateChange {
    EnvStateChange {
        env: env.into(),
        agent: "host-1".into(),
        labels: vec!["ovb".into(), "big".into()],
        state,
        since_ms,
        detail: format!("{env} since {since_ms}"),
        holder: holder.map(str::to_string),
    }
}

fn granted(job: &str, function: &str, queued_ms: Millis, waited: Millis) -> WaitRecord {
    WaitRecord {
        job_identifier: job.into(),
        tenant: "tenant".into(),
        priority: Priority::High,
        function: function.into(),
        queued_ms,
        end: WaitEnd::Granted {
            at_ms: queued_ms + waited,
            env: "te1".into(),
        },
    }
}

/// Writes `records` directly, in one batch, keyed from `first_seq` under origin 1.
fn write_all(store: &mut dyn Store, first_seq: i64, records: Vec<Record>) {
    let batch: Vec<Stamped> = records
        .into_iter()
        .enumerate()
        .map(|(i, r)| Stamped::new(1, first_seq + i as i64, r))
        .collect();
    store.write(&batch).expect("write");
}

/// Every page of `q` (page size `q.limit`), checking the order within and across pages.
fn walk(store: &mut dyn Store, mut q: HistoryQuery) -> Vec<StoredLease> {
    let mut all: Vec<StoredLease> = Vec::new();
    loop {
        let page = store.history(&q).expect("history");
        assert!(page.leases.len() <= q.page_size() as usize);
        all.extend(page.leases);
        match page.next {
            Some(c) => q.after = Some(c),
            None => break,
        }
    }
    for w in all.windows(2) {
        assert!(
            w[0].cursor() > w[1].cursor(),
            "history is not strictly newest first: {:?} then {:?}",
            w[0].cursor(),
            w[1].cursor()
        );
    }
    all
}

/// The whole history, in pages of 1000.
fn walk_all(store: &mut dyn Store) -> Vec<StoredLease> {
    walk(
        store,
        HistoryQuery {
            limit: 1000,
            ..Default::default()
        },
    )
}

fn handles(leases: &[StoredLease]) -> BTreeSet<String> {
    leases
        .iter()
        .map(|l| l.lease.lockenv_handle.clone())
        .collect()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn writer(b: &dyn Backend, config: WriterConfig) -> StoreWriter {
    let db = b.database();
    StoreWriter::start(Box::new(move || db.open()), config)
}

fn quick_retries() -> WriterConfig {
    WriterConfig {
        retry_min: Duration::from_millis(20),
        retry_max: Duration::from_millis(300),
        ..WriterConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

fn migrations_from_empty_and_reopen(b: &mut dyn Backend) {
    {
        let mut s = b.open();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        let leases =
            (0..3).map(|i| lease(i, "te1", "job", Outcome::Released, 1000 + i as i64).into());
        write_all(&mut *s, 1, leases.collect());
    }
    let mut s = b.open();
    assert_eq!(
        s.schema_version().unwrap(),
        SCHEMA_VERSION,
        "re-open keeps the version"
    );
    assert_eq!(
        walk(&mut *s, HistoryQuery::default()).len(),
        3,
        "re-open keeps the data"
    );
    assert_eq!(
        b.scalar("SELECT COUNT(*) FROM schema_version"),
        i64::from(SCHEMA_VERSION),
        "each migration recorded once"
    );

    // A database a newer tebroker migrated is refused with a clear error, not misread.
    drop(s);
    let newer = SCHEMA_VERSION + 1;
    b.scalar(&format!(
        "INSERT INTO schema_version (version, applied_ms) VALUES ({newer}, 0)"
    ));
    match b.database().open() {
        Err(StoreError::SchemaTooNew { found, known }) => {
            assert_eq!((found, known), (newer, SCHEMA_VERSION))
        }
        Err(e) => panic!("expected SchemaTooNew, got {e}"),
        Ok(_) => panic!("a newer schema was accepted"),
    }
}

fn concurrent_opens_migrate_once(b: &mut dyn Backend) {
    let db = b.database();
    let barrier = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (db, barrier) = (db.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                db.open().map(|mut s| s.schema_version().unwrap())
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().expect("open"), SCHEMA_VERSION);
    }
    assert_eq!(
        b.scalar("SELECT COUNT(*) FROM schema_version"),
        i64::from(SCHEMA_VERSION)
    );
}

fn history_filters_and_paging(b: &mut dyn Backend) {
    let mut s = b.open();
    let envs = ["te1", "te2", "te3", "te4", "te5"];
    let base: Millis = 1_700_000_000_000;
    // Many leases share an end time, so the order's tie-break (the row id) is exercised.
    let data: Vec<LeaseRecord> = (0..300)
        .map(|i| {
            let outcome = Outcome::KNOWN[i % Outcome::KNOWN.len()].clone();
            let ended = base + ((i * 7919) % 60) as Millis * 1000;
            lease(i, envs[i % 5], &format!("job-{}", i % 20), outcome, ended)
        })
        .collect();
    for (n, chunk) in data.chunks(50).enumerate() {
        write_all(
            &mut *s,
            (n * 50) as i64,
            chunk.iter().cloned().map(Record::from).collect(),
        );
    }

    let expect = |f: &dyn Fn(&LeaseRecord) -> bool| -> BTreeSet<String> {
        data.iter()
            .filter(|l| f(l))
            .map(|l| l.lockenv_handle.clone())
            .collect()
    };
    let since = base + 20_000;
    let until = base + 40_000;
    let cases: Vec<(HistoryQuery, BTreeSet<String>)> = vec![
        (HistoryQuery::default(), expect(&|_| true)),
        (
            HistoryQuery {
                env: Some("te2".into()),
                ..Default::default()
            },
            expect(&|l| l.env == "te2"),
        ),
        (
            HistoryQuery {
                job: Some("job-7".into()),
                ..Default::default()
            },
            expect(&|l| l.job_identifier == "job-7"),
        ),
        (
            HistoryQuery {
                outcome: Some(Outcome::TimedOut),
                ..Default::default()
            },
            expect(&|l| l.outcome == Outcome::TimedOut),
        ),
        (
            HistoryQuery {
                since: Some(since),
                ..Default::default()
            },
            expect(&|l| l.ended_ms >= since),
        ),
        (
            HistoryQuery {
                until: Some(until),
                ..Default::default()
            },
            expect(&|l| l.ended_ms < until),
        ),
        (
            HistoryQuery {
                env: Some("te3".into()),
                outcome: Some(Outcome::Failed),
                since: Some(since),
                until: Some(until),
                ..Default::default()
            },
            expect(&|l| {
                l.env == "te3"
                    && l.outcome == Outcome::Failed
                    && l.ended_ms >= since
                    && l.ended_ms < until
            }),
        ),
        (
            HistoryQuery {
                env: Some("te1".into()),
                job: Some("job-2".into()),
                ..Default::default()
            },
            expect(&|l| l.env == "te1" && l.job_identifier == "job-2"),
        ),
        (
            HistoryQuery {
                env: Some("nonexistent".into()),
                ..Default::default()
            },
            BTreeSet::new(),
        ),
    ];
    for (q, want) in cases {
        for limit in [7, 1000] {
            let got = walk(&mut *s, HistoryQuery { limit, ..q.clone() });
            assert_eq!(
                got.len(),
                want.len(),
                "{q:?} limit {limit}: a lease twice or missing"
            );
            assert_eq!(handles(&got), want, "{q:?} limit {limit}");
        }
    }
    let all = walk_all(&mut *s);
    let stored: Vec<LeaseRecord> = all.iter().map(|l| l.lease.clone()).collect();
    for l in &data {
        assert!(
            stored.contains(l),
            "lease {} not stored as written",
            l.lockenv_handle
        );
    }

    // The default page size, and a walk that does not shift when newer leases arrive midway.
    let first = s.history(&HistoryQuery::default()).unwrap();
    assert_eq!(first.leases.len(), DEFAULT_PAGE as usize);
    let newer = (300..320).map(|i| lease(i, "te1", "job-new", Outcome::Released, base + 999_000));
    write_all(&mut *s, 1000, newer.map(Record::from).collect());
    let rest = walk(
        &mut *s,
        HistoryQuery {
            limit: 13,
            after: first.next,
            ..Default::default()
        },
    );
    let mut seen = handles(&first.leases);
    seen.extend(handles(&rest));
    assert_eq!(
        first.leases.len() + rest.len(),
        300,
        "the walk saw each old lease once"
    );
    assert_eq!(seen, expect(&|_| true));
}

fn inventory_and_failure_rate(b: &mut dyn Backend) {
    let mut s = b.open();
    write_all(
        &mut *s,
        1,
        vec![
            state("te1", EnvState::Ready, 100, None).into(),
            state("te1", EnvState::Leased, 200, Some("job-a")).into(),
            state("te2", EnvState::Ready, 100, None).into(),
            state("te2", EnvState::Unhealthy, 300, None).into(),
            state("te3", EnvState::Drained, 400, None).into(),
            // Older, though later in the same batch: not te3's latest state.
            state("te3", EnvState::Ready, 350, None).into(),
            lease(1, "te1", "j1", Outcome::Failed, 1000).into(),
            lease(2, "te1", "j2", Outcome::Released, 5000).into(),
            lease(3, "te1", "j3", Outcome::Failed, 6000).into(),
            lease(4, "te1", "j4", Outcome::TimedOut, 7000).into(),
            lease(5, "te1", "j5", Outcome::Released, 8000).into(),
            lease(6, "te2", "j6", Outcome::WorkerLost, 5000).into(),
        ],
    );
    // An older state change that arrives late (another broker's) does not win.
    write_all(
        &mut *s,
        100,
        vec![state("te2", EnvState::Ready, 250, None).into()],
    );

    let q = InventoryQuery {
        last_outcomes: 3,
        window_start_ms: 4000,
    };
    let inv = s.inventory(&q).unwrap();
    let names: Vec<&str> = inv.iter().map(|e| e.latest.env.as_str()).collect();
    assert_eq!(names, ["te1", "te2", "te3"]);

    let te1 = &inv[0];
    assert_eq!(te1.latest.state, EnvState::Leased);
    assert_eq!(
        (te1.latest.since_ms, te1.latest.holder.as_deref()),
        (200, Some("job-a"))
    );
    assert_eq!(te1.latest.labels, ["ovb", "big"]);
    assert_eq!(te1.latest.agent, "host-1");
    assert_eq!(
        te1.last_outcomes,
        [Outcome::Released, Outcome::TimedOut, Outcome::Failed],
        "newest first"
    );
    assert_eq!(
        (te1.window_leases, te1.window_failures),
        (4, 2),
        "the failure before the window is out"
    );
    assert_eq!(te1.failure_rate(), Some(0.5));

    let te2 = s.env("te2", &q).unwrap().expect("te2");
    assert_eq!(
        (te2.latest.state.clone(), te2.latest.since_ms),
        (EnvState::Unhealthy, 300)
    );
    assert_eq!(te2.latest.detail, "te2 since 300");
    assert_eq!(te2.failure_rate(), Some(1.0));
    let te3 = &inv[2];
    assert_eq!(
        (te3.latest.state.clone(), te3.latest.since_ms),
        (EnvState::Drained, 400)
    );
    assert_eq!((te3.last_outcomes.len(), te3.failure_rate()), (0, None));
    assert!(s.env("nope", &q).unwrap().is_none());

    let changes: Vec<(EnvState, Millis)> = s
        .env_states("te2", 10)
        .unwrap()
        .into_iter()
        .map(|c| (c.state, c.since_ms))
        .collect();
    assert_eq!(
        changes,
        [
            (EnvState::Unhealthy, 300),
            (EnvState::Ready, 250),
            (EnvState::Ready, 100)
        ]
    );
}

fn retention_purges_only_old_records(b: &mut dyn Backend) {
    let mut s = b.open();
    let now: Millis = 100 * DAY;
    write_all(
        &mut *s,
        1,
        vec![
            lease(1, "te1", "old", Outcome::Released, now - 31 * DAY).into(),
            lease(2, "te1", "new", Outcome::Released, now - 29 * DAY).into(),
            state("te-old", EnvState::Ready, now - 40 * DAY, None).into(),
            state("te1", EnvState::Ready, now - DAY, None).into(),
            granted("old", "lockenv", now - 35 * DAY, 10).into(),
            granted("new", "lockenv", now - 2 * DAY, 10).into(),
        ],
    );
    let counts = s.purge_older_than(30, now).unwrap();
    assert_eq!((counts.leases, counts.env_states, counts.waits), (1, 1, 1));
    let left = walk(&mut *s, HistoryQuery::default());
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].lease.job_identifier, "new");
    let waits = s.waits(&WaitQuery::default()).unwrap();
    assert_eq!(
        waits
            .iter()
            .map(|w| w.job_identifier.as_str())
            .collect::<Vec<_>>(),
        ["new"]
    );
    assert!(s.env_states("te-old", 10).unwrap().is_empty());
    let q = InventoryQuery {
        last_outcomes: 5,
        window_start_ms: 0,
    };
    assert!(
        s.env("te-old", &q).unwrap().is_some(),
        "a TE's latest state outlives the retention of its history"
    );
    assert_eq!(
        s.purge_older_than(30, now).unwrap(),
        Default::default(),
        "nothing left to purge"
    );
    assert_eq!(
        s.purge_older_than(u32::MAX, now).unwrap(),
        Default::default()
    );
}

fn waits_and_estimate(b: &mut dyn Backend) {
    let mut s = b.open();
    let mut records: Vec<Record> = [10, 20, 30, 40, 1000]
        .iter()
        .enumerate()
        .map(|(i, &w)| granted(&format!("j{i}"), "lockenv", 10_000 * i as Millis, w).into())
        .collect();
    records.push(
        WaitRecord {
            job_identifier: "gave-up".into(),
            tenant: "tenant".into(),
            priority: Priority::Low,
            function: "lockenv".into(),
            queued_ms: 0,
            end: WaitEnd::Abandoned { at_ms: 99_000 },
        }
        .into(),
    );
    records.push(granted("o1", "lockenv:ovb", 500, 5).into());
    write_all(&mut *s, 1, records);

    let e = s.wait_estimate("lockenv", 3).unwrap().expect("estimate");
    assert_eq!(
        (e.median_ms, e.samples),
        (40, 3),
        "the last three grants: 30, 40, 1000"
    );
    let e = s.wait_estimate("lockenv", 100).unwrap().expect("estimate");
    assert_eq!(
        (e.median_ms, e.samples),
        (30, 5),
        "abandoned waits are no sample"
    );
    let e = s
        .wait_estimate("lockenv:ovb", 100)
        .unwrap()
        .expect("estimate");
    assert_eq!((e.median_ms, e.samples), (5, 1));
    assert_eq!(s.wait_estimate("lockenv:none", 10).unwrap(), None);

    let all = s
        .waits(&WaitQuery {
            function: Some("lockenv".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(all.len(), 6);
    assert_eq!(all[0].job_identifier, "gave-up", "newest end first");
    assert_eq!(all[0].end, WaitEnd::Abandoned { at_ms: 99_000 });
    assert_eq!(all[0].priority, Priority::Low);
    let recent = s
        .waits(&WaitQuery {
            since: Some(30_000),
            ..Default::default()
        })
        .unwrap();
    let jobs: Vec<&str> = recent.iter().map(|w| w.job_identifier.as_str()).collect();
    assert_eq!(jobs, ["gave-up", "j4", "j3"]);
}

fn writer_writes_everything_once(b: &mut dyn Backend) {
    let w = writer(
        b,
        WriterConfig {
            batch_max: 300,
            ..WriterConfig::default()
        },
    );
    let n = 5000;
    for i in 0..n {
        w.record(lease(
            i,
            &format!("te{}", i % 7),
            "job",
            Outcome::Released,
            i as Millis,
        ));
        if i % 100 == 0 {
            w.record(state(
                &format!("te{}", i % 7),
                EnvState::Ready,
                i as Millis,
                None,
            ));
        }
    }
    assert!(
        w.flush(Duration::from_secs(60)),
        "not written in time: {:?}",
        w.stats()
    );
    let st = w.shutdown(Duration::from_secs(10));
    assert_eq!(
        (st.recorded, st.written, st.dropped),
        (n as u64 + 50, n as u64 + 50, 0)
    );
    assert_eq!((st.queue_depth, st.pending), (0, 0));
    assert!(st.store_up);

    let mut s = b.open();
    let all = walk_all(&mut *s);
    assert_eq!(all.len(), n);
    assert_eq!(handles(&all).len(), n, "no lease twice");
    let q = InventoryQuery {
        last_outcomes: 1,
        window_start_ms: 0,
    };
    assert_eq!(s.inventory(&q).unwrap().len(), 7);

    // A batch written again (its commit's answer was lost) adds nothing.
    let batch: Vec<Stamped> = (0..10)
        .map(|i| {
            Stamped::new(
                42,
                i,
                lease(90_000 + i as usize, "te1", "again", Outcome::Failed, 1).into(),
            )
        })
        .collect();
    s.write(&batch).unwrap();
    s.write(&batch).unwrap();
    let again = walk(
        &mut *s,
        HistoryQuery {
            job: Some("again".into()),
            ..Default::default()
        },
    );
    assert_eq!(again.len(), 10);
}

fn two_writers_share_one_database(b: &mut dyn Backend) {
    // Two brokers start at once on an empty database and write side by side.
    let per_broker = 2000;
    let barrier = Arc::new(Barrier::new(2));
    let threads: Vec<_> = ["b1", "b2"]
        .into_iter()
        .map(|broker| {
            let db = b.database();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let w = StoreWriter::start(Box::new(move || db.open()), quick_retries());
                for i in 0..per_broker {
                    let mut l = lease(
                        i,
                        &format!("{broker}-te{}", i % 3),
                        broker,
                        Outcome::Released,
                        i as Millis,
                    );
                    l.broker = broker.to_string();
                    l.lockenv_handle = format!("H:{broker}:{i}");
                    w.record(l);
                }
                w.record(state(&format!("{broker}-te0"), EnvState::Drained, 5, None));
                assert!(
                    w.flush(Duration::from_secs(60)),
                    "{broker}: {:?}",
                    w.stats()
                );
                w.shutdown(Duration::from_secs(10))
            })
        })
        .collect();
    for t in threads {
        let st = t.join().expect("writer thread");
        assert_eq!((st.written, st.dropped), (per_broker as u64 + 1, 0));
    }
    let mut s = b.open();
    for broker in ["b1", "b2"] {
        let mine = walk(
            &mut *s,
            HistoryQuery {
                job: Some(broker.into()),
                limit: 1000,
                ..Default::default()
            },
        );
        assert_eq!(mine.len(), per_broker, "{broker}'s leases");
        assert!(mine.iter().all(|l| l.lease.broker == broker));
        assert_eq!(handles(&mine).len(), per_broker);
    }
    let q = InventoryQuery {
        last_outcomes: 1,
        window_start_ms: 0,
    };
    let drained: Vec<String> = s
        .inventory(&q)
        .unwrap()
        .into_iter()
        .filter(|e| e.latest.state == EnvState::Drained)
        .map(|e| e.latest.env)
        .collect();
    assert_eq!(
        drained,
        ["b1-te0", "b2-te0"],
        "both brokers' TEs in one inventory"
    );
}

fn store_goes_away_and_comes_back(b: &mut dyn Backend) {
    let w = writer(b, quick_retries());
    let mut expected = BTreeSet::new();
    let mut record = |w: &StoreWriter, i: usize| {
        let l = lease(i, "te1", "job", Outcome::Released, i as Millis);
        expected.insert(l.lockenv_handle.clone());
        w.record(l);
    };
    for i in 0..200 {
        record(&w, i);
    }
    assert!(w.flush(Duration::from_secs(30)), "{:?}", w.stats());
    let mut reader = b.open();

    b.go_away();
    for i in 200..500 {
        record(&w, i);
    }
    wait_until(
        "a failed write while the store is away",
        Duration::from_secs(30),
        || w.stats().errors > 0,
    );
    assert!(!w.stats().store_up);
    assert!(
        w.stats().written < 500,
        "written while the store was away: {:?}",
        w.stats()
    );
    b.come_back();

    assert!(
        w.flush(Duration::from_secs(60)),
        "did not catch up: {:?}",
        w.stats()
    );
    let st = w.shutdown(Duration::from_secs(10));
    assert_eq!((st.recorded, st.written, st.dropped), (500, 500, 0));
    assert!(st.store_up);
    let mut s = b.open();
    let all = walk_all(&mut *s);
    assert_eq!(all.len(), 500, "every lease once: no loss, no duplicate");
    assert_eq!(handles(&all), expected);
    // A store opened before the outage answers again (PostgreSQL: it reconnects; the call that
    // finds the old connection dead may fail).
    let q = HistoryQuery::default();
    let answers: Vec<bool> = (0..2).map(|_| reader.history(&q).is_ok()).collect();
    assert!(
        answers[1],
        "a store opened before the outage does not answer after it"
    );
}

fn full_queue_drops_and_counts(b: &mut dyn Backend) {
    b.go_away();
    let (queue, hold) = (10, 10);
    let config = WriterConfig {
        queue_capacity: queue,
        pending_max: hold,
        batch_max: 5,
        ..quick_retries()
    };
    let w = writer(b, config);
    wait_until(
        "the writer to notice the store is away",
        Duration::from_secs(30),
        || w.stats().errors > 0,
    );
    let mut offered = 0;
    let offer_five = |offered: &mut usize| {
        for _ in 0..5 {
            w.record(lease(
                *offered,
                "te1",
                "job",
                Outcome::Released,
                *offered as Millis,
            ));
            *offered += 1;
        }
    };
    // Keep offering until the writer holds all it may and the queue is full too.
    wait_until(
        "the queue and the writer's holding to fill",
        Duration::from_secs(30),
        || {
            offer_five(&mut offered);
            let st = w.stats();
            st.pending >= hold as u64 && st.queue_depth >= queue as u64
        },
    );
    // Both full and nothing written: whatever comes now is dropped.
    offer_five(&mut offered);
    let st = w.stats();
    assert_eq!(st.written, 0, "written while the store was away: {st:?}");
    assert_eq!(
        st.pending, hold as u64,
        "the writer holds no more than pending_max: {st:?}"
    );
    assert_eq!(st.recorded, st.queue_depth + st.pending, "{st:?}");
    assert_eq!(
        st.recorded + st.dropped,
        offered as u64,
        "accepted or counted as dropped"
    );
    assert!(st.dropped >= 5, "{st:?}");

    b.come_back();
    assert!(w.flush(Duration::from_secs(60)), "{:?}", w.stats());
    let st = w.shutdown(Duration::from_secs(10));
    assert_eq!(st.written, st.recorded);
    assert_eq!(st.written + st.dropped, offered as u64);
    let mut s = b.open();
    let stored = walk_all(&mut *s);
    assert_eq!(
        stored.len() as u64,
        st.written,
        "what was counted written is stored"
    );
}

fn hostile_text_is_stored_without_poisoning_the_batch(b: &mut dyn Backend) {
    let w = writer(b, WriterConfig::default());
    let evil = format!("job\0with-nul-{}", "x".repeat(10_000));
    w.record(lease(
        1,
        "té1",
        &evil,
        Outcome::Other("gone\0weird".into()),
        10,
    ));
    w.record(lease(2, "te2", "plain", Outcome::Released, 20));
    assert!(w.flush(Duration::from_secs(30)), "{:?}", w.stats());
    let st = w.shutdown(Duration::from_secs(10));
    assert_eq!((st.written, st.errors), (2, 0), "{st:?}");
    let mut s = b.open();
    let all = walk(&mut *s, HistoryQuery::default());
    assert_eq!(all.len(), 2);
    let stored = &all[1].lease;
    assert!(stored.job_identifier.starts_with("job\u{FFFD}with-nul-xxx"));
    assert_eq!(
        stored.job_identifier.len(),
        tebroker_store::record::MAX_FIELD_BYTES
    );
    assert_eq!(stored.env, "té1");
    assert_eq!(stored.outcome, Outcome::Other("gone\u{FFFD}weird".into()));
    let by_env = walk(
        &mut *s,
        HistoryQuery {
            env: Some("té1".into()),
            ..Default::default()
        },
    );
    assert_eq!(by_env.len(), 1);
}

fn pause(broker: &str, env: &str, pause: Option<TePause>) -> Record {
    PauseRecord {
        broker: broker.into(),
        env: env.into(),
        pause,
    }
    .into()
}

fn pauses_are_kept_per_broker_and_the_last_change_wins(b: &mut dyn Backend) {
    let drain = TePause {
        kind: PauseKind::Drain,
        since_ms: 1000,
        until_ms: None,
    };
    let hold = TePause {
        kind: PauseKind::Hold,
        since_ms: 2000,
        until_ms: Some(9000),
    };
    {
        let mut s = b.open();
        assert_eq!(s.pauses("broker-a").unwrap(), vec![]);
        // In one batch: te1 drained then held (the hold wins), te2 drained then undrained.
        write_all(
            &mut *s,
            1,
            vec![
                pause("broker-a", "te1", Some(drain.clone())),
                pause("broker-a", "te2", Some(drain.clone())),
                pause("broker-b", "te1", Some(drain.clone())),
                pause("broker-a", "te1", Some(hold.clone())),
                pause("broker-a", "te2", None),
            ],
        );
        // A batch retried after a lost commit answer changes nothing.
        write_all(
            &mut *s,
            4,
            vec![pause("broker-a", "te1", Some(hold.clone()))],
        );
    }
    let mut s = b.open();
    assert_eq!(
        s.pauses("broker-a").unwrap(),
        vec![("te1".to_string(), hold.clone())]
    );
    assert_eq!(
        s.pauses("broker-b").unwrap(),
        vec![("te1".to_string(), drain)]
    );
    // Not history: retention leaves them.
    s.purge_older_than(1, 100 * DAY).unwrap();
    assert_eq!(s.pauses("broker-a").unwrap().len(), 1);
    write_all(&mut *s, 10, vec![pause("broker-a", "te1", None)]);
    assert_eq!(s.pauses("broker-a").unwrap(), vec![]);
}

fn a_version_1_database_gains_the_pauses_table_and_keeps_its_data(b: &mut dyn Backend) {
    {
        let mut s = b.open();
        write_all(
            &mut *s,
            1,
            vec![lease(1, "te1", "job", Outcome::Released, 5000).into()],
        );
    }
    // The database as version 1 left it.
    b.scalar("DROP TABLE pauses");
    b.scalar("DELETE FROM schema_version WHERE version > 1");
    let mut s = b.open();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(walk_all(&mut *s).len(), 1, "the leases stay");
    write_all(
        &mut *s,
        2,
        vec![pause(
            "broker-a",
            "te1",
            Some(TePause {
                kind: PauseKind::Drain,
                since_ms: 1,
                until_ms: None,
            }),
        )],
    );
    assert_eq!(s.pauses("broker-a").unwrap().len(), 1);
}
