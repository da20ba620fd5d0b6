//! The reverse proxy, end to end: a real upstream app, pushgate in front,
//! real HTTP clients, all on ephemeral ports.

use crate::common;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{get, Gate, Pushgate, TempDir, Upstream};
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// The longest any single step of a test may take before it counts as hung.
const STEP: Duration = Duration::from_secs(5);

/// Awaits `future`, failing the test (instead of hanging it) after [`STEP`].
async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {STEP:?}"))
}

/// Extra config that sets keys of the `upstream:` section (merged over the
/// `url` that [`Pushgate::start`] writes there).
fn upstream_keys(keys: &[&str]) -> String {
    let keys: String = keys.iter().map(|key| format!("  {key}\n")).collect();
    format!("upstream:\n{keys}")
}

/// Opens one HTTP/1.1 client connection to `addr`.
async fn http1<B>(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = within("connect", TcpStream::connect(addr)).await.unwrap();
    http1_over(stream).await
}

async fn http1_over<B, I>(io: I) -> hyper::client::conn::http1::SendRequest<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = within(
        "HTTP/1.1 handshake",
        hyper::client::conn::http1::handshake(TokioIo::new(io)),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    sender
}

async fn http2_over<I>(io: I) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = within(
        "HTTP/2 handshake",
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    sender
}

/// Reads the whole body as text.
async fn text(response: Response<Incoming>) -> String {
    let bytes = within("response body", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// Reads `/headers`' answer: what the app saw.
async fn seen_by_app(response: Response<Incoming>) -> serde_json::Value {
    assert_eq!(response.status(), StatusCode::OK);
    serde_json::from_str(&text(response).await).unwrap()
}

/// The values the app saw for header `name` (lower case); empty when absent.
fn app_header(seen: &serde_json::Value, name: &str) -> Vec<String> {
    seen["headers"][name]
        .as_array()
        .map(|values| {
            values
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Reads data frames from `body` until at least `len` bytes have come.
async fn read_at_least(body: &mut Incoming, len: usize) -> Vec<u8> {
    let mut data = Vec::new();
    while data.len() < len {
        let frame = within("next body frame", body.frame())
            .await
            .expect("body ended early")
            .unwrap();
        if let Ok(chunk) = frame.into_data() {
            data.extend_from_slice(&chunk);
        }
    }
    data
}

/// A response read straight off the wire.
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// Sends `request` as written on a new connection and reads one response.
async fn raw_exchange(addr: SocketAddr, request: &str) -> RawResponse {
    within("raw exchange", async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        read_raw_response(&mut stream).await
    })
    .await
}

async fn read_more(stream: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 8192];
    let n = stream.read(&mut chunk).await.unwrap();
    assert!(n > 0, "connection closed mid-response");
    buf.extend_from_slice(&chunk[..n]);
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads one HTTP/1.1 response: head, then a body framed by
/// `content-length` or chunked encoding.
async fn read_raw_response(stream: &mut (impl AsyncRead + Unpin)) -> RawResponse {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(at) = find(&buf, b"\r\n\r\n") {
            break at;
        }
        read_more(stream, &mut buf).await;
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let mut rest = buf[head_end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap();
            (name.trim().to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect();
    let mut response = RawResponse {
        status,
        headers,
        body: Vec::new(),
    };
    if response
        .header("transfer-encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let line_end = loop {
                if let Some(at) = find(&rest, b"\r\n") {
                    break at;
                }
                read_more(stream, &mut rest).await;
            };
            let size_text = String::from_utf8(rest[..line_end].to_vec()).unwrap();
            let size_text = size_text.split(';').next().unwrap().trim();
            let size = usize::from_str_radix(size_text, 16).unwrap();
            rest.drain(..line_end + 2);
            if size == 0 {
                break;
            }
            while rest.len() < size + 2 {
                read_more(stream, &mut rest).await;
            }
            response.body.extend_from_slice(&rest[..size]);
            rest.drain(..size + 2);
        }
    } else {
        let len: usize = response
            .header("content-length")
            .map(|len| len.parse().unwrap())
            .unwrap_or(0);
        while rest.len() < len {
            read_more(stream, &mut rest).await;
        }
        response.body = rest[..len].to_vec();
    }
    response
}

#[tokio::test]
async fn get_reaches_the_app() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), "").await;
    let (status, body) = get(&gate.url("/")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "hello from upstream");
}

#[tokio::test]
async fn request_and_response_bodies_stream_without_buffering() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), "").await;

    let (chunks, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let upload = StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(Frame::data(chunk)), rx))
    }));
    let mut client = http1(gate.addr).await;
    let request = Request::post("/echo")
        .header("host", gate.addr.to_string())
        .body(upload)
        .unwrap();

    let first = Bytes::from_static(b"first chunk of the upload;");
    chunks.send(first.clone()).await.unwrap();
    let response = within("response head", client.send_request(request))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    // The upload is still open: the echo of chunk 1 can only arrive if both
    // legs pass it on before the request body ends.
    let echoed = read_at_least(&mut body, first.len()).await;
    assert_eq!(echoed, first);

    let second = Bytes::from(vec![b'z'; 100_000]);
    chunks.send(second.clone()).await.unwrap();
    drop(chunks);
    let rest = within("rest of the echo", body.collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(rest, second);
    assert_eq!(app.hits.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn slow_upstream_within_timeout_answers_normally() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), &upstream_keys(&["timeout: 300ms"])).await;
    let started = Instant::now();
    let (status, body) = within("slow request", get(&gate.url("/slow-headers?ms=150"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "finally");
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn streamed_response_arrives_chunk_by_chunk() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), "").await;
    let mut held = Gate::new();

    let mut client = http1(gate.addr).await;
    let request = Request::get(held.path())
        .header("host", gate.addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = within("response head", client.send_request(request))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    // The app cannot produce its last chunk until the gate opens, so this
    // first chunk came through on its own.
    assert_eq!(read_at_least(&mut body, 6).await, b"first\n");

    held.open();
    let rest = within("last chunk", body.collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(rest, "last\n");
}

#[tokio::test]
async fn long_streamed_response_outlives_upstream_timeout() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), &upstream_keys(&["timeout: 300ms"])).await;
    let started = Instant::now();
    let (status, body) = within(
        "long stream",
        get(&gate.url("/stream?chunks=10&interval_ms=100")),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let expected: String = (0..10).map(|i| format!("chunk {i}\n")).collect();
    assert_eq!(body, expected);
    // The app slept 10 × 100ms while streaming: well past upstream.timeout.
    assert!(started.elapsed() >= Duration::from_secs(1));
}

