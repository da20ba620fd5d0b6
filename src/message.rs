//! A publication and its per-transport encodings, made once.
//!
//! When a publication is created its envelope is written once
//! (`{"channel","epoch","offset","event"?,"data"}`), and so are its SSE lines.
//! Every delivery after that shares those bytes: a reference-count bump, never
//! a per-subscriber encoding. The envelope is also the WebSocket text payload
//! and the long-poll array element.

use std::fmt;
use std::io::Write;
use std::ops::Range;
use std::sync::OnceLock;

use bytes::Bytes;

use crate::cursor::{channel_hash, Cursor, Position};
pub use crate::names::{
    ChannelName, EventName, NameError, MAX_CHANNEL_LEN, MAX_EVENT_LEN, RESERVED_EVENT_PREFIX,
};

/// One publication on one channel, with its encodings.
pub struct Publication {
    channel: ChannelName,
    position: Position,
    event: Option<EventName>,
    /// Wall-clock milliseconds since the Unix epoch; history older than
    /// `history.ttl` by this time is never replayed.
    published_at_ms: u64,
    /// The envelope JSON: WebSocket payload and long-poll element.
    envelope: Bytes,
    /// Where `data` sits inside `envelope`, so it is not stored twice.
    data: Range<usize>,
    /// Where the publishing client's user sits inside `envelope`, as a JSON
    /// string, for a publication a client sent.
    user: Option<Range<usize>>,
    /// The envelope as a WebSocket text payload: UTF-8 checked once, here,
    /// not per send.
    ws_text: tokio_tungstenite::tungstenite::Utf8Bytes,
    /// `event: …\n` (when named) and `data: <envelope>\n`: an SSE event
    /// without its `id:` line and closing blank line, which are per connection.
    sse: Bytes,
    /// The envelope compressed for WebSocket connections that negotiated
    /// permessage-deflate: made once, by the first such subscriber, and
    /// shared by all; `None` inside when compressing does not make it
    /// smaller ([`Publication::ws_deflated`]).
    ws_deflated: OnceLock<Option<Bytes>>,
    /// `id: <cursor>\n\n` for a connection that hears this channel alone:
    /// the same for every such connection, so made once, when first asked.
    sse_sole_id: OnceLock<SoleId>,
    /// The publication as another protocol frames it (the Pusher
    /// protocol's), made once, by the first subscriber that asks
    /// ([`Publication::rendered`]).
    rendered: OnceLock<Box<dyn std::any::Any + Send + Sync>>,
    kind: Kind,
}

/// A publication's `id:` line for connections hearing its channel alone,
/// with the channel's hash to recognise their cursors by.
struct SoleId {
    hash: u32,
    line: Bytes,
}

/// What travels through the hub besides publications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Message,
    /// Subscribers must reset to `position` ([`Publication::reset_marker`]).
    Reset,
    /// Sent as it is, outside the stream (no position, not in history):
    /// someone joined or left ([`Publication::presence_event`]), or an
    /// ephemeral publication ([`Publication::ephemeral`]).
    Aside,
}

/// An envelope's JSON, and where its `user` and `data` sit in it.
struct Envelope {
    bytes: Vec<u8>,
    user: Option<Range<usize>>,
    data: Range<usize>,
}

impl Envelope {
    /// `{"channel", "epoch", "offset", "event"?, "user"?, "data"}`; without
    /// a position (an ephemeral publication), no `epoch` and `offset`.
    fn write(
        channel: &ChannelName,
        position: Option<Position>,
        event: Option<&EventName>,
        user: Option<&str>,
        data: &str,
    ) -> Envelope {
        let mut bytes = Vec::with_capacity(64 + channel.as_str().len() + data.len());
        bytes.extend_from_slice(b"{\"channel\":\"");
        // Channel, epoch and event characters never need JSON escaping.
        bytes.extend_from_slice(channel.as_str().as_bytes());
        bytes.push(b'"');
        if let Some(position) = position {
            bytes.extend_from_slice(b",\"epoch\":\"");
            bytes.extend_from_slice(position.epoch.as_str().as_bytes());
            bytes.extend_from_slice(b"\",\"offset\":");
            write!(bytes, "{}", position.offset).expect("writing to a Vec cannot fail");
        }
        if let Some(event) = event {
            bytes.extend_from_slice(b",\"event\":\"");
            bytes.extend_from_slice(event.as_str().as_bytes());
            bytes.push(b'"');
        }
        let user = user.map(|user| {
            bytes.extend_from_slice(b",\"user\":");
            let start = bytes.len();
            serde_json::to_writer(&mut bytes, user).expect("writing to a Vec cannot fail");
            start..bytes.len()
        });
        bytes.extend_from_slice(b",\"data\":");
        let data_start = bytes.len();
        compact_json(data, &mut bytes);
        let data = data_start..bytes.len();
        bytes.push(b'}');
        Envelope { bytes, user, data }
    }
}

