//! Running a TE's hooks: `sh -c HOOK` with TE_NAME, TE_NUM, TE_DATAFILE and TE_LABELS set, in a
//! process group of its own that is killed whole when the hook outlives its timeout.

use std::process::Stdio;
use std::time::Duration;

use crate::config::TeConfig;

/// A hook's failure, for the log and the TE's `detail`: names the TE and the hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookError(pub String);

impl std::fmt::Display for HookError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Kills the hook's process group when dropped unless disarmed, so a hook that hangs (or an
/// agent stopping meanwhile) leaves nothing behind.
struct GroupGuard(Option<i32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // SAFETY: plain syscall on the group our unreaped child leads.
            unsafe { libc::killpg(pgid, libc::SIGKILL) };
        }
    }
}

/// Runs hook `which` of `te` (None: the TE has no such hook, which passes).
pub async fn run(te: &TeConfig, which: &str, cmd: Option<&str>) -> Result<(), HookError> {
    let Some(cmd) = cmd else { return Ok(()) };
    let fail = |what: String| HookError(format!("TE {}: hook {which}: {what}", te.name));
    let child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .env("TE_NAME", &te.name)
        .env("TE_NUM", te.num.to_string())
        .env("TE_DATAFILE", &te.datafile)
        .env("TE_LABELS", te.labels.join(","))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let child = child.map_err(|e| fail(format!("cannot run /bin/sh: {e}")))?;
    let mut group = GroupGuard(child.id().and_then(|p| i32::try_from(p).ok()));
    let limit = te.hooks.timeout;
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(Ok(out)) => {
            group.0 = None;
            if out.status.success() {
                return Ok(());
            }
            let mut text = out.stdout;
            text.extend_from_slice(&out.stderr);
            // sh says "not found" (127) or "Permission denied" (126) for a missing or
            // non-executable hook; the last output line carries it.
            let last = String::from_utf8_lossy(&text)
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.chars().take(200).collect::<String>())
                .unwrap_or_default();
            let why = match out.status.code() {
                Some(127) => "not found (exit 127)".to_string(),
                Some(126) => "not executable (exit 126)".to_string(),
                _ => format!("failed ({})", out.status),
            };
            Err(fail(if last.is_empty() {
                why
            } else {
                format!("{why}: {last}")
            }))
        }
        Ok(Err(e)) => Err(fail(format!("cannot wait for it: {e}"))),
        Err(_) => {
            drop(group);
            Err(fail(format!(
                "hung past its timeout of {}; killed",
                humanize(limit)
            )))
        }
    }
}

pub fn humanize(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else {
        format!("{}s", d.as_secs())
    }
}
