//! TLS for the listening port (rustls), with geard's three settings:
//!
//! * `ssl_cert` + `ssl_key`: the server's certificate chain and private key (PEM);
//! * `ssl_ca` (optional): CA certificates (PEM); when given, every client must present a
//!   certificate signed by one of them, and its subject common name (CN) becomes the
//!   connection's identity for ACLs.
//!
//! geard only turns TLS on with all three; tebroker also serves TLS without client certificates
//! when `ssl_ca` is left out (then no connection has an identity).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Paths of the PEM files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: Option<PathBuf>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    gearman_client::tls::read_certs(path).map_err(anyhow::Error::msg)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    gearman_client::tls::read_private_key(path).map_err(anyhow::Error::msg)
}

/// Builds the acceptor; every error names the file at fault (and never prints key material).
pub fn acceptor(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
    Ok(TlsAcceptor::from(Arc::new(server_config(files, false)?)))
}

/// The HTTPS surface's acceptor: as [`acceptor`], but a client certificate (signed by `ca`) is
/// optional — it authorizes control, and clients without one may still read — and HTTP/1.1 is
/// announced over ALPN.
pub fn http_acceptor(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
    let mut config = server_config(files, true)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// `optional_client_cert`: a client without a certificate is let in too (one with a
/// certificate that does not verify is still refused).
fn server_config(
    files: &TlsFiles,
    optional_client_cert: bool,
) -> anyhow::Result<rustls::ServerConfig> {
    let certs = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &files.ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots
                    .add(cert)
                    .with_context(|| format!("unusable CA certificate in {}", ca.display()))?;
            }
            let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.into(),
                provider(),
            );
            if optional_client_cert {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier.build().context("client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder.with_single_cert(certs, key).with_context(|| {
        format!(
            "{} and {} do not make a usable certificate and key",
            files.cert.display(),
            files.key.display()
        )
    })
}

/// The subject common name of the (already verified) client certificate, if there is one.
pub fn peer_common_name(conn: &rustls::ServerConnection) -> Option<String> {
    let cert = conn.peer_certificates()?.first()?;
    common_name(cert)
}

/// The first subject CN of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// A one-line description of the first certificate in `path` (subject, serial, expiry), for the
/// log of a reload.
pub fn describe_certificate(path: &Path) -> anyhow::Result<String> {
    let der = read_certs(path)?.remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| anyhow::anyhow!("cannot parse the certificate in {}: {e}", path.display()))?;
    Ok(format!(
        "subject {}, serial {}, valid until {}",
        cert.subject(),
        cert.raw_serial_as_string(),
        cert.validity().not_after
    ))
}
