//! The API listener's service: the API's handler behind tower layers for
//! what any HTTP API needs, so none of it is written by hand:
//!
//! - request tracing (`tower_http::trace`, at debug level);
//! - at most `api.max_connections` requests in flight (`tower::limit`);
//!   more wait for a slot;
//! - the body limit, `api.max_body` (`tower_http::limit`): a declared
//!   length over it is answered at once, a body that grows past it fails
//!   when it does;
//! - `limits.body_timeout` for each pause in a body (`tower_http::timeout`).
//!
//! The layers' own refusals are answered in the API's JSON error format
//! ([`as_api_errors`]), with the codes docs/api.md gives.

use std::convert::Infallible;
use std::sync::Arc;

use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use tower::util::BoxCloneSyncService;
use tower::ServiceBuilder;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::RequestBodyTimeoutLayer;
use tower_http::trace::TraceLayer;

use super::Api;
use crate::body::{self, Body};
use crate::error::Refusal;

/// What the API listener serves each request with.
pub type ApiService = BoxCloneSyncService<Request<Incoming>, Response<Body>, Infallible>;

/// The API's handler with its layers. Clones share the in-flight limit.
pub fn service(api: Arc<Api>) -> ApiService {
    let max_body = api.max_body;
    let limit = usize::try_from(max_body).unwrap_or(usize::MAX);
    let service = ServiceBuilder::new()
        .map_response(|response: Response<_>| response.map(body::stream))
        .layer(TraceLayer::new_for_http())
        .concurrency_limit(api.max_in_flight)
        .map_response(move |response| as_api_errors(response, max_body))
        .layer(RequestBodyLimitLayer::new(limit))
        .layer(RequestBodyTimeoutLayer::new(api.body_timeout))
        .service_fn(move |request| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.handle(request).await) }
        });
    BoxCloneSyncService::new(service)
}

/// The body limit refuses a declared length before the handler runs, with
/// a bare `413`; every answer of the API itself is JSON. The refusal gets
/// the API's error body.
fn as_api_errors<B>(response: Response<B>, max_body: u64) -> Response<Body>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
    B::Error: Into<body::BoxError>,
{
    let from_a_layer = !response.headers().contains_key(header::CONTENT_TYPE)
        || response.headers()[header::CONTENT_TYPE] != "application/json";
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE && from_a_layer {
        return Refusal::body_too_large(max_body).into_response();
    }
    response.map(body::stream)
}
