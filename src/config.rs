//! Configuration: serde structs with their defaults, loading, environment
//! overrides and validation.
//!
//! Loading happens in three steps so that a user sees every problem at once:
//!
//! 1. The YAML file is parsed into a tree and `PUSHGATE_*` overrides are laid
//!    over it (see [`load`]).
//! 2. The tree is walked against the tree of defaults: a key the defaults do not
//!    have is unknown, and every value is type-checked on its own, so one bad
//!    value does not hide the next.
//! 3. The typed [`Config`] is validated as a whole ([`Config::validate`]).
//!
//! Every key that exists is documented in `config.example.yaml` at the root of
//! the repository; a key is accepted only once the feature behind it exists.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_yaml::{Mapping, Value};

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
/// tungstenite's read buffer per connection, held (and zero-filled) for the
/// connection's life. Clients send small JSON commands; a larger frame grows
/// the buffer while it is read. tungstenite's own default (128 KiB) is far
/// too much for many idle connections.
pub const DEFAULT_WS_READ_BUFFER: ByteSize = ByteSize(256);
/// Bytes tungstenite gathers before it writes. Below this, messages wait for
/// the flush that ends their batch, so a batch is one write; 0 would write
/// every message on its own as it is queued. Nothing is allocated for it up
/// front: the buffer holds what one batch needs.
pub const DEFAULT_WS_WRITE_BUFFER: ByteSize = ByteSize(8 * 1024);
/// Most bytes tungstenite may hold unwritten for one connection.
pub const DEFAULT_WS_MAX_WRITE_BUFFER: ByteSize = ByteSize(8 << 20);
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
    /// Options by channel name prefix (presence, join/leave events).
    pub channels: Vec<ChannelRule>,
    pub history: HistoryConfig,
    pub shutdown: ShutdownConfig,
    pub limits: LimitsConfig,
    pub log: LogConfig,
    pub fast_paths: FastPathsConfig,
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
            history: HistoryConfig::default(),
            shutdown: ShutdownConfig::default(),
            limits: LimitsConfig::default(),
            log: LogConfig::default(),
            fast_paths: FastPathsConfig::default(),
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
    /// client (`app/h1.rs`); off: on hyper's, like uploads.
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
}

impl Default for FastPathsConfig {
    fn default() -> Self {
        FastPathsConfig {
            lean_client: true,
            sse_detach: true,
            kept_timers: true,
            read_ahead: true,
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
    /// Realtime connections one user (as the app names it) may hold; 0:
    /// unlimited.
    pub connections_per_user: usize,
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
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: DEFAULT_LOG_LEVEL.to_owned(),
            format: LogFormat::Text,
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

/// A size in bytes, written as a number or with a unit: `32KiB`, `4MiB`, `1GiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn bytes(self) -> u64 {
        self.0
    }

    fn parse(text: &str) -> Option<ByteSize> {
        let text = text.trim();
        let digits = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(digits);
        let number: u64 = number.parse().ok()?;
        let multiplier: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" | "k" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return None,
        };
        number.checked_mul(multiplier).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        for (size, unit) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        const EXPECTED: &str = "a size such as `32KiB`, `4MiB` or a number of bytes";
        match Raw::deserialize(deserializer)
            .map_err(|_| serde::de::Error::custom(format!("expected {EXPECTED}")))?
        {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(text) => ByteSize::parse(&text).ok_or_else(|| {
                serde::de::Error::custom(format!("expected {EXPECTED}, found `{text}`"))
            }),
        }
    }
}

/// Durations are written the human way: `500ms`, `10s`, `5m`, `1h 30m`.
mod duration {
    use super::*;

    const EXPECTED: &str = "a duration with a unit, such as `500ms`, `10s` or `5m`";
    const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 86_400);

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_duration(*value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let value = Value::deserialize(deserializer)?;
        let text = match &value {
            Value::String(text) => text,
            Value::Number(n) => {
                return Err(serde::de::Error::custom(format!(
                    "expected {EXPECTED}, found the bare number `{n}`"
                )))
            }
            _ => return Err(serde::de::Error::custom(format!("expected {EXPECTED}"))),
        };
        let parsed = humantime::parse_duration(text).map_err(|_| {
            serde::de::Error::custom(format!("expected {EXPECTED}, found `{text}`"))
        })?;
        // Deadlines are computed as now + duration; keep them far from
        // overflow (and from mistakes).
        if parsed > MAX_DURATION {
            return Err(serde::de::Error::custom(format!(
                "`{text}` is longer than the longest duration pushgate takes, 10 years"
            )));
        }
        Ok(parsed)
    }
}

/// One thing wrong with the configuration, and how to put it right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where the bad value came from: the file, or the environment variable.
    pub origin: String,
    /// Dotted key path, e.g. `limits.header_timeout`.
    pub key: String,
    pub why: String,
    pub fix: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: `{}`: {}; fix: {}",
            self.origin, self.key, self.why, self.fix
        )
    }
}

