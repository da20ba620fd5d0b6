use std::path::Path;

use serde_yaml::Value;

use super::*;

const NO_ENV: [(&str, &str); 0] = [];
/// What every valid config needs beyond the defaults.
const KEYS: &str = "api:\n  keys: [k]\n";

fn keys(err: &ConfigError) -> Vec<&str> {
    err.problems.iter().map(|p| p.key.as_str()).collect()
}

#[test]
fn empty_file_gives_defaults() {
    let config = from_yaml(KEYS, "test.yaml", NO_ENV).unwrap().config;
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
    .unwrap().config;
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
    .unwrap()
    .config;
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
    let config = from_yaml(&format!("{KEYS}{jwt}"), "test.yaml", NO_ENV)
        .unwrap()
        .config;
    assert_eq!(config.auth.jwt.audience, None);
    assert_eq!(config.auth.jwt.issuer, None);
    let config = from_yaml(
        &format!("{KEYS}{jwt}    audience: pushgate\n    issuer: https://id.example\n"),
        "test.yaml",
        NO_ENV,
    )
    .unwrap()
    .config;
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
    .unwrap()
    .config;
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

    let mut loaded = load(Path::new(path), NO_ENV).unwrap().config;
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
fn the_unsent_bound_is_checked_and_zero_means_the_kernels_own() {
    let load = |value: &str| {
        from_yaml(
            &format!("{KEYS}limits: {{unsent_bytes: {value}}}\n"),
            "test.yaml",
            NO_ENV,
        )
    };
    assert_eq!(
        load("16KiB").unwrap().config.limits.unsent_bound(),
        Some(16384)
    );
    assert_eq!(
        load("64MiB").unwrap().config.limits.unsent_bound(),
        Some(64 << 20)
    );
    assert_eq!(load("0").unwrap().config.limits.unsent_bound(), None);
    for refused in ["65MiB", "99999GiB"] {
        let err = load(refused).unwrap_err();
        assert_eq!(keys(&err), ["limits.unsent_bytes"], "{refused}");
    }
    // Unchecked (a config built in code), it saturates rather than wraps.
    let limits = LimitsConfig {
        unsent_bytes: ByteSize(1 << 40),
        ..LimitsConfig::default()
    };
    assert_eq!(limits.unsent_bound(), Some(u32::MAX));
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

#[test]
fn waiting_for_replicas_must_end_before_redis_counts_as_down() {
    let redis = |extra: &str| {
        format!("{KEYS}engine:\n  kind: redis\n  redis:\n    command_timeout: 2s\n{extra}")
    };
    let ok = from_yaml(
        &redis("    wait_replicas: 1\n    wait_timeout: 500ms\n"),
        "test.yaml",
        NO_ENV,
    )
    .unwrap()
    .config;
    assert_eq!(ok.engine.redis.wait_replicas, 1);
    assert_eq!(ok.engine.redis.wait_timeout, Duration::from_millis(500));
    for extra in [
        "    wait_replicas: 1\n    wait_timeout: 2s\n",
        "    wait_replicas: 2\n    wait_timeout: 5s\n",
        "    wait_timeout: 0s\n",
    ] {
        let err = from_yaml(&redis(extra), "test.yaml", NO_ENV).unwrap_err();
        assert_eq!(keys(&err), ["engine.redis.wait_timeout"], "{extra}");
    }
    // Not waiting, a long wait_timeout is no problem.
    assert!(from_yaml(&redis("    wait_timeout: 5s\n"), "test.yaml", NO_ENV).is_ok());
}

#[test]
fn the_apps_own_endpoints_are_recognised_in_every_spelling() {
    let settings = from_yaml(
        &format!("{KEYS}rpc:\n  path: /internal/rpc\n  publish_path: /hooks/Publish\n"),
        "test.yaml",
        NO_ENV,
    )
    .unwrap();
    let paths = &settings.rpc;
    for path in [
        "/internal/rpc",
        "/internal/rpc/",
        "//internal///rpc//",
        "/Internal/RPC",
        "/./internal/./rpc",
        "/internal/%72%70%63",
        "/internal%2frpc",
        "/internal/%2572pc",
        "/hooks/publish",
        "/HOOKS/%50ublish/",
    ] {
        assert!(paths.is_app_only(path), "{path}");
    }
    for path in [
        "/",
        "/internal",
        "/internal/rpcs",
        "/internal/rpc/x",
        "/internal/rp",
        "/x/internal/rpc",
        "/hooks/publish2",
        "/internal/rpc%00",
    ] {
        assert!(!paths.is_app_only(path), "{path}");
    }
    let none = from_yaml(KEYS, "test.yaml", NO_ENV).unwrap();
    assert!(!none.rpc.is_app_only("/internal/rpc"));
}

#[test]
fn a_via_app_channel_needs_the_apps_endpoint() {
    let err = from_yaml(
        &format!("{KEYS}channels:\n  - prefix: \"m:\"\n    publish: via_app\nrpc:\n  max_in_flight: 0\n  timeout: 0s\n"),
        "test.yaml",
        NO_ENV,
    )
    .unwrap_err();
    let mut found = keys(&err);
    found.sort();
    assert_eq!(
        found,
        ["channels[0].publish", "rpc.max_in_flight", "rpc.timeout"]
    );
    let err = from_yaml(
        &format!("{KEYS}rpc:\n  path: internal/rpc\n"),
        "test.yaml",
        NO_ENV,
    )
    .unwrap_err();
    assert_eq!(keys(&err), ["rpc.path"]);
}

#[test]
fn events_need_a_long_secret_which_may_come_from_the_environment() {
    // Off by default.
    let settings = from_yaml(KEYS, "test.yaml", NO_ENV).unwrap();
    assert!(settings.events.is_none());

    // On without a secret, or with a short one: refused, naming the key.
    let on = format!("{KEYS}events: {{path: /realtime/events}}\n");
    let err = from_yaml(&on, "test.yaml", NO_ENV).unwrap_err();
    assert_eq!(keys(&err), ["events.secret"]);
    assert!(err.problems[0].fix.contains("PUSHGATE_EVENTS__SECRET"));
    let short = [("PUSHGATE_EVENTS__SECRET", "too-short")];
    let err = from_yaml(&on, "test.yaml", short).unwrap_err();
    assert_eq!(keys(&err), ["events.secret"]);
    assert_eq!(
        err.problems[0].origin,
        "environment PUSHGATE_EVENTS__SECRET"
    );

    let secret = "0123456789abcdef0123456789abcdef";
    let settings = from_yaml(&on, "test.yaml", [("PUSHGATE_EVENTS__SECRET", secret)]).unwrap();
    assert_eq!(
        settings.events.as_ref().unwrap().path.as_str(),
        "/realtime/events"
    );
    assert_eq!(settings.config.events.secret.as_deref(), Some(secret));
    assert!(
        !format!("{settings:?}").contains(secret),
        "the secret stays out of logs"
    );

    // Every other bad value at once, each with its key.
    let bad = format!(
        "{KEYS}events: {{path: 'no-slash', secret: '{secret}', batch_size: 0, queue: 0, interval: 0s, timeout: 0s, kinds: []}}\n"
    );
    let err = from_yaml(&bad, "test.yaml", NO_ENV).unwrap_err();
    let mut found = keys(&err);
    found.sort();
    assert_eq!(
        found,
        [
            "events.batch_size",
            "events.interval",
            "events.kinds",
            "events.path",
            "events.timeout"
        ]
    );
    let kinds = [("PUSHGATE_EVENTS__KINDS", "connect,disconnect")];
    let settings = from_yaml(
        &format!("{KEYS}events: {{path: /e, secret: '{secret}'}}\n"),
        "test.yaml",
        kinds,
    )
    .unwrap();
    assert_eq!(
        settings.config.events.kinds,
        [EventKind::Connect, EventKind::Disconnect]
    );
}

#[test]
fn pusher_apps_are_checked_and_their_secrets_may_come_from_the_environment() {
    let apps = "pusher:\n  apps:\n    - {id: \"1\", key: k1, secret_env: APP_SECRET, client_events: true}\n    - {id: \"2\", key: k2, secret: second-secret}\n";
    let settings = from_yaml(
        &format!("{KEYS}{apps}"),
        "test.yaml",
        [("APP_SECRET", "from-the-environment")],
    )
    .unwrap();
    let secrets: Vec<&str> = settings.pusher.iter().map(|a| a.secret.as_str()).collect();
    assert_eq!(secrets, ["from-the-environment", "second-secret"]);
    assert!(settings.pusher[0].client_events);
    // The secret never reaches a log line.
    assert!(!format!("{:?}", settings.config.pusher).contains("second-secret"));

    let err = from_yaml(&format!("{KEYS}{apps}"), "test.yaml", NO_ENV).unwrap_err();
    assert_eq!(keys(&err), ["pusher.apps[0].secret_env"]);

    let bad = "pusher:\n  apps:\n    - {id: \"1\", key: k, secret: s1234567, secret_env: X}\n    - {id: \"1\", key: k, secret: short}\n    - {id: \"a/b\", key: \"\", secret: s1234567}\n    - {id: \"4\", key: k4}\n  max_presence_members: 0\n  client_events_per_second: 0\n";
    let err = from_yaml(&format!("{KEYS}{bad}"), "test.yaml", [("X", "y")]).unwrap_err();
    let mut found = keys(&err);
    found.sort_unstable();
    assert_eq!(
        found,
        [
            "pusher.apps[0].secret_env",
            "pusher.apps[1].id",
            "pusher.apps[1].key",
            "pusher.apps[1].secret",
            "pusher.apps[2].id",
            "pusher.apps[2].key",
            "pusher.apps[3].secret",
            "pusher.client_events_per_second",
            "pusher.max_presence_members",
        ]
    );
    // Serving Pusher's API only, a node needs no api.keys.
    let pusher_only = "pusher:\n  apps:\n    - {id: \"1\", key: k, secret: s1234567}\n";
    let settings = from_yaml(pusher_only, "test.yaml", NO_ENV).unwrap();
    assert!(settings.config.api.keys.is_empty());
    assert!(
        from_yaml("", "test.yaml", NO_ENV).is_err(),
        "without Pusher apps it does"
    );
    // Unknown keys in an app are refused by name.
    let err = from_yaml(
        &format!(
            "{KEYS}pusher:\n  apps:\n    - {{id: \"1\", key: k, secret: s1234567, webhok: x}}\n"
        ),
        "test.yaml",
        NO_ENV,
    )
    .unwrap_err();
    assert!(err.to_string().contains("webhok"), "{err}");
}
