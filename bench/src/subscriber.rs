//! One subscriber of `pushgate-bench broadcast`: connects, reads what the
//! server pushes on its channel, and checks the sequence.
//!
//! SSE and WebSocket clients are hand-written on plain `TcpStream`s
//! (HTTP/1.1 chunked SSE, RFC 6455 frames) with a 2 KiB read buffer each, one
//! small task per connection, so that 10,000 of them cost the load generator
//! little. A Pusher subscriber is the same WebSocket client speaking Pusher's
//! protocol 7 over its text frames. Long-poll clients use hyper's HTTP/1.1
//! client connection, one keep-alive connection per subscriber.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::header::{HeaderValue, ETAG, HOST, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

use crate::broadcast::{Target, Transport};
use crate::grip;

/// Initial read buffer of one subscriber; grows only for a larger message.
const READ_BUFFER: usize = 2048;
/// Largest response head accepted from the server.
const MAX_HEAD: usize = 16 * 1024;
/// Largest message a compressed one may inflate to.
const MAX_MESSAGE: usize = 16 << 20;
/// Highest sequence number a subscriber tracks (bounds its bitmap).
const MAX_SEQ: u64 = 1 << 24;

/// Microseconds since the Unix epoch: the clock every shard shares.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A histogram of microseconds, up to an hour, at 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("bounds")
}

/// What every subscriber adds to.
pub struct Shared {
    pub latency: Mutex<Histogram<u64>>,
    /// Each publication's first and last receipt, by channel and sequence
    /// number: how long the fan-out took to start, and to end.
    pub spans: Mutex<HashMap<(usize, u64), Span>>,
    pub received: AtomicU64,
    pub connected: AtomicUsize,
    /// Subscribers connected, per channel.
    pub connected_on: Vec<AtomicUsize>,
    pub failed: AtomicUsize,
    /// Connections the server ended (or broke) before the end of the run.
    pub closed: AtomicUsize,
    /// Messages that were not a well-formed envelope with `seq` and `t`.
    pub malformed: AtomicU64,
    pub dups: AtomicU64,
    pub reorders: AtomicU64,
    pub gaps: AtomicU64,
    /// Highest sequence number seen per channel, plus one.
    pub seq_end: Vec<AtomicU64>,
    pub first_error: Mutex<Option<String>>,
    /// Bytes read off WebSocket and SSE connections after their answer's
    /// head: what crossed the wire for the deliveries.
    pub wire_bytes: AtomicU64,
}

impl Shared {
    pub fn new(channels: usize) -> Shared {
        Shared {
            latency: Mutex::new(histogram()),
            spans: Mutex::default(),
            received: AtomicU64::new(0),
            connected: AtomicUsize::new(0),
            connected_on: (0..channels).map(|_| AtomicUsize::new(0)).collect(),
            failed: AtomicUsize::new(0),
            closed: AtomicUsize::new(0),
            malformed: AtomicU64::new(0),
            dups: AtomicU64::new(0),
            reorders: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            seq_end: (0..channels).map(|_| AtomicU64::new(0)).collect(),
            first_error: Mutex::new(None),
            wire_bytes: AtomicU64::new(0),
        }
    }

    pub fn error(&self, msg: String) {
        let mut first = self.first_error.lock().unwrap();
        if first.is_none() {
            *first = Some(msg);
        }
    }

    pub fn first_error(&self) -> Option<String> {
        self.first_error.lock().unwrap().clone()
    }
}

/// When one publication was published and first and last received
/// (microseconds since the Unix epoch, [`now_us`]).
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub published: u64,
    pub first: u64,
    pub last: u64,
}

