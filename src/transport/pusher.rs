//! The Pusher Channels WebSocket, protocol 7, at `/app/{key}`: what
//! pusher-js and Laravel Echo speak (docs/pusher.md).
//!
//! A connection is anonymous, as in Pusher: it may hear public channels at
//! once; a `private-` or `presence-` subscription needs the app's signature
//! over the connection's `socket_id` (the app's auth endpoint makes it, as
//! for Pusher). Channels live in the engine under `pusher/{app id}/`
//! (`crate::pusher`), so events reach subscribers on every node, and each
//! publication is framed once for every Pusher subscriber.
//!
//! One task serves a connection, as for pushgate's own WebSocket: it reads
//! events, drains the outbox with one flush, and keeps the heartbeat.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::{FutureExt, StreamExt};
use http::{Request, Response};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::websocket::{
    finish, handshake_key, open_socket, read_failure, refused_handshake, socket_config,
    switching_protocols, write_watching, End, Io, Socket, Watch, WriteFailed,
};
use super::{ConnectionGauge, IpSlot, OriginCheck, Realtime, Transport};
use crate::body::Body;
use crate::broker::{Member, PresenceMode};
use crate::config::PusherAppSettings;
use crate::config::WebhookKind;
use crate::conn::ConnInfo;
use crate::error::Refusal;
use crate::hub::{Drained, Outbox};
use crate::message::{ChannelName, Publication};
use crate::pusher::webhooks::Hook;
use crate::pusher::{self, sign, Access, Frame, Kind, PusherApps};
use crate::rate::{Limit, Rate};
use crate::signal::Wait;

/// Pusher's close codes (docs/pusher.md): 4000–4099 do not reconnect,
/// 4100–4199 reconnect after a while, 4200–4299 reconnect at once.
pub mod close {
    /// A protocol version other than 7.
    pub const UNSUPPORTED_PROTOCOL: u16 = 4007;
    /// No protocol version in the query.
    pub const NO_PROTOCOL: u16 = 4008;
    /// The app ended the user's connections (`terminate_connections`).
    pub const UNAUTHORIZED: u16 = 4009;
    /// Over a limit, or fell behind: reconnect after a while.
    pub const OVER_CAPACITY: u16 = 4100;
    /// Shutting down: reconnect (to another node) at once.
    pub const RECONNECT: u16 = 4200;
    /// The client missed its pong.
    pub const PONG_NOT_RECEIVED: u16 = 4201;
}

/// The protocol spoken.
const PROTOCOL: &str = "7";
/// `pusher:error` code for a client event over the rate.
const CLIENT_EVENT_RATE_LIMITED: u16 = 4301;
/// Presence channels are announced and listed, whatever `channels` says.
const PRESENCE: PresenceMode = PresenceMode {
    listed: true,
    announced: true,
};

/// Answers a WebSocket handshake at `/app/{key}`.
pub(super) async fn handle(
    realtime: &Arc<Realtime>,
    pusher: Arc<PusherApps>,
    app: Arc<PusherAppSettings>,
    mut request: Request<Incoming>,
    conn: ConnInfo,
) -> Result<Response<Body>, Refusal> {
    let key = match handshake_key(&request) {
        Ok(key) => key,
        Err(refusal) => return Ok(refused_handshake(refusal)),
    };
    if realtime.origins().check(&request) == OriginCheck::Refused {
        tracing::info!(peer = %conn.peer, origin = ?request.headers().get(http::header::ORIGIN), "Pusher WebSocket from a foreign Origin refused");
        return Err(realtime.refuse_origin());
    }
    // A refusal from here on is a close frame after the upgrade, as Pusher
    // clients expect it.
    let admitted = admit(realtime, request.uri().query(), conn);
    if realtime.access {
        let outcome = match &admitted {
            Ok(_) => "accepted",
            Err(_) => "refused",
        };
        super::access_line(&request, conn, Transport::Pusher, outcome, None);
    }
    let upgrade = hyper::upgrade::on(&mut request);
    let reclaim = request
        .extensions()
        .get::<crate::detach::Reclaim>()
        .copied();
    let config = socket_config(&realtime.config().websocket);
    let spawner = realtime.clone();
    let realtime = realtime.clone();
    let task = async move {
        let upgraded = match upgrade.await {
            Ok(upgraded) => upgraded,
            Err(err) => {
                tracing::debug!(peer = %conn.peer, error = %err, "Pusher WebSocket upgrade failed");
                return;
            }
        };
        // Pusher's socket sends its frames uncompressed: no extension.
        let mut socket = open_socket(upgraded, reclaim, config, false);
        match admitted {
            Err((code, reason)) => {
                let within = realtime.config().websocket.ping_timeout;
                finish(&mut socket, End::Close(code, reason.into()), within).await;
            }
            Ok(slot) => {
                let connection = Connection::new(realtime, pusher, app, socket, conn, slot);
                Box::new(connection).run().await;
            }
        }
    };
    spawner.drain.spawn(task);
    Ok(switching_protocols(&key, false))
}

