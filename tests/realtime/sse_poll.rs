//! Server-Sent Events and long-poll end to end, with real clients over
//! sockets: a raw SSE reader (a hyper client streaming the response body and
//! parsing `retry:`, `event:`, `data:`, `id:` lines and `:` comments) and a
//! long-poll loop. Every wait is bounded; nothing sleeps and hopes.

use crate::common;

use std::any::Any;
use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Pushgate, StalledReader, Upstream, API_KEY};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use pushgate::cursor::{Cursor, DecodedCursor, Epoch, Position};
use pushgate::message::ChannelName;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The longest any single wait may take before the test fails.
const WAIT: Duration = Duration::from_secs(10);

async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?}: {what}"))
}

async fn start(extra: &str) -> (Upstream, Pushgate) {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), extra).await;
    (app, gate)
}

// ------------------------------------------------------------ raw requests

/// One request on its own HTTP/1.1 connection, so dropping the answer
/// closes the socket. The connection task and the sender are handed back to
/// keep alive as long as the answer is read.
/// An HTTP/1.1 client connection of its own to `addr`, driven by a task.
async fn connect_h1(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    JoinHandle<()>,
) {
    connect_h1_on(within("connect", TcpStream::connect(addr)).await.unwrap()).await
}

/// The same over a socket already connected.
async fn connect_h1_on(
    tcp: TcpStream,
) -> (
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    JoinHandle<()>,
) {
    let (sender, connection) = within(
        "handshake",
        hyper::client::conn::http1::handshake(TokioIo::new(tcp)),
    )
    .await
    .unwrap();
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    (sender, task)
}

