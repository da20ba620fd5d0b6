//! Who a realtime connection is, and which channels it may hear.
//!
//! Every transport asks [`Auth::authorize`] before it accepts a connection,
//! and checks the resulting [`Grant`] on every subscribe.
//!
//! - `upstream` (the default): pushgate asks the app. It sends
//!   `POST <upstream.url><auth.upstream.path>` with the client's configured
//!   headers (cookie and authorization by default), `X-Forwarded-For`, and a
//!   JSON body `{"transport", "channels", "path", "query"}`. The app answers
//!   `200 {"user", "channels", "expires_in"?, "info"?}` (channels are exact
//!   names or prefixes ending in `*`), or 401/403 with a reason passed on to
//!   the client. Anything else (a redirect, a 5xx, a 200 that is not a grant,
//!   no answer within `auth.upstream.timeout`) refuses the connection with
//!   503: never "allowed", never cached.
//! - `none`: everyone hears everything; config validation allows it only on
//!   a loopback listener.
//!
//! Grants are cached by a keyed digest of the whole auth request (every
//! header and the body: two connections share a grant only when the app
//! would be asked exactly the same question) for `auth.upstream.cache_ttl`
//! (capped by the grant's `expires_in`), in a cache of at most
//! `auth.upstream.cache_size` entries. An answer with `Cache-Control:
//! no-store` is not cached.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HeaderValue;
use http::{header, HeaderMap, HeaderName, Method, StatusCode, Uri};
use http_body_util::{BodyExt, Collected, Limited};
use ipnet::IpNet;
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::app::AppClient;
use crate::body::{Body, BoxError};
use crate::config::jwt::KeySource as LoadedKey;
use crate::config::{AuthPaths, AuthSettings, JwtConfig, JwtKey, Settings};
use crate::conn::{forwarded_for, ConnInfo};
use crate::error::{error_chain, ApiError};
use crate::message::ChannelName;
use crate::timer;

/// Longest reason from the app passed on to a client.
pub const MAX_REASON_BYTES: usize = 200;
/// Largest grant the app may answer with.
const MAX_GRANT_BYTES: usize = 256 * 1024;
/// Longest a grant is taken to last (ten years); longer claims are capped.
const MAX_GRANT_SECONDS: u64 = 10 * 365 * 86_400;
/// Most channel patterns in one grant.
const MAX_GRANT_CHANNELS: usize = 10_000;

/// What a connection was granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Who the app says this is; `None` when nobody was asked.
    pub user: Option<String>,
    channels: Channels,
    /// When the grant runs out (`expires_in`), if it does.
    pub expires_at: Option<Instant>,
    /// The app's `info`, kept as JSON text for presence.
    pub info: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Channels {
    /// Every channel (auth mode `none`).
    All,
    /// Exact names, and prefixes (from patterns ending in `*`).
    Listed {
        exact: Vec<String>,
        prefixes: Vec<String>,
    },
}

impl Grant {
    /// Everything, for auth mode `none`.
    pub fn everything() -> Grant {
        Grant {
            user: None,
            channels: Channels::All,
            expires_at: None,
            info: None,
        }
    }

    /// Adds one exact channel (the app allowed it through `subscribe_path`).
    pub fn allow(&mut self, channel: &ChannelName) {
        if let Channels::Listed { exact, .. } = &mut self.channels {
            exact.push(channel.as_str().to_owned());
        }
    }

    /// Whether this grant lets the connection hear `channel`.
    pub fn allows(&self, channel: &ChannelName) -> bool {
        match &self.channels {
            Channels::All => true,
            Channels::Listed { exact, prefixes } => {
                let name = channel.as_str();
                exact.iter().any(|e| e == name)
                    || prefixes.iter().any(|p| name.starts_with(p.as_str()))
            }
        }
    }
}

/// What the transports know about a connection when they authorize it.
#[derive(Debug, Clone, Copy)]
pub struct AuthRequest<'a> {
    /// `websocket`, `sse` or `poll`.
    pub transport: &'a str,
    /// The channels named at connect time (a hint; the grant does not depend
    /// on them).
    pub channels: &'a [ChannelName],
    pub headers: &'a HeaderMap,
    pub path: &'a str,
    pub query: &'a str,
    pub conn: ConnInfo,
}

/// The headers sent to the app on a connection's behalf (the client's
/// configured ones, `X-Forwarded-For`, and the JSON content type and
/// accept of every such request), kept for refresh and subscribe requests
/// later in the connection's life.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    headers: HeaderMap,
}

/// Decides whether realtime connections are accepted.
pub struct Auth {
    mode: Mode,
}

enum Mode {
    None,
    Upstream(Box<AppAuth>),
    Jwt(Box<JwtAuth>),
}

impl Auth {
    /// Requests to the app (`auth.mode: upstream`) go through `app`, the
    /// proxy's client, and draw on `app_files`, its budget of files for
    /// connections to the app.
    pub fn new(settings: &Settings, app: AppClient, app_files: Arc<Semaphore>) -> Auth {
        let mode = match &settings.auth {
            AuthSettings::None => Mode::None,
            AuthSettings::Upstream(paths) => {
                Mode::Upstream(Box::new(AppAuth::new(settings, paths, app, app_files)))
            }
            AuthSettings::Jwt(key) => {
                Mode::Jwt(Box::new(JwtAuth::new(key, &settings.config.auth.jwt)))
            }
        };
        Auth { mode }
    }

