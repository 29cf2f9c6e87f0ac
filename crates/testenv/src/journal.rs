//! The worker's lease journal: a small file per TE that says a lease is in progress and when the
//! worker was last alive, so a restarted worker knows not to re-offer a TE whose previous holder
//! may still be running.
//!
//! **One worker per TE.** [`Journal::open`] takes an exclusive `flock` on `lease-NAME.lock`
//! and holds it for the life of the [`Journal`] (the journal file itself is replaced on every
//! write, so it cannot carry the lock). NAME escapes the TE name injectively: ASCII letters,
//! digits and `-` stay, every other byte (`_` included) becomes `_XX` (hex), so `te.1`, `te/1`
//! and `te_1` get `te_2e1`, `te_2f1` and `te_5f1`.
//!
//! **Time.** The quarantine must not be fired early or stalled by a wall-clock step (NTP, an
//! operator's `date`). Each heartbeat records the boot id and `CLOCK_BOOTTIME` (monotonic, and
//! counting suspend) as well as the wall clock, which is only for people. A worker restarted on
//! the same boot measures the time since the heartbeat with `CLOCK_BOOTTIME`; after a reboot (or
//! from a journal without these fields) that time is unknown, so it sits out the whole holder
//! grace from now, which is never too short.
//!
//! **Durability.** A write goes to a temporary file that is fsynced, renamed over the journal,
//! and the directory fsynced, so after a crash or power cut the journal is the old or the new
//! record, never a torn one. A journal that is torn anyway (a full disk, an older version, a
//! hand edit) is reported and treated as a lease that has just ended.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The longest journal file name part, so `lease-NAME.json.tmp` fits a 255-byte file name.
const MAX_ESCAPED_NAME: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub tenum: String,
    pub callback: String,
    pub job_identifier: String,
    /// Milliseconds since the epoch when the lease began (for people).
    pub started_ms: u64,
    /// Wall-clock milliseconds since the epoch of the last heartbeat (for people).
    pub heartbeat_ms: u64,
    /// The boot the last heartbeat was written in (`/proc/sys/kernel/random/boot_id`).
    #[serde(default)]
    pub boot_id: String,
    /// `CLOCK_BOOTTIME` in milliseconds at the last heartbeat.
    #[serde(default)]
    pub heartbeat_boottime_ms: u64,
    /// The lease's resume secret (hex), when its client can resume it; only ever in this
    /// 0600 file, never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_key: Option<String>,
    /// A resumable lease's holder may run this much longer than the holder grace after the
    /// worker lost sight of it (it waits its own resume grace before killing COMMAND), so a
    /// restarted worker quarantines the TE for the holder grace plus this.
    #[serde(default)]
    pub resume_grace_ms: u64,
}

impl LeaseRecord {
    pub fn new(tenum: &str, callback: &str, job_identifier: &str) -> LeaseRecord {
        let now = BootClock::now();
        LeaseRecord {
            tenum: tenum.to_string(),
            callback: callback.to_string(),
            job_identifier: job_identifier.to_string(),
            started_ms: now_ms(),
            heartbeat_ms: now_ms(),
            boot_id: now.boot_id,
            heartbeat_boottime_ms: now.boottime_ms,
            resume_key: None,
            resume_grace_ms: 0,
        }
    }

    /// Marks the lease resumable: see [`LeaseRecord::resume_grace_ms`].
    pub fn resumable(mut self, key: &testenv_proto::resume::LeaseKey, grace: Duration) -> Self {
        self.resume_key = Some(key.secret_hex());
        self.resume_grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        self
    }
}

/// What a previous run left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreviousLease {
    Open(LeaseRecord),
    /// The journal exists but is not a lease record; `error` says why.
    Unreadable {
        error: String,
    },
}

/// A point on the monotonic clock that survives process restarts (not reboots).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootClock {
    pub boot_id: String,
    pub boottime_ms: u64,
}

impl BootClock {
    pub fn now() -> BootClock {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec to the pointer it is given.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        let boottime_ms = if rc == 0 {
            (ts.tv_sec as u64)
                .saturating_mul(1000)
                .saturating_add(ts.tv_nsec as u64 / 1_000_000)
        } else {
            0
        };
        BootClock {
            boot_id,
            boottime_ms,
        }
    }
}

/// The lease journal of one TE, locked for the life of this value.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    dir: PathBuf,
    _lock: File,
}

