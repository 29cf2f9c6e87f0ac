//! TLS for client and worker connections (rustls), configured per server as gear's
//! `addServer(host, port, ssl_key, ssl_cert, ssl_ca)`.
//!
//! `ssl_ca` is required (the server certificate must chain to it, and must name the host we
//! connect to); `ssl_cert` + `ssl_key` are the client certificate, needed when the server
//! requires one (tebroker or geard with `--ssl-ca`).
//!
//! [`read_certs`] and [`read_private_key`] are public so that servers load their PEM files the
//! same way.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

use crate::addr::{ServerAddr, TlsConfig};
use crate::error::{Error, Result};

fn config_err(server: &ServerAddr, reason: impl Into<String>) -> Error {
    Error::TlsConfig {
        server: server.to_string(),
        reason: reason.into(),
    }
}

/// The certificates of a PEM file (at least one), with a message naming the file on failure.
pub fn read_certs(path: &Path) -> std::result::Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| format!("invalid PEM in {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", path.display()));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn read_private_key(path: &Path) -> std::result::Result<PrivateKeyDer<'static>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| format!("invalid PEM in {}: {e}", path.display()))?
        .ok_or_else(|| format!("no private key in {}", path.display()))
}

fn certs(server: &ServerAddr, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    read_certs(path).map_err(|reason| config_err(server, reason))
}

/// The rustls client configuration for `tls` (read from disk on each connect, so renewed
/// certificates are picked up by reconnects).
pub(crate) fn client_config(
    server: &ServerAddr,
    tls: &TlsConfig,
) -> Result<Arc<rustls::ClientConfig>> {
    let ca = tls
        .ssl_ca
        .as_deref()
        .ok_or_else(|| config_err(server, "ssl_ca is required for TLS"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(server, ca)? {
        roots.add(cert).map_err(|e| {
            config_err(
                server,
                format!("unusable CA certificate in {}: {e}", ca.display()),
            )
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| config_err(server, e.to_string()))?
        .with_root_certificates(roots);
    let config = match (&tls.ssl_cert, &tls.ssl_key) {
        (Some(cert), Some(key)) => {
            let chain = certs(server, cert)?;
            let key = read_private_key(key).map_err(|reason| config_err(server, reason))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| config_err(server, format!("client certificate and key: {e}")))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(config_err(server, "ssl_cert and ssl_key go together")),
    };
    Ok(Arc::new(config))
}

/// Wraps a connected TCP stream in TLS (also used by `tebroker`'s HTTPS client).
pub async fn handshake(
    server: &ServerAddr,
    tls: &TlsConfig,
    stream: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let config = client_config(server, tls)?;
    let name = ServerName::try_from(server.host.clone())
        .map_err(|e| config_err(server, format!("bad server name: {e}")))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|source| Error::Connect {
            server: server.to_string(),
            source,
        })
}
