//! Limits on what a client controls: the request-head deadline (slowloris),
//! header size and count, and the connection limit.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Pushgate, TempDir, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Short enough for a quick test, long enough to be clearly distinct from an
/// immediate close.
const HEAD_TIMEOUT: &str = "limits:\n  header_timeout: 400ms\n";
const HEAD_TIMEOUT_MS: u128 = 400;
/// Bound on any wait, so a broken server fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(10);

/// Reads until the peer closes; returns what was read and how long it took.
async fn read_until_closed(stream: &mut (impl AsyncReadExt + Unpin)) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut received = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("pushgate closes the connection");
    (received, started.elapsed())
}

#[tokio::test]
async fn a_client_that_sends_nothing_is_closed_at_the_deadline() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), HEAD_TIMEOUT).await;
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    let (received, elapsed) = read_until_closed(&mut stream).await;
    assert!(
        received.is_empty(),
        "no answer to a silent client: {received:?}"
    );
    assert!(
        elapsed.as_millis() >= HEAD_TIMEOUT_MS - 50,
        "closed too early: {elapsed:?}"
    );
}

#[tokio::test]
async fn half_a_request_head_gets_408_at_the_deadline() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), HEAD_TIMEOUT).await;
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: example\r\nX-Slow: ")
        .await
        .unwrap();
    let (received, elapsed) = read_until_closed(&mut stream).await;
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(
        elapsed.as_millis() >= HEAD_TIMEOUT_MS - 50,
        "closed too early: {elapsed:?}"
    );
    assert_eq!(app.hits.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_slow_drip_of_header_bytes_does_not_extend_the_deadline() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), HEAD_TIMEOUT).await;
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    let (mut reader, mut writer) = stream.split();
    let started = Instant::now();
    let drip = async {
        writer.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        // One header byte every 50 ms, forever: each read is progress, but
        // the head never completes.
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if writer.write_all(b"X").await.is_err() {
                break;
            }
        }
    };
    let (received, _) = tokio::select! {
        closed = read_until_closed(&mut reader) => closed,
        () = drip => panic!("the drip only stops when pushgate closes"),
    };
    let elapsed = started.elapsed();
    assert!(String::from_utf8_lossy(&received).starts_with("HTTP/1.1 408 "));
    assert!(
        elapsed < Duration::from_secs(3),
        "the deadline held: {elapsed:?}"
    );
}

#[tokio::test]
async fn half_an_http2_preface_is_closed_without_an_http1_answer() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), HEAD_TIMEOUT).await;
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    stream.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let (received, elapsed) = read_until_closed(&mut stream).await;
    assert!(
        received.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&received)
    );
    assert!(elapsed.as_millis() >= HEAD_TIMEOUT_MS - 50);
}

#[tokio::test]
async fn an_http2_connection_without_requests_is_closed_at_the_deadline() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), HEAD_TIMEOUT).await;
    let stream = TcpStream::connect(gate.addr).await.unwrap();
    // A complete HTTP/2 handshake, then no request at all.
    let (_sender, connection) =
        hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<bytes::Bytes>>(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
    let started = Instant::now();
    tokio::time::timeout(PATIENCE, connection)
        .await
        .expect("pushgate ends the idle HTTP/2 connection")
        .ok();
    assert!(started.elapsed().as_millis() >= HEAD_TIMEOUT_MS - 100);
}

#[tokio::test]
async fn a_tls_handshake_that_never_comes_is_closed_at_the_deadline() {
    let dir = TempDir::new("tls-deadline");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.0.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.0.join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    let app = Upstream::start().await;
    let extra = format!(
        "{HEAD_TIMEOUT}tls:\n  cert: {}\n  key: {}\n",
        dir.0.join("cert.pem").display(),
        dir.0.join("key.pem").display()
    );
    let gate = Pushgate::start(&app.url(), &extra).await;
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    let (received, elapsed) = read_until_closed(&mut stream).await;
    assert!(received.is_empty());
    assert!(elapsed.as_millis() >= HEAD_TIMEOUT_MS - 50);
}

#[tokio::test]
async fn a_complete_request_is_not_cut_by_the_deadline() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), HEAD_TIMEOUT).await;
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    // The app takes longer than the head deadline to answer; the head came in
    // time, so the answer must arrive.
    stream
        .write_all(b"GET /slow-headers?ms=700 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (received, _) = read_until_closed(&mut stream).await;
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert!(text.ends_with("finally"), "{text}");
}

