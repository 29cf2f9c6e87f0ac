//! The worker's lease journal: a small file per TE that says a lease is in progress and when the
//! worker was last alive, so a restarted worker knows not to re-offer a TE whose previous holder
//! may still be running.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub tenum: String,
    pub callback: String,
    pub job_identifier: String,
    /// Milliseconds since the epoch when the lease began.
    pub started_ms: u64,
    /// Last time the worker holding the lease was known alive.
    pub heartbeat_ms: u64,
}

#[derive(Debug, Clone)]
pub struct Journal {
    path: PathBuf,
}

/// Milliseconds since the epoch: whole numbers survive the JSON round trip exactly.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Journal {
    /// The journal of TE `tenum` in `dir` (created if missing).
    pub fn open(dir: &Path, tenum: &str) -> std::io::Result<Journal> {
        std::fs::create_dir_all(dir)?;
        let safe: String = tenum
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Ok(Journal {
            path: dir.join(format!("lease-{safe}.json")),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lease a previous run left open, if any.
    pub fn open_lease(&self) -> Option<LeaseRecord> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        match serde_json::from_str(&text) {
            Ok(r) => Some(r),
            Err(e) => {
                // A torn write: treat it as a lease of unknown age that just ended.
                tracing::warn!(path = %self.path.display(), error = %e, "unreadable lease journal");
                Some(LeaseRecord {
                    tenum: String::new(),
                    callback: String::new(),
                    job_identifier: String::new(),
                    started_ms: now_ms(),
                    heartbeat_ms: now_ms(),
                })
            }
        }
    }

    /// Records a lease (or refreshes its heartbeat), atomically.
    pub fn write(&self, record: &LeaseRecord) -> std::io::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(record).expect("serialisable"))?;
        std::fs::rename(&tmp, &self.path)
    }

    pub fn heartbeat(&self, record: &mut LeaseRecord) -> std::io::Result<()> {
        record.heartbeat_ms = now_ms();
        self.write(record)
    }

    pub fn clear(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// How long to wait, from now, before the TE of an unfinished `record` may be offered again.
    pub fn quarantine_left(record: &LeaseRecord, holder_grace: Duration) -> Duration {
        let free_at = record
            .heartbeat_ms
            .saturating_add(holder_grace.as_millis() as u64);
        Duration::from_millis(free_at.saturating_sub(now_ms()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_clear() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), "te/1").unwrap();
        assert!(j.open_lease().is_none());
        let mut r = LeaseRecord {
            tenum: "te/1".into(),
            callback: "callback_x".into(),
            job_identifier: "1: x".into(),
            started_ms: now_ms(),
            heartbeat_ms: 0,
        };
        j.heartbeat(&mut r).unwrap();
        assert_eq!(j.open_lease(), Some(r.clone()));
        let left = Journal::quarantine_left(&r, Duration::from_secs(10));
        assert!(left > Duration::from_secs(8) && left <= Duration::from_secs(10));
        j.clear().unwrap();
        assert!(j.open_lease().is_none());
        j.clear().unwrap();
    }
}
