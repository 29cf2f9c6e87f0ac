//! Settings: command-line flags (geard's spellings where geard has them) over an optional TOML
//! file holding the same settings, both read into one struct ([`ServeArgs`]).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::{Deserialize, Serialize};

/// `tebroker serve` settings, spelled once: each is a flag and a key of the `--config` TOML
/// file (same name with underscores). A flag given on the command line wins over the file.
#[derive(Debug, Args, Default, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// TCP port to listen on (0: pick a free one).
    #[arg(short = 'p', long)]
    pub port: Option<u16>,
    /// Address to listen on.
    #[arg(short = 'L', long = "listen", visible_alias = "listen-address")]
    pub listen: Option<String>,
    /// TOML file with the same settings.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Accepted for geard compatibility; tebroker always stays in the foreground.
    #[arg(short = 'd', long = "nodaemon")]
    #[serde(skip)]
    pub foreground: bool,
    /// Write the process id to this file (removed on exit).
    #[arg(long)]
    pub pidfile: Option<PathBuf>,
    /// Enable TCP keepalive on client connections.
    #[arg(long, num_args = 0, default_missing_value = "true")]
    pub keepalive: Option<bool>,
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
    /// Long before that, a connection with more than 64 KiB unsent is no longer served (no
    /// jobs for a worker) until it reads.
    #[arg(long)]
    pub max_output_buffer: Option<usize>,
    /// Seconds a connection may hold an unfinished packet before it is closed (0: forever).
    #[arg(long)]
    pub partial_packet_timeout: Option<u64>,
    /// Seconds `shutdown graceful` waits for running jobs before closing every connection.
    #[arg(long)]
    pub shutdown_timeout: Option<u64>,
    /// Listen backlog.
    #[arg(long)]
    pub backlog: Option<u32>,
    /// Host part of job handles (`H:<host>:<n>`); defaults to the machine's host name.
    #[arg(long)]
    pub handle_host: Option<String>,
    /// Serve the dashboard, JSON API and Prometheus metrics over HTTP on this address
    /// (e.g. 127.0.0.1:8080). Reading is open: bind it to a trusted network.
    #[arg(long)]
    pub http: Option<String>,
    /// Certificate (PEM) for --http; with --http-tls-key the surface speaks HTTPS only.
    #[arg(long, value_name = "PATH")]
    pub http_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --http-tls-cert.
    #[arg(long, value_name = "PATH")]
    pub http_tls_key: Option<PathBuf>,
    /// CA certificates (PEM): an HTTPS client presenting a certificate signed by one of them
    /// may POST control without a token. Clients without one still connect (reading stays
    /// open; control then needs the token).
    #[arg(long, value_name = "PATH")]
    pub http_client_ca: Option<PathBuf>,
    /// Append every ended lease to this file as a JSON line (an export; the store keeps the
    /// history the API queries).
    #[arg(long)]
    pub history_file: Option<PathBuf>,
    /// Keep history, waits and TE states in SQLite in DIR (`DIR/tebroker.sqlite3`). Default:
    /// /var/lib/tebroker when that directory exists and is writable, else
    /// $XDG_STATE_HOME/tebroker (~/.local/state/tebroker).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["database", "no_store"])]
    pub data_dir: Option<PathBuf>,
    /// Keep them in PostgreSQL instead (postgresql://USER:PASS@HOST:PORT/DB or `host=... dbname=...`),
    /// shared by every broker given the same database.
    #[arg(long, value_name = "URL", conflicts_with = "no_store")]
    pub database: Option<String>,
    /// Keep no durable history (the API's history then answers 503).
    #[arg(long, num_args = 0, default_missing_value = "true")]
    pub no_store: Option<bool>,
    /// Days of history the store keeps (at least 1); older leases, waits and state changes are
    /// purged at start and hourly.
    #[arg(long, value_name = "DAYS")]
    pub history_days: Option<u32>,
    /// File holding the bearer token that POST /api/v1/envs/{name}/{op} requires (or a client
    /// certificate, see --http-client-ca). Without either, control over HTTP is refused.
    #[arg(long, value_name = "PATH")]
    pub api_token_file: Option<PathBuf>,
    /// Default limit of queued jobs per function and priority (0: unlimited); the `maxqueue`
    /// admin command overrides it per function.
    #[arg(long)]
    pub max_queue: Option<i64>,
    /// Server certificate (PEM); with --ssl-key, the port speaks TLS only. Re-read on SIGHUP.
    #[arg(long, value_name = "PATH")]
    pub ssl_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, value_name = "PATH")]
    pub ssl_key: Option<PathBuf>,
    /// CA certificates (PEM): clients must present a certificate signed by one of them; its
    /// subject common name is the identity ACLs apply to.
    #[arg(long, value_name = "PATH")]
    pub ssl_ca: Option<PathBuf>,
    /// geard's ACL file (INI: one [common-name] section with register/invoke/grant). Re-read
    /// on SIGHUP.
    #[arg(long, value_name = "PATH")]
    pub acl: Option<PathBuf>,
    /// Let any connection register a `callback_*` function another connection holds (geard's
    /// behaviour; by default tebroker refuses such a registration). In the file:
    /// `callback_protection = false`.
    #[arg(
        long = "no-callback-protection",
        num_args = 0,
        default_missing_value = "false",
        value_name = "BOOL"
    )]
    pub callback_protection: Option<bool>,
}

