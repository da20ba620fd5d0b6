//! The Pusher Channels protocol over real sockets: protocol 7 on
//! `/app/{key}`, the signed HTTP API at `/apps/{id}/…`, and every refusal.
//! (The real Pusher libraries are driven against the binary in
//! tests/clients/pusher.rs.)

use crate::common;

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{body, client, empty_body, Pushgate, PATIENCE};
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use pushgate::pusher::sign;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const ID: &str = "1001";
const KEY: &str = "app-key";
const SECRET: &str = "app-secret-0123456789";
/// A second app that allows no client events.
const QUIET_ID: &str = "2002";
const QUIET_KEY: &str = "quiet-key";

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn start() -> Pushgate {
    Pushgate::start(
        "http://127.0.0.1:9",
        &format!(
            "pusher:\n  apps:\n    - {{id: \"{ID}\", key: {KEY}, secret: {SECRET}, client_events: true}}\n    - {{id: \"{QUIET_ID}\", key: {QUIET_KEY}, secret: {SECRET}}}\n"
        ),
    )
    .await
}

/// A Pusher client: the socket and its `socket_id`.
struct Client {
    socket: Socket,
    socket_id: String,
}

impl Client {
    async fn connect(addr: SocketAddr, key: &str) -> Client {
        let mut socket = open(
            addr,
            &format!("/app/{key}?protocol=7&client=js&version=8.4.0"),
        )
        .await;
        let established = next(&mut socket).await;
        assert_eq!(established["event"], "pusher:connection_established");
        let data: Value = serde_json::from_str(established["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["activity_timeout"], 120);
        let socket_id = data["socket_id"].as_str().unwrap().to_owned();
        assert!(sign::valid_socket_id(&socket_id), "{socket_id}");
        Client { socket, socket_id }
    }

    async fn send(&mut self, event: Value) {
        self.socket
            .send(Message::text(event.to_string()))
            .await
            .unwrap();
    }

    /// The next frame, as JSON.
    async fn next(&mut self) -> Value {
        next(&mut self.socket).await
    }

    /// Subscribes; the answer (`subscription_succeeded` or `_error`).
    async fn subscribe(
        &mut self,
        channel: &str,
        auth: Option<&str>,
        channel_data: Option<&str>,
    ) -> Value {
        let mut data = json!({ "channel": channel });
        if let Some(auth) = auth {
            data["auth"] = auth.into();
        }
        if let Some(channel_data) = channel_data {
            data["channel_data"] = channel_data.into();
        }
        self.send(json!({"event": "pusher:subscribe", "data": data}))
            .await;
        self.next().await
    }

    /// Subscribes with the app's signature, as an auth endpoint makes it.
    async fn subscribe_signed(&mut self, channel: &str, channel_data: Option<&str>) -> Value {
        let auth = sign::channel_auth(KEY, SECRET, &self.socket_id, channel, channel_data);
        let answer = self.subscribe(channel, Some(&auth), channel_data).await;
        assert_eq!(
            answer["event"], "pusher_internal:subscription_succeeded",
            "{answer}"
        );
        answer
    }

    /// Nothing but `pusher:pong` arrives before the answer to a ping: what
    /// was sent to this client before, it has had.
    async fn quiet(&mut self) {
        self.send(json!({"event": "pusher:ping", "data": {}})).await;
        let pong = self.next().await;
        assert_eq!(
            pong["event"], "pusher:pong",
            "expected nothing before the pong: {pong}"
        );
    }
}

async fn open(addr: SocketAddr, path: &str) -> Socket {
    tokio::time::timeout(
        PATIENCE,
        tokio_tungstenite::connect_async(format!("ws://{addr}{path}")),
    )
    .await
    .expect("handshake in time")
    .expect("handshake accepted")
    .0
}

async fn next(socket: &mut Socket) -> Value {
    loop {
        let message = tokio::time::timeout(PATIENCE, socket.next())
            .await
            .expect("a frame in time")
            .expect("the connection is open")
            .expect("a valid frame");
        match message {
            Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

async fn close_code(socket: &mut Socket) -> Option<u16> {
    loop {
        match tokio::time::timeout(PATIENCE, socket.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code.into()),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Calls the HTTP API signed as the SDKs sign: the status and the body.
async fn call(
    api: SocketAddr,
    method: &str,
    path: &str,
    params: &[(&str, &str)],
    payload: Option<Value>,
) -> (StatusCode, String) {
    let payload = payload.map(|p| p.to_string()).unwrap_or_default();
    let query = sign::sign_request(method, path, params, payload.as_bytes(), KEY, SECRET, now());
    raw_call(api, method, &format!("{path}?{query}"), payload).await
}

async fn raw_call(
    api: SocketAddr,
    method: &str,
    target: &str,
    payload: String,
) -> (StatusCode, String) {
    let request = Request::builder()
        .method(method)
        .uri(format!("http://{api}{target}"))
        .header("content-type", "application/json")
        .body(if payload.is_empty() {
            empty_body()
        } else {
            body(payload)
        })
        .unwrap();
    let response = client().request(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

async fn trigger(api: SocketAddr, event: Value) {
    let (status, answer) = call(api, "POST", &format!("/apps/{ID}/events"), &[], Some(event)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

#[tokio::test]
async fn events_from_the_http_api_reach_subscribers_except_the_socket_named() {
    let pushgate = start().await;
    let mut a = Client::connect(pushgate.addr, KEY).await;
    let mut b = Client::connect(pushgate.addr, KEY).await;
    assert_ne!(a.socket_id, b.socket_id);
    for client in [&mut a, &mut b] {
        let answer = client.subscribe("news,today;1", None, None).await;
        assert_eq!(answer["event"], "pusher_internal:subscription_succeeded");
        assert_eq!(answer["channel"], "news,today;1");
    }
    trigger(pushgate.api_addr, json!({"name": "App\\Events\\Posted", "channels": ["news,today;1", "other"], "data": "{\"id\":1}"})).await;
    for client in [&mut a, &mut b] {
        let got = client.next().await;
        assert_eq!(
            got,
            json!({"event": "App\\Events\\Posted", "channel": "news,today;1", "data": "{\"id\":1}"})
        );
    }
    // Not to `a`: only `b` hears it, and then both hear the next.
    let except = a.socket_id.clone();
    trigger(
        pushgate.api_addr,
        json!({"name": "e", "channel": "news,today;1", "data": "x", "socket_id": except}),
    )
    .await;
    trigger(
        pushgate.api_addr,
        json!({"name": "e", "channel": "news,today;1", "data": "y"}),
    )
    .await;
    assert_eq!(b.next().await["data"], "x");
    assert_eq!(b.next().await["data"], "y");
    assert_eq!(a.next().await["data"], "y");

    // Unsubscribed: nothing more.
    a.send(json!({"event": "pusher:unsubscribe", "data": {"channel": "news,today;1"}}))
        .await;
    a.quiet().await;
    trigger(
        pushgate.api_addr,
        json!({"name": "e", "channel": "news,today;1", "data": "z"}),
    )
    .await;
    assert_eq!(b.next().await["data"], "z");
    a.quiet().await;

    // A batch, with info.
    let (status, answer) = call(
        pushgate.api_addr,
        "POST",
        &format!("/apps/{ID}/batch_events"),
        &[],
        Some(json!({"batch": [
            {"name": "one", "channel": "news,today;1", "data": "1", "info": "subscription_count"},
            {"name": "two", "channel": "news,today;1", "data": "2"},
        ]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        serde_json::from_str::<Value>(&answer).unwrap(),
        json!({"batch": [{"subscription_count": 1}, {}]})
    );
    assert_eq!(b.next().await["event"], "one");
    assert_eq!(b.next().await["event"], "two");
}

#[tokio::test]
async fn private_and_user_channels_need_the_apps_signature() {
    let pushgate = start().await;
    let mut a = Client::connect(pushgate.addr, KEY).await;
    for auth in [
        None,
        Some("app-key:00"),
        Some(&*sign::channel_auth(
            KEY,
            "wrong-secret",
            &a.socket_id,
            "private-x",
            None,
        )),
    ] {
        let answer = a.subscribe("private-x", auth, None).await;
        assert_eq!(answer["event"], "pusher:subscription_error", "{answer}");
        let data: Value = serde_json::from_str(answer["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["status"], 401);
        assert_eq!(data["type"], "AuthError");
    }
    // Signed for another socket: refused too.
    let other = sign::channel_auth(KEY, SECRET, "1.2", "private-x", None);
    assert_eq!(
        a.subscribe("private-x", Some(&other), None).await["event"],
        "pusher:subscription_error"
    );
    a.subscribe_signed("private-x", None).await;
    trigger(
        pushgate.api_addr,
        json!({"name": "secret", "channel": "private-x", "data": "s"}),
    )
    .await;
    assert_eq!(a.next().await["event"], "secret");

    // A user's channel: only once signed in as that user.
    let answer = a.subscribe("#server-to-user-7", None, None).await;
    assert_eq!(answer["event"], "pusher:subscription_error");
    let user_data = json!({"id": "7", "name": "Ada"}).to_string();
    let bad = sign::user_auth(KEY, SECRET, "1.2", &user_data);
    a.send(json!({"event": "pusher:signin", "data": {"auth": bad, "user_data": user_data}}))
        .await;
    assert_eq!(a.next().await["event"], "pusher:error");
    let auth = sign::user_auth(KEY, SECRET, &a.socket_id, &user_data);
    a.send(json!({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}}))
        .await;
    let success = a.next().await;
    assert_eq!(success["event"], "pusher:signin_success");
    let data: Value = serde_json::from_str(success["data"].as_str().unwrap()).unwrap();
    assert_eq!(data["user_data"], user_data);
    let answer = a.subscribe("#server-to-user-7", None, None).await;
    assert_eq!(
        answer["event"], "pusher_internal:subscription_succeeded",
        "{answer}"
    );
    trigger(
        pushgate.api_addr,
        json!({"name": "to-you", "channel": "#server-to-user-7", "data": "hi"}),
    )
    .await;
    assert_eq!(a.next().await["event"], "to-you");

    // The app ends the user's connections: closed with 4009, which Pusher
    // clients do not reconnect after.
    let (status, answer) = call(
        pushgate.api_addr,
        "POST",
        &format!("/apps/{ID}/users/7/terminate_connections"),
        &[],
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(close_code(&mut a.socket).await, Some(4009));
}

#[tokio::test]
async fn presence_members_come_and_go_and_client_events_reach_the_others() {
    let pushgate = start().await;
    let channel = "presence-room";
    let ada = json!({"user_id": "1", "user_info": {"name": "Ada"}}).to_string();
    let bob = json!({"user_id": 2, "user_info": {"name": "Bob"}}).to_string();
    let mut a = Client::connect(pushgate.addr, KEY).await;
    let answer = a.subscribe_signed(channel, Some(&ada)).await;
    let data: Value = serde_json::from_str(answer["data"].as_str().unwrap()).unwrap();
    assert_eq!(data["presence"]["count"], 1);
    assert_eq!(data["presence"]["hash"]["1"]["name"], "Ada");

    let mut b = Client::connect(pushgate.addr, KEY).await;
    let answer = b.subscribe_signed(channel, Some(&bob)).await;
    let data: Value = serde_json::from_str(answer["data"].as_str().unwrap()).unwrap();
    assert_eq!(data["presence"]["count"], 2);
    let added = a.next().await;
    assert_eq!(added["event"], "pusher_internal:member_added");
    let member: Value = serde_json::from_str(added["data"].as_str().unwrap()).unwrap();
    assert_eq!(
        member,
        json!({"user_id": "2", "user_info": {"name": "Bob"}})
    );

    // Bob's second connection adds no member; its leaving removes none.
    let mut b2 = Client::connect(pushgate.addr, KEY).await;
    b2.subscribe_signed(channel, Some(&bob)).await;
    a.quiet().await;

    // A client event: to the others, with its user, never back to the sender.
    b.send(json!({"event": "client-typing", "channel": channel, "data": {"on": true}}))
        .await;
    let typing = a.next().await;
    assert_eq!(
        typing,
        json!({"event": "client-typing", "channel": channel, "data": {"on": true}, "user_id": "2"})
    );
    assert_eq!(b2.next().await["event"], "client-typing");
    b.quiet().await;

    let (status, users) = call(
        pushgate.api_addr,
        "GET",
        &format!("/apps/{ID}/channels/{channel}/users"),
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{users}");
    let users: Value = serde_json::from_str(&users).unwrap();
    assert_eq!(users["users"].as_array().unwrap().len(), 2, "{users}");
    let (status, info) = call(
        pushgate.api_addr,
        "GET",
        &format!("/apps/{ID}/channels/{channel}"),
        &[("info", "user_count,subscription_count")],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(
        serde_json::from_str::<Value>(&info).unwrap(),
        json!({"occupied": true, "user_count": 2, "subscription_count": 3})
    );
    let (status, list) = call(
        pushgate.api_addr,
        "GET",
        &format!("/apps/{ID}/channels"),
        &[("filter_by_prefix", "presence-"), ("info", "user_count")],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(
        serde_json::from_str::<Value>(&list).unwrap(),
        json!({"channels": {channel: {"user_count": 2}}})
    );

    drop(b2);
    a.quiet().await;
    drop(b);
    let removed = a.next().await;
    assert_eq!(removed["event"], "pusher_internal:member_removed");
    assert_eq!(
        serde_json::from_str::<Value>(removed["data"].as_str().unwrap()).unwrap(),
        json!({"user_id": "2"})
    );
}

#[tokio::test]
async fn client_events_are_refused_where_pusher_refuses_them() {
    let pushgate = start().await;
    let mut a = Client::connect(pushgate.addr, KEY).await;
    a.subscribe("public", None, None).await;
    a.subscribe_signed("private-a", None).await;
    // On a public channel, an unsubscribed channel, and not client-*.
    for (event, channel) in [
        ("client-x", "public"),
        ("client-x", "private-b"),
        ("server-x", "private-a"),
    ] {
        a.send(json!({"event": event, "channel": channel, "data": {}}))
            .await;
        assert_eq!(
            a.next().await["event"],
            "pusher:error",
            "{event} on {channel}"
        );
    }
    // Over the rate: 10 a second, then code 4301.
    let mut codes = Vec::new();
    for _ in 0..12 {
        a.send(json!({"event": "client-x", "channel": "private-a", "data": {}}))
            .await;
    }
    a.send(json!({"event": "pusher:ping", "data": {}})).await;
    loop {
        let got = a.next().await;
        if got["event"] == "pusher:pong" {
            break;
        }
        assert_eq!(got["event"], "pusher:error");
        codes.push(got["data"]["code"].clone());
    }
    assert!(
        !codes.is_empty() && codes.iter().all(|code| code == 4301),
        "{codes:?}"
    );

    // An app that does not allow them.
    let mut quiet = Client::connect(pushgate.addr, QUIET_KEY).await;
    let auth = sign::channel_auth(QUIET_KEY, SECRET, &quiet.socket_id, "private-a", None);
    assert_eq!(
        quiet.subscribe("private-a", Some(&auth), None).await["event"],
        "pusher_internal:subscription_succeeded"
    );
    quiet
        .send(json!({"event": "client-x", "channel": "private-a", "data": {}}))
        .await;
    assert_eq!(quiet.next().await["event"], "pusher:error");
    // Apps are apart: the same channel name of another app hears nothing.
    trigger(
        pushgate.api_addr,
        json!({"name": "only-1001", "channel": "private-a", "data": "1"}),
    )
    .await;
    assert_eq!(a.next().await["event"], "only-1001");
    quiet.quiet().await;
}

#[tokio::test]
async fn cache_channels_send_the_last_event_or_a_miss() {
    let pushgate = start().await;
    let mut a = Client::connect(pushgate.addr, KEY).await;
    a.subscribe("cache-prices", None, None).await;
    let miss = a.next().await;
    assert_eq!(miss["event"], "pusher:cache_miss");
    assert_eq!(miss["channel"], "cache-prices");
    trigger(
        pushgate.api_addr,
        json!({"name": "price", "channel": "cache-prices", "data": "1"}),
    )
    .await;
    trigger(
        pushgate.api_addr,
        json!({"name": "price", "channel": "cache-prices", "data": "2"}),
    )
    .await;
    assert_eq!(a.next().await["data"], "1");
    assert_eq!(a.next().await["data"], "2");
    let mut b = Client::connect(pushgate.addr, KEY).await;
    b.subscribe("cache-prices", None, None).await;
    assert_eq!(
        b.next().await,
        json!({"event": "price", "channel": "cache-prices", "data": "2"})
    );
    b.quiet().await;
}

#[tokio::test]
async fn connections_without_protocol_7_are_closed_with_pushers_codes() {
    let pushgate = start().await;
    for (query, code) in [("", 4008), ("?protocol=6", 4007)] {
        let mut socket = open(pushgate.addr, &format!("/app/{KEY}{query}")).await;
        assert_eq!(close_code(&mut socket).await, Some(code), "{query}");
    }
    // Another key is not pushgate's: the request goes to the app (here,
    // none listening).
    let (status, _) = common::get(&pushgate.url("/app/unknown-key?protocol=7")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn http_api_requests_must_be_signed_by_the_app() {
    let pushgate = start().await;
    let api = pushgate.api_addr;
    let path = format!("/apps/{ID}/events");
    let payload = json!({"name": "e", "channel": "c", "data": "d"}).to_string();
    let signed = |secret: &str, key: &str, at: u64| {
        sign::sign_request("POST", &path, &[], payload.as_bytes(), key, secret, at)
    };
    let refused = [
        (
            signed("wrong-secret-0000", KEY, now()),
            StatusCode::UNAUTHORIZED,
        ),
        (signed(SECRET, "other-key", now()), StatusCode::UNAUTHORIZED),
        // Outside the 600 s window on the server's clock, which reads the
        // same or later than `now()` did: 601 s old stays too old, but 601 s
        // ahead is only 600 once the server's second has turned, so ahead
        // takes a margin (the exact edges are `sign.rs`'s unit test, on a
        // fixed clock).
        (signed(SECRET, KEY, now() - 601), StatusCode::UNAUTHORIZED),
        (signed(SECRET, KEY, now() + 660), StatusCode::UNAUTHORIZED),
        (String::new(), StatusCode::UNAUTHORIZED),
    ];
    for (query, status) in refused {
        let (got, body) = raw_call(api, "POST", &format!("{path}?{query}"), payload.clone()).await;
        assert_eq!(got, status, "{query}: {body}");
    }
    // The body must be the one signed.
    let query = signed(SECRET, KEY, now());
    let (got, _) = raw_call(
        api,
        "POST",
        &format!("{path}?{query}"),
        payload.replace("\"d\"", "\"D\""),
    )
    .await;
    assert_eq!(got, StatusCode::UNAUTHORIZED);
    // An unknown app; pushgate's own API key opens nothing here.
    let (got, _) = call(api, "POST", "/apps/9/events", &[], Some(json!({}))).await;
    assert_eq!(got, StatusCode::NOT_FOUND);
    // Bad events, signed: each a 400 or 413, and nothing stored.
    for bad in [
        json!({"name": "e", "data": "d"}),
        json!({"name": "e", "channel": "a b", "data": "d"}),
        json!({"name": "", "channel": "c", "data": "d"}),
        json!({"name": "e", "channels": (0..101).map(|i| format!("c{i}")).collect::<Vec<_>>(), "data": "d"}),
        json!({"name": "e", "channel": "c", "data": "d", "socket_id": "x"}),
        json!({"name": "e", "channel": "c", "data": "d", "info": "nonsense"}),
    ] {
        let (got, body) = call(api, "POST", &path, &[], Some(bad.clone())).await;
        assert_eq!(got, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    let big = json!({"name": "e", "channel": "c", "data": "x".repeat(10 * 1024 + 1)});
    assert_eq!(
        call(api, "POST", &path, &[], Some(big)).await.0,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    let (got, body) = call(
        api,
        "GET",
        &format!("/apps/{ID}/channels"),
        &[("info", "user_count")],
        None,
    )
    .await;
    assert_eq!(got, StatusCode::BAD_REQUEST, "{body}");
}

/// The webhooks the app received so far, in order, each checked as the
/// server SDKs check one: `X-Pusher-Key` is the app's key and
/// `X-Pusher-Signature` the HMAC of the body under its secret.
fn webhooks(app: &common::recording::RecordingApp) -> Vec<Value> {
    let mut events = Vec::new();
    for request in app.requests() {
        assert_eq!(request.target, "/pusher/webhook");
        assert_eq!(request.value("x-pusher-key").as_deref(), Some(KEY));
        let signature = request.value("x-pusher-signature").unwrap();
        assert_eq!(signature, sign::webhook_signature(SECRET, &request.body));
        let batch: Value = serde_json::from_slice(&request.body).unwrap();
        assert!(batch["time_ms"].as_u64().unwrap() > 0);
        events.extend(batch["events"].as_array().unwrap().iter().cloned());
    }
    events
}

/// Waits until the app has had `count` webhooks.
async fn wait_webhooks(app: &common::recording::RecordingApp, count: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let got = webhooks(app);
        if got.len() >= count {
            return got;
        }
        assert!(tokio::time::Instant::now() < deadline, "only {got:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Webhooks of different kinds come from different places (occupancy from
/// the engine's answer, the rest from the connection), so in no fixed
/// order between them: compared as sets.
fn sorted(mut hooks: Vec<Value>) -> Vec<Value> {
    hooks.sort_by_key(|hook| hook.to_string());
    hooks
}

#[tokio::test]
async fn webhooks_tell_the_app_what_happened_once_signed_as_pusher_signs() {
    let app = common::recording::RecordingApp::start().await;
    let pushgate = Pushgate::start(
        &app.url(),
        &format!("pusher:\n  apps:\n    - {{id: \"{ID}\", key: {KEY}, secret: {SECRET}, client_events: true, webhook: {{url: /pusher/webhook}}}}\n"),
    )
    .await;
    let mut a = Client::connect(pushgate.addr, KEY).await;
    a.subscribe("room", None, None).await;
    let got = wait_webhooks(&app, 1).await;
    assert_eq!(
        got,
        [json!({"name": "channel_occupied", "channel": "room"})]
    );

    // A user's two connections: added once, removed once.
    let ada = json!({"user_id": "1"}).to_string();
    let mut b = Client::connect(pushgate.addr, KEY).await;
    let mut b2 = Client::connect(pushgate.addr, KEY).await;
    b.subscribe_signed("presence-x", Some(&ada)).await;
    b2.subscribe_signed("presence-x", Some(&ada)).await;
    b.send(json!({"event": "client-hi", "channel": "presence-x", "data": {"n": 1}}))
        .await;
    a.subscribe("cache-c", None, None).await;
    assert_eq!(a.next().await["event"], "pusher:cache_miss");
    let got = wait_webhooks(&app, 6).await;
    let b_socket = b.socket_id.clone();
    assert_eq!(
        sorted(got[1..].to_vec()),
        sorted(vec![
            json!({"name": "cache_miss", "channel": "cache-c"}),
            json!({"name": "channel_occupied", "channel": "cache-c"}),
            json!({"name": "channel_occupied", "channel": "presence-x"}),
            json!({"name": "client_event", "channel": "presence-x", "event": "client-hi", "data": "{\"n\":1}", "socket_id": b_socket, "user_id": "1"}),
            json!({"name": "member_added", "channel": "presence-x", "user_id": "1"}),
        ])
    );
    // On one node a channel is occupied before its first member is added.
    let at = |hook: Value| got.iter().position(|h| *h == hook).unwrap();
    assert!(
        at(json!({"name": "channel_occupied", "channel": "presence-x"}))
            < at(json!({"name": "member_added", "channel": "presence-x", "user_id": "1"}))
    );
    drop(b2);
    b.quiet().await;
    drop(b);
    let got = wait_webhooks(&app, 8).await;
    // ... and its last member removed before it is vacated.
    let at = |hook: Value| got.iter().position(|h| *h == hook).unwrap();
    assert!(
        at(json!({"name": "member_removed", "channel": "presence-x", "user_id": "1"}))
            < at(json!({"name": "channel_vacated", "channel": "presence-x"}))
    );
    assert_eq!(
        sorted(got[6..].to_vec()),
        sorted(vec![
            json!({"name": "channel_vacated", "channel": "presence-x"}),
            json!({"name": "member_removed", "channel": "presence-x", "user_id": "1"}),
        ])
    );
    a.send(json!({"event": "pusher:unsubscribe", "data": {"channel": "room"}}))
        .await;
    let got = wait_webhooks(&app, 9).await;
    assert_eq!(
        got[8],
        json!({"name": "channel_vacated", "channel": "room"})
    );
    a.quiet().await;
    assert_eq!(webhooks(&app).len(), 9, "{:#?}", webhooks(&app));
    let (status, metrics) = common::get(&format!("http://{}/metrics", pushgate.api_addr)).await;
    assert_eq!(status, StatusCode::OK);
    for line in [
        "pushgate_pusher_webhooks_sent_total 9",
        "pushgate_pusher_webhooks_queued 0",
        "pushgate_connections{transport=\"pusher\"} 1",
        "pushgate_subscriptions{transport=\"pusher\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in\n{metrics}"
        );
    }
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/api.md")).unwrap();
    for family in metrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let family = family.split_whitespace().next().unwrap();
        assert!(
            docs.contains(&format!("`{family}")),
            "{family} is not in docs/api.md"
        );
    }
}
