//! The guard: a small process between testenv-client and COMMAND that makes sure COMMAND, and
//! everything it started, never outlives the client's hold on the test environment.
//!
//! The client runs itself again as the guard (see [`GUARD_ENV`]). The guard
//! - asks the kernel for SIGTERM when the client dies (PR_SET_PDEATHSIG), so `kill -9 CLIENT`
//!   still ends COMMAND;
//! - is a child subreaper (PR_SET_CHILD_SUBREAPER), so processes COMMAND started that detach
//!   (double fork, setsid, a new process group) are re-parented to it and can still be found;
//! - stays in the client's process group, so a CI system that kills the job's process group
//!   kills the guard, COMMAND and everything in that group at once;
//! - on SIGTERM/SIGINT/SIGHUP from the client passes the signal to COMMAND, waits a grace
//!   period, then SIGKILLs every descendant; when the client has died it SIGKILLs them at once
//!   (the TE is about to be leased again); when COMMAND exits by itself, it ends any descendants
//!   left behind;
//! - exits with COMMAND's status (128+signal if COMMAND was killed by a signal).

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;
use std::time::Duration;

use crate::procs;

/// Set in the environment of the re-executed client to make it act as the guard.
pub const GUARD_ENV: &str = "TESTENV_CLIENT_GUARD";
/// Grace, in milliseconds, between passing a signal on and SIGKILL.
pub const GRACE_ENV: &str = "TESTENV_CLIENT_GUARD_GRACE_MS";

/// Runs the guard with `argv` as COMMAND; never returns.
pub fn run(argv: Vec<OsString>) -> ! {
    let grace = std::env::var(GRACE_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(10));
    std::process::exit(supervise(argv, grace))
}

fn supervise(argv: Vec<OsString>, grace: Duration) -> i32 {
    let parent = unsafe { libc::getppid() };
    // SAFETY: prctl with these options takes plain integers.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGTERM as libc::c_ulong,
            0,
            0,
            0,
        );
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0);
    }
    if unsafe { libc::getppid() } != parent {
        // The client died before PDEATHSIG was armed.
        return 128 + libc::SIGTERM;
    }
    let wanted = signal_set(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD]);
    // SAFETY: blocking signals in this single-threaded process so sigtimedwait can take them.
    unsafe {
        libc::sigprocmask(libc::SIG_BLOCK, &wanted, std::ptr::null_mut());
    }
    let Some((program, args)) = argv.split_first() else {
        eprintln!("testenv-client: no command given");
        return 2;
    };
    let mut cmd = Command::new(program);
    cmd.args(args);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let empty = signal_set(&[]);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            Ok(())
        });
    }
    std::env::remove_var(GUARD_ENV);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "testenv-client: cannot run {}: {e}",
                program.to_string_lossy()
            );
            return if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
        }
    };
    let child_pid = child.id() as libc::pid_t;
    let me = unsafe { libc::getpid() };
    let mut status: Option<i32> = None;
    let reap = |status: &mut Option<i32>| loop {
        let mut raw = 0;
        // SAFETY: waitpid on any child, non-blocking.
        let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
        if pid <= 0 {
            break;
        }
        if pid == child_pid {
            let es = std::process::ExitStatus::from_raw(raw);
            *status = Some(es.code().unwrap_or_else(|| 128 + es.signal().unwrap_or(0)));
        }
    };
    loop {
        let sig = wait_signal(&wanted, Duration::from_millis(500));
        reap(&mut status);
        if let Some(code) = status {
            // COMMAND is done; whatever it left running must not keep using the TE.
            procs::terminate_tree(me, libc::SIGTERM, grace.min(Duration::from_secs(2)), || {
                reap(&mut None)
            });
            return code;
        }
        match sig {
            Some(s) if s == libc::SIGTERM || s == libc::SIGINT || s == libc::SIGHUP => {
                if unsafe { libc::getppid() } != parent {
                    // The client is dead (PDEATHSIG): the TE is about to be offered to someone
                    // else, so nothing COMMAND started may run a moment longer.
                    procs::terminate_tree(me, libc::SIGKILL, Duration::ZERO, || reap(&mut status));
                    return status.unwrap_or(128 + s);
                }
                procs::signal(child_pid, s);
                let deadline = std::time::Instant::now() + grace;
                while status.is_none() && std::time::Instant::now() < deadline {
                    wait_signal(&wanted, Duration::from_millis(50));
                    reap(&mut status);
                }
                procs::terminate_tree(me, libc::SIGTERM, Duration::from_millis(200), || {
                    reap(&mut status)
                });
                reap(&mut status);
                return status.unwrap_or(128 + s);
            }
            _ => {}
        }
    }
}

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> Option<libc::c_int> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: set and ts are valid for the call; info may be null.
    let s = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (s > 0).then_some(s)
}
