//! pushgate's Pusher Channels compatibility, checked with the real, unchanged
//! Pusher libraries against the real binary:
//!
//! - pusher-js (its Node build) as the client and Pusher's Node server SDK as
//!   the publisher: `integration/pusher/pusher_js.mjs`, one scenario per test;
//! - Pusher's Python server SDK with a raw protocol 7 WebSocket client:
//!   `integration/pusher/sdk_check.py`;
//! - Laravel Echo with its Pusher connector in headless Chromium, pushgate in
//!   front of the app that serves the page and `/broadcasting/auth`:
//!   `integration/pusher/echo.mjs`;
//!
//! and, from Rust, the refusals on the wire: request signatures on the HTTP
//! API, a private subscription with a bad signature, a client event the app
//! does not allow.
//!
//! The npm packages come from integration/browser (installed with `npm ci`
//! from its lock file when missing), the Python ones from the virtualenv
//! `common::pyenv` builds from integration/requirements.txt.

use crate::browser::{ensure_chromium, ONE_BROWSER};
use crate::common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::node::{node, node_modules, ROOT};
use common::pyenv::{python, run};
use common::redis::Redis;
use common::{ws_next_json, Process, TempDir, WsClient, PATIENCE};
use futures_util::SinkExt;
use serde_json::{json, Value};

const APP_ID: &str = "1001";
const KEY: &str = "pushgate-app-key";
const SECRET: &str = "pushgate-app-secret";
/// The second app allows no client events; its secret comes from the
/// environment (`secret_env`).
const QUIET_ID: &str = "1002";
const QUIET_KEY: &str = "quiet-app-key";
const QUIET_SECRET: &str = "quiet-app-secret";
const QUIET_SECRET_ENV: &str = "QUIET_APP_SECRET";

/// The scripts bound themselves (60 s, 120 s for Chromium); this is the backstop.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);

fn config(upstream: &str) -> String {
    config_with(upstream, "")
}

/// The config, `first_app` added to the first app's settings (lines of its own).
fn config_with(upstream: &str, first_app: &str) -> String {
    format!(
        "listen: 127.0.0.1:0
upstream:
  url: {upstream}
pusher:
  apps:
    - id: \"{APP_ID}\"
      key: \"{KEY}\"
      secret: \"{SECRET}\"
      client_events: true
{first_app}    - id: \"{QUIET_ID}\"
      key: \"{QUIET_KEY}\"
      secret_env: {QUIET_SECRET_ENV}
      client_events: false
  client_events_per_second: 10
"
    )
}

/// pushgate with both apps, in front of an app that is never reached.
fn start(scratch: &Path) -> Process {
    Process::start(
        scratch,
        &config("http://127.0.0.1:9"),
        &[(QUIET_SECRET_ENV, QUIET_SECRET)],
    )
}

/// The arguments every script takes.
fn script_args(pushgate: &Process) -> Vec<String> {
    [
        ("--public", pushgate.addr.to_string()),
        ("--api", pushgate.api_addr.to_string()),
        ("--app-id", APP_ID.into()),
        ("--key", KEY.into()),
        ("--secret", SECRET.into()),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_owned(), value])
    .collect()
}

/// Fails the test with what the script printed and pushgate's log.
fn fail(what: &str, ran: &common::pyenv::Ran, pushgate: &Process) -> ! {
    let logs: Vec<String> = pushgate.logs.try_iter().collect();
    panic!(
        "{what} ended {}\npushgate's log:\n{}",
        ran.describe(SCRIPT_TIMEOUT),
        logs.join("\n")
    );
}

