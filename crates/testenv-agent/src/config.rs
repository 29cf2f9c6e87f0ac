//! The agent's TOML configuration: what the file says ([`FileConfig`], unknown keys refused) and
//! what every TE ends up with once per-TE overrides and defaults are applied ([`Config`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HooksFile {
    pub setup: Option<String>,
    pub health: Option<String>,
    pub cleanup: Option<String>,
    pub rebuild: Option<String>,
    pub create: Option<String>,
    pub destroy: Option<String>,
    pub timeout: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    pub health_interval: Option<String>,
    pub max_failed_leases: Option<u32>,
    pub max_rebuilds: Option<u32>,
    pub hold_on_failure: Option<String>,
    /// A lease whose COMMAND fails within this long counts as a failed lease.
    pub early_failure: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseFile {
    pub timeout: Option<String>,
    pub holder_grace: Option<String>,
    pub dead_holder_grace: Option<String>,
    pub callback_start_timeout: Option<String>,
    pub client_alive_cmd: Option<String>,
    pub alive_interval: Option<String>,
    pub alive_timeout: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeFile {
    pub name: String,
    pub datafile: PathBuf,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub hooks: HooksFile,
    #[serde(default)]
    pub policy: PolicyFile,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CarveFile {
    pub mem_per_env_gb: f64,
    pub cpu_per_env: u32,
    pub disk_per_env_gb: f64,
    pub disk_path: PathBuf,
    #[serde(default = "default_name_pattern")]
    pub name_pattern: String,
    pub datafile_pattern: String,
    #[serde(default)]
    pub labels: Vec<String>,
    /// Host figures to use instead of reading the host (tests, dry runs).
    pub host_mem_gb: Option<f64>,
    pub host_cpus: Option<u32>,
    pub host_disk_gb: Option<f64>,
}

fn default_name_pattern() -> String {
    "te{n}".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnDemandFile {
    pub max_envs: u32,
    #[serde(default)]
    pub min_ready: u32,
    #[serde(default = "one")]
    pub max_concurrent_creates: u32,
    #[serde(default)]
    pub create_retries: u32,
    #[serde(default = "three")]
    pub destroy_retries: u32,
    #[serde(default = "default_on_demand_pattern")]
    pub name_pattern: String,
    #[serde(default)]
    pub labels: Vec<String>,
}

fn one() -> u32 {
    1
}

fn three() -> u32 {
    3
}

fn default_on_demand_pattern() -> String {
    "od{n}".into()
}

/// The on-demand limits, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct OnDemand {
    pub max_envs: u32,
    pub min_ready: u32,
    pub max_concurrent_creates: u32,
    pub create_retries: u32,
    pub destroy_retries: u32,
    pub labels: Vec<String>,
}

/// The most on-demand TEs one agent manages (each has a worker connection per broker).
const MAX_ON_DEMAND: u32 = 1000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default = "default_brokers")]
    pub brokers: Vec<String>,
    /// This agent's name on the brokers (default: the host name).
    pub agent: Option<String>,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    pub ssl_cert: Option<PathBuf>,
    pub ssl_key: Option<PathBuf>,
    pub ssl_ca: Option<PathBuf>,
    #[serde(default)]
    pub hooks: HooksFile,
    #[serde(default)]
    pub policy: PolicyFile,
    #[serde(default)]
    pub lease: LeaseFile,
    #[serde(default)]
    pub te: Vec<TeFile>,
    pub carve: Option<CarveFile>,
    pub on_demand: Option<OnDemandFile>,
}

fn default_brokers() -> Vec<String> {
    vec!["127.0.0.1:4730".into()]
}

/// The hooks of one TE, each a `sh -c` command.
#[derive(Debug, Clone, PartialEq)]
pub struct Hooks {
    pub setup: Option<String>,
    pub health: Option<String>,
    pub cleanup: Option<String>,
    pub rebuild: Option<String>,
    pub create: Option<String>,
    pub destroy: Option<String>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub health_interval: Duration,
    pub max_failed_leases: u32,
    pub max_rebuilds: u32,
    pub hold_on_failure: Duration,
    pub early_failure: Duration,
}

