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

mod client_js;
pub mod control;
mod longpoll;
mod session;
mod sse;
mod websocket;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::auth::{Auth, AuthRequest, Grant};
use crate::body::Body;
use crate::broker::Broker;
use crate::config::{OriginPattern, RealtimeConfig, Settings};
use crate::conn::ConnInfo;
use crate::cursor::{Cursor, DecodedCursor};
use crate::error::ApiError;
use crate::hub::{Hub, QueueLimits};
use crate::message::ChannelName;
use crate::shutdown::Drain;

pub use session::{Admit, Session, Subscribed};

/// The three transports, for gauges and the auth request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    Sse,
    Poll,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Sse => "sse",
            Transport::Poll => "poll",
        }
    }

    const ALL: [Transport; 3] = [Transport::WebSocket, Transport::Sse, Transport::Poll];

    fn index(self) -> usize {
        self as usize
    }
}

/// Open connections (or waiting long-polls) and subscriptions, for /metrics.
#[derive(Default)]
pub struct Gauges {
    connections: [AtomicI64; 3],
    subscriptions: [AtomicI64; 3],
}

impl Gauges {
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
    config: RealtimeConfig,
    origins: Origins,
    auth: Auth,
    hub: Arc<Hub>,
    broker: Arc<dyn Broker>,
    queue: QueueLimits,
    drain: Drain,
    gauges: Arc<Gauges>,
    /// Open realtime connections per client address.
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Sessions by user: the per-user limit, disconnect, unsubscribe.
    registry: Arc<control::Registry>,
    /// This node's name in presence entries and connection ids.
    node: String,
    /// `channels` rules: presence and join/leave by prefix.
    channel_rules: Vec<crate::config::ChannelRule>,
}

impl Realtime {
    pub fn new(
        settings: &Settings,
        hub: Arc<Hub>,
        broker: Arc<dyn Broker>,
        drain: Drain,
        gauges: Arc<Gauges>,
        node: String,
        auth: Auth,
    ) -> Realtime {
        let config = &settings.config;
        let queue_bytes = usize::try_from(config.limits.queue_bytes.bytes()).unwrap_or(usize::MAX);
        Realtime {
            prefix: config.realtime.prefix.clone(),
            config: config.realtime.clone(),
            origins: Origins::new(settings.allowed_origins.clone()),
            auth,
            hub,
            broker,
            queue: QueueLimits {
                messages: config.limits.queue_messages,
                bytes: queue_bytes,
            },
            drain,
            gauges,
            per_ip: Mutex::default(),
            registry: control::Registry::new(config.limits.connections_per_user),
            node,
            channel_rules: config.channels.clone(),
        }
    }

    /// What `channel` does about presence, from the `channels` rules.
    pub fn presence_mode(&self, channel: &str) -> crate::broker::PresenceMode {
        self.channel_rules
            .iter()
            .filter(|rule| channel.starts_with(rule.prefix.as_str()))
            .max_by_key(|rule| rule.prefix.len())
            .map_or_else(Default::default, |rule| crate::broker::PresenceMode {
                listed: rule.presence,
                announced: rule.join_leave,
            })
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
        self.broker
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
        self.broker
            .broadcast(&crate::broker::Order::Unsubscribe {
                user: user.to_owned(),
                channel: channel.to_string(),
            })
            .await?;
        Ok(here)
    }

    fn disconnect_here(&self, user: &str, code: u16, reason: &str) -> usize {
        self.auth.forget_user(user);
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

    /// Auth outcomes, for /metrics.
    pub fn auth_stats(&self) -> crate::auth::AuthStats {
        self.auth.stats()
    }

    /// Whether `path` is one of pushgate's own realtime paths.
    pub fn owns(&self, path: &str) -> bool {
        path.strip_prefix(self.prefix.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    /// Answers a request under `realtime.prefix`.
    pub async fn handle(
        self: &Arc<Self>,
        request: Request<Incoming>,
        conn: ConnInfo,
    ) -> Response<Body> {
        let rest = &request.uri().path()[self.prefix.len()..];
        let result = match rest {
            "/ws" => websocket::handle(self, request, conn).await,
            "/sse" => sse::handle(self, request, conn).await,
            "/poll" => longpoll::handle(self, request, conn).await,
            "/client.js" => client_js::serve(&request),
            _ => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "no such realtime endpoint; pushgate serves {0}/ws, {0}/sse, {0}/poll and {0}/client.js",
                    self.prefix
                ),
            )),
        };
        result.unwrap_or_else(ApiError::into_response)
    }

