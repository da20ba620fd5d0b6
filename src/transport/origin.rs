//! The `Origin` check for realtime connections, and CORS for the HTTP
//! transports.

use super::*;

/// The `realtime.allowed_origins` check, for WebSocket handshakes and CORS.
#[derive(Debug, Clone)]
pub struct Origins {
    pub(super) patterns: Vec<OriginPattern>,
}

/// What the Origin check decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginCheck {
    /// No `Origin` header: not a browser's cross-origin request.
    Absent,
    /// Allowed; CORS answers echo this origin.
    Allowed(HeaderValue),
    Refused,
}

impl Origins {
    pub fn new(patterns: Vec<OriginPattern>) -> Origins {
        Origins { patterns }
    }

    /// Checks the request's `Origin`. With no patterns configured only the
    /// request's own host is allowed, which is what stops a foreign page
    /// from opening a WebSocket with the user's cookies. The scheme is not
    /// compared: TLS often ends at a proxy in front of pushgate, and the same
    /// host over http and https is the same site's owner.
    pub fn check<B>(&self, request: &Request<B>) -> OriginCheck {
        let headers = request.headers();
        let Some(origin) = headers.get(header::ORIGIN) else {
            return OriginCheck::Absent;
        };
        let Ok(text) = origin.to_str() else {
            return OriginCheck::Refused;
        };
        let allowed = if self.patterns.is_empty() {
            // The host as the proxy reads it: a target's authority (HTTP/2's
            // `:authority`, an absolute-form target) before `Host`.
            let host = request
                .uri()
                .authority()
                .map(|a| a.as_str())
                .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()));
            let origin_host = text.split_once("://").map(|(_, rest)| rest);
            matches!((host, origin_host), (Some(host), Some(origin_host)) if host.eq_ignore_ascii_case(origin_host))
        } else {
            self.patterns.iter().any(|pattern| pattern.matches(text))
        };
        if allowed {
            OriginCheck::Allowed(origin.clone())
        } else {
            OriginCheck::Refused
        }
    }
}

/// Adds CORS headers for an allowed origin to a response.
pub(super) fn cors(response: &mut Response<Body>, origin: &OriginCheck) {
    if let OriginCheck::Allowed(origin) = origin {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

/// Answers a CORS preflight for SSE or long-poll.
pub(super) fn preflight<B>(
    origins: &Origins,
    request: &Request<B>,
) -> Result<Response<Body>, Refusal> {
    let check = origins.check(request);
    if check == OriginCheck::Refused {
        return Err(origin_refused());
    }
    let mut response = Response::new(crate::body::empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    cors(&mut response, &check);
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Last-Event-ID, Authorization, Content-Type"),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    Ok(response)
}

pub(super) fn origin_refused() -> Refusal {
    Refusal::new(
        Kind::Forbidden,
        "origin_not_allowed",
        "this Origin may not open realtime connections (realtime.allowed_origins)",
    )
}
