//! Carving a host into TEs: N = min(mem / mem_per_env, cpus / cpu_per_env, disk /
//! disk_per_env), from the real host or from figures given in the config.

use std::path::Path;

use crate::config::CarveFile;

/// What the host has, in the units of the `[carve]` keys.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figures {
    pub mem_gb: f64,
    pub cpus: u32,
    pub disk_gb: f64,
}

pub trait HostFigures {
    fn read(&self, disk_path: &Path) -> anyhow::Result<Figures>;
}

impl HostFigures for Figures {
    fn read(&self, _: &Path) -> anyhow::Result<Figures> {
        Ok(*self)
    }
}

/// The real host: `MemTotal` of /proc/meminfo, the CPUs this process may run on, and the
/// size of the file system holding `disk_path` (statvfs).
pub struct HostReader;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

impl HostFigures for HostReader {
    fn read(&self, disk_path: &Path) -> anyhow::Result<Figures> {
        let meminfo = std::fs::read_to_string("/proc/meminfo")
            .map_err(|e| anyhow::anyhow!("carve: cannot read /proc/meminfo: {e}"))?;
        let kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("carve: no MemTotal in /proc/meminfo"))?;
        let cpus = std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .map_err(|e| anyhow::anyhow!("carve: cannot count the CPUs: {e}"))?;
        let c_path = std::ffi::CString::new(disk_path.as_os_str().as_encoded_bytes())
            .map_err(|_| anyhow::anyhow!("carve: disk_path contains a NUL byte"))?;
        // SAFETY: statvfs fills the struct it is given; the path is NUL-terminated.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } != 0 {
            anyhow::bail!(
                "carve: disk_path {}: {}",
                disk_path.display(),
                std::io::Error::last_os_error()
            );
        }
        let disk = st.f_blocks as f64 * st.f_frsize as f64;
        Ok(Figures {
            mem_gb: kib * 1024.0 / GIB,
            cpus,
            disk_gb: disk / GIB,
        })
    }
}

/// How many TEs the host holds. Figures given in the config replace the host's.
pub fn count(carve: &CarveFile, host: &dyn HostFigures) -> anyhow::Result<u32> {
    anyhow::ensure!(
        carve.mem_per_env_gb > 0.0 && carve.cpu_per_env > 0 && carve.disk_per_env_gb > 0.0,
        "carve: mem_per_env_gb, cpu_per_env and disk_per_env_gb must be more than 0"
    );
    let given = (carve.host_mem_gb, carve.host_cpus, carve.host_disk_gb);
    let figures = match given {
        (Some(mem_gb), Some(cpus), Some(disk_gb)) => Figures {
            mem_gb,
            cpus,
            disk_gb,
        },
        (None, None, None) => host.read(&carve.disk_path)?,
        _ => anyhow::bail!("carve: give all of host_mem_gb, host_cpus, host_disk_gb or none"),
    };
    let by_mem = (figures.mem_gb / carve.mem_per_env_gb).floor();
    let by_cpu = f64::from(figures.cpus / carve.cpu_per_env);
    let by_disk = (figures.disk_gb / carve.disk_per_env_gb).floor();
    let n = by_mem.min(by_cpu).min(by_disk).max(0.0);
    // At most a few thousand TEs fit any host; the cast cannot truncate a sensible figure.
    Ok(n.min(4096.0) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn carve() -> CarveFile {
        CarveFile {
            mem_per_env_gb: 32.0,
            cpu_per_env: 8,
            disk_per_env_gb: 200.0,
            disk_path: "/".into(),
            name_pattern: "te{n}".into(),
            datafile_pattern: "/tmp/te{n}.json".into(),
            labels: vec![],
            host_mem_gb: None,
            host_cpus: None,
            host_disk_gb: None,
        }
    }

    #[test]
    fn the_scarcest_resource_decides() {
        let host = |mem_gb, cpus, disk_gb| Figures {
            mem_gb,
            cpus,
            disk_gb,
        };
        assert_eq!(count(&carve(), &host(256.0, 64, 2000.0)).unwrap(), 8);
        assert_eq!(count(&carve(), &host(256.0, 20, 2000.0)).unwrap(), 2);
        assert_eq!(count(&carve(), &host(256.0, 64, 450.0)).unwrap(), 2);
        assert_eq!(count(&carve(), &host(31.9, 64, 2000.0)).unwrap(), 0);
        let mut c = carve();
        c.host_mem_gb = Some(64.0);
        assert!(
            count(&c, &host(1.0, 1, 1.0)).is_err(),
            "partial figures are refused"
        );
        c.host_cpus = Some(64);
        c.host_disk_gb = Some(1000.0);
        assert_eq!(count(&c, &host(1.0, 1, 1.0)).unwrap(), 2);
    }

    #[test]
    fn the_real_host_is_read() {
        let f = HostReader.read(Path::new("/")).unwrap();
        assert!(f.mem_gb > 0.0 && f.cpus >= 1 && f.disk_gb > 0.0, "{f:?}");
        assert_eq!(
            f.cpus as usize,
            std::thread::available_parallelism().unwrap().get()
        );
        assert!(HostReader.read(Path::new("/nonexistent/dir")).is_err());
    }
}
