//! The engine behind channels: numbering, history, recovery and (with Redis)
//! the bus between nodes, behind one [`Broker`] trait.
//!
//! A broker stores each publication in its channel's history and hands it to
//! the local [`Hub`](crate::hub::Hub) for fan-out, in offset order per
//! channel. `memory` serves one node; `redis` many.

pub mod memory;
pub mod redis;

use std::hash::Hasher;
use std::sync::Arc;

use async_trait::async_trait;
use fnv::FnvHasher;
use serde::Serialize;

use crate::cursor::{Epoch, Position};
use crate::message::{ChannelName, EventName, Publication};

/// A publish request, already validated.
#[derive(Debug, Clone)]
pub struct Publish {
    /// One or more channels; each gets its own publication.
    pub channels: Vec<ChannelName>,
    /// Valid JSON text.
    pub data: Box<serde_json::value::RawValue>,
    pub event: Option<EventName>,
    /// A repeat within `api.idempotency_window` is answered with the first
    /// result and not published again.
    pub idempotency_key: Option<String>,
    /// The user a WebSocket client publishing it was granted as, set by
    /// pushgate (never taken from the client); `None` from the API.
    pub publisher: Option<String>,
}

impl Publish {
    /// A stable digest of what is published, stored with an idempotency
    /// key: a retry carrying the same digest is answered with the first
    /// result, a different one is refused (`idempotency_key_reused`), never
    /// silently dropped. FNV-1a 64, so every node computes the same.
    ///
    /// The invariant, enforced here for both engines: two publishes are
    /// the same request iff their channel lists, events and data are equal
    /// as JSON values. The channel list is compared in order (`channel: "a"`
    /// is the list `["a"]`); data is hashed in a canonical form, so
    /// whitespace, the order of object keys and the escaping of strings
    /// never tell two requests apart. Numbers compare as serde_json reads
    /// them: an integer and a number with a fraction or exponent differ
    /// (`1` is not `1.0`), while `1e2` and `100.0` are equal; of an
    /// object's repeated key the last counts.
    pub fn fingerprint(&self) -> u64 {
        let mut hash = FnvHasher::default();
        for channel in &self.channels {
            hash.write(channel.as_str().as_bytes());
            hash.write(b"\n");
        }
        hash.write(b"\0");
        if let Some(event) = &self.event {
            hash.write(event.as_str().as_bytes());
        }
        hash.write(b"\0");
        match json_digest(self.data.get()) {
            Some(digest) => hash.write(&digest.to_le_bytes()),
            // Not JSON: the API lets none through. Its bytes, then.
            None => hash.write(self.data.get().as_bytes()),
        }
        hash.finish()
    }
}