    /// The grant for a new connection, or why it is refused: 401/403 with
    /// the app's reason, 503 when the app could not answer.
    pub async fn authorize(&self, request: AuthRequest<'_>) -> Result<Grant, ApiError> {
        match &self.mode {
            Mode::None => Ok(Grant::everything()),
            Mode::Upstream(app) => app.authorize(request).await,
            Mode::Jwt(jwt) => jwt.authorize(&request).await,
        }
    }

    /// What to keep of a connection's request for later questions to the app.
    pub fn credentials(&self, headers: &HeaderMap, conn: ConnInfo) -> Credentials {
        match &self.mode {
            Mode::None | Mode::Jwt(_) => Credentials::default(),
            Mode::Upstream(app) => app.credentials(headers, conn),
        }
    }

    /// A grant that ran out: asks the app to extend it (`refresh_path`).
    /// Without a refresh endpoint, or when the app refuses, the connection
    /// must close with 4001.
    pub async fn refresh(
        &self,
        grant: &Grant,
        credentials: &Credentials,
        connection_id: u64,
        transport: &str,
    ) -> Result<Grant, ApiError> {
        let expired = || {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "credentials_expired",
                "the connection's credentials expired; reconnect",
            )
        };
        let Mode::Upstream(app) = &self.mode else {
            return Err(expired());
        };
        let Some(url) = &app.refresh_url else {
            return Err(expired());
        };
        let body = serde_json::json!({
            "user": grant.user,
            "connection_id": connection_id.to_string(),
            "transport": transport,
        });
        let body = serde_json::to_vec(&body).expect("a JSON value serializes");
        let answer = app.exchange(url, credentials, &body).await?;
        let renewed =
            grant_or_refusal(answer.status, &answer.body, |why| app.unavailable(url, why))?;
        if renewed.user != grant.user {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "credentials_expired",
                "the refreshed grant names another user",
            ));
        }
        Ok(renewed)
    }

    /// A subscribe outside the grant: asks the app (`subscribe_path`) when
    /// there is one; without it the answer is forbidden.
    pub async fn may_subscribe(
        &self,
        grant: &Grant,
        credentials: &Credentials,
        channel: &ChannelName,
        transport: &str,
    ) -> Result<(), ApiError> {
        let forbidden = |why: String| ApiError::new(StatusCode::FORBIDDEN, "forbidden", why);
        let Mode::Upstream(app) = &self.mode else {
            return Err(forbidden(format!("not allowed to hear `{channel}`")));
        };
        let Some(url) = &app.subscribe_url else {
            return Err(forbidden(format!("not allowed to hear `{channel}`")));
        };
        let body = serde_json::json!({
            "user": grant.user,
            "channel": channel,
            "transport": transport,
        });
        let body = serde_json::to_vec(&body).expect("a JSON value serializes");
        let answer = app.exchange(url, credentials, &body).await?;
        match answer.status {
            StatusCode::OK => Ok(()),
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => Err(forbidden(reason(
                &answer.body,
                &format!("not allowed to hear `{channel}`"),
            ))),
            other => Err(app.unavailable(url, &format!("the app answered {other}"))),
        }
    }

    /// A new token for a live connection (the WebSocket `refresh` command,
    /// JWT mode): the grant it carries, which must name the same user.
    pub fn refresh_token(&self, grant: &Grant, token: &str) -> Result<Grant, ApiError> {
        let Mode::Jwt(jwt) = &self.mode else {
            return Err(ApiError::bad_request(
                "refresh_not_supported",
                "`refresh` with a token is for auth.mode jwt",
            ));
        };
        let renewed = jwt.verify(token).map_err(KeyMissOr::into_api)?;
        if renewed.user != grant.user {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the new token names another user",
            ));
        }
        Ok(renewed)
    }

    /// The query parameter that may carry a token, in JWT mode.
    pub fn token_param(&self) -> Option<&str> {
        match &self.mode {
            Mode::Jwt(jwt) => Some(&jwt.query_param),
            _ => None,
        }
    }

    /// Forgets every cached grant of `user` (the app disconnected it).
    pub fn forget_user(&self, user: &str) {
        if let Mode::Upstream(app) = &self.mode {
            app.cache.forget_user(user);
        }
    }

    /// Auth requests sent to the app so far, for /metrics.
    pub fn stats(&self) -> AuthStats {
        match &self.mode {
            Mode::None => AuthStats::default(),
            Mode::Upstream(app) => *app.stats.lock().expect("auth stats lock"),
            Mode::Jwt(jwt) => *jwt.stats.lock().expect("auth stats lock"),
        }
    }
}

/// Outcomes of authorizations, for /metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuthStats {
    pub allowed: u64,
    pub cached: u64,
    pub unauthenticated: u64,
    pub forbidden: u64,
    pub unavailable: u64,
    /// Total seconds spent waiting for the app, and how many waits.
    pub request_seconds: f64,
    pub requests: u64,
}

/// `auth.mode: upstream`.
struct AppAuth {
    /// The proxy's client: a connect's request to the app is written and
    /// answered on the thread that serves the connect, over that thread's
    /// kept-alive connections.
    app: AppClient,
    /// The budget of files for connections to the app, shared with the proxy.
    app_files: Arc<Semaphore>,
    url: Uri,
    refresh_url: Option<Uri>,
    subscribe_url: Option<Uri>,
    forward: Vec<HeaderName>,
    timeout: Duration,
    trusted_proxies: Vec<IpNet>,
    cache: GrantCache,
    stats: Mutex<AuthStats>,
}