impl Publication {
    /// Encodes a publication. `data` must be valid JSON (the API checks it);
    /// its insignificant whitespace is dropped so the envelope is one line.
    pub fn new(
        channel: ChannelName,
        position: Position,
        event: Option<EventName>,
        data: &str,
        published_at_ms: u64,
    ) -> Publication {
        Publication::by(channel, position, event, None, data, published_at_ms)
    }

    /// Like [`Publication::new`], for a publication a client sent as
    /// `user`: the envelope names them (`"user"`, after `event`).
    pub fn by(
        channel: ChannelName,
        position: Position,
        event: Option<EventName>,
        user: Option<&str>,
        data: &str,
        published_at_ms: u64,
    ) -> Publication {
        let Envelope {
            bytes: envelope,
            user,
            data: data_range,
        } = Envelope::write(&channel, Some(position), event.as_ref(), user, data);

        let mut sse = Vec::with_capacity(envelope.len() + 16 + MAX_EVENT_LEN);
        if let Some(event) = &event {
            sse.extend_from_slice(b"event: ");
            sse.extend_from_slice(event.as_str().as_bytes());
            sse.push(b'\n');
        }
        sse.extend_from_slice(b"data: ");
        sse.extend_from_slice(&envelope);
        sse.push(b'\n');

        let envelope = Bytes::from(envelope);
        let ws_text = tokio_tungstenite::tungstenite::Utf8Bytes::try_from(envelope.clone())
            .expect("the envelope is UTF-8: ASCII fields around JSON text");
        Publication {
            channel,
            position,
            event,
            published_at_ms,
            ws_text,
            envelope,
            data: data_range,
            user,
            sse: Bytes::from(sse),
            ws_deflated: OnceLock::new(),
            sse_sole_id: OnceLock::new(),
            rendered: OnceLock::new(),
            kind: Kind::Message,
        }
    }

    /// A marker the engine hands the hub when a channel's stream moved on
    /// without this node (Redis was away and history does not cover the
    /// gap): each subscriber resets to `position` unless it is already there.
    /// It carries no data and is never sent as a message.
    pub fn reset_marker(channel: ChannelName, position: Position) -> Publication {
        Publication {
            channel,
            position,
            event: None,
            published_at_ms: 0,
            envelope: Bytes::new(),
            data: 0..0,
            user: None,
            ws_text: tokio_tungstenite::tungstenite::Utf8Bytes::from_static(""),
            sse: Bytes::new(),
            ws_deflated: OnceLock::new(),
            sse_sole_id: OnceLock::new(),
            rendered: OnceLock::new(),
            kind: Kind::Reset,
        }
    }

    /// Whether this is a [`Publication::reset_marker`].
    pub fn is_reset_marker(&self) -> bool {
        self.kind == Kind::Reset
    }

    /// A join or leave event: `json` is the control push
    /// `{"op":"join"|"leave","channel",...}`, sent as a WebSocket text frame
    /// and as an SSE event named `pushgate.join` / `pushgate.leave`.
    ///
    /// `json` must be valid JSON. Invariant: **no CR or LF of it reaches
    /// the SSE `data:` line**, which would end the line there and let the
    /// rest be read as fields of its own (an `id:` that moves the client's
    /// cursor, say). The app's `info` inside it is copied as the app wrote
    /// it, newlines included, and events from other nodes arrive as text,
    /// so the JSON is compacted here, the one place these lines are made.
    pub fn presence_event(channel: ChannelName, joined: bool, json: String) -> Publication {
        let name = if joined { "join" } else { "leave" };
        Publication::aside(channel, None, &format!("pushgate.{name}"), json)
    }