/// How to reach the server, shared by every subscriber.
pub struct Dial {
    pub public: SocketAddr,
    pub target: Target,
    pub transport: Transport,
    /// Channel names, by index.
    pub channels: Vec<String>,
    /// Seconds a pushgate long-poll waits.
    pub poll_timeout: u64,
    /// The Pusher app's key (`/app/{key}`), for the Pusher transport.
    pub pusher_key: Option<String>,
    /// WebSocket subscribers offer permessage-deflate (as browsers do) and
    /// inflate what comes compressed.
    pub deflate: bool,
}

impl Dial {
    /// The subscribe URL's path and query for one channel.
    fn path(&self, channel: &str) -> String {
        match (self.target, self.transport) {
            (Target::Pushgate, Transport::Sse) => format!("/realtime/sse?channel={channel}"),
            (Target::Pushgate, Transport::Ws) => format!("/realtime/ws?channel={channel}"),
            (Target::Pushgate, Transport::Poll) => format!("/realtime/poll?channel={channel}"),
            // The channel is named in `pusher:subscribe`, not in the URL.
            (Target::Pushgate, Transport::Pusher) => {
                let key = self.pusher_key.as_deref().unwrap_or_default();
                format!("/app/{key}?protocol=7")
            }
            (Target::Nchan, _) => format!("/sub/{channel}"),
            (Target::Pushpin, Transport::Ws) => format!("{}?channel={channel}", grip::WS_PATH),
            (Target::Pushpin, _) => format!("{}?channel={channel}", grip::SSE_PATH),
        }
    }

    /// The request that opens an SSE stream or a WebSocket.
    fn stream_request(&self, channel: &str) -> Vec<u8> {
        let mut request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\n",
            self.path(channel),
            self.public
        );
        match self.transport {
            Transport::Ws | Transport::Pusher => {
                request.push_str(
                    "Upgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Key: cHVzaGdhdGUtYmVuY2gtMQ==\r\nSec-WebSocket-Version: 13\r\n",
                );
                if self.deflate {
                    // What Chromium offers.
                    request.push_str(
                        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
                    );
                }
                request.push_str("\r\n");
            }
            _ => request.push_str("Accept: text/event-stream\r\n\r\n"),
        }
        request.into_bytes()
    }
}

/// What a subscriber receives: pushgate's envelope, or (Nchan, Pushpin) the
/// published body itself.
#[derive(Deserialize)]
#[serde(untagged)]
enum Envelope {
    Wrapped { data: Payload },
    Bare(Payload),
}

/// What every publication carries: its sequence number on its channel and
/// when it was published (µs since the Unix epoch).
#[derive(Deserialize)]
struct Payload {
    seq: u64,
    t: u64,
}

/// A Pusher event: `{"event","channel"?,"data"?}`. A channel event's data
/// is the publisher's string (here the [`Payload`]'s JSON); the server's own
/// events carry a string or an object.
#[derive(Deserialize)]
struct PusherEvent<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

/// A pushgate long-poll answer (what the check needs of it).
#[derive(Deserialize)]
struct PollAnswer {
    messages: Vec<serde_json::Value>,
    cursor: String,
}

/// One subscriber's view of its channel's sequence.
struct SeqCheck {
    channel: usize,
    connected: bool,
    seen: Vec<u64>,
    max: Option<u64>,
    unique: u64,
}

impl SeqCheck {
    fn new(channel: usize) -> SeqCheck {
        SeqCheck {
            channel,
            connected: false,
            seen: Vec::new(),
            max: None,
            unique: 0,
        }
    }

    /// The server has taken the subscription (as far as the client can
    /// tell): from here on a failure is a disconnection, not a failed
    /// connect.
    fn connected(&mut self, shared: &Shared) {
        if !self.connected {
            self.connected = true;
            shared.connected.fetch_add(1, Relaxed);
            shared.connected_on[self.channel].fetch_add(1, Relaxed);
        }
    }

    fn on_message(&mut self, json: &[u8], shared: &Shared) {
        match serde_json::from_slice::<Envelope>(json) {
            Ok(envelope) => self.on_envelope(envelope, shared),
            Err(_) => {
                shared.malformed.fetch_add(1, Relaxed);
            }
        }
    }

