//! A lean HTTP/1.1 client for the app, for every proxied request that has no
//! body and asks for no upgrade: page loads, API reads, most of an app's
//! traffic.
//!
//! It does for such a request what a pooled hyper client does, with less
//! machinery between the two sockets: the request's own task writes the head
//! on a kept-alive connection, parses the answer's head with `httparse`, and
//! the body is read straight off the app's socket as the client's connection
//! asks for it. There is no connection task and no channel between tasks,
//! and a body that arrived whole with its head is handed on as it is, the
//! connection back in the pool before the response leaves. Requests with a
//! body streaming from a client, and upgrades, go through hyper's client
//! on the same pool's connections (see `super::streamed`); a small body
//! pushgate wrote itself (the auth request's JSON) goes here, written with
//! the head in one go.
//!
//! Framing follows RFC 9112 §6.3: no body for `HEAD`, 1xx, 204 and 304;
//! chunked when it is the last transfer coding; else `Content-Length`; else
//! until the app closes. A connection goes back to the pool by the one rule
//! of [`super::pool::Outcome`].

use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Method, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use smallvec::SmallVec;
use tokio::io::AsyncWriteExt;
use tokio::sync::OwnedSemaphorePermit;

use super::pool::{Conn, Outcome, Pool, Pools};
use super::Added;
use crate::body::{self, Body, BoxError};
use crate::error::ProxyError;

/// Most header fields an answer (or its trailers) may carry, as hyper's client.
pub(super) const MAX_HEADERS: usize = 100;
/// Longest answer head (status line and fields) taken from the app.
pub(super) const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size line (size and extensions).
const MAX_CHUNK_LINE: usize = 4096;
/// Longest trailer section.
const MAX_TRAILERS: usize = 16 * 1024;

fn failed(cause: impl Into<BoxError>) -> ProxyError {
    ProxyError::UpstreamFailed(cause.into())
}

/// A connection to the app that could not be made, in words for its cause.
fn refused(cause: io::Error) -> ProxyError {
    let why = match cause.kind() {
        io::ErrorKind::ConnectionRefused => return ProxyError::UpstreamRefused(cause.into()),
        io::ErrorKind::NotFound => "its host name did not resolve",
        io::ErrorKind::TimedOut => "connecting to it timed out",
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            "there is no route to it"
        }
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => {
            "it reset the connection"
        }
        _ => "connecting to it failed",
    };
    ProxyError::UpstreamUnreachable(why, cause.into())
}

/// Sends requests to the app over kept-alive connections (see
/// [`super::pool`]). One for the whole server, shared by the proxy and the
/// auth requests.
#[derive(Clone)]
pub struct AppClient {
    host: HeaderValue,
    pools: Arc<Pools>,
}

impl AppClient {
    pub fn new(authority: &Authority, max_idle: usize, idle_timeout: Duration) -> AppClient {
        AppClient {
            host: HeaderValue::from_str(authority.as_str()).expect("an authority is header text"),
            pools: Arc::new(Pools::new(authority, max_idle, idle_timeout)),
        }
    }

    /// The app's `host:port`, the `Host` of a request that named none.
    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    /// This thread's pool.
    pub(super) fn pool(&self) -> &Arc<Pool> {
        self.pools.local()
    }

    /// A new connection to the app, never used before.
    pub(super) async fn connect(&self) -> Result<Conn, ProxyError> {
        self.pools.connect().await.map_err(refused)
    }

    /// A request without a body, encoded for [`AppClient::send_encoded`].
    pub fn encode(
        &self,
        method: &Method,
        target: &str,
        headers: &HeaderMap,
        added: &Added,
    ) -> Vec<u8> {
        encode_request(method, target, headers, added, &self.host, None)
    }

    /// Sends a request whose whole body is `body`, head and body in one
    /// write; otherwise as [`AppClient::send_encoded`]. The body's length frames
    /// it: a `Content-Length` or `Transfer-Encoding` in `headers` (a
    /// forwarded one, say) is left out.
    pub async fn send_full(
        &self,
        method: &Method,
        target: &str,
        headers: &HeaderMap,
        added: &Added,
        body: &[u8],
        file: OwnedSemaphorePermit,
    ) -> Result<Response<Body>, ProxyError> {
        let request = encode_request(method, target, headers, added, &self.host, Some(body));
        self.send_encoded(method, &request, file).await
    }

