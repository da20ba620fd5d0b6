//! Authenticating realtime connections against a real app: what the app is
//! sent, every way it can answer, grants enforced on every transport, and
//! the grant cache.

use crate::common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Pushgate, API_KEY};
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const PATIENCE: Duration = Duration::from_secs(10);

/// A real app whose auth endpoint answers from the session cookie:
/// `session=alice` → alice may hear `chat:1` and `user:alice:*`;
/// `session=banned` → 403; `session=slow` → no answer for 5 s;
/// `session=redirect|crash|garbage` → 302, 500, a 200 that is not a grant;
/// `session=huge` → a grant too large to read;
/// anything else → 401.
struct App {
    addr: SocketAddr,
    /// Connections pushgate opened to the app.
    connections: Arc<AtomicU64>,
    auth_requests: Arc<AtomicU64>,
    last_request: Arc<Mutex<Option<(http::HeaderMap, Value)>>>,
}

impl App {
    async fn start() -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let auth_requests = Arc::new(AtomicU64::new(0));
        let last_request = Arc::new(Mutex::new(None));
        let connections = Arc::new(AtomicU64::new(0));
        let (count, last, opened) = (
            auth_requests.clone(),
            last_request.clone(),
            connections.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                opened.fetch_add(1, Ordering::SeqCst);
                let (count, last) = (count.clone(), last.clone());
                tokio::spawn(async move {
                    let service =
                        service_fn(move |request| answer(request, count.clone(), last.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        App {
            addr,
            connections,
            auth_requests,
            last_request,
        }
    }

    fn requests(&self) -> u64 {
        self.auth_requests.load(Ordering::SeqCst)
    }
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<BoxBody<Bytes, Infallible>> {
    let mut response = Response::new(Full::new(body.into()).boxed());
    *response.status_mut() = status;
    response
}

async fn answer(
    request: Request<Incoming>,
    count: Arc<AtomicU64>,
    last: Arc<Mutex<Option<(http::HeaderMap, Value)>>>,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    match request.uri().path() {
        "/realtime/auth" => {}
        "/realtime/refresh" => return Ok(refresh(request, count).await),
        "/realtime/subscribe" => return Ok(subscribe(request).await),
        _ => return Ok(reply(StatusCode::OK, "a page of the app")),
    }
    count.fetch_add(1, Ordering::SeqCst);
    let headers = request.headers().clone();
    let cookie = headers
        .get("cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let from = headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    *last.lock().unwrap() = Some((headers, body));
    Ok(match cookie.as_str() {
        "session=alice" => reply(
            StatusCode::OK,
            json!({"user": "alice", "channels": ["chat:1", "user:alice:*"], "expires_in": 3600, "info": {"name": "Alice"}}).to_string(),
        ),
        "session=brief" | "session=renewable" => reply(
            StatusCode::OK,
            json!({"user": "carol", "channels": ["chat:1", "news"], "expires_in": 1}).to_string(),
        ),
        // One cookie, an answer per client address: the app's decision
        // depends on X-Forwarded-For.
        "session=by-address" => match from.as_str() {
            "127.0.0.2" => reply(
                StatusCode::OK,
                json!({"user": "dora", "channels": ["addr:2"]}).to_string(),
            ),
            "127.0.0.3" => reply(
                StatusCode::FORBIDDEN,
                json!({"reason": "not from this address"}).to_string(),
            ),
            _ => reply(
                StatusCode::OK,
                json!({"user": "dora", "channels": ["addr:other"]}).to_string(),
            ),
        },
        // A grant the app asks not to be kept.
        "session=no-store" => {
            let mut response = reply(
                StatusCode::OK,
                json!({"user": "nell", "channels": ["chat:1"]}).to_string(),
            );
            response
                .headers_mut()
                .insert("cache-control", "private, no-store".parse().unwrap());
            response
        }
        "session=banned" => reply(StatusCode::FORBIDDEN, json!({"reason": "banned for spam"}).to_string()),
        "session=slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            reply(StatusCode::OK, "{}")
        }
        "session=redirect" => {
            let mut response = reply(StatusCode::FOUND, "");
            response
                .headers_mut()
                .insert("location", "/login".parse().unwrap());
            response
        }
        "session=crash" => reply(StatusCode::INTERNAL_SERVER_ERROR, "boom"),
        "session=garbage" => reply(StatusCode::OK, "<html>welcome</html>"),
        // A grant whose body is past what pushgate reads of one (256 KiB).
        "session=huge" => reply(
            StatusCode::OK,
            json!({"user": "h", "channels": ["x".repeat(300 * 1024)]}).to_string(),
        ),
        _ => reply(StatusCode::UNAUTHORIZED, "please log in"),
    })
}

/// The refresh endpoint: `session=renewable` is extended (without `news`),
/// anyone else has logged out.
async fn refresh(
    request: Request<Incoming>,
    count: Arc<AtomicU64>,
) -> Response<BoxBody<Bytes, Infallible>> {
    count.fetch_add(1, Ordering::SeqCst);
    let renewable = request
        .headers()
        .get("cookie")
        .is_some_and(|c| c == "session=renewable");
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let asked: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(asked["user"], "carol");
    assert!(asked["connection_id"].is_string());
    if renewable {
        reply(
            StatusCode::OK,
            json!({"user": "carol", "channels": ["chat:1"], "expires_in": 1}).to_string(),
        )
    } else {
        reply(
            StatusCode::UNAUTHORIZED,
            json!({"reason": "session ended"}).to_string(),
        )
    }
}

/// The subscribe endpoint: `extra:ok` is allowed, anything else is not.
async fn subscribe(request: Request<Incoming>) -> Response<BoxBody<Bytes, Infallible>> {
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let asked: Value = serde_json::from_slice(&body).unwrap();
    if asked["channel"] == "extra:ok" {
        reply(StatusCode::OK, "{}")
    } else {
        reply(
            StatusCode::FORBIDDEN,
            json!({"reason": "not yours"}).to_string(),
        )
    }
}

/// A long-poll for `chat:1` on `gate` that answers at once: one connect,
/// one auth decision.
fn poll_url(gate: &Pushgate) -> String {
    format!(
        "http://{}/realtime/poll?channel=chat:1&timeout=0",
        gate.addr
    )
}

async fn start(app_url: &str, extra: &str) -> Pushgate {
    let auth = format!("auth:\n  mode: upstream\n  upstream:\n    timeout: 500ms\n{extra}");
    Pushgate::start(app_url, &auth).await
}

/// GETs a realtime URL with a cookie; the status and the body's error code
/// (or the first bytes of a stream).
async fn get_with_cookie(url: &str, cookie: Option<&str>) -> (StatusCode, Value) {
    let mut request = Request::get(url);
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    let response = tokio::time::timeout(
        PATIENCE,
        common::client().request(request.body(common::empty_body()).unwrap()),
    )
    .await
    .expect("answered in time")
    .unwrap();
    let status = response.status();
    if status == StatusCode::OK {
        return (status, Value::Null);
    }
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Opens a WebSocket with a cookie; returns the close code pushgate sends
/// (with its reason), or `None` when the connection stays open.
async fn websocket_outcome(gate: &Pushgate, query: &str, cookie: &str) -> Option<(u16, String)> {
    let mut request = format!("ws://{}/realtime/ws{query}", gate.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("cookie", cookie.parse().unwrap());
    let (mut client, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("the upgrade is accepted, even when auth fails");
    client
        .send(Message::text(json!({"id": 1, "op": "ping"}).to_string()))
        .await
        .ok();
    loop {
        match tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Close(frame))) => {
                return frame.map(|f| (u16::from(f.code), f.reason.to_string()))
            }
            Some(Ok(Message::Text(text))) => {
                let reply: Value = serde_json::from_str(text.as_str()).unwrap();
                if reply["id"] == 1 {
                    return None;
                }
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Some((0, "dropped".into())),
        }
    }
}

#[tokio::test]
async fn the_app_gets_the_forwarded_headers_and_the_connection_facts() {
    let app = App::start().await;
    let gate = start(&format!("http://{}", app.addr), "").await;
    let (status, _) = get_with_cookie(&poll_url(&gate), Some("session=alice")).await;
    assert_eq!(status, StatusCode::OK);
    let (headers, body) = app.last_request.lock().unwrap().clone().unwrap();
    assert_eq!(headers["cookie"], "session=alice");
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(
        body,
        json!({"transport": "poll", "channels": ["chat:1"], "path": "/realtime/poll", "query": "channel=chat:1&timeout=0"})
    );
}

#[tokio::test]
async fn every_refusal_has_its_status_on_sse_and_poll() {
    let app = App::start().await;
    let gate = start(&format!("http://{}", app.addr), "    cache_ttl: 0s\n").await;
    for path in ["sse?channel=chat:1", "poll?channel=chat:1&timeout=0"] {
        let url = format!("http://{}/realtime/{path}", gate.addr);
        for (cookie, status, code) in [
            (None, StatusCode::UNAUTHORIZED, "unauthenticated"),
            (
                Some("session=nobody"),
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
            ),
            (Some("session=banned"), StatusCode::FORBIDDEN, "forbidden"),
            (
                Some("session=slow"),
                StatusCode::SERVICE_UNAVAILABLE,
                "auth_unavailable",
            ),
            (
                Some("session=redirect"),
                StatusCode::SERVICE_UNAVAILABLE,
                "auth_unavailable",
            ),
            (
                Some("session=crash"),
                StatusCode::SERVICE_UNAVAILABLE,
                "auth_unavailable",
            ),
            (
                Some("session=garbage"),
                StatusCode::SERVICE_UNAVAILABLE,
                "auth_unavailable",
            ),
            (
                Some("session=huge"),
                StatusCode::SERVICE_UNAVAILABLE,
                "auth_unavailable",
            ),
        ] {
            let started = Instant::now();
            let (got, body) = get_with_cookie(&url, cookie).await;
            assert_eq!(got, status, "{path} {cookie:?}: {body}");
            assert_eq!(body["error"]["code"], code, "{path} {cookie:?}");
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "bounded by auth.upstream.timeout"
            );
        }
        let (_, banned) = get_with_cookie(&url, Some("session=banned")).await;
        assert_eq!(
            banned["error"]["message"], "banned for spam",
            "the app's reason reaches the client"
        );
        let (_, nobody) = get_with_cookie(&url, Some("session=nobody")).await;
        assert_eq!(nobody["error"]["message"], "please log in");
    }
}

#[tokio::test]
async fn the_app_being_down_is_503_never_allowed() {
    // Nothing listens on this port.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gate = start(&format!("http://127.0.0.1:{port}"), "").await;
    let (status, body) = get_with_cookie(
        &format!("http://{}/realtime/sse?channel=c", gate.addr),
        Some("session=alice"),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"]["code"], "auth_unavailable");
    assert_eq!(
        websocket_outcome(&gate, "", "session=alice")
            .await
            .map(|c| c.0),
        Some(1013)
    );
}

#[tokio::test]
async fn websocket_refusals_are_close_codes_with_reasons() {
    let app = App::start().await;
    let gate = start(&format!("http://{}", app.addr), "").await;
    assert_eq!(
        websocket_outcome(&gate, "", "session=nobody").await,
        Some((4001, "please log in".into()))
    );
    assert_eq!(
        websocket_outcome(&gate, "", "session=banned").await,
        Some((4003, "banned for spam".into()))
    );
    assert_eq!(
        websocket_outcome(&gate, "", "session=crash")
            .await
            .map(|c| c.0),
        Some(1013)
    );
    assert_eq!(websocket_outcome(&gate, "", "session=alice").await, None);
    // A channel outside the grant named at connect: forbidden.
    assert_eq!(
        websocket_outcome(&gate, "?channel=chat:2", "session=alice")
            .await
            .map(|c| c.0),
        Some(4003)
    );
}

#[tokio::test]
async fn grants_are_enforced_with_exact_names_and_prefixes() {
    let app = App::start().await;
    let gate = start(&format!("http://{}", app.addr), "").await;
    let base = format!("http://{}/realtime", gate.addr);
    for (channel, allowed) in [
        ("chat:1", true),
        ("user:alice:inbox", true),
        ("chat:2", false),
        ("user:bob:inbox", false),
    ] {
        let (status, body) = get_with_cookie(
            &format!("{base}/poll?channel={channel}&timeout=0"),
            Some("session=alice"),
        )
        .await;
        if allowed {
            assert_eq!(status, StatusCode::OK, "{channel}");
        } else {
            assert_eq!(status, StatusCode::FORBIDDEN, "{channel}");
            assert_eq!(body["error"]["code"], "forbidden");
        }
    }

    // On WebSocket, a subscribe outside the grant is an error reply; the
    // connection stays.
    let mut request = format!("ws://{}/realtime/ws", gate.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("cookie", "session=alice".parse().unwrap());
    let (mut client, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let send = |id: u64, channel: &str| {
        Message::text(json!({"id": id, "op": "subscribe", "channel": channel}).to_string())
    };
    client.send(send(1, "chat:2")).await.unwrap();
    client.send(send(2, "user:alice:inbox")).await.unwrap();
    let mut replies = Vec::new();
    while replies.len() < 2 {
        match tokio::time::timeout(PATIENCE, client.next()).await.unwrap() {
            Some(Ok(Message::Text(text))) => {
                replies.push(serde_json::from_str::<Value>(text.as_str()).unwrap())
            }
            Some(Ok(_)) => {}
            other => panic!("connection ended: {other:?}"),
        }
    }
    assert_eq!(replies[0]["error"]["code"], "forbidden");
    assert!(replies[1].get("result").is_some(), "{}", replies[1]);
}

#[tokio::test]
async fn cached_grants_do_not_call_the_app_and_refusals_are_not_cached() {
    let app = App::start().await;
    let gate = start(&format!("http://{}", app.addr), "    cache_ttl: 1m\n").await;
    let url = poll_url(&gate);
    for _ in 0..5 {
        let (status, _) = get_with_cookie(&url, Some("session=alice")).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(app.requests(), 1, "one auth request, then the cache");
    for _ in 0..3 {
        let (status, _) = get_with_cookie(&url, Some("session=crash")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
    for _ in 0..3 {
        let (status, _) = get_with_cookie(&url, Some("session=nobody")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        app.requests(),
        7,
        "failures and refusals ask the app every time"
    );
    // /metrics counts each outcome, and the latency histogram holds every
    // request the app saw, each in one bucket at most as wide as +Inf.
    let (_, text) = common::get(&format!("http://{}/metrics", gate.api_addr)).await;
    let sample = |name: &str| -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    for (outcome, want) in [
        ("allowed", 1.0),
        ("cached", 4.0),
        ("unavailable", 3.0),
        ("unauthenticated", 3.0),
    ] {
        let name = format!("pushgate_auth_total{{outcome=\"{outcome}\"}}");
        assert_eq!(sample(&name), want, "{name}");
    }
    assert_eq!(sample("pushgate_auth_request_seconds_count"), 7.0);
    assert_eq!(
        sample("pushgate_auth_request_seconds_bucket{le=\"+Inf\"}"),
        7.0
    );
    let buckets: Vec<f64> = text
        .lines()
        .filter(|line| line.starts_with("pushgate_auth_request_seconds_bucket"))
        .map(|line| line.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(buckets.len() > 10, "{text}");
    assert!(
        buckets.windows(2).all(|pair| pair[0] <= pair[1]),
        "buckets are cumulative: {buckets:?}"
    );
    assert!(sample("pushgate_auth_request_seconds_sum") > 0.0);

    // With the cache off every connection asks.
    let app = App::start().await;
    let gate = start(&format!("http://{}", app.addr), "    cache_ttl: 0s\n").await;
    let url = poll_url(&gate);
    for _ in 0..3 {
        get_with_cookie(&url, Some("session=alice")).await;
    }
    assert_eq!(app.requests(), 3);
}

/// A plain HTTP/1.1 client whose connections come from `ip` (any address
/// of 127.0.0.0/8 is this machine's loopback).
fn client_from(
    ip: &str,
) -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    BoxBody<Bytes, std::io::Error>,
> {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_local_address(Some(ip.parse().unwrap()));
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector)
}

/// GETs `url` from the address `ip` with `cookie`; the status and the
/// body's error message, if any.
async fn get_from(ip: &str, url: &str, cookie: &str) -> (StatusCode, String) {
    let request = Request::get(url)
        .header("cookie", cookie)
        .body(common::empty_body())
        .unwrap();
    let response = tokio::time::timeout(PATIENCE, client_from(ip).request(request))
        .await
        .expect("answered in time")
        .unwrap();
    let status = response.status();
    let mut body = response.into_body();
    if status == StatusCode::OK {
        // An SSE stream does not end; its head is the answer.
        return (status, String::new());
    }
    let mut bytes = Vec::new();
    while let Some(frame) = tokio::time::timeout(PATIENCE, body.frame()).await.unwrap() {
        if let Ok(data) = frame.unwrap().into_data() {
            bytes.extend_from_slice(&data);
        }
    }
    let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (
        status,
        answer["error"]["message"].as_str().unwrap_or("").to_owned(),
    )
}

/// The invariant of the grant cache, end to end: a grant is served from the
/// cache only to a connect whose auth request the app would see exactly as
/// it saw the one it answered. The same cookie from another client address
/// is another request (X-Forwarded-For), and so are other channels.
#[tokio::test]
async fn a_cached_grant_is_never_served_to_another_client_address() {
    let app = App::start().await;
    let gate = start(&format!("http://{}", app.addr), "    cache_ttl: 1m\n").await;
    let cookie = "session=by-address";
    for transport in ["poll", "sse"] {
        let url = format!(
            "http://{}/realtime/{transport}?channel=addr:2{}",
            gate.addr,
            if transport == "poll" {
                "&timeout=0"
            } else {
                ""
            }
        );
        let before = app.requests();
        let (status, why) = get_from("127.0.0.2", &url, cookie).await;
        assert_eq!(status, StatusCode::OK, "{transport} from .2: {why}");
        assert_eq!(app.requests(), before + 1);
        // The app refuses .3; the grant it gave .2 must not stand in.
        for _ in 0..2 {
            let (status, why) = get_from("127.0.0.3", &url, cookie).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{transport} from .3");
            assert_eq!(why, "not from this address");
        }
        assert_eq!(app.requests(), before + 3, "refusals are asked every time");
        // .4 is granted other channels: .2's grant does not stand in either.
        let (status, why) = get_from("127.0.0.4", &url, cookie).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{transport} from .4: {why}");
        assert_eq!(why, "not allowed to hear `addr:2`");
        assert_eq!(app.requests(), before + 4);
        // .2 again, the same request: from the cache.
        let (status, _) = get_from("127.0.0.2", &url, cookie).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(app.requests(), before + 4, "the same request is cached");
    }

    // The same client asking for other channels is another request too.
    let before = app.requests();
    let url = format!(
        "http://{}/realtime/poll?channel=addr:2&channel=addr:2x&timeout=0",
        gate.addr
    );
    let (status, _) = get_from("127.0.0.2", &url, cookie).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(app.requests(), before + 1);

    // A long-poll's moving cursor is not sent to the app, so it does not
    // defeat the cache.
    let before = app.requests();
    let (status, _) = get_from(
        "127.0.0.2",
        &format!(
            "http://{}/realtime/poll?channel=addr:2&timeout=0&since=1.340ca71c",
            gate.addr
        ),
        cookie,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        app.requests(),
        before,
        "the poll's grant came from the cache"
    );
    let (_, body) = app.last_request.lock().unwrap().clone().unwrap();
    assert!(!body["query"].as_str().unwrap().contains("since"), "{body}");
}

#[tokio::test]
async fn an_answer_with_cache_control_no_store_is_not_cached() {
    let app = App::start().await;
    let gate = start(&format!("http://{}", app.addr), "    cache_ttl: 1m\n").await;
    let url = poll_url(&gate);
    for _ in 0..3 {
        let (status, _) = get_with_cookie(&url, Some("session=no-store")).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(app.requests(), 3, "each connect asked the app");
}

/// Auth requests go over kept-alive connections, the same the proxy uses:
/// one connect after another does not open a connection to the app each,
/// and a proxied page after them needs none of its own.
#[tokio::test]
async fn auth_requests_share_kept_alive_connections_with_the_proxy() {
    let app = App::start().await;
    let gate = start(&format!("http://{}", app.addr), "    cache_ttl: 0s\n").await;
    let url = poll_url(&gate);
    for user in [
        "session=alice",
        "session=nobody",
        "session=alice",
        "session=banned",
    ] {
        get_with_cookie(&url, Some(user)).await;
    }
    assert_eq!(app.requests(), 4);
    let opened = app.connections.load(Ordering::SeqCst);
    assert_eq!(
        opened, 1,
        "{opened} connections to the app for 4 auth requests"
    );
    // A page of the app, proxied, takes the same kept-alive connection.
    let (status, _) = get_with_cookie(&format!("http://{}/page", gate.addr), None).await;
    assert_eq!(status, StatusCode::OK);
    let opened = app.connections.load(Ordering::SeqCst);
    assert_eq!(opened, 1, "the proxy opened its own connection to the app");
}

#[tokio::test]
async fn an_authorized_subscriber_receives_publications() {
    let app = App::start().await;
    let gate = start(&format!("http://{}", app.addr), "").await;
    let poll = format!(
        "http://{}/realtime/poll?channel=user:alice:inbox&timeout=5",
        gate.addr
    );
    let waiting = tokio::spawn(async move {
        let response = common::client()
            .request(
                Request::get(poll)
                    .header("cookie", "session=alice")
                    .body(common::empty_body())
                    .unwrap(),
            )
            .await
            .unwrap();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice::<Value>(&bytes).unwrap()
    });
    // Publish until the waiting poll has subscribed and answers.
    let api = gate.api_addr;
    let deadline = Instant::now() + PATIENCE;
    while !waiting.is_finished() {
        assert!(Instant::now() < deadline);
        let request = Request::post(format!("http://{api}/api/publish"))
            .header("authorization", format!("Bearer {API_KEY}"))
            .header("content-type", "application/json")
            .body(common::body(
                json!({"channel": "user:alice:inbox", "data": "hi"}).to_string(),
            ))
            .unwrap();
        common::client().request(request).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answer = waiting.await.unwrap();
    assert_eq!(answer["messages"][0]["data"], "hi");
}

async fn alice_websocket(gate: &Pushgate, query: &str) -> common_ws::Client {
    let mut request = format!("ws://{}/realtime/ws{query}", gate.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("cookie", "session=alice".parse().unwrap());
    let (client, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    client
}

mod common_ws {
    pub type Client = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;
}

async fn api_post(gate: &Pushgate, path: &str, body: Value) -> (StatusCode, Value) {
    let request = Request::post(format!("http://{}{path}", gate.api_addr))
        .header("authorization", format!("Bearer {API_KEY}"))
        .header("content-type", "application/json")
        .body(common::body(body.to_string()))
        .unwrap();
    let response = common::client().request(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// The next text frame as JSON, skipping pings.
async fn next_text(client: &mut common_ws::Client) -> Option<Value> {
    loop {
        match tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Text(text))) => return serde_json::from_str(text.as_str()).ok(),
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
            Some(Ok(_)) => {}
        }
    }
}

/// Waits until the API says the user has `count` live sessions (via a
/// disconnect-free probe: unsubscribing from a channel nobody hears).
async fn sessions_become(gate: &Pushgate, count: u64) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, answer) = api_post(
            gate,
            "/api/unsubscribe",
            json!({"user": "alice", "channel": "probe:none"}),
        )
        .await;
        if answer["unsubscribed"] == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "alice never had {count} sessions"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_per_user_limit_refuses_one_connection_too_many() {
    let app = App::start().await;
    let gate = start(
        &format!("http://{}", app.addr),
        "limits:\n  connections_per_user: 2\n",
    )
    .await;
    let _one = alice_websocket(&gate, "").await;
    let _two = alice_websocket(&gate, "").await;
    sessions_become(&gate, 2).await;
    assert_eq!(
        websocket_outcome(&gate, "", "session=alice")
            .await
            .map(|c| c.0),
        Some(4029)
    );
    let (status, body) = get_with_cookie(&poll_url(&gate), Some("session=alice")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["error"]["code"], "too_many_connections");
    drop(_one);
    sessions_become(&gate, 1).await;
    assert_eq!(websocket_outcome(&gate, "", "session=alice").await, None);
}

#[tokio::test]
async fn the_api_disconnects_a_user_everywhere_and_forgets_their_grants() {
    let app = App::start().await;
    let gate = start(&format!("http://{}", app.addr), "    cache_ttl: 1m\n").await;
    let mut ws = alice_websocket(&gate, "?channel=chat:1").await;
    let sse_url = format!("http://{}/realtime/sse?channel=chat:1", gate.addr);
    let sse = common::client()
        .request(
            Request::get(&sse_url)
                .header("cookie", "session=alice")
                .body(common::empty_body())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(sse.status(), StatusCode::OK);
    sessions_become(&gate, 2).await;
    let asked = app.requests();

    let (status, answer) = api_post(
        &gate,
        "/api/disconnect",
        json!({"user": "alice", "reason": "logged out"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer, json!({"disconnected": 2}));

    // WebSocket: close 4000 with the reason.
    let code = loop {
        match tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Close(frame))) => {
                break frame.map(|f| (u16::from(f.code), f.reason.to_string()))
            }
            Some(Ok(_)) => {}
            _ => break None,
        }
    };
    assert_eq!(code, Some((4000, "logged out".into())));
    // SSE: a pushgate.disconnect event, then the end of the stream.
    let text = tokio::time::timeout(PATIENCE, sse.into_body().collect())
        .await
        .expect("the stream ends")
        .unwrap()
        .to_bytes();
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains(
            "event: pushgate.disconnect\ndata: {\"code\":4000,\"reason\":\"logged out\"}"
        ),
        "{text}"
    );

    // The cached grant is gone: the next connection asks the app.
    get_with_cookie(&poll_url(&gate), Some("session=alice")).await;
    assert_eq!(app.requests(), asked + 1);

    for (body, code) in [
        (json!({"user": "alice", "code": 1000}), "bad_code"),
        (json!({"user": ""}), "bad_user"),
        (
            json!({"user": "alice", "reason": "r".repeat(200)}),
            "bad_reason",
        ),
        (json!({"who": "alice"}), "bad_json"),
    ] {
        let (status, answer) = api_post(&gate, "/api/disconnect", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(answer["error"]["code"], code);
    }
}

#[tokio::test]
async fn the_api_unsubscribes_a_user_from_a_channel() {
    let app = App::start().await;
    let gate = start(&format!("http://{}", app.addr), "").await;
    let mut ws = alice_websocket(&gate, "?channel=chat:1&channel=user:alice:inbox").await;
    sessions_become(&gate, 1).await;
    let (status, answer) = api_post(
        &gate,
        "/api/unsubscribe",
        json!({"user": "alice", "channel": "chat:1"}),
    )
    .await;
    assert_eq!(
        (status, answer),
        (StatusCode::OK, json!({"unsubscribed": 1}))
    );
    assert_eq!(
        next_text(&mut ws).await,
        Some(json!({"op": "unsubscribed", "channel": "chat:1"}))
    );
    // Publications on the removed channel no longer arrive; the other
    // channel still works.
    for channel in ["chat:1", "user:alice:inbox"] {
        let (status, _) = api_post(
            &gate,
            "/api/publish",
            json!({"channel": channel, "data": channel}),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    let envelope = next_text(&mut ws).await.unwrap();
    assert_eq!(envelope["channel"], "user:alice:inbox");
    let (status, answer) = api_post(
        &gate,
        "/api/unsubscribe",
        json!({"user": "alice", "channel": "bad channel"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["error"]["code"], "bad_channel");
}

async fn websocket_as(gate: &Pushgate, query: &str, cookie: &str) -> common_ws::Client {
    let mut request = format!("ws://{}/realtime/ws{query}", gate.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("cookie", cookie.parse().unwrap());
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

/// Reads until the server closes; the close code and reason.
async fn closed_with(client: &mut common_ws::Client) -> Option<(u16, String)> {
    loop {
        match tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Close(frame))) => {
                return frame.map(|f| (u16::from(f.code), f.reason.to_string()))
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return None,
        }
    }
}

#[tokio::test]
async fn an_expired_grant_without_a_refresh_endpoint_closes_with_4001() {
    let app = App::start().await;
    let gate = start(&format!("http://{}", app.addr), "").await;
    let mut client = websocket_as(&gate, "?channel=chat:1", "session=brief").await;
    let started = Instant::now();
    let (code, _) = closed_with(&mut client).await.unwrap();
    assert_eq!(code, 4001);
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "not before expires_in"
    );
}

#[tokio::test]
async fn a_refused_refresh_closes_with_4001_and_the_apps_reason() {
    let app = App::start().await;
    let gate = start(
        &format!("http://{}", app.addr),
        "    refresh_path: /realtime/refresh\n",
    )
    .await;
    let mut client = websocket_as(&gate, "?channel=chat:1", "session=brief").await;
    assert_eq!(
        closed_with(&mut client).await,
        Some((4001, "session ended".into()))
    );
}

#[tokio::test]
async fn a_refresh_extends_the_connection_and_may_narrow_its_channels() {
    let app = App::start().await;
    let gate = start(
        &format!("http://{}", app.addr),
        "    refresh_path: /realtime/refresh\n",
    )
    .await;
    let mut client = websocket_as(&gate, "?channel=chat:1&channel=news", "session=renewable").await;
    // The renewed grant no longer lists `news`: the client is told.
    assert_eq!(
        next_text(&mut client).await,
        Some(json!({"op": "unsubscribed", "channel": "news"}))
    );
    // It goes on past several expiries, each renewed.
    let first = app.requests();
    let deadline = Instant::now() + PATIENCE;
    while app.requests() < first + 2 {
        assert!(Instant::now() < deadline, "refreshes keep coming");
        client
            .send(Message::text(json!({"id": 1, "op": "ping"}).to_string()))
            .await
            .unwrap();
        let reply = next_text(&mut client).await.expect("still open");
        assert_eq!(reply["id"], 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = api_post(
        &gate,
        "/api/publish",
        json!({"channel": "chat:1", "data": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let envelope = next_text(&mut client).await.unwrap();
    assert_eq!(envelope["channel"], "chat:1");
}

#[tokio::test]
async fn the_app_may_allow_a_channel_outside_the_grant() {
    let app = App::start().await;
    let gate = start(
        &format!("http://{}", app.addr),
        "    subscribe_path: /realtime/subscribe\n",
    )
    .await;
    let mut client = alice_websocket(&gate, "").await;
    for (id, channel) in [(1, "extra:ok"), (2, "extra:no")] {
        client
            .send(Message::text(
                json!({"id": id, "op": "subscribe", "channel": channel}).to_string(),
            ))
            .await
            .unwrap();
    }
    let allowed = next_text(&mut client).await.unwrap();
    assert!(allowed.get("result").is_some(), "{allowed}");
    let refused = next_text(&mut client).await.unwrap();
    assert_eq!(refused["error"]["code"], "forbidden");
    assert_eq!(refused["error"]["message"], "not yours");
}
