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
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ipnet::IpNet;
use smallvec::SmallVec;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::body::{self, Body};
use crate::config::Config;
use crate::error::{error_chain, ProxyError};
use crate::shutdown::Drain;
use crate::timer;

mod h1;

pub use h1::AppClient;

/// Facts about the client connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// Where the app lives: `http://host:port`.
#[derive(Debug, Clone)]
pub struct Upstream {
    scheme: Scheme,
    authority: Authority,
}

impl Upstream {
    /// Parses `upstream.url`; the error says what is wrong with it.
    pub fn parse(url: &str) -> Result<Upstream, String> {
        let uri: Uri = url
            .parse()
            .map_err(|err| format!("`{url}` is not a URL: {err}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(format!(
                    "`{url}`: pushgate talks plain HTTP to the app beside it; https upstreams are not supported"
                ))
            }
            _ => return Err(format!("`{url}` must start with http://")),
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("`{url}` has no host"))?;
        if uri.path() != "/" || uri.query().is_some() {
            return Err(format!(
                "`{url}` has a path or query; requests keep their own path, so give only scheme, host and port"
            ));
        }
        Ok(Upstream {
            scheme: Scheme::HTTP,
            authority,
        })
    }

    /// The app's host and port.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The app's URI for a request's path and query.
    pub fn uri(&self, path_and_query: Option<&PathAndQuery>) -> Uri {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(
                path_and_query
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            )
            .build()
            .expect("scheme, authority and path make a valid URI")
    }
}

/// The server's one client for requests to the app, from a validated
/// config: `upstream.url`, `upstream.pool_max_idle` (per thread) and
/// `upstream.pool_idle_timeout`.
pub fn app_client(config: &Config) -> AppClient {
    let upstream = Upstream::parse(&config.upstream.url).expect("validated upstream.url");
    AppClient::new(
        &upstream.authority,
        config.upstream.pool_max_idle,
        config.upstream.pool_idle_timeout,
    )
}

/// Forwards requests to the app.
#[derive(Clone)]
pub struct Proxy {
    /// Requests without a body (most of them).
    app: AppClient,
    /// Uploads and upgrades.
    client: Client<HttpConnector, Body>,
    upstream: Upstream,
    timeout: Duration,
    body_timeout: Duration,
    trusted_proxies: Vec<IpNet>,
    drain: Drain,
    /// Files for connections to the app: a request (or tunnel) holds one
    /// while it uses a connection; none left means the process is at its
    /// open-file limit.
    app_files: Arc<Semaphore>,
}

impl Proxy {
    /// Builds the proxy from a validated config. Tunnels join `drain`;
    /// requests to the app draw on `app_files`; those without a body go
    /// through `app` (see [`app_client`]).
    pub fn new(config: &Config, drain: Drain, app_files: Arc<Semaphore>, app: AppClient) -> Proxy {
        let upstream = Upstream::parse(&config.upstream.url).expect("validated upstream.url");
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(config.upstream.pool_idle_timeout)
            .pool_max_idle_per_host(config.upstream.pool_max_idle)
            .build(connector);
        Proxy {
            app,
            client,
            upstream,
            timeout: config.upstream.timeout,
            body_timeout: config.limits.body_timeout,
            trusted_proxies: config.trusted_proxies(),
            drain,
            app_files,
        }
    }

    /// The budget of files for connections to the app (shared by shards).
    pub fn app_files(&self) -> Arc<Semaphore> {
        self.app_files.clone()
    }