    /// Sends an encoded request (see [`AppClient::encode`]) and returns
    /// the app's answer, its body streaming from the app's connection.
    /// `file` (the connection's place in the open-file budget) is held
    /// until that body has been read or dropped. The caller bounds the wait
    /// with `upstream.timeout`.
    pub async fn send_encoded(
        &self,
        method: &Method,
        request: &[u8],
        file: OwnedSemaphorePermit,
    ) -> Result<Response<Body>, ProxyError> {
        let mut pooled = true;
        loop {
            let (mut conn, reused) = match pooled.then(|| self.pool().checkout()).flatten() {
                Some(conn) => (conn, true),
                None => (self.connect().await?, false),
            };
            // Whatever happens now, a second try is on a new connection.
            pooled = false;
            match exchange(&mut conn, request).await {
                Ok(head) => return Ok(self.respond(method, conn, head, file)),
                // A kept-alive connection the app closed while it was idle:
                // the request did not reach the app, or (for a method safe
                // to repeat) got no answer at all. Another connection.
                Err(Exchange::Unsent(_)) if reused => continue,
                Err(Exchange::Unanswered(_)) if reused && method.is_idempotent() => continue,
                Err(Exchange::Unsent(err) | Exchange::Unanswered(err)) => {
                    return Err(failed(err));
                }
                Err(Exchange::Invalid(err)) => return Err(err),
            }
        }
    }

    fn respond(
        &self,
        method: &Method,
        mut conn: Conn,
        head: Head,
        file: OwnedSemaphorePermit,
    ) -> Response<Body> {
        let Head {
            status,
            mut headers,
            framing,
            keep_alive,
        } = head;
        let framing = if method == Method::HEAD {
            Framing::Length(0)
        } else {
            framing
        };
        // Written whole by `exchange`; read whole once the framing is done.
        let outcome = Outcome {
            request_whole: true,
            answer_whole: false,
            keep_alive,
        };
        let body = match framing {
            // The common case: the whole body came with the head.
            Framing::Length(len) if conn.buf.len() as u64 >= len => {
                let data = conn.buf.split_to(len as usize).freeze();
                let answered = Outcome {
                    answer_whole: true,
                    ..outcome
                };
                self.pool().release(conn, answered);
                drop(file);
                if data.is_empty() {
                    body::empty()
                } else {
                    body::full(data)
                }
            }
            framing => body::stream(AppBody {
                conn: Some(conn),
                framing,
                outcome,
                pool: Arc::clone(self.pool()),
                file: Some(file),
            }),
        };
        if matches!(framing, Framing::Chunked(_)) {
            // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3).
            headers.remove(header::CONTENT_LENGTH);
        }
        let mut response = Response::new(body);
        *response.status_mut() = status;
        *response.version_mut() = Version::HTTP_11;
        *response.headers_mut() = headers;
        response
    }
}

/// The request line and fields, and `body` when there is one, written in
/// one go.
fn encode_request(
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    added: &Added,
    default_host: &HeaderValue,
    body: Option<&[u8]>,
) -> Vec<u8> {
    let fields: usize = headers
        .iter()
        .chain(added.iter())
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    let body_len = body.map_or(0, <[u8]>::len);
    let mut buf = Vec::with_capacity(method.as_str().len() + target.len() + fields + body_len + 96);
    buf.put_slice(method.as_str().as_bytes());
    buf.put_u8(b' ');
    buf.put_slice(target.as_bytes());
    buf.put_slice(b" HTTP/1.1\r\n");
    if !headers.contains_key(header::HOST) && !added.iter().any(|(name, _)| name == header::HOST) {
        put_field(&mut buf, header::HOST.as_str(), default_host);
    }
    // The framing the app reads is written here, never copied from the
    // client: `headers` may carry a length in any form hyper accepted
    // (`0, 0`, `00`) that the app might read otherwise.
    let mut had_length = false;
    for (name, value) in headers.iter().chain(added.iter()) {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            had_length = true;
        } else {
            put_field(&mut buf, name.as_str(), value);
        }
    }
    match body {
        Some(body) => {
            write!(buf, "content-length: {}\r\n\r\n", body.len()).expect("a Vec takes every write");
            buf.put_slice(body);
        }
        None => {
            // A method that expects a body, or a request that gave a
            // length, is told plainly that this one has none.
            let expects_body = [Method::POST, Method::PUT, Method::PATCH].contains(method);
            if expects_body || had_length {
                buf.put_slice(b"content-length: 0\r\n");
            }
            buf.put_slice(b"\r\n");
        }
    }
    buf
}

