//! [`StoreWriter`]: the broker hands records to a bounded queue and never waits; a background
//! thread writes them in batches, one transaction each. While the store is down the thread
//! keeps what it has taken (bounded), retries with exponential backoff, and catches up when the
//! store is back; what does not fit is counted as dropped. Every record carries the writer's
//! random origin and a sequence number, so a batch retried after a lost commit answer is not
//! written twice.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::record::{Record, Stamped};
use crate::{Store, StoreError};

/// Sizes and timings of a [`StoreWriter`].
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Records waiting for the thread; `record` drops (and counts) what does not fit.
    pub queue_capacity: usize,
    /// Records per transaction at most.
    pub batch_max: usize,
    /// Records the thread holds while the store is down (taken off the queue, not yet written).
    pub pending_max: usize,
    /// First retry delay after a failed write or open; doubles up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// At most one log line per this interval for drops, and one for errors.
    pub log_every: Duration,
    /// How long dropping the writer waits for what is queued to be written.
    pub shutdown_grace: Duration,
}

/// The sizes, reasoned from what a broker offers (not measured on a quiet machine yet): at its
/// saturated lease rate (15–20k leases/s) a broker records two records per lease (the lease and
/// its wait), so 30–40k records/s — twice what store-bench's default mix (one record per lease)
/// offered when it showed 0 drops at 20k leases/s. What the writer can fall behind by before a
/// record is dropped is `queue_capacity + pending_max`: with 2^16 + 2^16 that was ~3 s at 40k
/// records/s, less than a writer thread starved of CPU (the saturated bench on a loaded 2-core
/// machine dropped 1.4 %) or a TRUNCATE checkpoint can stall it. The queue is a bounded channel
/// whose slots are allocated up front (~250 B each, resident whether used or not), so it stays
/// at 2^16; `pending_max` is a deque that grows only while the store falls behind, so it goes
/// to 2^18 (~8 s of falling behind in all, ~100 MB at worst). `batch_max` goes from 2000 to
/// 8192: a writer that is behind catches up with a quarter of the commits (on PostgreSQL one
/// WAL flush each).
impl Default for WriterConfig {
    fn default() -> WriterConfig {
        WriterConfig {
            queue_capacity: 1 << 16,
            batch_max: 8192,
            pending_max: 1 << 18,
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            log_every: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// A snapshot of the writer's counters (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Accepted by `record`.
    pub recorded: u64,
    /// Committed to the store.
    pub written: u64,
    /// Refused because the queue was full, or still unwritten when the writer shut down.
    pub dropped: u64,
    /// Failed writes and failed attempts to open the store.
    pub errors: u64,
    /// Records in the queue.
    pub queue_depth: u64,
    /// Records the thread holds, not yet written.
    pub pending: u64,
    /// Whether the last attempt to open or write the store succeeded.
    pub store_up: bool,
}

#[derive(Default)]
struct Counters {
    recorded: AtomicU64,
    written: AtomicU64,
    dropped: AtomicU64,
    errors: AtomicU64,
    queue_depth: AtomicU64,
    pending: AtomicU64,
    store_up: AtomicBool,
}

/// Opens the store; called again after it fails.
pub type Opener = Box<dyn FnMut() -> Result<Box<dyn Store>, StoreError> + Send>;

pub struct StoreWriter {
    queue: Option<SyncSender<Record>>,
    counters: Arc<Counters>,
    stop_by: Arc<Mutex<Option<Instant>>>,
    grace: Duration,
    thread: Option<JoinHandle<()>>,
}

impl StoreWriter {
    /// Starts the writer thread for the store `open` returns (it is opened in the thread, so a
    /// store that is down at start only delays the writes).
    pub fn start(open: Opener, config: WriterConfig) -> StoreWriter {
        let (tx, rx) = mpsc::sync_channel(config.queue_capacity.max(1));
        let counters = Arc::new(Counters::default());
        let stop_by = Arc::new(Mutex::new(None));
        let grace = config.shutdown_grace;
        let thread = {
            let counters = counters.clone();
            let stop_by = stop_by.clone();
            std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || {
                    // The origin keys this writer's records; random so two brokers (or one broker
                    // restarted) never collide.
                    let origin = (uuid::Uuid::new_v4().as_u64_pair().0 >> 1) as i64;
                    WriterThread {
                        open,
                        store: None,
                        rx,
                        pending: VecDeque::new(),
                        origin,
                        next_seq: 0,
                        counters,
                        stop_by,
                        config,
                    }
                    .run()
                })
                .expect("spawn the store writer thread")
        };
        StoreWriter {
            queue: Some(tx),
            counters,
            stop_by,
            grace,
            thread: Some(thread),
        }
    }

    /// Queues `record` for writing; never blocks. A full queue drops it (counted, and logged
    /// at most once per `log_every` by the thread).
    pub fn record(&self, record: impl Into<Record>) {
        let c = &self.counters;
        let Some(queue) = &self.queue else {
            c.dropped.fetch_add(1, Relaxed);
            return;
        };
        c.queue_depth.fetch_add(1, Relaxed);
        match queue.try_send(record.into()) {
            Ok(()) => {
                c.recorded.fetch_add(1, Relaxed);
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                c.queue_depth.fetch_sub(1, Relaxed);
                c.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    pub fn stats(&self) -> WriterStats {
        let c = &self.counters;
        WriterStats {
            recorded: c.recorded.load(Relaxed),
            written: c.written.load(Relaxed),
            dropped: c.dropped.load(Relaxed),
            errors: c.errors.load(Relaxed),
            queue_depth: c.queue_depth.load(Relaxed),
            pending: c.pending.load(Relaxed),
            store_up: c.store_up.load(Relaxed),
        }
    }

    /// Waits (at most `timeout`) until everything recorded before this call is written; false
    /// if the time ran out.
    pub fn flush(&self, timeout: Duration) -> bool {
        let target = self.counters.recorded.load(Relaxed);
        let deadline = Instant::now() + timeout;
        loop {
            if self.counters.written.load(Relaxed) >= target {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops accepting records, gives the thread `grace` to write what it has, and returns the
    /// final counters (records still unwritten then count as dropped).
    pub fn shutdown(mut self, grace: Duration) -> WriterStats {
        self.stop(grace);
        self.stats()
    }

    fn stop(&mut self, grace: Duration) {
        self.queue = None;
        *self.stop_by.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + grace);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the store writer thread panicked");
            }
        }
    }
}

impl Drop for StoreWriter {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop(self.grace);
        }
    }
}

/// Logs one line per interval and says how many it kept quiet.
struct RateLimitedLog {
    every: Duration,
    last: Option<Instant>,
    quiet: u64,
}

impl RateLimitedLog {
    fn new(every: Duration) -> RateLimitedLog {
        RateLimitedLog {
            every,
            last: None,
            quiet: 0,
        }
    }

    /// Whether to log now; if so, also how many earlier lines were skipped.
    fn due(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            self.quiet += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.quiet))
    }
}