/// Runs one scenario of integration/pusher/pusher_js.mjs against a fresh pushgate.
fn pusher_js(scenario: &str) {
    let scratch = TempDir::new(&format!("pusher-js-{scenario}"));
    node_modules(&scratch.0);
    let pushgate = start(&scratch.0);
    let ran = run(
        node(&scratch.0)
            .arg(Path::new(ROOT).join("integration/pusher/pusher_js.mjs"))
            .args(["--scenario", scenario])
            .args(script_args(&pushgate))
            .args(["--pushgate-key", common::API_KEY])
            .args(["--app2-id", QUIET_ID, "--key2", QUIET_KEY])
            .args(["--secret2", QUIET_SECRET]),
        &scratch.0,
        SCRIPT_TIMEOUT,
    )
    .expect("run node");
    if !ran.ok() {
        fail(
            &format!("integration/pusher/pusher_js.mjs --scenario {scenario}"),
            &ran,
            &pushgate,
        );
    }
    println!("{}", ran.output);
}

#[test]
fn pusher_js_receives_what_the_node_sdk_triggers() {
    pusher_js("public");
}

#[test]
fn pusher_js_private_channels_authorized_by_the_app() {
    pusher_js("private");
}

#[test]
fn pusher_js_presence_members_and_channel_queries() {
    pusher_js("presence");
}

#[test]
fn pusher_js_client_events_reach_others_only() {
    pusher_js("client-events");
}

#[test]
fn pusher_js_client_events_refused_when_the_app_disallows_them() {
    pusher_js("client-events-off");
}

#[test]
fn pusher_js_cache_channels() {
    pusher_js("cache");
}

#[test]
fn node_sdk_terminates_a_users_connections() {
    pusher_js("terminate");
}

#[test]
fn node_sdk_refused_with_bad_credentials() {
    pusher_js("api-refusals");
}

/// Two nodes on one Redis: presence, triggers, socket_id exclusion, client
/// events and terminate_connections across them.
#[test]
fn pusher_js_across_two_nodes_on_redis() {
    let scratch = TempDir::new("pusher-js-two-nodes");
    node_modules(&scratch.0);
    let redis = Redis::start();
    let engine = format!(
        "engine:\n  kind: redis\n  redis:\n    url: {}\n",
        redis.url()
    );
    let yaml = format!("{}{engine}", config("http://127.0.0.1:9"));
    let secret = [(QUIET_SECRET_ENV, QUIET_SECRET)];
    let one_dir = scratch.0.join("one");
    let two_dir = scratch.0.join("two");
    fs::create_dir_all(&one_dir).unwrap();
    fs::create_dir_all(&two_dir).unwrap();
    let one = Process::start(&one_dir, &yaml, &secret);
    let two = Process::start(&two_dir, &yaml, &secret);
    let ran = run(
        node(&scratch.0)
            .arg(Path::new(ROOT).join("integration/pusher/pusher_js.mjs"))
            .args(["--scenario", "two-nodes"])
            .args(script_args(&one))
            .args(["--public2", &two.addr.to_string()])
            .args(["--api2", &two.api_addr.to_string()]),
        &scratch.0,
        SCRIPT_TIMEOUT,
    )
    .expect("run node");
    if !ran.ok() {
        let logs: Vec<String> = two.logs.try_iter().collect();
        println!("node two's log:\n{}", logs.join("\n"));
        fail(
            "integration/pusher/pusher_js.mjs --scenario two-nodes",
            &ran,
            &one,
        );
    }
    println!("{}", ran.output);
}

