//! `pushgate-bench broadcast`: one channel, many subscribers, a steady
//! publish rate.
//!
//! 1. Opens `--subscribers` realtime connections (SSE or WebSocket) to one
//!    channel, at most `--connect-rate` per second, each client socket bound to
//!    the next of `--bind-ips` (for more source ports) before it connects.
//! 2. Waits until the server's API (`GET /api/channels`) counts all of them
//!    on the channel, and samples the server's RSS (`--pid`): "idle".
//! 3. Publishes `{"seq": n, "t": <µs since the Unix epoch>}` through
//!    `POST /api/publish` at `--rate` per second for `--duration` seconds,
//!    sampling the server's RSS and CPU meanwhile.
//! 4. Waits (at most `--drain` seconds) for the last deliveries, then reports.
//!
//! Every subscriber checks its own sequence (gaps, duplicates, reordering) and
//! records publish→receive latency into one shared histogram. Clients are
//! hand-written on plain `TcpStream`s (HTTP/1.1 chunked SSE, RFC 6455 frames)
//! with a 2 KiB read buffer each, one small task per connection.
//!
//! For more subscribers than one process may hold sockets, run several
//! processes with `--shard i/k`: each opens its share, all wait for the whole
//! count, and only shard 0 publishes; the others infer the publication count
//! from the highest sequence they saw.

use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Args as ClapArgs, ValueEnum};
use hdrhistogram::Histogram;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

/// Initial read buffer of one subscriber; grows only for a larger message.
const READ_BUFFER: usize = 2048;
/// Largest response head accepted from the server.
const MAX_HEAD: usize = 16 * 1024;
/// Highest sequence number a subscriber tracks (bounds its bitmap).
const MAX_SEQ: u64 = 1 << 24;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// pushgate: `/realtime/sse`, `/realtime/ws`, `POST /api/publish`.
    Pushgate,
    /// Nchan (nginx): `GET /sub/<channel>` for both transports, `POST
    /// /pub/<channel>` to publish (`--public` and `--api` both name nginx);
    /// subscribers receive the published body itself.
    Nchan,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    Sse,
    Ws,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Sse => "sse",
            Transport::Ws => "ws",
        }
    }
}

/// `i/k`: this process is shard `i` of `k` (0-based).
#[derive(Clone, Copy, Debug)]
pub struct Shard {
    index: usize,
    count: usize,
}

impl FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (i, k) = s.split_once('/').ok_or("expected i/k, e.g. 0/2")?;
        let index: usize = i.trim().parse().map_err(|_| "bad shard index")?;
        let count: usize = k.trim().parse().map_err(|_| "bad shard count")?;
        if count == 0 || index >= count {
            return Err(format!("shard {index}/{count}: need 0 <= i < k"));
        }
        Ok(Shard { index, count })
    }
}

/// `127.0.0.2-127.0.0.9`, `127.0.0.1,127.0.0.3`, or a mix.
#[derive(Clone, Debug)]
pub struct BindIps(pub Vec<IpAddr>);

