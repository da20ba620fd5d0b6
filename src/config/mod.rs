//! Configuration: the document ([`Config`], serde structs with their
//! defaults), how it is loaded, and the [`Settings`] a node runs on.
//!
//! This module is a leaf: it imports nothing from the parts that use it.
//! The types settings are parsed into ([`Upstream`], [`OriginPattern`],
//! [`JwtKey`], the TLS server config) live here, so each value is parsed
//! once, while loading, and its problem is reported with the others.
//!
//! Loading happens in three steps so that a user sees every problem at once:
//!
//! 1. The YAML file is parsed into a tree and `PUSHGATE_*` overrides are laid
//!    over it (see [`load`]).
//! 2. The tree is walked against the tree of defaults: a key the defaults do not
//!    have is unknown, and every value is type-checked on its own, so one bad
//!    value does not hide the next.
//! 3. The typed [`Config`] is checked as a whole and its values parsed
//!    ([`Settings::new`]).
//!
//! Every key that exists is documented in `config.example.yaml` at the root of
//! the repository; a key is accepted only once the feature behind it exists.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod events;
pub mod jwt;
mod load;
mod origin;
mod pusher;
mod redis;
mod settings;
#[cfg(test)]
mod tests;
pub mod tls;
mod units;
mod upstream;

pub use events::{EventKind, EventsConfig, EventsSettings};
pub use jwt::JwtKey;
pub use load::{from_yaml, load, ConfigError, Problem};
pub use origin::OriginPattern;
pub use pusher::{
    PusherApp, PusherAppSettings, PusherConfig, PusherWebhook, WebhookKind, WebhookSettings,
};
pub use settings::{AuthPaths, AuthSettings, RpcPaths, Settings};
use units::duration;
pub use units::ByteSize;
pub use upstream::Upstream;

