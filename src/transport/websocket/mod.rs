//! WebSocket at `{prefix}/ws`: JSON text frames, commands with replies,
//! envelopes and control pushes (docs/protocol.md).
//!
//! One task per connection runs the whole session: it reads commands, drains
//! the outbox (all waiting publications written with one flush), and keeps
//! the heartbeat. Refusals after the handshake (limits, auth) are delivered
//! by accepting the upgrade and closing with a 4xxx code and a reason,
//! because a browser cannot read a refused handshake's status.
//!
//! Every end that can still send anything ends with a closing handshake
//! (RFC 6455 §5.5.1, §7.1.1; see [`finish`]): a Close frame — ours with the
//! code that says why, or the answer to the client's — then the TCP close.
//! A frame that breaks the protocol (tungstenite's `ProtocolError`, invalid
//! UTF-8, a message over the limit) closes with the code RFC 6455 §7.4.1
//! names for it ([`read_failure`]).
//!
//! A client that offers permessage-deflate (RFC 7692) in a form pushgate
//! takes ([`extensions`]) gets each publication of at least
//! `realtime.websocket.compression.min_size` compressed — once per
//! publication, the same bytes for every subscriber — and its own
//! compressed messages are inflated under tungstenite ([`inflating`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::{FutureExt, SinkExt, StreamExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

pub(super) mod closing;
mod commands;
mod extensions;
mod inflating;
mod socket;

pub use closing::close;
pub(super) use closing::{finish, read_failure, End};

use super::calls;
use super::{Admit, Obeyed, Ordered, OriginCheck, Realtime, RealtimeQuery, Session, Transport};
use crate::body::Body;
use crate::config::ClientPublish;
use crate::conn::ConnInfo;
use crate::detach::{Detached, Reclaim};
use crate::error::{Kind, Refusal};
use crate::events::Reason;
use crate::headers::has_token;
use crate::message::{ChannelName, Publication};
use crate::rate::{Limit, Rate};
use crate::signal::Wait;
use commands::{
    error_reply, error_reply_from, parse_command, reset_push, result_reply, Call, Command, Id,
    Replay, Reply,
};
pub(super) use socket::Socket;

pub(super) async fn handle(
    realtime: &Arc<Realtime>,
    mut request: Request<Incoming>,
    conn: ConnInfo,
) -> Result<Response<Body>, Refusal> {
    let key = match handshake_key(&request) {
        Ok(key) => key,
        Err(refusal) => return Ok(refused_handshake(refusal)),
    };
    let origin = realtime.origins().check(&request);
    if origin == OriginCheck::Refused {
        tracing::info!(peer = %conn.peer, origin = ?request.headers().get(header::ORIGIN), "WebSocket from a foreign Origin refused");
        return Err(realtime.refuse_origin());
    }
    let query = RealtimeQuery::parse(request.uri().query(), &[], realtime.auth().token_param())?;
    let deflate = realtime.config().websocket.compression.enabled
        && extensions::offers_deflate(request.headers());
    // A refusal from here on is a close frame after the upgrade.
    let admitted = realtime
        .admit(Transport::WebSocket, &request, &query, conn)
        .await;

    let opening = Box::new(Opening {
        upgrade: hyper::upgrade::on(&mut request),
        reclaim: request.extensions().get::<Reclaim>().copied(),
        admitted,
        config: socket_config(&realtime.config().websocket),
        deflate,
        realtime: realtime.clone(),
        conn,
        channels: query.channels,
    });
    realtime.drain.spawn(run(opening));

    Ok(switching_protocols(&key, deflate))
}

