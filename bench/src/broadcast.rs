//! `pushgate-bench broadcast`: many subscribers on one channel (or on many),
//! a steady publish rate.
//!
//! 1. Opens `--subscribers` subscribers (SSE, WebSocket, long-poll, or
//!    pushgate's Pusher protocol; see [`crate::subscriber`]), at most `--connect-rate` per second, each client
//!    socket bound to the next of `--bind-ips` (for more source ports) before
//!    it connects. With `--channels N`, subscriber i is on channel i mod N.
//! 2. Waits until pushgate's API (`GET /api/channels`) counts all of them (for
//!    a peer, or for long-poll, until each has its answer head or first
//!    cursor), waits 1 s and samples the server's RSS (`--pid`): "idle".
//! 3. Publishes `{"seq": s, "t": <µs since the Unix epoch>}` (padded to
//!    `--payload-size` bytes with rows of a made-up price feed) at `--rate` per
//!    second in all for `--duration` seconds, publication n on channel
//!    n mod N with `s` that channel's own sequence, over `--publishers`
//!    keep-alive connections (channel c always on connection c mod K, so a
//!    channel's publications stay in order), sampling the server's RSS and
//!    CPU meanwhile. Over the Pusher transport the same payload, as a JSON
//!    string, is the `data` of an event `bench` sent through pushgate's
//!    Pusher HTTP API (`POST /apps/{id}/events`, signed as Pusher's server
//!    SDKs sign), so the path measured is the Pusher one end to end.
//! 4. Waits (at most `--drain` seconds) for the last deliveries, then reports.
//!
//! Every subscriber checks its own sequence (gaps, duplicates, reordering) and
//! records publish→receive latency into one shared histogram.
//!
//! For more subscribers than one process may hold sockets, run several
//! processes with `--shard i/k`: each opens its share, all wait for the whole
//! count, and only shard 0 publishes; the others infer the publication count
//! from the highest sequence they saw on each channel.

use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args as ClapArgs, ValueEnum};
use hdrhistogram::Histogram;
use http::header::{AUTHORIZATION, CONNECTION, CONTENT_TYPE, HOST};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;

use pushgate::pusher::sign;

