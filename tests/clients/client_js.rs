//! The browser client, `clients/js/pushgate.js`: served at
//! `/realtime/client.js`, its pure logic under Node's test runner, the
//! library itself against real pushgate servers, and its size once minified
//! and gzipped.
//!
//! Needs Node.js 20 or newer, and npm for the size check (`npm ci` into
//! integration/browser/node_modules, done here when missing).

use crate::common;

use std::process::Command;
use std::time::Duration;

use common::node::{node, node_modules, BROWSER_DIR, ROOT};
use common::pyenv::run;
use common::{Pushgate, TempDir, API_KEY};
use http::{header, Request, StatusCode};
use http_body_util::BodyExt;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_against_real_pushgate() {
    let scratch = TempDir::new("client-js-live");
    let app = common::Upstream::start().await;
    let open = Pushgate::start(&app.url(), "history:\n  size: 5\n").await;
    let jwt = Pushgate::start(
        &app.url(),
        &format!(
            "auth:\n  mode: jwt\n  jwt:\n    algorithm: HS256\n    secret: \"{JWT_SECRET}\"\n    leeway: 0s\nlimits:\n  connections_per_user: 1\n"
        ),
    )
    .await;
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
        .env("PUSHGATE_JWT_SECRET", JWT_SECRET);
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
