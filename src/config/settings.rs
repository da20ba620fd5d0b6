//! Settings: the config checked as a whole, and every value in it that
//! needs parsing, parsed once. The rest of pushgate runs on [`Settings`]
//! and never parses a config string again.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::uri::PathAndQuery;
use http::HeaderName;
use ipnet::IpNet;
use tracing_subscriber::filter::Directive;

use super::jwt::JwtKey;
use super::*;

/// Ceiling of `rpc.max_in_flight`: each call waiting holds a connection to
/// the app.
const MAX_RPC_IN_FLIGHT: usize = 1000;

/// What a node runs on. Made only by [`Settings::new`] (or by loading a
/// file), so holding one means the config passed every check.
pub struct Settings {
    /// The document: the plain values (addresses, numbers, flags,
    /// durations, sizes), as checked.
    pub config: Config,
    /// `upstream.url`.
    pub upstream: Upstream,
    /// `upstream.trusted_proxies`.
    pub trusted_proxies: Vec<IpNet>,
    /// `upstream.untrusted_headers`.
    pub untrusted_headers: Vec<HeaderName>,
    /// `tls.cert` and `tls.key`, loaded; `None` serves plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// `realtime.allowed_origins`.
    pub allowed_origins: Vec<OriginPattern>,
    /// `auth.mode` with what it needs.
    pub auth: AuthSettings,
    /// `auth.upstream.forward_headers`.
    pub forward_headers: Vec<HeaderName>,
    /// `log.level`.
    pub log_directives: Vec<Directive>,
    /// `engine.redis.tls_ca_file`'s certificates (PEM), read once.
    pub redis_ca: Option<Vec<u8>>,
    /// `rpc.path` and `rpc.publish_path`.
    pub rpc: RpcPaths,
    /// `events`, when `events.path` is set.
    pub events: Option<EventsSettings>,
    /// `pusher.apps`, each with its secret.
    pub pusher: Vec<PusherAppSettings>,
}

/// The app's endpoints for calls from clients. Only pushgate calls them:
/// the proxy answers a client's own request for either with 404.
#[derive(Debug, Clone, Default)]
pub struct RpcPaths {
    /// `rpc.path`: `rpc` commands; none turns them off.
    pub call: Option<PathAndQuery>,
    /// `rpc.publish_path`: publishes on `publish: via_app` channels.
    pub publish: Option<PathAndQuery>,
    /// Both, folded once ([`fold_path`]).
    folded: Vec<Vec<u8>>,
}

impl RpcPaths {
    pub fn new(call: Option<PathAndQuery>, publish: Option<PathAndQuery>) -> RpcPaths {
        let folded = [&call, &publish]
            .into_iter()
            .flatten()
            .map(|endpoint| fold_path(endpoint.path()))
            .collect();
        RpcPaths {
            call,
            publish,
            folded,
        }
    }

    /// Whether a client's request for `path` is for one of these, in any
    /// spelling an app's router may read as it: compared folded. Without
    /// either (the common case) nothing is folded.
    pub fn is_app_only(&self, path: &str) -> bool {
        if self.folded.is_empty() {
            return false;
        }
        let path = fold_path(path);
        self.folded.contains(&path)
    }
}

/// A path as the most lenient router reads it: percent-decoded (until
/// nothing more decodes, so `%252F` too), ASCII lowercase, with runs of `/`,
/// `/./` segments and a trailing `/` folded away.
fn fold_path(path: &str) -> Vec<u8> {
    let mut bytes = path.as_bytes().to_vec();
    for _ in 0..4 {
        let decoded: Vec<u8> = percent_encoding::percent_decode(&bytes).collect();
        if decoded == bytes {
            break;
        }
        bytes = decoded;
    }
    let mut folded = Vec::with_capacity(bytes.len() + 1);
    for segment in bytes.split(|&b| b == b'/') {
        if segment.is_empty() || segment == b"." {
            continue;
        }
        folded.push(b'/');
        folded.extend(segment.iter().map(u8::to_ascii_lowercase));
    }
    folded
}

/// How realtime connections are authorized (`auth.mode`).
pub enum AuthSettings {
    None,
    /// The app says, at these endpoints.
    Upstream(AuthPaths),
    /// A JWT, verified with this key.
    Jwt(JwtKey),
}

