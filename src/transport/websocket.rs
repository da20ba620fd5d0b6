//! WebSocket at `{prefix}/ws`: JSON text frames, commands with replies,
//! envelopes and control pushes (docs/protocol.md).
//!
//! One task per connection runs the whole session: it reads commands, drains
//! the outbox (all waiting publications written with one flush), and keeps
//! the heartbeat. Refusals after the handshake (limits, auth) are delivered
//! by accepting the upgrade and closing with a 4xxx code and a reason,
//! because a browser cannot read a refused handshake's status.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use super::{origin_refused, Admit, OriginCheck, Realtime, RealtimeQuery, Session, Transport};
use crate::body::Body;
use crate::cursor::Position;
use crate::error::ApiError;
use crate::message::{ChannelName, Publication};
use crate::proxy::{has_token, ConnInfo};

/// Close codes (docs/protocol.md lists them all).
pub mod close {
    /// The session fell behind: reconnect and resume.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// Too many commands or connections.
    pub const RATE_LIMITED: u16 = 4029;
    /// Shutting down: reconnect (with jitter) to another node or later.
    pub const GOING_AWAY: u16 = 1001;
    /// A message over `realtime.websocket.max_message_size`.
    pub const TOO_BIG: u16 = 1009;
}

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

pub(super) async fn handle(
    realtime: &Arc<Realtime>,
    mut request: Request<Incoming>,
    conn: ConnInfo,
) -> Result<Response<Body>, ApiError> {
    let key = handshake_key(&request)?;
    let origin = realtime.origins.check(&request);
    if origin == OriginCheck::Refused {
        tracing::info!(peer = %conn.peer, origin = ?request.headers().get(header::ORIGIN), "WebSocket from a foreign Origin refused");
        return Err(origin_refused());
    }
    let query = RealtimeQuery::parse(request.uri().query(), &[], realtime.auth.token_param())?;
    // A refusal from here on is a close frame after the upgrade.
    let admitted = realtime
        .admit(Transport::WebSocket, &request, &query, conn)
        .await;

    let opening = Box::new(Opening {
        upgrade: hyper::upgrade::on(&mut request),
        admitted,
        config: socket_config(realtime),
        realtime: realtime.clone(),
        conn,
        channels: query.channels,
    });
    let task = async move {
        // The opening is boxed and gone once the socket is open: an idle
        // connection's task holds only what serves it.
        if let Some((connection, channels)) = Box::pin(opening.open()).await {
            connection.run(channels).await;
        }
    };
    realtime.drain.spawn(task);

    let mut response = Response::new(crate::body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&tungstenite::handshake::derive_accept_key(key.as_bytes()))
            .expect("base64 is a valid header value"),
    );
    Ok(response)
}

/// What an accepted handshake needs until the socket is open.
struct Opening {
    upgrade: hyper::upgrade::OnUpgrade,
    admitted: Result<super::Admission, ApiError>,
    config: WebSocketConfig,
    realtime: Arc<Realtime>,
    conn: ConnInfo,
    channels: Vec<ChannelName>,
}

impl Opening {
    /// Waits for the upgrade; the connection (and the channels its query
    /// names) when admitted, else closes with the refusal's code.
    async fn open(self: Box<Self>) -> Option<(Box<Connection>, Vec<ChannelName>)> {
        let Opening {
            upgrade,
            admitted,
            config,
            realtime,
            conn,
            channels,
        } = *self;
        let upgraded = match upgrade.await {
            Ok(upgraded) => upgraded,
            Err(err) => {
                tracing::debug!(peer = %conn.peer, error = %err, "WebSocket upgrade failed");
                return None;
            }
        };
        let mut socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        match admitted {
            Err(refusal) => {
                let code = refusal.close_code();
                let _ = close(&mut socket, code, &refusal.message).await;
                None
            }
            Ok(admission) => {
                let gauge = realtime.count(Transport::WebSocket);
                let session = realtime.session(Transport::WebSocket, admission);
                let connection = Connection::new(realtime, socket, session, conn, gauge);
                Some((Box::new(connection), channels))
            }
        }
    }
}