/// The webhook scenarios of integration/pusher/pusher_js.mjs, in which the
/// script is pushgate's app: it listens first, then hears the addresses of
/// the pushgate `nodes` put in front of it (on one Redis when `redis`). Each
/// node posts its webhooks to `/pusher/webhook?node=NAME`, so the script
/// knows which node sent what.
fn pusher_js_as_the_app(scenario: &str, nodes: usize, redis: bool) {
    let scratch = TempDir::new(&format!("pusher-js-{scenario}"));
    node_modules(&scratch.0);
    let mut script = Script::spawn(
        node(&scratch.0)
            .arg(Path::new(ROOT).join("integration/pusher/pusher_js.mjs"))
            .args(["--scenario", scenario])
            .args(["--app-id", APP_ID, "--key", KEY, "--secret", SECRET])
            .args(["--app2-id", QUIET_ID, "--key2", QUIET_KEY])
            .args(["--secret2", QUIET_SECRET]),
        &scratch.0.join("script.log"),
    );
    let app = script.wait_line("app-listening ", PATIENCE);
    let redis = redis.then(Redis::start);
    let engine = redis.as_ref().map_or_else(String::new, |redis| {
        format!(
            "engine:\n  kind: redis\n  redis:\n    url: {}\n",
            redis.url()
        )
    });
    let pushgates: Vec<(&str, Process)> = ["one", "two"][..nodes]
        .iter()
        .map(|&name| {
            let dir = scratch.0.join(name);
            fs::create_dir_all(&dir).unwrap();
            let webhook = format!("      webhook: {{url: \"/pusher/webhook?node={name}\"}}\n");
            let yaml = format!("{}{engine}", config_with(&app, &webhook));
            let pushgate = Process::start(&dir, &yaml, &[(QUIET_SECRET_ENV, QUIET_SECRET)]);
            (name, pushgate)
        })
        .collect();
    let mut addresses = json!({});
    for ((_, pushgate), suffix) in pushgates.iter().zip(["", "2"]) {
        addresses[format!("public{suffix}")] = json!(pushgate.addr.to_string());
        addresses[format!("api{suffix}")] = json!(pushgate.api_addr.to_string());
    }
    script.say(&addresses);
    let (ended, output) = script.wait(SCRIPT_TIMEOUT);
    if !ended.is_some_and(|status| status.success()) {
        let logs: Vec<String> = pushgates
            .iter()
            .map(|(name, pushgate)| {
                let lines: Vec<String> = pushgate.logs.try_iter().collect();
                format!("node {name}'s log:\n{}", lines.join("\n"))
            })
            .collect();
        panic!(
            "integration/pusher/pusher_js.mjs --scenario {scenario} ended {}; its output:\n{output}\n{}",
            ended.map_or_else(
                || format!("killed after {SCRIPT_TIMEOUT:?}"),
                |s| s.to_string()
            ),
            logs.join("\n")
        );
    }
    println!("{output}");
}

/// Webhooks checked by the Node SDK as an app checks them: exactly the
/// expected ones, each once, on one node.
#[test]
fn node_sdk_verifies_each_webhook_once() {
    pusher_js_as_the_app("webhooks", 1, false);
}

/// The same on one node whose engine is Redis: occupancy decided by the
/// engine's script.
#[test]
fn node_sdk_verifies_each_webhook_once_on_redis() {
    pusher_js_as_the_app("webhooks", 1, true);
}

/// Two nodes on one Redis: each change of occupancy and membership is told
/// once, by one node, in order, whatever the order (or simultaneity) of the
/// joins and leaves across the nodes.
#[test]
fn webhooks_once_across_two_nodes_on_redis() {
    pusher_js_as_the_app("webhooks-two-nodes", 2, true);
}

/// Pusher's Python SDK: trigger, trigger_batch, the channel queries, and a
/// raw protocol 7 subscriber.
#[test]
fn python_sdk_triggers_and_queries() {
    let scratch = TempDir::new("pusher-python");
    let python = python(&scratch.0);
    let pushgate = start(&scratch.0);
    let ran = run(
        Command::new(&python)
            .arg(Path::new(ROOT).join("integration/pusher/sdk_check.py"))
            .args(script_args(&pushgate))
            .env("PYTHONUNBUFFERED", "1"),
        &scratch.0,
        SCRIPT_TIMEOUT,
    )
    .expect("run python");
    if !ran.ok() {
        fail("integration/pusher/sdk_check.py", &ran, &pushgate);
    }
    println!("{}", ran.output);
}

