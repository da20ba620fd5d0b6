//! The names publications carry: channel names and event names, each
//! checked once against the contract (docs/protocol.md) and cheap to clone
//! after.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 255;
/// Longest event name, in bytes.
pub const MAX_EVENT_LEN: usize = 64;

/// A valid channel name: 1–255 bytes of `[A-Za-z0-9_:.@=/-]`. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(Arc<str>);

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("channel name is empty")]
    EmptyChannel,
    #[error("channel name is {0} bytes; the limit is 255")]
    ChannelTooLong(usize),
    #[error("channel name has {0:?}; allowed are A-Z a-z 0-9 and _ : . @ = / -")]
    ChannelCharacter(char),
    #[error("event name must be 1-64 characters of A-Z a-z 0-9 and _ . : -")]
    Event,
    #[error("event names starting with `pushgate.` are pushgate's own (reset, join, leave, …)")]
    ReservedEvent,
}

impl ChannelName {
    pub fn parse(name: &str) -> Result<ChannelName, NameError> {
        if name.is_empty() {
            return Err(NameError::EmptyChannel);
        }
        if let Some(bad) = name.chars().find(|&c| !is_channel_char(c)) {
            return Err(NameError::ChannelCharacter(bad));
        }
        if name.len() > MAX_CHANNEL_LEN {
            return Err(NameError::ChannelTooLong(name.len()));
        }
        Ok(ChannelName(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_channel_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '.' | '@' | '=' | '/' | '-')
}

impl Borrow<str> for ChannelName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for ChannelName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

/// Event names pushgate itself sends on SSE (`pushgate.reset`, …); a
/// publication may not take one, or a client could not tell them apart.
pub const RESERVED_EVENT_PREFIX: &str = "pushgate.";

/// A publisher-chosen event name: `[A-Za-z0-9_.:-]{1,64}`, not starting
/// with [`RESERVED_EVENT_PREFIX`].
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct EventName(Arc<str>);

impl EventName {
    pub fn parse(name: &str) -> Result<EventName, NameError> {
        let valid = (1..=MAX_EVENT_LEN).contains(&name.len())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'));
        if name.starts_with(RESERVED_EVENT_PREFIX) {
            Err(NameError::ReservedEvent)
        } else if valid {
            Ok(EventName(name.into()))
        } else {
            Err(NameError::Event)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for EventName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_follow_the_contract() {
        assert!(ChannelName::parse("chat:1").is_ok());
        assert!(ChannelName::parse("user@example.com/inbox=a_b-c.d").is_ok());
        assert!(ChannelName::parse(&"a".repeat(255)).is_ok());
        assert_eq!(
            ChannelName::parse(&"a".repeat(256)),
            Err(NameError::ChannelTooLong(256))
        );
        assert_eq!(ChannelName::parse(""), Err(NameError::EmptyChannel));
        assert_eq!(
            ChannelName::parse("a b"),
            Err(NameError::ChannelCharacter(' '))
        );
        assert_eq!(
            ChannelName::parse("caf\u{e9}"),
            Err(NameError::ChannelCharacter('\u{e9}'))
        );
        assert!(ChannelName::parse("a*").is_err());
        assert!(ChannelName::parse("a\"b").is_err());
    }

    #[test]
    fn event_names_follow_the_contract() {
        assert!(EventName::parse("chat.message:new-1_x").is_ok());
        assert!(EventName::parse(&"e".repeat(64)).is_ok());
        assert!(EventName::parse(&"e".repeat(65)).is_err());
        assert!(EventName::parse("").is_err());
        assert!(EventName::parse("a/b").is_err());
        assert_eq!(
            EventName::parse("pushgate.reset"),
            Err(NameError::ReservedEvent)
        );
        assert!(EventName::parse("pushgate").is_ok());
        assert!(EventName::parse("app.pushgate.reset").is_ok());
        assert!(EventName::parse("a\nb").is_err());
    }
}