/// Why a journal cannot be opened.
#[derive(Debug)]
pub enum OpenError {
    /// Another process (a second worker for the same TE) holds the lock.
    Busy {
        lock: PathBuf,
    },
    Io(std::io::Error),
    BadName(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Busy { lock } => write!(
                f,
                "another testenv-worker already serves this TE (it holds {})",
                lock.display()
            ),
            OpenError::Io(e) => write!(f, "{e}"),
            OpenError::BadName(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for OpenError {}

impl From<std::io::Error> for OpenError {
    fn from(e: std::io::Error) -> Self {
        OpenError::Io(e)
    }
}

/// Milliseconds since the epoch: whole numbers survive the JSON round trip exactly.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The file-name part for TE `tenum`; injective (see the module docs).
pub fn escape_name(tenum: &str) -> String {
    let mut out = String::with_capacity(tenum.len());
    for b in tenum.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    out
}

impl Journal {
    /// Opens (and locks) the journal of TE `tenum` in `dir`, created if missing. A journal of
    /// this TE written by an older version (whose file names were not injective) is taken over.
    pub fn open(dir: &Path, tenum: &str) -> Result<Journal, OpenError> {
        if tenum.is_empty() {
            return Err(OpenError::BadName("the TE name is empty".into()));
        }
        let name = escape_name(tenum);
        if name.len() > MAX_ESCAPED_NAME {
            return Err(OpenError::BadName(format!(
                "the TE name {tenum:?} is too long for a journal file name ({} bytes escaped, \
                 at most {MAX_ESCAPED_NAME}); give a shorter -n",
                name.len()
            )));
        }
        std::fs::create_dir_all(dir)?;
        let lock_path = dir.join(format!("lease-{name}.lock"));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)?;
        // SAFETY: flock on a descriptor we own; the lock goes with the descriptor.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.kind() == std::io::ErrorKind::WouldBlock {
                OpenError::Busy { lock: lock_path }
            } else {
                OpenError::Io(e)
            });
        }
        let journal = Journal {
            path: dir.join(format!("lease-{name}.json")),
            dir: dir.to_path_buf(),
            _lock: lock,
        };
        journal.adopt_legacy(tenum);
        Ok(journal)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Versions before the injective names wrote `lease-<name with '_' for other bytes>.json`.
    /// Such a file is this TE's only if the record inside names it.
    fn adopt_legacy(&self, tenum: &str) {
        let lossy: String = tenum
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let legacy = self.dir.join(format!("lease-{lossy}.json"));
        if legacy == self.path || self.path.exists() {
            return;
        }
        let Ok(text) = std::fs::read_to_string(&legacy) else {
            return;
        };
        match serde_json::from_str::<LeaseRecord>(&text) {
            Ok(r) if r.tenum == tenum => {
                tracing::info!(from = %legacy.display(), to = %self.path.display(), "taking over the lease journal of an older version");
                if let Err(e) = std::fs::rename(&legacy, &self.path) {
                    tracing::error!(error = %e, "cannot move the old lease journal");
                }
            }
            _ => {}
        }
    }