/// `auth.upstream.path`, `refresh_path` and `subscribe_path`.
#[derive(Debug, Clone)]
pub struct AuthPaths {
    pub check: PathAndQuery,
    pub refresh: Option<PathAndQuery>,
    pub subscribe: Option<PathAndQuery>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The document says it all; the parsed values are its parts, and
        // keys have no business in a log line.
        f.debug_struct("Settings")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// Checks `config` as a whole and parses what needs parsing. The error
    /// lists every problem, each with its key and fix.
    pub fn new(config: Config) -> Result<Settings, ConfigError> {
        Settings::check(config, "config").map_err(|problems| ConfigError { problems })
    }

    /// Like [`Settings::new`]; `origin` names where the config came from.
    pub(super) fn check(config: Config, origin: &str) -> Result<Settings, Vec<Problem>> {
        let parsed = config.parse(origin);
        let auth = match config.auth.mode {
            AuthMode::None => Some(AuthSettings::None),
            AuthMode::Upstream => parsed.auth_paths.clone().map(AuthSettings::Upstream),
            AuthMode::Jwt => parsed.jwt.clone().map(AuthSettings::Jwt),
        };
        let Parsed {
            problems,
            upstream,
            trusted_proxies,
            untrusted_headers,
            tls,
            allowed_origins,
            redis_ca,
            auth_paths: _,
            forward_headers,
            jwt: _,
            log_directives,
            rpc,
            events,
            pusher,
        } = parsed;
        match (upstream, auth, log_directives) {
            (Some(upstream), Some(auth), Some(log_directives)) if problems.is_empty() => {
                Ok(Settings {
                    config,
                    upstream,
                    trusted_proxies,
                    untrusted_headers,
                    tls,
                    allowed_origins,
                    auth,
                    forward_headers,
                    log_directives,
                    redis_ca,
                    rpc,
                    events,
                    pusher,
                })
            }
            // A value that did not parse left a problem behind.
            _ => {
                debug_assert!(!problems.is_empty(), "a value failed without a problem");
                Err(problems)
            }
        }
    }
}

/// What one pass over the config found: its problems, and the values that
/// parsed (`None` where one did not).
struct Parsed {
    problems: Vec<Problem>,
    upstream: Option<Upstream>,
    trusted_proxies: Vec<IpNet>,
    untrusted_headers: Vec<HeaderName>,
    tls: Option<Arc<rustls::ServerConfig>>,
    allowed_origins: Vec<OriginPattern>,
    redis_ca: Option<Vec<u8>>,
    auth_paths: Option<AuthPaths>,
    forward_headers: Vec<HeaderName>,
    /// Loaded only when `auth.mode` is `jwt`.
    jwt: Option<JwtKey>,
    log_directives: Option<Vec<Directive>>,
    rpc: RpcPaths,
    events: Option<EventsSettings>,
    pusher: Vec<PusherAppSettings>,
}

