//! The checks that need the whole config.

use std::net::IpAddr;
use std::time::Duration;

use super::*;

impl Config {
    /// Checks that needs the whole config: each problem names the key and the
    /// fix. An empty list means the config is good.
    pub fn validate(&self) -> Vec<Problem> {
        self.validate_at("config")
    }

    pub(super) fn validate_at(&self, origin: &str) -> Vec<Problem> {
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
