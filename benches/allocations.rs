//! Heap allocations on the fan-out path, counted by a wrapping global
//! allocator. The target is none per delivery: handing a publication to a
//! session is a reference-count bump and a push into a queue whose capacity
//! has already grown.
//!
//! Each case is warmed up first (queues, history rings and maps grown, lazily
//! initialised thread-locals made), then measured over a few rounds; sessions
//! are drained between rounds, outside the count, and publish requests are
//! built before the count starts. Everything runs on this one thread (the
//! tokio runtime is current-thread), so the process-wide counters see only
//! the code under measurement.
//!
//! Run: `cargo bench --bench allocations`. Under `cargo test --all-targets`
//! (no `--bench` argument) it runs a small, quick version of every case.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pushgate::broker::memory::{MemoryBroker, MemoryOptions};
use pushgate::broker::{Broker, Publish};
use pushgate::config::{DEFAULT_HISTORY_SIZE, DEFAULT_HISTORY_TTL, DEFAULT_IDEMPOTENCY_WINDOW};
use pushgate::cursor::{Epoch, Position};
use pushgate::hub::{Drained, Hub, Outbox, QueueLimits};
use pushgate::message::{now_ms, ChannelName, EventName, Publication};
use serde_json::value::RawValue;

/// Counts every allocation, reallocation and allocated byte, then lets
/// `System` do the work.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static REALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// `unsafe` is needed here, and only in this bench: `GlobalAlloc` is an unsafe
// trait (an allocator must uphold the layout contract), and its methods are
// unsafe fns. Every method forwards its arguments unchanged to `System`, which
// upholds the contract; the counting is plain atomics. The library itself keeps
// `#![forbid(unsafe_code)]`; a bench target is a separate crate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's `layout` is passed through unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's `layout` is passed through unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` (every allocation goes
        // through this wrapper) with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        REALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(
            new_size.saturating_sub(layout.size()) as u64,
            Ordering::Relaxed,
        );
        // SAFETY: `ptr` and `layout` come from `System` via this wrapper;
        // the caller guarantees `new_size` is valid for `layout`'s alignment.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// What the counters moved by.
#[derive(Clone, Copy, Default)]
struct Count {
    allocs: u64,
    reallocs: u64,
    bytes: u64,
}

impl Count {
    fn now() -> Count {
        Count {
            allocs: ALLOCS.load(Ordering::Relaxed),
            reallocs: REALLOCS.load(Ordering::Relaxed),
            bytes: BYTES.load(Ordering::Relaxed),
        }
    }

    /// Allocations of any kind: a realloc may move and is counted as one.
    fn total(self) -> u64 {
        self.allocs + self.reallocs
    }
}

/// Counts the allocations `f` makes.
fn counted<T>(f: impl FnOnce() -> T) -> (T, Count) {
    let before = Count::now();
    let value = f();
    let after = Count::now();
    (
        value,
        Count {
            allocs: after.allocs - before.allocs,
            reallocs: after.reallocs - before.reallocs,
            bytes: after.bytes - before.bytes,
        },
    )
}

/// Far more than one round queues: nobody lags.
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

/// Same payload as the `fanout` bench: 209 bytes of compact JSON.
const PAYLOAD: &str = r#"{"type":"message","room":"lobby","id":"01HZX3K9Q4","user":{"id":12345,"name":"alice"},"text":"Hello everyone, this is a chat message of a typical length.","sent_at":"2024-05-01T12:34:56.789Z","tags":["a","b"]}"#;

/// Measured rounds per case, after the warm-up.
const ROUNDS: u64 = 3;

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

/// A hub with its sessions, and a reusable batch to drain them into.
struct Sessions {
    hub: Arc<Hub>,
    outboxes: Vec<Arc<Outbox>>,
    batch: Vec<Arc<Publication>>,
}

impl Sessions {
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

    fn drain(&mut self, expected: usize) {
        for outbox in &self.outboxes {
            assert_eq!(outbox.drain_into(&mut self.batch), Drained::Open);
        }
        assert_eq!(self.batch.len(), expected, "every session got it");
        self.batch.clear();
    }
}

/// One row of the table.
struct Row {
    case: String,
    publishes: u64,
    deliveries: u64,
    count: Count,
}

impl Row {
    fn new(case: String, publishes: u64, deliveries: u64, count: Count) -> Row {
        Row {
            case,
            publishes,
            deliveries,
            count,
        }
    }
}