    /// Starts counting a connection of `transport` in the gauges.
    fn count(&self, transport: Transport) -> ConnectionGauge {
        self.gauges.connections[transport.index()].fetch_add(1, Ordering::Relaxed);
        ConnectionGauge {
            gauges: self.gauges.clone(),
            transport,
        }
    }

    /// Takes one of the client address's `max_connections_per_ip` slots.
    fn claim_ip(self: &Arc<Self>, ip: IpAddr) -> Result<IpSlot, ApiError> {
        let ip = ip.to_canonical();
        let mut per_ip = self.per_ip.lock().expect("per-ip lock");
        let open = per_ip.entry(ip).or_insert(0);
        if *open >= self.config.max_connections_per_ip {
            tracing::info!(
                %ip,
                limit = self.config.max_connections_per_ip,
                "limit: realtime.max_connections_per_ip reached"
            );
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
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
    /// query, the Origin, the per-address limit and the grant.
    async fn admit(
        self: &Arc<Self>,
        transport: Transport,
        request: &Request<Incoming>,
        query: &RealtimeQuery,
        conn: ConnInfo,
    ) -> Result<Admission, ApiError> {
        if query.channels.len() > self.config.max_channels {
            return Err(ApiError::bad_request(
                "too_many_channels",
                format!(
                    "a connection may hear at most {} channels (realtime.max_channels)",
                    self.config.max_channels
                ),
            ));
        }
        let slot = self.claim_ip(conn.peer.ip())?;
        let grant = self
            .auth
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
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
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
            let broker = self.broker.clone();
            let user = user.clone();
            registration.on_release(Box::new(move || {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime
                        .spawn(async move { broker.release_user_slot(&user, &connection).await });
                }
            }));
        }
        Ok(Admission {
            credentials: self.auth.credentials(request.headers(), conn),
            grant,
            slot,
            registration,
        })
    }

    fn session(self: &Arc<Self>, transport: Transport, admission: Admission) -> Session {
        Session::new(self.clone(), transport, admission)
    }
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

/// The `realtime.allowed_origins` check, for WebSocket handshakes and CORS.
#[derive(Debug, Clone)]
pub struct Origins {
    patterns: Vec<OriginPattern>,
}

/// What the Origin check decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginCheck {
    /// No `Origin` header: not a browser's cross-origin request.
    Absent,
    /// Allowed; CORS answers echo this origin.
    Allowed(HeaderValue),
    Refused,
}

impl Origins {
    pub fn new(patterns: Vec<OriginPattern>) -> Origins {
        Origins { patterns }
    }

    /// Checks the request's `Origin`. With no patterns configured only the
    /// request's own host is allowed, which is what stops a foreign page
    /// from opening a WebSocket with the user's cookies. The scheme is not
    /// compared: TLS often ends at a proxy in front of pushgate, and the same
    /// host over http and https is the same site's owner.
    pub fn check<B>(&self, request: &Request<B>) -> OriginCheck {
        let headers = request.headers();
        let Some(origin) = headers.get(header::ORIGIN) else {
            return OriginCheck::Absent;
        };
        let Ok(text) = origin.to_str() else {
            return OriginCheck::Refused;
        };
        let allowed = if self.patterns.is_empty() {
            // The host as the proxy reads it: a target's authority (HTTP/2's
            // `:authority`, an absolute-form target) before `Host`.
            let host = request
                .uri()
                .authority()
                .map(|a| a.as_str())
                .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()));
            let origin_host = text.split_once("://").map(|(_, rest)| rest);
            matches!((host, origin_host), (Some(host), Some(origin_host)) if host.eq_ignore_ascii_case(origin_host))
        } else {
            self.patterns.iter().any(|pattern| pattern.matches(text))
        };
        if allowed {
            OriginCheck::Allowed(origin.clone())
        } else {
            OriginCheck::Refused
        }
    }
}