    /// A publication outside the stream, from a client on an ephemeral
    /// channel: the envelope without a position, `{"channel", "event"?,
    /// "user"?, "data"}`, for whoever listens now; never stored, never
    /// replayed. `data` must be valid JSON.
    pub fn ephemeral(
        channel: ChannelName,
        event: Option<EventName>,
        user: Option<&str>,
        data: &str,
    ) -> Publication {
        let json = Envelope::write(&channel, None, event.as_ref(), user, data).bytes;
        let json = String::from_utf8(json).expect("built from UTF-8");
        let sse_event = event
            .as_ref()
            .map_or("message", EventName::as_str)
            .to_owned();
        Publication::aside(channel, event, &sse_event, json)
    }

    /// An ephemeral publication as another node sent it: its SSE event
    /// name is its `event`, if any. `None` unless `json` is an object.
    pub fn ephemeral_from(
        channel: ChannelName,
        event: Option<EventName>,
        json: &str,
    ) -> Option<Publication> {
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(json).ok()?;
        let sse_event = event
            .as_ref()
            .map_or("message", EventName::as_str)
            .to_owned();
        Some(Publication::aside(
            channel,
            event,
            &sse_event,
            json.to_owned(),
        ))
    }

    /// Something sent as it is to whoever listens, outside the stream (no
    /// position, not in history): `json` on WebSocket, and an SSE event
    /// named `sse_event` with `json` as its data.
    fn aside(
        channel: ChannelName,
        event: Option<EventName>,
        sse_event: &str,
        json: String,
    ) -> Publication {
        let json = if json.bytes().any(|b| b == b'\n' || b == b'\r') {
            let mut compact = Vec::with_capacity(json.len());
            compact_json(&json, &mut compact);
            String::from_utf8(compact).expect("compacting keeps UTF-8")
        } else {
            json
        };
        let sse = format!("event: {sse_event}\ndata: {json}\n");
        let envelope = Bytes::from(json);
        let ws_text = tokio_tungstenite::tungstenite::Utf8Bytes::try_from(envelope.clone())
            .expect("built from a String");
        Publication {
            channel,
            position: Position::new(crate::cursor::Epoch::random(), 0),
            event,
            published_at_ms: 0,
            data: 0..0,
            user: None,
            ws_text,
            envelope,
            sse: Bytes::from(sse),
            ws_deflated: OnceLock::new(),
            sse_sole_id: OnceLock::new(),
            rendered: OnceLock::new(),
            kind: Kind::Aside,
        }
    }

    /// The publication as another protocol frames it: made by `render` for
    /// the first subscriber that asks, shared by every other. One protocol
    /// renders a publication: `None` if it was rendered as another type.
    pub fn rendered<T: std::any::Any + Send + Sync>(
        &self,
        render: impl FnOnce(&Publication) -> T,
    ) -> Option<&T> {
        self.rendered
            .get_or_init(|| Box::new(render(self)))
            .downcast_ref::<T>()
    }

    /// Whether this is sent as it is, outside the stream: a presence event
    /// or an ephemeral publication.
    pub fn is_aside(&self) -> bool {
        self.kind == Kind::Aside
    }

    pub fn channel(&self) -> &ChannelName {
        &self.channel
    }

    pub fn position(&self) -> Position {
        self.position
    }

    pub fn offset(&self) -> u64 {
        self.position.offset
    }

    pub fn event(&self) -> Option<&EventName> {
        self.event.as_ref()
    }

    pub fn published_at_ms(&self) -> u64 {
        self.published_at_ms
    }

    /// The envelope JSON, shared: clone it to send it.
    pub fn envelope(&self) -> &Bytes {
        &self.envelope
    }

    /// The envelope as a WebSocket text payload, shared.
    pub fn ws_text(&self) -> &tokio_tungstenite::tungstenite::Utf8Bytes {
        &self.ws_text
    }

    /// The envelope compressed as a permessage-deflate message (RFC 7692,
    /// no context takeover): compressed by the first caller, shared by
    /// every other; `None` when that is not smaller than the envelope.
    pub fn ws_deflated(&self) -> Option<&Bytes> {
        self.ws_deflated
            .get_or_init(|| crate::deflate::compress(&self.envelope))
            .as_ref()
    }

    /// The publishing client's user as a JSON string (quotes included),
    /// for a publication a client sent.
    pub fn user_json(&self) -> Option<&str> {
        let range = self.user.clone()?;
        Some(std::str::from_utf8(&self.envelope[range]).expect("a JSON string is UTF-8"))
    }

    /// The publication's `data` JSON, compacted.
    pub fn data(&self) -> &str {
        std::str::from_utf8(&self.envelope[self.data.clone()]).expect("envelope is UTF-8")
    }