#[tokio::test]
async fn upstream_down_is_502_naming_the_cause() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    };
    let gate = Pushgate::start(&format!("http://127.0.0.1:{port}"), "").await;

    let response = raw_exchange(
        gate.addr,
        "GET /anything HTTP/1.1\r\nHost: app.example\r\n\r\n",
    )
    .await;
    assert_eq!(response.status, 502);
    assert!(response
        .header("content-type")
        .is_some_and(|ct| ct.starts_with("text/plain")));
    let body = String::from_utf8(response.body).unwrap();
    assert!(body.contains("refused"), "body: {body:?}");
    assert!(body.len() < 200, "body is not short: {body:?}");
}

#[tokio::test]
async fn silent_upstream_is_504_after_timeout() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), &upstream_keys(&["timeout: 300ms"])).await;
    let started = Instant::now();
    let response = raw_exchange(
        gate.addr,
        "GET /silent HTTP/1.1\r\nHost: app.example\r\n\r\n",
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(response.status, 504);
    assert!(response
        .header("content-type")
        .is_some_and(|ct| ct.starts_with("text/plain")));
    let body = String::from_utf8(response.body).unwrap();
    assert!(
        body.contains("no response headers within 300ms"),
        "body: {body:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(300),
        "answered after {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "answered after {elapsed:?}"
    );
    assert_eq!(app.hits.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn hop_by_hop_and_spoofed_forwarding_headers_do_not_reach_the_app() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), "").await;

    let response = raw_exchange(
        gate.addr,
        "GET /headers?q=1 HTTP/1.1\r\n\
         Host: app.example:8443\r\n\
         Connection: keep-alive, Upgrade, HTTP2-Settings, X-Secret\r\n\
         Keep-Alive: timeout=5\r\n\
         TE: trailers\r\n\
         Upgrade: h2c\r\n\
         HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\
         Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\
         Proxy-Connection: keep-alive\r\n\
         X-Secret: named in Connection\r\n\
         X-Forwarded-For: 6.6.6.6\r\n\
         X-Forwarded-Proto: https\r\n\
         X-Forwarded-Host: evil.example\r\n\
         Forwarded: for=6.6.6.6;proto=https\r\n\
         X-Real-IP: 6.6.6.6\r\n\
         X-Custom: kept\r\n\
         \r\n",
    )
    .await;
    assert_eq!(response.status, 200);
    let seen = response.json();
    assert_eq!(seen["method"], "GET");
    assert_eq!(seen["uri"], "/headers?q=1");
    for gone in [
        "connection",
        "keep-alive",
        "te",
        "upgrade",
        "http2-settings",
        "proxy-authorization",
        "proxy-connection",
        "x-secret",
        "forwarded",
        "x-real-ip",
    ] {
        assert!(
            app_header(&seen, gone).is_empty(),
            "`{gone}` reached the app: {seen}"
        );
    }
    assert_eq!(app_header(&seen, "x-custom"), ["kept"]);
    assert_eq!(app_header(&seen, "host"), ["app.example:8443"]);
    assert_eq!(app_header(&seen, "x-forwarded-host"), ["app.example:8443"]);
    assert_eq!(app_header(&seen, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(app_header(&seen, "x-forwarded-proto"), ["http"]);
}

#[tokio::test]
async fn forwarded_for_chain_is_extended_for_a_trusted_proxy() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(
        &app.url(),
        &upstream_keys(&["trusted_proxies: [127.0.0.1]"]),
    )
    .await;

    let seen = raw_exchange(
        gate.addr,
        "GET /headers HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
    )
    .await
    .json();
    assert_eq!(app_header(&seen, "x-forwarded-for"), ["1.2.3.4, 127.0.0.1"]);
    assert_eq!(app_header(&seen, "x-forwarded-proto"), ["http"]);
    assert_eq!(app_header(&seen, "x-forwarded-host"), ["app.example"]);

    // Several header lines make one chain, in order.
    let seen = raw_exchange(
        gate.addr,
        "GET /headers HTTP/1.1\r\nHost: app.example\r\n\
         X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-For: 5.6.7.8\r\n\r\n",
    )
    .await
    .json();
    assert_eq!(
        app_header(&seen, "x-forwarded-for"),
        ["1.2.3.4, 5.6.7.8, 127.0.0.1"]
    );

    // The trusted proxy's word on scheme and host stands, once; a claim it
    // did not make is pushgate's own.
    let seen = raw_exchange(
        gate.addr,
        "GET /headers HTTP/1.1\r\nHost: app.internal\r\n\
         X-Forwarded-Proto: https\r\nX-Forwarded-Host: public.example\r\n\r\n",
    )
    .await
    .json();
    assert_eq!(app_header(&seen, "x-forwarded-proto"), ["https"]);
    assert_eq!(app_header(&seen, "x-forwarded-host"), ["public.example"]);
    assert_eq!(app_header(&seen, "x-forwarded-for"), ["127.0.0.1"]);
    let seen = raw_exchange(
        gate.addr,
        "GET /headers HTTP/1.1\r\nHost: app.internal\r\nX-Forwarded-Proto: https\r\n\r\n",
    )
    .await
    .json();
    assert_eq!(app_header(&seen, "x-forwarded-proto"), ["https"]);
    assert_eq!(app_header(&seen, "x-forwarded-host"), ["app.internal"]);
}

