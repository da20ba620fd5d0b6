//! `events`: connection events sent to the app, checked.

use std::time::Duration;

use http::uri::PathAndQuery;
use serde::{Deserialize, Serialize};

use super::units::duration;

/// `events.batch_size`.
pub const DEFAULT_EVENTS_BATCH_SIZE: usize = 100;
/// `events.interval`.
pub const DEFAULT_EVENTS_INTERVAL: Duration = Duration::from_millis(200);
/// `events.queue`.
pub const DEFAULT_EVENTS_QUEUE: usize = 10_000;
/// `events.timeout`.
pub const DEFAULT_EVENTS_TIMEOUT: Duration = Duration::from_secs(5);
/// Shortest `events.secret`: as many bytes as the HMAC-SHA256 output.
pub const MIN_EVENTS_SECRET_BYTES: usize = 32;
/// Largest `events.batch_size`.
pub const MAX_EVENTS_BATCH_SIZE: usize = 10_000;
/// Largest `events.queue`: the queue is memory.
pub const MAX_EVENTS_QUEUE: usize = 10_000_000;
/// Longest `events.interval`.
pub const MAX_EVENTS_INTERVAL: Duration = Duration::from_secs(60);

/// What happened to a connection, as the app is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Connect,
    Disconnect,
    Subscribe,
    Unsubscribe,
    Join,
    Leave,
}

impl EventKind {
    pub const ALL: [EventKind; 6] = [
        EventKind::Connect,
        EventKind::Disconnect,
        EventKind::Subscribe,
        EventKind::Unsubscribe,
        EventKind::Join,
        EventKind::Leave,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Connect => "connect",
            EventKind::Disconnect => "disconnect",
            EventKind::Subscribe => "subscribe",
            EventKind::Unsubscribe => "unsubscribe",
            EventKind::Join => "join",
            EventKind::Leave => "leave",
        }
    }
}

/// Connection events, posted to the app in signed batches. Off while
/// `path` is not set.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// `POST <upstream.url><path>` with each batch.
    pub path: Option<String>,
    /// The HMAC-SHA256 key each batch is signed with (better from the
    /// environment: PUSHGATE_EVENTS__SECRET).
    pub secret: Option<String>,
    /// Most events in one batch.
    pub batch_size: usize,
    /// How long an event may wait for others to share its batch.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// Most events waiting; past it the oldest is dropped (and counted).
    pub queue: usize,
    /// How long the app may take to answer a batch (its answer's head, then
    /// its body, each within this).
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Which kinds are sent.
    pub kinds: Vec<EventKind>,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            path: None,
            secret: None,
            batch_size: DEFAULT_EVENTS_BATCH_SIZE,
            interval: DEFAULT_EVENTS_INTERVAL,
            queue: DEFAULT_EVENTS_QUEUE,
            timeout: DEFAULT_EVENTS_TIMEOUT,
            kinds: EventKind::ALL.to_vec(),
        }
    }
}

impl std::fmt::Debug for EventsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret has no business in a log line.
        f.debug_struct("EventsConfig")
            .field("path", &self.path)
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .field("batch_size", &self.batch_size)
            .field("interval", &self.interval)
            .field("queue", &self.queue)
            .field("timeout", &self.timeout)
            .field("kinds", &self.kinds)
            .finish()
    }
}

/// `events` with `path` set, as a node runs it.
#[derive(Debug, Clone)]
pub struct EventsSettings {
    pub path: PathAndQuery,
}

/// Checks `events`; reports each problem through `problem(key, why, fix)`.
/// The settings when events are on and every check passed.
pub(super) fn check(
    events: &EventsConfig,
    problem: &mut impl FnMut(&str, String, &str),
) -> Option<EventsSettings> {
    let path = events.path.as_ref()?;
    let mut ok = true;
    let parsed = path
        .parse::<PathAndQuery>()
        .ok()
        .filter(|_| path.starts_with('/') && !path.contains(['?', '#']));
    if parsed.is_none() {
        ok = false;
        problem(
            "events.path",
            format!("`{path}` is not a path"),
            "write an endpoint of the app as a path, e.g. /realtime/events, or null to send no events",
        );
    }
    match &events.secret {
        None => {
            ok = false;
            problem(
                "events.secret",
                "events.path is set but no secret signs the batches".into(),
                "set PUSHGATE_EVENTS__SECRET (or events.secret) to a random string of at least \
                 32 bytes, e.g. from `openssl rand -hex 32`",
            );
        }
        Some(secret) if secret.len() < MIN_EVENTS_SECRET_BYTES => {
            ok = false;
            problem(
                "events.secret",
                format!("{} bytes is too short to sign with", secret.len()),
                "use a random string of at least 32 bytes, e.g. from `openssl rand -hex 32`",
            );
        }
        Some(_) => {}
    }
    if !(1..=MAX_EVENTS_BATCH_SIZE).contains(&events.batch_size) {
        ok = false;
        problem(
            "events.batch_size",
            format!(
                "{} is outside 1..={MAX_EVENTS_BATCH_SIZE}",
                events.batch_size
            ),
            "use e.g. 100",
        );
    }
    if events.queue < events.batch_size || events.queue > MAX_EVENTS_QUEUE {
        ok = false;
        problem(
            "events.queue",
            format!(
                "{} is outside events.batch_size ({})..={MAX_EVENTS_QUEUE}",
                events.queue, events.batch_size
            ),
            "use e.g. 10000",
        );
    }
    if events.interval.is_zero() || events.interval > MAX_EVENTS_INTERVAL {
        ok = false;
        problem(
            "events.interval",
            format!(
                "{} is outside (0s, 1m]",
                humantime::format_duration(events.interval)
            ),
            "use e.g. 200ms",
        );
    }
    if events.timeout.is_zero() {
        ok = false;
        problem(
            "events.timeout",
            "must be longer than zero".into(),
            "use e.g. `5s`",
        );
    }
    if events.kinds.is_empty() {
        ok = false;
        problem(
            "events.kinds",
            "no kind of event would be sent".into(),
            "list some of connect, disconnect, subscribe, unsubscribe, join, leave; \
             or set events.path to null to send none",
        );
    }
    Some(EventsSettings { path: parsed? }).filter(|_| ok)
}
