//! Connection events sent to the app (`events`): connect, disconnect (with
//! its [`Reason`]), subscribe, unsubscribe, and join and leave on channels
//! with presence, posted in signed batches
//! (docs/api.md#connection-events-to-the-app).
//!
//! A session hands an event to [`Events::send`], which never waits: the
//! event joins a bounded queue, and when the queue is full its oldest event
//! is dropped and counted. One task per node drains the queue: it gathers
//! up to `events.batch_size` events (waiting at most `events.interval` for
//! a batch to fill), signs the JSON body with HMAC-SHA256 under
//! `events.secret`, and posts it to `<upstream.url><events.path>`.
//!
//! The invariants:
//! - **In order, at least once while the app answers.** The batch in flight
//!   is always the front of the queue, and leaves it only when the app
//!   answers it: `2xx` acknowledges it; a `4xx` other than `408` and `429`
//!   refuses it (retrying the same body would not help), and it is dropped
//!   and counted. Anything else (a `5xx`, `408`, `429`, no answer within
//!   `events.timeout`, a refused connection) sends the front again after a
//!   backoff, re-signed with a new `time_ms`: a batch may arrive more than
//!   once, and each event's `id` tells the copies apart.
//! - **Bounded.** At most `events.queue` events are held, the batch in
//!   flight included: while the app is down, the oldest go first.
//! - **Each event once across nodes.** A node sends only the events of its
//!   own connections; nothing here goes through the engine.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{header, HeaderMap, HeaderValue, StatusCode};
use ring::hmac;
use serde::Serialize;
use tokio::sync::Notify;

use crate::app::AppCalls;
use crate::broker::Member;
use crate::config::{EventKind, Settings};
use crate::message::ChannelName;

/// The header that carries a batch's signature.
pub const SIGNATURE_HEADER: &str = "x-pushgate-signature";
/// The first pause before a failed batch is sent again; it doubles with each
/// failure in a row, up to [`MAX_BACKOFF`], with jitter.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Most of the app's answer read (and dropped): read to its end, its
/// connection is used again.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

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

/// An event in the queue, numbered and timed when it happened.
#[derive(Debug, Clone)]
struct Queued {
    event: Event,
    number: u64,
    time_ms: u64,
}

/// Where events go: nowhere when `events.path` is not set. Cheap to clone.
#[derive(Clone, Default)]
pub struct Events(Option<Arc<Shared>>);

/// Counts for /metrics.
#[derive(Debug, Clone, Default)]
pub struct EventStats {
    /// Events the app acknowledged (2xx).
    pub sent: u64,
    /// Dropped because the queue was full (the oldest went).
    pub dropped_queue_full: u64,
    /// Dropped because the app refused their batch (a 4xx).
    pub dropped_refused: u64,
    /// Left unsent when the node stopped.
    pub dropped_shutdown: u64,
    /// Batches sent that failed and were sent again later.
    pub retries: u64,
    /// Events waiting, the batch in flight included.
    pub queued: u64,
}