#[tokio::test]
async fn hop_by_hop_response_headers_do_not_reach_the_client() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), "").await;

    let response = raw_exchange(
        gate.addr,
        "GET /headers HTTP/1.1\r\nHost: app.example\r\n\r\n",
    )
    .await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_eq!(response.header("x-hop"), None);
    assert_eq!(response.header("keep-alive"), None);
    for (name, value) in &response.headers {
        assert!(
            !(name == "connection" && value.to_ascii_lowercase().contains("x-hop")),
            "the app's Connection header reached the client: {value}"
        );
    }
    assert_eq!(response.json()["method"], "GET");
}

#[tokio::test]
async fn http2_client_is_proxied_as_http1_with_authority_as_host() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), "").await;

    let stream = within("connect", TcpStream::connect(gate.addr))
        .await
        .unwrap();
    let mut client = http2_over(stream).await;
    let request = Request::get("http://app.example:8443/headers?via=h2")
        .body(Empty::new())
        .unwrap();
    let response = within("HTTP/2 response", client.send_request(request))
        .await
        .unwrap();
    assert_eq!(response.version(), Version::HTTP_2);
    let seen = seen_by_app(response).await;
    assert_eq!(seen["version"], "HTTP/1.1");
    assert_eq!(seen["uri"], "/headers?via=h2");
    assert_eq!(app_header(&seen, "host"), ["app.example:8443"]);
    assert_eq!(app_header(&seen, "x-forwarded-host"), ["app.example:8443"]);
    assert_eq!(app_header(&seen, "x-forwarded-proto"), ["http"]);
}

