//! Finding and killing every process a command started, including those that left its process
//! group, by walking `/proc` parent links from a subreaper.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// All live descendants of `root` (not `root` itself), found through `/proc/*/stat`.
pub fn descendants(root: libc::pid_t) -> Vec<libc::pid_t> {
    let mut children: HashMap<libc::pid_t, Vec<libc::pid_t>> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Some(ppid) = parent_of(pid) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            if seen.insert(c) {
                out.push(c);
                stack.push(c);
            }
        }
    }
    out
}

/// The parent pid from `/proc/PID/stat`; the command name may hold spaces and parentheses, so
/// parse after the last `)`.
fn parent_of(pid: libc::pid_t) -> Option<libc::pid_t> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.next()?.parse().ok()
}

pub fn signal(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill(2) with a positive pid has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Sends `first` to every descendant of `root`, waits up to `grace` for them to go, then
/// SIGKILLs whatever is left (repeatedly, since dying processes may still fork).
pub fn terminate_tree(
    root: libc::pid_t,
    first: libc::c_int,
    grace: Duration,
    mut reap: impl FnMut(),
) {
    for pid in descendants(root) {
        signal(pid, first);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        reap();
        if descendants(root).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..50 {
        let left = descendants(root);
        if left.is_empty() {
            return;
        }
        for pid in left {
            signal(pid, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
        reap();
    }
}
