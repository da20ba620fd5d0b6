//! Live reload on `SIGHUP`, against the real binary: an API key and a JWT
//! secret rotated under 1,000 open connections, none dropped; a broken file
//! refused whole, the running config kept; what cannot change live named.

use crate::common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{Process, TempDir, API_KEY, PATIENCE};
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const OLD_KEY: &str = "old-api-key-0123456789";
const NEW_KEY: &str = "new-api-key-9876543210";
const OLD_SECRET: &str = "the-old-hs256-secret-of-32-bytes-or-more";
const NEW_SECRET: &str = "the-new-hs256-secret-of-32-bytes-or-more";
const CONNECTIONS: usize = 1_000;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn config(key: &str, secret: &str, history: usize) -> String {
    format!(
        "listen: 127.0.0.1:0
upstream: {{url: 'http://127.0.0.1:9'}}
api: {{listen: '127.0.0.1:0', keys: ['{key}']}}
auth: {{mode: jwt, jwt: {{algorithm: HS256, secret: '{secret}'}}}}
realtime: {{max_connections_per_ip: 5000, connects_per_second: 100000, connect_burst: 100000}}
history: {{size: {history}}}
limits: {{connections_per_user: 0}}
"
    )
}

fn token(secret: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "ann", "exp": exp, "channels": ["news"]}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

