//! `pushgate-bench connect`: authenticated realtime connects per second.
//!
//! Opens `--connections` realtime connections (WebSocket or SSE),
//! `--concurrency` at a time, each with a `Cookie: session=u<k>` header, to a
//! server that asks the app (`pushgate-bench upstream`) whether that cookie
//! may connect before it accepts the connection:
//!
//! - pushgate (`auth.mode: upstream`): `/realtime/{ws,sse}?channel=bench`;
//!   its grant request is `POST /realtime/auth`.
//! - Nchan (`--target nchan`, `bench/nchan-auth.conf`): `/sub/bench`, with
//!   `nchan_authorize_request` sending the same `POST /realtime/auth`.
//! - Pushpin (`--target pushpin`): `/grip/auth/{sse,ws}?channel=bench`,
//!   passed to the app, which answers a GRIP hold with the cookie and `401`
//!   without (see [`crate::grip`]).
//!
//! All connections are user `u0` unless `--distinct-users`, when connection
//! k is user `u<k>` and a grant cache cannot help. `--no-cookie` sends none,
//! to check that every connect is refused.
//!
//! A connection counts once it is usable, the same way on every server: a
//! WebSocket has been accepted (`101`) and has answered a ping frame with
//! its pong; an SSE stream has been accepted (`200`, `text/event-stream`)
//! and has sent its first block (pushgate's `retry:` line, Nchan's `: hi`
//! comment, the opening the app gave Pushpin). It is then closed and the
//! next one opened. Latency runs from the TCP connect to that moment; "head"
//! latency to the response head. Sockets close with a reset (`SO_LINGER`
//! 0), so runs in a row do not run out of client ports. Failures are counted
//! by kind: `connect` (TCP), `status_<code>` (refused at the handshake),
//! `close_<code>` (a WebSocket closed before the pong), `eof`, `io`,
//! `timeout`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::broadcast::{round, BindIps, Target, Transport};
use crate::grip;
use crate::subscriber::{find, frame, histogram};

/// Largest response head accepted from the server.
const MAX_HEAD: usize = 16 * 1024;

/// A masked client ping frame (all-zero key) with the payload `bench`.
const PING: &[u8] = b"\x89\x85\0\0\0\0bench";
/// A masked client close frame, code 1000.
const CLOSE: &[u8] = b"\x88\x82\0\0\0\0\x03\xe8";

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// The server under test: pushgate, nchan or pushpin.
    #[arg(long, value_enum, default_value_t = Target::Pushgate)]
    target: Target,
    /// The public listener (realtime endpoints).
    #[arg(long)]
    public: SocketAddr,
    #[arg(long, value_enum)]
    transport: Transport,
    /// Connections to open in all.
    #[arg(long)]
    connections: usize,
    /// Connections in progress at once.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// Every connection a different user (`u<k>`), so no grant is reused;
    /// without it every connection is user `u0`.
    #[arg(long)]
    distinct_users: bool,
    /// Send no `session` cookie (every connect should be refused).
    #[arg(long)]
    no_cookie: bool,
    /// Source addresses for client sockets, used in turn
    /// (e.g. `127.0.0.2-127.0.0.9`); default: the kernel's choice.
    #[arg(long)]
    bind_ips: Option<BindIps>,
    /// Seconds one connection may take before it counts as a `timeout`.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Runtime threads: 1 is a current-thread runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// A label for the row (e.g. `cache` or `no-cache`).
    #[arg(long, default_value = "")]
    label: String,
    /// Print the table's header line (off to append rows to an earlier table).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    header: bool,
}

pub fn run(args: Args) -> io::Result<()> {
    if args.connections == 0 || args.concurrency == 0 || args.timeout <= 0.0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "--connections, --concurrency and --timeout must be above 0",
        ));
    }
    if matches!(args.transport, Transport::Poll | Transport::Pusher) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "--transport: sse or ws (a long-poll holds no connection to count; \
             a Pusher connection is anonymous, no app decides it)",
        ));
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
    runtime.block_on(connect_all(args))
}

/// What every worker adds to.
struct Shared {
    next: AtomicUsize,
    ok: AtomicUsize,
    latency: Mutex<Histogram<u64>>,
    head_latency: Mutex<Histogram<u64>>,
    failures: Mutex<BTreeMap<String, u64>>,
    first_error: Mutex<Option<String>>,
}

/// Why one connection failed: its kind (the failure table's key) and detail.
struct Failure(String, String);

impl Failure {
    fn io(err: io::Error) -> Failure {
        Failure("io".into(), err.to_string())
    }
}

