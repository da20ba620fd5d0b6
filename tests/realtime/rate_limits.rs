//! Rate limits, each triggered over real sockets and seen to recover:
//! connects per client address (WebSocket and SSE; long-poll requests are
//! not connections),
//! publishes per API key, and publishes per WebSocket connection. Each
//! refusal is counted in `/metrics`.

use crate::common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Pushgate, Upstream, API_KEY};
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

const PATIENCE: Duration = Duration::from_secs(10);

/// A GET from the client address `ip`: status, `Retry-After`, body.
async fn get_from(ip: &str, url: &str) -> (StatusCode, Option<u64>, Value) {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_local_address(Some(ip.parse().unwrap()));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::Empty<bytes::Bytes>>(connector);
    let request = Request::get(url)
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = tokio::time::timeout(PATIENCE, client.request(request))
        .await
        .expect("answered in time")
        .unwrap();
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        retry_after,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

/// A WebSocket from the client address `ip`; the close code when the
/// server closes it at once, `None` when it stays open.
async fn websocket_from(ip: &str, addr: SocketAddr) -> Option<u16> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/realtime/ws"), stream)
        .await
        .expect("the upgrade is accepted, even when refused");
    ws.send(Message::text(json!({"id": 1, "op": "ping"}).to_string()))
        .await
        .ok();
    loop {
        match tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
            Some(Ok(Message::Text(text))) => {
                let reply: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(reply["result"], json!({}), "{reply}");
                return None;
            }
            Some(Ok(_)) => continue,
            other => panic!("the connection ended without a close: {other:?}"),
        }
    }
}