/// Everything wrong with a configuration, reported together.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        writeln!(
            f,
            "invalid configuration ({count} problem{}):",
            if count == 1 { "" } else { "s" }
        )?;
        for problem in &self.problems {
            writeln!(f, "  {problem}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    fn single(origin: &str, key: &str, why: impl Into<String>, fix: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![Problem {
                origin: origin.to_owned(),
                key: key.to_owned(),
                why: why.into(),
                fix: fix.into(),
            }],
        }
    }
}

/// Reads `path`, lays the `PUSHGATE_*` variables of `env` over it, and
/// validates the result. `env` is injected (the binary passes
/// `std::env::vars()`) so tests never touch the process environment.
pub fn load<I, K, V>(path: &Path, env: I) -> Result<Config, ConfigError>
where
    I: IntoIterator<Item = (K, V)>,
    K: Into<String>,
    V: Into<String>,
{
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|err| {
        ConfigError::single(
            &origin,
            "(file)",
            format!("cannot read the file: {err}"),
            "pass the path of a readable YAML file to --config",
        )
    })?;
    from_yaml(&text, &origin, env)
}

/// Like [`load`], from YAML text; `origin` names it in problems.
pub fn from_yaml<I, K, V>(text: &str, origin: &str, env: I) -> Result<Config, ConfigError>
where
    I: IntoIterator<Item = (K, V)>,
    K: Into<String>,
    V: Into<String>,
{
    let mut tree: Value = serde_yaml::from_str(text).map_err(|err| {
        ConfigError::single(
            origin,
            "(file)",
            format!("not valid YAML: {err}"),
            "fix the YAML syntax; config.example.yaml shows every key",
        )
    })?;
    if tree.is_null() {
        // An empty file means "all defaults".
        tree = Value::Mapping(Mapping::new());
    }
    if !tree.is_mapping() {
        return Err(ConfigError::single(
            origin,
            "(file)",
            "the top level must be a mapping of keys",
            "start from config.example.yaml",
        ));
    }

    let defaults = serde_yaml::to_value(Config::default()).expect("defaults serialize");
    let mut problems = Vec::new();
    let mut origins = BTreeMap::new();
    apply_env(&mut tree, &defaults, env, &mut origins, &mut problems);
    let mut bad_paths = Vec::new();
    check_tree(
        &tree,
        &defaults,
        &defaults,
        &mut Vec::new(),
        origin,
        &origins,
        &mut problems,
        &mut bad_paths,
    );
    // Put defaults where the values were bad, so the checks that need the
    // whole config still run and their problems join this report.
    for path in &bad_paths {
        match lookup(&defaults, path) {
            Some(default) => set(&mut tree, path, default.clone()),
            None => remove(&mut tree, path),
        }
    }
    let config = match Config::deserialize(tree) {
        Ok(config) => config,
        // Only a key we could not repair (a non-string key) gets here, and it
        // is already among the problems.
        Err(_) if !problems.is_empty() => return Err(ConfigError { problems }),
        Err(err) => {
            return Err(ConfigError::single(
                origin,
                "(file)",
                clean_serde_message(&err.to_string()),
                "see config.example.yaml",
            ))
        }
    };
    let reported: Vec<String> = problems.iter().map(|p| p.key.clone()).collect();
    problems.extend(
        config
            .validate_at(origin)
            .into_iter()
            .filter(|problem| !reported.contains(&problem.key))
            .map(|mut problem| {
                if let Some(env) = origins.get(&problem.key) {
                    problem.origin = env.clone();
                }
                problem
            }),
    );
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError { problems })
    }
}

fn remove(tree: &mut Value, path: &[String]) {
    let (last, parents) = path.split_last().expect("non-empty path");
    let parent = parents.iter().try_fold(tree, |node, key| {
        node.as_mapping_mut()?.get_mut(key.as_str())
    });
    if let Some(map) = parent.and_then(Value::as_mapping_mut) {
        map.remove(last.as_str());
    }
}

/// Lays `PUSHGATE_A__B=value` over the tree at `a.b`. The shape of the
/// defaults decides how the text is read: a list is split on commas, anything
/// else is read as a YAML scalar (so numbers stay numbers).
fn apply_env<I, K, V>(
    tree: &mut Value,
    defaults: &Value,
    env: I,
    origins: &mut BTreeMap<String, String>,
    problems: &mut Vec<Problem>,
) where
    I: IntoIterator<Item = (K, V)>,
    K: Into<String>,
    V: Into<String>,
{
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    for (name, text) in vars {
        let path: Vec<String> = name[ENV_PREFIX.len()..]
            .split("__")
            .map(|part| part.to_ascii_lowercase())
            .collect();
        let key = path.join(".");
        let Some(shape) = lookup(defaults, &path) else {
            problems.push(Problem {
                origin: format!("environment {name}"),
                key,
                why: "no such configuration key".into(),
                fix: "remove the variable, or name a key from config.example.yaml \
                      (upper case, `__` between levels)"
                    .into(),
            });
            continue;
        };
        let value = if shape.is_sequence() {
            Value::Sequence(
                text.split(',')
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .map(scalar)
                    .collect(),
            )
        } else if shape.is_string() || shape.is_null() {
            // Keep strings as written, even when they look like a number.
            if shape.is_null() && text.is_empty() {
                Value::Null
            } else {
                Value::String(text)
            }
        } else {
            scalar(&text)
        };
        set(tree, &path, value);
        origins.insert(key, format!("environment {name}"));
    }
}

