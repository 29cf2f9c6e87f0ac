//! The agent's command line. It is in the library so that crates/cli-docs writes the man page
//! and completions from the same definitions the binary parses.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use testenv_proto::agent::ALL_ENVS;

#[derive(Debug, Parser)]
#[command(
    name = "testenv-agent",
    version,
    about = "Serve every test environment of a host through Gearman: health checks, rebuilds, \
             drain, hold and labels, one lease per TE.",
    after_help = "Signals: SIGUSR2 drains every TE (leases finish first), SIGUSR1 undrains them, \
                  SIGINT/SIGTERM stop."
)]
pub struct Args {
    /// The agent's TOML configuration.
    #[arg(short, long, global = true)]
    pub config: Option<PathBuf>,
    /// Debug logging.
    #[arg(short = 'd', long, global = true)]
    pub debug: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check FILE and print the effective settings of every TE.
    CheckConfig { file: PathBuf },
    /// Talk to a running agent over its control socket.
    Ctl {
        /// The control socket (default: control_socket of --config, else
        /// /run/testenv-agent.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        #[command(subcommand)]
        op: CtlOp,
    },
}

#[derive(Debug, Subcommand)]
pub enum CtlOp {
    /// Every TE with its state.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Stop offering a TE (after its lease).
    Drain(Target),
    /// Offer a drained TE again.
    Undrain(Target),
    /// Keep a TE aside.
    Hold {
        name: String,
        /// For how long ("2h", "30m", "1h30m", or seconds); default until released.
        #[arg(long = "for", value_name = "DURATION")]
        for_: Option<String>,
    },
    /// End a hold.
    Release { name: String },
    /// Rebuild a TE now (then health-check it).
    Rebuild { name: String },
}

#[derive(Debug, clap::Args)]
pub struct Target {
    #[arg(required_unless_present = "all")]
    pub name: Option<String>,
    /// Every TE of the agent.
    #[arg(long, conflicts_with = "name")]
    pub all: bool,
}

impl Target {
    pub fn env(&self) -> String {
        if self.all {
            ALL_ENVS.into()
        } else {
            self.name.clone().unwrap_or_default()
        }
    }
}
