//! Grants by a keyed digest of the auth request that earned them.

use super::*;
use crate::keyed::KeyedDigest;

/// The cache key of one auth request.
pub(super) type CacheKey = [u8; 32];

/// Grants by a keyed digest of the auth request that earned them, bounded in
/// size (quick_cache's S3-FIFO eviction) and age (each entry keeps its own
/// deadline: `cache_ttl`, or the grant's `expires_in` if sooner).
pub(super) struct GrantCache {
    pub(super) ttl: Duration,
    /// Drawn at random for each process: keys cannot be computed, or
    /// collided on purpose, from outside.
    pub(super) secret: KeyedDigest,
    pub(super) grants: quick_cache::sync::Cache<CacheKey, (Grant, Instant)>,
}

impl GrantCache {
    pub(super) fn new(capacity: usize, ttl: Duration) -> GrantCache {
        GrantCache {
            ttl,
            secret: KeyedDigest::random(),
            grants: quick_cache::sync::Cache::new(capacity.max(1)),
        }
    }

    /// The key under which the app's answer to this request is cached:
    /// HMAC-SHA256 of every header the app is sent (name and value, in the
    /// order they are written: the forwarded credentials, `X-Forwarded-For`
    /// and the fixed ones) and of the whole JSON body (transport, channels,
    /// path, query), each part length-prefixed so that no two different
    /// requests give the same input. The request line and `Host` are the
    /// same for every request. The credentials themselves are not kept.
    ///
    /// Invariant: **two requests share a cached grant only when the auth
    /// request the app would see is byte-for-byte the same.** The app
    /// decides from what it is sent, so a grant it gave for one request (one
    /// cookie, one client address, one set of channels) is never served for
    /// another. Whatever is added to the auth request goes through
    /// `credentials` and `body`, and so into the key.
    pub(super) fn key(&self, credentials: &Credentials, body: &[u8]) -> CacheKey {
        let headers = credentials
            .headers()
            .iter()
            .flat_map(|(name, value)| [name.as_str().as_bytes(), value.as_bytes()]);
        // A header name is never empty, so an empty part ends the headers.
        self.secret.of_parts(headers.chain([&b""[..], body]))
    }

    pub(super) fn get(&self, key: &CacheKey) -> Option<Grant> {
        if self.ttl.is_zero() {
            return None;
        }
        let (grant, until) = self.grants.get(key)?;
        if Instant::now() < until {
            Some(grant)
        } else {
            self.grants.remove(key);
            None
        }
    }

    pub(super) fn put(&self, key: CacheKey, grant: Grant) {
        if self.ttl.is_zero() {
            return;
        }
        let mut until = Instant::now() + self.ttl;
        if let Some(expires) = grant.expires_at {
            until = until.min(expires);
        }
        self.grants.insert(key, (grant, until));
    }

    pub(super) fn forget_user(&self, user: &str) {
        self.grants
            .retain(|_, (grant, _)| grant.user.as_deref() != Some(user));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn the_cache_is_bounded_keyed_and_forgets_users() {
        let cache = GrantCache::new(2, Duration::from_secs(60));
        let credentials = |cookie: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::COOKIE, HeaderValue::from_str(cookie).unwrap());
            Credentials::new(headers)
        };
        let grant = |user: &str| Grant {
            user: Some(user.into()),
            ..Grant::everything()
        };
        let (a, b, c) = (
            cache.key(&credentials("s=a"), b"{}"),
            cache.key(&credentials("s=b"), b"{}"),
            cache.key(&credentials("s=c"), b"{}"),
        );
        assert_ne!(a, b);
        cache.put(a, grant("1"));
        cache.put(b, grant("2"));
        assert_eq!(cache.get(&a).unwrap().user.as_deref(), Some("1"));
        assert_eq!(cache.get(&b).unwrap().user.as_deref(), Some("2"));
        cache.forget_user("2");
        assert!(cache.get(&b).is_none(), "a user's grants are forgotten");
        assert_eq!(cache.get(&a).unwrap().user.as_deref(), Some("1"));

        // Bounded: however many requests, at most `capacity` grants.
        let bounded = GrantCache::new(100, Duration::from_secs(60));
        for n in 0..10_000 {
            bounded.put(
                bounded.key(&credentials(&format!("s={n}")), b"{}"),
                grant("u"),
            );
        }
        assert!(bounded.grants.len() <= 100, "{}", bounded.grants.len());
        bounded.put(c, grant("3"));
        assert_eq!(bounded.get(&c).unwrap().user.as_deref(), Some("3"));

        // A grant is served only until its own deadline.
        let short = Grant {
            expires_at: Some(Instant::now()),
            ..grant("4")
        };
        cache.put(c, short);
        assert!(cache.get(&c).is_none(), "an expired grant is not served");

        let off = GrantCache::new(2, Duration::ZERO);
        off.put(a, grant("1"));
        assert!(off.get(&a).is_none(), "ttl 0 turns caching off");

        // Keys are drawn per process (per cache): not computable outside.
        let other = GrantCache::new(2, Duration::from_secs(60));
        assert_ne!(other.key(&credentials("s=a"), b"{}"), a);
    }
}
