//! Error types at pushgate's boundaries, and the one place each becomes an
//! HTTP answer.
//!
//! Errors a client or the app caused say what went wrong; internal causes are
//! logged, never sent to the client.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use http::{header, Response, StatusCode};

use crate::body::{self, Body};
use crate::config::ConfigError;

/// Why the server could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Why a proxied request got no answer from the app.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the upstream app refused the connection")]
    UpstreamRefused(#[source] hyper_util::client::legacy::Error),
    #[error("the upstream app sent no response headers within {}", humantime::format_duration(*.0))]
    UpstreamTimeout(Duration),
    #[error("the upstream app closed the connection without a valid response")]
    UpstreamFailed(#[source] hyper_util::client::legacy::Error),
    #[error("the upstream app accepted the upgrade but the tunnel could not be set up")]
    UpgradeFailed,
    #[error("pushgate does not forward CONNECT requests")]
    ConnectRefused,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::UpstreamRefused(_)
            | ProxyError::UpstreamFailed(_)
            | ProxyError::UpgradeFailed => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ConnectRefused => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// A short plain-text answer naming the cause.
    pub fn into_response(self) -> Response<Body> {
        plain(self.status(), format!("{self}\n"))
    }
}

/// A small plain-text response.
pub fn plain(status: StatusCode, text: String) -> Response<Body> {
    let mut response = Response::new(body::full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