    /// The client for requests to the app (shared by shards).
    pub fn app(&self) -> AppClient {
        self.app.clone()
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
        request: Request<Incoming>,
        conn: ConnInfo,
    ) -> impl Future<Output = Result<Response<Body>, Infallible>> + Send + 'static {
        // The clock is read only for the debug line that uses it.
        let started = tracing::enabled!(tracing::Level::DEBUG).then(Instant::now);
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
            Ok(answer_for(answer, &method, path.as_str(), conn, started))
        }
    }

    /// Everything a request needs before anything is sent: its fields for
    /// the app, and a file for the connection to it.
    fn prepare(
        &self,
        mut request: Request<Incoming>,
        conn: ConnInfo,
    ) -> Result<Prepared, ProxyError> {
        if request.method() == Method::CONNECT {
            return Err(ProxyError::ConnectRefused);
        }
        let upgrade = websocket_upgrade(&request);
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));

        let (mut parts, incoming) = request.into_parts();
        let headers = &mut parts.headers;
        let host = headers.get(header::HOST).cloned().or_else(|| {
            // HTTP/2 carries the host in `:authority`, not a header.
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        remove_hop_by_hop(headers);
        let mut added = self.take_forwarded(headers, conn, host.as_ref());
        // One `Host`: the client's first, or (HTTP/2) its authority.
        match (headers.get_all(header::HOST).iter().count(), &host) {
            (0, Some(host)) => added.push(header::HOST, host.clone()),
            (2.., Some(host)) => drop(headers.insert(header::HOST, host.clone())),
            _ => {}
        }

        // Never wait for a file: a full budget means the process is at its
        // open-file limit, and the client is better told at once.
        let file = self
            .app_files
            .clone()
            .try_acquire_owned()
            .map_err(|_| ProxyError::OutOfFiles)?;

        if upgrade.is_none() && incoming.is_end_stream() {
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

    /// An upload or an upgrade, over hyper's client: the body streams to
    /// the app as the client sends it, an upgrade becomes a tunnel.
    async fn send_streamed(&self, streamed: Streamed) -> Result<Response<Body>, ProxyError> {
        let Streamed {
            mut parts,
            mut added,
            incoming,
            upgrade,
            client_upgrade,
            file,
        } = streamed;
        let mut headers = std::mem::take(&mut parts.headers);
        for (name, value) in added.drain() {
            headers.insert(name, value);
        }
        if let Some(protocol) = &upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, protocol.clone());
        }

        // The request body is paced by the client; `upstream.timeout` covers
        // connecting and, once the body is sent, the wait for the answer.
        let (upload, progress) = if upgrade.is_some() {
            (body::empty(), UploadProgress::done())
        } else {
            UploadBody::wrap(body::stream(incoming), self.body_timeout)
        };
        let mut outgoing = Request::new(upload);
        *outgoing.method_mut() = parts.method;
        *outgoing.uri_mut() = self.upstream.uri(parts.uri.path_and_query());
        *outgoing.version_mut() = Version::HTTP_11;
        *outgoing.headers_mut() = headers;

        let failure = progress.failure.clone();
        let answer = tokio::select! {
            answer = self.client.request(outgoing) => answer,
            () = progress.deadline(self.timeout) => {
                return Err(ProxyError::UpstreamTimeout(self.timeout))
            }
        };
        let mut response = answer.map_err(|err| match failure.get() {
            Some(UploadFailure::Stalled) => ProxyError::UploadStalled(self.body_timeout),
            Some(UploadFailure::ClientError) => ProxyError::UploadAborted,
            None if err.is_connect() => ProxyError::UpstreamRefused(err.into()),
            None => ProxyError::UpstreamFailed(err.into()),
        })?;

        if let (Some(client_upgrade), StatusCode::SWITCHING_PROTOCOLS) =
            (client_upgrade, response.status())
        {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            let (parts, _) = response.into_parts();
            self.drain.spawn(async move {
                tunnel(client_upgrade, upstream_upgrade).await;
                drop(file);
            });
            return Ok(Response::from_parts(parts, body::empty()));
        }

        let (mut parts, incoming) = response.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        // The connection to the app is busy until its body has been read.
        let incoming = Holding {
            body: incoming,
            _file: file,
        };
        Ok(Response::from_parts(parts, body::stream(incoming)))
    }

    /// Takes the client's `X-Forwarded-For/-Proto/-Host` out of `headers` and
    /// returns the values to send instead. A chain that came with the
    /// request is kept (and extended) only when the peer is a trusted proxy;
    /// anyone else could have written it, so it is replaced. The new values
    /// are returned rather than inserted so that the lean client can write
    /// them without growing the map.
    fn take_forwarded(
        &self,
        headers: &mut HeaderMap,
        conn: ConnInfo,
        host: Option<&HeaderValue>,
    ) -> Added {
        let trusted = is_trusted(&self.trusted_proxies, conn);
        let mut added = Added::default();
        added.push(X_FORWARDED_FOR, chain_for(headers, conn, trusted));
        // Most requests come with none of these: one pass over the fields
        // spares a lookup for each.
        let claims = headers
            .keys()
            .any(|name| FORWARDING.contains(&name.as_str()));
        let kept = |name| trusted && claims && headers.contains_key(name);
        let (keep_proto, keep_host) = (kept(X_FORWARDED_PROTO), kept(X_FORWARDED_HOST));
        if !keep_proto {
            let proto = if conn.tls { "https" } else { "http" };
            added.push(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        }
        if let (false, Some(host)) = (keep_host, host) {
            added.push(X_FORWARDED_HOST, host.clone());
        }
        if claims {
            headers.remove(X_FORWARDED_FOR);
            if !keep_proto {
                headers.remove(X_FORWARDED_PROTO);
            }
            if !keep_host {
                headers.remove(X_FORWARDED_HOST);
            }
            if !trusted {
                // Other spellings of the same claims, which we do not write.
                headers.remove(header::FORWARDED);
                headers.remove(X_REAL_IP);
            }
        }
        added
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
    started: Option<Instant>,
) -> Response<Body> {
    let response = match answer {
        Ok(response) => response,
        Err(err) => {
            match &err {
                ProxyError::UpstreamRefused(cause) | ProxyError::UpstreamFailed(cause) => {
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
    if let Some(started) = started {
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

/// Fields pushgate adds to a request for the app: the forwarding headers,
/// and `Host` where the client gave it only as an HTTP/2 authority.
#[derive(Default)]
pub struct Added {
    fields: [Option<(HeaderName, HeaderValue)>; 4],
}

impl Added {
    fn push(&mut self, name: HeaderName, value: HeaderValue) {
        let free = self
            .fields
            .iter_mut()
            .find(|field| field.is_none())
            .expect("at most four fields are added");
        *free = Some((name, value));
    }

    pub fn iter(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.fields
            .iter()
            .flatten()
            .map(|(name, value)| (name, value))
    }

    fn drain(&mut self) -> impl Iterator<Item = (HeaderName, HeaderValue)> + '_ {
        self.fields.iter_mut().filter_map(Option::take)
    }
}

fn is_trusted(trusted_proxies: &[IpNet], conn: ConnInfo) -> bool {
    let peer_ip = conn.peer.ip().to_canonical();
    trusted_proxies.iter().any(|net| net.contains(&peer_ip))
}

/// The `X-Forwarded-For` to send on: the incoming chain extended with the
/// peer when the peer is a trusted proxy, else just the peer.
pub fn forwarded_for(
    headers: &HeaderMap,
    conn: ConnInfo,
    trusted_proxies: &[IpNet],
) -> HeaderValue {
    chain_for(headers, conn, is_trusted(trusted_proxies, conn))
}

/// [`forwarded_for`], for a caller that has asked whether the peer is
/// trusted already.
fn chain_for(headers: &HeaderMap, conn: ConnInfo, trusted: bool) -> HeaderValue {
    let peer_ip = conn.peer.ip().to_canonical();
    trusted
        .then(|| {
            let earlier: Vec<&str> = headers
                .get_all(X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .collect();
            (!earlier.is_empty())
                .then(|| HeaderValue::from_str(&format!("{}, {peer_ip}", earlier.join(", "))).ok())
                .flatten()
        })
        .flatten()
        .unwrap_or_else(|| ip_value(peer_ip))
}

/// An IP address as a header value, formatted without a heap `String` (this
/// runs for every proxied request). An IPv4 address, the common case, is
/// written digit by digit: `core::fmt` takes a dozen calls for its four
/// numbers.
fn ip_value(ip: std::net::IpAddr) -> HeaderValue {
    // The longest text form of an IPv6 address is 45 bytes.
    let mut text = [0u8; 48];
    let len = match ip {
        std::net::IpAddr::V4(v4) => {
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text[len] = b'.';
                    len += 1;
                }
                let digits = [octet / 100, octet / 10 % 10, octet % 10];
                let skip = match octet {
                    100.. => 0,
                    10.. => 1,
                    _ => 2,
                };
                for digit in &digits[skip..] {
                    text[len] = b'0' + digit;
                    len += 1;
                }
            }
            len
        }
        std::net::IpAddr::V6(v6) => {
            use std::io::Write;
            let mut rest = &mut text[..];
            write!(rest, "{v6}").expect("an IPv6 address fits in 48 bytes");
            48 - rest.len()
        }
    };
    HeaderValue::from_bytes(&text[..len]).expect("an IP address is header text")
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
/// Every field that claims where a request came from.
const FORWARDING: [&str; 5] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
    "x-real-ip",
];

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
/// Compared as text: every field of every proxied message is checked
/// against these, and unequal lengths settle most comparisons at once.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Where `connection` stands in [`HOP_BY_HOP`].
const HOP_BY_HOP_CONNECTION: usize = 0;

/// Drops hop-by-hop headers, including every header the `Connection` header
/// names.
///
/// Only what is there is removed: one pass over the names marks which of
/// [`HOP_BY_HOP`] are present, so a browser's request, whose only one is
/// `Connection: keep-alive`, costs one removal rather than one per name
/// (each a hash and a probe, 10 of them about 2,900 instructions). A
/// token that is itself hop-by-hop (`keep-alive`, `upgrade`) is removed
/// as such, not looked up again.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let present = headers.keys().fold(0u16, |present, name| {
        HOP_BY_HOP
            .iter()
            .position(|hop| *hop == name.as_str())
            .map_or(present, |at| present | 1 << at)
    });
    if present == 0 {
        return;
    }
    if present & 1 << HOP_BY_HOP_CONNECTION != 0 {
        // Empty, and so never allocated, when every token is a hop-by-hop
        // name itself (a browser's `keep-alive`).
        let named: Vec<HeaderName> = connection_options(headers)
            .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
            .collect();
        for name in &named {
            headers.remove(name);
        }
    }
    for (at, name) in HOP_BY_HOP.iter().enumerate() {
        if present & 1 << at != 0 {
            headers.remove(*name);
        }
    }
}

/// The tokens of the `Connection` fields that are not hop-by-hop names
/// themselves: the fields they name are hop-by-hop too.
fn connection_options(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|token| {
            !token.is_empty() && !HOP_BY_HOP.iter().any(|hop| token.eq_ignore_ascii_case(hop))
        })
}

/// The `Upgrade` value when this is an HTTP/1.1 WebSocket upgrade request.
fn websocket_upgrade<B>(request: &Request<B>) -> Option<HeaderValue> {
    if request.version() != Version::HTTP_11 {
        return None;
    }
    let headers = request.headers();
    // `Upgrade` first: most requests have none, and a browser's every
    // request has a `Connection` to read through.
    (has_token(headers, header::UPGRADE, "websocket")
        && has_token(headers, header::CONNECTION, "upgrade"))
    .then(|| request.headers().get(header::UPGRADE).cloned())
    .flatten()
}

/// Whether the comma-separated header `name` lists `token` (case-insensitive),
/// as `Connection: keep-alive, Upgrade` lists `upgrade`.
pub fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
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

/// How an upload to the app is going, shared between the request body (which
/// the app's connection polls) and the request's timeout.
struct UploadProgress {
    /// Fires (or drops) when the app's connection first asks for the body.
    started: oneshot::Receiver<()>,
    /// Fires (or drops) when the body has been sent in full, or failed.
    finished: oneshot::Receiver<()>,
    failure: Arc<FailureCell>,
}

impl UploadProgress {
    /// Progress of a request with nothing to upload.
    fn done() -> UploadProgress {
        let (_, started) = oneshot::channel();
        let (_, finished) = oneshot::channel();
        UploadProgress {
            started,
            finished,
            failure: Arc::default(),
        }
    }

    /// Resolves when the app has taken too long: `timeout` to start taking
    /// the body (connecting), or `timeout` after the body was sent. The
    /// upload in between goes at the client's pace, bounded by
    /// `limits.body_timeout` between frames.
    async fn deadline(self, timeout: Duration) {
        if tokio::time::timeout(timeout, self.started).await.is_err() {
            return;
        }
        let _ = self.finished.await;
        tokio::time::sleep(timeout).await
    }
}

/// Why an upload failed on the client's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UploadFailure {
    /// No frame for `limits.body_timeout`.
    Stalled,
    /// The client's body failed (it went away mid-upload).
    ClientError,
}

#[derive(Default)]
struct FailureCell(std::sync::atomic::AtomicU8);

impl FailureCell {
    fn set(&self, failure: UploadFailure) {
        let code = match failure {
            UploadFailure::Stalled => 1,
            UploadFailure::ClientError => 2,
        };
        self.0.store(code, std::sync::atomic::Ordering::Relaxed);
    }

    fn get(&self) -> Option<UploadFailure> {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            1 => Some(UploadFailure::Stalled),
            2 => Some(UploadFailure::ClientError),
            _ => None,
        }
    }
}