fn put_field(buf: &mut Vec<u8>, name: &str, value: &HeaderValue) {
    buf.put_slice(name.as_bytes());
    buf.put_slice(b": ");
    buf.put_slice(value.as_bytes());
    buf.put_slice(b"\r\n");
}

/// How an exchange on one connection ended without an answer.
enum Exchange {
    /// Writing the request failed: the app saw at most part of it.
    Unsent(io::Error),
    /// The app closed or reset the connection before any byte of an answer.
    Unanswered(io::Error),
    /// The app answered something that is not a valid answer.
    Invalid(ProxyError),
}

/// An answer's head, parsed.
struct Head {
    status: StatusCode,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
}

/// Writes `request` and reads the answer's head; the body (or its start) is
/// left in `conn.buf`.
async fn exchange(conn: &mut Conn, request: &[u8]) -> Result<Head, Exchange> {
    conn.stream
        .write_all(request)
        .await
        .map_err(Exchange::Unsent)?;
    let mut answered = false;
    loop {
        if !conn.buf.is_empty() {
            answered = true;
            if let Some(head) = parse_head(&mut conn.buf).map_err(Exchange::Invalid)? {
                return Ok(head);
            }
        }
        match conn.fill().await {
            Ok(0) if !answered => {
                return Err(Exchange::Unanswered(io::ErrorKind::UnexpectedEof.into()))
            }
            Ok(0) => {
                return Err(Exchange::Invalid(failed(
                    "the app closed the connection in the middle of its answer head",
                )))
            }
            Ok(_) => {}
            Err(err) if !answered => return Err(Exchange::Unanswered(err)),
            Err(err) => return Err(Exchange::Invalid(failed(err))),
        }
    }
}

/// Parses a complete answer head off the front of `buf`, skipping interim
/// (1xx) answers; `None` when more bytes are needed.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, ProxyError> {
    loop {
        // Left uninitialised: httparse writes only the fields it finds, and
        // zeroing room for a hundred on every answer costs more than parsing.
        let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut answer = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut answer,
            buf,
            &mut fields,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Ok(None),
            Ok(_) => {
                return Err(failed(format!(
                    "the app's answer head is larger than {} KiB",
                    MAX_HEAD / 1024
                )))
            }
            Err(err) => return Err(failed(format!("the app's answer is not HTTP/1.1: {err}"))),
        };
        let code = answer.code.unwrap_or_default();
        let status = StatusCode::from_u16(code)
            .map_err(|_| failed(format!("the app answered with status {code}")))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(failed("the app switched protocols without being asked to"));
        }
        if status.is_informational() {
            buf.advance(len);
            continue;
        }
        // Framing and keep-alive come from the raw fields, one pass of
        // length-first name comparisons, not from lookups in the map.
        let fields: &[httparse::Header<'_>] = answer.headers;
        let framing = framing(status, fields)?;
        let keep_alive = keeps_alive(answer.version.unwrap_or_default(), fields);
        let spans = Spans::of(buf, fields);
        let headers = spans.take(buf, len).map_err(failed)?;
        return Ok(Some(Head {
            status,
            headers,
            framing,
            keep_alive,
        }));
    }
}

/// Where each parsed field lies in the buffer it was parsed from, so that
/// the map made of them shares those bytes instead of copying each value.
/// Offsets fit in `u32` (a head is at most [`MAX_HEAD`] bytes); room for a
/// typical answer's fields is kept inline, not zeroed, and more spill over.
struct Spans {
    /// Name start and end, value start and end.
    spans: SmallVec<[[u32; 4]; 16]>,
}

impl Spans {
    fn of(buf: &[u8], fields: &[httparse::Header<'_>]) -> Spans {
        let base = buf.as_ptr() as usize;
        let offset = |part: &[u8]| (part.as_ptr() as usize - base) as u32;
        let spans = fields
            .iter()
            .map(|field| {
                let name = offset(field.name.as_bytes());
                let value = offset(field.value);
                [
                    name,
                    name + field.name.len() as u32,
                    value,
                    value + field.value.len() as u32,
                ]
            })
            .collect();
        Spans { spans }
    }

    /// Takes the parsed section (`len` bytes) off the front of `buf` and
    /// returns its fields.
    fn take(&self, buf: &mut BytesMut, len: usize) -> Result<HeaderMap, String> {
        let section = buf.split_to(len).freeze();
        let mut map = HeaderMap::with_capacity(self.spans.len());
        for &[name_start, name_end, value_start, value_end] in &self.spans {
            let (name, value) = (
                name_start as usize..name_end as usize,
                value_start as usize..value_end as usize,
            );
            let name = HeaderName::from_bytes(&section[name])
                .map_err(|err| format!("the app sent a bad field name: {err}"))?;
            let value = HeaderValue::from_maybe_shared(section.slice(value))
                .map_err(|err| format!("the app sent a bad value for {name}: {err}"))?;
            map.append(name, value);
        }
        Ok(map)
    }
}

/// An answer's header fields: the raw ones `httparse` found, or the map
/// hyper's client made. Framing and keep-alive are read the same way from
/// either.
pub(super) trait Fields {
    /// The values of the fields called `name` (lower case), in order.
    fn values<'a>(&'a self, name: &'static str) -> impl Iterator<Item = &'a [u8]> + 'a;
}

impl Fields for [httparse::Header<'_>] {
    fn values<'a>(&'a self, name: &'static str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |field| field.name.eq_ignore_ascii_case(name))
            .map(|field| field.value)
    }
}

