//! The overload policy (`api.backpressure`), end to end: when most sessions
//! take their publications later than `max_delay`, a publish waits for the
//! fan-out to catch up and is refused unstored (503 `overloaded`,
//! `Retry-After`) when it does not in `max_wait`; once the fan-out is on
//! time again, publishes are taken at once.
//!
//! A long `realtime.coalesce_window` makes lateness certain rather than a
//! matter of load: a publication that comes within the window of a
//! session's last write is held until the window ends, which is later than
//! the `max_delay` set here.

use crate::common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::realtime::{Got, Sse};
use common::{api_call, Pushgate, Upstream, API_KEY};
use http::{Request, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);
/// Enough sessions that the busier of two lanes has well over the dozen
/// late takes that make it behind.
const SUBSCRIBERS: usize = 40;

/// The Pusher app whose signed API publishes too.
const PUSHER_ID: &str = "77";
const PUSHER_KEY: &str = "bp-key";
const PUSHER_SECRET: &str = "bp-secret-0123456789";

async fn start(max_delay: &str) -> (Upstream, Pushgate) {
    let app = Upstream::start().await;
    let extra = format!(
        "realtime:\n  coalesce_window: 400ms\napi:\n  backpressure:\n    max_delay: {max_delay}\n    max_wait: 300ms\n\
         pusher:\n  apps:\n    - {{id: \"{PUSHER_ID}\", key: {PUSHER_KEY}, secret: {PUSHER_SECRET}}}\n"
    );
    let gate = Pushgate::start(&app.url(), &extra).await;
    (app, gate)
}

/// A request's status, `Retry-After` and body.
async fn answer(
    request: Request<BoxBody<Bytes, std::io::Error>>,
) -> (StatusCode, Option<String>, Vec<u8>) {
    let response = tokio::time::timeout(WAIT, common::client().request(request))
        .await
        .expect("the API answers")
        .unwrap();
    let status = response.status();
    let retry_after = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, retry_after, bytes.to_vec())
}

/// A publish's status, `Retry-After` and body.
async fn publish(gate: &Pushgate, n: u64) -> (StatusCode, Option<String>, Value) {
    let request = Request::builder()
        .method("POST")
        .uri(format!("http://{}/api/publish", gate.api_addr))
        .header("authorization", format!("Bearer {API_KEY}"))
        .header("content-type", "application/json")
        .body(common::body(
            json!({"channel": "room", "data": {"n": n}}).to_string(),
        ))
        .unwrap();
    let (status, retry_after, body) = answer(request).await;
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, retry_after, body)
}

