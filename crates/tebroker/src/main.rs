//! `tebroker`: the Gearman job server of the testenv system.

use std::io::Write;

use clap::Parser;
use tebroker::cli::{Cli, Command};
use tebroker::config::{ServeArgs, Settings};
use tebroker::server::Server;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    tebroker::panic::exit_on_panic();
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Admin(args) => std::process::exit(tebroker::admin_cli::run(args)?),
        Command::CheckConfig(args) => std::process::exit(tebroker::check_config::run(&args)),
        Command::Api(command) => std::process::exit(tebroker::http_cli::run(cli.api, command)?),
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let settings = Settings::resolve(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let pidfile = settings.pidfile.clone();
        let http = settings.http.clone();
        let server = Server::bind(settings).await?;
        let signals = Signals::install()?;
        let addr = server.local_addr()?;
        if let Some(path) = &pidfile {
            std::fs::write(path, format!("{}\n", std::process::id()))?;
        }
        // Tests and scripts read this line to learn the port when started with -p 0.
        // Whoever started us may stop reading stdout at any time (a test that only wanted the
        // port): these lines are written with errors ignored, never a panic on a closed pipe.
        let mut banner = format!("tebroker listening on {addr}\n");
        if let Some(http) = &http {
            let bound = tebroker::http::serve_on_own_thread(
                http.clone(),
                server.shared(),
                server.stop_token(),
            )?;
            let scheme = if server.shared().settings().http_tls.is_some() {
                "https"
            } else {
                "http"
            };
            banner.push_str(&format!("tebroker dashboard on {scheme}://{bound}/\n"));
        }
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(banner.as_bytes());
        let _ = stdout.flush();
        drop(stdout);
        tracing::info!(%addr, "listening");
        tokio::spawn(signals.handle(server.shared()));
        let result = server.run().await;
        if let Some(path) = &pidfile {
            let _ = std::fs::remove_file(path);
        }
        result
    })
}

/// SIGTERM and SIGINT stop the server at once (connections closed, leases ended); SIGHUP
/// re-reads the ACL and TLS files.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installed before the listening line is printed: whoever reads that line may signal us
    /// at once, and SIGHUP's default action would end the process.
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn handle(mut self, shared: std::sync::Arc<tebroker::server::Shared>) {
        loop {
            tokio::select! {
                _ = self.term.recv() => break,
                _ = self.int.recv() => break,
                _ = self.hup.recv() => {
                    tracing::info!("SIGHUP: reloading the ACL and TLS files");
                    tebroker::reload::reload(&shared);
                }
            }
        }
        tracing::info!("signal received; stopping");
        shared.stop_token().cancel();
    }
}