    /// The SSE `event:`/`data:` lines, shared; the connection adds `id:` and
    /// the blank line.
    pub fn sse_lines(&self) -> &Bytes {
        &self.sse
    }

    /// The `id:` line and blank line that end this event for a connection
    /// whose cursor is `cursor`, when that cursor holds this channel alone
    /// at this publication's position (most SSE connections hear one
    /// channel): shared by all of them. `None` for any other cursor, whose
    /// line is the connection's own.
    /// Each call costs a comparison: the channel's hash and the line are
    /// worked out once, by the first caller.
    pub fn sse_sole_id(&self, cursor: &Cursor) -> Option<&Bytes> {
        let (hash, position) = cursor.sole()?;
        let sole = self.sse_sole_id.get_or_init(|| {
            let mut alone = Cursor::new();
            alone.set(&self.channel, self.position);
            let mut line = String::from("id: ");
            alone.encode_into(&mut line);
            line.push_str("\n\n");
            SoleId {
                hash: channel_hash(self.channel.as_str()),
                line: Bytes::from(line),
            }
        });
        (hash == sole.hash && *position == self.position).then_some(&sole.line)
    }

    /// What holding this publication in a queue costs, for byte bounds.
    pub fn size(&self) -> usize {
        self.envelope.len()
    }
}

impl fmt::Debug for Publication {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publication")
            .field("channel", &self.channel)
            .field("position", &self.position)
            .field("event", &self.event)
            .field("data", &self.data())
            .finish()
    }
}

