//! Criterion benchmarks of the engine's fan-out path.
//!
//! - `fanout_1ch_10k_subs`: one publication to 10,000 sessions on one channel,
//!   both straight through `Hub::deliver` (the pure fan-out) and through
//!   `MemoryBroker` behind the `Broker` trait (numbering, history, encoding,
//!   fan-out) on a current-thread tokio runtime.
//! - `spread_10k_ch_1_sub`: 10,000 publications over 10,000 channels with one
//!   session each, the same two ways.
//! - `encode`: `Publication::new` for a ~200-byte JSON payload.
//!
//! Throughput is reported in elements = deliveries (one publication handed to
//! one session); for `encode`, an element is one publication encoded.
//!
//! Every session's outbox is drained after each iteration, outside the timed
//! part (`iter_custom`), so queues never grow and never lag.
//!
//! Run: `cargo bench --bench fanout` (about 40 s on 2 cores, once built).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pushgate::broker::memory::{MemoryBroker, MemoryOptions};
use pushgate::broker::{Broker, Publish};
use pushgate::config::{DEFAULT_HISTORY_SIZE, DEFAULT_HISTORY_TTL, DEFAULT_IDEMPOTENCY_WINDOW};
use pushgate::cursor::{Epoch, Position};
use pushgate::hub::{Drained, Hub, Outbox, QueueLimits};
use pushgate::message::{now_ms, ChannelName, EventName, Publication};
use serde_json::value::RawValue;

/// Sessions on the one channel of the fan-out case.
const SUBSCRIBERS: usize = 10_000;
/// Channels (one session each) of the spread case.
const CHANNELS: usize = 10_000;

/// Far more than one iteration queues: nobody lags.
const LIMITS: QueueLimits = QueueLimits {
    messages: 1_000,
    bytes: 4 << 20,
    // The server's default `limits.unsent_bytes`.
    take: 16 << 10,
};

/// The server's defaults: history is kept as in production.
const OPTIONS: MemoryOptions = MemoryOptions {
    history_size: DEFAULT_HISTORY_SIZE,
    history_ttl: DEFAULT_HISTORY_TTL,
    idempotency_window: DEFAULT_IDEMPOTENCY_WINDOW,
};

/// A typical chat-message payload: 209 bytes of compact JSON.
const PAYLOAD: &str = r#"{"type":"message","room":"lobby","id":"01HZX3K9Q4","user":{"id":12345,"name":"alice"},"text":"Hello everyone, this is a chat message of a typical length.","sent_at":"2024-05-01T12:34:56.789Z","tags":["a","b"]}"#;

fn channel(name: &str) -> ChannelName {
    ChannelName::parse(name).expect("valid channel name")
}

fn publish(channel: &ChannelName) -> Publish {
    Publish {
        channels: vec![channel.clone()],
        data: RawValue::from_string(PAYLOAD.to_owned()).expect("valid JSON"),
        event: None,
        idempotency_key: None,
        publisher: None,
    }
}

fn publication(channel: &ChannelName, offset: u64) -> Arc<Publication> {
    Arc::new(Publication::new(
        channel.clone(),
        Position::new(Epoch::parse("bench").expect("valid epoch"), offset),
        None,
        PAYLOAD,
        now_ms(),
    ))
}

/// A current-thread runtime, as a single core of the server would run.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A hub with its sessions, and a reusable batch to drain them into.
struct Sessions {
    hub: Arc<Hub>,
    outboxes: Vec<Arc<Outbox>>,
    batch: Vec<Arc<Publication>>,
}

impl Sessions {
    /// `per_channel` sessions on each of `channels`.
    fn new(channels: &[ChannelName], per_channel: usize) -> Sessions {
        let hub = Arc::new(Hub::new());
        let mut outboxes = Vec::with_capacity(channels.len() * per_channel);
        for name in channels {
            for _ in 0..per_channel {
                let outbox = Outbox::new(LIMITS);
                hub.subscribe(name, &outbox);
                outboxes.push(outbox);
            }
        }
        let batch = Vec::with_capacity(outboxes.len());
        Sessions {
            hub,
            outboxes,
            batch,
        }
    }