/// A connection's task, from its upgrade to its end.
///
/// Every idle connection holds this future, in tokio's task cell: the
/// connection inline (one allocation, the task's, for both) and its serve
/// loop. The cell is the future plus 112 bytes, rounded up to 128; at most
/// 784 bytes of future keep it in jemalloc's 896-byte class, and a byte
/// more costs every connection 128 (tested). So what runs only for a while
/// (opening, the handling of each event, closing) is boxed while it runs,
/// and nothing else is held across an await here: a value that is (a
/// `match` on an awaited result, say) is room in every connection's task.
async fn run(opening: Box<Opening>) {
    let Some(connection) = Box::pin(opening.open()).await else {
        return;
    };
    // The connection comes out of the opening boxed, so that the future
    // has room for it once; the box is freed as it is emptied (a box moved
    // out of is freed only where its binding ends).
    let mut connection = {
        let boxed = connection;
        *boxed
    };
    let end = connection.serve().await;
    Box::pin(connection.close(end)).await;
}

/// The `101` that accepts a handshake whose key is `key`, with
/// permessage-deflate when `deflate`.
pub(super) fn switching_protocols(key: &HeaderValue, deflate: bool) -> Response<Body> {
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
    if deflate {
        headers.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            extensions::deflate_accepted(),
        );
    }
    response
}

/// The socket over an upgraded connection, configured by `config`; with
/// the client's compressed messages inflated when it negotiated
/// permessage-deflate. With the request's `reclaim` the socket leaves
/// hyper's wrapping, so the connection holds the socket alone.
pub(super) fn open_socket(
    upgraded: hyper::upgrade::Upgraded,
    reclaim: Option<Reclaim>,
    config: WebSocketConfig,
    deflate: bool,
) -> Socket {
    let reclaimed = match reclaim {
        Some(Reclaim(reclaim)) => reclaim(upgraded).inspect_err(|_| {
            // Offered but not applied: hyper-util's downcast no longer
            // matches the type the server hands hyper. Still correct, at
            // more memory per connection; said once, for whoever upgrades.
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    "a WebSocket's socket could not be taken back out of hyper \
                     (fast_paths.ws_reclaim); connections go through hyper's upgraded IO"
                );
            }
        }),
        None => Err(upgraded),
    };
    let (socket, ahead) = match reclaimed {
        // What hyper read past the handshake is a slice of its read buffer,
        // which it would keep whole: copied out, or let go when empty.
        Ok((socket, ahead)) => (socket, bytes::Bytes::copy_from_slice(&ahead)),
        Err(upgraded) => (
            Detached::unslotted(Box::new(TokioIo::new(upgraded))),
            bytes::Bytes::new(),
        ),
    };
    Socket::new(socket, ahead, config, deflate)
}

/// A refused handshake, naming the version spoken (RFC 6455 §4.4).
pub(super) fn refused_handshake(refusal: Refusal) -> Response<Body> {
    let mut response = refusal.into_response();
    response.headers_mut().insert(
        header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    );
    response
}

/// What an accepted handshake needs until the socket is open.
struct Opening {
    upgrade: hyper::upgrade::OnUpgrade,
    reclaim: Option<Reclaim>,
    admitted: Result<super::Admission, Refusal>,
    config: WebSocketConfig,
    /// permessage-deflate was negotiated.
    deflate: bool,
    realtime: Arc<Realtime>,
    conn: ConnInfo,
    channels: Vec<ChannelName>,
}