/// A publish through the Pusher HTTP API, signed as the SDKs sign: its
/// status, `Retry-After` and body.
async fn pusher_publish(gate: &Pushgate, n: u64) -> (StatusCode, Option<String>, String) {
    let path = format!("/apps/{PUSHER_ID}/events");
    let payload = json!({"name": "tick", "channel": "room", "data": n.to_string()}).to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let query = pushgate::pusher::sign::sign_request(
        "POST",
        &path,
        &[],
        payload.as_bytes(),
        PUSHER_KEY,
        PUSHER_SECRET,
        now,
    );
    let request = Request::builder()
        .method("POST")
        .uri(format!("http://{}{path}?{query}", gate.api_addr))
        .header("content-type", "application/json")
        .body(common::body(payload))
        .unwrap();
    let (status, retry_after, body) = answer(request).await;
    (
        status,
        retry_after,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// Reads until `sse` has had publication `n` (by its data), failing on
/// anything else out of order.
async fn receive_up_to(sse: &mut Sse, n: u64) {
    loop {
        let block = tokio::time::timeout(WAIT, sse.next())
            .await
            .expect("the stream goes on")
            .expect("the stream is whole")
            .expect("the stream is open");
        if let (Some(Got::Message { data, .. }), _) = block {
            if data["n"] == n {
                return;
            }
            assert!(data["n"].as_u64().unwrap() < n, "got {data} past {n}");
        }
    }
}

async fn subscribers(gate: &Pushgate) -> Vec<Sse> {
    let mut streams = Vec::new();
    for _ in 0..SUBSCRIBERS {
        streams.push(Sse::open(gate.addr, &["room"], None).await.unwrap());
    }
    // Every stream is subscribed before anything is published.
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, channels) = api_call(gate.api_addr, "GET", "/api/channels", None).await;
        let count = channels["channels"]
            .as_array()
            .and_then(|list| list.iter().find(|c| c["channel"] == "room"))
            .map_or(0, |c| c["subscribers"].as_u64().unwrap_or(0));
        if count == SUBSCRIBERS as u64 {
            return streams;
        }
        assert!(
            Instant::now() < deadline,
            "{count} of {SUBSCRIBERS} subscribed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Publishes 1..=5 at once: each session writes the first at once and holds
/// the rest back for the coalesce window, taking them late.
async fn late_burst(gate: &Pushgate, streams: &mut [Sse]) {
    for n in 1..=5 {
        let (status, _, body) = publish(gate, n).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    for sse in streams.iter_mut() {
        receive_up_to(sse, 5).await;
    }
}

async fn metric(gate: &Pushgate, line_start: &str) -> Option<String> {
    let response = common::client()
        .get(format!("http://{}/metrics", gate.api_addr).parse().unwrap())
        .await
        .unwrap();
    let text = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&text)
        .lines()
        .find(|line| line.starts_with(line_start))
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_fan_out_holds_publishes_back_and_refuses_them_unstored() {
    let (_app, gate) = start("50ms").await;
    let mut streams = subscribers(&gate).await;
    late_burst(&gate, &mut streams).await;
    assert_eq!(
        metric(&gate, "pushgate_fanout_behind ").await.as_deref(),
        Some("pushgate_fanout_behind 1"),
        "most sessions took 2-5 late"
    );

    // Nothing takes anything now, so the fan-out cannot catch up within
    // max_wait: refused, with when to come back, and stored nowhere.
    let asked = Instant::now();
    let (status, retry_after, body) = publish(&gate, 6).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(
        asked.elapsed() >= Duration::from_millis(300),
        "answered after {:?}, before max_wait",
        asked.elapsed()
    );
    let (_, history) = api_call(gate.api_addr, "GET", "/api/history?channel=room", None).await;
    let stored: Vec<u64> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["data"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(stored, [1, 2, 3, 4, 5], "{history}");
    assert_eq!(
        metric(&gate, "pushgate_publishes_total{outcome=\"overloaded\"}")
            .await
            .as_deref(),
        Some("pushgate_publishes_total{outcome=\"overloaded\"} 1")
    );

    // A late take keeps a lane behind for a second at most; then the
    // publisher's retry is taken, and delivered next after 5.
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, _, body) = publish(&gate, 7).await;
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(body["error"]["code"], "overloaded", "{body}");
        assert!(Instant::now() < deadline, "still refused after {WAIT:?}");
    }
    for sse in &mut streams {
        let block = tokio::time::timeout(WAIT, sse.next()).await.unwrap();
        match block.unwrap().unwrap() {
            (Some(Got::Message { data, offset, .. }), _) => {
                assert_eq!(data["n"], 7, "6 was never stored");
                assert_eq!(offset, 6);
            }
            other => panic!("expected publication 7, got {other:?}"),
        }
    }
    assert_eq!(
        metric(&gate, "pushgate_fanout_behind ").await.as_deref(),
        Some("pushgate_fanout_behind 0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pusher_api_is_held_back_and_refused_the_same_way() {
    let (_app, gate) = start("50ms").await;
    let mut streams = subscribers(&gate).await;
    late_burst(&gate, &mut streams).await;
    let asked = Instant::now();
    let (status, retry_after, body) = pusher_publish(&gate, 6).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("nothing was stored"), "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(
        asked.elapsed() >= Duration::from_millis(300),
        "answered after {:?}, before max_wait",
        asked.elapsed()
    );
    // Once the lanes are on time again, the same publish is taken.
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, _, body) = pusher_publish(&gate, 7).await;
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(Instant::now() < deadline, "still refused after {WAIT:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_max_delay_zero_publishes_never_wait() {
    let (_app, gate) = start("0s").await;
    let mut streams = subscribers(&gate).await;
    late_burst(&gate, &mut streams).await;
    let asked = Instant::now();
    let (status, _, body) = publish(&gate, 6).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(asked.elapsed() < Duration::from_millis(300));
    assert_eq!(
        metric(&gate, "pushgate_fanout_behind ").await.as_deref(),
        Some("pushgate_fanout_behind 0")
    );
}
