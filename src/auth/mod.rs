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

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, StatusCode, Uri};
use ipnet::IpNet;
use serde::Deserialize;

use crate::app::{AppCalls, CallError};
use crate::config::jwt::KeySource as LoadedKey;
use crate::config::{AuthPaths, AuthSettings, JwtConfig, JwtKey, Settings};
use crate::conn::{forwarded_for, ConnInfo};
use crate::error::{Kind, Refusal};
use crate::message::ChannelName;

/// Longest reason from the app passed on to a client.
pub const MAX_REASON_BYTES: usize = 200;

mod app;
mod cache;
mod grant;
mod jwks;
mod jwt;

use app::AppAuth;
use cache::GrantCache;
use grant::{grant_or_refusal, reason};
pub use grant::{printable, Grant};
use jwt::{JwtAuth, KeyMissOr};

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
/// configured ones and `X-Forwarded-For`), kept for refresh and subscribe
/// requests later in the connection's life. With `auth.mode` `none` or
/// `jwt` there are none, and an idle connection keeps no map for them.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    headers: Option<Box<HeaderMap>>,
}

impl Credentials {
    pub fn new(headers: HeaderMap) -> Credentials {
        Credentials {
            headers: (!headers.is_empty()).then(|| Box::new(headers)),
        }
    }

    /// The headers to send (the JSON content type and accept are added
    /// when a call is sent, by `AppCalls::post`).
    pub fn headers(&self) -> &HeaderMap {
        static NONE: std::sync::LazyLock<HeaderMap> = std::sync::LazyLock::new(HeaderMap::new);
        self.headers.as_deref().unwrap_or(&NONE)
    }
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
    /// Requests to the app (`auth.mode: upstream`) go through `calls`, the
    /// proxy's client and its budget of files.
    pub fn new(settings: &Settings, calls: AppCalls) -> Auth {
        let mode = match &settings.auth {
            AuthSettings::None => Mode::None,
            AuthSettings::Upstream(paths) => {
                Mode::Upstream(Box::new(AppAuth::new(settings, paths, calls)))
            }
            AuthSettings::Jwt(key) => {
                Mode::Jwt(Box::new(JwtAuth::new(key, &settings.config.auth.jwt)))
            }
        };
        Auth { mode }
    }

    /// The grant for a new connection, or why it is refused: 401/403 with
    /// the app's reason, 503 when the app could not answer.
    pub async fn authorize(&self, request: AuthRequest<'_>) -> Result<Grant, Refusal> {
        match &self.mode {
            Mode::None => Ok(Grant::everything()),
            Mode::Upstream(app) => app.authorize(request).await,
            Mode::Jwt(jwt) => jwt.authorize(&request).await,
        }
    }

    /// How realtime connections are authorized, in words for the log at
    /// start: a new user's first question when every connect is refused.
    pub fn describe(&self) -> String {
        match &self.mode {
            Mode::None => "auth.mode none: every realtime connection may hear every channel \
                 (allowed on a loopback listener only)"
                .to_owned(),
            Mode::Upstream(app) => format!(
                "auth.mode upstream: each realtime connection is asked of the app at POST {}, \
                 which answers {{\"user\", \"channels\"}}, 401 or 403 (docs/protocol.md#connecting)",
                app.url
            ),
            Mode::Jwt(_) => "auth.mode jwt: realtime connections carry a token signed with \
                 auth.jwt's key"
                .to_owned(),
        }
    }

    /// What to keep of a connection's request for later questions to the app.
    pub fn credentials(&self, headers: &HeaderMap, conn: ConnInfo) -> Credentials {
        match &self.mode {
            // Nothing of the client's request: an empty map, which holds
            // no memory (`AppCalls::post` adds the JSON fields).
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
    ) -> Result<Grant, Refusal> {
        let expired = || {
            Refusal::new(
                Kind::Unauthenticated,
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
            return Err(Refusal::new(
                Kind::Unauthenticated,
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
    ) -> Result<(), Refusal> {
        let forbidden = |why: String| Refusal::new(Kind::Forbidden, "forbidden", why);
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
    pub fn refresh_token(&self, grant: &Grant, token: &str) -> Result<Grant, Refusal> {
        let Mode::Jwt(jwt) = &self.mode else {
            return Err(Refusal::bad_request(
                "refresh_not_supported",
                "`refresh` with a token is for auth.mode jwt",
            ));
        };
        let renewed = jwt.verify(token).map_err(KeyMissOr::into_api)?;
        if renewed.user != grant.user {
            return Err(Refusal::new(
                Kind::Forbidden,
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
            Mode::Upstream(app) => app.stats.lock().expect("auth stats lock").clone(),
            Mode::Jwt(jwt) => jwt.stats.lock().expect("auth stats lock").clone(),
        }
    }
}

/// Outcomes of authorizations, for /metrics.
#[derive(Debug, Clone, Default)]
pub struct AuthStats {
    pub allowed: u64,
    pub cached: u64,
    pub unauthenticated: u64,
    pub forbidden: u64,
    pub unavailable: u64,
    /// Time spent waiting for the app's answers (shared by every clone).
    pub request_seconds: crate::latency::Latency,
}