use crate::subscriber::{histogram, now_us, subscriber, Dial, Shared};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// pushgate: `/realtime/sse`, `/realtime/ws`, `POST /api/publish`.
    Pushgate,
    /// Nchan (nginx): `GET /sub/<channel>` for both transports, `POST
    /// /pub/<channel>` to publish (`--public` and `--api` both name nginx);
    /// subscribers receive the published body itself. Long-poll follows
    /// Nchan's `Last-Modified`/`Etag`.
    Nchan,
    /// Pushpin: subscribers go through Pushpin to the test upstream
    /// (`pushgate-bench upstream`), which answers GRIP holds
    /// (`/grip/sse?channel=`, WebSocket-over-HTTP for `/grip/ws?channel=`);
    /// `--api` is Pushpin's publish endpoint (`POST /publish/`). No
    /// long-poll.
    Pushpin,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Pushgate => "pushgate",
            Target::Nchan => "nchan",
            Target::Pushpin => "pushpin",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    Sse,
    Ws,
    /// Long-poll (`broadcast` only).
    Poll,
    /// pushgate's Pusher Channels protocol 7 (`broadcast` only): WebSocket
    /// subscribers at `/app/{key}`, publications through the signed Pusher
    /// HTTP API.
    Pusher,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Sse => "sse",
            Transport::Ws => "ws",
            Transport::Poll => "poll",
            Transport::Pusher => "pusher",
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
    /// The server's name in the row and the JSON line (default: the
    /// target's), to tell two builds of one server apart.
    #[arg(long)]
    label: Option<String>,
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
    /// The Pusher app's id (`pusher.apps[].id`), for `--transport pusher`.
    #[arg(long)]
    pusher_app: Option<String>,
    /// The Pusher app's key: what subscribers connect with.
    #[arg(long)]
    pusher_key: Option<String>,
    /// The Pusher app's secret: what signs its HTTP API calls.
    #[arg(long)]
    pusher_secret: Option<String>,
    #[arg(long, value_enum)]
    transport: Transport,
    /// Subscribers in all, over every shard.
    #[arg(long)]
    subscribers: usize,
    /// The channel (letters, digits, `_.:-`); with `--channels` above 1, the
    /// base of the names `<channel>-0` … `<channel>-<N-1>`.
    #[arg(long, default_value = "bench")]
    channel: String,
    /// Channels: subscriber i listens on channel i mod N, publication n goes
    /// to channel n mod N.
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Publishing connections (at most `--channels`); channel c is published
    /// on connection c mod K, so each channel's publications stay in order.
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Seconds a pushgate long-poll waits for a publication (`timeout=`).
    #[arg(long, default_value_t = 30)]
    poll_timeout: u64,
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
    /// Seconds to keep the subscribers connected after the last delivery,
    /// once `broadcast: delivered` is on stderr: a profiler reads the
    /// server's counters then, before the connections close.
    #[arg(long, default_value_t = 0.0)]
    hold: f64,
    /// WebSocket subscribers offer permessage-deflate, as browsers do, and
    /// inflate what comes compressed.
    #[arg(long)]
    deflate: bool,
    /// Pads each publication's JSON to about this many bytes with rows of a
    /// made-up price feed (JSON as apps send it: repeated keys, varied
    /// values); 0 publishes `{"seq","t"}` alone (about 30 bytes).
    #[arg(long, default_value_t = 0)]
    payload_size: usize,
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
    if args.channels == 0 || args.publishers == 0 {
        return Err(invalid("--channels and --publishers must be above 0"));
    }
    if args.target == Target::Pushpin && args.transport == Transport::Poll {
        return Err(invalid(
            "pushpin: no long-poll here (SSE and WebSocket only)",
        ));
    }
    if args.transport == Transport::Pusher {
        if args.target != Target::Pushgate {
            return Err(invalid("--transport pusher: pushgate only"));
        }
        if args.pusher_app.is_none() || args.pusher_key.is_none() || args.pusher_secret.is_none() {
            return Err(invalid(
                "--transport pusher needs --pusher-app, --pusher-key and --pusher-secret",
            ));
        }
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
/// Pushpin's publish endpoint answers every request with `Connection:
/// close`; the next call then opens a new connection.
struct Api {
    addr: SocketAddr,
    sender: SendRequest<Full<Bytes>>,
    host: String,
    /// `Bearer <key>`; none for Pusher's HTTP API, whose every request is
    /// signed in its query instead.
    auth: Option<String>,
    /// The server said it closes the connection after this answer.
    closing: bool,
}

impl Api {
    async fn connect(addr: SocketAddr, key: Option<&str>) -> io::Result<Api> {
        Ok(Api {
            addr,
            sender: Self::handshake(addr).await?,
            host: addr.to_string(),
            auth: key.map(|key| format!("Bearer {key}")),
            closing: false,
        })
    }

    async fn handshake(addr: SocketAddr) -> io::Result<SendRequest<Full<Bytes>>> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
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
            .header(HOST, &self.host);
        if let Some(auth) = &self.auth {
            request = request.header(AUTHORIZATION, auth);
        }
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(io::Error::other)?;
        if self.closing || self.sender.is_closed() {
            self.sender = Self::handshake(self.addr).await?;
            self.closing = false;
        }
        self.sender.ready().await.map_err(io::Error::other)?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(io::Error::other)?;
        self.closing = response
            .headers()
            .get_all(CONNECTION)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(io::Error::other)?
            .to_bytes();
        Ok((status, body))
    }

    /// Subscribers pushgate counts on the benchmark's channels: `base`
    /// itself, or `base-<n>` for many channels.
    async fn subscribers(&mut self, base: &str) -> io::Result<u64> {
        let path = format!("/api/channels?prefix={base}&limit=100000");
        let (status, body) = self.call(Method::GET, &path, None).await?;
        if status != StatusCode::OK {
            return Err(io::Error::other(format!(
                "GET /api/channels: {status} {}",
                String::from_utf8_lossy(&body)
            )));
        }
        let value: serde_json::Value = serde_json::from_slice(&body).map_err(io::Error::other)?;
        let ours = |name: &str| {
            name.strip_prefix(base).is_some_and(|rest| {
                rest.is_empty()
                    || rest
                        .strip_prefix('-')
                        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            })
        };
        Ok(value["channels"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["channel"].as_str().is_some_and(ours))
            .filter_map(|c| c["subscribers"].as_u64())
            .sum())
    }
}

