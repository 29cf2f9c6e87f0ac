//! Settings: command-line flags (geard's spellings where geard has them) over an optional TOML
//! file holding the same settings.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::Deserialize;

/// `tebroker serve` flags. Every one may also be set in the `--config` file, same name with
/// underscores; a flag given on the command line wins.
#[derive(Debug, Args, Default)]
pub struct ServeArgs {
    /// TCP port to listen on (0: pick a free one).
    #[arg(short = 'p', long)]
    pub port: Option<u16>,
    /// Address to listen on.
    #[arg(short = 'L', long = "listen", visible_alias = "listen-address")]
    pub listen: Option<String>,
    /// TOML file with the same settings.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Accepted for geard compatibility; tebroker always stays in the foreground.
    #[arg(short = 'd', long = "nodaemon")]
    pub foreground: bool,
    /// Write the process id to this file (removed on exit).
    #[arg(long)]
    pub pidfile: Option<PathBuf>,
    /// Enable TCP keepalive on client connections.
    #[arg(long)]
    pub keepalive: bool,
    /// Seconds of idleness before keepalive probes start.
    #[arg(long)]
    pub keepalive_idle: Option<u64>,
    /// Seconds between keepalive probes.
    #[arg(long)]
    pub keepalive_interval: Option<u64>,
    /// Unanswered probes before the connection is dropped.
    #[arg(long)]
    pub keepalive_count: Option<u32>,
    /// Largest packet body accepted, in bytes.
    #[arg(long)]
    pub max_frame: Option<usize>,
    /// Longest admin text line accepted, in bytes.
    #[arg(long)]
    pub max_admin_line: Option<usize>,
    /// Most connections at once (0: no limit).
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Most functions one connection may register (0: no limit).
    #[arg(long)]
    pub max_functions_per_conn: Option<usize>,
    /// Bytes buffered for a connection that does not read before it is closed (0: no limit).
    #[arg(long)]
    pub max_output_buffer: Option<usize>,
    /// Seconds a connection may hold an unfinished packet before it is closed (0: forever).
    #[arg(long)]
    pub partial_packet_timeout: Option<u64>,
    /// Listen backlog.
    #[arg(long)]
    pub backlog: Option<u32>,
    /// Host part of job handles (`H:<host>:<n>`); defaults to the machine's host name.
    #[arg(long)]
    pub handle_host: Option<String>,
    /// Serve the dashboard, JSON API and Prometheus metrics over HTTP on this address
    /// (e.g. 127.0.0.1:8080). Unauthenticated: bind it to a trusted network.
    #[arg(long)]
    pub http: Option<String>,
    /// Append every ended lease to this file as a JSON line.
    #[arg(long)]
    pub history_file: Option<PathBuf>,
    /// Default limit of queued jobs per function and priority (0: unlimited); the `maxqueue`
    /// admin command overrides it per function.
    #[arg(long)]
    pub max_queue: Option<i64>,
    /// Server certificate (PEM); with --ssl-key, the port speaks TLS only.
    #[arg(long, value_name = "PATH")]
    pub ssl_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, value_name = "PATH")]
    pub ssl_key: Option<PathBuf>,
    /// CA certificates (PEM): clients must present a certificate signed by one of them; its
    /// subject common name is the identity ACLs apply to.
    #[arg(long, value_name = "PATH")]
    pub ssl_ca: Option<PathBuf>,
    /// geard's ACL file (INI: one [common-name] section with register/invoke/grant).
    #[arg(long, value_name = "PATH")]
    pub acl: Option<PathBuf>,
    /// Let any connection register a `callback_*` function another connection holds (geard's
    /// behaviour; by default tebroker refuses such a registration).
    #[arg(long)]
    pub no_callback_protection: bool,
}

/// The same settings as read from a TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    port: Option<u16>,
    listen: Option<String>,
    pidfile: Option<PathBuf>,
    keepalive: Option<bool>,
    keepalive_idle: Option<u64>,
    keepalive_interval: Option<u64>,
    keepalive_count: Option<u32>,
    max_frame: Option<usize>,
    max_admin_line: Option<usize>,
    max_connections: Option<usize>,
    max_functions_per_conn: Option<usize>,
    max_output_buffer: Option<usize>,
    partial_packet_timeout: Option<u64>,
    backlog: Option<u32>,
    handle_host: Option<String>,
    http: Option<String>,
    history_file: Option<PathBuf>,
    max_queue: Option<i64>,
    ssl_cert: Option<PathBuf>,
    ssl_key: Option<PathBuf>,
    ssl_ca: Option<PathBuf>,
    acl: Option<PathBuf>,
    callback_protection: Option<bool>,
}

