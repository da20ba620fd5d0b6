//! The wire format of a publication and a presence event on Redis pub/sub
//! and in a channel's stream.

use crate::cursor::{Epoch, Position};
use crate::message::{ChannelName, EventName, Publication};

/// Version tag of the encoded publication.
pub(super) const WIRE_VERSION: &str = "1";

/// Tag of a presence event on the wire (publications start with
/// [`WIRE_VERSION`]).
pub(super) const WIRE_PRESENCE: &str = "p\n";

/// Encodes a publication the way the publish script does (tests and the
/// wire format's documentation use it).
pub fn encode(publication: &Publication) -> String {
    format!(
        "{WIRE_VERSION}\n{}\n{}\n{}\n{}\n{}\n{}",
        publication.channel(),
        publication.position().epoch,
        publication.offset(),
        publication.published_at_ms(),
        publication.event().map_or("", EventName::as_str),
        publication.data()
    )
}

/// Decodes a publication from the publish script's format. `None` for
/// anything malformed (logged by the caller; never trusted blindly).
pub fn decode(payload: &[u8]) -> Option<Publication> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut fields = text.splitn(7, '\n');
    if fields.next()? != WIRE_VERSION {
        return None;
    }
    let channel = ChannelName::parse(fields.next()?).ok()?;
    let epoch = Epoch::parse(fields.next()?).ok()?;
    let offset = fields.next()?.parse().ok()?;
    let published_at_ms = fields.next()?.parse().ok()?;
    let event = match fields.next()? {
        "" => None,
        name => Some(EventName::parse(name).ok()?),
    };
    let data = fields.next()?;
    serde_json::from_str::<&serde_json::value::RawValue>(data).ok()?;
    Some(Publication::new(
        channel,
        Position::new(epoch, offset),
        event,
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
}