impl FromStr for BindIps {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut ips = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if let Some((a, b)) = part.split_once('-') {
                let a: Ipv4Addr = a.trim().parse().map_err(|e| format!("{a}: {e}"))?;
                let b: Ipv4Addr = b.trim().parse().map_err(|e| format!("{b}: {e}"))?;
                let (a, b) = (u32::from(a), u32::from(b));
                if b < a || b - a > 65_536 {
                    return Err(format!("bad range {part}"));
                }
                ips.extend((a..=b).map(|ip| IpAddr::V4(Ipv4Addr::from(ip))));
            } else {
                ips.push(part.parse().map_err(|e| format!("{part}: {e}"))?);
            }
        }
        if ips.is_empty() {
            return Err("no addresses".into());
        }
        Ok(BindIps(ips))
    }
}

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// The server under test (its URLs and publish API).
    #[arg(long, value_enum, default_value_t = Target::Pushgate)]
    target: Target,
    /// The public listener (realtime endpoints).
    #[arg(long)]
    public: SocketAddr,
    /// The API listener (publish, channel counts).
    #[arg(long)]
    api: SocketAddr,
    /// API listeners whose subscriber counts add up to the total, when
    /// subscribers are spread over several nodes (repeat it; default:
    /// `--api`).
    #[arg(long = "count-api")]
    count_api: Vec<SocketAddr>,
    /// API key, sent as `Authorization: Bearer <key>`.
    #[arg(long)]
    key: String,
    #[arg(long, value_enum)]
    transport: Transport,
    /// Subscribers in all, over every shard.
    #[arg(long)]
    subscribers: usize,
    /// The channel (letters, digits, `_.:-`).
    #[arg(long, default_value = "bench")]
    channel: String,
    /// Publications per second.
    #[arg(long)]
    rate: f64,
    /// Seconds of publishing.
    #[arg(long)]
    duration: f64,
    /// New connections per second, at most.
    #[arg(long, default_value_t = 2000.0)]
    connect_rate: f64,
    /// Source addresses for client sockets, used in turn
    /// (e.g. `127.0.0.2-127.0.0.9`); default: the kernel's choice.
    #[arg(long)]
    bind_ips: Option<BindIps>,
    /// The server's PIDs (repeat it for a server of several processes, such
    /// as nginx's workers), to report their RSS and CPU, summed.
    #[arg(long)]
    pid: Vec<u32>,
    /// This process is shard `i` of `k` and opens its share of the
    /// subscribers; only shard 0 publishes.
    #[arg(long, default_value = "0/1")]
    shard: Shard,
    /// Runtime threads: 1 is a current-thread runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Seconds to wait for the last deliveries after the last publish.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
    /// Seconds to wait for every subscriber to be counted on the channel.
    #[arg(long, default_value_t = 120.0)]
    subscribe_timeout: f64,
    /// Print the table's header line (off to append rows to an earlier table).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    header: bool,
}