impl Opening {
    /// Waits for the upgrade; the connection, subscribed to the channels
    /// its query names, when admitted and subscribed, else closes with the
    /// refusal's code.
    async fn open(self: Box<Self>) -> Option<Box<Connection>> {
        let Opening {
            upgrade,
            reclaim,
            admitted,
            config,
            deflate,
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
        let mut socket = open_socket(upgraded, reclaim, config, deflate);
        match admitted {
            Err(refusal) => {
                let end = End::Close(refusal.close_code(), refusal.message);
                finish(&mut socket, end, realtime.config().websocket.ping_timeout).await;
                None
            }
            Ok(admission) => {
                let gauge = realtime.count(Transport::WebSocket);
                let session = realtime.session(Transport::WebSocket, admission);
                let mut connection = Connection::new(socket, session, conn, gauge);
                if deflate {
                    let min_size = realtime.config().websocket.compression.min_size;
                    connection.deflate_from =
                        Some(u32::try_from(min_size.bytes()).unwrap_or(u32::MAX));
                }
                let mut connection = Box::new(connection);
                if let Err(end) = connection.start(channels).await {
                    connection.close(end).await;
                    return None;
                }
                Some(connection)
            }
        }
    }
}

/// Checks that this is a WebSocket handshake pushgate can accept; returns
/// the client's key. Not an upgrade at all: 426. An upgrade that breaks
/// RFC 6455 §4.2.1 (a version other than 13, a key that is not 16 bytes in
/// base64): 400, so a broken client is told so rather than half-served.
pub(super) fn handshake_key(request: &Request<Incoming>) -> Result<HeaderValue, Refusal> {
    let headers = request.headers();
    let is_upgrade = request.method() == http::Method::GET
        && request.version() == http::Version::HTTP_11
        && has_token(headers, header::CONNECTION, "upgrade")
        && has_token(headers, header::UPGRADE, "websocket");
    if !is_upgrade {
        return Err(Refusal::new(
            Kind::UpgradeRequired,
            "websocket_required",
            "this endpoint speaks WebSocket (HTTP/1.1 GET with Upgrade: websocket)",
        ));
    }
    let mut versions = headers.get_all(header::SEC_WEBSOCKET_VERSION).iter();
    if versions.next().map(HeaderValue::as_bytes) != Some(b"13") || versions.next().is_some() {
        return Err(Refusal::bad_request(
            "websocket_version",
            "only WebSocket version 13 is spoken: send `Sec-WebSocket-Version: 13` once",
        ));
    }
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    match (keys.next(), keys.next()) {
        (Some(key), None) if is_handshake_key(key.as_bytes()) => Ok(key.clone()),
        (None, _) => Err(Refusal::bad_request(
            "websocket_key",
            "Sec-WebSocket-Key is missing",
        )),
        _ => Err(Refusal::bad_request(
            "websocket_key",
            "Sec-WebSocket-Key must be one value: 16 bytes in base64 (24 characters)",
        )),
    }
}

/// Whether `key` is 16 bytes in base64 (RFC 6455 §4.1): 22 characters of
/// the base64 alphabet, the last holding 2 bits of data (its low 4 bits
/// zero: `A`, `Q`, `g` or `w`), then `==`.
fn is_handshake_key(key: &[u8]) -> bool {
    let is_base64 = |b: &u8| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/';
    key.len() == 24
        && key[..21].iter().all(is_base64)
        && matches!(key[21], b'A' | b'Q' | b'g' | b'w')
        && &key[22..] == b"=="
}

pub(super) fn socket_config(ws: &crate::config::WebSocketConfig) -> WebSocketConfig {
    let size = |bytes: u64| usize::try_from(bytes).unwrap_or(usize::MAX);
    let max_message = size(ws.max_message_size.bytes());
    WebSocketConfig::default()
        .read_buffer_size(size(ws.read_buffer_size.bytes()))
        .write_buffer_size(size(ws.write_buffer_size.bytes()))
        .max_write_buffer_size(size(ws.max_write_buffer_size.bytes()))
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

struct Connection {
    socket: Socket,
    session: Session,
    peer: std::net::SocketAddr,
    pace: super::Pace,
    /// The outbox's wake-up. Kept here rather than in the serve loop so that
    /// a write waiting on a client that stopped reading still hears the
    /// session fall behind ([`Connection::io`]).
    ready: Wait,
    /// `ready` fired while a write waited, and not for a lag: the serve loop
    /// drains the outbox for it next.
    woken: bool,
    /// Orders for this session: the app's, and shutdown's.
    ordered: Wait,
    /// The end of a write the pace holds back; a timer only while it does.
    hold: super::Hold,
    /// When the next ping is due, or, with `awaiting_pong`, when the peer
    /// is gone unless it sends something first. A boxed timer (a kept one,
    /// where the thread keeps them): inline, its 112 bytes would take the
    /// task out of its size class ([`run`]).
    heartbeat: crate::timer::Deadline,
    /// A ping is out and nothing came back since.
    awaiting_pong: bool,
    /// What a client that sends commands needs; made at its first (most
    /// connections only listen).
    talk: Option<Box<Talk>>,
    /// With permessage-deflate negotiated: publications of at least this
    /// many bytes go compressed (`compression.min_size` when the connection
    /// opened).
    deflate_from: Option<u32>,
    _gauge: super::ConnectionGauge,
}

/// A talking connection's limits and calls.
struct Talk {
    /// `realtime.commands_per_second` (a new limiter is full, as one made at
    /// the connect would be by the first command).
    commands: Rate,
    /// Commands refused in a row; at `command_burst` the client is cut off.
    refused_in_a_row: u32,
    /// `realtime.publishes_per_second`; made at the first publish.
    publishes: Option<Rate>,
    /// `rpc` and `publish` commands under way, each ending in its reply.
    calls: Calls,
}

impl Talk {
    fn new(realtime: &Realtime) -> Box<Talk> {
        let config = realtime.config();
        Box::new(Talk {
            commands: Rate::new(config.commands_per_second, config.command_burst),
            refused_in_a_row: 0,
            publishes: None,
            calls: Calls::new(),
        })
    }
}

/// The handling of one event by the serve loop, boxed while it runs.
type Handling<'a> = futures_util::future::BoxFuture<'a, Result<(), End>>;

/// What the serve loop wakes for ([`Connection::poll_event`]).
enum Event {
    /// An order came: the app's, or shutdown's.
    Ordered,
    /// The outbox has publications, or a hold on them ended.
    Outbox,
    /// A frame from the client; `None` once the stream is over.
    Frame(Option<Result<Message, tungstenite::Error>>),
    /// A call ended with this reply.
    Replied(String),
    Heartbeat,
}

/// Calls under way, polled by the serve loop.
type Calls =
    futures_util::stream::FuturesUnordered<futures_util::future::BoxFuture<'static, String>>;

/// One write to the socket ([`write_watching`]).
pub(super) enum Io {
    /// Queue a message (written once tungstenite's buffer fills or on the
    /// next flush).
    Feed(Message),
    Flush,
    /// Queue and flush.
    Send(Message),
}

impl Connection {
    fn new(
        socket: Socket,
        session: Session,
        conn: ConnInfo,
        gauge: super::ConnectionGauge,
    ) -> Connection {
        let realtime = session.realtime();
        let config = realtime.config();
        Connection {
            pace: super::Pace::new(config.coalesce_window),
            ready: session.outbox().ready_owned(),
            woken: false,
            ordered: session.control().ordered_owned(),
            hold: super::Hold::default(),
            heartbeat: crate::timer::Deadline::after(config.websocket.ping_interval),
            awaiting_pong: false,
            talk: None,
            deflate_from: None,
            _gauge: gauge,
            socket,
            session,
            peer: conn.peer,
        }
    }

    fn realtime(&self) -> &Arc<Realtime> {
        self.session.realtime()
    }

    /// Ends the session and the connection (`end` says why).
    async fn close(&mut self, end: End) {
        if let End::Close(code, reason) = &end {
            tracing::debug!(peer = %self.peer, code, %reason, "closing WebSocket");
        }
        self.session.end_with(end.reason());
        let within = self.realtime().config().websocket.ping_timeout;
        Box::pin(finish(&mut self.socket, end, within)).await;
    }

    /// Serves the connection until it ends (the returned `End` says why).
    async fn serve(&mut self) -> End {
        // The task of an idle connection holds this future at its largest
        // state, so the handling of what comes (a flush, an order, a ping,
        // a command) is boxed while it runs, each kind on its own and sized
        // to what it awaits (most are the outbox's flush, a third of a
        // command's): one short-lived allocation per event, against
        // hundreds of bytes held by every connection.
        loop {
            let handling: Handling<'_> = if std::mem::take(&mut self.woken) {
                Box::pin(self.paced_flush())
            } else {
                let event = std::future::poll_fn(|cx| self.poll_event(cx)).await;
                match event {
                    Event::Ordered => Box::pin(self.obey()),
                    Event::Outbox => Box::pin(self.paced_flush()),
                    Event::Frame(None) => return End::Gone,
                    Event::Frame(Some(Err(err))) => {
                        tracing::debug!(peer = %self.peer, error = %err, "WebSocket read failed");
                        return read_failure(&err);
                    }
                    Event::Frame(Some(Ok(message))) => Box::pin(self.on_message(message)),
                    Event::Replied(reply) => Box::pin(self.write(Message::text(reply))),
                    Event::Heartbeat => Box::pin(self.beat()),
                }
            };
            if let Err(end) = handling.await {
                return end;
            }
        }
    }

    /// Subscribes to `channels`, from now.
    async fn start(&mut self, channels: Vec<ChannelName>) -> Result<(), End> {
        for channel in channels {
            if let Err(err) = self.session.subscribe(channel, None).await {
                self.session.end_with(Reason::SubscribeRefused);
                return Err(End::Close(err.close_code(), err.message));
            }
        }
        Ok(())
    }

    /// What the serve loop does next, looked for in this order: orders
    /// (the app's, and shutdown's), the outbox (or the end of a hold on it), a frame
    /// from the client, a call's reply, the heartbeat. The waits live in
    /// the connection across turns of the loop and are re-armed only when
    /// they fire: making them afresh on every delivery (a waiter registered
    /// and dropped in three wait lists, a timer inserted and cleared) was a
    /// visible part of the fan-out's CPU profile.
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        if Pin::new(&mut self.ordered).poll(cx).is_ready() {
            return Poll::Ready(Event::Ordered);
        }
        if Pin::new(&mut self.ready).poll(cx).is_ready() {
            return Poll::Ready(Event::Outbox);
        }
        if self.pace.holding() && Pin::new(&mut self.hold).poll(cx).is_ready() {
            return Poll::Ready(Event::Outbox);
        }
        if let Poll::Ready(frame) = self.socket.poll_next_unpin(cx) {
            // Any frame shows the peer is alive.
            self.awaiting_pong = false;
            let ping_interval = self.realtime().config().websocket.ping_interval;
            self.heartbeat.reset(Instant::now() + ping_interval);
            return Poll::Ready(Event::Frame(frame));
        }
        if let Some(talk) = self.talk.as_mut().filter(|talk| !talk.calls.is_empty()) {
            if let Poll::Ready(Some(reply)) = talk.calls.poll_next_unpin(cx) {
                return Poll::Ready(Event::Replied(reply));
            }
        }
        if Pin::new(&mut self.heartbeat).poll(cx).is_ready() {
            return Poll::Ready(Event::Heartbeat);
        }
        Poll::Pending
    }