fn print(rows: &[Row]) {
    println!(
        "| case | publishes | deliveries | allocs | reallocs | bytes | allocs/delivery | allocs/publish |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let total = row.count.total() as f64;
        let per = |n: u64| {
            if n == 0 {
                "-".to_owned()
            } else {
                format!("{:.3}", total / n as f64)
            }
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            row.case,
            row.publishes,
            row.deliveries,
            row.count.allocs,
            row.count.reallocs,
            row.count.bytes,
            per(row.deliveries),
            per(row.publishes),
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not.
    let full = std::env::args().any(|arg| arg == "--bench");
    let (subscribers, channels) = if full { (10_000, 10_000) } else { (100, 100) };
    // A channel's history ring grows until it holds `history_size + 1`
    // (a push comes before the trim); warm up past that.
    let warm_rounds = DEFAULT_HISTORY_SIZE as u64 + 2;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut rows = Vec::new();

    // ---- one channel, `subscribers` sessions
    let chat = channel("chat:lobby");
    {
        let mut sessions = Sessions::new(std::slice::from_ref(&chat), subscribers);
        let publication = publication(&chat, 1);
        for _ in 0..warm_rounds {
            sessions.hub.deliver(&publication);
            sessions.drain(subscribers);
        }
        let mut total = Count::default();
        for _ in 0..ROUNDS {
            let (delivered, count) = counted(|| sessions.hub.deliver(&publication));
            assert_eq!(delivered, subscribers);
            add(&mut total, count);
            sessions.drain(subscribers);
        }
        rows.push(Row::new(
            format!("`Hub::deliver`, 1 channel x {subscribers} sessions"),
            ROUNDS,
            ROUNDS * subscribers as u64,
            total,
        ));

        // The session side: draining into a batch that has room.
        let mut total = Count::default();
        for _ in 0..ROUNDS {
            sessions.hub.deliver(&publication);
            let batch = &mut sessions.batch;
            let outboxes = &sessions.outboxes;
            let ((), count) = counted(|| {
                for outbox in outboxes {
                    outbox.drain_into(batch);
                }
            });
            assert_eq!(batch.len(), subscribers);
            batch.clear();
            add(&mut total, count);
        }
        rows.push(Row::new(
            format!("`Outbox::drain_into`, {subscribers} sessions (not a publish)"),
            0,
            ROUNDS * subscribers as u64,
            total,
        ));
    }
    {
        let mut sessions = Sessions::new(std::slice::from_ref(&chat), subscribers);
        // Made outside the runtime: no sweeper task (it would not run anyway;
        // a publish never yields).
        let broker: Arc<dyn Broker> = MemoryBroker::new(sessions.hub.clone(), OPTIONS);
        for _ in 0..warm_rounds {
            rt.block_on(broker.publish(publish(&chat)))
                .expect("published");
            sessions.drain(subscribers);
        }
        let mut total = Count::default();
        let mut boxing = Count::default();
        for _ in 0..ROUNDS {
            let request = publish(&chat);
            let (outcome, count) = counted(|| {
                // Calling an `#[async_trait]` method boxes its future; counted
                // on its own too, to tell it apart from the engine's work.
                let (future, call) = counted(|| broker.publish(request));
                add(&mut boxing, call);
                rt.block_on(future)
            });
            outcome.expect("published");
            add(&mut total, count);
            sessions.drain(subscribers);
        }
        rows.push(Row::new(
            format!("`MemoryBroker` publish, 1 channel x {subscribers} sessions"),
            ROUNDS,
            ROUNDS * subscribers as u64,
            total,
        ));
        rows.push(Row::new(
            "of which: calling `Broker::publish` (the `async_trait` box)".to_owned(),
            ROUNDS,
            0,
            boxing,
        ));
    }

    // ---- `channels` channels, one session each
    let names: Vec<ChannelName> = (0..channels)
        .map(|i| channel(&format!("user:{i}")))
        .collect();
    {
        let mut sessions = Sessions::new(&names, 1);
        let publications: Vec<Arc<Publication>> =
            names.iter().map(|name| publication(name, 1)).collect();
        let deliver_all = |sessions: &Sessions| {
            publications
                .iter()
                .map(|p| sessions.hub.deliver(p))
                .sum::<usize>()
        };
        for _ in 0..warm_rounds {
            deliver_all(&sessions);
            sessions.drain(channels);
        }
        let mut total = Count::default();
        for _ in 0..ROUNDS {
            let (delivered, count) = counted(|| deliver_all(&sessions));
            assert_eq!(delivered, channels);
            add(&mut total, count);
            sessions.drain(channels);
        }
        rows.push(Row::new(
            format!("`Hub::deliver`, {channels} channels x 1 session"),
            ROUNDS * channels as u64,
            ROUNDS * channels as u64,
            total,
        ));
    }
    {
        let mut sessions = Sessions::new(&names, 1);
        let broker: Arc<dyn Broker> = MemoryBroker::new(sessions.hub.clone(), OPTIONS);
        let publish_all = |requests: Vec<Publish>| {
            rt.block_on(async {
                for request in requests {
                    broker.publish(request).await.expect("published");
                }
            })
        };
        for _ in 0..warm_rounds {
            publish_all(names.iter().map(publish).collect());
            sessions.drain(channels);
        }
        let mut total = Count::default();
        for _ in 0..ROUNDS {
            let requests: Vec<Publish> = names.iter().map(publish).collect();
            let ((), count) = counted(|| publish_all(requests));
            add(&mut total, count);
            sessions.drain(channels);
        }
        rows.push(Row::new(
            format!("`MemoryBroker` publish, {channels} channels x 1 session"),
            ROUNDS * channels as u64,
            ROUNDS * channels as u64,
            total,
        ));
    }

    // ---- what one publication costs to encode, for comparison
    let position = Position::new(Epoch::parse("Xk3p9QaZ").expect("valid epoch"), 123_456);
    let message = EventName::parse("message").expect("valid event name");
    for (case, event) in [
        ("`Publication::new`, 209-byte payload", None),
        (
            "`Publication::new`, 209-byte payload, event",
            Some(&message),
        ),
    ] {
        let mut made = Vec::with_capacity(ROUNDS as usize);
        let ((), count) = counted(|| {
            for _ in 0..ROUNDS {
                made.push(Publication::new(
                    chat.clone(),
                    position,
                    event.cloned(),
                    PAYLOAD,
                    0,
                ));
            }
        });
        rows.push(Row::new(case.to_owned(), ROUNDS, 0, count));
    }

    println!(
        "allocations on the fan-out path ({} mode, {ROUNDS} measured rounds per case after {warm_rounds} warm-up rounds)\n",
        if full { "full" } else { "quick test" }
    );
    print(&rows);
}

fn add(total: &mut Count, count: Count) {
    total.allocs += count.allocs;
    total.reallocs += count.reallocs;
    total.bytes += count.bytes;
}
