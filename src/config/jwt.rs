//! `auth.jwt`: the verification key and where it comes from, loaded once.

use std::sync::Arc;

use http::Uri;
use jsonwebtoken::{Algorithm, DecodingKey};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::{JwtAlgorithm, JwtConfig};

/// Why the JWT settings cannot be used.
#[derive(Debug)]
pub struct KeyProblem {
    pub key: &'static str,
    pub why: String,
    pub fix: String,
}

/// The key of `auth.mode: jwt`: the one algorithm tokens must use, and
/// where the key that verifies them comes from.
#[derive(Clone)]
pub struct JwtKey {
    pub algorithm: Algorithm,
    pub source: KeySource,
}

/// Where the verification key comes from.
#[derive(Clone)]
pub enum KeySource {
    /// `secret`, `secret_file` or `public_key_file`.
    Fixed(DecodingKey),
    /// `jwks_url`: a document of keys, fetched over this TLS client
    /// configuration (the system's roots and `jwks_ca_file`'s).
    Jwks {
        url: Uri,
        tls: Arc<rustls::ClientConfig>,
    },
}

impl JwtKey {
    /// Loads the key the algorithm needs. Only the configured algorithm is
    /// accepted, which refuses `alg: none` and key-type confusion (an RS256
    /// public key used as an HS256 secret).
    pub fn load(config: &JwtConfig) -> Result<JwtKey, KeyProblem> {
        use jsonwebtoken::{Algorithm, DecodingKey};
        let read = |key: &'static str, path: &std::path::Path| {
            std::fs::read(path).map_err(|err| KeyProblem {
                key,
                why: format!("cannot read {}: {err}", path.display()),
                fix: "check the path and that pushgate's user may read it".into(),
            })
        };
        for (key, value) in [
            ("auth.jwt.audience", &config.audience),
            ("auth.jwt.issuer", &config.issuer),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(KeyProblem {
                    key,
                    why: "is empty, which no token's claim can match".into(),
                    fix: "give the value tokens carry, or null to not check the claim".into(),
                });
            }
        }
        let (algorithm, key) = match config.algorithm {
            JwtAlgorithm::HS256 => {
                if config.jwks_url.is_some() {
                    return Err(KeyProblem {
                        key: "auth.jwt.jwks_url",
                        why: "HS256 uses a shared secret, which no JWKS document publishes".into(),
                        fix: "use RS256 or ES256 with jwks_url, or drop jwks_url".into(),
                    });
                }
                let secret = match (&config.secret, &config.secret_file) {
                    (Some(secret), None) => secret.as_bytes().to_vec(),
                    (None, Some(path)) => read("auth.jwt.secret_file", path)?,
                    _ => return Err(KeyProblem {
                        key: "auth.jwt.secret",
                        why: "HS256 needs exactly one of secret and secret_file".into(),
                        fix: "set auth.jwt.secret (e.g. PUSHGATE_AUTH__JWT__SECRET) or secret_file"
                            .into(),
                    }),
                };
                if secret.len() < 32 {
                    return Err(KeyProblem {
                        key: "auth.jwt.secret",
                        why: format!("an HS256 secret of {} bytes is guessable", secret.len()),
                        fix: "use at least 32 random bytes, e.g. `openssl rand -hex 32`".into(),
                    });
                }
                (Algorithm::HS256, DecodingKey::from_secret(&secret))
            }
            JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => {
                let algorithm = if config.algorithm == JwtAlgorithm::RS256 {
                    Algorithm::RS256
                } else {
                    Algorithm::ES256
                };
                if let Some(url) = &config.jwks_url {
                    if config.public_key_file.is_some() {
                        return Err(KeyProblem {
                            key: "auth.jwt.jwks_url",
                            why: "both public_key_file and jwks_url are set".into(),
                            fix: "keep one source of keys".into(),
                        });
                    }
                    let jwks = jwks_source(config, url).map_err(|why| KeyProblem {
                        key: "auth.jwt.jwks_url",
                        why,
                        fix: "give the identity provider's https:// JWKS address (and \
                              auth.jwt.jwks_ca_file for a private CA)"
                            .into(),
                    })?;
                    return Ok(JwtKey {
                        algorithm,
                        source: jwks,
                    });
                }
                let Some(path) = &config.public_key_file else {
                    return Err(KeyProblem {
                        key: "auth.jwt.public_key_file",
                        why: "RS256 and ES256 need the public key".into(),
                        fix: "point auth.jwt.public_key_file at a PEM public key, or set \
                              auth.jwt.jwks_url"
                            .into(),
                    });
                };
                let pem = read("auth.jwt.public_key_file", path)?;
                let parsed = if config.algorithm == JwtAlgorithm::RS256 {
                    DecodingKey::from_rsa_pem(&pem)
                } else {
                    DecodingKey::from_ec_pem(&pem)
                };
                let key = parsed.map_err(|err| KeyProblem {
                    key: "auth.jwt.public_key_file",
                    why: format!(
                        "{} is not a {:?} public key: {err}",
                        path.display(),
                        config.algorithm
                    ),
                    fix: "give the PEM public key that matches auth.jwt.algorithm".into(),
                })?;
                (algorithm, key)
            }
        };
        Ok(JwtKey {
            algorithm,
            source: KeySource::Fixed(key),
        })
    }
}

/// `jwks_url` and the TLS configuration to fetch it with.
fn jwks_source(config: &JwtConfig, url: &str) -> Result<KeySource, String> {
    let url = jwks_url(url)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = &config.jwks_ca_file {
        for cert in read_ca_file(path)? {
            roots
                .add(cert)
                .map_err(|err| format!("{}: {err}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| err.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(KeySource::Jwks {
        url,
        tls: Arc::new(tls),
    })
}

/// Checks `auth.jwt.jwks_url`: https, or http on a loopback host.
fn jwks_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url
        .parse()
        .map_err(|err| format!("`{url}` is not a URL: {err}"))?;
    let host = uri.host().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match uri.scheme_str() {
        Some("https") if !host.is_empty() => Ok(uri),
        Some("http") if loopback => Ok(uri),
        Some("http") => Err(format!(
            "`{url}` is plain http to a host that is not loopback: keys must come over https"
        )),
        _ => Err(format!("`{url}` is not an https:// URL")),
    }
}

/// The extra roots of `auth.jwt.jwks_ca_file`.
fn read_ca_file(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem =
        std::fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|err| format!("{} is not PEM: {err}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}
