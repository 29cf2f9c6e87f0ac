//! The testenv agents: `testenv-client` (lock a TE, run a command with it) and
//! `testenv-worker` (offer one TE, lease it to one job at a time). Both speak the original
//! TripleO CI protocol over any Gearman broker; see ARCHITECTURE.md for the flow.

pub mod client;
pub mod guard;
pub mod journal;
pub mod lease;
pub mod procs;
pub mod request;
pub mod resume;
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
        // Unusable files are a mistake to report now, not after waiting `-t` for a broker.
        if let Some(ca) = &self.ssl_ca {
            gearman_client::tls::read_certs(ca).map_err(|e| anyhow::anyhow!("--ssl-ca: {e}"))?;
        }
        if let (Some(cert), Some(key)) = (&self.ssl_cert, &self.ssl_key) {
            gearman_client::tls::read_certs(cert)
                .map_err(|e| anyhow::anyhow!("--ssl-cert: {e}"))?;
            gearman_client::tls::read_private_key(key)
                .map_err(|e| anyhow::anyhow!("--ssl-key: {e}"))?;
        }
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

/// The `main` of both agents: `agent` on a single-threaded runtime, and its exit status; an
/// error is printed after `name` and exits 1. Never returns: background tasks (reconnecting
/// links) are not waited for.
pub fn agent_main(name: &str, agent: impl std::future::Future<Output = anyhow::Result<i32>>) -> ! {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(agent).unwrap_or_else(|e| {
        eprintln!("{name}: {e:#}");
        1
    });
    std::process::exit(code)
}

/// Logging to stderr at `default` level (e.g. "info"), unless `RUST_LOG` says otherwise.
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