    /// The heartbeat's deadline came: a ping goes out, or, when one is out
    /// already and nothing came back since, the peer is gone.
    async fn beat(&mut self) -> Result<(), End> {
        if self.awaiting_pong {
            tracing::debug!(peer = %self.peer, "WebSocket peer missed its pong; dropped");
            return Err(End::Gone);
        }
        self.awaiting_pong = true;
        let ping_timeout = self.realtime().config().websocket.ping_timeout;
        self.heartbeat.reset(Instant::now() + ping_timeout);
        self.write(Message::Ping(Default::default()))
            .await
            .map_err(|_| End::Gone)
    }

    /// Carries out the API's orders: unsubscribe (telling the client), or
    /// close.
    async fn obey(&mut self) -> Result<(), End> {
        let Obeyed { left, end } = self.session.obey();
        for channel in left {
            let push = json!({"op": "unsubscribed", "channel": channel}).to_string();
            self.write(Message::text(push)).await?;
        }
        match end {
            Some(Ordered::Disconnect(code, reason)) => Err(End::Close(code, reason)),
            Some(Ordered::Shutdown) => Err(End::Close(
                close::GOING_AWAY,
                "server shutting down; reconnect".into(),
            )),
            None => Ok(()),
        }
    }

    /// Sends and flushes one message.
    async fn write(&mut self, message: Message) -> Result<(), End> {
        self.io(Io::Send(message)).await
    }

