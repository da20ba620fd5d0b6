//! Who a realtime connection is, and which channels it may hear.
//!
//! Every transport asks [`Auth::authorize`] before it accepts a connection,
//! and checks the resulting [`Grant`] on every subscribe. The modes that ask
//! the app (an auth request to the upstream) or verify a JWT plug in here;
//! today the one mode is `none`: everyone may hear everything, which config
//! validation allows only on a loopback listener.

use crate::config::{AuthConfig, AuthMode};
use crate::error::ApiError;
use crate::message::ChannelName;

/// What a connection was granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Who the app says this is; `None` when nobody was asked.
    pub user: Option<String>,
    channels: Channels,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Channels {
    /// Every channel (auth mode `none`).
    All,
}

impl Grant {
    /// Everything, for auth mode `none`.
    pub fn everything() -> Grant {
        Grant {
            user: None,
            channels: Channels::All,
        }
    }

    /// Whether this grant lets the connection hear `channel`.
    pub fn allows(&self, _channel: &ChannelName) -> bool {
        match self.channels {
            Channels::All => true,
        }
    }
}

/// What the transports need to know about a connection to authorize it.
#[derive(Debug, Clone, Copy)]
pub struct AuthRequest<'a> {
    /// `websocket`, `sse` or `poll`.
    pub transport: &'a str,
    /// The channels named at connect time (a hint; the grant does not depend
    /// on them).
    pub channels: &'a [ChannelName],
    pub headers: &'a http::HeaderMap,
}

/// Decides whether realtime connections are accepted.
#[derive(Debug, Clone)]
pub struct Auth {
    mode: AuthMode,
}

impl Auth {
    pub fn new(config: &AuthConfig) -> Auth {
        Auth { mode: config.mode }
    }

    /// The grant for a new connection, or why it is refused (401, 403, 503:
    /// an HTTP status for SSE and long-poll, a close code for WebSocket).
    pub async fn authorize(&self, _request: AuthRequest<'_>) -> Result<Grant, ApiError> {
        match self.mode {
            AuthMode::None => Ok(Grant::everything()),
        }
    }
}
