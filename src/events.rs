//! Connection events sent to the app (`events`): connect, disconnect (with
//! its [`Reason`]), subscribe, unsubscribe, and join and leave on channels
//! with presence, posted in signed batches
//! (docs/api.md#connection-events-to-the-app).
//!
//! A session hands an event to [`Events::send`], which never waits: the
//! event joins a bounded queue (`events.queue`; when full, its oldest event
//! is dropped and counted). One task per node posts the queue in batches of
//! up to `events.batch_size` events (waiting at most `events.interval` for
//! a batch to fill), signed with HMAC-SHA256 under `events.secret`, to
//! `<upstream.url><events.path>`; `posting` holds the queue and its
//! invariants (in order, at least once while the app answers, bounded). A
//! batch sent again is re-signed with a new `time_ms`, and each event's
//! `id` tells the copies apart.
//!
//! **Each event once across nodes.** A node sends only the events of its
//! own connections; nothing here goes through the engine.

use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue};
use ring::hmac;
use serde::Serialize;

use crate::app::AppCalls;
use crate::broker::Member;
use crate::config::{EventKind, Settings};
use crate::message::ChannelName;
use crate::posting::{Format, Limits, PostStats, Poster, Queued};

/// The header that carries a batch's signature.
pub const SIGNATURE_HEADER: &str = "x-pushgate-signature";

/// Why a connection ended, or why it left a channel while it stayed. The
/// names are stable: apps match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The client closed the connection (a WebSocket Close frame; an SSE
    /// client that went away).
    ClientClosed,
    /// The connection failed, or the client stopped answering pings.
    ConnectionLost,
    /// The client fell behind and was cut off (WebSocket 4008).
    SlowConsumer,
    /// The grant ran out and was not renewed (WebSocket 4001).
    AuthExpired,
    /// pushgate is shutting down (WebSocket 1001).
    Shutdown,
    /// `POST /api/disconnect`.
    AppDisconnect,
    /// Too many commands (WebSocket 4029).
    RateLimited,
    /// A client message over `realtime.websocket.max_message_size` (1009).
    MessageTooBig,
    /// A frame that broke the WebSocket protocol (1002, 1007).
    ProtocolError,
    /// A channel named at connect was refused, so the connection closed.
    SubscribeRefused,
    /// Unsubscribe only: the client asked.
    ClientUnsubscribed,
    /// Unsubscribe only: `POST /api/unsubscribe`.
    AppUnsubscribe,
    /// Unsubscribe only: a renewed grant no longer allows the channel.
    GrantRevoked,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ClientClosed => "client_closed",
            Reason::ConnectionLost => "connection_lost",
            Reason::SlowConsumer => "slow_consumer",
            Reason::AuthExpired => "auth_expired",
            Reason::Shutdown => "shutdown",
            Reason::AppDisconnect => "app_disconnect",
            Reason::RateLimited => "rate_limited",
            Reason::MessageTooBig => "message_too_big",
            Reason::ProtocolError => "protocol_error",
            Reason::SubscribeRefused => "subscribe_refused",
            Reason::ClientUnsubscribed => "client_unsubscribed",
            Reason::AppUnsubscribe => "app_unsubscribe",
            Reason::GrantRevoked => "grant_revoked",
        }
    }
}

/// One thing that happened to a connection.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventKind,
    /// The connection, its user and node (shared with its presence entry).
    pub member: Arc<Member>,
    /// `websocket` or `sse`.
    pub transport: &'static str,
    pub channel: Option<ChannelName>,
    pub reason: Option<Reason>,
}

/// Where events go: nowhere when `events.path` is not set. Cheap to clone.
#[derive(Clone, Default)]
pub struct Events(Option<Arc<Sink>>);

struct Sink {
    /// Which kinds are sent, by `EventKind as usize`.
    kinds: [bool; 6],
    poster: Poster<Event>,
}

/// Connection events as the app is sent them: `{"time_ms", "events"}`,
/// signed in `X-Pushgate-Signature`.
struct Batches {
    /// This node's name: with an event's number, the event's id.
    node: String,
    key: hmac::Key,
}

impl Format for Batches {
    type Item = Event;

    fn encode(&self, time_ms: u64, batch: &[Queued<Event>]) -> Vec<u8> {
        encode(time_ms, &self.node, batch)
    }

    fn headers(&self, body: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let json = HeaderValue::from_static("application/json");
        headers.insert(header::CONTENT_TYPE, json);
        headers.insert(
            SIGNATURE_HEADER,
            HeaderValue::from_str(&signature(&self.key, body)).expect("hex is header text"),
        );
        headers
    }

    fn what(&self) -> &'static str {
        "connection events"
    }
}