async fn connect(gate: &Process, secret: &str) -> Socket {
    let url = format!(
        "ws://{}/realtime/ws?channel=news&token={}",
        gate.addr,
        token(secret)
    );
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

/// The next text frame as JSON; `Err` with the close code when the
/// connection closed instead.
async fn next(socket: &mut Socket) -> Result<Value, Option<u16>> {
    loop {
        let message = tokio::time::timeout(PATIENCE, socket.next())
            .await
            .expect("a frame in time");
        match message {
            Some(Ok(Message::Text(text))) => {
                return Ok(serde_json::from_str(text.as_str()).unwrap())
            }
            Some(Ok(Message::Close(frame))) => return Err(frame.map(|f| f.code.into())),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Err(None),
        }
    }
}

async fn publish(gate: &Process, key: &str, data: u64) -> StatusCode {
    let request = http::Request::post(format!("http://{}/api/publish", gate.api_addr))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(common::body(
            json!({"channel": "news", "data": data}).to_string(),
        ))
        .unwrap();
    common::client().request(request).await.unwrap().status()
}

/// Every socket's next message is the publication `data`.
async fn all_hear(sockets: &mut [Socket], data: u64) {
    let heard = futures_util::future::join_all(sockets.iter_mut().map(next)).await;
    for (index, got) in heard.into_iter().enumerate() {
        let got = got.unwrap_or_else(|code| panic!("connection {index} closed ({code:?})"));
        assert_eq!(got["data"], data, "connection {index}: {got}");
    }
}

/// Waits until the node counts `n` WebSocket subscriptions: a connection's
/// channels from its query are subscribed after the handshake's answer, so
/// a publish right after connecting could pass some by.
async fn wait_subscribed(gate: &Process, n: usize) {
    let want = format!("pushgate_subscriptions{{transport=\"websocket\"}} {n}");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, metrics) = common::get(&format!("http://{}/metrics", gate.api_addr)).await;
        if metrics.lines().any(|line| line == want) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "never {want}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn wait_log(gate: &Process, needle: &str) -> Value {
    let line = tokio::task::block_in_place(|| gate.wait_log(needle, PATIENCE))
        .unwrap_or_else(|| panic!("no log line with {needle:?}"));
    serde_json::from_str(&line).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_keys_under_open_connections_and_refuses_a_broken_file() {
    let scratch = TempDir::new("reload");
    let gate = Process::start_plain(&scratch.0, &config(OLD_KEY, OLD_SECRET, 100), &[]);
    let file = scratch.0.join("pushgate.yaml");

    let mut sockets = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS / 100 {
        let batch = (0..100).map(|_| connect(&gate, OLD_SECRET));
        sockets.extend(futures_util::future::join_all(batch).await);
    }
    wait_subscribed(&gate, CONNECTIONS).await;
    assert_eq!(publish(&gate, OLD_KEY, 1).await, StatusCode::OK);
    all_hear(&mut sockets, 1).await;

    // Rotate the API key and the JWT secret (and change what only a
    // restart takes).
    std::fs::write(&file, config(NEW_KEY, NEW_SECRET, 200)).unwrap();
    gate.signal("HUP");
    let reloaded = wait_log(&gate, "config reloaded");
    assert_eq!(reloaded["restart_needed"], "[\"history\"]", "{reloaded}");
    assert_eq!(publish(&gate, OLD_KEY, 2).await, StatusCode::UNAUTHORIZED);
    assert_eq!(publish(&gate, NEW_KEY, 3).await, StatusCode::OK);
    // None of the open connections was dropped: each hears it.
    all_hear(&mut sockets, 3).await;
    // New connections need the new secret.
    let mut stale = connect(&gate, OLD_SECRET).await;
    assert_eq!(next(&mut stale).await.unwrap_err(), Some(4001));
    let mut fresh = connect(&gate, NEW_SECRET).await;
    wait_subscribed(&gate, CONNECTIONS + 1).await;

    // A broken file is refused whole: the running config stays.
    std::fs::write(
        &file,
        "api: {keys: ['short']}\nauth: {mode: jwt}\nnot_a_key: 1\n",
    )
    .unwrap();
    gate.signal("HUP");
    let refused = wait_log(&gate, "config reload refused");
    assert!(refused["key"].is_string(), "{refused}");
    assert_eq!(publish(&gate, NEW_KEY, 4).await, StatusCode::OK);
    all_hear(&mut sockets, 4).await;
    assert_eq!(next(&mut fresh).await.unwrap()["data"], 4);
    for socket in &mut sockets {
        socket.close(None).await.unwrap();
    }
}

/// What else a reload changes live, in-process: allowed origins, channel
/// rules and a realtime limit.
#[tokio::test]
async fn a_reload_changes_origins_rules_and_limits_live() {
    let yaml = |extra: &str| {
        format!(
            "listen: 127.0.0.1:0\nupstream: {{url: 'http://127.0.0.1:9'}}\napi: {{listen: '127.0.0.1:0', keys: ['{API_KEY}']}}\nauth: {{mode: none}}\n{extra}"
        )
    };
    let load = |text: &str| {
        pushgate::config::from_yaml(text, "test.yaml", Vec::<(String, String)>::new()).unwrap()
    };
    let server = pushgate::Server::bind(load(&yaml(""))).await.unwrap();
    let (addr, api) = (server.local_addr(), server.api_addr());
    let reloader = server.reloader();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    let handshake = |origin: String| async move {
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                format!("ws://{addr}/realtime/ws?channel=a&channel=b"),
            )
            .unwrap();
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(request).await
    };
    let presence = || async move {
        let (status, _) = common::api_call(api, "GET", "/api/presence?channel=room:1", None).await;
        status
    };
    let elsewhere = || "https://elsewhere.example".to_owned();
    assert!(handshake(elsewhere()).await.is_err());
    assert_eq!(presence().await, StatusCode::BAD_REQUEST);
    let mut open = handshake(format!("http://{addr}")).await.unwrap().0;

    let waiting = reloader.apply(&load(&yaml(
        "realtime: {allowed_origins: ['https://elsewhere.example'], max_channels: 1}\nchannels: [{prefix: 'room:', presence: true}]\n",
    )));
    assert!(waiting.is_empty(), "{waiting:?}");
    let (mut socket, _) = handshake(elsewhere()).await.unwrap();
    // Two channels in the query are now over realtime.max_channels.
    assert_eq!(next(&mut socket).await.unwrap_err(), Some(1008));
    assert_eq!(presence().await, StatusCode::OK);
    // The connection opened before is still served.
    open.send(Message::text(json!({"id": 1, "op": "ping"}).to_string()))
        .await
        .unwrap();
    assert_eq!(next(&mut open).await.unwrap()["id"], 1);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
