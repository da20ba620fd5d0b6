//! The realtime transports under `realtime.prefix`: WebSocket, Server-Sent
//! Events and long-poll, each an adapter around one shared [`Session`].
//!
//! All three deliver the same envelope and resume the same way: a client
//! comes back with positions (WebSocket `since`) or a cursor (SSE
//! `Last-Event-ID`, long-poll `since`), gets every publication after them
//! from history, in order and once, and then the live ones; when history
//! cannot cover the gap it is told so explicitly (a reset) and continues from
//! now.
//!
//! What happens before a session starts is also shared: the path and query
//! are parsed, the `Origin` is checked ([`Origins`]), the per-address
//! connection limit is taken ([`IpSlot`]), and [`Auth`] grants the channels.

mod calls;
mod client_js;
pub mod control;
mod longpoll;
mod opening;
mod origin;
mod pace;
mod pusher;
mod session;
mod sse;
mod websocket;

use opening::{open_http, parse_cursor, Opening, RealtimeQuery};
use origin::{cors, origin_refused, preflight};
pub use origin::{OriginCheck, Origins};
use pace::{jittered, Hold, Pace};

thread_local! {
    /// Room for the publications a session drains from its outbox at once,
    /// one per thread ([`take_batch`]).
    static BATCH: std::cell::Cell<Vec<Arc<crate::message::Publication>>> =
        std::cell::Cell::default();
}

/// Room for a drain, taken from the thread: a session holds none while it
/// is idle. A session that awaits while it holds it leaves the thread's
/// next taker an empty one, which grows its own.
fn take_batch() -> Vec<Arc<crate::message::Publication>> {
    BATCH.take()
}

/// Gives a drain's room back to the thread, emptied.
fn give_batch(mut batch: Vec<Arc<crate::message::Publication>>) {
    batch.clear();
    BATCH.set(batch);
}

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::app::AppCalls;
use crate::auth::{Auth, AuthRequest, Grant};
use crate::body::Body;
use crate::channels::Channels;
use crate::config::{OriginPattern, RealtimeConfig, RpcConfig, RpcPaths, Settings};
use crate::conn::ConnInfo;
use crate::cursor::{Cursor, DecodedCursor};
use crate::error::{Kind, Refusal};
use crate::hub::QueueLimits;
use crate::message::ChannelName;
use crate::rate::{KeyedRate, Limit, Refused};
use crate::shutdown::Drain;

pub use session::{Admit, Obeyed, Ordered, Session};

/// The close code of a Pusher connection whose user the app terminated
/// (`POST /apps/{id}/users/{user}/terminate_connections`): Pusher clients
/// do not reconnect after it.
pub const PUSHER_TERMINATED: u16 = pusher::close::UNAUTHORIZED;

