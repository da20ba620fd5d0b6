//! A latency histogram for `/metrics`, observed where the waiting happens
//! (an auth request to the app, a Redis command) and read when scraped.

use std::time::Duration;

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// Bucket bounds in seconds: 100 µs doubling up to 3.3 s (16 buckets),
/// from a loopback round trip to a command about to time out.
const FIRST_BUCKET: f64 = 0.0001;
const BUCKETS: u16 = 16;

/// Seconds spent waiting, in buckets. A clone observes into the same
/// histogram.
#[derive(Debug, Clone)]
pub struct Latency(Histogram);

impl Default for Latency {
    fn default() -> Latency {
        Latency(Histogram::new(exponential_buckets(
            FIRST_BUCKET,
            2.0,
            BUCKETS,
        )))
    }
}

impl Latency {
    pub fn observe(&self, waited: Duration) {
        self.0.observe(waited.as_secs_f64());
    }

    pub fn histogram(&self) -> &Histogram {
        &self.0
    }
}