    /// Empties every outbox, checks that `expected` publications were queued
    /// in all, and drops them.
    fn drain(&mut self, expected: usize) {
        for outbox in &self.outboxes {
            assert_eq!(outbox.drain_into(&mut self.batch), Drained::Open);
        }
        assert_eq!(self.batch.len(), expected, "every session got it");
        self.batch.clear();
    }
}

fn fanout_one_channel(c: &mut Criterion) {
    let chat = channel("chat:lobby");
    let mut group = c.benchmark_group("fanout_1ch_10k_subs");
    group.throughput(Throughput::Elements(SUBSCRIBERS as u64));

    {
        let mut sessions = Sessions::new(std::slice::from_ref(&chat), SUBSCRIBERS);
        let publication = publication(&chat, 1);
        group.bench_function("hub_deliver", |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let delivered = sessions.hub.deliver(black_box(&publication));
                    timed += start.elapsed();
                    assert_eq!(delivered, SUBSCRIBERS);
                    sessions.drain(SUBSCRIBERS);
                }
                timed
            })
        });
    }

    {
        let mut sessions = Sessions::new(std::slice::from_ref(&chat), SUBSCRIBERS);
        // Made outside the runtime, so no sweeper task is spawned; it would
        // not run anyway, as a publish never yields.
        let broker: Arc<dyn Broker> = MemoryBroker::new(sessions.hub.clone(), OPTIONS);
        let rt = runtime();
        group.bench_function("broker_publish", |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let request = publish(&chat);
                    let start = Instant::now();
                    let outcome = rt.block_on(broker.publish(request));
                    timed += start.elapsed();
                    assert_eq!(outcome.expect("published").results.len(), 1);
                    sessions.drain(SUBSCRIBERS);
                }
                timed
            })
        });
    }
    group.finish();
}

fn spread_over_channels(c: &mut Criterion) {
    let channels: Vec<ChannelName> = (0..CHANNELS)
        .map(|i| channel(&format!("user:{i}")))
        .collect();
    let mut group = c.benchmark_group("spread_10k_ch_1_sub");
    group.throughput(Throughput::Elements(CHANNELS as u64));

    {
        let mut sessions = Sessions::new(&channels, 1);
        let publications: Vec<Arc<Publication>> =
            channels.iter().map(|name| publication(name, 1)).collect();
        group.bench_function("hub_deliver", |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let mut delivered = 0;
                    for publication in &publications {
                        delivered += sessions.hub.deliver(black_box(publication));
                    }
                    timed += start.elapsed();
                    assert_eq!(delivered, CHANNELS);
                    sessions.drain(CHANNELS);
                }
                timed
            })
        });
    }

    {
        let mut sessions = Sessions::new(&channels, 1);
        let broker: Arc<dyn Broker> = MemoryBroker::new(sessions.hub.clone(), OPTIONS);
        let rt = runtime();
        group.bench_function("broker_publish", |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let requests: Vec<Publish> = channels.iter().map(publish).collect();
                    let start = Instant::now();
                    rt.block_on(async {
                        for request in requests {
                            broker.publish(request).await.expect("published");
                        }
                    });
                    timed += start.elapsed();
                    sessions.drain(CHANNELS);
                }
                timed
            })
        });
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let chat = channel("chat:lobby");
    let position = Position::new(Epoch::parse("Xk3p9QaZ").expect("valid epoch"), 123_456);
    let event = EventName::parse("message").expect("valid event name");
    let pretty = serde_json::to_string_pretty(
        &serde_json::from_str::<serde_json::Value>(PAYLOAD).expect("valid JSON"),
    )
    .expect("serializable");

    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(1));
    let cases = [
        ("publication_new_200B", None, PAYLOAD),
        ("publication_new_200B_event", Some(&event), PAYLOAD),
        ("publication_new_200B_pretty", None, pretty.as_str()),
    ];
    for (name, event, data) in cases {
        group.bench_function(name, |b| {
            // Only the encoding is timed; the publications are dropped after.
            b.iter_with_large_drop(|| {
                Publication::new(
                    black_box(&chat).clone(),
                    black_box(position),
                    black_box(event).cloned(),
                    black_box(data),
                    0,
                )
            })
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = fanout_one_channel, spread_over_channels, encode
}
criterion_main!(benches);