/// Public listener address when none is configured.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The app pushgate sits in front of, when none is configured.
pub const DEFAULT_UPSTREAM_URL: &str = "http://127.0.0.1:3000";
/// How long to wait for the app's response headers (connecting included).
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an unused keep-alive connection to the app stays pooled.
pub const DEFAULT_UPSTREAM_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle keep-alive connections kept to the app.
pub const DEFAULT_UPSTREAM_POOL_MAX_IDLE: usize = 256;
/// How long in-flight work may run on after a shutdown signal.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Largest request head (request line and headers) a client may send.
pub const DEFAULT_MAX_HEADER_BYTES: ByteSize = ByteSize(32 * 1024);
/// Most header fields in one request.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Time a new connection has to complete its TLS handshake and its first
/// request head; a keep-alive connection gets the same for each later head,
/// counted from the end of the previous response (so it is also the idle
/// keep-alive timeout).
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause between two pieces of a request body the client uploads.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// `0` sizes the connection limit from the process's open-file limit.
pub const DEFAULT_MAX_CONNECTIONS: usize = 0;
/// The publish/admin API's listener.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:8081";
/// Largest API request body.
pub const DEFAULT_API_MAX_BODY: ByteSize = ByteSize(1 << 20);
/// How long a publish's idempotency key is remembered.
pub const DEFAULT_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(5 * 60);
/// Concurrent connections to the API listener; separate from the public
/// limit so a flood of browsers cannot lock the app's backend out.
pub const DEFAULT_API_MAX_CONNECTIONS: usize = 1024;
/// Publications kept per channel (at least).
pub const DEFAULT_HISTORY_SIZE: usize = 100;
/// Older publications are never replayed.
pub const DEFAULT_HISTORY_TTL: Duration = Duration::from_secs(10 * 60);
/// Most publications waiting in one session's queue.
pub const DEFAULT_QUEUE_MESSAGES: usize = 1_000;
/// Most bytes waiting in one session's queue.
pub const DEFAULT_QUEUE_BYTES: ByteSize = ByteSize(4 << 20);
/// Most bytes the kernel holds unsent on one client socket.
pub const DEFAULT_UNSENT_BYTES: ByteSize = ByteSize(16 << 10);
/// Largest `limits.unsent_bytes`: the kernel's own ceiling is about this.
pub const MAX_UNSENT_BYTES: ByteSize = ByteSize(64 << 20);
/// Realtime connections one user may hold (tabs, devices).
pub const DEFAULT_CONNECTIONS_PER_USER: usize = 100;
/// Largest `history.size`: history is memory.
pub const MAX_HISTORY_SIZE: usize = 1_000_000;
/// Where pushgate's own realtime endpoints live on the public listener.
pub const DEFAULT_REALTIME_PREFIX: &str = "/realtime";
/// Channels one realtime connection may hear.
pub const DEFAULT_MAX_CHANNELS: usize = 100;
/// Realtime connections from one client address.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 1_000;
/// WebSocket commands a connection may send per second, sustained…
pub const DEFAULT_COMMANDS_PER_SECOND: u32 = 20;
/// …and in a burst.
pub const DEFAULT_COMMAND_BURST: u32 = 50;
/// Messages for one connection that come faster than this are written
/// together, at most one write per window; the first after a quiet spell is
/// written at once.
pub const DEFAULT_COALESCE_WINDOW: Duration = Duration::from_millis(10);
/// Longest `realtime.coalesce_window`: it is added latency under load.
pub const MAX_COALESCE_WINDOW: Duration = Duration::from_secs(1);
/// Largest WebSocket message a client may send.
pub const DEFAULT_WS_MAX_MESSAGE: ByteSize = ByteSize(64 * 1024);
/// How often an idle WebSocket is pinged.
pub const DEFAULT_WS_PING_INTERVAL: Duration = Duration::from_secs(25);
/// How long a pong (or a write) may take before the peer counts as dead.
pub const DEFAULT_WS_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// How much one read from a WebSocket's socket takes (at most 4 KiB of it
/// when tungstenite asks for less). Nothing of it is kept between frames:
/// clients send small JSON commands, and a larger frame is read into room of
/// its own size.
pub const DEFAULT_WS_READ_BUFFER: ByteSize = ByteSize(256);
/// Bytes tungstenite gathers before it writes. Below this, messages wait for
/// the flush that ends their batch, so a batch is one write; 0 would write
/// every message on its own as it is queued. Nothing is allocated for it up
/// front: the buffer holds what one batch needs.
pub const DEFAULT_WS_WRITE_BUFFER: ByteSize = ByteSize(8 * 1024);
/// Most bytes tungstenite may hold unwritten for one connection.
pub const DEFAULT_WS_MAX_WRITE_BUFFER: ByteSize = ByteSize(8 << 20);
/// Publications whose envelope is shorter than this go uncompressed to
/// connections that negotiated permessage-deflate: below it, compressing
/// saves too few bytes for what it costs
/// (docs/perf-log/2026-12-07-websocket-compression.md).
pub const DEFAULT_WS_COMPRESSION_MIN_SIZE: ByteSize = ByteSize(256);
/// An idle SSE stream gets a comment line this often, so proxies keep it.
pub const DEFAULT_SSE_KEEPALIVE: Duration = Duration::from_secs(15);
/// The `retry:` an SSE stream asks the browser to wait before reconnecting.
pub const DEFAULT_SSE_RETRY: Duration = Duration::from_secs(2);
/// A long-poll without `timeout=` waits this long…
pub const DEFAULT_POLL_TIMEOUT: Duration = Duration::from_secs(25);
/// …and with one, at most this long.
pub const DEFAULT_POLL_MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// The app's auth endpoint, under `upstream.url`.
pub const DEFAULT_AUTH_PATH: &str = "/realtime/auth";
/// Client headers the auth request carries to the app.
pub const DEFAULT_AUTH_FORWARD_HEADERS: [&str; 2] = ["cookie", "authorization"];
/// How long the app may take to answer an auth request.
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a grant is reused for the same credentials.
pub const DEFAULT_AUTH_CACHE_TTL: Duration = Duration::from_secs(30);
/// Most grants cached at once.
pub const DEFAULT_AUTH_CACHE_SIZE: usize = 10_000;
/// The query parameter that may carry a JWT.
pub const DEFAULT_JWT_QUERY_PARAM: &str = "token";
/// Clock skew allowed on a JWT's `exp`.
pub const DEFAULT_JWT_LEEWAY: Duration = Duration::from_secs(30);
/// Log filter, in `tracing_subscriber::EnvFilter` syntax.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// `auth.jwt.jwks_refresh`.
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(10 * 60);
/// `auth.jwt.jwks_min_refetch`.
pub const DEFAULT_JWKS_MIN_REFETCH: Duration = Duration::from_secs(30);
/// `engine.redis.url`.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// `engine.redis.prefix`.
pub const DEFAULT_REDIS_PREFIX: &str = "pushgate";
/// `engine.redis.connect_timeout`.
pub const DEFAULT_REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// `engine.redis.command_timeout`.
pub const DEFAULT_REDIS_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// `rpc.timeout`.
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(5);
/// `rpc.max_in_flight`.
pub const DEFAULT_RPC_MAX_IN_FLIGHT: usize = 8;
/// `engine.redis.wait_timeout`.
pub const DEFAULT_REDIS_WAIT_TIMEOUT: Duration = Duration::from_secs(1);
/// `engine.redis.presence_ttl`.
pub const DEFAULT_REDIS_PRESENCE_TTL: Duration = Duration::from_secs(30);