/// Checks that this is a WebSocket handshake pushgate can accept; returns
/// the client's key.
fn handshake_key(request: &Request<Incoming>) -> Result<HeaderValue, ApiError> {
    let headers = request.headers();
    let is_upgrade = request.method() == http::Method::GET
        && request.version() == http::Version::HTTP_11
        && has_token(headers, header::CONNECTION, "upgrade")
        && has_token(headers, header::UPGRADE, "websocket");
    if !is_upgrade {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "websocket_required",
            "this endpoint speaks WebSocket (HTTP/1.1 GET with Upgrade: websocket)",
        ));
    }
    if request.headers().get(header::SEC_WEBSOCKET_VERSION) != Some(&HeaderValue::from_static("13"))
    {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "websocket_version",
            "only WebSocket version 13 is spoken",
        ));
    }
    request
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .cloned()
        .ok_or_else(|| ApiError::bad_request("websocket_key", "Sec-WebSocket-Key is missing"))
}

fn socket_config(realtime: &Realtime) -> WebSocketConfig {
    let ws = &realtime.config.websocket;
    let size = |bytes: u64| usize::try_from(bytes).unwrap_or(usize::MAX);
    let max_message = size(ws.max_message_size.bytes());
    WebSocketConfig::default()
        .read_buffer_size(size(ws.read_buffer_size.bytes()))
        .write_buffer_size(size(ws.write_buffer_size.bytes()))
        .max_write_buffer_size(size(ws.max_write_buffer_size.bytes()))
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

/// Sends a close frame and flushes it, bounded in time.
async fn close(socket: &mut Socket, code: u16, reason: &str) -> Result<(), tungstenite::Error> {
    // A close reason is at most 123 bytes; cut on a character boundary.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason[..end].into(),
    };
    match tokio::time::timeout(
        Duration::from_secs(5),
        socket.send(Message::Close(Some(frame))),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}

/// Why a connection ends.
enum End {
    /// The peer closed, or the connection failed: nothing more to send.
    Gone,
    /// Close with this code and reason.
    Close(u16, String),
}

/// The heartbeat: ping when idle, drop the peer when the pong is late.
enum Heartbeat {
    PingAt(Instant),
    PongBy(Instant),
}

impl Heartbeat {
    fn deadline(&self) -> Instant {
        match self {
            Heartbeat::PingAt(at) | Heartbeat::PongBy(at) => *at,
        }
    }
}

/// Token bucket for client commands.
struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
    /// Commands refused in a row; at `burst` the client is cut off.
    refused_in_a_row: u32,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Bucket {
        Bucket {
            tokens: f64::from(burst),
            rate: f64::from(rate),
            burst: f64::from(burst),
            last: Instant::now(),
            refused_in_a_row: 0,
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused_in_a_row = 0;
            true
        } else {
            self.refused_in_a_row += 1;
            false
        }
    }
}

struct Connection {
    realtime: Arc<Realtime>,
    socket: Socket,
    session: Session,
    conn: ConnInfo,
    bucket: Bucket,
    heartbeat: Heartbeat,
    pace: super::Pace,
    batch: Vec<Arc<Publication>>,
    _gauge: super::ConnectionGauge,
}

impl Connection {
    fn new(
        realtime: Arc<Realtime>,
        socket: Socket,
        session: Session,
        conn: ConnInfo,
        gauge: super::ConnectionGauge,
    ) -> Connection {
        let config = &realtime.config;
        let bucket = Bucket::new(config.commands_per_second, config.command_burst);
        let heartbeat = Heartbeat::PingAt(Instant::now() + config.websocket.ping_interval);
        let pace = super::Pace::new(config.coalesce_window);
        Connection {
            realtime,
            socket,
            session,
            conn,
            bucket,
            heartbeat,
            pace,
            batch: Vec::new(),
            _gauge: gauge,
        }
    }

    /// Serves the connection until it ends. Boxed: an async fn keeps its
    /// arguments twice (as given and as locals), and the connection is the
    /// largest thing an idle task holds.
    async fn run(mut self: Box<Self>, channels: Vec<ChannelName>) {
        // The cold paths (subscribing from the query, commands, closing)
        // are boxed while they run, so the task of an idle connection holds
        // only the serve loop.
        let end = match Box::pin(self.start(channels)).await {
            Ok(()) => self.serve().await,
            Err(end) => end,
        };
        if let End::Close(code, reason) = end {
            tracing::debug!(peer = %self.conn.peer, code, %reason, "closing WebSocket");
            let _ = Box::pin(close(&mut self.socket, code, &reason)).await;
        }
    }

    /// Subscribes to the channels named in the query, from now.
    async fn start(&mut self, channels: Vec<ChannelName>) -> Result<(), End> {
        for channel in channels {
            if let Err(err) = self.session.subscribe(channel, None).await {
                return Err(End::Close(err.close_code(), err.message));
            }
        }
        Ok(())
    }