impl Events {
    /// Events on (and their sender started) when `events.path` is set.
    /// Must be called within a tokio runtime.
    pub fn start(settings: &Settings, calls: AppCalls, node: String) -> Events {
        let Some(events) = &settings.events else {
            return Events::default();
        };
        let config = &settings.config.events;
        let mut kinds = [false; 6];
        for kind in &config.kinds {
            kinds[*kind as usize] = true;
        }
        let secret = config.secret.as_deref().unwrap_or_default();
        let format = Batches {
            node,
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()),
        };
        let limits = Limits {
            capacity: config.queue,
            batch_size: config.batch_size,
            interval: config.interval,
            timeout: config.timeout,
        };
        let poster = Poster::start(format, calls, events.path.as_str().to_owned(), limits);
        Events(Some(Arc::new(Sink { kinds, poster })))
    }

    /// Whether events of `kind` are sent: build an event only when they are.
    pub fn wants(&self, kind: EventKind) -> bool {
        self.0
            .as_ref()
            .is_some_and(|sink| sink.kinds[kind as usize])
    }

    /// Queues `event` for the app, unless its kind is not sent. Never
    /// waits: with the queue full, the oldest event is dropped.
    pub fn send(&self, event: Event) {
        if let Some(sink) = &self.0 {
            if sink.kinds[event.kind as usize] {
                sink.poster.send(event);
            }
        }
    }

    /// Counts for /metrics; `None` when events are off.
    pub fn stats(&self) -> Option<PostStats> {
        Some(self.0.as_ref()?.poster.stats())
    }

    /// Stops the sender once it has tried, once, to send what is queued,
    /// within `events.timeout`. What is left is counted as dropped.
    pub async fn close(&self) {
        if let Some(sink) = &self.0 {
            sink.poster.close().await;
        }
    }
}

/// The body of a batch: `{"time_ms", "events": [...]}`.
fn encode(time_ms: u64, node: &str, batch: &[Queued<Event>]) -> Vec<u8> {
    #[derive(Serialize)]
    struct Wire<'a> {
        id: String,
        kind: &'static str,
        time_ms: u64,
        user: &'a Option<String>,
        connection: &'a str,
        transport: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<&'a ChannelName>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'static str>,
    }
    #[derive(Serialize)]
    struct Batch<'a> {
        time_ms: u64,
        events: Vec<Wire<'a>>,
    }
    let events = batch
        .iter()
        .map(|queued| {
            let event = &queued.item;
            Wire {
                id: format!("{node}:{}", queued.number),
                kind: event.kind.as_str(),
                time_ms: queued.time_ms,
                user: &event.member.user,
                connection: &event.member.connection,
                transport: event.transport,
                channel: event.channel.as_ref(),
                reason: event.reason.map(Reason::as_str),
            }
        })
        .collect();
    serde_json::to_vec(&Batch { time_ms, events }).expect("a batch serializes")
}

/// `sha256=<hex HMAC-SHA256(key, body)>`.
pub fn signature(key: &hmac::Key, body: &[u8]) -> String {
    let tag = hmac::sign(key, body);
    let mut text = String::with_capacity(7 + 64);
    text.push_str("sha256=");
    for byte in tag.as_ref() {
        text.push_str(&format!("{byte:02x}"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member() -> Arc<Member> {
        Arc::new(Member {
            user: Some("42".into()),
            connection: "n1-7".into(),
            node: "n1".into(),
            info: None,
        })
    }

    /// Only the kinds `events.kinds` lists are queued; with events off,
    /// nothing is.
    #[tokio::test]
    async fn only_the_configured_kinds_are_queued() {
        let yaml = "api: {keys: [k]}\nupstream: {url: 'http://127.0.0.1:9'}\n\
                    events: {path: /e, secret: 0123456789abcdef0123456789abcdef, \
                    kinds: [disconnect]}\n";
        let settings =
            crate::config::from_yaml(yaml, "test.yaml", Vec::<(String, String)>::new()).unwrap();
        let calls = AppCalls::new(
            crate::app::app_client(&settings),
            Arc::new(tokio::sync::Semaphore::new(1)),
        );
        let events = Events::start(&settings, calls, "n1".into());
        let event = |kind| Event {
            kind,
            member: member(),
            transport: "sse",
            channel: None,
            reason: None,
        };
        assert!(!events.wants(EventKind::Connect));
        assert!(events.wants(EventKind::Disconnect));
        events.send(event(EventKind::Connect));
        events.send(event(EventKind::Disconnect));
        assert_eq!(events.stats().unwrap().queued, 1);

        let off = Events::default();
        assert!(!off.wants(EventKind::Disconnect));
        off.send(event(EventKind::Disconnect));
        assert!(off.stats().is_none());
    }

    #[test]
    fn a_batch_is_the_documented_json_and_its_signature_is_the_hmac_of_it() {
        let batch = vec![
            Queued {
                item: Event {
                    kind: EventKind::Subscribe,
                    member: member(),
                    transport: "websocket",
                    channel: Some(ChannelName::parse("chat:1").unwrap()),
                    reason: None,
                },
                number: 3,
                time_ms: 1000,
            },
            Queued {
                item: Event {
                    kind: EventKind::Disconnect,
                    member: member(),
                    transport: "sse",
                    channel: None,
                    reason: Some(Reason::SlowConsumer),
                },
                number: 4,
                time_ms: 1001,
            },
        ];
        let body = encode(2000, "n1", &batch);
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"time_ms": 2000, "events": [
                {"id": "n1:3", "kind": "subscribe", "time_ms": 1000, "user": "42",
                 "connection": "n1-7", "transport": "websocket", "channel": "chat:1"},
                {"id": "n1:4", "kind": "disconnect", "time_ms": 1001, "user": "42",
                 "connection": "n1-7", "transport": "sse", "reason": "slow_consumer"},
            ]})
        );
        // RFC 4231 test case 2.
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"Jefe");
        assert_eq!(
            signature(&key, b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