/// The checks before a connection opens: the protocol version, and the
/// address's limits. A refusal is a close code and a reason.
fn admit(
    realtime: &Arc<Realtime>,
    query: Option<&str>,
    conn: ConnInfo,
) -> Result<IpSlot, (u16, &'static str)> {
    let protocol = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(key, _)| key == "protocol")
        .map(|(_, value)| value);
    let unspoken = match protocol.as_deref() {
        None => Some((close::NO_PROTOCOL, "no protocol version supplied")),
        Some(PROTOCOL) => None,
        Some(_) => Some((close::UNSUPPORTED_PROTOCOL, "only protocol 7 is spoken")),
    };
    if let Some(refused) = unspoken {
        realtime.gauges.refused("pusher_protocol");
        return Err(refused);
    }
    realtime
        .claim_ip(conn.peer.ip(), Transport::Pusher)
        .map_err(|refusal| {
            realtime.gauges.refused(refusal.code);
            (
                close::OVER_CAPACITY,
                "too many connections from this address; reconnect later",
            )
        })
}

/// One channel a connection hears.
struct Subscription {
    /// The name the client knows.
    name: String,
    engine: ChannelName,
    /// On a presence channel: this connection's entry, and who is there.
    presence: Option<Box<Presence>>,
    /// On a cache channel: the last event was sent from history at this
    /// offset of this epoch; the outbox's copy of it, or of anything
    /// older, is not sent again.
    sent_up_to: Option<crate::cursor::Position>,
}

/// A presence channel as one connection sees it: the members, by user,
/// with the connections each has there. A user is added when their first
/// connection joins and removed when their last leaves, whichever node
/// they are on; join and leave events apply as set operations, so one that
/// arrives twice, or before the member list was read, changes nothing.
struct Presence {
    me: Arc<Member>,
    users: HashMap<String, (Vec<String>, Option<Box<RawValue>>)>,
}

impl Presence {
    /// Adds `connection` of `user`; whether the user is new here.
    fn join(&mut self, user: &str, connection: &str, info: Option<Box<RawValue>>) -> bool {
        match self.users.get_mut(user) {
            Some((connections, _)) => {
                if !connections.iter().any(|c| c == connection) {
                    connections.push(connection.to_owned());
                }
                false
            }
            None => {
                self.users
                    .insert(user.to_owned(), (vec![connection.to_owned()], info));
                true
            }
        }
    }

    /// Removes `connection` of `user`; whether that was the user's last.
    fn leave(&mut self, user: &str, connection: &str) -> bool {
        let Some((connections, _)) = self.users.get_mut(user) else {
            return false;
        };
        connections.retain(|c| c != connection);
        if connections.is_empty() {
            self.users.remove(user);
            return true;
        }
        false
    }

    /// `{"presence":{"ids","hash","count"}}`.
    fn data(&self) -> Value {
        let ids: Vec<&String> = self.users.keys().collect();
        let hash: serde_json::Map<String, Value> = self
            .users
            .iter()
            .map(|(user, (_, info))| {
                let info = info
                    .as_ref()
                    .and_then(|info| serde_json::from_str(info.get()).ok())
                    .unwrap_or(Value::Null);
                (user.clone(), info)
            })
            .collect();
        json!({"presence": {"ids": ids, "hash": hash, "count": self.users.len()}})
    }
}

/// The heartbeat: `pusher:ping` when idle, drop the peer when no frame
/// answers it in time.
enum Heartbeat {
    PingAt(Instant),
    PongBy(Instant),
}