    /// The lease a previous run left open, if any.
    pub fn previous(&self) -> Option<PreviousLease> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                return Some(PreviousLease::Unreadable {
                    error: e.to_string(),
                })
            }
        };
        Some(match serde_json::from_slice::<LeaseRecord>(&bytes) {
            Ok(r) => PreviousLease::Open(r),
            Err(e) => PreviousLease::Unreadable {
                error: format!("{e} ({} bytes)", bytes.len()),
            },
        })
    }

    /// Records a lease (or refreshes its heartbeat) durably: see the module docs.
    pub fn write(&self, record: &LeaseRecord) -> std::io::Result<()> {
        let tmp = self.tmp_path();
        let body = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        // 0600 from the start: the record may hold a lease's resume secret.
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(&body)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, &self.path)?;
        self.sync_dir()
    }

    pub fn heartbeat(&self, record: &mut LeaseRecord) -> std::io::Result<()> {
        let now = BootClock::now();
        record.heartbeat_ms = now_ms();
        record.boot_id = now.boot_id;
        record.heartbeat_boottime_ms = now.boottime_ms;
        self.write(record)
    }

    pub fn clear(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            Err(_) => Ok(()),
            Ok(()) => self.sync_dir(),
        }
    }

    /// Whether a journal write would succeed now (after a write error, before offering again):
    /// writes and removes the temporary file a real write goes through.
    pub fn writable(&self) -> std::io::Result<()> {
        let tmp = self.tmp_path();
        let mut f = File::create(&tmp)?;
        f.write_all(b"{}")?;
        f.sync_all()?;
        std::fs::remove_file(&tmp)
    }

    fn tmp_path(&self) -> PathBuf {
        self.path.with_extension("json.tmp")
    }

    fn sync_dir(&self) -> std::io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    /// How long to wait, from `now`, before the TE of an unfinished lease may be offered again.
    /// Pure: see the module docs for the clock rule.
    pub fn quarantine_left(
        previous: &PreviousLease,
        holder_grace: Duration,
        now: &BootClock,
    ) -> Duration {
        let PreviousLease::Open(record) = previous else {
            return holder_grace;
        };
        let holder_grace =
            holder_grace.saturating_add(Duration::from_millis(record.resume_grace_ms));
        let same_boot = !record.boot_id.is_empty()
            && record.boot_id == now.boot_id
            && record.heartbeat_boottime_ms > 0
            && record.heartbeat_boottime_ms <= now.boottime_ms;
        if !same_boot {
            return holder_grace;
        }
        let since = Duration::from_millis(now.boottime_ms - record.heartbeat_boottime_ms);
        holder_grace.saturating_sub(since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> LeaseRecord {
        LeaseRecord::new("te/1", "callback_x", "1: x")
    }

    #[test]
    fn write_read_clear() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), "te/1").unwrap();
        assert!(j.previous().is_none());
        let mut r = record();
        j.heartbeat(&mut r).unwrap();
        let prev = j.previous().unwrap();
        assert_eq!(prev, PreviousLease::Open(r.clone()));
        let left = Journal::quarantine_left(&prev, Duration::from_secs(10), &BootClock::now());
        assert!(left > Duration::from_secs(8) && left <= Duration::from_secs(10));
        j.writable().unwrap();
        j.clear().unwrap();
        assert!(j.previous().is_none());
        j.clear().unwrap();
    }

    #[test]
    fn names_map_to_distinct_files() {
        let dir = tempfile::tempdir().unwrap();
        let names = ["te.1", "te/1", "te_1", "te 1", "te_2e1", "té1"];
        let journals: Vec<Journal> = names
            .iter()
            .map(|n| Journal::open(dir.path(), n).unwrap())
            .collect();
        let mut paths: Vec<&Path> = journals.iter().map(Journal::path).collect();
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), names.len(), "{paths:?}");
        assert_eq!(escape_name("te-1_a.b"), "te-1_5fa_2eb");
        assert!(Journal::open(dir.path(), "").is_err());
        assert!(Journal::open(dir.path(), &"x/".repeat(100)).is_err());
    }

    #[test]
    fn a_second_open_of_one_te_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = Journal::open(dir.path(), "te1").unwrap();
        let err = Journal::open(dir.path(), "te1").unwrap_err();
        assert!(matches!(err, OpenError::Busy { .. }), "{err}");
        assert!(err.to_string().contains("another testenv-worker"));
        drop(first);
        Journal::open(dir.path(), "te1").unwrap();
    }

    #[test]
    fn quarantine_ignores_wall_clock_steps_and_is_whole_after_a_reboot() {
        let grace = Duration::from_secs(10);
        let now = BootClock {
            boot_id: "boot-a".into(),
            boottime_ms: 1_000_000,
        };
        let mut r = record();
        r.boot_id = "boot-a".into();
        r.heartbeat_boottime_ms = 996_000;
        for wall in [0, now_ms() + 3_600_000, now_ms() - 3_600_000] {
            r.heartbeat_ms = wall;
            let left = Journal::quarantine_left(&PreviousLease::Open(r.clone()), grace, &now);
            assert_eq!(left, Duration::from_secs(6), "wall clock {wall}");
        }
        let mut other_boot = r.clone();
        other_boot.boot_id = "boot-b".into();
        let legacy = LeaseRecord {
            boot_id: String::new(),
            heartbeat_boottime_ms: 0,
            ..r.clone()
        };
        for prev in [
            PreviousLease::Open(other_boot),
            PreviousLease::Open(legacy),
            PreviousLease::Unreadable { error: "x".into() },
        ] {
            assert_eq!(Journal::quarantine_left(&prev, grace, &now), grace);
        }
    }

    #[test]
    fn torn_and_legacy_journals() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), "te.1").unwrap();
        for torn in [&b""[..], b"{\"tenum\": \"te", b"\xff\xfe garbage"] {
            std::fs::write(j.path(), torn).unwrap();
            assert!(matches!(
                j.previous(),
                Some(PreviousLease::Unreadable { .. })
            ));
        }
        j.clear().unwrap();
        drop(j);
        // An older version's journal of "te.1" (lease-te_1.json) is taken over; one of "te_1"
        // under the same old name is not.
        let mut r = record();
        r.tenum = "te.1".into();
        let old = serde_json::json!({"tenum": "te.1", "callback": "callback_x",
            "job_identifier": "1: x", "started_ms": 1, "heartbeat_ms": 2});
        std::fs::write(dir.path().join("lease-te_1.json"), old.to_string()).unwrap();
        let other = Journal::open(dir.path(), "te_1").unwrap();
        assert!(other.previous().is_none());
        let j = Journal::open(dir.path(), "te.1").unwrap();
        let Some(PreviousLease::Open(found)) = j.previous() else {
            panic!("legacy journal not taken over");
        };
        assert_eq!(
            (found.callback.as_str(), found.boot_id.as_str()),
            ("callback_x", "")
        );
    }

    #[test]
    fn a_resumable_lease_is_quarantined_for_its_resume_grace_too_in_a_0600_file() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), "te1").unwrap();
        let key = testenv_proto::resume::LeaseKey::from_bytes([9; 16]);
        let mut r = record().resumable(&key, Duration::from_secs(120));
        j.heartbeat(&mut r).unwrap();
        let mode = std::fs::metadata(j.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let prev = j.previous().unwrap();
        let PreviousLease::Open(found) = &prev else {
            panic!("{prev:?}")
        };
        assert_eq!(found.resume_key.as_deref(), Some(key.secret_hex().as_str()));
        let left = Journal::quarantine_left(&prev, Duration::from_secs(15), &BootClock::now());
        assert!(
            left > Duration::from_secs(130) && left <= Duration::from_secs(135),
            "{left:?}"
        );
    }
}