async fn raw_request(addr: std::net::SocketAddr, head: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(head).await.unwrap();
    let (received, _) = read_until_closed(&mut stream).await;
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test]
async fn a_request_head_over_max_header_bytes_gets_431() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), "limits:\n  max_header_bytes: 16KiB\n").await;
    let big = "a".repeat(20 * 1024);
    let head = format!("GET / HTTP/1.1\r\nHost: x\r\nCookie: {big}\r\nConnection: close\r\n\r\n");
    let answer = raw_request(gate.addr, head.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");

    // Just under the limit passes.
    let fits = "a".repeat(15 * 1024);
    let head = format!("GET / HTTP/1.1\r\nHost: x\r\nCookie: {fits}\r\nConnection: close\r\n\r\n");
    let answer = raw_request(gate.addr, head.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
}

#[tokio::test]
async fn more_headers_than_max_headers_gets_431() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), "limits:\n  max_headers: 10\n").await;
    let many: String = (0..20).map(|i| format!("X-H{i}: v\r\n")).collect();
    let head = format!("GET / HTTP/1.1\r\nHost: x\r\n{many}Connection: close\r\n\r\n");
    let answer = raw_request(gate.addr, head.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
}

#[tokio::test]
async fn connections_over_the_limit_wait_until_one_closes() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), "limits:\n  max_connections: 1\n").await;

    // The first connection is served and kept alive.
    let mut first = TcpStream::connect(gate.addr).await.unwrap();
    first
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(PATIENCE, first.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200 "));

    waits_until_dropped(&gate, first).await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_head_deadline() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), HEAD_TIMEOUT).await;
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200 "));
    // The connection now sits idle; waiting for the next head is bounded by
    // the same deadline, so an idle client cannot hold a slot for ever.
    let (received, elapsed) = read_until_closed(&mut stream).await;
    assert!(received.is_empty());
    assert!(
        elapsed.as_millis() >= HEAD_TIMEOUT_MS - 50,
        "closed too early: {elapsed:?}"
    );
}

#[tokio::test]
async fn a_stalled_upload_is_cut_off_with_408() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), "limits:\n  body_timeout: 300ms\n").await;
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    // Half the promised body, then nothing.
    stream
        .write_all(b"POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let (received, elapsed) = read_until_closed(&mut stream).await;
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(text.contains("stalled"), "{text}");
    assert!(
        elapsed >= Duration::from_millis(250),
        "cut off too early: {elapsed:?}"
    );
}

/// With `limits.max_connections: 1` and `first` holding the slot, a second
/// connection is left in the kernel's backlog: its request is served only
/// once `first` closes.
async fn waits_until_dropped(gate: &Pushgate, first: TcpStream) {
    // The second is left in the kernel's backlog: its request is not served
    // while the first holds the only slot.
    let second = Arc::new(tokio::sync::Mutex::new(
        TcpStream::connect(gate.addr).await.unwrap(),
    ));
    second
        .lock()
        .await
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let early = tokio::time::timeout(Duration::from_millis(300), async {
        second.lock().await.read(&mut [0u8; 16]).await
    })
    .await;
    assert!(early.is_err(), "served beyond limits.max_connections");

    // Closing the first frees the slot and the second is served.
    drop(first);
    let mut second = second.lock().await;
    let (received, _) = read_until_closed(&mut *second).await;
    assert!(
        String::from_utf8_lossy(&received).starts_with("HTTP/1.1 200 "),
        "{}",
        String::from_utf8_lossy(&received)
    );
}

#[tokio::test]
async fn realtime_connections_hold_their_slot_until_they_close() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), "limits:\n  max_connections: 1\n").await;

    // An SSE stream (which leaves hyper after its head)...
    let mut sse = TcpStream::connect(gate.addr).await.unwrap();
    sse.write_all(b"GET /realtime/sse?channel=a HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    common::read_until(&mut sse, "retry:").await;
    waits_until_dropped(&gate, sse).await;

    // ...and a WebSocket (which leaves it at the upgrade).
    let mut ws = TcpStream::connect(gate.addr).await.unwrap();
    ws.write_all(
        b"GET /realtime/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    common::read_until(&mut ws, "HTTP/1.1 101 ").await;
    waits_until_dropped(&gate, ws).await;
}