struct Connection {
    realtime: Arc<Realtime>,
    pusher: Arc<PusherApps>,
    app: Arc<PusherAppSettings>,
    socket: Socket,
    conn: ConnInfo,
    /// `{node number}.{connection number}`, as Pusher writes socket ids.
    socket_id: String,
    /// This connection in presence entries.
    connection_id: String,
    outbox: Arc<Outbox>,
    ready: Wait,
    /// Where orders for this connection arrive (terminate_connections):
    /// under its user once signed in.
    registration: super::control::Registration,
    /// The user `pusher:signin` named, as the app signed it.
    user: Option<String>,
    ordered: Wait,
    subscriptions: Vec<Subscription>,
    commands: Rate,
    /// `pusher.client_events_per_second`; made at the first client event.
    client_events: Option<Box<Rate>>,
    heartbeat: Heartbeat,
    /// Paces writes as for pushgate's own WebSocket
    /// (`realtime.coalesce_window`): what arrives within the window goes
    /// out in one write.
    pace: super::Pace,
    /// The outbox woke the connection while a write waited.
    woken: bool,
    _slot: IpSlot,
    _gauge: ConnectionGauge,
}

/// An event from the client: `{"event", "channel"?, "data"?}`.
#[derive(Deserialize)]
struct Incoming_<'a> {
    #[serde(borrow)]
    event: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    channel: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

/// `pusher:subscribe`'s data.
#[derive(Deserialize)]
struct SubscribeData {
    channel: String,
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    channel_data: Option<String>,
}

/// A presence subscription's `channel_data`, as the app signed it.
#[derive(Deserialize)]
struct ChannelData {
    user_id: Value,
    #[serde(default)]
    user_info: Option<Box<RawValue>>,
}

/// Why a subscription was refused: `pusher:subscription_error`'s data.
struct SubscribeError {
    kind: &'static str,
    error: String,
    status: u16,
}

impl SubscribeError {
    fn new(kind: &'static str, error: impl Into<String>, status: u16) -> SubscribeError {
        SubscribeError {
            kind,
            error: error.into(),
            status,
        }
    }
}

impl From<Refusal> for SubscribeError {
    fn from(refusal: Refusal) -> SubscribeError {
        SubscribeError::new(
            "Unavailable",
            refusal.message,
            refusal.kind.status().as_u16(),
        )
    }
}

impl From<crate::broker::BrokerError> for SubscribeError {
    fn from(err: crate::broker::BrokerError) -> SubscribeError {
        SubscribeError::new("Unavailable", err.to_string(), 503)
    }
}

impl Connection {
    fn new(
        realtime: Arc<Realtime>,
        pusher: Arc<PusherApps>,
        app: Arc<PusherAppSettings>,
        socket: Socket,
        conn: ConnInfo,
        slot: IpSlot,
    ) -> Connection {
        let registration = realtime.registry.anonymous();
        let socket_id = format!("{}.{}", realtime.node_number, registration.id);
        let connection_id = realtime.connection_id(registration.id);
        let outbox = Outbox::new(realtime.queue);
        let ready = outbox.ready_owned();
        let ordered = registration.control.ordered_owned();
        let config = realtime.config();
        let commands = Rate::new(config.commands_per_second, config.command_burst);
        let heartbeat = Heartbeat::PingAt(Instant::now() + pusher.activity_timeout);
        let gauge = realtime.count(Transport::Pusher);
        Connection {
            realtime,
            pusher,
            app,
            socket,
            conn,
            socket_id,
            connection_id,
            outbox,
            ready,
            registration,
            user: None,
            ordered,
            subscriptions: Vec::new(),
            commands,
            client_events: None,
            heartbeat,
            pace: super::Pace::new(config.coalesce_window),
            woken: false,
            _slot: slot,
            _gauge: gauge,
        }
    }

    async fn run(mut self: Box<Self>) {
        let established = pusher::server_event(
            "pusher:connection_established",
            None,
            &json!({
                "socket_id": self.socket_id,
                "activity_timeout": self.pusher.activity_timeout.as_secs(),
            }),
        );
        let end = match self.send(established).await {
            Ok(()) => self.serve().await,
            Err(end) => end,
        };
        if let End::Close(code, reason) = &end {
            tracing::debug!(peer = %self.conn.peer, code, %reason, "closing Pusher WebSocket");
        }
        let within = self.realtime.config().websocket.ping_timeout;
        Box::pin(finish(&mut self.socket, end, within)).await;
    }

