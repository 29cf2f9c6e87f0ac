//! An async (tokio) Gearman client and worker library, built on [`gearman_proto`].
//!
//! * [`Client`]: submit foreground jobs (and follow their WORK_DATA / WORK_STATUS / ... events)
//!   or background jobs, ask GET_STATUS, ECHO. Uses the first of several servers that answers
//!   and fails over when it dies; a job whose server dies fails with [`Error::Disconnected`]
//!   instead of hanging.
//! * [`Worker`]: registers its functions with *all* given servers, grabs jobs from any of them,
//!   reconnects and re-registers after a server restart, can pause/resume and stop gracefully.
//! * [`parse_servers`] / [`ServerAddr`]: `host[:port],[v6]:port` lists, port 4730 by default.
//! * [`Connection`]: a raw packet connection, for tests that speak the protocol directly.
//! * [`admin::query`]: one admin text command (`status`, `leases`, `position H`, ...) over TCP or
//!   TLS.
//! * [`tls::read_certs`] / [`tls::read_private_key`]: PEM loading, shared with servers.
//!
//! Every socket has TCP_NODELAY set: Gearman is request/response, and Nagle plus delayed ACKs
//! costs ~40 ms per round trip otherwise. Every client and worker connection watches its
//! server ([`Liveness`]): TCP keepalive (30 s idle, 3 probes 10 s apart) for a vanished host or
//! network, and an ECHO_REQ after 30 s of silence that must be answered within 10 s for a hung
//! server. A dead connection fails its jobs ([`Error::Disconnected`]); a worker reconnects.
//!
//! # Example
//!
//! ```no_run
//! use gearman_client::{parse_servers, Client, JobEvent, JobRequest, Worker};
//!
//! # async fn demo() -> gearman_client::Result<()> {
//! let servers = parse_servers("127.0.0.1:4730")?;
//!
//! // A worker that reverses strings, reporting progress.
//! let worker = Worker::new(servers.clone());
//! worker.register("reverse");
//! tokio::spawn(async move {
//!     while let Some(job) = worker.grab_job().await {
//!         let mut out = job.data().to_vec();
//!         out.reverse();
//!         job.send_status(1, 1).await.ok();
//!         job.complete(out).await.ok();
//!     }
//! });
//!
//! // A client: the simple way...
//! let client = Client::connect(servers).await?;
//! assert_eq!(&client.call("reverse", "abc").await?[..], b"cba");
//!
//! // ...or following the job's events.
//! let mut job = client.submit(JobRequest::new("reverse", "xyz").unique("u1")).await?;
//! while let Some(event) = job.next_event().await? {
//!     match event {
//!         JobEvent::Status { numerator, denominator } => println!("{numerator}/{denominator}"),
//!         JobEvent::Complete(data) => println!("done: {data:?}"),
//!         other => println!("{other:?}"),
//!     }
//! }
//! # Ok(())
//! # }
//! ```

pub mod addr;
pub mod admin;
pub mod client;
pub mod connection;
pub mod error;
pub mod job;
pub mod tls;
pub mod worker;

pub use addr::{parse_servers, AddrError, ServerAddr, TlsConfig, DEFAULT_PORT};
pub use client::{Client, ClientOptions, ForegroundJob, JobEvent, JobRequest, JobStatus, Priority};
pub use connection::{
    wait_for_server, Backoff, BoxTransport, Connection, Keepalive, Liveness, Transport,
};
pub use error::{Error, Result};
pub use job::Job;
pub use worker::{Worker, WorkerOptions};