impl ServeArgs {
    /// These settings over `base`: every setting given here wins.
    pub fn over(&self, base: &ServeArgs) -> anyhow::Result<ServeArgs> {
        let mut merged = serde_json::to_value(base)?;
        let (Some(into), serde_json::Value::Object(given)) =
            (merged.as_object_mut(), serde_json::to_value(self)?)
        else {
            anyhow::bail!("settings do not serialize to a table");
        };
        for (key, value) in given {
            if !value.is_null() {
                into.insert(key, value);
            }
        }
        let mut out: ServeArgs = serde_json::from_value(merged)?;
        out.config = self.config.clone().or_else(|| base.config.clone());
        out.foreground = self.foreground || base.foreground;
        Ok(out)
    }
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
    /// How long `shutdown graceful` waits for running jobs.
    pub shutdown_timeout: Duration,
    pub backlog: u32,
    pub handle_host: String,
    pub http: Option<String>,
    /// HTTPS for `http` (`ca`: the client CA whose certificates may control).
    pub http_tls: Option<crate::tls::TlsFiles>,
    pub history_file: Option<PathBuf>,
    /// Where history, waits and TE states are kept; `None`: `--no-store`.
    pub store: Option<tebroker_store::Database>,
    pub history_days: u32,
    pub api_token_file: Option<PathBuf>,
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
            shutdown_timeout: Duration::from_secs(60),
            backlog: 4096,
            handle_host: host_name(),
            http: None,
            http_tls: None,
            history_file: None,
            store: None,
            history_days: DEFAULT_HISTORY_DAYS,
            api_token_file: None,
            max_queue: 0,
            tls: None,
            acl: None,
            callback_protection: true,
        }
    }
}

/// `--history-days` when not given.
pub const DEFAULT_HISTORY_DAYS: u32 = 30;

/// Enough for any worker (a testenv-client registers one function), small enough that one
/// connection cannot grow the function table without bound.
pub const DEFAULT_MAX_FUNCTIONS_PER_CONN: usize = 16384;