/// Laravel Echo in Chromium, with pushgate as the Laravel app's sidecar.
#[test]
fn laravel_echo_in_chromium_through_pushgate() {
    let _one = ONE_BROWSER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let scratch = TempDir::new("pusher-echo");
    ensure_chromium(&scratch.0);
    node_modules(&scratch.0);

    // The script is the app: it listens first, pushgate goes in front of it,
    // then the script hears where pushgate is.
    let log = scratch.0.join("echo.log");
    let mut echo = Script::spawn(
        node(&scratch.0)
            .arg(Path::new(ROOT).join("integration/pusher/echo.mjs"))
            .args(["--app-id", APP_ID, "--key", KEY, "--secret", SECRET])
            .args(["--chromium", crate::browser::CHROMIUM]),
        &log,
    );
    let app = echo.wait_line("app-listening ", PATIENCE);
    let pushgate = Process::start(
        &scratch.0,
        &config(&app),
        &[(QUIET_SECRET_ENV, QUIET_SECRET)],
    );
    echo.say(&json!({
        "public": pushgate.addr.to_string(),
        "api": pushgate.api_addr.to_string(),
    }));
    let (ended, output) = echo.wait(SCRIPT_TIMEOUT);
    if !ended.is_some_and(|status| status.success()) {
        let logs: Vec<String> = pushgate.logs.try_iter().collect();
        panic!(
            "integration/pusher/echo.mjs ended {}; its output:\n{output}\npushgate's log:\n{}",
            ended.map_or_else(
                || format!("killed after {SCRIPT_TIMEOUT:?}"),
                |s| s.to_string()
            ),
            logs.join("\n")
        );
    }
    println!("{output}");
}

/// A script in a process group of its own (node and the Chromium it starts),
/// its output in a file, its stdin kept open to tell it things; killed as a
/// whole on drop.
struct Script {
    child: Child,
    log: PathBuf,
}

impl Script {
    fn spawn(command: &mut Command, log: &Path) -> Script {
        use std::os::unix::process::CommandExt;
        let file = fs::File::create(log).unwrap();
        let child = command
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start node");
        Script {
            child,
            log: log.to_owned(),
        }
    }

    fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The rest of the first output line that starts with `prefix`.
    fn wait_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let output = self.output();
            if let Some(line) = output.lines().find_map(|l| l.strip_prefix(prefix)) {
                return line.trim().to_owned();
            }
            let ended = self.child.try_wait().unwrap();
            assert!(
                ended.is_none() && Instant::now() < deadline,
                "no {prefix:?} line from the script ({}); its output:\n{output}",
                ended.map_or_else(|| "still running".to_owned(), |s| s.to_string()),
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn say(&mut self, message: &Value) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{message}").unwrap();
        stdin.flush().unwrap();
    }