fn scalar(text: &str) -> Value {
    serde_yaml::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

fn lookup<'a>(tree: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter()
        .try_fold(tree, |node, key| node.as_mapping()?.get(key.as_str()))
}

fn set(tree: &mut Value, path: &[String], value: Value) {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut node = tree;
    for key in parents {
        let map = node.as_mapping_mut().expect("tree nodes are mappings");
        let child = map
            .entry(Value::String(key.clone()))
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        if !child.is_mapping() {
            *child = Value::Mapping(Mapping::new());
        }
        node = child;
    }
    node.as_mapping_mut()
        .expect("tree nodes are mappings")
        .insert(Value::String(last.clone()), value);
}

/// Walks the user's tree beside the defaults: unknown keys are reported, and
/// each value is type-checked alone by placing it into the defaults. The paths
/// of bad values and unknown keys are collected in `bad_paths`.
#[allow(clippy::too_many_arguments)]
fn check_tree(
    node: &Value,
    shape: &Value,
    defaults: &Value,
    path: &mut Vec<String>,
    file: &str,
    origins: &BTreeMap<String, String>,
    problems: &mut Vec<Problem>,
    bad_paths: &mut Vec<Vec<String>>,
) {
    let origin_of = |key: &str| origins.get(key).cloned().unwrap_or_else(|| file.to_owned());
    match (node, shape) {
        (Value::Mapping(map), Value::Mapping(shape_map)) => {
            for (key, value) in map {
                let Some(name) = key.as_str() else {
                    problems.push(Problem {
                        origin: file.to_owned(),
                        key: format!("{}{:?}", prefix(path), key),
                        why: "keys must be strings".into(),
                        fix: "quote the key or remove it".into(),
                    });
                    continue;
                };
                path.push(name.to_owned());
                match shape_map.get(name) {
                    Some(child_shape) => check_tree(
                        value,
                        child_shape,
                        defaults,
                        path,
                        file,
                        origins,
                        problems,
                        bad_paths,
                    ),
                    None => {
                        let key = path.join(".");
                        let known: Vec<&str> = shape_map.keys().filter_map(Value::as_str).collect();
                        problems.push(Problem {
                            origin: origin_of(&key),
                            key,
                            why: "unknown key".into(),
                            fix: format!(
                                "remove it or use one of: {} (see config.example.yaml)",
                                known.join(", ")
                            ),
                        });
                        bad_paths.push(path.clone());
                    }
                }
                path.pop();
            }
        }
        // An empty section (`tls:` with nothing under it) means its defaults.
        (Value::Null, Value::Mapping(_)) => {}
        _ => {
            let mut probe = defaults.clone();
            set(&mut probe, path, node.clone());
            if let Err(err) = Config::deserialize(probe) {
                let key = path.join(".");
                let fix = match shape {
                    Value::Mapping(_) => "write a section of keys here".to_owned(),
                    Value::Null => "see config.example.yaml for the expected form".to_owned(),
                    _ => format!(
                        "write a value of the same form as the default, `{}`",
                        describe(shape)
                    ),
                };
                problems.push(Problem {
                    origin: origin_of(&key),
                    key,
                    why: clean_serde_message(&err.to_string()),
                    fix,
                });
                bad_paths.push(path.clone());
            }
        }
    }
}

fn prefix(path: &[String]) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{}.", path.join("."))
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::Sequence(items) if items.is_empty() => "[]".to_owned(),
        other => serde_yaml::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_owned(),
    }
}

/// serde's messages are good, but name Rust types; say it in config terms.
fn clean_serde_message(message: &str) -> String {
    message
        .replace("unit value", "nothing")
        .replace("struct ", "section ")
        .replace("usize", "a whole number")
        .replace("invalid type: ", "wrong type: ")
}

impl Config {
    /// Checks that needs the whole config: each problem names the key and the
    /// fix. An empty list means the config is good.
    pub fn validate(&self) -> Vec<Problem> {
        self.validate_at("config")
    }

