//! Criterion benchmarks of WebSocket compression (permessage-deflate): the
//! cost of compressing one publication's envelope, at the sizes where
//! `realtime.websocket.compression.min_size` is chosen, and of inflating a
//! client's message.
//!
//! The envelopes hold rows like those `pushgate-bench broadcast
//! --payload-size` publishes (a made-up price feed: repeated keys, varied
//! values). Before timing, each size's compressed length is printed, so the
//! bytes saved sit beside the time it costs.
//!
//! Run: `cargo bench --bench deflate` (about 30 s on 2 cores, once built).

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pushgate::deflate::{compress, inflate, TRAILER};

/// Envelope sizes, in bytes.
const SIZES: [usize; 8] = [64, 128, 256, 512, 1024, 2048, 8192, 32768];

/// An envelope of about `size` bytes.
fn envelope(size: usize) -> Vec<u8> {
    let mut json = String::from(
        r#"{"channel":"prices","epoch":"Xk2v9Qa1","offset":42,"data":{"seq":7,"rows":["#,
    );
    let mut n = 0u64;
    while json.len() + 3 < size {
        if n > 0 {
            json.push(',');
        }
        let side = if n.is_multiple_of(3) { "sell" } else { "buy" };
        let _ = write!(
            json,
            r#"{{"symbol":"S{:03}","price":{}.{:02},"size":{},"side":"{side}"}}"#,
            n * 7 % 500,
            100 + n * 37 % 900,
            n * 13 % 100,
            (n * 53 % 40 + 1) * 100,
        );
        n += 1;
    }
    json.push_str("]}}");
    json.into_bytes()
}

fn compressing(c: &mut Criterion) {
    let mut group = c.benchmark_group("compress");
    group.measurement_time(Duration::from_secs(2));
    for size in SIZES {
        let message = envelope(size);
        let compressed = compress(&message).map_or(message.len(), |bytes| bytes.len());
        eprintln!(
            "envelope {} B -> {} B compressed ({:.0} %)",
            message.len(),
            compressed,
            100.0 * compressed as f64 / message.len() as f64
        );
        group.throughput(Throughput::Bytes(message.len() as u64));
        group.bench_function(format!("{size}B"), |b| {
            b.iter(|| compress(black_box(&message)))
        });
    }
    group.finish();
}

fn inflating(c: &mut Criterion) {
    let mut group = c.benchmark_group("inflate");
    group.measurement_time(Duration::from_secs(2));
    for size in [256, 2048] {
        let message = envelope(size);
        let mut wire = compress(&message).expect("compresses").to_vec();
        wire.extend_from_slice(&TRAILER);
        group.throughput(Throughput::Bytes(message.len() as u64));
        group.bench_function(format!("{size}B"), |b| {
            b.iter(|| inflate(black_box(&wire), 64 << 10))
        });
    }
    group.finish();
}

criterion_group!(benches, compressing, inflating);
criterion_main!(benches);