impl Config {
    fn parse(&self, origin: &str) -> Parsed {
        let mut problems = Vec::new();
        let mut problem = |key: &str, why: String, fix: &str| {
            problems.push(Problem {
                origin: origin.to_owned(),
                key: key.to_owned(),
                why,
                fix: fix.to_owned(),
            })
        };

        let upstream = match Upstream::parse(&self.upstream.url) {
            Ok(upstream) => Some(upstream),
            Err(why) => {
                problem(
                    "upstream.url",
                    why,
                    "write the app's address as http://host:port, e.g. http://127.0.0.1:3000",
                );
                None
            }
        };
        if self.upstream.timeout.is_zero() {
            problem(
                "upstream.timeout",
                "must be longer than zero".into(),
                "use e.g. `30s`",
            );
        }
        let mut trusted_proxies = Vec::new();
        for (index, entry) in self.upstream.trusted_proxies.iter().enumerate() {
            match parse_network(entry) {
                Some(network) => trusted_proxies.push(network),
                None => problem(
                    &format!("upstream.trusted_proxies[{index}]"),
                    format!("`{entry}` is not an IP address or CIDR network"),
                    "write an address such as 10.0.0.1 or a network such as 10.0.0.0/8",
                ),
            }
        }

        let mut untrusted_headers = Vec::new();
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
                Ok(field) => untrusted_headers.push(field),
            }
        }

        let mut tls = None;
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
            (Some(cert), Some(key)) => match super::tls::server_config(cert, key) {
                Ok(config) => tls = Some(config),
                Err(err) => problem(err.key(), err.to_string(), err.fix()),
            },
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

        if self.limits.unsent_bytes > MAX_UNSENT_BYTES {
            problem(
                "limits.unsent_bytes",
                format!(
                    "{} is more than {MAX_UNSENT_BYTES}",
                    self.limits.unsent_bytes
                ),
                "use e.g. `16KiB`, or 0 for the kernel's default",
            );
        }
        if self.limits.body_timeout.is_zero() {
            problem(
                "limits.body_timeout",
                "must be longer than zero".into(),
                "use e.g. `60s`",
            );
        }
        let api = &self.api;
        // An app that only speaks Pusher's API (signed with its own
        // secrets) needs no key: then `/api/...` refuses every request.
        if api.keys.is_empty() && !api.insecure_no_auth && self.pusher.apps.is_empty() {
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
        let mut redis_ca = None;
        if self.engine.kind == EngineKind::Redis {
            let redis = &self.engine.redis;
            if let Err(why) = super::redis::parse_url(&redis.url) {
                problem(
                    "engine.redis.url",
                    why,
                    "write redis://[user:password@]host:port[/db] or rediss://… for TLS",
                );
            }
            if redis.cluster && super::redis::url_database(&redis.url).is_some_and(|db| db != 0) {
                problem(
                    "engine.redis.cluster",
                    "a Redis Cluster has only database 0".into(),
                    "drop the database number from engine.redis.url",
                );
            }
            if let Some(file) = &redis.tls_ca_file {
                match super::redis::read_ca_file(file) {
                    Ok(pem) => redis_ca = Some(pem),
                    Err(why) => problem(
                        "engine.redis.tls_ca_file",
                        why,
                        "give a readable PEM file holding one or more CA certificates",
                    ),
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
            if redis.wait_timeout.is_zero() {
                problem(
                    "engine.redis.wait_timeout",
                    "must be longer than zero (Redis would wait forever)".into(),
                    "use e.g. `1s`",
                );
            } else if redis.wait_replicas > 0 && redis.wait_timeout >= redis.command_timeout {
                problem(
                    "engine.redis.wait_timeout",
                    format!(
                        "{:?} is not shorter than engine.redis.command_timeout ({:?}): a publish \
                         waiting for its replicas would count Redis as down",
                        redis.wait_timeout, redis.command_timeout
                    ),
                    "make wait_timeout shorter than command_timeout, e.g. 1s and 2s",
                );
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
        let mut allowed_origins = Vec::new();
        for (index, origin) in realtime.allowed_origins.iter().enumerate() {
            match OriginPattern::parse(origin) {
                Ok(pattern) => allowed_origins.push(pattern),
                Err(why) => problem(
                    &format!("realtime.allowed_origins[{index}]"),
                    why,
                    "write scheme://host[:port], scheme://*.domain, or *",
                ),
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
            (
                "realtime.publishes_per_second",
                realtime.publishes_per_second as usize,
                100_000,
            ),
            (
                "realtime.publish_burst",
                realtime.publish_burst as usize,
                100_000,
            ),
            (
                "realtime.connects_per_second",
                realtime.connects_per_second as usize,
                1_000_000,
            ),
            (
                "realtime.connect_burst",
                realtime.connect_burst as usize,
                1_000_000,
            ),
            (
                "api.publishes_per_second",
                self.api.publishes_per_second as usize,
                10_000_000,
            ),
            (
                "api.publish_burst",
                self.api.publish_burst as usize,
                10_000_000,
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
        if self.api.backpressure.max_wait > MAX_BACKPRESSURE_WAIT {
            problem(
                "api.backpressure.max_wait",
                format!(
                    "{} is longer than {}",
                    humantime::format_duration(self.api.backpressure.max_wait),
                    humantime::format_duration(MAX_BACKPRESSURE_WAIT)
                ),
                "publishers' own timeouts are shorter; use e.g. 2s, or 0s to refuse at once",
            );
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
        let mut auth_path = |key: &str, path: &str| {
            let parsed = path
                .parse::<PathAndQuery>()
                .ok()
                .filter(|_| path.starts_with('/') && !path.contains(['?', '#']));
            if parsed.is_none() {
                problem(
                    key,
                    format!("`{path}` is not a path"),
                    "write an endpoint of the app as a path, e.g. /realtime/auth",
                );
            }
            parsed
        };
        let check = auth_path("auth.upstream.path", &upstream_auth.path);
        let refresh = upstream_auth
            .refresh_path
            .as_ref()
            .map(|path| auth_path("auth.upstream.refresh_path", path));
        let subscribe = upstream_auth
            .subscribe_path
            .as_ref()
            .map(|path| auth_path("auth.upstream.subscribe_path", path));
        // `Some(None)` is an optional path given and bad.
        let auth_paths = match (check, refresh, subscribe) {
            (Some(check), refresh, subscribe)
                if !matches!(refresh, Some(None)) && !matches!(subscribe, Some(None)) =>
            {
                Some(AuthPaths {
                    check,
                    refresh: refresh.flatten(),
                    subscribe: subscribe.flatten(),
                })
            }
            _ => None,
        };
        let rpc = RpcPaths::new(
            self.rpc
                .path
                .as_ref()
                .and_then(|path| auth_path("rpc.path", path)),
            self.rpc
                .publish_path
                .as_ref()
                .and_then(|path| auth_path("rpc.publish_path", path)),
        );
        if self.rpc.timeout.is_zero() {
            problem(
                "rpc.timeout",
                "must be longer than zero".into(),
                "use e.g. `5s`",
            );
        }
        if !(1..=MAX_RPC_IN_FLIGHT).contains(&self.rpc.max_in_flight) {
            problem(
                "rpc.max_in_flight",
                format!("must be 1 to {MAX_RPC_IN_FLIGHT}"),
                "use e.g. 8",
            );
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.rpc.max_answer.bytes()) {
            problem(
                "rpc.max_answer",
                "must be 1KiB to 16MiB".into(),
                "use e.g. 64KiB",
            );
        }
        for (index, rule) in self.channels.iter().enumerate() {
            if rule.ephemeral && rule.publish == super::ClientPublish::Off {
                problem(
                    &format!("channels[{index}].ephemeral"),
                    "applies to publishes from clients, which this rule does not allow".into(),
                    "set publish: direct (or via_app) on the rule, or drop ephemeral",
                );
            }
            if rule.publish == super::ClientPublish::ViaApp && self.rpc.publish_path.is_none() {
                problem(
                    &format!("channels[{index}].publish"),
                    "via_app needs rpc.publish_path, the app's endpoint that decides".into(),
                    "set rpc.publish_path (e.g. /realtime/publish), or use direct",
                );
            }
        }
        let mut forward_headers = Vec::new();
        for (index, name) in upstream_auth.forward_headers.iter().enumerate() {
            match HeaderName::from_bytes(name.as_bytes()) {
                Ok(field) => forward_headers.push(field),
                Err(_) => problem(
                    &format!("auth.upstream.forward_headers[{index}]"),
                    format!("`{name}` is not a header name"),
                    "list header names such as cookie or authorization",
                ),
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
        let jwt = match self.auth.mode {
            AuthMode::Jwt => match JwtKey::load(&self.auth.jwt) {
                Ok(key) => Some(key),
                Err(err) => {
                    problem(err.key, err.why, &err.fix);
                    None
                }
            },
            AuthMode::None | AuthMode::Upstream => None,
        };
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

        let events = super::events::check(&self.events, &mut problem);
        let pusher = super::pusher::check(&self.pusher, upstream.as_ref(), &mut problem);

        let log_directives = match log_directives(&self.log.level) {
            Ok(directives) => Some(directives),
            Err(err) => {
                problem(
                    "log.level",
                    format!("`{}` is not a log filter: {err}", self.log.level),
                    "use error, warn, info, debug or trace, or directives like pushgate=debug,hyper=info",
                );
                None
            }
        };
        Parsed {
            problems,
            upstream,
            trusted_proxies,
            untrusted_headers,
            tls,
            allowed_origins,
            redis_ca,
            auth_paths,
            forward_headers,
            jwt,
            log_directives,
            rpc,
            events,
            pusher,
        }
    }
}

/// `log.level`'s comma-separated directives, as `EnvFilter` reads them.
fn log_directives(level: &str) -> Result<Vec<Directive>, tracing_subscriber::filter::ParseError> {
    level
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(str::parse)
        .collect()
}

fn parse_network(text: &str) -> Option<ipnet::IpNet> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
}
