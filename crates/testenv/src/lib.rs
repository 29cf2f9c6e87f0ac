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
