//! JWT verification keys from a JWKS document (`auth.jwt.jwks_url`).
//!
//! The document is fetched over HTTPS (rustls; the system's roots plus
//! `auth.jwt.jwks_ca_file`) at start and every `auth.jwt.jwks_refresh`. A
//! token names its key with `kid`; a `kid` the set does not hold fetches the
//! document again, at most every `auth.jwt.jwks_min_refetch`, so a flood of
//! tokens with made-up kids costs the JWKS server one request per interval.
//! Only keys that fit `auth.jwt.algorithm` are kept (RSA for RS256, P-256 for
//! ES256; `use`, when given, must be `sig`): key-type confusion stays
//! impossible. The last good set is kept when a refresh fails.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::DecodingKey;

use crate::config::{JwtAlgorithm, JwtConfig};

/// Largest JWKS document read.
const MAX_DOCUMENT: usize = 1 << 20;
/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// What a token's key lookup found.
pub enum Lookup {
    Found(DecodingKey),
    /// The set holds no such key.
    Unknown,
    /// No set was ever fetched: nothing can be verified yet.
    Unavailable,
}

/// The keys of one JWKS document, and how to fetch it again.
pub struct Jwks {
    url: Uri,
    algorithm: JwtAlgorithm,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    refresh: Duration,
    min_refetch: Duration,
    /// `None` until the first fetch succeeded.
    keys: RwLock<Option<Arc<KeySet>>>,
    /// When the document was last asked for (successfully or not).
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, DecodingKey>,
    /// Keys without a `kid`; a token without one may use the set's only key.
    all: Vec<DecodingKey>,
}

impl Jwks {
    /// The client for `url` over `tls` (from the loaded settings);
    /// fetches nothing yet.
    pub fn new(config: &JwtConfig, url: Uri, tls: Arc<rustls::ClientConfig>) -> Jwks {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(Arc::unwrap_or_clone(tls))
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .build(https);
        Jwks {
            url,
            algorithm: config.algorithm,
            client,
            refresh: config.jwks_refresh,
            min_refetch: config.jwks_min_refetch,
            keys: RwLock::new(None),
            last_fetch: tokio::sync::Mutex::new(None),
        }
    }

    /// Fetches now and then every `jwks_refresh`, while the keys are in use.
    pub fn start(self: &Arc<Self>) {
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(refresh(Arc::downgrade(self)));
        }
    }

    /// The key for a token whose header names `kid`.
    pub fn find(&self, kid: Option<&str>) -> Lookup {
        let keys = self.keys.read().expect("jwks lock");
        let Some(set) = keys.as_ref() else {
            return Lookup::Unavailable;
        };
        let found = match kid {
            Some(kid) => set.by_kid.get(kid).cloned(),
            None if set.all.len() == 1 => set.all.first().cloned(),
            None => None,
        };
        found.map_or(Lookup::Unknown, Lookup::Found)
    }

    /// Fetches the document again for an unknown `kid`, unless that was
    /// done within `jwks_min_refetch`. Concurrent callers share one fetch.
    pub async fn refetch(&self) {
        let mut last = self.last_fetch.lock().await;
        if last.is_some_and(|at| at.elapsed() < self.min_refetch) {
            return;
        }
        *last = Some(Instant::now());
        self.fetch_and_keep().await;
    }

    async fn fetch_and_keep(&self) {
        match self.fetch().await {
            Ok(set) => {
                tracing::debug!(keys = set.all.len(), url = %self.url, "jwks: keys fetched");
                *self.keys.write().expect("jwks lock") = Some(Arc::new(set));
            }
            Err(why) => {
                tracing::warn!(url = %self.url, error = %why, "jwks: cannot fetch the signing keys; keeping the last good set");
            }
        }
    }

    async fn fetch(&self) -> Result<KeySet, String> {
        let request = http::Request::get(self.url.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|err| err.to_string())?;
        let response = tokio::time::timeout(FETCH_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| "no answer in time".to_owned())?
            .map_err(|err| crate::error::error_chain(&err))?;
        if response.status() != StatusCode::OK {
            return Err(format!("answered {}", response.status()));
        }
        let body = tokio::time::timeout(
            FETCH_TIMEOUT,
            Limited::new(response.into_body(), MAX_DOCUMENT).collect(),
        )
        .await
        .map_err(|_| "the document did not arrive in time".to_owned())?
        .map_err(|err| format!("reading the document: {err}"))?
        .to_bytes();
        let document: JwkSet =
            serde_json::from_slice(&body).map_err(|err| format!("not a JWKS document: {err}"))?;
        Ok(self.usable(&document))
    }

    /// The keys of `document` that fit the configured algorithm.
    fn usable(&self, document: &JwkSet) -> KeySet {
        let mut set = KeySet::default();
        for jwk in &document.keys {
            let fits = match (&jwk.algorithm, self.algorithm) {
                (AlgorithmParameters::RSA(_), JwtAlgorithm::RS256) => true,
                (AlgorithmParameters::EllipticCurve(ec), JwtAlgorithm::ES256) => {
                    ec.curve == EllipticCurve::P256
                }
                _ => false,
            };
            let named = jwk.common.key_algorithm.map(|alg| format!("{alg:?}"));
            let alg_ok = named.is_none_or(|alg| alg == format!("{:?}", self.algorithm));
            let use_ok = jwk
                .common
                .public_key_use
                .as_ref()
                .is_none_or(|usage| *usage == PublicKeyUse::Signature);
            if !(fits && alg_ok && use_ok) {
                continue;
            }
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            if let Some(kid) = &jwk.common.key_id {
                set.by_kid.insert(kid.clone(), key.clone());
            }
            set.all.push(key);
        }
        set
    }
}

async fn refresh(jwks: Weak<Jwks>) {
    loop {
        let Some(strong) = jwks.upgrade() else {
            return;
        };
        // Held through the fetch: a token that arrives meanwhile waits for
        // it rather than finding no keys.
        let mut last = strong.last_fetch.lock().await;
        *last = Some(Instant::now());
        strong.fetch_and_keep().await;
        drop(last);
        let every = strong.refresh;
        drop(strong);
        tokio::time::sleep(every).await;
    }
}
