//! testenv-agent's command line, as a library so that crates/cli-docs writes the man pages and
//! completions from the definitions the binary parses. The agent itself is in main.rs.

pub mod cli;