/// Resolved settings of a running server.
#[derive(Debug, Clone)]
pub struct Settings {
    pub port: u16,
    pub listen: String,
    pub pidfile: Option<PathBuf>,
    pub keepalive: Option<Keepalive>,
    pub max_frame: usize,
    pub max_admin_line: usize,
    pub max_connections: usize,
    pub max_functions_per_conn: usize,
    pub max_output_buffer: usize,
    pub partial_packet_timeout: Duration,
    pub backlog: u32,
    pub handle_host: String,
    pub http: Option<String>,
    pub history_file: Option<PathBuf>,
    /// Default per-function queue limit (0: unlimited).
    pub max_queue: i64,
    pub tls: Option<crate::tls::TlsFiles>,
    pub acl: Option<PathBuf>,
    pub callback_protection: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            port: 4730,
            listen: "0.0.0.0".into(),
            pidfile: None,
            keepalive: None,
            max_frame: gearman_proto::DEFAULT_MAX_FRAME,
            max_admin_line: gearman_proto::DEFAULT_MAX_ADMIN_LINE,
            max_connections: 0,
            max_functions_per_conn: DEFAULT_MAX_FUNCTIONS_PER_CONN,
            max_output_buffer: 64 * 1024 * 1024,
            partial_packet_timeout: Duration::from_secs(60),
            backlog: 4096,
            handle_host: host_name(),
            http: None,
            history_file: None,
            max_queue: 0,
            tls: None,
            acl: None,
            callback_protection: true,
        }
    }
}

/// Enough for any worker (a testenv-client registers one function), small enough that one
/// connection cannot grow the function table without bound.
pub const DEFAULT_MAX_FUNCTIONS_PER_CONN: usize = 16384;

impl Settings {
    pub fn resolve(args: &ServeArgs) -> anyhow::Result<Settings> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                toml::from_str::<FileSettings>(&text)
                    .with_context(|| format!("invalid config file {}", path.display()))?
            }
            None => FileSettings::default(),
        };
        let d = Settings::default();
        let keepalive_on = args.keepalive || file.keepalive.unwrap_or(false);
        let keepalive = keepalive_on.then(|| Keepalive {
            idle: Duration::from_secs(args.keepalive_idle.or(file.keepalive_idle).unwrap_or(7200)),
            interval: Duration::from_secs(
                args.keepalive_interval
                    .or(file.keepalive_interval)
                    .unwrap_or(75),
            ),
            count: args.keepalive_count.or(file.keepalive_count).unwrap_or(9),
        });
        Ok(Settings {
            port: args.port.or(file.port).unwrap_or(d.port),
            listen: args.listen.clone().or(file.listen).unwrap_or(d.listen),
            pidfile: args.pidfile.clone().or(file.pidfile),
            keepalive,
            max_frame: args.max_frame.or(file.max_frame).unwrap_or(d.max_frame),
            max_admin_line: args
                .max_admin_line
                .or(file.max_admin_line)
                .unwrap_or(d.max_admin_line),
            max_connections: args.max_connections.or(file.max_connections).unwrap_or(0),
            max_functions_per_conn: args
                .max_functions_per_conn
                .or(file.max_functions_per_conn)
                .unwrap_or(d.max_functions_per_conn),
            max_output_buffer: args
                .max_output_buffer
                .or(file.max_output_buffer)
                .unwrap_or(d.max_output_buffer),
            partial_packet_timeout: args
                .partial_packet_timeout
                .or(file.partial_packet_timeout)
                .map(Duration::from_secs)
                .unwrap_or(d.partial_packet_timeout),
            backlog: args.backlog.or(file.backlog).unwrap_or(d.backlog),
            handle_host: args
                .handle_host
                .clone()
                .or(file.handle_host)
                .unwrap_or(d.handle_host),
            max_queue: args.max_queue.or(file.max_queue).unwrap_or(d.max_queue),
            http: args.http.clone().or(file.http),
            history_file: args.history_file.clone().or(file.history_file),
            tls: tls_files(
                args.ssl_cert.clone().or(file.ssl_cert),
                args.ssl_key.clone().or(file.ssl_key),
                args.ssl_ca.clone().or(file.ssl_ca),
            )?,
            acl: args.acl.clone().or(file.acl),
            callback_protection: !args.no_callback_protection
                && file.callback_protection.unwrap_or(d.callback_protection),
        })
    }
}

fn tls_files(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
) -> anyhow::Result<Option<crate::tls::TlsFiles>> {
    match (cert, key, ca) {
        (None, None, None) => Ok(None),
        (Some(cert), Some(key), ca) => Ok(Some(crate::tls::TlsFiles { cert, key, ca })),
        _ => anyhow::bail!("TLS needs both --ssl-cert and --ssl-key (and optionally --ssl-ca)"),
    }
}

pub fn apply_keepalive(stream: &tokio::net::TcpStream, settings: &Settings) -> std::io::Result<()> {
    if let Some(k) = settings.keepalive {
        let ka = socket2::TcpKeepalive::new()
            .with_time(k.idle)
            .with_interval(k.interval)
            .with_retries(k.count);
        socket2::SockRef::from(stream).set_tcp_keepalive(&ka)?;
    }
    Ok(())
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into the buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "tebroker".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    if name.is_empty() || name.contains(':') {
        "tebroker".into()
    } else {
        name
    }
}