/// Adds CORS headers for an allowed origin to a response.
fn cors(response: &mut Response<Body>, origin: &OriginCheck) {
    if let OriginCheck::Allowed(origin) = origin {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

/// Answers a CORS preflight for SSE or long-poll.
fn preflight<B>(origins: &Origins, request: &Request<B>) -> Result<Response<Body>, ApiError> {
    let check = origins.check(request);
    if check == OriginCheck::Refused {
        return Err(origin_refused());
    }
    let mut response = Response::new(crate::body::empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    cors(&mut response, &check);
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Last-Event-ID, Authorization, Content-Type"),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    Ok(response)
}

fn origin_refused() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "origin_not_allowed",
        "this Origin may not open realtime connections (realtime.allowed_origins)",
    )
}

/// What an HTTP (SSE or long-poll) realtime request opens with: the method
/// (GET, or a CORS preflight answered at once), the Origin, and a query
/// naming at least one channel.
enum Opening {
    Preflight(Result<Response<Body>, ApiError>),
    Stream(OriginCheck, RealtimeQuery),
}

fn open_http(
    realtime: &Realtime,
    request: &Request<Incoming>,
    known: &[&str],
) -> Result<Opening, ApiError> {
    if let Some(answer) = get_or_preflight(realtime, request) {
        return Ok(Opening::Preflight(answer));
    }
    let origin = realtime.origins.check(request);
    if origin == OriginCheck::Refused {
        return Err(origin_refused());
    }
    let query = RealtimeQuery::parse(request.uri().query(), known, realtime.auth.token_param())?;
    if query.channels.is_empty() {
        return Err(ApiError::bad_request(
            "missing_channel",
            "name at least one channel: ?channel=...",
        ));
    }
    Ok(Opening::Stream(origin, query))
}

/// SSE and long-poll answer GET and CORS preflights only.
fn get_or_preflight(
    realtime: &Realtime,
    request: &Request<Incoming>,
) -> Option<Result<Response<Body>, ApiError>> {
    match *request.method() {
        Method::GET => None,
        Method::OPTIONS => Some(preflight(&realtime.origins, request)),
        _ => Some(Err(ApiError::method_not_allowed("GET, OPTIONS"))),
    }
}

/// The realtime query string: `channel=` (repeated), and per transport
/// `since`, `last_event_id`, `timeout`.
#[derive(Debug, Default)]
struct RealtimeQuery {
    channels: Vec<ChannelName>,
    since: Option<String>,
    last_event_id: Option<String>,
    timeout: Option<String>,
}

impl RealtimeQuery {
    /// Parses the query, accepting only `known` parameters besides `channel`.
    /// `token_param` is the JWT query parameter, when tokens may come that
    /// way; auth reads it.
    fn parse(
        query: Option<&str>,
        known: &[&str],
        token_param: Option<&str>,
    ) -> Result<RealtimeQuery, ApiError> {
        let query = query.unwrap_or("");
        if query.len() > 16 * 1024 {
            return Err(ApiError::bad_request(
                "bad_query",
                "the query string is over 16 KiB",
            ));
        }
        let mut parsed = RealtimeQuery::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let single = |slot: &mut Option<String>| {
                if slot.is_some() {
                    return Err(ApiError::bad_request(
                        "bad_query",
                        format!("parameter `{key}` is given twice"),
                    ));
                }
                *slot = Some(value.clone().into_owned());
                Ok(())
            };
            match key.as_ref() {
                "channel" => {
                    let channel = ChannelName::parse(&value).map_err(|err| {
                        ApiError::bad_request("bad_channel", format!("`{value}`: {err}"))
                    })?;
                    if parsed.channels.contains(&channel) {
                        return Err(ApiError::bad_request(
                            "bad_channel",
                            format!("`{value}` is named twice"),
                        ));
                    }
                    parsed.channels.push(channel);
                }
                "since" if known.contains(&"since") => single(&mut parsed.since)?,
                "last_event_id" if known.contains(&"last_event_id") => {
                    single(&mut parsed.last_event_id)?
                }
                "timeout" if known.contains(&"timeout") => single(&mut parsed.timeout)?,
                name if Some(name) == token_param => {}
                other => {
                    let mut takes = vec!["channel"];
                    takes.extend_from_slice(known);
                    return Err(ApiError::bad_request(
                        "bad_query",
                        format!(
                            "unknown parameter `{other}`; this endpoint takes {}",
                            takes.join(", ")
                        ),
                    ));
                }
            }
        }
        Ok(parsed)
    }
}