pub fn run(args: Args) -> io::Result<()> {
    if args.subscribers == 0 || args.rate <= 0.0 || args.duration <= 0.0 {
        return Err(invalid(
            "--subscribers, --rate and --duration must be above 0",
        ));
    }
    if args.connect_rate <= 0.0 {
        return Err(invalid("--connect-rate must be above 0"));
    }
    if args.channel.is_empty()
        || !args
            .channel
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
    {
        return Err(invalid("--channel: letters, digits and _.:- only"));
    }
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(broadcast(args))
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

/// Microseconds since the Unix epoch: the clock every shard shares.
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// What every subscriber adds to.
struct Shared {
    latency: Mutex<Histogram<u64>>,
    received: AtomicU64,
    connected: AtomicUsize,
    failed: AtomicUsize,
    /// Connections the server ended (or broke) before the end of the run.
    closed: AtomicUsize,
    /// Messages that were not a well-formed envelope with `seq` and `t`.
    malformed: AtomicU64,
    dups: AtomicU64,
    reorders: AtomicU64,
    gaps: AtomicU64,
    /// Highest sequence number seen, plus one.
    seq_end: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    fn error(&self, msg: String) {
        let mut first = self.first_error.lock().unwrap();
        if first.is_none() {
            *first = Some(msg);
        }
    }
}

/// How to reach the server, shared by every subscriber.
struct Dial {
    public: SocketAddr,
    request: Vec<u8>,
    transport: Transport,
}

/// What a subscriber receives: pushgate's envelope, or (Nchan) the
/// published body itself.
#[derive(Deserialize)]
#[serde(untagged)]
enum Envelope {
    Wrapped { data: Payload },
    Bare(Payload),
}

#[derive(Deserialize)]
struct Payload {
    seq: u64,
    t: u64,
}

/// One subscriber's view of the sequence.
#[derive(Default)]
struct SeqCheck {
    seen: Vec<u64>,
    max: Option<u64>,
    unique: u64,
}

impl SeqCheck {
    fn on_message(&mut self, json: &[u8], shared: &Shared) {
        let now = now_us();
        let Ok(envelope) = serde_json::from_slice::<Envelope>(json) else {
            shared.malformed.fetch_add(1, Relaxed);
            return;
        };
        let (Envelope::Wrapped {
            data: Payload { seq, t },
        }
        | Envelope::Bare(Payload { seq, t })) = envelope;
        shared.received.fetch_add(1, Relaxed);
        shared
            .latency
            .lock()
            .unwrap()
            .saturating_record(now.saturating_sub(t).max(1));
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
        shared.seq_end.fetch_max(seq + 1, Relaxed);
    }

    /// Sequence numbers below the highest seen that never came.
    fn gaps(&self) -> u64 {
        self.max.map_or(0, |max| max + 1 - self.unique)
    }
}

async fn subscriber(
    index: usize,
    bind: Option<IpAddr>,
    dial: Arc<Dial>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut stream = match open(&dial, bind).await {
        Ok(stream) => stream,
        Err(err) => {
            shared.failed.fetch_add(1, Relaxed);
            shared.error(format!("subscriber {index}: {err}"));
            return;
        }
    };
    let mut buf = Vec::with_capacity(READ_BUFFER);
    let head = match read_head(&mut stream, &mut buf).await {
        Ok(head) => head,
        Err(err) => {
            shared.failed.fetch_add(1, Relaxed);
            shared.error(format!("subscriber {index}: {err}"));
            return;
        }
    };
    let expected = match dial.transport {
        Transport::Sse => "200",
        Transport::Ws => "101",
    };
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != expected {
        shared.failed.fetch_add(1, Relaxed);
        let first = head.lines().next().unwrap_or("");
        shared.error(format!("subscriber {index}: answered `{first}`"));
        return;
    }
    shared.connected.fetch_add(1, Relaxed);
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
    let mut check = SeqCheck::default();
    let result = tokio::select! {
        r = async {
            match dial.transport {
                Transport::Sse => read_sse(&mut stream, buf, chunked, &mut check, &shared).await,
                Transport::Ws => read_ws(&mut stream, buf, &mut check, &shared).await,
            }
        } => Some(r),
        _ = stop.wait_for(|stop| *stop) => None,
    };
    if let Some(result) = result {
        shared.closed.fetch_add(1, Relaxed);
        let why = match result {
            Ok(why) => why,
            Err(err) => err.to_string(),
        };
        shared.error(format!("subscriber {index} ended early: {why}"));
    }
    shared.gaps.fetch_add(check.gaps(), Relaxed);
}

async fn open(dial: &Dial, bind: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = if dial.public.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = bind {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let mut stream = socket.connect(dial.public).await?;
    stream.set_nodelay(true)?;
    stream.write_all(&dial.request).await?;
    Ok(stream)
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
        if read_more(stream, &mut raw).await? == 0 {
            return Ok("the server closed the connection".into());
        }
    }
}

/// Reads WebSocket frames until the connection ends; answers pings.
async fn read_ws(
    stream: &mut TcpStream,
    mut buf: Vec<u8>,
    check: &mut SeqCheck,
    shared: &Shared,
) -> io::Result<String> {
    let mut fragments: Vec<u8> = Vec::new();
    loop {
        while let Some((fin, opcode, start, len)) = frame(&buf) {
            let payload = &buf[start..start + len];
            match opcode {
                0x1 if fin => check.on_message(payload, shared),
                0x1 | 0x0 => {
                    fragments.extend_from_slice(payload);
                    if fin {
                        check.on_message(&fragments, shared);
                        fragments = Vec::new();
                    }
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
                    // Pong with the same payload; a client frame is masked
                    // (an all-zero key leaves the payload as is).
                    let mut pong = vec![0x8A, 0x80 | len as u8, 0, 0, 0, 0];
                    pong.extend_from_slice(payload);
                    stream.write_all(&pong).await?;
                }
                _ => {}
            }
            buf.drain(..start + len);
        }
        if read_more(stream, &mut buf).await? == 0 {
            return Ok("the server closed the connection".into());
        }
    }
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

/// The server's processes, read from `/proc` and summed.
struct Proc(Vec<u32>);

impl Proc {
    fn rss_kib(&self) -> Option<u64> {
        if self.0.is_empty() {
            return None;
        }
        self.0
            .iter()
            .map(|pid| {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .sum()
    }

    /// User + system CPU time in clock ticks (USER_HZ, 100 on Linux).
    fn cpu_ticks(&self) -> Option<u64> {
        if self.0.is_empty() {
            return None;
        }
        self.0
            .iter()
            .map(|pid| ticks(&format!("/proc/{pid}/stat")))
            .sum()
    }
}

fn ticks(path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted after the `(comm)`.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

const USER_HZ: f64 = 100.0;

/// Ticks the whole machine spent not idle (user, nice, system, irq, softirq,
/// steal), from `/proc/stat`.
fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    Some(f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)? + f.get(7)?)
}

/// A keep-alive HTTP/1.1 connection to the API.
struct Api {
    sender: SendRequest<Full<Bytes>>,
    host: String,
    auth: String,
}

impl Api {
    async fn connect(addr: SocketAddr, key: &str) -> io::Result<Api> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Api {
            sender,
            host: addr.to_string(),
            auth: format!("Bearer {key}"),
        })
    }

    async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> io::Result<(StatusCode, Bytes)> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.host)
            .header(AUTHORIZATION, &self.auth);
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(io::Error::other)?;
        self.sender.ready().await.map_err(io::Error::other)?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(io::Error::other)?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(io::Error::other)?
            .to_bytes();
        Ok((status, body))
    }

    /// The channel's subscriber count on the server.
    async fn subscribers(&mut self, target: Target, channel: &str) -> io::Result<u64> {
        if target == Target::Nchan {
            // The publisher location answers a GET with the channel's info,
            // `active subscribers: N` among its lines.
            let (status, body) = self
                .call(Method::GET, &format!("/pub/{channel}"), None)
                .await?;
            if status == StatusCode::NOT_FOUND {
                return Ok(0); // No subscriber yet: no channel.
            }
            let text = String::from_utf8_lossy(&body);
            return Ok(text
                .lines()
                .find_map(|line| line.split_once("subscribers:").map(|(_, n)| n))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0));
        }
        let path = format!("/api/channels?prefix={channel}&limit=100000");
        let (status, body) = self.call(Method::GET, &path, None).await?;
        if status != StatusCode::OK {
            return Err(io::Error::other(format!(
                "GET /api/channels: {status} {}",
                String::from_utf8_lossy(&body)
            )));
        }
        let value: serde_json::Value = serde_json::from_slice(&body).map_err(io::Error::other)?;
        Ok(value["channels"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["channel"] == channel)
            .and_then(|c| c["subscribers"].as_u64())
            .unwrap_or(0))
    }
}