#[tokio::test]
async fn tls_serves_h2_and_http1_by_alpn() {
    let app = Upstream::start().await;
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = TempDir::new("proxy-tls");
    let cert_path = dir.0.join("cert.pem");
    let key_path = dir.0.join("key.pem");
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.key_pair.serialize_pem()).unwrap();
    let gate = Pushgate::start(
        &app.url(),
        &format!(
            "tls:\n  cert: {}\n  key: {}\n",
            cert_path.display(),
            key_path.display()
        ),
    )
    .await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let connect = |alpn: &'static [u8]| {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        async move {
            let tcp = TcpStream::connect(gate.addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            within("TLS handshake", connector.connect(name, tcp))
                .await
                .unwrap()
        }
    };

    let tls = connect(b"h2").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut client = http2_over(tls).await;
    let request = Request::get("https://localhost/headers")
        .body(Empty::new())
        .unwrap();
    let response = within("h2 over TLS", client.send_request(request))
        .await
        .unwrap();
    assert_eq!(response.version(), Version::HTTP_2);
    let seen = seen_by_app(response).await;
    assert_eq!(app_header(&seen, "x-forwarded-proto"), ["https"]);
    assert_eq!(app_header(&seen, "host"), ["localhost"]);

    let tls = connect(b"http/1.1").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut client = http1_over(tls).await;
    let request = Request::get("/headers")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = within("HTTP/1.1 over TLS", client.send_request(request))
        .await
        .unwrap();
    assert_eq!(response.version(), Version::HTTP_11);
    let seen = seen_by_app(response).await;
    assert_eq!(app_header(&seen, "x-forwarded-proto"), ["https"]);
    assert_eq!(app_header(&seen, "host"), ["localhost"]);
    assert_eq!(app.hits.load(Ordering::Relaxed), 2);

    // An SSE stream over HTTP/1.1 on TLS, written by pushgate itself once
    // its head is out, until the connection ends.
    let request = Request::get("/realtime/sse?channel=t")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = within("SSE over TLS", client.send_request(request))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    if common::fast_path_on("SSE_DETACH") {
        assert_eq!(response.headers()["connection"], "close");
    }
    let mut body = response.into_body();
    let mut text = String::new();
    let mut published = false;
    while !text.contains("\"over tls\"") {
        if text.contains("retry:") && !published {
            let (status, _) = common::api_call(
                gate.api_addr,
                "POST",
                "/api/publish",
                Some(serde_json::json!({"channel": "t", "data": "over tls"})),
            )
            .await;
            assert_eq!(status, StatusCode::OK);
            published = true;
        }
        let frame = within("an SSE frame over TLS", body.frame())
            .await
            .expect("the stream goes on")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
    }

    // A WebSocket over TLS: its socket, the TLS stream, taken back out of
    // hyper after the upgrade, serves the session.
    let tls = connect(b"http/1.1").await;
    let (mut ws, response) = within(
        "WebSocket handshake over TLS",
        tokio_tungstenite::client_async("wss://localhost/realtime/ws?channel=w", tls),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let ping = serde_json::json!({"id": 1, "op": "ping"}).to_string();
    within("send over TLS", ws.send(Message::text(ping)))
        .await
        .unwrap();
    let pong = within("the reply over TLS", ws.next())
        .await
        .expect("the socket goes on")
        .unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(pong.to_text().unwrap()).unwrap(),
        serde_json::json!({"id": 1, "result": {}})
    );
    let (status, _) = common::api_call(
        gate.api_addr,
        "POST",
        "/api/publish",
        Some(serde_json::json!({"channel": "w", "data": "wss"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let envelope = within("an envelope over TLS", ws.next())
        .await
        .expect("the socket goes on")
        .unwrap();
    assert!(
        envelope.to_text().unwrap().contains(r#""data":"wss""#),
        "{envelope:?}"
    );
    within("close over TLS", ws.close(None)).await.unwrap();
}

#[tokio::test]
async fn websocket_upgrade_is_tunnelled_to_the_app() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), "").await;

    let (mut ws, response) = within(
        "WebSocket handshake",
        tokio_tungstenite::connect_async(format!("ws://{}/ws", gate.addr)),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);

    let messages = [
        Message::text("hello through the tunnel"),
        Message::binary(vec![0u8, 1, 2, 254, 255]),
        Message::text("x".repeat(70_000)),
    ];
    for message in messages {
        within("send", ws.send(message.clone())).await.unwrap();
        let echoed = within("echo", ws.next())
            .await
            .expect("tunnel closed")
            .unwrap();
        assert_eq!(echoed, message);
    }
    within("close", ws.close(None)).await.unwrap();
    assert_eq!(app.hits.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn connect_is_refused_with_405() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), "").await;

    let response = raw_exchange(
        gate.addr,
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    )
    .await;
    assert_eq!(response.status, 405);
    let body = String::from_utf8(response.body).unwrap();
    assert!(body.contains("CONNECT"), "body: {body:?}");
    assert_eq!(app.hits.load(Ordering::Relaxed), 0);
}