/// The three transports, for gauges and the auth request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    Sse,
    Poll,
    /// The Pusher Channels WebSocket at `/app/{key}`.
    Pusher,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Sse => "sse",
            Transport::Poll => "poll",
            Transport::Pusher => "pusher",
        }
    }

    const ALL: [Transport; 4] = [
        Transport::WebSocket,
        Transport::Sse,
        Transport::Poll,
        Transport::Pusher,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// Open connections (or waiting long-polls) and subscriptions, and what
/// happens to connections, for /metrics.
#[derive(Default)]
pub struct Gauges {
    connections: [AtomicI64; 4],
    subscriptions: [AtomicI64; 4],
    /// Connects refused, by the refusal's code (a short, fixed set).
    refused: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// Subscriptions that resumed from a position: recovered, reset.
    resumes: [AtomicU64; 2],
    /// `rpc` and `publish` calls waiting for the app or the engine.
    calls: AtomicI64,
    /// From a publication's storing to its write to a subscriber's socket,
    /// observed once per write (for the batch's oldest publication).
    pub delivery: crate::latency::Latency,
}

/// What /metrics reads of the realtime side besides the gauges.
#[derive(Debug)]
pub struct RealtimeCounts {
    pub refused: Vec<(&'static str, u64)>,
    pub recovered: u64,
    pub reset: u64,
    pub calls: i64,
}

/// A call counted in `Gauges::calls` while it lives.
pub struct CallInFlight(Arc<Gauges>);

impl Drop for CallInFlight {
    fn drop(&mut self) {
        self.0.calls.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Gauges {
    /// A connect refused for `code`.
    pub fn refused(&self, code: &'static str) {
        *self
            .refused
            .lock()
            .expect("refused lock")
            .entry(code)
            .or_default() += 1;
    }

    /// A subscription asked to resume: `recovered`, or told to reset.
    pub fn resumed(&self, recovered: bool) {
        self.resumes[usize::from(!recovered)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a call until the returned guard is dropped.
    pub fn call(self: &Arc<Self>) -> CallInFlight {
        self.calls.fetch_add(1, Ordering::Relaxed);
        CallInFlight(self.clone())
    }

    /// A write to a subscriber whose oldest publication is `oldest`.
    pub fn delivered(&self, oldest: &crate::message::Publication) {
        let at = oldest.published_at_ms();
        if at > 0 {
            let now = crate::message::now_ms();
            self.delivery
                .observe(std::time::Duration::from_millis(now.saturating_sub(at)));
        }
    }

    pub fn counts(&self) -> RealtimeCounts {
        RealtimeCounts {
            refused: self
                .refused
                .lock()
                .expect("refused lock")
                .iter()
                .map(|(code, count)| (*code, *count))
                .collect(),
            recovered: self.resumes[0].load(Ordering::Relaxed),
            reset: self.resumes[1].load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
        }
    }

    /// `(transport, open connections, subscriptions)` for each transport.
    pub fn read(&self) -> Vec<(&'static str, i64, i64)> {
        Transport::ALL
            .iter()
            .map(|t| {
                (
                    t.name(),
                    self.connections[t.index()].load(Ordering::Relaxed),
                    self.subscriptions[t.index()].load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    fn add_subscriptions(&self, transport: Transport, delta: i64) {
        self.subscriptions[transport.index()].fetch_add(delta, Ordering::Relaxed);
    }
}

/// What the transports count for `/metrics`.
pub struct Meters {
    pub gauges: Arc<Gauges>,
    pub refused: Arc<Refused>,
}

/// Counts a connection in the gauges while it lives.
pub struct ConnectionGauge {
    gauges: Arc<Gauges>,
    transport: Transport,
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        self.gauges.connections[self.transport.index()].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Everything the realtime endpoints share.
pub struct Realtime {
    prefix: String,
    /// `realtime`, `realtime.allowed_origins` and `auth`: replaced whole
    /// by a reload ([`Realtime::reload`]); a connection reads them when it
    /// needs them, so a new value reaches every connection from then on.
    config: ArcSwap<RealtimeConfig>,
    origins: ArcSwap<Origins>,
    auth: ArcSwap<Auth>,
    /// The hub, the engine and the channel rules.
    channels: Arc<Channels>,
    queue: QueueLimits,
    drain: Drain,
    gauges: Arc<Gauges>,
    /// Open realtime connections per client address.
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Sessions by user: the per-user limit, disconnect, unsubscribe.
    registry: Arc<control::Registry>,
    /// This node's name in presence entries and connection ids.
    node: String,
    /// Calls to the app on clients' behalf (`rpc`, `publish: via_app`).
    calls: AppCalls,
    rpc: RpcPaths,
    rpc_config: RpcConfig,
    /// The largest data a client may publish: `api.max_body`, as for the
    /// API.
    max_publication: usize,
    /// `realtime.connects_per_second`, per client address.
    connect_rate: ArcSwap<KeyedRate<IpAddr>>,
    /// Refusals by rate limit, for `/metrics`.
    refused: Arc<Refused>,
    /// Where connection events go (nowhere unless `events.path` is set).
    events: crate::events::Events,
    /// The Pusher apps, whose WebSocket is `/app/{key}`; none: off.
    pusher: Option<Arc<crate::pusher::PusherApps>>,
    /// This node's number in Pusher socket ids (`{node}.{connection}`),
    /// random like its name.
    node_number: u32,
    /// `log.access`: a line per connect, with a request id the app's auth
    /// request carries too.
    access: bool,
    /// `upstream.trusted_proxies`: whose request ids are kept.
    trusted_proxies: Vec<ipnet::IpNet>,
}

/// The transports' ways to the app: asking who a connection is, calling
/// it on a client's behalf, and telling it what happens to connections.
pub struct AppLinks {
    pub auth: Auth,
    pub calls: AppCalls,
    pub events: crate::events::Events,
    /// The Pusher apps (with their webhooks), when any are configured.
    pub pusher: Option<Arc<crate::pusher::PusherApps>>,
}

impl Realtime {
    pub fn new(
        settings: &Settings,
        channels: Arc<Channels>,
        drain: Drain,
        meters: Meters,
        node: String,
        app: AppLinks,
    ) -> Realtime {
        let Meters { gauges, refused } = meters;
        let AppLinks {
            auth,
            calls,
            events,
            pusher,
        } = app;
        let config = &settings.config;
        let queue_bytes = usize::try_from(config.limits.queue_bytes.bytes()).unwrap_or(usize::MAX);
        // Shutdown reaches each session as an order through its control.
        let registry = control::Registry::new(config.limits.connections_per_user);
        drain.on_signal({
            let registry = registry.clone();
            move || registry.shut_down()
        });
        Realtime {
            prefix: config.realtime.prefix.clone(),
            config: ArcSwap::from_pointee(config.realtime.clone()),
            origins: ArcSwap::from_pointee(Origins::new(settings.allowed_origins.clone())),
            auth: ArcSwap::from_pointee(auth),
            channels,
            queue: QueueLimits {
                messages: config.limits.queue_messages,
                bytes: queue_bytes,
                take: config
                    .limits
                    .unsent_bound()
                    .map_or(usize::MAX, |bytes| bytes as usize),
            },
            drain,
            gauges,
            per_ip: Mutex::default(),
            registry,
            node,
            calls,
            rpc: settings.rpc.clone(),
            rpc_config: config.rpc.clone(),
            max_publication: usize::try_from(config.api.max_body.bytes()).unwrap_or(usize::MAX),
            connect_rate: ArcSwap::from_pointee(KeyedRate::new(
                config.realtime.connects_per_second,
                config.realtime.connect_burst,
            )),
            refused,
            events,
            pusher,
            node_number: rand::random(),
            access: config.log.access,
            trusted_proxies: settings.trusted_proxies.clone(),
        }
    }

    /// Closes every realtime connection of `user` with `code` and `reason`,
    /// and forgets the user's cached grants, on this node and (through the
    /// engine) every other. Returns how many were open on this node.
    pub async fn disconnect_user(
        &self,
        user: &str,
        code: u16,
        reason: &str,
    ) -> Result<usize, crate::broker::BrokerError> {
        let here = self.disconnect_here(user, code, reason);
        self.channels
            .broker
            .broadcast(&crate::broker::Order::Disconnect {
                user: user.to_owned(),
                code,
                reason: reason.to_owned(),
            })
            .await?;
        Ok(here)
    }

    /// Removes `channel` from every live session of `user`, on this node and
    /// every other. Returns how many sessions were told on this node.
    pub async fn unsubscribe_user(
        &self,
        user: &str,
        channel: &ChannelName,
    ) -> Result<usize, crate::broker::BrokerError> {
        let here = self.registry.unsubscribe(user, channel);
        self.channels
            .broker
            .broadcast(&crate::broker::Order::Unsubscribe {
                user: user.to_owned(),
                channel: channel.to_string(),
            })
            .await?;
        Ok(here)
    }

    fn disconnect_here(&self, user: &str, code: u16, reason: &str) -> usize {
        self.auth().forget_user(user);
        self.registry.disconnect(user, code, reason)
    }

    /// A connection's id across nodes: this node's name and its number here.
    fn connection_id(&self, id: u64) -> String {
        format!("{}-{id}", self.node)
    }

    /// Carries out an order another node's API gave.
    pub fn obey(&self, order: crate::broker::Order) {
        match order {
            crate::broker::Order::Disconnect { user, code, reason } => {
                let count = self.disconnect_here(&user, code, &reason);
                tracing::info!(
                    user,
                    code,
                    connections = count,
                    "disconnected by another node's API"
                );
            }
            crate::broker::Order::Unsubscribe { user, channel } => {
                if let Ok(channel) = ChannelName::parse(&channel) {
                    self.registry.unsubscribe(&user, &channel);
                }
            }
        }
    }

    /// Where connection events go: the API reads its counts, and shutdown
    /// flushes it.
    pub fn events(&self) -> &crate::events::Events {
        &self.events
    }

    /// How realtime connections are authorized, for the log at start.
    pub fn describe_auth(&self) -> String {
        self.auth().describe()
    }

    /// Auth outcomes, for /metrics.
    pub fn auth_stats(&self) -> crate::auth::AuthStats {
        self.auth().stats()
    }

    /// Whether `path` is one of pushgate's own realtime paths.
    pub fn owns(&self, path: &str) -> bool {
        path.strip_prefix(self.prefix.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            || self.pusher_app(path).is_some()
    }

    /// The Pusher app whose WebSocket path is `path` (`/app/{key}`). Any
    /// other path under `/app/` is the app's own.
    fn pusher_app(&self, path: &str) -> Option<&Arc<crate::config::PusherAppSettings>> {
        self.pusher.as_ref()?.socket_app(path)
    }

    /// Answers a request under `realtime.prefix`.
    pub async fn handle(
        self: &Arc<Self>,
        mut request: Request<Incoming>,
        conn: ConnInfo,
    ) -> Response<Body> {
        if self.access {
            crate::conn::request_id(request.headers_mut(), conn, &self.trusted_proxies);
        }
        if let (Some(pusher), Some(app)) = (&self.pusher, self.pusher_app(request.uri().path())) {
            let (pusher, app) = (pusher.clone(), app.clone());
            return pusher::handle(self, pusher, app, request, conn)
                .await
                .unwrap_or_else(Refusal::into_response);
        }
        let rest = &request.uri().path()[self.prefix.len()..];
        let result = match rest {
            "/ws" => websocket::handle(self, request, conn).await,
            "/sse" => sse::handle(self, request, conn).await,
            "/poll" => longpoll::handle(self, request, conn).await,
            "/client.js" => client_js::serve(&request),
            _ => Err(Refusal::new(
                Kind::NotFound,
                "not_found",
                format!(
                    "no such realtime endpoint; pushgate serves {0}/ws, {0}/sse, {0}/poll and {0}/client.js",
                    self.prefix
                ),
            )),
        };
        result.unwrap_or_else(Refusal::into_response)
    }

    /// `realtime`, as it stands now.
    fn config(&self) -> arc_swap::Guard<Arc<RealtimeConfig>> {
        self.config.load()
    }

    fn origins(&self) -> arc_swap::Guard<Arc<Origins>> {
        self.origins.load()
    }

    /// How connections are authorized now: held for as long as a connect
    /// or a refresh asks.
    fn auth(&self) -> Arc<Auth> {
        self.auth.load_full()
    }

    /// Takes what a reload may change live: `realtime` (its limits and
    /// timings reach new connections, and open ones at their next read of
    /// them), `realtime.allowed_origins` and `auth` (with a new, empty
    /// grant cache). Open connections keep their grants.
    pub fn reload(&self, settings: &Settings, auth: Auth) {
        let config = &settings.config.realtime;
        let old = self.config();
        if (old.connects_per_second, old.connect_burst)
            != (config.connects_per_second, config.connect_burst)
        {
            self.connect_rate.store(Arc::new(KeyedRate::new(
                config.connects_per_second,
                config.connect_burst,
            )));
        }
        self.config.store(Arc::new(config.clone()));
        self.origins
            .store(Arc::new(Origins::new(settings.allowed_origins.clone())));
        self.auth.store(Arc::new(auth));
    }

    /// The Pusher apps, when any are configured.
    pub fn pusher(&self) -> Option<Arc<crate::pusher::PusherApps>> {
        self.pusher.clone()
    }

    /// The refusal of a connect from a foreign `Origin`, counted.
    fn refuse_origin(&self) -> Refusal {
        let refusal = origin_refused();
        self.gauges.refused(refusal.code);
        refusal
    }

    /// Starts counting a connection of `transport` in the gauges.
    fn count(&self, transport: Transport) -> ConnectionGauge {
        self.gauges.connections[transport.index()].fetch_add(1, Ordering::Relaxed);
        ConnectionGauge {
            gauges: self.gauges.clone(),
            transport,
        }
    }

    /// Takes one of the client address's `max_connections_per_ip` slots;
    /// a WebSocket or SSE connection also within its `connects_per_second`.
    /// A long-poll request is not a new connection: a client polls again
    /// after each answer, as often as messages come.
    fn claim_ip(self: &Arc<Self>, ip: IpAddr, transport: Transport) -> Result<IpSlot, Refusal> {
        let ip = ip.to_canonical();
        let counted = transport != Transport::Poll;
        let within = if counted {
            self.connect_rate.load().take(&ip)
        } else {
            Ok(())
        };
        if let Err(wait) = within {
            self.refused.count(Limit::Connects);
            tracing::debug!(%ip, "limit: realtime.connects_per_second exceeded");
            let mut refusal = Refusal::new(
                Kind::OverLimit,
                "rate_limited",
                "too many new realtime connections from this address (realtime.connects_per_second); retry later",
            );
            refusal.retry_after = Some(wait);
            return Err(refusal);
        }
        let mut per_ip = self.per_ip.lock().expect("per-ip lock");
        let open = per_ip.entry(ip).or_insert(0);
        if *open >= self.config().max_connections_per_ip {
            tracing::info!(
                %ip,
                limit = self.config().max_connections_per_ip,
                "limit: realtime.max_connections_per_ip reached"
            );
            return Err(Refusal::new(
                Kind::OverLimit,
                "too_many_connections",
                "too many realtime connections from this address (realtime.max_connections_per_ip)",
            ));
        }
        *open += 1;
        Ok(IpSlot {
            realtime: self.clone(),
            ip,
        })
    }

    /// The checks every transport makes before it starts a session: the
    /// query, the per-address limit and the grant; a refusal is counted by
    /// its code.
    async fn admit(
        self: &Arc<Self>,
        transport: Transport,
        request: &Request<Incoming>,
        query: &RealtimeQuery,
        conn: ConnInfo,
    ) -> Result<Admission, Refusal> {
        let admitted = self.admit_uncounted(transport, request, query, conn).await;
        if let Err(refusal) = &admitted {
            self.gauges.refused(refusal.code);
        }
        if self.access {
            let (outcome, user) = match &admitted {
                Ok(admission) => ("accepted", admission.grant.user.as_deref()),
                Err(refusal) => (refusal.code, None),
            };
            access_line(request, conn, transport, outcome, user);
        }
        admitted
    }

    async fn admit_uncounted(
        self: &Arc<Self>,
        transport: Transport,
        request: &Request<Incoming>,
        query: &RealtimeQuery,
        conn: ConnInfo,
    ) -> Result<Admission, Refusal> {
        if query.channels.len() > self.config().max_channels {
            return Err(Refusal::bad_request(
                "too_many_channels",
                format!(
                    "a connection may hear at most {} channels (realtime.max_channels)",
                    self.config().max_channels
                ),
            ));
        }
        let slot = self.claim_ip(conn.peer.ip(), transport)?;
        let grant = self
            .auth()
            .authorize(AuthRequest {
                transport: transport.name(),
                channels: &query.channels,
                headers: request.headers(),
                path: request.uri().path(),
                query: request.uri().query().unwrap_or(""),
                conn,
            })
            .await?;
        if let Some(refused) = query.channels.iter().find(|c| !grant.allows(c)) {
            return Err(Refusal::new(
                Kind::Forbidden,
                "forbidden",
                format!("not allowed to hear `{refused}`"),
            ));
        }
        let mut registration = self.registry.register(grant.user.as_deref())?;
        let per_user = self.registry.per_user();
        if let (Some(user), true) = (&grant.user, per_user > 0) {
            // This node counted its own; the engine counts across nodes.
            let connection = self.connection_id(registration.id);
            if !self
                .channels
                .broker
                .claim_user_slot(user, &connection, per_user)
                .await?
            {
                tracing::info!(
                    user,
                    limit = per_user,
                    "limit: limits.connections_per_user reached across nodes"
                );
                return Err(control::too_many_connections());
            }
            let broker = self.channels.broker.clone();
            let user = user.clone();
            registration.on_release(Box::new(move || {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime
                        .spawn(async move { broker.release_user_slot(&user, &connection).await });
                }
            }));
        }
        Ok(Admission {
            credentials: self.auth().credentials(request.headers(), conn),
            grant,
            slot,
            registration,
        })
    }

    fn session(self: &Arc<Self>, transport: Transport, admission: Admission) -> Session {
        Session::new(self.clone(), transport, admission)
    }
}

/// The access log's line for a realtime connect: its request id, peer,
/// transport, path, and `accepted` (with the user) or the refusal's code.
fn access_line<B>(
    request: &Request<B>,
    conn: ConnInfo,
    transport: Transport,
    outcome: &str,
    user: Option<&str>,
) {
    let id = request
        .headers()
        .get(crate::conn::REQUEST_ID)
        .and_then(|id| id.to_str().ok())
        .unwrap_or_default();
    tracing::info!(
        target: "pushgate::access",
        request_id = id,
        peer = %conn.peer,
        transport = transport.name(),
        path = request.uri().path(),
        outcome,
        user = user.unwrap_or_default(),
        "realtime connect"
    );
}

/// Everything a connection was admitted with; held by its session.
pub struct Admission {
    grant: Grant,
    /// Kept for refresh and subscribe requests to the app.
    credentials: crate::auth::Credentials,
    slot: IpSlot,
    registration: control::Registration,
}

/// One of an address's realtime connection slots; freed on drop.
pub struct IpSlot {
    realtime: Arc<Realtime>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut per_ip = self.realtime.per_ip.lock().expect("per-ip lock");
        if let Some(open) = per_ip.get_mut(&self.ip) {
            *open -= 1;
            if *open == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}
