//! What `GET /metrics` exposes, encoded by prometheus-client in the
//! Prometheus text format (0.0.4). Counters are bumped where things happen
//! (the publish outcomes here, the others by their owners); gauges and the
//! owners' counters are read when scraped, into a [`Scrape`] that encodes
//! them.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::auth::AuthStats;
use crate::broker::{EngineStats, RedisStats};
use crate::hub::Hub;
use crate::latency::Latency;
use crate::posting::PostStats;
use crate::proxy::ProxyStats;
use crate::rate::{Limit, Refused};
use crate::transport::Gauges;

/// The `Content-Type` of what [`Metrics::render`] returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

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
    /// Refused unstored: the node's fan-out stayed behind for
    /// `api.backpressure.max_wait` (503 `overloaded`).
    Overloaded,
}

impl PublishOutcome {
    const ALL: [PublishOutcome; 5] = [
        PublishOutcome::Stored,
        PublishOutcome::Duplicate,
        PublishOutcome::Rejected,
        PublishOutcome::Failed,
        PublishOutcome::Overloaded,
    ];

    fn label(self) -> &'static str {
        match self {
            PublishOutcome::Stored => "stored",
            PublishOutcome::Duplicate => "duplicate",
            PublishOutcome::Rejected => "rejected",
            PublishOutcome::Failed => "failed",
            PublishOutcome::Overloaded => "overloaded",
        }
    }
}

#[derive(Default)]
pub struct Metrics {
    /// Realtime connection and subscription gauges, kept by the transports.
    pub realtime: Arc<Gauges>,
    /// By [`PublishOutcome`], in its order.
    publishes: [Counter; 5],
    /// Refusals by rate limit, counted where each limit is kept.
    pub refused: Arc<Refused>,
    /// Proxied requests, counted by the proxy.
    pub proxied: Arc<ProxyStats>,
}

impl Metrics {
    pub fn publish(&self, outcome: PublishOutcome, count: usize) {
        self.publishes[outcome as usize].inc_by(count as u64);
    }

    /// The Prometheus text exposition of everything pushgate measures.
    pub fn render(
        &self,
        engine: EngineStats,
        hub: &Hub,
        auth: AuthStats,
        events: Option<PostStats>,
        webhooks: Option<PostStats>,
    ) -> String {
        let scrape = Scrape {
            publishes: PublishOutcome::ALL.map(|o| (o.label(), self.publishes[o as usize].get())),
            realtime: self.realtime.read(),
            realtime_counts: self.realtime.counts(),
            delivery: self.realtime.delivery.clone(),
            proxied: self.proxied.classes(),
            proxy_latency: self.proxied.latency.clone(),
            rate_limited: Limit::ALL.map(|limit| (limit.label(), self.refused.get(limit))),
            auth,
            engine,
            subscribed_channels: hub.channel_count() as u64,
            deliveries: hub.delivered_total(),
            slow_consumers: hub.lagged_total(),
            fanout_behind: hub.is_behind(),
            events,
            webhooks,
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(scrape));
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            .expect("encoding into a String cannot fail");
        out
    }
}