    /// One write, bounded by the ping timeout ([`write_watching`]); a
    /// lagging session ends with 4008.
    async fn io(&mut self, io: Io) -> Result<(), End> {
        let woken = write_watching(
            &mut self.socket,
            io,
            Watch {
                ready: &mut self.ready,
                outbox: self.session.outbox(),
                within: self.session.realtime().config().websocket.ping_timeout,
            },
        )
        .await
        .map_err(|lag| {
            if lag == Lagged {
                tracing::info!(peer = %self.peer, "slow consumer: WebSocket closed with 4008");
                End::slow_consumer()
            } else {
                End::Gone
            }
        })?;
        self.woken |= woken;
        Ok(())
    }

    /// Writes what the outbox holds now, or holds the write back until the
    /// pace's window has passed (setting the hold to fire then).
    async fn paced_flush(&mut self) -> Result<(), End> {
        let now = Instant::now();
        match self.pace.on_wake(now, || self.session.outbox().is_urgent()) {
            Some(until) => {
                self.hold.until(until);
                Ok(())
            }
            None => {
                self.hold.release();
                self.flush_outbox(now).await
            }
        }
    }

    /// Writes everything the outbox holds, with one flush (the pace's write
    /// at `now`).
    async fn flush_outbox(&mut self, now: Instant) -> Result<(), End> {
        let mut batch = super::take_batch();
        let drained = self.session.outbox().drain_into(&mut batch);
        match drained {
            crate::hub::Drained::Lagging => {
                tracing::info!(peer = %self.peer, "slow consumer: WebSocket closed with 4008");
                return Err(End::slow_consumer());
            }
            crate::hub::Drained::Closed => return Err(End::Gone),
            crate::hub::Drained::Open => {}
        }
        if let Some(oldest) = batch.first() {
            self.realtime().gauges.delivered(oldest);
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
                    self.feed(publication_message(&publication, self.deflate_from))
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
            self.feed(publication_message(&publication, self.deflate_from))
                .await?;
            fed = true;
        }
        super::give_batch(batch);
        if fed {
            self.pace.wrote(now);
            self.flush().await?;
        }
        Ok(())
    }

