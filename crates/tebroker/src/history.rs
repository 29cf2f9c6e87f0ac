//! The lease history file: one JSON object per ended lease, appended by a thread of its own so
//! slow storage never holds up the broker. A failed append is counted
//! (`history_write_errors`), logged, and retried: the unwritten lines are kept.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use broker_core::EndedLease;

use crate::edge::EdgeCounters;

/// How long unwritten lines wait before the next attempt when no new lease ends meanwhile.
const RETRY: Duration = Duration::from_millis(500);

pub struct HistoryWriter {
    tx: Mutex<Option<mpsc::Sender<Vec<EndedLease>>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl HistoryWriter {
    /// A writer appending to `path`; with no path, ended leases are only kept in memory.
    /// Refuses a path it cannot open for appending, so a typo fails at start-up rather than
    /// at the first ended lease.
    pub fn start(path: Option<PathBuf>, edge: Arc<EdgeCounters>) -> anyhow::Result<HistoryWriter> {
        let Some(path) = path else {
            return Ok(HistoryWriter {
                tx: Mutex::new(None),
                thread: Mutex::new(None),
            });
        };
        open(&path)
            .with_context(|| format!("cannot write the lease history file {}", path.display()))?;
        let (tx, rx) = mpsc::channel::<Vec<EndedLease>>();
        let thread = std::thread::Builder::new()
            .name("lease-history".into())
            .spawn(move || write_loop(&path, rx, &edge))
            .context("cannot start the lease history thread")?;
        Ok(HistoryWriter {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn append(&self, ended: Vec<EndedLease>) {
        if let Some(tx) = &*self.tx.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = tx.send(ended);
        }
    }

    /// Writes what is pending (one last attempt for lines that failed before) and stops.
    pub fn finish(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = thread.join();
        }
    }
}

fn write_loop(path: &Path, rx: mpsc::Receiver<Vec<EndedLease>>, edge: &EdgeCounters) {
    let mut unwritten: Vec<u8> = Vec::new();
    loop {
        let received = if unwritten.is_empty() {
            rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(RETRY)
        };
        let last = match received {
            Ok(batch) => {
                for lease in &batch {
                    match serde_json::to_vec(lease) {
                        Ok(line) => unwritten.extend_from_slice(&line),
                        Err(e) => tracing::error!(error = %e, "cannot encode an ended lease"),
                    }
                    unwritten.push(b'\n');
                }
                false
            }
            Err(mpsc::RecvTimeoutError::Timeout) => false,
            Err(mpsc::RecvTimeoutError::Disconnected) => true,
        };
        if !unwritten.is_empty() {
            if let Err(e) = append(path, &mut unwritten) {
                edge.count(&edge.history_write_errors);
                let lines = unwritten.iter().filter(|&&b| b == b'\n').count();
                tracing::error!(
                    path = %path.display(),
                    error = %e,
                    kept_lines = lines,
                    "cannot append to the lease history; keeping the lines to retry"
                );
                if last {
                    tracing::error!(lost_lines = lines, "stopping with lease history unwritten");
                }
            }
        }
        if last {
            return;
        }
    }
}

fn open(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// Appends `unwritten`; what was written is removed from it, so a failure part way keeps only
/// the rest.
fn append(path: &Path, unwritten: &mut Vec<u8>) -> std::io::Result<()> {
    let mut file = open(path)?;
    while !unwritten.is_empty() {
        match file.write(unwritten) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                unwritten.drain(..n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