    async fn serve(&mut self) -> End {
        // Pusher's heartbeat: after `activity_timeout` without a frame, a
        // `pusher:ping`, which clients answer with `pusher:pong`.
        let ping_interval = self.pusher.activity_timeout;
        let ping_timeout = self.realtime.config().websocket.ping_timeout;
        let deadline = |heartbeat: &Heartbeat| match heartbeat {
            Heartbeat::PingAt(at) | Heartbeat::PongBy(at) => *at,
        };
        let heartbeat = tokio::time::sleep_until(deadline(&self.heartbeat));
        // While the pace holds a write back, what arrives meanwhile goes
        // out with it when `hold` fires. It has a timer only then.
        let mut hold = super::Hold::default();
        tokio::pin!(heartbeat);
        loop {
            if std::mem::take(&mut self.woken) {
                if let Err(end) = Box::pin(self.paced_flush(&mut hold)).await {
                    return end;
                }
            }
            tokio::select! {
                biased;
                () = &mut self.ordered => {
                    let orders = self.registration.control.take();
                    if orders.shutdown {
                        return End::Close(close::RECONNECT, "server shutting down; reconnect".into());
                    }
                    if let Some((code, reason)) = orders.disconnect {
                        return End::Close(code, reason);
                    }
                }
                () = &mut self.ready => {
                    if let Err(end) = Box::pin(self.paced_flush(&mut hold)).await {
                        return end;
                    }
                }
                () = &mut hold, if self.pace.holding() => {
                    if let Err(end) = Box::pin(self.paced_flush(&mut hold)).await {
                        return end;
                    }
                }
                message = self.socket.next().map(|message| message.map(Box::new)) => {
                    self.heartbeat = Heartbeat::PingAt(Instant::now() + ping_interval);
                    heartbeat.as_mut().reset(deadline(&self.heartbeat));
                    let Some(message) = message else {
                        return End::Gone;
                    };
                    match *message {
                        Err(err) => {
                            tracing::debug!(peer = %self.conn.peer, error = %err, "Pusher WebSocket read failed");
                            return read_failure(&err);
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
                            heartbeat.as_mut().reset(deadline(&self.heartbeat));
                            let ping = pusher::server_event("pusher:ping", None, &json!({}));
                            if Box::pin(self.send(ping)).await.is_err() {
                                return End::Gone;
                            }
                        }
                        Heartbeat::PongBy(_) => {
                            return End::Close(close::PONG_NOT_RECEIVED, "pong reply not received".into());
                        }
                    }
                }
            }
        }
    }

    /// One write, bounded by the ping timeout; a connection that falls
    /// behind meanwhile ends as over capacity (Pusher clients reconnect
    /// after a while).
    async fn io(&mut self, io: Io) -> Result<(), End> {
        let watch = Watch {
            ready: &mut self.ready,
            outbox: &self.outbox,
            within: self.realtime.config().websocket.ping_timeout,
        };
        match write_watching(&mut self.socket, io, watch).await {
            Ok(woken) => {
                self.woken |= woken;
                Ok(())
            }
            Err(WriteFailed::Lagged) => Err(self.slow_consumer()),
            Err(WriteFailed::Gone) => Err(End::Gone),
        }
    }

    fn slow_consumer(&self) -> End {
        tracing::info!(peer = %self.conn.peer, "slow consumer: Pusher WebSocket closed with 4100");
        End::Close(
            close::OVER_CAPACITY,
            "slow consumer: reconnect later".into(),
        )
    }

    async fn send(&mut self, text: String) -> Result<(), End> {
        self.io(Io::Send(Message::text(text))).await
    }

    async fn feed(&mut self, message: Message) -> Result<(), End> {
        self.io(Io::Feed(message)).await
    }

    /// Writes what the outbox holds now, or holds the write back until the
    /// pace's window has passed (setting `hold` to fire then).
    async fn paced_flush(&mut self, hold: &mut super::Hold) -> Result<(), End> {
        let now = Instant::now();
        match self.pace.on_wake(now, || self.outbox.is_urgent()) {
            Some(until) => {
                hold.until(until);
                Ok(())
            }
            None => {
                hold.release();
                self.flush_outbox(now).await
            }
        }
    }

    /// Writes everything the outbox holds, with one flush (the pace's
    /// write at `now`).
    async fn flush_outbox(&mut self, now: Instant) -> Result<(), End> {
        let mut batch = super::take_batch();
        match self.outbox.drain_into(&mut batch) {
            Drained::Lagging => return Err(self.slow_consumer()),
            Drained::Closed => return Err(End::Gone),
            Drained::Open => {}
        }
        if let Some(oldest) = batch.first() {
            self.realtime.gauges.delivered(oldest);
        }
        let mut fed = false;
        for publication in batch.drain(..) {
            for text in self.frames_for(&publication) {
                self.feed(Message::Text(text)).await?;
                fed = true;
            }
        }
        super::give_batch(batch);
        if fed {
            self.pace.wrote(now);
            self.io(Io::Flush).await?;
        }
        Ok(())
    }