/// hyper refuses a read buffer smaller than this, so it is the floor of
/// `limits.max_header_bytes`.
pub const MIN_HEADER_BYTES: u64 = 8 * 1024;
/// Ceiling of `limits.max_header_bytes`: more only helps an attacker.
pub const MAX_HEADER_BYTES: u64 = 1024 * 1024;
/// Environment variables starting with this override config keys.
pub const ENV_PREFIX: &str = "PUSHGATE_";

/// The whole configuration. Every field has a default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The public listener: browsers and the app's ordinary HTTP traffic.
    pub listen: SocketAddr,
    pub upstream: UpstreamConfig,
    pub tls: TlsConfig,
    pub api: ApiConfig,
    pub realtime: RealtimeConfig,
    pub auth: AuthConfig,
    pub engine: EngineConfig,
    /// Options by channel name prefix (presence, join/leave events,
    /// publishes from clients).
    pub channels: Vec<ChannelRule>,
    /// Calls from WebSocket clients to the app.
    pub rpc: RpcConfig,
    pub history: HistoryConfig,
    pub shutdown: ShutdownConfig,
    pub limits: LimitsConfig,
    pub log: LogConfig,
    pub fast_paths: FastPathsConfig,
    /// Connection events posted to the app.
    pub events: EventsConfig,
    /// The Pusher Channels protocol, for apps built on Pusher's libraries.
    pub pusher: PusherConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            upstream: UpstreamConfig::default(),
            tls: TlsConfig::default(),
            api: ApiConfig::default(),
            realtime: RealtimeConfig::default(),
            auth: AuthConfig::default(),
            engine: EngineConfig::default(),
            channels: Vec::new(),
            rpc: RpcConfig::default(),
            history: HistoryConfig::default(),
            shutdown: ShutdownConfig::default(),
            limits: LimitsConfig::default(),
            log: LogConfig::default(),
            fast_paths: FastPathsConfig::default(),
            events: EventsConfig::default(),
            pusher: PusherConfig::default(),
        }
    }
}

/// The fast paths that rely on how hyper and tokio behave inside
/// (docs/fast-paths.md). Each is on by default and can be turned off to
/// compare, or to bisect a regression after upgrading either crate; with
/// each off pushgate takes the plain library path.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FastPathsConfig {
    /// Requests without a body go to the app on pushgate's own HTTP/1.1
    /// client (`app/h1/`); off: on hyper's, like uploads.
    pub lean_client: bool,
    /// An HTTP/1 SSE stream leaves hyper's connection after its head
    /// (`detach.rs`); off: it streams through hyper.
    pub sse_detach: bool,
    /// Shard threads reuse the timers of finished deadlines (`timer.rs`);
    /// off: every deadline is a new tokio timer.
    pub kept_timers: bool,
    /// A new connection's first bytes are read in one system call
    /// (`server/read_ahead.rs`); off: hyper reads them as it asks.
    pub read_ahead: bool,
    /// An upgraded HTTP/1 WebSocket's socket is taken back out of hyper's
    /// wrapping (`detach::Reclaim`); off: the session reads and writes
    /// through hyper's `Upgraded`.
    pub ws_reclaim: bool,
}

impl Default for FastPathsConfig {
    fn default() -> Self {
        FastPathsConfig {
            lean_client: true,
            sse_detach: true,
            kept_timers: true,
            read_ahead: true,
            ws_reclaim: true,
        }
    }
}

/// The publish/admin API, for the app's backend and operators.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Accepted `Authorization: Bearer` keys. Several, so keys can rotate.
    pub keys: Vec<String>,
    /// Run the API without keys. Refused unless `listen` is loopback.
    pub insecure_no_auth: bool,
    pub max_body: ByteSize,
    #[serde(with = "duration")]
    pub idempotency_window: Duration,
    pub max_connections: usize,
    /// Publish requests per second per API key, on average.
    pub publishes_per_second: u32,
    /// How many publish requests one key may send at once above that.
    pub publish_burst: u32,
    pub backpressure: BackpressureConfig,
}