impl Fields for HeaderMap {
    fn values<'a>(&'a self, name: &'static str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.get_all(name).iter().map(HeaderValue::as_bytes)
    }
}

/// The comma-separated elements of the fields called `name`, trimmed, the
/// empty ones left out.
fn tokens<'a, F: Fields + ?Sized>(
    fields: &'a F,
    name: &'static str,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    fields
        .values(name)
        .flat_map(|value| value.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|token| !token.is_empty())
}

/// Whether an answer in HTTP/1.`minor` with these fields lets its
/// connection be kept: HTTP/1.1, and no `close` among the `Connection`
/// tokens.
pub(super) fn keeps_alive<F: Fields + ?Sized>(minor: u8, fields: &F) -> bool {
    minor == 1 && !tokens(fields, "connection").any(|t| t.eq_ignore_ascii_case(b"close"))
}

/// How the body of an answer with `status` and these fields ends.
pub(super) fn framing<F: Fields + ?Sized>(
    status: StatusCode,
    fields: &F,
) -> Result<Framing, ProxyError> {
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Length(0));
    }
    if fields.values("transfer-encoding").next().is_some() {
        // Chunked only when it is the last coding; any other last coding
        // (or one that is not text) leaves the body to end at close.
        let last = tokens(fields, "transfer-encoding").last();
        return Ok(match last {
            Some(coding) if coding.eq_ignore_ascii_case(b"chunked") => {
                Framing::Chunked(Chunked::Size)
            }
            _ => Framing::Close,
        });
    }
    let mut length = None;
    for value in fields.values("content-length") {
        for part in value.split(|&b| b == b',') {
            let part = part.trim_ascii();
            let parsed = (!part.is_empty() && part.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(part).ok()?.parse::<u64>().ok())
                .flatten();
            match (parsed, length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => {
                    return Err(failed(format!(
                        "the app sent an invalid Content-Length: {:?}",
                        String::from_utf8_lossy(value)
                    )))
                }
            }
        }
    }
    Ok(length.map_or(Framing::Close, Framing::Length))
}

/// How an answer's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// After this many more bytes.
    Length(u64),
    /// At the last chunk.
    Chunked(Chunked),
    /// When the app closes the connection.
    Close,
}

/// Where a chunked body's reader stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunked {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk, with this many bytes left.
    Data(u64),
    /// Before the CRLF that ends a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
    Done,
}

/// What the next step through a body gave.
#[derive(Debug)]
enum Step {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
    /// Nothing more until more bytes arrive.
    More,
}