/// Where a TE comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TeKind {
    /// A `[[te]]` entry: its datafile is there.
    Static,
    /// Carved from the host: `setup` writes the datafile before the first health check.
    Carved,
    /// A slot of `[on_demand]`: `create` makes a TE in it (writing the datafile) and
    /// `destroy` removes it after one lease.
    OnDemand,
}

/// One TE with every setting resolved.
#[derive(Debug, Clone)]
pub struct TeConfig {
    pub name: String,
    /// 1-based position (the carve number for carved TEs), `TE_NUM` of the hooks.
    pub num: u32,
    pub datafile: PathBuf,
    pub labels: Vec<String>,
    pub hooks: Hooks,
    pub policy: Policy,
    pub kind: TeKind,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub agent: String,
    pub brokers: Vec<String>,
    pub tls: testenv::TlsArgs,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    pub lease: testenv::lease::LeaseSettings,
    pub tes: Vec<TeConfig>,
    pub on_demand: Option<OnDemand>,
}

/// A duration as `10m`, `30s`, `1h30m`, `2d`, `250ms` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let bad = || format!("{text:?} is not a duration (like \"30s\", \"10m\", \"1h30m\")");
    if t.is_empty() {
        return Err(bad());
    }
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit_ms: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        let part = n.checked_mul(unit_ms).ok_or_else(bad)?;
        total = total
            .checked_add(Duration::from_millis(part))
            .ok_or_else(bad)?;
    }
    // The lease machinery's deadlines are checked against 30 days; so are these.
    if total > Duration::from_secs(testenv_proto::MAX_TIMEOUT_SECS) {
        return Err(format!("{text:?} is longer than 30 days"));
    }
    Ok(total)
}

fn duration(
    where_: &str,
    key: &str,
    v: &Option<String>,
    default: Duration,
) -> anyhow::Result<Duration> {
    match v {
        None => Ok(default),
        Some(t) => parse_duration(t).map_err(|e| anyhow::anyhow!("{where_}: {key}: {e}")),
    }
}

/// A TE's own setting `over`, or else the file-wide `base`.
fn pick(over: &Option<String>, base: &Option<String>) -> Option<String> {
    over.clone().or_else(|| base.clone())
}

/// Every label of `labels` is a valid name; errors say `{where_}: labels: ...`.
fn check_labels(where_: &str, labels: &[String]) -> anyhow::Result<()> {
    for label in labels {
        testenv_proto::agent::check_name("label", label)
            .map_err(|e| anyhow::anyhow!("{where_}: labels: {e}"))?;
    }
    Ok(())
}

fn hooks(where_: &str, base: &HooksFile, over: &HooksFile) -> anyhow::Result<Hooks> {
    Ok(Hooks {
        setup: pick(&over.setup, &base.setup),
        health: pick(&over.health, &base.health),
        cleanup: pick(&over.cleanup, &base.cleanup),
        rebuild: pick(&over.rebuild, &base.rebuild),
        create: pick(&over.create, &base.create),
        destroy: pick(&over.destroy, &base.destroy),
        timeout: duration(
            where_,
            "hooks.timeout",
            &pick(&over.timeout, &base.timeout),
            Duration::from_secs(600),
        )?,
    })
}