/// Publishers wait while this node's fan-out runs behind (docs/api.md,
/// "Backpressure").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct BackpressureConfig {
    /// A session that takes a publication more than this after it was
    /// published takes it late; when most do, the fan-out is behind. 0s:
    /// never wait.
    #[serde(with = "duration")]
    pub max_delay: Duration,
    /// How long a publish waits for the fan-out to catch up before it is
    /// refused (503 `overloaded`, not stored).
    #[serde(with = "duration")]
    pub max_wait: Duration,
}

pub const DEFAULT_BACKPRESSURE_MAX_DELAY: Duration = Duration::from_millis(500);
pub const DEFAULT_BACKPRESSURE_MAX_WAIT: Duration = Duration::from_secs(2);
/// Longest a publish may be held.
pub const MAX_BACKPRESSURE_WAIT: Duration = Duration::from_secs(60);

impl Default for BackpressureConfig {
    fn default() -> Self {
        BackpressureConfig {
            max_delay: DEFAULT_BACKPRESSURE_MAX_DELAY,
            max_wait: DEFAULT_BACKPRESSURE_MAX_WAIT,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: DEFAULT_API_LISTEN.parse().expect("valid default address"),
            keys: Vec::new(),
            insecure_no_auth: false,
            max_body: DEFAULT_API_MAX_BODY,
            idempotency_window: DEFAULT_IDEMPOTENCY_WINDOW,
            max_connections: DEFAULT_API_MAX_CONNECTIONS,
            publishes_per_second: 10_000,
            publish_burst: 20_000,
            backpressure: BackpressureConfig::default(),
        }
    }
}

/// pushgate's own endpoints on the public listener: WebSocket, SSE and
/// long-poll under `prefix`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RealtimeConfig {
    /// `/realtime`: `/realtime/ws`, `/realtime/sse`, `/realtime/poll`.
    pub prefix: String,
    /// Origins allowed to open realtime connections from a browser:
    /// `https://app.example.com`, `https://*.example.com`, or `*`. Empty:
    /// only the request's own host (stops cross-site WebSocket hijacking).
    pub allowed_origins: Vec<String>,
    pub max_channels: usize,
    pub max_connections_per_ip: usize,
    pub commands_per_second: u32,
    pub command_burst: u32,
    /// WebSocket `publish` commands per connection per second, and their
    /// burst (within `commands_per_second`).
    pub publishes_per_second: u32,
    pub publish_burst: u32,
    /// New realtime connections per client address per second, and their
    /// burst.
    pub connects_per_second: u32,
    pub connect_burst: u32,
    /// Messages for one connection closer together than this are written
    /// in one go (at most one write per window); 0 writes each at once.
    #[serde(with = "duration")]
    pub coalesce_window: Duration,
    pub websocket: WebSocketConfig,
    pub sse: SseConfig,
    pub poll: PollConfig,
}