    fn wait(mut self, timeout: Duration) -> (Option<std::process::ExitStatus>, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        (status, self.output())
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// The refusals, on the wire.

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hmac_hex(secret: &str, text: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    hex(ring::hmac::sign(&key, text.as_bytes()).as_ref())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `GET /apps/{app}/channels`, signed as Pusher's SDKs sign it (no body, so
/// no body_md5) with `key`, `secret` and `timestamp`.
fn signed_channels_url(
    pushgate: &Process,
    app: &str,
    key: &str,
    secret: &str,
    timestamp: u64,
) -> String {
    let path = format!("/apps/{app}/channels");
    let query = format!("auth_key={key}&auth_timestamp={timestamp}&auth_version=1.0");
    let signature = hmac_hex(secret, &format!("GET\n{path}\n{query}"));
    format!(
        "http://{}{path}?{query}&auth_signature={signature}",
        pushgate.api_addr
    )
}

async fn api_get(url: String) -> (http::StatusCode, String) {
    let (status, body) = common::get_raw(url).await.expect("the API answers");
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn api_accepts_a_correct_signature() {
    let scratch = TempDir::new("pusher-api-ok");
    let pushgate = start(&scratch.0);
    let url = signed_channels_url(&pushgate, APP_ID, KEY, SECRET, now());
    let (status, body) = api_get(url).await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer, json!({"channels": {}}));
}

#[tokio::test]
async fn api_refuses_a_bad_signature() {
    let scratch = TempDir::new("pusher-api-signature");
    let pushgate = start(&scratch.0);
    let url = signed_channels_url(&pushgate, APP_ID, KEY, "not-the-secret", now());
    let (status, body) = api_get(url).await;
    assert_eq!(status, 401, "a signature made with another secret: {body}");
    assert!(!body.is_empty(), "401 says why");
    // The other app's secret does not sign for this one either.
    let url = signed_channels_url(&pushgate, APP_ID, KEY, QUIET_SECRET, now());
    assert_eq!(api_get(url).await.0, 401);
}

#[tokio::test]
async fn api_refuses_a_stale_timestamp() {
    let scratch = TempDir::new("pusher-api-stale");
    let pushgate = start(&scratch.0);
    let url = signed_channels_url(&pushgate, APP_ID, KEY, SECRET, now() - 601);
    let (status, body) = api_get(url).await;
    assert_eq!(status, 401, "a timestamp 601 s old: {body}");
    let url = signed_channels_url(&pushgate, APP_ID, KEY, SECRET, now() + 3600);
    let (status, body) = api_get(url).await;
    assert_eq!(status, 401, "a timestamp an hour ahead: {body}");
    let url = signed_channels_url(&pushgate, APP_ID, KEY, SECRET, now() - 60);
    assert_eq!(api_get(url).await.0, 200, "a minute's skew is fine");
}

#[tokio::test]
async fn api_refuses_a_wrong_key_and_an_unknown_app() {
    let scratch = TempDir::new("pusher-api-key");
    let pushgate = start(&scratch.0);
    let url = signed_channels_url(&pushgate, APP_ID, "no-such-key", SECRET, now());
    let (status, body) = api_get(url).await;
    assert_eq!(status, 401, "an unknown key: {body}");
    // The other app's key, with its own secret: the key is not this app's.
    let url = signed_channels_url(&pushgate, APP_ID, QUIET_KEY, QUIET_SECRET, now());
    let (status, body) = api_get(url).await;
    assert_eq!(status, 401, "another app's key: {body}");
    let url = signed_channels_url(&pushgate, "999999", KEY, SECRET, now());
    let (status, body) = api_get(url).await;
    assert_eq!(status, 404, "an unknown app: {body}");
    // No signature at all.
    let (status, body) = api_get(format!(
        "http://{}/apps/{APP_ID}/channels",
        pushgate.api_addr
    ))
    .await;
    assert_eq!(status, 401, "no signature: {body}");
}

/// A Pusher connection on `key`; its socket_id.
async fn pusher_connect(pushgate: &Process, key: &str) -> (WsClient, String) {
    let url = format!(
        "ws://{}/app/{key}?protocol=7&client=rust&version=1",
        pushgate.addr
    );
    let (mut ws, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url))
        .await
        .expect("handshake in time")
        .expect("handshake accepted");
    let hello = ws_next_json(&mut ws).await;
    assert_eq!(hello["event"], "pusher:connection_established", "{hello}");
    let data: Value = serde_json::from_str(hello["data"].as_str().unwrap()).unwrap();
    let socket_id = data["socket_id"].as_str().unwrap().to_owned();
    (ws, socket_id)
}

async fn send(ws: &mut WsClient, message: Value) {
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        message.to_string(),
    ))
    .await
    .unwrap();
}

/// The next message that is not a ping or pong of Pusher's.
async fn next_event(ws: &mut WsClient) -> Value {
    loop {
        let message = ws_next_json(ws).await;
        if message["event"] != "pusher:ping" && message["event"] != "pusher:pong" {
            return message;
        }
    }
}

/// The `data` of a Pusher message, parsed when it is a JSON string.
fn data(message: &Value) -> Value {
    match &message["data"] {
        Value::String(text) => serde_json::from_str(text).unwrap_or(Value::String(text.clone())),
        other => other.clone(),
    }
}