    async fn feed(&mut self, message: Message) -> Result<(), End> {
        self.io(Io::Feed(message)).await
    }

    async fn flush(&mut self) -> Result<(), End> {
        self.io(Io::Flush).await
    }

    async fn on_message(&mut self, message: Message) -> Result<(), End> {
        match message {
            Message::Text(text) => {
                let realtime = self.session.realtime();
                let burst = realtime.config().command_burst;
                let talk = self.talk.get_or_insert_with(|| Talk::new(realtime));
                if talk.commands.take() {
                    talk.refused_in_a_row = 0;
                } else {
                    talk.refused_in_a_row += 1;
                    realtime.refused.count(Limit::Commands);
                    if talk.refused_in_a_row >= burst {
                        tracing::info!(peer = %self.peer, "limit: realtime.commands_per_second exceeded persistently; closed with 4029");
                        return Err(End::Close(
                            close::RATE_LIMITED,
                            "too many commands (realtime.commands_per_second)".into(),
                        ));
                    }
                    let id = serde_json::from_str::<Value>(text.as_str())
                        .map(|command| Id::of(text.as_str(), &command))
                        .unwrap_or_default();
                    let error = Refusal::new(
                        Kind::OverLimit,
                        "rate_limited",
                        "too many commands; slow down",
                    );
                    return self.write(Message::text(error_reply(&id, &error))).await;
                }
                self.on_command(text.as_str()).await
            }
            Message::Binary(_) => {
                let error = Refusal::bad_request(
                    "binary_not_supported",
                    "send commands as JSON text frames",
                );
                self.write(Message::text(error_reply(&Id::default(), &error)))
                    .await
            }
            // tungstenite answers pings itself (on the next write or flush).
            Message::Ping(_) => self.flush().await,
            Message::Pong(_) | Message::Frame(_) => Ok(()),
            Message::Close(_) => Err(End::PeerClosed),
        }
    }