impl Default for RealtimeConfig {
    fn default() -> Self {
        RealtimeConfig {
            prefix: DEFAULT_REALTIME_PREFIX.to_owned(),
            allowed_origins: Vec::new(),
            max_channels: DEFAULT_MAX_CHANNELS,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            commands_per_second: DEFAULT_COMMANDS_PER_SECOND,
            command_burst: DEFAULT_COMMAND_BURST,
            publishes_per_second: 10,
            publish_burst: 20,
            connects_per_second: 20,
            connect_burst: 100,
            coalesce_window: DEFAULT_COALESCE_WINDOW,
            websocket: WebSocketConfig::default(),
            sse: SseConfig::default(),
            poll: PollConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebSocketConfig {
    /// Larger client messages close the connection with 1009.
    pub max_message_size: ByteSize,
    #[serde(with = "duration")]
    pub ping_interval: Duration,
    #[serde(with = "duration")]
    pub ping_timeout: Duration,
    pub read_buffer_size: ByteSize,
    pub write_buffer_size: ByteSize,
    pub max_write_buffer_size: ByteSize,
    pub compression: CompressionConfig,
}

/// WebSocket compression: permessage-deflate (RFC 7692) without context
/// takeover, each publication compressed once for all its subscribers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompressionConfig {
    /// Whether a client's permessage-deflate offer is accepted at all.
    pub enabled: bool,
    /// Shorter publications are sent uncompressed.
    pub min_size: ByteSize,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            enabled: true,
            min_size: DEFAULT_WS_COMPRESSION_MIN_SIZE,
        }
    }
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            max_message_size: DEFAULT_WS_MAX_MESSAGE,
            ping_interval: DEFAULT_WS_PING_INTERVAL,
            ping_timeout: DEFAULT_WS_PING_TIMEOUT,
            read_buffer_size: DEFAULT_WS_READ_BUFFER,
            write_buffer_size: DEFAULT_WS_WRITE_BUFFER,
            max_write_buffer_size: DEFAULT_WS_MAX_WRITE_BUFFER,
            compression: CompressionConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SseConfig {
    #[serde(with = "duration")]
    pub keepalive: Duration,
    #[serde(with = "duration")]
    pub retry: Duration,
}

impl Default for SseConfig {
    fn default() -> Self {
        SseConfig {
            keepalive: DEFAULT_SSE_KEEPALIVE,
            retry: DEFAULT_SSE_RETRY,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PollConfig {
    #[serde(with = "duration")]
    pub default_timeout: Duration,
    #[serde(with = "duration")]
    pub max_timeout: Duration,
}

impl Default for PollConfig {
    fn default() -> Self {
        PollConfig {
            default_timeout: DEFAULT_POLL_TIMEOUT,
            max_timeout: DEFAULT_POLL_MAX_TIMEOUT,
        }
    }
}

/// Who may open realtime connections, and to which channels.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub mode: AuthMode,
    pub upstream: UpstreamAuthConfig,
    pub jwt: JwtConfig,
}

/// `auth.mode: jwt`: tokens the app signs, checked by pushgate alone.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    pub algorithm: JwtAlgorithm,
    /// The HS256 secret, inline (better from the environment:
    /// PUSHGATE_AUTH__JWT__SECRET).
    pub secret: Option<String>,
    /// The HS256 secret, from a file.
    pub secret_file: Option<PathBuf>,
    /// The RS256 or ES256 public key, PEM.
    pub public_key_file: Option<PathBuf>,
    /// Or the RS256/ES256 keys from a JWKS document: `https://…` (plain
    /// `http://` only on loopback). A token's `kid` picks the key.
    pub jwks_url: Option<String>,
    /// Extra trusted roots (PEM) for a JWKS server with a private CA.
    pub jwks_ca_file: Option<PathBuf>,
    /// How often the JWKS document is fetched again.
    #[serde(with = "duration")]
    pub jwks_refresh: Duration,
    /// A token with a `kid` not in the set fetches the document again, at
    /// most this often (so random kids cannot hammer the JWKS server).
    #[serde(with = "duration")]
    pub jwks_min_refetch: Duration,
    /// A cookie that may carry the token.
    pub cookie: Option<String>,
    /// A query parameter that may carry the token (browsers cannot set
    /// headers on a WebSocket).
    pub query_param: String,
    /// Clock skew allowed when checking `exp` and `nbf`.
    #[serde(with = "duration")]
    pub leeway: Duration,
    /// When set, a token's `aud` must name it; when not, a token that
    /// names any audience is refused.
    pub audience: Option<String>,
    /// When set, a token's `iss` must be it.
    pub issuer: Option<String>,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            algorithm: JwtAlgorithm::HS256,
            secret: None,
            secret_file: None,
            public_key_file: None,
            jwks_url: None,
            jwks_ca_file: None,
            jwks_refresh: DEFAULT_JWKS_REFRESH,
            jwks_min_refetch: DEFAULT_JWKS_MIN_REFETCH,
            cookie: None,
            query_param: DEFAULT_JWT_QUERY_PARAM.to_owned(),
            leeway: DEFAULT_JWT_LEEWAY,
            audience: None,
            issuer: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    HS256,
    RS256,
    ES256,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Ask the app (`auth.upstream`) who each connection is.
    #[default]
    Upstream,
    /// Check a token the app signed (`auth.jwt`).
    Jwt,
    /// Everyone may hear every channel. Only on a loopback listener.
    None,
}

/// The auth request to the app.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamAuthConfig {
    /// `POST <upstream.url><path>` before each realtime connection.
    pub path: String,
    /// Client headers passed to the app (lower case).
    pub forward_headers: Vec<String>,
    /// No answer within this long: the connection is refused with 503 (1013).
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// How long a grant is reused for the same auth request; 0: never.
    #[serde(with = "duration")]
    pub cache_ttl: Duration,
    /// Most grants cached at once.
    pub cache_size: usize,
    /// Asked when a grant's `expires_in` passes: the app extends it or
    /// refuses (close 4001). Without it an expired connection is closed.
    pub refresh_path: Option<String>,
    /// Asked when a connection subscribes to a channel outside its grant:
    /// the app answers 200 (allowed) or 403.
    pub subscribe_path: Option<String>,
}

impl Default for UpstreamAuthConfig {
    fn default() -> Self {
        UpstreamAuthConfig {
            path: DEFAULT_AUTH_PATH.to_owned(),
            forward_headers: DEFAULT_AUTH_FORWARD_HEADERS
                .iter()
                .map(|h| (*h).to_owned())
                .collect(),
            timeout: DEFAULT_AUTH_TIMEOUT,
            cache_ttl: DEFAULT_AUTH_CACHE_TTL,
            cache_size: DEFAULT_AUTH_CACHE_SIZE,
            refresh_path: None,
            subscribe_path: None,
        }
    }
}

/// Where channels, history and fan-out live.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    pub kind: EngineKind,
    /// Used when `kind` is `redis`.
    pub redis: RedisConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// One node, everything in this process.
    #[default]
    Memory,
    /// Many nodes sharing channels, history and presence through Redis.
    Redis,
}