/// The app's answer to an auth request.
#[derive(Deserialize)]
struct AppGrant {
    user: String,
    channels: Vec<String>,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    info: Option<Box<serde_json::value::RawValue>>,
}

impl AppAuth {
    fn new(
        settings: &Settings,
        paths: &AuthPaths,
        app: AppClient,
        app_files: Arc<Semaphore>,
    ) -> AppAuth {
        let upstream = &settings.upstream;
        let options = &settings.config.auth.upstream;
        AppAuth {
            app,
            app_files,
            url: upstream.uri(Some(&paths.check)),
            refresh_url: paths.refresh.as_ref().map(|path| upstream.uri(Some(path))),
            subscribe_url: paths
                .subscribe
                .as_ref()
                .map(|path| upstream.uri(Some(path))),
            forward: settings.forward_headers.clone(),
            timeout: options.timeout,
            trusted_proxies: settings.trusted_proxies.clone(),
            cache: GrantCache::new(options.cache_size, options.cache_ttl),
            stats: Mutex::default(),
        }
    }

    async fn authorize(&self, request: AuthRequest<'_>) -> Result<Grant, ApiError> {
        let body = auth_body(&request);
        let credentials = self.credentials(request.headers, request.conn);
        let key = self.cache.key(&credentials, &body);
        if let Some(grant) = self.cache.get(&key) {
            self.stats.lock().expect("auth stats lock").cached += 1;
            return Ok(grant);
        }
        let started = Instant::now();
        let outcome = self
            .exchange(&self.url, &credentials, &body)
            .await
            .and_then(|answer| {
                let grant = grant_or_refusal(answer.status, &answer.body, |why| {
                    self.unavailable(&self.url, why)
                })?;
                Ok((grant, answer.no_store))
            });
        let mut stats = self.stats.lock().expect("auth stats lock");
        stats.requests += 1;
        stats.request_seconds += started.elapsed().as_secs_f64();
        match outcome {
            Ok((grant, no_store)) => {
                stats.allowed += 1;
                drop(stats);
                if !no_store {
                    self.cache.put(key, grant.clone());
                }
                Ok(grant)
            }
            Err(err) => {
                match err.status {
                    StatusCode::UNAUTHORIZED => stats.unauthenticated += 1,
                    StatusCode::FORBIDDEN => stats.forbidden += 1,
                    _ => stats.unavailable += 1,
                }
                Err(err)
            }
        }
    }

    /// The headers the app is sent on this connection's behalf.
    fn credentials(&self, headers: &HeaderMap, conn: ConnInfo) -> Credentials {
        forwarded(&self.forward, &self.trusted_proxies, headers, conn)
    }

    /// One request to the app: POST `body` to `url` with the credentials.
    /// Returns the status and the body; no answer in time, a failed
    /// connection or an unreadable body is `503 auth_unavailable`.
    async fn exchange(
        &self,
        url: &Uri,
        credentials: &Credentials,
        body: &[u8],
    ) -> Result<AppAnswer, ApiError> {
        let Ok(file) = self.app_files.clone().try_acquire_owned() else {
            return Err(self.unavailable(url, "the open-file limit is spent on connections"));
        };
        let target = url.path_and_query().map_or("/", |target| target.as_str());
        let sent = self
            .app
            .send_full(&Method::POST, target, &credentials.headers, body, file);
        let response = match timer::within(self.timeout, sent).await {
            None => return Err(self.unavailable(url, "no answer within auth.upstream.timeout")),
            Some(Err(err)) => return Err(self.unavailable(url, &error_chain(&err))),
            Some(Ok(response)) => response,
        };
        let status = response.status();
        let no_store = says_no_store(response.headers());
        let read = collect_at_most(response.into_body(), MAX_GRANT_BYTES);
        match timer::within(self.timeout, read).await {
            Some(Ok(collected)) => Ok(AppAnswer {
                status,
                body: collected.to_bytes(),
                no_store,
            }),
            Some(Err(_)) => {
                Err(self.unavailable(url, "the answer could not be read or was too large"))
            }
            None => Err(self.unavailable(url, "the answer's body did not arrive in time")),
        }
    }

    fn unavailable(&self, url: &Uri, why: &str) -> ApiError {
        tracing::warn!(%url, why, "request to the app failed; refused with 503");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "auth_unavailable",
            "the app could not confirm this connection; try again later",
        )
    }
}

/// The headers the app is sent on a connection's behalf: the client's
/// `forward` headers, `X-Forwarded-For`, and the JSON content type and
/// accept.
fn forwarded(
    forward: &[HeaderName],
    trusted_proxies: &[IpNet],
    headers: &HeaderMap,
    conn: ConnInfo,
) -> Credentials {
    let mut forwarded = HeaderMap::new();
    for name in forward {
        for value in headers.get_all(name) {
            forwarded.append(name.clone(), value.clone());
        }
    }
    forwarded.insert(
        "x-forwarded-for",
        forwarded_for(headers, conn, trusted_proxies),
    );
    // Every request to the app carries a JSON body and wants JSON back.
    let json = HeaderValue::from_static("application/json");
    forwarded.insert(header::CONTENT_TYPE, json.clone());
    forwarded.insert(header::ACCEPT, json);
    Credentials { headers: forwarded }
}

