//! Counters and gauges, served at `GET /metrics` in the Prometheus text
//! format. Counters are plain atomics bumped where things happen; gauges are
//! read from their owners when scraped.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use std::sync::Arc;

use crate::auth::AuthStats;
use crate::broker::{EngineStats, RedisStats};
use crate::hub::Hub;
use crate::transport::Gauges;

/// Outcomes of a requested publication (one per channel of a publish item).
#[derive(Debug, Clone, Copy)]
pub enum PublishOutcome {
    /// Stored in history and handed to subscribers.
    Stored,
    /// A repeated idempotency key: answered with the first result.
    Duplicate,
    /// Refused as invalid (4xx).
    Rejected,
    /// The engine could not store it (503).
    Failed,
}

#[derive(Default)]
pub struct Metrics {
    /// Realtime connection and subscription gauges, kept by the transports.
    pub realtime: Arc<Gauges>,
    stored: AtomicU64,
    duplicate: AtomicU64,
    rejected: AtomicU64,
    failed: AtomicU64,
}

impl Metrics {
    pub fn publish(&self, outcome: PublishOutcome, count: usize) {
        let counter = match outcome {
            PublishOutcome::Stored => &self.stored,
            PublishOutcome::Duplicate => &self.duplicate,
            PublishOutcome::Rejected => &self.rejected,
            PublishOutcome::Failed => &self.failed,
        };
        counter.fetch_add(count as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of everything pushgate measures.
    pub fn render(&self, engine: EngineStats, hub: &Hub, auth: AuthStats) -> String {
        let mut out = String::with_capacity(2048);
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        family(
            &mut out,
            "pushgate_publishes_total",
            "counter",
            "Publishes through the API by outcome: stored and duplicate count one per channel, rejected one per refused request or batch item, failed one per channel the engine could not store.",
        );
        for (outcome, value) in [
            ("stored", load(&self.stored)),
            ("duplicate", load(&self.duplicate)),
            ("rejected", load(&self.rejected)),
            ("failed", load(&self.failed)),
        ] {
            let _ = writeln!(
                out,
                "pushgate_publishes_total{{outcome=\"{outcome}\"}} {value}"
            );
        }
        let realtime = self.realtime.read();
        family(
            &mut out,
            "pushgate_connections",
            "gauge",
            "Open realtime connections (waiting requests for poll), by transport.",
        );
        for (transport, connections, _) in &realtime {
            let _ = writeln!(
                out,
                "pushgate_connections{{transport=\"{transport}\"}} {connections}"
            );
        }
        family(
            &mut out,
            "pushgate_subscriptions",
            "gauge",
            "Channel subscriptions of open realtime connections, by transport.",
        );
        for (transport, _, subscriptions) in &realtime {
            let _ = writeln!(
                out,
                "pushgate_subscriptions{{transport=\"{transport}\"}} {subscriptions}"
            );
        }
        family(
            &mut out,
            "pushgate_auth_total",
            "counter",
            "Realtime connection authorizations by outcome (cached: answered from the grant cache).",
        );
        for (outcome, value) in [
            ("allowed", auth.allowed),
            ("cached", auth.cached),
            ("unauthenticated", auth.unauthenticated),
            ("forbidden", auth.forbidden),
            ("unavailable", auth.unavailable),
        ] {
            let _ = writeln!(out, "pushgate_auth_total{{outcome=\"{outcome}\"}} {value}");
        }
        family(
            &mut out,
            "pushgate_auth_request_seconds",
            "summary",
            "Time spent waiting for the app's answer to auth requests.",
        );
        let _ = writeln!(
            out,
            "pushgate_auth_request_seconds_sum {}",
            auth.request_seconds
        );
        let _ = writeln!(out, "pushgate_auth_request_seconds_count {}", auth.requests);
        single(
            &mut out,
            "pushgate_engine_channels",
            "gauge",
            "Channels the engine holds state for (history or local subscribers).",
            engine.channels,
        );
        single(
            &mut out,
            "pushgate_history_publications",
            "gauge",
            "Publications held in history across all channels.",
            engine.history_publications,
        );
        single(
            &mut out,
            "pushgate_subscribed_channels",
            "gauge",
            "Channels with at least one subscriber on this node.",
            hub.channel_count() as u64,
        );
        single(
            &mut out,
            "pushgate_deliveries_total",
            "counter",
            "Publications handed to sessions on this node.",
            hub.delivered_total(),
        );
        single(
            &mut out,
            "pushgate_slow_consumers_total",
            "counter",
            "Sessions cut off because their queue overflowed.",
            hub.lagged_total(),
        );
        if let Some(redis) = engine.redis {
            render_redis(&mut out, &redis);
        }
        out
    }
}

fn render_redis(out: &mut String, redis: &RedisStats) {
    single(
        out,
        "pushgate_redis_up",
        "gauge",
        "1 when the last command reached Redis.",
        u64::from(redis.up),
    );
    single(
        out,
        "pushgate_redis_pubsub_up",
        "gauge",
        "1 when the pub/sub connection to Redis is subscribed and in sync.",
        u64::from(redis.pubsub_up),
    );
    single(
        out,
        "pushgate_redis_reconnects_total",
        "counter",
        "Times the pub/sub connection to Redis was re-established.",
        redis.reconnects,
    );
    family(
        out,
        "pushgate_redis_command_seconds",
        "summary",
        "Time spent waiting for Redis commands (scripts included).",
    );
    let _ = writeln!(
        out,
        "pushgate_redis_command_seconds_sum {}",
        redis.command_seconds
    );
    let _ = writeln!(
        out,
        "pushgate_redis_command_seconds_count {}",
        redis.commands
    );
    single(
        out,
        "pushgate_redis_command_errors_total",
        "counter",
        "Redis commands that failed or timed out.",
        redis.command_errors,
    );
    single(
        out,
        "pushgate_redis_messages_total",
        "counter",
        "Publications received from Redis pub/sub.",
        redis.messages,
    );
    single(
        out,
        "pushgate_redis_malformed_total",
        "counter",
        "Payloads from Redis that were not readable publications (ignored).",
        redis.malformed,
    );
    single(
        out,
        "pushgate_redis_resets_total",
        "counter",
        "Channels whose local subscribers got a reset because history did not cover an outage.",
        redis.resets,
    );
    single(
        out,
        "pushgate_redis_not_replicated_total",
        "counter",
        "Publishes stored on their master but not confirmed by engine.redis.wait_replicas replicas within engine.redis.wait_timeout (answered 503 not_replicated).",
        redis.not_replicated,
    );
    if !redis.shards.is_empty() {
        family(
            out,
            "pushgate_redis_shard_up",
            "gauge",
            "Redis Cluster: 1 when the master serving these slots is reachable and every local channel of them is subscribed there and checked.",
        );
        for (slots, up) in &redis.shards {
            let _ = writeln!(
                out,
                "pushgate_redis_shard_up{{slots=\"{slots}\"}} {}",
                u64::from(*up)
            );
        }
        single(
            out,
            "pushgate_redis_unsolicited_unsubscribes_total",
            "counter",
            "Redis Cluster: channels a master unsubscribed unasked (their slot moved); each was subscribed again where it lives and checked.",
            redis.unsolicited_unsubscribes,
        );
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn single(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}