    fn validate_at(&self, origin: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, why: String, fix: &str| {
            problems.push(Problem {
                origin: origin.to_owned(),
                key: key.to_owned(),
                why,
                fix: fix.to_owned(),
            })
        };

        if let Err(why) = crate::app::Upstream::parse(&self.upstream.url) {
            problem(
                "upstream.url",
                why,
                "write the app's address as http://host:port, e.g. http://127.0.0.1:3000",
            );
        }
        if self.upstream.timeout.is_zero() {
            problem(
                "upstream.timeout",
                "must be longer than zero".into(),
                "use e.g. `30s`",
            );
        }
        for (index, entry) in self.upstream.trusted_proxies.iter().enumerate() {
            if parse_network(entry).is_none() {
                problem(
                    &format!("upstream.trusted_proxies[{index}]"),
                    format!("`{entry}` is not an IP address or CIDR network"),
                    "write an address such as 10.0.0.1 or a network such as 10.0.0.0/8",
                );
            }
        }

        for (index, name) in self.upstream.untrusted_headers.iter().enumerate() {
            let key = format!("upstream.untrusted_headers[{index}]");
            match http::HeaderName::from_bytes(name.trim().as_bytes()) {
                Err(_) => problem(
                    &key,
                    format!("`{name}` is not a header field name"),
                    "write a field name such as X-Client-Address",
                ),
                Ok(field)
                    if ["host", "content-length", "transfer-encoding"]
                        .contains(&field.as_str()) =>
                {
                    problem(
                        &key,
                        format!("`{name}` frames or addresses every request and is never removed"),
                        "list only fields that claim the client's address or original URL",
                    )
                }
                Ok(_) => {}
            }
        }

        match (&self.tls.cert, &self.tls.key) {
            (Some(_), None) => problem(
                "tls.key",
                "tls.cert is set but tls.key is not".into(),
                "give both the certificate and its private key, or neither",
            ),
            (None, Some(_)) => problem(
                "tls.cert",
                "tls.key is set but tls.cert is not".into(),
                "give both the certificate and its private key, or neither",
            ),
            (Some(cert), Some(key)) => {
                if let Err(err) = crate::server::tls::server_config(cert, key) {
                    problem(err.key(), err.to_string(), err.fix());
                }
            }
            (None, None) => {}
        }

        let header_bytes = self.limits.max_header_bytes.bytes();
        if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&header_bytes) {
            problem(
                "limits.max_header_bytes",
                format!(
                    "{} is outside {}..={}",
                    self.limits.max_header_bytes,
                    ByteSize(MIN_HEADER_BYTES),
                    ByteSize(MAX_HEADER_BYTES)
                ),
                "use a size between 8KiB and 1MiB, e.g. 32KiB",
            );
        }
        if self.limits.max_headers == 0 {
            problem(
                "limits.max_headers",
                "must be at least 1".into(),
                "use e.g. 100",
            );
        }
        if self.limits.header_timeout.is_zero() {
            problem(
                "limits.header_timeout",
                "must be longer than zero".into(),
                "use e.g. `10s`",
            );
        }
        if self.limits.max_connections > 0 {
            let allowed = crate::files::connection_capacity();
            if self.limits.max_connections > allowed {
                problem(
                    "limits.max_connections",
                    format!(
                        "{} connections need at least {} open files, but this process may open {}",
                        self.limits.max_connections,
                        self.limits.max_connections + crate::files::RESERVED_FILES,
                        crate::files::open_file_limit()
                    ),
                    &format!(
                        "lower it to at most {allowed}, use 0 to size it automatically, \
                         or raise the open-file limit (ulimit -n)"
                    ),
                );
            }
        }

