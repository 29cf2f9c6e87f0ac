//! Finding and killing every process a command started, including those that left its process
//! group, from a child subreaper.
//!
//! Orphans are re-parented to the nearest subreaper, so every live descendant of the subreaper
//! has a live chain of parents up to it. Hence the cheap first question: does the subreaper have
//! any child at all (`waitid` with WNOWAIT)? Only then are the descendants listed, from each
//! process's `/proc/PID/task/*/children` where the kernel has them (CONFIG_PROC_CHILDREN), else
//! by reading the parent of every process in `/proc/*/stat`.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Whether the calling process has any child, live or zombie (none is reaped).
pub fn has_children() -> bool {
    // SAFETY: siginfo_t is plain data; waitid only writes into it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: plain waitid(2); WNOWAIT leaves any zombie to be reaped by its owner.
    let r = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    r == 0
}

/// All live descendants of `root` (not `root` itself). Zombies run no code and are left out.
pub fn descendants(root: libc::pid_t) -> Vec<libc::pid_t> {
    let mut out = Vec::new();
    if kernel_lists_children() {
        let mut seen = HashSet::new();
        let mut stack = vec![root];
        while let Some(p) = stack.pop() {
            for c in children_of(p) {
                if seen.insert(c) {
                    stack.push(c);
                    if is_live(c) {
                        out.push(c);
                    }
                }
            }
        }
        return out;
    }
    let mut children: HashMap<libc::pid_t, Vec<libc::pid_t>> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Some((state, ppid)) = stat_of(pid) {
            if state != 'Z' && state != 'X' {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
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

/// Whether `/proc/PID/task/TID/children` exists on this kernel (checked once, on ourselves).
fn kernel_lists_children() -> bool {
    static LISTS: OnceLock<bool> = OnceLock::new();
    *LISTS.get_or_init(|| {
        let me = std::process::id();
        std::path::Path::new(&format!("/proc/{me}/task/{me}/children")).exists()
    })
}

/// The children of every thread of `pid` (empty if it is gone).
fn children_of(pid: libc::pid_t) -> Vec<libc::pid_t> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                list.split_ascii_whitespace()
                    .filter_map(|p| p.parse::<libc::pid_t>().ok()),
            );
        }
    }
    out
}

fn is_live(pid: libc::pid_t) -> bool {
    stat_of(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// State and parent pid from `/proc/PID/stat`; the command name may hold spaces and
/// parentheses, so parse after the last `)`.
fn stat_of(pid: libc::pid_t) -> Option<(char, libc::pid_t)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    Some((state, fields.next()?.parse().ok()?))
}

pub fn signal(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill(2) with a positive pid has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Sends `first` to every descendant of `root` (the calling process, a subreaper), waits up to
/// `grace` for them to go, then SIGKILLs whatever is left (repeatedly, since dying processes
/// may still fork). `reap` collects exited children, so that they stop counting.
pub fn terminate_tree(
    root: libc::pid_t,
    first: libc::c_int,
    grace: Duration,
    mut reap: impl FnMut(),
) {
    reap();
    if !has_children() {
        return;
    }
    for pid in descendants(root) {
        signal(pid, first);
    }
    let deadline = Instant::now().checked_add(grace);
    while deadline.is_some_and(|d| Instant::now() < d) {
        reap();
        if !has_children() || descendants(root).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..50 {
        reap();
        if !has_children() {
            return;
        }
        let left = descendants(root);
        if left.is_empty() {
            return;
        }
        for pid in left {
            signal(pid, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