async fn broadcast(args: Args) -> io::Result<()> {
    let shard = args.shard;
    let mine =
        args.subscribers / shard.count + usize::from(shard.index < args.subscribers % shard.count);
    let publisher = shard.index == 0;
    let path = match (args.target, args.transport) {
        (Target::Pushgate, Transport::Sse) => format!("/realtime/sse?channel={}", args.channel),
        (Target::Pushgate, Transport::Ws) => format!("/realtime/ws?channel={}", args.channel),
        (Target::Nchan, _) => format!("/sub/{}", args.channel),
    };
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n", args.public);
    match args.transport {
        Transport::Sse => request.push_str("Accept: text/event-stream\r\n\r\n"),
        Transport::Ws => request.push_str(
            "Upgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: cHVzaGdhdGUtYmVuY2gtMQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        ),
    }
    let dial = Arc::new(Dial {
        public: args.public,
        request: request.into_bytes(),
        transport: args.transport,
    });
    let shared = Arc::new(Shared {
        latency: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("bounds")),
        received: AtomicU64::new(0),
        connected: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        closed: AtomicUsize::new(0),
        malformed: AtomicU64::new(0),
        dups: AtomicU64::new(0),
        reorders: AtomicU64::new(0),
        gaps: AtomicU64::new(0),
        seq_end: AtomicU64::new(0),
        first_error: Mutex::new(None),
    });
    let server = Proc(args.pid.clone());
    let mut api = Api::connect(args.api, &args.key).await?;
    let (stop_tx, stop_rx) = watch::channel(false);

    // --- connect, at most connect_rate per second, in 10 ms steps ----------
    let ips = args
        .bind_ips
        .as_ref()
        .map(|b| b.0.as_slice())
        .unwrap_or(&[]);
    eprintln!(
        "broadcast: shard {}/{}: opening {mine} {} subscribers at <= {}/s",
        shard.index,
        shard.count,
        args.transport.name(),
        args.connect_rate
    );
    let connect_start = Instant::now();
    let mut tasks = Vec::with_capacity(mine);
    let step = Duration::from_millis(10);
    let mut ticker = tokio::time::interval(step);
    let mut credit = 0.0;
    while tasks.len() < mine {
        ticker.tick().await;
        credit += args.connect_rate * step.as_secs_f64();
        while credit >= 1.0 && tasks.len() < mine {
            credit -= 1.0;
            let n = tasks.len();
            // Global index, so shards spread over the addresses alike.
            let global = n * shard.count + shard.index;
            let bind = (!ips.is_empty()).then(|| ips[global % ips.len()]);
            tasks.push(tokio::spawn(subscriber(
                global,
                bind,
                dial.clone(),
                shared.clone(),
                stop_rx.clone(),
            )));
        }
    }
    let deadline = Instant::now() + Duration::from_secs_f64(args.subscribe_timeout);
    while shared.connected.load(Relaxed) + shared.failed.load(Relaxed) < mine {
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failed = shared.failed.load(Relaxed);
    if failed > 0 {
        let first = shared
            .first_error
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_default();
        eprintln!("broadcast: {failed} subscribers failed to connect; first: {first}");
    }
    // Wait until the server counts them all on the channel (every shard's,
    // on every node).
    let want = (args.subscribers - failed) as u64;
    let mut counters = Vec::new();
    for addr in &args.count_api {
        counters.push(Api::connect(*addr, &args.key).await?);
    }
    let mut counted = 0;
    // Nchan's channel info counts subscribers with a lag across its workers:
    // there, a subscriber that got its response head counts (and the pause
    // below lets the last registrations land).
    if args.target == Target::Nchan {
        counted = shared.connected.load(Relaxed) as u64;
    }
    while args.target == Target::Pushgate && Instant::now() < deadline {
        counted = 0;
        if counters.is_empty() {
            counted = api.subscribers(args.target, &args.channel).await?;
        }
        for counter in &mut counters {
            counted += counter.subscribers(args.target, &args.channel).await?;
        }
        if counted >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(counters);
    let connect_secs = connect_start.elapsed().as_secs_f64();
    eprintln!(
        "broadcast: {} connected here, {counted} counted on `{}` after {connect_secs:.1} s",
        shared.connected.load(Relaxed),
        args.channel
    );
    if counted < want {
        eprintln!("broadcast: gave up waiting for {want} subscribers; going on with {counted}");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = server.rss_kib();

    // --- publish (shard 0) or listen (other shards) -----------------------
    let (sampler_tx, sampler_rx) = watch::channel(false);
    let sampler = {
        let pid = args.pid.clone();
        tokio::spawn(async move {
            let server = Proc(pid);
            let mut max = server.rss_kib();
            let mut rx = sampler_rx;
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = tick.tick() => max = max.max(server.rss_kib()),
                    _ = rx.wait_for(|s| *s) => break,
                }
            }
            max
        })
    };
    let cpu0 = (
        server.cpu_ticks(),
        ticks("/proc/self/stat"),
        machine_busy_ticks(),
    );
    let mut publish_ms = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("bounds");
    let mut publish_errors = 0u64;
    let mut published = 0u64;
    let load_start = Instant::now();
    let received0 = shared.received.load(Relaxed);
    if publisher {
        eprintln!(
            "broadcast: publishing {}/s for {} s",
            args.rate, args.duration
        );
        let end = load_start + Duration::from_secs_f64(args.duration);
        let mut n = 0u64;
        loop {
            let at = load_start + Duration::from_secs_f64(n as f64 / args.rate);
            if at >= end {
                break;
            }
            tokio::time::sleep_until(at.into()).await;
            let t = now_us();
            let (path, body) = match args.target {
                Target::Pushgate => (
                    "/api/publish".to_owned(),
                    format!(
                        r#"{{"channel":"{}","data":{{"seq":{n},"t":{t}}}}}"#,
                        args.channel
                    ),
                ),
                Target::Nchan => (
                    format!("/pub/{}", args.channel),
                    format!(r#"{{"seq":{n},"t":{t}}}"#),
                ),
            };
            let sent = Instant::now();
            // Nchan answers 201 for a message with subscribers, 202 without.
            match api.call(Method::POST, &path, Some(body)).await {
                Ok((StatusCode::CREATED | StatusCode::ACCEPTED, _))
                    if args.target == Target::Nchan =>
                {
                    published = n + 1;
                    publish_ms.saturating_record(sent.elapsed().as_micros() as u64);
                }
                Ok((StatusCode::OK, _)) => {
                    published = n + 1;
                    publish_ms.saturating_record(sent.elapsed().as_micros() as u64);
                }
                Ok((status, body)) => {
                    publish_errors += 1;
                    shared.error(format!(
                        "publish {n}: {status} {}",
                        String::from_utf8_lossy(&body)
                    ));
                }
                Err(err) => {
                    publish_errors += 1;
                    shared.error(format!("publish {n}: {err}"));
                    api = Api::connect(args.api, &args.key).await?;
                }
            }
            n += 1;
        }
    } else {
        eprintln!("broadcast: listening (shard 0 publishes)");
        let wait_first = Instant::now() + Duration::from_secs_f64(args.subscribe_timeout);
        while shared.received.load(Relaxed) == received0 && Instant::now() < wait_first {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    }
    let publish_secs = load_start.elapsed().as_secs_f64();

    // --- drain ------------------------------------------------------------
    let drain_end = Instant::now() + Duration::from_secs_f64(args.drain);
    let mut last = shared.received.load(Relaxed);
    let mut last_change = Instant::now();
    let mut last_delivery = load_start.elapsed();
    loop {
        let connected = shared.connected.load(Relaxed) as u64;
        let now = shared.received.load(Relaxed);
        if now != last {
            last = now;
            last_change = Instant::now();
            last_delivery = load_start.elapsed();
        }
        let expected = if publisher {
            published
        } else {
            shared.seq_end.load(Relaxed)
        };
        if now - received0 >= connected * expected && (publisher || now > received0) {
            break;
        }
        if Instant::now() >= drain_end
            || (!publisher && last_change.elapsed() > Duration::from_secs(2))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu1 = (
        server.cpu_ticks(),
        ticks("/proc/self/stat"),
        machine_busy_ticks(),
    );
    let _ = sampler_tx.send(true);
    let rss_load = sampler.await.unwrap_or(None);
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = task.await;
    }
    if !publisher {
        published = shared.seq_end.load(Relaxed);
    }

    // --- report -----------------------------------------------------------
    let window = last_delivery.as_secs_f64().max(publish_secs).max(1e-3);
    let received = shared.received.load(Relaxed) - received0;
    let connected = shared.connected.load(Relaxed) as u64;
    let expected = connected * published;
    let ratio = if expected > 0 {
        received as f64 / expected as f64
    } else {
        0.0
    };
    let latency = shared.latency.lock().unwrap().clone();
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    let cpu_pct = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => Some(100.0 * (b - a) as f64 / USER_HZ / window),
        _ => None,
    };
    let server_cpu = cpu_pct(cpu0.0, cpu1.0);
    let bench_cpu = cpu_pct(cpu0.1, cpu1.1);
    let machine_cpu = cpu_pct(cpu0.2, cpu1.2);
    // The machine's CPU outside the server and this process: other shards,
    // other work. Well above a few %, the run shared the cores.
    let other_cpu = match (machine_cpu, server_cpu, bench_cpu) {
        (Some(m), Some(s), Some(b)) => Some((m - s - b).max(0.0)),
        _ => None,
    };
    let server_us_per_delivery = match (cpu0.0, cpu1.0) {
        (Some(a), Some(b)) if received > 0 => {
            Some(1e6 * (b - a) as f64 / USER_HZ / received as f64)
        }
        _ => None,
    };
    let mib = |kib: Option<u64>| kib.map(|k| k as f64 / 1024.0);
    let report = serde_json::json!({
        "scenario": "broadcast",
        "target": format!("{:?}", args.target).to_lowercase(),
        "transport": args.transport.name(),
        "subscribers": args.subscribers,
        "shard": format!("{}/{}", shard.index, shard.count),
        "connected": connected,
        "connect_failed": shared.failed.load(Relaxed),
        "connect_secs": round(connect_secs, 2),
        "rate": args.rate,
        "duration": args.duration,
        "published": published,
        "publish_errors": publish_errors,
        "publish_answer_p50_ms": round(publish_ms.value_at_quantile(0.5) as f64 / 1000.0, 3),
        "publish_answer_max_ms": round(publish_ms.max() as f64 / 1000.0, 3),
        "received": received,
        "deliveries_per_sec": round(received as f64 / window, 0),
        "delivery_ratio": round(ratio, 6),
        "latency_ms": {
            "p50": ms(0.5), "p99": ms(0.99), "p999": ms(0.999),
            "max": latency.max() as f64 / 1000.0,
        },
        "gaps": shared.gaps.load(Relaxed),
        "dups": shared.dups.load(Relaxed),
        "reorders": shared.reorders.load(Relaxed),
        "malformed": shared.malformed.load(Relaxed),
        "closed_early": shared.closed.load(Relaxed),
        "server_rss_idle_mib": mib(rss_idle).map(|v| round(v, 1)),
        "server_rss_load_mib": mib(rss_load).map(|v| round(v, 1)),
        "server_cpu_pct": server_cpu.map(|v| round(v, 0)),
        "bench_cpu_pct": bench_cpu.map(|v| round(v, 0)),
        "other_cpu_pct": other_cpu.map(|v| round(v, 0)),
        "server_cpu_us_per_delivery": server_us_per_delivery.map(|v| round(v, 2)),
        "first_error": shared.first_error.lock().unwrap().clone(),
    });
    let opt = |v: Option<f64>, digits: usize| match v {
        Some(v) => format!("{v:.digits$}"),
        None => "-".into(),
    };
    let mut table = String::new();
    if args.header {
        let _ = writeln!(
            table,
            "{:<8} {:<4} {:>6} {:>5} {:>5} {:>10} {:>8} {:>7} {:>7} {:>7} {:>7} {:>5} {:>5} {:>5} {:>5} {:>8} {:>8} {:>6} {:>6} {:>6}",
            "server", "tr", "subs", "rate", "pubs", "deliv/s", "ratio", "p50ms", "p99ms", "p999ms",
            "maxms", "gaps", "dups", "reord", "drop", "rss-idle", "rss-load", "pg%", "bench%", "other%"
        );
    }
    let _ = writeln!(
        table,
        "{:<8} {:<4} {:>6} {:>5} {:>5} {:>10.0} {:>8.4} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>5} {:>5} {:>5} {:>5} {:>8} {:>8} {:>6} {:>6} {:>6}",
        format!("{:?}", args.target).to_lowercase(),
        args.transport.name(),
        connected,
        args.rate,
        published,
        received as f64 / window,
        ratio,
        ms(0.5),
        ms(0.99),
        ms(0.999),
        latency.max() as f64 / 1000.0,
        shared.gaps.load(Relaxed),
        shared.dups.load(Relaxed),
        shared.reorders.load(Relaxed),
        shared.closed.load(Relaxed) + shared.failed.load(Relaxed),
        opt(mib(rss_idle), 1),
        opt(mib(rss_load), 1),
        opt(server_cpu, 0),
        opt(bench_cpu, 0),
        opt(other_cpu, 0),
    );
    print!("{table}");
    println!("{report}");
    if let Some(err) = shared.first_error.lock().unwrap().as_ref() {
        eprintln!("broadcast: first problem: {err}");
    }
    Ok(())
}

pub fn round(v: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (v * scale).round() / scale
}
