//! The reverse proxy to the app: every request that is not pushgate's own goes
//! to `upstream.url` over a pooled keep-alive connection.
//!
//! Bodies stream both ways, frame by frame, so an upload or a response of any
//! size passes in bounded memory. Hop-by-hop headers are dropped on both legs,
//! `X-Forwarded-*` is set, and `Host` is passed as the client sent it.
//! WebSocket upgrades are tunnelled: once the app answers `101`, bytes are
//! copied both ways until either side closes.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use smallvec::SmallVec;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::app::streamed::{self, Answer, UploadBody, UploadFailure, UploadProgress};
use crate::app::{Added, AppClient};
use crate::body::{self, Body};
use crate::config::{RpcPaths, Settings};
use crate::conn::ConnInfo;
use crate::error::{error_chain, ProxyError};
use crate::shutdown::Drain;
use crate::timer;

mod request;

pub use request::remove_hop_by_hop;

use request::Forwarding;

/// The answer to a request to one of pushgate's own paths that breaks the
/// rules every request on the public listener keeps ([`request::admit`]):
/// the realtime paths read `Host` as the proxy does.
pub fn refusal(request: &Request<Incoming>) -> Option<Response<Body>> {
    let upgrade = request::websocket_upgrade(request).is_some();
    let has_body = !request.body().is_end_stream();
    let refused = request::admit(request, upgrade, has_body).err()?;
    Some(ProxyError::BadRequest(refused).into_response())
}

/// Forwards requests to the app.
#[derive(Clone)]
pub struct Proxy {
    /// Every connection to the app: the lean client for requests without
    /// a body (most of them), hyper's over the same pool for uploads and
    /// upgrades.
    app: AppClient,
    /// `fast_paths.lean_client`: off, requests without a body go through
    /// hyper's client too.
    lean_client: bool,
    timeout: Duration,
    body_timeout: Duration,
    forwarding: Forwarding,
    drain: Drain,
    /// Files for connections to the app: a request (or tunnel) holds one
    /// while it uses a connection; none left means the process is at its
    /// open-file limit.
    app_files: Arc<Semaphore>,
    /// The app's endpoints only pushgate calls.
    app_only: RpcPaths,
    /// Answers by status class, and how long the app took, for /metrics.
    stats: Arc<ProxyStats>,
    /// `log.access`: a line per request, with the id the app is sent.
    access: bool,
}

/// Proxied requests for /metrics: answers by status class (whoever gave
/// them: the app, or pushgate when it could not reach the app), and the
/// time to the answer's head.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// `1xx` … `5xx`, by the class's first digit less one.
    classes: [std::sync::atomic::AtomicU64; 5],
    pub latency: crate::latency::Latency,
}

impl ProxyStats {
    fn record(&self, status: http::StatusCode, took: std::time::Duration) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.classes[class].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.latency.observe(took);
    }

    /// `(class, answers)` for each status class.
    pub fn classes(&self) -> [(&'static str, u64); 5] {
        let read = |i: usize| self.classes[i].load(std::sync::atomic::Ordering::Relaxed);
        [
            ("1xx", read(0)),
            ("2xx", read(1)),
            ("3xx", read(2)),
            ("4xx", read(3)),
            ("5xx", read(4)),
        ]
    }
}

impl Proxy {
    /// Builds the proxy. Tunnels join `drain`; requests to the app draw on
    /// `app_files` and go through `app` (see [`app_client`]).
    pub fn new(
        settings: &Settings,
        drain: Drain,
        app_files: Arc<Semaphore>,
        app: AppClient,
        stats: Arc<ProxyStats>,
    ) -> Proxy {
        let config = &settings.config;
        Proxy {
            app,
            lean_client: config.fast_paths.lean_client,
            timeout: config.upstream.timeout,
            body_timeout: config.limits.body_timeout,
            forwarding: Forwarding {
                trusted_proxies: settings.trusted_proxies.clone(),
                extra_untrusted: settings.untrusted_headers.clone(),
            },
            drain,
            app_files,
            app_only: settings.rpc.clone(),
            stats,
            access: config.log.access,
        }
    }