        if self.limits.body_timeout.is_zero() {
            problem(
                "limits.body_timeout",
                "must be longer than zero".into(),
                "use e.g. `60s`",
            );
        }
        let api = &self.api;
        if api.keys.is_empty() && !api.insecure_no_auth {
            problem(
                "api.keys",
                "no API key: the publish API would be open to anyone who can reach it".into(),
                "set api.keys (or PUSHGATE_API__KEYS=k1,k2) to long random secrets; \
                 for local development only, api.insecure_no_auth: true on a loopback api.listen",
            );
        }
        if api.insecure_no_auth && !api.listen.ip().is_loopback() {
            problem(
                "api.insecure_no_auth",
                format!(
                    "the API would run without keys on {}, which is not loopback",
                    api.listen
                ),
                "set api.keys, or listen on 127.0.0.1",
            );
        }
        for (index, key) in api.keys.iter().enumerate() {
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
                problem(
                    &format!("api.keys[{index}]"),
                    "a key must be non-empty printable ASCII without spaces".into(),
                    "use a random token, e.g. from `openssl rand -hex 32`",
                );
            }
        }
        if self.listen == api.listen && self.listen.port() != 0 {
            problem(
                "api.listen",
                format!("{} is also the public `listen` address", api.listen),
                "give the API its own port, e.g. 127.0.0.1:8081",
            );
        }
        let max_body = api.max_body.bytes();
        if !(1024..=64 << 20).contains(&max_body) {
            problem(
                "api.max_body",
                format!("{} is outside 1KiB..=64MiB", api.max_body),
                "use e.g. 1MiB",
            );
        }
        if api.idempotency_window.is_zero() {
            problem(
                "api.idempotency_window",
                "must be longer than zero".into(),
                "use e.g. `5m`",
            );
        }
        if api.max_connections == 0 {
            problem(
                "api.max_connections",
                "must be at least 1".into(),
                "use e.g. 1024",
            );
        }
        for (index, rule) in self.channels.iter().enumerate() {
            let valid = rule.prefix.len() <= 255
                && rule.prefix.bytes().all(|b| {
                    b.is_ascii_alphanumeric()
                        || matches!(b, b'_' | b':' | b'.' | b'@' | b'=' | b'/' | b'-')
                });
            if !valid {
                problem(
                    &format!("channels[{index}].prefix"),
                    format!("`{}` cannot start a channel name", rule.prefix),
                    "use characters of [A-Za-z0-9_:.@=/-], e.g. chat:",
                );
            }
            if self.channels[..index]
                .iter()
                .any(|other| other.prefix == rule.prefix)
            {
                problem(
                    &format!("channels[{index}].prefix"),
                    format!("`{}` has a rule already", rule.prefix),
                    "give each prefix one rule",
                );
            }
        }
        if self.engine.kind == EngineKind::Redis {
            let redis = &self.engine.redis;
            if let Err(why) = crate::broker::redis::parse_url(&redis.url) {
                problem(
                    "engine.redis.url",
                    why,
                    "write redis://[user:password@]host:port[/db] or rediss://… for TLS",
                );
            }
            if redis.cluster
                && crate::broker::redis::url_database(&redis.url).is_some_and(|db| db != 0)
            {
                problem(
                    "engine.redis.cluster",
                    "a Redis Cluster has only database 0".into(),
                    "drop the database number from engine.redis.url",
                );
            }
            if let Some(file) = &redis.tls_ca_file {
                if let Err(why) = crate::broker::redis::read_ca_file(file) {
                    problem(
                        "engine.redis.tls_ca_file",
                        why,
                        "give a readable PEM file holding one or more CA certificates",
                    );
                }
            }
            let prefix_ok = !redis.prefix.is_empty()
                && redis.prefix.len() <= 64
                && redis
                    .prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
            if !prefix_ok {
                problem(
                    "engine.redis.prefix",
                    format!("`{}` is not a key prefix", redis.prefix),
                    "use 1-64 characters of [A-Za-z0-9_.:-], e.g. pushgate",
                );
            }
            for (key, value) in [
                ("engine.redis.connect_timeout", redis.connect_timeout),
                ("engine.redis.command_timeout", redis.command_timeout),
            ] {
                if value.is_zero() {
                    problem(key, "must be longer than zero".into(), "use e.g. `2s`");
                }
            }
            if redis.presence_ttl < Duration::from_secs(3) {
                problem(
                    "engine.redis.presence_ttl",
                    "must be at least 3s (entries are refreshed every third of it)".into(),
                    "use e.g. `30s`",
                );
            }
        }
        if !(1..=MAX_HISTORY_SIZE).contains(&self.history.size) {
            problem(
                "history.size",
                format!("{} is outside 1..={MAX_HISTORY_SIZE}", self.history.size),
                "use e.g. 100",
            );
        }
        if self.history.ttl.is_zero() {
            problem(
                "history.ttl",
                "must be longer than zero".into(),
                "use e.g. `10m`",
            );
        }
        if self.limits.queue_messages == 0 {
            problem(
                "limits.queue_messages",
                "must be at least 1".into(),
                "use e.g. 1000",
            );
        }
        if self.limits.queue_bytes.bytes() < 2 * max_body {
            problem(
                "limits.queue_bytes",
                format!(
                    "{} is less than twice api.max_body ({}): one large publication could cut off every subscriber",
                    self.limits.queue_bytes, api.max_body
                ),
                &format!("raise it to at least {}", ByteSize(2 * max_body)),
            );
        }

        let realtime = &self.realtime;
        let prefix_ok = realtime.prefix.starts_with('/')
            && realtime.prefix.len() > 1
            && !realtime.prefix.ends_with('/')
            && realtime
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.'));
        if !prefix_ok {
            problem(
                "realtime.prefix",
                format!("`{}` is not a path prefix", realtime.prefix),
                "write a path such as /realtime: a leading slash, no trailing one",
            );
        }
        for (index, origin) in realtime.allowed_origins.iter().enumerate() {
            if let Err(why) = crate::transport::OriginPattern::parse(origin) {
                problem(
                    &format!("realtime.allowed_origins[{index}]"),
                    why,
                    "write scheme://host[:port], scheme://*.domain, or *",
                );
            }
        }
        for (key, value, max) in [
            ("realtime.max_channels", realtime.max_channels, 200),
            (
                "realtime.max_connections_per_ip",
                realtime.max_connections_per_ip,
                usize::MAX,
            ),
            (
                "realtime.commands_per_second",
                realtime.commands_per_second as usize,
                100_000,
            ),
            (
                "realtime.command_burst",
                realtime.command_burst as usize,
                100_000,
            ),
        ] {
            if !(1..=max).contains(&value) {
                problem(
                    key,
                    format!("{value} is outside 1..={max}"),
                    "see config.example.yaml for the default",
                );
            }
        }
        if realtime.coalesce_window > MAX_COALESCE_WINDOW {
            problem(
                "realtime.coalesce_window",
                format!(
                    "{} is longer than {}",
                    humantime::format_duration(realtime.coalesce_window),
                    humantime::format_duration(MAX_COALESCE_WINDOW)
                ),
                "use e.g. 10ms, or 0s to write every message at once",
            );
        }
        let ws = &realtime.websocket;
        if !(128..=64 << 20).contains(&ws.max_message_size.bytes()) {
            problem(
                "realtime.websocket.max_message_size",
                format!("{} is outside 128..=64MiB", ws.max_message_size),
                "use e.g. 64KiB",
            );
        }
        if ws.read_buffer_size.bytes() < 256 || ws.read_buffer_size.bytes() > 16 << 20 {
            problem(
                "realtime.websocket.read_buffer_size",
                format!("{} is outside 256..=16MiB", ws.read_buffer_size),
                "use e.g. 4KiB",
            );
        }
        if ws.max_write_buffer_size <= ws.write_buffer_size
            || ws.max_write_buffer_size.bytes() < 2 * max_body
        {
            problem(
                "realtime.websocket.max_write_buffer_size",
                format!(
                    "must be above write_buffer_size and at least twice api.max_body ({})",
                    ByteSize(2 * max_body)
                ),
                "use e.g. 8MiB",
            );
        }
        for (key, value) in [
            ("realtime.websocket.ping_interval", ws.ping_interval),
            ("realtime.websocket.ping_timeout", ws.ping_timeout),
            ("realtime.sse.keepalive", realtime.sse.keepalive),
            ("realtime.poll.max_timeout", realtime.poll.max_timeout),
        ] {
            if value.is_zero() {
                problem(
                    key,
                    "must be longer than zero".into(),
                    "see config.example.yaml for the default",
                );
            }
        }
        if realtime.poll.default_timeout > realtime.poll.max_timeout {
            problem(
                "realtime.poll.default_timeout",
                "is longer than realtime.poll.max_timeout".into(),
                "make it at most max_timeout",
            );
        }
        let upstream_auth = &self.auth.upstream;
        for (key, path) in [
            ("auth.upstream.path", Some(&upstream_auth.path)),
            (
                "auth.upstream.refresh_path",
                upstream_auth.refresh_path.as_ref(),
            ),
            (
                "auth.upstream.subscribe_path",
                upstream_auth.subscribe_path.as_ref(),
            ),
        ] {
            let Some(path) = path else { continue };
            let valid = path.starts_with('/')
                && path.parse::<http::uri::PathAndQuery>().is_ok()
                && !path.contains(['?', '#']);
            if !valid {
                problem(
                    key,
                    format!("`{path}` is not a path"),
                    "write an endpoint of the app as a path, e.g. /realtime/auth",
                );
            }
        }
        for (index, name) in upstream_auth.forward_headers.iter().enumerate() {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                problem(
                    &format!("auth.upstream.forward_headers[{index}]"),
                    format!("`{name}` is not a header name"),
                    "list header names such as cookie or authorization",
                );
            }
        }
        if upstream_auth.timeout.is_zero() {
            problem(
                "auth.upstream.timeout",
                "must be longer than zero".into(),
                "use e.g. `5s`",
            );
        }
        if upstream_auth.cache_size == 0 {
            problem(
                "auth.upstream.cache_size",
                "must be at least 1 (turn caching off with cache_ttl: 0s)".into(),
                "use e.g. 10000",
            );
        }
        if self.auth.mode == AuthMode::Jwt {
            if let Err(err) = crate::auth::JwtKeys::load(&self.auth.jwt) {
                problem(err.key, err.why, &err.fix);
            }
        }
        if self.auth.mode == AuthMode::None && !self.listen.ip().is_loopback() {
            problem(
                "auth.mode",
                format!(
                    "`none` lets anyone hear every channel, and `listen` ({}) is not loopback",
                    self.listen
                ),
                "use auth.mode: upstream (the app says who may hear what), or listen on 127.0.0.1",
            );
        }

        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            problem(
                "log.level",
                format!("`{}` is not a log filter: {err}", self.log.level),
                "use error, warn, info, debug or trace, or directives like pushgate=debug,hyper=info",
            );
        }
        problems
    }

    /// The trusted proxy networks, parsed. Call after validation.
    pub fn trusted_proxies(&self) -> Vec<ipnet::IpNet> {
        self.upstream
            .trusted_proxies
            .iter()
            .filter_map(|entry| parse_network(entry))
            .collect()
    }
}

