//! Pusher's webhooks: what happened to an app's channels, posted to the app
//! in batches as Pusher posts them: `{"time_ms", "events": [{"name",
//! "channel", …}]}` with `X-Pusher-Key` and `X-Pusher-Signature` (the hex
//! HMAC-SHA256 of the body under the app's secret), so the server SDKs'
//! webhook checks accept them.
//!
//! Each app's webhooks go through a `posting` queue of their own: bounded,
//! never waited on, in order, retried with backoff.
//!
//! **Each webhook once across nodes.** `client_event` and `cache_miss` are
//! sent by the node of the connection they concern. `member_added` and
//! `member_removed` are sent by the node whose connection was its user's
//! first to join or last to leave, which the engine decides atomically
//! (`Broker::join`, `Broker::leave`). `channel_occupied` and
//! `channel_vacated` are sent by the node the engine answers a change of
//! occupancy to (`Broker::occupancy`), asked whenever a node's own first
//! subscriber arrives or its last leaves.

use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue};
use serde::Serialize;

use super::{any_pusher_name, sign, PusherApps};
use crate::app::AppCalls;
use crate::broker::Broker;
use crate::channels::Watch;
use crate::config::{PusherAppSettings, WebhookKind};
use crate::message::ChannelName;
use crate::posting::{Format, Limits, PostStats, Poster, Queued};

/// Each app's queue of webhooks: most held while the app is slow or away
/// (the oldest go first, counted).
const QUEUE: usize = 10_000;
/// Most webhooks in one batch.
const BATCH: usize = 100;
/// How long a webhook waits for others to share its batch.
const INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);
/// How long the app may take to answer a batch.
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// One webhook event.
#[derive(Debug, Clone, Serialize)]
pub struct Hook {
    pub name: &'static str,
    pub channel: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// `client_event`: the event's name, data (as a string) and sender.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_id: Option<String>,
}

impl Hook {
    pub fn new(kind: WebhookKind, channel: &str) -> Hook {
        Hook {
            name: kind.as_str(),
            channel: channel.to_owned(),
            user_id: None,
            event: None,
            data: None,
            socket_id: None,
        }
    }
}

/// One app's webhooks as Pusher writes and signs them.
struct Signed {
    key: HeaderValue,
    secret: String,
}

impl Format for Signed {
    type Item = Hook;

    fn encode(&self, time_ms: u64, batch: &[Queued<Hook>]) -> Vec<u8> {
        #[derive(Serialize)]
        struct Body<'a> {
            time_ms: u64,
            events: Vec<&'a Hook>,
        }
        let events = batch.iter().map(|queued| &queued.item).collect();
        serde_json::to_vec(&Body { time_ms, events }).expect("a batch serializes")
    }

    fn headers(&self, body: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert("x-pusher-key", self.key.clone());
        let signature = sign::webhook_signature(&self.secret, body);
        headers.insert(
            "x-pusher-signature",
            HeaderValue::from_str(&signature).expect("hex is header text"),
        );
        headers
    }

    fn what(&self) -> &'static str {
        "Pusher webhooks"
    }
}

/// Each app's webhook queue, by the app's place in [`PusherApps`].
pub struct Webhooks {
    posters: Vec<Option<Poster<Hook>>>,
    broker: Arc<dyn Broker>,
}

impl Webhooks {
    /// Starts a queue for each app with `webhook.url` set. Must be called
    /// within a tokio runtime.
    pub fn start(
        apps: &[Arc<PusherAppSettings>],
        calls: &AppCalls,
        broker: Arc<dyn Broker>,
    ) -> Webhooks {
        let limits = Limits {
            capacity: QUEUE,
            batch_size: BATCH,
            interval: INTERVAL,
            timeout: TIMEOUT,
        };
        let posters = apps
            .iter()
            .map(|app| {
                let webhook = app.webhook.as_ref()?;
                let format = Signed {
                    key: HeaderValue::from_str(&app.key).expect("a key is header text"),
                    secret: app.secret.clone(),
                };
                let target = webhook.target.as_str().to_owned();
                Some(Poster::start(format, calls.clone(), target, limits))
            })
            .collect();
        Webhooks { posters, broker }
    }

    /// Queues `hook` for app number `app`, if it wants that kind.
    pub fn send(&self, apps: &PusherApps, app: usize, kind: WebhookKind, hook: Hook) {
        let wants = apps.apps[app]
            .webhook
            .as_ref()
            .is_some_and(|webhook| webhook.wants(kind));
        if let (true, Some(Some(poster))) = (wants, self.posters.get(app)) {
            poster.send(hook);
        }
    }

    /// Counts for /metrics, summed over the apps; `None` with no webhooks.
    pub fn stats(&self) -> Option<PostStats> {
        let mut posters = self.posters.iter().flatten().peekable();
        posters.peek()?;
        Some(posters.fold(PostStats::default(), |mut sum, poster| {
            let stats = poster.stats();
            sum.sent += stats.sent;
            sum.dropped_queue_full += stats.dropped_queue_full;
            sum.dropped_refused += stats.dropped_refused;
            sum.dropped_shutdown += stats.dropped_shutdown;
            sum.retries += stats.retries;
            sum.queued += stats.queued;
            sum
        }))
    }

    /// Stops each queue once it has tried to send what it holds.
    pub async fn close(&self) {
        for poster in self.posters.iter().flatten() {
            poster.close().await;
        }
    }
}

impl Watch for PusherApps {
    fn watches(&self, channel: &str) -> bool {
        self.app_of_channel(channel).is_some_and(|app| {
            self.apps[app].webhook.as_ref().is_some_and(|webhook| {
                webhook.wants(WebhookKind::ChannelOccupied)
                    || webhook.wants(WebhookKind::ChannelVacated)
            })
        })
    }

    fn changed(
        self: Arc<Self>,
        channel: ChannelName,
    ) -> futures_util::future::BoxFuture<'static, ()> {
        Box::pin(async move {
            let (Some(app), Some(webhooks)) =
                (self.app_of_channel(channel.as_str()), self.webhooks.get())
            else {
                return;
            };
            let occupied = match webhooks.broker.occupancy(&channel).await {
                Ok(Some(occupied)) => occupied,
                Ok(None) => return,
                Err(err) => {
                    tracing::warn!(%channel, error = %err, "engine: occupancy not recorded; its webhook is not sent");
                    return;
                }
            };
            let Some(name) = any_pusher_name(channel.as_str()) else {
                return;
            };
            let kind = if occupied {
                WebhookKind::ChannelOccupied
            } else {
                WebhookKind::ChannelVacated
            };
            webhooks.send(&self, app, kind, Hook::new(kind, &name));
        })
    }
}
