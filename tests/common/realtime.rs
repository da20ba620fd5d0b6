//! Clients of the three realtime transports for tests that check exactly
//! what a client is handed across reconnects: a long-poller, an SSE reader
//! and a WebSocket subscriber, each turning what it reads into [`Got`]
//! items, in the order a client would act on them. Failures (a refused
//! request, a cut connection) are returned, not panicked on, so a test can
//! play a client that reconnects through outages and shutdowns.

use std::collections::VecDeque;
use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use pushgate::cursor::{Cursor, Epoch, Position};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// What a client was handed: a publication or an explicit reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    Message {
        channel: String,
        epoch: String,
        offset: u64,
        data: Value,
    },
    /// History could not cover the gap: the client goes on from here.
    Reset {
        channel: String,
        epoch: String,
        offset: u64,
    },
}

impl Got {
    /// An envelope (`{"channel","epoch","offset","data"}`).
    pub fn message(envelope: &Value) -> Result<Got, String> {
        Ok(Got::Message {
            channel: text_field(envelope, "channel")?,
            epoch: text_field(envelope, "epoch")?,
            offset: offset_field(envelope)?,
            data: envelope
                .get("data")
                .cloned()
                .ok_or_else(|| format!("an envelope without data: {envelope}"))?,
        })
    }

    /// A reset (`{"channel","epoch","offset"}`, with or without `op`).
    pub fn reset(reset: &Value) -> Result<Got, String> {
        Ok(Got::Reset {
            channel: text_field(reset, "channel")?,
            epoch: text_field(reset, "epoch")?,
            offset: offset_field(reset)?,
        })
    }

    pub fn channel(&self) -> &str {
        match self {
            Got::Message { channel, .. } | Got::Reset { channel, .. } => channel,
        }
    }

    /// Where the client stands on its channel once it has taken this.
    pub fn position(&self) -> Position {
        let (epoch, offset) = match self {
            Got::Message { epoch, offset, .. } | Got::Reset { epoch, offset, .. } => {
                (epoch, *offset)
            }
        };
        Position::new(
            Epoch::parse(epoch).expect("pushgate sent a valid epoch"),
            offset,
        )
    }
}

fn text_field(value: &Value, name: &str) -> Result<String, String> {
    value
        .get(name)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| format!("no `{name}` string in {value}"))
}

fn offset_field(value: &Value) -> Result<u64, String> {
    value
        .get("offset")
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("no `offset` number in {value}"))
}

/// "Before the first publication" on every channel: valid in any epoch, so
/// a client holding it is owed everything the channels' history holds.
pub fn cursor_from_start(channels: &[&str]) -> String {
    let mut cursor = Cursor::new();
    for channel in channels {
        let channel = pushgate::message::ChannelName::parse(channel).expect("a valid channel");
        cursor.set(&channel, start_position());
    }
    cursor.encode()
}

/// Offset 0 in an arbitrary epoch.
pub fn start_position() -> Position {
    Position::new(Epoch::parse("start").unwrap(), 0)
}