/// `pushgate_rate_limited_total{limit="<limit>"}`.
async fn refused(gate: &Pushgate, limit: &str) -> u64 {
    let (_, text) = common::get(&format!("http://{}/metrics", gate.api_addr)).await;
    let line = format!("pushgate_rate_limited_total{{limit=\"{limit}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line)?.parse().ok())
        .unwrap_or_else(|| panic!("no {line} in {text}"))
}

/// The next text frame of `ws`, as JSON.
async fn next_json(ws: &mut common::WsClient) -> Value {
    loop {
        let frame = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("in time")
            .expect("still open")
            .unwrap();
        if let Message::Text(text) = frame {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

/// Retries `attempt` until it succeeds, within `PATIENCE`.
async fn recovers<F, Fut>(what: &str, mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !attempt().await {
        assert!(Instant::now() < deadline, "{what} never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn connects_per_address_are_limited_on_websocket_and_sse_and_recover() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(
        &app.url(),
        "realtime:\n  connects_per_second: 1\n  connect_burst: 3\n",
    )
    .await;
    for _ in 0..3 {
        assert_eq!(websocket_from("127.0.0.2", gate.addr).await, None);
    }
    assert_eq!(websocket_from("127.0.0.2", gate.addr).await, Some(4029));
    let sse = format!("http://{}/realtime/sse?channel=rl", gate.addr);
    let (status, retry_after, body) = get_from("127.0.0.2", &sse).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited");
    assert!(
        retry_after.is_some_and(|s| (1..=2).contains(&s)),
        "{retry_after:?}"
    );
    // A long-poll request is not a new connection: a client polls again
    // after every answer.
    let poll = format!("http://{}/realtime/poll?channel=rl&timeout=0", gate.addr);
    for _ in 0..10 {
        assert_eq!(get_from("127.0.0.2", &poll).await.0, StatusCode::OK);
    }
    // Another address has its own.
    assert_eq!(get_from("127.0.0.3", &poll).await.0, StatusCode::OK);
    assert_eq!(websocket_from("127.0.0.3", gate.addr).await, None);
    assert_eq!(refused(&gate, "connects").await, 2);
    // One connect a second comes back.
    recovers("connecting from 127.0.0.2", || async {
        websocket_from("127.0.0.2", gate.addr).await.is_none()
    })
    .await;
}

#[tokio::test]
async fn publishes_per_api_key_are_limited_and_recover() {
    let app = Upstream::start().await;
    let other_key = "a-second-key-for-rate-limits-0123456789";
    let gate = Pushgate::start(
        &app.url(),
        &format!(
            "api:\n  keys: [\"{API_KEY}\", \"{other_key}\"]\n  publishes_per_second: 1\n  publish_burst: 2\n"
        ),
    )
    .await;
    let publish = |key: &'static str| {
        let url = format!("http://{}/api/publish", gate.api_addr);
        async move {
            let request = Request::post(url)
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(common::body(
                    json!({"channel": "rl", "data": 1}).to_string(),
                ))
                .unwrap();
            let response = common::client().request(request).await.unwrap();
            let status = response.status();
            let retry_after = response.headers().get("retry-after").cloned();
            (status, retry_after)
        }
    };
    assert_eq!(publish(API_KEY).await.0, StatusCode::OK);
    assert_eq!(publish(API_KEY).await.0, StatusCode::OK);
    let (status, retry_after) = publish(API_KEY).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(retry_after.is_some());
    assert_eq!(
        publish(other_key).await.0,
        StatusCode::OK,
        "each key has its own"
    );
    assert_eq!(refused(&gate, "api_publishes").await, 1);
    // The rest of the API is not publishing.
    let (status, _) = common::api_call(gate.api_addr, "GET", "/api/channels", None).await;
    assert_eq!(status, StatusCode::OK);
    recovers("publishing with the first key", || async {
        publish(API_KEY).await.0 == StatusCode::OK
    })
    .await;
}

#[tokio::test]
async fn publishes_per_connection_are_limited_and_the_connection_goes_on() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(
        &app.url(),
        "realtime:\n  publishes_per_second: 1\n  publish_burst: 2\nchannels:\n  - prefix: \"chat:\"\n    publish: direct\n",
    )
    .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/realtime/ws", gate.addr))
        .await
        .unwrap();
    let mut id = 0;
    let mut publish = || {
        id += 1;
        json!({"id": id, "op": "publish", "channel": "chat:1", "data": {"n": id}})
    };
    let mut replies = Vec::new();
    for _ in 0..3 {
        ws.send(Message::text(publish().to_string())).await.unwrap();
    }
    while replies.len() < 3 {
        replies.push(next_json(&mut ws).await);
    }
    replies.sort_by_key(|r| r["id"].as_u64());
    assert!(replies[0]["result"]["offset"].is_u64(), "{replies:?}");
    assert!(replies[1]["result"]["offset"].is_u64(), "{replies:?}");
    assert_eq!(replies[2]["error"]["code"], "rate_limited", "{replies:?}");
    assert_eq!(refused(&gate, "client_publishes").await, 1);
    // The connection goes on, and so do its publishes, a second later.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let command = publish();
        ws.send(Message::text(command.to_string())).await.unwrap();
        let reply = next_json(&mut ws).await;
        assert_eq!(reply["id"], command["id"]);
        if reply["result"]["offset"].is_u64() {
            break;
        }
        assert_eq!(reply["error"]["code"], "rate_limited", "{reply}");
        assert!(Instant::now() < deadline, "publishing never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn commands_over_the_rate_are_answered_with_an_error_and_then_served_again() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(
        &app.url(),
        "realtime:\n  commands_per_second: 1\n  command_burst: 3\n",
    )
    .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/realtime/ws", gate.addr))
        .await
        .unwrap();
    let ping = |id: u64| json!({"id": id, "op": "ping"}).to_string();
    let mut answers = Vec::new();
    for id in 1..=4 {
        ws.send(Message::text(ping(id))).await.unwrap();
    }
    while answers.len() < 4 {
        answers.push(next_json(&mut ws).await);
    }
    let limited: Vec<&Value> = answers
        .iter()
        .filter(|a| a["error"]["code"] == "rate_limited")
        .collect();
    assert_eq!(
        limited.len(),
        1,
        "the burst passes, then one is refused: {answers:?}"
    );
    assert_eq!(limited[0]["id"], 4);
    assert_eq!(refused(&gate, "commands").await, 1);
    // One refusal is not a flood: the connection stays, and once the rate
    // has put a command back (1 a second) it is served again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ws.send(Message::text(ping(10))).await.unwrap();
    assert_eq!(next_json(&mut ws).await, json!({"id": 10, "result": {}}));
}
