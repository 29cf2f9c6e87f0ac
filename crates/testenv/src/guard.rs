//! The guard: a small process between testenv-client and COMMAND that makes sure COMMAND, and
//! everything it started, never outlives the client's hold on the test environment.
//!
//! The client forks the guard first thing, before it starts any thread ([`Guard::fork`]; a fork
//! copies only the calling thread, so later would be unsafe), and tells it to run COMMAND once
//! it holds a TE ([`Guard::start`]). The guard
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
//! - exits with COMMAND's status (128+signal if COMMAND was killed by a signal); the client
//!   learns it from `waitpid` once the guard's end of their socket closes.
//!
//! A guard never told to start (the client got no TE) exits as soon as the client's end of the
//! socket closes.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::procs;

/// The guard, forked and waiting for [`Guard::start`].
#[derive(Debug)]
pub struct Guard {
    pid: libc::pid_t,
    control: UnixStream,
}

impl Guard {
    /// Forks the guard for `command`, with `grace` between passing a signal on and SIGKILL.
    ///
    /// Call it before any thread exists (before the tokio runtime is built): the child runs on
    /// a copy of this single-threaded process.
    pub fn fork(command: Vec<OsString>, grace: Duration) -> std::io::Result<Guard> {
        let threads = std::fs::read_dir("/proc/self/task").map_or(1, |d| d.count());
        if threads > 1 {
            return Err(std::io::Error::other(
                "the guard must be forked before any thread is started",
            ));
        }
        let (client_end, guard_end) = UnixStream::pair()?;
        // Buffered output would be written twice, once by each process.
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // SAFETY: getpid has no preconditions.
        let client = unsafe { libc::getpid() };
        // SAFETY: the caller guarantees no other thread exists, so the child's copy of the
        // process is consistent; the child never returns from this function.
        match unsafe { libc::fork() } {
            -1 => Err(std::io::Error::last_os_error()),
            0 => {
                drop(client_end);
                let code = guard_main(guard_end, client, command, grace);
                // SAFETY: _exit skips atexit handlers and buffers inherited from the client.
                unsafe { libc::_exit(code) }
            }
            pid => Ok(Guard {
                pid,
                control: client_end,
            }),
        }
    }

    /// Tells the guard to run COMMAND with `TE_DATAFILE=datafile`.
    pub fn start(mut self, datafile: &Path) -> std::io::Result<RunningGuard> {
        let path = datafile.as_os_str().to_owned().into_vec();
        let len = u32::try_from(path.len())
            .map_err(|_| std::io::Error::other("datafile path too long"))?;
        let mut message = len.to_be_bytes().to_vec();
        message.extend_from_slice(&path);
        self.control.write_all(&message)?;
        self.control.set_nonblocking(true)?;
        Ok(RunningGuard {
            pid: self.pid,
            control: tokio::net::UnixStream::from_std(self.control)?,
            code: None,
        })
    }
}

/// The guard running COMMAND.
#[derive(Debug)]
pub struct RunningGuard {
    pid: libc::pid_t,
    control: tokio::net::UnixStream,
    code: Option<i32>,
}

impl RunningGuard {
    /// Sends `sig` to the guard, which passes it on to COMMAND.
    pub fn signal(&self, sig: libc::c_int) {
        if self.code.is_none() {
            procs::signal(self.pid, sig);
        }
    }

    /// Waits for the guard to exit; its exit status (COMMAND's). Cancel-safe.
    pub async fn wait(&mut self) -> i32 {
        if let Some(code) = self.code {
            return code;
        }
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        // The guard never writes: the socket only closes when it exits.
        while matches!(self.control.read(&mut buf).await, Ok(n) if n > 0) {}
        let mut raw = 0;
        // SAFETY: waitpid on our own child; it is exiting (its socket is closed), so this
        // returns at once.
        let code = loop {
            let r = unsafe { libc::waitpid(self.pid, &mut raw, 0) };
            if r == self.pid {
                break exit_code(std::process::ExitStatus::from_raw(raw));
            }
            if r == -1 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
            {
                break 1;
            }
        };
        self.code = Some(code);
        code
    }
}