/// The query naming `channels` (`channel=a&channel=b`).
pub fn channel_query(channels: &[&str]) -> String {
    channels
        .iter()
        .map(|c| format!("channel={c}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// A failed exchange: the status and body of an HTTP refusal, a WebSocket
/// command's error, the close code of a closed WebSocket, or why the
/// connection failed.
#[derive(Debug, Clone)]
pub enum Failure {
    Refused(StatusCode, String),
    Error(Value),
    Closed(u16),
    Broken(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused(status, body) => write!(f, "answered {status}: {body}"),
            Failure::Error(error) => write!(f, "the command failed: {error}"),
            Failure::Closed(code) => write!(f, "closed with {code}"),
            Failure::Broken(why) => write!(f, "connection failed: {why}"),
        }
    }
}

/// A request on an HTTP/1.1 connection of its own; the connection's task
/// is returned so dropping it closes the socket.
async fn send_alone(
    addr: SocketAddr,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> Result<(hyper::Response<Incoming>, JoinHandle<()>), Failure> {
    let broken = |err: &dyn std::fmt::Display| Failure::Broken(err.to_string());
    let tcp = TcpStream::connect(addr).await.map_err(|e| broken(&e))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| broken(&e))?;
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut request = Request::get(path_and_query).header(http::header::HOST, addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Empty::<Bytes>::new()).unwrap();
    match sender.send_request(request).await {
        Ok(response) => Ok((response, task)),
        Err(err) => {
            task.abort();
            Err(broken(&err))
        }
    }
}

/// A long-poll answer: what it handed over, in order, and the next cursor.
#[derive(Debug, Clone)]
pub struct Polled {
    pub got: Vec<Got>,
    pub cursor: String,
    /// The answer said `Connection: close`.
    pub closes: bool,
}

/// One long-poll of `channels` from `cursor` (from now without one), on a
/// connection of its own.
pub async fn poll(
    addr: SocketAddr,
    channels: &[&str],
    cursor: Option<&str>,
    timeout_secs: u64,
) -> Result<Polled, Failure> {
    let mut path = format!(
        "/realtime/poll?{}&timeout={timeout_secs}",
        channel_query(channels)
    );
    if let Some(cursor) = cursor {
        path.push_str("&since=");
        path.push_str(cursor);
    }
    let (response, task) = send_alone(addr, &path, &[]).await?;
    let status = response.status();
    let closes = response
        .headers()
        .get(http::header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let body = response.into_body().collect().await;
    task.abort();
    let body = body
        .map_err(|err| Failure::Broken(err.to_string()))?
        .to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    if status != StatusCode::OK {
        return Err(Failure::Refused(status, text));
    }
    let mut polled =
        parse_poll_answer(&text).map_err(|why| Failure::Broken(format!("{why}: {text}")))?;
    polled.closes = closes;
    Ok(polled)
}

/// Orders a poll answer's resets among its messages: a reset of a channel
/// comes before that channel's first message past it.
pub fn parse_poll_answer(text: &str) -> Result<Polled, String> {
    let body: Value = serde_json::from_str(text).map_err(|err| err.to_string())?;
    let cursor = body["cursor"]
        .as_str()
        .ok_or("an answer without a cursor")?
        .to_owned();
    let mut got = body["messages"]
        .as_array()
        .ok_or("an answer without messages")?
        .iter()
        .map(Got::message)
        .collect::<Result<Vec<_>, _>>()?;
    for reset in body["reset"].as_array().ok_or("an answer without reset")? {
        let reset = Got::reset(reset)?;
        let at = reset.position();
        let index = got
            .iter()
            .position(|g| {
                g.channel() == reset.channel()
                    && matches!(g, Got::Message { .. })
                    && (g.position().epoch != at.epoch || g.position().offset > at.offset)
            })
            .unwrap_or(got.len());
        got.insert(index, reset);
    }
    Ok(Polled {
        got,
        cursor,
        closes: false,
    })
}

/// An open SSE stream on a connection of its own.
pub struct Sse {
    body: Incoming,
    task: JoinHandle<()>,
    buffer: Vec<u8>,
    /// Lines of the event being read.
    event: Option<String>,
    data: Option<String>,
    id: Option<String>,
    ready: VecDeque<(Option<Got>, Option<String>)>,
}

impl Drop for Sse {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sse {
    /// Opens `/realtime/sse` for `channels`, resuming from `last_event_id`.
    pub async fn open(
        addr: SocketAddr,
        channels: &[&str],
        last_event_id: Option<&str>,
    ) -> Result<Sse, Failure> {
        let path = format!("/realtime/sse?{}", channel_query(channels));
        let headers: Vec<(&str, &str)> = last_event_id
            .map(|id| vec![("last-event-id", id)])
            .unwrap_or_default();
        let (response, task) = send_alone(addr, &path, &headers).await?;
        let status = response.status();
        if status != StatusCode::OK {
            let body = response.into_body().collect().await;
            task.abort();
            let text = body
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            return Err(Failure::Refused(status, text));
        }
        Ok(Sse {
            body: response.into_body(),
            task,
            buffer: Vec::new(),
            event: None,
            data: None,
            id: None,
            ready: VecDeque::new(),
        })
    }

    /// The next dispatched block: what it handed over (none for a block
    /// with only an id) and its `id:`, which a browser keeps as the last
    /// event id. `Ok(None)` when the stream ended.
    pub async fn next(&mut self) -> Result<Option<(Option<Got>, Option<String>)>, Failure> {
        loop {
            if let Some(block) = self.ready.pop_front() {
                return Ok(Some(block));
            }
            let Some(frame) = self.body.frame().await else {
                return Ok(None);
            };
            let frame = frame.map_err(|err| Failure::Broken(err.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            self.buffer.extend_from_slice(&data);
            while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let raw: Vec<u8> = self.buffer.drain(..=end).collect();
                let line = String::from_utf8_lossy(&raw[..end])
                    .trim_end_matches('\r')
                    .to_owned();
                self.line(&line).map_err(Failure::Broken)?;
            }
        }
    }

    fn line(&mut self, line: &str) -> Result<(), String> {
        if line.is_empty() {
            let (event, data, id) = (self.event.take(), self.data.take(), self.id.take());
            let got = match (event.as_deref(), data) {
                (_, None) => None,
                (Some("pushgate.reset"), Some(data)) => Some(Got::reset(
                    &serde_json::from_str(&data).map_err(|e| e.to_string())?,
                )?),
                (_, Some(data)) => Some(Got::message(
                    &serde_json::from_str(&data).map_err(|e| e.to_string())?,
                )?),
            };
            if got.is_some() || id.is_some() {
                self.ready.push_back((got, id));
            }
            return Ok(());
        }
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "retry" => {}
            "event" => self.event = Some(value.to_owned()),
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            "id" => self.id = Some(value.to_owned()),
            other => return Err(format!("unknown SSE field {other:?} in {line:?}")),
        }
        Ok(())
    }
}

/// A WebSocket connection to `/realtime/ws`.
pub struct Ws {
    socket: super::WsClient,
    next_id: u64,
}

/// What a WebSocket subscribe answered.
#[derive(Debug, Clone)]
pub struct WsSubscribed {
    pub recovered: bool,
    pub position: Position,
}

impl Ws {
    pub async fn connect(addr: SocketAddr) -> Result<Ws, Failure> {
        let url = format!("ws://{addr}/realtime/ws");
        let (socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .map_err(|err| Failure::Broken(err.to_string()))?;
        Ok(Ws { socket, next_id: 1 })
    }

    /// Subscribes to `channel` from `since` (from now without it). What
    /// arrives before the reply (another channel's publications) is handed
    /// to `early`, in order.
    pub async fn subscribe(
        &mut self,
        channel: &str,
        since: Option<Position>,
        early: &mut Vec<Got>,
    ) -> Result<WsSubscribed, Failure> {
        let id = self.next_id;
        self.next_id += 1;
        let mut command = json!({"id": id, "op": "subscribe", "channel": channel});
        if let Some(since) = since {
            command["since"] = json!(since.to_string());
        }
        self.socket
            .send(Message::text(command.to_string()))
            .await
            .map_err(|err| Failure::Broken(err.to_string()))?;
        loop {
            let value = self.next_json().await?;
            if value.get("id") == Some(&json!(id)) {
                if let Some(error) = value.get("error") {
                    return Err(Failure::Error(error.clone()));
                }
                let result = &value["result"];
                let position = Position::new(
                    Epoch::parse(result["epoch"].as_str().unwrap_or_default())
                        .map_err(|err| Failure::Broken(format!("{err}: {value}")))?,
                    result["offset"].as_u64().unwrap_or_default(),
                );
                return Ok(WsSubscribed {
                    recovered: result["recovered"] == json!(true),
                    position,
                });
            }
            if let Some(got) = Self::got(&value).map_err(Failure::Broken)? {
                early.push(got);
            }
        }
    }

    /// The next publication or reset (other pushes are skipped); `Ok(None)`
    /// when the server closed the connection.
    pub async fn next(&mut self) -> Result<Option<Got>, Failure> {
        loop {
            let value = match self.next_json().await {
                Ok(value) => value,
                Err(Failure::Closed(_)) => return Ok(None),
                Err(err) => return Err(err),
            };
            if let Some(got) = Self::got(&value).map_err(Failure::Broken)? {
                return Ok(Some(got));
            }
        }
    }

    fn got(value: &Value) -> Result<Option<Got>, String> {
        if value.get("op") == Some(&json!("reset")) {
            return Got::reset(value).map(Some);
        }
        if value.get("op").is_none() && value.get("id").is_none() && value.get("data").is_some() {
            return Got::message(value).map(Some);
        }
        Ok(None)
    }

    /// The next text frame as JSON; a close frame is `Closed`.
    async fn next_json(&mut self) -> Result<Value, Failure> {
        loop {
            match self.socket.next().await {
                None => return Err(Failure::Broken("the connection ended".into())),
                Some(Err(err)) => return Err(Failure::Broken(err.to_string())),
                Some(Ok(Message::Text(text))) => {
                    return serde_json::from_str(text.as_str())
                        .map_err(|err| Failure::Broken(format!("{err}: {text}")))
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(Failure::Closed(
                        frame.map(|f| u16::from(f.code)).unwrap_or(1005),
                    ));
                }
                Some(Ok(_)) => continue,
            }
        }
    }
}