impl Framing {
    /// The next step through the body, taken from the front of `buf`. `eof`:
    /// the app has closed the connection, and `buf` is all there will be.
    fn step(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Step, BoxError> {
        let step = match self {
            Framing::Length(0) => Step::End,
            Framing::Length(left) if !buf.is_empty() => {
                let take = (*left).min(buf.len() as u64);
                *left -= take;
                Step::Data(buf.split_to(take as usize).freeze())
            }
            Framing::Length(_) => Step::More,
            Framing::Close if !buf.is_empty() => Step::Data(buf.split().freeze()),
            Framing::Close if eof => Step::End,
            Framing::Close => Step::More,
            Framing::Chunked(chunked) => chunked.step(buf)?,
        };
        match step {
            Step::More if eof => {
                Err("the app closed the connection before the end of the body".into())
            }
            step => Ok(step),
        }
    }

    fn is_done(&self) -> bool {
        matches!(self, Framing::Length(0) | Framing::Chunked(Chunked::Done))
    }
}

impl Chunked {
    fn step(&mut self, buf: &mut BytesMut) -> Result<Step, BoxError> {
        loop {
            match *self {
                Chunked::Size => {
                    let Some(end) = find_crlf(buf, MAX_CHUNK_LINE)? else {
                        return Ok(Step::More);
                    };
                    let size = chunk_size(&buf[..end])?;
                    buf.advance(end + 2);
                    *self = match size {
                        0 => Chunked::Trailers,
                        size => Chunked::Data(size),
                    };
                }
                Chunked::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let take = left.min(buf.len() as u64);
                    *self = match left - take {
                        0 => Chunked::DataEnd,
                        left => Chunked::Data(left),
                    };
                    return Ok(Step::Data(buf.split_to(take as usize).freeze()));
                }
                Chunked::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("a chunk of the app's body is longer than its size".into());
                    }
                    buf.advance(2);
                    *self = Chunked::Size;
                }
                Chunked::Trailers => {
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let (len, spans) = match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((len, fields))) => {
                            (len, Spans::of(buf, fields))
                        }
                        Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILERS => {
                            return Err(format!(
                                "the app's trailers are larger than {} KiB",
                                MAX_TRAILERS / 1024
                            )
                            .into())
                        }
                        Ok(httparse::Status::Partial) => return Ok(Step::More),
                        Err(err) => return Err(format!("the app sent bad trailers: {err}").into()),
                    };
                    let trailers = spans.take(buf, len)?;
                    *self = Chunked::Done;
                    if !trailers.is_empty() {
                        return Ok(Step::Trailers(trailers));
                    }
                }
                Chunked::Done => return Ok(Step::End),
            }
        }
    }
}

/// Where the first CRLF in `buf` starts; an error when there is none within
/// `limit` bytes.
fn find_crlf(buf: &[u8], limit: usize) -> Result<Option<usize>, BoxError> {
    match buf.windows(2).position(|pair| pair == b"\r\n") {
        Some(end) => Ok(Some(end)),
        None if buf.len() > limit => Err("a chunk-size line of the app's body is too long".into()),
        None => Ok(None),
    }
}

/// The size on a chunk-size line: hex digits, then optional extensions.
fn chunk_size(line: &[u8]) -> Result<u64, BoxError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let rest = line[digits..].trim_ascii_start();
    if digits == 0 || digits > 16 || !(rest.is_empty() || rest[0] == b';') {
        return Err(format!(
            "the app sent a bad chunk size: {:?}",
            String::from_utf8_lossy(&line[..line.len().min(32)])
        )
        .into());
    }
    let digits = std::str::from_utf8(&line[..digits]).expect("hex digits are ASCII");
    Ok(u64::from_str_radix(digits, 16).expect("at most 16 hex digits fit a u64"))
}

/// An answer's body, read from the app's connection as it is asked for; the
/// connection goes back to the pool when the body has ended cleanly.
struct AppBody {
    /// `None` once the body has ended.
    conn: Option<Conn>,
    framing: Framing,
    outcome: Outcome,
    pool: Arc<Pool>,
    file: Option<OwnedSemaphorePermit>,
}

impl AppBody {
    /// Ends the body: the connection goes back by the rule, read whole
    /// only when the framing says the answer is done.
    fn finish(&mut self) {
        self.outcome.answer_whole = self.framing.is_done();
        if let Some(conn) = self.conn.take() {
            self.pool.release(conn, self.outcome);
        }
        self.file = None;
    }
}

impl http_body::Body for AppBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut eof = false;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let step = match this.framing.step(&mut conn.buf, eof) {
                Ok(step) => step,
                Err(err) => {
                    this.finish();
                    return Poll::Ready(Some(Err(err)));
                }
            };
            let frame = match step {
                Step::Data(data) => Frame::data(data),
                Step::Trailers(trailers) => Frame::trailers(trailers),
                Step::End => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Step::More => {
                    match ready!(conn.poll_fill(cx)) {
                        Ok(0) => eof = true,
                        Ok(_) => {}
                        Err(err) => {
                            this.finish();
                            return Poll::Ready(Some(Err(err.into())));
                        }
                    }
                    continue;
                }
            };
            if this.framing.is_done() {
                // Back in the pool now, not when the client asks again.
                this.finish();
            }
            return Poll::Ready(Some(Ok(frame)));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (self.conn.is_some(), self.framing) {
            (false, _) => SizeHint::with_exact(0),
            (true, Framing::Length(left)) => SizeHint::with_exact(left),
            (true, _) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests;