/// Options for the channels whose names start with `prefix`. The longest
/// matching prefix wins; channels no rule matches have every option off.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelRule {
    /// e.g. `chat:`; empty matches every channel.
    pub prefix: String,
    /// Who is subscribed can be listed: `GET /api/presence?channel=`.
    pub presence: bool,
    /// Subscribers hear `join` and `leave` events when others come and go.
    pub join_leave: bool,
    /// Whether, and how, WebSocket clients may publish here.
    pub publish: ClientPublish,
    /// Publications from clients go to whoever listens now and are never
    /// stored (no position, no history, no resume): typing indicators.
    pub ephemeral: bool,
}

/// Publishes from clients on a channel (`channels[].publish`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientPublish {
    /// Clients only listen.
    #[default]
    Off,
    /// Stored and fanned out as the client sent it, with its user added.
    Direct,
    /// The app decides first (`rpc.publish_path`): refuse, rewrite or accept.
    ViaApp,
}

/// `rpc`: WebSocket clients calling the app, and the app deciding on
/// publishes from clients.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RpcConfig {
    /// `POST <upstream.url><path>` for each `rpc` command; none: rpc is off.
    pub path: Option<String>,
    /// `POST <upstream.url><publish_path>` for each publish on a channel
    /// whose rule says `publish: via_app`.
    pub publish_path: Option<String>,
    /// How long the app may take to answer either.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Calls one connection may have waiting for the app at once.
    pub max_in_flight: usize,
    /// The largest answer from the app passed on to a client.
    pub max_answer: ByteSize,
}

impl Default for RpcConfig {
    fn default() -> Self {
        RpcConfig {
            path: None,
            publish_path: None,
            timeout: DEFAULT_RPC_TIMEOUT,
            max_in_flight: DEFAULT_RPC_MAX_IN_FLIGHT,
            max_answer: ByteSize(64 * 1024),
        }
    }
}

/// The Redis engine.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS.
    pub url: String,
    /// `url` is one node of a Redis Cluster; the others are discovered.
    pub cluster: bool,
    /// Extra trusted roots (PEM) for `rediss://` with a private CA.
    pub tls_ca_file: Option<PathBuf>,
    /// Every key and pub/sub channel starts with this, so several
    /// deployments can share one Redis.
    pub prefix: String,
    /// How long connecting may take before Redis counts as down.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// How long a command may take before Redis counts as down.
    #[serde(with = "duration")]
    pub command_timeout: Duration,
    /// A publish is answered 200 only once this many replicas of its
    /// master confirm they hold it; 0 answers once the master stored it.
    pub wait_replicas: u32,
    /// How long a publish waits for those replicas before it is answered
    /// 503 `not_replicated`.
    #[serde(with = "duration")]
    pub wait_timeout: Duration,
    /// Presence entries and node liveness expire this long after the node
    /// that wrote them last refreshed them (every third of it).
    #[serde(with = "duration")]
    pub presence_ttl: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: DEFAULT_REDIS_URL.to_owned(),
            cluster: false,
            tls_ca_file: None,
            prefix: DEFAULT_REDIS_PREFIX.to_owned(),
            connect_timeout: DEFAULT_REDIS_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_REDIS_COMMAND_TIMEOUT,
            wait_replicas: 0,
            wait_timeout: DEFAULT_REDIS_WAIT_TIMEOUT,
            presence_ttl: DEFAULT_REDIS_PRESENCE_TTL,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// Publications kept per channel, at least.
    pub size: usize,
    /// Publications older than this are never replayed.
    #[serde(with = "duration")]
    pub ttl: Duration,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            size: DEFAULT_HISTORY_SIZE,
            ttl: DEFAULT_HISTORY_TTL,
        }
    }
}

