//! The engine behind channels: numbering, history, recovery and (with Redis)
//! the bus between nodes, behind one [`Broker`] trait.
//!
//! A broker stores each publication in its channel's history and hands it to
//! the local [`Hub`](crate::hub::Hub) for fan-out, in offset order per
//! channel. `memory` serves one node; `redis` many.

pub mod memory;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;
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
        let mut hash = Fnv64::new();
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
        Array(Fnv64),
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
                let mut hash = Fnv64::new();
                hash.write(b"s");
                hash.write(&(text.len() as u64).to_le_bytes());
                hash.write(text.as_bytes());
                hash.finish()
            }
        }
    }
    fn scalar(tag: &[u8], text: &str) -> Done {
        let mut hash = Fnv64::new();
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
                let mut hash = Fnv64::new();
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
                let mut hash = Fnv64::new();
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

struct Fnv64(u64);

impl Fnv64 {
    fn new() -> Fnv64 {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
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
    pub commands: u64,
    pub command_errors: u64,
    /// Time spent waiting for commands, in seconds.
    pub command_seconds: f64,
    /// Publications received over pub/sub.
    pub messages: u64,
    /// Payloads from Redis that were not pushgate publications.
    pub malformed: u64,
    /// Channels whose local subscribers were reset after an outage.
    pub resets: u64,
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
    async fn join(
        &self,
        channel: &ChannelName,
        member: &Member,
        mode: PresenceMode,
    ) -> Result<(), BrokerError>;

    /// `member` left `channel` (unsubscribed or disconnected).
    async fn leave(&self, channel: &ChannelName, member: &Member, mode: PresenceMode);

    /// Who is on `channel`, across every node the engine spans.
    async fn presence(&self, channel: &ChannelName) -> Result<Vec<Member>, BrokerError>;

    /// Hands `order` to every other node; the caller carries it out on
    /// this one. The memory engine has no other node.
    async fn broadcast(&self, order: &Order) -> Result<(), BrokerError>;

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
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    fn publish(data: &str) -> Publish {
        Publish {
            channels: vec![ChannelName::parse("c").unwrap()],
            data: serde_json::value::RawValue::from_string(data.to_owned()).unwrap(),
            event: None,
            idempotency_key: Some("k".into()),
        }
    }

    fn fingerprint(data: &str) -> u64 {
        publish(data).fingerprint()
    }

    #[test]
    fn equal_json_values_are_the_same_publish() {
        for (a, b) in [
            (
                r#"{"a":1,"b":[1,2]}"#,
                "{ \"a\" : 1 ,\n\t\"b\" : [ 1 , 2 ] }\r\n",
            ),
            (r#"{"a":1,"b":2}"#, r#"{"b":2,"a":1}"#),
            (
                r#"{"x":{"z":null,"y":true}}"#,
                r#"{"x":{"y":true,"z":null}}"#,
            ),
            (r#""A\n""#, r#""\u0041\u000a""#),
            (r#""\/""#, r#""/""#),
            (r#""é""#, r#""\u00e9""#),
            (r#""😀""#, r#""\ud83d\ude00""#),
            ("1e2", "100.0"),
            ("1.5", "15e-1"),
            ("-0.0", "-0e0"),
            ("[]", "[ ]"),
            ("{}", "{ }"),
            (r#"{"a":1,"a":2}"#, r#"{"a":2}"#),
        ] {
            assert_eq!(fingerprint(a), fingerprint(b), "{a} and {b} are one value");
        }
    }

    #[test]
    fn different_json_values_are_different_publishes() {
        for (a, b) in [
            ("1", "1.0"),
            ("1", "\"1\""),
            ("0", "-0.0"),
            ("null", "\"null\""),
            ("[1,2]", "[2,1]"),
            (r#"{"a":1}"#, r#"{"a":1,"b":null}"#),
            (r#"{"a":{"b":1}}"#, r#"{"a":[{"b":1}]}"#),
            (r#""a b""#, r#""ab""#),
            ("true", "false"),
        ] {
            assert_ne!(fingerprint(a), fingerprint(b), "{a} and {b} differ");
        }
        let base = publish("1");
        let mut other_channel = base.clone();
        other_channel.channels = vec![ChannelName::parse("d").unwrap()];
        let mut with_event = base.clone();
        with_event.event = Some(EventName::parse("e").unwrap());
        let mut two_channels = base.clone();
        two_channels.channels.push(ChannelName::parse("d").unwrap());
        let mut swapped = two_channels.clone();
        swapped.channels.reverse();
        let all = [base, other_channel, with_event, two_channels, swapped];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a.fingerprint(), b.fingerprint(), "{a:?} and {b:?}");
            }
        }
    }

    /// Any JSON value; floats are finite, not integral (so they print with
    /// a fraction and read back as floats) and read back exactly.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e12f64..1e12).prop_map(Value::from).prop_filter(
                "a fraction that serde_json reads back exactly",
                |v| {
                    v.as_f64().is_some_and(|f| f.fract() != 0.0)
                        && serde_json::from_str::<Value>(&v.to_string()).ok().as_ref() == Some(v)
                }
            ),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(any::<String>(), inner, 0..6)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    /// Writes `value` as JSON text in one of many equivalent ways, chosen
    /// by `choices`: whitespace around every token, object keys in any
    /// order, characters escaped or not, floats with an exponent or not.
    fn write_any_way(value: &Value, choices: &mut impl Iterator<Item = u8>, out: &mut String) {
        let mut pick = || choices.next().unwrap_or(0);
        let space = |choice: u8, out: &mut String| {
            out.push_str(["", " ", "\n", "\t ", "\r\n  "][usize::from(choice % 5)]);
        };
        space(pick(), out);
        match value {
            Value::Number(number) => {
                // serde_json reads some exponent forms one bit off: those
                // are other values, and are written plainly.
                let exponent = number
                    .as_f64()
                    .filter(|_| number.is_f64())
                    .map(|float| format!("{float:e}"))
                    .filter(|text| serde_json::from_str::<Value>(text).ok() == Some(value.clone()));
                match exponent {
                    Some(text) if pick() % 2 == 0 => out.push_str(&text),
                    _ => out.push_str(&number.to_string()),
                }
            }
            Value::String(text) => {
                out.push('"');
                for c in text.chars() {
                    let must = c == '"' || c == '\\' || c < ' ';
                    if must || pick() % 3 == 0 {
                        let mut units = [0u16; 2];
                        for unit in c.encode_utf16(&mut units) {
                            out.push_str(&format!("\\u{unit:04x}"));
                        }
                    } else {
                        out.push(c);
                    }
                }
                out.push('"');
            }
            Value::Array(items) => {
                out.push('[');
                for (index, item) in items.iter().enumerate() {
                    if index > 0 {
                        out.push(',');
                    }
                    write_any_way(item, choices, out);
                }
                space(choices.next().unwrap_or(0), out);
                out.push(']');
            }
            Value::Object(map) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                // A rotation and maybe a reversal: another order of keys.
                let turn = usize::from(pick()) % entries.len().max(1);
                entries.rotate_left(turn);
                if pick() % 2 == 0 {
                    entries.reverse();
                }
                out.push('{');
                for (index, (key, item)) in entries.into_iter().enumerate() {
                    if index > 0 {
                        out.push(',');
                    }
                    write_any_way(&Value::String(key.clone()), choices, out);
                    space(choices.next().unwrap_or(0), out);
                    out.push(':');
                    write_any_way(item, choices, out);
                }
                space(choices.next().unwrap_or(0), out);
                out.push('}');
            }
            other => out.push_str(&other.to_string()),
        }
        space(choices.next().unwrap_or(0), out);
    }

    #[test]
    fn depth_is_no_limit() {
        let depth = 100_000;
        let tight = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let loose = format!("{} 1 {}", "[ ".repeat(depth), "\n]".repeat(depth));
        assert_eq!(json_digest(&loose), json_digest(&tight));
        assert!(json_digest(&tight).is_some());
        assert_ne!(
            json_digest(&tight),
            json_digest(&tight.replacen("[", "", 1).replacen("]", "", 1))
        );
        // Objects deep down still compare by value, whatever their key order.
        let a = format!(
            r#"{}{{"b":1,"a":2}}{}"#,
            r#"{"x":"#.repeat(depth),
            "}".repeat(depth)
        );
        let b = format!(
            r#"{}{{"a":2, "b":1}}{}"#,
            r#"{ "x" :"#.repeat(depth),
            " }".repeat(depth)
        );
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(
            fingerprint(&a),
            fingerprint(&a.replace(r#""a":2"#, r#""a":3"#))
        );
    }

    #[test]
    fn what_is_not_json_has_no_digest() {
        for bad in [
            "",
            "[",
            "]",
            "{",
            "}",
            "[1",
            "{\"a\"}",
            "{\"a\":}",
            "{1:2}",
            "[}",
            "{]",
            "1 2",
            "\"open",
            "tru",
            "nul",
            "01x",
            "é",
            "{\"a\":1 \"b\"}x",
        ] {
            assert_eq!(json_digest(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn prop_the_digest_is_the_values(
            value in any_json(),
            choices in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut text = String::new();
            write_any_way(&value, &mut choices.into_iter(), &mut text);
            // The same value as serde_json writes it compactly.
            prop_assert_eq!(json_digest(&text), json_digest(&value.to_string()), "{}", text);
            prop_assert!(json_digest(&text).is_some());
        }

        #[test]
        fn prop_any_text_is_answered_without_a_panic(text in any::<String>()) {
            let _ = json_digest(&text);
        }

        #[test]
        fn prop_any_json_like_text_is_answered_without_a_panic(
            text in "[\\[\\]{}:,\" \\\\0-9a-z.eE+-]{0,64}"
        ) {
            let digest = json_digest(&text);
            // JSON always has one.
            if serde_json::from_str::<Value>(&text).is_ok() {
                prop_assert!(digest.is_some(), "{}", text);
            }
        }

        #[test]
        fn prop_one_value_written_two_ways_is_one_publish(
            value in any_json(),
            first in proptest::collection::vec(any::<u8>(), 0..512),
            second in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let (mut a, mut b) = (String::new(), String::new());
            write_any_way(&value, &mut first.into_iter(), &mut a);
            write_any_way(&value, &mut second.into_iter(), &mut b);
            // The writer is right: both texts read back as the value.
            prop_assert_eq!(&serde_json::from_str::<Value>(&a).unwrap(), &value);
            prop_assert_eq!(&serde_json::from_str::<Value>(&b).unwrap(), &value);
            prop_assert_eq!(fingerprint(&a), fingerprint(&b), "{} / {}", a, b);
        }

        #[test]
        fn prop_different_values_are_different_publishes(a in any_json(), b in any_json()) {
            prop_assume!(a != b);
            prop_assert_ne!(fingerprint(&a.to_string()), fingerprint(&b.to_string()));
        }
    }

    #[test]
    fn recovery_decisions() {
        let e = Epoch::parse("now").unwrap();
        let old = Epoch::parse("old").unwrap();
        let at = |epoch, offset| Position::new(epoch, offset);
        // History holds offsets 5..=10.
        assert_eq!(replay_from(at(e, 7), e, 10, 5), Some(8));
        assert_eq!(replay_from(at(e, 4), e, 10, 5), Some(5), "exactly covered");
        assert_eq!(
            replay_from(at(e, 3), e, 10, 5),
            None,
            "gap older than history"
        );
        assert_eq!(replay_from(at(e, 10), e, 10, 5), Some(11), "up to date");
        assert_eq!(
            replay_from(at(e, 11), e, 10, 5),
            None,
            "ahead of the stream"
        );
        assert_eq!(replay_from(at(old, 7), e, 10, 5), None, "epoch changed");
        assert_eq!(
            replay_from(at(old, 0), e, 10, 1),
            Some(1),
            "offset 0 in any epoch"
        );
        assert_eq!(
            replay_from(at(old, 0), e, 10, 5),
            None,
            "offset 0, history trimmed"
        );
        assert_eq!(
            replay_from(at(old, 0), e, 0, 1),
            Some(1),
            "empty channel, new epoch"
        );
        // Nothing replayable (all expired): only an up-to-date reader recovers.
        assert_eq!(replay_from(at(e, 10), e, 10, 11), Some(11));
        assert_eq!(replay_from(at(e, 9), e, 10, 11), None);
    }
}