/// Copies valid JSON text, dropping whitespace outside strings, so the result
/// is one line (SSE `data:` cannot hold a raw newline). Inside strings every
/// byte is kept: raw newlines cannot occur there in valid JSON.
pub fn compact_json(json: &str, out: &mut Vec<u8>) {
    let mut in_string = false;
    let mut escaped = false;
    for &byte in json.as_bytes() {
        if in_string {
            out.push(byte);
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
        } else {
            match byte {
                b' ' | b'\t' | b'\n' | b'\r' => {}
                b'"' => {
                    in_string = true;
                    out.push(byte);
                }
                _ => out.push(byte),
            }
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cursor::Epoch;

    fn position(offset: u64) -> Position {
        Position::new(Epoch::parse("e1").unwrap(), offset)
    }

    #[test]
    fn envelope_is_one_line_of_valid_json() {
        let publication = Publication::new(
            ChannelName::parse("chat:1").unwrap(),
            position(42),
            Some(EventName::parse("msg").unwrap()),
            "{\n  \"text\": \"hi there\\n\\\"quoted\\\"\",\n  \"n\": [1, 2.50, 1e400]\n}",
            1,
        );
        let envelope = std::str::from_utf8(publication.envelope()).unwrap();
        assert!(!envelope.contains('\n'));
        assert_eq!(
            envelope,
            r#"{"channel":"chat:1","epoch":"e1","offset":42,"event":"msg","data":{"text":"hi there\n\"quoted\"","n":[1,2.50,1e400]}}"#
        );
        // Numbers keep their exact text, even beyond f64.
        assert_eq!(
            publication.data(),
            r#"{"text":"hi there\n\"quoted\"","n":[1,2.50,1e400]}"#
        );
        let sse = std::str::from_utf8(publication.sse_lines()).unwrap();
        assert_eq!(sse, format!("event: msg\ndata: {envelope}\n"));
    }

    #[test]
    fn the_sole_channel_id_line_is_shared_and_only_for_that_cursor() {
        let publication = Publication::new(
            ChannelName::parse("chat:1").unwrap(),
            position(7),
            None,
            "1",
            1,
        );
        let mut alone = Cursor::new();
        alone.set(&ChannelName::parse("chat:1").unwrap(), position(7));
        let line = publication
            .sse_sole_id(&alone)
            .expect("one channel, at this position");
        assert_eq!(&line[..], format!("id: {}\n\n", alone.encode()).as_bytes());
        // Made once: the next connection gets the same bytes.
        let again = publication.sse_sole_id(&alone.clone()).unwrap();
        assert_eq!(again.as_ptr(), line.as_ptr());

        let mut elsewhere = Cursor::new();
        elsewhere.set(&ChannelName::parse("chat:1").unwrap(), position(6));
        assert!(publication.sse_sole_id(&elsewhere).is_none());
        let mut two = alone.clone();
        two.set(&ChannelName::parse("news").unwrap(), position(3));
        assert!(publication.sse_sole_id(&two).is_none());
        let mut other = Cursor::new();
        other.set(&ChannelName::parse("chat:2").unwrap(), position(7));
        assert!(publication.sse_sole_id(&other).is_none());
    }

    #[test]
    fn without_an_event_there_is_no_event_field_or_line() {
        let publication = Publication::new(
            ChannelName::parse("c").unwrap(),
            position(1),
            None,
            "\"text with  spaces\"",
            1,
        );
        let envelope = std::str::from_utf8(publication.envelope()).unwrap();
        assert_eq!(
            envelope,
            r#"{"channel":"c","epoch":"e1","offset":1,"data":"text with  spaces"}"#
        );
        let value: serde_json::Value = serde_json::from_str(envelope).unwrap();
        assert!(
            value.get("event").is_none() && value.get("op").is_none() && value.get("id").is_none()
        );
        assert!(publication.sse_lines().starts_with(b"data: {"));
    }

    /// The app's `info`, pretty-printed or with any whitespace, never puts a
    /// line break into a join or leave event's SSE lines; the event keeps
    /// every value.
    mod presence_lines {
        use super::*;
        use proptest::prelude::*;
        use serde_json::Value;

        fn any_json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                // Escaped newlines inside strings stay; raw ones cannot occur.
                "[a-z \\n\\r\\t\\u{2028}\"\\\\é]{0,12}".prop_map(Value::String),
            ];
            leaf.prop_recursive(4, 32, 6, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    proptest::collection::btree_map("[a-z\\n ]{0,6}", inner, 0..6)
                        .prop_map(|map| Value::Object(map.into_iter().collect())),
                ]
            })
        }

        /// Spreads JSON text out with every kind of insignificant whitespace.
        fn spread(json: &str, gap: &str) -> String {
            let mut out = String::new();
            let mut in_string = false;
            let mut escaped = false;
            for c in json.chars() {
                if in_string {
                    out.push(c);
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '"' {
                        in_string = false;
                    }
                    continue;
                }
                if c == '"' {
                    in_string = true;
                }
                out.push(c);
                if matches!(c, '{' | '[' | ',' | ':') {
                    out.push_str(gap);
                }
            }
            out
        }

        fn member(info: &str) -> crate::broker::Member {
            crate::broker::Member {
                user: Some("42".into()),
                connection: "n1-7".into(),
                node: "n1".into(),
                info: Some(serde_json::value::RawValue::from_string(info.to_owned()).unwrap()),
            }
        }

        proptest! {
            #[test]
            fn prop_info_never_breaks_an_sse_line(
                info in any_json(),
                pretty in any::<bool>(),
                gap in "[ \\t\\r\\n]{0,4}",
                joined in any::<bool>(),
            ) {
                let text = if pretty {
                    serde_json::to_string_pretty(&info).unwrap()
                } else {
                    spread(&serde_json::to_string(&info).unwrap(), &gap)
                };
                let channel = ChannelName::parse("room:1").unwrap();
                let json = member(&text).event_json(&channel, joined);
                let event = Publication::presence_event(channel, joined, json);
                let sse = std::str::from_utf8(event.sse_lines()).unwrap();
                let lines: Vec<&str> = sse.split_terminator('\n').collect();
                prop_assert_eq!(lines.len(), 2, "{:?}", sse);
                prop_assert!(!sse.contains('\r'), "{:?}", sse);
                let name = if joined { "join" } else { "leave" };
                prop_assert_eq!(lines[0], format!("event: pushgate.{name}"));
                let data = lines[1].strip_prefix("data: ").unwrap();
                let parsed: Value = serde_json::from_str(data).unwrap();
                prop_assert_eq!(&parsed["info"], &info);
                prop_assert_eq!(&parsed["op"], name);
                let envelope: Value = serde_json::from_slice(event.envelope()).unwrap();
                prop_assert_eq!(envelope, parsed);
            }
        }

        #[test]
        fn compact_info_is_passed_through_as_it_is() {
            let channel = ChannelName::parse("room:1").unwrap();
            let json = member(r#"{"name":"Ada","bio":"a\nb"}"#).event_json(&channel, true);
            let event = Publication::presence_event(channel, true, json.clone());
            assert_eq!(
                event.sse_lines(),
                format!("event: pushgate.join\ndata: {json}\n").as_bytes()
            );
        }
    }
}