    /// Sends `request` to the app and streams its answer back. Never fails
    /// (the `Infallible` is for hyper's service, which boxes this future as
    /// it is): when the app cannot answer, the response says why (502/504).
    ///
    /// The request's head is read, and for a request without a body the
    /// app's request encoded, before the future is made: that future holds
    /// the encoding, not the request, so it is small to box and to move
    /// (656 bytes, against 3,352 when it could also stream an upload).
    /// Uploads and upgrades wait on a future boxed on its own.
    pub fn forward(
        self: &Arc<Self>,
        mut request: Request<Incoming>,
        conn: ConnInfo,
    ) -> impl Future<Output = Result<Response<Body>, Infallible>> + Send + 'static {
        // For the latency histogram and the debug line.
        let started = Instant::now();
        let id = self.access.then(|| {
            crate::conn::request_id(
                request.headers_mut(),
                conn,
                &self.forwarding.trusted_proxies,
            )
        });
        let method = request.method().clone();
        let path = LoggedPath::of(request.uri());
        let proxy = Arc::clone(self);
        let prepared = proxy.prepare(request, conn);
        async move {
            let answer = match prepared {
                Ok(Prepared::Bodiless { request, file }) => {
                    proxy.send_bodiless(&method, &request, file).await
                }
                Ok(Prepared::Streamed(streamed)) => Box::pin(proxy.send_streamed(*streamed)).await,
                Err(err) => Err(err),
            };
            let response = answer_for(answer, &method, path.as_str(), conn, started);
            let took = started.elapsed();
            proxy.stats.record(response.status(), took);
            if let Some(id) = id {
                tracing::info!(
                    target: "pushgate::access",
                    request_id = id.to_str().unwrap_or_default(),
                    peer = %conn.peer,
                    %method,
                    path = path.as_str(),
                    status = response.status().as_u16(),
                    ms = took.as_secs_f64() * 1e3,
                    "proxied"
                );
            }
            Ok(response)
        }
    }

    /// Everything a request needs before anything is sent: the checks it
    /// must pass ([`request::admit`]), its fields for the app, and a file
    /// for the connection to it.
    fn prepare(
        &self,
        mut request: Request<Incoming>,
        conn: ConnInfo,
    ) -> Result<Prepared, ProxyError> {
        if request.method() == Method::CONNECT {
            return Err(ProxyError::ConnectRefused);
        }
        if self.app_only.is_app_only(request.uri().path()) {
            return Err(ProxyError::AppOnly);
        }
        let upgrade = request::websocket_upgrade(&request);
        let has_body = !request.body().is_end_stream();
        let host = request::admit(&request, upgrade.is_some(), has_body)
            .map_err(ProxyError::BadRequest)?;
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));

        let (mut parts, incoming) = request.into_parts();
        let added = self
            .forwarding
            .fields_for_app(&mut parts.headers, parts.version, conn, host);

        // Never wait for a file: a full budget means the process is at its
        // open-file limit, and the client is better told at once.
        let file = self
            .app_files
            .clone()
            .try_acquire_owned()
            .map_err(|_| ProxyError::OutOfFiles)?;

        if upgrade.is_none() && !has_body && self.lean_client {
            let target = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
            let request = self
                .app
                .encode(&parts.method, target, &parts.headers, &added);
            return Ok(Prepared::Bodiless { request, file });
        }
        Ok(Prepared::Streamed(Box::new(Streamed {
            parts,
            added,
            incoming,
            upgrade,
            client_upgrade,
            file,
        })))
    }

    /// A request without a body, encoded by [`Proxy::prepare`], over the
    /// lean client.
    async fn send_bodiless(
        &self,
        method: &Method,
        request: &[u8],
        file: OwnedSemaphorePermit,
    ) -> Result<Response<Body>, ProxyError> {
        let sent = self.app.send_encoded(method, request, file);
        let mut response = timer::within(self.timeout, sent)
            .await
            .ok_or(ProxyError::UpstreamTimeout(self.timeout))??;
        remove_hop_by_hop(response.headers_mut());
        Ok(response)
    }

    /// An upload or an upgrade, over hyper's client (see [`streamed`]): the
    /// body streams to the app as the client sends it, an upgrade becomes a
    /// tunnel.
    async fn send_streamed(&self, streamed: Streamed) -> Result<Response<Body>, ProxyError> {
        let Streamed {
            parts,
            mut added,
            incoming,
            upgrade,
            client_upgrade,
            file,
        } = streamed;
        let mut headers = parts.headers;
        for (name, value) in added.drain() {
            headers.insert(name, value);
        }
        if !headers.contains_key(header::HOST) {
            headers.insert(header::HOST, self.app.host().clone());
        }
        // The framing the app reads is the one pushgate writes: the body's
        // own length when the client declared one, else chunks, whatever
        // the method (hyper's client would send a GET's body unannounced).
        //
        // The length announced is the length sent. hyper's client sends no
        // body at all for one that says it has ended, and keeps whatever
        // Content-Length it is given, so an ended body is announced as
        // empty. Any other is announced at the length the client declared,
        // which hyper's server holds the client to as the body arrives (a
        // body that breaks it fails, and the upload with it), or in chunks.
        let had_length = headers.remove(header::CONTENT_LENGTH).is_some();
        let ended = incoming.is_end_stream();
        let size = if ended {
            Some(0)
        } else {
            incoming.size_hint().exact()
        };
        let (outgoing, progress, upload) = match &upgrade {
            Some(protocol) => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                headers.insert(header::UPGRADE, protocol.clone());
                (body::empty(), UploadProgress::done(), None)
            }
            None => {
                let expects_body =
                    [Method::POST, Method::PUT, Method::PATCH].contains(&parts.method);
                match size {
                    // No body (the lean client switched off): as the lean
                    // client writes it.
                    _ if ended && !expects_body && !had_length => None,
                    Some(len) => headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len)),
                    None => headers.insert(
                        header::TRANSFER_ENCODING,
                        HeaderValue::from_static("chunked"),
                    ),
                };
                let (upload, progress, state) =
                    UploadBody::wrap(body::stream(incoming), self.body_timeout);
                (upload, progress, Some(state))
            }
        };
        let mut request = Request::new(outgoing);
        *request.method_mut() = parts.method;
        *request.uri_mut() = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"))
            .into();
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = headers;

        // The request body is paced by the client; `upstream.timeout` covers
        // connecting and, once the body is sent, the wait for the answer.
        let failure = upload.clone();
        let answer = tokio::select! {
            answer = streamed::send(&self.app, request, upload, file) => answer,
            () = progress.deadline(self.timeout) => {
                return Err(ProxyError::UpstreamTimeout(self.timeout))
            }
        };
        let answer =
            answer.map_err(
                |err| match failure.as_ref().and_then(|upload| upload.failure()) {
                    Some(UploadFailure::Stalled) => ProxyError::UploadStalled(self.body_timeout),
                    Some(UploadFailure::ClientError) => ProxyError::UploadAborted,
                    None => err,
                },
            )?;
        match (answer, client_upgrade) {
            (Answer::Switched { mut response, file }, Some(client_upgrade)) => {
                let upstream_upgrade = hyper::upgrade::on(&mut response);
                let (parts, _) = response.into_parts();
                self.drain.spawn(async move {
                    tunnel(client_upgrade, upstream_upgrade).await;
                    drop(file);
                });
                Ok(Response::from_parts(parts, body::empty()))
            }
            (Answer::Switched { .. }, None) => Err(ProxyError::UpstreamFailed(
                "the app switched protocols without being asked to".into(),
            )),
            (Answer::Plain(response), _) => {
                let (mut parts, body) = response.into_parts();
                remove_hop_by_hop(&mut parts.headers);
                Ok(Response::from_parts(parts, body))
            }
        }
    }
}