    fn on_envelope(&mut self, envelope: Envelope, shared: &Shared) {
        let (Envelope::Wrapped { data: payload } | Envelope::Bare(payload)) = envelope;
        self.on_payload(payload, shared);
    }

    fn on_payload(&mut self, Payload { seq, t }: Payload, shared: &Shared) {
        let now = now_us();
        shared.received.fetch_add(1, Relaxed);
        shared
            .latency
            .lock()
            .unwrap()
            .saturating_record(now.saturating_sub(t).max(1));
        shared
            .spans
            .lock()
            .unwrap()
            .entry((self.channel, seq))
            .and_modify(|span| {
                span.first = span.first.min(now);
                span.last = span.last.max(now);
            })
            .or_insert(Span {
                published: t,
                first: now,
                last: now,
            });
        if seq >= MAX_SEQ {
            shared.malformed.fetch_add(1, Relaxed);
            return;
        }
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if word >= self.seen.len() {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & bit != 0 {
            shared.dups.fetch_add(1, Relaxed);
            return;
        }
        self.seen[word] |= bit;
        self.unique += 1;
        match self.max {
            Some(max) if seq < max => {
                shared.reorders.fetch_add(1, Relaxed);
            }
            _ => self.max = Some(seq),
        }
        shared.seq_end[self.channel].fetch_max(seq + 1, Relaxed);
    }

    /// Sequence numbers below the highest seen that never came.
    fn gaps(&self) -> u64 {
        self.max.map_or(0, |max| max + 1 - self.unique)
    }
}

/// Subscriber `index` on channel `channel`: runs until `stop`, then adds its
/// gaps to `shared`.
pub async fn subscriber(
    index: usize,
    channel: usize,
    bind: Option<IpAddr>,
    dial: &Dial,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
) {
    let mut check = SeqCheck::new(channel);
    let outcome = tokio::select! {
        r = subscribe(dial, bind, &mut check, shared) => Some(r),
        _ = stop.wait_for(|stop| *stop) => None,
    };
    let why = match outcome {
        None => None,
        Some(Ok(why)) => Some(why),
        Some(Err(err)) => Some(err.to_string()),
    };
    match (why, check.connected) {
        (Some(why), true) => {
            shared.closed.fetch_add(1, Relaxed);
            shared.error(format!("subscriber {index} ended early: {why}"));
        }
        (Some(why), false) => {
            shared.failed.fetch_add(1, Relaxed);
            shared.error(format!("subscriber {index}: {why}"));
        }
        (None, true) => {}
        (None, false) => {
            shared.failed.fetch_add(1, Relaxed);
            shared.error(format!("subscriber {index}: not connected by the end"));
        }
    }
    shared.gaps.fetch_add(check.gaps(), Relaxed);
}

/// Connects and reads until the connection ends; returns why it ended.
async fn subscribe(
    dial: &Dial,
    bind: Option<IpAddr>,
    check: &mut SeqCheck,
    shared: &Shared,
) -> io::Result<String> {
    let mut stream = connect(dial.public, bind).await?;
    let channel = &dial.channels[check.channel];
    if dial.transport == Transport::Poll {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(conn);
        let poll = Poll {
            sender,
            host: dial.public.to_string(),
            path: dial.path(channel),
        };
        return match dial.target {
            Target::Nchan => poll.nchan(check, shared).await,
            _ => poll.pushgate(dial.poll_timeout, check, shared).await,
        };
    }
    stream.write_all(&dial.stream_request(channel)).await?;
    let mut buf = Vec::with_capacity(READ_BUFFER);
    let head = read_head(&mut stream, &mut buf).await?;
    let expected = match dial.transport {
        Transport::Ws | Transport::Pusher => "101",
        _ => "200",
    };
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != expected {
        let first = head.lines().next().unwrap_or("");
        return Ok(format!("answered `{first}`"));
    }
    if dial.deflate
        && !head
            .to_ascii_lowercase()
            .contains("\r\nsec-websocket-extensions: permessage-deflate")
    {
        return Ok("permessage-deflate was offered and not taken".into());
    }
    // A Pusher subscriber is connected once the server confirms its
    // subscription.
    if dial.transport != Transport::Pusher {
        check.connected(shared);
    }
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
    match dial.transport {
        Transport::Ws => read_ws(&mut stream, buf, &Speaking::Pushgate, check, shared).await,
        Transport::Pusher => {
            read_ws(
                &mut stream,
                buf,
                &Speaking::Pusher { channel },
                check,
                shared,
            )
            .await
        }
        _ => read_sse(&mut stream, buf, chunked, check, shared).await,
    }
}

/// A TCP connection to `addr`, from `bind` if given.
pub async fn connect(addr: SocketAddr, bind: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = bind {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A long-poll subscriber's keep-alive connection.
struct Poll {
    sender: SendRequest<Empty<Bytes>>,
    host: String,
    path: String,
}

impl Poll {
    async fn get(
        &mut self,
        uri: &str,
        validators: &[(http::HeaderName, HeaderValue)],
    ) -> io::Result<http::Response<Bytes>> {
        let mut request = Request::get(uri).header(HOST, &self.host);
        for (name, value) in validators {
            request = request.header(name, value);
        }
        let request = request.body(Empty::new()).map_err(io::Error::other)?;
        self.sender.ready().await.map_err(io::Error::other)?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(io::Error::other)?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(io::Error::other)?.to_bytes();
        Ok(http::Response::from_parts(parts, body))
    }

    /// pushgate: a first poll with `timeout=0` for the cursor of "now", then
    /// `since=<cursor>` polls one after the other.
    async fn pushgate(
        mut self,
        timeout: u64,
        check: &mut SeqCheck,
        shared: &Shared,
    ) -> io::Result<String> {
        let mut uri = format!("{}&timeout=0", self.path);
        loop {
            let response = self.get(&uri, &[]).await?;
            if response.status() != StatusCode::OK {
                return Ok(format!("answered {}", response.status()));
            }
            let answer: PollAnswer =
                serde_json::from_slice(response.body()).map_err(io::Error::other)?;
            for message in answer.messages {
                match Envelope::deserialize(message) {
                    Ok(envelope) => check.on_envelope(envelope, shared),
                    Err(_) => {
                        shared.malformed.fetch_add(1, Relaxed);
                    }
                }
            }
            check.connected(shared);
            uri = format!("{}&since={}&timeout={timeout}", self.path, answer.cursor);
        }
    }

    /// Nchan: one message per answer; the next request names the last one
    /// with `If-Modified-Since` and `If-None-Match` (its `Last-Modified` and
    /// `Etag`). The first request asks for the oldest message in the
    /// channel's buffer (Nchan's default), so a subscription Nchan takes a
    /// little late still gets every publication.
    async fn nchan(mut self, check: &mut SeqCheck, shared: &Shared) -> io::Result<String> {
        let mut validators = Vec::new();
        let uri = self.path.clone();
        check.connected(shared);
        loop {
            let response = self.get(&uri, &validators).await?;
            match response.status() {
                StatusCode::OK => {}
                // Nothing new before Nchan's timeout: ask again.
                StatusCode::NOT_MODIFIED | StatusCode::REQUEST_TIMEOUT => continue,
                status => return Ok(format!("answered {status}")),
            }
            check.on_message(response.body(), shared);
            validators.clear();
            for (header, validator) in [(LAST_MODIFIED, IF_MODIFIED_SINCE), (ETAG, IF_NONE_MATCH)] {
                if let Some(value) = response.headers().get(header) {
                    validators.push((validator, value.clone()));
                }
            }
        }
    }
}

/// Reads the response head into a string; what follows it stays in `buf`.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<String> {
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            return Ok(head);
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::other("response head too large"));
        }
        if read_more(stream, buf).await? == 0 {
            return Err(io::Error::other("closed before the response head"));
        }
    }
}