/// The client's request body on its way to the app: reports when sending
/// starts and ends, and fails the upload when the client stalls.
struct UploadBody {
    inner: Body,
    idle: Duration,
    /// Armed while waiting for the client; re-armed lazily from
    /// `last_frame`, so a fast upload costs no timer work per frame.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    last_frame: tokio::time::Instant,
    started: Option<oneshot::Sender<()>>,
    finished: Option<oneshot::Sender<()>>,
    failure: Arc<FailureCell>,
}

impl UploadBody {
    fn wrap(inner: Body, idle: Duration) -> (Body, UploadProgress) {
        let (started_tx, started) = oneshot::channel();
        let (finished_tx, finished) = oneshot::channel();
        let failure = Arc::new(FailureCell::default());
        let body = UploadBody {
            inner,
            idle,
            timer: None,
            last_frame: tokio::time::Instant::now(),
            started: Some(started_tx),
            finished: Some(finished_tx),
            failure: failure.clone(),
        };
        let progress = UploadProgress {
            started,
            finished,
            failure,
        };
        (http_body_util::BodyExt::boxed(body), progress)
    }

    fn finish(&mut self) {
        if let Some(finished) = self.finished.take() {
            let _ = finished.send(());
        }
        self.timer = None;
    }
}

impl http_body::Body for UploadBody {
    type Data = bytes::Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Some(started) = this.started.take() {
            let _ = started.send(());
            this.last_frame = tokio::time::Instant::now();
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.last_frame = tokio::time::Instant::now();
                if this.inner.is_end_stream() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                this.failure.set(UploadFailure::ClientError);
                this.finish();
                Poll::Ready(Some(Err(err)))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Pending => {
                let deadline = this.last_frame + this.idle;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    this.failure.set(UploadFailure::Stalled);
                    this.finish();
                    return Poll::Ready(Some(Err("the client's request body stalled".into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_url_must_be_plain_http_without_path() {
        assert!(Upstream::parse("http://127.0.0.1:3000").is_ok());
        assert!(Upstream::parse("http://app:3000/").is_ok());
        assert!(Upstream::parse("https://app")
            .unwrap_err()
            .contains("https"));
        assert!(Upstream::parse("http://app/base")
            .unwrap_err()
            .contains("path"));
        assert!(Upstream::parse("app:3000").is_err());
        assert!(Upstream::parse("not a url").is_err());
    }

    #[test]
    fn an_ip_value_reads_as_the_address_does() {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        for octet in 0..=255u8 {
            for ip in [
                Ipv4Addr::new(octet, 0, 255, octet),
                Ipv4Addr::new(9, octet, 10, 99),
                Ipv4Addr::new(100, 200, octet, 1),
            ] {
                assert_eq!(ip_value(IpAddr::V4(ip)), ip.to_string().as_str());
            }
        }
        let longest: Ipv6Addr = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
            .parse()
            .unwrap();
        for ip in [
            Ipv6Addr::LOCALHOST,
            longest,
            "2001:db8::8a2e:370:7334".parse().unwrap(),
        ] {
            assert_eq!(ip_value(IpAddr::V6(ip)), ip.to_string().as_str());
        }
    }

    #[test]
    fn upstream_uri_keeps_path_and_query() {
        let upstream = Upstream::parse("http://127.0.0.1:3000").unwrap();
        let pq = PathAndQuery::from_static("/a/b?c=d");
        assert_eq!(
            upstream.uri(Some(&pq)).to_string(),
            "http://127.0.0.1:3000/a/b?c=d"
        );
        assert_eq!(upstream.uri(None).to_string(), "http://127.0.0.1:3000/");
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_go() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn only_the_hop_by_hop_headers_present_go_whatever_their_case() {
        assert_eq!(HOP_BY_HOP[HOP_BY_HOP_CONNECTION], "connection");
        // A browser's request: `Connection: keep-alive` and nothing else of the kind.
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1"));
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.keys().collect::<Vec<_>>(), [header::COOKIE]);

        // Every name of the list, and fields named in two `Connection`
        // fields in any case, one of them repeated.
        let mut headers = HeaderMap::new();
        for name in HOP_BY_HOP {
            headers.append(name, HeaderValue::from_static("x"));
        }
        headers.append(
            header::CONNECTION,
            HeaderValue::from_static("X-One, upgrade"),
        );
        headers.append(
            header::CONNECTION,
            HeaderValue::from_static(" x-two ,x-one"),
        );
        for name in ["x-one", "x-two", "x-three"] {
            headers.append(name, HeaderValue::from_static("1"));
        }
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.keys().collect::<Vec<_>>(), ["x-three"]);
    }
}

pin_project_lite::pin_project! {
    /// The app's response body, holding the file its connection to the app
    /// counts against until the body has been read (or dropped).
    struct Holding {
        #[pin]
        body: Incoming,
        _file: tokio::sync::OwnedSemaphorePermit,
    }
}

impl http_body::Body for Holding {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