/// A process's exit status as a shell reports it: the code, or 128+signal.
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Reads the datafile path the client sends once it holds a TE; `None` if it never does.
fn wait_for_start(control: &mut UnixStream) -> Option<PathBuf> {
    let mut len = [0u8; 4];
    control.read_exact(&mut len).ok()?;
    let mut path = vec![0u8; u32::from_be_bytes(len) as usize];
    control.read_exact(&mut path).ok()?;
    Some(PathBuf::from(OsString::from_vec(path)))
}

fn guard_main(
    mut control: UnixStream,
    client: libc::pid_t,
    argv: Vec<OsString>,
    grace: Duration,
) -> i32 {
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
    if unsafe { libc::getppid() } != client {
        // The client died before PDEATHSIG was armed.
        return 128 + libc::SIGTERM;
    }
    let wanted = signal_set(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD]);
    // SAFETY: blocking signals in this single-threaded process so sigtimedwait can take them;
    // until COMMAND runs they stay pending, and the client's death shows as the socket closing.
    unsafe {
        libc::sigprocmask(libc::SIG_BLOCK, &wanted, std::ptr::null_mut());
    }
    let Some(datafile) = wait_for_start(&mut control) else {
        return 0;
    };
    if unsafe { libc::getppid() } != client {
        return 128 + libc::SIGTERM;
    }
    supervise(argv, &datafile, grace, &wanted)
}

fn supervise(
    argv: Vec<OsString>,
    datafile: &Path,
    grace: Duration,
    wanted: &libc::sigset_t,
) -> i32 {
    let parent = unsafe { libc::getppid() };
    let Some(program) = argv.first() else {
        eprintln!("testenv-client: no command given");
        return 2;
    };
    let child_pid = match spawn_command(&argv, datafile) {
        Ok(pid) => pid,
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
            *status = Some(exit_code(std::process::ExitStatus::from_raw(raw)));
        }
    };
    loop {
        let sig = wait_signal(wanted, Duration::from_millis(500));
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
                    wait_signal(wanted, Duration::from_millis(50));
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

/// Starts COMMAND with `TE_DATAFILE` set, through posix_spawnp: unlike a fork it does not
/// copy our page tables, and unlike std's Command it can clear the signal mask (ours blocks
/// the signals we wait for) and reset SIGPIPE, which Rust programs ignore, to its default.
fn spawn_command(argv: &[OsString], datafile: &Path) -> std::io::Result<libc::pid_t> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c_string = |bytes: Vec<u8>| {
        CString::new(bytes).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a NUL byte in the command",
            )
        })
    };
    let args = argv
        .iter()
        .map(|a| c_string(a.as_bytes().to_vec()))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut env = Vec::new();
    for (key, value) in std::env::vars_os() {
        if key != "TE_DATAFILE" {
            env.push(c_string([key.as_bytes(), b"=", value.as_bytes()].concat())?);
        }
    }
    env.push(c_string(
        [b"TE_DATAFILE=".as_slice(), datafile.as_os_str().as_bytes()].concat(),
    )?);
    let pointers = |strings: &[CString]| {
        let mut p: Vec<*mut libc::c_char> = strings.iter().map(|s| s.as_ptr() as *mut _).collect();
        p.push(std::ptr::null_mut());
        p
    };
    let (argp, envp) = (pointers(&args), pointers(&env));
    let empty = signal_set(&[]);
    let pipe = signal_set(&[libc::SIGPIPE]);
    let mut pid = 0;
    // SAFETY: attr is initialised before use and destroyed after; every pointer handed to
    // posix_spawnp points into `args`, `env`, `argp` and `envp`, which outlive the call.
    let r = unsafe {
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        libc::posix_spawnattr_init(&mut attr);
        libc::posix_spawnattr_setsigmask(&mut attr, &empty);
        libc::posix_spawnattr_setsigdefault(&mut attr, &pipe);
        libc::posix_spawnattr_setflags(
            &mut attr,
            (libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF) as libc::c_short,
        );
        let r = libc::posix_spawnp(
            &mut pid,
            args[0].as_ptr(),
            std::ptr::null(),
            &attr,
            argp.as_ptr(),
            envp.as_ptr(),
        );
        libc::posix_spawnattr_destroy(&mut attr);
        r
    };
    match r {
        0 => Ok(pid),
        errno => Err(std::io::Error::from_raw_os_error(errno)),
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
