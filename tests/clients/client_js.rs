//! The browser client, `clients/js/pushgate.js`: served at
//! `/realtime/client.js`, its pure logic under Node's test runner, the
//! library itself against real pushgate servers (one of them in front of a
//! real app that answers auth and `rpc`), and its size once minified and
//! gzipped.
//!
//! Needs Node.js 20 or newer, and npm for the size check (`npm ci` into
//! integration/browser/node_modules, done here when missing).

use crate::common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::node::{node, node_modules, BROWSER_DIR, ROOT};
use common::pyenv::run;
use common::{Pushgate, TempDir, API_KEY};
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// The client's budget, minified and gzipped.
const MAX_GZIPPED: usize = 6 * 1024;
const NODE_TIMEOUT: Duration = Duration::from_secs(240);
const JWT_SECRET: &str = "client-js-test-secret-0123456789abcdef";

const SOURCE: &str = include_str!("../../clients/js/pushgate.js");

async fn fetch(
    url: String,
    method: &str,
    if_none_match: Option<&str>,
) -> (StatusCode, http::HeaderMap, bytes::Bytes) {
    let mut request = Request::builder().method(method).uri(url);
    if let Some(tag) = if_none_match {
        request = request.header(header::IF_NONE_MATCH, tag);
    }
    let response = common::client()
        .request(request.body(common::empty_body()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

#[tokio::test]
async fn served_at_realtime_client_js_with_cache_validation() {
    let app = common::Upstream::start().await;
    let pushgate = Pushgate::start(&app.url(), "").await;
    let url = pushgate.url("/realtime/client.js");

    let (status, headers, body) = fetch(url.clone(), "GET", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        SOURCE.as_bytes(),
        "the repository's file, byte for byte"
    );
    assert_eq!(
        headers[header::CONTENT_TYPE],
        "text/javascript; charset=utf-8"
    );
    assert_eq!(headers[header::CACHE_CONTROL], "public, max-age=300");
    assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
    assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    let etag = headers[header::ETAG].to_str().unwrap().to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    assert_eq!(
        app.hits.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "served by pushgate, not the app"
    );

    // The browser's revalidation: 304 with no body for this version only.
    let (status, headers, body) = fetch(url.clone(), "GET", Some(&etag)).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    assert!(body.is_empty());
    assert_eq!(headers[header::ETAG], etag.as_str());
    let (status, _, body) = fetch(url.clone(), "GET", Some("\"0123456789abcdef\"")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.len(), SOURCE.len());

    let (status, headers, body) = fetch(url.clone(), "HEAD", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.is_empty());
    assert_eq!(
        headers[header::CONTENT_LENGTH],
        SOURCE.len().to_string().as_str()
    );

    let (status, headers, _) = fetch(url, "POST", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers[header::ALLOW], "GET, HEAD");

    // Under another realtime.prefix it moves with the other endpoints.
    let moved = Pushgate::start(&app.url(), "realtime:\n  prefix: /push\n").await;
    let (status, _, body) = fetch(moved.url("/push/client.js"), "GET", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.len(), SOURCE.len());
}

/// Runs a node command from the repository's root; panics with its output
/// unless it succeeds. Returns the output.
fn run_node(scratch: &TempDir, command: &mut Command, what: &str) -> String {
    let ran = run(command.current_dir(ROOT), &scratch.0, NODE_TIMEOUT).expect("run node");
    assert!(ran.ok(), "{what} ended {}", ran.describe(NODE_TIMEOUT));
    ran.output
}

#[test]
fn pure_logic_under_node_test_runner() {
    let scratch = TempDir::new("client-js-logic");
    let output = run_node(
        &scratch,
        node(&scratch.0).args(["--test", "clients/js/test/logic.test.mjs"]),
        "node --test clients/js/test/logic.test.mjs",
    );
    assert!(output.contains("# fail 0"), "{output}");
    println!("{output}");
}

/// A real app for calls from the library. Its `/rpc` answers by method:
/// `whoami` (the caller's user and data), `refuse` (the app's own error),
/// `wait {key}` (answers once `release {key}` was called), `waiting {key}`
/// (whether a `wait` on the key is under way).
struct CallsApp {
    url: String,
}

/// `wait` calls under way and their releases, by key.
#[derive(Default)]
struct Waits {
    under_way: Mutex<HashMap<String, usize>>,
    releases: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Waits {
    fn releases(&self, key: &str) -> Arc<Semaphore> {
        let mut releases = self.releases.lock().unwrap();
        releases
            .entry(key.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(0)))
            .clone()
    }

    fn count(&self, key: &str, change: isize) {
        let mut under_way = self.under_way.lock().unwrap();
        let count = under_way.entry(key.to_owned()).or_default();
        *count = count.saturating_add_signed(change);
    }
}

/// Counts a `wait` as under way until it ends, answered or dropped.
struct Waiting<'a>(&'a Waits, String);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.count(&self.1, -1);
    }
}

