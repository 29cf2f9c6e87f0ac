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

use anyhow::{bail, Context};
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
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("invalid PEM in {}", path.display()))?;
    if certs.is_empty() {
        bail!("no certificate found in {}", path.display());
    }
    Ok(certs)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    rustls_pemfile::private_key(&mut &pem[..])
        .with_context(|| format!("invalid PEM in {}", path.display()))?
        .with_context(|| format!("no private key found in {}", path.display()))
}

/// Builds the acceptor; every error names the file at fault (and never prints key material).
pub fn acceptor(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
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
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.into(),
                provider(),
            )
            .build()
            .context("client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(certs, key).with_context(|| {
        format!(
            "{} and {} do not make a usable certificate and key",
            files.cert.display(),
            files.key.display()
        )
    })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
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