/// The name of channel `c` of `n`.
fn channel_name(base: &str, channels: usize, c: usize) -> String {
    if channels == 1 {
        base.to_owned()
    } else {
        format!("{base}-{c}")
    }
}

/// What one publishing connection did.
struct Published {
    answer_us: Histogram<u64>,
    errors: u64,
    /// Publishes pushgate refused as `overloaded` (its backpressure), each
    /// sent again, unchanged, after the `Retry-After` second.
    overloaded: u64,
}

/// One publishing connection: publication n, on channel n mod N, when its
/// slot comes (n / rate seconds after `start`), for the channels that are
/// this connection's (c mod K == `k`); each answer awaited before the next.
async fn publish(
    args: Arc<Args>,
    k: usize,
    start: Instant,
    published: Arc<Vec<AtomicU64>>,
    shared: Arc<Shared>,
) -> io::Result<Published> {
    // Pusher's HTTP API takes no API key: each request is signed.
    let key = (args.transport != Transport::Pusher).then_some(args.key.as_str());
    let mut api = Api::connect(args.api, key).await?;
    let channels = args.channels;
    let publishers = args.publishers.min(channels);
    let end = start + Duration::from_secs_f64(args.duration);
    let padding = padding(args.payload_size);
    let mut done = Published {
        answer_us: histogram(),
        errors: 0,
        overloaded: 0,
    };
    for n in 0u64.. {
        let at = start + Duration::from_secs_f64(n as f64 / args.rate);
        if at >= end {
            break;
        }
        let c = (n % channels as u64) as usize;
        if c % publishers != k {
            continue;
        }
        let seq = n / channels as u64;
        tokio::time::sleep_until(at.into()).await;
        let channel = channel_name(&args.channel, channels, c);
        let payload = format!(r#"{{"seq":{seq},"t":{}{padding}}}"#, now_us());
        let (path, body) = publication(&args, &channel, &payload);
        let sent = Instant::now();
        let mut answer = api.call(Method::POST, &path, Some(body.clone())).await;
        // As a publisher should: a publish refused as overloaded was not
        // stored, and goes again after Retry-After (1 s), with its first
        // timestamp, so the wait counts in its latency.
        while let Ok((StatusCode::SERVICE_UNAVAILABLE, refusal)) = &answer {
            if !String::from_utf8_lossy(refusal).contains("\"overloaded\"") {
                break;
            }
            done.overloaded += 1;
            tokio::time::sleep(Duration::from_secs(1)).await;
            answer = api.call(Method::POST, &path, Some(body.clone())).await;
        }
        match answer {
            Ok((status, _)) if accepted(args.target, status) => {
                published[c].fetch_add(1, Relaxed);
                done.answer_us
                    .saturating_record(sent.elapsed().as_micros() as u64);
            }
            Ok((status, body)) => {
                done.errors += 1;
                shared.error(format!(
                    "publish {n}: {status} {}",
                    String::from_utf8_lossy(&body)
                ));
            }
            Err(err) => {
                done.errors += 1;
                shared.error(format!("publish {n}: {err}"));
                api = Api::connect(args.api, key).await?;
            }
        }
    }
    Ok(done)
}

/// The request that publishes `payload` on `channel`: its path (and
/// query) and body.
fn publication(args: &Args, channel: &str, payload: &str) -> (String, String) {
    match (args.target, args.transport) {
        (Target::Pushgate, Transport::Pusher) => {
            // Checked in `run`.
            let app = args.pusher_app.as_deref().unwrap_or_default();
            let key = args.pusher_key.as_deref().unwrap_or_default();
            let secret = args.pusher_secret.as_deref().unwrap_or_default();
            let body = serde_json::json!({"name": "bench", "channel": channel, "data": payload})
                .to_string();
            let path = format!("/apps/{app}/events");
            let now = now_us() / 1_000_000;
            let query = sign::sign_request("POST", &path, &[], body.as_bytes(), key, secret, now);
            (format!("{path}?{query}"), body)
        }
        (Target::Pushgate, _) => (
            "/api/publish".to_owned(),
            format!(r#"{{"channel":"{channel}","data":{payload}}}"#),
        ),
        (Target::Nchan, _) => (format!("/pub/{channel}"), payload.to_owned()),
        (Target::Pushpin, transport) => {
            let format = match transport {
                Transport::Ws => serde_json::json!({"ws-message": {"content": payload}}),
                _ => serde_json::json!({"http-stream": {
                    "content": format!("event: message\ndata: {payload}\n\n")
                }}),
            };
            let items = serde_json::json!({"items": [{"channel": channel, "formats": format}]});
            ("/publish/".to_owned(), items.to_string())
        }
    }
}

/// Whether the server took a publication.
fn accepted(target: Target, status: StatusCode) -> bool {
    match target {
        // Nchan answers 201 for a message with subscribers, 202 without.
        Target::Nchan => status == StatusCode::CREATED || status == StatusCode::ACCEPTED,
        Target::Pushgate | Target::Pushpin => status == StatusCode::OK,
    }
}

/// Deliveries expected so far: per channel, its subscribers times its
/// publications.
fn expected(shared: &Shared, published: &[u64]) -> u64 {
    shared
        .connected_on
        .iter()
        .zip(published)
        .map(|(subs, p)| subs.load(Relaxed) as u64 * p)
        .sum()
}

async fn broadcast(args: Args) -> io::Result<()> {
    let args = Arc::new(args);
    let shard = args.shard;
    let mine =
        args.subscribers / shard.count + usize::from(shard.index < args.subscribers % shard.count);
    let publisher = shard.index == 0;
    let channels = args.channels;
    let dial = Arc::new(Dial {
        public: args.public,
        target: args.target,
        transport: args.transport,
        channels: (0..channels)
            .map(|c| channel_name(&args.channel, channels, c))
            .collect(),
        poll_timeout: args.poll_timeout,
        pusher_key: args.pusher_key.clone(),
        deflate: args.deflate,
    });
    let shared = Arc::new(Shared::new(channels));
    let server = Proc(args.pid.clone());
    let (stop_tx, stop_rx) = watch::channel(false);

    // --- connect, at most connect_rate per second, in 10 ms steps ----------
    let ips = args
        .bind_ips
        .as_ref()
        .map(|b| b.0.as_slice())
        .unwrap_or(&[]);
    eprintln!(
        "broadcast: shard {}/{}: opening {mine} {} subscribers on {channels} channel(s) at <= {}/s",
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
            let (dial, shared, stop) = (dial.clone(), shared.clone(), stop_rx.clone());
            tasks.push(tokio::spawn(async move {
                subscriber(global, global % channels, bind, &dial, &shared, stop).await
            }));
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
        let first = shared.first_error().unwrap_or_default();
        eprintln!("broadcast: {failed} subscribers failed to connect; first: {first}");
    }
    // pushgate: wait until its API counts them all on the channels (every
    // shard's, on every node). The peers have no such count that is up to
    // date (Nchan's lags across its workers; Pushpin has none over HTTP), and
    // a long-poll subscriber is counted only while a poll waits: there a
    // subscriber counts once it has its answer head (or first cursor), and
    // the pause below lets the last registrations land.
    let want = (args.subscribers - failed) as u64;
    let mut counted = shared.connected.load(Relaxed) as u64;
    if args.target == Target::Pushgate && args.transport != Transport::Poll {
        let mut counters = Vec::new();
        for addr in args.count_api.iter().chain(
            // Without --count-api, the API that publishes counts.
            args.count_api.is_empty().then_some(&args.api),
        ) {
            counters.push(Api::connect(*addr, Some(&args.key)).await?);
        }
        // A Pusher channel is `pusher/{app id}/{name}` inside pushgate.
        let counted_as = match (&args.pusher_app, args.transport) {
            (Some(app), Transport::Pusher) => format!("pusher/{app}/{}", args.channel),
            _ => args.channel.clone(),
        };
        while Instant::now() < deadline {
            counted = 0;
            for counter in &mut counters {
                counted += counter.subscribers(&counted_as).await?;
            }
            if counted >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
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
    let mut publish_us = histogram();
    let mut publish_errors = 0u64;
    let mut publish_overloaded = 0u64;
    let published = Arc::new((0..channels).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
    let load_start = Instant::now();
    let received0 = shared.received.load(Relaxed);
    let wire_bytes0 = shared.wire_bytes.load(Relaxed);
    if publisher {
        let publishers = args.publishers.min(channels);
        eprintln!(
            "broadcast: publishing {}/s for {} s over {publishers} connection(s)",
            args.rate, args.duration
        );
        // The publishers run on a thread of their own, as an app's backend
        // is a process of its own: on the subscribers' runtime a publish
        // would wait behind every read that came due before it, after its
        // timestamp was taken, and count that wait as the server's latency.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let (args, published, shared) = (args.clone(), published.clone(), shared.clone());
        std::thread::Builder::new()
            .name("publishers".into())
            .spawn(move || {
                let all = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map(|runtime| {
                        runtime.block_on(async {
                            let tasks: Vec<_> = (0..publishers)
                                .map(|k| {
                                    tokio::spawn(publish(
                                        args.clone(),
                                        k,
                                        load_start,
                                        published.clone(),
                                        shared.clone(),
                                    ))
                                })
                                .collect();
                            let mut all = Vec::with_capacity(tasks.len());
                            for task in tasks {
                                all.push(task.await.map_err(io::Error::other).and_then(|r| r));
                            }
                            all
                        })
                    });
                let _ = done_tx.send(all);
            })?;
        let all = done_rx.await.map_err(io::Error::other)??;
        for done in all {
            let done = done?;
            publish_us.add(&done.answer_us).map_err(io::Error::other)?;
            publish_errors += done.errors;
            publish_overloaded += done.overloaded;
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
    // Publications per channel: what shard 0 published, or (other shards)
    // the highest sequence seen.
    let counts = || -> Vec<u64> {
        let source = if publisher {
            &published[..]
        } else {
            &shared.seq_end[..]
        };
        source.iter().map(|p| p.load(Relaxed)).collect()
    };
    let drain_end = Instant::now() + Duration::from_secs_f64(args.drain);
    let mut last = shared.received.load(Relaxed);
    let mut last_change = Instant::now();
    let mut last_delivery = load_start.elapsed();
    loop {
        let now = shared.received.load(Relaxed);
        if now != last {
            last = now;
            last_change = Instant::now();
            last_delivery = load_start.elapsed();
        }
        if now - received0 >= expected(&shared, &counts()) && (publisher || now > received0) {
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
    if args.hold > 0.0 {
        eprintln!(
            "broadcast: delivered; holding the subscribers {} s",
            args.hold
        );
        tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    }
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = task.await;
    }
    let counts = counts();
    let published: u64 = counts.iter().sum();

    // --- report -----------------------------------------------------------
    let window = last_delivery.as_secs_f64().max(publish_secs).max(1e-3);
    let received = shared.received.load(Relaxed) - received0;
    let wire_bytes = shared.wire_bytes.load(Relaxed) - wire_bytes0;
    // Long-poll reads through hyper and is not counted.
    let wire_bytes_per_delivery = (received > 0 && args.transport != Transport::Poll)
        .then(|| wire_bytes as f64 / received as f64);
    let connected = shared.connected.load(Relaxed) as u64;
    let expected = expected(&shared, &counts);
    let ratio = if expected > 0 {
        received as f64 / expected as f64
    } else {
        0.0
    };
    let latency = shared.latency.lock().unwrap().clone();
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    // Per publication: until its first receipt (the path to the first
    // socket) and from first to last (the fan-out's spread).
    let (mut first, mut spread) = (histogram(), histogram());
    for span in shared.spans.lock().unwrap().values() {
        first.saturating_record(span.first.saturating_sub(span.published).max(1));
        spread.saturating_record((span.last - span.first).max(1));
    }
    let quantiles = |h: &Histogram<u64>| {
        serde_json::json!({
            "p50": h.value_at_quantile(0.5) as f64 / 1000.0,
            "p99": h.value_at_quantile(0.99) as f64 / 1000.0,
            "max": h.max() as f64 / 1000.0,
        })
    };
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
    let first_error = shared.first_error();
    let label = args.label.as_deref().unwrap_or(args.target.name());
    let report = serde_json::json!({
        "scenario": "broadcast",
        "target": label,
        "transport": args.transport.name(),
        "deflate": args.deflate,
        "payload_size": args.payload_size,
        "subscribers": args.subscribers,
        "channels": channels,
        "publishers": args.publishers.min(channels),
        "shard": format!("{}/{}", shard.index, shard.count),
        "connected": connected,
        "connect_failed": shared.failed.load(Relaxed),
        "connect_secs": round(connect_secs, 2),
        "rate": args.rate,
        "duration": args.duration,
        "published": published,
        "publish_errors": publish_errors,
        "publish_overloaded": publish_overloaded,
        "publish_secs": round(publish_secs, 2),
        "publish_answer_p50_ms": round(publish_us.value_at_quantile(0.5) as f64 / 1000.0, 3),
        "publish_answer_max_ms": round(publish_us.max() as f64 / 1000.0, 3),
        "expected": expected,
        "received": received,
        "deliveries_per_sec": round(received as f64 / window, 0),
        "delivery_ratio": round(ratio, 6),
        "latency_ms": {
            "p50": ms(0.5), "p99": ms(0.99), "p999": ms(0.999),
            "max": latency.max() as f64 / 1000.0,
        },
        "first_receipt_ms": quantiles(&first),
        "spread_ms": quantiles(&spread),
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
        "wire_bytes_per_delivery": wire_bytes_per_delivery.map(|v| round(v, 1)),
        "first_error": first_error,
    });
    let opt = |v: Option<f64>, digits: usize| match v {
        Some(v) => format!("{v:.digits$}"),
        None => "-".into(),
    };
    let mut table = String::new();
    if args.header {
        let _ = writeln!(
            table,
            "{:<8} {:<6} {:>6} {:>6} {:>6} {:>6} {:>10} {:>8} {:>7} {:>7} {:>7} {:>7} {:>5} {:>5} {:>5} {:>5} {:>8} {:>8} {:>6} {:>6} {:>6} {:>7} {:>7} {:>8} {:>8}",
            "server", "tr", "subs", "chans", "rate", "pubs", "deliv/s", "ratio", "p50ms", "p99ms", "p999ms",
            "maxms", "gaps", "dups", "reord", "drop", "rss-idle", "rss-load", "srv%", "bench%", "other%",
            "us/del", "B/del", "1st-p50", "spr-p99"
        );
    }
    let _ = writeln!(
        table,
        "{:<8} {:<6} {:>6} {:>6} {:>6} {:>6} {:>10.0} {:>8.4} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>5} {:>5} {:>5} {:>5} {:>8} {:>8} {:>6} {:>6} {:>6} {:>7} {:>7} {:>8.2} {:>8.2}",
        label,
        args.transport.name(),
        connected,
        channels,
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
        opt(server_us_per_delivery, 2),
        opt(wire_bytes_per_delivery, 0),
        first.value_at_quantile(0.5) as f64 / 1000.0,
        spread.value_at_quantile(0.99) as f64 / 1000.0,
    );
    print!("{table}");
    println!("{report}");
    if let Some(err) = first_error {
        eprintln!("broadcast: first problem: {err}");
    }
    Ok(())
}

/// `,"rows":[…]`: what brings a publication's JSON to about `size` bytes,
/// rows of a made-up price feed (the same for every publication); empty for
/// a size the bare payload already fills.
fn padding(size: usize) -> String {
    const BARE: usize = r#"{"seq":0,"t":1700000000000000}"#.len();
    let mut rows = String::new();
    let mut n = 0u64;
    while BARE + r#","rows":[]"#.len() + rows.len() < size {
        if n > 0 {
            rows.push(',');
        }
        let side = if n.is_multiple_of(3) { "sell" } else { "buy" };
        let _ = write!(
            rows,
            r#"{{"symbol":"S{:03}","price":{}.{:02},"size":{},"side":"{side}"}}"#,
            n * 7 % 500,
            100 + n * 37 % 900,
            n * 13 % 100,
            (n * 53 % 40 + 1) * 100,
        );
        n += 1;
    }
    if rows.is_empty() {
        rows
    } else {
        format!(r#","rows":[{rows}]"#)
    }
}

pub fn round(v: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (v * scale).round() / scale
}
