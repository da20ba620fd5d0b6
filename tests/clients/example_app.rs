//! The example app, examples/flask-chat, end to end: the real Flask app
//! (Flask's own server, `python app.py`) behind the real pushgate binary run
//! with the example's own `pushgate.yaml`, driven as a browser would drive
//! it, through pushgate only: log in with the app's session cookie, open a
//! WebSocket with it, say something, hear it; refused without the cookie,
//! forbidden another user's channel, kept open across a grant refresh, and
//! closed at logout.
//!
//! Flask comes from the virtualenv `target/pyenv` that `tests/clients/third_party.rs`
//! also uses (see `common::pyenv`), built from `integration/requirements.txt`;
//! it needs `python3` with `venv` and PyPI.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{pyenv, Process, TempDir, API_KEY};
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const APP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/flask-chat/app.py");
const CONFIG: &str = include_str!("../../examples/flask-chat/pushgate.yaml");
const EXAMPLE_REQUIREMENTS: &str = include_str!("../../examples/flask-chat/requirements.txt");

/// The longest any one step may take.
const STEP: Duration = Duration::from_secs(10);
/// How long the app waits for its server to answer.
const APP_START: Duration = Duration::from_secs(30);
/// The grant's `expires_in` the app is told to give, so a refresh happens
/// within the test.
const GRANT_SECONDS: &str = "2";
/// What Flask logs when it granted a refresh.
const REFRESHED: &str = r#""POST /realtime/refresh HTTP/1.1" 200"#;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// An example app's process, killed on drop.
pub(crate) struct App {
    child: Child,
    log: PathBuf,
}

impl App {
    /// Everything the app printed so far (Flask logs each request).
    pub(crate) fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nobody listens on right now. Flask's server cannot be told to take
/// port 0 and say which it got, so the port is picked here and released; if
/// something takes it meanwhile, [`start_example`] tries another.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether an app answers `GET /` on `addr` with a page whose title is `title`.
fn app_answers(addr: SocketAddr, title: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    if stream
        .write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).contains(&format!("<title>{title}</title>"))
}

/// One of examples/: its Flask app and its own pushgate.yaml.
pub(crate) struct Example<'a> {
    /// The app's script, run with the virtualenv's python.
    pub app: &'a str,
    /// The `<title>` of its `GET /` page, so the test knows it is this app
    /// that answers.
    pub title: &'a str,
    /// The example's pushgate.yaml.
    pub config: &'a str,
    /// pushgate's environment beside `PUSHGATE_LISTEN` and `PUSHGATE_UPSTREAM__URL`.
    pub pushgate_env: &'a [(&'a str, &'a str)],
}

