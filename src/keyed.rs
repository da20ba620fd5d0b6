//! Keyed digests: HMAC-SHA256 under a key drawn at random for each
//! process, so that no one outside can compute a digest, or aim two inputs
//! at one. The API keys and the grant cache's keys are digested this way.

use ring::hmac;

/// Digests under one random key.
pub struct KeyedDigest(hmac::Key);

impl KeyedDigest {
    /// A digest under a fresh random key.
    pub fn random() -> KeyedDigest {
        let rng = ring::rand::SystemRandom::new();
        KeyedDigest(
            hmac::Key::generate(hmac::HMAC_SHA256, &rng).expect("the system's random source works"),
        )
    }

    /// The digest of `bytes`.
    pub fn of(&self, bytes: &[u8]) -> [u8; 32] {
        self.of_parts([bytes])
    }

    /// The digest of a list of parts. Each part is length-prefixed, so two
    /// different lists never give the same input.
    pub fn of_parts<'a>(&self, parts: impl IntoIterator<Item = &'a [u8]>) -> [u8; 32] {
        let mut context = hmac::Context::with_key(&self.0);
        for part in parts {
            context.update(&(part.len() as u64).to_be_bytes());
            context.update(part);
        }
        let mut digest = [0; 32];
        digest.copy_from_slice(context.sign().as_ref());
        digest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_framed_and_keys_are_per_digest() {
        let digest = KeyedDigest::random();
        assert_eq!(digest.of(b"ab"), digest.of_parts([&b"ab"[..]]));
        assert_ne!(
            digest.of_parts([&b"a"[..], b"b"]),
            digest.of_parts([&b"ab"[..], b""])
        );
        assert_ne!(digest.of(b"ab"), KeyedDigest::random().of(b"ab"));
    }
}
