//! `pushgate demo` as a process, over HTTP: what it prints, the page and the
//! client it serves, the toy login answering pushgate's auth request, a
//! publish through the app reaching an SSE stream, the cross-site guard,
//! logout closing the user's streams, a clean exit on SIGTERM, and what its
//! pages do over the WebSocket: publish who is typing, and ask the app who
//! is online. (The page itself runs in Chromium in tests/clients/browser.rs.)

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use http::{header, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const PATIENCE: Duration = Duration::from_secs(20);

struct Demo {
    child: Child,
    url: String,
    api: String,
    key: String,
    /// What it prints after its banner.
    lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_demo() -> Demo {
    start_demo_with(&[]).0
}

/// The demo with extra arguments; also everything it printed up to its key.
fn start_demo_with(extra: &[&str]) -> (Demo, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pushgate"))
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
        ])
        .args(extra)
        .env_remove("PUSHGATE_DEMO_API_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut demo = Demo {
        child,
        url: String::new(),
        api: String::new(),
        key: String::new(),
        lines,
    };
    let mut printed = Vec::new();
    while demo.url.is_empty() || demo.api.is_empty() || demo.key.is_empty() {
        let line = demo
            .lines
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|_| panic!("the demo printed its addresses; it printed {printed:?}"));
        let field = |prefix: &str| line.strip_prefix(prefix).map(|rest| rest.trim().to_owned());
        if let Some(rest) = field("pushgate demo: open ") {
            demo.url = rest.split(' ').next().unwrap().to_owned();
        } else if let Some(api) = field("  api ") {
            demo.api = api;
        } else if let Some(key) = field("  key ") {
            demo.key = key;
        }
        printed.push(line);
    }
    assert!(demo.url.starts_with("http://127.0.0.1:") && demo.url.ends_with('/'));
    // The rest of the banner, to its last line.
    while !printed.iter().any(|l| l.contains("Ctrl-C stops it")) {
        let line = demo.lines.recv_timeout(PATIENCE).unwrap_or_else(|_| {
            panic!("the demo printed its whole banner; it printed {printed:?}")
        });
        printed.push(line);
    }
    (demo, printed)
}

#[tokio::test]
async fn a_given_api_key_keeps_the_printed_command_valid_across_restarts() {
    let key = "demo-key-that-outlives-a-restart-0123456789";
    for _ in 0..2 {
        let (demo, printed) = start_demo_with(&["--api-key", key]);
        assert_eq!(demo.key, key);
        assert!(
            printed.iter().any(|l| l.contains(&format!("Bearer {key}"))),
            "the printed curl uses the key: {printed:?}"
        );
        assert!(!printed
            .iter()
            .any(|l| l.contains("a new one at each start")));
        let published = call(
            "POST",
            &format!("{}/api/publish", demo.api),
            &[
                ("authorization", &format!("Bearer {key}")),
                ("content-type", "application/json"),
            ],
            r#"{"channel": "chat:lobby", "data": {"from": "curl", "text": "hi"}}"#,
        )
        .await;
        assert_eq!(published.status, StatusCode::OK, "{}", published.body);
    }
    // Without one, a key made up at start, and the page says so.
    let (demo, printed) = start_demo_with(&[]);
    assert_eq!(demo.key.len(), 32);
    assert!(
        printed.iter().any(|l| l.contains("--api-key")),
        "{printed:?}"
    );
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: String,
}

