//! `log.access`: a line per proxied request and per realtime connect, each
//! with a request id the app receives too, against the real binary.

use crate::common;

use std::time::Duration;

use common::recording::RecordingApp;
use common::{Process, TempDir, PATIENCE};
use serde_json::Value;

/// The next access log line with `message`, as JSON.
fn access_line(gate: &Process, message: &str) -> Value {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = gate
            .logs
            .recv_timeout(left.max(Duration::from_millis(1)))
            .unwrap_or_else(|_| panic!("no access line {message:?}"));
        let Ok(event) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if event["target"] == "pushgate::access" && event["message"] == message {
            return event;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_has_an_id_the_app_and_the_access_log_share() {
    let app = RecordingApp::start().await;
    let scratch = TempDir::new("access-log");
    let config = format!(
        "listen: 127.0.0.1:0\nupstream: {{url: '{}'}}\nlog: {{access: true}}\n",
        app.url()
    );
    // Auth asks the app (which answers no grant): a refused connect.
    let gate = Process::start(&scratch.0, &config, &[("PUSHGATE_AUTH__MODE", "upstream")]);

    // A client's own id is not kept: it does not come from a trusted proxy.
    let request = http::Request::get(format!("http://{}/page", gate.addr))
        .header("x-request-id", "chosen-by-the-client")
        .body(common::empty_body())
        .unwrap();
    let status = common::client().request(request).await.unwrap().status();
    assert_eq!(status, 200);
    let line = tokio::task::block_in_place(|| access_line(&gate, "proxied"));
    let id = line["request_id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 32, "{line}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{line}");
    assert_eq!(line["status"], 200);
    assert_eq!(line["path"], "/page");
    let seen = app.requests();
    let page = seen.iter().find(|r| r.target == "/page").unwrap();
    assert_eq!(page.values("x-request-id"), std::slice::from_ref(&id));

    // A realtime connect: its id reaches the app with the auth request.
    let (status, _) = common::get(&format!(
        "http://{}/realtime/poll?channel=c&timeout=0",
        gate.addr
    ))
    .await;
    assert_eq!(status, 503);
    let line = tokio::task::block_in_place(|| access_line(&gate, "realtime connect"));
    assert_eq!(line["transport"], "poll");
    assert_eq!(line["outcome"], "auth_unavailable");
    let id = line["request_id"].as_str().unwrap();
    let auth = app
        .requests()
        .into_iter()
        .find(|r| r.target == "/realtime/auth")
        .expect("the auth request reached the app");
    assert_eq!(auth.values("x-request-id"), [id.to_owned()]);
}