async fn send_h1(
    addr: SocketAddr,
    method: Method,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> (Response<Incoming>, Box<dyn Any + Send>, JoinHandle<()>) {
    let tcp = within("connect", TcpStream::connect(addr)).await.unwrap();
    send_h1_on(tcp, addr, method, path_and_query, headers).await
}

/// The same over a socket already connected to `addr`.
async fn send_h1_on(
    tcp: TcpStream,
    addr: SocketAddr,
    method: Method,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> (Response<Incoming>, Box<dyn Any + Send>, JoinHandle<()>) {
    let (mut sender, task) = connect_h1_on(tcp).await;
    let mut request = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(http::header::HOST, addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Empty::<Bytes>::new()).unwrap();
    let response = within(
        &format!("response headers for {path_and_query}"),
        sender.send_request(request),
    )
    .await
    .unwrap();
    (response, Box::new(sender), task)
}

/// A whole answer.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|err| panic!("{err}: not JSON: {:?}", self.text))
    }

    /// The `error.code` of an error answer.
    fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error.code in {}", self.text))
            .to_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

async fn fetch(
    addr: SocketAddr,
    method: Method,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let (response, _sender, task) = send_h1(addr, method, path_and_query, headers).await;
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = within("the whole body", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    task.abort();
    Answer {
        status,
        headers,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

// ------------------------------------------------------------ the SSE reader

/// One dispatched SSE event.
#[derive(Debug, Clone, Default, PartialEq)]
struct Event {
    event: Option<String>,
    data: String,
    id: Option<String>,
}

impl Event {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|err| panic!("{err}: data is not JSON: {self:?}"))
    }

    fn cursor(&self) -> DecodedCursor {
        let id = self.id.as_deref().expect("every event has an id");
        Cursor::decode(id).unwrap_or_else(|err| panic!("id {id:?} does not decode: {err}"))
    }
}

/// What a stream delivers, in order.
#[derive(Debug, Clone, PartialEq)]
enum Item {
    Retry(u64),
    /// A block with an `id:` and no data: it moves the last event id
    /// without dispatching an event.
    Id(String),
    Comment(String),
    Event(Event),
}

/// An open SSE response, read line by line.
struct SseStream {
    status: StatusCode,
    headers: HeaderMap,
    version: Version,
    body: Incoming,
    buffer: Vec<u8>,
    items: VecDeque<Item>,
    partial: Event,
    partial_started: bool,
    /// Whether the partial event has a `data:` line (else it is no event).
    partial_data: bool,
    ended: bool,
    _sender: Box<dyn Any + Send>,
    task: Option<JoinHandle<()>>,
}

impl Drop for SseStream {
    fn drop(&mut self) {
        // Closes the socket (HTTP/1) or the whole connection (HTTP/2).
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl SseStream {
    fn new(
        response: Response<Incoming>,
        sender: Box<dyn Any + Send>,
        task: Option<JoinHandle<()>>,
    ) -> SseStream {
        let status = response.status();
        let headers = response.headers().clone();
        let version = response.version();
        SseStream {
            status,
            headers,
            version,
            body: response.into_body(),
            buffer: Vec::new(),
            items: VecDeque::new(),
            partial: Event::default(),
            partial_started: false,
            partial_data: false,
            ended: false,
            _sender: sender,
            task,
        }
    }

    /// Opens `{prefix}/sse?{query}` on its own HTTP/1.1 connection and
    /// insists on 200.
    async fn open(addr: SocketAddr, query: &str, headers: &[(&str, &str)]) -> SseStream {
        let stream = SseStream::try_open(addr, query, headers).await;
        assert_eq!(
            stream.status,
            StatusCode::OK,
            "GET /realtime/sse?{query}: {:?}",
            stream.headers
        );
        stream
    }

    async fn try_open(addr: SocketAddr, query: &str, headers: &[(&str, &str)]) -> SseStream {
        let (response, sender, task) = send_h1(
            addr,
            Method::GET,
            &format!("/realtime/sse?{query}"),
            headers,
        )
        .await;
        SseStream::new(response, sender, Some(task))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn line(&mut self, line: &str) {
        if line.is_empty() {
            if self.partial_started {
                self.partial_started = false;
                let event = std::mem::take(&mut self.partial);
                if self.partial_data {
                    self.items.push_back(Item::Event(event));
                } else if let Some(id) = event.id {
                    self.items.push_back(Item::Id(id));
                }
                self.partial_data = false;
            }
            return;
        }
        if let Some(comment) = line.strip_prefix(':') {
            self.items
                .push_back(Item::Comment(comment.trim_start().to_owned()));
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "retry" => {
                let millis = value
                    .parse()
                    .unwrap_or_else(|_| panic!("retry is not a number: {line:?}"));
                self.items.push_back(Item::Retry(millis));
            }
            "event" => {
                self.partial_started = true;
                self.partial.event = Some(value.to_owned());
            }
            "data" => {
                if self.partial_started && !self.partial.data.is_empty() {
                    self.partial.data.push('\n');
                }
                self.partial_started = true;
                self.partial_data = true;
                self.partial.data.push_str(value);
            }
            "id" => {
                self.partial_started = true;
                self.partial.id = Some(value.to_owned());
            }
            other => panic!("unknown SSE field {other:?} in line {line:?}"),
        }
    }

    /// The next item, or `None` once the body has ended cleanly. A body that
    /// fails (the connection cut mid-stream) fails the test.
    async fn next_item(&mut self) -> Option<Item> {
        loop {
            if let Some(item) = self.items.pop_front() {
                return Some(item);
            }
            if self.ended {
                return None;
            }
            let frame = tokio::time::timeout(WAIT, self.body.frame())
                .await
                .unwrap_or_else(|_| panic!("no SSE frame within {WAIT:?}"));
            match frame {
                None => {
                    assert!(
                        self.buffer.is_empty(),
                        "the stream ended inside a line: {:?}",
                        String::from_utf8_lossy(&self.buffer)
                    );
                    self.ended = true;
                }
                Some(Err(err)) => panic!("the SSE body failed: {err}"),
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    self.buffer.extend_from_slice(&data);
                    while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                        let raw: Vec<u8> = self.buffer.drain(..=end).collect();
                        let text = std::str::from_utf8(&raw[..end])
                            .expect("SSE lines are UTF-8")
                            .trim_end_matches('\r')
                            .to_owned();
                        self.line(&text);
                    }
                }
            }
        }
    }

    /// The opening: the configured `retry:` (2 s) with the connection's
    /// starting cursor as its id.
    async fn opening(&mut self) -> DecodedCursor {
        let Some(Item::Retry(2000)) = self.next_item().await else {
            panic!("the stream starts with the configured retry");
        };
        match self.next_item().await {
            Some(Item::Id(id)) => {
                Cursor::decode(&id).unwrap_or_else(|err| panic!("id {id:?} does not decode: {err}"))
            }
            other => panic!("the opening carries the starting cursor, not {other:?}"),
        }
    }

    /// The next event, skipping `retry:` lines and comments (which alone
    /// never satisfy the wait).
    async fn next_event(&mut self) -> Event {
        within("an SSE event", async {
            loop {
                match self.next_item().await {
                    Some(Item::Event(event)) => return event,
                    Some(_) => continue,
                    None => panic!("the SSE stream ended while an event was expected"),
                }
            }
        })
        .await
    }
}

// ------------------------------------------------------------ API helpers

/// Publishes one message; returns its `(epoch, offset)`.
async fn publish(
    api: SocketAddr,
    channel: &str,
    data: Value,
    event: Option<&str>,
) -> (String, u64) {
    let mut body = json!({"channel": channel, "data": data});
    if let Some(event) = event {
        body["event"] = json!(event);
    }
    let request = Request::post(format!("http://{api}/api/publish"))
        .header("authorization", format!("Bearer {API_KEY}"))
        .header("content-type", "application/json")
        .body(common::body(body.to_string()))
        .unwrap();
    let response = within("publish", common::client().request(request))
        .await
        .unwrap();
    let status = response.status();
    let bytes = within("publish body", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    let answer: Value = serde_json::from_slice(&bytes).unwrap();
    let result = &answer["results"][0];
    assert_eq!(result["channel"], channel, "{answer}");
    (
        result["epoch"].as_str().unwrap().to_owned(),
        result["offset"].as_u64().unwrap(),
    )
}

/// Publishes `0..count` (data = the sequence number) at a steady pace; the
/// watch tells how many are stored so far.
fn spawn_publisher(
    api: SocketAddr,
    channel: &'static str,
    count: u64,
    pace: Duration,
) -> (JoinHandle<()>, watch::Receiver<u64>) {
    let (progress, published) = watch::channel(0u64);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(pace);
        for n in 0..count {
            tick.tick().await;
            publish(api, channel, json!(n), None).await;
            progress.send_replace(n + 1);
        }
    });
    (task, published)
}

/// Waits until the publisher has stored at least `n` messages.
async fn published_at_least(published: &mut watch::Receiver<u64>, n: u64) {
    within(
        &format!("{n} messages published"),
        published.wait_for(|done| *done >= n),
    )
    .await
    .expect("the publisher runs");
}

/// The value of one metric line (`name{labels}`) on the API listener.
async fn metric(gate: &Pushgate, line: &str) -> i64 {
    let answer = fetch(gate.api_addr, Method::GET, "/metrics", &[]).await;
    assert_eq!(answer.status, StatusCode::OK);
    answer
        .text
        .lines()
        .find_map(|l| l.strip_prefix(line)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no `{line}` in /metrics:\n{}", answer.text))
        .trim()
        .parse()
        .unwrap()
}

/// Polls /metrics (bounded) until `line` reads `want`.
async fn wait_metric(gate: &Pushgate, line: &str, want: i64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = metric(gate, line).await;
        if value == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "`{line}` stayed at {value}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const SSE_CONNECTIONS: &str = "pushgate_connections{transport=\"sse\"}";
const POLL_CONNECTIONS: &str = "pushgate_connections{transport=\"poll\"}";

/// Reads events of `channel` until `got` holds `until` sequence numbers,
/// checking each envelope; returns the last id.
async fn read_sequence(
    stream: &mut SseStream,
    channel: &str,
    got: &mut Vec<u64>,
    until: usize,
) -> String {
    let mut last = None;
    while got.len() < until {
        let event = stream.next_event().await;
        assert_eq!(event.event, None, "{event:?}");
        let envelope = event.json();
        assert_eq!(envelope["channel"], channel, "{envelope}");
        let n = envelope["data"].as_u64().unwrap();
        // Offsets start at 1, data at 0.
        assert_eq!(envelope["offset"].as_u64(), Some(n + 1), "{envelope}");
        let position = event.cursor().position_of(channel).unwrap();
        assert_eq!(position.offset, n + 1, "id of {envelope}");
        got.push(n);
        last = event.id;
    }
    last.expect("at least one event read")
}

// ------------------------------------------------------------ SSE

#[tokio::test]
async fn sse_events_carry_the_envelope_the_event_name_and_a_cursor_id() {
    let (_app, gate) = start("").await;
    let mut stream = SseStream::open(gate.addr, "channel=news", &[]).await;
    assert_eq!(stream.header("content-type"), Some("text/event-stream"));
    assert!(
        stream
            .header("cache-control")
            .is_some_and(|v| v.contains("no-cache")),
        "{:?}",
        stream.headers
    );
    assert_eq!(stream.header("x-accel-buffering"), Some("no"));
    let opening = stream.opening().await;
    assert_eq!(opening.len(), 1, "one channel: {opening:?}");

    let (epoch, offset) =
        publish(gate.api_addr, "news", json!({"title": "hi"}), Some("story")).await;
    let named = stream.next_event().await;
    assert_eq!(named.event.as_deref(), Some("story"));
    assert_eq!(
        named.json(),
        json!({"channel": "news", "epoch": epoch, "offset": offset, "event": "story", "data": {"title": "hi"}})
    );
    let position = named.cursor().position_of("news").unwrap();
    assert_eq!(
        position,
        Position::new(Epoch::parse(&epoch).unwrap(), offset)
    );

    let (epoch2, offset2) = publish(gate.api_addr, "news", json!([1, 2]), None).await;
    let unnamed = stream.next_event().await;
    assert_eq!(unnamed.event, None);
    assert_eq!(
        unnamed.json(),
        json!({"channel": "news", "epoch": epoch2, "offset": offset2, "data": [1, 2]})
    );
    let cursor = unnamed.cursor();
    assert_eq!(cursor.len(), 1);
    assert_eq!(
        cursor.position_of("news").unwrap(),
        Position::new(Epoch::parse(&epoch2).unwrap(), offset2)
    );
    assert_eq!(offset2, offset + 1);
}

/// A stream that drops before its first event still resumes: the opening
/// names where it started, and what was published meanwhile follows.
#[tokio::test]
async fn sse_resumes_from_the_opening_id_when_no_event_came() {
    let (_app, gate) = start("").await;
    for channel in ["fresh", "used"] {
        if channel == "used" {
            publish(gate.api_addr, channel, json!("before"), None).await;
        }
        let mut stream = SseStream::open(gate.addr, &format!("channel={channel}"), &[]).await;
        let opening = stream.opening().await;
        drop(stream);
        for n in 0..3 {
            publish(gate.api_addr, channel, json!(n), None).await;
        }
        let id = opening.encode();
        let mut stream = SseStream::open(
            gate.addr,
            &format!("channel={channel}"),
            &[("last-event-id", id.as_str())],
        )
        .await;
        for n in 0..3 {
            let event = stream.next_event().await;
            assert_eq!(event.event, None, "{channel}: no reset, the message");
            assert_eq!(event.json()["data"], json!(n), "{channel}");
        }
    }
}

#[tokio::test]
async fn sse_resumes_across_disconnects_while_publishes_continue() {
    let (_app, gate) = start("history: {size: 1000}").await;
    const TOTAL: u64 = 300;
    let mut got = Vec::new();

    let mut stream = SseStream::open(gate.addr, "channel=resume", &[]).await;
    let (publisher, mut published) =
        spawn_publisher(gate.api_addr, "resume", TOTAL, Duration::from_millis(3));

    // Read some, drop the connection, let a real gap build up, come back
    // with Last-Event-ID.
    let id = read_sequence(&mut stream, "resume", &mut got, 60).await;
    drop(stream);
    published_at_least(&mut published, (got.len() as u64 + 30).min(TOTAL)).await;
    let mut stream = SseStream::open(
        gate.addr,
        "channel=resume",
        &[("last-event-id", id.as_str())],
    )
    .await;
    let id = read_sequence(&mut stream, "resume", &mut got, 160).await;
    drop(stream);

    // Once more, with the id in the URL as a client without the header would.
    published_at_least(&mut published, (got.len() as u64 + 30).min(TOTAL)).await;
    let mut stream = SseStream::open(
        gate.addr,
        &format!("channel=resume&last_event_id={id}"),
        &[],
    )
    .await;
    read_sequence(&mut stream, "resume", &mut got, TOTAL as usize).await;
    within("the publisher", publisher).await.unwrap();

    assert_eq!(
        got,
        (0..TOTAL).collect::<Vec<_>>(),
        "every message once, in order"
    );
    // Nothing further is pending: the next event is the next publication.
    publish(gate.api_addr, "resume", json!("end"), None).await;
    assert_eq!(stream.next_event().await.json()["data"], "end");
}

#[tokio::test]
async fn sse_resumes_two_channels_with_one_cursor() {
    let (_app, gate) = start("").await;
    let query = "channel=two:a&channel=two:b";
    let mut stream = SseStream::open(gate.addr, query, &[]).await;
    let mut sent = 0u64;
    let mut publish_round = |count: u64| {
        let api = gate.api_addr;
        let from = sent;
        sent += count;
        async move {
            for n in from..from + count {
                publish(api, "two:a", json!(n), None).await;
                publish(api, "two:b", json!(n), None).await;
            }
        }
    };
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    let mut take = |event: &Event| {
        let envelope = event.json();
        let n = envelope["data"].as_u64().unwrap();
        match envelope["channel"].as_str().unwrap() {
            "two:a" => got_a.push(n),
            "two:b" => got_b.push(n),
            other => panic!("a message of {other}"),
        }
    };

    publish_round(10).await;
    let mut last = None;
    for _ in 0..20 {
        let event = stream.next_event().await;
        take(&event);
        last = Some(event);
    }
    let last = last.unwrap();
    let cursor = last.cursor();
    assert_eq!(cursor.len(), 2, "the id names both channels");
    assert_eq!(cursor.position_of("two:a").unwrap().offset, 10);
    assert_eq!(cursor.position_of("two:b").unwrap().offset, 10);
    drop(stream);

    publish_round(15).await;
    let id = last.id.unwrap();
    let mut stream = SseStream::open(gate.addr, query, &[("last-event-id", id.as_str())]).await;
    for _ in 0..30 {
        let event = stream.next_event().await;
        assert_ne!(event.event.as_deref(), Some("pushgate.reset"), "{event:?}");
        take(&event);
    }
    publish_round(5).await;
    for _ in 0..10 {
        take(&stream.next_event().await);
    }
    let all: Vec<u64> = (0..30).collect();
    assert_eq!(got_a, all, "two:a once each, in order");
    assert_eq!(got_b, all, "two:b once each, in order");
}

#[tokio::test]
async fn sse_announces_a_gap_older_than_history_with_a_reset_event() {
    let (_app, gate) = start("history: {size: 5}").await;
    let mut stream = SseStream::open(gate.addr, "channel=gap", &[]).await;
    publish(gate.api_addr, "gap", json!(0), None).await;
    let first = stream.next_event().await;
    assert_eq!(first.json()["offset"], 1);
    drop(stream);

    let mut top = (String::new(), 0);
    for n in 1..=20 {
        top = publish(gate.api_addr, "gap", json!(n), None).await;
    }
    assert_eq!(top.1, 21);
    let old = first.id.unwrap();
    let mut stream =
        SseStream::open(gate.addr, "channel=gap", &[("last-event-id", old.as_str())]).await;
    let reset = stream.next_event().await;
    assert_eq!(reset.event.as_deref(), Some("pushgate.reset"), "{reset:?}");
    assert_eq!(
        reset.json(),
        json!({"channel": "gap", "epoch": top.0, "offset": 21})
    );
    assert_eq!(
        reset.cursor().position_of("gap").unwrap(),
        Position::new(Epoch::parse(&top.0).unwrap(), 21),
        "the reset's id continues from now"
    );

    // Live messages continue; nothing from the lost gap is replayed.
    publish(gate.api_addr, "gap", json!("live"), None).await;
    let live = stream.next_event().await;
    assert_eq!(live.event, None, "{live:?}");
    assert_eq!(live.json()["offset"], 22);
    assert_eq!(live.json()["data"], "live");
}

/// Whatever part of a batch each write takes, the stream carries exactly
/// the events, in order: a client with a small receive buffer reads nothing
/// until everything is published, so the node's writes fill its send
/// buffer and stop part-way, then the client reads it all. Batches go as
/// one copy while the socket has room and as vectored writes of their
/// frames once they outgrow it; the property test beside `write_frames`
/// covers every way a write can be split.
#[tokio::test]
async fn sse_events_arrive_whole_and_in_order_through_partial_writes() {
    let (_app, gate) = start("").await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = within("connect", socket.connect(gate.addr)).await.unwrap();
    let (response, sender, task) = send_h1_on(
        tcp,
        gate.addr,
        Method::GET,
        "/realtime/sse?channel=big",
        &[],
    )
    .await;
    let mut stream = SseStream::new(response, sender, Some(task));
    assert_eq!(stream.status, StatusCode::OK);
    stream.opening().await;

    // Sizes from one byte to past the one-copy bound (16 KiB), about 700 KB
    // in all: far more than the client's and the node's socket buffers.
    const SIZES: [usize; 7] = [1, 37, 600, 1500, 4000, 9000, 17000];
    let text = |n: usize| format!("{n}:{}", "x".repeat(SIZES[n % SIZES.len()]));
    const COUNT: usize = 150;
    for n in 0..COUNT {
        publish(gate.api_addr, "big", json!(text(n)), None).await;
    }
    for n in 0..COUNT {
        let event = stream.next_event().await;
        let body = event.json();
        assert_eq!(body["offset"], n as u64 + 1, "event {n}");
        assert!(body["data"] == text(n), "event {n} came altered");
    }
}

#[tokio::test]
async fn sse_sends_keepalive_comments_on_an_idle_stream() {
    let (_app, gate) = start("realtime: {sse: {keepalive: 200ms}}").await;
    let mut stream = SseStream::open(gate.addr, "channel=idle", &[]).await;
    let opened = Instant::now();
    let mut comments = 0;
    while comments < 2 {
        match stream.next_item().await {
            Some(Item::Comment(_)) => comments += 1,
            Some(Item::Retry(_) | Item::Id(_)) => {}
            other => panic!("an idle stream sent {other:?}"),
        }
    }
    // Two ticks of 200 ms, well before the 15 s default.
    assert!(opened.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn sse_refuses_malformed_requests_with_a_reason() {
    let (_app, gate) = start("").await;
    let mut cursor = Cursor::new();
    cursor.set(
        &ChannelName::parse("c").unwrap(),
        Position::new(Epoch::parse("AbCdEfGh").unwrap(), 0),
    );
    let good = cursor.encode();
    // The same cursor is accepted, so the refusal below is the checksum's.
    let accepted =
        SseStream::try_open(gate.addr, "channel=c", &[("last-event-id", good.as_str())]).await;
    assert_eq!(accepted.status, StatusCode::OK);
    drop(accepted);

    let mut altered = good.clone();
    let last = altered.pop().unwrap();
    altered.push(if last == '0' { '1' } else { '0' });
    // (path and query, headers, expected error code)
    type Case<'a> = (String, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "/realtime/sse?channel=c".into(),
            vec![("last-event-id", altered.as_str())],
            "bad_cursor",
        ),
        (
            format!("/realtime/sse?channel=c&last_event_id={altered}"),
            vec![],
            "bad_cursor",
        ),
        (
            "/realtime/sse?channel=no%20spaces".into(),
            vec![],
            "bad_channel",
        ),
        ("/realtime/sse?channel=".into(), vec![], "bad_channel"),
        ("/realtime/sse".into(), vec![], "missing_channel"),
        (
            "/realtime/sse?channel=c&colour=red".into(),
            vec![],
            "bad_query",
        ),
        (
            "/realtime/sse?channel=c&since=x".into(),
            vec![],
            "bad_query",
        ),
    ];
    for (path, headers, code) in cases {
        let answer = fetch(gate.addr, Method::GET, &path, &headers).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{path}: {}",
            answer.text
        );
        assert_eq!(answer.code(), code, "{path}: {}", answer.text);
        assert!(
            answer.json()["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{path}: {}",
            answer.text
        );
    }

    let post = fetch(gate.addr, Method::POST, "/realtime/sse?channel=c", &[]).await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED, "{}", post.text);
    assert_eq!(post.code(), "method_not_allowed");
    assert!(post.header("allow").is_some_and(|a| a.contains("GET")));
}

#[tokio::test]
async fn sse_and_poll_check_the_origin_and_answer_cors() {
    // Default: only the request's own host.
    let (_app, gate) = start("").await;
    for path in [
        "/realtime/sse?channel=o",
        "/realtime/poll?channel=o&timeout=0",
    ] {
        let evil = fetch(
            gate.addr,
            Method::GET,
            path,
            &[("origin", "http://evil.example")],
        )
        .await;
        assert_eq!(evil.status, StatusCode::FORBIDDEN, "{path}: {}", evil.text);
        assert_eq!(evil.code(), "origin_not_allowed");
    }
    let own = format!("http://{}", gate.addr);
    let same = SseStream::try_open(gate.addr, "channel=o", &[("origin", own.as_str())]).await;
    assert_eq!(same.status, StatusCode::OK, "a same-host Origin is allowed");
    drop(same);
    let poll = fetch(
        gate.addr,
        Method::GET,
        "/realtime/poll?channel=o&timeout=0",
        &[("origin", own.as_str())],
    )
    .await;
    assert_eq!(poll.status, StatusCode::OK, "{}", poll.text);

    // Configured origins.
    let (_app2, gate) = start("realtime: {allowed_origins: [\"http://app.example\"]}").await;
    let app = [("origin", "http://app.example")];
    let stream = SseStream::try_open(gate.addr, "channel=o", &app).await;
    assert_eq!(stream.status, StatusCode::OK);
    assert_eq!(
        stream.header("access-control-allow-origin"),
        Some("http://app.example")
    );
    drop(stream);
    let poll = fetch(
        gate.addr,
        Method::GET,
        "/realtime/poll?channel=o&timeout=0",
        &app,
    )
    .await;
    assert_eq!(poll.status, StatusCode::OK, "{}", poll.text);
    assert_eq!(
        poll.header("access-control-allow-origin"),
        Some("http://app.example")
    );
    let evil = fetch(
        gate.addr,
        Method::GET,
        "/realtime/sse?channel=o",
        &[("origin", "http://evil.example")],
    )
    .await;
    assert_eq!(evil.status, StatusCode::FORBIDDEN);
    assert_eq!(evil.header("access-control-allow-origin"), None);

    for path in ["/realtime/sse?channel=o", "/realtime/poll?channel=o"] {
        let preflight = fetch(
            gate.addr,
            Method::OPTIONS,
            path,
            &[
                ("origin", "http://app.example"),
                ("access-control-request-method", "GET"),
                ("access-control-request-headers", "last-event-id"),
            ],
        )
        .await;
        assert_eq!(preflight.status, StatusCode::NO_CONTENT, "{path}");
        assert!(
            preflight
                .header("access-control-allow-methods")
                .is_some_and(|m| m.contains("GET")),
            "{path}: {:?}",
            preflight.headers
        );
        assert_eq!(
            preflight.header("access-control-allow-origin"),
            Some("http://app.example")
        );
        assert!(preflight
            .header("access-control-allow-headers")
            .is_some_and(|h| h.to_ascii_lowercase().contains("last-event-id")));
        let refused = fetch(
            gate.addr,
            Method::OPTIONS,
            path,
            &[("origin", "http://evil.example")],
        )
        .await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{path}");
    }
}

#[tokio::test]
async fn sse_stream_ends_with_a_retry_at_shutdown() {
    let (_app, mut gate) = start("").await;
    let mut stream = SseStream::open(gate.addr, "channel=bye", &[]).await;
    stream.opening().await;
    let done = gate.shutdown();
    match stream.next_item().await {
        // Jittered in [retry/2, retry] so clients do not all come back at once.
        Some(Item::Retry(millis)) => assert!((1000..=2000).contains(&millis), "retry {millis}"),
        other => panic!("expected a final retry line, got {other:?}"),
    }
    assert_eq!(stream.next_item().await, None, "the body completes");
    within("shutdown", done).await.unwrap().unwrap();
}

#[tokio::test]
async fn sse_works_over_http2() {
    let (_app, gate) = start("").await;
    let tcp = within("connect", TcpStream::connect(gate.addr))
        .await
        .unwrap();
    let (mut sender, connection) = within(
        "h2 handshake",
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)),
    )
    .await
    .unwrap();
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = Request::get(format!("http://{}/realtime/sse?channel=h2", gate.addr))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = within("h2 SSE headers", sender.send_request(request))
        .await
        .unwrap();
    let mut stream = SseStream::new(response, Box::new(()), Some(task));
    assert_eq!(stream.version, Version::HTTP_2);
    assert_eq!(stream.status, StatusCode::OK);
    assert_eq!(stream.header("content-type"), Some("text/event-stream"));
    stream.opening().await;

    // The same connection carries a long-poll beside the open stream.
    let request = Request::get(format!(
        "http://{}/realtime/poll?channel=h2&timeout=0",
        gate.addr
    ))
    .body(Empty::<Bytes>::new())
    .unwrap();
    let poll = within("h2 poll", sender.send_request(request))
        .await
        .unwrap();
    assert_eq!(poll.status(), StatusCode::OK);

    let (epoch, offset) = publish(gate.api_addr, "h2", json!("over h2"), Some("note")).await;
    let event = stream.next_event().await;
    assert_eq!(event.event.as_deref(), Some("note"));
    assert_eq!(
        event.json(),
        json!({"channel": "h2", "epoch": epoch, "offset": offset, "event": "note", "data": "over h2"})
    );
}

#[tokio::test]
async fn sse_connections_per_address_are_limited() {
    let (_app, gate) = start("realtime: {max_connections_per_ip: 2}").await;
    let first = SseStream::open(gate.addr, "channel=lim", &[]).await;
    let _second = SseStream::open(gate.addr, "channel=lim", &[]).await;
    let third = fetch(gate.addr, Method::GET, "/realtime/sse?channel=lim", &[]).await;
    assert_eq!(
        third.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        third.text
    );
    assert_eq!(third.code(), "too_many_connections");
    let poll = fetch(
        gate.addr,
        Method::GET,
        "/realtime/poll?channel=lim&timeout=0",
        &[],
    )
    .await;
    assert_eq!(
        poll.status,
        StatusCode::TOO_MANY_REQUESTS,
        "long-poll shares the limit"
    );

    // Closing one frees its slot once pushgate has seen the close.
    drop(first);
    wait_metric(&gate, SSE_CONNECTIONS, 1).await;
    let mut again = SseStream::open(gate.addr, "channel=lim", &[]).await;
    again.opening().await;
}

#[tokio::test]
async fn metrics_count_open_sse_streams() {
    let (_app, gate) = start("").await;
    assert_eq!(metric(&gate, SSE_CONNECTIONS).await, 0);
    let mut stream = SseStream::open(gate.addr, "channel=m", &[]).await;
    stream.opening().await;
    assert_eq!(metric(&gate, SSE_CONNECTIONS).await, 1);
    assert_eq!(
        metric(&gate, "pushgate_subscriptions{transport=\"sse\"}").await,
        1
    );
    drop(stream);
    wait_metric(&gate, SSE_CONNECTIONS, 0).await;
    wait_metric(&gate, "pushgate_subscriptions{transport=\"sse\"}", 0).await;
}

// ------------------------------------------------------------ long-poll

/// One long-poll; returns the status, the JSON answer and how long it took.
async fn poll(gate: &Pushgate, query: &str) -> (StatusCode, Value, Duration) {
    let started = Instant::now();
    let answer = fetch(
        gate.addr,
        Method::GET,
        &format!("/realtime/poll?{query}"),
        &[],
    )
    .await;
    let took = started.elapsed();
    if answer.status == StatusCode::OK {
        assert_eq!(answer.header("content-type"), Some("application/json"));
        let body = answer.json();
        assert!(body["messages"].is_array(), "{body}");
        assert!(body["reset"].is_array(), "{body}");
        Cursor::decode(body["cursor"].as_str().expect("a cursor")).expect("the cursor decodes");
        (answer.status, body, took)
    } else {
        let body = answer.json();
        (answer.status, body, took)
    }
}

fn cursor_of(body: &Value) -> String {
    body["cursor"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn poll_starts_from_now_waits_and_returns_at_once_on_a_publish() {
    let (_app, gate) = start("").await;
    // Already published: a poll without `since` does not see it.
    publish(gate.api_addr, "lp", json!("old"), None).await;
    let (status, body, took) = poll(&gate, "channel=lp&timeout=1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["messages"], json!([]), "{body}");
    assert_eq!(body["reset"], json!([]), "{body}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "timeout=1 answered after {took:?}"
    );
    let cursor = cursor_of(&body);
    assert_eq!(
        Cursor::decode(&cursor)
            .unwrap()
            .position_of("lp")
            .unwrap()
            .offset,
        1,
        "the cursor stands at the top of the stream"
    );

    // A waiting poll answers when something is published.
    let query = format!("channel=lp&timeout=10&since={cursor}");
    let waiting = {
        let addr = gate.addr;
        tokio::spawn(async move {
            let answer = fetch(addr, Method::GET, &format!("/realtime/poll?{query}"), &[]).await;
            (answer.status, answer.json(), Instant::now())
        })
    };
    wait_metric(&gate, POLL_CONNECTIONS, 1).await;
    let published_at = Instant::now();
    let (epoch, offset) = publish(gate.api_addr, "lp", json!({"n": 2}), Some("tick")).await;
    let (status, body, answered_at) = within("the waiting poll", waiting).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        answered_at.duration_since(published_at) < Duration::from_secs(5),
        "answered {:?} after the publish, not at once",
        answered_at.duration_since(published_at)
    );
    assert_eq!(
        body["messages"],
        json!([{"channel": "lp", "epoch": epoch, "offset": offset, "event": "tick", "data": {"n": 2}}])
    );
    assert_eq!(body["reset"], json!([]));
    assert_eq!(
        Cursor::decode(&cursor_of(&body))
            .unwrap()
            .position_of("lp")
            .unwrap(),
        Position::new(Epoch::parse(&epoch).unwrap(), offset)
    );
    wait_metric(&gate, POLL_CONNECTIONS, 0).await;
}

#[tokio::test]
async fn poll_loop_gets_every_message_once_in_order() {
    let (_app, gate) = start("history: {size: 1000}").await;
    const TOTAL: u64 = 300;
    // timeout=0 answers at once with where the stream stands.
    let (status, body, _) = poll(&gate, "channel=loop&timeout=0").await;
    assert_eq!(status, StatusCode::OK);
    let mut cursor = cursor_of(&body);

    let (publisher, _published) =
        spawn_publisher(gate.api_addr, "loop", TOTAL, Duration::from_millis(3));
    let mut got = Vec::new();
    let mut polls = 0;
    let deadline = Instant::now() + 2 * WAIT;
    while got.len() < TOTAL as usize {
        assert!(
            Instant::now() < deadline,
            "only {} of {TOTAL} messages arrived: {got:?}",
            got.len()
        );
        let (status, body, _) =
            poll(&gate, &format!("channel=loop&timeout=5&since={cursor}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["reset"], json!([]), "{body}");
        for envelope in body["messages"].as_array().unwrap() {
            assert_eq!(envelope["channel"], "loop");
            let n = envelope["data"].as_u64().unwrap();
            assert_eq!(envelope["offset"].as_u64(), Some(n + 1), "{envelope}");
            got.push(n);
        }
        cursor = cursor_of(&body);
        polls += 1;
        assert!(got.len() <= TOTAL as usize, "more messages than published");
    }
    within("the publisher", publisher).await.unwrap();
    assert_eq!(
        got,
        (0..TOTAL).collect::<Vec<_>>(),
        "every message once, in order"
    );
    assert!(polls > 1, "the loop polled while publishes went on");
    // Nothing further is pending.
    let (_, body, _) = poll(&gate, &format!("channel=loop&timeout=0&since={cursor}")).await;
    assert_eq!(body["messages"], json!([]), "{body}");
}

#[tokio::test]
async fn poll_announces_a_gap_older_than_history() {
    let (_app, gate) = start("history: {size: 5}").await;
    let (_, body, _) = poll(&gate, "channel=lgap&timeout=0").await;
    let start_cursor = cursor_of(&body);
    publish(gate.api_addr, "lgap", json!(0), None).await;
    let (_, body, _) = poll(
        &gate,
        &format!("channel=lgap&timeout=5&since={start_cursor}"),
    )
    .await;
    assert_eq!(body["messages"].as_array().unwrap().len(), 1, "{body}");
    let old = cursor_of(&body);

    let mut top = (String::new(), 0);
    for n in 1..=20 {
        top = publish(gate.api_addr, "lgap", json!(n), None).await;
    }
    let (status, body, took) = poll(&gate, &format!("channel=lgap&timeout=10&since={old}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(took < Duration::from_secs(5), "a reset answers at once");
    assert_eq!(
        body["reset"],
        json!([{"channel": "lgap", "epoch": top.0, "offset": 21}]),
        "{body}"
    );
    for envelope in body["messages"].as_array().unwrap() {
        assert!(
            envelope["offset"].as_u64().unwrap() > 21,
            "a message from the lost gap: {envelope}"
        );
    }
    let cursor = cursor_of(&body);
    assert_eq!(
        Cursor::decode(&cursor)
            .unwrap()
            .position_of("lgap")
            .unwrap(),
        Position::new(Epoch::parse(&top.0).unwrap(), 21)
    );

    // From the reset on, it continues.
    publish(gate.api_addr, "lgap", json!("live"), None).await;
    let (_, body, _) = poll(&gate, &format!("channel=lgap&timeout=5&since={cursor}")).await;
    assert_eq!(body["reset"], json!([]), "{body}");
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1, "{body}");
    assert_eq!(messages[0]["offset"], 22);
    assert_eq!(messages[0]["data"], "live");
}

#[tokio::test]
async fn poll_refuses_malformed_input_and_caps_the_timeout() {
    let (_app, gate) = start("realtime: {poll: {max_timeout: 1s, default_timeout: 1s}}").await;
    for timeout in ["abc", "-1", "1.5", "", "+3", "99999999999999999999999"] {
        let (status, body, _) = poll(&gate, &format!("channel=p&timeout={timeout}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "timeout={timeout}: {body}");
        assert_eq!(
            body["error"]["code"], "bad_timeout",
            "timeout={timeout}: {body}"
        );
    }
    let mut cursor = Cursor::new();
    cursor.set(
        &ChannelName::parse("p").unwrap(),
        Position::new(Epoch::parse("AbCdEfGh").unwrap(), 0),
    );
    let mut altered = cursor.encode();
    let last = altered.pop().unwrap();
    altered.push(if last == '0' { '1' } else { '0' });
    for since in [altered.as_str(), "garbage", "AbCdEfGh:3"] {
        let (status, body, _) = poll(&gate, &format!("channel=p&timeout=0&since={since}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "since={since}: {body}");
        assert_eq!(body["error"]["code"], "bad_cursor", "since={since}: {body}");
    }
    for (query, code) in [
        ("timeout=0", "missing_channel"),
        ("channel=a%2Ab&timeout=0", "bad_channel"),
        ("channel=p&last_event_id=x", "bad_query"),
        ("channel=p&timeout=0&timeout=1", "bad_query"),
    ] {
        let (status, body, _) = poll(&gate, query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(body["error"]["code"], code, "{query}: {body}");
    }
    let post = fetch(gate.addr, Method::POST, "/realtime/poll?channel=p", &[]).await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);

    // timeout=30 is capped at max_timeout (1 s).
    let (status, body, took) = poll(&gate, "channel=p&timeout=30").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["messages"], json!([]));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "timeout=30 with max_timeout 1s answered after {took:?}"
    );
}

#[tokio::test]
async fn a_waiting_poll_answers_at_once_when_shutdown_begins() {
    let (_app, mut gate) = start("").await;
    let waiting = {
        let addr = gate.addr;
        tokio::spawn(async move {
            let answer = fetch(
                addr,
                Method::GET,
                "/realtime/poll?channel=sd&timeout=30",
                &[],
            )
            .await;
            (answer.status, answer.json(), Instant::now())
        })
    };
    wait_metric(&gate, POLL_CONNECTIONS, 1).await;
    let began = Instant::now();
    let done = gate.shutdown();
    let (status, body, answered_at) = within("the waiting poll", waiting).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["messages"], json!([]), "{body}");
    assert_eq!(body["reset"], json!([]), "{body}");
    assert!(
        answered_at.duration_since(began) < Duration::from_secs(3),
        "answered {:?} after shutdown began",
        answered_at.duration_since(began)
    );
    within("shutdown", done).await.unwrap().unwrap();
}

// ------------------------------------------------------------ resume edge cases

#[tokio::test]
async fn sse_ids_advance_one_event_at_a_time_during_a_replay() {
    let (_app, gate) = start("").await;
    let query = "channel=rp:a&channel=rp:b";
    let mut stream = SseStream::open(gate.addr, query, &[]).await;
    publish(gate.api_addr, "rp:a", json!(1), None).await;
    publish(gate.api_addr, "rp:b", json!(1), None).await;
    let mut seen: Vec<(String, u64)> = Vec::new();
    let mut last = None;
    for _ in 0..2 {
        let event = stream.next_event().await;
        let envelope = event.json();
        seen.push((
            envelope["channel"].as_str().unwrap().to_owned(),
            envelope["data"].as_u64().unwrap(),
        ));
        last = event.id;
    }
    drop(stream);
    for n in 2..=6 {
        publish(gate.api_addr, "rp:a", json!(n), None).await;
        publish(gate.api_addr, "rp:b", json!(n), None).await;
    }

    // Resume, drop in the middle of the replay, resume again from the last
    // id read: an id must never claim more than was delivered.
    for take in [3, 7] {
        let id = last.clone().unwrap();
        let mut stream = SseStream::open(gate.addr, query, &[("last-event-id", id.as_str())]).await;
        for _ in 0..take {
            let event = stream.next_event().await;
            assert_eq!(event.event, None, "{event:?}");
            let envelope = event.json();
            let channel = envelope["channel"].as_str().unwrap().to_owned();
            let n = envelope["data"].as_u64().unwrap();
            assert_eq!(envelope["offset"].as_u64(), Some(n), "{envelope}");
            seen.push((channel, n));
            let cursor = event.cursor();
            for name in ["rp:a", "rp:b"] {
                let delivered = seen
                    .iter()
                    .filter(|(c, _)| c == name)
                    .map(|&(_, n)| n)
                    .max()
                    .unwrap_or(0);
                assert_eq!(
                    cursor.position_of(name).unwrap().offset,
                    delivered,
                    "the id after {envelope} names {name} at what was delivered"
                );
            }
            last = event.id;
        }
    }
    let of = |name: &str| -> Vec<u64> {
        seen.iter()
            .filter(|(c, _)| c == name)
            .map(|&(_, n)| n)
            .collect()
    };
    assert_eq!(of("rp:a"), (1..=6).collect::<Vec<_>>());
    assert_eq!(of("rp:b"), (1..=6).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_cursor_from_another_epoch_or_ahead_of_the_stream_is_reset() {
    let (_app, gate) = start("").await;
    let mut top = (String::new(), 0);
    for n in 1..=3 {
        top = publish(gate.api_addr, "ep", json!(n), None).await;
    }
    let epoch = Epoch::parse(&top.0).unwrap();
    let other = Epoch::parse(if top.0 == "Zz9Zz9Zz" {
        "Yy8Yy8Yy"
    } else {
        "Zz9Zz9Zz"
    })
    .unwrap();
    // Read the cursor through SSE and long-poll: the reset each gives.
    let resets = |position: Position| {
        let gate = &gate;
        async move {
            let mut cursor = Cursor::new();
            cursor.set(&ChannelName::parse("ep").unwrap(), position);
            let cursor = cursor.encode();
            let mut stream = SseStream::open(
                gate.addr,
                "channel=ep",
                &[("last-event-id", cursor.as_str())],
            )
            .await;
            let event = stream.next_event().await;
            assert_eq!(event.event.as_deref(), Some("pushgate.reset"), "{event:?}");
            drop(stream);
            let (status, body, took) =
                poll(gate, &format!("channel=ep&timeout=10&since={cursor}")).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body["messages"], json!([]), "{body}");
            assert!(took < Duration::from_secs(5), "a reset answers at once");
            (event.json(), body["reset"].clone())
        }
    };

    let (sse, polled) = resets(Position::new(other, 2)).await;
    let reset = json!({"channel": "ep", "epoch": top.0, "offset": 3});
    assert_eq!(sse, reset, "another epoch");
    assert_eq!(polled, json!([reset]), "another epoch");

    // Offset 0 is "before the first publication" in any epoch: no reset.
    let mut cursor = Cursor::new();
    cursor.set(&ChannelName::parse("ep").unwrap(), Position::new(other, 0));
    let cursor = cursor.encode();
    let mut stream = SseStream::open(
        gate.addr,
        "channel=ep",
        &[("last-event-id", cursor.as_str())],
    )
    .await;
    for n in 1..=3 {
        let event = stream.next_event().await;
        assert_eq!(event.event, None, "{event:?}");
        assert_eq!(event.json()["data"], n);
    }
    let (_, body, _) = poll(&gate, &format!("channel=ep&timeout=0&since={cursor}")).await;
    assert_eq!(body["reset"], json!([]), "{body}");
    let data: Vec<&Value> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["data"])
        .collect();
    assert_eq!(data, [&json!(1), &json!(2), &json!(3)], "{body}");

    // Ahead of the stream: the store lost data, so the epoch moves and the
    // offsets the reader claims are never handed out again in it.
    let (sse, polled) = resets(Position::new(epoch, 50)).await;
    assert_eq!(sse["offset"], 3, "{sse}");
    assert_ne!(sse["epoch"], json!(top.0), "a new epoch: {sse}");
    assert_eq!(polled, json!([sse]), "both transports agree");
}

#[tokio::test]
async fn a_same_host_origin_is_allowed_over_http2() {
    let (_app, gate) = start("").await;
    let tcp = within("connect", TcpStream::connect(gate.addr))
        .await
        .unwrap();
    let (mut sender, connection) = within(
        "h2 handshake",
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)),
    )
    .await
    .unwrap();
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    // HTTP/2 has no Host header: the host is the :authority.
    let request = Request::get(format!(
        "http://{}/realtime/poll?channel=h2o&timeout=0",
        gate.addr
    ))
    .header("origin", format!("http://{}", gate.addr))
    .body(Empty::<Bytes>::new())
    .unwrap();
    let response = within("h2 poll", sender.send_request(request))
        .await
        .unwrap();
    let status = response.status();
    let body = within("h2 poll body", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    task.abort();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
}

#[tokio::test]
async fn sse_messages_closer_than_the_coalesce_window_wait_for_it_and_arrive_in_order() {
    let window = Duration::from_millis(600);
    let (_app, gate) = start("realtime:\n  coalesce_window: 600ms\n").await;
    let mut stream = SseStream::open(gate.addr, "channel=c", &[]).await;
    stream.opening().await;

    // The first message after a quiet spell goes out at once…
    let start = std::time::Instant::now();
    publish(gate.api_addr, "c", json!(1), None).await;
    assert_eq!(stream.next_event().await.json()["data"], 1);
    // …the next ones, published right after, wait until a window has
    // passed since that write, and then come together in order.
    publish(gate.api_addr, "c", json!(2), None).await;
    publish(gate.api_addr, "c", json!(3), None).await;
    assert_eq!(stream.next_event().await.json()["data"], 2);
    assert!(
        start.elapsed() >= window,
        "the second message came {:?} after the first was published, inside the window",
        start.elapsed()
    );
    assert_eq!(stream.next_event().await.json()["data"], 3);
}

/// On HTTP/1 the stream is written by pushgate itself once its head is out:
/// the body ends with the connection (no chunk framing), and a stream that
/// follows an ordinary request on a kept-alive connection works the same.
#[tokio::test]
async fn sse_after_a_request_on_a_kept_alive_connection_streams_to_the_end_of_it() {
    let (_app, gate) = start("").await;
    let (mut sender, task) = connect_h1(gate.addr).await;
    let get = |path: &str| {
        Request::get(path)
            .header(http::header::HOST, "x")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };

    let first = within("the app's answer", sender.send_request(get("/hello")))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    within("the app's body", first.into_body().collect())
        .await
        .unwrap();

    let response = within(
        "the stream's head",
        sender.send_request(get("/realtime/sse?channel=k")),
    )
    .await
    .unwrap();
    let mut stream = SseStream::new(response, Box::new(sender), Some(task));
    assert_eq!(stream.status, StatusCode::OK);
    assert_eq!(stream.header("content-type"), Some("text/event-stream"));
    if common::fast_path_on("SSE_DETACH") {
        // Written by pushgate itself, outside hyper: the stream ends with
        // the connection.
        assert_eq!(stream.header("connection"), Some("close"));
        assert_eq!(stream.header("transfer-encoding"), None);
    }
    stream.opening().await;

    publish(gate.api_addr, "k", json!("after keep-alive"), None).await;
    assert_eq!(stream.next_event().await.json()["data"], "after keep-alive");
}

/// With `fast_paths.sse_detach` off, an HTTP/1 stream stays in hyper: a
/// chunked body on a kept-alive connection, with the same events.
#[tokio::test]
async fn with_sse_detach_off_a_stream_goes_through_hyper() {
    let (_app, gate) = start("fast_paths: {sse_detach: false}\n").await;
    let (mut sender, task) = connect_h1(gate.addr).await;
    let request = Request::get("/realtime/sse?channel=plain")
        .header(http::header::HOST, "x")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = within("the stream's head", sender.send_request(request))
        .await
        .unwrap();
    let mut stream = SseStream::new(response, Box::new(sender), Some(task));
    assert_eq!(stream.status, StatusCode::OK);
    assert_eq!(stream.header("transfer-encoding"), Some("chunked"));
    assert_eq!(stream.header("connection"), None);
    stream.opening().await;
    publish(gate.api_addr, "plain", json!("through hyper"), None).await;
    assert_eq!(stream.next_event().await.json()["data"], "through hyper");
}

/// What an SSE client has not read is bounded by what pushgate counts: its
/// session's queue (`limits.queue_bytes`), the bytes the kernel may hold
/// unsent (`limits.unsent_bytes`) and the client's own receive buffer. A
/// client that stops reading is cut off as a slow consumer once those are
/// full, not after the kernel has grown the socket's send buffer toward
/// its maximum unseen (3.2 MB here with `unsent_bytes: 0`).
#[tokio::test]
async fn a_stream_that_stops_reading_is_cut_off_within_the_queue_and_the_unsent_bound() {
    let bound = StalledReader::SMALL;
    let (_app, gate) = start(&bound.config()).await;
    let (mut stream, receive_buffer) = StalledReader::connect(gate.addr).await;
    tokio::io::AsyncWriteExt::write_all(
        &mut stream,
        b"GET /realtime/sse?channel=stalled HTTP/1.1\r\nHost: app\r\n\r\n",
    )
    .await
    .unwrap();
    wait_metric(&gate, "pushgate_subscriptions{transport=\"sse\"}", 1).await;
    bound
        .publish_until_cut(gate.api_addr, "stalled", receive_buffer)
        .await;
    drop(stream);
}