struct WriterThread {
    open: Opener,
    store: Option<Box<dyn Store>>,
    rx: Receiver<Record>,
    pending: VecDeque<Stamped>,
    origin: i64,
    next_seq: i64,
    counters: Arc<Counters>,
    stop_by: Arc<Mutex<Option<Instant>>>,
    config: WriterConfig,
}

/// The longest the thread sleeps before looking at the queue, its retry time and shutdown.
const TICK: Duration = Duration::from_millis(100);

impl WriterThread {
    fn run(mut self) {
        let mut backoff = self.config.retry_min;
        let mut next_try = Instant::now();
        let mut queue_open = true;
        let mut error_log = RateLimitedLog::new(self.config.log_every);
        let mut drop_log = RateLimitedLog::new(self.config.log_every);
        let mut dropped_logged = 0;
        let mut failing_since: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let work = !self.pending.is_empty() || self.store.is_none();
            let wait = if work && now >= next_try {
                Duration::ZERO
            } else if !work {
                TICK
            } else {
                next_try.duration_since(now).min(TICK)
            };
            if queue_open {
                queue_open = self.take_from_queue(wait);
            } else if !wait.is_zero() {
                std::thread::sleep(wait);
            }

            let stop_by = *self.stop_by.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(deadline) = stop_by {
                if self.pending.is_empty() && !queue_open {
                    return;
                }
                if Instant::now() >= deadline {
                    self.give_up();
                    return;
                }
            }

            let dropped = self.counters.dropped.load(Relaxed);
            if dropped > dropped_logged {
                if let Some(quiet) = drop_log.due() {
                    tracing::warn!(
                        dropped_since_last_report = dropped - dropped_logged,
                        dropped_total = dropped,
                        quiet,
                        "store queue full: records dropped (the broker keeps leasing)"
                    );
                    dropped_logged = dropped;
                }
            }

            // The store is opened at start even with nothing to write, so a bad address or a
            // database that is down shows in the log and the counters at once.
            let work = !self.pending.is_empty() || self.store.is_none();
            if !work || Instant::now() < next_try {
                continue;
            }
            match self.write_one_batch() {
                Ok(()) => {
                    if let Some(since) = failing_since.take() {
                        tracing::info!(
                            down_for_ms = since.elapsed().as_millis() as u64,
                            "store is back; catching up"
                        );
                    }
                    backoff = self.config.retry_min;
                    self.counters.store_up.store(true, Relaxed);
                }
                Err(e) => {
                    self.counters.errors.fetch_add(1, Relaxed);
                    self.counters.store_up.store(false, Relaxed);
                    failing_since.get_or_insert_with(Instant::now);
                    if let Some(quiet) = error_log.due() {
                        tracing::warn!(
                            error = %e,
                            retry_in_ms = backoff.as_millis() as u64,
                            holding = self.pending.len(),
                            quiet,
                            "store write failed; keeping the records and retrying"
                        );
                    }
                    next_try = Instant::now() + backoff;
                    backoff = (backoff * 2).min(self.config.retry_max);
                }
            }
        }
    }

    /// Moves records from the queue into `pending` (waiting up to `wait` for the first), up to
    /// `pending_max`. Returns false once the queue is closed and empty.
    fn take_from_queue(&mut self, wait: Duration) -> bool {
        let room = self.config.pending_max.saturating_sub(self.pending.len());
        if room == 0 {
            std::thread::sleep(wait);
            return true;
        }
        let first = if wait.is_zero() {
            match self.rx.try_recv() {
                Ok(r) => r,
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        } else {
            match self.rx.recv_timeout(wait) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => return true,
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        };
        self.push(first);
        for _ in 1..room {
            match self.rx.try_recv() {
                Ok(r) => self.push(r),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
        true
    }

    fn push(&mut self, record: Record) {
        self.counters.queue_depth.fetch_sub(1, Relaxed);
        self.next_seq += 1;
        self.pending
            .push_back(Stamped::new(self.origin, self.next_seq, record));
        self.counters.pending.fetch_add(1, Relaxed);
    }

    fn write_one_batch(&mut self) -> Result<(), StoreError> {
        let store = match &mut self.store {
            Some(s) => s,
            None => {
                let s = (self.open)()?;
                tracing::info!(store = %s.describe(), "store open");
                self.store.insert(s)
            }
        };
        let n = self.config.batch_max.max(1).min(self.pending.len());
        if n == 0 {
            return Ok(());
        }
        let batch = &self.pending.make_contiguous()[..n];
        store.write(batch)?;
        self.pending.drain(..n);
        self.counters.pending.fetch_sub(n as u64, Relaxed);
        self.counters.written.fetch_add(n as u64, Relaxed);
        Ok(())
    }

    /// The shutdown deadline passed with records unwritten: count them as dropped.
    fn give_up(&mut self) {
        let mut lost = self.pending.len() as u64;
        self.counters.pending.store(0, Relaxed);
        self.pending.clear();
        while self.rx.try_recv().is_ok() {
            self.counters.queue_depth.fetch_sub(1, Relaxed);
            lost += 1;
        }
        if lost > 0 {
            self.counters.dropped.fetch_add(lost, Relaxed);
            tracing::error!(lost, "store writer stopped with records unwritten");
        }
    }
}