async fn connect_all(args: Args) -> io::Result<()> {
    let shared = Arc::new(Shared {
        next: AtomicUsize::new(0),
        ok: AtomicUsize::new(0),
        latency: Mutex::new(histogram()),
        head_latency: Mutex::new(histogram()),
        failures: Mutex::new(BTreeMap::new()),
        first_error: Mutex::new(None),
    });
    let args = Arc::new(args);
    let start = Instant::now();
    let workers: Vec<_> = (0..args.concurrency.min(args.connections))
        .map(|_| tokio::spawn(worker(args.clone(), shared.clone())))
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
    let secs = start.elapsed().as_secs_f64().max(1e-3);

    let ok = shared.ok.load(Relaxed);
    let failures = shared.failures.lock().unwrap().clone();
    let failed: u64 = failures.values().sum();
    let latency = shared.latency.lock().unwrap().clone();
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    let head = shared.head_latency.lock().unwrap().clone();
    let head_ms = |q: f64| head.value_at_quantile(q) as f64 / 1000.0;
    let users = if args.distinct_users {
        "distinct"
    } else {
        "same"
    };
    let report = serde_json::json!({
        "scenario": "connect",
        "target": args.target.name(),
        "cookie": !args.no_cookie,
        "transport": args.transport.name(),
        "label": args.label,
        "users": users,
        "connections": args.connections,
        "concurrency": args.concurrency,
        "ok": ok,
        "failed": failed,
        "failures": failures,
        "secs": round(secs, 3),
        "connects_per_sec": round(ok as f64 / secs, 0),
        "latency_ms": {
            "p50": ms(0.5), "p99": ms(0.99), "max": latency.max() as f64 / 1000.0,
        },
        "head_latency_ms": { "p50": head_ms(0.5), "p99": head_ms(0.99) },
        "first_error": shared.first_error.lock().unwrap().clone(),
    });
    let kinds = if failures.is_empty() {
        "-".to_string()
    } else {
        failures
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut table = String::new();
    if args.header {
        let _ = writeln!(
            table,
            "{:<8} {:<4} {:<9} {:<8} {:>6} {:>5} {:>6} {:>10} {:>7} {:>7} {:>7} {:>7} {:>7}  failures",
            "target",
            "tr",
            "label",
            "users",
            "conns",
            "conc",
            "ok",
            "connects/s",
            "p50ms",
            "p99ms",
            "maxms",
            "head50",
            "head99"
        );
    }
    let _ = writeln!(
        table,
        "{:<8} {:<4} {:<9} {:<8} {:>6} {:>5} {:>6} {:>10.0} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2}  {}",
        args.target.name(),
        args.transport.name(),
        if args.label.is_empty() {
            "-"
        } else {
            &args.label
        },
        users,
        args.connections,
        args.concurrency,
        ok,
        ok as f64 / secs,
        ms(0.5),
        ms(0.99),
        latency.max() as f64 / 1000.0,
        head_ms(0.5),
        head_ms(0.99),
        kinds,
    );
    print!("{table}");
    println!("{report}");
    if let Some(err) = shared.first_error.lock().unwrap().as_ref() {
        eprintln!("connect: first problem: {err}");
    }
    Ok(())
}

async fn worker(args: Arc<Args>, shared: Arc<Shared>) {
    let timeout = Duration::from_secs_f64(args.timeout);
    let mut buf = Vec::with_capacity(4096);
    loop {
        let index = shared.next.fetch_add(1, Relaxed);
        if index >= args.connections {
            return;
        }
        let bind = args.bind_ips.as_ref().map(|b| b.0[index % b.0.len()]);
        let user = if args.distinct_users { index } else { 0 };
        let start = Instant::now();
        buf.clear();
        let result = match tokio::time::timeout(timeout, one(&args, bind, user, &mut buf)).await {
            Ok(Ok(head)) => {
                let us = head.duration_since(start).as_micros() as u64;
                shared
                    .head_latency
                    .lock()
                    .unwrap()
                    .saturating_record(us.max(1));
                Ok(())
            }
            Ok(Err(failure)) => Err(failure),
            Err(_) => Err(Failure("timeout".into(), format!("over {timeout:?}"))),
        };
        match result {
            Ok(()) => {
                let us = start.elapsed().as_micros() as u64;
                shared.latency.lock().unwrap().saturating_record(us.max(1));
                shared.ok.fetch_add(1, Relaxed);
            }
            Err(Failure(kind, detail)) => {
                *shared.failures.lock().unwrap().entry(kind).or_insert(0) += 1;
                let mut first = shared.first_error.lock().unwrap();
                if first.is_none() {
                    *first = Some(format!("connection {index}: {detail}"));
                }
            }
        }
    }
}

/// The path and query of a connection to the server under test.
fn path(target: Target, transport: Transport) -> String {
    match (target, transport) {
        (Target::Pushgate, _) => format!("/realtime/{}?channel=bench", transport.name()),
        (Target::Nchan, _) => "/sub/bench".into(),
        (Target::Pushpin, Transport::Ws) => format!("{}?channel=bench", grip::AUTH_WS_PATH),
        (Target::Pushpin, _) => format!("{}?channel=bench", grip::AUTH_SSE_PATH),
    }
}

/// Opens one authenticated connection, waits until it is usable, closes it.
/// Returns when the response head arrived.
async fn one(
    args: &Args,
    bind: Option<IpAddr>,
    user: usize,
    buf: &mut Vec<u8>,
) -> Result<Instant, Failure> {
    let socket = if args.public.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| Failure("connect".into(), e.to_string()))?;
    // Close with a reset, not a FIN: 20,000 connections a run would otherwise
    // leave as many client ports in TIME_WAIT, and a few runs in a row run
    // out of ports (connects then stall for SYN retries).
    socket
        .set_zero_linger()
        .map_err(|e| Failure("connect".into(), e.to_string()))?;
    if let Some(ip) = bind {
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(|e| Failure("connect".into(), format!("bind {ip}: {e}")))?;
    }
    let mut stream = socket
        .connect(args.public)
        .await
        .map_err(|e| Failure("connect".into(), e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let mut request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n",
        path(args.target, args.transport),
        args.public
    );
    if !args.no_cookie {
        let _ = write!(request, "Cookie: session=u{user}\r\n");
    }
    match args.transport {
        Transport::Sse | Transport::Poll => request.push_str("Accept: text/event-stream\r\n\r\n"),
        Transport::Ws | Transport::Pusher => request.push_str(
            "Upgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: cHVzaGdhdGUtYmVuY2gtMQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        ),
    }
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(Failure::io)?;

    // The response head.
    let head_end = loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            break end;
        }
        if buf.len() > MAX_HEAD {
            return Err(Failure("io".into(), "response head too large".into()));
        }
        read_more(&mut stream, buf).await?;
    };
    let head_at = Instant::now();
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end + 4);
    let status = head.split(' ').nth(1).unwrap_or("");
    let expected = match args.transport {
        Transport::Sse | Transport::Poll => "200",
        Transport::Ws | Transport::Pusher => "101",
    };
    if status != expected {
        let first = head.lines().next().unwrap_or("").to_string();
        return Err(Failure(format!("status_{status}"), first));
    }

    match args.transport {
        Transport::Sse | Transport::Poll => {
            let event_stream = head.lines().any(|line| {
                let line = line.to_ascii_lowercase();
                line.starts_with("content-type:") && line.contains("text/event-stream")
            });
            if !event_stream {
                return Err(Failure(
                    "not_sse".into(),
                    format!("no text/event-stream content type: {head}"),
                ));
            }
            // The first block ends with a blank line; chunked or not, it
            // shows up in the raw bytes.
            while find(buf, b"\n\n").is_none() {
                read_more(&mut stream, buf).await?;
            }
        }
        Transport::Ws | Transport::Pusher => {
            stream.write_all(PING).await.map_err(Failure::io)?;
            'reply: loop {
                while let Some((_, opcode, start, len)) = frame(buf) {
                    let payload = &buf[start..start + len];
                    match opcode {
                        0xA => break 'reply,
                        0x8 => {
                            let code = if len >= 2 {
                                u16::from_be_bytes([payload[0], payload[1]])
                            } else {
                                1005
                            };
                            let reason = String::from_utf8_lossy(&payload[2.min(len)..]);
                            return Err(Failure(
                                format!("close_{code}"),
                                format!("closed before the pong: {code} {reason}"),
                            ));
                        }
                        _ => {}
                    }
                    buf.drain(..start + len);
                }
                read_more(&mut stream, buf).await?;
            }
            // A close frame first; the server's answer is not waited for.
            let _ = stream.write_all(CLOSE).await;
        }
    }
    Ok(head_at)
}

/// Appends what the socket has to `buf`; end of stream is an `eof` failure.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), Failure> {
    if buf.capacity() - buf.len() < 512 {
        buf.reserve(4096);
    }
    match stream.read_buf(buf).await {
        Ok(0) => Err(Failure(
            "eof".into(),
            "the server closed the connection".into(),
        )),
        Ok(_) => Ok(()),
        Err(err) => Err(Failure::io(err)),
    }
}
