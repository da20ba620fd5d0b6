//! `auth.mode: jwt`: tokens verified in-process.

use super::grant::{grant_from, MAX_GRANT_SECONDS};
use super::*;

/// The verification key and rules of `auth.mode: jwt`.
pub struct JwtKeys {
    pub(super) source: KeySource,
    pub(super) validation: jsonwebtoken::Validation,
    /// Whether `auth.jwt.audience` is set, to tell a token for another
    /// audience from a token that names one where none is expected.
    pub(super) audience: bool,
}

/// Where the verification key comes from.
pub(super) enum KeySource {
    Fixed(jsonwebtoken::DecodingKey),
    /// `auth.jwt.jwks_url`: the token's `kid` picks one.
    Jwks(Arc<super::jwks::Jwks>),
}

impl JwtKeys {
    /// The runtime of the loaded key: a JWKS source gets its fetcher. Only
    /// the configured algorithm is accepted, which refuses `alg: none` and
    /// key-type confusion (an RS256 public key used as an HS256 secret).
    pub(super) fn new(key: &JwtKey, config: &JwtConfig) -> JwtKeys {
        let source = match &key.source {
            LoadedKey::Fixed(key) => KeySource::Fixed(key.clone()),
            LoadedKey::Jwks { url, tls } => KeySource::Jwks(Arc::new(super::jwks::Jwks::new(
                config,
                url.clone(),
                tls.clone(),
            ))),
        };
        let mut validation = jsonwebtoken::Validation::new(key.algorithm);
        // The same leeway for `exp` and `nbf`: clocks drift both ways.
        validation.leeway = config.leeway.as_secs();
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        // A configured audience or issuer must be in the token: the library
        // checks these claims only when they are present.
        if let Some(audience) = &config.audience {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        JwtKeys {
            source,
            validation,
            audience: config.audience.is_some(),
        }
    }

    /// The key for `token`: the fixed one, or the JWKS key its `kid` names.
    pub(super) fn key_for(&self, token: &str) -> Result<jsonwebtoken::DecodingKey, KeyMiss> {
        match &self.source {
            KeySource::Fixed(key) => Ok(key.clone()),
            KeySource::Jwks(jwks) => {
                let header = jsonwebtoken::decode_header(token).map_err(|_| KeyMiss::Malformed)?;
                match jwks.find(header.kid.as_deref()) {
                    super::jwks::Lookup::Found(key) => Ok(key),
                    super::jwks::Lookup::Unknown => Err(KeyMiss::Unknown),
                    super::jwks::Lookup::Unavailable => Err(KeyMiss::Unavailable),
                }
            }
        }
    }
}

/// A token refused, or no key to check it with.
pub(super) enum KeyMissOr {
    Miss(KeyMiss),
    Refused(Refusal),
}

impl From<Refusal> for KeyMissOr {
    fn from(err: Refusal) -> KeyMissOr {
        KeyMissOr::Refused(err)
    }
}

impl KeyMissOr {
    pub(super) fn into_api(self) -> Refusal {
        let refused = |why: &str| Refusal::new(Kind::Unauthenticated, "unauthenticated", why);
        match self {
            KeyMissOr::Refused(err) => err,
            KeyMissOr::Miss(KeyMiss::Malformed) => refused("the token is malformed"),
            KeyMissOr::Miss(KeyMiss::Unknown) => {
                refused("the token's key (`kid`) is not among the signing keys")
            }
            // Never a pass: try again once the keys can be fetched.
            KeyMissOr::Miss(KeyMiss::Unavailable) => Refusal::new(
                Kind::Unavailable,
                "auth_unavailable",
                "the signing keys could not be fetched; try again later",
            ),
        }
    }
}

/// Why no key was found for a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyMiss {
    Malformed,
    /// Not in the key set (after fetching it again, when allowed).
    Unknown,
    /// The key set could not be fetched yet.
    Unavailable,
}

/// `auth.mode: jwt`.
pub(super) struct JwtAuth {
    pub(super) keys: JwtKeys,
    pub(super) cookie: Option<String>,
    pub(super) query_param: String,
    pub(super) stats: Mutex<AuthStats>,
}

/// The claims pushgate reads, as loose JSON: a claim of the wrong type is
/// refused with its name ([`JwtAuth::verify`]), never as "malformed".
#[derive(Deserialize)]
pub(super) struct Claims {
    #[serde(default)]
    pub(super) sub: Option<serde_json::Value>,
    #[serde(default)]
    pub(super) exp: Option<serde_json::Value>,
    #[serde(default)]
    pub(super) nbf: Option<serde_json::Value>,
    #[serde(default)]
    pub(super) channels: Option<serde_json::Value>,
    #[serde(default)]
    pub(super) info: Option<Box<serde_json::value::RawValue>>,
}

/// A NumericDate (RFC 7519): seconds since the epoch, possibly fractional.
pub(super) fn numeric_date(value: &serde_json::Value) -> Option<u64> {
    value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
            .map(|seconds| seconds as u64)
    })
}

/// Refuses a token whose header lists critical extensions (`crit`, RFC
/// 7515 §4.1.11): the recipient must understand every one of them or refuse
/// the token, and pushgate implements none. The header is read here
/// because the JWT library ignores header fields it does not know.
pub(super) fn check_header(token: &str) -> Result<(), String> {
    use base64::Engine;
    let malformed = || "the token is malformed: its header is not base64url JSON".to_owned();
    let (header, _) = token.split_once('.').ok_or_else(malformed)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| malformed())?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(|_| malformed())?;
    if header.contains_key("crit") {
        return Err(
            "the token has a critical header extension pushgate does not support (crit)".into(),
        );
    }
    Ok(())
}