/// A connection's first bytes are read in one go, more than the request
/// line: a body and a pipelined request that came with the first head must
/// still reach the app, in order and whole.
#[tokio::test]
async fn a_body_and_a_pipelined_request_in_the_first_segment_lose_nothing() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), "").await;

    let body = "x".repeat(1000);
    let segment = format!(
        "POST /echo HTTP/1.1\r\nHost: app.example\r\nContent-Length: {}\r\n\r\n{body}\
         GET /headers HTTP/1.1\r\nHost: app.example\r\nX-Second: yes\r\n\r\n",
        body.len()
    );
    within("pipelined exchange", async {
        let mut stream = TcpStream::connect(gate.addr).await.unwrap();
        stream.write_all(segment.as_bytes()).await.unwrap();
        let echoed = read_raw_response(&mut stream).await;
        assert_eq!(echoed.status, 200);
        assert_eq!(String::from_utf8(echoed.body).unwrap(), body);
        let second = read_raw_response(&mut stream).await;
        assert_eq!(second.status, 200);
        let seen = second.json();
        assert_eq!(seen["method"], "GET");
        assert_eq!(app_header(&seen, "x-second"), ["yes"]);
    })
    .await;
    assert_eq!(app.hits.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn keep_alive_requests_share_one_client_connection() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), "").await;

    const REQUESTS: u64 = 10;
    let mut client = http1(gate.addr).await;
    for i in 0..REQUESTS {
        within("connection ready", client.ready()).await.unwrap();
        let request = Request::get(format!("/page/{i}"))
            .header("host", "app.example")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = within("keep-alive request", client.send_request(request))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(text(response).await, "hello from upstream");
    }
    assert_eq!(app.hits.load(Ordering::Relaxed), REQUESTS);
    // pushgate reuses its pooled connections to the app.
    let connections = app.connections.load(Ordering::Relaxed);
    assert!(
        connections < REQUESTS,
        "{connections} app connections for {REQUESTS} requests"
    );
}