    /// What this connection is sent for `publication`: its frame (shared
    /// with every other Pusher subscriber), or a member's coming and going
    /// on a presence channel; nothing for what it is not to hear.
    fn frames_for(
        &mut self,
        publication: &Publication,
    ) -> smallvec::SmallVec<[tokio_tungstenite::tungstenite::Utf8Bytes; 1]> {
        let mut frames = smallvec::SmallVec::new();
        let Some(subscription) = self
            .subscriptions
            .iter_mut()
            .find(|s| s.engine == *publication.channel())
        else {
            return frames;
        };
        if publication.is_reset_marker() {
            // Pusher clients do not resume: nothing to tell.
            return frames;
        }
        if let (false, Some(sent)) = (publication.is_aside(), subscription.sent_up_to) {
            let at = publication.position();
            if at.epoch == sent.epoch && at.offset <= sent.offset {
                return frames;
            }
        }
        if let Some(presence) = subscription.presence.as_deref_mut() {
            if publication.is_aside() {
                if let Some(change) = pusher::member_change(publication) {
                    let Some(user) = change.user else {
                        return frames;
                    };
                    let text = if change.op == "join" {
                        presence
                            .join(&user, &change.connection, change.info.clone())
                            .then(|| {
                                let info: Value = change
                                    .info
                                    .as_ref()
                                    .and_then(|info| serde_json::from_str(info.get()).ok())
                                    .unwrap_or(Value::Null);
                                pusher::server_event(
                                    "pusher_internal:member_added",
                                    Some(&subscription.name),
                                    &json!({"user_id": user, "user_info": info}),
                                )
                            })
                    } else {
                        presence.leave(&user, &change.connection).then(|| {
                            pusher::server_event(
                                "pusher_internal:member_removed",
                                Some(&subscription.name),
                                &json!({"user_id": user}),
                            )
                        })
                    };
                    frames.extend(text.map(Into::into));
                    return frames;
                }
            }
        }
        let frame = publication.rendered(pusher::frame);
        if let Some(Some(Frame { text, except })) = frame {
            if except.as_deref() != Some(self.socket_id.as_str()) {
                frames.push(text.clone());
            }
        }
        frames
    }

    async fn on_message(&mut self, message: Message) -> Result<(), End> {
        match message {
            Message::Text(text) => {
                if !self.commands.take() {
                    self.realtime.refused.count(Limit::Commands);
                    return self
                        .error(
                            Some(CLIENT_EVENT_RATE_LIMITED),
                            "too many messages; slow down",
                        )
                        .await;
                }
                self.on_event(text.as_str()).await
            }
            Message::Binary(_) => self.error(None, "send events as JSON text frames").await,
            Message::Ping(_) => self.io(Io::Flush).await,
            Message::Pong(_) | Message::Frame(_) => Ok(()),
            Message::Close(_) => Err(End::PeerClosed),
        }
    }

    /// `pusher:error` with `code` and `message`.
    async fn error(&mut self, code: Option<u16>, message: &str) -> Result<(), End> {
        let text = json!({"event": "pusher:error", "data": {"code": code, "message": message}});
        self.send(text.to_string()).await
    }

    async fn on_event(&mut self, text: &str) -> Result<(), End> {
        let Ok(event) = serde_json::from_str::<Incoming_>(text) else {
            return self
                .error(None, "expected a JSON object with an `event` string")
                .await;
        };
        match event.event.as_ref() {
            "pusher:ping" => {
                let pong = pusher::server_event("pusher:pong", None, &json!({}));
                self.send(pong).await
            }
            "pusher:pong" => Ok(()),
            "pusher:subscribe" => {
                let Some(data) = event.data.and_then(object_or_string::<SubscribeData>) else {
                    return self
                        .error(None, "pusher:subscribe needs data with a `channel`")
                        .await;
                };
                let channel = data.channel.clone();
                match Box::pin(self.subscribe(data)).await {
                    Ok(frames) => {
                        for frame in frames {
                            self.feed(Message::text(frame)).await?;
                        }
                        self.io(Io::Flush).await
                    }
                    Err(err) => {
                        let text = pusher::server_event(
                            "pusher:subscription_error",
                            Some(&channel),
                            &json!({"type": err.kind, "error": err.error, "status": err.status}),
                        );
                        self.send(text).await
                    }
                }
            }
            "pusher:unsubscribe" => {
                #[derive(Deserialize)]
                struct Unsubscribe {
                    channel: String,
                }
                if let Some(data) = event.data.and_then(object_or_string::<Unsubscribe>) {
                    self.unsubscribe(&data.channel);
                }
                Ok(())
            }
            "pusher:signin" => {
                #[derive(Deserialize)]
                struct Signin {
                    auth: String,
                    user_data: String,
                }
                let signin = event.data.and_then(object_or_string::<Signin>);
                match signin
                    .ok_or_else(|| {
                        "pusher:signin needs data with `auth` and `user_data`".to_owned()
                    })
                    .and_then(|signin| self.signin(&signin.auth, signin.user_data))
                {
                    Ok(success) => self.send(success).await,
                    Err(why) => self.error(Some(close::UNAUTHORIZED), &why).await,
                }
            }
            name if name.starts_with("client-") => {
                let channel = event.channel.as_deref().unwrap_or("").to_owned();
                let data = event.data.map_or("null", RawValue::get).to_owned();
                match self.client_event(name, &channel, &data).await {
                    Ok(()) => Ok(()),
                    Err((code, message)) => self.error(code, &message).await,
                }
            }
            name => {
                let message = format!("`{name}` is not an event a client may send");
                self.error(None, &message).await
            }
        }
    }