/// Appends whatever the socket has to `buf`; 0 at end of stream.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    if buf.capacity() - buf.len() < 512 {
        buf.reserve(READ_BUFFER);
    }
    stream.read_buf(buf).await
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads an event stream until it ends; returns why it ended.
async fn read_sse(
    stream: &mut TcpStream,
    mut raw: Vec<u8>,
    chunked: bool,
    check: &mut SeqCheck,
    shared: &Shared,
) -> io::Result<String> {
    // `raw` holds undecoded bytes; `body` the decoded event stream.
    let mut body = Vec::with_capacity(if chunked { 512 } else { 0 });
    let mut chunk_left: Option<usize> = None;
    loop {
        let events = if chunked {
            loop {
                match chunk_left {
                    Some(0) => {
                        if raw.len() < 2 {
                            break;
                        }
                        raw.drain(..2);
                        chunk_left = None;
                    }
                    Some(n) => {
                        if raw.is_empty() {
                            break;
                        }
                        let take = n.min(raw.len());
                        body.extend_from_slice(&raw[..take]);
                        raw.drain(..take);
                        chunk_left = Some(n - take);
                    }
                    None => {
                        let Some(end) = find(&raw, b"\r\n") else {
                            break;
                        };
                        let line = std::str::from_utf8(&raw[..end]).unwrap_or("");
                        let size = line.split(';').next().unwrap_or("").trim();
                        let size = usize::from_str_radix(size, 16)
                            .map_err(|_| io::Error::other("bad chunk size"))?;
                        raw.drain(..end + 2);
                        if size == 0 {
                            return Ok("the server ended the stream".into());
                        }
                        chunk_left = Some(size);
                    }
                }
            }
            &mut body
        } else {
            &mut raw
        };
        let mut start = 0;
        while let Some(end) = find(&events[start..], b"\n\n") {
            let event = &events[start..start + end];
            for line in event.split(|&b| b == b'\n') {
                if let Some(data) = line.strip_prefix(b"data:") {
                    let data = data.strip_prefix(b" ").unwrap_or(data);
                    check.on_message(data, shared);
                }
            }
            start += end + 2;
        }
        events.drain(..start);
        let read = read_more(stream, &mut raw).await?;
        shared.wire_bytes.fetch_add(read as u64, Relaxed);
        if read == 0 {
            return Ok("the server closed the connection".into());
        }
    }
}