    async fn on_command(&mut self, text: &str) -> Result<(), End> {
        let (id, command) = parse_command(text);
        let result = match command {
            Ok(command) => self.execute(&id, command).await,
            Err(error) => Err(error),
        };
        match result {
            // A call: its reply comes when it ends.
            Ok(None) => Ok(()),
            Ok(Some(Reply { result, replay })) => {
                self.write(Message::text(result_reply(&id, &result)))
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
                    self.feed(publication_message(&publication, self.deflate_from))
                        .await?;
                }
                self.flush().await
            }
            Err(error) => self.write(Message::text(error_reply(&id, &error))).await,
        }
    }

    /// Starts an `rpc` or a `publish`, whose reply the serve loop sends
    /// when it ends; refuses at once what may not start.
    fn start_call(&mut self, id: &Id, call: Call) -> Result<(), Refusal> {
        let realtime = self.session.realtime();
        let talk = self.talk.get_or_insert_with(|| Talk::new(realtime));
        let max = realtime.rpc_config.max_in_flight;
        if talk.calls.len() >= max {
            return Err(Refusal::new(
                Kind::OverLimit,
                "too_many_calls",
                format!("at most {max} rpc and publish commands at once (rpc.max_in_flight)"),
            ));
        }
        let caller = Arc::new(self.session.caller());
        let call = match call {
            Call::Rpc { method, data } => {
                calls::rpc(realtime.clone(), caller, method, data).boxed()
            }
            Call::Publish {
                channel,
                event,
                data,
            } => {
                let (publish, ephemeral) = realtime.channels.rules().publish(channel.as_str());
                let via_app = match publish {
                    ClientPublish::Off => {
                        return Err(Refusal::new(
                            Kind::Forbidden,
                            "publish_not_allowed",
                            format!("clients may not publish on `{channel}` (channels[].publish)"),
                        ))
                    }
                    ClientPublish::Direct => false,
                    ClientPublish::ViaApp => true,
                };
                let config = realtime.config();
                let publishes = talk.publishes.get_or_insert_with(|| {
                    Rate::new(config.publishes_per_second, config.publish_burst)
                });
                if !publishes.take() {
                    realtime.refused.count(Limit::ClientPublishes);
                    return Err(Refusal::new(
                        Kind::OverLimit,
                        "rate_limited",
                        "too many publishes; slow down (realtime.publishes_per_second)",
                    ));
                }
                if !self.session.grant_allows(&channel) {
                    return Err(Refusal::new(
                        Kind::Forbidden,
                        "forbidden",
                        format!("this connection's grant does not cover `{channel}`"),
                    ));
                }
                let publish = calls::ClientPublish {
                    channel,
                    event,
                    data,
                    via_app,
                    ephemeral,
                };
                calls::publish(realtime.clone(), caller, publish).boxed()
            }
        };
        let id = id.clone();
        // Counted while it waits, however it ends (the connection may close
        // first).
        let in_flight = realtime.gauges.call();
        let reply = call.map(move |outcome| match (outcome, in_flight).0 {
            Ok(result) => format!(r#"{{"id":{id},"result":{result}}}"#),
            Err(failure) => error_reply_from(&id, &failure.code, &failure.message),
        });
        talk.calls.push(reply.boxed());
        Ok(())
    }

    /// Carries out a command: its reply, or none yet for a call.
    async fn execute(&mut self, id: &Id, command: Command) -> Result<Option<Reply>, Refusal> {
        let reply = match command {
            Command::Subscribe { channel, since } => {
                let subscribed = self.session.subscribe(channel.clone(), since).await?;
                // Asked to resume and could not: say so after the reply, so
                // the client reloads its state, then go on from now.
                let reset = (since.is_some() && !subscribed.recovered)
                    .then_some((channel, subscribed.position));
                Reply {
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
                }
            }
            Command::Unsubscribe { channel } => {
                let left = self
                    .session
                    .unsubscribe(channel.as_str(), Reason::ClientUnsubscribed);
                if !left {
                    return Err(Refusal::bad_request(
                        "not_subscribed",
                        format!("not subscribed to `{channel}`"),
                    ));
                }
                Reply::plain(json!({}))
            }
            Command::Ping => Reply::plain(json!({})),
            Command::Call(call) => {
                self.start_call(id, call)?;
                return Ok(None);
            }
            Command::Refresh { token } => {
                let left = self.session.refresh_token(&token)?;
                Reply {
                    result: json!({}),
                    replay: Replay {
                        left,
                        ..Replay::default()
                    },
                }
            }
        };
        Ok(Some(reply))
    }
}

