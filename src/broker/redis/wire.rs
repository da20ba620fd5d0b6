//! The wire format of a publication and a presence event on Redis pub/sub
//! and in a channel's stream.

use crate::cursor::{Epoch, Position};
use crate::message::{ChannelName, EventName, Publication};

/// Version tag of the encoded publication.
pub(super) const WIRE_VERSION: &str = "1";

/// Version tag of a publication a client sent: version 1 with the
/// publishing user (a JSON string, so it holds no newline) before the
/// data. Only clients' publications use it, so nodes that read version 1
/// alone drop only those (counted as malformed) through a rolling upgrade.
pub(super) const WIRE_VERSION_BY_USER: &str = "2";

/// Tag of a presence event on the wire (publications start with
/// [`WIRE_VERSION`]).
pub(super) const WIRE_PRESENCE: &str = "p\n";

/// Tag of an ephemeral publication on pub/sub (never in a stream): then its
/// event name ('' for none), a newline, and its envelope.
pub(super) const WIRE_EPHEMERAL: &str = "e\n";

/// The SHA-1 of a publication's payload as the stream entry (field `p`)
/// holds it, which is byte for byte the pub/sub message: what a node
/// remembers of the last publication it handed to its subscribers, and
/// what the history script compares (`redis.sha1hex`) with the entry at
/// that node's offset (see `Shared::resync`).
///
/// The payload holds the channel, epoch, offset, Redis time in ms, event
/// and data, so another publication numbered at the same offset has
/// another digest unless it is identical in content and millisecond: then
/// nothing was lost. Stream entry ids cannot tell two publications apart:
/// a promoted replica whose clock lags numbers its entries after the last
/// id it holds, which can be the id the lost entry had.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Digest([u8; 20]);

impl Digest {
    pub(super) fn of(payload: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, payload);
        let mut bytes = [0; 20];
        bytes.copy_from_slice(digest.as_ref());
        Digest(bytes)
    }

    /// Lowercase hex, as `redis.sha1hex` writes it.
    pub(super) fn hex(&self) -> String {
        use std::fmt::Write;
        self.0
            .iter()
            .fold(String::with_capacity(40), |mut hex, byte| {
                let _ = write!(hex, "{byte:02x}");
                hex
            })
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

/// Encodes a publication the way the publish script does (tests and the
/// wire format's documentation use it).
pub fn encode(publication: &Publication) -> String {
    let head = format!(
        "{}\n{}\n{}\n{}",
        publication.channel(),
        publication.position().epoch,
        publication.offset(),
        publication.published_at_ms(),
    );
    let event = publication.event().map_or("", EventName::as_str);
    match publication.user_json() {
        None => format!("{WIRE_VERSION}\n{head}\n{event}\n{}", publication.data()),
        Some(user) => format!(
            "{WIRE_VERSION_BY_USER}\n{head}\n{event}\n{user}\n{}",
            publication.data()
        ),
    }
}

/// Decodes a publication from the publish script's format. `None` for
/// anything malformed (logged by the caller; never trusted blindly).
pub fn decode(payload: &[u8]) -> Option<Publication> {
    let text = std::str::from_utf8(payload).ok()?;
    let (by_user, rest) = match text.split_once('\n')? {
        (WIRE_VERSION, rest) => (false, rest),
        (WIRE_VERSION_BY_USER, rest) => (true, rest),
        _ => return None,
    };
    let mut fields = rest.splitn(if by_user { 7 } else { 6 }, '\n');
    let channel = ChannelName::parse(fields.next()?).ok()?;
    let epoch = Epoch::parse(fields.next()?).ok()?;
    let offset = fields.next()?.parse().ok()?;
    let published_at_ms = fields.next()?.parse().ok()?;
    let event = match fields.next()? {
        "" => None,
        name => Some(EventName::parse(name).ok()?),
    };
    let user = match by_user {
        true => Some(serde_json::from_str::<String>(fields.next()?).ok()?),
        false => None,
    };
    let data = fields.next()?;
    serde_json::from_str::<&serde_json::value::RawValue>(data).ok()?;
    Some(Publication::by(
        channel,
        Position::new(epoch, offset),
        event,
        user.as_deref(),
        data,
        published_at_ms,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_format_round_trips() {
        let publication = Publication::new(
            ChannelName::parse("chat:1").unwrap(),
            Position::new(Epoch::parse("abc").unwrap(), 42),
            Some(EventName::parse("msg").unwrap()),
            "{\"text\": \"a\\nb\"}",
            1_700_000_000_123,
        );
        let wire = encode(&publication);
        let back = decode(wire.as_bytes()).expect("decodes");
        assert_eq!(back.envelope(), publication.envelope());
        assert_eq!(back.published_at_ms(), 1_700_000_000_123);
        assert_eq!(back.position(), publication.position());

        for bad in [
            "",
            "2\nchat\nabc\n1\n0\n\n1",
            "1\nbad channel\nabc\n1\n0\n\n1",
            "1\nchat\nabc\nx\n0\n\n1",
            "1\nchat\nabc\n1\n0\n\nnot json",
            "1\nchat\nabc\n1\n0\n",
        ] {
            assert!(decode(bad.as_bytes()).is_none(), "{bad:?} refused");
        }
    }

    #[test]
    fn a_clients_publication_carries_its_user_through_the_wire() {
        for user in ["42", "a\nb \"quoted\"", "ünï", "\u{2028}"] {
            let publication = Publication::by(
                ChannelName::parse("chat:1").unwrap(),
                Position::new(Epoch::parse("abc").unwrap(), 7),
                None,
                Some(user),
                "{\"text\":\"hi\"}",
                1_700_000_000_123,
            );
            let wire = encode(&publication);
            assert!(wire.starts_with("2\n"), "{wire:?}");
            let back = decode(wire.as_bytes()).expect("decodes");
            assert_eq!(back.envelope(), publication.envelope());
            let envelope: serde_json::Value = serde_json::from_slice(back.envelope()).unwrap();
            assert_eq!(envelope["user"], user);
            assert_eq!(envelope["data"]["text"], "hi");
        }
        // A user that is not one JSON string is refused, not guessed at.
        for bad in [
            "2\nchat\nabc\n1\n0\n\n42\n{}",
            "2\nchat\nabc\n1\n0\n\n\"unterminated\n{}",
            "2\nchat\nabc\n1\n0\n\n\"u\"",
        ] {
            assert!(decode(bad.as_bytes()).is_none(), "{bad:?} refused");
        }
    }

    /// The format nodes of every version write to pub/sub and streams, and
    /// read from them: a node that wrote anything else would have its
    /// publications dropped as malformed by nodes not yet upgraded.
    #[test]
    fn the_wire_format_is_the_one_every_version_reads() {
        let publication = Publication::new(
            ChannelName::parse("chat:1").unwrap(),
            Position::new(Epoch::parse("abc").unwrap(), 42),
            Some(EventName::parse("msg").unwrap()),
            "{\"a\":1}",
            1_700_000_000_123,
        );
        let wire = encode(&publication);
        assert_eq!(wire, "1\nchat:1\nabc\n42\n1700000000123\nmsg\n{\"a\":1}");
        assert!(decode(wire.as_bytes()).is_some());
        assert_eq!(
            Digest::of(wire.as_bytes()).hex(),
            // `printf '%s' "$wire" | sha1sum`, as `redis.sha1hex` computes it.
            "aa60737816e3a5db51480ff005f6813fd05a6aeb"
        );
    }
}