/// What a WebSocket subscriber's text frames carry.
enum Speaking<'a> {
    /// pushgate's own protocol: every text frame is an envelope (the
    /// channel was named in the URL).
    Pushgate,
    /// Pusher's protocol 7: once the connection is established, subscribe
    /// to `channel`; the subscriber is connected when the server confirms
    /// it, and every channel event's data is a [`Payload`] as a JSON string.
    Pusher { channel: &'a str },
}

impl Speaking<'_> {
    /// Takes one text message; answers the text to send back, if any, or
    /// why the subscription ended.
    fn on_text(
        &self,
        text: &[u8],
        check: &mut SeqCheck,
        shared: &Shared,
    ) -> Result<Option<String>, String> {
        let Speaking::Pusher { channel } = self else {
            check.on_message(text, shared);
            return Ok(None);
        };
        let Ok(event) = serde_json::from_slice::<PusherEvent>(text) else {
            shared.malformed.fetch_add(1, Relaxed);
            return Ok(None);
        };
        let data = event.data.map_or("null", RawValue::get);
        match event.event.as_ref() {
            "pusher:connection_established" => {
                let subscribe = serde_json::json!({
                    "event": "pusher:subscribe",
                    "data": {"channel": channel},
                });
                Ok(Some(subscribe.to_string()))
            }
            "pusher_internal:subscription_succeeded" => {
                check.connected(shared);
                Ok(None)
            }
            "pusher:ping" => Ok(Some(r#"{"event":"pusher:pong","data":{}}"#.into())),
            "pusher:error" | "pusher:subscription_error" => Err(format!("{}: {data}", event.event)),
            name if name.starts_with("pusher") => Ok(None),
            _ => {
                let payload = serde_json::from_str::<String>(data)
                    .ok()
                    .and_then(|text| serde_json::from_str::<Payload>(&text).ok());
                match payload {
                    Some(payload) => check.on_payload(payload, shared),
                    None => {
                        shared.malformed.fetch_add(1, Relaxed);
                    }
                }
                Ok(None)
            }
        }
    }
}

/// Reads WebSocket frames until the connection ends; answers pings, and
/// whatever the protocol spoken answers.
async fn read_ws(
    stream: &mut TcpStream,
    mut buf: Vec<u8>,
    speaking: &Speaking<'_>,
    check: &mut SeqCheck,
    shared: &Shared,
) -> io::Result<String> {
    let mut fragments: Vec<u8> = Vec::new();
    // The message being read came compressed (RSV1 on its first frame).
    let mut compressed = false;
    let mut inflated: Vec<u8>;
    loop {
        while let Some((fin, opcode, start, len)) = frame(&buf) {
            let payload = &buf[start..start + len];
            if opcode == 0x1 {
                compressed = buf[0] & 0x40 != 0;
            }
            let text = match opcode {
                0x1 | 0x0 if compressed => {
                    fragments.extend_from_slice(payload);
                    if fin {
                        fragments.extend_from_slice(&pushgate::deflate::TRAILER);
                        inflated = pushgate::deflate::inflate(&fragments, MAX_MESSAGE)
                            .map_err(|err| io::Error::other(format!("inflating: {err:?}")))?;
                        Some(&inflated[..])
                    } else {
                        None
                    }
                }
                0x1 if fin => Some(payload),
                0x1 | 0x0 => {
                    fragments.extend_from_slice(payload);
                    fin.then_some(&fragments[..])
                }
                0x8 => {
                    let code = if len >= 2 {
                        u16::from_be_bytes([payload[0], payload[1]])
                    } else {
                        1005
                    };
                    let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or(&[]));
                    return Ok(format!("closed by the server: {code} {reason}"));
                }
                0x9 => {
                    stream.write_all(&client_frame(0xA, payload)).await?;
                    None
                }
                _ => None,
            };
            if let Some(text) = text {
                match speaking.on_text(text, check, shared) {
                    Ok(None) => {}
                    Ok(Some(reply)) => {
                        stream
                            .write_all(&client_frame(0x1, reply.as_bytes()))
                            .await?
                    }
                    Err(why) => return Ok(why),
                }
                if fin && (opcode == 0x0 || compressed) {
                    fragments = Vec::new();
                }
            }
            buf.drain(..start + len);
        }
        let read = read_more(stream, &mut buf).await?;
        shared.wire_bytes.fetch_add(read as u64, Relaxed);
        if read == 0 {
            return Ok("the server closed the connection".into());
        }
    }
}

/// A client frame (final, of `opcode`), masked as a client's must be: an
/// all-zero key leaves the payload as it is.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(payload);
    out
}

/// A complete server frame at the start of `buf`:
/// `(fin, opcode, payload start, payload length)`.
pub fn frame(buf: &[u8]) -> Option<(bool, u8, usize, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = buf[0] & 0x0F;
    let masked = buf[1] & 0x80 != 0;
    let (len, mut start) = match buf[1] & 0x7F {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => {
            let bytes: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            (u64::from_be_bytes(bytes) as usize, 10)
        }
        n => (n as usize, 2),
    };
    if masked {
        start += 4; // servers do not mask; skip the key if one did
    }
    (buf.len() >= start + len).then_some((fin, opcode, start, len))
}