/// A digest of the JSON value `json` denotes: equal values (whitespace,
/// key order and string escaping aside; numbers as serde_json reads them;
/// of a repeated key the last) get equal digests. `None` for most text that
/// is not JSON (the API lets none through); never a panic.
///
/// Built bottom-up like a hash tree: a scalar is hashed from its canonical
/// form, a container from its children's digests (an object's by key
/// order), each tagged and length-framed so that no two values are written
/// alike. A loop over a stack of open containers rather than recursion, so
/// any depth the API accepts is handled, in time and memory linear in the
/// text (plus sorting each object's keys).
pub fn json_digest(json: &str) -> Option<u64> {
    enum Open {
        Array(FnvHasher),
        Object {
            members: Vec<(String, u64)>,
            key: Option<String>,
        },
    }
    /// A finished value, as its container (or the result) takes it: an
    /// object's key is a string before it is a digest.
    enum Done {
        String(String),
        Digest(u64),
    }
    fn digest_of(done: Done) -> u64 {
        match done {
            Done::Digest(digest) => digest,
            Done::String(text) => {
                let mut hash = FnvHasher::default();
                hash.write(b"s");
                hash.write(&(text.len() as u64).to_le_bytes());
                hash.write(text.as_bytes());
                hash.finish()
            }
        }
    }
    fn scalar(tag: &[u8], text: &str) -> Done {
        let mut hash = FnvHasher::default();
        hash.write(tag);
        hash.write(text.as_bytes());
        Done::Digest(hash.finish())
    }
    fn place(stack: &mut [Open], result: &mut Option<u64>, done: Done) -> Option<()> {
        match stack.last_mut() {
            None if result.is_none() => *result = Some(digest_of(done)),
            None => return None,
            Some(Open::Array(hash)) => hash.write(&digest_of(done).to_le_bytes()),
            Some(Open::Object { members, key }) => match (key.take(), done) {
                (None, Done::String(text)) => *key = Some(text),
                (None, Done::Digest(_)) => return None,
                (Some(key), done) => members.push((key, digest_of(done))),
            },
        }
        Some(())
    }

    let bytes = json.as_bytes();
    let mut stack: Vec<Open> = Vec::new();
    let mut result = None;
    let mut at = 0;
    while at < bytes.len() {
        let done = match bytes[at] {
            b' ' | b'\t' | b'\n' | b'\r' | b',' | b':' => {
                at += 1;
                continue;
            }
            b'[' => {
                let mut hash = FnvHasher::default();
                hash.write(b"[");
                stack.push(Open::Array(hash));
                at += 1;
                continue;
            }
            b'{' => {
                stack.push(Open::Object {
                    members: Vec::new(),
                    key: None,
                });
                at += 1;
                continue;
            }
            b']' => {
                let Some(Open::Array(mut hash)) = stack.pop() else {
                    return None;
                };
                hash.write(b"]");
                at += 1;
                Done::Digest(hash.finish())
            }
            b'}' => {
                let Some(Open::Object { mut members, key }) = stack.pop() else {
                    return None;
                };
                if key.is_some() {
                    return None;
                }
                // Stable: of a repeated key, the last written stays last.
                members.sort_by(|a, b| a.0.cmp(&b.0));
                let mut hash = FnvHasher::default();
                hash.write(b"{");
                for (index, (key, digest)) in members.iter().enumerate() {
                    if members.get(index + 1).is_some_and(|next| next.0 == *key) {
                        continue;
                    }
                    hash.write(&(key.len() as u64).to_le_bytes());
                    hash.write(key.as_bytes());
                    hash.write(&digest.to_le_bytes());
                }
                hash.write(b"}");
                at += 1;
                Done::Digest(hash.finish())
            }
            b'"' => {
                let mut end = at + 1;
                while *bytes.get(end)? != b'"' {
                    end += if bytes[end] == b'\\' { 2 } else { 1 };
                }
                let text: String = serde_json::from_str(json.get(at..=end)?).ok()?;
                at = end + 1;
                Done::String(text)
            }
            _ => {
                let end = bytes[at..]
                    .iter()
                    .position(|b| b" \t\n\r,:]}".contains(b))
                    .map_or(bytes.len(), |length| at + length);
                let token = json.get(at..end)?;
                at = end;
                match token {
                    "true" | "false" | "null" => scalar(b"l", token),
                    _ => scalar(
                        b"n",
                        &serde_json::from_str::<serde_json::Number>(token)
                            .ok()?
                            .to_string(),
                    ),
                }
            }
        };
        place(&mut stack, &mut result, done)?;
    }
    if stack.is_empty() {
        result
    } else {
        None
    }
}