impl CallsApp {
    async fn start() -> CallsApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let waits = Arc::new(Waits::default());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let waits = waits.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| calls_app(request, waits.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        CallsApp { url }
    }
}

async fn calls_app(
    request: Request<Incoming>,
    waits: Arc<Waits>,
) -> Result<Response<Full<bytes::Bytes>>, Infallible> {
    let reply = |status: u16, body: Value| {
        Ok(Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.to_string().into()))
            .unwrap())
    };
    let path = request.uri().path().to_owned();
    let bytes = request.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if path != "/rpc" {
        return reply(404, json!({}));
    }
    let key = body["data"]["key"].as_str().unwrap_or_default().to_owned();
    match body["method"].as_str().unwrap_or_default() {
        "whoami" => reply(200, json!({"user": body["user"], "data": body["data"]})),
        "refuse" => reply(
            403,
            json!({"error": {"code": "not_yours", "message": "that is not yours"}}),
        ),
        "wait" => {
            waits.count(&key, 1);
            let _waiting = Waiting(&waits, key.clone());
            waits.releases(&key).acquire().await.unwrap().forget();
            reply(200, json!("waited"))
        }
        "waiting" => {
            let under_way = waits.under_way.lock().unwrap().get(&key).copied();
            reply(200, json!(under_way.unwrap_or(0) > 0))
        }
        "release" => {
            waits.releases(&key).add_permits(1);
            reply(200, json!("released"))
        }
        _ => reply(404, json!({})),
    }
}

/// The config of a node in front of [`CallsApp`], after the JWT settings:
/// its `rpc`, and clients may publish on `room:` and `secret:`. JWT mode,
/// because a WebSocket (Node's as a browser's) cannot send the headers an
/// app's own login would read, and `?token=` is JWT's.
const CALLS_CONFIG: &str = "rpc:\n  path: /rpc\nchannels:\n  - prefix: \"room:\"\n    publish: direct\n  - prefix: \"secret:\"\n    publish: direct\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_against_real_pushgate() {
    let scratch = TempDir::new("client-js-live");
    let app = common::Upstream::start().await;
    let open = Pushgate::start(&app.url(), "history:\n  size: 5\n").await;
    let jwt_auth = format!(
        "auth:\n  mode: jwt\n  jwt:\n    algorithm: HS256\n    secret: \"{JWT_SECRET}\"\n    leeway: 0s\n"
    );
    let jwt = Pushgate::start(
        &app.url(),
        &format!("{jwt_auth}limits:\n  connections_per_user: 1\n"),
    )
    .await;
    let calls_app = CallsApp::start().await;
    let calls = Pushgate::start(&calls_app.url, &format!("{jwt_auth}{CALLS_CONFIG}")).await;
    let mut command = node(&scratch.0);
    command
        .args([
            "--experimental-websocket",
            "--test",
            "clients/js/test/live.test.mjs",
        ])
        .env("PUSHGATE_PUBLIC", format!("http://{}", open.addr))
        .env("PUSHGATE_API", format!("http://{}", open.api_addr))
        .env("PUSHGATE_KEY", API_KEY)
        .env("PUSHGATE_JWT_PUBLIC", format!("http://{}", jwt.addr))
        .env("PUSHGATE_JWT_API", format!("http://{}", jwt.api_addr))
        .env("PUSHGATE_JWT_SECRET", JWT_SECRET)
        .env("PUSHGATE_CALLS_PUBLIC", format!("http://{}", calls.addr))
        .env("PUSHGATE_CALLS_API", format!("http://{}", calls.api_addr));
    // The servers run on this runtime; node is waited for beside it.
    let output = tokio::task::spawn_blocking(move || {
        run_node(
            &scratch,
            &mut command,
            "node --test clients/js/test/live.test.mjs",
        )
    })
    .await
    .unwrap();
    assert!(output.contains("# fail 0"), "{output}");
    println!("{output}");
}

#[test]
fn under_6_kib_minified_and_gzipped() {
    let scratch = TempDir::new("client-js-size");
    node_modules(&scratch.0);
    let output = run_node(
        &scratch,
        node(&scratch.0).arg(format!("{BROWSER_DIR}/size.mjs")),
        "integration/browser/size.mjs",
    );
    let line = output.lines().last().unwrap_or_default();
    let size: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|_| panic!("size.mjs printed {output}"));
    let gzipped = size["gzipped"].as_u64().unwrap() as usize;
    let minified = size["minified"].as_u64().unwrap() as usize;
    println!("clients/js/pushgate.js: {size}");
    assert!(
        minified < SOURCE.len(),
        "terser must have minified it: {size}"
    );
    assert!(
        gzipped < MAX_GZIPPED,
        "the client is {gzipped} bytes minified and gzipped, over its {MAX_GZIPPED}-byte budget"
    );
}
