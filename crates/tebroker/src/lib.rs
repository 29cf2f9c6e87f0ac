//! tebroker as a library: the server, so tests and the demo can run it in-process.

pub mod admin_cli;
pub mod config;
pub mod history;
pub mod http;
pub mod server;
pub mod tls;