/// A request made ready by [`Proxy::prepare`].
enum Prepared {
    /// No body and no upgrade (most requests): the app's request, encoded.
    Bodiless {
        request: Vec<u8>,
        file: OwnedSemaphorePermit,
    },
    /// An upload or an upgrade, for hyper's client.
    Streamed(Box<Streamed>),
}

/// An upload or an upgrade, its fields ready for the app.
struct Streamed {
    parts: http::request::Parts,
    added: Added,
    incoming: Incoming,
    /// The protocol asked for, when the request is a WebSocket upgrade.
    upgrade: Option<HeaderValue>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    file: OwnedSemaphorePermit,
}

/// A request's path, copied for its log lines. Not the request's `Uri`:
/// that shares hyper's read buffer, and a buffer still shared when hyper
/// reads the connection's next request is set aside for a new one, an
/// 8 KiB allocation per request. Paths up to 64 bytes stay inline.
struct LoggedPath(SmallVec<[u8; 64]>);

impl LoggedPath {
    fn of(uri: &Uri) -> LoggedPath {
        LoggedPath(SmallVec::from_slice(uri.path().as_bytes()))
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("copied from a str")
    }
}

/// The client's answer: the app's, or one that says why there is none,
/// with a log line for the failure.
fn answer_for(
    answer: Result<Response<Body>, ProxyError>,
    method: &Method,
    path: &str,
    conn: ConnInfo,
    started: Instant,
) -> Response<Body> {
    let response = match answer {
        Ok(response) => response,
        Err(err) => {
            match &err {
                ProxyError::UpstreamRefused(cause)
                | ProxyError::UpstreamUnreachable(_, cause)
                | ProxyError::UpstreamFailed(cause) => {
                    tracing::warn!(%method, %path, error = %err, cause = %error_chain(cause.as_ref()), "proxy error")
                }
                // The client's doing, not an error of pushgate or the app.
                ProxyError::UploadAborted => {
                    tracing::debug!(%method, %path, peer = %conn.peer, "client went away mid-upload")
                }
                ProxyError::UploadStalled(_) => tracing::info!(
                    %method,
                    %path,
                    peer = %conn.peer,
                    "limit: request body stalled past limits.body_timeout; answered 408"
                ),
                ProxyError::BadRequest(why) => tracing::info!(
                    %method,
                    %path,
                    peer = %conn.peer,
                    "refused: {why}; answered 400"
                ),
                ProxyError::OutOfFiles => tracing::info!(
                    %method,
                    %path,
                    "limit: the open-file limit is spent on connections; answered 503"
                ),
                _ => tracing::warn!(%method, %path, error = %err, "proxy error"),
            }
            err.into_response()
        }
    };
    if tracing::enabled!(tracing::Level::DEBUG) {
        tracing::debug!(
            %method,
            %path,
            status = response.status().as_u16(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            peer = %conn.peer,
            "proxied"
        );
    }
    response
}

/// Copies bytes both ways between the upgraded client and app connections.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(err) => {
            tracing::warn!(error = %err, "upgrade failed; tunnel not opened");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => tracing::debug!(bytes_up = up, bytes_down = down, "tunnel closed"),
        Err(err) => tracing::debug!(error = %err, "tunnel ended with an error"),
    }
}