    async fn serve(&mut self) -> End {
        let ping_interval = self.realtime.config.websocket.ping_interval;
        let ping_timeout = self.realtime.config.websocket.ping_timeout;
        // The wake-ups live across turns of the loop and are re-armed only
        // when they fire: making them afresh on every delivery (a waiter
        // registered and dropped in three wait lists, a timer inserted and
        // cleared) was a visible part of the fan-out's CPU profile.
        let drain = self.realtime.drain.signalled_owned();
        let ordered = self.session.control().ordered_owned();
        let ready = self.session.outbox().ready_owned();
        let heartbeat = tokio::time::sleep_until(self.heartbeat.deadline());
        // While the pace holds a write back, what arrives meanwhile goes
        // out with it when `hold` fires (or the outbox wakes the session
        // again: half full, lagging or closed).
        let hold = tokio::time::sleep_until(Instant::now());
        tokio::pin!(drain, ordered, ready, heartbeat, hold);
        // The task of an idle connection holds this future at its largest
        // state, so what a branch awaits (a flush, an order, a ping, the
        // frame read) is boxed while it runs: one short-lived allocation per
        // write or frame, against about 400 B held by every connection.
        loop {
            tokio::select! {
                biased;
                () = &mut drain => {
                    return End::Close(close::GOING_AWAY, "server shutting down; reconnect".into());
                }
                () = &mut ordered => {
                    if let Err(end) = Box::pin(self.obey()).await {
                        return end;
                    }
                }
                () = &mut ready => {
                    if let Err(end) = Box::pin(self.paced_flush(hold.as_mut())).await {
                        return end;
                    }
                }
                () = &mut hold, if self.pace.holding() => {
                    if let Err(end) = Box::pin(self.paced_flush(hold.as_mut())).await {
                        return end;
                    }
                }
                message = self.socket.next().map(|message| message.map(Box::new)) => {
                    // Any frame shows the peer is alive.
                    self.heartbeat = Heartbeat::PingAt(Instant::now() + ping_interval);
                    heartbeat.as_mut().reset(self.heartbeat.deadline());
                    let Some(message) = message else {
                        return End::Gone;
                    };
                    match *message {
                        Err(tungstenite::Error::Capacity(_)) => {
                            return End::Close(close::TOO_BIG, "message over realtime.websocket.max_message_size".into());
                        }
                        Err(err) => {
                            tracing::debug!(peer = %self.conn.peer, error = %err, "WebSocket read failed");
                            return End::Gone;
                        }
                        Ok(message) => {
                            if let Err(end) = Box::pin(self.on_message(message)).await {
                                return end;
                            }
                        }
                    }
                }
                () = &mut heartbeat => {
                    match self.heartbeat {
                        Heartbeat::PingAt(_) => {
                            self.heartbeat = Heartbeat::PongBy(Instant::now() + ping_timeout);
                            heartbeat.as_mut().reset(self.heartbeat.deadline());
                            if Box::pin(self.write(Message::Ping(Default::default()))).await.is_err() {
                                return End::Gone;
                            }
                        }
                        Heartbeat::PongBy(_) => {
                            tracing::debug!(peer = %self.conn.peer, "WebSocket peer missed its pong; dropped");
                            return End::Gone;
                        }
                    }
                }
            }
        }
    }

    /// Carries out the API's orders: unsubscribe (telling the client), or
    /// close.
    async fn obey(&mut self) -> Result<(), End> {
        let (left, disconnect) = self.session.obey();
        for channel in left {
            let push = json!({"op": "unsubscribed", "channel": channel}).to_string();
            self.write(Message::text(push)).await?;
        }
        match disconnect {
            Some((code, reason)) => Err(End::Close(code, reason)),
            None => Ok(()),
        }
    }