/// A publication as a message for a connection: its compressed frame,
/// shared with every other subscriber, when the connection negotiated
/// permessage-deflate (`deflate_from`), the envelope is at least that long
/// and compressing it paid; else its shared text.
fn publication_message(publication: &Publication, deflate_from: Option<u32>) -> Message {
    let compressed = deflate_from
        .filter(|&min_size| publication.size() >= min_size as usize)
        .and_then(|_| publication.ws_deflated());
    match compressed {
        Some(payload) => Message::Frame(compressed_text(payload.clone())),
        None => Message::Text(publication.ws_text().clone()),
    }
}

/// One final text frame holding a compressed message: RSV1 set (RFC 7692
/// §6), written by tungstenite as it is.
fn compressed_text(payload: bytes::Bytes) -> tungstenite::protocol::frame::Frame {
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    let mut frame =
        tungstenite::protocol::frame::Frame::message(payload, OpCode::Data(Data::Text), true);
    frame.header_mut().rsv1 = true;
    frame
}

/// What a write watches while it waits on the client.
pub(super) struct Watch<'a> {
    /// The outbox's wake-up.
    pub ready: &'a mut Wait,
    pub outbox: &'a crate::hub::Outbox,
    /// How long the client may take to read: a peer that reads nothing for
    /// this long is gone.
    pub within: std::time::Duration,
}

/// Why a write did not complete.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum WriteFailed {
    /// The session fell behind while the write waited.
    Lagged,
    /// The socket failed, or the client read nothing within the time.
    Gone,
}
use WriteFailed::Lagged;

/// One write, bounded in time; returns whether the outbox woke the
/// session meanwhile (not for a lag), so the caller drains it next.
///
/// A session that falls behind while a write waits on its client ends at
/// once as a slow consumer. The invariant: a lagging session writes no
/// further publication, and its Close frame goes out directly behind the
/// bytes already handed to the socket — never behind the rest of a batch,
/// never after a write timeout — so a client that reads again soon sees
/// why it was closed and resumes exactly.
pub(super) async fn write_watching(
    socket: &mut Socket,
    io: Io,
    watch: Watch<'_>,
) -> Result<bool, WriteFailed> {
    let write = async move {
        match io {
            Io::Feed(message) => socket.feed(message).await,
            Io::Flush => socket.flush().await,
            Io::Send(message) => socket.send(message).await,
        }
    };
    tokio::pin!(write);
    let deadline = tokio::time::sleep(watch.within);
    tokio::pin!(deadline);
    let mut woken = false;
    loop {
        tokio::select! {
            biased;
            written = &mut write => return written.map(|()| woken).map_err(|_| WriteFailed::Gone),
            () = &mut *watch.ready => {
                if watch.outbox.is_lagging() {
                    return Err(WriteFailed::Lagged);
                }
                woken = true;
            }
            () = &mut deadline => return Err(WriteFailed::Gone),
        }
    }
}

#[cfg(test)]
mod tests;