impl Settings {
    /// The flags over the `--config` file over the defaults.
    pub fn resolve(args: &ServeArgs) -> anyhow::Result<Settings> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                toml::from_str::<ServeArgs>(&text)
                    .with_context(|| format!("invalid config file {}", path.display()))?
            }
            None => ServeArgs::default(),
        };
        Settings::from_args(args.over(&file)?)
    }

    fn from_args(a: ServeArgs) -> anyhow::Result<Settings> {
        let d = Settings::default();
        let keepalive = a.keepalive.unwrap_or(false).then(|| Keepalive {
            idle: Duration::from_secs(a.keepalive_idle.unwrap_or(7200)),
            interval: Duration::from_secs(a.keepalive_interval.unwrap_or(75)),
            count: a.keepalive_count.unwrap_or(9),
        });
        let secs =
            |s: Option<u64>, default: Duration| s.map(Duration::from_secs).unwrap_or(default);
        Ok(Settings {
            port: a.port.unwrap_or(d.port),
            listen: a.listen.unwrap_or(d.listen),
            pidfile: a.pidfile,
            keepalive,
            max_frame: a.max_frame.unwrap_or(d.max_frame),
            max_admin_line: a.max_admin_line.unwrap_or(d.max_admin_line),
            max_connections: a.max_connections.unwrap_or(d.max_connections),
            max_functions_per_conn: a.max_functions_per_conn.unwrap_or(d.max_functions_per_conn),
            max_output_buffer: a.max_output_buffer.unwrap_or(d.max_output_buffer),
            partial_packet_timeout: secs(a.partial_packet_timeout, d.partial_packet_timeout),
            shutdown_timeout: secs(a.shutdown_timeout, d.shutdown_timeout),
            backlog: a.backlog.unwrap_or(d.backlog),
            handle_host: a.handle_host.unwrap_or(d.handle_host),
            max_queue: a.max_queue.unwrap_or(d.max_queue),
            http_tls: http_tls_files(
                a.http.is_some(),
                a.http_tls_cert,
                a.http_tls_key,
                a.http_client_ca,
            )?,
            http: a.http,
            history_file: a.history_file,
            store: store_database(a.no_store.unwrap_or(false), a.data_dir, a.database)?,
            history_days: history_days(a.history_days)?,
            api_token_file: a.api_token_file,
            tls: tls_files(a.ssl_cert, a.ssl_key, a.ssl_ca)?,
            acl: a.acl,
            callback_protection: a.callback_protection.unwrap_or(d.callback_protection),
        })
    }
}

/// `--history-days`: 0 would purge every lease as soon as it is written (the cutoff is now).
fn history_days(days: Option<u32>) -> anyhow::Result<u32> {
    match days {
        Some(0) => anyhow::bail!(
            "--history-days (history_days) must be at least 1: 0 would purge the whole history"
        ),
        Some(d) => Ok(d),
        None => Ok(DEFAULT_HISTORY_DAYS),
    }
}

fn store_database(
    no_store: bool,
    data_dir: Option<PathBuf>,
    database: Option<String>,
) -> anyhow::Result<Option<tebroker_store::Database>> {
    if no_store {
        anyhow::ensure!(
            data_dir.is_none() && database.is_none(),
            "--no-store cannot be combined with --data-dir or --database"
        );
        return Ok(None);
    }
    Ok(Some(match (data_dir, database) {
        (Some(_), Some(_)) => anyhow::bail!("give --data-dir or --database, not both"),
        (_, Some(url)) => tebroker_store::Database::postgres(&url)?,
        (Some(dir), None) => tebroker_store::Database::Sqlite { dir },
        (None, None) => tebroker_store::Database::Sqlite {
            dir: default_data_dir(),
        },
    }))
}

/// /var/lib/tebroker when it exists and this user may write there (a packaged install),
/// else the XDG state directory.
pub fn default_data_dir() -> PathBuf {
    let system = PathBuf::from("/var/lib/tebroker");
    if writable_dir(&system) {
        return system;
    }
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(std::env::temp_dir);
    state.join("tebroker")
}

