//! What a lease runs outside the worker: reading the datafile, the create and destroy scripts,
//! and the client-alive check (with its time limit and process-group cleanup).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use testenv_proto::{TeData, ValidLockRequest};

use crate::tedata;

/// What a lease hands the holder: TE data, or the notice that there is none.
#[derive(Debug)]
pub(crate) enum Environment {
    Ready(TeData),
    /// `Couldn't retrieve env: ...`, sent to the client in place of TE data.
    Unavailable(String),
}

impl Environment {
    pub(crate) fn unavailable(why: impl std::fmt::Display) -> Environment {
        Environment::Unavailable(tedata::failure_notice(why))
    }

    fn from_text(text: String, what: impl std::fmt::Display) -> Environment {
        match TeData::parse(text) {
            Ok(te) => Environment::Ready(te),
            Err(e) => Environment::unavailable(format_args!("{what}: {e}")),
        }
    }

    pub(crate) fn into_callback_data(self) -> String {
        match self {
            Environment::Ready(te) => te.into_text(),
            Environment::Unavailable(notice) => notice,
        }
    }
}

/// The static form: the datafile is read for every lease, so edits take effect.
pub(crate) fn read_datafile(path: &Path) -> Environment {
    match std::fs::read_to_string(path) {
        Err(e) => Environment::unavailable(format_args!("cannot read {}: {e}", path.display())),
        Ok(text) => Environment::from_text(text, path.display()),
    }
}

/// The script form: `CREATE_SCRIPT TENUM ENVSIZE UCINSTANCE CREATE_UNDERCLOUD SSH_KEY NET_ISO
/// COMPUTE_ENVSIZE EXTRA_NODES` writes the TE's JSON to `$TE_DATAFILE`.
pub(crate) async fn run_create(script: &Path, tenum: &str, req: &ValidLockRequest) -> Environment {
    let count = |n: Option<u32>, default: u32| n.unwrap_or(default).to_string();
    let or = |v: &str, d: &str| {
        if v.is_empty() {
            d.to_string()
        } else {
            v.to_string()
        }
    };
    let datafile = match tempfile::Builder::new().prefix("te-create-").tempfile() {
        Ok(f) => f,
        Err(e) => return Environment::unavailable(format_args!("cannot create a temp file: {e}")),
    };
    let output = tokio::process::Command::new(script)
        .args([
            tenum.to_string(),
            count(req.envsize, 2),
            req.ucinstance.clone(),
            if req.create_undercloud {
                "true".into()
            } else {
                String::new()
            },
            req.ssh_key.clone(),
            or(&req.net_iso, "multi-nic"),
            count(req.compute_envsize, 0),
            count(req.extra_nodes, 0),
        ])
        .env("TE_DATAFILE", datafile.path())
        .stdin(Stdio::null())
        .output()
        .await;
    let output = match output {
        Ok(o) => o,
        Err(e) => {
            return Environment::unavailable(format_args!("cannot run {}: {e}", script.display()))
        }
    };
    let mut combined = output.stdout.clone();
    combined.extend_from_slice(&output.stderr);
    if !output.status.success() {
        return Environment::unavailable(format_args!(
            "{} failed ({}): {}",
            script.display(),
            output.status,
            tedata::tail(&combined, 2000)
        ));
    }
    match std::fs::read_to_string(datafile.path()) {
        Ok(text) => Environment::from_text(text, format_args!("{} wrote", script.display())),
        Err(e) => Environment::unavailable(format_args!("cannot read back the TE data: {e}")),
    }
}

pub async fn run_destroy(script: &Path, tenum: &str) {
    let result = tokio::process::Command::new(script)
        .arg(tenum)
        .stdin(Stdio::null())
        .output()
        .await;
    match result {
        Ok(o) if o.status.success() => tracing::info!(tenum, "destroy script done"),
        Ok(o) => {
            let mut combined = o.stdout;
            combined.extend_from_slice(&o.stderr);
            tracing::error!(tenum, status = %o.status, output = tedata::tail(&combined, 500), "destroy script failed");
        }
        Err(e) => tracing::error!(tenum, error = %e, "cannot run the destroy script"),
    }
}

/// SIGKILLs a process group when dropped, unless disarmed: a check still running when the
/// lease ends (or that timed out) leaves nothing behind.
struct KillGroupOnDrop(Option<i32>);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // SAFETY: plain syscall. The group leader is our unreaped child, so the id cannot
            // have been reused.
            unsafe { libc::killpg(pgid, libc::SIGKILL) };
        }
    }
}

/// Runs the client-alive check for at most `limit`; false if it failed or timed out.
pub(crate) async fn client_alive(
    cmd: String,
    tenum: String,
    req: ValidLockRequest,
    limit: Duration,
) -> bool {
    let child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(&cmd)
        .env("TE_UCINSTANCE", &req.ucinstance)
        .env("TE_JOB_IDENTIFIER", &req.job_identifier)
        .env("TE_CALLBACK", &req.callback_name)
        .env("TE_TENUM", &tenum)
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(tenum, error = %e, "cannot run the client-alive check; assuming alive");
            return true;
        }
    };
    let mut group = KillGroupOnDrop(child.id().and_then(|p| i32::try_from(p).ok()));
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(s)) if s.success() => {
            group.0 = None;
            true
        }
        Ok(Ok(s)) => {
            group.0 = None;
            tracing::warn!(tenum, holder = req.callback_name, %s, "client-alive check failed; freeing the TE");
            false
        }
        Ok(Err(e)) => {
            tracing::warn!(tenum, error = %e, "cannot wait for the client-alive check; assuming alive");
            true
        }
        Err(_) => {
            tracing::warn!(
                tenum,
                holder = req.callback_name,
                seconds = limit.as_secs_f64(),
                "client-alive check timed out (killed); counting it as failed and freeing the TE"
            );
            drop(group);
            let _ = child.wait().await;
            false
        }
    }
}

/// The client-alive check of one lease, run every `interval` while the lease lasts. A running
/// check lives here, so [`AliveWatch::failed`] can be raised against other events (and
/// cancelled) without losing it: a hung check holds up nothing else.
pub(crate) struct AliveWatch {
    check: Option<(String, ValidLockRequest)>,
    tenum: String,
    timeout: Duration,
    ticks: tokio::time::Interval,
    running: Option<std::pin::Pin<Box<dyn std::future::Future<Output = bool>>>>,
}

impl AliveWatch {
    /// No check when `cmd` or `request` is missing (no command configured, no environment).
    pub(crate) fn new(
        cmd: Option<&str>,
        request: Option<&ValidLockRequest>,
        tenum: &str,
        interval: Duration,
        timeout: Duration,
    ) -> AliveWatch {
        let period = interval.max(Duration::from_millis(100));
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        AliveWatch {
            check: cmd.zip(request).map(|(c, r)| (c.to_string(), r.clone())),
            tenum: tenum.to_string(),
            timeout,
            ticks,
            running: None,
        }
    }

    /// Resolves when a check fails (never without a check). Cancel-safe.
    pub(crate) async fn failed(&mut self) {
        let Some((cmd, request)) = &self.check else {
            return std::future::pending().await;
        };
        loop {
            if self.running.is_none() {
                self.ticks.tick().await;
                self.running = Some(Box::pin(client_alive(
                    cmd.clone(),
                    self.tenum.clone(),
                    request.clone(),
                    self.timeout,
                )));
            }
            let passed = self.running.as_mut().expect("set above").await;
            self.running = None;
            if !passed {
                return;
            }
        }
    }
}