fn policy(where_: &str, base: &PolicyFile, over: &PolicyFile) -> anyhow::Result<Policy> {
    let p = Policy {
        health_interval: duration(
            where_,
            "policy.health_interval",
            &pick(&over.health_interval, &base.health_interval),
            Duration::from_secs(1800),
        )?,
        max_failed_leases: over
            .max_failed_leases
            .or(base.max_failed_leases)
            .unwrap_or(3),
        max_rebuilds: over.max_rebuilds.or(base.max_rebuilds).unwrap_or(2),
        hold_on_failure: duration(
            where_,
            "policy.hold_on_failure",
            &pick(&over.hold_on_failure, &base.hold_on_failure),
            Duration::ZERO,
        )?,
        early_failure: duration(
            where_,
            "policy.early_failure",
            &pick(&over.early_failure, &base.early_failure),
            Duration::from_secs(60),
        )?,
    };
    anyhow::ensure!(
        !p.health_interval.is_zero(),
        "{where_}: policy.health_interval must be more than 0"
    );
    Ok(p)
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        Config::parse(&text, &crate::carve::HostReader)
            .map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))
    }

    pub fn parse(text: &str, host: &dyn crate::carve::HostFigures) -> anyhow::Result<Config> {
        let file: FileConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(
            !file.brokers.is_empty(),
            "brokers: give at least one broker"
        );
        let agent = file.agent.clone().unwrap_or_else(crate::host_name);
        testenv_proto::agent::check_name("agent", &agent)
            .map_err(|e| anyhow::anyhow!("agent: {e}"))?;
        let l = &file.lease;
        let lease_time = |key: &str, v: &Option<String>, default_secs: u64| {
            duration("lease", key, v, Duration::from_secs(default_secs))
        };
        let lease = testenv::lease::LeaseSettings {
            timeout: lease_time("timeout", &l.timeout, 10800)?,
            client_alive_cmd: l.client_alive_cmd.clone(),
            alive_interval: lease_time("alive_interval", &l.alive_interval, 60)?,
            alive_timeout: lease_time("alive_timeout", &l.alive_timeout, 60)?,
            holder_grace: lease_time("holder_grace", &l.holder_grace, 15)?,
            dead_holder_grace: lease_time("dead_holder_grace", &l.dead_holder_grace, 1)?,
            callback_start_timeout: lease_time(
                "callback_start_timeout",
                &l.callback_start_timeout,
                30,
            )?,
        };
        anyhow::ensure!(
            !lease.timeout.is_zero(),
            "lease: timeout must be more than 0"
        );
        // The defaults themselves must be valid even when no TE overrides them.
        hooks("hooks", &file.hooks, &HooksFile::default())?;
        policy("policy", &file.policy, &PolicyFile::default())?;

        let mut tes = Vec::new();
        for (i, te) in file.te.iter().enumerate() {
            let where_ = format!("te {:?}", te.name);
            testenv_proto::agent::check_name("TE", &te.name)
                .map_err(|e| anyhow::anyhow!("te #{}: name: {e}", i + 1))?;
            check_labels(&where_, &te.labels)?;
            tes.push(TeConfig {
                name: te.name.clone(),
                num: u32::try_from(i + 1).unwrap_or(u32::MAX),
                datafile: te.datafile.clone(),
                labels: te.labels.clone(),
                hooks: hooks(&where_, &file.hooks, &te.hooks)?,
                policy: policy(&where_, &file.policy, &te.policy)?,
                kind: TeKind::Static,
            });
        }
        if let Some(carve) = &file.carve {
            let n = crate::carve::count(carve, host)?;
            let base_hooks = hooks("carve", &file.hooks, &HooksFile::default())?;
            anyhow::ensure!(
                base_hooks.setup.is_some(),
                "carve: hooks.setup is required to set up carved TEs"
            );
            for num in 1..=n {
                let name = carve.name_pattern.replace("{n}", &num.to_string());
                testenv_proto::agent::check_name("TE", &name)
                    .map_err(|e| anyhow::anyhow!("carve: name_pattern: {e}"))?;
                check_labels("carve", &carve.labels)?;
                tes.push(TeConfig {
                    name,
                    num,
                    datafile: carve
                        .datafile_pattern
                        .replace("{n}", &num.to_string())
                        .into(),
                    labels: carve.labels.clone(),
                    hooks: base_hooks.clone(),
                    policy: policy("carve", &file.policy, &PolicyFile::default())?,
                    kind: TeKind::Carved,
                });
            }
        }
        let mut on_demand = None;
        if let Some(od) = &file.on_demand {
            anyhow::ensure!(
                file.hooks.create.is_some() && file.hooks.destroy.is_some(),
                "on_demand: hooks.create and hooks.destroy are required"
            );
            anyhow::ensure!(
                (1..=MAX_ON_DEMAND).contains(&od.max_envs),
                "on_demand: max_envs must be 1 to {MAX_ON_DEMAND}"
            );
            anyhow::ensure!(
                od.max_envs >= od.min_ready,
                "on_demand: min_ready is more than max_envs"
            );
            anyhow::ensure!(
                od.max_concurrent_creates >= 1,
                "on_demand: max_concurrent_creates must be at least 1"
            );
            anyhow::ensure!(
                od.create_retries <= 100,
                "on_demand: create_retries is more than 100"
            );
            anyhow::ensure!(
                od.destroy_retries <= 100,
                "on_demand: destroy_retries is more than 100"
            );
            check_labels("on_demand", &od.labels)?;
            let base_hooks = hooks("on_demand", &file.hooks, &HooksFile::default())?;
            let base_policy = policy("on_demand", &file.policy, &PolicyFile::default())?;
            let datafiles = crate::on_demand::datafile_dir(&file.state_dir);
            for num in 1..=od.max_envs {
                let name = od.name_pattern.replace("{n}", &num.to_string());
                testenv_proto::agent::check_name("TE", &name)
                    .map_err(|e| anyhow::anyhow!("on_demand: name_pattern: {e}"))?;
                tes.push(TeConfig {
                    datafile: datafiles.join(format!("{name}.json")),
                    name,
                    num,
                    labels: od.labels.clone(),
                    hooks: base_hooks.clone(),
                    policy: base_policy.clone(),
                    kind: TeKind::OnDemand,
                });
            }
            on_demand = Some(OnDemand {
                max_envs: od.max_envs,
                min_ready: od.min_ready,
                max_concurrent_creates: od.max_concurrent_creates,
                create_retries: od.create_retries,
                destroy_retries: od.destroy_retries,
                labels: od.labels.clone(),
            });
        }
        let mut seen = std::collections::HashSet::new();
        for te in &tes {
            anyhow::ensure!(
                seen.insert(te.name.clone()),
                "te {:?}: the name is used twice",
                te.name
            );
        }
        anyhow::ensure!(
            !tes.is_empty(),
            "no TE: give [[te]] entries, a [carve] or an [on_demand] section"
        );
        Ok(Config {
            agent,
            brokers: file.brokers.clone(),
            tls: testenv::TlsArgs {
                ssl_cert: file.ssl_cert.clone(),
                ssl_key: file.ssl_key.clone(),
                ssl_ca: file.ssl_ca.clone(),
            },
            state_dir: file.state_dir.clone(),
            control_socket: file.control_socket.clone(),
            lease,
            tes,
            on_demand,
        })
    }

    /// The effective settings, for `check-config`: every TE with its hooks and policy.
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "agent = {:?}", self.agent);
        let _ = writeln!(out, "brokers = {:?}", self.brokers);
        let _ = writeln!(
            out,
            "state_dir = {:?}",
            self.state_dir.display().to_string()
        );
        let _ = writeln!(
            out,
            "control_socket = {:?}",
            self.control_socket.display().to_string()
        );
        let _ = writeln!(out, "lease = {:?}", self.lease);
        for te in self.tes.iter().filter(|t| t.kind != TeKind::OnDemand) {
            let _ = writeln!(
                out,
                "\n[te {}] num = {}{}",
                te.name,
                te.num,
                if te.kind == TeKind::Carved {
                    " (carved)"
                } else {
                    ""
                }
            );
            let _ = writeln!(
                out,
                "  datafile = {:?}{}",
                te.datafile.display().to_string(),
                if te.datafile.exists() || te.kind == TeKind::Carved {
                    ""
                } else {
                    "  (MISSING: the TE will be unhealthy)"
                }
            );
            let _ = writeln!(out, "  labels = {:?}", te.labels);
            describe_hooks_and_policy(&mut out, te, false);
        }
        if let Some(od) = &self.on_demand {
            let slots: Vec<&TeConfig> = self
                .tes
                .iter()
                .filter(|t| t.kind == TeKind::OnDemand)
                .collect();
            let _ = writeln!(out, "\n[on_demand]");
            let _ = writeln!(out, "  max_envs = {}", od.max_envs);
            let _ = writeln!(out, "  min_ready = {}", od.min_ready);
            let _ = writeln!(
                out,
                "  max_concurrent_creates = {}",
                od.max_concurrent_creates
            );
            let _ = writeln!(out, "  create_retries = {}", od.create_retries);
            let _ = writeln!(out, "  destroy_retries = {}", od.destroy_retries);
            let _ = writeln!(out, "  labels = {:?}", od.labels);
            if let (Some(first), Some(last)) = (slots.first(), slots.last()) {
                let _ = writeln!(
                    out,
                    "  names = {} .. {} ({} TEs at most)",
                    first.name,
                    last.name,
                    slots.len()
                );
                let _ = writeln!(
                    out,
                    "  datafiles = {:?} (written by hooks.create)",
                    first
                        .datafile
                        .parent()
                        .unwrap_or(Path::new(""))
                        .display()
                        .to_string()
                );
                describe_hooks_and_policy(&mut out, first, true);
            }
        }
        out
    }
}