/// The least time between two epoch moves of one channel caused by readers
/// ahead of its stream. Such a reader means the store lost data, and a new
/// epoch stops offsets from being reused silently; the interval stops forged
/// positions from resetting every subscriber again and again.
pub const EPOCH_MOVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Where a publication landed: `{"channel","epoch","offset"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Published {
    pub channel: ChannelName,
    pub epoch: Epoch,
    pub offset: u64,
}

impl Published {
    pub fn new(channel: ChannelName, position: Position) -> Published {
        Published {
            channel,
            epoch: position.epoch,
            offset: position.offset,
        }
    }

    pub fn position(&self) -> Position {
        Position::new(self.epoch, self.offset)
    }
}

/// The answer to a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishOutcome {
    /// One per channel, in request order.
    pub results: Vec<Published>,
    /// The idempotency key had been seen: nothing new was published.
    pub duplicate: bool,
}

/// Publications after a position, or the news that history cannot cover it.
#[derive(Debug, Clone)]
pub struct History {
    /// In offset order, all in the stream's current epoch.
    pub publications: Vec<Arc<Publication>>,
    /// The stream's newest position when the history was read.
    pub position: Position,
    /// `false` when the gap could not be covered (epoch changed, older than
    /// history, or a position ahead of the stream): the reader must be told,
    /// and continues from `position`.
    pub recovered: bool,
}

impl History {
    /// History cannot cover the reader's gap: it continues from `position`.
    pub fn lost(position: Position) -> History {
        History {
            publications: Vec::new(),
            position,
            recovered: false,
        }
    }
}

/// Why the engine could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// Nothing was stored; safe to retry.
    #[error("the engine is unavailable: {0}")]
    Unavailable(String),
    /// The store failed mid-call: the publication may or may not be stored.
    /// Retrying with the same idempotency key never duplicates it.
    #[error("the engine failed mid-publish; the outcome is unknown: {0}")]
    OutcomeUnknown(String),
    /// Stored on the master, but fewer replicas than required confirmed it
    /// in time: a failover could still lose it, and subscribers may have
    /// it already. Retrying with the same idempotency key never
    /// duplicates it, and waits for the replicas again.
    #[error("stored, but not confirmed by enough replicas: {0}")]
    NotReplicated(String),
    /// The idempotency key was used, within its window, for a different
    /// publish. Nothing was published.
    #[error("this idempotency_key was already used for a different publish")]
    KeyReused,
}

/// One connection's presence on a channel.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Member {
    /// The user the app named, if any.
    pub user: Option<String>,
    /// The connection, unique across nodes.
    pub connection: String,
    /// The node the connection is on.
    pub node: String,
    /// The app's `info` for the connection.
    pub info: Option<Box<serde_json::value::RawValue>>,
}

impl Member {
    /// The control push announcing that this member joined or left
    /// `channel`: `{"op":"join"|"leave","channel","user","connection","info"}`.
    pub fn event_json(&self, channel: &ChannelName, joined: bool) -> String {
        #[derive(Serialize)]
        struct Event<'a> {
            op: &'static str,
            channel: &'a ChannelName,
            user: &'a Option<String>,
            connection: &'a str,
            info: &'a Option<Box<serde_json::value::RawValue>>,
        }
        serde_json::to_string(&Event {
            op: if joined { "join" } else { "leave" },
            channel,
            user: &self.user,
            connection: &self.connection,
            info: &self.info,
        })
        .expect("serializing plain fields cannot fail")
    }
}

/// An order from the API that every node carries out on its own sessions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Order {
    /// Close every connection of `user`.
    Disconnect {
        user: String,
        code: u16,
        reason: String,
    },
    /// Remove `channel` from every connection of `user`.
    Unsubscribe { user: String, channel: String },
}

/// Carries out orders that arrive from other nodes.
pub type OrderHandler = Arc<dyn Fn(Order) + Send + Sync>;

/// Where an engine hands what it hears: this node's local fan-out (the
/// hub). Engines see only this, so they depend on no part of the node.
pub trait Fanout: Send + Sync + 'static {
    /// Hands `publication` to its channel's local subscribers, in the order
    /// of the calls for that channel; returns how many it reached.
    fn deliver(&self, publication: &Arc<Publication>) -> usize;

    /// Whether `channel` has a subscriber on this node. An engine asks when
    /// it is about to stop listening, so a late release never silences a
    /// channel a new subscriber joined.
    fn has_subscribers(&self, channel: &str) -> bool;

    /// The channels starting with `prefix` this node has subscribers on.
    fn heard_here(&self, prefix: &str) -> Vec<ChannelName>;
}

/// What a channel does about who is subscribed (from `channels` rules).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PresenceMode {
    /// Listed by `GET /api/presence`.
    pub listed: bool,
    /// Join and leave events go to the channel's subscribers.
    pub announced: bool,
}

impl PresenceMode {
    pub fn any(self) -> bool {
        self.listed || self.announced
    }
}

/// Engine totals for /metrics.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    /// Channels the engine holds state for.
    pub channels: u64,
    /// Publications held in history (memory engine).
    pub history_publications: u64,
    /// The Redis engine's connection state and counters.
    pub redis: Option<RedisStats>,
}

/// The Redis engine's state, for /metrics.
#[derive(Debug, Clone, Default)]
pub struct RedisStats {
    /// The last command reached Redis.
    pub up: bool,
    /// The pub/sub connection is subscribed and in sync.
    pub pubsub_up: bool,
    /// Pub/sub reconnections after the first connection.
    pub reconnects: u64,
    pub command_errors: u64,
    /// Time spent waiting for commands (shared with the engine).
    pub command_seconds: crate::latency::Latency,
    /// Publications received over pub/sub.
    pub messages: u64,
    /// Payloads from Redis that were not pushgate publications.
    pub malformed: u64,
    /// Channels whose local subscribers were reset after an outage.
    pub resets: u64,
    /// Publishes stored on a master but not confirmed by
    /// `engine.redis.wait_replicas` replicas in time (answered 503).
    pub not_replicated: u64,
    /// On a Redis Cluster: each master's slots (`0-5460`) and whether it is
    /// up (commands reach it and every local channel of its slots is
    /// subscribed there and checked).
    pub shards: Vec<(String, bool)>,
    /// On a Redis Cluster: channels a master unsubscribed unasked (their
    /// slot moved, or the master became a replica).
    pub unsolicited_unsubscribes: u64,
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Stores a publication per channel in history, hands each to the local
    /// hub, and answers only once all are stored.
    async fn publish(&self, publish: Publish) -> Result<PublishOutcome, BrokerError>;

    /// Publications after `since` (or the newest ones without it), at most
    /// `limit`. A publication older than `history.ttl` is never returned.
    async fn history(
        &self,
        channel: &ChannelName,
        since: Option<Position>,
        limit: usize,
    ) -> Result<History, BrokerError>;

    /// The channel's newest position (offset 0 when nothing was published).
    async fn position(&self, channel: &ChannelName) -> Result<Position, BrokerError>;

    /// A local subscriber of `channel` is in the hub and is about to read
    /// history: returns once every publication on `channel` after that
    /// read will reach the hub. Called for every subscriber, not only the
    /// node's first; quick when the channel is heard already.
    async fn subscribe(&self, channel: &ChannelName) -> Result<(), BrokerError>;

    /// This node's last local subscriber for `channel` left.
    async fn unsubscribe(&self, channel: &ChannelName);

    /// `member` subscribed to `channel`: list it and/or announce it.
    /// Answers whether it is its user's first live connection listed on
    /// the channel, on any node (`false` without a user, or unlisted):
    /// decided where the list is kept, atomically, so of two connections
    /// of one user joining at once on two nodes exactly one is first.
    async fn join(
        &self,
        channel: &ChannelName,
        member: &Member,
        mode: PresenceMode,
    ) -> Result<bool, BrokerError>;

    /// `member` left `channel` (unsubscribed or disconnected). Answers
    /// whether that was its user's last live connection listed there, on
    /// any node, decided as [`Broker::join`] decides the first.
    async fn leave(&self, channel: &ChannelName, member: &Member, mode: PresenceMode) -> bool;

    /// The channels starting with `prefix` that some node hears (has
    /// subscribers of its own on), across every node the engine spans.
    async fn heard(&self, prefix: &str) -> Result<Vec<ChannelName>, BrokerError>;

    /// How many nodes hear `channel` now.
    async fn hearing(&self, channel: &ChannelName) -> Result<usize, BrokerError>;

    /// Records whether `channel` has a subscriber on any node now, after
    /// this node's first subscriber arrived or its last left (the engine
    /// listening, or not, already). `Some(true)`: the channel just became
    /// occupied; `Some(false)`: just became vacant; `None`: no change.
    /// Each change is answered `Some` once, to one node, in order.
    async fn occupancy(&self, channel: &ChannelName) -> Result<Option<bool>, BrokerError>;

    /// Who is on `channel`, across every node the engine spans.
    async fn presence(&self, channel: &ChannelName) -> Result<Vec<Member>, BrokerError>;

    /// Hands `order` to every other node; the caller carries it out on
    /// this one. The memory engine has no other node.
    async fn broadcast(&self, order: &Order) -> Result<(), BrokerError>;

    /// Hands an ephemeral publication ([`Publication::ephemeral`]) to
    /// whoever listens on its channel now, on every node. Nothing is
    /// stored: a subscriber that is away misses it, and is not told.
    async fn send_ephemeral(&self, publication: Arc<Publication>) -> Result<(), BrokerError>;

    /// Where orders from other nodes go (set once, at start).
    fn on_orders(&self, handler: OrderHandler);

    /// Takes one of `user`'s `limit` connection places across every node
    /// the engine spans, for `connection`. `Ok(false)`: all are taken. The
    /// memory engine leaves the count to this node's registry.
    async fn claim_user_slot(
        &self,
        user: &str,
        connection: &str,
        limit: usize,
    ) -> Result<bool, BrokerError>;

    /// Gives back a place taken by [`Broker::claim_user_slot`].
    async fn release_user_slot(&self, user: &str, connection: &str);

    /// Whether the engine can serve (for /readyz).
    async fn ready(&self) -> Result<(), BrokerError>;

    fn stats(&self) -> EngineStats;
}

/// Decides what a reader at `since` gets from a stream whose newest offset is
/// `top` in `epoch`, whose oldest replayable offset is `oldest` (top + 1 when
/// nothing is replayable). Both engines use it, so they agree on recovery.
///
/// Returns the first offset to replay (may be `top + 1`: nothing to replay),
/// or `None` when the gap cannot be covered.
pub fn replay_from(since: Position, epoch: Epoch, top: u64, oldest: u64) -> Option<u64> {
    let first_wanted = if since.offset == 0 {
        // "Before the first publication" is valid in any epoch.
        1
    } else if since.epoch != epoch || since.offset > top {
        // Another epoch, or ahead of the stream: history was lost.
        return None;
    } else {
        since.offset + 1
    };
    if first_wanted > top || first_wanted >= oldest {
        Some(first_wanted)
    } else {
        None
    }
}

#[cfg(test)]
mod tests;