#[tokio::test]
async fn slow_upload_outlives_upstream_timeout() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), &upstream_keys(&["timeout: 300ms"])).await;

    // `/count` answers once it has read the whole body, so its headers can
    // only come after the upload ends: here 8 × 100ms, past upstream.timeout.
    let (chunks, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let upload = StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(Frame::data(chunk)), rx))
    }));
    tokio::spawn(async move {
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if chunks.send(Bytes::from(vec![b'u'; 1000])).await.is_err() {
                return;
            }
        }
    });
    let mut client = http1(gate.addr).await;
    let request = Request::post("/count")
        .header("host", gate.addr.to_string())
        .body(upload)
        .unwrap();
    let started = Instant::now();
    let response = within("response to a slow upload", client.send_request(request))
        .await
        .unwrap();
    let elapsed = started.elapsed();
    let status = response.status();
    let body = text(response).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "8000"),
        "after {elapsed:?}"
    );
}

/// The binary serves the public listener from one runtime per core, each on
/// its own `SO_REUSEPORT` socket; every shard proxies, and shutdown closes
/// them all.
#[tokio::test]
async fn sharded_listeners_all_serve_and_all_close() {
    let app = Upstream::start().await;
    let yaml = format!(
        "listen: 127.0.0.1:0\nupstream:\n  url: {}\napi:\n  listen: 127.0.0.1:0\n  keys: [k]\nauth:\n  mode: none\n",
        app.url()
    );
    let mut settings =
        pushgate::config::from_yaml(&yaml, "test.yaml", Vec::<(String, String)>::new()).unwrap();
    common::switch_fast_paths(&mut settings.config);
    let server = pushgate::Server::bind_sharded(settings, 3).await.unwrap();
    let addr = server.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));

    // Many separate connections: the kernel spreads them over the shards,
    // and each must be proxied.
    let requests: Vec<_> = (0..60)
        .map(|_| {
            tokio::spawn(async move {
                let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                tokio::io::AsyncWriteExt::write_all(
                    &mut stream,
                    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                )
                .await
                .unwrap();
                let mut answer = Vec::new();
                tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut answer)
                    .await
                    .unwrap();
                String::from_utf8_lossy(&answer).into_owned()
            })
        })
        .collect();
    for request in requests {
        let answer = within("a sharded answer", request).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(answer.ends_with("hello from upstream"), "{answer}");
    }

    let _ = stop.send(());
    within("shutdown", running).await.unwrap().unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no shard is still listening"
    );
}

/// An app written at the socket, for answers a framework would not send:
/// `serve(n, stream)` handles the `n`-th connection pushgate opens (from 0).
struct RawApp {
    addr: SocketAddr,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
}

impl RawApp {
    async fn start<F, Fut>(serve: F) -> RawApp
    where
        F: Fn(usize, TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(n, stream));
            }
        });
        RawApp { addr, accepted }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Reads one request head off `stream`: its request line, or `None` when
