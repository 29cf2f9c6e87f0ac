//! The lease history file: one JSON object per ended lease, appended by a thread of its own so
//! slow storage never holds up the broker.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;

use broker_core::EndedLease;

pub struct HistoryWriter {
    tx: Option<mpsc::Sender<Vec<EndedLease>>>,
}

impl HistoryWriter {
    /// A writer appending to `path`; with no path, ended leases are only kept in memory.
    pub fn start(path: Option<PathBuf>) -> HistoryWriter {
        let Some(path) = path else {
            return HistoryWriter { tx: None };
        };
        let (tx, rx) = mpsc::channel::<Vec<EndedLease>>();
        std::thread::Builder::new()
            .name("lease-history".into())
            .spawn(move || {
                for batch in rx {
                    if let Err(e) = append(&path, &batch) {
                        tracing::error!(path = %path.display(), error = %e, "cannot append to the lease history");
                    }
                }
            })
            .expect("spawn history thread");
        HistoryWriter { tx: Some(tx) }
    }

    pub fn append(&self, ended: Vec<EndedLease>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(ended);
        }
    }
}

fn append(path: &PathBuf, batch: &[EndedLease]) -> std::io::Result<()> {
    let mut text = String::new();
    for lease in batch {
        text.push_str(&serde_json::to_string(lease).map_err(std::io::Error::other)?);
        text.push('\n');
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(text.as_bytes())
}
