//! The names of the engine's keys and pub/sub channels in Redis.

/// Key names.
#[derive(Clone)]
pub(super) struct Keys {
    pub(super) prefix: String,
}

impl Keys {
    pub(super) fn meta(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}:m", self.prefix)
    }

    pub(super) fn stream(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}:h", self.prefix)
    }

    pub(super) fn idempotency(&self, channel: &str, key: &str) -> String {
        format!("{}:{{{channel}}}:i:{key}", self.prefix)
    }

    pub(super) fn presence(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}:p", self.prefix)
    }

    /// Present while the channel is heard on some node (`occupancy`).
    pub(super) fn occupied(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}:o", self.prefix)
    }

    pub(super) fn user(&self, user: &str) -> String {
        format!("{}:u:{{{user}}}", self.prefix)
    }

    /// Where orders for every node travel.
    pub(super) fn orders(&self) -> String {
        format!("{}:orders", self.prefix)
    }

    pub(super) fn claim(&self, key: &str) -> String {
        format!("{}:i:{key}", self.prefix)
    }

    /// A key's claim in `channel`'s slot (on a cluster).
    pub(super) fn claim_in(&self, channel: &str, key: &str) -> String {
        format!("{}:{{{channel}}}:c:{key}", self.prefix)
    }

    pub(super) fn pubsub(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}", self.prefix)
    }

    /// A glob matching the pub/sub channels of every channel starting with
    /// `prefix` (its glob characters escaped).
    pub(super) fn pubsub_pattern(&self, prefix: &str) -> String {
        let mut pattern = String::with_capacity(self.prefix.len() + prefix.len() + 8);
        for c in self.prefix.chars().chain(":{".chars()) {
            push_literal(&mut pattern, c);
        }
        for c in prefix.chars() {
            push_literal(&mut pattern, c);
        }
        pattern.push_str("*}");
        pattern
    }

    /// The channel a pub/sub channel name carries.
    pub(super) fn channel_of<'a>(&self, pubsub: &'a str) -> Option<&'a str> {
        pubsub
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(":{")?
            .strip_suffix('}')
    }
}

/// `c` in a Redis glob, as itself.
fn push_literal(pattern: &mut String, c: char) {
    if matches!(c, '*' | '?' | '[' | ']' | '\\') {
        pattern.push('\\');
    }
    pattern.push(c);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn keys_carry_the_channel_as_a_hash_tag() {
        let keys = Keys {
            prefix: "pg".into(),
        };
        assert_eq!(keys.meta("a:b"), "pg:{a:b}:m");
        assert_eq!(keys.pubsub("a:b"), "pg:{a:b}");
        assert_eq!(keys.channel_of("pg:{a:b}"), Some("a:b"));
        assert_eq!(keys.channel_of("other:{a:b}"), None);
    }
}