impl JwtAuth {
    pub(super) fn new(key: &JwtKey, config: &JwtConfig) -> JwtAuth {
        let keys = JwtKeys::new(key, config);
        if let KeySource::Jwks(jwks) = &keys.source {
            jwks.start();
        }
        JwtAuth {
            keys,
            cookie: config.cookie.clone(),
            query_param: config.query_param.clone(),
            stats: Mutex::default(),
        }
    }

    pub(super) async fn authorize(&self, request: &AuthRequest<'_>) -> Result<Grant, Refusal> {
        let outcome = match self.token(request) {
            None => Err(Refusal::new(
                Kind::Unauthenticated,
                "unauthenticated",
                "no token: send Authorization: Bearer, the token cookie or ?token=",
            )),
            Some(token) => match self.verify(&token) {
                // A key the set does not hold (yet): maybe the provider
                // rotated its keys. Fetch the set again (rate-limited).
                Err(KeyMissOr::Miss(KeyMiss::Unknown | KeyMiss::Unavailable)) => {
                    if let KeySource::Jwks(jwks) = &self.keys.source {
                        jwks.refetch().await;
                    }
                    self.verify(&token).map_err(KeyMissOr::into_api)
                }
                other => other.map_err(KeyMissOr::into_api),
            },
        };
        let mut stats = self.stats.lock().expect("auth stats lock");
        match &outcome {
            Ok(_) => stats.allowed += 1,
            Err(err) if err.kind == Kind::Unavailable => stats.unavailable += 1,
            Err(_) => stats.unauthenticated += 1,
        }
        outcome
    }

    /// The token from `Authorization: Bearer`, the configured cookie, or the
    /// query parameter, in that order.
    pub(super) fn token(&self, request: &AuthRequest<'_>) -> Option<String> {
        let headers = request.headers;
        if let Some(token) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim().to_owned())
        {
            return Some(token);
        }
        if let Some(name) = &self.cookie {
            let found = headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|pair| pair.trim().split_once('='))
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.to_owned());
            if found.is_some() {
                return found;
            }
        }
        form_urlencoded::parse(request.query.as_bytes())
            .find(|(key, _)| key == self.query_param.as_str())
            .map(|(_, value)| value.into_owned())
    }

    /// The grant a token carries, or why it is refused. Every refusal of a
    /// well-formed token names the claim or header that failed, in
    /// parentheses; "malformed" is only for a token that is not three
    /// base64url parts of JSON.
    pub(super) fn verify(&self, token: &str) -> Result<Grant, KeyMissOr> {
        use jsonwebtoken::errors::ErrorKind;
        let refused = |why: &str| Refusal::new(Kind::Unauthenticated, "unauthenticated", why);
        check_header(token).map_err(|why| refused(&why))?;
        let key = self.keys.key_for(token).map_err(KeyMissOr::Miss)?;
        let data =
            jsonwebtoken::decode::<Claims>(token, &key, &self.keys.validation).map_err(|err| {
                match err.kind() {
                    ErrorKind::ExpiredSignature => refused("the token expired (exp)"),
                    ErrorKind::ImmatureSignature => refused("the token is not valid yet (nbf)"),
                    ErrorKind::InvalidAudience if self.keys.audience => {
                        refused("the token is for another audience (aud)")
                    }
                    ErrorKind::InvalidAudience => refused(
                        "the token names an audience, and pushgate expects none: \
                         set auth.jwt.audience to accept it (aud)",
                    ),
                    ErrorKind::InvalidIssuer => refused("the token is from another issuer (iss)"),
                    ErrorKind::InvalidSignature => refused("the token's signature is invalid"),
                    ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                        refused("the token is not signed with the expected algorithm (alg)")
                    }
                    ErrorKind::MissingRequiredClaim(claim) => {
                        refused(&format!("the token has no `{claim}` claim ({claim})"))
                    }
                    _ => refused("the token is malformed"),
                }
            })?;
        let claims = data.claims;
        let (Some(sub), Some(exp)) = (claims.sub, claims.exp) else {
            return Err(refused("the token has no `sub` or no `exp` claim (sub, exp)").into());
        };
        let Some(sub) = sub
            .as_str()
            .filter(|sub| !sub.is_empty() && sub.len() <= 256)
        else {
            return Err(
                refused("the token's `sub` must be a string of 1 to 256 bytes (sub)").into(),
            );
        };
        let Some(exp) = numeric_date(&exp) else {
            return Err(refused("the token's `exp` is not a number of seconds (exp)").into());
        };
        // The library checks a numeric `nbf` and skips any other.
        if claims
            .nbf
            .is_some_and(|nbf| !nbf.is_null() && numeric_date(&nbf).is_none())
        {
            return Err(refused("the token's `nbf` is not a number of seconds (nbf)").into());
        }
        let channels = match claims.channels {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::Array(items)) => items
                .into_iter()
                .map(|item| match item {
                    serde_json::Value::String(channel) => Ok(channel),
                    _ => Err(()),
                })
                .collect::<Result<_, ()>>()
                .map_err(|()| {
                    refused("the token's `channels` must be a list of strings (channels)")
                })?,
            Some(_) => {
                return Err(
                    refused("the token's `channels` must be a list of strings (channels)").into(),
                )
            }
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut grant = grant_from(sub.to_owned(), channels, None, claims.info);
        // Capped like expires_in: an absurd exp must not overflow an Instant.
        let left = exp.saturating_sub(now).min(MAX_GRANT_SECONDS);
        grant.expires_at = Some(Instant::now() + Duration::from_secs(left));
        Ok(grant)
    }
}
