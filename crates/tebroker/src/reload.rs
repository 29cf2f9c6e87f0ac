//! SIGHUP: re-read the ACL file and the TLS certificate files (of the Gearman port and of the
//! HTTP surface), log what changed, keep every connection. A file that no longer reads or
//! parses is reported and the old setting stays.

use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use broker_core::acl::Acl;
use broker_core::Security;

use crate::config::Settings;
use crate::server::Shared;

pub fn read_acl(path: &Path) -> anyhow::Result<Acl> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read ACL file {}", path.display()))?;
    Acl::parse(&text).map_err(|e| anyhow::anyhow!("invalid ACL file {}: {e}", path.display()))
}

pub fn security(settings: &Settings, acl: Option<Acl>) -> Security {
    Security {
        acl,
        callback_protection: settings.callback_protection,
        default_max_queue: (settings.max_queue > 0).then_some(settings.max_queue),
    }
}

/// What was loaded last, to tell what a reload changed.
pub struct Reloadable {
    acl_listing: Mutex<Option<String>>,
    certificate: Mutex<Option<String>>,
    http_certificate: Mutex<Option<String>>,
}

impl Reloadable {
    pub fn new(settings: &Settings, acl: Option<&Acl>) -> Reloadable {
        Reloadable {
            acl_listing: Mutex::new(acl.map(Acl::list)),
            certificate: Mutex::new(describe(settings.tls.as_ref())),
            http_certificate: Mutex::new(describe(settings.http_tls.as_ref())),
        }
    }
}

/// Re-reads the ACL and TLS files named in the settings; returns whether all of them loaded.
pub fn reload(shared: &Shared) -> bool {
    let settings = shared.settings();
    let mut ok = true;
    if let Some(path) = &settings.acl {
        match read_acl(path) {
            Ok(acl) => {
                let listing = acl.list();
                let mut last = shared
                    .reload
                    .acl_listing
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let old = last.take().unwrap_or_default();
                let added: Vec<&str> = listing
                    .lines()
                    .filter(|l| !old.lines().any(|o| o == *l))
                    .collect();
                let removed: Vec<&str> = old
                    .lines()
                    .filter(|o| !listing.lines().any(|l| l == *o))
                    .collect();
                shared.with_broker(|b| b.set_security(security(settings, Some(acl))));
                if added.is_empty() && removed.is_empty() {
                    tracing::info!(path = %path.display(), "ACL reloaded: unchanged");
                } else {
                    tracing::info!(path = %path.display(), ?added, ?removed, "ACL reloaded");
                }
                *last = Some(listing);
            }
            Err(e) => {
                ok = false;
                tracing::error!(error = %format!("{e:#}"), "ACL reload failed; keeping the ACL in force");
            }
        }
    }
    if let Some(files) = &settings.tls {
        ok &= reload_certificate(
            "TLS",
            files,
            crate::tls::acceptor,
            |a| shared.set_tls_acceptor(a),
            &shared.reload.certificate,
        );
    }
    if let Some(files) = &settings.http_tls {
        ok &= reload_certificate(
            "HTTPS",
            files,
            crate::tls::http_acceptor,
            |a| shared.set_http_tls_acceptor(a),
            &shared.reload.http_certificate,
        );
    }
    ok
}

fn describe(files: Option<&crate::tls::TlsFiles>) -> Option<String> {
    files.and_then(|t| crate::tls::describe_certificate(&t.cert).ok())
}

/// Builds a new acceptor from `files` and puts it in force with `install`, logging whether the
/// certificate changed since `last`; `what` names the port in the log. Returns whether the
/// files loaded.
fn reload_certificate(
    what: &str,
    files: &crate::tls::TlsFiles,
    build: fn(&crate::tls::TlsFiles) -> anyhow::Result<tokio_rustls::TlsAcceptor>,
    install: impl FnOnce(tokio_rustls::TlsAcceptor),
    last: &Mutex<Option<String>>,
) -> bool {
    match build(files) {
        Ok(acceptor) => {
            install(acceptor);
            let now = crate::tls::describe_certificate(&files.cert).unwrap_or_default();
            let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
            let before = last.replace(now.clone()).unwrap_or_default();
            if before == now {
                tracing::info!(certificate = %now, "{what} files reloaded: certificate unchanged");
            } else {
                tracing::info!(before = %before, now = %now, "{what} certificate reloaded; new connections use it");
            }
            true
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "{what} reload failed; keeping the certificate in force");
            false
        }
    }
}