impl Config {
    /// `upstream.untrusted_headers` as field names (validated).
    pub fn untrusted_headers(&self) -> Vec<http::HeaderName> {
        self.upstream
            .untrusted_headers
            .iter()
            .filter_map(|name| http::HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect()
    }
}

fn parse_network(text: &str) -> Option<ipnet::IpNet> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_ENV: [(&str, &str); 0] = [];
    /// What every valid config needs beyond the defaults.
    const KEYS: &str = "api:\n  keys: [k]\n";

    fn keys(err: &ConfigError) -> Vec<&str> {
        err.problems.iter().map(|p| p.key.as_str()).collect()
    }

    #[test]
    fn empty_file_gives_defaults() {
        let config = from_yaml(KEYS, "test.yaml", NO_ENV).unwrap();
        assert_eq!(config.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(config.upstream.timeout, DEFAULT_UPSTREAM_TIMEOUT);
        assert_eq!(config.limits.max_header_bytes, DEFAULT_MAX_HEADER_BYTES);
        assert_eq!(config.log.format, LogFormat::Text);
    }

    #[test]
    fn durations_and_sizes_read_the_human_way() {
        let config = from_yaml(
            &format!("{KEYS}upstream: {{timeout: 2s}}\nshutdown: {{grace: 1m 30s}}\nlimits: {{max_header_bytes: 64KiB, header_timeout: 500ms}}\n"),
            "test.yaml",
            NO_ENV,
        )
        .unwrap();
        assert_eq!(config.upstream.timeout, Duration::from_secs(2));
        assert_eq!(config.shutdown.grace, Duration::from_secs(90));
        assert_eq!(config.limits.max_header_bytes, ByteSize(64 * 1024));
        assert_eq!(config.limits.header_timeout, Duration::from_millis(500));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = from_yaml(
            "listen: nowhere\nbogus: 1\nupstream: {timeout: 10, colour: red, url: 'https://app'}\nlimits: {max_header_bytes: huge}\nlog: {format: xml}\n",
            "bad.yaml",
            NO_ENV,
        )
        .unwrap_err();
        let mut found = keys(&err);
        found.sort();
        assert_eq!(
            found,
            [
                "api.keys",
                "bogus",
                "limits.max_header_bytes",
                "listen",
                "log.format",
                "upstream.colour",
                "upstream.timeout",
                "upstream.url"
            ]
        );
        let text = err.to_string();
        assert!(text.contains("bad.yaml: `bogus`: unknown key"), "{text}");
        assert!(text.contains("bare number `10`"), "{text}");
        assert!(text.contains("fix:"), "{text}");
    }

    #[test]
    fn semantic_problems_name_key_and_fix() {
        let err = from_yaml(
            "upstream: {url: 'ftp://app', timeout: 0s, trusted_proxies: [10.0.0.0/8, nope]}\ntls: {cert: /nonexistent/cert.pem}\nlimits: {max_header_bytes: 1KiB}\nlog: {level: 'a=b=c'}\n",
            "bad.yaml",
            NO_ENV,
        )
        .unwrap_err();
        let mut found = keys(&err);
        found.sort();
        assert_eq!(
            found,
            [
                "api.keys",
                "limits.max_header_bytes",
                "log.level",
                "tls.key",
                "upstream.timeout",
                "upstream.trusted_proxies[1]",
                "upstream.url"
            ]
        );
    }

    #[test]
    fn environment_overrides_reach_their_keys() {
        let env = [
            ("PUSHGATE_LISTEN", "127.0.0.1:9999"),
            ("PUSHGATE_UPSTREAM__TIMEOUT", "3s"),
            (
                "PUSHGATE_UPSTREAM__TRUSTED_PROXIES",
                "10.0.0.0/8, 192.168.1.1",
            ),
            ("PUSHGATE_LIMITS__MAX_HEADERS", "50"),
            ("PUSHGATE_LOG__FORMAT", "json"),
            ("HOME", "/root"),
        ];
        let config = from_yaml(
            &format!("{KEYS}upstream: {{timeout: 9s}}\n"),
            "test.yaml",
            env,
        )
        .unwrap();
        assert_eq!(config.listen, "127.0.0.1:9999".parse().unwrap());
        assert_eq!(config.upstream.timeout, Duration::from_secs(3));
        assert_eq!(
            config.upstream.trusted_proxies,
            ["10.0.0.0/8", "192.168.1.1"]
        );
        assert_eq!(config.limits.max_headers, 50);
        assert_eq!(config.log.format, LogFormat::Json);
    }

    #[test]
    fn the_jwt_audience_and_issuer_come_from_the_file_or_the_environment() {
        let jwt = "auth:\n  mode: jwt\n  jwt:\n    secret: an-hs256-secret-of-at-least-32-bytes!\n";
        let config = from_yaml(&format!("{KEYS}{jwt}"), "test.yaml", NO_ENV).unwrap();
        assert_eq!(config.auth.jwt.audience, None);
        assert_eq!(config.auth.jwt.issuer, None);
        let config = from_yaml(
            &format!("{KEYS}{jwt}    audience: pushgate\n    issuer: https://id.example\n"),
            "test.yaml",
            NO_ENV,
        )
        .unwrap();
        assert_eq!(config.auth.jwt.audience.as_deref(), Some("pushgate"));
        assert_eq!(
            config.auth.jwt.issuer.as_deref(),
            Some("https://id.example")
        );
        // The environment wins, and keeps a value that looks like a number
        // as text.
        let env = [
            ("PUSHGATE_AUTH__JWT__AUDIENCE", "12345"),
            ("PUSHGATE_AUTH__JWT__ISSUER", "https://other.example"),
        ];
        let config = from_yaml(
            &format!("{KEYS}{jwt}    audience: pushgate\n"),
            "test.yaml",
            env,
        )
        .unwrap();
        assert_eq!(config.auth.jwt.audience.as_deref(), Some("12345"));
        assert_eq!(
            config.auth.jwt.issuer.as_deref(),
            Some("https://other.example")
        );
        // An empty value could match no token: a problem with the key.
        let err = from_yaml(
            &format!("{KEYS}{jwt}    audience: \"\"\n"),
            "test.yaml",
            NO_ENV,
        )
        .unwrap_err();
        assert_eq!(keys(&err), ["auth.jwt.audience"]);
    }

    #[test]
    fn environment_problems_name_the_variable() {
        let env = [
            ("PUSHGATE_NOPE", "1"),
            ("PUSHGATE_LIMITS__MAX_HEADERS", "many"),
        ];
        let err = from_yaml("", "test.yaml", env).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("environment PUSHGATE_NOPE: `nope`: no such configuration key"),
            "{text}"
        );
        assert!(
            text.contains("environment PUSHGATE_LIMITS__MAX_HEADERS: `limits.max_headers`"),
            "{text}"
        );
    }

