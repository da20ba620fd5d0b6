//! Criterion benchmarks of what authorizing costs: the keyed digests
//! (`pushgate::keyed`) of an API key, per publish, against the two SipHash
//! instances the digest was before; a grant-cache key of a typical auth
//! request; and a lookup in the grant cache's store (quick_cache) against
//! the mutex-guarded map it replaced.
//!
//! Run: `cargo bench --bench auth` (about 30 s once built).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::hint::black_box;
use std::sync::Mutex;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use pushgate::keyed::KeyedDigest;

fn digests(c: &mut Criterion) {
    // A key as `openssl rand -hex 32` makes it.
    let api_key = b"3f9c2d4e5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d";
    let keyed = KeyedDigest::random();
    c.bench_function("api_key/hmac_sha256", |b| {
        b.iter(|| keyed.of(black_box(api_key)))
    });
    let (a, z) = (RandomState::new(), RandomState::new());
    c.bench_function("api_key/two_siphash", |b| {
        b.iter(|| {
            let key = black_box(&api_key[..]);
            (a.hash_one(key), z.hash_one(key))
        })
    });
    // The parts of a grant-cache key: cookie, authorization,
    // X-Forwarded-For, and the JSON body.
    let cookie =
        b"sessionid=8f14e45fceea167a5a36dedd4bea2543; csrftoken=c9f0f895fb98ab9159f51fd0297e236d";
    let body = br#"{"transport":"websocket","channels":["chat:1","user:42"],"path":"/realtime/ws","query":""}"#;
    c.bench_function("grant_cache_key/hmac_sha256", |b| {
        b.iter(|| {
            keyed.of_parts([
                &b"cookie"[..],
                black_box(&cookie[..]),
                b"x-forwarded-for",
                b"127.0.0.1",
                b"",
                black_box(&body[..]),
            ])
        })
    });
}

/// A cached grant's stand-in: a user and its deadline.
type Entry = (String, Instant);

fn cache_lookups(c: &mut Criterion) {
    const ENTRIES: u32 = 10_000;
    let keyed = KeyedDigest::random();
    let keys: Vec<[u8; 32]> = (0..ENTRIES).map(|n| keyed.of(&n.to_le_bytes())).collect();
    let entry = |n: u32| -> Entry { (format!("user-{n}"), Instant::now()) };

    let quick = quick_cache::sync::Cache::<[u8; 32], Entry>::new(ENTRIES as usize);
    let locked = Mutex::new(HashMap::<[u8; 32], Entry>::new());
    for (n, key) in keys.iter().enumerate() {
        quick.insert(*key, entry(n as u32));
        locked.lock().unwrap().insert(*key, entry(n as u32));
    }
    let mut n = 0;
    c.bench_function("grant_cache_get/quick_cache", |b| {
        b.iter(|| {
            n = (n + 7919) % keys.len();
            quick.get(black_box(&keys[n]))
        })
    });
    c.bench_function("grant_cache_get/mutex_hashmap", |b| {
        b.iter(|| {
            n = (n + 7919) % keys.len();
            locked.lock().unwrap().get(black_box(&keys[n])).cloned()
        })
    });
}

criterion_group!(benches, digests, cache_lookups);
criterion_main!(benches);