struct Shared {
    /// Which kinds are sent, by `EventKind as usize`.
    kinds: [bool; 6],
    capacity: usize,
    batch_size: usize,
    /// This node's name: with an event's number, the event's id.
    node: String,
    queue: Mutex<Queue>,
    /// Wakes the sender: a first event, a full batch, or shutdown.
    wake: Notify,
    closing: AtomicBool,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    timeout: Duration,
    sent: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_refused: AtomicU64,
    dropped_shutdown: AtomicU64,
    retries: AtomicU64,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<Queued>,
    /// How many of the front events belong to the batch in flight.
    in_flight: usize,
    next_number: u64,
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
        let shared = Arc::new(Shared {
            kinds,
            capacity: config.queue,
            batch_size: config.batch_size,
            node,
            queue: Mutex::new(Queue {
                events: VecDeque::with_capacity(config.batch_size),
                ..Queue::default()
            }),
            wake: Notify::new(),
            closing: AtomicBool::new(false),
            task: Mutex::new(None),
            timeout: config.timeout,
            sent: AtomicU64::new(0),
            dropped_queue_full: AtomicU64::new(0),
            dropped_refused: AtomicU64::new(0),
            dropped_shutdown: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        });
        let secret = config.secret.as_deref().unwrap_or_default();
        let sender = Sender {
            shared: shared.clone(),
            calls,
            target: events.path.as_str().to_owned(),
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()),
            interval: config.interval,
        };
        let task = tokio::spawn(sender.run());
        *shared.task.lock().expect("events task lock") = Some(task);
        Events(Some(shared))
    }

    /// Whether events of `kind` are sent: build an event only when they are.
    pub fn wants(&self, kind: EventKind) -> bool {
        self.0
            .as_ref()
            .is_some_and(|shared| shared.kinds[kind as usize])
    }

    /// Queues `event` for the app, unless its kind is not sent. Never
    /// waits: with the queue full, the oldest event is dropped.
    pub fn send(&self, event: Event) {
        let Some(shared) = &self.0 else {
            return;
        };
        if !shared.kinds[event.kind as usize] {
            return;
        }
        let time_ms = now_ms();
        let mut queue = shared.queue.lock().expect("events queue lock");
        if queue.events.len() >= shared.capacity {
            queue.events.pop_front();
            queue.in_flight = queue.in_flight.saturating_sub(1);
            shared.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
        }
        let number = queue.next_number;
        queue.next_number += 1;
        queue.events.push_back(Queued {
            event,
            number,
            time_ms,
        });
        let len = queue.events.len();
        drop(queue);
        // The sender waits for a first event, then for a full batch.
        if len == 1 || len == shared.batch_size {
            shared.wake.notify_one();
        }
    }

    /// Counts for /metrics; `None` when events are off.
    pub fn stats(&self) -> Option<EventStats> {
        let shared = self.0.as_ref()?;
        let queued = shared.queue.lock().expect("events queue lock").events.len();
        Some(EventStats {
            sent: shared.sent.load(Ordering::Relaxed),
            dropped_queue_full: shared.dropped_queue_full.load(Ordering::Relaxed),
            dropped_refused: shared.dropped_refused.load(Ordering::Relaxed),
            dropped_shutdown: shared.dropped_shutdown.load(Ordering::Relaxed),
            retries: shared.retries.load(Ordering::Relaxed),
            queued: queued as u64,
        })
    }

    /// Stops the sender once it has tried, once, to send what is queued,
    /// within `events.timeout`. What is left is counted as dropped.
    pub async fn close(&self) {
        let Some(shared) = &self.0 else {
            return;
        };
        shared.closing.store(true, Ordering::Release);
        shared.wake.notify_one();
        let task = shared.task.lock().expect("events task lock").take();
        if let Some(mut task) = task {
            if tokio::time::timeout(shared.timeout, &mut task)
                .await
                .is_err()
            {
                task.abort();
                let _ = task.await;
                shared.abandon();
            }
        }
    }
}

impl Shared {
    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    fn len(&self) -> usize {
        self.queue.lock().expect("events queue lock").events.len()
    }

    /// Counts every queued event as dropped at shutdown, and forgets them.
    fn abandon(&self) {
        let mut queue = self.queue.lock().expect("events queue lock");
        let left = queue.events.len();
        queue.events.clear();
        queue.in_flight = 0;
        self.dropped_shutdown
            .fetch_add(left as u64, Ordering::Relaxed);
        if left > 0 {
            tracing::warn!(events = left, "stopping with connection events unsent");
        }
    }

    /// The batch in flight leaves the queue: acknowledged, or refused.
    fn settle(&self, acknowledged: bool) -> usize {
        let mut queue = self.queue.lock().expect("events queue lock");
        let settled = queue.in_flight;
        queue.events.drain(..settled);
        queue.in_flight = 0;
        let counter = if acknowledged {
            &self.sent
        } else {
            &self.dropped_refused
        };
        counter.fetch_add(settled as u64, Ordering::Relaxed);
        settled
    }
}

/// What became of one batch.
enum Outcome {
    Acknowledged,
    Refused(StatusCode),
    /// To be sent again: why it failed.
    Failed(String),
}

/// The task that posts batches to the app.
struct Sender {
    shared: Arc<Shared>,
    /// The app client the proxy and the auth requests share, and its
    /// budget of files.
    calls: AppCalls,
    target: String,
    key: hmac::Key,
    interval: Duration,
}