    #[test]
    fn bad_yaml_and_wrong_top_level_are_reported() {
        assert!(from_yaml("listen: [", "x.yaml", NO_ENV)
            .unwrap_err()
            .to_string()
            .contains("not valid YAML"));
        assert!(from_yaml("- 1\n- 2\n", "x.yaml", NO_ENV)
            .unwrap_err()
            .to_string()
            .contains("mapping"));
    }

    /// config.example.yaml documents every key, with its default value.
    #[test]
    fn the_example_config_has_every_key_at_its_default() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let example: Value = serde_yaml::from_str(&text).unwrap();
        let defaults = serde_yaml::to_value(Config::default()).unwrap();

        fn leaves(value: &Value, path: String, out: &mut Vec<String>) {
            match value {
                Value::Mapping(map) => {
                    for (key, child) in map {
                        let key = key.as_str().unwrap();
                        let child_path = if path.is_empty() {
                            key.to_owned()
                        } else {
                            format!("{path}.{key}")
                        };
                        leaves(child, child_path, out);
                    }
                }
                _ => out.push(path),
            }
        }
        let (mut documented, mut known) = (Vec::new(), Vec::new());
        leaves(&example, String::new(), &mut documented);
        leaves(&defaults, String::new(), &mut known);
        documented.sort();
        known.sort();
        assert_eq!(
            documented, known,
            "config.example.yaml and the config structs disagree"
        );