/// The JSON body of an auth request.
fn auth_body(request: &AuthRequest<'_>) -> Vec<u8> {
    let body = serde_json::json!({
        "transport": request.transport,
        "channels": request.channels,
        "path": request.path,
        "query": query_for_app(request.query),
    });
    serde_json::to_vec(&body).expect("a JSON value serializes")
}

/// The app's answer to one request.
struct AppAnswer {
    status: StatusCode,
    body: Bytes,
    /// `Cache-Control: no-store`: the app asks that the grant not be kept.
    no_store: bool,
}

/// Whether `Cache-Control` holds `no-store`. Only that directive is
/// honoured: web frameworks send `no-cache`, `private` or `max-age=0` on
/// every answer by default, which says nothing about a grant, while
/// `no-store` is asked for on purpose.
fn says_no_store(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|directive| directive.trim().eq_ignore_ascii_case("no-store"))
}

/// The connection's query as the app is sent it: without the client's
/// resume position (`since`, `last_event_id`), which moves with every
/// long-poll and says nothing about who the client is. Every other
/// parameter is passed as the client wrote it.
fn query_for_app(query: &str) -> String {
    query
        .split('&')
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(name, _)| name);
            let name: String = form_urlencoded::parse(name.as_bytes())
                .next()
                .map(|(name, _)| name.into_owned())
                .unwrap_or_default();
            !pair.is_empty() && name != "since" && name != "last_event_id"
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The whole of `body`, failing past `max` bytes. Named, with `Send` in
/// its type: rustc cannot prove `Limited`'s future `Send` for every
/// lifetime when it is written inside the spawned future that awaits it.
fn collect_at_most(
    body: Body,
    max: usize,
) -> impl Future<Output = Result<Collected<Bytes>, BoxError>> + Send {
    Limited::new(body, max).collect()
}

/// The verification key and rules of `auth.mode: jwt`.
pub struct JwtKeys {
    source: KeySource,
    validation: jsonwebtoken::Validation,
    /// Whether `auth.jwt.audience` is set, to tell a token for another
    /// audience from a token that names one where none is expected.
    audience: bool,
}

/// Where the verification key comes from.
enum KeySource {
    Fixed(jsonwebtoken::DecodingKey),
    /// `auth.jwt.jwks_url`: the token's `kid` picks one.
    Jwks(Arc<crate::jwks::Jwks>),
}

