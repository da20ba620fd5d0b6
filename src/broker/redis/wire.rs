//! The wire format of a publication and a presence event on Redis pub/sub
//! and in a channel's stream.

use crate::cursor::{Epoch, Position};
use crate::message::{ChannelName, EventName, Publication};

/// Version tag of the encoded publication.
pub(super) const WIRE_VERSION: &str = "1";

/// Tag of a presence event on the wire (publications start with
/// [`WIRE_VERSION`]).
pub(super) const WIRE_PRESENCE: &str = "p\n";

/// Tag of a publication's pub/sub message that carries its token: `n`, the
/// token, a newline, then the payload as the stream holds it.
///
/// The token is random, made by the publishing node for this publication
/// only, and kept beside the payload in the stream entry. A node remembers
/// the token of the last publication it handed to its subscribers: the
/// entry at that offset with another token is a different publication (the
/// store lost the one the node saw and numbered another over it). Stream
/// entry ids cannot tell that: a promoted replica whose clock lags numbers
/// its entries after the last id it holds, which can be the id the lost
/// entry had.
pub(super) const WIRE_TOKEN: &[u8] = b"n";

/// A pub/sub message's token and payload; a message without a token (from
/// a node that wrote none) is all payload.
pub(super) fn split_token(message: &[u8]) -> (Option<&str>, &[u8]) {
    if let Some(rest) = message.strip_prefix(WIRE_TOKEN) {
        if let Some(end) = rest.iter().position(|&b| b == b'\n') {
            if let Ok(token) = std::str::from_utf8(&rest[..end]) {
                return (Some(token), &rest[end + 1..]);
            }
        }
    }
    (None, message)
}

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

        let message = format!("nAbc123\n{wire}");
        let (token, payload) = split_token(message.as_bytes());
        assert_eq!(token, Some("Abc123"));
        assert_eq!(payload, wire.as_bytes());
        assert_eq!(split_token(wire.as_bytes()), (None, wire.as_bytes()));

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
