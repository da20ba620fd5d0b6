//! Rate limits (GCRA, from governor): what one connection may send per
//! second, how often one client address may connect, and how often one API
//! key may publish. Each refusal is counted for `/metrics`.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};

/// The quota for `per_second` on average and bursts of `burst`; both at
/// least 1 (config checks).
fn quota(per_second: u32, burst: u32) -> Quota {
    let at_least_one = |n: u32| NonZeroU32::new(n.max(1)).expect("at least 1");
    Quota::per_second(at_least_one(per_second)).allow_burst(at_least_one(burst))
}

/// One connection's limit.
#[derive(Debug)]
pub struct Rate(DefaultDirectRateLimiter);

impl Rate {
    pub fn new(per_second: u32, burst: u32) -> Rate {
        Rate(DefaultDirectRateLimiter::direct(quota(per_second, burst)))
    }

    /// Takes one; `false` when over the limit.
    pub fn take(&self) -> bool {
        self.0.check().is_ok()
    }
}

/// A limit per key (a client address, an API key).
#[derive(Debug)]
pub struct KeyedRate<K: Hash + Eq + Clone> {
    limiter: DefaultKeyedRateLimiter<K>,
    checks: AtomicU64,
}

/// Keys not seen for a while are forgotten every this many checks, so the
/// table holds only keys that are active.
const FORGET_EVERY: u64 = 4096;

impl<K: Hash + Eq + Clone> KeyedRate<K> {
    pub fn new(per_second: u32, burst: u32) -> KeyedRate<K> {
        KeyedRate {
            limiter: DefaultKeyedRateLimiter::keyed(quota(per_second, burst)),
            checks: AtomicU64::new(0),
        }
    }

    /// Takes one for `key`; over the limit, how long until one is free.
    pub fn take(&self, key: &K) -> Result<(), Duration> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % FORGET_EVERY == FORGET_EVERY - 1 {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        self.limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// Which limit refused something.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    /// `realtime.commands_per_second`, per WebSocket connection.
    Commands,
    /// `realtime.publishes_per_second`, per WebSocket connection.
    ClientPublishes,
    /// `realtime.connects_per_second`, per client address.
    Connects,
    /// `api.publishes_per_second`, per API key.
    ApiPublishes,
}

impl Limit {
    pub const ALL: [Limit; 4] = [
        Limit::Commands,
        Limit::ClientPublishes,
        Limit::Connects,
        Limit::ApiPublishes,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Limit::Commands => "commands",
            Limit::ClientPublishes => "client_publishes",
            Limit::Connects => "connects",
            Limit::ApiPublishes => "api_publishes",
        }
    }
}

/// Refusals by limit, for `/metrics`.
#[derive(Debug, Default)]
pub struct Refused([AtomicU64; 4]);

impl Refused {
    pub fn count(&self, limit: Limit) {
        self.0[limit as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, limit: Limit) -> u64 {
        self.0[limit as usize].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let rate = Rate::new(1, 3);
        assert!((0..3).all(|_| rate.take()), "the burst");
        assert!(!rate.take(), "then the rate");
        let keyed = KeyedRate::new(1, 2);
        assert!(keyed.take(&"a").is_ok() && keyed.take(&"a").is_ok());
        let wait = keyed.take(&"a").unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(keyed.take(&"b").is_ok(), "each key has its own");
    }

    #[test]
    fn keys_gone_quiet_are_forgotten() {
        let keyed = KeyedRate::new(1000, 1000);
        for i in 0..FORGET_EVERY * 2 {
            let _ = keyed.take(&i);
        }
        // A key is forgotten once its state is back to full: at 1000/s,
        // within a millisecond of its last use.
        std::thread::sleep(Duration::from_millis(5));
        for _ in 0..FORGET_EVERY {
            let _ = keyed.take(&u64::MAX);
        }
        assert!(keyed.limiter.len() < 100, "{}", keyed.limiter.len());
    }
}