impl JwtKeys {
    /// The runtime of the loaded key: a JWKS source gets its fetcher. Only
    /// the configured algorithm is accepted, which refuses `alg: none` and
    /// key-type confusion (an RS256 public key used as an HS256 secret).
    fn new(key: &JwtKey, config: &JwtConfig) -> JwtKeys {
        let source = match &key.source {
            LoadedKey::Fixed(key) => KeySource::Fixed(key.clone()),
            LoadedKey::Jwks { url, tls } => KeySource::Jwks(Arc::new(crate::jwks::Jwks::new(
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
    fn key_for(&self, token: &str) -> Result<jsonwebtoken::DecodingKey, KeyMiss> {
        match &self.source {
            KeySource::Fixed(key) => Ok(key.clone()),
            KeySource::Jwks(jwks) => {
                let header = jsonwebtoken::decode_header(token).map_err(|_| KeyMiss::Malformed)?;
                match jwks.find(header.kid.as_deref()) {
                    crate::jwks::Lookup::Found(key) => Ok(key),
                    crate::jwks::Lookup::Unknown => Err(KeyMiss::Unknown),
                    crate::jwks::Lookup::Unavailable => Err(KeyMiss::Unavailable),
                }
            }
        }
    }
}

/// A token refused, or no key to check it with.
enum KeyMissOr {
    Miss(KeyMiss),
    Refused(ApiError),
}

impl From<ApiError> for KeyMissOr {
    fn from(err: ApiError) -> KeyMissOr {
        KeyMissOr::Refused(err)
    }
}

impl KeyMissOr {
    fn into_api(self) -> ApiError {
        let refused = |why: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", why);
        match self {
            KeyMissOr::Refused(err) => err,
            KeyMissOr::Miss(KeyMiss::Malformed) => refused("the token is malformed"),
            KeyMissOr::Miss(KeyMiss::Unknown) => {
                refused("the token's key (`kid`) is not among the signing keys")
            }
            // Never a pass: try again once the keys can be fetched.
            KeyMissOr::Miss(KeyMiss::Unavailable) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "auth_unavailable",
                "the signing keys could not be fetched; try again later",
            ),
        }
    }
}

/// Why no key was found for a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyMiss {
    Malformed,
    /// Not in the key set (after fetching it again, when allowed).
    Unknown,
    /// The key set could not be fetched yet.
    Unavailable,
}

/// `auth.mode: jwt`.
struct JwtAuth {
    keys: JwtKeys,
    cookie: Option<String>,
    query_param: String,
    stats: Mutex<AuthStats>,
}

/// The claims pushgate reads, as loose JSON: a claim of the wrong type is
/// refused with its name ([`JwtAuth::verify`]), never as "malformed".
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<serde_json::Value>,
    #[serde(default)]
    exp: Option<serde_json::Value>,
    #[serde(default)]
    nbf: Option<serde_json::Value>,
    #[serde(default)]
    channels: Option<serde_json::Value>,
    #[serde(default)]
    info: Option<Box<serde_json::value::RawValue>>,
}

/// A NumericDate (RFC 7519): seconds since the epoch, possibly fractional.
fn numeric_date(value: &serde_json::Value) -> Option<u64> {
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
fn check_header(token: &str) -> Result<(), String> {
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
    fn new(key: &JwtKey, config: &JwtConfig) -> JwtAuth {
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

    async fn authorize(&self, request: &AuthRequest<'_>) -> Result<Grant, ApiError> {
        let outcome = match self.token(request) {
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
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
            Err(err) if err.status == StatusCode::SERVICE_UNAVAILABLE => stats.unavailable += 1,
            Err(_) => stats.unauthenticated += 1,
        }
        outcome
    }

    /// The token from `Authorization: Bearer`, the configured cookie, or the
    /// query parameter, in that order.
    fn token(&self, request: &AuthRequest<'_>) -> Option<String> {
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
    fn verify(&self, token: &str) -> Result<Grant, KeyMissOr> {
        use jsonwebtoken::errors::ErrorKind;
        let refused = |why: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", why);
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

/// A 200 grant, or the app's refusal with its reason, or 503.
fn grant_or_refusal(
    status: StatusCode,
    body: &[u8],
    unavailable: impl Fn(&str) -> ApiError,
) -> Result<Grant, ApiError> {
    match status {
        StatusCode::OK => parse_grant(body).map_err(|why| unavailable(&why)),
        StatusCode::UNAUTHORIZED => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            reason(body, "the app does not know who this is"),
        )),
        StatusCode::FORBIDDEN => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            reason(body, "the app refused this connection"),
        )),
        other => Err(unavailable(&format!("the app answered {other}"))),
    }
}

fn parse_grant(body: &[u8]) -> Result<Grant, String> {
    let grant: AppGrant = serde_json::from_slice(body).map_err(|err| {
        format!("the app's 200 is not a grant ({{\"user\", \"channels\"}}): {err}")
    })?;
    if grant.user.is_empty() || grant.user.len() > 256 {
        return Err("the grant's user must be 1 to 256 bytes".into());
    }
    if grant.channels.len() > MAX_GRANT_CHANNELS {
        return Err(format!(
            "the grant lists over {MAX_GRANT_CHANNELS} channels"
        ));
    }
    Ok(grant_from(
        grant.user,
        grant.channels,
        grant.expires_in,
        grant.info,
    ))
}

/// A grant from its parts: channel patterns are exact names, or prefixes
/// when they end in `*`.
fn grant_from(
    user: String,
    patterns: Vec<String>,
    expires_in: Option<u64>,
    info: Option<Box<serde_json::value::RawValue>>,
) -> Grant {
    let mut exact = Vec::new();
    let mut prefixes = Vec::new();
    for pattern in patterns.into_iter().take(MAX_GRANT_CHANNELS) {
        match pattern.strip_suffix('*') {
            Some(prefix) => prefixes.push(prefix.to_owned()),
            None => exact.push(pattern),
        }
    }
    Grant {
        user: Some(user),
        channels: Channels::Listed { exact, prefixes },
        expires_at: expires_in
            .map(|seconds| Instant::now() + Duration::from_secs(seconds.min(MAX_GRANT_SECONDS))),
        info: info.map(|info| info.get().to_owned()),
    }
}

/// The app's reason for a refusal, for the client: the JSON `reason` (or
/// `error`/`message`) field, or the text, printable and bounded.
fn reason(body: &[u8], fallback: &str) -> String {
    let text = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|value| {
            ["reason", "error", "message"]
                .iter()
                .find_map(|key| value.get(key).and_then(|v| v.as_str()).map(str::to_owned))
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let mut clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned();
    if clean.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !clean.is_char_boundary(end) {
            end -= 1;
        }
        clean.truncate(end);
    }
    if clean.is_empty() {
        fallback.to_owned()
    } else {
        clean
    }
}

/// The cache key of one auth request.
type CacheKey = [u8; 32];

/// Grants by a keyed digest of the auth request that earned them, bounded in
/// size and age.
struct GrantCache {
    ttl: Duration,
    capacity: usize,
    /// Drawn at random for each process: keys cannot be computed, or
    /// collided on purpose, from outside.
    secret: ring::hmac::Key,
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    grants: HashMap<CacheKey, (Grant, Instant)>,
    /// Keys in insertion order: the oldest is evicted first.
    order: VecDeque<CacheKey>,
}

impl GrantCache {
    fn new(capacity: usize, ttl: Duration) -> GrantCache {
        let rng = ring::rand::SystemRandom::new();
        GrantCache {
            ttl,
            capacity,
            secret: ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
                .expect("the system's random source works"),
            inner: Mutex::default(),
        }
    }

    /// The key under which the app's answer to this request is cached:
    /// HMAC-SHA256 of every header the app is sent (name and value, in the
    /// order they are written: the forwarded credentials, `X-Forwarded-For`
    /// and the fixed ones) and of the whole JSON body (transport, channels,
    /// path, query), each part length-prefixed so that no two different
    /// requests give the same input. The request line and `Host` are the
    /// same for every request. The credentials themselves are not kept.
    ///
    /// Invariant: **two requests share a cached grant only when the auth
    /// request the app would see is byte-for-byte the same.** The app
    /// decides from what it is sent, so a grant it gave for one request (one
    /// cookie, one client address, one set of channels) is never served for
    /// another. Whatever is added to the auth request goes through
    /// `credentials` and `body`, and so into the key.
    fn key(&self, credentials: &Credentials, body: &[u8]) -> CacheKey {
        let mut digest = ring::hmac::Context::with_key(&self.secret);
        let mut part = |bytes: &[u8]| {
            digest.update(&(bytes.len() as u64).to_be_bytes());
            digest.update(bytes);
        };
        for (name, value) in &credentials.headers {
            part(name.as_str().as_bytes());
            part(value.as_bytes());
        }
        // A header name is never empty, so this marker ends the headers.
        part(b"");
        part(body);
        let mut key = [0; 32];
        key.copy_from_slice(digest.sign().as_ref());
        key
    }

    fn get(&self, key: &CacheKey) -> Option<Grant> {
        if self.ttl.is_zero() {
            return None;
        }
        let inner = self.inner.lock().expect("grant cache lock");
        let (grant, until) = inner.grants.get(key)?;
        (Instant::now() < *until).then(|| grant.clone())
    }

    fn put(&self, key: CacheKey, grant: Grant) {
        if self.ttl.is_zero() {
            return;
        }
        let mut until = Instant::now() + self.ttl;
        if let Some(expires) = grant.expires_at {
            until = until.min(expires);
        }
        let mut inner = self.inner.lock().expect("grant cache lock");
        if inner.grants.insert(key, (grant, until)).is_none() {
            inner.order.push_back(key);
        }
        while inner.grants.len() > self.capacity {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            inner.grants.remove(&oldest);
        }
        // Keys replaced in place leave stale entries in `order`; keep it
        // from outgrowing the map.
        if inner.order.len() > 2 * self.capacity {
            let CacheInner { grants, order } = &mut *inner;
            order.retain(|key| grants.contains_key(key));
        }
    }

    fn forget_user(&self, user: &str) {
        let mut inner = self.inner.lock().expect("grant cache lock");
        inner
            .grants
            .retain(|_, (grant, _)| grant.user.as_deref() != Some(user));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn channel(name: &str) -> ChannelName {
        ChannelName::parse(name).unwrap()
    }

    #[test]
    fn grants_allow_exact_names_and_prefixes() {
        let grant = parse_grant(br#"{"user": "42", "channels": ["chat:1", "user:42:*"], "expires_in": 60, "info": {"name": "Ada"}}"#).unwrap();
        assert_eq!(grant.user.as_deref(), Some("42"));
        assert!(grant.allows(&channel("chat:1")));
        assert!(!grant.allows(&channel("chat:10")));
        assert!(grant.allows(&channel("user:42:inbox")));
        assert!(grant.allows(&channel("user:42:")));
        assert!(!grant.allows(&channel("user:43:inbox")));
        assert!(grant.expires_at.is_some());
        assert_eq!(grant.info.as_deref(), Some(r#"{"name": "Ada"}"#));
        let all = parse_grant(br#"{"user": "root", "channels": ["*"]}"#).unwrap();
        assert!(all.allows(&channel("anything")));
    }

    #[test]
    fn a_200_that_is_not_a_grant_is_refused() {
        for body in [
            &b"<html>ok</html>"[..],
            br#"{"channels": []}"#,
            br#"{"user": "", "channels": []}"#,
            br#"{"user": 42, "channels": []}"#,
            br#"{"user": "a", "channels": "all"}"#,
        ] {
            assert!(
                parse_grant(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn reasons_are_printable_and_bounded() {
        assert_eq!(reason(br#"{"reason": "banned"}"#, "x"), "banned");
        assert_eq!(reason(b"plain\ntext", "x"), "plain text");
        assert_eq!(reason(b"", "fallback"), "fallback");
        assert_eq!(
            reason("é".repeat(300).as_bytes(), "x").len(),
            MAX_REASON_BYTES
        );
    }

    #[test]
    fn the_cache_is_bounded_keyed_and_forgets_users() {
        let cache = GrantCache::new(2, Duration::from_secs(60));
        let credentials = |cookie: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::COOKIE, HeaderValue::from_str(cookie).unwrap());
            Credentials { headers }
        };
        let grant = |user: &str| Grant {
            user: Some(user.into()),
            ..Grant::everything()
        };
        let (a, b, c) = (
            cache.key(&credentials("s=a"), b"{}"),
            cache.key(&credentials("s=b"), b"{}"),
            cache.key(&credentials("s=c"), b"{}"),
        );
        assert_ne!(a, b);
        cache.put(a, grant("1"));
        cache.put(b, grant("2"));
        cache.put(c, grant("3"));
        assert!(cache.get(&a).is_none(), "the oldest was evicted");
        assert_eq!(cache.get(&c).unwrap().user.as_deref(), Some("3"));
        cache.forget_user("2");
        assert!(cache.get(&b).is_none());

        let off = GrantCache::new(2, Duration::ZERO);
        off.put(a, grant("1"));
        assert!(off.get(&a).is_none(), "ttl 0 turns caching off");

        // Keys are drawn per process (per cache): not computable outside.
        let other = GrantCache::new(2, Duration::from_secs(60));
        assert_ne!(other.key(&credentials("s=a"), b"{}"), a);
    }

    #[test]
    fn only_no_store_keeps_an_answer_out_of_the_cache() {
        let says = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(header::CACHE_CONTROL, HeaderValue::from_str(value).unwrap());
            }
            says_no_store(&headers)
        };
        assert!(says(&["no-store"]));
        assert!(says(&["private, No-Store"]));
        assert!(says(&["max-age=60", "no-store"]));
        assert!(!says(&[]));
        // What frameworks send on every answer says nothing about grants.
        assert!(!says(&["no-cache, private"]));
        assert!(!says(&["max-age=0, private, must-revalidate"]));
        assert!(!says(&["no-storex", "x-no-store"]));
    }

    #[test]
    fn the_app_is_sent_the_query_without_the_resume_position() {
        for (query, sent) in [
            ("channel=a&timeout=0", "channel=a&timeout=0"),
            (
                "channel=a&since=1.340ca71c&timeout=5",
                "channel=a&timeout=5",
            ),
            ("last_event_id=1.x&channel=a", "channel=a"),
            ("%73ince=1.x&channel=a", "channel=a"),
            ("channel=a&since", "channel=a"),
            ("channel=a&&channel=b", "channel=a&channel=b"),
            ("channel=a%26since%3Dx", "channel=a%26since%3Dx"),
            ("sincere=1&token=t", "sincere=1&token=t"),
            ("", ""),
        ] {
            assert_eq!(query_for_app(query), sent, "{query}");
        }
    }

    /// Everything a client's connect can vary that reaches the auth
    /// request, or might wrongly be thought to.
    #[derive(Debug, Clone)]
    struct Connect {
        cookies: Vec<String>,
        authorization: Option<String>,
        /// Not forwarded: must not matter.
        user_agent: Option<String>,
        peer: std::net::IpAddr,
        /// Taken into the chain only from a trusted proxy (10.0.0.0/8).
        x_forwarded_for: Option<String>,
        transport: String,
        channels: Vec<String>,
        path: String,
        query: String,
    }

    const FORWARD: [HeaderName; 2] = [header::COOKIE, header::AUTHORIZATION];

    impl Connect {
        /// The auth request this connect makes: its credentials and body.
        fn request(&self) -> (Credentials, Vec<u8>) {
            let mut headers = HeaderMap::new();
            for cookie in &self.cookies {
                headers.append(header::COOKIE, HeaderValue::from_str(cookie).unwrap());
            }
            let optional = [
                (header::AUTHORIZATION, &self.authorization),
                (header::USER_AGENT, &self.user_agent),
                (
                    HeaderName::from_static("x-forwarded-for"),
                    &self.x_forwarded_for,
                ),
            ];
            for (name, value) in optional {
                if let Some(value) = value {
                    headers.insert(name, HeaderValue::from_str(value).unwrap());
                }
            }
            let conn = ConnInfo {
                peer: std::net::SocketAddr::new(self.peer, 40000),
                tls: false,
            };
            let trusted = ["10.0.0.0/8".parse().unwrap()];
            let credentials = forwarded(&FORWARD, &trusted, &headers, conn);
            let channels: Vec<ChannelName> = self.channels.iter().map(|c| channel(c)).collect();
            let body = auth_body(&AuthRequest {
                transport: &self.transport,
                channels: &channels,
                headers: &headers,
                path: &self.path,
                query: &self.query,
                conn,
            });
            (credentials, body)
        }

        /// What the app sees of that request, byte for byte.
        fn seen_by_app(&self) -> (Vec<(String, Vec<u8>)>, Vec<u8>) {
            let (credentials, body) = self.request();
            let headers = credentials
                .headers
                .iter()
                .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
                .collect();
            (headers, body)
        }
    }

    /// One change to a connect, for the battery below.
    type Change = Box<dyn Fn(&mut Connect)>;

    fn alice() -> Connect {
        Connect {
            cookies: vec!["session=alice".into()],
            authorization: None,
            user_agent: Some("a browser".into()),
            peer: "127.0.0.2".parse().unwrap(),
            x_forwarded_for: None,
            transport: "sse".into(),
            channels: vec!["chat:1".into()],
            path: "/realtime/sse".into(),
            query: "channel=chat:1".into(),
        }
    }

    /// Invariant of [`GrantCache::key`], in a battery: a change to any one
    /// thing the app is sent changes the key; a change to anything it is not
    /// sent does not.
    #[test]
    fn the_cache_key_changes_with_every_input_of_the_auth_request() {
        let cache = GrantCache::new(100, Duration::from_secs(60));
        let key = |connect: &Connect| {
            let (credentials, body) = connect.request();
            cache.key(&credentials, &body)
        };
        let base = key(&alice());
        assert_eq!(base, key(&alice()), "the same request, the same key");

        let changed: Vec<(&str, Change)> = vec![
            (
                "cookie",
                Box::new(|c| c.cookies = vec!["session=alicf".into()]),
            ),
            (
                "a second cookie header",
                Box::new(|c| c.cookies.push("x=1".into())),
            ),
            ("no cookie", Box::new(|c| c.cookies.clear())),
            (
                "authorization",
                Box::new(|c| c.authorization = Some("Bearer t".into())),
            ),
            (
                "client address",
                Box::new(|c| c.peer = "127.0.0.3".parse().unwrap()),
            ),
            ("IPv6 client", Box::new(|c| c.peer = "::2".parse().unwrap())),
            ("transport", Box::new(|c| c.transport = "poll".into())),
            ("channels", Box::new(|c| c.channels = vec!["chat:2".into()])),
            (
                "another channel",
                Box::new(|c| c.channels.push("news".into())),
            ),
            (
                "channel order",
                Box::new(|c| c.channels.insert(0, "news".into())),
            ),
            ("no channels", Box::new(|c| c.channels.clear())),
            ("path", Box::new(|c| c.path = "/realtime/poll".into())),
            (
                "query",
                Box::new(|c| c.query = "channel=chat:1&timeout=5".into()),
            ),
            // From a trusted proxy, the chain it forwards is sent on.
            (
                "the chain from a trusted proxy",
                Box::new(|c| {
                    c.peer = "10.1.2.3".parse().unwrap();
                    c.x_forwarded_for = Some("203.0.113.9".into());
                }),
            ),
        ];
        let mut keys = vec![base];
        for (what, change) in &changed {
            let mut connect = alice();
            change(&mut connect);
            let changed = key(&connect);
            assert!(!keys.contains(&changed), "changing the {what} kept a key");
            keys.push(changed);
        }

        let same: Vec<(&str, Change)> = vec![
            (
                "user agent",
                Box::new(|c| c.user_agent = Some("another".into())),
            ),
            // An untrusted peer's X-Forwarded-For is replaced, not sent.
            (
                "forged X-Forwarded-For",
                Box::new(|c| c.x_forwarded_for = Some("10.9.9.9".into())),
            ),
            (
                "resume position",
                Box::new(|c| c.query = "channel=chat:1&last_event_id=1.340ca71c".into()),
            ),
        ];
        for (what, change) in &same {
            let mut connect = alice();
            change(&mut connect);
            assert_eq!(alice().seen_by_app(), connect.seen_by_app(), "{what}");
            assert_eq!(key(&connect), base, "changing the {what} changed the key");
        }

        // Parts are length-prefixed: moving bytes between two values, or
        // between a value and the body, is a different request.
        let split = |cookies: &[&str]| {
            let mut connect = alice();
            connect.cookies = cookies.iter().map(|c| (*c).to_owned()).collect();
            key(&connect)
        };
        assert_ne!(split(&["a", "bc"]), split(&["ab", "c"]));
        assert_ne!(split(&["a", ""]), split(&["a"]));
        let mut both = alice();
        both.authorization = Some("x".into());
        let mut cookie_only = alice();
        cookie_only.cookies = vec!["session=alicex".into()];
        assert_ne!(key(&both), key(&cookie_only));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn any_connect() -> impl Strategy<Value = Connect> {
            let value = "[ -~]{0,10}";
            (
                proptest::collection::vec(value, 0..3),
                proptest::option::of(value),
                proptest::option::of(value),
                prop_oneof![
                    Just("127.0.0.2".parse().unwrap()),
                    Just("127.0.0.3".parse().unwrap()),
                    Just("10.0.0.1".parse().unwrap()),
                    Just("::1".parse().unwrap()),
                ],
                proptest::option::of(prop_oneof![
                    Just("203.0.113.9".to_owned()),
                    Just("203.0.113.9, 10.0.0.2".to_owned())
                ]),
                prop_oneof![Just("sse"), Just("poll"), Just("websocket")],
                proptest::collection::vec("[a-z:]{1,6}", 0..3),
                prop_oneof![Just("/realtime/sse"), Just("/realtime/poll")],
                "(channel=[a-z]{1,3}|since=[0-9.]{1,4}|timeout=[0-9])(&(channel=[a-z]{1,3}|since=[0-9.]{1,4}|timeout=[0-9])){0,2}",
            )
                .prop_map(
                    |(cookies, authorization, user_agent, peer, x_forwarded_for, transport, channels, path, query)| Connect {
                        cookies,
                        authorization,
                        user_agent,
                        peer,
                        x_forwarded_for,
                        transport: transport.to_owned(),
                        channels,
                        path: path.to_owned(),
                        query,
                    },
                )
        }

        /// Changes one thing of a connect, picked by `which`.
        fn mutate(connect: &mut Connect, which: u8, text: String) {
            match which % 9 {
                0 => connect.cookies.push(text),
                1 => connect.authorization = Some(text),
                2 => connect.user_agent = Some(text),
                3 => connect.peer = "127.0.0.9".parse().unwrap(),
                4 => connect.x_forwarded_for = Some("198.51.100.1".into()),
                5 => connect.transport = "websocket".into(),
                6 => connect.channels.push("z".into()),
                7 => connect.path = "/realtime/ws".into(),
                _ => connect.query.push_str("&since=1.2"),
            }
        }

        proptest! {
            /// Invariant of [`GrantCache::key`]: two connects share a key
            /// exactly when the app would be sent the same request.
            #[test]
            fn prop_keys_are_equal_exactly_when_the_app_sees_the_same(
                a in any_connect(),
                which in any::<u8>(),
                text in "[ -~]{0,10}",
                other in any_connect(),
            ) {
                let cache = GrantCache::new(10, Duration::from_secs(60));
                let key = |connect: &Connect| {
                    let (credentials, body) = connect.request();
                    cache.key(&credentials, &body)
                };
                let mut b = a.clone();
                mutate(&mut b, which, text);
                for b in [&b, &other] {
                    prop_assert_eq!(
                        key(&a) == key(b),
                        a.seen_by_app() == b.seen_by_app(),
                        "{:?} / {:?}", a, b
                    );
                }
            }
        }
    }
}
