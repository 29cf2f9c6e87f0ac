//! tebroker as a library: the server, so tests and the demo can run it in-process.

pub mod config;
pub mod server;
pub mod tls;
