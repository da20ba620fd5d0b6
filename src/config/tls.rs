//! TLS for the public listener (rustls): certificate and key loading, ALPN.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// Why the certificate or key cannot be used. Each names its file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} holds no PEM certificate ({reason})", path.display())]
    NoCertificate { path: PathBuf, reason: String },
    #[error("{} holds no PEM private key ({reason})", path.display())]
    NoKey { path: PathBuf, reason: String },
    #[error("{} and {} do not make a usable pair: {reason}", cert.display(), key.display())]
    Rejected {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

impl TlsError {
    /// The config key to blame.
    pub fn key(&self) -> &'static str {
        match self {
            TlsError::Unreadable { key, .. } => key,
            TlsError::NoCertificate { .. } => "tls.cert",
            TlsError::NoKey { .. } | TlsError::Rejected { .. } => "tls.key",
        }
    }

    pub fn fix(&self) -> &'static str {
        match self {
            TlsError::Unreadable { .. } => "check the path and that pushgate's user may read it",
            TlsError::NoCertificate { .. } => {
                "give a PEM file with `-----BEGIN CERTIFICATE-----` blocks, leaf first"
            }
            TlsError::NoKey { .. } => {
                "give a PEM file with the private key (PKCS#8, PKCS#1 or SEC1)"
            }
            TlsError::Rejected { .. } => "give the private key that belongs to the certificate",
        }
    }
}

/// Builds the rustls server config: the certificate chain and key from PEM
/// files, ALPN offering HTTP/2 first, then HTTP/1.1.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let read = |config_key, path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Unreadable {
            key: config_key,
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read("tls.cert", cert)?;
    let key_pem = read("tls.key", key)?;

    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError::NoCertificate {
            path: cert.to_owned(),
            reason: err.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_owned(),
            reason: "no certificate block found".into(),
        });
    }
    let private_key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|err| TlsError::NoKey {
        path: key.to_owned(),
        reason: err.to_string(),
    })?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| {
            builder
                .with_no_client_auth()
                .with_single_cert(chain, private_key)
        })
        .map_err(|err| TlsError::Rejected {
            cert: cert.to_owned(),
            key: key.to_owned(),
            reason: err.to_string(),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