    /// Signs the connection in as the user `user_data` names, when the app
    /// signed it; answers `pusher:signin_success`. From then on the
    /// connection hears its user's channel and is reached by
    /// `terminate_connections`.
    fn signin(&mut self, auth: &str, user_data: String) -> Result<String, String> {
        let app = &self.app;
        if !sign::verify_user_auth(&app.key, &app.secret, &self.socket_id, &user_data, auth) {
            return Err("the signature does not authorize this user".into());
        }
        #[derive(Deserialize)]
        struct UserData {
            id: Value,
        }
        let id = match serde_json::from_str::<UserData>(&user_data).map(|data| data.id) {
            Ok(Value::String(id)) if !id.is_empty() => id,
            Ok(Value::Number(id)) => id.to_string(),
            _ => return Err("user_data must be JSON with an `id`".into()),
        };
        if self.user.is_some() {
            return Err("this connection is signed in already".into());
        }
        let key = crate::pusher::api::user_key(&app.id, &id);
        let registration = self
            .realtime
            .registry
            .register(Some(&key))
            .map_err(|refusal| refusal.message)?;
        self.ordered = registration.control.ordered_owned();
        self.registration = registration;
        self.user = Some(id);
        Ok(pusher::server_event(
            "pusher:signin_success",
            None,
            &json!({ "user_data": user_data }),
        ))
    }

