//! The testenv agents: `testenv-client` (lock a TE, run a command with it) and
//! `testenv-worker` (offer one TE, lease it to one job at a time). Both speak the original
//! TripleO CI protocol over any Gearman broker; see ARCHITECTURE.md for the flow.

pub mod client;
pub mod guard;
pub mod journal;
pub mod procs;
pub mod request;
pub mod tedata;
pub mod worker;

/// TLS options for every broker in `--geard`, as gear's addServer takes them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// Client certificate (PEM) to present to the brokers.
    #[arg(long)]
    pub ssl_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --ssl-cert.
    #[arg(long)]
    pub ssl_key: Option<std::path::PathBuf>,
    /// CA bundle (PEM) the brokers' certificates must chain to; setting it turns TLS on.
    #[arg(long)]
    pub ssl_ca: Option<std::path::PathBuf>,
}

impl TlsArgs {
    /// Parses `--geard` and attaches these TLS settings to every server.
    pub fn servers(&self, geard: &str) -> anyhow::Result<Vec<gearman_client::ServerAddr>> {
        use anyhow::Context;
        let servers = gearman_client::parse_servers(geard).context("bad --geard")?;
        if self.ssl_cert.is_some() != self.ssl_key.is_some() {
            anyhow::bail!("--ssl-cert and --ssl-key go together");
        }
        if self.ssl_ca.is_none() && self.ssl_cert.is_none() {
            return Ok(servers);
        }
        anyhow::ensure!(
            self.ssl_ca.is_some(),
            "TLS needs --ssl-ca to verify the brokers"
        );
        let tls = gearman_client::TlsConfig {
            ssl_cert: self.ssl_cert.clone(),
            ssl_key: self.ssl_key.clone(),
            ssl_ca: self.ssl_ca.clone(),
        };
        Ok(servers
            .into_iter()
            .map(|s| s.with_tls(tls.clone()))
            .collect())
    }
}

/// Logging to stderr: info by default, debug with `-d`, `RUST_LOG` overrides.
pub fn init_logging(debug: bool) {
    let default = if debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
