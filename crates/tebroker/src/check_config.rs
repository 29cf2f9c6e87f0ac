//! `tebroker check-config FILE`: everything `tebroker serve --config FILE` would refuse at
//! start-up, found without binding a port, and the settings it would run with, printed as a
//! complete config file (every default spelled out).

use std::net::ToSocketAddrs;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::config::{ServeArgs, Settings};

#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The TOML config file to check (as given to `tebroker serve --config`).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// Checks the file, prints the effective settings (stdout) or the first problem (stderr);
/// returns the exit status: 0 valid, 1 not.
pub fn run(args: &CheckConfigArgs) -> i32 {
    match check(&args.file) {
        Ok(text) => {
            print!("# effective settings of {}\n{text}", args.file.display());
            0
        }
        Err(e) => {
            eprintln!("tebroker check-config: {:#}", e);
            1
        }
    }
}

/// The effective settings as TOML, or what is wrong with the file or the files it names.
pub fn check(file: &std::path::Path) -> anyhow::Result<String> {
    let settings = Settings::resolve(&ServeArgs {
        config: Some(file.to_path_buf()),
        ..ServeArgs::default()
    })?;
    check_files(&settings)?;
    check_addresses(&settings)?;
    let text = toml::to_string(&effective(&settings)).context("cannot print the settings")?;
    Ok(text)
}

/// The files are read and parsed as `serve` reads them at start-up (and on SIGHUP).
fn check_files(settings: &Settings) -> anyhow::Result<()> {
    if let Some(tls) = &settings.tls {
        crate::tls::acceptor(tls).context("TLS files")?;
    }
    if let Some(tls) = &settings.http_tls {
        crate::tls::http_acceptor(tls).context("HTTPS files (--http-tls-*)")?;
    }
    if let Some(acl) = &settings.acl {
        crate::reload::read_acl(acl)?;
    }
    Ok(())
}

fn check_addresses(settings: &Settings) -> anyhow::Result<()> {
    let listen = (settings.listen.as_str(), settings.port);
    listen
        .to_socket_addrs()
        .with_context(|| format!("listen = {:?} is not an address", settings.listen))?;
    if let Some(http) = &settings.http {
        http.to_socket_addrs()
            .with_context(|| format!("http = {http:?} is not an address HOST:PORT"))?;
    }
    Ok(())
}

/// Every setting back in config-file form. Destructured field by field so that a new setting
/// does not compile until it is printed here too.
fn effective(settings: &Settings) -> ServeArgs {
    let Settings {
        port,
        listen,
        pidfile,
        keepalive,
        max_frame,
        max_admin_line,
        max_connections,
        max_functions_per_conn,
        max_output_buffer,
        partial_packet_timeout,
        shutdown_timeout,
        backlog,
        handle_host,
        http,
        http_tls,
        history_file,
        max_queue,
        tls,
        acl,
        callback_protection,
        store,
        history_days,
        api_token_file,
    } = settings.clone();
    // A PostgreSQL address is shown as its passwordless description, never as given.
    let (data_dir, database) = match &store {
        Some(tebroker_store::Database::Sqlite { dir }) => (Some(dir.clone()), None),
        Some(db) => (None, Some(db.to_string())),
        None => (None, None),
    };
    ServeArgs {
        port: Some(port),
        listen: Some(listen),
        config: None,
        foreground: false,
        pidfile,
        keepalive: Some(keepalive.is_some()),
        keepalive_idle: keepalive.map(|k| k.idle.as_secs()),
        keepalive_interval: keepalive.map(|k| k.interval.as_secs()),
        keepalive_count: keepalive.map(|k| k.count),
        max_frame: Some(max_frame),
        max_admin_line: Some(max_admin_line),
        max_connections: Some(max_connections),
        max_functions_per_conn: Some(max_functions_per_conn),
        max_output_buffer: Some(max_output_buffer),
        partial_packet_timeout: Some(partial_packet_timeout.as_secs()),
        shutdown_timeout: Some(shutdown_timeout.as_secs()),
        backlog: Some(backlog),
        handle_host: Some(handle_host),
        http,
        http_tls_cert: http_tls.as_ref().map(|t| t.cert.clone()),
        http_tls_key: http_tls.as_ref().map(|t| t.key.clone()),
        http_client_ca: http_tls.and_then(|t| t.ca),
        history_file,
        max_queue: Some(max_queue),
        ssl_cert: tls.as_ref().map(|t| t.cert.clone()),
        ssl_key: tls.as_ref().map(|t| t.key.clone()),
        ssl_ca: tls.and_then(|t| t.ca),
        acl,
        callback_protection: Some(callback_protection),
        data_dir,
        database,
        no_store: Some(store.is_none()),
        history_days: Some(history_days),
        api_token_file,
    }
}