#[tokio::test]
async fn private_subscription_with_a_bad_signature_is_refused() {
    let scratch = TempDir::new("pusher-private");
    let pushgate = start(&scratch.0);
    let (mut ws, socket_id) = pusher_connect(&pushgate, KEY).await;
    let (_, other_socket) = pusher_connect(&pushgate, KEY).await;

    let channel = "private-orders.1";
    let refusals = [
        ("no auth", json!({"channel": channel})),
        (
            "another secret",
            json!({"channel": channel, "auth": format!("{KEY}:{}", hmac_hex("not-the-secret", &format!("{socket_id}:{channel}")))}),
        ),
        (
            "another socket's signature",
            json!({"channel": channel, "auth": format!("{KEY}:{}", hmac_hex(SECRET, &format!("{other_socket}:{channel}")))}),
        ),
        (
            "another app's key",
            json!({"channel": channel, "auth": format!("{QUIET_KEY}:{}", hmac_hex(SECRET, &format!("{socket_id}:{channel}")))}),
        ),
        (
            "another channel's signature",
            json!({"channel": channel, "auth": format!("{KEY}:{}", hmac_hex(SECRET, &format!("{socket_id}:private-orders.2")))}),
        ),
    ];
    for (why, subscribe) in refusals {
        send(
            &mut ws,
            json!({"event": "pusher:subscribe", "data": subscribe}),
        )
        .await;
        let answer = next_event(&mut ws).await;
        assert_eq!(
            answer["event"], "pusher:subscription_error",
            "{why}: {answer}"
        );
        assert_eq!(answer["channel"], channel, "{why}: {answer}");
        let error = data(&answer);
        assert_eq!(error["type"], "AuthError", "{why}: {answer}");
        assert_eq!(error["status"], 401, "{why}: {answer}");
    }
    // The right signature still works on the same connection.
    let auth = format!(
        "{KEY}:{}",
        hmac_hex(SECRET, &format!("{socket_id}:{channel}"))
    );
    send(
        &mut ws,
        json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth}}),
    )
    .await;
    let answer = next_event(&mut ws).await;
    assert_eq!(
        answer["event"], "pusher_internal:subscription_succeeded",
        "{answer}"
    );
    assert_eq!(answer["channel"], channel);
}

#[tokio::test]
async fn client_event_refused_when_the_app_disallows_them() {
    let scratch = TempDir::new("pusher-client-events");
    let pushgate = start(&scratch.0);
    let channel = "private-chat";
    let mut sockets = Vec::new();
    for _ in 0..2 {
        let (mut ws, socket_id) = pusher_connect(&pushgate, QUIET_KEY).await;
        let auth = format!(
            "{QUIET_KEY}:{}",
            hmac_hex(QUIET_SECRET, &format!("{socket_id}:{channel}"))
        );
        send(
            &mut ws,
            json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth}}),
        )
        .await;
        let answer = next_event(&mut ws).await;
        assert_eq!(
            answer["event"], "pusher_internal:subscription_succeeded",
            "{answer}"
        );
        sockets.push(ws);
    }
    let (mut sender, mut other) = (sockets.remove(0), sockets.remove(0));
    send(
        &mut sender,
        json!({"event": "client-typing", "channel": channel, "data": {"typing": true}}),
    )
    .await;
    let answer = next_event(&mut sender).await;
    assert_eq!(answer["event"], "pusher:error", "{answer}");
    let error = data(&answer);
    assert!(
        error["message"].is_string(),
        "pusher:error says why: {answer}"
    );

    // The other subscriber got nothing: it hears the answer to its own ping
    // next, sent after the refusal.
    send(&mut other, json!({"event": "pusher:ping", "data": {}})).await;
    let heard = ws_next_json(&mut other).await;
    assert_eq!(
        heard["event"], "pusher:pong",
        "the other subscriber heard the refused client event: {heard}"
    );
}

#[tokio::test]
async fn a_foreign_origin_is_refused_and_the_own_one_accepted() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let scratch = TempDir::new("pusher-origin");
    let pushgate = start(&scratch.0);
    let url = format!("ws://{}/app/{KEY}?protocol=7", pushgate.addr);
    let handshake = |origin: String| {
        let mut request = url.as_str().into_client_request().unwrap();
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
        tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(request))
    };
    let foreign = handshake("http://evil.example".into())
        .await
        .expect("in time");
    match foreign {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("a foreign Origin must be refused with 403: {other:?}"),
    }
    let (mut own, _) = handshake(format!("http://{}", pushgate.addr))
        .await
        .expect("in time")
        .expect("pushgate's own origin is accepted");
    let hello = next_event(&mut own).await;
    assert_eq!(hello["event"], "pusher:connection_established", "{hello}");
}

