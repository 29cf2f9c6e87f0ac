//! The `tebroker` command line, in the library so the man page and shell completions can be
//! generated from the same definitions (crates/cli-docs) that the binary parses.

use clap::{Parser, Subcommand};

use crate::config::ServeArgs;

#[derive(Parser)]
#[command(
    name = "tebroker",
    version,
    about = "A Gearman job server that understands the TripleO CI testenv protocol"
)]
pub struct Cli {
    /// More logging (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(flatten)]
    pub api: crate::http_cli::ApiArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the job server.
    Serve(Box<ServeArgs>),
    /// Send an admin command (status, workers, leases, stats, ...) and print the answer.
    Admin(crate::admin_cli::AdminArgs),
    /// Validate a config file and print the settings it gives.
    ///
    /// Checks what `tebroker serve --config FILE` would refuse at start-up (unknown keys, bad
    /// values, TLS and ACL files that do not read or parse) without binding a port, and prints
    /// every effective setting, defaults included, as a config file (exit 0); or names the
    /// first problem on stderr (exit 1).
    CheckConfig(crate::check_config::CheckConfigArgs),
    #[command(flatten)]
    Api(crate::http_cli::ApiCommand),
}
