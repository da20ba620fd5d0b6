//! One pushgate node, assembled from its settings: the engine, the hub,
//! the realtime transports with their auth, the API, and the proxy with its
//! connections to the app. This is the one place that knows how the parts
//! fit; `server` only listens, accepts, limits and drains.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::api::Api;
use crate::app;
use crate::auth::Auth;
use crate::broker::memory::{MemoryBroker, MemoryOptions};
use crate::broker::redis::{RedisBroker, RedisOptions};
use crate::broker::Broker;
use crate::channels::{ChannelRules, Channels, Watch};
use crate::config::{EngineKind, Settings};
use crate::error::Error;
use crate::events::Events;
use crate::files;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::pusher::PusherApps;
use crate::reload::Reloader;
use crate::shutdown::Drain;
use crate::transport::{AppLinks, Meters, Realtime};

/// A node's parts, ready for the listeners.
pub struct Node {
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    /// The realtime transports, on the public listener's own paths.
    pub realtime: Arc<Realtime>,
    /// The publish/admin API, on the API listener.
    pub api: Arc<Api>,
    /// Everything else on the public listener goes to the app through it.
    pub proxy: Arc<Proxy>,
    /// What every connection and session joins, to be told of shutdown.
    pub drain: Drain,
    /// The public listener's connection limit, and its permits.
    pub public_max: usize,
    pub public_permits: Arc<Semaphore>,
    /// Takes a new config while running (`SIGHUP`).
    pub reloader: Arc<Reloader>,
}

impl Node {
    /// Builds the node's parts from its settings; the hub has a lane for
    /// each of `shards` threads. Starts the engine (its connection is made
    /// lazily).
    pub fn assemble(settings: &Settings, shards: usize) -> Result<Node, Error> {
        let config = &settings.config;
        let drain = Drain::new();
        let hub = Arc::new(Hub::with_lanes(shards));
        hub.set_backpressure(&config.api.backpressure);
        // This node's name in presence, connection ids and orders.
        let name = crate::cursor::Epoch::random().to_string();
        let broker: Arc<dyn Broker> = match config.engine.kind {
            EngineKind::Memory => MemoryBroker::new(
                hub.clone(),
                MemoryOptions {
                    history_size: config.history.size,
                    history_ttl: config.history.ttl,
                    idempotency_window: config.api.idempotency_window,
                },
            ),
            EngineKind::Redis => {
                let redis = &config.engine.redis;
                RedisBroker::new(
                    hub.clone(),
                    RedisOptions {
                        url: redis.url.clone(),
                        cluster: redis.cluster,
                        tls_ca: settings.redis_ca.clone(),
                        prefix: redis.prefix.clone(),
                        history_size: config.history.size,
                        history_ttl: config.history.ttl,
                        idempotency_window: config.api.idempotency_window,
                        connect_timeout: redis.connect_timeout,
                        command_timeout: redis.command_timeout,
                        wait_replicas: redis.wait_replicas,
                        wait_timeout: redis.wait_timeout,
                        presence_ttl: redis.presence_ttl,
                        node: name.clone(),
                    },
                )
                .map_err(Error::Engine)?
            }
        };
        // Client connections and requests to the app (proxied, and the auth
        // requests) draw on one budget of files, unless
        // limits.max_connections caps the connections apart. The idle
        // connections to the app are one pool per shard, shared by both.
        let budget = files::file_budget(config.upstream.pool_max_idle.saturating_mul(shards));
        let app = app::app_client(settings);
        let (public_max, public_permits, app_files) = match config.limits.max_connections {
            0 => {
                let files = Arc::new(Semaphore::new(budget));
                (budget, files.clone(), files)
            }
            n => (
                n,
                Arc::new(Semaphore::new(n)),
                Arc::new(Semaphore::new(budget.saturating_sub(n).max(1))),
            ),
        };
        let metrics = Arc::new(Metrics::default());
        let proxied = metrics.proxied.clone();
        let calls = app::AppCalls::new(app.clone(), app_files.clone());
        let pusher = PusherApps::new(settings);
        if let Some(pusher) = &pusher {
            pusher.start_webhooks(&calls, broker.clone());
        }
        // Pusher's occupied and vacated webhooks watch the channels.
        let watch = pusher.clone().map(|pusher| pusher as Arc<dyn Watch>);
        let channels = Arc::new(
            Channels::new(
                hub.clone(),
                broker.clone(),
                ChannelRules::new(&config.channels),
            )
            .watched_by(watch),
        );
        let events = Events::start(settings, calls.clone(), name.clone());
        let calls_for_reload = calls.clone();
        let realtime = Arc::new(Realtime::new(
            settings,
            channels.clone(),
            drain.clone(),
            Meters {
                gauges: metrics.realtime.clone(),
                refused: metrics.refused.clone(),
            },
            name,
            AppLinks {
                auth: Auth::new(settings, calls.clone()),
                calls,
                events,
                pusher: pusher.clone(),
            },
        ));
        let orders = Arc::downgrade(&realtime);
        broker.on_orders(Arc::new(move |order| {
            if let Some(realtime) = orders.upgrade() {
                realtime.obey(order);
            }
        }));
        let api = Arc::new(Api::new(
            config,
            channels.clone(),
            realtime.clone(),
            metrics,
            pusher,
        ));
        let reloader = Arc::new(Reloader::new(
            api.clone(),
            realtime.clone(),
            channels,
            calls_for_reload,
            config.clone(),
        ));
        let proxy = Arc::new(Proxy::new(
            settings,
            drain.clone(),
            app_files.clone(),
            app,
            proxied,
        ));

        Ok(Node {
            hub,
            broker,
            realtime,
            api,
            proxy,
            drain,
            public_max,
            public_permits,
            reloader,
        })
    }
}