/// the connection closed first.
async fn next_request_line(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8(buf[..end].to_vec()).unwrap();
            return Some(head.lines().next().unwrap().to_owned());
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Sends `request` on `client` and returns the status and the whole body.
async fn send_collect(
    client: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    request: Request<Empty<Bytes>>,
) -> (StatusCode, Result<Bytes, hyper::Error>) {
    within("connection ready", client.ready()).await.unwrap();
    let response = within("answer", client.send_request(request))
        .await
        .unwrap();
    let status = response.status();
    let body = within("body", response.into_body().collect())
        .await
        .map(|collected| collected.to_bytes());
    (status, body)
}

fn get_request(path: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header("host", "app.example")
        .body(Empty::new())
        .unwrap()
}

#[tokio::test]
async fn answers_framed_every_way_pass_through_on_one_kept_alive_connection() {
    let app = RawApp::start(|_, mut stream| async move {
        while let Some(line) = next_request_line(&mut stream).await {
            let answer: &[u8] = match line.as_str() {
                "GET /chunked HTTP/1.1" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Digest: abc\r\n\r\n",
                "GET /length HTTP/1.1" => b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-App: raw\r\n\r\nsix ch",
                "GET /no-content HTTP/1.1" => b"HTTP/1.1 204 No Content\r\n\r\n",
                "HEAD /length HTTP/1.1" => b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
                "GET /interim HTTP/1.1" => b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                other => panic!("unexpected request {other}"),
            };
            // In pieces, as a slow app would write it.
            for piece in answer.chunks(7) {
                stream.write_all(piece).await.unwrap();
                stream.flush().await.unwrap();
            }
        }
    })
    .await;
    let gate = Pushgate::start(&app.url(), "").await;
    let mut client = http1(gate.addr).await;

    let (status, body) = send_collect(&mut client, get_request("/chunked")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.unwrap(), "hello, world");
    let (status, body) = send_collect(&mut client, get_request("/length")).await;
    assert_eq!(
        (status, body.unwrap()),
        (StatusCode::OK, Bytes::from("six ch"))
    );
    let (status, body) = send_collect(&mut client, get_request("/no-content")).await;
    assert_eq!(
        (status, body.unwrap()),
        (StatusCode::NO_CONTENT, Bytes::new())
    );

    within("connection ready", client.ready()).await.unwrap();
    let head = Request::head("/length")
        .header("host", "app.example")
        .body(Empty::new())
        .unwrap();
    let response = within("HEAD answer", client.send_request(head))
        .await
        .unwrap();
    assert_eq!(response.headers()["content-length"], "1000");
    assert!(within("HEAD body", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes()
        .is_empty());

    let (status, body) = send_collect(&mut client, get_request("/interim")).await;
    assert_eq!((status, body.unwrap()), (StatusCode::OK, Bytes::from("ok")));
    // Every answer ended where its framing said, so one connection served all.
    assert_eq!(app.accepted(), 1);
}

#[tokio::test]
async fn an_answer_ended_by_close_passes_whole_and_its_connection_is_not_reused() {
    let app = RawApp::start(|n, mut stream| async move {
        if next_request_line(&mut stream).await.is_some() {
            let body = format!("connection {n} {}", "x".repeat(20_000));
            stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
            stream.write_all(body.as_bytes()).await.unwrap();
        }
    })
    .await;
    let gate = Pushgate::start(&app.url(), "").await;
    for n in 0..2 {
        let (status, body) = within("close-delimited answer", get(&gate.url("/"))).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.starts_with(&format!("connection {n} xxx")),
            "{}",
            &body[..20]
        );
        assert_eq!(body.len(), format!("connection {n} ").len() + 20_000);
    }
    assert_eq!(app.accepted(), 2);
}

#[tokio::test]
async fn a_kept_alive_connection_the_app_dropped_is_retried_only_when_safe() {
    // Every connection answers one request, then reads the next and hangs up
    // without answering, as an app closing an idle connection at that
    // moment would.
    let app = RawApp::start(|_, mut stream| async move {
        if next_request_line(&mut stream).await.is_some() {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .unwrap();
            let _ = next_request_line(&mut stream).await;
        }
    })
    .await;
    let gate = Pushgate::start(&app.url(), "").await;
    let mut client = http1(gate.addr).await;

    let (status, _) = send_collect(&mut client, get_request("/a")).await;
    assert_eq!(status, StatusCode::OK);
    // Sent on the first connection, dropped there, sent again on a new one.
    let (status, body) = send_collect(&mut client, get_request("/b")).await;
    assert_eq!((status, body.unwrap()), (StatusCode::OK, Bytes::from("ok")));
    assert_eq!(app.accepted(), 2);

    // A POST may have been acted on before the app hung up: not repeated.
    let post = Request::post("/c")
        .header("host", "app.example")
        .body(Empty::new())
        .unwrap();
    let (status, body) = send_collect(&mut client, post).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let body = String::from_utf8(body.unwrap().to_vec()).unwrap();
    assert!(body.contains("without a valid response"), "{body}");
    assert_eq!(app.accepted(), 2);
}

#[tokio::test]
async fn invalid_answers_are_502_and_a_cut_body_is_not_passed_off_as_whole() {
    let app = RawApp::start(|_, mut stream| async move {
        // Whatever is wrong with an answer, its connection is done after it.
        if let Some(line) = next_request_line(&mut stream).await {
            let answer = match line.as_str() {
                "GET /not-http HTTP/1.1" => b"SSH-2.0-OpenSSH_9.2\r\n\r\n".to_vec(),
                "GET /bad-length HTTP/1.1" => {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello".to_vec()
                }
                "GET /huge-head HTTP/1.1" => {
                    let filler = "a".repeat(1000);
                    let fields: String = (0..70).map(|i| format!("X-F{i}: {filler}\r\n")).collect();
                    format!("HTTP/1.1 200 OK\r\n{fields}\r\n").into_bytes()
                }
                "GET /cut HTTP/1.1" => {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b".to_vec()
                }
                other => panic!("unexpected request {other}"),
            };
            stream.write_all(&answer).await.unwrap();
        }
    })
    .await;
    let gate = Pushgate::start(&app.url(), "").await;
    for path in ["/not-http", "/bad-length", "/huge-head"] {
        let (status, body) = within(path, get(&gate.url(path))).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{path}");
        assert!(body.contains("without a valid response"), "{path}: {body}");
    }
    // The head may or may not have left before the body was found short;
    // either way the client must see a failure, not a shorter body.
    let mut client = http1(gate.addr).await;
    within("connection ready", client.ready()).await.unwrap();
    if let Ok(response) = within("answer", client.send_request(get_request("/cut"))).await {
        let body = within("body", response.into_body().collect()).await;
        assert!(body.is_err(), "a body cut short must fail");
    }
    assert_eq!(app.accepted(), 4);
}

#[tokio::test]
async fn idle_connections_to_the_app_close_after_pool_idle_timeout() {
    let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
    let app = RawApp::start(move |_, mut stream| {
        let closed_tx = closed_tx.clone();
        async move {
            while next_request_line(&mut stream).await.is_some() {
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await
                    .unwrap();
            }
            let _ = closed_tx.send(Instant::now());
        }
    })
    .await;
    let gate = Pushgate::start(&app.url(), &upstream_keys(&["pool_idle_timeout: 300ms"])).await;
    let (status, _) = get(&gate.url("/")).await;
    assert_eq!(status, StatusCode::OK);
    let answered = Instant::now();
    let closed_at = within("idle connection closed", closed.recv())
        .await
        .unwrap();
    let idle = closed_at - answered;
    assert!(
        idle >= Duration::from_millis(250) && idle < Duration::from_millis(1500),
        "closed after {idle:?}"
    );
}

#[tokio::test]
async fn bytes_after_an_answer_never_answer_the_next_request() {
    let app = RawApp::start(|n, mut stream| async move {
        while next_request_line(&mut stream).await.is_some() {
            let answer: &[u8] = if n == 0 {
                // One answer and, stuck to it, a second nobody asked for.
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nwrong"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfine"
            };
            stream.write_all(answer).await.unwrap();
        }
    })
    .await;
    let gate = Pushgate::start(&app.url(), "").await;
    let mut client = http1(gate.addr).await;
    let (_, first) = send_collect(&mut client, get_request("/one")).await;
    assert_eq!(first.unwrap(), "ok");
    let (_, second) = send_collect(&mut client, get_request("/two")).await;
    assert_eq!(second.unwrap(), "fine");
    assert_eq!(app.accepted(), 2);
}

/// Each way the app cannot be reached is told in its own words: nothing
/// listening, and a host name that does not resolve.
#[tokio::test]
async fn an_app_that_cannot_be_reached_is_told_apart_by_cause() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    for (upstream, words) in [
        (format!("http://{closed}"), "refused the connection"),
        (
            "http://pushgate-test-host.invalid:3000".to_owned(),
            "could not be reached: its host name did not resolve",
        ),
    ] {
        let gate = Pushgate::start(&upstream, "").await;
        let (status, body) = common::get(&format!("http://{}/", gate.addr)).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{upstream}");
        assert!(body.contains(words), "{upstream}: {body}");
    }
}