/// The app pushgate forwards ordinary HTTP to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `http://host:port` of the app; no path.
    pub url: String,
    /// Wait for the app's response headers, connecting included. A streamed
    /// body may take as long as it likes once the headers are in.
    #[serde(with = "duration")]
    pub timeout: Duration,
    #[serde(with = "duration")]
    pub pool_idle_timeout: Duration,
    pub pool_max_idle: usize,
    /// Peers whose `X-Forwarded-*` headers are believed and extended; from
    /// anyone else they are replaced, so a client cannot forge its address.
    pub trusted_proxies: Vec<String>,
    /// More fields removed from the requests of clients outside
    /// `trusted_proxies`, beside the built-in list (`proxy::UNTRUSTED`):
    /// fields the app reads as the client's address or original URL.
    pub untrusted_headers: Vec<String>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: DEFAULT_UPSTREAM_URL.to_owned(),
            timeout: DEFAULT_UPSTREAM_TIMEOUT,
            pool_idle_timeout: DEFAULT_UPSTREAM_POOL_IDLE_TIMEOUT,
            pool_max_idle: DEFAULT_UPSTREAM_POOL_MAX_IDLE,
            trusted_proxies: Vec::new(),
            untrusted_headers: Vec::new(),
        }
    }
}

/// TLS on the public listener; off unless both files are given.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// After SIGTERM/SIGINT, how long in-flight requests may take to finish.
    #[serde(with = "duration")]
    pub grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Concurrent client connections; `0` derives it from the open-file limit
    /// (each proxied connection holds two descriptors).
    pub max_connections: usize,
    pub max_header_bytes: ByteSize,
    pub max_headers: usize,
    /// Deadline for the TLS handshake and the request head.
    #[serde(with = "duration")]
    pub header_timeout: Duration,
    /// Longest pause in a request body upload; a stalled upload gets 408.
    #[serde(with = "duration")]
    pub body_timeout: Duration,
    /// One session's queue: past either bound it is cut off as a slow
    /// consumer and resumes from history.
    pub queue_messages: usize,
    pub queue_bytes: ByteSize,
    /// Bytes the kernel may hold unsent on one client socket
    /// (`TCP_NOTSENT_LOWAT`); past it writes wait in pushgate, where the
    /// queues above count them. 0: the kernel's default.
    pub unsent_bytes: ByteSize,
    /// Realtime connections one user (as the app names it) may hold; 0:
    /// unlimited.
    pub connections_per_user: usize,
}

impl LimitsConfig {
    /// `unsent_bytes` as the socket option takes it, and as the most a
    /// session takes from its queue at a time; `None` for 0 (the kernel's
    /// default, and no bound on a take).
    pub fn unsent_bound(&self) -> Option<u32> {
        match self.unsent_bytes.bytes() {
            0 => None,
            bytes => Some(u32::try_from(bytes).unwrap_or(u32::MAX)),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            queue_messages: DEFAULT_QUEUE_MESSAGES,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            unsent_bytes: DEFAULT_UNSENT_BYTES,
            connections_per_user: DEFAULT_CONNECTIONS_PER_USER,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter: `info`, `debug`, `pushgate=debug,hyper=info`, …
    pub level: String,
    pub format: LogFormat,
    /// One line per proxied request and per realtime connect (target
    /// `pushgate::access`), each with a request id the app is sent too
    /// (`X-Request-Id`).
    pub access: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: DEFAULT_LOG_LEVEL.to_owned(),
            format: LogFormat::Text,
            access: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// For people: one readable line per event.
    #[default]
    Text,
    /// For machines: one JSON object per line.
    Json,
}