/// Everything read for one scrape.
#[derive(Debug)]
struct Scrape {
    publishes: [(&'static str, u64); 5],
    realtime: Vec<(&'static str, i64, i64)>,
    realtime_counts: crate::transport::RealtimeCounts,
    delivery: Latency,
    proxied: [(&'static str, u64); 5],
    proxy_latency: Latency,
    rate_limited: [(&'static str, u64); 4],
    auth: AuthStats,
    engine: EngineStats,
    subscribed_channels: u64,
    deliveries: u64,
    slow_consumers: u64,
    fanout_behind: bool,
    /// `None` while `events.path` is not set.
    events: Option<PostStats>,
    /// `None` while no Pusher app has `webhook.url` set.
    webhooks: Option<PostStats>,
}

/// Writes metric families into one scrape. Names are given as exposed,
/// less the `_total` prometheus-client adds to a counter's.
struct Out<'a>(DescriptorEncoder<'a>);

type Written = Result<(), std::fmt::Error>;

impl Out<'_> {
    fn counter(&mut self, name: &str, help: &str, value: u64) -> Written {
        let metric = ConstCounter::new(value);
        metric.encode(
            self.0
                .encode_descriptor(name, help, None, metric.metric_type())?,
        )
    }

    fn gauge(&mut self, name: &str, help: &str, value: impl Into<i64>) -> Written {
        let metric = ConstGauge::new(value.into());
        metric.encode(
            self.0
                .encode_descriptor(name, help, None, metric.metric_type())?,
        )
    }

    /// One family of counters or gauges, a sample per value of `label`.
    fn labelled<L: AsRef<str>, V: Into<i64>>(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        label: &str,
        samples: impl IntoIterator<Item = (L, V)>,
    ) -> Written {
        let mut family = self.0.encode_descriptor(name, help, None, kind)?;
        for (value_of_label, value) in samples {
            let labels = [(label, value_of_label.as_ref())];
            let sample = family.encode_family(&labels)?;
            match kind {
                MetricType::Counter => {
                    ConstCounter::new(value.into().max(0) as u64).encode(sample)?
                }
                _ => ConstGauge::new(value.into()).encode(sample)?,
            }
        }
        Ok(())
    }

    fn histogram(&mut self, name: &str, help: &str, latency: &Latency) -> Written {
        let histogram = latency.histogram();
        histogram.encode(
            self.0
                .encode_descriptor(name, help, None, histogram.metric_type())?,
        )
    }
}

impl Collector for Scrape {
    fn encode(&self, encoder: DescriptorEncoder) -> Written {
        let mut out = Out(encoder);
        let counts = |pairs: &[(&'static str, u64)]| -> Vec<(&'static str, i64)> {
            pairs
                .iter()
                .map(|&(label, value)| (label, i64::try_from(value).unwrap_or(i64::MAX)))
                .collect()
        };
        out.labelled(
            "pushgate_publishes",
            "Publishes through the API by outcome: stored and duplicate count one per channel, rejected one per refused request or batch item, failed one per channel the engine could not store, overloaded one per request refused unstored because the fan-out stayed behind (api.backpressure).",
            MetricType::Counter,
            "outcome",
            counts(&self.publishes),
        )?;
        out.labelled(
            "pushgate_connections",
            "Open realtime connections (waiting requests for poll), by transport.",
            MetricType::Gauge,
            "transport",
            self.realtime
                .iter()
                .map(|&(t, connections, _)| (t, connections)),
        )?;
        out.labelled(
            "pushgate_subscriptions",
            "Channel subscriptions of open realtime connections, by transport.",
            MetricType::Gauge,
            "transport",
            self.realtime
                .iter()
                .map(|&(t, _, subscriptions)| (t, subscriptions)),
        )?;
        let realtime = &self.realtime_counts;
        out.labelled(
            "pushgate_connects_refused",
            "Realtime connects refused, by the refusal's code (origin_not_allowed, rate_limited, too_many_connections, unauthenticated, forbidden, auth_unavailable, …).",
            MetricType::Counter,
            "reason",
            counts(&realtime.refused),
        )?;
        out.labelled(
            "pushgate_resumes",
            "Subscriptions that asked to resume from a position: recovered from history, or told to reset (history did not cover the gap).",
            MetricType::Counter,
            "outcome",
            counts(&[("recovered", realtime.recovered), ("reset", realtime.reset)]),
        )?;
        out.gauge(
            "pushgate_fanout_behind",
            "1 while this node's fan-out runs behind (most sessions take their publications later than api.backpressure.max_delay) and publishes wait; else 0.",
            i64::from(self.fanout_behind),
        )?;
        out.gauge(
            "pushgate_calls_in_flight",
            "rpc and publish commands from WebSocket clients waiting for their answer.",
            realtime.calls,
        )?;
        out.histogram(
            "pushgate_delivery_latency_seconds",
            "From a publication's storing to its write to a subscriber's socket, per write (its oldest publication), at millisecond resolution.",
            &self.delivery,
        )?;
        out.labelled(
            "pushgate_proxied_requests",
            "Requests proxied to the app, by the status class of their answer (the app's, or pushgate's 502/503/504 when the app could not answer).",
            MetricType::Counter,
            "class",
            counts(&self.proxied),
        )?;
        out.histogram(
            "pushgate_proxy_response_seconds",
            "Time from a proxied request's arrival to its answer's head.",
            &self.proxy_latency,
        )?;
        out.labelled(
            "pushgate_rate_limited",
            "Commands, publishes and connects refused by a rate limit, by limit: commands and client_publishes per WebSocket connection, connects per client address, api_publishes per API key.",
            MetricType::Counter,
            "limit",
            counts(&self.rate_limited),
        )?;
        let auth = &self.auth;
        out.labelled(
            "pushgate_auth",
            "Realtime connection authorizations by outcome (cached: answered from the grant cache).",
            MetricType::Counter,
            "outcome",
            counts(&[
                ("allowed", auth.allowed),
                ("cached", auth.cached),
                ("unauthenticated", auth.unauthenticated),
                ("forbidden", auth.forbidden),
                ("unavailable", auth.unavailable),
            ]),
        )?;
        out.histogram(
            "pushgate_auth_request_seconds",
            "Time spent waiting for the app's answer to auth requests.",
            &auth.request_seconds,
        )?;
        out.gauge(
            "pushgate_engine_channels",
            "Channels the engine holds state for (history or local subscribers).",
            i64::try_from(self.engine.channels).unwrap_or(i64::MAX),
        )?;
        out.gauge(
            "pushgate_history_publications",
            "Publications held in history across all channels.",
            i64::try_from(self.engine.history_publications).unwrap_or(i64::MAX),
        )?;
        out.gauge(
            "pushgate_subscribed_channels",
            "Channels with at least one subscriber on this node.",
            i64::try_from(self.subscribed_channels).unwrap_or(i64::MAX),
        )?;
        out.counter(
            "pushgate_deliveries",
            "Publications handed to sessions on this node.",
            self.deliveries,
        )?;
        out.counter(
            "pushgate_slow_consumers",
            "Sessions cut off because their queue overflowed.",
            self.slow_consumers,
        )?;
        if let Some(redis) = &self.engine.redis {
            encode_redis(&mut out, redis)?;
        }
        if let Some(events) = &self.events {
            encode_posted(&mut out, "pushgate_events", "Connection events", events)?;
        }
        if let Some(webhooks) = &self.webhooks {
            encode_posted(
                &mut out,
                "pushgate_pusher_webhooks",
                "Pusher webhooks",
                webhooks,
            )?;
        }
        Ok(())
    }
}

/// A `posting` queue's counts, as `{prefix}_sent`, `_dropped`, `_retries`
/// and `_queued`; `what` names its items.
fn encode_posted(out: &mut Out, prefix: &str, what: &str, posted: &PostStats) -> Written {
    let count = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
    out.counter(
        &format!("{prefix}_sent"),
        &format!("{what} the app acknowledged (2xx)."),
        posted.sent,
    )?;
    out.labelled(
        &format!("{prefix}_dropped"),
        &format!("{what} never acknowledged: queue_full (the oldest dropped while the app was slow or down), refused (the app answered a 4xx), shutdown (left unsent when the node stopped)."),
        MetricType::Counter,
        "reason",
        [
            ("queue_full", count(posted.dropped_queue_full)),
            ("refused", count(posted.dropped_refused)),
            ("shutdown", count(posted.dropped_shutdown)),
        ],
    )?;
    out.counter(
        &format!("{prefix}_retries"),
        &format!(
            "Batches of {} that failed (no 2xx or 4xx answer) and were sent again.",
            what.to_lowercase()
        ),
        posted.retries,
    )?;
    out.gauge(
        &format!("{prefix}_queued"),
        &format!("{what} waiting to be sent, the batch in flight included."),
        count(posted.queued),
    )
}

fn encode_redis(out: &mut Out, redis: &RedisStats) -> Written {
    out.gauge(
        "pushgate_redis_up",
        "1 when the last command reached Redis.",
        i64::from(redis.up),
    )?;
    out.gauge(
        "pushgate_redis_pubsub_up",
        "1 when the pub/sub connection to Redis is subscribed and in sync.",
        i64::from(redis.pubsub_up),
    )?;
    out.counter(
        "pushgate_redis_reconnects",
        "Times the pub/sub connection to Redis was re-established.",
        redis.reconnects,
    )?;
    out.histogram(
        "pushgate_redis_command_seconds",
        "Time spent waiting for Redis commands (scripts included).",
        &redis.command_seconds,
    )?;
    out.counter(
        "pushgate_redis_command_errors",
        "Redis commands that failed or timed out.",
        redis.command_errors,
    )?;
    out.counter(
        "pushgate_redis_messages",
        "Publications received from Redis pub/sub.",
        redis.messages,
    )?;
    out.counter(
        "pushgate_redis_malformed",
        "Payloads from Redis that were not readable publications (ignored).",
        redis.malformed,
    )?;
    out.counter(
        "pushgate_redis_resets",
        "Channels whose local subscribers got a reset because history did not cover an outage.",
        redis.resets,
    )?;
    out.counter(
        "pushgate_redis_not_replicated",
        "Publishes stored on their master but not confirmed by engine.redis.wait_replicas replicas within engine.redis.wait_timeout (answered 503 not_replicated).",
        redis.not_replicated,
    )?;
    if !redis.shards.is_empty() {
        out.labelled(
            "pushgate_redis_shard_up",
            "Redis Cluster: 1 when the master serving these slots is reachable and every local channel of them is subscribed there and checked.",
            MetricType::Gauge,
            "slots",
            redis
                .shards
                .iter()
                .map(|(slots, up)| (slots.as_str(), i64::from(*up))),
        )?;
        out.counter(
            "pushgate_redis_unsolicited_unsubscribes",
            "Redis Cluster: channels a master unsubscribed unasked (their slot moved); each was subscribed again where it lives and checked.",
            redis.unsolicited_unsubscribes,
        )?;
    }
    Ok(())
}