/// pushgate with the example's config in front of a free port, then the app
/// on that port with `PORT` and the environment `app_env` gives for that
/// pushgate; returns once the app answers.
pub(crate) fn start_example(
    python: &Path,
    scratch: &Path,
    example: &Example,
    app_env: impl Fn(&Process) -> Vec<(String, String)>,
) -> (App, Process) {
    for attempt in 1..=3 {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let upstream = format!("http://{addr}");
        let mut env = vec![
            ("PUSHGATE_LISTEN", "127.0.0.1:0"),
            ("PUSHGATE_UPSTREAM__URL", upstream.as_str()),
        ];
        env.extend_from_slice(example.pushgate_env);
        let pushgate = Process::start(scratch, example.config, &env);
        let log = scratch.join(format!("app-{attempt}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(python)
            .arg(example.app)
            .env("PORT", addr.port().to_string())
            .envs(app_env(&pushgate))
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start the example app");
        let mut app = App { child, log };
        let deadline = Instant::now() + APP_START;
        loop {
            if let Some(status) = app.child.try_wait().unwrap() {
                let log = app.log();
                if log.contains("Address already in use") || log.contains("is in use") {
                    break; // Someone took the port: try another.
                }
                panic!("the example app exited ({status}) before it answered:\n{log}");
            }
            if app_answers(addr, example.title) {
                // Answered, and by this app (not by whoever else took the port).
                if app.child.try_wait().unwrap().is_none() {
                    return (app, pushgate);
                }
                continue;
            }
            assert!(
                Instant::now() < deadline,
                "the example app did not answer on {addr} within {APP_START:?}:\n{}",
                app.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!("the example app could not get a free port in 3 tries");
}

/// pushgate with flask-chat's config in front of the app, which publishes
/// to pushgate's API.
fn start(python: &Path, scratch: &Path) -> (App, Process) {
    let example = Example {
        app: APP,
        title: "pushgate chat",
        config: CONFIG,
        pushgate_env: &[
            ("PUSHGATE_AUTH__MODE", "upstream"),
            // The app's settings may sit in pushgate's environment too
            // (one shell, one container): pushgate must not refuse them.
            ("REALTIME_API_KEY", API_KEY),
        ],
    };
    start_example(python, scratch, &example, |pushgate| {
        [
            ("REALTIME_API_URL", format!("http://{}", pushgate.api_addr)),
            ("REALTIME_API_KEY", API_KEY.to_owned()),
            ("GRANT_SECONDS", GRANT_SECONDS.to_owned()),
            ("SECRET_KEY", "example-app-test-secret".to_owned()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect()
    })
}

/// One request through pushgate's public listener, as a browser sends it.
async fn send(
    gate: SocketAddr,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    form: Option<&str>,
) -> (StatusCode, HeaderMap, String) {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{gate}{path}"));
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    let body = match form {
        Some(form) => {
            request = request.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
            common::body(form.to_owned())
        }
        None => common::empty_body(),
    };
    let exchange = async {
        let response = common::client()
            .request(request.body(body).unwrap())
            .await
            .unwrap();
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    };
    tokio::time::timeout(STEP, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer within {STEP:?}"))
}

/// The `session=...` pair of a response's `Set-Cookie`, as a `Cookie` value.
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .filter_map(|value| value.split(';').next())
        .find(|pair| pair.starts_with("session="))
        .map(str::to_owned)
}

/// A WebSocket to pushgate's `/realtime/ws`, with the page's own `Origin`
/// and, when given, the session cookie.
async fn websocket(gate: SocketAddr, cookie: Option<&str>) -> Socket {
    let mut request = format!("ws://{gate}/realtime/ws")
        .into_client_request()
        .unwrap();
    let headers = request.headers_mut();
    headers.insert(header::ORIGIN, format!("http://{gate}").parse().unwrap());
    if let Some(cookie) = cookie {
        headers.insert(header::COOKIE, cookie.parse().unwrap());
    }
    let (socket, _) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(request))
        .await
        .expect("the WebSocket handshake in time")
        .expect("the WebSocket handshake is accepted (refusals after it are close frames)");
    socket
}

/// The next frame that is not a ping or pong, within [`STEP`].
async fn next_message(socket: &mut Socket) -> Option<Message> {
    loop {
        match tokio::time::timeout(STEP, socket.next())
            .await
            .expect("a frame within the step's time")
        {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(message)) => return Some(message),
            Some(Err(_)) | None => return None,
        }
    }
}

/// The next text frame, as JSON; panics on anything else.
async fn next_json(socket: &mut Socket) -> Value {
    match next_message(socket).await {
        Some(Message::Text(text)) => serde_json::from_str(text.as_str()).unwrap(),
        other => panic!("expected a JSON text frame, got {other:?}"),
    }
}

/// The close frame pushgate ends the connection with: code and reason.
async fn close_frame(socket: &mut Socket) -> (u16, String) {
    loop {
        match next_message(socket).await {
            Some(Message::Close(Some(frame))) => {
                return (u16::from(frame.code), frame.reason.to_string())
            }
            Some(Message::Text(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// Sends one command; returns its reply.
async fn command(socket: &mut Socket, command: Value) -> Value {
    socket
        .send(Message::text(command.to_string()))
        .await
        .unwrap();
    let reply = next_json(socket).await;
    assert_eq!(reply["id"], command["id"], "a reply to {command}: {reply}");
    reply
}

/// Waits until the app's log has a line containing `needle`.
async fn app_logged(app: &App, needle: &str) -> bool {
    let deadline = Instant::now() + STEP;
    while Instant::now() < deadline {
        if app.log().contains(needle) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Posts a chat line through the proxy; the app publishes it.
async fn say(gate: SocketAddr, cookie: &str, text: &str) -> Value {
    let form: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("text", text)
        .finish();
    let (status, _, body) = send(gate, "POST", "/say", Some(cookie), Some(&form)).await;
    assert_eq!(status, StatusCode::OK, "/say: {body}");
    serde_json::from_str(&body).unwrap()
}

async fn scenario(app: &App, gate: SocketAddr) {
    // Logged out, the page is the login form.
    let (status, _, page) = send(gate, "GET", "/", None, None).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains(r#"<form method="post" action="/login">"#),
        "{page}"
    );

    // A bad name is refused, and shown back escaped, never as markup.
    let (status, _, page) = send(gate, "POST", "/login", None, Some("name=%3Cb%3Ex")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("&lt;b&gt;x"), "{page}");
    assert!(!page.contains("<b>x"), "{page}");

    // Logging in sets the app's own session cookie and goes back to the page.
    let (status, headers, _) = send(gate, "POST", "/login", None, Some("name=ann")).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers[header::LOCATION], "/");
    let cookie = session_cookie(&headers).expect("/login sets the session cookie");
    let (status, _, page) = send(gate, "GET", "/", Some(&cookie), None).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("Logged in as <b>ann</b>"), "{page}");
    assert!(page.contains("/realtime/ws"), "{page}");

    // The page's WebSocket: pushgate asks the app, which knows ann by her
    // cookie and grants the lobby and her own channels.
    let mut ann = websocket(gate, Some(&cookie)).await;
    let reply = command(
        &mut ann,
        json!({"id": 1, "op": "subscribe", "channel": "chat:lobby"}),
    )
    .await;
    assert!(reply["result"]["epoch"].is_string(), "{reply}");
    let reply = command(
        &mut ann,
        json!({"id": 2, "op": "subscribe", "channel": "user:ann:notifications"}),
    )
    .await;
    assert!(reply["result"]["epoch"].is_string(), "{reply}");
    assert!(
        app_logged(app, r#""POST /realtime/auth HTTP/1.1" 200"#).await,
        "the app answered pushgate's auth request:\n{}",
        app.log()
    );

    // Bob's notifications are not in ann's grant.
    let reply = command(
        &mut ann,
        json!({"id": 3, "op": "subscribe", "channel": "user:bob:notifications"}),
    )
    .await;
    assert_eq!(reply["error"]["code"], "forbidden", "{reply}");

    // Saying something: the app publishes to the lobby and to ann's
    // notifications, and both reach her WebSocket.
    let text = "hello <b>world</b> & all";
    let published = say(gate, &cookie, text).await;
    assert_eq!(published["channel"], "chat:lobby", "{published}");
    let mut heard = [next_json(&mut ann).await, next_json(&mut ann).await];
    heard.sort_by_key(|envelope| envelope["channel"].to_string());
    let [lobby, note] = &heard;
    assert_eq!(lobby["channel"], "chat:lobby", "{lobby}");
    assert_eq!(lobby["event"], "message", "{lobby}");
    assert_eq!(
        lobby["data"],
        json!({"from": "ann", "text": text}),
        "{lobby}"
    );
    assert_eq!(lobby["epoch"], published["epoch"], "{lobby}");
    assert_eq!(lobby["offset"], published["offset"], "{lobby}");
    assert_eq!(note["channel"], "user:ann:notifications", "{note}");
    assert!(
        note["data"]["text"]
            .as_str()
            .is_some_and(|t| t.contains("reached the lobby")),
        "{note}"
    );

    // Without the cookie the app refuses, and the browser hears why: close
    // 4001 with the app's reason.
    let mut stranger = websocket(gate, None).await;
    assert_eq!(
        close_frame(&mut stranger).await,
        (4001, "log in first".to_owned())
    );

    // The grant lasts GRANT_SECONDS; pushgate asks the app's refresh
    // endpoint with ann's cookie, and the connection goes on.
    assert!(
        app_logged(app, REFRESHED).await,
        "pushgate refreshed the grant through the app:\n{}",
        app.log()
    );
    say(gate, &cookie, "still here").await;
    let mut texts = Vec::new();
    for _ in 0..2 {
        let envelope = next_json(&mut ann).await;
        if envelope["channel"] == "chat:lobby" {
            texts.push(envelope["data"]["text"].clone());
        }
    }
    assert_eq!(texts, [json!("still here")]);

    // Logging out: the app ends ann's login and has pushgate disconnect her.
    // Right after a refresh, so that the next one (which would close the
    // connection with 4001 as soon as the login is gone) is seconds away.
    let refreshes = app.log().matches(REFRESHED).count();
    let deadline = Instant::now() + STEP;
    while app.log().matches(REFRESHED).count() == refreshes {
        assert!(Instant::now() < deadline, "no refresh within {STEP:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, headers, _) = send(gate, "POST", "/logout", Some(&cookie), None).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(
        session_cookie(&headers).as_deref(),
        Some("session="),
        "/logout clears the session cookie: {headers:?}"
    );
    assert_eq!(
        close_frame(&mut ann).await,
        (4000, "disconnected by the app".to_owned()),
        "the app's log:\n{}",
        app.log()
    );

    // The old cookie is worth nothing now: the app forgot the login, and
    // pushgate the grants it had cached for ann.
    let mut stale = websocket(gate, Some(&cookie)).await;
    assert_eq!(
        close_frame(&mut stale).await,
        (4001, "log in first".to_owned())
    );
    let (status, _, body) = send(gate, "POST", "/say", Some(&cookie), Some("text=hi")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
}

/// The whole example, through the real pushgate binary and the real app.
#[test]
fn flask_chat_through_pushgate() {
    let scratch = TempDir::new("example-app");
    let python = pyenv::python(&scratch.0);
    let (app, pushgate) = start(&python, &scratch.0);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(scenario(&app, pushgate.addr))
    }));
    if let Err(panic) = outcome {
        let logs: Vec<String> = pushgate.logs.try_iter().collect();
        eprintln!(
            "the example app's log:\n{}\npushgate's log:\n{}",
            app.log(),
            logs.join("\n")
        );
        std::panic::resume_unwind(panic);
    }
}

/// The example's requirements are the ones the test installs, so the test
/// runs the versions the README tells people to install.
#[test]
fn the_example_pins_what_the_test_installs() {
    assert_pins_installed("examples/flask-chat/requirements.txt", EXAMPLE_REQUIREMENTS);
}

/// Each pin of an example's requirements (`path`, whose text is
/// `requirements`) is one the tests' virtualenv installs.
pub(crate) fn assert_pins_installed(path: &str, requirements: &str) {
    let installed: Vec<&str> = pyenv::REQUIREMENTS.lines().map(str::trim).collect();
    for line in requirements.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        assert!(
            installed.contains(&line),
            "{path} pins `{line}`, which integration/requirements.txt does not: add it there too"
        );
    }
}
