//! testenv-agent's command line and configuration, as a library so that crates/cli-docs
//! documents the command line the binary parses. The agent itself is in main.rs.

pub mod carve;
pub mod cli;
pub mod config;

pub use testenv::worker::host_name;