    /// Subscribes to the channel `data` names; the frames to send: the
    /// success, then the last event of a cache channel (or its miss).
    async fn subscribe(&mut self, data: SubscribeData) -> Result<Vec<String>, SubscribeError> {
        let name = data.channel;
        pusher::check_channel(&name)
            .map_err(|why| SubscribeError::new("InvalidChannel", why, 400))?;
        if self.subscriptions.iter().any(|s| s.name == name) {
            return Err(SubscribeError::new(
                "AlreadySubscribed",
                format!("already subscribed to {name}"),
                400,
            ));
        }
        let max = self.realtime.config().max_channels;
        if self.subscriptions.len() >= max {
            return Err(SubscribeError::new(
                "LimitReached",
                format!("a connection may hear at most {max} channels (realtime.max_channels)"),
                400,
            ));
        }
        let kind = Kind::of(&name);
        let app = self.app.clone();
        let authorized = |channel_data: Option<&str>| {
            let auth = data.auth.as_deref().unwrap_or("");
            sign::verify_channel_auth(
                &app.key,
                &app.secret,
                &self.socket_id,
                &name,
                channel_data,
                auth,
            )
        };
        let member = match kind.access {
            Access::Public => None,
            Access::User => {
                let id = name.strip_prefix(pusher::USER_CHANNEL_PREFIX);
                if id.is_none() || id != self.user.as_deref() {
                    return Err(SubscribeError::new(
                        "AuthError",
                        "a user's channel is heard only by connections signed in as that user",
                        403,
                    ));
                }
                None
            }
            Access::Private => {
                if !authorized(None) {
                    return Err(unauthorized(&name));
                }
                None
            }
            Access::Presence => {
                let channel_data = data.channel_data.as_deref().unwrap_or("");
                if !authorized(Some(channel_data)) {
                    return Err(unauthorized(&name));
                }
                let parsed = serde_json::from_str::<ChannelData>(channel_data).ok();
                let user = parsed.as_ref().and_then(|data| match &data.user_id {
                    Value::String(user) if !user.is_empty() => Some(user.clone()),
                    Value::Number(user) => Some(user.to_string()),
                    _ => None,
                });
                let Some(user) = user else {
                    return Err(SubscribeError::new(
                        "InvalidChannelData",
                        "channel_data must be JSON with a user_id",
                        400,
                    ));
                };
                Some(Arc::new(Member {
                    user: Some(user),
                    connection: self.connection_id.clone(),
                    node: self.realtime.node.clone(),
                    info: parsed.and_then(|data| data.user_info),
                }))
            }
        };
        let engine = pusher::engine_channel(&app.id, &name)
            .map_err(|why| SubscribeError::new("InvalidChannel", why, 400))?;

        let realtime = self.realtime.clone();
        let channels = &realtime.channels;
        let joining = channels.join(&engine, &self.outbox).await?;
        channels.hub.discard(&engine, &self.outbox);
        let mut frames = Vec::with_capacity(2);
        let presence = match member {
            None => None,
            Some(me) => {
                let first = channels.broker.join(&engine, &me, PRESENCE).await?;
                let mut presence = Presence {
                    me: me.clone(),
                    users: HashMap::new(),
                };
                let members = channels.broker.presence(&engine).await;
                let members = match members {
                    Ok(members) => members,
                    Err(err) => {
                        channels.broker.leave(&engine, &me, PRESENCE).await;
                        return Err(err.into());
                    }
                };
                for member in members {
                    if let Some(user) = &member.user {
                        presence.join(user, &member.connection, member.info.clone());
                    }
                }
                let mine = me.user.as_deref().unwrap_or_default();
                presence.join(mine, &me.connection, me.info.clone());
                if presence.users.len() > self.pusher.max_presence_members {
                    channels.broker.leave(&engine, &me, PRESENCE).await;
                    return Err(SubscribeError::new(
                        "LimitReached",
                        format!(
                            "a presence channel may have at most {} members (pusher.max_presence_members)",
                            self.pusher.max_presence_members
                        ),
                        403,
                    ));
                }
                if first {
                    let mut hook = Hook::new(WebhookKind::MemberAdded, &name);
                    hook.user_id = me.user.clone();
                    self.pusher.webhook(&app, WebhookKind::MemberAdded, hook);
                }
                Some(Box::new(presence))
            }
        };
        let succeeded = presence.as_ref().map_or(json!({}), |p| p.data());
        frames.push(pusher::server_event(
            "pusher_internal:subscription_succeeded",
            Some(&name),
            &succeeded,
        ));
        let mut sent_up_to = None;
        if kind.cache {
            let now = channels.broker.history(&engine, None, 0).await?;
            let last = match now.position.offset {
                0 => None,
                offset => {
                    let before = crate::cursor::Position::new(now.position.epoch, offset - 1);
                    channels
                        .broker
                        .history(&engine, Some(before), 1)
                        .await?
                        .publications
                        .pop()
                }
            };
            let frame = last.as_ref().and_then(|last| pusher::frame(last));
            match frame {
                Some(frame) => frames.push(frame.text.to_string()),
                None => {
                    frames.push(pusher::server_event(
                        "pusher:cache_miss",
                        Some(&name),
                        &json!({}),
                    ));
                    let hook = Hook::new(WebhookKind::CacheMiss, &name);
                    self.pusher.webhook(&app, WebhookKind::CacheMiss, hook);
                }
            }
            sent_up_to = Some(now.position);
        }
        joining.keep();
        self.subscriptions.push(Subscription {
            name,
            engine,
            presence,
            sent_up_to,
        });
        self.realtime.gauges.add_subscriptions(Transport::Pusher, 1);
        Ok(frames)
    }

    fn unsubscribe(&mut self, name: &str) {
        let Some(index) = self.subscriptions.iter().position(|s| s.name == name) else {
            return;
        };
        let subscription = self.subscriptions.remove(index);
        self.realtime
            .gauges
            .add_subscriptions(Transport::Pusher, -1);
        self.release(subscription);
    }

