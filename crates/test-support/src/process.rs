//! Finding peer programs and owning child processes.

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};

/// Finds `name` on PATH, or else in /usr/sbin or /usr/local/sbin (where Debian puts gearmand,
/// and which a user's PATH may lack).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push("/usr/sbin".into());
    dirs.push("/usr/local/sbin".into());
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Like [`find_program`] but panics with the fix when the peer is missing: CI installs the
/// peers, so a missing one is a broken environment, not a reason to skip.
pub fn require_program(name: &str) -> PathBuf {
    find_program(name).unwrap_or_else(|| {
        panic!(
            "`{name}` is not installed (not on PATH nor in /usr/sbin); run \
             scripts/install-peers.sh (installs gearman-job-server, gearman-tools and PyPI gear)"
        )
    })
}

/// A child process whose output goes to a temp file; killed (SIGKILL) and reaped when dropped.
/// If the test panics while the process is still running, the log's tail is printed.
pub struct LoggedChild {
    name: String,
    child: Child,
    log: tempfile::NamedTempFile,
    status: Option<ExitStatus>,
}

impl LoggedChild {
    /// Spawns `cmd` with stdin from /dev/null and stdout and stderr into the log.
    pub fn spawn(name: &str, cmd: &mut Command) -> LoggedChild {
        let log = tempfile::NamedTempFile::new().expect("log file");
        cmd.stdout(Stdio::from(log.reopen().expect("reopen log")));
        LoggedChild::spawn_into(name, cmd, log)
    }

    /// Spawns `cmd` with stdin from /dev/null, stdout piped (see [`LoggedChild::take_stdout`])
    /// and stderr into the log.
    pub fn spawn_stdout_piped(name: &str, cmd: &mut Command) -> LoggedChild {
        let log = tempfile::NamedTempFile::new().expect("log file");
        cmd.stdout(Stdio::piped());
        LoggedChild::spawn_into(name, cmd, log)
    }

    fn spawn_into(name: &str, cmd: &mut Command, log: tempfile::NamedTempFile) -> LoggedChild {
        let child = cmd
            .stdin(Stdio::null())
            .stderr(Stdio::from(log.reopen().expect("reopen log")))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        LoggedChild {
            name: name.to_string(),
            child,
            log,
            status: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The piped stdout of [`LoggedChild::spawn_stdout_piped`], once.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    pub fn log_path(&self) -> &Path {
        self.log.path()
    }

    /// Everything the process wrote to its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read(self.log.path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The exit status, once the process has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// SIGKILL and reap (nothing is left running, not even a zombie).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        if let Ok(st) = self.child.wait() {
            self.status.get_or_insert(st);
        }
    }
}

impl Drop for LoggedChild {
    fn drop(&mut self) {
        let exited = self.try_status().is_some();
        self.kill();
        if std::thread::panicking() && !exited {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!(
                "--- {} log (last {} lines) ---\n{}",
                self.name,
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.0.try_wait().ok().flatten()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to completion (stdin from /dev/null, output captured) within `timeout`; kills it
/// and panics, with what it printed, if it overruns.
pub fn run_with_timeout(cmd: &mut Command, timeout: std::time::Duration) -> std::process::Output {
    use std::io::Read;
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = std::time::Instant::now() + timeout;
    let (status, killed) = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break (st, false);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            break (child.wait().expect("wait"), true);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let out = std::process::Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    };
    assert!(
        !killed,
        "{what} did not finish within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_with_timeout_kills_an_overrun() {
        let started = std::time::Instant::now();
        let r = std::panic::catch_unwind(|| {
            run_with_timeout(
                Command::new("sleep").arg("30"),
                std::time::Duration::from_millis(300),
            )
        });
        assert!(r.is_err(), "an overrun must fail");
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
        let out = run_with_timeout(
            Command::new("echo").arg("hi"),
            std::time::Duration::from_secs(10),
        );
        assert_eq!(out.stdout, b"hi\n");
    }
}