/// Parses a cursor from a client, as a 400 with the codec's reason.
fn parse_cursor(text: &str) -> Result<DecodedCursor, ApiError> {
    Cursor::decode(text).map_err(|err| ApiError::bad_request(err.code(), format!("cursor: {err}")))
}

/// A duration with jitter in `[d/2, d]`, so clients told to come back do
/// not all come back at once.
fn jittered(duration: Duration) -> Duration {
    use rand::Rng;
    let millis = duration.as_millis().max(2) as u64;
    Duration::from_millis(rand::rng().random_range(millis / 2..=millis))
}

/// Paces one connection's writes (`realtime.coalesce_window`): when messages
/// come closer together than the window, the next write waits until a window
/// has passed since the last one and carries everything queued by then. The
/// first message after a quiet spell is written at once, so pacing costs
/// latency only under load, and at most one window.
#[derive(Debug, Clone, Copy)]
struct Pace {
    window: Duration,
    last_write: Option<tokio::time::Instant>,
    /// A write is being held back until the window has passed.
    holding: bool,
}

impl Pace {
    fn new(window: Duration) -> Pace {
        Pace {
            window,
            last_write: None,
            holding: false,
        }
    }

    /// The outbox woke the connection, or the hold it asked for ended, at
    /// `now`: `None` to write at once, or the instant to hold the write
    /// until. A wake-up while holding (the outbox half full, lagging or
    /// closed) ends the hold, and an `urgent` outbox
    /// ([`crate::hub::Outbox::is_urgent`]) is never held: write at once.
    /// `urgent` is asked only when the write would otherwise be held, so a
    /// wake-up outside the window costs no look at the outbox.
    fn on_wake(
        &mut self,
        now: tokio::time::Instant,
        urgent: impl FnOnce() -> bool,
    ) -> Option<tokio::time::Instant> {
        if std::mem::take(&mut self.holding) {
            return None;
        }
        let next = self.last_write? + self.window;
        self.holding = next > now && !urgent();
        self.holding.then_some(next)
    }

    fn holding(&self) -> bool {
        self.holding
    }

    /// A write went out at `now`.
    fn wrote(&mut self, now: tokio::time::Instant) {
        if !self.window.is_zero() {
            self.last_write = Some(now);
        }
    }
}

#[cfg(test)]
mod pace_tests {
    use super::Pace;
    use std::time::Duration;
    use tokio::time::Instant;

    #[test]
    fn the_first_write_goes_at_once_and_the_next_waits_out_the_window() {
        let mut pace = Pace::new(Duration::from_millis(10));
        let start = Instant::now();
        assert_eq!(pace.on_wake(start, || false), None);
        pace.wrote(start);
        let soon = start + Duration::from_millis(3);
        assert_eq!(
            pace.on_wake(soon, || false),
            Some(start + Duration::from_millis(10))
        );
        assert!(pace.holding());
        // The hold ends (its timer, or the outbox insisting): write.
        assert_eq!(pace.on_wake(soon, || false), None);
        assert!(!pace.holding());
        assert_eq!(
            pace.on_wake(start + Duration::from_millis(10), || false),
            None
        );
        assert_eq!(
            pace.on_wake(start + Duration::from_millis(25), || false),
            None
        );
    }

    /// The wake-up for a batch's first publication and the one for passing
    /// half full can arrive as one: an outbox already past half full is
    /// written at once, not held for the window.
    #[test]
    fn an_urgent_outbox_is_written_within_the_window() {
        let mut pace = Pace::new(Duration::from_secs(1));
        let start = Instant::now();
        pace.wrote(start);
        let soon = start + Duration::from_millis(3);
        assert_eq!(pace.on_wake(soon, || true), None);
        assert!(!pace.holding());
        // Outside the window the outbox is not asked at all.
        let later = start + Duration::from_secs(2);
        assert_eq!(
            pace.on_wake(later, || unreachable!("asked outside the window")),
            None
        );
    }

    #[test]
    fn a_zero_window_never_holds() {
        let mut pace = Pace::new(Duration::ZERO);
        let now = Instant::now();
        pace.wrote(now);
        assert_eq!(pace.on_wake(now, || false), None);
        assert!(!pace.holding());
    }
}