    /// Leaves a channel: the hub at once, the engine on its own task; a
    /// presence member's leaving is its user's `member_removed` webhook
    /// when it was their last connection there, on any node.
    ///
    /// A member leaves before the channel is released, so its
    /// `member_removed` is queued before the channel's `channel_vacated`.
    fn release(&self, subscription: Subscription) {
        let realtime = &self.realtime;
        let (Some(presence), Ok(runtime)) =
            (subscription.presence, tokio::runtime::Handle::try_current())
        else {
            realtime
                .channels
                .release(&subscription.engine, &self.outbox, None);
            return;
        };
        let (realtime, outbox) = (realtime.clone(), self.outbox.clone());
        let (pusher, app) = (self.pusher.clone(), self.app.clone());
        let (engine, name) = (subscription.engine, subscription.name);
        runtime.spawn(async move {
            let channels = &realtime.channels;
            let last = channels.broker.leave(&engine, &presence.me, PRESENCE).await;
            if last {
                let mut hook = Hook::new(WebhookKind::MemberRemoved, &name);
                hook.user_id = presence.me.user.clone();
                pusher.webhook(&app, WebhookKind::MemberRemoved, hook);
            }
            channels.release(&engine, &outbox, None);
        });
    }

    /// Sends a `client-*` event to the channel's other subscribers; a
    /// refusal is `pusher:error`'s code and message.
    async fn client_event(
        &mut self,
        event: &str,
        channel: &str,
        data: &str,
    ) -> Result<(), (Option<u16>, String)> {
        if !self.app.client_events {
            return Err((
                None,
                "client events are not enabled for this app (pusher.apps[].client_events)".into(),
            ));
        }
        let Some(subscription) = self.subscriptions.iter().find(|s| s.name == channel) else {
            return Err((
                None,
                format!("client event rejected: not subscribed to `{channel}`"),
            ));
        };
        let kind = Kind::of(channel);
        if kind.access == Access::Public || kind.encrypted {
            return Err((
                None,
                "client events are allowed on private- and presence- channels only".into(),
            ));
        }
        if event.len() > pusher::MAX_EVENT_LEN || data.len() > self.pusher.max_event_size {
            return Err((
                None,
                format!(
                    "client event rejected: names are at most {} bytes, data at most {} (pusher.max_event_size)",
                    pusher::MAX_EVENT_LEN,
                    self.pusher.max_event_size
                ),
            ));
        }
        let per_second = self.pusher.client_events_per_second;
        let rate = self
            .client_events
            .get_or_insert_with(|| Box::new(Rate::new(per_second, per_second)));
        if !rate.take() {
            self.realtime.refused.count(Limit::ClientPublishes);
            return Err((
                Some(CLIENT_EVENT_RATE_LIMITED),
                format!("client event rejected: only {per_second} accepted per second"),
            ));
        }
        let data = RawValue::from_string(data.to_owned()).map_err(|_| (None, "bad data".into()))?;
        let stored = pusher::Stored {
            event: event.into(),
            data: &data,
            user_id: subscription
                .presence
                .as_ref()
                .and_then(|p| p.me.user.as_deref())
                .map(Into::into),
            except: Some(self.socket_id.as_str().into()),
        };
        let user_id = stored.user_id.as_deref().map(str::to_owned);
        let stored = serde_json::to_string(&stored).expect("plain fields serialize");
        let publication = Publication::ephemeral(subscription.engine.clone(), None, None, &stored);
        self.realtime
            .channels
            .broker
            .send_ephemeral(Arc::new(publication))
            .await
            .map_err(|err| (None, format!("client event not sent: {err}")))?;
        if PusherApps::wants(&self.app, WebhookKind::ClientEvent) {
            let mut hook = Hook::new(WebhookKind::ClientEvent, channel);
            hook.event = Some(event.to_owned());
            // The data as a string, as Pusher sends it.
            hook.data = Some(match serde_json::from_str::<String>(data.get()) {
                Ok(text) => text,
                Err(_) => data.get().to_owned(),
            });
            hook.socket_id = Some(self.socket_id.clone());
            hook.user_id = user_id;
            self.pusher
                .webhook(&self.app, WebhookKind::ClientEvent, hook);
        }
        Ok(())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.outbox.close();
        self.realtime
            .gauges
            .add_subscriptions(Transport::Pusher, -(self.subscriptions.len() as i64));
        for subscription in std::mem::take(&mut self.subscriptions) {
            self.release(subscription);
        }
    }
}

fn unauthorized(channel: &str) -> SubscribeError {
    SubscribeError::new(
        "AuthError",
        format!("the signature does not authorize this connection for {channel}"),
        401,
    )
}

/// `data` read as `T`, whether sent as an object or as a string holding
/// one (clients send either).
fn object_or_string<T: serde::de::DeserializeOwned>(data: &RawValue) -> Option<T> {
    serde_json::from_str::<T>(data.get()).ok().or_else(|| {
        let text: String = serde_json::from_str(data.get()).ok()?;
        serde_json::from_str(&text).ok()
    })
}
