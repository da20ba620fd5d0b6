//! Two-way over WebSocket against a real app: `rpc` round trips and every
//! way the app can fail one, the in-flight bound, and publishes from
//! clients (direct and decided by the app) on both engines, with the
//! publisher's user set by pushgate alone.

use crate::common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::redis::Redis;
use common::Pushgate;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const PATIENCE: Duration = Duration::from_secs(10);

/// What the app saw of one call from pushgate.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    cookie: Option<String>,
    body: Value,
}

/// A real app: auth grants `session=<user>` the channels `chat:*` and
/// `moderated:*` (and `secret:*` to `session=boss`); `/internal/rpc`
/// answers by method (`echo`, `refuse`, `crash`, `not_json`, `held`: waits
/// for a permit); `/internal/publish` refuses data with `"bad"`, rewrites
/// data with `"rewrite"`, and accepts the rest as it is.
struct App {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    held: Arc<Semaphore>,
}

impl App {
    async fn start() -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let held = Arc::new(Semaphore::new(0));
        let (record, gate) = (seen.clone(), held.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (record, gate) = (record.clone(), gate.clone());
                tokio::spawn(async move {
                    let service =
                        service_fn(move |request| answer(request, record.clone(), gate.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        App { addr, seen, held }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The calls pushgate made to `path`.
    fn calls_to(&self, path: &str) -> Vec<Seen> {
        let seen = self.seen.lock().unwrap();
        seen.iter().filter(|s| s.path == path).cloned().collect()
    }
}

fn reply(status: u16, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

async fn answer(
    request: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    held: Arc<Semaphore>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_owned();
    let cookie = request
        .headers()
        .get("cookie")
        .map(|c| c.to_str().unwrap().to_owned());
    let bytes = request.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    seen.lock().unwrap().push(Seen {
        path: path.clone(),
        cookie: cookie.clone(),
        body: body.clone(),
    });
    let user = cookie
        .as_deref()
        .and_then(|c| c.strip_prefix("session="))
        .unwrap_or("");
    Ok(match path.as_str() {
        "/realtime/auth" if user.is_empty() => reply(401, r#"{"reason":"who are you"}"#),
        "/realtime/auth" => {
            let mut channels = vec!["chat:*", "moderated:*", "room:*", "typing:*"];
            if user == "boss" {
                channels.push("secret:*");
            }
            reply(
                200,
                &json!({"user": user, "channels": channels}).to_string(),
            )
        }
        "/internal/rpc" => match body["method"].as_str().unwrap_or("") {
            "echo" => reply(
                200,
                &json!({"you_sent": body["data"], "as": body["user"]}).to_string(),
            ),
            "refuse" => reply(
                403,
                r#"{"error":{"code":"not_yours","message":"that is not yours"}}"#,
            ),
            "crash" => reply(500, "{}"),
            "not_json" => reply(200, "<html>"),
            "held" => {
                held.acquire().await.unwrap().forget();
                reply(200, r#""released""#)
            }
            "slow" => {
                tokio::time::sleep(Duration::from_secs(3)).await;
                reply(200, r#""late""#)
            }
            _ => reply(404, "{}"),
        },
        "/internal/publish" => {
            let text = body["data"]["text"].as_str().unwrap_or("");
            if text.contains("bad") {
                reply(
                    403,
                    r#"{"error":{"code":"profanity","message":"mind your words"}}"#,
                )
            } else if text.contains("rewrite") {
                reply(200, r#"{"data":{"text":"***","checked":true}}"#)
            } else {
                reply(204, "")
            }
        }
        _ => reply(200, r#"{"page":true}"#),
    })
}

const RULES: &str = "channels:\n  - prefix: \"typing:\"\n    publish: direct\n    ephemeral: true\n  - prefix: \"chat:\"\n    publish: direct\n  - prefix: \"secret:\"\n    publish: direct\n  - prefix: \"moderated:\"\n    publish: via_app\n";

fn config(extra: &str) -> String {
    format!(
        "auth:\n  mode: upstream\n  upstream:\n    path: /realtime/auth\n    cache_ttl: 0s\nrpc:\n  path: /internal/rpc\n  publish_path: /internal/publish\n  timeout: 1s\n  max_in_flight: 2\n{RULES}{extra}"
    )
}

type Client = common::WsClient;

async fn connect(gate: &Pushgate, user: &str) -> Client {
    let mut request = format!("ws://{}/realtime/ws", gate.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("cookie", format!("session={user}").parse().unwrap());
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

async fn send(client: &mut Client, command: Value) {
    client
        .send(Message::text(command.to_string()))
        .await
        .unwrap();
}

/// The next text frame, as JSON.
async fn next(client: &mut Client) -> Value {
    loop {
        let frame = tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("a frame in time")
            .expect("the connection is open")
            .expect("a frame");
        if let Message::Text(text) = frame {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

/// The reply to command `id`, keeping what else arrives in `other`.
async fn reply_to(client: &mut Client, id: u64, other: &mut Vec<Value>) -> Value {
    loop {
        let frame = next(client).await;
        if frame["id"] == id {
            return frame;
        }
        other.push(frame);
    }
}

async fn call(client: &mut Client, id: u64, command: Value) -> Value {
    let mut command = command;
    command["id"] = json!(id);
    send(client, command).await;
    reply_to(client, id, &mut Vec::new()).await
}

#[tokio::test]
async fn rpc_reaches_the_app_as_the_connection_and_its_answer_comes_back() {
    let app = App::start().await;
    let gate = Pushgate::start(&app.url(), &config("")).await;
    let mut alice = connect(&gate, "alice").await;
    let data = json!({"post": 7, "n": 1.50, "user": "mallory"});
    let answer = call(
        &mut alice,
        1,
        json!({"op": "rpc", "method": "echo", "data": data}),
    )
    .await;
    assert_eq!(answer["result"]["as"], "alice", "{answer}");
    assert_eq!(answer["result"]["you_sent"], data, "{answer}");
    let calls = app.calls_to("/internal/rpc");
    assert_eq!(calls.len(), 1);
    let seen = &calls[0];
    assert_eq!(
        seen.cookie.as_deref(),
        Some("session=alice"),
        "credentials forwarded"
    );
    assert_eq!(seen.body["user"], "alice");
    assert_eq!(seen.body["method"], "echo");
    assert!(seen.body["connection"]
        .as_str()
        .is_some_and(|c| !c.is_empty()));

    // Every way the app fails a call is an error under the call's id; the
    // connection goes on.
    for (id, method, code) in [
        (2, "refuse", "not_yours"),
        (3, "crash", "app_error"),
        (4, "not_json", "app_error"),
        (5, "nothing_here", "app_refused"),
        (6, "slow", "app_timeout"),
    ] {
        let answer = call(&mut alice, id, json!({"op": "rpc", "method": method})).await;
        assert_eq!(answer["error"]["code"], code, "{method}: {answer}");
        assert!(answer.get("result").is_none());
    }
    let refused = call(&mut alice, 7, json!({"op": "rpc", "method": "refuse"})).await;
    assert_eq!(refused["error"]["message"], "that is not yours");
    let pong = call(&mut alice, 8, json!({"op": "ping"})).await;
    assert_eq!(pong["result"], json!({}));
}

#[tokio::test]
async fn calls_in_flight_are_bounded_and_never_hold_up_the_connection() {
    let app = App::start().await;
    let gate = Pushgate::start(&app.url(), &config("")).await;
    let mut alice = connect(&gate, "alice").await;
    let mut other = Vec::new();
    for id in [1, 2] {
        send(&mut alice, json!({"id": id, "op": "rpc", "method": "held"})).await;
    }
    // Both reached the app before the third is sent.
    let deadline = std::time::Instant::now() + PATIENCE;
    common::chaos::wait_until(deadline, "both calls to reach the app", || {
        app.calls_to("/internal/rpc").len() == 2
    })
    .await;
    send(&mut alice, json!({"id": 3, "op": "rpc", "method": "held"})).await;
    let third = reply_to(&mut alice, 3, &mut other).await;
    assert_eq!(third["error"]["code"], "too_many_calls", "{third}");
    // Other commands, and publishes, are answered while the calls wait.
    send(
        &mut alice,
        json!({"id": 4, "op": "subscribe", "channel": "chat:1"}),
    )
    .await;
    assert!(reply_to(&mut alice, 4, &mut other).await["result"].is_object());
    app.held.add_permits(2);
    for id in [1, 2] {
        let answer = reply_to(&mut alice, id, &mut other).await;
        assert_eq!(answer["result"], "released", "{answer}");
    }
    assert!(other.is_empty(), "nothing else arrived: {other:?}");
    // The bound is of calls under way: with them done, calls go again.
    let again = call(&mut alice, 5, json!({"op": "rpc", "method": "echo"})).await;
    assert!(again["result"].is_object(), "{again}");
}

#[tokio::test]
async fn rpc_is_off_without_its_path_and_its_endpoints_are_pushgates_alone() {
    let app = App::start().await;
    let off = Pushgate::start(
        &app.url(),
        "auth:\n  mode: upstream\n  upstream:\n    path: /realtime/auth\n",
    )
    .await;
    let mut alice = connect(&off, "alice").await;
    let answer = call(&mut alice, 1, json!({"op": "rpc", "method": "echo"})).await;
    assert_eq!(answer["error"]["code"], "rpc_disabled", "{answer}");

    // A client's own request for the app's rpc endpoints never reaches the
    // app, in any spelling a router may read as them.
    let gate = Pushgate::start(&app.url(), &config("")).await;
    for path in [
        "/internal/rpc",
        "/internal/rpc/",
        "//internal//rpc",
        "/INTERNAL/Rpc",
        "/internal/./rpc",
        "/internal/%72pc",
        "/internal%2Frpc",
        "/internal/%2572pc",
        "/internal/publish",
        "/internal/rpc?method=echo",
    ] {
        let (status, body) = common::get(&format!("http://{}{path}", gate.addr)).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::NOT_FOUND, "not found\n"),
            "{path}"
        );
    }
    assert!(app.calls_to("/internal/rpc").is_empty());
    assert!(app.calls_to("/internal/publish").is_empty());
    // Its neighbours are the app's as ever.
    let (status, body) = common::get(&format!("http://{}/internal/rpcs", gate.addr)).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, r#"{"page":true}"#)
    );
}

/// Client publishes on `gate`: direct and via the app, refused where no
/// rule or no grant allows them; the envelope's user is always the
/// publisher's grant.
async fn client_publishes(gate: &Pushgate, app: &App) {
    let mut alice = connect(gate, "alice").await;
    let mut bob = connect(gate, "bob").await;
    for (id, channel) in [(1, "chat:1"), (2, "moderated:1")] {
        let answer = call(&mut bob, id, json!({"op": "subscribe", "channel": channel})).await;
        assert!(answer["result"].is_object(), "{answer}");
    }

    // Direct: stored and fanned out as sent, with the publisher named by
    // pushgate, whatever the data claims.
    let data = json!({"text": "hi", "user": "mallory", "n": 1.50});
    let published = call(
        &mut alice,
        1,
        json!({"op": "publish", "channel": "chat:1", "data": data, "event": "msg"}),
    )
    .await;
    let offset = published["result"]["offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("{published}"));
    let heard = next(&mut bob).await;
    assert_eq!(heard["channel"], "chat:1");
    assert_eq!(heard["user"], "alice", "{heard}");
    assert_eq!(heard["event"], "msg");
    assert_eq!(heard["data"], data);
    assert_eq!(heard["offset"], offset);
    // History holds the same envelope.
    let (_, history) =
        common::api_call(gate.api_addr, "GET", "/api/history?channel=chat:1", None).await;
    assert_eq!(history["messages"][0]["user"], "alice", "{history}");
    // A forged field in the command itself changes nothing.
    let forged = call(
        &mut alice,
        2,
        json!({"op": "publish", "channel": "chat:1", "data": 1, "user": "mallory"}),
    )
    .await;
    assert!(forged["result"].is_object(), "{forged}");
    assert_eq!(next(&mut bob).await["user"], "alice");

    // Refused: no rule for the channel, outside the grant, too large.
    for (id, command, code) in [
        (
            3,
            json!({"op": "publish", "channel": "room:1", "data": 1}),
            "publish_not_allowed",
        ),
        (
            4,
            json!({"op": "publish", "channel": "secret:1", "data": 1}),
            "forbidden",
        ),
        (
            5,
            json!({"op": "publish", "channel": "chat:1", "data": "x".repeat(2048)}),
            "too_large",
        ),
    ] {
        let answer = call(&mut alice, id, command).await;
        assert_eq!(answer["error"]["code"], code, "{answer}");
    }

    // Via the app: refused in its words, rewritten, or kept.
    let before = app.calls_to("/internal/publish").len();
    let refused = call(
        &mut alice,
        6,
        json!({"op": "publish", "channel": "moderated:1", "data": {"text": "bad word"}}),
    )
    .await;
    assert_eq!(refused["error"]["code"], "profanity", "{refused}");
    assert_eq!(refused["error"]["message"], "mind your words");
    let rewritten = call(
        &mut alice,
        7,
        json!({"op": "publish", "channel": "moderated:1", "data": {"text": "rewrite me"}}),
    )
    .await;
    assert!(rewritten["result"].is_object(), "{rewritten}");
    let heard = next(&mut bob).await;
    assert_eq!(heard["data"], json!({"text": "***", "checked": true}));
    assert_eq!(heard["user"], "alice");
    let kept = call(
        &mut alice,
        8,
        json!({"op": "publish", "channel": "moderated:1", "data": {"text": "fine"}}),
    )
    .await;
    assert!(kept["result"].is_object(), "{kept}");
    assert_eq!(next(&mut bob).await["data"], json!({"text": "fine"}));
    let asked = app.calls_to("/internal/publish");
    assert_eq!(asked.len(), before + 3);
    let last = &asked.last().unwrap().body;
    assert_eq!(last["user"], "alice");
    assert_eq!(last["channel"], "moderated:1");
    assert_eq!(last["data"], json!({"text": "fine"}));
    // Nothing refused reached bob.
    let pong = call(&mut bob, 9, json!({"op": "ping"})).await;
    assert_eq!(pong["result"], json!({}));
}

/// On an ephemeral channel a client's publication reaches whoever listens
/// now, on every node, and nothing of it is kept.
async fn ephemeral_publishes(publishing: &Pushgate, listening: &Pushgate) {
    let mut bob = connect(listening, "bob").await;
    let answer = call(
        &mut bob,
        1,
        json!({"op": "subscribe", "channel": "typing:1"}),
    )
    .await;
    let position = answer["result"].clone();
    let mut alice = connect(publishing, "alice").await;
    let sent = call(
        &mut alice,
        1,
        json!({"op": "publish", "channel": "typing:1", "event": "typing", "data": {"on": true, "user": "mallory"}}),
    )
    .await;
    assert_eq!(sent["result"], json!({}), "{sent}");
    let heard = next(&mut bob).await;
    assert_eq!(
        heard,
        json!({"channel": "typing:1", "event": "typing", "user": "alice", "data": {"on": true, "user": "mallory"}})
    );
    // Nothing stored: no history, the channel's position unmoved.
    for gate in [publishing, listening] {
        let (_, history) =
            common::api_call(gate.api_addr, "GET", "/api/history?channel=typing:1", None).await;
        assert_eq!(history["messages"], json!([]), "{history}");
    }
    let mut late = connect(listening, "carol").await;
    let again = call(
        &mut late,
        1,
        json!({"op": "subscribe", "channel": "typing:1"}),
    )
    .await;
    assert_eq!(again["result"]["offset"], position["offset"], "{again}");
    let pong = call(&mut late, 2, json!({"op": "ping"})).await;
    assert_eq!(
        pong["result"],
        json!({}),
        "nothing was replayed before the pong"
    );
}

#[tokio::test]
async fn ephemeral_publishes_reach_listeners_and_leave_nothing_on_the_memory_engine() {
    let app = App::start().await;
    let gate = Pushgate::start(&app.url(), &config("")).await;
    ephemeral_publishes(&gate, &gate).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_publishes_cross_nodes_and_leave_nothing_on_the_redis_engine() {
    let redis = Redis::start();
    let app = App::start().await;
    let extra = format!(
        "engine:\n  kind: redis\n  redis:\n    url: {}\n",
        redis.url()
    );
    let a = Pushgate::start(&app.url(), &config(&extra)).await;
    let b = Pushgate::start(&app.url(), &config(&extra)).await;
    ephemeral_publishes(&a, &b).await;
    ephemeral_publishes(&a, &a).await;
}

#[tokio::test]
async fn clients_publish_where_rules_and_grants_allow_on_the_memory_engine() {
    let app = App::start().await;
    let gate = Pushgate::start(&app.url(), &config("api:\n  max_body: 1KiB\n")).await;
    client_publishes(&gate, &app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_publish_where_rules_and_grants_allow_on_the_redis_engine() {
    let redis = Redis::start();
    let app = App::start().await;
    let extra = format!(
        "api:\n  max_body: 1KiB\nengine:\n  kind: redis\n  redis:\n    url: {}\n",
        redis.url()
    );
    let gate = Pushgate::start(&app.url(), &config(&extra)).await;
    client_publishes(&gate, &app).await;
    // Another node hears the publisher through Redis.
    let other = Pushgate::start(&app.url(), &config(&extra)).await;
    let mut carol = connect(&other, "carol").await;
    let answer = call(
        &mut carol,
        1,
        json!({"op": "subscribe", "channel": "chat:9"}),
    )
    .await;
    assert!(answer["result"].is_object(), "{answer}");
    let mut alice = connect(&gate, "alice").await;
    let published = call(
        &mut alice,
        1,
        json!({"op": "publish", "channel": "chat:9", "data": {"text": "across"}}),
    )
    .await;
    assert!(published["result"].is_object(), "{published}");
    let heard = next(&mut carol).await;
    assert_eq!(heard["user"], "alice", "{heard}");
    assert_eq!(heard["data"], json!({"text": "across"}));
}