async fn call(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = common::client()
        .request(
            request
                .body(common::body(Bytes::from(body.to_owned())))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

#[test]
fn the_demo_refuses_a_non_loopback_address() {
    let output = Command::new(env!("CARGO_BIN_EXE_pushgate"))
        .args(["demo", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--listen 0.0.0.0:0") && stderr.contains("loopback"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_demo_app_behind_pushgate() {
    let mut demo = start_demo();
    let url = |path: &str| format!("{}{}", demo.url, path.trim_start_matches('/'));

    let page = call("GET", &url("/"), &[], "").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page
        .body
        .contains(r#"<script type="module" src="/demo.js">"#));
    let script = call("GET", &url("/demo.js"), &[], "").await;
    assert!(script.body.contains(r#"from "/realtime/client.js""#));
    let client = call("GET", &url("/realtime/client.js"), &[], "").await;
    assert_eq!(client.status, StatusCode::OK);
    assert_eq!(
        client.headers[header::CONTENT_TYPE],
        "text/javascript; charset=utf-8"
    );

    // Not logged in: pushgate asked the app, which said no.
    let refused = call(
        "GET",
        &url("/realtime/poll?channel=chat:lobby&timeout=0"),
        &[],
        "",
    )
    .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{}", refused.body);
    assert!(refused.body.contains("not logged in"), "{}", refused.body);

    let bad = call("POST", &url("/login"), &[FORM], "name=a:b").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let login = call("POST", &url("/login"), &[FORM], "name=ada").await;
    assert_eq!(login.status, StatusCode::SEE_OTHER);
    let cookie = login.headers[header::SET_COOKIE].to_str().unwrap();
    assert!(cookie.starts_with("pushgate_demo_user=ada;") && cookie.contains("HttpOnly"));
    let cookie = ("cookie", "pushgate_demo_user=ada");
    let me = call("GET", &url("/me"), &[cookie], "").await;
    assert_eq!(me.body, r#"{"user":"ada"}"#);

    // The grant: the lobby and ada's own channels, not bob's.
    let poll = call(
        "GET",
        &url("/realtime/poll?channel=chat:lobby&channel=user:ada:notifications&timeout=0"),
        &[cookie],
        "",
    )
    .await;
    assert_eq!(poll.status, StatusCode::OK, "{}", poll.body);
    let cursor = serde_json::from_str::<serde_json::Value>(&poll.body).unwrap()["cursor"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = call(
        "GET",
        &url("/realtime/poll?channel=user:bob:notifications&timeout=0"),
        &[cookie],
        "",
    )
    .await;
    assert_eq!(other.status, StatusCode::FORBIDDEN, "{}", other.body);

    // Say something through the app: it publishes with the API key.
    let said = call("POST", &url("/say"), &[FORM, cookie], "text=hello+there").await;
    assert_eq!(said.status, StatusCode::OK, "{}", said.body);
    let notified = call("POST", &url("/notify"), &[FORM, cookie], "to=ada&text=note").await;
    assert_eq!(notified.status, StatusCode::OK, "{}", notified.body);
    let since = format!(
        "/realtime/poll?channel=chat:lobby&channel=user:ada:notifications&timeout=0&since={cursor}"
    );
    let news = call("GET", &url(&since), &[cookie], "").await;
    let news: serde_json::Value = serde_json::from_str(&news.body).unwrap();
    let messages = news["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{news}");
    assert_eq!(
        messages[0]["data"],
        serde_json::json!({"from": "ada", "text": "hello there"})
    );
    assert_eq!(messages[0]["event"], "message");
    assert_eq!(messages[1]["channel"], "user:ada:notifications");
    let history = call("GET", &url("/history"), &[cookie], "").await;
    assert!(history.body.contains("hello there"), "{}", history.body);

    // The printed key works on the printed API.
    let published = call(
        "POST",
        &format!("{}/api/publish", demo.api),
        &[
            ("authorization", &format!("Bearer {}", demo.key)),
            ("content-type", "application/json"),
        ],
        r#"{"channel": "chat:lobby", "data": {"from": "curl", "text": "hi"}}"#,
    )
    .await;
    assert_eq!(published.status, StatusCode::OK, "{}", published.body);

    // Another site's page cannot make ada speak, nor text nobody's.
    let forged = call(
        "POST",
        &url("/say"),
        &[FORM, cookie, ("origin", "http://evil.example")],
        "text=x",
    )
    .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let empty = call("POST", &url("/say"), &[FORM, cookie], "text=+").await;
    assert_eq!(empty.status, StatusCode::BAD_REQUEST);
    let anonymous = call("POST", &url("/say"), &[FORM], "text=x").await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);

    // Logout ends ada's open streams (the app disconnects her through the API).
    let stream = common::client()
        .request(
            Request::get(url("/realtime/sse?channel=chat:lobby"))
                .header(cookie.0, cookie.1)
                .body(common::empty_body())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let logout = call("POST", &url("/logout"), &[cookie], "").await;
    assert_eq!(logout.status, StatusCode::SEE_OTHER);
    assert!(logout.headers[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    let rest = tokio::time::timeout(PATIENCE, stream.into_body().collect())
        .await
        .expect("the stream ends at logout")
        .unwrap()
        .to_bytes();
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.contains("event: pushgate.disconnect") && rest.contains("logged out"),
        "{rest}"
    );

    // SIGTERM: a clean exit.
    let status = Command::new("kill")
        .args(["-TERM", &demo.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + PATIENCE;
    let code = loop {
        if let Some(status) = demo.child.try_wait().unwrap() {
            break status.code();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the demo exits after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code, Some(0));
    // ... and says so, as it said it started.
    // Read to the end of its output (the reader stops at EOF).
    let said: Vec<String> = std::iter::from_fn(|| demo.lines.recv_timeout(PATIENCE).ok()).collect();
    assert!(
        said.iter()
            .any(|line| line.starts_with("pushgate demo stopped")),
        "{said:?}"
    );
}

/// A page's WebSocket to the demo, logged in as `user`.
async fn page_socket(demo: &Demo, user: &str) -> common::WsClient {
    let url = format!("{}realtime/ws", demo.url.replacen("http", "ws", 1));
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert(
        "cookie",
        format!("pushgate_demo_user={user}").parse().unwrap(),
    );
    tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake in time")
        .expect("handshake accepted")
        .0
}

/// Sends `command` with `id`; its reply, keeping what else arrives in `other`.
async fn command(
    socket: &mut common::WsClient,
    id: u64,
    mut command: Value,
    other: &mut Vec<Value>,
) -> Value {
    command["id"] = json!(id);
    socket
        .send(Message::text(command.to_string()))
        .await
        .unwrap();
    loop {
        let frame = common::ws_next_json(socket).await;
        if frame["id"] == id {
            return frame;
        }
        other.push(frame);
    }
}

/// The next envelope on `channel`, from `seen` first, then from the socket.
async fn envelope_on(socket: &mut common::WsClient, channel: &str, seen: &mut Vec<Value>) -> Value {
    if let Some(at) = seen.iter().position(|m| m["channel"] == channel) {
        return seen.remove(at);
    }
    loop {
        let frame = common::ws_next_json(socket).await;
        if frame["channel"] == channel && frame.get("op").is_none() {
            return frame;
        }
    }
}

#[tokio::test]
async fn pages_publish_who_is_typing_and_ask_the_app_who_is_online() {
    let demo = start_demo();
    let (mut ada, mut bob) = (
        page_socket(&demo, "ada").await,
        page_socket(&demo, "bob").await,
    );
    let (mut ada_saw, mut bob_saw) = (Vec::new(), Vec::new());
    for (socket, saw) in [(&mut ada, &mut ada_saw), (&mut bob, &mut bob_saw)] {
        for (id, channel) in [(1, "chat:lobby"), (2, "typing:lobby")] {
            let reply = command(
                socket,
                id,
                json!({"op": "subscribe", "channel": channel}),
                saw,
            )
            .await;
            assert!(reply["result"]["epoch"].is_string(), "{channel}: {reply}");
        }
    }

    // Who is online: the page asks, the app answers from pushgate's presence.
    let online = command(
        &mut bob,
        3,
        json!({"op": "rpc", "method": "online"}),
        &mut bob_saw,
    )
    .await;
    assert_eq!(
        online["result"],
        json!({"users": ["ada", "bob"]}),
        "{online}"
    );
    let unknown = command(
        &mut bob,
        4,
        json!({"op": "rpc", "method": "likes"}),
        &mut bob_saw,
    )
    .await;
    assert_eq!(unknown["error"]["code"], "no_such_method", "{unknown}");
    // The app's rpc endpoint is pushgate's to call, not a page's.
    let direct = call(
        "POST",
        &format!("{}rpc", demo.url),
        &[("cookie", "pushgate_demo_user=bob")],
        r#"{"method":"online"}"#,
    )
    .await;
    assert_eq!(direct.status, StatusCode::NOT_FOUND, "{}", direct.body);

    // Typing: ada's page publishes itself; bob hears it under ada's name,
    // whatever the data says.
    let typed = command(
        &mut ada,
        5,
        json!({"op": "publish", "channel": "typing:lobby", "event": "typing", "data": {"at": 1, "user": "mallory"}}),
        &mut ada_saw,
    )
    .await;
    // Ephemeral: nothing stored, so no position.
    assert_eq!(typed["result"], json!({}), "{typed}");
    let heard = envelope_on(&mut bob, "typing:lobby", &mut bob_saw).await;
    assert_eq!(
        heard,
        json!({"channel": "typing:lobby", "event": "typing", "user": "ada", "data": {"at": 1, "user": "mallory"}})
    );
    // The publisher hears its own too (the page skips its own name).
    assert_eq!(
        envelope_on(&mut ada, "typing:lobby", &mut ada_saw).await["user"],
        "ada"
    );

    // The chat itself goes through the app (POST /say), not from pages.
    let chat = command(
        &mut ada,
        6,
        json!({"op": "publish", "channel": "chat:lobby", "data": {"from": "ada", "text": "x"}}),
        &mut ada_saw,
    )
    .await;
    assert_eq!(chat["error"]["code"], "publish_not_allowed", "{chat}");
    // Nor on another user's typing channel the grant does not cover.
    let other = command(
        &mut ada,
        7,
        json!({"op": "publish", "channel": "typing:elsewhere", "data": {}}),
        &mut ada_saw,
    )
    .await;
    assert_eq!(other["error"]["code"], "forbidden", "{other}");

    // bob leaves: the app no longer lists him.
    drop(bob);
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut id = 8;
    loop {
        let online = command(
            &mut ada,
            id,
            json!({"op": "rpc", "method": "online"}),
            &mut ada_saw,
        )
        .await;
        if online["result"] == json!({"users": ["ada"]}) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "bob still listed: {online}"
        );
        id += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
