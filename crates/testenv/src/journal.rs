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
    /// Seconds since the epoch (fractional) when the lease began.
    pub started: f64,
    /// Last time the worker holding the lease was known alive.
    pub heartbeat: f64,
}

#[derive(Debug, Clone)]
pub struct Journal {
    path: PathBuf,
}

pub fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
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
                    started: now_secs(),
                    heartbeat: now_secs(),
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
        record.heartbeat = now_secs();
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
        let free_at = record.heartbeat + holder_grace.as_secs_f64();
        Duration::from_secs_f64((free_at - now_secs()).max(0.0))
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
            started: now_secs(),
            heartbeat: 0.0,
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