impl Sender {
    async fn run(self) {
        let mut backoff = FIRST_BACKOFF;
        let mut failing = false;
        while self.gather().await {
            let closing = self.shared.is_closing();
            match self.attempt().await {
                Outcome::Acknowledged => {
                    self.shared.settle(true);
                    if std::mem::take(&mut failing) {
                        tracing::info!("the app takes connection events again");
                    }
                    backoff = FIRST_BACKOFF;
                }
                Outcome::Refused(status) => {
                    let dropped = self.shared.settle(false);
                    tracing::warn!(
                        %status,
                        events = dropped,
                        path = %self.target,
                        "the app refused a batch of connection events; dropped"
                    );
                    backoff = FIRST_BACKOFF;
                }
                Outcome::Failed(why) => {
                    if closing {
                        self.shared.abandon();
                        return;
                    }
                    self.shared.retries.fetch_add(1, Ordering::Relaxed);
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(
                            path = %self.target,
                            why,
                            "sending connection events to the app failed; retrying with backoff"
                        );
                    } else {
                        tracing::debug!(why, "sending connection events failed again");
                    }
                    // New events wake the sender too; only shutdown cuts
                    // the pause short.
                    let pause = tokio::time::sleep(jittered(backoff));
                    tokio::pin!(pause);
                    loop {
                        tokio::select! {
                            () = &mut pause => break,
                            () = self.shared.wake.notified() => {
                                if self.shared.is_closing() {
                                    break;
                                }
                            }
                        }
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Waits until a batch is ready: `batch_size` events, or the first
    /// event has waited `interval`, or shutdown (then at once). `false`
    /// when the node is stopping and nothing is left.
    async fn gather(&self) -> bool {
        let shared = &self.shared;
        loop {
            let len = shared.len();
            if shared.is_closing() {
                return len > 0;
            }
            if len > 0 {
                break;
            }
            shared.wake.notified().await;
        }
        let deadline = tokio::time::Instant::now() + self.interval;
        loop {
            if shared.is_closing() || shared.len() >= shared.batch_size {
                return true;
            }
            tokio::select! {
                () = shared.wake.notified() => {}
                () = tokio::time::sleep_until(deadline) => return true,
            }
        }
    }

    /// Sends the front of the queue, once.
    async fn attempt(&self) -> Outcome {
        let batch: Vec<Queued> = {
            let mut queue = self.shared.queue.lock().expect("events queue lock");
            let count = queue.events.len().min(self.shared.batch_size);
            queue.in_flight = count;
            queue.events.iter().take(count).cloned().collect()
        };
        let body = encode(now_ms(), &self.shared.node, &batch);
        let mut headers = HeaderMap::new();
        let json = HeaderValue::from_static("application/json");
        headers.insert(header::CONTENT_TYPE, json);
        headers.insert(
            SIGNATURE_HEADER,
            HeaderValue::from_str(&signature(&self.key, &body)).expect("hex is header text"),
        );
        let answer = self
            .calls
            .post(
                &self.target,
                &headers,
                &body,
                self.shared.timeout,
                MAX_ANSWER_BYTES,
            )
            .await;
        match answer {
            Err(err) => Outcome::Failed(err.to_string()),
            Ok(answer) if answer.status.is_success() => Outcome::Acknowledged,
            Ok(answer)
                if answer.status.is_client_error()
                    && answer.status != StatusCode::REQUEST_TIMEOUT
                    && answer.status != StatusCode::TOO_MANY_REQUESTS =>
            {
                Outcome::Refused(answer.status)
            }
            Ok(answer) => Outcome::Failed(format!("the app answered {}", answer.status)),
        }
    }
}

/// The body of a batch: `{"time_ms", "events": [...]}`.
fn encode(time_ms: u64, node: &str, batch: &[Queued]) -> Vec<u8> {
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
            let event = &queued.event;
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// `duration` with jitter in `[d/2, d]`, so nodes that lost the app at
/// once do not all come back at once.
fn jittered(duration: Duration) -> Duration {
    use rand::Rng;
    let millis = duration.as_millis().max(2) as u64;
    Duration::from_millis(rand::rng().random_range(millis / 2..=millis))
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
                event: Event {
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
                event: Event {
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
