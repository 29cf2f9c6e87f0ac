//! tebroker as a library: the server, so tests and the demo can run it in-process.

pub mod admin_cli;
pub mod check_config;
pub mod cli;
pub mod clock;
pub mod config;
pub mod connection;
pub mod edge;
pub mod fault;
pub mod history;
pub mod http;
pub mod http_api;
pub mod http_cli;
pub mod outbox;
pub mod panic;
pub mod reload;
pub mod server;
pub mod server_store;
pub mod shared_read;
pub mod timer;
pub mod tls;
