//! tebroker as a library: the server, so tests and the demo can run it in-process.

pub mod admin_cli;
pub mod clock;
pub mod config;
pub mod connection;
pub mod edge;
pub mod fault;
pub mod history;
pub mod http;
pub mod outbox;
pub mod panic;
pub mod reload;
pub mod server;
pub mod timer;
pub mod tls;
