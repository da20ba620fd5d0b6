//! Grants by a keyed digest of the auth request that earned them.

use super::*;

/// The cache key of one auth request.
pub(super) type CacheKey = [u8; 32];

/// Grants by a keyed digest of the auth request that earned them, bounded in
/// size and age.
pub(super) struct GrantCache {
    pub(super) ttl: Duration,
    pub(super) capacity: usize,
    /// Drawn at random for each process: keys cannot be computed, or
    /// collided on purpose, from outside.
    pub(super) secret: ring::hmac::Key,
    pub(super) inner: Mutex<CacheInner>,
}

#[derive(Default)]
pub(super) struct CacheInner {
    pub(super) grants: HashMap<CacheKey, (Grant, Instant)>,
    /// Keys in insertion order: the oldest is evicted first.
    pub(super) order: VecDeque<CacheKey>,
}

impl GrantCache {
    pub(super) fn new(capacity: usize, ttl: Duration) -> GrantCache {
        let rng = ring::rand::SystemRandom::new();
        GrantCache {
            ttl,
            capacity,
            secret: ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
                .expect("the system's random source works"),
            inner: Mutex::default(),
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
        let mut digest = ring::hmac::Context::with_key(&self.secret);
        let mut part = |bytes: &[u8]| {
            digest.update(&(bytes.len() as u64).to_be_bytes());
            digest.update(bytes);
        };
        for (name, value) in &credentials.headers {
            part(name.as_str().as_bytes());
            part(value.as_bytes());
        }
        // A header name is never empty, so this marker ends the headers.
        part(b"");
        part(body);
        let mut key = [0; 32];
        key.copy_from_slice(digest.sign().as_ref());
        key
    }

    pub(super) fn get(&self, key: &CacheKey) -> Option<Grant> {
        if self.ttl.is_zero() {
            return None;
        }
        let inner = self.inner.lock().expect("grant cache lock");
        let (grant, until) = inner.grants.get(key)?;
        (Instant::now() < *until).then(|| grant.clone())
    }

    pub(super) fn put(&self, key: CacheKey, grant: Grant) {
        if self.ttl.is_zero() {
            return;
        }
        let mut until = Instant::now() + self.ttl;
        if let Some(expires) = grant.expires_at {
            until = until.min(expires);
        }
        let mut inner = self.inner.lock().expect("grant cache lock");
        if inner.grants.insert(key, (grant, until)).is_none() {
            inner.order.push_back(key);
        }
        while inner.grants.len() > self.capacity {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            inner.grants.remove(&oldest);
        }
        // Keys replaced in place leave stale entries in `order`; keep it
        // from outgrowing the map.
        if inner.order.len() > 2 * self.capacity {
            let CacheInner { grants, order } = &mut *inner;
            order.retain(|key| grants.contains_key(key));
        }
    }

    pub(super) fn forget_user(&self, user: &str) {
        let mut inner = self.inner.lock().expect("grant cache lock");
        inner
            .grants
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
            Credentials { headers }
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
        cache.put(c, grant("3"));
        assert!(cache.get(&a).is_none(), "the oldest was evicted");
        assert_eq!(cache.get(&c).unwrap().user.as_deref(), Some("3"));
        cache.forget_user("2");
        assert!(cache.get(&b).is_none());

        let off = GrantCache::new(2, Duration::ZERO);
        off.put(a, grant("1"));
        assert!(off.get(&a).is_none(), "ttl 0 turns caching off");

        // Keys are drawn per process (per cache): not computable outside.
        let other = GrantCache::new(2, Duration::from_secs(60));
        assert_ne!(other.key(&credentials("s=a"), b"{}"), a);
    }
}
