//! A network namespace with one broker in it, reached over a veth pair, so the runner can cut
//! the network between that broker and everybody else (and restore it).

use std::path::Path;
use std::process::{Command, Stdio};

/// The namespace and its link; removed on drop.
pub struct Netns {
    pub name: String,
    host_if: String,
    /// The address of the namespace's end of the link, where its broker listens.
    pub ns_ip: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A /30 of 10.254.0.0/16 no interface of this host uses yet.
fn free_subnet(tag: u32) -> Result<u8, String> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    let used = String::from_utf8_lossy(&out.stdout).into_owned();
    (0..250u32)
        .map(|i| u8::try_from((tag + i) % 250 + 1).unwrap_or(1))
        .find(|x| !used.contains(&format!("10.254.{x}.")))
        .ok_or_else(|| "no free 10.254.X.0/30".to_string())
}

/// Removes the namespaces (and links) of earlier runs whose runner is gone: a runner killed
/// with SIGKILL cannot clean up after itself.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix("chaos")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["link", "del", &format!("chv{pid}h")]);
            let _ = ip(&["netns", "del", name]);
        }
    }
}

impl Netns {
    /// Creates the namespace `chaos<tag>` and a veth pair into it, with 10.254.X.1/30 on this
    /// side and 10.254.X.2/30 inside. Fails (cleaning up what it made) where namespaces are
    /// not allowed.
    pub fn create(tag: u32) -> Result<Netns, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root".into());
        }
        remove_stale();
        let x = free_subnet(tag)?;
        let name = format!("chaos{tag}");
        ip(&["netns", "add", &name])?;
        let ns = Netns {
            name,
            host_if: format!("chv{tag}h"),
            ns_ip: format!("10.254.{x}.2"),
        };
        let ns_if = format!("chv{tag}n");
        let host_ip = format!("10.254.{x}.1/30");
        let ns_cidr = format!("{}/30", ns.ns_ip);
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &ns.name])?;
        ip(&["addr", "add", &host_ip, "dev", &ns.host_if])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        ip(&[
            "netns", "exec", &ns.name, "ip", "addr", "add", &ns_cidr, "dev", &ns_if,
        ])?;
        ip(&["netns", "exec", &ns.name, "ip", "link", "set", &ns_if, "up"])?;
        ip(&["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `program` run inside the namespace (`ip netns exec` execs it: the child's pid is the
    /// program's).
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    pub fn cut(&self) -> Result<(), String> {
        ip(&["link", "set", &self.host_if, "down"])
    }

    pub fn restore(&self) -> Result<(), String> {
        ip(&["link", "set", &self.host_if, "up"])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both.
        let _ = ip(&["link", "del", &self.host_if]);
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("testenv-chaos: {e}");
        }
    }
}
