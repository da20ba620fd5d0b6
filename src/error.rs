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
    #[error("cannot start the engine: {0}")]
    Engine(String),
}

/// Why a proxied request got no answer from the app.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the upstream app refused the connection")]
    UpstreamRefused(#[source] body::BoxError),
    /// The app could not be reached, for a reason other than a refusal.
    #[error("the upstream app could not be reached: {0}")]
    UpstreamUnreachable(&'static str, #[source] body::BoxError),
    #[error("the upstream app sent no response headers within {}", humantime::format_duration(*.0))]
    UpstreamTimeout(Duration),
    #[error("the upstream app closed the connection without a valid response")]
    UpstreamFailed(#[source] body::BoxError),
    #[error("pushgate does not forward CONNECT requests")]
    ConnectRefused,
    /// A request pushgate could not forward exactly as the client framed
    /// it (docs/security.md): refused rather than altered.
    #[error("pushgate refuses this request: {0}")]
    BadRequest(&'static str),
    #[error("the request body stalled: nothing arrived for {}", humantime::format_duration(*.0))]
    UploadStalled(Duration),
    #[error("the client went away before sending the whole request body")]
    UploadAborted,
    #[error(
        "pushgate is at its open-file limit and cannot open a connection to the app; retry shortly"
    )]
    OutOfFiles,
    /// The app's endpoint for pushgate's own calls (`rpc.path`,
    /// `rpc.publish_path`): a client may not call it with a body it wrote.
    #[error("not found")]
    AppOnly,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::UpstreamRefused(_)
            | ProxyError::UpstreamUnreachable(..)
            | ProxyError::UpstreamFailed(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ConnectRefused => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::UploadStalled(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::UploadAborted | ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::OutOfFiles => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::AppOnly => StatusCode::NOT_FOUND,
        }
    }

    /// A short plain-text answer naming the cause.
    pub fn into_response(self) -> Response<Body> {
        let refused = matches!(self, ProxyError::BadRequest(_));
        let mut response = plain(self.status(), format!("{self}\n"));
        if refused {
            // Whatever followed a request that was not understood cannot be
            // read as the next one.
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }
        response
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

/// When a publish refused as `overloaded` may try again.
pub const OVERLOADED_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// A `Retry-After` of `wait`, in whole seconds rounded up (at least 1): a
/// client told to come back never comes back early.
pub fn retry_after(wait: std::time::Duration) -> header::HeaderValue {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    header::HeaderValue::from(seconds.max(1))
}

/// What kind of refusal an error is: the one fact the edges turn into a
/// protocol's terms, an HTTP status ([`Kind::status`]) or a WebSocket close
/// code ([`Kind::close_code`]). Nothing else maps errors to either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The request or command is malformed or breaks a rule.
    Invalid,
    /// Who is asking is not known (no key, no or a bad token).
    Unauthenticated,
    /// Known, and not allowed.
    Forbidden,
    NotFound,
    /// The endpoint answers other methods (see [`Refusal::allow`]).
    NotAllowed,
    /// A body did not arrive in time.
    TimedOut,
    TooLarge,
    UnsupportedMedia,
    /// A realtime endpoint was asked for without the upgrade it needs.
    UpgradeRequired,
    /// Over a limit: connections, commands, channels.
    OverLimit,
    /// The app or the engine could not answer: try again later.
    Unavailable,
}

impl Kind {
    /// The HTTP status answering this kind of refusal.
    pub fn status(self) -> StatusCode {
        match self {
            Kind::Invalid => StatusCode::BAD_REQUEST,
            Kind::Unauthenticated => StatusCode::UNAUTHORIZED,
            Kind::Forbidden => StatusCode::FORBIDDEN,
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::NotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Kind::TimedOut => StatusCode::REQUEST_TIMEOUT,
            Kind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Kind::UnsupportedMedia => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Kind::UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
            Kind::OverLimit => StatusCode::TOO_MANY_REQUESTS,
            Kind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The WebSocket close code for this kind, when it ends a realtime
    /// connection after the upgrade (browsers cannot read a refused
    /// handshake's status): 4001 unauthenticated, 4003 forbidden, 4029 over a
    /// limit, 1013 when the app or engine cannot answer (try again later),
    /// 1008 for anything else the client got wrong.
    pub fn close_code(self) -> u16 {
        match self {
            Kind::Unauthenticated => 4001,
            Kind::Forbidden => 4003,
            Kind::OverLimit => 4029,
            Kind::Unavailable => 1013,
            _ => 1008,
        }
    }

    /// The client's fault, not the server's.
    pub fn is_client_error(self) -> bool {
        self != Kind::Unavailable
    }
}

/// A request, command or connection refused: its [`Kind`], and what the
/// client is told, `{"code", "message"}`. Answered by the API as
/// `{"error": {"code": "...", "message": "..."}}`, by the WebSocket as a
/// reply's `error` or a close, by SSE and long-poll as an HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Refusal {
    pub kind: Kind,
    /// Stable, machine-readable; documented in docs/api.md.
    pub code: &'static str,
    /// For people; says what was wrong and, where it helps, how to fix it.
    pub message: String,
    /// For [`Kind::NotAllowed`]: the methods the endpoint answers.
    pub allow: Option<&'static str>,
    /// For a rate limit: when to try again (`Retry-After`, whole seconds,
    /// at least 1).
    pub retry_after: Option<std::time::Duration>,
}

impl Refusal {
    pub fn new(kind: Kind, code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            kind,
            code,
            message: message.into(),
            allow: None,
            retry_after: None,
        }
    }

    /// A publish refused unstored because the node's fan-out stayed
    /// behind (`api.backpressure`).
    pub fn overloaded() -> Refusal {
        let mut refusal = Refusal::new(
            Kind::Unavailable,
            "overloaded",
            "this node's subscribers are receiving publications late; nothing was stored: retry after Retry-After (api.backpressure)",
        );
        refusal.retry_after = Some(OVERLOADED_RETRY_AFTER);
        refusal
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal::new(Kind::Invalid, code, message)
    }

    pub fn unauthorized() -> Refusal {
        Refusal::new(
            Kind::Unauthenticated,
            "unauthorized",
            "send one of api.keys as `Authorization: Bearer <key>`",
        )
    }

    pub fn body_too_large(limit: u64) -> Refusal {
        Refusal::new(
            Kind::TooLarge,
            "body_too_large",
            format!("the request body is over api.max_body ({limit} bytes)"),
        )
    }

    pub fn not_json() -> Refusal {
        Refusal::new(
            Kind::UnsupportedMedia,
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json`",
        )
    }

    pub fn not_found() -> Refusal {
        Refusal::new(
            Kind::NotFound,
            "not_found",
            "no such endpoint; see docs/api.md",
        )
    }

    /// `allowed` is the `Allow` header's value, e.g. `GET, HEAD`.
    pub fn method_not_allowed(allowed: &'static str) -> Refusal {
        Refusal {
            allow: Some(allowed),
            ..Refusal::new(
                Kind::NotAllowed,
                "method_not_allowed",
                format!("this endpoint answers {allowed}"),
            )
        }
    }

    /// The WebSocket close code for this refusal ([`Kind::close_code`]).
    pub fn close_code(&self) -> u16 {
        self.kind.close_code()
    }

    /// The JSON object `{"code", "message"}`, for batch items.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "code": self.code, "message": self.message })
    }

    pub fn into_response(self) -> Response<Body> {
        let mut response = json(
            self.kind.status(),
            &serde_json::json!({ "error": self.body() }),
        );
        if let Some(allow) = self.allow {
            response
                .headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static(allow));
        }
        if let Some(wait) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, retry_after(wait));
        }
        if self.code == "unauthorized" {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<crate::broker::BrokerError> for Refusal {
    fn from(err: crate::broker::BrokerError) -> Refusal {
        use crate::broker::BrokerError;
        // The cause is logged where it happens; the client gets the class.
        match err {
            BrokerError::KeyReused => Refusal::bad_request(
                "idempotency_key_reused",
                "this idempotency_key was used for a different publish within \
                 api.idempotency_window; nothing was published",
            ),
            BrokerError::Unavailable(_) => Refusal::new(
                Kind::Unavailable,
                "engine_unavailable",
                "the engine is unavailable; nothing was stored, retry later",
            ),
            BrokerError::NotReplicated(_) => Refusal::new(
                Kind::Unavailable,
                "not_replicated",
                "stored, but fewer than engine.redis.wait_replicas replicas confirmed it \
                 within engine.redis.wait_timeout: a failover could lose it, and subscribers \
                 may have it already; retry with the same idempotency_key",
            ),
            BrokerError::OutcomeUnknown(_) => Refusal::new(
                Kind::Unavailable,
                "outcome_unknown",
                "the engine failed mid-publish; retry with the same idempotency_key",
            ),
        }
    }
}

/// A JSON response.
pub fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    json_bytes(
        status,
        serde_json::to_vec(value).expect("serializing to memory cannot fail"),
    )
}

/// A response whose body is already JSON text.
pub fn json_bytes(status: StatusCode, bytes: impl Into<bytes::Bytes>) -> Response<Body> {
    let mut response = Response::new(body::full(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// `error: cause: cause…`, for logs.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