    /// Sends and flushes one message, bounded by the ping timeout: a peer
    /// that reads nothing for that long is gone.
    async fn write(&mut self, message: Message) -> Result<(), End> {
        let timeout = self.realtime.config.websocket.ping_timeout;
        match tokio::time::timeout(timeout, self.socket.send(message)).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(End::Gone),
        }
    }

    /// Writes what the outbox holds now, or holds the write back until the
    /// pace's window has passed (resetting `hold` to fire then).
    async fn paced_flush(&mut self, hold: Pin<&mut tokio::time::Sleep>) -> Result<(), End> {
        let now = Instant::now();
        match self.pace.on_wake(now, || self.session.outbox().is_urgent()) {
            Some(until) => {
                hold.reset(until);
                Ok(())
            }
            None => self.flush_outbox(now).await,
        }
    }

    /// Writes everything the outbox holds, with one flush (the pace's write
    /// at `now`).
    async fn flush_outbox(&mut self, now: Instant) -> Result<(), End> {
        let mut batch = std::mem::take(&mut self.batch);
        let drained = self.session.outbox().drain_into(&mut batch);
        match drained {
            crate::hub::Drained::Lagging => {
                tracing::info!(peer = %self.conn.peer, "slow consumer: WebSocket closed with 4008");
                return Err(End::Close(
                    close::SLOW_CONSUMER,
                    "slow consumer: reconnect and resume".into(),
                ));
            }
            crate::hub::Drained::Closed => return Err(End::Gone),
            crate::hub::Drained::Open => {}
        }
        let mut fed = false;
        for publication in batch.drain(..) {
            let message = match self.session.admit(&publication) {
                Admit::Skip => continue,
                Admit::Deliver => None,
                Admit::ResetThenDeliver(position) => {
                    Some(reset_push(publication.channel(), position))
                }
                Admit::Event => {
                    self.feed(Message::Text(publication.ws_text().clone()))
                        .await?;
                    fed = true;
                    continue;
                }
                Admit::Reset(position) => {
                    let reset = reset_push(publication.channel(), position);
                    self.feed(Message::text(reset)).await?;
                    fed = true;
                    continue;
                }
            };
            if let Some(reset) = message {
                self.feed(Message::text(reset)).await?;
            }
            self.feed(Message::Text(publication.ws_text().clone()))
                .await?;
            fed = true;
        }
        self.batch = batch;
        if fed {
            self.pace.wrote(now);
            self.flush().await?;
        }
        Ok(())
    }

    async fn feed(&mut self, message: Message) -> Result<(), End> {
        let timeout = self.realtime.config.websocket.ping_timeout;
        match tokio::time::timeout(timeout, self.socket.feed(message)).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(End::Gone),
        }
    }

    async fn flush(&mut self) -> Result<(), End> {
        let timeout = self.realtime.config.websocket.ping_timeout;
        match tokio::time::timeout(timeout, self.socket.flush()).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(End::Gone),
        }
    }

    async fn on_message(&mut self, message: Message) -> Result<(), End> {
        match message {
            Message::Text(text) => {
                if !self.bucket.take() {
                    if self.bucket.refused_in_a_row >= self.realtime.config.command_burst {
                        tracing::info!(peer = %self.conn.peer, "limit: realtime.commands_per_second exceeded persistently; closed with 4029");
                        return Err(End::Close(
                            close::RATE_LIMITED,
                            "too many commands (realtime.commands_per_second)".into(),
                        ));
                    }
                    let id = serde_json::from_str::<Value>(text.as_str())
                        .map(|command| command_id(&command))
                        .unwrap_or(Value::Null);
                    let error = ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate_limited",
                        "too many commands; slow down",
                    );
                    return self.write(Message::text(error_reply(&id, &error))).await;
                }
                self.on_command(text.as_str()).await
            }
            Message::Binary(_) => {
                let error = ApiError::bad_request(
                    "binary_not_supported",
                    "send commands as JSON text frames",
                );
                self.write(Message::text(error_reply(&Value::Null, &error)))
                    .await
            }
            // tungstenite answers pings itself (on the next write or flush).
            Message::Ping(_) => self.flush().await,
            Message::Pong(_) | Message::Frame(_) => Ok(()),
            Message::Close(_) => Err(End::Gone),
        }
    }

    async fn on_command(&mut self, text: &str) -> Result<(), End> {
        let (id, result) = match serde_json::from_str::<Value>(text) {
            Err(err) => (
                Value::Null,
                Err(ApiError::bad_request(
                    "bad_json",
                    format!("invalid JSON: {err}"),
                )),
            ),
            Ok(command) => {
                let id = command_id(&command);
                let result = if id.is_null() {
                    Err(ApiError::bad_request(
                        "bad_command",
                        "a command is {\"id\": <number or string>, \"op\": \"...\", ...}",
                    ))
                } else {
                    self.execute(&command).await
                };
                (id, result)
            }
        };
        match result {
            Ok(Reply { result, replay }) => {
                self.write(Message::text(
                    json!({ "id": id, "result": result }).to_string(),
                ))
                .await?;
                for channel in replay.left {
                    let push = json!({"op": "unsubscribed", "channel": channel}).to_string();
                    self.feed(Message::text(push)).await?;
                }
                if let Some((channel, position)) = replay.reset {
                    self.feed(Message::text(reset_push(&channel, position)))
                        .await?;
                }
                // The replay ends where the subscription now stands; the
                // outbox's copies of these publications will be skipped.
                for publication in replay.publications {
                    self.feed(Message::Text(publication.ws_text().clone()))
                        .await?;
                }
                self.flush().await
            }
            Err(error) => self.write(Message::text(error_reply(&id, &error))).await,
        }
    }

    async fn execute(&mut self, command: &Value) -> Result<Reply, ApiError> {
        let op = command.get("op").and_then(Value::as_str).unwrap_or("");
        let channel = || -> Result<ChannelName, ApiError> {
            let name = command
                .get("channel")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "missing_channel",
                        "name the channel: \"channel\": \"...\"",
                    )
                })?;
            ChannelName::parse(name)
                .map_err(|err| ApiError::bad_request("bad_channel", format!("`{name}`: {err}")))
        };
        match op {
            "subscribe" => {
                let channel = channel()?;
                let since = match command.get("since") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(text)) => Some(text.parse::<Position>().map_err(|err| {
                        ApiError::bad_request(err.code(), format!("`since`: {err}"))
                    })?),
                    Some(_) => {
                        return Err(ApiError::bad_request(
                            "bad_position",
                            "`since` is a position string, \"<epoch>:<offset>\"",
                        ))
                    }
                };
                let subscribed = self.session.subscribe(channel.clone(), since).await?;
                // Asked to resume and could not: say so after the reply, so
                // the client reloads its state, then go on from now.
                let reset = (since.is_some() && !subscribed.recovered)
                    .then_some((channel, subscribed.position));
                Ok(Reply {
                    result: json!({
                        "recovered": subscribed.recovered,
                        "epoch": subscribed.position.epoch,
                        "offset": subscribed.position.offset,
                    }),
                    replay: Replay {
                        reset,
                        publications: subscribed.replay,
                        left: Vec::new(),
                    },
                })
            }
            "unsubscribe" => {
                let channel = channel()?;
                if self.session.unsubscribe(channel.as_str()) {
                    Ok(Reply::plain(json!({})))
                } else {
                    Err(ApiError::bad_request(
                        "not_subscribed",
                        format!("not subscribed to `{channel}`"),
                    ))
                }
            }
            "ping" => Ok(Reply::plain(json!({}))),
            "refresh" => {
                let token = command
                    .get("token")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ApiError::bad_request("missing_token", "`refresh` needs a \"token\"")
                    })?;
                let left = self.session.refresh_token(token)?;
                Ok(Reply {
                    result: json!({}),
                    replay: Replay {
                        left,
                        ..Replay::default()
                    },
                })
            }
            "" => Err(ApiError::bad_request(
                "bad_command",
                "a command needs an \"op\"",
            )),
            other => Err(ApiError::bad_request(
                "unknown_op",
                format!("unknown op `{other}`; ops are subscribe, unsubscribe, ping, refresh"),
            )),
        }
    }
}

/// A command's result, and for a subscribe what to send after it.
struct Reply {
    result: Value,
    replay: Replay,
}

#[derive(Default)]
struct Replay {
    /// A reset push to send: the channel and where it now stands.
    reset: Option<(ChannelName, Position)>,
    publications: Vec<Arc<Publication>>,
    /// Channels a renewed grant no longer allows: `unsubscribed` pushes.
    left: Vec<ChannelName>,
}

impl Reply {
    fn plain(result: Value) -> Reply {
        Reply {
            result,
            replay: Replay::default(),
        }
    }
}

/// A command's `id` when it is a number or a string (echoed in the reply),
/// else null.
fn command_id(command: &Value) -> Value {
    command
        .get("id")
        .filter(|id| id.is_number() || id.is_string())
        .cloned()
        .unwrap_or(Value::Null)
}

fn error_reply(id: &Value, error: &ApiError) -> String {
    json!({ "id": id, "error": error.body() }).to_string()
}

fn reset_push(channel: &ChannelName, position: Position) -> String {
    json!({
        "op": "reset",
        "channel": channel,
        "epoch": position.epoch,
        "offset": position.offset,
    })
    .to_string()
}
