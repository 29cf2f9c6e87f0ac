//! `tebroker admin`: send one admin command to a broker and print its answer, like gearadmin
//! but for every command tebroker knows (`leases`, `envs`, `drain TE`, `stats`, `acl ...`
//! included), over TCP or
//! TLS (gearman_client::admin does the talking).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The broker, host[:port].
    #[arg(short = 'b', long, default_value = "127.0.0.1:4730")]
    pub broker: String,
    /// CA bundle (PEM) the broker's certificate must chain to; setting it turns TLS on.
    #[arg(long)]
    pub ssl_ca: Option<PathBuf>,
    /// Client certificate (PEM) to present, when the broker requires one.
    #[arg(long, requires = "ssl_key", requires = "ssl_ca")]
    pub ssl_cert: Option<PathBuf>,
    /// Private key (PEM) of --ssl-cert.
    #[arg(long, requires = "ssl_cert")]
    pub ssl_key: Option<PathBuf>,
    /// Seconds to wait for the whole answer.
    #[arg(long, default_value = "30")]
    pub timeout: u64,
    /// The command and its arguments, e.g. `status`, `leases`, `envs`, `drain TE`,
    /// `cancel job H:host:12`.
    #[arg(required = true, trailing_var_arg = true)]
    pub command: Vec<String>,
}

/// Runs the command; returns the process exit status (1 if the broker answered `ERR`).
pub fn run(args: AdminArgs) -> anyhow::Result<i32> {
    let mut server: gearman_client::ServerAddr = args.broker.parse()?;
    if args.ssl_ca.is_some() {
        server = server.with_tls(gearman_client::TlsConfig {
            ssl_cert: args.ssl_cert.clone(),
            ssl_key: args.ssl_key.clone(),
            ssl_ca: args.ssl_ca.clone(),
        });
    }
    let command = args.command.join(" ");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let answer = runtime.block_on(gearman_client::admin::query(
        &server,
        &command,
        Duration::from_secs(args.timeout),
    ));
    match answer {
        Ok(lines) => {
            let mut out = std::io::stdout().lock();
            for line in lines {
                writeln!(out, "{line}")?;
            }
            Ok(0)
        }
        Err(gearman_client::Error::Server { code, text, .. }) => {
            eprintln!("ERR {code} {text}");
            Ok(1)
        }
        Err(e) => Err(e.into()),
    }
}
