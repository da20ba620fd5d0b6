//! Shared test support: a real upstream app on an ephemeral port, pushgate
//! started in-process or as the real binary, and small HTTP helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::{self, protocol::Role};

type TestBody = BoxBody<Bytes, Infallible>;

fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into()).boxed()
}

/// A real HTTP app on `127.0.0.1:0`, with routes that exercise the proxy.
pub struct Upstream {
    pub addr: SocketAddr,
    /// Requests that reached the app.
    pub hits: Arc<AtomicU64>,
    /// TCP connections the app accepted.
    pub connections: Arc<AtomicU64>,
    _stop: oneshot::Sender<()>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let counter = hits.clone();
        let accepted_count = connections.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => accepted.unwrap(),
                    _ = &mut stopped => return,
                };
                accepted_count.fetch_add(1, Ordering::Relaxed);
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        counter.fetch_add(1, Ordering::Relaxed);
                        route(req)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Upstream {
            addr,
            hits,
            connections,
            _stop: stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Gates for the app's `/gated?id=N` route, by id.
static GATES: std::sync::Mutex<std::collections::BTreeMap<u64, oneshot::Receiver<()>>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Holds back the end of a `/gated?id=N` response: the app sends `first\n`
/// at once, and `last\n` only after [`Gate::open`] (or when the gate is
/// dropped), so a test knows exactly what the app has produced so far.
pub struct Gate {
    pub id: u64,
    open: Option<oneshot::Sender<()>>,
}

impl Gate {
    pub fn new() -> Gate {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let (open, opened) = oneshot::channel();
        GATES.lock().unwrap().insert(id, opened);
        Gate {
            id,
            open: Some(open),
        }
    }

    /// The path that streams through this gate.
    pub fn path(&self) -> String {
        format!("/gated?id={}", self.id)
    }

    /// Lets the app send the rest of the response.
    pub fn open(&mut self) {
        if let Some(open) = self.open.take() {
            let _ = open.send(());
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        GATES.lock().unwrap().remove(&self.id);
    }
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn number(q: &HashMap<String, String>, key: &str, default: u64) -> u64 {
    q.get(key).and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn route(mut req: Request<Incoming>) -> Result<Response<TestBody>, Infallible> {
    let q = query(&req);
    let response = match req.uri().path() {
        // What the app saw: method, path, version and every header.
        "/headers" => {
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .keys()
                .map(|name| {
                    let values: Vec<serde_json::Value> = req
                        .headers()
                        .get_all(name)
                        .iter()
                        .map(|v| v.to_str().unwrap_or("").into())
                        .collect();
                    (name.as_str().to_owned(), values.into())
                })
                .collect();
            let body = serde_json::json!({
                "method": req.method().as_str(),
                "uri": req.uri().to_string(),
                "version": format!("{:?}", req.version()),
                "headers": headers,
            });
            Response::builder()
                .header("content-type", "application/json")
                .header("connection", "x-hop")
                .header("x-hop", "must not reach the client")
                .header("keep-alive", "timeout=5")
                .body(full(body.to_string()))
                .unwrap()
        }
        // Streams the request body back as it arrives.
        "/echo" => {
            let body = req.into_body();
            let stream = http_body_util::BodyStream::new(body).filter_map(|frame| async move {
                match frame {
                    Ok(frame) => frame.into_data().ok().map(|d| Ok(Frame::data(d))),
                    Err(_) => None,
                }
            });
            Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
        // Reads the whole body without keeping it; answers its length.
        "/count" => {
            let mut body = req.into_body();
            let mut total: u64 = 0;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => total += frame.data_ref().map_or(0, |d| d.len() as u64),
                    Err(_) => break,
                }
            }
            Response::new(full(total.to_string()))
        }
        // Waits `ms` before sending headers.
        "/slow-headers" => {
            tokio::time::sleep(Duration::from_millis(number(&q, "ms", 0))).await;
            Response::new(full("finally"))
        }
        // Headers at once, then `chunks` chunks every `interval_ms`.
        "/stream" => {
            let chunks = number(&q, "chunks", 5);
            let interval = Duration::from_millis(number(&q, "interval_ms", 10));
            let stream = futures_util::stream::unfold(0u64, move |i| async move {
                if i == chunks {
                    return None;
                }
                tokio::time::sleep(interval).await;
                Some((Ok(Frame::data(Bytes::from(format!("chunk {i}\n")))), i + 1))
            });
            Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
        // `bytes` bytes of `x`, in 64 KiB chunks, produced as they are read.
        "/big" => {
            let total = number(&q, "bytes", 1 << 20);
            let stream = futures_util::stream::unfold(0u64, move |sent| async move {
                if sent >= total {
                    return None;
                }
                let n = (total - sent).min(64 * 1024);
                Some((
                    Ok(Frame::data(Bytes::from(vec![b'x'; n as usize]))),
                    sent + n,
                ))
            });
            Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
        // `first\n` at once, then `last\n` once the test opens the gate.
        "/gated" => match GATES.lock().unwrap().remove(&number(&q, "id", u64::MAX)) {
            Some(gate) => {
                let stream =
                    futures_util::stream::unfold((0u8, Some(gate)), |(step, gate)| async move {
                        match step {
                            0 => Some((Ok(Frame::data(Bytes::from("first\n"))), (1, gate))),
                            1 => {
                                if let Some(gate) = gate {
                                    let _ = gate.await;
                                }
                                Some((Ok(Frame::data(Bytes::from("last\n"))), (2, None)))
                            }
                            _ => None,
                        }
                    });
                Response::new(BodyExt::boxed(StreamBody::new(stream)))
            }
            None => Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(full("no such gate"))
                .unwrap(),
        },
        // Accepts the connection and never answers.
        "/silent" => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        // A WebSocket echo server.
        "/ws" => {
            let key = req
                .headers()
                .get("sec-websocket-key")
                .cloned()
                .unwrap_or_else(|| http::HeaderValue::from_static(""));
            let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let upgraded = upgrade.await.unwrap();
                let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    None,
                )
                .await;
                while let Some(Ok(message)) = ws.next().await {
                    if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err()
                    {
                        break;
                    }
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", accept)
                .body(full(""))
                .unwrap()
        }
        _ => Response::new(full("hello from upstream")),
    };
    Ok(response)
}

/// The API key the test configs use.
pub const API_KEY: &str = "test-key";

/// Lays `overlay` over `base`, mapping by mapping.
fn merge(base: &mut serde_yaml::Value, overlay: serde_yaml::Value) {
    match (base, overlay) {
        (serde_yaml::Value::Mapping(base), serde_yaml::Value::Mapping(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (_, serde_yaml::Value::Null) => {}
        (base, overlay) => *base = overlay,
    }
}

/// pushgate running in this test process.
pub struct Pushgate {
    pub addr: SocketAddr,
    pub api_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), pushgate::Error>>>,
}

impl Pushgate {
    /// Starts pushgate on `127.0.0.1:0` in front of `upstream`, with `extra`
    /// YAML appended to the config.
    /// Starts pushgate on `127.0.0.1:0` in front of `upstream`, its API on
    /// `127.0.0.1:0` with the key [`API_KEY`]; `extra` YAML is merged over
    /// that (so it may set keys in the same sections).
    pub async fn start(upstream: &str, extra: &str) -> Pushgate {
        let base = format!(
            "listen: 127.0.0.1:0\nupstream:\n  url: {upstream}\napi:\n  listen: 127.0.0.1:0\n  keys: [{API_KEY}]\nauth:\n  mode: none\n"
        );
        let mut tree: serde_yaml::Value = serde_yaml::from_str(&base).unwrap();
        let extra: serde_yaml::Value = serde_yaml::from_str(extra).unwrap();
        merge(&mut tree, extra);
        let yaml = serde_yaml::to_string(&tree).unwrap();
        let settings =
            pushgate::config::from_yaml(&yaml, "test.yaml", Vec::<(String, String)>::new())
                .unwrap_or_else(|err| panic!("{err}"));
        Self::start_settings(settings).await
    }

    pub async fn start_settings(mut settings: pushgate::Settings) -> Pushgate {
        switch_fast_paths(&mut settings.config);
        let server = pushgate::Server::bind(settings).await.unwrap();
        let addr = server.local_addr();
        let api_addr = server.api_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        Pushgate {
            addr,
            api_addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Begins shutdown; the returned handle resolves when pushgate is done.
    pub fn shutdown(&mut self) -> tokio::task::JoinHandle<Result<(), pushgate::Error>> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap()
    }
}

/// Turns off the fast paths the environment names, as the binary reads
/// them (`PUSHGATE_FAST_PATHS__LEAN_CLIENT=false`, ...): .ci/run runs the
/// suite a second time with every one off (docs/fast-paths.md), and the
/// real binary in `Process` inherits the same variables.
pub fn switch_fast_paths(config: &mut pushgate::Config) {
    let paths = &mut config.fast_paths;
    for (name, switch) in [
        ("LEAN_CLIENT", &mut paths.lean_client),
        ("SSE_DETACH", &mut paths.sse_detach),
        ("KEPT_TIMERS", &mut paths.kept_timers),
        ("READ_AHEAD", &mut paths.read_ahead),
        ("WS_RECLAIM", &mut paths.ws_reclaim),
    ] {
        if let Ok(value) = std::env::var(format!("PUSHGATE_FAST_PATHS__{name}")) {
            *switch = value.trim() != "false";
        }
    }
}

/// Whether the fast path `name` (`SSE_DETACH`, ...) is on for this run:
/// for the few checks of what only that path does.
pub fn fast_path_on(name: &str) -> bool {
    std::env::var(format!("PUSHGATE_FAST_PATHS__{name}")).map_or(true, |v| v.trim() != "false")
}

/// A plain HTTP/1.1 client.
pub fn client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    BoxBody<Bytes, std::io::Error>,
> {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

pub fn empty_body() -> BoxBody<Bytes, std::io::Error> {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

pub fn body(data: impl Into<Bytes>) -> BoxBody<Bytes, std::io::Error> {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

/// GETs `url` and returns the status and the whole body as text.
pub async fn get(url: &str) -> (StatusCode, String) {
    let response = client()
        .request(Request::get(url).body(empty_body()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// The real `pushgate` binary, run with JSON logs so the test can read them.
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    /// The API listener's address, from the same "listening" line.
    pub api_addr: SocketAddr,
    /// Log lines after the "listening" line, as they arrive.
    pub logs: std::sync::mpsc::Receiver<String>,
}

impl Process {
    /// Starts the binary with `config` (a YAML file's text) and waits until it
    /// logs the address it listens on.
    pub fn start(dir: &std::path::Path, config: &str, env: &[(&str, &str)]) -> Process {
        let mut all = vec![
            ("PUSHGATE_API__LISTEN", "127.0.0.1:0"),
            ("PUSHGATE_API__KEYS", API_KEY),
            ("PUSHGATE_AUTH__MODE", "none"),
        ];
        all.extend_from_slice(env);
        Process::start_plain(dir, config, &all)
    }

    /// Like [`Process::start`], with only JSON logs laid over `config`:
    /// the file alone says the API's address and keys and the auth mode
    /// (as a reload must be able to change them).
    pub fn start_plain(dir: &std::path::Path, config: &str, env: &[(&str, &str)]) -> Process {
        let path = dir.join("pushgate.yaml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_pushgate"))
            .arg("--config")
            .arg(&path)
            .env("PUSHGATE_LOG__FORMAT", "json")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (lines_tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (addr, api_addr) = loop {
            let line = lines
                .recv_timeout(Duration::from_secs(20))
                .expect("pushgate logs a listening line");
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if event["message"] == "listening" {
                let field =
                    |name: &str| -> SocketAddr { event[name].as_str().unwrap().parse().unwrap() };
                break (field("addr"), field("api_addr"));
            }
        };
        Process {
            child,
            addr,
            api_addr,
            logs: lines,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`TERM`, `INT`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Peak resident memory in KiB, from /proc.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Waits for a log line containing `needle`; returns it.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            match self.logs.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Some(line),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "pushgate-test-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// GETs `url`; the status and body, or the error if the exchange failed.
pub async fn get_raw(
    url: String,
) -> Result<(StatusCode, Bytes), Box<dyn std::error::Error + Send + Sync>> {
    let response = client()
        .request(Request::get(url).body(empty_body()).unwrap())
        .await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, bytes))
}

/// The Python virtualenv the tests run third-party code in (`target/pyenv`),
/// built with `python3 -m venv` from the pinned `integration/requirements.txt`
/// and reused while that file is unchanged. The same one, built the same way,
/// as `tests/clients/third_party.rs` builds: either test reuses what the other built.
pub mod chaos;
pub mod command_json;
pub mod events_app;
pub mod node;
pub mod recording;
pub mod redis;
pub mod wire;

/// A WebSocket client of pushgate's realtime endpoint.
pub type WsClient =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Clients of all three realtime transports that record what they are
/// handed, for the exactness and chaos tests.
pub mod realtime;

/// How long a test waits for any one thing to happen.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// Opens `ws://{addr}/realtime/ws{query}` (query with its `?`, or empty).
pub async fn ws_connect(addr: SocketAddr, query: &str) -> WsClient {
    let url = format!("ws://{addr}/realtime/ws{query}");
    tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url))
        .await
        .expect("handshake in time")
        .expect("handshake accepted")
        .0
}

/// The next text frame, as JSON (pings and pongs skipped; any other frame
/// fails the test).
pub async fn ws_next_json(client: &mut WsClient) -> serde_json::Value {
    loop {
        let message = tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("a message in time")
            .expect("the connection is open")
            .expect("a valid frame");
        match message {
            tungstenite::Message::Text(text) => {
                return serde_json::from_str(text.as_str()).unwrap()
            }
            tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

/// Reads until the server closes; the close code.
pub async fn ws_close_code(client: &mut WsClient) -> Option<u16> {
    loop {
        match tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(tungstenite::Message::Close(frame))) => return frame.map(|f| f.code.into()),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

/// Subscribes (from `since`, when given) and returns the command's reply,
/// skipping anything pushed before it.
pub async fn ws_subscribe(
    client: &mut WsClient,
    id: u64,
    channel: &str,
    since: Option<&str>,
) -> serde_json::Value {
    let mut command = serde_json::json!({"id": id, "op": "subscribe", "channel": channel});
    if let Some(since) = since {
        command["since"] = since.into();
    }
    client
        .send(tungstenite::Message::text(command.to_string()))
        .await
        .unwrap();
    loop {
        let reply = ws_next_json(client).await;
        if reply.get("id") == Some(&id.into()) {
            return reply;
        }
    }
}

/// Calls the API with the test key: the status and the JSON body (`Null`
/// when the body is not JSON).
pub async fn api_call(
    api: SocketAddr,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (StatusCode, serde_json::Value) {
    let request = Request::builder()
        .method(method)
        .uri(format!("http://{api}{path}"))
        .header("authorization", format!("Bearer {API_KEY}"))
        .header("content-type", "application/json")
        .body(match body {
            Some(body) => self::body(body.to_string()),
            None => empty_body(),
        })
        .unwrap();
    let response = client().request(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

pub mod pyenv {
    use std::fs;
    use std::io;
    use std::path::{Path, PathBuf};
    use std::process::{Command, ExitStatus, Stdio};
    use std::time::{Duration, Instant};

    /// The pinned packages; the virtualenv keeps a copy and is rebuilt when
    /// it differs.
    pub const REQUIREMENTS: &str = include_str!("../../integration/requirements.txt");
    const REQUIREMENTS_PATH: &str =
        concat!(env!("CARGO_MANIFEST_DIR"), "/integration/requirements.txt");
    /// Where the virtualenv keeps its copy of the requirements it was built
    /// from.
    const STAMP: &str = "pushgate-requirements.txt";
    /// What a usable virtualenv can import.
    const PROBE: &str = "import websockets, httpx, httpx_sse, flask, pusher";

    const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
    const VENV_TIMEOUT: Duration = Duration::from_secs(120);
    const PIP_TIMEOUT: Duration = Duration::from_secs(300);

    /// How a child process ended, and everything it printed.
    pub struct Ran {
        /// `None`: killed at the timeout.
        pub status: Option<ExitStatus>,
        pub output: String,
    }

    impl Ran {
        pub fn ok(&self) -> bool {
            self.status.is_some_and(|s| s.success())
        }

        pub fn describe(&self, timeout: Duration) -> String {
            let ending = match self.status {
                Some(status) => format!("{status}"),
                None => format!("killed after {timeout:?}"),
            };
            format!("{ending}; its output:\n{}", self.output)
        }
    }

    /// Runs `command` with no input, its stdout and stderr together in a
    /// file under `scratch` (so no pipe can fill and stall it), killed at
    /// `timeout`.
    pub fn run(command: &mut Command, scratch: &Path, timeout: Duration) -> io::Result<Ran> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = scratch.join(format!("pyenv-output-{n}.txt"));
        let file = fs::File::create(&log)?;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()?;
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let output = String::from_utf8_lossy(&fs::read(&log)?).into_owned();
        Ok(Ran { status, output })
    }

    /// The cargo target directory: `CARGO_TARGET_TMPDIR` is its `tmp/`.
    fn target_dir() -> PathBuf {
        Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("CARGO_TARGET_TMPDIR is inside the target directory")
            .to_path_buf()
    }

    /// Whether `dir` is a virtualenv built from [`REQUIREMENTS`] that still
    /// works.
    fn usable(dir: &Path, scratch: &Path) -> bool {
        let built_from = fs::read_to_string(dir.join(STAMP)).ok();
        built_from.as_deref() == Some(REQUIREMENTS)
            && run(
                Command::new(dir.join("bin/python")).args(["-c", PROBE]),
                scratch,
                PROBE_TIMEOUT,
            )
            .is_ok_and(|ran| ran.ok())
    }

    /// The virtualenv's python, after building the virtualenv if need be.
    /// Panics, saying what to install, when it cannot be built.
    pub fn python(scratch: &Path) -> PathBuf {
        // The tests of one binary run on several threads: one builds the
        // virtualenv, the others wait for it and then find it usable.
        static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let target = target_dir();
        let dir = target.join("pyenv");
        if usable(&dir, scratch) {
            return dir.join("bin/python");
        }

        // Say plainly what is missing rather than let `venv` fail half-way.
        let fix = "install Python's venv module: on Debian or Ubuntu \
                   `apt-get install python3-venv` (a python.org or pyenv CPython has it built in)";
        match run(
            Command::new("python3").args(["-c", "import venv, ensurepip"]),
            scratch,
            PROBE_TIMEOUT,
        ) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => panic!(
                "this test needs python3 to build its virtualenv, and there is no \
                 python3 on PATH: on Debian or Ubuntu `apt-get install python3 python3-venv`"
            ),
            Err(err) => panic!("could not run python3: {err}"),
            Ok(ran) if !ran.ok() => panic!(
                "this test needs `python3 -m venv`, and this python3 cannot create \
                 virtualenvs: {fix}. The probe `python3 -c 'import venv, ensurepip'` ended {}",
                ran.describe(PROBE_TIMEOUT)
            ),
            Ok(_) => {}
        }

        // Built beside the final place and renamed into it, so a run that is
        // interrupted, or another test binary running at the same time, never
        // sees half of it.
        let building = target.join(format!("pyenv.building-{}", std::process::id()));
        let _ = fs::remove_dir_all(&building);
        let ran = run(
            Command::new("python3").arg("-m").arg("venv").arg(&building),
            scratch,
            VENV_TIMEOUT,
        )
        .expect("run python3 -m venv");
        if !ran.ok() {
            let _ = fs::remove_dir_all(&building);
        }
        assert!(
            ran.ok(),
            "`python3 -m venv {}` failed ({fix}): {}",
            building.display(),
            ran.describe(VENV_TIMEOUT)
        );
        let ran = run(
            Command::new(building.join("bin/python"))
                .args(["-m", "pip", "install", "--disable-pip-version-check", "-q"])
                .args(["--no-input", "-r", REQUIREMENTS_PATH]),
            scratch,
            PIP_TIMEOUT,
        )
        .expect("run pip");
        if !ran.ok() {
            let _ = fs::remove_dir_all(&building);
            panic!(
                "pip could not install {REQUIREMENTS_PATH} (is PyPI reachable?): {}",
                ran.describe(PIP_TIMEOUT)
            );
        }
        fs::write(building.join(STAMP), REQUIREMENTS).expect("write the virtualenv's stamp");

        if usable(&dir, scratch) {
            // Another run finished one meanwhile: keep that, drop this.
            let _ = fs::remove_dir_all(&building);
            return dir.join("bin/python");
        }
        let _ = fs::remove_dir_all(&dir);
        if fs::rename(&building, &dir).is_err() {
            // Another run put its own there first; use that one.
            let _ = fs::remove_dir_all(&building);
            assert!(
                usable(&dir, scratch),
                "could not move the virtualenv into {}",
                dir.display()
            );
        }
        dir.join("bin/python")
    }
}

/// Reads a raw response from `stream` until `needle` appears; the text read.
/// Fails the test when the stream ends first or nothing comes in time.
pub async fn read_until(stream: &mut tokio::net::TcpStream, needle: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let read = tokio::time::timeout_at(deadline, stream.read(&mut buffer))
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} in {}", String::from_utf8_lossy(&seen)))
            .unwrap();
        assert!(
            read > 0,
            "the stream ended before {needle:?}: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buffer[..read]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// Reads a raw answer's head from `stream`: the head as text (through the
/// blank line) and the bytes read past it, exact (a binary frame may follow
/// a head in the same read).
pub async fn read_head(stream: &mut tokio::net::TcpStream) -> (String, Vec<u8>) {
    let mut bytes = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = bytes.split_off(end + 4);
            return (String::from_utf8_lossy(&bytes).into_owned(), rest);
        }
        read_more(stream, &mut bytes, deadline).await;
    }
}

/// Reads one answer framed by its `content-length` from a kept-alive
/// connection: the head as text and the body.
pub async fn read_sized_answer(stream: &mut tokio::net::TcpStream) -> (String, Vec<u8>) {
    let (head, mut body) = read_head(stream).await;
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no content-length: {head}"));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while body.len() < length {
        read_more(stream, &mut body, deadline).await;
    }
    body.truncate(length);
    (head, body)
}

/// One read from `stream` onto `bytes`; fails the test when the connection
/// closes or nothing comes by `deadline`.
async fn read_more(
    stream: &mut tokio::net::TcpStream,
    bytes: &mut Vec<u8>,
    deadline: tokio::time::Instant,
) {
    use tokio::io::AsyncReadExt;
    let mut buffer = [0u8; 4096];
    let read = tokio::time::timeout_at(deadline, stream.read(&mut buffer))
        .await
        .expect("an answer in time")
        .expect("the connection holds");
    assert!(
        read > 0,
        "the connection closed without an answer: {}",
        String::from_utf8_lossy(bytes)
    );
    bytes.extend_from_slice(&buffer[..read]);
}

/// A client that stops reading, and the bound pushgate holds it to: what
/// it has not read is its session's queue (`limits.queue_bytes`), what the
/// kernel may hold unsent (`limits.unsent_bytes`) and its own receive
/// buffer. Past those it is cut off as a slow consumer.
pub struct StalledReader {
    pub queue: usize,
    pub unsent: usize,
}

impl StalledReader {
    pub const SMALL: StalledReader = StalledReader {
        queue: 256 * 1024,
        unsent: 16 * 1024,
    };

    /// The config that sets the bound (publications up to 64 KiB, as a
    /// queue of 256 KiB must allow).
    pub fn config(&self) -> String {
        format!(
            "limits: {{queue_messages: 100000, queue_bytes: {}, unsent_bytes: {}}}\napi: {{max_body: 64KiB}}\n",
            self.queue, self.unsent
        )
    }

    /// A connection to `addr` with a small receive buffer of its own, as a
    /// client on a slow link has, and that buffer's size.
    pub async fn connect(addr: SocketAddr) -> (tokio::net::TcpStream, usize) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(8 * 1024).unwrap();
        let receive_buffer = socket.recv_buffer_size().unwrap() as usize;
        (socket.connect(addr).await.unwrap(), receive_buffer)
    }

    /// Publishes 1 KiB publications to `channel` until pushgate cuts its
    /// one subscriber off as a slow consumer, and asserts that came within
    /// the bound.
    pub async fn publish_until_cut(&self, api: SocketAddr, channel: &str, receive_buffer: usize) {
        let pad = "x".repeat(1024);
        let mut published = 0;
        while metric_value(api, "pushgate_slow_consumers_total").await == 0 {
            assert!(
                published < 4 << 20,
                "4 MiB published and the client that reads nothing is still served"
            );
            for _ in 0..16 {
                let publish = serde_json::json!({"channel": channel, "data": {"pad": pad}});
                let (status, answer) = api_call(api, "POST", "/api/publish", Some(publish)).await;
                assert_eq!(status, StatusCode::OK, "{answer}");
                published += pad.len();
            }
        }
        // Each publication is framed in a little more than its payload;
        // the rest of the slack is for the publications published while
        // the metric was read.
        let bound = self.queue + self.unsent + receive_buffer;
        assert!(
            published <= bound * 3 / 2,
            "cut off after {published} bytes, past {bound} (queue, unsent, receive buffer)"
        );
    }
}

/// The value of a metric without labels, or of one line of it
/// (`name{labels}`), on the API listener.
pub async fn metric_value(api: SocketAddr, line: &str) -> i64 {
    let (_, text) = get(&format!("http://{api}/metrics")).await;
    text.lines()
        .find_map(|l| l.strip_prefix(line)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `{line}` in /metrics:\n{text}"))
}