/// The spec: the server pings with `pusher:ping` when a connection was idle
/// for `activity_timeout` (the value it told the client), and a client that
/// answers `pusher:pong` stays connected.
#[tokio::test]
async fn an_idle_connection_is_pinged_with_pusher_ping_after_activity_timeout() {
    let scratch = TempDir::new("pusher-activity");
    let yaml = format!("{}  activity_timeout: 1s\n", config("http://127.0.0.1:9"));
    let pushgate = Process::start(&scratch.0, &yaml, &[(QUIET_SECRET_ENV, QUIET_SECRET)]);
    let url = format!("ws://{}/app/{KEY}?protocol=7", pushgate.addr);
    let (mut ws, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url))
        .await
        .expect("handshake in time")
        .expect("handshake accepted");
    let hello = ws_next_json(&mut ws).await;
    let told: Value = serde_json::from_str(hello["data"].as_str().unwrap()).unwrap();
    assert_eq!(told["activity_timeout"], 1, "{hello}");
    // Idle: within the activity timeout and some slack, a pusher:ping.
    for round in 0..2 {
        let started = Instant::now();
        let ping = tokio::time::timeout(Duration::from_secs(5), ws_next_json(&mut ws))
            .await
            .unwrap_or_else(|_| {
                panic!("round {round}: no pusher:ping within 5 s of idleness (activity_timeout 1s)")
            });
        assert_eq!(ping["event"], "pusher:ping", "round {round}: {ping}");
        assert!(
            started.elapsed() >= Duration::from_millis(500),
            "not before the client was idle"
        );
        send(&mut ws, json!({"event": "pusher:pong", "data": {}})).await;
    }
}

/// A node shutting down closes its Pusher connections with 4200, which
/// tells pusher-js to reconnect at once (to another node).
#[tokio::test]
async fn shutdown_closes_pusher_connections_with_4200() {
    let scratch = TempDir::new("pusher-shutdown");
    let pushgate = start(&scratch.0);
    let (mut ws, _) = pusher_connect(&pushgate, KEY).await;
    send(
        &mut ws,
        json!({"event": "pusher:subscribe", "data": {"channel": "news"}}),
    )
    .await;
    let answer = next_event(&mut ws).await;
    assert_eq!(
        answer["event"], "pusher_internal:subscription_succeeded",
        "{answer}"
    );
    pushgate.signal("TERM");
    assert_eq!(common::ws_close_code(&mut ws).await, Some(4200));
}

/// `pusher.max_presence_members`: the member over it is refused, and a user
/// already present may still open another connection.
#[tokio::test]
async fn a_presence_channel_refuses_members_over_the_limit() {
    let scratch = TempDir::new("pusher-presence-limit");
    let yaml = format!(
        "{}  max_presence_members: 2\n",
        config("http://127.0.0.1:9")
    );
    let pushgate = Process::start(&scratch.0, &yaml, &[(QUIET_SECRET_ENV, QUIET_SECRET)]);
    let channel = "presence-small";
    let mut kept = Vec::new();
    for (user, admitted) in [("1", true), ("2", true), ("1", true), ("3", false)] {
        let (mut ws, socket_id) = pusher_connect(&pushgate, KEY).await;
        let channel_data = json!({"user_id": user, "user_info": {}}).to_string();
        let auth = format!(
            "{KEY}:{}",
            hmac_hex(SECRET, &format!("{socket_id}:{channel}:{channel_data}"))
        );
        send(
            &mut ws,
            json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth, "channel_data": channel_data}}),
        )
        .await;
        let answer = next_event(&mut ws).await;
        let expected = if admitted {
            "pusher_internal:subscription_succeeded"
        } else {
            "pusher:subscription_error"
        };
        assert_eq!(answer["event"], expected, "user {user}: {answer}");
        kept.push(ws);
    }
}
