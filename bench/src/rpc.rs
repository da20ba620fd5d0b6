//! `pushgate-bench rpc`: calls to the app through pushgate, as WebSocket
//! `rpc` commands or as plain HTTP requests through its proxy, so the two
//! can be compared on the same machine with the same app.
//!
//! - `--mode rpc`: `--connections` WebSockets, each keeping `--in-flight`
//!   `{"op":"rpc"}` commands under way (a new one as each reply arrives).
//! - `--mode http`: `--connections` keep-alive HTTP/1.1 connections to the
//!   public listener, each sending `POST --path` one after the other (HTTP/1
//!   has one request in flight per connection).
//!
//! Every reply is checked (a `result` for rpc, a `200` for HTTP); prints one
//! row: calls per second and latency percentiles.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args as ClapArgs, ValueEnum};
use hdrhistogram::Histogram;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::subscriber::{client_frame, connect, find, frame};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Rpc,
    Http,
}

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// pushgate's public listener.
    #[arg(long)]
    public: SocketAddr,
    #[arg(long, value_enum)]
    mode: Mode,
    /// Connections, each its own task.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// rpc commands under way per WebSocket.
    #[arg(long, default_value_t = 1)]
    in_flight: usize,
    /// Seconds of calls, after the connections are open.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// The app's path for `--mode http`: not `rpc.path`, which pushgate
    /// keeps for itself; the bench app answers every path alike.
    #[arg(long, default_value = "/bench/call")]
    path: String,
    /// Cookie sent on every connection (pushgate's auth request forwards it).
    #[arg(long, default_value = "session=bench")]
    cookie: String,
}

/// What every connection adds to.
struct Totals {
    calls: AtomicU64,
    failures: AtomicU64,
    latency_us: Mutex<Histogram<u64>>,
}

pub fn run(args: Args) -> io::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(measure(args))
}

async fn measure(args: Args) -> io::Result<()> {
    let totals = Arc::new(Totals {
        calls: AtomicU64::new(0),
        failures: AtomicU64::new(0),
        latency_us: Mutex::new(Histogram::new(3).expect("3 significant figures")),
    });
    let started = Instant::now() + Duration::from_millis(500);
    let until = started + Duration::from_secs(args.duration);
    let args = Arc::new(args);
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let (args, totals) = (args.clone(), totals.clone());
        tasks.push(tokio::spawn(async move {
            let outcome = match args.mode {
                Mode::Rpc => websocket(&args, &totals, started, until).await,
                Mode::Http => http(&args, &totals, started, until).await,
            };
            if let Err(err) = outcome {
                eprintln!("rpc bench: a connection failed: {err}");
                totals.failures.fetch_add(1, Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await.map_err(io::Error::other)?;
    }
    let calls = totals.calls.load(Relaxed);
    let latency = totals.latency_us.lock().expect("histogram lock");
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "mode {:?} connections {} in-flight {} calls {} calls/s {:.0} p50 {:.2} ms p99 {:.2} ms p999 {:.2} ms failures {}",
        args.mode,
        args.connections,
        if args.mode == Mode::Rpc { args.in_flight } else { 1 },
        calls,
        calls as f64 / args.duration as f64,
        ms(0.5),
        ms(0.99),
        ms(0.999),
        totals.failures.load(Relaxed),
    );
    if calls == 0 || totals.failures.load(Relaxed) > 0 {
        return Err(io::Error::other("calls failed"));
    }
    Ok(())
}

/// Counts a call that ended now, if it was sent inside the window.
fn count(totals: &Totals, sent: Instant, started: Instant, until: Instant) {
    if sent >= started && sent < until {
        totals.calls.fetch_add(1, Relaxed);
        let us = sent.elapsed().as_micros() as u64;
        let _ = totals
            .latency_us
            .lock()
            .expect("histogram lock")
            .record(us.max(1));
    }
}

async fn websocket(
    args: &Args,
    totals: &Totals,
    started: Instant,
    until: Instant,
) -> io::Result<()> {
    let mut stream = connect(args.public, None).await?;
    let request = format!(
        "GET /realtime/ws HTTP/1.1\r\nHost: {}\r\nCookie: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: cHVzaGdhdGUtYmVuY2gtMQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        args.public, args.cookie
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(4096);
    let head_end = loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            break end;
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::other("closed during the handshake"));
        }
    };
    if !buf.starts_with(b"HTTP/1.1 101") {
        return Err(io::Error::other(
            String::from_utf8_lossy(&buf[..head_end]).into_owned(),
        ));
    }
    buf.drain(..head_end + 4);
    tokio::time::sleep_until(started.into()).await;
    let mut sent_at: Vec<Instant> = Vec::new();
    let send = |stream_buf: &mut Vec<u8>, sent_at: &mut Vec<Instant>| {
        let id = sent_at.len();
        sent_at.push(Instant::now());
        let command = format!(r#"{{"id":{id},"op":"rpc","method":"bench","data":{{"n":{id}}}}}"#);
        stream_buf.extend_from_slice(&client_frame(0x1, command.as_bytes()));
    };
    let mut out = Vec::new();
    for _ in 0..args.in_flight {
        send(&mut out, &mut sent_at);
    }
    stream.write_all(&out).await?;
    let mut open = args.in_flight;
    while open > 0 {
        while let Some((_, opcode, start, len)) = frame(&buf) {
            if opcode == 0x1 {
                let reply: serde_json::Value =
                    serde_json::from_slice(&buf[start..start + len]).map_err(io::Error::other)?;
                let id = reply["id"]
                    .as_u64()
                    .ok_or_else(|| io::Error::other(reply.to_string()))?;
                if reply.get("result").is_none() {
                    return Err(io::Error::other(reply.to_string()));
                }
                count(totals, sent_at[id as usize], started, until);
                open -= 1;
                if Instant::now() < until {
                    out.clear();
                    send(&mut out, &mut sent_at);
                    stream.write_all(&out).await?;
                    open += 1;
                }
            } else if opcode == 0x8 {
                return Err(io::Error::other("closed by the server"));
            }
            buf.drain(..start + len);
        }
        if open > 0 && stream.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::other("the server closed the connection"));
        }
    }
    Ok(())
}

async fn http(args: &Args, totals: &Totals, started: Instant, until: Instant) -> io::Result<()> {
    let stream = connect(args.public, None).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(conn);
    tokio::time::sleep_until(started.into()).await;
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let body = format!(r#"{{"method":"bench","data":{{"n":{n}}}}}"#);
        let request = Request::post(args.path.as_str())
            .header(http::header::HOST, args.public.to_string())
            .header(http::header::COOKIE, args.cookie.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(io::Error::other)?;
        let sent = Instant::now();
        sender.ready().await.map_err(io::Error::other)?;
        let response = sender
            .send_request(request)
            .await
            .map_err(io::Error::other)?;
        let status = response.status();
        response
            .into_body()
            .collect()
            .await
            .map_err(io::Error::other)?;
        if !status.is_success() {
            return Err(io::Error::other(format!("answered {status}")));
        }
        count(totals, sent, started, until);
    }
    Ok(())
}