        let mut loaded = load(Path::new(path), NO_ENV).unwrap();
        // The values that are not defaults, so the example runs as it is in
        // front of any local app: there is no default key, and the default
        // auth mode asks an app that may not answer auth requests.
        assert_eq!(loaded.api.keys, ["change-me"]);
        loaded.api.keys.clear();
        assert_eq!(loaded.auth.mode, AuthMode::None);
        loaded.auth.mode = AuthMode::Upstream;
        assert_eq!(
            serde_yaml::to_value(loaded).unwrap(),
            defaults,
            "config.example.yaml shows a value that is not the default"
        );
    }

    #[test]
    fn absurd_durations_are_refused() {
        let err = from_yaml(
            &format!("{KEYS}shutdown: {{grace: 500000000years}}\n"),
            "test.yaml",
            NO_ENV,
        )
        .unwrap_err();
        assert_eq!(keys(&err), ["shutdown.grace"]);
    }

    #[test]
    fn byte_sizes_parse_and_print() {
        assert_eq!(ByteSize::parse("32KiB"), Some(ByteSize(32768)));
        assert_eq!(ByteSize::parse("4MiB"), Some(ByteSize(4 << 20)));
        assert_eq!(ByteSize::parse("1000"), Some(ByteSize(1000)));
        assert_eq!(ByteSize::parse("2 KB"), Some(ByteSize(2000)));
        assert_eq!(ByteSize::parse("99999999999999999999GiB"), None);
        assert_eq!(ByteSize::parse("lots"), None);
        assert_eq!(ByteSize(32768).to_string(), "32KiB");
        assert_eq!(ByteSize(1000).to_string(), "1000");
    }
}