fn describe_hooks_and_policy(out: &mut String, te: &TeConfig, on_demand: bool) {
    use std::fmt::Write;
    let h = &te.hooks;
    let which = if on_demand {
        [
            ("create", &h.create),
            ("destroy", &h.destroy),
            ("health", &h.health),
        ]
        .to_vec()
    } else {
        [
            ("setup", &h.setup),
            ("health", &h.health),
            ("cleanup", &h.cleanup),
            ("rebuild", &h.rebuild),
        ]
        .to_vec()
    };
    for (k, v) in which {
        let _ = writeln!(
            out,
            "  hooks.{k} = {}",
            v.as_deref()
                .map_or("(none)".to_string(), |c| format!("{c:?}"))
        );
    }
    let _ = writeln!(out, "  hooks.timeout = {:?}", h.timeout);
    let p = &te.policy;
    let _ = writeln!(
        out,
        "  policy: health_interval = {:?}, max_failed_leases = {}, max_rebuilds = {}, hold_on_failure = {:?}, early_failure = {:?}",
        p.health_interval, p.max_failed_leases, p.max_rebuilds, p.hold_on_failure, p.early_failure
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::carve::Figures;

    const HOST: Figures = Figures {
        mem_gb: 128.0,
        cpus: 32,
        disk_gb: 1000.0,
    };

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        for bad in [
            "",
            "m",
            "10x",
            "1.5h",
            "-3s",
            "99999999999999999999d",
            "31d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn per_te_overrides_and_errors_name_the_te_and_key() {
        let text = r#"
            state_dir = "/tmp/s"
            control_socket = "/tmp/s.sock"
            [hooks]
            health = "true"
            [policy]
            max_rebuilds = 5
            [[te]]
            name = "te1"
            datafile = "/nonexistent/te1.json"
            labels = ["ovb"]
            [te.policy]
            max_rebuilds = 1
            [[te]]
            name = "te2"
            datafile = "/nonexistent/te2.json"
            [te.hooks]
            health = "false"
        "#;
        let c = Config::parse(text, &HOST).unwrap();
        assert_eq!(c.tes[0].policy.max_rebuilds, 1);
        assert_eq!(c.tes[1].policy.max_rebuilds, 5);
        assert_eq!(c.tes[0].hooks.health.as_deref(), Some("true"));
        assert_eq!(c.tes[1].hooks.health.as_deref(), Some("false"));
        assert!(c.describe().contains("MISSING"));

        let e = Config::parse(
            &text.replace(
                "max_rebuilds = 1",
                "max_rebuilds = 1\nhealth_interval = \"soon\"",
            ),
            &HOST,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("te \"te1\"") && e.contains("policy.health_interval"),
            "{e}"
        );
        let e = Config::parse(
            &text.replace("labels = [\"ovb\"]", "labels = [\"ovb\"]\ncolour = 1"),
            &HOST,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("colour"), "{e}");
    }
}