fn writable_dir(dir: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access() reads the NUL-terminated path we own.
    dir.is_dir() && unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0
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

fn http_tls_files(
    http: bool,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
) -> anyhow::Result<Option<crate::tls::TlsFiles>> {
    let files = match (cert, key, ca) {
        (None, None, None) => return Ok(None),
        (Some(cert), Some(key), ca) => crate::tls::TlsFiles { cert, key, ca },
        (None, None, Some(_)) => {
            anyhow::bail!("--http-client-ca needs HTTPS: give --http-tls-cert and --http-tls-key")
        }
        _ => anyhow::bail!("HTTPS needs both --http-tls-cert and --http-tls-key"),
    };
    anyhow::ensure!(http, "--http-tls-cert/--http-tls-key need --http ADDR");
    Ok(Some(files))
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn flags(args: &[&str]) -> ServeArgs {
        Cli::try_parse_from(std::iter::once("serve").chain(args.iter().copied()))
            .unwrap()
            .serve
    }

    fn file(text: &str) -> ServeArgs {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn a_flag_wins_over_the_file_and_the_file_over_the_default() {
        let file = file(
            "port = 5000\nmax_queue = 7\nkeepalive = true\nkeepalive_idle = 30\n\
             callback_protection = false\nshutdown_timeout = 5\n",
        );
        let args = flags(&["-p", "6000", "--keepalive-idle", "40"]);
        let s = Settings::from_args(args.over(&file).unwrap()).unwrap();
        assert_eq!(s.port, 6000, "flag over file");
        assert_eq!(s.max_queue, 7, "file over default");
        let k = s.keepalive.expect("keepalive from the file");
        assert_eq!(k.idle, Duration::from_secs(40), "flag over file");
        assert_eq!(k.interval, Duration::from_secs(75), "default");
        assert!(!s.callback_protection, "file turns it off");
        assert_eq!(s.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(s.max_frame, gearman_proto::DEFAULT_MAX_FRAME, "default");
    }

    #[test]
    fn boolean_flags_set_only_when_given() {
        assert_eq!(flags(&[]).keepalive, None);
        assert_eq!(flags(&["--keepalive"]).keepalive, Some(true));
        assert_eq!(flags(&[]).callback_protection, None);
        assert_eq!(
            flags(&["--no-callback-protection"]).callback_protection,
            Some(false)
        );
        // The flag turns protection off even where the file turns it on.
        let s = Settings::from_args(
            flags(&["--no-callback-protection"])
                .over(&file("callback_protection = true"))
                .unwrap(),
        )
        .unwrap();
        assert!(!s.callback_protection);
        assert!(
            Settings::from_args(ServeArgs::default())
                .unwrap()
                .callback_protection
        );
    }

    #[test]
    fn the_store_is_sqlite_by_default_postgres_on_request_and_none_with_no_store() {
        let s = Settings::from_args(flags(&["--data-dir", "/tmp/x"])).unwrap();
        assert_eq!(
            s.store,
            Some(tebroker_store::Database::Sqlite {
                dir: "/tmp/x".into()
            })
        );
        let s = Settings::from_args(flags(&[])).unwrap();
        assert!(matches!(
            s.store,
            Some(tebroker_store::Database::Sqlite { .. })
        ));
        assert_eq!(s.history_days, 30);
        let s = Settings::from_args(flags(&["--no-store"])).unwrap();
        assert_eq!(s.store, None);
        let s = Settings::from_args(flags(&["--database", "postgresql://u:p@h:5/db"])).unwrap();
        assert!(matches!(
            s.store,
            Some(tebroker_store::Database::Postgres { .. })
        ));
        let bad = Settings::from_args(flags(&["--database", "postgresql://h:nope/db"]));
        assert!(bad.is_err());
        let both = file("data_dir = \"/a\"\nno_store = true\n");
        assert!(Settings::from_args(both).is_err());
    }

    #[test]
    fn the_file_rejects_unknown_and_flag_only_keys() {
        assert!(toml::from_str::<ServeArgs>("prot = 1").is_err());
        assert!(toml::from_str::<ServeArgs>("config = \"x.toml\"").is_err());
    }
}
